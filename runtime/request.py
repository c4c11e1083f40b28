"""Request: one generation as the router tracks it, from admission to its one Finished message.

Phases: QUEUED (waiting for a prefill worker) -> PREFILL (at a prefill worker) -> HANDOFF (first
token made, KV in a hand-off slot, waiting for a decode worker) -> DECODE (at a decode worker).
Output text goes token ids -> Detokenizer -> StopStrings -> the client, so what a client is shown
is always complete characters and never part of a stop string.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from hmoe.runtime.detokenizer import Decoder, Detokenizer
from hmoe.runtime.protocol import Prefilled, Usage
from hmoe.runtime.sampling_params import SamplingParams, kv_need
from hmoe.runtime.stop_strings import StopStrings


class Phase(enum.Enum):
    QUEUED = "queued"
    PREFILL = "prefill"
    HANDOFF = "handoff"
    DECODE = "decode"


class _NoText:
    """The decoder when no tokenizer is known: token ids only, empty text."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""


@dataclass(eq=False, slots=True)
class Request:
    request_id: str
    client: bytes  # the client's ZeroMQ routing id
    prompt_ids: Sequence[int]  # TokenIds (packed once: Prefill sends them as they are) or a list
    params: SamplingParams
    stream: bool
    arrival_s: float
    deadline_s: float = math.inf
    decoder: Decoder | None = None
    phase: Phase = Phase.QUEUED
    prefill_worker: bytes | None = None  # routing id of the prefill worker that has (had) it
    decode_worker: bytes | None = None  # routing id of the decode worker it is (or will be) at
    prefilled: Prefilled | None = None  # its first token and the hand-off slot its KV waits in (from HANDOFF on)
    retried: bool = False  # sent to prefill again after its prefill worker died
    output_ids: list[int] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    prefill_start_s: float | None = None  # when it last left the queue for a prefill worker
    output_logprobs: list | None = None  # per output token, when params.logprobs asks for them
    first_token_s: float = 0.0
    last_token_s: float = 0.0
    detokenizer: Detokenizer = field(init=False)
    stop_strings: StopStrings = field(init=False)

    def __post_init__(self) -> None:
        self.detokenizer = Detokenizer(self.decoder or _NoText())
        self.stop_strings = StopStrings(self.params.stop)

    @property
    def kv_tokens(self) -> int:
        """KV the decode worker reserves for it: the prompt and every token it may generate."""
        return kv_need(len(self.prompt_ids), self.params)

    def add_tokens(self, token_ids: list[int], now: float, logprobs: list | None = None) -> str:
        """Record generated tokens (and their logprobs, when asked); the text they make visible (stops at a
        stop string)."""
        if not self.output_ids:
            self.first_token_s = now
        if self.params.logprobs is not None:
            self.output_logprobs = (self.output_logprobs or []) + (logprobs or [None] * len(token_ids))
        self.last_token_s = now
        self.output_ids.extend(token_ids)
        text = self.stop_strings.push(self.detokenizer.push(token_ids))
        self.text_parts.append(text)
        return text

    def flush_text(self) -> str:
        """At the end: text held back for an incomplete character or a possible stop string."""
        if self.stop_strings.stopped:
            return ""
        text = self.stop_strings.push(self.detokenizer.flush())
        text += self.stop_strings.flush() if not self.stop_strings.stopped else ""
        self.text_parts.append(text)
        return text

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def usage(self) -> Usage:
        n = len(self.output_ids)
        return Usage(
            prompt_tokens=len(self.prompt_ids),
            output_tokens=n,
            ttft_s=round(self.first_token_s - self.arrival_s, 6) if n else None,
            tpot_s=round((self.last_token_s - self.first_token_s) / (n - 1), 6) if n > 1 else None,
            queue_s=round(self.prefill_start_s - self.arrival_s, 6) if self.prefill_start_s is not None else None,
            cached_tokens=self.prefilled.cached_tokens if self.prefilled else 0,
        )
