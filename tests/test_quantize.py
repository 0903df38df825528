"""The quantize pass on tiny models: ONNX-side methods with their discrepancy check, calibration that
follows the data it is given, and torch-side int8/4-bit layers that reload exactly in a fresh process."""
import collections
import dataclasses
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama, tiny_tokenizer

from compress import load, save
from compress.checkpoint import Artifact
from compress.data import DataSpec, PipelineData
from compress.edge import EdgeModel
from compress.errors import ConfigError, UnsupportedModelError
from compress.onnx_tools import DiscrepancyError
from compress.passes import PassContext, get
from compress.quant.ort import activation_scales, lm_head_nodes

VOCAB_ROWS = tiny_llama().config.vocab_size
SHAKESPEARE = PipelineData(train=DataSpec(source="builtin:shakespeare", max_examples=2))


@pytest.fixture(scope="module")
def onnx_llama(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx-llama")
    art = Artifact(kind="torch", task="causal-lm", tokenizer=tiny_tokenizer(), model=tiny_llama())
    out = get("export")().run(art, PassContext(task="causal-lm", scratch=tmp / "scratch"))
    return load(save(out, tmp / "ck"))


def quantize(parent, tmp_path, data=SHAKESPEARE, **options):
    ctx = PassContext(task=parent.task, scratch=tmp_path / "scratch", data=data)
    out = get("quantize")(**options).run(parent, ctx)
    return load(save(out, tmp_path / f"q-{options['method']}"))


@pytest.mark.parametrize("options", [
    {"method": "ort-int8-dynamic"},  # default: MatMulNBits int8, block-wise activations
    {"method": "ort-int8-dynamic", "kernel": "matmulinteger", "per_channel": False},
    {"method": "ort-int8-dynamic", "weight_bits": 4},
    {"method": "ort-int8-dynamic", "weight_bits": 4, "algorithm": "minmax"},  # per-block offsets
    {"method": "ort-int8-static", "calibration_batches": 2},
    {"method": "ort-fp16"},
])
def test_ort_methods(onnx_llama, tmp_path, options):
    q = quantize(onnx_llama, tmp_path, **options)
    assert q.kind == "onnx" and q.quantization["method"] == options["method"]
    d = q.info["discrepancy"]
    assert d["passed"] and d["top1_agreement"] >= 0.75 and d["decode_max_abs_error"] < 0.2
    ops = {n.op_type for n in onnx.load(str(q.path / "model.onnx")).graph.node}
    expect = {"ort-int8-dynamic": "MatMulNBits" if options.get("kernel") != "matmulinteger" else "MatMulInteger",
              "ort-int8-static": "QuantizeLinear", "ort-fp16": "Cast"}[options["method"]]
    assert expect in ops
    if options["method"] != "ort-int8-static":  # QDQ keeps float weights beside the int8 ones on disk
        assert q.info["onnx_bytes"] < q.info["parent_onnx_bytes"]
    edge = EdgeModel(q.path)  # still generates with the KV cache, fp32 inputs and outputs
    ids = np.array([[10, 20, 30, 40]])
    assert edge.generate(ids, 5).shape == (1, 9)
    from benchmarks.harness import onnx_params

    # the parent's parameters: 4-bit weights two a byte, each counted once; no scales, zero points or offsets
    # (static int8's smoothing gives a norm gain that two nodes shared a copy of its own: 8 x 32 more)
    extra = 256 if options["method"] == "ort-int8-static" else 0
    assert onnx_params(q.path) == onnx_params(onnx_llama.path) + extra
    assert edge.logits(ids).dtype == np.float32


@pytest.mark.parametrize("method", ["ort-int8-dynamic", "ort-int8-static", "ort-fp16"])
def test_quantize_after_fused_export(tmp_path, method):
    """ORT fusions (contrib ops such as RotaryEmbedding) must not defeat the quantizers' type inference."""
    art = Artifact(kind="torch", task="causal-lm", tokenizer=tiny_tokenizer(), model=tiny_llama())
    fused = load(save(get("export")(optimize=True).run(art, PassContext(scratch=tmp_path / "s")), tmp_path / "f"))
    assert fused.info["optimization"]["fused_operators"]
    options = {"ort-int8-dynamic": {"kernel": "matmulinteger"}, "ort-int8-static": {"calibration_batches": 1}}
    q = quantize(fused, tmp_path, method=method, **options.get(method, {}))
    assert q.info["discrepancy"]["passed"] and q.info["discrepancy"]["top1_agreement"] >= 0.75


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fp16_keeps_an_excluded_block_in_fp32(tmp_path, arch):
    """Excluded nodes stay fp32 with casts around them: the converter wrote one Cast per excluded reader of a
    tensor, all with the same name (Llama: an invalid graph), and found no types after contrib ops (the fused
    GPT-2's SkipLayerNormalization: a type error); either failed when the model loaded."""
    from onnx import numpy_helper

    model, scope = (tiny_llama(), "/model/layers.0/") if arch == "llama" else (tiny_gpt2(), "/transformer/h.0/")
    art = Artifact(kind="torch", task="causal-lm", tokenizer=tiny_tokenizer(), model=model)
    exported = load(save(get("export")().run(art, PassContext(scratch=tmp_path / "s")), tmp_path / "e"))
    q = quantize(exported, tmp_path, method="ort-fp16", exclude=[scope + "*"])
    assert q.info["discrepancy"]["passed"] and q.info["discrepancy"]["top1_agreement"] >= 0.9
    graph = onnx.load(str(q.path / "model.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i).dtype for i in graph.initializer}
    kept = [n for n in graph.node if n.name.startswith(scope) and n.op_type == "MatMul" and n.input[1] in inits]
    assert kept and all(inits[n.input[1]] == np.float32 for n in kept)
    assert np.float16 in inits.values()


def test_each_method_takes_only_its_own_options():
    """quantize's options are a union discriminated on `method`: another method's option is an error that
    names the method, and a resolved config holds (and hashes) only the chosen method's options."""
    with pytest.raises(ConfigError, match="unknown option 'bnb_threshold' for method ort-int8-dynamic"):
        get("quantize")(method="ort-int8-dynamic", bnb_threshold=3.0)
    with pytest.raises(ConfigError, match="unknown option 'exclude' for the dtype casts"):
        get("quantize")(method="bf16", exclude=["*lm_head"])
    with pytest.raises(ConfigError, match="unknown method 'ort-int8'; did you mean"):
        get("quantize")(method="ort-int8")
    with pytest.raises(ConfigError, match=r"unknown method \['bf16'\]"):
        get("quantize")(method=["bf16"])
    # values ONNX Runtime (or torch's exporter) would refuse mid-run are refused here, naming the field
    with pytest.raises(ConfigError, match="quantize.block_size: Input should be 16, 32, 64, 128 or 256"):
        get("quantize")(method="ort-int8-dynamic", block_size=48)
    with pytest.raises(ConfigError, match="quantize.bnb_blocksize: Input should be 32, 64, .* 2048 or 4096"):
        get("quantize")(method="bnb-nf4", bnb_blocksize=48)
    with pytest.raises(ConfigError, match="weight_bits: kernel rowwise, which is 8-bit only; 4-bit weights need "
                                          "kernel: matmulnbits"):
        get("quantize")(method="ort-int8-dynamic", kernel="rowwise", weight_bits=4)
    with pytest.raises(ConfigError, match="smooth_alpha applies to kernels matmulinteger and matmulnbits"):
        get("quantize")(method="ort-int8-dynamic", kernel="rowwise", smooth_alpha=0.7)
    for kernel in ("matmulinteger", "matmulnbits"):
        assert "smooth_alpha" in get("quantize")(method="ort-int8-dynamic", kernel=kernel,
                                                 smooth_alpha=0.7).needs_data()[1]
    with pytest.raises(ConfigError, match="export.opset: Input should be less than or equal to 20"):
        get("export")(opset=99)
    dumped = get("quantize")(method="bnb-nf4").config.model_dump()
    assert set(dumped) == {"method", "exclude", "bnb_blocksize", "bnb_compute_dtype"}


@pytest.mark.parametrize("method", ["ort-int8-dynamic", "ort-int8-static", "ort-fp16"])
def test_check_options_with_check_off_are_refused(method):
    """check: false with a tolerance (or sample count) the user set would silently drop the quality gate they
    asked for: refused, naming both options. Defaults never trip it."""
    with pytest.raises(ConfigError, match=r"quantize: min_agreement applies to the discrepancy check, which "
                                          r"check: false turns off; set check: true or remove min_agreement"):
        get("quantize")(method=method, check=False, min_agreement=0.999)
    with pytest.raises(ConfigError, match=r"check_samples / max_abs_error apply to .* check: false"):
        get("quantize")(method=method, check=False, max_abs_error=0.1, check_samples=8)
    assert not get("quantize")(method=method, check=False).config.check
    assert get("quantize")(method=method, min_agreement=0.999).config.min_agreement == 0.999


def test_check_off_with_a_tolerance_exits_2_at_validate(tiny_llama_dir, tmp_path, capsys):
    from pipelines.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: q\nmodel: {{source: {tiny_llama_dir}}}\npasses:\n  - export: {{}}\n"
                   "  - quantize: {method: ort-int8-dynamic, check: false, min_agreement: 0.999}\n")
    assert main(["validate", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "min_agreement" in err and "check: false" in err and "Traceback" not in err
    assert get("quantize")().config.model_dump() == {"method": "bf16"}


@pytest.mark.parametrize("options", [{}, {"weight_bits": 4, "algorithm": "gptq", "min_agreement": 0}])
def test_exclusion_by_pattern(onnx_llama, tmp_path, options):
    """Excluded MatMuls stay float, GPTQ's too (ONNX Runtime's GPTQ path ignores its nodes_to_exclude)."""
    q = quantize(onnx_llama, tmp_path, method="ort-int8-dynamic", exclude=["*layers.0/*", "*down_proj*"],
                 calibration_batches=1, calibration_seq_len=32, **options)
    excluded = q.quantization["excluded_nodes"]
    assert excluded and all("layers.0/" in n or "down_proj" in n for n in excluded)
    nodes = onnx.load(str(q.path / "model.onnx")).graph.node
    float_matmuls = {n.name for n in nodes if n.op_type == "MatMul"}
    assert "/model/layers.0/self_attn/q_proj/MatMul" in float_matmuls
    assert "/model/layers.1/mlp/down_proj/MatMul" in float_matmuls
    assert "/model/layers.1/mlp/up_proj/MatMul" not in float_matmuls


@pytest.mark.parametrize("options", [{"method": "ort-int8-dynamic"}, {"method": "ort-fp16"},
                                     {"method": "ort-int8-dynamic", "kernel": "rowwise"}])
def test_exclusion_of_everything_is_refused(onnx_llama, tmp_path, options):
    """An exclude list that matches every node leaves the parent unchanged: refused, as the torch methods'
    and ort-int8-static's are, rather than a checkpoint recorded as quantized."""
    with pytest.raises(ConfigError, match=r"quantize.exclude: \['\*'\] leaves nothing of this graph to quantize"):
        quantize(onnx_llama, tmp_path, exclude=["*"], **options)
    assert not (tmp_path / f"q-{options['method']}").exists()


def test_exclusion_matching_nothing_is_refused(onnx_llama, tmp_path):
    """An exclude list none of whose patterns matches (a typo, or a torch module name given to an ort-* method)
    is an error naming it, as keep_8bit's is: it quantized the layers it was meant to keep."""
    with pytest.raises(ConfigError, match=r"quantize.exclude: \['lm_head'\] matches no node of the ONNX graph"):
        quantize(onnx_llama, tmp_path, method="ort-int8-dynamic", exclude=["lm_head"])
    torch_art = Artifact(kind="torch", task="causal-lm", tokenizer=tiny_tokenizer(), model=tiny_llama())
    with pytest.raises(ConfigError, match=r"quantize.exclude: \['/lm_head/\*'\] matches no module of the model"):
        get("quantize")(method="torch-int8-dynamic", exclude=["/lm_head/*"]).run(torch_art, PassContext())
    q = get("quantize")(method="torch-int8-dynamic", exclude=["*lm_head", "*nothing*"]).run(torch_art, PassContext())
    assert q.quantization["layers"] == 28


@pytest.mark.parametrize("exclude", [None, ["*lm_head*"]])
def test_int8_embedding_shared_with_tied_head(onnx_llama, tmp_path, exclude):
    """The embedding table is stored once, as int8 blocks: the Gather reads it and so does the tied LM head
    (an int8 MatMulNBits over the same bytes), or the dequantized table when the head is excluded."""
    from onnx import numpy_helper

    q = quantize(onnx_llama, tmp_path, method="ort-int8-dynamic", exclude=exclude)
    model = onnx.load(str(q.path / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert q.info["int8_embedding_tables"] == ["model.embed_tokens.weight"]
    assert not any(w.dtype == np.float32 and w.size >= VOCAB_ROWS * 32 for w in inits.values())
    packed, scale = inits["model.embed_tokens.weight_uint8"], inits["model.embed_tokens.weight_scale_fp16"]
    assert packed.dtype == np.uint8 and packed.shape == (VOCAB_ROWS, 1, 32) and scale.shape == (VOCAB_ROWS, 1)
    parent = numpy_helper.to_array(next(i for i in onnx.load(str(onnx_llama.path / "model.onnx")).graph.initializer
                                        if i.name == "model.embed_tokens.weight"))
    table = ((packed.astype(np.float32) - 128) * scale[..., None]).reshape(parent.shape)
    assert np.abs(table - parent).max() <= scale.max() / 2 + 1e-7  # round-to-nearest in each block
    nodes = {n.name: n for n in model.graph.node}
    head = nodes[lm_head_nodes(model)[0]]
    assert [n.op_type for n in model.graph.node].count("GatherBlockQuantized") == 1
    if exclude is None:
        assert head.op_type == "MatMulNBits" and head.input[1] == "model.embed_tokens.weight_uint8"
    else:
        assert head.op_type == "MatMul" and q.quantization["excluded_nodes"] == ["/lm_head/MatMul"]
    import onnxruntime as ort  # the float32 scales (and the head's float copy) are computed when the session starts

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(q.path / "model.onnx"), so, providers=["CPUExecutionProvider"])
    left = [n.name for n in onnx.load(so.optimized_model_filepath).graph.node if "embed_tokens" in n.name]
    assert left == ["/model/embed_tokens/Gather"]
    assert q.info["discrepancy"]["top1_agreement"] >= 0.9


@pytest.mark.parametrize("options", [{"block_size": 64}, {"exclude": ["*lm_head*"]}])
def test_4_bit_table_that_stays_8_bit_says_so(onnx_llama, tmp_path, options):
    """embedding_bits 4 keeps a table at 8 bits when block_size does not divide its rows (32 wide here) or an
    excluded head reads it in float: the manifest's notes say so, where the option was silently ignored."""
    q = quantize(onnx_llama, tmp_path, method="ort-int8-dynamic", embedding_bits=4, **options)
    assert q.info["int8_embedding_tables"] == ["model.embed_tokens.weight"] and not q.info["int4_embedding_tables"]
    assert any(n.startswith("quantize: embedding_bits 4 left the embedding tables ['model.embed_tokens.weight'] "
                            "at 8 bits") for n in q.info["notes"])


def test_int8_table_on_llama_cpp_q8_0_grid_is_stored_exactly(tmp_path):
    """A vocabulary table that came from a GGUF file's Q8_0 (blocks of 32, symmetric, fp16 scales: the packaged
    SmolLM2's) is stored again without error, in blocks of 32 also where the width allows 64."""
    from onnx import numpy_helper

    model = tiny_llama(hidden_size=64, num_hidden_layers=1)
    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, (VOCAB_ROWS, 2, 32))
    codes[:, :, 0] = 127  # each block reaches its scale's range, as Q8_0's do
    scale = (rng.random((VOCAB_ROWS, 2, 1)) * 1e-3 + 1e-4).astype(np.float16).astype(np.float32)
    table = (codes * scale).reshape(VOCAB_ROWS, 64).astype(np.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.from_numpy(table))
    art = Artifact(kind="torch", task="causal-lm", tokenizer=tiny_tokenizer(), model=model)
    exported = load(save(get("export")().run(art, PassContext(scratch=tmp_path / "s")), tmp_path / "e"))
    q = quantize(exported, tmp_path, method="ort-int8-dynamic")
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(q.path / "model.onnx")).graph.initializer}
    packed, scales = inits["model.embed_tokens.weight_uint8"], inits["model.embed_tokens.weight_scale_fp16"]
    assert packed.shape == (VOCAB_ROWS, 2, 32) and scales.shape == (VOCAB_ROWS, 2)
    stored = (packed.astype(np.float32) - 128) * scales[..., None]
    assert np.array_equal(stored.reshape(VOCAB_ROWS, 64), table)


def test_static_calibration_follows_the_data(onnx_llama, tmp_path):
    other = PipelineData(train=DataSpec(source="builtin:wikipedia", max_examples=2))
    a = quantize(onnx_llama, tmp_path / "a", method="ort-int8-static", calibration_batches=2)
    b = quantize(onnx_llama, tmp_path / "b", method="ort-int8-static", calibration_batches=2, data=other)
    a2 = quantize(onnx_llama, tmp_path / "a2", method="ort-int8-static", calibration_batches=2)
    sa, sb, sa2 = (activation_scales(onnx.load(str(q.path / "model.onnx"))) for q in (a, b, a2))
    assert sa.keys() == sb.keys() and len(sa) > 10
    assert sa == sa2  # same data, same scales
    changed = sum(abs(sa[k] - sb[k]) > 1e-6 * max(sa[k], 1e-12) for k in sa)
    assert changed > len(sa) // 2  # different data, different scales
    assert a.info["calibration"]["tokens"] == 2 * 128


def test_static_calibration_progress_goes_to_the_log_not_the_terminal(onnx_llama, tmp_path, capfd, caplog):
    """ONNX Runtime's calibrator prints its progress; it goes to the log (a run's run.log), as other
    libraries' output does, and not to the terminal."""
    import logging

    with caplog.at_level(logging.INFO, logger="onnxruntime.quantization"):
        quantize(onnx_llama, tmp_path, method="ort-int8-static", calibration_batches=1, check=False)
    assert "Collecting tensor data" not in capfd.readouterr().out
    logged = [r.getMessage() for r in caplog.records if r.name == "onnxruntime.quantization"]
    assert len(logged) == 1 and logged[0].startswith("Collecting tensor data and making histogram ...")


def test_static_without_calibration_data_is_refused(onnx_llama, tmp_path):
    with pytest.raises(ConfigError, match="data.calibration"):
        quantize(onnx_llama, tmp_path, data=None, method="ort-int8-static")


def test_quantize_check_fails_with_numbers(onnx_llama, tmp_path):
    with pytest.raises(DiscrepancyError, match=r"top-1 agreement [0-9.]+ < 1.*Loosen quantize.min_agreement only"):
        quantize(onnx_llama, tmp_path, method="ort-int8-dynamic", weight_bits=4, min_agreement=1.0,
                 check_samples=8)


def test_refusals(onnx_llama, tmp_path):
    torch_art = Artifact(kind="torch", task="causal-lm", tokenizer=tiny_tokenizer(), model=tiny_llama())
    with pytest.raises(UnsupportedModelError, match="add an `export` pass"):
        get("quantize")(method="ort-int8-dynamic").run(torch_art, PassContext(scratch=tmp_path))
    with pytest.raises(UnsupportedModelError, match="needs a torch model"):
        get("quantize")(method="bnb-int8").run(onnx_llama, PassContext(scratch=tmp_path))
    encoder = dataclasses.replace(onnx_llama, task="feature-extraction")  # auto picks an 8-bit-only kernel
    with pytest.raises(ConfigError, match="quantize.weight_bits: kernel auto is matmulinteger on a "
                                          "feature-extraction model, which is 8-bit only"):
        get("quantize")(method="ort-int8-dynamic", weight_bits=4).run(encoder, PassContext(scratch=tmp_path))
    q = quantize(onnx_llama, tmp_path, method="ort-fp16")
    with pytest.raises(UnsupportedModelError, match="quantizing twice"):
        get("quantize")(method="ort-int8-dynamic").run(q, PassContext(scratch=tmp_path))


RELOAD = """
import sys, torch, compress
torch.set_num_threads(1)
ids = torch.load(sys.argv[1])
outs = {}
for path in sys.argv[2:]:
    with torch.no_grad():
        outs[path] = compress.load(path).model(input_ids=ids).logits.float()
torch.save(outs, sys.argv[1] + ".out")
"""
TORCH_METHODS = ["torch-int8-dynamic", "bnb-int8", "bnb-nf4", "bnb-fp4"]


def test_torch_side_round_trip_in_fresh_process(tmp_path):
    """Every torch-side method on Llama and BERT: saved, reloaded by compress.load in ONE fresh process
    (to keep the test fast), bit-identical logits."""
    ids = torch.randint(5, 384, (2, 9))
    torch.save(ids, tmp_path / "ids.pt")
    before, refs = {}, {}
    for arch in ("llama", "bert"):
        task = "causal-lm" if arch == "llama" else "sequence-classification"
        build = tiny_llama if arch == "llama" else tiny_bert
        with torch.no_grad():
            refs[arch] = build()(input_ids=ids).logits
        for method in TORCH_METHODS:
            art = Artifact(kind="torch", task=task, model=build(),
                           tokenizer=tiny_tokenizer("causal" if arch == "llama" else "encoder"))
            out = get("quantize")(method=method).run(art, PassContext(task=task))
            with torch.no_grad():
                logits = out.model(input_ids=ids).logits.float()
            path = save(out, tmp_path / f"{arch}-{method}")
            before[str(path)] = (arch, method, logits)
            manifest = json.loads((path / "manifest.json").read_text())
            assert manifest["quantization"]["method"] == method
            entry = manifest["structure"][-1]
            assert entry["type"] == "quantized-linear" and entry["method"] == method
            assert "lm_head" not in entry["modules"] and len(entry["modules"]) == (28 if arch == "llama" else 26)
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "ids.pt"), *before],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = torch.load(str(tmp_path / "ids.pt") + ".out")
    for path, (arch, method, logits) in before.items():
        assert torch.equal(logits, after[path]), (arch, method)  # bit-identical after reload
        err = (logits - refs[arch]).abs().max().item()
        assert 0 < err < (0.02 if method in ("torch-int8-dynamic", "bnb-int8") else 0.3), (arch, method, err)


