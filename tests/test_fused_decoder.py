"""compress.fused: the hand-written ONNX decoders (Llama-shaped incl. Mistral's and Qwen2's sliding window, Phi-3's
packed projections, Gemma 1-3, OLMo 2 and SmolLM3; GPT-2 and OPT; GPT-NeoX, Phi, Falcon and BLOOM) match torch (logits
and greedy tokens), keep a small constant node count per block, follow the modules' own widths (depth / width /
head pruning, low-rank layers), and are chosen by structure, not by model_type."""
import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compress.errors import UnsupportedModelError
from compress.fused import build_fused, build_llama
from compress.edge import EdgeModel

VOCAB, LAYERS = 128, 4


def tiny(model_type: str = "llama", kv_heads: int = 2, **overrides):
    """A random decoder: hidden 64, 4 layers, 4 heads (head_dim 16, GroupQueryAttention's minimum with rotary).
    initializer_range 0.15 rather than 0.02 so that logits are O(1) and greedy tokens vary."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
               num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
               initializer_range=0.15, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
               pad_token_id=None)
    cfg.update(overrides)
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                             "mistral": (MistralConfig, MistralForCausalLM),
                             "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[model_type]
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


def test_rotary_caches_are_computed_at_session_start_not_stored(tmp_path):
    """cos / sin are Mul, Cos, Sin of positions and inv_freq: the file holds 4 bytes per position, not 4 x
    head_dim (the stored tables were 67 MB for Gemma-3-270M at its 32k positions), and ONNX Runtime folds the
    three nodes when the session starts, so no decode step computes them."""
    import onnxruntime as ort

    model = tiny()
    small = build_llama(model, tmp_path / "short", max_length=64)["initializer_bytes"]
    long = build_llama(model, tmp_path / "long", max_length=64 + 1000)["initializer_bytes"]
    assert long - small == 4 * 1000
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "folded.onnx")
    ort.InferenceSession(str(tmp_path / "long" / "model.onnx"), options, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "folded.onnx"), load_external_data=False).graph.node}
    assert not {"Cos", "Sin"} & ops and "GroupQueryAttention" in ops
    assert_logits_match(model, EdgeModel(tmp_path / "long", threads=1), prompt())
    from benchmarks.harness import onnx_params  # positions and inv_freq are not parameters (torch counts none)
    from compress.models import count_parameters

    assert onnx_params(tmp_path / "long") == count_parameters(model)


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


def test_logits_to_keep_gives_the_last_positions_logits(tmp_path):
    """logits_to_keep k: the last k positions' logits, equal to those rows of the full logits (0: all); the
    prefill of both loops asks for the last one only."""
    import onnxruntime as ort

    model = tiny()
    figures, edge = export(model, tmp_path)
    ids = prompt(batch=2, length=7).numpy()
    full = edge.logits(ids)
    session = ort.InferenceSession(figures["path"], providers=["CPUExecutionProvider"])
    past = {i.name: np.zeros((2, i.shape[1], 0, i.shape[3]), np.float32) for i in session.get_inputs()
            if i.name.startswith("past_key_values.")}
    for keep, rows in [(0, 7), (1, 1), (3, 3)]:
        out = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                       "logits_to_keep": np.array([keep], np.int64), **past})[0]
        assert out.shape == (2, rows, VOCAB)
        np.testing.assert_allclose(out, full[:, -rows:], atol=1e-5, rtol=0)
    for loop in (edge, EdgeModel(tmp_path, threads=1, shared_cache=False)):
        last, _ = loop.prefill(ids)
        np.testing.assert_allclose(last, full[:, -1], atol=1e-5, rtol=0)


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
    # 4 per block (qkv, o, gate_up, down) + the head; unpacked q, k, v: +2; low-rank k and down: +1 each
    assert figures["ops"]["MatMul"] == 17 + 2 + 2 and figures["ops"]["Split"] == 4
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


# ---------------------------------------------------------------------- sliding window (Mistral, Qwen2)
def test_mistral_sliding_window_matches_eager_torch(tmp_path):
    """GroupQueryAttention's local_window_size is Hugging Face's sliding window: a window of 4 on a 12-token
    prompt (plus 8 generated) gives torch's logits and tokens, in both loops; without it torch differs."""
    model = tiny("mistral", sliding_window=4, attn_implementation="eager")
    figures = build_fused(model, tmp_path)
    assert figures["sliding_windows"] == [4] and figures["max_nodes_per_block"] <= 11
    edge, plain = EdgeModel(tmp_path, threads=1), EdgeModel(tmp_path, threads=1, shared_cache=False)
    ids = prompt(length=12)
    assert_logits_match(model, edge, ids)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    np.testing.assert_array_equal(greedy(edge, ids.numpy(), 8), ref[:, 12:].numpy())
    np.testing.assert_array_equal(greedy(plain, ids.numpy(), 8), ref[:, 12:].numpy())
    model.config.sliding_window = None  # the window matters on this prompt: full attention gives other logits
    with torch.no_grad():
        full = model(ids, use_cache=False).logits.numpy()
    assert np.abs(full - edge.logits(ids.numpy())).max() > 0.1


def test_qwen2_sliding_window_per_layer(tmp_path):
    """Qwen2 slides only from max_window_layers on: layers 0-1 full attention, 2-3 a window of 3."""
    model = tiny("qwen2", use_sliding_window=True, sliding_window=3, max_window_layers=2,
                 attn_implementation="eager")
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [None, None, 3, 3]
    figures = build_fused(model, tmp_path)
    windows = {n.name: next(a.i for a in n.attribute if a.name == "local_window_size")
               for n in onnx.load(figures["path"], load_external_data=False).graph.node
               if n.op_type == "GroupQueryAttention"}
    assert list(windows.values()) == [-1, -1, 3, 3]
    edge = EdgeModel(tmp_path, threads=1)
    assert_logits_match(model, edge, prompt())
    with torch.no_grad():
        ref = model.generate(prompt(), attention_mask=torch.ones_like(prompt()), max_new_tokens=6, do_sample=False)
    np.testing.assert_array_equal(greedy(edge, prompt().numpy(), 6), ref[:, 10:].numpy())


def test_qwen3_head_norms(tmp_path):
    """Qwen3 norms every query / key head (RMSNorm over head_dim) before the rotary embedding: the packed QKV
    MatMul is split, Q and K viewed per head (constant-shape Reshapes), normed, and fed to GQA unpacked."""
    model = tiny("qwen3", head_dim=16)
    with torch.no_grad():  # norm weights away from 1, so that a missing norm would show
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.normal_(1, 0.3)
            layer.self_attn.k_norm.weight.normal_(1, 0.3)
    figures = build_fused(model, tmp_path)
    assert figures["max_nodes_per_block"] == 11 + 7  # + Split, and Reshape, norm, Reshape for Q and for K
    assert figures["ops"]["MatMul"] == 4 * LAYERS + 1 and figures["ops"]["Reshape"] == 4 * LAYERS
    assert figures["ops"]["Shape"] == 1 and figures["ops"]["Gather"] == 1  # the Reshapes read constants
    assert not {"Concat", "Unsqueeze", "Range", "Expand", "Where"} & set(figures["ops"])
    edge = EdgeModel(tmp_path, threads=1)
    assert_logits_match(model, edge, prompt())
    with torch.no_grad():
        ref = model.generate(prompt(), attention_mask=torch.ones_like(prompt()), max_new_tokens=8, do_sample=False)
    np.testing.assert_array_equal(greedy(edge, prompt().numpy(), 8), ref[:, 10:].numpy())


# ---------------------------------------------------------------------- GPT-2
GPT2_BLOCK_NODES = 9  # ln_1, c_attn MatMul + Add, GQA, c_proj, ln_2, c_fc, FastGelu, c_proj


