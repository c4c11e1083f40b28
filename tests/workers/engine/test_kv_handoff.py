"""HandoffPool in-process: slot states and generations, reclaim after the timeout, adopt refusing a slot
that is gone or reused, attach refusing bad names, stale segments of dead creators, and the segment's
place beside the weight packs (same prefix and mode, never listed as a pack)."""

from __future__ import annotations

import os
import stat
import uuid

import numpy as np
import pytest
from helpers.fake_model import FakeModel, make_kv, read_context
from helpers.handoff import FOREVER_S, SLOT_TOKENS, fill, prefilled_kv

from hmoe.shm import ShmConfig
from hmoe.shm.layout import HUGE_PAGE_BYTES
from hmoe.shm.segment import Segment
from hmoe.workers.engine.kv_handoff import MAGIC, HandoffError, HandoffPool, remove_stale_segments

BLOCK = 4


def adopt(pool: HandoffPool, slot: int, request_id: str, num_tokens: int, generation: int = -1) -> list[int]:
    """Adopt into a fresh decode pool; the token ids read back from it."""
    kv = make_kv(FakeModel().config, 16, BLOCK)
    kv.reserve(request_id, num_tokens)
    pool.adopt(slot, kv, request_id, num_tokens, generation)
    return read_context(kv, kv.slots(request_id, 0, num_tokens))


def _unused_pid() -> int:
    """A pid no process has: above the kernel's pid_max."""
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read()) + 1


def test_write_then_adopt_moves_every_layer_and_entry_and_frees_the_slot(pools):
    sender = pools.make(num_slots=2)
    receiver = pools.attach(sender.name)
    assert sender.capacity_tokens(make_kv(FakeModel().config, 1, BLOCK)) == SLOT_TOKENS
    prompt = [7, 3, 9, 1, 12, 5]
    slot, _ = fill(sender, "a", prompt)
    assert sender.free_slots() == 1 and receiver.free_slots() == 1  # one table, seen from both sides
    assert adopt(receiver, slot, "a", len(prompt)) == prompt
    assert sender.free_slots() == 2


def test_a_write_longer_than_the_slot_is_refused(pools):
    pool = pools.make()
    prompt = list(range(SLOT_TOKENS + 1))
    slot = pool.allocate(FOREVER_S)
    with pytest.raises(HandoffError) as info:
        pool.write(slot, prefilled_kv("a", prompt), "a", len(prompt))
    assert info.value.code == "prompt_too_long" and "handoff_slot_tokens" in info.value.message


def test_every_allocation_moves_the_generation_and_full_slots_give_none(pools):
    pool = pools.make(num_slots=2)
    a, b = pool.allocate(FOREVER_S), pool.allocate(FOREVER_S)
    assert {a, b} == {0, 1} and pool.allocate(FOREVER_S) is None and pool.free_slots() == 0
    generation = pool.generation(a)
    pool.release(a)
    assert pool.allocate(FOREVER_S) == a and pool.generation(a) == generation + 1


def test_release_if_frees_only_the_fill_it_names(pools):
    pool = pools.make(num_slots=1)
    slot = pool.allocate(FOREVER_S)
    assert not pool.release_if(slot, pool.generation(slot))  # still being written: not the releaser's to free
    pool.release(slot)
    slot, generation = fill(pool, "a", [1, 2, 3])
    assert not pool.release_if(slot, generation - 1) and pool.free_slots() == 0
    assert pool.release_if(slot, generation) and pool.free_slots() == 1
    assert not pool.release_if(slot, generation)  # already free


def test_a_filled_slot_is_reclaimed_only_after_its_timeout(pools):
    pool = pools.make(num_slots=1)
    slot, generation = fill(pool, "a", [1, 2, 3])
    assert pool.allocate(FOREVER_S) is None  # filled just now: still waits for its adopter
    assert pool.allocate(0.0) == slot and pool.generation(slot) == generation + 1
    assert not pool.release_if(slot, generation)  # the cancelled request's old fill is gone


def test_adopt_after_a_reclaim_is_handoff_lost(pools):
    sender = pools.make(num_slots=1)
    receiver = pools.attach(sender.name)
    slot, _ = fill(sender, "a", [1, 2, 3, 4])
    assert sender.allocate(0.0) == slot  # reclaimed and being rewritten
    with pytest.raises(HandoffError) as info:
        adopt(receiver, slot, "a", 4)
    assert info.value.code == "handoff_lost"
    sender.write(slot, prefilled_kv("b", [5, 6]), "b", 2)  # refilled with another prompt
    with pytest.raises(HandoffError) as info:
        adopt(receiver, slot, "a", 4)
    assert info.value.code == "handoff_lost" and sender.free_slots() == 0  # b's fill is untouched
    assert adopt(receiver, slot, "b", 2) == [5, 6]


def test_adopt_after_a_reclaim_and_a_refill_of_the_same_length_is_handoff_lost(pools):
    sender = pools.make(num_slots=1)
    receiver = pools.attach(sender.name)
    slot, generation = fill(sender, "a", [1, 2, 3])  # Prefilled and Adopt carry this generation
    assert sender.allocate(0.0) == slot
    sender.write(slot, prefilled_kv("b", [4, 5, 6]), "b", 3)
    with pytest.raises(HandoffError) as lost:
        adopt(receiver, slot, "a", 3, generation)  # without it, b's prompt [4, 5, 6] would be taken for a's
    assert lost.value.code == "handoff_lost"
    assert adopt(receiver, slot, "b", 3, sender.generation(slot)) == [4, 5, 6]


