"""An op-by-op ONNX writer for Llama-family decoders (Llama incl. SmolLM2, GQA or MHA; Mistral; Qwen2; Qwen3),
fp32. (GPT-2 has its own writer, gpt2.py; what both share is in graph.py.)

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
to GroupQueryAttention unpacked) all export. A bias adds one Add node. Qwen3's per-head q_norm / k_norm add
7 nodes per block: the packed QKV output is Split, and Q and K each go through Reshape [B, S, heads, head_dim]
(a constant shape, no shape arithmetic), SimplifiedLayerNormalization and Reshape back before GQA.

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
  the kernel writes the new keys / values in place at seqlens_k (compress.edge's loop for these graphs);
- local_window_size W: a query at position p attends keys p - W + 1 .. p (W keys, itself included), which is
  Hugging Face's sliding window (kv_idx > q_idx - sliding_window). So Mistral's sliding_window and Qwen2's
  (use_sliding_window: per layer, from max_window_layers on) are written as it; -1 is full attention.

Not supported yet (refused with UnsupportedModelError): sequence-length dependent rope types (dynamic,
longrope), activations other than SiLU, non-Linear modules (quantized layers,
low-rank embeddings), fp16/bf16 graphs."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UnsupportedModelError
from .graph import (MS, _Graph, _is_linear, _np, _out_features, io_info, is_tied, kv_io, lm_head, mask_lengths,
                    output_file, rms_norm, save)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # cos/sin do not depend on the sequence length


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


def _window(model, attn) -> int | None:
    """Layer's sliding window (keys a query sees, itself included), None for full attention. Qwen2 keeps it
    per layer on the attention module (layers below max_window_layers have none), Mistral in the config."""
    window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(model.config, "sliding_window", None)
    return int(window) if window else None


def _check(model) -> None:
    cfg = model.config
    if cfg.model_type not in FAMILIES:
        raise UnsupportedModelError(f"fused export supports {', '.join(FAMILIES)} decoders and gpt2, not "
                                    f"{cfg.model_type!r} ({type(model).__name__})")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"fused export: activation {cfg.hidden_act!r} is not supported (only silu)")
    if type(model.model.embed_tokens).__name__ != "Embedding" or not _is_linear(model.lm_head):
        raise UnsupportedModelError("fused export: the embedding must be an nn.Embedding and lm_head an nn.Linear")


def build_llama(model, path: Path, *, max_length: int | None = None) -> dict:
    """Write `model` (a Llama / Mistral / Qwen2 / Qwen3 ForCausalLM, torch) as `path`/model.onnx (+ .data).

    `path` is a folder, or a file name ending in .onnx. `max_length` bounds prompt + generated tokens (the
    rotary cache length; default config.max_position_embeddings). Returns figures of the graph."""
    _check(model)
    out = output_file(path)
    cfg, layers = model.config, model.model.layers
    g = _Graph()
    inputs, outputs = io_info(model.lm_head.out_features)
    seqlens_k, total_len, _ = mask_lengths(g)  # once for all layers

    # embedding; a tied LM head reads the same [vocab, hidden] table through a Transpose (see the docstring)
    embed, head = model.model.embed_tokens, model.lm_head
    tied = is_tied(head, embed)
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
    windows = []
    heads_view = flat = None  # Qwen3's per-head norms: [B, S, heads * head_dim] <-> [B, S, heads, head_dim]
    for i, layer in enumerate(layers):
        p, attn, mlp = f"/model/layers.{i}", layer.self_attn, layer.mlp
        n_q, n_kv = _out_features(attn.q_proj) // head_dim, _out_features(attn.k_proj) // head_dim
        if n_q % n_kv or head_dim % 16:
            raise UnsupportedModelError(f"fused export: layer {i} has {n_q} heads, {n_kv} KV heads, head_dim "
                                        f"{head_dim}; GroupQueryAttention needs heads % kv_heads == 0 and "
                                        "head_dim % 16 == 0")
        window = _window(model, attn)
        windows.append(window)
        x, residual = rms_norm(g, layer.input_layernorm, pending, residual, f"{p}/input_layernorm")

        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        packed = all(_is_linear(m) for m in qkv)
        if packed and not hasattr(attn, "q_norm"):  # packed: query carries Q, K and V, key / value stay empty
            qkv_in = [g.linear(x, qkv, f"{p}/attn/qkv_proj"), "", ""]
        elif packed:  # Qwen3: one MatMul, split to norm Q and K per head
            sizes = g.const(f"model.layers.{i}.attn.qkv_proj.split_sizes",
                            np.array([n_q * head_dim, n_kv * head_dim, n_kv * head_dim], np.int64))
            qkv_in = g.op("Split", [g.linear(x, qkv, f"{p}/attn/qkv_proj"), sizes], f"{p}/attn/qkv_proj/Split",
                          outputs=3, axis=-1)
        else:
            qkv_in = [g.linear(x, [m], f"{p}/attn/{n}") for m, n in zip(qkv, ("q_proj", "k_proj", "v_proj"))]
        if hasattr(attn, "q_norm"):  # RMSNorm over each head's head_dim before the rotary embedding
            if heads_view is None:
                heads_view = g.const(f"/model/constants/INT64/[0, 0, -1, {head_dim}]",
                                     np.array([0, 0, -1, head_dim], np.int64))
                flat = g.const("/model/constants/INT64/[0, 0, -1]", np.array([0, 0, -1], np.int64))
            qkv_in = [_head_norm(g, attn.q_norm, qkv_in[0], heads_view, flat, f"{p}/attn/q_norm"),
                      _head_norm(g, attn.k_norm, qkv_in[1], heads_view, flat, f"{p}/attn/k_norm"), qkv_in[2]]
        past, present = kv_io(inputs, outputs, i, n_kv, head_dim)
        y = g.op("GroupQueryAttention", qkv_in + past + [seqlens_k, total_len, cos, sin], f"{p}/attn/GQA",
                 outputs=[f"{p}/attn/GQA/output_0", *present], domain=MS, num_heads=n_q, kv_num_heads=n_kv,
                 scale=float(attn.scaling), do_rotary=1, rotary_interleaved=0,
                 local_window_size=window or -1)[0]
        y = g.linear(y, [attn.o_proj], f"{p}/attn/o_proj")

        x, residual = rms_norm(g, layer.post_attention_layernorm, y, residual, f"{p}/post_attention_layernorm")
        gate, up = g.linear(x, [mlp.gate_proj], f"{p}/mlp/gate_proj"), g.linear(x, [mlp.up_proj], f"{p}/mlp/up_proj")
        silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{p}/mlp/act/Sigmoid")], f"{p}/mlp/act/Mul")
        pending = g.linear(g.op("Mul", [silu, up], f"{p}/mlp/Mul"), [mlp.down_proj], f"{p}/mlp/down_proj")

    x, _ = rms_norm(g, model.model.norm, pending, residual, "/model/norm", last=True)
    lm_head(g, x, head, table, tied)
    return save(g, inputs, outputs, out, block_prefix="/model/layers.", layers=len(layers), tied_embeddings=tied,
                cache_length=cache_length, sliding_windows=sorted({w for w in windows if w}))


def _head_norm(g: _Graph, norm, x: str, heads_view: str, flat: str, name: str) -> str:
    """Qwen3's q_norm / k_norm: RMSNorm of every head's [head_dim] slice (Reshape, norm, Reshape back)."""
    if not type(norm).__name__.endswith("RMSNorm") or norm.weight.dim() != 1:
        raise UnsupportedModelError(f"fused export: {name} is a {type(norm).__name__}; only an RMSNorm per head")
    y = rms_norm(g, norm, None, g.op("Reshape", [x, heads_view], f"{name}/Reshape"), name)[0]
    return g.op("Reshape", [y, flat], f"{name}/Reshape_1")
