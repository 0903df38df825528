"""The tasks the suite compresses models for, and the Hugging Face auto class that builds each."""
from __future__ import annotations

from .errors import ModelSourceError

TASKS = ("causal-lm", "sequence-classification", "feature-extraction")


def auto_class(task: str):
    import transformers

    if task not in TASKS:
        raise ModelSourceError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    return {
        "causal-lm": transformers.AutoModelForCausalLM,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
        "feature-extraction": transformers.AutoModel,
    }[task]
