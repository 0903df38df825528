"""export: torch -> ONNX, with a torch-vs-ONNX discrepancy check.

Two writers. Decoders whose structure the suite's own writers know (compress/fused, chosen through
compress.architecture, whatever the model_type: Llama-shaped ones incl. SmolLM2, Mistral with its sliding window, Qwen2,
Qwen3, Phi-3, Gemma 1-3, OLMo 1-2, SmolLM3, Granite, Cohere 1-2, EXAONE 4, Mixtral, Qwen2/3-MoE, OLMoE; GPT-2- and
GPT-NeoX-shaped ones) become a fused graph: GroupQueryAttention (rotary inside), packed QKV, skip RMSNorms / LayerNorms,
about 8-11 nodes per block (up to 21: q/k norms and norms after attention and MLP, Qwen2-MoE's shared expert), and
compress.edge runs it with a copy-free KV cache. Everything else (encoders, other layouts, variants a writer refuses,
decoders without past) goes through optimum's exporter, a traced graph with thousands of shape ops for a decoder;
BERT-family encoders then get ONNX Runtime's fusions by default (`optimize: auto`). `graph: auto` picks the fused writer
where it applies and records why it did not otherwise.

The output is an edge bundle: model.onnx (+ model.onnx.data for graphs over 64 MB), config.json, the
tokenizer (written by the runner), edge_runner.py (compress/edge.py, runs with onnxruntime + numpy +
tokenizers only) and the manifest with the check's figures."""
from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Literal, Union

import torch
from pydantic import Field, model_validator

from .. import onnx_tools
from ..checkpoint import Artifact, as_float32
from ..errors import UnsupportedModelError
from ..models import check_length
from ..options import search
from . import register
from .base import Pass, PassConfig, PassContext

# optimum's task names for the suite's tasks
OPTIMUM_TASKS = {"causal-lm": "text-generation", "sequence-classification": "text-classification",
                 "feature-extraction": "feature-extraction"}


class ExportConfig(PassConfig):
    format: Literal["onnx"] = Field("onnx", description="export format (ONNX is the only one)")
    graph: Literal["auto", "fused", "optimum"] = Field(
        "auto", description="decoders: fused = the suite's own graph (GroupQueryAttention, 8-21 nodes per block, "
        "copy-free KV cache; Llama-, GPT-2- and GPT-NeoX-shaped decoders: SmolLM2, Mistral, Qwen2/3, Phi-3, "
        "Gemma 1-3, OLMo 1-2, SmolLM3, Granite, Cohere 1-2, EXAONE 4, GPT-2, OPT, BioGPT, Pythia, Phi, Falcon, "
        "GPT-J, CodeGen, BLOOM, MPT, Mixtral, Qwen2/3-MoE, OLMoE, ...); optimum = optimum's traced export; "
        "auto = fused where the model is supported, else optimum, with the reason in the manifest",
        json_schema_extra=search(["fused", "optimum"]))
    max_length: int | None = Field(None, ge=2, description="fused graphs: longest prompt + generation (the "
                                   "rotary cache length; GPT-2: at most its n_positions); default the model's "
                                   "max_position_embeddings (ALiBi models without one, BLOOM: 2,048; longrope: "
                                   "original_max_position_embeddings, the positions of its short factors)")
    with_past: bool = Field(True, description="decoders: export past key values as inputs/outputs so "
                            "generation is incremental (one model.onnx for prefill and decode)")
    opset: int | None = Field(None, ge=14, le=20, description="ONNX opset of optimum's exporter (torch's exports "
                              "14 to 20); default: optimum's choice for the architecture. The fused graph is opset 17: "
                              "under graph: auto another opset takes optimum's exporter")
    optimize: Union[bool, Literal["auto"]] = Field(
        "auto", description="optimum graphs: apply ONNX Runtime's transformer fusions (Attention, "
        "SkipLayerNormalization, BiasGelu / FastGelu, EmbedLayerNormalization; RMSNorm / rotary for decoders), "
        "validated by the discrepancy check; the fused op counts go into the manifest (info.optimization). "
        "auto = on for BERT-family encoders and classifiers, off for optimum's decoder graphs; under auto a "
        "fusion that fails or breaks the check leaves the plain graph, with a note. true = always, and a "
        "failure is an error; false = never. (A graph: fused decoder is fused already.)")
    external_data: Literal["auto", "always", "never"] = Field(
        "auto", description="weights in model.onnx.data: auto = for graphs over 64 MB (ONNX Runtime reads them "
        "from the file instead of copying them out of the parsed graph: less peak memory), always, or never "
        "(one file; fails over the 2 GB protobuf limit)")
    check_samples: int = Field(4, ge=1, description="sequences in the discrepancy check")
    check_seq_len: int = Field(32, ge=2, description="tokens per sequence in the discrepancy check")
    max_abs_error: float | None = Field(1e-2, gt=0, description="fail if any output differs from torch by "
                                        "more than this (null: report only)")
    min_agreement: float | None = Field(0.98, ge=0, le=1, description="fail if top-1 agreement (LM, "
                                        "classifier) or the worst embedding cosine (encoder) is below this")

    @model_validator(mode="after")
    def _check_fits(self):
        if self.max_length is not None and self.check_seq_len > self.max_length:  # the graph holds max_length
            raise ValueError(f"check_seq_len {self.check_seq_len} is longer than max_length {self.max_length}, so the "
                             f"graph could not run the check; set check_seq_len to at most {self.max_length}")
        if self.max_length is not None and (self.graph == "optimum" or not self.with_past):
            which = "graph: optimum" if self.graph == "optimum" else "with_past: false"
            raise ValueError(f"max_length sizes the fused decoder graph, which {which} does not write; drop "
                             "max_length (the graph holds the model's positions)")
        if self.graph == "fused" and "optimize" in self.model_fields_set:  # set by the user, and ignored
            raise ValueError("optimize applies ONNX Runtime's fusions to optimum's graph, which graph: fused does not "
                             "write (the fused graph is fused already); drop optimize, or use graph: auto or optimum")
        if self.graph == "fused" and self.opset is not None and self.opset != _fused_opset():
            raise ValueError(f"opset {self.opset}: the fused graph is written in opset {_fused_opset()}; drop opset, "
                             "or use graph: optimum (or auto) for another opset")
        return self


