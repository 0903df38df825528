"""quantize: lower the precision of a model's weights.

Torch-side dtype methods live here (fp32, bf16, fp16); the ONNX Runtime, bitsandbytes and torch int8
methods plug into the same pass."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..checkpoint import Artifact
from . import register
from .base import Pass, PassConfig, PassContext

DTYPE_METHODS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class QuantizeConfig(PassConfig):
    method: Literal["fp32", "bf16", "fp16"] = Field(
        "bf16", description="fp32 / bf16 / fp16: cast every floating-point weight to that dtype")


@register
class Quantize(Pass):
    name = "quantize"
    description = "Lower weight precision (torch dtypes; INT8 methods for ONNX Runtime and bitsandbytes)"
    Config = QuantizeConfig

    def quantizes(self) -> bool:
        return self.config.method != "fp32"  # fp32 is a plain cast back, allowed after anything torch-side

    def run(self, model: Artifact, ctx: PassContext) -> Artifact:
        dtype = DTYPE_METHODS[self.config.method]
        module = model.model.to(dtype)
        module.config.dtype = dtype  # `config.json` then says what the weights are
        q = None if self.config.method == "fp32" else {"method": self.config.method, "bits": 16}
        return model.derive(model=module, quantization=q, info={"dtype": str(dtype).removeprefix("torch.")})
