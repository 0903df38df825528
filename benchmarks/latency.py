"""Timing workloads: warm-up, then repeated runs, summarized as median / p90 / min / max.

Decoders: prefill a [batch, prompt_tokens] prompt, then `new_tokens` greedy decode steps with the KV cache
(each step feeds the previous step's argmax). Prefill time and decode time are timed separately in each
repeat. Encoders: one forward pass at batch 1, and one at `throughput_batch` (items/s)."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


def summarize(seconds: list[float]) -> dict:
    """Median, p90, min, max and mean of repeated timings, in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "min_ms": float(ms.min()), "max_ms": float(ms.max()), "mean_ms": float(ms.mean()), "n": int(ms.size)}


def time_runs(fn: Callable[[], object], warmup: int, repeats: int, sync: Callable[[], None] = lambda: None,
              progress=None) -> list[float]:
    for _ in range(warmup):
        fn()
        sync()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - start)
        if progress is not None:
            progress.update(1)
    return out


def decoder_latency(backend, prompt: np.ndarray, new_tokens: int, warmup: int, repeats: int,
                    progress=None) -> dict:
    """Prefill and greedy decode timings of `prompt` [B, P] (int64)."""
    mask = np.ones_like(prompt)

    def once() -> tuple[float, float, np.ndarray]:
        start = time.perf_counter()
        logits, state = backend.prefill(prompt, mask)
        backend.sync()
        mid = time.perf_counter()
        generated = []
        for _ in range(new_tokens):
            nxt = np.asarray(logits).argmax(-1).astype(np.int64)[:, None]
            generated.append(nxt)
            logits, state = backend.decode_step(nxt, state)
        backend.sync()
        end = time.perf_counter()
        return mid - start, end - mid, np.concatenate(generated, axis=1)

    for _ in range(warmup):
        once()
    prefill, decode = [], []
    for _ in range(repeats):
        p, d, generated = once()
        prefill.append(p)
        decode.append(d)
        if progress is not None:
            progress.update(1)
    batch = prompt.shape[0]
    dec = summarize(decode)
    return {
        "prefill": summarize(prefill),
        "decode": dec,
        "decode_ms_per_token": dec["median_ms"] / new_tokens,
        "decode_tokens_per_s": batch * new_tokens / (dec["median_ms"] / 1e3),
        "prefill_tokens_per_s": batch * prompt.shape[1] / (summarize(prefill)["median_ms"] / 1e3),
        "batch": batch, "prompt_tokens": int(prompt.shape[1]), "new_tokens": new_tokens,
        # greedy continuation of the first prompt: lets a reader check two backends decode the same tokens
        "generated_ids": generated[0].tolist(),
    }


def encoder_latency(backend, task: str, ids: np.ndarray, mask: np.ndarray, throughput_batch: int, warmup: int,
                    repeats: int, progress=None) -> dict:
    """Batch-1 latency and batch throughput of an encoder on fixed-length inputs `ids` [>=1, L]."""
    call = backend.embed if task == "feature-extraction" else backend.logits
    reps = int(np.ceil(throughput_batch / ids.shape[0]))
    big_ids, big_mask = np.tile(ids, (reps, 1))[:throughput_batch], np.tile(mask, (reps, 1))[:throughput_batch]
    one = summarize(time_runs(lambda: call(ids[:1], mask[:1]), warmup, repeats, backend.sync, progress))
    many = summarize(time_runs(lambda: call(big_ids, big_mask), warmup, repeats, backend.sync, progress))
    return {"batch1": one, "throughput": many, "throughput_items_per_s": throughput_batch / (many["median_ms"] / 1e3),
            "seq_tokens": int(ids.shape[1]), "throughput_batch": throughput_batch}
