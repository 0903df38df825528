"""Issue 15: a checkpoint is trusted only when all of it verifies, no input ends in a traceback, and runs that
share a folder, diverge or hit a full disk stay safe. Tiny models, CPU; the SIGKILL test is marked `slow`."""
import contextlib
import errno
import fcntl
import json
import os
import random
import shutil
import multiprocessing
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

import compress
import helper_passes  # noqa: F401  (registers the test-scale pass)
from compress import checkpoint
from compress.checkpoint import Artifact
from compress.errors import CheckpointError
from compress.models import load_model
from compress.pruning.lowrank import apply_lowrank
from pipelines.cli import main
from pipelines.config import load_config
from pipelines.runner import Runner

LOWRANK = "model.layers.0.mlp.down_proj"


# ----------------------------------------------------------------------------- helpers
def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _scale_config(model_dir, factors=(1.0, 2.0), last="bf16") -> dict:
    return {"name": "tiny", "model": {"source": str(model_dir)}, "threads": 1,
            "passes": [{"test-scale": {"factor": f}} for f in factors] + [{"quantize": {"method": last}}]}


def _run(config_path, out_dir):
    return Runner(load_config(config_path), output_dir=out_dir, show_progress=False, log=lambda *_: None).run()


def _child_run(config: str, out: str, env: dict) -> None:
    os.environ.update(env)
    _run(config, out)


def _start_run(config, out, **env) -> multiprocessing.Process:
    """A pipeline run in a forked process (no second import of torch), for tests that kill it or run beside it."""
    proc = multiprocessing.get_context("fork").Process(target=_child_run, args=(str(config), str(out), env))
    proc.start()
    return proc


def _kill(proc: multiprocessing.Process) -> None:
    if proc.exitcode is None:  # not reaped yet, so the pid is still this child's (at worst a zombie)
        os.kill(proc.pid, signal.SIGKILL)
    proc.join()


@contextlib.contextmanager
def _held(run_dir: Path, seconds: float | None = None):
    """Hold run_dir's lock as another run would (an own open file, so it conflicts within this process too);
    with `seconds`, a thread releases it after that long."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fh = open(run_dir / ".lock", "a+")
    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fh.seek(0)
    fh.truncate()
    fh.write("424242\n")
    fh.flush()
    released = threading.Event()

    def release():
        released.set()
        fh.close()

    timer = threading.Timer(seconds, release) if seconds is not None else None
    if timer:
        timer.start()
    try:
        yield released
    finally:
        if timer:
            timer.join()
        if not fh.closed:
            fh.close()


def _leftovers(run_dir: Path) -> list[str]:
    """Temporary files or folders a run left behind (an interrupted run's are removed by the next)."""
    return sorted(p.name for p in run_dir.rglob(".*") if p.name != ".lock")


@pytest.fixture(scope="module")
def lowrank_ckpt(tmp_path_factory, tiny_llama_dir) -> Path:
    """A checkpoint with re-applied structure (layer 0's down_proj factorized to rank 4)."""
    model, tok = load_model(str(tiny_llama_dir), "causal-lm")
    entry = {"type": "lowrank", "ranks": {LOWRANK: 4}}
    apply_lowrank(model, entry)
    path = tmp_path_factory.mktemp("lowrank") / "ckpt"
    checkpoint.save(Artifact(kind="torch", task="causal-lm", tokenizer=tok, model=model, structure=[entry]), path,
                    key="k")
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(ckpt: Path, change, rehash: bool = True) -> None:
    """Change the manifest; with `rehash` its content hash too, as a deliberate edit would, so the checks behind
    that one are what the case exercises."""
    mf = ckpt / "manifest.json"
    manifest = json.loads(mf.read_text())
    change(manifest)
    if rehash and "content" in manifest:
        manifest["content"] = checkpoint.content_hash(manifest)
    mf.write_text(json.dumps(manifest))


# ----------------------------------------------------------------------------- 1. the manifest is the whole truth
def test_an_unlisted_weight_file_is_refused_not_loaded(lowrank_ckpt, tmp_path):
    from safetensors.torch import save_file

    ckpt = _copy(lowrank_ckpt, tmp_path / "ckpt")
    compress.load(ckpt)  # intact: loads
    save_file({"model.norm.weight": torch.full((32,), 7.0)}, ckpt / "zz-extra.safetensors")
    with pytest.raises(CheckpointError, match="does not list: zz-extra.safetensors"):
        compress.load(ckpt)


def test_an_empty_file_table_is_refused_even_with_altered_weights(lowrank_ckpt, tmp_path):
    ckpt = _copy(lowrank_ckpt, tmp_path / "ckpt")
    _edit_manifest(ckpt, lambda m: m.update(files={}))
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match="file table `files` is missing or empty"):
        compress.load(ckpt)


def test_a_listed_file_that_is_missing_is_named(lowrank_ckpt, tmp_path):
    ckpt = _copy(lowrank_ckpt, tmp_path / "ckpt")
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        compress.load(ckpt)


def test_a_shard_the_index_names_that_the_table_does_not_list_is_refused(tiny_llama_dir, tmp_path):
    """from_pretrained reads every shard a sharded checkpoint's index names: one dropped from the folder and a
    rehashed table passed verification, then loading was a FileNotFoundError traceback."""
    model, tok = load_model(str(tiny_llama_dir), "causal-lm")
    ckpt = checkpoint.save(Artifact(kind="torch", task="causal-lm", tokenizer=tok, model=model), tmp_path / "ckpt")
    (ckpt / "model.safetensors").unlink()
    model.save_pretrained(ckpt, max_shard_size="40KB")
    _edit_manifest(ckpt, lambda m: m.update(files=checkpoint._file_table(ckpt)))
    shards = sorted(ckpt.glob("model-*.safetensors"))
    ids = torch.arange(5, 20)[None]
    with torch.no_grad():
        assert len(shards) > 1 and torch.equal(compress.load(ckpt).model(ids).logits, model(ids).logits)
    shards[-1].unlink()
    _edit_manifest(ckpt, lambda m: m.update(files=checkpoint._file_table(ckpt)))
    with pytest.raises(CheckpointError, match="model.safetensors.index.json names shards the manifest does not "
                                              f"list: {shards[-1].name}"):
        compress.load(ckpt)


