"""The distill pass on tiny real-architecture models: training, students, teachers, cache, refusals."""
import copy

import numpy as np
import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama

from compress.checkpoint import Artifact
from compress.data import DataSpec, PipelineData
from compress.errors import ConfigError
from compress.models import load_model
from compress.distill.students import fresh_student
from compress.distill.teacher_cache import TAIL_BETAS
from compress.passes import PassContext, get

FAST = dict(precision="fp32", eval_tokens=256, eval_examples=16, log_every=1, seed=0)


def lm_data(max_tokens=4096, seq_len=32):
    return PipelineData(train=DataSpec(source="builtin:shakespeare", max_tokens=max_tokens, seq_len=seq_len))


def bbc_data():
    return PipelineData(train=DataSpec(source="builtin:bbc-news", max_examples=48, max_length=48))


def art(path, task="causal-lm", label_names=None):
    m, tok = load_model(str(path), task, label_names=label_names)
    return Artifact("torch", task, tok, m)


def run(options, model, ctx):
    return get("distill")(**{**FAST, **options}).run(model, ctx)


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def trained_llama_dir(tiny_llama_dir, tmp_path_factory):
    """A tiny Llama fine-tuned on Shakespeare (alpha 0, in place), so that it has something to teach."""
    a = art(tiny_llama_dir)
    out = run(dict(alpha=0.0, max_steps=40, lr=3e-3, batch_size=8), a, PassContext(task="causal-lm", data=lm_data()))
    path = tmp_path_factory.mktemp("trained-llama")
    out.model.save_pretrained(path)
    out.tokenizer.save_pretrained(path)
    return path


def test_hard_label_training_in_place_needs_no_teacher_and_lowers_the_loss(tiny_llama_dir):
    a = art(tiny_llama_dir)
    before = weights(a.model)
    ctx = PassContext(source=None, task="causal-lm", data=lm_data())  # ctx.teacher() would raise
    out = run(dict(alpha=0.0, max_steps=20, lr=3e-3, batch_size=8), a, ctx)
    assert out.model is a.model  # the input model itself was trained
    assert any(not torch.equal(before[k], v) for k, v in out.model.state_dict().items())
    curve = out.info["loss_curve"]
    assert curve[-1]["hard"] < curve[0]["hard"] - 0.3
    assert out.info["teachers"] == [] and out.info["steps"] == 20
    assert out.info["eval_curve"][-1]["perplexity"] < 384  # better than uniform over the vocabulary


def test_same_seed_gives_identical_weights(tiny_llama_dir):
    results = []
    for _ in range(2):
        a = art(tiny_llama_dir)
        ctx = PassContext(source=str(tiny_llama_dir), task="causal-lm", data=lm_data())
        out = run(dict(student={"keep_layers": 2}, alpha=0.5, max_steps=5, lr=1e-3, batch_size=4,
                       hidden_weight=0.5), a, ctx)
        results.append(weights(out.model))
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_kd_loss_decreases_and_layer_kept_student_starts_from_teacher(trained_llama_dir):
    teacher = art(trained_llama_dir)
    ctx = PassContext(source=str(trained_llama_dir), task="causal-lm", data=lm_data())
    out = run(dict(student={"keep_layers": [0, 3]}, alpha=1.0, temperature=2.0, max_steps=30, lr=3e-3,
                   batch_size=8), teacher, ctx)
    curve = out.info["loss_curve"]
    assert curve[0]["soft"] > 0
    assert curve[-1]["soft"] < 0.7 * curve[0]["soft"]
    assert out.model.config.num_hidden_layers == 2 and out.info["kept_layers"] == [0, 3]
    assert out.info["teachers"][0]["model"] == "source"
    assert all(not p.requires_grad for p in ctx.teacher().model.parameters())


