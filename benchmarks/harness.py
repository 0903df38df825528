"""`measure`: one checkpoint (or model source) on one backend, in its own subprocess, as one JSON record.

The parent side (this module) resolves the target, checks the backend, tokenizes the eval data once into an
.npz the worker reads, makes sure the baseline's reference outputs exist (for agreement), then starts
`python -m benchmarks.worker` with explicit thread settings and adds the static figures (file size, machine,
settings, load average) to what the worker measured."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from compress.errors import CompressInputError, ConfigError, DataSourceError, ModelSourceError

from .config import BenchmarkConfig
from .machine import machine_record
from .roofline import weight_bytes_per_token
from .worker_spec import Backend, WorkerSpec

HARNESS_VERSION = 1
REFERENCE_BACKEND = Backend("torch", "cpu")  # where the baseline's reference outputs are made ...
ONNX_REFERENCE_BACKEND = Backend("ort", "cpu")  # ... and those of an ONNX baseline, which torch cannot load
_WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".onnx.data", ".onnx_data", ".bin", ".data")


@dataclass
class Target:
    ref: str  # what the user named
    path: Path  # the directory with the weights
    kind: str  # torch | onnx | gguf
    loader: Literal["checkpoint", "source"]  # how the worker loads a torch model
    task: str
    key: str  # changes when the model changes
    quantization: dict | None = None
    exported_from: str | None = None


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _task_from_config(path: Path) -> str | None:
    try:
        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError):
        return None
    for arch in archs:
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
        if arch.endswith("ForSequenceClassification"):
            return "sequence-classification"
    return "feature-extraction" if archs else None


@functools.lru_cache(maxsize=64)
def _verified(path: str, manifest_stamp: int) -> None:
    """compress.checkpoint.verify (every file, its size and hash), once per checkpoint and manifest in this
    process: a target is resolved several times per row."""
    from compress.checkpoint import verify

    verify(path)


def resolve_target(target: str | os.PathLike, task: str | None = None) -> Target:
    """What `target` is: a compress checkpoint (torch or onnx), a bare ONNX folder, a GGUF file (llama.cpp's
    format, a peer's), or a model source."""
    from compress.checkpoint import read_manifest
    from compress.models import check_task, file_stamp, resolve_source, source_fingerprint

    ref = str(target)
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".gguf":  # a peer's format: llama.cpp runs it (llamacpp-cpu)
        if task not in (None, "causal-lm"):
            raise ModelSourceError(f"{path} is a GGUF file, a causal LM; it cannot be measured as {task}")
        return Target(ref, path, "gguf", "checkpoint", "causal-lm",
                      _hash("gguf", str(path.resolve()), file_stamp(path)))
    if path.is_dir() and (path / "manifest.json").exists():
        m = read_manifest(path)
        _verified(str(path.resolve()), (path / "manifest.json").stat().st_mtime_ns)  # measured = what was written
        if task and m["task"] != task:
            raise ModelSourceError(f"{path} is a {m['task']} checkpoint, not {task}")
        return Target(ref, path, m["kind"], "checkpoint", m["task"], m.get("key") or _hash(m.get("files")),
                      m.get("quantization"))
    if path.is_dir() and (path / "model.onnx").exists():
        task = task or _task_from_config(path)
        if not task:
            raise ModelSourceError(f"{path}: cannot tell the task of this ONNX folder; pass --task")
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise ModelSourceError(f"{path}: no tokenizer in this ONNX folder (tokenizer.json or "
                                   "tokenizer_config.json) to make its inputs; save the model's tokenizer into it "
                                   "(tokenizer.save_pretrained)")
        return Target(ref, path, "onnx", "checkpoint", task, _hash("onnx", source_fingerprint(str(path))))
    if path.is_dir() and not (path / "config.json").is_file():
        steps = sorted(p.name for p in path.iterdir() if (p / "manifest.json").is_file())
        raise ModelSourceError(f"{ref}: not a checkpoint, an ONNX folder or a model folder (no manifest.json, "
                               "model.onnx or config.json)" + (f"; it holds checkpoints: give one, e.g. "
                                                               f"{path / steps[-1]}" if steps else ""))
    _, location = resolve_source(ref)
    location = Path(location)
    task = task or (_task_from_config(location) if location.is_dir() else None)
    if not task:
        raise ModelSourceError(f"{ref}: cannot tell the model's task from its config.json; pass --task")
    check_task(ref, task)  # here, not in the worker: an encoder as a causal LM (or as an LM's baseline) is bad input
    return Target(ref, location, "torch", "source", task, _hash("source", source_fingerprint(ref), task))


def resolve_baseline(baseline: str | os.PathLike, task: str) -> Target:
    """The baseline of a `task` target: a model torch or ONNX Runtime runs (its reference outputs are made there,
    and its tokenizer makes every row's inputs); a GGUF file has neither."""
    base = resolve_target(baseline, task)
    if base.kind == "gguf":
        raise ConfigError(f"--baseline {baseline}: a GGUF file cannot be the baseline (no tokenizer to make the "
                          "inputs, no torch or ONNX Runtime to make the reference outputs); give the model it was "
                          "converted from, e.g. --baseline builtin:smollm2-135m")
    return base


def weights_size(path: Path) -> int:
    if path.is_file():  # a GGUF file holds everything
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES))


