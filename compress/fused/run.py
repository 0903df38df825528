"""Prefill + greedy decode of a fused decoder (compress.fused.build_llama) with plain numpy feeds, no torch.

Past and present share no buffer: each step's present holds the whole sequence (GroupQueryAttention
concatenates the new keys / values to the past), and is fed back as the next past."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def make_session(path: str | Path, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def empty_past(session, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past_key_values.* feeds, [batch, kv_heads, 0, head_dim] (the graph's static dims)."""
    return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
            for i in session.get_inputs() if i.name.startswith("past_key_values.")}


def forward(session, input_ids: np.ndarray, past: dict[str, np.ndarray]):
    """One step on unpadded input_ids [batch, seq]: (logits [batch, seq, vocab], the next past)."""
    batch, seq = input_ids.shape
    past_len = next(iter(past.values())).shape[2] if past else 0
    feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": np.ones((batch, past_len + seq), np.int64),
             **past}
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(names, feeds)))
    present = {n.replace("present.", "past_key_values.", 1): v for n, v in out.items() if n.startswith("present.")}
    return out["logits"], present


def greedy(session, input_ids: np.ndarray, max_new_tokens: int, eos_token_id: int | None = None) -> np.ndarray:
    """The new tokens [batch, <= max_new_tokens] of greedy decoding; stops when every row has emitted eos
    (rows that finished earlier keep emitting eos, like Hugging Face's padding with eos)."""
    input_ids = np.asarray(input_ids, np.int64)
    tokens = np.zeros((input_ids.shape[0], 0), np.int64)
    done = np.zeros(input_ids.shape[0], bool)
    logits, past = forward(session, input_ids, empty_past(session, input_ids.shape[0]))
    while tokens.shape[1] < max_new_tokens and not done.all():
        if tokens.shape[1]:
            logits, past = forward(session, tokens[:, -1:], past)
        token = logits[:, -1].argmax(-1)
        if eos_token_id is not None:
            token = np.where(done, eos_token_id, token)
            done |= token == eos_token_id
        tokens = np.concatenate([tokens, token[:, None]], axis=1)
    return tokens
