"""Every model family the architecture layer maps, as a tiny random model built here, through every pass:
distill (keep-layers student) -> prune layers -> prune heads -> prune MLP -> prune hidden width -> lowrank ->
export -> int8, one chain per family and task. Every checkpoint of the chain is reloaded in ONE fresh process
(compress.load, and plain from_pretrained where the structure is stock) and must give the in-memory model's
outputs; the ONNX export must give torch's greedy tokens (decoders) or outputs (encoders). Fused projections
(Phi-3's qkv_proj / gate_up_proj, GPT-NeoX's per-head query_key_value) are checked exactly on dead structure.
An unknown layout is refused through the CLI with exit 2 and the part it could not find."""
from __future__ import annotations

import pytest
import torch
import yaml

import compress
from compress import passes
from compress.errors import ConfigError, UnsupportedModelError
from family_cases import (FUSED, IDS, OPTIONS, artifact, cases, check_onnx, context, fresh_outputs, outputs, run_pass,
                          save)
from tiny_models import ENCODERS, tiny_family

CHAIN = ("distill", "layers", "heads", "mlp", "hidden", "lowrank")
CASES = cases()
ID = [f"{f}-{t}" for f, t in CASES]


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """(family, task) -> the chain's artifacts and checkpoint paths; all torch checkpoints reloaded at once."""
    root = tmp_path_factory.mktemp("families")
    built = {}
    for fam, task in CASES:
        ctx = context(task, root / "scratch")
        a = artifact(fam, task)
        steps = [("source", a, None)]
        for key in CHAIN:
            a = run_pass(key, a, ctx, fam)
            steps.append((key, a, str(save(a, root / f"{fam}-{task}-{len(steps)}-{key}"))))
        onnx_path = save(run_pass("export", a, ctx, fam), root / f"{fam}-{task}-export")
        int8 = run_pass("int8", compress.load(onnx_path), ctx, fam)
        built[(fam, task)] = {"steps": steps, "export": onnx_path, "int8": int8,
                              "int8_path": save(int8, root / f"{fam}-{task}-int8")}
    fresh = fresh_outputs([(p, not a.structure) for b in built.values() for _, a, p in b["steps"][1:]])
    return built, fresh


@pytest.mark.parametrize("fam,task", CASES, ids=ID)
def test_every_pass_reloads_and_matches(chains, fam, task):
    built, fresh = chains
    steps = built[(fam, task)]["steps"]
    for (_, before, _), (key, out, path) in zip(steps, steps[1:]):
        got = fresh[path]
        assert "error" not in got, (key, got.get("error"))
        expected = outputs(out.model)
        torch.testing.assert_close(torch.tensor(got["load"]), expected, atol=1e-5, rtol=1e-5, msg=key)
        if not out.structure:  # stock: plain from_pretrained rebuilds it
            torch.testing.assert_close(torch.tensor(got["plain"]), expected, atol=1e-5, rtol=1e-5, msg=key)
        n_before = sum(p.numel() for p in before.model.parameters())
        assert sum(p.numel() for p in out.model.parameters()) < n_before, f"{key} removed nothing"
    final = steps[-1][1]
    from compress.architecture import find

    arch, src = find(final.model), find(steps[0][1].model)
    assert arch.num_layers() == 2  # 4 -> keep 3 (distill) -> drop 1 (depth)
    assert arch.num_heads(0) == src.num_heads(0) // 2 and arch.head_dim() == src.head_dim()
    assert arch.mlp_width(0) == src.mlp_width(0) // 2
    assert arch.hidden_size == src.hidden_size - (8 if src.hidden_size == 32 else 16)  # 25% -> round_to 8
    assert any(e["type"] == "lowrank" for e in final.structure)
    # configs that carry head_dim, and no embedding scale derived from hidden_size (Gemma's sqrt(hidden))
    # (OPT and GPT-NeoX, like GPT-2, derive head_dim from hidden_size)
    stock_hidden = fam not in ("gpt2", "gpt_neox", "pythia", "gemma", "gemma3", "opt", "stablelm", *ENCODERS)
    assert any(e["type"] == "hidden_width" for e in final.structure) != stock_hidden
    if stock_hidden:
        assert final.model.config.hidden_size == arch.hidden_size


@pytest.mark.parametrize("fam,task", CASES, ids=ID)
def test_export_matches_torch_and_int8_reloads(chains, fam, task):
    built, _ = chains
    b = built[(fam, task)]
    final = b["steps"][-1][1]
    exported = compress.load(b["export"])
    assert check_onnx(final.model, exported, task) is None
    assert (exported.info["graph"] == "fused") == (fam in FUSED), exported.info.get("note")
    assert b["int8"].info["discrepancy"]["passed"]
    back = compress.load(b["int8_path"])
    assert back.kind == "onnx" and back.quantization["method"] == "ort-int8-dynamic"


