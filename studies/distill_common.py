"""Shared helpers of the distillation studies: machine record, result files, quality on fixed windows.

Perplexity and top-1 agreement use the harness's metrics (benchmarks.metrics: token NLL, perplexity,
agreement) on fixed, non-overlapping windows: every target after a window's first token is scored, and
agreement is the fraction of those positions where the student's argmax equals the teacher's."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import metrics
from benchmarks.machine import machine_record

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "distill"


def machine(threads: int) -> dict:
    """The harness's machine record plus what changes per row: torch threads, load average, time."""
    return {**machine_record(), "threads": threads, "torch": torch.__version__,
            "loadavg_1m_5m_15m": [round(x, 2) for x in os.getloadavg()],
            "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def update_results(name: str, key: str, record: dict) -> Path:
    """Merge one record into results/distill/<name>.json (so variants can run in separate processes)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = record
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


@torch.no_grad()
def lm_logits(model, windows: torch.Tensor, batch: int = 4) -> list[torch.Tensor]:
    model.eval()
    return [model(input_ids=windows[i: i + batch]).logits.float() for i in range(0, len(windows), batch)]


@torch.no_grad()
def lm_quality(model, windows: torch.Tensor, teacher_argmax: list[torch.Tensor] | None = None) -> dict:
    """Perplexity of `model` on `windows` and top-1 agreement with the teacher's next-token argmax."""
    nll, top1, ref = [], [], []
    for j, logits in enumerate(lm_logits(model, windows)):
        ids = windows[j * 4: j * 4 + logits.shape[0]]
        pred = logits[:, :-1].reshape(-1, logits.shape[-1]).numpy()
        nll.append(metrics.token_nll(pred, ids[:, 1:].reshape(-1).numpy()))
        top1.append(pred.argmax(-1))
        if teacher_argmax is not None:
            ref.append(teacher_argmax[j].reshape(-1).numpy())
    nll = np.concatenate(nll)
    out = {"perplexity": round(metrics.perplexity(nll), 3), "eval_tokens": int(nll.size)}
    if teacher_argmax is not None:
        out["top1_agreement"] = round(metrics.agreement(np.concatenate(top1), np.concatenate(ref)), 4)
    return out
