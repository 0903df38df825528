"""Where a transformer's parts are, found from its module tree and config (never from `model_type`).

`find(model)` probes the loaded model: the block list is the ModuleList of identical blocks holding the most parameters;
inside a block, attention is the sub-tree that holds q/k/v projections (separate or fused), its output projection sits
in the same sub-tree; the MLP is the pair (or triple) of projections outside it, or a mixture of experts (a ModuleList
of expert MLPs, or [experts, ...] tensors holding every expert's weights, and the router beside them: kind `moe`). The
names probed are the ones Hugging Face families use (Llama / Qwen / Mistral / Gemma: q_proj..., gate_proj...; Phi-3:
qkv_proj, gate_up_proj; GPT-NeoX: query_key_value, dense_h_to_4h; GPT-2: c_attn, c_fc; BERT / RoBERTa: query,
intermediate.dense; DistilBERT: q_lin, ffn.lin1); sizes (heads, KV heads, head_dim, MLP width) are read from the
weights' shapes, so a pruned model is described as it is now. A model whose parts cannot be found is refused with one
`UnsupportedModelError` naming the part."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import UnsupportedModelError

# attention: separate (q, k, v) names, fused names with their row layout, output names, q/k norm names
SEPARATE_QKV = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q_lin", "k_lin", "v_lin"),
                ("wq", "wk", "wv"), ("q", "k", "v"), ("query_proj", "key_proj", "value_proj"))  # MPNet, DeBERTa
# blocks: rows [q heads | k heads | v heads] (Phi-3, GPT-2); per_head: rows [q k v] of head 0, of head 1, ...
# (GPT-NeoX views the output as [heads, 3 * head_dim]); grouped: rows [its q heads, k, v] of KV head 0, of KV
# head 1, ... (Falcon-40B / Falcon2's query_key_value: found where query_key_value's rows are not per head)
FUSED_QKV = {"qkv_proj": "blocks", "c_attn": "blocks", "Wqkv": "blocks", "query_key_value": "per_head"}
ATTN_OUT = ("o_proj", "out_proj", "out_lin", "dense", "c_proj", "wo", "o", "Wo")  # MPNet: o; ModernBERT: Wo
QK_NORMS = (("q_norm", "k_norm"), ("q_layernorm", "k_layernorm"))
# experts held as [experts, ...] tensors instead of a ModuleList: (gate / up parameter, down parameter, layout).
# out_in: [experts, 2 x inter, hidden], each expert's gate rows then its up rows, and [experts, hidden, inter]
# (Granite-MoE's input_linear / output_linear); in_out_interleaved: [experts, hidden, 2 x inter], columns gate, up,
# gate, up, ..., and [experts, inter, hidden], each with a bias per expert (gpt-oss's experts)
PARALLEL_EXPERTS = (("input_linear.weight", "output_linear.weight", "out_in"),
                    ("gate_up_proj", "down_proj", "in_out_interleaved"))
# per-head projections of an attention besides q / k / v: DeBERTa's relative-position ones (without share_att_key)
PER_HEAD_EXTRAS = ("pos_key_proj", "pos_query_proj")
# MLP: gated (gate, up, down), fused gated (gate_up: gate rows first, then up rows; down), plain (in, out)
GATED = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
FUSED_GATED = (("gate_up_proj", "down_proj"), ("Wi", "Wo"))  # ModernBERT: Wi = [activated half | gate]
PLAIN = (("c_fc", "c_proj"), ("fc1", "fc2"), ("dense_h_to_4h", "dense_4h_to_h"), ("lin1", "lin2"),
         ("intermediate.dense", "output.dense"), ("fc_in", "fc_out"), ("up_proj", "down_proj"))  # MPT
ACTIVATIONS = ("act_fn", "act", "activation_fn", "activation", "intermediate_act_fn", "gelu_impl")  # BLOOM: gelu_impl
MLP_WIDTH_FIELDS = ("intermediate_size", "n_inner", "hidden_dim", "ffn_dim", "ffn_hidden_size")
# config lists with one entry per layer (Gemma 2 / 3, Qwen2: attention kind; SmolLM3: rotary or not)
PER_LAYER_FIELDS = ("layer_types", "sliding_window_layers", "no_rope_layers")


def is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_conv1d(m)


def linear_weight(m: nn.Module) -> torch.Tensor:
    """The weight as [out, in] whatever the module type."""
    return m.weight.t() if is_conv1d(m) else m.weight


def is_projection(m: nn.Module) -> bool:
    """A Linear / Conv1D, or a module standing in for one (low-rank factors, quantized linears)."""
    return is_linear(m) or (isinstance(getattr(m, "in_features", None), int)
                            and isinstance(getattr(m, "out_features", None), int))


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def features(m: nn.Module) -> tuple[int, int]:
    """(in, out) of a Linear, a GPT-2 Conv1D (weight stored in x out) or a stand-in with in/out_features."""
    if is_conv1d(m):
        return m.weight.shape[0], m.weight.shape[1]
    if isinstance(m, nn.Linear) or not hasattr(m, "in_features"):
        return m.weight.shape[1], m.weight.shape[0]
    return m.in_features, m.out_features


def is_norm(m: nn.Module) -> bool:
    """A norm over the last dimension: nn.LayerNorm, or a family's own *Norm class with a weight vector or, weightless
    (OLMo's LayerNorm), a normalized_shape."""
    weight = getattr(m, "weight", None)
    return isinstance(m, nn.LayerNorm) or "Norm" in type(m).__name__ and (
        isinstance(weight, nn.Parameter) or weight is None and isinstance(getattr(m, "normalized_shape", None), tuple))


def norm_width(m: nn.Module) -> int:
    """The width a norm (is_norm) normalizes."""
    weight = getattr(m, "weight", None)
    return weight.shape[0] if weight is not None else m.normalized_shape[-1]


@dataclass
class Attention:
    name: str                    # the attention sub-tree (its root under the block), e.g. model.layers.0.self_attn
    q: str | None                # separate projections (None when fused)
    k: str | None
    v: str | None
    qkv: str | None              # fused projection
    qkv_layout: str              # separate | blocks | per_head | grouped
    o: str
    q_norm: str | None = None
    k_norm: str | None = None
    extras: list[str] = field(default_factory=list)  # PER_HEAD_EXTRAS: hidden-wide input, rows per head

    @property
    def inputs(self) -> list[str]:
        """The projections that read the block's (normalized) residual stream."""
        return [self.qkv] if self.qkv else [self.q, self.k, self.v]


@dataclass
class MLP:
    name: str                    # the MLP (moe: the block holding router and experts)
    ins: list[str]               # gate, up (gated) | gate_up (fused gated) | fc_in (plain) | none (moe)
    out: str                     # down / fc_out ("" for moe)
    kind: str                    # gated | fused_gated | plain | moe
    act: nn.Module | None = None
    experts: str | None = None   # moe: the ModuleList of expert MLPs
    router: str | None = None    # moe: the linear layer scoring the experts for each token
    # moe without a ModuleList: the parameters holding every expert's gate and up, and down (PARALLEL_EXPERTS)
    parallel: tuple[str, str] | None = None
    parallel_layout: str | None = None  # out_in | in_out_interleaved


@dataclass
class Block:
    name: str
    attn: Attention
    mlp: MLP
    norms: list[str] = field(default_factory=list)  # norms over the hidden width inside the block


def _rel(rel_names: dict[str, nn.Module], suffix: str, within: str = "", exclude: str | None = None) -> str | None:
    """The first linear module whose relative name ends with `suffix` (at a dot boundary), optionally inside
    `within` and outside `exclude`."""
    for n, m in rel_names.items():
        if not is_projection(m) or (within and not n.startswith(within + ".")):
            continue
        if exclude and (n == exclude or n.startswith(exclude + ".")):
            continue
        if n == suffix or n.endswith("." + suffix):
            return n
    return None


class Architecture:
    """The parts of one model; names are full module paths (`model.get_submodule(name)`)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers_name = find_layers(model)
        self.blocks = [self._find_block(i) for i in range(len(self.layers()))]
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if not isinstance(emb, nn.Embedding):
            raise self._refuse("the input embedding (get_input_embeddings() is "
                               f"{type(emb).__name__ if emb is not None else 'missing'})")
        # the residual stream's width, which the embeddings need not have (ELECTRA's embedding_size, OPT-350m's
        # word_embed_proj_dim: a projection outside the blocks maps them to it)
        o = model.get_submodule(self.blocks[0].attn.o)
        self.hidden_size = o.weight.shape[1] if is_conv1d(o) else o.out_features
        names = {id(m): n for n, m in model.named_modules()}
        self.embedding = names[id(emb)]
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.head = names.get(id(head)) if head is not None else None
        self.tied = head is not None and getattr(head, "weight", None) is emb.weight
        self._check_heads()

    # ------------------------------------------------------------------ discovery
    def _refuse(self, part: str) -> UnsupportedModelError:
        return _refusal(self.model, part)

    def _find_block(self, i: int) -> Block:
        prefix = f"{self.layers_name}.{i}"
        block = self.layers()[i]
        rel = {n: m for n, m in block.named_modules() if n}
        attn = self._find_attention(prefix, rel, i)
        mlp = self._find_mlp(prefix, rel, attn, i)
        skip = {attn.q_norm, attn.k_norm}
        norms = [f"{prefix}.{n}" for n, m in rel.items() if is_norm(m) and f"{prefix}.{n}" not in skip]
        return Block(prefix, attn, mlp, norms)

    def _find_attention(self, prefix: str, rel: dict, i: int) -> Attention:
        q = k = v = qkv = None
        layout = "separate"
        for qn, kn, vn in SEPARATE_QKV:
            q = _rel(rel, qn)
            if q:
                parent = q.rpartition(".")[0]
                k, v = _rel(rel, kn, parent), _rel(rel, vn, parent)
                if parent and k and v:
                    break
            q = None
        if q is None:
            for name, lay in FUSED_QKV.items():
                qkv = _rel(rel, name)
                if qkv:
                    layout = lay
                    break
        if q is None and qkv is None:
            raise self._refuse(f"attention projections in block {i} (q/k/v: "
                               f"{', '.join('/'.join(t) for t in SEPARATE_QKV)}; fused: {', '.join(FUSED_QKV)})")
        root = (q or qkv).split(".")[0]  # the block's child holding attention
        taken = {q, k, v, qkv}
        o = next((n for cand in ATTN_OUT if (n := _rel(rel, cand, root)) and n not in taken), None)
        if o is None:
            raise self._refuse(f"attention output projection in block {i} (looked for {', '.join(ATTN_OUT)} "
                               f"under {prefix}.{root})")
        if layout == "per_head":  # rows [q k v] per head need 3 x the output width; [q heads | k | v] of one
            # KV head is Falcon's multi-query; [its q heads, k, v] per KV head Falcon-40B's grouped packing
            rows, width, hd = features(rel[qkv])[1], features(rel[o])[0], self.head_dim()
            kv = (rows - width) // (2 * hd) if hd and (rows - width) % (2 * hd) == 0 else 0
            if rows == width + 2 * hd and rows != 3 * width:
                layout = "blocks"
            elif rows != 3 * width and kv > 1 and width % (kv * hd) == 0:
                layout = "grouped"
            elif rows != 3 * width:
                raise self._refuse(f"known q/k/v packing in block {i} ({prefix}.{qkv} has {rows} rows: neither "
                                   f"3 x {width}, per head [q k v], nor {width} + 2 x head_dim x the KV heads, "
                                   "[q heads k v] per KV head)")
        qn_, kn_ = None, None
        for a, b in QK_NORMS:
            mods = {n: m for n, m in rel.items() if n.startswith(root + ".")}
            qn_ = next((n for n in mods if n.endswith("." + a)), None)
            kn_ = next((n for n in mods if n.endswith("." + b)), None)
            if qn_ and kn_:
                break
        full = lambda n: f"{prefix}.{n}" if n else None  # noqa: E731
        extras = [full(n) for n, m in rel.items() if n.startswith(root + ".") and is_linear(m)
                  and n.rpartition(".")[2] in PER_HEAD_EXTRAS]
        return Attention(full(root), full(q), full(k), full(v), full(qkv), layout, full(o), full(qn_), full(kn_),
                         extras)

    def _find_mlp(self, prefix: str, rel: dict, attn: Attention, i: int) -> MLP:
        root = attn.name[len(prefix) + 1:]
        found = None
        for kind, table in (("gated", GATED), ("fused_gated", FUSED_GATED), ("plain", PLAIN)):
            for names in table:
                got = [_rel(rel, n, exclude=root) for n in names]
                if all(got):
                    found = kind, got
                    break
            if found:
                break
        if found is None and (moe := self._parallel_moe(prefix, rel, attn, i)):
            return moe
        if found is None:
            raise self._refuse(f"MLP projections in block {i} (gated: gate_proj/up_proj/down_proj; fused: "
                               f"gate_up_proj/down_proj; plain: {', '.join('/'.join(p) for p in PLAIN)}; or "
                               "experts: a ModuleList of them, or [experts, ...] tensors, Granite-MoE's or gpt-oss's)")
        kind, got = found
        parts = [n.split(".") for n in got]
        if any(seg.isdigit() for seg in parts[0]):  # experts.0.w1: the first expert of a ModuleList, not the MLP
            return self._moe(prefix, ".".join(parts[0][:[seg.isdigit() for seg in parts[0]].index(True)]), i)
        common = []
        for segs in zip(*[p[:-1] for p in parts]):
            if len(set(segs)) != 1:
                break
            common.append(segs[0])
        name = ".".join([prefix, *common])
        holder = self.model.get_submodule(f"{prefix}.{got[0]}".rpartition(".")[0])
        act = next((getattr(holder, a) for a in ACTIVATIONS if isinstance(getattr(holder, a, None), nn.Module)), None)
        return MLP(name, [f"{prefix}.{n}" for n in got[:-1]], f"{prefix}.{got[-1]}", kind, act)

    def _moe(self, prefix: str, experts: str, i: int) -> MLP:
        """A mixture of experts (Mixtral, Qwen2/3-MoE, OLMoE, PhiMoE): a ModuleList of expert MLPs and, beside
        it, the router: the linear layer with one output per expert (a shared expert's gate has one output)."""
        holder = f"{prefix}.{experts}".rpartition(".")[0]
        n = len(self.model.get_submodule(f"{prefix}.{experts}"))
        router = next((f"{holder}.{name}" for name, m in self.model.get_submodule(holder).named_children()
                       if is_linear(m) and features(m)[1] == n), None)
        if router is None:
            raise UnsupportedModelError(
                f"cannot map the layout of {type(self.model).__name__}: block {i}'s MLP is a mixture of {n} experts "
                f"under {prefix}.{experts} with no router beside them (a linear layer with {n} outputs)")
        return MLP(holder, [], "", "moe", experts=f"{prefix}.{experts}", router=router)

    def _parallel_moe(self, prefix: str, rel: dict, attn: Attention, i: int) -> MLP | None:
        """Experts held as [experts, ...] tensors (PARALLEL_EXPERTS: Granite-MoE's, gpt-oss's) and the router beside
        them: the nearest module around them holding a [experts, hidden] weight (an nn.Linear or a router of its
        own); None where the block has no such pair."""
        root = attn.name[len(prefix) + 1:]
        params = {n: p for n, p in self.model.get_submodule(prefix).named_parameters()
                  if not n.startswith(root + ".") and p.dim() == 3}
        found = next(((n, n[:-len(first)] + second, layout) for n in params
                      for first, second, layout in PARALLEL_EXPERTS
                      if n.endswith("." + first) and n[:-len(first)] + second in params), None)
        if found is None:
            return None
        first, second, layout = found
        w1, w2 = params[first], params[second]
        o = self.model.get_submodule(attn.o)
        n, hidden = w1.shape[0], o.weight.shape[1] if is_conv1d(o) else o.out_features  # the residual width
        gate_up, down = (w1.shape[1:], w2.shape[1:]) if layout == "out_in" else (w1.shape[:0:-1], w2.shape[:0:-1])
        if w2.shape[0] != n or gate_up[1] != hidden or down[0] != hidden or gate_up[0] != 2 * down[1]:
            raise UnsupportedModelError(
                f"cannot map the layout of {type(self.model).__name__}: block {i}'s {prefix}.{first} "
                f"{list(w1.shape)} and {prefix}.{second} {list(w2.shape)} are not experts' gate / up and down weights "
                f"({layout}) of hidden width {hidden}")
        holder = first.rpartition(".")[0]
        while True:  # the router: a [experts, hidden] weight beside the experts, or one level up
            router = next((name for name, m in rel.items() if name.startswith(holder + ".") and not name.startswith(
                first.rpartition(".")[0]) and isinstance(w := getattr(m, "weight", None), torch.Tensor)
                and tuple(w.shape) == (n, hidden)), None)
            if router or "." not in holder:
                break
            holder = holder.rpartition(".")[0]
        if router is None:
            raise UnsupportedModelError(
                f"cannot map the layout of {type(self.model).__name__}: block {i}'s MLP is a mixture of {n} experts "
                f"under {prefix}.{holder} with no router beside them (a linear layer with {n} outputs)")
        mod = self.model.get_submodule(f"{prefix}.{holder}")
        act = next((getattr(mod, a) for a in ACTIVATIONS if isinstance(getattr(mod, a, None), nn.Module)), None)
        return MLP(f"{prefix}.{holder}", [], "", "moe", act, router=f"{prefix}.{router}",
                   parallel=(f"{prefix}.{first}", f"{prefix}.{second}"), parallel_layout=layout)

    def _check_heads(self) -> None:
        for i in range(len(self.blocks)):
            hd, o_in = self.head_dim(), features(self.module(self.blocks[i].attn.o))[0]
            if not hd or o_in % hd:
                raise self._refuse(f"head layout in block {i}: attention output width {o_in} is not a multiple "
                                   f"of head_dim {hd} (config: num_attention_heads / head_dim)")

    # ------------------------------------------------------------------ blocks
    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layers_name)

    def num_layers(self) -> int:
        return len(self.layers())

    def layer_name(self, i: int) -> str:
        return f"{self.layers_name}.{i}"

    # ------------------------------------------------------------------ MLP
    def mlp_name(self, i: int) -> str:
        return self.blocks[i].mlp.name

    def mlp_in(self, i: int) -> list[str]:
        return list(self.blocks[i].mlp.ins)

    def mlp_out(self, i: int) -> str:
        return self.blocks[i].mlp.out

    def mlp_act(self, i: int) -> nn.Module | None:
        return self.blocks[i].mlp.act

    def mlp_kind(self, i: int) -> str:
        return self.blocks[i].mlp.kind

    def mlp_width(self, i: int) -> int:
        return features(self.module(self.mlp_out(i)))[0]

    def moe_blocks(self) -> list[int]:
        """The blocks whose MLP is a mixture of experts."""
        return [i for i, b in enumerate(self.blocks) if b.mlp.kind == "moe"]

    def num_experts(self, i: int) -> int:
        mlp = self.blocks[i].mlp
        return self.model.get_parameter(mlp.parallel[0]).shape[0] if mlp.parallel else len(self.module(mlp.experts))

    @property
    def intermediate_field(self) -> str:
        """The config field holding the MLP width (whichever of the known names the config has)."""
        d = self.model.config.to_dict()
        width = self.mlp_width(0)
        have = [f for f in MLP_WIDTH_FIELDS if f in d]
        return next((f for f in have if d[f] == width), have[0] if have else "intermediate_size")

    # ------------------------------------------------------------------ attention
    def attn(self, i: int) -> Attention:
        return self.blocks[i].attn

    def attn_name(self, i: int) -> str:
        return self.blocks[i].attn.name

    def attn_out(self, i: int) -> str:
        return self.blocks[i].attn.o

    def head_dim(self) -> int:
        c = self.model.config
        hd = getattr(c, "head_dim", None)
        if isinstance(hd, int) and hd > 0:
            return hd
        heads = getattr(c, "num_attention_heads", None)
        return c.hidden_size // heads if heads else 0

    def num_heads(self, i: int) -> int:
        return features(self.module(self.attn_out(i)))[0] // self.head_dim()

    def num_kv_heads(self, i: int) -> int:
        a, hd = self.attn(i), self.head_dim()
        if a.qkv_layout == "separate":
            return features(self.module(a.k))[1] // hd
        if a.qkv_layout == "per_head":
            return self.num_heads(i)
        rows = features(self.module(a.qkv))[1]
        return (rows - self.num_heads(i) * hd) // (2 * hd)  # blocks and grouped: (q + 2 x kv heads) x head_dim

    def qkv_rows(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row indices of q (per q head, [nq, hd]), k and v ([nkv, hd]) in the fused projection's output."""
        nq, nkv, hd = self.num_heads(i), self.num_kv_heads(i), self.head_dim()
        if self.attn(i).qkv_layout in ("per_head", "grouped"):  # per KV head [its q heads, k, v] (per head: one q)
            per = nq // nkv
            group = torch.arange(nkv)[:, None] * (per + 2) * hd + torch.arange(hd)[None, :]  # [nkv, hd]: q 0 of each
            q = (group[:, None, :] + torch.arange(per)[None, :, None] * hd).reshape(nq, hd)
            return q, group + per * hd, group + (per + 1) * hd
        ar = torch.arange(nq * hd + 2 * nkv * hd)
        return ar[:nq * hd].view(nq, hd), ar[nq * hd:(nq + nkv) * hd].view(nkv, hd), ar[(nq + nkv) * hd:].view(nkv, hd)

    def qkv_weights(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v weights as [out, in] whatever the layout."""
        a = self.attn(i)
        if a.qkv_layout == "separate":
            return tuple(linear_weight(self.module(n)) for n in (a.q, a.k, a.v))
        w = linear_weight(self.module(a.qkv))
        return tuple(w[r.reshape(-1)] for r in self.qkv_rows(i))

    # ------------------------------------------------------------------ all linear layers in blocks
    def block_linears(self) -> list[str]:
        prefix = self.layers_name + "."
        return [n for n, m in self.model.named_modules() if n.startswith(prefix) and is_linear(m)]

    def outer_norms(self) -> list[str]:
        """Norms over the hidden width outside the blocks (embedding LayerNorm, final norm)."""
        prefix = self.layers_name + "."
        return [n for n, m in self.model.named_modules() if is_norm(m) and not n.startswith(prefix)
                and norm_width(m) == self.hidden_size]

    def describe(self) -> dict:
        b = self.blocks[0]
        return {"blocks": f"{self.layers_name} ({self.num_layers()})", "attention": b.attn.qkv_layout,
                "qk_norm": b.attn.q_norm is not None, "mlp": b.mlp.kind, "heads": self.num_heads(0),
                "kv_heads": self.num_kv_heads(0), "head_dim": self.head_dim(), "hidden": self.hidden_size,
                "head": self.head, "tied": self.tied}


def find(model: nn.Module) -> Architecture:
    """The model's parts, or UnsupportedModelError naming the part that could not be found."""
    return Architecture(model)


def output_head(model: nn.Module, task: str | None = None) -> str | None:
    """The name of the layer writing the logits: the LM head (`get_output_embeddings`, as `Architecture.head`),
    or for a sequence classifier its last linear layer when that writes `num_labels` outputs (BERT's
    `classifier`, RoBERTa's `classifier.out_proj`, a decoder's `score`); None without one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        return next((n for n, m in model.named_modules() if m is head), None)
    if task != "sequence-classification":
        return None
    linear = [(n, m) for n, m in model.named_modules() if is_linear(m)]
    labels = getattr(getattr(model, "config", None), "num_labels", None)
    return linear[-1][0] if linear and features(linear[-1][1])[1] == labels else None


def keep_layer_fields(config, keep: list[int], total: int) -> None:
    """The config of a model keeping only layers `keep` (old indices) of `total`, in place: the layer count, the
    kept layers' entries of its per-layer lists (PER_LAYER_FIELDS: from_pretrained reads layer i's kind there)
    and of GPT-2 / BERT's pruned_heads (keyed by layer)."""
    config.num_hidden_layers = len(keep)  # GPT-2's attribute_map sends this to n_layer
    for name in PER_LAYER_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, list) and len(value) == total:
            setattr(config, name, [value[i] for i in keep])
    if getattr(config, "pruned_heads", None):
        old = {int(k): v for k, v in config.pruned_heads.items()}
        config.pruned_heads = {new: old[o] for new, o in enumerate(keep) if old.get(o)}
    kinds = getattr(config, "attention_layers", None)  # GPT-Neo: expanded from attention_types, checked against it
    if isinstance(kinds, list) and len(kinds) == total and isinstance(getattr(config, "attention_types", None), list):
        config.attention_layers = [kinds[i] for i in keep]
        config.attention_types = [[[kind], 1] for kind in config.attention_layers]


LAYER_INDICES = ("layer_idx", "layer_id")  # what modules call their layer's index (ModernBERT: layer_id)


def keep_layers_of(model: nn.Module, layers_name: str, keep: list[int], what: str) -> None:
    """Cut the model's layer list (`layers_name`) to `keep` (old indices), renumber the layer indices its modules
    keep (the KV cache reads layer_idx) and bring its config along (keep_layer_fields). Refused, before
    anything changes, where the config would rebuild a kept layer as another kind than it is: ModernBERT makes
    every n-th layer global by its index when it is built, which no config field can move (`what`: the
    option to name)."""
    layers = model.get_submodule(layers_name)
    total = len(layers)
    config = copy.deepcopy(model.config)
    keep_layer_fields(config, keep, total)
    try:  # what from_pretrained will read back (GPT-Neo checks its per-layer kinds against its layer count)
        type(config).from_dict(config.to_dict())
    except Exception as exc:  # noqa: BLE001 - a config class raises what it likes
        raise UnsupportedModelError(f"{what}: keeping layers {keep} of {type(model).__name__} leaves a config that "
                                    f"does not load back ({type(exc).__name__}: {exc})") from exc
    diff, indices = _layer_kind_change(model, layers_name, config, keep)
    if diff is not None:
        raise UnsupportedModelError(
            f"{what}: keeping layers {keep} of {type(model).__name__}, {diff}: its layers' kinds follow from "
            "their positions (e.g. global_attn_every_n_layers); keep layers whose kinds match the positions they "
            "move to")
    set_module(model, layers_name, nn.ModuleList([layers[i] for i in keep]))
    for new, block in enumerate(model.get_submodule(layers_name)):
        for m in block.modules():
            for index in indices:
                if type(getattr(m, index, None)) is int:
                    setattr(m, index, new)
    keep_layer_fields(model.config, keep, total)


def _setting(v) -> bool:
    """A value a module keeps as a setting: a number, flag or string (or a tuple of them)."""
    return v is None or isinstance(v, bool | int | float | str) or (isinstance(v, tuple) and all(map(_setting, v)))


def _layer_kind_change(model: nn.Module, layers_name: str, config, keep: list[int]) -> tuple[str | None, set]:
    """(where the layers `config` builds (on the meta device) differ from the kept ones the model's config
    builds: another module, or another setting a module keeps (a number, flag or string), None where none
    does; the settings that are the layer's index: LAYER_INDICES and any other reading i in layer i and j at
    position j, e.g. GPT-NeoX-Japanese's layer_number)."""
    configs = [copy.deepcopy(c) for c in (model.config, config)]
    for c in configs:  # pruned_heads changes shapes only, and makes the build run on the CPU (GPT-2 XL: minutes)
        if getattr(c, "pruned_heads", None):
            c.pruned_heads = {}
    old, new = (build_from_config(type(model), c).get_submodule(layers_name) for c in configs)
    indices = set(LAYER_INDICES)
    for j, i in enumerate(keep):
        was = dict(old[i].named_modules())
        for name, m in new[j].named_modules():
            where = f"layer {i} {'at' if i == j else 'moved to'} position {j} would be built with {name or 'a block'}"
            if type(was.get(name)) is not type(m):  # Qwen2-MoE's mlp_only_layers: dense MLP or experts by index
                return f"{where} a {type(m).__name__}, not {type(was.get(name)).__name__}", indices
            params = [sorted(n for n, _ in x.named_parameters(recurse=False)) for x in (m, was[name])]
            if params[0] != params[1]:
                return f"{where} holding parameters {params[0]}, not {params[1]}", indices
            for key, value in vars(m).items():
                if key.startswith("_") or key in ("training", *indices) or not _setting(value):
                    continue
                if (before := vars(was[name]).get(key, value)) == value:
                    continue
                if type(value) is int and (before, value) == (i, j):  # an index under another name
                    indices.add(key)
                    continue
                return f"{where}.{key} = {value!r}, not {before!r}" if name else f"{where} {key} = {value!r}", indices
    return None, indices


def find_layers(model: nn.Module) -> str:
    """The name of the block list: the ModuleList of identical blocks holding linear layers with the most
    parameters. Alone, for what needs only the blocks (distill's layer maps), since `find` also wants a plain
    embedding table, which lowrank.embedding_rank factorizes."""
    best, best_params = None, -1
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0 or len({type(b) for b in m}) != 1:
            continue
        if sum(is_linear(x) for x in m[0].modules()) < 2:
            continue
        params = sum(p.numel() for p in m.parameters())
        if params > best_params:
            best, best_params = name, params
    if best is None:
        raise _refusal(model, "block list (a ModuleList of identical blocks holding linear layers)")
    return best


def _refusal(model: nn.Module, part: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"cannot map the layout of {type(model).__name__}: found no {part}; the suite finds blocks, "
        "attention projections (q/k/v or fused qkv) and MLP projections (gate/up/down, gate_up/down or "
        "fc_in/fc_out) by structure (compress/architecture.py lists the names it probes)")


def build_from_config(model_cls, config) -> nn.Module:
    """`model_cls(config)` without weights (meta device) where possible; on the CPU where building needs real
    values (GPT-2 / BERT with `pruned_heads` run prune_heads at init, which meta tensors cannot)."""
    config = copy.deepcopy(config)
    try:
        with torch.device("meta"):
            return model_cls(config)
    except NotImplementedError:
        with torch.no_grad():
            return model_cls(config)


def rebuild_mismatch(model: nn.Module) -> str | None:
    """Build the model's class from its (edited) config on the meta device and compare every parameter's
    shape with the model's: None when a stock `from_pretrained` rebuilds this structure, else the first
    difference ("name: (a, b) from the config, (c, d) in the model")."""
    fresh = build_from_config(type(model), model.config)
    have = dict(model.state_dict())
    for name, t in fresh.state_dict().items():
        if name in have and tuple(have[name].shape) != tuple(t.shape):
            return f"{name}: {tuple(t.shape)} from the config, {tuple(have[name].shape)} in the model"
    return None
