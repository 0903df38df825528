"""The runner refuses impossible quantize orders before any work, naming the fix."""
import pytest

from compress.errors import ConfigError
from pipelines.config import validate

BASE = {"name": "order", "model": {"source": "builtin:smollm2-135m"}, "task": "causal-lm"}


def check(passes):
    return validate({**BASE, "passes": passes})


def test_ort_method_before_export_is_refused():
    with pytest.raises(ConfigError, match=r"passes.0 \(quantize\) needs an ONNX model.*add an `export` pass"):
        check([{"quantize": {"method": "ort-int8-dynamic"}}, {"export": {}}])


def test_quantizing_twice_is_refused():
    with pytest.raises(ConfigError, match=r"passes.1 \(quantize\) would quantize.*quantizing twice"):
        check([{"quantize": {"method": "bf16"}}, {"quantize": {"method": "bnb-int8"}}])
    with pytest.raises(ConfigError, match="quantizing twice"):
        check([{"export": {}}, {"quantize": {"method": "ort-fp16"}}, {"quantize": {"method": "ort-int8-dynamic"}}])


def test_torch_method_after_export_is_refused():
    with pytest.raises(ConfigError, match=r"passes.1 \(quantize\) runs on torch models.*move `quantize` before"):
        check([{"export": {}}, {"quantize": {"method": "bnb-nf4"}}])


def test_export_of_a_quantized_torch_model_is_refused():
    with pytest.raises(ConfigError, match=r"passes.1 \(export\) cannot export a model passes.0 \(quantize\)"):
        check([{"quantize": {"method": "bf16"}}, {"export": {}}])


def test_valid_orders_pass():
    static = [{"export": {"optimize": True}}, {"quantize": {"method": "ort-int8-static"}}]
    calibrated = validate({**BASE, "passes": static, "data": {"calibration": {"source": "builtin:wikipedia"}}})
    assert [p.name for p in calibrated.passes] == ["export", "quantize"]
    assert len(check([{"quantize": {"method": "torch-int8-dynamic"}}]).passes) == 1


def test_unknown_method_names_the_choices():
    with pytest.raises(ConfigError, match="ort-int8-dynamic"):
        check([{"export": {}}, {"quantize": {"method": "ort-int4"}}])


def test_a_checkpoint_source_starts_the_chain_as_it_is(tmp_path):
    """An ONNX checkpoint cannot start a pipeline (the runner loads a torch model); a quantized one cannot be
    pruned, exported or quantized again: each refused before any work, with the fix for a source."""
    import json

    from compress.checkpoint import FORMAT_VERSION, content_hash

    def source(name, manifest):
        folder = tmp_path / name
        folder.mkdir()
        names = ("model.onnx",) if manifest["kind"] == "onnx" else ("config.json", "model.safetensors")
        files = {name: {"size": 1, "sha256": "0" * 64} for name in names}
        manifest = {**manifest, "format_version": FORMAT_VERSION, "files": files}
        (folder / "manifest.json").write_text(json.dumps({**manifest, "content": content_hash(manifest)}))
        return {**BASE, "model": {"source": str(folder)}}

    onnx = source("onnx", {"kind": "onnx", "task": "causal-lm"})
    with pytest.raises(ConfigError, match=r"model.source: .* is an ONNX checkpoint.*checkpoint its export started"):
        validate({**onnx, "passes": [{"quantize": {"method": "ort-fp16"}}]})
    nf4 = source("nf4", {"kind": "torch", "task": "causal-lm", "quantization": {"method": "bnb-nf4", "bits": 4}})
    for passes, message in [([{"prune": {}}], r"passes.0 \(prune\) changes weights.*model.source \(bnb-nf4\)"),
                            ([{"export": {}}], r"cannot export a model model.source \(bnb-nf4\) quantized"),
                            ([{"quantize": {"method": "bf16"}}], "quantizing twice is not supported, give the float")]:
        with pytest.raises(ConfigError, match=message):
            validate({**nf4, "passes": passes})


def test_options_the_task_refuses_are_refused_before_any_work():
    """What `kernel: auto` becomes depends on the task, which the config states: options that kernel cannot
    take are refused by validate, not at the quantize step after the export."""
    data = {"train": {"source": "builtin:wikipedia"}}
    encoder = {**BASE, "model": {"source": "builtin:minilm-l6"}, "task": "feature-extraction", "data": data}

    def refused(cfg, quantize, message):
        with pytest.raises(ConfigError, match=message):
            validate({**cfg, "passes": [{"export": {}}, {"quantize": {"method": "ort-int8-dynamic", **quantize}}]})

    refused(encoder, {"weight_bits": 4}, r"passes.1 \(quantize\): quantize.weight_bits: kernel auto is "
            "matmulinteger on a feature-extraction model, which is 8-bit only")
    refused(encoder, {"embedding_bits": 4}, "quantize.embedding_bits: kernel auto is matmulinteger")
    refused(encoder, {"kernel": "matmulnbits", "weight_bits": 4, "keep_8bit_blocks": 1},
            "quantize.keep_8bit_blocks: ranks the decoder blocks of a causal LM, not a feature-extraction model")
    # options that kernel would silently ignore
    refused(encoder, {"algorithm": "hqq"}, "quantize.algorithm: kernel auto is matmulinteger on a "
            "feature-extraction model, whose weights are rtn per channel")
    refused(encoder, {"kernel": "rowwise", "block_size": 128}, "block_size: kernel rowwise, whose weights are not "
            "in blocks")  # a named kernel: refused by the options themselves
    refused({**BASE}, {"per_channel": False}, "quantize.per_channel: kernel auto is matmulnbits on a causal-lm "
            "model, whose weight scales are per block")
    fine = validate({**encoder, "passes": [{"export": {}}, {"quantize": {"method": "ort-int8-dynamic",
                                                                         "smooth_alpha": 0.7}}]})
    assert [p.name for p in fine.passes] == ["export", "quantize"]
