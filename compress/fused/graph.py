"""What the fused decoder writers (llama.py, gpt2.py) share: the node / initializer list, projections read from
the modules (nn.Linear, GPT-2's Conv1D, low-rank `.first` / `.second` pairs), the norms with the residual
carried by the Skip* contrib ops, the attention-mask arithmetic GroupQueryAttention reads, the KV cache
inputs / outputs (the convention compress.edge's loops rely on) and the saving of the model with its figures.

KV cache convention (both writers): inputs past_key_values.{i}.key / .value and outputs present.{i}.key /
.value, BNSH [batch_size, kv heads, past_sequence_length / present_sequence_length, head_dim], fp32; the
model metadata `compress.graph: fused` tells compress.edge to run the graph with past and present bound to
one buffer per layer. Input `logits_to_keep` (int64 [1]): logits of the last k positions only, 0 for all
(generation asks for 1, scoring for 0)."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..errors import UnsupportedModelError

MS = "com.microsoft"
GRAPH_KEY = "compress.graph"  # model metadata naming the writer; compress.edge reads it
OPSET = 17  # the ONNX opset the fused writers write
LENGTH_KEY = "compress.max_length"  # metadata: the most positions (prompt + generated) the graph holds
# metadata: the positions a longrope graph runs with its short factors (compress.edge's generate then recomputes the
# cache once, as transformers' Phi-3 generation does, when a sequence grows past them)
LONGROPE_KEY = "compress.longrope_short_positions"


def _np(t) -> np.ndarray:
    return t.detach().to("cpu").float().numpy()


def _is_conv1d(m) -> bool:
    """GPT-2's Conv1D: a linear layer whose weight is stored [in, out]."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and m.weight.dim() == 2


# nn.Linear by class name, not isinstance: quantized subclasses (bitsandbytes') compute something else.
# FalconLinear is x @ W.T + b, as nn.Linear.
LINEARS = ("Linear", "FalconLinear")


def _is_linear(m) -> bool:
    return (type(m).__name__ in LINEARS and m.weight.dim() == 2) or _is_conv1d(m)


def _is_lowrank(m) -> bool:
    return hasattr(m, "first") and hasattr(m, "second") and _is_linear(m.first) and _is_linear(m.second)


def _out_features(m) -> int:
    if _is_lowrank(m):
        return _out_features(m.second)
    return m.weight.shape[1] if _is_conv1d(m) else m.out_features


def _in_out(m) -> np.ndarray:
    """The weight as MatMul wants it: [in, out]."""
    return _np(m.weight) if _is_conv1d(m) else _np(m.weight).T


def _param(name: str) -> str:
    return name.lstrip("/").replace("/", ".")  # /model/layers.0/mlp/up_proj -> model.layers.0.mlp.up_proj


class _Graph:
    """Nodes and initializers; node outputs are named '{node name}/output_{k}'."""

    def __init__(self):
        self.nodes, self.inits = [], []
        self._consts: dict[str, np.ndarray] = {}

    def const(self, name: str, array: np.ndarray) -> str:
        """An initializer; a name given again must hold the same value and is stored once."""
        if name in self._consts:
            if not np.array_equal(self._consts[name], array):
                raise ValueError(f"fused export: initializer {name} written twice with different values")
            return name
        self._consts[name] = array
        self.inits.append(numpy_helper.from_array(np.asarray(array, order="C"), name))  # (scalars stay 0-d)
        return name

    def take(self, name: str) -> np.ndarray:
        """Remove initializer `name` (its value folded into another) and return its value."""
        self.inits = [t for t in self.inits if t.name != name]
        return self._consts.pop(name)

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "",
           **attrs):
        outs = [f"{name}/output_{k}" for k in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def linear(self, x: str, modules: list, name: str, *, keep_bias: bool = False, scale: float = 1.0):
        """x @ [W_1; W_2; ...]^T (+ bias): one MatMul for plain Linears / Conv1Ds sharing an input, two for a
        low-rank one. With `keep_bias` the bias is not added but returned, (y, bias name or None), for an op
        that takes a bias input (SkipLayerNormalization, FastGelu). `scale` multiplies the output, folded into
        the weights and bias (Granite's residual multiplier)."""
        if len(modules) == 1 and _is_lowrank(modules[0]):
            x = self.linear(x, [modules[0].first], f"{name}/first")
            return self.linear(x, [modules[0].second], f"{name}/second", keep_bias=keep_bias, scale=scale)
        for m in modules:
            if not _is_linear(m):
                raise UnsupportedModelError(f"fused export: {name} is a {type(m).__name__}; only nn.Linear, "
                                            "Conv1D and LowRankLinear (.first / .second) projections are "
                                            "supported")
        weight = np.concatenate([_in_out(m) for m in modules], axis=1) * np.float32(scale)
        param = _param(name)
        y = self.op("MatMul", [x, self.const(f"{param}.weight", weight)], f"{name}/MatMul")
        bias = None
        if any(m.bias is not None for m in modules):
            bias = self.const(f"{param}.bias", np.float32(scale) * np.concatenate(
                [_np(m.bias) if m.bias is not None else np.zeros(_out_features(m), np.float32) for m in modules]))
        if keep_bias:
            return y, bias
        return self.op("Add", [y, bias], f"{name}/Add") if bias else y


def output_file(path) -> Path:
    """`path` is a folder (model.onnx inside) or a file name ending in .onnx."""
    path = Path(path)
    out = path if path.suffix == ".onnx" else path / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def io_info(vocab: int) -> tuple[list, list]:
    """The graph inputs and outputs before the KV cache (see kv_io). `logits_to_keep` [1]: logits of the
    last k positions (0: every position), as transformers' argument of that name (see lm_head)."""
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, [1])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "logits_length", vocab])]
    return inputs, outputs


def kv_io(inputs: list, outputs: list, i: int, kv_heads: int, head_dim: int) -> tuple[list[str], list[str]]:
    """Layer i's past inputs and present outputs (appended to the graph's lists): (past names, present names)."""
    past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    present = [f"present.{i}.key", f"present.{i}.value"]
    inputs += [_kv_info(n, kv_heads, "past_sequence_length", head_dim) for n in past]
    outputs += [_kv_info(n, kv_heads, "present_sequence_length", head_dim) for n in present]
    return past, present


def _kv_info(name: str, heads: int, length: str, head_dim: int):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch_size", heads, length, head_dim])


