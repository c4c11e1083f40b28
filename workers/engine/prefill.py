"""PrefillEngine: whole prompts in layer-major passes, then the first token and the KV hand-off.

One prompt runs at a time (the router keeps the queue), save one: a Prefill marked `interleave` (a
short prompt, policy.interleaves) runs ahead of the running prompt, which is suspended between two of
its layers when its pass streams (the short one then runs on the CPU kernels: nothing of the
suspended pass is in flight there) or between two passes otherwise, and resumes once the short one
is done; the next short one may interrupt it only after it ran three times as long as the last did
(policy.next_interleave_s: a stream of short prompts cannot starve it). With a PrefixCache, a prompt first takes the
KV blocks of its longest cached prefix and prefills only the rest; once prefilled, its full blocks
are cached for the prompts after it. A prompt is prefilled in passes; each pass
is chosen on its own (`_open_pass`):
  - streamed: when the engine has StreamingExperts and the rest of the prompt is at least
    stream_min_tokens long, up to max_pass_tokens (the activations that fit the device) in chunks of
    prefill_chunk_tokens, layer-major: every chunk passes layer L before any passes L+1, so each
    layer's experts cross PCIe once per pass;
  - CPU kernels (the model's default experts): one chunk.
Each `step()` runs one layer of the pass, so cancels and heartbeats are seen between layers. On a
worker spanning several devices (ranks.py) the other ranks run each streamed pass with it, step for
step, each with its share of every layer's experts. When the
prompt is done the first token is sampled; unless it already ends the request, the prompt's KV is
written to a hand-off slot and reported with `Prefilled` (which says why when the first token ended it).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Generator, Sequence
from dataclasses import dataclass

from hmoe.runtime import policy, protocol
from hmoe.runtime.errors import HmoeError
from hmoe.runtime.sampling_params import FinishReason, SamplingParams, finish_reason, require_seed
from hmoe.workers.engine.kv_handoff import HandoffPool
from hmoe.workers.model.batch import ForwardBatch
from hmoe.workers.model.causal_lm import CausalLM
from hmoe.workers.model.kv_cache import KVPool
from hmoe.workers.model.prefix_cache import PrefixCache
from hmoe.workers.model.sampler import sample, token_logprobs

log = logging.getLogger(__name__)


@dataclass
class PrefillJob:
    request_id: str
    token_ids: Sequence[int]
    params: SamplingParams
    done: int = 0  # prompt tokens already in the KV cache
    cached: int = 0  # of those, the ones the prefix cache had
    first_token: int | None = None
    logprobs: list | None = None  # the first token's [logprob, top alternatives] when asked
    steps: Generator | None = None  # the running pass: one layer per next()
    pass_end: int = 0  # prompt tokens in the KV cache once the running pass is done
    pass_experts: object = None  # the running pass's StreamPass, if streamed
    key: int = 0  # the prompt's number for the other ranks of a worker spanning several devices (ranks.py)
    on_ranks: bool = False  # they hold KV of it (it had a streamed pass)


class PrefillEngine:
    def __init__(
        self,
        model: CausalLM,
        kv: KVPool,
        handoff: HandoffPool,
        chunk_tokens: int,
        handoff_timeout_s: float,
        streaming=None,
        stream_min_tokens: int = 0,
        max_pass_tokens: int = 1 << 30,
        prefix: PrefixCache | None = None,
        clock=time.monotonic,
        ranks=None,
    ):
        """streaming: a StreamingExperts for long passes (None: every pass on the model's default experts);
        prefix: the prefix cache over `kv` (None: every prompt prefilled whole); clock: seconds, for the
        interleaving's share of the time; ranks: the other ranks of a worker spanning several devices
        (ranks.Ranks; they run every streamed pass with this one, so no prefix cache beside them)."""
        assert ranks is None or (prefix is None and streaming is not None), "ranks run streamed passes, no prefix"
        self.model, self.kv, self.handoff, self.prefix, self.ranks = model, kv, handoff, prefix, ranks
        self._keys = itertools.count()
        self.chunk_tokens, self.handoff_timeout_s = chunk_tokens, handoff_timeout_s
        self.streaming, self.stream_min_tokens = streaming, stream_min_tokens
        self.max_pass_tokens = max(chunk_tokens, max_pass_tokens // chunk_tokens * chunk_tokens)
        self.passes = {"cpu": 0, "stream": 0}  # passes run, by kind
        self.queue: deque[PrefillJob] = deque()
        self.urgent: deque[PrefillJob] = deque()  # interleaved prompts: they go before the running one
        self.current: PrefillJob | None = None
        self.suspended: PrefillJob | None = None  # the prompt an interleaved one interrupted
        self.clock = clock
        self.suspended_at = 0.0  # when it was interrupted
        self.interleave_after = 0.0  # when the running prompt may be interrupted again (policy.next_interleave_s)
        self.unadopted: dict[str, tuple[int, int]] = {}  # request_id -> (hand-off slot, generation) not adopted yet

    @property
    def busy(self) -> bool:
        return self.current is not None or self.suspended is not None or bool(self.queue) or bool(self.urgent)

    @property
    def mid_pass(self) -> bool:
        """The running prompt is between two layers of a pass (the next step() runs its next layer)."""
        return self.current is not None and self.current.steps is not None

    @property
    def awaiting_slot(self) -> bool:
        """The running prompt is done and waits for a free hand-off slot (every one awaits adoption): the
        worker loop sleeps between tries instead of spinning."""
        return self.current is not None and self.current.first_token is not None

    def load(self) -> tuple[int, int]:
        """(running, waiting) for heartbeats."""
        return int(self.current is not None) + int(self.suspended is not None), len(self.queue) + len(self.urgent)

    def free_tokens(self) -> int:
        """KV token slots a new prompt can have: free blocks and cached ones only the cache holds (read
        by the heartbeat thread: plain counts, no iteration)."""
        reclaimable = 0
        if self.prefix is not None:
            in_use = sum(job.cached for job in (self.current, self.suspended) if job is not None)
            reclaimable = len(self.prefix.blocks) - in_use // self.kv.block_size
        return (self.kv.free_blocks + max(reclaimable, 0)) * self.kv.block_size

    def request_ids(self) -> list[str]:
        held = [j for j in (self.current, self.suspended) if j is not None]
        return [j.request_id for j in (*self.urgent, *self.queue, *held)]

    def add(self, msg: protocol.Prefill) -> list:
        job = PrefillJob(msg.request_id, msg.token_ids, require_seed(msg.params), key=next(self._keys))
        (self.urgent if msg.interleave else self.queue).append(job)
        return []

    def cancel(self, request_id: str) -> bool:
        for waiting in (self.urgent, self.queue):
            for job in waiting:
                if job.request_id == request_id:
                    waiting.remove(job)
                    return True
        for job in (self.current, self.suspended):
            if job is not None and job.request_id == request_id:
                self._drop(job)
                return True
        if request_id in self.unadopted:  # cancelled between hand-off and adoption: take the slot back
            return self.handoff.release_if(*self.unadopted.pop(request_id))
        return False

    def release_unadopted(self) -> None:
        """Free the hand-off slots nobody adopted yet: the router that asked for them restarted, so no
        Adopt for them will come (the decode worker dropped its requests too). Not on drop_all: after a
        mere re-registration a decode worker may still be adopting one."""
        for slot, generation in self.unadopted.values():
            self.handoff.release_if(slot, generation)
        self.unadopted.clear()

    def drop_all(self) -> None:
        self.queue.clear()
        self.urgent.clear()
        for job in (self.current, self.suspended):
            if job is not None:
                self._drop(job)

    def _drop(self, job: PrefillJob) -> None:
        """Let go of a running or suspended prompt: its pass closed, its KV freed."""
        self._close_pass(job)
        self._free(job)
        if job is self.current:
            self.current = None
        else:
            self.suspended = None

    def step(self) -> list:
        """Run one layer of the running pass; return the messages for the router (Prefilled or RequestError)."""
        if self.current is None and self.suspended is not None:
            self.current, self.suspended = self.suspended, None  # the interleaved one is done: resume
            now = self.clock()
            self.interleave_after = policy.next_interleave_s(now, now - self.suspended_at)
        if self.urgent and self.current is not None and self.suspended is None and self._suspendable(self.current):
            self.suspended, self.current = self.current, None  # between two of its layers or passes
            self.suspended_at = self.clock()
        if self.current is None:
            if not self.queue and not self.urgent:
                return []
            job = (self.urgent or self.queue).popleft()
            if self.suspended is None:  # a fresh prompt: nothing interrupted it yet
                self.interleave_after = 0.0
            if len(job.token_ids) > self.handoff.capacity_tokens(self.kv):
                return [
                    _refuse(
                        job,
                        "prompt_too_long",
                        f"prompt of {len(job.token_ids)} tokens exceeds the hand-off "
                        f"slot of {self.handoff.capacity_tokens(self.kv)} tokens: raise handoff_slot_tokens",
                    )
                ]
            try:
                self._reserve(job)
            except HmoeError as exc:
                if self.suspended is not None:  # the suspended prompt holds the KV it lacks: after it, then
                    self.queue.appendleft(job)
                    self.current, self.suspended = self.suspended, None
                    return []
                return [_refuse(job, exc.code, exc.message)]
            self.current = job
        job = self.current
        if job.first_token is None:
            if job.steps is None:
                self._open_pass(job)
            try:
                if job.pass_experts is not None and self.ranks is not None:
                    self.ranks.layer()  # the other ranks take the same step
                next(job.steps)
                return []
            except StopIteration as finished:
                logits = finished.value[-1]  # [1, V]: the pass's last chunk ends with its last token
            self._close_pass(job)
            job.done = job.pass_end
            if job.done < len(job.token_ids):
                return []
            job.first_token = sample(logits, [job.params], [0])[0]
            job.logprobs = (token_logprobs(logits, [job.first_token], [job.params.logprobs]) or [None])[0]
        reason = finish_reason(job.first_token, 1, job.params, self.model.config.eos_token_ids)
        if reason is not None:
            return [self._finish(job, slot=-1, reason=reason)]
        slot = self.handoff.allocate(self.handoff_timeout_s)
        if slot is None:
            return []  # every slot awaits adoption: retry next step (awaiting_slot)
        try:
            self.handoff.write(slot, self.kv, job.request_id, len(job.token_ids))
        except HmoeError as exc:
            self.handoff.release(slot)
            self._free(job)
            self.current = None
            return [_refuse(job, exc.code, exc.message)]
        return [self._finish(job, slot)]

    def _reserve(self, job: PrefillJob) -> None:
        """KV for the whole prompt: the cached prefix's blocks shared, new blocks for the rest (cached
        blocks nobody uses evicted for them if the pool is short); raises KVCapacityError."""
        if self.prefix is None:
            self.kv.reserve(job.request_id, len(job.token_ids))
            return
        shared = self.prefix.match(job.token_ids)
        self.kv.share(job.request_id, shared)
        self.prefix.make_room(self.kv.blocks_for(len(job.token_ids)) - len(shared))
        try:
            self.kv.reserve(job.request_id, len(job.token_ids))
        except HmoeError:
            self.kv.free(job.request_id)
            raise
        job.done = job.cached = len(shared) * self.kv.block_size
        self.prefix.count(len(job.token_ids), job.cached)  # once per prompt, also when it had to wait
        if job.cached:
            log.debug("prefix cache hit", extra={"request_id": job.request_id, "cached_tokens": job.cached})

    def _suspendable(self, job: PrefillJob) -> bool:
        """Whether another prompt may run now, before job's next layer: job is still prefilling, either
        between passes or in a streamed one (the CPU kernels, which the other will use, hold none of it),
        and has had its share of the time since the last interruption."""
        return (
            job.first_token is None
            and (job.steps is None or job.pass_experts is not None)
            and self.clock() >= self.interleave_after
        )

    def _open_pass(self, job: PrefillJob) -> None:
        """Choose the pass's experts and length; its chunks go in as the layer-major forward's batches."""
        remaining = len(job.token_ids) - job.done
        ring_free = self.suspended is None or self.suspended.pass_experts is None  # one streamed pass at a time
        # with other ranks, only a prompt whose earlier passes all streamed (they hold no KV of CPU passes)
        on_ranks = self.ranks is None or job.done == 0 or job.on_ranks
        streamed = self.streaming is not None and remaining >= self.stream_min_tokens and ring_free and on_ranks
        pass_tokens = min(remaining, self.max_pass_tokens if streamed else self.chunk_tokens)
        job.pass_experts = self.streaming.open_pass() if streamed else None
        if streamed and self.ranks is not None:
            ids = job.token_ids[job.done : job.done + pass_tokens]
            self.ranks.open(job.key, job.done, ids, len(job.token_ids))
            job.on_ranks = True
        batches = [
            ForwardBatch.build(
                self.kv, [(job.request_id, list(job.token_ids[start : start + self.chunk_tokens]), start)]
            )
            for start in range(job.done, job.done + pass_tokens, self.chunk_tokens)
        ]
        job.pass_end = job.done + pass_tokens
        job.steps = self.model.forward_layer_major(batches, self.kv, experts=job.pass_experts)
        self.passes["stream" if streamed else "cpu"] += 1
        experts = "streamed" if streamed else "cpu"
        log.debug("prefill pass", extra={"request_id": job.request_id, "tokens": pass_tokens, "experts": experts})

    def _close_pass(self, job: PrefillJob) -> None:
        if job.steps is not None:
            job.steps.close()
            job.steps = None
        if job.pass_experts is not None:
            job.pass_experts.close()
            job.pass_experts = None
            if self.ranks is not None:
                self.ranks.close_pass(job.key)

    def _free(self, job: PrefillJob) -> None:
        self.kv.free(job.request_id)
        if job.on_ranks:
            job.on_ranks = False
            self.ranks.free(job.key)

    def _finish(self, job: PrefillJob, slot: int, reason: FinishReason | None = None) -> protocol.Prefilled:
        if self.prefix is not None:
            self.prefix.insert(job.request_id, job.token_ids)
        self._free(job)
        self.current = None
        if slot >= 0:
            if len(self.unadopted) >= 4 * self.handoff.num_slots:  # forget fills whose slot was reused since
                self.unadopted = {r: (s, g) for r, (s, g) in self.unadopted.items() if self.handoff.generation(s) == g}
            self.unadopted[job.request_id] = (slot, self.handoff.generation(slot))
        assert job.first_token is not None
        generation = self.handoff.generation(slot) if slot >= 0 else -1
        return protocol.Prefilled(
            job.request_id,
            job.first_token,
            slot,
            self.handoff.name,
            len(job.token_ids),
            reason,
            logprobs=job.logprobs,
            generation=generation,
            cached_tokens=job.cached,
        )


def _refuse(job: PrefillJob, code: str, message: str) -> protocol.RequestError:
    log.info("refused: %s", message, extra={"request_id": job.request_id, "code": code})
    return protocol.RequestError(job.request_id, code, message)