# ---------------------------------------------------------------------- families beside the chain
EXTRA_CASES = [c for c in cases(extra=True) if c not in CASES]
EXTRA_PASSES = ("mlp", "hidden", "lowrank")


def extra_passes_of(fam: str) -> tuple[str, ...]:
    """Granite-MoE's and gpt-oss's experts refuse MLP and hidden-width cuts by name
    (test_mixture_of_experts_refusals_...); their experts prune in test_experts_prune_to_the_ones_routed_to_..."""
    if fam == "xglm":  # its fixed sinusoidal positions keep the hidden width: the cut is refused by name
        return ("mlp", "lowrank")
    return ("lowrank",) if fam in ("granite_moe", "gpt_oss") else EXTRA_PASSES


@pytest.fixture(scope="module")
def extra_passes(tmp_path_factory):
    """Falcon, BLOOM, GPT-J, MPNet, DeBERTa-v2, ModernBERT: each refuses a pass of the chain (studies.family_matrix
    shows which), so MLP / hidden-width pruning and lowrank run one by one from the unpruned model and reload in
    one fresh process."""
    root = tmp_path_factory.mktemp("extra")
    built = {}
    for fam, task in EXTRA_CASES:
        ctx = context(task, root / "scratch")
        for key in extra_passes_of(fam):
            out = run_pass(key, artifact(fam, task), ctx, fam)
            built[(fam, task, key)] = (out, str(save(out, root / f"{fam}-{task}-{key}")))
    return built, fresh_outputs([(p, not out.structure) for out, p in built.values()])


@pytest.mark.parametrize("fam,task", EXTRA_CASES, ids=[f"{f}-{t}" for f, t in EXTRA_CASES])
def test_families_beside_the_chain_prune_and_reload(extra_passes, fam, task):
    built, fresh = extra_passes
    n_before = sum(p.numel() for p in artifact(fam, task).model.parameters())
    for key in extra_passes_of(fam):
        out, path = built[(fam, task, key)]
        got = fresh[path]
        assert "error" not in got, (key, got.get("error"))
        expected = outputs(out.model)
        torch.testing.assert_close(torch.tensor(got["load"]), expected, atol=1e-5, rtol=1e-5, msg=key)
        if not out.structure:
            torch.testing.assert_close(torch.tensor(got["plain"]), expected, atol=1e-5, rtol=1e-5, msg=key)
        assert sum(p.numel() for p in out.model.parameters()) < n_before, f"{key} removed nothing"


# ---------------------------------------------------------------------- fused projections: exact on dead structure
def _dead(model, fam: str, kind: str):
    from compress.architecture import find

    arch = find(model)
    hd = arch.head_dim()
    with torch.no_grad():
        for i, b in enumerate(arch.blocks):
            if kind == "heads":  # KV group 1 (query heads 2, 3) / heads 1 and 3 contribute nothing
                dead = [2, 3] if arch.num_kv_heads(i) < arch.num_heads(i) else [1, 3]
                o = model.get_submodule(b.attn.o)
                for h in dead:
                    o.weight[:, h * hd:(h + 1) * hd] = 0
            else:  # MLP channels 0..31 dead
                model.get_submodule(b.mlp.out).weight[:, :32] = 0


@pytest.mark.parametrize("fam", ["phi3", "gpt_neox", "qwen3"])
@pytest.mark.parametrize("kind", ["heads", "mlp"])
def test_fused_and_normed_projections_prune_exactly(fam, kind, tmp_path):
    a = artifact(fam, "causal-lm")
    _dead(a.model, fam, kind)
    ref = outputs(a.model)
    out = run_pass(kind, a, context("causal-lm", tmp_path))
    torch.testing.assert_close(outputs(out.model), ref, atol=1e-5, rtol=1e-5)
    if kind == "heads" and fam == "phi3":  # q, k and v rows of the kept group moved together
        cfg = out.model.config
        assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 1)
        assert out.model.model.layers[0].self_attn.qkv_proj.out_features == (2 + 2 * 1) * 8
    if kind == "mlp" and fam == "phi3":  # gate and up channels moved together
        assert out.model.model.layers[0].mlp.gate_up_proj.out_features == 2 * 32
        assert out.model.config.intermediate_size == 32


