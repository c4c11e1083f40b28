"""HmoeError: the one error type users see, with a stable code (snake_case, never renamed) and a
sentence that says what happened and what to do. Sent over the wire as {code, message}."""

from __future__ import annotations


class HmoeError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code

    @property
    def message(self) -> str:
        return self.args[0]

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"
