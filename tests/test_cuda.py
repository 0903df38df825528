"""The GPU paths, on tiny models: the torch-cuda backend, distillation, pruning / low-rank calibration and a
whole pipeline on CUDA, and bitsandbytes checkpoints run on the GPU. Skipped with the reason where torch sees
no CUDA device (CI and the developers' machines); run on a lent GPU machine with `pytest tests/test_cuda.py`."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks.config import BenchmarkConfig
from benchmarks.harness import measure
from compress.checkpoint import Artifact, load, save
from compress.data import DataSpec, PipelineData
from compress.models import load_model
from compress.passes import PassContext, get

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")

CUDA = torch.device("cuda")
TEXT = {"source": "builtin:shakespeare", "max_tokens": 2048, "seq_len": 32}
SETTINGS = BenchmarkConfig(threads=1, data={"source": "builtin:shakespeare", "max_tokens": 600, "seq_len": 64},
                           window=64, stride=32, kl_top_k=16,
                           latency={"warmup": 1, "repeats": 3, "new_tokens": 8, "prompt_tokens": 16})


def lm_ctx(device=CUDA, source=None):
    return PassContext(source=source, task="causal-lm", device=device, show_progress=False,
                       data=PipelineData(train=DataSpec(**TEXT)))


def art(path):
    m, tok = load_model(str(path), "causal-lm")
    return Artifact("torch", "causal-lm", tok, m)


def test_torch_cuda_backend_scores_like_the_cpu(tiny_llama_dir, tmp_path):
    cpu = measure(str(tiny_llama_dir), backend="torch-cpu", settings=SETTINGS, baseline=str(tiny_llama_dir),
                  work_dir=tmp_path)
    gpu = measure(str(tiny_llama_dir), backend="torch-cuda", settings=SETTINGS, baseline=str(tiny_llama_dir),
                  work_dir=tmp_path)
    assert "error" not in gpu and "skipped" not in gpu, gpu
    assert gpu["quality"]["perplexity"] == pytest.approx(cpu["quality"]["perplexity"], rel=1e-4)
    assert gpu["quality"]["top1_agreement"] > 0.99 and gpu["quality"]["kl"] < 1e-4
    assert gpu["latency"]["generated_ids"] == cpu["latency"]["generated_ids"]  # same greedy tokens
    assert gpu["latency"]["decode_tokens_per_s"] > 0 and gpu["latency"]["prefill"]["n"] == 3
    assert gpu["memory"]["cuda_peak_allocated_mb"] > 0 and cpu["memory"]["cuda_peak_allocated_mb"] is None
    assert gpu["machine"]["gpus"], gpu["machine"]  # the GPU is recorded with the figure


def test_distillation_trains_on_the_gpu_and_reloads_on_the_cpu(tiny_llama_dir, tmp_path):
    student = art(tiny_llama_dir)
    out = get("distill")(student={"keep_layers": 1}, max_steps=25, lr=3e-3, batch_size=8, precision="bf16",
                         eval_tokens=256, log_every=1, seed=0).run(student, lm_ctx(source=str(tiny_llama_dir)))
    curve = out.info["loss_curve"]
    assert out.info["device"].startswith("cuda") and out.info["precision"] == "bf16"
    assert curve[-1]["loss"] < curve[0]["loss"] - 0.1  # it learns from the teacher on the GPU
    assert next(out.model.parameters()).device.type == "cpu"  # handed back on the CPU, like every pass
    ids = torch.randint(5, 300, (2, 12))
    with torch.no_grad():
        before = out.model(input_ids=ids).logits
    path = save(out, tmp_path / "student")
    with torch.no_grad():
        after = load(path).model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-5)  # trained on CUDA, saved, reloaded on the CPU


@pytest.mark.parametrize("options", [
    {"targets": ["mlp"], "ratio": 0.5, "importance": "activation"},
    {"targets": ["mlp"], "ratio": 0.5, "importance": "taylor"},
    {"targets": ["layers"], "ratio": 0.5},
])
def test_pruning_calibrates_on_the_gpu_like_on_the_cpu(tiny_llama_dir, options):
    """Calibration runs on the pipeline's device; the same channels / layers go as on the CPU."""
    on_cpu = get("prune")(**options).run(art(tiny_llama_dir), lm_ctx(device=torch.device("cpu")))
    on_gpu = get("prune")(**options).run(art(tiny_llama_dir), lm_ctx())
    assert next(on_gpu.model.parameters()).device.type == "cpu"  # handed back on the CPU, like every pass
    assert on_gpu.info["params_after"] == on_cpu.info["params_after"] < on_cpu.info["params_before"]
    for (name, a), b in zip(on_cpu.model.state_dict().items(), on_gpu.model.state_dict().values()):
        assert a.shape == b.shape, name
        assert torch.allclose(a, b, atol=1e-6), name  # the same units were kept


