"""Depth pruning: remove whole blocks, chosen by how little they change their input on calibration data.

The result is a stock model with fewer layers: the layer list is renumbered, every module that caches by
`layer_idx` is re-indexed, and the config's layer count (and GPT-2 / BERT `pruned_heads`) follow
(architecture.keep_layers_of, which also refuses a cut the config cannot rebuild)."""
from __future__ import annotations

from torch import nn

from ..architecture import Architecture, keep_layers_of


def drop_layers(model: nn.Module, ad: Architecture, drop: list[int]) -> None:
    keep = [i for i in range(ad.num_layers()) if i not in set(drop)]
    keep_layers_of(model, ad.layers_name, keep, "prune.targets: layers")
