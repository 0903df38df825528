"""The decode roofline: weight bytes a batch-1 decode step reads, read from the files, and the bound."""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tiny_models import tiny_llama

from benchmarks.roofline import memory_bandwidth_gb_s, percent_of_bound, weight_bytes_per_token


def _param_bytes(model, skip=()):
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if id(p) not in seen and not name.endswith(skip):
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def test_torch_checkpoint_counts_a_tied_table_and_skips_a_lookup_only_one(tmp_path):
    tied = tiny_llama()  # tie_word_embeddings: the head reads the embedding table every token
    tied.save_pretrained(tmp_path / "tied")
    assert weight_bytes_per_token(tmp_path / "tied", "torch") == _param_bytes(tied)
    untied = tiny_llama(tie_word_embeddings=False)
    untied.save_pretrained(tmp_path / "untied")
    assert weight_bytes_per_token(tmp_path / "untied", "torch") == _param_bytes(untied, skip=("embed_tokens.weight",))


def test_onnx_lookup_tables_are_skipped_unless_a_matmul_reads_them(tmp_path):
    table, w = np.ones((50, 8), np.float32), np.ones((8, 8), np.float32)

    def graph(tied: bool):
        nodes = [helper.make_node("Gather", ["table", "ids"], ["x"]),
                 helper.make_node("MatMul", ["x", "w"], ["h"])]
        if tied:
            nodes += [helper.make_node("Transpose", ["table"], ["t"], perm=[1, 0]),
                      helper.make_node("MatMul", ["h", "t"], ["y"])]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y" if tied else "h", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w")])
        folder = tmp_path / str(tied)
        folder.mkdir()
        onnx.save(helper.make_model(g), str(folder / "model.onnx"))
        return folder

    assert weight_bytes_per_token(graph(False), "onnx") == w.nbytes
    assert weight_bytes_per_token(graph(True), "onnx") == w.nbytes + table.nbytes


def test_a_mixture_of_experts_counts_the_experts_a_token_reads(tmp_path):
    """An MoE node's expert tables are read k of its experts at a time (OLMoE: 8 of 64); every expert was
    counted, putting a decode at 430% of its bound. The same for a torch checkpoint's expert tensors (Mixtral's
    per expert, Granite-MoE's [experts, out, in] for all of them)."""
    import transformers as T

    moe = T.MixtralForCausalLM(T.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                               num_local_experts=4, num_experts_per_tok=1))
    moe.save_pretrained(tmp_path / "torch")
    experts = sum(p.numel() * 4 for n, p in moe.named_parameters() if ".experts." in n)
    dense = _param_bytes(moe, skip=("embed_tokens.weight",)) - experts
    assert weight_bytes_per_token(tmp_path / "torch", "torch") == dense + experts // 4
    granite = T.GraniteMoeForCausalLM(T.GraniteMoeConfig(  # every expert's weights in two [experts, out, in] tensors
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=1, tie_word_embeddings=False))
    granite.save_pretrained(tmp_path / "granite")
    experts = sum(p.numel() * 4 for n, p in granite.named_parameters() if n.endswith(("input_linear.weight",
                                                                                       "output_linear.weight")))
    dense = _param_bytes(granite, skip=("embed_tokens.weight",)) - experts
    assert weight_bytes_per_token(tmp_path / "granite", "torch") == dense + experts // 4
    router, fc1, fc2 = (np.ones(s, np.float32) for s in ((8, 4), (4, 32, 8), (4, 8, 16)))
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "router"], ["logits"]),
         helper.make_node("MoE", ["x", "logits", "fc1", "", "fc2"], ["y"], domain="com.microsoft", k=2)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, n) for a, n in ((router, "router"), (fc1, "fc1"), (fc2, "fc2"))])
    (tmp_path / "moe").mkdir()
    onnx.save(helper.make_model(g), str(tmp_path / "moe" / "model.onnx"))
    assert weight_bytes_per_token(tmp_path / "moe", "onnx") == router.nbytes + (fc1.nbytes + fc2.nbytes) // 2


def test_bound():
    assert memory_bandwidth_gb_s(threads=2, mib=8, rounds=1) > 0.1
    assert percent_of_bound(50.0, 100_000_000, 10.0) == 50.0  # 10 GB/s / 100 MB = 100 tok/s bound
    assert percent_of_bound(None, 1, 1.0) is None
