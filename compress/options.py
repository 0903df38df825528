"""The base of every options model (pass options and their groups): unknown keys are errors."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class PassConfig(BaseModel):
    """Base of every pass's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
