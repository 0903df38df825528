"""Search spaces: the pass options a search config writes as `{search: ...}` instead of a value.

    prune:    {layer_ratio: {search: [0, 0.1, 0.17, 0.25]}}          a choice list
    lowrank:  {energy: {search: {low: 0.9, high: 0.999, log: true}}}  a range (step: for a grid)
    quantize: {block_size: {search: declared}}                        the values the pass declares

Every value is checked against the pass's own options class before any trial runs, so a value the pass would
refuse is a config error naming the option, not a failed trial an hour in."""
from __future__ import annotations

import copy
import difflib
import json
import math
from dataclasses import dataclass
from typing import Any

from compress import passes as pass_registry
from compress.errors import ConfigError
from compress.options import declared_search

MARKER = "search"
_SCALAR = (type(None), bool, int, float, str)


def is_marker(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {MARKER}


@dataclass(frozen=True)
class Param:
    """One searched option: where it is (pass index, pass name, option path) and the values it may take."""

    index: int
    pass_name: str
    path: tuple[str, ...]
    choices: tuple | None = None  # a choice list, or None for a range
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    @property
    def name(self) -> str:
        """The Optuna parameter name, e.g. `1.quantize.weight_bits` (the index tells two passes apart)."""
        return f"{self.index}.{self.pass_name}.{'.'.join(self.path)}"

    @property
    def where(self) -> str:
        """Where the option sits in the config, as errors name it."""
        return f"passes.{self.index}.{self.pass_name}.{'.'.join(self.path)}"

    @property
    def label(self) -> str:
        """Short name for tables: `quantize.weight_bits`."""
        return f"{self.pass_name}.{'.'.join(self.path)}"

    @property
    def is_int(self) -> bool:
        return self.choices is None and all(isinstance(v, int) and not isinstance(v, bool)
                                            for v in (self.low, self.high, self.step or 1))

    def first(self):
        return self.choices[0] if self.choices is not None else self.low

    def edge_values(self) -> list:
        """The values checked before the search: every choice, or both ends of a range."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]

    # Optuna's categorical choices must be scalars: a list value (prune's targets) travels as its JSON text.
    def encode(self, value):
        return value if isinstance(value, _SCALAR) else json.dumps(value)

    def decode(self, value):
        if self.choices is None:
            return int(value) if self.is_int else float(value)
        for c in self.choices:
            if self.encode(c) == value:
                return c
        return value

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.choices is not None:
            return CategoricalDistribution([self.encode(c) for c in self.choices])
        if self.is_int:
            return IntDistribution(self.low, self.high, step=self.step or 1, log=self.log)
        return FloatDistribution(self.low, self.high, step=self.step, log=self.log)

    def size(self) -> int | None:
        """How many values it can take (None: a continuous range)."""
        if self.choices is not None:
            return len(self.choices)
        if self.step is not None:
            return int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return None


@dataclass
class Space:
    params: list[Param]

    def size(self) -> int | None:
        """Combinations in the space (None when a range is continuous)."""
        total = 1
        for p in self.params:
            n = p.size()
            if n is None:
                return None
            total *= n
        return total

    def first(self) -> dict[str, Any]:
        return {p.name: p.first() for p in self.params}

    def fill(self, passes: list[dict], values: dict[str, Any]) -> list[dict]:
        """`passes` with every `{search: ...}` replaced by its value in `values` (by parameter name)."""
        out = copy.deepcopy(passes)
        for p in self.params:
            node = out[p.index][p.pass_name]
            for key in p.path[:-1]:
                node = node[key]
            node[p.path[-1]] = values[p.name]
        return out

    def options(self, values: dict[str, Any]) -> dict[str, Any]:
        """`{label: value}` for tables and trials.json."""
        return {p.label if sum(q.label == p.label for q in self.params) == 1 else p.name: values[p.name]
                for p in self.params}


def _field_of(pass_name: str, options: dict, path: tuple[str, ...]):
    """The pydantic field an option path names (the variant chosen by a fixed `method` for quantize); None
    for an unknown pass or option."""
    if pass_name not in pass_registry.available():
        return None
    members = pass_registry.get(pass_name).config_classes()
    method = options.get("method")
    model = members[0]
    if len(members) > 1 and isinstance(method, str):
        model = next((m for m in members if method in _literal_values(m, "method")), members[0])
    return _field_in(model, path)


def _field_in(model, path: tuple[str, ...]):
    from pipelines.listing import _model_in

    field = None
    for key in path:
        if model is None or key not in model.model_fields:
            return None
        field = model.model_fields[key]
        model = _model_in(field.annotation)
    return field


def _literal_values(model, name: str) -> tuple:
    import typing

    field = model.model_fields.get(name)
    return typing.get_args(field.annotation) if field is not None else ()


def _float_only(field) -> bool:
    """Whether an option takes floats and not ints (`float`, `float | None`)."""
    import typing

    kinds = (typing.get_args(field.annotation) or (field.annotation,)) if field is not None else ()
    return float in kinds and int not in kinds


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _param(index: int, pass_name: str, options: dict, path: tuple[str, ...], spec, errors: list[str]) -> Param | None:
    where = f"passes.{index}.{pass_name}.{'.'.join(path)}"
    if spec == "declared":
        field = _field_of(pass_name, options, path)
        spec = declared_search(field) if field is not None else None
        if spec is None:
            errors.append(f"{where}: `search: declared`, but {pass_name} declares no search values for this option "
                          "(see `compress passes " + pass_name + "`); give a list, e.g. {search: [a, b]}")
            return None
    if isinstance(spec, list):
        if not spec:
            errors.append(f"{where}.search: an empty list; give the values to try, e.g. {{search: [a, b]}}")
            return None
        unique = list({json.dumps(v, sort_keys=True): v for v in spec}.values())
        if len(unique) != len(spec):
            errors.append(f"{where}.search: a value is listed twice; list each value once")
            return None
        return Param(index, pass_name, path, choices=tuple(spec))
    if isinstance(spec, dict):
        unknown = set(spec) - {"low", "high", "step", "log"}
        low, high, step, log = spec.get("low"), spec.get("high"), spec.get("step"), spec.get("log", False)
        problem = None
        if unknown:
            problem = f"unknown key {sorted(unknown)[0]!r}; a range has low, high and optionally step or log"
        elif not (_number(low) and _number(high)):
            problem = "a range needs numbers low and high, e.g. {search: {low: 0.9, high: 0.99}}"
        elif low >= high:
            problem = f"low ({low}) must be below high ({high})"
        elif step is not None and (not _number(step) or step <= 0):
            problem = f"step must be a positive number (got {step!r})"
        elif step is not None and (high - low) / step + 1e-9 < 1:  # the grid would hold `low` alone (as size())
            problem = f"step ({step}) is larger than the range {low} to {high}, which would leave only {low}"
        elif not isinstance(log, bool):
            problem = f"log must be true or false (got {log!r})"
        elif log and (step is not None or low <= 0):
            problem = "log: true needs low > 0 and no step"
        if problem:
            errors.append(f"{where}.search: {problem}")
            return None
        if _float_only(_field_of(pass_name, options, path)):  # YAML's `low: 1` of a float option is not an int range
            low, high = float(low), float(high)
        return Param(index, pass_name, path, low=low, high=high, step=step, log=log)
    errors.append(f"{where}.search: expected a list of values, a range {{low, high, step?, log?}} or `declared` "
                  f"(got {spec!r})")
    return None


def _walk(index: int, pass_name: str, options: dict, node: dict, path: tuple, out: list, errors: list) -> None:
    for key, value in node.items():
        if is_marker(value):
            param = _param(index, pass_name, options, path + (key,), value[MARKER], errors)
            if param is not None:
                out.append(param)
        elif isinstance(value, dict) and (MARKER in value or difflib.get_close_matches(
                str(next(iter(value), "")), [MARKER], cutoff=0.8) and len(value) == 1):
            # otherwise the pass gets the dict as the option's value, or with nothing else searched the error
            # says only that there is nothing to search
            where = f"passes.{index}.{pass_name}.{'.'.join(path + (key,))}"
            errors.append(f"{where}: {value} is not a search space; write {{search: ...}} with no other key, "
                          "e.g. {search: [4, 8]}")
        elif isinstance(value, dict):
            _walk(index, pass_name, options, value, path + (key,), out, errors)


def find_space(passes: list) -> tuple[Space, list[str]]:
    """The searched options of a config's `passes` list, and the problems of their `search:` specs."""
    params: list[Param] = []
    errors: list[str] = []
    for i, item in enumerate(passes or []):
        if isinstance(item, dict) and len(item) == 1:
            (name, options), = item.items()
            if isinstance(options, dict):
                _walk(i, name, options, options, (), params, errors)
    return Space(params), errors


def _without(passes: list[dict], params: list[Param]) -> list[dict]:
    """`passes` with the options of `params` removed (left at the pass's defaults)."""
    out = copy.deepcopy(passes)
    for p in params:
        node = out[p.index][p.pass_name]
        for key in p.path[:-1]:
            node = node[key]
        node.pop(p.path[-1], None)
    return out


def check_values(space: Space, passes: list[dict]) -> list[str]:
    """Every value of every choice list (and both ends of every range) built into the pass's own options: the
    refusals, each naming the option, value and reason. A value counts as valid when it builds with the other
    searched options left at their defaults or at their first values (so a value that needs another option's
    setting, such as gptq with weight_bits 4, is not refused for a default)."""
    errors: list[str] = []
    first = space.first()
    for p in space.params:
        if p.pass_name not in pass_registry.available():
            continue  # the pipeline check names an unknown pass once, with the closest name
        members = pass_registry.get(p.pass_name).config_classes()
        if all(_field_in(m, p.path) is None for m in members):  # no value can help: not a values problem
            allowed = sorted({k for m in members for k in m.model_fields}) if len(p.path) == 1 else []
            errors.append(f"{p.where}: {p.pass_name} has no option {'.'.join(p.path)!r}"
                          + (f" (allowed: {', '.join(allowed)})" if allowed else "")
                          + f"; see `compress passes {p.pass_name}`")
            continue
        alone = _without(passes, [q for q in space.params if q is not p])
        for value in p.edge_values():
            reason = None
            for filled in (Space([p]).fill(alone, {p.name: value}), space.fill(passes, {**first, p.name: value})):
                try:
                    pass_registry.get(p.pass_name)(**(filled[p.index][p.pass_name] or {}))
                    reason = None
                    break
                except ConfigError as exc:
                    lines = [ln.strip() for ln in str(exc).splitlines()]
                    own = [ln for ln in lines if f".{p.path[-1]}:" in ln or f".{p.path[-1]}." in ln]
                    reason = reason or "; ".join(own or lines)
            if reason:
                errors.append(f"{p.where}: the search value {json.dumps(value)} is refused by the {p.pass_name} "
                              f"pass ({reason}); remove it from the search list or change it")
    return errors
