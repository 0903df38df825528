"""The harness against an independent measurement on the real SmolLM2-135M."""
import pytest

from benchmarks.config import BenchmarkConfig
from benchmarks.harness import measure


@pytest.mark.real
def test_smollm2_perplexity_equals_plain_transformers(tmp_path):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.data import DataSpec, load_dataset
    from compress.models import smollm2_folder

    data = {"source": "builtin:wikipedia", "max_tokens": 1024, "seq_len": 256}
    s = BenchmarkConfig(threads=1, data=data, quality=["perplexity"], latency=None)
    r = measure("builtin:smollm2-135m", backend="torch-cpu", settings=s, work_dir=tmp_path)
    assert "error" not in r, r.get("error")

    # Plain transformers: documents joined by EOS, first 1024 tokens, non-overlapping 256-token windows,
    # scored with the model's own loss.
    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = []
    for text in load_dataset(DataSpec(**data), "eval").texts:
        ids += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= 1024:
            break
    windows = torch.tensor(ids[:1024]).view(4, 256)
    with torch.no_grad():
        losses = [float(model(w[None], labels=w[None]).loss) for w in windows]
    plain = float(np.exp(np.mean(losses)))  # every window scores 255 tokens, so the mean of means is exact
    assert r["quality"]["perplexity"] == pytest.approx(plain, rel=1e-3)
    assert r["quality"]["scored_tokens"] == 4 * 255
    assert 5 < plain < 60  # SmolLM2 on Wikipedia is about 20 (docs/stack.md)
