"""lowrank: replace linear layers by two thinner ones from a truncated SVD, where that saves parameters.

Rank per layer: fixed (`rank`), by retained singular-value energy (`energy`), or by a parameter budget
(`param_ratio` of each layer's weights). `method: asvd` / `whiten` use calibration activations so the
truncation keeps what the data uses (compress/pruning/lowrank.py). A layer is factorized only when the
factors are smaller than `max_param_ratio` of the dense weight and the layer has at least `min_params`
weights: near full rank, and for small layers at batch-1 decoding, the two matmuls are slower than the one
they replace (measured in benchmarks/results/prune_lowrank/). The (tied) embedding can be
factorized too. Factors are `LowRankLinear` modules with `first` / `second` children, recorded as a
`lowrank` structure entry that `compress.load` re-applies before loading the weights."""
from __future__ import annotations

import copy
import fnmatch
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..checkpoint import Artifact, as_float32
from ..architecture import output_head
from ..errors import ConfigError
from ..models import count_parameters
from ..pruning import importance as imp
from ..pruning.arch import is_linear, linear_weight, set_module
from ..pruning.lowrank import (build_lowrank, check_embedding_rank, choose_rank, factor_rank_limit, factorize_embedding,
                               is_factorized, kept_energy, rounded_rank, svd_factors, whitening)
from ..options import search
from . import register
from .base import Pass, PassConfig, PassContext


class LowRankConfig(PassConfig):
    method: Literal["svd", "asvd", "whiten"] = Field(
        "svd", description="svd (plain truncated SVD), asvd (columns scaled by calibration activation "
        "magnitude) or whiten (SVD of W times the Cholesky factor of the activation covariance)",
        json_schema_extra=search(["svd", "whiten"]))
    rank: int | None = Field(None, ge=1, description="fixed rank for every targeted layer")
    energy: float | None = Field(None, gt=0.0, le=1.0, description="smallest rank keeping this fraction of "
                                 "the squared singular values (default 0.95 when no rule is given)",
                                 json_schema_extra=search([0.9, 0.95, 0.99, 0.999]))
    param_ratio: float | None = Field(None, gt=0.0, lt=1.0, description="rank so that the factors hold this "
                                      "fraction of each layer's parameters")
    targets: list[str] = Field(["*"], description="module-name patterns (fnmatch) of the linear layers to "
                               "factorize; the output head (LM head, a classifier's last layer) is never a target")
    ignore: list[str] = Field([], description="linear-layer name patterns (fnmatch) to leave dense; "
                              "a pattern that matches no linear layer is an error")
    max_param_ratio: float = Field(0.6, gt=0.0, lt=1.0, description="leave a layer dense unless its factors "
                                   "are at most this fraction of its parameters (near full rank the two "
                                   "matmuls are slower than one)")
    min_params: int = Field(150_000, ge=0, description="leave layers with fewer weights dense: at batch-1 "
                            "decoding a small layer's extra matmul costs more than it saves (SmolLM2's 576x192 "
                            "k/v projections were slower factorized at every rank)")
    round_to: int = Field(8, ge=1, description="ranks rounded up to a multiple of this")
    alpha: float = Field(0.5, ge=0.0, le=2.0, description="asvd: exponent of the activation scaling")
    embedding_rank: int | None = Field(None, ge=1, description="factorize the (tied) embedding matrix to this "
                                       "rank; none: leave it dense")
    calibration_samples: int = Field(32, ge=1, description="calibration sequences for asvd / whiten (whitening "
                                     "wants more tokens than a layer has input features)")
    calibration_seq_len: int = Field(128, ge=2, description="tokens per calibration sequence")
    batch_size: int = Field(4, ge=1, description="calibration batch size")

    @model_validator(mode="after")
    def _one_rule(self):
        rules = [n for n in ("rank", "energy", "param_ratio") if getattr(self, n) is not None]
        if len(rules) > 1:
            raise ValueError(f"give one of rank, energy, param_ratio (got {', '.join(rules)})")
        if self.param_ratio is not None and self.param_ratio > self.max_param_ratio:  # every layer would stay dense
            raise ValueError(f"param_ratio={self.param_ratio} asks for factors larger than max_param_ratio="
                             f"{self.max_param_ratio} lets any layer keep; lower param_ratio or raise max_param_ratio")
        if "alpha" in self.model_fields_set and self.method != "asvd":  # set by the user, and ignored
            raise ValueError(f"alpha applies to method: asvd (the exponent of its activation scaling), not "
                             f"{self.method}; set method: asvd or remove alpha")
        if not rules:
            self.energy = 0.95
        return self


