"""An op-by-op ONNX writer for Llama-shaped decoders (Llama incl. SmolLM2, GQA or MHA; Mistral; Qwen2; Qwen3; Phi-3;
Gemma 1-3; OLMo 1-2; SmolLM3; Granite; StableLM; Cohere 1-2; EXAONE 4; the mixtures of experts Mixtral, Qwen2/3-MoE,
OLMoE; any model_type with that layout), fp32. (GPT-2 and GPT-NeoX have their own writers, gpt2.py and neox.py; what
they share is in graph.py.)

Llama-shaped is decided by structure (compress.architecture.find plus a short probe run of block 0, graph.py's
probe_block), never by model_type: q/k/v projections, separate (with or without bias) or one packed qkv_proj
(Phi-3, rows [q | k | v]), optional per-head q/k RMSNorms, a gated MLP (gate / up / down, or Phi-3's packed
gate_up_proj; both written as one MatMul [gate | up] and a Split) with SiLU, GELU or tanh-GELU (Gemma:
FastGelu), RMSNorms wired x + attn(norm(x)), + mlp(norm(.)) (Llama's pre-norms), and where the probe run of
block 0 finds them a norm on each sublayer's output too, x + post(attn(pre(x))) (Gemma 2 / 3: four norms per
block, two of them plain SimplifiedLayerNormalization), or post-norms only, x + post(attn(x)) (OLMo 2: the
residual sums are Adds), or in parallel, x + attn(norm(x)) + mlp(norm_2(x)) with one norm or two (Cohere,
StableLM's parallel variant: one Add of the two outputs). An RMSNorm computing x / rms(x) * (1 + weight),
Gemma's, is written with 1 + weight folded; LayerNorms (StableLM's with biases, Cohere's without, OLMo's with
neither weight nor bias: any module that computes one, found by running it) as SkipLayerNormalization. A final norm of
the same kind; a rotary embedding with a static rope type (over all of each head or, partial, a multiple of 16 of its
channels), per layer: Gemma 3's sliding layers read a second one (their own base frequency: a second cos / sin cache),
SmolLM3's NoPE layers and Cohere 2's and EXAONE 4's global ones none (do_rotary 0; graph.layer_rotaries finds which by
running each attention again with a rotation by nothing). Gemma 2's soft-capping:
GroupQueryAttention's softcap for the scores, Div / Tanh / Mul after the head for the logits. Token embeddings
are fed to block 0 as they are or times one scalar (Gemma's sqrt(hidden), Granite's embedding_multiplier: a
Mul after the Gather, the table stays the one the tied head reads). Granite's other multipliers: the
attention's own `scaling` (as every model's) for the scores, the residual multiplier (found by the probe run:
x + r * attn(.)) folded into o_proj and down_proj, 1 / logits_scaling (and Cohere's logit_scale) into the head
(a Mul after a tied one).

optimum's exporter traces the model and leaves ~7,400 nodes for SmolLM2-135M, most of them Shape / Gather /
Concat / Unsqueeze arithmetic that ONNX Runtime recomputes every decode step. Like onnxruntime-genai's model
builder, this writes the graph by hand from the module tree, with ONNX Runtime's fused contrib ops:

    attention_mask -> ReduceSum -> Sub 1 -> Cast int32      = seqlens_k            (once, shared by all layers)
    attention_mask -> Shape[1:2] -> Cast int32               = total_sequence_length
    input_ids -> Gather (embedding)
    per block (11 nodes when Q/K/V and the MLP are plain bias-free Linears):
        SkipSimplifiedLayerNormalization (adds the previous block's output to the residual; plain in block 0)
        -> packed QKV MatMul -> GroupQueryAttention (rotary inside) -> o_proj MatMul
        -> SkipSimplifiedLayerNormalization -> packed gate_up MatMul -> Split -> Sigmoid, Mul (SiLU)
        -> Mul -> down MatMul
    SkipSimplifiedLayerNormalization -> lm_head MatMul -> logits

Every width is read from the modules themselves, so depth-pruned models, per-layer MLP widths, per-layer head
counts and low-rank factorized projections (`.first` / `.second` Linears: two MatMuls, and then Q/K/V are fed
to GroupQueryAttention unpacked, gate and up written as two) all export. A bias adds one Add node. Qwen3's
per-head q_norm / k_norm add 7 nodes per block: the packed QKV output is Split, and Q and K each go through
Reshape [B, S, heads, head_dim] (a constant shape, no shape arithmetic), SimplifiedLayerNormalization and
Reshape back before GQA; OLMo 2's span all heads (no Reshapes: 3 nodes); Cohere's LayerNorms with gains per head
are a LayerNormalization with unit gains and a Mul by them (9 nodes).

A plain MLP (up, activation, down) in blocks with RMSNorms is up's MatMul, the activation (Arcee's squared ReLU: a
Relu and a Mul by itself; Apertus' xIELU: its formula, 10 nodes, with each layer's learned values) and down's MatMul.

A mixture of SwiGLU experts (Mixtral, Qwen2/3-MoE, OLMoE, Granite-MoE, gpt-oss) is ONNX Runtime's MoE op: the router's
MatMul on the rows [tokens, hidden], then softmax, top num_experts_per_tok (renormalized unless the config's
norm_topk_prob says not) and the experts, each one's gate and up rows interleaved in [experts, 2 x inter, hidden] (the
CPU kernel's SwiGLU layout: swiglu_fusion 1) and down as [experts, hidden, inter]; Qwen2-MoE's shared expert is a plain
SwiGLU MLP beside it times the sigmoid of its gate; gpt-oss's experts add biases and a clamped SwiGLU (the op's
activation_alpha, beta and swiglu_limit), and its attention sinks (a logit per head in the softmax) are
GroupQueryAttention's head_sink. The int8 / int4 quantizer turns MoE into QMoE.

Tied embeddings are stored once, as the [vocab, hidden] table the Gather reads; the LM head multiplies by its
Transpose. In fp32 ONNX Runtime folds that Transpose into a second constant when the session starts; the int8
quantizer (compress/quant/ort.py) turns the pair into GatherBlockQuantized + MatMulNBits over one int8 table.

The graph is marked `compress.graph: fused` in its metadata: compress.edge then runs it with past and present
sharing one preallocated buffer per layer (GroupQueryAttention writes the new keys / values in place).

GroupQueryAttention on the CPU execution provider (onnxruntime 1.31), constraints the writer checks or relies on:
- fp32 is supported (T = float); seqlens_k is int32 [batch] = total length - 1, total_sequence_length an int32
  scalar (or 1-element vector);
- num_heads must be a multiple of kv_num_heads, head_size a multiple of 16 with rotary (cos/sin caches are
  [cache_length, rotary_dim / 2], and cache_length must be >= the total sequence length; a partial rotary
  embedding, rotary_dim < head_size, rotates the first rotary_dim channels and needs rotary_dim % 16 == 0);
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

A longrope embedding (Phi-3 / 3.5 / 4-mini) takes its short factors while a pass stays within
original_max_position_embeddings (4,096 for those) and its long ones, for every position, once it reaches past them.
By default the graph holds those short positions, with the short factors; a longer export.max_length writes both
factors' cos / sin rows and GroupQueryAttention's position_ids pick them per run (computed once, from the mask), and
the graph's metadata tells compress.edge's generate to recompute the cache there, as transformers' Phi-3 generation
does.

Not supported yet (refused with UnsupportedModelError, naming the part): sequence-length dependent rope types (dynamic),
partial rotary over a width not a multiple of 16, activations other than SiLU / GELU / ReLU (and in plain MLPs the
squared ReLU and xIELU), per-head packed qkv (GPT-NeoX's: neox.py), q / k norms other than RMSNorms and per-head
LayerNorms, blocks with other steps than the norms, attention, MLP and a residual multiplier, non-Linear modules
(quantized layers, low-rank embeddings), fp16/bf16 graphs."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..architecture import ACTIVATIONS, GATED, Architecture, find
from ..errors import UnsupportedModelError
from .graph import (MS, PLAIN_MLP_ACTS, _close, _Graph, _is_linear, _np, _out_features, _param, activation,
                    block_norms, check_outside_blocks, config_activation, fit_scale, io_info, is_tied, kv_io,
                    layer_norm, layer_norm_params, layer_rotaries, lm_head, longrope_position_ids, longrope_positions,
                    mask_lengths, output_file, plain_mlp_in, probe_block, rms_norm, rope_caches, save)


def _refuse_other_parts(arch: Architecture) -> None:
    """A module with weights in block 0 beside its attention, MLP and norms (Granite-MoE-shared's shared_mlp) is
    refused by name: the block probe would only say it is not wired as the writer writes."""
    b = arch.blocks[0]
    mlp = b.mlp
    parts = [b.attn.name, mlp.name, *mlp.ins, mlp.out, *b.norms, mlp.router, mlp.experts, *(mlp.parallel or ())]
    known = {n[len(b.name) + 1:].split(".")[0] for n in parts if n and n.startswith(b.name + ".")}
    other = [n for n, m in arch.layers()[0].named_children()
             if n not in known and next(m.parameters(), None) is not None]
    if other:
        raise UnsupportedModelError(f"fused export: block {b.name} holds {', '.join(other)} beside its attention, MLP "
                                    "and norms, which the Llama writer does not write")


def _window(model, attn, i: int) -> int | None:
    """Layer i's sliding window (keys a query sees, itself included), None for full attention. Qwen2 keeps it
    per layer on the attention module (layers below max_window_layers have none), Mistral and Phi-3 in the
    config; where the config lists layer_types, a layer not of "sliding_attention" has none (EXAONE 4 gives
    every attention module the window and slides only in its sliding layers)."""
    types = getattr(model.config, "layer_types", None)
    if isinstance(types, list) and i < len(types) and types[i] != "sliding_attention":
        return None
    window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(model.config, "sliding_window", None)
    return int(window) if window else None


def _check(model, arch: Architecture) -> dict:
    """Refuse what the writer cannot write, naming the part; what probe_block found in block 0."""
    for i, b in enumerate(arch.blocks):
        if b.mlp.kind not in ("gated", "fused_gated", "moe", "plain"):
            raise UnsupportedModelError(f"fused export: the Llama writer takes a gated MLP (gate / up / down or "
                                        f"gate_up / down), a mixture of them or a plain one; {b.mlp.name} is "
                                        f"{b.mlp.kind}")
        if b.attn.qkv_layout not in ("separate", "blocks"):
            raise UnsupportedModelError(f"fused export: {b.attn.qkv} packs q/k/v per head (rows [q k v] of head 0, "
                                        "of head 1, ...); the Llama writer takes separate q/k/v or one [q | k | v] "
                                        "projection")
    check_outside_blocks(model, arch, "Llama")
    _refuse_other_parts(arch)
    probe = probe_block(model, arch, post_norms=True)
    if any(probe["post"]) and probe["residual_scale"] != 1.0:
        raise UnsupportedModelError("fused export: block 0 scales its sublayers' outputs and norms them too; the "
                                    "Llama writer folds the scale into the output projections, so takes one or "
                                    "the other")
    return probe


def _embedding_scale(arch: Architecture, probe: dict) -> float:
    """What block 0's input is times the token embedding: 1, Gemma's sqrt(hidden), Granite's
    embedding_multiplier; one scalar, else refused."""
    e, x = probe["tokens"].float(), probe["x"].float()
    scale = fit_scale(x, e) if x.shape == e.shape else 0.0
    if not scale or not _close(x, e * scale):
        raise UnsupportedModelError("fused export: block 0 does not read the token embeddings (times a scalar); "
                                    "position embeddings or an embedding norm are not supported by the Llama writer")
    for known in (1.0, math.sqrt(arch.hidden_size)):
        if abs(scale - known) <= 1e-5 * known:
            return known
    return scale


def build_llama(model, path: Path, *, max_length: int | None = None, arch: Architecture | None = None,
                interleaved: bool = False) -> dict:
    """Write `model` (a Llama-shaped ForCausalLM, torch, whatever its model_type) as `path`/model.onnx (+ .data).

    `path` is a folder, or a file name ending in .onnx. `max_length` bounds prompt + generated tokens (the
    rotary cache length; default config.max_position_embeddings). `arch` is compress.architecture.find(model)
    (found here when not given). `interleaved`: the rotary embedding turns channel pairs (2i, 2i + 1) (GLM's,
    Helium's) rather than the halves (i, i + rotary_dim / 2); the module tree does not say which, so
    build_fused tries the halves first. Returns figures of the graph."""
    arch = arch or find(model)
    probe = _check(model, arch)
    out = output_file(path)
    cfg, layers = model.config, arch.layers()
    g = _Graph()
    head = arch.module(arch.head)
    inputs, outputs = io_info(_out_features(head))
    seqlens_k, total_len, total64 = mask_lengths(g)  # once for all layers

    # embedding; a tied LM head reads the same [vocab, hidden] table through a Transpose (see the docstring)
    embed = arch.module(arch.embedding)
    tied = is_tied(head, embed)
    table = g.const(f"{arch.embedding}.weight", _np(embed.weight))
    x = g.op("Gather", [table, "input_ids"], "/model/embed_tokens/Gather", axis=0)
    scale = _embedding_scale(arch, probe)
    if scale != 1.0:  # Gemma: a Mul, so that the tied head still reads the unscaled table
        x = g.op("Mul", [x, g.const("/model/embed_tokens/scale", np.array(scale, np.float32))],
                 "/model/embed_tokens/Mul")

    head_dim = arch.head_dim()
    ropes = layer_rotaries(model, arch)
    short = [n for r in ropes if r is not None and (n := longrope_positions(r))]  # longrope: its short positions
    cache_length = max_length or min(short, default=cfg.max_position_embeddings)
    caches = {}  # id(rotary module) -> its [cos, sin], written once (Gemma 3 has two)

    def rope_inputs(rope) -> list[str]:
        if id(rope) not in caches:
            name = f"cos_sin_cache.{len(caches)}" if caches else "cos_sin_cache"
            caches[id(rope)] = rope_caches(g, rope, cache_length, head_dim, name)
        return caches[id(rope)]

    longrope = {}  # short positions -> position_ids picking the short or the long factors' rows, written once

    def longrope_ids(short: int) -> str:
        if short not in longrope:
            longrope[short] = longrope_position_ids(g, seqlens_k, total64, short, cache_length)
        return longrope[short]

    act_label = config_activation(cfg)
    softcap = float(getattr(cfg, "attn_logit_softcapping", None) or 0.0)  # Gemma 2: cap * tanh(scores / cap)

    residual, pending = x, None  # pending: the last block's output, added to residual by the next Skip norm
    # norm nodes are named as the modules within the block (Llama: input_layernorm, post_attention_layernorm)
    leaves = {k: [n[len(arch.blocks[0].name) + 1:] if n else None for n in probe[k]] for k in ("pre", "post")}
    windows = []
    for i, b in enumerate(arch.blocks):
        p, a = f"/model/layers.{i}", b.attn
        attn = arch.module(a.name)
        n_q, n_kv = arch.num_heads(i), arch.num_kv_heads(i)
        if n_kv == 0 or n_q % n_kv or head_dim % 16:
            raise UnsupportedModelError(f"fused export: layer {i} has {n_q} heads, {n_kv} KV heads, head_dim "
                                        f"{head_dim}; GroupQueryAttention needs heads % kv_heads == 0 and "
                                        "head_dim % 16 == 0")
        window = _window(model, attn, i)
        windows.append(window)
        (pre_attn, pre_mlp), (post_attn, post_mlp) = (block_norms(arch, b, probe, k) for k in ("pre", "post"))
        (pre_attn_name, pre_mlp_name), (post_attn_name, post_mlp_name) = (
            [f"{p}/{leaf}" if leaf else None for leaf in leaves[k]] for k in ("pre", "post"))
        x, residual = _enter(g, pre_attn, pending, residual, pre_attn_name or f"{p}/attn_residual")
        if probe["parallel"]:  # the MLP reads the same sum: normed its own way (StableLM), or the shared norm's
            x_mlp = x if pre_mlp is None else _norm(g, pre_mlp, None, residual, pre_mlp_name)[0]

        qkv = [arch.module(n) for n in a.inputs]  # [q, k, v], or [qkv] packed [q | k | v] (Phi-3)
        packed = len(qkv) == 1 or all(_is_linear(m) for m in qkv)
        if packed and not a.q_norm:  # packed: query carries Q, K and V, key / value stay empty
            qkv_in = [g.linear(x, qkv, f"{p}/attn/qkv_proj"), "", ""]
        elif packed:  # Qwen3, Gemma 3, OLMo 2: one MatMul, split to norm Q and K
            sizes = g.const(f"model.layers.{i}.attn.qkv_proj.split_sizes",
                            np.array([n_q * head_dim, n_kv * head_dim, n_kv * head_dim], np.int64))
            qkv_in = g.op("Split", [g.linear(x, qkv, f"{p}/attn/qkv_proj"), sizes], f"{p}/attn/qkv_proj/Split",
                          outputs=3, axis=-1)
        else:
            qkv_in = [g.linear(x, [m], f"{p}/attn/{n}") for m, n in zip(qkv, ("q_proj", "k_proj", "v_proj"))]
        if a.q_norm:  # RMSNorm over each head's head_dim (Qwen3, Gemma 3) or over all heads (OLMo 2)
            qkv_in = [_qk_norm(g, arch.module(a.q_norm), qkv_in[0], head_dim, f"{p}/attn/q_norm"),
                      _qk_norm(g, arch.module(a.k_norm), qkv_in[1], head_dim, f"{p}/attn/k_norm"), qkv_in[2]]
        past, present = kv_io(inputs, outputs, i, n_kv, head_dim)
        rotation = {"do_rotary": 1, "rotary_interleaved": int(interleaved)} if ropes[i] else {"do_rotary": 0}
        positions = [*rope_inputs(ropes[i])] if ropes[i] else ["", ""]  # a copy: rope_inputs keeps its list
        if ropes[i] is not None and (short := longrope_positions(ropes[i])) and cache_length > short:
            positions.append(longrope_ids(short))  # past `short` positions the long factors' rows
        if isinstance(sinks := getattr(attn, "sinks", None), torch.Tensor):  # gpt-oss: a logit per head in softmax
            positions += [""] * (4 - len(positions)) + [g.const(f"model.layers.{i}.attn.sinks", _np(sinks))]
        y = g.op("GroupQueryAttention", qkv_in + past + [seqlens_k, total_len] + positions, f"{p}/attn/GQA",
                 outputs=[f"{p}/attn/GQA/output_0", *present], domain=MS, num_heads=n_q, kv_num_heads=n_kv,
                 scale=float(getattr(attn, "scaling", head_dim ** -0.5)), local_window_size=window or -1,
                 **rotation, **({"softcap": softcap} if softcap else {}))[0]
        y = g.linear(y, [arch.module(a.o)], f"{p}/attn/o_proj", scale=probe["residual_scale"])
        if probe["parallel"]:  # one pending sum: attention + MLP (no post-norms: probe_block)
            pending = g.op("Add", [y, _mlp(g, arch, i, x_mlp, p, act_label, probe["residual_scale"])], f"{p}/Add")
            continue
        if post_attn is not None:
            y = _norm(g, post_attn, None, y, post_attn_name)[0]

        x, residual = _enter(g, pre_mlp, y, residual, pre_mlp_name or f"{p}/mlp_residual")
        pending = _mlp(g, arch, i, x, p, act_label, probe["residual_scale"])
        if post_mlp is not None:
            pending = _norm(g, post_mlp, None, pending, post_mlp_name)[0]

    x, _ = _norm(g, arch.module(arch.outer_norms()[0]), pending, residual, "/model/norm", last=True)
    lm_head(g, x, head, table, tied, softcap=getattr(cfg, "final_logit_softcapping", None),
            scale=float(getattr(cfg, "logit_scale", None) or 1.0)  # Cohere multiplies the logits,
            / float(getattr(cfg, "logits_scaling", None) or 1.0))  # Granite divides them
    return save(g, inputs, outputs, out, block_prefix="/model/layers.", layers=len(layers), tied_embeddings=tied,
                cache_length=cache_length, sliding_windows=sorted({w for w in windows if w}),
                rotary_interleaved=interleaved, rotary_caches=len(caches),
                layers_without_rotary=[i for i, r in enumerate(ropes) if r is None],
                post_norms=any(probe["post"]), softcap=softcap or None, residual_scale=probe["residual_scale"],
                parallel_residual=probe["parallel"], longrope_short_positions=min(longrope, default=None))


def _mlp(g: _Graph, arch: Architecture, i: int, x: str, p: str, act_label: str | None, scale: float) -> str:
    """down(act(gate(x)) * up(x)): gate and up as one MatMul [gate | up] and a Split (Phi-3's gate_up_proj is
    stored so; separate plain gate / up Linears are packed so: one MatMulNBits call instead of two, reading
    the same bytes and quantizing the shared input once: 1.034x the decode speed at int8, faster in 9 of 10
    process pairs of studies.packed_mlp), or two MatMuls where a projection is low-rank. `scale` (the residual
    multiplier) is folded into down."""
    mlp = arch.blocks[i].mlp
    if mlp.kind == "moe":
        return _moe(g, arch, i, x, p, scale)
    if mlp.kind == "plain":  # up -> activation -> down (Arcee's squared ReLU)
        act = activation(arch.mlp_act(i), "activation", act_label)
        if act not in PLAIN_MLP_ACTS:
            raise UnsupportedModelError(f"fused export: a plain MLP's activation {act_label or act!r} is not "
                                        f"supported (the Llama writer's plain MLPs take {', '.join(PLAIN_MLP_ACTS)})")
        h = plain_mlp_in(g, x, arch.module(mlp.ins[0]), act, f"{p}/mlp/up_proj", arch.mlp_act(i))
        return g.linear(h, [arch.module(mlp.out)], f"{p}/mlp/down_proj", scale=scale)
    ins = [arch.module(n) for n in mlp.ins]
    if mlp.kind == "fused_gated" or all(_is_linear(m) for m in ins):
        halves = [_out_features(ins[0]) // 2] * 2 if mlp.kind == "fused_gated" else [_out_features(m) for m in ins]
        sizes = g.const(f"model.layers.{i}.mlp.gate_up_proj.split_sizes", np.array(halves, np.int64))
        gate, up = g.op("Split", [g.linear(x, ins, f"{p}/mlp/gate_up_proj"), sizes], f"{p}/mlp/gate_up_proj/Split",
                        outputs=2, axis=-1)
    else:
        gate, up = g.linear(x, [ins[0]], f"{p}/mlp/gate_proj"), g.linear(x, [ins[1]], f"{p}/mlp/up_proj")
    kind = activation(arch.mlp_act(i), "activation", act_label)
    if kind == "silu":
        h = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{p}/mlp/act/Sigmoid")], f"{p}/mlp/act/Mul")
    elif kind == "relu":  # ReGLU
        h = g.op("Relu", [gate], f"{p}/mlp/act/Relu")
    else:  # FastGelu: the tanh approximation; Gelu: erf
        h = g.op("FastGelu" if kind == "gelu_tanh" else "Gelu", [gate], f"{p}/mlp/act/{kind}", domain=MS)
    return g.linear(g.op("Mul", [h, up], f"{p}/mlp/Mul"), [arch.module(mlp.out)], f"{p}/mlp/down_proj", scale=scale)


def _norm(g: _Graph, norm, pending: str | None, residual: str, name: str, last: bool = False):
    """The block's and the final norms: RMSNorm (Llama's), or LayerNorm with its bias (StableLM's) or without
    (Cohere's)."""
    if params := layer_norm_params(norm):
        return layer_norm(g, norm, pending, residual, name, last=last, params=params)
    return rms_norm(g, norm, pending, residual, name, last=last)


def _enter(g: _Graph, norm, pending: str | None, residual: str, name: str):
    """A sublayer's input and the new residual: its pre-norm of residual + pending (one Skip norm), or,
    without a pre-norm (OLMo 2), the sum itself."""
    if norm is not None:
        return _norm(g, norm, pending, residual, name)
    if pending is None:
        return residual, residual
    total = g.op("Add", [pending, residual], f"{name}/Add")
    return total, total


def _qk_norm(g: _Graph, norm, x: str, head_dim: int, name: str) -> str:
    """q_norm / k_norm: an RMSNorm of every head's [head_dim] slice (Qwen3, Gemma 3: Reshape [B, S, heads,
    head_dim], a constant shape, norm, Reshape back), a LayerNorm of it with gains per head (Cohere's [heads,
    head_dim]: LayerNormalization with unit gains, then Mul by them), or an RMSNorm of the whole projection (OLMo 2)."""
    w = norm.weight if isinstance(getattr(norm, "weight", None), torch.Tensor) else None
    per_head = w is not None and w.dim() == 2 and w.shape[1] == head_dim
    if w is None or w.shape[-1] != head_dim:
        return rms_norm(g, norm, None, x, name)[0]
    heads_view = g.const(f"/model/constants/INT64/[0, 0, -1, {head_dim}]", np.array([0, 0, -1, head_dim], np.int64))
    flat = g.const("/model/constants/INT64/[0, 0, -1]", np.array([0, 0, -1], np.int64))
    heads = g.op("Reshape", [x, heads_view], f"{name}/Reshape")
    y = _head_layer_norm(g, norm, heads, name) if per_head else rms_norm(g, norm, None, heads, name)[0]
    return g.op("Reshape", [y, flat], f"{name}/Reshape_1")


def _head_layer_norm(g: _Graph, norm, x: str, name: str) -> str:
    """A LayerNorm without bias of each head's slice of x [B, S, heads, head_dim], each head with its own gains
    (norm.weight [heads, head_dim]: Cohere's q / k norms), checked against the module on random input."""
    w, eps = norm.weight.detach(), getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    t = torch.randn(3, *w.shape, generator=torch.Generator().manual_seed(0)).to(w)
    with torch.no_grad():
        same = isinstance(eps, float) and _close(norm(t), torch.nn.functional.layer_norm(t, w.shape[-1:], eps=eps) * w)
    if not same:
        raise UnsupportedModelError(f"fused export: {name.lstrip('/')} ({type(norm).__name__}) has gains per head "
                                    "but is not a LayerNorm of each head's slice; the writer takes those or RMSNorms")
    ones = g.const(_param(name) + ".unit_gains", np.ones(w.shape[-1], np.float32))
    y = g.op("LayerNormalization", [x, ones], f"{name}/LayerNorm", axis=-1, epsilon=eps)
    return g.op("Mul", [y, g.const(_param(name) + ".weight", _np(w))], f"{name}/Mul")


def _moe(g: _Graph, arch: Architecture, i: int, x: str, p: str, scale: float) -> str:
    """A mixture of SwiGLU experts as ONNX Runtime's MoE op: the router's MatMul, then softmax over its logits,
    the top num_experts_per_tok experts of each token (their weights renormalized unless the config's
    norm_topk_prob says not: Qwen2-MoE, OLMoE; Granite-MoE's softmax over the top logits is the renormalized
    one), each expert's gate and up rows interleaved in one [experts, 2 x inter, hidden] table (the CPU kernel's
    SwiGLU layout), down as [experts, hidden, inter]; plus a shared expert scaled by the sigmoid of its own
    gate, where there is one (Qwen2-MoE)."""
    mlp, cfg = arch.blocks[i].mlp, arch.model.config
    holder = arch.module(mlp.name)
    shared, shared_gate = getattr(holder, "shared_expert", None), getattr(holder, "shared_expert_gate", None)

    def child(path: str) -> str:  # the holder's child a module sits in
        return path[len(mlp.name) + 1:].split(".")[0]

    known = {child(n) for n in (mlp.experts, mlp.router, *(mlp.parallel or ())) if n}
    known |= {"shared_expert", "shared_expert_gate"} | {n for n, m in holder.named_children() if m is mlp.act}
    other = [n for n, _ in holder.named_children() if n not in known]
    if other:
        raise UnsupportedModelError(f"fused export: {mlp.name} holds {', '.join(other)} besides its router and "
                                    "experts, which the Llama writer does not write")
    prefix = f"model.layers.{i}.mlp.experts"
    fc1, down, biases, swiglu = _parallel_experts(arch, mlp) if mlp.parallel else _listed_experts(arch, mlp)
    hidden = fc1.shape[2]
    flat = g.const(f"/model/constants/INT64/[-1, {hidden}]", np.array([-1, hidden], np.int64))
    rows = g.op("Reshape", [x, flat], f"{p}/mlp/Reshape")  # [tokens, hidden]
    router = arch.module(mlp.router)
    logits = g.linear(rows, [router if _is_linear(router) else _as_linear(router)], f"{p}/mlp/router")
    b1, b2 = (g.const(f"{prefix}.{n}.bias", b) if b is not None else "" for n, b in zip(("gate_up", "down"), biases))
    y = g.op("MoE", [rows, logits, g.const(f"{prefix}.gate_up.weight", fc1), b1,
                     g.const(f"{prefix}.down.weight", down)] + ([b2] if b2 else []), f"{p}/mlp/MoE", domain=MS,
             k=int(getattr(cfg, "num_experts_per_tok")), activation_type="swiglu", swiglu_fusion=1,
             normalize_routing_weights=int(bool(getattr(cfg, "norm_topk_prob", True))), **swiglu)
    if shared is not None:
        s = _shared_expert(g, shared, rows, f"{p}/mlp/shared_expert", f"model.layers.{i}.mlp.shared_expert")
        if shared_gate is not None:
            s = g.op("Mul", [s, g.op("Sigmoid", [g.linear(rows, [shared_gate], f"{p}/mlp/shared_expert_gate")],
                                     f"{p}/mlp/shared_expert_gate/Sigmoid")], f"{p}/mlp/shared_expert_gate/Mul")
        y = g.op("Add", [y, s], f"{p}/mlp/Add")
    if scale != 1.0:
        y = g.op("Mul", [y, g.const(f"{p}/mlp/residual_scale", np.array(scale, np.float32))], f"{p}/mlp/Mul_scale")
    shape = g.op("Shape", [x], f"{p}/mlp/Shape")
    return g.op("Reshape", [y, shape], f"{p}/mlp/Reshape_back")


def _listed_experts(arch: Architecture, mlp) -> tuple:
    """A ModuleList of SwiGLU experts as the MoE op's tables: (fc1 [experts, 2 x inter, hidden] with each
    expert's gate and up rows interleaved, fc2 [experts, hidden, inter], (no biases), no activation options)."""
    gate, up, down = zip(*[[_np(m.weight) for m in _expert_linears(e, f"{mlp.experts}.{j}")]
                           for j, e in enumerate(arch.module(mlp.experts))])
    fc1 = np.stack([np.stack([gw, uw], 1).reshape(-1, gw.shape[1]) for gw, uw in zip(gate, up)])  # rows g0 u0 g1..
    return fc1, np.stack(down), (None, None), {}


def _parallel_experts(arch: Architecture, mlp) -> tuple:
    """Experts held as [experts, ...] tensors (architecture.PARALLEL_EXPERTS) as the MoE op's tables, as
    _listed_experts returns them. Granite-MoE (out_in): SwiGLU, each expert's gate rows then its up rows,
    interleaved here. gpt-oss (in_out_interleaved): transposed, gate / up already interleaved, biases, and its
    clamped SwiGLU, (clamp(up, -limit, limit) + 1) x g x sigmoid(alpha x g) with g = min(gate, limit): the op's
    swiglu_limit, activation_alpha and activation_beta 1."""
    w1, w2 = (_np(arch.model.get_parameter(n)) for n in mlp.parallel)
    if mlp.parallel_layout == "out_in":
        if activation(mlp.act, "expert activation") != "silu":
            raise UnsupportedModelError(f"fused export: the experts of {mlp.name} are not SwiGLU MLPs (activation "
                                        f"{type(mlp.act).__name__}), which ONNX Runtime's MoE op takes")
        inter = w2.shape[2]
        return np.stack([w1[:, :inter], w1[:, inter:]], 2).reshape(w1.shape), w2, (None, None), {}
    owner = arch.module(mlp.parallel[0].rpartition(".")[0])
    alpha, limit = getattr(owner, "alpha", None), getattr(owner, "limit", None)
    if not all(isinstance(v, float | int) for v in (alpha, limit)):
        raise UnsupportedModelError(f"fused export: the experts of {mlp.name} hold gate_up_proj / down_proj without "
                                    "the alpha and limit of gpt-oss's clamped SwiGLU, which the writer takes")
    biases = tuple(_np(b) if isinstance(b := getattr(owner, f"{n.rpartition('.')[2]}_bias", None), torch.Tensor)
                   else None for n in mlp.parallel)
    return (np.ascontiguousarray(w1.transpose(0, 2, 1)), np.ascontiguousarray(w2.transpose(0, 2, 1)), biases,
            {"activation_alpha": float(alpha), "activation_beta": 1.0, "swiglu_limit": float(limit)})


def _as_linear(m) -> torch.nn.Linear:
    """A router module holding its own [experts, hidden] weight and bias (gpt-oss's) as the nn.Linear it computes."""
    out = torch.nn.Linear(m.weight.shape[1], m.weight.shape[0], bias=getattr(m, "bias", None) is not None)
    with torch.no_grad():
        out.weight.copy_(m.weight)
        if out.bias is not None:
            out.bias.copy_(m.bias)
    return out


def _expert_linears(expert, name: str) -> tuple:
    """(gate, up, down) nn.Linears of one SwiGLU expert; other experts refused by name."""
    found = next(((getattr(expert, a), getattr(expert, b), getattr(expert, c)) for a, b, c in GATED
                  if all(hasattr(expert, n) for n in (a, b, c))), None)
    act = next((getattr(expert, n) for n in ACTIVATIONS if isinstance(getattr(expert, n, None), torch.nn.Module)), None)
    if found is None or not all(isinstance(m, torch.nn.Linear) and m.bias is None for m in found) or \
            activation(act, "expert activation") != "silu":
        raise UnsupportedModelError(f"fused export: expert {name} is not a SwiGLU MLP of bias-free nn.Linear "
                                    "layers (gate / up / down), which ONNX Runtime's MoE op takes")
    return found


def _shared_expert(g: _Graph, mlp, x: str, name: str, param: str) -> str:
    """Qwen2-MoE's shared expert, a SwiGLU MLP every token goes through: gate and up as one MatMul and a Split."""
    gate, up, down = _expert_linears(mlp, param)
    sizes = g.const(f"{param}.gate_up_proj.split_sizes", np.array([gate.out_features, up.out_features], np.int64))
    gt, u = g.op("Split", [g.linear(x, [gate, up], f"{name}/gate_up_proj"), sizes], f"{name}/gate_up_proj/Split",
                 outputs=2, axis=-1)
    h = g.op("Mul", [g.op("Mul", [gt, g.op("Sigmoid", [gt], f"{name}/act/Sigmoid")], f"{name}/act/Mul"), u],
             f"{name}/Mul")
    return g.linear(h, [down], f"{name}/down_proj")
