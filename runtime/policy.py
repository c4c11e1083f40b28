"""Scheduling policy: which queued prompt prefills next, and on which prefill worker. Pure functions,
no state, no I/O.

The Scheduler owns the queue and the workers; it asks `prefill_order` in which order to try the
queued requests, and sends the first one a decode worker has room for. The rule:

- A request sent back after its prefill worker died goes first (it has waited longest already).
- Otherwise shortest prompt first, so a short prompt is not stuck behind a 32K one (SGLang's users
  measured 50 ms vs 22.9 s p99 TTFT for exactly this), oldest first among equals.
- No starvation: a request that has waited `starve_s` or longer is "due". Due requests go before
  everything else, oldest first, and the first due request *blocks* the ones behind it when no
  decode worker has room for it yet (`blocking`), so a stream of short prompts cannot keep a long
  one's KV reservation from ever fitting.

Among idle prefill workers, a prompt goes to the one that last prefilled the longest prefix of it (its
prefix cache likely still holds that KV), else to the first idle one (`prefill_worker_for`).

A short prompt need not wait for a long one to finish prefilling: when no prefill worker is idle, a
prompt of at most `interleave_max_tokens` goes to a worker running a longer one, which runs it
between two of the long one's layers (`interleaves`): the long one is delayed by the short one's
prefill, the short one's TTFT no longer includes the long one's. Short prompts that keep coming must
not starve the long one: after an interleaved prompt took t seconds, the long one runs at least
t * (1 - INTERLEAVE_SHARE) / INTERLEAVE_SHARE before the next may interrupt it (`next_interleave_s`),
so interleaving delays it by at most a third.

CPU cores follow the work (`cpu_threads`): a prefill and a decode worker split the cores half and half
while both run their experts on the CPU kernels; when the prefill worker streams long prompts' experts
to a GPU, the decode worker takes most of them (its kernels read the experts every step) and the
prefill worker keeps an eighth, enough for the passes too short to stream (its streaming threshold is
measured with those threads, so fewer of them make more passes stream). Cores are not lent back and
forth at run time: two processes' kernel pools on the same cores spin against each other (decode
was 20x slower so on 2 cores).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

W = TypeVar("W")


@dataclass(frozen=True, slots=True)
class Queued:
    """A queued request as the policy sees it."""

    request_id: str
    prompt_tokens: int
    arrival_s: float
    retried: bool = False


def is_due(item: Queued, now: float, starve_s: float) -> bool:
    return item.retried or now - item.arrival_s >= starve_s


def prefill_order(queue: Sequence[Queued], now: float, starve_s: float) -> list[Queued]:
    """The queue in the order the Scheduler should try it (see the module doc)."""

    def key(item: Queued) -> tuple:
        if is_due(item, now, starve_s):
            return (0, not item.retried, item.arrival_s)
        return (1, item.prompt_tokens, item.arrival_s)

    return sorted(queue, key=key)


def blocking(item: Queued, now: float, starve_s: float) -> bool:
    """Whether nothing behind `item` may go while it waits for decode room (it is due)."""
    return is_due(item, now, starve_s)


def prefill_worker_for(idle: Sequence[W], matched: Mapping[W, int]) -> W:
    """Of the idle prefill workers (in the pool's order), the one with the most prompt tokens matched
    (PrefixAffinity.matched), the first one among equals."""
    return max(idle, key=lambda w: (matched.get(w, 0), -idle.index(w)))


INTERLEAVE_SHARE = 0.25  # of a prefill worker's time, at most, goes to prompts interleaved into a running one


def next_interleave_s(resumed_s: float, took_s: float) -> float:
    """When a prompt resumed at resumed_s, after an interleaved prompt that took took_s, may be
    interrupted again: its own layers get at least 1 - INTERLEAVE_SHARE of the worker's time. (Without
    it, 16 streams' 32-token prompts, ~1.7 s each on a streaming prefill worker's two CPU threads, could
    interleave one after another into a 32K prompt's 2.6 s pass for as long as they kept coming.)"""
    return resumed_s + took_s * (1 - INTERLEAVE_SHARE) / INTERLEAVE_SHARE


def cpu_threads(role: str, cpus: int, prefill_streams: bool) -> int:
    """Threads (torch and the expert kernels) for a worker of `role` ("prefill", "decode" or
    "colocated") on `cpus` cores, when [worker] cpu_threads is 0. One core is left to the router, the
    HTTP API and the launching threads where there are cores to spare: 16 cores, streaming -> prefill
    2, decode 13; not streaming -> 8 and 8; colocated 15."""
    if role == "colocated":
        return max(1, cpus - 1)
    if not prefill_streams:
        return max(1, cpus // 2)
    prefill = max(1, cpus // 8)
    return prefill if role == "prefill" else max(1, cpus - prefill - 1)


def interleaves(prompt_tokens: int, running_tokens: int, max_tokens: int) -> bool:
    """Whether a prompt may run between the layers of a prefill of running_tokens: it is short (at most
    max_tokens; 0 turns interleaving off) and the running one is not."""
    return 0 < prompt_tokens <= max_tokens < running_tokens
