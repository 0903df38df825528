"""Which decoder layouts the fused writers take, and that none is written wrong: tiny random models of many
transformers families through compress.fused.build_fused.

    python -m studies.fused_layouts [--out benchmarks/results/fused_layouts]

Each layout (hidden 64, 2-4 layers, 2 heads of 32) is written by build_fused, then its logits on 2 x 10 tokens are
compared with torch's (a second run, other tokens than build_fused's own check). A row is "exported" (the
writer, whether its rotary embedding turns channel pairs, the largest logit difference), "refused" (the
message, cut), or "WRONG" when a written graph's logits differ by more than 1e-3: the study exists to show
there is none. Writes README.md and results.json to --out. About a minute on one core."""
from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import transformers as T

from compress.edge import EdgeModel
from compress.errors import UnsupportedModelError
from compress.fused import build_fused

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
              initializer_range=0.3, pad_token_id=0)
DEC = dict(COMMON, intermediate_size=128)


def _hf(name: str, **options):
    return lambda: getattr(T, f"{name}ForCausalLM")(getattr(T, f"{name}Config")(**options))


def _gpt_oss():
    """gpt-oss with its sinks and biases drawn away from their zero init (a dropped one would show)."""
    model = T.GptOssForCausalLM(T.GptOssConfig(**{**DEC, "intermediate_size": 32}, num_key_value_heads=1,
                                               num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                                               layer_types=["sliding_attention", "full_attention"], rope_scaling=None))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("sinks", "bias")):
                p.normal_(0.0, 0.5)
    return model


