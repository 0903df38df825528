"""Training examples for distillation: fixed-length LM windows or variable-length texts (with class labels),
batched by index so that shuffling, sharding across processes and cache look-ups all use the same ids."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import DataSpec, load_dataset, lm_windows
from ..errors import ConfigError, DataSourceError
from ..models import max_tokens
from .teacher_cache import tensor_digest


@dataclass
class Examples:
    rows: list[torch.Tensor] | torch.Tensor  # LongTensor [N, S] (windows) or a list of 1-D token id tensors
    pad_id: int
    labels: torch.Tensor | None = None  # class labels [N]
    pad_to: int | None = None  # pad every batch to this length (so cached [N, S, k] arrays line up)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def fixed(self) -> bool:
        return isinstance(self.rows, torch.Tensor)

    def batch(self, idx: list[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.long)
        if self.fixed:
            input_ids = self.rows[idx]
            mask = torch.ones_like(input_ids)
        else:
            seqs = [self.rows[int(i)] for i in idx]
            length = self.pad_to or max(len(s) for s in seqs)
            input_ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for r, s in enumerate(seqs):
                input_ids[r, : len(s)] = s
                mask[r, : len(s)] = 1
        out = {"input_ids": input_ids, "attention_mask": mask, "index": idx}
        if self.labels is not None:
            out["labels"] = self.labels[idx]
        return out

    def tokens(self) -> int:
        return int(self.rows.numel()) if self.fixed else sum(len(r) for r in self.rows)

    def digest(self) -> str:
        """Changes whenever any token id (or label) changes: the data part of the teacher-cache key."""
        parts = [self.rows] if self.fixed else [torch.cat(list(self.rows)), torch.tensor([len(r) for r in self.rows])]
        return tensor_digest(*parts)[:24]

    def batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            yield self.batch(list(range(start, min(start + batch_size, len(self)))))


def lm_examples(windows: torch.Tensor, pad_id: int) -> Examples:
    return Examples(rows=windows, pad_id=pad_id)


def text_examples(tokenizer, texts: list[str], labels: list[int] | None, max_length: int) -> Examples:
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    rows = [torch.tensor(ids, dtype=torch.long) for ids in enc["input_ids"]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    lab = torch.tensor(labels, dtype=torch.long) if labels is not None else None
    return Examples(rows=rows, pad_id=pad, labels=lab)


def training_examples(config, ctx, tok, task: str, split: str = "train", limit: int | None = None) -> Examples:
    """Examples from the pipeline's `data.train` for distill options `config`: its train split, or (split
    "validation") its validation split for evaluation, never the eval data's test split. `limit` caps
    validation tokens (causal LMs) or examples (the others)."""
    if ctx.data is None:
        raise DataSourceError("distill needs `data.train` in the pipeline config")
    spec = ctx.data.spec("train")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    if split == "train":
        ds = ctx.data.dataset("train")
    else:
        if (train_split := ctx.data.dataset("train").split) in ("all", "validation"):
            raise DataSourceError(f"data.train reads split {train_split!r}, which holds its validation documents "
                                  "too: set `split: train` on data.train to select weights on held-out text")
        ds = load_dataset(DataSpec(**{**spec.model_dump(), "split": "validation", "max_tokens": None,
                                      "max_examples": limit if task != "causal-lm" else None}), "train")
    if task == "causal-lm":
        seq_len = config.seq_len or spec.seq_len
        max_tokens = spec.max_tokens if split == "train" else limit
        return lm_examples(lm_windows(tok, ds, seq_len, max_tokens), pad)
    if task == "sequence-classification" and ds.labels is None:
        raise DataSourceError(f"distill: {spec.source} has no labels; a classifier needs labelled data "
                              "(a builtin labelled corpus or a .jsonl with label_field)")
    labels = ds.labels if task == "sequence-classification" else None
    return text_examples(tok, ds.texts, labels, config.max_length or spec.max_length)


def teacher_generated(examples: Examples, teacher: torch.nn.Module, student: torch.nn.Module, options, device,
                      progress) -> tuple[Examples, list[str]]:
    """Sequence-level distillation: the first `options.prompts` training windows cut to `prompt_tokens`, each
    continued by the teacher for `new_tokens` (greedy, or sampled with top-p 0.95). Returns the examples and
    notes on what was used instead where the windows are fewer or shorter than asked; refuses sequences
    longer than the teacher or the student takes."""
    windows, window_len = examples.rows.shape
    n_prompts, prompt_tokens = min(options.prompts, windows), min(options.prompt_tokens, window_len)
    length = prompt_tokens + options.new_tokens
    for role, model in (("teacher", teacher), ("student", student)):
        limit = max_tokens(model.config.to_dict())
        if limit is not None and length > limit:
            raise ConfigError(
                f"distill.sequence_level: prompt_tokens ({prompt_tokens}) + new_tokens ({options.new_tokens}) = "
                f"{length} tokens, more than the {role}'s {limit} positions (max_position_embeddings / "
                f"n_positions); set distill.sequence_level.new_tokens to at most {limit - prompt_tokens} or "
                "lower distill.sequence_level.prompt_tokens")
    notes = []
    if n_prompts < options.prompts:
        notes.append(f"distill.sequence_level.prompts: {n_prompts} prompts, not {options.prompts}: the training "
                     f"data has {windows} windows (more need a larger data.train.max_tokens)")
    if prompt_tokens < options.prompt_tokens:
        notes.append(f"distill.sequence_level.prompt_tokens: prompts of {prompt_tokens} tokens, not "
                     f"{options.prompt_tokens}: the training windows are {window_len} tokens long "
                     "(distill.seq_len or data.train.seq_len)")
    prompts = examples.rows[:n_prompts, :prompt_tokens].to(device)
    gen_args = dict(max_new_tokens=options.new_tokens, min_new_tokens=options.new_tokens,
                    do_sample=options.sample, pad_token_id=examples.pad_id)
    if options.sample:
        gen_args.update(top_p=0.95, temperature=1.0, top_k=0)
    rows = []
    with torch.no_grad():
        for start in progress(range(0, len(prompts), 8), desc="teacher generates"):
            p = prompts[start: start + 8]
            rows.append(teacher.generate(p, attention_mask=torch.ones_like(p), **gen_args).cpu())
    return lm_examples(torch.cat(rows), examples.pad_id), notes
