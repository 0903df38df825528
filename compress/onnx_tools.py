"""ONNX helpers shared by the export and quantize passes: saving (inline or external data), graph
optimization, the inputs of the discrepancy check and the check itself."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .errors import CompressError

ONNX_FILE = "model.onnx"
EXTERNAL_DATA = "model.onnx.data"
PROTOBUF_LIMIT = 2 * 1024**3  # one protobuf message cannot exceed 2 GiB
# Under external "auto", graphs above this keep their weights in model.onnx.data: ONNX Runtime then reads them
# from the file rather than copying them out of a parsed graph (SmolLM2 int8: peak memory 369 -> 287 MB,
# studies/onnx_memory.py); small graphs stay one file.
EXTERNAL_ABOVE = 64 * 1024**2
# Files of an ONNX bundle besides the graph: what a later ONNX pass carries over from its parent.
BUNDLE_FILES = ("config.json", "generation_config.json", "edge_runner.py")


class DiscrepancyError(CompressError):
    """The ONNX model's outputs differ from its parent's by more than the pass's tolerance."""


def onnx_size(folder: Path) -> int:
    """Bytes of the graph and its external data."""
    return sum(f.stat().st_size for f in Path(folder).iterdir()
               if f.name.startswith(ONNX_FILE) or is_external_data(f.name))


def is_external_data(name: str) -> bool:
    """A file a graph keeps its weights in beside model.onnx (ours: model.onnx.data; optimum's: *_data)."""
    return name.endswith(".data") or name.endswith("_data")


def proto_bytes(model) -> int:
    """model.ByteSize(); past 2 GiB protobuf refuses to measure a message (BLOOM-560M in fp32), so there the
    bytes of its initializers, which are already over the limit."""
    from google.protobuf.message import EncodeError

    try:
        return model.ByteSize()
    except EncodeError:
        return sum(len(t.raw_data) for t in model.graph.initializer)


def save_model(model, folder: Path, external: str = "auto") -> Path:
    """Write `model` (onnx.ModelProto, external data already loaded) as folder/model.onnx.

    external: "auto" puts the weights in model.onnx.data when the graph is over EXTERNAL_ABOVE (64 MB),
    "always" always does, "never" never does (and fails over the protobuf limit)."""
    import onnx

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():  # stale graph / data files from an earlier save
        if f.name.startswith(ONNX_FILE) or is_external_data(f.name):
            f.unlink()
    use_external = external == "always" or (external == "auto" and proto_bytes(model) > EXTERNAL_ABOVE)
    path = folder / ONNX_FILE
    if use_external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return path


def graph_max_length(folder: Path) -> int | None:
    """The most tokens an exported graph holds, as its edge runner reads it (compress.edge.max_positions: the
    fused writer's export.max_length, else config.json's position table); None when neither says."""
    import json

    import onnx

    from .edge import max_positions

    meta = {p.key: p.value for p in onnx.load(str(Path(folder) / ONNX_FILE), load_external_data=False).metadata_props}
    config = Path(folder) / "config.json"
    return max_positions(meta, json.loads(config.read_text()) if config.exists() else {})[0]