# label -> a function building the model (transformers' classes with tiny configs)
LAYOUTS = {
    "Llama, biases on attention and MLP": _hf("Llama", **DEC, num_key_value_heads=1, mlp_bias=True,
                                               attention_bias=True),
    "Mistral": _hf("Mistral", **DEC, num_key_value_heads=1),
    "Qwen2": _hf("Qwen2", **DEC, num_key_value_heads=1),
    "Qwen3 (q/k norms)": _hf("Qwen3", **DEC, num_key_value_heads=1, head_dim=32),
    "Phi-3, partial rotary": _hf("Phi3", **DEC, num_key_value_heads=1, partial_rotary_factor=0.5),
    "Phi-3.5-mini (longrope, its short positions: the default length)": _hf(
        "Phi3", **DEC, num_key_value_heads=1, partial_rotary_factor=0.5, original_max_position_embeddings=32,
        rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.5 * i for i in range(8)],
                      "long_factor": [3.0 + 0.5 * i for i in range(8)]}),
    "GLM-4 (norms after attention and MLP, packed gate_up, partial rotary)": _hf(
        "Glm4", **DEC, num_key_value_heads=1, head_dim=32),
    "ERNIE 4.5": _hf("Ernie4_5", **DEC, num_key_value_heads=1, head_dim=32),
    "Seed-OSS (attention biases)": _hf("SeedOss", **DEC, num_key_value_heads=1, head_dim=32),
    "OLMo 3 (post-norms, sliding layers)": _hf("Olmo3", **{**DEC, "num_hidden_layers": 4}, num_key_value_heads=1,
                                               sliding_window=4),
    "Arcee (RMSNorms, plain MLP with a squared ReLU)": _hf("Arcee", **DEC, num_key_value_heads=1, head_dim=32),
    "Nemotron / Minitron (LayerNorm1P, squared ReLU, partial rotary)": _hf(
        "Nemotron", **DEC, num_key_value_heads=1, head_dim=32, partial_rotary_factor=0.5),
    "Apertus (xIELU with learned parameters, q/k norms, plain MLP)": _hf(
        "Apertus", **DEC, num_key_value_heads=1, head_dim=32, rope_scaling=None),
    "Granite, default multipliers": _hf("Granite", **DEC, num_key_value_heads=1),
    "Granite with multipliers": _hf("Granite", **DEC, num_key_value_heads=1, embedding_multiplier=12.0,
                                    residual_multiplier=0.22, attention_multiplier=0.125, logits_scaling=8.0),
    "StableLM": _hf("StableLm", **DEC, num_key_value_heads=1, partial_rotary_factor=0.5, use_qkv_bias=True),
    "StableLM, parallel residual": _hf("StableLm", **DEC, num_key_value_heads=1, partial_rotary_factor=0.5,
                                       use_parallel_residual=True),
    "GLM (interleaved rotary)": _hf("Glm", **DEC, num_key_value_heads=2, head_dim=32),
    "Helium (interleaved rotary)": _hf("Helium", **DEC, num_key_value_heads=2, head_dim=32),
    "SmolLM3 (no rotary in every 4th layer)": _hf("SmolLM3", **{**DEC, "num_hidden_layers": 4}, num_key_value_heads=1),
    "Gemma (embedding scale, 1 + weight norms)": _hf("Gemma", **DEC, num_key_value_heads=1, head_dim=32),
    # eager attention: transformers' sdpa path leaves the attention soft-capping out (logits 4e-3 off here)
    "Gemma 2 (soft-capping, sliding window)": _hf("Gemma2", **DEC, num_key_value_heads=1, head_dim=32,
                                                  sliding_window=4, attn_implementation="eager"),
    "Gemma 3 (sliding layers with their own rotary)": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(
        **{**DEC, "num_hidden_layers": 3}, num_key_value_heads=1, head_dim=32, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], rope_local_base_freq=100.0)),
    "Cohere": _hf("Cohere", **DEC, num_key_value_heads=1),
    "Cohere with q/k norms": _hf("Cohere", **DEC, num_key_value_heads=1, use_qk_norm=True),
    "Cohere 2 (sliding layers, no rotary in the global ones)": _hf(
        "Cohere2", **{**DEC, "num_hidden_layers": 4}, num_key_value_heads=1, sliding_window=4),
    "EXAONE 4 (post-norms, sliding layers, no rotary in the global ones)": _hf(
        "Exaone4", **{**DEC, "num_hidden_layers": 4}, num_key_value_heads=1, sliding_window=4,
        sliding_window_pattern=4),
    "OLMo": _hf("Olmo", **DEC, num_key_value_heads=1),
    "OLMo 2": _hf("Olmo2", **DEC, num_key_value_heads=1),
    "GPT-NeoX (Pythia), parallel": _hf("GPTNeoX", **DEC, rotary_pct=0.5),
    "GPT-NeoX, sequential, ReLU, tied": _hf("GPTNeoX", **DEC, rotary_pct=0.5, use_parallel_residual=False,
                                           hidden_act="relu", tie_word_embeddings=True),
    "GPT-NeoX, rotary over 8 channels": _hf("GPTNeoX", **DEC, rotary_pct=0.25),
    "Phi-2": _hf("Phi", **DEC, partial_rotary_factor=0.5),
    "Phi-2 with qk_layernorm": _hf("Phi", **DEC, partial_rotary_factor=0.5, qk_layernorm=True),
    "StarCoder 2": _hf("Starcoder2", **DEC, num_key_value_heads=1, sliding_window=None),
    "Falcon-7B (multi-query)": _hf("Falcon", **COMMON),
    "Falcon, multi-head, biases": _hf("Falcon", **COMMON, multi_query=False, bias=True),
    "Falcon, sequential": _hf("Falcon", **COMMON, parallel_attn=False),
    "Falcon with alibi": _hf("Falcon", **COMMON, alibi=True),
    # new decoder architecture: query_key_value packs [its q heads, k, v] per KV head; ln_attn and ln_mlp, parallel
    "Falcon-40B (grouped KV heads, two norms)": _hf("Falcon", **{**COMMON, "num_attention_heads": 4},
                                                    new_decoder_architecture=True, num_kv_heads=2),
    "Falcon2-11B (grouped KV heads, one norm)": _hf("Falcon", **{**COMMON, "num_attention_heads": 4},
                                                    new_decoder_architecture=True, num_kv_heads=2,
                                                    num_ln_in_parallel_attn=1),
    "OPT": _hf("OPT", **{k: v for k, v in COMMON.items() if k != "initializer_range"}, ffn_dim=128,
               word_embed_proj_dim=64, init_std=0.3),
    "OPT without biases": _hf("OPT", **{k: v for k, v in COMMON.items() if k != "initializer_range"}, ffn_dim=128,
                              word_embed_proj_dim=64, init_std=0.3, enable_bias=False),
    "OPT-350m (projected embeddings, post-norm)": _hf(
        "OPT", **{k: v for k, v in COMMON.items() if k != "initializer_range"}, ffn_dim=128,
        word_embed_proj_dim=32, do_layer_norm_before=False, init_std=0.3),
    "GPT-2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=2, n_positions=64,
                                                     initializer_range=0.3)),
    "GPT-BigCode (multi-query)": lambda: T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(
        vocab_size=128, n_embd=64, n_layer=2, n_head=2, n_positions=64, multi_query=True, initializer_range=0.3)),
    "BioGPT (scaled embeddings)": _hf("BioGpt", **DEC),
    "XGLM (sinusoidal positions)": lambda: T.XGLMForCausalLM(T.XGLMConfig(
        vocab_size=128, d_model=64, ffn_dim=128, num_layers=2, attention_heads=2, max_position_embeddings=64)),
    "GPT-J": lambda: T.GPTJForCausalLM(T.GPTJConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=2, rotary_dim=16,
                                                     n_positions=64)),
    "CodeGen": lambda: T.CodeGenForCausalLM(T.CodeGenConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                                             rotary_dim=16, n_positions=64)),  # 4 | its mp_num
    "BLOOM (ALiBi)": lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=2)),
    "Mixtral (mixture of experts)": _hf("Mixtral", **DEC, num_key_value_heads=1, num_local_experts=4,
                                        num_experts_per_tok=2),
    "Qwen2-MoE (shared expert, a dense layer)": _hf("Qwen2Moe", **DEC, num_key_value_heads=1, num_experts=4,
                                                    num_experts_per_tok=2, moe_intermediate_size=64,
                                                    shared_expert_intermediate_size=96, mlp_only_layers=[1]),
    "OLMoE (q/k norms, top-k not renormalized)": _hf("Olmoe", **DEC, num_key_value_heads=1, num_experts=4,
                                                     num_experts_per_tok=2),
    "Qwen3-MoE": _hf("Qwen3Moe", **DEC, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=64, head_dim=32, norm_topk_prob=True),
    "Granite-MoE (experts in [experts, out, in] tensors, multipliers)": _hf(
        "GraniteMoe", **DEC, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
        embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.125, logits_scaling=8.0),
    "gpt-oss (experts with biases, clamped SwiGLU, attention sinks, sliding layers)": lambda: _gpt_oss(),
    "Granite-MoE with a shared MLP": _hf("GraniteMoeShared", **DEC, num_key_value_heads=1, num_local_experts=4,
                                         num_experts_per_tok=2, shared_intermediate_size=64),
    "PhiMoE (sparsemixer routing)": _hf("Phimoe", **DEC, num_key_value_heads=1, num_local_experts=4,
                                        num_experts_per_tok=2),
    "MPT (ALiBi)": lambda: T.MptForCausalLM(T.MptConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=2,
                                                        max_seq_len=64)),
}


