"""Offline distillation: the teacher's top-k logits over the training data, computed once and kept on disk.

Layout: <cache_dir>/teacher-cache/<key>/{values.npy (float16), indices.npy (int32), tail.npy (float32),
meta.json}: values and indices of shape [N, S, k] for token-level tasks and [N, k] for classifiers; tail
[N, (S,) len(TAIL_BETAS)], the log of the teacher's mass outside its top k (log sum exp(beta * z_j) over
those tokens) at a few inverse temperatures beta, so the soft term can keep one bucket for the rest of the
vocabulary (losses.topk_soft_loss). Raw logits are stored (not softened probabilities) and the tail at fixed
temperatures, so T can change (or follow a schedule) without rebuilding. The key hashes the teacher's
fingerprint, the exact token ids (which covers the data source, split, tokenizer and sequence length), k,
the format and the teacher's autocast dtype, so any change to those builds a new cache. Written to a temporary
directory and renamed: a killed run leaves no cache that a later run could read. meta.json records each array file's sha256, checked on every
load: a damaged cache (or one written without the hashes) is computed again, never trusted."""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..logs import SUITE_LOGGER
from ..runtime import cache_dir

CACHE_FORMAT = 2  # 2: tail.npy (the teacher's mass outside its top k)

# The inverse temperatures beta = 1/T at which the tail is stored: exact for T in {8, 6, 4, 3, 2, 1.5, 1, 0.5};
# between them linear in beta (log sum exp(beta * z) is smooth and convex in beta), towards beta = 0 ending at
# log(number of tail tokens), which needs no storing.
TAIL_BETAS = (1 / 8, 1 / 6, 1 / 4, 1 / 3, 1 / 2, 2 / 3, 1.0, 2.0)


ARRAYS = ("values", "indices", "tail")  # <name>.npy in a cache's directory


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:  # in chunks: a cache can be gigabytes
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        flat = t.reshape(-1)  # a 0-d tensor cannot be viewed as bytes of another width (Apertus' bf16 scalars)
        h.update(flat.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else flat.numpy().tobytes())
    return h.hexdigest()


def model_digest(model: torch.nn.Module) -> str:
    """A fingerprint of a model's weights (for teachers that are not a named source or checkpoint)."""
    return tensor_digest(*[v for _, v in sorted(model.state_dict().items())])[:24]


def cache_key(teacher_fingerprint: str, data_digest: str, k: int) -> str:
    h = hashlib.sha256(f"v{CACHE_FORMAT}|{teacher_fingerprint}|{data_digest}|k={k}".encode())
    return h.hexdigest()[:24]


class CachedTargets:
    """The cached teacher by example: top-k logits and indices, and its tail at any temperature."""

    def __init__(self, values: np.ndarray, indices: np.ndarray, tail: np.ndarray, vocab: int):
        self.values, self.indices, self.tail, self.vocab = values, indices, tail, vocab

    def rows(self, index: torch.Tensor, temperature: float, device) -> tuple[torch.Tensor, ...]:
        """(values, indices, tail log-mass at `temperature`) of the examples `index`, on `device`; the tail
        is None when the top k hold the whole vocabulary (a classifier with k or fewer classes)."""
        rows = index.cpu().numpy()

        def pick(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a[rows])).to(device)

        n_tail = self.vocab - self.values.shape[-1]
        tail = tail_at(pick(self.tail), temperature, n_tail) if n_tail else None
        return pick(self.values), pick(self.indices), tail


def tail_at(tail: torch.Tensor, temperature: float, n_tail: int) -> torch.Tensor:
    """log sum exp(z_j / T) over the n_tail tokens of the tail, from its values at TAIL_BETAS
    ([..., len(TAIL_BETAS)] -> [...])."""
    xs = (0.0, *TAIL_BETAS)
    beta = 1.0 / temperature
    i = min(bisect.bisect_right(xs, beta) - 1, len(xs) - 2)  # the segment [xs[i], xs[i + 1]] (the last extends)

    def at(j: int) -> torch.Tensor:
        return tail[..., j - 1].float() if j else torch.full(tail.shape[:-1], math.log(n_tail), device=tail.device)

    w = (beta - xs[i]) / (xs[i + 1] - xs[i])
    return at(i) if w == 0 else at(i + 1) if w == 1 else (1 - w) * at(i) + w * at(i + 1)


