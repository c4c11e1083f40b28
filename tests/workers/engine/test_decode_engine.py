"""DecodeEngine in-process: requests prefilled by a real PrefillEngine into a real HandoffPool, adopted
into a real KVPool and decoded by a fake model whose greedy tokens are a pure function of the context
it reads back from the pool (so a token is right only if the adopted KV is). Milliseconds each."""

from __future__ import annotations

import pytest
from helpers.decode_rig import BLOCK, Rig, rigs
from helpers.fake_model import FakeModel, continuation, make_kv

from hmoe.runtime import protocol
from hmoe.runtime.sampling_params import SamplingParams
from hmoe.workers.engine.kv_handoff import HandoffPool
from hmoe.workers.model.generate import generate


@pytest.fixture
def make_rig(handoff_config):
    with rigs(handoff_config) as make:
        yield make


PROMPTS = {"a": [5, 9, 2, 7, 1, 3], "b": [4, 4, 8], "c": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "d": [13]}


def assert_all_freed(rig: Rig) -> None:
    assert rig.kv.free_blocks == rig.kv.num_blocks and not rig.kv.block_tables
    assert rig.pool.free_slots() == rig.pool.num_slots
    assert not rig.engine.busy and rig.engine.request_ids() == []


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_batched_greedy_tokens_equal_each_requests_own_continuation(make_rig, micro_batches):
    rig = make_rig(num_blocks=32, micro_batches=micro_batches)
    for rid, prompt in PROMPTS.items():
        rig.add(rid, prompt, max_tokens=6)
    assert rig.engine.load() == (0, 4) and rig.pool.free_slots() == rig.pool.num_slots - 4
    assert rig.step() == sorted(PROMPTS)  # all four admitted and decoded together
    assert rig.pool.free_slots() == rig.pool.num_slots  # adopted slots are given back at once
    rig.run_until_idle()
    for rid, prompt in PROMPTS.items():
        assert rig.tokens[rid] == continuation(prompt, 6), rid
        assert rig.reasons[rid] == "length"
    assert len(rig.steps) == 5  # the first token came from the prefill
    assert all(sum(sizes) == 4 and len(sizes) == micro_batches for sizes in rig.model.calls)
    assert_all_freed(rig)


def test_requests_join_between_steps_and_leave_when_they_finish(make_rig):
    rig = make_rig(num_blocks=32)
    rig.add("a", PROMPTS["a"], max_tokens=6)
    assert rig.step() == ["a"]
    rig.add("b", PROMPTS["b"], max_tokens=3)
    assert rig.step() == ["a", "b"]  # b joined the running batch
    held = rig.kv.free_blocks
    assert rig.step() == ["a", "b"] and rig.reasons == {"b": "length"}
    assert rig.kv.free_blocks == held + rig.kv.blocks_for(len(PROMPTS["b"]) + 3)  # b's KV freed at once
    assert rig.engine.request_ids() == ["a"]
    rig.run_until_idle()
    assert rig.steps[-2:] == [["a"], ["a"]]
    assert rig.tokens["a"] == continuation(PROMPTS["a"], 6) and rig.tokens["b"] == continuation(PROMPTS["b"], 3)
    assert_all_freed(rig)


def test_eos_ends_a_request_unless_it_ignores_eos(make_rig):
    prompt = [3, 1, 4]
    tokens = continuation(prompt, 8)
    eos = tokens[3]
    assert eos not in tokens[:3]
    rig = make_rig(eos=(eos,))
    rig.add("stops", prompt, max_tokens=8)
    rig.add("ignores", prompt, max_tokens=8, ignore_eos=True)
    rig.add("stop_id", prompt, max_tokens=8, ignore_eos=True, stop_token_ids=[tokens[2]])
    rig.run_until_idle()
    assert rig.tokens["stops"] == tokens[:4] and rig.reasons["stops"] == "stop"
    assert rig.tokens["ignores"] == tokens and rig.reasons["ignores"] == "length"
    assert rig.tokens["stop_id"] == tokens[:3] and rig.reasons["stop_id"] == "stop"
    assert_all_freed(rig)


