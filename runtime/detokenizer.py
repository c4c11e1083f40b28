"""Detokenizer: token ids -> text, incrementally, never splitting a UTF-8 character.

Byte-level tokenizers cut characters across tokens: "é" may be two tokens, each decoding alone to
U+FFFD. Each step decodes a short window (a few settled tokens of left context plus the unsettled
ones) and emits only the text past what that context already produced; while the window's text
ends in U+FFFD the rest of the character is awaited. A random model can emit byte sequences that
never complete: after MAX_HOLD_TOKENS they are emitted as U+FFFD, so text never stalls, while the
last few tokens stay held if they begin a character that may still complete. Emitted pieces
concatenate to the tokenizer's decode of all the ids (`flush` gives the rest at the end).
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
        end = len(self.ids)
        incomplete = text.endswith(REPLACEMENT)
        if incomplete and not final:
            if end - self.read_offset < MAX_HOLD_TOKENS:
                return ""
            # Held long enough. What precedes a character still coming in is final (stray bytes, or whole
            # characters pushed together with its first bytes): emit that and keep waiting on the character.
            start = self._incomplete_start(text)
            if start is not None:
                end, incomplete = start, False
                text = self.decoder.decode(self.ids[self.prefix_offset : end], skip_special_tokens=True)
        # The next window starts at a character boundary: after this piece, or after a forced U+FFFD.
        self.prefix_offset = end if incomplete else max(self.read_offset, end - CONTEXT_TOKENS)
        self.read_offset = end
        return text[len(settled) :]

    def _incomplete_start(self, text: str) -> int | None:
        """The first of the last few tokens that decode to one trailing U+FFFD, the rest unchanged; or None."""
        for start in range(len(self.ids) - 1, max(self.read_offset, len(self.ids) - MAX_HOLD_TOKENS), -1):
            head = self.decoder.decode(self.ids[self.prefix_offset : start], skip_special_tokens=True)
            tail = self.decoder.decode(self.ids[start:], skip_special_tokens=True)
            if tail == REPLACEMENT and head + REPLACEMENT == text:
                return start
        return None
