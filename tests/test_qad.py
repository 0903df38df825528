"""Quantization-aware distillation (compress/quant/fake.py, distill's `quantize_aware`): the fake quantizer is
ONNX Runtime's MatMulNBits RTN bit for bit, the fake-quantized torch forward is what the exported int4 model
computes, QAD beats post-training RTN at equal steps, and its checkpoint re-quantizes without another rounding."""
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits
from tiny_models import tiny_llama, tiny_tokenizer

from compress.checkpoint import Artifact
from compress.data import DataSpec, PipelineData
from compress.edge import EdgeModel
from compress.errors import ConfigError
from compress.passes import PassContext, get
from compress.quant import fake

FAST = dict(precision="fp32", eval_tokens=256, log_every=1, seed=0, batch_size=8)
INT4 = {"bits": 4, "block_size": 32, "symmetric": True}
DATA = PipelineData(train=DataSpec(source="builtin:shakespeare", max_tokens=4096, seq_len=32),
                    eval=DataSpec(source="builtin:shakespeare", max_tokens=1024, seq_len=32))


def ctx_for(tmp, source=None):
    return PassContext(source=source, task="causal-lm", data=DATA, scratch=tmp / "scratch", show_progress=False)


def ort_rtn(w_kn: np.ndarray, bits: int, block: int, symmetric: bool):
    """ONNX Runtime's own blockwise quantization of a MatMul weight [K, N] (what MatMulNBitsQuantizer calls):
    codes [N, K], scales and zero points [N, blocks] (zero point 2^(bits-1) when symmetric)."""
    k, n = w_kn.shape
    blocks = -(-k // block)
    kpack = 8 // bits
    packed = np.zeros((n, blocks, block // kpack), np.uint8)
    zp = np.zeros((n, -(-blocks // kpack)), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    padded = np.pad(w_kn, ((0, blocks * block - k), (0, 0)))
    (quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits)(packed, padded, scales, zp, block, n, k,
                                                                    symmetric)
    if bits == 4:
        packed = np.stack([packed & 15, packed >> 4], -1)
        zp = np.stack([zp & 15, zp >> 4], -1).reshape(n, -1)
    codes = packed.reshape(n, -1)[:, :k].astype(np.float32)
    zero = np.full((n, blocks), 1 << (bits - 1), np.float32) if symmetric else zp[:, :blocks].astype(np.float32)
    return codes, scales, zero


def dequantize(codes, scales, zero, block):
    z, s = (np.repeat(a, block, axis=1)[:, :codes.shape[1]] for a in (zero, scales))
    return (codes - z) * s


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [96, 80])  # 80: the last block is padded
def test_fake_quantizer_is_ort_rtn_bit_for_bit(bits, symmetric, k):
    rng = np.random.default_rng(bits + k)
    w = (rng.standard_normal((48, k)) * 0.05).astype(np.float32)  # torch layout [out, in]
    w[:4] = rng.integers(-8, 8, (4, k)) * np.float32(0.25)  # on a grid: halves after scaling (rounding ties)
    w[4, :32] = 0.0  # an all-zero block (scale 0)
    w[5, :32] = np.linspace(-1, 1, 32, dtype=np.float32)  # |max| == |min|: the sign of the scale
    codes, scales, zero = ort_rtn(np.ascontiguousarray(w.T), bits, 32, symmetric)
    q, s, z = fake.blockwise_grid(torch.from_numpy(w), bits, 32, symmetric)
    assert np.array_equal(q.reshape(48, -1)[:, :k].numpy(), codes)
    assert np.array_equal(s.numpy(), scales) and np.array_equal(z.numpy(), zero)
    fq = fake.FakeQuant("blockwise", bits, 32, symmetric)
    assert np.array_equal(fq.grid(torch.from_numpy(w)).numpy(), dequantize(codes, scales, zero, 32))
    # the straight-through gradient is the identity
    x = torch.from_numpy(w).requires_grad_(True)
    fq(x).mul(torch.arange(k, dtype=torch.float32)).sum().backward()
    assert torch.equal(x.grad, torch.arange(k, dtype=torch.float32).expand(48, k))


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("qad")


@pytest.fixture(scope="module")
def teacher(tmp):
    """A tiny Llama (tied head) trained on Shakespeare for 60 steps, its matrices first scaled up 4x (at init
    scale its outputs hardly depend on the weights, so quantizing them hardly shows). Saved as a source."""
    m = tiny_llama()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(4)
    a = Artifact("torch", "causal-lm", tiny_tokenizer(), m)
    out = get("distill")(alpha=0.0, max_steps=60, lr=3e-3, **FAST).run(a, ctx_for(tmp))
    path = tmp / "teacher"
    out.model.save_pretrained(path)
    out.tokenizer.save_pretrained(path)
    return path


def load(path):
    from compress.models import load_model

    m, tok = load_model(str(path), "causal-lm")
    return Artifact("torch", "causal-lm", tok, m)


def export_int4(artifact, tmp, name):
    ctx = ctx_for(tmp / name)
    onnx_fp = get("export")().run(artifact, ctx)
    return onnx_fp, get("quantize")(method="ort-int8-dynamic", weight_bits=4, block_size=32).run(onnx_fp, ctx)


def fp32_compute(folder, out):
    """A copy of a MatMulNBits model computing in fp32 (accuracy_level 0): no int8 activation rounding."""
    import shutil

    shutil.copytree(folder, out)
    model = onnx.load(str(out / "model.onnx"))
    for node in model.graph.node:
        for a in node.attribute:
            if node.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = 0
    onnx.save(model, str(out / "model.onnx"))
    return out


def test_fake_forward_is_the_exported_int4_model(teacher, tmp):
    a = load(teacher)
    _, int4 = export_int4(a, tmp, "ptq")
    ids = DATA.lm_windows("eval", a.tokenizer)[:4]
    mask = np.ones_like(ids.numpy())
    deployed = EdgeModel(int4.onnx_dir).logits(ids.numpy(), mask)  # as shipped: accuracy_level 4
    exact = EdgeModel(fp32_compute(int4.onnx_dir, tmp / "int4-fp32-compute")).logits(ids.numpy(), mask)
    with torch.no_grad():
        plain = a.model(input_ids=ids).logits.numpy()
        summary = fake.wrap(a.model, fake.GridSpec(**INT4))
        fq = a.model(input_ids=ids).logits.numpy()
    fake.unwrap(a.model)
    assert summary["modules"] == {"int8 tables": 2, "4-bit blockwise": 28}  # embed + tied head, 7 per block

    def err(x, ref):
        return float(np.abs(x - ref).mean())

    # the int4 weights dequantized in fp32: the fake-quantized forward up to float summation order
    assert np.abs(fq - exact).max() < 2e-5
    assert err(plain, exact) > 100 * err(fq, exact)
    # as deployed, ORT also rounds activations to int8 per block of 32 (accuracy_level 4): that noise is all
    # that separates it from the fake forward (here ~3e-4 of the logit range on average, 2e-3 at most)
    scale = np.abs(deployed).max()
    assert np.abs(fq - deployed).max() < 0.01 * scale
    assert err(fq, deployed) < 0.6 * err(plain, deployed)
    assert (fq.argmax(-1) == deployed.argmax(-1)).mean() > 0.97


@pytest.mark.parametrize("family", ["gpt2", "llama-untied-head"])
def test_fake_forward_matches_other_layouts(family, tmp):
    """GPT-2's Conv1D weights (stored [in, out]) and an untied LM head (kept 8-bit by the quantize pass)."""
    from tiny_models import tiny_gpt2

    m = tiny_gpt2() if family == "gpt2" else tiny_llama(tie_word_embeddings=False)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(4)
    a = Artifact("torch", "causal-lm", tiny_tokenizer(), m)
    _, int4 = export_int4(a, tmp, family)
    ids = DATA.lm_windows("eval", a.tokenizer)[:2]
    exact = EdgeModel(fp32_compute(int4.onnx_dir, tmp / f"{family}-fp32-compute")).logits(
        ids.numpy(), np.ones_like(ids.numpy()))
    with torch.no_grad():
        plain = m(input_ids=ids).logits.numpy()
        summary = fake.wrap(m, fake.GridSpec(**INT4))
        fq = m(input_ids=ids).logits.numpy()
    fake.unwrap(m)
    expected = {"gpt2": {"int8 tables": 2, "4-bit blockwise": 16},  # wte + tied head; wpe stays float
                "llama-untied-head": {"int8 tables": 1, "4-bit blockwise": 28, "8-bit blockwise": 1}}[family]
    assert summary["modules"] == expected
    assert np.abs(fq - exact).max() < 2e-5
    assert np.abs(plain - exact).mean() > 100 * np.abs(fq - exact).mean()


def kl_int4(model, teacher_model, ids) -> float:
    """KL(teacher || student) of the student with its weights on the int4 export grid (post-training RTN for
    a plain model, a no-op for a QAD one), per token; the grid forward is the ONNX int4 model's (test above)."""
    fake.wrap(model, fake.GridSpec(**INT4))
    with torch.no_grad():
        p = teacher_model(input_ids=ids).logits.log_softmax(-1)
        q = model(input_ids=ids).logits.log_softmax(-1)
    fake.unwrap(model)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.fixture(scope="module")
def qad(teacher, tmp):
    """The teacher's own weights distilled in place (so all that separates the int4 student from the teacher
    is the quantization, and what the training did about it): QAD and plain KD, 30 steps each."""
    runs = {}
    for mode in ("kd", "qad"):
        opts = dict(alpha=1.0, temperature=1.0, max_steps=30, lr=5e-4,
                    quantize_aware=INT4 if mode == "qad" else None, **FAST)
        runs[mode] = get("distill")(**opts).run(load(teacher), ctx_for(tmp, str(teacher)))
    return runs


def test_qad_beats_post_training_rtn_at_equal_steps(qad, teacher):
    t = load(teacher).model
    ids = DATA.lm_windows("eval", load(teacher).tokenizer)[:16]
    kl = {mode: kl_int4(run.model, t, ids) for mode, run in qad.items()}
    # measured: KD 30 steps + RTN int4 4.4e-4, QAD 30 steps 1.0e-4 (KD alone, in float: 2e-5)
    assert kl["qad"] < 0.5 * kl["kd"], kl
    info = qad["qad"].info["quantize_aware"]
    assert info["bits"] == 4 and info["block_size"] == 32 and info["symmetric"] is True
    assert info["off_grid"] == 0 and info["values_moved"] > 0
    assert "quantize_aware" not in qad["kd"].info
    # a plain model again: plain Linear weights, the head still tied, same state_dict keys
    m = qad["qad"].model
    assert not fake.is_wrapped(m) and type(m.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert m.state_dict().keys() == qad["kd"].model.state_dict().keys()


def test_qad_checkpoint_requantizes_without_rounding(qad, tmp):
    """The quantize pass's int4 codes of a QAD checkpoint dequantize to the checkpoint's own weights."""
    onnx_fp, int4 = export_int4(qad["qad"], tmp, "qad")
    fp = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(onnx_fp.onnx_dir / "model.onnx")).graph.initializer}
    graph = onnx.load(str(int4.onnx_dir / "model.onnx")).graph
    q = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    checked = 0
    for node in graph.node:
        if node.op_type == "MatMulNBits" and node.input[1].endswith("_Q4"):
            attrs = {a.name: a.i for a in node.attribute}
            n, k, block = attrs["N"], attrs["K"], attrs["block_size"]
            packed = q[node.input[1]].reshape(n, -1)
            codes = np.stack([packed & 15, packed >> 4], -1).reshape(n, -1)[:, :k].astype(np.float32)
            scales = q[node.input[2]].reshape(n, -1)
            w = dequantize(codes, scales, np.full_like(scales, 8), block)
            assert np.array_equal(w.T, fp[node.input[1].removesuffix("_Q4")]), node.name
            checked += 1
    assert checked >= 4 * 4  # 4 blocks: qkv, o, gate / up, down
    table = qad["qad"].model.model.embed_tokens.weight.detach().numpy()
    codes = q["model.embed_tokens.weight_uint8"].reshape(table.shape[0], -1).astype(np.float32) - 128
    scales = q["model.embed_tokens.weight_scale_fp16"].astype(np.float32)
    scales = scales.reshape(table.shape[0], -1)
    assert np.array_equal(dequantize(codes, scales, 0 * scales, fake.table_block(table.shape[1])), table)
    # and the quantize pass's check sees the float ONNX model's logits up to activation rounding only
    assert int4.info["discrepancy"]["top1_agreement"] > 0.97


def test_qad_checkpoint_is_plain_and_its_grid_follows_the_lineage(qad, tmp):
    """Saved and reloaded: the same plain weights; a quantize pass reading the exported child (loaded from
    disk, as the runner hands it over) finds the grid in the lineage."""
    from compress import load as load_checkpoint
    from compress import save

    path = save(qad["qad"], tmp / "ck-qad")
    assert load_checkpoint(path).structure == []
    reloaded = load_checkpoint(path).model.state_dict()
    assert all(torch.equal(v, reloaded[k]) for k, v in qad["qad"].model.state_dict().items())
    child = get("export")().run(load_checkpoint(path), ctx_for(tmp / "lineage"))
    child = load_checkpoint(save(child, tmp / "ck-onnx", parent={"path": str(path)}))
    assert fake.grid_settings(child)["block_size"] == 32
    assert fake.grid_mismatch(child, bits=4, block_size=32, symmetric=True) is None
    assert "algorithm hqq" in fake.grid_mismatch(child, bits=4, block_size=32, symmetric=False, algorithm="hqq")


def test_qad_in_place_after_pruning_with_cached_teacher(teacher, tmp, monkeypatch):
    """prune's recover (the distill pass on the pruned model in place) with the teacher cache: K = 40 is not a
    multiple of the block size; the result is on the grid and records it for the quantize pass."""
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp / "cache"))
    a = load(teacher)
    out = get("prune")(targets=["mlp"], ratio=0.375, recover=dict(
        max_steps=4, lr=1e-3, alpha=1.0, teacher_cache=True, cache_top_k=16, quantize_aware=INT4, **FAST)
    ).run(a, ctx_for(tmp))
    m = out.model
    assert m.model.layers[0].mlp.down_proj.in_features == 40
    assert out.info["recover"]["teacher_cache"]["hit"] is False and out.info["recover"]["eval_curve"]
    grids = fake.plan(m, fake.GridSpec(**INT4))
    modules = dict(m.named_modules())
    assert all(torch.equal(fq.grid(modules[name].weight), modules[name].weight) for name, fq in grids.items())
    assert fake.grid_settings(out)["bits"] == 4
    assert fake.grid_mismatch(out, bits=4, block_size=32, symmetric=True) is None
    assert "block_size 64 (trained for 32)" in fake.grid_mismatch(out, bits=4, block_size=64, symmetric=True)
    assert fake.grid_mismatch(a, bits=8, block_size=64, symmetric=True) is None  # no QAD: nothing to say


def test_quantize_aware_options():
    with pytest.raises(ConfigError, match="quantize_aware.block_size: Input should be 16, 32, 64, 128 or 256"):
        get("distill")(quantize_aware={"block_size": 48})
    with pytest.raises(ConfigError, match="quantize_aware.bits"):
        get("distill")(quantize_aware={"bits": 3})
    assert get("distill")(quantize_aware={}).config.quantize_aware.model_dump() == {
        **INT4, "embeddings": True, "algorithm": "rtn", "embedding_bits": 8}
    with pytest.raises(ConfigError, match="minmax is a 4-bit grid"):
        get("distill")(quantize_aware={"bits": 8, "algorithm": "minmax"})
    bert = Artifact("torch", "feature-extraction", None, torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="causal LMs"):
        get("distill")(quantize_aware={}).run(bert, PassContext())  # refused by check_task before any work


# ----------------------------------------------------------------------------- minmax (llama.cpp's Q4_1 grid)
MINMAX = {"bits": 4, "block_size": 32, "algorithm": "minmax"}


def test_minmax_grid_finds_a_q4_1_weight():
    """A dequantized Q4_1 block (w = m + q d, d and m fp16, codes 0 and 15 both used) gives back its codes, and
    its values up to fp16's rounding of the stored offset m + 8 d; the symmetric RTN grid of the same weights
    is far off."""
    rng = np.random.default_rng(0)
    n, k = 48, 96
    codes = rng.integers(0, 16, (n, k // 32, 32)).astype(np.float32)
    codes[..., 0], codes[..., 1] = 0, 15
    d = rng.uniform(0.005, 0.05, (n, k // 32)).astype(np.float16).astype(np.float32)
    m = (rng.standard_normal((n, k // 32)) * 0.2).astype(np.float16).astype(np.float32)
    w = (m[..., None] + codes * d[..., None]).reshape(n, k).astype(np.float32)
    q, s, off = fake.minmax_grid(torch.from_numpy(w), 32)
    assert np.array_equal(q.numpy(), codes)
    w_hat = fake.dequantize_minmax(q, s, off).numpy()
    assert np.all(np.abs(w_hat - w).reshape(n, -1, 32) <= 2**-11 * np.abs(m + 8 * d)[..., None] + 1e-6)
    rtn = fake.dequantize_blockwise(*fake.blockwise_grid(torch.from_numpy(w), 4, 32, True), k).numpy()
    assert np.abs(rtn - w).mean() > 20 * np.abs(w_hat - w).mean()
    fq = fake.FakeQuant("minmax", 4, 32)
    assert torch.equal(fq.grid(torch.from_numpy(w)), torch.from_numpy(w_hat))
    assert torch.equal(fq.grid(torch.from_numpy(np.zeros((2, 32), np.float32))), torch.zeros(2, 32))  # scale 0
    with pytest.raises(ValueError, match="not a multiple of the block size"):
        fake.minmax_grid(torch.zeros(2, 40), 32)


def test_minmax_int4_is_lossless_on_a_model_on_its_grid(teacher, tmp):
    """The teacher's projections moved onto the minmax grid (as a dequantized Q4_1 GGUF's are): the quantize
    pass's `algorithm: minmax` ONNX model computes what torch does, where RTN int4 of the same weights does
    not; the fake-quantized forward is the exported model's."""
    a = load(teacher)
    summary = fake.wrap(a.model, fake.GridSpec(**MINMAX, embeddings=False))
    fake.unwrap(a.model)
    assert summary["modules"] == {"4-bit minmax": 28}
    ctx = ctx_for(tmp / "minmax")
    onnx_fp = get("export")().run(a, ctx)
    out = {alg: get("quantize")(method="ort-int8-dynamic", weight_bits=4, block_size=32, algorithm=alg,
                                quantize_embeddings=False).run(onnx_fp, ctx) for alg in ("minmax", "rtn")}
    info = out["minmax"].info
    assert out["minmax"].quantization["algorithm"] == "minmax" and info["offset_corrections"] == 28
    from compress.quant import ort, sensitivity  # keep_8bit_blocks ranks blocks on the grid they will get

    proto = onnx.load(str(onnx_fp.onnx_dir / "model.onnx"))
    errors = {alg: sensitivity.weight_error(proto, ort.decoder_blocks(proto), block_size=32, symmetric=True,
                                            algorithm=alg) for alg in ("minmax", "rtn")}
    assert max(errors["minmax"].values()) < 1e-3 < min(errors["rtn"].values())
    ids = DATA.lm_windows("eval", a.tokenizer)[:4]
    mask = np.ones_like(ids.numpy())
    exact = {alg: EdgeModel(fp32_compute(q.onnx_dir, tmp / f"minmax-{alg}-fp32")).logits(ids.numpy(), mask)
             for alg, q in out.items()}
    with torch.no_grad():
        plain = a.model(input_ids=ids).logits.numpy()
        fake.wrap(a.model, fake.GridSpec(**MINMAX, embeddings=False))
        fq = a.model(input_ids=ids).logits.numpy()
    fake.unwrap(a.model)
    assert np.abs(fq - plain).max() < 1e-4  # on the grid already: the fake forward changes nothing
    assert np.abs(exact["minmax"] - plain).max() < 1e-3 * np.abs(plain).max()
    assert np.abs(exact["rtn"] - plain).mean() > 20 * np.abs(exact["minmax"] - plain).mean()
    deployed = EdgeModel(out["minmax"].onnx_dir).logits(ids.numpy(), mask)  # accuracy_level 4, as shipped
    assert (deployed.argmax(-1) == plain.argmax(-1)).mean() > 0.97


def test_qad_on_the_minmax_grid_records_it_for_the_quantize_pass(teacher, tmp):
    out = get("distill")(alpha=1.0, temperature=1.0, max_steps=4, lr=5e-4, quantize_aware=MINMAX,
                         **FAST).run(load(teacher), ctx_for(tmp / "qad-minmax", str(teacher)))
    info = out.info["quantize_aware"]
    assert info["algorithm"] == "minmax" and info["off_grid"] == 0 and info["modules"]["4-bit minmax"] == 28
    assert fake.grid_mismatch(out, bits=4, block_size=32, symmetric=False, algorithm="minmax") is None
    assert "algorithm rtn (trained for minmax)" in fake.grid_mismatch(out, bits=4, block_size=32, symmetric=True)


def test_int4_embedding_table_is_what_the_fake_forward_sees(teacher, tmp):
    """`embedding_bits: 4`: the tied table on MatMulNBits' symmetric 4-bit grid, one set of bytes read by the
    Gather (GatherBlockQuantized) and the head (MatMulNBits); the model QAD trained (projected onto the grid) is
    what ONNX Runtime computes, and the table costs half a byte a weight less than at 8 bits."""
    a = load(teacher)
    summary = fake.wrap(a.model, fake.GridSpec(**MINMAX, embedding_bits=4))
    fake.unwrap(a.model)  # now on the grid, the table included
    assert summary["modules"] == {"int4 tables": 2, "4-bit minmax": 28}
    ctx = ctx_for(tmp / "int4-table")
    onnx_fp = get("export")().run(a, ctx)
    q = {bits: get("quantize")(method="ort-int8-dynamic", weight_bits=4, block_size=32, algorithm="minmax",
                               embedding_bits=bits).run(onnx_fp, ctx) for bits in (4, 8)}
    info = q[4].info
    assert info["int4_embedding_tables"] == ["model.embed_tokens.weight"] and info["int8_embedding_tables"] == []
    assert q[4].quantization["embedding_bits"] == 4
    nodes = onnx.load(str(q[4].onnx_dir / "model.onnx")).graph.node
    gather = next(n for n in nodes if n.op_type == "GatherBlockQuantized")
    head = next(n for n in nodes if n.op_type == "MatMulNBits" and n.input[1] == "model.embed_tokens.weight_uint8")
    assert {x.name: x.i for x in gather.attribute}["bits"] == 4 == {x.name: x.i for x in head.attribute}["bits"]
    saved = q[8].info["onnx_bytes"] - info["onnx_bytes"]
    # int8 b32 -> int4 b32: half a byte a weight, less 2 bytes a block (the 4-bit scales are float32, not fp16)
    expect = 384 * 32 * 0.5 - 384 * 2
    assert abs(saved - expect) < 0.1 * expect
    ids = DATA.lm_windows("eval", a.tokenizer)[:4]
    mask = np.ones_like(ids.numpy())
    exact = EdgeModel(fp32_compute(q[4].onnx_dir, tmp / "int4-table-fp32")).logits(ids.numpy(), mask)
    with torch.no_grad():
        plain = a.model(input_ids=ids).logits.numpy()
    assert np.abs(exact - plain).max() < 1e-3 * np.abs(plain).max()
    with pytest.raises(ConfigError, match="embedding_bits: kernel matmulinteger; 4-bit embedding tables need "
                                          "kernel: matmulnbits"):
        get("quantize")(method="ort-int8-dynamic", kernel="matmulinteger", embedding_bits=4)
    with pytest.raises(ConfigError, match="embedding_bits 4 needs quantize_embeddings: true"):
        get("quantize")(method="ort-int8-dynamic", quantize_embeddings=False, embedding_bits=4)
    assert "embedding_bits 8 (trained for 4)" in fake.grid_mismatch(
        _qad_record(MINMAX | {"embedding_bits": 4}), bits=4, block_size=32, symmetric=False, algorithm="minmax")


def _qad_record(qa: dict) -> Artifact:
    return Artifact("torch", "causal-lm", None, None, info={"quantize_aware": qa})