def mask_lengths(g: _Graph) -> tuple[str, str, str]:
    """From attention_mask, once for all layers: (seqlens_k int32 [batch] = tokens - 1, total_sequence_length
    int32 [1], the same as int64 [1])."""
    one = g.const("/model/constants/INT64/[1]", np.array([1], np.int64))
    n_tokens = g.op("ReduceSum", ["attention_mask", one], "/model/attn_mask/ReduceSum", keepdims=0)
    seqlens_k = g.op("Cast", [g.op("Sub", [n_tokens, one], "/model/attn_mask/Sub")], "/model/attn_mask/Sub/Cast",
                     to=TensorProto.INT32)
    total64 = g.op("Shape", ["attention_mask"], "/model/attn_mask/Shape", start=1, end=2)
    total_len = g.op("Cast", [total64], "/model/attn_mask/Shape/Cast", to=TensorProto.INT32)
    return seqlens_k, total_len, total64


def is_tied(head, embed) -> bool:
    return head.weight.data_ptr() == embed.weight.data_ptr() and getattr(head, "bias", None) is None


def lm_head(g: _Graph, x: str, head, table: str, tied: bool, name: str = "/lm_head",
            softcap: float | None = None, scale: float = 1.0) -> None:
    """logits of the last `logits_to_keep` positions (0: all): generation reads the last position only, and the
    head over every position of a prompt is a fifth of the prefill's work (SmolLM2, 128 tokens). A tied head
    multiplies by the Transpose of the embedding table (stored once: ONNX Runtime folds the Transpose at
    session start, the int8 quantizer makes the pair GatherBlockQuantized + MatMulNBits). `scale` multiplies
    the logits (Granite's 1 / logits_scaling: folded into an untied head, a Mul after a tied one); `softcap`
    (Gemma 2's final_logit_softcapping): logits = softcap * tanh(logits / softcap)."""
    starts = g.op("Neg", ["logits_to_keep"], f"{name}/logits_to_keep/Neg")
    ends = g.const("/model/constants/INT64/[INT64_MAX]", np.array([np.iinfo(np.int64).max], np.int64))
    x = g.op("Slice", [x, starts, ends, g.const("/model/constants/INT64/[1]", np.array([1], np.int64))],
             f"{name}/logits_to_keep/Slice")
    if tied:
        y = g.op("MatMul", [x, g.op("Transpose", [table], f"{name}/Transpose", perm=[1, 0])], f"{name}/MatMul")
        if scale != 1.0:
            y = g.op("Mul", [y, g.const(f"{_param(name)}.scale", np.array(scale, np.float32))], f"{name}/Mul")
    else:
        y = g.linear(x, [head], name, scale=scale)
    if softcap:
        cap = g.const(f"{_param(name)}.softcap", np.array(softcap, np.float32))
        y = g.op("Tanh", [g.op("Div", [y, cap], f"{name}/softcap/Div")], f"{name}/softcap/Tanh")
        g.op("Mul", [y, cap], f"{name}/softcap/Mul")
    g.nodes[-1].output[0] = "logits"  # the last node writes the graph output


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to rounding (fp32 models; half-precision modules get their own precision's slack)."""
    tol = 1e-4 if a.dtype == torch.float32 else 2e-2
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=tol, atol=tol / 10)


def rms_weight(norm, name: str) -> tuple[np.ndarray, float]:
    """(the weight SimplifiedLayerNormalization multiplies by, epsilon) of an RMSNorm, found by running it:
    x / rms(x) * weight (Llama) or * (1 + weight) (Gemma: the +1 is folded into the weight). Anything else
    (a LayerNorm, which subtracts the mean; no weight; no epsilon) is refused."""
    w, eps = getattr(norm, "weight", None), _eps(norm)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or not isinstance(eps, float | int):
        raise UnsupportedModelError(f"fused export: {name} is a {type(norm).__name__}; the writer takes an RMSNorm "
                                    "(one weight vector, an eps / variance_epsilon)")
    x = torch.randn(3, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w)
    with torch.no_grad():
        y = norm(x)
        base = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    for weight in (w.detach().float(), 1 + w.detach().float()):
        if _close(y, base * weight):
            return _np(weight), float(eps)
    raise UnsupportedModelError(f"fused export: {name} ({type(norm).__name__}) is not an RMSNorm: its output is "
                                "neither x / rms(x) * weight nor x / rms(x) * (1 + weight)")


# activation -> how the writers compute it; recognized by its values, whatever the module's class
GELU_TANH = lambda x: 0.5 * x * (1 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))  # noqa: E731
ACTIVATIONS = {"silu": torch.nn.functional.silu, "gelu_tanh": GELU_TANH,
               "gelu": lambda x: torch.nn.functional.gelu(x), "relu": torch.relu,
               "relu2": lambda x: torch.relu(x) ** 2}  # squared ReLU: Nemotron / Minitron, Arcee


# a plain MLP's activation (ACTIVATIONS' names) -> the com.microsoft op taking the input projection's bias:
# FastGelu = the tanh approximation, BiasGelu = erf; a ReLU is Add (the bias) + Relu, a squared one a Mul more
GELU_OPS = {"gelu_tanh": "FastGelu", "gelu": "BiasGelu"}
PLAIN_MLP_ACTS = (*GELU_OPS, "relu", "relu2", "xielu")


def plain_mlp_in(g: "_Graph", x: str, fc_in, act: str, name: str, module=None) -> str:
    """act(x @ fc_in + bias), a plain MLP's first half: MatMul, then FastGelu / BiasGelu with the bias as their
    input (a zero bias where fc_in has none: both ops take one), or Add + Relu (+ Mul by itself: squared).
    `name` is the projection's; `module`: the activation module (xIELU: its learned parameters)."""
    if act == "xielu":
        return _xielu(g, g.linear(x, [fc_in], name), xielu_params(module), f"{name}/act")
    if act in ("relu", "relu2"):
        r = g.op("Relu", [g.linear(x, [fc_in], name)], f"{name}/act/Relu")
        return r if act == "relu" else g.op("Mul", [r, r], f"{name}/act/Square")
    h, bias = g.linear(x, [fc_in], name, keep_bias=True)
    if bias is None:
        bias = g.const(f"{_param(name)}.bias", np.zeros(_out_features(fc_in), np.float32))
    return g.op(GELU_OPS[act], [h, bias], f"{name}/act/{GELU_OPS[act]}", domain=MS)


