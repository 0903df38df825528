"""Every config error path: a message naming the field, the bad value and the fix; exit code 2."""
import json

import pytest
import yaml

from pipelines.cli import main
from pipelines.config import load_config

BASE = {
    "name": "t",
    "model": {"source": "builtin:smollm2-135m"},
    "data": {"train": {"source": "builtin:shakespeare"}, "eval": {"source": "builtin:wikipedia"}},
    "passes": [{"quantize": {"method": "bf16"}}],
}


def _write(tmp_path, cfg, name="c.yaml"):
    path = tmp_path / name
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return str(path)


def _with(**changes):
    cfg = json.loads(json.dumps(BASE))
    cfg.update(changes)
    return cfg


CASES = [
    ("unknown pass", _with(passes=[{"quantise": {"method": "bf16"}}]), ["passes.0", "'quantise'", "did you mean 'quantize'"]),
    ("unknown option", _with(passes=[{"quantize": {"metod": "bf16"}}]), ["passes.0.quantize.metod", "did you mean 'method'"]),
    ("bad value", _with(passes=[{"quantize": {"method": "int3"}}]), ["passes.0.quantize.method", "'int3'", "'bf16'"]),
    ("quantize twice", _with(passes=[{"quantize": {"method": "bf16"}}, {"quantize": {"method": "fp16"}}]),
     ["passes.1 (quantize)", "quantizing twice"]),
    ("unknown top-level key", _with(pases=[]), ["pases", "did you mean 'passes'"]),
    ("bad task", _with(task="clm"), ["task", "'clm'", "causal-lm"]),
    ("missing source", _with(model={}), ["model.source", "missing"]),
    ("two keys in a pass item", _with(passes=[{"quantize": {}, "export": {}}]), ["passes.0", "one key"]),
    ("overlapping data", _with(data={"train": {"source": "builtin:wikipedia"}, "eval": {"source": "builtin:wikipedia",
                                                                                     "split": "train"}}),
     ["data.eval", "overlap", "split"]),
    ("benchmark data overlapping the training data", _with(benchmark={"data": {"source": "builtin:shakespeare"},
                                                                       "extra_data": {"w": {"source": "builtin:wikipedia"}}},
                                                            data={"train": {"source": "builtin:shakespeare", "split": "all"}}),
     ["benchmark.data: uses the same source as data.train (builtin:shakespeare) and the splits overlap (all / test)"]),
    ("bad name", _with(name="a b/c"), ["name", "'a b/c'"]),
    # names over 255 bytes were an ENAMETOOLONG traceback when the run made its folder; 100 characters is plenty
    ("long name", _with(name="a" * 101), ["name: String should have at most 100 characters"]),
    ("long branch name", _with(branches=[{"name": "b" * 101, "passes": []}]),
     ["branches.0.name: String should have at most 100 characters"]),
    # a NUL byte (YAML's "\0") was a ValueError traceback from the first os call on the path
    ("NUL byte in a path", _with(output_dir="runs\0x", data={"train": {"source": "d\0.txt"}}),
     ["output_dir: 'runs\\x00x' holds a NUL byte (\\0), which no path can; remove it",
      "data.train.source: 'd\\x00.txt' holds a NUL byte"]),
    # torch.manual_seed takes seeds below 2**64, and the i-th pass gets seed + i: a ValueError traceback at run time
    ("seed of 2**64", _with(seed=2**64), ["seed: Input should be less than 18446744073709551616"]),
    ("negative seed", _with(seed=-1), ["seed: Input should be greater than or equal to 0"]),
    ("the last pass's seed", _with(seed=2**64 - 1, passes=[{"lowrank": {"method": "svd"}},
                                                           {"quantize": {"method": "bf16"}}]),
     ["seed: the last of 2 passes would get seed 18446744073709551616", "give a seed below 18446744073709551615"]),
    ("branch from a missing step", _with(branches=[{"name": "b", "from": "07-prune", "passes": []}]),
     ["branches.0.from", "'07-prune'", "01-quantize"]),
    # a branch folder named like a file the run writes: the run failed after the main chain, with a traceback
    ("branch named like a run file", _with(branches=[{"name": "run.log", "passes": [{"quantize": {"method": "fp16"}}]}]),
     ["branches.0.name", "'run.log' is the name of a file or folder the run writes"]),
    ("two branches with one name", _with(branches=[{"name": "b", "passes": []}, {"name": "b", "passes": []}]),
     ["branches.1.name: 'b' is the name of branches.0 too", "give each branch its own name"]),
    ("branch quantizes twice", _with(branches=[{"name": "b", "from": 1, "passes": [{"quantize": {"method": "fp16"}}]}]),
     ["branches.0.passes.0 (quantize)", "quantizing twice"]),
    ("unknown benchmark baseline", _with(benchmark={"baseline": "02-distill"}),
     ["benchmark.baseline", "'02-distill'", "01-quantize"]),
    ("branch pass typo", _with(branches=[{"name": "b", "passes": [{"quantize": {"methd": "fp16"}}]}]),
     ["branches.0.passes.0.quantize.methd", "did you mean 'method'"]),
    ("bad data option", _with(data={"train": {"source": "builtin:shakespeare", "max_token": 5}}),
     ["data.train.max_token", "did you mean 'max_tokens'"]),
    # a pass that reads data, without any: the run stopped at that step, after the ones before it
    ("distill without training data", _with(data={}, passes=[{"quantize": {"method": "bf16"}},
                                                             {"distill": {"alpha": 0.0}}]),
     ["passes.1 (distill): distill trains on data.train, and the config sets no data.train"]),
    ("calibration without data", _with(data={"eval": {"source": "builtin:wikipedia"}}, passes=[
        {"prune": {"targets": ["layers"]}}, {"lowrank": {"method": "whiten"}}, {"lowrank": {"method": "svd"}}],
        branches=[{"name": "b", "passes": [{"export": {}}, {"quantize": {"method": "ort-int8-static"}}]}]),
     ["passes.0 (prune): prune (targets: layers) scores on calibration data, and the config sets no "
      "data.calibration or data.train", "passes.1 (lowrank): lowrank.method: whiten", "branches.0.passes.1 "
      "(quantize): quantize (method: ort-int8-static)"]),
]


