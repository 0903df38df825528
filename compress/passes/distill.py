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

Quantization-aware (`quantize_aware: {bits: 4, block_size: 32, symmetric: true}`): the student's weights are
seen fake-quantized in every forward (training and evaluation) on the grid the export + MatMulNBits quantize
pass will store (compress/quant/fake.py), with straight-through gradients; at the end they are projected onto
that grid, so the checkpoint stays plain float weights that the quantize pass reproduces without another
rounding. `info.quantize_aware` records the grid (fake.grid_mismatch compares it with a quantize pass's).

Data: causal LMs train on windows of `data.train` and select the best weights on its `validation` split
(the eval data's test split stays reserved for benchmarks); classifiers and embedding models train on the
texts (and labels) of `data.train` and evaluate on its validation split."""
from __future__ import annotations

import torch

from ..checkpoint import Artifact
from ..distill import students
from ..distill.config import DistillConfig
from ..errors import ConfigError, DataSourceError
from ..models import check_length, count_parameters
from ..runtime import seed_everything
from . import register
from .base import Pass, PassContext


@register
class Distill(Pass):
    name = "distill"
    # 2: cached top-k soft targets renormalized; 3: and one bucket for the rest (losses.topk_soft_loss);
    # 4: quantize_aware's int8 embedding table on the quantize pass's new grid (blocks of 32, fp16 scales)
    # 5: per-layer config lists (SmolLM3's no_rope_layers) follow the kept layers; 6: layer cuts the config
    # cannot rebuild refused (ModernBERT's stored ones reloaded with other outputs), GPT-Neo's kinds follow
    version = 6
    description = ("Knowledge distillation: a student (layer-dropped, configured, or the input itself) "
                   "learns the teacher's soft targets, hidden states and attention; cached teacher outputs")
    Config = DistillConfig

    def needs_data(self) -> tuple[tuple[str, ...], str]:
        return ("train",), "distill trains on data.train"

    def check_task(self, task: str) -> str | None:
        c = self.config
        if c.quantize_aware is not None and task != "causal-lm":
            return (f"distill.quantize_aware: for causal LMs (the grid of the decoder export's MatMulNBits "
                    f"quantization); this model's task is {task}")
        if c.sequence_level is not None and task != "causal-lm":
            return f"distill.sequence_level: only for causal LMs (task causal-lm); this model's task is {task}"
        return None

    def apply(self, model: Artifact, ctx: PassContext) -> Artifact:
        from ..distill.evaluate import evaluator
        from ..distill.examples import teacher_generated, training_examples
        from ..distill.objective import DistillModule, Objective, hidden_width
        from ..distill.teachers import check_compatible, load_teachers
        from ..distill.trainer import autocast_dtype, distributed_accelerator, plan_steps, sharded, train

        c = self.config
        task = model.task
        seed = ctx.seed if c.seed is None else c.seed
        seed_everything(seed)
        acc = distributed_accelerator(ctx.device)
        if c.quantize_aware is not None and sharded(acc) and not acc.is_fsdp2:
            # FSDP1 flattens parameters, which the fake-quantizing parametrizations sit on (FSDP2 keeps them)
            raise ConfigError("distill.quantize_aware: not supported under FSDP version 1; use fsdp_version: 2, "
                              "data parallelism (accelerate launch --multi_gpu) or one process")
        device = acc.device if acc else ctx.device
        student, s_tok, structure, info = students.build_student(c.student, model, ctx)
        teachers = load_teachers(c, model, ctx, in_place=c.student is None) if c.needs_teacher(task) else []
        check_compatible(student, s_tok, teachers, task)
        self._check_lengths(ctx, task, [("student", student)] + [("teacher", t.model) for t in teachers])
        if len(teachers) > 1 and c.matches_features():
            info["feature_teacher"] = teachers[0].name  # feature / attention terms use the first teacher
        attn_impls = []
        if c.attention_weight > 0:  # attention maps need eager attention (SDPA does not return them)
            for m in [student] + [t.model for t in teachers[:1]]:
                attn_impls.append((m, m.config._attn_implementation))
                m.set_attn_implementation("eager")
        student.requires_grad_(True).to(device)  # a copy of a frozen teacher would inherit requires_grad=False

        examples = training_examples(c, ctx, s_tok, task)
        if c.sequence_level is not None:  # a causal LM (check_task) with its teacher loaded (needs_teacher)
            examples, notes = teacher_generated(examples, teachers[0].model, student, c.sequence_level, ctx.device,
                                                ctx.progress)
            info["sequence_level"] = {"prompts": len(examples), "tokens_per_sequence": int(examples.rows.shape[1])}
            if notes:
                info["sequence_level"]["notes"] = notes
        try:
            eval_examples = training_examples(c, ctx, s_tok, task, "validation",
                                              c.eval_tokens if task == "causal-lm" else c.eval_examples)
        except DataSourceError as exc:  # e.g. a small local corpus without validation documents
            eval_examples, info["eval_skipped"] = None, str(exc)

        layer_map = self._layer_map(student, teachers)
        if layer_map:
            info["layer_map"] = {str(i): j for i, j in layer_map.items()}
        t_width = hidden_width(teachers[0].model) if teachers else None
        widths = sorted({hidden_width(t.model) for t in teachers})
        if task == "feature-extraction" and len(widths) > 1:
            raise ConfigError(f"distill.teacher: the teachers' embeddings are {widths} wide and the student learns "
                              "their weighted average; give teachers of one width")
        torch.manual_seed(seed)  # projections start the same in every process
        module = DistillModule(student, task, layer_map, t_width, hidden=c.hidden_weight > 0,
                               attentions=c.attention_weight > 0).to(device)
        objective = Objective(task=task, teachers=teachers, loss=c, layer_map=layer_map,
                              total_steps=plan_steps(c, len(examples), examples.tokens() / len(examples))[0])
        if c.teacher_cache and objective.alpha > 0:
            from ..distill.teacher_cache import cached_soft_targets

            objective.cache, info["teacher_cache"] = cached_soft_targets(
                teachers[0], examples, task, k=c.cache_top_k, batch_size=c.batch_size,
                amp=autocast_dtype(c.precision, device), device=device, accelerator=acc, progress=ctx.progress)

        qad = self._fake_quantize(student)
        try:
            figures = train(module, objective, examples, c, seed=seed, device=device, progress=ctx.progress,
                            evaluate=evaluator(task, eval_examples, teachers, device) if eval_examples else None,
                            student_of=lambda m: m.student, accelerator=acc)
        finally:  # a plain model again (weights on the grid), also when training stops with an error
            if qad is not None:
                from ..quant import fake

                qad.update(fake.unwrap(student))
        if qad is not None:
            info["quantize_aware"] = qad
        for m, impl in attn_impls:
            m.set_attn_implementation(impl)
        student.eval().cpu()  # every pass hands its model back on the CPU; the next one moves it where it runs
        info.update(figures)
        info.update({
            "task": task, "alpha": objective.alpha, "temperature": c.temperature, "kd_loss": c.kd_loss,
            "teachers": [{"model": t.name, "weight": t.weight, "fingerprint": t.fingerprint} for t in teachers],
            "student_layers": students.num_layers(student), "student_parameters": count_parameters(student),
            "train_examples": len(examples), "seed": seed,
        })
        return model.derive(model=student, tokenizer=s_tok, structure=structure, info=info)

    def _check_lengths(self, ctx: PassContext, task: str, models) -> None:
        """Training and validation sequences fit every model's positions (a learned table ends there)."""
        if ctx.data is None or ctx.data.specs.get("train") is None:
            return  # training_examples names the missing data
        c, spec = self.config, ctx.data.spec("train")
        name = "seq_len" if task == "causal-lm" else "max_length"
        length, field = getattr(c, name), f"distill.{name}"
        if length is None:
            length, field = getattr(spec, name), f"data.train.{name}"
        for role, m in models:
            check_length(m, length, field, role)

    def _fake_quantize(self, student) -> dict | None:
        """Quantization-aware distillation: wrap the student's weights in their export grid (None when off)."""
        qa = self.config.quantize_aware
        if qa is None:
            return None
        from ..quant import fake

        return fake.wrap(student, fake.GridSpec(**qa.model_dump()))

    def _layer_map(self, student, teachers) -> dict[int, int]:
        """Student layer -> teacher layer for hidden-state / attention matching ({} when neither is on)."""
        c = self.config
        if not c.matches_features():
            return {}
        from ..distill.losses import default_layer_map

        s_layers, t_layers = students.num_layers(student), students.num_layers(teachers[0].model)
        layer_map = dict(c.layer_map) if c.layer_map else default_layer_map(s_layers, t_layers)
        bad = [f"{i}->{j}" for i, j in layer_map.items() if not (0 <= i < s_layers and 0 <= j < t_layers)]
        if bad:
            raise ConfigError(f"distill.layer_map: {', '.join(bad)} out of range (student has {s_layers} "
                              f"layers, teacher {t_layers})")
        return layer_map
