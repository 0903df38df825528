"""Data-parallel distillation: 2 processes launched by `accelerate launch` give the same student as 1 process
with the same global batch: DDP on 2 CPU processes (gloo), FSDP2 on 2 GPUs where they exist.

accelerate configures FSDP only on accelerators (on CPU processes FSDP1's plugin raises "There are currently
no available devices found" and FSDP2 quietly runs as DDP), so distill refuses FSDP on the CPU. torch's
fully_shard itself runs over gloo, though: `fsdp2-cpu` sets accelerate's state to FSDP2 by hand, so the
trainer's FSDP path (sharded copy, evaluation through the wrapper, clipping, gathered weights) is tested here."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

WORKER = textwrap.dedent('''
    import os, sys
    import torch
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    from compress.checkpoint import Artifact
    from compress.data import DataSpec, PipelineData
    from compress.models import load_model
    from compress.passes import PassContext, get

    OPTIONS = dict(student={"keep_layers": 2}, alpha=0.5, hidden_weight=0.5, max_steps=3, batch_size=8,
                   grad_accum=2, lr=1e-3, precision="fp32", eval_tokens=64, seed=0, warmup_ratio=0.0)

    def fsdp2_on_cpu(device):  # what `accelerate launch --use_fsdp --fsdp_version 2` sets up on GPUs
        from accelerate import Accelerator, PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        acc = Accelerator(cpu=True)
        acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2,
                                                               auto_wrap_policy="transformer_based_wrap")
        acc.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState does it
        return acc

    def distill(source, device="cpu"):
        model, tok = load_model(source, "causal-lm")
        data = PipelineData(train=DataSpec(source="builtin:shakespeare", max_tokens=2048, seq_len=32))
        ctx = PassContext(source=source, task="causal-lm", data=data, show_progress=False,
                          device=torch.device(device))
        return get("distill")(**OPTIONS).run(Artifact("torch", "causal-lm", tok, model), ctx)

    if __name__ == "__main__":  # source, output file, device, expected parallelism[, "force"]
        if sys.argv[5:] == ["force"]:
            import compress.distill.trainer

            compress.distill.trainer.distributed_accelerator = fsdp2_on_cpu
        out = distill(sys.argv[1], sys.argv[3])
        if int(os.environ.get("RANK", "0")) == 0:
            assert out.info["processes"] == 2, out.info["processes"]  # really 2 processes
            assert out.info["parallel"] == sys.argv[4], out.info["parallel"]
            save_file({k: v.clone().contiguous() for k, v in out.model.state_dict().items()}, sys.argv[2])
''')


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2
LAUNCHES = {
    # `--cpu` alone would start ONE process (accelerate spreads CPU jobs only through mpirun); the torchrun
    # launcher behind --multi_gpu starts two, and Accelerator(cpu=True) then joins them over gloo (MULTI_CPU).
    "ddp": ("cpu", ["--multi_gpu"], []),
    "fsdp2-cpu": ("cpu", ["--multi_gpu"], ["force"]),
    "fsdp2": ("cuda", ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"],
              []),
}


@pytest.mark.parametrize("parallel", [
    "ddp",
    "fsdp2-cpu",
    pytest.param("fsdp2", marks=pytest.mark.skipif(
        not TWO_GPUS, reason="FSDP needs 2 GPUs: accelerate shards only on accelerators (on CPU processes "
        "FSDP1's plugin raises 'no available devices found' and FSDP2 runs as DDP)")),
])
def test_two_processes_match_one(parallel, tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate's launcher is not installed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COMPRESS_PROGRESS": "0",
           "PYTHONPATH": str(Path(__file__).parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    device, flags, force = LAUNCHES[parallel]
    proc = subprocess.run([accelerate, "launch", *flags, "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                           str(script), str(tiny_llama_dir), str(tmp_path / "two.safetensors"), device,
                           parallel.removesuffix("-cpu"), *force],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sys.path.insert(0, str(tmp_path))
    sys.modules.pop("worker", None)
    import worker  # noqa: E402  (the same code, one process)

    single = worker.distill(str(tiny_llama_dir), device)
    assert single.info["processes"] == 1 and single.info["micro_batch"] == 4
    two = {k: v.cpu() for k, v in load_file(tmp_path / "two.safetensors").items()}
    ref = {k: v.cpu() for k, v in single.model.state_dict().items()}
    assert two.keys() == ref.keys()
    for k in ref:
        assert torch.allclose(two[k], ref[k], atol=2e-5, rtol=1e-4), k
    # and training moved the weights, so equality is not trivial
    from compress.models import load_model

    teacher, _ = load_model(str(tiny_llama_dir), "causal-lm")
    assert not torch.allclose(ref["model.layers.1.mlp.up_proj.weight"],
                              teacher.state_dict()["model.layers.3.mlp.up_proj.weight"])


def test_fsdp_on_cpu_is_refused(monkeypatch):
    """accelerate would not shard CPU processes (FSDP2 would quietly be DDP): distill says so instead."""
    from compress.distill.trainer import distributed_accelerator
    from compress.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="FSDP only on GPUs"):
        distributed_accelerator(torch.device("cpu"))
