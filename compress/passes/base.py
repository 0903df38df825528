"""The pass interface and the context a pass runs in."""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import ValidationError

from ..checkpoint import Artifact
from ..data import PipelineData
from ..errors import ConfigError, UnsupportedModelError, format_validation_error
from ..options import PassConfig


@functools.cache
def _process_scratch() -> Path:
    """Where passes run from Python (outside a pipeline) keep their files: one temp folder per process, removed
    when it exits, so save an ONNX artifact (its files live there) before then. The runner gives its own."""
    folder = Path(tempfile.mkdtemp(prefix="compress-scratch-"))
    owner = os.getpid()  # a forked child that exits must not remove its parent's folder
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(folder, ignore_errors=True))
    return folder


@dataclass
class PassContext:
    """What a pass may use besides its input model. The runner fills it; tests build it directly."""

    source: str | None = None  # the pipeline's source model (the default teacher)
    task: str = "causal-lm"
    data: PipelineData | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    threads: int | None = None
    scratch: Path = field(default_factory=_process_scratch)
    show_progress: bool = True
    _teacher: Artifact | None = field(default=None, repr=False)

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
            from ..checkpoint import load_source

            self._teacher = load_source(self.source, self.task, label_names=self.label_names())
        return self._teacher

    def with_teacher(self, teacher: Artifact, name: str | None = None) -> "PassContext":
        """A copy of this context whose source model (`teacher()`, the default teacher) is `teacher`, already
        loaded: prune's recovery hands over the unpruned model this way, and a study can share one loaded
        model between passes. `name` replaces the source name in fingerprints (default: kept)."""
        import dataclasses

        if teacher.kind != "torch" or teacher.model is None:
            raise ConfigError("a teacher must be a torch model")
        ctx = dataclasses.replace(self, source=name or self.source or "in-memory teacher")
        ctx._teacher = teacher
        return ctx

    def label_names(self) -> list[str] | None:
        if self.task != "sequence-classification" or self.data is None:
            return None
        return self.data.dataset("train").label_names


class Pass:
    """A compression step. Subclasses set `name`, `Config`, `description` and implement `apply`.

    `run` is the template: it checks the input once (its kind, a torch model present, quantized input) and
    then calls `apply`. The runner, not the pass, writes checkpoints: `apply` returns an Artifact (usually
    `model.derive(...)`) with its figures in `info` and any non-stock structure appended to `structure`."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    # Raised when the pass computes something else from the same options (a fixed bug): part of a step's cache
    # key from 2 on, so checkpoints the old code wrote are not reused.
    version: ClassVar[int] = 1
    Config: ClassVar[Any] = PassConfig  # a PassConfig class, or a union of them (see `config_class`)
    quantized_input_fix: ClassVar[str] = "run it before the quantize pass (quantizing twice is not supported)"

    def __init__(self, config: PassConfig | dict | None = None, **options: Any):
        if isinstance(config, PassConfig):
            self.config = config
            return
        options = {**(config or {}), **options}
        cls = self.config_class(options)
        try:
            self.config = cls(**options)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, cls, prefix=f"{self.name}.")) from None

    @classmethod
    def config_class(cls, options: dict) -> type[PassConfig]:
        """The options class for these options: `Config` itself, or the member of a union they select."""
        return cls.Config

    @classmethod
    def config_classes(cls) -> tuple[type[PassConfig], ...]:
        """Every options class of this pass: `Config` itself, or each member of its union."""
        if isinstance(cls.Config, type):
            return (cls.Config,)
        union = typing.get_args(cls.Config)[0]  # Annotated[Union[...], Field(discriminator=...)]
        return typing.get_args(union)

    # What the runner checks before any work starts, and `run` checks again on the model it is given.
    def input_kinds(self) -> tuple[str, ...]:
        return ("torch",)

    def output_kind(self) -> str:
        return "torch"

    def quantizes(self) -> bool:
        return False

    def accepts_quantized_input(self) -> bool:
        """Passes that train or reshape weights refuse quantized input; quantize's fp32 cast takes it."""
        return False

    def factorizes(self) -> bool:
        """lowrank: the layers it outputs are low-rank factor pairs."""
        return False

    def accepts_factorized_input(self) -> bool:
        """prune and lowrank read plain linear layers, so they refuse a factorized model."""
        return True

    def needs_data(self) -> tuple[tuple[str, ...], str] | None:
        """The pipeline data roles this pass reads (any one of them will do) and why; None when it reads none."""
        return None

    def check_task(self, task: str) -> str | None:
        """What makes these options fail on a `task` model (the error message), found before any work starts;
        None when they fit."""
        return None

    def run(self, model: Artifact, ctx: PassContext) -> Artifact:
        want = self.input_kinds()
        if model.kind not in want:
            fix = ("add an `export` pass before it" if "onnx" in want
                   else f"move `{self.name}` before the export pass")
            raise UnsupportedModelError(f"{self.name} needs a {' or '.join(want)} model, got {model.kind}: {fix}")
        if model.kind == "torch" and model.model is None:
            raise UnsupportedModelError(f"{self.name}: the torch artifact has no model")
        if model.quantization and not self.accepts_quantized_input():
            raise UnsupportedModelError(
                f"{self.name}: the model is already quantized ({model.quantization.get('method')}) and "
                f"{self.name} needs float weights: {self.quantized_input_fix}")
        problem = self.check_task(model.task)  # what validate refuses too, for callers of the API
        if problem:
            raise ConfigError(problem)
        return self.apply(model, ctx)

    def apply(self, model: Artifact, ctx: PassContext) -> Artifact:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config.model_dump()})"