def tiny_gpt2(**overrides):
    """A random GPT-2: hidden 64, 4 layers, 4 heads (head_dim 16). initializer_range 0.3: at GPT-2's usual
    scale a tied head repeats the last token, and greedy tokens would not vary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, n_embd=64, n_layer=LAYERS, n_head=4, n_positions=64, initializer_range=0.3,
               bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


def assert_generates_like_torch(model, path, ids, n):
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    want = ref[:, ids.shape[1]:].numpy()
    assert len(set(want.ravel().tolist())) > 2  # tokens that vary, so the comparison means something
    for shared in (True, False):  # the shared-cache loop and the plain loop
        np.testing.assert_array_equal(greedy(EdgeModel(path, threads=1, shared_cache=shared), ids.numpy(), n), want)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gpt2_matches_torch_logits_and_greedy_tokens(tmp_path, tied):
    torch.set_num_threads(1)
    model = tiny_gpt2(tie_word_embeddings=tied)
    figures = build_fused(model, tmp_path)  # dispatched by structure to the GPT-2 writer
    edge = EdgeModel(tmp_path, threads=1)
    assert_logits_match(model, edge, prompt(batch=2, length=10))
    assert_generates_like_torch(model, tmp_path, prompt(length=10), 12)

    # a small constant per block: no shape arithmetic per block, and positions computed once
    assert figures["layers"] == LAYERS and figures["tied_embeddings"] == tied
    assert figures["max_nodes_per_block"] == GPT2_BLOCK_NODES
    assert figures["nodes"] <= GPT2_BLOCK_NODES * LAYERS + 14  # + mask lengths, final norm, head and its Slice
    assert not {"Concat", "Unsqueeze", "Reshape", "Range", "Expand", "Where"} & set(figures["ops"])
    assert figures["ops"]["GroupQueryAttention"] == LAYERS and figures["ops"]["Shape"] == 2
    assert figures["ops"]["SkipLayerNormalization"] == 2 * LAYERS + 1 and figures["ops"]["FastGelu"] == LAYERS
    names = [i.name for i in onnx.load(figures["path"], load_external_data=False).graph.initializer]
    assert "transformer.wte.weight" in names and ("lm_head.weight" in names) != tied
    assert edge.shared_cache and edge.inputs["past_key_values.0.key"].shape[1:] == [4, "past_sequence_length", 16]


def test_gpt2_decode_steps_equal_one_full_pass(tmp_path):
    """Positions come from the mask length: prefill + decode steps give the logits of one full pass."""
    model = tiny_gpt2()
    build_fused(model, tmp_path)
    edge = EdgeModel(tmp_path, threads=1)
    ids = prompt(batch=2, length=16).numpy()
    full = edge.logits(ids)
    last, state = edge.prefill(ids[:, :6], max_new_tokens=4)  # the buffer grows once on the way
    for t in range(6, 16):
        np.testing.assert_allclose(last, full[:, t - 1], atol=1e-4)
        last, state = edge.decode_step(ids[:, t:t + 1], state)
    np.testing.assert_allclose(last, full[:, -1], atol=1e-4)


def test_gpt2_per_layer_widths_pruned_heads_and_low_rank(tmp_path):
    """What prune and lowrank make of GPT-2: a narrower MLP in layer 1 (Conv1D), heads 0 and 3 of layer 2
    pruned (Hugging Face's prune_heads), layer 3's c_attn and c_fc low-rank (two MatMuls each)."""
    from transformers.pytorch_utils import Conv1D

    from compress.pruning.lowrank import LowRankLinear

    model = tiny_gpt2()
    blocks = model.transformer.h
    torch.manual_seed(2)
    blocks[1].mlp.c_fc, blocks[1].mlp.c_proj = Conv1D(96, 64), Conv1D(64, 96)
    for m in (blocks[1].mlp.c_fc, blocks[1].mlp.c_proj):
        nn.init.normal_(m.weight, std=0.3)
        nn.init.normal_(m.bias, std=0.1)
    model.prune_heads({2: [0, 3]})
    assert blocks[2].attn.num_heads == 2
    blocks[3].attn.c_attn = LowRankLinear(64, 192, rank=16)
    blocks[3].mlp.c_fc = LowRankLinear(64, 256, rank=16)
    for m in (blocks[3].attn.c_attn, blocks[3].mlp.c_fc):
        for lin in (m.first, m.second):
            nn.init.normal_(lin.weight, std=0.3)
    figures = build_fused(model, tmp_path)
    assert figures["ops"]["MatMul"] == 4 * LAYERS + 1 + 2  # + the tied head; +1 per low-rank projection
    assert figures["max_nodes_per_block"] == GPT2_BLOCK_NODES + 2  # layer 3
    edge = EdgeModel(tmp_path, threads=1)
    assert [edge.inputs[f"past_key_values.{i}.key"].shape[1] for i in range(LAYERS)] == [4, 4, 2, 4]
    assert_logits_match(model, edge, prompt())
    assert_generates_like_torch(model, tmp_path, prompt(), 8)


def tiny_opt(**overrides):
    """A random OPT: GPT-2's block with separate q / k / v (biased), fc1 / fc2 in the block itself, a ReLU and
    position rows offset by 2; hidden 64, 4 layers, 4 heads (head_dim 16)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=LAYERS, num_attention_heads=4,
               max_position_embeddings=64, word_embed_proj_dim=64, init_std=0.3, bos_token_id=None,
               eos_token_id=None, pad_token_id=1)
    cfg.update(overrides)
    return OPTForCausalLM(OPTConfig(**cfg)).eval()


def test_opt_matches_torch_logits_and_greedy_tokens(tmp_path):
    """OPT goes to the GPT-2 writer by structure: q / k / v packed into one MatMul, Add + Relu, positions read
    from row 2 on; 10 nodes per block (GPT-2's 9, the ReLU's bias an Add of its own)."""
    torch.set_num_threads(1)
    model = tiny_opt()
    figures = build_fused(model, tmp_path)
    edge = EdgeModel(tmp_path, threads=1)
    assert_logits_match(model, edge, prompt(batch=2, length=10))
    assert_generates_like_torch(model, tmp_path, prompt(length=10), 12)
    assert figures["max_nodes_per_block"] == GPT2_BLOCK_NODES + 1
    assert figures["ops"]["Relu"] == LAYERS and figures["ops"]["GroupQueryAttention"] == LAYERS
    assert figures["cache_length"] == 64  # the 66-row table less OPT's offset of 2


def test_biogpt_scaled_token_embeddings(tmp_path):
    """BioGPT scales its token embeddings by sqrt(hidden) before adding the positions (offset 2, as OPT's):
    refused before ("an embedding scale ... is not supported"); the scale is read from block 0's input and
    written as one Mul after the Gather (the tied head reads the table unscaled)."""
    from transformers import BioGptConfig, BioGptForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = BioGptForCausalLM(BioGptConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS,
                                           num_attention_heads=2, intermediate_size=128, max_position_embeddings=64,
                                           initializer_range=0.3, pad_token_id=0, bos_token_id=None,
                                           eos_token_id=None)).eval()
    figures = build_fused(model, tmp_path)
    assert figures["tied_embeddings"] and figures["cache_length"] == 64 and figures["ops"]["Mul"] == 1
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph
    scale = next(t for t in graph.initializer if t.name == "/transformer/wte/scale")
    assert onnx.numpy_helper.to_array(scale) == np.float32(8.0)  # sqrt(64)
    edge = EdgeModel(tmp_path, threads=1)
    assert_logits_match(model, edge, prompt(batch=2, length=10))
    assert_generates_like_torch(model, tmp_path, prompt(length=10), 12)


def test_xglm_sinusoidal_positions_as_the_position_table(tmp_path):
    """XGLM adds fixed sinusoidal positions (a `weights` buffer, rows read from offset 2) to its token embeddings
    times sqrt(hidden): the GPT-2 writer read only nn.Embedding position tables, so XGLM went to the GPT-NeoX
    writer and was refused; now the fixed table is its position table."""
    from transformers import XGLMConfig, XGLMForCausalLM

    torch.manual_seed(0)
    model = XGLMForCausalLM(XGLMConfig(vocab_size=VOCAB, d_model=64, num_layers=LAYERS, attention_heads=2, ffn_dim=128,
                                       max_position_embeddings=64, init_std=0.3, pad_token_id=0, bos_token_id=None,
                                       eos_token_id=None)).eval()
    figures = build_fused(model, tmp_path)
    assert figures["cache_length"] == 64 and figures["ops"]["Mul"] == 1  # the embedding scale
    assert_logits_match(model, EdgeModel(tmp_path, threads=1), prompt(batch=2, length=10))


def test_head_pruned_opt_exports_with_the_kv_cache_by_default(tmp_path):
    """prune records OPT's cut heads as an attention_heads entry (its config keeps 4): optimum cannot export that
    with the KV cache, the fused writer does (it reads the widths from the modules)."""
    import compress
    from family_cases import OPTIONS, context

    from compress.checkpoint import Artifact
    from compress.passes import get
    from tiny_models import VOCAB as TOKENIZER_VOCAB, family_tokenizer

    torch.set_num_threads(1)
    art = Artifact(kind="torch", task="causal-lm", tokenizer=family_tokenizer("opt"),
                   model=tiny_opt(vocab_size=TOKENIZER_VOCAB))  # the calibration text's ids
    ctx = context("causal-lm", tmp_path / "scratch")
    pruned = get("prune")(**OPTIONS["heads"][1]).run(art, ctx)
    assert pruned.structure[0]["heads"] == [2] * LAYERS and "carries the pruned heads" in pruned.info["heads"]["note"]
    out = get("export")(check_samples=2, check_seq_len=16).run(pruned, ctx)
    assert out.info["graph"] == "fused"
    path = compress.save(out, tmp_path / "onnx")
    assert_generates_like_torch(pruned.model, path, prompt(length=10), 8)


@pytest.mark.parametrize("overrides,match", [
    ({"do_layer_norm_before": False}, "one final norm outside the blocks, found none"),  # post-norm OPT has none
    ({"word_embed_proj_dim": 32}, "no projection outside the blocks but the LM head; found model.decoder.project_out"),
], ids=["post-norm", "projected-embeddings"])
def test_unsupported_opt_is_refused_clearly(tmp_path, overrides, match):
    with pytest.raises(UnsupportedModelError, match=match):
        build_fused(tiny_opt(**overrides), tmp_path)
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("overrides,match", [
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"scale_attn_weights": False}, "scale_attn_weights"),
    ({"add_cross_attention": True}, "add_cross_attention"),
    ({"activation_function": "silu"}, "activation 'silu'"),
    ({"n_embd": 48, "n_head": 4}, "head_dim 12"),  # GroupQueryAttention without rotary: head_dim % 8
], ids=["inverse-layer-scale", "unscaled", "cross-attention", "silu", "head-dim-12"])
def test_unsupported_gpt2_is_refused_clearly(tmp_path, overrides, match):
    with pytest.raises(UnsupportedModelError, match=match):
        build_fused(tiny_gpt2(**overrides), tmp_path)
    assert not (tmp_path / "model.onnx").exists()


def test_gpt2_reorder_and_upcast_attn_exports(tmp_path):
    """reorder_and_upcast_attn only reorders fp32 operations in torch's eager attention: same logits."""
    model = tiny_gpt2(reorder_and_upcast_attn=True, attn_implementation="eager")
    build_fused(model, tmp_path)
    assert_logits_match(model, EdgeModel(tmp_path, threads=1), prompt())


def test_gpt2_low_rank_embedding_is_refused(tmp_path):
    from compress.pruning.lowrank import LowRankEmbedding

    model = tiny_gpt2()
    model.transformer.wte = LowRankEmbedding(VOCAB, 64, rank=8)
    with pytest.raises(UnsupportedModelError, match="lowrank.embedding_rank factorized this one"):
        build_fused(model, tmp_path)


