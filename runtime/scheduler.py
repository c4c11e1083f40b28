"""Scheduler: the router's policy and bookkeeping, pure — messages and a clock in, messages out.

No sockets, no clock reads, no threads: the router feeds it decoded messages with the time
(`on_client`, `on_worker`, `tick`) and sends what it leaves in `outbox` as (peer, routing id,
message), peer being "client" or "worker". So every rule below is unit-tested in milliseconds.

Policy:
- Admission refuses at once, with a stable code, what can never run (prompt_too_long,
  context_too_long, kv_capacity, invalid_*), and what cannot run now (queue_full, no_worker, draining).
- One queue, taken in the order runtime/policy.py gives: shortest prompt first, a request waiting
  [router] prefill_starve_s (or retried) before all others. A request goes to an idle prefill worker
  (one request at a time each) only when a decode worker has room for it (a batch place and prompt +
  max_tokens of KV, counted here), so prefilled KV never waits in a hand-off slot for long; the
  decode worker is chosen at that moment. A starving request without room holds back the rest.
- Every admitted request gets exactly one Finished: `_finish` removes it, so later messages about it
  find nothing. Whoever still holds it (a worker) gets a Cancel, unless that worker ended it.
- A worker silent for heartbeat_interval_s * heartbeat_liveness is lost: requests it was decoding end
  with "worker_lost"; requests it was prefilling that showed the client nothing yet go back to the
  head of the queue once (retried when a prefill worker is there again).

NOTE: past 400 lines because admission, worker liveness, the request lifecycle and status share one
state and one clock; the policy seam the scheduling work adds takes the choices out.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, deque
from collections.abc import Sequence
from typing import Protocol

import structlog

from hmoe.runtime.codec import TokenIds
from hmoe.runtime.config import RouterConfig
from hmoe.runtime.detokenizer import Decoder
from hmoe.runtime.errors import HmoeError
from hmoe.runtime.policy import Queued, blocking, interleaves, prefill_order, prefill_worker_for
from hmoe.runtime.protocol import (
    MIN_VERSION,
    VERSION,
    Adopt,
    Cancel,
    Delta,
    Drain,
    Error,
    Failure,
    Finished,
    Generate,
    KVStatus,
    ModelInfo,
    Ping,
    Pong,
    Prefill,
    Prefilled,
    Register,
    Registered,
    RequestError,
    Status,
    StatusRequest,
    Throughput,
    TokenItem,
    TokenLogprob,
    Tokens,
    WorkerPing,
    WorkerPong,
)
from hmoe.runtime.request import Phase, Request
from hmoe.runtime.sampling_params import SamplingParams, kv_need, with_seed
from hmoe.runtime.worker_pool import COLOCATED, ROLES, PrefixAffinity, WorkerEntry, WorkerPool

log = structlog.get_logger("hmoe.router")

CLIENT, WORKER = "client", "worker"
THROUGHPUT_WINDOW_S = 60.0
CHARS_PER_TOKEN_MAX = 16  # a text prompt this many times max_prompt_tokens is refused before tokenizing


class Tokenizer(Decoder, Protocol):
    def encode(self, text: str): ...  # -> an object with .ids (tokenizers.Encoding)


class Scheduler:
    def __init__(self, config: RouterConfig, tokenizer: Tokenizer | None = None):
        self.config = config
        self.tokenizer = tokenizer  # None: prompts must be token ids; text is empty
        self.requests: dict[str, Request] = {}  # every admitted, unfinished request
        self.queue: deque[str] = deque()  # QUEUED request ids, head first
        self.awaiting_decode: list[str] = []  # HANDOFF request ids no decode worker had room for yet
        self.workers = WorkerPool(config.heartbeat_interval_s * config.heartbeat_liveness)
        self.affinity = PrefixAffinity()
        self.clients: dict[bytes, float] = {}  # clients with requests -> when last heard
        self.model: ModelInfo | None = None  # from the first worker's Register
        self.outbox: list[tuple[str, bytes, object]] = []
        self.draining_until: float | None = None
        self.stopped = False  # drained: nothing left to do, the router may exit
        self.token_times: deque[tuple[float, int]] = deque()  # (when, tokens) in the throughput window
        self.finished: Counter[str] = Counter()  # finish_reason -> requests

    # -- clients ---------------------------------------------------------------------------------

    def on_client(self, client: bytes, msg, now: float) -> None:
        if client in self.clients:
            self.clients[client] = now
        match msg:
            case Generate():
                self._generate(client, msg, now)
            case Cancel(request_id=request_id):
                request = self.requests.get(request_id)
                if request is not None and request.client == client:
                    self._finish(request, "cancelled", now)
            case Ping(sent_s=sent_s, request_ids=request_ids):
                held = self.requests
                unknown = [r for r in request_ids if r not in held or held[r].client != client]
                self._send(CLIENT, client, Pong(sent_s, unknown))
            case StatusRequest():
                self._send(CLIENT, client, self.status(now))
            case Drain(grace_s=grace_s):
                self.drain(grace_s, now)
                self._send(CLIENT, client, self.status(now))
            case _:
                self._send(CLIENT, client, Error("unknown_message", f"{type(msg).__name__} is not a client message"))

    def _generate(self, client: bytes, msg: Generate, now: float) -> None:
        try:
            request = self._admit(client, msg, now)
        except HmoeError as exc:
            log.info("refused", request_id=msg.request_id, code=exc.code, reason=exc.message)
            self._send(CLIENT, client, Error(exc.code, exc.message, msg.request_id))
            return
        self.requests[request.request_id] = request
        self.queue.append(request.request_id)
        self.clients[client] = now
        log.debug("admitted", request_id=request.request_id, prompt_tokens=len(request.prompt_ids))

    def _admit(self, client: bytes, msg: Generate, now: float) -> Request:
        """A Request, or the HmoeError that refuses it (checked cheapest first)."""
        c = self.config
        if self.draining_until is not None:
            raise HmoeError(
                "draining", "the router is shutting down and admits no new requests; retry on another instance"
            )
        if msg.request_id in self.requests:
            raise HmoeError("duplicate_request", f"request id {msg.request_id!r} is already running; make ids unique")
        params = with_seed(msg.params)  # prefill and decode then sample alike
        timeout_s = msg.timeout_s if msg.timeout_s is not None else c.request_timeout_s or math.inf
        if not timeout_s > 0:
            raise HmoeError("invalid_request", f"timeout_s must be > 0, got {msg.timeout_s!r}")
        prompt_ids = self._prompt_ids(msg)
        if len(prompt_ids) > c.max_prompt_tokens:
            raise HmoeError(
                "prompt_too_long",
                f"prompt of {len(prompt_ids)} tokens exceeds max_prompt_tokens = {c.max_prompt_tokens}",
            )
        # A role whose worker is restarting queues requests for up to worker_wait_s; one never seen refuses them.
        missing = [r for r in ROLES if not self.workers.of_role(r) and not self._coming_back(r, now)]
        if missing:
            raise HmoeError(
                "no_worker", f"no {' or '.join(missing)} worker is registered; start one (hmoe serve) or retry"
            )
        self._check_fits(prompt_ids, params)
        if len(self.queue) >= c.max_queued:
            raise HmoeError("queue_full", f"{len(self.queue)} requests are already queued (max_queued); retry later")
        return Request(msg.request_id, client, prompt_ids, params, msg.stream, now, now + timeout_s, self.tokenizer)

    def check_prompt(self, msg: Generate) -> None:
        """The checks a prompt passes before it is tokenized (the router tokenizes off its loop after them)."""
        if (msg.prompt is None) == (msg.token_ids is None):
            raise HmoeError("invalid_prompt", "give exactly one of prompt (text) or token_ids")
        if msg.prompt is None:
            return
        if self.tokenizer is None:
            raise HmoeError(
                "tokenizer_missing", "the router has no tokenizer.json for this model; send token_ids instead of text"
            )
        if not msg.prompt:  # before tokenizing: the tokenizer would add BOS and make it one token long
            raise HmoeError("invalid_prompt", "the prompt is empty")
        if len(msg.prompt) > self.config.max_prompt_tokens * CHARS_PER_TOKEN_MAX:
            raise HmoeError(
                "prompt_too_long",
                f"prompt of {len(msg.prompt or '')} characters is far beyond max_prompt_tokens = "
                f"{self.config.max_prompt_tokens}",
            )

    def _prompt_ids(self, msg: Generate) -> Sequence[int]:
        self.check_prompt(msg)
        # Text is tokenized here only when no router loop did it first; packed once: Prefill sends it as is.
        if msg.token_ids is not None:
            ids: Sequence[int] = msg.token_ids
        else:
            assert self.tokenizer is not None and msg.prompt is not None  # check_prompt saw to both
            ids = TokenIds(self.tokenizer.encode(msg.prompt).ids)
        if not ids:
            raise HmoeError("invalid_prompt", "the prompt is empty")
        return ids

    def _coming_back(self, role: str, now: float) -> bool:
        gone_s = self.workers.missing_since(role, now)
        return gone_s is not None and gone_s <= self.config.worker_wait_s

    def _check_fits(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        max_tokens = params.max_tokens
        vocab = self.model.vocab_size if self.model else 0
        if vocab and not (0 <= min(prompt_ids) and max(prompt_ids) < vocab):
            raise HmoeError("invalid_prompt", f"token ids must be in [0, {vocab}) for this model")
        need = kv_need(len(prompt_ids), params)
        context = self.model.max_position_embeddings if self.model else 0
        if context and need > context:
            raise HmoeError(
                "context_too_long",
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"model's context of {context} tokens; shorten the prompt or lower max_tokens",
            )
        decode_kv, prefill_kv = self.workers.kv_capacity("decode"), self.workers.kv_capacity("prefill")
        if need > decode_kv or len(prompt_ids) > prefill_kv:
            raise HmoeError(
                "kv_capacity",
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) needs {need} tokens of "
                f"KV cache; the decode worker holds {decode_kv} (prefill {prefill_kv}): raise kv_cache_gib, "
                "shorten the prompt or lower max_tokens",
            )

    # -- workers ---------------------------------------------------------------------------------

    def on_worker(self, identity: bytes, msg, now: float) -> None:
        if isinstance(msg, Register):
            self._register(identity, msg, now)
            return
        worker = self.workers.seen(identity, now)
        if worker is None:  # registered with a router that has since restarted, or was declared lost
            log.debug("unregistered_worker", message=type(msg).__name__, peer=identity.hex())
            if not isinstance(msg, Error):  # it registers again at once on this
                self._send(WORKER, identity, Error("not_registered", "this router does not know you: register again"))
            return
        match msg:
            case WorkerPing():
                self.workers.pinged(worker, msg, now)
                self._send(WORKER, identity, WorkerPong())
            case Prefilled():
                self._prefilled(worker, msg, now)
            case Tokens(items=items, logprobs=logprobs):
                self._tokens(worker, items, now, logprobs)
            case RequestError():
                self._request_error(worker, msg, now)
            case Error():
                log.warning("worker_error", worker_id=worker.info.worker_id, code=msg.code, message=msg.message)
            case _:
                self._send(WORKER, identity, Error("unknown_message", f"{type(msg).__name__} is not a worker message"))

    def _request_error(self, worker: WorkerEntry, msg: RequestError, now: float) -> None:
        worker.let_go(msg.request_id)
        worker.draining = worker.draining or msg.code == "draining"
        request = self.requests.get(msg.request_id)
        held_by = (
            {Phase.PREFILL: request.prefill_worker, Phase.DECODE: request.decode_worker}.get(request.phase)
            if request
            else None
        )
        if request is None or held_by != worker.identity:
            return
        if msg.code == "draining" and request.phase is Phase.PREFILL:  # refused, not failed: first in line again
            request.phase, request.prefill_worker = Phase.QUEUED, None
            self.queue.appendleft(request.request_id)
            return
        self._finish(request, "error", now, Failure(msg.code, msg.message), notify=False)

    def _register(self, identity: bytes, msg: Register, now: float) -> None:
        others = [w for w in self.workers.by_identity.values() if w.identity != identity]
        mismatch = next((w for w in others if w.info.model.name != msg.model.name), None)
        version = min(msg.max_version, VERSION)  # the highest both speak, if both speak it
        if version < max(msg.min_version, MIN_VERSION):
            older = "worker" if msg.max_version < MIN_VERSION else "router"
            why = (
                f"the worker speaks protocol versions {msg.min_version}-{msg.max_version}, this router "
                f"{MIN_VERSION}-{VERSION}: upgrade the {older}"
            )
            log.error("worker_rejected", worker_id=msg.worker_id, reason=why)
            self._send(WORKER, identity, Error("version_too_old", f"registration refused: {why}"))
            return
        if msg.role not in (*ROLES, COLOCATED) or mismatch is not None:
            why = (
                f"role {msg.role!r} is not one of {(*ROLES, COLOCATED)}"
                if mismatch is None
                else (
                    f"it serves {msg.model.name!r} but worker {mismatch.info.worker_id} "
                    f"serves {mismatch.info.model.name!r}"
                )
            )
            log.error("worker_rejected", worker_id=msg.worker_id, reason=why)
            self._send(WORKER, identity, Error("worker_rejected", f"registration refused: {why}"))
            return
        known = self.workers.get(identity)
        if known is not None:  # the same socket registering again: it restarted its state
            self._lose_worker(known, now, "registered again")
        for stale in self.workers.same_process(msg):  # it registered again on a new socket: the old one is gone
            self._lose_worker(stale, now, "registered again")
        if not others:
            self.model = msg.model
        self.workers.add(identity, msg, version, now)
        log.info(
            "worker_registered",
            worker_id=msg.worker_id,
            role=msg.role,
            pid=msg.pid,
            device=msg.device,
            kv_capacity_tokens=msg.kv_capacity_tokens,
            max_batch=msg.max_batch,
            protocol=version,
        )
        self._send(WORKER, identity, Registered(msg.worker_id, version))

    def _prefilled(self, worker: WorkerEntry, msg: Prefilled, now: float) -> None:
        worker.let_go(msg.request_id)
        request = self.requests.get(msg.request_id)
        if request is None or request.phase is not Phase.PREFILL or request.prefill_worker != worker.identity:
            if msg.slot >= 0:  # it ended meanwhile (cancel, deadline): let the prefill worker free the slot
                self._send(WORKER, worker.identity, Cancel(msg.request_id))
            return
        request.phase, request.prefilled = Phase.HANDOFF, msg
        logprobs = [msg.logprobs] if msg.logprobs is not None else None
        self._delta(request, [msg.first_token], request.add_tokens([msg.first_token], now, logprobs), logprobs)
        if msg.slot < 0:  # the first token ended it (the worker says why); the worker kept no KV
            self._finish(request, msg.finish_reason or "stop", now, notify=False)
        elif request.stop_strings.stopped:
            self._finish(request, "stop", now)
        elif not self._adopt(request):
            self.awaiting_decode.append(request.request_id)

    def _adopt(self, request: Request) -> bool:
        """Send a HANDOFF request to a decode worker; False while none has room."""
        decode = self.workers.get(request.decode_worker) if request.decode_worker else None
        if decode is None:
            decode = self.workers.decode_with_room(request.kv_tokens)
            if decode is None:
                return False
            decode.reserve(request.request_id, request.kv_tokens)
        prefilled = request.prefilled
        assert prefilled is not None, request.request_id
        request.phase, request.decode_worker = Phase.DECODE, decode.identity
        self._send(
            WORKER,
            decode.identity,
            Adopt(
                request.request_id,
                len(request.prompt_ids),
                prefilled.first_token,
                prefilled.slot,
                prefilled.segment,
                request.params,
                prefilled.generation,
            ),
        )
        return True

    def _tokens(
        self, worker: WorkerEntry, items: list[TokenItem], now: float, logprobs: list[TokenLogprob | None] | None = None
    ) -> None:
        count = 0
        for n, item in enumerate(items):  # decode checked each item's types and finish_reason
            token, reason = item.token, item.finish_reason
            request = self.requests.get(item.request_id)
            if request is None or request.phase is not Phase.DECODE or request.decode_worker != worker.identity:
                continue  # ended here already (cancel, stop string, deadline); the worker drops it
            count += 1
            lp = [logprobs[n]] if logprobs and n < len(logprobs) and logprobs[n] is not None else None
            self._delta(request, [token], request.add_tokens([token], now, lp), lp)
            if reason is not None:
                self._finish(request, reason, now, notify=False)
            elif request.stop_strings.stopped:
                self._finish(request, "stop", now)
        self.token_times.append((now, count))

    def _lose_worker(self, worker: WorkerEntry, now: float, why: str, code: str = "worker_lost") -> None:
        self.workers.remove(worker.identity, now)
        log.warning("worker_lost", worker_id=worker.info.worker_id, role=worker.role, pid=worker.info.pid, why=why)
        lost = Failure(code, f"the {worker.role} worker (pid {worker.info.pid}) stopped answering ({why}); retry")
        for request in list(self.requests.values()):
            if request.prefill_worker == worker.identity and request.phase in (Phase.PREFILL, Phase.HANDOFF):
                if request.output_ids or request.retried:
                    self._finish(request, "error", now, lost)
                else:  # nothing shown yet: prefill it again, first in line
                    request.phase, request.prefill_worker, request.retried = Phase.QUEUED, None, True
                    self.queue.appendleft(request.request_id)
            elif request.decode_worker == worker.identity:
                if request.phase is Phase.DECODE:
                    self._finish(request, "error", now, lost)
                    prefill = self.workers.get(request.prefill_worker) if request.prefill_worker else None
                    handed = request.prefilled is not None and request.prefilled.slot >= 0
                    if prefill is not None and handed:  # the slot, if the decode worker died before adopting it
                        self._send(WORKER, prefill.identity, Cancel(request.request_id))
                else:
                    request.decode_worker = None  # its reservation went with the worker; another is found later

    # -- time ------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Liveness, deadlines, drain; then move queued work to workers that can take it."""
        for worker in self.workers.expired(now):
            self._lose_worker(worker, now, f"silent for {now - worker.last_seen_s:.1f} s")
        for worker in self.workers.stuck(now, self.config.stuck_after_s):
            why = f"busy without progress for {now - worker.progress_s:.1f} s"
            self._send(WORKER, worker.identity, Error("worker_stuck", f"{why}: restart"))  # its I/O thread exits
            self._lose_worker(worker, now, why, "worker_stuck")
        for client, seen in list(self.clients.items()):
            if now - seen > self.config.client_timeout_s:
                log.warning("client_gone", client=client.hex(), silent_s=round(now - seen, 1))
                for request in [r for r in self.requests.values() if r.client == client]:
                    self._finish(request, "cancelled", now)
        for request in [r for r in self.requests.values() if now >= r.deadline_s]:
            self._finish(request, "timeout", now)
        waiting = [self.requests[i] for i in (*self.queue, *self.awaiting_decode) if i in self.requests]
        missing = [r for r in ROLES if (self.workers.missing_since(r, now) or 0) > self.config.worker_wait_s]
        for request in waiting if missing else ():
            self._finish(
                request,
                "error",
                now,
                Failure(
                    "no_worker",
                    f"no {missing[0]} worker came back within worker_wait_s = {self.config.worker_wait_s} s",
                ),
            )
        if self.draining_until is not None and (not self.requests or now >= self.draining_until):
            shutdown = Failure("server_shutdown", "the router shut down before this request finished; retry it")
            for request in list(self.requests.values()):
                self._finish(request, "error", now, shutdown)
            self.stopped = True
        self._schedule(now)

    def _schedule(self, now: float) -> None:
        self.awaiting_decode = [
            i for i in self.awaiting_decode if i in self.requests and not self._adopt(self.requests[i])
        ]
        while self.queue and (idle := self.workers.idle_prefills()):
            found = self._next_prefill(now)
            if found is None:
                return  # the candidates wait for decode room
            request, decode = found
            self._send_prefill(request, self._prefill_worker_for(request, idle), decode, now)
        self._interleave(now)

    def _interleave(self, now: float) -> None:
        """A short queued prompt goes to a prefill worker running a long one, which runs it between two of
        the long one's layers (policy.interleaves), so it does not wait out a 32K prefill."""
        limit = self.config.interleave_max_tokens
        for prefill in self.workers.of_role("prefill"):
            if not self.queue or prefill.draining or prefill.interleaved is not None or prefill.busy is None:
                continue
            running = self.requests.get(prefill.busy)
            if running is None or not interleaves(1, len(running.prompt_ids), limit):
                continue
            found = self._next_prefill(now, beside=len(running.prompt_ids))
            if found is None:
                return
            request, decode = found
            self._send_prefill(request, prefill, decode, now, interleave=True)

    def _send_prefill(
        self, request: Request, prefill: WorkerEntry, decode: WorkerEntry, now: float, interleave: bool = False
    ) -> None:
        self.queue.remove(request.request_id)
        request.phase, request.prefill_worker, request.decode_worker = Phase.PREFILL, prefill.identity, decode.identity
        if interleave:
            prefill.interleaved = request.request_id
        else:
            prefill.busy = request.request_id
        request.prefill_start_s = now
        self._send(
            WORKER, prefill.identity, Prefill(request.request_id, request.prompt_ids, request.params, interleave)
        )

    def _prefill_worker_for(self, request: Request, idle: list[WorkerEntry]) -> WorkerEntry:
        """The idle prefill worker likely to hold the prompt's prefix in its cache (one: no hashing)."""
        if len(self.workers.of_role("prefill")) == 1:
            return idle[0]
        by_identity = {w.identity: w for w in idle}
        identity = prefill_worker_for(list(by_identity), self.affinity.matched(request.prompt_ids))
        self.affinity.record(identity, request.prompt_ids)
        return by_identity[identity]

    def _next_prefill(self, now: float, beside: int = 0) -> tuple[Request, WorkerEntry] | None:
        """The queued request to prefill next (policy.prefill_order; with `beside`, only one that interleaves
        with a running prefill of that many tokens) with the decode worker that holds its KV reservation, or
        None while none can go: a due request without decode room blocks those behind it."""
        starve_s = self.config.prefill_starve_s
        queued = [self.requests[i] for i in self.queue]
        items = [Queued(r.request_id, len(r.prompt_ids), r.arrival_s, r.retried) for r in queued]
        for item in prefill_order(items, now, starve_s):
            if beside and not interleaves(item.prompt_tokens, beside, self.config.interleave_max_tokens):
                if blocking(item, now, starve_s):
                    return None  # a due request keeps its claim on decode room
                continue
            request = self.requests[item.request_id]
            decode = self.workers.get(request.decode_worker) if request.decode_worker else None
            if decode is None:
                decode = self.workers.decode_with_room(request.kv_tokens)
                if decode is not None:
                    decode.reserve(request.request_id, request.kv_tokens)
            if decode is not None:
                return request, decode
            if blocking(item, now, starve_s):
                return None
        return None

    def drain(self, grace_s: float, now: float) -> None:
        """Stop admitting; requests still running after grace_s end with "server_shutdown"."""
        until = now + max(grace_s, 0.0)
        if self.draining_until is None or until < self.draining_until:
            self.draining_until = until
        log.info("draining", grace_s=grace_s, requests=len(self.requests))

    # -- ending ----------------------------------------------------------------------------------

    def _finish(
        self, request: Request, reason: str, now: float, error: Failure | None = None, notify: bool = True
    ) -> None:
        """The one way a request ends: its holders let go, the client gets the rest of the text and Finished."""
        del self.requests[request.request_id]
        holder = {
            Phase.QUEUED: None,
            Phase.PREFILL: request.prefill_worker,
            Phase.HANDOFF: request.prefill_worker,
            Phase.DECODE: request.decode_worker,
        }[request.phase]
        if request.phase is Phase.QUEUED:
            self.queue.remove(request.request_id)
        prefill = self.workers.get(request.prefill_worker) if request.prefill_worker else None
        if prefill is not None:
            prefill.let_go(request.request_id)  # it handles the Cancel before any next Prefill
        decode = self.workers.get(request.decode_worker) if request.decode_worker else None
        if decode is not None:
            decode.release(request.request_id, request.kv_tokens)
        holds_slot = request.phase is not Phase.HANDOFF or (
            request.prefilled is not None and request.prefilled.slot >= 0
        )
        if notify and holder is not None and self.workers.get(holder) is not None and holds_slot:
            self._send(WORKER, holder, Cancel(request.request_id))
        self._delta(request, [], request.flush_text())
        usage = request.usage()
        self._send(
            CLIENT,
            request.client,
            Finished(
                request.request_id, reason, request.output_ids, request.text, usage, error, request.output_logprobs
            ),
        )
        if not any(r.client == request.client for r in self.requests.values()):
            self.clients.pop(request.client, None)
        self.finished[reason] += 1
        log.info(
            "finished",
            request_id=request.request_id,
            reason=reason,
            **dataclasses.asdict(usage),
            **({"error": error.code} if error else {}),
        )

    def _delta(self, request: Request, token_ids: list[int], text: str, logprobs: list | None = None) -> None:
        if request.stream and (token_ids or text):
            asked = request.params.logprobs is not None and token_ids
            logprobs = (logprobs or [None] * len(token_ids)) if asked else None
            self._send(CLIENT, request.client, Delta(request.request_id, token_ids, text, logprobs))

    def _send(self, peer: str, identity: bytes, msg: object) -> None:
        self.outbox.append((peer, identity, msg))

    def take_outbox(self) -> list[tuple[str, bytes, object]]:
        out, self.outbox = self.outbox, []
        return out

    # -- status ----------------------------------------------------------------------------------

    def status(self, now: float) -> Status:
        while self.token_times and now - self.token_times[0][0] > THROUGHPUT_WINDOW_S:
            self.token_times.popleft()
        window_s = (
            min(THROUGHPUT_WINDOW_S, max(now - self.token_times[0][0], 1.0))
            if self.token_times
            else THROUGHPUT_WINDOW_S
        )
        decode = self.workers.of_role("decode")
        return Status(
            workers=[w.describe(now) for w in self.workers.by_identity.values()],
            queued=len(self.queue),
            running=len(self.requests) - len(self.queue),
            kv=KVStatus(
                capacity_tokens=sum(w.info.kv_capacity_tokens for w in decode),
                used_tokens=sum(w.kv_reserved_tokens for w in decode),
                free_tokens_reported=sum(
                    w.ping.kv_free_tokens if w.ping else w.info.kv_capacity_tokens for w in decode
                ),
            ),
            throughput=Throughput(
                tokens_per_s=round(sum(n for _, n in self.token_times) / window_s, 2),
                window_s=THROUGHPUT_WINDOW_S,
                finished=dict(self.finished),
            ),
            draining=self.draining_until is not None,
        )