def activation(act, name: str, label: str | None = None) -> str:
    """Which of ACTIVATIONS the module `act` computes (compared on [-8, 8]), or "xielu" (xielu_params);
    UnsupportedModelError naming `label` (the config's activation name, else the module's class) otherwise."""
    label = label or type(act).__name__
    if isinstance(act, torch.nn.Module):
        x = torch.linspace(-8, 8, 801)
        with torch.no_grad():
            y = act(x).float()
        for key, fn in ACTIVATIONS.items():
            if torch.allclose(y, fn(x), rtol=0, atol=1e-5):
                return key
        if (params := xielu_params(act)) and torch.allclose(y, _xielu_torch(x, *params), rtol=0, atol=1e-5):
            return "xielu"
    raise UnsupportedModelError(f"fused export: {name} {label!r} is not supported (supported: silu, gelu "
                                "(erf), gelu with the tanh approximation, relu, squared relu, xielu)")


def xielu_params(act) -> tuple[float, float, float, float] | None:
    """(alpha_p, alpha_n, beta, eps) of an xIELU activation (Apertus'), the values its forward uses: its alpha_p
    through softplus, beta + softplus of its alpha_n, computed in its parameters' dtype as it does; None for a
    module without those parameters."""
    if not all(isinstance(getattr(act, n, None), torch.Tensor) for n in ("alpha_p", "alpha_n", "beta", "eps")):
        return None
    with torch.no_grad():
        return (float(torch.nn.functional.softplus(act.alpha_p)),
                float(act.beta + torch.nn.functional.softplus(act.alpha_n)), float(act.beta), float(act.eps))


def _xielu_torch(x, alpha_p: float, alpha_n: float, beta: float, eps: float):
    negative = (torch.expm1(torch.clamp(x, max=eps)) - x) * alpha_n
    return torch.where(x > 0, alpha_p * x * x, negative) + beta * x


def _xielu(g: "_Graph", h: str, params: tuple, name: str) -> str:
    """xIELU of h: beta x + (x > 0 ? alpha_p x^2 : alpha_n (exp(min(x, eps)) - 1 - x))."""
    alpha_p, alpha_n, beta, eps = (g.const(f"{_param(name)}.{k}", np.array(v, np.float32))
                                   for k, v in zip(("alpha_p", "alpha_n", "beta", "eps"), params))
    one = g.const("/model/constants/FLOAT/1", np.array(1.0, np.float32))
    positive = g.op("Mul", [g.op("Mul", [h, h], f"{name}/Square"), alpha_p], f"{name}/Mul_p")
    expm1 = g.op("Sub", [g.op("Exp", [g.op("Min", [h, eps], f"{name}/Min")], f"{name}/Exp"), one], f"{name}/Expm1")
    negative = g.op("Mul", [g.op("Sub", [expm1, h], f"{name}/Sub"), alpha_n], f"{name}/Mul_n")
    zero = g.const("/model/constants/FLOAT/0", np.array(0.0, np.float32))
    picked = g.op("Where", [g.op("Greater", [h, zero], f"{name}/Greater"), positive, negative], f"{name}/Where")
    return g.op("Add", [picked, g.op("Mul", [h, beta], f"{name}/Mul_beta")], f"{name}/Add")


def config_activation(config) -> str | None:
    """The activation name the config gives (Gemma's hidden_activation wins over its legacy hidden_act)."""
    return next((v for f in ("hidden_activation", "hidden_act", "activation_function")
                 if isinstance(v := getattr(config, f, None), str)), None)


def _rotaries(model) -> list:
    """The model's distinct rotary embedding modules (those holding inv_freq; equal copies count once)."""
    found = []
    for m in model.modules():
        if isinstance(getattr(m, "inv_freq", None), torch.Tensor) and not any(_same_rope(m, f) for f in found):
            found.append(m)
    return found


def _same_rope(a, b) -> bool:
    return (a.inv_freq.shape == b.inv_freq.shape and torch.equal(a.inv_freq, b.inv_freq)
            and getattr(a, "rope_type", None) == getattr(b, "rope_type", None)
            and getattr(a, "attention_scaling", 1.0) == getattr(b, "attention_scaling", 1.0))


class TableRotary:
    """A rotary embedding given as a table (GPT-J's and CodeGen's embed_positions: [positions, rotary_dim], the
    sines then the cosines of position x inv_freq), standing in for a module with inv_freq."""
    rope_type, attention_scaling = "default", 1.0

    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq = inv_freq


def _table_inv_freq(t: torch.Tensor) -> torch.Tensor | None:
    """inv_freq of a [positions, 2 x k] table of sin | cos of position x inv_freq (computed in fp32, as GPT-J's
    create_sinusoidal_positions does), None for anything else. The angle at position 1 gives inv_freq to about
    1e-7, enough to count the turns made by the angle at the last power-of-two position p (where p x inv_freq is
    exact in fp32), which then gives it to about 1e-7 / p; the table is checked row by row against the fp32
    product."""
    if not (t.dtype.is_floating_point and t.dim() == 2 and t.shape[0] > 2 and t.shape[1] % 2 == 0):
        return None
    t = t.detach().float().cpu()
    half = t.shape[1] // 2
    sin, cos = t[:, :half], t[:, half:]
    p = 2 ** int(math.log2(t.shape[0] - 1))
    first = torch.atan2(sin[1].double(), cos[1].double())
    turned = torch.atan2(sin[p].double(), cos[p].double())
    inv_freq = ((turned + 2 * math.pi * torch.round((first * p - turned) / (2 * math.pi))) / p).float()
    angles = torch.arange(t.shape[0], dtype=torch.float32)[:, None] * inv_freq
    if not (torch.allclose(torch.sin(angles), sin, atol=1e-5) and torch.allclose(torch.cos(angles), cos, atol=1e-5)):
        return None
    return inv_freq


def _table_rotaries(arch) -> list:
    """The rotary tables the attention modules hold (plain tensors or buffers), as TableRotary; equal copies
    count once."""
    found = []
    for b in arch.blocks:
        attn = arch.module(b.attn.name)
        for t in [*attn.buffers(recurse=False), *(v for v in vars(attn).values() if isinstance(v, torch.Tensor))]:
            inv_freq = _table_inv_freq(t)
            if inv_freq is not None and not any(torch.equal(inv_freq, f.inv_freq) for f in found):
                found.append(TableRotary(inv_freq))
    return found


def rotary(model, arch=None):
    """The model's rotary embedding module (the one holding inv_freq; copies per layer must agree), or a
    TableRotary for the table the attention modules hold (`arch`: compress.architecture.find(model), found if
    not given); None where there is neither."""
    if not (found := _rotaries(model)):
        from ..architecture import find

        found = _table_rotaries(arch or find(model))
    if len(found) > 1:
        raise UnsupportedModelError(f"fused export: {type(model).__name__} has rotary embeddings that differ "
                                    "(per layer or local / global); this writer takes one")
    return found[0] if found else None


