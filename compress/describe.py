"""Pass options as people read them: the options not at their defaults, on one line.

    options_line(prune_config)  ->  "ratio=0.25, importance=activation, recover.max_steps=20"

Used by the runner's progress messages and by the model card's lineage (compress/model_card.py)."""
from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

_ALWAYS = ("method",)  # the choice that selects a pass's options class: always shown


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and (value or not prefix):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = value


def changed_options(config: BaseModel | dict) -> dict[str, Any]:
    """The options of `config` that differ from their defaults, nested ones as dotted names (JSON values).

    A plain dict (a manifest's stored options) is taken as it is: every key counts as set."""
    if isinstance(config, BaseModel):
        data = config.model_dump(mode="json", exclude_defaults=True)
        for name in _ALWAYS:
            if name in type(config).model_fields and name not in data:
                data = {name: getattr(config, name), **data}
    else:
        data = dict(config)
    out: dict[str, Any] = {}
    _flatten(data, "", out)
    return out


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value, separators=(", ", ": "))


def options_line(config: BaseModel | dict, *, max_len: int = 160) -> str:
    """`name=value, ...` for the options not at their defaults; "defaults" when there are none."""
    items = changed_options(config)
    if not items:
        return "defaults"
    line = ", ".join(f"{k}={_text(v)}" for k, v in items.items())
    return line if len(line) <= max_len else line[: max_len - 3].rstrip(", ") + "..."


def stored_options(pass_name: str, options: dict) -> BaseModel | dict:
    """A manifest's stored pass options as the pass's options model (so defaults can be left out), or the
    dict itself when the pass is not registered here or the options no longer validate."""
    try:
        from .passes import get

        return get(pass_name)(**(options or {})).config
    except Exception:
        return options or {}
