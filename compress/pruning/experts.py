"""Expert pruning for mixture-of-experts blocks (Mixtral, Qwen2/3-MoE, OLMoE, PhiMoE, Granite-MoE, gpt-oss): keep some
of a block's experts and the router's rows that score them, so tokens are routed among the kept ones only.

Every mixture-of-experts block keeps the same number of experts, which the config's expert count then states
(num_local_experts / num_experts): the pruned model reloads with plain from_pretrained. Experts are ranked by
the share of the routing they get on calibration data (importance.expert_scores)."""
from __future__ import annotations

import torch
from torch import nn

from ..architecture import Architecture
from ..errors import ConfigError

EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts")  # Mixtral / PhiMoE; Qwen2/3-MoE, OLMoE
TOP_K_FIELDS = ("num_experts_per_tok", "top_k")


def experts_per_token(model: nn.Module) -> int | None:
    return next((v for f in TOP_K_FIELDS if isinstance(v := getattr(model.config, f, None), int)), None)


def keep_count(model: nn.Module, ad: Architecture, ratio: float, field: str = "prune.ratio") -> int:
    """Experts every block keeps: its count less `ratio` of it, at least the experts each token is routed to."""
    counts = {ad.num_experts(i) for i in ad.moe_blocks()}
    if len(counts) != 1:
        raise ConfigError(f"{field}: the mixture-of-experts blocks hold different numbers of experts ({sorted(counts)})"
                          "; a stock config states one count, so prune experts in a model whose blocks agree")
    n = counts.pop()
    keep = n - round(n * ratio)
    top_k = experts_per_token(model) or 1
    if keep < top_k:
        raise ConfigError(f"{field}={ratio} would keep {keep} of {n} experts per block, fewer than the {top_k} each "
                          f"token is routed to (num_experts_per_tok); use a ratio of at most {(n - top_k) / n:.2f}")
    return keep


def keep_experts(model: nn.Module, ad: Architecture, i: int, keep: list[int]) -> None:
    """Keep experts `keep` (sorted) of block i: its ModuleList (or the slices of the [experts, ...] tensors holding
    them, biases too) and the router's rows (and bias) for them."""
    b = ad.blocks[i].mlp
    router = model.get_submodule(b.router)
    idx, before = torch.tensor(keep), router.weight.shape[0]
    with torch.no_grad():
        router.weight = nn.Parameter(router.weight.detach()[idx].clone())
        if router.bias is not None:
            router.bias = nn.Parameter(router.bias.detach()[idx].clone())
        for owner in dict.fromkeys(name.rpartition(".")[0] for name in b.parallel or ()):  # and their biases
            m = model.get_submodule(owner)
            for name, p in list(m.named_parameters(recurse=False)):
                if p.shape[0] == before:
                    setattr(m, name, nn.Parameter(p.detach()[idx].clone()))
    router.out_features = len(keep)
    if b.experts:
        experts = model.get_submodule(b.experts)
        parent, _, attr = b.experts.rpartition(".")
        setattr(model.get_submodule(parent), attr, nn.ModuleList([experts[j] for j in keep]))


def set_expert_count(model: nn.Module, before: int, after: int) -> None:
    """The config's expert count, and the attributes modules keep of it (each block's num_experts, the model's
    own for its load-balancing loss)."""
    field = next((f for f in EXPERT_COUNT_FIELDS if getattr(model.config, f, None) == before), None)
    if field is None:
        raise ConfigError(f"prune targets experts: the config states no expert count of {before} "
                          f"({' / '.join(EXPERT_COUNT_FIELDS)}), so the pruned model would not reload")
    setattr(model.config, field, after)
    for m in model.modules():
        if getattr(m, "num_experts", None) == before:
            m.num_experts = after
