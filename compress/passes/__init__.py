"""The pass registry. Every module in this package is imported on first use; a pass registers itself
with ``@register``. ``get("prune")(ratio=0.3).run(model, ctx)`` runs one from Python."""
from __future__ import annotations

import difflib
import importlib
import pkgutil

from ..errors import ConfigError
from .base import Pass, PassConfig, PassContext

_REGISTRY: dict[str, type[Pass]] = {}
_discovered = False


def register(cls: type[Pass]) -> type[Pass]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise RuntimeError(f"two passes are named {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    global _discovered
    if not _discovered:
        _discovered = True
        for info in pkgutil.iter_modules(__path__):
            if info.name != "base":
                importlib.import_module(f"{__name__}.{info.name}")


def available() -> dict[str, type[Pass]]:
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> type[Pass]:
    passes = available()
    if name not in passes:
        near = difflib.get_close_matches(name, passes, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"unknown pass {name!r}{hint} (available: {', '.join(passes)})")
    return passes[name]


__all__ = ["Pass", "PassConfig", "PassContext", "available", "get", "register"]