# ---------------------------------------------------------------------- chosen by structure, not model_type
def assert_matches_torch(model, path, n: int = 8):
    edge = EdgeModel(path, threads=1)
    assert_logits_match(model, edge, prompt())
    with torch.no_grad():
        ref = model.generate(prompt(), attention_mask=torch.ones_like(prompt()), max_new_tokens=n, do_sample=False)
    want = ref[:, 10:].numpy()
    assert len(set(want.ravel().tolist())) > 2  # tokens that vary, so the comparison means something
    np.testing.assert_array_equal(greedy(edge, prompt().numpy(), n), want)


def test_llama_shaped_model_under_an_unknown_model_type_is_written_fused(tmp_path):
    model = tiny()
    model.config.model_type = "my-llama"  # a family the suite has never heard of, Llama's layout
    figures = build_fused(model, tmp_path)
    assert figures["max_nodes_per_block"] <= 11 and figures["ops"]["GroupQueryAttention"] == LAYERS
    assert_matches_torch(model, tmp_path)


def tiny_phi3(**overrides):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.15,
               tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg.update(overrides)
    return Phi3ForCausalLM(Phi3Config(**cfg)).eval()


def test_phi3_packed_qkv_and_gate_up(tmp_path):
    """Phi-3's qkv_proj is already [q | k | v] (one MatMul into GQA); its gate_up_proj is one MatMul and a
    Split."""
    model = tiny_phi3()
    figures = build_fused(model, tmp_path)
    assert figures["max_nodes_per_block"] == 11  # + Split, - the second MLP MatMul
    assert figures["ops"]["MatMul"] == 4 * LAYERS + 1 and figures["ops"]["Split"] == LAYERS
    assert_matches_torch(model, tmp_path)


def test_longrope_short_and_long_factors_as_transformers_switches_them(tmp_path):
    """Phi-3.5-mini / Phi-4-mini's longrope: transformers uses the short factors while a pass stays within
    original_max_position_embeddings and the long ones, for every position, once it reaches past them; its Phi-3
    generation then recomputes the cache once with them. It was refused (the export fell back to optimum's graph).
    By default the graph holds the short positions only, with the short factors (even after a long pass swapped the
    module's inv_freq in place); with a longer max_length it holds both factors' rows and picks them per run
    (position_ids), and compress.edge's generate recomputes the cache where transformers does."""
    longrope = tiny_phi3(rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.5 * i for i in range(8)],
                                       "long_factor": [3.0 + 0.5 * i for i in range(8)]},
                         original_max_position_embeddings=32)
    with torch.no_grad():
        longrope(prompt(length=40))  # past 32 positions: transformers now holds the long inv_freq
    figures = build_fused(longrope, tmp_path / "short")
    assert figures["cache_length"] == 32 and figures["longrope_short_positions"] is None
    edge = EdgeModel(tmp_path / "short", threads=1)
    assert edge.max_length == 32
    assert_logits_match(longrope, edge, prompt(length=24))
    assert_generates_like_torch(longrope, tmp_path / "short", prompt(length=20), 12)  # 32 positions: short only

    figures = build_fused(longrope, tmp_path / "both", max_length=64)
    assert figures["cache_length"] == 64 and figures["longrope_short_positions"] == 32
    edge = EdgeModel(tmp_path / "both", threads=1)
    for length in (24, 40):  # a pass within the short positions, and one past them
        assert_logits_match(longrope, edge, prompt(length=length))
    assert_generates_like_torch(longrope, tmp_path / "both", prompt(length=24), 16)  # crosses 32 at step 9


def test_partial_rotary_in_the_llama_writer(tmp_path):
    """Phi-4-mini's layout: rotary over the first part of each head's channels (Phi-4-mini: 3/4; here 32 of 64,
    partial_rotary_factor 0.5); a width GroupQueryAttention cannot rotate (8) is refused."""
    model = tiny_phi3(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, partial_rotary_factor=0.5)
    build_fused(model, tmp_path)
    assert_matches_torch(model, tmp_path)
    with pytest.raises(UnsupportedModelError, match="rotary embedding over 8 of 64 channels per head"):
        build_fused(tiny_phi3(hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                              partial_rotary_factor=0.125), tmp_path / "narrow")


def test_stablelm_layer_norms_qkv_bias_and_partial_rotary(tmp_path):
    """StableLM 2's layout goes to the Llama writer: LayerNorms with biases (SkipLayerNormalization), q/k/v
    biases, rotary over the first half of each head; its parallel-residual variant too (it was refused)."""
    from transformers import StableLmConfig, StableLmForCausalLM

    def stablelm(**overrides):
        torch.manual_seed(0)
        cfg = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=LAYERS,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                   partial_rotary_factor=0.5, use_qkv_bias=True, initializer_range=0.15, bos_token_id=None,
                   eos_token_id=None, pad_token_id=None)
        return StableLmForCausalLM(StableLmConfig(**{**cfg, **overrides})).eval()

    model = stablelm()
    figures = build_fused(model, tmp_path)
    ops = figures["ops"]
    assert ops["SkipLayerNormalization"] == 2 * LAYERS and "SkipSimplifiedLayerNormalization" not in ops
    assert_matches_torch(model, tmp_path)
    parallel = stablelm(use_parallel_residual=True)
    assert build_fused(parallel, tmp_path / "parallel")["parallel_residual"]
    assert_matches_torch(parallel, tmp_path / "parallel")


def test_smoothing_divides_the_up_half_of_the_packed_gate_up(tmp_path):
    """SmoothQuant-style smoothing on the fused graph: the SwiGLU product's `up` is the second half of the
    packed gate_up MatMul (through a Split), so down_proj's group divides those columns only, and the graph
    computes the same function."""
    from compress.quant.smooth import find_groups, smooth

    model = tiny()
    _, edge = export(model, tmp_path / "plain")
    graph = onnx.load(str(tmp_path / "plain" / "model.onnx"))
    inter = model.config.intermediate_size
    spans = [g.columns for g in find_groups(graph) if g.divide_columns]
    assert spans == [(inter, 2 * inter)] * LAYERS  # one per block: up's half of [gate | up]

    ids = prompt().numpy()
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "logits_to_keep": np.array([0], np.int64),
            **edge._empty_past(1)}
    info = smooth(graph, [feed], alpha=0.5)
    assert info["groups"] == 3 * LAYERS  # qkv after the input norm, gate_up after the second, down
    (tmp_path / "smoothed").mkdir()
    onnx.save(graph, str(tmp_path / "smoothed" / "model.onnx"))
    np.testing.assert_allclose(EdgeModel(tmp_path / "smoothed", threads=1).logits(ids), edge.logits(ids),
                               rtol=1e-4, atol=1e-4)


def test_gemma_scaled_embeddings_offset_norms_and_tanh_gelu(tmp_path):
    """Gemma: embeddings times sqrt(hidden) (a Mul after the Gather: the tied head reads the unscaled table),
    RMSNorm times (1 + weight) (folded into the weight), gelu_pytorch_tanh (FastGelu), explicit head_dim."""
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    model = GemmaForCausalLM(GemmaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=128, initializer_range=0.3,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)).eval()
    with torch.no_grad():  # norm weights away from Gemma's 0 (= scale 1), so that a missed +1 would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    figures = build_fused(model, tmp_path)
    assert figures["tied_embeddings"] and figures["max_nodes_per_block"] == 10  # FastGelu for Sigmoid + Mul
    # act * up per block; the embedding scale; positions x inv_freq of the rotary caches
    assert figures["ops"]["FastGelu"] == LAYERS and figures["ops"]["Mul"] == LAYERS + 2
    assert_matches_torch(model, tmp_path)
    from benchmarks.harness import onnx_params  # the scale is a 0-d constant, not a parameter (it was [1])
    from compress.models import count_parameters

    assert onnx_params(tmp_path) == count_parameters(model)


def test_erf_gelu_and_relu_export_and_other_activations_are_refused(tmp_path):
    for act, op in (("gelu", "Gelu"), ("relu", "Relu")):
        model = tiny(hidden_act=act)
        figures = build_fused(model, tmp_path / act)
        assert figures["ops"][op] == LAYERS
        assert_logits_match(model, EdgeModel(tmp_path / act, threads=1), prompt())
    with pytest.raises(UnsupportedModelError, match="activation 'sigmoid'"):
        build_fused(tiny(hidden_act="sigmoid"), tmp_path / "sigmoid")


def test_layout_no_writer_handles_is_refused_naming_the_part(tmp_path):
    """A plain MLP with q/k/v packed per head and no positions at all (a GPT-NeoX whose rotary embedding turns
    nothing and holds no inv_freq): no rotary, no ALiBi, no learned table; refused, naming the parts."""
    class NoPositions(nn.Module):
        def forward(self, x, position_ids):
            shape = (*position_ids.shape, 16)
            return torch.ones(shape, dtype=x.dtype), torch.zeros(shape, dtype=x.dtype)

    model = tiny_neox()
    model.gpt_neox.rotary_emb = NoPositions()
    with pytest.raises(UnsupportedModelError, match=r"gpt_neox\.layers\.0\.mlp is plain .* no rotary embedding, no "
                                                    "ALiBi bias, and no learned position table"):
        build_fused(model, tmp_path)
    assert not (tmp_path / "model.onnx").exists()


def tiny_bloom(heads: int = 6):
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    return BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=8 * heads, n_head=heads, n_layer=LAYERS,
                                        initializer_range=0.3, bos_token_id=None, eos_token_id=None)).eval()


def test_bloom_alibi_with_its_embedding_norm(tmp_path):
    """BLOOM: ALiBi positions (the slopes read from the bias the model hands block 0; 6 heads, not a power of
    two, so the second series of slopes too) as GroupQueryAttention's attention_bias, computed once per run;
    the LayerNorm of the embeddings before block 0; q/k/v packed per head; the residual added inside its
    attention and MLP modules (the attention's contribution read at its output projection). Prompts of 280
    tokens put positions past 256 in the comparison."""
    torch.set_num_threads(1)
    model = tiny_bloom()
    figures = build_fused(model, tmp_path)
    assert figures["alibi"] == "added" and figures["embedding_norm"] and figures["max_nodes_per_block"] == 9
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph
    assert figures["ops"]["GroupQueryAttention"] == LAYERS  # and one bias for all of them:
    assert sum(n.name.startswith("/model/alibi/") for n in graph.node) == 10
    from benchmarks.harness import onnx_params  # the slopes are not parameters (torch computes them)
    from compress.models import count_parameters

    assert onnx_params(tmp_path) == count_parameters(model)
    edge = EdgeModel(tmp_path, threads=1)
    assert_logits_match(model, edge, prompt(batch=2, length=10))
    assert_logits_match(model, edge, prompt(length=280))
    assert_generates_like_torch(model, tmp_path, prompt(length=10), 12)


