"""Decoders at the hardware's speed: SmolLM2-135M on ONNX Runtime CPU, the suite's fused graph against
optimum's traced graph, optimum's own int8, llama.cpp and torch fp32, side by side.

    flock /tmp/compress-heavy.lock .venv/bin/python -m studies.fast_decoder [--threads 2] [--rounds 2]
        [--only LABEL ...] [--work /tmp/compress-fast-decoder] [--out benchmarks/results/fast_decoder]
    .venv/bin/python -m studies.fast_decoder --summary-only [--out DIR]   # summary.md again from DIR/rows

Every variant is built with the suite's passes from the fp32 source (by the pipeline runner, its steps kept in
--work: studies/recipes.py), except `optimum ORTQuantizer int8` (optimum's quantizer with its avx512_vnni dynamic
defaults on optimum's export) and the llama.cpp rows (the packaged Q4_1 GGUF the fp32 source comes from, and its
Q8_0 by llama.cpp's own quantizer), which are fed the same token ids.
Each is measured by `benchmarks.harness.measure` in its own process (perplexity on held-out Shakespeare, text
of another kind than the Wikipedia the tokenizer and calibration see; top-1 agreement and KL against torch
fp32; prefill and decode latency; peak memory; weight bytes per token for the roofline), then timed again
in further rounds with the rows taking turns. llama.cpp rows need llama-cpp-python (a benchmark-only extra
that compiles llama.cpp, 7 to 25 minutes on 2 cores: pip install -e '.[llama]'); without it they are
recorded as skipped.
Results: benchmarks/results/fast_decoder/ (results.json, report.md/.html, plots, summary.md)."""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

from benchmarks.config import BenchmarkConfig, LatencyConfig
from benchmarks.harness import backend_problem, measure, timing_rounds
from benchmarks.report import write_report
from benchmarks.roofline import percent_of_bound
from compress.data import DataSpec
from compress.runtime import set_threads
from studies import recipes
from studies.quantize_compare import optimum_quantize, slug

ROOT = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/compress-fast-decoder")  # the build cache (--work)
SOURCE = "builtin:smollm2-135m"
EVAL = DataSpec(source="builtin:shakespeare", split="test", max_tokens=8192, seq_len=256)
CALIBRATION = DataSpec(source="builtin:wikipedia", split="train", max_tokens=8192, seq_len=128)
CHECK = {"min_agreement": 0.0}  # record the check's figures, let weak variants through to the table

OPTIMUM = [("export", {"graph": "optimum"})]
FUSED = [("export", {"graph": "fused"})]
INT8 = ("quantize", {"method": "ort-int8-dynamic", **CHECK})


def int4(algorithm: str) -> tuple:
    return ("quantize", {"method": "ort-int8-dynamic", "weight_bits": 4, "algorithm": algorithm, **CHECK})


