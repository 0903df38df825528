"""A test-only pass, registered when this module is imported (also from a subprocess)."""
import os
import time
from pathlib import Path

import torch
from pydantic import Field, model_validator

from compress.passes import register
from compress.passes.base import Pass, PassConfig


class ScaleConfig(PassConfig):
    factor: float = Field(1.0, description="multiply every weight by this")
    max_factor: float = Field(10.0, description="refuse a larger factor (a rule between two options)")

    @model_validator(mode="after")
    def _within(self):
        if self.factor > self.max_factor:
            raise ValueError(f"factor {self.factor} is above max_factor {self.max_factor}")
        return self


@register
class ScaleWeights(Pass):
    """Multiplies all weights by `factor`. With COMPRESS_TEST_SLEEP set it writes the marker file named
    there and then sleeps, so a test can kill the run mid-pass."""

    name = "test-scale"
    Config = ScaleConfig

    def run(self, model, ctx):
        marker = os.environ.get("COMPRESS_TEST_SLEEP")
        if marker:
            Path(marker).write_text("started")
            time.sleep(120)
        with torch.no_grad():
            for p in model.model.parameters():
                p.mul_(self.config.factor)
        return model.derive(info={"factor": self.config.factor})