def test_kd_beats_hard_labels_on_agreement_with_the_teacher(trained_llama_dir):
    """At equal steps, soft targets bring a layer-dropped student closer to the teacher than hard labels."""
    teacher = art(trained_llama_dir).model
    ids = lm_data(max_tokens=2048).lm_windows("train", art(trained_llama_dir).tokenizer)[:16]
    with torch.no_grad():
        t_top = teacher(input_ids=ids).logits.argmax(-1)
    agreement = {}
    for alpha in (0.0, 1.0):
        ctx = PassContext(source=str(trained_llama_dir), task="causal-lm", data=lm_data())
        out = run(dict(student={"keep_layers": 1}, alpha=alpha, max_steps=30, lr=3e-3, batch_size=8),
                  art(trained_llama_dir), ctx)
        with torch.no_grad():
            agreement[alpha] = float((out.model(input_ids=ids).logits.argmax(-1) == t_top).float().mean())
    assert agreement[1.0] > agreement[0.0]


def test_teacher_cache_is_written_reused_and_invalidated(trained_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path))
    opts = dict(student={"keep_layers": 2}, alpha=0.7, max_steps=6, lr=1e-3, batch_size=4, teacher_cache=True,
                cache_top_k=16, eval_tokens=64)
    ctx = PassContext(source=str(trained_llama_dir), task="causal-lm", data=lm_data(2048))
    first = run(opts, art(trained_llama_dir), ctx)
    info = first.info["teacher_cache"]
    assert info["hit"] is False
    cache_dir = tmp_path / "teacher-cache" / info["key"]
    values, indices = np.load(cache_dir / "values.npy"), np.load(cache_dir / "indices.npy")
    tail = np.load(cache_dir / "tail.npy")
    assert values.dtype == np.float16 and indices.dtype == np.int32 and tail.dtype == np.float32
    assert values.shape == (2048 // 32, 32, 16) and tail.shape == (2048 // 32, 32, len(TAIL_BETAS))
    assert info["bytes"] >= values.nbytes + indices.nbytes + tail.nbytes
    # the cached top-k are the teacher's own top-k logits
    with torch.no_grad():
        z = ctx.teacher().model(input_ids=lm_data(2048).lm_windows("train", ctx.teacher().tokenizer)[:1]).logits
    assert torch.equal(z[0].topk(16, -1).indices, torch.from_numpy(indices[0]).long())
    rest = z[0].scatter(-1, torch.from_numpy(indices[0]).long(), float("-inf"))  # and the mass of the others
    assert torch.allclose(torch.from_numpy(tail[0, :, TAIL_BETAS.index(0.5)]), torch.logsumexp(rest / 2, -1),
                          atol=1e-4)

    # a rerun reads the cache: the teacher is never run (its forward raises)
    ctx2 = PassContext(source=str(trained_llama_dir), task="causal-lm", data=lm_data(2048))
    teacher = ctx2.teacher().model
    teacher.forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError("teacher ran despite the cache"))
    second = run(opts, art(trained_llama_dir), ctx2)
    assert second.info["teacher_cache"]["hit"] is True and second.info["teacher_cache"]["key"] == info["key"]
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(),
                                                  second.model.state_dict().values()))
    # other k, other data or another teacher -> another key
    ctx3 = PassContext(source=str(trained_llama_dir), task="causal-lm", data=lm_data(2048))
    assert run({**opts, "cache_top_k": 8}, art(trained_llama_dir), ctx3).info["teacher_cache"]["hit"] is False
    ctx4 = PassContext(source=str(trained_llama_dir), task="causal-lm", data=lm_data(1024))
    k4 = run(opts, art(trained_llama_dir), ctx4).info["teacher_cache"]
    assert k4["hit"] is False and k4["key"] != info["key"]
    ctx5 = PassContext(source=str(trained_llama_dir), task="causal-lm", data=lm_data(2048))
    with torch.no_grad():  # same source name, other weights (e.g. a model handed over as the teacher)
        ctx5.teacher().model.model.norm.weight.mul_(1.01)
    k5 = run(opts, art(trained_llama_dir), ctx5).info["teacher_cache"]
    assert k5["hit"] is False and k5["key"] != info["key"]
    # a damaged cache (a truncated file) is computed again: neither trusted nor a failure
    (cache_dir / "tail.npy").write_bytes((cache_dir / "tail.npy").read_bytes()[:200])
    ctx6 = PassContext(source=str(trained_llama_dir), task="causal-lm", data=lm_data(2048))
    k6 = run(opts, art(trained_llama_dir), ctx6).info["teacher_cache"]
    assert k6["hit"] is False and k6["key"] == info["key"]
    assert np.array_equal(np.load(cache_dir / "tail.npy"), tail)


