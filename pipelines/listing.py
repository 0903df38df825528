"""`compress passes [NAME] [--json]`: every pass and option, nested options as nested options, readable types.

Each option is described once as data (`describe_pass`), then printed as text or as JSON for tools. Every
option carries a `search` slot: the values `compress search` tries when a search config asks for
`{search: declared}` (a list, or a range {low, high, step?, log?}), or None where the pass declares none."""
from __future__ import annotations

import json
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from compress.options import declared_search

_NONE = type(None)
_SCALARS = {bool: "bool", int: "int", float: "float", str: "str"}


def _model_in(ann) -> type[BaseModel] | None:
    """The options model a field holds (itself, optional, or as list items), if any."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in typing.get_args(ann):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _bounds(metadata) -> str:
    lo = hi = None
    for m in metadata:
        for attr, side, op in (("gt", "lo", ">"), ("ge", "lo", ">="), ("lt", "hi", "<"), ("le", "hi", "<=")):
            v = getattr(m, attr, None)
            if v is not None:
                if side == "lo":
                    lo = (op, v)
                else:
                    hi = (op, v)
    return lo, hi


def _num(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def type_name(ann, metadata=()) -> str:
    """`int >= 1`, `float in [0, 1)`, `one of: kl, reverse-kl, jsd`, `list of int`, `options` ..."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if ann is _NONE:
        return "null"
    if ann is Any:
        return "any"
    if origin is typing.Annotated:
        return type_name(args[0], list(metadata) + list(args[1:]))
    if origin in (typing.Union, types.UnionType):
        parts = [type_name(a, metadata) for a in args if a is not _NONE]
        literals = [a for a in args if typing.get_origin(a) is typing.Literal]
        text = " or ".join(parts) if len(literals) != len(parts) or len(parts) == 1 else \
            "one of: " + ", ".join(str(v) for a in literals for v in typing.get_args(a))
        return text + (" or null" if _NONE in args else "")
    if origin is typing.Literal:
        values = [str(v) for v in args]
        return values[0] if len(values) == 1 else "one of: " + ", ".join(values)
    if origin in (list, tuple, set, frozenset):
        return f"list of {type_name(args[0]) if args else 'any'}"
    if origin is dict:
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}" if args else "mapping"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "options"
    base = _SCALARS.get(ann, getattr(ann, "__name__", str(ann).replace("typing.", "")))
    lo, hi = _bounds(metadata)
    if ann is int and lo and lo[0] == ">":  # int > 0 reads better as int >= 1
        lo = (">=", lo[1] + 1)
    if lo and hi:
        return f"{base} in {'[' if lo[0] == '>=' else '('}{_num(lo[1])}, {_num(hi[1])}{']' if hi[0] == '<=' else ')'}"
    if lo or hi:
        op, v = lo or hi
        return f"{base} {op} {_num(v)}"
    return base


def _jsonable(v):
    if isinstance(v, BaseModel):
        return v.model_dump(mode="json")
    try:
        json.dumps(v)
        return v
    except TypeError:
        return str(v)


def describe_option(name: str, field: FieldInfo) -> dict:
    entry: dict[str, Any] = {"name": name, "type": type_name(field.annotation, field.metadata),
                             "required": field.is_required(), "description": field.description or ""}
    if not field.is_required():
        entry["default"] = _jsonable(field.get_default(call_default_factory=True))
    nested = _model_in(field.annotation)
    if nested is not None:
        entry["options"] = describe_model(nested)
        if typing.get_origin(field.annotation) in (list,) or any(
                typing.get_origin(a) is list for a in typing.get_args(field.annotation)):
            entry["items"] = True  # the nested options describe each item of a list
    entry["search"] = declared_search(field)  # what `compress search` tries for {search: declared}
    return entry


def describe_model(model: type[BaseModel]) -> list[dict]:
    return [describe_option(n, f) for n, f in model.model_fields.items()]


def describe_pass(name: str, cls) -> dict:
    members = cls.config_classes()
    return {"name": name, "description": cls.description,
            "variants": [{"when": getattr(m, "options_of", "") or None if len(members) > 1 else None,
                          "options": describe_model(m)} for m in members]}


def search_text(spec) -> str:
    """`0.1, 0.25, 0.5` for a choice list; `0.9 to 0.999 (log)` / `1 to 8 step 1` for a range."""
    if isinstance(spec, dict):
        text = f"{_default_text(spec['low'])} to {_default_text(spec['high'])}"
        return text + (f" step {_default_text(spec['step'])}" if spec.get("step") is not None else "") + \
            (" (log)" if spec.get("log") else "")
    return ", ".join(_default_text(v) for v in spec)


def _default_text(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v
    return json.dumps(v)


def _text_options(options: list[dict], indent: str, out: list[str]) -> None:
    width = max((len(o["name"]) for o in options), default=0) + 2
    for o in options:
        default = "required" if o["required"] else f"default {_default_text(o['default'])}"
        kind = o["type"]
        out.append(f"{indent}{o['name']:<{max(width, 22)}} {kind:<34} {default}")
        if o["description"]:
            out.append(f"{indent}    {o['description']}")
        if o.get("search"):
            out.append(f"{indent}    search: {search_text(o['search'])}")
        if o.get("options"):
            out.append(f"{indent}    {'options of each item' if o.get('items') else 'options'}:")
            _text_options(o["options"], indent + "      ", out)


def render_text(described: list[dict]) -> str:
    out: list[str] = []
    for p in described:
        out.append(f"{p['name']}: {p['description']}")
        for v in p["variants"]:
            indent = "    "
            if v["when"]:
                out.append(f"  {v['when']}:")
                indent = "      "
            _text_options(v["options"], indent, out)
        out.append("")
    return "\n".join(out)


def list_passes(name: str | None = None, *, as_json: bool = False) -> str:
    """The text (or JSON) of `compress passes [NAME]`; an unknown NAME is a ConfigError with a suggestion."""
    from compress import passes

    chosen = {name: passes.get(name)} if name else passes.available()
    described = [describe_pass(n, cls) for n, cls in chosen.items()]
    if as_json:
        return json.dumps({"passes": described}, indent=2)
    return render_text(described)
