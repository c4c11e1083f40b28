"""HandoffPool: KV caches handed from the prefill worker to the decode worker through shared memory.

One shm.Segment per prefill-worker incarnation, named `kv-handoff.<worker_id>` under the [shm]
prefix, mode and group (so tests isolate it, and space is reserved at create: a full /dev/shm is an
error at start-up, never a SIGBUS later): a page of header and slot table, then num_slots
fixed-size slots. A slot holds one request's KV as
[entry][layer][token][width] in the pool's dtype (entries as in kv_cache.kv_entry_widths).

Slot states move  FREE -> WRITING -> FILLED  on the prefill side (its one owner), and
FILLED -> FREE  on the decode side once the KV has landed in its pool (the receiver frees it; the
copy itself, a slice per decode step, is an Adoption; on a GPU the decode side registers the
segment with CUDA, so those copies DMA from it). A filled slot nobody adopted within the timeout
(the decode worker died, the request was cancelled in flight) is reclaimed by the prefill side, so
nothing leaks when either side dies. Every slot carries a generation number: a receiver that finds
it changed during or after copying knows the slot was reclaimed under it and reports the request
lost instead of using torn data; and Prefilled/Adopt carry the generation of the fill, so a slot
reclaimed and refilled before adoption is refused as lost too.
The segment is unlinked by its creator on close; segments of dead creators are removed at the next
prefill start.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch

from hmoe.runtime.errors import HmoeError
from hmoe.shm import ShmConfig, ShmError
from hmoe.shm.config import HANDOFF_PREFIX
from hmoe.shm.layout import HUGE_PAGE_BYTES
from hmoe.shm.segment import Segment, read_segment, unlink_segment
from hmoe.workers.model.kv_cache import KVPool
from hmoe.workers.weights.pinned import HostRegistration

log = logging.getLogger(__name__)

MAGIC = 0x484D4F454B563031  # "HMOEKV01"
HEADER_BYTES = 4096
FREE, WRITING, FILLED = 0, 1, 2
# Header words: magic, creator pid, num_slots, slot_bytes; then per slot: state, generation, tokens, filled_at_ns.
_HEAD, _SLOT = 4, 4


class HandoffError(HmoeError):
    """A hand-off slot is missing, reclaimed, or too small for a prompt."""


class HandoffPool:
    def __init__(self, segment: Segment, config: ShmConfig, owner: bool):
        self.name, self._segment, self._config, self.owner = segment.name, segment, config, owner
        words = np.frombuffer(segment.buffer(0, min(HEADER_BYTES, segment.nbytes) // 8 * 8), np.int64)
        if len(words) < _HEAD or words[0] != MAGIC or segment.nbytes < HEADER_BYTES + int(words[2]) * int(words[3]):
            segment.close()
            raise HandoffError("handoff_invalid", f"{self.name} is not a hand-off segment")
        self.num_slots, self.slot_bytes = int(words[2]), int(words[3])
        self._table = words[_HEAD : _HEAD + _SLOT * self.num_slots].reshape(self.num_slots, _SLOT)
        self._data = np.frombuffer(segment.buffer(HEADER_BYTES, self.num_slots * self.slot_bytes), np.uint8)
        self._registration: HostRegistration | None = None

    @classmethod
    def create(cls, worker_id: str, num_slots: int, slot_bytes: int, config: ShmConfig) -> HandoffPool:
        remove_stale_segments(config)
        slot_bytes = -(-slot_bytes // 4096) * 4096
        assert (_HEAD + _SLOT * num_slots) * 8 <= HEADER_BYTES, num_slots
        nbytes = HEADER_BYTES + num_slots * slot_bytes
        if config.hugetlbfs:  # a hugetlbfs file is whole huge pages
            nbytes = -(-nbytes // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
        segment = Segment.create(HANDOFF_PREFIX + worker_id, nbytes, config)
        np.frombuffer(segment.buffer(0, 32), np.int64)[:] = (MAGIC, os.getpid(), num_slots, slot_bytes)
        log.info("hand-off pool %s: %d slots of %.1f MiB", segment.name, num_slots, slot_bytes / 2**20)
        return cls(segment, config, owner=True)

    @classmethod
    def attach(cls, name: str, config: ShmConfig) -> HandoffPool:
        if not name.startswith(HANDOFF_PREFIX):
            raise HandoffError("handoff_invalid", f"{name!r} is not a hand-off segment name")
        try:
            segment = Segment.attach(name, config, writable=True)
        except ShmError as exc:
            code = "handoff_invalid" if exc.code == "pack_name_invalid" else "handoff_lost"
            raise HandoffError(code, f"hand-off segment {name}: {exc.message} (its prefill worker exited?)") from None
        return cls(segment, config, owner=False)

    def close(self) -> None:
        """Unmap (deferred while a view is alive); the creator also unlinks the name."""
        if self._segment is None:
            return
        if self._registration is not None:  # NOTE: no copy from the mapping may still be in flight
            self._registration.unregister()
            self._registration = None
        self._table = self._data = None
        self._segment.close()
        self._segment = None
        if self.owner:
            unlink_segment(self.name, self._config)

    # -- prefill side ----------------------------------------------------------------------------

    def capacity_tokens(self, kv: KVPool) -> int:
        return self.slot_bytes // kv.bytes_per_token

    def allocate(self, timeout_s: float) -> int | None:
        """A free slot (reclaiming ones filled longer than timeout_s ago), marked WRITING; or None."""
        now = time.monotonic_ns()
        for slot in range(self.num_slots):
            state, _, _, filled_at = self._table[slot]
            if state == FILLED and now - filled_at > timeout_s * 1e9:
                log.warning(
                    "hand-off slot not adopted in time: reclaimed", extra={"slot": slot, "timeout_s": timeout_s}
                )
                state = FREE
            if state == FREE:
                self._table[slot, 1] += 1  # generation first: a late receiver sees the change
                self._table[slot, 0] = WRITING
                return slot
        return None

    def write(self, slot: int, kv: KVPool, seq_id: str, num_tokens: int) -> None:
        """Copy seq_id's first num_tokens of KV from the pool into the slot and mark it FILLED."""
        assert self._table[slot, 0] == WRITING
        if num_tokens > self.capacity_tokens(kv):
            raise HandoffError(
                "prompt_too_long",
                f"{num_tokens} tokens of KV do not fit a hand-off slot "
                f"({self.capacity_tokens(kv)} tokens): raise handoff_slot_tokens",
            )
        positions = kv.slots(seq_id, 0, num_tokens)
        offset = slot * self.slot_bytes
        for entry in kv.data.values():  # [L, S, W]
            part = entry[:, positions]  # [L, n, W]
            nbytes = part.numel() * part.element_size()
            dst = torch.from_numpy(self._data[offset : offset + nbytes]).view(part.dtype).view(part.shape)
            dst.copy_(part)
            offset += nbytes
        self._table[slot, 2] = num_tokens
        self._table[slot, 3] = time.monotonic_ns()
        self._table[slot, 0] = FILLED

    def generation(self, slot: int) -> int:
        return int(self._table[slot, 1])

    def release_if(self, slot: int, generation: int) -> bool:
        """Free a filled slot nobody adopted yet (its request was cancelled), if it is still that fill."""
        if self._table[slot, 1] == generation and self._table[slot, 0] == FILLED:
            self._table[slot, 0] = FREE
            return True
        return False

    def release(self, slot: int) -> None:
        """Give a slot back without adopting it (the request was cancelled or refused); either side."""
        if 0 <= slot < self.num_slots:
            self._table[slot, 0] = FREE

    def free_slots(self) -> int:
        return int((self._table[:, 0] == FREE).sum())

    def pin(self) -> None:
        """Register the mapping with CUDA (on a GPU), so a prefill's KV is DMA'd straight into it and an
        adoption's copies straight out of it."""
        assert self._registration is None, "already pinned"
        self._registration = HostRegistration.register(self._segment.address, self._segment.nbytes, read_only=False)

    @property
    def pinned(self) -> bool:
        return self._registration is not None

    # -- decode side -----------------------------------------------------------------------------

    def open_adoption(self, slot: int, num_tokens: int, expected_generation: int = -1) -> int:
        """The generation of the slot's fill of num_tokens, which an adoption copies (Adoption). With the
        generation the prefill side reported (Prefilled.generation), a slot reclaimed and refilled since
        is refused even when the new prompt has the same length."""
        if not 0 <= slot < self.num_slots:
            raise HandoffError("handoff_invalid", f"slot {slot} is not in {self.name} ({self.num_slots} slots)")
        state, generation, tokens, _ = self._table[slot]
        if state != FILLED or tokens != num_tokens or expected_generation not in (-1, generation):
            raise HandoffError(
                "handoff_lost",
                f"{self.name} slot {slot} holds no KV of {num_tokens} tokens (reclaimed after its timeout?)",
            )
        return int(generation)

    def slot_kv(self, slot: int, kv: KVPool, num_tokens: int) -> dict[str, torch.Tensor]:
        """The slot's first num_tokens of KV, per entry of kv, as views of the mapping: name -> [L, n, W]."""
        out, offset = {}, slot * self.slot_bytes
        for name, entry in kv.data.items():
            layers, _, width = entry.shape
            nbytes = layers * num_tokens * width * entry.element_size()
            view = torch.from_numpy(self._data[offset : offset + nbytes]).view(entry.dtype)
            out[name] = view.view(layers, num_tokens, width)
            offset += nbytes
        return out

    def adopt(self, slot: int, kv: KVPool, seq_id: str, num_tokens: int, expected_generation: int = -1) -> None:
        """Copy the slot's KV into seq_id's (already reserved) pool blocks at once, then free the slot: an
        Adoption in one piece (the decode engine copies a slice per step), for tests and tools."""
        generation = self.open_adoption(slot, num_tokens, expected_generation)
        positions = kv.slots(seq_id, 0, num_tokens)
        for name, src in self.slot_kv(slot, kv, num_tokens).items():
            kv.data[name][:, positions] = src.to(kv.device)
        self.close_adoption(slot, generation)

    def check_adopting(self, slot: int, generation: int) -> None:
        """HandoffError handoff_lost when the slot no longer holds the fill an adoption copies (reclaimed)."""
        if self._table[slot, 1] != generation:
            raise HandoffError("handoff_lost", f"{self.name} slot {slot} was reclaimed while being adopted")

    def close_adoption(self, slot: int, generation: int) -> None:
        """Its KV has landed: free the slot, unless it was reclaimed meanwhile (then handoff_lost)."""
        self.check_adopting(slot, generation)
        self._table[slot, 0] = FREE


def remove_stale_segments(config: ShmConfig) -> None:
    """Unlink hand-off segments whose creating process is gone (killed prefill workers)."""
    for name in config.handoff_names():
        try:
            magic, pid = np.frombuffer(read_segment(name, config, 0, 16), np.int64)
        except (OSError, ValueError, ShmError):
            continue
        if magic == MAGIC and not os.path.exists(f"/proc/{pid}"):
            log.info("removing hand-off segment %s of dead process %d", name, pid)
            unlink_segment(name, config)
