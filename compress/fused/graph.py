"""What the fused decoder writers (llama.py, gpt2.py) share: the node / initializer list, projections read from
the modules (nn.Linear, GPT-2's Conv1D, low-rank `.first` / `.second` pairs), the norms with the residual
carried by the Skip* contrib ops, the attention-mask arithmetic GroupQueryAttention reads, the KV cache
inputs / outputs (the convention compress.edge's loops rely on) and the saving of the model with its figures.

KV cache convention (both writers): inputs past_key_values.{i}.key / .value and outputs present.{i}.key /
.value, BNSH [batch_size, kv heads, past_sequence_length / present_sequence_length, head_dim], fp32; the
model metadata `compress.graph: fused` tells compress.edge to run the graph with past and present bound to
one buffer per layer."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import UnsupportedModelError

MS = "com.microsoft"
GRAPH_KEY = "compress.graph"  # model metadata naming the writer; compress.edge reads it


def _np(t) -> np.ndarray:
    return t.detach().to("cpu").float().numpy()


def _is_conv1d(m) -> bool:
    """GPT-2's Conv1D: a linear layer whose weight is stored [in, out]."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and m.weight.dim() == 2


def _is_linear(m) -> bool:
    return (type(m).__name__ == "Linear" and m.weight.dim() == 2) or _is_conv1d(m)


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

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "",
           **attrs):
        outs = [f"{name}/output_{k}" for k in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def linear(self, x: str, modules: list, name: str, *, keep_bias: bool = False):
        """x @ [W_1; W_2; ...]^T (+ bias): one MatMul for plain Linears / Conv1Ds sharing an input, two for a
        low-rank one. With `keep_bias` the bias is not added but returned, (y, bias name or None), for an op
        that takes a bias input (SkipLayerNormalization, FastGelu)."""
        if len(modules) == 1 and _is_lowrank(modules[0]):
            x = self.linear(x, [modules[0].first], f"{name}/first")
            return self.linear(x, [modules[0].second], f"{name}/second", keep_bias=keep_bias)
        for m in modules:
            if not _is_linear(m):
                raise UnsupportedModelError(f"fused export: {name} is a {type(m).__name__}; only nn.Linear, "
                                            "Conv1D and LowRankLinear (.first / .second) projections are "
                                            "supported")
        weight = np.concatenate([_in_out(m) for m in modules], axis=1)
        param = _param(name)
        y = self.op("MatMul", [x, self.const(f"{param}.weight", weight)], f"{name}/MatMul")
        bias = None
        if any(m.bias is not None for m in modules):
            bias = self.const(f"{param}.bias", np.concatenate(
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
    """The graph inputs and outputs before the KV cache (see kv_io)."""
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", "total_sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", vocab])]
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


def lm_head(g: _Graph, x: str, head, table: str, tied: bool, name: str = "/lm_head") -> None:
    """logits: a tied head multiplies by the Transpose of the embedding table (stored once: ONNX Runtime folds
    the Transpose at session start, the int8 quantizer makes the pair GatherBlockQuantized + MatMulNBits)."""
    if tied:
        table_t = g.op("Transpose", [table], f"{name}/Transpose", perm=[1, 0])
        g.op("MatMul", [x, table_t], f"{name}/MatMul", outputs=["logits"])
    else:
        g.linear(x, [head], name)
        g.nodes[-1].output[0] = "logits"  # the last node writes the graph output


def rms_norm(g: _Graph, norm, pending: str | None, residual: str, name: str, last: bool = False):
    """RMSNorm of residual + pending: (normed, the new residual). The first norm has nothing pending; the
    last one's sum is not needed."""
    weight = g.const(_param(name) + ".weight", _np(norm.weight))
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    if pending is None:
        return g.op("SimplifiedLayerNormalization", [residual, weight], f"{name}/LayerNorm", axis=-1, epsilon=eps,
                    stash_type=1), residual
    outs = [f"{name}/output_0"] if last else [f"{name}/output_0", "", "", f"{name}/output_3"]  # 3: the sum
    y = g.op("SkipSimplifiedLayerNormalization", [pending, residual, weight], f"{name}/SkipLayerNorm", outputs=outs,
             domain=MS, epsilon=eps)
    return (y, None) if last else (y[0], y[3])


def layer_norm(g: _Graph, norm, pending: str, residual: str, name: str, bias: str | None = None,
               last: bool = False):
    """LayerNorm (with beta) of residual + pending (+ `bias`, the bias of the projection that wrote pending):
    one SkipLayerNormalization, (normed, the new residual). `residual` may be [S, hidden], broadcast over the
    batch (GPT-2's position embeddings)."""
    if type(norm).__name__ != "LayerNorm" or norm.weight is None or norm.weight.dim() != 1:
        raise UnsupportedModelError(f"fused export: {name} is a {type(norm).__name__}; only nn.LayerNorm with "
                                    "elementwise affine weights is supported")
    param = _param(name)
    gamma = g.const(param + ".weight", _np(norm.weight))
    beta = g.const(param + ".bias", _np(norm.bias) if norm.bias is not None else
                   np.zeros(norm.weight.shape[0], np.float32))
    outs = [f"{name}/output_0"] if last else [f"{name}/output_0", "", "", f"{name}/output_3"]  # 3: the sum
    y = g.op("SkipLayerNormalization", [pending, residual, gamma, beta] + ([bias] if bias else []),
             f"{name}/SkipLayerNorm", outputs=outs, domain=MS, epsilon=float(norm.eps))
    return (y, None) if last else (y[0], y[3])


def save(g: _Graph, inputs: list, outputs: list, out: Path, *, block_prefix: str, layers: int, **figures) -> dict:
    """Write the model (weights in out + '.data'); its figures: nodes, ops, the most nodes in one block (node
    names '{block_prefix}{i}/...'), initializer bytes, plus `figures`."""
    graph = helper.make_graph(g.nodes, "fused_decoder", inputs, outputs, g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)],
                              producer_name="compress.fused")
    proto.ir_version = 10  # what onnxruntime >= 1.16 reads, whatever IR the installed onnx writes
    helper.set_model_props(proto, {GRAPH_KEY: "fused"})
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
