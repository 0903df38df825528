"""prune: structured pruning that removes real structure (MLP channels, attention heads, whole blocks, hidden
channels, the experts of mixture-of-experts blocks).

The model's parts come from compress/architecture.py (found by structure, any family it maps). Width: MLP intermediate
channels go through torch-pruning's dependency graph (fused gate_up projections are sliced, gate and up channels
together); attention heads through our own GQA-aware code, separate or fused q/k/v (compress/pruning/width.py says why);
hidden width (Minitron-style) through compress/pruning/hidden.py; experts (the ones routed to least on calibration data,
the same count per block) through compress/pruning/experts.py. Depth: blocks that change their input least on
calibration data are dropped. Uniform pruning keeps a stock Hugging Face config (plain `from_pretrained` works); a
global ratio gives per-layer MLP widths, recorded as an `mlp_widths` structure entry that `compress.load` re-applies.
Per-layer *head* counts are not offered: Hugging Face's Llama config and the ONNX exporter's KV-cache shapes assume one
head count for every layer."""
from __future__ import annotations

import copy
import fnmatch
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from ..checkpoint import Artifact, as_float32
from ..distill.config import RecoverConfig
from ..errors import ConfigError, UnsupportedModelError
from ..models import count_parameters
from ..pruning import importance as imp
from ..architecture import Architecture, find, is_linear
from ..pruning import experts as ex
from ..pruning.depth import drop_layers
from ..pruning import hidden as hid
from ..pruning.width import (check_qkv_rows, config_expresses_heads, hf_prunes_heads, original_head_ids,
                             prune_attention_heads, prune_hf_heads, prune_mlp_channels, set_config_heads)
from ..options import search
from . import register
from .base import Pass, PassConfig, PassContext


