"""What the harness and its measuring subprocess share: the `Backend` names and the `WorkerSpec` of one
measurement (`python -m benchmarks.worker SPEC.json OUT.json`).

Standard library only: the worker imports this module, and the ORT worker must load nothing but ONNX Runtime
and numpy (its peak memory is the model's alone)."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any, Literal

# llamacpp-cpu: llama.cpp through llama-cpp-python, a peer measured on GGUF files (a benchmark-only extra).
BACKENDS = ("torch-cpu", "torch-cuda", "ort-cpu", "ort-cuda", "llamacpp-cpu")


@dataclass(frozen=True)
class Backend:
    """A backend name taken apart: `Backend.parse("ort-cuda")` has runtime "ort" and device "cuda";
    `str()` gives the name back (records and results.json keep the name)."""

    runtime: Literal["torch", "ort", "llamacpp"]
    device: Literal["cpu", "cuda"]

    @classmethod
    def parse(cls, name: str | Backend) -> Backend:
        if isinstance(name, Backend):
            return name
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; allowed: {', '.join(BACKENDS)}")
        runtime, device = name.split("-")
        return cls(runtime, device)

    def __str__(self) -> str:
        return f"{self.runtime}-{self.device}"


@dataclass(frozen=True)
class WorkerSpec:
    """One measurement, as the worker process reads it."""

    target: str  # the checkpoint / ONNX directory, the GGUF file, or the model source
    loader: Literal["checkpoint", "source"]  # how a torch model is loaded: compress.checkpoint or compress.models
    task: str
    backend: Backend
    settings: dict[str, Any]  # the resolved BenchmarkConfig, as model_dump(mode="json")
    inputs: str  # the .npz of token ids made by the harness
    label: str  # names the progress bars
    show_progress: bool = False
    latency: bool = True  # time the model (when settings["latency"] is set)
    quality: bool = True  # score it on the eval inputs
    reference: str | None = None  # .npz of the baseline's outputs: enables teacher-agreement
    write_reference: str | None = None  # save this model's outputs here (it is the baseline)
    self_reference: bool = False  # the baseline itself: agreement with its own outputs
    extra_data: bool = False  # also score settings["extra_data"] (inputs "extra.<name>"), with `quality`
    # greedy continuations: {"prompts": [[token ids], ...], "new_tokens": n, "eos": id or None}
    generate: dict[str, Any] | None = None

    def __post_init__(self):
        if self.loader not in ("checkpoint", "source"):
            raise ValueError(f"loader must be 'checkpoint' or 'source', not {self.loader!r}")
        object.__setattr__(self, "backend", Backend.parse(self.backend))

    def to_json(self) -> str:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["backend"] = str(self.backend)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        return cls(**json.loads(text))