# the inputs of quantized ops that hold scales and zero points, not weights
QUANT_METADATA_INPUTS = {"MatMulNBits": (2, 3), "GatherBlockQuantized": (2, 3), "DequantizeLinear": (1, 2),
                         "QuantizeLinear": (1, 2), "MatMulInteger": (2, 3), "DynamicQuantizeMatMul": (2, 3, 4)}
# ... and those read through a Cast or a Mul, by the names ONNX Runtime's quantizers and ours give them
QUANT_METADATA_SUFFIXES = ("_scale", "_scale_fp16", "_zero_point")
# compress/quant/ort.py's per-block offsets (<node>/offsets_fp16), block-sum matrices and the Concat that appends
# the block sums to a projection's input (its offsets folded into the weights as rows past x's K)
OFFSETS = "/offsets"


def onnx_params(path: Path) -> int:
    """Elements of the graph's weight initializers, quantized weights counted once each (the model's parameters,
    as torch counts them). Not parameters: quantization's scales, zero points and per-block offsets, integer
    shape / axis constants, and the rotary cos / sin caches of a fused graph, or the positions and inv_freq it
    computes them from, and its ALiBi slopes (torch derives them from the config too)."""
    import onnx

    from compress.onnx_tools import ATTENTION_BIAS, gqa_input_nodes

    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    skip = gqa_input_nodes(model)[1] | gqa_input_nodes(model, ATTENTION_BIAS)[1]
    # packed 4-bit weights hold two a byte: count the weights, not the bytes
    counts: dict[str, int] = {}  # MatMulNBits' packed B -> N * K
    two_a_byte: set[str] = set()  # 4-bit GatherBlockQuantized tables stored as uint8
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    for n in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        quant_inputs = QUANT_METADATA_INPUTS.get(n.op_type, ())
        skip.update(n.input[i] for i in quant_inputs if len(n.input) > i)
        if n.op_type == "MatMulNBits":
            k, widened = int(attrs["K"]), producer.get(n.input[0])
            if widened is not None and widened.op_type == "Concat" and OFFSETS in widened.name:
                k = dims[producer[widened.input[1]].input[1]][0]  # offsets folded in as rows: x's K, the ones' rows
            counts[n.input[1]] = int(attrs["N"]) * k
        elif n.op_type == "GatherBlockQuantized" and attrs.get("bits", 4) == 4:
            two_a_byte.add(n.input[0])
    total = 0
    for init in model.graph.initializer:
        if (init.name in skip or init.name.endswith(QUANT_METADATA_SUFFIXES) or OFFSETS in init.name
                or init.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)):
            continue
        n = 1
        for d in init.dims:
            n *= d
        if init.name in counts:
            n = counts[init.name]
        elif init.name in two_a_byte and init.data_type == onnx.TensorProto.UINT8:
            n *= 2
        total += n if len(init.dims) else 0
    return total


