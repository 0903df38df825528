"""ONNX Runtime's BERT fusions on export of encoders and classifiers (`export.optimize: auto | true | false`)
and the per-row int8 kernel for encoders (`quantize: {method: ort-int8-dynamic, kernel: rowwise}`), on tiny
BERT models built in the test."""
import collections
import json

import numpy as np
import onnx
import pytest
import torch
from tiny_models import tiny_bert, tiny_gpt2, tiny_tokenizer

from compress import load, onnx_tools, save
from compress.checkpoint import Artifact
from compress.edge import EdgeModel
from compress.onnx_tools import DiscrepancyError
from compress.passes import PassContext, get

LAYERS = 4  # tiny_bert's layers


def export(tmp_path, model, task, tok="encoder", **options):
    art = Artifact(kind="torch", task=task, tokenizer=tiny_tokenizer(tok), model=model)
    out = get("export")(**options).run(art, PassContext(task=task, scratch=tmp_path / "scratch"))
    return save(out, tmp_path / "ck", **{"pass": {"name": "export"}})


def op_types(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path / "model.onnx")).graph.node)


def info_of(path) -> dict:
    return json.loads((path / "manifest.json").read_text())["info"]


def test_encoder_export_is_fused_by_default(tmp_path):
    path = export(tmp_path, tiny_bert("feature-extraction"), "feature-extraction")
    ops, info = op_types(path), info_of(path)
    assert ops["Attention"] == LAYERS and ops["SkipLayerNormalization"] == 2 * LAYERS
    assert ops["BiasGelu"] + ops["FastGelu"] + ops["Gelu"] == LAYERS
    assert ops["EmbedLayerNormalization"] == 1
    assert "Softmax" not in ops and "LayerNormalization" not in ops  # inside the fused ops now
    opt = info["optimization"]
    assert opt["applied"] and opt["notes"] == [] and opt["reason"].startswith("optimize: auto")
    assert opt["op_counts"]["Attention"] == LAYERS and opt["fused_operators"]["Attention"] == LAYERS
    assert opt["nodes"] == sum(ops.values()) == info["nodes"] < opt["nodes_before"]  # fewer than optimum's graph
    d = info["discrepancy"]
    assert d["passed"] and d["max_abs_error"] < 1e-4 and d["embedding_cosine_min"] > 0.99999


def test_optimize_false_keeps_the_plain_graph(tmp_path):
    path = export(tmp_path, tiny_bert("feature-extraction"), "feature-extraction", optimize=False)
    ops, info = op_types(path), info_of(path)
    assert not {"Attention", "SkipLayerNormalization", "EmbedLayerNormalization", "BiasGelu"} & set(ops)
    assert ops["Softmax"] == LAYERS and ops["MatMul"] >= 6 * LAYERS
    assert info["optimization"] == {"applied": False, "reason": "optimize: false"}
    assert info["discrepancy"]["passed"]


def test_fused_classifier_matches_torch_logits(tmp_path):
    model = tiny_bert("sequence-classification")
    path = export(tmp_path, model, "sequence-classification")
    assert op_types(path)["Attention"] == LAYERS
    ids = torch.randint(5, 384, (3, 17))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padding goes through the fused attention's mask
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits.numpy()
    got = EdgeModel(path).logits(ids.numpy(), mask.numpy())
    assert got.shape == want.shape == (3, 5)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_auto_leaves_optimum_decoder_graphs_unfused(tmp_path):
    path = export(tmp_path, tiny_gpt2(), "causal-lm", tok="causal", graph="optimum")
    info = info_of(path)
    assert info["optimization"]["applied"] is False and "decoder" in info["optimization"]["reason"]
    assert not any(n.domain == "com.microsoft" for n in onnx.load(str(path / "model.onnx")).graph.node)


