"""Process-wide runtime settings that must be chosen on purpose: torch threads and seeds."""
from __future__ import annotations

import os
import random
from pathlib import Path

import torch


def physical_cores() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (default: the cores this process may use) and return the number.

    On the 2-core machines this suite targets, torch's defaults oversubscribe the cores as soon as
    anything else runs, which made small ops ~1000x slower (docs/stack.md)."""
    n = threads or physical_cores()
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    return n


def launched_processes() -> int:
    """How many processes `accelerate launch` / torchrun started for this job (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 of a multi-process launch, or the only process: the one that writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover - numpy ships with torch here
        pass


def output_folder(path: str | Path, option: str) -> Path:
    """`path` made (with its parents) as the folder output goes to; ConfigError naming `option` when it cannot
    be (a file in the way, a parent that cannot be made) or cannot be written."""
    from .errors import ConfigError

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{option} {path}: is a file, not a folder; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot make this folder ({exc.strerror}); give a folder you can "
                          "write") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: this folder is not writable; give a folder you can write")
    return folder


def cache_dir() -> Path:
    """The suite's user cache (converted builtin models, teacher caches); respects XDG_CACHE_HOME."""
    root = os.environ.get("COMPRESS_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "compress-suite"
