"""Offline distillation: the teacher's top-k logits over the training data, computed once and kept on disk.

Layout: <cache_dir>/teacher-cache/<key>/{values.npy (float16), indices.npy (int32), meta.json}, with arrays
of shape [N, S, k] for token-level tasks and [N, k] for classifiers. Raw logits are stored (not softened
probabilities), so the temperature can change without rebuilding. The key hashes the teacher's fingerprint,
the exact token ids (which covers the data source, split, tokenizer and sequence length) and k, so any change
to those builds a new cache. Written to a temporary directory and renamed: a killed run leaves no cache that
a later run could read."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..runtime import cache_dir

CACHE_FORMAT = 1


def tensor_digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()


def model_digest(model: torch.nn.Module) -> str:
    """A fingerprint of a model's weights (for teachers that are not a named source or checkpoint)."""
    return tensor_digest(*[v for _, v in sorted(model.state_dict().items())])[:24]


def cache_key(teacher_fingerprint: str, data_digest: str, k: int) -> str:
    h = hashlib.sha256(f"v{CACHE_FORMAT}|{teacher_fingerprint}|{data_digest}|k={k}".encode())
    return h.hexdigest()[:24]


class TeacherCache:
    def __init__(self, key: str, root: Path | None = None):
        self.key = key
        self.root = Path(root or Path(cache_dir()) / "teacher-cache")
        self.path = self.root / key

    def exists(self) -> bool:
        return (self.path / "meta.json").exists()

    def load(self) -> tuple[np.ndarray, np.ndarray, dict]:
        meta = json.loads((self.path / "meta.json").read_text())
        values = np.load(self.path / "values.npy", mmap_mode="r")
        indices = np.load(self.path / "indices.npy", mmap_mode="r")
        return values, indices, meta

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file()) if self.path.exists() else 0

    def write(self, values: np.ndarray, indices: np.ndarray, meta: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.key}.tmp-", dir=self.root))
        try:
            np.save(tmp / "values.npy", values.astype(np.float16))
            np.save(tmp / "indices.npy", indices.astype(np.int32))
            (tmp / "meta.json").write_text(json.dumps({"format": CACHE_FORMAT, **meta}, indent=2) + "\n")
            if self.path.exists():
                shutil.rmtree(self.path)
            os.rename(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@torch.no_grad()
def compute_topk(logit_fn, batches, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of the teacher's logits for every batch, concatenated on the example axis.

    `logit_fn(batch) -> logits [B, (S,) V]`; `batches` yields batches in dataset order."""
    vals, idxs = [], []
    for batch in batches:
        logits = logit_fn(batch).float()
        top = logits.topk(min(k, logits.shape[-1]), dim=-1)
        vals.append(top.values.to(torch.float16).numpy())
        idxs.append(top.indices.to(torch.int32).numpy())
    return np.concatenate(vals), np.concatenate(idxs)


def cached_soft_targets(teacher, examples, task: str, *, k: int, batch_size: int, amp, device, accelerator, progress):
    """The teacher's top-k logits over `examples`, from the cache or computed once (by the main process of a
    multi-process launch) and stored. Returns ((values, indices), figures for the manifest).

    The key holds the weights' digest as well as the teacher's name: a context may hand over any model as
    its "source" teacher (prune's recovery does), and a cache must never be read for another model."""
    import math

    fingerprint = f"{teacher.fingerprint}|{model_digest(teacher.model)}"
    cache = TeacherCache(cache_key(fingerprint, examples.digest(), k))
    hit = cache.exists()
    if accelerator is not None:  # every process has looked before the main one writes: they agree on `hit`
        accelerator.wait_for_everyone()
    if not hit and (accelerator is None or accelerator.is_main_process):
        def logits(batch):  # the teacher runs as it would on the fly (same autocast)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                return teacher.model(input_ids=batch["input_ids"].to(device),
                                     attention_mask=batch["attention_mask"].to(device)).logits.float().cpu()
        batches = progress(examples.batches(batch_size), total=math.ceil(len(examples) / batch_size),
                           desc="teacher cache")
        values, indices = compute_topk(logits, batches, k)
        cache.write(values, indices, {"teacher": teacher.fingerprint, "data": examples.digest(), "k": k,
                                      "examples": len(examples), "tokens": examples.tokens(), "task": task})
    if accelerator is not None:
        accelerator.wait_for_everyone()
    values, indices, meta = cache.load()
    return (values, indices), {"key": cache.key, "hit": hit, "bytes": cache.size_bytes(),
                               "tokens": meta["tokens"], "k": meta["k"]}
