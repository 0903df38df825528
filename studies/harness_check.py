"""Checks the harness against independent measurements and writes benchmarks/results/harness/.

    flock /tmp/compress-heavy.lock python -m studies.harness_check [--threads 2] [--out DIR]

Measures SmolLM2-135M fp32, its bf16 (the quantize pass) and MiniLM-L6 on torch-cpu; then
- repeatability: the same SmolLM2 measurement a second time, back to back (what two `compress bench` runs
  do): quality must be identical, latency medians within 10% on an idle machine;
- a plain timing loop (plain transformers in a fresh process, no harness code) on the same inputs, run
  before and after each harness measurement: the harness's medians must agree with the plain timings' mean
  within 10% on an idle machine.
Writes report.md / report.html / results.json / plots (the harness's report) and checks.md / checks.json."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LM_DATA = {"source": "builtin:wikipedia", "max_tokens": 4096, "seq_len": 256}
ENC_DATA = {"source": "builtin:bbc-news", "max_examples": 64, "max_length": 128}
LATENCY = {"batch": 1, "prompt_tokens": 128, "new_tokens": 32, "seq_tokens": 128, "throughput_batch": 16,
           "warmup": 2, "repeats": 10}


def plain_timing(spec: dict) -> dict:
    """Time the workload with plain transformers code only (runs in its own process)."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    arrays = np.load(spec["inputs"])
    reps, warm = spec["repeats"], spec["warmup"]

    def timed(fn):
        for _ in range(warm):
            fn()
        out = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return float(np.median(out) * 1e3)

    with torch.inference_mode():
        if spec["task"] == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=getattr(torch, spec["dtype"])).eval()
            prompt = torch.from_numpy(arrays["prompt"])
            mask = torch.ones_like(prompt)
            prefill = timed(lambda: model(prompt, attention_mask=mask, use_cache=True))
            n, decode = spec["new_tokens"], []
            for i in range(warm + reps):  # n greedy steps with the KV cache after an untimed prefill
                out = model(prompt, attention_mask=mask, use_cache=True)
                past, m, nxt = out.past_key_values, mask, out.logits[:, -1].argmax(-1, keepdim=True)
                t = time.perf_counter()
                for _ in range(n):
                    m = torch.cat([m, torch.ones_like(nxt)], dim=1)
                    out = model(nxt, attention_mask=m, past_key_values=past, use_cache=True)
                    past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                if i >= warm:
                    decode.append(time.perf_counter() - t)
            gen = prefill + float(np.median(decode) * 1e3)
            return {"prefill_ms": prefill, "decode_ms": gen - prefill}
        model = AutoModel.from_pretrained(spec["path"]).eval()
        ids, m = torch.from_numpy(arrays["lat_ids"][:1]), torch.from_numpy(arrays["lat_mask"][:1])
        return {"batch1_ms": timed(lambda: model(input_ids=ids, attention_mask=m))}