@pytest.mark.parametrize("method", ["bf16", "fp16"])
@pytest.mark.parametrize("family, structured", [("llama", False), ("llama", True), ("gemma3", False)],
                         ids=["llama", "llama-lowrank", "gemma3"])
def test_a_dtype_cast_equals_its_reload_and_leaves_its_input_as_it_was(tmp_path, method, family, structured):
    """model.to(dtype) also rounded Llama's rotary inv_freq (a buffer not saved), which from_pretrained keeps float32:
    the cast model's logits differed from its reload (3.9e-3 in bf16, 4.9e-4 in fp16), and the input was cast in
    place. Gemma 3's embed_scale is made in the default dtype, so it follows the cast; a structured checkpoint
    (from_config, then its structure) reloads with the same dtypes as a stock one."""
    from tiny_models import family_tokenizer, tiny_family

    from compress.pruning.lowrank import apply_lowrank

    model = tiny_family(family)
    structure = [{"type": "lowrank", "ranks": {"model.layers.0.mlp.down_proj": 4}}] if structured else []
    for entry in structure:
        apply_lowrank(model, entry)
    before = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}
    before.update({k: v.clone() for k, v in model.named_buffers()})  # with the ones not saved (inv_freq)
    config_dtype = model.config.dtype
    art = Artifact(kind="torch", task="causal-lm", tokenizer=family_tokenizer(family), model=model, structure=structure)
    out = get("quantize")(method=method).run(art, PassContext(task="causal-lm"))
    after = {**model.state_dict(keep_vars=True), **dict(model.named_buffers())}
    assert all(v.dtype == before[k].dtype and torch.equal(v, before[k]) for k, v in after.items())
    assert model.config.dtype == config_dtype
    reloaded = load(save(out, tmp_path / "cast")).model
    dtypes = {k: v.dtype for k, v in out.model.named_buffers()}
    assert dtypes == {k: v.dtype for k, v in reloaded.named_buffers()}
    assert dtypes["model.rotary_emb.inv_freq"] == torch.float32
    if family == "gemma3":
        assert dtypes["model.embed_tokens.embed_scale"] == out.model.dtype
    ids = torch.randint(5, 384, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(out.model(input_ids=ids).logits, reloaded(input_ids=ids).logits, rtol=0, atol=0)


def test_fp32_cast_keeps_working(tmp_path):
    art = Artifact(kind="torch", task="causal-lm", tokenizer=tiny_tokenizer(), model=tiny_llama())
    out = get("quantize")(method="bf16").run(art, PassContext())
    assert next(out.model.parameters()).dtype == torch.bfloat16 and out.quantization == {"method": "bf16", "bits": 16}



def _logits(model, feed) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["logits"], feed)[0]


