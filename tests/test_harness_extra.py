"""The harness's `extra_data` (perplexity on more corpora) and `generations` (greedy continuations of fixed
prompts), end to end on the tiny Llama: each measurement is its own subprocess (a few seconds each)."""
import json

import pytest
import torch

from benchmarks.config import BenchmarkConfig
from benchmarks.harness import measure
from benchmarks.pipeline import stored_result_path
from benchmarks.report import write_report
from compress.errors import ConfigError

MAIN = {"source": "builtin:wikipedia", "max_tokens": 300, "seq_len": 64}
SHAKES = {"source": "builtin:shakespeare", "max_tokens": 400, "seq_len": 32}
PROMPTS = ["To be, or not to be", "The king said"]
SETTINGS = BenchmarkConfig(threads=1, data=MAIN, window=64, stride=32, kl_top_k=8, latency=None,
                           extra_data={"shakes": SHAKES}, generations={"prompts": PROMPTS, "new_tokens": 6})


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-extra")


@pytest.fixture(scope="module")
def torch_record(tiny_llama_dir, work_dir):
    r = measure(str(tiny_llama_dir), backend="torch-cpu", settings=SETTINGS, baseline=str(tiny_llama_dir),
                work_dir=work_dir, label="tiny")
    assert "error" not in r and "skipped" not in r, r
    return r


def test_extra_corpus_is_scored_like_the_main_data(torch_record, tiny_llama_dir, work_dir):
    extra = torch_record["quality"]["extra_data"]["shakes"]
    # the baseline against itself, on the extra corpus too
    assert extra["top1_agreement"] == 1.0 and extra["kl"] < 1e-6
    # the same corpus as the main `data` (window and stride default to its seq_len): the same numbers
    alone = BenchmarkConfig(threads=1, data=SHAKES, kl_top_k=8, latency=None)
    r = measure(str(tiny_llama_dir), backend="torch-cpu", settings=alone, work_dir=work_dir)
    assert "error" not in r, r.get("error")
    for key in ("perplexity", "nll", "scored_tokens", "windows"):
        assert extra[key] == r["quality"][key], key
    assert torch_record["quality"]["perplexity"] != extra["perplexity"]  # the main corpus is scored apart
    assert torch_record["settings"]["extra_data"]["shakes"]["split"] == "test"  # the eval split by default


