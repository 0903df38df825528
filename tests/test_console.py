"""What a person sees: the end-of-run table, quiet output (run.log), option listings, local data splits and
the model card beside every checkpoint."""
import io
import json
import logging
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from pydantic import Field

import benchmarks.pipeline
import compress
from benchmarks.report import write_report
from compress.data import DataSpec, PipelineData, default_split, load_dataset
from compress.errors import DataSourceError
from compress.passes import register
from compress.passes.base import Pass, PassConfig
from pipelines.cli import main
from pipelines.config import validate
from pipelines.console import print_summary, rows_from_results

NOISE = ("NOISY-PY-WARNING", "NOISY-TRANSFORMERS-NOTICE", "NOISY-OTHER-LIBRARY")


class NoisyConfig(PassConfig):
    factor: float = Field(1.0, description="multiply every weight by this")
    label: str = Field("x", description="unused")


@register
class Noisy(Pass):
    """Does what a third-party library does during a pass: a Python warning, a transformers notice and a
    record of some other library's logger."""

    name = "test-noisy"
    Config = NoisyConfig

    def apply(self, model, ctx):
        from transformers.utils import logging as hf_logging

        warnings.warn(NOISE[0], FutureWarning)
        hf_logging.get_logger("transformers.tokenization_utils").warning(NOISE[1])
        logging.getLogger("some.library").warning(NOISE[2])
        return model.derive(info={"factor": self.config.factor})


def _write_config(tmp_path, model_dir, name="console", benchmark=None, factor=2.0):
    cfg = {"name": name, "model": {"source": str(model_dir)}, "threads": 1,
           "data": {"train": {"source": "builtin:shakespeare", "max_tokens": 256, "seq_len": 32}},
           "passes": [{"test-noisy": {"factor": factor}}, {"quantize": {"method": "bf16"}}]}
    if benchmark:
        cfg["benchmark"] = benchmark
        cfg["data"]["eval"] = {"source": "builtin:wikipedia", "max_tokens": 256, "seq_len": 32}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ----------------------------------------------------------------------------- the end-of-run table
def _record(label, ppl, tok_s, size, base=False, backend="torch-cpu"):
    return {"label": label, "target": label, "task": "causal-lm", "backend": backend, "is_baseline": base,
            "size_bytes": size, "quality": {"perplexity": ppl, "top1_agreement": 1.0 if base else 0.9},
            "latency": {"decode_tokens_per_s": tok_s}}


def _expected(records):
    """Ratios straight from results.json: each row against the first baseline record."""
    ref = next(r for r in records if r["is_baseline"])
    return {(r["label"], r["backend"]): (ref["size_bytes"] / r["size_bytes"],
                                         r["quality"]["perplexity"] / ref["quality"]["perplexity"],
                                         r["latency"]["decode_tokens_per_s"] / ref["latency"]["decode_tokens_per_s"])
            for r in records}


def test_end_of_run_table_ratios_equal_results_json(tmp_path):
    records = [_record("source", 20.0, 15.0, 540e6, base=True), _record("source", 20.0, 23.0, 541e6, True, "ort-cpu"),
               _record("01-prune", 21.5, 18.0, 450e6), _record("02-quantize", 20.8, 45.0, 130e6, backend="ort-cpu"),
               _record("03-int4", 24.0, 60.0, 90e6, backend="ort-cpu")]
    write_report(records, tmp_path, "demo")
    stored = json.loads((tmp_path / "results.json").read_text())["records"]
    rows = rows_from_results(stored)
    expected = _expected(stored)
    for row in rows:
        size, quality, speed = expected[(row.label, row.backend)]
        assert row.smaller == pytest.approx(size) and row.quality_ratio == pytest.approx(quality)
        assert row.faster == pytest.approx(speed)
    # the rule: fastest row within 5% of the source's perplexity (03-int4 is faster but 1.2x perplexity)
    assert [r.label for r in rows if r.best] == ["02-quantize"]
    # the source itself on a faster backend is not a deployment of the pipeline's: never marked
    stored[1]["latency"]["decode_tokens_per_s"] = 90.0
    assert [(r.label, r.backend) for r in rows_from_results(stored) if r.best] == [("02-quantize", "ort-cpu")]

    out = io.StringIO()
    result = SimpleNamespace(run_dir=tmp_path, report=tmp_path / "report.md", steps=[], source="x")
    print_summary(result, SimpleNamespace(name="demo", benchmark=object()), file=out)
    text = out.getvalue()
    line = next(ln for ln in text.splitlines() if ln.startswith("02-quantize"))
    size, quality, speed = expected[("02-quantize", "ort-cpu")]
    assert f"{size:.2f}x" in line and f"{quality:.3f}x" in line and f"{speed:.2f}x" in line and "<- best" in line
    assert "best deployment: 02-quantize on ort-cpu" in text and f"report: {tmp_path / 'report.md'}" in text