def test_a_corrupted_teacher_cache_is_computed_again(tiny_llama_dir, tmp_path, monkeypatch, caplog):
    """Files that keep their shapes but not their contents (NaN logits, indices past the vocabulary) or a cache
    without the files' hashes are not read: the cache is computed again, with a log line saying why."""
    import json

    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path))
    opts = dict(student={"keep_layers": 2}, alpha=0.7, max_steps=2, lr=1e-3, batch_size=4, teacher_cache=True,
                cache_top_k=16, eval_tokens=64)

    def cached():
        ctx = PassContext(source=str(tiny_llama_dir), task="causal-lm", data=lm_data(1024))
        out = run(opts, art(tiny_llama_dir), ctx)
        return out.info["teacher_cache"], out.info["loss_curve"]

    info, curve = cached()
    cache_dir = tmp_path / "teacher-cache" / info["key"]
    values, indices = np.load(cache_dir / "values.npy"), np.load(cache_dir / "indices.npy")
    hashes = json.loads((cache_dir / "meta.json").read_text())["sha256"]
    assert set(hashes) == {"values", "indices", "tail"}

    def damaged(name, array, reason):
        np.save(cache_dir / f"{name}.npy", array)
        caplog.clear()
        with caplog.at_level("WARNING", logger="compress.run"):
            again, again_curve = cached()
        assert again["hit"] is False and again["key"] == info["key"]
        assert again_curve == curve  # trained on the recomputed targets, not the damaged ones
        assert np.array_equal(np.load(cache_dir / "values.npy"), values)
        assert np.array_equal(np.load(cache_dir / "indices.npy"), indices)
        lines = [r.getMessage() for r in caplog.records if "does not verify" in r.getMessage()]
        assert len(lines) == 1 and reason in lines[0] and lines[0].endswith("computing it again")

    damaged("values", np.full_like(values, np.nan), "values.npy does not match its sha256")
    damaged("indices", np.full_like(indices, 100000), "indices.npy does not match its sha256")
    meta = json.loads((cache_dir / "meta.json").read_text())
    del meta["sha256"]
    (cache_dir / "meta.json").write_text(json.dumps(meta))
    damaged("values", values, "no sha256 of values.npy")
    assert cached()[0]["hit"] is True


def test_training_reports_progress_in_the_run_log(trained_llama_dir, tmp_path, monkeypatch, caplog):
    """A run with --no-progress shows no bars: the run's log (the suite's logger) gets a status line every
    tenth of the run, one per evaluation, and whether the teacher cache was read or computed."""
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path))
    opts = dict(student={"keep_layers": 2}, alpha=0.7, max_steps=20, lr=1e-3, batch_size=4, teacher_cache=True,
                cache_top_k=16, eval_tokens=64, eval_every=5)
    ctx = PassContext(source=str(trained_llama_dir), task="causal-lm", data=lm_data(2048), show_progress=False)
    with caplog.at_level("INFO", logger="compress.run"):
        run(opts, art(trained_llama_dir), ctx)
    lines = [r.getMessage() for r in caplog.records if r.name == "compress.run"]
    steps = [line for line in lines if line.startswith("distill: step ")]
    assert [line.split()[2] for line in steps] == [f"{k}/20," for k in range(2, 21, 2)]
    assert all("loss " in line and "soft " in line and "tokens/s" in line and "left" in line for line in steps)
    evals = [line for line in lines if line.startswith("distill: evaluation at step ")]
    assert [line.split()[4] for line in evals] == ["5:", "10:", "15:", "20:"]  # eval_every, and at the end
    assert "perplexity" in evals[0] and evals[0].endswith("(best so far)")
    assert sum("teacher cache: computing the top-16 logits" in line for line in lines) == 1


