"""SamplingParams: how one request picks its tokens and when it stops; validated once, at the edge."""

from __future__ import annotations

import dataclasses
import math
import secrets
from dataclasses import dataclass

from hmoe.runtime.errors import HmoeError

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20


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
