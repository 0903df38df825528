"""Export and quantization of SmolLM2-135M, MiniLM-L6 and the BBC News classifier fine-tuned from it (the
teacher of configs/minilm-bbc.yaml, read from runs/minilm-bbc/01-distill), measured side by side.

    flock /tmp/compress-heavy.lock .venv/bin/python -m studies.quantize_compare
        [--models smollm2 minilm minilm-bbc] [--only LABEL ...] [--threads 2] [--rounds 3] [--work /tmp/compress-quantize-bench]
        [--out benchmarks/results/quantize] [--title TITLE]

Every variant is built with the suite's own passes (export, quantize) from the fp32 source, except the
`optimum ORTQuantizer` row: optimum's own quantizer with its `AutoQuantizationConfig.avx512_vnni` dynamic
defaults on the same fp32 export, for the side-by-side comparison the issue asks for. Each variant is then
measured by `benchmarks.harness.measure` in its own process (quality against the torch fp32 source, latency,
peak memory, size), then timed again in further rounds, the rows of a model taking turns (`latency.rounds`),
so the machine's drift slows every row alike. Results: benchmarks/results/quantize/ (results.json,
report.md/.html, plots, summary.md).
Built checkpoints are kept in --work (studies/recipes.py); measurements are redone on every run (one JSON per
row, so --only re-measures some rows and keeps the others)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from benchmarks.config import BenchmarkConfig, LatencyConfig
from benchmarks.harness import measure, timing_rounds
from benchmarks.report import write_report
from compress.data import DataSpec
from compress.runtime import set_threads
from studies import recipes

ROOT = Path(__file__).resolve().parents[1]

OUT = ROOT / "benchmarks" / "results" / "quantize"
MODELS = {
    "smollm2": {"source": "builtin:smollm2-135m", "task": "causal-lm",
                "eval": DataSpec(source="builtin:wikipedia", max_tokens=4096, seq_len=256),
                "calibration": DataSpec(source="builtin:wikipedia", split="train", max_tokens=4096)},
    "minilm": {"source": "builtin:minilm-l6", "task": "feature-extraction",
               "eval": DataSpec(source="builtin:bbc-news", max_examples=64, max_length=128),
               "calibration": DataSpec(source="builtin:bbc-news", split="train", max_examples=64)},
    # the BBC News classifier: the fine-tuned teacher of `compress run configs/minilm-bbc.yaml` (run it first)
    "minilm-bbc": {"source": str(ROOT / "runs" / "minilm-bbc" / "01-distill"), "task": "sequence-classification",
                   "eval": DataSpec(source="builtin:bbc-news", split="test", max_length=128),
                   "calibration": DataSpec(source="builtin:bbc-news", split="train", max_examples=64)},
}
NO_CHECK = {"min_agreement": 0.0}  # record the check's figures but let weak variants through for the table

# label -> (backend, how to build it). Builders: "source", ("quantize-torch", options), "export",
# ("quantize-onnx", options), "optimum".
VARIANTS = {
    "torch fp32": ("torch-cpu", "source"),
    "torch bf16": ("torch-cpu", ("quantize-torch", {"method": "bf16"})),
    "ORT fp32": ("ort-cpu", "export"),
    "ORT int8 dynamic (suite default)": ("ort-cpu", ("quantize-onnx", {"method": "ort-int8-dynamic"})),
    "ORT int8 MatMulNBits b32, embeddings float": ("ort-cpu", ("quantize-onnx", {
        "method": "ort-int8-dynamic", "kernel": "matmulnbits", "quantize_embeddings": False})),
    "ORT int8 MatMulNBits b32 + int8 embeddings": ("ort-cpu", ("quantize-onnx", {
        "method": "ort-int8-dynamic", "kernel": "matmulnbits"})),
    "ORT int8 MatMulNBits b128 + int8 embeddings": ("ort-cpu", ("quantize-onnx", {
        "method": "ort-int8-dynamic", "kernel": "matmulnbits", "block_size": 128})),
    "ORT int4 MatMulNBits b32 + int8 embeddings": ("ort-cpu", ("quantize-onnx", {
        "method": "ort-int8-dynamic", "kernel": "matmulnbits", "weight_bits": 4})),
    "ORT int8 MatMulInteger per-tensor": ("ort-cpu", ("quantize-onnx", {
        "method": "ort-int8-dynamic", "kernel": "matmulinteger", "per_channel": False})),
    "ORT int8 MatMulInteger per-channel": ("ort-cpu", ("quantize-onnx", {
        "method": "ort-int8-dynamic", "kernel": "matmulinteger", "per_channel": True})),
    "ORT int8 MatMulInteger per-channel, smoothed (alpha 0.7)": ("ort-cpu", ("quantize-onnx", {
        "method": "ort-int8-dynamic", "kernel": "matmulinteger", "per_channel": True, "smooth_alpha": 0.7})),
    "ORT int8 MatMulInteger per-channel, down_proj / FFN-out float": ("ort-cpu", ("quantize-onnx", {
        "method": "ort-int8-dynamic", "kernel": "matmulinteger", "per_channel": True,
        "exclude": ["*down_proj*", "*layer.*/output/dense*"]})),
    "ORT int8 MatMulInteger per-channel, smoothed (alpha 0.7), down_proj / FFN-out float": ("ort-cpu", (
        "quantize-onnx", {"method": "ort-int8-dynamic", "kernel": "matmulinteger", "per_channel": True,
                          "smooth_alpha": 0.7, "exclude": ["*down_proj*", "*layer.*/output/dense*"]})),
    "ORT int8 MatMulInteger per-channel, smoothed (alpha 0.7), down_proj / FFN-out block-wise": ("ort-cpu", (
        "quantize-onnx", {"method": "ort-int8-dynamic", "kernel": "matmulinteger", "per_channel": True,
                          "smooth_alpha": 0.7, "blockwise": ["*down_proj*", "*layer.*/output/dense*"]})),
    # static: the default (smoothing 0.5, uint8 activations, MLP output projections and LM head float), then
    # one change each
    "ORT int8 static (QDQ)": ("ort-cpu", ("quantize-onnx", {"method": "ort-int8-static"})),
    "ORT int8 static (QDQ), every projection int8": ("ort-cpu", ("quantize-onnx", {
        "method": "ort-int8-static", "exclude": ["*lm_head*"]})),
    "ORT int8 static (QDQ), smoothing alpha 0.8": ("ort-cpu", ("quantize-onnx", {
        "method": "ort-int8-static", "smooth_alpha": 0.8})),
    "ORT int8 static (QDQ), no smoothing": ("ort-cpu", ("quantize-onnx", {
        "method": "ort-int8-static", "smooth_alpha": None})),
    "ORT int8 static (QDQ), int8 activations": ("ort-cpu", ("quantize-onnx", {
        "method": "ort-int8-static", "activations": "int8"})),
    "ORT fp16": ("ort-cpu", ("quantize-onnx", {"method": "ort-fp16"})),
    "optimum ORTQuantizer (avx512_vnni dynamic)": ("ort-cpu", "optimum"),
    "bnb int8": ("torch-cpu", ("quantize-torch", {"method": "bnb-int8"})),
    "bnb nf4": ("torch-cpu", ("quantize-torch", {"method": "bnb-nf4"})),
}

# Rows that would repeat another row for that model (SmolLM2's default is MatMulNBits b32 + int8 embeddings)
# or that an earlier exploration already settled (per-channel alone: perplexity 40.4 vs 26.4), to save time;
# --only measures what it names.
SKIP = {("smollm2", "ORT int8 MatMulNBits b32 + int8 embeddings"), ("smollm2", "ORT int8 MatMulInteger per-channel")}


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")


def build(model_name: str, label: str, how, work: Path, log) -> str:
    """The checkpoint (or source) a variant is measured from: the suite's passes run by the pipeline runner
    (studies/recipes.py), optimum's quantizer on the fp32 export."""
    spec = MODELS[model_name]
    if how == "source":
        return spec["source"]
    if how == "export":
        recipe = [("export", {})]
    elif how == "optimum":  # optimum's quantizer on optimum's graph as its exporter writes it (no contrib ops)
        recipe = [("export", {"graph": "optimum", "optimize": False})]
    elif how[0] == "quantize-torch":
        recipe = [("quantize", how[1])]
    else:
        recipe = [("export", {}), ("quantize", {**NO_CHECK, **how[1]})]
    data = {"train": spec["calibration"], "calibration": spec["calibration"], "eval": spec["eval"]}
    built = recipes.build(spec["source"], spec["task"], recipe, data, work / model_name, log=log)
    if how != "optimum":
        return built
    dst = recipes.derived(built, slug(label), work / model_name)
    if not (dst / "model.onnx").exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        optimum_quantize(Path(built), dst)
    return str(dst)


