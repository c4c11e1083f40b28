"""DecodeEngine: continuous batching over handed-off requests.

Requests join between steps: an adopted request waits until the batch has room and the KV pool
can hold its prompt plus max_tokens (reserved whole, so a running request never runs out of
KV), then its KV is copied from the hand-off slot and the slot freed. Each `step()` decodes one
token for every running request and returns them in one `Tokens` message; finished and cancelled
requests leave between steps and free their KV.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import torch

from hmoe.runtime import protocol
from hmoe.runtime.errors import HmoeError
from hmoe.runtime.sampling_params import SamplingParams
from hmoe.shm import ShmConfig
from hmoe.workers.engine.kv_handoff import HandoffPool
from hmoe.workers.model.batch import ForwardBatch
from hmoe.workers.model.causal_lm import CausalLM
from hmoe.workers.model.generate import stop_reason
from hmoe.workers.model.kv_cache import KVPool
from hmoe.workers.model.sampler import sample

log = logging.getLogger(__name__)


@dataclass
class DecodeRequest:
    request_id: str
    params: SamplingParams
    prompt_len: int
    slot: int
    segment: str
    output: list[int] = field(default_factory=list)  # generated tokens, the prefill's first one included

    @property
    def ctx_len(self) -> int:
        """Tokens whose KV is cached: the prompt and every output token but the last."""
        return self.prompt_len + len(self.output) - 1


class DecodeEngine:
    def __init__(self, model: CausalLM, kv: KVPool, max_batch: int, micro_batches: int, shm: ShmConfig):
        self.model, self.kv, self.max_batch, self.micro_batches, self.shm = model, kv, max_batch, micro_batches, shm
        self.waiting: deque[DecodeRequest] = deque()
        self.running: dict[str, DecodeRequest] = {}
        self._pools: dict[str, HandoffPool] = {}

    @property
    def busy(self) -> bool:
        return bool(self.running) or bool(self.waiting)

    def load(self) -> tuple[int, int]:
        """(running, waiting) for heartbeats."""
        return len(self.running), len(self.waiting)

    def request_ids(self) -> list[str]:
        return list(self.running) + [r.request_id for r in self.waiting]

    def add(self, msg: protocol.Adopt) -> list:
        req = DecodeRequest(
            msg.request_id,
            protocol.sampling_params(msg.params, seeded=True),
            len(msg.token_ids),
            msg.slot,
            msg.segment,
            [msg.first_token],
        )
        need = req.prompt_len + req.params.max_tokens
        if need > self.kv.capacity_tokens:
            self._release_slot(req)
            return [
                protocol.RequestError(
                    req.request_id,
                    "kv_capacity",
                    f"request needs {need} tokens of KV, the decode pool holds "
                    f"{self.kv.capacity_tokens}: raise kv_cache_gib or lower max_tokens",
                )
            ]
        self.waiting.append(req)
        return []

    def cancel(self, request_id: str) -> bool:
        if request_id in self.running:
            del self.running[request_id]
            self.kv.free(request_id)
            return True
        for req in self.waiting:
            if req.request_id == request_id:
                self.waiting.remove(req)
                self._release_slot(req)
                return True
        return False

    def drop_all(self) -> None:
        for request_id in list(self.running):
            self.cancel(request_id)
        while self.waiting:
            self._release_slot(self.waiting.popleft())

    def close(self) -> None:
        self.drop_all()
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def step(self) -> list:
        """Admit what fits, decode one token for every running request; messages for the router."""
        out = self._admit()
        if not self.running:
            return out
        reqs = list(self.running.values())
        # Two micro-batches: one's attention runs on the device while the other's experts run on the CPU.
        parts = min(self.micro_batches, len(reqs))
        bounds = [len(reqs) * i // parts for i in range(parts + 1)]
        batches = [
            ForwardBatch.build(self.kv, [(r.request_id, [r.output[-1]], r.ctx_len) for r in reqs[lo:hi]])
            for lo, hi in zip(bounds, bounds[1:])
        ]
        logits = torch.cat(self.model.forward_overlapped(batches, self.kv))
        tokens = sample(logits, [r.params for r in reqs], [len(r.output) for r in reqs])
        items = []
        for req, token in zip(reqs, tokens):
            req.output.append(token)
            reason = stop_reason(token, len(req.output), req.params, self.model.config.eos_token_ids)
            items.append([req.request_id, token, reason])
            if reason is not None:
                del self.running[req.request_id]
                self.kv.free(req.request_id)
        out.append(protocol.Tokens(items))
        return out

    def _admit(self) -> list:
        out = []
        while self.waiting and len(self.running) < self.max_batch:
            req = self.waiting[0]
            need = req.prompt_len + req.params.max_tokens
            if self.kv.blocks_for(need) > self.kv.free_blocks:
                break  # wait for running requests to finish; first come, first served
            self.waiting.popleft()
            self.kv.reserve(req.request_id, need)
            try:
                self._pool(req.segment).adopt(req.slot, self.kv, req.request_id, req.prompt_len)
            except HmoeError as exc:
                self.kv.free(req.request_id)
                out.append(protocol.RequestError(req.request_id, exc.code, exc.message))
                continue
            self.running[req.request_id] = req
        return out

    def _pool(self, segment: str) -> HandoffPool:
        pool = self._pools.get(segment)
        if pool is None:
            self._close_vanished_pools()
            pool = self._pools[segment] = HandoffPool.attach(segment, self.shm)
        return pool

    def _close_vanished_pools(self) -> None:
        """Unmap the segments of prefill workers that are gone (their names unlinked) once no waiting
        request needs them: a mapping keeps all of a segment's /dev/shm pages allocated."""
        live = set(self.shm.handoff_names()) | {r.segment for r in self.waiting}
        for name in [n for n in self._pools if n not in live]:
            self._pools.pop(name).close()

    def _release_slot(self, req: DecodeRequest) -> None:
        try:
            self._pool(req.segment).release(req.slot)
        except HmoeError:
            pass  # the segment is gone with its prefill worker: nothing left to free
