"""The two measurements of a search: the cheap screen every trial gets, the full harness run for a few.

Screen: quality on a slice of the eval data (`screen.max_tokens` / `max_examples`), scored in this process by
the harness's own worker code (no subprocess start per trial), and the weights' size on disk. Full:
`benchmarks.harness.measure` in its own process (latency, peak memory, quality on the whole eval data) with
the config's `benchmark:` settings. Both are stored by the checkpoint's cache key, so a resumed search or a
recipe met again is not measured twice."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from benchmarks.config import DEFAULT_EVAL, BenchmarkConfig
from benchmarks.harness import weights_size
from compress.data import DataSpec

from .config import SearchSetup
from .figures import QUALITY, figures_from


def _store(path: Path, record: dict) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, default=str))
    tmp.replace(path)
    return record


class Measurer:
    """Screens and measures targets (a checkpoint folder, or the model source) for one search."""

    def __init__(self, setup: SearchSetup, work_dir: Path, log=print):
        cfg = setup.pipeline.config
        self.setup, self.work_dir, self.log = setup, Path(work_dir), log
        self.task = cfg.task
        bench = cfg.benchmark or BenchmarkConfig(latency=None)
        if bench.threads is None and cfg.threads:
            bench = bench.model_copy(update={"threads": cfg.threads})
        self.bench = bench
        eval_spec = bench.data or cfg.data.eval or DataSpec(**DEFAULT_EVAL[cfg.task])
        self.eval_spec = cfg.data.eval
        screen = setup.settings.screen
        cap = ({"max_tokens": min(eval_spec.max_tokens or screen.max_tokens, screen.max_tokens)}
               if cfg.task == "causal-lm" else
               {"max_examples": min(eval_spec.max_examples or screen.max_examples, screen.max_examples)})
        # what the screen leaves out of the eval data (None: it scores all of it), for the report to say
        (unit, n), = cap.items()
        whole = getattr(eval_spec, unit)  # None: the whole corpus
        self.slice = f"{n} {unit.removeprefix('max_')}" if whole is None or whole > n else None
        quality = [QUALITY[cfg.task]] if cfg.task in QUALITY else []
        # The screen scores one metric on a slice: no latency, extra corpora or generations to prepare.
        self.screen_settings = bench.model_copy(update={"data": eval_spec.model_copy(update=cap), "latency": None,
                                                        "quality": quality, "extra_data": {}, "generations": None})

    # ------------------------------------------------------------------ screen
    def screen(self, target: str) -> dict:
        """Quality on the slice and size on disk of `target`: flat figures (cached by the target's key)."""
        from benchmarks import harness

        t = harness.resolve_target(target, self.task)
        s = self.screen_settings.resolved(t.task)
        key = hashlib.sha256(f"screen|{t.key}|{s.digest()}".encode()).hexdigest()[:24]
        store = self.work_dir / "screen" / f"{key}.json"
        if store.exists():
            return json.loads(store.read_text())
        quality = harness.score_in_process(t, s, self.work_dir / "bench") if s.quality else {}
        size = weights_size(t.path)
        return _store(store, figures_from(quality, size))

    # ------------------------------------------------------------------ full
    def backend_for(self, kind: str) -> str:
        """The first backend of `benchmark.backends` that runs a `kind` checkpoint as it is."""
        backends = list(self.bench.backends)
        runtime = "ort" if kind == "onnx" else "torch"
        return next((b for b in backends if b.startswith(runtime)), "ort-cpu" if kind == "onnx" else backends[0])

    def full(self, target: str, kind: str) -> dict:
        """The harness's record of `target` on its backend, as flat figures (plus `backend`), or
        {"error": ...}; stored by the target's key and the benchmark settings."""
        from benchmarks.pipeline import stored_result_path

        from . import measure as this  # `measure` looked up at call time (tests stand in for it)

        backend = self.backend_for(kind)
        store = stored_result_path(target, backend=backend, settings=self.bench, baseline=None, task=self.task,
                                   data=self.eval_spec, work_dir=self.work_dir / "bench")
        if store.exists():
            record = json.loads(store.read_text())
        else:
            bench = self.bench.model_copy(update={"quality": [q for q in self.bench.quality
                                                              if q != "teacher-agreement"]})
            record = this.harness_measure(target, backend=backend, settings=bench, task=self.task,
                                          data=self.eval_spec, work_dir=self.work_dir / "bench", label=backend)
            if "error" in record or "skipped" in record:
                return {"error": f"{backend}: {record.get('error') or record.get('skipped')}"}
            _store(store, record)
        out = figures_from(record.get("quality"), record.get("size_bytes"), record)
        out["backend"] = backend
        return out

    def conditions(self) -> dict | None:
        """Where and how the stored full measurements ran, from their records: the machine, threads, 1-minute
        load average, when, and the suite's commit (None before any)."""
        records = [json.loads(p.read_text()) for p in sorted((self.work_dir / "bench" / "results").glob("*.json"))]
        if not records:
            return None
        m = records[0].get("machine") or {}
        loads = [r["loadavg_before"][0] for r in records if r.get("loadavg_before")]
        times = sorted(r["measured_at"] for r in records if r.get("measured_at"))
        return {"machine": f"{m.get('cpu')} ({', '.join(m.get('cpu_flags') or [])})",
                "memory_bandwidth_gb_s": m.get("memory_bandwidth_gb_s"),
                "threads": sorted({r.get("threads") for r in records}, key=str), "measurements": len(records),
                "load_1min": [min(loads), max(loads)] if loads else None,
                "measured": [times[0], times[-1]] if times else None, "git_commit": m.get("git_commit")}


def harness_measure(target, **kwargs) -> dict:
    from benchmarks.harness import measure

    return measure(target, show_progress=False, **kwargs)

