"""What a figure was measured on: CPU, flags, cores, memory, GPU, library versions, the suite's git commit."""
from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from pathlib import Path

# cpuinfo flag -> the name the report uses
_FLAGS = {"avx2": "AVX2", "avx512f": "AVX512", "avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI",
          "avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8", "fma": "FMA"}


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name":
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model, flags


def _mem_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _gpus() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []
    except (OSError, subprocess.SubprocessError):
        return []


def git_commit() -> str | None:
    """The suite's commit, with `+dirty` when tracked files differ from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


@functools.lru_cache(maxsize=1)
def machine_record() -> dict:
    from compress.checkpoint import library_versions

    from .roofline import memory_bandwidth_gb_s

    model, flags = _cpuinfo()
    versions = {"python": platform.python_version(), **library_versions()}
    try:
        import numpy

        versions["numpy"] = numpy.__version__
    except ImportError:  # pragma: no cover
        pass
    return {
        "cpu": model,
        "cpu_flags": sorted(name for flag, name in _FLAGS.items() if flag in flags),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": _mem_total_gb(),
        # all usable cores copying: the bandwidth a decoder's weight reads can reach (benchmarks/roofline.py)
        "memory_bandwidth_gb_s": memory_bandwidth_gb_s(len(os.sched_getaffinity(0))
                                                       if hasattr(os, "sched_getaffinity") else os.cpu_count()),
        "gpus": _gpus(),
        "os": f"{platform.system()} {platform.release()}",
        "hostname": platform.node(),
        "versions": versions,
        "git_commit": git_commit(),
        "executable": sys.executable,
    }
