"""The README's main command, `compress run configs/quickstart.yaml`, end to end on the real SmolLM2-135M with
budgets cut by `--set`: every pass runs, every checkpoint is benchmarked on both backends, the report's rows
and ratios match results.json, and every checkpoint reloads to the figures the report shows."""
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
    "passes.0.prune.recover.max_steps=2",
    "benchmark.latency.prompt_tokens=16",
    "benchmark.latency.new_tokens=4",
    "benchmark.latency.warmup=0",
    "benchmark.latency.repeats=1",
]
STEPS = ["01-prune", "02-lowrank", "03-export", "04-quantize"]


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

    # One record per checkpoint x backend, in pipeline order; ONNX checkpoints are not run on torch.
    assert [(r["label"], r["backend"]) for r in records] == [
        (label, backend) for label in ["source"] + STEPS for backend in ["torch-cpu", "ort-cpu"]]
    by = {(r["label"], r["backend"]): r for r in records}
    for label in ["03-export", "04-quantize"]:
        assert "runs on the ort-* backends" in by[label, "torch-cpu"]["skipped"]
    measured = [r for r in records if "skipped" not in r]
    assert len(measured) == 8 and all("error" not in r for r in measured)
    assert all(r["threads"] == 1 for r in measured)

    # What each pass did, in numbers.
    src = by["source", "torch-cpu"]
    assert src["quality"]["top1_agreement"] == 1.0
    assert by["01-prune", "torch-cpu"]["params"] < 0.9 * src["params"]        # 25% of MLP channels removed
    assert by["02-lowrank", "torch-cpu"]["params"] < by["01-prune", "torch-cpu"]["params"]
    assert by["04-quantize", "ort-cpu"]["size_bytes"] < 0.3 * by["03-export", "ort-cpu"]["size_bytes"]
    for label in ["source", "01-prune", "02-lowrank"]:  # torch and ORT score the same model alike
        t, o = by[label, "torch-cpu"]["quality"]["perplexity"], by[label, "ort-cpu"]["quality"]["perplexity"]
        assert o == pytest.approx(t, rel=1e-3)
    export_ppl = by["03-export", "ort-cpu"]["quality"]["perplexity"]
    assert export_ppl == pytest.approx(by["02-lowrank", "ort-cpu"]["quality"]["perplexity"], rel=1e-4)
    assert by["04-quantize", "ort-cpu"]["quality"]["perplexity"] == pytest.approx(export_ppl, rel=0.05)
    assert src["quality"]["perplexity"] < by["01-prune", "torch-cpu"]["quality"]["perplexity"] < 1000

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
        art = checkpoint.load(run_dir / label)
        r = by[label, "ort-cpu"]
        if art.kind == "torch":
            assert count_parameters(art.model) == r["params"]
        else:
            assert (run_dir / label / "edge_runner.py").exists()
            prompt = np.load(run_dir / ".bench" / "inputs" / f"{r['inputs_sha']}.npz")["prompt"]
            want = r["latency"]["generated_ids"]  # the greedy tokens the benchmark generated
            got = EdgeModel(run_dir / label, threads=1).generate(prompt, len(want))[0, prompt.shape[1]:]
            assert got.tolist() == want
