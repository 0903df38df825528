"""Width pruning: MLP intermediate channels (through torch-pruning's dependency graph) and attention heads.

The parts come from compress/architecture.py. MLP channels: the block's projections are wrapped in a small
view module (gate/up -> act -> down) and torch-pruning's DependencyGraph, traced on that view, finds every
layer coupled to the removed channels (gate, up and down for gated MLPs). GPT-2's Conv1D is not known to
torch-pruning, so its projections are converted to nn.Linear for the pruning and back afterwards (the
checkpoint stays a stock GPT-2). A fused gate_up projection (Phi-3: gate rows, then up rows) is sliced
directly, channel j kept or removed in both halves together.

Attention heads are pruned by our own code, not torch-pruning: its dependency-graph grouping hangs on
Llama with grouped-query attention (torch-pruning 1.6.1, measured here: it never returned on SmolLM2). We
remove whole KV groups or the same number of query heads inside every group, so the result is a valid GQA
layout; separate q/k/v and fused projections alike (Phi-3's [q | k | v] rows, GPT-NeoX's per-head [q k v]
rows), q, k and v rows of a kept head kept together. Where the config can say the new head counts (an
explicit head_dim: Llama, Qwen, Mistral, Gemma, Phi-3) the result is stock; GPT-2 and the BERT family use
Hugging Face's own `prune_heads`, which records `pruned_heads` in the config so that plain `from_pretrained`
rebuilds the smaller attention; anything else (GPT-NeoX) records an `attention_heads` structure entry."""
from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from ..errors import CheckpointError, UnsupportedModelError
from ..architecture import Architecture, find
from .arch import empty_like_linear, is_conv1d, linear_weight, out_features, set_module, to_conv1d, to_linear


class _MLPView(nn.Module):
    """gate/up -> act (-> * up) -> down, holding the model's own (Linear) projections."""

    def __init__(self, ins: list[nn.Linear], out: nn.Linear, act: nn.Module):
        super().__init__()
        self.ins, self.out, self.act = nn.ModuleList(ins), out, act

    def forward(self, x):
        h = self.act(self.ins[0](x))
        if len(self.ins) == 2:
            h = h * self.ins[1](x)
        return self.out(h)


def prune_mlp_channels(model: nn.Module, ad: Architecture, i: int, remove: list[int]) -> None:
    """Remove intermediate channels `remove` of block i in place."""
    if not remove:
        return
    if ad.mlp_kind(i) == "fused_gated" or ad.mlp_act(i) is None:
        _slice_mlp(model, ad, i, remove)
        return
    in_names, out_name = ad.mlp_in(i), ad.mlp_out(i)
    originals = [model.get_submodule(n) for n in in_names] + [model.get_submodule(out_name)]
    conv = is_conv1d(originals[-1])
    lins = [to_linear(m) for m in originals]
    view = _MLPView(lins[:-1], lins[-1], ad.mlp_act(i))
    hidden = lins[0].in_features
    graph = tp.DependencyGraph().build_dependency(
        view, example_inputs=torch.zeros(1, 2, hidden, dtype=lins[0].weight.dtype))
    group = graph.get_pruning_group(lins[0], tp.prune_linear_out_channels, idxs=sorted(remove))
    covered = {id(dep.target.module) for dep, _ in group}
    if not all(id(m) in covered for m in lins):  # the graph must couple gate, up and down
        raise RuntimeError(f"torch-pruning did not couple every projection of the MLP in block {i}")
    group.prune()
    for name, lin in zip(in_names + [out_name], lins):
        set_module(model, name, to_conv1d(lin) if conv else lin)


def _slice_mlp(model: nn.Module, ad: Architecture, i: int, remove: list[int]) -> None:
    """Fused gate_up (gate rows, then up rows: keep channel j in both halves) or an MLP whose activation was
    not found: keep the channels by slicing rows of the input projection(s) and columns of the output."""
    width = ad.mlp_width(i)
    gone = set(remove)
    keep = torch.tensor([j for j in range(width) if j not in gone])
    rows = torch.cat([keep, keep + width]) if ad.mlp_kind(i) == "fused_gated" else keep
    for name in ad.mlp_in(i):
        set_module(model, name, select_rows(model.get_submodule(name), rows, 0))
    set_module(model, ad.mlp_out(i), select_rows(model.get_submodule(ad.mlp_out(i)), keep, 1))


