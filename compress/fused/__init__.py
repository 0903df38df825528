"""Hand-written ONNX graphs for decoders (few fused nodes per block): llama.py (Llama-shaped: Llama, SmolLM2, Mistral
incl. its sliding window, Qwen2, Qwen3, Phi-3, Gemma 1-3, OLMo 1-3, SmolLM3, Granite, Cohere, EXAONE 4, GLM-4, ERNIE
4.5, Arcee, Apertus, Mixtral, Qwen2/3-MoE, OLMoE, Granite-MoE, gpt-oss), gpt2.py (GPT-2-shaped: GPT-2, OPT, BioGPT,
XGLM), neox.py (LayerNorm, rotary or ALiBi positions, parallel or sequential blocks: GPT-NeoX / Pythia, Phi, Falcon,
GPT-J, CodeGen, BLOOM, MPT, Nemotron); graph.py holds what they share.

`build_fused` picks the writer for a model by its structure (compress.architecture.find), never by model_type;
each writer refuses what it cannot write with UnsupportedModelError naming the part, and the export pass then
falls back to optimum (graph: auto) or stops (graph: fused)."""
from pathlib import Path

from ..architecture import find
from ..errors import UnsupportedModelError
from ..pruning.lowrank import LowRankEmbedding
from .gpt2 import build_gpt2, is_gpt2
from .graph import is_layer_norm, rotary
from .llama import build_llama
from .neox import build_neox


def build_fused(model, path, *, max_length: int | None = None) -> dict:
    """Write path/model.onnx for `model` with the writer for its layout; the figures to record. The graph is
    run once against torch before it is kept (`_SelfCheck`); a graph that fails it is written again under
    the other readings of what the module tree does not say (`_readings`), until one passes or none is left.

    A gated MLP (gate / up / down or a packed gate_up), a mixture of gated experts, or a plain MLP in blocks normed
    otherwise than by LayerNorms (Arcee's RMSNorms) goes to the Llama writer; a plain MLP with a rotary embedding,
    q/k/v packed per head, or no learned position table, to the GPT-NeoX writer (which reads rotary or ALiBi positions
    and refuses a model with neither); the rest (learned positions, one packed [q | k | v] projection or separate q / k
    / v) to the GPT-2 writer."""
    if isinstance(model.get_input_embeddings(), LowRankEmbedding):  # the layout finder would only say 'no embedding'
        raise UnsupportedModelError("fused export: the writers take a plain embedding table, and "
                                    "lowrank.embedding_rank factorized this one (its linear layers alone are fine)")
    try:
        arch = find(model)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"fused export: {exc}") from exc
    refuse_clipped_qkv(model)
    b = arch.blocks[0]
    rms = b.mlp.kind == "plain" and not all(is_layer_norm(arch.module(n)) for n in b.norms)  # the others' LayerNorms
    if arch.moe_blocks() or b.mlp.kind in ("gated", "fused_gated") or rms:  # mixtures of gated experts too
        writer, build = "Llama", build_llama
    elif rotary(model, arch) is not None or not is_gpt2(model, arch):  # rotary or ALiBi (MPT: no position table)
        writer, build = "GPT-NeoX", build_neox
    else:
        writer, build = "GPT-2", build_gpt2
    figures = build(model, path, max_length=max_length, arch=arch)  # a refusal here names a part: final
    check = _SelfCheck(model, writer)
    try:
        check(Path(figures["path"]))
        return figures
    except UnsupportedModelError as exc:
        first = exc  # what a user is told if no other reading agrees either
    for reading in _readings(build, b, "alibi" in figures)[1:]:
        try:
            figures = build(model, path, max_length=max_length, arch=arch, **reading)
            check(Path(figures["path"]))
            return figures
        except UnsupportedModelError:
            continue
    raise first


def refuse_clipped_qkv(model) -> None:
    """OLMo and MPT may clamp q/k/v to +-clip_qkv (a config field; MPT's under attn_config), which no writer
    writes, and 2 x 8 random tokens of the self-check need not reach the bound: refused by the field."""
    cfg = model.config
    attn = getattr(cfg, "attn_config", None)
    clip = getattr(cfg, "clip_qkv", None) or (attn.get("clip_qkv") if isinstance(attn, dict)
                                              else getattr(attn, "clip_qkv", None))
    if clip:
        raise UnsupportedModelError(f"fused export: {type(model).__name__} clamps q/k/v to +-{clip} (clip_qkv), "
                                    "which the writers do not write")


def _readings(build, b, alibi: bool) -> list[dict]:
    """The writer's arguments to try, in turn, for what the module tree does not say and the logits do: whether
    the rotary embedding turns channel pairs (GLM, Helium) rather than halves, where the ALiBi bias is added
    (before the scaling: Falcon), whether one packed q/k/v projection holds chunks of [q v k] (CodeGen's four)."""
    if build is build_gpt2:  # no rotary embedding: nothing else to try
        return [{}]
    if alibi:
        return [{}, {"alibi_scaled": True}]
    chunks = [{"qkv_chunks": 4}, {"qkv_chunks": 4, "interleaved": True}] if (
        build is build_neox and b.attn.qkv_layout == "blocks") else []
    return [{}, {"interleaved": True}, *chunks]


class _SelfCheck:
    """The writers check the layout part by part (compress.architecture.find, graph.probe_block); what no part
    shows (how a packed projection orders its rows, arithmetic inside an attention module) shows in the
    logits. So 2 x 8 tokens go through torch (once, for every reading) and ONNX Runtime, and a graph whose
    logits differ, or that ONNX Runtime cannot run, is deleted and refused (export's graph: auto then writes
    optimum's)."""

    def __init__(self, model, writer: str):
        import torch

        self.name, self.writer = type(model).__name__, writer
        vocab = model.get_output_embeddings().weight.shape[0]
        self.ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
        device = next(model.parameters()).device
        with torch.no_grad():
            self.ref = model(input_ids=self.ids.to(device), attention_mask=torch.ones_like(self.ids).to(device),
                             use_cache=False).logits.float().cpu().numpy()

    def __call__(self, onnx_file: Path) -> None:
        import numpy as np

        from ..edge import EdgeModel

        ids = self.ids.numpy()
        try:
            got = EdgeModel(onnx_file.parent, verify=False).logits(ids, np.ones_like(ids))
        except Exception as exc:  # noqa: BLE001 - an op's own limits (ONNX Runtime's errors): refused, nothing left
            _remove(onnx_file)
            raise UnsupportedModelError(f"fused export: ONNX Runtime cannot run the {self.writer} writer's graph of "
                                        f"{self.name} ({type(exc).__name__}: {exc})") from exc
        err = float(np.abs(got - self.ref).max())
        if not err <= 1e-3 * max(1.0, float(np.abs(self.ref).max())):  # fp32 both ways: rounding is ~1e-5
            _remove(onnx_file)
            raise UnsupportedModelError(f"fused export: the {self.writer} writer's graph gives logits {err:.3g} "
                                        f"away from torch's on {self.name}: it has something the writer does not "
                                        "write (a config option, a module inside a block)")


def _remove(onnx_file: Path) -> None:
    for f in (onnx_file, onnx_file.with_name(onnx_file.name + ".data")):
        f.unlink(missing_ok=True)


__all__ = ["build_fused", "build_gpt2", "build_llama", "build_neox"]