def test_smoothing_keeps_the_function_and_flattens_the_outliers(onnx_llama):
    """SmoothQuant-style smoothing is exact in float; it finds the projection groups of every block of the
    tiny Llama (q/k/v after the input norm, gate/up after the post-attention norm, down after the SwiGLU
    product) and flattens an outlier channel like those RMSNorm gains make."""
    from onnx import numpy_helper

    from compress.quant.ort import _load, calibration_feeds
    from compress.quant.smooth import channel_absmax, find_groups, smooth

    model = _load(onnx_llama.path)
    ids = np.random.default_rng(0).integers(5, 300, (4, 16))
    feeds = calibration_feeds(onnx_llama.path, ids, np.ones_like(ids), batch_size=2)
    groups = find_groups(model)
    layers = tiny_llama().config.num_hidden_layers
    sizes = [len(g.consumers) for g in groups]
    assert sizes.count(3) == layers and sizes.count(2) == layers  # q/k/v and gate/up of every block
    assert sum(g.divide_columns is not None for g in groups) == layers  # down_proj: via up_proj's columns
    qkv = next(g for g in groups if len(g.consumers) == 3)
    gain = next(i for i in model.graph.initializer if i.name == qkv.divide_vectors[0])
    planted = numpy_helper.to_array(gain).copy()
    planted[3] *= 50.0  # one channel 50x larger, as in real Llama-family models
    gain.CopyFrom(numpy_helper.from_array(planted, gain.name))
    before_out = _logits(model, feeds[0])
    before = channel_absmax(model, [qkv.activation], feeds)[qkv.activation]

    info = smooth(model, feeds, alpha=0.5)
    after = channel_absmax(model, [qkv.activation], feeds)[qkv.activation]
    assert info["groups"] == len(groups)
    np.testing.assert_allclose(_logits(model, feeds[0]), before_out, rtol=1e-4, atol=1e-4)  # same function
    assert before.max() / np.median(before) > 20
    assert after.max() / np.median(after) < before.max() / np.median(before) / 4  # the outlier is flattened
    assert info["max_over_median_after"] < info["max_over_median_before"]
    assert not find_groups(model, skip={c.name for g in groups for c in g.consumers})  # all skipped: none


