"""WorkerPool: the workers registered with the router, their liveness and the load the router put on them.

Liveness is the zguide's Paranoid Pirate: every message from a worker (a WorkerPing at least every
heartbeat interval) renews it; a worker silent for interval * liveness is dead. The router counts
KV itself (a decode worker reserves prompt + max_tokens per request, rounded up to whole blocks of
the worker's KV pool as the worker allocates them: one ledger), so admission never waits for a stale
heartbeat; the worker's own figures are shown in status.

`PrefixAffinity` remembers which prefill worker last prefilled which prompt prefixes, so a prompt
can go where its prefix is likely cached (policy.prefill_worker_for chooses).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from hmoe.runtime.codec import chain_keys
from hmoe.runtime.protocol import Register, WorkerPing, WorkerStatus

ROLES = ("prefill", "decode")
COLOCATED = "colocated"  # one worker process that prefills and decodes: both roles to the router


@dataclass(eq=False, slots=True)
class WorkerEntry:
    identity: bytes  # ZeroMQ routing id on the backend socket
    info: Register
    version: int  # the protocol version agreed at Register
    last_seen_s: float
    registered_s: float
    busy: str | None = None  # prefill: the one request it is running
    interleaved: str | None = None  # prefill: a short one it runs between the layers of `busy` (policy.interleaves)
    request_ids: set[str] = field(default_factory=set)  # decode: requests adopted or reserved here
    kv_reserved_tokens: int = 0  # decode: what request_ids take there, in whole blocks (kv_cost)
    ping: WorkerPing | None = None
    draining: bool = False  # it refused work with "draining": it is shutting down, send it nothing new
    progress_s: float = 0.0  # when its heartbeat's step counter last moved

    @property
    def role(self) -> str:
        return self.info.role

    def serves(self, role: str) -> bool:
        return role in roles_served(self.info.role)

    def let_go(self, request_id: str) -> None:
        """Prefill: it is done with request_id (prefilled, refused, cancelled)."""
        if self.busy == request_id:
            self.busy = None
        if self.interleaved == request_id:
            self.interleaved = None

    def kv_cost(self, kv_tokens: int) -> int:
        """Decode: the KV token slots a request of kv_tokens takes there, whole blocks as the worker counts."""
        block = self.info.kv_block_size
        return -(-kv_tokens // block) * block

    def has_room(self, kv_tokens: int) -> bool:
        """Decode: can it take one more request of this size now?"""
        return (
            len(self.request_ids) < self.info.max_batch
            and self.kv_reserved_tokens + self.kv_cost(kv_tokens) <= self.info.kv_capacity_tokens
        )

    def reserve(self, request_id: str, kv_tokens: int) -> None:
        assert request_id not in self.request_ids, request_id
        self.request_ids.add(request_id)
        self.kv_reserved_tokens += self.kv_cost(kv_tokens)

    def release(self, request_id: str, kv_tokens: int) -> None:
        if request_id in self.request_ids:
            self.request_ids.remove(request_id)
            self.kv_reserved_tokens -= self.kv_cost(kv_tokens)
            assert self.kv_reserved_tokens >= 0

    def describe(self, now: float) -> WorkerStatus:
        ping = self.ping
        return WorkerStatus(
            worker_id=self.info.worker_id,
            role=self.role,
            pid=self.info.pid,
            device=self.info.device,
            model=self.info.model.name,
            max_batch=self.info.max_batch,
            kv_capacity_tokens=self.info.kv_capacity_tokens,
            kv_reserved_tokens=self.kv_reserved_tokens,
            kv_free_tokens=ping.kv_free_tokens if ping else self.info.kv_capacity_tokens,
            running=ping.running if ping else 0,
            waiting=ping.waiting if ping else 0,
            requests=len(self.request_ids) + (self.busy is not None) + (self.interleaved is not None),
            busy=self.busy,
            draining=self.draining,
            last_seen_s=round(now - self.last_seen_s, 3),
            uptime_s=round(now - self.registered_s, 1),
            steps=ping.steps if ping else 0,
            step_s=round(ping.step_s, 6) if ping else 0.0,
            prefix=ping.prefix if ping else None,
        )


def roles_served(role: str) -> tuple[str, ...]:
    """The roles a worker registered as `role` takes on (a colocated one: both)."""
    return ROLES if role == COLOCATED else (role,)


class WorkerPool:
    def __init__(self, silence_limit_s: float):
        self.silence_limit_s = silence_limit_s  # heartbeat interval * liveness
        self.by_identity: dict[bytes, WorkerEntry] = {}
        self.last_lost_s: dict[str, float] = {}  # role -> when its last worker was lost (for worker_wait_s)
        self.last_lost: dict[str, Register] = {}  # role -> its last worker, whose limits hold while it restarts

    def add(self, identity: bytes, info: Register, version: int, now: float) -> WorkerEntry:
        assert info.role in (*ROLES, COLOCATED), info.role
        worker = WorkerEntry(identity, info, version, now, now)
        self.by_identity[identity] = worker
        return worker

    def remove(self, identity: bytes, now: float) -> WorkerEntry:
        worker = self.by_identity.pop(identity)
        for role in ROLES:
            if worker.serves(role) and not self.of_role(role):
                self.last_lost_s[role] = now
                self.last_lost[role] = worker.info
        return worker

    def get(self, identity: bytes) -> WorkerEntry | None:
        return self.by_identity.get(identity)

    def seen(self, identity: bytes, now: float) -> WorkerEntry | None:
        worker = self.by_identity.get(identity)
        if worker is not None:
            worker.last_seen_s = now
        return worker

    def same_process(self, info: Register) -> list[WorkerEntry]:
        """Registrations of the process that sends `info` (a worker registers again on a new socket when
        it stops hearing the router; its old registration is stale from then on)."""
        return [
            w
            for w in self.by_identity.values()
            if w.info.pid == info.pid
            and w.role == info.role
            and w.info.worker_id != info.worker_id
            and _host(w.info) == _host(info)
        ]

    def pinged(self, worker: WorkerEntry, ping: WorkerPing, now: float) -> None:
        if worker.ping is None or ping.steps != worker.ping.steps:
            worker.progress_s = now
        worker.ping = ping

    def stuck(self, now: float, stuck_after_s: float) -> list[WorkerEntry]:
        """Workers with work whose step counter stood still for stuck_after_s: their main thread is hung (a
        kernel, a deadlock) while the I/O thread still answers heartbeats. Pings without steps are not judged."""
        return [
            w
            for w in self.by_identity.values()
            if w.ping is not None
            and w.ping.running + w.ping.waiting > 0  # its own word: it has work (router reservations are not)
            and w.ping.steps > 0
            and now - max(w.progress_s, w.registered_s) > stuck_after_s
        ]

    def of_role(self, role: str) -> list[WorkerEntry]:
        """The workers that take `role`'s work (colocated ones take both)."""
        return [w for w in self.by_identity.values() if w.serves(role)]

    def expired(self, now: float) -> Iterator[WorkerEntry]:
        """Workers silent past the limit (the caller removes them)."""
        return iter([w for w in self.by_identity.values() if now - w.last_seen_s > self.silence_limit_s])

    def idle_prefills(self) -> list[WorkerEntry]:
        return [w for w in self.of_role("prefill") if w.busy is None and not w.draining]

    def decode_with_room(self, kv_tokens: int) -> WorkerEntry | None:
        """The least loaded decode worker that can take the request, or None."""
        fits = [w for w in self.of_role("decode") if w.has_room(kv_tokens) and not w.draining]
        return min(fits, key=lambda w: (len(w.request_ids), w.kv_reserved_tokens), default=None)

    def kv_capacity(self, role: str) -> int:
        """The largest KV capacity among `role`'s workers (its last worker's while none is registered)."""
        workers = [w.info for w in self.of_role(role)] or [self.last_lost[role]]
        return max(info.kv_capacity_tokens for info in workers)

    def missing_since(self, role: str, now: float) -> float | None:
        """How long no worker of `role` has been registered since its last one was lost (None while one is)."""
        if self.of_role(role) or role not in self.last_lost_s:
            return None
        return now - self.last_lost_s[role]


