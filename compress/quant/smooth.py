"""SmoothQuant-style smoothing of an ONNX graph before int8 activations (Xiao et al., 2023).

Static int8 gives each activation tensor ONE scale, fixed at calibration. In Llama-family models a few
input channels of the projections carry values two orders of magnitude above the rest (the RMSNorm gains
amplify them, and the SwiGLU product feeding `down_proj` has its own), so one scale rounds the typical
channels to a handful of levels. Smoothing divides channel j of such an activation by s_j and multiplies
row j of the consuming weights by s_j: the float model computes exactly the same function, but the outliers
move into the weights, which are quantized per output channel and tolerate them. With
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), alpha sets how much of the difficulty moves.

Only exact rewrites are made, where the division can be folded into a constant of the producer:
- `Mul(x, gamma)` (an RMSNorm's gain) or a LayerNormalization-family node's scale (and bias), whose output
  feeds only MatMuls with constant weights (q/k/v, gate/up) and shape queries;
- `Mul(act(gate), up)` where `up` is a MatMul with a constant weight used nowhere else, or up's half of a
  packed [gate | up] MatMul and Split (the fused graph): its weight's columns are divided instead (the input
  of `down_proj`).
Every weight matrix touched must belong to that one node, so no other path of the graph changes; a norm
gain the exporter shared between nodes (identical values, through Identity nodes) gets a copy of its own.

With `insert` (for dynamic int8, whose one scale per tensor per run has the same problem) an activation with
no constant to fold into is divided by an inserted per-channel Mul that only its weight consumers read:
BERT's LayerNorm outputs also feed the residual stream, and its GELU outputs have no producer constant. The
float function stays the same; each Mul costs one elementwise pass over its activation.

Block-wise int8 (MatMulNBits at accuracy level 4) quantizes activations per block of channels, and one outlier
channel sets its whole block's scale: smoothing without `insert` evens the channels out at no run-time cost."""
from __future__ import annotations

import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_NORMS = {  # op type -> input indices of the per-channel scale (and bias) applied to output 0
    "LayerNormalization": (1, 2),
    "SimplifiedLayerNormalization": (1,),
    "SkipLayerNormalization": (2, 3),
    "SkipSimplifiedLayerNormalization": (2,),
}


@dataclass
class Group:
    activation: str          # the tensor whose channels are smoothed
    consumers: list          # MatMul nodes reading it (constant weights [K, N])
    producer: object         # the node that makes it
    divide_vectors: list     # initializers [K] of the producer to divide by s (norm gain / bias)
    divide_columns: str | None = None  # an initializer [*, N] some of whose columns are divided by s (up_proj)
    columns: tuple[int, int] | None = None  # which: all of them, or up's half of a packed gate_up
    inserted: bool = False   # nothing to fold into: a Mul by 1 / s is inserted before the consumers


@dataclass
class GraphIndex:
    """Who makes and who reads each tensor of a graph, built once and shared by the passes over it."""
    inits: dict      # initializer name -> TensorProto
    uses: dict       # tensor name -> how many node inputs read it
    consumers: dict  # tensor name -> nodes reading it
    producers: dict  # tensor name -> the node making it
    outputs: set     # graph output names

    @classmethod
    def of(cls, model) -> "GraphIndex":
        g = model.graph
        uses: dict[str, int] = defaultdict(int)
        consumers: dict[str, list] = defaultdict(list)
        for node in g.node:
            for name in node.input:
                uses[name] += 1
                consumers[name].append(node)
        return cls({i.name: i for i in g.initializer}, uses, consumers,
                   {o: n for n in g.node for o in n.output}, {o.name for o in g.output})

    def constant_source(self, name: str) -> str | None:
        """The initializer a tensor is, directly or through Identity nodes (how the exporter shares
        deduplicated weights); None for a computed tensor."""
        for _ in range(8):
            if name in self.inits:
                return name
            node = self.producers.get(name)
            if node is None or node.op_type != "Identity":
                return None
            name = node.input[0]
        return None


