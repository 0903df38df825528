"""SmolLM2-135M at equal parameter count: hidden-width pruning vs MLP pruning vs depth pruning, each with a
short KD recovery. Which wins at equal size, and at equal speed?

    flock /tmp/compress-heavy.lock python -m studies.width_vs_depth [--hidden 448] [--recover-steps 200]
    python -m studies.width_vs_depth --model /path/to/tiny-llama --quick          # logic check on a tiny model

Variants, all made by the prune pass with activation importance:
- `hidden`: the residual stream 576 -> --hidden channels (Minitron-style: embeddings, norms, every projection,
  the tied head);
- `mlp`: MLP channels, the ratio chosen so the model has the hidden variant's parameter count;
- `depth`: whole blocks, as many as bring the model closest to that parameter count.
Each is measured before and after `recover:` (a KD distillation from the unpruned model, --recover-steps
steps on Wikipedia train windows): held-out Wikipedia perplexity (test split) and agreement on torch, and
prefill / decode speed on ONNX Runtime CPU (the harness exports on the fly). Writes report.md and
results.json to --out (default benchmarks/results/width_vs_depth)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.config import BenchmarkConfig, LatencyConfig
from benchmarks.harness import measure
from compress import checkpoint
from compress.checkpoint import Artifact
from compress.data import DataSpec, PipelineData
from compress.models import count_parameters, load_model
from compress.passes import PassContext, get
from compress.runtime import set_threads

SOURCE = "builtin:smollm2-135m"


def params_after(base: Artifact, ctx: PassContext, opts: dict) -> int:
    """Parameters of the model `prune` with `opts` makes (magnitude importance: no calibration needed)."""
    out = get("prune")(**{**opts, "importance": "magnitude"}).run(base, ctx)
    return count_parameters(out.model)


def matching_options(base: Artifact, ctx: PassContext, target: int, hidden: int) -> dict[str, dict]:
    """Prune options per variant, the MLP ratio and the number of dropped blocks matched to `target` params."""
    from compress.architecture import find

    arch = find(base.model)
    width, n_layers = arch.mlp_width(0), arch.num_layers()
    lo, hi = 0.0, 0.95  # MLP: bisect the ratio on the parameter count (round_to 8 makes it a step function)
    for _ in range(12):
        mid = (lo + hi) / 2
        if params_after(base, ctx, dict(targets=["mlp"], ratio=mid, round_to=8)) > target:
            lo = mid
        else:
            hi = mid
    mlp_ratio = round(hi, 4)
    full = count_parameters(base.model)
    per_block = sum(p.numel() for p in arch.layers()[0].parameters())
    drop = max(1, min(n_layers - 1, round((full - target) / per_block)))
    return {
        "hidden": dict(targets=["hidden"], hidden_size=hidden, importance="activation"),
        "mlp": dict(targets=["mlp"], ratio=mlp_ratio, round_to=8, importance="activation"),
        "depth": dict(targets=["layers"], layer_ratio=drop / n_layers),
    }, {"mlp_ratio": mlp_ratio, "mlp_width": round(width * (1 - mlp_ratio)), "dropped_blocks": drop}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=SOURCE)
    ap.add_argument("--hidden", type=int, default=448, help="hidden size of the width-pruned model")
    ap.add_argument("--recover-steps", type=int, default=200)
    ap.add_argument("--out", default="benchmarks/results/width_vs_depth")
    ap.add_argument("--work", default="/tmp/width_vs_depth")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny settings (logic check), no ORT")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    eval_tokens = 1024 if args.quick else args.eval_tokens
    eval_spec = DataSpec(source="builtin:wikipedia", split="test", max_tokens=eval_tokens, seq_len=256)
    train_spec = DataSpec(source="builtin:wikipedia", split="train", max_tokens=400_000, seq_len=256)
    ctx = PassContext(source=args.model, data=PipelineData(train=train_spec, eval=eval_spec),
                      scratch=work / "scratch", show_progress=False, threads=args.threads)
    ctx.scratch.mkdir(exist_ok=True)
    model, tok = load_model(args.model, "causal-lm")
    base = Artifact(kind="torch", task="causal-lm", tokenizer=tok, model=model)

    hidden_probe = get("prune")(targets=["hidden"], hidden_size=args.hidden, importance="magnitude").run(base, ctx)
    target = count_parameters(hidden_probe.model)
    del hidden_probe
    options, matched = matching_options(base, ctx, target, args.hidden)
    steps = 2 if args.quick else args.recover_steps
    recover = dict(max_steps=steps, batch_size=8, seq_len=256, lr=3e-4, alpha=1.0, temperature=1.0,
                   eval_tokens=1024, log_every=max(1, steps // 10))
    settings = BenchmarkConfig(
        backends=["torch-cpu"], quality=["perplexity", "teacher-agreement"], threads=args.threads, data=eval_spec,
        latency=LatencyConfig(prompt_tokens=128, new_tokens=32, warmup=1, repeats=args.repeats))
    backends = ["torch-cpu"] if args.quick else ["torch-cpu", "ort-cpu"]

    rows = []
    targets = [("source", args.model, None)]
    for name, opts in options.items():
        for rec_label, extra in (("pruned", {}), ("recovered", {"recover": recover})):
            label = f"{name}-{rec_label}"
            path = work / label
            t = time.time()
            if not (path / "manifest.json").exists():
                art = get("prune")(**opts, **extra).run(base, ctx)
                checkpoint.save(art, path, source=args.model)
                del art
            targets.append((label, str(path), round(time.time() - t, 1)))
    for label, target_path, seconds in targets:
        for backend in backends:
            rec = measure(target_path, backend=backend, settings=settings, baseline=args.model, task="causal-lm",
                          work_dir=str(work / "harness"), show_progress=False)
            q, lat = rec.get("quality", {}), rec.get("latency", {})
            rows.append({"label": label, "backend": backend, "params": rec.get("params"),
                         "perplexity": q.get("perplexity"), "agreement": q.get("top1_agreement"),
                         "prefill_ms": (lat.get("prefill") or {}).get("median_ms"),
                         "decode_tok_s": lat.get("decode_tokens_per_s"), "make_seconds": seconds,
                         "error": rec.get("error") or rec.get("skipped")})
            print(json.dumps(rows[-1]), flush=True)

    result = {"model": args.model, "hidden": args.hidden, "target_params": target, "matched": matched,
              "options": options, "recover": recover, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    lines = [f"# {args.model}: hidden width vs MLP vs depth at {target / 1e6:.1f} M parameters", "",
             f"`python -m studies.width_vs_depth --hidden {args.hidden} --recover-steps {steps} --threads {args.threads}`; "
             f"matched: "
             f"{json.dumps(matched)}; recovery: {json.dumps(recover)}", "",
             "| variant | backend | params | perplexity | agreement | prefill ms | decode tok/s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    for r in rows:
        lines.append(f"| {r['label']} | {r['backend']} | {fmt(r['params'] and r['params'] / 1e6, '.1f')} M | "
                     f"{fmt(r['perplexity'], '.2f')} | {fmt(r['agreement'], '.3f')} | {fmt(r['prefill_ms'], '.0f')} | "
                     f"{fmt(r['decode_tok_s'], '.1f')} |" + (f" {r['error']}" if r["error"] else ""))
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
