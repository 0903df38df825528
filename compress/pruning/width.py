"""Width pruning: MLP intermediate channels (through torch-pruning's dependency graph) and attention heads.

MLP channels: the block's projections are wrapped in a small view module (gate/up -> act -> down) and
torch-pruning's DependencyGraph, traced on that view, finds every layer coupled to the removed channels
(gate, up and down for gated MLPs). GPT-2's Conv1D is not known to torch-pruning, so its projections are
converted to nn.Linear for the pruning and back afterwards (the checkpoint stays a stock GPT-2).

Attention heads are pruned by our own code, not torch-pruning: its dependency-graph grouping hangs on
Llama with grouped-query attention (torch-pruning 1.6.1, measured here: it never returned on SmolLM2). For Llama we remove whole KV
groups or the same number of query heads inside every group, so the result is a valid GQA layout; GPT-2 and
BERT use Hugging Face's own `prune_heads`, which records `pruned_heads` in the config so that plain
`from_pretrained` rebuilds the smaller attention."""
from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from ..errors import CheckpointError
from .arch import Adapter, adapter, empty_like_linear, is_conv1d, linear_weight, out_features, set_module, to_conv1d, to_linear


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


def prune_mlp_channels(model: nn.Module, ad: Adapter, i: int, remove: list[int]) -> None:
    """Remove intermediate channels `remove` of block i in place."""
    if not remove:
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


def resize_mlp(model: nn.Module, ad: Adapter, i: int, width: int) -> None:
    """Give block i's MLP `width` intermediate channels (fresh weights: used before loading a checkpoint)."""
    for name in ad.mlp_in(i):
        m = model.get_submodule(name)
        set_module(model, name, empty_like_linear(m, out_features(m, inputs=True), width))
    m = model.get_submodule(ad.mlp_out(i))
    set_module(model, ad.mlp_out(i), empty_like_linear(m, width, out_features(m)))


# ---------------------------------------------------------------------- heads
def _select(m: nn.Linear, idx: torch.Tensor, dim: int) -> nn.Linear:
    """A Linear keeping output rows (dim 0) or input columns (dim 1) `idx`."""
    w = m.weight.detach().index_select(dim, idx)
    new = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        new.weight.copy_(w)
        if m.bias is not None:
            new.bias.copy_(m.bias.detach() if dim == 1 else m.bias.detach()[idx])
    return new


def _head_rows(heads: list[int], hd: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads]) if heads else torch.zeros(0, dtype=torch.long)


def prune_llama_heads(model: nn.Module, ad: Adapter, i: int, keep_q: list[int], keep_kv: list[int]) -> None:
    """Keep query heads `keep_q` and KV heads `keep_kv` of Llama block i.

    `keep_q` must list, group by group in the order of `keep_kv`, the same number of query heads per kept
    KV group, because Hugging Face maps query head h to KV head h // (num_heads / num_kv_heads)."""
    n_q, n_kv = ad.num_heads(i), ad.num_kv_heads(i)
    rep = n_q // n_kv
    per_group = len(keep_q) // len(keep_kv)
    assert per_group * len(keep_kv) == len(keep_q)
    for g, kv in enumerate(keep_kv):  # the layout invariant that makes repeat_kv pair heads correctly
        assert all(q // rep == kv for q in keep_q[g * per_group:(g + 1) * per_group]), (keep_q, keep_kv)
    hd = ad.head_dim()
    a = ad.attn_name(i)
    attn = model.get_submodule(a)
    q_rows, kv_rows = _head_rows(keep_q, hd), _head_rows(keep_kv, hd)
    attn.q_proj = _select(attn.q_proj, q_rows, 0)
    attn.k_proj = _select(attn.k_proj, kv_rows, 0)
    attn.v_proj = _select(attn.v_proj, kv_rows, 0)
    attn.o_proj = _select(attn.o_proj, q_rows, 1)
    attn.num_key_value_groups = per_group


def set_llama_heads(model: nn.Module, n_q: int, n_kv: int) -> None:
    """Record uniform head counts in a Llama config (head_dim explicit, since hidden / heads changes)."""
    cfg = model.config
    cfg.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cfg.num_attention_heads, cfg.num_key_value_heads = n_q, n_kv


def prune_hf_heads(model: nn.Module, heads: dict[int, list[int]]) -> None:
    """GPT-2 / BERT: Hugging Face's prune_heads (indices are those of the original, unpruned layer)."""
    model.prune_heads({i: h for i, h in heads.items() if h})


def original_head_ids(model: nn.Module, i: int, n_original: int) -> list[int]:
    """GPT-2 / BERT: the original indices of the heads still present in block i."""
    pruned = set((model.config.pruned_heads or {}).get(i, []))
    return [h for h in range(n_original) if h not in pruned]


__all__ = ["linear_weight", "prune_mlp_channels", "resize_mlp", "prune_llama_heads", "set_llama_heads",
           "prune_hf_heads", "original_head_ids"]


def apply_mlp_widths(model: nn.Module, entry: dict) -> None:
    """Structure entry `mlp_widths`: every block's MLP resized to its recorded width (per-layer pruning)."""
    ad = adapter(model)
    widths = entry["widths"]
    if len(widths) != ad.num_layers():
        raise CheckpointError(f"mlp_widths lists {len(widths)} layers, the model has {ad.num_layers()}")
    for i, w in enumerate(widths):
        if w != ad.mlp_width(i):
            resize_mlp(model, ad, i, w)
