"""The checkpoint format: a directory with manifest.json plus weights.

    manifest.json       format version, kind (torch | onnx), task, parent, the pass and its resolved config,
                        structure to re-apply, quantization, the pass's figures, file hashes, versions, cache key
    config.json, model*.safetensors, tokenizer files      (kind torch: Hugging Face layout)
    model.onnx (+ model.onnx.data), config.json, tokenizer (kind onnx)

A checkpoint is written to a hidden temporary directory beside its target and renamed into place when
complete, so a crash never leaves something a later run could mistake for a finished checkpoint. Weights are
safetensors or ONNX only: nothing is unpickled."""
from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
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


def save(artifact: Artifact, path: str | os.PathLike, **manifest_fields) -> Path:
    """Write `artifact` as a checkpoint at `path` atomically and return the path.

    `manifest_fields` (pass, parent, key, ...) are stored in the manifest as given."""
    path = Path(path)
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
                if f.is_file() and f.name != MANIFEST:
                    shutil.copy2(f, tmp / f.name)
        else:
            raise CheckpointError(f"unknown artifact kind {artifact.kind!r}; expected one of {KINDS}")
        if artifact.tokenizer is not None:
            artifact.tokenizer.save_pretrained(tmp)
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
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        if path.exists():  # an outdated checkpoint (other key): replaced whole
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    artifact.path, artifact.manifest = path, manifest
    return path


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
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{mf} is corrupted: {exc}") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {manifest.get('format_version')}, this suite reads {FORMAT_VERSION}"
        )
    return manifest


def verify(path: str | os.PathLike, manifest: dict | None = None, *, hashes: bool = True) -> None:
    """Raise CheckpointError if a file is missing, truncated or (with `hashes`) altered."""
    path = Path(path)
    manifest = manifest or read_manifest(path)
    for name, meta in manifest["files"].items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
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


def _load_torch_model(path: Path, manifest: dict) -> nn.Module:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from .structure import apply_structure
    from .tasks import auto_class

    dtype = getattr(torch, manifest.get("dtype") or "float32")
    loader = auto_class(manifest["task"])
    structure = manifest.get("structure") or []
    if not structure:  # a stock architecture: the plain Hugging Face path
        model = loader.from_pretrained(path, dtype=dtype)
        return model.eval()
    config = AutoConfig.from_pretrained(path)
    model = loader.from_config(config, dtype=torch.float32)
    apply_structure(model, structure)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    really_missing = [k for k in missing if k not in tied]
    if really_missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path}: weights do not match the rebuilt structure "
            f"(missing {really_missing[:5]}, unexpected {unexpected[:5]})"
        )
    if dtype != torch.float32:
        model.to(dtype)
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
