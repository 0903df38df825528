"""Distillation losses.

Soft targets follow Hinton et al.: p_T = softmax(z_T / T), q_S = softmax(z_S / T) and the soft term is
T^2 * D(p_T, q_S), where D is KL(p||q) (default), reverse KL(q||p) or Jensen-Shannon. KL rather than
cross-entropy, so the term is exactly zero when the student matches the teacher. The T^2 factor keeps the
soft term's gradients on the same scale as the hard-label term when T changes.

Teacher targets are given as log-probabilities (`teacher_logp`) so that averaged multi-teacher targets and
the cache's top-k-plus-rest targets go through the same divergence as plain logits."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KD_LOSSES = ("kl", "reverse-kl", "jsd")


def teacher_log_probs(teacher_logits: list[torch.Tensor] | torch.Tensor, temperature: float,
                      weights: list[float] | None = None) -> torch.Tensor:
    """log of the (weighted average of the) teachers' softened distributions, in float32."""
    if isinstance(teacher_logits, torch.Tensor):
        return F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    weights = weights or [1.0] * len(teacher_logits)
    total = sum(weights)
    logps = torch.stack([F.log_softmax(z.float() / temperature, dim=-1) + math.log(w / total)
                         for z, w in zip(teacher_logits, weights)])
    return torch.logsumexp(logps, dim=0)  # log sum_i w_i p_i, computed stably


def divergence(teacher_logp: torch.Tensor, student_logp: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """Per-row divergence summed over the last (class / vocabulary) axis."""
    if kind == "kl":
        return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    if kind == "reverse-kl":
        return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)
    if kind == "jsd":
        m = torch.logsumexp(torch.stack([teacher_logp, student_logp]), dim=0) - math.log(2.0)
        return 0.5 * ((teacher_logp.exp() * (teacher_logp - m)).sum(-1)
                      + (student_logp.exp() * (student_logp - m)).sum(-1))
    raise ValueError(f"unknown kd_loss {kind!r}; allowed: {', '.join(KD_LOSSES)}")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def soft_loss(student_logits: torch.Tensor, teacher_logp: torch.Tensor, temperature: float,
              kind: str = "kl", mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * D(p_T, q_S), averaged over rows (tokens or examples) where `mask` is set."""
    student_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return temperature**2 * _masked_mean(divergence(teacher_logp, student_logp, kind), mask)


def topk_soft_loss(student_logits: torch.Tensor, top_values: torch.Tensor, top_indices: torch.Tensor,
                   teacher_tail: torch.Tensor | None, temperature: float, kind: str = "kl",
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """The soft term against the cached teacher: its top-k tokens and one bucket for the rest of the
    vocabulary (`teacher_tail` = log sum exp(z_j / T) over the tokens outside its top k, teacher_cache.tail_at;
    None when the top k are the whole vocabulary).

    Over those k + 1 outcomes both distributions are exact, so the student matches the teacher's top-k
    probabilities and the mass it leaves to the other tokens; only how that mass is shared among them is not
    seen (a lower bound of the full divergence). The earlier sparse variants lost the rest: renormalizing both
    over the top k, or comparing the truncated teacher with the student's full softmax, which pushed the
    student's mass off every other token (studies/kd_cache_loss.py, validation perplexity after 16 steps:
    68.4 with the teacher on the fly; from the cache 71.6 this way, 75.6 renormalized, 129.8 full softmax)."""
    z = top_values.float() / temperature
    student_top = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, top_indices.long())
    if teacher_tail is None:  # the top k are the whole vocabulary: no rest
        teacher_logp, student_logp = F.log_softmax(z, dim=-1), student_top
    else:
        log_z = torch.logaddexp(torch.logsumexp(z, dim=-1), teacher_tail.float())
        teacher_logp = torch.cat([z - log_z[..., None], (teacher_tail.float() - log_z)[..., None]], dim=-1)
        # log(1 - mass on the top k), floored so a student that puts all its mass there keeps a finite log
        student_rest = torch.log1p(-student_top.exp().sum(-1).clamp(max=1 - 1e-6))
        student_logp = torch.cat([student_top, student_rest[..., None]], dim=-1)
    return temperature**2 * _masked_mean(divergence(teacher_logp, student_logp, kind), mask)


def hard_loss(student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy at T = 1 against hard labels (next tokens or classes), averaged where `mask` is set."""
    ce = F.cross_entropy(student_logits.float().reshape(-1, student_logits.shape[-1]), labels.reshape(-1),
                         reduction="none").view(labels.shape)
    return _masked_mean(ce, mask)


def representation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse",
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE or cosine distance (1 - cos) between matched vectors [..., d], averaged where `mask` is set."""
    student, teacher = student.float(), teacher.float()
    if kind == "mse":
        per_row = (student - teacher).pow(2).mean(-1)
    elif kind == "cosine":
        per_row = 1.0 - F.cosine_similarity(student, teacher, dim=-1)
    else:
        raise ValueError(f"unknown representation loss {kind!r}; allowed: mse, cosine")
    return _masked_mean(per_row, mask)


def attention_loss(student_attn: torch.Tensor, teacher_attn: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) between attention distributions [B, H, Q, K] of one mapped layer pair.

    Head counts that differ are compared head-averaged. Averaged over heads and the (masked) queries."""
    if student_attn.shape[1] != teacher_attn.shape[1]:
        student_attn, teacher_attn = student_attn.mean(1, keepdim=True), teacher_attn.mean(1, keepdim=True)
    t = teacher_attn.float().clamp_min(1e-12)
    s = student_attn.float().clamp_min(1e-12)
    kl = (t * (t.log() - s.log())).sum(-1).mean(1)  # [B, Q]
    return _masked_mean(kl, mask)


def default_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Student layer i -> teacher layer round((i + 1) * L_t / L_s) - 1 (the last layers always meet), at least 0
    (a student deeper than its teacher mapped its first layers to -1)."""
    return {i: max(0, int(round((i + 1) * teacher_layers / student_layers)) - 1) for i in range(student_layers)}


def temperature_at(step: int, total_steps: int, start: float, end: float | None, schedule: str) -> float:
    """Constant T, or linear from `start` (early, softer targets) to `end` (late) over training."""
    if schedule == "constant" or end is None or total_steps <= 1:
        return start
    frac = min(max(step / (total_steps - 1), 0.0), 1.0)
    return start + (end - start) * frac