def test_hidden_width_activation_keeps_the_used_channels(tmp_path):
    """Channels of the residual stream that nothing writes and nothing reads are the ones removed."""
    a = artifact("llama", "causal-lm")
    m = a.model
    dead = list(range(8))
    for mod in m.modules():  # no epsilon, so the RMSNorm rescaling below is exact
        if hasattr(mod, "variance_epsilon"):
            mod.variance_epsilon = 0.0
    with torch.no_grad():
        m.model.embed_tokens.weight[:, dead] = 0
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight[dead] = 0
            layer.mlp.down_proj.weight[dead] = 0
    ref = outputs(m)
    out = run_pass("hidden", a, context("causal-lm", tmp_path))
    assert out.model.config.hidden_size == 24 and out.model.config.head_dim == 8
    assert out.info["hidden"]["mode"] == "config" and out.structure == []
    # RMSNorm now averages over 24 channels instead of 32 (the dead ones were zero): a known rescaling
    assert all(mod.weight.shape == (24,) for n, mod in out.model.named_modules() if n.endswith("norm"))
    scale = (32 / 24) ** 0.5
    with torch.no_grad():
        for n, mod in out.model.named_modules():
            if "norm" in n.rsplit(".", 1)[-1]:
                mod.weight.mul_(scale)
    torch.testing.assert_close(outputs(out.model), ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------- refusal
def test_unknown_layout_is_refused_through_the_cli(tmp_path, capsys):
    from transformers import MambaConfig, MambaForCausalLM

    from pipelines.cli import main
    from tiny_models import tiny_tokenizer

    model = MambaForCausalLM(MambaConfig(vocab_size=384, hidden_size=32, state_size=4, num_hidden_layers=2))
    model.save_pretrained(tmp_path / "mamba")
    tiny_tokenizer().save_pretrained(tmp_path / "mamba")
    cfg = {"name": "mamba", "model": {"source": str(tmp_path / "mamba")}, "task": "causal-lm",
           "data": {"train": {"source": "builtin:shakespeare", "max_tokens": 2000, "seq_len": 16}},
           "passes": [{"prune": {"targets": ["mlp"], "importance": "magnitude"}}]}
    path = tmp_path / "mamba.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--output-dir", str(tmp_path / "runs"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot map the layout of MambaForCausalLM: found no attention projections in block 0" in err


def test_unmapped_family_names_the_part():
    from compress.architecture import find
    from compress.errors import UnsupportedModelError

    m = tiny_family("llama")
    for layer in m.model.layers:  # an MLP under names the layer does not know
        layer.mlp.w_in, layer.mlp.w_out = layer.mlp.gate_proj, layer.mlp.down_proj
        del layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj
    with pytest.raises(UnsupportedModelError, match="found no MLP projections in block 0"):
        find(m)
    assert IDS.shape == (2, 10)


def test_hidden_options_are_checked():
    from compress import passes

    with pytest.raises(ConfigError, match="apply to targets: \\[hidden\\]"):
        passes.get("prune")(targets=["mlp"], hidden_size=16)
    with pytest.raises(ConfigError, match="one of hidden_size, hidden_ratio"):
        passes.get("prune")(targets=["hidden"], hidden_size=16, hidden_ratio=0.5)
    with pytest.raises(ConfigError, match="taylor is not offered"):
        passes.get("prune")(targets=["hidden"], importance="taylor").run(artifact("llama", "causal-lm"), None)


def test_hidden_width_after_per_layer_mlp_widths_reloads(tmp_path):
    """Global MLP pruning gives each layer its own width (an mlp_widths entry the config cannot hold); hidden
    pruning in the same pass then records a hidden_width entry too instead of editing the config, and the
    checkpoint reloads to the same outputs."""
    a = artifact("llama", "causal-lm")
    ctx = context("causal-lm", tmp_path)
    out = compress.passes.get("prune")(targets=["mlp", "hidden"], ratio=0.5, scope="global").run(a, ctx)
    assert [e["type"] for e in out.structure] == ["mlp_widths", "hidden_width"]
    assert out.info["hidden"]["mode"] == "structure"
    path = save(out, tmp_path / "pruned")
    torch.testing.assert_close(outputs(compress.load(path).model), outputs(out.model))


def test_hidden_ratio_that_leaves_nothing_names_hidden_ratio(tmp_path):

    with pytest.raises(ConfigError, match=r"prune.hidden_ratio=0.99 would leave no hidden channels .*smaller "
                                          "hidden_ratio"):
        compress.passes.get("prune")(targets=["hidden"], hidden_ratio=0.99).run(
            artifact("llama", "causal-lm"), context("causal-lm", tmp_path))


def test_prune_refuses_a_cut_the_modeling_code_cannot_run(tmp_path):
    """MPNet adds one relative position bias for all heads, computed once for the model from the config's head
    count: with half the heads in a layer the pruned model cannot run, so prune refuses (it handed on a model
    that crashed in its first forward; StableLM did so until its attention width followed the kept heads)."""
    task = "sequence-classification"
    with pytest.raises(UnsupportedModelError, match=r"prune targets heads: the pruned MPNetForSequenceClassification "
                       r"fails its forward pass \(RuntimeError: The size of tensor .*prune other targets"):
        run_pass("heads", artifact("mpnet", task), context(task, tmp_path), "mpnet")


@pytest.mark.parametrize("share_att_key", [True, False])
def test_deberta_heads_with_its_relative_position_projections(tmp_path, share_att_key):
    """DeBERTa's prune_heads is a stub that raises, so its heads were refused; they are now cut like the decoders'
    (query / key / value rows, the output's columns, and without share_att_key the relative-position
    projections pos_key_proj / pos_query_proj, per head too) and recorded as an attention_heads entry."""
    from compress.checkpoint import Artifact
    from tiny_models import family_tokenizer

    task = "sequence-classification"
    art = artifact("deberta_v2", task)
    if not share_att_key:
        art.model.config.share_att_key = False
        torch.manual_seed(0)
        art = Artifact(kind="torch", task=task, tokenizer=family_tokenizer("deberta_v2"),
                       model=type(art.model)(art.model.config).eval())
    out = run_pass("heads", art, context(task, tmp_path), "deberta_v2")
    attn = out.model.deberta.encoder.layer[0].attention.self
    assert attn.num_attention_heads == 2 and attn.query_proj.out_features == 16 and attn.all_head_size == 16
    assert [e["type"] for e in out.structure] == ["attention_heads"]
    if not share_att_key:
        assert attn.pos_key_proj.out_features == attn.pos_query_proj.out_features == 16
    back = compress.load(save(out, tmp_path / "deberta-heads"))
    torch.testing.assert_close(outputs(back.model), outputs(out.model))
    assert sum(p.numel() for p in back.model.parameters()) < sum(p.numel() for p in art.model.parameters())
    # the hidden width after: the relative-position projections read it too (they kept 32 inputs and failed)
    narrow = run_pass("hidden", out, context(task, tmp_path / "hidden"), "deberta_v2")
    if not share_att_key:
        assert narrow.model.deberta.encoder.layer[0].attention.self.pos_key_proj.in_features == 24
    back = compress.load(save(narrow, tmp_path / "deberta-heads-hidden"))
    torch.testing.assert_close(outputs(back.model), outputs(narrow.model))


def _tiny_moe(family: str):
    """Mixtral (4 experts, top 2), Qwen2-MoE (a shared expert beside them, block 1 dense: mlp_only_layers), OLMoE,
    Granite-MoE (every expert's weights in two [experts, out, in] tensors, no ModuleList), gpt-oss (such tensors with
    biases, a router of its own with a bias)."""
    import transformers as T

    from tiny_models import VOCAB

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    if family == "mixtral":
        return tiny_family("mixtral")
    if family == "qwen2_moe":
        return T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**common, intermediate_size=64, moe_intermediate_size=16,
                                                      shared_expert_intermediate_size=32, num_experts=4,
                                                      mlp_only_layers=[1])).eval()
    if family == "granite_moe":
        return T.GraniteMoeForCausalLM(T.GraniteMoeConfig(**common, intermediate_size=16, num_local_experts=4)).eval()
    if family == "gpt_oss":
        return tiny_family("gpt_oss")
    return T.OlmoeForCausalLM(T.OlmoeConfig(**common, intermediate_size=16, num_experts=4)).eval()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe", "granite_moe", "gpt_oss"])
