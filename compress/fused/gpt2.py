"""An op-by-op ONNX writer for GPT-2-shaped decoders (transformers' GPT2LMHeadModel, OPTForCausalLM,
BioGptForCausalLM and XGLMForCausalLM, or any model_type with that layout), fp32.

GPT-2-shaped is decided by structure (compress.architecture.find plus graph.py's probe_block), not by
model_type: one packed [q heads | k heads | v heads] projection (c_attn, Conv1D or Linear) or separate q / k / v
(OPT's, packed into one MatMul here), a plain MLP (c_fc / c_proj, OPT's fc1 / fc2) with a GELU or a ReLU, two
LayerNorm pre-norms per block, a final LayerNorm, position embeddings (a second nn.Embedding outside the blocks, or
XGLM's fixed sinusoidal table, its rows read from an offset: OPT's and XGLM's start at 2) added to the token
embeddings (times a scale: BioGPT's and XGLM's sqrt(hidden), read from block 0's input, one Mul), no rotary embedding.

The same approach as llama.py (see its docstring for why), with GPT-2's parts:

    attention_mask -> ReduceSum -> Sub 1 -> Cast int32      = seqlens_k            (once, shared by all layers)
    attention_mask -> Shape[1:2] (-> Cast int32)             = total_sequence_length
    input_ids -> Shape[1:2]; total - that = first position   -> Slice of wpe        = position embeddings [S, hidden]
    input_ids -> Gather (wte)
    per block (9 nodes when c_attn, c_proj, c_fc and c_proj are plain Conv1D / Linear):
        SkipLayerNormalization ln_1 (adds the previous block's MLP output and its c_proj bias to the residual;
        in block 0 the token embeddings to the position embeddings)
        -> packed QKV MatMul (c_attn, or q / k / v) -> Add bias -> GroupQueryAttention (no rotary, kv heads =
        heads) -> c_proj MatMul -> SkipLayerNormalization ln_2 (+ the c_proj bias)
        -> c_fc MatMul -> FastGelu (with c_fc's bias; BiasGelu for exact "gelu"; Add + Relu for a ReLU)
        -> c_proj MatMul
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
attention ignores them: no one result to match), add_cross_attention, activations other than the GELUs and
ReLU, non-LayerNorm norms (and OPT's post-norm blocks, do_layer_norm_before: false), a projection outside the
blocks besides the LM head (OPT's project_in / project_out), modules other than Conv1D / nn.Linear /
LowRankLinear (quantized layers, low-rank embeddings), fp16/bf16 graphs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..architecture import Architecture, find
from ..errors import UnsupportedModelError
from .graph import (MS, PLAIN_MLP_ACTS, _close, _Graph, _is_linear, _np, _out_features, activation, block_norms,
                    check_outside_blocks, config_activation, fit_scale, io_info, is_tied, kv_io, layer_norm, lm_head,
                    mask_lengths, output_file, plain_mlp_in, probe_block, refuse_head_norms, refuse_parallel, rotary,
                    save)

QKV_LAYOUTS = ("blocks", "separate")  # one packed [q | k | v] projection, or three
# config flag -> the value the writer refuses. The two scalings: torch's eager attention applies them, its sdpa
# attention does not, so there is no one reference to match. (reorder_and_upcast_attn only changes the order of
# fp32 operations: it exports, with the same logits.)
REFUSED = {"scale_attn_by_inverse_layer_idx": True, "scale_attn_weights": False, "add_cross_attention": True}


def is_gpt2(model, arch: Architecture | None = None) -> bool:
    """GPT-2-shaped at first sight: a plain MLP, one packed [q | k | v] attention projection or separate q / k /
    v, and a learned position table (the writer checks the rest)."""
    arch = arch or find(model)
    b = arch.blocks[0]
    return b.mlp.kind == "plain" and b.attn.qkv_layout in QKV_LAYOUTS and len(_position_tables(model, arch)) == 1


def _position_tables(model, arch: Architecture) -> list[str]:
    """The position tables of hidden width outside the blocks besides the token table: nn.Embeddings (or
    subclasses: OPT's), or a module keeping a fixed [positions, hidden] table (XGLM's sinusoidal `weights`)."""
    return [n for n, m in model.named_modules() if n != arch.embedding and not n.startswith(arch.layers_name + ".")
            and (t := _table(m)) is not None and t.shape[1] == arch.hidden_size]


def _table(m) -> torch.Tensor | None:
    """The [positions, width] rows a position module reads: an nn.Embedding's weight or a fixed `weights` table."""
    if isinstance(m, torch.nn.Embedding):
        return m.weight
    t = getattr(m, "weights", None)
    return t if isinstance(t, torch.Tensor) and t.dim() == 2 and not list(m.children()) else None