def find_groups(model, skip: set[str] = frozenset(), index: GraphIndex | None = None,
                insert: bool = False) -> list[Group]:
    """Every activation that can be smoothed exactly by folding (see the module docstring); with `insert`, also
    every other activation read by weight MatMuls (or fused Attention nodes) outside `skip`, smoothed by an
    inserted Mul. Groups whose consumers are all in `skip` (left in float) are left alone."""
    ix = index or GraphIndex.of(model)
    inits, uses, consumers, producers, outputs = ix.inits, ix.uses, ix.consumers, ix.producers, ix.outputs

    def own(name: str) -> bool:
        return name in inits and uses[name] == 1

    def weight_matmul(node) -> bool:
        return node.op_type == "MatMul" and own(node.input[1]) and len(inits[node.input[1]].dims) == 2

    def vector(name: str, k: int) -> bool:  # shared vectors are fine: smooth() gives the node its own copy
        source = ix.constant_source(name)
        return source is not None and list(inits[source].dims) == [k]

    def weight_consumer(node, tensor: str) -> bool:  # `tensor` times a weight of the node's own
        return node.input[0] == tensor and (weight_matmul(node) or node.op_type == "Attention" and len(
            node.input) > 1 and own(node.input[1]) and len(inits[node.input[1]].dims) == 2)

    def folded(tensor: str, cons: list) -> Group | None:  # the division folded into a constant of the producer
        if not all(weight_matmul(c) for c in cons):
            return None
        k = inits[cons[0].input[1]].dims[0]
        p = producers.get(tensor)
        if p is None or any(inits[c.input[1]].dims[0] != k for c in cons):
            return None
        if p.op_type in _NORMS and p.output[0] == tensor:
            vecs = [p.input[i] for i in _NORMS[p.op_type] if i < len(p.input) and p.input[i]]
            return Group(tensor, cons, p, vecs) if vecs and all(vector(v, k) for v in vecs) else None
        if p.op_type != "Mul":
            return None
        vec = [i for i in p.input if vector(i, k)]
        if vec:
            return Group(tensor, cons, p, vec[:1])
        for i in p.input:  # Mul(act(gate), up): divide up_proj's columns
            up = producers.get(i)
            if up is None or consumers[i] != [p] or i in outputs:
                continue
            # up's own MatMul, or up as a slice of a packed [gate | up] MatMul
            span = (up.input[1], 0, inits[up.input[1]].dims[1]) if weight_matmul(up) else \
                _split_columns(up, i, ix, weight_matmul)
            if span and span[2] - span[1] == k:
                return Group(tensor, cons, p, [], divide_columns=span[0], columns=span[1:])
        return None

    groups = []
    for tensor, readers in consumers.items():
        cons = [c for c in readers if c.op_type != "Shape"]  # a Shape reads no values: smoothing keeps it
        if tensor in outputs or tensor in inits or not cons:
            continue
        group = folded(tensor, cons)
        if group is None and insert:
            quantized = [c for c in cons if c.name not in skip and weight_consumer(c, tensor)]
            if quantized and len({inits[c.input[1]].dims[0] for c in quantized}) == 1:
                group = Group(tensor, quantized, producers.get(tensor), [], inserted=True)
        if group is not None and not all(c.name in skip for c in group.consumers):
            groups.append(group)
    return groups


def _split_columns(split, tensor: str, ix: GraphIndex, weight_matmul) -> tuple[str, int, int] | None:
    """(weight, first column, end column) when `tensor` is one output of a last-axis Split with constant
    sizes of a MatMul whose constant weight and output belong to it alone: the fused graph's packed gate_up."""
    if split.op_type != "Split" or len(split.input) < 2 or split.input[1] not in ix.inits:
        return None
    from onnx import helper, numpy_helper

    matmul = ix.producers.get(split.input[0])
    if matmul is None or not weight_matmul(matmul) or ix.consumers[split.input[0]] != [split]:
        return None
    axis = next((helper.get_attribute_value(a) for a in split.attribute if a.name == "axis"), 0)
    sizes = numpy_helper.to_array(ix.inits[split.input[1]]).tolist()
    if axis != -1 or sum(sizes) != ix.inits[matmul.input[1]].dims[1]:  # the writer splits on axis -1
        return None
    j = list(split.output).index(tensor)
    return matmul.input[1], sum(sizes[:j]), sum(sizes[: j + 1])


