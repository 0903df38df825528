"""Mixed 4/8-bit MatMulNBits (quantize keep_8bit / keep_8bit_blocks): the blocks most sensitive to 4 bits,
found by a KL score on the torch parent (or a weight-only proxy without one), are written at 8 bits; and the
QAD grid check's note."""
import collections
import re

import onnx
import pytest
import torch
from tiny_models import save_tiny, tiny_gpt2, tiny_llama, tiny_tokenizer

from compress import load, save
from compress.checkpoint import Artifact
from compress.data import DataSpec, PipelineData
from compress.errors import ConfigError
from compress.passes import PassContext, get

SHAKESPEARE = PipelineData(train=DataSpec(source="builtin:shakespeare", max_examples=2))
HOT = 2  # the block given outliers: its 4-bit error dominates


def _hot_llama():
    """tiny_llama (4 blocks, K = 32 / 64) with one outlier per 32-weight quantization block in block HOT's linear
    layers: its int4 steps become coarse, so its 4-bit error dominates the model's."""
    model = tiny_llama()
    with torch.no_grad():
        for m in model.model.layers[HOT].modules():
            if isinstance(m, torch.nn.Linear):
                m.weight[:, ::32] = 8 * m.weight.abs().max()
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(ONNX checkpoint whose manifest names its torch parent, the same ONNX with no lineage)."""
    tmp = tmp_path_factory.mktemp("mixed")
    parent = save(Artifact(kind="torch", task="causal-lm", tokenizer=tiny_tokenizer(), model=_hot_llama()),
                  tmp / "torch")
    out = get("export")().run(load(parent), PassContext(task="causal-lm", scratch=tmp / "scratch"))
    with_parent = load(save(out, tmp / "onnx", parent={"path": str(parent), "key": "k"}))
    orphan = load(save(out, tmp / "orphan"))
    return with_parent, orphan


def quantize(parent, tmp_path, source=None, **options):
    ctx = PassContext(task="causal-lm", scratch=tmp_path / "scratch", data=SHAKESPEARE, source=source)
    options = {"method": "ort-int8-dynamic", "weight_bits": 4, "calibration_batches": 2,
               "calibration_seq_len": 32, **options}
    if options.get("check", True):
        options.setdefault("min_agreement", 0.0)  # a random tiny model at 4 bits
    return get("quantize")(**options).run(parent, ctx)


def bits_per_block(art, scope: str = "/model/layers") -> dict[int, collections.Counter]:
    graph = onnx.load(str(art.onnx_dir / "model.onnx"), load_external_data=False).graph
    out: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for node in graph.node:
        found = re.match(re.escape(scope) + r"\.(\d+)/", node.name)
        if node.op_type == "MatMulNBits" and found:
            out[int(found.group(1))][next(a.i for a in node.attribute if a.name == "bits")] += 1
    return dict(out)


def test_most_sensitive_blocks_at_8_bits(exported, tmp_path):
    """KL sensitivity on the torch parent picks the outlier block; its MatMuls (and one other block's) are 8-bit,
    the rest 4-bit; and the 8-bit blocks bring the output closer to the float parent than all-4-bit."""
    onnx_ckpt, _ = exported
    plain = quantize(onnx_ckpt, tmp_path / "a")
    mixed = quantize(onnx_ckpt, tmp_path / "b", keep_8bit_blocks=2)
    record = mixed.info["mixed_precision"]
    assert record["sensitivity"]["measure"].startswith("KL") and record["sensitivity"]["tokens"] == 64
    scores = {int(k): v for k, v in record["scores"].items()}
    assert max(scores, key=scores.get) == HOT and scores[HOT] > 2 * sorted(scores.values())[-2]
    assert HOT in record["blocks_8bit"] and len(record["blocks_8bit"]) == 2
    per_block = bits_per_block(mixed)
    assert set(per_block) == {0, 1, 2, 3}
    for i, counts in per_block.items():  # 5 weight MatMuls per block (q, k, v, o, gate/up/down... as exported)
        assert list(counts) == ([8] if i in record["blocks_8bit"] else [4]), (i, counts)
    assert record["matmuls_8bit"] == sum(per_block[i][8] for i in record["blocks_8bit"]) > 0
    assert set(bits_per_block(plain)) == {0, 1, 2, 3} and all(list(c) == [4] for c in bits_per_block(plain).values())
    assert mixed.quantization["int8_matmuls"] == record["matmuls_8bit"]
    a, b = plain.info["discrepancy"], mixed.info["discrepancy"]
    assert b["mean_abs_error"] < 0.8 * a["mean_abs_error"], (a["mean_abs_error"], b["mean_abs_error"])
    assert mixed.info["onnx_bytes"] > plain.info["onnx_bytes"]
    again = quantize(onnx_ckpt, tmp_path / "c", keep_8bit_blocks=1).info["mixed_precision"]  # same parent, tokens
    assert again["sensitivity"]["from_cache"] and again["scores"] == record["scores"] and again["blocks_8bit"] == [HOT]


def test_weight_proxy_without_torch_parent(exported, tmp_path):
    """No torch model up the lineage: the relative int4 error of each block's ONNX weights decides."""
    _, orphan = exported
    record = quantize(orphan, tmp_path, keep_8bit_blocks=1).info["mixed_precision"]
    assert record["sensitivity"]["measure"] == "int4 weight error (relative)"
    assert "no torch checkpoint" in record["sensitivity"]["why"]
    assert record["blocks_8bit"] == [HOT]
    scores = {int(k): v for k, v in record["scores"].items()}
    assert 0 < scores[0] < 0.2 and scores[HOT] > 1.5 * max(v for k, v in scores.items() if k != HOT)


@pytest.mark.parametrize("algorithm", ["rtn", "hqq"])
def test_keep_8bit_patterns(exported, tmp_path, algorithm):
    """Node-name patterns keep their MatMuls at 8 bits; HQQ's float zero-point rewrite leaves them alone."""
    _, orphan = exported
    q = quantize(orphan, tmp_path, keep_8bit=["/model/layers.0/*", "*/layers.3/mlp/down_proj/*"],
                 algorithm=algorithm)
    per_block = bits_per_block(q)
    assert list(per_block[0]) == [8] and list(per_block[1]) == list(per_block[2]) == [4]
    assert per_block[3][8] == 1 and per_block[3][4] >= 4
    assert q.info["mixed_precision"]["matmuls_8bit"] == per_block[0][8] + 1
    assert q.info["discrepancy"]["passed"]
    if algorithm == "hqq":  # every 4-bit MatMul rewritten to the integer zero point, none of the 8-bit ones
        assert q.info["offset_corrections"] == sum(c[4] for c in per_block.values())


def test_excluded_matmuls_are_not_counted_at_8_bits(exported, tmp_path):
    """MatMuls that exclude leaves float are not among those kept at 8 bits (the record counted them)."""
    _, orphan = exported
    q = quantize(orphan, tmp_path, keep_8bit=["/model/layers.0/*"], exclude=["*/layers.0/mlp/*"])
    per_block = bits_per_block(q)
    assert per_block[0] == {8: 4}  # q, k, v, o; gate, up and down float
    assert q.info["mixed_precision"]["matmuls_8bit"] == len(q.info["int8_matmuls"]) == 4
    with pytest.raises(ConfigError, match=r"keep_8bit: .* matches no MatMul node of the ONNX graph that "
                                          "quantize.exclude leaves to quantize"):
        quantize(orphan, tmp_path, keep_8bit=["/model/layers.0/*"], exclude=["/model/layers.0/*"])


def test_bad_combinations_refused(exported, tmp_path):
    _, orphan = exported
    with pytest.raises(ConfigError, match="keep_8bit_blocks"):
        get("quantize")(method="ort-int8-dynamic", weight_bits=8, keep_8bit_blocks=2)
    with pytest.raises(ConfigError, match="keep_8bit"):
        get("quantize")(method="ort-int8-dynamic", weight_bits=4, kernel="matmulinteger", keep_8bit=["*"])
    with pytest.raises(ConfigError, match="keep_8bit_blocks: 5 but the model has 4 blocks"):
        quantize(orphan, tmp_path, keep_8bit_blocks=5)
    with pytest.raises(ConfigError, match="keep_8bit: .* matches no MatMul"):
        quantize(orphan, tmp_path, keep_8bit=["/nothing/*"])


def test_qad_grid_mismatch_note(exported, tmp_path, caplog):
    """A QAD record for another grid on the input: the pass notes it (manifest and suite log)."""
    _, orphan = exported
    qad = {"bits": 4, "block_size": 64, "symmetric": True, "embeddings": True}
    art = orphan.derive(onnx_dir=orphan.onnx_dir, info={"quantize_aware": qad})
    with caplog.at_level("WARNING", logger="compress.run"):
        q = quantize(art, tmp_path, keep_8bit=["/model/layers.0/*"], check=False)
    (note,) = q.info["notes"]
    assert "block_size 32 (trained for 64)" in note and "kept at 8 bits" in note
    assert note in caplog.text
    matching = orphan.derive(onnx_dir=orphan.onnx_dir, info={"quantize_aware": {**qad, "block_size": 32}})
    assert "notes" not in quantize(matching, tmp_path / "b", check=False).info
    # the same grid: symmetric 8-bit RTN stores 4-bit grid weights exactly, so keeping them only costs size
    (note,) = quantize(matching, tmp_path / "c", keep_8bit=["/model/layers.0/*"], check=False).info["notes"]
    assert "buys nothing" in note


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fused_graphs_from_the_source_model(tmp_path, family):
    """The suite's fused decoder graphs (GPT-2's `/transformer/h.N/`, Llama's `/model/layers.N/` with a packed
    qkv_proj): blocks found by name; an export whose parent is the pipeline's source scores on ctx.teacher()."""
    model = tiny_gpt2() if family == "gpt2" else tiny_llama(hidden_size=64, intermediate_size=128)
    source = save_tiny(model, tmp_path / "source")
    art = Artifact(kind="torch", task="causal-lm", tokenizer=tiny_tokenizer(), model=model)
    out = get("export")(graph="fused").run(art, PassContext(task="causal-lm", scratch=tmp_path / "scratch"))
    onnx_ckpt = load(save(out, tmp_path / "onnx", parent={"path": str(source), "key": "k"}))
    q = quantize(onnx_ckpt, tmp_path, source=str(source), keep_8bit_blocks=1)
    record = q.info["mixed_precision"]
    assert record["sensitivity"]["measure"].startswith("KL") and record["blocks"] == 4
    per_block = bits_per_block(q, "/transformer/h" if family == "gpt2" else "/model/layers")
    (kept,) = record["blocks_8bit"]
    assert sorted(per_block) == [0, 1, 2, 3] and list(per_block[kept]) == [8]
    assert all(list(c) == [4] for i, c in per_block.items() if i != kept)
    assert record["matmuls_8bit"] == per_block[kept][8] == 4  # qkv, o, gate_up, down; GPT-2's c_attn ... c_proj
