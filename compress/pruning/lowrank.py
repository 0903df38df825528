"""Low-rank factorization: modules and the truncated (activation-aware) SVD.

A linear layer W [out, in] becomes ``second(first(x))`` with first: in -> r and second: r -> out, which
saves parameters and time only when r * (in + out) < in * out. Plain SVD keeps the directions with the
most weight energy; the activation-aware variants keep those the calibration data uses:

- ``asvd``: scale input column j by s_j = mean|x_j|^alpha before the SVD and undo it after (ASVD,
  Yuan et al. 2023): columns fed by large activations are truncated less;
- ``whiten``: multiply by the Cholesky factor L of the input covariance X^T X (SVD-LLM, Wang et al. 2024),
  so the truncation minimizes the output error ||(W - W_r) X|| rather than the weight error."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError, UnsupportedModelError
from .arch import linear_weight, set_module


class LowRankLinear(nn.Module):
    """x -> second(first(x)): a rank-r replacement of a Linear (or GPT-2 Conv1D) layer."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, dtype=dtype)

    def forward(self, x):
        return self.second(self.first(x))


class LowRankEmbedding(nn.Module):
    """An embedding table E [V, d] stored as weight [V, r] @ proj [r -> d].

    `weight` keeps the name Hugging Face ties to the LM head, so a tied LowRankLMHead shares it."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, padding_idx: int | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rank, self.padding_idx = (
            num_embeddings, embedding_dim, rank, padding_idx)
        self.weight = nn.Parameter(torch.empty(num_embeddings, rank, dtype=dtype))
        self.proj = nn.Linear(rank, embedding_dim, bias=False, dtype=dtype)

    def forward(self, ids):
        return self.proj(F.embedding(ids, self.weight, self.padding_idx))


class LowRankLMHead(nn.Module):
    """logits = h @ E^T with E factorized as in `embedding`: h -> [r] (proj^T) -> [V] (weight, tied)."""

    def __init__(self, embedding: LowRankEmbedding):
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)  # a reference, not a submodule: no duplicate keys
        self.weight = embedding.weight
        self.out_features = embedding.num_embeddings

    def forward(self, h):
        return F.linear(F.linear(h, self._embedding.proj.weight.t()), self.weight)


def factor_rank_limit(in_features: int, out_features: int) -> int:
    """The largest rank that still saves parameters: r * (in + out) < in * out."""
    return math.ceil(in_features * out_features / (in_features + out_features)) - 1


def svd_factors(weight: torch.Tensor, *, scale: torch.Tensor | None = None, whiten: torch.Tensor | None = None):
    """(U, S, Vh) of the (scaled / whitened) weight in float64, plus the map that undoes the transform on Vh."""
    w = weight.detach().double()
    if scale is not None:
        w = w * scale.double()[None, :]
    elif whiten is not None:
        w = w @ whiten
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u, s, vh


def kept_energy(s: torch.Tensor, r: int) -> float:
    """The fraction of the squared singular values the first r keep."""
    return float(energy_curve(s)[r - 1])


def energy_curve(s: torch.Tensor) -> torch.Tensor:
    """kept_energy at ranks 1..len(s); all 1 for an all-zero matrix (nothing to lose, where 0 / 0 gave NaN)."""
    total = s.pow(2).sum()
    return s.pow(2).cumsum(0) / total if total > 0 else torch.ones_like(s)


def choose_rank(s: torch.Tensor, in_f: int, out_f: int, *, rank: int | None, energy: float | None,
                param_ratio: float | None, round_to: int) -> int:
    if rank is not None:
        r = rank
    elif param_ratio is not None:
        r = int(param_ratio * in_f * out_f / (in_f + out_f))
    else:
        e = energy_curve(s).tolist()
        r = next((k + 1 for k, v in enumerate(e) if v >= energy - 1e-12), len(e))
    return max(1, min(rounded_rank(r, round_to), len(s)))


def rounded_rank(r: int, round_to: int) -> int:
    """`r` up to a multiple of round_to (at least round_to)."""
    return max(round_to, math.ceil(r / round_to) * round_to) if round_to > 1 else r


def build_lowrank(weight: torch.Tensor, bias: torch.Tensor | None, u, s, vh, r: int, *,
                  scale: torch.Tensor | None = None, whiten_inv: torch.Tensor | None = None) -> LowRankLinear:
    """first = sqrt(S_r) Vh_r T^-1, second = U_r sqrt(S_r), where T is the transform applied before the SVD."""
    out_f, in_f = weight.shape
    root = s[:r].sqrt()
    first = root[:, None] * vh[:r]
    if scale is not None:
        first = first / scale.double()[None, :]
    elif whiten_inv is not None:
        first = first @ whiten_inv
    second = u[:, :r] * root[None, :]
    mod = LowRankLinear(in_f, out_f, r, bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        mod.first.weight.copy_(first.to(weight.dtype))
        mod.second.weight.copy_(second.to(weight.dtype))
        if bias is not None:
            mod.second.bias.copy_(bias.detach())
    return mod


def whitening(cov: torch.Tensor, eps: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, L^-1) with L L^T = cov + damping, the damping growing until the Cholesky succeeds.

    Damping (1% of the mean variance, as GPTQ does) keeps directions the few calibration tokens never
    visited from being treated as unused: with fewer tokens than input features X^T X is singular."""
    cov = cov.double()
    damp = eps * cov.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(cov + damp * eye)
        if int(info) == 0:
            return L, torch.linalg.solve_triangular(L, eye, upper=False)
        damp *= 10
    raise RuntimeError("activation covariance is not positive definite even with damping")


