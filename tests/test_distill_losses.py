"""Unit tests of the distillation losses and student construction (tiny models, seconds)."""
import math

import pytest
import torch
import torch.nn.functional as F

from compress.distill import losses
from compress.distill.students import get_layers, keep_layers, resolve_keep
from compress.errors import ConfigError


def test_kl_zero_when_student_equals_teacher_and_positive_otherwise():
    torch.manual_seed(0)
    z = torch.randn(3, 5, 11)
    for kind in losses.KD_LOSSES:
        same = losses.soft_loss(z, losses.teacher_log_probs(z, 2.0), 2.0, kind)
        assert abs(float(same)) < 1e-6, kind
        other = losses.soft_loss(z + torch.randn_like(z), losses.teacher_log_probs(z, 2.0), 2.0, kind)
        assert float(other) > 1e-3, kind


def test_kl_matches_definition_and_t_squared_scaling():
    torch.manual_seed(1)
    s, t = torch.randn(4, 7), torch.randn(4, 7)
    for T in (1.0, 2.0, 4.0):
        p = F.softmax(t / T, -1)
        q = F.softmax(s / T, -1)
        kl = (p * (p.log() - q.log())).sum(-1).mean()
        got = losses.soft_loss(s, losses.teacher_log_probs(t, T), T, "kl")
        assert torch.allclose(got, T**2 * kl, atol=1e-5)
    # the T^2 factor: the loss divided by T^2 is the plain divergence
    d4 = losses.soft_loss(s, losses.teacher_log_probs(t, 4.0), 4.0) / 16
    assert torch.allclose(d4, F.kl_div(F.log_softmax(s / 4, -1), F.log_softmax(t / 4, -1), log_target=True,
                                       reduction="batchmean"), atol=1e-6)


def test_mask_excludes_padding_rows():
    torch.manual_seed(2)
    s, t = torch.randn(2, 6, 9), torch.randn(2, 6, 9)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    s2 = s.clone()
    s2[0, 3:] += 100.0  # garbage where masked must not change the loss
    a = losses.soft_loss(s, losses.teacher_log_probs(t, 2.0), 2.0, mask=mask)
    b = losses.soft_loss(s2, losses.teacher_log_probs(t, 2.0), 2.0, mask=mask)
    assert torch.allclose(a, b)
    labels = torch.randint(0, 9, (2, 6))
    assert torch.allclose(losses.hard_loss(s, labels, mask), losses.hard_loss(s2, labels, mask))
    ce = F.cross_entropy(s.reshape(-1, 9), labels.reshape(-1))
    assert torch.allclose(losses.hard_loss(s, labels), ce)


def _tail(z: torch.Tensor, top_indices: torch.Tensor, temperature: float) -> torch.Tensor:
    """log sum exp(z_j / T) over the tokens outside the top k, computed from the full logits."""
    return torch.logsumexp(z.scatter(-1, top_indices, float("-inf")) / temperature, dim=-1)


def test_topk_loss_is_the_divergence_over_top_k_plus_a_rest_bucket_and_multi_teacher_average():
    torch.manual_seed(3)
    z = torch.randn(2, 4, 50)
    top = z.topk(8, dim=-1)
    assert abs(float(losses.topk_soft_loss(z, top.values.half(), top.indices.int(), _tail(z, top.indices, 2.0),
                                           2.0))) < 1e-3
    student = torch.randn_like(z, requires_grad=True)
    tail = torch.ones_like(z, dtype=torch.bool).scatter(-1, top.indices, False)
    for kind in ("kl", "reverse-kl", "jsd"):
        loss = losses.topk_soft_loss(student, top.values, top.indices, _tail(z, top.indices, 2.0), 2.0, kind)
        # the divergence of the two full distributions folded onto k + 1 outcomes, computed directly
        def folded(logits):
            p = F.softmax(logits / 2.0, -1)
            top_p = p.gather(-1, top.indices)
            return torch.cat([top_p, 1 - top_p.sum(-1, keepdim=True)], -1).log()
        expect = 4.0 * losses.divergence(folded(z), folded(student.detach()), kind).mean()
        assert torch.isclose(loss, expect, rtol=1e-4), kind
        # the student's mass outside the teacher's top k is matched as a whole: raising every tail logit
        # changes the loss, moving mass within the tail (its total kept) does not
        (grad,) = torch.autograd.grad(loss, student)
        assert grad[tail].abs().max() > 0
        up = student.detach() + 5.0 * tail
        assert float(losses.topk_soft_loss(up, top.values, top.indices, _tail(z, top.indices, 2.0), 2.0, kind)) \
            > float(loss.detach()) + 0.1
        shuffled = student.detach().clone()
        for row in range(2):
            for pos in range(4):
                idx = tail[row, pos].nonzero().squeeze(-1)
                shuffled[row, pos, idx] = student.detach()[row, pos, idx[torch.randperm(len(idx))]]
        assert torch.isclose(losses.topk_soft_loss(shuffled, top.values, top.indices, _tail(z, top.indices, 2.0),
                                                   2.0, kind), loss, rtol=1e-5)
    # k = vocabulary (a classifier's classes): no rest bucket, the plain soft loss
    everything = z.topk(50, dim=-1)
    assert torch.isclose(losses.topk_soft_loss(student.detach(), everything.values, everything.indices, None, 2.0),
                         losses.soft_loss(student.detach(), losses.teacher_log_probs(z, 2.0), 2.0), rtol=1e-5)
    a, b = torch.randn(3, 10), torch.randn(3, 10)
    avg = losses.teacher_log_probs([a, b], 2.0, [3.0, 1.0]).exp()
    expect = 0.75 * F.softmax(a / 2, -1) + 0.25 * F.softmax(b / 2, -1)
    assert torch.allclose(avg, expect, atol=1e-6)
    assert torch.allclose(losses.teacher_log_probs([a, a], 2.0), losses.teacher_log_probs(a, 2.0), atol=1e-6)


