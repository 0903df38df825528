"""Hand-written ONNX graphs for decoders (few fused nodes per block, see llama.py) and a numpy greedy runner."""
from .llama import build_llama

__all__ = ["build_llama"]