def _fused_opset() -> int:
    from ..fused.graph import OPSET

    return OPSET


@register
class Export(Pass):
    name = "export"
    description = ("Export to ONNX (the fused decoder graph, or optimum's; decoders with KV cache), optional ORT "
                   "fusions, discrepancy check")
    Config = ExportConfig
    version = 7  # 2: the fused graph's logits_to_keep input; weights of graphs over 64 MB in model.onnx.data;
    # 3: gate and up packed into one MatMul; 4: rotary caches computed at session start, Gemma 2 / 3, OLMo 2,
    # SmolLM3 fused; 5: BLOOM, Falcon with alibi, GPT-J, CodeGen fused (their stored steps held optimum's graph);
    # 6: MPT, OLMo (1), BioGPT and mixtures of experts (ONNX Runtime's MoE op) fused; 7: Falcon-40B / Falcon2,
    # Cohere's q / k norms, Granite-MoE, gpt-oss, longrope, Arcee, Nemotron, Apertus and XGLM fused
    quantized_input_fix = ("export the float model and quantize on the ONNX side afterwards "
                           "(quantize: {method: ort-int8-dynamic})")

    def output_kind(self) -> str:
        return "onnx"

    def check_task(self, task: str) -> str | None:
        if self.config.max_length is not None and task != "causal-lm":
            return (f"export.max_length: a {task} model exports through optimum (the fused graph is for causal "
                    "LMs), which holds the model's positions; drop max_length")
        if self.config.graph == "fused" and task != "causal-lm":
            return (f"export.graph: fused: the fused writer handles causal LMs, this is a {task} model; use "
                    "graph: auto or graph: optimum")
        return None

    def apply(self, model: Artifact, ctx: PassContext) -> Artifact:
        import onnx

        from ..edge import EdgeModel

        cfg = self.config
        torch_model = as_float32(model.model).eval().to("cpu")  # no-op for the fp32 models this accepts
        task = model.task
        decoder = task == "causal-lm"
        optimum_task = OPTIMUM_TASKS[task] + ("-with-past" if decoder and cfg.with_past else "")
        if not (cfg.max_length and decoder and cfg.with_past and cfg.graph != "optimum"):
            # the graph holds the model's positions (only a fused graph's max_length can hold more)
            check_length(torch_model, cfg.check_seq_len, "export.check_seq_len")

        ctx.scratch.mkdir(parents=True, exist_ok=True)
        out = Path(tempfile.mkdtemp(prefix="export-", dir=ctx.scratch))
        raw = Path(tempfile.mkdtemp(prefix="export-raw-", dir=ctx.scratch))
        try:
            info = self._write(torch_model, raw, task, optimum_task)
            graph = onnx.load(str(raw / onnx_tools.ONNX_FILE))  # external data, if any, loaded too
            info["opset"] = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None)
            dynamic = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim if d.dim_param]
                       for i in graph.graph.input}
            info["dynamic_axes"] = {k: v for k, v in dynamic.items()
                                    if not k.startswith("past_key_values.") or k == "past_key_values.0.key"}
            if info["graph"] == "optimum":  # the fused writers store a tied table once themselves
                saved = onnx_tools.tie_transposed_initializers(graph)
                if saved:
                    info["tied_transposed_bytes"] = saved
            onnx_tools.save_model(graph, out, cfg.external_data)
            del graph
            onnx_tools.copy_bundle(raw, out)
        finally:
            shutil.rmtree(raw, ignore_errors=True)
        info["with_past"] = decoder and cfg.with_past
        plain = self._optimize(out, torch_model.config, task, info, ctx) if info["graph"] == "optimum" else None
        onnx_tools.copy_edge_runner(out)

        ids, mask = onnx_tools.check_inputs(model.tokenizer, task, ctx.data, samples=cfg.check_samples,
                                            seq_len=cfg.check_seq_len,
                                            vocab_size=getattr(torch_model.config, "vocab_size", None),
                                            seed=ctx.seed)
        ref = onnx_tools.torch_outputs(torch_model, task, ids, mask)
        edge = EdgeModel(out, threads=ctx.threads)
        edge.task = task
        try:
            info["discrepancy"] = onnx_tools.check(ref, edge, task, ids, mask, max_abs_error=cfg.max_abs_error,
                                                   min_agreement=cfg.min_agreement, section="export")
        except onnx_tools.DiscrepancyError as exc:
            if info["graph"] == "fused" and cfg.graph == "auto":  # optimum's graph instead, saying why
                del edge
                shutil.rmtree(out, ignore_errors=True)
                return self._optimum_instead(model, ctx, f"the fused graph failed the discrepancy check ({exc})")
            if plain is None:  # nothing to fall back to (no fusion, or optimize: true)
                raise
            del edge
            for f in out.iterdir():  # back to the unfused graph
                if f.name.startswith(onnx_tools.ONNX_FILE):
                    f.unlink()
            for f in plain.iterdir():
                shutil.move(str(f), out / f.name)
            info["optimization"].update(applied=False, rejected_figures=str(exc))
            info["optimization"]["notes"].append("the fused graph failed the discrepancy check; the unfused "
                                                 "graph is kept")
            edge = EdgeModel(out, threads=ctx.threads)
            edge.task = task
            info["discrepancy"] = onnx_tools.check(ref, edge, task, ids, mask, max_abs_error=cfg.max_abs_error,
                                                   min_agreement=cfg.min_agreement, section="export")
        finally:
            if plain is not None:
                shutil.rmtree(plain, ignore_errors=True)
        info["nodes"] = len(onnx.load(str(out / onnx_tools.ONNX_FILE), load_external_data=False).graph.node)  # as kept
        info["onnx_bytes"] = onnx_tools.onnx_size(out)
        info["external_data"] = (out / onnx_tools.EXTERNAL_DATA).exists()
        if model.structure:  # torch-side structure is baked into the graph; kept as lineage only
            info["torch_structure"] = model.structure
        return model.derive(kind="onnx", model=None, onnx_dir=out, structure=[], info=info)

    def _optimum_instead(self, model: Artifact, ctx: PassContext, why: str) -> Artifact:
        """graph: auto's fallback for a fused graph that failed the discrepancy check: the export again with
        optimum's graph, the reason in its manifest and printed, as for a model the fused writer refuses."""
        out = type(self)(self.config.model_copy(update={"graph": "optimum"})).apply(model, ctx)
        self._fallback(out.info, why)
        return out

    def _fallback(self, info: dict, why: str, lead: str = "") -> None:
        """Why graph auto wrote optimum's graph: in the manifest, and as a note the runner prints."""
        info["fused_fallback"] = why
        info["note"] = (f"graph auto wrote optimum's graph (slower to decode): {lead}{why}"
                        + (f"; max_length {self.config.max_length} does not apply to it"
                           if self.config.max_length is not None else ""))

    def _optimize(self, out: Path, config, task: str, info: dict, ctx: PassContext) -> Path | None:
        """ONNX Runtime's fusions on an optimum graph as `optimize` says; figures and notes into
        info["optimization"]. Under auto returns a copy of the unfused graph (to restore if the fused one
        fails the check), else None."""
        cfg = self.config
        wanted, reason = onnx_tools.fusion_choice(cfg.optimize, task, config.model_type)
        if not wanted:
            info["optimization"] = {"applied": False, "reason": reason}
            return None
        plain = None
        if cfg.optimize == "auto":
            plain = Path(tempfile.mkdtemp(prefix="export-plain-", dir=ctx.scratch))
            for f in out.iterdir():
                if f.name.startswith(onnx_tools.ONNX_FILE):
                    shutil.copy2(f, plain / f.name)
        try:
            figures = onnx_tools.optimize_graph(
                out, config.model_type, getattr(config, "num_attention_heads", 0) or 0,
                getattr(config, "hidden_size", 0) or 0, cfg.external_data,
                max_positions=getattr(config, "max_position_embeddings", None), task=task)
        except Exception as exc:  # noqa: BLE001 - the optimizer raises anything; auto keeps the plain graph
            if plain is None:
                raise
            for f in plain.iterdir():  # the graph as it was, whatever the optimizer left
                shutil.move(str(f), out / f.name)
            shutil.rmtree(plain, ignore_errors=True)
            info["optimization"] = {"applied": False, "reason": reason,
                                    "notes": [f"ONNX Runtime's optimizer failed ({type(exc).__name__}: {exc}); "
                                              "the unfused graph is kept"]}
            return None
        info["optimization"] = {"applied": True, "reason": reason, **figures}
        for note in figures["notes"]:
            warnings.warn(f"export: {note}", stacklevel=2)
        return plain

    def _write(self, torch_model, folder: Path, task: str, optimum_task: str) -> dict:
        """Write folder/model.onnx and config.json with the writer `graph` selects; the figures to record."""
        cfg = self.config
        fallback = None
        if cfg.graph != "optimum":
            if task != "causal-lm":
                fallback = f"the fused writer handles causal LMs, this is a {task} model"
            elif not cfg.with_past:
                fallback = "with_past: false (a fused graph always carries the KV cache)"
            elif cfg.opset is not None and cfg.opset != _fused_opset():
                fallback = f"opset: {cfg.opset} (the fused graph is written in opset {_fused_opset()})"
            else:
                from ..fused import build_fused

                try:
                    figures = build_fused(torch_model, folder, max_length=cfg.max_length)
                except UnsupportedModelError as exc:
                    fallback = str(exc)
                else:
                    torch_model.config.save_pretrained(folder)
                    if getattr(torch_model, "generation_config", None) is not None:
                        torch_model.generation_config.save_pretrained(folder)
                    for duplicate in ("path", "nodes"):  # the folder moves; info["nodes"] counts them
                        figures.pop(duplicate)
                    return {"graph": "fused", "fused": figures}
            if cfg.graph == "fused":
                raise UnsupportedModelError(f"export.graph: fused: {fallback}; use graph: auto (optimum where "
                                            "the fused writer does not apply) or graph: optimum")
        self._export(torch_model, folder, optimum_task)
        info = {"graph": "optimum", "optimum_task": optimum_task}
        if fallback and task == "causal-lm":
            self._fallback(info, fallback, lead="the fused writer does not take this model: ")
        return info

    def _export(self, torch_model, folder: Path, optimum_task: str) -> None:
        from optimum.exporters.onnx import onnx_export_from_model

        try:
            # A model object, not a path: non-stock structure (low-rank factors, pruned widths) exports as is.
            with warnings.catch_warnings():
                # The tracer's notes on shape-dependent Python branches are expected for HF models; the
                # discrepancy check afterwards is what tells whether the graph is right.
                warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
                warnings.filterwarnings("ignore", message=".*aten::index.*", category=UserWarning)
                onnx_export_from_model(torch_model, folder, task=optimum_task, opset=self.config.opset,
                                       do_validation=False)  # our own check below is stricter and recorded
        except (ValueError, KeyError) as exc:
            raise UnsupportedModelError(
                f"export: optimum cannot export this {torch_model.config.model_type} model for {optimum_task}: "
                f"{exc}") from exc
        except RuntimeError as exc:  # the trace failed inside the model: optimum's dummy inputs do not fit it
            if isinstance(exc, torch.OutOfMemoryError):
                raise
            hint = "; export: {with_past: false} exports it without the KV cache" if "with-past" in optimum_task else ""
            raise UnsupportedModelError(
                f"export: optimum's exporter fails on this {torch_model.config.model_type} model for {optimum_task} "
                f"({type(exc).__name__}: {str(exc)[:200]}){hint}") from exc