def test_experts_prune_to_the_ones_routed_to_and_reload_stock(family, tmp_path):
    """Mixture-of-experts blocks are mapped (router + experts; the map used to take expert 0 for the block's MLP,
    then refused them): prune targets experts keeps, in every block, the experts the router gives the largest
    share of calibration tokens, slices the router's rows and states the new count in the stock config. An
    expert the router never picks goes first."""
    from compress.architecture import find
    from compress.checkpoint import Artifact
    from tiny_models import family_tokenizer

    model = _tiny_moe(family)
    arch = find(model)
    moe = arch.moe_blocks()
    assert moe == ([0, 2, 3] if family == "qwen2_moe" else [0, 1, 2, 3])
    def never_3(mod, args, out):  # expert 3 of the first block is never routed to (a no-op once it is cut)
        if out.shape[-1] == 4:
            out = out.clone()
            out[..., 3] = -1e4
        return out

    router = model.get_submodule(arch.blocks[0].mlp.router)
    if getattr(router, "bias", None) is not None:  # gpt-oss's router returns its top-k, not its logits
        with torch.no_grad():
            router.bias[3] = -1e4
    else:
        router.register_forward_hook(never_3)
    art = Artifact(kind="torch", task="causal-lm", tokenizer=family_tokenizer("llama"), model=model)
    out = passes.get("prune")(targets=["experts"], ratio=0.5).run(art, context("causal-lm", tmp_path))
    info = out.info["experts"]
    assert info["kept"] == 2 and info["of"] == 4 and 3 not in info["experts"]["0"]
    assert out.structure == [] and find(out.model).num_experts(moe[0]) == 2
    assert min(info["routing_share_kept"].values()) > 0.5  # the better half of the routing
    back = compress.load(save(out, tmp_path / family))
    torch.testing.assert_close(outputs(back.model), outputs(out.model))
    assert sum(p.numel() for p in back.model.parameters()) < sum(p.numel() for p in model.parameters())