def channel_absmax(model, tensors: list[str], feeds: list[dict]) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of each tensor over all calibration feeds (ONNX Runtime, CPU)."""
    import onnx
    import onnxruntime as ort

    from .. import onnx_tools

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in tensors:
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    with tempfile.TemporaryDirectory() as tmp:
        path = onnx_tools.save_model(probe, Path(tmp), "always")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the probed tensors
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        amax: dict[str, np.ndarray] = {}
        for feed in feeds:
            for name, value in zip(tensors, session.run(tensors, feed)):
                m = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
                amax[name] = m if name not in amax else np.maximum(amax[name], m)
    return amax


def smooth(model, feeds: list[dict], alpha: float, skip: set[str] = frozenset(), insert: bool = False) -> dict:
    """Smooth `model` in place (`insert`: see find_groups); return what was done (for the manifest)."""
    from onnx import helper, numpy_helper

    ix = GraphIndex.of(model)
    groups = find_groups(model, skip, ix, insert)
    if not groups:
        return {"alpha": alpha, "groups": 0}
    inits, uses = ix.inits, ix.uses
    amax = channel_absmax(model, [gr.activation for gr in groups], feeds)
    for gr in groups:  # a norm gain shared with other nodes (deduplicated by the exporter) gets its own copy
        for j, name in enumerate(gr.divide_vectors):
            if name in inits and uses[name] == 1:
                continue
            source = ix.constant_source(name)
            copy = numpy_helper.from_array(numpy_helper.to_array(inits[source]),
                                           f"{source}.smooth.{gr.producer.name}")
            model.graph.initializer.append(copy)
            inits[copy.name] = model.graph.initializer[-1]
            gr.producer.input[list(gr.producer.input).index(name)] = copy.name
            uses[name] -= 1
            gr.divide_vectors[j] = copy.name

    def replace(name: str, array: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))

    ratios, inserted = [], []
    for gr in groups:
        weights = {c.input[1]: numpy_helper.to_array(inits[c.input[1]]) for c in gr.consumers}
        x_max = amax[gr.activation].astype(np.float64)
        w_max = np.max([np.abs(w).max(axis=1) for w in weights.values()], axis=0).astype(np.float64)
        s = np.power(np.maximum(x_max, 1e-5), alpha) / np.power(np.maximum(w_max, 1e-5), 1 - alpha)
        s = np.where(x_max > 0, np.clip(s, 1e-4, 1e4), 1.0)
        for name, w in weights.items():
            replace(name, w * s[:, None])
        for name in gr.divide_vectors:
            replace(name, numpy_helper.to_array(inits[name]) / s)
        if gr.divide_columns:
            w = numpy_helper.to_array(inits[gr.divide_columns]).copy()
            w[:, slice(*gr.columns)] /= s[None, :]
            replace(gr.divide_columns, w)
        if gr.inserted:
            inverse = f"{gr.activation}.smooth_inverse"
            model.graph.initializer.append(numpy_helper.from_array((1 / s).astype(np.float32), inverse))
            mul = helper.make_node("Mul", [gr.activation, inverse], [f"{gr.activation}.smoothed"],
                                   name=f"{gr.activation}.smooth")
            inserted.append(mul)
            for c in gr.consumers:
                c.input[0] = mul.output[0]
        smoothed = x_max / s
        ratios.append((float(x_max.max() / max(np.median(x_max), 1e-12)),
                       float(smoothed.max() / max(np.median(smoothed), 1e-12))))
    first_reader: dict[str, int] = {}
    for i, node in enumerate(model.graph.node):
        for name in node.input:
            first_reader.setdefault(name, i)
    for mul in sorted(inserted, key=lambda m: -first_reader[m.output[0]]):  # from the back: the rest stay valid
        model.graph.node.insert(first_reader[mul.output[0]], mul)
    return {"alpha": alpha, "groups": len(groups), "inserted_muls": len(inserted),
            "max_over_median_before": round(float(np.median([r[0] for r in ratios])), 2),
            "max_over_median_after": round(float(np.median([r[1] for r in ratios])), 2)}