def layer_rotaries(model, arch) -> list:
    """The rotary embedding module each layer's attention reads, None where it reads none (all None is fine: a
    model without positions); a model without any rotary module is refused. The model runs on 4
    tokens: each attention's `position_embeddings` is matched to the module that computed them (Gemma 3 has
    two that differ: its sliding layers' own base frequency), and each attention is run again on the same
    inputs with cos / sin that turn nothing: a layer whose output does not change uses no positions (SmolLM3's
    NoPE layers, Cohere 2's global ones; their modules say so each their own way)."""
    found = _rotaries(model)
    if not found:
        raise no_rotary(model)
    attns = [arch.module(b.attn.name) for b in arch.blocks]
    made, calls = [], {}  # (cos a rotary module computed, the module); layer -> (args, kwargs, output)
    handles = [m.register_forward_hook(lambda mod, args, out: made.append((out[0], mod))) for m in found]
    for i, a in enumerate(attns):
        def hook(mod, args, kwargs, out, i=i):
            calls[i] = (args, kwargs, out[0] if isinstance(out, tuple) else out)
        handles.append(a.register_forward_hook(hook, with_kwargs=True))
    _run(model, arch, handles)
    reads = []
    for i, attn in enumerate(attns):
        args, kwargs, out = calls.get(i, ((), {}, None))
        at = "kwargs" if isinstance(kwargs.get("position_embeddings"), tuple) else next(
            (k for k, v in enumerate(args) if isinstance(v, tuple) and len(v) == 2), None)
        if at is None:  # positions computed inside the attention: the one rotary module it holds
            if len(found) > 1:
                raise UnsupportedModelError(f"fused export: {type(model).__name__} has {len(found)} rotary "
                                            f"embeddings that differ and layer {i}'s attention is not given "
                                            "position_embeddings, so the writer cannot tell which it reads")
            reads.append(found[0])
            continue
        cos_sin = kwargs["position_embeddings"] if at == "kwargs" else args[at]
        rope = next((mod for cos, mod in made if cos is cos_sin[0]), found[0] if len(found) == 1 else None)
        if rope is None:
            raise UnsupportedModelError(f"fused export: {type(model).__name__} has {len(found)} rotary embeddings "
                                        f"that differ and layer {i}'s attention reads none of them")
        still = (torch.ones_like(cos_sin[0]), torch.zeros_like(cos_sin[1]))  # a rotation by nothing
        if at == "kwargs":
            kwargs = {**kwargs, "position_embeddings": still}
        else:
            args = (*args[:at], still, *args[at + 1:])
        with torch.no_grad():
            again = attn(*args, **kwargs)
        reads.append(None if _unchanged(again[0] if isinstance(again, tuple) else again, out) else rope)
    return reads