class TeacherCache:
    def __init__(self, key: str, root: Path | None = None):
        self.key = key
        self.root = Path(root or Path(cache_dir()) / "teacher-cache")
        self.path = self.root / key

    def exists(self) -> bool:
        return (self.path / "meta.json").exists()

    def try_load(self) -> tuple[CachedTargets, dict] | None:
        """`load()` when the cache is stored and verifies, else None (absent, or an interrupted copy, a damaged
        file, another format); a stored cache that does not verify is logged."""
        if not self.exists():
            return None
        try:
            return self.load()
        except (OSError, ValueError, KeyError, IndexError) as exc:  # json's and numpy's read errors are ValueErrors
            logging.getLogger(SUITE_LOGGER).warning(f"teacher cache {self.path} does not verify ({exc}): "
                                                    "computing it again")
            return None

    def load(self) -> tuple[CachedTargets, dict]:
        meta = json.loads((self.path / "meta.json").read_text())
        hashes = meta.get("sha256") or {}
        for name in ARRAYS:
            if name not in hashes:
                raise ValueError(f"meta.json has no sha256 of {name}.npy (written by an older version)")
            if _file_sha256(self.path / f"{name}.npy") != hashes[name]:
                raise ValueError(f"{name}.npy does not match its sha256 in meta.json (changed or damaged)")
        arrays = {name: np.load(self.path / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
        lead = arrays["values"].shape[:-1]
        if (meta.get("format") != CACHE_FORMAT or arrays["indices"].shape != arrays["values"].shape
                or arrays["tail"].shape != (*lead, len(TAIL_BETAS)) or lead[0] != meta["examples"]):
            raise ValueError("its format or shapes differ from what meta.json says")
        return CachedTargets(arrays["values"], arrays["indices"], arrays["tail"], meta["vocab"]), meta

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file()) if self.path.exists() else 0

    def write(self, values: np.ndarray, indices: np.ndarray, tail: np.ndarray, meta: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.key}.tmp-", dir=self.root))
        try:
            np.save(tmp / "values.npy", values.astype(np.float16))
            np.save(tmp / "indices.npy", indices.astype(np.int32))
            np.save(tmp / "tail.npy", tail.astype(np.float32))
            hashes = {name: _file_sha256(tmp / f"{name}.npy") for name in ARRAYS}
            (tmp / "meta.json").write_text(json.dumps({"format": CACHE_FORMAT, **meta, "sha256": hashes},
                                                      indent=2) + "\n")
            if self.path.exists():
                shutil.rmtree(self.path)
            os.rename(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@torch.no_grad()
def compute_topk(logit_fn, batches, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Top-k of the teacher's logits for every batch and the log-mass of the rest at TAIL_BETAS,
    concatenated on the example axis, and the vocabulary size.

    `logit_fn(batch) -> logits [B, (S,) V]`; `batches` yields batches in dataset order."""
    vals, idxs, tails = [], [], []
    for batch in batches:
        logits = logit_fn(batch).float()
        top = logits.topk(min(k, logits.shape[-1]), dim=-1)
        rest = logits.scatter(-1, top.indices, float("-inf"))
        tails.append(torch.stack([torch.logsumexp(rest * b, dim=-1) for b in TAIL_BETAS], -1).numpy())
        vals.append(top.values.to(torch.float16).numpy())
        idxs.append(top.indices.to(torch.int32).numpy())
    return np.concatenate(vals), np.concatenate(idxs), np.concatenate(tails), int(logits.shape[-1])


def cached_soft_targets(teacher, examples, task: str, *, k: int, batch_size: int, amp, device, accelerator, progress):
    """The teacher's top-k logits over `examples`, from the cache or computed once (by the main process of a
    multi-process launch) and stored. Returns (CachedTargets, figures for the manifest).

    The key holds the weights' digest as well as the teacher's name: a context may hand over any model as
    its "source" teacher (prune's recovery does), and a cache must never be read for another model; and the
    autocast dtype the teacher ran under (bf16 logits are not the fp32 teacher's)."""
    fingerprint = f"{teacher.fingerprint}|{model_digest(teacher.model)}"
    if amp is not None:  # fp32 keeps the keys of caches written before the dtype was part of them
        fingerprint += f"|amp={amp}"
    cache = TeacherCache(cache_key(fingerprint, examples.digest(), k))
    found = cache.try_load()
    hit = found is not None
    if accelerator is not None:  # every process has looked before the main one writes: they agree on `hit`
        accelerator.wait_for_everyone()
    main = accelerator is None or accelerator.is_main_process
    if main:
        logging.getLogger(SUITE_LOGGER).info(
            f"teacher cache: {'reading' if hit else 'computing'} the top-{k} logits of {len(examples)} examples "
            f"({examples.tokens()} tokens) at {cache.path}")
    if not hit and main:
        def logits(batch):  # the teacher runs as it would on the fly (same autocast)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                return teacher.model(input_ids=batch["input_ids"].to(device),
                                     attention_mask=batch["attention_mask"].to(device)).logits.float().cpu()

        batches = progress(examples.batches(batch_size), total=math.ceil(len(examples) / batch_size),
                           desc="teacher cache")
        values, indices, tail, vocab = compute_topk(logits, batches, k)
        cache.write(values, indices, tail, {"teacher": teacher.fingerprint, "data": examples.digest(), "k": k,
                                            "vocab": vocab, "examples": len(examples), "tokens": examples.tokens(),
                                            "task": task})
    if accelerator is not None:
        accelerator.wait_for_everyone()
    targets, meta = found or cache.load()
    return targets, {"key": cache.key, "hit": hit, "bytes": cache.size_bytes(), "tokens": meta["tokens"],
                     "k": meta["k"]}