def _host(info: Register) -> str:
    """The host part of a worker id `role-host-pid-generation` (pids repeat across machines)."""
    parts = info.worker_id.split("-")
    return "-".join(parts[1:-2]) if len(parts) >= 4 else info.worker_id


class PrefixAffinity:
    """Prompt prefixes -> the prefill worker that prefilled them last, as chain keys every SPAN tokens
    (the router knows no worker's KV block size: a coarser grid of its own), least recently used
    forgotten past max_keys. A guess, never the truth: a worker may have evicted them since."""

    SPAN = 256

    def __init__(self, max_keys: int = 1 << 16):
        self.max_keys = max_keys
        self.owner: OrderedDict[bytes, bytes] = OrderedDict()  # chain key -> worker identity

    def keys(self, token_ids: Sequence[int]) -> list[bytes]:
        return chain_keys(token_ids, self.SPAN, len(token_ids) // self.SPAN)

    def matched(self, token_ids: Sequence[int]) -> dict[bytes, int]:
        """worker identity -> prompt tokens of its longest remembered prefix of token_ids."""
        found: dict[bytes, int] = {}
        for i, key in enumerate(self.keys(token_ids)):
            identity = self.owner.get(key)
            if identity is None:
                break
            found[identity] = (i + 1) * self.SPAN
        return found

    def record(self, identity: bytes, token_ids: Sequence[int]) -> None:
        for key in reversed(self.keys(token_ids)):  # a prefix's first key ends most recent: forgotten last
            self.owner[key] = identity
            self.owner.move_to_end(key)
        while len(self.owner) > self.max_keys:
            self.owner.popitem(last=False)
