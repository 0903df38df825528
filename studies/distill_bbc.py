"""MiniLM-L6 fine-tuned on BBC News as a classification teacher, then a 3-layer student distilled from it.

Every model is trained with the `distill` pass: the teacher is the pass with alpha 0 training the input
(MiniLM with a fresh 5-class head) in place; the students keep 3 of its 6 layers and are trained on labels
only (alpha 0) or with soft targets (teacher: input). Accuracy is measured on the BBC test split, which no
training or model selection sees (selection uses the validation split).

    flock /tmp/compress-heavy.lock python -m studies.distill_bbc
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from compress.checkpoint import Artifact
from compress.data import DataSpec, PipelineData, load_dataset, text_batches
from compress.models import load_model
from compress.passes import PassContext, get
from compress.runtime import set_threads

from studies.distill_common import machine, update_results

SOURCE = "builtin:minilm-l6"
TASK = "sequence-classification"


@torch.no_grad()
def accuracy(model, tok, ds, max_length: int) -> float:
    model.eval()
    right = 0
    for b in text_batches(tok, ds, 32, max_length):
        labels = b.pop("labels")
        right += int((model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1)
                      == labels).sum())
    return right / len(ds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--teacher-epochs", type=float, default=2)
    ap.add_argument("--student-epochs", type=float, default=3)
    ap.add_argument("--keep", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=0.7)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("COMPRESS_PROGRESS", "0")
    threads = set_threads(args.threads)
    data = PipelineData(train=DataSpec(source="builtin:bbc-news", max_length=args.max_length))
    names = data.dataset("train").label_names
    test = load_dataset(DataSpec(source="builtin:bbc-news", split="test"), "eval")
    steps_per_epoch = len(data.dataset("train")) // args.batch
    common = dict(batch_size=args.batch, precision="bf16", eval_every=steps_per_epoch, eval_examples=222,
                  log_every=5, seed=0)

    def ctx():
        return PassContext(source=SOURCE, task=TASK, data=data, show_progress=False, seed=0)

    def record(key, label, model, tok, info, t0):
        acc = accuracy(model, tok, test, args.max_length)
        rec = {"label": label, "test_accuracy": round(acc, 4), "test_examples": len(test),
               "layers": model.config.num_hidden_layers,
               "parameters": sum(p.numel() for p in model.parameters()), "steps": info.get("steps"),
               "train_tokens_per_s": info.get("tokens_per_s"), "train_seconds": info.get("seconds"),
               "best_step": info.get("best_step"), "eval_curve": info.get("eval_curve"),
               "loss_curve": info.get("loss_curve"), "wall_seconds": round(time.perf_counter() - t0, 1),
               "machine": machine(threads)}
        update_results("bbc", key, rec)
        print(key, label, acc, "load", os.getloadavg(), flush=True)
        return acc

    t0 = time.perf_counter()
    model, tok = load_model(SOURCE, TASK, label_names=names)
    teacher = get("distill")(alpha=0.0, epochs=args.teacher_epochs, lr=1e-4, **common).run(
        Artifact("torch", TASK, tok, model), ctx())
    record("teacher", f"MiniLM-L6 fine-tuned ({args.teacher_epochs:g} epochs, distill alpha 0)", teacher.model,
           tok, teacher.info, t0)
    student_opts = dict(student={"keep_layers": args.keep}, epochs=args.student_epochs, lr=2e-4, **common)
    for key, label, extra in [
        ("labels_only", f"{args.keep}-layer student, labels only (alpha 0)", dict(alpha=0.0)),
        ("kd", f"{args.keep}-layer student, KD (alpha {args.alpha}, T {args.temperature}, teacher: input)",
         dict(alpha=args.alpha, temperature=args.temperature, teacher="input")),
    ]:
        t0 = time.perf_counter()
        inp = teacher.derive(model=teacher.model)  # the fine-tuned teacher is this pass's input
        out = get("distill")(**student_opts, **extra).run(inp, ctx())
        record(key, label, out.model, tok, out.info, t0)


if __name__ == "__main__":
    main()
