"""The checkpoint format: a directory with manifest.json plus weights.

    manifest.json       format version, kind (torch | onnx), task, parent, the pass and its resolved config,
                        structure to re-apply, quantization, the pass's figures, file hashes, versions, cache key
    config.json, model*.safetensors, tokenizer files      (kind torch: Hugging Face layout)
    model.onnx (+ model.onnx.data), config.json, tokenizer (kind onnx)

A checkpoint is written to a hidden temporary directory beside its target and renamed into place when
complete, so a crash never leaves something a later run could mistake for a finished checkpoint. Weights are
safetensors or ONNX only: nothing is unpickled."""
from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import math
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, disk_error

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_CARD = "README.md"  # written beside the finished checkpoint (compress/model_card.py); no loader reads it
MODEL_CARD_TMP = f".{MODEL_CARD}.tmp"  # the card while it is written (a run killed then may leave it)
KINDS = ("torch", "onnx")
_VERSIONED = ["compress-suite", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime",
              "torch-pruning", "bitsandbytes", "safetensors"]


@dataclass
class Artifact:
    """A model moving through a pipeline: what a pass consumes and returns, and what `load` rebuilds."""

    kind: str  # "torch" | "onnx"
    task: str
    tokenizer: Any
    model: nn.Module | None = None  # kind torch
    onnx_dir: Path | None = None  # kind onnx: the folder holding model.onnx (+ external data) and config.json
    structure: list[dict] = field(default_factory=list)  # re-applied on load, in order (compress.structure)
    quantization: dict | None = None  # {"method": ..., ...} once quantized
    info: dict = field(default_factory=dict)  # the producing pass's figures (losses, steps, errors)
    path: Path | None = None  # the checkpoint directory it was loaded from or saved to
    manifest: dict | None = None

    def derive(self, **changes) -> "Artifact":
        """A copy for a pass's output: same lineage, fresh figures, no path until saved."""
        fields = dict(self.__dict__, info={}, path=None, manifest=None, structure=list(self.structure))
        fields.update(changes)
        return Artifact(**fields)


