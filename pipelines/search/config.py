"""The search config: a pipeline config whose pass options may be `{search: ...}`, plus what to optimize.

    objectives: [decode_tok_s, size_mb]          # or [{perplexity: minimize}, ...]; directions have defaults
    constraints: ["perplexity_ratio <= 1.03"]    # figures, their ratios to the source, decode_speedup, ...
    budget: {trials: 40, minutes: 60}            # the study's total trials; this process's wall time
    screen: {max_tokens: 2048}                   # the eval slice every trial is screened on
    sampler: tpe                                 # tpe | nsga2 | random | grid (choice lists only); seeded

Everything is checked before any trial runs: the pipeline with every searched option at its first value,
every search value against its pass's own options class, the figures named."""
from __future__ import annotations

import copy
import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from compress.errors import ConfigError, format_validation_error

from ..config import Pipeline, PipelineConfig, apply_overrides, read_config_file, validate
from . import figures as fig
from .space import MARKER, Space, check_values, find_space

SEARCH_KEYS = ("objectives", "constraints", "budget", "screen", "sampler", "start_with")
# `branches:` of a pipeline config are not part of a search's trials (nor of best.yaml)


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trials: int | None = Field(20, gt=0, description="trials in the study in all (a rerun adds trials up to this; "
                               "20 unless only minutes are given)")
    minutes: float | None = Field(None, gt=0, allow_inf_nan=False,
                                  description="stop starting trials after this many minutes")

    @model_validator(mode="after")
    def _some_limit(self):
        if "trials" not in self.model_fields_set and self.minutes is not None:
            self.trials = None  # a time budget alone: the default trial count would end it first
        if self.trials is None and self.minutes is None:
            raise ValueError("give trials or minutes (or both): a search without a budget never ends")
        return self