def test_tokenizer_mismatch_is_refused(tiny_llama_dir, tmp_path):
    from tiny_models import tiny_llama, tiny_tokenizer

    other = tiny_tokenizer()
    other.add_tokens(["<extra-token>"])
    tiny_llama().save_pretrained(tmp_path)
    other.save_pretrained(tmp_path)
    ctx = PassContext(source=str(tiny_llama_dir), task="causal-lm", data=lm_data())
    with pytest.raises(ConfigError, match="different tokenizers"):
        run(dict(teacher=str(tmp_path), max_steps=1), art(tiny_llama_dir), ctx)
    with pytest.raises(ConfigError, match="different tokenizers"):  # every teacher of a multi-teacher list
        run(dict(teacher=[{"model": "source"}, {"model": str(tmp_path)}], max_steps=1), art(tiny_llama_dir), ctx)


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="exactly one"):
        get("distill")(student={"keep_layers": 2, "source": "builtin:smollm2-135m"})
    with pytest.raises(ConfigError, match="temperature_end"):
        get("distill")(temperature_schedule="linear")
    with pytest.raises(ConfigError, match="alpha"):
        get("distill")(alpha=1.5)
    with pytest.raises(ConfigError, match="teacher_cache keeps only"):
        get("distill")(teacher_cache=True, hidden_weight=1.0)
    with pytest.raises(ConfigError, match="single teacher"):
        get("distill")(teacher_cache=True, teacher=[{"model": "source"}, {"model": "input"}])
    with pytest.raises(ConfigError, match="temperature_end is the end of the linear schedule; set "
                       "temperature_schedule: linear or remove temperature_end"):  # else silently constant T
        get("distill")(temperature=4.0, temperature_end=1.0)
    with pytest.raises(ConfigError, match="layer_map pairs layers .* which is off; set hidden_weight or "
                       "attention_weight above 0"):
        get("distill")(layer_map={0: 3})
    assert get("distill")(layer_map={0: 3}, hidden_weight=1.0).config.layer_map == {0: 3}
    # options another setting turns off would be ignored: refused when given, never by their defaults
    with pytest.raises(ConfigError, match="distill: hidden_loss is the loss of hidden-state matching, which "
                       "hidden_weight 0 turns off; set hidden_weight above 0, or remove hidden_loss"):
        get("distill")(hidden_loss="mse")
    assert get("distill")(hidden_loss="mse", hidden_weight=1.0).config.hidden_loss == "mse"
    with pytest.raises(ConfigError, match="distill: cache_top_k sizes the teacher cache, which is off; set "
                       "teacher_cache: true or remove cache_top_k"):
        get("distill")(cache_top_k=4)
    with pytest.raises(ConfigError, match="prune.recover: cache_top_k sizes the teacher cache"):
        get("prune")(recover={"cache_top_k": 4})
    assert get("distill")(cache_top_k=4, teacher_cache=True).config.cache_top_k == 4
    with pytest.raises(ConfigError, match="tempreature|unknown option"):
        get("distill")(tempreature=2)


def test_an_empty_teacher_list_is_refused():
    """teacher: [] validated and then failed in the loss (IndexError) after loading everything."""
    with pytest.raises(ConfigError, match=r"^distill.teacher: list at least one teacher \({model, weight}\), or "
                                          r"remove teacher for the default, source \(got \[\]\)$"):
        get("distill")(teacher=[])
    assert len(get("distill")(teacher=[{"model": "source"}]).config.teacher_entries()) == 1