def tiny_mpt(heads: int = 6, **attn_config):
    from transformers import MptConfig, MptForCausalLM

    torch.manual_seed(0)
    return MptForCausalLM(MptConfig(vocab_size=VOCAB, d_model=8 * heads, n_heads=heads, n_layers=LAYERS,
                                    expansion_ratio=2, max_seq_len=320, initializer_range=0.3,
                                    attn_config=attn_config or None)).eval()


def test_mpt_alibi_counted_from_the_last_position(tmp_path):
    """MPT: no position table; ALiBi as `position_bias`, built once over max_seq_len as slope x (key position -
    the last position) and sliced in the attention (the slopes read where it is 0, at the last position; 6
    heads: its second series too). The layout (packed Wqkv, up_proj / down_proj without a gate, LayerNorms
    without biases, the MLP adding the residual itself) goes to the GPT-NeoX writer, which the GPT-2 writer's
    missing position table used to stop. The config's max_seq_len is the graph's length."""
    from compress.architecture import find
    from compress.fused.graph import alibi_slopes

    torch.set_num_threads(1)
    model = tiny_mpt()
    slopes, rounded = alibi_slopes(model, find(model))
    pow2 = 2.0 ** -np.arange(1, 9)  # 8 / 8 per step on the next power of two, odd ones first
    np.testing.assert_array_equal(slopes, np.concatenate([pow2[1::2], pow2[::2]])[:6].astype(np.float32))
    assert not rounded
    figures = build_fused(model, tmp_path)
    assert figures["alibi"] == "added" and figures["cache_length"] == 320 and figures["max_nodes_per_block"] == 8
    edge = EdgeModel(tmp_path, threads=1)
    assert edge.max_length == 320
    assert_logits_match(model, edge, prompt(batch=2, length=10))
    assert_logits_match(model, edge, prompt(length=300))
    assert_generates_like_torch(model, tmp_path, prompt(length=10), 12)


def test_mpt_softmax_scale_is_the_attention_scale(tmp_path):
    """MPT's attn_config.softmax_scale replaces head_dim ** -0.5 (the graph was refused, its logits 1.9 away)."""
    model = tiny_mpt(softmax_scale=0.2)
    build_fused(model, tmp_path)
    assert_logits_match(model, EdgeModel(tmp_path, threads=1), prompt(batch=2, length=10))


def test_clipped_qkv_is_refused_by_its_field(tmp_path):
    """MPT's (and OLMo's) clip_qkv clamps q/k/v, which no writer writes; a self-check on a few random tokens
    need not reach the bound, so the field itself refuses."""
    with pytest.raises(UnsupportedModelError, match=r"MptForCausalLM clamps q/k/v to \+-8.0 \(clip_qkv\)"):
        build_fused(tiny_mpt(clip_qkv=8.0), tmp_path)
    assert not list(tmp_path.iterdir())


def test_alibi_head_dim_ortgqa_cannot_run_is_refused_and_nothing_left(tmp_path):
    """GroupQueryAttention needs head_dim % 8 == 0 without rotary: BLOOM with heads of 12 raised ONNX Runtime's
    error from the self-check and left the graph on disk; now refused by the writer, naming the rule."""
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=48, n_head=4, n_layer=2)).eval()
    with pytest.raises(UnsupportedModelError, match=r"head_dim 12; .* % 8 without"):
        build_fused(model, tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_graph_onnx_runtime_cannot_run_is_refused_and_deleted(tmp_path, monkeypatch):
    """Whatever ONNX Runtime raises on the written graph (an op's own limits) is a refusal, and the files go."""
    from compress.edge import EdgeModel as Edge

    def fails(self, *args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : head_size must be a multiple of 8")

    monkeypatch.setattr(Edge, "logits", fails)
    with pytest.raises(UnsupportedModelError, match="ONNX Runtime cannot run the Llama writer's graph of "
                                                    "LlamaForCausalLM .*head_size must be a multiple of 8"):
        build_fused(tiny(), tmp_path)
    assert not list(tmp_path.iterdir())


def test_bloom_fused_export_and_int8_through_the_passes(tmp_path):
    """export's graph: auto takes BLOOM fused now; the int8 quantizer and the edge loop take the graph with
    its attention bias as they take the others."""
    import compress
    from family_cases import check_onnx, context, run_pass

    from compress.checkpoint import Artifact
    from tiny_models import VOCAB as TOKENIZER_VOCAB, family_tokenizer

    torch.manual_seed(0)
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(vocab_size=TOKENIZER_VOCAB, hidden_size=32, n_head=4, n_layer=2,
                                         initializer_range=0.3)).eval()
    art = Artifact(kind="torch", task="causal-lm", tokenizer=family_tokenizer("bloom"), model=model)
    ctx = context("causal-lm", tmp_path / "scratch")
    out = run_pass("export", art, ctx)
    assert out.info["graph"] == "fused"
    path = compress.save(out, tmp_path / "onnx")
    assert check_onnx(model, compress.load(path), "causal-lm") is None
    q = run_pass("int8", compress.load(path), ctx)
    assert q.info["discrepancy"]["passed"] and q.info["discrepancy"]["top1_agreement"] >= 0.9


def test_gptj_rotary_table_read_back_into_frequencies(tmp_path):
    """GPT-J keeps its rotary embedding as a table in each attention module (embed_positions: sin | cos of
    position x inv_freq, no module with inv_freq): the frequencies are read back from the table (exactly
    from 2,048 rows, to 3e-7 from 512), GroupQueryAttention computes the rest; rotary over the first 16 of 32
    channels, turning channel pairs (found by the logits); parallel blocks with one norm, an LM head with a
    bias. Compared over 500 tokens."""
    from transformers import GPTJConfig, GPTJForCausalLM

    from compress.fused.graph import rotary

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPTJForCausalLM(GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=LAYERS, n_head=2, rotary_dim=16,
                                       n_positions=512, initializer_range=0.3, bos_token_id=None,
                                       eos_token_id=None)).eval()
    want = 1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    torch.testing.assert_close(rotary(model).inv_freq.double(), want, rtol=3e-7, atol=0)
    from transformers.models.gptj.modeling_gptj import create_sinusoidal_positions

    from compress.fused.graph import _table_inv_freq

    for positions in (2048, 8192):  # long tables: read back exactly (8,192 rows were not recognised)
        exact = (1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.int64) / 64))).float()
        assert torch.equal(_table_inv_freq(create_sinusoidal_positions(positions, 64)), exact)
    figures = build_fused(model, tmp_path)
    assert figures["rotary_interleaved"] and figures["parallel_residual"] and figures["max_nodes_per_block"] == 8
    edge = EdgeModel(tmp_path, threads=1)
    assert_logits_match(model, edge, prompt(length=500))
    assert_generates_like_torch(model, tmp_path, prompt(length=10), 12)


def test_codegen_qkv_in_chunks_found_by_the_logits(tmp_path):
    """CodeGen packs qkv_proj in 4 chunks of [q v k], each for a quarter of the heads, which no module shows:
    read as [q | k | v] the logits were 0.5 off and the graph was refused. The writer now tries that packing
    too (after the plain and the interleaved rotary readings), with GPT-J's rotary table."""
    from transformers import CodeGenConfig, CodeGenForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = CodeGenForCausalLM(CodeGenConfig(vocab_size=VOCAB, n_embd=128, n_layer=2, n_head=8, rotary_dim=16,
                                             n_positions=512, initializer_range=0.3, bos_token_id=None,
                                             eos_token_id=None)).eval()
    figures = build_fused(model, tmp_path)
    assert figures["qkv_chunks"] == 4 and figures["rotary_interleaved"] and figures["max_nodes_per_block"] == 8
    edge = EdgeModel(tmp_path, threads=1)
    assert_logits_match(model, edge, prompt(length=300))
    assert_generates_like_torch(model, tmp_path, prompt(length=10), 12)


