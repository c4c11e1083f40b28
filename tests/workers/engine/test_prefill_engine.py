"""PrefillEngine in-process: a fake model (tokens a pure function of the context read back from the KV
pool), a real KVPool and a real HandoffPool under a private shm prefix. Milliseconds each."""

from __future__ import annotations

import dataclasses

import pytest
from helpers.fake_model import LAYERS, continuation, next_token, prefill_msg
from helpers.handoff import SLOT_TOKENS
from helpers.prefill_rig import FakeStreaming, prefilled, run

from hmoe.runtime import protocol
from hmoe.runtime.errors import HmoeError

PROMPT = [5, 9, 2, 7, 1, 3, 8, 4, 6, 11]


def test_a_long_prompt_runs_chunk_by_chunk_and_hands_off_its_whole_kv(make_rig, adopter):
    rig = make_rig(chunk_tokens=4)
    assert not rig.engine.busy and rig.engine.step() == []
    rig.engine.add(prefill_msg("a", PROMPT, max_tokens=8))
    assert rig.engine.busy and rig.engine.load() == (0, 1) and rig.engine.request_ids() == ["a"]
    # One step per layer of each chunk's pass and one that ends it: 3 chunks of (LAYERS + 1) steps, the last of
    # which says Prefilled; cancels and heartbeats are seen between any two.
    quiet_steps = 0
    while not (out := rig.engine.step()):
        quiet_steps += 1
        assert rig.engine.load() == (1, 0)
    (msg,) = out
    assert quiet_steps == 3 * (LAYERS + 1) - 1
    assert rig.model.tokens == [[4], [4], [2]]  # one pass per chunk on the default experts
    expected = protocol.Prefilled("a", next_token(PROMPT), msg.slot, rig.pool.name, len(PROMPT))
    assert msg == dataclasses.replace(expected, generation=rig.pool.generation(msg.slot))  # the fill Adopt names
    assert 0 <= msg.slot < rig.pool.num_slots and rig.pool.free_slots() == rig.pool.num_slots - 1
    assert rig.kv.free_blocks == rig.kv.num_blocks and not rig.kv.block_tables  # its KV lives in the slot now
    assert not rig.engine.busy and rig.engine.step() == []
    assert adopter(msg) == PROMPT  # every token at its position, in every layer and entry
    assert rig.pool.free_slots() == rig.pool.num_slots


def test_requests_run_one_at_a_time_in_arrival_order(make_rig, adopter):
    rig = make_rig(chunk_tokens=16)
    prompts = {"a": [1, 2, 3], "b": [4, 5, 6, 7, 8], "c": [9]}
    for rid, prompt in prompts.items():
        rig.engine.add(prefill_msg(rid, prompt, max_tokens=4))
    got = []
    for _ in prompts:
        msg = prefilled(rig.engine)
        got.append(msg.request_id)
        assert msg.first_token == next_token(prompts[msg.request_id])
        assert adopter(msg) == prompts[msg.request_id]
    assert got == ["a", "b", "c"]


@pytest.mark.parametrize("how", ["stop_token", "eos", "max_tokens_1"])
def test_a_first_token_that_ends_the_request_hands_nothing_off(make_rig, how):
    first = next_token(PROMPT)
    params = {"stop_token": {"stop_token_ids": [first]}, "eos": {}, "max_tokens_1": {"max_tokens": 1}}[how]
    rig = make_rig(eos=(first,) if how == "eos" else ())
    rig.engine.add(prefill_msg("a", PROMPT, **params))
    (msg,), _ = run(rig.engine)
    reason = "length" if how == "max_tokens_1" else "stop"  # the worker says why; the router no longer works it out
    assert msg == protocol.Prefilled("a", first, -1, rig.pool.name, len(PROMPT), reason)
    assert rig.pool.free_slots() == rig.pool.num_slots and rig.kv.free_blocks == rig.kv.num_blocks
    assert not rig.engine.busy and not rig.engine.cancel("a")  # nothing is left to cancel


def test_ignore_eos_hands_off_although_the_first_token_is_eos(make_rig):
    rig = make_rig(eos=(next_token(PROMPT),))
    rig.engine.add(prefill_msg("a", PROMPT, ignore_eos=True))
    assert prefilled(rig.engine).slot >= 0


def test_a_prompt_longer_than_the_hand_off_slot_is_refused_and_the_next_one_runs(make_rig):
    rig = make_rig(num_blocks=64)
    rig.engine.add(prefill_msg("long", list(range(SLOT_TOKENS + 1))))
    rig.engine.add(prefill_msg("fits", list(range(SLOT_TOKENS))))
    (err,) = rig.engine.step()
    assert isinstance(err, protocol.RequestError) and (err.request_id, err.code) == ("long", "prompt_too_long")
    assert "17 tokens" in err.message and "handoff_slot_tokens" in err.message
    assert rig.model.calls == [] and rig.kv.free_blocks == rig.kv.num_blocks  # refused before any work
    assert prefilled(rig.engine).request_id == "fits"


