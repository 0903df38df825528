"""Where a decode step of an exported causal LM spends its time, per ONNX operator type (ONNX Runtime's profiler).

    python -m studies.ort_profile runs/smollm2-edge/int8-only/02-quantize [--steps 32] [--repeats 1] [--threads 2]
    python -m studies.ort_profile 'fast_decoder:fused int4 minmax (Q4_1'"'"'s grid)'   # a row of that study

Runs one 128-token prefill and `--steps` greedy decode steps with the KV cache through compress.edge (a
warm-up generation, then `--repeats` profiled ones), then prints each operator type's share of the kernel
time and how many nodes of it ran per call (`--steps 0`: the prefill alone). What it showed on SmolLM2's int8
export is in README.md (Results, Edge LLM)."""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from compress.edge import EdgeModel  # the ONNX Runtime runner; does not import torch
from studies.decode_ab import resolve  # builds a fast_decoder row (and imports torch) only when asked for one


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="an ONNX checkpoint directory of a causal LM (exported with past), or "
                    "fast_decoder:LABEL (a row of studies.fast_decoder, built or reused from its cache)")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="generations profiled (after one unprofiled warm-up)")
    args = ap.parse_args(argv)

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="ort-profile-"), "profile")
    path = resolve(args.checkpoint)[0]
    model = EdgeModel(path, threads=args.threads, session_options=opts)
    prompt = np.random.RandomState(0).randint(100, 20000, (1, 128)).astype(np.int64)
    calls = args.steps + 1  # one prefill + `steps` decode steps a generation
    for _ in range(1 + args.repeats):  # the first is a warm-up (it allocates the buffers), left out below
        model.generate(prompt, calls)
    events = json.loads(Path(model.session.end_profiling()).read_text())
    runs = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    after = runs[calls]  # the first run after the warm-up
    calls *= args.repeats
    time_us, nodes = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= after:
            op = e["args"].get("op_name", "?")
            time_us[op] += e["dur"]
            nodes[op] += 1
    total = sum(time_us.values())
    print(f"{args.checkpoint}: {sum(nodes.values()) / calls:.0f} nodes per call, "
          f"{total / 1e3 / calls:.1f} ms kernel time per call ({calls} calls, {args.threads} threads)")
    for op, us in time_us.most_common(15):
        print(f"  {op:34s} {us / total:6.1%}  {nodes[op] / calls:6.0f} nodes per call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