def gguf_params(path: Path) -> int:
    """Elements of a GGUF file's tensors (each quantized weight counts once)."""
    from gguf import GGUFReader

    return sum(int(np.prod(t.shape, dtype=np.int64)) for t in GGUFReader(str(path)).tensors)


# ----------------------------------------------------------------------------- backends
def backend_problem(backend: Backend | str) -> str | None:
    """Why `backend` cannot run here (None when it can)."""
    import importlib.util

    backend = Backend.parse(backend)
    if backend.runtime == "llamacpp":
        if importlib.util.find_spec("llama_cpp") is None:
            return (f"{backend}: llama-cpp-python is not installed (a benchmark-only extra that compiles llama.cpp, "
                    "7 to 25 minutes on 2 cores: pip install -e '.[llama]')")
        return None
    if backend.runtime == "torch":
        if backend.device == "cpu":
            return None
        import torch

        return None if torch.cuda.is_available() else f"{backend}: CUDA is not available on this machine"
    try:
        import onnxruntime
    except ImportError:
        return f"{backend}: onnxruntime is not installed"
    if not (Path(__file__).resolve().parent.parent / "compress" / "edge.py").exists():
        return f"{backend}: compress.edge (the ONNX Runtime runner) is not part of this version"
    if backend.device == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return f"{backend}: onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu on a CUDA machine)"
    return None


def _export_on_the_fly(t: Target, work_dir: Path) -> Target | dict:
    """The ONNX export of torch target `t`, cached by its key; else what the record says instead:
    {"skipped": why} when there is no export for it here, {"error": why} when the export failed."""
    from compress import checkpoint, passes

    if "export" not in passes.available():
        return {"skipped": "the export pass is not available in this version, so a torch model cannot run on "
                           "ONNX Runtime"}
    out = work_dir / "onnx" / t.key
    if not (out / "manifest.json").exists():
        from compress.checkpoint import Artifact
        from compress.models import load_model
        from compress.passes.base import PassContext

        try:
            if t.loader == "checkpoint":
                art = checkpoint.load(t.path)
            else:
                model, tok = load_model(t.ref, t.task)
                art = Artifact(kind="torch", task=t.task, tokenizer=tok, model=model)
            exporter = passes.get("export")()
            ctx = PassContext(source=t.ref, task=t.task, scratch=work_dir / "scratch", show_progress=False)
            ctx.scratch.mkdir(parents=True, exist_ok=True)
            if art.quantization and not exporter.accepts_quantized_input():
                return {"skipped": "export on the fly: the export pass does not take quantized models "
                                   f"({art.quantization})"}
            checkpoint.save(exporter.run(art, ctx), out, key=t.key, source=t.ref,
                            parent={"path": str(t.path), "key": t.key},
                            **{"pass": {"name": "export", "config": exporter.config.model_dump(mode="json")}})
        except CompressInputError as exc:
            return {"error": f"export on the fly failed: {exc}"}  # e.g. damaged weights: as on torch, an error
    return Target(t.ref, out, "onnx", "checkpoint", t.task, t.key, t.quantization, exported_from=str(t.path))


# ----------------------------------------------------------------------------- inputs
def _tokenizer(t: Target):
    from transformers import AutoTokenizer

    from compress.models import load_tokenizer, prepare_tokenizer

    if t.loader == "source":
        return load_tokenizer(t.ref)
    return prepare_tokenizer(AutoTokenizer.from_pretrained(t.path))