def test_a_prompt_the_kv_pool_cannot_hold_is_refused_with_kv_capacity(make_rig):
    rig = make_rig(num_blocks=3)  # 12 tokens of KV; the slot holds 16
    rig.engine.add(prefill_msg("big", list(range(13))))
    rig.engine.add(prefill_msg("small", list(range(12))))
    (err,) = rig.engine.step()
    assert isinstance(err, protocol.RequestError) and (err.request_id, err.code) == ("big", "kv_capacity")
    assert "raise kv_cache_gib" in err.message and rig.kv.free_blocks == 3 and not rig.kv.block_tables
    assert prefilled(rig.engine).request_id == "small"


def test_a_sampled_request_without_a_seed_is_refused_at_add(make_rig):
    rig = make_rig()
    with pytest.raises(HmoeError) as info:
        rig.engine.add(prefill_msg("a", PROMPT, temperature=0.7))
    assert info.value.code == "invalid_sampling" and not rig.engine.busy


def test_cancel_while_queued_means_it_never_runs(make_rig):
    rig = make_rig(chunk_tokens=16)
    rig.engine.add(prefill_msg("a", [1, 2]))
    rig.engine.add(prefill_msg("b", [3, 4]))
    assert rig.engine.cancel("b") and not rig.engine.cancel("b") and not rig.engine.cancel("nobody")
    assert prefilled(rig.engine).request_id == "a"
    assert not rig.engine.busy and rig.model.calls == [[1]]


def test_cancel_at_any_step_of_a_prompt_frees_its_kv_and_says_nothing(make_rig):
    rig = make_rig(chunk_tokens=4)
    rig.engine.add(prefill_msg("probe", PROMPT))
    _, total = run(rig.engine)
    assert rig.engine.cancel("probe") and total > 3  # three chunks
    for k in range(1, total):
        rig.engine.add(prefill_msg(f"r{k}", PROMPT))
        assert [rig.engine.step() for _ in range(k)] == [[]] * k and rig.kv.free_blocks < rig.kv.num_blocks
        assert rig.engine.cancel(f"r{k}")
        assert rig.kv.free_blocks == rig.kv.num_blocks and not rig.engine.busy
        assert [rig.engine.step() for _ in range(3)] == [[], [], []]
        assert rig.pool.free_slots() == rig.pool.num_slots


def test_cancel_after_the_hand_off_takes_the_slot_back_once(make_rig):
    rig = make_rig()
    rig.engine.add(prefill_msg("a", PROMPT))
    msg = prefilled(rig.engine)
    assert rig.pool.free_slots() == rig.pool.num_slots - 1
    assert rig.engine.cancel("a") and rig.pool.free_slots() == rig.pool.num_slots
    assert not rig.engine.cancel("a")
    rig.engine.add(prefill_msg("b", [1, 2, 3]))
    assert prefilled(rig.engine).slot == msg.slot  # the slot serves the next request


def test_cancel_after_adoption_leaves_the_slot_alone(make_rig, adopter):
    rig = make_rig(num_slots=1)
    rig.engine.add(prefill_msg("a", PROMPT))
    rig.engine.add(prefill_msg("b", [1, 2, 3]))
    adopter(prefilled(rig.engine))
    assert prefilled(rig.engine).request_id == "b"  # b fills the slot a's adopter freed
    assert not rig.engine.cancel("a")  # a's fill is gone: cancelling it must not free b's
    assert rig.pool.free_slots() == 0 and rig.engine.cancel("b") and rig.pool.free_slots() == 1


def test_cancel_of_a_hand_off_reclaimed_after_its_timeout_spares_the_new_fill(make_rig, adopter):
    rig = make_rig(num_slots=1, timeout_s=0.0)  # a filled slot is reclaimable at once
    rig.engine.add(prefill_msg("a", PROMPT))
    rig.engine.add(prefill_msg("b", [1, 2, 3]))
    first, second = prefilled(rig.engine), prefilled(rig.engine)
    assert first.slot == second.slot == 0  # b reclaimed a's slot instead of waiting
    assert not rig.engine.cancel("a")  # the generation moved on: a's cancel must not free b's KV
    assert adopter(second) == [1, 2, 3]


def test_handed_bookkeeping_stays_bounded_while_slots_cycle(make_rig, adopter):
    rig = make_rig(num_slots=1)
    for i in range(20):
        rig.engine.add(prefill_msg(f"r{i}", [i + 1, 2]))
        adopter(prefilled(rig.engine))
        assert len(rig.engine.unadopted) <= 4 * rig.pool.num_slots
    assert not rig.engine.cancel("r0") and not rig.engine.cancel("r19")  # adopted: nothing to take back


def test_a_hand_off_waiting_long_is_still_cancellable_while_the_other_slot_cycles(make_rig, adopter):
    rig = make_rig(num_slots=2)
    rig.engine.add(prefill_msg("waits", PROMPT))
    prefilled(rig.engine)  # never adopted: its decode worker is busy, say
    for i in range(4 * rig.pool.num_slots + 1):  # more hand-offs than the bookkeeping remembers
        rig.engine.add(prefill_msg(f"r{i}", [i + 1, 2]))
        adopter(prefilled(rig.engine))
    assert rig.engine.cancel("waits") and rig.pool.free_slots() == 2  # its slot is free at once, not at the timeout


