"""Errors raised at the edges of the worker side (checkpoints, models, CLI input).

Every error carries a stable `code` (snake_case, never renamed) and a sentence that says what to do.
"""

from __future__ import annotations


class HmoeError(Exception):
    """An error a user can act on: `code` is stable, the message says what happened and what to do."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code

    def __str__(self) -> str:
        return f"[{self.code}] {self.args[0]}"


class CheckpointError(HmoeError):
    """A model folder that cannot be read: missing or truncated files, wrong shapes, unsupported fields."""
