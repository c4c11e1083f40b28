"""The JSON shapes of OpenAI's answers: chat.completion(.chunk) and text_completion, from choices' pieces.

ChatFormat splits each choice's text into reasoning_content and content (ReasoningParser, one per
choice) when the model has think markers; CompletionFormat passes text through. Both build the
streamed chunks of one piece and the whole answer of a non-streaming request, with exact usage:
prompt tokens once per prompt (as the router counted them), completion tokens summed over choices.
"""

from __future__ import annotations

import time

from hmoe.runtime.client import Result
from hmoe.runtime.http.choices import Piece
from hmoe.runtime.http.logprobs import TokenText, chat_logprobs, completion_logprobs
from hmoe.runtime.http.reasoning import ReasoningParser, split_reasoning


def usage_of(results: list[Result | None], n: int) -> dict:
    """One prompt per n consecutive choices: its tokens count once."""
    prompt = sum(r.usage.prompt_tokens for r in results[::n] if r is not None)
    cached = sum(r.usage.cached_tokens for r in results[::n] if r is not None)
    completion = sum(r.usage.output_tokens for r in results if r is not None)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def finish_reason(result: Result | None) -> str:
    return result.finish_reason if result is not None else "error"


class _Format:
    object_chunk = object_whole = ""

    def __init__(self, response_id: str, model: str, tokens: TokenText | None = None):
        self.id, self.model, self.created = response_id, model, int(time.time())
        self.tokens = tokens  # set when the request asked for logprobs

    def _chunk(self, choices: list[dict]) -> dict:
        return {
            "id": self.id,
            "object": self.object_chunk,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def with_usage(self, chunk: dict, include_usage: bool) -> dict:
        return chunk | {"usage": None} if include_usage else chunk

    def usage_chunk(self, usage: dict) -> dict:
        return self._chunk([]) | {"usage": usage}

    def first_chunk(self, index: int) -> dict | None:
        return None


class ChatFormat(_Format):
    object_chunk, object_whole = "chat.completion.chunk", "chat.completion"

    def __init__(self, response_id: str, model: str, reasoning: bool, opened: bool, tokens: TokenText | None = None):
        super().__init__(response_id, model, tokens)
        self.reasoning, self.opened = reasoning, opened
        self.parsers: dict[int, ReasoningParser] = {}

    def first_chunk(self, index: int) -> dict:
        return self._chunk([self._choice(index, {"role": "assistant", "content": ""})])

    def _choice(self, index: int, delta: dict, reason: str | None = None, logprobs: dict | None = None) -> dict:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}

    def _logprobs(self, token_ids, logprobs) -> dict | None:
        return chat_logprobs(self.tokens, token_ids, logprobs) if self.tokens is not None else None

    def _split(self, index: int, text: str, final: bool) -> dict:
        if not self.reasoning:
            return {"content": text} if text else {}
        parser = self.parsers.setdefault(index, ReasoningParser(self.opened))
        reasoning, content = parser.flush() if final else parser.push(text)
        return {k: v for k, v in (("reasoning_content", reasoning), ("content", content)) if v}

    def piece_chunks(self, piece: Piece, result: Result | None) -> list[dict]:
        if piece.chunk is not None:
            delta = self._split(piece.index, piece.chunk.text, final=False)
            logprobs = self._logprobs(piece.chunk.token_ids, piece.chunk.logprobs)
            return [self._chunk([self._choice(piece.index, delta, None, logprobs)])] if delta or logprobs else []
        out = []
        if delta := self._split(piece.index, "", final=True):
            out.append(self._chunk([self._choice(piece.index, delta)]))
        out.append(self._chunk([self._choice(piece.index, {}, finish_reason(result))]))
        return out

    def response(self, done: list[tuple[list, Result]], prompts: list[list[int]], n: int) -> dict:
        choices = []
        for index, (_, result) in enumerate(done):
            message = {"role": "assistant", "content": result.text}
            if self.reasoning:
                reasoning, content = split_reasoning(result.text, self.opened)
                message = {"role": "assistant", "content": content, "reasoning_content": reasoning or None}
            logprobs = self._logprobs(result.token_ids, result.logprobs)
            choices.append(
                {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason(result)}
            )
        return {
            "id": self.id,
            "object": self.object_whole,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage_of([r for _, r in done], n),
        }


class CompletionFormat(_Format):
    object_chunk = object_whole = "text_completion"

    def __init__(self, response_id: str, model: str, tokens: TokenText | None = None):
        super().__init__(response_id, model, tokens)
        self.offsets: dict[int, int] = {}  # choice -> text streamed so far (the next token's text_offset)

    def _choice(self, index: int, text: str, reason: str | None = None, logprobs: dict | None = None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def _logprobs(self, index: int, token_ids, logprobs) -> dict | None:
        if self.tokens is None:
            return None
        out = completion_logprobs(self.tokens, token_ids, logprobs, self.offsets.get(index, 0))
        if out is not None and out["tokens"]:
            self.offsets[index] = out["text_offset"][-1] + len(out["tokens"][-1])
        return out

    def piece_chunks(self, piece: Piece, result: Result | None) -> list[dict]:
        if piece.chunk is not None:
            logprobs = self._logprobs(piece.index, piece.chunk.token_ids, piece.chunk.logprobs)
            if not piece.chunk.text and not logprobs:
                return []
            return [self._chunk([self._choice(piece.index, piece.chunk.text, None, logprobs)])]
        return [self._chunk([self._choice(piece.index, "", finish_reason(result))])]

    def response(self, done: list[tuple[list, Result]], prompts: list[list[int]], n: int) -> dict:
        choices = [
            self._choice(i, r.text, finish_reason(r), self._logprobs(i, r.token_ids, r.logprobs))
            for i, (_, r) in enumerate(done)
        ]
        return {
            "id": self.id,
            "object": self.object_whole,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage_of([r for _, r in done], n),
        }