def row(label: str, work: Path) -> dict:
    torch.manual_seed(0)
    model = LAYOUTS[label]().eval()
    try:
        figures = build_fused(model, work)
    except UnsupportedModelError as exc:
        return {"layout": label, "result": "refused", "why": str(exc).removeprefix("fused export: ")}
    ids = torch.randint(2, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    err = float(np.abs(EdgeModel(work, threads=1).logits(ids.numpy()) - ref).max())
    return {"layout": label, "result": "exported" if err <= 1e-3 else "WRONG", "max_logit_difference": err,
            "nodes_per_block": figures["max_nodes_per_block"],
            "extras": _extras(figures)}


def _extras(figures: dict) -> list[str]:
    """What the graph writes beyond a plain pre-norm block, from build_fused's figures."""
    out = [k.replace("_", " ") for k in ("rotary_interleaved", "parallel_residual", "post_norms", "embedding_norm")
           if figures.get(k)]
    if figures.get("qkv_chunks"):
        out.append(f"q/k/v in {figures['qkv_chunks']} chunks of [q v k]")
    if figures.get("alibi"):
        out.append(f"ALiBi {'before' if figures['alibi'] == 'scaled' else 'after'} the scaling")
    if figures.get("rotary_caches", 1) > 1:
        out.append(f"{figures['rotary_caches']} rotary embeddings")
    if figures.get("layers_without_rotary"):
        out.append(f"no rotary in layers {figures['layers_without_rotary']}")
    if figures.get("sliding_windows"):
        out.append(f"sliding window {figures['sliding_windows']}")
    if figures.get("softcap"):
        out.append("soft-capping")
    return out


def markdown(rows: list[dict], command: str) -> str:
    wrong = [r["layout"] for r in rows if r["result"] == "WRONG"]
    lines = ["# Decoder layouts through the fused writers (tiny random models)", "",
             f"`{command}`, transformers {T.__version__}. Each layout is written by `compress.fused.build_fused` "
             "and its logits compared with torch's on 2 x 10 tokens.", "",
             f"{sum(r['result'] == 'exported' for r in rows)} exported, "
             f"{sum(r['result'] == 'refused' for r in rows)} refused (export's graph: auto then writes optimum's), "
             f"{len(wrong)} written wrong{': ' + ', '.join(wrong) if wrong else ''}.", "",
             "| layout | result | detail |", "| --- | --- | --- |"]
    for r in rows:
        if r["result"] == "refused":
            detail = r["why"][:150].replace("|", "/")
        else:
            detail = (f"max logit difference {r['max_logit_difference']:.1e}, {r['nodes_per_block']} nodes per block"
                      + "".join(f", {e}" for e in r["extras"]))
        lines.append(f"| {r['layout']} | {r['result']} | {detail} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fused_layouts"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, label in enumerate(LAYOUTS):
            rows.append(row(label, Path(tmp) / str(i)))
            print(f"{label:45s} {rows[-1]['result']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "README.md").write_text(markdown(rows, "python -m studies.fused_layouts"))
    return 1 if any(r["result"] == "WRONG" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
