import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compress
from compress import checkpoint
from compress.checkpoint import Artifact
from compress.errors import CheckpointError
from compress.models import load_model
from compress import structure

TESTS = Path(__file__).parent
IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])


def _save_tiny(tiny_llama_dir, path, **fields):
    model, tok = load_model(str(tiny_llama_dir), "causal-lm")
    art = Artifact(kind="torch", task="causal-lm", tokenizer=tok, model=model)
    checkpoint.save(art, path, key="k1", **fields)
    return model


def test_round_trip_in_fresh_process_gives_identical_logits(tiny_llama_dir, tmp_path):
    model = _save_tiny(tiny_llama_dir, tmp_path / "ckpt")
    with torch.no_grad():
        expected = model(IDS).logits
    script = (
        "import sys, json, torch, compress\n"
        "a = compress.load(sys.argv[1])\n"
        f"ids = torch.tensor({IDS.tolist()})\n"
        "with torch.no_grad(): out = a.model(ids).logits\n"
        "print(json.dumps({'logits': out.flatten().tolist(), 'task': a.task, 'tok': a.tokenizer('to be').input_ids}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ckpt")], capture_output=True, text=True,
                          check=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["task"] == "causal-lm"
    assert torch.equal(torch.tensor(got["logits"]).view_as(expected), expected)
    assert got["tok"] == compress.load(tmp_path / "ckpt").tokenizer("to be").input_ids


def test_manifest_records_lineage_hashes_and_versions(tiny_llama_dir, tmp_path):
    _save_tiny(tiny_llama_dir, tmp_path / "ckpt", parent={"path": "x", "key": "k0"})
    m = checkpoint.read_manifest(tmp_path / "ckpt")
    assert m["kind"] == "torch" and m["key"] == "k1" and m["parent"]["key"] == "k0"
    assert m["files"]["model.safetensors"]["size"] == (tmp_path / "ckpt" / "model.safetensors").stat().st_size
    assert len(m["files"]["model.safetensors"]["sha256"]) == 64
    assert m["versions"]["torch"].startswith("2.13")
    assert not list(tmp_path.glob(".*tmp*")), "temporary directory left behind"


