"""Where block-wise int8 loses quality on a fused decoder, and what smoothing gives back: quality only.

    flock /tmp/compress-heavy.lock .venv/bin/python -m studies.smooth_blocks [--out DIR]

Takes the fp32 fused graph of studies.fast_decoder (built or reused from its cache) and writes MatMulNBits
8-bit variants with ort.weight_only: blocks of 32 and 64, accuracy level 0 (fp32 compute: the weights' rounding
alone) and 4 (int8 activations per block, what the suite ships), and smoothed before quantizing
(compress/quant/smooth.py, folded into constants only, calibrated on Wikipedia's training split) at several
strengths. Each is scored against the fp32 graph's logits on held-out Shakespeare (16 windows of 256 tokens):
KL, perplexity, top-1 agreement. No timings (the graphs of one block size run the same ops).
Results: benchmarks/results/fast_decoder/vnni/smoothed/quality.json."""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx

from compress import onnx_tools
from compress.data import DataSpec, load_dataset
from compress.edge import EdgeModel
from compress.quant import ort
from compress.quant.smooth import smooth
from compress.runtime import set_threads

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "fast_decoder" / "vnni" / "smoothed"
# (alpha or None, block size, accuracy level)
VARIANTS = [(None, 32, 0), (None, 64, 0), (None, 32, 4), (None, 64, 4), (0.5, 32, 4), (0.7, 32, 4),
            (0.3, 64, 4), (0.5, 64, 4), (0.6, 64, 4), (0.7, 64, 4), (0.85, 64, 4)]


def windows(tokenizer, spec: DataSpec, role: str, count: int, length: int = 256) -> np.ndarray:
    texts = load_dataset(spec, role).texts
    ids = tokenizer.encode("\n\n".join(texts)).ids[: count * length]
    return np.array(ids, np.int64).reshape(count, length)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class Fp32Reference:
    """studies.fast_decoder's fused fp32 graph on 16 held-out Shakespeare windows of 256 tokens: `score` gives a
    variant's KL to it, perplexity and top-1 agreement."""

    def __init__(self, threads: int = 2):
        from studies.fast_decoder import row

        self.path, self.threads = Path(row("fused fp32")[0]), threads
        self.model = EdgeModel(self.path, threads=threads)
        self.ids = windows(self.model.tokenizer, DataSpec(source="builtin:shakespeare", split="test"), "eval", 16)
        self.ref = self._log_probs(self.model)

    def _log_probs(self, model: EdgeModel) -> np.ndarray:
        return log_softmax(np.concatenate([model.logits(self.ids[i:i + 1]) for i in range(len(self.ids))]))

    def score(self, model: EdgeModel | Path) -> dict:
        model = model if isinstance(model, EdgeModel) else EdgeModel(model, threads=self.threads)
        ref, lq = self.ref, self._log_probs(model)
        nll = -np.take_along_axis(lq[:, :-1], self.ids[:, 1:, None], -1).mean()
        return {"kl": round(float((np.exp(ref) * (ref - lq)).sum(-1).mean()), 5),
                "perplexity": round(float(np.exp(nll)), 3),
                "top1_agreement": round(float((lq.argmax(-1) == ref.argmax(-1)).mean()), 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    set_threads(2)
    reference = Fp32Reference()
    src, score = reference.path, reference.score
    calib = windows(reference.model.tokenizer, DataSpec(source="builtin:wikipedia", split="train"), "train", 32)
    feeds = ort.calibration_feeds(src, calib, np.ones_like(calib), 4)

    rows = [{"variant": "fp32", **score(reference.model)}]
    print(rows[0], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        smoothed: dict[float, Path] = {}
        for alpha, block, level in VARIANTS:
            parent = src
            if alpha is not None:
                if alpha not in smoothed:
                    model = onnx.load(str(src / onnx_tools.ONNX_FILE))
                    smooth(model, feeds, alpha)
                    smoothed[alpha] = Path(tmp) / f"smoothed-{alpha}"
                    onnx_tools.save_model(model, smoothed[alpha], "always")
                    onnx_tools.copy_bundle(src, smoothed[alpha])
                parent = smoothed[alpha]
            dst = Path(tmp) / "q"
            shutil.rmtree(dst, ignore_errors=True)
            ort.weight_only(parent, dst, bits=8, block_size=block, accuracy_level=level, symmetric=True,
                            exclude=[], embeddings=True)
            rows.append({"alpha": alpha, "block_size": block, "accuracy_level": level, **score(dst)})
            print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
