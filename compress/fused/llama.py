"""An op-by-op ONNX writer for Llama-family decoders (Llama incl. SmolLM2, GQA or MHA; Qwen2), fp32.

optimum's exporter traces the model and leaves ~7,400 nodes for SmolLM2-135M, most of them Shape / Gather /
Concat / Unsqueeze arithmetic that ONNX Runtime recomputes every decode step. Like onnxruntime-genai's model
builder, this writes the graph by hand from the module tree, with ONNX Runtime's fused contrib ops:

    attention_mask -> ReduceSum -> Sub 1 -> Cast int32      = seqlens_k            (once, shared by all layers)
    attention_mask -> Shape[1:2] -> Cast int32               = total_sequence_length
    input_ids -> Gather (embedding)
    per block (11 nodes when Q/K/V and the MLP are plain bias-free Linears):
        SkipSimplifiedLayerNormalization (adds the previous block's output to the residual; plain in block 0)
        -> packed QKV MatMul -> GroupQueryAttention (rotary inside) -> o_proj MatMul
        -> SkipSimplifiedLayerNormalization -> gate, up MatMul -> Sigmoid, Mul (SiLU)
        -> Mul -> down MatMul
    SkipSimplifiedLayerNormalization -> lm_head MatMul -> logits

Every width is read from the modules themselves, so depth-pruned models, per-layer MLP widths, per-layer head
counts and low-rank factorized projections (`.first` / `.second` Linears: two MatMuls, and then Q/K/V are fed
to GroupQueryAttention unpacked) all export. A bias adds one Add node.

Tied embeddings are stored once, as the [vocab, hidden] table the Gather reads; the LM head multiplies by its
Transpose. In fp32 ONNX Runtime folds that Transpose into a second constant when the session starts; the int8
quantizer (compress/quant/ort.py) turns the pair into GatherBlockQuantized + MatMulNBits over one int8 table.

The graph is marked `compress.graph: fused` in its metadata: compress.edge then runs it with past and present
sharing one preallocated buffer per layer (GroupQueryAttention writes the new keys / values in place).

GroupQueryAttention on the CPU execution provider (onnxruntime 1.31), constraints the writer checks or relies on:
- fp32 is supported (T = float); seqlens_k is int32 [batch] = total length - 1, total_sequence_length an int32
  scalar (or 1-element vector);
- num_heads must be a multiple of kv_num_heads, head_size a multiple of 16 with rotary (cos/sin caches are
  [cache_length, head_size / 2], and cache_length must be >= the total sequence length);
- positions come from seqlens_k: 0..S-1 for a prompt (sequence_length == total length), seqlens_k for a
  one-token step. So prompts are assumed right-padded (or unpadded); left padding as used by Hugging Face's
  batched generate gives wrong positions. A prompt continued on a past (S > 1 with past) needs batch 1;
- past_key / past_value are BNSH [batch, kv_heads, past_len, head_size]. Without a shared buffer the present
  has the total length and is fed back as the next past (compress.edge's plain loop). When past and present
  are bound to the same buffer (IO binding) of capacity C >= the total length, the present has length C and
  the kernel writes the new keys / values in place at seqlens_k (compress.edge's loop for these graphs).

Not supported yet (refused with UnsupportedModelError): sequence-length dependent rope types (dynamic,
longrope), sliding-window attention, activations other than SiLU, non-Linear modules (quantized layers,
low-rank embeddings), fp16/bf16 graphs."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import UnsupportedModelError

FAMILIES = ("llama", "qwen2")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # cos/sin do not depend on the sequence length
MS = "com.microsoft"
GRAPH_KEY = "compress.graph"  # model metadata naming the writer; compress.edge reads it


def _np(t) -> np.ndarray:
    return t.detach().to("cpu").float().numpy()


def _is_linear(m) -> bool:
    return type(m).__name__ == "Linear" and m.weight.dim() == 2


def _is_lowrank(m) -> bool:
    return hasattr(m, "first") and hasattr(m, "second") and _is_linear(m.first) and _is_linear(m.second)


def _out_features(m) -> int:
    return m.second.out_features if _is_lowrank(m) else m.out_features


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

    def linear(self, x: str, modules: list, name: str) -> str:
        """x @ [W_1; W_2; ...]^T (+ bias): one MatMul for plain Linears sharing an input, two for a low-rank one."""
        if len(modules) == 1 and _is_lowrank(modules[0]):
            x = self.linear(x, [modules[0].first], f"{name}/first")
            return self.linear(x, [modules[0].second], f"{name}/second")
        for m in modules:
            if not _is_linear(m):
                raise UnsupportedModelError(f"fused export: {name} is a {type(m).__name__}; only nn.Linear and "
                                            "LowRankLinear (.first / .second) projections are supported")
        weight = np.concatenate([_np(m.weight) for m in modules], axis=0).T  # MatMul wants [in, out]
        param = name.lstrip("/").replace("/", ".")  # /model/layers.0/mlp/up_proj -> model.layers.0.mlp.up_proj
        y = self.op("MatMul", [x, self.const(f"{param}.weight", weight)], f"{name}/MatMul")
        if any(m.bias is not None for m in modules):
            bias = np.concatenate([_np(m.bias) if m.bias is not None else np.zeros(m.out_features, np.float32)
                                   for m in modules])
            y = self.op("Add", [y, self.const(f"{param}.bias", bias)], f"{name}/Add")
        return y


def _rope_caches(model, length: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos / sin [length, head_dim / 2] from the model's own inv_freq (rope_scaling already applied)."""
    rotary = model.model.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in STATIC_ROPE:
        raise UnsupportedModelError(f"fused export: rope type {rope_type!r} is not supported (its cos/sin depend "
                                    f"on the sequence length); supported: {', '.join(STATIC_ROPE)}")
    inv_freq = _np(rotary.inv_freq)
    if inv_freq.shape[0] * 2 != head_dim:
        raise UnsupportedModelError("fused export: partial rotary embeddings are not supported")
    freqs = np.outer(np.arange(length, dtype=np.float32), inv_freq)  # fp32 like transformers
    scale = np.float32(getattr(rotary, "attention_scaling", 1.0))  # yarn scales cos and sin
    return np.cos(freqs) * scale, np.sin(freqs) * scale


