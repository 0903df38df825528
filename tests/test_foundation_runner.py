import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import compress
import helper_passes  # noqa: F401  (registers the test-scale pass)
from pipelines.config import load_config
from pipelines.runner import Runner

TESTS = Path(__file__).parent


def _config(tmp_path, model_dir, factors=(1.0, 2.0), last="bf16", filename="pipeline.yaml") -> Path:
    cfg = {
        "name": "tiny",
        "model": {"source": str(model_dir)},
        "data": {"train": {"source": "builtin:shakespeare", "max_tokens": 512, "seq_len": 64}},
        "passes": [{"test-scale": {"factor": f}} for f in factors] + [{"quantize": {"method": last}}],
        "threads": 1,
    }
    path = tmp_path / filename
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(config_path, out_dir, **overrides):
    return Runner(load_config(config_path), output_dir=out_dir, show_progress=False, log=lambda *_: None).run()


def _created(path) -> str:
    return json.loads((Path(path) / "manifest.json").read_text())["created"] + str(
        (Path(path) / "manifest.json").stat().st_mtime_ns)


def test_rerun_reuses_and_a_changed_option_recomputes_from_that_pass_on(tiny_llama_dir, tmp_path):
    out = tmp_path / "runs"
    first = _run(_config(tmp_path, tiny_llama_dir), out)
    assert [s.reused for s in first.steps] == [False, False, False]
    stamps = [_created(s.path) for s in first.steps]

    again = _run(_config(tmp_path, tiny_llama_dir), out)
    assert [s.reused for s in again.steps] == [True, True, True]
    assert [_created(s.path) for s in again.steps] == stamps

    changed = _run(_config(tmp_path, tiny_llama_dir, factors=(1.0, 3.0)), out)
    assert [s.reused for s in changed.steps] == [True, False, False]
    assert _created(changed.steps[0].path) == stamps[0]
    assert changed.steps[1].key != first.steps[1].key and changed.steps[2].key != first.steps[2].key
    # the recomputed checkpoints hold the new weights: 3x the source, in bf16
    src = compress.load(out / "tiny" / "01-test-scale").model
    final = compress.load(changed.steps[2].path).model
    w0 = src.model.layers[0].mlp.up_proj.weight
    assert final.dtype == torch.bfloat16
    assert torch.allclose(final.model.layers[0].mlp.up_proj.weight.float(), (w0 * 3).bfloat16().float())
    assert json.loads((out / "tiny" / "run.json").read_text())["steps"][1]["reused"] is False


def test_a_new_pass_version_recomputes_its_steps(tiny_llama_dir, tmp_path, monkeypatch):
    """A pass that fixed a bug raises its version: checkpoints the old code wrote are not reused."""
    from compress.passes import get

    out = tmp_path / "runs"
    first = _run(_config(tmp_path, tiny_llama_dir), out)
    monkeypatch.setattr(get("quantize"), "version", get("quantize").version + 1)
    again = _run(_config(tmp_path, tiny_llama_dir), out)
    assert [s.reused for s in again.steps] == [True, True, False]
    assert again.steps[2].key != first.steps[2].key


def test_corrupted_finished_checkpoint_is_recomputed_not_reused(tiny_llama_dir, tmp_path):
    out = tmp_path / "runs"
    first = _run(_config(tmp_path, tiny_llama_dir), out)
    weights = Path(first.steps[1].path) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    again = _run(_config(tmp_path, tiny_llama_dir), out)
    # step 2 is redone; step 3's key still matches (keys derive from configs, not contents), so it stays
    assert [s.reused for s in again.steps] == [True, False, True]
    compress.load(again.steps[1].path)  # verified again