def _unchanged(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to fp32 rounding relative to b's scale: a layer that reads no positions runs the very same ops without
    them. (_close's absolute slack took a rotary layer with small outputs, heads pruned then low-rank, for one.)"""
    return a.shape == b.shape and float((a.float() - b.float()).abs().max()) <= 1e-6 * (float(b.abs().max()) or 1.0)


STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # cos/sin do not depend on the sequence length


def longrope_positions(rope) -> int | None:
    """The positions a longrope embedding (Phi-3 / 3.5 / 4-mini's) uses its short factors for: transformers
    switches every position of a forward pass to the long factors once the pass reaches past
    original_max_position_embeddings (longrope_position_ids). None for other rope types."""
    if getattr(rope, "rope_type", "default") != "longrope":
        return None
    cfg = rope.config  # as transformers' longrope_frequency_update reads it
    return cfg.original_max_position_embeddings if hasattr(cfg, "original_max_position_embeddings") else \
        cfg.max_position_embeddings


def rope_caches(g: _Graph, rope, length: int, head_dim: int, name: str = "cos_sin_cache") -> list[str]:
    """GroupQueryAttention's cos / sin caches [length, rotary_dim / 2] from a rotary embedding module's own
    inv_freq (rope_scaling already applied), written as Mul (positions x inv_freq, fp32 like transformers), Cos
    and Sin of two initializers: ONNX Runtime folds them into constants when the session starts, so the file
    holds length + rotary_dim / 2 floats instead of 2 x length x rotary_dim / 2 (Gemma-3-270M's two rotary
    embeddings at its 32k positions stored were 67 MB). GroupQueryAttention rotates the first rotary_dim
    channels of each head (non-interleaved halves, as transformers' rotate_half), as many as the caches are
    wide: partial rotary (GPT-NeoX's rotary_pct) needs rotary_dim a multiple of 16. A longrope embedding is
    written with its short factors where `length` is within the positions it uses them for, else as `length` rows
    of each, short then long, read through longrope_position_ids. Returns [cos, sin]."""
    rope_type, short = getattr(rope, "rope_type", "default"), longrope_positions(rope)
    if rope_type not in STATIC_ROPE and short is None:
        raise UnsupportedModelError(f"fused export: rope type {rope_type!r} is not supported (its cos/sin depend "
                                    f"on the sequence length); supported: {', '.join(STATIC_ROPE)}, longrope")
    inv_freq = _np(rope.original_inv_freq if short else rope.inv_freq)  # a long pass swaps inv_freq in place
    rotary_dim = 2 * inv_freq.shape[0]
    if rotary_dim > head_dim or (rotary_dim < head_dim and rotary_dim % 16):
        raise UnsupportedModelError(f"fused export: a rotary embedding over {rotary_dim} of {head_dim} channels per "
                                    "head is not supported (GroupQueryAttention rotates a multiple of 16)")
    positions = g.const(f"{name}.positions", np.arange(length, dtype=np.float32)[:, None])
    freqs = g.op("Mul", [positions, g.const(f"{name}.inv_freq", inv_freq)], f"/{name}/Mul")
    if short is not None and length > short:  # rows [short factors | long factors], picked by position_ids
        long_freq = _np(rope.rope_init_fn(rope.config, rope.original_inv_freq.device, seq_len=short + 1)[0])
        longs = g.op("Mul", [positions, g.const(f"{name}.long_inv_freq", long_freq)], f"/{name}/Mul_long")
        freqs = g.op("Concat", [freqs, longs], f"/{name}/Concat", axis=0)
    caches = [g.op(op, [freqs], f"/{name}/{op}") for op in ("Cos", "Sin")]
    scale = float(getattr(rope, "attention_scaling", 1.0))  # yarn scales cos and sin
    if scale != 1.0:
        factor = g.const(f"{name}.attention_scaling", np.array(scale, np.float32))
        caches = [g.op("Mul", [c, factor], f"/{name}/{op}/Mul") for c, op in zip(caches, ("Cos", "Sin"))]
    return caches


def longrope_position_ids(g: _Graph, seqlens_k: str, total64: str, short: int, length: int) -> str:
    """GroupQueryAttention's position_ids [batch, tokens] for a longrope cache of `length` short rows then `length`
    long ones: the positions the op would compute itself (0, 1, ... for a first prompt; after each row's past
    otherwise), plus `length` when the run reaches past `short` positions, where transformers switches to the long
    factors (by the longest position of a forward pass). Computed once per run for all layers."""
    def const(name, value):
        return g.const(f"/model/longrope/{name}", np.array(value, np.int64))

    tokens = g.op("Shape", ["input_ids"], "/model/longrope/Shape", start=1, end=2)  # [1]
    steps = g.op("Range", [const("zero", 0), g.op("Squeeze", [tokens], "/model/longrope/Squeeze"), const("one", 1)],
                 "/model/longrope/Range")  # [tokens]
    past = g.op("Sub", [g.op("Cast", [seqlens_k], "/model/longrope/Cast", to=TensorProto.INT64),
                        g.op("Sub", [tokens, const("one_1d", [1])], "/model/longrope/Sub")], "/model/longrope/Past")
    later = g.op("Add", [g.op("Unsqueeze", [past, const("axis", [1])], "/model/longrope/Unsqueeze"), steps],
                 "/model/longrope/Add")  # [batch, tokens]
    first = g.op("Equal", [tokens, total64], "/model/longrope/Equal")  # a first prompt: no past
    positions = g.op("Where", [first, steps, later], "/model/longrope/Where")
    offset = g.op("Where", [g.op("Greater", [total64, const("short", [short])], "/model/longrope/Greater"),
                            const("length", [length]), const("zeros", [0])], "/model/longrope/Offset")
    return g.op("Add", [positions, offset], "/model/longrope/position_ids")


ALIBI_PROBE = 300  # positions read: past 256, slope x position needs more than bfloat16's 8 significant bits


def alibi_slopes(model, arch) -> tuple[np.ndarray, bool] | None:
    """An ALiBi position bias (BLOOM, Falcon with alibi, MPT): (the slope of each head, whether the model computes
    slope x position in bfloat16 as transformers' Falcon does: the position rounded, then the product), None
    where block 0 is given no `alibi` / `position_bias`. The bias is read from block 0's call (the model builds
    it before its blocks) on ALIBI_PROBE tokens, or over the model's whole length where it builds the bias for
    that (MPT: slope x (key position - last position), sliced in the attention): per head slope x the key's
    position, plus any constant per query row (softmax ignores it); another form is refused."""
    from ..models import max_tokens

    table = max_tokens(model.config.to_dict())  # a model with a position table reads no further than it
    length = min(ALIBI_PROBE, table or ALIBI_PROBE)
    bias = _block0_alibi(model, arch, length)
    if bias is None:
        return None
    if bias.shape[-1] == length < ALIBI_PROBE:  # built for the input, not a table: again past 256
        length, bias = ALIBI_PROBE, _block0_alibi(model, arch, ALIBI_PROBE)
    heads, length = arch.num_heads(0), bias.shape[-1]
    if bias.numel() != heads * length:
        raise UnsupportedModelError(f"fused export: block 0's alibi has shape {list(bias.shape)}, not one row of "
                                    f"{length} positions for each of {heads} heads")
    bias = bias.detach().float().reshape(heads, length).cpu()
    zero = torch.nonzero((bias == 0).all(0)).flatten()  # the position the model counts from: 0, MPT's last
    if len(zero) != 1:
        raise UnsupportedModelError(f"fused export: block 0's alibi is not a slope per head times a position "
                                    f"({type(model).__name__}): no one position where it is 0 for every head")
    z = int(zero[0])
    j = torch.arange(length, dtype=torch.float32) - z
    slopes = bias[:, z + 1] if z + 1 < length else -bias[:, z - 1]  # slope x 1, exactly
    for rounded in (False, True):  # exactly as transformers computes it (fp32; Falcon's bfloat16)
        linear = (slopes[:, None] * j.bfloat16().float()).bfloat16().float() if rounded else slopes[:, None] * j
        if torch.equal(linear, bias):
            return slopes.numpy(), rounded
    raise UnsupportedModelError(f"fused export: block 0's alibi is not a slope per head times the key's position "
                                f"({type(model).__name__}); the writer takes ALiBi in that form")


def _block0_alibi(model, arch, length: int) -> torch.Tensor | None:
    """The ALiBi bias block 0 is called with on `length` tokens (`alibi`, MPT's `position_bias`; None where
    there is none)."""
    seen = {}

    def grab(mod, args, kwargs):
        seen.update(kwargs)
        raise _Stop

    _run(model, arch, [arch.layers()[0].register_forward_pre_hook(grab, with_kwargs=True)], length)
    return next((seen[k] for k in ("alibi", "position_bias") if isinstance(seen.get(k), torch.Tensor)), None)


def alibi_bias(g: _Graph, slopes: np.ndarray, rounded: bool, total64: str, scale: float = 1.0) -> str:
    """GroupQueryAttention's attention_bias [1, heads, sequence, total] for ALiBi, once for all layers: slope x
    the key's position (0 .. total - 1; with `rounded`, the position and the product rounded to bfloat16 as
    the model does), times `scale`, less the same at each query's own position (softmax ignores a constant per
    row, and the bias stays near 0 where attention looks most: in fp16, slope x position in the hundreds was
    rounded to 0.25), added to the scaled scores."""
    name = "/model/alibi"
    total = g.op("Squeeze", [total64], f"{name}/Squeeze")
    zero, one = (g.const(f"/model/constants/INT64/{v}", np.array(v, np.int64)) for v in (0, 1))
    positions = g.op("Cast", [g.op("Range", [zero, total, one], f"{name}/Range")], f"{name}/Range/Cast",
                     to=TensorProto.FLOAT)
    if rounded:
        positions = _bfloat16(g, positions, f"{name}/positions")
    bias = g.op("Mul", [g.const("model.alibi.slopes", slopes.astype(np.float32)[:, None, None]), positions],
                f"{name}/Mul")  # [heads, 1, total]
    if rounded:
        bias = _bfloat16(g, bias, name)
    if scale != 1.0:  # after the rounding, as the model scales it
        bias = g.op("Mul", [bias, g.const("model.alibi.scale", np.array(scale, np.float32))], f"{name}/Mul_scale")
    sequence = g.op("Shape", ["input_ids"], f"{name}/Shape", start=1, end=2)
    first_query = g.op("Sub", [total64, sequence], f"{name}/Sub_positions")
    two = g.const("/model/constants/INT64/[2]", np.array([2], np.int64))
    at_query = g.op("Slice", [bias, first_query, total64, two], f"{name}/Slice")  # [heads, 1, sequence]
    at_query = g.op("Transpose", [at_query], f"{name}/Transpose", perm=[0, 2, 1])
    bias = g.op("Sub", [bias, at_query], f"{name}/Sub")  # [heads, sequence, total]
    return g.op("Unsqueeze", [bias, g.const("/model/constants/INT64/[0]", np.array([0], np.int64))],
                f"{name}/Unsqueeze")


def _bfloat16(g: _Graph, x: str, name: str) -> str:
    """x rounded to bfloat16 and back to float32."""
    return g.op("Cast", [g.op("Cast", [x], f"{name}/Cast_bf16", to=TensorProto.BFLOAT16)], f"{name}/Cast_fp32",
                to=TensorProto.FLOAT)


def no_rotary(model) -> UnsupportedModelError:
    return UnsupportedModelError(f"fused export: {type(model).__name__} has no rotary embedding (a module with "
                                 "inv_freq); the writer takes rotary positions")


class _Stop(Exception):
    """Raised by a hook to end the probe run early (probe_block stops after block 0)."""


def _run(model, arch, handles: list, length: int = 4) -> torch.Tensor:
    """The model on `length` tokens in eval mode without gradients, its hooks (`handles`) removed and its mode
    restored afterwards; a hook may end it with _Stop. Returns the token ids."""
    emb = arch.module(arch.embedding)
    ids = torch.arange(length, device=emb.weight.device)[None] % emb.num_embeddings
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    except Exception as exc:  # noqa: BLE001 - whatever the model's own code raises, as a refusal naming it
        raise UnsupportedModelError(f"fused export: {type(model).__name__} fails on {length} tokens before the "
                                    f"writer could read it ({type(exc).__name__}: {exc})") from exc
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    return ids


def probe_block(model, arch, *, post_norms: bool = False) -> dict:
    """Run the model on 4 tokens until block 0 has run, recording what the module tree cannot tell: block 0's input
    (embedding scale, position embeddings) and how it wires its norms, attention and MLP. Each of the two sublayers has
    a norm before it (pre) or, with `post_norms` (the Llama writer), may have one on its output (post, before the
    residual add: Gemma 2 / 3 have both, OLMo 2 post-norms only); blocks are sequential, x + post(attn(pre(x))), then +
    post(mlp(pre(.))), or parallel pre-norm, x + attn(norm_1(x)) + mlp(norm_2(x)) (GPT-NeoX; Falcon-40B runs both norms
    first) or with one norm for both (Phi, Falcon); anything else (extra steps, post-norms where the writer takes none)
    is refused. The MLP is seen at its projections (OPT's fc1 / fc2 sit in the block itself, no MLP module), its input
    at the first, its output at the last; shapes are compared flattened to [tokens, hidden] (OPT runs its MLP on a 2-D
    view). With `post_norms` the sublayers' outputs may also be scaled by one scalar before the residual add (Granite's
    residual_multiplier). Returns {"ids", "x" (block 0's input), "tokens" (the embedding table's rows for ids), "pre" /
    "post" ((attention's, MLP's) norm names, None where there is none; a shared norm is both pre), "norms" (the distinct
    pre-norms in the order they ran), "parallel", "residual_scale"}."""
    block, b = arch.layers()[0], arch.blocks[0]
    norms = [arch.module(n) for n in b.norms]
    if not 1 <= len(norms) <= 4:
        raise UnsupportedModelError(f"fused export: block {b.name} has {len(norms)} norms over the hidden width "
                                    f"({', '.join(b.norms) or 'none'}); the writers take a norm before or after "
                                    "each of attention and MLP, or one shared by a parallel attention and MLP")
    moe = arch.module(b.mlp.name) if b.mlp.kind == "moe" else None  # its input and output: the MLP's
    parts = {"attn": arch.module(b.attn.name), "mlp_in": arch.module(b.mlp.ins[0]) if moe is None else moe,
             "mlp": arch.module(b.mlp.out) if moe is None else moe,
             **{n: m for n, m in zip(b.norms, norms)}}
    seen, order = {}, []

    def record(key):
        def hook(mod, args, kwargs, out):
            x = args[0] if args else next(iter(kwargs.values()))
            y = out[0] if isinstance(out, tuple) else out
            seen[key] = (x.clone(), y.clone())  # copies: Falcon adds to its MLP output in place
            order.append(key)
        return hook

    def stop(mod, args, kwargs, out):
        seen["block"] = (args[0] if args else kwargs["hidden_states"], out[0] if isinstance(out, tuple) else out)
        raise _Stop

    def attn_out(mod, args, out):  # the attention's own output (BLOOM's attention module adds the residual)
        seen["attn_out"] = out.clone()

    handles = [m.register_forward_hook(record(k), with_kwargs=True) for k, m in parts.items()]
    handles.append(arch.module(b.attn.o).register_forward_hook(attn_out))
    handles.append(block.register_forward_hook(stop, with_kwargs=True))
    ids = _run(model, arch, handles)
    ran = [k for k in order if k not in ("attn", "mlp_in", "mlp")]
    if "block" not in seen or len(order) != 3 + len(norms) or sorted(ran) != sorted(b.norms):
        raise UnsupportedModelError(f"fused export: could not follow block {b.name} of {type(model).__name__} "
                                    f"(ran: {', '.join(order) or 'nothing'})")
    wiring = _wiring(order, seen)
    pre_norm = bool(wiring and wiring["pre"][0] and (wiring["pre"][1] or wiring["parallel"])
                    and not any(wiring["post"]) and wiring["residual_scale"] == 1.0)  # what GPT-2 / NeoX take
    if wiring is None or not (post_norms or pre_norm):
        if post_norms:
            raise UnsupportedModelError(f"fused export: block {b.name} is not wired x + post(attn(pre(x))), then + "
                                        "post(mlp(pre(.))) (each norm there or not), nor x + attn(norm_1(x)) + "
                                        "mlp(norm_2(x)): it has steps the writer does not write (multipliers, "
                                        "norms elsewhere)")
        raise UnsupportedModelError(f"fused export: block {b.name} is not wired x + attn(norm(x)), then + "
                                    "mlp(norm(.)), nor x + attn(norm_1(x)) + mlp(norm_2(x)) (post-norms or extra "
                                    "steps); the writer takes pre-norm blocks")
    with torch.no_grad():  # the rows of the table the graph's Gather reads (a module may scale them: Gemma 3)
        tokens = torch.nn.functional.embedding(ids, arch.module(arch.embedding).weight)
    return {"ids": ids, "x": seen["block"][0], "tokens": tokens, **wiring,
            "norms": list(dict.fromkeys(n for n in wiring["pre"] if n))}


def _wiring(order: list[str], seen: dict) -> dict | None:
    """How block 0 wires what ran in `order` (seen: key -> (input, output); "block": the block's), as
    probe_block returns it: {"pre", "post", "parallel"}; None for anything else. Norms run before the
    attention (its pre-norm), between it and the MLP (the attention's post-norm, the one reading the
    attention's output, and / or the MLP's pre-norm) or after the MLP (its post-norm)."""
    def same(u, v):
        return u.numel() == v.numel() and _close(u.reshape(-1, u.shape[-1]), v.reshape(-1, v.shape[-1]))

    attn, mlp_in = order.index("attn"), order.index("mlp_in")
    before, between, after = order[:attn], order[attn + 1:mlp_in], order[mlp_in + 2:]
    if len(before) == 2 and not between:  # both sublayers' norms first (Falcon-40B's ln_attn, ln_mlp): parallel
        before, between = before[:1], before[1:]
    if order.index("mlp") != mlp_in + 1 or len(before) > 1 or len(between) > 2 or len(after) > 1:
        return None
    x, out = seen["block"]
    a, m = seen.get("attn_out", seen["attn"][1]), seen["mlp"][1]
    post_attn = next((n for n in between[:1] if same(seen[n][0], a)), None)
    pre_mlp = [n for n in between if n != post_attn]
    if len(pre_mlp) > 1 or m.numel() != a.numel():
        return None
    pre = (before[0] if before else None, pre_mlp[0] if pre_mlp else None)
    post = (post_attn, after[0] if after else None)

    def output(norm, default):  # a norm's output, or `default` where there is no norm
        return seen[norm][1] if norm else default

    a_in = output(pre[0], x)
    if not (same(seen["attn"][0], a_in) and (pre[0] is None or same(seen[pre[0]][0], x))
            and (post[1] is None or same(seen[post[1]][0], m))):
        return None
    a, m = output(post[0], a), output(post[1], m).reshape(a.shape)
    # Granite's residual_multiplier: x + r * attention, + r * MLP (1 where the sum is plain, to the model's
    # precision: half-precision rounding alone moves a least-squares r by 1e-4)
    r = 1.0 if same(out, x + a + m) else fit_scale(out - x, a + m)
    a, m = r * a, r * m
    for parallel in (False, True):  # parallel: the MLP reads the block's input (normed), not x + attention
        h = x if parallel else x + a
        m_in = output(pre[1], a_in if parallel else h)  # parallel with one shared norm: the attention's input
        if (same(seen["mlp_in"][0], m_in) and (pre[1] is None or same(seen[pre[1]][0], h))
                and same(out, x + a + m) and not (parallel and any(post))):
            return {"pre": pre, "post": post, "parallel": parallel, "residual_scale": r}
    return None


def fit_scale(y: torch.Tensor, x: torch.Tensor) -> float:
    """The scalar r with y ~ r * x (least squares; 1.0 for an x of zeros)."""
    y, x = y.double().flatten(), x.double().flatten()
    return float(y @ x / (x @ x)) if float(x @ x) else 1.0


def embedding_norm(arch, probe: dict) -> str | None:
    """The norm outside the blocks that block 0's input comes out of (BLOOM's word_embeddings_layernorm), None
    where there is none."""
    with torch.no_grad():
        return next((n for n in arch.outer_norms() if _close(arch.module(n)(probe["tokens"]), probe["x"])), None)


def check_outside_blocks(model, arch, writer: str, embed_norm: str | None = None) -> str:
    """What every writer takes outside the blocks: an nn.Linear head, one final norm besides `embed_norm` (a
    norm of the embeddings, if the writer takes one), and no other projection (OPT's project_in / project_out:
    a width the writers do not carry). Returns the final norm's name."""
    head = arch.module(arch.head) if arch.head else None
    if head is None or not _is_linear(head):
        raise UnsupportedModelError(f"fused export: the output head must be an nn.Linear, not "
                                    f"{type(head).__name__ if head is not None else 'missing'}")
    if len(finals := [n for n in arch.outer_norms() if n != embed_norm]) != 1:
        raise UnsupportedModelError(f"fused export: the {writer} writer takes one final norm outside the blocks, "
                                    f"found {finals or 'none'}")
    outside = [n for n, m in model.named_modules() if _is_linear(m) and n != arch.head
               and not n.startswith(arch.layers_name + ".")]
    if outside:
        raise UnsupportedModelError(f"fused export: the {writer} writer takes no projection outside the blocks but "
                                    f"the LM head; found {', '.join(outside)}")
    return finals[0]


def refuse_head_norms(b, writer: str) -> None:
    """Per-head q / k norms (Qwen3's, Phi's qk_layernorm): only the Llama writer writes them."""
    if b.attn.q_norm or b.attn.k_norm:
        raise UnsupportedModelError(f"fused export: {b.attn.q_norm or b.attn.k_norm} normalizes queries / keys per "
                                    f"head, which the {writer} writer does not write")


def block_norms(arch, b, probe: dict, which: str = "norms") -> list:
    """Block b's norm modules for probe_block's `which` of block 0 ("norms", "pre" or "post"; None stays
    None); refused where b's norms differ from block 0's."""
    def here(name):
        return f"{b.name}{name[len(arch.blocks[0].name):]}"

    if sorted(here(n) for n in {*probe["pre"], *probe["post"]} if n) != sorted(b.norms):
        raise UnsupportedModelError(f"fused export: block {b.name}'s norms {b.norms} differ from block 0's")
    return [arch.module(here(n)) if n else None for n in probe[which]]


def refuse_parallel(probe: dict, writer: str) -> None:
    if probe["parallel"]:
        raise UnsupportedModelError(f"fused export: block 0 adds attention and MLP of the same input (a parallel "
                                    f"residual); the {writer} writer takes sequential blocks")


def rms_norm(g: _Graph, norm, pending: str | None, residual: str, name: str, last: bool = False):
    """RMSNorm of residual + pending: (normed, the new residual). The first norm has nothing pending; the
    last one's sum is not needed."""
    w, eps = rms_weight(norm, name)
    weight = g.const(_param(name) + ".weight", w)
    if pending is None:
        return g.op("SimplifiedLayerNormalization", [residual, weight], f"{name}/LayerNorm", axis=-1, epsilon=eps,
                    stash_type=1), residual
    outs = [f"{name}/output_0"] if last else [f"{name}/output_0", "", "", f"{name}/output_3"]  # 3: the sum
    y = g.op("SkipSimplifiedLayerNormalization", [pending, residual, weight], f"{name}/SkipLayerNorm", outputs=outs,
             domain=MS, epsilon=eps)
    return (y, None) if last else (y[0], y[3])


def layer_norm(g: _Graph, norm, pending: str | None, residual: str, name: str, bias: str | None = None,
               last: bool = False, params: tuple | None = None):
    """LayerNorm (with beta) of residual + pending (+ `bias`, the bias of the projection that wrote pending):
    one SkipLayerNormalization, (normed, the new residual). `residual` may be [S, hidden], broadcast over the
    batch (GPT-2's position embeddings). Nothing pending: a LayerNormalization of `residual` (itself returned).
    `params`: layer_norm_params(norm), where the caller has them."""
    params = params or layer_norm_params(norm)
    if params is None:
        raise UnsupportedModelError(f"fused export: {name} is a {type(norm).__name__}; the writer takes a LayerNorm "
                                    "(x - mean) / std (* weight) (+ bias)")
    param = _param(name)
    weight, beta, eps = params
    gamma = g.const(param + ".weight", weight)
    beta = g.const(param + ".bias", beta)
    if pending is None:
        return g.op("LayerNormalization", [residual, gamma, beta], f"{name}/LayerNorm", axis=-1,
                    epsilon=eps), residual
    outs = [f"{name}/output_0"] if last else [f"{name}/output_0", "", "", f"{name}/output_3"]  # 3: the sum
    y = g.op("SkipLayerNormalization", [pending, residual, gamma, beta] + ([bias] if bias else []),
             f"{name}/SkipLayerNorm", outputs=outs, domain=MS, epsilon=eps)
    return (y, None) if last else (y[0], y[3])


def _eps(norm):
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", None))


def _layer_norm_params(norm) -> tuple[np.ndarray, np.ndarray, float]:
    """(weight, bias, epsilon) of a LayerNorm: ones / zeros where it has none (OLMo's has neither, nor an eps
    attribute: its epsilon is measured, see _measured_eps)."""
    w = getattr(norm, "weight", None)
    width = w.shape[0] if w is not None else norm.normalized_shape[-1]
    weight = _np(w) if w is not None else np.ones(width, np.float32)
    bias = _np(norm.bias) if getattr(norm, "bias", None) is not None else np.zeros(width, np.float32)
    eps = _eps(norm)
    return weight, bias, float(eps if isinstance(eps, float | int) else _measured_eps(norm, weight, bias))


def _measured_eps(norm, weight: np.ndarray, bias: np.ndarray) -> float:
    """The epsilon of a norm that does not say it: on a row of +-a (variance a^2) (y - bias) / weight =
    x / sqrt(a^2 + eps), so eps = (x / that)^2 - a^2, read to two significant digits with a^2 no more than 1000
    x eps (a = 1e-3 for 1e-5; smaller for BERT's 1e-12); a norm of another kind then fails layer_norm_params'
    comparison."""
    k = int(np.argmax(np.abs(weight)))  # a channel the weight does not zero
    for a in (1e-3, 1e-5, 1e-7):
        x = torch.full((1, weight.shape[0]), a)
        x[:, 1::2] = -a
        x = x - x.mean()
        with torch.no_grad():
            y = norm(_like(x, norm)).double().cpu()[0]
        normed = (y[k] - float(bias[k])) / float(weight[k])
        eps = float((x[0, k].double() / normed) ** 2 - x.double().pow(2).mean())
        if eps > 1e-3 * a * a:
            return float(f"{eps:.2g}")
    return 0.0


def _like(x: torch.Tensor, norm) -> torch.Tensor:
    """x on the device and in the dtype of `norm`'s parameters (as it is where it has none)."""
    p = next(norm.parameters(), None)
    return x if p is None else x.to(p)


def layer_norm_params(norm) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(gain, bias, epsilon) of a norm computing (x - mean) / sqrt(var + eps) * gain (+ bias), found by running it:
    nn.LayerNorm, or a class of a family's own (Cohere's LayerNorm without a bias; OLMo's without weights;
    Nemotron's LayerNorm1P, whose weight is gain - 1); None for any other norm."""
    w = getattr(norm, "weight", None)
    if w is None and not isinstance(getattr(norm, "normalized_shape", None), tuple):
        return None
    if w is not None and (not isinstance(w, torch.Tensor) or w.dim() != 1):
        return None
    weight, bias, eps = _layer_norm_params(norm)
    x = _like(torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(0)), norm)
    with torch.no_grad():
        y = norm(x)
    for gain in (weight, 1 + weight):
        want = torch.nn.functional.layer_norm(x.float().cpu(), (weight.shape[0],), torch.from_numpy(gain),
                                              torch.from_numpy(bias), eps)
        if _close(y.cpu(), want.to(y.dtype)):
            return gain, bias, eps
    return None


def is_layer_norm(norm) -> bool:
    return layer_norm_params(norm) is not None


def save(g: _Graph, inputs: list, outputs: list, out: Path, *, block_prefix: str, layers: int, **figures) -> dict:
    """Write the model (weights in out + '.data'); its figures: nodes, ops, the most nodes in one block (node
    names '{block_prefix}{i}/...'), initializer bytes, plus `figures`."""
    graph = helper.make_graph(g.nodes, "fused_decoder", inputs, outputs, g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name="compress.fused")
    proto.ir_version = 10  # what onnxruntime >= 1.16 reads, whatever IR the installed onnx writes
    helper.set_model_props(proto, {GRAPH_KEY: "fused", LENGTH_KEY: str(figures["cache_length"]), **(
        {LONGROPE_KEY: str(figures["longrope_short_positions"])} if figures.get("longrope_short_positions") else {})})
    ops = Counter(n.op_type for n in g.nodes)
    per_block = Counter(n.name[len(block_prefix):].split("/")[0] for n in g.nodes if n.name.startswith(block_prefix))
    result = {"path": str(out), "nodes": len(g.nodes), "ops": dict(sorted(ops.items())), "layers": layers,
              "max_nodes_per_block": max(per_block.values(), default=0), **figures,
              "initializer_bytes": sum(len(t.raw_data) for t in g.inits)}
    data = out.with_name(out.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save(proto, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=1024)
    return result
