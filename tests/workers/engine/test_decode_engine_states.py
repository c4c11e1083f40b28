"""A hypothesis state machine over DecodeEngine + KVPool (+ the real PrefillEngine and HandoffPool
that feed it): add, cancel, step and drop_all in any order.

Some requests come from a prefill worker that dies before their adoption (they end handoff_lost). The
machine runs twice: with whole prompts adopted in one step, and with a slice of a few token rows per step
(adoptions spanning many steps, cancelled and dropped midway).
Invariants after every rule: KV is conserved (free + held blocks == all blocks) and no block is held
by two sequences; only running and adopting requests hold KV, each exactly what it reserved; the engine's
requests are exactly the live ones; each waiting or adopting request (of a live prefill worker) holds its slot; every
token is the fake model's greedy choice after the request's own context (read back from the KV, so an
aliased or torn block shows up as a wrong token). At the end, every added request ended exactly once.
"""

from __future__ import annotations

import uuid
from collections import Counter

import hypothesis.strategies as st
from helpers.fake_model import FakeModel, adopt_msg, make_kv, next_token, prefill_msg, token_items
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hmoe.runtime import protocol
from hmoe.shm import ShmConfig
from hmoe.shm.segment import unlink_segment
from hmoe.workers.engine.decode import DecodeEngine
from hmoe.workers.engine.kv_handoff import HandoffPool
from hmoe.workers.engine.prefill import PrefillEngine

EOS = (0, 1)
BLOCK = 4
NUM_BLOCKS = 12  # 48 tokens of decode KV: a prompt of up to 12 plus up to 40 new tokens may not fit
NUM_SLOTS = 6


