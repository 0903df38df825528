"""The training loop: AdamW with warm-up and cosine decay, gradient accumulation and clipping, bf16
autocast, step / token / time budgets, periodic evaluation with the best weights kept, a progress bar,
status lines in the run's log (every tenth of the run and each evaluation, so that a run with `--no-progress`
can be followed with `tail -f runs/<name>/run.log`), and data parallelism under `accelerate launch` (DDP, or
FSDP as accelerate is configured).

Batches are defined globally: `batch_size` examples per optimizer step, split into `grad_accum`
micro-batches, each split evenly across processes. Gradients are averaged over processes, so with the same
global batch 2 processes give the same update as 1 (up to float rounding).

Under FSDP (accelerate's `distributed_type: FSDP`, version 1 or 2) a copy of the module is sharded and
trained; evaluation runs through the sharded wrapper, and the full weights are gathered in every process and
loaded into the plain module at the end, so the caller gets an ordinary model as with DDP."""
from __future__ import annotations

import copy
import logging
import math
import os
import time
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError, TrainingDivergedError
from ..logs import SUITE_LOGGER
from ..runtime import launched_processes
from .config import TrainConfig
from .examples import Examples


def distributed_accelerator(device: torch.device):
    """An `accelerate.Accelerator` when launched with several processes (accelerate launch / torchrun),
    else None: a single process trains without any wrapper."""
    if launched_processes() <= 1:
        return None
    from accelerate import Accelerator

    if device.type == "cpu" and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        # accelerate (1.x) shards only on accelerators: on CPU processes FSDP1's plugin fails ("no available
        # devices found") and FSDP2 silently runs as plain DDP, so say so instead
        raise ConfigError("distill: accelerate runs FSDP only on GPUs (or other accelerators), and this job "
                          "trains on the CPU; launch without --use_fsdp (data parallel: accelerate launch "
                          "--multi_gpu) or use `device: cuda`")
    return Accelerator(cpu=device.type == "cpu")


def sharded(acc) -> bool:
    """Whether `acc` shards the trained module with FSDP (then its forward passes and state dicts are
    collectives that go through the wrapper, in every process)."""
    return acc is not None and acc.distributed_type == "FSDP"


def _clean(name: str) -> str:
    """A parameter's name without the prefixes of FSDP1 / activation-checkpointing wrappers."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def prepare(module: nn.Module, s: TrainConfig, acc) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The module to train (wrapped by DDP / FSDP under a launch) and its AdamW, with weight decay on
    matrices only. Which parameters are matrices is decided by name before wrapping: FSDP's shards and flat
    parameters no longer have their shapes."""
    matrices = {n for n, p in module.named_parameters() if p.dim() >= 2}

    def adamw(named) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for n, p in named:
            if p.requires_grad:
                (decay if _clean(n) in matrices else no_decay).append(p)
        return torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=s.lr)

    if acc is None:
        return module, adamw(module.named_parameters())
    if acc.is_fsdp2:  # fully_shard works in place; accelerate swaps the optimizer's parameters for the shards
        opt = adamw(module.named_parameters())
        model, _ = acc.prepare(module, opt)
        return model, opt
    if sharded(acc) and not acc.state.fsdp_plugin.use_orig_params:
        raise ConfigError("distill: FSDP version 1 needs fsdp_use_orig_params: true in the accelerate config "
                          "(weight decay is per parameter), or use fsdp_version: 2")
    model = acc.prepare_model(module)  # DDP, FSDP1: the optimizer is made on the wrapped parameters
    return model, adamw(acc.unwrap_model(model).named_parameters())


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 where the hardware runs it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), else fp32."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:
        supported = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    if precision == "bf16" and not supported and device.type == "cuda":
        raise ConfigError("distill.precision: bf16 was asked for but this GPU does not support it; use fp32")
    return torch.bfloat16 if (supported or precision == "bf16") else None


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def plan_steps(s: TrainConfig, n_examples: int, tokens_per_example: float) -> tuple[int, str]:
    """Optimizer steps of the schedule, the fewest that max_steps, epochs and max_tokens allow (else one epoch),
    and the budget that sets them ("max_steps", "epochs", "max_tokens" or "one epoch")."""
    per_epoch = max(1, n_examples // s.batch_size)
    candidates = {}
    if s.max_steps:
        candidates["max_steps"] = s.max_steps
    if s.epochs:
        candidates["epochs"] = max(1, int(round(s.epochs * per_epoch)))
    if s.max_tokens:
        candidates["max_tokens"] = max(1, math.ceil(s.max_tokens / (s.batch_size * tokens_per_example)))
    if not candidates:
        return per_epoch, "one epoch"
    name = min(candidates, key=candidates.get)
    return candidates[name], name


def check_batching(s: TrainConfig, world: int, n_examples: int) -> int:
    """The per-process micro-batch size; refuses splits that would not divide evenly."""
    if s.batch_size % (s.grad_accum * world):
        raise ConfigError(
            f"distill.batch_size {s.batch_size} must be divisible by grad_accum ({s.grad_accum}) x processes "
            f"({world}); it is the global batch per optimizer step"
        )
    if n_examples < s.batch_size:
        raise ConfigError(f"distill: the training data has {n_examples} examples, fewer than batch_size "
                          f"{s.batch_size}; lower batch_size or give more data")
    return s.batch_size // (s.grad_accum * world)


def _diverged_message(s: TrainConfig, value: float, step: int, total: int) -> str:
    options = {k: getattr(s, k) for k in ("lr", "temperature", "alpha", "hidden_weight", "attention_weight")
               if hasattr(s, k)}
    named = ", ".join(f"{k}={v}" for k, v in options.items())
    return (f"distill: the training loss became {value} at step {step + 1} of {total}, so training stopped and "
            f"nothing was saved. Likely an option out of a workable range ({named}): lower lr, use a temperature "
            "near 1-4, or check the data")


def status_line(step: int, total: int, parts: dict, tokens: int, seconds: float) -> str:
    """One line of training progress for the run's log: the step, the loss terms, throughput, time left."""
    terms = ", ".join(f"{k} {v:.4f}" for k, v in parts.items() if k != "loss")
    left = seconds / step * (total - step)
    return (f"distill: step {step}/{total}, loss {parts.get('loss', float('nan')):.4f} ({terms}), "
            f"{tokens / max(seconds, 1e-9):.0f} tokens/s, "
            f"{seconds / 60:.1f} min so far, about {left / 60:.1f} min left")


def train(
    module: nn.Module,
    loss_fn: Callable[[nn.Module, dict, int], tuple[torch.Tensor, dict]],
    data: Examples,
    settings: TrainConfig,
    *,
    seed: int,
    device: torch.device,
    progress,
    evaluate: Callable[[nn.Module], dict] | None = None,
    student_of: Callable[[nn.Module], nn.Module] = lambda m: m,
    accelerator=None,
) -> dict:
    """Train `module` in place on `loss_fn(module, batch, step)`; return the figures for the manifest.

    `evaluate(module) -> {"metric": value, "higher_is_better": bool, ...}` runs every `eval_every` steps
    and at the end; with `keep_best` the best-evaluated weights are restored at the end."""
    s = settings
    acc = accelerator
    world = acc.num_processes if acc else 1
    rank = acc.process_index if acc else 0
    micro = check_batching(s, world, len(data))
    total, planned_by = plan_steps(s, len(data), data.tokens() / len(data))
    warmup = int(round(s.warmup_ratio * total))
    shard = sharded(acc)
    student_name = next(n for n, m in module.named_modules() if m is student_of(module))
    prefix = student_name + "." if student_name else ""
    plain = module
    if shard:  # FSDP converts what it trains: train a copy, the plain module waits on the CPU for the result
        module = copy.deepcopy(plain)
        plain.cpu()
    parallel = ("fsdp2" if acc.is_fsdp2 else "fsdp") if shard else "ddp" if acc else "none"
    model, opt = prepare(module, s, acc)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, total, s.min_lr_ratio))
    amp = autocast_dtype(s.precision, device)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    curve, evals = [], []
    best = {"metric": None, "step": None, "state": None}
    tokens = 0
    start = time.perf_counter()
    stopped = planned_by  # unless max_time or max_tokens ends the run early

    eval_seconds = 0.0
    log = logging.getLogger(SUITE_LOGGER) if rank == 0 else None
    status_every = max(1, total // 10)

    def student_state() -> dict:
        """A copy of the student's full weights (under FSDP gathered from the shards, in every process)."""
        if shard:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
            return {k[len(prefix):]: v.detach().cpu() for k, v in full.items() if k.startswith(prefix)}
        return {k: v.detach().clone() for k, v in student_of(module).state_dict().items()}

    def run_eval(step: int) -> None:
        nonlocal eval_seconds
        if evaluate is None:
            return
        t0 = time.perf_counter()
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            # a sharded module runs only through its FSDP wrapper
            result = evaluate(model if shard or not acc else acc.unwrap_model(model))
        model.train()
        if acc:  # rank 0's figures everywhere, so all processes agree on the best step (a gather may follow)
            from accelerate.utils import broadcast_object_list

            result = broadcast_object_list([result])[0]
        evals.append({"step": step, **{k: v for k, v in result.items() if k != "higher_is_better"}})
        m, hib = result["metric"], result.get("higher_is_better", False)
        improved = best["metric"] is None or (m > best["metric"] if hib else m < best["metric"])
        if improved:
            best.update(metric=m, step=step, state=student_state() if s.keep_best else None)
        eval_seconds += time.perf_counter() - t0
        if log:
            shown = ", ".join(f"{k} {v}" for k, v in result.items() if k not in ("metric", "higher_is_better"))
            log.info(f"distill: evaluation at step {step}: {shown}" + (" (best so far)" if improved else ""))

    bar = progress(total=total, desc="distill")
    model.train()
    step = 0
    for step in range(total):
        if s.max_time and time.perf_counter() - start > s.max_time:
            stopped = "max_time"
            break
        if s.max_tokens and tokens >= s.max_tokens:
            stopped = "max_tokens"
            break
        if len(order) < s.batch_size:  # a new epoch: a fresh seeded permutation
            order += torch.randperm(len(data), generator=gen).tolist()
        global_batch, order = order[: s.batch_size], order[s.batch_size:]
        opt.zero_grad(set_to_none=True)
        parts_sum: dict[str, float] = {}
        for a in range(s.grad_accum):
            chunk = global_batch[a * micro * world: (a + 1) * micro * world]
            batch = data.batch(chunk[rank * micro: (rank + 1) * micro])
            tokens += int(batch["attention_mask"].sum()) * world
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss, parts = loss_fn(model, batch, step)
            if not torch.isfinite(loss.detach()).all():
                value = float(loss.detach().float().mean())
                raise TrainingDivergedError(_diverged_message(s, value, step, total))
            loss = loss / s.grad_accum
            if acc:
                acc.backward(loss)
            else:
                loss.backward()
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + float(v) / s.grad_accum
        if s.max_grad_norm:
            if acc:  # accelerate computes the norm over all shards under FSDP
                acc.clip_grad_norm_(model.parameters(), s.max_grad_norm)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
        opt.step()
        sched.step()
        elapsed = time.perf_counter() - start - eval_seconds
        if step % s.log_every == 0 or step == total - 1:
            curve.append({"step": step + 1, "lr": sched.get_last_lr()[0], "tokens": tokens,
                          **{k: round(v, 5) for k, v in parts_sum.items()}})
        bar.update(1)
        bar.set_postfix(loss=f"{parts_sum.get('loss', 0):.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
        if log and ((step + 1) % status_every == 0 or step + 1 == total):
            log.info(status_line(step + 1, total, parts_sum, tokens, elapsed))
        if s.eval_every and (step + 1) % s.eval_every == 0 and step + 1 < total:
            run_eval(step + 1)
    else:
        step = total
    bar.close()
    steps_done = step  # total when the loop ran out (its else), else where max_time / max_tokens broke it
    train_seconds = time.perf_counter() - start - eval_seconds  # training only: evaluation excluded
    run_eval(steps_done)
    restored = bool(s.keep_best and best["state"] is not None and best["step"] != steps_done)
    if shard:  # the full weights back into the plain module, in every process
        student_of(plain).load_state_dict(best["state"] if restored else student_state())
    elif restored:
        student_of(module).load_state_dict(best["state"])
    return {
        "steps": steps_done,
        "planned_steps": total,
        "stopped_by": stopped,
        "tokens": tokens,
        "seconds": round(train_seconds, 2),
        "tokens_per_s": round(tokens / max(train_seconds, 1e-9), 1),
        "device": str(device),
        "precision": "bf16" if amp is not None else "fp32",
        "processes": world,
        "parallel": parallel,
        "micro_batch": micro,
        "loss_curve": curve,
        "eval_curve": evals,
        "best_step": best["step"],
        "best_metric": best["metric"],
        "restored_best": restored,
    }
