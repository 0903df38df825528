"""The `benchmark:` section of a pipeline config, and the settings object of `benchmarks.harness.measure`."""
from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from compress.data import DataSpec, default_split

from .worker_spec import BACKENDS  # defined there: the worker cannot import this module (it imports torch)

QUALITY = ("perplexity", "accuracy", "teacher-agreement")
# Where `data` is not given: held-out text a task can be scored on (the test split of a builtin corpus).
DEFAULT_EVAL = {
    "causal-lm": {"source": "builtin:wikipedia", "max_tokens": 8192},
    "sequence-classification": {"source": "builtin:bbc-news", "max_examples": 128},
    "feature-extraction": {"source": "builtin:bbc-news", "max_examples": 64},
}


class LatencyConfig(BaseModel):
    """The timing workload. Decoders: a prompt of `prompt_tokens` x `batch`, then `new_tokens` greedy tokens
    with the KV cache. Encoders: one input of `seq_tokens` (batch 1), and `throughput_batch` inputs at once."""

    model_config = ConfigDict(extra="forbid")

    batch: int = Field(1, gt=0, description="decoders: prompts processed at once")
    prompt_tokens: int = Field(128, gt=0, description="decoders: prompt length in tokens")
    new_tokens: int = Field(32, gt=0, description="decoders: greedy tokens generated with the KV cache")
    seq_tokens: int = Field(128, gt=1, description="encoders: input length in tokens")
    throughput_batch: int = Field(16, gt=0, description="encoders: batch size of the throughput measurement")
    warmup: int = Field(2, ge=0, description="untimed runs before timing")
    repeats: int = Field(10, gt=0, description="timed runs; the report gives median, p90, min and max")
    rounds: int = Field(1, gt=0, description="timing rounds: with N > 1 every row is timed again N - 1 times "
                        "(fresh processes, timing only), the rows taking turns, and its runs are pooled; a "
                        "machine whose speed drifts then slows every row alike, so ratios between rows hold")


class BenchmarkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backends: list[Literal[BACKENDS]] = Field(
        ["torch-cpu"], description=f"{', '.join(BACKENDS)} (CUDA ones are skipped without CUDA)")
    quality: list[Literal["perplexity", "accuracy", "teacher-agreement"]] = Field(
        ["perplexity", "accuracy", "teacher-agreement"],
        description="perplexity (causal-lm), accuracy + macro-F1 (sequence-classification), teacher-agreement "
        "with the source model (all tasks); each is computed where the task allows")
    baseline: str = Field("source", description="what ratios and teacher-agreement compare against: source "
                          "(the pipeline's source model) or a step of the run, e.g. 01-distill (a fine-tuned "
                          "teacher) or int8-only/02-quantize")
    threads: int | None = Field(None, gt=0, description="intra-op threads for every measurement "
                                "(default: all cores); recorded with the results")
    data: DataSpec | None = Field(None, description="eval data (default: the pipeline's data.eval, else "
                                  "builtin:wikipedia or builtin:bbc-news test split)")
    window: int | None = Field(None, gt=1, description="perplexity window in tokens (default: data.seq_len)")
    stride: int | None = Field(None, gt=0, description="perplexity stride in tokens (default: window, i.e. "
                               "non-overlapping windows)")
    eval_batch: int = Field(4, gt=0, description="sequences per forward pass when scoring quality")
    kl_top_k: int = Field(64, gt=0, description="KL(source || model) uses the source's top-k tokens plus one "
                          "bucket for the rest (a lower bound of the full KL; exact when k >= vocab)")
    latency: LatencyConfig | None = Field(default_factory=LatencyConfig,
                                          description="timing workload; null to skip timing")
    timeout_s: int = Field(3600, gt=0, description="give up on one measurement after this many seconds")

    @property
    def rounds(self) -> int:
        """Timing rounds per row (`latency.rounds`; 1 without timing)."""
        return self.latency.rounds if self.latency else 1

    @field_validator("backends", "quality")
    @classmethod
    def _unique(cls, v: list) -> list:
        return list(dict.fromkeys(v))

    def resolved(self, task: str, data: DataSpec | None = None) -> "BenchmarkConfig":
        """A copy with every default made explicit for `task`: the settings a record stores and is keyed by."""
        from compress.runtime import physical_cores

        spec = self.data or data or DataSpec(**DEFAULT_EVAL[task])
        if spec.split is None:
            spec = spec.model_copy(update={"split": default_split(spec.source, "eval")})
        window = self.window or spec.seq_len
        return self.model_copy(update={
            "threads": self.threads or physical_cores(), "data": spec, "window": window,
            "stride": self.stride or window,
        })

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]
