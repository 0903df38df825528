"""Packed gate_up against separate gate / up MatMuls: the same quantized weights, decode timed side by side.

    flock /tmp/compress-heavy.lock .venv/bin/python -m studies.packed_mlp [CHECKPOINT] [--pairs 10] [--threads 2]
        [--work /tmp/compress-packed-mlp] [--out benchmarks/results/fast_decoder/packed_mlp]

CHECKPOINT is a fused decoder graph quantized symmetrically (MatMulNBits without zero points: int8, or int4
rtn), as compress.fused writes it: gate and up as one MatMul [gate | up] and a Split. Default: the
`fused int8 (MatMulNBits b32)` row of studies.fast_decoder (SmolLM2-135M), built or reused from its cache. The study writes the
same graph with each packed MatMulNBits cut into the two it was packed from (the same bytes: blocks run along
K, so cutting the output columns moves no block), checks both give the same logits, then times greedy decoding
(a 128-token prompt, 32 new tokens, compress.edge's loop) in fresh processes, the two taking turns `--pairs`
times. Writes summary.md and results.json to --out."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROMPT, NEW_TOKENS, REPEATS = 128, 32, 5
DEFAULT = "fused int8 (MatMulNBits b32)"  # studies.fast_decoder's row


def unpack(src: Path, dst: Path) -> int:
    """Write `src`'s graph to `dst` with every packed gate_up MatMulNBits + Split as two MatMulNBits; the
    other files are linked. Returns how many were cut."""
    import onnx
    from onnx import helper, numpy_helper

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name not in ("model.onnx", "model.onnx.data") and not (dst / f.name).exists():
            (dst / f.name).symlink_to(f.resolve())
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
            nodes.append(helper.make_node("MatMulNBits", [matmul.input[0], f"{name}.weight", f"{name}.scales"], [out],
                                          name=name, domain="com.microsoft", **{**attrs, "N": size}))
            begin += size
        cut += 1
    used = {i for n in nodes for i in n.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:], model.graph.node[:]
    model.graph.initializer.extend(kept)
    model.graph.node.extend(nodes)
    onnx.save(model, str(dst / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=1024)
    return cut


def time_decode(path: str, threads: int) -> list[float]:
    """ms per decoded token of REPEATS greedy runs after one warm-up, in this process."""
    from compress.edge import EdgeModel

    model = EdgeModel(path, threads=threads)
    prompt = np.random.RandomState(0).randint(100, 20000, (1, PROMPT)).astype(np.int64)
    runs = []
    for r in range(REPEATS + 1):
        logits, state = model.prefill(prompt, max_new_tokens=NEW_TOKENS)
        start = time.perf_counter()
        for _ in range(NEW_TOKENS):
            logits, state = model.decode_step(logits.argmax(-1)[:, None], state)
        runs.append((time.perf_counter() - start) / NEW_TOKENS * 1e3)
    return runs[1:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/compress-packed-mlp")
    ap.add_argument("--out", default="benchmarks/results/fast_decoder/packed_mlp")
    ap.add_argument("--time", help=argparse.SUPPRESS)  # child mode: time this graph, print JSON
    args = ap.parse_args(argv)
    if args.time:
        print(json.dumps(time_decode(args.time, args.threads)))
        return 0
    from benchmarks.machine import machine_record
    from compress.edge import EdgeModel

    machine = machine_record()
    if args.checkpoint:
        packed = Path(args.checkpoint)
    else:
        from studies.fast_decoder import VARIANTS, build

        packed = Path(build(VARIANTS[DEFAULT][1], Path("/tmp/compress-fast-decoder"), print))
    unpacked = Path(args.work) / "unpacked"
    cut = unpack(packed, unpacked)
    ids = np.random.RandomState(1).randint(100, 20000, (1, 64))
    diff = float(np.abs(EdgeModel(packed, threads=args.threads).logits(ids)
                        - EdgeModel(unpacked, threads=args.threads).logits(ids)).max())
    print(f"{cut} packed MatMulNBits cut in two; max |logits difference| {diff:.2e}")

    runs = {"packed gate_up": [], "gate, up": []}
    medians = {k: [] for k in runs}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for pair in range(args.pairs):
        for label, path in (("packed gate_up", packed), ("gate, up", unpacked)):
            out = subprocess.run([sys.executable, "-m", "studies.packed_mlp", "--time", str(path),
                                  "--threads", str(args.threads)], capture_output=True, text=True, env=env,
                                 check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs[label] += r
            medians[label].append(statistics.median(r))
            print(f"pair {pair + 1}: {label:15s} {statistics.median(r):.2f} ms/token")
    wins = sum(a < b for a, b in zip(medians["packed gate_up"], medians["gate, up"]))
    med = {k: statistics.median(v) for k, v in runs.items()}
    ratio = med["gate, up"] / med["packed gate_up"]
    what = args.checkpoint or f"studies.fast_decoder's `{DEFAULT}`"
    command = " ".join(["flock /tmp/compress-heavy.lock .venv/bin/python -m studies.packed_mlp", *(argv or sys.argv[1:])])
    lines = [
        "# Packed gate_up against separate gate / up MatMuls (the same weights)", "",
        f"Made by: `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit "
        f"{machine['git_commit']}; {machine['cpu']}, {machine['usable_cores']} usable cores).",
        f"Graph: {what}; {cut} MLPs cut in two for the second variant; max |logits difference| {diff:.1e}.",
        f"Greedy decoding, {PROMPT}-token prompt, {NEW_TOKENS} new tokens, {REPEATS} timed runs per process, "
        f"{args.pairs} processes per variant taking turns, {args.threads} threads.", "",
        "| graph | median ms / token | decode tok/s | per-process medians |", "| --- | --- | --- | --- |"]
    for k in runs:
        lines.append(f"| {k} | {med[k]:.2f} | {1e3 / med[k]:.1f} | "
                     + ", ".join(f"{m:.2f}" for m in medians[k]) + " |")
    lines += ["", f"Packed decodes {ratio:.3f}x as fast; faster in {wins} of {args.pairs} pairs."]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    (out_dir / "results.json").write_text(json.dumps(
        {"checkpoint": str(packed), "command": command, "machine": machine, "threads": args.threads, "pairs": args.pairs, "max_abs_logits_diff": diff,
         "ms_per_token": runs, "process_medians": medians, "ratio": ratio, "packed_faster_pairs": wins}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
