"""Helpers shared by the runtime tests (imported by name: tests/ has no packages)."""

from __future__ import annotations

from dataclasses import dataclass

EOS = 256


@dataclass
class _Encoding:
    ids: list[int]


class ByteTokenizer:
    """Token i < 256 is byte i; 256 is EOS (a special token: it decodes to nothing)."""

    def encode(self, text: str) -> _Encoding:
        return _Encoding(list(text.encode()))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