def test_mixture_of_experts_refusals_name_the_experts(tmp_path):
    """What cuts a dense MLP is refused on experts, naming them; fewer experts than each token is routed to, and
    experts on a dense model, name the fix."""
    art, ctx = artifact("mixtral", "causal-lm"), context("causal-lm", tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"prune targets mlp: block 0's MLP is a mixture of 4 experts "
                       r"\(model\.layers\.0\.block_sparse_moe\.experts\), .* prune experts, heads or layers"):
        run_pass("mlp", art, ctx, "mixtral")
    with pytest.raises(ConfigError, match=r"prune.ratio=0.75 would keep 1 of 4 experts per block, fewer than the 2 "
                       r"each token is routed to .* at most 0.50"):
        passes.get("prune")(targets=["experts"], ratio=0.75).run(art, ctx)
    with pytest.raises(ConfigError, match="prune.targets: experts, but LlamaForCausalLM has no mixture-of-experts"):
        passes.get("prune")(targets=["experts"]).run(artifact("llama", "causal-lm"), ctx)


def test_layers_heads_and_students_of_a_mixture_of_experts(tmp_path):
    """Depth and head pruning and keep-layers students need only the block list and the attention, which a
    mixture-of-experts model has like any other: they were refused with the rest."""
    art, ctx = artifact("mixtral", "causal-lm"), context("causal-lm", tmp_path)
    for key in ("layers", "heads", "distill"):
        out = run_pass(key, art, ctx, "mixtral")
        back = compress.load(save(out, tmp_path / key))
        torch.testing.assert_close(outputs(back.model), outputs(out.model), msg=key)
        assert sum(p.numel() for p in out.model.parameters()) < sum(p.numel() for p in art.model.parameters())


def test_gpt_oss_heads_keep_their_sinks_and_export_fused(tmp_path):
    """gpt-oss adds a sink logit per query head to each softmax: head pruning left the sinks at the old head
    count (the pruned model failed its forward pass); now the kept heads keep theirs, the stock config reloads it,
    and the pruned model's fused graph (the sinks as GroupQueryAttention's head_sink, the experts as MoE with their
    biases) gives torch's greedy tokens. A depth-pruned one keeps its layers' sliding / full pattern."""
    art, ctx = artifact("gpt_oss", "causal-lm"), context("causal-lm", tmp_path)
    with torch.no_grad():  # sinks and biases away from their zero init, so a dropped or misplaced one shows
        for name, p in art.model.named_parameters():
            if name.endswith(("sinks", "bias")):
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    sinks = art.model.model.layers[0].self_attn.sinks.detach().clone()
    out = run_pass("heads", art, ctx, "gpt_oss")
    assert out.structure == [] and out.model.config.num_attention_heads == 2
    kept = out.model.model.layers[0].self_attn.sinks
    assert kept.shape == (2,) and any(torch.equal(kept, sinks[rows]) for rows in ([0, 1], [2, 3]))
    back = compress.load(save(out, tmp_path / "heads"))
    torch.testing.assert_close(outputs(back.model), outputs(out.model))
    exported = run_pass("export", out, ctx, "gpt_oss")
    assert exported.info["graph"] == "fused" and exported.info["fused"]["ops"]["MoE"] == 4
    assert check_onnx(out.model, exported, "causal-lm") is None
    layers = run_pass("layers", artifact("gpt_oss", "causal-lm"), ctx, "gpt_oss")
    assert len(layers.model.config.layer_types) == layers.model.config.num_hidden_layers == 3


def test_a_class_that_keeps_bf16_parameters_casts_and_reloads_as_it_is(tmp_path):
    """Apertus' xIELU keeps its parameters in bfloat16 whatever the model's dtype: the passes' model.float() cast
    them too, so a pruned model differed from its reload (3.6e-5 on the logits); building the class on the meta
    device to learn its dtypes (the bf16 cast) failed on it (its init reads a value). Now the passes keep such
    tensors as loaded and the bf16 cast falls back to casting them all."""
    art, ctx = artifact("apertus", "causal-lm"), context("causal-lm", tmp_path)
    out = run_pass("mlp", art, ctx, "apertus")
    assert out.model.model.layers[0].mlp.act_fn.alpha_p.dtype == torch.bfloat16
    back = compress.load(save(out, tmp_path / "mlp"))
    torch.testing.assert_close(outputs(back.model), outputs(out.model), atol=0, rtol=0)
    half = passes.get("quantize")(method="bf16").run(artifact("apertus", "causal-lm"), ctx)
    assert half.model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_a_rotary_layer_with_small_outputs_is_not_taken_for_one_without_positions(tmp_path):
    """Arcee with heads pruned then low-rank: layer 0's attention output moved by less than the probe's slack
    when its rotation was taken away, so the writer wrote it without rotary positions, the self-check refused the
    graph (logits 1.2e-3 away) and export fell back to optimum's. Only an output equal to rounding now means a
    layer reads no positions."""
    from compress.architecture import find
    from compress.fused.graph import layer_rotaries

    ctx = context("causal-lm", tmp_path)
    art = run_pass("lowrank", run_pass("heads", artifact("arcee", "causal-lm"), ctx, "arcee"), ctx, "arcee")
    assert all(r is not None for r in layer_rotaries(art.model, find(art.model)))
    exported = run_pass("export", art, ctx, "arcee")
    assert exported.info["graph"] == "fused" and exported.info["fused"]["layers_without_rotary"] == []
    assert check_onnx(art.model, exported, "causal-lm") is None