def library_versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_table(root: Path) -> dict[str, dict]:
    return {
        str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def model_dtype(model: nn.Module) -> str:
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return "float32"


def as_float32(model: nn.Module) -> nn.Module:
    """`model`, in place, with the float tensors of its own dtype (its first float parameter's) in float32 and the
    others as they are, as from_pretrained(dtype=float32) loads it: a class may keep some tensors in another dtype
    (Apertus' xIELU parameters in bfloat16), which model.float() would cast too, so that the result would differ
    from its reload."""
    own = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for tensor in store.values():
                if tensor is not None and tensor.dtype == own:
                    tensor.data = tensor.data.float()
    return model


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model`, in place, in `dtype` as from_pretrained(dtype=) loads it: each float parameter and buffer in the
    dtype its class makes it in under that default dtype (Llama's rotary inv_freq stays float32, which
    model.to(dtype) rounds, changing the logits), one the class does not make (a structure's) in `dtype`."""
    made = _made_dtypes(model, dtype)
    for prefix, module in model.named_modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None and tensor.is_floating_point():
                    tensor.data = tensor.data.to(made.get(f"{prefix}.{name}" if prefix else name, dtype))
    return model


def _made_dtypes(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Name -> dtype of each float tensor the model's class makes under default dtype `dtype`, as from_pretrained
    builds the model before loading its weights (here on the meta device: nothing allocated)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            fresh = type(model)(copy.deepcopy(model.config))  # a copy: building may set fields of the config
    except Exception:  # noqa: BLE001 - a class that reads values while built (Apertus' xIELU): every tensor in dtype
        return {}
    finally:
        torch.set_default_dtype(default)
    tensors = [*fresh.named_parameters(remove_duplicate=False), *fresh.named_buffers(remove_duplicate=False)]
    return {name: t.dtype for name, t in tensors if t.is_floating_point()}


def _ordinary_permissions(folder: Path) -> None:
    """Files as an ordinary write makes them (0666 less the umask): safetensors and onnx write weights 0600,
    which other users, or a container running as another user, could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, 0o666 & ~umask)


def save(artifact: Artifact, path: str | os.PathLike, **manifest_fields) -> Path:
    """Write `artifact` as a checkpoint at `path` atomically and return the path.

    `manifest_fields` (pass, parent, key, ...) are stored in the manifest as given. An existing checkpoint (or
    empty folder) at `path` is replaced; anything else there is refused, never deleted."""
    path = Path(path)
    here = Path.cwd()
    if path.resolve() in (here, *here.parents):
        raise CheckpointError(f"cannot save a checkpoint to {path}: it is the current folder or holds it; give a "
                              "new folder's path")
    if path.exists() and not (path.is_dir() and ((path / MANIFEST).is_file() or not any(path.iterdir()))):
        raise CheckpointError(f"cannot save a checkpoint to {path}: it exists and is not a checkpoint (no "
                              f"{MANIFEST}), so it is left as it is; give a new folder's path or remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is an ordinary directory
    try:
        if artifact.kind == "torch":
            if artifact.model is None:
                raise CheckpointError("a torch artifact without a model cannot be saved")
            artifact.model.save_pretrained(tmp, safe_serialization=True)
        elif artifact.kind == "onnx":
            if artifact.onnx_dir is None or not (Path(artifact.onnx_dir) / "model.onnx").exists():
                raise CheckpointError(f"ONNX artifact has no model.onnx in {artifact.onnx_dir}")
            for f in Path(artifact.onnx_dir).iterdir():
                if f.is_file() and f.name not in (MANIFEST, MODEL_CARD, MODEL_CARD_TMP):
                    shutil.copy2(f, tmp / f.name)
        else:
            raise CheckpointError(f"unknown artifact kind {artifact.kind!r}; expected one of {KINDS}")
        if artifact.tokenizer is not None:
            artifact.tokenizer.save_pretrained(tmp)
        _ordinary_permissions(tmp)
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": artifact.kind,
            "task": artifact.task,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **manifest_fields,
            "dtype": model_dtype(artifact.model) if artifact.model is not None else None,
            "structure": artifact.structure,
            "quantization": artifact.quantization,
            "info": artifact.info,
            "versions": library_versions(),
            "files": _file_table(tmp),
        }
        manifest["content"] = content_hash(json.loads(_strict_json(manifest, path)))  # as a reader will see it
        (tmp / MANIFEST).write_text(_strict_json(manifest, path))
        replace_folder(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        disk = disk_error(exc, path)
        if disk is not None and disk is not exc:  # safetensors' own error type, for a full or read-only disk
            raise disk from exc
        raise
    artifact.path, artifact.manifest = path, manifest
    return path


def replace_folder(new: Path, path: Path) -> None:
    """`new` renamed to `path`. An existing `path` (an outdated checkpoint) is renamed aside first and deleted
    after, so a kill at any moment leaves the old or the new folder whole at `path` (at worst with a hidden
    .<name>.old-<pid> beside it), never a half-deleted one."""
    old = path.with_name(f".{path.name}.old-{os.getpid()}") if path.exists() else None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # a leftover of this pid's earlier kill
        os.rename(path, old)
    try:
        os.rename(new, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)  # the old one back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _strict_json(manifest: dict, where: Path) -> str:
    """The manifest as strict JSON: a NaN or infinity (which plain json.dumps writes as bare NaN) is an error
    naming the field."""
    def non_finite(obj, at):  # (the field's dotted path, its value); keys may hold dots (module names)
        if isinstance(obj, float) and not math.isfinite(obj):
            return at, obj
        items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
        return next((found for k, v in items if (found := non_finite(v, f"{at}.{k}" if at else str(k)))), None)

    bad = non_finite(manifest, "")
    if bad:
        raise CheckpointError(f"{where}: the manifest field {bad[0]} is {bad[1]!r}, not a finite number; "
                              "the pass produced a non-finite figure (a diverged run?), so no checkpoint is written")
    return json.dumps(manifest, indent=2, default=str, allow_nan=False) + "\n"


def enclosing_checkpoint(path: str | os.PathLike) -> Path | None:
    """The checkpoint (a folder with a manifest) that `path` is or lies inside, else None. Files written there
    are not in its manifest, so the checkpoint would refuse to load afterwards."""
    path = Path(path).expanduser().resolve()
    return next((p for p in (path, *path.parents) if (p / MANIFEST).is_file()), None)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid in strict JSON")


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    mf = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a directory)")
    if not mf.exists():
        raise CheckpointError(
            f"{path} has no {MANIFEST}: it is not a finished compress checkpoint (for a plain save_pretrained "
            "folder use it as a model source instead)"
        )
    _member(path, MANIFEST)  # a folder, a pipe or a link out of the checkpoint is refused as any listed file is
    try:
        manifest = json.loads(mf.read_bytes().decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{mf} is corrupted: {exc}") from exc
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{mf} is corrupted: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:  # "1" printed as 1 read "format 1, ... reads 1"
        found = f"format {version!r}" if "format_version" in manifest else "no format_version"
        raise CheckpointError(f"{path} has checkpoint {found}, this suite reads format {FORMAT_VERSION}; re-run the "
                              "pass with this version of the suite")
    check_manifest(path, manifest)
    return manifest


# The file that must be in the table for each kind: what the loader starts from.
_REQUIRED_FILE = {"torch": "config.json", "onnx": "model.onnx"}
# Where from_pretrained reads a torch checkpoint's weights (the file save_pretrained writes, or its shards' index)
_TORCH_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_DTYPES = ("float32", "bfloat16", "float16", "float64")  # what model_dtype can record


def check_manifest(path: Path, manifest: dict) -> None:
    """The manifest's own consistency, before any file is opened: one message naming the field."""
    mf = Path(path) / MANIFEST
    kind, files, dtype = manifest.get("kind"), manifest.get("files"), manifest.get("dtype")
    if kind not in KINDS:
        raise CheckpointError(f"{mf}: kind is {kind!r}; expected one of {', '.join(KINDS)}")
    if not isinstance(manifest.get("task"), str):
        raise CheckpointError(f"{mf}: task is missing or not a string")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{mf}: the file table `files` is missing or empty; a checkpoint is trusted only "
                              "when every file it holds is listed with its size and sha256. Re-run the pass.")
    for name, meta in files.items():
        _check_name(path, name)
        if not (isinstance(meta, dict) and isinstance(meta.get("size"), int) and isinstance(meta.get("sha256"), str)):
            raise CheckpointError(f"{mf}: files[{name!r}] needs an integer size and a sha256 string, got {meta!r}")
    if _REQUIRED_FILE[kind] not in files:
        raise CheckpointError(f"{mf}: kind {kind} needs {_REQUIRED_FILE[kind]} in the file table, and it is not "
                              "there (wrong kind, or an incomplete checkpoint)")
    if kind == "torch" and not any(name in files for name in _TORCH_WEIGHTS):
        raise CheckpointError(f"{mf}: kind torch needs its weights ({' or '.join(_TORCH_WEIGHTS)}) in the file "
                              "table, and neither is there (an incomplete checkpoint); re-run the pass")
    if dtype is not None and dtype not in _DTYPES:  # (bool, int8, float8: a traceback building or running the model)
        raise CheckpointError(f"{mf}: dtype {dtype!r} is not one a model loads in ({', '.join(_DTYPES)})")
    for name in ("parent", "pass", "info"):  # not in the content hash; lineage and passes read them as objects
        if manifest.get(name) is not None and not isinstance(manifest[name], dict):
            raise CheckpointError(f"{mf}: {name} must be a JSON object, got {type(manifest[name]).__name__} "
                                  f"{manifest[name]!r:.60}; the manifest was edited. Re-run the pass.")
    structure = manifest.get("structure") or []
    if not isinstance(structure, list) or not all(isinstance(e, dict) for e in structure):
        raise CheckpointError(f"{mf}: structure must be a list of {{\"type\": ...}} entries")
    if "content" not in manifest:  # deleting it would otherwise skip the check below
        raise CheckpointError(f"{mf}: it has no content hash (a checkpoint written before 2026-12-07, or the field "
                              "was removed), so its kind, task, dtype, structure and file table cannot be trusted; "
                              "re-run the pass")
    if manifest["content"] != content_hash(manifest):
        raise CheckpointError(f"{mf}: its kind, task, dtype, structure, quantization or file table was changed "
                              "after the checkpoint was written (its content hash differs); re-run the pass")


def content_hash(manifest: dict) -> str:
    """What a checkpoint holds, as a child sees it: its files' hashes and how they load (no timestamps), so
    a recomputed parent with other weights changes its children's cache keys."""
    held = {k: manifest.get(k) for k in ("kind", "task", "dtype", "structure", "quantization", "files")}
    return hashlib.sha256(json.dumps(held, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _check_name(path: Path, name: str) -> None:
    """A file-table name is a plain relative path inside the checkpoint folder (checked before opening)."""
    if not name or Path(name).is_absolute() or ".." in Path(name).parts or "\\" in name or "\0" in name:
        raise CheckpointError(f"{Path(path) / MANIFEST}: file name {name!r} is not a plain relative path inside "
                              "the checkpoint folder; refusing to open it")


def _member(path: Path, name: str) -> Path:
    """The regular file `name` inside `path`, refusing symlinks that leave the folder and non-regular files."""
    f = path / name
    try:
        st = os.stat(f)  # follows links: what open() would read
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing") from None
    except OSError as exc:  # e.g. a listed "config.json/x", config.json being no folder
        raise CheckpointError(f"checkpoint {path}: {name} cannot be read ({exc.strerror}); the manifest names a "
                              "file the folder cannot hold. Re-run the pass or copy the checkpoint again.") from None
    if not f.resolve().is_relative_to(path.resolve()):
        raise CheckpointError(f"checkpoint {path}: {name} is a link to {f.resolve()}, outside the checkpoint "
                              "folder; refusing to read it")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"checkpoint {path}: {name} is not a regular file (device, pipe or folder); "
                              "refusing to read it")
    return f


def _unlisted(path: Path, files: dict) -> list[str]:
    """Files in the folder that the table does not list (any of them could be read by a loader)."""
    on_disk = [p for p in path.rglob("*") if p.is_symlink() or not p.is_dir()]
    names = (p.relative_to(path).as_posix() for p in on_disk)
    return sorted(n for n in names if n not in (MANIFEST, MODEL_CARD, MODEL_CARD_TMP) and n not in files)


def verify(path: str | os.PathLike, manifest: dict | None = None, *, hashes: bool = True) -> None:
    """Raise CheckpointError unless the folder holds exactly the files of the manifest's table, each a regular
    file inside the folder with the listed size and (with `hashes`) sha256, every shard a torch index names too."""
    path = Path(path)
    manifest = manifest or read_manifest(path)
    check_manifest(path, manifest)
    extra = _unlisted(path, manifest["files"])
    if extra:
        pycache = any(n.startswith("__pycache__/") for n in extra)
        raise CheckpointError(f"checkpoint {path} holds files its manifest does not list: {', '.join(extra[:5])}; "
                              "refusing to load them. Remove them or re-run the pass." + (
                                  f" (Python writes {path / '__pycache__'} when edge_runner.py is imported from "
                                  "the folder; PYTHONDONTWRITEBYTECODE=1 prevents it.)" if pycache else ""))
    for name, meta in manifest["files"].items():
        f = _member(path, name)
        if f.stat().st_size != meta["size"]:
            raise CheckpointError(
                f"checkpoint {path} is corrupted: {name} has {f.stat().st_size} bytes, the manifest says "
                f"{meta['size']} (truncated copy?). Re-run the pass or copy the checkpoint again."
            )
        if hashes and _sha256(f) != meta["sha256"]:
            raise CheckpointError(
                f"checkpoint {path} is corrupted: {name} does not match its sha256 in the manifest. "
                "Re-run the pass or copy the checkpoint again."
            )
    _check_shards(path, manifest["files"])


def _check_shards(path: Path, files: dict) -> None:
    """Every shard a torch checkpoint's index names is in the table: from_pretrained reads them all."""
    index = _TORCH_WEIGHTS[1]
    if index not in files:
        return
    try:
        shards = set(json.loads((path / index).read_bytes())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise CheckpointError(f"checkpoint {path}: {index} is not a safetensors index ({type(exc).__name__}: "
                              f"{exc}); re-run the pass") from None
    missing = sorted(str(s) for s in shards if s not in files)
    if missing:
        raise CheckpointError(f"checkpoint {path}: {index} names shards the manifest does not list: "
                              f"{', '.join(missing[:5])} (an incomplete checkpoint); re-run the pass or copy the "
                              "checkpoint again")


def _load_torch_model(path: Path, manifest: dict) -> nn.Module:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from .structure import apply_structure
    from .tasks import auto_class

    dtype = getattr(torch, manifest.get("dtype") or "float32")
    loader = auto_class(manifest["task"])
    structure = manifest.get("structure") or []
    if not structure:  # a stock architecture: the plain Hugging Face path
        model, loaded = loader.from_pretrained(path, dtype=dtype, output_loading_info=True)
        # from_pretrained initializes what the weights lack at random (a manifest without its structure)
        if loaded["missing_keys"] or loaded["unexpected_keys"] or loaded["mismatched_keys"]:
            raise CheckpointError(
                f"checkpoint {path}: weights do not match the model its config and manifest describe (missing "
                f"{sorted(loaded['missing_keys'])[:5]}, unexpected {sorted(loaded['unexpected_keys'])[:5]}); its "
                f"{MANIFEST} lacks structure the weights need, or is from another checkpoint. Re-run the pass."
            )
        return model.eval()
    config = AutoConfig.from_pretrained(path)
    model = loader.from_config(config, dtype=torch.float32)
    state: dict[str, torch.Tensor] = {}
    for name in sorted(manifest["files"]):  # only listed files (verify refused any other)
        if name.endswith(".safetensors"):
            state.update(load_file(path / name))
    try:  # a damaged entry (a missing key, a module that does not exist, a rank larger than stored)
        apply_structure(model, structure)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except CheckpointError as exc:
        raise CheckpointError(f"{path / MANIFEST}: {exc}") from exc
    except (KeyError, AttributeError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{path / MANIFEST}: its structure entries do not fit the model and weights "
                              f"({type(exc).__name__}: {detail}); the manifest is damaged. Re-run the pass.") from exc
    model.tie_weights()
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    really_missing = [k for k in missing if k not in tied]
    if really_missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path}: weights do not match the rebuilt structure "
            f"(missing {really_missing[:5]}, unexpected {unexpected[:5]})"
        )
    if dtype != torch.float32:
        cast_model(model, dtype)
    return model.eval()


def load(path: str | os.PathLike, *, verify_hashes: bool = True) -> Artifact:
    """Rebuild a checkpoint (model and tokenizer) from its directory alone."""
    from transformers import AutoTokenizer

    path = Path(path)
    manifest = read_manifest(path)
    verify(path, manifest, hashes=verify_hashes)
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    art = Artifact(
        kind=manifest["kind"],
        task=manifest["task"],
        tokenizer=tokenizer,
        structure=manifest.get("structure") or [],
        quantization=manifest.get("quantization"),
        info=manifest.get("info") or {},
        path=path,
        manifest=manifest,
    )
    if art.kind == "torch":
        art.model = _load_torch_model(path, manifest)
    elif art.kind == "onnx":
        art.onnx_dir = path
    else:
        raise CheckpointError(f"{path}: unknown checkpoint kind {art.kind!r}")
    return art


def load_source(source: str, task: str, *, label_names: list[str] | None = None,
                trust_remote_code: bool = False) -> Artifact:
    """Any model source as an Artifact: a compress checkpoint through `load` (its structure re-applied, its
    files verified), a builtin, hub or save_pretrained source through `models.load_model`."""
    from .errors import ModelSourceError
    from .models import load_model, resolve_source

    kind, location = resolve_source(source)
    if kind == "checkpoint":
        art = load(location)
        if art.task != task:
            raise ModelSourceError(f"checkpoint {location} is for task {art.task!r}, not {task!r}")
        if art.kind != "torch":
            raise ModelSourceError(f"checkpoint {location} is an ONNX model; a torch model is needed here "
                                   "(use the checkpoint the export started from)")
        return art
    model, tok = load_model(source, task, label_names=label_names, trust_remote_code=trust_remote_code)
    return Artifact(kind="torch", task=task, tokenizer=tok, model=model)
