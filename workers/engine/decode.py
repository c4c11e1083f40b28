"""DecodeEngine: continuous batching over handed-off requests.

Requests join between steps: an adopted request waits until the batch has room and the KV pool
can hold its prompt plus max_tokens (reserved whole, so a running request never runs out of
KV), first come first served; then its KV is copied from the hand-off slot as an Adoption, one
bounded slice (adopt_slice_bytes, shared by at most MAX_ADOPTING adoptions in order) per step: on a
GPU on a side stream, overlapping the step. It joins the batch once its KV has landed, and the slot
is freed. Each `step()` decodes one token for every running request and returns them in one `Tokens`
message; finished and cancelled requests leave between steps and free their KV.

With the CPU experts, a running request keeps a row of a static micro-batch (DecodeRows) and the step
runs DecodeStep's segments, as CUDA graphs on a GPU; the legacy path rebuilds a ForwardBatch.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from hmoe.runtime import protocol
from hmoe.runtime.errors import HmoeError
from hmoe.runtime.sampling_params import SamplingParams, finish_reason, kv_need, require_seed
from hmoe.shm import ShmConfig, ShmError
from hmoe.workers.engine.adoption import Adoption
from hmoe.workers.engine.kv_handoff import HandoffPool
from hmoe.workers.model.batch import DecodeRows, ForwardBatch, bucket_for
from hmoe.workers.model.causal_lm import CausalLM
from hmoe.workers.model.decode_step import DecodeStep
from hmoe.workers.model.kv_cache import KVPool
from hmoe.workers.model.layers import MoE
from hmoe.workers.model.sampler import sample, token_logprobs

log = logging.getLogger(__name__)
# Adoptions copying at once: the next one's blocks are reserved and it takes what is left of the slice
# in the step the first one's last piece went out, so no step's budget goes unused; more would only
# reserve KV early.
MAX_ADOPTING = 2


@dataclass
class DecodeRequest:
    request_id: str
    params: SamplingParams
    prompt_len: int
    slot: int
    segment: str
    output: list[int] = field(default_factory=list)  # generated tokens, the prefill's first one included
    generation: int = -1  # the hand-off slot's fill it adopts (-1: unchecked)
    adoption: Adoption | None = None  # while its KV is being copied in

    @property
    def ctx_len(self) -> int:
        """Tokens whose KV is cached: the prompt and every output token but the last."""
        return self.prompt_len + len(self.output) - 1


class DecodeEngine:
    """mode: "graphs" (static rows, CUDA graphs captured here, before the worker reports READY; eager
    static segments on a CPU), "static" (static rows, eager), "legacy" (a ForwardBatch rebuilt per step;
    also what runs when the experts backend has no static staging, e.g. the torch reference).
    adopt_slice_bytes: KV copied from hand-off slots per step (at least one token row of one layer)."""

    def __init__(
        self,
        model: CausalLM,
        kv: KVPool,
        max_batch: int,
        micro_batches: int,
        shm: ShmConfig | None,
        mode: str = "graphs",
        split: str = "auto",
        adopt_slice_bytes: int = 64 << 20,
    ):
        self.model, self.kv, self.max_batch, self.micro_batches, self.shm = model, kv, max_batch, micro_batches, shm
        assert adopt_slice_bytes >= max(t.shape[-1] * t.element_size() for t in kv.data.values()), adopt_slice_bytes
        self.adopt_slice_bytes = adopt_slice_bytes
        self._adopt_stream = torch.cuda.Stream(kv.device) if kv.device.type == "cuda" else None
        self.waiting: deque[DecodeRequest] = deque()
        self.adopting: deque[DecodeRequest] = deque()  # reserved, their KV on its way in (FIFO)
        self.running: dict[str, DecodeRequest] = {}
        self._pools: dict[str, HandoffPool] = {}
        self.static: DecodeStep | None = None
        experts = model.experts if any(isinstance(layer.mlp, MoE) for layer in model.layers) else None
        if mode != "legacy" and getattr(experts, "max_stage_rows", 0) < max_batch:
            log.info("decode runs the legacy path: the expert backend cannot stage %d rows per call", max_batch)
        elif mode != "legacy":
            # Micro-batch 0 can hold the whole batch (when one micro-batch is faster), the others their share.
            capacities = [max_batch] + [-(-max_batch // micro_batches)] * (micro_batches - 1)
            parts = [DecodeRows(kv, cap, kv.num_blocks, kv.scratch_block) for cap in capacities]
            self.static = DecodeStep(model, kv, parts, experts)
            if mode == "graphs" and model.device.type == "cuda":
                count = self.static.capture()
                log.info(
                    "captured %d decode graphs (%d micro-batches, rows per micro-batch %s)",
                    count,
                    micro_batches,
                    self.static.buckets(self.static.parts[0]),
                )
        self._part_of: dict[str, DecodeRows] = {}
        self.splitter = SplitChooser(split if micro_batches > 1 and self.static is not None else "never")

    @property
    def busy(self) -> bool:
        return bool(self.running or self.adopting or self.waiting)

    def load(self) -> tuple[int, int]:
        """(running, waiting: adopting ones included) for heartbeats."""
        return len(self.running), len(self.adopting) + len(self.waiting)

    def request_ids(self) -> list[str]:
        return list(self.running) + [r.request_id for r in (*self.adopting, *self.waiting)]

    def add(self, msg: protocol.Adopt) -> list:
        req = DecodeRequest(
            msg.request_id,
            require_seed(msg.params),
            msg.prompt_len,
            msg.slot,
            msg.segment,
            [msg.first_token],
            msg.generation,
        )
        need = kv_need(req.prompt_len, req.params)
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
            self._leave(request_id)
            return True
        for req in self.adopting:
            if req.request_id == request_id:
                self.adopting.remove(req)
                self._abandon(req)
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
        while self.adopting:
            self._abandon(self.adopting.popleft())
        while self.waiting:
            self._release_slot(self.waiting.popleft())

    def close(self) -> None:
        self.drop_all()
        if self._adopt_stream is not None:
            self._adopt_stream.synchronize()  # no DMA from a segment may outlive its registration and mapping
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def step(self) -> list:
        """Admit what fits, decode one token for every running request; messages for the router."""
        out = self._admit()
        if not self.running:
            return out
        start = time.perf_counter()
        if self.static is not None:
            bucket = bucket_for(len(self.running), self.max_batch)
            split = self.splitter.choose(bucket)
            self._arrange(split)
            reqs, logits = self._forward_static()
        else:
            reqs, logits = self._forward_legacy()
        tokens = sample(logits, [r.params for r in reqs], [len(r.output) for r in reqs])
        if self.static is not None:
            self.splitter.record(bucket, split, time.perf_counter() - start)
        logprobs = token_logprobs(logits, tokens, [r.params.logprobs for r in reqs])  # None unless asked
        items = []
        for req, token in zip(reqs, tokens):
            req.output.append(token)
            reason = finish_reason(token, len(req.output), req.params, self.model.config.eos_token_ids)
            items.append(protocol.TokenItem(req.request_id, token, reason))
            if reason is not None:
                self._leave(req.request_id)
        out.append(protocol.Tokens(items, logprobs))
        return out

    def _forward_static(self) -> tuple[list[DecodeRequest], torch.Tensor]:
        reqs, buckets = [], []
        for part in self.static.parts:
            part_reqs = [self.running[rid] for rid in part.rows.request_ids]
            bucket = bucket_for(len(part_reqs), part.rows.capacity)
            part.rows.prepare([r.output[-1] for r in part_reqs], [r.ctx_len for r in part_reqs], bucket)
            reqs.extend(part_reqs)
            buckets.append(bucket)
        return reqs, torch.cat(self.static.run(buckets))

    def _forward_legacy(self) -> tuple[list[DecodeRequest], torch.Tensor]:
        reqs = list(self.running.values())
        # Two micro-batches: one's attention runs on the device while the other's experts run on the CPU.
        parts = min(self.micro_batches, len(reqs))
        bounds = [len(reqs) * i // parts for i in range(parts + 1)]
        batches = [
            ForwardBatch.build(self.kv, [(r.request_id, [r.output[-1]], r.ctx_len) for r in reqs[lo:hi]])
            for lo, hi in zip(bounds, bounds[1:])
        ]
        return reqs, torch.cat(self.model.forward_overlapped(batches, self.kv))

    def join(self, req: DecodeRequest) -> None:
        """A request whose KV is in the pool (reserved whole) starts decoding: it takes a row."""
        self.running[req.request_id] = req
        if self.static is not None:
            part = self.static.parts[0].rows  # _arrange spreads the rows before the next step
            part.add(req.request_id)
            self._part_of[req.request_id] = part

    def _leave(self, request_id: str) -> None:
        del self.running[request_id]
        self.kv.free(request_id)
        part = self._part_of.pop(request_id, None)
        if part is not None:
            part.remove(request_id)

    def _arrange(self, split: bool) -> None:
        """Rows into micro-batches: balanced within one row when splitting, else all in the first.
        Only rows that must move do (one block-table row copied each)."""
        parts = [p.rows for p in self.static.parts]
        while True:
            if split:
                small, large = min(parts, key=len), max(parts, key=len)
                if len(large) - len(small) <= 1:
                    return
            else:
                large, small = next((r for r in parts[1:] if len(r)), None), parts[0]
                if large is None:
                    return
            moved = large.request_ids[-1]
            large.remove(moved)
            small.add(moved)
            self._part_of[moved] = small

    def _admit(self) -> list:
        """Start adoptions in order while rows and KV allow, copy this step's slice, let the landed ones join."""
        out, budget = [], self.adopt_slice_bytes
        while True:
            out += self._start_adoptions()
            ended = 0
            for req in list(self.adopting):
                try:
                    if budget and not req.adoption.issued:
                        budget -= req.adoption.copy(budget)
                    if not req.adoption.landed():
                        continue
                    req.adoption.finish()
                except HmoeError as exc:  # its slot was reclaimed under the copy: this request only
                    self.adopting.remove(req)
                    self._abandon(req)
                    out.append(protocol.RequestError(req.request_id, exc.code, exc.message))
                else:
                    self.adopting.remove(req)
                    req.adoption = None
                    self.join(req)
                ended += 1
            if not (ended and self.waiting):  # an adoption that ended makes room for the next one
                return out

    def _start_adoptions(self) -> list:
        """Waiting requests reserve their KV and start copying in, first come first served; errors for the
        ones whose slot is gone."""
        out = []
        while (
            self.waiting
            and len(self.adopting) < MAX_ADOPTING
            and len(self.running) + len(self.adopting) < self.max_batch
        ):
            req = self.waiting[0]
            need = kv_need(req.prompt_len, req.params)
            if self.kv.blocks_for(need) > self.kv.free_blocks:
                break  # wait for running requests to finish; first come, first served
            self.waiting.popleft()
            self.kv.reserve(req.request_id, need)
            try:
                pool = self._pool(req.segment)
                req.adoption = Adoption(
                    req.request_id, pool, req.slot, self.kv, req.prompt_len, req.generation, self._adopt_stream
                )
            except HmoeError as exc:
                self.kv.free(req.request_id)
                out.append(protocol.RequestError(req.request_id, exc.code, exc.message))
                continue
            self.adopting.append(req)
        return out

    def _pool(self, segment: str) -> HandoffPool:
        pool = self._pools.get(segment)
        if pool is None:
            self._close_vanished_pools()
            pool = self._pools[segment] = HandoffPool.attach(segment, self.shm)
            if self._adopt_stream is not None:
                try:  # once per prefill-worker incarnation: the whole segment
                    pool.pin()
                except ShmError as exc:
                    log.warning("KV hand-off from %s copies from pageable memory (slower): %s", segment, exc.message)
        return pool

    def _abandon(self, req: DecodeRequest) -> None:
        """An adopting request leaves (cancelled, or its slot lost): its KV blocks freed, its slot if still its fill."""
        req.adoption.abandon()
        req.adoption = None
        self.kv.free(req.request_id)

    def _close_vanished_pools(self) -> None:
        """Unmap the segments of prefill workers that are gone (their names unlinked) once no waiting
        request needs them: a mapping keeps all of a segment's /dev/shm pages allocated."""
        live = set(self.shm.handoff_names()) | {r.segment for r in (*self.adopting, *self.waiting)}
        vanished = [n for n in self._pools if n not in live]
        if vanished and self._adopt_stream is not None:
            self._adopt_stream.synchronize()  # an abandoned adoption's last piece may still read one
        for name in vanished:
            self._pools.pop(name).close()

    def _release_slot(self, req: DecodeRequest) -> None:
        try:
            pool = self._pool(req.segment)
            if req.generation < 0:
                pool.release(req.slot)
            else:  # a slot reclaimed and refilled since is another request's now
                pool.release_if(req.slot, req.generation)
        except HmoeError:
            pass  # the segment is gone with its prefill worker: nothing left to free