class PruneConfig(PassConfig):
    targets: list[Literal["mlp", "heads", "layers", "hidden", "experts"]] = Field(
        ["mlp"], min_length=1, description="what to remove: mlp (intermediate channels), heads, layers (blocks), "
        "hidden (channels of the residual stream, Minitron-style: embeddings, norms, every projection, the head), "
        "experts (of mixture-of-experts blocks, the least routed to; the same count in every block)",
        json_schema_extra=search([["mlp"], ["layers"], ["mlp", "layers"], ["mlp", "heads"]]))
    hidden_ratio: float | None = Field(
        None, ge=0.0, lt=1.0, description="target `hidden`: fraction of hidden channels to remove (default: ratio)")
    hidden_size: int | None = Field(
        None, ge=1, description="target `hidden`: the hidden size to keep (instead of hidden_ratio)")
    ratio: float = Field(0.25, ge=0.0, lt=1.0, description="fraction of MLP channels / heads / experts to remove",
                         json_schema_extra=search([0.1, 0.2, 0.3, 0.4]))
    layer_ratio: float | None = Field(
        None, ge=0.0, lt=1.0, description="fraction of blocks to remove (target `layers`); default: ratio",
        json_schema_extra=search([0.0, 0.1, 0.17, 0.25]))
    importance: Literal["magnitude", "taylor", "activation"] = Field(
        "magnitude", description="magnitude (weight norm, data-free), taylor (first-order loss change from "
        "gradients on calibration batches) or activation (mean contribution on calibration batches)",
        json_schema_extra=search(["magnitude", "taylor", "activation"]))
    norm: Literal[1, 2] = Field(2, description="magnitude importance: L1 or L2 norm")
    scope: Literal["uniform", "global"] = Field(
        "uniform", description="uniform: every layer loses `ratio` (stock config); global: one ranking over "
        "all layers, per-layer MLP widths recorded in the manifest (MLP only)")
    min_keep: float = Field(0.1, gt=0.0, le=1.0,
                            description="global scope: each layer keeps at least this fraction of its channels")
    round_to: int = Field(8, ge=1, description="MLP channel counts are rounded to a multiple of this (8/16/64 "
                          "keep matmul kernels fast)")
    gqa: Literal["groups", "query"] = Field(
        "groups", description="grouped-query attention: remove whole KV groups (q heads + their k/v head) or "
        "the same number of query heads inside every group")
    ignore: list[str] = Field([], description="module-name patterns (fnmatch) of blocks / MLPs / attentions "
                              "to leave untouched, e.g. 'model.layers.0*'")
    calibration_samples: int = Field(8, ge=1, description="calibration sequences for taylor / activation / "
                                     "layer scores")
    calibration_seq_len: int = Field(128, ge=2, description="tokens per calibration sequence")
    batch_size: int = Field(4, ge=1, description="calibration batch size")
    recover: RecoverConfig | None = Field(
        None, description="a short distillation from the unpruned model after pruning (the distill pass's "
        "options, e.g. {max_steps: 50}; the default teacher is the unpruned input); none: no recovery")

    @model_validator(mode="after")
    def _hidden_options(self):
        if self.hidden_size is not None and self.hidden_ratio is not None:
            raise ValueError("give one of hidden_size, hidden_ratio")
        if (self.hidden_size is not None or self.hidden_ratio is not None) and "hidden" not in self.targets:
            raise ValueError("hidden_size / hidden_ratio apply to targets: [hidden] (add it to targets)")
        if self.scope == "global" and "heads" in self.targets:
            raise ValueError("scope: global gives per-layer widths, which is supported for MLP channels only "
                             "(per-layer head counts break stock configs and ONNX cache shapes); use scope: uniform "
                             "for heads, or a second prune pass")
        if self.importance == "taylor" and "hidden" in self.targets:
            raise ValueError("targets hidden: importance taylor is not offered for hidden channels; use activation "
                             "(Minitron's criterion) or magnitude")
        for option, given, target in (("layer_ratio", self.layer_ratio is not None, "layers"),
                                      ("gqa", self.gqa != "groups", "heads")):
            if given and target not in self.targets:  # it would be ignored
                raise ValueError(f"{option} applies to targets: [{target}], which are not pruned here; add "
                                 f"{target} to targets or remove {option}")
        given = self.model_fields_set  # set by the user: a default never trips the checks below
        if "norm" in given and self.importance != "magnitude":
            raise ValueError(f"norm applies to importance: magnitude (the L1 / L2 norm of the weights), not "
                             f"{self.importance}; set importance: magnitude or remove norm")
        if "norm" in given and not {"mlp", "heads"} & set(self.targets):
            raise ValueError("norm applies to targets mlp and heads (hidden channels are ranked by their L2 norm, "
                             "layers by how much they change their input); add mlp or heads to targets or remove "
                             "norm")
        if "min_keep" in given and self.scope != "global":
            raise ValueError(f"min_keep applies to scope: global (each layer's floor), not {self.scope}; set scope: "
                             "global or remove min_keep")
        if self.scope == "global" and "mlp" not in self.targets:
            raise ValueError("scope: global ranks MLP channels across layers; add mlp to targets or use scope: "
                             "uniform")
        if self.ignore and set(self.targets) == {"hidden"}:
            raise ValueError("ignore leaves blocks untouched, but the hidden width is shared by every block; "
                             "remove ignore (it applies to targets layers, heads and mlp)")
        return self


def _check_reload(net, structure: list[dict]) -> None:
    """The model built from its config plus the structure entries has `net`'s shapes (or UnsupportedModelError
    naming the first parameter that would reload differently: a hidden-wide part the layer missed)."""
    from ..architecture import build_from_config
    from ..structure import apply_structure

    fresh = build_from_config(type(net), net.config)
    apply_structure(fresh, structure)
    have = net.state_dict()
    for name, t in fresh.state_dict().items():
        if name in have and tuple(t.shape) != tuple(have[name].shape):
            raise UnsupportedModelError(f"prune: {name} would reload as {tuple(t.shape)}, the pruned model has "
                                        f"{tuple(have[name].shape)}")


_PER_LAYER = {"mlp_widths": ("widths",), "attention_heads": ("heads", "kv_heads")}  # lists with one value per layer
_GQA_QUERY = "gqa: query (query heads inside each group)"  # the way out when whole KV groups cannot go