def test_static_int8_runs_integer_kernels_and_smoothing_helps_an_outlier_model(tmp_path):
    """uint8 activations become integer matmuls in ONNX Runtime's CPU graph (int8 ones mostly stay float),
    the products of two activations (attention) stay float, and on a tiny Llama with a planted outlier
    channel smoothing raises agreement with the float model."""
    import onnxruntime as ort

    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[3] = 60.0
            layer.post_attention_layernorm.weight[5] = 60.0
    art = Artifact(kind="torch", task="causal-lm", tokenizer=tiny_tokenizer(), model=model)
    parent = load(save(get("export")().run(art, PassContext(scratch=tmp_path / "s")), tmp_path / "ck"))
    agreement, fused_ops = {}, {}
    for name, opts in {"plain": {"smooth_alpha": None}, "smoothed": {"smooth_alpha": 0.5},
                       "int8-acts": {"smooth_alpha": None, "activations": "int8"}}.items():
        q = quantize(parent, tmp_path / name, method="ort-int8-static", calibration_batches=4,
                     min_agreement=0.0, **opts)
        agreement[name] = q.info["discrepancy"]["top1_agreement"]
        opt = ort.SessionOptions()
        opt.optimized_model_filepath = str(tmp_path / f"{name}-optimized.onnx")
        ort.InferenceSession(str(q.path / "model.onnx"), opt, providers=["CPUExecutionProvider"])
        fused_ops[name] = collections.Counter(n.op_type for n in onnx.load(opt.optimized_model_filepath).graph.node)
        assert (q.info["smoothing"] is not None) == (name == "smoothed")
    integer = {k: ops["QLinearMatMul"] + ops["MatMulIntegerToFloat"] for k, ops in fused_ops.items()}
    # q/k/v/o/gate/up of every block and nothing else: down_proj, the LM head and the attention products
    # stay float by default
    assert integer["plain"] == integer["smoothed"] == 6 * model.config.num_hidden_layers
    assert integer["int8-acts"] < integer["plain"] / 2  # int8 activations: most stay dequantize + float
    assert agreement["smoothed"] > agreement["plain"], agreement


