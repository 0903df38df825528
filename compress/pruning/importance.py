"""Importance criteria for structured pruning, all measured at the input of a block's output projection.

A *unit* is what gets removed together: one MLP intermediate channel (the j-th input column of down_proj
and the rows of gate/up that make it) or one attention head (a head_dim-wide slice of o_proj's input and
the q/k/v rows that make it). Removing a unit is the same as zeroing its slice of the output projection's
input, which gives the three criteria a common form:

- ``magnitude``: the L1 or L2 norm of every weight that belongs to the unit (data-free);
- ``activation``: the mean norm, over calibration tokens, of the unit's contribution to the block output,
  ``||W_out[:, unit] @ x[unit]||`` (for a single channel: ``|x_j| * ||W_out[:, j]||``). A channel with large
  activations but tiny outgoing weights contributes little, so plain ``mean |x_j|`` would rank it wrongly;
- ``taylor``: the first-order estimate of the loss change when the unit is removed,
  ``sum(W_out[:, unit] * dL/dW_out[:, unit]) = sum_t x_unit(t) . dL/dx_unit(t)``, squared per calibration
  batch and summed over batches (Molchanov et al. 2019), so that its sign and batch noise do not cancel out.

Scores are comparable across blocks for activation and taylor (residual-stream units, loss units), which is
what a global ranking needs; magnitude is only comparable within one block."""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Iterable

import torch
from torch import nn

from ..errors import ConfigError
from ..architecture import Architecture
from ..models import check_length
from .arch import linear_weight

CRITERIA = ("magnitude", "taylor", "activation")


# ---------------------------------------------------------------------- calibration data
def calibration_batches(ctx, tokenizer, task: str, *, samples: int, seq_len: int, batch_size: int,
                        why: str, model: nn.Module, field: str,
                        without_data: str = "importance: magnitude") -> list[dict[str, torch.Tensor]]:
    """`samples` sequences of calibration text in batches: LM windows for causal LMs, padded texts otherwise;
    `seq_len` (config `field`) must fit `model`'s positions. `without_data`: the caller's option that needs no
    data, named in the error when there is none."""
    if ctx is None or ctx.data is None or (ctx.data.specs.get("calibration") is None):
        raise ConfigError(
            f"{why} needs calibration data: set `data.calibration` (or `data.train`) in the pipeline config "
            f"(or pass a PassContext with data), or use {without_data}"
        )
    check_length(model, seq_len, field)
    if task == "causal-lm":
        windows = ctx.data.lm_windows("calibration", tokenizer, seq_len, max_tokens=samples * seq_len)
        return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(batch_size)]
    from ..data import text_batches

    ds = ctx.data.dataset("calibration")
    out, n = [], 0
    for batch in text_batches(tokenizer, ds, batch_size, seq_len):
        out.append(batch)
        n += len(batch["input_ids"])
        if n >= samples:
            break
    return out


def _forward(model: nn.Module, batch: dict, task: str, with_loss: bool = False):
    device = next(model.parameters()).device
    accepted = inspect.signature(model.forward).parameters  # DistilBERT takes no token_type_ids
    inputs = {k: v.to(device) for k, v in batch.items()
              if k in ("input_ids", "attention_mask", "token_type_ids") and k in accepted}
    if with_loss:
        if task == "causal-lm":
            inputs["labels"] = batch["input_ids"]
        elif task == "sequence-classification" and "labels" in batch:
            inputs["labels"] = batch["labels"]
        else:
            raise ConfigError(
                f"importance: taylor needs a training loss, and a {task} model without labels has none; "
                "use importance: activation or magnitude (or labelled calibration data for classifiers)"
            )
    return model(**inputs, use_cache=False) if task == "causal-lm" else model(**inputs)


@contextmanager
def on_device(model: nn.Module, device: torch.device | str | None):
    """Run the calibration forwards on `device` (the pipeline's GPU when it has one). The model comes back to
    the CPU afterwards, where the pruning surgery and the factorizations happen; scores are kept on the CPU."""
    device = torch.device(device or "cpu")
    if device.type == "cpu":
        yield
        return
    model.to(device)
    try:
        yield
    finally:
        model.to("cpu")