class SplitChooser:
    """Whether a step of a given batch bucket runs as two micro-batches (one's attention overlapping the
    other's CPU experts) or one (each expert read once for the whole batch): the first time a bucket is
    seen both are timed for `trials` steps each, then the faster median is kept; re-timed every `every`
    steps of that bucket, since contexts grow. policy "always" / "never" fixes the answer."""

    def __init__(self, policy: str = "auto", trials: int = 3, every: int = 512):
        self.policy, self.trials, self.every = policy, trials, every
        self.times: dict[tuple[int, bool], list[float]] = {}
        self.steps: dict[int, int] = {}

    def choose(self, bucket: int) -> bool:
        if self.policy != "auto" or bucket < 2:
            return self.policy == "always" and bucket >= 2
        if self.steps.get(bucket, 0) >= self.every:
            self.steps[bucket] = 0
            self.times.pop((bucket, True), None)
            self.times.pop((bucket, False), None)
        for split in (False, True):
            if len(self.times.get((bucket, split), ())) < self.trials:
                return split
        return statistics.median(self.times[bucket, True]) < statistics.median(self.times[bucket, False])

    def record(self, bucket: int, split: bool, seconds: float) -> None:
        self.steps[bucket] = self.steps.get(bucket, 0) + 1
        times = self.times.setdefault((bucket, split), [])
        if len(times) < self.trials:
            times.append(seconds)