def test_a_block_part_the_writer_does_not_write_is_named(tmp_path):
    """Granite-MoE-shared adds a shared_mlp beside its experts: the refusal said only that the block is not wired
    as the writer writes; now it names the module."""
    import transformers as T

    from compress.errors import UnsupportedModelError
    from compress.fused import build_fused
    from tiny_models import VOCAB

    model = T.GraniteMoeSharedForCausalLM(T.GraniteMoeSharedConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=48)).eval()
    with pytest.raises(UnsupportedModelError, match="block model.layers.0 holds shared_mlp beside its attention"):
        build_fused(model, tmp_path)


def test_mlp_widths_recorded_where_the_config_has_no_width_field(tmp_path):
    """Bloom's MLP is always 4 x hidden (no intermediate_size): the pruned width went into a config field Bloom
    ignores and the checkpoint did not reload. Now an mlp_widths entry carries it."""
    out = run_pass("mlp", artifact("bloom", "causal-lm"), context("causal-lm", tmp_path), "bloom")
    assert out.structure == [{"type": "mlp_widths", "widths": [64] * 4}]
    assert "intermediate_size" not in out.model.config.to_dict()
    back = compress.load(save(out, tmp_path / "bloom-mlp"))
    torch.testing.assert_close(outputs(back.model), outputs(out.model))


def test_hidden_width_of_a_config_whose_head_dim_is_read_only(tmp_path):
    """Falcon's config.head_dim is a property (hidden_size / heads): prune hidden crashed setting it
    (AttributeError); now its config cannot express the cut and a hidden_width entry carries it."""
    out = run_pass("hidden", artifact("falcon", "causal-lm"), context("causal-lm", tmp_path), "falcon")
    assert [e["type"] for e in out.structure] == ["hidden_width"] and out.info["hidden"]["hidden_size"] == [32, 24]
    back = compress.load(save(out, tmp_path / "falcon-hidden"))
    torch.testing.assert_close(outputs(back.model), outputs(out.model))


def test_falcon_multi_query_mapped(tmp_path):
    """Falcon-7B packs [q heads | k | v] of one KV head into query_key_value: it was taken for GPT-NeoX's per-head
    [q k v] (4 KV heads, rows past the weight's end); its MLP width lives in ffn_hidden_size."""
    from compress.architecture import find

    d = find(tiny_family("falcon")).describe()
    assert (d["attention"], d["heads"], d["kv_heads"], d["head_dim"]) == ("blocks", 4, 1, 8)
    out = run_pass("mlp", artifact("falcon", "causal-lm"), context("causal-lm", tmp_path), "falcon")
    assert out.structure == [] and out.model.config.ffn_hidden_size == 64  # stock: from_pretrained rebuilds it
    back = compress.load(save(out, tmp_path / "falcon-mlp"))
    torch.testing.assert_close(outputs(back.model), outputs(out.model))


def test_falcon_grouped_kv_heads_prune_and_export_fused(tmp_path):
    """Falcon-40B / Falcon2 pack query_key_value per KV head as [its q heads, k, v], and normalize both sublayers'
    inputs before the attention (ln_attn, ln_mlp). The packing was refused by name (nothing could be pruned), the
    block's wiring by the fused writer, and optimum's exporter fails on it: no ONNX at all. Now the rows map as
    "grouped", head pruning keeps whole KV groups in that packing and reloads, and the pruned model's fused graph
    gives torch's greedy tokens."""
    from compress.architecture import find
    from compress.pruning.width import check_qkv_rows

    art = artifact("falcon_40b", "causal-lm")
    arch = find(art.model)
    d = arch.describe()
    assert (d["attention"], d["heads"], d["kv_heads"], d["head_dim"]) == ("grouped", 4, 2, 16)
    q, k, v = arch.qkv_rows(0)  # groups of (2 q + k + v) x 16 rows
    assert (q[:, 0].tolist(), k[:, 0].tolist(), v[:, 0].tolist()) == ([0, 16, 64, 80], [32, 96], [48, 112])
    check_qkv_rows(art.model, arch)  # zeroing the rows it calls v leaves the output projection zeros
    ctx = context("causal-lm", tmp_path)
    out = run_pass("heads", art, ctx, "falcon_40b")
    assert out.structure == [{"type": "attention_heads", "heads": [2] * 4, "kv_heads": [1] * 4}]
    back = compress.load(save(out, tmp_path / "falcon-40b-heads"))
    torch.testing.assert_close(outputs(back.model), outputs(out.model))
    exported = run_pass("export", out, ctx, "falcon_40b")
    assert exported.info["graph"] == "fused" and exported.info["fused"]["parallel_residual"]
    assert check_onnx(out.model, exported, "causal-lm") is None


