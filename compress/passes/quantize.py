"""quantize: lower the precision of a model's weights.

torch -> torch: fp32 / bf16 / fp16 (dtype casts), torch-int8-dynamic, bnb-int8, bnb-nf4, bnb-fp4.
onnx -> onnx (after `export`): ort-int8-dynamic, ort-int8-static (QDQ, calibrated), ort-fp16.

Every ONNX-side method ends with the discrepancy check against its (float) ONNX parent, whose own check
against torch the export pass recorded; the figures go into the manifest and a check out of tolerance
fails the pass with the numbers. Torch-side int8/4-bit layers are recorded as structure so `compress.load`
rebuilds them (compress/quant/torch_side.py)."""
from __future__ import annotations

import copy
import difflib
import logging
import tempfile
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Union, get_args

import torch
from pydantic import Field, model_validator

from .. import onnx_tools
from ..checkpoint import Artifact, as_float32, cast_model
from ..errors import ConfigError
from ..options import search
from ..logs import SUITE_LOGGER
from ..quant import fake, sensitivity, torch_side
from . import register
from .base import Pass, PassConfig, PassContext

DTYPE_METHODS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TORCH_INT_METHODS = ("torch-int8-dynamic", "bnb-int8", "bnb-nf4", "bnb-fp4")
ORT_METHODS = ("ort-int8-dynamic", "ort-int8-static", "ort-fp16")
METHODS = tuple(DTYPE_METHODS) + TORCH_INT_METHODS + ORT_METHODS
BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "torch-int8-dynamic": 8, "bnb-int8": 8, "bnb-nf4": 4, "bnb-fp4": 4,
        "ort-int8-static": 8, "ort-fp16": 16}
# ort-int8-dynamic's kernel when `kernel: auto`: decoding is weight-bandwidth-bound (MatMulNBits wins and keeps
# quality); encoders process whole sequences, where MatMulInteger is faster (README.md in the results).
AUTO_KERNEL = {"causal-lm": "matmulnbits", "sequence-classification": "matmulinteger",
               "feature-extraction": "matmulinteger"}
# ort-int8-static leaves these in float by default: the LM head, and the MLP output projections, whose inputs
# (the SwiGLU / GELU products) carry outliers that one static scale per tensor cannot hold even after
# smoothing (SmolLM2: perplexity 57.8 with them int8, 24.9 without; MiniLM: embedding cosine 0.942 vs 0.995;
# benchmarks/results/quantize/static/). BERT's FFN output is `layer.N/output/dense`, not `attention/output`.
_BERT_FFN_OUT = ("*layer.?/output/dense*", "*layer.??/output/dense*", "*ffn/lin2*")
STATIC_FLOAT = {"causal-lm": ("*lm_head*", "*down_proj*", "*mlp/c_proj*", "*embed_out*", "*dense_4h_to_h*", "*mlp/fc2*"),
                "sequence-classification": _BERT_FFN_OUT, "feature-extraction": _BERT_FFN_OUT}
# Default check tolerance per task: top-1 agreement (LM, classifier) or worst embedding cosine (encoder).
DEFAULT_MIN_AGREEMENT = {"causal-lm": 0.75, "sequence-classification": 0.9, "feature-extraction": 0.95}


def _default_torch_exclude(module) -> list[str]:
    """The LM head, whatever its name (found by the architecture layer: lm_head, GPT-NeoX's embed_out)."""
    from ..architecture import find
    from ..errors import UnsupportedModelError

    exclude = ["lm_head", "*.lm_head"]
    try:
        head = find(module).head
    except UnsupportedModelError:
        return exclude
    return exclude if head in (None, "lm_head") else exclude + [head]


class _Method(PassConfig):
    method: str  # each member narrows it to its own methods
    options_of: ClassVar[str] = ""  # named in "unknown option" errors


class _Exclude(_Method):
    exclude: list[str] | None = Field(
        None, description="glob patterns of layers left unquantized: torch module names (e.g. '*lm_head') for "
        "torch methods, ONNX node or weight names (e.g. '*lm_head*', '/model/layers.0/*') for ort-* methods. "
        "Default: the LM head (torch int8/4-bit); for ort-int8-static the MLP output projections (down_proj, "
        "c_proj, BERT's output.dense) and the LM head")


class _Check(_Exclude):
    """The discrepancy check every ONNX-side method ends with."""

    check_samples: int = Field(4, ge=1, description="sequences in the discrepancy check")
    check_seq_len: int = Field(64, ge=2, description="tokens per sequence in the discrepancy check")
    max_abs_error: float | None = Field(None, gt=0, description="fail above this max abs output error "
                                        "(null: report only)")
    min_agreement: float | None = Field(
        None, ge=0, le=1, description="fail below this top-1 agreement (LM, classifier) or worst embedding "
        "cosine (encoder) with the parent; default 0.75 / 0.9 / 0.95 by task")
    check: bool = Field(True, description="run the discrepancy check (figures always recorded when on)")

    @model_validator(mode="after")
    def _check_is_on(self):
        given = [n for n in ("check_samples", "check_seq_len", "max_abs_error", "min_agreement")
                 if n in self.model_fields_set]  # set by the user: a default never trips this
        if given and not self.check:  # they would be ignored, the quality gate silently dropped
            names = " / ".join(given)
            raise ValueError(f"{names} appl{'y' if len(given) > 1 else 'ies'} to the discrepancy check, which check: "
                             f"false turns off; set check: true or remove {names}")
        return self


