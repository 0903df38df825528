"""Runs a pipeline: passes in order, one checkpoint each, reusing every checkpoint whose cache key matches.

A checkpoint's key hashes its parent's key and content (the hashes of its files, so a recomputed parent with
other weights invalidates its children), the pass name, the pass's resolved options, the data the passes
read and the seed the pass gets, so changing a pass's options recomputes that pass and every one after
it, while the ones before are reused. A run killed mid-pass leaves only a hidden temporary directory, removed
on the next run, so that pass is redone from its (finished) parent.

A run holds an exclusive lock on runs/<name>/.lock (a second run on the same folder is refused, or with
`wait` queues behind it), and its temporary files live in runs/<name>/.scratch-<pid>: the passes' own, and, for
the duration of the run, the system temp folder of `tempfile` and of child processes (TMPDIR), where ONNX
Runtime's quantizers and optimum write theirs. So no run removes another's work, and nothing lands in /tmp.

With a step store (`store`, a folder; `compress search` gives its trials runs/<name>/search/steps/), every
checkpoint the run finishes or reuses is also kept there under its cache key, and a step found there is placed at
its path instead of being computed. An entry is made of hard links to the checkpoint's files (copies where the
filesystem has none, and of ONNX external weights, which onnx will not read through a linked file), so it costs
little disk while the run folder holds the same checkpoint: no checkpoint file is ever changed in place (a
checkpoint is replaced whole, its manifest and card by renaming). An entry is written to a hidden folder and
renamed into place, so it is whole or absent, and of several processes storing the same key the first rename
wins. A placed entry is verified as a reused checkpoint is (key, file table, sizes, hashes) and gets a manifest
recording its parent in this run; one that fails is removed and the step computed again."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from compress import checkpoint, model_card
from compress.checkpoint import Artifact
from compress.data import PipelineData
from compress.describe import options_line
from compress.errors import CheckpointError, ModelSourceError, RunBusyError
from compress.models import BUILTIN_MODELS, source_fingerprint
from compress.onnx_tools import is_external_data
from compress.passes.base import PassContext
from compress.runtime import is_main_process, launched_processes, seed_everything, set_threads

from .config import Pipeline, step_dir_name



@dataclass
class StepRecord:
    index: int
    pass_name: str
    path: str
    key: str
    reused: bool
    seconds: float
    kind: str
    branch: str | None = None
    from_store: bool = False  # placed from the step store (reused, not computed)

    @property
    def label(self) -> str:
        """How reports name the step: its directory, prefixed by its branch."""
        name = Path(self.path).name
        return f"{self.branch}/{name}" if self.branch else name


@dataclass
class RunResult:
    run_dir: Path
    source: str
    source_key: str
    steps: list[StepRecord] = field(default_factory=list)
    report: Path | None = None

    def to_json(self) -> dict:
        return {"run_dir": str(self.run_dir), "source": self.source, "source_key": self.source_key,
                "steps": [asdict(s) for s in self.steps], "report": str(self.report) if self.report else None}


def _barrier() -> None:
    """Wait for every process of a multi-process launch (a no-op in a single process)."""
    if launched_processes() > 1:
        from accelerate import PartialState  # joins the process group the launcher described

        PartialState().wait_for_everyone()


def _notes(info) -> list[str]:
    """Every `note` / `notes` a pass left in its figures, nested ones too."""
    if isinstance(info, list):
        return [n for v in info for n in _notes(v)]
    if not isinstance(info, dict):
        return []
    out = []
    for k, v in info.items():
        if k not in ("note", "notes"):
            out += _notes(v)
        elif isinstance(v, str):
            out.append(v)
        elif isinstance(v, list):
            out += [x for x in v if isinstance(x, str)]
    return out


def _pid_alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def write_atomic(path: Path, text: str) -> None:
    """Write a file whole or not at all (a full disk leaves the old one, and a stray temp file the next run
    removes)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _link_tree(src: Path, dst: Path, skip=()) -> None:
    """Make the new folder `dst` with every file of `src` (but those named in `skip`) as a hard link, or a copy
    where the filesystem has no hard links (another device, no support). ONNX external weights are always
    copied: onnx refuses to read them through a file with several links (a "hardlink attack"), so a linked
    model.onnx.data would fail the next pass that loads the graph."""
    dst.mkdir(parents=True)
    for f in sorted(src.rglob("*")):
        target = dst / f.relative_to(src)
        if f.is_dir():
            target.mkdir(exist_ok=True)
        elif f.name in skip:
            continue
        elif is_external_data(f.name):
            shutil.copy2(f, target)
        else:
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)