@contextmanager
def _hooks(handles: list):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------- data-driven scores
def output_unit_scores(model: nn.Module, out_names: list[str], unit_size: int, batches: list[dict],
                       task: str, criterion: str, device=None) -> dict[str, torch.Tensor]:
    """Per-unit scores [in_features // unit_size] for each output projection in `out_names`, computed on
    `device`."""
    with on_device(model, device):
        return _output_unit_scores(model, out_names, unit_size, batches, task, criterion)


def _output_unit_scores(model, out_names, unit_size, batches, task, criterion):
    modules = {n: model.get_submodule(n) for n in out_names}
    scores = {n: torch.zeros(linear_weight(m).shape[1] // unit_size, dtype=torch.float64)
              for n, m in modules.items()}
    counts = dict.fromkeys(out_names, 0)
    mask_now: list[torch.Tensor | None] = [None]

    if criterion == "activation":
        def make_hook(name):
            def hook(mod, args):
                x = args[0].detach().float()
                x = x.reshape(-1, x.shape[-1])
                if mask_now[0] is not None and mask_now[0].numel() == x.shape[0]:  # per-token input
                    x = x[mask_now[0].reshape(-1).bool().to(x.device)]
                w = linear_weight(mod).detach().float()  # [out, in]
                if unit_size == 1:
                    contrib = x.abs() * w.norm(dim=0)  # |x_j| * ||W[:, j]||
                else:
                    u = w.shape[1] // unit_size
                    contrib = torch.einsum("nus,ous->nuo", x.view(-1, u, unit_size),
                                           w.view(w.shape[0], u, unit_size)).norm(dim=-1)
                scores[name] += contrib.sum(0).double().cpu()
                counts[name] += x.shape[0]
            return hook

        handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
        with _hooks(handles), torch.no_grad():
            for batch in batches:
                mask_now[0] = batch.get("attention_mask")
                _forward(model, batch, task)
        return {n: s / max(counts[n], 1) for n, s in scores.items()}

    if criterion == "taylor":
        was_training = model.training
        model.eval()  # no dropout: the estimate is for the deployed model
        model.requires_grad_(True)  # a copy of a frozen teacher would have none
        try:
            for batch in batches:
                model.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    _forward(model, batch, task, with_loss=True).loss.backward()
                for n in out_names:
                    m = modules[n]
                    wg = (linear_weight(m).detach() * _grad_as_linear(m)).double()  # [out, in]
                    per_unit = wg.sum(0).view(-1, unit_size).sum(1)
                    scores[n] += per_unit.pow(2).cpu()
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)
        return scores

    raise ValueError(criterion)


def _grad_as_linear(m: nn.Module) -> torch.Tensor:
    g = m.weight.grad
    if g is None:
        return torch.zeros_like(linear_weight(m))
    return g.t() if type(m).__name__ == "Conv1D" else g


# ---------------------------------------------------------------------- magnitude
def _norm(rows: Iterable[torch.Tensor], p: int) -> torch.Tensor:
    """Sum over tensors [units, ...] of |w|^p per unit, then the p-th root: the norm of the unit's weights."""
    total = None
    for r in rows:
        v = r.detach().double().abs().pow(p).reshape(r.shape[0], -1).sum(1)
        total = v if total is None else total + v
    return total.pow(1.0 / p)


def mlp_channel_scores(model: nn.Module, ad: Architecture, layers: list[int], criterion: str, *,
                       batches: list[dict] | None = None, task: str = "causal-lm", norm: int = 2,
                       device=None) -> dict[int, torch.Tensor]:
    """Per MLP intermediate channel of each block in `layers`: the `criterion` score (magnitude needs no
    batches; activation and taylor need calibration `batches`, see `calibration_batches`)."""
    if criterion == "magnitude":
        return {i: mlp_magnitude(model, ad, i, norm) for i in layers}
    if batches is None:
        raise ConfigError(f"importance: {criterion} needs calibration batches")
    outs = {i: ad.mlp_out(i) for i in layers}
    s = output_unit_scores(model, list(outs.values()), 1, batches, task, criterion, device)
    return {i: s[o] for i, o in outs.items()}


