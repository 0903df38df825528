"""The real packaged models through the real loading code (marked `real`: slower)."""
import os
import subprocess
import sys

import pytest
import torch

from compress.models import load_model, mean_pool, smollm2_folder

pytestmark = pytest.mark.real


def test_smollm2_completes_a_factual_prompt():
    model, tok = load_model("builtin:smollm2-135m", "causal-lm")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tok("Hello").input_ids == tok("Hello", add_special_tokens=False).input_ids, "BOS added"
    ids = tok("The capital of Germany is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Berlin" in tok.decode(out[0, ids.input_ids.shape[1]:])


def test_minilm_embeddings_rank_paraphrases_closest():
    model, tok = load_model("builtin:minilm-l6", "feature-extraction")
    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        emb = torch.nn.functional.normalize(mean_pool(model(**batch).last_hidden_state, batch.attention_mask), dim=-1)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[1, 2] + 0.3


def test_smollm2_conversion_is_safe_when_two_processes_convert_at_once(tmp_path):
    """Both processes return the same complete folder; no temporary folder is left."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), OMP_NUM_THREADS="1")
    env.pop("COMPRESS_CACHE_DIR", None)
    script = "from compress.models import smollm2_folder; print(smollm2_folder())"
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].strip().splitlines()[-1] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1] and outs[0].startswith(str(tmp_path))
    models = tmp_path / "compress-suite" / "models"
    assert sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock")) == [os.path.basename(outs[0])]
    assert (models / os.path.basename(outs[0]) / "model.safetensors").stat().st_size > 500e6
