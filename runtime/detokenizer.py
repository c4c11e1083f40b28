"""Detokenizer: token ids -> text, incrementally, never splitting a UTF-8 character.

Byte-level tokenizers cut characters across tokens: "é" may be two tokens, each decoding alone to
U+FFFD. Each step decodes a short window (a few settled tokens of left context plus the unsettled
ones) and emits only the text past what that context already produced; while the window's text
ends in U+FFFD the rest of the character is awaited. A random model can emit byte sequences that
never complete: after MAX_HOLD_TOKENS the replacement character is emitted as is, so text never
stalls. Emitted pieces concatenate to the whole text (`flush` gives the rest at the end).
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 4  # settled tokens decoded with the new ones, so leading-space rules apply
MAX_HOLD_TOKENS = 4  # a UTF-8 character is at most 4 bytes, so at most 4 byte tokens


class Decoder(Protocol):
    """What a `tokenizers.Tokenizer` offers (tests pass a stand-in)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class Detokenizer:
    """One request's output ids -> text pieces (push ↔ flush)."""

    __slots__ = ("decoder", "ids", "prefix_offset", "read_offset")

    def __init__(self, decoder: Decoder):
        self.decoder = decoder
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: settled context
        self.read_offset = 0  # tokens before this are already emitted

    def push(self, token_ids: list[int]) -> str:
        """Append tokens; the newly complete text (may be "")."""
        self.ids.extend(token_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self.read_offset == len(self.ids):
            return ""
        settled = self.decoder.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        text = self.decoder.decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        incomplete = text.endswith(REPLACEMENT)
        if incomplete and not final and len(self.ids) - self.read_offset < MAX_HOLD_TOKENS:
            return ""
        # The next window starts at a character boundary: after this piece, or after a forced U+FFFD.
        self.prefix_offset = len(self.ids) if incomplete else max(self.read_offset, len(self.ids) - CONTEXT_TOKENS)
        self.read_offset = len(self.ids)
        return text[len(settled) :]