def test_corrupted_checkpoint_is_refused(tiny_llama_dir, tmp_path):
    path = tmp_path / "ckpt"
    _save_tiny(tiny_llama_dir, path)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # same size, one byte changed
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        compress.load(path)
    weights.write_bytes(bytes(data[:-100]))  # truncated
    with pytest.raises(CheckpointError, match="truncated"):
        compress.load(path)
    weights.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        compress.load(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="not a finished compress checkpoint"):
        compress.load(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        compress.load(tmp_path / "nowhere")


def test_failed_save_leaves_nothing(tiny_llama_dir, tmp_path):
    model, _ = load_model(str(tiny_llama_dir), "causal-lm")

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    art = Artifact(kind="torch", task="causal-lm", tokenizer=BrokenTokenizer(), model=model)
    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.save(art, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_save_replaces_a_checkpoint_but_never_deletes_other_files(tiny_llama_dir, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    _save_tiny(tiny_llama_dir, ckpt)
    first = (ckpt / "manifest.json").read_text()
    _save_tiny(tiny_llama_dir, ckpt, parent={"path": "again", "key": "k0"})  # a checkpoint: replaced whole
    assert (ckpt / "manifest.json").read_text() != first and "again" in (ckpt / "manifest.json").read_text()
    umask = os.umask(0)
    os.umask(umask)
    assert {f.name: f.stat().st_mode & 0o777 for f in ckpt.iterdir()} == {  # safetensors writes 0600
        f.name: 0o666 & ~umask for f in ckpt.iterdir()}
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="exists and is not a checkpoint"):
        _save_tiny(tiny_llama_dir, notes)
    monkeypatch.chdir(notes)
    for here in (".", notes, tmp_path):  # the current folder, or one that holds it
        with pytest.raises(CheckpointError, match="the current folder or holds it"):
            _save_tiny(tiny_llama_dir, here)
    assert [p.name for p in notes.iterdir()] == ["mine.txt"] and (notes / "mine.txt").read_text() == "keep me"


def test_a_kill_while_replacing_a_checkpoint_leaves_one_whole(tiny_llama_dir, tmp_path, monkeypatch):
    """Replacing deleted the outdated checkpoint in place, then renamed the new one in: a kill mid-delete left
    a half-deleted folder that never loads, and lost both. The old one is renamed aside first now."""
    import shutil

    ckpt = tmp_path / "ckpt"
    _save_tiny(tiny_llama_dir, ckpt)
    real, killed = shutil.rmtree, []

    def kill_mid_delete(path, *args, **kwargs):  # a checkpoint's deletion stops after one file
        if (Path(path) / "manifest.json").is_file() and not killed:
            killed.append(Path(path))
            (Path(path) / "config.json").unlink()
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", kill_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        _save_tiny(tiny_llama_dir, ckpt, parent={"path": "again", "key": "k0"})
    monkeypatch.undo()
    assert killed and killed[0] != ckpt  # the outdated one, aside
    assert compress.load(ckpt).info is not None and "again" in (ckpt / "manifest.json").read_text()


class _Doubled(torch.nn.Module):
    """A Linear replaced by two (in -> in -> out): structure no stock config can express."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.first = torch.nn.Linear(linear.in_features, linear.in_features, bias=False)
        self.second = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)

    def forward(self, x):
        return self.second(self.first(x))


def _apply_doubled(model, entry):
    for name in entry["modules"]:
        parent, attr = name.rsplit(".", 1)
        owner = model.get_submodule(parent)
        setattr(owner, attr, _Doubled(getattr(owner, attr)))


def test_structure_entries_are_reapplied_before_weights_load(tiny_llama_dir, tmp_path, monkeypatch):
    known = structure.appliers()
    monkeypatch.setattr(structure, "appliers", lambda: {**known, "test-doubled": _apply_doubled})
    model, tok = load_model(str(tiny_llama_dir), "causal-lm")
    target = "model.layers.0.mlp.down_proj"
    _apply_doubled(model, {"modules": [target]})
    torch.nn.init.normal_(model.get_submodule(target).first.weight)
    with torch.no_grad():
        expected = model(IDS).logits
    art = Artifact(kind="torch", task="causal-lm", tokenizer=tok, model=model,
                   structure=[{"type": "test-doubled", "modules": [target]}])
    checkpoint.save(art, tmp_path / "ckpt")
    loaded = compress.load(tmp_path / "ckpt")
    assert isinstance(loaded.model.get_submodule(target), _Doubled)
    with torch.no_grad():
        assert torch.equal(loaded.model(IDS).logits, expected)
    # an unknown structure type is a clear error, not a silent mismatch
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    manifest["structure"][0]["type"] = "from-the-future"
    (tmp_path / "ckpt" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="was changed after the checkpoint was written"):
        compress.load(tmp_path / "ckpt")  # an edited manifest is refused first
    manifest["content"] = checkpoint.content_hash(manifest)  # as if written by a suite that knew that type
    (tmp_path / "ckpt" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="from-the-future"):
        compress.load(tmp_path / "ckpt")


def test_dtype_checkpoint_reloads_in_that_dtype_with_plain_from_pretrained(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from compress.passes import PassContext, get

    model, tok = load_model(str(tiny_llama_dir), "causal-lm")
    art = Artifact(kind="torch", task="causal-lm", tokenizer=tok, model=model)
    out = get("quantize")(method="bf16").run(art, PassContext())
    checkpoint.save(out, tmp_path / "bf16")
    assert compress.load(tmp_path / "bf16").model.dtype == torch.bfloat16
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")  # as config.json says
    assert plain.dtype == torch.bfloat16
    assert checkpoint.read_manifest(tmp_path / "bf16")["quantization"]["method"] == "bf16"


def test_a_head_the_source_lacks_is_the_same_in_every_load(tmp_path):
    """An encoder loaded as a classifier gets a new head: the same one in every process (each benchmark backend
    loads the source on its own), and loading does not move the caller's random stream."""
    from tiny_models import tiny_bert, tiny_tokenizer

    tiny_bert("feature-extraction").save_pretrained(tmp_path / "encoder")
    tiny_tokenizer("encoder").save_pretrained(tmp_path / "encoder")
    torch.manual_seed(123)
    a, _ = load_model(str(tmp_path / "encoder"), "sequence-classification", num_labels=3)
    after_load = torch.rand(4)
    torch.manual_seed(7)  # another stream before the second load: the head must not depend on it
    b, _ = load_model(str(tmp_path / "encoder"), "sequence-classification", num_labels=3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(4), after_load)
    assert torch.equal(a.classifier.weight, b.classifier.weight) and a.classifier.weight.abs().sum() > 0


def test_weights_that_do_not_fit_a_structureless_manifest_are_refused_not_initialized(tiny_llama_dir, tmp_path):
    """A manifest that lost its structure entries (an older manifest has no content hash to notice) must not
    load the stock model with the factorized layer initialized at random."""
    from compress.pruning.lowrank import apply_lowrank

    model, tok = load_model(str(tiny_llama_dir), "causal-lm")
    entry = {"type": "lowrank", "ranks": {"model.layers.0.mlp.down_proj": 4}}
    apply_lowrank(model, entry)
    checkpoint.save(Artifact(kind="torch", task="causal-lm", tokenizer=tok, model=model, structure=[entry]),
                    tmp_path / "ckpt")
    mf = tmp_path / "ckpt" / "manifest.json"
    manifest = json.loads(mf.read_text())
    manifest["structure"] = []
    manifest["content"] = checkpoint.content_hash(manifest)  # redone by whoever edited the structure
    mf.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"weights do not match the model its config and manifest describe "
                                              r"\(missing \['model.layers.0.mlp.down_proj.weight'\], unexpected "
                                              r"\['model.layers.0.mlp.down_proj.first.weight'"):
        compress.load(tmp_path / "ckpt")