@pytest.mark.parametrize("overrides,message", [
    ({"num_hidden_layers": "two"}, "num_hidden_layers: 'two' is not a size"),  # were TypeError tracebacks
    ({"num_hidden_layers": 1.5}, "num_hidden_layers: 1.5 is not a size"),
    ({"num_hidden_layers": [2]}, r"num_hidden_layers: \[2\] is not a size"),
    ({"num_hidden_layers": True}, "num_hidden_layers: True is not a size"),
    ({"num_hidden_layers": -1}, "num_hidden_layers: -1 is not a size"),  # was an unrelated layout error
    ({"num_attention_heads": 0}, "num_attention_heads: 0 is not a size"),  # were ZeroDivisionErrors
    ({"hidden_size": 0}, "hidden_size: 0 is not a size"),
    ({"intermediate_size": -1}, "intermediate_size: -1 is not a size"),  # was a RuntimeError
    ({"rope_theta": "x"}, r"rope_theta: LlamaConfig with {'rope_theta': 'x'} builds no working model \(TypeError"),
    ({"hidden_act": "nope"}, r"hidden_act: LlamaConfig with .* builds no working model \(KeyError"),
])
def test_bad_fresh_student_config_values_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=rf"^distill.student.config.{message}"):
        fresh_student(tiny_llama(), overrides, "causal-lm")


def test_fresh_student_sizes_by_a_familys_own_names(tiny_gpt2_dir, tiny_llama_dir):
    """GPT-2's n_layer is its num_hidden_layers (the config's attribute_map); values that only fail together
    name the config; a bad value stops the pass before any training."""
    with pytest.raises(ConfigError, match=r"^distill.student.config.n_layer: 0 is not a size; give a positive"):
        fresh_student(tiny_gpt2(), {"n_layer": 0}, "causal-lm")
    assert fresh_student(tiny_gpt2(), {"n_layer": 1}, "causal-lm").config.n_layer == 1
    with pytest.raises(ConfigError, match=r"^distill.student.config: LlamaConfig with {'head_dim': 3, 'hidden_size': "
                                          r"32} builds no working model \(RuntimeError"):
        fresh_student(tiny_llama(), {"head_dim": 3, "hidden_size": 32}, "causal-lm")
    with pytest.raises(ConfigError, match="distill.student.config.num_attention_heads: 0 is not a size"):
        run(dict(student={"config": {"num_attention_heads": 0}}, max_steps=1), art(tiny_llama_dir),
            PassContext(source=str(tiny_llama_dir), task="causal-lm", data=lm_data()))


@pytest.mark.parametrize("seed,why", [(2**64, "less than 18446744073709551616"), (-1, "greater than or equal to 0")])
def test_a_seed_torch_cannot_take_is_refused(seed, why):
    """torch.manual_seed takes 0 to 2^64 - 1 (a negative one aliases seed + 2^64; 2^64 was a ValueError traceback
    at run time)."""
    with pytest.raises(ConfigError, match=rf"^distill.seed: Input should be {why} \(got {seed}\)$"):
        get("distill")(seed=seed)
    assert get("distill")(seed=2**64 - 1).config.seed == 2**64 - 1