def test_layer_map_and_temperature_schedule():
    assert losses.default_layer_map(3, 6) == {0: 1, 1: 3, 2: 5}
    assert losses.default_layer_map(15, 30)[14] == 29
    assert losses.temperature_at(0, 11, 4.0, 1.0, "linear") == 4.0
    assert losses.temperature_at(10, 11, 4.0, 1.0, "linear") == 1.0
    assert math.isclose(losses.temperature_at(5, 11, 4.0, 1.0, "linear"), 2.5)
    assert losses.temperature_at(5, 11, 4.0, 1.0, "constant") == 4.0
    assert float(losses.attention_loss(torch.full((1, 2, 3, 3), 1 / 3), torch.full((1, 2, 3, 3), 1 / 3))) == 0.0


def test_resolve_keep():
    assert resolve_keep("every_other", 6) == [0, 2, 4]
    assert resolve_keep(3, 7) == [0, 3, 6]
    assert resolve_keep(15, 30)[-1] == 29 and len(resolve_keep(15, 30)) == 15
    assert resolve_keep([0, -1], 4) == [0, 3]
    for bad in (0, 9, [0, 0], [5], "all"):
        with pytest.raises(ConfigError):
            resolve_keep(bad, 4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_keep_layers_copies_the_chosen_blocks(family, tmp_path):
    from tiny_models import tiny_bert, tiny_gpt2, tiny_llama
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    teacher = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}[family]()
    keep = [0, 3]
    student = keep_layers(teacher, keep)
    t_layers, s_layers = get_layers(teacher), get_layers(student)
    assert len(s_layers) == 2 and len(t_layers) == 4 and student.config.num_hidden_layers == 2
    for new, old in enumerate(keep):
        t_state, s_state = t_layers[old].state_dict(), s_layers[new].state_dict()
        assert t_state.keys() == s_state.keys()
        for k in t_state:
            assert torch.equal(t_state[k], s_state[k]), (family, k)
            assert s_state[k].data_ptr() != t_state[k].data_ptr()  # a copy, not shared storage
        for m in s_layers[new].modules():
            if hasattr(m, "layer_idx"):
                assert m.layer_idx == new
    # a stock config: plain from_pretrained reloads exactly the same model
    student.save_pretrained(tmp_path)
    loader = AutoModelForSequenceClassification if family == "bert" else AutoModelForCausalLM
    reloaded = loader.from_pretrained(tmp_path).eval()
    ids = torch.randint(5, 300, (2, 12))
    with torch.no_grad():
        assert torch.allclose(student.eval()(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-5)
        if family != "bert":  # the KV cache indexes layers by layer_idx: generation must match a no-cache run
            g1 = student.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
            g2 = student.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
            assert torch.equal(g1, g2)


def test_the_cached_tail_is_exact_at_its_temperatures_and_close_between():
    from compress.distill.teacher_cache import TAIL_BETAS, compute_topk, tail_at

    torch.manual_seed(0)
    z = 3 * torch.randn(3, 5, 200)
    values, indices, tail, vocab = compute_topk(lambda b: b, [z[:2], z[2:]], 16)
    assert values.shape == (3, 5, 16) and tail.shape == (3, 5, len(TAIL_BETAS)) and vocab == 200
    tail = torch.from_numpy(tail)
    for T in (0.5, 1.0, 1.5, 2.0, 3.0, 8.0):  # stored
        assert torch.allclose(tail_at(tail, T, 200 - 16), _tail(z, torch.from_numpy(indices).long(), T), atol=1e-5)
    for T in (1.2, 2.5, 5.0, 20.0):  # interpolated in 1/T (towards log(184) at T -> infinity)
        exact = _tail(z, torch.from_numpy(indices).long(), T)
        assert (tail_at(tail, T, 200 - 16) - exact).abs().max() < 0.05


def test_per_layer_config_lists_follow_kept_and_fresh_layers(tmp_path):
    """SmolLM3's no_rope_layers and Gemma 3's layer_types say what each layer is: a student keeping layers
    [0, 1, 3] keeps their entries (it kept the list, so layer 3's NoPE attention reloaded rotating), and a
    fresh student of another depth gets a list of its own length."""
    from tiny_models import tiny_family
    from transformers import AutoModelForCausalLM

    from compress.distill.students import fresh_student

    teacher = tiny_family("smollm3")
    assert teacher.config.no_rope_layers == [1, 1, 1, 0]
    student = keep_layers(teacher, [0, 1, 3])
    assert student.config.no_rope_layers == [1, 1, 0]
    student.save_pretrained(tmp_path / "kept")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "kept").eval()
    assert [layer.self_attn.use_rope for layer in reloaded.model.layers] == [1, 1, 0]
    ids = torch.randint(5, 300, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, student.eval()(input_ids=ids).logits)
    gemma3 = tiny_family("gemma3")
    assert keep_layers(gemma3, [1, 2]).config.layer_types == ["sliding_attention", "full_attention"]
    for model, field in ((teacher, "no_rope_layers"), (gemma3, "layer_types")):
        fresh = fresh_student(model, {"num_hidden_layers": 6}, "causal-lm")
        assert len(getattr(fresh.config, field)) == 6 and len(get_layers(fresh)) == 6


