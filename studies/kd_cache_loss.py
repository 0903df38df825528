"""Does distillation from cached top-k teacher logits learn what on-the-fly distillation learns?

SmolLM2-135M teaches a 25-block student (keep_layers 25) for 2 epochs of 64 Wikipedia-train windows of 128
tokens (16 steps of 8), alpha 0.9, T = 2, fp32, the same seed, four ways: the teacher on the fly (full
distributions); the teacher cache (top 64) with the suite's soft term (the top 64 and one bucket for the rest
of the vocabulary, exact over those 65 outcomes); and, kept here as ablations, the cache with the two soft
terms the suite had before: both renormalized over the teacher's top 64 (2026-12-02), and the renormalized
teacher against the student's full softmax (before that). Reported: held-out (validation split) perplexity
after training and the last hard loss (one process: no timings are compared).

    flock /tmp/compress-heavy.lock python -m studies.kd_cache_loss --threads 2 [--variants cache_rest_bucket ...]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch.nn.functional as F

from compress.checkpoint import Artifact
from compress.data import DataSpec, PipelineData
from compress.distill import losses
from compress.models import load_model
from compress.passes import PassContext, get
from compress.runtime import set_threads

from studies.distill_common import machine, update_results

SOURCE = "builtin:smollm2-135m"


def renormalized_topk_loss(student_logits, top_values, top_indices, teacher_tail, temperature, kind="kl",
                           mask=None):
    """The soft term of 2026-12-02: both distributions renormalized over the teacher's top k (tail unused)."""
    student_logp = F.log_softmax(student_logits.float().gather(-1, top_indices.long()) / temperature, dim=-1)
    teacher_logp = F.log_softmax(top_values.float() / temperature, dim=-1)
    return temperature**2 * losses._masked_mean(losses.divergence(teacher_logp, student_logp, kind), mask)


def full_softmax_topk_loss(student_logits, top_values, top_indices, teacher_tail, temperature, kind="kl",
                           mask=None):
    """The first soft term: the truncated, renormalized teacher against the student's full softmax."""
    student_logp = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, top_indices.long())
    teacher_logp = F.log_softmax(top_values.float() / temperature, dim=-1)
    return temperature**2 * losses._masked_mean(losses.divergence(teacher_logp, student_logp, kind), mask)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+", help="run only these (the others keep their stored figures)")
    args = ap.parse_args()
    os.environ.setdefault("COMPRESS_PROGRESS", "0")
    threads = set_threads(args.threads)
    teacher, tok = load_model(SOURCE, "causal-lm")
    data = PipelineData(train=DataSpec(source="builtin:wikipedia", seq_len=128, max_tokens=64 * 128))
    opts = dict(student={"keep_layers": 25}, alpha=0.9, temperature=2.0, epochs=2, batch_size=8, lr=1e-4,
                precision="fp32", eval_tokens=4096, eval_every=100, keep_best=False, seed=0)
    rest_bucket = losses.topk_soft_loss
    with tempfile.TemporaryDirectory(prefix="kd-cache-loss-") as cache_dir:
        os.environ["COMPRESS_CACHE_DIR"] = cache_dir
        for name, cache, soft in [("on_the_fly", False, rest_bucket), ("cache_rest_bucket", True, rest_bucket),
                                  ("cache_renormalized", True, renormalized_topk_loss),
                                  ("cache_full_softmax_old", True, full_softmax_topk_loss)]:
            if args.variants and name not in args.variants:
                continue
            losses.topk_soft_loss = soft
            ctx = PassContext(source=SOURCE, task="causal-lm", data=data, show_progress=False, seed=0)
            ctx = ctx.with_teacher(Artifact("torch", "causal-lm", tok, teacher))
            t0 = time.perf_counter()
            out = get("distill")(**opts, teacher_cache=cache).run(Artifact("torch", "causal-lm", tok, teacher), ctx)
            record = {"validation_perplexity": out.info["eval_curve"][-1]["perplexity"],
                      "final_hard_loss": out.info["loss_curve"][-1]["hard"], "steps": out.info["steps"],
                      "seconds": round(time.perf_counter() - t0, 1), "machine": machine(threads)}
            print(name, record, flush=True)
            update_results("kd_cache_loss", name, record)
    losses.topk_soft_loss = rest_bucket


if __name__ == "__main__":
    main()
