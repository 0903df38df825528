"""The base of every options model (pass options and their groups): unknown keys are errors, and so are
NaN and infinity in a float option (no option of the suite means anything when not finite)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class PassConfig(BaseModel):
    """Base of every pass's options: unknown keys and non-finite floats are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
