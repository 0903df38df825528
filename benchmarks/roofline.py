"""The memory roofline of decoding: at batch 1 every generated token reads every weight once, so a decoder
cannot beat `memory bandwidth / weight bytes read per token` tokens per second. Reports put each decoder's
measured decode speed against that bound.

- `memory_bandwidth_gb_s`: a copy benchmark (numpy, one chunk per thread, best of a few rounds; bytes read
  plus bytes written), a few tenths of a second;
- `weight_bytes_per_token`: the weights a decode step reads, from the checkpoint's files (or GGUF file)
  without loading the model. Embedding tables that only a lookup reads (one row per token) are left out; a
  table the tied LM head multiplies by is counted; of a mixture of experts' tables (torch: `.experts.` tensors
  and [experts, ...] ones holding all of them, Granite-MoE's; ONNX: MoE / QMoE inputs), the share of the k experts
  a token is routed to."""
from __future__ import annotations

import json
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

_LOOKUP_OPS = ("Gather", "GatherBlockQuantized")
_TORCH_TABLES = ("embed_tokens.weight", "wte.weight", "wpe.weight", "word_embeddings.weight",
                 "position_embeddings.weight", "embed_in.weight", "token_type_embeddings.weight")
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def memory_bandwidth_gb_s(threads: int = 1, mib: int = 128, rounds: int = 4) -> float:
    """GB/s of a large copy (read + write), `threads` chunks in parallel (numpy releases the GIL)."""
    src = np.ones(mib << 18, dtype=np.float32)  # mib MiB
    dst = np.empty_like(src)
    chunks = np.array_split(np.arange(src.size), threads)
    bounds = [(int(c[0]), int(c[-1]) + 1) for c in chunks if len(c)]

    def copy(b):
        np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]])

    best = float("inf")
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(rounds + 1):  # the first round faults the pages in
            start = time.perf_counter()
            list(pool.map(copy, bounds))
            best = min(best, time.perf_counter() - start)
    return round(2 * src.nbytes / best / 1e9, 2)


def weight_bytes_per_token(path: Path, kind: str) -> int | None:
    """Bytes of weights a batch-1 decode step reads (see the module docstring); None if unknown."""
    path = Path(path)
    if kind == "onnx":
        return _onnx_bytes(path / "model.onnx")
    if kind == "gguf":
        return _gguf_bytes(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    tensors, shapes = {}, {}
    for f in files:
        for name, (n, shape) in _safetensors_header(f).items():
            tensors[name], shapes[name] = n, shape
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    has_head = any(name.endswith("lm_head.weight") for name in tensors)
    tied = config.get("tie_word_embeddings", True) and not has_head
    head_tables = ("embed_tokens.weight", "wte.weight") if tied else ()  # the tied head multiplies by these
    experts = next((config[f] for f in ("num_local_experts", "num_experts") if config.get(f)), None)
    share = config.get("num_experts_per_tok", 1) / experts if experts else 1.0  # each token: k of the experts
    def expert_table(name: str) -> bool:  # an expert's tensor, or every expert's at once ([experts, ...])
        return ".experts." in name or (experts is not None and len(shapes[name]) == 3 and shapes[name][0] == experts)

    return round(sum(n * (share if expert_table(name) else 1.0) for name, n in tensors.items()
                     if not name.endswith(_TORCH_TABLES) or name.endswith(head_tables)))


def _safetensors_header(path: Path) -> dict[str, tuple[int, list[int]]]:
    """name -> (bytes, shape) of each tensor in a safetensors file."""
    with open(path, "rb") as fh:
        size = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(size))
    return {name: (int(np.prod(meta["shape"], dtype=np.int64)) * _SAFETENSORS_BYTES.get(meta["dtype"], 4),
                   list(meta["shape"])) for name, meta in header.items() if name != "__metadata__"}


def _gguf_bytes(path: Path) -> int:
    """A GGUF file's tensors, less the token table when a separate output matrix exists (then the table is
    only looked up; tied, llama.cpp multiplies by it)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    lookup_only = ("token_embd.weight",) if "output.weight" in tensors else ()
    return sum(n for name, n in tensors.items() if name not in lookup_only)


def _onnx_bytes(model_file: Path) -> int:
    import onnx

    model = onnx.load(str(model_file), load_external_data=False)
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def looked_up_only(name: str) -> bool:  # every use is a row lookup (through a Reshape view at most)
        for node in consumers.get(name, []):
            if node.op_type in _LOOKUP_OPS and node.input[0] == name:
                continue
            if node.op_type == "Reshape" and node.input[0] == name and all(map(looked_up_only, node.output)):
                continue
            return False
        return True

    share = _expert_shares(model)
    return round(sum(_initializer_bytes(i) * share.get(i.name, 1.0) for i in model.graph.initializer
                     if not looked_up_only(i.name)))


def _expert_shares(model) -> dict[str, float]:
    """The experts' tables of MoE / QMoE nodes -> the share a token reads: k of its experts."""
    shares = {}
    for node in model.graph.node:
        if node.op_type in ("MoE", "QMoE"):
            k = next((a.i for a in node.attribute if a.name == "k"), 1)
            experts = next(i for i in model.graph.initializer if i.name == node.input[2]).dims[0]
            shares.update(dict.fromkeys([n for n in node.input[2:] if n], k / experts))
    return shares


def _initializer_bytes(init) -> int:
    for entry in init.external_data:
        if entry.key == "length":
            return int(entry.value)
    if init.raw_data:
        return len(init.raw_data)
    from onnx import helper

    return int(np.prod(init.dims, dtype=np.int64)) * np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize


def percent_of_bound(decode_tok_s: float | None, bytes_per_token: int | None, bandwidth_gb_s: float | None):
    """Measured decode speed as a percentage of bandwidth / bytes per token (None when a figure is missing)."""
    if not (decode_tok_s and bytes_per_token and bandwidth_gb_s):
        return None
    return 100.0 * decode_tok_s * bytes_per_token / (bandwidth_gb_s * 1e9)