def build_inputs(t: Target, s: BenchmarkConfig, tok=None) -> dict[str, np.ndarray]:
    """The eval and latency inputs of `t` under resolved settings `s`, as int64 arrays (LMs: the eval
    token stream "tokens", each extra corpus's as "extra.<name>", the latency prompt). `tok`: `t`'s
    tokenizer when the caller has it loaded already."""
    from compress.data import lm_windows, load_dataset

    tok = tok or _tokenizer(t)
    lat = s.latency
    if t.task == "causal-lm":
        def stream(spec, field: str) -> np.ndarray:  # the documents joined by EOS, cut at max_tokens
            ids = lm_windows(tok, load_dataset(spec, "eval"), 1, spec.max_tokens).view(-1).numpy()
            if len(ids) < 2:  # perplexity scores each token from the ones before it: one token scores nothing
                raise DataSourceError(f"{field}: {spec.source} ({spec.split}) gives {len(ids)} token(s); perplexity "
                                      "needs at least 2; give eval data with some text")
            return ids.astype(np.int64)

        tokens = stream(s.data, "eval data (--data, benchmark.data or data.eval)")
        out = {"tokens": tokens, **{f"extra.{name}": stream(spec, f"benchmark.extra_data.{name}")
                                    for name, spec in s.extra_data.items()}}
        if lat:
            need = lat.batch * lat.prompt_tokens
            reps = -(-need // len(tokens))
            out["prompt"] = np.tile(tokens, reps)[:need].reshape(lat.batch, lat.prompt_tokens)
        return out
    ds = load_dataset(s.data, "eval")
    enc = _encode(tok, ds.texts, padding=True, max_length=s.data.max_length)
    out = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
    if ds.labels is not None and t.task == "sequence-classification":
        out["labels"] = _labels_by_name(t, s.data, ds)
        _check_labels(t, s.data, out["labels"])
    if lat:
        fixed = _encode(tok, ds.texts[: lat.throughput_batch], padding="max_length", max_length=lat.seq_tokens)
        out["lat_ids"] = fixed["input_ids"].astype(np.int64)
        out["lat_mask"] = fixed["attention_mask"].astype(np.int64)
    return out


def _encode(tok, texts: list[str], padding, max_length: int):
    """An encoder's inputs, padded on the right whatever the tokenizer's padding_side: a row's real tokens then
    start at position 0 (the [CLS] a classifier pools; the models get no position ids from the mask), so its
    outputs do not depend on how much padding its batch has, and the worker can trim a batch's padding
    columns from the right."""
    return tok(texts, padding=padding, padding_side="right", truncation=True, max_length=max_length,
               return_tensors="np")


def _labels_by_name(t: Target, spec, ds) -> np.ndarray:
    """The eval labels as the classifier's class ids. Named labels (a JSONL's "sport") go by the names in its
    id2label: their index among the names in the file matches the model's classes only by chance."""
    labels = np.asarray(ds.labels, dtype=np.int64)
    names = ds.label_names or []
    try:
        id2label = json.loads((t.path / "config.json").read_text()).get("id2label") or {}
    except (OSError, json.JSONDecodeError):
        return labels
    ids = {str(name): int(i) for i, name in id2label.items()}
    if all(n.isdigit() for n in names) or all(re.fullmatch(r"LABEL_\d+", n) for n in ids):
        return labels  # numbered labels, or a model without class names: ids as they are
    unknown = sorted(set(names) - set(ids))
    if unknown:
        raise DataSourceError(f"eval data {spec.source}: labels {unknown} are not classes of {t.ref} "
                              f"({', '.join(ids)}); give eval data labelled with the model's classes (--data, "
                              "benchmark.data or data.eval)")
    return np.asarray([ids[names[i]] for i in labels], dtype=np.int64)


def _check_labels(t: Target, spec, labels: np.ndarray) -> None:
    """DataSourceError when the eval labels go past the classifier's outputs: it could never predict those
    classes, so its accuracy and macro-F1 (over its own classes) would mean nothing."""
    try:
        config = json.loads((t.path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return
    if not any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        return  # a bare encoder gets a head at load time (a pipeline's source before its fine-tuning)
    classes = len(config.get("id2label") or {}) or 2  # transformers leaves out its default of 2 labels
    if len(labels) and labels.max() >= classes:
        raise DataSourceError(f"eval data {spec.source}: labels go up to {labels.max()} ({labels.max() + 1} "
                              f"classes) but {t.ref} has {classes} outputs; give eval data labelled with the "
                              "model's classes (--data, benchmark.data or data.eval)")


def _save_inputs(arrays: dict[str, np.ndarray], work_dir: Path) -> tuple[Path, str]:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    h = digest.hexdigest()[:16]
    path = work_dir / "inputs" / f"{h}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
    return path, h


# ----------------------------------------------------------------------------- the subprocess
def _show_progress(show: bool | None) -> bool:
    if show is not None:
        return show
    return os.environ.get("COMPRESS_PROGRESS", "1") != "0" and sys.stderr.isatty()


def _worker_spec(t: Target, backend: Backend, s: BenchmarkConfig, inputs: Path, label: str, show: bool,
                 **options) -> WorkerSpec:
    """What the worker runs: `t` on `backend` under resolved settings `s` (`options`: WorkerSpec's others)."""
    return WorkerSpec(target=str(t.path if t.loader == "checkpoint" else t.ref), loader=t.loader, task=t.task,
                      backend=backend, settings=s.model_dump(mode="json"), inputs=str(inputs), label=label,
                      show_progress=show, **options)


def score_in_process(t: Target, s: BenchmarkConfig, work_dir: Path) -> dict:
    """The quality figures of `t` under resolved settings `s`, scored in this process by the worker's own code
    on the CPU backend that runs the checkpoint as it is: no timing, no baseline, no process start (a search's
    screen). `work_dir` keeps the prepared inputs."""
    from . import worker

    backend = Backend("ort" if t.kind == "onnx" else "torch", "cpu")
    inputs, _ = _save_inputs(build_inputs(t, s), work_dir)
    return worker.run(_worker_spec(t, backend, s, inputs, "screen", False, latency=False)).get("quality", {})


def run_worker(spec: WorkerSpec, threads: int, timeout_s: int) -> dict:
    """Run one worker process; its record, or {"error": ...}."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", PYTHONHASHSEED="0")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else root
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_file.write_text(spec.to_json())
        # The worker runs in the caller's folder, so relative paths (a checkpoint, runs/<name>/...) mean what
        # they mean here, with the suite's root first on its path, so no folder there shadows its packages.
        boot = (f"import sys; sys.path.insert(0, {root!r}); from benchmarks.worker import main; "
                "sys.exit(main(sys.argv[1:]))")
        try:
            proc = subprocess.run([sys.executable, "-c", boot, str(spec_file), str(out_file)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
                                  if not spec.show_progress else None, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"the measurement took longer than timeout_s={timeout_s} s"}
        if out_file.exists():
            return json.loads(out_file.read_text())
        tail = (proc.stderr or "")[-3000:]
        code = proc.returncode
        how = f"exited with code {code}" if code >= 0 else f"was killed by {signal.Signals(-code).name}" + (
            " (often the kernel's out-of-memory killer)" if code == -signal.SIGKILL else "")
        if tail:
            how += ":\n" + tail
        else:  # stderr goes to the terminal while progress bars show; else it was captured, and is empty
            how += " (its output is above)" if spec.show_progress else ", with nothing on stderr"
        return {"error": f"the measuring process {how}"}


def _reference_backend(baseline: Target) -> Backend:
    return ONNX_REFERENCE_BACKEND if baseline.kind == "onnx" else REFERENCE_BACKEND


def _reference_path(baseline: Target, inputs_hash: str, s: BenchmarkConfig, work_dir: Path) -> Path:
    # Each extra corpus's seq_len sets its scoring windows, as window / stride do the main data's; the inputs
    # (the token streams) stay the same when it changes, so it is part of the key too.
    extra_windows = {name: d.seq_len for name, d in s.extra_data.items()}
    key = _hash(baseline.key, inputs_hash, s.window, s.stride, s.kl_top_k, s.eval_batch, extra_windows)
    return work_dir / "refs" / f"{key}.npz"


def _reference(baseline: Target, inputs: Path, inputs_hash: str, s: BenchmarkConfig, work_dir: Path,
               show: bool) -> Path | dict:
    """The baseline's outputs on these inputs (top-1 and top-k log-probs / labels / embeddings), made once."""
    ref = _reference_path(baseline, inputs_hash, s, work_dir)
    if ref.exists():
        return ref
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(ref.stem + f".tmp{os.getpid()}.npz")
    spec = _worker_spec(baseline, _reference_backend(baseline), s, inputs, "baseline reference", show,
                        write_reference=str(tmp), latency=False, extra_data=True)
    out = run_worker(spec, s.threads, s.timeout_s)
    if "error" in out:
        return out
    tmp.replace(ref)
    return ref


def _header(t: Target, backend: Backend, s: BenchmarkConfig, label: str | None, baseline: Target | None) -> dict:
    return {"label": label or t.ref, "target": t.ref, "kind": t.kind, "task": t.task, "backend": str(backend),
            "key": t.key, "baseline": baseline.ref if baseline else None,
            "baseline_key": baseline.key if baseline else None, "settings": s.model_dump(mode="json"),
            "threads": s.threads, "harness_version": HARNESS_VERSION}


def measure(target, *, backend: Backend | str, settings: BenchmarkConfig, baseline=None, task: str | None = None,
            label: str | None = None, data=None, work_dir: str | os.PathLike | None = None,
            show_progress: bool | None = None) -> dict:
    """Measure `target` (checkpoint dir, ONNX folder or model source) on `backend` in a fresh process.

    Returns one JSON-able record, {"skipped": reason, ...} when the backend cannot run it here, or
    {"error": ..., ...} when the measurement failed. `baseline` (a target) enables teacher-agreement;
    `data` is the eval DataSpec when `settings.data` is unset; `work_dir` caches inputs, references and
    on-the-fly exports (default: the user cache)."""
    from compress.runtime import cache_dir

    backend = Backend.parse(backend)
    work_dir = Path(work_dir) if work_dir else Path(cache_dir()) / "bench"
    t = resolve_target(target, task)
    base = resolve_baseline(baseline, t.task) if baseline is not None else None
    s = settings.resolved(t.task, data)
    _check_positions(t, s)
    record = _header(t, backend, s, label, base)
    record["machine"] = machine_record()
    problem = backend_problem(backend) or _kind_problem(t, backend)
    if problem:
        return {**record, "skipped": problem}
    if t.kind == "gguf" and base is None:
        return {**record, "error": f"{t.ref}: a GGUF file is measured on the token ids of its baseline's tokenizer "
                                   "(the model it was converted from); name the baseline (compress bench --baseline)"}
    run_t = t
    if t.kind == "torch" and backend.runtime == "ort":
        exported = _export_on_the_fly(t, work_dir)
        if isinstance(exported, dict):
            return {**record, **{k: f"{backend}: {why}" for k, why in exported.items()}}
        run_t = exported
        record["exported_on_the_fly"] = str(exported.path)
    show = _show_progress(show_progress)
    tok = _tokenizer(base if t.kind == "gguf" else t)  # loaded once: the inputs and the prompts need it
    arrays = build_inputs(t, s, tok)
    inputs, inputs_hash = _save_inputs(arrays, work_dir)
    record["inputs_sha"] = inputs_hash
    spec = _worker_spec(run_t, backend, s, inputs, record["label"], show, extra_data=True,
                        quality=bool(set(s.quality) & _applicable(t.task)),
                        generate=_generation_job(tok, s) if s.generations else None)
    notes, self_ref = [], None
    if t.task == "sequence-classification" and "accuracy" in s.quality and "labels" not in arrays:
        notes.append(f"accuracy not computed: eval data {s.data.source} ({s.data.split}) has no labels; give "
                     "labelled data (--data, benchmark.data: a .jsonl with a label field, or builtin:bbc-news)")
    if base is not None and "teacher-agreement" in s.quality:
        ref_path = _reference_path(base, inputs_hash, s, work_dir)
        if base.key == t.key and backend == _reference_backend(base) and not ref_path.exists():
            # The baseline itself: one run measures it and writes the reference the others compare with.
            self_ref = ref_path
            self_ref.parent.mkdir(parents=True, exist_ok=True)
            spec = replace(spec, self_reference=True,
                           write_reference=str(self_ref.with_name(self_ref.stem + ".tmp.npz")))
        # (a GGUF target's inputs are the baseline's own, made with its tokenizer above: nothing to compare)
        elif t.kind != "gguf" and _save_inputs(build_inputs(base, s), work_dir)[1] != inputs_hash:
            notes.append("teacher-agreement skipped: the baseline tokenizes the eval data differently")
        else:
            ref = _reference(base, inputs, inputs_hash, s, work_dir, show)
            if isinstance(ref, dict):
                return {**record, "error": "baseline reference: " + ref["error"]}
            spec = replace(spec, reference=str(ref))
    record["loadavg_before"] = list(os.getloadavg())
    start = time.time()
    out = run_worker(spec, s.threads, s.timeout_s)
    record["loadavg_after"] = list(os.getloadavg())
    record["seconds"] = round(time.time() - start, 2)
    record["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start))
    if "error" in out:
        return {**record, **out}
    if self_ref is not None:
        Path(spec.write_reference).replace(self_ref)
    generated = out.pop("generated_ids", None)
    record.update(out)
    record["quality"] = _filter_quality(out.get("quality", {}), s.quality)
    if generated is not None:
        record["generations"] = _generation_texts(tok, s, generated)
    record["size_bytes"] = weights_size(run_t.path)
    if t.task == "causal-lm":  # for the roofline: decode speed against bandwidth / bytes per token
        record["weight_bytes_per_token"] = weight_bytes_per_token(run_t.path, run_t.kind)
    if run_t.kind == "onnx":
        record["params"] = onnx_params(run_t.path)
    elif run_t.kind == "gguf":
        record["params"] = gguf_params(run_t.path)
    record["quantization"] = t.quantization
    if notes:
        record["notes"] = notes
    return record


def _check_positions(t: Target, s: BenchmarkConfig) -> None:
    """ConfigError naming the option when a sequence the measurement feeds `t` is longer than the positions it
    holds (the worker failed: "IndexError: index out of range in self" past a learned table, ONNX Runtime's
    rotary cache too short in a fused graph exported with max_length)."""
    from compress import onnx_tools
    from compress.models import max_tokens

    try:
        if t.kind == "onnx":
            limit, where = onnx_tools.graph_max_length(t.path), "its graph (export.max_length) or config.json"
        else:
            limit = max_tokens(json.loads((t.path / "config.json").read_text())) if t.path.is_dir() else None
            where = "max_position_embeddings / n_positions in its config.json"
    except Exception:  # noqa: BLE001 - no readable config or graph (a DecodeError): the worker says what is wrong
        return
    if limit is None:
        return
    lat, lengths = s.latency, []
    if t.task == "causal-lm":
        lengths.append(("benchmark.window (--window)", s.window))
        lengths += [(f"benchmark.extra_data.{n}.seq_len", d.seq_len) for n, d in s.extra_data.items()]
        if lat:
            lengths.append(("benchmark.latency.prompt_tokens + new_tokens (--prompt-tokens, --new-tokens)",
                            lat.prompt_tokens + lat.new_tokens))
    else:
        lengths.append(("benchmark.data.max_length (--max-length)", s.data.max_length))
        if lat:
            lengths.append(("benchmark.latency.seq_tokens (--seq-tokens)", lat.seq_tokens))
    for field, n in lengths:
        if n > limit:
            raise ConfigError(f"{field}: {n} tokens, longer than the {limit} positions of {t.ref} ({where}); "
                              f"lower it to {limit} at most")


def _kind_problem(t: Target, backend: Backend) -> str | None:
    """Why `backend` cannot run target `t` (a torch model runs on ONNX Runtime by an export on the fly)."""
    if backend.runtime == "llamacpp" and t.kind != "gguf":
        return f"{backend}: runs GGUF files (llama.cpp's format); {t.ref} is a {t.kind} model"
    if t.kind == "gguf" and backend.runtime != "llamacpp":
        return f"{backend}: {t.ref} is a GGUF file; it runs on llamacpp-cpu"
    if t.kind == "onnx" and backend.runtime == "torch":
        return f"{backend}: {t.ref} is an ONNX checkpoint; it runs on the ort-* backends"
    return None


_METRIC_GROUPS = {
    "perplexity": {"perplexity", "nll", "scored_tokens", "windows"},
    "accuracy": {"accuracy", "macro_f1"},
    "teacher-agreement": {"top1_agreement", "kl", "label_agreement", "cosine", "cosine_min", "nn_agreement"},
}
_TASK_GROUPS = {"causal-lm": {"perplexity", "teacher-agreement"},
                "sequence-classification": {"accuracy", "teacher-agreement"},
                "feature-extraction": {"teacher-agreement"}}


def _applicable(task: str) -> set[str]:
    return _TASK_GROUPS[task]


def _filter_quality(quality: dict, wanted: list[str]) -> dict:
    keep = {"examples"} | set().union(*(_METRIC_GROUPS[w] for w in wanted))
    out = {k: v for k, v in quality.items() if k in keep}
    extra = {name: _filter_quality(q, wanted) for name, q in (quality.get("extra_data") or {}).items()}
    if any(extra.values()):
        out["extra_data"] = extra
    return out


def _generation_job(tok, s: BenchmarkConfig) -> dict:
    """What the worker generates: the prompts as token ids (the checkpoint's tokenizer, with its special
    tokens, as the edge bundle's generate_text encodes them), up to `new_tokens` each, stopping at EOS."""
    prompts = [tok(p)["input_ids"] for p in s.generations.prompts]
    return {"prompts": prompts, "new_tokens": s.generations.new_tokens, "eos": tok.eos_token_id}


def _generation_texts(tok, s: BenchmarkConfig, generated: list[list[int]]) -> list[dict]:
    return [{"prompt": p, "text": tok.decode(ids, skip_special_tokens=True), "ids": ids,
             "stopped_at_eos": tok.eos_token_id is not None and tok.eos_token_id in ids}
            for p, ids in zip(s.generations.prompts, generated)]


def timing_rounds(records: list[dict], jobs: list[dict | None], settings: BenchmarkConfig, log=print) -> None:
    """Rounds 2..N of the timing (`latency.rounds`): each measured row is timed again in a fresh process,
    the rows taking turns, and the runs are pooled into its record. `jobs[i]` holds the `measure` arguments
    of `records[i]` (None: leave that row as it is, e.g. a stored result)."""
    from .latency import pool

    rounds = settings.rounds
    timing_only = settings.model_copy(update={"quality": [], "extra_data": {}, "generations": None})
    for k in range(2, rounds + 1):
        for record, job in zip(records, jobs):
            if job is None or "latency" not in record:
                continue
            log(f"benchmark: {record['label']} on {record['backend']}: timing round {k}/{rounds}")
            extra = measure(**job, settings=timing_only)
            if "latency" not in extra:
                record.setdefault("notes", []).append(f"timing round {k}: {extra.get('error') or extra.get('skipped')}")
                continue
            record["latency"] = pool(record["latency"], extra["latency"])
            record["loadavg_after"] = extra["loadavg_after"]
            record["seconds"] = round(record["seconds"] + extra["seconds"], 2)
