"""ONNX Runtime's CPU kernels for a mixture of experts, as the fused graph writes it: one MoE node in fp32 against
QMoE with the experts int8 per row (what `quantize: ort-int8-dynamic` writes) and int4 in blocks of 32 (weight_bits 4),
at the shapes of real models' expert layers, for one decode token and a 128-token prefill.

    flock /tmp/compress-heavy.lock .venv/bin/python -m studies.moe_kernels [--rounds 3] [--threads 2]
        [--out benchmarks/results/moe_kernels]

Each (shape, variant) is timed in its own process (random weights and router logits, seed 0; the graphs are the
ones compress.quant.ort.quantize_experts makes from the fp32 node), the variants taking turns over --rounds rounds;
medians of the rounds' medians. The bandwidth column divides the expert bytes one decode token reads (k of the
experts) by its time."""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# hidden, expert width, experts, experts per token (config.json of each model)
SHAPES = {"OLMoE-1B-7B": (2048, 1024, 64, 8), "Qwen3-30B-A3B": (2048, 768, 128, 8)}
VARIANTS = {"fp32 MoE": None, "QMoE int8 per row": 8, "QMoE int4 b32": 4}
TOKENS = {"decode (1 token)": 1, "prefill (128 tokens)": 128}


def graph(shape: str, bits: int | None):
    """One MoE node (SwiGLU experts, gate / up rows interleaved) with the shape's weights, quantized as the
    quantize pass does when `bits` is set."""
    import onnx
    from onnx import TensorProto, helper

    from compress.quant.ort import quantize_experts

    hidden, inter, experts, k = SHAPES[shape]
    rng = np.random.default_rng(0)
    fc1 = (rng.standard_normal((experts, 2 * inter, hidden)) * 0.02).astype(np.float32)
    fc2 = (rng.standard_normal((experts, hidden, inter)) * 0.02).astype(np.float32)
    node = helper.make_node("MoE", ["x", "router", "fc1", "", "fc2"], ["y"], "moe", domain="com.microsoft", k=k,
                            activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1)
    g = helper.make_graph([node], "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["t", hidden]),
                                          helper.make_tensor_value_info("router", TensorProto.FLOAT, ["t", experts])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["t", hidden])],
                          [onnx.numpy_helper.from_array(fc1, "fc1"), onnx.numpy_helper.from_array(fc2, "fc2")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    if bits:
        quantize_experts(model, bits, 32, [])
    read = sum(t.ByteSize() for t in model.graph.initializer) * k / experts  # the experts one token reads
    return model, read


def one(shape: str, variant: str, threads: int, repeats: int = 20) -> dict:
    """Median ms of the variant's node per token count, in this process."""
    import tempfile

    import onnx
    import onnxruntime as ort

    model, read = graph(shape, VARIANTS[variant])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    with tempfile.TemporaryDirectory(prefix="moe-kernels-") as tmp:  # weights outside the proto: over 2 GB fp32
        onnx.save(model, f"{tmp}/moe.onnx", save_as_external_data=True, location="moe.onnx.data")
        session = ort.InferenceSession(f"{tmp}/moe.onnx", opts, providers=["CPUExecutionProvider"])
    hidden, _, experts, _ = SHAPES[shape]
    rng = np.random.default_rng(1)
    out = {"read_bytes_per_token": read}
    for label, t in TOKENS.items():
        feeds = {"x": rng.standard_normal((t, hidden)).astype(np.float32),
                 "router": rng.standard_normal((t, experts)).astype(np.float32)}
        for _ in range(3):
            session.run(None, feeds)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, feeds)
            times.append((time.perf_counter() - start) * 1e3)
        out[label] = statistics.median(times)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "moe_kernels")
    ap.add_argument("--one", nargs=2, metavar=("SHAPE", "VARIANT"), help=argparse.SUPPRESS)  # a worker
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(*args.one, args.threads)))
        return 0
    runs: dict = {}
    for r in range(args.rounds):
        for shape in SHAPES:
            for variant in VARIANTS:
                got = subprocess.run([sys.executable, "-m", "studies.moe_kernels", "--one", shape, variant,
                                      "--threads", str(args.threads)], capture_output=True, text=True, check=True,
                                     cwd=ROOT)
                runs.setdefault(shape, {}).setdefault(variant, []).append(json.loads(got.stdout.splitlines()[-1]))
                print(f"round {r + 1}: {shape}, {variant}: {runs[shape][variant][-1]}", flush=True)
    write(runs, args)
    return 0


def write(runs: dict, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(runs, indent=1))
    lines = ["# ONNX Runtime's CPU mixture-of-experts kernels (one node, real models' expert shapes)", "",
             f"`flock /tmp/compress-heavy.lock .venv/bin/python -m studies.moe_kernels --rounds {args.rounds} "
             f"--threads {args.threads}`: {platform_line(args.threads)}; every (shape, variant) in its own process, "
             "the variants taking turns; median over the rounds of each process's median of 20 runs.", "",
             "| shape (hidden, expert width, experts, per token) | variant | decode ms | x fp32 | GB/s read | "
             "prefill 128 ms | x fp32 |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for shape, variants in runs.items():
        med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in variants.items()}
        base = med["fp32 MoE"]
        for v, m in med.items():
            d, p = m["decode (1 token)"], m["prefill (128 tokens)"]
            lines.append(f"| {shape} {SHAPES[shape]} | {v} | {d:.3f} | {base['decode (1 token)'] / d:.2f}x | "
                         f"{m['read_bytes_per_token'] / d / 1e6:.1f} | {p:.1f} | "
                         f"{base['prefill (128 tokens)'] / p:.2f}x |")
    (args.out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def platform_line(threads: int) -> str:
    import platform

    import onnxruntime as ort

    return f"onnxruntime {ort.__version__}, {platform.machine()}, {threads} threads"


if __name__ == "__main__":
    sys.exit(main())