def test_cohere_per_head_qk_norms_prune_and_export_fused(tmp_path):
    """Cohere's q / k norms are LayerNorms of each head's slice with gains per head ([heads, head_dim]): head
    pruning left those gains at the old head count (the pruned model failed its forward pass, refused), and the
    fused writer refused them (export fell back to optimum's graph). Now pruning keeps the kept heads' gains and
    reloads, and the pruned model's fused graph gives torch's greedy tokens."""
    art = artifact("cohere", "causal-lm")
    with torch.no_grad():  # gains other than ones, different per head: a graph that shared or dropped them differs
        for name, p in art.model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(len(name))) + 0.5)
    q_norm = art.model.model.layers[0].self_attn.q_norm.weight
    ctx = context("causal-lm", tmp_path)
    out = run_pass("heads", art, ctx, "cohere")
    assert out.structure == [] and out.model.config.num_key_value_heads == 1  # stock: the config says the heads
    kept = out.model.model.layers[0].self_attn.q_norm.weight
    assert kept.shape == (2, 16) and any(torch.equal(kept, q_norm[rows]) for rows in ([0, 1], [2, 3]))
    back = compress.load(save(out, tmp_path / "cohere-heads"))
    torch.testing.assert_close(outputs(back.model), outputs(out.model))
    exported = run_pass("export", out, ctx, "cohere")
    assert exported.info["graph"] == "fused"
    assert exported.info["fused"]["ops"]["LayerNormalization"] == 1 + 2 * 4  # block 0's input, q and k in each
    assert check_onnx(out.model, exported, "causal-lm") is None


def test_hidden_width_keeps_gemmas_embedding_scale(tmp_path):
    """Gemma feeds block 0 the embeddings times sqrt(config.hidden_size): a stock config with the narrower width
    silently changed that scale (sqrt(32) -> sqrt(24)); Gemma 3 computes it once at build, so its checkpoint
    reloaded with other outputs. Now the config keeps its width and a hidden_width entry carries the cut."""
    from compress.architecture import find

    out = run_pass("hidden", artifact("gemma", "causal-lm"), context("causal-lm", tmp_path), "gemma")
    assert [e["type"] for e in out.structure] == ["hidden_width"] and out.model.config.hidden_size == 32
    seen = []
    find(out.model).layers()[0].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    outputs(out.model)
    table = out.model.get_input_embeddings().weight
    torch.testing.assert_close(seen[0], table[IDS] * 32 ** 0.5)
    back = compress.load(save(out, tmp_path / "gemma-hidden"))
    torch.testing.assert_close(outputs(back.model), outputs(out.model))


def test_optimum_trace_failure_is_a_clear_refusal(tmp_path):
    """Falcon-40B's grouped KV heads: optimum's dummy cache has the query head count and the trace fails inside
    the model (a RuntimeError traceback); now one message, with the way out."""
    from tiny_models import _family_specs

    cfg_cls, classes, kwargs = _family_specs()["falcon"]
    art = artifact("falcon", "causal-lm")
    art.model = classes["causal-lm"](cfg_cls(**kwargs, new_decoder_architecture=True, num_kv_heads=2)).eval()
    with pytest.raises(UnsupportedModelError, match=r"export: optimum's exporter fails on this falcon model for "
                       r"text-generation-with-past \(RuntimeError: .*with_past: false"):
        run_pass("export", art, context("causal-lm", tmp_path), "falcon")


def test_one_kv_group_points_to_gqa_query(tmp_path):
    """Multi-query (Falcon-7B, StarCoder): ratio 0.5 of one KV group leaves none, and the advice was only "use a
    smaller ratio", which removes nothing; gqa: query (named now) removes query heads and reloads."""
    from compress.errors import ConfigError

    ctx = context("causal-lm", tmp_path)
    with pytest.raises(ConfigError, match=r"would leave no KV groups \(of 1\); use a smaller ratio or gqa: query"):
        run_pass("heads", artifact("falcon", "causal-lm"), ctx, "falcon")
    out = passes.get("prune")(**dict(OPTIONS["heads"][1], gqa="query")).run(artifact("falcon", "causal-lm"), ctx)
    assert out.structure == [{"type": "attention_heads", "heads": [2] * 4, "kv_heads": [1] * 4}]
    back = compress.load(save(out, tmp_path / "falcon-heads"))
    torch.testing.assert_close(outputs(back.model), outputs(out.model))