def _check_runs(net, target: str) -> None:
    """Refuse a pruned model that no longer runs: some families' modeling code reads a width from the config
    instead of the weights (StableLM's attention reshapes to hidden_size, Bloom's ALiBi has one slope per
    configured head, OLMo's weightless LayerNorm keeps its normalized_shape)."""
    ids = torch.arange(2, 6, device=next(net.parameters()).device)[None]
    try:
        with torch.no_grad():
            net(input_ids=ids)
    except Exception as exc:  # noqa: BLE001 - whatever the modeling code raises, the cut is not supported
        raise UnsupportedModelError(
            f"prune targets {target}: the pruned {type(net).__name__} fails its forward pass ({type(exc).__name__}: "
            f"{str(exc)[:200]}); its modeling code assumes a width this cut changes; prune other targets") from exc


def _round_keep(n: int, ratio: float, round_to: int, what: str, option: str = "ratio", hint: str = "") -> int:
    exact = n * (1 - ratio)
    if round(exact) < 1:
        raise ConfigError(f"prune.{option}={ratio} would leave no {what} (of {n}); use a smaller {option}{hint}")
    if round_to <= 1 or round_to >= n:
        return min(n, max(1, round(exact)))
    return min(n, max(round_to, round(exact / round_to) * round_to))