def _positions(model, arch: Architecture) -> str:
    """The learned position embeddings: the one position table."""
    found = _position_tables(model, arch)
    if len(found) != 1:
        raise UnsupportedModelError(f"fused export: the GPT-2 writer takes one learned position embedding (an "
                                    f"nn.Embedding besides the token table), found {found or 'none'}")
    return found[0]


def _check(model, arch: Architecture) -> dict:
    """Refuse what the writer cannot write, naming the part; what probe_block found in block 0."""
    cfg = model.config
    for flag, value in REFUSED.items():
        if bool(getattr(cfg, flag, not value)) == value:
            raise UnsupportedModelError(f"fused export: gpt2 with {flag}={value} is not supported")
    for i, b in enumerate(arch.blocks):
        refuse_head_norms(b, "GPT-2")
        if b.mlp.kind != "plain" or b.attn.qkv_layout not in QKV_LAYOUTS:
            raise UnsupportedModelError(f"fused export: the GPT-2 writer takes a packed [q | k | v] or separate q / "
                                        f"k / v attention and a plain MLP; block {i} has {b.attn.qkv_layout} q/k/v "
                                        f"and a {b.mlp.kind} MLP")
        if hasattr(arch.layers()[i], "crossattention"):
            raise UnsupportedModelError(f"fused export: gpt2 layer {i} has cross-attention (not supported)")
        act = activation(arch.mlp_act(i), "gpt2 activation", config_activation(cfg))
        if act not in PLAIN_MLP_ACTS:
            raise UnsupportedModelError(f"fused export: gpt2 activation {config_activation(cfg) or act!r} is not "
                                        f"supported (the GPT-2 writer takes the GELUs and ReLU)")
    if rotary(model, arch) is not None:
        raise UnsupportedModelError("fused export: the GPT-2 writer takes learned positions; this model has a "
                                    "rotary embedding")
    check_outside_blocks(model, arch, "GPT-2")
    wpe = arch.module(_positions(model, arch))
    probe = probe_block(model, arch)
    refuse_parallel(probe, "GPT-2")
    n = probe["ids"].shape[1]
    rows = _table(wpe).shape[0] - n
    for k in range(min(rows, 3) + 1):  # OPT, BioGPT and XGLM read position p from row p + 2
        pos = _table(wpe)[k:k + n].detach()
        scale = 1.0 if _close(probe["x"], probe["tokens"] + pos) else float(
            np.float32(fit_scale(probe["x"] - pos, probe["tokens"])))  # BioGPT: sqrt(hidden)
        if _close(probe["x"], scale * probe["tokens"] + pos):
            probe["offset"], probe["embed_scale"] = k, scale
            return probe
    raise UnsupportedModelError("fused export: block 0 does not read token embeddings (times a scale) + position "
                                "embeddings (an embedding norm is not supported by the GPT-2 writer)")


