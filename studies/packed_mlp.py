"""Packed gate_up against separate gate / up MatMuls: the same quantized weights, decode timed side by side.

    flock /tmp/compress-heavy.lock .venv/bin/python -m studies.packed_mlp [CHECKPOINT] [--pairs 10] [--threads 2]
        [--work /tmp/compress-packed-mlp] [--out benchmarks/results/fast_decoder/packed_mlp]

CHECKPOINT is a fused decoder graph quantized symmetrically (MatMulNBits without zero points: int8, or int4
rtn), as compress.fused writes it: gate and up as one MatMul [gate | up] and a Split, or `fast_decoder:LABEL`.
Default: the `fused int8 (MatMulNBits b32)` row of studies.fast_decoder (SmolLM2-135M), built or reused from
its cache.
The study writes the same graph with each packed MatMulNBits cut into the two it was packed from (the same
bytes: blocks run along K, so cutting the output columns moves no block), checks both give the same logits,
then times the two in pairs of fresh processes back to back (studies.decode_ab: the harness's greedy loop).
Writes summary.md and results.json to --out."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

from studies.recipes import bare_copy

DEFAULT = "fused int8 (MatMulNBits b32)"  # studies.fast_decoder's row


def unpack(src: Path, dst: Path) -> int:
    """Write `src`'s graph to `dst` with every packed gate_up MatMulNBits + Split as two MatMulNBits; the
    other files are linked but the manifest (its table no longer fits: a bare ONNX folder). Returns how many
    were cut."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    nodes, cut = [], 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and "gate_up_proj" in node.name:
            continue  # written as two where its Split is
        matmul = producer.get(node.input[0]) if node.op_type == "Split" else None
        if matmul is None or matmul.op_type != "MatMulNBits" or "gate_up_proj" not in matmul.name:
            nodes.append(node)
            continue
        if len(matmul.input) > 3:
            raise SystemExit(f"{matmul.name} has zero points: this study takes symmetric weights (int8, int4 rtn)")
        attrs = {a.name: helper.get_attribute_value(a) for a in matmul.attribute}
        sizes = numpy_helper.to_array(inits[node.input[1]]).tolist()
        weight, scales = (numpy_helper.to_array(inits[n]) for n in matmul.input[1:3])
        scales = scales.reshape(attrs["N"], -1)
        begin = 0
        for part, (size, out) in enumerate(zip(sizes, node.output)):
            name = f"{matmul.name}/part{part}"
            model.graph.initializer.extend([
                numpy_helper.from_array(weight[begin: begin + size], f"{name}.weight"),
                numpy_helper.from_array(scales[begin: begin + size].reshape(-1), f"{name}.scales")])
            nodes.append(helper.make_node("MatMulNBits", [matmul.input[0], f"{name}.weight", f"{name}.scales"],
                                          [out], name=name, domain="com.microsoft", **{**attrs, "N": size}))
            begin += size
        cut += 1
    used = {i for n in nodes for i in n.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:], model.graph.node[:]
    model.graph.initializer.extend(kept)
    model.graph.node.extend(nodes)
    bare_copy(src, dst, model)
    return cut


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/compress-packed-mlp")
    ap.add_argument("--out", default="benchmarks/results/fast_decoder/packed_mlp")
    args = ap.parse_args(argv)
    from compress.edge import EdgeModel
    from studies.decode_ab import compare, resolve

    packed = Path(resolve(args.checkpoint or f"fast_decoder:{DEFAULT}")[0])
    unpacked = Path(args.work) / "unpacked"
    cut = unpack(packed, unpacked)
    ids = np.random.RandomState(1).randint(100, 20000, (1, 64))
    diff = float(np.abs(EdgeModel(packed, threads=args.threads).logits(ids)
                        - EdgeModel(unpacked, threads=args.threads).logits(ids)).max())
    print(f"{cut} packed MatMulNBits cut in two; max |logits difference| {diff:.2e}")
    what = args.checkpoint or f"studies.fast_decoder's `{DEFAULT}`"
    command = " ".join(["flock /tmp/compress-heavy.lock .venv/bin/python -m studies.packed_mlp",
                        *map(shlex.quote, argv or sys.argv[1:])])
    compare([("packed gate_up", str(packed), "ort-cpu"), ("gate, up", str(unpacked), "ort-cpu")], args.pairs,
            args.threads, Path(args.out), "Packed gate_up against separate gate / up MatMuls (the same weights)",
            command, notes=[f"Graph: {what}; {cut} MLPs cut in two for the second variant; max |logits "
                            f"difference| {diff:.1e}."])
    return 0


if __name__ == "__main__":
    sys.exit(main())
