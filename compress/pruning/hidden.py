"""Hidden-width pruning (Minitron-style): remove channels of the residual stream everywhere at once.

A hidden channel j lives in: every embedding table's column j (token, position, token type), every norm's
weight / bias entry j (in the blocks and outside: embedding LayerNorm, final norm), input column j of every
projection reading the residual stream (q/k/v or fused qkv, the MLP's input projections, the LM head or a
classifier's first layer), output row j of every projection writing it (attention output, MLP output, a
pooler). Head_dim and head counts stay; the config's hidden_size follows, with head_dim written explicitly,
so a stock config rebuilds the model where its attention reads head_dim from the config (Llama, Qwen2/3,
Mistral, Phi-3). Families that derive head_dim from hidden_size (GPT-2, GPT-NeoX, OPT, BERT-style encoders) or
their embedding scale (Gemma's sqrt(hidden_size)) keep the config's hidden_size and get a `hidden_width`
structure entry instead.

Importance (`activation`): the mean |value| of each channel at the output of every hidden-width norm over the
calibration tokens, summed over norms (Minitron's LayerNorm-activation criterion); `magnitude`: the L2 norm
of the channel's embedding column and of every reading projection's input column."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..architecture import Architecture, build_from_config, find, is_linear, rebuild_mismatch
from ..errors import CheckpointError, UnsupportedModelError
from .arch import linear_weight, out_features, set_module
from .width import select_rows


def config_expresses(model: nn.Module, ad: Architecture, new_hidden: int) -> bool:
    """Does a config with this hidden size (and head_dim explicit) keep every head's shape?"""
    cfg = copy.deepcopy(model.config)
    hd, n_q, n_kv = ad.head_dim(), ad.num_heads(0), ad.num_kv_heads(0)
    try:  # Falcon's head_dim is a read-only property (hidden_size / heads): its config cannot say it
        cfg.hidden_size, cfg.head_dim = new_hidden, hd
        fresh = find(build_from_config(type(model), cfg))
    except Exception:  # noqa: BLE001 - a config that cannot even build this way cannot express it
        return False
    return (fresh.head_dim(), fresh.num_heads(0), fresh.num_kv_heads(0)) == (hd, n_q, n_kv) and not scaled_by_width(
        model, ad)


def scaled_by_width(model: nn.Module, ad: Architecture) -> bool:
    """Does block 0 read the token embeddings times sqrt(hidden_size) (Gemma 1-3)? That scale comes from the
    config's hidden_size (at every forward, or when the model is built), so a narrower hidden_size in the config
    would change it: such a cut keeps the config's width and is recorded as a hidden_width entry."""
    table = model.get_input_embeddings().weight  # the raw rows: Gemma 3's embedding module scales inside
    ids = torch.arange(2, 6, device=table.device)[None]
    seen = []
    hook = ad.layers()[0].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        hook.remove()
    x, e = seen[0].float(), table[ids].detach().float()
    return x.shape == e.shape and torch.allclose(x, e * ad.hidden_size ** 0.5, rtol=1e-4, atol=1e-6)


def hidden_readers_writers(model: nn.Module, ad: Architecture) -> tuple[list[str], list[str]]:
    """(projections whose input is hidden-wide, projections whose output is), blocks by role, the rest by shape."""
    reads, writes = [], []
    for b in ad.blocks:
        reads += b.attn.inputs + b.attn.extras + b.mlp.ins
        writes += [b.attn.o, b.mlp.out]
    prefix = ad.layers_name + "."
    for n, m in model.named_modules():
        if not is_linear(m) or n.startswith(prefix):
            continue
        if out_features(m, inputs=True) == ad.hidden_size:
            reads.append(n)
        if out_features(m) == ad.hidden_size:
            writes.append(n)
    return reads, writes


def embeddings(model: nn.Module, ad: Architecture) -> list[str]:
    prefix = ad.layers_name + "."
    return [n for n, m in model.named_modules() if isinstance(m, nn.Embedding) and not n.startswith(prefix)
            and m.embedding_dim == ad.hidden_size]


