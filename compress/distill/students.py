"""Building students: keep some of the teacher's layers (DistilBERT-style initialization), or a fresh model
from the teacher's config with changed sizes.

The block list is found by compress/architecture.py (any family it maps: Llama, Qwen, Mistral, Gemma,
Phi-3, GPT-NeoX, GPT-2, BERT, RoBERTa, DistilBERT). The result is a stock architecture: only `num_hidden_layers` (and per-layer config lists such as
`layer_types`) change, so plain `from_pretrained` loads the saved student."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..architecture import PER_LAYER_FIELDS, keep_layers_of
from ..errors import ConfigError, UnsupportedModelError  # noqa: F401


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def layer_path(model: nn.Module) -> str:
    """The dotted attribute path of the model's ModuleList of blocks (found by structure: compress/architecture.py)."""
    from ..architecture import find_layers

    return find_layers(model)


def get_layers(model: nn.Module) -> nn.ModuleList:
    return _get(model, layer_path(model))


def num_layers(model: nn.Module) -> int:
    return len(get_layers(model))


def resolve_keep(spec, total: int) -> list[int]:
    """`every_other` (layers 0, 2, 4, ...), a count (evenly spaced, first and last kept) or a list of
    indices (negative counts from the end) -> sorted layer indices."""
    if spec == "every_other":
        return list(range(0, total, 2))
    if isinstance(spec, bool):
        raise ConfigError("distill.student.keep_layers: expected every_other, a count or a list of indices")
    if isinstance(spec, int):
        if not 1 <= spec <= total:
            raise ConfigError(f"distill.student.keep_layers: {spec} layers asked for, the model has {total}; "
                              f"give a count between 1 and {total}")
        if spec == 1:
            return [total - 1]
        return sorted({int(round(i * (total - 1) / (spec - 1))) for i in range(spec)})
    if isinstance(spec, (list, tuple)):
        out = []
        for i in spec:
            j = i + total if i < 0 else i
            if not 0 <= j < total:
                raise ConfigError(f"distill.student.keep_layers: layer {i} does not exist (the model has "
                                  f"{total} layers, 0..{total - 1})")
            out.append(j)
        if len(set(out)) != len(out) or not out:
            raise ConfigError("distill.student.keep_layers: list each layer once (and at least one)")
        return sorted(out)
    raise ConfigError(f"distill.student.keep_layers: {spec!r} is not every_other, a count or a list")


def keep_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """A copy of `model` with only the blocks `keep` (their weights copied), a consistent config and
    renumbered per-layer indices (`layer_idx`, used by the KV cache of decoder models)."""
    student = copy.deepcopy(model)
    keep_layers_of(student, layer_path(student), keep, "distill.student.keep_layers")
    return student


# Config fields that are sizes (a positive int), by their standard names; a family's own name for one (GPT-2's
# n_layer) is found through its config's attribute_map. GPT-2's n_inner and OPT's ffn_dim are MLP widths.
SIZE_FIELDS = frozenset({"num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                         "intermediate_size", "head_dim", "vocab_size", "max_position_embeddings", "n_inner",
                         "ffn_dim"})


def fresh_student(model: nn.Module, overrides: dict, task: str) -> nn.Module:
    """A new model of the teacher's architecture with some config values changed and fresh weights."""
    from ..tasks import auto_class

    cfg = copy.deepcopy(model.config)
    unknown = [k for k in overrides if not hasattr(cfg, k)]
    if unknown:
        raise ConfigError(
            f"distill.student.config: {', '.join(unknown)} is not a {type(cfg).__name__} field; use names "
            "such as num_hidden_layers, hidden_size, num_attention_heads, intermediate_size"
        )
    standard = {own: name for name, own in getattr(cfg, "attribute_map", {}).items()}
    for k, v in overrides.items():
        if standard.get(k, k) in SIZE_FIELDS and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"distill.student.config.{k}: {v!r} is not a size; give a positive integer")
    where = f"distill.student.config.{next(iter(overrides))}" if len(overrides) == 1 else "distill.student.config"
    for k, v in overrides.items():
        try:
            setattr(cfg, k, v)
        except Exception as exc:  # noqa: BLE001 - a config class may refuse a value in its own way
            raise ConfigError(f"distill.student.config.{k}: {type(cfg).__name__} refuses {v!r} ({exc})") from None
    if "num_hidden_layers" in overrides:  # a new depth: every layer of the first one's kind
        for name in PER_LAYER_FIELDS:
            if isinstance(value := getattr(cfg, name, None), list):
                setattr(cfg, name, value[:1] * cfg.num_hidden_layers)
    heads = getattr(cfg, "num_attention_heads", None)
    if heads and getattr(cfg, "hidden_size", 0) % heads:
        raise ConfigError(f"distill.student.config: hidden_size {cfg.hidden_size} is not divisible by "
                          f"num_attention_heads {heads}")
    if getattr(cfg, "num_key_value_heads", None) and heads and heads % cfg.num_key_value_heads:
        if standard.get("num_key_value_heads", "num_key_value_heads") in {standard.get(k, k) for k in overrides}:
            raise ConfigError(f"distill.student.config.num_key_value_heads: {cfg.num_key_value_heads} does not divide "
                              f"num_attention_heads {heads}; give a divisor of it")
        cfg.num_key_value_heads = heads  # plain multi-head attention when the old GQA grouping no longer fits
    if "head_dim" in cfg.to_dict() and "hidden_size" in overrides and "head_dim" not in overrides and heads:
        cfg.head_dim = cfg.hidden_size // heads
    try:
        student = auto_class(task).from_config(cfg, dtype=torch.float32)
        with torch.no_grad():  # a size the modeling code cannot use may fail only on the first batch
            student(input_ids=torch.zeros(1, 1, dtype=torch.long))
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the modeling code raises, the values do not fit together
        raise ConfigError(f"{where}: {type(cfg).__name__} with {overrides} builds no working model "
                          f"({type(exc).__name__}: {exc}); change the values") from None
    return student


def build_student(spec, model, ctx) -> tuple[nn.Module, object, list, dict]:
    """(student module, tokenizer, structure, figures) for distill's `student:` options (a StudentConfig or
    None) and the pass's input Artifact `model`."""
    if spec is None:
        return model.model, model.tokenizer, list(model.structure), {"student": "input (trained in place)"}
    if spec.keep_layers is not None:
        if model.structure:
            raise UnsupportedModelError(
                "distill.student.keep_layers: the input model has non-stock structure "
                f"({', '.join(e.get('type', '?') for e in model.structure)}); build layer-dropped "
                "students before prune / lowrank, or omit `student` to train the input in place")
        total = num_layers(model.model)
        keep = resolve_keep(spec.keep_layers, total)
        return (keep_layers(model.model, keep), model.tokenizer, [],
                {"student": "keep_layers", "kept_layers": keep, "teacher_layers": total})
    if spec.config is not None:
        return (fresh_student(model.model, spec.config, model.task), model.tokenizer, [],
                {"student": "fresh", "student_config": spec.config})
    from ..checkpoint import load_source

    art = load_source(spec.source, model.task, label_names=ctx.label_names())
    return art.model, art.tokenizer, list(art.structure), {"student": spec.source}
