"""Quality metrics as pure numpy functions over logits and embeddings.

Backends only produce logits (torch or ONNX Runtime, converted to float32 numpy arrays); everything here is
shared, so a torch-vs-ORT difference in a report is the model's, not the harness's. No torch import: the
ORT worker process must not load it.

Perplexity convention (the sliding-window evaluation of the Hugging Face perplexity guide): the eval text
is one token stream (documents joined by EOS). Windows of `window` tokens start at 0, stride, 2*stride, ...
until one reaches the end of the stream (the last may be shorter). Each window scores only the targets no
earlier window scored, i.e. positions [max(begin + 1, previous_end), end): token t is predicted from the
tokens before it inside its window. With stride == window the windows do not overlap and the first token of
each window is not scored (it has no context). Perplexity = exp(total NLL / number of scored tokens)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def ppl_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) of every window over a stream of `n_tokens`."""
    if window < 2 or stride < 1:
        raise ValueError("window must be >= 2 and stride >= 1")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        first = max(begin + 1, prev_end)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float32)
    m = x.max(-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target: logits [N, V], targets [N] -> [N] (float64)."""
    logp = log_softmax(logits)
    return -np.take_along_axis(logp, np.asarray(targets)[:, None], -1)[:, 0].astype(np.float64)


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely tokens per row and their log-probabilities, most likely first: ([N,k] int, [N,k])."""
    logp = log_softmax(logits)
    k = min(k, logp.shape[-1])
    idx = np.argpartition(-logp, k - 1, axis=-1)[:, :k]
    vals = np.take_along_axis(logp, idx, -1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    return np.take_along_axis(idx, order, -1).astype(np.int64), np.take_along_axis(vals, order, -1)


def topk_kl(ref_idx: np.ndarray, ref_logp: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(reference || model) per row over the reference's top-k tokens plus one bucket for all others.

    Merging tokens can only lower a KL divergence, so this is a lower bound of the full KL, equal to it when
    k covers the vocabulary."""
    logq = np.take_along_axis(log_softmax(logits), ref_idx, -1).astype(np.float64)
    logp = ref_logp.astype(np.float64)
    p = np.exp(logp)
    kl = (p * (logp - logq)).sum(-1)
    p_rest = np.clip(1.0 - p.sum(-1), 0.0, 1.0)
    q_rest = np.clip(1.0 - np.exp(logq).sum(-1), 1e-30, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rest = np.where(p_rest > 1e-12, p_rest * (np.log(np.maximum(p_rest, 1e-30)) - np.log(q_rest)), 0.0)
    return np.maximum(kl + rest, 0.0)


@dataclass
class LMScores:
    """Per-target figures of one model over the eval stream, in stream order."""

    nll: np.ndarray  # [T]
    top1: np.ndarray  # [T] argmax token
    topk_idx: np.ndarray | None = None  # [T, k] (kept for a baseline's reference)
    topk_logp: np.ndarray | None = None
    kl: np.ndarray | None = None  # [T] KL(reference || model), when a reference was given


def score_window(logits: np.ndarray, tokens: np.ndarray, begin: int, end: int, first: int,
                 k: int | None = None, ref: tuple[np.ndarray, np.ndarray] | str | None = None) -> LMScores:
    """Figures for the targets [first, end) of one window; `logits` [end-begin, V] are that window's.

    `k`: also keep this window's top-k (for a baseline reference); `ref`: the reference's (top-k indices,
    log-probs) for these targets, to compute the KL while the logits are at hand, or "self" when this model is
    its own reference (the baseline measured once, writing its reference as it goes)."""
    rows = logits[first - 1 - begin: end - 1 - begin]
    targets = tokens[first:end]
    idx = logp = kl = None
    if k:
        idx, logp = top_k(rows, k)
    if isinstance(ref, str):
        kl = topk_kl(idx, logp, rows)
    elif ref is not None:
        kl = topk_kl(ref[0], ref[1], rows)
    return LMScores(token_nll(rows, targets), rows.argmax(-1), idx, logp, kl)


def concat_scores(parts: list[LMScores]) -> LMScores:
    def cat(name):
        arrays = [getattr(p, name) for p in parts]
        return None if arrays[0] is None else np.concatenate(arrays)

    return LMScores(cat("nll"), cat("top1"), cat("topk_idx"), cat("topk_logp"), cat("kl"))


def perplexity(nll: np.ndarray) -> float:
    return float(np.exp(np.mean(nll)))


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of positions where two label / token arrays are equal."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare predictions of shapes {a.shape} and {b.shape}")
    return float((a == b).mean())


def accuracy_f1(pred: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> tuple[float, float]:
    """Accuracy and macro-F1 (mean over classes present in labels or predictions; F1 = 0 where undefined)."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    classes = range(num_classes) if num_classes else sorted(set(labels.tolist()) | set(pred.tolist()))
    f1s = []
    for c in classes:
        tp = int(((pred == c) & (labels == c)).sum())
        fp = int(((pred == c) & (labels != c)).sum())
        fn = int(((pred != c) & (labels == c)).sum())
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float((pred == labels).mean()), float(np.mean(f1s)) if f1s else 0.0


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mask-weighted mean of token states [B, T, H] -> [B, H] (sentence-transformers' pooling)."""
    m = np.asarray(mask, dtype=np.float32)[..., None]
    return (np.asarray(hidden, dtype=np.float32) * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two embedding matrices [N, H]."""
    return (_normalize(a) * _normalize(b)).sum(-1)


def nearest_neighbours(emb: np.ndarray) -> np.ndarray:
    """Index of each row's most similar other row (cosine)."""
    x = _normalize(emb)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(-1)