def _own_external_data(folder: Path) -> None:
    """Give a checkpoint linked to the store before the store copied ONNX external weights its own copy of them
    (onnx will not read them through a file with several links); the store keeps its file."""
    for f in folder.iterdir():
        if is_external_data(f.name) and f.stat().st_nlink > 1:
            tmp = f.with_name(f".{f.name}.tmp-{os.getpid()}")
            shutil.copy2(f, tmp)
            os.replace(tmp, f)


def _discard(folder: Path) -> None:
    """Remove a folder others may be reading from: renamed out of the way first (atomic), then deleted."""
    trash = folder.with_name(f".{folder.name}.trash-{os.getpid()}")
    try:
        os.rename(folder, trash)
    except OSError:
        return  # gone already (another process discarded it)
    shutil.rmtree(trash, ignore_errors=True)


def _named_models(options) -> list[str]:
    """Fingerprints of the models a pass's options name by builtin name or folder (a teacher, a student), so that
    a step is recomputed when such a model changes, not only when its name does."""
    found = []
    if isinstance(options, dict):
        options = list(options.values())
    if isinstance(options, list):
        for value in options:
            found += _named_models(value)
    elif isinstance(options, str) and (options.split(":", 1)[-1] in BUILTIN_MODELS if options.startswith("builtin:")
                                       else any((Path(options).expanduser() / f).is_file()
                                                for f in ("config.json", "manifest.json"))):
        found.append(source_fingerprint(options))
    return found


