"""Fake quantization for quantization-aware distillation (QAD): the student's weights seen in the forward pass
exactly as the ONNX export + `quantize: {method: ort-int8-dynamic, kernel: matmulnbits}` path stores them.

Grids reproduced bit for bit (checked against ONNX Runtime in tests/test_qad.py):
- Linear / Conv1D weights -> MatMulNBits (ONNX Runtime's blockwise RTN, `quantize_matmul_{4,8}bits`): blocks of
  `block_size` along the input dimension K (the last block zero-padded), per output column, in float32:
    symmetric:  m = the block's value of largest magnitude, sign kept (the minimum on a |max| == |min| tie),
                s = m / -2^(b-1), z = 2^(b-1)
    asymmetric: lo = min(min, 0), hi = max(max, 0), s = (hi - lo) / (2^b - 1), z = clamp(roundf(-lo / s))
    q = clamp(roundf(w * (1 / s) + z), 0, 2^b - 1)  (roundf: halves away from zero; 1/s = 0 when s = 0),
    w_hat = (q - z) * s.
- `algorithm: minmax` (llama.cpp's Q4_1 grid): 4-bit blocks spanning exactly [min, max] of the block, the
  minimum kept as a float offset; stored as MatMulNBits codes around the default zero point 8 plus the
  per-block offsets (compress/quant/ort.py `_minmax_4bit`, `minmax_grid` below):
    s = (max - min) / 15, q = clamp(round_half_even((w - min) * (1 / s)), 0, 15)  (1/s = 0 when s = 0),
    offset = fp16(min + 8 s), w_hat = (q - 8) s + offset.
  A weight already on such a grid (a dequantized Q4_1 GGUF) is reproduced exactly, up to fp16's rounding of
  the offset and, where quantize's `offset_roundings` folds the offsets into the weights as rows (ort.py
  `_fold_offsets`), their 4-bit roundings (within 1/14^roundings of the largest offset of each group of
  block_size blocks).
- Embedding tables read by a Gather, and a tied LM head (the same table) -> int8 blocks of compress/quant/ort.py
  `_quantize_tables`: s = max(absmax / 127, 1e-12) per block of the row, q = clip(round_half_even(w / s), -127, 127),
  w_hat = q * s; with `embedding_bits` 4, MatMulNBits' symmetric 4-bit RTN grid above in blocks of `block_size`.
- An untied LM head at 4 bits -> 8-bit symmetric MatMulNBits (ort.weight_only keeps the head at 8 bits).

Use: `wrap(model, spec)` before training (torch parametrizations, so the optimizer keeps training the plain
float weights), `unwrap(model)` after it: the weights are projected onto their grid in place (so the saved
checkpoint's weights are exactly representable and the quantize pass reproduces them: its RTN of a grid weight
gives the same codes) and the model is a plain one again (same modules, same Parameters, ties kept)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..architecture import is_conv1d, is_linear

@dataclass(frozen=True)
class GridSpec:
    """What the quantize pass will do: MatMulNBits bits, block size, algorithm (rtn: symmetric or not; minmax)
    and embedding tables (int8, or 4-bit symmetric RTN in blocks of `block_size`)."""

    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    embeddings: bool = True
    algorithm: str = "rtn"
    embedding_bits: int = 8

    def as_dict(self) -> dict:
        return asdict(self)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (halves away from zero), exactly: x - floor(x) is exact in float32, floor(x + 0.5) is not."""
    f = torch.floor(x)
    up = torch.where(x >= 0, x - f >= 0.5, x - f > 0.5)
    return f + up.to(x.dtype)


def blockwise_grid(w: torch.Tensor, bits: int, block_size: int, symmetric: bool):
    """ONNX Runtime's MatMulNBits RTN of `w` [N, K] (torch's [out, in]) in blocks along K.
    Returns (codes [N, blocks, block], scales [N, blocks], zero points [N, blocks]), all float32."""
    n, k = w.shape
    pad = (-k) % block_size
    x = nn.functional.pad(w.detach().float(), (0, pad)).reshape(n, -1, block_size)
    top = (1 << bits) - 1
    if symmetric:
        mid = float(1 << (bits - 1))
        hi, lo = x.amax(-1), x.amin(-1)
        m = torch.where(hi.abs() > lo.abs(), hi, lo)
        scale = m / -mid
        zero = torch.full_like(scale, mid)
    else:
        lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
        scale = (hi - lo) / float(top)
        zf = torch.where(scale != 0, -lo / torch.where(scale != 0, scale, 1.0), lo)
        zero = torch.where(zf < 0, 0.0, torch.where(zf > top, float(top), _roundf(zf)))
    inv = torch.where(scale != 0, 1.0 / torch.where(scale != 0, scale, 1.0), 0.0)
    codes = _roundf(x * inv[..., None] + zero[..., None]).clamp(0, top)
    return codes, scale, zero