def copy_bundle(src: Path, dst: Path) -> None:
    """Copy the non-graph files of an ONNX bundle (config, runner) from `src` to `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in BUNDLE_FILES:
        if (Path(src) / name).exists():
            shutil.copy2(Path(src) / name, dst / name)


def copy_edge_runner(dst: Path) -> None:
    """The torch-free runner, copied into every ONNX checkpoint as edge_runner.py."""
    shutil.copy2(Path(__file__).with_name("edge.py"), Path(dst) / "edge_runner.py")


# ----------------------------------------------------------------------------- graph optimization
_OPTIMIZER_TYPES = {"bert": "bert", "gpt2": "gpt2", "llama": "gpt2", "mistral": "gpt2", "qwen2": "gpt2"}


def tie_transposed_initializers(model) -> int:
    """Store a 2-D initializer that is another's transpose once, its readers taking a Transpose of the other
    (as optimum does for a plain tied LM head). torch's exporter folds the transpose of a tied table into a
    copy, and optimum's deduplication misses a factorized one (lowrank.embedding_rank's [V, r] table read by
    the Gather and the head). Returns the bytes saved."""
    from onnx import helper, numpy_helper

    graph = model.graph
    tensors = {t.name: t for t in graph.initializer if len(t.dims) == 2}
    shapes = {tuple(t.dims) for t in tensors.values()}
    by_column = {}  # (shape of the transpose, dtype, first column) -> names: one array in memory at a time
    transposed, saved = {}, 0  # duplicate -> the initializer it is the transpose of
    for name, t in tensors.items():
        shape = tuple(t.dims)
        if shape[::-1] not in shapes:
            continue
        a = numpy_helper.to_array(t)
        ref = next((n for n in by_column.get((shape, a.dtype.str, a[0].tobytes()), [])
                    if np.array_equal(numpy_helper.to_array(tensors[n]).T, a)), None)
        if ref is None:
            by_column.setdefault((shape[::-1], a.dtype.str, a[:, 0].tobytes()), []).append(name)
        else:
            transposed[name] = ref
            saved += a.nbytes
    if not transposed:
        return 0
    renamed = {dup: f"{dup}_from_{ref}" for dup, ref in transposed.items()}
    for node in graph.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]
    for t in [t for t in graph.initializer if t.name in transposed]:
        graph.initializer.remove(t)
    for dup, ref in transposed.items():
        graph.node.insert(0, helper.make_node("Transpose", [ref], [renamed[dup]], name=f"Transpose_{dup}"))
    return saved


def use_contrib_domain(model) -> None:
    """Declare ONNX Runtime's contrib-op domain (com.microsoft), which fused and quantized ops live in."""
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.add(domain="com.microsoft", version=1)


# BERT-family encoders whose graphs ONNX Runtime's "bert" optimizer fuses (Attention, SkipLayerNormalization,
# BiasGelu / FastGelu, EmbedLayerNormalization): `export.optimize: auto` fuses these.
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "mpnet")
# What an encoder graph must contain after fusion for the fusion to count as effective.
ENCODER_FUSIONS = ("Attention", "SkipLayerNormalization")


def fusion_choice(optimize, task: str, model_type: str) -> tuple[bool, str]:
    """Whether `export.optimize` (true / false / "auto") fuses an optimum graph, and why. auto = on for
    BERT-family encoders and classifiers (ONNX Runtime's BERT fusions), off for decoders (optimum's decoder
    graphs gain little: the fused writer is the fast path for those)."""
    if optimize is True or optimize is False:
        return optimize, f"optimize: {str(optimize).lower()}"
    if task == "causal-lm":
        return False, "optimize: auto leaves optimum's decoder graphs unfused (set optimize: true to fuse)"
    if model_type not in ENCODER_TYPES:
        return False, (f"optimize: auto fuses BERT-family encoders ({', '.join(ENCODER_TYPES)}); "
                       f"{model_type} is not one (set optimize: true to try)")
    return True, f"optimize: auto (a {model_type} {task} model)"


def fusion_notes(fused: dict, task: str) -> list[str]:
    """Fusions an encoder graph should have had but did not get (empty when all are there)."""
    if task == "causal-lm":
        return [] if fused else ["no operator was fused"]
    missing = [op for op in ENCODER_FUSIONS if not fused.get(op)]
    if not missing:
        return []
    return [f"the fusion left no {op} in the graph: ONNX Runtime's optimizer did not recognize the pattern, so "
            "those ops run unfused" for op in missing]