def mlp_magnitude(model: nn.Module, ad: Architecture, i: int, p: int) -> torch.Tensor:
    ins = [linear_weight(model.get_submodule(n)) for n in ad.mlp_in(i)]  # [width, hidden]
    if ad.mlp_kind(i) == "fused_gated":  # one [2 x width, hidden] weight: gate rows, then up rows
        ins = list(ins[0].chunk(2))
    out = linear_weight(model.get_submodule(ad.mlp_out(i)))  # [hidden, width]
    return _norm([*ins, out.t()], p)


def head_magnitude(model: nn.Module, ad: Architecture, i: int, p: int) -> torch.Tensor:
    """Per query head: its q rows and o columns (k/v are shared within a KV group and scored there)."""
    hd, h = ad.head_dim(), ad.num_heads(i)
    q = _q_weight(model, ad, i).reshape(h, hd, -1)
    o = linear_weight(model.get_submodule(ad.attn_out(i))).t().reshape(h, hd, -1)
    return _norm([q, o], p)


def kv_magnitude(model: nn.Module, ad: Architecture, i: int, p: int) -> torch.Tensor:
    """Per KV head (grouped-query attention): its k and v rows."""
    hd, kv = ad.head_dim(), ad.num_kv_heads(i)
    _, k, v = ad.qkv_weights(i)
    return _norm([k.reshape(kv, hd, -1), v.reshape(kv, hd, -1)], p)


def _q_weight(model, ad: Architecture, i: int) -> torch.Tensor:
    """A head's q rows; with one KV head per query head (multi-head attention) its k and v rows too, since
    they are removed together (the columns side by side, so reshape(heads, head_dim, -1) groups per head)."""
    q, k, v = ad.qkv_weights(i)
    if ad.num_kv_heads(i) != ad.num_heads(i):
        return q
    return torch.cat([q, k, v], dim=1)


# ---------------------------------------------------------------------- block (depth) importance
def block_scores(model: nn.Module, ad: Architecture, batches: list[dict], task: str, device=None) -> torch.Tensor:
    """How much each block changes its input: mean over tokens of 1 - cos(h_in, h_out). Low = removable."""
    n = ad.num_layers()
    total = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    mask_now: list[torch.Tensor | None] = [None]

    def make_hook(i):
        def hook(mod, args, kwargs, output):
            h_in = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))
            h_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # [B, T]
            if mask_now[0] is not None:
                cos = cos[mask_now[0].bool().to(cos.device)]
            total[i] += (1 - cos).sum().double().cpu()
            count[i] += cos.numel()
        return hook

    handles = [layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(ad.layers())]
    with on_device(model, device), _hooks(handles), torch.no_grad():
        for batch in batches:
            mask_now[0] = batch.get("attention_mask")
            _forward(model, batch, task)
    return total / count.clamp_min(1)


def expert_scores(model: nn.Module, ad: Architecture, batches: list[dict], task: str, device=None) -> dict:
    """{block: the mean router probability of each expert over calibration tokens} for the mixture-of-experts
    blocks: the share of the routing each expert gets (its softmax over the router's logits, padding left out).
    Low = rarely routed to, removable."""
    blocks = ad.moe_blocks()
    total = {i: torch.zeros(ad.num_experts(i), dtype=torch.float64) for i in blocks}
    count = dict.fromkeys(blocks, 0)
    mask_now: list[torch.Tensor | None] = [None]

    def make_hook(i):
        def hook(mod, args, output):  # gpt-oss's router returns its top-k: its logits from its input then
            logits = output if isinstance(output, torch.Tensor) else \
                torch.nn.functional.linear(args[0], mod.weight, mod.bias)
            p = torch.softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])  # [tokens, experts]
            if mask_now[0] is not None:
                p = p[mask_now[0].reshape(-1).bool().to(p.device)]
            total[i] += p.sum(0).double().cpu()
            count[i] += p.shape[0]
        return hook

    handles = [model.get_submodule(ad.blocks[i].mlp.router).register_forward_hook(make_hook(i)) for i in blocks]
    with on_device(model, device), _hooks(handles), torch.no_grad():
        for batch in batches:
            mask_now[0] = batch.get("attention_mask")
            _forward(model, batch, task)
    return {i: total[i] / max(count[i], 1) for i in blocks}