def test_classifier_finetune_then_distill_from_input(tiny_bert_dir, tmp_path, monkeypatch):
    """The BBC pipeline shape: distill(alpha 0) fine-tunes the input, then distill(keep_layers, teacher input);
    from the teacher cache (top 64 of 5 classes: the whole distribution, no rest bucket) it learns the same."""
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path))
    data = bbc_data()
    names = data.dataset("train").label_names
    a = art(tiny_bert_dir, "sequence-classification", names)
    ctx = PassContext(task="sequence-classification", data=data)
    tuned = run(dict(alpha=0.0, epochs=2, batch_size=8, lr=2e-3), a, ctx)
    assert tuned.info["eval_curve"][-1]["accuracy"] >= 0.0 and tuned.info["teachers"] == []
    assert tuned.info["stopped_by"] == "epochs" and tuned.info["steps"] == tuned.info["planned_steps"]
    before = weights(tuned.model)
    student = run(dict(student={"keep_layers": 2}, teacher="input", alpha=0.9, max_steps=4, batch_size=8,
                       lr=1e-3), tuned, PassContext(task="sequence-classification", data=data))
    assert student.info["teachers"][0]["model"] == "input" and student.info["stopped_by"] == "max_steps"
    assert student.info["teachers"][0]["fingerprint"].startswith("weights:")
    assert student.model.config.num_hidden_layers == 2 and student.model.config.num_labels == 5
    assert all(torch.equal(before[k], v) for k, v in tuned.model.state_dict().items())  # teacher untouched
    hist = student.info["loss_curve"]
    assert hist[0]["soft"] > 0 and "hard" in hist[0]
    cached = run(dict(student={"keep_layers": 2}, teacher="input", alpha=0.9, max_steps=4, batch_size=8, lr=1e-3,
                      teacher_cache=True), tuned, PassContext(task="sequence-classification", data=data))
    assert cached.info["teacher_cache"]["hit"] is False
    for online, offline in zip(hist, cached.info["loss_curve"]):  # equal up to the cache's float16 logits
        assert offline["soft"] == pytest.approx(online["soft"], rel=1e-2, abs=1e-4)


def test_feature_extraction_student_with_projection(tmp_path):
    from tiny_models import save_tiny, tiny_bert

    path = save_tiny(tiny_bert("feature-extraction"), tmp_path / "fe")
    a = art(path, "feature-extraction")
    data = PipelineData(train=DataSpec(source="builtin:bbc-news", max_examples=32, max_length=32))
    ctx = PassContext(source=str(path), task="feature-extraction", data=data)
    out = run(dict(student={"config": {"hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 2,
                                       "intermediate_size": 32}},
                   hidden_weight=1.0, hidden_loss="cosine", max_steps=25, lr=5e-3, batch_size=8), a, ctx)
    assert out.model.config.hidden_size == 16 and "lm_head" not in dict(out.model.named_modules())
    curve = out.info["loss_curve"]
    assert curve[-1]["embed"] < curve[0]["embed"] and curve[-1]["hidden"] < curve[0]["hidden"]
    assert out.info["layer_map"] == {"0": 1, "1": 3}


def test_multi_teacher_attention_and_linear_temperature(tiny_llama_dir, trained_llama_dir):
    ctx = PassContext(source=str(tiny_llama_dir), task="causal-lm", data=lm_data(2048))
    a = art(tiny_llama_dir)
    impl = a.model.config._attn_implementation
    out = run(dict(student={"keep_layers": 2}, teacher=[{"model": str(trained_llama_dir), "weight": 3},
                                                         {"model": "source", "weight": 1}],
                   attention_weight=1.0, temperature=4.0, temperature_schedule="linear", temperature_end=1.0,
                   max_steps=4, batch_size=4), a, ctx)
    assert [t["weight"] for t in out.info["teachers"]] == [3.0, 1.0]
    curve = out.info["loss_curve"]
    assert curve[0]["temperature"] == 4.0 and curve[-1]["temperature"] == 1.0
    assert curve[0]["attention"] > 0
    assert impl != "eager" and out.model.config._attn_implementation == impl  # eager only while training


