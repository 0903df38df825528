"""compress: the library of the compression suite (checkpoints, model and data sources, passes).

    import compress
    art = compress.load("runs/quickstart/prune-kd/01-prune")   # model + tokenizer from a checkpoint folder
    out = compress.passes.get("quantize")(method="bf16").run(art, compress.passes.PassContext())

The names below are imported on first use, so `import compress.edge` (the ONNX Runtime runner) or
`compress.errors` does not load torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Artifact", "CompressError", "CompressInputError", "load", "passes", "save"]

# name -> the submodule that defines it ("passes" is a submodule itself)
_LAZY = {"Artifact": ".checkpoint", "load": ".checkpoint", "save": ".checkpoint", "passes": ".passes",
         "CompressError": ".errors", "CompressInputError": ".errors"}

if TYPE_CHECKING:
    from . import passes
    from .checkpoint import Artifact, load, save
    from .errors import CompressError, CompressInputError


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name], __name__)
    value = module if name == "passes" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