def resize_mlp(model: nn.Module, ad: Architecture, i: int, width: int) -> None:
    """Give block i's MLP `width` intermediate channels (fresh weights: used before loading a checkpoint)."""
    rows = 2 * width if ad.mlp_kind(i) == "fused_gated" else width
    for name in ad.mlp_in(i):
        m = model.get_submodule(name)
        set_module(model, name, empty_like_linear(m, out_features(m, inputs=True), rows))
    m = model.get_submodule(ad.mlp_out(i))
    set_module(model, ad.mlp_out(i), empty_like_linear(m, width, out_features(m)))


# ---------------------------------------------------------------------- heads
def select_rows(m: nn.Module, idx: torch.Tensor, dim: int) -> nn.Module:
    """A module of the same type (Linear or Conv1D) keeping output rows (dim 0) or input columns (dim 1) `idx`
    of its [out, in] weight."""
    w = linear_weight(m).detach().index_select(dim, idx)
    new = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        new.weight.copy_(w)
        if m.bias is not None:
            new.bias.copy_(m.bias.detach() if dim == 1 else m.bias.detach()[idx])
    return to_conv1d(new) if is_conv1d(m) else new


_select = select_rows


def _head_rows(heads: list[int], hd: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads]) if heads else torch.zeros(0, dtype=torch.long)


