"""End-to-end on the real packaged MiniLM-L6: export + the default ort-int8-dynamic keeps embeddings close."""
import numpy as np
import pytest

from compress import load, save
from compress.checkpoint import Artifact
from compress.data import DataSpec, PipelineData, load_dataset
from compress.edge import EdgeModel
from compress.models import load_model, mean_pool
from compress.passes import PassContext, get


@pytest.mark.real
def test_minilm_export_and_int8_keep_embeddings(tmp_path):
    import torch

    model, tok = load_model("builtin:minilm-l6", "feature-extraction")
    data = PipelineData(train=DataSpec(source="builtin:bbc-news", max_examples=8, max_length=128))
    ctx = PassContext(task="feature-extraction", data=data, scratch=tmp_path / "scratch")
    exported = load(save(get("export")().run(Artifact("torch", "feature-extraction", tok, model), ctx),
                         tmp_path / "onnx"))
    assert exported.info["discrepancy"]["embedding_cosine_min"] > 0.99999
    q = load(save(get("quantize")(method="ort-int8-dynamic").run(exported, ctx), tmp_path / "int8"))
    assert q.info["onnx_bytes"] < 0.5 * exported.info["onnx_bytes"]  # int8 weights and embedding table

    texts = load_dataset(DataSpec(source="builtin:bbc-news", max_examples=16), "eval").texts
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        ref = mean_pool(model(**enc).last_hidden_state, enc.attention_mask).numpy()
    got = EdgeModel(q.path, threads=1).embed(enc.input_ids.numpy(), enc.attention_mask.numpy())  # same tokens
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() > 0.98, cos
    # nearest neighbours mostly preserved
    sim_ref, sim_got = ref @ ref.T, got @ got.T
    np.fill_diagonal(sim_ref, -np.inf)
    np.fill_diagonal(sim_got, -np.inf)
    assert (sim_ref.argmax(1) == sim_got.argmax(1)).mean() >= 0.8
