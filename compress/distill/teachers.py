"""Who teaches: the teachers named by the distill options, loaded once and frozen, and the checks that a
student can learn from them (same tokenizer, same outputs)."""
from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from ..checkpoint import Artifact, load_source
from ..errors import ConfigError
from ..models import source_fingerprint
from .config import DistillConfig
from .teacher_cache import model_digest


@dataclass
class Teacher:
    model: nn.Module
    tokenizer: object
    weight: float
    name: str
    fingerprint: str  # names the teacher's weights in cache keys


def load_teachers(config: DistillConfig, model: Artifact, ctx, in_place: bool) -> list[Teacher]:
    """The teachers of `config.teacher`, frozen, in eval mode, on the context's device. `source` is the
    context's teacher (the pipeline's source model unless the context hands over another); `input` is the
    pass's input model (a frozen copy taken before training when the student is trained in place)."""
    teachers = []
    for entry in config.teacher_entries():
        name = entry.model
        if name == "source":
            art = ctx.teacher()
            t_model, t_tok, fp = art.model, art.tokenizer, source_fingerprint(ctx.source)
        elif name == "input":
            t_model = copy.deepcopy(model.model) if in_place else model.model
            t_tok = model.tokenizer
            key = (model.manifest or {}).get("key")
            fp = f"checkpoint:{key}" if key else f"weights:{model_digest(model.model)}"
        else:
            art = load_source(name, model.task, label_names=ctx.label_names())
            t_model, t_tok, fp = art.model, art.tokenizer, source_fingerprint(name)
        t_model.eval().requires_grad_(False).to(ctx.device)
        teachers.append(Teacher(t_model, t_tok, float(entry.weight), name, fp))
    return teachers


def same_tokenizer(a, b) -> bool:
    return a is b or (a is not None and b is not None and a.get_vocab() == b.get_vocab())


def check_compatible(student: nn.Module, s_tok, teachers: list[Teacher], task: str) -> None:
    """Teacher and student read the same token ids and are compared output by output."""
    for t in teachers:
        if not same_tokenizer(s_tok, t.tokenizer):
            sv, tv = s_tok.get_vocab(), t.tokenizer.get_vocab()
            diff = sorted(set(sv.items()) ^ set(tv.items()))[:3]
            raise ConfigError(
                f"distill.teacher: teacher {t.name!r} and the student use different tokenizers "
                f"({len(tv)} vs {len(sv)} tokens; differing entries e.g. {diff}). Teacher and student read "
                "the same token ids and their distributions are compared token by token, so they must "
                "share a tokenizer: pick a teacher of the student's model family")
        if task != "feature-extraction":
            s_out = student.config.vocab_size if task == "causal-lm" else student.config.num_labels
            t_out = t.model.config.vocab_size if task == "causal-lm" else t.model.config.num_labels
            if s_out != t_out:
                what = "vocabulary sizes" if task == "causal-lm" else "numbers of labels"
                raise ConfigError(f"distill.teacher: teacher {t.name!r} and the student have different "
                                  f"{what} ({t_out} vs {s_out}); their outputs cannot be compared")
