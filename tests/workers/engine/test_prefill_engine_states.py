"""A hypothesis state machine over PrefillEngine + KVPool + HandoffPool, with the fake model:
add, step, cancel, adopt (the decode side) and drop_all in any order."""

from __future__ import annotations

import uuid
from collections import Counter

import hypothesis.strategies as st
from helpers.fake_model import FakeModel, make_kv, next_token, prefill_msg, read_context
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hmoe.runtime import protocol
from hmoe.shm import ShmConfig
from hmoe.workers.engine.kv_handoff import HandoffPool
from hmoe.workers.engine.prefill import PrefillEngine

BLOCK = 4
SLOT_TOKENS = 16


class PrefillMachine(RuleBasedStateMachine):
    """add, step, cancel, adopt and drop_all in any order. Invariants: KV conserved and held only by
    the request in progress; the engine's requests are exactly the live ones; each hand-off nobody
    adopted or cancelled holds its slot; every request ends exactly once, with the right first token
    or refusal code, and an adopted slot holds its whole prompt."""

    SLOTS, KV_TOKENS = 2, 12  # slots hold 16 tokens, so 13-16 tokens is kv_capacity and 17+ prompt_too_long

    def __init__(self):
        super().__init__()
        self.config = ShmConfig(prefix=f"hmoe.test-{uuid.uuid4().hex[:8]}.")
        self.model = FakeModel(eos_token_ids=(0,))
        kv = make_kv(self.model.config, self.KV_TOKENS // BLOCK, BLOCK)
        self.pool = HandoffPool.create("states", self.SLOTS, kv.bytes_per_token * SLOT_TOKENS, self.config)
        self.receiver = HandoffPool.attach(self.pool.name, self.config)
        self.engine = PrefillEngine(self.model, kv, self.pool, 4, 3600.0)
        self.prompts: dict[str, list[int]] = {}
        self.live: set[str] = set()  # queued or in progress
        self.handed: dict[str, protocol.Prefilled] = {}  # in a slot, not adopted or cancelled yet
        self.ended: Counter[str] = Counter()

    def end(self, request_id: str) -> None:
        self.ended[request_id] += 1
        assert self.ended[request_id] == 1, f"{request_id} ended twice"

    @rule(prompt=st.lists(st.integers(0, 63), min_size=1, max_size=18), max_tokens=st.integers(1, 3))
    def add(self, prompt, max_tokens):
        request_id = f"r{len(self.prompts)}"
        self.prompts[request_id] = prompt
        self.engine.add(prefill_msg(request_id, prompt, max_tokens=max_tokens))
        self.live.add(request_id)

    @rule()
    def step(self):
        for msg in self.engine.step():
            self.live.remove(msg.request_id)
            self.end(msg.request_id)
            prompt = self.prompts[msg.request_id]
            if isinstance(msg, protocol.RequestError):
                assert msg.code == ("prompt_too_long" if len(prompt) > SLOT_TOKENS else "kv_capacity")
                assert len(prompt) > self.KV_TOKENS
                continue
            assert len(prompt) <= self.KV_TOKENS and msg.first_token == next_token(prompt)
            if msg.slot >= 0:
                self.handed[msg.request_id] = msg

    @precondition(lambda self: self.live or self.handed)
    @rule(data=st.data())
    def cancel(self, data):
        request_id = data.draw(st.sampled_from(sorted(self.live | set(self.handed))))
        assert self.engine.cancel(request_id)
        if self.handed.pop(request_id, None) is None:
            self.live.remove(request_id)
            self.end(request_id)

    @precondition(lambda self: self.handed)
    @rule(data=st.data())
    def adopt(self, data):
        self.adopt_one(data.draw(st.sampled_from(sorted(self.handed))))

    def adopt_one(self, request_id: str) -> None:
        msg = self.handed.pop(request_id)
        kv = make_kv(self.model.config, 8, BLOCK)
        kv.reserve(request_id, msg.prompt_len)
        self.receiver.adopt(msg.slot, kv, request_id, msg.prompt_len)
        assert read_context(kv, kv.slots(request_id, 0, msg.prompt_len)) == self.prompts[request_id]
        assert not self.engine.cancel(request_id)  # adopted: nothing to take back

    @rule()
    def drop_all(self):
        self.engine.drop_all()
        for request_id in self.live:
            self.end(request_id)
        self.live.clear()

    @invariant()
    def kv_is_held_only_by_the_request_in_progress(self):
        kv = self.engine.kv
        held = [b for table in kv.block_tables.values() for b in table]
        assert kv.free_blocks + len(held) == kv.num_blocks and len(set(held)) == len(held)
        running, waiting = self.engine.load()
        assert running <= 1 and running + waiting == len(self.live) and set(self.engine.request_ids()) == self.live
        assert set(kv.block_tables) <= self.live and len(kv.block_tables) <= running

    @invariant()
    def each_hand_off_holds_its_slot(self):
        assert self.pool.free_slots() == self.SLOTS - len(self.handed)

    def teardown(self):
        try:
            for _ in range(10_000):  # adopt what was handed off (else the engine spins on full slots), run the rest
                for request_id in sorted(self.handed):
                    self.adopt_one(request_id)
                if not self.engine.busy:
                    break
                self.step()
            assert not self.engine.busy and not self.live and not self.handed
            assert set(self.ended) == set(self.prompts) and set(self.ended.values()) <= {1}
        finally:
            self.receiver.close()
            self.pool.close()


PrefillMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
TestPrefillStates = PrefillMachine.TestCase
