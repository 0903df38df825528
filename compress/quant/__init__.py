"""Quantization back ends used by the quantize pass (ONNX Runtime, bitsandbytes, torch int8)."""
