"""ONNX-side quantization with ONNX Runtime's tools: dynamic int8, weight-only int8/int4 (MatMulNBits),
static QDQ int8 (calibrated) and fp16. Each function reads folder/model.onnx and writes another folder.

Node exclusion takes glob patterns over ONNX node names (e.g. ``*lm_head*``, ``/model/layers.0/*``) or
over the names of the node's weight initializers (``*embed_tokens*``), so users can name torch modules."""
from __future__ import annotations

import contextlib
import fnmatch
import io
import logging
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from .. import onnx_tools
from ..errors import ConfigError
from .fake import blockwise_grid, minmax_grid, table_block, table_grid


def matching_nodes(model, patterns: list[str], op_types: tuple[str, ...] | None = None) -> list[str]:
    """Names of the nodes (of `op_types`, if given) whose name or a weight's name matches a pattern."""
    weights = {i.name for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if op_types and node.op_type not in op_types:
            continue
        names = [node.name, *(i for i in node.input if i in weights)]
        if any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names):
            out.append(node.name)
    return out


def matches_a_node(src: Path, patterns: list[str]) -> bool:
    """Whether any node of the graph in folder `src` matches a pattern (by its name or a weight's)."""
    import onnx

    model = onnx.load(str(Path(src) / onnx_tools.ONNX_FILE), load_external_data=False)
    _named_nodes(model)  # the names the quantizers see
    return bool(matching_nodes(model, patterns))


def lm_head_nodes(model) -> list[str]:
    """The MatMul producing `logits` (the LM head), found by walking back from the output."""
    producers = {o: n for n in model.graph.node for o in n.output}
    name = "logits"
    for _ in range(6):  # through a Reshape / Cast, or a scale and a soft-cap (Mul, Div, Tanh, Mul)
        node = producers.get(name)
        if node is None:
            return []
        if node.op_type in ("MatMul", "Gemm", "MatMulNBits", "MatMulInteger"):
            return [node.name]
        name = node.input[0]
    return []


@contextlib.contextmanager
def _printed_to_log():
    """What ONNX Runtime's quantizers print (calibration progress, k_quant / gptq progress bars) goes to the
    log, which a run writes to run.log (compress/logs.py), instead of the terminal."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            yield
    finally:
        if out.getvalue().strip():
            logging.getLogger("onnxruntime.quantization").info(out.getvalue().strip())


def _named_nodes(model) -> None:
    """ORT's quantizers address nodes by name: give unnamed ones a name."""
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"


QUANTIZABLE = ("MatMul", "Gemm", "Gather", "Attention", "Conv")


def _load(src: Path):
    import onnx

    model = onnx.load(str(Path(src) / onnx_tools.ONNX_FILE))
    _named_nodes(model)
    del model.graph.value_info[:]  # stale shape info breaks quantization shape inference (docs/stack.md)
    return model


def _finish(model, dst: Path, src: Path, external: str = "auto") -> None:
    onnx_tools.save_model(model, dst, external)
    onnx_tools.copy_bundle(src, dst)


def dynamic_int8(src: Path, dst: Path, *, per_channel: bool, exclude: list[str], op_types: list[str],
                 reduce_range: bool = False, embeddings: bool = False, smooth_alpha: float | None = None,
                 feeds: list[dict] | None = None, blockwise: list[str] = (), block_size: int = 32) -> dict:
    """Weights int8 (QInt8) offline, activations quantized per tensor at run time (MatMulInteger).
    `smooth_alpha` first moves activation outliers into the weights, calibrated on `feeds`
    (compress/quant/smooth.py; where no constant takes the division, an inserted Mul does). The MatMuls
    matching a `blockwise` pattern become MatMulNBits int8 instead (blocks of `block_size`, activations
    quantized per block: inputs whose outliers one scale per tensor cannot hold, e.g. SmolLM2's down_proj)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from .smooth import smooth

    model = _load(src)
    excluded = matching_nodes(model, exclude, QUANTIZABLE)
    blocks = [n for n in matching_nodes(model, list(blockwise), ("MatMul",))
              if n not in excluded and _has_weight(model, n)]
    if blockwise and not blocks:  # before the calibration smoothing runs
        raise ConfigError(f"quantize.blockwise: {list(blockwise)} matches no MatMul with a weight that "
                          "quantize.exclude leaves to quantize; patterns match ONNX node or weight names, e.g. "
                          "'*down_proj*'")
    smoothing = (smooth(model, feeds, smooth_alpha, skip=set(excluded + blocks), insert=True)
                 if smooth_alpha is not None else None)
    if blocks:
        model = _int8_blocks(model, blocks, block_size, accuracy_level=4)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.onnx"
        quantize_dynamic(model, out, op_types_to_quantize=op_types, per_channel=per_channel,
                         reduce_range=reduce_range, weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                         use_external_data_format=True,
                         # DefaultTensorType: fused contrib ops (export optimize: true) defeat type inference
                         extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
        qmodel = onnx.load(str(out))
    tables = _quantize_tables(qmodel, excluded) if embeddings else {"int8_embedding_tables": []}
    _finish(qmodel, dst, src)
    return {"excluded_nodes": excluded, **tables, "smoothing": smoothing, "blockwise_matmuls": blocks}


ALGORITHMS = ("rtn", "hqq", "k_quant", "gptq")  # gptq needs calibration feeds; k_quant and gptq are 4-bit only


_BLOCK_SCOPE = re.compile(r"^/(?:[^/]+/)*?[^/.]+\.(\d+)/")  # the first `<name>.<index>/` scope


def decoder_blocks(model) -> dict[int, list[str]]:
    """Block index -> its weight MatMuls (those weight_only quantizes), from the node names both exporters
    write: the first scope named `<container>.<index>` (`/model/layers.3/...`, `/transformer/h.3/...`)."""
    inits = {i.name for i in model.graph.initializer}
    out: dict[int, list[str]] = {}
    for node in model.graph.node:
        found = _BLOCK_SCOPE.match(node.name)
        if node.op_type == "MatMul" and found and node.input[1] in inits:
            out.setdefault(int(found.group(1)), []).append(node.name)
    return dict(sorted(out.items()))


def unfuse_attention_projections(model) -> int:
    """Each fused encoder Attention (ORT's BERT fusion: the QKV projection inside the op, fp32 weights that
    weight-only quantizers do not reach) as MatMul + Split + MultiHeadAttention, the same attention on the
    projected q, k, v with the same bias and mask: the MatMul is then quantized like every other. Only the
    plain form (input, weights, bias, optional mask index; no past, no causal mask) is rewritten. Returns how
    many were."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    done = 0
    for node in list(graph.node):
        attrs = {a.name: a for a in node.attribute}
        if (node.op_type != "Attention" or node.domain != "com.microsoft" or not 3 <= len(node.input) <= 4
                or node.input[1] not in inits or len(inits[node.input[1]].dims) != 2
                or set(attrs) - {"num_heads", "mask_filter_value", "scale", "unidirectional"}
                or (attrs.get("unidirectional") and attrs["unidirectional"].i)):
            continue
        hidden = inits[node.input[1]].dims[1] // 3
        name = node.name or f"Attention_{done}"
        qkv, parts, sizes = f"{name}/qkv", [f"{name}/{p}" for p in "qkv"], f"{name}/qkv_sizes"
        graph.initializer.append(numpy_helper.from_array(np.array([hidden] * 3, np.int64), sizes))
        mha = helper.make_node("MultiHeadAttention", parts + [node.input[2]] + list(node.input[3:4]),
                               list(node.output[:1]), name=f"{name}/MultiHeadAttention", domain="com.microsoft",
                               **{k: helper.get_attribute_value(a) for k, a in attrs.items() if k != "unidirectional"})
        at = list(graph.node).index(node)
        graph.node.remove(node)
        for new in reversed([helper.make_node("MatMul", [node.input[0], node.input[1]], [qkv], name=f"{name}/MatMul"),
                             helper.make_node("Split", [qkv, sizes], parts, name=f"{name}/Split", axis=-1), mha]):
            graph.node.insert(at, new)
        done += 1
    return done


