"""lowrank pass: SVD exactness, rank rules, activation-aware truncation, tied embedding factorization,
fresh-process reload and ONNX export on tiny Llama, GPT-2 and BERT."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from compress import passes
from compress.checkpoint import save
from compress.errors import ConfigError
from compress.pruning.lowrank import LowRankEmbedding, LowRankLinear, build_lowrank, choose_rank, svd_factors, whitening
from test_prune import FAMILIES, art, ctx, fresh_outputs, logits  # noqa: F401  (ctx is a fixture)


def lowrank(a, ctx, **opts):
    return passes.get("lowrank")(**opts).run(a, ctx)


# ---------------------------------------------------------------------- the factorization itself
@pytest.mark.parametrize("method", ["svd", "asvd", "whiten"])
def test_full_rank_reproduces_the_layer(method):
    torch.manual_seed(0)
    lin = nn.Linear(24, 40)
    x = torch.randn(200, 24) * torch.linspace(0.1, 3, 24)
    scale = x.abs().mean(0).pow(0.5) if method == "asvd" else None
    L, L_inv = whitening(x.t() @ x / len(x)) if method == "whiten" else (None, None)
    u, s, vh = svd_factors(lin.weight, scale=scale, whiten=L)
    lr = build_lowrank(lin.weight, lin.bias, u, s, vh, 24, scale=scale, whiten_inv=L_inv)
    assert isinstance(lr, LowRankLinear) and lr.rank == 24
    torch.testing.assert_close(lr(x), lin(x), atol=1e-5, rtol=1e-5)


def test_activation_aware_keeps_what_the_data_uses():
    """At the same rank, scaling by activations (asvd) and whitening beat plain SVD on the output error
    when a few input features carry most of the signal; whitening is the optimum for that error."""
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    x = torch.randn(2000, 64) * torch.cat([torch.full((8,), 10.0), torch.full((56,), 0.3)])
    errors = {}
    for method in ["svd", "asvd", "whiten"]:
        scale = x.abs().mean(0).pow(0.5) if method == "asvd" else None
        L, L_inv = whitening(x.t() @ x / len(x)) if method == "whiten" else (None, None)
        u, s, vh = svd_factors(w, scale=scale, whiten=L)
        lr = build_lowrank(w, None, u, s, vh, 12, scale=scale, whiten_inv=L_inv)
        with torch.no_grad():
            errors[method] = (lr(x) - x @ w.t()).norm().item()
    assert errors["whiten"] < errors["asvd"] < 0.7 * errors["svd"], errors


def test_rank_rules():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert choose_rank(s, 100, 100, rank=None, energy=0.9, param_ratio=None, round_to=1) == 2
    assert choose_rank(s, 100, 100, rank=None, energy=0.99, param_ratio=None, round_to=1) == 4
    assert choose_rank(torch.ones(100), 100, 100, rank=None, energy=None, param_ratio=0.5, round_to=8) == 32
    assert choose_rank(torch.ones(100), 100, 100, rank=3, energy=None, param_ratio=None, round_to=8) == 8
    with pytest.raises(ConfigError, match="one of rank, energy, param_ratio"):
        passes.get("lowrank")(rank=4, energy=0.9)


def test_only_layers_that_save_are_factorized(ctx):
    from tiny_models import tiny_llama

    # hidden 32, MLP 64: rank 16 saves on 32x64 (16*96 < 2048, ratio 0.75) but not on 32x32 (16*64 = 1024)
    out = lowrank(art(tiny_llama()), ctx, rank=16, max_param_ratio=0.99, min_params=0)
    assert set(out.info["layers"]) == {f"model.layers.{i}.mlp.{p}" for i in range(4)
                                       for p in ("gate_proj", "up_proj", "down_proj")}
    assert "model.layers.0.self_attn.q_proj" in out.info["skipped"]
    # the default max_param_ratio (0.6) leaves the 0.75-ratio layers dense: near full rank they are slower;
    # the default min_params leaves every layer of this tiny model dense
    assert lowrank(art(tiny_llama()), ctx, rank=8).info["factorized"] == 0
    out = lowrank(art(tiny_llama()), ctx, rank=16, min_params=0)
    assert out.info["factorized"] == 0 and "note" in out.info and out.structure == []
    # an explicit rank off the round_to grid is kept rounded up, and the run says so
    out = lowrank(art(tiny_llama()), ctx, rank=12, max_param_ratio=0.99, min_params=0)
    assert {v["rank"] for v in out.info["layers"].values()} == {16}
    assert out.info["note"] == ("lowrank.rank=12 is rounded up to 16, a multiple of round_to=8 (see `layers`); "
                                "set round_to: 1 to keep rank 12")


def test_targets_and_ignore(ctx):
    from tiny_models import tiny_llama

    out = lowrank(art(tiny_llama()), ctx, rank=8, targets=["*.mlp.*"], ignore=["model.layers.3.*"], min_params=0)
    assert len(out.info["layers"]) == 9 and not any(".3." in n or "attn" in n for n in out.info["layers"])
    with pytest.raises(ConfigError, match="match no linear layer"):
        lowrank(art(tiny_llama()), ctx, targets=["nothing*"])


# ---------------------------------------------------------------------- per family: reload, export
SETTINGS = {
    "svd": dict(method="svd", rank=8, min_params=0),
    "asvd-embedding": dict(method="asvd", param_ratio=0.3, embedding_rank=16, min_params=0, calibration_samples=8),
    "whiten": dict(method="whiten", energy=0.8, min_params=0, calibration_samples=8),
}


@pytest.fixture(scope="module")
def factorized(ctx, tmp_path_factory):
    root = tmp_path_factory.mktemp("lowrank")
    built = {}
    for fam in ["llama-gqa", "gpt2", "bert"]:
        make, task = FAMILIES[fam]
        for setting, opts in SETTINGS.items():
            out = lowrank(art(make(), task), ctx, **opts)
            built[(fam, setting)] = (out, str(save(out, root / f"{fam}-{setting}")))
    return built, fresh_outputs([(p, False) for _, p in built.values()])


@pytest.mark.parametrize("fam", ["llama-gqa", "gpt2", "bert"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_reload_in_fresh_process(factorized, fam, setting):
    built, fresh = factorized
    out, path = built[(fam, setting)]
    torch.testing.assert_close(torch.tensor(fresh[path]["load"]), logits(out.model), atol=1e-5, rtol=1e-5)
    assert out.info["params_after"] < out.info["params_before"]
    types = [e["type"] for e in out.structure]
    assert "lowrank" in types
    n_lowrank = sum(isinstance(m, LowRankLinear) for m in out.model.modules())
    assert n_lowrank == out.info["factorized"] == len(out.structure[0]["ranks"]) > 0


def test_tied_embedding_factorized_once(factorized):
    out = factorized[0][("llama-gqa", "asvd-embedding")][0]
    emb = out.model.get_input_embeddings()
    assert isinstance(emb, LowRankEmbedding) and emb.weight.shape == (384, 16)
    assert out.model.get_output_embeddings().weight is emb.weight  # still tied
    assert out.info["embedding"]["tied"] is True
    # embedding 384*32 -> 384*16 + 16*32
    saved = 384 * 32 - (384 * 16 + 16 * 32)
    layer_saving = sum(
        m.in_features * m.out_features - m.rank * (m.in_features + m.out_features)
        for m in out.model.modules() if isinstance(m, LowRankLinear))
    assert out.info["params_before"] - out.info["params_after"] == saved + layer_saving


@pytest.mark.parametrize("fam", ["llama-gqa", "gpt2", "bert"])
def test_factorized_model_exports_to_onnx(factorized, ctx, fam):
    if "export" not in passes.available():
        pytest.skip("the export pass is not part of this version yet")
    out = factorized[0][(fam, "asvd-embedding")][0]
    onnx_art = passes.get("export")().run(out, ctx)
    assert onnx_art.kind == "onnx" and onnx_art.info["discrepancy"]["passed"]


def test_a_factorized_tied_table_is_stored_once_in_the_onnx_graph(factorized, ctx):
    """torch's exporter folded the tied head's transpose of the [V, r] table (and of the [r, d] projection) into
    second initializers, V x r x 4 bytes more, which optimum's tied-weight deduplication missed for the factorized
    head; the default graph falls back to optimum's for a factorized embedding, so it had them too."""
    import onnx
    from onnx import numpy_helper

    out = factorized[0][("llama-gqa", "asvd-embedding")][0]
    for graph in ["auto", "optimum"]:
        onnx_art = passes.get("export")(graph=graph).run(out, ctx)
        model = onnx.load(str(onnx_art.onnx_dir / "model.onnx"))
        assert [list(t.dims) for t in model.graph.initializer if 384 in t.dims] == [[384, 16]]
        assert onnx_art.info["tied_transposed_bytes"] == (384 * 16 + 16 * 32) * 4
        stored = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
        assert stored <= 4 * out.info["params_after"]  # every parameter once
        assert onnx_art.info["discrepancy"]["max_abs_error"] < 1e-5  # the logits are torch's


