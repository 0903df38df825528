"""Tiny real-architecture models and a real (small) tokenizer, built in seconds for logic tests.

The tokenizer is a byte-level BPE trained on a slice of the packaged Shakespeare text; the models are
Llama (GQA), GPT-2 and BERT with a few dimensions, saved with save_pretrained like any user model."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

VOCAB = 384


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from compress.data import DataSpec, load_dataset

    text = load_dataset(DataSpec(source="builtin:shakespeare", split="train", max_examples=2)).texts
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<eos>", "<unk>", "[CLS]", "[SEP]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([t[:200_000] for t in text], trainer)
    return tok.to_str()


def tiny_tokenizer(kind: str = "causal"):
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_tokenizer_json())
    if kind == "encoder":  # BERT-style [CLS] ... [SEP]
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 3), ("[SEP]", 4)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                       cls_token="[CLS]", sep_token="[SEP]", eos_token="<eos>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_llama(num_kv_heads: int = 2, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=256,
               tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_gpt2(**overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=256, pad_token_id=0,
               eos_token_id=1, bos_token_id=1)
    cfg.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


def tiny_bert(task: str = "sequence-classification", num_labels: int = 5, **overrides):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
               num_attention_heads=4, max_position_embeddings=256, pad_token_id=0, num_labels=num_labels)
    cfg.update(overrides)
    cls = BertForSequenceClassification if task == "sequence-classification" else BertModel
    return cls(BertConfig(**cfg)).eval()


def save_tiny(model, path: Path, tokenizer_kind: str | None = None) -> Path:
    """save_pretrained a tiny model with its tokenizer, like a user's local model folder."""
    kind = tokenizer_kind or ("encoder" if model.config.model_type == "bert" else "causal")
    model.save_pretrained(path)
    tiny_tokenizer(kind).save_pretrained(path)
    return Path(path)


# DeBERTa-v3's attention: relative positions in buckets, content-to-position and back, q / k projections shared
DEBERTA_V3 = dict(relative_attention=True, pos_att_type=["p2c", "c2p"], share_att_key=True, position_buckets=16,
                  max_relative_positions=-1, norm_rel_ebd="layer_norm", position_biased_input=False)