def test_run_prints_its_table_and_keeps_other_libraries_quiet(tiny_llama_dir, tmp_path, monkeypatch, capfd):
    def fake_measure(target, *, backend, label, **kw):  # the harness's record, without a worker process
        size = sum(f.stat().st_size for f in Path(target).glob("*.safetensors")) if Path(target).is_dir() else 0
        factor = 1.0 if label == "source" else 1.02
        return {"label": label, "target": str(target), "task": "causal-lm", "backend": backend, "key": label,
                "size_bytes": size, "quality": {"perplexity": 30.0 * factor},
                "latency": {"decode_tokens_per_s": 10.0 if label == "source" else 12.0}}

    monkeypatch.setattr(benchmarks.pipeline, "measure", fake_measure)
    bench = {"backends": ["torch-cpu"], "threads": 1, "latency": {"warmup": 0, "repeats": 1}}
    config = _write_config(tmp_path, tiny_llama_dir, benchmark=bench)
    capfd.readouterr()
    assert main(["run", str(config), "--output-dir", str(tmp_path / "quiet"), "--no-progress"]) == 0
    out, err = capfd.readouterr()
    assert not any(n in out + err for n in NOISE), "third-party noise reached the terminal"
    run_dir = tmp_path / "quiet" / "console"
    log = (run_dir / "run.log").read_text()
    assert all(n in log for n in NOISE) and "[1/2] test-noisy: running (factor=2)" in log
    assert "running (factor=2)" in out and '{"factor"' not in out  # options as one short line, not JSON
    # the table: the ratios of results.json, the best row marked, where the report is
    stored = json.loads((run_dir / "results.json").read_text())["records"]
    for (label, backend), (size, quality, speed) in _expected(stored).items():
        line = next(ln for ln in out.splitlines() if ln.startswith(label + " "))
        assert f"{size:.2f}x" in line and f"{quality:.3f}x" in line and f"{speed:.2f}x" in line
    assert "report: " + str(run_dir / "report.md") in out and "log: " + str(run_dir / "run.log") in out

    # the model card beside each checkpoint, with the figures measured for it
    card = (run_dir / "02-quantize" / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["pipeline_tag"] == "text-generation" and front["library_name"] == "transformers"
    assert {"compress-suite", "quantized", "bf16"} <= set(front["tags"]) and "base_model" not in front
    assert "`01-test-noisy`: **test-noisy** (factor=2)" in card and "`02-quantize`: **quantize** (method=bf16)" in card
    assert "| torch-cpu |" in card and "(1.020x)" in card
    compress.load(run_dir / "02-quantize")  # the card is not a file the manifest must list

    # --verbose shows them (a fresh run folder, so the pass runs again)
    assert main(["run", str(config), "--output-dir", str(tmp_path / "loud"), "--no-progress", "--verbose"]) == 0
    out, err = capfd.readouterr()
    assert all(n in err for n in NOISE)
    assert all(n in (tmp_path / "loud" / "console" / "run.log").read_text() for n in NOISE)


def test_run_without_benchmark_lists_sizes_against_the_source(tiny_llama_dir, tmp_path, capfd):
    config = _write_config(tmp_path, tiny_llama_dir, name="sizes")
    assert main(["run", str(config), "--output-dir", str(tmp_path / "runs"), "--no-progress"]) == 0
    out = capfd.readouterr().out
    assert "sizes: checkpoint sizes against the source (no benchmark section: sizes only)" in out.splitlines()
    src = sum(f.stat().st_size for f in Path(tiny_llama_dir).glob("*.safetensors"))
    q = json.loads((tmp_path / "runs" / "sizes" / "02-quantize" / "manifest.json").read_text())["files"]
    size = sum(m["size"] for n, m in q.items() if n.endswith(".safetensors"))
    line = next(ln for ln in out.splitlines() if ln.startswith("02-quantize"))
    assert f"{src / size:.2f}x" in line


# ----------------------------------------------------------------------------- compress passes
def test_progress_bars_only_on_a_terminal(tiny_llama_dir, tmp_path, monkeypatch, capfd):
    """Piped or redirected output (as under pytest) gets the log lines, not redrawn bars: the runner, the passes
    and the benchmark workers are all told to draw none."""
    import pipelines.runner

    seen = []
    real = pipelines.runner.Runner.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs["show_progress"])
        real(self, *args, **kwargs)

    monkeypatch.setattr(pipelines.runner.Runner, "__init__", spy)
    config = _write_config(tmp_path, tiny_llama_dir, name="bars")
    assert main(["run", str(config), "--output-dir", str(tmp_path / "runs")]) == 0
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert main(["run", str(config), "--output-dir", str(tmp_path / "runs")]) == 0
    assert seen == [False, True]