def _candidates(net: nn.Module, head: str | None) -> list[str]:
    return [n for n, m in net.named_modules() if is_linear(m) and n != head and n]


@register
class LowRank(Pass):
    name = "lowrank"
    description = "Factorize linear layers by truncated SVD (plain or activation-aware) where it saves parameters"
    Config = LowRankConfig

    def factorizes(self) -> bool:
        return True

    def accepts_factorized_input(self) -> bool:
        return False

    def needs_data(self) -> tuple[tuple[str, ...], str] | None:
        if self.config.method == "svd":
            return None
        return ("calibration", "train"), f"lowrank.method: {self.config.method} scores on calibration data"

    def apply(self, model: Artifact, ctx: PassContext) -> Artifact:
        c = self.config
        if is_factorized(model.structure):
            raise ConfigError("lowrank: the model is already factorized; use one lowrank pass")
        net = as_float32(copy.deepcopy(model.model)).eval()
        head = output_head(net, model.task)  # LM or classifier head: factors there change the logits directly
        linear = _candidates(net, head)
        every_linear = [n for n, m in net.named_modules() if is_linear(m)]  # the head too: ignoring it is no typo
        for pattern in c.ignore:  # a typo would factorize the layers it meant to keep dense
            if not any(fnmatch.fnmatchcase(n, pattern) for n in every_linear):
                raise ConfigError(f"lowrank.ignore: {pattern!r} matches no linear layer of this model; layers are "
                                  f"named like {linear[:3]}; end a block's name with '.*' to keep all its layers")
        names = [n for n in linear
                 if any(fnmatch.fnmatchcase(n, p) for p in c.targets)
                 and not any(fnmatch.fnmatchcase(n, p) for p in c.ignore)]
        if not names and c.embedding_rank is None:
            why = (f" (the output head {head!r} is never factorized)"
                   if head and any(fnmatch.fnmatchcase(head, p) for p in c.targets) else "")
            raise ConfigError(f"lowrank.targets {c.targets} (minus ignore {c.ignore}) match no linear layer{why}; "
                              f"layers look like {linear[:3]}")
        if c.embedding_rank is not None:
            check_embedding_rank(net, c.embedding_rank)
        stats = self._activation_stats(net, names, model, ctx) if c.method != "svd" else {}
        before = count_parameters(net)
        ranks, layers, skipped = {}, {}, {}
        for name in names:
            m = net.get_submodule(name)
            w = linear_weight(m)
            out_f, in_f = w.shape
            scale = stats[name].clamp_min(1e-6).pow(c.alpha) if c.method == "asvd" else None
            L, L_inv = whitening(stats[name]) if c.method == "whiten" else (None, None)
            u, s, vh = svd_factors(w, scale=scale, whiten=L)
            by_rule = dict(rank=c.rank, energy=c.energy, param_ratio=c.param_ratio)
            r = choose_rank(s, in_f, out_f, **by_rule, round_to=c.round_to)
            ratio = r * (in_f + out_f) / (in_f * out_f)
            if r > factor_rank_limit(in_f, out_f) or ratio > c.max_param_ratio or in_f * out_f < c.min_params:
                skipped[name] = {"rank": r, "params_ratio": round(ratio, 3)}
                exact = choose_rank(s, in_f, out_f, **by_rule, round_to=1)
                if in_f * out_f >= c.min_params and exact * (in_f + out_f) <= c.max_param_ratio * in_f * out_f:
                    skipped[name]["rounded_up_from"] = exact  # round_to alone made the factors too large
                continue
            set_module(net, name, build_lowrank(w, m.bias, u, s, vh, r, scale=scale, whiten_inv=L_inv))
            ranks[name] = r
            layers[name] = {"rank": r, "params_ratio": round(ratio, 3),
                            "energy": round(kept_energy(s, r), 4)}
        structure = list(model.structure)
        if ranks:
            structure.append({"type": "lowrank", "ranks": ranks})
        info: dict[str, Any] = {"method": c.method, "factorized": len(ranks), "left_dense": len(skipped),
                                "layers": layers, "skipped": skipped}
        if c.embedding_rank is not None:
            info["embedding"] = factorize_embedding(net, c.embedding_rank)
            structure.append({"type": "lowrank_embedding", "rank": c.embedding_rank})
        if not ranks and c.embedding_rank is None:
            rule = "rank" if c.rank is not None else "param_ratio" if c.param_ratio is not None else "energy"
            info["note"] = (f"no layer was factorized: at this {rule} no targeted layer saves parameters (factors "
                            f"over max_param_ratio={c.max_param_ratio} of the layer, or layers under "
                            f"min_params={c.min_params}; see `skipped`); lower {rule}, raise max_param_ratio or "
                            "lower min_params")
            rounded = sum("rounded_up_from" in v for v in skipped.values())
            if rounded:
                info["note"] += (f"; round_to={c.round_to} rounded the ranks of {rounded} of them up past "
                                 "max_param_ratio (see `rounded_up_from`): lower round_to")
        elif c.rank is not None and (up := rounded_rank(c.rank, c.round_to)) != c.rank:  # not the rank asked for
            info["note"] = (f"lowrank.rank={c.rank} is rounded up to {up}, a multiple of round_to={c.round_to} "
                            f"(see `layers`); set round_to: 1 to keep rank {c.rank}")
        info["params_before"], info["params_after"] = before, count_parameters(net)
        info["params_ratio"] = round(info["params_after"] / before, 4)
        return model.derive(model=net, structure=structure, info=info)

    def _activation_stats(self, net, names, model: Artifact, ctx) -> dict[str, torch.Tensor]:
        """asvd: mean |x_j| per input feature; whiten: X^T X / n, for every targeted layer."""
        c = self.config
        batches = imp.calibration_batches(ctx, model.tokenizer, model.task, samples=c.calibration_samples,
                                          seq_len=c.calibration_seq_len, batch_size=c.batch_size,
                                          why=f"lowrank.method: {c.method}", without_data="method: svd",
                                          model=net, field="lowrank.calibration_seq_len")
        sums: dict[str, torch.Tensor] = {}
        counts = dict.fromkeys(names, 0)
        mask_now: list[torch.Tensor | None] = [None]

        def make_hook(name):
            def hook(mod, args):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                if mask_now[0] is not None and mask_now[0].numel() == x.shape[0]:  # per-token input
                    x = x[mask_now[0].reshape(-1).bool().to(x.device)]
                v = x.abs().sum(0) if c.method == "asvd" else x.t() @ x
                sums[name] = sums[name] + v.double() if name in sums else v.double()
                counts[name] += x.shape[0]
            return hook

        handles = [net.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in names]
        try:
            with imp.on_device(net, ctx.device), torch.no_grad():  # the pipeline's GPU when it has one
                for batch in batches:
                    mask_now[0] = batch.get("attention_mask")
                    imp._forward(net, batch, model.task)
        finally:
            for h in handles:
                h.remove()
        return {n: (sums[n] / max(counts[n], 1)).cpu() for n in names}