def test_layers_whose_kind_follows_their_position_are_refused_where_the_config_cannot_rebuild_them(tmp_path):
    """ModernBERT fixes each layer's attention (global every n-th layer, else a local window) by its index when
    it is built: keeping layers [0, 1, 3] of 4 (global every 2nd) moves local layer 3 to position 2, which
    from_pretrained builds global (the student reloaded with other outputs). Refused, naming the setting;
    [0, 1] keeps every layer's kind and reloads equal."""
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    from compress.errors import UnsupportedModelError

    torch.manual_seed(0)
    teacher = ModernBertForSequenceClassification(ModernBertConfig(
        vocab_size=384, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=4,
        global_attn_every_n_layers=2, local_attention=4, num_labels=3, pad_token_id=0)).eval()
    with pytest.raises(UnsupportedModelError, match=r"layer 3 moved to position 2 would be built with "
                                                    r"attn\.local_attention = \(-1, -1\), not \(2, 2\)"):
        keep_layers(teacher, [0, 1, 3])
    assert len(teacher.model.layers) == 4  # refused before anything changed
    student = keep_layers(teacher, [0, 1])
    student.save_pretrained(tmp_path / "kept")
    reloaded = ModernBertForSequenceClassification.from_pretrained(tmp_path / "kept").eval()
    ids = torch.randint(5, 300, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, student.eval()(input_ids=ids).logits)


def test_layer_index_under_another_name_is_renumbered_and_other_modules_by_index_refused(tmp_path):
    """GPT-NeoX-Japanese keeps its index as layer_number: found as an index (layer i holds i, position j gets
    j), renumbered, not read as a change of kind (such cuts were refused); its last layer alone has an
    attention bias, so dropping the last layer is refused. Qwen2-MoE builds a dense MLP or
    experts by index (mlp_only_layers): a kept layer whose module would change is refused by name (a KeyError
    escaped)."""
    from transformers import (AutoModelForCausalLM, GPTNeoXJapaneseConfig, GPTNeoXJapaneseForCausalLM,
                              Qwen2MoeConfig, Qwen2MoeForCausalLM)

    from compress.errors import UnsupportedModelError

    torch.manual_seed(0)
    teacher = GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig(
        vocab_size=384, hidden_size=32, intermediate_multiple_size=2, num_attention_heads=4,
        num_hidden_layers=4)).eval()
    student = keep_layers(teacher, [0, 2, 3])
    assert [layer.layer_number for layer in student.gpt_neox_japanese.layers] == [0, 1, 2]
    with pytest.raises(UnsupportedModelError, match=r"layer 2 at position 2 would be built with attention "
                                                    r"holding parameters \['dense_bias'\], not \[\]"):
        keep_layers(teacher, [0, 1, 2])  # its last layer's attention alone has a bias
    student.save_pretrained(tmp_path / "kept")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "kept").eval()
    ids = torch.randint(5, 300, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, student.eval()(input_ids=ids).logits)
    moe = Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=384, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
        num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0])).eval()
    with pytest.raises(UnsupportedModelError, match=r"layer 1 moved to position 0 would be built with mlp a "
                                                    r"Qwen2MoeMLP, not Qwen2MoeSparseMoeBlock"):
        keep_layers(moe, [1, 2, 3])


