"""PrefillEngine runs a Prefill marked `interleave` (a short prompt) ahead of the prompt it is prefilling:
mid-pass when that pass streams, at the next pass boundary otherwise; the long one resumes after it,
both hand off the KV of their own tokens, a cancel of either leaves the other whole."""

from __future__ import annotations

import dataclasses

from helpers.fake_model import LAYERS, next_token, prefill_msg
from helpers.prefill_rig import FakeStreaming, prefilled

from hmoe.runtime import protocol

LONG = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]  # 12 tokens
SHORT = [2, 7, 1]


def short_msg(request_id: str = "short", prompt=SHORT) -> protocol.Prefill:
    return dataclasses.replace(prefill_msg(request_id, prompt), interleave=True)


def steps_until(engine, request_id: str, limit: int = 100) -> tuple[protocol.Prefilled, int]:
    for steps in range(1, limit + 1):
        for msg in engine.step():
            if msg.request_id == request_id:
                assert isinstance(msg, protocol.Prefilled), msg
                return msg, steps
    raise AssertionError(f"{request_id} not prefilled in {limit} steps")


def test_a_short_prompt_runs_between_two_layers_of_a_streamed_pass(make_rig, adopter):
    streaming = FakeStreaming()
    rig = make_rig(num_blocks=32, chunk_tokens=4, streaming=streaming, stream_min_tokens=5, max_pass_tokens=12)
    rig.engine.add(prefill_msg("long", LONG))
    rig.engine.step()  # the long prompt's streamed pass is one layer in
    assert streaming.opened == 1 and rig.engine.load() == (1, 0)
    rig.engine.add(short_msg())
    assert rig.engine.load() == (1, 1)
    short, steps = steps_until(rig.engine, "short")
    assert steps == LAYERS + 1  # its own pass only: it did not wait for the long one's
    assert rig.engine.load() == (1, 0) and streaming.opened == 1  # on the CPU kernels: the ring is the long one's
    assert short.first_token == next_token(SHORT) and adopter(short) == SHORT
    long = prefilled(rig.engine)
    assert long.first_token == next_token(LONG) and adopter(long) == LONG
    assert streaming.opened == streaming.closed == 1 and not rig.engine.busy
    assert rig.kv.free_blocks == rig.kv.num_blocks


def test_on_the_cpu_kernels_it_waits_for_the_end_of_the_running_pass(make_rig, adopter):
    rig = make_rig(num_blocks=32, chunk_tokens=4)  # LONG: three passes of 4 tokens
    rig.engine.add(prefill_msg("long", LONG))
    rig.engine.step()
    rig.engine.add(short_msg())
    short, steps = steps_until(rig.engine, "short")
    assert steps == LAYERS + (LAYERS + 1)  # the rest of the long one's first pass, then its own
    assert adopter(short) == SHORT and adopter(prefilled(rig.engine)) == LONG
    assert rig.model.tokens == [[4], [3], [4], [4]]  # long's first pass, short, long's other two


def test_a_cancel_of_either_leaves_the_other_whole(make_rig, adopter):
    streaming = FakeStreaming()
    rig = make_rig(num_blocks=32, chunk_tokens=4, streaming=streaming, stream_min_tokens=5)
    rig.engine.add(prefill_msg("long", LONG))
    rig.engine.step()
    rig.engine.add(short_msg())
    rig.engine.step()  # the short one is running, the long one suspended
    assert rig.engine.cancel("long") and streaming.closed == 1
    short, _ = steps_until(rig.engine, "short")
    assert adopter(short) == SHORT and not rig.engine.busy and rig.kv.free_blocks == rig.kv.num_blocks

    rig.engine.add(prefill_msg("long-2", LONG))
    rig.engine.step()
    rig.engine.add(short_msg("short-2"))
    rig.engine.step()
    assert rig.engine.cancel("short-2")
    assert adopter(prefilled(rig.engine)) == LONG and rig.kv.free_blocks == rig.kv.num_blocks


def test_a_short_prompt_the_kv_pool_cannot_hold_beside_the_long_one_waits_for_it(make_rig, adopter):
    streaming = FakeStreaming()
    rig = make_rig(num_blocks=4, chunk_tokens=4, streaming=streaming, stream_min_tokens=5)  # LONG takes 3
    rig.engine.add(prefill_msg("long", LONG))
    rig.engine.step()
    rig.engine.add(short_msg("short", [1, 2, 3, 4, 5, 6]))  # 2 blocks: only after the long one
    long, _ = steps_until(rig.engine, "long")
    assert adopter(long) == LONG
    short, _ = steps_until(rig.engine, "short")
    assert adopter(short) == [1, 2, 3, 4, 5, 6]  # served, not refused


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_short_prompts_one_after_another_do_not_starve_the_long_one(make_rig, adopter):
    """After an interleaved prompt took t, the long one runs 3t before the next may interrupt it."""
    clock, streaming = Clock(), FakeStreaming()
    rig = make_rig(num_blocks=32, chunk_tokens=4, streaming=streaming, stream_min_tokens=1, max_pass_tokens=4)
    rig.engine.clock = clock  # LONG: three streamed passes of 4 tokens, LAYERS steps each
    rig.engine.add(prefill_msg("long", LONG))
    rig.engine.step()
    rig.engine.add(short_msg())
    steps_until(rig.engine, "short")  # interrupted at 0 s ...
    clock.now = 1.0  # ... resumed at 1 s: not again before 1 + 3 * 1 = 4 s
    rig.engine.add(short_msg("short-2"))
    for clock.now in (1.0, 2.0, 3.9):
        assert rig.engine.step() == [] and rig.engine.load() == (1, 1)  # the long one's layers
    assert rig.model.tokens == [[4], [3], [4]]  # long, short, long again: short-2 has not started
    clock.now = 4.0
    short_2, steps = steps_until(rig.engine, "short-2")
    assert steps == LAYERS + 1 and adopter(short_2) == SHORT
    assert adopter(prefilled(rig.engine)) == LONG and rig.kv.free_blocks == rig.kv.num_blocks


def test_a_fresh_prompt_is_not_protected_by_the_last_ones_share(make_rig, adopter):
    clock, streaming = Clock(), FakeStreaming()
    rig = make_rig(num_blocks=32, chunk_tokens=4, streaming=streaming, stream_min_tokens=1, max_pass_tokens=4)
    rig.engine.clock = clock
    rig.engine.add(prefill_msg("long", LONG))
    rig.engine.step()
    rig.engine.add(short_msg())
    steps_until(rig.engine, "short")
    clock.now = 10.0  # the long one resumes: not interruptible before 40 s
    assert adopter(prefilled(rig.engine)) == LONG
    rig.engine.add(prefill_msg("next", LONG))
    rig.engine.step()
    rig.engine.add(short_msg("short-2"))
    _, steps = steps_until(rig.engine, "short-2")
    assert steps == LAYERS + 1  # at once: "next" was never interrupted