def test_run_killed_mid_pass_resumes_there(tiny_llama_dir, tmp_path):
    out = tmp_path / "runs"
    # 01-test-scale + 02-quantize finish; then a longer pipeline shares step 1 and hangs in step 2
    _run(_config(tmp_path, tiny_llama_dir, factors=(1.0,), filename="short.yaml"), out)
    config2 = _config(tmp_path, tiny_llama_dir, factors=(1.0, 2.0), filename="long.yaml")
    marker = tmp_path / "started"
    script = (
        "import sys; sys.path.insert(0, sys.argv[3]); import helper_passes\n"
        "from pipelines.config import load_config; from pipelines.runner import Runner\n"
        "Runner(load_config(sys.argv[1]), output_dir=sys.argv[2], show_progress=False).run()\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", COMPRESS_TEST_SLEEP=str(marker))
    proc = subprocess.Popen([sys.executable, "-c", script, str(config2), str(out), str(TESTS)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "the slow pass never started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = out / "tiny"
    # step 1 was reused (it never slept); step 2 was killed mid-pass and left no checkpoint
    assert (run_dir / "01-test-scale" / "manifest.json").exists()
    assert not (run_dir / "02-test-scale").exists()
    stamp = _created(run_dir / "01-test-scale")
    (run_dir / ".02-test-scale.tmp-stale").mkdir()  # as a kill during the final write would leave
    (run_dir / ".01-test-scale.old-999999999").mkdir()  # and a kill while replacing an outdated checkpoint
    result = _run(config2, out)
    assert [s.reused for s in result.steps] == [True, False, False]
    assert _created(run_dir / "01-test-scale") == stamp
    assert not list(run_dir.glob(".*tmp*")) and not list(run_dir.glob(".*.old-*"))
    assert not (run_dir / "02-quantize").exists(), "a step of the old pipeline was left beside the new ones"
    assert (run_dir / "03-quantize" / "manifest.json").exists()


def test_branches_start_from_a_step_and_are_reused(tiny_llama_dir, tmp_path):
    cfg = yaml.safe_load(_config(tmp_path, tiny_llama_dir, factors=(2.0,), last="fp32").read_text())
    cfg["branches"] = [{"name": "half", "from": "01-test-scale", "passes": [{"quantize": {"method": "fp16"}}]},
                       {"name": "from-source", "passes": [{"quantize": {"method": "bf16"}}]}]
    path = tmp_path / "branched.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "runs"
    result = _run(path, out)
    assert [s.label for s in result.steps] == ["01-test-scale", "02-quantize", "half/01-quantize",
                                               "from-source/01-quantize"]
    run = out / "tiny"
    half = compress.load(run / "half" / "01-quantize")
    assert half.manifest["parent"]["key"] == result.steps[0].key and half.model.dtype == torch.float16
    scaled = compress.load(run / "01-test-scale").model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(half.model.model.layers[0].mlp.up_proj.weight, scaled.half())
    src = compress.load(run / "from-source" / "01-quantize")
    assert src.manifest["parent"]["key"] == result.source_key
    again = _run(path, out)
    assert all(s.reused for s in again.steps)


def test_only_the_main_process_writes(tiny_llama_dir, tmp_path, monkeypatch):
    """Under accelerate launch every rank runs the pipeline; ranks other than 0 write nothing."""
    out = tmp_path / "runs"
    _run(_config(tmp_path, tiny_llama_dir), out)
    for name in ("run.json", "pipeline.yaml"):
        (out / "tiny" / name).unlink()
    monkeypatch.setenv("RANK", "1")
    result = _run(_config(tmp_path, tiny_llama_dir, last="fp16"), out)  # step 3 must be recomputed
    assert [s.reused for s in result.steps] == [True, True, False]
    written = sorted(p.name for p in (out / "tiny").iterdir() if p.name != ".lock")  # .lock: rank 0's, kept
    assert written == ["01-test-scale", "02-test-scale", "03-quantize"]
    assert compress.load(out / "tiny" / "03-quantize").model.dtype == torch.bfloat16, "rank 1 overwrote it"


def test_a_teacher_named_by_folder_that_changes_recomputes_the_step(tiny_llama_dir, tmp_path):
    """The key holds what a folder named in the options contains, not only its name."""
    import shutil

    from pipelines.config import validate
    from tiny_models import save_tiny

    teacher = shutil.copytree(tiny_llama_dir, tmp_path / "teacher")
    pipe = validate({"name": "kd", "model": {"source": str(tiny_llama_dir)}, "task": "causal-lm",
                     "data": {"train": {"source": "builtin:shakespeare", "max_tokens": 1024, "seq_len": 32}},
                     "passes": [{"distill": {"student": {"keep_layers": 2}, "teacher": str(teacher), "max_steps": 1,
                                             "batch_size": 2, "precision": "fp32", "eval_tokens": 32}}],
                     "threads": 1})

    def run():
        return Runner(pipe, output_dir=tmp_path / "runs", show_progress=False, log=lambda *a: None).run().steps[0]

    first = run()
    assert run().reused  # unchanged teacher: reused
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    time.sleep(1.1)  # a new mtime, to the second
    save_tiny(model, teacher)
    changed = run()
    assert not changed.reused and changed.key != first.key


def test_a_classifier_without_training_data_takes_its_labels_from_the_eval_data(tiny_bert_dir, tmp_path):
    """Quantizing a fine-tuned classifier needs no data.train (validate said ok, then the run stopped there)."""
    cfg = {"name": "cls", "model": {"source": str(tiny_bert_dir)}, "task": "sequence-classification",
           "data": {"eval": {"source": "builtin:bbc-news", "max_examples": 8}},
           "passes": [{"quantize": {"method": "bf16"}}], "threads": 1}
    (tmp_path / "cls.yaml").write_text(yaml.safe_dump(cfg))
    result = _run(tmp_path / "cls.yaml", tmp_path / "runs")
    art = compress.load(result.steps[-1].path)
    assert list(art.model.config.id2label.values()) == ["business", "entertainment", "politics", "sports", "tech"]


def test_an_old_step_is_removed_but_a_folder_that_is_no_checkpoint_is_left(tiny_llama_dir, tmp_path):
    out = tmp_path / "runs"
    _run(_config(tmp_path, tiny_llama_dir, factors=(1.0, 2.0)), out)
    notes = out / "tiny" / "07-notes"  # a user's folder in the run folder, named like a step
    notes.mkdir()
    (notes / "a.txt").write_text("kept")
    _run(_config(tmp_path, tiny_llama_dir, factors=(1.0,)), out)
    assert sorted(p.name for p in (out / "tiny").glob("[0-9][0-9]-*")) == ["01-test-scale", "02-quantize",
                                                                         "07-notes"]
    assert (notes / "a.txt").read_text() == "kept"


def test_changing_only_the_eval_data_recomputes_no_step(tiny_llama_dir, tmp_path):
    out = tmp_path / "runs"
    path = _config(tmp_path, tiny_llama_dir)
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["eval"] = {"source": "builtin:wikipedia", "max_tokens": 256}
    path.write_text(yaml.safe_dump(cfg))
    first = _run(path, out)
    cfg["data"]["eval"]["max_tokens"] = 512  # read by the benchmarks only
    path.write_text(yaml.safe_dump(cfg))
    again = _run(path, out)
    assert [s.reused for s in again.steps] == [True, True, True]
    assert [s.key for s in again.steps] == [s.key for s in first.steps]
    cfg["data"]["train"]["max_tokens"] = 256  # the training data: every step's key changes
    path.write_text(yaml.safe_dump(cfg))
    assert [s.reused for s in _run(path, out).steps] == [False, False, False]


def test_the_run_folders_pipeline_yaml_runs_again_into_the_same_folder(tiny_llama_dir, tmp_path):
    out = tmp_path / "elsewhere"  # --output-dir, not the config's output_dir
    _run(_config(tmp_path, tiny_llama_dir), out)
    saved = out / "tiny" / "pipeline.yaml"
    assert yaml.safe_load(saved.read_text())["output_dir"] == str(out)
    again = Runner(load_config(saved), show_progress=False, log=lambda *_: None).run()
    assert again.run_dir == out / "tiny"
    assert [s.reused for s in again.steps] == [True, True, True]


def _files(folder) -> list:
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in Path(folder).rglob("*"))


def test_a_run_never_writes_into_a_checkpoint_or_the_model_source(tiny_llama_dir, tmp_path, capsys):
    import shutil

    from pipelines.cli import main

    src = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, src)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"name": "tiny", "model": {"source": str(src)},
                                      "passes": [{"quantize": {"method": "bf16"}}], "threads": 1}))
    assert main(["run", str(config), "--output-dir", str(tmp_path / "runs"), "--no-progress"]) == 0
    ckpt = tmp_path / "runs" / "tiny" / "01-quantize"
    before = _files(ckpt), _files(src)
    cases = [
        (["--output-dir", str(ckpt)], f"--output-dir {ckpt}: is inside the checkpoint {ckpt}"),
        (["--output-dir", str(ckpt / "deeper")], f"is inside the checkpoint {ckpt}"),
        (["--set", f"output_dir={ckpt}"], f"output_dir: {ckpt}: is inside the checkpoint"),
        (["--output-dir", str(ckpt.parent), "--set", "name=01-quantize"], "name: the run folder"),  # a run's step
        (["--output-dir", str(tmp_path), "--set", "name=model"], "(model.source)"),  # the run folder is the source
        (["--output-dir", str(src)], f"--output-dir {src}: the run folder {src / 'tiny'} would be in the model "),
    ]
    for extra, message in cases:
        assert main(["run", str(config), "--no-progress", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
    assert (_files(ckpt), _files(src)) == before
    compress.load(ckpt)
    # the other way round: a step of this run as its own source would be replaced, or removed as a stale step
    runs = ["run", str(config), "--no-progress", "--output-dir", str(tmp_path / "runs"), "--set", "name=float"]
    assert main([*runs, "--set", "passes=[{test-scale: {factor: 1.0}}]"]) == 0
    step = tmp_path / "runs" / "float" / "01-test-scale"
    kept = _files(step)
    for passes in ("[{test-scale: {factor: 2.0}}]", "[{quantize: {method: fp16}}]"):  # replaced; removed
        assert main([*runs, "--set", f"model.source={step}", "--set", f"passes={passes}"]) == 2
        err = capsys.readouterr().err
        assert f"model.source: {step} lies in this run's folder {step.parent}" in err, err
    assert _files(step) == kept
    compress.load(step)
