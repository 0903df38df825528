"""Cached teacher outputs versus the on-the-fly teacher, side by side in one process.

SmolLM2-135M teaching a student for 2 epochs of the same Shakespeare windows: (1) on-the-fly teacher,
(2) teacher cache built in this run (cold: the teacher runs once, both epochs read the cache), (3) a rerun
with the cache already on disk (warm). Reports tokens/s of the whole pass (cache build included) and the
cache's disk size per million tokens, for each student: the issue's 15-of-30-layer student, a 6-layer one,
and a narrow fresh one (6 layers of width 256). With student step S and teacher forward T, the cold speed-up
is bounded by 2(S + T) / (2S + T) and the warm one by (S + T) / S, so the smaller the student, the more the
cache buys.

    flock /tmp/compress-heavy.lock python -m studies.distill_cache --threads 2
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

from compress.checkpoint import Artifact
from compress.data import DataSpec, PipelineData
from compress.models import load_model
from compress.passes import PassContext, get
from compress.runtime import set_threads

from studies.distill_common import machine, update_results

SOURCE = "builtin:smollm2-135m"
STUDENTS = {
    "keep15": {"keep_layers": 15},
    "keep6": {"keep_layers": [0, 1, 2, 3, 28, 29]},
    "narrow6": {"config": {"num_hidden_layers": 6, "hidden_size": 256, "intermediate_size": 768,
                           "num_attention_heads": 4, "num_key_value_heads": 2}},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    args = ap.parse_args()
    os.environ.setdefault("COMPRESS_PROGRESS", "0")
    threads = set_threads(args.threads)
    teacher, tok = load_model(SOURCE, "causal-lm")
    data = PipelineData(train=DataSpec(source="builtin:shakespeare", seq_len=args.seq_len,
                                       max_tokens=args.windows * args.seq_len))
    for name in args.students:
        update_results("cache", name, measure(STUDENTS[name], teacher, tok, data, args, threads))


def measure(student: dict, teacher, tok, data, args, threads: int) -> dict:
    opts = dict(student=student, alpha=0.8, temperature=2.0, epochs=2, batch_size=args.batch,
                lr=2e-4, precision="bf16", eval_tokens=256, keep_best=False, seed=0)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="distill-cache-bench-") as cold:  # a cold teacher cache per student
        os.environ["COMPRESS_CACHE_DIR"] = cold
        for key, cache in [("on_the_fly", False), ("cache_cold", True), ("cache_warm", True)]:
            ctx = PassContext(source=SOURCE, task="causal-lm", data=data, show_progress=False, seed=0)
            ctx = ctx.with_teacher(Artifact("torch", "causal-lm", tok, teacher))
            t0 = time.perf_counter()
            # cache_top_k applies to the cache only
            cached = {"teacher_cache": True, "cache_top_k": args.k} if cache else {}
            out = get("distill")(**opts, **cached).run(Artifact("torch", "causal-lm", tok, teacher), ctx)
            wall = time.perf_counter() - t0
            info = out.info
            rows[key] = {"pass_seconds": round(wall, 1), "train_seconds": info["seconds"], "tokens": info["tokens"],
                         "pass_tokens_per_s": round(info["tokens"] / wall, 1), "steps": info["steps"],
                         "train_tokens_per_s": info["tokens_per_s"], "teacher_cache": info.get("teacher_cache"),
                         "final_hard_loss": info["loss_curve"][-1].get("hard"), "machine": machine(threads)}
            print(student, key, rows[key], flush=True)
            del out
    c = rows["cache_cold"]["teacher_cache"]
    rows["summary"] = {
        "student": student,
        "speedup_cold_vs_on_the_fly": round(rows["on_the_fly"]["pass_seconds"] / rows["cache_cold"]["pass_seconds"], 2),
        "speedup_warm_vs_on_the_fly": round(rows["on_the_fly"]["pass_seconds"] / rows["cache_warm"]["pass_seconds"], 2),
        "cache_bytes": c["bytes"], "cache_tokens": c["tokens"], "k": c["k"],
        "cache_mb_per_million_tokens": round(c["bytes"] / c["tokens"] * 1e6 / 2**20, 1),
    }
    print(rows["summary"], flush=True)
    return rows


if __name__ == "__main__":
    main()
