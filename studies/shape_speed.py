"""Decode speed of the fused graph against optimum's on a family no packaged model covers: a real model's config
(Gemma-3-270M; BLOOM-560M, ALiBi; OLMoE-1B-7B's mixture of experts, 2 of its 16 blocks), random weights. Speed depends
on the shapes, not on the values, so only latency is measured: perplexity or agreement of random weights would mean
nothing.

    flock /tmp/compress-heavy.lock .venv/bin/python -m studies.shape_speed [--model gemma-3-270m] [--rounds 2]
        [--work /tmp/compress-shapes] [--out benchmarks/results/shape_speed]

Builds the model from the config.json values below (transformers' class, seed 0; SmolLM2's tokenizer, whose
ids fall inside the vocabulary) in --work, writes a pipeline config beside it and runs it with `compress
run`: the fused export (the default) and its int8, optimum's export and its int8 as a branch, every row on
torch-cpu and ort-cpu in its own process, 2 threads. Copies the run's report to --out/MODEL/."""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# config.json of google/gemma-3-270m (transformers 4.57's Gemma3TextConfig field names)
SHAPES = {
    "gemma-3-270m": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, max_position_embeddings=32768, sliding_window=512,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3, rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0, query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6, tie_word_embeddings=True, attn_logit_softcapping=None, final_logit_softcapping=None)),
    # config.json of bigscience/bloom-560m (ALiBi positions, a LayerNorm of the embeddings, tied head)
    "bloom-560m": ("BloomConfig", "BloomForCausalLM", dict(
        vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16, layer_norm_epsilon=1e-5,
        apply_residual_connection_post_layernorm=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)),
    # config.json of allenai/OLMoE-1B-7B-0924 with 2 of its 16 blocks (1.0B parameters, 4 GB in fp32: all 16
    # would not fit this VM's memory twice): 64 experts of 1024, 8 per token, q / k norms
    "olmoe-1b-7b-2l": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=16,
        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, max_position_embeddings=4096,
        rope_theta=10000.0, rms_norm_eps=1e-5, norm_topk_prob=False, clip_qkv=None, tie_word_embeddings=False,
        pad_token_id=1, eos_token_id=50279)),
}

PIPELINE = """\
# written by studies/shape_speed.py: {model}'s shapes, random weights; latency only
name: shape-{model}
model: {{source: {source}}}
task: causal-lm
threads: 2
data:
  eval: {{source: builtin:wikipedia, max_tokens: 1024, seq_len: 256}}
passes:
  - export: {{max_length: 512}}                       # the fused graph
  - quantize: {{method: ort-int8-dynamic, min_agreement: 0}}
{branches}benchmark:
  backends: [torch-cpu, ort-cpu]
  quality: []
  latency: {{batch: 1, prompt_tokens: 128, new_tokens: 32, warmup: 1, repeats: 3, rounds: {rounds}}}
"""


OPTIMUM_BRANCH = """\
branches:
  - name: optimum
    passes:
      - export: {graph: optimum}
      - quantize: {method: ort-int8-dynamic, min_agreement: 0}
"""
# models whose optimum export with the KV cache fails (the comparison row is left out, the reason printed)
OPTIMUM_FAILS = {"bloom-560m": "optimum-onnx 0.1.0's exporter fails on BLOOM-560M with the KV cache (RuntimeError: "
                               "The post-processing of the ONNX export failed)",
                 "olmoe-1b-7b-2l": "optimum-onnx 0.1.0's exporter has no OLMoE configuration ('a custom or "
                                   "unsupported architecture')"}


def build(model: str, folder: Path) -> None:
    """The random-weight model of `model`'s config, with SmolLM2's tokenizer, saved in `folder` (kept)."""
    if (folder / "config.json").exists():
        return
    import torch
    import transformers as T

    from compress.models import smollm2_folder

    config_cls, model_cls, values = SHAPES[model]
    torch.manual_seed(0)
    net = getattr(T, model_cls)(getattr(T, config_cls)(**values)).eval()
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    net.save_pretrained(tmp)
    T.AutoTokenizer.from_pretrained(smollm2_folder()).save_pretrained(tmp)
    tmp.rename(folder)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="gemma-3-270m")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/compress-shapes"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "shape_speed")
    args = ap.parse_args(argv)
    folder = args.work / args.model
    build(args.model, folder)
    config = args.work / f"{args.model}.yaml"
    if args.model in OPTIMUM_FAILS:
        print(f"no optimum branch: {OPTIMUM_FAILS[args.model]}")
    branches = "" if args.model in OPTIMUM_FAILS else OPTIMUM_BRANCH
    config.write_text(PIPELINE.format(model=args.model, source=folder, rounds=args.rounds, branches=branches))
    runs = args.work / "runs"
    rc = subprocess.call([sys.executable, "-m", "compress", "run", str(config), "--output-dir", str(runs),
                          "--no-progress"])
    if rc:
        return rc
    out = args.out / args.model
    out.mkdir(parents=True, exist_ok=True)
    run = runs / f"shape-{args.model}"
    for name in ("report.md", "report.html", "results.json"):
        if (run / name).exists():
            shutil.copy(run / name, out / name)
    shutil.copy(config, out / "pipeline.yaml")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