def test_hidden_width_narrows_weightless_norms(tmp_path):
    """OLMo's LayerNorms have no weight, only normalized_shape: the cut left them at 32 and the pruned model
    could not run (refused). Now their shape follows and the stock config reloads it."""
    out = run_pass("hidden", artifact("olmo", "causal-lm"), context("causal-lm", tmp_path), "olmo")
    assert out.structure == [] and out.model.config.hidden_size == 24
    assert out.model.model.norm.normalized_shape == (24,)
    back = compress.load(save(out, tmp_path / "olmo-hidden"))
    torch.testing.assert_close(outputs(back.model), outputs(out.model))


def test_hidden_activation_importance_reads_weightless_norms():
    """Hidden-width importance by activation is read at the norms' outputs; OLMo's weightless norms were not
    found, so every channel scored 0 and the cut kept the first ones, whatever they carried."""
    from compress.architecture import find
    from compress.pruning.hidden import activation_scores, norms

    model = artifact("olmo", "causal-lm").model
    arch = find(model)
    assert len(norms(arch)) == 2 * arch.num_layers() + 1
    scores = activation_scores(model, arch, [{"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}], "causal-lm")
    assert scores.shape == (arch.hidden_size,) and bool((scores > 0).all())


def test_hidden_width_of_embeddings_narrower_than_the_blocks(tmp_path):
    """ELECTRA's embeddings are 16 wide and embeddings_project maps them to the 32-wide residual stream: the
    layout took 16 as the hidden size and prune hidden crashed in calibration (RuntimeError, size 16 vs 32)."""
    from compress.checkpoint import Artifact
    from tiny_models import tiny_tokenizer

    a = artifact("electra", "sequence-classification")
    a = Artifact(kind="torch", task=a.task, tokenizer=tiny_tokenizer("encoder"), model=a.model)
    out = run_pass("hidden", a, context("sequence-classification", tmp_path), "electra")
    assert out.info["hidden"]["hidden_size"] == [32, 24]
    assert out.model.electra.embeddings.word_embeddings.weight.shape == (384, 16)
    assert out.model.electra.embeddings_project.weight.shape == (24, 16)
    back = compress.load(save(out, tmp_path / "electra-hidden"))
    torch.testing.assert_close(outputs(back.model), outputs(out.model))


def test_distill_hidden_states_of_a_hidden_width_pruned_student(tmp_path):
    """GPT-2's config keeps hidden_size 32 after a cut to 24 (a hidden_width entry): hidden-state matching sized
    its projections from the config, so none was made and the loss crashed (RuntimeError, size 24 vs 32)."""
    from tiny_models import save_tiny

    teacher = save_tiny(tiny_family("gpt2"), tmp_path / "teacher", "causal")
    ctx = context("causal-lm", tmp_path)
    pruned = run_pass("hidden", artifact("gpt2", "causal-lm"), ctx, "gpt2")
    assert pruned.model.config.hidden_size == 32 and pruned.model.transformer.wte.weight.shape == (384, 24)
    out = passes.get("distill")(teacher=str(teacher), hidden_weight=1.0, max_steps=2, batch_size=2, precision="fp32",
                                eval_tokens=64, eval_examples=4).run(pruned, ctx)
    assert out.model.transformer.wte.weight.shape == (384, 24) and out.structure == pruned.structure
    assert outputs(out.model).shape == (2, 10, 384)


def test_unknown_qkv_packing_is_refused_before_heads_are_cut(tmp_path):
    """CodeGen's qkv_proj looks like Phi-3's [q | k | v] by name; with 8 heads the wrongly sliced model still ran
    and reloaded, silently another model. The row map is now tested first."""
    with pytest.raises(UnsupportedModelError, match=r"prune targets heads: the rows of transformer\.h\.0\.attn\."
                       r"qkv_proj are not packed as the map reads them"):
        run_pass("heads", artifact("codegen", "causal-lm"), context("causal-lm", tmp_path), "codegen")


def test_heads_cut_q_k_norms_that_span_all_heads(tmp_path):
    """OLMo-2's q_norm / k_norm are one RMSNorm over heads x head_dim (Qwen3's are per head): they kept the
    full width and the cut was refused (the pruned model could not run). Now they keep the kept heads' entries."""
    art = artifact("olmo2", "causal-lm")
    q_norm = art.model.model.layers[0].self_attn.q_norm.weight.detach().clone()
    out = run_pass("heads", art, context("causal-lm", tmp_path), "olmo2")
    assert out.structure == [] and out.model.config.num_attention_heads == 2
    kept = out.info["heads"]["kept"]["0"]["q"]
    torch.testing.assert_close(out.model.model.layers[0].self_attn.q_norm.weight,
                               q_norm.view(4, 8)[kept].reshape(-1))
    back = compress.load(save(out, tmp_path / "olmo2-heads"))
    torch.testing.assert_close(outputs(back.model), outputs(out.model))