def test_whitened_lowrank_calibrates_on_the_gpu_like_on_the_cpu(tiny_llama_dir):
    options = dict(method="whiten", rank=8, targets=["*mlp*"], min_params=0)
    on_cpu = get("lowrank")(**options).run(art(tiny_llama_dir), lm_ctx(device=torch.device("cpu")))
    on_gpu = get("lowrank")(**options).run(art(tiny_llama_dir), lm_ctx())
    assert on_gpu.info["factorized"] == on_cpu.info["factorized"] > 0
    assert {k: v["rank"] for k, v in on_gpu.info["layers"].items()} == \
        {k: v["rank"] for k, v in on_cpu.info["layers"].items()}
    ids = torch.randint(5, 300, (2, 12))
    with torch.no_grad():
        a, b = on_cpu.model(input_ids=ids).logits, on_gpu.model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-3)


@pytest.mark.parametrize("method", ["bnb-int8", "bnb-nf4"])
def test_bitsandbytes_checkpoint_runs_on_the_gpu(tiny_llama_dir, tmp_path, method):
    quantized = get("quantize")(method=method).run(art(tiny_llama_dir), lm_ctx())
    path = save(quantized, tmp_path / method)
    ids = torch.randint(5, 300, (2, 12))
    with torch.no_grad():
        ref = art(tiny_llama_dir).model(input_ids=ids).logits
        cpu = load(path).model(input_ids=ids).logits.float()
        gpu = load(path).model.to(CUDA)(input_ids=ids.to(CUDA)).logits.float().cpu()
    err_cpu, err_gpu = (cpu - ref).abs().max().item(), (gpu - ref).abs().max().item()
    # bitsandbytes' CUDA kernels compute in fp16 where its CPU path keeps fp32: close, not bit-equal
    assert err_gpu < (0.05 if method == "bnb-int8" else 0.3) and (gpu - cpu).abs().max().item() < 0.05, \
        (err_cpu, err_gpu)


def test_pipeline_runs_on_the_gpu_and_benchmarks_torch_cuda(tiny_llama_dir, tmp_path):
    from pipelines.config import load_config
    from pipelines.runner import Runner

    cfg = {
        "name": "tiny-gpu", "model": {"source": str(tiny_llama_dir)}, "device": "cuda", "threads": 1,
        "data": {"train": TEXT, "eval": {"source": "builtin:shakespeare", "max_tokens": 600}},
        "passes": [
            {"prune": {"targets": ["mlp"], "ratio": 0.25, "importance": "activation",
                       "recover": {"max_steps": 5, "batch_size": 4}}},
            {"quantize": {"method": "bf16"}},
        ],
        "benchmark": {"backends": ["torch-cpu", "torch-cuda"], "quality": ["perplexity", "teacher-agreement"],
                      "latency": {"warmup": 1, "repeats": 2, "prompt_tokens": 16, "new_tokens": 4}},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = Runner(load_config(path), output_dir=tmp_path / "runs", show_progress=False,
                    log=lambda *_: None).run()
    recover = json.loads((Path(result.steps[0].path) / "manifest.json").read_text())["info"]["recover"]
    assert recover["device"].startswith("cuda")
    records = json.loads((tmp_path / "runs" / "tiny-gpu" / "results.json").read_text())["records"]
    by = {(r["label"], r["backend"]): r for r in records}
    assert len(by) == 6 and all("error" not in r and "skipped" not in r for r in records), records
    for label in ("source", "01-prune", "02-quantize"):
        c, g = by[label, "torch-cpu"]["quality"], by[label, "torch-cuda"]["quality"]
        assert g["perplexity"] == pytest.approx(c["perplexity"], rel=2e-2 if label == "02-quantize" else 1e-3)
        assert by[label, "torch-cuda"]["memory"]["cuda_peak_allocated_mb"] > 0