def weight_of(model, node_name: str) -> np.ndarray:
    """The [K, N] weight initializer a MatMul multiplies by."""
    from onnx import numpy_helper

    node = next(n for n in model.graph.node if n.name == node_name)
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == node.input[1]))


def weight_only(src: Path, dst: Path, *, bits: int, block_size: int, accuracy_level: int, symmetric: bool,
                exclude: list[str], embeddings: bool = False, algorithm: str = "rtn",
                feeds: list[dict] | None = None, eight_bit: list[str] | None = None, embedding_bits: int = 8,
                smooth_alpha: float | None = None, offset_roundings: int = 0) -> dict:
    """MatMulNBits: weights int4/int8 in blocks along the input dimension, dequantized inside the kernel.
    accuracy_level 4 computes with int8 activations quantized per block (fast with VNNI, outlier-tolerant);
    0 computes in fp32. With `embeddings`, embedding tables (Gather) become int8 as well, or 4-bit with
    `embedding_bits` 4 (symmetric RTN in blocks of `block_size`; see _quantize_tables).

    `algorithm` picks how the 4-bit grid is chosen: rtn (round to nearest, symmetric unless `symmetric` is
    false), minmax (each block's exact [min, max] range, llama.cpp's Q4_1), hqq (half-quadratic optimization
    of scale and zero point, data-free), k_quant (llama.cpp's k-quant search, data-free) or gptq
    (error-compensating, on calibration `feeds`). At 4 bits an untied LM head stays 8-bit (a tied one is the
    int8 embedding table, see `embeddings`), and so do the MatMuls named in `eight_bit` (mixed precision: the
    blocks most sensitive to 4 bits), all in one symmetric 8-bit RTN pass.

    `smooth_alpha` (8 bits) first evens out the activation channels each block of int8 activations shares,
    calibrated on `feeds`, only where a producer's constant takes the division: no node is added.

    minmax and hqq leave per-block offsets: an fp16 table, or with `offset_roundings` folded into the 4-bit
    weights in that many roundings (_add_offsets)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    for name in ("onnxruntime.quantization.matmul_nbits_quantizer", "neural_compressor"):
        logging.getLogger(name).setLevel(logging.WARNING)
    model = _load(src)
    unfused = unfuse_attention_projections(model)  # a fused encoder's QKV weights, out of reach inside Attention
    excluded = matching_nodes(model, exclude, QUANTIZABLE)
    if eight_bit and bits != 4:
        raise ValueError("eight_bit: MatMuls kept at 8 bits need bits=4 for the rest")
    head = [n for n in lm_head_nodes(model) if n not in excluded and _has_weight(model, n)] if bits == 4 else []
    smoothing = None
    if smooth_alpha is not None:
        if bits != 8:
            raise ValueError("smooth_alpha: 8-bit weights only")
        from .smooth import smooth

        smoothing = smooth(model, feeds, smooth_alpha, skip=set(excluded))
    kept = [n for n in dict.fromkeys(eight_bit or []) if n not in excluded and n not in head
            and _has_weight(model, n)]
    if head or kept:  # the 8-bit head and kept MatMuls first, then the rest at 4 bits
        model = _int8_blocks(model, head + kept, block_size, accuracy_level)
    left: dict[str, int] = {}
    if algorithm == "minmax":
        if bits != 4:
            raise ValueError("algorithm minmax is a 4-bit grid; set bits=4")
        offsets, left = _minmax_4bit(model, set(excluded + head + kept), block_size, offset_roundings)
    else:
        matmuls = ("MatMul",)
        if algorithm == "hqq":
            config = mnq.HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits, op_types_to_quantize=matmuls)
        elif algorithm == "k_quant":
            config = mnq.KQuantWeightOnlyQuantConfig(op_types_to_quantize=matmuls)
        elif algorithm == "gptq":
            config = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Batches(feeds or []),
                                                   op_types_to_quantize=matmuls)
        else:  # rtn: the quantizer's default
            config = None
        q = mnq.MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                     accuracy_level=accuracy_level or None, nodes_to_exclude=excluded + head + kept,
                                     op_types_to_quantize=matmuls, algo_config=config)
        if algorithm == "gptq":  # ORT's GPTQ path drops nodes_to_exclude (its RTN / k_quant path marks them fp32)
            configs = q._generate_q4_node_config
            q._generate_q4_node_config = lambda: {**configs(), **dict.fromkeys(q.nodes_to_exclude, "fp32")}
        with _printed_to_log(), _zero_points_per_row():  # k_quant / gptq print progress bars
            q.process()
        model = q.model.model if hasattr(q.model, "model") else q.model
        offsets = _integer_zero_points(model, offset_roundings) if algorithm == "hqq" else 0
    _set_accuracy_level(model, accuracy_level)
    experts = quantize_experts(model, bits, block_size, exclude)
    tables = (_quantize_tables(model, excluded, four_bit_block=block_size if embedding_bits == 4 else None)
              if embeddings else {"int8_embedding_tables": []})
    _finish(model, dst, src)
    return {"excluded_nodes": excluded, **tables, "int8_head": head, "unfused_attention_projections": unfused,
            **({"quantized_experts": experts} if experts else {}),
            "int8_matmuls": kept, "offset_corrections": offsets, "smoothing": smoothing,
            **({"float_matmuls": list(left), "float_matmul_rows": sorted(set(left.values()))} if left else {})}


def quantize_experts(model, bits: int, block_size: int, exclude: list[str]) -> list[str]:
    """Every MoE node (the fused graph's mixtures of experts) as QMoE with its experts' weights symmetric int8 per
    output row, or int4 in blocks of `block_size` along the input (the layouts ONNX Runtime's CPU kernel takes:
    uint8 codes around 128 / 8, two 4-bit codes a byte, low nibble first; scales float32). Returns the nodes."""
    import onnx

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    skip = set(matching_nodes(model, exclude, ("MoE",)))
    done = []
    for node in [n for n in graph.node if n.op_type == "MoE" and n.name not in skip]:
        x, router, fc1, fc1_bias, fc2, fc2_bias = (list(node.input) + [""])[:6]  # MoE's biases are optional
        quantized = []
        for name, bias in ((fc1, fc1_bias), (fc2, fc2_bias)):  # fc1: gate and up interleaved; fc2: down; [E, out, in]
            w = onnx.numpy_helper.to_array(inits[name]).astype(np.float32)
            codes, scales = _symmetric_codes(w, bits, block_size if bits == 4 else None)
            graph.initializer.remove(inits[name])
            graph.initializer.extend([onnx.numpy_helper.from_array(codes, f"{name}.quantized"),
                                      onnx.numpy_helper.from_array(scales, f"{name}.scales")])
            quantized += [f"{name}.quantized", f"{name}.scales", bias]  # codes, scales, the float bias (gpt-oss)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        q = onnx.helper.make_node("QMoE", [x, router, *quantized], list(node.output), node.name, domain=node.domain,
                                  **attrs, expert_weight_bits=bits, **({"block_size": block_size} if bits == 4 else {}))
        _replace(graph, node, q)
        done.append(node.name)
    return done


def _symmetric_codes(w: np.ndarray, bits: int, block: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric round-to-nearest codes of w [experts, out, in] in blocks of `block` along `in` (scales [experts,
    out, blocks]; None: per row, scales [experts, out]), as unsigned codes around 2^(bits - 1), 4-bit ones packed
    two a byte."""
    e, rows, cols = w.shape
    per_row = block is None
    block = cols if per_row else block
    if cols % block:
        raise ValueError(f"experts' inputs of {cols} are not a multiple of block_size {block}")
    blocks = w.reshape(e, rows, cols // block, block)
    qmax = 2 ** (bits - 1) - 1
    scales = np.abs(blocks).max(-1) / qmax
    scales[scales == 0] = 1.0
    codes = (np.clip(np.round(blocks / scales[..., None]), -qmax, qmax) + qmax + 1).astype(np.uint8)
    codes = codes.reshape(e, rows, cols)
    if bits == 4:
        codes = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return codes, (scales[..., 0] if per_row else scales).astype(np.float32)


def _int8_blocks(model, nodes: list[str], block_size: int, accuracy_level: int):
    """The MatMuls named in `nodes` as symmetric int8 MatMulNBits (blocks of block_size) at `accuracy_level`,
    the others as they are; returns the new model."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    chosen = set(nodes)
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in chosen]
    q = mnq.MatMulNBitsQuantizer(model, bits=8, block_size=block_size, is_symmetric=True,
                                 accuracy_level=accuracy_level or None, nodes_to_exclude=others,
                                 op_types_to_quantize=("MatMul",))
    q.process()
    _set_accuracy_level(q.model.model, accuracy_level)
    return q.model.model


@contextlib.contextmanager
def _zero_points_per_row():
    """ONNX Runtime's k_quant / gptq (neural_compressor's make_matmul_weight_only_node) pack 4-bit zero points
    two a byte across the rows of the weight, where MatMulNBits pads each row to whole bytes: with an odd
    number of blocks per row (SmolLM2's 576 inputs in blocks of 64) it fails ('cannot reshape array'). While
    this is active the node is built without them and gets them packed per row."""
    from unittest import mock

    from onnx import numpy_helper
    from onnxruntime.quantization.neural_compressor import weight_only as nc

    original = nc.make_matmul_weight_only_node

    def make(*, node, weight_shape, num_bits, k_blocks, zero_point, **rest):
        four = num_bits == 4 and zero_point is not None
        new, inits = original(node=node, weight_shape=weight_shape, num_bits=num_bits, k_blocks=k_blocks,
                              zero_point=None if four else zero_point, **rest)
        if four:
            zp = zero_point.astype(np.uint8).reshape(weight_shape[1], k_blocks)
            zp = np.pad(zp, ((0, 0), (0, k_blocks % 2)), constant_values=8)  # a row's last half byte unused
            packed = numpy_helper.from_array(zp[:, 0::2] | (zp[:, 1::2] << 4), node.input[1] + "_zp")
            new.input.append(packed.name)
            inits.append(packed)
        return new, inits

    with mock.patch.object(nc, "make_matmul_weight_only_node", make):
        yield


def _integer_zero_points(model, roundings: int) -> int:
    """HQQ leaves float zero points, for which MatMulNBits has no fast 4-bit kernel (SmolLM2: 6 tok/s instead of
    ~70) and no 8-bit kernel at all. Rewrite exactly: w = s (q - z) = s (q - m) + s (m - z): MatMulNBits without
    a zero point input (the kernel's default m = 2^(bits-1), its fastest path) plus the per-block offsets
    s (m - z) (_add_offsets). Returns how many MatMulNBits were rewritten."""
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    offsets = {}
    for node in graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) != 4 or node.input[3] not in inits:
            continue
        zp = inits[node.input[3]]
        attrs = {a.name: a.i for a in node.attribute}
        if zp.data_type != TensorProto.FLOAT:
            continue
        n, blocks, middle = attrs["N"], -(-attrs["K"] // attrs["block_size"]), 1 << (attrs["bits"] - 1)
        scale = numpy_helper.to_array(inits[node.input[2]]).reshape(n, blocks)
        offsets[node.name] = (scale * (middle - numpy_helper.to_array(zp).reshape(n, blocks))).T  # [blocks, N]
        graph.initializer.remove(zp)
        del node.input[3]
    return _add_offsets(model, offsets, roundings)


def _minmax_4bit(model, skip: set[str], block_size: int, roundings: int) -> tuple[int, dict[str, int]]:
    """`algorithm: minmax` (the grid of compress/quant/fake.py `minmax_grid`, llama.cpp's Q4_1): every MatMul
    with a float [K, N] weight initializer, not in `skip`, becomes MatMulNBits (4-bit codes around the default
    zero point 8, float32 scales) plus its per-block offsets (_add_offsets). Returns how many, and the
    MatMuls left float because K is not a multiple of the block size (name -> K)."""
    from collections import Counter

    import torch
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers = Counter(i for node in graph.node for i in node.input)
    offsets, left = {}, {}
    for node in list(graph.node):
        if node.op_type != "MatMul" or node.name in skip or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.ndim != 2 or w.dtype != np.float32:
            continue
        k, n = w.shape
        if k % block_size:
            left[node.name] = k
            continue
        codes, scale, offset = minmax_grid(torch.from_numpy(np.ascontiguousarray(w.T)), block_size)
        name = f"{node.name}_Q4"
        packed, scales = numpy_helper.from_array(_pack_4bit(codes), f"{name}/B"), \
            numpy_helper.from_array(scale.numpy().reshape(-1), f"{name}/scales")
        graph.initializer.extend([packed, scales])
        at = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(at, helper.make_node("MatMulNBits", [node.input[0], packed.name, scales.name],
                                               list(node.output), name=name, domain="com.microsoft", K=k, N=n,
                                               bits=4, block_size=block_size))
        readers[node.input[1]] -= 1
        if not readers[node.input[1]]:
            graph.initializer.remove(inits[node.input[1]])
        offsets[name] = offset.numpy().T  # [blocks, N]
    return _add_offsets(model, offsets, roundings), left


def _pack_4bit(codes) -> np.ndarray:
    """4-bit codes (a float array or CPU tensor [..., block] of 0..15) packed as MatMulNBits and
    GatherBlockQuantized read them: two codes a byte, the even one in the low nibble ([..., block / 2] uint8)."""
    q = np.asarray(codes).astype(np.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def _add_offsets(model, offsets: dict[str, np.ndarray], roundings: int) -> int:
    """Adds to each MatMulNBits named in `offsets` (a [blocks, N] table) sum_b (x summed over block b) offset_b.
    The per-block sums of its input come from one MatMul by a [K, blocks] matrix of ones per block (shared by
    the projections that read that input). With `roundings`, a 4-bit projection whose K is a multiple of its
    block takes the offsets folded into its weights (_fold_offsets: no node of its own); otherwise it adds a
    MatMul by the table (fp16 on disk, its Cast folded when the session starts) and an Add. Returns how many
    were added."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    made: dict[tuple[str, int, int], str] = {}  # (input, block size, columns) -> its per-block sums
    for node in list(graph.node):
        if node.name not in offsets:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        k, block = attrs["K"], attrs["block_size"]
        fold = roundings and attrs["bits"] == 4 and not k % block and len(node.input) == 3
        blocks = -(-k // block)
        columns = -(-blocks // block) * block if fold else blocks  # folded sums fill whole blocks of K
        key = (node.input[0], block, columns)
        if key not in made:
            made[key] = _block_sums(graph, inits, node, block, columns, concat=roundings if fold else 0)
        if fold:
            _fold_offsets(graph, node, made[key], offsets[node.name], columns, roundings)
        else:
            _offset_table(graph, node, made[key], offsets[node.name])
    return len(offsets)


def _block_sums(graph, inits: set[str], node, block: int, columns: int, concat: int) -> str:
    """The sums of `node`'s input over each block of `block` channels (a MatMul by ones, zero columns up to
    `columns`), inserted before `node`; with `concat`, the input followed by that many copies of them."""
    from onnx import helper, numpy_helper

    k = {a.name: a.i for a in node.attribute}["K"]
    ones = f"/offsets/block_ones_{k}_{block}_{columns}"
    if ones not in inits:  # a last block shorter than `block` (K not a multiple) sums what it has
        inits.add(ones)
        table = np.zeros((k, columns), np.float32)
        table[np.arange(k), np.arange(k) // block] = 1
        graph.initializer.append(numpy_helper.from_array(table, ones))
    total = f"{node.name}/block_sums"
    at = list(graph.node).index(node)  # before the first reader: its input exists by then
    graph.node.insert(at, helper.make_node("MatMul", [node.input[0], ones], [total], name=total))
    if not concat:
        return total
    widened = f"{node.name}/offsets/with_block_sums"
    graph.node.insert(at + 1, helper.make_node("Concat", [node.input[0]] + [total] * concat, [widened],
                                               name=widened, axis=-1))
    return widened


def _offset_table(graph, node, sums: str, offsets: np.ndarray) -> None:
    """`node`'s output + `sums` @ `offsets` (stored fp16: its 2^-11 relative error is far below a step)."""
    from onnx import TensorProto, helper, numpy_helper

    stored, table = f"{node.name}/offsets_fp16", f"{node.name}/offsets"
    graph.initializer.append(numpy_helper.from_array(offsets.astype(np.float16), stored))
    out, raw = node.output[0], node.output[0] + "/codes"
    node.output[0] = raw
    correction = f"{node.name}/offset"
    at = list(graph.node).index(node) + 1  # right after it: its readers come later
    graph.node.insert(at, helper.make_node("Add", [raw, correction], [out], name=f"{node.name}/add_offset"))
    graph.node.insert(at, helper.make_node("MatMul", [sums, table], [correction], name=correction))
    graph.node.insert(at, helper.make_node("Cast", [stored], [table], name=table, to=TensorProto.FLOAT))


def _fold_offsets(graph, node, widened: str, offsets: np.ndarray, columns: int, roundings: int) -> None:
    """The offsets as more rows of `node`'s 4-bit weights, read against copies of the block sums appended
    to its input (_block_sums' Concat): x @ W + sums @ T = [x, sums, sums, ...] @ [W; T1; T2; ...], where
    T1 + T2 + ... is T in `roundings` symmetric 4-bit roundings, each of what the ones before left: T is kept
    to 1/14^roundings of the largest offset of each group of `block` blocks (fp16 keeps 2^-11 of each).
    Decoding reads 4-bit rows where the table was read as fp32 (SmolLM2 at 3 roundings: 1.10x the decode,
    0.95x the prefill; studies.offset_forms)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    attrs = {a.name: a for a in node.attribute}
    k, n, block = attrs["K"].i, attrs["N"].i, attrs["block_size"].i
    packed, scales = (numpy_helper.to_array(inits[node.input[i]]) for i in (1, 2))
    rest = np.zeros((n, columns), np.float64)  # [N, columns]: the table, zero up to whole blocks
    rest[:, :offsets.shape[0]] = offsets.T
    rest = rest.reshape(n, -1, block)
    codes, steps = [packed.reshape(n, -1, block // 2)], [scales.reshape(n, -1)]
    for _ in range(roundings):
        step = (np.abs(rest).max(-1) / 7).astype(scales.dtype)
        step[step == 0] = 1
        q = np.clip(np.round(rest / step[..., None]), -8, 7)
        rest = rest - q * step[..., None].astype(np.float64)  # what this rounding left, in the stored steps
        codes.append(_pack_4bit(q + 8))
        steps.append(step)
    inits[node.input[1]].CopyFrom(numpy_helper.from_array(np.concatenate(codes, 1), node.input[1]))
    steps = np.concatenate(steps, 1)
    inits[node.input[2]].CopyFrom(numpy_helper.from_array(steps.reshape(-1) if scales.ndim == 1 else steps,
                                                          node.input[2]))
    node.input[0] = widened
    attrs["K"].i = k + roundings * columns


def _set_accuracy_level(model, level: int) -> None:
    """The quantizer sets accuracy_level only on some algorithms' nodes (HQQ's have none, and then run the
    fp32-compute path: 3x slower); give every MatMulNBits the level asked for."""
    from onnx import helper

    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and level:
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, helper.make_attribute("accuracy_level", level)])


def _has_weight(model, node_name: str) -> bool:
    """The node multiplies by an initializer (an untied head; a tied one reads the table through a Transpose)."""
    inits = {i.name for i in model.graph.initializer}
    return any(n.name == node_name and n.input[1] in inits for n in model.graph.node)


def _quantize_tables(model, excluded: list[str], *, four_bit_block: int | None = None) -> dict:
    """Embedding tables (float initializers read by Gather) to int8 in blocks along the row (blocks of 32 with
    fp16 scales where the width allows: llama.cpp's Q8_0), stored once in MatMulNBits' layout: Gathers become
    GatherBlockQuantized, and a tied LM head (a MatMul reading the table through a Transpose) becomes an int8
    MatMulNBits over the same bytes, so decoding reads the vocabulary matrix as int8 rather than fp32 (it is
    ~20% of SmolLM2's weights). Any other reader gets the dequantized table, which ONNX Runtime folds into a
    constant when the session starts. (quantize_dynamic's own Gather path uses one scale for the whole table:
    3x the error of even one scale per row.)

    With `four_bit_block`, tables read only by Gathers and a tied head become 4-bit instead: MatMulNBits'
    symmetric RTN grid in blocks of that size (compress/quant/fake.py `blockwise_grid`), two codes a byte, the
    same bytes for both ops (a table with other readers, or whose width the block does not divide, stays
    int8). Returns the manifest record: the tables at each width, and those left float (a width that is not
    a multiple of 16)."""
    import torch
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.name not in excluded and n.input[0] in inits
               and len(inits[n.input[0]].dims) == 2 and inits[n.input[0]].data_type == 1]
    blocks_of = {t: table_block(inits[t].dims[1]) for t in sorted({n.input[0] for n in gathers})}
    done: dict[str, int] = {}
    for table in [t for t, block in blocks_of.items() if block]:
        w = numpy_helper.to_array(inits[table]).astype(np.float32)
        rows, width = w.shape
        readers = [n for n in graph.node if table in n.input]
        lookups = [n for n in readers if n in gathers]
        others = [(n, _tied_head(graph, n, excluded)) for n in readers if n not in lookups]  # (reader, head)
        four = bool(four_bit_block) and width % four_bit_block == 0 and all(head is not None for _, head in others)
        bits, block = (4, four_bit_block) if four else (8, blocks_of[table])
        if four:  # codes 0..15 around MatMulNBits' and GatherBlockQuantized's default zero point 8
            codes, scale, _ = blockwise_grid(torch.from_numpy(w), 4, block, symmetric=True)
            q = _pack_4bit(codes)  # [rows, blocks, block / 2]
        else:  # codes -127..127 as uint8 around 128: both contrib ops' default zero point
            codes, scale = table_grid(torch.from_numpy(w), block)
            q = (codes.numpy() + 128).astype(np.uint8)  # [rows, blocks, block]
        packed, scales = table + "_uint8", table + "_scale"
        graph.initializer.remove(inits[table])
        row_bytes = width * bits // 8
        graph.initializer.extend([numpy_helper.from_array(q, packed),
                                  numpy_helper.from_array(np.array([rows, row_bytes], np.int64), table + "_shape")])
        rows_view = table + "_uint8_rows"  # [rows, bytes] view for the Gather, folded at session start
        new_nodes = [helper.make_node("Reshape", [packed, table + "_shape"], [rows_view], name=table + "_rows")]
        if four:
            graph.initializer.append(numpy_helper.from_array(scale.numpy(), scales))
        else:  # int8: fp16 scales on disk (table_grid's), the float32 ones both ops take folded at session start
            graph.initializer.append(numpy_helper.from_array(scale.numpy().astype(np.float16), scales + "_fp16"))
            new_nodes.append(helper.make_node("Cast", [scales + "_fp16"], [scales], name=scales + "_cast", to=1))
        dequantized = False
        for node in lookups:
            _replace(graph, node, helper.make_node(
                "GatherBlockQuantized", [rows_view, node.input[1], scales], list(node.output), name=node.name,
                domain="com.microsoft", bits=bits, block_size=block, gather_axis=0, quantize_axis=1))
        for node, head in others:
            if head is not None:
                _replace(graph, head, helper.make_node(
                    "MatMulNBits", [head.input[0], packed, scales], list(head.output), name=head.name,
                    domain="com.microsoft", bits=bits, block_size=block, K=width, N=rows, accuracy_level=4))
                graph.node.remove(node)
                continue
            node.input[:] = [table + "_dequant" if x == table else x for x in node.input]
            dequantized = True
        if dequantized:  # the float table for the other readers (8 bits only)
            new_nodes += _dequantized_table(graph, table, table + "_dequant")
        for k, n in enumerate(new_nodes):  # they read only initializers
            graph.node.insert(k, n)
        done[table] = bits
    onnx_tools.use_contrib_domain(model)
    left = [t for t, block in blocks_of.items() if not block]
    return {"int8_embedding_tables": [t for t, b in done.items() if b == 8],
            **({"int4_embedding_tables": [t for t, b in done.items() if b == 4]} if four_bit_block else {}),
            **({"float_embedding_tables": left} if left else {})}


def _dequantized_table(graph, t: str, out: str) -> list:
    """Standard ops computing the float table `out` [rows, width] from table `t`'s int8 blocks (initializers
    `t`_uint8: codes + 128 [rows, blocks, block]; `t`_scale: float32 [rows, blocks], itself a Cast of
    `t`_scale_fp16; `t`_shape: [rows, width]). They read only initializers, so ONNX Runtime folds them into
    a constant when the session starts. Adds their two constants to `graph`; returns the nodes."""
    from onnx import helper, numpy_helper

    graph.initializer.extend([numpy_helper.from_array(np.array(128, np.float32), t + "_zero"),
                              numpy_helper.from_array(np.array([0, -1, 1], np.int64), t + "_scale_shape")])
    return [helper.make_node("Cast", [t + "_uint8"], [t + "_f"], name=t + "_cast", to=1),
            helper.make_node("Sub", [t + "_f", t + "_zero"], [t + "_centred"], name=t + "_centre"),
            helper.make_node("Reshape", [t + "_scale", t + "_scale_shape"], [t + "_scale3"], name=t + "_scale3"),
            helper.make_node("Mul", [t + "_centred", t + "_scale3"], [t + "_blocks"], name=t + "_scaled"),
            helper.make_node("Reshape", [t + "_blocks", t + "_shape"], [out], name=t + "_dequant")]


def _replace(graph, old, new) -> None:
    pos = list(graph.node).index(old)
    graph.node.remove(old)
    graph.node.insert(pos, new)


def _tied_head(graph, node, excluded):
    """The MatMul computing hidden @ table^T when `node` is the table's Transpose feeding only it, else None."""
    if node.op_type != "Transpose" or [list(a.ints) for a in node.attribute if a.name == "perm"] not in ([], [[1, 0]]):
        return None
    readers = [n for n in graph.node if node.output[0] in n.input]
    if len(readers) != 1 or readers[0].op_type != "MatMul" or readers[0].input[1] != node.output[0]:
        return None
    return None if readers[0].name in excluded else readers[0]


class _Batches:
    """ORT CalibrationDataReader over a fixed list of feeds."""

    def __init__(self, feeds: list[dict]):
        self.feeds, self.i = feeds, 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self):
        self.i = 0

    def __iter__(self):  # GPTQ iterates the reader
        return iter(self.feeds)


def calibration_feeds(src: Path, ids: np.ndarray, mask: np.ndarray, batch_size: int) -> list[dict]:
    """Model feeds (empty past for decoders) for each batch of calibration token windows."""
    from ..edge import EdgeModel

    edge = EdgeModel(src, verify=False)  # the loaded parent, verified
    feeds = []
    for start in range(0, len(ids), batch_size):
        b_ids, b_mask = ids[start:start + batch_size], mask[start:start + batch_size]
        feed = {"input_ids": b_ids}
        if "attention_mask" in edge.inputs:
            feed["attention_mask"] = b_mask
        if "token_type_ids" in edge.inputs:
            feed["token_type_ids"] = np.zeros_like(b_ids)
        if "position_ids" in edge.inputs:
            feed["position_ids"] = np.broadcast_to(np.arange(b_ids.shape[1]), b_ids.shape).astype(np.int64)
        if "logits_to_keep" in edge.inputs:  # a fused decoder: the head over every position, as in scoring
            feed["logits_to_keep"] = np.array([0], np.int64)
        feed.update(edge._empty_past(len(b_ids)))
        feeds.append(feed)
    return feeds


def static_int8(src: Path, dst: Path, feeds: list[dict], *, calibrate: str, per_channel: bool,
                exclude: list[str], op_types: list[str], activations: str = "uint8",
                smooth_alpha: float | None = None, percentile: float = 99.999) -> dict:
    """QDQ int8: activation ranges calibrated on `feeds` (MinMax / Entropy / Percentile), weights QInt8.

    activations "uint8" (asymmetric) is what ONNX Runtime's x86 CPU kernels fuse into integer matmuls; with
    "int8" (symmetric) they fall back to dequantize + float MatMul there, several times slower than fp32.
    `smooth_alpha` first moves activation outliers into the weights (compress/quant/smooth.py)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from .smooth import GraphIndex, smooth

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    model = _load(src)
    excluded = matching_nodes(model, exclude, QUANTIZABLE)
    smoothing = smooth(model, feeds, smooth_alpha, skip=set(excluded)) if smooth_alpha is not None else None
    # Products of two activations (attention scores, probabilities x values) stay float: one static scale
    # per tensor flattens the small attention probabilities to zero. (The QDQ quantizer ignores its
    # MatMulConstBOnly option, so they are excluded by name.)
    index = GraphIndex.of(model)
    activation_products = [n.name for n in model.graph.node
                           if n.op_type == "MatMul" and index.constant_source(n.input[1]) is None]
    unsigned = activations == "uint8"
    _infer_types(model)
    with tempfile.TemporaryDirectory() as tmp:
        # The calibrator writes augmented models into the working directory: keep them in tmp.
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            out = Path(tmp) / "q.onnx"
            with _printed_to_log():  # the calibrator prints its progress
                quantize_static(model, out, _Batches(feeds), quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=op_types, per_channel=per_channel,
                                activation_type=QuantType.QUInt8 if unsigned else QuantType.QInt8,
                                weight_type=QuantType.QInt8,
                                nodes_to_exclude=excluded + activation_products, use_external_data_format=True,
                                calibrate_method=methods[calibrate],
                                extra_options={"ActivationSymmetric": not unsigned,
                                               "DefaultTensorType": onnx.TensorProto.FLOAT,
                                               "CalibPercentile": percentile,
                                               "CalibTensorRangeSymmetric": not unsigned})
            qmodel = onnx.load(str(out))
        finally:
            os.chdir(cwd)
        _finish(qmodel, dst, src)
    return {"excluded_nodes": excluded, "float_activation_products": len(activation_products),
            "activation_scales": activation_scales(qmodel), "smoothing": smoothing}


def lowered(folder: Path) -> bool:
    """Whether the graph holds any weight at lower precision (int8 / 4-bit codes, fp16)."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(Path(folder) / onnx_tools.ONNX_FILE), load_external_data=False)
    low = (TensorProto.INT8, TensorProto.UINT8, TensorProto.FLOAT16, TensorProto.INT4, TensorProto.UINT4)
    return any(i.data_type in low for i in model.graph.initializer)


def _infer_types(model) -> None:
    """The static quantizer calibrates and quantizes only tensors whose type the graph's value_info states, and
    ONNX's shape inference stops at contrib ops (the fused decoders' SkipLayerNormalization, RotaryEmbedding,
    GroupQueryAttention): without this nothing after the first of them is quantized. ONNX Runtime's symbolic
    shape inference knows those ops."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    typed = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)
    model.graph.value_info.extend(typed.graph.value_info)


def activation_scales(model) -> dict[str, float]:
    """Scale of every QuantizeLinear on a non-constant tensor (the calibrated activation ranges)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits and node.input[1] in inits:
            out[node.input[0]] = float(numpy_helper.to_array(inits[node.input[1]]).ravel()[0])
    return out


def fp16(src: Path, dst: Path, *, exclude: list[str]) -> dict:
    """Float16 weights and compute, fp32 inputs/outputs (keep_io_types), excluded nodes stay fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = _load(src)
    tables = onnx_tools.fold_rotary_caches(model)  # a fused graph's rotary angles need fp32 (see there)
    alibi = _take_alibi(model)  # and its ALiBi bias (see there)
    excluded = matching_nodes(model, exclude)
    if excluded:  # the converter casts around excluded nodes where it knows the types, which ONNX's shape
        _infer_types(model)  # inference (its own) does not after contrib ops (fused graphs)
    converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=excluded or None,
                                         disable_shape_infer=bool(excluded)
                                         or onnx_tools.proto_bytes(model) > onnx_tools.PROTOBUF_LIMIT // 2)
    _put_back_alibi(converted, *alibi)
    # the converter gives each excluded reader of an fp16 tensor its own Cast back to fp32, all with one name
    # and one output (an invalid graph when two excluded nodes read it): the first computes it for all
    names = set()
    for node in list(converted.graph.node):
        if node.op_type == "Cast" and node.name in names:
            converted.graph.node.remove(node)
        names.add(node.name)
    _finish(converted, dst, src)
    return {"excluded_nodes": excluded, **({"rotary_tables": tables} if tables else {}),
            **({"alibi_fp32_nodes": len(alibi[0])} if alibi[0] else {})}


def _take_alibi(model) -> tuple[list, list]:
    """Remove from a fused graph the nodes computing its ALiBi bias that nothing else reads, and the
    initializers only they read: (nodes, initializers), for _put_back_alibi after the fp16 conversion. Left
    in, the converter rounds each of their outputs to fp16 (blocked nodes get a Cast to fp16 and back after
    them): slope x position, in the hundreds, to 0.25, which moved a 12-head Falcon's logits by tenths by
    position 2,000 (tests/test_fused_decoder.py bounds the error now)."""
    names = set(onnx_tools.gqa_input_nodes(model, onnx_tools.ATTENTION_BIAS)[0])
    read_elsewhere = {x for n in model.graph.node if n.name not in names for i, x in enumerate(n.input)
                      if not (n.op_type == "GroupQueryAttention" and i in onnx_tools.ATTENTION_BIAS)}
    own = [n for n in model.graph.node if n.name in names and not set(n.output) & read_elsewhere]
    for n in own:
        model.graph.node.remove(n)
    still = {i for n in model.graph.node for i in n.input}
    inits = [t for t in model.graph.initializer if t.name in {i for n in own for i in n.input} - still]
    for t in inits:
        model.graph.initializer.remove(t)
    return own, inits


def _put_back_alibi(model, nodes: list, inits: list) -> None:
    """The ALiBi nodes _take_alibi removed, in fp32, before the first GroupQueryAttention, their result cast
    once to fp16 (the attention's type)."""
    if not nodes:
        return
    from onnx import TensorProto, helper

    bias = next(n.input[onnx_tools.ATTENTION_BIAS[0]] for n in model.graph.node if n.op_type == "GroupQueryAttention")
    last = next(n for n in nodes if bias in n.output)
    last.output[list(last.output).index(bias)] = f"{bias}/fp32"
    cast = helper.make_node("Cast", [f"{bias}/fp32"], [bias], name="/model/alibi/Cast_fp16", to=TensorProto.FLOAT16)
    at = next(i for i, n in enumerate(model.graph.node) if n.op_type == "GroupQueryAttention")
    for k, n in enumerate([*nodes, cast]):
        model.graph.node.insert(at + k, n)
    model.graph.initializer.extend(inits)


# ----------------------------------------------------------------------------- encoders: per-row int8
GELU_OPS = ("BiasGelu", "Gelu", "FastGelu", "QuickGelu")
GELU_MIN = 0.17  # GELU(x) >= -0.1700 (erf and tanh forms): shifted by this, its output is non-negative


def rowwise_int8(src: Path, dst: Path, *, exclude: list[str], embeddings: bool = True) -> dict:
    """int8 MatMuls with activations quantized per row (per token) at run time, for encoders.

    quantize_dynamic gives each activation tensor ONE scale per run (DynamicQuantizeLinear); in BERT-family
    encoders a few tokens ([CLS], [SEP], punctuation) carry activations far above the rest, so one scale for
    the whole sequence rounds the typical tokens coarsely (MiniLM-L6: embedding cosine 0.994). Here every row
    gets its own symmetric scale s = max|x_row| / 127, computed in the graph (Abs, ReduceMax, Div,
    QuantizeLinear with zero point 128), and the product runs as MatMulIntegerToFloat (uint8 x int8 with the
    per-column weight scales) times s. Inputs produced by a GELU are shifted by 0.17 first (non-negative,
    so all 256 levels are used; the shift times the weights' column sums is added back exactly). Weights are
    int8 per output column (stored as uint8 with zero point 128, see below). The quantization of one input is
    shared by the MatMuls that read it.
    MatMuls whose weight is not a 2-D float initializer, and fused Attention nodes, stay float (per-row int8
    of the QKV projection, unfuse_attention_projections, cost MiniLM-L6's cosine 0.9992 -> 0.9978)."""
    from onnx import TensorProto, helper, numpy_helper

    model = _load(src)
    graph = model.graph
    excluded = matching_nodes(model, exclude, QUANTIZABLE)
    inits = {i.name: i for i in graph.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    produced_by_gelu = {o for n in graph.node if n.op_type in GELU_OPS for o in n.output}
    targets = [n for n in graph.node if n.op_type == "MatMul" and n.name not in excluded and n.input[1] in inits
               and len(inits[n.input[1]].dims) == 2 and inits[n.input[1]].data_type == TensorProto.FLOAT]
    const = {"rq/eps": np.array(1e-8, np.float32), "rq/one": np.array(1.0, np.float32),
             "rq/zp128": np.array(128, np.uint8), "rq/zp0": np.array(0, np.uint8),
             "rq/inv127": np.array(1 / 127, np.float32), "rq/inv255": np.array(1 / 255, np.float32),
             "rq/gelu_shift": np.array(GELU_MIN, np.float32), "rq/axes": np.array([-1], np.int64)}
    if targets:
        graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in const.items())
    quantized: dict[str, tuple] = {}  # input -> (uint8 tensor, row scale, zero point, shift)
    for node in targets:
        x = node.input[0]
        at = list(graph.node).index(node)
        if x not in quantized:
            p = f"rowq/{len(quantized)}"
            shift = x in produced_by_gelu
            if shift:  # x + 0.17 >= 0: quantize [0, max] with zero point 0
                first = [helper.make_node("Add", [x, "rq/gelu_shift"], [p + "/shifted"]),
                         helper.make_node("Relu", [p + "/shifted"], [p + "/abs"])]
                inv, zp, values = "rq/inv255", "rq/zp0", p + "/abs"
            else:
                first = [helper.make_node("Abs", [x], [p + "/abs"])]
                inv, zp, values = "rq/inv127", "rq/zp128", x
            reduce = (helper.make_node("ReduceMax", [p + "/abs", "rq/axes"], [p + "/amax"], keepdims=1) if opset >= 18
                      else helper.make_node("ReduceMax", [p + "/abs"], [p + "/amax"], axes=[-1], keepdims=1))
            new = [*first, reduce,
                   helper.make_node("Max", [p + "/amax", "rq/eps"], [p + "/amax_eps"]),
                   helper.make_node("Mul", [p + "/amax_eps", inv], [p + "/scale"]),
                   helper.make_node("Div", [values, p + "/scale"], [p + "/scaled"]),
                   helper.make_node("QuantizeLinear", [p + "/scaled", "rq/one", zp], [p + "/q"])]
            for k, n in enumerate(new):
                n.name = f"{p}/{k}_{n.op_type}"
                graph.node.insert(at + k, n)
            at += len(new)
            quantized[x] = (p + "/q", p + "/scale", zp, GELU_MIN if shift else 0.0)
        xq, scale, zp, shift = quantized[x]
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        w_scale = (np.maximum(np.abs(w).max(axis=0), 1e-12) / 127).astype(np.float32)
        # uint8 with zero point 128: ONNX Runtime's uint8 x uint8 kernel is exact, where uint8 x int8 on x86
        # CPUs without VNNI sums pairs of products in int16 and saturates (19% error on a test matmul)
        wq = (np.clip(np.round(w / w_scale), -127, 127) + 128).astype(np.uint8)
        n, out = node.name, node.output[0]
        graph.initializer.extend([numpy_helper.from_array(wq, n + "/w_uint8"),
                                  numpy_helper.from_array(w_scale, n + "/w_scale")])
        new = [helper.make_node("MatMulIntegerToFloat", [xq, n + "/w_uint8", "rq/one", n + "/w_scale", zp, "rq/zp128"],
                                [n + "/int8_out"], name=n + "/int8", domain="com.microsoft"),
               helper.make_node("Mul", [n + "/int8_out", scale], [n + "/scaled" if shift else out],
                                name=n + "/row_scale")]
        if shift:
            graph.initializer.append(numpy_helper.from_array((-shift * w.sum(axis=0)).astype(np.float32),
                                                             n + "/unshift"))
            new.append(helper.make_node("Add", [n + "/scaled", n + "/unshift"], [out], name=n + "/unshift"))
        graph.node.remove(node)
        for k, m in enumerate(new):
            graph.node.insert(at + k, m)
        if readers.get(node.input[1], 0) <= 1:
            graph.initializer.remove(inits.pop(node.input[1]))
    onnx_tools.use_contrib_domain(model)
    tables = _quantize_tables(model, excluded) if embeddings else {"int8_embedding_tables": []}
    _finish(model, dst, src)
    return {"excluded_nodes": excluded, **tables, "rowwise_matmuls": len(targets),
            "rowwise_inputs": len(quantized)}


def int8_embed_layernorm_tables(folder: Path, min_elements: int = 1 << 20, exclude: list[str] = ()) -> list[str]:
    """Embedding tables read by a fused EmbedLayerNormalization (export optimize) to int8 on disk, in place:
    stored as uint8 blocks + scales and dequantized by standard ops that ONNX Runtime folds into a constant
    when the session starts (the op itself takes float tables). Without this a fused encoder's int8 file
    keeps its fp32 vocabulary table (MiniLM-L6: 58 MB instead of 23 MB). The tables of a node matching an
    `exclude` pattern (by its name or a table's) stay float. Returns the tables converted."""
    import onnx
    import torch
    from onnx import helper, numpy_helper

    path = Path(folder) / onnx_tools.ONNX_FILE
    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    excluded = set(matching_nodes(model, list(exclude), ("EmbedLayerNormalization",)))
    tables = sorted({n.input[i] for n in graph.node if n.op_type == "EmbedLayerNormalization" for i in (2, 3, 4)
                     if len(n.input) > i and n.input[i] in inits and inits[n.input[i]].data_type == 1
                     and len(inits[n.input[i]].dims) == 2 and table_block(inits[n.input[i]].dims[1])
                     and n.name not in excluded})
    # only the large ones (the vocabulary): position / segment tables are small
    tables = [t for t in tables if inits[t].dims[0] * inits[t].dims[1] >= min_elements]
    for t in tables:
        w = numpy_helper.to_array(inits[t]).astype(np.float32)
        rows, width = w.shape
        codes, scale = table_grid(torch.from_numpy(w), table_block(width))  # _quantize_tables' grid
        q = (codes.numpy() + 128).astype(np.uint8)
        graph.initializer.remove(inits[t])
        graph.initializer.extend([numpy_helper.from_array(q, t + "_uint8"),  # fp16 scales, as _quantize_tables'
                                  numpy_helper.from_array(scale.numpy().astype(np.float16), t + "_scale_fp16"),
                                  numpy_helper.from_array(np.array([rows, width], np.int64), t + "_shape")])
        new = [helper.make_node("Cast", [t + "_scale_fp16"], [t + "_scale"], name=t + "_scale_cast", to=1),
               *_dequantized_table(graph, t, t)]
        for k, n in enumerate(new):
            graph.node.insert(k, n)
    if tables:
        onnx_tools.save_model(model, folder)
    return tables