def test_torch_generations_are_transformers_greedy_generate(torch_record, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    gens = torch_record["generations"]
    assert [g["prompt"] for g in gens] == PROMPTS
    for g in gens:
        ids = torch.tensor([tok(g["prompt"])["input_ids"]])
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
        assert g["ids"] == ref[0, ids.shape[1]:].tolist()
        assert g["text"] == tok.decode(g["ids"], skip_special_tokens=True)
        assert g["stopped_at_eos"] == (tok.eos_token_id in g["ids"])
    json.dumps(torch_record)


def test_ort_generations_and_extra_perplexity_match_torch(torch_record, tiny_llama_dir, work_dir):
    r = measure(str(tiny_llama_dir), backend="ort-cpu", settings=SETTINGS, baseline=str(tiny_llama_dir),
                work_dir=work_dir)
    if "skipped" in r:
        pytest.skip(r["skipped"])
    assert "error" not in r, r.get("error")
    assert [g["ids"] for g in r["generations"]] == [g["ids"] for g in torch_record["generations"]]
    extra, ref = r["quality"]["extra_data"]["shakes"], torch_record["quality"]["extra_data"]["shakes"]
    assert extra["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-4) and extra["top1_agreement"] > 0.99
    assert r["memory"]["torch_imported"] is False  # prompts tokenized and ids decoded by the parent


def test_report_has_corpus_columns_and_generations(torch_record, tmp_path):
    base = {**torch_record, "label": "source", "is_baseline": True}
    worse = json.loads(json.dumps(torch_record))
    worse.update(label="01-quantize", is_baseline=False, backend="ort-cpu")
    worse["quality"]["extra_data"]["shakes"]["perplexity"] *= 1.5
    worse["generations"][0].update(text="something else", ids=[5, 6])
    md = write_report([base, worse], tmp_path, "demo").read_text()
    head = next(line for line in md.splitlines() if line.startswith("| checkpoint | backend | params"))
    assert "| perplexity | perplexity (shakes) |" in head and "top-1 agreement (shakes)" in head
    row = next(line for line in md.splitlines() if line.startswith("| 01-quantize | ort-cpu"))
    assert "(1.50x)" in row
    against = md.split("Against the baseline `source`", 1)[1]
    assert "perplexity (shakes): ratio" in against and "1.500x" in against
    gens = md.split("## Generations", 1)[1]
    first = gens.split("### Prompt 2", 1)[0]
    assert first.index("`source` (baseline) on torch-cpu") < first.index("`01-quantize` on ort-cpu")
    assert "To be, or not to be" in first and "something else" in first
    assert "### Prompt 2" in gens and "corpus shakes: `builtin:shakespeare`" in md
    html = (tmp_path / "report.html").read_text()
    assert "<h2>Generations</h2>" in html and "<pre>something else</pre>" in html
    assert json.loads((tmp_path / "results.json").read_text())["records"][1]["generations"][0]["ids"] == [5, 6]


@pytest.mark.parametrize("option", [{"extra_data": {"shakes": SHAKES}}, {"generations": {"prompts": PROMPTS}}])
def test_encoder_tasks_refuse_the_causal_lm_options(tiny_bert_dir, tmp_path, option):
    s = BenchmarkConfig(threads=1, latency=None, **option)
    name = next(iter(option))
    with pytest.raises(ConfigError, match=f"benchmark.{name}"):
        measure(str(tiny_bert_dir), backend="torch-cpu", settings=s, task="feature-extraction", work_dir=tmp_path)


def test_bad_options_are_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="corpus names"):
        BenchmarkConfig(extra_data={"two words": SHAKES})
    with pytest.raises(ValidationError, match="prompt is empty"):
        BenchmarkConfig(generations={"prompts": ["ok", " "]})
    with pytest.raises(ValidationError):
        BenchmarkConfig(generations={"prompts": []})


def test_stored_results_are_keyed_by_the_new_options(tiny_llama_dir, tmp_path):
    import hashlib

    plain = BenchmarkConfig(threads=1)
    # unused, the new options leave the digest as it was before they existed (stored results stay valid)
    unused = ("extra_data", "generations", "steps")
    old = {k: v for k, v in plain.model_dump(mode="json").items() if k not in unused}
    assert plain.digest() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]

    def key(settings):
        return stored_result_path(str(tiny_llama_dir), backend="torch-cpu", settings=settings, baseline=None,
                                  task="causal-lm", data=None, work_dir=tmp_path)

    variants = [plain, BenchmarkConfig(threads=1, extra_data={"shakes": SHAKES}),
                BenchmarkConfig(threads=1, extra_data={"shakes": {**SHAKES, "max_tokens": 500}}),
                BenchmarkConfig(threads=1, generations={"prompts": PROMPTS}),
                BenchmarkConfig(threads=1, generations={"prompts": PROMPTS, "new_tokens": 8})]
    assert len({key(s) for s in variants}) == len(variants)


def test_greedy_loop_stops_after_eos():
    import numpy as np

    from benchmarks.latency import greedy

    class Counting:  # logits favour token (previous + 1) % 4: from prompt [.., 1] it emits 2, 3, 0, 1, 2, ...
        steps = 0

        def prefill(self, ids, mask):
            return np.eye(4)[(ids[:, -1] + 1) % 4], None

        def decode_step(self, nxt, state):
            self.steps += 1
            return np.eye(4)[(nxt[:, 0] + 1) % 4], state

    b = Counting()
    assert greedy(b, np.array([[1]]), 8, eos=0).tolist() == [[2, 3, 0]] and b.steps == 2
    assert greedy(Counting(), np.array([[1]]), 5).tolist() == [[2, 3, 0, 1, 2]]  # no EOS: the timed loop
