"""Hand-written ONNX graphs for decoders (few fused nodes per block): llama.py (Llama, SmolLM2, Mistral incl.
its sliding window, Qwen2, Qwen3), gpt2.py (GPT-2); graph.py holds what they share.

`build_fused` picks the writer for a model by its structure; each writer refuses what it cannot write with
UnsupportedModelError, and the export pass then falls back to optimum (graph: auto) or stops (graph: fused)."""
from .gpt2 import build_gpt2, is_gpt2
from .llama import build_llama


def build_fused(model, path, *, max_length: int | None = None) -> dict:
    """Write path/model.onnx for `model` with the writer for its layout; the figures to record.

    GPT-2-shaped models (transformer.h blocks with a packed c_attn) go to the GPT-2 writer, everything else to
    the Llama writer, which refuses families it does not know."""
    if is_gpt2(model):
        return build_gpt2(model, path, max_length=max_length)
    return build_llama(model, path, max_length=max_length)


__all__ = ["build_fused", "build_gpt2", "build_llama"]
