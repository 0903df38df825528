"""Shared helpers of the distillation benchmarks: machine record, result files, quality metrics.

The harness (benchmarks.harness) was not available when these scripts were written, so perplexity and
top-1 agreement are computed here directly: next-token cross-entropy over fixed, non-overlapping windows,
and the fraction of positions where the student's argmax equals the teacher's argmax."""
from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results" / "distill"


def machine(threads: int) -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": threads,
            "torch": torch.__version__, "loadavg_1m_5m_15m": [round(x, 2) for x in os.getloadavg()],
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
    nll, n, agree = 0.0, 0, 0
    for j, logits in enumerate(lm_logits(model, windows)):
        ids = windows[j * 4: j * 4 + logits.shape[0]]
        pred = logits[:, :-1]
        nll += F.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        n += ids[:, 1:].numel()
        if teacher_argmax is not None:
            agree += int((pred.argmax(-1) == teacher_argmax[j]).sum())
    out = {"perplexity": round(math.exp(nll / n), 3), "eval_tokens": n}
    if teacher_argmax is not None:
        out["top1_agreement"] = round(agree / n, 4)
    return out