def test_failed_fusion_is_a_note_under_auto_and_an_error_under_true(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("pattern not supported")

    monkeypatch.setattr(onnx_tools, "optimize_graph", broken)
    path = export(tmp_path / "auto", tiny_bert("feature-extraction"), "feature-extraction")
    opt = info_of(path)["optimization"]
    assert opt["applied"] is False and "pattern not supported" in opt["notes"][0]
    assert "Attention" not in op_types(path) and info_of(path)["discrepancy"]["passed"]
    with pytest.raises(RuntimeError, match="pattern not supported"):
        export(tmp_path / "true", tiny_bert("feature-extraction"), "feature-extraction", optimize=True)


def test_fused_graph_failing_the_check_falls_back_under_auto(tmp_path, monkeypatch):
    """A fusion that changes the outputs is caught by the discrepancy check: auto keeps the plain graph."""
    real = onnx_tools.optimize_graph

    def wrong(folder, *args, **kwargs):
        figures = real(folder, *args, **kwargs)
        m = onnx.load(str(folder / "model.onnx"))
        for init in m.graph.initializer:
            if "qkv_weight" in init.name:  # a fusion bug: the attention weights scaled
                init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * 3, init.name))
        onnx_tools.save_model(m, folder)
        return figures

    monkeypatch.setattr(onnx_tools, "optimize_graph", wrong)
    path = export(tmp_path / "auto", tiny_bert("feature-extraction"), "feature-extraction")
    info = info_of(path)
    assert info["optimization"]["applied"] is False
    assert "failed the discrepancy check" in info["optimization"]["notes"][-1]
    assert "Attention" not in op_types(path) and info["discrepancy"]["max_abs_error"] < 1e-4
    with pytest.raises(DiscrepancyError):
        export(tmp_path / "true", tiny_bert("feature-extraction"), "feature-extraction", optimize=True)


def test_fusion_notes_name_the_missing_fusions():
    assert onnx_tools.fusion_notes({"Attention": 4, "SkipLayerNormalization": 8}, "feature-extraction") == []
    notes = onnx_tools.fusion_notes({"SkipLayerNormalization": 8}, "sequence-classification")
    assert len(notes) == 1 and "no Attention" in notes[0]
    assert onnx_tools.fusion_choice("auto", "feature-extraction", "bert")[0] is True
    assert onnx_tools.fusion_choice("auto", "causal-lm", "gpt2")[0] is False
    assert onnx_tools.fusion_choice("auto", "feature-extraction", "t5")[0] is False
    assert onnx_tools.fusion_choice(True, "causal-lm", "llama") == (True, "optimize: true")


def test_rowwise_int8_on_a_fused_encoder_keeps_the_embeddings(tmp_path):
    """The per-row int8 kernel on the fused graph: every projection MatMul int8 (MatMulIntegerToFloat), the
    vocabulary table int8 on disk, embeddings close to the float parent's, and better than per-tensor int8."""
    torch.manual_seed(1)
    model = tiny_bert("feature-extraction", hidden_size=64, intermediate_size=256, vocab_size=384)
    with torch.no_grad():  # BERT-like outliers: a few large activation channels and a large [CLS] token
        model.embeddings.word_embeddings.weight[3] *= 8
        model.embeddings.LayerNorm.weight[:3] *= 10
    parent = load(export(tmp_path / "fp32", model, "feature-extraction"))
    ctx = PassContext(task="feature-extraction", scratch=tmp_path / "s")
    results = {}
    for kernel in ("rowwise", "matmulinteger"):
        out = get("quantize")(method="ort-int8-dynamic", kernel=kernel, check_seq_len=32).run(parent, ctx)
        q = load(save(out, tmp_path / kernel))
        results[kernel] = q.info["discrepancy"]
        if kernel == "rowwise":
            ops = op_types(q.path)
            assert ops["MatMulIntegerToFloat"] == 3 * LAYERS and "MatMul" not in ops  # attention-out, FFN in, FFN out
            assert ops["Attention"] == LAYERS  # the fused attention stays float
            assert q.info["rowwise_matmuls"] == 3 * LAYERS
            assert q.info["int8_embed_layernorm_tables"] == []  # 384 x 64 is under the size worth converting
            assert q.quantization["kernel"] == "MatMulIntegerToFloat"
    assert results["rowwise"]["passed"] and results["rowwise"]["embedding_cosine_min"] > 0.999
    assert results["rowwise"]["embedding_cosine_mean"] > 0.9995


