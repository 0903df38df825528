"""`compress run` benchmarks every checkpoint and caches results; `compress bench` writes records and reports."""
import json

import pytest

import benchmarks.pipeline
from pipelines.config import validate
from pipelines.runner import Runner


def _pipeline(source, out, window=32, **latency):
    return validate({
        "name": "bench-demo", "model": {"source": str(source)}, "task": "causal-lm", "output_dir": str(out),
        "data": {"eval": {"source": "builtin:wikipedia", "max_tokens": 300, "seq_len": 32}},
        "passes": [{"quantize": {"method": "bf16"}}],
        "benchmark": {"threads": 1, "window": window, "kl_top_k": 8,
                      "latency": {"warmup": 0, "repeats": 1, "prompt_tokens": 8, "new_tokens": 4, **latency}},
    })


def test_run_benchmarks_each_checkpoint_and_reuses_results(tiny_llama_dir, tmp_path, monkeypatch):
    result = Runner(_pipeline(tiny_llama_dir, tmp_path), show_progress=False, log=lambda *a: None).run()
    run_dir = tmp_path / "bench-demo"
    assert result.report == run_dir / "report.md"
    records = json.loads((run_dir / "results.json").read_text())["records"]
    assert [(r["label"], r["backend"], r["is_baseline"]) for r in records] == [
        ("source", "torch-cpu", True), ("01-quantize", "torch-cpu", False)]
    src, bf16 = (r["quality"] for r in records)
    assert src["top1_agreement"] == 1.0 and src["kl"] < 1e-6
    assert abs(bf16["perplexity"] / src["perplexity"] - 1) < 0.05 and 0.5 < bf16["top1_agreement"] <= 1.0
    assert records[1]["settings"]["data"]["max_tokens"] == 300  # the pipeline's data.eval
    md = (run_dir / "report.md").read_text()
    assert "| 01-quantize | torch-cpu |" in md and (run_dir / "report.html").exists()
    before = (run_dir / "results.json").read_bytes()

    calls = []

    def fake_measure(target, **kw):
        calls.append(target)
        return {"label": kw["label"], "backend": kw["backend"], "task": "causal-lm", "skipped": "stub"}

    monkeypatch.setattr(benchmarks.pipeline, "measure", fake_measure)
    Runner(_pipeline(tiny_llama_dir, tmp_path), show_progress=False, log=lambda *a: None).run()
    assert calls == []  # nothing changed: every result reused
    assert (run_dir / "results.json").read_bytes() == before
    Runner(_pipeline(tiny_llama_dir, tmp_path), show_progress=False, log=lambda *a: None, remeasure=True).run()
    assert calls == [str(tiny_llama_dir), str(run_dir / "01-quantize")]  # --remeasure: every row timed again
    calls.clear()
    Runner(_pipeline(tiny_llama_dir, tmp_path, window=16), show_progress=False, log=lambda *a: None).run()
    assert len(calls) == 2  # a benchmark setting changed: both measured again


def test_benchmark_steps_selects_rows_and_names_unknown_ones(tiny_llama_dir, tmp_path, monkeypatch):
    from compress.errors import ConfigError

    raw = _pipeline(tiny_llama_dir, tmp_path).config.model_dump(mode="json", by_alias=True)
    raw["passes"] = [{"quantize": {"method": "bf16"}}, {"quantize": {"method": "fp32"}}]
    raw["benchmark"]["steps"] = ["02-quantize"]
    calls = []

    def fake_measure(target, **kw):
        calls.append(kw["label"])
        return {"label": kw["label"], "backend": kw["backend"], "task": "causal-lm", "skipped": "stub"}

    monkeypatch.setattr(benchmarks.pipeline, "measure", fake_measure)
    Runner(validate(raw), show_progress=False, log=lambda *a: None).run()
    assert calls == ["source", "02-quantize"]  # 01-quantize left out; the source (baseline) always measured
    raw["benchmark"]["steps"] = ["03-quantize"]
    with pytest.raises(ConfigError, match=r"benchmark.steps: '03-quantize' is not a step"):
        validate(raw)


