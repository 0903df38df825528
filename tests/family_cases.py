"""Every family x every pass on tiny random models: the cases shared by tests/test_families.py and
studies/family_matrix.py (which puts tests/ on sys.path)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from compress import passes
from compress.checkpoint import Artifact, save
from compress.data import DataSpec, PipelineData
from compress.errors import CompressInputError
from compress.passes import PassContext
from tiny_models import ENCODERS, FAMILIES, MATRIX_EXTRA, family_tasks, family_tokenizer, tiny_family

IDS = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 8, 64, 33], [9, 9, 120, 250, 31, 4, 77, 200, 18, 6]])
PASSES = ("distill", "mlp", "heads", "layers", "hidden", "lowrank", "export", "int8")
PRUNE = dict(ratio=0.5, importance="activation", round_to=8, calibration_samples=4, calibration_seq_len=16)
OPTIONS = {
    "distill": ("distill", dict(student={"keep_layers": 3}, teacher="input", alpha=0.5, max_steps=1, batch_size=2,
                                lr=1e-4, precision="fp32", eval_tokens=64, eval_examples=4, log_every=1, seed=0)),
    "mlp": ("prune", dict(PRUNE, targets=["mlp"])),
    "heads": ("prune", dict(PRUNE, targets=["heads"])),
    "layers": ("prune", dict(PRUNE, targets=["layers"], layer_ratio=0.25)),
    "hidden": ("prune", dict(PRUNE, targets=["hidden"], hidden_ratio=0.25)),
    "lowrank": ("lowrank", dict(rank=8, round_to=1, min_params=0, max_param_ratio=0.99)),
    "export": ("export", dict(check_samples=2, check_seq_len=16)),
    "int8": ("quantize", dict(method="ort-int8-dynamic", min_agreement=0.5)),
}
# Gemma-2B's layout has one KV head: remove query heads inside it (there is no second group to remove)
OVERRIDES = {("gemma", "heads"): {"gqa": "query"}}
TORCH_PASSES = ("distill", "mlp", "heads", "layers", "hidden", "lowrank")


def cases(extra: bool = False) -> list[tuple[str, str]]:
    """(family, task): decoders as causal LMs, encoders as classifiers and feature extractors; `extra`: with
    the families only the study's matrix shows (MATRIX_EXTRA)."""
    return [(f, t) for f in FAMILIES + (MATRIX_EXTRA if extra else ()) for t in family_tasks(f)]


def context(task: str, scratch: Path) -> PassContext:
    if task == "causal-lm":
        data = PipelineData(train=DataSpec(source="builtin:shakespeare", max_tokens=2000, seq_len=16))
    else:
        data = PipelineData(train=DataSpec(source="builtin:bbc-news", max_examples=16, max_length=24))
    return PassContext(task=task, data=data, scratch=scratch, show_progress=False)


def artifact(family: str, task: str) -> Artifact:
    model = tiny_family(family, task)
    if task == "sequence-classification":  # the labels of the calibration / training data
        names = PipelineData(train=DataSpec(source="builtin:bbc-news", max_examples=16)).dataset("train").label_names
        model.config.id2label = dict(enumerate(names))
        model.config.label2id = {n: i for i, n in enumerate(names)}
    return Artifact(kind="torch", task=task, tokenizer=family_tokenizer(family), model=model)


def run_pass(key: str, art: Artifact, ctx: PassContext, family: str | None = None) -> Artifact:
    name, opts = OPTIONS[key]
    opts = {**opts, **OVERRIDES.get((family, key), {})}
    if key == "export":
        opts.update(export_options(art, family))
    return passes.get(name)(**opts).run(art, ctx)


def outputs(model) -> torch.Tensor:
    with torch.no_grad():
        o = model(input_ids=IDS)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


FRESH = r"""
import json, sys, torch, compress
from compress.models import auto_class
def _out(o):
    return (o.logits if hasattr(o, 'logits') else o.last_hidden_state).tolist()
ids = torch.tensor(json.loads(sys.argv[1]))
out = {}
for path, plain in json.loads(sys.argv[2]):
    res = {}
    try:
        art = compress.load(path)
        with torch.no_grad():
            res["load"] = _out(art.model(input_ids=ids))
            if plain:
                m = auto_class(art.task).from_pretrained(path).eval()
                res["plain"] = _out(m(input_ids=ids))
    except Exception as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
    out[path] = res
print(json.dumps(out))
"""


def fresh_outputs(checkpoints: list[tuple[str, bool]]) -> dict:
    """Load every checkpoint in ONE new Python process (compress.load, and plain from_pretrained when asked)."""
    r = subprocess.run([sys.executable, "-c", FRESH, json.dumps(IDS.tolist()), json.dumps(checkpoints)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def greedy_torch(model, prompt: torch.Tensor, n: int) -> np.ndarray:
    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return ids.numpy()


def check_onnx(torch_model, onnx_art: Artifact, task: str, n_new: int = 8) -> str | None:
    """None when the ONNX model agrees with torch (decoders: identical greedy tokens, via the KV cache when
    the graph has one; encoders: outputs close), else what differs."""
    from compress.edge import EdgeModel

    edge = EdgeModel(onnx_art.onnx_dir, threads=1)
    edge.task = task
    if task == "causal-lm":
        want = greedy_torch(torch_model, IDS, n_new)
        if edge.past_names:
            got = edge.generate(IDS.numpy(), max_new_tokens=n_new)
        else:
            got = IDS.numpy()
            for _ in range(n_new):
                nxt = edge.logits(got)[:, -1].argmax(-1)[:, None]
                got = np.concatenate([got, nxt], 1)
        return None if np.array_equal(want, got) else f"greedy tokens differ: torch {want[0, -n_new:]}, onnx {got[0, -n_new:]}"
    ref = outputs(torch_model).numpy()
    got = edge.logits(IDS.numpy()) if task == "sequence-classification" else edge.hidden_states(IDS.numpy())
    err = float(np.abs(ref - got).max())
    return None if err < 1e-3 else f"outputs differ by {err:.3g}"


# The families whose chain ends in the fused graph (the export default). The other decoders' tiny head_dim of 8 is
# below GroupQueryAttention's minimum with rotary (16), or their layout is one the fused writers refuse.
FUSED = ("qwen3", "gemma3", "smollm3", "granite", "pythia", "phi", "opt", "gpt2", "bloom", "gptj", "falcon_40b",
         "cohere", "arcee", "nemotron", "apertus")


def export_options(art: Artifact, family: str | None = None) -> dict:
    """Head-pruned decoders whose config keeps the original head count (GPT-2's pruned_heads, an
    attention_heads entry) export through optimum without the KV cache (optimum sizes the cache from the
    config); the fused writer reads the heads from the modules and keeps the cache."""
    pruned = bool(getattr(art.model.config, "pruned_heads", None)) or any(
        e["type"] == "attention_heads" for e in art.structure)
    return {"with_past": False} if pruned and art.task == "causal-lm" and family not in FUSED else {}


def refusal(exc: Exception) -> str:
    return f"refused: {exc}".replace("\n", " ")


def is_input_error(exc: Exception) -> bool:
    return isinstance(exc, CompressInputError)


__all__ = ["IDS", "PASSES", "OPTIONS", "TORCH_PASSES", "FUSED", "cases", "context", "artifact", "run_pass", "outputs",
           "fresh_outputs", "check_onnx", "export_options", "refusal", "is_input_error", "save", "ENCODERS"]