class _Calibration(_Check):
    """Calibration data for the methods that use it (from data.calibration, else data.train)."""

    calibration_batches: int = Field(8, ge=1, description="batches of calibration data")
    calibration_batch_size: int = Field(1, ge=1, description="sequences per calibration batch")
    calibration_seq_len: int = Field(128, ge=8, description="tokens per calibration sequence")


class CastConfig(_Method):
    method: Literal["fp32", "bf16", "fp16"] = Field("bf16", description="cast every weight to this dtype (torch)")
    options_of: ClassVar[str] = "the dtype casts (fp32, bf16, fp16)"


class TorchInt8Config(_Exclude):
    method: Literal["torch-int8-dynamic"] = Field(
        description="int8 linear layers with dynamic activation quantization (torch)")
    options_of: ClassVar[str] = "method torch-int8-dynamic"


class BnbInt8Config(_Exclude):
    method: Literal["bnb-int8"] = Field(description="bitsandbytes LLM.int8 linear layers")
    bnb_threshold: float = Field(6.0, ge=0, description="outlier threshold (LLM.int8); 0 disables")
    options_of: ClassVar[str] = "method bnb-int8"


class Bnb4bitConfig(_Exclude):
    method: Literal["bnb-nf4", "bnb-fp4"] = Field(description="bitsandbytes 4-bit linear layers")
    bnb_blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = Field(
        64, description="weights per quantization block (the sizes bitsandbytes takes)",
        json_schema_extra=search([64, 128]))
    bnb_compute_dtype: Literal["float32", "bfloat16"] = Field("float32", description="compute dtype")
    options_of: ClassVar[str] = "methods bnb-nf4 / bnb-fp4"


