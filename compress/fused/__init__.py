"""Hand-written ONNX graphs for decoders (few fused nodes per block): llama.py (Llama-shaped: Llama, SmolLM2,
Mistral incl. its sliding window, Qwen2, Qwen3, Phi-3, Gemma), gpt2.py (GPT-2-shaped: GPT-2, OPT), neox.py
(LayerNorm, rotary, parallel or sequential blocks: GPT-NeoX / Pythia, Phi, Falcon); graph.py holds what they
share.

`build_fused` picks the writer for a model by its structure (compress.architecture.find), never by model_type;
each writer refuses what it cannot write with UnsupportedModelError naming the part, and the export pass then
falls back to optimum (graph: auto) or stops (graph: fused)."""
from ..architecture import find
from ..errors import UnsupportedModelError
from ..pruning.lowrank import LowRankEmbedding
from .gpt2 import build_gpt2, is_gpt2
from .graph import rotary
from .llama import build_llama
from .neox import build_neox


def build_fused(model, path, *, max_length: int | None = None) -> dict:
    """Write path/model.onnx for `model` with the writer for its layout; the figures to record.

    A gated MLP (gate / up / down or a packed gate_up) goes to the Llama writer; a plain MLP with a rotary
    embedding to the GPT-NeoX writer, with learned positions and one packed [q | k | v] attention projection or
    separate q / k / v to the GPT-2 writer; anything else is refused, naming the part."""
    if isinstance(model.get_input_embeddings(), LowRankEmbedding):  # the layout finder would only say 'no embedding'
        raise UnsupportedModelError("fused export: the writers take a plain embedding table, and "
                                    "lowrank.embedding_rank factorized this one (its linear layers alone are fine)")
    try:
        arch = find(model)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"fused export: {exc}") from exc
    b = arch.blocks[0]
    if b.mlp.kind in ("gated", "fused_gated"):
        return build_llama(model, path, max_length=max_length, arch=arch)
    if b.mlp.kind == "plain" and rotary(model) is not None:
        return build_neox(model, path, max_length=max_length, arch=arch)
    if is_gpt2(model, arch):
        return build_gpt2(model, path, max_length=max_length, arch=arch)
    raise UnsupportedModelError(  # a plain MLP, no rotary embedding, q/k/v packed per head (BLOOM)
        f"fused export: no writer for the layout of {type(model).__name__}: its MLP {b.mlp.name} is plain "
        f"({', '.join(b.mlp.ins)} -> {b.mlp.out}), it has no rotary embedding and its attention {b.attn.qkv} packs "
        "q/k/v per head (rows [q k v] of head 0, of head 1, ...); the Llama writer takes a gated MLP, the GPT-NeoX "
        "writer rotary positions, the GPT-2 writer a [q | k | v] packed attention projection or separate q / k / v")


__all__ = ["build_fused", "build_gpt2", "build_llama", "build_neox"]
