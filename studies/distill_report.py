"""Writes benchmarks/results/distill/{report.md, results.json, loss_curves.png} from the JSON files the
distillation benchmarks leave there (smollm2.json, bbc.json, cache.json).

    python -m studies.distill_report
"""
from __future__ import annotations

import json

from studies.distill_common import RESULTS


def _load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _plot(smols: dict[str, dict], bbc: dict) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, smol) for name, smol in smols.items()] + ([("bbc", bbc)] if bbc else [])
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (name, res) in zip(axes[0], panels):
        if name == "bbc":
            for key in ("teacher", "labels_only", "kd"):
                curve = (res.get(key) or {}).get("loss_curve") or []
                if curve:
                    ax.plot([r["step"] for r in curve], [r["loss"] for r in curve], label=res[key]["label"])
            ax.set(title="BBC News: total training loss", xlabel="step", ylabel="loss")
        else:
            for key in ("b", "c", "d"):
                curve = (res.get(key) or {}).get("loss_curve") or []
                if curve and "hard" in curve[0]:
                    ax.plot([r["step"] for r in curve], [r["hard"] for r in curve], label=res[key]["label"])
            kept = next((v.get("kept_layers") for v in res.values() if v.get("kept_layers")), None)
            ax.set(title=f"SmolLM2 student ({name}): next-token CE, train batches", xlabel="step",
                   ylabel="cross-entropy (nats)")
            if kept:
                ax.text(0.02, 0.02, f"kept layers {kept}", transform=ax.transAxes, fontsize=6)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = RESULTS / "loss_curves.png"
    fig.savefig(out, dpi=110)
    return out.name


def _smollm2_section(name: str, smol: dict) -> list[str]:
    m = next((v["machine"] for v in smol.values() if "machine" in v), {})
    kept = next((v.get("kept_layers") for v in smol.values() if v.get("kept_layers")), None)
    lines = [f"## SmolLM2-135M -> 15-layer student ({name}): Shakespeare train, Wikipedia test eval", "",
             f"Kept layers: {kept}. Threads {m.get('threads')}; the load "
             "average is recorded per row in results.json. Perplexity and top-1 agreement on "
             f"{smol.get('teacher', {}).get('eval_tokens')} held-out Wikipedia tokens (test split), computed in "
             "studies/distill_common.py.", "",
             "| variant | steps | perplexity | top-1 agreement with teacher | train tokens/s |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for key in ("teacher", "a", "b", "c", "d"):
        if key in smol:
            r = smol[key]
            lines.append(f"| {key}: {r['label']} | {r.get('steps', '-') if key != 'teacher' else '-'} | "
                         f"{r['perplexity']:.2f} | {r['top1_agreement']:.4f} | {r.get('train_tokens_per_s') or '-'} |")
    return lines + [""]


def main() -> None:
    smols = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("smollm2*.json"))}
    bbc, cache = _load("bbc"), _load("cache")
    (RESULTS / "results.json").write_text(json.dumps({**smols, "bbc": bbc, "cache": cache}, indent=2) + "\n")
    lines = ["# Distillation benchmarks", ""]
    notes = RESULTS / "notes.md"
    if notes.exists():
        lines += [notes.read_text(), ""]
    for name, smol in smols.items():
        lines += _smollm2_section(name, smol)
    if bbc:
        lines += ["## BBC News classification (MiniLM-L6 teacher, layer-kept student)", "",
                  "| model | layers | parameters | test accuracy | share of teacher accuracy | train tokens/s |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        t_acc = bbc.get("teacher", {}).get("test_accuracy")
        for key in ("teacher", "labels_only", "kd"):
            if key in bbc:
                r = bbc[key]
                share = f"{r['test_accuracy'] / t_acc:.1%}" if t_acc else "-"
                lines.append(f"| {r['label']} | {r['layers']} | {r['parameters']:,} | {r['test_accuracy']:.4f} | "
                             f"{share} | {r.get('train_tokens_per_s')} |")
        lines.append("")
    if cache:
        lines += ["## Cached teacher outputs vs on-the-fly teacher (2 epochs, same data, one process)", "",
                  "| student | mode | pass seconds | pass tokens/s | training tokens/s | speed-up | final hard loss |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, rows in cache.items():
            base = rows["on_the_fly"]["pass_seconds"]
            for key in ("on_the_fly", "cache_cold", "cache_warm"):
                r = rows[key]
                lines.append(f"| {name} | {key} | {r['pass_seconds']} | {r['pass_tokens_per_s']} | "
                             f"{r['train_tokens_per_s']} | {base / r['pass_seconds']:.2f}x | {r['final_hard_loss']} |")
        s = next(iter(cache.values()))["summary"]
        lines += ["", f"Cache size: {s['cache_bytes']} bytes for {s['cache_tokens']} tokens at k = {s['k']}, i.e. "
                  f"{s['cache_mb_per_million_tokens']} MiB per million tokens (fp16 values + int32 indices).", ""]
    png = _plot(smols, bbc)
    if png:
        lines += [f"![loss curves]({png})", ""]
    (RESULTS / "report.md").write_text("\n".join(lines) + "\n")
    print((RESULTS / "report.md").read_text())


if __name__ == "__main__":
    main()
