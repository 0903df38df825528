"""Linear / Conv1D helpers of the pruning code (a model's parts are found in compress/architecture.py)."""
from __future__ import annotations

import torch
from torch import nn

# re-exported for the pruning modules
from ..architecture import is_conv1d, is_linear, linear_weight, set_module  # noqa: F401


# ---------------------------------------------------------------------- Linear / Conv1D helpers
def out_features(m: nn.Module, inputs: bool = False) -> int:
    """Output (or with `inputs`, input) features of a Linear or a GPT-2 Conv1D (weight stored in x out)."""
    if is_conv1d(m):
        return m.weight.shape[0] if inputs else m.weight.shape[1]
    return m.in_features if inputs else m.out_features


def to_linear(m: nn.Module) -> nn.Linear:
    """A Conv1D as an equivalent nn.Linear (torch-pruning does not know Conv1D); Linear returned as is."""
    if not is_conv1d(m):
        return m
    lin = nn.Linear(m.weight.shape[0], m.weight.shape[1], bias=m.bias is not None,
                    dtype=m.weight.dtype, device=m.weight.device)
    with torch.no_grad():
        lin.weight.copy_(m.weight.t())
        if m.bias is not None:
            lin.bias.copy_(m.bias)
    return lin


def to_conv1d(lin: nn.Linear) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(lin.out_features, lin.in_features)
    with torch.no_grad():
        conv.weight = nn.Parameter(lin.weight.detach().t().contiguous())
        conv.bias = nn.Parameter(lin.bias.detach().clone() if lin.bias is not None
                                 else torch.zeros(lin.out_features, dtype=lin.weight.dtype))
    return conv


def empty_like_linear(m: nn.Module, in_features: int, out_features_: int) -> nn.Module:
    """A fresh module of the same type as `m` (Linear or Conv1D) with new sizes (weights loaded later)."""
    if is_conv1d(m):
        from transformers.pytorch_utils import Conv1D

        return Conv1D(out_features_, in_features).to(m.weight.dtype)
    return nn.Linear(in_features, out_features_, bias=m.bias is not None, dtype=m.weight.dtype,
                     device=m.weight.device)
