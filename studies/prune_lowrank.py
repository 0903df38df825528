"""Structured pruning and low-rank factorization of SmolLM2-135M: quality against size and speed.

    flock /tmp/compress-heavy.lock python -m studies.prune_lowrank               # full run (~20-30 min)
    python -m studies.prune_lowrank --model /path/to/tiny-llama --quick          # logic check on a tiny model

Every variant is made by the real passes (compress.passes prune / lowrank), saved as a checkpoint under
--work, and measured by benchmarks.harness.measure in its own process: held-out Wikipedia perplexity
(test split), top-1 agreement and KL against the dense model, torch-CPU prefill / decode latency, and
ORT-CPU latency for the dense model and the best 50%-MLP model. A micro-benchmark times single factorized
layers against dense ones at SmolLM2's shapes to show where low rank stops paying. Writes report.md,
results.json and perplexity_vs_params.png to --out; what the committed run found is in
benchmarks/results/prune_lowrank/README.md."""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from benchmarks.config import BenchmarkConfig, LatencyConfig
from benchmarks.harness import measure, resolve_target
from compress import checkpoint
from compress.checkpoint import Artifact
from compress.data import DataSpec, PipelineData
from compress.models import count_parameters, load_model
from compress.passes import PassContext, get
from compress.pruning import importance
from compress.architecture import find
from compress.runtime import set_threads

SOURCE = "builtin:smollm2-135m"
CRITERIA = ("magnitude", "taylor", "activation")