def test_a_rehashed_file_whose_manifest_lies_about_its_size_is_refused(lowrank_ckpt, tmp_path):
    ckpt = _copy(lowrank_ckpt, tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")
    _edit_manifest(ckpt, lambda m: m["files"]["model.safetensors"].update(sha256=checkpoint._sha256(weights)))
    with pytest.raises(CheckpointError, match="model.safetensors has .* bytes, the manifest says"):
        compress.load(ckpt)


# ----------------------------------------------------------------------------- 2. names stay inside the folder
@pytest.mark.parametrize("name", ["../../secret.txt", "/etc/hostname", "/dev/zero", "sub/../../x"])
def test_file_names_outside_the_folder_are_refused_before_opening(lowrank_ckpt, tmp_path, name):
    ckpt = _copy(lowrank_ckpt, tmp_path / "ckpt")
    _edit_manifest(ckpt, lambda m: m["files"].update({name: {"size": 0, "sha256": "0" * 64}}))
    with pytest.raises(CheckpointError, match="not a plain relative path"):
        compress.load(ckpt)  # /dev/zero: refused at once, never read


def test_a_symlink_out_of_the_folder_is_refused(lowrank_ckpt, tmp_path):
    ckpt = _copy(lowrank_ckpt, tmp_path / "ckpt")
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    (ckpt / "notes.txt").symlink_to(outside)
    listed = {"notes.txt": {"size": 6, "sha256": checkpoint._sha256(outside)}}
    _edit_manifest(ckpt, lambda m: m["files"].update(listed))
    with pytest.raises(CheckpointError, match="notes.txt is a link to .*outside the checkpoint folder"):
        compress.load(ckpt)


def test_a_pipe_in_the_folder_is_refused_without_hanging(lowrank_ckpt, tmp_path):
    ckpt = _copy(lowrank_ckpt, tmp_path / "ckpt")
    os.mkfifo(ckpt / "weights.pipe")  # opening it for reading would block forever
    _edit_manifest(ckpt, lambda m: m["files"].update({"weights.pipe": {"size": 0, "sha256": "0" * 64}}))
    with pytest.raises(CheckpointError, match="weights.pipe is not a regular file"):
        compress.load(ckpt)


# ----------------------------------------------------------------------------- 3. non-finite runs and values
def test_a_nan_loss_stops_the_run_names_the_step_and_writes_nothing(tiny_llama_dir, tmp_path, capsys):
    model, tok = load_model(str(tiny_llama_dir), "causal-lm")
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # every logit is NaN from the first step
    model.save_pretrained(tmp_path / "nan-model")
    tok.save_pretrained(tmp_path / "nan-model")
    cfg = {"name": "nan", "model": {"source": str(tmp_path / "nan-model")}, "threads": 1,
           "data": {"train": {"source": "builtin:shakespeare", "max_tokens": 512, "seq_len": 32}},
           "passes": [{"distill": {"alpha": 0.0, "max_steps": 3, "batch_size": 2, "precision": "fp32"}}]}
    rc, _, err = _cli(capsys, "run", _write_config(tmp_path / "nan.yaml", cfg), "--output-dir", tmp_path / "runs",
                      "--no-progress")
    assert rc == 1 and "Traceback" not in err  # the options were valid: a failed run, not bad input
    assert "training loss became nan at step 1 of 3" in err and "temperature" in err and "lr=" in err
    assert len(err.strip().splitlines()) == 1
    run_dir = tmp_path / "runs" / "nan"
    assert not (run_dir / "01-distill").exists() and _leftovers(run_dir) == []


def test_manifests_are_strict_json(tiny_llama_dir, tmp_path):
    model, tok = load_model(str(tiny_llama_dir), "causal-lm")
    art = Artifact(kind="torch", task="causal-lm", tokenizer=tok, model=model,
                   info={"eval": [{"loss": float("inf")}]})
    with pytest.raises(CheckpointError, match="manifest field info.eval.0.loss is inf"):
        checkpoint.save(art, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor its temporary folder
    art.info = {"layers": {"model.layers.0.mlp.up_proj": {"energy": float("nan")}}}  # a key with dots (lowrank's)
    with pytest.raises(CheckpointError, match=r"manifest field info.layers.model.layers.0.mlp.up_proj.energy is nan"):
        checkpoint.save(art, tmp_path / "ckpt")
    art.info = {"loss": 1.5}
    checkpoint.save(art, tmp_path / "ckpt")
    json.loads((tmp_path / "ckpt" / "manifest.json").read_text(), parse_constant=lambda c: 1 / 0)
    _edit_manifest(tmp_path / "ckpt", lambda m: m["info"].update(loss=float("nan")))  # json.dumps writes NaN
    with pytest.raises(CheckpointError, match="NaN is not valid in strict JSON"):
        compress.load(tmp_path / "ckpt")


# ----------------------------------------------------------------------------- 4. bad input: exit 2, no traceback
def _jsonl(rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def _drop(key):
    return lambda c: c.pop(key)


def _set(dotted, value):
    def change(c):
        node, keys = c, dotted.split(".")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
        node[keys[-1]] = value
    return change


def _passes(*items):
    return lambda c: c.update(passes=list(items))


def _branch(name, start="source"):
    return lambda c: c.update(branches=[{"name": name, "from": start, "passes": [{"quantize": {"method": "fp16"}}]}])


def _manifest(change):
    return lambda ckpt: _edit_manifest(ckpt, change)


def _structure(entry):
    return _manifest(lambda m: m.update(structure=[entry]))


def _add_file(name, data=b"x", listed=False):
    def change(ckpt):
        (ckpt / name).write_bytes(data)
        if listed:
            _edit_manifest(ckpt, lambda m: m["files"].update({name: {"size": len(data), "sha256": "0" * 64}}))
    return change


def _alter(name, how):
    def change(ckpt):
        f = ckpt / name
        data = f.read_bytes()
        f.write_bytes(data[:-16] if how == "truncate" else data[:-1] + bytes([data[-1] ^ 1]))
    return change


def _weights_as(name):
    """The weights renamed to `name` (None: deleted), the table rehashed and the structure dropped: the plain
    from_pretrained path, which reads model.safetensors (or its shards' index), nothing else."""
    def change(ckpt):
        weights = ckpt / "model.safetensors"
        if name is None:
            weights.unlink()
        else:
            weights.rename(ckpt / name)

        def edit(m):
            entry = m["files"].pop("model.safetensors")
            m.update(structure=[], files={**m["files"], **({name: entry} if name else {})})
        _edit_manifest(ckpt, edit)
    return change


def _lie_about_size(ckpt):
    f = ckpt / "config.json"
    f.write_bytes(f.read_bytes() + b"\n")
    _edit_manifest(ckpt, lambda m: m["files"]["config.json"].update(sha256=checkpoint._sha256(f)))


# (id, kind, change, text the message must contain). kind: config / set (`compress validate` on a valid base
# config changed by `change`), data (`compress run` of a distill pass on a data file), manifest (`compress run`
# from a damaged copy of a low-rank checkpoint).
BAD_INPUTS = [
    ("config-not-utf8", "raw", b"name: caf\xe9\nmodel: {source: x}\n", "not UTF-8"),
    ("config-not-yaml", "raw", b"name: [unclosed\n", "not valid YAML"),
    ("config-a-list", "raw", b"- name: x\n", "expected a mapping at the top level"),
    ("config-missing", "raw", None, "not found"),
    ("config-key-twice", "raw", b"name: x\nmodel: {source: builtin:smollm2-135m}\nname: y\n",
     "the key 'name' is given twice"),
    ("encoder-as-causal-lm", "config", _set("model.source", "builtin:minilm-l6"), "no language-model head"),
    ("block-size-48", "config", _passes({"export": {}}, {"quantize": {"method": "ort-int8-dynamic", "block_size": 48}}),
     "passes.1.quantize.block_size"),
    ("opset-99", "config", _passes({"export": {"opset": 99}}), "passes.0.export.opset"),
    ("no-name", "config", _drop("name"), "name: required"),
    ("no-model", "config", _drop("model"), "model: required"),
    ("name-with-slash", "config", _set("name", "../up"), "name:"),
    ("unknown-key", "config", _set("pases", []), "unknown option 'pases'"),
    ("bad-task", "config", _set("task", "translation"), "task:"),
    ("threads-zero", "config", _set("threads", 0), "threads:"),
    ("bad-device", "config", _set("device", "tpu"), "device:"),
    ("seed-text", "config", _set("seed", "abc"), "seed:"),
    ("seed-float-nan", "config", _set("seed", float("nan")), "seed:"),
    ("source-missing-dir", "config", _set("model.source", "/nonexistent/model"), "model.source"),
    ("source-bad-builtin", "config", _set("model.source", "builtin:gpt-17"), "model.source"),
    ("source-folder-no-config", "config", _set("model.source", str(Path(__file__).parent)), "with no config.json"),
    ("source-extra-key", "config", _set("model.revision", "main"), "unknown option 'revision'"),
    ("unknown-pass", "config", _passes({"distil": {}}), "passes.0"),
    ("two-pass-names", "config", _passes({"quantize": {"method": "bf16"}, "export": {}}), "passes.0"),
    ("pass-options-scalar", "config", _passes({"quantize": 5}), "passes"),
    ("passes-a-mapping", "config", _set("passes", {"quantize": {}}), "passes"),
    ("quantize-bad-method", "config", _passes({"quantize": {"method": "int3"}}), "method"),
    ("quantize-typo", "config", _passes({"quantize": {"metod": "bf16"}}), "metod"),
    ("temperature-inf", "config", _passes({"distill": {"temperature": float("inf")}}), "temperature"),
    ("lr-nan", "config", _passes({"distill": {"lr": float("nan")}}), "lr"),
    ("temperature-huge", "config", _passes({"distill": {"temperature": 1e6}}),
     "passes.0.distill.temperature: Input should be less than or equal to 100"),
    ("temperature-negative", "config", _passes({"distill": {"temperature": -1}}), "temperature"),
    ("alpha-above-one", "config", _passes({"distill": {"alpha": 2}}), "alpha"),
    ("max-steps-zero", "config", _passes({"distill": {"max_steps": 0}}), "max_steps"),
    ("batch-size-text", "config", _passes({"distill": {"batch_size": "eight"}}), "batch_size"),
    ("warmup-one", "config", _passes({"distill": {"warmup_ratio": 1}}), "warmup_ratio"),
    ("linear-schedule-no-end", "config", _passes({"distill": {"temperature_schedule": "linear"}}),
     "temperature_end"),
    ("prune-recover-typo", "config", _passes({"prune": {"recover": {"max_step": 5}}}), "max_step"),
    ("ratio-true", "config", _passes({"prune": {"ratio": True}}), "passes.0.prune.ratio: true / "
     "false is not a value of this option"),
    ("max-steps-false", "config", _passes({"distill": {"max_steps": False}}), "passes.0.distill.max_steps"),
    ("recover-steps-true", "config", _passes({"prune": {"recover": {"max_steps": True}}}),
     "passes.0.prune.recover.max_steps"),
    ("norm-literal-true", "config", _passes({"prune": {"norm": True}}), "passes.0.prune.norm"),
    ("set-factor-true", "set", ["passes.0={test-scale: {factor: true}}"], "passes.0.test-scale.factor"),
    ("quantize-twice", "config", _passes({"quantize": {"method": "bf16"}}, {"quantize": {"method": "fp16"}}),
     "passes.1"),
    ("ort-before-export", "config", _passes({"quantize": {"method": "ort-int8-dynamic"}}), "passes.0"),
    ("export-twice", "config", _passes({"export": {}}, {"export": {}}), "passes.1 (export): passes.0 (export) "
     "already exported the model to ONNX; keep one export pass"),
    ("torch-cast-after-export", "config", _passes({"export": {}}, {"quantize": {"method": "bf16"}}),
     "or quantize the ONNX model with an ort-* method"),
    ("export-after-torch-cast", "config", _passes({"quantize": {"method": "fp16"}}, {"export": {}}),
     "passes.1 (export) cannot export a model passes.0 (quantize) quantized in torch"),
    ("branch-like-a-step", "config", _branch("99-alt"), "branches.0.name"),
    ("branch-like-main-step", "config", _branch("01-quantize"), "branches.0.name"),
    ("branch-with-slash", "config", _branch("a/b"), "branches.0.name"),
    ("branch-bad-from", "config", _branch("alt", "07-prune"), "branches.0.from"),
    ("branch-duplicate", "config", lambda c: c.update(branches=[
        {"name": "alt", "passes": []}, {"name": "alt", "passes": []}]), "branches"),
    ("data-unknown-key", "config", _set("data.train", {"source": "builtin:shakespeare", "max_token": 5}),
     "max_token"),
    ("data-source-missing", "config", _set("data.train", {"source": "/nonexistent/corpus.txt"}),
     "data.train.source: data source '/nonexistent/corpus.txt'"),
    ("teacher-missing", "config", _passes({"distill": {"teacher": "/nonexistent/teacher"}}),
     "passes.0.distill.teacher: model source '/nonexistent/teacher' not found"),
    ("data-bad-split", "config", _set("data.train", {"source": "builtin:shakespeare", "split": "dev"}), "split"),
    ("data-negative-tokens", "config", _set("data.train", {"source": "builtin:shakespeare", "max_tokens": -5}),
     "max_tokens"),
    ("data-overlapping-eval", "config", lambda c: c.update(data={
        "train": {"source": "builtin:shakespeare"}, "eval": {"source": "builtin:shakespeare", "split": "train"}}),
     "data.eval"),
    ("benchmark-unknown-key", "config", _set("benchmark", {"backend": ["torch-cpu"]}), "benchmark"),
    ("benchmark-bad-baseline", "config", _set("benchmark", {"baseline": "09-nothing"}), "benchmark.baseline"),
    ("set-not-yaml", "set", ["passes.0.quantize.method=[bf16"], "--set passes.0.quantize.method"),
    ("set-unclosed-quote", "set", ["name='tiny"], "--set name"),
    ("set-no-equals", "set", ["seed"], "--set 'seed'"),
    ("set-no-key", "set", ["=3"], "the key has an empty part"),
    ("set-no-value", "set", ["seed="], "no value after '='"),
    ("set-another-pass", "set", ["passes.0.distill.max_steps=5"], "passes.0 is a `quantize` pass, not `distill`"),
    ("set-index-out-of-range", "set", ["passes.5.quantize.method=bf16"], "passes.5"),
    ("set-through-a-scalar", "set", ["name.x=1"], "name"),
    ("set-seed-text", "set", ["seed=abc"], "seed:"),
    ("set-threads-negative", "set", ["threads=-1"], "threads:"),
    ("set-temperature-inf", "set", ["passes.0={distill: {temperature: .inf}}"], "temperature"),
    ("set-source-missing", "set", ["model.source=/nonexistent"], "model.source"),
    ("data-not-utf8", "data", ("d.jsonl", b'{"text": "caf\xe9"}\n'), "not UTF-8"),
    ("data-row-a-list", "data", ("d.jsonl", _jsonl([["a", "b"]])), "d.jsonl:1: each line must be a JSON object"),
    ("data-row-a-string", "data", ("d.jsonl", _jsonl([{"text": "ok"}, "plain"])), "d.jsonl:2"),
    ("data-row-a-number", "data", ("d.jsonl", _jsonl([7])), "d.jsonl:1"),
    ("data-not-json", "data", ("d.jsonl", _jsonl([b"{text: no quotes}"])), "d.jsonl:1: not valid JSON"),
    ("data-no-text-field", "data", ("d.jsonl", _jsonl([{"body": "x"}])), "no field 'text'"),
    ("data-empty", "data", ("d.jsonl", b""), "no documents"),
    ("data-missing", "data", ("missing.jsonl", None), "missing.jsonl"),
    ("manifest-no-files", "manifest", _manifest(lambda m: m.pop("files")), "`files` is missing"),
    ("manifest-empty-files", "manifest", _manifest(lambda m: m.update(files={})), "`files` is missing or empty"),
    ("manifest-unknown-dtype", "manifest", _manifest(lambda m: m.update(dtype="float99")), "dtype 'float99'"),
    ("manifest-dtype-bool", "manifest", _manifest(lambda m: m.update(dtype="bool")),
     "dtype 'bool' is not one a model loads in (float32, bfloat16, float16, float64)"),
    ("manifest-dtype-float8", "manifest", _manifest(lambda m: m.update(dtype="float8_e4m3fn")),
     "dtype 'float8_e4m3fn' is not one a model loads in"),
    ("manifest-kind-onnx", "manifest", _manifest(lambda m: m.update(kind="onnx")), "kind onnx needs model.onnx"),
    ("manifest-kind-unknown", "manifest", _manifest(lambda m: m.update(kind="tflite")), "kind is 'tflite'"),
    ("manifest-no-task", "manifest", _manifest(lambda m: m.pop("task")), "task is missing"),
    ("manifest-format-99", "manifest", _manifest(lambda m: m.update(format_version=99)), "format 99"),
    ("manifest-not-json", "manifest", lambda ck: (ck / "manifest.json").write_text("{"),
     "manifest.json is corrupted"),
    ("manifest-nested-too-deep", "manifest", lambda ck: (ck / "manifest.json").write_text("[" * 100000),
     "manifest.json is corrupted: maximum recursion depth exceeded"),
    ("manifest-a-list", "manifest", lambda ck: (ck / "manifest.json").write_text("[]"), "expected a JSON object"),
    ("manifest-bare-nan", "manifest", _manifest(lambda m: m["info"].update(loss=float("nan"))), "NaN"),
    ("manifest-size-text", "manifest", _manifest(lambda m: m["files"]["config.json"].update(size="big")),
     "files['config.json']"),
    ("manifest-structure-not-list", "manifest", _manifest(lambda m: m.update(structure={"type": "lowrank"})),
     "structure must be a list"),
    ("structure-no-ranks", "manifest", _structure({"type": "lowrank"}), "lowrank structure's ranks must map"),
    ("structure-rank-huge", "manifest", _structure({"type": "lowrank", "ranks": {LOWRANK: 10**9}}),
     f"manifest.json: lowrank rank of {LOWRANK} is 1000000000, not a rank between 1 and the layer's"),
    ("structure-embedding-rank-huge", "manifest", _structure({"type": "lowrank_embedding", "rank": 10**9}),
     "manifest.json: lowrank_embedding rank is 1000000000, not a rank between 1 and the layer's"),
    ("structure-missing-module", "manifest", _structure({"type": "lowrank", "ranks": {"model.layers.9.mlp": 4}}),
     "manifest.json: lowrank structure names model.layers.9.mlp"),
    ("structure-rank-too-large", "manifest", _structure({"type": "lowrank", "ranks": {LOWRANK: 8}}),
     "structure entries do not fit"),
    ("structure-hidden-width-huge", "manifest", _structure({"type": "hidden_width", "size": 10**9}),
     "manifest.json: hidden_width size 1000000000 is not a width between 1 and the model's 32"),
    ("structure-unknown-type", "manifest", _structure({"type": "from-the-future"}),
     "manifest.json: the checkpoint needs structure 'from-the-future'"),
    ("file-dotdot", "manifest", _manifest(lambda m: m["files"].update({"../x": {"size": 1, "sha256": "0"}})),
     "'../x' is not a plain relative path"),
    ("file-absolute", "manifest", _manifest(lambda m: m["files"].update({"/etc/hostname": {"size": 1,
                                                                                           "sha256": "0"}})),
     "'/etc/hostname' is not a plain relative path"),
    ("file-dev-zero", "manifest", _manifest(lambda m: m["files"].update({"/dev/zero": {"size": 0,
                                                                                       "sha256": "0"}})),
     "'/dev/zero'"),
    ("file-nul-byte", "manifest", _manifest(lambda m: m["files"].update({"a\0b": {"size": 1, "sha256": "0"}})),
     "not a plain relative path"),
    ("manifest-unknown-task", "manifest", _manifest(lambda m: m.update(task="translation")), "'translation'"),
    ("manifest-task-edited", "manifest", lambda ck: _edit_manifest(ck, lambda m: m.update(task="feature-extraction"),
                                                                   rehash=False), "was changed after the checkpoint"),
    ("manifest-content-removed", "manifest", lambda ck: _edit_manifest(
        ck, lambda m: (m.pop("content"), m.update(task="feature-extraction")), rehash=False),
     "it has no content hash"),
    ("file-listed-missing", "manifest", lambda ck: (ck / "config.json").unlink(), "config.json is missing"),
    ("file-under-a-file", "manifest", _manifest(lambda m: m["files"].update({"config.json/x": {"size": 1,
                                                                                   "sha256": "0" * 64}})),
     "config.json/x cannot be read (Not a directory)"),
    ("file-unlisted-weights", "manifest", _add_file("zz-extra.safetensors"), "zz-extra.safetensors"),
    ("weights-unlisted-and-gone", "manifest", _weights_as(None), "kind torch needs its weights (model.safetensors "
     "or model.safetensors.index.json) in the file table"),
    ("weights-renamed", "manifest", _weights_as("weights.safetensors"), "kind torch needs its weights"),
    ("file-unlisted-config", "manifest", _add_file("extra_config.json", b"{}"), "does not list: extra_config.json"),
    ("file-listed-bad-hash", "manifest", _add_file("notes.txt", listed=True), "notes.txt does not match"),
    ("weights-truncated", "manifest", _alter("model.safetensors", "truncate"), "model.safetensors has"),
    ("weights-altered", "manifest", _alter("model.safetensors", "flip"), "model.safetensors does not match"),
    ("config-rehashed-size-lie", "manifest", _lie_about_size, "config.json has"),
]


@pytest.mark.parametrize("case_id,kind,change,expected", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_exits_2_naming_the_field_without_a_traceback(case_id, kind, change, expected, tmp_path,
                                                                 capsys, tiny_llama_dir, lowrank_ckpt):
    cfg = _scale_config(tiny_llama_dir, factors=(), last="bf16")
    command, extra = "validate", []
    if kind == "raw":
        config = tmp_path / "bad.yaml"
        if change is not None:
            config.write_bytes(change)
    elif kind in ("config", "set"):
        if kind == "config":
            change(cfg)
        else:
            extra = [a for item in change for a in ("--set", item)]
        config = _write_config(tmp_path / "bad.yaml", cfg)
    else:
        command, extra = "run", ["--output-dir", tmp_path / "runs", "--no-progress"]
        if kind == "data":
            name, content = change
            if content is not None:
                (tmp_path / name).write_bytes(content)
            cfg["data"] = {"train": {"source": str(tmp_path / name), "seq_len": 16}}
            cfg["passes"] = [{"distill": {"alpha": 0.0, "max_steps": 1, "batch_size": 2}}]
        else:
            ckpt = _copy(lowrank_ckpt, tmp_path / "damaged")
            change(ckpt)
            cfg["model"]["source"] = str(ckpt)
            cfg["passes"] = [{"test-scale": {"factor": 2.0}}]
        config = _write_config(tmp_path / "bad.yaml", cfg)
    rc, _, err = _cli(capsys, command, config, *extra)
    assert "Traceback" not in err
    assert rc == 2, err
    assert expected in err, err
    if command == "run":  # refused before anything was written
        assert not list((tmp_path / "runs" / "tiny").glob("[0-9]*")) and _leftovers(tmp_path / "runs") == []


def test_the_table_covers_the_issue():
    assert len(BAD_INPUTS) >= 60
    assert len({c[0] for c in BAD_INPUTS}) == len(BAD_INPUTS)


# ----------------------------------------------------------------------------- 5. two runs, one folder
def test_a_second_run_on_a_held_folder_is_refused_and_its_scratch_is_its_own(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    config = _write_config(tmp_path / "p.yaml", _scale_config(tiny_llama_dir))
    marker = tmp_path / "started"
    first = _start_run(config, out, COMPRESS_TEST_SLEEP=str(marker))
    try:
        deadline = time.time() + 120
        while not marker.exists():  # the first run is inside its first pass, holding the folder
            assert first.is_alive(), f"the first run ended with exit code {first.exitcode}"
            assert time.time() < deadline, "the first run never started its pass"
            time.sleep(0.1)
        scratch = out / "tiny" / f".scratch-{first.pid}"
        assert scratch.is_dir()
        rc, _, err = _cli(capsys, "run", config, "--output-dir", out, "--no-progress")
        assert rc == 2 and "Traceback" not in err
        assert f"another run holds {out / 'tiny'} (pid {first.pid})" in err
        assert scratch.is_dir(), "the refused run removed the first run's scratch"
    finally:
        _kill(first)
    result = _run(config, out)  # the lock died with its holder: the folder is free again
    assert [s.reused for s in result.steps] == [False, False, False]
    assert not scratch.exists() and _leftovers(out / "tiny") == []


def test_the_lock_is_released_after_a_run_in_the_same_process(tiny_llama_dir, tmp_path):
    config = _write_config(tmp_path / "p.yaml", _scale_config(tiny_llama_dir, factors=(2.0,)))
    _run(config, tmp_path / "runs")
    assert all(s.reused for s in _run(config, tmp_path / "runs").steps)
    with open(tmp_path / "runs" / "tiny" / ".lock") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody holds it


def test_a_refused_run_writes_nothing_into_the_held_folder_not_even_its_log(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    config = _write_config(tmp_path / "p.yaml", _scale_config(tiny_llama_dir, factors=(2.0,)))
    run_dir = out / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "run.log").write_text("the first run's log\n")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.iterdir() if p.name != ".lock"}
    with _held(run_dir):
        rc, out_text, err = _cli(capsys, "run", config, "--output-dir", out, "--no-progress")
    assert rc == 2 and "Traceback" not in err and "(pid 424242)" in err and "--wait" in err
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.iterdir() if p.name != ".lock"}
    assert after == before, "the refused run wrote into the first run's folder"
    assert (run_dir / ".lock").read_text() == "424242\n"


def test_wait_queues_behind_the_holder_and_says_so_once(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    config = _write_config(tmp_path / "p.yaml", _scale_config(tiny_llama_dir, factors=(2.0,)))
    start = time.monotonic()
    with _held(out / "tiny", seconds=1.0) as released:
        rc, out_text, err = _cli(capsys, "run", config, "--output-dir", out, "--no-progress", "--wait")
        assert released.is_set(), "the run started while the folder was held"
    assert rc == 0, err
    assert time.monotonic() - start >= 1.0
    assert (out_text + err).count(f"waiting for the run holding {out / 'tiny'} (pid 424242) to finish") == 1
    assert (out / "tiny" / "01-test-scale" / "manifest.json").exists()
    assert (out / "tiny" / ".lock").read_text() == f"{os.getpid()}\n"  # it held the folder for its run
    assert "test-scale: wrote" in (out / "tiny" / "run.log").read_text()  # opened once the folder was its own


# ----------------------------------------------------------------------------- 6. read-only or full disk
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_full_or_read_only_disk_is_one_line_exit_1_and_nothing_half_written(tiny_llama_dir, tmp_path, capsys,
                                                                              monkeypatch, code):
    out = tmp_path / "runs"
    config = _write_config(tmp_path / "p.yaml", _scale_config(tiny_llama_dir, factors=(2.0,)))
    real = checkpoint._file_table

    def disk_fails(root):
        real(root)  # the weights are written; the disk fails before the checkpoint is complete
        raise OSError(code, os.strerror(code), str(root))

    monkeypatch.setattr(checkpoint, "_file_table", disk_fails)
    rc, _, err = _cli(capsys, "run", config, "--output-dir", out, "--no-progress")
    assert rc == 1 and "Traceback" not in err
    assert errno.errorcode[code] in err and str(out / "tiny") in err and len(err.strip().splitlines()) == 1
    assert not (out / "tiny" / "01-test-scale").exists() and _leftovers(out / "tiny") == []
    monkeypatch.undo()
    assert [s.reused for s in _run(config, out).steps] == [False, False]  # a rerun works once the disk does


def test_sigterm_is_one_line_exit_1_and_cleans_up_like_ctrl_c(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "runs"
    config = _write_config(tmp_path / "p.yaml", _scale_config(tiny_llama_dir, factors=(2.0,)))
    real = checkpoint._file_table

    def stopped(root):  # a scheduler's SIGTERM while the checkpoint is being written
        real(root)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(checkpoint, "_file_table", stopped)
    rc, _, err = _cli(capsys, "run", config, "--output-dir", out, "--no-progress")
    assert rc == 1 and err.strip() == "terminated (SIGTERM)"
    assert signal.getsignal(signal.SIGTERM) is before  # the CLI's handler is gone with the command
    assert not (out / "tiny" / "01-test-scale").exists() and _leftovers(out / "tiny") == []


def test_verbose_adds_the_traceback_of_a_disk_error(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "runs"
    config = _write_config(tmp_path / "p.yaml", _scale_config(tiny_llama_dir, factors=(2.0,)))

    def disk_fails(root):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(root))

    monkeypatch.setattr(checkpoint, "_file_table", disk_fails)
    rc, _, err = _cli(capsys, "run", config, "--output-dir", out, "--no-progress", "--verbose")
    assert rc == 1 and "Traceback" in err and "disk_fails" in err
    assert err.strip().splitlines()[-1].startswith(f"error: {out / 'tiny'}")  # the one line still ends it
    assert "(EACCES)" in err and _leftovers(out / "tiny") == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_safetensors_own_disk_error_is_one_line_exit_1_and_nothing_half_written(tiny_llama_dir, tmp_path, capsys,
                                                                                monkeypatch, code):
    """safetensors raises its own SafetensorError, the OS error only in its text (as 0.8 does on a full disk:
    "Error while serializing: I/O error: No space left on device (os error 28)")."""
    import transformers.modeling_utils as mu
    from safetensors import SafetensorError

    out = tmp_path / "runs"
    config = _write_config(tmp_path / "p.yaml", _scale_config(tiny_llama_dir, factors=(2.0,)))

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")  # a partial file, as a disk that fills up mid-write leaves
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")

    monkeypatch.setattr(mu, "safe_save_file", full_disk)
    rc, _, err = _cli(capsys, "run", config, "--output-dir", out, "--no-progress")
    assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"error: {out / 'tiny' / '01-test-scale'}: {os.strerror(code)} ({errno.errorcode[code]})" in err
    assert not (out / "tiny" / "01-test-scale").exists() and _leftovers(out / "tiny") == []
    monkeypatch.undo()
    assert [s.reused for s in _run(config, out).steps] == [False, False]


# ----------------------------------------------------------------------------- temporary files
def test_a_quantize_pass_keeps_its_temporary_files_in_the_run_folder(tiny_llama_dir, tmp_path, monkeypatch):
    """ONNX Runtime's quantizer (and the suite's ORT wrapper) create temporary folders without a `dir`: during a
    run they land in the run's scratch, which the run removes; the system temp folder is back afterwards."""
    made = []
    real = tempfile.mkdtemp

    def recording(suffix=None, prefix=None, dir=None):
        path = real(suffix, prefix, dir)
        made.append((dir, Path(path).resolve()))
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", recording)
    system_tmp = tempfile.gettempdir()
    cfg = {"name": "tmp", "model": {"source": str(tiny_llama_dir)}, "threads": 1,
           "passes": [{"export": {}}, {"quantize": {"method": "ort-int8-dynamic", "kernel": "matmulinteger"}}]}
    config = _write_config(tmp_path / "t.yaml", cfg)
    env_before = os.environ.get("TMPDIR")
    result = _run(config, tmp_path / "runs")
    run_dir = (tmp_path / "runs" / "tmp").resolve()
    assert result.steps[-1].kind == "onnx"
    defaults = [path for d, path in made if d is None]
    assert defaults, "nothing made a temporary folder without a dir: the check checks nothing"
    outside = [str(path) for _, path in made if not path.is_relative_to(run_dir)]
    assert outside == []
    assert all(path.is_relative_to(run_dir / f".scratch-{os.getpid()}" / "tmp") for path in defaults)
    assert tempfile.gettempdir() == system_tmp and os.environ.get("TMPDIR") == env_before
    assert _leftovers(run_dir) == []


# ----------------------------------------------------------------------------- 7. branch names
def test_branches_are_never_written_into_the_main_chain(tiny_llama_dir, tmp_path, capsys):
    cfg = _scale_config(tiny_llama_dir, factors=(2.0,), last="fp16")
    for name in ("01-quantize", "99-alt", "02-test-scale"):
        cfg["branches"] = [{"name": name, "passes": [{"quantize": {"method": "bf16"}}]}]
        rc, _, err = _cli(capsys, "validate", _write_config(tmp_path / "b.yaml", cfg))
        assert rc == 2 and "branches.0.name" in err and "looks like a step folder" in err
    cfg["branches"] = [{"name": "alt-99", "passes": [{"quantize": {"method": "bf16"}}]}]
    config = _write_config(tmp_path / "b.yaml", cfg)
    first = _run(config, tmp_path / "runs")
    assert [s.label for s in first.steps] == ["01-test-scale", "02-quantize", "alt-99/01-quantize"]
    assert all(s.reused for s in _run(config, tmp_path / "runs").steps)  # kept and cached, not deleted


# ----------------------------------------------------------------------------- 8. cache keys
def test_the_seed_is_part_of_every_key(tiny_llama_dir, tmp_path):
    cfg = _scale_config(tiny_llama_dir)
    out = tmp_path / "runs"
    first = _run(_write_config(tmp_path / "a.yaml", cfg), out)
    cfg["seed"] = 7
    seeded = _run(_write_config(tmp_path / "b.yaml", cfg), out)
    assert [s.reused for s in seeded.steps] == [False, False, False]
    assert all(a.key != b.key for a, b in zip(first.steps, seeded.steps))


def test_a_recomputed_parent_with_other_content_invalidates_its_children(tiny_llama_dir, tmp_path):
    config = _write_config(tmp_path / "p.yaml", _scale_config(tiny_llama_dir))
    out = tmp_path / "runs"
    first = _run(config, out)
    # step 1 comes back with the same key but other weights (a pass that is not bit-for-bit deterministic)
    step1 = compress.load(first.steps[0].path)
    with torch.no_grad():
        step1.model.model.norm.weight.mul_(1.5)
    fields = {k: v for k, v in step1.manifest.items() if k in ("key", "source", "parent", "pass", "threads")}
    checkpoint.save(step1.derive(), first.steps[0].path, **fields)
    again = _run(config, out)
    assert [s.reused for s in again.steps] == [True, False, False]
    norm = compress.load(again.steps[1].path).model.model.norm.weight
    assert torch.allclose(norm, step1.model.model.norm.weight * 2)
    # an identical recompute (deterministic pass) keeps the children: keys follow content, not timestamps
    (Path(again.steps[1].path) / "model.safetensors").write_bytes(b"damaged")
    assert [s.reused for s in _run(config, out).steps] == [True, False, True]


# ----------------------------------------------------------------------------- SIGKILL at random points
@pytest.mark.slow
def test_sigkill_at_random_points_then_every_rerun_resumes_and_loads(tiny_llama_dir, tmp_path):
    kills = int(os.environ.get("COMPRESS_TRUST_KILLS", "30"))
    rng = random.Random(15)
    out = tmp_path / "runs"
    configs = [_write_config(tmp_path / f"c{j}.yaml", _scale_config(tiny_llama_dir, factors=(f, 2.0, 0.5)))
               for j, f in enumerate((1.0, 1.5, 3.0))]
    t0 = time.perf_counter()
    _run(configs[0], out)
    full_run = time.perf_counter() - t0
    counts = {"kills": 0, "killed_mid_run": 0, "failed_resumes": 0, "bad_loads": 0, "steps_reused": 0,
              "steps_recomputed": 0, "finished_steps_not_reused": 0}
    for k in range(kills):
        config = rng.choice(configs)
        child = _start_run(config, out)
        time.sleep(rng.uniform(0, 1.2 * full_run))  # somewhere in the run (or just after it)
        counts["killed_mid_run"] += child.is_alive()
        _kill(child)
        counts["kills"] += 1
        finished = {}  # steps the killed run left as finished checkpoints: their keys
        for d in (out / "tiny").glob("[0-9]*"):
            try:
                finished[str(d)] = checkpoint.read_manifest(d)["key"]
            except CheckpointError:
                pass
        try:
            result = _run(config, out)
        except Exception as exc:  # noqa: BLE001 (counted, and the test fails below)
            counts["failed_resumes"] += 1
            print(f"kill {k}: rerun failed: {exc!r}")
            continue
        for s in result.steps:
            counts["steps_reused" if s.reused else "steps_recomputed"] += 1
            counts["finished_steps_not_reused"] += finished.get(s.path) == s.key and not s.reused
            try:
                compress.load(s.path)
            except Exception as exc:  # noqa: BLE001
                counts["bad_loads"] += 1
                print(f"kill {k}: {s.path} does not load: {exc!r}")
        assert _leftovers(out / "tiny") == [], f"kill {k}: temporary files were left behind"
    print("fault injection:", json.dumps(counts))
    if os.environ.get("COMPRESS_TRUST_RESULTS"):
        command = ("COMPRESS_TRUST_RESULTS=benchmarks/results/trust/fault_injection.json "
                   ".venv/bin/python -m pytest -s tests/test_trust.py -m slow")
        record = {"command": command, "pipeline": "test-scale x3 + quantize bf16 on tiny Llama", **counts}
        Path(os.environ["COMPRESS_TRUST_RESULTS"]).write_text(json.dumps(record, indent=1) + "\n")
    assert counts["failed_resumes"] == counts["bad_loads"] == counts["finished_steps_not_reused"] == 0
    assert counts["killed_mid_run"] >= kills // 4, counts  # the kills did land inside runs


@pytest.mark.parametrize("how", ["folder", "pipe", "link-out"])
def test_a_manifest_that_is_not_a_regular_file_inside_the_folder_is_refused(lowrank_ckpt, tmp_path, how):
    ckpt = _copy(lowrank_ckpt, tmp_path / "ckpt")
    mf = ckpt / "manifest.json"
    outside = tmp_path / "outside.json"
    shutil.copy(mf, outside)
    mf.unlink()
    {"folder": mf.mkdir, "pipe": lambda: os.mkfifo(mf), "link-out": lambda: mf.symlink_to(outside)}[how]()
    expected = "outside the checkpoint folder" if how == "link-out" else "manifest.json is not a regular file"
    with pytest.raises(CheckpointError, match=expected):
        compress.load(ckpt)  # (a pipe hung reading it; a folder was an IsADirectoryError)


@pytest.mark.parametrize("version,expected", [("1", "has checkpoint format '1', this suite reads format 1"),
                                              (True, "has checkpoint format True,"), (1.0, "format 1.0,"),
                                              (None, "format None,"), ("missing", "has checkpoint no format_version,")])
def test_a_format_version_of_another_type_is_named_as_it_is(lowrank_ckpt, tmp_path, version, expected):
    ckpt = _copy(lowrank_ckpt, tmp_path / "ckpt")
    _edit_manifest(ckpt, lambda m: m.pop("format_version") if version == "missing"
                   else m.update(format_version=version))
    with pytest.raises(CheckpointError, match=expected):
        compress.load(ckpt)  # ("1" read "format 1, this suite reads 1"; true and 1.0 loaded)


@pytest.mark.parametrize("field,value", [("parent", "gone"), ("pass", ["prune"]), ("info", "x")])
def test_lineage_fields_of_another_type_are_refused_by_name(lowrank_ckpt, tmp_path, field, value):
    """parent, pass and info are outside the content hash, and the lineage (model card, the quantize pass's
    walk up to the torch parent) reads them as objects: an AttributeError traceback before."""
    from compress.model_card import lineage

    ckpt = _copy(lowrank_ckpt, tmp_path / "ckpt")
    _edit_manifest(ckpt, lambda m: m.update({field: value}), rehash=False)
    for read in (compress.load, lineage):
        with pytest.raises(CheckpointError, match=f"manifest.json: {field} must be a JSON object, got "):
            read(ckpt)