def test_block_wise_int8_on_a_fused_encoder_reaches_the_attention_projection(tmp_path):
    """kernel matmulnbits on a fused encoder: the QKV weights inside each Attention were left fp32 (a quarter of
    the projections); the Attention becomes MatMul + Split + MultiHeadAttention, the same attention exactly,
    and its MatMul is quantized like the others."""
    import onnxruntime

    from compress.quant import ort as ort_quant

    parent = load(export(tmp_path / "fp32", tiny_bert("feature-extraction", hidden_size=64, intermediate_size=256),
                         "feature-extraction"))
    proto = onnx.load(str(parent.path / "model.onnx"))
    sessions = [onnxruntime.InferenceSession(proto.SerializeToString())]
    assert ort_quant.unfuse_attention_projections(proto) == LAYERS
    sessions.append(onnxruntime.InferenceSession(proto.SerializeToString()))
    ids = np.random.default_rng(0).integers(5, 100, (2, 12))
    mask = np.ones_like(ids)
    mask[1, 8:] = 0  # a padded row: the mask index reaches MultiHeadAttention as it reached Attention
    feeds = {i.name: {"input_ids": ids, "attention_mask": mask}.get(i.name, np.zeros_like(ids))
             for i in sessions[0].get_inputs()}
    before, after = (s.run(None, feeds)[0] for s in sessions)
    assert np.abs(before - after).max() < 1e-5
    out = get("quantize")(method="ort-int8-dynamic", kernel="matmulnbits", check_seq_len=32).run(
        parent, PassContext(task="feature-extraction", scratch=tmp_path / "s"))
    ops = op_types(out.onnx_dir)
    assert ops["MatMulNBits"] == 4 * LAYERS and ops["MultiHeadAttention"] == LAYERS and "Attention" not in ops
    assert out.info["unfused_attention_projections"] == LAYERS
    graph = onnx.load(str(out.onnx_dir / "model.onnx")).graph
    assert not [i.name for i in graph.initializer
                if i.data_type == onnx.TensorProto.FLOAT and list(i.dims) == [64, 192]]  # no fp32 QKV weight left
    assert out.info["discrepancy"]["passed"] and out.info["discrepancy"]["embedding_cosine_min"] > 0.999


def test_smoothing_before_per_tensor_int8_on_a_fused_encoder(tmp_path):
    """quantize.smooth_alpha with kernel matmulinteger: BERT's LayerNorm outputs also feed the residual and its
    GELU outputs have no constant to fold into, so every quantized input gets an inserted per-channel Mul;
    in float the graph computes the same function, and on an encoder with outlier channels the per-tensor
    int8 embeddings come closer to the float parent's."""
    from compress.data import DataSpec, PipelineData
    from compress.quant.ort import _load, calibration_feeds
    from compress.quant.smooth import find_groups, smooth

    torch.manual_seed(1)
    model = tiny_bert("feature-extraction", hidden_size=64, intermediate_size=256, vocab_size=384,
                      initializer_range=0.2)  # weights large enough that int8 error shows in the output
    with torch.no_grad():  # BERT-like outlier channels after every LayerNorm
        for norm in [model.embeddings.LayerNorm] + [m for layer in model.encoder.layer for m in (
                layer.attention.output.LayerNorm, layer.output.LayerNorm)]:
            norm.weight[:3] *= 12
    parent = load(export(tmp_path / "fp32", model, "feature-extraction"))

    graph = _load(parent.path)
    groups = find_groups(graph, insert=True)
    assert len(groups) == 4 * LAYERS and all(g.inserted for g in groups)  # qkv, attention out, FFN in, FFN out
    assert not find_groups(graph)  # nothing folds exactly in BERT
    ids = np.random.default_rng(0).integers(5, 384, (4, 24))
    feeds = calibration_feeds(parent.path, ids, np.ones_like(ids), batch_size=2)
    before = onnx_tools.outputs_of(EdgeModel(parent.path), "feature-extraction", ids, np.ones_like(ids))
    info = smooth(graph, feeds, alpha=0.7, insert=True)
    assert info["inserted_muls"] == 4 * LAYERS and info["max_over_median_after"] < info["max_over_median_before"]
    onnx_tools.save_model(graph, tmp_path / "float-smoothed")
    after = onnx_tools.outputs_of(EdgeModel(tmp_path / "float-smoothed"), "feature-extraction", ids, np.ones_like(ids))
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)  # the same function in float

    data = PipelineData(train=DataSpec(source="builtin:bbc-news", max_examples=8))
    ctx = PassContext(task="feature-extraction", scratch=tmp_path / "s", data=data)
    results = {}
    for name, alpha in {"plain": None, "smoothed": 0.7}.items():
        out = get("quantize")(method="ort-int8-dynamic", kernel="matmulinteger", smooth_alpha=alpha,
                              calibration_batches=4, check_seq_len=32, min_agreement=0.0).run(parent, ctx)
        q = load(save(out, tmp_path / name))
        results[name] = q.info["discrepancy"]["embedding_cosine_mean"]
        ops = op_types(q.path)
        assert ops["QAttention"] == LAYERS and ops["MatMulInteger"] == 3 * LAYERS
        assert q.quantization["smooth_alpha"] == alpha
        assert (q.info["smoothing"] or {}).get("inserted_muls") == (4 * LAYERS if alpha else None)
    assert 1 - results["smoothed"] < (1 - results["plain"]) / 2, results  # at least half the error gone