class OrtDynamicConfig(_Calibration):
    method: Literal["ort-int8-dynamic"] = Field(
        description="ONNX Runtime int8 weights, activations quantized at run time")
    kernel: Literal["auto", "matmulnbits", "matmulinteger", "rowwise"] = Field(
        "auto", description="rowwise = int8 weights per column with activations quantized per row (token) at "
        "run time (MatMulIntegerToFloat; encoders: fast on x86 CPUs without VNNI and keeps MiniLM's embeddings "
        "near cosine 0.999 where per-tensor matmulinteger drops to 0.994; a fused Attention's QKV projection "
        "stays float: per row it cost MiniLM cosine 0.9992 -> 0.9978, benchmarks/results/encoder_speed/); "
        "matmulnbits = int8 weights in blocks with activations quantized per block at run time (MatMulNBits, "
        "accuracy level 4; a fused encoder Attention's QKV projection is taken out of the op and quantized too); "
        "matmulinteger = classic quantize_dynamic (per-tensor activations), what optimum's ORTQuantizer produces; "
        "auto = matmulnbits for "
        "causal LMs (keeps perplexity within 1%), matmulinteger for encoders (benchmarks/results/quantize/README.md "
        "has the evidence). For decoding speed on a causal LM use matmulinteger with exclude: ['*down_proj*']")
    quantize_embeddings: bool = Field(True, description="embedding tables (Gather) to int8 too; a tied LM head "
                                      "shares the int8 table", json_schema_extra=search([True, False]))
    embedding_bits: Literal[4, 8] = Field(
        8, description="matmulnbits: bits of the embedding tables and a tied LM head (one table): 4 stores them "
        "on MatMulNBits' symmetric 4-bit grid in blocks of block_size (SmolLM2: 12 MB smaller, +9% perplexity "
        "after post-training rounding; quantization-aware distillation with the same setting absorbs it)",
        json_schema_extra=search([4, 8]))
    weight_bits: Literal[4, 8] = Field(8, description="matmulnbits: 8 or 4-bit weights",
                                       json_schema_extra=search([4, 8]))
    block_size: Literal[16, 32, 64, 128, 256] = Field(
        32, description="matmulnbits: weights (and activations) per quantization block (the sizes ONNX Runtime's "
        "MatMulNBits takes)", json_schema_extra=search([32, 64, 128]))
    algorithm: Literal["rtn", "minmax", "hqq", "k_quant", "gptq"] = Field(
        "rtn", description="matmulnbits: how the weight grid is chosen: rtn (round to nearest, symmetric), minmax "
        "(each block's exact [min, max] range with a float offset, llama.cpp's Q4_1), hqq (half-quadratic "
        "scale / zero-point search), k_quant (llama.cpp's k-quant search) or gptq (error compensation on the "
        "calibration data); minmax, k_quant and gptq are 4-bit only",
        json_schema_extra=search(["rtn", "minmax", "hqq"]))
    offset_roundings: Literal[0, 2, 3] = Field(
        0, description="algorithm minmax or hqq at 4 bits: how each projection's per-block offsets are stored. "
        "0: an fp16 table, a MatMul and an Add per projection. 2 or 3: folded into its 4-bit weights as rows read "
        "against the block sums appended to its input, in that many 4-bit roundings (each of what the ones before "
        "left), where K is a multiple of block_size. SmolLM2 int4 minmax at 3: decode 1.10x the table's, "
        "prefill 0.95x, 3.6% larger, KL to fp32 +4%; at 2: 1.13x, 1.01x, 0.3% larger, KL +15%, and 1.13x "
        "llama.cpp Q4_1's decode at its perplexity (benchmarks/results/fast_decoder/vnni/offsets/ and folded/)",
        json_schema_extra=search([0, 2, 3]))
    per_channel: bool = Field(True, description="matmulinteger: one weight scale per output channel instead of "
                              "per tensor")
    keep_8bit: list[str] | None = Field(
        None, description="matmulnbits, weight_bits 4: glob patterns of ONNX node names kept at 8 bits (e.g. "
        "'/model/layers.0/*'); each kept MatMul about doubles its weight bytes and loses its 4-bit rounding error")
    keep_8bit_blocks: int = Field(
        0, ge=0, description="matmulnbits, weight_bits 4: the N decoder blocks most sensitive to 4 bits kept at "
        "8 bits (causal LMs; sensitivity = KL from the float torch parent with only that block on the 4-bit grid, "
        "on the calibration data, else the blocks' relative int4 weight error; manifest: info.mixed_precision). "
        "Each block kept about doubles its weight bytes (+1/num_layers of the 4-bit blocks' size) and removes "
        "its share of int4's quality loss, the largest shares first",
        json_schema_extra=search([0, 2, 4, 8]))
    smooth_alpha: float | None = Field(
        None, ge=0, le=1, description="SmoothQuant-style smoothing before quantizing, calibrated on "
        "data.calibration (or data.train): moves activation outliers into the weights with this strength (0 = "
        "none moved, 1 = all). matmulinteger: through the producer's constants or an inserted per-channel Mul "
        "where none takes it (BERT's LayerNorm and GELU outputs); at alpha 0.7 MiniLM-L6 embedding cosine 0.995 "
        "-> 0.998 for 5-6% more latency (24 Muls), SmolLM2 perplexity +63% -> +7.5% "
        "(benchmarks/results/quantize/smoothed-dynamic/). matmulnbits at 8 bits: only where a constant takes it "
        "(norm gains, up_proj's columns), so it costs no time; the activations are quantized per block there, and "
        "smoothing evens out the channels within each block (benchmarks/results/fast_decoder/vnni/). null: no "
        "smoothing")
    blockwise: list[str] | None = Field(
        None, description="matmulinteger: glob patterns of MatMuls kept block-wise instead (MatMulNBits int8 in "
        "blocks of block_size, activations quantized per block): inputs whose outliers one scale per tensor "
        "cannot hold, e.g. ['*down_proj*'] (SmolLM2 with smooth_alpha 0.7: perplexity +0.85%, prefill 1.46x the "
        "default's, decode 0.88-0.93x; benchmarks/results/quantize/smoothed-dynamic/)")
    options_of: ClassVar[str] = "method ort-int8-dynamic"

    @model_validator(mode="after")
    def _algorithm_bits(self):
        if self.kernel != "auto" and (problem := _kernel_problem(self, self.kernel, f"kernel {self.kernel}")):
            raise ValueError(problem)  # with kernel auto, the pass's check_task once the task is known
        if self.algorithm in ("minmax", "k_quant", "gptq") and self.weight_bits != 4:
            raise ValueError(f"algorithm {self.algorithm} quantizes to 4 bits; set weight_bits: 4 or use rtn / hqq")
        if self.offset_roundings and (self.algorithm not in ("minmax", "hqq") or self.weight_bits != 4):
            raise ValueError("offset_roundings folds the per-block offsets of algorithm minmax or hqq at "
                             "weight_bits 4; the others have none: set offset_roundings: 0")
        if self.smooth_alpha is not None and self.weight_bits == 4:
            raise ValueError("smooth_alpha applies to 8-bit weights: at 4 bits the outliers it moves into the "
                             "weights cost more than they save; set weight_bits: 8 or smooth_alpha: null")
        if self.embedding_bits == 4 and not self.quantize_embeddings:
            raise ValueError("embedding_bits 4 needs quantize_embeddings: true")
        for name in ("keep_8bit", "keep_8bit_blocks"):
            if getattr(self, name) and self.weight_bits != 4:  # (4 bits off matmulnbits is refused above)
                raise ValueError(f"{name} keeps MatMuls at 8 bits when the rest is at 4: it needs kernel "
                                 f"matmulnbits (or auto on a causal LM) and weight_bits: 4")
        return self


