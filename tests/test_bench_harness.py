"""The harness end to end on tiny models: each measurement runs in its own subprocess (a few seconds each)."""
import hashlib
import json
import re

import numpy as np
import pytest
import torch

from benchmarks.config import BenchmarkConfig
from benchmarks.harness import measure, resolve_target
from compress.checkpoint import content_hash
from compress.data import DataSpec, load_dataset

DATA = {"source": "builtin:wikipedia", "max_tokens": 600, "seq_len": 64}
# Shared by the tests so the baseline reference of tiny_llama_dir is made once (same inputs, same settings).
SETTINGS = BenchmarkConfig(threads=1, data=DATA, window=64, stride=32, kl_top_k=16,
                           latency={"warmup": 1, "repeats": 2, "new_tokens": 8, "prompt_tokens": 16})


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-work")


def plain_perplexity(model, tokenizer, max_tokens, window, stride):
    """The sliding-window loop of the Hugging Face perplexity guide, written independently of the harness."""
    ds = load_dataset(DataSpec(**DATA), "eval")
    ids = []
    for text in ds.texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= max_tokens:
            break
    ids = torch.tensor(ids[:max_tokens])[None]
    nll_sum, n_scored, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + window, ids.size(1))
        trg_len = end - prev_end
        inp = ids[:, begin:end]
        labels = inp.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(inp, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        nll_sum += float(loss) * n
        n_scored += n
        prev_end = end
        if end == ids.size(1):
            break
    return float(np.exp(nll_sum / n_scored))


def test_lm_record_matches_plain_torch(tiny_llama_dir, work_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = measure(str(tiny_llama_dir), backend="torch-cpu", settings=SETTINGS, baseline=str(tiny_llama_dir),
                work_dir=work_dir, label="tiny")
    assert "error" not in r and "skipped" not in r, r
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    q = r["quality"]
    assert q["perplexity"] == pytest.approx(plain_perplexity(model, tok, 600, 64, 32), rel=1e-5)
    assert q["scored_tokens"] == 599 and q["top1_agreement"] == 1.0 and q["kl"] < 1e-6
    # the greedy decode loop produces what transformers' generate produces
    prompt = torch.tensor(np.load(next((work_dir / "inputs").glob(f"{r['inputs_sha']}.npz")))["prompt"])
    ref = model.generate(prompt, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert r["latency"]["generated_ids"] == ref[0, 16:].tolist()
    assert r["latency"]["prefill"]["n"] == 2 and r["latency"]["decode_tokens_per_s"] > 0
    assert r["params"] == sum(p.numel() for p in model.parameters())
    assert r["memory"]["peak_rss_mb"] >= r["memory"]["rss_after_load_mb"] > 50
    assert r["threads"] == 1 and r["settings"]["threads"] == 1 and r["machine"]["cpu"]
    assert r["size_bytes"] == (tiny_llama_dir / "model.safetensors").stat().st_size
    json.dumps(r)  # JSON-able


def test_uniform_model_has_vocab_perplexity_and_disagrees(tiny_llama_dir, tmp_path, work_dir):
    from tiny_models import VOCAB, save_tiny, tiny_llama

    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()  # every hidden state is 0: logits are all 0 (tied head)
    uniform = save_tiny(model, tmp_path / "uniform")
    r = measure(str(uniform), backend="torch-cpu", settings=SETTINGS, baseline=str(tiny_llama_dir),
                work_dir=work_dir)
    q = r["quality"]
    assert q["perplexity"] == pytest.approx(VOCAB, rel=1e-5)
    assert q["top1_agreement"] < 0.2 and q["kl"] > 1e-4  # the random tiny model is itself nearly uniform


def test_ort_backend_scores_like_torch(tiny_llama_dir, work_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    plain = plain_perplexity(model, AutoTokenizer.from_pretrained(tiny_llama_dir), 600, 64, 32)
    r = measure(str(tiny_llama_dir), backend="ort-cpu", settings=SETTINGS, baseline=str(tiny_llama_dir),
                work_dir=work_dir)
    if "skipped" in r:
        pytest.skip(r["skipped"])
    assert "error" not in r, r.get("error")
    assert r["quality"]["perplexity"] == pytest.approx(plain, rel=1e-4)
    assert r["quality"]["top1_agreement"] > 0.99 and r["quality"]["kl"] < 1e-4
    assert r["exported_on_the_fly"] and r["params"] > 0
    assert r["memory"]["torch_imported"] is False  # the ORT worker's memory is ORT's alone


def test_missing_backends_give_skip_records(tiny_llama_dir, tmp_path, work_dir, monkeypatch):
    if not torch.cuda.is_available():
        r = measure(str(tiny_llama_dir), backend="torch-cuda", settings=SETTINGS, work_dir=work_dir)
        assert "CUDA is not available" in r["skipped"] and r["backend"] == "torch-cuda"
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        r = measure(str(tiny_llama_dir), backend="ort-cuda", settings=SETTINGS, work_dir=work_dir)
        assert "CUDAExecutionProvider" in r["skipped"]
    onnx_ckpt = tmp_path / "onnx-ckpt"
    onnx_ckpt.mkdir()
    (onnx_ckpt / "model.onnx").write_bytes(b"not read: the torch backend refuses ONNX checkpoints first")
    graph = {"size": (onnx_ckpt / "model.onnx").stat().st_size,
             "sha256": hashlib.sha256((onnx_ckpt / "model.onnx").read_bytes()).hexdigest()}
    manifest = {"format_version": 1, "kind": "onnx", "task": "causal-lm", "files": {"model.onnx": graph}, "key": "k"}
    (onnx_ckpt / "manifest.json").write_text(json.dumps({**manifest, "content": content_hash(manifest)}))
    r = measure(str(onnx_ckpt), backend="torch-cpu", settings=SETTINGS, work_dir=work_dir)
    assert "ONNX checkpoint" in r["skipped"]
    import compress.passes

    monkeypatch.setattr(compress.passes, "available", lambda: {})
    r = measure(str(tiny_llama_dir), backend="ort-cpu", settings=SETTINGS, work_dir=tmp_path / "w")
    assert "export pass is not available" in r["skipped"]


@pytest.mark.parametrize("task", ["sequence-classification", "feature-extraction"])
def test_encoder_records(task, tmp_path):
    from tiny_models import save_tiny, tiny_bert

    d = save_tiny(tiny_bert(task), tmp_path / task)
    s = BenchmarkConfig(threads=1, data={"source": "builtin:bbc-news", "max_examples": 12, "max_length": 48},
                        latency={"warmup": 1, "repeats": 2, "seq_tokens": 32, "throughput_batch": 4})
    r = measure(str(d), backend="torch-cpu", settings=s, baseline=str(d), task=task, work_dir=tmp_path / "w")
    assert "error" not in r, r.get("error")
    q = r["quality"]
    assert q["examples"] == 12
    if task == "sequence-classification":
        assert 0 <= q["accuracy"] <= 1 and 0 <= q["macro_f1"] <= 1 and q["label_agreement"] == 1.0
    else:
        assert q["cosine"] == pytest.approx(1.0, abs=1e-6) and q["nn_agreement"] == 1.0
    assert r["latency"]["batch1"]["n"] == 2 and r["latency"]["throughput_batch"] == 4
    assert r["latency"]["throughput_items_per_s"] > 0


@pytest.mark.parametrize("text", ["", "word"])
def test_eval_data_without_two_tokens_is_bad_input(tiny_llama_dir, tmp_path, text):
    """An empty eval file tokenized to one EOS: no perplexity window, and the worker failed with
    "IndexError: list index out of range"; now a DataSourceError before any process starts."""
    from compress.errors import DataSourceError

    (tmp_path / "eval.txt").write_text(text)
    settings = SETTINGS.model_copy(update={"data": DataSpec(source=str(tmp_path / "eval.txt"))})
    if text == "word":  # two tokens (the word and EOS) are enough for one scored target
        r = measure(str(tiny_llama_dir), backend="torch-cpu", settings=settings.model_copy(update={"latency": None}),
                    work_dir=tmp_path / "work")
        assert r["quality"]["scored_tokens"] >= 1, r
        return
    with pytest.raises(DataSourceError, match=r"eval data .*eval.txt \(all\) gives 1 token\(s\); perplexity needs "
                                              r"at least 2"):
        measure(str(tiny_llama_dir), backend="torch-cpu", settings=settings, work_dir=tmp_path / "work")


def test_empty_extra_corpus_names_its_field(tiny_llama_dir, tmp_path):
    from compress.errors import DataSourceError

    (tmp_path / "empty.txt").write_text("")
    settings = SETTINGS.model_copy(update={"extra_data": {"mine": DataSpec(source=str(tmp_path / "empty.txt"))}})
    with pytest.raises(DataSourceError, match="benchmark.extra_data.mine: "):
        measure(str(tiny_llama_dir), backend="torch-cpu", settings=settings, work_dir=tmp_path / "work")


@pytest.mark.parametrize("family,task,update,message", [
    ("gpt2", "causal-lm", {"window": 64}, "benchmark.window (--window): 64 tokens, longer than the 32 positions"),
    ("gpt2", "causal-lm", {"window": 16, "latency": {"prompt_tokens": 30, "new_tokens": 8}},
     "benchmark.latency.prompt_tokens + new_tokens (--prompt-tokens, --new-tokens): 38 tokens, longer than the 32"),
    ("bert", "sequence-classification", {"data": DataSpec(source="builtin:bbc-news", max_length=64)},
     "benchmark.data.max_length (--max-length): 64 tokens, longer than the 32 positions"),
    ("roberta", "feature-extraction", {"latency": {"seq_tokens": 32}},  # RoBERTa's table starts after padding
     "benchmark.latency.seq_tokens (--seq-tokens): 32 tokens, longer than the 31 positions"),
])
def test_sequences_longer_than_learned_positions_are_refused(tmp_path, family, task, update, message):
    """A window, prompt or encoder input past a learned position table failed in the worker with "IndexError:
    index out of range in self" (GPT-2) or a tensor size mismatch (BERT); now a ConfigError naming the option."""
    from tiny_models import save_tiny, tiny_family

    from compress.errors import ConfigError

    model = tiny_family(family, task)
    setattr(model.config, "n_positions" if family == "gpt2" else "max_position_embeddings", 32)
    save_tiny(model, tmp_path / "m", "causal" if family == "gpt2" else "encoder")
    settings = BenchmarkConfig(threads=1, **{"data": {"source": "builtin:bbc-news", "max_length": 16}, **update})
    with pytest.raises(ConfigError, match=re.escape(message) + r".*; lower it to 3[12] at most"):
        measure(str(tmp_path / "m"), backend="torch-cpu", settings=settings, task=task, work_dir=tmp_path / "w")


def test_a_window_longer_than_a_fused_graphs_max_length_is_refused(tmp_path):
    """export.max_length cuts the fused graph's rotary cache: ONNX Runtime failed in the worker past it."""
    from tiny_models import tiny_gpt2, tiny_tokenizer

    from compress.checkpoint import Artifact, save
    from compress.errors import ConfigError
    from compress.passes import PassContext, get

    art = Artifact(kind="torch", task="causal-lm", tokenizer=tiny_tokenizer(), model=tiny_gpt2())
    save(get("export")(graph="fused", max_length=24, check_seq_len=16).run(art, PassContext(scratch=tmp_path / "s")),
         tmp_path / "ck")
    settings = BenchmarkConfig(threads=1, window=32, latency=None)
    with pytest.raises(ConfigError, match=r"benchmark.window \(--window\): 32 tokens, longer than the 24 positions "
                                          r".*\(its graph \(export.max_length\) or config.json\); lower it to 24"):
        measure(str(tmp_path / "ck"), backend="ort-cpu", settings=settings, work_dir=tmp_path / "w")


def test_eval_labels_past_the_classifiers_outputs_are_refused(tmp_path):
    """A 2-label classifier scored on the 5 classes of bbc-news: accuracy and a macro-F1 over its 2 classes
    only were reported as if they meant something; now a DataSourceError naming both counts."""
    from tiny_models import save_tiny, tiny_bert

    from compress.errors import DataSourceError

    save_tiny(tiny_bert(num_labels=2), tmp_path / "m")
    settings = BenchmarkConfig(threads=1, data={"source": "builtin:bbc-news", "max_examples": 16}, latency=None)
    with pytest.raises(DataSourceError, match=r"eval data builtin:bbc-news: labels go up to 4 \(5 classes\) but "
                                              r".*/m has 2 outputs; give eval data labelled with the model's"):
        measure(str(tmp_path / "m"), backend="torch-cpu", settings=settings, work_dir=tmp_path / "w")


def test_an_onnx_checkpoint_can_be_the_baseline(tiny_llama_dir, work_dir):
    """The baseline's reference outputs were made on torch-cpu whatever the baseline was: with an ONNX baseline
    (e.g. benchmark.baseline: 02-export) every row failed with "baseline reference: AttributeError: 'NoneType'
    object has no attribute 'parameters'". An ONNX baseline's reference is now made on ort-cpu."""
    exported = measure(str(tiny_llama_dir), backend="ort-cpu", settings=SETTINGS, work_dir=work_dir)
    if "skipped" in exported:
        pytest.skip(exported["skipped"])
    onnx_dir = exported["exported_on_the_fly"]
    itself = measure(onnx_dir, backend="ort-cpu", settings=SETTINGS, baseline=onnx_dir, work_dir=work_dir)
    assert "error" not in itself, itself.get("error")
    assert itself["quality"]["top1_agreement"] == 1.0 and itself["quality"]["kl"] == pytest.approx(0, abs=1e-6)
    torch_row = measure(str(tiny_llama_dir), backend="torch-cpu", settings=SETTINGS, baseline=onnx_dir,
                        work_dir=work_dir)
    assert "error" not in torch_row, torch_row.get("error")
    assert torch_row["quality"]["top1_agreement"] > 0.99 and torch_row["quality"]["kl"] < 1e-4


def test_a_gguf_file_cannot_be_the_baseline(tiny_llama_dir, tmp_path):
    """A GGUF baseline has no tokenizer and no torch / ORT to make the reference: it ended in a traceback
    (AutoTokenizer on the .gguf path); now a ConfigError naming --baseline and the fix."""
    from compress.errors import ConfigError
    from pipelines.cli import main

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="a GGUF file cannot be the baseline .*give the model it was converted"):
        measure(str(tiny_llama_dir), backend="torch-cpu", settings=SETTINGS, baseline=str(gguf), work_dir=tmp_path)
    assert main(["bench", str(tiny_llama_dir), "--baseline", str(gguf), "--output", str(tmp_path / "o")]) == 2


@pytest.mark.parametrize("script,error", [
    ("kill -9 $$", "the measuring process was killed by SIGKILL (often the kernel's out-of-memory killer), with "
                   "nothing on stderr"),
    ("echo 'Fatal Python error: Segmentation fault' >&2; exit 139",
     "the measuring process exited with code 139:\nFatal Python error: Segmentation fault\n"),
])
def test_a_crashed_worker_gives_an_error_row_with_the_reason(tiny_llama_dir, tmp_path, monkeypatch, script, error):
    """A worker killed without a word (the OOM killer's SIGKILL) was reported as "exited with code -9 (its
    output is above)", with nothing above: stderr had been captured, and was empty."""
    import benchmarks.harness

    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\n{script}\n")
    python.chmod(0o755)
    monkeypatch.setattr(benchmarks.harness.sys, "executable", str(python))
    r = measure(str(tiny_llama_dir), backend="torch-cpu", settings=SETTINGS.model_copy(update={"quality": []}),
                work_dir=tmp_path / "w", show_progress=False)
    assert r["error"] == error and r["label"] == str(tiny_llama_dir) and "seconds" in r


def test_a_bare_onnx_folder_without_a_tokenizer_is_bad_input(tiny_llama_dir, tmp_path):
    """It failed in transformers with a traceback (AttributeError: 'NoneType' object has no attribute 'endswith')."""
    from compress.errors import ModelSourceError

    onnx_dir = tmp_path / "onnx-model"
    onnx_dir.mkdir()
    (onnx_dir / "model.onnx").write_bytes(b"")
    (onnx_dir / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    with pytest.raises(ModelSourceError, match=r"onnx-model: no tokenizer in this ONNX folder .*save_pretrained"):
        resolve_target(onnx_dir)
    (onnx_dir / "tokenizer.json").write_text((tiny_llama_dir / "tokenizer.json").read_text())
    assert resolve_target(onnx_dir).kind == "onnx"


def test_a_classifier_on_unlabelled_eval_data_says_why_it_has_no_accuracy(tmp_path):
    from tiny_models import save_tiny, tiny_bert

    d = save_tiny(tiny_bert(), tmp_path / "clf")
    (tmp_path / "eval.txt").write_text("a short news story about sport")
    s = BenchmarkConfig(threads=1, quality=["accuracy"], latency=None,
                        data={"source": str(tmp_path / "eval.txt"), "max_length": 16})
    r = measure(str(d), backend="torch-cpu", settings=s, work_dir=tmp_path / "w")
    assert "accuracy" not in r["quality"]
    assert r["notes"] == [f"accuracy not computed: eval data {tmp_path / 'eval.txt'} (all) has no labels; give "
                          "labelled data (--data, benchmark.data: a .jsonl with a label field, or builtin:bbc-news)"]


def test_named_eval_labels_go_by_the_classifiers_class_names(tmp_path):
    """Named labels were numbered by their sorted order in the file: "sport" scored as class 1 (entertainment)."""
    from benchmarks.harness import build_inputs
    from compress.errors import DataSourceError
    from tiny_models import save_tiny, tiny_bert

    names = ["business", "entertainment", "politics", "sport", "tech"]
    d = save_tiny(tiny_bert(id2label=dict(enumerate(names))), tmp_path / "clf")
    rows = [{"text": f"story {i}", "label": label} for i, label in enumerate(["sport", "business", "sport"])]
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    s = BenchmarkConfig(threads=1, latency=None, data={"source": str(tmp_path / "eval.jsonl"), "seed": 0})
    t = resolve_target(d)
    labels = build_inputs(t, s.resolved(t.task))["labels"]
    assert sorted(labels.tolist()) == [0, 3, 3]
    (tmp_path / "eval.jsonl").write_text(json.dumps({"text": "rain", "label": "weather"}))
    with pytest.raises(DataSourceError, match=r"labels \['weather'\] are not classes of .*clf \(business, "):
        build_inputs(t, s.resolved(t.task))


def test_an_extra_corpus_seq_len_change_makes_a_new_reference(tiny_llama_dir, tmp_path):
    """The baseline's reference was keyed without each extra corpus's seq_len (its scoring windows; the token
    stream stays the same): after a change the old one was reused, and the baseline against itself got a top-1
    agreement of 0.898 on that corpus, or "the baseline was scored on other tokens"."""
    for seq_len in (60, 70):
        settings = BenchmarkConfig(threads=1, data={**DATA, "max_tokens": 100}, window=64, kl_top_k=16, latency=None,
                                   extra_data={"shk": {"source": "builtin:shakespeare", "max_tokens": 100,
                                                       "seq_len": seq_len}})
        r = measure(str(tiny_llama_dir), backend="torch-cpu", settings=settings, baseline=str(tiny_llama_dir),
                    work_dir=tmp_path)
        assert "error" not in r, r["error"]
        shk = r["quality"]["extra_data"]["shk"]
        assert (shk["top1_agreement"], shk["kl"]) == (1.0, 0.0), seq_len
    assert len(list((tmp_path / "refs").glob("*.npz"))) == 2


def test_a_left_padding_tokenizer_has_all_its_tokens_scored(tmp_path):
    """The worker trims each batch's padding from the right; a tokenizer with padding_side left had its real
    tokens cut instead (some rows fed padding only). The harness now pads encoder inputs on the right."""
    from benchmarks.harness import build_inputs
    from benchmarks.worker import _batches
    from tiny_models import save_tiny, tiny_bert

    d = save_tiny(tiny_bert(), tmp_path / "clf")
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    rows = [{"text": " ".join(["to be or not"] * (1 + i % 7)) + f" {i}", "label": i % 5} for i in range(16)]
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    s = BenchmarkConfig(threads=1, latency={"seq_tokens": 32}, quality=["accuracy"], eval_batch=4,
                        data={"source": str(tmp_path / "eval.jsonl"), "split": "all", "max_length": 64})
    t = resolve_target(d)
    inputs = build_inputs(t, s.resolved(t.task))
    fed = sum(int(mask.sum()) for _, mask in _batches(inputs, 4))
    assert fed == int(inputs["attention_mask"].sum()) > 16 * 8
    cls = 3  # tiny_tokenizer("encoder")'s [CLS], each row's first token
    assert (inputs["input_ids"][:, 0] == cls).all() and (inputs["lat_ids"][:, 0] == cls).all()


def test_a_failed_export_on_the_fly_is_an_error_not_a_skip(tiny_llama_dir, tmp_path):
    """Damaged weights on ort-cpu (the export on the fly cannot load them) were filed as skipped and
    `compress bench` exited 0, where torch-cpu gives the same model an error row and exit 1."""
    import shutil

    broken = shutil.copytree(tiny_llama_dir, tmp_path / "broken")
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    r = measure(str(broken), backend="ort-cpu", settings=SETTINGS, work_dir=tmp_path / "w")
    assert "skipped" not in r
    assert r["error"].startswith(f"ort-cpu: export on the fly failed: cannot load '{broken}'"), r["error"]
