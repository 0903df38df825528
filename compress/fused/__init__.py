"""Hand-written ONNX graphs for decoders (few fused nodes per block, see llama.py).

`build_fused` picks the writer for a model; each writer refuses what it cannot write with
UnsupportedModelError, and the export pass then falls back to optimum (graph: auto) or stops (graph: fused)."""
from .llama import build_llama


def build_fused(model, path, *, max_length: int | None = None) -> dict:
    """Write path/model.onnx for `model` with the writer for its layout; the figures to record."""
    return build_llama(model, path, max_length=max_length)


__all__ = ["build_fused", "build_llama"]