# ----------------------------------------------------------------------------- embeddings
def check_embedding_rank(net: nn.Module, rank: int) -> nn.Embedding:
    """The input embedding, if `rank` can factorize it (the pass checks before its slow layer-by-layer work)."""
    emb = net.get_input_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise UnsupportedModelError(f"lowrank.embedding_rank: the input embedding is a {type(emb).__name__}, "
                                    "not an nn.Embedding (already factorized?)")
    V, d = emb.weight.shape
    if rank >= factor_rank_limit(V, d) + 1:
        raise ConfigError(f"lowrank.embedding_rank={rank} saves nothing for a {V} x {d} embedding; "
                          f"use a rank below {factor_rank_limit(V, d) + 1}")
    return emb


def factorize_embedding(net: nn.Module, rank: int) -> dict:
    """E [V, d] ~ (U_r S_r) [V, r] @ Vh_r [r, d]; a tied LM head uses the same two factors."""
    emb = check_embedding_rank(net, rank)
    V, d = emb.weight.shape
    u, s, vh = torch.linalg.svd(emb.weight.detach().double(), full_matrices=False)
    new = install_embedding(net, rank)
    with torch.no_grad():
        new.weight.copy_((u[:, :rank] * s[:rank]).float())
        new.proj.weight.copy_(vh[:rank].t().float())
    return {"rank": rank, "shape": [V, d], "tied": _tied(net),
            "energy": round(kept_energy(s, rank), 4)}


def _tied(net: nn.Module) -> bool:
    return bool(getattr(net.config, "tie_word_embeddings", False)) and net.get_output_embeddings() is not None


def install_embedding(net: nn.Module, rank: int) -> LowRankEmbedding:
    emb = net.get_input_embeddings()
    tied = _tied(net)
    new = LowRankEmbedding(emb.num_embeddings, emb.embedding_dim, rank, emb.padding_idx)
    net.set_input_embeddings(new)
    if tied:
        net.set_output_embeddings(LowRankLMHead(new))
    return new


FACTORIZED = ("lowrank", "lowrank_embedding")  # the structure entries of a factorized model


def is_factorized(structure: list[dict]) -> bool:
    return any(e.get("type") in FACTORIZED for e in structure)


def apply_lowrank(model: nn.Module, entry: dict) -> None:
    """Structure entry `lowrank`: the named linear layers become empty LowRankLinear of the recorded ranks."""
    ranks = entry.get("ranks")
    if not isinstance(ranks, dict):
        raise CheckpointError(f"lowrank structure's ranks must map layer names to ranks, got {ranks!r:.60}")
    for name, r in ranks.items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"lowrank structure names {name}, which the model does not have") from None
        w = linear_weight(m)
        _check_rank(f"lowrank rank of {name}", r, min(w.shape))
        set_module(model, name, LowRankLinear(w.shape[1], w.shape[0], r, bias=m.bias is not None))


def apply_lowrank_embedding(model: nn.Module, entry: dict) -> None:
    """Structure entry `lowrank_embedding`: a factorized (tied) embedding of the recorded rank."""
    emb = model.get_input_embeddings()
    _check_rank("lowrank_embedding rank", entry.get("rank"), min(emb.num_embeddings, emb.embedding_dim))
    install_embedding(model, entry["rank"])


def _check_rank(what: str, rank, most: int) -> None:
    """Before the factors are allocated (a rank of 10**9 in an edited manifest allocated gigabytes first)."""
    if type(rank) is not int or not 1 <= rank <= most:
        raise CheckpointError(f"{what} is {rank!r}, not a rank between 1 and the layer's {most}")


