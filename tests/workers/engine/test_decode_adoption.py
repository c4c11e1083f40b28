"""DecodeEngine's asynchronous adoption: a waiting request's KV comes in one bounded slice per step while the
running requests keep decoding, and the request joins once all of it has landed. Structural, never timed:
the bytes of KV that arrive per step are counted in a decode pool that starts as NaN, and the running
request's tokens are counted per step. Cancel and a reclaimed slot mid-adoption end that request alone;
sliced adoption gives the tokens of the whole-prompt (synchronous) one."""

from __future__ import annotations

import pytest
from helpers.decode_rig import Rig, rigs
from helpers.fake_model import continuation

SLICE = 200  # bytes per step: 3 token rows of 64 bytes (one layer of one entry)
LONG = list(range(1, 15))  # 14 tokens: 2 entries x 2 layers x 14 rows x 64 bytes = 3584 bytes of KV, 18+ slices
PROMPTS = {"a": [5, 9, 2, 7, 1, 3], "b": LONG, "c": [4, 4, 8], "d": LONG[::-1], "e": [13]}


@pytest.fixture
def make_rig(handoff_config):
    with rigs(handoff_config) as make:
        yield make


def landed_bytes(rig: Rig, request_id: str, num_tokens: int) -> int:
    """Bytes of request_id's prompt KV in the decode pool so far (the pool was filled with NaN first)."""
    slots = rig.kv.slots(request_id, 0, num_tokens)
    return sum(int((~entry[:, slots].isnan()).sum()) * entry.element_size() for entry in rig.kv.data.values())


def running_rig(make_rig, **options) -> Rig:
    """A rig whose decode pool starts as NaN, with request "a" (a 1-token prompt, 40 tokens to go) running."""
    rig = make_rig(num_blocks=32, adopt_slice_bytes=SLICE, **options)
    for entry in rig.kv.data.values():
        entry.fill_(float("nan"))
    for entry in rig.prefill.kv.data.values():  # the fake model writes a few columns: the rest must be no NaN
        entry.zero_()
    rig.add("a", [3], max_tokens=40)
    while not rig.step():  # a's own KV (256 bytes) takes two slices; it decodes in the step it lands
        pass
    assert rig.steps[-1] == ["a"] and len(rig.steps) >= 2
    return rig


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_long_adoption_never_holds_a_running_stream_back_by_more_than_one_slice(make_rig, device):
    rig = running_rig(make_rig, device=device)
    rig.add("b", LONG, max_tokens=4)
    issued, landed, adoption = [0], [0], None
    while "b" not in (got := rig.step()):
        assert got == ["a"]  # the running stream gets its token every step
        adoption = adoption or rig.engine.adopting[0].adoption
        issued.append(adoption.copied_bytes)
        landed.append(landed_bytes(rig, "b", len(LONG)))
    assert got == ["a", "b"]  # b joined the step its KV had landed in
    per_step = [after - before for before, after in zip(issued, issued[1:])]
    assert all(0 <= n <= SLICE for n in per_step) and len(per_step) >= 3584 // SLICE  # many slices, each bounded
    assert all(land <= issue for land, issue in zip(landed, issued))
    if device == "cpu":  # plain copies: what a step issued has landed when it returns
        assert landed == issued
    assert landed_bytes(rig, "b", len(LONG)) == 3584 and rig.pool.free_slots() == rig.pool.num_slots
    assert [pool.pinned for pool in rig.engine._pools.values()] == [device == "cuda"]  # DMA'd from the segment
    rig.run_until_idle()
    assert rig.tokens["a"] == continuation([3], 40) and rig.tokens["b"] == continuation(LONG, 4)


def test_cancel_mid_adoption_frees_its_blocks_and_slot_and_the_next_one_adopts_cleanly(make_rig):
    rig = running_rig(make_rig)
    rig.add("b", LONG, max_tokens=4)
    assert rig.step() == ["a"] and rig.step() == ["a"]
    assert rig.engine.load() == (1, 1) and rig.kv.block_tables.keys() == {"a", "b"}  # adopting: blocks held
    assert 0 < landed_bytes(rig, "b", len(LONG)) < 3584 and rig.pool.free_slots() == rig.pool.num_slots - 1
    assert rig.engine.cancel("b") and not rig.engine.cancel("b")
    assert rig.kv.block_tables.keys() == {"a"} and rig.pool.free_slots() == rig.pool.num_slots
    assert rig.engine.request_ids() == ["a"]
    rig.add("c", LONG[::-1], max_tokens=3)  # takes b's blocks, half written (the free list is LIFO)
    rig.run_until_idle()
    assert rig.tokens["c"] == continuation(LONG[::-1], 3) and rig.tokens["a"] == continuation([3], 40)
    assert "b" not in rig.reasons and not rig.errors
    assert rig.kv.free_blocks == rig.kv.num_blocks and rig.pool.free_slots() == rig.pool.num_slots


def test_a_slot_reclaimed_mid_adoption_is_handoff_lost_for_that_request_only(make_rig):
    rig = running_rig(make_rig)
    lost = rig.hand_off("b", LONG, max_tokens=4)
    rig.collect(rig.engine.add(lost))
    assert rig.step() == ["a"]  # b's adoption has begun
    rig.add("c", [2, 7], max_tokens=3)  # behind it, in another slot
    assert rig.pool.allocate(0.0) == lost.slot  # the prefill side reclaims b's slot under the copy
    assert rig.step() == ["a"] and rig.errors == {"b": "handoff_lost"}
    assert rig.kv.block_tables.keys() <= {"a", "c"}  # b's blocks are back
    rig.run_until_idle()
    assert rig.tokens["a"] == continuation([3], 40) and rig.tokens["c"] == continuation([2, 7], 3)
    assert rig.kv.free_blocks == rig.kv.num_blocks
    assert rig.pool.free_slots() == rig.pool.num_slots - 1  # the reclaimed slot is its new writer's


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_sliced_adoption_gives_the_tokens_of_whole_prompt_adoption(make_rig, micro_batches):
    """1 MiB a step adopts every prompt whole in the step it starts: the synchronous path as it was."""
    tokens, steps = [], []
    for slice_bytes in (1 << 20, SLICE, 64):
        rig = make_rig(num_blocks=64, max_batch=3, micro_batches=micro_batches, adopt_slice_bytes=slice_bytes)
        for rid, prompt in PROMPTS.items():
            rig.add(rid, prompt, max_tokens=8)
        rig.run_until_idle(max_steps=1000)
        assert all(rig.tokens[rid] == continuation(prompt, 8) for rid, prompt in PROMPTS.items())
        assert rig.kv.free_blocks == rig.kv.num_blocks and rig.pool.free_slots() == rig.pool.num_slots
        tokens.append(rig.tokens)
        steps.append(len(rig.steps))
    assert tokens[0] == tokens[1] == tokens[2]
    assert steps[0] < steps[1] < steps[2]  # the slices took steps
