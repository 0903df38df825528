"""Two decoders timed pair by pair: fresh processes taking turns back to back, for speed differences of a few
percent on a machine whose speed drifts.

    flock /tmp/compress-heavy.lock .venv/bin/python -m studies.decode_ab A B --out DIR [--labels NAME_A NAME_B]
        [--pairs 12] [--threads 2]

A and B are each an ONNX checkpoint directory (timed on ort-cpu), a GGUF file (llamacpp-cpu: the `.[llama]`
extra) or `fast_decoder:LABEL`, a row of studies.fast_decoder built or reused from its cache. Every process
opens its model with the harness's backends (benchmarks.backends) and times the harness's greedy loop
(benchmarks.latency.decoder_latency: a 128-token prompt, 32 new tokens, 2 warm-up and 5 timed runs), as one
row of a study's timing round does. The harness's rounds time every row once per round, minutes apart, so
the machine's drift lands on the rows unevenly (on the project's VM the ratio of two rows moved from 0.88 to
1.25 between rounds of one run); here the two of a pair run back to back, and the summary gives the median
of the per-pair ratios, their range, and how many pairs each side won. Writes summary.md and results.json to
--out."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROMPT, NEW_TOKENS, WARMUP, REPEATS = 128, 32, 2, 5
CONTEXT = 256  # llama.cpp's KV cache, as the fast_decoder study sizes it (its perplexity window)


def resolve(target: str) -> tuple[str, str]:
    """(path, backend) of a target (see the module docstring)."""
    if target.startswith("fast_decoder:"):
        from studies.fast_decoder import row

        return row(target.removeprefix("fast_decoder:"))
    return target, "llamacpp-cpu" if target.endswith(".gguf") else "ort-cpu"


def time_once(path: str, backend: str, threads: int) -> dict:
    """One process's timing (the child mode): decode and prefill ms of each timed run, and the tokens."""
    from benchmarks.backends import open_backend
    from benchmarks.latency import decoder_latency
    from benchmarks.worker_spec import Backend

    model = open_backend(path, "auto", "causal-lm", Backend.parse(backend), threads, CONTEXT)
    prompt = np.random.RandomState(0).randint(100, 20000, (1, PROMPT)).astype(np.int64)
    lat = decoder_latency(model, prompt, NEW_TOKENS, WARMUP, REPEATS)
    return {"decode_ms": lat["decode"]["runs_ms"], "prefill_ms": lat["prefill"]["runs_ms"],
            "generated_ids": lat["generated_ids"]}


def _child(path: str, backend: str, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-m", "studies.decode_ab", "--time", path, "--backend", backend,
                          "--threads", str(threads)], capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"timing {path} on {backend} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(variants: list[tuple[str, str, str]], pairs: int, threads: int, out_dir: Path, title: str,
            command: str, notes: list[str] = ()) -> dict:
    """Time two (label, path, backend) variants `pairs` times back to back (the first first in odd pairs, the
    second first in even ones) and write summary.md / results.json to `out_dir`. Returns the results."""
    from benchmarks.machine import machine_record

    machine = machine_record()
    (la, pa, ba), (lb, pb, bb) = variants
    runs = {la: [], lb: []}
    for pair in range(pairs):
        order = [(la, pa, ba), (lb, pb, bb)][:: 1 if pair % 2 == 0 else -1]
        for label, path, backend in order:
            r = _child(path, backend, threads)
            runs[label].append(r)
            ms, pre = statistics.median(r["decode_ms"]) / NEW_TOKENS, statistics.median(r["prefill_ms"])
            print(f"pair {pair + 1}/{pairs}: {label}: {ms:.2f} ms/token, prefill {pre:.1f} ms", flush=True)

    def medians(label: str, key: str) -> list[float]:
        return [statistics.median(r[key]) for r in runs[label]]

    # ratios of A's speed to B's in each pair (> 1: A is faster)
    decode = [b / a for a, b in zip(medians(la, "decode_ms"), medians(lb, "decode_ms"))]
    prefill = [b / a for a, b in zip(medians(la, "prefill_ms"), medians(lb, "prefill_ms"))]

    def pooled(label: str, key: str) -> float:
        return statistics.median([x for r in runs[label] for x in r[key]])

    rows = []
    for label, _, backend in variants:
        dec = pooled(label, "decode_ms")
        rows.append(f"| {label} | {backend} | {NEW_TOKENS * 1e3 / dec:.1f} | {pooled(label, 'prefill_ms'):.1f} |")
    same = runs[la][0]["generated_ids"] == runs[lb][0]["generated_ids"]
    lines = [
        f"# {title}", "",
        f"Made by: `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit "
        f"{machine['git_commit']}; {machine['cpu']}, {machine['usable_cores']} usable cores, {threads} threads).",
        f"{pairs} pairs of fresh processes, the two of a pair back to back (taking turns at going first); each "
        f"process: the harness's greedy loop, a {PROMPT}-token prompt, {NEW_TOKENS} new tokens, {WARMUP} warm-up "
        f"and {REPEATS} timed runs.", *notes, "",
        "| variant | backend | decode tok/s (pooled median) | prefill ms (pooled median) |",
        "| --- | --- | --- | --- |",
        *rows, "",
        f"{la} against {lb}, per pair: decode {statistics.median(decode):.3f}x (range {min(decode):.3f}-"
        f"{max(decode):.3f}; faster in {sum(r > 1 for r in decode)} of {pairs} pairs), prefill "
        f"{statistics.median(prefill):.3f}x (range {min(prefill):.3f}-{max(prefill):.3f}; faster in "
        f"{sum(r > 1 for r in prefill)} of {pairs}). Greedy tokens of the first run "
        f"{'equal' if same else 'differ'}."]
    results = {"title": title, "command": command, "machine": machine, "threads": threads, "pairs": pairs,
               "variants": [{"label": la, "path": pa, "backend": ba}, {"label": lb, "path": pb, "backend": bb}],
               "runs": runs, "decode_ratio_per_pair": decode, "prefill_ratio_per_pair": prefill}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", nargs="?")
    ap.add_argument("b", nargs="?")
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="where summary.md and results.json go")
    ap.add_argument("--labels", nargs=2, help="names for A and B in the summary (default: the targets)")
    ap.add_argument("--time", help=argparse.SUPPRESS)  # child mode: time this target, print JSON
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.time:
        print(json.dumps(time_once(args.time, args.backend, args.threads)))
        return 0
    if not (args.a and args.b and args.out):
        ap.error("give two targets and --out")
    variants = []
    for k, target in enumerate((args.a, args.b)):
        path, backend = resolve(target)
        label = args.labels[k] if args.labels else target.removeprefix("fast_decoder:")
        variants.append((label, path, backend))
    command = " ".join(["flock /tmp/compress-heavy.lock .venv/bin/python -m studies.decode_ab",
                        *map(shlex.quote, argv or sys.argv[1:])])
    compare(variants, args.pairs, args.threads, Path(args.out), f"{variants[0][0]} against {variants[1][0]}",
            command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