def _one_matmul(folder):
    """An ONNX model of one MatMul by a 96 x 48 weight (x: 5 x 96) saved in `folder`; its weight and input."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 48)).astype(np.float32)
    x = rng.standard_normal((5, 96)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 96])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 48])],
                              [numpy_helper.from_array(w, "w")])
    folder.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10),
              str(folder / "model.onnx"))
    return w, x


@pytest.mark.parametrize("bits", [4, 8])
def test_hqq_zero_points_become_integer_at_both_widths_and_any_k(tmp_path, bits):
    """HQQ's float zero points have no 8-bit MatMulNBits kernel and a slow 4-bit one: they are rewritten to the
    default zero point plus exact per-block offsets, also when K is not a multiple of the block (a low-rank
    factor's rank: 96 = 64 + a short block of 32)."""
    import onnxruntime

    from compress.quant import ort as ort_quant

    w, x = _one_matmul(tmp_path / "src")
    info = ort_quant.weight_only(tmp_path / "src", tmp_path / "dst", bits=bits, block_size=64, accuracy_level=0,
                                 symmetric=False, exclude=[], algorithm="hqq")
    model = onnx.load(str(tmp_path / "dst" / "model.onnx"))
    (node,) = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert info["offset_corrections"] == 1 and len(node.input) == 3  # no zero point input: the default
    assert {a.name: a.i for a in node.attribute}["bits"] == bits
    y = onnxruntime.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    error = np.abs(y - x @ w).mean() / np.abs(x @ w).mean()
    assert error < (0.15 if bits == 4 else 0.01), error


@pytest.mark.parametrize("algorithm", ["minmax", "hqq"])
def test_4bit_offsets_fold_into_the_weights_as_rows(tmp_path, algorithm):
    """Per-block offsets of a 4-bit projection whose K is a multiple of the block become rows of its weights
    read against the block sums appended to its input (no MatMul or Add of their own): the product equals
    the fp16 table form's within three 4-bit roundings of the offsets, and the parameter count ignores the
    rows. K not a multiple (a low-rank factor's, under HQQ; minmax leaves it float) keeps the table."""
    import onnxruntime

    from benchmarks.harness import onnx_params
    from compress.quant import ort as ort_quant

    w, x = _one_matmul(tmp_path / "src")  # K 96: blocks of 32 fold, blocks of 64 do not
    outputs, graphs = {}, {}
    for roundings, block in ((0, 32), (3, 32), (3, 64))[:3 if algorithm == "hqq" else 2]:
        dst = tmp_path / f"r{roundings}-b{block}"
        info = ort_quant.weight_only(tmp_path / "src", dst, bits=4, block_size=block, accuracy_level=0,
                                     symmetric=False, exclude=[], algorithm=algorithm, offset_roundings=roundings)
        assert info["offset_corrections"] == 1
        graphs[roundings, block] = onnx.load(str(dst / "model.onnx"))
        outputs[roundings, block] = onnxruntime.InferenceSession(
            graphs[roundings, block].SerializeToString()).run(None, {"x": x})[0]
        assert onnx_params(dst) == w.size  # the weights once; no offsets, scales or appended rows
    ops = {key: collections.Counter(n.op_type for n in g.graph.node) for key, g in graphs.items()}
    assert ops[3, 32] == {"MatMulNBits": 1, "MatMul": 1, "Concat": 1}  # the block sums, appended
    assert ops[0, 32] == ops.get((3, 64), ops[0, 32]) == {"MatMulNBits": 1, "MatMul": 2, "Cast": 1, "Add": 1}
    (node,) = [n for n in graphs[3, 32].graph.node if n.op_type == "MatMulNBits"]
    assert {a.name: a.i for a in node.attribute}["K"] == 96 + 3 * 32  # 3 blocks of sums, padded to one block
    table, folded = outputs[0, 32], outputs[3, 32]
    scale = np.abs(table).max()
    assert 0 < np.abs(folded - table).max() < 5e-4 * scale  # three roundings of the offsets (two: 7e-4, 1.2e-3)
    assert np.abs(table - x @ w).mean() > 10 * np.abs(folded - table).mean()  # far below the 4-bit grid's error
    for bad in ({"algorithm": "rtn", "weight_bits": 4}, {"algorithm": "hqq", "weight_bits": 8}):
        with pytest.raises(ConfigError, match="offset_roundings folds the per-block offsets"):
            get("quantize")(method="ort-int8-dynamic", offset_roundings=3, **bad)


@pytest.mark.parametrize("algorithm", ["k_quant", "gptq"])
def test_k_quant_and_gptq_with_an_odd_number_of_blocks_per_row(tmp_path, algorithm):
    """ONNX Runtime's k_quant / gptq packed the 4-bit zero points across rows and failed ('cannot reshape
    array') when a weight's rows make an odd number of blocks (SmolLM2's 576 inputs in blocks of 64); they
    are stored per row, as MatMulNBits reads them, and the product stays close."""
    import onnxruntime

    from compress.quant import ort as ort_quant

    w, x = _one_matmul(tmp_path / "src")  # 96 rows: 3 blocks of 32 per column
    ort_quant.weight_only(tmp_path / "src", tmp_path / "dst", bits=4, block_size=32, accuracy_level=0,
                          symmetric=False, exclude=[], algorithm=algorithm, feeds=[{"x": x}])
    model = onnx.load(str(tmp_path / "dst" / "model.onnx"))
    (node,) = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    zero_points = next(i for i in model.graph.initializer if i.name == node.input[3])
    assert list(zero_points.dims) == [48, 2]  # per column: 3 blocks' 4-bit zero points in 2 bytes
    y = onnxruntime.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    error = np.abs(y - x @ w).mean() / np.abs(x @ w).mean()
    assert error < 0.15, error


def test_static_int8_quantizes_activations_on_the_fused_decoder_graph(tmp_path):
    """The default export of GPT-2 and Llama-shaped decoders is the suite's fused graph (SkipLayerNormalization,
    GroupQueryAttention): ONNX's type inference stops at those contrib ops, and the static quantizer then
    calibrated nothing and left every MatMul float (activation_tensors 0). Each block's MatMuls but the MLP
    output projection run as integer matmuls; an exclude that leaves nothing to quantize is refused."""
    import onnxruntime as ort

    art = Artifact(kind="torch", task="causal-lm", tokenizer=tiny_tokenizer(), model=tiny_gpt2())
    parent = load(save(get("export")().run(art, PassContext(scratch=tmp_path / "s")), tmp_path / "ck"))
    assert parent.info["graph"] == "fused"
    q = quantize(parent, tmp_path, method="ort-int8-static", calibration_batches=1)
    assert q.info["calibration"]["activation_tensors"] == 2 * 12  # input and output of 3 MatMuls a block
    assert q.info["discrepancy"]["passed"]
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(q.path / "model.onnx"), so, providers=["CPUExecutionProvider"])
    integer = sorted(n.name for n in onnx.load(so.optimized_model_filepath).graph.node if n.op_type == "QLinearMatMul")
    assert integer == sorted(f"/transformer/h.{i}/{m}/MatMul" for i in range(4)
                             for m in ("attn/c_attn", "attn/c_proj", "mlp/c_fc"))
    with pytest.raises(ConfigError, match=r"calibrated no activation .* narrow quantize.exclude"):
        quantize(parent, tmp_path / "all", method="ort-int8-static", calibration_batches=1, exclude=["*"])