# label -> (backend, recipe): a list of (pass, options) from the source, "source", or "optimum-int8"
VARIANTS = {
    "torch fp32": ("torch-cpu", "source"),
    "optimum export fp32": ("ort-cpu", OPTIMUM),
    "optimum ORTQuantizer int8 (avx512_vnni)": ("ort-cpu", "optimum-int8"),
    "suite int8 on optimum's graph (before)": ("ort-cpu", OPTIMUM + [INT8]),
    "fused fp32": ("ort-cpu", FUSED),
    "fused int8 (MatMulNBits b32)": ("ort-cpu", FUSED + [INT8]),
    "fused int8 (MatMulNBits b64)": ("ort-cpu", FUSED + [("quantize", {**INT8[1], "block_size": 64})]),
    "fused int8 smoothed b32": ("ort-cpu", FUSED + [("quantize", {**INT8[1], "smooth_alpha": 0.7})]),
    "fused int8 smoothed b64": ("ort-cpu", FUSED + [("quantize", {**INT8[1], "smooth_alpha": 0.7,
                                                                  "block_size": 64})]),
    "fused int8 per-tensor smoothed, down_proj block-wise": ("ort-cpu", FUSED + [("quantize", {
        **INT8[1], "kernel": "matmulinteger", "smooth_alpha": 0.7, "blockwise": ["*down_proj*"]})]),
    "fused int4 rtn": ("ort-cpu", FUSED + [int4("rtn")]),
    "fused int4 hqq": ("ort-cpu", FUSED + [int4("hqq")]),
    "fused int4 minmax (Q4_1's grid)": ("ort-cpu", FUSED + [int4("minmax")]),
    "fused int4 minmax, offsets folded": ("ort-cpu", FUSED + [("quantize", {**int4("minmax")[1],
                                                                           "offset_roundings": 3})]),
    "fused int4 minmax, offsets folded in 2 roundings": ("ort-cpu", FUSED + [("quantize", {
        **int4("minmax")[1], "offset_roundings": 2})]),
    "fused int4 hqq b64": ("ort-cpu", FUSED + [("quantize", {**int4("hqq")[1], "block_size": 64})]),
    "fused int4 hqq b64, offsets folded in 2 roundings": ("ort-cpu", FUSED + [("quantize", {
        **int4("hqq")[1], "block_size": 64, "offset_roundings": 2})]),
    "fused int4 minmax b64, offsets folded in 2 roundings": ("ort-cpu", FUSED + [("quantize", {
        **int4("minmax")[1], "block_size": 64, "offset_roundings": 2})]),
    "fused int4 k_quant": ("ort-cpu", FUSED + [int4("k_quant")]),
    "fused int4 gptq": ("ort-cpu", FUSED + [int4("gptq")]),
    "llama.cpp Q8_0": ("llamacpp-cpu", "gguf-q8_0"),
    "llama.cpp Q4_1 (the packaged GGUF)": ("llamacpp-cpu", "gguf-packaged"),
}


def gguf(recipe: str, work: Path, log) -> str:
    """The packaged GGUF (Q4_1, the weights the fp32 source was dequantized from), or its Q8_0 written by
    llama.cpp's own quantizer (each tensor dequantized to fp32 and quantized again: the fp32 source's weights
    in Q8_0; the Q8_0 token table is copied as it is)."""
    from compress.models import smollm2_gguf

    if recipe == "gguf-packaged":
        return str(smollm2_gguf())
    dst = work / "smollm2-135m.Q8_0.gguf"
    if not dst.exists():
        import ctypes

        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, True
        tmp = dst.with_name(dst.name + ".tmp")
        work.mkdir(parents=True, exist_ok=True)
        if llama_cpp.llama_model_quantize(str(smollm2_gguf()).encode(), str(tmp).encode(), ctypes.byref(params)):
            raise RuntimeError("llama.cpp's quantizer failed to write Q8_0")
        tmp.replace(dst)
        log(f"  wrote {dst} ({dst.stat().st_size / 1e6:.1f} MB)")
    return str(dst)


def build(recipe, work: Path, log) -> str:
    """The checkpoint a recipe ends in: its passes run by the pipeline runner (studies/recipes.py), so a step
    is built once and again only when its pass, options or parent changed."""
    if recipe == "source":
        return SOURCE
    if isinstance(recipe, str) and recipe.startswith("gguf-"):
        return gguf(recipe, work, log)
    if recipe == "optimum-int8":
        export_dir = build(OPTIMUM, work, log)
        dst = recipes.derived(export_dir, "optimum-ortquantizer-int8", work)
        if not (dst / "model.onnx").exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            optimum_quantize(Path(export_dir), dst)
        return str(dst)
    data = {"train": CALIBRATION, "calibration": CALIBRATION, "eval": EVAL}
    return recipes.build(SOURCE, "causal-lm", recipe, data, work, log=log)


def row(label: str, work: Path = WORK, log=print) -> tuple[str, str]:
    """(checkpoint, backend) of the row named `label`, built or reused from the cache: how the other decoder
    studies (decode_ab, packed_mlp, ort_profile) take a row of this one."""
    backend, recipe = VARIANTS[label]
    return build(recipe, work, log), backend


