"""Data-parallel distillation: 2 CPU processes (gloo, launched by `accelerate launch`) give the same student
as 1 process with the same global batch."""
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

    def distill(source):
        model, tok = load_model(source, "causal-lm")
        data = PipelineData(train=DataSpec(source="builtin:shakespeare", max_tokens=2048, seq_len=32))
        ctx = PassContext(source=source, task="causal-lm", data=data, show_progress=False)
        return get("distill")(**OPTIONS).run(Artifact("torch", "causal-lm", tok, model), ctx)

    if __name__ == "__main__":
        out = distill(sys.argv[1])
        if int(os.environ.get("RANK", "0")) == 0:
            assert out.info["processes"] == int(sys.argv[3]) == 2, out.info["processes"]  # really 2 processes
            save_file({k: v.clone() for k, v in out.model.state_dict().items()}, sys.argv[2])
''')


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate's launcher is not installed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COMPRESS_PROGRESS": "0",
           "PYTHONPATH": str(Path(__file__).parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # `--cpu` alone would start ONE process (accelerate spreads CPU jobs only through mpirun); the torchrun
    # launcher behind --multi_gpu starts two, and Accelerator(cpu=True) then joins them over gloo (MULTI_CPU).
    proc = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                           str(script), str(tiny_llama_dir), str(tmp_path / "ddp.safetensors"), "2"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sys.path.insert(0, str(tmp_path))
    import worker  # noqa: E402  (the same code, one process)

    single = worker.distill(str(tiny_llama_dir))
    assert single.info["processes"] == 1 and single.info["micro_batch"] == 4
    ddp = load_file(tmp_path / "ddp.safetensors")
    ref = single.model.state_dict()
    assert ddp.keys() == ref.keys()
    for k in ref:
        assert torch.allclose(ddp[k], ref[k], atol=2e-5, rtol=1e-4), k
    # and training moved the weights, so equality is not trivial
    from compress.models import load_model

    teacher, _ = load_model(str(tiny_llama_dir), "causal-lm")
    assert not torch.allclose(ref["model.layers.1.mlp.up_proj.weight"],
                              teacher.state_dict()["model.layers.3.mlp.up_proj.weight"])
