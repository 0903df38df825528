"""What `compress run` prints: the suite's messages (also kept in runs/<name>/run.log) and, at the end, one
compact table of every step against the source, the best deployment row marked, and where the report is.

With a benchmark section the table is read from the run's results.json: each row is a measured checkpoint on
one backend, with its size, quality and speed as ratios to the source on the first backend measured (the
"against the baseline" table of the report). Without one, it lists each checkpoint's size on disk against the
source model's weights.

The best deployment row: among the rows (not the source itself) whose quality stays within 5% of the source
(perplexity at most 1.05x; accuracy or cosine at least 0.95x), the fastest (decode tokens/s for decoders,
batch-1 latency for encoders), ties going to the smaller; without speed figures, the smallest. None is marked
when no row keeps quality within 5%."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

QUALITY_TOLERANCE = 0.05
BEST_RULE = "the fastest row whose quality is within 5% of the source's"


def log(message: str) -> None:
    """The runner's log: printed, and recorded in the run's log file (compress.logs)."""
    from compress.logs import suite_log

    print(message, flush=True)
    suite_log(message)


# quality (name, getter, higher is better) and speed (name, getter, higher is faster) per task
def _q(key):
    return lambda r: (r.get("quality") or {}).get(key)


def _decode(r):
    return (r.get("latency") or {}).get("decode_tokens_per_s")


def _batch1(r):
    return ((r.get("latency") or {}).get("batch1") or {}).get("median_ms")


HEADLINE = {
    "causal-lm": (("perplexity", _q("perplexity"), False), ("decode", _decode, True)),
    "sequence-classification": (("accuracy", _q("accuracy"), True), ("batch-1", _batch1, False)),
    "feature-extraction": (("cosine", _q("cosine"), True), ("batch-1", _batch1, False)),
}


@dataclass
class Row:
    label: str
    backend: str | None
    size_mb: float | None
    smaller: float | None  # source size / this size
    quality_name: str | None = None
    quality: float | None = None
    quality_ratio: float | None = None  # this quality / the source's
    faster: float | None = None  # speed ratio to the source (higher is faster)
    is_source: bool = False
    of_baseline: bool = False  # the baseline model on any backend: never the best deployment
    best: bool = False


def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def rows_from_results(records: list[dict]) -> list[Row]:
    """One row per measured record, ratios against the first baseline record (the source on the first
    backend); the best deployment row marked."""
    measured = [r for r in records if "skipped" not in r and "error" not in r]
    ref = next((r for r in measured if r.get("is_baseline")), None)
    rows: list[Row] = []
    for r in measured:
        task_ref = ref if ref is not None and ref.get("task") == r.get("task") else None
        (qname, qget, _), (_, sget, higher) = HEADLINE.get(r.get("task"), HEADLINE["causal-lm"])
        size, ref_size = _num(r.get("size_bytes")), _num((task_ref or {}).get("size_bytes"))
        q, ref_q = _num(qget(r)), _num(qget(task_ref)) if task_ref else None
        s, ref_s = _num(sget(r)), _num(sget(task_ref)) if task_ref else None
        faster = None
        if s and ref_s:
            faster = s / ref_s if higher else ref_s / s
        rows.append(Row(r.get("label", "?"), r.get("backend"), size / 1e6 if size else None,
                        ref_size / size if size and ref_size else None, qname, q,
                        q / ref_q if q is not None and ref_q else None, faster, is_source=r is ref,
                        of_baseline=bool(r.get("is_baseline"))))
    _mark_best(rows, records)
    return rows


def _within_tolerance(row: Row, higher_is_better: bool) -> bool:
    if row.quality_ratio is None:
        return False
    if higher_is_better:
        return row.quality_ratio >= 1 - QUALITY_TOLERANCE
    return row.quality_ratio <= 1 + QUALITY_TOLERANCE


def _mark_best(rows: list[Row], records: list[dict]) -> None:
    task = next((r.get("task") for r in records if r.get("task")), "causal-lm")
    higher = HEADLINE.get(task, HEADLINE["causal-lm"])[0][2]
    ok = [r for r in rows if not r.of_baseline and _within_tolerance(r, higher)]  # the reference is one too
    if not ok:
        return
    if any(r.faster for r in ok):
        best = max((r for r in ok if r.faster), key=lambda r: (r.faster, r.smaller or 0))
    else:
        best = max(ok, key=lambda r: r.smaller or 0)
    best.best = True


def _dir_size(path: Path, patterns=("*.safetensors", "*.bin", "*.onnx", "*.onnx.data", "*.pt")) -> int | None:
    files = {f for pat in patterns for f in Path(path).glob(pat) if f.is_file()}
    return sum(f.stat().st_size for f in files) or None


def _checkpoint_size(path: Path) -> int | None:
    try:
        files = json.loads((Path(path) / "manifest.json").read_text())["files"]
        return sum(meta["size"] for name, meta in files.items()
                   if name.endswith((".safetensors", ".onnx", ".onnx.data", ".data"))) or None
    except (OSError, ValueError, KeyError, TypeError):
        return _dir_size(path)


def _source_size(source: str) -> int | None:
    try:
        from compress.models import resolve_source

        kind, location = resolve_source(source)
    except Exception:
        return None
    if kind == "hf":
        return None
    return _checkpoint_size(Path(location)) if kind == "checkpoint" else _dir_size(Path(location))


def rows_from_sizes(result) -> list[Row]:
    """Without benchmarks: each checkpoint's weights on disk against the source model's."""
    src = _source_size(result.source)
    rows = [Row("source", None, src / 1e6 if src else None, 1.0 if src else None, is_source=True)]
    for s in result.steps:
        size = _checkpoint_size(Path(s.path))
        rows.append(Row(s.label, None, size / 1e6 if size else None, src / size if src and size else None))
    return rows


def _x(v, digits=2) -> str:
    return "-" if v is None else f"{v:.{digits}f}x"


def summary_table(rows: list[Row]):
    from rich.table import Table

    with_quality = any(r.quality is not None or r.faster is not None for r in rows)
    table = Table(box=None, pad_edge=False, header_style="bold")  # its title is printed above it
    table.add_column("step")
    if any(r.backend for r in rows):
        table.add_column("backend")
    table.add_column("size MB", justify="right")
    table.add_column("smaller", justify="right")
    if with_quality:
        qname = next((r.quality_name for r in rows if r.quality_name), "quality")
        table.add_column(qname, justify="right")
        table.add_column(f"{qname} ratio", justify="right")
        table.add_column("faster", justify="right")
    table.add_column("")
    for r in rows:
        cells = [r.label]
        if any(x.backend for x in rows):
            cells.append(r.backend or "-")
        cells += ["-" if r.size_mb is None else f"{r.size_mb:,.1f}", _x(r.smaller)]
        if with_quality:
            cells += ["-" if r.quality is None else f"{r.quality:.4g}", _x(r.quality_ratio, 3), _x(r.faster)]
        cells.append("<- best" if r.best else "")
        table.add_row(*cells, style="bold green" if r.best else None)
    return table


def print_summary(result, config, *, file=None) -> list[Row]:
    """Print the end-of-run table and where the report and log are; return its rows."""
    from rich.console import Console

    out = file or sys.stdout
    console = Console(file=out, width=None if out.isatty() else 120, highlight=False)
    run_dir = Path(result.run_dir)
    results = run_dir / "results.json"
    if config.benchmark is not None and results.is_file():
        records = json.loads(results.read_text()).get("records") or []
        rows = rows_from_results(records)
        ref = next((r for r in rows if r.is_source), None)
        title = (f"{config.name}: every step against the source"
                 + (f" on {ref.backend}" if ref and ref.backend else ""))
    else:
        rows = rows_from_sizes(result)
        title = f"{config.name}: checkpoint sizes against the source (no benchmark section: sizes only)"
    console.print()
    console.print(title)  # its own line: as the table's title it wraps to the table's width
    console.print(summary_table(rows))
    best = next((r for r in rows if r.best), None)
    if config.benchmark is not None:
        if best:
            console.print(f"best deployment: {best.label} on {best.backend} (rule: {BEST_RULE})")
        elif any(r.quality_ratio is not None for r in rows if not r.is_source):
            console.print(f"best deployment: none marked; no step keeps quality within "
                          f"{QUALITY_TOLERANCE:.0%} of the source")
    if result.report:
        console.print(f"report: {result.report} (and {Path(result.report).with_suffix('.html').name} beside it)")
    log_file = run_dir / "run.log"
    if log_file.exists():
        console.print(f"log: {log_file} (other libraries' warnings; --verbose shows them here)")
    return rows