@pytest.mark.parametrize("heads,table", [(4, 2048), (12, 200)], ids=["4-heads", "12-heads-200-positions"])
def test_falcon_alibi_added_before_scaling_and_rounded_to_bfloat16(tmp_path, heads, table):
    """Falcon with alibi: the bias is added before the scores are scaled (the second reading build_fused tries,
    the first fails its check of the logits), and transformers computes slope x position in bfloat16 (the
    position rounded, then the product), which shows past position 256 (the graph rounds both: Casts there
    and back). 12 heads (Falcon-RW-1B's count) have slopes that are not powers of two (refused when only the
    product was rounded); with 200 positions in its config the probe still reads past 256 (the rounding was
    missed, and an export for 600 positions was 0.11 off past 256). Its rotary module exists but is unused."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = FalconForCausalLM(FalconConfig(vocab_size=VOCAB, hidden_size=16 * heads, num_hidden_layers=2,
                                           num_attention_heads=heads, alibi=True, initializer_range=0.3,
                                           max_position_embeddings=table, bos_token_id=None,
                                           eos_token_id=None)).eval()
    figures = build_fused(model, tmp_path, max_length=600)
    assert figures["alibi"] == "scaled" and "rotary_interleaved" not in figures
    graph = onnx.load(tmp_path / "model.onnx", load_external_data=False).graph
    casts = [n.attribute[0].i for n in graph.node if n.op_type == "Cast" and n.name.startswith("/model/alibi/")]
    assert casts.count(onnx.TensorProto.BFLOAT16) == 2  # the positions, the product
    assert all(next(a.i for a in n.attribute if a.name == "do_rotary") == 0
               for n in graph.node if n.op_type == "GroupQueryAttention")
    edge = EdgeModel(tmp_path, threads=1)
    assert_logits_match(model, edge, prompt(length=500))
    assert_generates_like_torch(model, tmp_path, prompt(length=10), 12)


def tiny_neox(**overrides):
    """A random GPT-NeoX (Pythia's layout): hidden 64, 4 layers, 2 heads of 32 with rotary over the first 16
    channels (rotary_pct 0.5), q/k/v packed per head, parallel residual."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
               num_attention_heads=2, max_position_embeddings=64, rotary_pct=0.5, initializer_range=0.3,
               bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg.update(overrides)
    return GPTNeoXForCausalLM(GPTNeoXConfig(**cfg)).eval()


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_neox_matches_torch_logits_and_greedy_tokens(tmp_path, parallel):
    """GPT-NeoX goes to its writer by structure (a plain MLP with rotary positions): the per-head packed q/k/v
    reordered into one [Q | K | V] MatMul, partial rotary inside GroupQueryAttention; 10 nodes per parallel
    block (the second norm a LayerNormalization of the same sum, one Add of the two branches), 9 sequential."""
    torch.set_num_threads(1)
    model = tiny_neox(use_parallel_residual=parallel)
    figures = build_fused(model, tmp_path)
    edge = EdgeModel(tmp_path, threads=1)
    assert_logits_match(model, edge, prompt(batch=2, length=10))
    assert_generates_like_torch(model, tmp_path, prompt(length=10), 12)
    assert figures["parallel_residual"] == parallel and figures["max_nodes_per_block"] == 9 + parallel
    assert figures["ops"]["GroupQueryAttention"] == LAYERS and figures["ops"]["MatMul"] == 4 * LAYERS + 1
    assert not {"Concat", "Unsqueeze", "Reshape", "Range", "Expand", "Where"} & set(figures["ops"])


def test_neox_with_a_relu(tmp_path):
    model = tiny_neox(hidden_act="relu")
    figures = build_fused(model, tmp_path)
    assert figures["ops"]["Relu"] == LAYERS
    assert_logits_match(model, EdgeModel(tmp_path, threads=1), prompt())


def test_pruned_and_low_rank_neox_exports_fused_with_the_kv_cache(tmp_path):
    """What prune and lowrank make of GPT-NeoX: one of two heads per layer (an attention_heads entry: the config
    keeps 2, optimum cannot export it with the cache), half the MLP, low-rank projections: fused by default."""
    import compress
    from family_cases import OPTIONS, context

    from compress.checkpoint import Artifact
    from compress.passes import get
    from tiny_models import VOCAB as TOKENIZER_VOCAB, family_tokenizer

    torch.set_num_threads(1)
    art = Artifact(kind="torch", task="causal-lm", tokenizer=family_tokenizer("gpt_neox"),
                   model=tiny_neox(vocab_size=TOKENIZER_VOCAB))  # the calibration text's ids
    ctx = context("causal-lm", tmp_path / "scratch")
    for key in ("heads", "mlp", "lowrank"):
        name, opts = OPTIONS[key]
        art = get(name)(**opts).run(art, ctx)
    from compress.architecture import find

    assert [e["type"] for e in art.structure] == ["attention_heads", "lowrank"]  # the MLP cut: a stock config
    assert find(art.model).mlp_width(0) == 64
    out = get("export")(check_samples=2, check_seq_len=16).run(art, ctx)
    assert out.info["graph"] == "fused"
    path = compress.save(out, tmp_path / "onnx")
    edge = EdgeModel(path, threads=1)
    assert [edge.inputs[f"past_key_values.{i}.key"].shape[1] for i in range(LAYERS)] == [1] * LAYERS
    assert_generates_like_torch(art.model, path, prompt(length=10), 8)


def tiny_parallel_one_norm(family: str):
    """Parallel blocks with one norm for attention and MLP: Phi (separate biased q / k / v, rotary over half of
    each head, an LM head with a bias) or Falcon-7B's layout (multi-query [q heads | k | v], FalconLinear, tied)."""
    from transformers import FalconConfig, FalconForCausalLM, PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=2,
                  max_position_embeddings=64, initializer_range=0.3, bos_token_id=None, eos_token_id=None)
    if family == "phi":
        return PhiForCausalLM(PhiConfig(**common, intermediate_size=128, partial_rotary_factor=0.5)).eval()
    return FalconForCausalLM(FalconConfig(**common)).eval()


@pytest.mark.parametrize("family", ["phi", "falcon"])
def test_parallel_blocks_with_one_norm_match_torch(tmp_path, family):
    """One LayerNorm read by both branches: 9 nodes per block for Phi (its q / k / v packed into one MatMul),
    8 for Falcon (no biases: no Add after the QKV MatMul); Falcon's multi-query attention is one KV head."""
    torch.set_num_threads(1)
    model = tiny_parallel_one_norm(family)
    figures = build_fused(model, tmp_path)
    edge = EdgeModel(tmp_path, threads=1)
    assert_logits_match(model, edge, prompt(batch=2, length=10))
    assert_generates_like_torch(model, tmp_path, prompt(length=10), 12)
    assert figures["parallel_residual"] and figures["ops"]["LayerNormalization"] == 1  # block 0's, alone
    assert figures["max_nodes_per_block"] == {"phi": 9, "falcon": 8}[family]
    assert edge.inputs["past_key_values.0.key"].shape[1] == {"phi": 2, "falcon": 1}[family]


def test_an_embedding_module_that_scales_its_table_gets_a_mul(tmp_path):
    """Gemma 3's embedding module scales the table inside its forward; the graph Gathers the table itself, so
    the scale is read against the table (it was read against the module's output: 1, and the logits were off)."""
    class ScaledEmbedding(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 3.0

    model = tiny()
    scaled = ScaledEmbedding(VOCAB, 64)
    scaled.weight = model.model.embed_tokens.weight  # still tied to the head
    model.model.embed_tokens = scaled
    figures = build_fused(model, tmp_path)
    assert figures["ops"]["Mul"] == 2 + 2 * LAYERS  # the scale, the rotary caches'; per block the SiLU and the gate
    assert_matches_torch(model, tmp_path)


@pytest.mark.parametrize("family", ["helium", "glm"])
def test_interleaved_rotary_is_found_by_the_logits(tmp_path, family):
    """Helium and GLM turn channel pairs (2i, 2i + 1), the Llama family the halves: the module tree looks the
    same (an inv_freq), so the graph with halves fails build_fused's check and the interleaved one is written
    (GLM: over half of each head, with its packed gate_up and q/k/v biases)."""
    from transformers import GlmConfig, GlmForCausalLM, HeliumConfig, HeliumForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
                  initializer_range=0.3, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    model = (HeliumForCausalLM(HeliumConfig(**common)) if family == "helium"
             else GlmForCausalLM(GlmConfig(**common))).eval()
    figures = build_fused(model, tmp_path)
    assert figures["rotary_interleaved"]
    assert_matches_torch(model, tmp_path)
    assert not build_fused(tiny(), tmp_path / "llama")["rotary_interleaved"]


@pytest.mark.parametrize("family,writer", [("starcoder2", "GPT-NeoX"), ("gpt_bigcode", "GPT-2")])
def test_more_layouts_by_structure(tmp_path, family, writer):
    """StarCoder 2 (LayerNorm, rotary, a plain MLP, sequential blocks, one KV head) and GPT-BigCode / StarCoder
    (GPT-2's block with multi-query attention) need nothing of their own: the writers read their layout."""
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM, Starcoder2Config, Starcoder2ForCausalLM

    torch.manual_seed(0)
    if family == "starcoder2":
        model = Starcoder2ForCausalLM(Starcoder2Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64, sliding_window=None, initializer_range=0.3,
            bos_token_id=None, eos_token_id=None))
    else:
        model = GPTBigCodeForCausalLM(GPTBigCodeConfig(vocab_size=VOCAB, n_embd=64, n_layer=LAYERS, n_head=4,
                                                       n_positions=64, multi_query=True, initializer_range=0.3,
                                                       bos_token_id=None, eos_token_id=None))
    figures = build_fused(model.eval(), tmp_path)
    assert figures.get("parallel_residual") is (False if writer == "GPT-NeoX" else None)
    edge = EdgeModel(tmp_path, threads=1)
    assert edge.inputs["past_key_values.0.key"].shape[1] == 1  # one KV head
    assert_logits_match(model, edge, prompt(batch=2, length=10))
    assert_generates_like_torch(model, tmp_path, prompt(length=10), 8)


@pytest.mark.parametrize("family,match", [
    ("phi-qk-norm", "q_layernorm normalizes queries / keys per head, which the GPT-NeoX writer does not write"),
    ("falcon-steeper-alibi", "the GPT-NeoX writer's graph gives logits .* away from torch's on FalconForCausalLM"),
], ids=["phi-qk-norm", "falcon-steeper-alibi"])
def test_what_a_writer_does_not_write_is_refused_not_written_wrong(tmp_path, family, match, monkeypatch):
    """These exported with wrong logits (max error 0.8-4.6): Phi's q / k LayerNorms sit inside the attention
    module (BioGPT's embedding module, which scales the table the graph Gathers, was the third: its scale is
    now read and written, test_biogpt_scaled_token_embeddings); an attention using its ALiBi bias
    in a way neither of the writer's readings takes (here: twice as steep) shows only in the logits. The last
    line of defence, build_fused's check of the logits, catches what no part shows, and leaves no graph."""
    from transformers.models.falcon import modeling_falcon

    forward = modeling_falcon.FalconAttention.forward

    def steeper(self, hidden_states, alibi, *args, **kwargs):
        return forward(self, hidden_states, None if alibi is None else 2 * alibi, *args, **kwargs)

    monkeypatch.setattr(modeling_falcon.FalconAttention, "forward", steeper)
    from transformers import FalconConfig, FalconForCausalLM, PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=64)
    model = {"phi-qk-norm": lambda: PhiForCausalLM(PhiConfig(**common, intermediate_size=128, qk_layernorm=True,
                                                                 partial_rotary_factor=0.5)),
             "falcon-steeper-alibi": lambda: FalconForCausalLM(FalconConfig(  # eager: alibi read in attention
                 **common, alibi=True, initializer_range=0.3, attn_implementation="eager"))}[family]().eval()
    with pytest.raises(UnsupportedModelError, match=match):
        build_fused(model, tmp_path)
    assert not (tmp_path / "model.onnx").exists() and not (tmp_path / "model.onnx.data").exists()


