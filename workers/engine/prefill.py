"""PrefillEngine: whole prompts, chunk by chunk, then the first token and the KV hand-off.

One prompt runs at a time (the router keeps the queue). Each `step()` runs one chunk of at most
prefill_chunk_tokens, so cancels and heartbeats are seen between chunks of a long prompt. When the
prompt is done the first token is sampled; unless it already ends the request, the prompt's KV is
written to a hand-off slot and reported with `Prefilled`.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from hmoe.runtime import protocol
from hmoe.runtime.errors import HmoeError
from hmoe.runtime.sampling_params import SamplingParams
from hmoe.workers.engine.kv_handoff import HandoffPool
from hmoe.workers.model.batch import ForwardBatch
from hmoe.workers.model.causal_lm import CausalLM
from hmoe.workers.model.generate import stop_reason
from hmoe.workers.model.kv_cache import KVPool
from hmoe.workers.model.sampler import sample

log = logging.getLogger(__name__)


@dataclass
class PrefillJob:
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    done: int = 0  # prompt tokens already in the KV cache
    first_token: int | None = None


class PrefillEngine:
    def __init__(self, model: CausalLM, kv: KVPool, handoff: HandoffPool, chunk_tokens: int, handoff_timeout_s: float):
        self.model, self.kv, self.handoff = model, kv, handoff
        self.chunk_tokens, self.handoff_timeout_s = chunk_tokens, handoff_timeout_s
        self.queue: deque[PrefillJob] = deque()
        self.current: PrefillJob | None = None
        self.handed: dict[str, tuple[int, int]] = {}  # request_id -> (slot, generation) awaiting adoption

    @property
    def busy(self) -> bool:
        return self.current is not None or bool(self.queue)

    def load(self) -> tuple[int, int]:
        """(running, waiting) for heartbeats."""
        return int(self.current is not None), len(self.queue)

    def request_ids(self) -> list[str]:
        return [j.request_id for j in self.queue] + ([self.current.request_id] if self.current else [])

    def add(self, msg: protocol.Prefill) -> list:
        self.queue.append(
            PrefillJob(msg.request_id, list(msg.token_ids), protocol.sampling_params(msg.params, seeded=True))
        )
        return []

    def cancel(self, request_id: str) -> bool:
        for job in self.queue:
            if job.request_id == request_id:
                self.queue.remove(job)
                return True
        if self.current is not None and self.current.request_id == request_id:
            self.kv.free(request_id)
            self.current = None
            return True
        if request_id in self.handed:  # cancelled between hand-off and adoption: take the slot back
            return self.handoff.release_if(*self.handed.pop(request_id))
        return False

    def drop_all(self) -> None:
        self.queue.clear()
        if self.current is not None:
            self.kv.free(self.current.request_id)
            self.current = None

    def step(self) -> list:
        """Run one chunk; return the messages for the router (Prefilled or RequestError)."""
        if self.current is None:
            if not self.queue:
                return []
            job = self.queue.popleft()
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
                self.kv.reserve(job.request_id, len(job.token_ids))
            except HmoeError as exc:
                return [_refuse(job, exc.code, exc.message)]
            self.current = job
        job = self.current
        if job.first_token is None:
            chunk = job.token_ids[job.done : job.done + self.chunk_tokens]
            logits = self.model.forward(ForwardBatch.build(self.kv, [(job.request_id, chunk, job.done)]), self.kv)
            job.done += len(chunk)
            if job.done < len(job.token_ids):
                return []
            job.first_token = sample(logits, [job.params], [0])[0]
        if stop_reason(job.first_token, 1, job.params, self.model.config.eos_token_ids) is not None:
            return [self._finish(job, slot=-1)]
        slot = self.handoff.allocate(self.handoff_timeout_s)
        if slot is None:
            return []  # every slot awaits adoption: retry next step
        try:
            self.handoff.write(slot, self.kv, job.request_id, len(job.token_ids))
        except HmoeError as exc:
            self.handoff.release(slot)
            self.kv.free(job.request_id)
            self.current = None
            return [_refuse(job, exc.code, exc.message)]
        return [self._finish(job, slot)]

    def _finish(self, job: PrefillJob, slot: int) -> protocol.Prefilled:
        self.kv.free(job.request_id)
        self.current = None
        if slot >= 0:
            if len(self.handed) >= 4 * self.handoff.num_slots:  # forget the oldest: long adopted or reclaimed
                del self.handed[next(iter(self.handed))]
            self.handed[job.request_id] = (slot, self.handoff.generation(slot))
        return protocol.Prefilled(job.request_id, job.first_token, slot, self.handoff.name, len(job.token_ids))


def _refuse(job: PrefillJob, code: str, message: str) -> protocol.RequestError:
    log.info("refused %s: %s", job.request_id, message)
    return protocol.RequestError(job.request_id, code, message)
