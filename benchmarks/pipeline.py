"""Benchmarks after `compress run`: the source model and every checkpoint of the run, on every backend.

Results are cached in runs/<name>/.bench/results/, keyed by the checkpoint's cache key, the backend, the
resolved benchmark settings, the baseline and the harness version: a rerun measures only what changed."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .harness import HARNESS_VERSION, _hash, measure, resolve_target, timing_rounds
from .report import write_report


def result_key(target_key: str, backend: str, settings_digest: str, baseline_key: str | None) -> str:
    return _hash("bench", target_key, backend, settings_digest, baseline_key, HARNESS_VERSION)


def stored_result_path(target: str, *, backend: str, settings, baseline: str | None, task: str, data,
                       work_dir: Path) -> Path:
    """Where the record of this measurement is stored: keyed by everything it depends on."""
    from compress.data import fingerprint

    t = resolve_target(target, task)
    base_key = resolve_target(baseline, task).key if baseline is not None else None
    resolved = settings.resolved(t.task, data)
    digest = resolved.digest() + fingerprint(resolved.data, "eval")
    digest += "".join(fingerprint(spec, "eval") for spec in resolved.extra_data.values())  # their contents too
    return work_dir / "results" / f"{result_key(t.key, backend, digest, base_key)}.json"


def _store(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, default=str))
    tmp.replace(path)


def _command(run_dir: Path) -> str:
    argv0 = Path(sys.argv[0]).name if sys.argv else ""
    if argv0 in ("compress", "__main__.py") and len(sys.argv) > 1 and sys.argv[1] == "run":  # or python -m compress
        return " ".join(["compress"] + sys.argv[1:])
    return f"compress run {run_dir / 'pipeline.yaml'}"


def benchmark_run(config, result, data, log=print, show_progress: bool = True, remeasure: bool = False) -> Path:
    """Measure the source (baseline) and each step of `result` on config.benchmark.backends; write the
    report into the run directory and return the path of report.md. Stored results of unchanged rows are
    reused unless `remeasure` (then every row is timed in this run, and the stored results replaced)."""
    settings = config.benchmark
    if settings.threads is None and config.threads:  # the pipeline's thread count, unless the section sets one
        settings = settings.model_copy(update={"threads": config.threads})
    run_dir = Path(result.run_dir)
    work_dir = run_dir / ".bench"
    eval_spec = data.specs.get("eval") if data is not None else None
    source = config.model.source
    targets = [("source", source)] + [(s.label, s.path) for s in result.steps]
    baseline = dict(targets)[settings.baseline]  # the config validator checked the names
    if settings.steps is not None:
        keep = {"source", settings.baseline, *settings.steps}
        targets = [(label, target) for label, target in targets if label in keep]
    rounds = settings.rounds
    records, jobs, stores = [], [], []
    for label, target in targets:
        for backend in settings.backends:
            store = stored_result_path(target, backend=backend, settings=settings, baseline=baseline,
                                       task=config.task, data=eval_spec, work_dir=work_dir)
            job = None
            if store.exists() and not remeasure:
                log(f"benchmark: {label} on {backend}: reusing the stored result (nothing changed)")
                record = json.loads(store.read_text())
            else:
                log(f"benchmark: {label} on {backend}: measuring")
                job = dict(target=target, backend=backend, baseline=baseline, task=config.task, label=label,
                           data=eval_spec, work_dir=work_dir, show_progress=show_progress)
                record = measure(**job, settings=settings)
                if "skipped" in record or "error" in record:
                    log(f"benchmark: {label} on {backend}: {'skipped' if 'skipped' in record else 'FAILED'} - "
                        f"{record.get('skipped') or record.get('error')}")
                elif rounds == 1:  # stored at once, so an interrupted run keeps what it measured
                    _store(store, record)
            record["label"], record["is_baseline"] = label, target == baseline
            records.append(record)
            jobs.append(job)
            stores.append(store)
    if rounds > 1:
        timing_rounds(records, jobs, settings, log)
        for record, job, store in zip(records, jobs, stores):
            if job is not None and "skipped" not in record and "error" not in record:  # skips and errors are retried
                _store(store, record)
    path = write_report(records, run_dir, f"{config.name}: what each pass bought and cost",
                        command=_command(run_dir))
    log(f"benchmark: report written to {path} (and report.html, results.json)")
    return path
