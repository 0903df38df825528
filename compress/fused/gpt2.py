"""An op-by-op ONNX writer for GPT-2 decoders (transformers' GPT2LMHeadModel), fp32.

The same approach as llama.py (see its docstring for why), with GPT-2's parts:

    attention_mask -> ReduceSum -> Sub 1 -> Cast int32      = seqlens_k            (once, shared by all layers)
    attention_mask -> Shape[1:2] (-> Cast int32)             = total_sequence_length
    input_ids -> Shape[1:2]; total - that = first position   -> Slice of wpe        = position embeddings [S, hidden]
    input_ids -> Gather (wte)
    per block (9 nodes when c_attn, c_proj, c_fc and c_proj are plain Conv1D / Linear):
        SkipLayerNormalization ln_1 (adds the previous block's MLP output and its c_proj bias to the residual;
        in block 0 the token embeddings to the position embeddings)
        -> packed QKV MatMul (c_attn) -> Add bias -> GroupQueryAttention (no rotary, kv heads = heads)
        -> c_proj MatMul -> SkipLayerNormalization ln_2 (+ the c_proj bias)
        -> c_fc MatMul -> FastGelu (with c_fc's bias; Gelu with a bias for exact "gelu") -> c_proj MatMul
    SkipLayerNormalization ln_f -> lm_head: MatMul by the Transpose of wte (tied) or its own weight

Positions are computed in the graph the way GroupQueryAttention derives its own: total length - S .. total
length - 1, i.e. 0..S-1 for a prompt and total - 1 for a one-token step, the same for every row of the batch.
So, as for the Llama graph, prompts are unpadded (or right-padded); compress.edge refuses padded batches.

Every width is read from the modules: depth-pruned models, per-layer MLP widths, per-layer head counts
(Hugging Face's prune_heads keeps head_dim and shrinks c_attn / c_proj) and low-rank factorized projections
(`.first` / `.second` Linears: two MatMuls; a low-rank c_attn still feeds GroupQueryAttention packed) all export.
The KV cache has the layout and names of the Llama graph (graph.py), so compress.edge's shared-cache loop runs
it unchanged, and compress/quant/ort.py's int8 path turns the MatMuls into MatMulNBits and the tied wte
Gather + Transpose pair into GatherBlockQuantized + MatMulNBits over one int8 table (wpe stays fp32: a Slice
reads it).

GroupQueryAttention on the CPU execution provider without rotary takes head_dim a multiple of 8 (16 with
rotary). Refused with UnsupportedModelError: head_dim not a multiple of 8, a layer without heads,
scale_attn_by_inverse_layer_idx and scale_attn_weights: false (torch's eager attention applies them, its sdpa
attention ignores them: no one result to match), add_cross_attention, activations other than the GELUs,
non-LayerNorm norms, modules other than Conv1D / nn.Linear / LowRankLinear (quantized layers, low-rank
embeddings), fp16/bf16 graphs."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UnsupportedModelError
from .graph import (MS, _Graph, _is_linear, _np, _out_features, io_info, is_tied, kv_io, layer_norm, lm_head,
                    mask_lengths, output_file, save)

# activation_function -> the com.microsoft op (bias input folded in): FastGelu = tanh approximation, BiasGelu = erf
ACTIVATIONS = {"gelu_new": "FastGelu", "gelu_pytorch_tanh": "FastGelu", "gelu_fast": "FastGelu",
               "gelu": "BiasGelu"}
# config flag -> the value the writer refuses. The two scalings: torch's eager attention applies them, its sdpa
# attention does not, so there is no one reference to match. (reorder_and_upcast_attn only changes the order of
# fp32 operations: it exports, with the same logits.)
REFUSED = {"scale_attn_by_inverse_layer_idx": True, "scale_attn_weights": False, "add_cross_attention": True}


def is_gpt2(model) -> bool:
    """GPT-2-shaped: transformer.h blocks whose attention has a packed c_attn."""
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    return blocks is not None and len(blocks) > 0 and hasattr(getattr(blocks[0], "attn", None), "c_attn")


def _check(model) -> None:
    cfg = model.config
    if cfg.model_type != "gpt2" or not hasattr(model, "lm_head"):
        raise UnsupportedModelError(f"fused export: the GPT-2 writer takes GPT2LMHeadModel, not {cfg.model_type!r} "
                                    f"({type(model).__name__})")
    for flag, value in REFUSED.items():
        if bool(getattr(cfg, flag, not value)) == value:
            raise UnsupportedModelError(f"fused export: gpt2 with {flag}={value} is not supported")
    act = getattr(cfg, "activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise UnsupportedModelError(f"fused export: gpt2 activation {act!r} is not supported (supported: "
                                    f"{', '.join(ACTIVATIONS)})")
    t = model.transformer
    if type(t.wte).__name__ != "Embedding" or type(t.wpe).__name__ != "Embedding" or not _is_linear(model.lm_head):
        raise UnsupportedModelError("fused export: gpt2's wte and wpe must be nn.Embedding and lm_head an nn.Linear "
                                    f"(wte is a {type(t.wte).__name__})")
    for i, block in enumerate(t.h):
        if hasattr(block, "crossattention"):
            raise UnsupportedModelError(f"fused export: gpt2 layer {i} has cross-attention (not supported)")


def build_gpt2(model, path: Path, *, max_length: int | None = None) -> dict:
    """Write `model` (a GPT2LMHeadModel, torch) as `path`/model.onnx (+ model.onnx.data).

    `path` is a folder, or a file name ending in .onnx. `max_length` (prompt + generated tokens) cannot exceed
    the learned positions (n_positions); it is recorded. Returns figures of the graph."""
    _check(model)
    cfg, t = model.config, model.transformer
    positions = t.wpe.weight.shape[0]
    if max_length and max_length > positions:
        raise UnsupportedModelError(f"fused export: max_length {max_length} exceeds gpt2's {positions} positions")
    out = output_file(path)
    g = _Graph()
    inputs, outputs = io_info(model.lm_head.out_features)
    seqlens_k, total_len, total64 = mask_lengths(g)

    # token embeddings; position embeddings = wpe[total - S : total] ([S, hidden], broadcast over the batch)
    tied = is_tied(model.lm_head, t.wte)
    table = g.const("transformer.wte.weight", _np(t.wte.weight))
    tokens = g.op("Gather", [table, "input_ids"], "/transformer/wte/Gather", axis=0)
    length = g.op("Shape", ["input_ids"], "/transformer/wpe/Shape", start=1, end=2)
    first = g.op("Sub", [total64, length], "/transformer/wpe/Sub")
    axis = g.const("/transformer/constants/INT64/[0]", np.array([0], np.int64))
    position = g.op("Slice", [g.const("transformer.wpe.weight", _np(t.wpe.weight)), first, total64, axis],
                    "/transformer/wpe/Slice")

    act = ACTIVATIONS[getattr(cfg, "activation_function", "gelu_new")]
    pending, residual, bias = tokens, position, None  # block 0's ln_1 adds the two embeddings
    for i, block in enumerate(t.h):
        p, attn, mlp = f"/transformer/h.{i}", block.attn, block.mlp
        head_dim = int(attn.head_dim)
        width = _out_features(attn.c_attn)
        n = width // (3 * head_dim)
        if n == 0 or width != 3 * n * head_dim or head_dim % 8:
            raise UnsupportedModelError(f"fused export: gpt2 layer {i} has {n} heads of head_dim {head_dim} "
                                        f"(c_attn width {width}); GroupQueryAttention needs at least one head and "
                                        "head_dim % 8 == 0")
        x, residual = layer_norm(g, block.ln_1, pending, residual, f"{p}/ln_1", bias)
        qkv = g.linear(x, [attn.c_attn], f"{p}/attn/c_attn")  # packed [Q heads | K heads | V heads]
        past, present = kv_io(inputs, outputs, i, n, head_dim)
        y = g.op("GroupQueryAttention", [qkv, "", "", *past, seqlens_k, total_len], f"{p}/attn/GQA",
                 outputs=[f"{p}/attn/GQA/output_0", *present], domain=MS, num_heads=n, kv_num_heads=n,
                 scale=float(head_dim) ** -0.5, do_rotary=0, local_window_size=-1)[0]
        y, bias = g.linear(y, [attn.c_proj], f"{p}/attn/c_proj", keep_bias=True)
        x, residual = layer_norm(g, block.ln_2, y, residual, f"{p}/ln_2", bias)
        h, bias = g.linear(x, [mlp.c_fc], f"{p}/mlp/c_fc", keep_bias=True)
        if bias is None:  # both ops want one
            bias = g.const(f"{p.lstrip('/').replace('/', '.')}.mlp.c_fc.bias",
                           np.zeros(_out_features(mlp.c_fc), np.float32))
        h = g.op(act, [h, bias], f"{p}/mlp/act/{act}", domain=MS)
        pending, bias = g.linear(h, [mlp.c_proj], f"{p}/mlp/c_proj", keep_bias=True)

    x, _ = layer_norm(g, t.ln_f, pending, residual, "/transformer/ln_f", bias, last=True)
    lm_head(g, x, model.lm_head, table, tied)
    return save(g, inputs, outputs, out, block_prefix="/transformer/h.", layers=len(t.h), tied_embeddings=tied,
                cache_length=max_length or positions)