def optimize_graph(folder: Path, model_type: str, num_heads: int, hidden_size: int,
                   external: str = "auto", max_positions: int | None = None, task: str | None = None) -> dict:
    """ONNX Runtime's transformer fusions (attention, layer norm, GELU, skip-layer-norm), written back in
    place. The result stays portable: only fusions, no hardware-specific kernels (opt_level 0).

    Returns the optimizer's model type, the node counts before and after, `fused_operators` (fused op type ->
    count, from the optimizer), `op_counts` (contrib op type -> count in the written graph) and `notes`
    (expected fusions that did not happen; see fusion_notes) when `task` is given."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    before = len(onnx.load(str(Path(folder) / ONNX_FILE), load_external_data=False).graph.node)
    mt = _OPTIMIZER_TYPES.get(model_type, "bert")
    opt = optimize_model(str(Path(folder) / ONNX_FILE), model_type=mt, num_heads=num_heads,
                         hidden_size=hidden_size, opt_level=0)
    fused = {k: v for k, v in (opt.get_fused_operator_statistics() or {}).items() if v}
    use_contrib_domain(opt.model)  # the fused ops' domain
    trimmed = _trim_rotary_caches(opt.model, max_positions) if max_positions else 0
    contrib: dict[str, int] = {}
    for node in opt.model.graph.node:
        if node.domain == "com.microsoft":
            contrib[node.op_type] = contrib.get(node.op_type, 0) + 1
    save_model(opt.model, folder, external)
    out = {"optimizer_model_type": mt, "fused_operators": fused, "op_counts": dict(sorted(contrib.items())),
           "nodes_before": before, "nodes": len(opt.model.graph.node),
           **({"rotary_cache_rows": trimmed} if trimmed else {})}
    if task is not None:
        out["notes"] = fusion_notes(fused, task)
    return out


ROTARY_CACHES, ATTENTION_BIAS = (7, 8), (10,)  # GroupQueryAttention's cos / sin caches, its attention_bias


def gqa_input_nodes(model, inputs: tuple[int, ...] = ROTARY_CACHES) -> tuple[list[str], set[str]]:
    """The nodes computing a fused graph's GroupQueryAttention `inputs` and the initializers and graph inputs
    they read: (node names, those names). ROTARY_CACHES: Mul, Cos, Sin of positions and inv_freq, folded
    when a session starts; ATTENTION_BIAS: ALiBi's slope x position, computed every run."""
    producer = {o: n for n in model.graph.node for o in n.output}
    nodes, inits = [], set()
    todo = [n.input[i] for n in model.graph.node if n.op_type == "GroupQueryAttention" for i in inputs
            if len(n.input) > i and n.input[i]]
    while todo:
        name = todo.pop()
        node = producer.get(name)
        if node is None:
            inits.add(name)
        elif node.name not in nodes:
            nodes.append(node.name)
            todo += [i for i in node.input if i]
    return nodes, inits