def _check(model) -> None:
    cfg = model.config
    if cfg.model_type not in FAMILIES:
        raise UnsupportedModelError(f"fused export supports {', '.join(FAMILIES)} decoders, not "
                                    f"{cfg.model_type!r} ({type(model).__name__})")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"fused export: activation {cfg.hidden_act!r} is not supported (only silu)")
    for i, layer in enumerate(model.model.layers):
        if getattr(layer.self_attn, "sliding_window", None):
            raise UnsupportedModelError(f"fused export: layer {i} uses sliding-window attention (not supported)")
    if type(model.model.embed_tokens).__name__ != "Embedding" or not _is_linear(model.lm_head):
        raise UnsupportedModelError("fused export: the embedding must be an nn.Embedding and lm_head an nn.Linear")


def build_llama(model, path: Path, *, max_length: int | None = None) -> dict:
    """Write `model` (a Llama / Qwen2 ForCausalLM, torch) as `path`/model.onnx (+ model.onnx.data).

    `path` is a folder, or a file name ending in .onnx. `max_length` bounds prompt + generated tokens (the
    rotary cache length; default config.max_position_embeddings). Returns figures of the graph."""
    _check(model)
    path = Path(path)
    out = path if path.suffix == ".onnx" else path / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg, layers = model.config, model.model.layers
    g = _Graph()
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", "total_sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             ["batch_size", "sequence_length", model.lm_head.out_features])]

    # seqlens_k and total_sequence_length, once for all layers
    one = g.const("/model/constants/INT64/[1]", np.array([1], np.int64))
    n_tokens = g.op("ReduceSum", ["attention_mask", one], "/model/attn_mask/ReduceSum", keepdims=0)
    seqlens_k = g.op("Cast", [g.op("Sub", [n_tokens, one], "/model/attn_mask/Sub")], "/model/attn_mask/Sub/Cast",
                     to=TensorProto.INT32)
    total_len = g.op("Cast", [g.op("Shape", ["attention_mask"], "/model/attn_mask/Shape", start=1, end=2)],
                     "/model/attn_mask/Shape/Cast", to=TensorProto.INT32)

    # embedding; a tied LM head reads the same [vocab, hidden] table through a Transpose (see the docstring)
    embed, head = model.model.embed_tokens, model.lm_head
    tied = head.weight.data_ptr() == embed.weight.data_ptr() and head.bias is None
    table = g.const("model.embed_tokens.weight", _np(embed.weight))
    x = g.op("Gather", [table, "input_ids"], "/model/embed_tokens/Gather", axis=0)

    head_dims = {layer.self_attn.head_dim for layer in layers}
    if len(head_dims) > 1:
        raise UnsupportedModelError(f"fused export: layers differ in head_dim {sorted(head_dims)}")
    head_dim = head_dims.pop() if head_dims else cfg.hidden_size // cfg.num_attention_heads
    cache_length = max_length or cfg.max_position_embeddings
    cos, sin = _rope_caches(model, cache_length, head_dim)
    cos, sin = g.const("cos_cache", cos), g.const("sin_cache", sin)

    residual, pending = x, None  # pending: the last block's output, added to residual by the next Skip norm
    for i, layer in enumerate(layers):
        p, attn, mlp = f"/model/layers.{i}", layer.self_attn, layer.mlp
        n_q, n_kv = _out_features(attn.q_proj) // head_dim, _out_features(attn.k_proj) // head_dim
        if n_q % n_kv or head_dim % 16:
            raise UnsupportedModelError(f"fused export: layer {i} has {n_q} heads, {n_kv} KV heads, head_dim "
                                        f"{head_dim}; GroupQueryAttention needs heads % kv_heads == 0 and "
                                        "head_dim % 16 == 0")
        x, residual = _norm(g, layer.input_layernorm, pending, residual, f"{p}/input_layernorm")

        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        if all(_is_linear(m) for m in qkv):  # packed: query carries Q, K and V, key / value stay empty
            qkv_in = [g.linear(x, qkv, f"{p}/attn/qkv_proj"), "", ""]
        else:
            qkv_in = [g.linear(x, [m], f"{p}/attn/{n}") for m, n in zip(qkv, ("q_proj", "k_proj", "v_proj"))]
        past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        present = [f"present.{i}.key", f"present.{i}.value"]
        inputs += [_kv_info(n, n_kv, "past_sequence_length", head_dim) for n in past]
        outputs += [_kv_info(n, n_kv, "present_sequence_length", head_dim) for n in present]
        y = g.op("GroupQueryAttention", qkv_in + past + [seqlens_k, total_len, cos, sin], f"{p}/attn/GQA",
                 outputs=[f"{p}/attn/GQA/output_0", *present], domain=MS, num_heads=n_q, kv_num_heads=n_kv,
                 scale=float(attn.scaling), do_rotary=1, rotary_interleaved=0, local_window_size=-1)[0]
        y = g.linear(y, [attn.o_proj], f"{p}/attn/o_proj")

        x, residual = _norm(g, layer.post_attention_layernorm, y, residual, f"{p}/post_attention_layernorm")
        gate, up = g.linear(x, [mlp.gate_proj], f"{p}/mlp/gate_proj"), g.linear(x, [mlp.up_proj], f"{p}/mlp/up_proj")
        silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{p}/mlp/act/Sigmoid")], f"{p}/mlp/act/Mul")
        pending = g.linear(g.op("Mul", [silu, up], f"{p}/mlp/Mul"), [mlp.down_proj], f"{p}/mlp/down_proj")

    x, _ = _norm(g, model.model.norm, pending, residual, "/model/norm", last=True)
    if tied:
        table_t = g.op("Transpose", [table], "/lm_head/Transpose", perm=[1, 0])
        g.op("MatMul", [x, table_t], "/lm_head/MatMul", outputs=["logits"])
    else:
        g.linear(x, [head], "/lm_head")
        g.nodes[-1].output[0] = "logits"  # the last node writes the graph output

    graph = helper.make_graph(g.nodes, "fused_decoder", inputs, outputs, g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)],
                              producer_name="compress.fused")
    proto.ir_version = 10  # what onnxruntime >= 1.16 reads, whatever IR the installed onnx writes
    helper.set_model_props(proto, {GRAPH_KEY: "fused"})
    ops = Counter(n.op_type for n in g.nodes)
    per_block = Counter(n.name.split("/")[2] for n in g.nodes if n.name.startswith("/model/layers."))
    figures = {"path": str(out), "nodes": len(g.nodes), "ops": dict(sorted(ops.items())), "layers": len(layers),
               "max_nodes_per_block": max(per_block.values(), default=0), "tied_embeddings": tied,
               "cache_length": cache_length, "initializer_bytes": sum(len(t.raw_data) for t in g.inits)}
    data = out.with_name(out.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save(proto, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=1024)
    return figures


def _kv_info(name: str, heads: int, length: str, head_dim: int):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch_size", heads, length, head_dim])


def _norm(g: _Graph, norm, pending: str | None, residual: str, name: str, last: bool = False):
    """RMSNorm of residual + pending: (normed, the new residual). The first norm has nothing pending; the
    last one's sum is not needed."""
    weight = g.const(name.lstrip("/").replace("/", ".") + ".weight", _np(norm.weight))
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    if pending is None:
        return g.op("SimplifiedLayerNormalization", [residual, weight], f"{name}/LayerNorm", axis=-1, epsilon=eps,
                    stash_type=1), residual
    outs = [f"{name}/output_0"] if last else [f"{name}/output_0", "", "", f"{name}/output_3"]  # 3: the sum
    y = g.op("SkipSimplifiedLayerNormalization", [pending, residual, weight], f"{name}/SkipLayerNorm", outputs=outs,
             domain=MS, epsilon=eps)
    return (y, None) if last else (y[0], y[3])