def test_bench_cli_writes_records_with_the_baseline_first(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace as Target

    import benchmarks.harness

    seen = []

    def fake_measure(target, **kw):
        seen.append((target, kw["backend"], kw["baseline"]))
        return {"label": kw["label"], "target": target, "backend": kw["backend"], "task": "causal-lm",
                "skipped": "stub"}

    monkeypatch.setattr(benchmarks.harness, "measure", fake_measure)
    monkeypatch.setattr(benchmarks.harness, "resolve_target",
                        lambda target, task=None: Target(task="causal-lm", kind="torch"))
    from pipelines.cli import main

    rc = main(["bench", "a-ckpt", "b-ckpt", "--baseline", "base", "--backends", "torch-cpu,ort-cpu",
               "--output", str(tmp_path), "--no-progress", "--repeats", "3"])
    assert seen[0] == ("base", "torch-cpu", "base") and len(seen) == 6
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    assert [r["is_baseline"] for r in records] == [True, True, False, False, False, False]
    out, err = capsys.readouterr()
    assert "stub" in out
    assert rc == 1 and "nothing was measured" in err  # every row skipped: a failure, not a report of nothing


def test_bench_cli_takes_paths_relative_to_where_it_runs(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """The measuring process runs in the caller's folder: a relative checkpoint and output folder (and the
    prepared inputs under it) mean the same there."""
    import os

    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["bench", os.path.relpath(tiny_llama_dir), "--output", "out", "--no-progress", "--no-latency",
            "--quality", "perplexity", "--data", "builtin:shakespeare", "--max-tokens", "96", "--window", "32",
            "--threads", "1"]
    rc = main(args)
    assert rc == 0, capsys.readouterr().err
    (record,) = json.loads((tmp_path / "out" / "results.json").read_text())["records"]
    assert "error" not in record and 1 < record["quality"]["perplexity"] < 1e6
    first = (tmp_path / "out" / "results.json").read_text()
    assert main(args) == 0  # a second bench into the same folder keeps the first's results
    (kept,) = (tmp_path / "out" / "previous").iterdir()
    assert (kept / "results.json").read_text() == first and (kept / "report.md").is_file()
    assert "are kept in" in capsys.readouterr().err


def test_bench_caps_apply_to_the_default_data_without_data(tmp_path, tiny_llama_dir, capsys):
    from pipelines.cli import main

    args = ["bench", str(tiny_llama_dir), "--output", str(tmp_path), "--no-progress", "--no-latency",
            "--quality", "perplexity", "--threads", "1", "--window", "32"]
    assert main(args + ["--max-tokens", "96"]) == 0, capsys.readouterr().err
    (record,) = json.loads((tmp_path / "results.json").read_text())["records"]
    assert record["settings"]["data"]["source"] == "builtin:wikipedia"  # the causal-lm default, capped
    assert record["settings"]["data"]["max_tokens"] == 96
    assert main(args + ["--max-tokens", "0"]) == 2
    assert "bench.data.max_tokens" in capsys.readouterr().err


def test_bench_cli_rejects_bad_options(tmp_path):
    from pipelines.cli import main

    assert main(["bench", "x", "--backends", "torch-gpu", "--output", str(tmp_path)]) == 2
    assert main(["bench", "x", "--max-tokens", "100", "--output", str(tmp_path)]) == 2  # no such target
    with pytest.raises(SystemExit):
        main(["bench"])


def test_pooled_rounds_resummarize_runs():
    from benchmarks.latency import pool, summarize

    a = {"prefill": summarize([0.1, 0.3]), "decode": summarize([1.0, 1.2]), "batch": 1, "prompt_tokens": 8,
         "new_tokens": 4}
    b = {**a, "prefill": summarize([0.2]), "decode": summarize([2.0])}
    p = pool(a, b)
    assert p["rounds"] == 2 and p["decode"]["n"] == 3 and p["decode"]["median_ms"] == pytest.approx(1200)
    assert p["decode"]["max_ms"] == pytest.approx(2000) and p["prefill"]["median_ms"] == pytest.approx(200)
    assert p["decode_tokens_per_s"] == pytest.approx(4 / 1.2) and p["prefill_tokens_per_s"] == pytest.approx(40)
    assert pool(p, b)["rounds"] == 3


def test_decode_ms_per_token_counts_every_row_of_the_batch():
    """With --batch 4 the decode ms per token (the latency plot's x axis) was the median over new_tokens alone,
    4x what decode tok/s says; now the two are each other's inverse."""
    from benchmarks.latency import pool, summarize

    a = {"prefill": summarize([0.1]), "decode": summarize([1.2]), "batch": 4, "prompt_tokens": 8, "new_tokens": 4}
    p = pool(a, {**a, "decode": summarize([1.2])})
    assert p["decode_ms_per_token"] == pytest.approx(1200 / 16) and p["decode_tokens_per_s"] == pytest.approx(16 / 1.2)


def test_timing_rounds_take_turns_and_pool_runs(tiny_llama_dir, tmp_path, monkeypatch):
    import benchmarks.harness

    real, calls = benchmarks.harness.measure, []

    def logged(target, **kw):
        calls.append((kw["label"], bool(kw["settings"].quality)))
        return real(target, **kw)

    monkeypatch.setattr(benchmarks.pipeline, "measure", logged)
    monkeypatch.setattr(benchmarks.harness, "measure", logged)
    config = _pipeline(tiny_llama_dir, tmp_path, repeats=2, rounds=2)
    Runner(config, show_progress=False, log=lambda *a: None).run()
    # round 1 measures everything; round 2 times each row again, the rows taking turns
    assert calls == [("source", True), ("01-quantize", True)] + [("source", False), ("01-quantize", False)]
    records = json.loads((tmp_path / "bench-demo" / "results.json").read_text())["records"]
    for r in records:
        assert r["latency"]["rounds"] == 2 and r["latency"]["decode"]["n"] == 4 and "perplexity" in r["quality"]
        runs = sorted(r["latency"]["decode"]["runs_ms"])
        assert r["latency"]["decode"]["median_ms"] == pytest.approx((runs[1] + runs[2]) / 2, abs=1e-2)
    assert "in each of 2 rounds" in (tmp_path / "bench-demo" / "report.md").read_text()
    calls.clear()
    Runner(config, show_progress=False, log=lambda *a: None).run()
    assert calls == []  # the pooled records were stored


def test_run_exits_1_when_a_benchmark_row_failed(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    import yaml

    from pipelines.cli import main

    def failing_measure(target, **kw):
        return {"label": kw["label"], "backend": kw["backend"], "task": "causal-lm", "error": "stub failure"}

    monkeypatch.setattr(benchmarks.pipeline, "measure", failing_measure)
    raw = _pipeline(tiny_llama_dir, tmp_path).config.model_dump(mode="json", by_alias=True)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["run", str(config), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "the benchmark failed for source on torch-cpu, 01-quantize on torch-cpu" in err
    assert (tmp_path / "bench-demo" / "01-quantize" / "manifest.json").is_file()  # the checkpoint stands


def test_bench_cli_measures_each_target_on_its_own_runtime_by_default(tiny_llama_dir, tmp_path, monkeypatch):
    import benchmarks.harness
    from pipelines.cli import main

    onnx_dir = tmp_path / "onnx-model"
    onnx_dir.mkdir()
    (onnx_dir / "model.onnx").write_bytes(b"")
    (onnx_dir / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (onnx_dir / "tokenizer.json").write_text("{}")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    seen = []

    def fake_measure(target, **kw):
        seen.append((target, kw["backend"]))
        return {"label": kw["label"], "target": target, "backend": kw["backend"], "task": "causal-lm",
                "skipped": "stub"}

    monkeypatch.setattr(benchmarks.harness, "measure", fake_measure)
    main(["bench", str(onnx_dir), str(gguf), str(tiny_llama_dir), "--baseline", str(tiny_llama_dir),
          "--output", str(tmp_path / "out"), "--no-progress"])
    assert seen == [(str(onnx_dir), "ort-cpu"), (str(gguf), "llamacpp-cpu"), (str(tiny_llama_dir), "torch-cpu")]


def test_bench_refuses_a_damaged_checkpoint_before_measuring(tmp_path, monkeypatch, capsys):
    """An ONNX checkpoint is read by ONNX Runtime, not compress.load: bench verifies it (every file, size and
    hash) first, so damaged weights are refused, not measured."""
    import benchmarks.harness
    from compress import checkpoint
    from compress.checkpoint import Artifact
    from pipelines.cli import main

    src = tmp_path / "onnx"
    src.mkdir()
    (src / "model.onnx").write_bytes(b"graph" * 100)
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    ckpt = checkpoint.save(Artifact(kind="onnx", task="causal-lm", tokenizer=None, onnx_dir=src), tmp_path / "ckpt")
    measured = []
    monkeypatch.setattr(benchmarks.harness, "measure", lambda target, **kw: measured.append(target) or {
        "label": kw["label"], "backend": kw["backend"], "task": "causal-lm", "skipped": "stub"})
    main(["bench", str(ckpt), "--output", str(tmp_path / "out"), "--no-progress"])
    assert measured == [str(ckpt)]  # intact: measured
    measured.clear()
    data = bytearray((ckpt / "model.onnx").read_bytes())
    data[10] ^= 0xFF
    (ckpt / "model.onnx").write_bytes(bytes(data))
    benchmarks.harness._verified.cache_clear()
    assert main(["bench", str(ckpt), "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "sha256" in capsys.readouterr().err and measured == []


def _onnx_checkpoint(tmp_path):
    from compress import checkpoint
    from compress.checkpoint import Artifact

    src = tmp_path / "onnx"
    src.mkdir()
    (src / "model.onnx").write_bytes(b"graph" * 100)
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return checkpoint.save(Artifact(kind="onnx", task="causal-lm", tokenizer=None, onnx_dir=src), tmp_path / "ckpt")


@pytest.mark.parametrize("option,inside", [("--output", ""), ("--output", "reports"), ("--work-dir", "cache")])
def test_bench_refuses_to_write_into_a_checkpoint(tmp_path, monkeypatch, capsys, option, inside):
    """`--output CKPT` wrote results.json, the reports, plots and .bench/ into the checkpoint, which then refused
    to load (files its manifest does not list); now refused before anything is written."""
    import benchmarks.harness
    from compress.checkpoint import verify
    from pipelines.cli import main

    ckpt = _onnx_checkpoint(tmp_path)
    before = sorted(p.name for p in ckpt.rglob("*"))
    measured = []
    monkeypatch.setattr(benchmarks.harness, "measure", lambda target, **kw: measured.append(target))
    args = ["bench", str(ckpt), "--no-progress", option, str(ckpt / inside)]
    if option == "--work-dir":
        args += ["--output", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{option} {ckpt / inside}: is inside the checkpoint {ckpt}" in err and "Traceback" not in err
    assert measured == [] and sorted(p.name for p in ckpt.rglob("*")) == before
    verify(ckpt)


def test_bench_table_prints_brackets_as_text(capsys):
    """The terminal lines went through rich markup: the llama.cpp skip reason printed "pip install -e '.'"
    (the "[llama]" of the command was taken for a style) and a label "[b]" vanished."""
    from benchmarks.cli import print_table

    reason = "llamacpp-cpu: llama-cpp-python is not installed (...: pip install -e '.[llama]')"
    record = {"label": "run[b]", "backend": "ort-cpu", "task": "causal-lm", "params": 1000, "size_bytes": 10**6}
    print_table([{"label": "q[bold]", "backend": "llamacpp-cpu", "task": "causal-lm", "skipped": reason},
                 {**record, "is_baseline": True}])
    out = capsys.readouterr().out
    assert "q[bold] on llamacpp-cpu: " + reason in out.replace("\n", "")
    assert "run[b]" in out


@pytest.mark.parametrize("extra", [["--baseline", "BERT"], ["--task", "causal-lm"]])
def test_bench_refuses_an_encoder_as_a_causal_lm_before_measuring(tiny_llama_dir, tiny_bert_dir, tmp_path, monkeypatch,
                                                                   capsys, extra):
    """An encoder as an LM's baseline measured the baseline row (as a classifier), then failed the LM's row in
    the worker's reference run; `--task causal-lm` on an encoder failed in the worker too (exit 1). Now both
    are bad input (exit 2) before any row is measured."""
    import benchmarks.harness
    from pipelines.cli import main

    measured = []
    monkeypatch.setattr(benchmarks.harness, "measure", lambda target, **kw: measured.append(target))
    target = str(tiny_bert_dir) if "--task" in extra else str(tiny_llama_dir)
    extra = [str(tiny_bert_dir) if a == "BERT" else a for a in extra]
    assert main(["bench", target, *extra, "--output", str(tmp_path), "--no-progress"]) == 2
    assert f"{tiny_bert_dir} is a BertForSequenceClassification, with no language-model head for task causal-lm" \
        in capsys.readouterr().err
    assert measured == []


def test_bench_refuses_to_write_over_a_runs_report(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """`compress bench ... --output runs/<name>` replaced the run's results.json, report.md/html and plots with
    the bench's (the run's report was lost until the run was redone); now refused before anything is written."""
    import benchmarks.harness
    from pipelines.cli import main

    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "run.json").write_text("{}")
    (run / "results.json").write_text("the run's")
    measured = []
    monkeypatch.setattr(benchmarks.harness, "measure", lambda target, **kw: measured.append(target) or {
        "label": kw["label"], "backend": kw["backend"], "task": "causal-lm", "skipped": "stub"})
    assert main(["bench", str(tiny_llama_dir), "--output", str(run), "--no-progress"]) == 2
    assert f"--output {run}: is the folder of a `compress run` (run.json)" in capsys.readouterr().err
    assert (run / "results.json").read_text() == "the run's" and sorted(p.name for p in run.iterdir()) == [
        "results.json", "run.json"] and measured == []


def test_a_baseline_spelled_another_way_than_its_target_is_measured_once(tmp_path, monkeypatch):
    """`bench X --baseline X/` measured X twice, and only the added copy counted as the baseline."""
    from types import SimpleNamespace as Target

    import benchmarks.harness

    (tmp_path / "ck").mkdir()
    seen = []
    monkeypatch.setattr(benchmarks.harness, "measure", lambda target, **kw: seen.append(target) or {
        "label": kw["label"], "target": target, "backend": kw["backend"], "task": "causal-lm", "skipped": "stub"})
    monkeypatch.setattr(benchmarks.harness, "resolve_target",
                        lambda target, task=None: Target(task="causal-lm", kind="torch"))
    from pipelines.cli import main

    main(["bench", str(tmp_path / "ck"), "--baseline", f"{tmp_path / 'ck'}/", "--backends", "torch-cpu",
          "--output", str(tmp_path / "out"), "--no-progress"])
    assert seen == [str(tmp_path / "ck")]
    records = json.loads((tmp_path / "out" / "results.json").read_text())["records"]
    assert [r["is_baseline"] for r in records] == [True]


def test_bench_keeps_other_libraries_notices_in_its_log(tmp_path, monkeypatch, capfd):
    """As `compress run` does: a library's warning during a measurement (optimum's on-the-fly export) goes to
    OUTPUT/bench.log, and to the terminal only with --verbose."""
    import logging
    import warnings
    from types import SimpleNamespace as Target

    import benchmarks.harness

    def noisy_measure(target, **kw):
        warnings.warn("NOISY-BENCH-WARNING", FutureWarning)
        logging.getLogger("optimum.exporters").warning("NOISY-BENCH-NOTICE")
        return {"label": kw["label"], "target": target, "backend": kw["backend"], "task": "causal-lm",
                "skipped": "stub"}

    monkeypatch.setattr(benchmarks.harness, "measure", noisy_measure)
    monkeypatch.setattr(benchmarks.harness, "resolve_target",
                        lambda target, task=None: Target(task="causal-lm", kind="torch"))
    from pipelines.cli import main

    for out, verbose in (("quiet", []), ("loud", ["--verbose"])):
        capfd.readouterr()
        main(["bench", "a-ckpt", "--backends", "torch-cpu", "--output", str(tmp_path / out), "--no-progress",
              *verbose])
        stdout, err = capfd.readouterr()
        log = (tmp_path / out / "bench.log").read_text()
        assert "NOISY-BENCH-WARNING" in log and "NOISY-BENCH-NOTICE" in log
        assert ("NOISY-BENCH-NOTICE" in err) == bool(verbose) and "NOISY-BENCH-WARNING" not in stdout
        assert f"log: {tmp_path / out / 'bench.log'}" in stdout


def test_an_interrupted_bench_keeps_the_rows_it_measured(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace as Target

    import benchmarks.harness

    def measure_then_ctrl_c(target, **kw):
        if target == "b-ckpt":
            raise KeyboardInterrupt
        return {"label": kw["label"], "target": target, "backend": kw["backend"], "task": "causal-lm",
                "quality": {"perplexity": 12.5}}

    monkeypatch.setattr(benchmarks.harness, "measure", measure_then_ctrl_c)
    monkeypatch.setattr(benchmarks.harness, "resolve_target",
                        lambda target, task=None: Target(task="causal-lm", kind="torch"))
    from pipelines.cli import main

    assert main(["bench", "a-ckpt", "b-ckpt", "--backends", "torch-cpu", "--output", str(tmp_path),
                 "--no-progress"]) == 1
    results = json.loads((tmp_path / "results.json").read_text())
    assert [(r["label"], r["quality"]["perplexity"]) for r in results["records"]] == [("a-ckpt", 12.5)]
    assert results["title"] == "compress bench (stopped after 1 rows)"
    assert "the 1 rows measured so far are in" in capsys.readouterr().err


def test_a_gguf_file_without_a_baseline_is_bad_input_before_measuring(tmp_path, monkeypatch, capsys):
    import benchmarks.harness
    from pipelines.cli import main

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(benchmarks.harness, "measure", lambda *a, **kw: pytest.fail("measured"))
    assert main(["bench", str(gguf), "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "model.gguf: a GGUF file is measured on the token ids of its baseline's tokenizer; name the model it " \
           "was converted from with --baseline" in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()


def test_bench_refuses_timing_options_with_no_latency(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["bench", "x", "--no-latency", "--repeats", "5", "--new-tokens", "8", "--output", str(tmp_path)]) == 2
    assert "error: --new-tokens, --repeats: timing options, and --no-latency turns timing off; drop one or the " \
           "other" in capsys.readouterr().err


def test_bench_refuses_a_work_dir_that_is_a_file(tmp_path, capsys):
    """It failed after the first row started, with a traceback (NotADirectoryError: .../inputs)."""
    from pipelines.cli import main

    (tmp_path / "work").write_text("")
    assert main(["bench", "x", "--work-dir", str(tmp_path / "work"), "--output", str(tmp_path / "out")]) == 2
    assert f"error: --work-dir {tmp_path / 'work'}: is a file, not a folder; give a folder" in capsys.readouterr().err