def fold_rotary_caches(model) -> int:
    """Replace the nodes computing a fused graph's cos / sin caches by their values (fp32 tables, as the
    graph computed them), for a float16 graph: fp16 holds positions exactly only up to 2048 and angles of
    thousands of radians to about 2, so computed in fp16 the logits drifted by whole units past 2,048; stored,
    the tables become fp16 values of cos / sin (1e-3 relative). Returns the tables written."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    names, inits = gqa_input_nodes(model)
    if not names:
        return 0
    nodes = [n for n in model.graph.node if n.name in names]
    tables = sorted({n.input[i] for n in model.graph.node if n.op_type == "GroupQueryAttention"
                     for i in ROTARY_CACHES if len(n.input) > i and n.input[i]})
    sub = helper.make_graph(nodes, "rotary_caches", [],
                            [helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tables],
                            [t for t in model.graph.initializer if t.name in inits])
    values = ReferenceEvaluator(helper.make_model(sub, opset_imports=model.opset_import)).run(None, {})
    for n in nodes:
        model.graph.node.remove(n)
    readers = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name not in inits or t.name in readers]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    model.graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), t) for t, v in zip(tables, values))
    return len(tables)


def _trim_rotary_caches(model, max_positions: int) -> int:
    """The rotary fusion stores cos/sin tables for 131,072 positions (33 MB for SmolLM2, as much as 8 of its
    blocks in int8); rows past the model's max_position_embeddings are never read, so they are cut.
    Returns the rows kept (0 if nothing was cut)."""
    from onnx import numpy_helper

    names = {n.input[i] for n in model.graph.node if n.op_type == "RotaryEmbedding" for i in (2, 3)
             if len(n.input) > i}
    kept = 0
    for init in model.graph.initializer:
        if init.name in names and init.dims and init.dims[0] > max_positions:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[:max_positions].copy(), init.name))
            kept = max_positions
    return kept


# ----------------------------------------------------------------------------- check inputs
def check_inputs(tokenizer, task: str, data=None, *, samples: int = 4, seq_len: int = 32,
                 vocab_size: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) [samples, <=seq_len] for the discrepancy check: windows of the pipeline's
    calibration (else eval, else train) text when it has any, random tokens otherwise."""
    dataset = None
    if data is not None:
        for role in ("calibration", "eval", "train"):
            if data.specs.get(role) is not None:
                dataset = data.dataset(role)
                break
    if dataset is not None and task == "causal-lm":
        from .data import lm_windows

        windows = lm_windows(tokenizer, dataset, seq_len, max_tokens=samples * seq_len).numpy()
        return windows.astype(np.int64), np.ones_like(windows, dtype=np.int64)
    if dataset is not None:
        enc = tokenizer(dataset.texts[:samples], padding=True, truncation=True, max_length=seq_len,
                        return_tensors="np")
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    rng = np.random.default_rng(seed)
    vocab = vocab_size or len(tokenizer)
    ids = rng.integers(5, vocab, size=(samples, seq_len), dtype=np.int64)
    mask = np.ones_like(ids)
    if task != "causal-lm":  # ragged lengths exercise the padding mask
        for i in range(samples):
            mask[i, seq_len - i * (seq_len // (2 * samples)):] = 0
    return ids, mask


# ----------------------------------------------------------------------------- the check
def outputs_of(edge, task: str, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """What the check compares: logits (LM / classifier) or the last hidden state (encoder)."""
    if task == "feature-extraction":
        return edge.hidden_states(ids, mask)
    return edge.logits(ids, mask)


def torch_outputs(model, task: str, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    ref = out.last_hidden_state if task == "feature-extraction" else out.logits
    return ref.float().numpy()


def compare(ref: np.ndarray, got: np.ndarray, mask: np.ndarray, task: str) -> dict:
    """max abs error, mean abs error and top-1 agreement (cosine for encoders) over real tokens."""
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    if task == "sequence-classification":
        keep = np.ones(ref.shape[0], dtype=bool)
    else:
        keep = mask.astype(bool)
    r, g = ref[keep], got[keep]
    diff = np.abs(r - g)
    out = {"max_abs_error": float(diff.max()), "mean_abs_error": float(diff.mean()),
           "reference_abs_max": float(np.abs(r).max()), "compared": int(keep.sum())}
    if task == "feature-extraction":
        m = mask[..., None].astype(np.float64)
        er, eg = (ref * m).sum(1) / m.sum(1), (got * m).sum(1) / m.sum(1)
        cos = (er * eg).sum(-1) / (np.linalg.norm(er, axis=-1) * np.linalg.norm(eg, axis=-1) + 1e-12)
        out["embedding_cosine_min"] = float(cos.min())
        out["embedding_cosine_mean"] = float(cos.mean())
    else:
        out["top1_agreement"] = float((r.argmax(-1) == g.argmax(-1)).mean())
    return out


def decode_path_error(edge, ids: np.ndarray, full_ref: np.ndarray) -> float:
    """Max abs error of the KV-cache path: prefill all but the last token, decode the last one, compare
    with the reference's full-sequence logits at the last position."""
    _, state = edge.prefill(ids[:, :-1])
    last, _ = edge.decode_step(ids[:, -1:], state)
    return float(np.abs(last.astype(np.float64) - full_ref[:, -1, :]).max())


def check(ref: np.ndarray, edge, task: str, ids: np.ndarray, mask: np.ndarray, *, max_abs_error: float | None,
          min_agreement: float | None, section: str, what: str | None = None) -> dict:
    """Run the ONNX model, compare with `ref`, raise DiscrepancyError with the numbers if out of tolerance.
    `section`: the config section whose options set the tolerance (its error names them); `what`: the
    check's name in that error (default: `section`)."""
    got = outputs_of(edge, task, ids, mask)
    figures = compare(ref, got, mask, task)
    if task == "causal-lm" and edge.past_names:
        figures["decode_max_abs_error"] = decode_path_error(edge, ids, ref)
    figures["tolerance"] = {"max_abs_error": max_abs_error, "min_agreement": min_agreement}
    agreement = figures.get("top1_agreement", figures.get("embedding_cosine_min"))
    problems, fields = [], []
    worst = max(figures["max_abs_error"], figures.get("decode_max_abs_error", 0.0))
    if max_abs_error is not None and worst > max_abs_error:
        problems.append(f"max abs error {worst:.4g} > {max_abs_error:g}")
        fields.append(f"{section}.max_abs_error")
    if min_agreement is not None and agreement < min_agreement:
        name = "top-1 agreement" if "top1_agreement" in figures else "min embedding cosine"
        problems.append(f"{name} {agreement:.4f} < {min_agreement:g}")
        fields.append(f"{section}.min_agreement")
    figures["passed"] = not problems
    if problems:
        raise DiscrepancyError(
            f"{what or section}: the ONNX model's outputs differ from the reference on {figures['compared']} "
            f"{'examples' if task == 'sequence-classification' else 'tokens'}: {'; '.join(problems)} "
            f"(mean abs error {figures['mean_abs_error']:.4g}, reference |max| {figures['reference_abs_max']:.4g}). "
            f"Loosen {' / '.join(fields)} only if this loss is acceptable."
        )
    return figures
