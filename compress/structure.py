"""Structure that a stock Hugging Face config cannot express (low-rank factors, per-layer widths, quantized
modules) is recorded in a checkpoint's manifest as a list of ``{"type": ..., ...}`` entries. On load, the
model is built from its config and each entry is re-applied, in order, before the weights are loaded.

Each applier lives with the code that makes the structure (compress/pruning/, compress/quant/); this table
names them, so a new kind of structure is one line here."""
from __future__ import annotations

from typing import Callable

from torch import nn

from .errors import CheckpointError

Applier = Callable[[nn.Module, dict], None]


def appliers() -> dict[str, Applier]:
    from .pruning.lowrank import apply_lowrank, apply_lowrank_embedding
    from .pruning.hidden import apply_hidden_width
    from .pruning.width import apply_attention_heads, apply_mlp_widths
    from .quant.torch_side import STRUCTURE_TYPE, rebuild_quantized

    return {"lowrank": apply_lowrank, "lowrank_embedding": apply_lowrank_embedding,
            "mlp_widths": apply_mlp_widths, "attention_heads": apply_attention_heads,
            "hidden_width": apply_hidden_width, STRUCTURE_TYPE: rebuild_quantized}


def apply_structure(model: nn.Module, entries: list[dict]) -> None:
    known = appliers()
    for entry in entries:
        kind = entry.get("type")
        if kind not in known:
            raise CheckpointError(
                f"the checkpoint needs structure {kind!r}, which this version of the suite does not know; "
                f"known: {', '.join(sorted(known))}"
            )
        known[kind](model, entry)