def test_prune_refuses_a_factorized_model(factorized, ctx):
    from compress.errors import UnsupportedModelError

    out = factorized[0][("llama-gqa", "svd")][0]
    with pytest.raises(UnsupportedModelError, match="run prune before lowrank"):
        passes.get("prune")(ratio=0.5).run(out, ctx)


def test_pipeline_prune_then_lowrank_then_export(tiny_llama_dir, tmp_path):
    """Through the runner and a YAML config: prune (global widths) -> lowrank -> export; the lowrank
    checkpoint carries both structure entries and reloads; a rerun reuses every step."""
    import yaml

    import compress
    from pipelines.config import load_config
    from pipelines.runner import Runner

    cfg = {"name": "pl", "model": {"source": str(tiny_llama_dir)}, "threads": 1,
           "data": {"train": {"source": "builtin:shakespeare", "max_tokens": 4000, "seq_len": 32}},
           "passes": [{"prune": {"targets": ["mlp", "heads"], "ratio": 0.5, "importance": "taylor",
                                 "ignore": ["model.layers.0.mlp"]}},
                      {"lowrank": {"method": "whiten", "rank": 8, "targets": ["*.mlp.*"], "min_params": 0}}]}
    if "export" in passes.available():
        cfg["passes"].append({"export": {}})
    path = tmp_path / "pl.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = Runner(load_config(path), output_dir=tmp_path / "runs", show_progress=False, log=lambda *_: None).run()
    assert [s.reused for s in run.steps] == [False] * len(cfg["passes"])
    art = compress.load(run.steps[1].path)
    assert [e["type"] for e in art.structure] == ["mlp_widths", "lowrank"]
    assert art.model.config.num_key_value_heads == 1
    assert isinstance(art.model.model.layers[1].mlp.down_proj, LowRankLinear)
    assert art.model.model.layers[0].mlp.gate_proj.out_features == 64
    again = Runner(load_config(path), output_dir=tmp_path / "runs", show_progress=False, log=lambda *_: None).run()
    assert all(s.reused for s in again.steps)