def test_a_model_whose_own_forward_fails_is_refused_naming_the_error(tmp_path):
    """CodeGen with 2 heads cannot run (its code splits q/k/v into 4 chunks of heads): the writers' probe run
    raised the model's RuntimeError; now a refusal naming it (export's graph: auto then tries optimum's)."""
    from transformers import CodeGenConfig, CodeGenForCausalLM

    model = CodeGenForCausalLM(CodeGenConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=2, rotary_dim=16)).eval()
    with pytest.raises(UnsupportedModelError, match=r"CodeGenForCausalLM fails on \d+ tokens before the writer "
                                                    r"could read it \(RuntimeError: shape"):
        build_fused(model, tmp_path)
    assert not (tmp_path / "model.onnx").exists()


def test_neox_rotary_over_a_width_ortgqa_cannot_rotate_is_refused(tmp_path):
    with pytest.raises(UnsupportedModelError, match="rotary embedding over 8 of 32 channels per head"):
        build_fused(tiny_neox(rotary_pct=0.25), tmp_path)
    assert not (tmp_path / "model.onnx").exists()


def test_parallel_residual_llama_block_is_written_as_one_sum(tmp_path, monkeypatch):
    """The module tree cannot tell a parallel residual (x + attn(norm(x)) + mlp(norm_2(x))) from Llama's; the
    probe run of block 0 can (it was refused; now the MLP reads the same sum, normed by its own norm)."""
    from transformers.models.llama import modeling_llama

    def parallel(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                 use_cache=False, cache_position=None, position_embeddings=None, **kwargs):
        a, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                              position_ids=position_ids, past_key_values=past_key_values,
                              cache_position=cache_position, position_embeddings=position_embeddings, **kwargs)
        return hidden_states + a + self.mlp(self.post_attention_layernorm(hidden_states))

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", parallel)
    model = tiny()
    randomize_norms(model, 1.0)
    figures = build_fused(model, tmp_path)
    assert figures["parallel_residual"] and figures["max_nodes_per_block"] == 12  # + the second norm, the Add
    assert_matches_torch(model, tmp_path)


def test_cohere_parallel_block_with_one_bias_free_layer_norm_and_logit_scale(tmp_path):
    """Cohere: attention and MLP read one LayerNorm without a bias (its own class, found by running it), the
    rotary embedding turns channel pairs, the logits are scaled by logit_scale (folded into the tied head's
    Mul); its optional q / k LayerNorms of each head's slice, with gains per head ([heads, head_dim]), are a
    LayerNormalization and a Mul each (they were refused)."""
    from transformers import CohereConfig, CohereForCausalLM

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3,
                  logit_scale=0.5, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = CohereForCausalLM(CohereConfig(**common)).eval()
    randomize_norms(model, 1.0)
    figures = build_fused(model, tmp_path / "cohere")
    assert figures["parallel_residual"] and figures["rotary_interleaved"] and figures["max_nodes_per_block"] == 11
    assert figures["ops"]["SkipLayerNormalization"] == LAYERS  # blocks 1.. and the final norm; block 0 plain
    assert_matches_torch(model, tmp_path / "cohere")
    torch.manual_seed(0)
    qk = CohereForCausalLM(CohereConfig(**common, use_qk_norm=True)).eval()
    randomize_norms(qk, 1.0)  # q / k gains other than ones, different per head
    figures = build_fused(qk, tmp_path / "qk")
    assert figures["max_nodes_per_block"] == 11 + 9  # Split; per q / k: Reshape, LayerNormalization, Mul, Reshape
    assert_matches_torch(qk, tmp_path / "qk")


@pytest.mark.parametrize("family", ["arcee", "nemotron"])
def test_plain_squared_relu_mlps_with_rms_norms_or_layernorm1p(tmp_path, family):
    """Arcee (AFM): RMSNorms and a plain up / down MLP with a squared ReLU: the plain MLP went to the GPT-NeoX
    writer, which takes LayerNorms only, and the activation was unknown; now the Llama writer takes plain MLPs. Nemotron
    / Minitron: LayerNorm1P (the gain stored less one) and the squared ReLU, partial rotary, in the GPT-NeoX
    writer. The squared ReLU is a Relu and a Mul by itself."""
    from transformers import ArceeConfig, ArceeForCausalLM, NemotronConfig, NemotronForCausalLM

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
                  initializer_range=0.3, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = (ArceeForCausalLM(ArceeConfig(**common)) if family == "arcee"
             else NemotronForCausalLM(NemotronConfig(**common, partial_rotary_factor=0.5))).eval()
    randomize_norms(model, 0.0 if family == "nemotron" else 1.0)  # LayerNorm1P's weight is its gain less one
    figures = build_fused(model, tmp_path)
    assert figures["ops"]["Relu"] == LAYERS and figures["ops"]["Mul"] >= LAYERS  # relu(x) * relu(x)
    assert figures["max_nodes_per_block"] <= 12
    assert_matches_torch(model, tmp_path)


def test_apertus_xielu_with_its_learned_parameters_per_layer(tmp_path):
    """Apertus: a plain MLP with xIELU, an activation with learned parameters per layer (alpha_p, alpha_n; beta,
    eps), q / k norms and RMSNorms. The activation was unknown (and the plain MLP went to the GPT-NeoX writer, which
    refused the q / k norms); now the Llama writer writes xIELU as its formula with each layer's values."""
    from transformers import ApertusConfig, ApertusForCausalLM

    torch.manual_seed(0)
    model = ApertusForCausalLM(ApertusConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=128, initializer_range=0.3, rope_scaling=None,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)).eval()
    randomize_norms(model, 1.0)
    with torch.no_grad():  # each layer's own activation parameters, away from their shared init
        for i, layer in enumerate(model.model.layers):
            layer.mlp.act_fn.alpha_p.fill_(0.2 + 0.3 * i)
            layer.mlp.act_fn.alpha_n.fill_(-0.5 + 0.4 * i)
    figures = build_fused(model, tmp_path)
    assert figures["ops"]["Where"] == LAYERS and figures["ops"]["Exp"] == LAYERS
    assert_matches_torch(model, tmp_path)


# ---------------------------------------------------------------------- post-norms, two rotaries, NoPE, caps
def randomize_norms(model, mean: float):
    """Norm weights away from their neutral value (Gemma's 0, others' 1), so that a missed norm would show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(mean, 0.3)


def gqa_attributes(path, key: str) -> list:
    nodes = onnx.load(str(path / "model.onnx"), load_external_data=False).graph.node
    return [next((onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == key), None)
            for n in nodes if n.op_type == "GroupQueryAttention"]


def test_gemma3_sandwich_norms_head_norms_and_local_rotary_in_sliding_layers(tmp_path):
    """Gemma 3: a norm before and after both attention and MLP, per-head q/k norms, a window of 4 on the
    sliding layers and their own rotary base (rope_local_base_freq): the local layers' GQA reads the second
    cos / sin cache, the global layer the first, and prompt + generated tokens (12 + 8) cross the window."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=24, max_position_embeddings=128,
        sliding_window=4, layer_types=["sliding_attention"] * 3 + ["full_attention"], rope_local_base_freq=100.0,
        rope_theta=10000.0, tie_word_embeddings=False,  # (tied, a random Gemma 3 repeats the last token)
        initializer_range=0.3, attn_implementation="eager", bos_token_id=None, eos_token_id=None,
        pad_token_id=None)).eval()
    randomize_norms(model, 0.0)
    figures = build_fused(model, tmp_path)
    assert figures["post_norms"] and figures["rotary_caches"] == 2 and figures["sliding_windows"] == [4]
    # input norm, QKV MatMul + Split, q / k norms (Reshape, norm, Reshape), GQA, o_proj, post-attention norm,
    # pre-MLP Skip norm, gate_up + Split, FastGelu, Mul, down, post-MLP norm
    assert figures["max_nodes_per_block"] == 19
    # per block q / k / post-attention / post-MLP norms and block 0's input norm; the others add the residual
    assert figures["ops"]["SimplifiedLayerNormalization"] == 4 * LAYERS + 1
    assert figures["ops"]["SkipSimplifiedLayerNormalization"] == 2 * LAYERS
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    cos = [n.input[7] for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert cos == ["/cos_sin_cache/Cos/output_0"] * 3 + ["/cos_sin_cache.1/Cos/output_0"]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    for name, base in (("cos_sin_cache", 100.0), ("cos_sin_cache.1", 10000.0)):  # the local base, then the global
        np.testing.assert_allclose(inits[f"{name}.inv_freq"], base ** -(np.arange(0, 16, 2) / 16), rtol=1e-6)
    assert gqa_attributes(tmp_path, "local_window_size") == [4, 4, 4, -1]
    assert gqa_attributes(tmp_path, "scale") == pytest.approx([24 ** -0.5] * LAYERS)
    ids = prompt(length=12)
    edge, plain = EdgeModel(tmp_path, threads=1), EdgeModel(tmp_path, threads=1, shared_cache=False)
    assert_logits_match(model, edge, ids)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert len(set(ref[0, 12:].tolist())) > 2
    np.testing.assert_array_equal(greedy(edge, ids.numpy(), 8), ref[:, 12:].numpy())
    np.testing.assert_array_equal(greedy(plain, ids.numpy(), 8), ref[:, 12:].numpy())


def test_gemma2_attention_and_final_logit_soft_capping(tmp_path):
    """Gemma 2 caps attention scores (GQA's softcap) and the logits (Div, Tanh, Mul after the head); caps small
    enough here that leaving either out changes the logits by more than 0.4."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=4,
        attn_logit_softcapping=0.5, final_logit_softcapping=3.0, initializer_range=0.15,
        attn_implementation="eager", bos_token_id=None, eos_token_id=None, pad_token_id=None)).eval()
    randomize_norms(model, 0.0)
    figures = build_fused(model, tmp_path)
    assert figures["softcap"] == 0.5 and gqa_attributes(tmp_path, "softcap") == [0.5] * LAYERS
    assert gqa_attributes(tmp_path, "local_window_size") == [4, -1, 4, -1]  # Gemma 2 alternates, sliding first
    assert figures["ops"]["Tanh"] == 1
    ids = prompt(length=12)
    edge = EdgeModel(tmp_path, threads=1)
    assert_logits_match(model, edge, ids)
    logits = edge.logits(ids.numpy())
    assert np.abs(logits).max() <= 3.0
    with torch.no_grad():  # (a random Gemma 2 repeats few tokens; the logits above are the finer comparison)
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    np.testing.assert_array_equal(greedy(edge, ids.numpy(), 8), ref[:, 12:].numpy())
    with torch.no_grad():  # each cap matters on this model (the attention's is read from the modules)
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        assert np.abs(model(ids, use_cache=False).logits.numpy() - logits).max() > 0.4
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = 0.5
        model.config.final_logit_softcapping = None
        assert np.abs(model(ids, use_cache=False).logits.numpy() - logits).max() > 0.4


def test_olmo2_post_norms_only_and_q_k_norms_over_all_heads(tmp_path):
    """OLMo 2 norms each sublayer's output, not its input (x + norm(attn(x)): an Add carries the residual), and
    its q / k norms span all heads' channels at once (no per-head Reshape)."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    torch.manual_seed(0)
    model = Olmo2ForCausalLM(Olmo2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3, bos_token_id=None,
        eos_token_id=None, pad_token_id=None)).eval()
    randomize_norms(model, 1.0)
    figures = build_fused(model, tmp_path)
    assert figures["post_norms"] and "Reshape" not in figures["ops"]
    assert "SkipSimplifiedLayerNormalization" not in figures["ops"] or figures["ops"][
        "SkipSimplifiedLayerNormalization"] == 1  # only the final norm adds the last block's output
    assert figures["ops"]["Add"] == 2 * LAYERS - 1  # the residual adds (block 0's attention reads the embedding)
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph
    assert {t.name for t in graph.initializer} <= {i for n in graph.node for i in n.input}  # none unused
    assert_matches_torch(model, tmp_path)