def test_passes_distill_lists_nested_student_options(capsys):
    assert main(["passes", "distill"]) == 0
    text = capsys.readouterr().out
    assert "compress." not in text and "Config" not in text and "typing" not in text
    student = text[text.index("\n    student   ") + 1:]
    assert "options or null" in student.splitlines()[0] and "default null" in student.splitlines()[0]
    for name in ("keep_layers", "config", "source"):
        assert f"          {name} " in student  # nested under student, with its own type and default
    assert "every_other or int or list of int or null" in student
    assert "int >= 1" in text and "one of: kl, reverse-kl, jsd" in text and "float in [0, 1]" in text

    assert main(["passes", "distill", "--json"]) == 0
    described = json.loads(capsys.readouterr().out)["passes"][0]
    options = {o["name"]: o for o in described["variants"][0]["options"]}
    nested = {o["name"]: o for o in options["student"]["options"]}
    assert set(nested) == {"keep_layers", "config", "source"} and nested["source"]["default"] is None
    assert options["teacher"]["items"] and {o["name"] for o in options["teacher"]["options"]} == {"model", "weight"}
    assert all("search" in o for o in options.values())
    assert main(["passes", "distil"]) == 2  # unknown: bad input, with a suggestion


# ----------------------------------------------------------------------------- local data splits
def test_a_local_folder_defaults_to_train_for_training_and_test_for_eval(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(40):
        (folder / f"doc{i:02d}.txt").write_text(f"document number {i} " * 20)
    data = PipelineData(train=DataSpec(source=str(folder)), eval=DataSpec(source=str(folder)))
    train, test = data.dataset("train"), data.dataset("eval")
    assert (train.split, test.split) == ("train", "test") and len(test) > 0 and len(train) > 30
    assert not set(train.ids) & set(test.ids)
    # a glob of the same files splits them the same way
    assert set(load_dataset(DataSpec(source=str(folder / "*.txt")), "eval").ids) == set(test.ids)
    # the same folder for both is accepted (no overlap), as for builtin corpora
    validate({"name": "x", "model": {"source": "builtin:smollm2-135m"},
              "data": {"train": {"source": str(folder)}, "eval": {"source": str(folder)}}})
    # a single file cannot be split: all of it
    assert default_split(str(folder / "doc00.txt"), "eval") == "all"
    few = tmp_path / "few"
    few.mkdir()
    (few / "a.txt").write_text("only one")
    with pytest.raises(DataSourceError, match="split: all"):
        load_dataset(DataSpec(source=str(few)), "eval")


# ----------------------------------------------------------------------------- the model card
def test_model_card_names_the_hub_base_model(tiny_llama_dir, tmp_path):
    from compress.model_card import card_text
    from pipelines.config import load_config
    from pipelines.runner import Runner

    config = _write_config(tmp_path, tiny_llama_dir, name="card")
    result = Runner(load_config(config), output_dir=tmp_path, show_progress=False, log=lambda *a: None).run()
    ckpt = Path(result.steps[0].path)
    copy = tmp_path / "copy" / ckpt.name
    shutil.copytree(ckpt, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["source"] = manifest["parent"]["path"] = "builtin:smollm2-135m"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    front = yaml.safe_load(card_text(copy).split("---\n")[1])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert set(front) == {"base_model", "pipeline_tag", "library_name", "tags"}
    assert (ckpt / "README.md").exists() and "README.md" not in manifest["files"]


def test_a_card_left_half_written_by_a_kill_does_not_cost_the_checkpoint(tiny_llama_dir, tmp_path):
    """A run killed while writing README.md leaves .README.md.tmp beside a finished checkpoint: no loader reads
    it, so the checkpoint still verifies and the rerun reuses it (the SIGKILL test found this window)."""
    from compress import checkpoint
    from compress.checkpoint import MODEL_CARD_TMP
    from pipelines.config import load_config
    from pipelines.runner import Runner

    config = _write_config(tmp_path, tiny_llama_dir, name="killed-card")
    first = Runner(load_config(config), output_dir=tmp_path, show_progress=False, log=lambda *a: None).run()
    ckpt = Path(first.steps[0].path)
    (ckpt / MODEL_CARD_TMP).write_text("half a card")
    checkpoint.verify(ckpt)
    again = Runner(load_config(config), output_dir=tmp_path, show_progress=False, log=lambda *a: None).run()
    assert [s.reused for s in again.steps] == [True] * len(first.steps)
    (ckpt / "stray.bin").write_bytes(b"x")  # any other unlisted file is still refused
    with pytest.raises(checkpoint.CheckpointError, match="stray.bin"):
        checkpoint.verify(ckpt)


def test_model_card_says_how_a_non_stock_checkpoint_loads(tiny_llama_dir, tmp_path):
    """A low-rank checkpoint loads only through compress.load: its card claims no library and says so; a branch
    step's title names its branch; a ratio under 1 reads "slower", not "0.80x faster"."""
    from compress import save
    from compress.checkpoint import load_source
    from compress.model_card import _times, card_text
    from compress.passes import PassContext, get

    art = get("lowrank")(rank=4, min_params=0).run(load_source(str(tiny_llama_dir), "causal-lm"), PassContext())
    path = save(art, tmp_path / "run" / "alt" / "01-lowrank", source=str(tiny_llama_dir))
    card = card_text(path, run_name="run")
    front = yaml.safe_load(card.split("---\n")[1])
    assert "library_name" not in front and "# run / alt/01-lowrank" in card
    assert "Not a stock architecture (lowrank): load it with `compress.load`" in card
    assert (_times(2.5, "faster", "slower"), _times(0.8, "faster", "slower")) == ("2.50x faster", "1.25x slower")


def test_a_file_where_the_run_folder_goes_is_a_clear_error(tiny_llama_dir, tmp_path, capfd):
    config = _write_config(tmp_path, tiny_llama_dir, name="taken")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "taken").write_text("a file of the user's")
    assert main(["run", str(config), "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err
    assert f"error: {tmp_path / 'out' / 'taken'}: is a file" in err
    assert (tmp_path / "out" / "taken").read_text() == "a file of the user's"


def test_report_on_a_run_without_benchmarks_says_why_there_is_nothing(tmp_path, capsys):
    (tmp_path / "run.json").write_text("{}")  # what `compress run` leaves without a benchmark section
    assert main(["report", str(tmp_path)]) == 2
    assert "this run's config has no benchmark section, so nothing was measured" in capsys.readouterr().err
