"""Errors raised at the edges of the worker side (checkpoints, models, CLI input)."""

from __future__ import annotations

from hmoe.runtime.errors import HmoeError


class CheckpointError(HmoeError):
    """A model folder that cannot be read: missing or truncated files, wrong shapes, unsupported fields."""