def build_gpt2(model, path: Path, *, max_length: int | None = None, arch: Architecture | None = None) -> dict:
    """Write `model` (a GPT-2-shaped LM, torch) as `path`/model.onnx (+ model.onnx.data).

    `path` is a folder, or a file name ending in .onnx. `max_length` (prompt + generated tokens) cannot exceed
    the learned positions (n_positions); it is recorded. `arch` is compress.architecture.find(model) (found
    here when not given). Returns figures of the graph."""
    arch = arch or find(model)
    probe = _check(model, arch)
    cfg = model.config
    wpe_name = _positions(model, arch)
    wte, wpe, head = arch.module(arch.embedding), arch.module(wpe_name), arch.module(arch.head)
    wpe_table = _np(_table(wpe))[probe["offset"]:]  # the rows positions 0, 1, ... read
    positions = wpe_table.shape[0]
    if max_length and max_length > positions:
        raise UnsupportedModelError(f"fused export: max_length {max_length} exceeds gpt2's {positions} positions")
    out = output_file(path)
    g = _Graph()
    inputs, outputs = io_info(_out_features(head))
    seqlens_k, total_len, total64 = mask_lengths(g)

    # token embeddings; position embeddings = wpe[total - S : total] ([S, hidden], broadcast over the batch)
    tied = is_tied(head, wte)
    table = g.const(f"{arch.embedding}.weight", _np(wte.weight))
    tokens = g.op("Gather", [table, "input_ids"], "/transformer/wte/Gather", axis=0)
    if probe["embed_scale"] != 1.0:  # BioGPT's scale_embedding
        tokens = g.op("Mul", [tokens, g.const("/transformer/wte/scale", np.array(probe["embed_scale"], np.float32))],
                      "/transformer/wte/Mul")
    length = g.op("Shape", ["input_ids"], "/transformer/wpe/Shape", start=1, end=2)
    first = g.op("Sub", [total64, length], "/transformer/wpe/Sub")
    axis = g.const("/transformer/constants/INT64/[0]", np.array([0], np.int64))
    position = g.op("Slice", [g.const(f"{wpe_name}.weight", wpe_table), first, total64, axis],
                    "/transformer/wpe/Slice")

    label = config_activation(cfg)
    head_dim = arch.head_dim()
    pending, residual, bias = tokens, position, None  # block 0's ln_1 adds the two embeddings
    for i, b in enumerate(arch.blocks):
        p = f"/transformer/h.{i}"
        c_attn = [arch.module(nm) for nm in b.attn.inputs]  # [c_attn], or [q, k, v]
        width, n = sum(_out_features(m) for m in c_attn), arch.num_heads(i)
        n_kv = arch.num_kv_heads(i)
        if n == 0 or n_kv == 0 or n % n_kv or width != (n + 2 * n_kv) * head_dim or head_dim % 8:
            raise UnsupportedModelError(f"fused export: gpt2 layer {i} has {n} heads of head_dim {head_dim} "
                                        f"(c_attn width {width}); GroupQueryAttention needs at least one head and "
                                        "head_dim % 8 == 0")
        ln_1, ln_2 = block_norms(arch, b, probe)
        x, residual = layer_norm(g, ln_1, pending, residual, f"{p}/ln_1", bias)
        if len(c_attn) == 1 or all(_is_linear(m) for m in c_attn):  # packed [Q heads | K heads | V heads]
            qkv = [g.linear(x, c_attn, f"{p}/attn/c_attn"), "", ""]
        else:  # OPT's q / k / v, one of them low-rank: three inputs
            qkv = [g.linear(x, [m], f"{p}/attn/{nm}") for m, nm in zip(c_attn, ("q_proj", "k_proj", "v_proj"))]
        past, present = kv_io(inputs, outputs, i, n_kv, head_dim)
        y = g.op("GroupQueryAttention", [*qkv, *past, seqlens_k, total_len], f"{p}/attn/GQA",
                 outputs=[f"{p}/attn/GQA/output_0", *present], domain=MS, num_heads=n, kv_num_heads=n_kv,
                 scale=float(head_dim) ** -0.5, do_rotary=0, local_window_size=-1)[0]
        y, bias = g.linear(y, [arch.module(b.attn.o)], f"{p}/attn/c_proj", keep_bias=True)
        x, residual = layer_norm(g, ln_2, y, residual, f"{p}/ln_2", bias)
        act = activation(arch.mlp_act(i), "gpt2 activation", label)
        h = plain_mlp_in(g, x, arch.module(b.mlp.ins[0]), act, f"{p}/mlp/c_fc", arch.mlp_act(i))
        pending, bias = g.linear(h, [arch.module(b.mlp.out)], f"{p}/mlp/c_proj", keep_bias=True)

    x, _ = layer_norm(g, arch.module(arch.outer_norms()[0]), pending, residual, "/transformer/ln_f", bias, last=True)
    lm_head(g, x, head, table, tied)
    return save(g, inputs, outputs, out, block_prefix="/transformer/h.", layers=len(arch.blocks),
                tied_embeddings=tied, cache_length=max_length or positions)