@register
class Prune(Pass):
    name = "prune"
    # 2: cached top-k soft targets renormalized; 3: and one bucket for the rest (losses.topk_soft_loss);
    # 4: quantize_aware's int8 embedding table on the quantize pass's new grid (blocks of 32, fp16 scales)
    # 5: per-layer config lists (SmolLM3's no_rope_layers) follow the kept layers; 6: layer cuts the config
    # cannot rebuild refused (ModernBERT's stored ones reloaded with other outputs), GPT-Neo's kinds follow,
    # StableLM / ModernBERT heads; 7: hidden-width activation importance reads weightless norms (OLMo's scored 0),
    # DeBERTa heads
    version = 7
    description = ("Structured pruning: MLP channels, attention heads (GQA-aware), whole layers, hidden width, "
                   "experts")
    Config = PruneConfig

    def accepts_factorized_input(self) -> bool:
        return False

    def check_task(self, task: str) -> str | None:
        if self.config.importance == "taylor" and task == "feature-extraction":
            return ("prune.importance: taylor needs a training loss, which a feature-extraction model does not have; "
                    "use importance: activation or magnitude")
        return None

    def needs_data(self) -> tuple[tuple[str, ...], str] | None:
        c = self.config
        if c.recover is not None:
            return ("train",), "prune.recover trains on data.train"
        if {"layers", "experts"} & set(c.targets) or c.importance != "magnitude":
            scored = [t for t in ("layers", "experts") if t in c.targets]
            why = f"targets: {', '.join(scored)}" if scored else f"importance: {c.importance}"
            return ("calibration", "train"), f"prune ({why}) scores on calibration data"
        return None

    # ------------------------------------------------------------------ entry point
    def apply(self, model: Artifact, ctx: PassContext) -> Artifact:
        c = self.config
        net = as_float32(copy.deepcopy(model.model)).eval()
        ad = find(net)
        self._check_experts(net, ad)
        self._check_plain(net, ad)
        self._check_ignore(net, ad)
        if "heads" in c.targets:
            check_qkv_rows(net, ad)
        if "hidden" in c.targets:  # refuse before any work
            self._hidden_keep(ad.hidden_size)
        self.ctx, self.task, self.tok = ctx, model.task, model.tokenizer
        self._given, self._orig = ad, list(range(ad.num_layers()))  # ignore names the blocks as given
        self._batches = None
        structure = list(model.structure)
        info: dict[str, Any] = {"params_before": count_parameters(net), "scope": c.scope}
        if set(c.targets) - {"layers"}:  # layers are scored by how much each block changes its input, always
            info["importance"] = c.importance
        if "layers" in c.targets:
            info["layers"] = self._prune_layers(net, ad)
            self._orig = [i for i in self._orig if i not in info["layers"]["dropped"]]
            if structure:  # per-layer entries lose the dropped layers (apply() only records these types)
                gone = set(info["layers"]["dropped"])
                structure = [{**e, **{k: [v for j, v in enumerate(e[k]) if j not in gone] for k in _PER_LAYER.get(
                    e["type"], ())}} for e in structure]
                _check_reload(net, structure)
            _check_runs(net, "layers")
            ad = find(net)  # the parts of the remaining blocks
        if "heads" in c.targets:
            info["heads"], entry = self._prune_heads(net, ad)
            if entry:
                structure = [e for e in structure if e["type"] != "attention_heads"] + [entry]
            _check_runs(net, "heads")
            ad = find(net)
        if "experts" in c.targets:
            info["experts"] = self._prune_experts(net, ad)
            _check_reload(net, structure)
            _check_runs(net, "experts")
            ad = find(net)
        if "mlp" in c.targets:
            info["mlp"], entry = self._prune_mlp(net, ad)
            # the widths now in the model replace any recorded by an earlier prune pass
            structure = [e for e in structure if e["type"] != "mlp_widths"] + ([entry] if entry else [])
            _check_runs(net, "mlp")
        if "hidden" in c.targets:
            # per-layer widths or heads the config cannot rebuild alone: a stock hidden_size in that config
            # could rebuild other shapes that happen to match (GPT-NeoX: 2 heads of 8 read back as 4 of 4)
            info["hidden"], entry = self._prune_hidden(net, find(net), bool(structure))
            if entry:
                structure = [*structure, entry]
                _check_reload(net, structure)
            _check_runs(net, "hidden")
        info["params_after"] = count_parameters(net)
        info["params_ratio"] = round(info["params_after"] / info["params_before"], 4)
        out = model.derive(model=net, structure=structure, info=info)
        if c.recover is not None:
            out = self._recover(model, out, ctx)
        return out

    def _check_experts(self, net, ad: Architecture) -> None:
        """Targets that cut a dense MLP refused on mixture-of-experts blocks, and experts without any, by name."""
        moe, targets = ad.moe_blocks(), self.config.targets
        if moe and {"mlp", "hidden"} & set(targets):
            b = ad.blocks[moe[0]].mlp
            raise UnsupportedModelError(
                f"prune targets {' / '.join(t for t in targets if t in ('mlp', 'hidden'))}: block {moe[0]}'s MLP is a "
                f"mixture of {ad.num_experts(moe[0])} experts ({b.experts or b.name}), which those cuts do not take; "
                "prune experts, heads or layers")
        if "experts" in targets and not moe:
            raise ConfigError(f"prune.targets: experts, but {type(net).__name__} has no mixture-of-experts block; "
                              "remove experts from targets")
        if "experts" in targets and any(self._ignored(ad.layer_name(i), ad.mlp_name(i)) for i in moe):
            raise ConfigError("prune.ignore: skipping some mixture-of-experts blocks would leave them with other "
                              "expert counts than the rest, which a stock config cannot state; prune experts in "
                              "every block (ignore fits mlp)")

    def _check_plain(self, net, ad: Architecture) -> None:
        for i in range(ad.num_layers()):
            mlp = ad.blocks[i].mlp
            parts = [mlp.router] if mlp.kind == "moe" else [*ad.mlp_in(i), ad.mlp_out(i)]
            for name in [*parts, ad.attn_out(i), *ad.attn(i).inputs]:
                m = net.get_submodule(name)  # a router may hold its own [experts, hidden] weight (gpt-oss)
                own = isinstance(w := getattr(m, "weight", None), torch.nn.Parameter) and w.dim() == 2
                if not (is_linear(m) or (own and name == mlp.router)):
                    raise UnsupportedModelError(
                        f"prune: {name} is a {type(net.get_submodule(name)).__name__}, not a plain linear layer "
                        "(low-rank factorized or quantized?); run prune before lowrank / quantize")

    def _check_ignore(self, net, ad: Architecture) -> None:
        """A pattern that matches no module is a typo that would prune what it meant to keep."""
        names = [n for n, _ in net.named_modules()]
        for pattern in self.config.ignore:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ConfigError(f"prune.ignore: {pattern!r} matches no module of this model; its blocks are named "
                                  f"like {ad.layer_name(0)!r} (MLP {ad.mlp_name(0)!r}, attention "
                                  f"{ad.attn_name(0)!r}), e.g. '{ad.layer_name(0)}*'")

    def _ignored(self, *names: str) -> bool:
        return any(fnmatch.fnmatchcase(n, p) for n in names for p in self.config.ignore)

    def _ignored_block(self, i: int, part: str) -> bool:
        """Is block i's `part` (mlp or attn) ignored? Named as given, before a layer cut renumbered the blocks."""
        o, ad = self._orig[i], self._given
        return self._ignored(ad.layer_name(o), ad.mlp_name(o) if part == "mlp" else ad.attn_name(o))

    def _calib(self, net, why: str):
        if self._batches is None:
            c = self.config
            self._batches = imp.calibration_batches(
                self.ctx, self.tok, self.task, samples=c.calibration_samples, seq_len=c.calibration_seq_len,
                batch_size=c.batch_size, why=why, model=net, field="prune.calibration_seq_len")
        return self._batches

    # ------------------------------------------------------------------ depth
    def _prune_layers(self, net, ad: Architecture) -> dict:
        c = self.config
        ratio = c.ratio if c.layer_ratio is None else c.layer_ratio
        n = ad.num_layers()
        n_drop = round(n * ratio)
        if n_drop >= n:
            raise ConfigError(f"prune.layer_ratio={ratio} would remove all {n} layers; use a smaller ratio")
        scores = imp.block_scores(net, ad, self._calib(net, "prune targets: layers"), self.task, self.ctx.device)
        candidates = [i for i in range(n) if not self._ignored(ad.layer_name(i))]
        drop = sorted(sorted(candidates, key=lambda i: scores[i].item())[:n_drop])
        drop_layers(net, ad, drop)
        info = {"dropped": drop, "kept": n - len(drop), "of": n, "ratio_actual": round(len(drop) / n, 4),
                "importance": "block input-output cosine distance", "scores": [round(s, 5) for s in scores.tolist()]}
        if len(drop) < n_drop:
            info["note"] = (f"dropped {len(drop)} of the {n_drop} layers layer_ratio={ratio} asks for: ignore "
                            f"{c.ignore} leaves only {len(candidates)} of {n} layers to choose from")
        return info

    # ------------------------------------------------------------------ heads
    def _head_scores(self, net, ad: Architecture) -> list[torch.Tensor]:
        """Per query head of every block."""
        c = self.config
        n = ad.num_layers()
        if c.importance == "magnitude":
            return [imp.head_magnitude(net, ad, i, c.norm) for i in range(n)]
        outs = [ad.attn_out(i) for i in range(n)]
        s = imp.output_unit_scores(net, outs, ad.head_dim(), self._calib(net, f"importance: {c.importance}"),
                                   self.task, c.importance, self.ctx.device)
        return [s[o] for o in outs]

    def _prune_heads(self, net, ad: Architecture) -> tuple[dict, dict | None]:
        """Three ways, by what the model's config can express: head counts in the config (GQA-aware slicing
        of separate or fused q/k/v; Llama, Qwen, Mistral, Gemma, Phi-3), Hugging Face's prune_heads (GPT-2,
        BERT, RoBERTa, DistilBERT: `pruned_heads` in the config), else slicing recorded as an
        `attention_heads` structure entry (GPT-NeoX, whose head size is hidden_size / heads)."""
        n = ad.num_layers()
        active = [i for i in range(n) if not self._ignored_block(i, "attn")]
        if not active:
            return {"removed": 0, "note": "every layer is ignored"}, None
        if len({(ad.num_heads(i), ad.num_kv_heads(i)) for i in active}) > 1:
            raise ConfigError(
                f"prune targets heads: the layers hold different numbers of heads "
                f"({', '.join(str(ad.num_heads(i)) for i in range(n))}), left by an earlier prune with ignore; ratio "
                "is a share of one count: add the layers that differ to prune.ignore, or prune heads in one pass")
        n_q, n_kv = ad.num_heads(active[0]), ad.num_kv_heads(active[0])
        keep_q, keep_kv = self._head_counts(n_q, n_kv)
        if config_expresses_heads(net, ad, keep_q, keep_kv):
            mode = "config"
        elif n_q == n_kv and hf_prunes_heads(net):
            mode = "pruned_heads"
        else:
            mode = "structure"
        if mode == "config" and len(active) < n:
            raise ConfigError("prune.ignore: skipping some layers would give per-layer head counts, which "
                              "a stock config cannot express; prune heads in every layer (ignore fits mlp)")
        if keep_q == n_q:
            return {"mode": mode, "ratio_actual": 0.0, "note": self._nothing_removed(n_q, n_kv)}, None
        scores = self._head_scores(net, ad)
        if mode != "pruned_heads":
            return self._prune_sliced_heads(net, ad, scores, active, mode)
        keep = keep_q
        heads = {}
        for i in active:
            present = original_head_ids(net, i, net.config.num_attention_heads)
            order = torch.argsort(scores[i], descending=True).tolist()
            heads[i] = sorted(present[j] for j in order[keep:])
        prune_hf_heads(net, heads)
        info = {"mode": mode, "heads_per_layer": keep, "of": n_q, "ratio_actual": round(1 - keep / n_q, 4),
                "pruned": {str(i): h for i, h in heads.items()}}
        if ad.head is not None:  # optimum sizes the exported KV cache from the config's head count
            info["note"] = ("the default export (the fused graph) carries the pruned heads with the KV cache; "
                            "optimum's exporter (export graph: optimum) needs with_past: false")
        return info, None

    def _head_unit(self, n_q: int, n_kv: int) -> tuple[str, int]:
        """What `ratio` removes a share of, and how many there are: whole KV groups (MHA: heads), or with
        gqa: query the query heads inside every group."""
        rep = n_q // n_kv
        if rep == 1:
            return "attention heads", n_kv
        return ("KV groups", n_kv) if self.config.gqa == "groups" else ("query heads per KV group", rep)

    def _head_counts(self, n_q: int, n_kv: int) -> tuple[int, int]:
        unit, count = self._head_unit(n_q, n_kv)
        # one KV group (multi-query): a smaller ratio removes nothing, query heads inside it can go
        hint = f" or {_GQA_QUERY}" if unit == "KV groups" else ""
        keep = _round_keep(count, self.config.ratio, 1, unit, hint=hint)
        return (n_kv * keep, n_kv) if unit == "query heads per KV group" else (keep * (n_q // n_kv), keep)

    def _nothing_removed(self, n_q: int, n_kv: int) -> str:
        """The note for a ratio that rounds to keeping every head."""
        c = self.config
        unit, count = self._head_unit(n_q, n_kv)
        hint = f"; or {_GQA_QUERY}" if unit == "KV groups" else ""
        return (f"ratio={c.ratio} removes no heads: {count} {unit} x {1 - c.ratio:g} rounds to {count}; a ratio above "
                f"{0.5 / count:.3g} removes one{hint}")

    def _prune_sliced_heads(self, net, ad: Architecture, scores: list[torch.Tensor], active: list[int],
                            mode: str) -> tuple[dict, dict | None]:
        c = self.config
        n_q, n_kv = ad.num_heads(active[0]), ad.num_kv_heads(active[0])
        rep = n_q // n_kv
        gqa = c.gqa if rep > 1 else "groups"  # MHA: a group is one head, both modes are the same
        new_q, new_kv = self._head_counts(n_q, n_kv)
        per_group = new_q // new_kv
        kept = {}
        for i in active:
            q = scores[i].view(n_kv, rep)
            if gqa == "groups":
                g_score = q.sum(1)
                if c.importance == "magnitude" and rep > 1:
                    g_score = (q.pow(2).sum(1) + imp.kv_magnitude(net, ad, i, c.norm).pow(2)).sqrt()
                groups = sorted(torch.argsort(g_score, descending=True)[:new_kv].tolist())
                keep_q = [g * rep + r for g in groups for r in range(rep)]
            else:
                groups = list(range(n_kv))
                keep_q = [g * rep + r for g in groups
                          for r in sorted(torch.argsort(q[g], descending=True)[:per_group].tolist())]
            prune_attention_heads(net, ad, i, keep_q, groups)
            kept[str(i)] = {"q": keep_q, "kv": groups}
        info = {"mode": mode, "gqa": gqa, "num_attention_heads": [n_q, new_q], "num_key_value_heads": [n_kv, new_kv],
                "ratio_actual": round(1 - new_q / n_q, 4), "kept": kept}
        if mode == "config":
            set_config_heads(net, new_q, new_kv, ad.head_dim())
            return info, None
        after = find(net)
        info["note"] = ("the default export (the fused graph, for the families its writers take) carries the "
                        "pruned heads with the KV cache; optimum's exporter (export graph: optimum, and auto's "
                        "fallback) needs with_past: false, as the config keeps the original heads")
        return info, {"type": "attention_heads", "heads": [after.num_heads(i) for i in range(after.num_layers())],
                      "kv_heads": [after.num_kv_heads(i) for i in range(after.num_layers())]}

    # ------------------------------------------------------------------ hidden width
    def _hidden_keep(self, hidden: int) -> int:
        c = self.config
        if c.hidden_size is not None:
            if c.hidden_size > hidden:
                raise ConfigError(f"prune.hidden_size={c.hidden_size} is larger than the model's {hidden}")
            return c.hidden_size
        if c.hidden_ratio is None:
            return _round_keep(hidden, c.ratio, c.round_to, "hidden channels")
        return _round_keep(hidden, c.hidden_ratio, c.round_to, "hidden channels", option="hidden_ratio")

    def _prune_hidden(self, net, ad: Architecture, has_structure: bool) -> tuple[dict, dict | None]:
        """Stock where the config carries head_dim (hidden_size and head_dim edited) and no embedding scale
        derives from hidden_size (Gemma's sqrt), else a `hidden_width`
        structure entry (the config keeps the original hidden_size, from which the attention derives its
        head size); also when per-layer MLP widths (an `mlp_widths` entry) already keep the config from
        rebuilding the model (or an `attention_heads` entry: heads the config cannot say)."""
        c = self.config
        before = ad.hidden_size
        keep = self._hidden_keep(before)
        if c.importance == "magnitude":
            scores = hid.magnitude_scores(net, ad)
        else:
            batches = self._calib(net, "prune targets: hidden")
            scores = hid.activation_scores(net, ad, batches, self.task, self.ctx.device)
        kept = sorted(torch.argsort(scores, descending=True)[:keep].tolist())
        stock = hid.config_expresses(net, ad, keep) and not has_structure
        hid.prune_hidden(net, ad, kept, stock=stock)
        info = {"hidden_size": [before, keep], "ratio_actual": round(1 - keep / before, 4),
                "mode": "config" if stock else "structure"}
        option, asked = ("ratio", c.ratio) if c.hidden_ratio is None else ("hidden_ratio", c.hidden_ratio)
        if keep == before and c.hidden_size is None and asked > 0:
            info["note"] = (f"{option}={asked} removes no hidden channels: {before} x {1 - asked:g} rounds to {before} "
                            f"(round_to={c.round_to}); use a larger {option}"
                            + (" or a smaller round_to" if c.round_to > 1 else ""))
        elif c.ignore:
            info["note"] = f"ignore {c.ignore} does not apply to the hidden width, which every block shares"
        if stock:
            return info, None
        return info, {"type": "hidden_width", "size": keep}

    # ------------------------------------------------------------------ MLP
    def _mlp_scores(self, net, ad: Architecture, layers: list[int]) -> dict[int, torch.Tensor]:
        c = self.config
        batches = None if c.importance == "magnitude" else self._calib(net, f"importance: {c.importance}")
        return imp.mlp_channel_scores(net, ad, layers, c.importance, batches=batches, task=self.task,
                                      norm=c.norm, device=self.ctx.device)

    # ------------------------------------------------------------------ experts
    def _prune_experts(self, net, ad: Architecture) -> dict:
        """Keep the experts each mixture-of-experts block routes to most (the same count in every block)."""
        blocks = ad.moe_blocks()
        before = ad.num_experts(blocks[0])
        keep = ex.keep_count(net, ad, self.config.ratio)
        scores = imp.expert_scores(net, ad, self._calib(net, "prune targets: experts"), self.task, self.ctx.device)
        kept = {}
        for i in blocks:
            kept[i] = sorted(torch.argsort(scores[i], descending=True)[:keep].tolist())
            ex.keep_experts(net, ad, i, kept[i])
        ex.set_expert_count(net, before, keep)
        return {"kept": keep, "of": before, "ratio_actual": round(1 - keep / before, 4),
                "importance": "mean router probability on calibration tokens",
                "experts": {str(i): kept[i] for i in blocks},
                "routing_share_kept": {str(i): round(float(scores[i][kept[i]].sum()), 4) for i in blocks}}

    def _prune_mlp(self, net, ad: Architecture) -> tuple[dict, dict | None]:
        c = self.config
        n = ad.num_layers()
        before = [ad.mlp_width(i) for i in range(n)]
        active = [i for i in range(n) if not self._ignored_block(i, "mlp")]
        if not active:
            return {"widths": before, "note": "every layer is ignored"}, None
        scores = self._mlp_scores(net, ad, active)
        keep = {i: _round_keep(before[i], c.ratio, c.round_to, f"MLP channels in layer {i}") for i in active}
        if c.scope == "global":
            keep = self._global_widths(scores, before, active)
        for i in active:
            order = torch.argsort(scores[i], descending=True)
            prune_mlp_channels(net, ad, i, sorted(order[keep[i]:].tolist()))
        widths = [ad.mlp_width(i) for i in range(n)]
        total_before, total_after = sum(before[i] for i in active), sum(widths[i] for i in active)
        info = {"widths": widths, "of": before, "ratio_actual": round(1 - total_after / total_before, 4)}
        if c.scope == "global" and info["ratio_actual"] < c.ratio - 0.01:
            info["note"] = (f"pruned {info['ratio_actual']:.1%} of the MLP channels, not ratio={c.ratio}: each layer "
                            f"keeps at least min_keep={c.min_keep} of its channels (round_to={c.round_to}); lower "
                            "min_keep to prune more")
        elif info["ratio_actual"] == 0 and c.ratio > 0 and c.round_to == 1:
            info["note"] = (f"ratio={c.ratio} removes no MLP channels: {max(before)} x {1 - c.ratio:g} rounds to "
                            f"{max(before)}; use a larger ratio")
        elif info["ratio_actual"] == 0 and c.ratio > 0:
            info["note"] = (f"ratio={c.ratio} removes no MLP channels: widths are rounded to a multiple of "
                            f"round_to={c.round_to}; use a larger ratio or a smaller round_to")
        elif c.scope == "uniform" and abs(info["ratio_actual"] - c.ratio) > 0.01:
            info["note"] = (f"pruned {info['ratio_actual']:.1%} of the MLP channels, not ratio={c.ratio}: each "
                            f"layer keeps a multiple of round_to={c.round_to} channels, at least one; use a "
                            "smaller round_to to come closer")
        field = ad.intermediate_field
        if len(set(widths)) == 1 and field in net.config.to_dict():  # uniform: a stock config says it all
            setattr(net.config, field, widths[0])
            return info, None
        # per-layer widths, or a config without a width field (Bloom's MLP is always 4 x hidden)
        return info, {"type": "mlp_widths", "widths": widths}

    def _global_widths(self, scores: dict[int, torch.Tensor], before: list[int], active: list[int]) -> dict:
        """One ranking over every active layer's channels; each layer keeps its share of the top ones."""
        c = self.config
        total = sum(before[i] for i in active)
        n_keep = round(total * (1 - c.ratio))  # each layer keeps at least its min_keep share (below), never 0
        flat = torch.cat([scores[i].double() for i in active])
        owner = torch.cat([torch.full((before[i],), i) for i in active])
        top = owner[torch.argsort(flat, descending=True)[:n_keep]]
        out = {}
        for i in active:
            k = int((top == i).sum())
            k = max(k, int(before[i] * c.min_keep + 0.999), 1)
            if c.round_to > 1 and before[i] > c.round_to:
                k = min(before[i], max(c.round_to, round(k / c.round_to) * c.round_to))
            out[i] = k
        return out

    # ------------------------------------------------------------------ recovery
    def _recover(self, unpruned: Artifact, pruned: Artifact, ctx: PassContext) -> Artifact:
        """A short distillation of the pruned model (trained in place) from the unpruned one, through the
        distill pass itself: the unpruned model is handed over as the context's teacher."""
        from .distill import Distill

        options = self.config.recover
        given = options.model_dump(exclude_unset=True)
        teacher_name = given.get("teacher", "the unpruned input")
        if "teacher" not in given:  # default teacher: this pass's unpruned input, not the pipeline source
            teacher = Artifact(kind="torch", task=unpruned.task, tokenizer=unpruned.tokenizer,
                               model=copy.deepcopy(unpruned.model))
            ctx = ctx.with_teacher(teacher, name=ctx.source or "prune-input")
        result = Distill(options).run(pruned, ctx)
        recover = {"options": given, "teacher": teacher_name, **result.info}
        recover.pop("teachers", None)
        return result.derive(model=result.model, structure=pruned.structure, info=dict(pruned.info, recover=recover))