class Screen(BaseModel):
    """The cheap measurement every trial gets: quality on a slice of the eval data, size from its files."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(2048, gt=0, description="causal-lm: eval tokens scored per trial")
    max_examples: int = Field(256, gt=0, description="classifiers: eval examples scored per trial (one of them "
                              "must move accuracy by less than an accuracy_ratio constraint allows)")
    skip_dominated: bool = Field(True, description="skip the full measurement of a trial that a fully "
                                 "measured one beats on every screened objective and on screened quality "
                                 "(larger and worse is rarely faster)")


class SearchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    objectives: list[str | dict[str, Literal["minimize", "maximize"]]] = Field(
        min_length=1, description="figures to optimize: a name (its usual direction) or {name: direction}")
    constraints: list[str] = Field([], description="e.g. perplexity_ratio <= 1.03, decode_speedup >= 3")
    budget: Budget = Field(default_factory=Budget)
    screen: Screen = Field(default_factory=Screen)
    sampler: Literal["tpe", "nsga2", "random", "grid"] = Field("tpe", description="Optuna sampler (seeded)")
    start_with: list[dict[str, Any]] = Field(
        [], description="recipes tried first, before the sampler proposes any (e.g. the hand-written one, so the "
        "study measures it beside what it finds): searched option -> value, the option named as in trials.json "
        "(`quantize.weight_bits`, or `2.quantize.weight_bits` when two passes share a name); an option left out "
        "is sampled")


@dataclass
class SearchSetup:
    """A validated search config: the raw pipeline (with `{search:}` markers), its space and settings, the
    pipeline with every searched option at its first value (what validation checked)."""

    raw: dict
    space: Space
    settings: SearchSettings
    objectives: list[tuple[str, str]]
    constraints: list[fig.Constraint]
    pipeline: Pipeline
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.pipeline.config.name

    @property
    def baseline_step(self) -> int | None:
        """How many passes make the baseline when `benchmark.baseline` names a step (e.g. 01-distill, a
        fine-tuned teacher); None for the source model."""
        from ..config import step_dir_name

        bench = self.pipeline.config.benchmark
        if bench is None or bench.baseline == "source":
            return None
        names = [step_dir_name(i, p.name) for i, p in enumerate(self.pipeline.passes)]
        return names.index(bench.baseline) + 1

    @property
    def needs_full(self) -> bool:
        """Whether a figure asked for needs the full harness measurement (speed or memory)."""
        names = [n for n, _ in self.objectives] + [c.name for c in self.constraints]
        return not all(fig.is_cheap(n) for n in names)

    def pipeline_raw(self, values: dict) -> dict:
        """The plain pipeline config of one point of the space (no search keys)."""
        raw = {k: v for k, v in self.raw.items() if k not in SEARCH_KEYS + ("branches",)}
        raw["passes"] = self.space.fill(raw.get("passes") or [], values)
        return raw


def is_search_config(raw) -> bool:
    """A config with a search section or `{search:}` markers (so `compress validate` knows which it is)."""
    if not isinstance(raw, dict):
        return False
    return any(k in raw for k in SEARCH_KEYS) or bool(find_space(raw.get("passes") or [])[0].params)


def _objectives(settings: SearchSettings, errors: list[str]) -> list[tuple[str, str]]:
    out = []
    for i, item in enumerate(settings.objectives):
        name, direction = (item, None) if isinstance(item, str) else next(iter(item.items()), (None, None))
        if not isinstance(item, str) and len(item) != 1:
            errors.append(f"objectives.{i}: one figure per item, e.g. {{perplexity: minimize}}")
            continue
        problem = fig.unknown_name(name, f"objectives.{i}")
        if problem:
            errors.append(problem)
            continue
        out.append((name, direction or fig.METRICS[fig.base_metric(name)][0]))
    if len({n for n, _ in out}) != len(out):
        errors.append("objectives: a figure is named twice")
    return out


def start_point(space: Space, recipe: dict) -> dict:
    """A `start_with` recipe as Optuna parameters ({name: encoded value}); ValueError naming what is wrong."""
    point = {}
    for key, value in recipe.items():
        matches = [p for p in space.params if key in (p.name, p.label)]
        if len(matches) != 1:
            names = ", ".join(p.label if sum(q.label == p.label for q in space.params) == 1 else p.name
                              for p in space.params)
            raise ValueError(f"{key!r} is {'not a searched option' if not matches else 'ambiguous'}; use one of "
                             f"{names}")
        p = matches[0]
        allowed = p.choices if p.choices is not None else None
        if allowed is not None and p.encode(value) not in [p.encode(c) for c in allowed]:
            raise ValueError(f"{key}: {value!r} is not one of its search values {allowed}")
        if allowed is None and not (isinstance(value, (int, float)) and p.low <= value <= p.high):
            raise ValueError(f"{key}: {value!r} is outside its range [{p.low}, {p.high}]")
        point[p.name] = p.encode(value)
    return point


def _start_points(settings: SearchSettings, space: Space) -> list[str]:
    errors = []
    for i, recipe in enumerate(settings.start_with):
        try:
            start_point(space, recipe)
        except ValueError as exc:
            errors.append(f"start_with.{i}: {exc}")
    return errors


def validate_search(raw: dict) -> SearchSetup:
    """Check a parsed search config; ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    # the pipeline check would name a mistyped search key (`objective:`) without the search keys it could be
    allowed = sorted({*PipelineConfig.model_fields, *SEARCH_KEYS})
    unknown = [k for k in raw if k not in allowed]
    if unknown:
        raise ConfigError("\n".join(
            f"{k}: unknown option {k!r}" + "".join(f"; did you mean {m!r}?" for m in
                                                   difflib.get_close_matches(str(k), allowed, n=1))
            + f" (allowed: {', '.join(allowed)})" for k in unknown))
    try:
        settings = SearchSettings(**{k: raw[k] for k in SEARCH_KEYS if k in raw})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, SearchSettings)) from None
    errors: list[str] = []
    objectives = _objectives(settings, errors)
    constraints = []
    for i, text in enumerate(settings.constraints):
        c, problem = fig.parse_constraint(text, f"constraints.{i}")
        errors += [problem] if problem else []
        constraints += [c] if c else []
    passes = raw.get("passes") or []
    space, space_errors = find_space(passes)
    errors += space_errors
    for b, branch in enumerate(raw.get("branches") or []):  # else the pass calls the `{search:}` a bad value
        found = find_space(branch.get("passes") or [])[0].params if isinstance(branch, dict) else []
        errors += [f"branches.{b}.{p.where}: branches are not searched (they are not part of the trials); search "
                   "the option in `passes`, or give the branch one value" for p in found]
    if not errors and not space.params:
        errors.append("passes: nothing to search; write an option as {search: [values]} or "
                      "{search: {low: ..., high: ...}}, e.g. quantize: {weight_bits: {search: [4, 8]}}")
    if errors:
        raise ConfigError("\n".join(errors))
    errors += check_values(space, passes)
    if errors:  # values the passes refuse: said before the pipeline check, which would repeat them
        raise ConfigError("\n".join(errors))
    if settings.sampler == "grid" and space.size() is None:
        raise ConfigError("sampler: grid needs every searched option to be a list or a range with a step")
    setup_raw = {k: v for k, v in raw.items() if k not in SEARCH_KEYS}
    setup_raw["passes"] = space.fill(passes, space.first())
    pipeline = validate(setup_raw)
    task = pipeline.config.task
    if pipeline.config.seed >= 2**32 - 64:  # Optuna's samplers take seeds below 2**32; each search process adds its
        # work slot (below 64) to the seed
        errors.append(f"seed: a search seeds Optuna's sampler, which takes seeds below 2**32; give a seed below "
                      f"{2**32 - 64} (got {pipeline.config.seed})")
    # a constraint on a figure the task never gets would be skipped by every trial, so all would pass it
    measured = fig.measured_for(task)
    named = [(f"objectives.{i}", n) for i, (n, _) in enumerate(objectives)]
    named += [(f"constraints.{i}", c.name) for i, c in enumerate(constraints)]
    for where, name in named:
        if fig.base_metric(name) not in measured:
            errors.append(f"{where}: {name} is not measured for task {task}; use one of "
                          f"{', '.join(n for n in fig.METRICS if n in measured)} (or their ratios)")
    setup = SearchSetup(raw, space, settings, objectives, constraints, pipeline)
    bench = pipeline.config.benchmark
    if bench is not None and bench.baseline != "source":
        if "/" in bench.baseline:
            errors.append(f"benchmark.baseline: {bench.baseline!r} is a branch step; a search compares against "
                          "the source or a step of `passes`")
        else:
            searched = [p.where for p in space.params if p.index < setup.baseline_step]
            if searched:
                errors.append(f"benchmark.baseline: {bench.baseline} is what every trial is compared with, so its "
                              f"passes must be fixed, but {', '.join(searched)} is searched; search only the "
                              "passes after it, or compare with the source")
    errors += _start_points(settings, space)
    errors += _coarse_screen(settings, constraints, task)
    if setup.needs_full and (pipeline.config.benchmark is None or pipeline.config.benchmark.latency is None):
        errors.append("benchmark: speed and memory figures come from the benchmark harness; add a `benchmark:` "
                      "section with `latency:` (e.g. benchmark: {backends: [ort-cpu]})")
    elif setup.needs_full and fig.QUALITY.get(task) not in pipeline.config.benchmark.quality:
        # the full measurement then has no quality: each trial would fail after it, or be judged on the slice only
        for where, name in named:
            if fig.base_metric(name) == fig.QUALITY.get(task):
                errors.append(f"benchmark.quality: {where} names {name}, but the full measurement of a trial "
                              f"scores {', '.join(pipeline.config.benchmark.quality) or 'no quality'}; add "
                              f"{fig.QUALITY[task]}")
    if errors:
        raise ConfigError("\n".join(errors))
    return setup


