"""Are a model's weights already on the minmax 4-bit grid (llama.cpp's Q4_1: blocks of 32 along the input
dimension, 16 levels spanning the block's own [min, max])?

For every 2-D weight of the model: the largest distance of a weight from its block's grid, in steps of that
grid (0 = on it; 0.5 = as far as rounding can put it), and the largest change the quantize pass's stored
form makes (codes + fp16 offset, compress/quant/fake.py `minmax_grid`), relative to the block's step.
Weights only, in seconds; no timings.

    python -m studies.minmax_grid [--model builtin:smollm2-135m]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from compress.models import load_model
from compress.quant import fake

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "quantize" / "minmax_grid.json"


def grid_distance(w: torch.Tensor, block: int = 32) -> tuple[float, float]:
    """(largest distance from the block's grid, largest change of the stored form), both in grid steps."""
    x = w.detach().float().reshape(w.shape[0], -1, block)
    lo, step = x.amin(-1, keepdim=True), (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / 15
    levels = (x - lo) / step.clamp_min(1e-30)
    off_grid = float((levels - levels.round()).abs().max())
    stored = fake.dequantize_minmax(*fake.minmax_grid(w, block)).reshape(x.shape)
    return off_grid, float(((stored - x).abs() / step.clamp_min(1e-30)).max())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:smollm2-135m")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, _ = load_model(args.model, "causal-lm")
    rows = {name: grid_distance(p) for name, p in model.named_parameters()
            if p.dim() == 2 and p.shape[1] % 32 == 0}
    on_grid = sorted(n for n, (d, _) in rows.items() if d < 1e-3)
    off_grid = sorted(n for n, (d, _) in rows.items() if d >= 1e-3)
    summary = {"model": args.model, "weights": len(rows), "on_grid": len(on_grid), "off_grid": off_grid,
               "largest_distance_on_grid_steps": max((rows[n][0] for n in on_grid), default=None),
               "largest_stored_change_steps": max((rows[n][1] for n in on_grid), default=None)}
    print(json.dumps(summary, indent=2))
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