def test_static_int8_on_the_fused_encoder_graph(tmp_path):
    """A BERT classifier exported with defaults is ONNX Runtime's fused encoder graph: its pooler's input
    went uncalibrated behind the contrib ops and quantizing the pooler's bias failed ('Unable to get valid
    quantization scale'). Now each block's attention output and intermediate dense, the pooler and the
    classifier are int8 (their inputs and outputs calibrated); the fused Attention stays float."""
    art = Artifact(kind="torch", task="sequence-classification", tokenizer=tiny_tokenizer("encoder"), model=tiny_bert())
    ctx = PassContext(task="sequence-classification", scratch=tmp_path / "s")
    parent = load(save(get("export")().run(art, ctx), tmp_path / "ck"))
    assert parent.info["optimization"]["fused_operators"]
    q = quantize(parent, tmp_path, method="ort-int8-static", calibration_batches=2)
    assert q.info["calibration"]["activation_tensors"] == 2 * (2 * 4 + 2)
    assert q.info["discrepancy"]["passed"] and q.info["discrepancy"]["top1_agreement"] >= 0.9


def test_minmax_says_which_matmuls_stay_float_and_refuses_to_quantize_nothing(tmp_path):
    """algorithm minmax stores whole blocks only: MatMuls whose input rows the block does not divide stay float
    with a note naming them and what fits, and a model where that is every MatMul (hidden 40) is refused;
    an embedding table whose width no int8 block divides stays float with a note (rtn pads the MatMuls)."""
    def exported(hidden, intermediate, name):
        model = tiny_llama(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1)
        art = Artifact(kind="torch", task="causal-lm", tokenizer=tiny_tokenizer(), model=model)
        return load(save(get("export")().run(art, PassContext(scratch=tmp_path / name)), tmp_path / name / "ck"))

    options = dict(method="ort-int8-dynamic", weight_bits=4, algorithm="minmax", check=False)
    q = quantize(exported(64, 96, "h64"), tmp_path / "h64", **options, block_size=64)
    assert q.info["float_matmuls"] == ["/model/layers.0/mlp/down_proj/MatMul"]
    assert q.info["notes"] == ["quantize: algorithm minmax leaves 1 MatMul(s) float: their input rows (96) are "
                               "not a multiple of block_size 64; block_size 16 or 32 fits them"]
    h40 = exported(40, 72, "h40")
    with pytest.raises(ConfigError, match=r"^quantize.block_size: nothing would be quantized: algorithm minmax "
                                          r"leaves 7 MatMul\(s\) float: their input rows \(40, 72\) are not a "
                                          r"multiple of block_size 32; no block size divides them; algorithm rtn or "
                                          r"hqq pads the last block$"):
        quantize(h40, tmp_path / "h40", **options)
    q = quantize(h40, tmp_path / "h40-rtn", **{**options, "algorithm": "rtn"})
    assert "float_matmuls" not in q.info and q.info["int8_embedding_tables"] == []
    assert q.info["notes"] == ["quantize: embedding tables ['model.embed_tokens.weight'] stay float: their row "
                               "width is not a multiple of 16 (the int8 / 4-bit tables' smallest block)"]