def test_full_slots_make_the_engine_wait_for_one_without_recomputing_then_hand_off(make_rig, adopter):
    """With every slot awaiting adoption, step() returns [] while the engine stays busy and says it
    awaits a slot (the worker loop sleeps between tries); the prompt's KV stays held, nothing is recomputed."""
    rig = make_rig(num_slots=1)
    rig.engine.add(prefill_msg("a", PROMPT))
    rig.engine.add(prefill_msg("b", [1, 2, 3]))
    held = prefilled(rig.engine)
    calls = len(rig.model.calls)
    assert not rig.engine.awaiting_slot
    for _ in range(5):
        assert rig.engine.step() == [] and rig.engine.busy and rig.engine.load() == (1, 0)
    assert rig.engine.awaiting_slot
    assert len(rig.model.calls) == calls + 1  # b's one forward; spinning runs nothing
    assert rig.kv.block_tables.keys() == {"b"}
    adopter(held)
    (msg,) = rig.engine.step()
    assert msg.request_id == "b" and msg.first_token == next_token([1, 2, 3]) and len(rig.model.calls) == calls + 1
    assert not rig.kv.block_tables and not rig.engine.awaiting_slot


def test_drop_all_forgets_queued_and_current_and_frees_their_kv(make_rig):
    rig = make_rig(chunk_tokens=4)
    rig.engine.add(prefill_msg("a", PROMPT))
    rig.engine.add(prefill_msg("b", PROMPT))
    rig.engine.step()
    rig.engine.drop_all()
    assert not rig.engine.busy and rig.engine.request_ids() == [] and rig.engine.step() == []
    assert rig.kv.free_blocks == rig.kv.num_blocks and rig.pool.free_slots() == rig.pool.num_slots


def test_drop_all_while_waiting_for_a_slot_keeps_handed_kv_adoptable(make_rig, adopter):
    rig = make_rig(num_slots=1)
    rig.engine.add(prefill_msg("a", PROMPT))
    rig.engine.add(prefill_msg("b", [1, 2, 3]))
    held = prefilled(rig.engine)
    assert rig.engine.step() == [] and rig.engine.busy  # b waits for a's slot
    rig.engine.drop_all()
    assert not rig.engine.busy and rig.engine.step() == [] and rig.kv.free_blocks == rig.kv.num_blocks
    assert rig.pool.free_slots() == 0  # a is the decode worker's now: its slot is not pulled from under it
    assert adopter(held) == PROMPT
    rig.engine.add(prefill_msg("c", [4, 5]))
    assert prefilled(rig.engine).first_token == continuation([4, 5], 1)[0]


def test_long_rests_of_a_prompt_go_in_streamed_layer_major_passes_and_short_ones_on_the_cpu(make_rig, adopter):
    streaming = FakeStreaming()
    rig = make_rig(chunk_tokens=4, streaming=streaming, stream_min_tokens=5, max_pass_tokens=8)
    rig.engine.add(prefill_msg("a", PROMPT))  # 10 tokens: a streamed pass of 8 (two chunks), then 2 on the cpu
    msg = prefilled(rig.engine)
    assert rig.model.tokens == [[4, 4], [2]] and rig.engine.passes == {"stream": 1, "cpu": 1}
    assert streaming.opened == streaming.closed == 1
    assert msg.first_token == next_token(PROMPT) and adopter(msg) == PROMPT


def test_a_cancel_mid_pass_closes_the_streamed_pass(make_rig):
    streaming = FakeStreaming()
    rig = make_rig(chunk_tokens=4, streaming=streaming, stream_min_tokens=5)
    rig.engine.add(prefill_msg("a", PROMPT))
    assert rig.engine.step() == [] and streaming.opened == 1 and streaming.closed == 0
    assert rig.engine.cancel("a") and streaming.closed == 1 and rig.kv.free_blocks == rig.kv.num_blocks
    rig.engine.add(prefill_msg("b", PROMPT))
    rig.engine.step()
    rig.engine.drop_all()
    assert streaming.opened == streaming.closed == 2 and not rig.engine.busy


def test_after_a_router_restart_the_unadopted_slots_are_freed(make_rig):
    """No Adopt will come for what the old router's requests left in hand-off slots: release_unadopted frees them."""
    rig = make_rig(num_slots=1)
    rig.engine.add(prefill_msg("a", PROMPT))
    prefilled(rig.engine)
    rig.engine.drop_all()
    assert rig.pool.free_slots() == 0  # a mere re-registration keeps it adoptable
    rig.engine.release_unadopted()
    assert rig.pool.free_slots() == 1
    rig.engine.add(prefill_msg("b", [1, 2, 3]))
    assert prefilled(rig.engine).first_token == continuation([1, 2, 3], 1)[0]
