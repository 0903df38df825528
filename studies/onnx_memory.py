"""Peak memory of one ONNX decoder stored two ways: weights inside model.onnx, or in model.onnx.data beside it
(what `export` / `quantize` write for graphs over 64 MB, compress.onnx_tools.EXTERNAL_ABOVE).

    flock /tmp/compress-heavy.lock .venv/bin/python -m studies.onnx_memory [--rounds 3]
        [--work /tmp/compress-fast-decoder] [--out benchmarks/results/onnx_memory]

The checkpoint is SmolLM2-135M's fused int8 graph (studies/fast_decoder.py's recipe, cached in --work). Each
storage is written once, then measured by `benchmarks.harness.measure` on ort-cpu in its own process (2
threads, a 128-token prompt and 32 greedy tokens; no quality scoring): its resident memory after loading and
its peak (VmHWM). Rounds alternate the two storages. Results: --out/results.json and README.md."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_storages(checkpoint: Path, work: Path) -> dict[str, Path]:
    """Bare ONNX folders (graph, config, tokenizer; no manifest) of `checkpoint`, one per storage."""
    import shutil

    import onnx

    from compress import onnx_tools
    from studies.recipes import derived

    out = {}
    for name, external in (("inline", "never"), ("external", "always")):
        folder = derived(checkpoint, f"onnx-memory-{name}", work)
        if not (folder / "tokenizer.json").exists():
            onnx_tools.save_model(onnx.load(str(checkpoint / onnx_tools.ONNX_FILE)), folder, external)
            for f in checkpoint.iterdir():
                if f.is_file() and not f.name.startswith(onnx_tools.ONNX_FILE) and f.name != "manifest.json":
                    shutil.copy2(f, folder / f.name)
        out[name] = folder
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/compress-fast-decoder"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "onnx_memory")
    args = ap.parse_args(argv)
    from benchmarks.config import BenchmarkConfig, LatencyConfig
    from benchmarks.harness import measure
    from compress.runtime import set_threads
    from studies.fast_decoder import EVAL, FUSED, INT8, build

    set_threads(2)
    checkpoint = Path(build(FUSED + [INT8], args.work, print))
    folders = write_storages(checkpoint, args.work)
    settings = BenchmarkConfig(backends=["ort-cpu"], threads=2, quality=[], data=EVAL,
                               latency=LatencyConfig(warmup=1, repeats=2))
    runs: dict[str, list[dict]] = {name: [] for name in folders}
    for k in range(args.rounds):
        for name, folder in folders.items():
            rec = measure(str(folder), backend="ort-cpu", settings=settings, label=name,
                          work_dir=args.work / "harness")
            if "error" in rec:
                raise RuntimeError(f"{name}: {rec['error']}")
            runs[name].append({"peak_rss_mb": rec["memory"]["peak_rss_mb"],
                               "rss_after_load_mb": rec["memory"]["rss_after_load_mb"], "load_s": rec["load_s"],
                               "tokens": rec["latency"]["generated_ids"]})
            print(f"round {k + 1} {name}: {runs[name][-1]['peak_rss_mb']:.0f} MB peak", flush=True)
    machine = rec["machine"]
    same_tokens = len({json.dumps(r["tokens"]) for rs in runs.values() for r in rs}) == 1
    summary = {name: {key: statistics.median(r[key] for r in rs) for key in ("peak_rss_mb", "rss_after_load_mb",
                                                                            "load_s")}
               for name, rs in runs.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    command = "flock /tmp/compress-heavy.lock .venv/bin/python -m studies.onnx_memory " + " ".join(
        argv if argv is not None else sys.argv[1:])
    (args.out / "results.json").write_text(json.dumps(
        {"command": command.strip(), "machine": machine, "checkpoint": str(checkpoint), "same_tokens": same_tokens,
         "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "summary": summary, "runs": runs},
        indent=1))
    inline, external = summary["inline"], summary["external"]
    lines = ["# Peak memory of the fused int8 SmolLM2-135M, weights inline or in model.onnx.data", "",
             f"Command: `{command.strip()}` ({args.rounds} rounds, medians; each by "
             "benchmarks.harness.measure on ort-cpu in its own process, 2 threads, 128-token prompt + 32 greedy "
             "tokens). Same tokens from both storages: "
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
