"""Peak memory of one ONNX decoder stored two ways: weights inside model.onnx, or in model.onnx.data beside it
(what `export` / `quantize` write for graphs over 64 MB, compress.onnx_tools.EXTERNAL_ABOVE).

    flock /tmp/compress-heavy.lock .venv/bin/python -m studies.onnx_memory [--rounds 3]
        [--work /tmp/compress-fast-decoder] [--out benchmarks/results/onnx_memory]

The checkpoint is SmolLM2-135M's fused int8 graph (studies/fast_decoder.py's recipe, cached in --work). Each
storage is written once, then loaded by compress.edge.EdgeModel in a fresh process (2 threads), which
generates 32 greedy tokens after a 128-token prompt; the process reports its resident memory after loading
and its peak (VmHWM). Rounds alternate the two storages. Results: --out/results.json and README.md."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(folder: str) -> dict:
    """In this process: load, generate, and the memory figures."""
    import numpy as np

    from compress.edge import EdgeModel

    start = time.perf_counter()
    model = EdgeModel(folder, threads=2)
    loaded = {"load_s": time.perf_counter() - start, "rss_after_load_mb": _status_mb("VmRSS")}
    prompt = np.random.default_rng(0).integers(100, 40000, size=(1, 128), dtype=np.int64)
    tokens = model.generate(prompt, 32)[0, 128:].tolist()
    return {**loaded, "peak_rss_mb": _status_mb("VmHWM"), "tokens": tokens}


def write_storages(checkpoint: Path, work: Path) -> dict[str, Path]:
    import onnx

    from compress import onnx_tools

    out = {}
    for name, external in (("inline", "never"), ("external", "always")):
        folder = work / f"onnx-memory-{name}"
        if not (folder / onnx_tools.ONNX_FILE).exists():
            onnx_tools.save_model(onnx.load(str(checkpoint / onnx_tools.ONNX_FILE)), folder, external)
            onnx_tools.copy_bundle(checkpoint, folder)
        out[name] = folder
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/compress-fast-decoder"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "onnx_memory")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement in this process
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0
    from compress.runtime import set_threads
    from studies.fast_decoder import FUSED, INT8, build

    set_threads(2)
    checkpoint = Path(build(FUSED + [INT8], args.work, print))
    folders = write_storages(checkpoint, args.work)
    runs: dict[str, list[dict]] = {name: [] for name in folders}
    for k in range(args.rounds):
        for name, folder in folders.items():
            proc = subprocess.run([sys.executable, "-m", "studies.onnx_memory", "--measure", str(folder)],
                                  cwd=ROOT, capture_output=True, text=True, check=True,
                                  env=dict(os.environ, OMP_NUM_THREADS="2"))
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {k + 1} {name}: {runs[name][-1]['peak_rss_mb']:.0f} MB peak", flush=True)
    same_tokens = len({json.dumps(r["tokens"]) for rs in runs.values() for r in rs}) == 1
    summary = {name: {key: statistics.median(r[key] for r in rs) for key in ("peak_rss_mb", "rss_after_load_mb",
                                                                            "load_s")}
               for name, rs in runs.items()}
    from benchmarks.machine import machine_record

    machine = machine_record()
    args.out.mkdir(parents=True, exist_ok=True)
    command = "flock /tmp/compress-heavy.lock .venv/bin/python -m studies.onnx_memory " + " ".join(
        argv if argv is not None else sys.argv[1:])
    (args.out / "results.json").write_text(json.dumps(
        {"command": command.strip(), "machine": machine, "checkpoint": str(checkpoint), "same_tokens": same_tokens,
         "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "summary": summary, "runs": runs},
        indent=1))
    inline, external = summary["inline"], summary["external"]
    lines = ["# Peak memory of the fused int8 SmolLM2-135M, weights inline or in model.onnx.data", "",
             f"Command: `{command.strip()}` ({args.rounds} rounds, medians; every load in its own process, "
             "2 threads, 128-token prompt + 32 greedy tokens). Same tokens from both storages: "
             f"{'yes' if same_tokens else 'NO'}. Machine: {machine['cpu']} ({', '.join(machine['cpu_flags'])}), "
             f"onnxruntime {machine['versions'].get('onnxruntime')}, commit {machine['git_commit']}.", "",
             "| storage | peak RSS | RSS after load | load |", "| --- | --- | --- | --- |"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['peak_rss_mb']:.0f} MB | {s['rss_after_load_mb']:.0f} MB | {s['load_s']:.2f} s |")
    lines += ["", f"External data: {100 * (1 - external['peak_rss_mb'] / inline['peak_rss_mb']):.0f}% less peak "
              "memory (ONNX Runtime reads the weights from the file instead of copying them out of the parsed "
              "graph)."]
    (args.out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