def _one_matmul(folder, w, gelu: bool):
    """A graph x -> [Gelu] -> MatMul(w), saved as folder/model.onnx."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Gelu", ["x"], ["g"], name="gelu", domain="com.microsoft")] if gelu else []
    nodes.append(helper.make_node("MatMul", ["g" if gelu else "x", "w"], ["y"], name="proj/MatMul"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", w.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=9)
    onnx_tools.save_model(model, folder)


@pytest.mark.parametrize("gelu", [False, True])
def test_rowwise_kernel_gives_each_token_its_own_scale(tmp_path, gelu):
    """One token 100x larger than the rest (BERT's [CLS] / [SEP] outliers): per-tensor dynamic int8 rounds
    the other tokens to a few levels, the per-row kernel keeps them (and the GELU-shifted input is exact up
    to rounding: the shift is added back)."""
    import onnxruntime as ort
    from scipy.special import erf

    from compress.quant.ort import dynamic_int8, rowwise_int8

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 48)) * 0.1).astype(np.float32)
    x = rng.standard_normal((1, 16, 64)).astype(np.float32)
    x[0, 0] *= 100
    _one_matmul(tmp_path / "f", w, gelu)
    figures = rowwise_int8(tmp_path / "f", tmp_path / "row", exclude=[])
    assert figures["rowwise_matmuls"] == 1
    dynamic_int8(tmp_path / "f", tmp_path / "tensor", per_channel=True, exclude=[], op_types=["MatMul"])
    h = 0.5 * x * (1 + erf(x / np.sqrt(2))) if gelu else x
    want = (h @ w)[0, 1:]
    err = {}
    for name in ("row", "tensor"):
        s = ort.InferenceSession(str(tmp_path / name / "model.onnx"), providers=["CPUExecutionProvider"])
        got = s.run(None, {"x": x})[0][0, 1:]  # the ordinary tokens
        err[name] = float(np.abs(got - want).max() / np.abs(want).max())
    assert err["row"] < 0.02 and err["row"] * 5 < err["tensor"], err


def test_int8_tables_of_embed_layer_normalization(tmp_path):
    """A fused encoder's vocabulary table (read by EmbedLayerNormalization, not a Gather) is stored int8 and
    dequantized by folded standard ops: the graph computes the same embeddings within int8 rounding."""
    import shutil

    from compress.quant.ort import int8_embed_layernorm_tables

    model = tiny_bert("feature-extraction", hidden_size=64, intermediate_size=128)
    path = export(tmp_path, model, "feature-extraction")
    copy = tmp_path / "int8"
    shutil.copytree(path, copy)
    tables = int8_embed_layernorm_tables(copy, min_elements=0)
    assert "embeddings.word_embeddings.weight" in tables
    inits = {i.name: i for i in onnx.load(str(copy / "model.onnx")).graph.initializer}
    assert "embeddings.word_embeddings.weight" not in inits
    assert inits["embeddings.word_embeddings.weight_uint8"].data_type == onnx.TensorProto.UINT8
    assert onnx_tools.onnx_size(copy) < onnx_tools.onnx_size(path)
    ids = np.random.default_rng(0).integers(5, 384, (2, 16))
    ref, got = EdgeModel(path).embed(ids), EdgeModel(copy, verify=False).embed(ids)  # rewritten in place
    cos = (ref * got).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)
    assert cos.min() > 0.9999


@pytest.mark.parametrize("exclude", [["*word_embeddings*"], ["EmbedLayerNorm*"]])
def test_excluded_embed_layer_normalization_table_stays_float(tmp_path, exclude):
    """quantize.exclude naming the fused encoder's vocabulary table (or its EmbedLayerNormalization node) keeps
    it float, as it keeps a Gather's table: it was converted to int8 all the same."""
    model = tiny_bert("feature-extraction", vocab_size=1 << 14, hidden_size=64, intermediate_size=128)
    path = load(export(tmp_path, model, "feature-extraction"))  # 16384 x 64: worth converting
    ctx = PassContext(task="feature-extraction", scratch=tmp_path / "scratch")
    default = get("quantize")(method="ort-int8-dynamic").run(path, ctx)
    assert default.info["int8_embed_layernorm_tables"] == ["embeddings.word_embeddings.weight"]
    q = get("quantize")(method="ort-int8-dynamic", exclude=exclude).run(path, ctx)
    assert q.info["int8_embed_layernorm_tables"] == []
    inits = {i.name: i for i in onnx.load(str(q.onnx_dir / "model.onnx")).graph.initializer}
    assert inits["embeddings.word_embeddings.weight"].data_type == onnx.TensorProto.FLOAT