def test_sequence_level_distillation_trains_on_teacher_text(trained_llama_dir):
    ctx = PassContext(source=str(trained_llama_dir), task="causal-lm", data=lm_data(2048))
    out = run(dict(student={"keep_layers": 2}, alpha=0.0, teacher="source",
                   sequence_level={"prompts": 8, "prompt_tokens": 8, "new_tokens": 12}, max_steps=2, batch_size=4),
              art(trained_llama_dir), ctx)
    assert out.info["sequence_level"] == {"prompts": 8, "tokens_per_sequence": 20}
    assert out.info["train_examples"] == 8


def test_sequence_level_lengths_past_the_position_limit_are_refused(tiny_gpt2_dir):
    ctx = PassContext(source=str(tiny_gpt2_dir), task="causal-lm", data=lm_data(1024))  # 32 windows of 32
    opts = dict(alpha=0.0, max_steps=1, batch_size=4)
    with pytest.raises(ConfigError, match=r"prompt_tokens \(8\) \+ new_tokens \(300\) = 308 tokens, more than the "
                       r"teacher's 256 positions .*sequence_level.new_tokens to at most 248"):
        run({**opts, "sequence_level": {"prompts": 4, "prompt_tokens": 8, "new_tokens": 300}},
            art(tiny_gpt2_dir), ctx)
    with pytest.raises(ConfigError, match=r"= 68 tokens, more than the student's 64 positions"):  # it trains on them
        run({**opts, "student": {"config": {"n_positions": 64}},
             "sequence_level": {"prompts": 4, "prompt_tokens": 8, "new_tokens": 60}}, art(tiny_gpt2_dir), ctx)


def test_sequence_level_notes_fewer_or_shorter_prompts_than_asked(tiny_gpt2_dir):
    ctx = PassContext(source=str(tiny_gpt2_dir), task="causal-lm", data=lm_data(1024))  # 32 windows of 32
    out = run(dict(alpha=0.0, max_steps=1, batch_size=4,
                   sequence_level={"prompts": 1000, "prompt_tokens": 64, "new_tokens": 4}), art(tiny_gpt2_dir), ctx)
    assert out.info["sequence_level"] == {"prompts": 32, "tokens_per_sequence": 36, "notes": [
        "distill.sequence_level.prompts: 32 prompts, not 1000: the training data has 32 windows (more need a "
        "larger data.train.max_tokens)",
        "distill.sequence_level.prompt_tokens: prompts of 32 tokens, not 64: the training windows are 32 tokens "
        "long (distill.seq_len or data.train.seq_len)"]}


def test_pipeline_checkpoint_reloads_with_plain_from_pretrained(tiny_llama_dir, tmp_path):
    import compress
    from pipelines.config import validate
    from pipelines.runner import Runner
    from transformers import AutoModelForCausalLM

    pipe = validate({"name": "kd", "model": {"source": str(tiny_llama_dir)}, "task": "causal-lm",
                     "data": {"train": {"source": "builtin:shakespeare", "max_tokens": 2048, "seq_len": 32}},
                     "passes": [{"distill": {"student": {"keep_layers": "every_other"}, "max_steps": 3,
                                             "batch_size": 4, "precision": "fp32", "eval_tokens": 64}}],
                     "threads": 1})
    result = Runner(pipe, output_dir=tmp_path, show_progress=False, log=lambda *a: None).run()
    path = result.steps[0].path
    loaded = compress.load(path)
    plain = AutoModelForCausalLM.from_pretrained(path).eval()
    assert plain.config.num_hidden_layers == 2
    assert loaded.manifest["info"]["loss_curve"] and loaded.manifest["info"]["kept_layers"] == [0, 2]
    ids = torch.randint(5, 300, (1, 10))
    with torch.no_grad():
        assert torch.allclose(loaded.model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-6)


