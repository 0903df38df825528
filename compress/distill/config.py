"""The distill pass's options, in groups that are handed whole to the code that reads them:
`TrainConfig` to the training loop (trainer.py), `LossConfig` to the objective (objective.py), and
`DistillConfig`, which is both plus who the student and teachers are and what data they see.

The groups are combined by inheritance, so a pipeline config stays flat (`distill: {max_steps: 100,
temperature: 2}`) while each part of the code sees one typed object with one set of defaults."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..errors import ModelSourceError
from ..models import check_source
from ..options import PassConfig


def _existing_source(value: str | None) -> str | None:
    """A model source that exists (checked cheaply, as the pipeline's model.source is); `source` and `input` name
    the pipeline's source model and the pass's input."""
    if value is not None and value not in ("source", "input"):
        try:
            check_source(value)
        except ModelSourceError as exc:
            raise ValueError(str(exc)) from None
    return value


class StudentConfig(PassConfig):
    keep_layers: Literal["every_other"] | int | list[int] | None = Field(
        None, description="build the student from the input model keeping these blocks: every_other, a count "
        "(evenly spaced, first and last kept) or a list of layer indices; their weights are copied")
    config: dict[str, Any] | None = Field(
        None, description="fresh student: the input's config with these values changed (num_hidden_layers, "
        "hidden_size, num_attention_heads, intermediate_size, ...), new random weights")
    source: str | None = Field(None, description="a model source or checkpoint path to use as the student")

    _source_exists = field_validator("source")(_existing_source)

    @model_validator(mode="after")
    def _one_kind(self):
        given = [k for k in ("keep_layers", "config", "source") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of keep_layers, config or source (or omit `student` to train "
                             f"the input model in place); got {given or 'none'}")
        return self


class TeacherEntry(PassConfig):
    model: str = Field(description="source (the pipeline's source model), input (this pass's input model), "
                       "or a model source / checkpoint path")
    weight: float = Field(1.0, gt=0, description="weight of this teacher's soft targets in the average")

    _model_exists = field_validator("model")(_existing_source)


class SequenceLevelConfig(PassConfig):
    prompts: int = Field(64, gt=0, description="how many prompts (taken from the training windows)")
    prompt_tokens: int = Field(32, gt=0, description="tokens of each prompt")
    new_tokens: int = Field(96, gt=0, description="tokens the teacher generates per prompt")
    sample: bool = Field(False, description="sample (top-p 0.95, temperature 1) instead of greedy decoding")


class QuantizeAwareConfig(PassConfig):
    """The grid the later `quantize: {method: ort-int8-dynamic, kernel: matmulnbits}` pass will use."""

    bits: Literal[4, 8] = Field(4, description="weight bits of the MatMulNBits grid (quantize's weight_bits)")
    block_size: Literal[16, 32, 64, 128, 256] = Field(32, description="weights per block along the input "
                                                      "dimension (quantize's block_size)")
    symmetric: bool = Field(True, description="rtn: symmetric grid (the quantize pass's rtn is symmetric); "
                            "false: asymmetric with a zero point")
    algorithm: Literal["rtn", "minmax"] = Field(
        "rtn", description="the quantize pass's algorithm: rtn, or minmax (4 bits: each block's exact [min, max] "
        "range with a float offset, llama.cpp's Q4_1; a model dequantized from Q4_1 starts on this grid)")
    embeddings: bool = Field(True, description="embedding tables (and a tied LM head) on the int8 table grid "
                             "(quantize's quantize_embeddings)")
    embedding_bits: Literal[4, 8] = Field(8, description="bits of those tables (quantize's embedding_bits): 4 is "
                                          "the symmetric 4-bit grid in blocks of block_size")

    @model_validator(mode="after")
    def _minmax_is_4_bit(self):
        if self.algorithm == "minmax" and self.bits != 4:
            raise ValueError("algorithm minmax is a 4-bit grid; set bits: 4")
        return self


class TrainConfig(PassConfig):
    """The training loop's options (compress/distill/trainer.py)."""

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
    eval_every: int | None = Field(None, gt=0, description="evaluate on held-out data every N steps "
                                   "(always once at the end)")
    keep_best: bool = Field(True, description="return the weights of the best evaluation, not the last step")
    seed: int | None = Field(None, ge=0, lt=2**64, description="seed for student init, shuffling and dropout, "
                             "0 to 2^64 - 1 (torch's range; default: the pipeline's)")
    log_every: int = Field(10, gt=0, description="record the loss curve every N steps")


class LossConfig(PassConfig):
    """The objective's options (compress/distill/objective.py)."""

    temperature: float = Field(2.0, gt=0, le=100, description="softmax temperature T of the soft targets (the "
                               "soft term is scaled by T^2: above 100 float32 rounding outweighs the divergence)")
    temperature_schedule: Literal["constant", "linear"] = Field(
        "constant", description="constant T, or linear from `temperature` (early) to `temperature_end` (late)")
    temperature_end: float | None = Field(None, gt=0, le=100, description="final T of the linear schedule")
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

    @model_validator(mode="after")
    def _schedule(self):
        if self.temperature_schedule == "linear" and self.temperature_end is None:
            raise ValueError("temperature_schedule linear needs temperature_end (e.g. 1.0)")
        if self.temperature_schedule == "constant" and self.temperature_end is not None:
            raise ValueError("temperature_end is the end of the linear schedule; set temperature_schedule: linear "
                             "or remove temperature_end")
        if self.layer_map and not self.matches_features():
            raise ValueError("layer_map pairs layers for hidden-state / attention matching, which is off; set "
                             "hidden_weight or attention_weight above 0, or remove layer_map")
        if "hidden_loss" in self.model_fields_set and self.hidden_weight == 0:  # set by the user, and ignored
            raise ValueError("hidden_loss is the loss of hidden-state matching, which hidden_weight 0 turns off; set "
                             "hidden_weight above 0, or remove hidden_loss")
        return self

    def matches_features(self) -> bool:
        """Hidden-state or attention matching is on (both need the teacher running, with its first teacher)."""
        return self.hidden_weight > 0 or self.attention_weight > 0


class DistillConfig(LossConfig, TrainConfig):
    student: StudentConfig | None = Field(
        None, description="omitted: train the input model in place; else keep_layers / config / source")
    teacher: str | list[TeacherEntry] = Field(
        "source", description="source (pipeline source model), input (this pass's input), a model source or "
        "checkpoint path, or a list of {model, weight} for multi-teacher distillation")
    teacher_cache: bool = Field(False, description="offline distillation: run the teacher once, keep its "
                                "top-k logits (and the mass of the rest) on disk and read them in every later "
                                "epoch and rerun")
    cache_top_k: int = Field(64, gt=0, description="logits kept per position in the teacher cache")
    sequence_level: SequenceLevelConfig | None = Field(
        None, description="train on text the teacher generates from prompts in the data (causal LMs)")
    seq_len: int | None = Field(None, gt=1, description="causal LM window length (default data.train.seq_len)")
    max_length: int | None = Field(None, gt=1, description="classifier / embedding truncation length "
                                   "(default data.train.max_length)")
    eval_tokens: int = Field(8192, gt=0, description="causal LM: validation tokens per evaluation")
    eval_examples: int = Field(200, gt=0, description="classifiers / embeddings: validation examples")
    quantize_aware: QuantizeAwareConfig | None = Field(
        None, description="quantization-aware distillation: the student trains with its weights fake-quantized "
        "exactly as the ONNX export + int4/int8 MatMulNBits quantize pass stores them (straight-through "
        "gradients), and ends projected onto that grid; null = off")

    @field_validator("teacher")
    @classmethod
    def _teacher_exists(cls, value):
        if value == []:  # the soft targets would average over no teacher
            raise ValueError("list at least one teacher ({model, weight}), or remove teacher for the default, source")
        return _existing_source(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _cache_needs_one_logit_teacher(self):
        if self.teacher_cache and self.matches_features():
            raise ValueError("teacher_cache keeps only the teacher's logits; hidden-state / attention matching "
                             "needs the teacher running. Set hidden_weight and attention_weight to 0, or "
                             "teacher_cache: false")
        if self.teacher_cache and isinstance(self.teacher, list) and len(self.teacher) > 1:
            raise ValueError("teacher_cache works with a single teacher; remove the extra teachers or set "
                             "teacher_cache: false")
        if "cache_top_k" in self.model_fields_set and not self.teacher_cache:  # set by the user, and ignored
            raise ValueError("cache_top_k sizes the teacher cache, which is off; set teacher_cache: true or remove "
                             "cache_top_k")
        return self

    def teacher_entries(self) -> list[TeacherEntry]:
        if isinstance(self.teacher, str):
            return [TeacherEntry(model=self.teacher)]
        return list(self.teacher)

    def needs_teacher(self, task: str) -> bool:
        """No teacher is loaded when nothing uses it (hard labels only, no feature terms)."""
        return (self.alpha > 0 or self.matches_features() or task == "feature-extraction"
                or self.sequence_level is not None)


class RecoverConfig(DistillConfig):
    """prune's `recover:` block: a distillation of the pruned model itself (so no `student`)."""

    @model_validator(mode="after")
    def _no_student(self):
        if self.student is not None:
            raise ValueError("recover trains the pruned model itself; remove recover.student")
        return self
