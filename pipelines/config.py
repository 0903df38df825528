"""The pipeline config: YAML in, validated by pydantic, JSON Schema out.

Errors name the field, the bad value and what is allowed; a misspelt pass or option gets a suggestion."""
from __future__ import annotations

import copy
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator

from benchmarks.config import BenchmarkConfig
from compress import passes as pass_registry
from compress.data import DataSpec, check_data, check_data_source, default_split
from compress.errors import ConfigError, format_validation_error
from compress.errors import DataSourceError, ModelSourceError
from compress.models import check_source, check_task
from compress.options import Options
from compress.tasks import TASKS
from compress.passes.base import Pass
from compress.pruning.lowrank import is_factorized


class ModelSpec(Options):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="builtin:<name>, hf:<hub id>, or a local directory")
    trust_remote_code: bool = Field(False, description="allow the model's own Python code to run")


class DataConfig(Options):
    model_config = ConfigDict(extra="forbid")

    train: DataSpec | None = Field(None, description="training data (distillation, recovery, calibration)")
    eval: DataSpec | None = Field(None, description="held-out evaluation data for the benchmarks")
    calibration: DataSpec | None = Field(None, description="calibration data (default: the training data)")


# what a run writes beside its step folders (runner, report, `compress search`): no branch folder may take these
RUN_FILES = ("pipeline.yaml", "run.json", "run.log", "results.json", "report.md", "report.html", "search")