def settings(threads: int, rounds: int) -> BenchmarkConfig:
    return BenchmarkConfig(backends=["torch-cpu", "ort-cpu", "llamacpp-cpu"], threads=threads, data=EVAL,
                           quality=["perplexity", "teacher-agreement"],
                           latency=LatencyConfig(warmup=2, repeats=5, rounds=rounds))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", default=None, help="labels to (re)measure; others are kept")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="timing rounds, the rows taking turns")
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fast_decoder")
    ap.add_argument("--summary-only", action="store_true", help="rewrite summary.md from the stored rows")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    rows_dir = args.out / "rows"
    if args.summary_only:
        if not rows_dir.is_dir():
            ap.error(f"--summary-only: no stored rows in {rows_dir}")
        (args.out / "summary.md").write_text(summary(_stored_rows(rows_dir)))
        return 0
    rows_dir.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    rows, jobs = [], []
    for label, (backend, recipe) in VARIANTS.items():
        if args.only and label not in args.only:
            continue
        log(f"{label}: building")
        job = None
        problem = backend_problem(backend)
        if problem:  # llama-cpp-python is a benchmark-only extra
            rows.append({"label": label, "variant": label, "task": "causal-lm", "backend": backend,
                         "skipped": problem})
            jobs.append(None)
            continue
        try:
            target = build(recipe, args.work, log)
        except Exception as exc:  # one failed variant must not lose the others
            rec = {"label": label, "task": "causal-lm", "backend": backend,
                   "error": f"build failed: {type(exc).__name__}: {exc}"}
        else:
            log(f"{label}: measuring {target} on {backend}")
            job = dict(target=target, backend=backend, baseline=SOURCE, task="causal-lm", label=label,
                       work_dir=args.work / "harness")
            rec = measure(**job, settings=settings(args.threads, args.rounds))
        rec["variant"] = label
        rows.append(rec)
        jobs.append(job)
    timing_rounds(rows, jobs, settings(args.threads, args.rounds), log)
    for rec in rows:
        (rows_dir / f"{slug(rec['variant'])}.json").write_text(json.dumps(rec, indent=1, default=str))
    records = _stored_rows(rows_dir)
    command = "flock /tmp/compress-heavy.lock .venv/bin/python -m studies.fast_decoder " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    report = write_report(records, args.out, "Fused decoder graph: SmolLM2-135M on ONNX Runtime CPU",
                          command=command.strip())
    (args.out / "summary.md").write_text(summary(records))
    log(f"report: {report}")
    return 0


def _stored_rows(rows_dir: Path) -> list[dict]:
    order = {label: i for i, label in enumerate(VARIANTS)}
    return sorted((json.loads(p.read_text()) for p in rows_dir.glob("*.json")),
                  key=lambda r: order.get(r["variant"], 99))


def _round_ratios(ours: dict, peer: dict, key: str) -> list[float]:
    """`peer`'s median time over `ours`' in each timing round (a row's runs are stored round after round), so
    a reader sees how far the ratio moved within the run; [] where the rows' rounds differ."""
    a, b = _q(ours, "latency", key, "runs_ms"), _q(peer, "latency", key, "runs_ms")
    rounds = _q(ours, "latency", "rounds") or 1
    if not a or not b or rounds != (_q(peer, "latency", "rounds") or 1) or len(a) % rounds or len(b) % rounds:
        return []
    na, nb = len(a) // rounds, len(b) // rounds
    return [statistics.median(b[i * nb:(i + 1) * nb]) / statistics.median(a[i * na:(i + 1) * na])
            for i in range(rounds)]


def _q(r, *keys):
    for k in keys:
        r = r.get(k) if isinstance(r, dict) else None
    return r


