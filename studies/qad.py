"""Quantization-aware distillation (QAD) against post-training int4: SmolLM2-135M (or a given student
checkpoint) quantized to int4 MatMulNBits by round-to-nearest and HQQ as it is, after plain KD, and after QAD
(KD with the weights fake-quantized on the int4 export grid), all from the same starting weights.

    flock /tmp/compress-heavy.lock .venv/bin/python -m studies.qad [--model builtin:smollm2-135m | CKPT]
        [--teacher builtin:smollm2-135m] [--steps 200] [--lr 5e-5] [--threads 2]
    .venv/bin/python -m studies.qad --model /tmp/tiny-llama --teacher /tmp/tiny-llama --quick   # logic check

Variants (each exported as the fused graph, then `quantize: {method: ort-int8-dynamic, weight_bits: 4}`):
- `fp32`: the starting weights exported, not quantized (the reference row);
- `ptq-rtn`, `ptq-hqq`: the starting weights, int4 by round-to-nearest / HQQ;
- `kd-rtn`: --steps steps of KD from the teacher (the model trained in place), then int4 RTN;
- `qad-rtn`: --steps steps of QAD (`distill: {quantize_aware: {bits: 4, block_size: 32}}`, same data, same
  steps, same teacher cache), then int4 RTN, which reproduces its weights without another rounding.
KD and QAD train on Wikipedia train windows against the teacher's cached top-64 logits (one teacher run for
both). Each ONNX checkpoint is measured by `benchmarks.harness.measure` on ort-cpu: perplexity on held-out
Wikipedia (test split) and top-1 agreement / KL against the teacher. Writes report.md and results.json to
--out (default benchmarks/results/qad); checkpoints are kept in --work, so a rerun resumes."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.config import BenchmarkConfig
from benchmarks.harness import measure
from compress import checkpoint
from compress.checkpoint import Artifact, load_source
from compress.data import DataSpec, PipelineData
from compress.passes import PassContext, get
from compress.runtime import set_threads

SOURCE = "builtin:smollm2-135m"
GRID = {"bits": 4, "block_size": 32, "symmetric": True}


def int4(algorithm: str) -> dict:
    # min_agreement 0: record the check's figures, let a weak variant through to the table
    return {"method": "ort-int8-dynamic", "weight_bits": GRID["bits"], "block_size": GRID["block_size"],
            "algorithm": algorithm, "min_agreement": 0.0}


def build(label: str, start: Artifact, ctx: PassContext, distill: dict | None, quantize: dict | None,
          path: Path) -> dict:
    """distill (optional) -> export -> quantize (optional), saved at `path`; returns the figures to report."""
    t = time.time()
    art, figures = start, {}
    if distill is not None:
        art = get("distill")(**distill).run(art, ctx)
        figures["distill"] = {k: art.info.get(k) for k in ("steps", "tokens", "seconds", "best_metric",
                                                            "teacher_cache", "quantize_aware")}
        figures["distill"]["last_loss"] = (art.info.get("loss_curve") or [{}])[-1]
    if quantize is not None and distill and distill.get("quantize_aware"):
        from compress.quant import fake

        figures["grid_mismatch"] = fake.grid_mismatch(  # None: QAD trained for this quantize pass's grid
            art, bits=quantize["weight_bits"], block_size=quantize["block_size"],
            symmetric=quantize["algorithm"] == "rtn", algorithm=quantize["algorithm"])
    art = get("export")().run(art, ctx)
    if quantize is not None:
        art = get("quantize")(**quantize).run(art, ctx)
        figures["quantize_check"] = {k: art.info["discrepancy"].get(k) for k in ("top1_agreement", "max_abs_error")}
    checkpoint.save(art, path, source=ctx.source)
    figures["make_seconds"] = round(time.time() - t, 1)
    (path.parent / f"{label}.figures.json").write_text(json.dumps(figures, indent=1, default=str))
    return figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=SOURCE, help="the starting weights (a model source or a checkpoint)")
    ap.add_argument("--teacher", default=SOURCE, help="the teacher of KD and QAD (default SmolLM2-135M)")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps of KD and of QAD")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results/qad")
    ap.add_argument("--work", default="/tmp/qad-study")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--quick", action="store_true", help="tiny settings (logic check)")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("COMPRESS_CACHE_DIR", str(work / "cache"))  # the teacher cache KD and QAD share
    steps = 2 if args.quick else args.steps
    eval_tokens = 1024 if args.quick else args.eval_tokens
    eval_spec = DataSpec(source="builtin:wikipedia", split="test", max_tokens=eval_tokens, seq_len=args.seq_len)
    train_tokens = steps * args.batch_size * args.seq_len  # one epoch of fresh windows for the step budget
    train_spec = DataSpec(source="builtin:wikipedia", split="train", max_tokens=train_tokens, seq_len=args.seq_len)
    ctx = PassContext(source=args.teacher, task="causal-lm", data=PipelineData(train=train_spec, eval=eval_spec),
                      scratch=work / "scratch", show_progress=False, threads=args.threads)
    ctx.scratch.mkdir(exist_ok=True)
    start = load_source(args.model, "causal-lm")  # a model source, or a checkpoint (its structure re-applied)
    kd = dict(alpha=1.0, temperature=1.0, max_steps=steps, lr=args.lr, batch_size=args.batch_size,
              seq_len=args.seq_len, teacher_cache=True, eval_tokens=1024, warmup_ratio=0.05,
              log_every=max(1, steps // 10), seed=0)
    variants = {  # label -> (distill options or None, quantize options or None)
        "fp32": (None, None),
        "ptq-rtn": (None, int4("rtn")),
        "ptq-hqq": (None, int4("hqq")),
        "kd-rtn": (kd, int4("rtn")),
        "qad-rtn": ({**kd, "quantize_aware": GRID}, int4("rtn")),
    }
    settings = BenchmarkConfig(backends=["ort-cpu"], quality=["perplexity", "teacher-agreement"],
                               threads=args.threads, data=eval_spec, latency=None)
    rows = []
    for label, (distill, quantize) in variants.items():
        path = work / label
        figures_file = work / f"{label}.figures.json"
        if (path / "manifest.json").exists() and figures_file.exists():
            figures = json.loads(figures_file.read_text())
        else:
            figures = build(label, start, ctx, distill, quantize, path)
            if distill is not None:  # KD / QAD trained `start` in place: the next variant starts afresh
                start = load_source(args.model, "causal-lm")
        rec = measure(str(path), backend="ort-cpu", settings=settings, baseline=args.teacher, task="causal-lm",
                      work_dir=str(work / "harness"), show_progress=False)
        q = rec.get("quality", {})
        rows.append({"label": label, "perplexity": q.get("perplexity"), "agreement": q.get("top1_agreement"),
                     "kl": q.get("kl"), "size_bytes": rec.get("size_bytes"), "figures": figures,
                     "error": rec.get("error") or rec.get("skipped")})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "figures"}), flush=True)

    result = {"model": args.model, "teacher": args.teacher, "steps": steps, "grid": GRID, "distill": kd,
              "eval": eval_spec.model_dump(), "quick": args.quick, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "report.md").write_text(report(args, steps, rows))
    print(f"wrote {out / 'report.md'}")
    return 0


def report(args, steps: int, rows: list[dict]) -> str:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    ref = next((r["perplexity"] for r in rows if r["label"] == "fp32"), None)
    lines = [f"# {args.model}: quantization-aware distillation vs post-training int4", "",
             f"`python -m studies.qad --model {args.model} --teacher {args.teacher} --steps {steps} --lr {args.lr}"
             f"{' --quick' if args.quick else ''}`", "",
             f"int4 = MatMulNBits, {GRID['bits']}-bit blocks of {GRID['block_size']} along the input dimension "
             "(RTN symmetric; HQQ asymmetric), int8 embedding table / tied head, accuracy_level 4. KD and QAD: "
             f"{steps} steps from the same starting weights on the teacher's cached top-64 logits. ONNX Runtime "
             "CPU, held-out Wikipedia (test split).", "",
             "| variant | perplexity | x fp32 | top-1 agreement | KL vs teacher | size (MB) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = r["perplexity"] / ref if r["perplexity"] and ref else None
        lines.append(f"| {r['label']} | {fmt(r['perplexity'], '.2f')} | {fmt(ratio, '.3f')} | "
                     f"{fmt(r['agreement'], '.3f')} | {fmt(r['kl'], '.3g')} | "
                     f"{fmt(r['size_bytes'] and r['size_bytes'] / 1e6, '.1f')} |"
                     + (f" {r['error']}" if r["error"] else ""))
    qad = next((r["figures"].get("distill", {}).get("quantize_aware") for r in rows if r["label"] == "qad-rtn"), None)
    if qad:
        lines += ["", f"QAD grid and projection: `{json.dumps(qad)}`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
