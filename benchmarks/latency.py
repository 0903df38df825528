"""Timing workloads: warm-up, then repeated runs, summarized as median / p90 / min / max.

Decoders: prefill a [batch, prompt_tokens] prompt, then `new_tokens` greedy decode steps with the KV cache
(each step feeds the previous step's argmax). Prefill time and decode time are timed separately in each
repeat. Encoders: one forward pass at batch 1, and one at `throughput_batch` (items/s). Each summary keeps
its raw runs, so timing rounds measured in separate processes can be pooled (`pool`)."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


def summarize(seconds: list[float]) -> dict:
    """Median, p90, min, max and mean of repeated timings, in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "min_ms": float(ms.min()), "max_ms": float(ms.max()), "mean_ms": float(ms.mean()), "n": int(ms.size),
            "runs_ms": [round(float(x), 3) for x in ms]}


SUMMARIES = ("prefill", "decode", "batch1", "throughput")


def _rates(lat: dict) -> dict:
    """The per-token / per-item figures derived from the medians."""
    if "decode" in lat:
        n, batch = lat["new_tokens"], lat["batch"]
        # each of the n decode steps makes a token for each of the batch's rows
        return {"decode_ms_per_token": lat["decode"]["median_ms"] / (batch * n),
                "decode_tokens_per_s": batch * n / (lat["decode"]["median_ms"] / 1e3),
                "prefill_tokens_per_s": batch * lat["prompt_tokens"] / (lat["prefill"]["median_ms"] / 1e3)}
    return {"throughput_items_per_s": lat["throughput_batch"] / (lat["throughput"]["median_ms"] / 1e3)}


def pool(first: dict, other: dict) -> dict:
    """`first` with the runs of `other` (the same workload, timed again in another process) added."""
    out = dict(first)
    for key in SUMMARIES:
        if key in first:
            out[key] = summarize([x / 1e3 for x in first[key]["runs_ms"] + other[key]["runs_ms"]])
    out.update(_rates(out))
    out["rounds"] = first.get("rounds", 1) + other.get("rounds", 1)
    return out


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


def greedy(backend, prompt: np.ndarray, new_tokens: int, eos: int | None = None,
           after_prefill: Callable[[], None] = lambda: None) -> np.ndarray:
    """The greedy decode loop: prefill `prompt` [B, P] (int64) with the KV cache, then `new_tokens` steps,
    each feeding back the previous argmax. Returns the generated ids [B, n]. With `eos` (batch 1) it stops
    after producing EOS (kept in the output). `after_prefill` runs between prefill and the first step."""
    logits, state = backend.prefill(prompt, np.ones_like(prompt))
    after_prefill()
    generated = []
    for _ in range(new_tokens):
        nxt = np.asarray(logits).argmax(-1).astype(np.int64)[:, None]
        generated.append(nxt)
        if eos is not None and (nxt == eos).all():
            break
        logits, state = backend.decode_step(nxt, state)
    return np.concatenate(generated, axis=1)


def decoder_latency(backend, prompt: np.ndarray, new_tokens: int, warmup: int, repeats: int,
                    progress=None) -> dict:
    """Prefill and greedy decode timings of `prompt` [B, P] (int64)."""

    def once() -> tuple[float, float, np.ndarray]:
        marks = [time.perf_counter()]
        generated = greedy(backend, prompt, new_tokens,
                           after_prefill=lambda: (backend.sync(), marks.append(time.perf_counter())))
        backend.sync()
        end = time.perf_counter()
        return marks[1] - marks[0], end - marks[1], generated

    for _ in range(warmup):
        once()
    prefill, decode = [], []
    for _ in range(repeats):
        p, d, generated = once()
        prefill.append(p)
        decode.append(d)
        if progress is not None:
            progress.update(1)
    lat = {
        "prefill": summarize(prefill), "decode": summarize(decode),
        "batch": prompt.shape[0], "prompt_tokens": int(prompt.shape[1]), "new_tokens": new_tokens,
        # greedy continuation of the first prompt: lets a reader check two backends decode the same tokens
        "generated_ids": generated[0].tolist(),
    }
    return {**lat, **_rates(lat)}


def encoder_latency(backend, task: str, ids: np.ndarray, mask: np.ndarray, throughput_batch: int, warmup: int,
                    repeats: int, progress=None) -> dict:
    """Batch-1 latency and batch throughput of an encoder on fixed-length inputs `ids` [>=1, L]."""
    call = backend.embed if task == "feature-extraction" else backend.logits
    reps = int(np.ceil(throughput_batch / ids.shape[0]))
    big_ids, big_mask = np.tile(ids, (reps, 1))[:throughput_batch], np.tile(mask, (reps, 1))[:throughput_batch]
    one = summarize(time_runs(lambda: call(ids[:1], mask[:1]), warmup, repeats, backend.sync, progress))
    many = summarize(time_runs(lambda: call(big_ids, big_mask), warmup, repeats, backend.sync, progress))
    lat = {"batch1": one, "throughput": many, "seq_tokens": int(ids.shape[1]), "throughput_batch": throughput_batch}
    return {**lat, **_rates(lat)}
