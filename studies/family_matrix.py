"""Every model family x every pass on tiny random models: does the result reload and match?

    python -m studies.family_matrix [--out benchmarks/results/families] [--families llama gpt2 ...]

Each family (tests/tiny_models.py: Llama, SmolLM2-shaped, Qwen2, Qwen3, Mistral, Gemma, Gemma 3, Phi-3, SmolLM3,
Granite, GPT-NeoX, Pythia-shaped GPT-NeoX, Phi, StableLM, OPT, GPT-2, BERT, RoBERTa, DistilBERT, and beside the chain
tests' families Falcon (7B's and 40B's layouts), Cohere with q/k norms, Granite-MoE, gpt-oss, Arcee, Nemotron, Apertus,
XGLM, BLOOM, MPT, BioGPT, GPT-J, MPNet, DeBERTa-v2, ModernBERT; encoders as classifiers and feature extractors) goes
through each pass on its own, from the unpruned model: distill (a keep-layers student), prune MLP / heads / layers /
hidden width, lowrank, export, int8 (export then quantize ort-int8-dynamic). A torch cell is "reloads + matches" when
compress.load in a fresh process (and plain from_pretrained when the structure is stock) gives the in-memory model's
outputs within 1e-5; export when the ONNX model's greedy tokens (decoders, through the KV cache when it has one) equal
torch's, or its outputs are within 1e-3 (encoders); int8 when the quantize pass's discrepancy check passes and the
checkpoint reloads. A refusal is shown with its message. Writes README.md and results.json to --out. Tiny models: a few
minutes on one core."""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import compress  # noqa: E402
from family_cases import (PASSES, TORCH_PASSES, artifact, cases, check_onnx, context, fresh_outputs,  # noqa: E402
                          is_input_error, outputs, refusal, run_pass, save)

OK = "reloads + matches"


def run(families: list[str] | None, work: Path) -> dict:
    cells: dict[str, dict[str, str]] = {}
    pending = []  # (row, pass, path, stock, expected outputs)
    layouts = {}
    for fam, task in cases(extra=True):
        if families and fam not in families:
            continue
        row = f"{fam} ({task})"
        cells[row] = {}
        ctx = context(task, work / "scratch")
        from compress.architecture import find

        try:
            layouts[row] = find(artifact(fam, task).model).describe()
        except Exception as exc:  # noqa: BLE001 - a family the layout finder refuses still gets its row of refusals
            layouts[row] = {"refused": refusal(exc)}
        for key in PASSES:
            t = time.time()
            a = artifact(fam, task)
            try:
                if key in TORCH_PASSES:
                    out = run_pass(key, a, ctx, fam)
                    path = save(out, work / f"{fam}-{task}-{key}")
                    pending.append((row, key, str(path), not out.structure, outputs(out.model),
                                    [e["type"] for e in out.structure]))
                    cells[row][key] = "pending"
                    continue
                onnx_art = run_pass("export", a, ctx, fam)
                path = save(onnx_art, work / f"{fam}-{task}-export-{key}")
                if key == "export":
                    diff = check_onnx(a.model, compress.load(path), task)
                    cells[row][key] = OK + f" ({onnx_art.info['graph']} graph)" if diff is None else f"MISMATCH: {diff}"
                else:
                    q = run_pass("int8", compress.load(path), ctx, fam)
                    back = compress.load(save(q, work / f"{fam}-{task}-int8"))
                    d = q.info["discrepancy"]
                    agree = d.get("top1_agreement", d.get("embedding_cosine_min"))
                    cells[row][key] = (OK + f" (agreement {agree:.3f})" if d["passed"] and back.kind == "onnx"
                                       else f"MISMATCH: {d}")
            except Exception as exc:  # noqa: BLE001 - the matrix records every outcome
                cells[row][key] = refusal(exc) if is_input_error(exc) else f"FAILS: {type(exc).__name__}: {exc}"
            finally:
                print(f"{row:38s} {key:8s} {time.time() - t:5.1f}s {cells[row][key][:100]}", flush=True)
    fresh = fresh_outputs([(p, stock) for _, _, p, stock, _, _ in pending])
    for row, key, path, stock, expected, kinds in pending:
        got = fresh[path]
        if "error" in got:
            cells[row][key] = f"FAILS on reload: {got['error']}"
            continue
        ok = torch.allclose(torch.tensor(got["load"]), expected, atol=1e-5, rtol=1e-5)
        if stock:
            ok = ok and torch.allclose(torch.tensor(got["plain"]), expected, atol=1e-5, rtol=1e-5)
        how = "stock config" if stock else "compress.load: " + ", ".join(kinds)
        cells[row][key] = f"{OK} ({how})" if ok else f"MISMATCH after reload ({how})"
    return {"cells": cells, "layouts": layouts}