def test_max_batch_holds_the_rest_waiting_in_order(make_rig):
    rig = make_rig(num_blocks=32, max_batch=2)
    rig.add("a", PROMPTS["a"], max_tokens=2)
    rig.add("b", PROMPTS["b"], max_tokens=4)
    rig.add("c", PROMPTS["c"], max_tokens=2)
    assert rig.step() == ["a", "b"] and rig.engine.load() == (1, 1)  # a finished, c waits for the next step
    assert rig.step() == ["b", "c"]
    rig.run_until_idle()
    assert rig.tokens["c"] == continuation(PROMPTS["c"], 2)
    assert_all_freed(rig)


def test_a_request_that_can_never_fit_the_kv_pool_is_refused_at_add(make_rig):
    rig = make_rig(num_blocks=4)  # 16 tokens
    rig.add("huge", PROMPTS["c"], max_tokens=7)  # 10 + 7 > 16
    assert rig.errors == {"huge": "kv_capacity"} and not rig.engine.busy
    assert_all_freed(rig)  # its hand-off slot was released too


def test_a_request_waits_for_kv_room_first_come_first_served(make_rig):
    rig = make_rig(num_blocks=5)  # 20 tokens
    rig.add("a", PROMPTS["a"], max_tokens=6)  # 12 tokens: 3 blocks
    rig.add("b", PROMPTS["c"], max_tokens=2)  # 12 tokens: 3 blocks, fits only once a is gone
    rig.add("c", PROMPTS["d"], max_tokens=2)  # 1 block would fit now, but waits behind b
    assert rig.step() == ["a"] and rig.engine.load() == (1, 2)
    rig.run_until_idle()
    assert rig.steps.index(["b", "c"]) == 5  # both joined the step after a's last
    assert rig.tokens["b"] == continuation(PROMPTS["c"], 2) and rig.tokens["c"] == continuation(PROMPTS["d"], 2)
    assert_all_freed(rig)


def test_cancel_a_running_request_frees_its_kv_and_stops_its_tokens(make_rig):
    rig = make_rig()
    rig.add("a", PROMPTS["a"], max_tokens=8)
    rig.add("b", PROMPTS["b"], max_tokens=4)
    rig.step()
    assert rig.engine.cancel("a") and not rig.engine.cancel("a") and not rig.engine.cancel("nobody")
    assert rig.kv.block_tables.keys() == {"b"}
    rig.run_until_idle()
    assert len(rig.tokens["a"]) == 2 and "a" not in rig.reasons and rig.reasons["b"] == "length"
    assert_all_freed(rig)


def test_cancel_a_waiting_request_gives_its_hand_off_slot_back(make_rig):
    rig = make_rig(max_batch=1)
    rig.add("a", PROMPTS["a"], max_tokens=3)
    rig.add("b", PROMPTS["b"], max_tokens=3)
    rig.step()
    assert rig.pool.free_slots() == rig.pool.num_slots - 1  # b's slot awaits its adoption
    assert rig.engine.cancel("b") and rig.pool.free_slots() == rig.pool.num_slots
    rig.run_until_idle()
    assert rig.tokens["b"] == [continuation(PROMPTS["b"], 1)[0]] and set(rig.reasons) == {"a"}
    assert_all_freed(rig)


def test_drop_all_frees_every_block_and_slot(make_rig):
    rig = make_rig(max_batch=2)
    for rid, prompt in PROMPTS.items():
        rig.add(rid, prompt, max_tokens=4)
    rig.step()
    assert rig.engine.load() == (2, 2)
    rig.engine.drop_all()
    assert rig.engine.step() == []
    assert_all_freed(rig)


