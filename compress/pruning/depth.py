"""Depth pruning: remove whole blocks, chosen by how little they change their input on calibration data.

The result is a stock model with fewer layers: the layer list is renumbered, every module that caches by
`layer_idx` is re-indexed, and the config's layer count (and GPT-2 / BERT `pruned_heads`) follow."""
from __future__ import annotations

from torch import nn

from ..architecture import Architecture, keep_layer_fields
from .arch import set_module


def drop_layers(model: nn.Module, ad: Architecture, drop: list[int]) -> None:
    drop_set = set(drop)
    layers = ad.layers()
    keep = [i for i in range(len(layers)) if i not in drop_set]
    set_module(model, ad.layers_name, nn.ModuleList([layers[i] for i in keep]))
    for new, old in enumerate(keep):
        for m in ad.layers()[new].modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new
    cfg = model.config
    cfg.num_hidden_layers = len(keep)  # GPT-2's attribute_map sends this to n_layer
    keep_layer_fields(cfg, keep, len(layers))
    if getattr(cfg, "pruned_heads", None):
        old = {int(k): v for k, v in cfg.pruned_heads.items()}
        cfg.pruned_heads = {new: old[o] for new, o in enumerate(keep) if old.get(o)}
