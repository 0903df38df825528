"""SmolLM2-135M -> 15-layer student distilled on Shakespeare, evaluated on held-out Wikipedia text.

Variants at the same number of steps and data: (a) layer-dropped student, no training; (b) hard labels only
(alpha 0); (c) KD with soft targets; (d) KD + hidden-state matching. Reports perplexity on the Wikipedia test
split, top-1 agreement with the teacher and training tokens/s.

    flock /tmp/compress-heavy.lock python -m studies.distill_smollm2 --variants a b c d
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from compress.checkpoint import Artifact
from compress.data import DataSpec, PipelineData, load_dataset, lm_windows
from compress.distill.students import keep_layers, resolve_keep
from compress.models import load_model
from compress.passes import PassContext, get
from compress.runtime import seed_everything, set_threads

from studies.distill_common import lm_logits, lm_quality, machine, update_results

SOURCE = "builtin:smollm2-135m"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=["a", "b", "c", "d"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--keep", type=int, default=15, help="keep this many evenly spaced layers")
    ap.add_argument("--keep-list", type=int, nargs="+", help="keep exactly these layers instead")
    ap.add_argument("--name", default="smollm2", help="results file: results/distill/<name>.json")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--alpha", type=float, default=0.8)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", default="bf16")
    args = ap.parse_args()
    os.environ.setdefault("COMPRESS_PROGRESS", "0")
    threads = set_threads(args.threads)
    teacher, tok = load_model(SOURCE, "causal-lm")
    train_spec = DataSpec(source="builtin:shakespeare", seq_len=args.seq_len,
                          max_tokens=args.steps * args.batch * args.seq_len + args.seq_len)
    data = PipelineData(train=train_spec)
    wiki = lm_windows(tok, load_dataset(DataSpec(source="builtin:wikipedia", split="test"), "eval"), 256,
                      args.eval_tokens)
    t0 = time.perf_counter()
    teacher_argmax = [lg[:, :-1].argmax(-1) for lg in lm_logits(teacher, wiki)]
    teacher_q = lm_quality(teacher, wiki, teacher_argmax)
    keep = args.keep_list or resolve_keep(args.keep, 30)
    common = dict(student={"keep_layers": keep}, max_steps=args.steps, batch_size=args.batch, lr=args.lr,
                  temperature=args.temperature, precision=args.precision, eval_tokens=1024, keep_best=False,
                  log_every=5, seed=0)
    options = {
        "b": dict(common, alpha=0.0),
        "c": dict(common, alpha=args.alpha),
        "d": dict(common, alpha=args.alpha, hidden_weight=1.0, hidden_loss="cosine"),
    }
    labels = {"a": "layer-dropped, no training", "b": "hard labels only (alpha 0)",
              "c": f"KD soft targets (alpha {args.alpha}, T {args.temperature})",
              "d": f"KD + hidden-state matching (cosine, weight 1)"}
    update_results(args.name, "teacher", {"label": "teacher SmolLM2-135M (30 layers)", **teacher_q,
                                          "seconds": round(time.perf_counter() - t0, 1)})
    for v in args.variants:
        seed_everything(0)
        t0 = time.perf_counter()
        if v == "a":
            student = keep_layers(teacher, keep)
            info = {"steps": 0}
        else:
            ctx = PassContext(source=SOURCE, task="causal-lm", data=data, show_progress=False, seed=0)
            ctx = ctx.with_teacher(Artifact("torch", "causal-lm", tok, teacher))  # share the loaded teacher
            art = get("distill")(**options[v]).run(Artifact("torch", "causal-lm", tok, teacher), ctx)
            student, info = art.model, art.info
        q = lm_quality(student, wiki, teacher_argmax)
        rec = {"label": labels[v], **q, "kept_layers": keep, "options": options.get(v), "steps": info["steps"],
               "train_tokens": info.get("tokens"), "train_tokens_per_s": info.get("tokens_per_s"),
               "train_seconds": info.get("seconds"), "precision": info.get("precision"),
               "loss_curve": info.get("loss_curve"), "eval_curve": info.get("eval_curve"),
               "student_parameters": sum(p.numel() for p in student.parameters()),
               "wall_seconds": round(time.perf_counter() - t0, 1), "machine": machine(threads)}
        update_results(args.name, v, rec)
        print(v, labels[v], q, "tok/s", info.get("tokens_per_s"), "load", os.getloadavg(), flush=True)
        del student


if __name__ == "__main__":
    main()