def test_gpt_neo_kept_layers_keep_their_local_or_global_kind(tmp_path):
    """GPT-Neo expands attention_types into one kind per layer and checks the count on load: keeping layers
    [0, 2] of [global, local, global, local] left 4 kinds for 2 layers (the checkpoint did not load). Now the
    kept layers' kinds are written back as attention_types, and a config that would not load is refused."""
    from transformers import AutoModelForCausalLM, GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(0)
    teacher = GPTNeoForCausalLM(GPTNeoConfig(vocab_size=384, hidden_size=32, num_layers=4, num_heads=4,
                                             attention_types=[[["global", "local"], 2]], window_size=4,
                                             max_position_embeddings=64)).eval()
    student = keep_layers(teacher, [0, 2])
    assert student.config.attention_types == [[["global"], 1], [["global"], 1]]
    student.save_pretrained(tmp_path / "kept")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "kept").eval()
    ids = torch.randint(5, 300, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, student.eval()(input_ids=ids).logits)


def test_a_models_digest_takes_zero_dimensional_tensors_of_any_width():
    """Apertus keeps bf16 scalars (its xIELU's beta and eps): the teacher's fingerprint viewed each tensor as bytes,
    which a 0-d tensor of another width cannot be (RuntimeError: distill failed on any such teacher)."""
    from compress.distill.teacher_cache import tensor_digest

    half = torch.tensor(0.5, dtype=torch.bfloat16)
    assert tensor_digest(half) == tensor_digest(half.clone())
    assert tensor_digest(half) != tensor_digest(torch.tensor(0.25, dtype=torch.bfloat16))
    assert tensor_digest(half) != tensor_digest(half.reshape(1))  # the shape is part of it


def test_the_default_layer_map_of_a_student_deeper_than_its_teacher_stays_in_range():
    """round((i + 1) * L_t / L_s) - 1 gave teacher layer -1 to a deeper student's first layers, and the run stopped
    on a layer_map the user never wrote."""
    deeper = losses.default_layer_map(8, 4)
    assert min(deeper.values()) == 0 and deeper[7] == 3 and list(deeper.values()) == sorted(deeper.values())
    assert losses.default_layer_map(3, 1) == {0: 0, 1: 0, 2: 0}
    assert losses.default_layer_map(2, 4) == {0: 1, 1: 3}  # a shallower student: as before


def test_a_students_key_value_heads_that_do_not_divide_its_heads_are_refused():
    """A student.config num_key_value_heads of 3 with 4 heads was silently replaced by 4; the fallback to plain
    multi-head attention stays for a head count the inherited grouping no longer divides."""
    from tiny_models import tiny_llama

    from compress.distill.students import fresh_student

    with pytest.raises(ConfigError, match=r"distill.student.config.num_key_value_heads: 3 does not divide "
                                          r"num_attention_heads 4"):
        fresh_student(tiny_llama(), {"num_key_value_heads": 3}, "causal-lm")
    # 3 heads: the inherited 2 KV heads no longer divide them, and the user set none: plain multi-head attention
    student = fresh_student(tiny_llama(), {"num_attention_heads": 3, "hidden_size": 48}, "causal-lm")
    assert student.config.num_key_value_heads == 3


def test_every_teacher_of_an_embedding_student_counts_with_its_weight():
    """Multi-teacher distillation of a feature-extraction model took its target from the first teacher only;
    now it is the teachers' pooled embeddings averaged with their normalized weights."""
    from types import SimpleNamespace

    from compress.distill.objective import teacher_embedding

    mask = torch.tensor([[1, 1, 0]])
    outs = [SimpleNamespace(last_hidden_state=torch.full((1, 3, 2), v)) for v in (1.0, 3.0)]
    teachers = [SimpleNamespace(weight=1.0), SimpleNamespace(weight=3.0)]
    torch.testing.assert_close(teacher_embedding(teachers, outs, mask), torch.full((1, 2), 2.5))
    torch.testing.assert_close(teacher_embedding(teachers[:1], outs[:1], mask), torch.full((1, 2), 1.0))
