"""Torch-side int8/4-bit linear layers that survive save -> `compress.load` in a fresh process.

- torch-int8-dynamic: `Int8DynamicLinear`, int8 per-output-channel weights in plain buffers (safetensors can
  hold them, unlike torch.ao's packed params), run by the same fbgemm kernel as torch.ao's dynamic Linear.
- bnb-int8 / bnb-nf4 / bnb-fp4: bitsandbytes' Linear8bitLt / Linear4bit (CPU kernels in this version), with
  a `_load_from_state_dict` that rebuilds the quantized parameters from the saved state (int8 weight + SCB;
  packed 4-bit weight + its quant_state entries), which bitsandbytes itself only supports on CUDA.

Each replacement is recorded as a structure entry ``{"type": "quantized-linear", "method": ..., "modules":
[...], ...}``; its applier swaps the same modules for empty quantized ones before the weights load."""
from __future__ import annotations

import fnmatch

import torch
from torch import nn


STRUCTURE_TYPE = "quantized-linear"


def select_linears(model: nn.Module, exclude: list[str]) -> list[str]:
    """Names of the nn.Linear modules not matching any exclude pattern (fnmatch over module names)."""
    return [name for name, m in model.named_modules()
            if type(m) is nn.Linear and not any(fnmatch.fnmatchcase(name, p) for p in exclude)]


def matches_a_module(model: nn.Module, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for name, _ in model.named_modules() for p in patterns)


# ----------------------------------------------------------------------------- torch int8 dynamic
class Int8DynamicLinear(nn.Module):
    """y = x W^T + b with W int8 per output channel (symmetric), activations quantized per tensor at run
    time (torch.ops.quantized.linear_dynamic, fbgemm)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed = None
        self.register_load_state_dict_post_hook(lambda module, _: setattr(module, "_packed", None))

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Int8DynamicLinear":
        q = cls(lin.in_features, lin.out_features, lin.bias is not None)
        w = lin.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
        q.weight_int8.copy_(torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8))
        q.weight_scale.copy_(scale)
        if lin.bias is not None:
            q.bias.copy_(lin.bias.detach().float())
        return q

    def _pack(self):
        if self._packed is None:
            zero = torch.zeros(self.out_features, dtype=torch.long)
            qw = torch._make_per_channel_quantized_tensor(self.weight_int8, self.weight_scale.double(), zero, 0)
            self._packed = torch.ops.quantized.linear_prepack(qw, self.bias)
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).float().contiguous(), self._pack(), True)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


# ----------------------------------------------------------------------------- bitsandbytes
def _bnb():
    import bitsandbytes as bnb

    return bnb


def _bnb_int8_class():
    bnb = _bnb()

    class BnbLinear8bit(bnb.nn.Linear8bitLt):
        """Linear8bitLt that reloads its int8 weight and row scales (SCB) on CPU."""

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
            w, scb = state_dict.get(prefix + "weight"), state_dict.get(prefix + "SCB")
            if w is None or scb is None or w.dtype != torch.int8:
                return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing,
                                                     unexpected, errors)
            param = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
            param.CB, param.SCB = param.data, scb.clone().float()
            self.weight = param
            if prefix + "bias" in state_dict and self.bias is not None:
                self.bias = nn.Parameter(state_dict[prefix + "bias"].clone(), requires_grad=False)
            self.state.CB, self.state.SCB = None, None

        def _apply(self, fn, *args, **kwargs):
            """`model.to("cuda")` moves the weight's data but not the int8 matrix (CB) and row scales (SCB)
            that bitsandbytes keeps beside it (its own `Linear8bitLt.to` runs only when the layer itself is
            moved): keep them with the weight, or the first forward mixes devices."""
            super()._apply(fn, *args, **kwargs)
            w = self.weight
            if w.dtype == torch.int8:
                for holder in (w, self.state):
                    if getattr(holder, "CB", None) is not None:
                        holder.CB = w.data
                    if getattr(holder, "SCB", None) is not None:
                        holder.SCB = holder.SCB.to(w.device)
            return self

    return BnbLinear8bit


def _bnb_4bit_class():
    bnb = _bnb()

    class BnbLinear4bit(bnb.nn.Linear4bit):
        """Linear4bit that reloads its packed weight and quant_state on CPU.

        bitsandbytes' AVX512-BF16 CPU path repacks the weight on the first forward and rounds the block
        scales to bf16; saving after that stores them transposed (0.50.2 restores them only "best effort"),
        so a reloaded model would differ. The generic dequantize-then-matmul path keeps save/reload exact."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.support_avx512bf16_for_cpu = False

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
            key = prefix + "weight"
            stats = {k[len(key) + 1:]: v for k, v in state_dict.items() if k.startswith(key + ".")}
            if key not in state_dict or not stats:
                return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing,
                                                     unexpected, errors)
            self.weight = bnb.nn.Params4bit.from_prequantized(data=state_dict[key].clone(), quantized_stats=stats,
                                                              requires_grad=False, device="cpu", module=self)
            if prefix + "bias" in state_dict and self.bias is not None:
                self.bias = nn.Parameter(state_dict[prefix + "bias"].clone(), requires_grad=False)

    return BnbLinear4bit