def test_full_rank_embedding_factors_reproduce_the_model():
    """The factorized embedding and tied head are exact at full rank (the pass itself refuses ranks that
    save nothing, so the modules are filled here directly)."""
    from tiny_models import tiny_llama

    from compress.pruning.lowrank import install_embedding

    m, ref = tiny_llama(), tiny_llama()
    u, s, vh = torch.linalg.svd(m.get_input_embeddings().weight.detach().double(), full_matrices=False)
    emb = install_embedding(m, 32)
    with torch.no_grad():
        emb.weight.copy_((u * s).float())
        emb.proj.weight.copy_(vh.t().float())
    torch.testing.assert_close(logits(m), logits(ref), atol=1e-5, rtol=1e-5)


def test_a_lowrank_step_that_factorizes_nothing_says_so_when_it_runs(tiny_llama_dir, tmp_path):
    """The run prints a pass's notes beside its 'wrote' line (not only in the manifest), and lowrank's names the
    rule the user set."""
    from pipelines.config import validate
    from pipelines.runner import Runner

    raw = {"name": "no-factors", "model": {"source": str(tiny_llama_dir)}, "threads": 1,
           "data": {"train": {"source": "builtin:shakespeare", "max_tokens": 512, "seq_len": 32}},
           "passes": [{"lowrank": {"rank": 1000, "min_params": 0}}]}
    messages = []
    Runner(validate(raw), output_dir=tmp_path, show_progress=False, log=messages.append).run()
    assert any(m.startswith("[1/1] lowrank: note: no layer was factorized: at this rank") and "lower rank" in m
               for m in messages), messages


def test_an_ignore_pattern_that_matches_no_linear_layer_is_refused(ctx):
    """A typo in `ignore` (or a block's name without '.*') would factorize the layers it meant to keep dense."""
    from tiny_models import tiny_llama

    for pattern in ["model.layer.3.*", "model.layers.3"]:
        with pytest.raises(ConfigError, match=rf"lowrank.ignore: '{pattern}' matches no linear layer.*"
                                              r"end a block's name with '\.\*'"):
            lowrank(art(tiny_llama()), ctx, rank=8, min_params=0, ignore=[pattern])
    out = lowrank(art(tiny_llama()), ctx, rank=8, min_params=0, ignore=["model.layers.3.*", "lm_head"])
    assert out.info["factorized"] == 15 and not any(".3." in n for n in out.info["layers"])