def test_olmo_weightless_layer_norms_with_their_epsilon_measured(tmp_path):
    """OLMo (1) norms with F.layer_norm and no weight, no bias and no eps attribute (1e-5 in its forward): the
    norms were not seen at all ("takes one final norm outside the blocks, found none"). They are written as
    LayerNormalization with ones and zeros, the epsilon measured from the module's output (here, and 1e-6 on a
    copy whose forward uses that)."""
    from transformers import OlmoConfig, OlmoForCausalLM

    from compress.fused.graph import _layer_norm_params

    torch.manual_seed(0)
    model = OlmoForCausalLM(OlmoConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=128, initializer_range=0.3, bos_token_id=None,
                                       eos_token_id=None, pad_token_id=None)).eval()
    weight, bias, eps = _layer_norm_params(model.model.norm)
    assert eps == 1e-5 and (weight == 1).all() and (bias == 0).all()

    class Eps6(nn.Module):  # with a weight and a bias, no eps attribute either
        def __init__(self):
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.randn(64)), nn.Parameter(torch.randn(64))

        def forward(self, x):
            return nn.functional.layer_norm(x, (64,), self.weight, self.bias, eps=1e-6)

    assert _layer_norm_params(Eps6())[2] == 1e-6

    class Eps12(Eps6):  # BERT's epsilon: far below the variance of the first probe row
        def forward(self, x):
            return nn.functional.layer_norm(x, (64,), self.weight, self.bias, eps=1e-12)

    assert _layer_norm_params(Eps12())[2] == 1e-12
    figures = build_fused(model, tmp_path)
    assert figures["ops"]["SkipLayerNormalization"] == 2 * LAYERS and figures["ops"]["LayerNormalization"] == 1
    assert_matches_torch(model, tmp_path)


def test_smollm3_layers_without_rotary(tmp_path):
    """SmolLM3 leaves the rotary embedding out of every 4th layer (no_rope_layers): that layer's GQA does not
    rotate (it was written rotating, and the logits were 7 away from torch's)."""
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    torch.manual_seed(0)
    model = SmolLM3ForCausalLM(SmolLM3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.15, bos_token_id=None,
        eos_token_id=None, pad_token_id=None)).eval()
    assert [layer.self_attn.use_rope for layer in model.model.layers] == [1, 1, 1, 0]
    figures = build_fused(model, tmp_path)
    assert figures["layers_without_rotary"] == [3] and gqa_attributes(tmp_path, "do_rotary") == [1, 1, 1, 0]
    assert_matches_torch(model, tmp_path)


def test_sandwich_norms_are_refused_by_the_writers_without_them(tmp_path):
    """Only the Llama writer writes a norm on a sublayer's output; the probe refuses it for the others."""
    from compress.architecture import find
    from compress.fused.graph import probe_block
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                           head_dim=16)).eval()
    probe = probe_block(model, find(model), post_norms=True)
    assert probe["pre"] == ("model.layers.0.input_layernorm", "model.layers.0.pre_feedforward_layernorm")
    assert probe["post"] == ("model.layers.0.post_attention_layernorm", "model.layers.0.post_feedforward_layernorm")
    with pytest.raises(UnsupportedModelError, match="post-norms or extra steps"):
        probe_block(model, find(model))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_granite_multipliers_are_folded(tmp_path, tied):
    """Granite scales the embeddings (a Mul), the attention scores (GQA's scale), each sublayer's output before
    the residual add (folded into o_proj and down_proj: no node) and the logits (1 / logits_scaling: folded
    into an untied head, a Mul after a tied one). The block was refused as 'extra steps'."""
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    model = GraniteForCausalLM(GraniteConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3, embedding_multiplier=4.0,
        residual_multiplier=0.22, attention_multiplier=0.125, logits_scaling=8.0, tie_word_embeddings=tied,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)).eval()
    figures = build_fused(model, tmp_path)
    assert figures["residual_scale"] == pytest.approx(0.22) and figures["max_nodes_per_block"] == 11
    assert gqa_attributes(tmp_path, "scale") == pytest.approx([0.125] * LAYERS)
    assert figures["ops"]["Mul"] == 2 * LAYERS + 2 + tied  # SiLU and gate per block; embedding, rotary; head
    assert_matches_torch(model, tmp_path)


def test_cohere2_global_layers_without_rotary_found_by_running_them(tmp_path):
    """Cohere 2 rotates only in its sliding layers (its attention module has no flag saying so): each
    attention is run again with a rotation by nothing, and the global layer, whose output does not change, is
    written without rotary. Prompt + generated tokens (12 + 8) cross the window of 4."""
    from transformers import Cohere2Config, Cohere2ForCausalLM

    torch.manual_seed(0)
    model = Cohere2ForCausalLM(Cohere2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=4, initializer_range=0.3,
        logit_scale=1.0, bos_token_id=None, eos_token_id=None, pad_token_id=None)).eval()
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [4, 4, 4, None]
    figures = build_fused(model, tmp_path)
    assert figures["layers_without_rotary"] == [3] and gqa_attributes(tmp_path, "do_rotary") == [1, 1, 1, 0]
    assert gqa_attributes(tmp_path, "local_window_size") == [4, 4, 4, -1]
    ids = prompt(length=12)
    edge = EdgeModel(tmp_path, threads=1)
    assert_logits_match(model, edge, ids)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    np.testing.assert_array_equal(greedy(edge, ids.numpy(), 8), ref[:, 12:].numpy())