@pytest.mark.parametrize("label,cfg,expected", CASES, ids=[c[0] for c in CASES])
def test_config_errors_name_the_field_and_exit_2(tmp_path, capsys, label, cfg, expected):
    code = main(["validate", _write(tmp_path, cfg)])
    err = capsys.readouterr().err
    assert code == 2, err
    for fragment in expected:
        assert fragment in err, f"{fragment!r} not in: {err}"


def test_file_and_yaml_errors_exit_2(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["validate", _write(tmp_path, "name: [unclosed")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["validate", _write(tmp_path, "- a list")]) == 2
    assert "mapping at the top level" in capsys.readouterr().err
    # a key that is no text was a TypeError from PipelineConfig(**raw); deep nesting a RecursionError in the parser
    assert main(["validate", _write(tmp_path, yaml.safe_dump(BASE) + "1: 2\n")]) == 2
    err = capsys.readouterr().err
    assert "1: unknown option 1: the keys of a config are option names (allowed: " in err and "Traceback" not in err
    deep = _write(tmp_path, "a: " + "[" * 5000 + "]" * 5000 + "\n")
    assert main(["validate", deep]) == 2
    err = capsys.readouterr().err
    assert f"{deep}: nested too deeply to read" in err and "Traceback" not in err


def test_overrides(tmp_path, capsys):
    path = _write(tmp_path, BASE)
    pipeline = load_config(path, ["passes.0.quantize.method=fp16", "data.eval.max_tokens=100", "seed=3"])
    assert pipeline.passes[0].config.method == "fp16"
    assert pipeline.config.data.eval.max_tokens == 100 and pipeline.config.seed == 3
    assert main(["validate", path, "--set", "passes.5.quantize.method=fp16"]) == 2
    assert "passes.5" in capsys.readouterr().err
    assert main(["validate", path, "--set", "seed"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_unknown_model_source_at_run_time_exits_2(tmp_path, capsys):
    cfg = _with(model={"source": str(tmp_path / "no-such-model")}, passes=[], data={})
    assert main(["run", _write(tmp_path, cfg), "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "builtin:" in err
    cfg = _with(model={"source": "builtin:gpt5"}, passes=[], data={})
    assert main(["run", _write(tmp_path, cfg), "--output-dir", str(tmp_path / "runs")]) == 2
    assert "unknown builtin model 'gpt5'" in capsys.readouterr().err


def test_missing_hub_model_fails_fast_and_suggests_a_local_path(monkeypatch):
    import time

    from compress.errors import ModelSourceError
    from compress.models import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelSourceError, match="local path"):
        load_model("hf:nobody/no-such-model", "causal-lm")
    assert time.perf_counter() - start < 10
    # not marked offline, but the hub unreachable (as here): one connection attempt, not the client's retries
    import socket

    def unreachable(*args, **kwargs):
        raise OSError(-2, "Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    start = time.perf_counter()
    with pytest.raises(ModelSourceError, match=r"huggingface.co cannot be reached \(Name or service not known\)"):
        load_model("hf:nobody/no-such-model", "causal-lm")
    assert time.perf_counter() - start < 10


def test_a_hub_source_fingerprint_follows_the_cached_snapshot(tmp_path, monkeypatch):
    """Every cache key holds the source's fingerprint: for hf: the commit of the local snapshot, so a model
    updated on the hub (a new snapshot) is not taken for the one measured or compressed before."""
    from huggingface_hub import constants

    from compress.models import source_fingerprint

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # uncached and online, its config would be fetched
    assert source_fingerprint("hf:org/model") == "hf:org/model"  # nothing cached
    repo = tmp_path / "models--org--model"
    for commit in ("a1b2c3", "d4e5f6"):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        assert source_fingerprint("hf:org/model") == f"hf:org/model@{commit}"


def test_schema_and_passes_listing(tmp_path, capsys):
    out = tmp_path / "schema.json"
    assert main(["schema", "-o", str(out)]) == 0
    schema = json.loads(out.read_text())
    names = [next(iter(item["properties"])) for item in schema["properties"]["passes"]["items"]["oneOf"]]
    assert "quantize" in names
    quantize = next(i for i in schema["properties"]["passes"]["items"]["oneOf"] if "quantize" in i["properties"])
    members = [ref["$ref"].split("/")[-1] for ref in quantize["properties"]["quantize"]["oneOf"]]
    assert "OrtDynamicConfig" in members and "CastConfig" in members
    assert all(schema["$defs"][m]["additionalProperties"] is False for m in members)
    assert "objectives" not in schema["properties"]

    assert main(["schema", "--search", "-o", str(out)]) == 0
    search = json.loads(out.read_text())
    assert "objectives" in search["required"] and "budget" in search["properties"]
    ratio = search["$defs"]["PruneConfig"]["properties"]["layer_ratio"]["anyOf"]
    assert ratio[1] == {"$ref": "#/$defs/SearchValues"} and ratio[0]["title"] == "Layer Ratio"
    nested = search["$defs"]["RecoverConfig"]["properties"]["max_steps"]["anyOf"]  # options inside options too
    assert nested[1] == {"$ref": "#/$defs/SearchValues"}
    assert ratio[1] not in search["$defs"]["DataSpec"]["properties"]["max_tokens"]["anyOf"]  # data: is not searched
    assert main(["passes"]) == 0
    listing = capsys.readouterr().out
    assert "quantize" in listing and "method" in listing and "default bf16" in listing


def test_valid_config_passes_validation(tmp_path, capsys):
    assert main(["validate", _write(tmp_path, BASE)]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["validate", _write(tmp_path, _with(branches=[{"name": "b", "passes": []}]))]) == 0
    assert capsys.readouterr().out.endswith("passes: quantize; branch b: none\n")
    root = __import__("pathlib").Path(__file__).parents[1]
    for config in sorted([*root.glob("configs/*.yaml"), *root.glob("studies/configs/*.yaml")]):
        assert main(["validate", str(config)]) == 0, f"{config} does not validate"


def test_folders_and_files_given_on_the_command_line_are_checked_first(tmp_path, capsys):
    """A file where a folder is wanted, a folder where a file is wanted, a folder that is not a model, a search
    picked before it ran: exit 2 naming the argument, nothing written."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        (["run", str(root / "configs" / "quickstart.yaml"), "--output-dir", str(a_file)],
         f"--output-dir {a_file}: is a file, not a folder"),
        (["schema", "-o", str(tmp_path)], f"-o {tmp_path}: is a folder; give a file name"),
        (["search", str(root / "configs" / "search-smollm2.yaml"), "--pick", "3", "--output-dir",
          str(tmp_path / "s")], "--pick 3: there is no study at"),
    ]
    runs = tmp_path / "runs" / "r"
    (runs / "01-quantize").mkdir(parents=True)
    (runs / "01-quantize" / "manifest.json").write_text("{}")
    cases.append((["bench", str(runs), "--output", str(tmp_path / "b")], "it holds checkpoints: give one, e.g. "
                  f"{runs / '01-quantize'}"))
    (tmp_path / "empty-results").mkdir()
    (tmp_path / "empty-results" / "results.json").write_text("[]")
    cases.append((["report", str(tmp_path / "empty-results")], "is not a results file"))
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err
    assert not (tmp_path / "s").exists()  # the refused --pick made no study


def test_python_dash_m_compress_is_the_command(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "compress", "validate", _write(tmp_path, _with(seed="x"))],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: seed: Input should be a valid integer")


def test_output_dir_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    pipeline = load_config(_write(tmp_path, _with(output_dir="~/runs")))
    assert pipeline.config.output_dir == str(tmp_path / "home" / "runs")


def test_the_report_names_the_command_that_made_it(tmp_path, monkeypatch):
    """`compress run ...` and `python -m compress run ...` are recorded as the command; anything else (an API
    call) as rerunning the run's pipeline.yaml."""
    import sys

    from benchmarks.pipeline import _command

    for argv0 in ("/venv/bin/compress", "/repo/compress/__main__.py"):
        monkeypatch.setattr(sys, "argv", [argv0, "run", "configs/quickstart.yaml", "--no-progress"])
        assert _command(tmp_path) == "compress run configs/quickstart.yaml --no-progress"
    monkeypatch.setattr(sys, "argv", ["/repo/script.py"])
    assert _command(tmp_path) == f"compress run {tmp_path / 'pipeline.yaml'}"


def test_one_file_for_train_and_eval_is_overlap_however_spelled(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.txt").write_text("some words")
    cfg = _with(data={"train": {"source": str(tmp_path / "d.txt")}, "calibration": {"source": "builtin:wikipedia"},
                      "eval": {"source": "./d.txt"}})
    assert main(["validate", _write(tmp_path, cfg)]) == 2
    err = capsys.readouterr().err
    assert f"data.eval: uses the same source as data.train ({tmp_path / 'd.txt'}) and the splits overlap" in err
    assert "data.calibration" not in err


def test_jsonl_fields_are_checked_before_the_run(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"body": "a", "y": "cats"}\n')
    cfg = _with(data={"train": {"source": "builtin:shakespeare"},
                      "eval": {"source": str(tmp_path / "d.jsonl"), "text_field": "body", "label_field": "Y"}})
    assert main(["validate", _write(tmp_path, cfg)]) == 2
    assert "data.eval.source: " + str(tmp_path / "d.jsonl") + ": no row has the label field 'Y'" in capsys.readouterr().err


def test_eval_classes_the_training_data_lacks_are_refused_before_the_run(tmp_path, capsys):
    (tmp_path / "tr.jsonl").write_text('{"text": "a", "label": "cats"}\n{"text": "b", "label": "dogs"}\n')
    (tmp_path / "ev.jsonl").write_text('{"text": "c", "label": "fish"}\n{"text": "d", "label": "dogs"}\n')
    cfg = _with(model={"source": "builtin:minilm-l6"}, task="sequence-classification", passes=[],
                data={"train": {"source": str(tmp_path / "tr.jsonl")}, "eval": {"source": str(tmp_path / "ev.jsonl")}})
    assert main(["validate", _write(tmp_path, cfg)]) == 2
    assert "data.eval: labels ['fish'] are not among data.train's classes (cats, dogs)" in capsys.readouterr().err


def test_a_local_source_fingerprint_follows_replaced_contents(tiny_llama_dir, tmp_path):
    """A local model folder was keyed on its files' sizes and whole-second mtimes: weights replaced by others of
    the same size with the mtime kept (cp -p, rsync -a, an archive) reused the checkpoints made from the old ones."""
    import os
    import shutil

    from compress.models import source_fingerprint

    src = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, src)
    before = source_fingerprint(str(src))
    assert source_fingerprint(str(src)) == before  # stable while nothing changes
    weights = src / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # other contents, the same size
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # the mtime put back, as cp -p does
    assert weights.stat().st_size == st.st_size and weights.stat().st_mtime_ns == st.st_mtime_ns
    assert source_fingerprint(str(src)) != before


def test_a_model_folder_without_a_tokenizer_or_with_damaged_weights_is_refused_by_name(tiny_llama_dir, tmp_path):
    """A folder with config.json and weights but no tokenizer failed with "AttributeError: 'NoneType' object has no
    attribute 'endswith'", and truncated safetensors with the library's SafetensorError, both as tracebacks."""
    import shutil

    from compress.errors import ModelSourceError
    from compress.models import load_model

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_dir / f, bare / f)
    with pytest.raises(ModelSourceError, match=r"has no tokenizer \(tokenizer.json, .*tokenizer.save_pretrained"):
        load_model(str(bare), "causal-lm")
    cut = tmp_path / "cut"
    shutil.copytree(tiny_llama_dir, cut)
    with open(cut / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ModelSourceError, match=r"SafetensorError: .*the files are damaged or incomplete: save the "
                                               r"model again"):
        load_model(str(cut), "causal-lm")


def test_an_empty_model_source_is_refused_as_empty(tmp_path, capsys):
    """model.source: '' was read as the current folder ("'' is a folder with no config.json")."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\nmodel: {source: ''}\npasses: [{quantize: {method: fp16}}]\n")
    assert main(["run", str(cfg), "--output-dir", str(tmp_path / "runs"), "--no-progress"]) == 2
    assert "model.source: model source is empty: give builtin:<name>" in capsys.readouterr().err


def test_a_path_too_long_for_the_file_system_is_bad_input(tmp_path, capsys):
    """ENAMETOOLONG from the first os call on a path was a traceback and exit 1."""
    long = str(tmp_path / ("a" * 300))
    path = _write(tmp_path, BASE)
    for argv in (["validate", path, "--set", f"model.source={long}"],
                 ["validate", path, "--set", f"data.train.source={long}.txt"],
                 ["validate", long + ".yaml"],
                 ["run", path, "--output-dir", long],
                 ["bench", long, "--output", str(tmp_path / "bench")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"error: {long}" in err and ": too long for the file system" in err and "Traceback" not in err, err
        if argv[0] == "run":
            assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # nothing written