def optimum_quantize(export_dir: Path, dst: Path) -> None:
    """optimum's ORTQuantizer with AutoQuantizationConfig.avx512_vnni defaults (dynamic, per-tensor)."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    quantizer = ORTQuantizer.from_pretrained(export_dir, file_name="model.onnx")
    quantizer.quantize(save_dir=tmp, quantization_config=AutoQuantizationConfig.avx512_vnni(is_static=False))
    (tmp / "model_quantized.onnx").rename(tmp / "model.onnx")
    for f in export_dir.iterdir():  # tokenizer, config, runner; not the fp32 graph
        if f.is_file() and not f.name.startswith("model.onnx") and not (tmp / f.name).exists() \
                and f.name != "manifest.json":
            shutil.copy2(f, tmp / f.name)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def settings(model_name: str, threads: int, rounds: int) -> BenchmarkConfig:
    spec = MODELS[model_name]
    return BenchmarkConfig(backends=["torch-cpu", "ort-cpu"], threads=threads, data=spec["eval"],
                           quality=["perplexity", "accuracy", "teacher-agreement"],
                           latency=LatencyConfig(warmup=1, repeats=3, throughput_batch=8, rounds=rounds))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--only", nargs="+", default=None, help="labels to (re)measure; others are kept")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds, the rows of a model taking turns")
    ap.add_argument("--work", type=Path, default=Path("/tmp/compress-quantize-bench"))
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from the saved rows")
    ap.add_argument("--out", type=Path, default=OUT, help="where rows/ and the report go")
    ap.add_argument("--title", default="Export and quantization: SmolLM2-135M, MiniLM-L6 and its BBC News classifier")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    out = args.out
    rows_dir = out / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    for model_name in ([] if args.report_only else args.models):
        spec = MODELS[model_name]
        if spec["source"].startswith("/") and not (Path(spec["source"]) / "manifest.json").exists():
            log(f"[{model_name}] skipped: {spec['source']} does not exist; run `compress run configs/minilm-bbc.yaml`")
            continue
        rows, jobs = [], []
        for label, (backend, how) in VARIANTS.items():
            wanted = label in args.only if args.only else (model_name, label) not in SKIP
            if not wanted:
                continue
            log(f"[{model_name}] {label}: building")
            job = None
            try:
                target = build(model_name, label, how, args.work, log)
            except Exception as exc:  # one failed variant must not lose the others
                rec = {"label": f"{model_name}: {label}", "task": spec["task"], "backend": backend,
                       "error": f"build failed: {type(exc).__name__}: {exc}"}
            else:
                log(f"[{model_name}] {label}: measuring {target} on {backend}")
                job = dict(target=target, backend=backend, baseline=spec["source"], task=spec["task"],
                           label=f"{model_name}: {label}", work_dir=args.work / "harness")
                rec = measure(**job, settings=settings(model_name, args.threads, args.rounds))
                manifest = Path(target) / "manifest.json"
                if manifest.exists():
                    info = json.loads(manifest.read_text()).get("info") or {}
                    rec["pass_check"] = info.get("discrepancy")
            rec["variant"], rec["model"] = label, model_name
            rows.append(rec)
            jobs.append(job)
            log(f"  -> {json.dumps(_brief(rec))}")
        timing_rounds(rows, jobs, settings(model_name, args.threads, args.rounds), log)
        for rec in rows:
            (rows_dir / f"{model_name}--{slug(rec['variant'])}.json").write_text(json.dumps(rec, indent=1, default=str))
    records = [json.loads(p.read_text()) for p in sorted(rows_dir.glob("*.json"))]
    order = {label: i for i, label in enumerate(VARIANTS)}
    records.sort(key=lambda r: (list(MODELS).index(r["model"]), order.get(r["variant"], 99)))
    command = "flock /tmp/compress-heavy.lock .venv/bin/python " + " ".join(
        ["-m studies.quantize_compare", *(f"'{a}'" if " " in a else a for a in (argv or sys.argv[1:]))])
    if args.report_only and (out / "results.json").exists():  # the rows were measured by the earlier command
        command = json.loads((out / "results.json").read_text()).get("command") or command
    report = write_report(records, out, args.title, command=command)
    (out / "summary.md").write_text(summary(records))
    log(f"report: {report}")
    return 0


def _q(r, *keys):
    v = r
    for k in keys:
        v = (v or {}).get(k) if isinstance(v, dict) else None
    return v


def summary(records: list[dict]) -> str:
    """The issue's targets and the optimum side-by-side, computed from the measured rows."""
    by = {(r["model"], r["variant"]): r for r in records if not r.get("error") and not r.get("skipped")}
    lines = ["# Targets and the optimum comparison (computed from results.json)", ""]
    fp32, d, opt = (by.get(("smollm2", k)) for k in ("torch fp32", "ORT int8 dynamic (suite default)",
                                                      "optimum ORTQuantizer (avx512_vnni dynamic)"))
    if fp32 and d:
        size = fp32["size_bytes"] / d["size_bytes"]
        tps = _q(d, "latency", "decode_tokens_per_s") / _q(fp32, "latency", "decode_tokens_per_s")
        ppl = _q(d, "quality", "perplexity") / _q(fp32, "quality", "perplexity") - 1
        lines += ["SmolLM2-135M, ORT int8 dynamic (suite default) against torch fp32:", "",
                  f"- size on disk {size:.2f}x smaller (target >= 3.5x): {'met' if size >= 3.5 else 'NOT met'}",
                  f"- decode tokens/s {tps:.2f}x (target >= 2x): {'met' if tps >= 2 else 'NOT met'}",
                  f"- perplexity {ppl * 100:+.2f}% (target within 3%): {'met' if abs(ppl) <= 0.03 else 'NOT met'}",
                  f"- top-1 agreement with fp32 {_q(d, 'quality', 'top1_agreement'):.4f}", ""]
    for model, quality in (("smollm2", ("perplexity", "top1_agreement")), ("minilm", ("cosine", "nn_agreement")),
                           ("minilm-bbc", ("accuracy", "label_agreement"))):
        d = by.get((model, "ORT int8 dynamic (suite default)"))
        o = by.get((model, "optimum ORTQuantizer (avx512_vnni dynamic)"))
        if not (d and o):
            continue
        speed = ("latency", "decode_tokens_per_s") if model == "smollm2" else ("latency", "batch1", "median_ms")
        lines.append(f"{model}: suite default vs optimum ORTQuantizer defaults (same fp32 export):")
        lines.append("")
        for key in quality:
            lines.append(f"- {key}: suite {_q(d, 'quality', key):.4f}, optimum {_q(o, 'quality', key):.4f}")
        lines.append(f"- {'/'.join(speed[1:])}: suite {_q(d, *speed):.2f}, optimum {_q(o, *speed):.2f}")
        lines.append(f"- size: suite {d['size_bytes'] / 1e6:.1f} MB, optimum {o['size_bytes'] / 1e6:.1f} MB")
        lines.append("")
    return "\n".join(lines) + "\n"


def _brief(rec: dict) -> dict:
    q, lat = rec.get("quality") or {}, rec.get("latency") or {}
    return {"size_mb": round(rec.get("size_bytes", 0) / 1e6, 1), **{k: q.get(k) for k in (
        "perplexity", "top1_agreement", "cosine", "nn_agreement", "accuracy")},
        "decode_tok_s": lat.get("decode_tokens_per_s"), "error": rec.get("error"), "skipped": rec.get("skipped"),
        "loadavg": os.getloadavg()}


if __name__ == "__main__":
    sys.exit(main())