def _empty_bnb(method: str, lin_shape: tuple[int, int, bool], entry: dict) -> nn.Module:
    out_f, in_f, bias = lin_shape
    if method == "bnb-int8":
        return _bnb_int8_class()(in_f, out_f, bias=bias, has_fp16_weights=False, threshold=entry["threshold"])
    return _bnb_4bit_class()(in_f, out_f, bias=bias, compute_dtype=getattr(torch, entry["compute_dtype"]),
                             quant_type=entry["method"].split("-")[1])


def quantize_bnb(lin: nn.Linear, method: str, entry: dict) -> nn.Module:
    bnb = _bnb()
    m = _empty_bnb(method, (lin.out_features, lin.in_features, lin.bias is not None), entry)
    w = lin.weight.detach().float().clone()
    if method == "bnb-int8":
        m.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        m.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=method.split("-")[1],
                                     blocksize=entry["blocksize"], compress_statistics=False, module=m)
    if lin.bias is not None:
        m.bias = nn.Parameter(lin.bias.detach().float().clone(), requires_grad=False)
    return m.to("cpu")  # quantizes the weights (bitsandbytes does it on the device move)


# ----------------------------------------------------------------------------- apply / rebuild
def quantize_linears(model: nn.Module, method: str, exclude: list[str], **settings) -> dict:
    """Replace the selected nn.Linear modules in place; return the structure entry to record."""
    entry = {"type": STRUCTURE_TYPE, "method": method, **settings}
    names = select_linears(model, exclude)
    shapes = {}
    for name in names:
        parent, attr = _parent(model, name)
        lin = getattr(parent, attr)
        shapes[name] = [lin.out_features, lin.in_features, lin.bias is not None]
        new = Int8DynamicLinear.from_linear(lin) if method == "torch-int8-dynamic" else quantize_bnb(lin, method, entry)
        setattr(parent, attr, new.train(lin.training))  # bitsandbytes takes other kernels in train mode
    _untie_quantized(model, names)
    entry["modules"] = shapes
    return entry


def _untie_quantized(model: nn.Module, names: list[str]) -> None:
    """A quantized LM head no longer shares its weight with the embeddings: stop HF from re-tying it."""
    if any(n.split(".")[-1] == "lm_head" for n in names) and getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False


def rebuild_quantized(model: nn.Module, entry: dict) -> None:
    """Structure entry `quantized_linears`: empty int8 / 4-bit modules where the recorded linears were."""
    method = entry["method"]
    for name, (out_f, in_f, bias) in entry["modules"].items():
        parent, attr = _parent(model, name)
        if method == "torch-int8-dynamic":
            new = Int8DynamicLinear(in_f, out_f, bias)
        else:
            new = _empty_bnb(method, (out_f, in_f, bias), entry)
        setattr(parent, attr, new)
    _untie_quantized(model, list(entry["modules"]))


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the submodule called `name`."""
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr
