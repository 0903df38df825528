"""distill: train a student on a teacher's soft targets (plus hidden-state and attention matching).

Who is the student (`student:`)
- omitted / null: the pass's input model itself, trained in place. This is what a `distill` after `prune`
  (or prune's `recover:` block) wants, and with `alpha: 0` it is plain fine-tuning on hard labels.
- `{keep_layers: every_other | N | [i, ...]}`: a copy of the input model keeping those blocks, their weights
  copied (DistilBERT-style); the usual first pass of a pipeline.
- `{config: {num_hidden_layers: 4, hidden_size: 256, ...}}`: the input's architecture with these config
  values changed and fresh weights.
- `{source: <model source or checkpoint>}`: any model sharing the teacher's tokenizer.

Who teaches (`teacher:`)
- `source` (default): the pipeline's source model (ctx.teacher());
- `input`: the pass's input model (e.g. a classifier fine-tuned by an earlier `distill` with alpha 0);
- a model source or checkpoint path; or a list `[{model: ..., weight: ...}, ...]` whose soft targets are
  averaged with those weights (all must share the student's tokenizer).
No teacher is loaded when nothing uses it (alpha 0, no hidden / attention terms, not feature-extraction).

Data: causal LMs train on windows of `data.train` and select the best weights on its `validation` split
(the eval data's test split stays reserved for benchmarks); classifiers and embedding models train on the
texts (and labels) of `data.train` and evaluate on its validation split."""
from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from ..checkpoint import Artifact
from ..data import DataSpec, load_dataset, lm_windows
from ..errors import ConfigError, DataSourceError, UnsupportedModelError
from ..models import count_parameters, load_model, source_fingerprint
from ..runtime import seed_everything
from . import register
from .base import Pass, PassConfig, PassContext


class DistillStudentConfig(PassConfig):
    keep_layers: Literal["every_other"] | int | list[int] | None = Field(
        None, description="build the student from the input model keeping these blocks: every_other, a count "
        "(evenly spaced, first and last kept) or a list of layer indices; their weights are copied")
    config: dict[str, Any] | None = Field(
        None, description="fresh student: the input's config with these values changed (num_hidden_layers, "
        "hidden_size, num_attention_heads, intermediate_size, ...), new random weights")
    source: str | None = Field(None, description="a model source or checkpoint path to use as the student")

    @model_validator(mode="after")
    def _one_kind(self):
        given = [k for k in ("keep_layers", "config", "source") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of keep_layers, config or source (or omit `student` to train "
                             f"the input model in place); got {given or 'none'}")
        return self


class DistillTeacherConfig(PassConfig):
    model: str = Field(description="source (the pipeline's source model), input (this pass's input model), "
                       "or a model source / checkpoint path")
    weight: float = Field(1.0, gt=0, description="weight of this teacher's soft targets in the average")


class DistillSequenceLevelConfig(PassConfig):
    prompts: int = Field(64, gt=0, description="how many prompts (taken from the training windows)")
    prompt_tokens: int = Field(32, gt=0, description="tokens of each prompt")
    new_tokens: int = Field(96, gt=0, description="tokens the teacher generates per prompt")
    sample: bool = Field(False, description="sample (top-p 0.95, temperature 1) instead of greedy decoding")


class DistillConfig(PassConfig):
    student: DistillStudentConfig | None = Field(
        None, description="omitted: train the input model in place; else keep_layers / config / source")
    teacher: str | list[DistillTeacherConfig] = Field(
        "source", description="source (pipeline source model), input (this pass's input), a model source or "
        "checkpoint path, or a list of {model, weight} for multi-teacher distillation")
    temperature: float = Field(2.0, gt=0, description="softmax temperature T of the soft targets")
    temperature_schedule: Literal["constant", "linear"] = Field(
        "constant", description="constant T, or linear from `temperature` (early) to `temperature_end` (late)")
    temperature_end: float | None = Field(None, gt=0, description="final T of the linear schedule")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the soft (KD) term; 1 - alpha weights the "
                         "hard-label cross-entropy. 0 = hard labels only (no teacher needed)")
    kd_loss: Literal["kl", "reverse-kl", "jsd"] = Field("kl", description="divergence of the soft term")
    embedding_loss: Literal["mse", "cosine"] = Field(
        "cosine", description="feature-extraction models: loss between student and teacher sentence embeddings")
    hidden_weight: float = Field(0.0, ge=0, description="weight of hidden-state matching (0 = off)")
    hidden_loss: Literal["mse", "cosine"] = Field(
        "cosine", description="loss of hidden-state matching: cosine (scale-free, the default: residual streams "
        "of decoder LMs carry a few huge activations that dominate an MSE) or mse")
    attention_weight: float = Field(0.0, ge=0, description="weight of attention-map matching (KL; eager "
                                    "attention is switched on for it). 0 = off")
    layer_map: dict[int, int] | None = Field(
        None, description="student layer -> teacher layer for hidden/attention matching; default "
        "round((i + 1) * L_teacher / L_student) - 1")
    teacher_cache: bool = Field(False, description="offline distillation: run the teacher once, keep its "
                                "top-k logits on disk and read them in every later epoch and rerun")
    cache_top_k: int = Field(64, gt=0, description="logits kept per position in the teacher cache")
    sequence_level: DistillSequenceLevelConfig | None = Field(
        None, description="train on text the teacher generates from prompts in the data (causal LMs)")
    lr: float = Field(1e-4, gt=0, description="peak AdamW learning rate")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not on biases / norms)")
    batch_size: int = Field(8, gt=0, description="global examples per optimizer step (all processes and "
                            "accumulation steps together)")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps (the schedule's length)")
    epochs: float | None = Field(None, gt=0, description="passes over the training data (if max_steps unset)")
    max_tokens: int | None = Field(None, gt=0, description="stop after this many training tokens")
    max_time: float | None = Field(None, gt=0, description="stop after this many seconds of training")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="fraction of steps of linear warm-up")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay ends at this fraction of lr")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping norm (null = off)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 autocast where the hardware supports it (auto), or always fp32 / bf16")
    seq_len: int | None = Field(None, gt=1, description="causal LM window length (default data.train.seq_len)")
    max_length: int | None = Field(None, gt=1, description="classifier / embedding truncation length "
                                   "(default data.train.max_length)")
    eval_every: int | None = Field(None, gt=0, description="evaluate on held-out data every N steps "
                                   "(always once at the end)")
    eval_tokens: int = Field(8192, gt=0, description="causal LM: validation tokens per evaluation")
    eval_examples: int = Field(200, gt=0, description="classifiers / embeddings: validation examples")
    keep_best: bool = Field(True, description="return the weights of the best evaluation, not the last step")
    seed: int | None = Field(None, description="seed for student init, shuffling and dropout (default: "
                             "the pipeline's)")
    log_every: int = Field(10, gt=0, description="record the loss curve every N steps")

    @model_validator(mode="after")
    def _checks(self):
        if self.temperature_schedule == "linear" and self.temperature_end is None:
            raise ValueError("temperature_schedule linear needs temperature_end (e.g. 1.0)")
        if self.teacher_cache and (self.hidden_weight > 0 or self.attention_weight > 0):
            raise ValueError("teacher_cache keeps only the teacher's logits; hidden-state / attention matching "
                             "needs the teacher running. Set hidden_weight and attention_weight to 0, or "
                             "teacher_cache: false")
        if self.teacher_cache and isinstance(self.teacher, list) and len(self.teacher) > 1:
            raise ValueError("teacher_cache works with a single teacher; remove the extra teachers or set "
                             "teacher_cache: false")
        return self


def _same_tokenizer(a, b) -> bool:
    return a is b or (a is not None and b is not None and a.get_vocab() == b.get_vocab())


@register
class Distill(Pass):
    name = "distill"
    description = ("Knowledge distillation: a student (layer-dropped, configured, or the input itself) "
                   "learns the teacher's soft targets, hidden states and attention; cached teacher outputs")
    Config = DistillConfig

    # ------------------------------------------------------------------ student / teachers
    def _student(self, model: Artifact, ctx: PassContext) -> tuple[torch.nn.Module, Any, list, dict]:
        from ..distill import students

        spec = self.config.student
        if spec is None:
            return model.model, model.tokenizer, list(model.structure), {"student": "input (trained in place)"}
        if spec.keep_layers is not None:
            if model.structure:
                raise UnsupportedModelError(
                    "distill.student.keep_layers: the input model has non-stock structure "
                    f"({', '.join(e.get('type', '?') for e in model.structure)}); build layer-dropped "
                    "students before prune / lowrank, or omit `student` to train the input in place")
            total = students.num_layers(model.model)
            keep = students.resolve_keep(spec.keep_layers, total)
            return (students.keep_layers(model.model, keep), model.tokenizer, [],
                    {"student": "keep_layers", "kept_layers": keep, "teacher_layers": total})
        if spec.config is not None:
            return (students.fresh_student(model.model, spec.config, model.task), model.tokenizer, [],
                    {"student": "fresh", "student_config": spec.config})
        from ..models import resolve_source

        kind, location = resolve_source(spec.source)
        if kind == "checkpoint":
            from ..checkpoint import load

            art = load(location)
            if art.task != model.task:
                raise ConfigError(f"distill.student.source: {spec.source} is a {art.task} checkpoint, the "
                                  f"pipeline's task is {model.task}")
            return art.model, art.tokenizer, list(art.structure), {"student": spec.source}
        m, tok = load_model(spec.source, model.task, label_names=ctx.label_names())
        return m, tok, [], {"student": spec.source}

    def _needs_teacher(self, task: str) -> bool:
        c = self.config
        return (c.alpha > 0 or c.hidden_weight > 0 or c.attention_weight > 0 or task == "feature-extraction"
                or c.sequence_level is not None)

    def _teachers(self, model: Artifact, ctx: PassContext, in_place: bool):
        from ..distill.objective import Teacher
        from ..distill.teacher_cache import model_digest

        entries = self.config.teacher
        if isinstance(entries, str):
            entries = [{"model": entries, "weight": 1.0}]
        else:
            entries = [e.model_dump() for e in entries]
        teachers = []
        for e in entries:
            name = e["model"]
            if name == "source":
                art = ctx.teacher()
                t_model, t_tok, fp = art.model, art.tokenizer, source_fingerprint(ctx.source)
            elif name == "input":
                # trained in place -> the teacher is a frozen copy taken before training
                t_model = copy.deepcopy(model.model) if in_place else model.model
                t_tok = model.tokenizer
                key = (model.manifest or {}).get("key")
                fp = f"checkpoint:{key}" if key else f"weights:{model_digest(model.model)}"
            else:
                t_model, t_tok = load_model(name, model.task, label_names=ctx.label_names())
                fp = source_fingerprint(name)
            t_model.eval().requires_grad_(False).to(ctx.device)
            teachers.append(Teacher(t_model, t_tok, float(e["weight"]), name, fp))
        return teachers

    def _check_compatible(self, student, s_tok, teachers, task: str) -> None:
        for t in teachers:
            if not _same_tokenizer(s_tok, t.tokenizer):
                sv, tv = s_tok.get_vocab(), t.tokenizer.get_vocab()
                diff = sorted(set(sv.items()) ^ set(tv.items()))[:3]
                raise ConfigError(
                    f"distill.teacher: teacher {t.name!r} and the student use different tokenizers "
                    f"({len(tv)} vs {len(sv)} tokens; differing entries e.g. {diff}). Teacher and student read "
                    "the same token ids and their distributions are compared token by token, so they must "
                    "share a tokenizer: pick a teacher of the student's model family")
            if task != "feature-extraction":
                s_out = student.config.vocab_size if task == "causal-lm" else student.config.num_labels
                t_out = t.model.config.vocab_size if task == "causal-lm" else t.model.config.num_labels
                if s_out != t_out:
                    what = "vocabulary sizes" if task == "causal-lm" else "numbers of labels"
                    raise ConfigError(f"distill.teacher: teacher {t.name!r} and the student have different "
                                      f"{what} ({t_out} vs {s_out}); their outputs cannot be compared")

    # ------------------------------------------------------------------ data
    def _examples(self, ctx: PassContext, tok, task: str, split: str = "train", limit: int | None = None):
        from ..distill.examples import lm_examples, text_examples

        if ctx.data is None:
            raise DataSourceError("distill needs `data.train` in the pipeline config")
        spec = ctx.data.spec("train")
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        if split == "train":
            ds = ctx.data.dataset("train")
        else:  # the training source's validation split, never the eval data's test split
            ds = load_dataset(DataSpec(**{**spec.model_dump(), "split": "validation", "max_tokens": None,
                                          "max_examples": limit if task != "causal-lm" else None}), "train")
        if task == "causal-lm":
            seq_len = self.config.seq_len or spec.seq_len
            max_tokens = spec.max_tokens if split == "train" else limit
            return lm_examples(lm_windows(tok, ds, seq_len, max_tokens), pad)
        if task == "sequence-classification" and ds.labels is None:
            raise DataSourceError(f"distill: {spec.source} has no labels; a classifier needs labelled data "
                                  "(a builtin labelled corpus or a .jsonl with label_field)")
        labels = ds.labels if task == "sequence-classification" else None
        return text_examples(tok, ds.texts, labels, self.config.max_length or spec.max_length)

    def _sequence_level(self, examples, teachers, tok, ctx):
        """Replace the training windows by prompt + teacher continuation (sequence-level distillation)."""
        from ..distill.examples import lm_examples

        sl = self.config.sequence_level
        prompts = examples.rows[: sl.prompts, : sl.prompt_tokens].to(ctx.device)
        t = teachers[0].model
        gen_args = dict(max_new_tokens=sl.new_tokens, min_new_tokens=sl.new_tokens, do_sample=sl.sample,
                        pad_token_id=examples.pad_id)
        if sl.sample:
            gen_args.update(top_p=0.95, temperature=1.0, top_k=0)
        rows = []
        with torch.no_grad():
            for start in ctx.progress(range(0, len(prompts), 8), desc="teacher generates"):
                p = prompts[start: start + 8]
                rows.append(t.generate(p, attention_mask=torch.ones_like(p), **gen_args).cpu())
        return lm_examples(torch.cat(rows), examples.pad_id), len(prompts)

    # ------------------------------------------------------------------ run
    def run(self, model: Artifact, ctx: PassContext) -> Artifact:
        from ..distill import students
        from ..distill.objective import DistillModule, Objective
        from ..distill.trainer import TrainSettings, distributed_accelerator, plan_steps, train

        c = self.config
        task = model.task
        if model.kind != "torch" or model.model is None:
            raise UnsupportedModelError("distill trains torch models; put it before `export`")
        seed = ctx.seed if c.seed is None else c.seed
        seed_everything(seed)
        acc = distributed_accelerator(ctx.device)
        device = acc.device if acc else ctx.device
        student, s_tok, structure, info = self._student(model, ctx)
        teachers = self._teachers(model, ctx, in_place=c.student is None) if self._needs_teacher(task) else []
        self._check_compatible(student, s_tok, teachers, task)
        if len(teachers) > 1 and (c.hidden_weight > 0 or c.attention_weight > 0):
            info["feature_teacher"] = teachers[0].name  # feature / attention terms use the first teacher
        attn_impls = []
        if c.attention_weight > 0:  # attention maps need eager attention (SDPA does not return them)
            for m in [student] + [t.model for t in teachers[:1]]:
                attn_impls.append((m, m.config._attn_implementation))
                m.set_attn_implementation("eager")
        student.requires_grad_(True).to(device)  # a copy of a frozen teacher would inherit requires_grad=False

        examples = self._examples(ctx, s_tok, task)
        if c.sequence_level is not None:
            if task != "causal-lm" or not teachers:
                raise ConfigError("distill.sequence_level: only for causal LMs (task causal-lm)")
            examples, n = self._sequence_level(examples, teachers, s_tok, ctx)
            info["sequence_level"] = {"prompts": n, "tokens_per_sequence": int(examples.rows.shape[1])}
        try:
            eval_examples = self._examples(ctx, s_tok, task, "validation",
                                           c.eval_tokens if task == "causal-lm" else c.eval_examples)
        except DataSourceError as exc:  # e.g. a small local corpus without validation documents
            eval_examples, info["eval_skipped"] = None, str(exc)

        s_layers = students.num_layers(student)
        layer_map: dict[int, int] = {}
        if c.hidden_weight > 0 or c.attention_weight > 0:
            from ..distill.losses import default_layer_map

            t_layers = students.num_layers(teachers[0].model)
            layer_map = dict(c.layer_map) if c.layer_map else default_layer_map(s_layers, t_layers)
            bad = [f"{i}->{j}" for i, j in layer_map.items() if not (0 <= i < s_layers and 0 <= j < t_layers)]
            if bad:
                raise ConfigError(f"distill.layer_map: {', '.join(bad)} out of range (student has {s_layers} "
                                  f"layers, teacher {t_layers})")
            info["layer_map"] = {str(i): j for i, j in layer_map.items()}
        t_width = int(teachers[0].model.config.hidden_size) if teachers else None
        torch.manual_seed(seed)  # projections start the same in every process
        module = DistillModule(student, task, layer_map, t_width, hidden=c.hidden_weight > 0,
                               attentions=c.attention_weight > 0).to(device)

        settings = TrainSettings(
            lr=c.lr, weight_decay=c.weight_decay, batch_size=c.batch_size, grad_accum=c.grad_accum,
            max_steps=c.max_steps, epochs=c.epochs, max_tokens=c.max_tokens, max_time=c.max_time,
            warmup_ratio=c.warmup_ratio, min_lr_ratio=c.min_lr_ratio, max_grad_norm=c.max_grad_norm,
            precision=c.precision, eval_every=c.eval_every, log_every=c.log_every, keep_best=c.keep_best,
            seed=seed)
        objective = Objective(
            task=task, teachers=teachers, alpha=c.alpha if task != "feature-extraction" else 0.0,
            temperature=c.temperature, temperature_end=c.temperature_end,
            temperature_schedule=c.temperature_schedule,
            total_steps=plan_steps(settings, len(examples), examples.tokens() / len(examples)),
            kd_loss=c.kd_loss, embedding_loss=c.embedding_loss, hidden_weight=c.hidden_weight,
            hidden_loss=c.hidden_loss, attention_weight=c.attention_weight, layer_map=layer_map)
        if c.teacher_cache and objective.alpha > 0:
            objective.cache, info["teacher_cache"] = self._cache(teachers, examples, task, device, acc, ctx)

        figures = train(module, objective, examples, settings, device=device, progress=ctx.progress,
                        evaluate=self._evaluator(task, eval_examples, teachers, device) if eval_examples else None,
                        student_of=lambda m: m.student, accelerator=acc)
        for m, impl in attn_impls:
            m.set_attn_implementation(impl)
        student.eval().cpu()  # every pass hands its model back on the CPU; the next one moves it where it runs
        info.update(figures)
        info.update({
            "task": task, "alpha": objective.alpha, "temperature": c.temperature, "kd_loss": c.kd_loss,
            "teachers": [{"model": t.name, "weight": t.weight, "fingerprint": t.fingerprint} for t in teachers],
            "student_layers": s_layers, "student_parameters": count_parameters(student),
            "train_examples": len(examples), "seed": seed,
        })
        return model.derive(model=student, tokenizer=s_tok, structure=structure, info=info)

    # ------------------------------------------------------------------ cache / eval
    def _cache(self, teachers, examples, task, device, acc, ctx):
        from ..distill.teacher_cache import TeacherCache, cache_key, compute_topk

        c = self.config
        if len(teachers) != 1:
            raise ConfigError("distill.teacher_cache: works with a single teacher; remove the extra teachers "
                              "or set teacher_cache: false")
        if c.hidden_weight > 0 or c.attention_weight > 0:
            raise ConfigError("distill.teacher_cache: hidden-state / attention matching needs the teacher "
                              "running; set hidden_weight and attention_weight to 0, or teacher_cache: false")
        t = teachers[0]
        # The weights' digest as well as the name: a context may hand over any model as its "source"
        # teacher (prune's recover block does), and a cache must never be read for another model.
        from ..distill.teacher_cache import model_digest

        fingerprint = f"{t.fingerprint}|{model_digest(t.model)}"
        cache = TeacherCache(cache_key(fingerprint, examples.digest(), c.cache_top_k))
        hit = cache.exists()
        main = acc is None or acc.is_main_process
        if not hit and main:
            from ..distill.trainer import autocast_dtype

            amp = autocast_dtype(c.precision, device)  # the teacher runs as it would on the fly

            def logits(batch):
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    return t.model(input_ids=batch["input_ids"].to(device),
                                   attention_mask=batch["attention_mask"].to(device)).logits.float().cpu()
            batches = ctx.progress(examples.batches(c.batch_size), total=math.ceil(len(examples) / c.batch_size),
                                   desc="teacher cache")
            values, indices = compute_topk(logits, batches, c.cache_top_k)
            cache.write(values, indices, {"teacher": t.fingerprint, "data": examples.digest(),
                                          "k": c.cache_top_k, "examples": len(examples),
                                          "tokens": examples.tokens(), "task": task})
        if acc:
            acc.wait_for_everyone()
        values, indices, meta = cache.load()
        return (values, indices), {"key": cache.key, "hit": hit, "bytes": cache.size_bytes(),
                                   "tokens": meta["tokens"], "k": meta["k"]}

    def _evaluator(self, task, examples, teachers, device):
        import torch.nn.functional as F

        from ..models import mean_pool

        def evaluate(module) -> dict:
            student = module.student
            if task == "causal-lm":
                nll, n = 0.0, 0
                for b in examples.batches(8):
                    ids = b["input_ids"].to(device)
                    logits = student(input_ids=ids).logits[:, :-1].float()
                    nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                           reduction="sum").item()
                    n += ids[:, 1:].numel()
                ce = nll / n
                return {"metric": ce, "eval_loss": round(ce, 5), "perplexity": round(math.exp(ce), 3),
                        "higher_is_better": False}
            if task == "sequence-classification":
                right = 0
                for b in examples.batches(16):
                    logits = student(input_ids=b["input_ids"].to(device),
                                     attention_mask=b["attention_mask"].to(device)).logits
                    right += int((logits.argmax(-1).cpu() == b["labels"]).sum())
                acc = right / len(examples)
                return {"metric": acc, "accuracy": round(acc, 5), "higher_is_better": True}
            sims = []
            for b in examples.batches(16):
                ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
                s = module(input_ids=ids, attention_mask=mask)["embedding"]
                t = mean_pool(teachers[0].model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
                sims.append(F.cosine_similarity(s.float(), t.float(), dim=-1).cpu())
            cos = float(torch.cat(sims).mean())
            return {"metric": cos, "cosine_to_teacher": round(cos, 5), "higher_is_better": True}

        return evaluate
