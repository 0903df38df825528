"""The README's main command, `compress run configs/quickstart.yaml`, end to end on the real SmolLM2-135M with
budgets cut by `--set`: the main chain (low-rank -> export -> int8) and the `prune-kd` branch (MLP prune with
KD recovery, from the source) run, every checkpoint is benchmarked on both backends, the int8 checkpoint is the
trade-off the quickstart promises and the end-of-run table marks it best, the report's rows and ratios match
results.json, and every checkpoint reloads to the figures the report shows."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli import main

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parent.parent
REDUCED = [
    "threads=1",
    "data.train.max_tokens=2048",
    "data.eval.max_tokens=512",
    "branches.0.passes.0.prune.recover.max_steps=2",
    "benchmark.latency.prompt_tokens=16",
    "benchmark.latency.new_tokens=4",
    "benchmark.latency.warmup=0",
    "benchmark.latency.repeats=1",
]
MAIN = ["01-lowrank", "02-export", "03-quantize"]
BRANCH = ["prune-kd/01-prune"]
STEPS = MAIN + BRANCH


def _cells(md: str, label: str, backend: str) -> list[str]:
    row = next(line for line in md.splitlines() if line.startswith(f"| {label} | {backend} |"))
    return [c.strip() for c in row.strip("|").split("|")]


def _ratio(cell: str) -> float:
    return float(re.search(r"\(([\d.]+)x\)", cell).group(1))


def test_quickstart_end_to_end_with_reduced_budgets(tmp_path):
    args = ["run", str(ROOT / "configs" / "quickstart.yaml"), "--output-dir", str(tmp_path), "--no-progress"]
    for item in REDUCED:
        args += ["--set", item]
    assert main(args) == 0
    run_dir = tmp_path / "quickstart"
    records = json.loads((run_dir / "results.json").read_text())["records"]

    # One record per checkpoint x backend: the source, the main chain, then the branch; ONNX checkpoints are
    # not run on torch.
    assert [(r["label"], r["backend"]) for r in records] == [
        (label, backend) for label in ["source"] + STEPS for backend in ["torch-cpu", "ort-cpu"]]
    by = {(r["label"], r["backend"]): r for r in records}
    for label in ["02-export", "03-quantize"]:
        assert "runs on the ort-* backends" in by[label, "torch-cpu"]["skipped"]
    measured = [r for r in records if "skipped" not in r]
    assert len(measured) == 8 and all("error" not in r for r in measured)
    assert all(r["threads"] == 1 for r in measured)
    assert (run_dir / "prune-kd" / "01-prune" / "manifest.json").is_file()

    # What each pass did, in numbers.
    src = by["source", "torch-cpu"]
    ppl = {k: r["quality"]["perplexity"] for k, r in by.items() if "skipped" not in r}
    assert src["quality"]["top1_agreement"] == 1.0
    lowrank, prune = by["01-lowrank", "torch-cpu"], by["prune-kd/01-prune", "torch-cpu"]
    assert 0.95 * src["params"] < lowrank["params"] < src["params"]          # a few attention projections factored
    assert ppl["01-lowrank", "torch-cpu"] == pytest.approx(ppl["source", "torch-cpu"], rel=0.02)  # energy 0.999
    assert 0.95 * src["params"] < prune["params"] < 0.99 * src["params"]     # 5% of the MLP channels removed
    assert ppl["source", "torch-cpu"] < ppl["prune-kd/01-prune", "torch-cpu"] < 2 * ppl["source", "torch-cpu"]
    assert by["03-quantize", "ort-cpu"]["size_bytes"] < 0.3 * by["02-export", "ort-cpu"]["size_bytes"]
    for label in ["source", "01-lowrank", "prune-kd/01-prune"]:  # torch and ORT score the same model alike
        assert ppl[label, "ort-cpu"] == pytest.approx(ppl[label, "torch-cpu"], rel=1e-3)
    export_ppl = ppl["02-export", "ort-cpu"]
    assert export_ppl == pytest.approx(ppl["01-lowrank", "ort-cpu"], rel=1e-4)
    assert ppl["03-quantize", "ort-cpu"] == pytest.approx(export_ppl, rel=0.03)

    # The deployment against the fp32 model on torch: >= 3.5x smaller, perplexity within 5%, faster at decoding
    # (>= 3x in the full run; these 4-token timings on one thread are noisy, so 2x here), and the end-of-run
    # table marks it as the best deployment.
    final = by["03-quantize", "ort-cpu"]
    assert src["size_bytes"] / final["size_bytes"] >= 3.5
    assert ppl["03-quantize", "ort-cpu"] / ppl["source", "torch-cpu"] <= 1.05
    assert final["latency"]["decode_tokens_per_s"] >= 2 * src["latency"]["decode_tokens_per_s"]
    from pipelines.console import rows_from_results

    best = [(row.label, row.backend) for row in rows_from_results(records) if row.best]
    assert best == [("03-quantize", "ort-cpu")]

    # The report's rows and ratios are those of results.json.
    md = (run_dir / "report.md").read_text()
    assert (run_dir / "report.html").stat().st_size > 10_000
    for (label, backend), r in by.items():
        if "skipped" in r:
            assert f"{label} on {backend}:" in md
            continue
        cells = _cells(md, label, backend)
        base = by["source", backend]
        assert float(cells[2].split()[0]) == pytest.approx(r["params"] / 1e6, abs=0.006)
        assert _ratio(cells[3]) == pytest.approx(r["size_bytes"] / base["size_bytes"], abs=0.006)
        assert _ratio(cells[4]) == pytest.approx(r["quality"]["perplexity"] / base["quality"]["perplexity"],
                                                 abs=0.006)

    # Every checkpoint reloads (hashes verified) to the model that was measured.
    from compress import checkpoint
    from compress.edge import EdgeModel
    from compress.models import count_parameters

    for label in STEPS:
        step_dir = run_dir / label
        art = checkpoint.load(step_dir)
        r = by[label, "ort-cpu"]
        if art.kind == "torch":
            assert count_parameters(art.model) == r["params"]
        else:
            assert (step_dir / "edge_runner.py").exists()
            prompt = np.load(run_dir / ".bench" / "inputs" / f"{r['inputs_sha']}.npz")["prompt"]
            want = r["latency"]["generated_ids"]  # the greedy tokens the benchmark generated
            got = EdgeModel(step_dir, threads=1).generate(prompt, len(want))[0, prompt.shape[1]:]
            assert got.tolist() == want