def minmax_grid(w: torch.Tensor, block_size: int):
    """The `minmax` 4-bit grid of `w` [N, K] (K a multiple of `block_size`): (codes [N, blocks, block],
    scales [N, blocks], offsets [N, blocks] already rounded to fp16), all float32."""
    n, k = w.shape
    if k % block_size:
        raise ValueError(f"minmax: the input dimension {k} is not a multiple of the block size {block_size}")
    x = w.detach().float().reshape(n, -1, block_size)
    lo, hi = x.amin(-1), x.amax(-1)
    scale = (hi - lo) / 15.0
    inv = torch.where(scale != 0, 1.0 / torch.where(scale != 0, scale, 1.0), 0.0)
    codes = torch.round((x - lo[..., None]) * inv[..., None]).clamp(0, 15)
    return codes, scale, (lo + 8.0 * scale).half().float()


def dequantize_minmax(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return ((codes - 8.0) * scale[..., None] + offset[..., None]).reshape(codes.shape[0], -1)


def dequantize_blockwise(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, k: int) -> torch.Tensor:
    return ((codes - zero[..., None]) * scale[..., None]).reshape(codes.shape[0], -1)[:, :k]


def table_grid(w: torch.Tensor, block_size: int):
    """compress/quant/ort.py's int8 embedding table of `w` [rows, width]: (codes, scales [rows, blocks]).
    The scales are fp16 values (stored as fp16, as llama.cpp's Q8_0 stores them), returned as float32."""
    x = w.detach().float().reshape(w.shape[0], -1, block_size)
    scale = (x.abs().amax(-1) / 127.0).clamp(2.0 ** -24, 65504.0).half().float()  # fp16's range, then its grid
    return torch.round(x / scale[..., None]).clamp(-127, 127), scale  # torch.round = numpy's: half to even


def table_block(width: int) -> int | None:
    """Block size of an int8 embedding table (compress/quant/ort.py `_quantize_tables`): 32 where it divides
    the row width, else 16 (sizes MatMulNBits and GatherBlockQuantized both take); None if neither does (the
    table stays float). 32 is llama.cpp's Q8_0 block, so a table that came from a GGUF file (the packaged
    SmolLM2's) is stored again exactly (its int8 perplexity +0.5% instead of +0.6% with blocks of 64); with fp16
    scales (table_grid) that costs no more bytes than blocks of 64 with float32 scales."""
    return next((block for block in (32, 16) if width % block == 0), None)


class _STE(torch.autograd.Function):
    """Forward: the grid weight; backward: the gradient unchanged (straight through, see FakeQuant)."""

    @staticmethod
    def forward(ctx, w, w_hat):
        return w_hat

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class FakeQuant(nn.Module):
    """A parametrization: weight -> its dequantized grid value (forward), identity gradient (backward).

    The gradient is passed through everywhere, also for the few values RTN clips: the range is the block's own
    max (recomputed from the weights, as the quantizer will), so nothing lies structurally outside it; only in
    the symmetric grid can values of the other sign exceed the top code, by under half a step, and zeroing their
    gradient would only freeze them. The scales are not learned: ORT recomputes them from the weights."""

    def __init__(self, kind: str, bits: int = 8, block_size: int = 32, symmetric: bool = True,
                 transposed: bool = False):
        super().__init__()
        self.kind, self.bits, self.block_size, self.symmetric, self.transposed = (
            kind, bits, block_size, symmetric, transposed)

    def grid(self, w: torch.Tensor) -> torch.Tensor:
        """The dequantized grid value of `w` (in its own layout and dtype), no gradient."""
        with torch.no_grad():
            x = w.t() if self.transposed else w  # a Conv1D stores [in, out]: blocks still run along `in`
            if self.kind == "table" and self.bits == 8:
                codes, scale = table_grid(x, self.block_size)
                out = (codes * scale[..., None]).reshape(x.shape)
            elif self.kind == "minmax":
                out = dequantize_minmax(*minmax_grid(x, self.block_size))
            else:  # blockwise, and a 4-bit table (MatMulNBits' symmetric grid)
                codes, scale, zero = blockwise_grid(x, self.bits, self.block_size, self.symmetric)
                out = dequantize_blockwise(codes, scale, zero, x.shape[1])
            return (out.t() if self.transposed else out).to(w.dtype)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _STE.apply(w, self.grid(w))

    def extra_repr(self) -> str:
        return f"{self.kind}, bits={self.bits}, block_size={self.block_size}, symmetric={self.symmetric}"


def plan(model: nn.Module, spec: GridSpec) -> dict[str, FakeQuant]:
    """Module name -> the grid the export + quantize path gives its weight (modules left float are absent)."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and embed is not None and head.weight is embed.weight
    table = table_block(embed.weight.shape[1]) if spec.embeddings and isinstance(embed, nn.Embedding) else None
    # a 4-bit table: only where ort._quantize_tables can store one (width a multiple of the block; every reader a
    # Gather or the tied head, as in every causal LM the exporters write), else int8
    four = table and spec.embedding_bits == 4 and embed.weight.shape[1] % spec.block_size == 0
    out: dict[str, FakeQuant] = {}
    for name, m in model.named_modules():
        if m is embed or (m is head and tied):
            if four:  # the Gather and a tied head's MatMul read one table
                out[name] = FakeQuant("table", 4, spec.block_size)
            elif table:
                out[name] = FakeQuant("table", 8, table)
        elif is_linear(m):
            # an untied head stays 8-bit symmetric at 4 bits (ort.weight_only), else the MatMuls' own grid
            if m is head and spec.bits == 4:
                out[name] = FakeQuant("blockwise", 8, spec.block_size, True, transposed=is_conv1d(m))
            elif spec.algorithm == "minmax":
                out[name] = FakeQuant("minmax", 4, spec.block_size, transposed=is_conv1d(m))
            else:
                out[name] = FakeQuant("blockwise", spec.bits, spec.block_size, spec.symmetric,
                                      transposed=is_conv1d(m))
    return out


def wrap(model: nn.Module, spec: GridSpec) -> dict:
    """Fake-quantize the weights of `model` in place (convert). Returns a summary for the manifest."""
    if is_wrapped(model):
        raise ValueError("the model is fake-quantized already")
    grids = plan(model, spec)
    modules = dict(model.named_modules())
    for name, fq in grids.items():
        parametrize.register_parametrization(modules[name], "weight", fq)
    kinds: dict[str, int] = {}
    for fq in grids.values():
        key = f"int{fq.bits} tables" if fq.kind == "table" else f"{fq.bits}-bit {fq.kind}"
        kinds[key] = kinds.get(key, 0) + 1
    return {**spec.as_dict(), "modules": kinds}


def is_wrapped(model: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m, "weight") for m in model.modules())


def unwrap(model: nn.Module) -> dict:
    """Project every fake-quantized weight onto its grid in place and remove the wrapping (restore): the model
    is plain again, its Parameters the same objects (a tied head stays tied). Returns the projection's size."""
    done: set[int] = set()
    moved, largest, off_grid = 0, 0.0, 0
    for m in list(model.modules()):
        if not parametrize.is_parametrized(m, "weight"):
            continue
        fq = m.parametrizations.weight[0]
        original = m.parametrizations.weight.original
        if id(original) not in done:  # a tied table is projected once (a second pass could move it by an ulp)
            done.add(id(original))
            with torch.no_grad():
                grid = project(fq, original)
                off_grid += not torch.equal(fq.grid(grid), grid)
                largest = max(largest, float((grid - original).abs().max()))
                moved += int((grid != original).sum())
                original.copy_(grid)
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
    return {"projected_weights": len(done), "values_moved": moved, "max_projection_change": largest,
            "off_grid": off_grid}


def project(fq: FakeQuant, w: torch.Tensor, rounds: int = 32) -> torch.Tensor:
    """`w` moved onto its grid: a weight the quantizer maps to itself, codes and scales, so the quantize pass
    adds no rounding. One step is enough for the symmetric grids (the extreme value is a code times the scale
    exactly) and the int8 tables; an asymmetric block can land its minimum half a step off code 0 (zero-point
    rounding) and a minmax block its offset an fp16 rounding off, which moves its range, so those grids are
    repeated until they stop moving."""
    grid = fq.grid(w)
    for _ in range(rounds if fq.kind == "minmax" or (fq.kind == "blockwise" and not fq.symmetric) else 0):
        again = fq.grid(grid)
        if torch.equal(again, grid):
            break
        grid = again
    return grid


def grid_settings(artifact) -> dict | None:
    """The QAD grid recorded on `artifact` or the nearest checkpoint before it (a distill / prune-recover
    `quantize_aware` record), or None."""
    from ..model_card import lineage

    records = [artifact.info or {}]
    if artifact.path is not None:
        records += [s["info"] for s in reversed(lineage(artifact.path)[1])]
    for info in records:
        found = info.get("quantize_aware") or (info.get("recover") or {}).get("quantize_aware")
        if found:
            return found
    return None


def grid_mismatch(artifact, *, bits: int, block_size: int, symmetric: bool, algorithm: str = "rtn",
                  embeddings: bool = True, embedding_bits: int = 8) -> str | None:
    """For the quantize pass (ort-int8-dynamic, matmulnbits): a sentence saying how its settings differ from
    the grid the model was distilled on (quantization-aware), or None when they agree or there was no QAD."""
    qad = grid_settings(artifact)
    if qad is None:
        return None
    trained = {"algorithm": "rtn", "embedding_bits": 8, **qad}  # records written before these options existed
    want = {"algorithm": algorithm, "bits": bits, "block_size": block_size, "embeddings": embeddings,
            "embedding_bits": embedding_bits}
    if algorithm == trained["algorithm"] == "rtn":  # minmax has one grid; other algorithms differ anyway
        want["symmetric"] = symmetric
    diff = [f"{k} {want[k]} (trained for {trained.get(k)})" for k in want if trained.get(k) != want[k]]
    if not diff:
        return None
    return ("quantize: the model was distilled quantization-aware for another grid: " + ", ".join(diff) +
            "; its weights get a second rounding. Quantize with the distill pass's quantize_aware settings")
