"""The `benchmark:` section of a pipeline config, and the settings object of `benchmarks.harness.measure`."""
from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from compress.data import DataSpec, default_split
from compress.errors import ConfigError
from compress.options import Options

from .worker_spec import BACKENDS  # defined there: the worker cannot import this module (it imports torch)

QUALITY = ("perplexity", "accuracy", "teacher-agreement")
# Where `data` is not given: held-out text a task can be scored on (the test split of a builtin corpus).
DEFAULT_EVAL = {
    "causal-lm": {"source": "builtin:wikipedia", "max_tokens": 8192},
    "sequence-classification": {"source": "builtin:bbc-news", "max_examples": 128},
    "feature-extraction": {"source": "builtin:bbc-news", "max_examples": 64},
}


class LatencyConfig(Options):
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


class GenerationsConfig(Options):
    """Greedy continuations of fixed prompts, one per prompt, batch 1, through the backend's decode loop."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[str] = Field(min_length=1, description="prompt texts, tokenized with each checkpoint's tokenizer")
    new_tokens: int = Field(32, gt=0, description="greedy tokens at most per prompt (fewer when EOS comes first)")

    @field_validator("prompts")
    @classmethod
    def _not_blank(cls, v: list[str]) -> list[str]:
        if any(not p.strip() for p in v):
            raise ValueError("a prompt is empty; give each prompt some text")
        return v


# Fields added after results were first stored: left out of `digest` while unused, so those keys still hold.
_OPTIONAL_IN_DIGEST = ("extra_data", "generations")
_CORPUS_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class BenchmarkConfig(Options):
    model_config = ConfigDict(extra="forbid")

    backends: list[Literal[BACKENDS]] = Field(
        ["torch-cpu"], description=f"{', '.join(BACKENDS)} (CUDA ones are skipped without CUDA)")
    quality: list[Literal["perplexity", "accuracy", "teacher-agreement"]] = Field(
        ["perplexity", "accuracy", "teacher-agreement"],
        description="perplexity (causal-lm), accuracy + macro-F1 (sequence-classification), teacher-agreement "
        "with the source model (all tasks); each is computed where the task allows")
    steps: list[str] | None = Field(None, description="labels of the steps to measure, e.g. [02-distill, "
                                    "04-quantize, int8-only/02-quantize] (default: every step); the baseline and "
                                    "the source are always measured")
    baseline: str = Field("source", description="what ratios and teacher-agreement compare against: source "
                          "(the pipeline's source model) or a step of the run, e.g. 01-distill (a fine-tuned "
                          "teacher) or int8-only/02-quantize")
    threads: int | None = Field(None, gt=0, description="intra-op threads for every measurement "
                                "(default: all cores); recorded with the results")
    data: DataSpec | None = Field(None, description="eval data (default: the pipeline's data.eval, else "
                                  "builtin:wikipedia or builtin:bbc-news test split)")
    extra_data: dict[str, DataSpec] = Field(
        default_factory=dict, description="causal-lm: more held-out corpora, name -> data spec; every checkpoint "
        "also gets its perplexity (and teacher-agreement) on each, scored like `data` with windows of that "
        "corpus's seq_len (stride = window; `window` and `stride` apply to `data` only); split defaults to the "
        "eval split")
    generations: GenerationsConfig | None = Field(
        None, description="causal-lm: greedy continuations of fixed prompts on every checkpoint and backend, "
        "shown side by side in the report; null (default) for none")
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

    @field_validator("backends")
    @classmethod
    def _some_backend(cls, v: list) -> list:
        if not v:  # else nothing is measured and the run reports "every row was skipped"
            raise ValueError(f"no backend given; name at least one of {', '.join(BACKENDS)}, e.g. torch-cpu")
        return v

    @field_validator("extra_data")
    @classmethod
    def _corpus_names(cls, v: dict) -> dict:
        import re

        bad = [name for name in v if not re.match(_CORPUS_NAME, name)]
        if bad:
            raise ValueError(f"corpus names {bad} must be letters, digits, '_', '.' or '-' (they name report "
                             "columns and result fields), e.g. shakespeare")
        return v

    def check_task(self, task: str) -> None:
        """ConfigError when an option is set that `task` cannot use."""
        if task == "causal-lm":
            return
        for name in ("extra_data", "generations"):
            if getattr(self, name):
                raise ConfigError(f"benchmark.{name}: scores language models (causal-lm) only, and this task is "
                                  f"{task}; remove benchmark.{name}")

    def resolved(self, task: str, data: DataSpec | None = None) -> "BenchmarkConfig":
        """A copy with every default made explicit for `task`: the settings a record stores and is keyed by."""
        from compress.runtime import physical_cores

        self.check_task(task)
        spec = _eval_split(self.data or data or DataSpec(**DEFAULT_EVAL[task]))
        window = self.window or spec.seq_len
        if task == "causal-lm" and self.stride and self.stride > window:  # tokens between windows: never scored
            raise ConfigError(f"benchmark.stride (--stride): {self.stride} is longer than the perplexity window "
                              f"{window}, so the tokens between windows would not be scored; give a stride of at "
                              f"most {window}")
        return self.model_copy(update={
            "threads": self.threads or physical_cores(), "data": spec, "window": window,
            "stride": self.stride or window,
            "extra_data": {name: _eval_split(extra) for name, extra in self.extra_data.items()},
        })

    def digest(self) -> str:
        settings = self.model_dump(mode="json")
        del settings["steps"]  # which rows are measured, not how: a record holds for any selection
        for name in _OPTIONAL_IN_DIGEST:
            if not settings[name]:
                del settings[name]
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _eval_split(spec: DataSpec) -> DataSpec:
    """`spec` with its split made explicit (default: the eval split of its source)."""
    if spec.split is None:
        spec = spec.model_copy(update={"split": default_split(spec.source, "eval")})
    return spec
