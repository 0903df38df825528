"""Where the parts of a transformer are, per architecture family.

The prune and lowrank passes work on three families: Llama (incl. SmolLM2, any GQA layout), GPT-2 (Conv1D
projections) and BERT. An adapter answers: which ModuleList holds the blocks, which modules are the MLP's
input / output projections and its activation, which are attention's q/k/v/o, how many heads each block has
and which config fields hold the sizes."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedModelError

FAMILIES = {"llama": "llama", "gpt2": "gpt2", "bert": "bert"}  # config.model_type -> family


@dataclass
class Adapter:
    family: str
    model: nn.Module

    # ------------------------------------------------------------------ blocks
    @property
    def layers_name(self) -> str:
        prefix = self.model.base_model_prefix
        base = f"{prefix}." if hasattr(self.model, prefix) else ""
        return base + {"llama": "layers", "gpt2": "h", "bert": "encoder.layer"}[self.family]

    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layers_name)

    def num_layers(self) -> int:
        return len(self.layers())

    def layer_name(self, i: int) -> str:
        return f"{self.layers_name}.{i}"

    # ------------------------------------------------------------------ MLP
    def mlp_name(self, i: int) -> str:
        return self.layer_name(i) + {"llama": ".mlp", "gpt2": ".mlp", "bert": ""}[self.family]

    def mlp_in(self, i: int) -> list[str]:
        """Names of the projections into the intermediate width (gate first for gated MLPs)."""
        layer = self.layer_name(i)
        return {"llama": [f"{layer}.mlp.gate_proj", f"{layer}.mlp.up_proj"], "gpt2": [f"{layer}.mlp.c_fc"],
                "bert": [f"{layer}.intermediate.dense"]}[self.family]

    def mlp_out(self, i: int) -> str:
        layer = self.layer_name(i)
        return {"llama": f"{layer}.mlp.down_proj", "gpt2": f"{layer}.mlp.c_proj",
                "bert": f"{layer}.output.dense"}[self.family]

    def mlp_act(self, i: int) -> nn.Module:
        layer = self.layers()[i]
        return {"llama": lambda: layer.mlp.act_fn, "gpt2": lambda: layer.mlp.act,
                "bert": lambda: layer.intermediate.intermediate_act_fn}[self.family]()

    def mlp_width(self, i: int) -> int:
        return out_features(self.model.get_submodule(self.mlp_out(i)), inputs=True)

    @property
    def intermediate_field(self) -> str:
        return "n_inner" if self.family == "gpt2" else "intermediate_size"

    # ------------------------------------------------------------------ attention
    def attn_name(self, i: int) -> str:
        return self.layer_name(i) + {"llama": ".self_attn", "gpt2": ".attn", "bert": ".attention"}[self.family]

    def attn_out(self, i: int) -> str:
        """The output projection, whose input is the concatenation of the head outputs."""
        a = self.attn_name(i)
        return {"llama": f"{a}.o_proj", "gpt2": f"{a}.c_proj", "bert": f"{a}.output.dense"}[self.family]

    def head_dim(self) -> int:
        c = self.model.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def num_heads(self, i: int) -> int:
        """Query heads currently in block i (GPT-2 / BERT may have pruned some)."""
        o = self.model.get_submodule(self.attn_out(i))
        return out_features(o, inputs=True) // self.head_dim()

    def num_kv_heads(self, i: int) -> int:
        if self.family != "llama":
            return self.num_heads(i)
        k = self.model.get_submodule(self.attn_name(i) + ".k_proj")
        return k.out_features // self.head_dim()

    # ------------------------------------------------------------------ all prunable linear layers
    def block_linears(self) -> list[str]:
        """Names of every linear projection inside the blocks (what lowrank targets by default)."""
        prefix = self.layers_name + "."
        return [n for n, m in self.model.named_modules() if n.startswith(prefix) and is_linear(m)]


def adapter(model: nn.Module) -> Adapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"structured pruning / low-rank does not support architecture {model_type!r} "
            f"({type(model).__name__}); supported: {', '.join(sorted(FAMILIES))} families "
            "(Llama incl. SmolLM2, GPT-2, BERT)"
        )
    return Adapter(FAMILIES[model_type], model)


# ---------------------------------------------------------------------- Linear / Conv1D helpers
def is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_conv1d(m)


def out_features(m: nn.Module, inputs: bool = False) -> int:
    """Output (or with `inputs`, input) features of a Linear or a GPT-2 Conv1D (weight stored in x out)."""
    if is_conv1d(m):
        return m.weight.shape[0] if inputs else m.weight.shape[1]
    return m.in_features if inputs else m.out_features


def linear_weight(m: nn.Module) -> torch.Tensor:
    """The weight as [out, in] whatever the module type."""
    return m.weight.t() if is_conv1d(m) else m.weight


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


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def empty_like_linear(m: nn.Module, in_features: int, out_features_: int) -> nn.Module:
    """A fresh module of the same type as `m` (Linear or Conv1D) with new sizes (weights loaded later)."""
    if is_conv1d(m):
        from transformers.pytorch_utils import Conv1D

        return Conv1D(out_features_, in_features).to(m.weight.dtype)
    return nn.Linear(in_features, out_features_, bias=m.bias is not None, dtype=m.weight.dtype,
                     device=m.weight.device)