def _hash(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


class Runner:
    def __init__(self, pipeline: Pipeline, *, output_dir: str | Path | None = None, show_progress: bool = True,
                 log=print, store: str | Path | None = None, remeasure: bool = False):
        self.pipeline = pipeline
        self.remeasure = remeasure  # benchmark every row again instead of reusing stored results
        cfg = pipeline.config
        self.run_dir = Path(output_dir or cfg.output_dir) / cfg.name
        self.store = Path(store) if store is not None else None  # the step store (None: none)
        self.show_progress = show_progress
        self.log = log
        self._locked = False  # this runner holds the folder's lock
        self.data = PipelineData(cfg.data.train, cfg.data.eval, cfg.data.calibration)
        self.source_key = _hash("source", source_fingerprint(cfg.model.source), cfg.task,
                                str(checkpoint.FORMAT_VERSION))

    def step_key(self, parent_key: str, parent_content: str, p, seed: int, data_fp: str) -> str:
        """A step's cache key: its parent's key and content hash, the pass, its options, the data and its seed."""
        options = p.config.model_dump(mode="json")
        name = p.name if p.version == 1 else f"{p.name}@v{p.version}"
        return _hash(parent_key, parent_content, name, json.dumps(options, sort_keys=True), data_fp, f"seed={seed}",
                     *_named_models(options))

    def _content(self, path: Path | None) -> str:
        """What a child starts from: the checkpoint's content hash, or the source model's key."""
        return checkpoint.content_hash(checkpoint.read_manifest(path)) if path else self.source_key

    def _device(self) -> torch.device:
        want = self.pipeline.config.device
        if want == "cuda" and not torch.cuda.is_available():
            from compress.errors import ConfigError

            raise ConfigError("device: cuda was asked for but CUDA is not available here; use auto or cpu")
        return torch.device("cuda" if want in ("auto", "cuda") and torch.cuda.is_available() else "cpu")

    def _load_source(self) -> Artifact:
        cfg = self.pipeline.config
        # a classifier's labels come from its data (train, else eval: a fine-tuned one measured or quantized)
        role = next((r for r in ("train", "eval") if self.data.specs.get(r) is not None), None)
        label_names = self.data.dataset(role).label_names if cfg.task == "sequence-classification" and role else None
        try:
            return checkpoint.load_source(cfg.model.source, cfg.task, label_names=label_names,
                                          trust_remote_code=cfg.model.trust_remote_code)
        except ModelSourceError as exc:
            raise ModelSourceError(f"model.source: {exc}") from exc

    def _scratch(self) -> Path:
        """Temporary files of the passes (one folder per process), removed at the end of the run."""
        return self.run_dir / f".scratch-{os.getpid()}"

    @contextlib.contextmanager
    def lock(self, wait: bool = False):
        """Hold runs/<name>/.lock (the main process: other ranks belong to the same run). Held already (the CLI
        takes it before opening the run's log): a no-op. Held by another run: RunBusyError, or with `wait`
        block until it is released (saying so once)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not is_main_process() or self._locked:
            yield
            return
        with open(self.run_dir / ".lock", "a+") as fh:  # opening it changes nothing another run relies on
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "?"
                if not wait:
                    raise RunBusyError(f"another run holds {self.run_dir} (pid {holder}); wait for it to finish "
                                       "(--wait queues this run behind it), or give this run another name or "
                                       "--output-dir") from None
                self.log(f"waiting for the run holding {self.run_dir} (pid {holder}) to finish")
                fcntl.flock(fh, fcntl.LOCK_EX)
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
            self._locked = True
            try:
                yield  # closing the file releases the lock (so does the process ending, however it ends)
            finally:
                self._locked = False

    @contextlib.contextmanager
    def _temp_in_scratch(self):
        """Point `tempfile` and child processes (TMPDIR) at the run's scratch while the run lasts."""
        tmp = self._scratch() / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        before = tempfile.tempdir, os.environ.get("TMPDIR")
        tempfile.tempdir, os.environ["TMPDIR"] = str(tmp), str(tmp)
        try:
            yield tmp
        finally:
            tempfile.tempdir = before[0]
            if before[1] is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = before[1]

    def _clean_stale(self) -> None:
        """Remove what an interrupted run or an earlier version of the config left behind."""
        chains = [(self.run_dir, self.pipeline.passes)]
        chains += [(self.run_dir / b.name, b.passes) for b in self.pipeline.branches]
        for old in self.run_dir.glob(".scratch*"):  # a killed run's (its pid is gone), never a live one's
            if not _pid_alive(old.name.rsplit("-", 1)[-1]):
                shutil.rmtree(old, ignore_errors=True)
        for chain_dir, passes in chains:
            for tmp in chain_dir.glob(".*.tmp-*"):
                self.log(f"removing unfinished {tmp.name} from an interrupted run")
                shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            for aside in chain_dir.glob(".*.old-*"):  # an outdated checkpoint a killed replace_folder left aside
                if not _pid_alive(aside.name.rsplit("-", 1)[-1]):
                    shutil.rmtree(aside, ignore_errors=True)
            names = {step_dir_name(i, p.name) for i, p in enumerate(passes)}
            for old in chain_dir.glob("[0-9][0-9]-*"):
                if not old.is_dir() or old.name in names:
                    continue
                if (old / checkpoint.MANIFEST).is_file() or not any(old.iterdir()):
                    self.log(f"removing {old.relative_to(self.run_dir)}: no longer a step of this pipeline")
                    shutil.rmtree(old, ignore_errors=True)
                else:  # not a checkpoint: someone else's files, never deleted (as checkpoint.save refuses them)
                    self.log(f"leaving {old.relative_to(self.run_dir)}: not a step of this pipeline, and not a "
                             "checkpoint")
        if self.store is not None:  # entries a killed process was writing or discarding
            for old in [*self.store.glob(".*.tmp-*"), *self.store.glob(".*.trash-*")]:
                if not _pid_alive(old.name.rsplit("-", 1)[-1]):
                    shutil.rmtree(old, ignore_errors=True)

    def _reusable(self, path: Path, key: str) -> dict | None:
        """The manifest of a finished, intact checkpoint at `path` with this key, else None."""
        if not (path / checkpoint.MANIFEST).exists():
            return None
        try:
            manifest = checkpoint.read_manifest(path)
            if manifest.get("key") != key:
                return None
            checkpoint.verify(path, manifest)
            _own_external_data(path)
            return manifest
        except CheckpointError as exc:
            self.log(f"not reusing {path.name}: {exc}")
            return None

    def _keep(self, path: Path, key: str) -> None:
        """Put the finished checkpoint at `path` in the step store (hard links), unless the key is there."""
        entry = self.store / key
        if entry.exists():
            return
        tmp = self.store / f".{key}.tmp-{os.getpid()}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            _link_tree(path, tmp, skip=(checkpoint.MODEL_CARD, checkpoint.MODEL_CARD_TMP))
            os.rename(tmp, entry)  # atomic; fails when another process stored this key first (theirs stays)
        except OSError as exc:
            if not entry.exists():  # the store is a cache: not keeping a step never fails the run
                self.log(f"step store: not keeping {path.name}: {exc}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _place(self, path: Path, key: str, parent_ref: str) -> dict | None:
        """Put the step store's checkpoint with this key at `path` (hard links) when it verifies, with a
        manifest naming its parent in this run (`parent_ref`); its manifest, else None. An entry that does not
        verify is removed."""
        entry = self.store / key
        if not (entry / checkpoint.MANIFEST).is_file():
            return None
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"  # what a killed run leaves, _clean_stale removes
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _link_tree(entry, tmp)
            manifest = checkpoint.read_manifest(tmp)
            if manifest.get("key") != key:
                raise CheckpointError(f"its manifest has the key {manifest.get('key')!r}")
            checkpoint.verify(tmp, manifest)
            # where it was made is another run's folder: record this run's parent (a new manifest file, so the
            # store's own is unchanged; the parent is not part of the content hash)
            manifest["parent"] = {**(manifest.get("parent") or {}), "path": parent_ref}
            write_atomic(tmp / checkpoint.MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
            checkpoint.replace_folder(tmp, path)  # an outdated checkpoint (other key): replaced whole
            return manifest
        except CheckpointError as exc:
            self.log(f"step store: not using {entry.name}: {exc}; removing it")
            _discard(entry)
            return None
        except OSError as exc:  # removed meanwhile by another process, a full disk: computed instead
            self.log(f"step store: not using {entry.name}: {exc}")
            return None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _from_store(self, path: Path, key: str, parent_ref: str) -> dict | None:
        """The step placed from the store (the main process places it, the others see it once it is there)."""
        manifest = self._place(path, key, parent_ref) if self.main else None
        _barrier()
        return manifest if self.main else self._reusable(path, key)

    def run(self, wait: bool = False) -> RunResult:
        with self.lock(wait=wait):
            try:
                with self._temp_in_scratch():
                    return self._run()
            finally:
                shutil.rmtree(self._scratch(), ignore_errors=True)

    def _run(self) -> RunResult:
        cfg = self.pipeline.config
        self.threads = set_threads(cfg.threads)
        self.device = self._device()
        # Under accelerate launch / torchrun every process runs the pipeline (they train together), but only
        # rank 0 writes checkpoints, reports and benchmarks.
        self.main = is_main_process()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.main:
            self._clean_stale()
            # with the folder the run went to (--output-dir), so that running this file again reuses the run
            resolved = {**cfg.model_dump(mode="json", by_alias=True), "output_dir": str(self.run_dir.parent)}
            write_atomic(self.run_dir / "pipeline.yaml", yaml.safe_dump(resolved, sort_keys=False))
        result = RunResult(self.run_dir, cfg.model.source, self.source_key)
        result.steps += self._run_chain(self.pipeline.passes, self.run_dir, None, self.source_key)
        for b in self.pipeline.branches:
            start = result.steps[b.start - 1] if b.start else None
            result.steps += self._run_chain(b.passes, self.run_dir / b.name, start and Path(start.path),
                                            start.key if start else self.source_key, branch=b.name)
        if not self.main:
            return result
        if cfg.benchmark is not None:
            result.report = self._benchmark(result)
        model_card.write_cards([s.path for s in result.steps], run_name=cfg.name,  # with the measured figures
                               results=self.run_dir / "results.json" if cfg.benchmark is not None else None)
        write_atomic(self.run_dir / "run.json", json.dumps(result.to_json(), indent=2) + "\n")
        return result

    def _run_chain(self, passes, chain_dir: Path, parent_path: Path | None, parent_key: str,
                   branch: str | None = None) -> list[StepRecord]:
        """Run `passes` from the checkpoint at `parent_path` (None: the source model) into `chain_dir`."""
        cfg = self.pipeline.config
        steps: list[StepRecord] = []
        # the data the passes read: with data.train, data.eval feeds only the benchmarks (which key their results by
        # it), so changing it recomputes no step; without, it gives a classifier its labels and export its check
        eval_read = self.data.specs.get("train") is None
        data_fp = self.data.fingerprint("train", "calibration", *(["eval"] if eval_read else []))
        n, prefix = len(passes), f"{branch}: " if branch else ""
        for i, p in enumerate(passes):
            key = self.step_key(parent_key, self._content(parent_path), p, cfg.seed + i, data_fp)
            path = chain_dir / step_dir_name(i, p.name)
            parent_ref = str(parent_path) if parent_path else cfg.model.source
            start = time.perf_counter()
            manifest = self._reusable(path, key)
            from_store = False
            if manifest is None and self.store is not None:
                manifest = self._from_store(path, key, parent_ref)
                from_store = manifest is not None
            elif manifest is not None and self.store is not None and self.main:
                self._keep(path, key)  # made before the store had it (an earlier search, another store)
            if manifest is not None:
                where = "from the step store" if from_store else "cache key matches"
                self.log(f"{prefix}[{i + 1}/{n}] {p.name}: reusing {path} ({where})")
                if from_store and self.main:
                    model_card.write_card(path, run_name=cfg.name)
                seconds = round(time.perf_counter() - start, 2) if from_store else 0.0
                steps.append(StepRecord(i, p.name, str(path), key, True, seconds, manifest["kind"], branch,
                                        from_store=from_store))
                parent_path, parent_key = path, key
                continue
            self.log(f"{prefix}[{i + 1}/{n}] {p.name}: running ({options_line(p.config)})")
            # Every pass starts from what its parent wrote (not from memory), so it sees exactly what
            # `compress.load` gives; a fully reused prefix loads nothing.
            current = checkpoint.load(parent_path) if parent_path else self._load_source()
            seed_everything(cfg.seed + i)
            ctx = PassContext(source=cfg.model.source, task=cfg.task, data=self.data, device=self.device,
                              seed=cfg.seed + i, threads=self.threads, scratch=self._scratch(),
                              show_progress=self.show_progress)
            ctx.scratch.mkdir(exist_ok=True)
            out = p.run(current, ctx)
            out.info.setdefault("seconds", round(time.perf_counter() - start, 2))
            if self.main:
                checkpoint.save(
                    out, path,
                    key=key,
                    source=cfg.model.source,
                    parent={"path": parent_ref, "key": parent_key},
                    **{"pass": {"name": p.name, "config": p.config.model_dump(mode="json")}},
                    threads=self.threads,
                )
                model_card.write_card(path, run_name=cfg.name)  # README.md beside the finished checkpoint
                if self.store is not None:
                    self._keep(path, key)
            _barrier()  # other processes go on only once the checkpoint exists
            seconds = time.perf_counter() - start
            self.log(f"{prefix}[{i + 1}/{n}] {p.name}: wrote {path} in {seconds:.1f} s")
            for note in _notes(out.info):  # what the pass wants read, not only kept in the manifest
                self.log(f"{prefix}[{i + 1}/{n}] {p.name}: note: {note}")
            steps.append(StepRecord(i, p.name, str(path), key, False, round(seconds, 2), out.kind, branch))
            parent_path, parent_key = path, key
        return steps

    def _benchmark(self, result: RunResult) -> Path | None:
        try:
            from benchmarks.pipeline import benchmark_run
        except ImportError:
            self.log("benchmark: the harness is not part of this version yet; skipping measurements")
            return None
        return benchmark_run(self.pipeline.config, result, self.data, log=self.log,
                             show_progress=self.show_progress, remeasure=self.remeasure)
