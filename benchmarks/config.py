"""The `benchmark:` section of a pipeline config."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class BenchmarkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backends: list[str] = Field(["torch-cpu"], description="torch-cpu, torch-cuda, ort-cpu, ort-cuda")
    quality: list[str] = Field(["perplexity"], description="quality metrics to compute")
    threads: int | None = Field(None, gt=0, description="intra-op threads for timing (default: all cores)")