def test_a_hand_off_whose_segment_vanished_ends_with_handoff_lost(make_rig):
    rig = make_rig()
    lost = rig.hand_off("lost", PROMPTS["a"], max_tokens=4)
    cancelled = rig.hand_off("cancelled", PROMPTS["b"], max_tokens=4)
    rig.pool.close()  # the prefill worker exited: its segment is unlinked
    rig.collect(rig.engine.add(lost))
    rig.collect(rig.engine.add(cancelled))
    assert rig.engine.cancel("cancelled")  # no slot left to give back: still a clean cancel
    assert rig.step() == [] and rig.errors == {"lost": "handoff_lost"}
    assert rig.kv.free_blocks == rig.kv.num_blocks and not rig.kv.block_tables and not rig.engine.busy


def test_a_slot_freed_before_adoption_ends_with_handoff_lost_and_others_run(make_rig):
    rig = make_rig()
    lost = rig.hand_off("lost", PROMPTS["a"], max_tokens=4)
    rig.pool.release(lost.slot)  # e.g. reclaimed after its timeout
    rig.collect(rig.engine.add(lost))
    rig.add("b", PROMPTS["b"], max_tokens=3)
    assert rig.step() == ["b"] and rig.errors == {"lost": "handoff_lost"}
    rig.run_until_idle()
    assert rig.tokens["b"] == continuation(PROMPTS["b"], 3)
    assert_all_freed(rig)


@pytest.mark.parametrize("segment", ["not-a-handoff", "kv-handoff./etc/passwd", "kv-handoff.nobody"])
def test_an_adopt_naming_a_bad_segment_ends_with_a_clean_error(make_rig, segment):
    rig = make_rig()
    adopt = rig.hand_off("a", PROMPTS["a"], max_tokens=4)
    bad = protocol.Adopt(adopt.request_id, adopt.prompt_len, adopt.first_token, adopt.slot, segment, adopt.params)
    rig.collect(rig.engine.add(bad))
    rig.step()
    expected = "handoff_lost" if segment == "kv-handoff.nobody" else "handoff_invalid"
    assert rig.errors == {"a": expected} and rig.kv.free_blocks == rig.kv.num_blocks and not rig.engine.busy
    assert rig.engine.cancel("a") is False


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_sampled_tokens_split_across_prefill_and_batched_decode_equal_one_process_generate(make_rig, micro_batches):
    rig = make_rig(num_blocks=32, micro_batches=micro_batches)
    sampled = {"temperature": 1.5, "top_k": 20, "max_tokens": 7}
    rig.add("a", PROMPTS["c"], seed=11, **sampled)  # a 10-token prompt: two prefill chunks of 8 and 2
    rig.add("b", PROMPTS["b"], seed=12, **sampled)
    rig.add("greedy", PROMPTS["a"], max_tokens=7)
    rig.run_until_idle()
    model = FakeModel()
    for rid, prompt, seed in (("a", PROMPTS["c"], 11), ("b", PROMPTS["b"], 12)):
        alone = generate(model, make_kv(model.config, 8, BLOCK), prompt, SamplingParams(seed=seed, **sampled))
        assert rig.tokens[rid] == list(alone.token_ids), rid
    assert rig.tokens["a"] != continuation(PROMPTS["c"], 7)  # the draw mattered
    assert rig.tokens["greedy"] == continuation(PROMPTS["a"], 7)


def test_a_restarted_prefill_workers_old_segment_is_unmapped(make_rig, handoff_config):
    """A mapping keeps every page of the segment allocated: slots x slot bytes of /dev/shm per restart."""
    rig = make_rig()
    rig.add("a", PROMPTS["a"], max_tokens=2)
    rig.run_until_idle()
    old = rig.pool.name
    rig.pool.close()  # the prefill worker exits (its name is unlinked) and a new one starts
    rig.pool = HandoffPool.create("restarted", 2, 4096, handoff_config)
    rig.prefill.handoff = rig.pool
    rig.add("b", PROMPTS["b"], max_tokens=2)
    rig.run_until_idle()
    assert rig.tokens["b"] == continuation(PROMPTS["b"], 2)
    with open("/proc/self/maps") as maps:
        assert handoff_config.prefix + old not in maps.read()
