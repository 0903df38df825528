"""The pass interface and the context a pass runs in."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from ..checkpoint import Artifact
from ..data import PipelineData
from ..errors import ConfigError, format_validation_error


class PassConfig(BaseModel):
    """Base of every pass's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class PassContext:
    """What a pass may use besides its input model. The runner fills it; tests build it directly."""

    source: str | None = None  # the pipeline's source model (the default teacher)
    task: str = "causal-lm"
    data: PipelineData | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    threads: int | None = None
    scratch: Path = field(default_factory=lambda: Path(os.environ.get("TMPDIR", "/tmp")))
    show_progress: bool = True
    _teacher: Artifact | None = None

    def progress(self, iterable=None, total: int | None = None, desc: str = "", **kwargs):
        """A progress bar (tqdm) on stderr; silent when disabled or COMPRESS_PROGRESS=0."""
        from tqdm.auto import tqdm

        disable = not self.show_progress or os.environ.get("COMPRESS_PROGRESS", "1") == "0"
        return tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True, **kwargs)

    def teacher(self) -> Artifact:
        """The source model, loaded once per context (the default teacher / baseline)."""
        if self._teacher is None:
            if self.source is None:
                raise ConfigError("this pass needs the source model, but the context has none")
            from ..models import load_model

            model, tok = load_model(self.source, self.task, label_names=self.label_names())
            self._teacher = Artifact(kind="torch", task=self.task, tokenizer=tok, model=model)
        return self._teacher

    def label_names(self) -> list[str] | None:
        if self.task != "sequence-classification" or self.data is None:
            return None
        return self.data.dataset("train").label_names


class Pass:
    """A compression step. Subclasses set `name`, `Config`, `description` and implement `run`.

    The runner, not the pass, writes checkpoints: `run` returns an Artifact (usually `model.derive(...)`)
    with its figures in `info` and any non-stock structure appended to `structure`."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Config: ClassVar[type[PassConfig]] = PassConfig
    accepts_quantized: ClassVar[bool] = False  # passes that train or reshape weights refuse quantized input

    def __init__(self, config: PassConfig | dict | None = None, **options: Any):
        if isinstance(config, PassConfig):
            self.config = config
            return
        try:
            self.config = self.Config(**{**(config or {}), **options})
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, self.Config, prefix=f"{self.name}.")) from None

    # What the runner checks before any work starts.
    def input_kinds(self) -> tuple[str, ...]:
        return ("torch",)

    def output_kind(self) -> str:
        return "torch"

    def quantizes(self) -> bool:
        return False

    def run(self, model: Artifact, ctx: PassContext) -> Artifact:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config.model_dump()})"