def _kernel_problem(cfg: OrtDynamicConfig, kernel: str, which: str) -> str | None:
    """The first option of `cfg` that `kernel` cannot take or would ignore, as a message naming it and the fix;
    None when there is none. `which` says how the kernel was chosen (e.g. 'kernel rowwise', 'kernel auto is
    matmulinteger on a feature-extraction model')."""
    nbits = kernel == "matmulnbits"
    if not nbits and (cfg.keep_8bit or cfg.keep_8bit_blocks):
        return f"keep_8bit / keep_8bit_blocks: {which}; mixed 4/8 bits needs kernel: matmulnbits"
    if not nbits and cfg.weight_bits == 4:
        return f"weight_bits: {which}, which is 8-bit only; 4-bit weights need kernel: matmulnbits"
    if not nbits and cfg.embedding_bits == 4:
        return (f"embedding_bits: {which}; 4-bit embedding tables need kernel: matmulnbits (or embedding_bits: "
                "8)")
    if not nbits and cfg.algorithm != "rtn":
        return (f"algorithm: {which}, whose weights are rtn per channel; algorithm applies to kernel: "
                "matmulnbits")
    if kernel != "matmulinteger" and cfg.blockwise:
        return (f"blockwise: {which}, {'block-wise throughout' if nbits else 'which scales per row'}; blockwise "
                "applies to kernel: matmulinteger (the rest per tensor)")
    if not nbits and cfg.block_size != 32 and not (kernel == "matmulinteger" and cfg.blockwise):
        return f"block_size: {which}, whose weights are not in blocks; block_size applies to kernel: matmulnbits"
    if kernel != "matmulinteger" and not cfg.per_channel:
        return (f"per_channel: {which}, whose weight scales are per {'block' if nbits else 'column'}; "
                "per_channel: false applies to kernel: matmulinteger")
    if kernel == "rowwise" and cfg.smooth_alpha is not None:
        return (f"smooth_alpha: {which}, which scales activations per row and weights per column already; "
                "smooth_alpha applies to kernels matmulinteger and matmulnbits")
    return None


class OrtStaticConfig(_Calibration):
    method: Literal["ort-int8-static"] = Field(
        description="ONNX Runtime int8 QDQ with activation ranges calibrated on data")
    per_channel: bool = Field(True, description="one weight scale per output channel instead of per tensor")
    calibration_method: Literal["minmax", "entropy", "percentile"] = Field(
        "percentile", description="how activation ranges are chosen from calibration data")
    activations: Literal["uint8", "int8"] = Field(
        "uint8", description="activation type; uint8 (asymmetric) runs as integer matmuls on "
        "ONNX Runtime's x86 CPU kernels, int8 (symmetric) falls back to float there (for ARM / NPU targets)")
    smooth_alpha: float | None = Field(
        0.5, ge=0, le=1, description="SmoothQuant-style smoothing before calibration: moves "
        "activation outliers into the weights with this strength (0 = none moved, 1 = all); null: no smoothing")
    options_of: ClassVar[str] = "method ort-int8-static"


class OrtFp16Config(_Check):
    method: Literal["ort-fp16"] = Field(description="ONNX Runtime fp16 weights and compute")
    options_of: ClassVar[str] = "method ort-fp16"


MEMBERS = (CastConfig, TorchInt8Config, BnbInt8Config, Bnb4bitConfig, OrtDynamicConfig, OrtStaticConfig,
           OrtFp16Config)
# The options of `quantize`: one model per method, chosen by `method` (a stray option is an error naming it).
QuantizeConfig = Annotated[Union[MEMBERS], Field(discriminator="method")]  # type: ignore[valid-type]
METHOD_CONFIGS: dict[str, type[_Method]] = {
    m: cls for cls in MEMBERS for m in get_args(cls.model_fields["method"].annotation)}
assert set(METHOD_CONFIGS) == set(METHODS)


