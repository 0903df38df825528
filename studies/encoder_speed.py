"""MiniLM-L6 (all-MiniLM-L6-v2, the packaged encoder) on ONNX Runtime CPU: batch-1 latency and embedding
quality of torch fp32, optimum's export and quantizer, and the suite's fused export and int8 variants.

    flock /tmp/compress-heavy.lock .venv/bin/python -m studies.encoder_speed
        [--only LABEL ...] [--threads 2] [--rounds 3] [--seq-tokens 128] [--work /tmp/compress-encoder-speed]
        [--out benchmarks/results/encoder_speed] [--report-only] [--interleaved]

The issue's target (#13): int8 at least 3.5x lower batch-1 latency than torch fp32 (2 threads) at embedding
cosine >= 0.999 to torch fp32.

Rows: torch fp32 (the reference of every ratio and cosine); optimum's exporter as is (the suite's export
with `optimize: false` writes optimum's graph unchanged); optimum's ORTQuantizer int8 with its
`avx512_vnni` dynamic defaults on that graph (studies.quantize_compare.optimum_quantize); the suite's export
with ONNX Runtime's BERT fusions (the default, `optimize: auto`); and the suite's int8 variants
(`quantize: {method: ort-int8-dynamic, kernel: ...}`) on the fused graph, plus today's per-tensor default on
the plain graph. Every row is measured by `benchmarks.harness.measure` in its own process with the threads
set explicitly (quality on 64 BBC News articles up to 128 tokens: mean-pooled embeddings against torch fp32,
mean and worst cosine; batch-1 latency at --seq-tokens tokens), then timed again in further rounds, the rows
taking turns, so the machine's drift slows every row alike. Results: results.json, report.md / .html,
summary.md (targets) under --out, with the machine record. Built checkpoints are kept in --work (studies/recipes.py)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.config import BenchmarkConfig, LatencyConfig
from benchmarks.harness import measure, timing_rounds
from benchmarks.report import write_report
from compress.data import DataSpec
from compress.runtime import set_threads
from studies import recipes

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "encoder_speed"
SOURCE, TASK = "builtin:minilm-l6", "feature-extraction"
EVAL = DataSpec(source="builtin:bbc-news", max_examples=64, max_length=128)
CALIBRATION = DataSpec(source="builtin:bbc-news", split="train", max_examples=64)
NO_CHECK = {"min_agreement": 0.0}  # record the pass's check figures but let weak variants through
FFN_OUT = ["*layer.?/output/dense*", "*layer.??/output/dense*"]
TARGET_SPEEDUP, TARGET_COSINE = 3.5, 0.999

# label -> (backend, parent export ("plain" | "fused"), what to build: "source" | "export" | "optimum" | options)
VARIANTS = {
    "torch fp32": ("torch-cpu", None, "source"),
    "optimum export fp32": ("ort-cpu", "plain", "export"),
    "optimum ORTQuantizer int8 (avx512_vnni dynamic)": ("ort-cpu", "plain", "optimum"),
    "suite fused fp32 (export default)": ("ort-cpu", "fused", "export"),
    "suite int8 per-tensor MatMulInteger, plain graph (old default)": (
        "ort-cpu", "plain", {"method": "ort-int8-dynamic", "kernel": "matmulinteger"}),
    "suite int8 per-tensor MatMulInteger + QAttention, fused": (
        "ort-cpu", "fused", {"method": "ort-int8-dynamic", "kernel": "matmulinteger"}),
    "suite int8 per-tensor MatMulInteger + QAttention, smoothed (alpha 0.7), fused": (
        "ort-cpu", "fused", {"method": "ort-int8-dynamic", "kernel": "matmulinteger", "smooth_alpha": 0.7}),
    "suite int8 MatMulNBits b32, fused": ("ort-cpu", "fused", {"method": "ort-int8-dynamic", "kernel": "matmulnbits"}),
    "suite int8 per-row (rowwise), fused": ("ort-cpu", "fused", {"method": "ort-int8-dynamic", "kernel": "rowwise"}),
    "suite int8 per-row (rowwise), FFN output float, fused": (
        "ort-cpu", "fused", {"method": "ort-int8-dynamic", "kernel": "rowwise", "exclude": FFN_OUT}),
}


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")


def build(label: str, work: Path, log) -> str:
    """The checkpoint of a row: the suite's passes run by the pipeline runner (studies/recipes.py), optimum's
    quantizer on the plain export."""
    _, parent, how = VARIANTS[label]
    if how == "source":
        return SOURCE
    export = [("export", {"optimize": False} if parent == "plain" else {})]  # plain: optimum's graph unchanged
    recipe = export if how in ("export", "optimum") else export + [("quantize", {**NO_CHECK, **how})]
    src = recipes.build(SOURCE, TASK, recipe, {"train": CALIBRATION, "calibration": CALIBRATION, "eval": EVAL},
                        work, log=log)
    if how != "optimum":
        return src
    dst = recipes.derived(src, slug(label), work)
    if not (dst / "model.onnx").exists():
        from studies.quantize_compare import optimum_quantize

        dst.parent.mkdir(parents=True, exist_ok=True)
        optimum_quantize(Path(src), dst)
    return str(dst)


def settings(threads: int, rounds: int, seq_tokens: int) -> BenchmarkConfig:
    return BenchmarkConfig(backends=["torch-cpu", "ort-cpu"], threads=threads, data=EVAL,
                           quality=["teacher-agreement"],
                           latency=LatencyConfig(seq_tokens=seq_tokens, warmup=3, repeats=20, throughput_batch=8,
                                                 rounds=rounds))


def _q(r, *keys):
    v = r
    for k in keys:
        v = v.get(k) if isinstance(v, dict) else None
    return v


def summary(records: list[dict], command: str) -> str:
    """The side-by-side table and the target check, computed from the measured rows."""
    ok = [r for r in records if not r.get("error") and not r.get("skipped")]
    ref = next((r for r in ok if r["variant"] == "torch fp32"), None)
    base = _q(ref, "latency", "batch1", "median_ms")
    lines = ["# MiniLM-L6 batch-1 latency and embedding quality (computed from results.json)", "",
             f"Command: `{command}`", ""]
    if ref:
        m = ref.get("machine") or {}
        lines += [f"Machine: {m.get('cpu_model') or m.get('cpu') or '?'}, threads {ref.get('threads')}, "
                  f"load average before/after the torch row {ref.get('loadavg_before')} / {ref.get('loadavg_after')}. "
                  "Timings taken while other work ran on the machine are noisy; compare rows of one run only.", ""]
        busy = [r["variant"] for r in ok if max((r.get("loadavg_before") or [0])[0],
                                                 (r.get("loadavg_after") or [0])[0]) > (r.get("threads") or 1)]
        if busy:
            lines += [f"**Warning: the 1-minute load average exceeded the thread count around {len(busy)} of "
                      f"{len(ok)} rows ({', '.join(busy[:3])}{', ...' if len(busy) > 3 else ''}): other processes "
                      "shared the cores, torch's thread pool is slowed far more than ONNX Runtime's by that, and "
                      "the ratios below are not trustworthy. Re-run on an idle machine.**", ""]
    lines += ["| variant | size MB | batch-1 median ms | p90 ms | speed-up vs torch fp32 | cosine mean | "
              "cosine worst | "
              "int8 target met |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        if r.get("error") or r.get("skipped"):
            lines.append(f"| {r['variant']} | | | | | | | {(r.get('error') or r.get('skipped'))[:80]} |")
            continue
        ms, p90 = _q(r, "latency", "batch1", "median_ms"), _q(r, "latency", "batch1", "p90_ms")
        cos, worst = _q(r, "quality", "cosine"), _q(r, "quality", "cosine_min")
        speed = base / ms if base and ms else None
        meets = ("int8" in r["variant"] and speed is not None and cos is not None and speed >= TARGET_SPEEDUP
                 and cos >= TARGET_COSINE)
        lines.append(f"| {r['variant']} | {r.get('size_bytes', 0) / 1e6:.1f} | {ms:.2f} | {p90 or 0:.2f} | "
                     f"{speed or 0:.2f}x | {cos if cos is not None else float('nan'):.5f} | "
                     f"{worst if worst is not None else float('nan'):.5f} | "
                     f"{('yes' if meets else 'no') if 'int8' in r['variant'] else ''} |")
    lines += ["", f"Target (issue #13): int8 >= {TARGET_SPEEDUP}x lower batch-1 latency than torch fp32 at embedding "
              f"cosine >= {TARGET_COSINE} (mean over the eval articles)."]
    return "\n".join(lines) + "\n"


def interleaved(work: Path, threads: int, seq_tokens: int, rounds: int = 6, log=print) -> str:
    """A cross-check of the harness on a busy machine: every variant timed in ONE process, the variants taking
    turns (rounds x 8 runs each, batch 1), so a load that comes and goes slows them alike; min and median.
    Returns the markdown table (also written to --out/interleaved.md)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from compress.models import load_model

    torch.set_num_threads(threads)
    model, tok = load_model(SOURCE, TASK)
    model.eval()
    ids = tok(tok.decode(list(range(1000, 1000 + 4 * seq_tokens))),
              truncation=True, max_length=seq_tokens, return_tensors="np")["input_ids"].astype(np.int64)
    runs = {}
    for label, (backend, _, _) in VARIANTS.items():
        if backend == "torch-cpu":
            t_ids, t_mask = torch.from_numpy(ids), torch.ones(ids.shape, dtype=torch.long)

            def run_torch():
                with torch.no_grad():
                    model(input_ids=t_ids, attention_mask=t_mask)
            runs[label] = run_torch
            continue
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(str(Path(build(label, work, log)) / "model.onnx"), so,
                                    providers=["CPUExecutionProvider"])
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "token_type_ids" in {i.name for i in sess.get_inputs()}:
            feed["token_type_ids"] = np.zeros_like(ids)
        runs[label] = lambda sess=sess, feed=feed: sess.run(None, feed)
    times = {k: [] for k in runs}
    for _ in range(rounds):
        for label, fn in runs.items():
            fn(), fn()
            for _ in range(8):
                start = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - start)
    ref = times["torch fp32"]
    lines = [f"Interleaved in one process: {threads} threads, batch 1, {ids.shape[1]} tokens, "
             f"{rounds} rounds x 8 runs, "
             f"load average {os.getloadavg()[0]:.2f} at the end", "",
             "| variant | min ms | median ms | x torch (min) | x torch (median) |", "| --- | --- | --- | --- | --- |"]
    for label, ts in times.items():
        lines.append(f"| {label} | {min(ts) * 1e3:.2f} | {np.median(ts) * 1e3:.2f} | {min(ref) / min(ts):.2f} | "
                     f"{np.median(ref) / np.median(ts):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", default=None, choices=list(VARIANTS), metavar="LABEL",
                    help="labels to (re)measure; the other rows are kept from the last run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds, the rows taking turns")
    ap.add_argument("--seq-tokens", type=int, default=128, help="tokens of the batch-1 latency input")
    ap.add_argument("--work", type=Path, default=Path("/tmp/compress-encoder-speed"))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--report-only", action="store_true", help="rebuild report and summary from the saved rows")
    ap.add_argument("--interleaved", action="store_true", help="only the one-process interleaved timing "
                    "cross-check (for a busy machine), written to --out/interleaved.md")
    args = ap.parse_args(argv)
    if args.interleaved:
        set_threads(args.threads)
        args.out.mkdir(parents=True, exist_ok=True)
        table = interleaved(args.work, args.threads, args.seq_tokens, log=print)
        (args.out / "interleaved.md").write_text(table)
        print(table)
        return 0
    set_threads(args.threads)
    rows_dir = args.out / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    cfg = settings(args.threads, args.rounds, args.seq_tokens)
    rows, jobs = [], []
    for label, (backend, _, _) in ({} if args.report_only else VARIANTS).items():
        if args.only and label not in args.only:
            continue
        log(f"{label}: building")
        job = None
        try:
            target = build(label, args.work, log)
        except Exception as exc:  # one failed variant must not lose the others
            rec = {"label": label, "task": TASK, "backend": backend,
                   "error": f"build failed: {type(exc).__name__}: {exc}"}
        else:
            log(f"{label}: measuring {target} on {backend}")
            job = dict(target=target, backend=backend, baseline=SOURCE, task=TASK, label=label,
                       work_dir=args.work / "harness")
            rec = measure(**job, settings=cfg)
            manifest = Path(target) / "manifest.json"
            if manifest.exists():
                info = json.loads(manifest.read_text()).get("info") or {}
                rec["pass_check"] = info.get("discrepancy")
                rec["optimization"] = info.get("optimization")
        rec["variant"] = label
        rows.append(rec)
        jobs.append(job)
        log(f"  -> batch-1 {_q(rec, 'latency', 'batch1', 'median_ms')} ms, cosine {_q(rec, 'quality', 'cosine')}, "
            f"error {rec.get('error')}, loadavg {os.getloadavg()}")
    timing_rounds(rows, jobs, cfg, log)
    for rec in rows:
        (rows_dir / f"{slug(rec['variant'])}.json").write_text(json.dumps(rec, indent=1, default=str))
    records = [json.loads(p.read_text()) for p in sorted(rows_dir.glob("*.json"))]
    order = {label: i for i, label in enumerate(VARIANTS)}
    records = sorted((r for r in records if r["variant"] in order), key=lambda r: order[r["variant"]])
    command = "flock /tmp/compress-heavy.lock .venv/bin/python -m studies.encoder_speed " + " ".join(
        f"'{a}'" if " " in a else a for a in (argv if argv is not None else sys.argv[1:]))
    if args.report_only and (args.out / "results.json").exists():  # the rows were measured by the earlier command
        command = json.loads((args.out / "results.json").read_text()).get("command") or command
    write_report(records, args.out, "MiniLM-L6 on ONNX Runtime CPU: fused export and int8 kernels",
                 command=command.strip())
    (args.out / "summary.md").write_text(summary(records, command.strip()))
    log(f"summary: {args.out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
