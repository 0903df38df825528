"""The export pass on tiny GPT-2, Llama (GQA) and BERT models: files, the discrepancy check, KV cache,
non-stock structure, external data, fusions, refusals."""
import json

import numpy as np
import onnx
import pytest
import torch
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama, tiny_tokenizer

from compress import load, save
from compress.checkpoint import Artifact
from compress.edge import EdgeModel
from compress.errors import UnsupportedModelError
from compress.onnx_tools import DiscrepancyError
from compress.passes import PassContext, get
from compress.passes.export import Export

BUILDERS = {
    "gpt2": (tiny_gpt2, "causal-lm", "causal"),
    "llama-gqa": (lambda: tiny_llama(num_kv_heads=2), "causal-lm", "causal"),
    "bert-cls": (tiny_bert, "sequence-classification", "encoder"),
    "bert-fe": (lambda: tiny_bert("feature-extraction"), "feature-extraction", "encoder"),
}


def export(name, tmp_path, model=None, **options):
    build, task, tok = BUILDERS[name]
    art = Artifact(kind="torch", task=task, tokenizer=tiny_tokenizer(tok), model=model or build())
    out = get("export")(**options).run(art, PassContext(task=task, scratch=tmp_path / "scratch"))
    return save(out, tmp_path / f"ck-{name}", **{"pass": {"name": "export"}}), art.model


@pytest.mark.parametrize("name,with_past", [("gpt2", True), ("gpt2", False), ("llama-gqa", True),
                                            ("llama-gqa", False), ("bert-cls", True), ("bert-fe", True)])
def test_export_bundle_and_check(name, with_past, tmp_path):
    path, torch_model = export(name, tmp_path, with_past=with_past)
    for f in ("model.onnx", "config.json", "tokenizer.json", "manifest.json", "edge_runner.py"):
        assert (path / f).exists(), f
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["kind"] == "onnx"
    d = manifest["info"]["discrepancy"]
    assert d["passed"] and d["max_abs_error"] < 1e-4
    art = load(path)
    assert art.kind == "onnx" and art.onnx_dir == path
    edge = EdgeModel(path)
    has_past = bool(edge.past_names)
    assert has_past == (with_past and art.task == "causal-lm")
    if has_past:  # the KV-cache path was checked too
        assert d["decode_max_abs_error"] < 1e-4
        n_layers = torch_model.config.num_hidden_layers
        assert len(edge.past_names) == 2 * n_layers
        if name == "llama-gqa":  # grouped-query attention: the cache holds the 2 KV heads, not the 4 heads
            assert edge.inputs["past_key_values.0.key"].shape[1] == 2
    ids = torch.randint(5, 384, (2, 12))
    with torch.no_grad():
        ref = torch_model(input_ids=ids)
    if art.task == "feature-extraction":
        got = edge.embed(ids.numpy())
        want = ref.last_hidden_state.mean(1).numpy()
    else:
        got, want = edge.logits(ids.numpy()), ref.logits.numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("name,optimize", [("gpt2", False), ("llama-gqa", False), ("llama-gqa", True)])
def test_edge_greedy_generation_equals_torch(name, optimize, tmp_path):
    path, torch_model = export(name, tmp_path, optimize=optimize)
    if optimize:  # Llama's RMSNorms and rotary embeddings fused into ONNX Runtime's contrib ops
        optimization = json.loads((path / "manifest.json").read_text())["info"]["optimization"]
        fused, layers = optimization["fused_operators"], torch_model.config.num_hidden_layers
        # the fused rotary tables are cut to the positions the model has (the fusion stores 131,072 rows)
        assert optimization["rotary_cache_rows"] == torch_model.config.max_position_embeddings
        caches = [t for t in onnx.load(str(path / "model.onnx")).graph.initializer if t.name.endswith("_cache")]
        assert caches and all(t.dims[0] == torch_model.config.max_position_embeddings for t in caches)
        assert fused.get("SkipSimplifiedLayerNormalization", 0) >= layers
        assert fused.get("RotaryEmbedding", 0) == 2 * layers  # queries and keys of every block
    edge = EdgeModel(path)
    prompt = torch.randint(5, 384, (2, 7))
    with torch.no_grad():
        want = torch_model.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                    pad_token_id=0)
    got = edge.generate(prompt.numpy(), 20)
    assert got.shape == (2, 27)
    assert (got == want.numpy()).all()
    # Prefill + decode_step give the same logits as one full pass.
    full = edge.logits(got[:, :-1])
    last, state = edge.prefill(got[:, :10])
    for t in range(10, 26):
        last, state = edge.decode_step(got[:, t:t + 1], state)
    np.testing.assert_allclose(last, full[:, -1], atol=1e-4)


def test_corrupted_onnx_weight_fails_the_pass(tmp_path, monkeypatch):
    real_export = Export._export

    def corrupt(self, torch_model, folder, optimum_task):
        real_export(self, torch_model, folder, optimum_task)
        m = onnx.load(str(folder / "model.onnx"))
        init = max(m.graph.initializer, key=lambda t: len(t.raw_data))  # the biggest weight
        arr = onnx.numpy_helper.to_array(init).copy()
        arr.flat[: arr.size // 4] += 0.5
        init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
        onnx.save(m, str(folder / "model.onnx"))

    monkeypatch.setattr(Export, "_export", corrupt)
    with pytest.raises(DiscrepancyError, match=r"max abs error [0-9.e-]+ > 0.01"):
        export("llama-gqa", tmp_path)
    assert not (tmp_path / "ck-llama-gqa").exists()


def test_lowrank_factorized_model_exports(tmp_path):
    """Linear layers replaced by two smaller Linears (what the lowrank pass makes) export and match."""
    model = tiny_llama()
    for layer in model.model.layers:
        lin = layer.mlp.up_proj
        u, s, vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
        r = 8
        first, second = torch.nn.Linear(lin.in_features, r, bias=False), torch.nn.Linear(r, lin.out_features,
                                                                                          bias=False)
        first.weight.data, second.weight.data = (vh[:r] * s[:r, None]).contiguous(), u[:, :r].contiguous()
        layer.mlp.up_proj = torch.nn.Sequential(first, second)
    path, _ = export("llama-gqa", tmp_path, model=model)
    info = json.loads((path / "manifest.json").read_text())["info"]
    assert info["discrepancy"]["passed"] and info["discrepancy"]["max_abs_error"] < 1e-4
    nodes = [n.name for n in onnx.load(str(path / "model.onnx")).graph.node if "up_proj" in n.name]
    assert sum("up_proj.0/MatMul" in n for n in nodes) == 4 and sum("up_proj.1/MatMul" in n for n in nodes) == 4


def test_external_data_and_fusions(tmp_path):
    path, _ = export("bert-cls", tmp_path, external_data="always", optimize=True)
    assert (path / "model.onnx.data").exists()
    assert (path / "model.onnx").stat().st_size < (path / "model.onnx.data").stat().st_size
    info = json.loads((path / "manifest.json").read_text())["info"]
    assert info["external_data"] and info["discrepancy"]["passed"]
    assert info["optimization"]["fused_operators"].get("Attention", 0) == 4  # one per layer
    assert EdgeModel(path).logits(np.array([[3, 50, 60, 4]])).shape == (1, 5)


def test_export_refuses_quantized_torch_model(tmp_path):
    art = Artifact(kind="torch", task="causal-lm", tokenizer=tiny_tokenizer(), model=tiny_llama(),
                   quantization={"method": "bf16", "bits": 16})
    with pytest.raises(UnsupportedModelError, match="already quantized"):
        get("export")().run(art, PassContext(scratch=tmp_path))