def test_sequences_past_the_graphs_export_max_length_are_refused_before_any_work(tmp_path):
    art = Artifact(kind="torch", task="causal-lm", tokenizer=tiny_tokenizer(), model=tiny_gpt2())  # fused
    short = load(save(get("export")(graph="fused", max_length=24, check_seq_len=16).run(
        art, PassContext(scratch=tmp_path / "s")), tmp_path / "f"))
    with pytest.raises(ConfigError, match=r"^quantize.check_seq_len: 64 tokens, more than the 24 positions this "
                       r"graph holds .* set quantize.check_seq_len to at most 24$"):
        quantize(short, tmp_path, method="ort-int8-dynamic")
    with pytest.raises(ConfigError, match=r"^quantize.calibration_seq_len: 128 tokens, more than the 24 positions"):
        quantize(short, tmp_path, method="ort-int8-static", check_seq_len=16)
    assert not list((tmp_path / "scratch").glob("quantize-*/model.onnx"))  # refused before any work
    q = quantize(short, tmp_path, method="ort-int8-static", check_seq_len=16, calibration_seq_len=24)
    assert q.info["discrepancy"]["passed"]


def test_blockwise_keeps_the_named_matmuls_block_wise_and_the_rest_per_tensor(onnx_llama, tmp_path):
    """kernel matmulinteger with `blockwise`: the named MatMuls become MatMulNBits int8 (blocks of block_size,
    accuracy level 4), every other projection per-tensor int8; smoothing leaves the block-wise ones alone."""
    from onnx import helper

    layers = tiny_llama().config.num_hidden_layers
    q = quantize(onnx_llama, tmp_path, method="ort-int8-dynamic", kernel="matmulinteger", smooth_alpha=0.7,
                 blockwise=["*down_proj*"], block_size=16, calibration_batches=2, min_agreement=0.0)
    graph = onnx.load(str(q.path / "model.onnx")).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits" and "down_proj" in n.name]
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nbits]
    assert len(nbits) == layers  # (the tied LM head reads the int8 embedding table through one more)
    assert all(a["bits"] == 8 and a["block_size"] == 16 and a["accuracy_level"] == 4 for a in attrs)
    integer = sum(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in graph.node)
    assert integer >= 3 * layers  # qkv, o, gate_up of every block at least
    assert q.quantization["blockwise_matmuls"] == layers and q.quantization["block_size"] == 16
    assert q.info["discrepancy"]["top1_agreement"] > 0.5
    with pytest.raises(ConfigError, match="quantize.blockwise: .* matches no MatMul"):
        quantize(onnx_llama, tmp_path / "none", method="ort-int8-dynamic", kernel="matmulinteger",
                 blockwise=["*no_such_proj*"])
    with pytest.raises(ConfigError, match="blockwise applies to kernel: matmulinteger"):
        get("quantize")(method="ort-int8-dynamic", kernel="matmulnbits", blockwise=["*down_proj*"])


