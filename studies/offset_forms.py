"""Cheaper forms of the int4 minmax graph's per-block offsets, against its exact fp16 tables.

    flock /tmp/compress-heavy.lock .venv/bin/python -m studies.offset_forms [--pairs 8] [--threads 2]
        [--work /tmp/compress-offset-forms] [--out benchmarks/results/fast_decoder/vnni/offsets]

The minmax graph (studies.fast_decoder's `fused int4 minmax (Q4_1's grid)`, compress/quant/ort.py
`_add_offsets`) with `offset_roundings: 0` (the default) adds to each 4-bit projection the block sums of its
input times a [blocks, N] table of offsets, stored fp16 and read as fp32 (ONNX Runtime folds the Cast): about
13 MB a token for SmolLM2, beside the 4-bit weights, and a MatMul and an Add per projection. The two forms
tried here (the quantizer writes the second with `offset_roundings`):
- `int8 table`: the offsets table as an 8-bit MatMulNBits (blocks of 16 rows, accuracy level 4): a quarter of
  the bytes, the same nodes;
- `folded into K`: the block sums concatenated to the projection's input and the offsets appended to its
  4-bit weights as extra rows, twice (a 4-bit rounding and a 4-bit rounding of what it left) or three times,
  so the offsets' MatMul and Add go and one Concat comes (ort.py `_fold_offsets`, `offset_roundings` 2 or 3).
Each is scored against the fp32 fused graph on held-out Shakespeare (KL, perplexity, top-1 agreement:
studies.smooth_blocks' windows) and timed against the fp16 table in pairs of fresh processes
(studies.decode_ab). Writes summary.md (and each pair's results) to --out."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from studies.recipes import bare_copy

ROW = "fused int4 minmax (Q4_1's grid)"  # studies.fast_decoder's row


def _offset_nodes(graph):
    """(projection, its Add, the offsets MatMul, the Cast of its fp16 table) of each offset correction."""
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    for n in list(graph.node):
        if n.op_type == "MatMulNBits" and n.output[0].endswith("/codes"):
            add = readers[n.output[0]][0]
            offsets = producer[next(i for i in add.input if i != n.output[0])]
            yield n, add, offsets, producer[offsets.input[1]]


def int8_table(src: Path, dst: Path) -> int:
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src / "model.onnx"))
    g, block = model.graph, 16
    inits = {i.name: i for i in g.initializer}
    done = 0
    for _, _, offsets, cast in list(_offset_nodes(g)):
        table = numpy_helper.to_array(inits[cast.input[0]]).astype(np.float32)  # [blocks, N]
        kb, n = table.shape
        padded = np.zeros((-(-kb // block) * block, n), np.float32)
        padded[:kb] = table
        blocks = padded.T.reshape(n, -1, block)
        scale = np.abs(blocks).max(-1) / 127.0
        scale[scale == 0] = 1.0
        codes = (np.clip(np.round(blocks / scale[..., None]), -127, 127) + 128).astype(np.uint8)
        name = offsets.name + "_Q8"
        g.initializer.extend([numpy_helper.from_array(codes, name + "/B"),
                              numpy_helper.from_array(scale.reshape(-1).astype(np.float32), name + "/scales")])
        node = helper.make_node("MatMulNBits", [offsets.input[0], name + "/B", name + "/scales"],
                                list(offsets.output), name=name, domain="com.microsoft", K=kb, N=n, bits=8,
                                block_size=block, accuracy_level=4)
        g.node.insert(list(g.node).index(offsets), node)
        for gone in (offsets, cast):
            g.node.remove(gone)
        g.initializer.remove(inits[cast.input[0]])
        done += 1
    bare_copy(src, dst, model)
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/compress-offset-forms"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fast_decoder/vnni/offsets"))
    args = ap.parse_args(argv)
    import shutil

    from studies.decode_ab import compare
    from studies.fast_decoder import VARIANTS, build
    from studies.smooth_blocks import Fp32Reference

    *export, (quantize, options) = VARIANTS[ROW][1]

    def built(roundings: int) -> Path:  # the row's graph with `offset_roundings`, built in --work
        return Path(build(export + [(quantize, {**options, "offset_roundings": roundings})], args.work, print))

    table = built(0)
    forms = {"int8 table": args.work / "int8-table", "folded into K": built(2),
             "folded into K, 3 roundings": built(3)}
    shutil.rmtree(forms["int8 table"], ignore_errors=True)
    print(f"int8 table: {int8_table(table, forms['int8 table'])} offset corrections rewritten", flush=True)
    paths = {"fp16 table": table, **forms}

    reference = Fp32Reference(args.threads)
    quality = {}
    for label, path in paths.items():
        quality[label] = reference.score(path)
        print(label, quality[label], flush=True)

    command = " ".join(["flock /tmp/compress-heavy.lock .venv/bin/python -m studies.offset_forms",
                        *map(shlex.quote, argv or sys.argv[1:])])
    lines = ["# The int4 minmax graph's offsets in cheaper forms", "", f"Made by: `{command}`", "",
             "Quality against the fp32 fused graph (held-out Shakespeare, 16 windows of 256 tokens):", "",
             "| form | KL | perplexity | top-1 agreement |", "| --- | --- | --- | --- |",
             *[f"| {k} | {v['kl']} | {v['perplexity']} | {v['top1_agreement']} |" for k, v in quality.items()],
             "", "Timed pair by pair against the fp16 table:", ""]
    for label in forms:
        slug = label.replace(",", "").replace(" ", "-")
        compare([(label, str(paths[label]), "ort-cpu"), ("fp16 table", str(table), "ort-cpu")],
                args.pairs, args.threads, args.out / slug, f"Offsets as {label} against the fp16 table",
                command)
        result = json.loads((args.out / slug / "results.json").read_text())
        dec, pre = result["decode_ratio_per_pair"], result["prefill_ratio_per_pair"]
        lines.append(f"- {label}: decode {np.median(dec):.3f}x the fp16 table's ({sum(r > 1 for r in dec)} of "
                     f"{len(dec)} pairs faster), prefill {np.median(pre):.3f}x ([pairs]({slug}/summary.md))")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    (args.out / "quality.json").write_text(json.dumps(quality, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
