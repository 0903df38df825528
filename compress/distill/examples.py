"""Training examples for distillation: fixed-length LM windows or variable-length texts (with class labels),
batched by index so that shuffling, sharding across processes and cache look-ups all use the same ids."""
from __future__ import annotations

from dataclasses import dataclass

import torch

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
