"""The base of every options model (pass options and their groups): unknown keys are errors, and so are
NaN and infinity in a float option (no option of the suite means anything when not finite), and true / false
where a number is expected (YAML's `ratio: true` is not 1)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, field_validator


def _bool_became_number(given, validated) -> bool:
    """Whether validation turned a true / false in `given` into a number (pydantic's lax mode reads true as
    1); looks inside lists, tuples and dict values. Nested option models check their own fields."""
    if isinstance(given, bool):
        return isinstance(validated, (int, float)) and not isinstance(validated, bool)
    if isinstance(given, (list, tuple)) and isinstance(validated, (list, tuple)):
        return any(_bool_became_number(g, v) for g, v in zip(given, validated))
    if isinstance(given, dict) and isinstance(validated, dict):
        return any(_bool_became_number(g, validated[k]) for k, g in given.items() if k in validated)
    return False


class Options(BaseModel):
    """Base of every options model (a pass's, and the pipeline config's sections): unknown keys, non-finite
    floats and bools for numbers are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="wrap")
    @classmethod
    def _no_bool_for_number(cls, value, handler):
        refusal = f"true / false is not a value of this option (got {value!r}; YAML's true is not 1)"
        try:
            validated = handler(value)
        except ValueError:
            if isinstance(value, bool):  # e.g. "should be less than 1" for ratio: true; say what is wrong
                raise ValueError(refusal) from None
            raise
        if _bool_became_number(value, validated):
            raise ValueError(refusal)
        return validated


class PassConfig(Options):
    """Base of every pass's options."""


def search(values: list | None = None, *, low: float | None = None, high: float | None = None,
           step: float | None = None, log: bool = False) -> dict:
    """The values worth trying for an option, declared beside it:
    `Field(0.25, ..., json_schema_extra=search([0.1, 0.25, 0.5]))` (a choice list) or
    `json_schema_extra=search(low=0.9, high=0.999)` (a range). `compress passes` shows them, the JSON Schema
    carries them, and a search config can ask for them with `{search: declared}`."""
    if (values is None) == (low is None or high is None):
        raise ValueError("search(): give either a list of values or low and high")
    if values is not None:
        return {"search": list(values)}
    spec: dict = {"low": low, "high": high}
    if step is not None:
        spec["step"] = step
    if log:
        spec["log"] = True
    return {"search": spec}


def declared_search(field) -> list | dict | None:
    """The search values a pydantic field declares with `search()`, else None."""
    extra = getattr(field, "json_schema_extra", None)
    return extra.get("search") if isinstance(extra, dict) else None