def _set_head_attrs(attn: nn.Module, n_q: int, n_kv: int, hd: int) -> None:
    """Head counts some attention modules keep as attributes (read in forward), and the width of the heads
    where a module keeps it (StableLM's hidden_size, ModernBERT's all_head_size, XGLM's embed_dim: their attention
    outputs are reshaped to it)."""
    heads = next((v for a in ("num_heads", "num_attention_heads") if isinstance(v := getattr(attn, a, None), int)),
                 None)
    for width in ("hidden_size", "all_head_size", "embed_dim"):
        if heads is not None and getattr(attn, width, None) == heads * hd:
            setattr(attn, width, n_q * hd)
    for attr, value in (("num_heads", n_q), ("num_attention_heads", n_q), ("num_key_value_heads", n_kv),
                        ("num_kv_heads", n_kv), ("num_key_value_groups", n_q // n_kv)):  # num_kv_heads: Falcon
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, value)


def _head_holders(model: nn.Module, a) -> list[str]:
    """The attention module and, where q/k/v sit one level deeper (DeBERTa's attention.self), that module too:
    each may keep head counts read in forward."""
    inner = (a.q or a.qkv).rpartition(".")[0]
    return [a.name] + ([inner] if inner != a.name else [])


def _set_heads(model: nn.Module, a, n_q: int, n_kv: int, hd: int) -> None:
    for name in _head_holders(model, a):
        _set_head_attrs(model.get_submodule(name), n_q, n_kv, hd)


def prune_attention_heads(model: nn.Module, ad: Architecture, i: int, keep_q: list[int], keep_kv: list[int]) -> None:
    """Keep query heads `keep_q` and KV heads `keep_kv` of block i, for separate or fused q/k/v.

    `keep_q` must list, group by group in the order of `keep_kv`, the same number of query heads per kept
    KV group, because Hugging Face maps query head h to KV head h // (num_heads / num_kv_heads). A fused
    projection keeps its q, k and v rows of the kept heads together (GPT-NeoX: per head [q k v])."""
    n_q, n_kv = ad.num_heads(i), ad.num_kv_heads(i)
    rep = n_q // n_kv
    per_group = len(keep_q) // len(keep_kv)
    assert per_group * len(keep_kv) == len(keep_q)
    for g, kv in enumerate(keep_kv):  # the layout invariant that makes repeat_kv pair heads correctly
        assert all(q // rep == kv for q in keep_q[g * per_group:(g + 1) * per_group]), (keep_q, keep_kv)
    hd = ad.head_dim()
    a = ad.attn(i)
    for norm in (a.q_norm, a.k_norm):  # StableLM's qk_layernorm: a LayerNorm module per head
        if norm and not isinstance(getattr(model.get_submodule(norm), "weight", None), torch.Tensor):
            raise UnsupportedModelError(f"prune targets heads: {norm} is a {type(model.get_submodule(norm)).__name__}"
                                        " (a norm module per head), which head pruning does not cut; prune other "
                                        "targets")
    q_rows, kv_rows = _head_rows(keep_q, hd), _head_rows(keep_kv, hd)
    if a.qkv_layout == "separate":
        for name, rows in ((a.q, q_rows), (a.k, kv_rows), (a.v, kv_rows)):
            set_module(model, name, select_rows(model.get_submodule(name), rows, 0))
    else:
        q, k, v = ad.qkv_rows(i)
        if a.qkv_layout in ("per_head", "grouped"):  # per kept KV head [its kept q heads, k, v]
            rows = torch.cat([torch.cat([*q[keep_q[j * per_group:(j + 1) * per_group]], k[kv], v[kv]])
                              for j, kv in enumerate(keep_kv)])
        else:
            rows = torch.cat([q[keep_q].reshape(-1), k[keep_kv].reshape(-1), v[keep_kv].reshape(-1)])
        set_module(model, a.qkv, select_rows(model.get_submodule(a.qkv), rows, 0))
    set_module(model, a.o, select_rows(model.get_submodule(a.o), q_rows, 1))
    attn = model.get_submodule(a.name)
    for name, p in list(attn.named_parameters(recurse=False)):  # one value per query head: gpt-oss's sinks
        if p.dim() == 1 and p.shape[0] == n_q:
            setattr(attn, name, nn.Parameter(p.detach()[keep_q].clone()))
    for name in a.extras:  # multi-head only (DeBERTa)
        set_module(model, name, select_rows(model.get_submodule(name), q_rows, 0))
    for norm, keep, rows, width in ((a.q_norm, keep_q, q_rows, n_q * hd), (a.k_norm, keep_kv, kv_rows, n_kv * hd)):
        m = model.get_submodule(norm) if norm else None
        if m is not None and m.weight.dim() == 2:  # Cohere: gains per head, [heads, head_dim]
            m.weight = nn.Parameter(m.weight.detach()[keep].clone())
        elif m is not None and m.weight.shape[0] == width != hd:  # OLMo-2: one q (k) norm over all heads
            m.weight = nn.Parameter(m.weight.detach()[rows].clone())
    _set_heads(model, a, len(keep_q), len(keep_kv), hd)


prune_llama_heads = prune_attention_heads


def check_qkv_rows(model: nn.Module, ad: Architecture) -> None:
    """A packed q/k/v projection's row map, tested: with the rows it calls v zeroed (block 0), the attention
    output projection must read zeros. A packing the map does not know (CodeGen's qkv_proj, four interleaved
    chunks of q / v / k) fails, and is refused rather than pruned in the wrong rows."""
    a = ad.attn(0)
    if a.qkv_layout == "separate":
        return
    qkv = model.get_submodule(a.qkv)
    rows = ad.qkv_rows(0)[2].reshape(-1)
    params = [linear_weight(qkv)] + ([qkv.bias] if getattr(qkv, "bias", None) is not None else [])
    saved = [t[rows].clone() for t in params]
    seen = []
    hook = model.get_submodule(a.o).register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            for t in params:  # in place (a Conv1D's [out, in] view writes through to its weight)
                t[rows] = 0
            model(input_ids=torch.arange(2, 6, device=params[0].device)[None])
    finally:
        hook.remove()
        with torch.no_grad():
            for t, old in zip(params, saved):
                t[rows] = old
    if seen[0].abs().max() > 0:
        raise UnsupportedModelError(f"prune targets heads: the rows of {a.qkv} are not packed as the map reads them "
                                    f"({a.qkv_layout}: zeroing its v rows left the attention output nonzero; an "
                                    "interleaved packing, e.g. CodeGen's); prune other targets")


def set_config_heads(model: nn.Module, n_q: int, n_kv: int, hd: int) -> None:
    """Record uniform head counts in the config (head_dim explicit, since hidden / heads changes)."""
    cfg = model.config
    cfg.head_dim = hd
    cfg.num_attention_heads, cfg.num_key_value_heads = n_q, n_kv


def set_llama_heads(model: nn.Module, n_q: int, n_kv: int) -> None:
    cfg = model.config
    set_config_heads(model, n_q, n_kv, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def config_expresses_heads(model: nn.Module, ad: Architecture, n_q: int, n_kv: int) -> bool:
    """Would a config with these head counts (and head_dim explicit) rebuild attention of this shape?"""
    import copy

    from ..architecture import build_from_config, find

    cfg = copy.deepcopy(model.config)
    hd = ad.head_dim()
    try:  # Falcon's head_dim is a read-only property (hidden_size / heads): its config cannot say it
        cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads = hd, n_q, n_kv
        fresh = find(build_from_config(type(model), cfg))
        return (fresh.head_dim(), fresh.num_heads(0), fresh.num_kv_heads(0), fresh.hidden_size) == (
            hd, n_q, n_kv, ad.hidden_size)
    except Exception:  # a config that cannot even build this way cannot express it
        return False


def apply_attention_heads(model: nn.Module, entry: dict) -> None:
    """Structure entry `attention_heads`: each block's attention projections sized for its recorded query and
    KV head counts (for families whose config derives head_dim from hidden_size, e.g. GPT-NeoX)."""
    ad = find(model)
    if len(entry["heads"]) != ad.num_layers():
        raise CheckpointError(f"attention_heads lists {len(entry['heads'])} layers, the model has {ad.num_layers()}")
    hd = ad.head_dim()
    for i, (n_q, n_kv) in enumerate(zip(entry["heads"], entry["kv_heads"])):
        a = ad.attn(i)
        hidden = out_features(model.get_submodule(a.o))
        sizes = ({a.q: n_q * hd, a.k: n_kv * hd, a.v: n_kv * hd} if a.qkv_layout == "separate"
                 else {a.qkv: (n_q + 2 * n_kv) * hd})
        for name, rows in sizes.items():
            m = model.get_submodule(name)
            set_module(model, name, empty_like_linear(m, out_features(m, inputs=True), rows))
        set_module(model, a.o, empty_like_linear(model.get_submodule(a.o), n_q * hd, hidden))
        for name in a.extras:
            m = model.get_submodule(name)
            set_module(model, name, empty_like_linear(m, out_features(m, inputs=True), n_q * hd))
        _set_heads(model, a, n_q, n_kv, hd)


def hf_prunes_heads(model: nn.Module) -> bool:
    """Does the model implement Hugging Face's prune_heads (GPT-2, BERT, RoBERTa, DistilBERT)? DeBERTa's is a
    stub raising NotImplementedError (at once: asked to prune nothing, it says so and changes nothing)."""
    base = getattr(model, "base_model", model)
    if not hasattr(base, "_prune_heads"):
        return False
    try:
        base._prune_heads({})
    except NotImplementedError:
        return False
    return True


def prune_hf_heads(model: nn.Module, heads: dict[int, list[int]]) -> None:
    """GPT-2 / BERT: Hugging Face's prune_heads (indices are those of the original, unpruned layer)."""
    model.prune_heads({i: h for i, h in heads.items() if h})


def original_head_ids(model: nn.Module, i: int, n_original: int) -> list[int]:
    """GPT-2 / BERT: the original indices of the heads still present in block i."""
    pruned = set((model.config.pruned_heads or {}).get(i, []))
    return [h for h in range(n_original) if h not in pruned]


__all__ = ["linear_weight", "prune_mlp_channels", "resize_mlp", "prune_attention_heads", "prune_llama_heads",
           "set_config_heads", "set_llama_heads", "config_expresses_heads", "apply_attention_heads", "prune_hf_heads",
           "original_head_ids", "select_rows"]


def apply_mlp_widths(model: nn.Module, entry: dict) -> None:
    """Structure entry `mlp_widths`: every block's MLP resized to its recorded width (per-layer pruning)."""
    ad = find(model)
    widths = entry["widths"]
    if len(widths) != ad.num_layers():
        raise CheckpointError(f"mlp_widths lists {len(widths)} layers, the model has {ad.num_layers()}")
    for i, w in enumerate(widths):
        if w != ad.mlp_width(i):
            resize_mlp(model, ad, i, w)