def test_adopt_of_a_slot_outside_the_pool_is_handoff_invalid(pools):
    receiver = pools.attach(pools.make(num_slots=2).name)
    kv = make_kv(FakeModel().config, 4, BLOCK)
    kv.reserve("a", 3)
    for slot in (-1, 2):
        with pytest.raises(HandoffError) as info:
            receiver.adopt(slot, kv, "a", 3)
        assert info.value.code == "handoff_invalid"


@pytest.mark.parametrize(
    "name, code",
    [
        ("model", "handoff_invalid"),  # not a hand-off name (a pack's, say)
        ("kv-handoff./../../etc/passwd", "handoff_invalid"),  # never a path
        ("kv-handoff." + "x" * 80, "handoff_invalid"),
        ("kv-handoff.gone", "handoff_lost"),  # its prefill worker exited
    ],
)
def test_attach_refuses_bad_and_vanished_names(pools, name, code):
    with pytest.raises(HandoffError) as info:
        pools.attach(name)
    assert info.value.code == code


@pytest.mark.parametrize(
    "nbytes, header",
    [
        (2 * 4096, (0, 0, 0, 0)),  # another magic
        (8, ()),  # shorter than a header
        (4096, (MAGIC, 1, 2, 4096)),  # a header promising two slots the segment does not hold
    ],
    ids=["foreign", "short", "truncated"],
)
def test_attach_refuses_a_segment_that_is_not_a_hand_off_pool(pools, nbytes, header):
    segment = Segment.create("kv-handoff.impostor", nbytes, pools.config)
    np.frombuffer(segment.buffer(0, 8 * len(header)), np.int64)[:] = header
    segment.close()
    with pytest.raises(HandoffError) as info:
        pools.attach("kv-handoff.impostor")
    assert info.value.code == "handoff_invalid" and "not a hand-off segment" in info.value.message


def test_on_a_hugetlbfs_mount_the_pool_is_whole_huge_pages(tmp_path):
    """A plain directory stands in for the mount: this checks the sizes hugetlbfs requires, not its pages."""
    config = ShmConfig(prefix=f"hmoe.test-{uuid.uuid4().hex[:8]}.", lock_dir=str(tmp_path), hugetlbfs=str(tmp_path))
    pool = HandoffPool.create("huge", 2, SLOT_TOKENS * 256, config)
    try:
        assert os.path.getsize(config.segment_path(pool.name)) == HUGE_PAGE_BYTES
        slot, _ = fill(pool, "a", [4, 2])
        assert adopt(pool, slot, "a", 2) == [4, 2] and config.handoff_names() == [pool.name]
    finally:
        pool.close()
    assert config.handoff_names() == []


def test_a_vanished_segment_stays_usable_by_those_who_attached_it(pools):
    sender = pools.make(num_slots=1)
    receiver = pools.attach(sender.name)
    slot, _ = fill(sender, "a", [3, 1, 2])
    sender.close()  # the creator unlinks the name; pages live while mapped
    assert pools.config.handoff_names() == []
    with pytest.raises(HandoffError) as info:
        pools.attach(receiver.name)
    assert info.value.code == "handoff_lost"
    assert adopt(receiver, slot, "a", 3) == [3, 1, 2]


def test_segments_of_dead_creators_are_removed_at_the_next_create(pools):
    dead = pools.make("dead")
    live = pools.make("live")
    header = Segment.attach(dead.name, pools.config, writable=True)
    np.frombuffer(header.buffer(0, 16), np.int64)[1] = _unused_pid()
    header.close()
    other = Segment.create("kv-handoff.foreign", 4096, pools.config)  # not ours to judge: left alone
    other.close()
    assert pools.config.handoff_names() == sorted([dead.name, live.name, "kv-handoff.foreign"])
    pools.make("next")
    assert pools.config.handoff_names() == sorted([live.name, "kv-handoff.foreign", "kv-handoff.next"])
    remove_stale_segments(pools.config)  # idempotent; live ones stay
    assert live.name in pools.config.handoff_names()


def test_the_segment_sits_under_the_shm_prefix_and_mode_and_is_never_a_pack(pools, ready_pack):
    pool = pools.make("prefill-1")
    assert pool.name == "kv-handoff.prefill-1"
    assert pools.config.handoff_names() == [pool.name]
    assert pools.config.pack_names() == [ready_pack.name]
    mode = os.stat(pools.config.segment_path(pool.name)).st_mode
    assert stat.S_IMODE(mode) == pools.config.mode == 0o600
    pool.close()
    assert pools.config.handoff_names() == [] and pools.config.pack_names() == [ready_pack.name]


def test_an_attached_pool_never_unlinks_the_name(pools):
    sender = pools.make()
    pools.attach(sender.name).close()
    assert pools.config.handoff_names() == [sender.name]


def test_slot_bytes_round_up_to_whole_pages(handoff_config):
    pool = HandoffPool.create("round", 1, 1, handoff_config)
    try:
        assert pool.slot_bytes == 4096
        assert pool.capacity_tokens(make_kv(FakeModel().config, 1, BLOCK)) == 4096 // 256
    finally:
        pool.close()