class DecodeMachine(RuleBasedStateMachine):
    adopt_slice_bytes = 64 << 20

    def __init__(self):
        super().__init__()
        self.config = ShmConfig(prefix=f"hmoe.test-{uuid.uuid4().hex[:8]}.")
        prefill_model = FakeModel(EOS)
        prefill_kv = make_kv(prefill_model.config, 8, BLOCK)
        self.pool = HandoffPool.create("states", NUM_SLOTS, prefill_kv.bytes_per_token * 16, self.config)
        self.prefill = PrefillEngine(prefill_model, prefill_kv, self.pool, 8, 3600.0)
        self.model = FakeModel(EOS)
        self.kv = make_kv(self.model.config, NUM_BLOCKS, BLOCK)
        self.engine = DecodeEngine(self.model, self.kv, 3, 2, self.config, adopt_slice_bytes=self.adopt_slice_bytes)
        self.count = 0
        self.context: dict[str, list[int]] = {}  # live request -> prompt + tokens so far
        self.need: dict[str, int] = {}  # live request -> prompt + max_tokens
        self.max_tokens: dict[str, int] = {}
        self.generated: dict[str, int] = {}
        self.added: set[str] = set()
        self.lost: set[str] = set()  # requests whose hand-off segment vanished before adoption
        self.ended: Counter[str] = Counter()

    def end(self, request_id: str) -> None:
        assert request_id in self.context, f"{request_id} ended but is not live"
        self.ended[request_id] += 1
        assert self.ended[request_id] == 1, f"{request_id} ended twice"
        for table in (self.context, self.need, self.max_tokens, self.generated):
            del table[request_id]

    @precondition(lambda self: self.pool.free_slots() > 0)
    @rule(prompt=st.lists(st.integers(0, 63), min_size=1, max_size=12), max_tokens=st.integers(1, 40))
    def add(self, prompt, max_tokens, lose_slot=False):
        self.count += 1
        request_id = f"r{self.count}"
        prefill = self.prefill
        if lose_slot:  # from a prefill worker that dies before the decode side attaches its segment
            model = FakeModel(EOS)
            kv = make_kv(model.config, 8, BLOCK)
            pool = HandoffPool.create(f"lost-{self.count}", 1, kv.bytes_per_token * 16, self.config)
            prefill = PrefillEngine(model, kv, pool, 8, 3600.0)
        prefill.add(prefill_msg(request_id, prompt, max_tokens=max_tokens))
        while not (out := prefill.step()):
            pass
        if lose_slot:
            pool.close()
        (msg,) = out
        assert isinstance(msg, protocol.Prefilled) and msg.first_token == next_token(prompt)
        if msg.slot < 0:  # the first token ended it on the prefill side
            assert max_tokens == 1 or msg.first_token in EOS
            return
        self.added.add(request_id)
        self.context[request_id] = [*prompt, msg.first_token]
        self.need[request_id] = len(prompt) + max_tokens
        self.max_tokens[request_id] = max_tokens
        self.generated[request_id] = 1
        if lose_slot:
            self.lost.add(request_id)
        refused = self.engine.add(adopt_msg(msg, prompt, max_tokens=max_tokens))
        if refused:
            (error,) = refused
            assert error.code == "kv_capacity" and self.need[request_id] > NUM_BLOCKS * BLOCK
            self.end(request_id)

    @rule(prompt=st.lists(st.integers(0, 63), min_size=1, max_size=12), max_tokens=st.integers(1, 12))
    def add_from_a_dead_prefill_worker(self, prompt, max_tokens):
        self.add(prompt, max_tokens, lose_slot=True)

    @precondition(lambda self: self.context)
    @rule(data=st.data())
    def cancel(self, data):
        request_id = data.draw(st.sampled_from(sorted(self.context)))
        assert self.engine.cancel(request_id)
        self.end(request_id)

    @rule()
    def cancel_unknown(self):
        assert not self.engine.cancel("nobody")

    @rule()
    def step(self):
        for msg in self.engine.step():
            if isinstance(msg, protocol.RequestError):
                assert msg.request_id in self.lost and msg.code == "handoff_lost", msg
                self.end(msg.request_id)
                continue
            for request_id, token, reason in token_items(msg):
                context = self.context[request_id]
                assert token == next_token(context), (request_id, context, token)
                context.append(token)
                self.generated[request_id] += 1
                done = self.generated[request_id] == self.max_tokens[request_id]
                expected = "stop" if token in EOS else "length" if done else None
                assert reason == expected, (request_id, token, reason)
                if reason is not None:
                    self.end(request_id)

    @rule()
    def drop_all(self):
        self.engine.drop_all()
        for request_id in list(self.context):
            self.end(request_id)

    @invariant()
    def kv_is_conserved_and_never_aliased(self):
        held = [block for table in self.kv.block_tables.values() for block in table]
        assert self.kv.free_blocks + len(held) == self.kv.num_blocks
        assert len(set(held)) == len(held) and all(0 <= b < self.kv.num_blocks for b in held)

    @invariant()
    def only_running_and_adopting_requests_hold_kv_each_what_it_reserved(self):
        running, waiting = self.engine.load()
        assert running + waiting == len(self.context)
        assert set(self.engine.request_ids()) == set(self.context)
        assert len(self.kv.block_tables) == running + len(self.engine.adopting)
        for request_id, table in self.kv.block_tables.items():
            assert len(table) == self.kv.blocks_for(self.need[request_id])

    @invariant()
    def each_waiting_request_holds_its_hand_off_slot(self):
        lost_waiting = len(self.lost & set(self.context))  # a lost request never runs: it waits, then errs
        assert self.pool.free_slots() == NUM_SLOTS - (self.engine.load()[1] - lost_waiting)

    def teardown(self):
        try:
            for _ in range(10_000):
                if not self.engine.busy:
                    break
                self.step()
            assert not self.engine.busy and not self.context
            assert set(self.ended) == self.added and set(self.ended.values()) <= {1}
            assert self.kv.free_blocks == NUM_BLOCKS and self.pool.free_slots() == NUM_SLOTS
        finally:
            self.engine.close()
            self.pool.close()
            for name in self.config.handoff_names():
                unlink_segment(name, self.config)


class SlicedDecodeMachine(DecodeMachine):
    adopt_slice_bytes = 200  # 3 token rows of 64 bytes: a 12-token prompt's 3 KiB of KV takes 16 steps


DecodeMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
SlicedDecodeMachine.TestCase.settings = DecodeMachine.TestCase.settings
TestDecodeEngineStates = DecodeMachine.TestCase
TestSlicedDecodeEngineStates = SlicedDecodeMachine.TestCase
