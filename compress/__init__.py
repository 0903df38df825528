"""compress: the library of the compression suite (checkpoints, model and data sources, passes).

    import compress
    art = compress.load("runs/quickstart/01-prune")      # model + tokenizer from a checkpoint directory
    out = compress.passes.get("quantize")(method="bf16").run(art, compress.passes.PassContext())
"""
from . import passes
from .checkpoint import Artifact, load, save
from .errors import CompressError, CompressInputError

__version__ = "0.1.0"
__all__ = ["Artifact", "CompressError", "CompressInputError", "load", "passes", "save"]
