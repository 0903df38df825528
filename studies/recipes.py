"""A study's variants built by the pipeline runner, so the studies and `compress run` share one step cache.

A recipe is a list of (pass name, options) applied to a source model. `build` runs it as a pipeline in `work`
(work/runs/<recipe hash>/, each finished step hard-linked into work/store/ under its step key), so a prefix two
recipes share is built once, and a step whose parent, pass version, options or data changed is built anew:
the keys `compress run` uses."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from compress import checkpoint
from compress.data import DataSpec
from pipelines.config import validate
from pipelines.runner import Runner


def build(source: str, task: str, recipe: list[tuple[str, dict]], data: dict[str, DataSpec], work: Path,
          log=print) -> str:
    """The checkpoint `recipe` ends in (`source` itself for an empty recipe). `data` maps the pipeline's data
    roles (train, eval, calibration) to their specs; the passes run on the threads the study set."""
    if not recipe:
        return source
    passes = [{name: dict(options)} for name, options in recipe]
    name = "recipe-" + hashlib.sha256(json.dumps([source, task, passes], sort_keys=True).encode()).hexdigest()[:12]
    raw = {"name": name, "model": {"source": source}, "task": task, "threads": torch.get_num_threads(),
           "data": {role: spec.model_dump(exclude_defaults=True) for role, spec in data.items()},
           "passes": passes}
    steps = Runner(validate(raw), output_dir=work / "runs", show_progress=False, log=log,
                   store=work / "store").run().steps
    return steps[-1].path


def derived(parent: str | Path, label: str, work: Path) -> Path:
    """The folder for what a tool other than the suite's passes (optimum's quantizer) makes from the checkpoint
    `parent`: named by the parent's content, so a rebuilt parent with other weights gets a new one."""
    held = checkpoint.content_hash(checkpoint.read_manifest(Path(parent)))[:12]
    return work / "derived" / f"{label}-{held}"


def bare_copy(src: Path, dst: Path, model) -> Path:
    """`model` (an edited graph of the checkpoint `src`) saved into `dst` with `src`'s other files linked, but
    not its manifest, whose file table no longer fits: a bare ONNX folder for a study's variant."""
    from compress import onnx_tools

    dst.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if f.name not in (onnx_tools.ONNX_FILE, onnx_tools.EXTERNAL_DATA, "manifest.json") and not (dst / f.name).exists():
            (dst / f.name).symlink_to(f.resolve())
    onnx_tools.save_model(model, dst, "auto")
    return dst