def test_fp16_of_a_fused_graph_keeps_rotary_angles_in_fp32_tables(tmp_path):
    """The rotary angles (positions x inv_freq, computed in the graph) in fp16 drifted the logits by whole units past
    position 2,048 (fp16 holds integers exactly to 2048): the fp16 conversion stores the cos / sin tables
    computed in fp32 instead."""
    from compress.quant.ort import fp16

    model = tiny(max_position_embeddings=2304)
    build_llama(model, tmp_path / "fp32")
    info = fp16(tmp_path / "fp32", tmp_path / "fp16", exclude=[])
    assert info["rotary_tables"] == 2
    ops = {n.op_type for n in onnx.load(str(tmp_path / "fp16" / "model.onnx"), load_external_data=False).graph.node}
    assert not {"Cos", "Sin"} & ops
    ids = torch.randint(2, VOCAB, (1, 2200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits.numpy()[0]
    got = EdgeModel(tmp_path / "fp16", threads=1, verify=False).logits(ids.numpy())[0]
    assert np.abs(got - ref)[2048:].max() < 0.1  # fp16 rounding; the angles in fp16 gave whole units


def test_fp16_of_an_alibi_graph_computes_the_bias_in_fp32(tmp_path):
    """Falcon's ALiBi bias (slope x position, rounded to bfloat16, scaled) computed in fp16 moved the logits by
    tenths by position 2,000; kept in fp32 by blocking its nodes, the converter still rounded each of their
    outputs to fp16 and back (as far off with 12 heads, whose slopes are not powers of two). Now the nodes stay
    out of the conversion and the bias, relative to each query's position, is cast to fp16 once."""
    from transformers import FalconConfig, FalconForCausalLM

    from compress.quant.ort import fp16

    torch.manual_seed(0)
    model = FalconForCausalLM(FalconConfig(vocab_size=VOCAB, hidden_size=96, num_hidden_layers=2,
                                           num_attention_heads=12, alibi=True, initializer_range=0.1)).eval()
    build_fused(model, tmp_path / "fp32", max_length=2048)
    info = fp16(tmp_path / "fp32", tmp_path / "fp16", exclude=[])
    assert info["alibi_fp32_nodes"] == 15 and info["excluded_nodes"] == []
    graph = onnx.load(str(tmp_path / "fp16" / "model.onnx"), load_external_data=False).graph
    to_fp16 = [n.name for n in graph.node if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT16
               and "alibi" in n.name]
    assert to_fp16 == ["/model/alibi/Cast_fp16"]
    ids = torch.randint(2, VOCAB, (1, 2000), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits.numpy()[0]
    got = EdgeModel(tmp_path / "fp16", threads=1, verify=False).logits(ids.numpy())[0]
    assert np.abs(got - ref).max() < 0.02  # fp16 rounding elsewhere


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_half_precision_blocks_are_not_read_as_scaled(tmp_path, family):
    """Half-precision rounding moved the probe's least-squares residual scale off 1 by 1e-4: GPT-2 in fp16 was
    refused as 'not wired', a Llama got the made-up scale folded into its projections."""
    from compress.architecture import find
    from compress.fused.graph import probe_block

    model = (tiny_gpt2() if family == "gpt2" else tiny()).half()
    assert probe_block(model, find(model), post_norms=family == "llama")["residual_scale"] == 1.0


def test_exaone4_window_only_in_the_layers_config_layer_types_call_sliding(tmp_path):
    """EXAONE 4 gives every attention module the window and slides only in its sliding layers (layer_types);
    its global layers also skip the rotary embedding, and it norms each sublayer's output (post-norms) and
    each query / key head. The window was written into the global layer too."""
    from transformers import Exaone4Config, Exaone4ForCausalLM

    torch.manual_seed(0)
    model = Exaone4ForCausalLM(Exaone4Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=4, sliding_window_pattern=4,
        initializer_range=0.3, bos_token_id=None, eos_token_id=None, pad_token_id=None)).eval()
    assert model.config.layer_types == ["sliding_attention"] * 3 + ["full_attention"]
    assert all(layer.self_attn.sliding_window == 4 for layer in model.model.layers)
    figures = build_fused(model, tmp_path)
    assert gqa_attributes(tmp_path, "local_window_size") == [4, 4, 4, -1]
    assert figures["layers_without_rotary"] == [3] and figures["post_norms"]
    ids = prompt(length=12)
    edge = EdgeModel(tmp_path, threads=1)
    assert_logits_match(model, edge, ids)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    np.testing.assert_array_equal(greedy(edge, ids.numpy(), 8), ref[:, 12:].numpy())


def tiny_moe(family: str, vocab: int = VOCAB):
    """Mixtures of SwiGLU experts: Mixtral (renormalized top 2 of 4), Qwen2-MoE (a shared expert with its sigmoid
    gate; block 1 dense), OLMoE (q / k norms, top-k weights not renormalized), Qwen3-MoE (per-head q / k norms),
    Granite-MoE (the experts' weights in two [experts, out, in] tensors; softmax over the top-k logits; Granite's
    multipliers), gpt-oss (see _gpt_oss)."""
    import transformers as T

    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, max_position_embeddings=128, initializer_range=0.3, bos_token_id=None,
                  eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    return {"mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(**common, intermediate_size=32,
                                                                     num_local_experts=4)),
            "qwen2_moe": lambda: T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(
                **common, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                num_experts=4, mlp_only_layers=[1])),
            "olmoe": lambda: T.OlmoeForCausalLM(T.OlmoeConfig(**common, intermediate_size=32, num_experts=4)),
            "qwen3_moe": lambda: T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(
                **common, intermediate_size=64, moe_intermediate_size=32, num_experts=4, head_dim=16,
                norm_topk_prob=True)),
            "granite_moe": lambda: T.GraniteMoeForCausalLM(T.GraniteMoeConfig(
                **common, intermediate_size=32, num_local_experts=4, embedding_multiplier=12.0,
                residual_multiplier=0.22, attention_multiplier=0.125, logits_scaling=8.0)),
            "gpt_oss": lambda: _gpt_oss(T, common)}[family]().eval()


def _gpt_oss(T, common):
    """gpt-oss: experts as [experts, in, out] tensors with biases and a clamped SwiGLU, a router with a bias,
    attention sinks (a logit per head), every other layer sliding; biases and sinks drawn away from their zero init."""
    model = T.GptOssForCausalLM(T.GptOssConfig(**common, intermediate_size=32, num_local_experts=4, head_dim=16,
                                               sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                                               rope_scaling=None))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("sinks", "bias")):
                p.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe", "qwen3_moe", "granite_moe", "gpt_oss"])
def test_mixtures_of_experts_as_onnx_runtime_moe(tmp_path, family):
    """A mixture of experts is one MoE node (softmax routing, top-k, SwiGLU experts with gate and up rows
    interleaved) after the router's MatMul, plus Qwen2-MoE's gated shared expert; optimum cannot export these
    (Mixtral: 'unsupported architecture'), and the fused writers refused them."""
    torch.set_num_threads(1)
    model = tiny_moe(family)
    figures = build_fused(model, tmp_path)
    assert figures["ops"]["MoE"] == (1 if family == "qwen2_moe" else 2)  # of 2 blocks
    edge = EdgeModel(tmp_path, threads=1)
    assert_logits_match(model, edge, prompt(batch=2, length=10))
    if family == "mixtral":
        assert_generates_like_torch(model, tmp_path, prompt(length=10), 8)


@pytest.mark.parametrize("bits,family", [(8, "mixtral"), (4, "mixtral"), (4, "gpt_oss")])
def test_experts_as_qmoe_compute_with_their_rounded_weights(tmp_path, bits, family):
    """quantize's weight-only path turns each MoE node into QMoE: the experts symmetric int8 per row or int4 in
    blocks of 32, in the layouts ONNX Runtime's CPU kernel reads. Its logits equal those of the float MoE graph
    holding the same rounded weights, so the codes, scales and nibble order are what the kernel expects; gpt-oss's
    expert biases and clamped SwiGLU are kept (its biases were dropped)."""
    from compress.onnx_tools import ONNX_FILE
    from compress.quant.ort import _symmetric_codes, quantize_experts

    model = tiny_moe(family)
    build_fused(model, tmp_path / "float")
    proto = onnx.load(str(tmp_path / "float" / ONNX_FILE))
    rounded = onnx.load(str(tmp_path / "float" / ONNX_FILE))
    inits = {t.name: t for t in rounded.graph.initializer}
    for node in [n for n in rounded.graph.node if n.op_type == "MoE"]:
        for name in (node.input[2], node.input[4]):
            w = onnx.numpy_helper.to_array(inits[name])
            codes, scales = _symmetric_codes(w, bits, 32 if bits == 4 else None)
            if bits == 4:
                codes = np.stack([codes & 15, codes >> 4], -1).reshape(w.shape)
                scales = np.repeat(scales, 32, -1)
            else:
                scales = scales[..., None]
            inits[name].CopyFrom(onnx.numpy_helper.from_array(
                ((codes.astype(np.float32) - 2 ** (bits - 1)) * scales).astype(np.float32), name))
    assert quantize_experts(proto, bits, 32, []) == ["/model/layers.0/mlp/MoE", "/model/layers.1/mlp/MoE"]
    assert {n.op_type for n in proto.graph.node} >= {"QMoE"} and "MoE" not in {n.op_type for n in proto.graph.node}
    for folder, m in (("qmoe", proto), ("rounded", rounded)):
        (tmp_path / folder).mkdir()
        onnx.save(m, str(tmp_path / folder / ONNX_FILE), save_as_external_data=False)
        for f in (tmp_path / "float").iterdir():
            if f.suffix == ".json":
                (tmp_path / folder / f.name).write_bytes(f.read_bytes())
    ids = prompt(batch=2, length=10).numpy()
    got = EdgeModel(tmp_path / "qmoe", threads=1, verify=False).logits(ids)
    want = EdgeModel(tmp_path / "rounded", threads=1, verify=False).logits(ids)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    with torch.no_grad():  # and the rounding moved them: the test compares quantized weights, not float ones
        assert np.abs(got - model(torch.from_numpy(ids), use_cache=False).logits.numpy()).max() > 1e-3


def test_a_mixture_of_experts_through_export_and_int8(tmp_path):
    """export's graph: auto takes Mixtral fused (optimum's exporter does not know it); the int8 pass writes its
    experts as QMoE beside the MatMulNBits projections and its discrepancy check passes."""
    import compress
    from benchmarks.harness import onnx_params
    from family_cases import context, run_pass

    from compress.checkpoint import Artifact
    from compress.models import count_parameters
    from tiny_models import VOCAB as TOKENIZER_VOCAB, family_tokenizer

    model = tiny_moe("mixtral", TOKENIZER_VOCAB)
    art = Artifact(kind="torch", task="causal-lm", tokenizer=family_tokenizer("llama"), model=model)
    ctx = context("causal-lm", tmp_path / "scratch")
    out = run_pass("export", art, ctx)
    assert out.info["graph"] == "fused"
    path = compress.save(out, tmp_path / "onnx")
    assert onnx_params(path) == count_parameters(model)
    q = run_pass("int8", compress.load(path), ctx)
    assert q.info["discrepancy"]["passed"] and len(q.info["quantized_experts"]) == 2
    graph = onnx.load(str(compress.save(q, tmp_path / "int8") / "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "QMoE" for n in graph.node) == 2 and not any(n.op_type == "MoE" for n in graph.node)
    from compress.passes import get

    kept = get("quantize")(method="ort-int8-dynamic", exclude=["*/mlp/MoE"]).run(compress.load(path), ctx)
    graph = onnx.load(str(compress.save(kept, tmp_path / "int8-float-experts") / "model.onnx"),
                      load_external_data=False).graph
    assert sum(n.op_type == "MoE" for n in graph.node) == 2 and "quantized_experts" not in kept.info