def test_sequences_past_the_models_positions_are_refused(tiny_gpt2_dir):
    from tiny_models import family_tokenizer, tiny_family

    gpt2 = art(tiny_gpt2_dir)  # 256 positions
    with pytest.raises(ConfigError, match=r"^distill.seq_len: 300 tokens, more than the student's 256 positions .* "
                       r"set distill.seq_len to at most 256$"):
        run(dict(seq_len=300, max_steps=1), gpt2, PassContext(source=str(tiny_gpt2_dir), task="causal-lm",
                                                               data=lm_data()))
    with pytest.raises(ConfigError, match=r"^data.train.seq_len: 300 tokens, more than the teacher's 256"):
        run(dict(student={"config": {"n_positions": 512}}, max_steps=1), gpt2,
            PassContext(source=str(tiny_gpt2_dir), task="causal-lm", data=lm_data(seq_len=300)))
    # RoBERTa's position ids start after its padding index: 260 rows hold 259 tokens
    roberta = Artifact("torch", "sequence-classification", family_tokenizer("roberta"),
                       tiny_family("roberta", "sequence-classification"))
    with pytest.raises(ConfigError, match=r"^distill.max_length: 260 tokens, more than the student's 259 positions"):
        run(dict(max_length=260, alpha=0.0, teacher="input", max_steps=1), roberta,
            PassContext(task="sequence-classification", data=bbc_data()))


def test_validate_refuses_causal_lm_only_options_on_other_tasks(tiny_bert_dir):
    from pipelines.config import validate

    def config(options):
        return {"name": "v", "model": {"source": str(tiny_bert_dir)}, "task": "sequence-classification",
                "data": {"train": {"source": "builtin:bbc-news", "max_examples": 16}},
                "passes": [{"distill": {"student": {"keep_layers": 2}, "max_steps": 1, **options}}]}

    with pytest.raises(ConfigError, match=r"passes.0 \(distill\): distill.quantize_aware: for causal LMs .* "
                       r"task is sequence-classification"):
        validate(config({"quantize_aware": {"bits": 4}}))
    with pytest.raises(ConfigError, match=r"passes.0 \(distill\): distill.sequence_level: only for causal LMs"):
        validate(config({"sequence_level": {"prompts": 4}}))
    validate(config({}))


def test_a_teacher_cache_computed_under_bf16_is_not_read_by_an_fp32_run(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path))
    opts = dict(student={"keep_layers": 2}, alpha=1.0, max_steps=1, batch_size=4, teacher_cache=True,
                cache_top_k=8, eval_tokens=64)
    ctx = lambda: PassContext(source=str(tiny_llama_dir), task="causal-lm", data=lm_data(512))  # noqa: E731
    bf16 = run({**opts, "precision": "bf16"}, art(tiny_llama_dir), ctx()).info["teacher_cache"]
    fp32 = run(opts, art(tiny_llama_dir), ctx()).info["teacher_cache"]  # FAST: precision fp32
    assert bf16["hit"] is False and fp32["hit"] is False and fp32["key"] != bf16["key"]
    assert run(opts, art(tiny_llama_dir), ctx()).info["teacher_cache"] == {**fp32, "hit": True}


def test_validation_on_a_training_split_that_holds_it_is_refused(tmp_path):
    from types import SimpleNamespace

    from compress.distill.examples import training_examples
    from compress.errors import DataSourceError
    from tiny_models import tiny_tokenizer

    (tmp_path / "d.jsonl").write_text("".join(f'{{"text": "doc {i}", "label": {i % 2}}}\n' for i in range(60)))
    ctx = SimpleNamespace(data=PipelineData(train=DataSpec(source=str(tmp_path / "d.jsonl"))))  # split: all
    config = SimpleNamespace(seq_len=None, max_length=None)
    with pytest.raises(DataSourceError, match="data.train reads split 'all', which holds its validation documents"):
        training_examples(config, ctx, tiny_tokenizer("encoder"), "sequence-classification", "validation")
    ctx = SimpleNamespace(data=PipelineData(train=DataSpec(source=str(tmp_path / "d.jsonl"), split="train")))
    assert len(training_examples(config, ctx, tiny_tokenizer("encoder"), "sequence-classification", "validation").rows) == 4