def unknown_layout() -> str:
    """The refusal for a model whose blocks have no attention (a tiny Mamba)."""
    from transformers import MambaConfig, MambaForCausalLM

    from compress.architecture import find

    try:
        find(MambaForCausalLM(MambaConfig(vocab_size=384, hidden_size=32, state_size=4, num_hidden_layers=2)))
    except Exception as exc:  # noqa: BLE001
        return f"`{type(exc).__name__}: {exc}` (exit 2 through the CLI)"
    return "(Mamba was mapped?)"


def write(result: dict, out: Path, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cells, layouts = result["cells"], result["layouts"]
    lines = [
        "# Every family x every pass (tiny random models)",
        "",
        f"`python -m studies.family_matrix` ({seconds / 60:.1f} min on {platform.machine()}, torch "
        f"{torch.__version__}; transformers {__import__('transformers').__version__}). Each pass runs on its own "
        "from the unpruned tiny model (4 layers, hidden 32 to 64, 4-6 heads). A torch cell is *reloads + matches* "
        "when `compress.load` in a fresh process, and plain `AutoModelFor*.from_pretrained` where the config is "
        "stock, give the in-memory outputs within 1e-5; *export*: the ONNX model's greedy tokens equal torch's "
        "(decoders) or its outputs are within 1e-3 (encoders); *int8*: export then `quantize: ort-int8-dynamic`, "
        "its discrepancy check passes and the checkpoint reloads. Options: `distill` keep 3 of 4 layers (1 step); "
        "prune 50% of MLP channels / heads (GQA: whole KV groups; Gemma's single KV group: query heads), 25% of "
        "layers, 25% of hidden channels, activation importance; `lowrank` rank 8. The export cell names the graph: "
        "tiny models with rotary positions and heads of 8 get optimum's (GroupQueryAttention rotates a multiple "
        "of 16 channels); the same families with heads of 16 or more export fused "
        "([fused_layouts](../fused_layouts/README.md)).",
        "",
        "| family (task) | " + " | ".join(PASSES) + " |",
        "| --- | " + " | ".join("---" for _ in PASSES) + " |",
    ]
    for row, c in cells.items():
        lines.append(f"| {row} | " + " | ".join(c.get(k, "").replace("|", "/") for k in PASSES) + " |")
    lines += ["", "Layouts found by `compress.architecture.find` (block list, q/k/v layout, MLP kind, heads):", "",
              "| family (task) | blocks | attention | q/k norm | MLP | heads / KV heads / head_dim | hidden | head (tied) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row, d in layouts.items():
        if "refused" in d:
            lines.append(f"| {row} | {d['refused']} |" + " |" * 6)
            continue
        lines.append(f"| {row} | {d['blocks']} | {d['attention']} | {d['qk_norm']} | {d['mlp']} | "
                     f"{d['heads']} / {d['kv_heads']} / {d['head_dim']} | {d['hidden']} | {d['head']} ({d['tied']}) |")
    lines += ["", f"An unknown layout is refused by the passes that need its parts (distill keep-layers, prune) with one message naming the part (lowrank, export and quantize need no map of the blocks): {unknown_layout()}"]
    lines += ["", "Structure entries: `attention_heads` (head counts a config cannot express: GPT-NeoX derives its "
              "head size from hidden_size / heads), `hidden_width` (GPT-2, GPT-NeoX and the BERT-style encoders "
              "derive head_dim from hidden_size, and Gemma scales its embeddings by sqrt(hidden_size), so their "
              "config keeps the original hidden_size and the entry re-narrows embeddings, norms and projections on "
              "load), `lowrank`. Head-pruned GPT-NeoX exports without the KV cache (optimum sizes it from the "
              "config's head count); GPT-2's fused graph takes the pruned heads.", ""]
    (out / "README.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps(result, indent=1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/families"))
    p.add_argument("--families", nargs="*", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rewrite", action="store_true", help="rewrite README.md from --out/results.json (no runs)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rewrite:
        result = json.loads((args.out / "results.json").read_text())
        write(result, args.out, result.get("seconds", 0))
        return 0
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="family-matrix-") as work:
        result = run(args.families, Path(work))
    result["seconds"] = round(time.time() - start)
    write(result, args.out, result["seconds"])
    print(f"wrote {args.out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