def variants(best: str | None, recover_steps: int, emb_rank: int = 256) -> list[tuple[str, str, dict, str]]:
    """(label, pass, options, group). `best` (the criterion with the lowest 50% perplexity) gets recovery."""
    out = []
    for ratio in (0.25, 0.5):
        for crit in CRITERIA:
            out.append((f"mlp{int(ratio * 100)}-{crit}", "prune",
                        dict(targets=["mlp"], ratio=ratio, importance=crit), f"MLP {crit}"))
    if best is not None:
        out.append((f"mlp50-{best}+recover", "prune", dict(
            targets=["mlp"], ratio=0.5, importance=best,
            recover=dict(max_steps=recover_steps, batch_size=4, seq_len=128, lr=2e-4, alpha=0.5,
                         eval_tokens=2048, log_every=10)), "MLP + recovery"))
    out += [
        ("heads-gqa-groups", "prune", dict(targets=["heads"], ratio=1 / 3, gqa="groups", importance="activation"),
         "heads"),
        ("heads-gqa-query", "prune", dict(targets=["heads"], ratio=1 / 3, gqa="query", importance="activation"),
         "heads"),
        ("depth25", "prune", dict(targets=["layers"], layer_ratio=0.25), "depth"),
    ]
    for method in ("svd", "asvd", "whiten"):
        out.append((f"lowrank-mlp50-{method}", "lowrank",
                    dict(method=method, param_ratio=0.5, targets=["*.mlp.*"]), f"low-rank {method}"))
    for method in ("svd", "whiten"):  # a milder budget, past the default speed limit (max_param_ratio 0.6)
        out.append((f"lowrank-mlp75-{method}", "lowrank", dict(method=method, param_ratio=0.75, targets=["*.mlp.*"],
                                                                max_param_ratio=0.8), f"low-rank {method}"))
    for rank in (emb_rank, emb_rank * 7 // 4):  # 256 and 448 for SmolLM2 (hidden 576)
        out.append((f"lowrank-embedding{rank}", "lowrank", dict(targets=["none"], embedding_rank=rank),
                    "low-rank embedding"))
    return out


def make_variant(base: Artifact, ctx: PassContext, label: str, pass_name: str, opts: dict, work: Path) -> Path:
    path = work / label
    tag = json.dumps([pass_name, opts], sort_keys=True)
    if (path / "manifest.json").exists() and checkpoint.read_manifest(path).get("bench_variant") == tag:
        return path  # made by an earlier run with the same options
    start = time.perf_counter()
    out = get(pass_name)(**opts).run(base, ctx)
    out.info["seconds"] = round(time.perf_counter() - start, 1)
    checkpoint.save(out, path, bench_variant=tag, source=SOURCE,
                    **{"pass": {"name": pass_name, "config": get(pass_name)(**opts).config.model_dump(mode="json")}})
    del out
    gc.collect()
    return path


def layer_timing(threads: int, repeats: int = 40) -> list[dict]:
    """Median time of a dense Linear vs its rank-r factorization at SmolLM2 shapes, prefill and decode."""
    from compress.pruning.lowrank import LowRankLinear

    torch.set_num_threads(threads)
    rows = []

    def median_ms(f, x):
        for _ in range(5):
            f(x)
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            f(x)
            ts.append(time.perf_counter() - t)
        return sorted(ts)[len(ts) // 2] * 1e3

    with torch.no_grad():
        for name, (i, o) in {"q/o_proj": (576, 576), "k/v_proj": (576, 192), "gate/up_proj": (576, 1536),
                             "down_proj": (1536, 576)}.items():
            dense = torch.nn.Linear(i, o)
            for tokens in (128, 1):
                x = torch.randn(1, tokens, i)
                d = median_ms(dense, x)
                for frac in (0.25, 0.5, 0.6, 0.75, 0.9):
                    r = int(frac * i * o / (i + o))
                    lr = LowRankLinear(i, o, r)
                    rows.append({"layer": name, "in": i, "out": o, "tokens": tokens, "params_ratio": frac,
                                 "rank": r, "dense_ms": round(d, 4), "lowrank_ms": round(median_ms(lr, x), 4)})
    return rows


def mlp_scores(base: Artifact, ctx: PassContext, criterion: str, layers: list[int]) -> dict:
    """Per MLP channel of each block in `layers`: the prune pass's `criterion` score, with the pass's default
    calibration (its Config's samples, sequence length and batch size) and norm."""
    c = get("prune")(targets=["mlp"], importance=criterion).config
    batches = None
    if criterion != "magnitude":
        batches = importance.calibration_batches(
            ctx, base.tokenizer, base.task, samples=c.calibration_samples, seq_len=c.calibration_seq_len,
            batch_size=c.batch_size, why=f"importance: {criterion}", model=base.model,
            field="prune.calibration_seq_len")
    return importance.mlp_channel_scores(base.model, find(base.model), layers, criterion, batches=batches,
                                         task=base.task, norm=c.norm, device=ctx.device)


def criteria_overlap(base: Artifact, ctx: PassContext, ratio: float = 0.5) -> dict:
    """How much the channels each criterion keeps at `ratio` overlap (Jaccard, mean over layers)."""
    ad = find(base.model)
    kept = {}
    for crit in CRITERIA:
        scores = mlp_scores(base, ctx, crit, list(range(ad.num_layers())))
        k = int(ad.mlp_width(0) * (1 - ratio))
        kept[crit] = [set(torch.argsort(scores[i], descending=True)[:k].tolist()) for i in scores]
    out = {}
    for a in CRITERIA:
        for b in CRITERIA:
            if a < b:
                j = [len(x & y) / len(x | y) for x, y in zip(kept[a], kept[b])]
                out[f"{a} vs {b}"] = {"mean": round(sum(j) / len(j), 3), "per_layer": [round(v, 2) for v in j]}
    return out


def why_magnitude(base: Artifact, ctx: PassContext, eval_ids: torch.Tensor, ratio: float = 0.25) -> dict:
    """Which high-contribution channels magnitude pruning removes, and what removing only those costs.

    Per layer: the channels whose mean output contribution (the activation score) is among the top 1% but
    which a magnitude ranking at `ratio` would prune. Then the dense model's perplexity with only those
    channels zeroed (their down_proj columns): if that alone explodes, magnitude fails because it cannot see
    the few channels that carry very large activations."""
    import copy
    import math

    net = base.model
    ad = find(net)
    layers = list(range(ad.num_layers()))
    scores = {crit: mlp_scores(base, ctx, crit, layers) for crit in ("magnitude", "activation")}
    width = ad.mlp_width(0)
    n_prune, n_top = int(width * ratio), max(1, width // 100)
    lost = {}
    for i in layers:
        pruned = set(torch.argsort(scores["magnitude"][i])[:n_prune].tolist())
        top = torch.argsort(scores["activation"][i], descending=True)[:n_top].tolist()
        hit = [j for j in top if j in pruned]
        if hit:
            lost[i] = hit
    zeroed = copy.deepcopy(net)
    with torch.no_grad():
        for i, chans in lost.items():
            zeroed.get_submodule(ad.mlp_out(i)).weight[:, chans] = 0

    def ppl(m):
        nll, n = 0.0, 0
        with torch.no_grad():
            for b in eval_ids.split(4):
                k = b.numel() - b.shape[0]
                nll += m(input_ids=b, labels=b).loss.item() * k
                n += k
        return math.exp(nll / n)

    return {"ratio": ratio, "top_channels_per_layer": n_top, "removed_top_channels": {str(k): v for k, v in lost.items()},
            "n_removed_top": sum(len(v) for v in lost.values()), "dense_ppl": round(ppl(net), 3),
            "ppl_with_only_those_zeroed": round(ppl(zeroed), 3)}


# ---------------------------------------------------------------------- report
def _g(r, *path):
    for p in path:
        if not isinstance(r, dict) or r.get(p) is None:
            return None
        r = r[p]
    return r


def write_outputs(out: Path, rows: list[dict], ort: list[dict], timing: list[dict], meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "variants": rows, "ort": ort,
                                                                  "layer_timing": timing}, indent=1, default=str) + "\n")
    dense = next(r for r in rows if r["label"] == "dense")

    def ratio(v, b):
        return f"{v / b:.2f}x" if v is not None and b else "-"

    lines = [f"# Structured pruning and low-rank factorization of SmolLM2-135M", "",
             f"Command: `{meta['command']}`  ", f"Measured {meta['date']} on {meta['machine']}, torch threads "
             f"{meta['threads']}; eval: {meta['eval']}; calibration: {meta['calibration']}.  ",
             "Every figure is from `benchmarks.harness.measure` (each model in its own process). Latency: batch 1, "
             f"{meta['latency']}; median of {meta['repeats']} runs. The machine was shared: load averages are "
             "listed per row, and 2-thread timings here moved by up to 20% between identical runs.", "",
             "| variant | params (M) | params vs dense | perplexity | top-1 agr. | KL | prefill ms (torch) | "
             "decode tok/s (torch) | pass details | load avg |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        m = r["measure"]
        lines.append("| {} | {:.1f} | {} | {} | {} | {} | {} ({}) | {} ({}) | {} | {} |".format(
            r["label"], r["params"] / 1e6, ratio(r["params"], dense["params"]),
            f"{_g(m, 'quality', 'perplexity'):.2f}" if _g(m, "quality", "perplexity") else "-",
            f"{_g(m, 'quality', 'top1_agreement'):.3f}" if _g(m, "quality", "top1_agreement") is not None else "-",
            f"{_g(m, 'quality', 'kl'):.3f}" if _g(m, "quality", "kl") is not None else "-",
            f"{_g(m, 'latency', 'prefill', 'median_ms'):.0f}" if _g(m, "latency", "prefill", "median_ms") else "-",
            ratio(_g(m, "latency", "prefill", "median_ms"), _g(dense["measure"], "latency", "prefill", "median_ms")),
            f"{_g(m, 'latency', 'decode_tokens_per_s'):.1f}" if _g(m, "latency", "decode_tokens_per_s") else "-",
            ratio(_g(m, "latency", "decode_tokens_per_s"), _g(dense["measure"], "latency", "decode_tokens_per_s")),
            r.get("details", ""), " / ".join(f"{x:.1f}" for x in (m.get("loadavg_before") or [])[:1])))
    if ort:
        base = next((o for o in ort if o["label"] == "dense"), None)
        lines += ["", "## ONNX Runtime CPU (exported by the export pass, with KV cache)", "",
                  "| variant | prefill ms | vs dense | decode tok/s | vs dense | perplexity |", "| --- | --- | --- | --- | --- | --- |"]
        for o in ort:
            m = o["measure"]
            p, d = _g(m, "latency", "prefill", "median_ms"), _g(m, "latency", "decode_tokens_per_s")
            lines.append(f"| {o['label']} | {p if p is None else round(p, 1)} | "
                         f"{ratio(p, _g(base['measure'], 'latency', 'prefill', 'median_ms')) if base else '-'} | "
                         f"{d if d is None else round(d, 1)} | "
                         f"{ratio(d, _g(base['measure'], 'latency', 'decode_tokens_per_s')) if base else '-'} | "
                         f"{_g(m, 'quality', 'perplexity') and round(_g(m, 'quality', 'perplexity'), 2)} |"
                         + (f" skipped/error: {m.get('skipped') or m.get('error')}" if m.get("skipped") or m.get("error") else ""))
    if timing:
        lines += ["", "## Where factorized layers are slower than dense ones", "",
                  f"One layer, torch CPU, {meta['threads']} threads, median of 40; ratio = factorized time / dense "
                  "time (below 1 = faster). `params_ratio` = r (in + out) / (in out).", "",
                  "| layer (in x out) | tokens | " + " | ".join(f"p={p}" for p in (0.25, 0.5, 0.6, 0.75, 0.9)) + " |",
                  "| --- | --- |" + " --- |" * 5]
        keys = sorted({(t["layer"], t["in"], t["out"], t["tokens"]) for t in timing}, key=lambda k: (k[0], -k[3]))
        for k in keys:
            cells = [t for t in timing if (t["layer"], t["in"], t["out"], t["tokens"]) == k]
            lines.append(f"| {k[0]} ({k[1]}x{k[2]}) | {k[3]} | " + " | ".join(
                f"{c['lowrank_ms'] / c['dense_ms']:.2f}" for c in cells) + " |")
    overlap = meta.get("criteria_overlap_at_50")
    if overlap and "error" not in overlap:
        lines += ["", "## Do the criteria keep the same MLP channels? (50%, Jaccard overlap of kept sets)", "",
                  "| pair | mean over layers | first 5 layers | last 5 layers |", "| --- | --- | --- | --- |"]
        for pair, v in overlap.items():
            lines.append(f"| {pair} | {v['mean']} | {v['per_layer'][:5]} | {v['per_layer'][-5:]} |")
    why = meta.get("why_magnitude")
    if why and "error" not in why:
        lines += ["", "## Why magnitude fails here", "",
                  f"Channels among the top {why['top_channels_per_layer']} of a layer by mean output contribution "
                  f"(activation score) that magnitude pruning at {why['ratio']:.0%} removes: {why['n_removed_top']} "
                  f"in layers {sorted(int(k) for k in why['removed_top_channels'])}. Zeroing only those "
                  f"channels in the dense model: perplexity {why['dense_ppl']} -> {why['ppl_with_only_those_zeroed']}."]
    lines += ["", "## Findings", "", "What the committed run found: [README.md](README.md) (written by hand from this "
              "report; a new run does not update it).", ""]
    (out / "report.md").write_text("\n".join(lines))
    plot(rows, out / "perplexity_vs_params.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    groups: dict[str, list] = {}
    for r in rows:
        ppl = _g(r["measure"], "quality", "perplexity")
        if ppl:
            groups.setdefault(r["group"], []).append((r["params"] / 1e6, ppl, r["label"]))
    markers = "osD^v<>ph*X"
    for k, (g, pts) in enumerate(sorted(groups.items())):
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=g, marker=markers[k % len(markers)], s=50)
        for x, y, label in pts:
            ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("Wikipedia test perplexity (log scale)")
    ax.set_title("SmolLM2-135M: pruning and low rank, perplexity vs parameters")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------- main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=SOURCE, help="model source (default: SmolLM2-135M)")
    ap.add_argument("--out", default="benchmarks/results/prune_lowrank")
    ap.add_argument("--work", default="/tmp/prune_lowrank_bench", help="checkpoints and harness cache")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--recover-steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny settings, no ORT, no layer timing")
    ap.add_argument("--only", nargs="*", help="labels to run (default: all)")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    eval_spec = DataSpec(source="builtin:wikipedia", split="test", max_tokens=args.eval_tokens, seq_len=256)
    train_spec = DataSpec(source="builtin:wikipedia", split="train", max_tokens=120_000, seq_len=128)
    data = PipelineData(train=train_spec, eval=eval_spec)
    ctx = PassContext(source=args.model, data=data, scratch=work / "scratch", show_progress=False,
                      threads=args.threads)
    ctx.scratch.mkdir(exist_ok=True)
    model, tok = load_model(args.model, "causal-lm")
    base = Artifact(kind="torch", task="causal-lm", tokenizer=tok, model=model)
    settings = BenchmarkConfig(
        backends=["torch-cpu"], quality=["perplexity", "teacher-agreement"], threads=args.threads, data=eval_spec,
        latency=LatencyConfig(prompt_tokens=128, new_tokens=32, warmup=1, repeats=args.repeats))
    hw = str(work / "harness")

    def run_measure(target, backend="torch-cpu"):
        """measure(), its record cached under --work by target key + settings: a rerun measures only
        what is new (cached rows keep the load average of their own run)."""
        t = time.time()
        cache = work / "records" / f"{resolve_target(target, 'causal-lm').key}-{backend}-{settings.digest()}.json"
        if cache.exists():
            return json.loads(cache.read_text())
        rec = measure(target, backend=backend, settings=settings, baseline=args.model, task="causal-lm",
                      work_dir=hw, show_progress=False)
        if "error" not in rec and "skipped" not in rec:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(rec, default=str))
        print(f"  measured {target} on {backend} in {time.time() - t:.0f} s: "
              f"ppl {_g(rec, 'quality', 'perplexity')}, prefill {_g(rec, 'latency', 'prefill', 'median_ms')} ms, "
              f"decode {_g(rec, 'latency', 'decode_tokens_per_s')} tok/s {rec.get('error') or rec.get('skipped') or ''}",
              flush=True)
        return rec

    failures: list[dict] = []
    state = {"best": None, "ort": [], "timing": [], "overlap": None}

    def meta():
        return {"command": "flock /tmp/compress-heavy.lock python -m studies.prune_lowrank "
                           + " ".join(argv if argv is not None else sys.argv[1:]),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                "threads": args.threads, "eval": f"{eval_spec.source} test split, {args.eval_tokens} tokens, "
                "windows of 256", "calibration": "8 x 128 tokens of builtin:wikipedia train split",
                "latency": "128-token prompt, then 32 greedy tokens with the KV cache", "repeats": args.repeats,
                "best_criterion_at_50": state["best"], "failures": failures,
                "criteria_overlap_at_50": state["overlap"], "why_magnitude": state.get("why_magnitude")}

    def write():  # after every step: partial results survive an interruption
        write_outputs(Path(args.out), rows, state["ort"], state["timing"], meta())

    rows = [{"label": "dense", "group": "dense", "params": count_parameters(model),
             "measure": run_measure(args.model), "details": "SmolLM2-135M-Instruct fp32"}]

    def do(label, pass_name, opts, group):
        if args.only and label not in args.only:
            return None
        print(f"{label}: {pass_name} {opts}", flush=True)
        t = time.time()
        try:
            path = make_variant(base, ctx, label, pass_name, opts, work)
        except Exception as exc:  # keep going: one failing variant must not lose the others
            print(f"  FAILED: {type(exc).__name__}: {exc}", flush=True)
            failures.append({"label": label, "error": f"{type(exc).__name__}: {exc}"})
            return None
        info = checkpoint.read_manifest(path)["info"]
        print(f"  made in {time.time() - t:.0f} s, params ratio {info.get('params_ratio')}", flush=True)
        row = {"label": label, "group": group, "pass": pass_name, "options": opts, "path": str(path),
               "params": info["params_after"], "info": _slim(info), "details": _details(info),
               "measure": run_measure(str(path))}
        rows.append(row)
        write()
        return row

    emb_rank = 256 if model.config.hidden_size >= 512 else model.config.hidden_size // 3
    todo = variants(None, args.recover_steps, emb_rank)
    # The figures the issue requires first (50% MLP, its ORT speed-up, layer timing), the rest after.
    for v in [v for v in todo if v[0].startswith("mlp50-")]:
        do(*v)
    at50 = [r for r in rows if r["label"].startswith("mlp50-") and _g(r["measure"], "quality", "perplexity")]
    best = min(at50, key=lambda r: r["measure"]["quality"]["perplexity"])["label"].split("-", 1)[1] if at50 else None
    state["best"] = best
    if not args.quick:
        targets = [("dense", args.model)] + [(r["label"], r["path"]) for r in rows if r["label"] == f"mlp50-{best}"]
        for label, target in targets:
            state["ort"].append({"label": label, "measure": run_measure(target, "ort-cpu")})
            write()
        timing_cache = work / "records" / f"layer_timing-{args.threads}.json"
        if timing_cache.exists():
            state["timing"] = json.loads(timing_cache.read_text())
        else:
            state["timing"] = layer_timing(args.threads)
            timing_cache.parent.mkdir(parents=True, exist_ok=True)
            timing_cache.write_text(json.dumps(state["timing"]))
        write()
    for v in [v for v in todo if not v[0].startswith("mlp50-")]:
        do(*v)
    if best and not args.quick:
        do(*[v for v in variants(best, args.recover_steps, emb_rank) if v[0].endswith("+recover")][0])
    try:
        state["why_magnitude"] = why_magnitude(base, ctx, data.lm_windows("eval", tok))
        print("why magnitude:", state["why_magnitude"], flush=True)
    except Exception as exc:
        state["why_magnitude"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        state["overlap"] = criteria_overlap(base, ctx)
        print("criteria overlap:", {k: v["mean"] for k, v in state["overlap"].items()}, flush=True)
    except Exception as exc:
        state["overlap"] = {"error": f"{type(exc).__name__}: {exc}"}
    rows.sort(key=lambda r: [v[0] for v in variants(best, 0, emb_rank)].index(r["label"])
              if r["label"] != "dense" else -1)
    write()
    print(f"wrote {args.out}/report.md")


def _details(info: dict) -> str:
    if "factorized" in info:
        emb = info.get("embedding")
        return (f"{info['factorized']} layers factorized" + (f", embedding rank {emb['rank']} "
                f"(energy {emb['energy']})" if emb else ""))
    if "mlp" in info:
        w = info["mlp"]["widths"]
        return f"MLP {min(w)}-{max(w)} of {info['mlp']['of'][0]}" + (" + recovery" if "recover" in info else "")
    if "heads" in info:
        h = info["heads"]
        return f"heads {h['num_attention_heads'][1]}/{h['num_attention_heads'][0]}, KV {h['num_key_value_heads'][1]}"
    if "layers" in info:
        return f"dropped layers {info['layers']['dropped']}"
    return ""


def _slim(info: dict) -> dict:
    """The manifest figures worth keeping in results.json (no per-layer dumps)."""
    out = {k: v for k, v in info.items() if k not in ("layers", "skipped", "heads", "recover")}
    if isinstance(info.get("layers"), dict) and "dropped" in info["layers"]:
        out["layers"] = info["layers"]
    if "heads" in info:
        out["heads"] = {k: v for k, v in info["heads"].items() if k != "kept"}
    if "recover" in info:
        out["recover"] = {k: v for k, v in info["recover"].items() if k != "loss_curve"}
    return out


if __name__ == "__main__":
    main()