class BranchConfig(Options):
    """Extra passes that start from the source model or from a step of the main chain, so a report can put
    alternatives side by side (e.g. quantize-only next to distill + prune + quantize)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100,
                      description="runs/<name>/<branch name>/")
    start: str | int = Field("source", alias="from", description="source, or a step of `passes`: its number "
                             "(1 = the first pass) or its directory name such as 02-prune")
    passes: list[dict[str, dict[str, Any] | None]] = Field(description="run top to bottom from `from`")

    @field_validator("name")
    @classmethod
    def _not_a_step_name(cls, name: str) -> str:
        if looks_like_step_dir(name):
            raise ValueError(f"{name!r} looks like a step folder (two digits and a dash, e.g. 01-quantize), which "
                             "the runner owns; a branch name must not start with digits and a dash (e.g. alt-99)")
        if name in RUN_FILES or name.endswith(".png"):
            raise ValueError(f"{name!r} is the name of a file or folder the run writes in runs/<name>/ (the report's "
                             "plots are .png); give the branch another name")
        return name


class PipelineConfig(Options):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100, description="run name: runs/<name>/")
    model: ModelSpec
    task: Literal["causal-lm", "sequence-classification", "feature-extraction"] = "causal-lm"
    data: DataConfig = Field(default_factory=DataConfig)
    passes: list[dict[str, dict[str, Any] | None]] = Field(
        default_factory=list, description="run top to bottom; each item is {pass name: options}")
    branches: list[BranchConfig] = Field(default_factory=list, description="alternative chains measured "
                                         "beside the main one")
    benchmark: BenchmarkConfig | None = Field(None, description="what to measure on every checkpoint")
    seed: int = Field(0, ge=0, lt=2**64, description="seeds the passes (the i-th pass of a chain gets seed + i)")
    threads: int | None = Field(None, gt=0, description="torch threads for the passes, and for the benchmarks "
                                "unless benchmark.threads says otherwise (default: all cores)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where passes run; auto = cuda if present")
    output_dir: str = Field("runs", description="runs are written to <output_dir>/<name>/")

    @field_validator("output_dir")
    @classmethod
    def _home(cls, path: str) -> str:
        return str(Path(path).expanduser())  # YAML is no shell: ~/runs would be a folder named ~ in the cwd


assert set(TASKS) == {"causal-lm", "sequence-classification", "feature-extraction"}


@dataclass
class Branch:
    name: str
    start: int  # number of main-chain steps it starts after (0 = the source model)
    passes: list[Pass]


@dataclass
class Pipeline:
    """A validated config plus its instantiated passes."""

    config: PipelineConfig
    passes: list[Pass]
    path: Path | None = None
    branches: list[Branch] = field(default_factory=list)


def step_dir_name(index: int, pass_name: str) -> str:
    return f"{index + 1:02d}-{pass_name}"


def looks_like_step_dir(name: str) -> bool:
    """A name of the form step_dir_name gives (digits, a dash, a pass name): the runner owns such folders."""
    return re.fullmatch(r"[0-9]{2,}-.*", name) is not None


def _instantiate_passes(items: list[dict], where: str = "passes") -> tuple[list[Pass], list[str]]:
    out, errors = [], []
    for i, item in enumerate(items):
        if len(item) != 1:
            errors.append(f"{where}.{i}: each pass is a mapping with one key, the pass name (got {list(item)})")
            continue
        (name, options), = item.items()
        try:
            out.append(pass_registry.get(name)(**(options or {})))
        except ConfigError as exc:
            errors.append("\n".join(f"{where}.{i}.{line}" if not line.startswith("unknown pass") else
                                    f"{where}.{i}: {line}" for line in str(exc).splitlines()))
    return out, errors


@dataclass
class _ChainState:
    kind: str = "torch"
    produced_by: str | None = None
    quantized_by: str | None = None
    factorized_by: str | None = None


def _source_state(source: str) -> tuple[_ChainState, str | None]:
    """Where a chain starts (a compress checkpoint given as the source may be quantized already), or why it
    cannot start there."""
    from compress.checkpoint import read_manifest
    from compress.errors import CheckpointError

    if source.startswith(("builtin:", "hf:")) or not (Path(source).expanduser() / "manifest.json").is_file():
        return _ChainState(), None
    try:
        held = read_manifest(Path(source).expanduser())
    except CheckpointError as exc:
        return _ChainState(), f"model.source: {exc}"
    if held["kind"] == "onnx":
        return _ChainState(), (f"model.source: {source} is an ONNX checkpoint, and a pipeline starts from a torch "
                               "model; give the checkpoint its export started from, and put the export and ONNX "
                               "passes in this pipeline")
    quantization = held.get("quantization")
    method = quantization.get("method", "quantized") if isinstance(quantization, dict) else quantization
    factorized = is_factorized(held.get("structure") or [])
    return _ChainState(quantized_by=f"model.source ({method})" if quantization else None,
                       factorized_by="model.source (lowrank)" if factorized else None), None


def check_order(passes: list[Pass], where: str = "passes", state: _ChainState | None = None,
                states: list | None = None) -> list[str]:
    """Problems that make an order impossible, found before any work starts. `states`, if given, receives
    the state after each pass (so a branch can start from any step)."""
    errors: list[str] = []
    st = state or _ChainState()
    kind, produced_by, quantized_by, factorized_by = st.kind, st.produced_by, st.quantized_by, st.factorized_by
    for i, p in enumerate(passes):
        label = f"{where}.{i} ({p.name})"
        if kind not in p.input_kinds():
            if kind == "torch":
                errors.append(f"{label} needs an ONNX model, but the model is still a torch model at that point: "
                              "add an `export` pass before it")
            elif p.name == "export":
                errors.append(f"{label}: {produced_by} already exported the model to ONNX; keep one export pass")
            else:
                errors.append(f"{label} runs on torch models, but {produced_by} already exported to ONNX: "
                              f"move `{p.name}` before the export" + (
                                  ", or quantize the ONNX model with an ort-* method (ort-int8-dynamic, "
                                  "ort-int8-static, ort-fp16)" if p.name == "quantize" else ""))
            continue
        # a quantized source: start from the float model instead; a quantize pass here: move the pass
        from_source = bool(quantized_by) and quantized_by.startswith("model.source")
        if quantized_by and p.quantizes():
            errors.append(f"{label} would quantize a model that {quantized_by} already quantized: quantizing twice "
                          "is not supported, " + ("give the float model it was quantized from as model.source"
                                                  if from_source else "keep one quantize pass"))
        elif quantized_by and p.name == "export":
            errors.append(f"{label} cannot export a model {quantized_by} quantized in torch: export the float "
                          "model, then quantize the ONNX model with an ort-* method (ort-int8-dynamic, ort-fp16)")
        elif quantized_by and not p.accepts_quantized_input():
            errors.append(f"{label} changes weights, so it cannot run after {quantized_by} quantized them" + (
                "; give the float model it was quantized from as model.source" if from_source else
                f": move `{p.name}` before the quantize pass"))
        if factorized_by and not p.accepts_factorized_input():
            errors.append(f"{label} needs plain linear layers, but {factorized_by} factorized them into low-rank "
                          "pairs: " + ("give the model it was factorized from as model.source" if
                                       factorized_by.startswith("model.source") else
                                       "keep one lowrank pass" if p.factorizes() else f"move `{p.name}` before it"))
        if p.quantizes():
            quantized_by = label
        if p.factorizes():
            factorized_by = label
        if p.output_kind() != kind:
            produced_by = label
        kind = p.output_kind()
        if states is not None:
            states.append(_ChainState(kind, produced_by, quantized_by, factorized_by))
    return errors


def _branch_start(branch: BranchConfig, main_passes: list[Pass], where: str) -> tuple[int | None, str | None]:
    names = [step_dir_name(i, p.name) for i, p in enumerate(main_passes)]
    if branch.start == "source":
        return 0, None
    if isinstance(branch.start, int) and 1 <= branch.start <= len(names):
        return branch.start, None
    if branch.start in names:
        return names.index(branch.start) + 1, None
    return None, (f"{where}.from: {branch.start!r} is not a step of `passes`; use source, a number from 1 to "
                  f"{len(names)}, or one of {', '.join(names) or '(no passes)'}")


def _check_data_needed(cfg: PipelineConfig, chains: list[tuple[str, list[Pass]]]) -> list[str]:
    """Each pass that reads data finds it in the config (else the run stopped at that step, after the others)."""
    errors = []
    for where, chain in chains:
        for i, p in enumerate(chain):
            need = p.needs_data()
            if need and not any(getattr(cfg.data, role) for role in need[0]):
                roles = " or ".join(f"data.{r}" for r in need[0])
                errors.append(f"{where}.{i} ({p.name}): {need[1]}, and the config sets no {roles}; add "
                              f"data.{need[0][-1]} (e.g. {{source: builtin:wikipedia}})")
    return errors


def _check_task_options(task: str, chains: list[tuple[str, list[Pass]]]) -> list[str]:
    """Options a pass refuses on this task (else the run stopped at that step, after the others)."""
    return [f"{where}.{i} ({p.name}): {problem}" for where, chain in chains for i, p in enumerate(chain)
            if (problem := p.check_task(task))]


def _check_data(cfg: PipelineConfig) -> list[str]:
    specs = {f"data.{role}": getattr(cfg.data, role) for role in ("train", "eval", "calibration")}
    if cfg.benchmark is not None:
        specs.update({"benchmark.data": cfg.benchmark.data,
                      **{f"benchmark.extra_data.{k}": v for k, v in cfg.benchmark.extra_data.items()}})
    errors, labels = [], {}
    for where, spec in specs.items():
        try:
            if spec is not None:
                labels[where] = check_data(spec)
        except DataSourceError as exc:
            errors.append(f"{where}.source: {exc}")
    trained = labels.get("data.train")
    for where in ("data.eval", "benchmark.data"):
        if cfg.task == "sequence-classification" and trained and labels.get(where):
            numbered = all(n.isdigit() for n in labels[where])  # class ids, as the benchmarks read them
            if unknown := labels[where][len(trained):] if numbered else sorted(set(labels[where]) - set(trained)):
                errors.append(f"{where}: labels {unknown} are not among data.train's classes ({', '.join(trained)}); "
                              "the classifier could never predict them: give eval data with the training classes")
    evals = {where: spec for where, spec in specs.items() if where not in ("data.train", "data.calibration")}
    for where, ev in evals.items():
        for role in ("train", "calibration"):
            spec = getattr(cfg.data, role)
            if spec is None or ev is None or not _same_data(spec.source, ev.source):
                continue
            ts, es = spec.split or default_split(spec.source, role), ev.split or default_split(ev.source, "eval")
            if ts == es or "all" in (ts, es):
                errors.append(f"{where}: uses the same source as data.{role} ({spec.source}) and the splits "
                              f"overlap ({ts} / {es}): set `split:` on both, e.g. train and test")
    return errors


def _same_data(a: str, b: str) -> bool:
    """Whether two sources share data, however their paths are spelled (`d.jsonl`, `./d.jsonl`, a folder and a
    glob of its files)."""
    if a.startswith("builtin:") or b.startswith("builtin:"):
        return a == b
    try:
        return bool({f.resolve() for f in check_data_source(a)} & {f.resolve() for f in check_data_source(b)})
    except DataSourceError:
        return False


def _nul_bytes(node, where: str = "") -> list[str]:
    """A message for each text in the config holding a NUL byte, which no path (nor name) can hold."""
    if isinstance(node, str):
        return [f"{where or 'config'}: {node!r} holds a NUL byte (\\0), which no path can; remove it"] \
            if "\0" in node else []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    return [e for k, v in items for e in _nul_bytes(v, f"{where}.{k}" if where else str(k))]


def validate(raw: dict) -> Pipeline:
    """Validate a parsed config; raise ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    keys = [k for k in raw if not isinstance(k, str)]  # PipelineConfig(**raw) takes text keys only
    if keys:
        raise ConfigError("\n".join(f"{k!r}: unknown option {k!r}: the keys of a config are option names (allowed: "
                                     f"{', '.join(sorted(PipelineConfig.model_fields))})" for k in keys))
    nul = _nul_bytes(raw)  # before any path is opened: the OS refuses them with a ValueError naming no field
    if nul:
        raise ConfigError("\n".join(nul))
    try:
        cfg = PipelineConfig(**raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, PipelineConfig)) from None
    passes, errors = _instantiate_passes(cfg.passes)
    try:
        check_source(cfg.model.source)
        check_task(cfg.model.source, cfg.task)
    except ModelSourceError as exc:
        errors.append(f"model.source: {exc}")
    start, problem = _source_state(cfg.model.source) if not errors else (_ChainState(), None)
    errors += [problem] if problem else []
    states: list[_ChainState] = [start]
    if not errors:
        errors += check_order(passes, states=states, state=start)
    branches = []
    names = [b.name for b in cfg.branches]
    for j, name in enumerate(names):
        if name in names[:j]:
            errors.append(f"branches.{j}.name: {name!r} is the name of branches.{names.index(name)} too (both would "
                          f"write runs/<name>/{name}/); give each branch its own name")
    for j, b in enumerate(cfg.branches):
        where = f"branches.{j}"
        start, problem = _branch_start(b, passes, where) if len(passes) == len(cfg.passes) else (0, None)
        bpasses, perrors = _instantiate_passes(b.passes, f"{where}.passes")
        errors += [problem] if problem else []
        errors += perrors
        if not problem and not perrors and len(states) > start:
            errors += check_order(bpasses, f"{where}.passes", state=states[start])
        branches.append(Branch(b.name, start or 0, bpasses))
    longest = max([len(cfg.passes), *(len(b.passes) for b in cfg.branches)])
    if cfg.seed + longest - 1 >= 2**64:  # the i-th pass of a chain is seeded with seed + i; torch takes < 2**64
        errors.append(f"seed: the last of {longest} passes would get seed {cfg.seed + longest - 1}, and torch "
                      f"takes seeds below 2**64; give a seed below {2**64 - longest + 1}")
    errors += _check_data(cfg)
    chains = [("passes", passes)] + [(f"branches.{j}.passes", b.passes) for j, b in enumerate(branches)]
    errors += _check_data_needed(cfg, chains)
    errors += _check_task_options(cfg.task, chains)
    if cfg.benchmark is not None:
        try:
            cfg.benchmark.check_task(cfg.task)
        except ConfigError as e:
            errors.append(str(e))
    if cfg.benchmark is not None:
        labels = [step_dir_name(i, p.name) for i, p in enumerate(passes)]
        labels += [f"{b.name}/{step_dir_name(i, p.name)}" for b in branches for i, p in enumerate(b.passes)]
        wrong = [("baseline", cfg.benchmark.baseline)] if cfg.benchmark.baseline not in ["source", *labels] else []
        wrong += [("steps", x) for x in cfg.benchmark.steps or [] if x not in ["source", *labels]]
        for field, name in wrong:
            errors.append(f"benchmark.{field}: {name!r} is not a step of this pipeline; use "
                          f"source or one of {', '.join(labels) or '(no steps)'}")
    if errors:
        raise ConfigError("\n".join(errors))
    return Pipeline(cfg, passes, branches=branches)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.0.c=value` overrides (value parsed as YAML) to a parsed config."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. passes.0.distill.max_steps=5")
        dotted, value = item.split("=", 1)
        keys = dotted.split(".")
        if "" in keys:
            raise ConfigError(f"--set {item!r}: the key has an empty part; expected KEY=VALUE, e.g. "
                              "passes.0.distill.max_steps=5")
        if not value.strip():
            raise ConfigError(f"--set {dotted}: no value after '='; write {dotted}=null to unset it")
        node: Any = raw
        for depth, key in enumerate(keys[:-1]):
            where = ".".join(keys[: depth + 1])
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise ConfigError(f"--set {dotted}: {where} is not an index of a list of {len(node)}")
                node = node[int(key)]
            elif isinstance(node, dict):
                if depth >= 2 and keys[depth - 2] == "passes" and len(node) == 1 and key not in node:
                    item_path, name = ".".join(keys[:depth]), next(iter(node))
                    raise ConfigError(f"--set {dotted}: {item_path} is a `{name}` pass, not `{key}`; e.g. "
                                      f"--set {item_path}.{name}.OPTION=VALUE")
                if node.get(key) is None:
                    node[key] = {}
                node = node[key]
            else:
                raise ConfigError(f"--set {dotted}: {where} is not a mapping or list")
        last = keys[-1]
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = str(exc).splitlines()[0]
            raise ConfigError(f"--set {dotted}: the value {value!r} is not valid YAML ({problem}); quote it, "
                              f"e.g. --set '{dotted}=\"...\"'") from None
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"--set {dotted}: {last} is not an index of a list of {len(node)}")
            node[int(last)] = parsed
        elif isinstance(node, dict):
            node[last] = parsed
        else:
            raise ConfigError(f"--set {dotted}: the parent is not a mapping or list")
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML itself keeps the last silently, so a
    second `passes:` would drop the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice in one mapping (only the last would count); "
                    "keep one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_config_file(path: str | Path) -> Any:
    """The parsed YAML of a config file; ConfigError naming the file (and line) when it is missing, not UTF-8,
    not YAML, or gives a key twice."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        stream = io.StringIO(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                          "save the config as UTF-8") from None
    stream.name = str(path)  # named in YAML's error marks
    try:
        return yaml.load(stream, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read (hundreds of levels of lists or mappings); a config "
                          "needs a few") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    path = Path(path)
    raw = read_config_file(path)
    pipeline = validate(apply_overrides(raw or {}, overrides or []))
    pipeline.path = path
    return pipeline


def json_schema() -> dict:
    """JSON Schema of the config, with each pass's options under `passes`."""
    from pydantic.json_schema import models_json_schema

    registry = pass_registry.available()
    models = [(PipelineConfig, "validation")] + [(c, "validation") for cls in registry.values()
                                                  for c in cls.config_classes()]
    _, top = models_json_schema(models, ref_template="#/$defs/{model}")
    defs = top["$defs"]
    schema = copy.deepcopy(defs.pop(PipelineConfig.__name__))

    def options(cls) -> dict:  # one options model, or one of several chosen by a discriminator (quantize)
        refs = [{"$ref": f"#/$defs/{c.__name__}"} for c in cls.config_classes()]
        return {**(refs[0] if len(refs) == 1 else {"oneOf": refs}), "description": cls.description}

    schema["properties"]["passes"]["items"] = defs[BranchConfig.__name__]["properties"]["passes"]["items"] = {
        "oneOf": [
            {"type": "object", "additionalProperties": False, "required": [name], "properties": {name: options(cls)}}
            for name, cls in registry.items()
        ]
    }
    schema["$defs"] = defs
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "compress pipeline"
    return schema