@register
class Quantize(Pass):
    name = "quantize"
    description = "Lower weight precision: torch dtypes, torch/bitsandbytes int8 and 4-bit, ONNX Runtime int8/fp16"
    Config = QuantizeConfig
    version = 4  # 2: int8 embedding tables in blocks of 32 with fp16 scales (fake.table_grid), not 64 or 128;
    # 3: algorithm gptq leaves the excluded MatMuls float (they were 4-bit), and so does exclude a fused encoder's
    # vocabulary table (it was int8); 4: the fused graph's mixtures of experts as QMoE (int8 per row, int4 blocks)

    @classmethod
    def config_class(cls, options: dict) -> type[PassConfig]:
        method = options.get("method", "bf16")
        if not isinstance(method, str) or method not in METHOD_CONFIGS:
            near = difflib.get_close_matches(str(method), METHODS, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            allowed = ", ".join(map(repr, METHODS))
            raise ConfigError(f"quantize.method: unknown method {method!r}{hint} (allowed: {allowed})")
        return METHOD_CONFIGS[method]

    def input_kinds(self) -> tuple[str, ...]:
        return ("onnx",) if self.config.method in ORT_METHODS else ("torch",)

    def output_kind(self) -> str:
        return self.input_kinds()[0]

    def quantizes(self) -> bool:
        return self.config.method != "fp32"  # fp32 is a plain cast back, allowed after anything torch-side

    def accepts_quantized_input(self) -> bool:
        return not self.quantizes()

    def check_task(self, task: str) -> str | None:
        cfg = self.config
        if cfg.method != "ort-int8-dynamic":
            return None
        kernel = cfg.kernel if cfg.kernel != "auto" else AUTO_KERNEL[task]
        if problem := _kernel_problem(cfg, kernel, f"kernel {cfg.kernel} is {kernel} on a {task} model"):
            return f"quantize.{problem}"
        if cfg.keep_8bit_blocks and task != "causal-lm":
            return (f"quantize.keep_8bit_blocks: ranks the decoder blocks of a causal LM, not a {task} model; name "
                    "the nodes with keep_8bit instead")
        return None

    def needs_data(self) -> tuple[tuple[str, ...], str] | None:
        c = self.config
        if c.method == "ort-int8-static" or getattr(c, "algorithm", None) == "gptq" or \
                getattr(c, "smooth_alpha", None) is not None:
            what = f"method: {c.method}" if c.method != "ort-int8-dynamic" else \
                "algorithm: gptq" if c.algorithm == "gptq" else "smooth_alpha"
            return ("calibration", "train"), f"quantize ({what}) calibrates on calibration data"
        return None

    def apply(self, model: Artifact, ctx: PassContext) -> Artifact:
        method = self.config.method
        if method in DTYPE_METHODS:
            return self._cast(model)
        if method in TORCH_INT_METHODS:
            return self._torch_int(model)
        return self._ort(model, ctx)

    # ------------------------------------------------------------------ torch side
    def _cast(self, model: Artifact) -> Artifact:
        dtype = DTYPE_METHODS[self.config.method]
        module = cast_model(copy.deepcopy(model.model), dtype)  # a copy: the input artifact keeps its weights
        module.config.dtype = dtype  # `config.json` then says what the weights are
        q = None if self.config.method == "fp32" else {"method": self.config.method, "bits": 16}
        return model.derive(model=module, quantization=q, info={"dtype": str(dtype).removeprefix("torch.")})

    def _torch_int(self, model: Artifact) -> Artifact:
        cfg, method = self.config, self.config.method
        module = as_float32(model.model).eval()
        exclude = _default_torch_exclude(module) if cfg.exclude is None else cfg.exclude
        if cfg.exclude and not torch_side.matches_a_module(module, cfg.exclude):
            raise ConfigError(f"quantize.exclude: {cfg.exclude} matches no module of the model; patterns match "
                              "torch module names, e.g. '*lm_head' or 'model.layers.0.*'")
        settings = {}
        if method == "bnb-int8":
            settings = {"threshold": cfg.bnb_threshold}
        elif method.startswith("bnb-"):
            settings = {"blocksize": cfg.bnb_blocksize, "compute_dtype": cfg.bnb_compute_dtype}
        entry = torch_side.quantize_linears(module, method, exclude, **settings)
        if not entry["modules"]:
            raise ConfigError(f"quantize.exclude: {exclude} leaves no nn.Linear layer to quantize")
        q = {"method": method, "bits": BITS[method], "exclude": exclude, "layers": len(entry["modules"]), **settings}
        info = {"quantized_layers": len(entry["modules"]), "excluded_patterns": exclude}
        return model.derive(model=module, quantization=q, structure=[*model.structure, entry], info=info)

    # ------------------------------------------------------------------ ONNX side
    def _ort(self, model: Artifact, ctx: PassContext) -> Artifact:
        from ..quant import ort

        cfg, method, task = self.config, self.config.method, model.task
        src = Path(model.onnx_dir)
        self._graph_length = onnx_tools.graph_max_length(src)  # read once: the check and calibration need it
        self._check_fits(cfg.check_seq_len, "quantize.check_seq_len")
        ctx.scratch.mkdir(parents=True, exist_ok=True)
        dst = Path(tempfile.mkdtemp(prefix="quantize-", dir=ctx.scratch))
        exclude = list(cfg.exclude or [])
        if exclude and not ort.matches_a_node(src, exclude):  # a typo would quantize what it meant to keep
            raise ConfigError(f"quantize.exclude: {exclude} matches no node of the ONNX graph; patterns match node "
                              "names or weight names, e.g. '*lm_head*' or '/model/layers.0/*'")
        q: dict = {"method": method}
        notes: list[str] = []
        if method == "ort-int8-dynamic":
            kernel = cfg.kernel if cfg.kernel != "auto" else AUTO_KERNEL[task]
            if kernel == "matmulnbits":
                feeds = None
                if cfg.algorithm == "gptq" or cfg.smooth_alpha is not None:
                    feeds = ort.calibration_feeds(src, *self._calibration_inputs(model, ctx),
                                                  cfg.calibration_batch_size)
                eight_bit, mixed = self._mixed_precision(model, ctx, src)
                note = fake.grid_mismatch(model, bits=cfg.weight_bits, block_size=cfg.block_size,
                                          symmetric=cfg.algorithm == "rtn", algorithm=cfg.algorithm,
                                          embeddings=cfg.quantize_embeddings, embedding_bits=cfg.embedding_bits)
                if note and eight_bit:
                    note += " (the MatMuls kept at 8 bits too, at 8 bits)"
                elif eight_bit and fake.grid_settings(model) is not None:  # 8-bit RTN of a 4-bit grid: exact
                    note = ("quantize: keep_8bit / keep_8bit_blocks after quantization-aware distillation for this "
                            "4-bit grid: those weights are on it already, so 8 bits costs size and buys nothing")
                if note:
                    notes.append(note)
                    logging.getLogger(SUITE_LOGGER).warning(note)
                details = ort.weight_only(src, dst, bits=cfg.weight_bits, block_size=cfg.block_size,
                                          accuracy_level=4, symmetric=cfg.algorithm == "rtn", exclude=exclude,
                                          embeddings=cfg.quantize_embeddings, algorithm=cfg.algorithm, feeds=feeds,
                                          eight_bit=eight_bit, embedding_bits=cfg.embedding_bits,
                                          smooth_alpha=cfg.smooth_alpha, offset_roundings=cfg.offset_roundings)
                if mixed:
                    details["mixed_precision"] = mixed
                if details.get("float_matmuls"):
                    notes.append(self._float_matmuls(details))
                if cfg.embedding_bits == 4 and details["int8_embedding_tables"]:
                    note = (f"quantize: embedding_bits 4 left the embedding tables {details['int8_embedding_tables']} "
                            f"at 8 bits: their row width is not a multiple of block_size {cfg.block_size}, or a node "
                            "other than the lookup and a tied LM head reads them (an excluded head)")
                    notes.append(note)
                    logging.getLogger(SUITE_LOGGER).warning(note)
                q.update(bits=cfg.weight_bits, kernel="MatMulNBits", block_size=cfg.block_size, accuracy_level=4,
                         algorithm=cfg.algorithm, embedding_bits=cfg.embedding_bits)
                if cfg.smooth_alpha is not None:
                    q["smooth_alpha"] = cfg.smooth_alpha
                if cfg.offset_roundings:
                    q["offset_roundings"] = cfg.offset_roundings
                if eight_bit:
                    q["int8_matmuls"] = len(details["int8_matmuls"])
            elif kernel == "rowwise":
                details = ort.rowwise_int8(src, dst, exclude=exclude, embeddings=cfg.quantize_embeddings)
                q.update(bits=8, kernel="MatMulIntegerToFloat", activations="per-row", weight_type="QInt8")
            else:
                feeds = None
                if cfg.smooth_alpha is not None:
                    feeds = ort.calibration_feeds(src, *self._calibration_inputs(model, ctx),
                                                  cfg.calibration_batch_size)
                details = ort.dynamic_int8(src, dst, per_channel=cfg.per_channel, exclude=exclude,
                                           op_types=["MatMul", "Gemm", "Attention"],
                                           embeddings=cfg.quantize_embeddings, smooth_alpha=cfg.smooth_alpha,
                                           feeds=feeds, blockwise=cfg.blockwise or [], block_size=cfg.block_size)
                q.update(bits=8, kernel="MatMulInteger", per_channel=cfg.per_channel, weight_type="QInt8",
                         smooth_alpha=cfg.smooth_alpha)
                if cfg.blockwise:
                    q.update(blockwise=cfg.blockwise, blockwise_matmuls=len(details["blockwise_matmuls"]),
                             block_size=cfg.block_size)
            q["quantize_embeddings"] = cfg.quantize_embeddings  # at embedding_bits (matmulnbits), else 8
            if cfg.quantize_embeddings:  # a fused encoder's EmbedLayerNormalization reads its tables directly
                details["int8_embed_layernorm_tables"] = ort.int8_embed_layernorm_tables(dst, exclude=exclude)
            if details.get("float_embedding_tables"):
                notes.append(f"quantize: embedding tables {details['float_embedding_tables']} stay float: their "
                             "row width is not a multiple of 16 (the int8 / 4-bit tables' smallest block)")
        elif method == "ort-int8-static":
            if cfg.exclude is None:
                exclude = list(STATIC_FLOAT[task])
            feeds = ort.calibration_feeds(src, *self._calibration_inputs(model, ctx), cfg.calibration_batch_size)
            details = ort.static_int8(src, dst, feeds, calibrate=cfg.calibration_method, per_channel=cfg.per_channel,
                                      exclude=exclude, op_types=["MatMul", "Gemm"], activations=cfg.activations,
                                      smooth_alpha=cfg.smooth_alpha)
            scales = details.pop("activation_scales")
            if not scales:
                raise ConfigError(f"quantize: ort-int8-static calibrated no activation of this graph, so nothing would "
                                  f"run in int8 (quantize.exclude: {exclude}); narrow quantize.exclude or use "
                                  "ort-int8-dynamic")
            details["calibration"] = {"method": cfg.calibration_method, "batches": len(feeds),
                                      "tokens": int(sum(f["input_ids"].size for f in feeds)),
                                      "activation_tensors": len(scales),
                                      "scale_mean": float(sum(scales.values()) / max(1, len(scales)))}
            q.update(bits=8, format="QDQ", per_channel=cfg.per_channel, calibration=cfg.calibration_method,
                     activations=cfg.activations, smooth_alpha=cfg.smooth_alpha)
        else:
            details = ort.fp16(src, dst, exclude=exclude)
            q.update(bits=16, keep_io_types=True)
        if cfg.exclude and not ort.lowered(dst):  # (ort-int8-static refuses this above, by its own measure)
            raise ConfigError(f"quantize.exclude: {exclude} leaves nothing of this graph to quantize ({method} "
                              "would write the parent unchanged); narrow quantize.exclude")
        q["exclude"] = exclude
        q["excluded_nodes"] = details["excluded_nodes"]
        onnx_tools.copy_edge_runner(dst)
        info = {**details, "onnx_bytes": onnx_tools.onnx_size(dst),
                "parent_onnx_bytes": onnx_tools.onnx_size(src)}
        if model.info.get("discrepancy"):
            info["export_discrepancy"] = model.info["discrepancy"]
        if notes:
            info["notes"] = notes
        if cfg.check:
            info["discrepancy"] = self._check(model, src, dst, ctx)
        return model.derive(onnx_dir=dst, quantization=q, info=info)

    def _float_matmuls(self, details: dict) -> str:
        """algorithm minmax stores whole blocks only: the note for the MatMuls it left float, or the error when
        nothing at all was quantized."""
        left, rows, block = details["float_matmuls"], details["float_matmul_rows"], self.config.block_size
        fits = [b for b in get_args(OrtDynamicConfig.model_fields["block_size"].annotation)
                if all(k % b == 0 for k in rows)]
        fix = (f"block_size {' or '.join(map(str, fits))} fits them" if fits else
               "no block size divides them; algorithm rtn or hqq pads the last block")
        why = (f"algorithm minmax leaves {len(left)} MatMul(s) float: their input rows ({', '.join(map(str, rows))}) "
               f"are not a multiple of block_size {block}; {fix}")
        quantized = (details["offset_corrections"] or details["int8_head"] or details["int8_matmuls"]
                     or details["int8_embedding_tables"] or details.get("int4_embedding_tables"))
        if not quantized:
            raise ConfigError(f"quantize.block_size: nothing would be quantized: {why}")
        return f"quantize: {why}"

    # ------------------------------------------------------------------ mixed 4/8 bits
    def _mixed_precision(self, model: Artifact, ctx: PassContext, src: Path) -> tuple[list[str], dict | None]:
        """The MatMuls kept at 8 bits (keep_8bit patterns, keep_8bit_blocks most sensitive blocks) and the
        record for the manifest (None when nothing is kept)."""
        import onnx

        from ..quant import ort

        cfg = self.config
        if not (cfg.keep_8bit or cfg.keep_8bit_blocks):
            return [], None
        proto = onnx.load(str(src / onnx_tools.ONNX_FILE), load_external_data=False)
        matched = set(ort.matching_nodes(proto, cfg.keep_8bit, ("MatMul",)) if cfg.keep_8bit else [])
        excluded = set(ort.matching_nodes(proto, cfg.exclude or [], ort.QUANTIZABLE))  # they stay float
        weights = {i.name for i in proto.graph.initializer}  # products of two activations stay float anyway
        nodes = [n.name for n in proto.graph.node if n.name in matched and n.input[1] in weights
                 and n.name not in excluded]
        if cfg.keep_8bit and not nodes:
            raise ConfigError(f"quantize.keep_8bit: {cfg.keep_8bit} matches no MatMul node of the ONNX graph"
                              + (" that quantize.exclude leaves to quantize" if excluded else ""))
        record: dict = {"patterns": cfg.keep_8bit, "pattern_matmuls": len(nodes)}
        if cfg.keep_8bit_blocks:
            blocks = ort.decoder_blocks(proto)
            if model.task != "causal-lm" or not blocks:
                raise ConfigError("quantize.keep_8bit_blocks: needs a causal LM whose ONNX node names show its "
                                  "blocks ('/model/layers.N/...'); name the nodes with keep_8bit instead")
            if cfg.keep_8bit_blocks > len(blocks):
                raise ConfigError(f"quantize.keep_8bit_blocks: {cfg.keep_8bit_blocks} but the model has "
                                  f"{len(blocks)} blocks")
            scores, measure = self._sensitivity(model, ctx, src, blocks)
            chosen = sorted(sorted(scores, key=scores.get, reverse=True)[:cfg.keep_8bit_blocks])
            nodes += [n for i in chosen for n in blocks[i] if n not in nodes and n not in excluded]
            record.update(blocks=len(blocks), blocks_8bit=chosen, sensitivity=measure,
                          scores={str(i): scores[i] for i in blocks})
        record["matmuls_8bit"] = len(nodes)
        return nodes, record

    def _sensitivity(self, model: Artifact, ctx: PassContext, src: Path,
                     blocks: dict[int, list[str]]) -> tuple[dict[int, float], dict]:
        """Per block, how much 4 bits hurt (compress/quant/sensitivity.py): KL from the float torch parent on
        the calibration data, else (no torch parent, no data) the blocks' relative int4 weight error."""
        cfg = self.config
        # the grid the weights will get (hqq / k_quant / gptq choose theirs: the asymmetric rtn grid stands in)
        grid = {"block_size": cfg.block_size, "symmetric": cfg.algorithm == "rtn",
                "algorithm": "minmax" if cfg.algorithm == "minmax" else "rtn"}
        parent = self._torch_parent(model, ctx)
        has_data = ctx.data is not None and any(ctx.data.specs.get(r) is not None for r in ("calibration", "train"))
        why = ("no torch checkpoint found before the ONNX model" if parent is None else
               "no calibration data (data.calibration or data.train)" if not has_data else None)
        if why is None:
            from ..architecture import find

            arch = find(parent.model)
            if arch.num_layers() != len(blocks):
                why = f"the torch parent has {arch.num_layers()} blocks, the ONNX graph {len(blocks)}"
        if why is not None:
            import onnx

            proto = onnx.load(str(src / onnx_tools.ONNX_FILE))
            return sensitivity.weight_error(proto, blocks, **grid), {"measure": "int4 weight error (relative)",
                                                                     "why": why}
        ids, _ = self._calibration_inputs(model, ctx)
        scores, reused = sensitivity.cached_block_kl(parent.model, arch, torch.from_numpy(ids),
                                                     batch_size=cfg.calibration_batch_size, **grid)
        return scores, {"measure": "KL from the float model, one block at 4 bits", "tokens": int(ids.size),
                        "from_cache": reused}

    def _torch_parent(self, model: Artifact, ctx: PassContext) -> Artifact | None:
        """The torch model the ONNX input was exported from: the nearest torch checkpoint up its lineage, or
        the source model (ctx.teacher()) when the chain starts there; None if neither can be found."""
        from ..checkpoint import load
        from ..model_card import ancestors

        if model.path is None:
            return None
        for folder, manifest in ancestors(model.path):
            if manifest.get("kind") == "torch":
                return load(folder)
        # no torch step in the chain: the export read the source model itself
        parent = (manifest.get("parent") or {}).get("path")
        return ctx.teacher() if ctx.source is not None and parent == ctx.source else None

    def _check_fits(self, length: int, field: str) -> None:
        """Sequences of `length` tokens fit the graph (else ONNX Runtime fails mid-run: a rotary cache too short)."""
        limit = self._graph_length
        if limit is not None and length > limit:
            raise ConfigError(f"{field}: {length} tokens, more than the {limit} positions this graph holds "
                              f"(export.max_length, or the model's position table); set {field} to at most {limit}")

    def _calibration_inputs(self, model: Artifact, ctx: PassContext):
        import numpy as np

        cfg = self.config
        data = ctx.data
        role = next((r for r in ("calibration", "train") if data is not None and data.specs.get(r) is not None), None)
        if role is None:
            what = cfg.method if cfg.method != "ort-int8-dynamic" else \
                "algorithm gptq" if cfg.algorithm == "gptq" else "smooth_alpha"
            raise ConfigError(f"quantize: {what} needs calibration data: set data.calibration (or data.train) "
                              "in the pipeline config")
        self._check_fits(cfg.calibration_seq_len, "quantize.calibration_seq_len")
        n = cfg.calibration_batches * cfg.calibration_batch_size
        if model.task == "causal-lm":
            windows = data.lm_windows(role, model.tokenizer, seq_len=cfg.calibration_seq_len,
                                      max_tokens=n * cfg.calibration_seq_len).numpy()
            return windows.astype(np.int64), np.ones_like(windows, dtype=np.int64)
        enc = model.tokenizer(data.dataset(role).texts[:n], padding="max_length", truncation=True,
                              max_length=cfg.calibration_seq_len, return_tensors="np")
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)

    def _check(self, model: Artifact, src: Path, dst: Path, ctx: PassContext) -> dict:
        from ..edge import EdgeModel

        cfg, task = self.config, model.task
        ids, mask = onnx_tools.check_inputs(model.tokenizer, task, ctx.data, samples=cfg.check_samples,
                                            seq_len=cfg.check_seq_len, seed=ctx.seed)
        parent = EdgeModel(src, threads=ctx.threads, verify=False)  # loaded, so verified
        parent.task = task
        ref = onnx_tools.outputs_of(parent, task, ids, mask)
        edge = EdgeModel(dst, threads=ctx.threads)
        edge.task = task
        min_agree = cfg.min_agreement if cfg.min_agreement is not None else DEFAULT_MIN_AGREEMENT[task]
        figures = onnx_tools.check(ref, edge, task, ids, mask, max_abs_error=cfg.max_abs_error,
                                   min_agreement=min_agree, section="quantize", what=f"quantize ({cfg.method})")
        figures["reference"] = "parent ONNX model (float)"
        return figures
