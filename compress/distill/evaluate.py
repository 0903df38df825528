"""Held-out evaluation during distillation: the figure that picks the best weights (`keep_best`).

Causal LMs: cross-entropy / perplexity on validation windows; classifiers: accuracy; embedding models:
mean cosine between student and teacher sentence embeddings."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .examples import Examples
from .objective import teacher_embedding


def evaluator(task: str, examples: Examples, teachers: list, device) -> Callable[[torch.nn.Module], dict]:
    """`evaluate(module) -> {"metric": value, "higher_is_better": bool, ...}` for the training loop;
    `module` is the DistillModule (its student is scored), called as a whole so that an FSDP wrapper around it
    can gather the weights."""

    def causal_lm(module) -> dict:
        nll, n = 0.0, 0
        for b in examples.batches(8):
            ids = b["input_ids"].to(device)
            logits = module(input_ids=ids, attention_mask=torch.ones_like(ids))["logits"][:, :-1].float()
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                   reduction="sum").item()
            n += ids[:, 1:].numel()
        ce = nll / n
        return {"metric": ce, "eval_loss": round(ce, 5), "perplexity": round(math.exp(ce), 3),
                "higher_is_better": False}

    def classifier(module) -> dict:
        right = 0
        for b in examples.batches(16):
            logits = module(input_ids=b["input_ids"].to(device),
                            attention_mask=b["attention_mask"].to(device))["logits"]
            right += int((logits.argmax(-1).cpu() == b["labels"]).sum())
        acc = right / len(examples)
        return {"metric": acc, "accuracy": round(acc, 5), "higher_is_better": True}

    def embeddings(module) -> dict:
        sims = []
        for b in examples.batches(16):
            ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
            s = module(input_ids=ids, attention_mask=mask)["embedding"]
            t = teacher_embedding(teachers, [t.model(input_ids=ids, attention_mask=mask) for t in teachers], mask)
            sims.append(F.cosine_similarity(s.float(), t.float(), dim=-1).cpu())
        cos = float(torch.cat(sims).mean())
        return {"metric": cos, "cosine_to_teacher": round(cos, 5), "higher_is_better": True}

    return {"causal-lm": causal_lm, "sequence-classification": classifier}.get(task, embeddings)
