"""The backend names and the worker's spec: parsed once, written and read back unchanged."""
import pytest

from benchmarks.config import BACKENDS, BenchmarkConfig
from benchmarks.worker_spec import Backend, WorkerSpec


def test_backend_names_round_trip():
    parsed = [Backend.parse(name) for name in BACKENDS]
    assert [(b.runtime, b.device) for b in parsed] == [("torch", "cpu"), ("torch", "cuda"), ("ort", "cpu"),
                                                       ("ort", "cuda"), ("llamacpp", "cpu")]
    assert [str(b) for b in parsed] == list(BACKENDS)
    assert Backend.parse(parsed[0]) is parsed[0] and parsed[0] == Backend("torch", "cpu")


@pytest.mark.parametrize("name", ["torch", "onnx-cpu", "ort-gpu", "Torch-CPU", ""])
def test_unknown_backend_names_the_allowed_ones(name):
    with pytest.raises(ValueError, match="allowed: torch-cpu, torch-cuda, ort-cpu, ort-cuda, llamacpp-cpu"):
        Backend.parse(name)


def test_config_accepts_exactly_the_backend_names():
    assert BenchmarkConfig(backends=list(BACKENDS)).backends == list(BACKENDS)
    with pytest.raises(ValueError):
        BenchmarkConfig(backends=["ort-gpu"])


def test_worker_spec_json_round_trip():
    settings = BenchmarkConfig(threads=1).model_dump(mode="json")
    spec = WorkerSpec(target="runs/x/01-quantize", loader="checkpoint", task="causal-lm", backend="ort-cpu",
                      settings=settings, inputs="/tmp/in.npz", label="q", reference="/tmp/ref.npz")
    assert spec.backend == Backend("ort", "cpu")
    text = spec.to_json()
    assert '"backend": "ort-cpu"' in text and '"loader": "checkpoint"' in text
    assert WorkerSpec.from_json(text) == spec
    with pytest.raises(ValueError, match="loader"):
        WorkerSpec(target="t", loader="torch", task="causal-lm", backend="torch-cpu", settings={}, inputs="i",
                   label="l")


def test_an_empty_backend_list_is_refused(tmp_path, capsys):
    """`backends: []` (or `--backends ,`) measured nothing, overwrote the output folder's results.json with no
    rows and said "every row was skipped, for the reasons above" with no reason above; now a ConfigError."""
    from pipelines.cli import main

    with pytest.raises(ValueError, match="no backend given; name at least one of torch-cpu"):
        BenchmarkConfig(backends=[])
    (tmp_path / "results.json").write_text("earlier")
    assert main(["bench", "x", "--backends", ",", "--output", str(tmp_path)]) == 2
    assert "bench.backends: no backend given" in capsys.readouterr().err
    assert (tmp_path / "results.json").read_text() == "earlier"


def test_a_stride_past_the_window_is_refused():
    """stride 64 over window 32 scored 155 of 300 eval tokens (each window's neighbours skipped) and reported
    that perplexity as the model's; now a ConfigError. stride == window (the default) still resolves."""
    from compress.errors import ConfigError

    data = {"source": "builtin:wikipedia", "max_tokens": 300, "seq_len": 32}
    with pytest.raises(ConfigError, match=r"benchmark.stride \(--stride\): 64 is longer than the perplexity window "
                                          r"32, .*give a stride of at most 32"):
        BenchmarkConfig(data=data, window=32, stride=64).resolved("causal-lm")
    with pytest.raises(ConfigError, match="window 32"):  # the window defaults to data.seq_len
        BenchmarkConfig(data=data, stride=33).resolved("causal-lm")
    assert BenchmarkConfig(data=data, stride=32).resolved("causal-lm").stride == 32
