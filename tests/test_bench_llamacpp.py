"""llama.cpp as a benchmark peer: GGUF files as targets of the llamacpp-cpu backend (llama-cpp-python is a
benchmark-only extra; the tests that run it are skipped without it)."""
import importlib.util

import numpy as np
import pytest
from gguf import GGUFWriter

import benchmarks.harness as harness
from benchmarks.config import BenchmarkConfig
from benchmarks.roofline import weight_bytes_per_token
from compress.errors import ModelSourceError

SETTINGS = BenchmarkConfig(threads=1, data={"source": "builtin:wikipedia", "max_tokens": 256, "seq_len": 64},
                           quality=["perplexity", "teacher-agreement"],
                           latency={"warmup": 1, "repeats": 2, "new_tokens": 8, "prompt_tokens": 32})
TABLE, BLOCK, HEAD = np.ones((50, 8), np.float32), np.ones((8, 8), np.float32), np.ones((50, 8), np.float32)


def write_gguf(path, with_output: bool):
    """A GGUF with a token table, one block weight and (untied) an output matrix: tensors only."""
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", TABLE)
    writer.add_tensor("blk.0.ffn_up.weight", BLOCK)
    if with_output:
        writer.add_tensor("output.weight", HEAD)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_roofline_counts_a_tied_table_and_skips_a_lookup_only_one(tmp_path):
    tied, untied = write_gguf(tmp_path / "tied.gguf", False), write_gguf(tmp_path / "untied.gguf", True)
    assert weight_bytes_per_token(tied, "gguf") == TABLE.nbytes + BLOCK.nbytes  # the tied head reads the table
    assert weight_bytes_per_token(untied, "gguf") == BLOCK.nbytes + HEAD.nbytes
    assert harness.gguf_params(untied) == TABLE.size + BLOCK.size + HEAD.size


def test_a_gguf_file_is_a_causal_lm_target_keyed_by_its_file(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", False)
    t = harness.resolve_target(str(path))
    assert (t.kind, t.task, t.path, t.loader) == ("gguf", "causal-lm", path, "checkpoint")
    assert harness.weights_size(t.path) == path.stat().st_size
    write_gguf(path, True)
    assert harness.resolve_target(str(path)).key != t.key
    with pytest.raises(ModelSourceError, match="GGUF file, a causal LM"):
        harness.resolve_target(str(path), "sequence-classification")


def test_llamacpp_runs_gguf_files_only_and_needs_a_baseline(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(harness, "backend_problem", lambda backend: None)  # as if llama-cpp-python were here
    path = str(write_gguf(tmp_path / "m.gguf", False))
    work = tmp_path / "work"
    r = harness.measure(path, backend="torch-cpu", settings=SETTINGS, baseline=str(tiny_llama_dir), work_dir=work)
    assert r["skipped"] == f"torch-cpu: {path} is a GGUF file; it runs on llamacpp-cpu"
    r = harness.measure(str(tiny_llama_dir), backend="llamacpp-cpu", settings=SETTINGS, work_dir=work)
    assert "runs GGUF files" in r["skipped"] and "is a torch model" in r["skipped"]
    r = harness.measure(path, backend="llamacpp-cpu", settings=SETTINGS, work_dir=work)
    assert "name the baseline" in r["error"]


def test_without_llama_cpp_python_the_rows_are_skipped_with_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    problem = harness.backend_problem("llamacpp-cpu")
    assert "llama-cpp-python is not installed" in problem and "pip install -e '.[llama]'" in problem


@pytest.mark.real
def test_packaged_gguf_on_llama_cpp_scores_like_its_fp32_source(tmp_path):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (benchmark-only extra: pip install -e '.[llama]')")
    from benchmarks.backends import LlamaCppBackend
    from compress.models import smollm2_gguf

    source = "builtin:smollm2-135m"
    base = harness.measure(source, backend="torch-cpu", settings=SETTINGS, baseline=source, work_dir=tmp_path)
    r = harness.measure(str(smollm2_gguf()), backend="llamacpp-cpu", settings=SETTINGS, baseline=source,
                        work_dir=tmp_path)
    assert "error" not in r and "skipped" not in r, r
    # The fp32 source is this file dequantized: llama.cpp's 4-bit dot products stay close to it.
    assert r["quality"]["perplexity"] == pytest.approx(base["quality"]["perplexity"], rel=0.02)
    assert r["quality"]["top1_agreement"] > 0.9
    assert r["latency"]["generated_ids"][:4] == base["latency"]["generated_ids"][:4]
    assert r["params"] == base["params"] and r["memory"]["torch_imported"] is False
    # timing mode (last position's logits) and scoring mode (every position's) give the same last logits
    backend = LlamaCppBackend(str(smollm2_gguf()), threads=1, context=64)
    ids = np.arange(1000, 1032, dtype=np.int64)[None]
    last, _ = backend.prefill(ids, np.ones_like(ids))
    np.testing.assert_allclose(backend.logits(ids, np.ones_like(ids))[:, -1], last, rtol=1e-3, atol=1e-3)
