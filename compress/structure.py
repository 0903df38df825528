"""Structure that a stock Hugging Face config cannot express (low-rank factors, per-layer widths, quantized
modules) is recorded in a checkpoint's manifest as a list of ``{"type": ..., ...}`` entries. On load, the
model is built from its config and each entry is re-applied, in order, before the weights are loaded.

A pass that changes structure registers an applier here and returns the entries it applied."""
from __future__ import annotations

from typing import Callable

from torch import nn

from .errors import CheckpointError

Applier = Callable[[nn.Module, dict], None]
_APPLIERS: dict[str, Applier] = {}


def register_structure(kind: str):
    def decorator(fn: Applier) -> Applier:
        _APPLIERS[kind] = fn
        return fn

    return decorator


def apply_structure(model: nn.Module, entries: list[dict]) -> None:
    import compress.passes

    compress.passes.available()  # imports every pass module, which registers its appliers

    for entry in entries:
        kind = entry.get("type")
        if kind not in _APPLIERS:
            raise CheckpointError(
                f"the checkpoint needs structure {kind!r}, which this version of the suite does not know; "
                f"known: {', '.join(sorted(_APPLIERS)) or 'none'}"
            )
        _APPLIERS[kind](model, entry)


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the submodule called `name`."""
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr
