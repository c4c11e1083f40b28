"""HandoffPool: KV caches handed from the prefill worker to the decode worker through shared memory.

One segment per prefill-worker incarnation, `/dev/shm/hmoe-kv.<worker_id>`: a page of header and
slot table, then num_slots fixed-size slots. A slot holds one request's KV as
[entry][layer][token][width] in the pool's dtype (entries as in kv_cache.kv_entry_widths).

Slot states move  FREE -> WRITING -> FILLED  on the prefill side (its one owner), and
FILLED -> FREE  on the decode side once it has copied the KV (the receiver frees it). A filled slot
nobody adopted within the timeout (the decode worker died, the request was cancelled in flight) is
reclaimed by the prefill side, so nothing leaks when either side dies. Every slot carries a
generation number: a receiver that finds it changed after copying knows the slot was reclaimed
under it and reports the request lost instead of using torn data. The segment is unlinked by its
creator on close; segments of dead creators are removed at the next prefill start.
"""

from __future__ import annotations

import logging
import mmap
import os
import time

import numpy as np
import posix_ipc
import torch

from hmoe.runtime.errors import HmoeError
from hmoe.workers.kv_cache import KVPool

log = logging.getLogger(__name__)

PREFIX = "hmoe-kv."
MAGIC = 0x484D4F454B563031  # "HMOEKV01"
HEADER_BYTES = 4096
FREE, WRITING, FILLED = 0, 1, 2
# Header words: magic, creator pid, num_slots, slot_bytes; then per slot: state, generation, tokens, filled_at_ns.
_HEAD, _SLOT = 4, 4


class HandoffError(HmoeError):
    """A hand-off slot is missing, reclaimed, or too small for a prompt."""


class HandoffPool:
    def __init__(self, name: str, mapping: mmap.mmap, owner: bool):
        self.name, self._mmap, self.owner = name, mapping, owner
        words = np.frombuffer(mapping, np.int64, count=HEADER_BYTES // 8)
        assert words[0] == MAGIC, f"{name}: not a hand-off segment"
        self.num_slots, self.slot_bytes = int(words[2]), int(words[3])
        self._table = words[_HEAD : _HEAD + _SLOT * self.num_slots].reshape(self.num_slots, _SLOT)
        self._data = np.frombuffer(mapping, np.uint8, offset=HEADER_BYTES, count=self.num_slots * self.slot_bytes)

    @classmethod
    def create(cls, worker_id: str, num_slots: int, slot_bytes: int, mode: int = 0o600) -> HandoffPool:
        remove_stale_segments()
        name = PREFIX + worker_id
        slot_bytes = -(-slot_bytes // 4096) * 4096
        assert (_HEAD + _SLOT * num_slots) * 8 <= HEADER_BYTES, num_slots
        size = HEADER_BYTES + num_slots * slot_bytes
        shm = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=mode, size=size)
        try:
            os.fchmod(shm.fd, mode)
            mapping = mmap.mmap(shm.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            shm.close_fd()
        np.frombuffer(mapping, np.int64, count=4)[:] = (MAGIC, os.getpid(), num_slots, slot_bytes)
        log.info("hand-off pool %s: %d slots of %.1f MiB", name, num_slots, slot_bytes / 2**20)
        return cls(name, mapping, owner=True)

    @classmethod
    def attach(cls, name: str) -> HandoffPool:
        if not name.startswith(PREFIX) or "/" in name:
            raise HandoffError("handoff_invalid", f"{name!r} is not a hand-off segment name")
        try:
            shm = posix_ipc.SharedMemory("/" + name)
        except posix_ipc.ExistentialError:
            raise HandoffError("handoff_lost", f"hand-off segment {name} is gone (its prefill worker exited)") from None
        try:
            mapping = mmap.mmap(shm.fd, shm.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            shm.close_fd()
        return cls(name, mapping, owner=False)

    def close(self) -> None:
        if self._mmap is None:
            return
        self._table = self._data = None
        self._mmap.close()
        self._mmap = None
        if self.owner:
            _unlink(self.name)

    # -- prefill side ----------------------------------------------------------------------------

    def capacity_tokens(self, kv: KVPool) -> int:
        return self.slot_bytes // kv.bytes_per_token

    def allocate(self, timeout_s: float) -> int | None:
        """A free slot (reclaiming ones filled longer than timeout_s ago), marked WRITING; or None."""
        now = time.monotonic_ns()
        for slot in range(self.num_slots):
            state, _, _, filled_at = self._table[slot]
            if state == FILLED and now - filled_at > timeout_s * 1e9:
                log.warning("hand-off slot %d was not adopted within %.0f s: reclaimed", slot, timeout_s)
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
            raise HandoffError("prompt_too_long", f"{num_tokens} tokens of KV do not fit a hand-off slot "
                               f"({self.capacity_tokens(kv)} tokens): raise handoff_slot_tokens")
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

    # -- decode side -----------------------------------------------------------------------------

    def adopt(self, slot: int, kv: KVPool, seq_id: str, num_tokens: int) -> None:
        """Copy the slot's KV into seq_id's (already reserved) pool blocks, then free the slot."""
        if not 0 <= slot < self.num_slots:
            raise HandoffError("handoff_invalid", f"slot {slot} is not in {self.name} ({self.num_slots} slots)")
        state, generation, tokens, _ = self._table[slot]
        if state != FILLED or tokens != num_tokens:
            raise HandoffError("handoff_lost", f"{self.name} slot {slot} holds no KV of {num_tokens} tokens "
                               "(reclaimed after its timeout?)")
        positions = kv.slots(seq_id, 0, num_tokens)
        offset = slot * self.slot_bytes
        for entry in kv.data.values():
            layers, _, width = entry.shape
            nbytes = layers * num_tokens * width * entry.element_size()
            src = torch.from_numpy(self._data[offset : offset + nbytes]).view(entry.dtype).view(layers, num_tokens, width)
            entry[:, positions] = src.to(entry.device)
            offset += nbytes
        if self._table[slot, 1] != generation:
            raise HandoffError("handoff_lost", f"{self.name} slot {slot} was reclaimed while being adopted")
        self._table[slot, 0] = FREE


def _unlink(name: str) -> None:
    try:
        posix_ipc.unlink_shared_memory("/" + name)
    except posix_ipc.ExistentialError:
        pass


def remove_stale_segments(shm_dir: str = "/dev/shm") -> None:
    """Unlink hand-off segments whose creating process is gone (killed prefill workers)."""
    for entry in os.listdir(shm_dir):
        if not entry.startswith(PREFIX):
            continue
        try:
            with open(os.path.join(shm_dir, entry), "rb") as f:
                magic, pid = np.frombuffer(f.read(16), np.int64)
        except (OSError, ValueError):
            continue
        if magic == MAGIC and not os.path.exists(f"/proc/{pid}"):
            log.info("removing hand-off segment %s of dead process %d", entry, pid)
            _unlink(entry)
