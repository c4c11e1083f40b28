"""PrefillEngine's commands to the other ranks of a worker spanning several devices (ranks.py), checked
on a recorder: whatever the prompts do (interleave, cancel, several passes), every rank sees each
streamed pass opened once, stepped only while open, closed once, and each prompt's KV freed once,
and never a pass that needs KV the other ranks do not hold."""

from __future__ import annotations

import dataclasses

from helpers.fake_model import next_token, prefill_msg
from helpers.prefill_rig import FakeStreaming, prefilled

from hmoe.runtime import protocol

LONG = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]


class Recorder:
    """What ranks.Ranks would broadcast, checked as it comes."""

    def __init__(self):
        self.opened: int | None = None  # the key of the open pass
        self.held: set[int] = set()  # keys whose KV the other ranks hold
        self.commands: list[tuple] = []

    def open(self, key, start, token_ids, prompt_len):
        assert self.opened is None, "a pass opened inside another"
        assert (start == 0) != (key in self.held), f"pass of {key} at {start}: the other ranks' KV does not match"
        self.opened, self.commands = key, [*self.commands, ("open", key, start)]
        self.held.add(key)

    def layer(self):
        assert self.opened is not None, "a step outside any pass"

    def close_pass(self, key):
        assert self.opened == key
        self.opened, self.commands = None, [*self.commands, ("close", key)]

    def free(self, key):
        assert key in self.held and self.opened != key
        self.held.remove(key)


def test_an_interleaved_prompt_that_ran_on_the_cpu_never_streams_on_the_ranks_later(make_rig, adopter):
    """Its first pass ran on the CPU kernels (the ring was the long one's); the long one is cancelled, the
    ring is free, and its rest would stream from token 4, which the other ranks never saw."""
    ranks = Recorder()
    rig = make_rig(
        num_blocks=32, chunk_tokens=4, streaming=FakeStreaming(), stream_min_tokens=1, max_pass_tokens=4, ranks=ranks
    )
    rig.engine.add(prefill_msg("long", LONG))
    rig.engine.step()
    short = [2, 7, 1, 8, 2, 8]
    rig.engine.add(dataclasses.replace(prefill_msg("short", short), interleave=True))
    rig.engine.step()  # the long one suspended, the short one's first pass on the CPU kernels
    assert rig.engine.cancel("long")
    done = prefilled(rig.engine)
    assert done.first_token == next_token(short) and adopter(done) == short
    assert ranks.opened is None and not ranks.held  # everything opened was closed and freed
    assert [c for c in ranks.commands if c[0] == "open"] == [("open", 0, 0)]  # only the long one streamed


def test_a_long_prompt_in_several_streamed_passes_with_cancels_around_it(make_rig, adopter):
    ranks = Recorder()
    rig = make_rig(
        num_blocks=32, chunk_tokens=4, streaming=FakeStreaming(), stream_min_tokens=1, max_pass_tokens=4, ranks=ranks
    )
    rig.engine.add(prefill_msg("a", LONG))
    rig.engine.add(prefill_msg("b", LONG[:7]))
    rig.engine.add(prefill_msg("c", LONG))
    for _ in range(3):
        rig.engine.step()
    assert rig.engine.cancel("b") or True  # queued or running: either way nothing leaks
    got = {}
    for _ in range(60):
        for msg in rig.engine.step():
            assert isinstance(msg, protocol.Prefilled), msg
            got[msg.request_id] = adopter(msg)
    assert got == {"a": LONG, "c": LONG}
    assert ranks.opened is None and not ranks.held
    assert [c[2] for c in ranks.commands if c[0] == "open" and c[1] == 2] == [0, 4, 8]  # c: three passes
