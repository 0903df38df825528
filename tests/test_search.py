"""`compress search`: the space is checked before any trial, the known best of a space is found, a search
resumes without redoing trials, an impossible constraint is reported, --pick writes a runnable recipe, and the
full harness measures only what the screen lets through.

Trials run the real runner and the real screen on the tiny Llama with the test-scale pass (tests/helper_passes):
factor 1 leaves the model as it is, 2 and 3 raise perplexity by 7% and 66%, and bf16 halves the size at the
same perplexity, so the answer of the space is known."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

import helper_passes  # noqa: F401  (registers test-scale)
from pipelines.cli import main
from pipelines.config import load_config

pytest.importorskip("optuna")


def _config(tmp_path, model_dir, *, factors=(1.0, 3.0), methods=("fp32", "bf16"), name="tiny-search",
            filename="search.yaml", **extra) -> Path:
    cfg = {
        "name": name,
        "model": {"source": str(model_dir)},
        "data": {"train": {"source": "builtin:shakespeare", "max_tokens": 512, "seq_len": 64},
                 "eval": {"source": "builtin:wikipedia", "max_tokens": 1024, "seq_len": 64}},
        "passes": [{"test-scale": {"factor": {"search": list(factors)}}},
                   {"quantize": {"method": {"search": list(methods)}}}],
        "threads": 1,
        "objectives": ["size_mb", "perplexity"],
        "constraints": ["perplexity_ratio <= 1.05"],
        "budget": {"trials": 10},
        "screen": {"max_tokens": 256},
        "sampler": "grid",
        **extra,
    }
    path = tmp_path / filename
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _trials(out: Path, name: str = "tiny-search") -> dict:
    return json.loads((out / name / "search" / "trials.json").read_text())


@pytest.fixture(scope="module")
def known_space(tiny_llama_dir, tmp_path_factory):
    """One grid search over factor {1, 3} x {fp32, bf16}, shared by the tests that read its outputs."""
    tmp = tmp_path_factory.mktemp("search")
    config, out = _config(tmp, tiny_llama_dir), tmp / "runs"
    assert main(["search", str(config), "--output-dir", str(out)]) == 0
    search = out / "tiny-search" / "search"
    return {"config": config, "out": out, "trials": _trials(out), "best": (search / "best.yaml").read_text(),
            "search": search}


def test_passes_json_shows_search_values(capsys):
    assert main(["passes", "--json"]) == 0
    passes = {p["name"]: p for p in json.loads(capsys.readouterr().out)["passes"]}

    def option(pass_name, name, when=None):
        variant = next(v for v in passes[pass_name]["variants"] if when is None or when in (v["when"] or ""))
        return next(o for o in variant["options"] if o["name"] == name)

    assert option("quantize", "weight_bits", "ort-int8-dynamic")["search"] == [4, 8]
    assert option("quantize", "block_size", "ort-int8-dynamic")["search"] == [32, 64, 128]
    assert option("prune", "layer_ratio")["search"] == [0.0, 0.1, 0.17, 0.25]
    assert option("lowrank", "energy")["search"] == [0.9, 0.95, 0.99, 0.999]
    assert option("prune", "batch_size")["search"] is None  # an option without values
    assert main(["passes", "lowrank"]) == 0
    assert "search: 0.9, 0.95, 0.99, 0.999" in capsys.readouterr().out


def test_search_values_the_pass_refuses_are_refused_before_any_trial(tiny_llama_dir, tmp_path, capsys):
    path = _config(tmp_path, tiny_llama_dir)
    cfg = yaml.safe_load(path.read_text())
    cfg["passes"] = [{"prune": {"ratio": {"search": [0.1, 1.5]}}},
                     {"lowrank": {"energy": {"search": {"low": 0.5, "high": 1.5}}}}]
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "runs"
    assert main(["search", str(path), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "passes.0.prune.ratio: the search value 1.5 is refused" in err
    assert "passes.1.lowrank.energy: the search value 1.5 is refused" in err
    assert "0.1 is refused" not in err and "0.5 is refused" not in err  # the valid values pass
    assert not out.exists()  # no study, no trial, no log
    # a value the declared list offers is accepted through `declared`; an option that declares none is refused
    cfg["passes"] = [{"prune": {"ratio": {"search": "declared"}, "batch_size": {"search": "declared"}}}]
    path.write_text(yaml.safe_dump(cfg))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "passes.0.prune.batch_size: `search: declared`, but prune declares no search values" in err
    assert "passes.0.prune.ratio" not in err


def test_start_with_recipes_run_first_and_bad_ones_are_refused(tiny_llama_dir, tmp_path, capsys):
    recipe = {"test-scale.factor": 3.0, "quantize.method": "bf16"}
    config = _config(tmp_path, tiny_llama_dir, sampler="random", budget={"trials": 2}, start_with=[recipe])
    out = tmp_path / "runs"
    assert main(["search", str(config), "--output-dir", str(out)]) == 0
    first = min(_trials(out)["trials"], key=lambda r: r["number"])
    assert first["number"] == 0 and first["options"] == recipe  # the given recipe, measured in the study
    for bad, said in [({"quantize.bits": 4}, "'quantize.bits' is not a searched option"),
                      ({"test-scale.factor": 2.0}, "test-scale.factor: 2.0 is not one of its search values")]:
        path = _config(tmp_path, tiny_llama_dir, start_with=[recipe, bad], filename="bad.yaml")
        assert main(["validate", str(path)]) == 2
        assert f"start_with.1: {said}" in capsys.readouterr().err


def test_search_finds_the_known_best_of_the_space(known_space):
    trials = known_space["trials"]
    rows = {(r["options"]["test-scale.factor"], r["options"]["quantize.method"]): r for r in trials["trials"]}
    assert len(trials["trials"]) == 4 and set(rows) == {(1.0, "fp32"), (1.0, "bf16"), (3.0, "fp32"), (3.0, "bf16")}
    for method in ("fp32", "bf16"):  # factor 3 breaks the constraint on the screen: pruned, never measured further
        bad = rows[(3.0, method)]
        assert bad["state"] == "pruned" and bad["figures"]["perplexity_ratio"] > 1.5
        assert "perplexity_ratio <= 1.05" in bad["reason"]
    assert rows[(1.0, "fp32")]["figures"]["perplexity_ratio"] == 1.0  # the unchanged model, bit for bit
    best = rows[(1.0, "bf16")]
    assert trials["chosen"] == best["number"] and trials["front"] == [best["number"]]
    assert best["figures"]["size_mb_ratio"] == pytest.approx(0.51, abs=0.02)
    assert abs(best["figures"]["perplexity_ratio"] - 1.0) < 1e-3
    # best.yaml is a plain pipeline config with exactly that recipe
    best_yaml = known_space["search"] / "best.yaml"
    assert load_config(best_yaml).config.passes == [{"test-scale": {"factor": 1.0}}, {"quantize": {"method": "bf16"}}]
    report = (known_space["search"] / "report.md").read_text()
    assert "## Pareto front" in report and f"| {best['number']} (chosen) |" in report
    assert (known_space["search"] / "front-size.png").stat().st_size > 1000
    assert "<table>" in (known_space["search"] / "report.html").read_text()


def test_pick_writes_the_recipe_of_that_trial(known_space, capsys):
    trials = known_space["trials"]["trials"]
    picked = next(r for r in trials if r["options"] == {"test-scale.factor": 1.0, "quantize.method": "fp32"})
    args = ["search", str(known_space["config"]), "--output-dir", str(known_space["out"])]
    assert main(args + ["--pick", str(picked["number"])]) == 0
    assert f"picked: trial {picked['number']}" in capsys.readouterr().out
    best = known_space["search"] / "best.yaml"
    pipeline = load_config(best)
    assert pipeline.config.passes == [{"test-scale": {"factor": 1.0}}, {"quantize": {"method": "fp32"}}]
    assert main(["validate", str(best)]) == 0
    assert len(_trials(known_space["out"])["trials"]) == 4  # picking runs no trial
    pruned = next(r for r in trials if r["state"] == "pruned")
    assert main(args + ["--pick", str(pruned["number"])]) == 0  # a pruned trial is pickable, with a note
    assert "breaks a constraint" in capsys.readouterr().out
    assert main(args + ["--pick", "99"]) == 2
    assert "no trial 99" in capsys.readouterr().err


def test_an_interrupted_search_resumes_without_redoing_trials(tiny_llama_dir, tmp_path):
    import optuna

    from pipelines.search import run_search

    config = _config(tmp_path, tiny_llama_dir, factors=(1.0, 2.0, 3.0), sampler="tpe")
    out = tmp_path / "runs"
    first, _ = run_search(config, trials=2, output_dir=out, log=lambda *_: None)
    before = {r["number"]: r for r in first.rows}
    assert len(before) == 2 and all(r["state"] in ("complete", "pruned") for r in before.values())
    # a third trial that a killed process left RUNNING
    study = optuna.load_study(study_name="tiny-search",
                              storage=f"sqlite:///{(out / 'tiny-search' / 'search' / 'study.db').resolve()}")
    dead = subprocess.Popen(["true"])
    dead.wait()
    tried = {(r["values"]["0.test-scale.factor"], r["values"]["1.quantize.method"]) for r in before.values()}
    untried = next((f, m) for f in (1.0, 2.0, 3.0) for m in ("fp32", "bf16") if (f, m) not in tried)
    study.enqueue_trial({"0.test-scale.factor": untried[0], "1.quantize.method": untried[1]})
    stale = study.ask({p: d for p, d in study.trials[0].distributions.items()})
    stale.set_user_attr("host", __import__("socket").gethostname())
    stale.set_user_attr("pid", dead.pid)

    second, search = run_search(config, trials=4, output_dir=out, log=lambda *_: None)
    rows = {r["number"]: r for r in second.rows}
    for n, r in before.items():  # the finished trials are kept as they were, not run again
        assert rows[n] == r
    assert rows[2]["state"] == "failed" and "interrupted" in rows[2]["reason"]
    # two new trials: the interrupted one again (trial 3), and one more (a proposal repeating a finished
    # recipe is recorded as a copy of it, and costs no budget)
    fresh = [r["number"] for r in second.rows if r["state"] != "failed" and r["same_as"] is None]
    assert fresh[:3] == [0, 1, 3] and len(fresh) == 4
    assert search.progress.ran == 2
    assert rows[3]["options"] == {"test-scale.factor": stale.params["0.test-scale.factor"],
                                  "quantize.method": stale.params["1.quantize.method"]}
    assert search.progress.passes_run <= 4  # at most two passes per new trial
    # the budget is met: a third run adds nothing
    third, search = run_search(config, trials=4, output_dir=out, log=lambda *_: None)
    assert search.progress.ran == 0 and len(third.rows) == len(second.rows)


def test_trials_another_process_is_running_count_against_the_budget(tiny_llama_dir, tmp_path):
    """Processes sharing one storage each counted only the finished trials, so near the end each started one
    more and the study overran its budget by one per process. A trial another process started first now
    counts: the asking process gives its trial back unrun (not a row, not part of the budget) and stops."""
    import optuna

    from pipelines.search import run_search

    config = _config(tmp_path, tiny_llama_dir, factors=(1.0, 2.0, 3.0))
    out = tmp_path / "runs"
    first, _ = run_search(config, trials=1, output_dir=out, log=lambda *_: None)
    study = optuna.load_study(study_name="tiny-search",
                              storage=f"sqlite:///{(out / 'tiny-search' / 'search' / 'study.db').resolve()}")
    other = study.ask({p: d for p, d in study.trials[0].distributions.items()})  # running on another machine
    other.set_user_attr("host", "another-machine")
    second, search = run_search(config, trials=3, output_dir=out, log=lambda *_: None)
    assert search.progress.ran == 1 and "other processes are running" in search.progress.stopped_by
    (given_back,) = [t for t in study.trials if t.user_attrs.get("reason", "").startswith("not run")]
    rows = {r["number"]: r["state"] for r in second.rows}  # (the grid's queued trials are rows, waiting)
    assert given_back.number not in rows and rows[other.number] == "running"
    assert sum(state in ("complete", "pruned") for state in rows.values()) == 2, rows
    study.tell(other, state=optuna.trial.TrialState.PRUNED)  # the other process's trial ends: the budget is met
    third, search = run_search(config, trials=3, output_dir=out, log=lambda *_: None)
    assert search.progress.ran == 0 and search.progress.stopped_by == "budget: 3 trials"


def test_a_constraint_no_trial_meets_is_reported_with_the_closest(tiny_llama_dir, tmp_path, capsys):
    config = _config(tmp_path, tiny_llama_dir, factors=(3.0, 2.0), methods=("fp32",))
    out = tmp_path / "runs"
    assert main(["search", str(config), "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "no trial meets the constraints (perplexity_ratio <= 1.05); nothing chosen. Closest:" in text
    closest = [line for line in text.splitlines() if line.startswith("  trial ")]
    assert [c.split(":")[0] for c in closest] == ["  trial 1", "  trial 0"]  # factor 2 (~1.1x) before 3 (~1.8x)
    ratios = [float(c.rsplit("perplexity_ratio ", 1)[1]) for c in closest]
    assert 1.05 < ratios[0] < 1.3 < 1.5 < ratios[1]
    trials = _trials(out)
    assert trials["chosen"] is None and trials["closest"] == [1, 0]
    assert not (out / "tiny-search" / "search" / "best.yaml").exists()
    # the samplers see both trials as infeasible, by how much each breaks the constraint
    import optuna

    study = optuna.load_study(study_name="tiny-search",
                              storage=f"sqlite:///{out / 'tiny-search' / 'search' / 'study.db'}")
    assert [t.constraints["c0"] for t in study.trials] == [pytest.approx((r - 1.05) / 1.05, rel=0.01)
                                                           for r in ratios[::-1]]


def test_full_measurement_only_for_trials_the_screen_lets_through(tiny_llama_dir, tmp_path, monkeypatch):
    """Speed comes from the harness (stood in for here: decode speed inversely proportional to size); it is
    measured for the source and the trials that pass the screen and are not beaten on it, no others."""
    from benchmarks.harness import resolve_target, weights_size

    import pipelines.search.measure as measure_mod

    calls = []

    def fake_measure(target, **kwargs):
        t = resolve_target(target, "causal-lm")
        calls.append(Path(str(target)).name)
        size = weights_size(t.path)
        return {"quality": {"perplexity": 100.0}, "size_bytes": size,
                "latency": {"decode_tokens_per_s": 2e7 / size}, "memory": {"peak_rss_mb": 10.0}}

    monkeypatch.setattr(measure_mod, "harness_measure", fake_measure)
    config = _config(tmp_path, tiny_llama_dir, methods=("bf16", "fp32"),
                     objectives=["decode_tok_s", "perplexity"],
                     constraints=["perplexity_ratio <= 1.05", "decode_speedup >= 1.5"],
                     benchmark={"backends": ["torch-cpu"], "quality": ["perplexity"], "threads": 1})
    out = tmp_path / "runs"
    assert main(["search", str(config), "--output-dir", str(out)]) == 0
    rows = {(r["options"]["test-scale.factor"], r["options"]["quantize.method"]): r for r in _trials(out)["trials"]}
    # the source, then (1, bf16); (1, fp32) has a worse screened perplexity than the measured (1, bf16): skipped
    assert calls == [tiny_llama_dir.name, "02-quantize"]
    assert rows[(1.0, "bf16")]["state"] == "complete"
    assert rows[(1.0, "bf16")]["figures"]["decode_speedup"] == pytest.approx(1.96, abs=0.05)
    assert rows[(1.0, "fp32")]["state"] == "pruned"
    assert f"trial {rows[(1.0, 'bf16')]['number']} is as good or better" in rows[(1.0, "fp32")]["reason"]
    assert all(rows[(3.0, m)]["state"] == "pruned" for m in ("bf16", "fp32"))
    assert _trials(out)["chosen"] == rows[(1.0, "bf16")]["number"]


def test_ratios_against_a_fixed_baseline_step(tiny_llama_dir, tmp_path, capsys):
    """benchmark.baseline names a fixed step (a fine-tuned teacher in configs/search-minilm-bbc.yaml): ratios
    divide by its figures, and a searched option before it is refused."""
    config = _config(tmp_path, tiny_llama_dir, benchmark={"baseline": "01-test-scale", "quality": ["perplexity"]})
    cfg = yaml.safe_load(config.read_text())
    cfg["passes"][0]["test-scale"]["factor"] = 2.0  # fixed: the baseline
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "runs"
    assert main(["search", str(config), "--output-dir", str(out)]) == 0
    trials = _trials(out)
    rows = {r["options"]["quantize.method"]: r for r in trials["trials"]}
    assert trials["source"]["target"].endswith("01-test-scale")
    assert rows["fp32"]["figures"]["perplexity_ratio"] == 1.0  # the baseline's own weights
    assert trials["source"]["screen"]["perplexity"] == rows["fp32"]["screen"]["perplexity"]
    assert rows["bf16"]["figures"]["size_mb_ratio"] == pytest.approx(0.51, abs=0.02)
    assert trials["chosen"] == rows["bf16"]["number"]  # within 5% of the baseline, half its size
    cfg["passes"][0]["test-scale"]["factor"] = {"search": [1.0, 2.0]}
    config.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["validate", str(config)]) == 2
    assert "its passes must be fixed, but passes.0.test-scale.factor is searched" in capsys.readouterr().err


def test_a_classifier_screen_too_coarse_for_the_accuracy_bound_is_refused(tiny_bert_dir, tmp_path, capsys):
    # 64 examples: one mistake is 1.6% of accuracy, more than the 1% accuracy_ratio >= 0.99 allows
    config = _config(tmp_path, tiny_bert_dir, task="sequence-classification", objectives=["size_mb"],
                     constraints=["accuracy_ratio >= 0.99"], screen={"max_examples": 64},
                     data={"eval": {"source": "builtin:bbc-news", "split": "test", "max_length": 32}})
    assert main(["validate", str(config)]) == 2
    assert ("screen.max_examples: 64 examples resolve 1.6% of accuracy, coarser than the 1% that "
            "`accuracy_ratio >= 0.99` allows, so one mistake on the slice would prune a trial; set "
            "screen.max_examples to at least 100") in capsys.readouterr().err
    cfg = yaml.safe_load(config.read_text())
    del cfg["screen"]  # the default, 256, resolves 0.4%
    config.write_text(yaml.safe_dump(cfg))
    assert main(["validate", str(config)]) == 0


def test_each_search_process_takes_its_own_work_slot(tmp_path):
    from pipelines.search.study import work_slot

    with work_slot(tmp_path) as first, work_slot(tmp_path) as second:
        assert (first, second) == (0, 1)
    with work_slot(tmp_path) as again:
        assert again == 0  # released when a search ends


def test_a_failing_trial_is_recorded_with_its_reason_and_the_search_goes_on(tiny_llama_dir, tmp_path, capsys,
                                                                           monkeypatch):
    # a pass that raises while it runs (factor 3 here): that trial fails with the reason, the other completes
    original = helper_passes.ScaleWeights.run

    def run(self, model, ctx):
        if self.config.factor == 3.0:
            raise RuntimeError("no kernel for factor 3")
        return original(self, model, ctx)

    monkeypatch.setattr(helper_passes.ScaleWeights, "run", run)
    config = _config(tmp_path, tiny_llama_dir, factors=(1.0, 3.0), methods=("bf16",))
    out = tmp_path / "runs"
    assert main(["search", str(config), "--output-dir", str(out)]) == 0
    rows = {r["options"]["test-scale.factor"]: r for r in _trials(out)["trials"]}
    assert rows[3.0]["state"] == "failed" and rows[3.0]["reason"] == "RuntimeError: no kernel for factor 3"
    assert rows[1.0]["state"] == "complete" and _trials(out)["chosen"] == rows[1.0]["number"]
    assert f"trial {rows[3.0]['number']}: test-scale.factor=3.0, quantize.method=bf16 -> failed" \
        in capsys.readouterr().out


def test_a_combination_the_passes_refuse_is_recorded_and_costs_no_budget(tiny_llama_dir, tmp_path, capsys):
    # each value is valid alone; factor 3 with max_factor 2 is not, and a quantize pass on ONNX needs an export:
    # both refused, and the 3 trials of the budget are the 3 valid combinations
    config = _config(tmp_path, tiny_llama_dir, methods=("fp32", "ort-fp16"), budget={"trials": 3})
    raw = yaml.safe_load(config.read_text())
    raw["passes"][0]["test-scale"]["max_factor"] = {"search": [2.0, 5.0]}
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = tmp_path / "runs"
    assert main(["search", str(config), "--output-dir", str(out)]) == 0
    rows = _trials(out)["trials"]
    refused = {tuple(r["options"].values()): r["reason"] for r in rows if r["state"] == "refused"}
    assert (3.0, 2.0, "fp32") in refused and all(
        ("factor 3.0 is above max_factor 2.0" if key[:2] == (3.0, 2.0) else "add an `export` pass before it")
        in reason for key, reason in refused.items())
    ran = sorted((tuple(r["options"].values()), r["state"]) for r in rows if r["state"] not in ("refused", "waiting"))
    assert ran == [((1.0, 2.0, "fp32"), "complete"), ((1.0, 5.0, "fp32"), "complete"),
                   ((3.0, 5.0, "fp32"), "pruned")]
    assert "refused by the passes (not counted)" in capsys.readouterr().out


def test_the_report_counts_each_recipe_once_and_a_repeat_is_what_its_original_was(tiny_llama_dir, tmp_path):
    import optuna
    from optuna.trial import TrialState

    from pipelines.search.config import load_search_config
    from pipelines.search.report import Outcome, summary, trial_rows

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["minimize", "minimize"])
    for attrs in ({"refused": True, "reason": "factor 3.0 is above max_factor 2.0"}, {"same_as": 0},
                  {"same_as": 1}):  # a refused trial, its repeat, and a repeat of the repeat
        trial = study.ask()
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        study.tell(trial, state=TrialState.FAIL)
    rows = trial_rows(study)
    assert [r["state"] for r in rows] == ["refused"] * 3
    setup = load_search_config(_config(tmp_path, tiny_llama_dir))
    assert summary(setup, Outcome(rows, [], None, False))[0].startswith(
        "1 trial (1 refused) and 2 proposals that repeated one (not run); Pareto front: empty")


def test_the_report_says_where_the_full_measurements_ran(tiny_llama_dir, tmp_path):
    from pipelines.search.config import load_search_config
    from pipelines.search.measure import Measurer
    from pipelines.search.report import _conditions_line

    measurer = Measurer(load_search_config(_config(tmp_path, tiny_llama_dir)), tmp_path / "m")
    assert measurer.conditions() is None
    results = tmp_path / "m" / "bench" / "results"
    results.mkdir(parents=True)
    machine = {"cpu": "AMD EPYC", "cpu_flags": ["AVX2", "FMA"], "memory_bandwidth_gb_s": 21.0, "git_commit": "abc"}
    for i, (load, when) in enumerate([(1.7, "2026-12-06T10:30:00Z"), (0.8, "2026-12-06T10:21:00Z")]):
        (results / f"{i}.json").write_text(json.dumps({"machine": machine, "threads": 2, "loadavg_before":
                                                       [load, 1.0, 1.0], "measured_at": when}))
    c = measurer.conditions()
    assert c["threads"] == [2] and c["load_1min"] == [0.8, 1.7] and c["measurements"] == 2
    assert _conditions_line(c) == ("Measured on AMD EPYC (AVX2, FMA), 2 threads, memory bandwidth 21.0 GB/s: 2 full "
                                   "measurements from 2026-12-06T10:21:00Z to 2026-12-06T10:30:00Z, 1-minute load "
                                   "average 0.80 to 1.70; suite commit abc.")


def _counting_scale(monkeypatch) -> list:
    """The factors the test-scale pass is computed with (one entry per computed step)."""
    computed = []
    original = helper_passes.ScaleWeights.run

    def run(self, model, ctx):
        computed.append(self.config.factor)
        return original(self, model, ctx)

    monkeypatch.setattr(helper_passes.ScaleWeights, "run", run)
    return computed


def _alternating_search(config, out, store_steps: bool):
    """Trials whose first pass alternates (1, 2, 1, 2): the work folder reuses no first step of the trial
    before, so only the step store can."""
    from pipelines.search.config import load_search_config
    from pipelines.search.study import Search, open_study

    search = Search(load_search_config(config), output_dir=out, log=lambda *_: None, store_steps=store_steps)
    study = open_study(search.setup, search.url, 0)
    for method in ("fp32", "bf16"):
        for factor in (1.0, 2.0):
            study.enqueue_trial({"0.test-scale.factor": factor, "1.quantize.method": method})
    trials = search.run(trials=4).trials
    return search, {(t.params["0.test-scale.factor"], t.params["1.quantize.method"]): t for t in trials}


def test_the_step_store_computes_each_step_once_per_study(tiny_llama_dir, tmp_path, monkeypatch):
    config = _config(tmp_path, tiny_llama_dir, factors=(1.0, 2.0), methods=("fp32", "bf16"), sampler="random")
    computed = _counting_scale(monkeypatch)
    plain, plain_rows = _alternating_search(config, tmp_path / "plain", store_steps=False)
    assert computed == [1.0, 2.0, 1.0, 2.0] and plain.progress.passes_run == 8 and plain.progress.from_store == 0

    computed.clear()
    stored, rows = _alternating_search(config, tmp_path / "stored", store_steps=True)
    assert computed == [1.0, 2.0]  # once per distinct value; the later trials place it from the store
    assert stored.progress.passes_run == 6 and stored.progress.from_store == 2
    assert set(rows) == set(plain_rows) and len(rows) == 4
    for values, t in rows.items():  # the same results as computing every step
        assert t.state == plain_rows[values].state and t.values == plain_rows[values].values
        assert t.user_attrs["screen"] == plain_rows[values].user_attrs["screen"]
    # the store holds every finished step, as hard links to the work folder's files (no second copy)
    search = tmp_path / "stored" / "tiny-search" / "search"
    entries = [p for p in (search / "steps").iterdir()]
    assert len(entries) == 6 and not any(p.name.startswith(".") for p in entries)
    work = search / "work-0" / "01-test-scale"
    entry = search / "steps" / json.loads((work / "manifest.json").read_text())["key"]
    assert (work / "model.safetensors").stat().st_ino == (entry / "model.safetensors").stat().st_ino
    assert not (entry / "README.md").exists() and (work / "README.md").exists()


def _pipeline(tmp_path, model_dir):
    from pipelines.config import load_config

    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "model": {"source": str(model_dir)},
        "data": {"train": {"source": "builtin:shakespeare", "max_tokens": 512, "seq_len": 64}},
        "passes": [{"test-scale": {"factor": 2.0}}, {"quantize": {"method": "bf16"}}], "threads": 1}))
    return load_config(path)


def test_a_step_placed_from_the_store_names_its_parent_in_its_own_run(tiny_llama_dir, tmp_path, monkeypatch):
    import compress
    from compress.model_card import lineage
    from pipelines.runner import Runner

    computed = _counting_scale(monkeypatch)
    store = tmp_path / "steps"
    first = Runner(_pipeline(tmp_path, tiny_llama_dir), output_dir=tmp_path / "a", show_progress=False,
                   log=lambda *_: None, store=store).run()
    second = Runner(_pipeline(tmp_path, tiny_llama_dir), output_dir=tmp_path / "b", show_progress=False,
                    log=lambda *_: None, store=store).run()
    assert computed == [2.0]
    assert [(s.reused, s.from_store) for s in first.steps] == [(False, False), (False, False)]
    assert [(s.reused, s.from_store) for s in second.steps] == [(True, True), (True, True)]
    last = Path(second.steps[1].path)
    manifest = json.loads((last / "manifest.json").read_text())
    assert manifest["parent"]["path"] == second.steps[0].path  # this run's parent, not where it was made
    assert json.loads((store / second.steps[1].key / "manifest.json").read_text())["parent"]["path"] \
        == first.steps[0].path  # the store's own manifest is left as it was
    assert [s["step"] for s in lineage(last)[1]] == ["01-test-scale", "02-quantize"]
    assert (last / "README.md").is_file()  # its card, written here (the store keeps none)
    loaded = compress.load(last).model.state_dict()  # verified and loadable where it was placed
    made = compress.load(first.steps[1].path).model.state_dict()
    assert loaded.keys() == made.keys() and all(torch.equal(loaded[k], made[k]) for k in made)


def test_a_corrupted_store_entry_is_recomputed_not_trusted(tiny_llama_dir, tmp_path, monkeypatch):
    from compress import checkpoint
    from pipelines.runner import Runner

    computed = _counting_scale(monkeypatch)
    store, messages = tmp_path / "steps", []
    first = Runner(_pipeline(tmp_path, tiny_llama_dir), output_dir=tmp_path / "a", show_progress=False,
                   log=lambda *_: None, store=store).run()
    weights = store / first.steps[0].key / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.unlink()  # a new file in the entry only (writing in place would change the run's linked copy too)
    weights.write_bytes(bytes(data))

    again = Runner(_pipeline(tmp_path, tiny_llama_dir), output_dir=tmp_path / "c", show_progress=False,
                   log=messages.append, store=store).run()
    assert computed == [2.0, 2.0]  # the first step computed again
    assert [(s.reused, s.from_store) for s in again.steps] == [(False, False), (True, True)]
    assert any("step store: not using" in m and "corrupted" in m for m in messages)
    assert again.steps[0].key == first.steps[0].key
    checkpoint.verify(store / first.steps[0].key)  # the bad entry was replaced by the recomputed step
    assert not [p for p in store.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_the_screen_prepares_only_what_it_scores(tiny_llama_dir, tmp_path):
    """The screen scores one metric on a slice: the benchmark's extra corpora, generations and latency are not
    prepared for it (they would be tokenized for every screened trial and never read)."""
    from pipelines.search.config import load_search_config
    from pipelines.search.measure import Measurer

    bench = {"backends": ["torch-cpu"], "quality": ["perplexity", "teacher-agreement"],
             "extra_data": {"shakespeare": {"source": "builtin:shakespeare", "max_tokens": 512, "seq_len": 64}},
             "generations": {"prompts": ["Once upon a time"], "new_tokens": 4}}
    setup = load_search_config(_config(tmp_path, tiny_llama_dir, benchmark=bench))
    screen = Measurer(setup, tmp_path / "work").screen_settings
    assert (screen.extra_data, screen.generations, screen.latency) == ({}, None, None)
    assert screen.quality == ["perplexity"] and screen.data.max_tokens == 256


def test_an_onnx_step_with_external_weights_runs_on_from_the_store(tiny_gpt2_dir, tmp_path, monkeypatch):
    """onnx (1.23) refuses to read external weights through a file with several hard links (a "hardlink
    attack"): the store must not leave an exported step's model.onnx.data linked, or the next pass fails."""
    from compress import onnx_tools
    from pipelines.config import validate
    from pipelines.runner import Runner

    monkeypatch.setattr(onnx_tools, "EXTERNAL_ABOVE", 0)  # weights in model.onnx.data, as for real models
    raw = {"name": "tiny-onnx", "model": {"source": str(tiny_gpt2_dir)}, "threads": 1,
           "data": {"train": {"source": "builtin:shakespeare", "max_tokens": 512, "seq_len": 64}},
           "passes": [{"export": {"graph": "fused"}}, {"quantize": {"method": "ort-int8-dynamic"}}]}
    store = tmp_path / "steps"
    # the quantize step reads the export just kept in the store; then one reads the export placed from it
    first = Runner(validate(raw), output_dir=tmp_path / "a", show_progress=False, log=lambda *_: None,
                   store=store).run()
    raw["passes"][1] = {"quantize": {"method": "ort-fp16"}}
    second = Runner(validate(raw), output_dir=tmp_path / "b", show_progress=False, log=lambda *_: None,
                    store=store).run()
    assert [(s.from_store, s.reused) for s in second.steps] == [(True, True), (False, False)]
    folders = [Path(s.path) for s in first.steps + second.steps] + [p for p in store.iterdir()]
    assert len(folders) == 4 + 3
    for folder in folders:
        data = folder / onnx_tools.EXTERNAL_DATA
        assert data.is_file() and data.stat().st_nlink == 1, folder
    # a run folder linked to the store by an earlier version gets its own copy when it is reused
    export = Path(first.steps[0].path) / onnx_tools.EXTERNAL_DATA
    export.unlink()
    os.link(store / first.steps[0].key / onnx_tools.EXTERNAL_DATA, export)
    again = Runner(validate(raw), output_dir=tmp_path / "a", show_progress=False, log=lambda *_: None,
                   store=store).run()
    assert [s.reused for s in again.steps] == [True, True] and export.stat().st_nlink == 1


def test_a_figure_the_task_never_measures_is_refused_in_objectives_and_constraints(tiny_llama_dir, tmp_path,
                                                                                   capsys):
    # a causal-lm gets no accuracy and no batch-1 latency: such a constraint would hold for every trial unjudged
    config = _config(tmp_path, tiny_llama_dir, constraints=["perplexity_ratio <= 1.05", "accuracy_ratio >= 0.99",
                                                            "latency_speedup >= 2"],
                     benchmark={"backends": ["torch-cpu"]})
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert "constraints.1: accuracy_ratio is not measured for task causal-lm; use one of perplexity, size_mb, " \
           "decode_tok_s, prefill_ms, peak_memory_mb (or their ratios)" in err
    assert "constraints.2: latency_speedup is not measured for task causal-lm" in err
    assert "constraints.0" not in err
    config = _config(tmp_path, tiny_llama_dir, objectives=["size_mb", "accuracy"])
    assert main(["validate", str(config)]) == 2
    assert "objectives.1: accuracy is not measured for task causal-lm" in capsys.readouterr().err


def test_a_resumed_grid_search_queues_each_untried_combination_once(tiny_llama_dir, tmp_path):
    from pipelines.search import run_search

    config = _config(tmp_path, tiny_llama_dir, factors=(1.0, 2.0, 3.0))  # grid: 6 combinations
    out = tmp_path / "runs"
    for trials, ran in ((2, 2), (3, 1), (3, 0)):
        outcome, search = run_search(config, trials=trials, output_dir=out, log=lambda *_: None)
        assert search.progress.ran == ran
        # the combinations not run yet stay queued once each, however often the search is resumed
        assert len(outcome.rows) == 6
        assert sum(r["state"] == "waiting" for r in outcome.rows) == 6 - trials


def test_when_every_trial_fails_the_summary_does_not_blame_the_constraints(tiny_llama_dir, tmp_path, capsys,
                                                                          monkeypatch):
    def run(self, model, ctx):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(helper_passes.ScaleWeights, "run", run)
    config = _config(tmp_path, tiny_llama_dir, methods=("bf16",))
    out = tmp_path / "runs"
    assert main(["search", str(config), "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 trials (2 failed); Pareto front: empty" in text
    assert "no trial was measured (each failed or was refused: see the reasons in the report's table and the " \
           "log); nothing chosen" in text
    assert "meets the constraints" not in text and "loosen a constraint" not in text
    assert _trials(out)["chosen"] is None and _trials(out)["closest"] == []
    # a search stopped (--minutes) before its first trial
    from pipelines.search.config import load_search_config
    from pipelines.search.report import Outcome, summary

    assert summary(load_search_config(config), Outcome([], [], None, False)) == [
        "0 trials; Pareto front: empty", "no trial was measured; nothing chosen"]


def test_a_range_written_with_whole_numbers_of_a_float_option_samples_floats():
    from optuna.distributions import FloatDistribution, IntDistribution

    from pipelines.search.space import find_space

    # YAML reads `low: 1` as an int; the factor option takes floats, so 1 to 3 is not just 1, 2 and 3
    space, errors = find_space([{"test-scale": {"factor": {"search": {"low": 1, "high": 3}}}},
                                {"distill": {"max_steps": {"search": {"low": 10, "high": 20}}}}])
    factor, steps = space.params
    assert not errors and factor.distribution() == FloatDistribution(1.0, 3.0)
    assert factor.decode(2.5) == 2.5 and factor.size() is None
    assert steps.distribution() == IntDistribution(10, 20)  # an int option keeps an int range


def test_a_resumed_random_search_proposes_new_recipes_not_the_first_runs_again(tiny_llama_dir, tmp_path):
    from pipelines.search import run_search

    config = _config(tmp_path, tiny_llama_dir, sampler="random")
    raw = yaml.safe_load(config.read_text())
    raw["passes"][0]["test-scale"]["factor"] = {"search": {"low": 1.0, "high": 3.0}}  # no value comes twice
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = tmp_path / "runs"
    first, _ = run_search(config, trials=2, output_dir=out, log=lambda *_: None)
    # the same seed before resuming made the sampler propose trials 0 and 1 again (copies): with 25 trials done,
    # a rerun with a larger budget stopped at 25 repeats in a row and added none
    second, search = run_search(config, trials=4, output_dir=out, log=lambda *_: None)
    factors = [r["values"]["0.test-scale.factor"] for r in second.rows]
    assert search.progress.ran == 2 and len(second.rows) == 4 and len(set(factors)) == 4
    assert all(r["same_as"] is None for r in second.rows)
    third, _ = run_search(config, trials=4, output_dir=tmp_path / "again", log=lambda *_: None)
    assert [r["values"] for r in third.rows[:2]] == [r["values"] for r in first.rows]  # seeded: reproducible


def test_a_searched_option_that_does_not_exist_is_named_once_not_blamed_on_its_values(tiny_llama_dir, tmp_path,
                                                                                     capsys):
    config = _config(tmp_path, tiny_llama_dir, sampler="random")
    cfg = yaml.safe_load(config.read_text())
    for passes, said in [
            ([{"lowrnak": {"energy": {"search": [0.9, 0.99]}}}],
             "passes.0: unknown pass 'lowrnak'; did you mean 'lowrank'?"),
            ([{"lowrnak": {"energy": {"search": {"low": 0.9, "high": 0.99}}}}],
             "passes.0: unknown pass 'lowrnak'; did you mean 'lowrank'?"),
            ([{"lowrank": {"enrgy": {"search": [0.9, 0.99]}}}],
             "passes.0.lowrank.enrgy: lowrank has no option 'enrgy' (allowed: alpha, batch_size, "),
            ([{"distill": {"student": {"keep_layer": {"search": [1, 2]}}}}],
             "passes.0.distill.student.keep_layer: distill has no option 'student.keep_layer'; see "
             "`compress passes distill`")]:
        cfg["passes"] = passes
        config.write_text(yaml.safe_dump(cfg))
        assert main(["validate", str(config)]) == 2
        err = capsys.readouterr().err
        assert said in err and "search value" not in err and len(err.strip().splitlines()) == 1, err


def test_a_strict_constraint_met_exactly_at_its_bound_is_broken(tiny_llama_dir, tmp_path):
    # factor 1 in fp32 is the source itself: size_mb_ratio exactly 1, which `size_mb_ratio < 1` excludes
    config = _config(tmp_path, tiny_llama_dir, factors=(1.0,), constraints=["size_mb_ratio < 1"],
                     objectives=["perplexity", "size_mb"])
    out = tmp_path / "runs"
    assert main(["search", str(config), "--output-dir", str(out)]) == 0
    rows = {r["options"]["quantize.method"]: r for r in _trials(out)["trials"]}
    assert rows["fp32"]["figures"]["size_mb_ratio"] == 1.0
    assert rows["fp32"]["state"] == "pruned" and rows["fp32"]["feasible"] is False
    assert rows["fp32"]["violations"][0] > 0 and "size_mb_ratio < 1" in rows["fp32"]["reason"]
    assert _trials(out)["front"] == [rows["bf16"]["number"]]


def test_a_quality_figure_the_full_measurement_does_not_score_is_refused(tiny_llama_dir, tmp_path, capsys):
    # speed needs the full measurement, whose quality is benchmark.quality's: without perplexity there, every
    # trial failed after it ("perplexity not measured"), and perplexity_ratio was judged on the screen's slice only
    config = _config(tmp_path, tiny_llama_dir, objectives=["decode_tok_s", "perplexity"],
                     benchmark={"backends": ["torch-cpu"], "quality": ["teacher-agreement"]})
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert "benchmark.quality: objectives.1 names perplexity, but the full measurement of a trial scores " \
           "teacher-agreement; add perplexity" in err
    assert "benchmark.quality: constraints.0 names perplexity_ratio" in err
    config = _config(tmp_path, tiny_llama_dir, objectives=["decode_tok_s", "perplexity"],
                     benchmark={"backends": ["torch-cpu"], "quality": ["perplexity"]})
    assert main(["validate", str(config)]) == 0


def test_a_search_whose_space_changed_refuses_the_old_study_instead_of_crashing(tiny_llama_dir, tmp_path,
                                                                               capsys):
    config = _config(tmp_path, tiny_llama_dir, factors=(1.0,), methods=("fp32",))
    out = tmp_path / "runs"
    assert main(["search", str(config), "--output-dir", str(out)]) == 0
    capsys.readouterr()
    # a value added to a list made Optuna raise inside the trial loop (a traceback, a trial left running); a
    # searched option replaced by another made best.yaml and --pick fail with a KeyError on the old trials
    for factors, methods in (((1.0, 2.0), ("fp32",)), ((1.0,), ("fp32",))):
        changed = _config(tmp_path, tiny_llama_dir, factors=factors, methods=methods, filename="changed.yaml")
        if factors == (1.0,):
            raw = yaml.safe_load(changed.read_text())
            raw["passes"][0]["test-scale"] = {"factor": 1.0, "max_factor": {"search": [10.0]}}
            changed.write_text(yaml.safe_dump(raw, sort_keys=False))
        for extra in ([], ["--pick", "0"]):
            assert main(["search", str(changed), "--output-dir", str(out), *extra]) == 2
            err = capsys.readouterr().err
            assert "Traceback" not in err
            assert "error: the study 'tiny-search' in sqlite:///" in err and "give this search another name, or " \
                   "remove the old study (e.g. its study.db)" in err
            assert "searches {'0.test-scale.factor': [1.0], '1.quantize.method': ['fp32']}, this config" in err
    assert len(_trials(out)["trials"]) == 1  # the study is as it was
    assert main(["search", str(config), "--output-dir", str(out), "--pick", "0"]) == 0  # the same config resumes


def test_a_rerun_with_other_constraints_refuses_the_old_study(tiny_llama_dir, tmp_path, capsys):
    config = _config(tmp_path, tiny_llama_dir, factors=(1.0,))
    out = tmp_path / "runs"
    assert main(["search", str(config), "--output-dir", str(out)]) == 0
    assert _trials(out)["chosen"] is not None
    capsys.readouterr()
    # the trials were judged by the old constraints: resumed, the bf16 trial (size ratio 0.51) was still
    # "chosen (best feasible)" under size_mb_ratio >= 0.9
    changed = _config(tmp_path, tiny_llama_dir, factors=(1.0,), constraints=["size_mb_ratio >= 0.9"],
                      filename="changed.yaml")
    assert main(["search", str(changed), "--output-dir", str(out)]) == 2
    assert "is constrained by ['perplexity_ratio <= 1.05'], this config ['size_mb_ratio >= 0.9']; give this " \
           "search another name" in capsys.readouterr().err


def test_a_range_whose_step_leaves_only_its_low_end_is_refused(tiny_llama_dir, tmp_path, capsys):
    config = _config(tmp_path, tiny_llama_dir)
    cfg = yaml.safe_load(config.read_text())
    cfg["passes"][0]["test-scale"]["factor"] = {"search": {"low": 1.0, "high": 1.5, "step": 1.0}}
    config.write_text(yaml.safe_dump(cfg))
    assert main(["validate", str(config)]) == 2  # it searched factor 1.0 alone, counted as 2 combinations
    assert "passes.0.test-scale.factor.search: step (1.0) is larger than the range 1.0 to 1.5, which would " \
           "leave only 1.0" in capsys.readouterr().err
    cfg["passes"][0]["test-scale"]["factor"] = {"search": {"low": 0.9, "high": 0.99, "step": 0.09}}
    config.write_text(yaml.safe_dump(cfg))
    assert main(["validate", str(config)]) == 0  # 0.99 - 0.9 is a hair under 0.09 in floats: two values
    assert "(4 combinations: test-scale.factor, quantize.method)" in capsys.readouterr().out


def test_the_search_schema_accepts_a_searched_quantize_method(tmp_path):
    from pipelines.search.config import json_schema

    schema = json_schema()
    defs = schema["$defs"]

    def quantize(items):
        return next(i for i in items["oneOf"] if "quantize" in i["properties"])["properties"]["quantize"]

    # {method: {search: [fp32, bf16]}} fits every variant (each takes a searched method, the rest defaults), so
    # `oneOf` (exactly one) made editors flag a valid search config
    variants = [defs[r["$ref"].split("/")[-1]] for r in quantize(schema["properties"]["passes"]["items"])["anyOf"]]
    fits = [v for v in variants if not set(v.get("required", [])) - {"method"} and "method" in v["properties"]
            and {"$ref": "#/$defs/SearchValues"} in v["properties"]["method"]["anyOf"]]
    assert len(fits) == len(variants) == 7
    assert "oneOf" not in quantize(schema["properties"]["passes"]["items"])
    assert "oneOf" in quantize(defs["BranchConfig"]["properties"]["passes"]["items"])  # branches are not searched


def test_the_report_says_its_quality_comes_from_the_screens_slice(known_space, tiny_llama_dir, tmp_path):
    from pipelines.search.config import load_search_config
    from pipelines.search.measure import Measurer

    # size and perplexity need no full measurement: every figure is the screen's, on 256 of the 1024 eval tokens,
    # so `compress run best.yaml` reports another perplexity
    assert ("Quality is scored on the screen's slice of the eval data (256 tokens); `compress run` of a recipe "
            "scores all of it, so its figures differ a little.") in (known_space["search"] / "report.md").read_text()
    whole = load_search_config(_config(tmp_path, tiny_llama_dir, screen={"max_tokens": 1024}))
    assert Measurer(whole, tmp_path / "m").slice is None  # the slice is the whole eval data: nothing to say


def test_a_constraint_whose_figure_is_unknown_fails_the_trial_instead_of_passing_it(tiny_llama_dir, tmp_path,
                                                                                   monkeypatch):
    import pipelines.search.measure as measure_mod

    # a baseline figure of 0 (a tiny classifier's accuracy) leaves its ratio unknown: the constraint on it was
    # skipped, and every trial counted as meeting it
    original = measure_mod.Measurer.screen

    def screen(self, target):
        figures = dict(original(self, target))
        if Path(str(target)) == tiny_llama_dir:
            figures["perplexity"] = 0.0
        return figures

    monkeypatch.setattr(measure_mod.Measurer, "screen", screen)
    config = _config(tmp_path, tiny_llama_dir, factors=(1.0,), methods=("bf16",))
    out = tmp_path / "runs"
    assert main(["search", str(config), "--output-dir", str(out)]) == 0
    row, = _trials(out)["trials"]
    assert row["state"] == "failed" and row["reason"] == ("perplexity_ratio not known for this checkpoint (not "
                                                          "measured, or a ratio to a baseline figure of 0)")
    assert _trials(out)["chosen"] is None


def test_a_mistyped_search_key_is_named_with_the_search_key_it_could_be(tiny_llama_dir, tmp_path, capsys):
    cfg = yaml.safe_load(_config(tmp_path, tiny_llama_dir).read_text())
    cfg["objective"] = cfg.pop("objectives")
    config = tmp_path / "typo.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: objective: unknown option 'objective'; did you mean 'objectives'? (allowed: "), err
    assert "objectives, output_dir, passes, sampler, screen, seed, start_with" in err
    assert len(err.strip().splitlines()) == 1


def test_a_mistyped_search_marker_is_named_not_passed_to_the_pass(tiny_llama_dir, tmp_path, capsys):
    cfg = yaml.safe_load(_config(tmp_path, tiny_llama_dir).read_text())
    config = tmp_path / "marker.yaml"
    for factor, methods in [({"serch": [1.0, 3.0]}, {"search": ["fp32", "bf16"]}),  # else: not a number
                            (1.0, {"Search": ["fp32", "bf16"]}),  # else: "nothing to search"
                            (1.0, {"search": ["fp32", "bf16"], "default": "fp32"})]:
        cfg["passes"] = [{"test-scale": {"factor": factor}}, {"quantize": {"method": methods}}]
        config.write_text(yaml.safe_dump(cfg))
        assert main(["validate", str(config)]) == 2
        err = capsys.readouterr().err
        where = "passes.0.test-scale.factor" if isinstance(factor, dict) else "passes.1.quantize.method"
        assert err.startswith(f"error: {where}: ") and "is not a search space; write {search: ...} with no other " \
            "key" in err and len(err.strip().splitlines()) == 1, err


def test_a_constraint_no_figure_can_meet_is_refused_before_any_trial(tiny_llama_dir, tmp_path, capsys):
    config = _config(tmp_path, tiny_llama_dir, constraints=["perplexity_ratio <= 0", "size_mb < -1",
                                                            "size_mb_ratio >= 0"])
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert "constraints.0: 'perplexity_ratio <= 0' can never hold: perplexity_ratio is always above 0" in err
    assert "constraints.1: 'size_mb < -1' can never hold" in err and "constraints.2" not in err
    from pipelines.search.figures import parse_constraint

    assert "accuracy is a fraction from 0 to 1" in parse_constraint("accuracy >= 99", "constraints.0")[1]
    assert parse_constraint("accuracy >= 1", "constraints.0")[0].bound == 1.0  # every example right: possible


def test_a_rerun_on_other_data_refuses_the_old_study(tiny_llama_dir, tmp_path, capsys):
    config = _config(tmp_path, tiny_llama_dir, factors=(1.0,))
    out = tmp_path / "runs"
    assert main(["search", str(config), "--output-dir", str(out)]) == 0
    assert main(["search", str(config), "--output-dir", str(out), "--trials", "3"]) == 0  # the same: resumed
    capsys.readouterr()
    # resumed, the old trials' perplexities (on wikipedia, 256 tokens) were reported as this config's
    changed = _config(tmp_path, tiny_llama_dir, factors=(1.0,), screen={"max_tokens": 128}, filename="changed.yaml")
    cfg = yaml.safe_load(changed.read_text())
    cfg["data"]["eval"]["source"] = "builtin:shakespeare"
    changed.write_text(yaml.safe_dump(cfg))
    assert main(["search", str(changed), "--output-dir", str(out)]) == 2
    assert "was measured with other data, screen settings than this config's; give this search another name" \
        in capsys.readouterr().err
    assert len(_trials(out)["trials"]) == 2


def test_a_rerun_with_another_seed_refuses_the_old_study(tiny_llama_dir, tmp_path, capsys):
    """Every pass is seeded from the pipeline's seed: a study resumed under another one reported the old trials'
    figures and wrote a best.yaml (with the new seed) whose model was never measured."""
    config = _config(tmp_path, tiny_llama_dir, factors=(1.0,))
    out = tmp_path / "runs"
    assert main(["search", str(config), "--output-dir", str(out)]) == 0
    capsys.readouterr()
    cfg = yaml.safe_load(config.read_text())
    cfg["seed"] = 7
    changed = tmp_path / "seeded.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    assert main(["search", str(changed), "--output-dir", str(out), "--trials", "3"]) == 2
    assert "was measured with other seed settings than this config's" in capsys.readouterr().err


def test_a_storage_that_is_not_a_database_url_is_bad_input_not_a_traceback(tiny_llama_dir, tmp_path, capsys):
    config = _config(tmp_path, tiny_llama_dir)
    for storage, why in [(str(tmp_path / "study.db"), "ArgumentError: Could not parse SQLAlchemy URL"),
                         ("bogus://host/db", "NoSuchModuleError: Can't load plugin: sqlalchemy.dialects:bogus")]:
        assert main(["search", str(config), "--output-dir", str(tmp_path / "runs"), "--storage", storage]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --storage {storage}: not a storage this machine can open ({why}"), err
        assert "e.g. sqlite:////abs/path/study.db" in err and "Traceback" not in err


def test_the_terminal_says_what_runs_before_each_trial_ends(tiny_llama_dir, tmp_path, capsys):
    config = _config(tmp_path, tiny_llama_dir, factors=(1.0,), methods=("fp32",))
    assert main(["search", str(config), "--output-dir", str(tmp_path / "runs")]) == 0
    lines = capsys.readouterr().out.splitlines()
    # silent until a trial ended: minutes per trial on a real model, and the baseline's measurement first
    assert lines[:3] == ["measuring the baseline", "trial 0: test-scale.factor=1.0, quantize.method=fp32 -> running",
                         "trial 0: test-scale.factor=1.0, quantize.method=fp32 -> complete"]


def test_a_budget_of_minutes_alone_is_not_cut_at_the_default_trial_count():
    from pipelines.search.config import Budget

    # budget: {minutes: 60} stopped at "budget: 20 trials" after however few minutes those took
    assert Budget(minutes=60).trials is None
    assert (Budget().trials, Budget().minutes) == (20, None)
    assert Budget(trials=20, minutes=60).trials == 20


def test_a_searched_option_in_a_branch_is_named_as_not_searched(tiny_llama_dir, tmp_path, capsys):
    config = _config(tmp_path, tiny_llama_dir,
                     branches=[{"name": "half", "passes": [{"quantize": {"method": {"search": ["fp16", "bf16"]}}}]}])
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err  # was: "unknown method {'search': ['fp16', 'bf16']}"
    assert err == "error: branches.0.passes.0.quantize.method: branches are not searched (they are not part of the " \
                  "trials); search the option in `passes`, or give the branch one value\n"


def test_a_failed_write_of_the_outputs_leaves_the_earlier_ones_whole(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    config = _config(tmp_path, tiny_llama_dir, factors=(1.0,))
    out = tmp_path / "runs"
    assert main(["search", str(config), "--output-dir", str(out)]) == 0
    search = out / "tiny-search" / "search"
    before = {n: (search / n).read_text() for n in ("trials.json", "best.yaml", "report.md")}
    real = Path.write_text

    def disk_full(self, text, *args, **kwargs):  # half the text lands, then the disk is full
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", disk_full)
    assert main(["search", str(config), "--output-dir", str(out), "--pick", "0"]) == 1
    monkeypatch.undo()
    assert "No space left on device" in capsys.readouterr().err
    assert {n: (search / n).read_text() for n in before} == before  # was: trials.json cut in half
    assert not list(search.glob(".*.tmp-*"))


def test_a_search_never_writes_into_a_checkpoint_or_the_model_source(tiny_llama_dir, tmp_path, capsys):
    import shutil

    src = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, src)
    ckpt = tmp_path / "ckpt"  # what the check looks for: a folder with a manifest
    ckpt.mkdir()
    (ckpt / "manifest.json").write_text("{}")
    config = _config(tmp_path, src)
    before = sorted(ckpt.rglob("*")), sorted(src.rglob("*"))
    for out, message in [(ckpt, f"--output-dir {ckpt}: is inside the checkpoint {ckpt}"),
                         (src, f"--output-dir {src}: the run folder {src / 'tiny-search'} would be in the model ")]:
        assert main(["search", str(config), "--output-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert (sorted(ckpt.rglob("*")), sorted(src.rglob("*"))) == before


def test_a_seed_optuna_refuses_is_refused_before_the_search(tiny_llama_dir, tmp_path, capsys):
    config = _config(tmp_path, tiny_llama_dir)
    assert main(["validate", str(config), "--set", f"seed={2**32 - 1}"]) == 2  # a ValueError in the first trial
    err = capsys.readouterr().err
    assert f"seed: a search seeds Optuna's sampler, which takes seeds below 2**32; give a seed below {2**32 - 64}" \
        in err and "Traceback" not in err
    assert main(["validate", str(config), "--set", f"seed={2**32 - 65}"]) == 0


def test_a_time_budget_that_never_ends_is_refused(tiny_llama_dir, tmp_path, capsys):
    # --minutes nan compared false with the elapsed time, so the search never stopped on time (and exited 0)
    config = _config(tmp_path, tiny_llama_dir)
    for value in ("nan", "inf", "0"):
        assert main(["search", str(config), "--minutes", value, "--output-dir", str(tmp_path / "runs")]) == 2
        err = capsys.readouterr().err
        assert f"--minutes: must be a finite number above 0 (got {float(value):g})" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()
    for value in (".inf", ".nan"):
        assert main(["validate", str(config), "--set", f"budget.minutes={value}"]) == 2
        assert "budget.minutes: Input should be a finite number" in capsys.readouterr().err