# ---------------------------------------------------------------------- every family the suite maps
def _family_specs() -> dict:
    """name -> (config class, {task: model class}, config kwargs): tiny sizes, 4 layers, 4 heads."""
    import transformers as T

    common = dict(vocab_size=VOCAB, num_hidden_layers=4, max_position_embeddings=256, pad_token_id=0)
    dec = dict(common, hidden_size=32, intermediate_size=64, num_attention_heads=4, bos_token_id=1, eos_token_id=1)
    lm = "causal-lm"
    return {
        "llama": (T.LlamaConfig, {lm: T.LlamaForCausalLM}, dict(dec, num_key_value_heads=2, tie_word_embeddings=True)),
        # SmolLM2's shape: Llama, tied, 3:1 GQA, explicit head_dim
        "smollm2": (T.LlamaConfig, {lm: T.LlamaForCausalLM},
                    dict(dec, hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                         tie_word_embeddings=True)),
        "qwen2": (T.Qwen2Config, {lm: T.Qwen2ForCausalLM}, dict(dec, num_key_value_heads=2, tie_word_embeddings=False)),
        "qwen3": (T.Qwen3Config, {lm: T.Qwen3ForCausalLM}, dict(dec, num_key_value_heads=2, head_dim=16,
                                                                  tie_word_embeddings=True)),
        "mistral": (T.MistralConfig, {lm: T.MistralForCausalLM}, dict(dec, num_key_value_heads=2, sliding_window=None)),
        "gemma": (T.GemmaConfig, {lm: T.GemmaForCausalLM}, dict(dec, num_key_value_heads=1, head_dim=8)),
        "phi3": (T.Phi3Config, {lm: T.Phi3ForCausalLM}, dict(dec, num_key_value_heads=2, tie_word_embeddings=False)),
        # Gemma 3: a norm before and after attention and MLP, per-head q/k norms, sliding layers with their own
        # rotary base; head_dim 16 (the fused graph)
        "gemma3": (T.Gemma3TextConfig, {lm: T.Gemma3ForCausalLM},
                   dict(dec, num_key_value_heads=2, head_dim=16, sliding_window=4, rope_local_base_freq=100.0,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"])),
        # SmolLM3: no rotary embedding in every 4th layer (no_rope_layers); head_dim 16 (the fused graph)
        "smollm3": (T.SmolLM3Config, {lm: T.SmolLM3ForCausalLM},
                    dict(dec, hidden_size=64, num_key_value_heads=2, tie_word_embeddings=True)),
        "gpt_neox": (T.GPTNeoXConfig, {lm: T.GPTNeoXForCausalLM}, dict(dec, use_parallel_residual=True)),
        # Pythia's layout with heads GroupQueryAttention can rotate (32 wide, rotary over 16): the fused graph
        "pythia": (T.GPTNeoXConfig, {lm: T.GPTNeoXForCausalLM},
                   dict(dec, hidden_size=64, num_attention_heads=2, rotary_pct=0.5)),
        # Phi-1.5 / 2: parallel blocks with one LayerNorm, separate biased q / k / v, partial rotary
        "phi": (T.PhiConfig, {lm: T.PhiForCausalLM},
                dict(dec, hidden_size=64, num_attention_heads=2, partial_rotary_factor=0.5)),
        # Llama with multipliers (embedding, residual, attention, logits); head_dim 16 (the fused graph)
        "granite": (T.GraniteConfig, {lm: T.GraniteForCausalLM},
                    dict(dec, hidden_size=64, num_key_value_heads=2, embedding_multiplier=12.0,
                         residual_multiplier=0.22, attention_multiplier=0.125, logits_scaling=8.0,
                         tie_word_embeddings=True)),
        # OPT: GPT-2's block with separate q/k/v, fc1 / fc2 in the block itself, positions offset by 2, ReLU
        "opt": (T.OPTConfig, {lm: T.OPTForCausalLM},
                dict(common, hidden_size=32, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32,
                     bos_token_id=1, eos_token_id=1)),
        "gpt2": (T.GPT2Config, {lm: T.GPT2LMHeadModel},
                 dict(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=256, pad_token_id=0,
                      eos_token_id=1, bos_token_id=1)),
        "bert": (T.BertConfig, {"sequence-classification": T.BertForSequenceClassification,
                                "feature-extraction": T.BertModel},
                 dict(common, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_labels=5)),
        "roberta": (T.RobertaConfig, {"sequence-classification": T.RobertaForSequenceClassification,
                                      "feature-extraction": T.RobertaModel},
                    dict(common, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_labels=5,
                         max_position_embeddings=260, pad_token_id=0)),
        "distilbert": (T.DistilBertConfig, {"sequence-classification": T.DistilBertForSequenceClassification,
                                            "feature-extraction": T.DistilBertModel},
                       dict(vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=4, n_heads=4,
                            max_position_embeddings=256, pad_token_id=0, num_labels=5)),
        # outside the matrix: one family per variant a pass now takes or refuses by name (tests/test_families.py)
        "stablelm": (T.StableLmConfig, {lm: T.StableLmForCausalLM}, dict(dec, num_key_value_heads=4)),
        "olmo": (T.OlmoConfig, {lm: T.OlmoForCausalLM}, dict(dec, num_key_value_heads=4)),  # weightless LayerNorms
        # CodeGen packs qkv_proj in four interleaved [q v k] chunks (8 heads: two per chunk)
        "codegen": (T.CodeGenConfig, {lm: T.CodeGenForCausalLM}, dict(common, n_embd=64, n_head=8, n_layer=4,
                                                                        rotary_dim=4, n_positions=256)),
        # OLMo-2: q/k norms over all heads
        "olmo2": (T.Olmo2Config, {lm: T.Olmo2ForCausalLM}, dict(dec, num_key_value_heads=4)),
        "bloom": (T.BloomConfig, {lm: T.BloomForCausalLM}, dict(common, hidden_size=32, n_head=4, n_layer=4,
                                                                  bos_token_id=1, eos_token_id=1)),
        # Falcon-7B's shape: multi-query [q heads | k | v] in query_key_value, head_dim a read-only property
        "falcon": (T.FalconConfig, {lm: T.FalconForCausalLM}, dict(common, hidden_size=32, num_attention_heads=4,
                                                                     bos_token_id=1, eos_token_id=1)),
        # Falcon-40B / Falcon2's shape: query_key_value packs [its q heads, k, v] per KV head (2 here), and blocks
        # normalize both sublayers' inputs first (ln_attn, ln_mlp), in parallel; head_dim 16 (the fused graph)
        "falcon_40b": (T.FalconConfig, {lm: T.FalconForCausalLM},
                       dict(common, hidden_size=64, num_attention_heads=4, num_kv_heads=2,
                            new_decoder_architecture=True, bos_token_id=1, eos_token_id=1)),
        # Cohere with q/k norms: a LayerNorm of each head's slice with gains per head ([heads, head_dim]), parallel
        # blocks, interleaved rotary; head_dim 16 (the fused graph)
        "cohere": (T.CohereConfig, {lm: T.CohereForCausalLM},
                   dict(dec, hidden_size=64, num_key_value_heads=2, use_qk_norm=True)),
        # squared-ReLU plain MLPs (up / down): Arcee with RMSNorms, Nemotron / Minitron with LayerNorm1P and partial
        # rotary; head_dim 32 (the fused graph)
        "arcee": (T.ArceeConfig, {lm: T.ArceeForCausalLM},
                  dict(dec, hidden_size=64, num_key_value_heads=2, head_dim=32)),
        "nemotron": (T.NemotronConfig, {lm: T.NemotronForCausalLM},
                     dict(dec, hidden_size=64, num_key_value_heads=2, head_dim=32, partial_rotary_factor=0.5)),
        # XGLM: OPT's block with fixed sinusoidal positions (a buffer, offset 2) and token embeddings times sqrt(hidden)
        "xglm": (T.XGLMConfig, {lm: T.XGLMForCausalLM},
                 dict(vocab_size=VOCAB, d_model=32, num_layers=4, attention_heads=4, ffn_dim=64,
                      max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=1)),
        # Apertus: a plain MLP with xIELU (learned parameters per layer), q / k norms, RMSNorms
        "apertus": (T.ApertusConfig, {lm: T.ApertusForCausalLM},
                    dict(dec, hidden_size=64, num_key_value_heads=2, head_dim=32, rope_scaling=None)),
        # ELECTRA: embeddings narrower than the hidden width (embedding_size), embeddings_project maps them up
        "electra": (T.ElectraConfig, {"sequence-classification": T.ElectraForSequenceClassification},
                    dict(common, hidden_size=32, intermediate_size=64, num_attention_heads=4, embedding_size=16,
                         num_labels=5)),
        # GPT-J: parallel blocks with one norm, rotary over 16 of 16 channels from a table (no inv_freq), LM head bias
        "gptj": (T.GPTJConfig, {lm: T.GPTJForCausalLM}, dict(vocab_size=VOCAB, n_embd=64, n_head=4, n_layer=4,
                                                             rotary_dim=16, n_positions=256, bos_token_id=1,
                                                             eos_token_id=1, pad_token_id=0)),
        # encoders beside BERT's layout: MPNet (q / k / v / o, a relative position bias per head), DeBERTa-v2
        # (query_proj / key_proj / value_proj, disentangled attention), ModernBERT (packed Wqkv, a gated Wi, rotary,
        # a local window in all but every global_attn_every_n_layers-th layer)
        "mpnet": (T.MPNetConfig, {"sequence-classification": T.MPNetForSequenceClassification,
                                  "feature-extraction": T.MPNetModel},
                  dict(common, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_labels=5,
                       max_position_embeddings=260)),
        "deberta_v2": (T.DebertaV2Config, {"sequence-classification": T.DebertaV2ForSequenceClassification},
                       dict(common, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_labels=5,
                            **DEBERTA_V3)),
        "modernbert": (T.ModernBertConfig, {"sequence-classification": T.ModernBertForSequenceClassification},
                       dict(common, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_labels=5,
                            global_attn_every_n_layers=2, local_attention=16)),
        # MPT: ALiBi (its bias over max_seq_len, sliced in the attention), packed Wqkv, up_proj / down_proj without a
        # gate, LayerNorms without biases, the MLP width a multiple of the hidden width (expansion_ratio)
        "mpt": (T.MptConfig, {lm: T.MptForCausalLM}, dict(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=4,
                                                           expansion_ratio=2, max_seq_len=256, pad_token_id=0,
                                                           bos_token_id=1, eos_token_id=1)),
        # BioGPT: OPT's block and position offset, token embeddings scaled by sqrt(hidden) inside their module
        "biogpt": (T.BioGptConfig, {lm: T.BioGptForCausalLM}, dict(dec, bos_token_id=1, eos_token_id=1)),
        # Granite-MoE: every expert's weights in two [experts, out, in] tensors (no ModuleList), Granite's multipliers;
        # head_dim 16 (the fused graph)
        "granite_moe": (T.GraniteMoeConfig, {lm: T.GraniteMoeForCausalLM},
                        dict(dec, hidden_size=64, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                             embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.125,
                             logits_scaling=8.0)),
        # gpt-oss: experts as [experts, in, out] tensors with biases (a clamped SwiGLU), a router with a bias, a sink
        # logit per attention head, sliding and full layers in turn; head_dim 16 (the fused graph)
        "gpt_oss": (T.GptOssConfig, {lm: T.GptOssForCausalLM},
                    dict(dec, hidden_size=64, intermediate_size=32, num_key_value_heads=2, head_dim=16,
                         num_local_experts=4, num_experts_per_tok=2, sliding_window=4, rope_scaling=None,
                         layer_types=["sliding_attention", "full_attention"] * 2)),
        "mixtral": (T.MixtralConfig, {lm: T.MixtralForCausalLM},
                    dict(dec, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    }


FAMILIES = ("llama", "smollm2", "qwen2", "qwen3", "mistral", "gemma", "gemma3", "phi3", "smollm3", "granite",
            "gpt_neox", "pythia", "phi", "stablelm", "opt", "gpt2", "bert", "roberta", "distilbert")
ENCODERS = ("bert", "roberta", "distilbert", "mpnet", "deberta_v2", "modernbert")
# families studies/family_matrix.py shows beside FAMILIES, each pass on its own (tests/test_families.py chains every
# pass, and these refuse one, mostly head pruning; tests/test_families.py checks what they take)
MATRIX_EXTRA = ("falcon", "falcon_40b", "cohere", "granite_moe", "gpt_oss", "arcee", "nemotron", "apertus", "xglm",
                "bloom", "mpt", "biogpt", "gptj", "mpnet", "deberta_v2", "modernbert")


def family_tasks(name: str) -> tuple[str, ...]:
    return tuple(_family_specs()[name][1])


def tiny_family(name: str, task: str | None = None, seed: int = 0):
    """A tiny random model of family `name` for `task` (default: its first task), weights scaled up a little
    so pruning visibly changes outputs."""
    cfg_cls, classes, kwargs = _family_specs()[name]
    task = task or next(iter(classes))
    torch.manual_seed(seed)
    return classes[task](cfg_cls(**kwargs)).eval()


def family_tokenizer(name: str):
    return tiny_tokenizer("encoder" if name in ENCODERS else "causal")