def norms(ad: Architecture) -> list[str]:
    return [n for b in ad.blocks for n in b.norms] + ad.outer_norms()


def magnitude_scores(model: nn.Module, ad: Architecture) -> torch.Tensor:
    reads, _ = hidden_readers_writers(model, ad)
    total = torch.zeros(ad.hidden_size, dtype=torch.float64)
    for n in reads:
        total += linear_weight(model.get_submodule(n)).detach().double().pow(2).sum(0)
    for n in embeddings(model, ad):
        total += model.get_submodule(n).weight.detach().double().pow(2).sum(0)
    return total.sqrt()


def activation_scores(model: nn.Module, ad: Architecture, batches: list[dict], task: str, device=None) -> torch.Tensor:
    from .importance import _forward, _hooks, on_device

    total = torch.zeros(ad.hidden_size, dtype=torch.float64)
    mask_now: list[torch.Tensor | None] = [None]

    def hook(mod, args, output):
        y = (output[0] if isinstance(output, tuple) else output).detach().float()
        y = y.reshape(-1, y.shape[-1])
        if mask_now[0] is not None and mask_now[0].numel() == y.shape[0]:
            y = y[mask_now[0].reshape(-1).bool().to(y.device)]
        total.add_(y.abs().mean(0).double().cpu())

    handles = [model.get_submodule(n).register_forward_hook(hook) for n in norms(ad)]
    with on_device(model, device), _hooks(handles), torch.no_grad():
        for batch in batches:
            mask_now[0] = batch.get("attention_mask")
            _forward(model, batch, task)
    return total


def prune_hidden(model: nn.Module, ad: Architecture, keep: list[int], stock: bool = True) -> None:
    """Keep hidden channels `keep` (sorted) everywhere; with `stock`, the config's hidden_size (and head_dim)
    follow, else the config is left as it is (see `hidden_width` entries)."""
    idx = torch.tensor(sorted(keep))
    hd = ad.head_dim()
    reads, writes = hidden_readers_writers(model, ad)
    head = model.get_output_embeddings() if ad.head else None
    for n in embeddings(model, ad):
        emb = model.get_submodule(n)
        emb.weight = nn.Parameter(emb.weight.detach()[:, idx].clone())
        emb.embedding_dim = len(idx)
    for n in norms(ad):
        m = model.get_submodule(n)
        if getattr(m, "weight", None) is not None:  # weightless norms (OLMo's LayerNorm) hold only their shape
            m.weight = nn.Parameter(m.weight.detach()[idx].clone())
        if getattr(m, "bias", None) is not None:
            m.bias = nn.Parameter(m.bias.detach()[idx].clone())
        if isinstance(getattr(m, "normalized_shape", None), tuple):
            m.normalized_shape = (len(idx),)
    for n in dict.fromkeys(reads + writes):
        if ad.tied and n == ad.head:
            continue  # shares the embedding's (already sliced) weight: re-tied below
        m = model.get_submodule(n)
        if n in writes:
            m = select_rows(m, idx, 0)
        if n in reads:
            m = select_rows(m, idx, 1)
        set_module(model, n, m)
    if ad.tied and head is not None:
        head.weight = model.get_input_embeddings().weight
        if hasattr(head, "in_features"):
            head.in_features = len(idx)
    if not stock:
        return
    cfg = model.config
    cfg.hidden_size = len(idx)
    cfg.head_dim = hd
    mismatch = rebuild_mismatch(model)
    if mismatch:  # config_expresses said yes, so this is a part the layer did not find
        raise UnsupportedModelError(f"prune targets hidden: the pruned model does not match its config ({mismatch})")


def apply_hidden_width(model: nn.Module, entry: dict) -> None:
    """Structure entry `hidden_width`: every hidden-wide part resized to the recorded width (weights load next)."""
    size, full = entry["size"], model.config.hidden_size
    if type(size) is not int or not 1 <= size <= full:  # a size of 10**9 built a 10**9-element index list first
        raise CheckpointError(f"hidden_width size {size!r} is not a width between 1 and the model's {full}")
    prune_hidden(model, find(model), list(range(size)), stock=False)
