"""compress.fused: the hand-written ONNX decoder matches torch (logits and greedy tokens), keeps a small constant
node count per block, and follows the modules' own widths (depth / width / head pruning, low-rank layers)."""
import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compress.errors import UnsupportedModelError
from compress.fused import build_llama
from compress.edge import EdgeModel

VOCAB, LAYERS = 128, 4


def tiny(model_type: str = "llama", kv_heads: int = 2, **overrides):
    """A random decoder: hidden 64, 4 layers, 4 heads (head_dim 16, GroupQueryAttention's minimum with rotary).
    initializer_range 0.15 rather than 0.02 so that logits are O(1) and greedy tokens vary."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
               num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
               initializer_range=0.15, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
               pad_token_id=None)
    cfg.update(overrides)
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        model_type]
    return model_cls(config_cls(**cfg)).eval()


def prompt(batch: int = 1, length: int = 10) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def export(model, tmp_path, **edge_options):
    figures = build_llama(model, tmp_path)
    return figures, EdgeModel(tmp_path, threads=1, **edge_options)


def greedy(edge: EdgeModel, ids: np.ndarray, n: int) -> np.ndarray:
    return edge.generate(ids, n)[:, ids.shape[1]:]


def assert_logits_match(model, edge, ids):
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits.numpy()
    logits = edge.logits(ids.numpy())
    assert logits.shape == ref.shape
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kv_heads,tied", [(2, True), (4, False)], ids=["gqa-tied", "mha-untied"])
def test_matches_torch_logits_and_greedy_tokens(tmp_path, kv_heads, tied):
    torch.set_num_threads(1)
    model = tiny(kv_heads=kv_heads, tie_word_embeddings=tied)
    figures, edge = export(model, tmp_path)
    ids = prompt()
    assert_logits_match(model, edge, ids)

    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    np.testing.assert_array_equal(greedy(edge, ids.numpy(), 8), ref[:, ids.shape[1]:].numpy())

    # the whole point: a small constant per block, no per-block shape arithmetic
    assert figures["layers"] == LAYERS and figures["tied_embeddings"] == tied
    assert figures["max_nodes_per_block"] <= 11
    assert figures["nodes"] <= 12 * LAYERS + 20
    assert not {"Concat", "Unsqueeze", "Reshape", "Range", "Expand", "Where"} & set(figures["ops"])
    assert figures["ops"]["GroupQueryAttention"] == LAYERS and figures["ops"]["Shape"] == 1
    # a tied table is stored once (the head reads it through a Transpose)
    names = [i.name for i in onnx.load(figures["path"], load_external_data=False).graph.initializer]
    assert "model.embed_tokens.weight" in names and ("lm_head.weight" in names) != tied
    assert edge.shared_cache  # compress.edge runs the graph with past and present in one buffer


def test_shared_cache_loop_equals_the_plain_loop_and_grows(tmp_path, monkeypatch):
    """The copy-free loop (one buffer per layer bound as past and present) gives the plain loop's tokens,
    also when the sequence outgrows the buffer the prefill reserved (it doubles, copying once)."""
    model = tiny()
    _, shared = export(model, tmp_path)
    plain = EdgeModel(tmp_path, threads=1, shared_cache=False)
    ids = prompt().numpy()
    np.testing.assert_array_equal(greedy(shared, ids, 12), greedy(plain, ids, 12))
    logits, state = shared.prefill(ids, max_new_tokens=2)
    buffer = state.past["past_key_values.0.key"]
    assert buffer.shape[2] == ids.shape[1] + 2
    tokens = []
    for _ in range(6):
        tokens.append(logits.argmax(-1))
        logits, state = shared.decode_step(tokens[-1][:, None], state)
    assert state.past["past_key_values.0.key"].shape[2] == 2 * (ids.shape[1] + 2)  # grew once
    np.testing.assert_array_equal(np.stack(tokens, 1), greedy(plain, ids, 6))
    with pytest.raises(ValueError, match="unpadded"):
        shared.logits(np.ones((2, 4), np.int64), np.array([[0, 1, 1, 1], [1, 1, 1, 1]]))


def test_batch_of_equal_length_prompts(tmp_path):
    model = tiny()
    _, edge = export(model, tmp_path)
    ids = prompt(batch=2, length=6)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    np.testing.assert_array_equal(greedy(edge, ids.numpy(), 5), ref[:, ids.shape[1]:].numpy())


def test_depth_pruned_model(tmp_path):
    model = tiny()
    model.model.layers = nn.ModuleList([model.model.layers[i] for i in (0, 3)])
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = i
    model.config.num_hidden_layers = 2
    figures, edge = export(model, tmp_path)
    assert figures["layers"] == 2 and len(edge.past_names) == 4
    assert_logits_match(model, edge, prompt())


def test_per_layer_widths_heads_and_low_rank(tmp_path):
    from compress.pruning.lowrank import LowRankLinear

    model = tiny()
    layers = model.model.layers
    torch.manual_seed(2)
    mlp = layers[1].mlp  # a narrower MLP in layer 1 only
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = nn.Linear(64, 48, bias=False), nn.Linear(64, 48, bias=False), \
        nn.Linear(48, 64, bias=False)
    attn = layers[2].self_attn  # layer 2 keeps 2 query heads (of 4), one per KV head
    attn.q_proj, attn.o_proj, attn.num_key_value_groups = nn.Linear(64, 32, bias=False), \
        nn.Linear(32, 64, bias=False), 1
    layers[3].self_attn.k_proj = LowRankLinear(64, 32, rank=8, bias=False)  # Q/K/V unpacked in this block
    layers[3].mlp.down_proj = LowRankLinear(128, 64, rank=16, bias=False)
    for m in (layers[3].self_attn.k_proj, layers[3].mlp.down_proj):
        for lin in (m.first, m.second):
            nn.init.normal_(lin.weight, std=0.15)
    figures, edge = export(model, tmp_path)
    assert figures["ops"]["MatMul"] == 21 + 2 + 2  # unpacked q, k, v: +2; low-rank k and down: +1 each
    assert_logits_match(model, edge, prompt())
    with torch.no_grad():
        ref = model.generate(prompt(), max_new_tokens=6, do_sample=False)
    np.testing.assert_array_equal(greedy(edge, prompt().numpy(), 6), ref[:, 10:].numpy())


def test_qwen2_with_qkv_bias(tmp_path):
    model = tiny("qwen2", use_sliding_window=False)
    figures, edge = export(model, tmp_path)
    assert figures["max_nodes_per_block"] == 12  # the packed QKV bias adds one Add
    assert_logits_match(model, edge, prompt())


def test_llama3_rope_scaling_and_unsupported_rope(tmp_path):
    scaled = tiny(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    _, edge = export(scaled, tmp_path / "llama3")
    assert_logits_match(scaled, edge, prompt(length=40))

    with pytest.raises(UnsupportedModelError, match="rope type 'dynamic'"):
        build_llama(tiny(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), tmp_path / "dynamic")
