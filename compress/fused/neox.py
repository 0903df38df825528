"""An op-by-op ONNX writer for LayerNorm decoders with rotary or ALiBi positions and a plain MLP (transformers'
GPTNeoXForCausalLM: Pythia; PhiForCausalLM: Phi-1.5 / Phi-2; FalconForCausalLM in Falcon-7B's layout or with alibi;
GPTJForCausalLM; CodeGenForCausalLM; BloomForCausalLM; MptForCausalLM; NemotronForCausalLM; or any model_type with
that layout), fp32.

Told by structure (compress.architecture.find plus graph.py's probe_block), not by model_type: q/k/v packed per head in
one projection (GPT-NeoX's query_key_value, rows [q k v] of head 0, of head 1, ...: reordered here into [Q heads | K
heads | V heads], so GroupQueryAttention reads one packed input), per KV head [its q heads, k, v] (Falcon-40B's,
reordered the same way), packed [q heads | k heads | v heads] (Falcon's multi-query: one KV head), in chunks of [q v k]
(CodeGen's), or separate (Phi's); a rotary embedding over all of each head's channels or the first rotary_dim of them
(GPT-NeoX's rotary_pct, Phi's partial_rotary_factor, GPT-J's rotary_dim with the frequencies read back from the table it
keeps: GroupQueryAttention rotates as many channels as its cos / sin caches are wide, a multiple of 16), or an ALiBi
bias (BLOOM, Falcon with alibi, MPT: GroupQueryAttention's attention_bias, slope x key position computed once per run
from the slopes the model itself hands its blocks); LayerNorms (Nemotron's LayerNorm1P: the gain stored less one), one
of the embeddings where block 0 reads them normed (BLOOM), a final LayerNorm; a plain MLP with a GELU, a ReLU or a
squared ReLU (Nemotron); the block wired in parallel, x + attn(norm_1(x)) + mlp(norm_2(x)) (GPT-NeoX's
use_parallel_residual, the default) or with one norm read by both, x + attn(norm(x)) + mlp(norm(x)) (Phi, Falcon), or
sequentially with two norms.

    attention_mask -> seqlens_k, total_sequence_length (once, shared by all layers); ALiBi: the bias too
    input_ids -> Gather (embed_in) (-> LayerNormalization, BLOOM)
    per block (10 nodes, parallel with two norms and biases):
        SkipLayerNormalization input_layernorm: residual + the previous block's attention and MLP outputs
        (+ their biases), normed; block 0: LayerNormalization of the embeddings
        LayerNormalization post_attention_layernorm of the same sum (one norm: the MLP reads the first's)
        packed QKV MatMul -> Add bias -> GroupQueryAttention (rotary inside) -> dense MatMul
        dense_h_to_4h MatMul -> FastGelu / BiasGelu (with its bias; Add + Relu) -> dense_4h_to_h MatMul
        Add: attention + MLP outputs, pending for the next norm
    (sequential: post_attention_layernorm is a SkipLayerNormalization adding the attention output, as in
    gpt2.py, and the MLP output is pending)
    SkipLayerNormalization final_layer_norm -> embed_out MatMul (or the Transpose of the table, tied)

Every width is read from the modules, as in gpt2.py: depth-, width- and head-pruned models (an
attention_heads entry keeps the config's head count; the projection's rows tell the heads), low-rank
projections (two MatMuls; a low-rank packed q/k/v has its second factor's rows reordered). The KV cache has
the layout and names of the other writers' graphs, so compress.edge's shared-cache loop and the int8 / int4
quantizers take it unchanged.

Refused with UnsupportedModelError: head_dim not a multiple of 8 (with rotary: it and the rotary width not a
multiple of 16); sequence-length dependent rope types, activations other than the GELUs and (squared) ReLU, q / k
norms (Phi's qk_layernorm), non-LayerNorm norms, an embedding scale before block 0, a projection outside the
blocks besides the LM head, modules other than nn.Linear / LowRankLinear, fp16/bf16 graphs, head-pruned ALiBi
models (the slopes follow the config's head count); what none of these shows by build_fused's check of the
logits."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..architecture import Architecture, find
from ..errors import UnsupportedModelError
from ..models import max_tokens
from .graph import (MS, PLAIN_MLP_ACTS, _close, _Graph, _is_linear, _is_lowrank, _np, _out_features, activation,
                    alibi_bias, alibi_slopes, block_norms, check_outside_blocks, config_activation, embedding_norm,
                    io_info, is_tied, kv_io, layer_norm, lm_head, mask_lengths, output_file, plain_mlp_in,
                    probe_block, refuse_head_norms, rope_caches, rotary, save)

QKV_LAYOUTS = ("per_head", "grouped", "blocks", "separate")
ALIBI_LENGTH = 2048  # positions of an ALiBi model without a position table (BLOOM's training length)


def _check(model, arch: Architecture) -> tuple[dict, str | None, str]:
    """Refuse what the writer cannot write, naming the part; (what probe_block found in block 0, the embedding
    norm or None, the final norm)."""
    cfg = model.config
    for i, b in enumerate(arch.blocks):
        refuse_head_norms(b, "GPT-NeoX")
        if b.mlp.kind != "plain" or b.attn.qkv_layout not in QKV_LAYOUTS:
            raise UnsupportedModelError(f"fused export: the GPT-NeoX writer takes a plain MLP and q/k/v laid out "
                                        f"{' | '.join(QKV_LAYOUTS)}; block {i} has a {b.mlp.kind} MLP and "
                                        f"{b.attn.qkv_layout} q/k/v")
        act = activation(arch.mlp_act(i), "activation", config_activation(cfg))
        if act not in PLAIN_MLP_ACTS:
            raise UnsupportedModelError(f"fused export: activation {config_activation(cfg) or act!r} is not "
                                        "supported by the GPT-NeoX writer (it takes the GELUs and the (squared) "
                                        "ReLU)")
    probe = probe_block(model, arch)
    embed_norm = embedding_norm(arch, probe)
    final = check_outside_blocks(model, arch, "GPT-NeoX", embed_norm)
    if embed_norm is None and not _close(probe["x"], probe["tokens"]):
        raise UnsupportedModelError("fused export: block 0 does not read the token embeddings as they are or "
                                    "through one norm (an embedding scale or position table is not supported by "
                                    "the GPT-NeoX writer)")
    return probe, embed_norm, final


def _no_positions(model, b) -> UnsupportedModelError:
    return UnsupportedModelError(  # a plain MLP and q/k/v packed per head, but no positions a writer knows
        f"fused export: no writer for the layout of {type(model).__name__}: its MLP {b.mlp.name} is plain "
        f"({', '.join(b.mlp.ins)} -> {b.mlp.out}), it has no rotary embedding, no ALiBi bias, and no learned "
        "position table the GPT-2 writer reads; the Llama writer takes a gated MLP, the GPT-NeoX writer rotary "
        "(a module with inv_freq, or a sin | cos table in the attention) or ALiBi positions, the GPT-2 writer "
        "learned positions")


def _scale(attn, head_dim: int) -> float:
    """The scores' scale: head_dim ** -0.5, or the one an attention module keeps (MPT's softmax_scale)."""
    scale = getattr(attn, "softmax_scale", None)
    return float(scale) if isinstance(scale, float | int) and not isinstance(scale, bool) else head_dim ** -0.5


def _rows(m, order: list[int]):
    """A copy of projection `m` whose outputs come in `order` (a low-rank one: its second factor's rows)."""
    if _is_lowrank(m):
        out = copy.copy(m)
        out.second = _rows(m.second, order)
        return out
    if not (_is_linear(m) and isinstance(m, torch.nn.Linear)):  # not a Conv1D (transposed), not quantized
        raise UnsupportedModelError(f"fused export: a per-head packed q/k/v projection that is a {type(m).__name__} "
                                    "is not supported (nn.Linear or LowRankLinear)")
    out = torch.nn.Linear(m.in_features, len(order), bias=m.bias is not None)
    with torch.no_grad():
        out.weight.copy_(m.weight[order])
        if m.bias is not None:
            out.bias.copy_(m.bias[order])
    return out


def _heads_order(arch: Architecture, i: int) -> list[int]:
    """Rows [q k v] per head, or [its q heads, k, v] per KV head -> [Q of every head | K of every KV head | V of every
    KV head]."""
    return torch.cat([part.reshape(-1) for part in arch.qkv_rows(i)]).tolist()


def _chunks_order(width: int, chunks: int) -> list[int]:
    """Rows of `chunks` chunks of [q v k] (CodeGen's qkv_proj, each chunk its share of the heads) -> [Q | K | V]."""
    part = width // chunks
    return [c * 3 * part + offset * part + j for offset in (0, 2, 1) for c in range(chunks) for j in range(part)]


def build_neox(model, path: Path, *, max_length: int | None = None, arch: Architecture | None = None,
               interleaved: bool = False, alibi_scaled: bool = False, qkv_chunks: int = 0) -> dict:
    """Write `model` (a GPT-NeoX-shaped LM, torch) as `path`/model.onnx (+ model.onnx.data); the arguments
    are build_llama's (llama.py); `alibi_scaled`: the ALiBi bias is added before the scores are scaled by
    head_dim ** -0.5 (Falcon; BLOOM adds it after); `qkv_chunks`: the packed q/k/v projection holds that many
    chunks of [q v k], each for as many heads (CodeGen: 4). Returns figures of the graph."""
    arch = arch or find(model)
    probe, embed_norm, final_norm = _check(model, arch)
    cfg = model.config
    out = output_file(path)
    g = _Graph()
    head = arch.module(arch.head)
    inputs, outputs = io_info(_out_features(head))
    seqlens_k, total_len, total64 = mask_lengths(g)

    embed = arch.module(arch.embedding)
    tied = is_tied(head, embed)
    table = g.const(f"{arch.embedding}.weight", _np(embed.weight))
    x = g.op("Gather", [table, "input_ids"], "/gpt_neox/embed_in/Gather", axis=0)
    if embed_norm:
        x, _ = layer_norm(g, arch.module(embed_norm), None, x, "/gpt_neox/embed_layernorm")
    head_dim = arch.head_dim()
    cache_length = max_length or max_tokens(cfg.to_dict()) or ALIBI_LENGTH
    if (alibi := alibi_slopes(model, arch)) is not None:  # a bias per head, no rotary (Falcon has the module)
        slopes, rounded = alibi
        attention_bias = alibi_bias(g, slopes, rounded, total64, head_dim ** -0.5 if alibi_scaled else 1.0)
        positions = {"do_rotary": 0}
        position_inputs = ["", "", "", attention_bias]  # cos, sin, position_ids, attention_bias
    elif (rope := rotary(model, arch)) is not None:
        positions = {"do_rotary": 1, "rotary_interleaved": int(interleaved)}
        position_inputs = rope_caches(g, rope, cache_length, head_dim)
    else:
        raise _no_positions(model, arch.blocks[0])

    label = config_activation(cfg)
    residual, pending, bias = x, None, None
    for i, b in enumerate(arch.blocks):
        p = f"/gpt_neox/layers.{i}"
        n, n_kv = arch.num_heads(i), arch.num_kv_heads(i)
        if n == 0 or n_kv == 0 or n % n_kv or head_dim % (16 if positions["do_rotary"] else 8):
            raise UnsupportedModelError(f"fused export: layer {i} has {n} heads, {n_kv} KV heads, head_dim "
                                        f"{head_dim}; GroupQueryAttention needs at least one head, heads % kv_heads "
                                        "== 0 and head_dim % 16 == 0 with rotary, % 8 without")
        if alibi is not None and n != len(slopes):
            raise UnsupportedModelError(f"fused export: layer {i} has {n} heads and the ALiBi bias {len(slopes)} "
                                        "slopes (a head-pruned ALiBi model)")
        norms = block_norms(arch, b, probe)
        x, residual = layer_norm(g, norms[0], pending, residual, f"{p}/input_layernorm", bias)
        x_mlp = x  # one norm: the MLP reads what the attention reads
        if probe["parallel"] and len(norms) == 2:  # the MLP reads the same sum, normed its own way
            x_mlp, _ = layer_norm(g, norms[1], None, residual, f"{p}/post_attention_layernorm")

        qkv = [arch.module(nm) for nm in b.attn.inputs]
        if b.attn.qkv_layout in ("per_head", "grouped"):
            qkv = [_rows(qkv[0], _heads_order(arch, i))]
        elif qkv_chunks:
            if len(qkv) != 1 or n != n_kv or n % qkv_chunks:
                raise UnsupportedModelError(f"fused export: layer {i}'s q/k/v is not one projection of {n} heads in "
                                            f"{qkv_chunks} chunks")
            qkv = [_rows(qkv[0], _chunks_order(n * head_dim, qkv_chunks))]
        if len(qkv) == 1 or all(_is_linear(m) for m in qkv):  # one packed [Q | K | V] input
            qkv_in = [g.linear(x, qkv, f"{p}/attention/query_key_value"), "", ""]
        else:  # separate q / k / v, one of them low-rank
            qkv_in = [g.linear(x, [m], f"{p}/attention/{nm}") for m, nm in zip(qkv, ("query", "key", "value"))]
        if sum(_out_features(m) for m in qkv) != (n + 2 * n_kv) * head_dim:
            raise UnsupportedModelError(f"fused export: layer {i}'s q/k/v projection is not {n} query and {n_kv} "
                                        f"key / value heads of {head_dim}")
        past, present = kv_io(inputs, outputs, i, n_kv, head_dim)
        y = g.op("GroupQueryAttention", [*qkv_in, *past, seqlens_k, total_len, *position_inputs],
                 f"{p}/attention/GQA", outputs=[f"{p}/attention/GQA/output_0", *present], domain=MS, num_heads=n,
                 kv_num_heads=n_kv, scale=_scale(arch.module(b.attn.name), head_dim), local_window_size=-1,
                 **positions)[0]
        attn_out, attn_bias = g.linear(y, [arch.module(b.attn.o)], f"{p}/attention/dense", keep_bias=True)
        if not probe["parallel"]:
            x_mlp, residual = layer_norm(g, norms[1], attn_out, residual, f"{p}/post_attention_layernorm",
                                         attn_bias)

        act = activation(arch.mlp_act(i), "activation", label)
        h = plain_mlp_in(g, x_mlp, arch.module(b.mlp.ins[0]), act, f"{p}/mlp/dense_h_to_4h",
                         arch.mlp_act(i))
        mlp_out, bias = g.linear(h, [arch.module(b.mlp.out)], f"{p}/mlp/dense_4h_to_h", keep_bias=True)
        pending = mlp_out
        if probe["parallel"]:  # one pending sum, one bias (both projections' biases added ahead of time)
            pending = g.op("Add", [attn_out, mlp_out], f"{p}/Add")
            biases = [g.take(nm) for nm in (attn_bias, bias) if nm]
            bias = g.const(f"{p.lstrip('/')}.attention_mlp.bias", sum(biases)) if biases else None

    x, _ = layer_norm(g, arch.module(final_norm), pending, residual, "/gpt_neox/final_layer_norm", bias, last=True)
    lm_head(g, x, head, table, tied)
    return save(g, inputs, outputs, out, block_prefix="/gpt_neox/layers.", layers=len(arch.blocks),
                tied_embeddings=tied, cache_length=cache_length, parallel_residual=probe["parallel"],
                **({"alibi": "scaled" if alibi_scaled else "added"} if alibi is not None
                   else {"rotary_interleaved": interleaved}), embedding_norm=bool(embed_norm),
                **({"qkv_chunks": qkv_chunks} if qkv_chunks else {}))
