"""Logprobs in OpenAI's two shapes, from what the workers send: per token [logprob, [[id, logprob], ...]].

Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}.
Completions: {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}.
A token's bytes are its own (a byte-level BPE token may hold part of a UTF-8 character: its text is
then shown with U+FFFD, its bytes exactly), read from the vocabulary, not by decoding it alone.
"""

from __future__ import annotations

from functools import lru_cache


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte <-> printable character table that byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class TokenText:
    """token id -> (text, bytes) for the model's tokenizer (tokenizers.Tokenizer), cached."""

    def __init__(self, tokenizer):
        from tokenizers import decoders

        self.tokenizer = tokenizer
        self.byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
        self.added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        self.alphabet = _byte_level_alphabet()
        self.of = lru_cache(maxsize=1 << 16)(self._of)

    def _of(self, token_id: int) -> tuple[str, bytes]:
        piece = self.tokenizer.id_to_token(token_id)
        if token_id in self.added or piece is None:
            text = self.added.get(token_id) or self.tokenizer.decode([token_id], skip_special_tokens=False)
            return text, text.encode()
        if self.byte_level and all(c in self.alphabet for c in piece):
            raw = bytes(self.alphabet[c] for c in piece)
            return raw.decode("utf-8", errors="replace"), raw
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text, text.encode()


def chat_logprobs(tokens: TokenText, token_ids, logprobs) -> dict | None:
    """The chat `logprobs` object of these tokens (None when none were sent)."""
    if logprobs is None:
        return None
    content = []
    for token_id, entry in zip(token_ids, logprobs):
        if entry is None:
            continue
        text, raw = tokens.of(token_id)
        top = []
        for alt_id, alt_logprob in entry[1]:
            alt_text, alt_raw = tokens.of(alt_id)
            top.append({"token": alt_text, "logprob": alt_logprob, "bytes": list(alt_raw)})
        content.append({"token": text, "logprob": entry[0], "bytes": list(raw), "top_logprobs": top})
    return {"content": content}


def completion_logprobs(tokens: TokenText, token_ids, logprobs, offset: int = 0) -> dict | None:
    """The completions `logprobs` object; text offsets count from `offset` (the text before these)."""
    if logprobs is None:
        return None
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, entry in zip(token_ids, logprobs):
        if entry is None:
            continue
        text = tokens.of(token_id)[0]
        out["tokens"].append(text)
        out["token_logprobs"].append(entry[0])
        out["top_logprobs"].append({tokens.of(alt_id)[0]: alt_logprob for alt_id, alt_logprob in entry[1]})
        out["text_offset"].append(offset)
        offset += len(text)
    return out