def test_smoothing_before_block_wise_int8_evens_out_each_block_without_adding_nodes(tmp_path):
    """quantize.smooth_alpha with kernel matmulnbits at 8 bits: a planted outlier channel dominates the int8
    scale of its block of activations; smoothing (folded into the norm gains and up_proj's columns only) brings
    the quantized logits closer to the float model's, with exactly the same nodes."""
    model = tiny_llama(hidden_size=64, intermediate_size=128)  # head_dim 16, as GroupQueryAttention needs
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[3] = 60.0
            layer.post_attention_layernorm.weight[5] = 60.0
    art = Artifact(kind="torch", task="causal-lm", tokenizer=tiny_tokenizer(), model=model)
    parent = load(save(get("export")(graph="fused").run(art, PassContext(scratch=tmp_path / "s")), tmp_path / "ck"))
    error, ops = {}, {}
    for name, alpha in {"plain": None, "smoothed": 0.5}.items():
        q = quantize(parent, tmp_path / name, method="ort-int8-dynamic", block_size=16, smooth_alpha=alpha,
                     calibration_batches=2, min_agreement=0.0)
        error[name] = q.info["discrepancy"]["mean_abs_error"]
        ops[name] = collections.Counter(n.op_type for n in onnx.load(str(q.path / "model.onnx")).graph.node)
        assert q.quantization.get("smooth_alpha") == alpha
    layers = model.config.num_hidden_layers
    assert q.info["smoothing"]["groups"] == 3 * layers  # qkv and gate_up inputs (norm gains), down_proj's (up)
    assert q.info["smoothing"]["inserted_muls"] == 0 and ops["smoothed"] == ops["plain"]
    assert error["smoothed"] < 0.7 * error["plain"], error
    with pytest.raises(ConfigError, match="smooth_alpha applies to 8-bit weights"):
        get("quantize")(method="ort-int8-dynamic", weight_bits=4, smooth_alpha=0.5)
