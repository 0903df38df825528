"""How much 4-bit weights hurt each decoder block: the score mixed 4/8-bit quantization ranks blocks by
(`quantize: {keep_8bit_blocks: N}` keeps the N highest at 8 bits).

- `block_kl`: with the float torch model and calibration tokens, the KL divergence of the next-token
  distribution from the float model's when only that block's linear weights are on the 4-bit RTN grid that the
  ONNX side writes (compress/quant/fake.py): one reference forward, then one forward per block.
- `weight_error`: without them, a weight-only proxy from the ONNX graph: the block's relative int4 RTN error.

The KL scores are stored in the suite's cache (compress.runtime.cache_dir()/sensitivity), keyed by the weights,
the tokens and the grid, so a search whose trials share a parent measures them once."""
from __future__ import annotations

import hashlib
import json

import torch

from . import fake


def block_kl(module, arch, ids: torch.Tensor, *, block_size: int, symmetric: bool, algorithm: str = "rtn",
             batch_size: int = 1) -> dict[int, float]:
    """Block index -> mean KL (nats per token) of `module` (a causal LM, its blocks found by `arch`) on `ids`
    with that block alone at 4 bits. The weights are swapped in place and restored."""
    module = module.float().eval()
    grids = fake.plan(module, fake.GridSpec(bits=4, block_size=block_size, symmetric=symmetric, embeddings=False,
                                            algorithm=algorithm))
    modules = dict(module.named_modules())

    def log_probs() -> torch.Tensor:
        out = [module(input_ids=ids[i:i + batch_size]).logits.float() for i in range(0, len(ids), batch_size)]
        return torch.log_softmax(torch.cat(out), dim=-1)

    scores = {}
    with torch.no_grad():
        ref = log_probs()
        for i in range(arch.num_layers()):
            prefix = arch.layer_name(i) + "."
            mine = {name: fq for name, fq in grids.items() if name.startswith(prefix)}
            saved = {name: modules[name].weight.detach().clone() for name in mine}
            for name, fq in mine.items():
                modules[name].weight.copy_(fq.grid(modules[name].weight))
            kl = torch.nn.functional.kl_div(log_probs(), ref, log_target=True, reduction="none").sum(-1)
            scores[i] = float(kl.mean())
            for name, w in saved.items():
                modules[name].weight.copy_(w)
    return scores


def cached_block_kl(module, arch, ids: torch.Tensor, *, block_size: int, symmetric: bool, algorithm: str = "rtn",
                    batch_size: int = 1) -> tuple[dict[int, float], bool]:
    """`block_kl`, read from the cache when these weights, tokens and grid were scored before; returns
    (scores, whether they came from the cache)."""
    from ..runtime import cache_dir

    h = hashlib.sha256(json.dumps([block_size, symmetric, batch_size, algorithm]).encode())
    h.update(ids.numpy().tobytes())
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().contiguous().numpy().tobytes())
    path = cache_dir() / "sensitivity" / f"{h.hexdigest()[:32]}.json"
    if path.is_file():
        return {int(k): v for k, v in json.loads(path.read_text()).items()}, True
    scores = block_kl(module, arch, ids, block_size=block_size, symmetric=symmetric, algorithm=algorithm,
                      batch_size=batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{id(scores)}")
    tmp.write_text(json.dumps(scores))
    tmp.replace(path)  # whole or absent: a reader never sees half a file
    return scores, False


def weight_error(proto, blocks: dict[int, list[str]], *, block_size: int, symmetric: bool,
                 algorithm: str = "rtn") -> dict[int, float]:
    """Block index -> ||W - int4(W)|| / ||W|| over its weight MatMuls (`blocks`: ort.decoder_blocks of the
    ONNX model `proto`, whose weights are [K, N]), on the rtn (or minmax) grid."""
    from .ort import weight_of

    grid = fake.FakeQuant("minmax", 4, block_size) if algorithm == "minmax" else \
        fake.FakeQuant("blockwise", 4, block_size, symmetric)
    scores = {}
    for i, names in blocks.items():
        err = norm = 0.0
        for name in names:
            w = torch.from_numpy(weight_of(proto, name).T.copy()).float()  # [N, K]: blocks along K
            err += float((grid.grid(w) - w).pow(2).sum())
            norm += float(w.pow(2).sum())
        scores[i] = (err / max(norm, 1e-30)) ** 0.5
    return scores