def run_plain(spec: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(spec, fh)
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    out = subprocess.run([sys.executable, "-m", "studies.harness_check", "--plain", fh.name], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)
    os.unlink(fh.name)
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_bf16(path: Path) -> Path:
    """SmolLM2-135M cast to bf16 by the quantize pass, saved as a checkpoint (reused if present)."""
    from compress import checkpoint, passes
    from compress.checkpoint import Artifact
    from compress.models import load_model
    from compress.passes import PassContext

    if (path / "manifest.json").exists():
        return path
    model, tok = load_model("builtin:smollm2-135m", "causal-lm")
    art = Artifact(kind="torch", task="causal-lm", tokenizer=tok, model=model)
    out = passes.get("quantize")(method="bf16").run(art, PassContext(source="builtin:smollm2-135m"))
    checkpoint.save(out, path, key="harness-check-smollm2-bf16", source="builtin:smollm2-135m",
                    **{"pass": {"name": "quantize", "config": {"method": "bf16"}}})
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="default: all cores")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "harness"))
    ap.add_argument("--scratch", default="/tmp/harness-check")
    ap.add_argument("--plain", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.plain:
        print(json.dumps(plain_timing(json.loads(Path(args.plain).read_text()))))
        return 0

    from benchmarks.config import BenchmarkConfig
    from benchmarks.harness import measure
    from benchmarks.report import write_report
    from compress.models import minilm_folder, smollm2_folder

    scratch = Path(args.scratch)
    work = scratch / "work"
    bf16 = make_bf16(scratch / "smollm2-bf16")
    lm = BenchmarkConfig(threads=args.threads, data=LM_DATA, latency=LATENCY)
    enc = BenchmarkConfig(threads=args.threads, data=ENC_DATA, latency=LATENCY)
    src = "builtin:smollm2-135m"
    models = [("smollm2-135m fp32", src, lm, src, smollm2_folder(), "float32", 2),
              ("smollm2-135m bf16", str(bf16), lm, src, bf16, "bfloat16", 3),
              ("minilm-l6", "builtin:minilm-l6", enc, "builtin:minilm-l6", minilm_folder(), "float32", 4)]
    # This VM's speed moves in bursts, so plain timings and harness measurements alternate (P H P H P ...) and
    # the harness's mean is compared with the plain timings' mean; how far the plain timings of the same thing
    # were apart shows how much the machine itself moved meanwhile.
    records, plain = [], []
    for label, target, settings, base, folder, dtype, times in models:
        measured, timings, loads, spec = [], [], [os.getloadavg()[0]], None
        for i in range(times):
            print(f"measuring {label}{f' (repeat {i})' if i else ''} (loadavg {os.getloadavg()[0]:.2f})", flush=True)
            r = measure(target, backend="torch-cpu", settings=settings, baseline=base,
                        label=label + (f" (repeat {i})" if i else ""), work_dir=work)
            if "error" in r:
                raise SystemExit(f"{label}: {r['error']}")
            r["is_baseline"] = target == base
            measured.append(r)
            if spec is None:
                spec = {"task": r["task"], "path": str(folder), "dtype": dtype, "threads": r["threads"],
                        "inputs": str(work / "inputs" / f"{r['inputs_sha']}.npz"),
                        "new_tokens": LATENCY["new_tokens"], "repeats": LATENCY["repeats"],
                        "warmup": LATENCY["warmup"]}
                timings.append(run_plain(spec))  # the inputs exist once the harness has made them
            timings.append(run_plain(spec))
        loads.append(os.getloadavg()[0])
        records += measured
        plain.append(compare(label, measured, timings, loads))
    out = Path(args.out)
    command = "flock /tmp/compress-heavy.lock python -m studies.harness_check" + (
        f" --threads {args.threads}" if args.threads else "")
    write_report(records, out, "Harness check: SmolLM2-135M fp32 / bf16 and MiniLM-L6 on torch-cpu", command=command)

    first, again = records[0], records[1]
    checks = {"command": command, "threads": first["threads"], "repeatability": {
        "quality_identical": first["quality"] == again["quality"],
        "prefill_median_ms": [first["latency"]["prefill"]["median_ms"], again["latency"]["prefill"]["median_ms"]],
        "decode_median_ms": [first["latency"]["decode"]["median_ms"], again["latency"]["decode"]["median_ms"]],
    }, "plain_timing": plain}
    checks["loadavg_range"] = [min(min(r["loadavg_before"] + r["loadavg_after"]) for r in records),
                               max(max(r["loadavg_before"] + r["loadavg_after"]) for r in records)]
    (out / "checks.json").write_text(json.dumps(checks, indent=1) + "\n")
    (out / "checks.md").write_text(checks_md(checks))
    print((out / "checks.md").read_text())
    return 0


def harness_ms(r: dict) -> dict:
    lat = r["latency"]
    if r["task"] == "causal-lm":
        return {"prefill_ms": lat["prefill"]["median_ms"], "decode_ms": lat["decode"]["median_ms"]}
    return {"batch1_ms": lat["batch1"]["median_ms"]}


def compare(label: str, measured: list[dict], timings: list[dict], loads: list[float]) -> dict:
    """Harness medians (mean over its runs) against the mean of the plain timings taken before and after."""
    harness = {k: sum(harness_ms(r)[k] for r in measured) / len(measured) for k in timings[0]}
    plain = {k: sum(t[k] for t in timings) / len(timings) for k in timings[0]}
    return {"label": label, "harness": harness, "plain": plain, "plain_runs": timings, "loadavg": loads,
            "harness_runs": len(measured),
            "ratio": {k: harness[k] / plain[k] for k in plain},
            "plain_drift": {k: max(t[k] for t in timings) / min(t[k] for t in timings) for k in plain}}


def checks_md(c: dict) -> str:
    rep = c["repeatability"]
    pct = lambda a, b: f"{(max(a, b) / min(a, b) - 1) * 100:.1f}%"  # noqa: E731
    lines = [
        "# Harness checks", "",
        f"Made by: `{c['command']}` ({c['threads']} threads). Load average (1 min) during the run: "
        f"{c['loadavg_range'][0]:.2f} to {c['loadavg_range'][1]:.2f} on 2 cores (the measurement itself "
        "accounts for up to its thread count).", "",
        "## Repeatability (the same SmolLM2 fp32 measurement twice, back to back)", "",
        f"- quality figures identical: {rep['quality_identical']}",
        f"- prefill median: {rep['prefill_median_ms'][0]:.1f} ms vs {rep['prefill_median_ms'][1]:.1f} ms "
        f"({pct(*rep['prefill_median_ms'])} apart)",
        f"- decode median ({LATENCY['new_tokens']} tokens): {rep['decode_median_ms'][0]:.1f} ms vs "
        f"{rep['decode_median_ms'][1]:.1f} ms ({pct(*rep['decode_median_ms'])} apart)", "",
        "## Harness vs a plain timing loop (plain transformers in a fresh process, same inputs and threads)", "",
        "Plain timings and harness measurements alternate (plain, harness, plain, ...: "
        + ", ".join(f"{p['harness_runs']} harness runs of {p['label']}" for p in c["plain_timing"])
        + "); the table compares their means. `plain drift` is how far the "
        "plain timings of the same thing were apart (max/min - 1), i.e. how much the machine itself moved "
        "meanwhile.", "",
        "| model | figure | harness (ms) | plain (ms) | harness / plain | plain drift | loadavg |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in c["plain_timing"]:
        for k in p["plain"]:
            lines.append(f"| {p['label']} | {k.removesuffix('_ms')} | {p['harness'][k]:.1f} | {p['plain'][k]:.1f} | "
                         f"{p['ratio'][k]:.3f} | {(p['plain_drift'][k] - 1) * 100:.1f}% | "
                         f"{p['loadavg'][0]:.2f} -> {p['loadavg'][-1]:.2f} |")
    lines += ["", "The plain loop is a few lines of transformers code in studies/harness_check.py (`plain_timing`): "
              "a timed forward pass for prefill, and a timed loop of greedy steps with `past_key_values`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