def summary(records: list[dict]) -> str:
    """Each row against torch fp32, and the issue's targets, computed from results.json."""
    by = {r["variant"]: r for r in records if not r.get("error") and not r.get("skipped")}
    base = by.get("torch fp32")
    lines = ["# Fused decoder: ratios to torch fp32 (computed from results.json)", ""]
    if not base:
        return "\n".join(lines + ["torch fp32 was not measured."]) + "\n"
    b_ppl, b_tps = _q(base, "quality", "perplexity"), _q(base, "latency", "decode_tokens_per_s")
    b_pre, b_size = _q(base, "latency", "prefill", "median_ms"), base["size_bytes"]
    lines += ["| variant | size | perplexity | agreement | prefill | decode | % of bandwidth bound |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, r in by.items():
        ppl, tps, pre = _q(r, "quality", "perplexity"), _q(r, "latency", "decode_tokens_per_s"), \
            _q(r, "latency", "prefill", "median_ms")
        bound = percent_of_bound(tps, r.get("weight_bytes_per_token"), _q(r, "machine", "memory_bandwidth_gb_s"))
        lines.append(f"| {label} | {b_size / r['size_bytes']:.2f}x smaller | {ppl / b_ppl:.3f}x | "
                     f"{_q(r, 'quality', 'top1_agreement') or 0:.3f} | {b_pre / pre:.2f}x faster | "
                     f"{tps / b_tps:.2f}x ({tps:.1f} tok/s) | {f'{bound:.0f}%' if bound else '-'} |")
    lines += ["", "Targets of the issue against torch fp32:", ""]
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    int8_rows = [r for k, r in by.items() if k.startswith("fused int8")]
    for r in int8_rows:
        dec = _q(r, "latency", "decode_tokens_per_s") / b_tps
        ppl = _q(r, "quality", "perplexity") / b_ppl
        pre = b_pre / _q(r, "latency", "prefill", "median_ms")
        bound = percent_of_bound(_q(r, "latency", "decode_tokens_per_s"), r.get("weight_bytes_per_token"),
                                 _q(r, "machine", "memory_bandwidth_gb_s")) or 0
        lines.append(f"- {r['variant']}: decode {dec:.2f}x (>= 3.3x: {met(dec >= 3.3)}), perplexity {ppl:.3f}x "
                     f"(<= 1.01: {met(ppl <= 1.01)}), prefill {pre:.2f}x (>= 2x: {met(pre >= 2)}), "
                     f"{bound:.0f}% of the bandwidth bound (>= 70%: {met(bound >= 70)})")
    int4_rows = [r for k, r in by.items() if k.startswith("fused int4")]
    for r in int4_rows:
        dec = _q(r, "latency", "decode_tokens_per_s") / b_tps
        size = b_size / r["size_bytes"]
        ppl = _q(r, "quality", "perplexity") / b_ppl
        pre = b_pre / _q(r, "latency", "prefill", "median_ms")
        lines.append(f"- {r['variant']}: decode {dec:.2f}x (>= 4.5x: {met(dec >= 4.5)}), "
                     f"{size:.2f}x smaller (>= 5x: {met(size >= 5)}), perplexity {ppl:.3f}x (<= 1.05: "
                     f"{met(ppl <= 1.05)}), prefill {pre:.2f}x (>= 2x: {met(pre >= 2)})")
    lines += ["", "Against llama.cpp at the same bit width (at least as fast at decoding and at prefill, at equal "
              "or better perplexity):", ""]
    pairs = [(r, by.get("llama.cpp Q8_0")) for r in int8_rows] + \
        [(r, by.get("llama.cpp Q4_1 (the packaged GGUF)")) for r in int4_rows]
    for ours, peer in pairs:
        if not peer:
            continue
        dec = _q(ours, "latency", "decode_tokens_per_s") / _q(peer, "latency", "decode_tokens_per_s")
        pre = _q(peer, "latency", "prefill", "median_ms") / _q(ours, "latency", "prefill", "median_ms")
        ppl = _q(ours, "quality", "perplexity") / _q(peer, "quality", "perplexity")
        spread = {k: _round_ratios(ours, peer, k) for k in ("decode", "prefill")}
        within = {k: f"; per round {min(v):.2f}-{max(v):.2f}" if len(v) > 1 else "" for k, v in spread.items()}
        lines.append(f"- {ours['variant']} vs {peer['variant']}: decode {dec:.2f}x ({met(dec >= 1)}"
                     f"{within['decode']}), prefill {pre:.2f}x ({met(pre >= 1)}{within['prefill']}), perplexity "
                     f"{ppl:.3f}x ({met(ppl <= 1)})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
