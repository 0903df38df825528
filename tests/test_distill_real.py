"""End-to-end on the real SmolLM2-135M: a 15-of-30-layer student copies the right blocks and trains."""
import math

import pytest
import torch

pytestmark = pytest.mark.real


def test_smollm2_fifteen_layer_student():
    from compress.checkpoint import Artifact
    from compress.data import DataSpec, PipelineData
    from compress.distill.students import get_layers, keep_layers, resolve_keep
    from compress.models import load_model
    from compress.passes import PassContext, get

    teacher, tok = load_model("builtin:smollm2-135m", "causal-lm")
    keep = resolve_keep(15, 30)
    student = keep_layers(teacher, keep)
    assert student.config.num_hidden_layers == 15 and keep[0] == 0 and keep[-1] == 29
    s_layers, t_layers = get_layers(student), get_layers(teacher)
    for new, old in [(0, 0), (7, keep[7]), (14, 29)]:
        assert torch.equal(s_layers[new].mlp.down_proj.weight, t_layers[old].mlp.down_proj.weight)
        assert s_layers[new].self_attn.layer_idx == new
    del student
    data = PipelineData(train=DataSpec(source="builtin:shakespeare", max_tokens=2048, seq_len=64))
    ctx = PassContext(source="builtin:smollm2-135m", task="causal-lm", data=data, show_progress=False)
    ctx = ctx.with_teacher(Artifact("torch", "causal-lm", tok, teacher))
    out = get("distill")(student={"keep_layers": 15}, alpha=0.8, max_steps=3, batch_size=2, lr=2e-4,
                         eval_tokens=256, log_every=1, seed=0).run(Artifact("torch", "causal-lm", tok, teacher), ctx)
    curve = out.info["loss_curve"]
    assert len(curve) == 3 and all(math.isfinite(r["loss"]) and r["soft"] > 0 for r in curve)
    ppl = out.info["eval_curve"][-1]["perplexity"]
    assert math.isfinite(ppl) and ppl > 1
    assert out.model.config.num_hidden_layers == 15 and out.info["kept_layers"] == keep
