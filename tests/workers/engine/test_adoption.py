"""Adoption in-process: a hand-off slot's KV copied into a decode KV pool a bounded slice per call (whole
layers while they fit, else rows of one layer), the slot freed only once the KV has landed, a reclaim
during or after the copy refused as handoff_lost. On a GPU (marked gpu) the pieces go out on a side
stream, DMA'd from the registered segment, and land with the stream's event."""

from __future__ import annotations

import pytest
import torch
from helpers.fake_model import FakeModel, make_kv, read_context
from helpers.handoff import BLOCK, fill

from hmoe.workers.engine.adoption import Adoption
from hmoe.workers.engine.kv_handoff import HandoffError

PROMPT = [7, 3, 9, 1, 12, 5, 8, 2, 11, 4]
ROW = 64  # bytes of one token in one layer of one entry (16 float32); k and v, 2 layers: 2560 bytes in all
LAYER = ROW * len(PROMPT)


def start(pools, device: str = "cpu"):
    """(prefill side's pool, decode side's pool, the slot PROMPT's KV fills, a decode KV pool reserved for it)."""
    sender = pools.make(num_slots=2)
    receiver = pools.attach(sender.name)
    slot, _ = fill(sender, "a", PROMPT)
    kv = make_kv(FakeModel().config, 16, BLOCK, device)
    kv.reserve("a", len(PROMPT))
    return sender, receiver, slot, kv


@pytest.mark.parametrize(
    "budget, pieces",
    [
        (ROW, [ROW] * 40),  # one row a call
        (100, [ROW] * 40),  # what is left of a row waits for the next call
        (LAYER + 60, [LAYER] * 4),  # one whole layer a call
        (1000, [LAYER + 5 * ROW, 5 * ROW + LAYER, LAYER]),  # a layer and the rows that fit, in order
        (4 * LAYER, [4 * LAYER]),  # everything at once: each entry's layers as one piece
        (1 << 20, [4 * LAYER]),
    ],
)
def test_each_call_copies_at_most_its_budget_in_whole_rows_until_the_kv_has_landed(pools, budget, pieces):
    sender, receiver, slot, kv = start(pools)
    adoption = Adoption("a", receiver, slot, kv, len(PROMPT))
    assert adoption.total_bytes == 4 * LAYER
    copied = []
    while not adoption.landed():
        assert sender.free_slots() == 1  # the slot stays the adopter's until the KV has landed
        copied.append(adoption.copy(budget))
    assert copied == pieces and adoption.copy(budget) == 0 and adoption.copied_bytes == 4 * LAYER
    adoption.finish()
    assert read_context(kv, kv.slots("a", 0, len(PROMPT))) == PROMPT  # every layer and entry in place
    assert sender.free_slots() == 2


def test_a_reclaim_between_slices_is_handoff_lost_and_the_writer_keeps_the_slot(pools):
    sender, receiver, slot, kv = start(pools)
    adoption = Adoption("a", receiver, slot, kv, len(PROMPT))
    assert adoption.copy(LAYER) == LAYER
    assert sender.allocate(0.0) == slot  # reclaimed after its timeout: a new prompt is being written there
    with pytest.raises(HandoffError) as info:
        adoption.copy(LAYER)
    assert info.value.code == "handoff_lost" and "while being adopted" in info.value.message
    adoption.abandon()
    assert sender.free_slots() == 1  # the writer's slot is not freed by the lost adoption


def test_a_reclaim_after_the_last_slice_is_handoff_lost_at_finish(pools):
    sender, receiver, slot, kv = start(pools)
    adoption = Adoption("a", receiver, slot, kv, len(PROMPT))
    adoption.copy(1 << 20)
    assert adoption.landed() and sender.allocate(0.0) == slot
    with pytest.raises(HandoffError) as info:
        adoption.finish()
    assert info.value.code == "handoff_lost" and sender.free_slots() == 1


def test_abandon_mid_copy_frees_the_slot_it_still_holds(pools):
    sender, receiver, slot, kv = start(pools)
    adoption = Adoption("a", receiver, slot, kv, len(PROMPT))
    adoption.copy(LAYER)
    adoption.abandon()
    assert sender.free_slots() == 2


def test_a_slot_refilled_before_the_adoption_starts_is_handoff_lost(pools):
    sender, receiver, slot, kv = start(pools)
    generation = sender.generation(slot)
    assert sender.allocate(0.0) == slot
    sender.release(slot)
    fill(sender, "b", PROMPT)  # the same length, another prompt
    with pytest.raises(HandoffError) as info:
        Adoption("a", receiver, slot, kv, len(PROMPT), generation)
    assert info.value.code == "handoff_lost"


@pytest.mark.gpu
def test_on_a_gpu_pieces_go_out_on_the_side_stream_from_the_registered_segment_and_land_with_its_event(pools):
    sender, receiver, slot, kv = start(pools, "cuda")
    receiver.pin()
    assert receiver.pinned and receiver.slot_kv(slot, kv, len(PROMPT))["k"].is_pinned()
    side = torch.cuda.Stream()
    # NOTE: a kernel's first launch may load its module, which can wait for the whole device (the sleep
    # below): a first adoption and main-stream sum load them.
    warm = Adoption("a", receiver, slot, kv, len(PROMPT), stream=side)
    warm.copy(1 << 20)
    side.synchronize()
    warm.finish()
    assert read_context(kv, kv.slots("a", 0, len(PROMPT))) == PROMPT
    assert (torch.arange(8, device="cuda") * 2).sum().item() == 56
    kv.free("a")
    kv.reserve("b", len(PROMPT))
    slot, _ = fill(sender, "b", PROMPT[::-1])
    with torch.cuda.stream(side):
        torch.cuda._sleep(1 << 30)  # ~0.5 s of GPU cycles: the side stream is busy, the main one is not
    adoption = Adoption("b", receiver, slot, kv, len(PROMPT), stream=side)
    assert [adoption.copy(LAYER) for _ in range(4)] == [LAYER] * 4 and adoption.issued
    assert (torch.arange(8, device="cuda") * 2).sum().item() == 56  # the main stream runs meanwhile
    assert not adoption.landed() and sender.free_slots() == 1  # the pieces wait behind the sleep
    side.synchronize()
    assert adoption.landed()
    adoption.finish()
    assert read_context(kv, kv.slots("b", 0, len(PROMPT))) == PROMPT[::-1] and sender.free_slots() == 2
