"""The distillation objective: the student (plus learned projections) as one trainable module, the
teachers, and the combined loss

    loss = alpha * T^2 * D(p_T || q_S) + (1 - alpha) * CE(student, hard labels)
           + hidden_weight * feature loss + attention_weight * attention loss

For causal LMs the hard labels are the next tokens and the soft term is per token (padding masked); for
classifiers they are the class labels; feature-extraction models have no logits, so the soft and hard terms
are replaced by a loss on the mean-pooled sentence embeddings (MSE or cosine)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..models import mean_pool
from . import losses
from .config import LossConfig
from .teacher_cache import CachedTargets
from .teachers import Teacher


def hidden_width(model: nn.Module) -> int:
    """The width of the hidden states, which a hidden-width-pruned model's config does not give (GPT-2, BERT, Gemma
    keep the original hidden_size there: a `hidden_width` structure entry narrows the modules)."""
    from ..architecture import find
    from ..errors import UnsupportedModelError

    try:
        return find(model).hidden_size
    except UnsupportedModelError:
        return int(model.config.hidden_size)


class DistillModule(nn.Module):
    """The student and the learned projections that map its hidden states to the teacher's width.

    One module so that data-parallel wrappers (DDP, FSDP) see every trained parameter."""

    def __init__(self, student: nn.Module, task: str, layer_map: dict[int, int], teacher_width: int | None,
                 hidden: bool, attentions: bool):
        super().__init__()
        self.student, self.task = student, task
        # the student's block classes, for FSDP's transformer auto-wrap policy (accelerate reads this)
        self._no_split_modules = getattr(student, "_no_split_modules", None)
        self.layer_map = dict(layer_map) if hidden or attentions else {}
        self.hidden, self.attentions = hidden, attentions
        width = hidden_width(student)
        project = teacher_width is not None and teacher_width != width
        self.proj = nn.ModuleList(
            [nn.Linear(width, teacher_width) if project else nn.Identity() for _ in self.layer_map]
        ) if hidden else nn.ModuleList()
        self.embed_proj = (nn.Linear(width, teacher_width) if project else nn.Identity()) \
            if task == "feature-extraction" else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        out = self.student(input_ids=input_ids, attention_mask=attention_mask,
                           output_hidden_states=self.hidden, output_attentions=self.attentions)
        res = {}
        if self.task == "feature-extraction":
            res["embedding"] = self.embed_proj(mean_pool(out.last_hidden_state, attention_mask))
        else:
            res["logits"] = out.logits
        if self.hidden:
            res["hidden"] = [p(out.hidden_states[i + 1]) for p, i in zip(self.proj, self.layer_map)]
        if self.attentions:
            res["attentions"] = [out.attentions[i] for i in self.layer_map]
        return res


def teacher_embedding(teachers: list[Teacher], outs: list, mask: torch.Tensor) -> torch.Tensor:
    """A feature-extraction student's target: the teachers' mean-pooled embeddings averaged with their weights
    (normalized, as the logits' soft targets are)."""
    total = sum(t.weight for t in teachers)
    return sum(t.weight / total * mean_pool(o.last_hidden_state, mask) for t, o in zip(teachers, outs))


@dataclass
class Objective:
    """The loss of one training step. `loss` holds the options; the rest is resolved by the distill pass."""

    task: str
    teachers: list[Teacher]
    loss: LossConfig
    total_steps: int = 1
    layer_map: dict[int, int] = field(default_factory=dict)
    cache: CachedTargets | None = None  # the teacher's top-k logits and tail by example index

    @property
    def alpha(self) -> float:
        """Feature-extraction models have no logits: their embedding loss replaces the soft and hard terms."""
        return 0.0 if self.task == "feature-extraction" else self.loss.alpha

    def needs_teacher_forward(self) -> bool:
        soft = self.alpha > 0 and self.task != "feature-extraction" and self.cache is None
        return bool(self.teachers) and (soft or self.task == "feature-extraction" or self.loss.matches_features())

    @torch.no_grad()
    def teacher_outputs(self, batch: dict) -> list:
        want_h, want_a = self.loss.hidden_weight > 0, self.loss.attention_weight > 0
        outs = []
        for i, t in enumerate(self.teachers):
            primary = i == 0  # feature and attention matching use the first teacher
            outs.append(t.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                output_hidden_states=(want_h and primary) or self.task == "feature-extraction",
                                output_attentions=want_a and primary))
        return outs

    def temperature_at(self, step: int) -> float:
        c = self.loss
        return losses.temperature_at(step, self.total_steps, c.temperature, c.temperature_end,
                                     c.temperature_schedule)

    def __call__(self, module: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        c = self.loss
        T = self.temperature_at(step)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        out = module(input_ids=ids, attention_mask=mask)
        t_outs = self.teacher_outputs(batch) if self.needs_teacher_forward() else []
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=ids.device)
        if self.task == "feature-extraction":
            t_emb = teacher_embedding(self.teachers, t_outs, mask)  # every teacher (it read the first only)
            parts["embed"] = losses.representation_loss(out["embedding"], t_emb, c.embedding_loss)
            total = total + parts["embed"]
        else:
            logits = out["logits"]
            if self.task == "causal-lm":  # position t predicts token t + 1
                logits, labels = logits[:, :-1], ids[:, 1:]
                row_mask = mask[:, 1:] * mask[:, :-1]
            else:
                labels, row_mask = batch["labels"], None
            if self.alpha < 1:
                parts["hard"] = losses.hard_loss(logits, labels, row_mask)
                total = total + (1 - self.alpha) * parts["hard"]
            if self.alpha > 0:
                if self.cache is not None:
                    values, indices, tail = self.cache.rows(batch["index"], T, ids.device)
                    if self.task == "causal-lm":
                        values, indices = values[:, :-1], indices[:, :-1]
                        tail = tail[:, :-1] if tail is not None else None
                    parts["soft"] = losses.topk_soft_loss(logits, values, indices, tail, T, c.kd_loss, row_mask)
                else:
                    t_logits = [o.logits[:, :-1] if self.task == "causal-lm" else o.logits for o in t_outs]
                    t_logp = losses.teacher_log_probs(t_logits if len(t_logits) > 1 else t_logits[0], T,
                                                      [t.weight for t in self.teachers])
                    parts["soft"] = losses.soft_loss(logits, t_logp, T, c.kd_loss, row_mask)
                total = total + self.alpha * parts["soft"]
        if c.hidden_weight > 0:
            t_hidden = t_outs[0].hidden_states
            terms = [losses.representation_loss(h, t_hidden[j + 1], c.hidden_loss, mask)
                     for h, j in zip(out["hidden"], self.layer_map.values())]
            parts["hidden"] = torch.stack(terms).mean()
            total = total + c.hidden_weight * parts["hidden"]
        if c.attention_weight > 0:
            t_attn = t_outs[0].attentions
            terms = [losses.attention_loss(a, t_attn[j], mask)
                     for a, j in zip(out["attentions"], self.layer_map.values())]
            parts["attention"] = torch.stack(terms).mean()
            total = total + c.attention_weight * parts["attention"]
        parts["loss"] = total
        parts["temperature"] = torch.tensor(T)
        return total, {k: v.detach() for k, v in parts.items()}