def test_orders_that_cannot_run_on_factors_are_refused_before_any_work(ctx, tmp_path):
    """prune and a second lowrank read plain linear layers: after a lowrank step (or from a factorized checkpoint)
    `validate` refuses them with the fix, instead of the run failing after the factorization."""
    import json

    from compress.checkpoint import FORMAT_VERSION, content_hash
    from pipelines.config import validate

    base = {"name": "order", "model": {"source": "builtin:smollm2-135m"}, "task": "causal-lm"}
    one = {"lowrank": {"rank": 8}}
    for passes_, message in [([one, {"prune": {}}], r"passes.1 \(prune\) needs plain linear layers, but passes.0 "
                                                    r"\(lowrank\) factorized them.*move `prune` before it"),
                             ([one, one], r"passes.1 \(lowrank\) .*keep one lowrank pass")]:
        with pytest.raises(ConfigError, match=message):
            validate({**base, "passes": passes_})
    valid = validate({**base, "passes": [{"prune": {}}, one, {"quantize": {"method": "bf16"}}]})
    assert [p.name for p in valid.passes] == ["prune", "lowrank", "quantize"]
    folder = tmp_path / "factorized"
    folder.mkdir()
    manifest = {"kind": "torch", "task": "causal-lm", "format_version": FORMAT_VERSION, "structure": [
        {"type": "lowrank_embedding", "rank": 8}], "files": {name: {"size": 1, "sha256": "0" * 64}
                                                            for name in ("config.json", "model.safetensors")}}
    (folder / "manifest.json").write_text(json.dumps({**manifest, "content": content_hash(manifest)}))
    with pytest.raises(ConfigError, match=r"passes.0 \(lowrank\) needs plain linear layers, but model.source "
                                          r"\(lowrank\) factorized them.*give the model it was factorized from"):
        validate({**base, "model": {"source": str(folder)}, "passes": [one]})
    from tiny_models import tiny_llama

    embedding_only = lowrank(art(tiny_llama()), ctx, embedding_rank=8, targets=["nothing"])
    with pytest.raises(ConfigError, match="already factorized; use one lowrank pass"):  # its proj was a target
        lowrank(embedding_only, ctx, rank=8, min_params=0)


@pytest.mark.parametrize("method", ["asvd", "whiten"])
def test_activation_aware_without_data_names_lowranks_own_fallback(method, tmp_path):
    """The error named prune's `importance: magnitude`, an option lowrank does not have."""
    from tiny_models import tiny_llama

    from compress.passes import PassContext

    with pytest.raises(ConfigError, match=rf"lowrank.method: {method} needs calibration data.*or use method: svd$"):
        lowrank(art(tiny_llama()), PassContext(scratch=tmp_path, show_progress=False), method=method)


def test_an_all_zero_layer_is_factorized_with_finite_figures(ctx, tmp_path):
    """0 / 0 energy made the layer's figure NaN, so the checkpoint could not be saved (and the energy rule left
    the layer dense); a zero matrix loses nothing at any rank."""
    from tiny_models import tiny_llama

    m = tiny_llama()
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight.zero_()
    for opts in [dict(rank=8), dict(energy=0.9)]:
        out = lowrank(art(m), ctx, min_params=0, **opts)
        assert out.info["layers"]["model.layers.0.mlp.down_proj"] == {"rank": 8, "params_ratio": 0.375, "energy": 1.0}
        save(out, tmp_path / str(opts))
    assert choose_rank(torch.zeros(4), 4, 4, rank=None, energy=0.5, param_ratio=None, round_to=1) == 1


def test_an_embedding_rank_that_saves_nothing_is_refused_before_the_layer_work(monkeypatch, tmp_path):
    """It was refused only after the calibration and every layer's SVD (minutes on a real model)."""
    from tiny_models import tiny_llama

    import compress.passes.lowrank as pass_module
    from compress.passes import PassContext

    def no_svd(*args, **kwargs):
        raise AssertionError("a layer's SVD ran before the embedding_rank check")

    monkeypatch.setattr(pass_module, "svd_factors", no_svd)
    no_data = PassContext(scratch=tmp_path, show_progress=False)  # whiten would fail on it at calibration
    for method in ["svd", "whiten"]:
        with pytest.raises(ConfigError, match="lowrank.embedding_rank=30 saves nothing for a 384 x 32 embedding; "
                                              "use a rank below 30"):
            lowrank(art(tiny_llama()), no_data, method=method, rank=8, min_params=0, embedding_rank=30)


def test_the_fused_writer_names_a_factorized_embedding_as_the_reason(ctx, tmp_path):
    """export graph: auto records why it fell back to optimum; it said 'found no the input embedding' and listed
    the block / attention / MLP names it probes, none of which was the reason."""
    from tiny_models import tiny_llama

    from compress.errors import UnsupportedModelError
    from compress.fused import build_fused

    out = lowrank(art(tiny_llama()), ctx, embedding_rank=8, targets=["nothing"])
    with pytest.raises(UnsupportedModelError, match=r"^fused export: the writers take a plain embedding table, and "
                                                    r"lowrank.embedding_rank factorized this one"):
        build_fused(out.model, tmp_path)


