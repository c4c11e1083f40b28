"""SamplingParams: how one request picks its tokens and when it stops; validated once, at the edge.

It rides in messages as it is (Generate, Prefill, Adopt), so its checks run where a frame is decoded.
The rules that follow from it are spelled here once: why a sequence ends (`finish_reason`) and the
KV a request needs (`kv_need`).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, Literal

from hmoe.runtime.errors import HmoeError

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20

FinishReason = Literal["stop", "length"]  # how a worker ends a sequence (the router adds cancelled, ...)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 keeps every token
    seed: int | None = None  # None: a fresh seed per request
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings, matched on the detokenized text by the router
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: each token's logprob and the k most likely alternatives

    STRICT_CODE: ClassVar[str] = "invalid_sampling"  # the codec refuses unknown keys: never drop an option

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> HmoeError:
            return HmoeError("invalid_sampling", f"{field}: {why}")

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or not 0 <= self.temperature <= 100:
            raise bad("temperature", f"must be a number in [0, 100], got {self.temperature!r}")
        if not _is_number(self.top_p) or not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise bad("top_k", f"must be an integer >= 0 (0 keeps all tokens), got {self.top_k!r}")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63
        ):
            raise bad("seed", f"must be an integer in [0, 2**63), got {self.seed!r}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            raise bad("stop_token_ids", f"must be at most {MAX_STOP_TOKEN_IDS} non-negative integers")
        if len(self.stop) > MAX_STOP_STRINGS or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_STRING_LEN for s in self.stop
        ):
            raise bad("stop", f"must be at most {MAX_STOP_STRINGS} non-empty strings of <= {MAX_STOP_STRING_LEN} chars")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "must be true or false")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int)
            or isinstance(self.logprobs, bool)
            or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}] or null, got {self.logprobs!r}")


def _is_number(value) -> bool:
    """An int or float, and not a bool (JSON's true is not 1 here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def with_seed(params: SamplingParams) -> SamplingParams:
    """Fix a fresh random seed where none was given: once, where a request enters the service (the
    router, or `generate` offline), so the prefill and decode workers sample alike."""
    return params if params.seed is not None else dataclasses.replace(params, seed=secrets.randbits(63))


def require_seed(params: SamplingParams) -> SamplingParams:
    """Workers: a sampled request reaches them with the seed the router gave it, or it is refused."""
    if params.temperature > 0 and params.seed is None:
        raise HmoeError("invalid_sampling", "a sampled request needs a seed here (the router assigns one)")
    return params


def finish_reason(
    token_id: int, num_generated: int, params: SamplingParams, eos_ids: Iterable[int]
) -> FinishReason | None:
    """Why a sequence ends after emitting token_id as its num_generated-th token, or None."""
    if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in eos_ids):
        return "stop"
    if num_generated >= params.max_tokens:
        return "length"
    return None


def kv_need(prompt_len: int, params: SamplingParams) -> int:
    """Tokens of KV a request reserves at its decode worker: the prompt and every token it may generate."""
    return prompt_len + params.max_tokens