def _coarse_screen(settings: SearchSettings, constraints: list[fig.Constraint], task: str) -> list[str]:
    """An accuracy_ratio bound the classifier screen cannot resolve: when one example of the slice moves
    accuracy by more than the bound allows, a single mistake there prunes a trial the whole eval would keep."""
    if task == "causal-lm":
        return []
    n = settings.screen.max_examples
    return [f"screen.max_examples: {n} examples resolve {100 / n:.2g}% of accuracy, coarser than the "
            f"{100 * (1 - c.bound):.2g}% that `{c.text}` allows, so one mistake on the slice would prune a trial; "
            f"set screen.max_examples to at least {math.ceil(1 / (1 - c.bound))}"
            for c in constraints if c.name == "accuracy_ratio" and c.op in (">=", ">") and 0 < 1 - c.bound < 1 / n]


def load_search_config(path: str | Path, overrides: list[str] | None = None) -> SearchSetup:
    path = Path(path)
    setup = validate_search(apply_overrides(read_config_file(path) or {}, overrides or []))
    setup.path = path
    return setup


def json_schema() -> dict:
    """JSON Schema of search configs: a pipeline config whose pass options may each be `{search: ...}`, with the
    search's own keys (objectives, constraints, budget, screen, sampler, start_with) at the top."""
    from pydantic.json_schema import models_json_schema

    from ..config import json_schema as pipeline_schema

    schema = pipeline_schema()
    defs = schema["$defs"]
    _, top = models_json_schema([(SearchSettings, "validation")], ref_template="#/$defs/{model}")
    settings = top["$defs"].pop(SearchSettings.__name__)
    defs.update(top["$defs"])
    schema["properties"].update(settings["properties"])
    schema["required"] = sorted(set(schema.get("required", [])) | set(settings.get("required", [])))
    defs["SearchValues"] = {
        "type": "object", "additionalProperties": False, "required": [MARKER],
        "description": "search this option: a list of values, a range {low, high, step?, log?}, or `declared` "
                       "(the values the pass declares)",
        "properties": {MARKER: {"anyOf": [
            {"type": "array", "minItems": 1},
            {"type": "object", "additionalProperties": False, "required": ["low", "high"],
             "properties": {"low": {"type": "number"}, "high": {"type": "number"},
                            "step": {"type": "number", "exclusiveMinimum": 0}, "log": {"type": "boolean"}}},
            {"const": "declared"}]}},
    }
    # a searched quantize `method` fits every variant of its options, which `oneOf` (exactly one) refuses
    items = schema["properties"]["passes"]["items"] = copy.deepcopy(schema["properties"]["passes"]["items"])
    for item in items["oneOf"]:
        for prop in item["properties"].values():
            if "oneOf" in prop:
                prop["anyOf"] = prop.pop("oneOf")
    # branches are not searched; a model the passes share with data: or benchmark: is not searched there either
    elsewhere = _option_models({k: v for k, v in schema["properties"].items() if k not in ("passes", "branches")},
                               defs)
    for name in _option_models(schema["properties"]["passes"]["items"], defs) - elsewhere:
        for key, prop in defs[name].get("properties", {}).items():
            defs[name]["properties"][key] = {"anyOf": [prop, {"$ref": "#/$defs/SearchValues"}],
                                             "description": prop.get("description", "")}
    schema["title"] = "compress search"
    return schema


def _option_models(node, defs: dict) -> set[str]:
    """The $defs a pass's options reach (its options class and the models nested in it)."""
    found: set[str] = set()
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            ref = item.get("$ref")
            if isinstance(ref, str) and ref.split("/")[-1] not in found:
                found.add(ref.split("/")[-1])
                stack.append(defs[ref.split("/")[-1]])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found