def test_the_nothing_factorized_note_names_round_to_when_rounding_was_the_cause(ctx):
    """rank 8 fits a 32 x 64 layer (ratio 0.375), but round_to 64 makes it 32 (ratio 1.5): the note only said
    'lower rank', which changes nothing."""
    from tiny_models import tiny_llama

    out = lowrank(art(tiny_llama()), ctx, rank=8, round_to=64, min_params=0)
    assert out.info["factorized"] == 0
    assert out.info["skipped"]["model.layers.0.mlp.up_proj"] == {"rank": 32, "params_ratio": 1.5, "rounded_up_from": 8}
    assert "rounded_up_from" not in out.info["skipped"]["model.layers.0.self_attn.k_proj"]  # 32 x 16: 8 is no saving
    assert out.info["note"].endswith("; round_to=64 rounded the ranks of 20 of them up past max_param_ratio (see "
                                     "`rounded_up_from`): lower round_to")
    assert "round_to" not in lowrank(art(tiny_llama()), ctx, rank=1000, min_params=0).info["note"]


def test_a_param_ratio_above_max_param_ratio_is_refused():
    """param_ratio 0.75 with the default max_param_ratio 0.6 left every layer dense (a note after the work)."""
    with pytest.raises(ConfigError, match=r"lowrank: param_ratio=0.75 asks for factors larger than max_param_ratio=0.6 "
                                          r"lets any layer keep; lower param_ratio or raise max_param_ratio"):
        passes.get("lowrank")(param_ratio=0.75)
    assert passes.get("lowrank")(param_ratio=0.75, max_param_ratio=0.8).config.param_ratio == 0.75


@pytest.mark.parametrize("method", ["svd", "whiten"])
def test_alpha_without_asvd_is_refused(method):
    """alpha scales asvd's activations; set under another method it would be ignored."""
    with pytest.raises(ConfigError, match=rf"lowrank: alpha applies to method: asvd .*not {method}; set method: "
                                          r"asvd or remove alpha"):
        passes.get("lowrank")(method=method, alpha=1.5)
    assert passes.get("lowrank")(method=method).config.alpha == 0.5
    assert passes.get("lowrank")(method="asvd", alpha=1.5).config.alpha == 1.5


def test_distill_recovers_a_model_with_a_factorized_embedding(ctx):
    """Training after lowrank needs only the block list, but distill mapped the whole layout, which wants a plain
    embedding table: 'found no the input embedding (get_input_embeddings() is LowRankEmbedding)'."""
    from tiny_models import tiny_llama

    out = lowrank(art(tiny_llama()), ctx, rank=8, min_params=0, embedding_rank=8)
    tuned = passes.get("distill")(alpha=0.0, max_steps=2, batch_size=2, eval_tokens=64, eval_examples=4).run(out, ctx)
    assert tuned.info["student_layers"] == 4 and tuned.structure == out.structure
    assert tuned.model.get_output_embeddings().weight is tuned.model.get_input_embeddings().weight


def test_a_classifier_head_is_left_dense_like_the_lm_head(ctx):
    """With min_params: 0 the classifier head (hidden -> num_labels: BERT's `classifier`, a decoder's `score`) was
    factorized, changing the logits directly for next to no saving; it is left dense, as the LM head is."""
    from tiny_models import tiny_bert, tiny_llama
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    llama = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=20, pad_token_id=0)).eval()
    for model, head in [(tiny_bert(num_labels=20), "classifier"), (llama, "score")]:
        a = art(model, "sequence-classification")
        out = lowrank(a, ctx, rank=1, round_to=1, min_params=0)  # rank 1 of 32 x 20 would save 92% of it
        assert out.info["factorized"] > 0 and head not in out.info["layers"] and head not in out.info["skipped"]
        assert isinstance(out.model.get_submodule(head), nn.Linear)
        assert lowrank(a, ctx, rank=1, round_to=1, min_params=0, ignore=[head]).info["factorized"] > 0  # no typo
        with pytest.raises(ConfigError, match=rf"match no linear layer \(the output head '{head}' is never factorized\)"):
            lowrank(a, ctx, rank=1, round_to=1, min_params=0, targets=[head])
    with pytest.raises(ConfigError, match=r"the output head 'lm_head' is never factorized"):
        lowrank(art(tiny_llama()), ctx, rank=8, min_params=0, targets=["lm_head"])
