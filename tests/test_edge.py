"""The edge runner copied into an exported bundle runs without torch or transformers."""
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from tiny_models import tiny_bert, tiny_llama, tiny_tokenizer

from compress import save
from compress.checkpoint import Artifact, content_hash
from compress.edge import EdgeModel
from compress.passes import PassContext, get

# Raises on any attempt to import torch or transformers, then runs the bundle's own edge_runner.py.
BLOCKER = textwrap.dedent("""
    import builtins, runpy, sys
    real_import = builtins.__import__
    def guarded(name, *args, **kwargs):
        if name.split(".")[0] in ("torch", "transformers", "compress", "optimum"):
            raise ImportError(f"blocked import of {name}")
        return real_import(name, *args, **kwargs)
    builtins.__import__ = guarded
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


def bundle(model, task, kind, tmp_path):
    art = Artifact(kind="torch", task=task, tokenizer=tiny_tokenizer(kind), model=model)
    out = get("export")().run(art, PassContext(task=task, scratch=tmp_path / "scratch"))
    return save(out, tmp_path / "bundle")


def run_blocked(path, *args):
    proc = subprocess.run([sys.executable, "-c", BLOCKER, str(path / "edge_runner.py"), str(path), *args],
                          capture_output=True, text=True, timeout=120, cwd=path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_bundle_generates_without_torch(tmp_path):
    model = tiny_llama()
    path = bundle(model, "causal-lm", "causal", tmp_path)
    [out] = run_blocked(path, "To be, or not to be", "--max-new-tokens", "12")
    # Same text as torch's greedy generation from the same tokens.
    tok = tiny_tokenizer("causal")
    ids = tok("To be, or not to be", return_tensors="pt").input_ids
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=1)
    assert out["completion"] == tok.decode(want[0, ids.shape[1]:], skip_special_tokens=True)
    assert EdgeModel(path).generate_text("To be, or not to be", 12) == out["completion"]


def test_bundle_classifies_and_tokenizes_like_transformers(tmp_path):
    model = tiny_bert()
    path = bundle(model, "sequence-classification", "encoder", tmp_path)
    texts = ["Friends, Romans, countrymen", "lend me your ears and more words here"]
    rows = run_blocked(path, *texts)
    tok = tiny_tokenizer("encoder")
    enc = tok(texts, padding=True, return_tensors="pt")
    edge = EdgeModel(path)
    ids, mask = edge.encode(texts)
    assert (ids == enc.input_ids.numpy()).all() and (mask == enc.attention_mask.numpy()).all()
    with torch.no_grad():
        probs = model(**enc).logits.softmax(-1).numpy()
    for row, p in zip(rows, probs):
        assert row["label"] == model.config.id2label[int(p.argmax())]
        assert row["probability"] == pytest.approx(float(p.max()), abs=1e-3)


def test_embed_matches_mean_pooled_torch(tmp_path):
    model = tiny_bert("feature-extraction")
    path = bundle(model, "feature-extraction", "encoder", tmp_path)
    texts = ["a short one", "and a somewhat longer sentence than the first"]
    [row, _] = run_blocked(path, "--embed", *texts)
    from compress.models import mean_pool

    enc = tiny_tokenizer("encoder")(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = mean_pool(model(**enc).last_hidden_state, enc.attention_mask).numpy()
    np.testing.assert_allclose(EdgeModel(path).embed_texts(texts), want, atol=1e-5)
    np.testing.assert_allclose(row["embedding"], want[0], atol=1e-5)


def test_edge_module_imports_only_onnxruntime_numpy_tokenizers():
    import ast
    from pathlib import Path

    import compress.edge

    tree = ast.parse(Path(compress.edge.__file__).read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert roots <= {"__future__", "hashlib", "json", "os", "stat", "sys", "pathlib", "argparse", "numpy",
                     "onnxruntime", "tokenizers"}, roots


def test_bundle_refuses_damaged_files_and_misuse_in_one_line(tmp_path):
    """The runner checks the bundle against its manifest (sizes, sha256) before running it, and bad use is one
    line on stderr with exit 2, not a traceback."""
    path = bundle(tiny_llama(), "causal-lm", "causal", tmp_path)

    def cli(*args):
        proc = subprocess.run([sys.executable, str(path / "edge_runner.py"), str(path), *args], capture_output=True,
                              text=True, timeout=120, env={"PYTHONDONTWRITEBYTECODE": "1", "PATH": ""})
        return proc.returncode, proc.stderr

    for args, expected in [(["hi", "--classify"], "--classify needs a sequence-classification model"),
                           (["hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
                           (["hi", "--threads", "0"], "--threads must be between 1 and"),
                           (["hi", "--threads", "100000"], "--threads must be between 1 and")]:  # it hung
        rc, err = cli(*args)
        assert rc == 2 and expected in err and "Traceback" not in err, err
    config = path / "config.json"
    config.write_text(config.read_text().replace("{", '{"id2label": {"0": "x"}, ', 1))  # same file, edited
    rc, err = cli("hi")
    assert rc == 2 and "config.json is" in err and "manifest.json says" in err and "Traceback" not in err, err
    with pytest.raises(ValueError, match="config.json is"):
        EdgeModel(path)
    assert EdgeModel(path, verify=False).task == "causal-lm"  # the check can be skipped knowingly


def test_generation_past_the_models_positions_is_refused_before_it_runs(tmp_path):
    """A fused graph holds export.max_length positions (its rotary cache): a longer prompt + generation was an
    ONNX Runtime traceback mid-run; it is one line naming the limit and how many new tokens fit."""
    art = Artifact(kind="torch", task="causal-lm", tokenizer=tiny_tokenizer("causal"),
                   model=tiny_llama(hidden_size=64, intermediate_size=128))  # head_dim 16: the fused writer's
    out = get("export")(max_length=24, check_seq_len=16).run(art, PassContext(task="causal-lm",
                                                                              scratch=tmp_path / "scratch"))
    path = save(out, tmp_path / "bundle")
    edge = EdgeModel(path)
    assert edge.fused and edge.max_length == 24 and edge.max_length_source == "export.max_length"
    ids = np.arange(5, 15)[None]  # 10 tokens
    assert edge.generate(ids, 14).shape == (1, 24)  # exactly the limit still runs
    for loop in (edge, EdgeModel(path, shared_cache=False)):
        with pytest.raises(ValueError, match=r"10 tokens \+ 15 new ones need more positions than the 24 this model "
                                             r"holds \(export.max_length\): ask for at most 14 new tokens"):
            loop.generate(ids, 15)
        with pytest.raises(ValueError, match="25 tokens need more positions than the 24 .* shorten the input to at "
                                             "most 24 tokens"):
            loop.logits(np.arange(5, 30)[None])
    proc = subprocess.run([sys.executable, str(path / "edge_runner.py"), str(path), "To be " * 30], text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "need more positions than the 24 this model holds" in proc.stderr and "shorten the prompt" in proc.stderr


def test_generation_stops_at_any_eos_id_of_generation_config(tmp_path):
    """generation_config.json may list several eos ids (Llama 3 and other chat models do): the runner read only
    config.json's first id and generated past the others; it now stops where transformers' generate stops."""
    model = tiny_llama(hidden_size=64, intermediate_size=128, initializer_range=0.15)
    tok = tiny_tokenizer("causal")
    ids = tok("To be", return_tensors="pt").input_ids
    with torch.no_grad():
        free = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
    model.generation_config.eos_token_id = [1, free[2]]  # the third new token ends the text
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
    assert want == free[:3]
    path = bundle(model, "causal-lm", "causal", tmp_path)
    edge = EdgeModel(path)
    assert edge.generate(ids.numpy(), 6, eos_token_id=[1, free[2]])[0, ids.shape[1]:].tolist() == want
    assert edge.generate_text("To be", 6) == tok.decode(want, skip_special_tokens=True)


def test_model_card_command_runs_as_written(tmp_path):
    """The card said `python edge_runner.py 01-export "your text"`, which fails from anywhere (the runner is
    inside the folder it is given); its command now runs, literally, from the folder holding the checkpoint."""
    from compress.model_card import card_text

    path = bundle(tiny_llama(), "causal-lm", "causal", tmp_path)
    [command] = [line for line in card_text(path).splitlines() if line.startswith("python ")]
    assert command == 'python bundle/edge_runner.py bundle "your text"'
    proc = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=path.parent,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and json.loads(proc.stdout)["prompt"] == "your text", proc.stderr


def test_a_missing_or_damaged_manifest_is_refused_in_one_line(tmp_path):
    """Without manifest.json the runner skipped its check silently (an altered model.onnx ran); a manifest that
    is not a JSON object was a traceback, one that is not JSON an error naming no file."""
    path = bundle(tiny_llama(), "causal-lm", "causal", tmp_path)
    manifest = (path / "manifest.json").read_text()

    def cli(*args):
        proc = subprocess.run([sys.executable, str(path / "edge_runner.py"), str(path), "hi", "--max-new-tokens", "2",
                               *args], capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stderr

    for text, expected in [(None, "manifest.json not found, so the files cannot be checked"),
                           ("[1, 2]", "manifest.json holds a JSON list, not an object"),
                           ("{bad", "manifest.json is not valid JSON"),
                           ("[" * 100_000 + "]" * 100_000, "manifest.json is not valid JSON"),  # RecursionError
                           ('{"files": {}}', "manifest.json has no table of files to check")]:
        (path / "manifest.json").unlink(missing_ok=True)
        if text is not None:
            (path / "manifest.json").write_text(text)
        rc, err = cli()
        assert rc == 2 and expected in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    (path / "manifest.json").unlink()
    assert cli("--no-verify")[0] == 0  # asked for: runs unchecked
    assert EdgeModel(path).task == "causal-lm"  # a bare ONNX folder: nothing to check unless asked
    with pytest.raises(ValueError, match="manifest.json not found"):
        EdgeModel(path, verify=True)
    (path / "manifest.json").write_text(manifest)
    (path / "model.onnx").unlink()
    rc, err = cli()
    assert rc == 2 and "model.onnx is missing: the checkpoint is incomplete" in err, err
    (path / "manifest.json").unlink()  # a folder with neither is not taken for a bundle without its manifest
    rc, err = cli()
    assert rc == 2 and "model.onnx not found: give the directory of an exported checkpoint" in err, err


def test_an_unreadable_tokenizer_is_one_line(tmp_path):
    """tokenizers raises a bare Exception on a tokenizer.json it cannot parse: under --no-verify (or a newer
    tokenizers' file) that was a traceback; it is one line naming the file."""
    path = bundle(tiny_llama(), "causal-lm", "causal", tmp_path)
    tokenizer = path / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text()[:3000])
    proc = subprocess.run([sys.executable, str(path / "edge_runner.py"), str(path), "hi", "--no-verify"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: {tokenizer} cannot be read by tokenizers (EOF while parsing" in proc.stderr


def test_a_long_text_is_truncated_to_the_positions_roberta_can_use(tmp_path):
    """RoBERTa's position ids start after its padding index, so it reads pad_token_id + 1 fewer tokens than
    max_position_embeddings; where the tokenizer config sets no model_max_length the runner truncated to the
    whole table and ONNX Runtime failed ('indices element out of data bounds')."""
    from tiny_models import family_tokenizer, tiny_family

    model = tiny_family("roberta", "sequence-classification")  # 260 positions, pad_token_id 0: 259 tokens
    path = bundle(model, "sequence-classification", "encoder", tmp_path)
    text = "To be, or not to be, that is the question " * 40
    edge = EdgeModel(path)
    [(label, p)] = edge.classify(text)
    assert edge.encode(text)[0].shape == (1, 259)
    enc = family_tokenizer("roberta")(text, truncation=True, max_length=259, return_tensors="pt")
    with torch.no_grad():
        probs = model(**enc).logits.softmax(-1)[0]
    assert label == model.config.id2label[int(probs.argmax())] and p == pytest.approx(float(probs.max()), abs=1e-4)


def test_the_runner_refuses_an_edited_manifest_as_compress_load_does(tmp_path):
    """EdgeModel read manifest.json's task without checking its content hash (compress.load refuses the edit),
    and checked only the sizes of files listed without a sha256: both load nothing unverified now."""
    path = bundle(tiny_llama(), "causal-lm", "causal", tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps(dict(manifest, task="feature-extraction")))
    with pytest.raises(ValueError, match="manifest.json: its kind, task, dtype, structure, quantization or file "
                                         "table was changed after the checkpoint was written"):
        EdgeModel(path)
    del manifest["content"]  # deleting the content hash skipped its check
    (path / "manifest.json").write_text(json.dumps(dict(manifest, task="feature-extraction")))
    with pytest.raises(ValueError, match="manifest.json: it has no content hash"):
        EdgeModel(path)
    del manifest["files"]["model.onnx"]["sha256"]  # a table without a hash to check (the content hash redone)
    manifest["content"] = content_hash(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="manifest.json lists model.onnx without a sha256"):
        EdgeModel(path)
    assert EdgeModel(path, verify=False).task == "causal-lm"


def test_deleting_the_file_table_does_not_turn_the_check_off(tmp_path):
    """EdgeModel checked the files only where the manifest had a "files" key: deleting it (no content hash
    redone) skipped the check, and an edited config.json was used. A folder with a manifest.json is checked."""
    path = bundle(tiny_llama(), "causal-lm", "causal", tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    config = path / "config.json"
    config.write_text(config.read_text().replace("{", '{"id2label": {"0": "x"}, ', 1))
    with pytest.raises(ValueError, match="manifest.json has no table of files to check"):
        EdgeModel(path)
    assert EdgeModel(path, verify=False).config["id2label"] == {"0": "x"}  # only when asked to skip it


def test_the_runner_refuses_a_file_it_reads_that_the_manifest_does_not_list_or_a_link(tmp_path):
    """compress.load refuses unlisted files; the runner read an added generation_config.json (its eos ids) or
    followed a link put where a listed file was."""
    from compress.edge import _READS

    path = bundle(tiny_llama(), "causal-lm", "causal", tmp_path)
    files = json.loads((path / "manifest.json").read_text())["files"]
    added = next(n for n in _READS if n not in files)
    (path / added).write_text("{}")
    with pytest.raises(ValueError, match=f"{added} is not in manifest.json's table of files, and the runner reads"):
        EdgeModel(path)
    (path / added).unlink()
    shutil.move(path / "config.json", tmp_path / "config.json")
    (path / "config.json").symlink_to(tmp_path / "config.json")  # same bytes, outside the folder
    with pytest.raises(ValueError, match="config.json is a link"):
        EdgeModel(path)


def test_a_graph_file_the_manifest_does_not_list_is_refused(tmp_path):
    """Given a file (DIR/other.onnx) the runner checked the folder's listed files, then ran the unlisted graph."""
    path = bundle(tiny_llama(), "causal-lm", "causal", tmp_path)
    shutil.copy(path / "model.onnx", path / "other.onnx")
    proc = subprocess.run([sys.executable, str(path / "edge_runner.py"), str(path / "other.onnx"), "hi"],
                          capture_output=True, text=True, timeout=120, env={"PYTHONDONTWRITEBYTECODE": "1", "PATH": ""})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: {path / 'other.onnx'} is not in manifest.json's table of files" in proc.stderr
    assert EdgeModel(path / "model.onnx").task == "causal-lm"  # the listed graph, named as a file
    assert EdgeModel(path / "other.onnx", verify=False).task == "causal-lm"  # unchecked only when asked


@pytest.fixture(scope="module")
def llama_bundle(tmp_path_factory):
    return bundle(tiny_llama(), "causal-lm", "causal", tmp_path_factory.mktemp("llama"))


def _rehashed(change):
    def edit(path, _):
        manifest = json.loads((path / "manifest.json").read_text())
        change(manifest["files"])
        manifest["content"] = content_hash(manifest)
        (path / "manifest.json").write_text(json.dumps(manifest))
    return edit


def _replace(name, how):
    def edit(path, outside):
        shutil.move(path / name, outside / name)
        how(path / name, outside / name)
    return edit


@pytest.mark.parametrize("edit, expected", [
    (_replace("manifest.json", lambda f, _: os.mkfifo(f)), "manifest.json is not a regular file"),  # it hung
    (_replace("manifest.json", lambda f, _: f.mkdir()), "manifest.json is not a regular file"),
    (_replace("manifest.json", lambda f, copy: f.symlink_to(copy)), "manifest.json is a link to {outside}"),
    (_replace("config.json", lambda f, _: f.mkdir()), "config.json is not a regular file"),  # "is missing"
    (_rehashed(lambda files: files["config.json"].update(size=str(files["config.json"]["size"]))),
     "manifest.json lists config.json with size '{size}', not a whole number of bytes"),
    (_rehashed(lambda files: files.update({"config.json/x": files["config.json"]})),
     "config.json/x cannot be read (Not a directory)"),
], ids=["manifest-pipe", "manifest-folder", "manifest-link-out", "listed-folder", "size-as-text", "under-a-file"])
def test_a_manifest_or_listed_file_that_is_no_regular_file_in_the_folder_is_refused(llama_bundle, tmp_path, edit,
                                                                                     expected):
    """The runner opened manifest.json without compress.checkpoint's checks: a pipe hung it, a link to a copy
    outside the folder was read, a folder was "[Errno 21] Is a directory"; a listed folder was "missing", and a
    size "678" (text) read "is 678 bytes where manifest.json says 678"."""
    path = shutil.copytree(llama_bundle, tmp_path / "bundle")
    size = (path / "config.json").stat().st_size
    outside = tmp_path / "outside"
    outside.mkdir()
    edit(path, outside)
    proc = subprocess.run([sys.executable, str(llama_bundle / "edge_runner.py"), str(path), "hi"], capture_output=True,
                          text=True, timeout=60, env={"PYTHONDONTWRITEBYTECODE": "1", "PATH": ""})
    err = proc.stderr
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"error: {path}/" + expected.format(outside=outside / "manifest.json", size=size) in err, err


def test_a_negative_max_new_tokens_is_refused_by_both_loops(tmp_path):
    """The plain loop returned the prompt for max_new_tokens < 0 while the shared-cache loop sized its buffers
    below the prompt and failed inside ONNX Runtime; both refuse it now (0 still returns the prompt)."""
    art = Artifact(kind="torch", task="causal-lm", tokenizer=tiny_tokenizer("causal"),
                   model=tiny_llama(hidden_size=64, intermediate_size=128))
    out = get("export")(max_length=24, check_seq_len=16).run(art, PassContext(task="causal-lm",
                                                                              scratch=tmp_path / "scratch"))
    path = save(out, tmp_path / "bundle")
    ids = np.arange(5, 10)[None]
    for loop in (EdgeModel(path), EdgeModel(path, shared_cache=False)):
        assert loop.generate(ids, 0).tolist() == ids.tolist()
        with pytest.raises(ValueError, match=r"max_new_tokens must be at least 0 \(got -1\)"):
            loop.generate(ids, -1)
        with pytest.raises(ValueError, match=r"max_new_tokens must be at least 0 \(got -3\)"):
            loop.generate_text("To be", -3)


def test_encoder_ids_past_the_position_table_are_refused_in_one_line(tmp_path):
    """Text is truncated to the positions an encoder holds, but ids given to logits / embed were not checked: one
    past BERT's table read its position table out of range inside ONNX Runtime ('input index out of range')."""
    for task in ("sequence-classification", "feature-extraction"):
        path = bundle(tiny_bert(task, max_position_embeddings=40), task, "encoder", tmp_path / task)
        edge = EdgeModel(path)
        assert edge.max_length == 40
        run = edge.logits if task == "sequence-classification" else edge.embed
        assert run(np.arange(5, 45)[None]).shape == ((1, 5) if task == "sequence-classification" else (1, 32))
        with pytest.raises(ValueError, match=r"41 tokens need more positions than the 40 this model holds "
                                             r"\(max_position_embeddings in config.json\): shorten the input to at "
                                             r"most 40 tokens"):
            run(np.arange(5, 46)[None])


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path):
    """A negative id was read from the end of the embedding table (ONNX Runtime's Gather wraps), silently."""
    path = bundle(tiny_bert("feature-extraction"), "feature-extraction", "encoder", tmp_path)
    edge = EdgeModel(path)
    vocab = edge.config["vocab_size"]
    assert edge.embed(np.array([[5, vocab - 1]])).shape == (1, 32)
    for bad in ([[5, -1]], [[5, vocab]]):
        with pytest.raises(ValueError, match=rf"token ids must be in 0..{vocab - 1} \(vocab_size in config.json\)"):
            edge.embed(np.array(bad))


def test_an_empty_list_of_texts_is_refused(tmp_path):
    """encode([]) made ids of shape (0,), which read as one empty row: embed_texts([]) returned one all-zero
    embedding and classify([]) failed inside ONNX Runtime; both refuse the empty list now."""
    for task in ("sequence-classification", "feature-extraction"):
        edge = EdgeModel(bundle(tiny_bert(task), task, "encoder", tmp_path / task))
        run = edge.classify if task == "sequence-classification" else edge.embed_texts
        assert len(run(["a", "b c"])) == 2
        with pytest.raises(ValueError, match="no texts given: give at least one"):
            run([])


def test_an_empty_prompt_of_ids_is_refused_by_both_loops(tmp_path):
    """generate_text refused an empty prompt, but generate / prefill given no ids failed inside ONNX Runtime
    (GroupQueryAttention 'total_sequence_length must be positive', Reshape in optimum's graph)."""
    art = Artifact(kind="torch", task="causal-lm", tokenizer=tiny_tokenizer("causal"),
                   model=tiny_llama(hidden_size=64, intermediate_size=128))
    out = get("export")(max_length=24, check_seq_len=16).run(art, PassContext(task="causal-lm",
                                                                              scratch=tmp_path / "scratch"))
    fused = save(out, tmp_path / "bundle")
    plain = bundle(tiny_llama(), "causal-lm", "causal", tmp_path / "optimum")  # head_dim 8: optimum's graph
    for loop in (EdgeModel(fused), EdgeModel(fused, shared_cache=False), EdgeModel(plain)):
        for call in (lambda: loop.generate(np.zeros((1, 0), np.int64), 4), lambda: loop.prefill(np.zeros((2, 0))),
                     lambda: loop.generate_text("", 4)):
            with pytest.raises(ValueError, match=r"the prompt is empty \(no tokens\): give some text to continue"):
                call()


def test_classify_or_embed_on_a_causal_lm_is_refused_naming_the_task(tmp_path):
    """The command line refuses --classify / --embed on a decoder, but from Python classify() failed on the
    per-position logits (TypeError: only 0-dimensional arrays ...) and embed_texts() in ONNX Runtime (missing
    past_key_values inputs)."""
    edge = EdgeModel(bundle(tiny_llama(), "causal-lm", "causal", tmp_path))
    with pytest.raises(ValueError, match="classify needs a sequence-classification model; this checkpoint is "
                                         "causal-lm"):
        edge.classify("To be")
    with pytest.raises(ValueError, match=r"this model \(causal-lm\) has no last_hidden_state output; outputs: "
                                         r"\['logits', 'present.0.key'"):
        edge.embed_texts("To be")


def test_a_manifest_naming_a_file_outside_the_folder_is_refused(tmp_path):
    """The runner hashed whatever the file table named, ../ and absolute paths included (compress.load refuses
    them): a re-hashed manifest could make it read any file on the device."""
    import hashlib

    path = bundle(tiny_llama(), "causal-lm", "causal", tmp_path)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    manifest = json.loads((path / "manifest.json").read_text())
    for name in ("../outside.bin", str(outside)):
        files = dict(manifest["files"], **{name: {"size": 6, "sha256": hashlib.sha256(b"secret").hexdigest()}})
        held = {k: manifest.get(k) for k in ("kind", "task", "dtype", "structure", "quantization")}
        held["files"] = files
        content = hashlib.sha256(json.dumps(held, sort_keys=True, default=str).encode()).hexdigest()[:20]
        (path / "manifest.json").write_text(json.dumps(dict(manifest, files=files, content=content)))
        with pytest.raises(ValueError, match="is not a plain relative path inside the checkpoint's folder"):
            EdgeModel(path)


@pytest.mark.parametrize("file, edit, field", [
    ("tokenizer_config.json", {"pad_token": ["<pad>"]}, "pad_token"),
    ("tokenizer_config.json", {"model_max_length": "512"}, "model_max_length"),
    ("generation_config.json", {"eos_token_id": {"id": 2}}, "eos_token_id"),
    ("generation_config.json", {"eos_token_id": "2"}, "eos_token_id"),
])
def test_hand_edited_settings_are_one_line_errors_under_no_verify(tmp_path, capsys, file, edit, field):
    """With --no-verify a hand-edited tokenizer_config / generation_config of the wrong types gave a TypeError
    traceback (or read "2" as an id); now exit 2 with one line naming the file and the field."""
    from compress import edge

    path = bundle(tiny_llama(), "causal-lm", "causal", tmp_path)
    target = path / file
    target.write_text(json.dumps({**(json.loads(target.read_text()) if target.exists() else {}), **edit}))
    assert edge.main([str(path), "To be", "--no-verify", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and field in err and file in err, err
