"""Engine tests: a private hand-off namespace per test (every kv-handoff segment unlinked afterwards); the
prefill rig over the fake model and the decode side that adopts its hand-offs."""

from __future__ import annotations

import pytest
from helpers.fake_model import FakeModel, make_kv, read_context
from helpers.handoff import BLOCK, SLOT_TOKENS
from helpers.prefill_rig import Rig

from hmoe.runtime import protocol
from hmoe.shm.segment import unlink_segment
from hmoe.workers.engine.kv_handoff import HandoffPool
from hmoe.workers.engine.prefill import PrefillEngine
from hmoe.workers.model.prefix_cache import PrefixCache


@pytest.fixture
def handoff_config(shm_config):
    """shm_config, also sweeping the hand-off segments a test's pools left behind."""
    yield shm_config
    for name in shm_config.handoff_names():
        unlink_segment(name, shm_config)


@pytest.fixture
def make_rig(handoff_config):
    """make(...) -> Rig: a PrefillEngine over the fake model; prefix_blocks > 0 gives it a PrefixCache."""
    pools = []

    def make(num_slots=2, num_blocks=16, chunk_tokens=4, timeout_s=60.0, eos=(), prefix_blocks=0, **streaming) -> Rig:
        model = FakeModel(eos)
        kv = make_kv(model.config, num_blocks, BLOCK)
        pool = HandoffPool.create(f"prefill-{len(pools)}", num_slots, kv.bytes_per_token * SLOT_TOKENS, handoff_config)
        pools.append(pool)
        prefix = PrefixCache(kv, prefix_blocks, "fake") if prefix_blocks else None
        return Rig(PrefillEngine(model, kv, pool, chunk_tokens, timeout_s, prefix=prefix, **streaming), model, pool)

    yield make
    for pool in pools:
        pool.close()


@pytest.fixture
def adopter(handoff_config):
    """The decode side: adopt a Prefilled's slot into a fresh pool and return the prompt read back from it."""
    attached = []

    def adopt(msg: protocol.Prefilled) -> list[int]:
        pool = HandoffPool.attach(msg.segment, handoff_config)
        attached.append(pool)
        model = FakeModel()
        kv = make_kv(model.config, 8, BLOCK)
        kv.reserve(msg.request_id, msg.prompt_len)
        pool.adopt(msg.slot, kv, msg.request_id, msg.prompt_len)
        return read_context(kv, kv.slots(msg.request_id, 0, msg.prompt_len))

    yield adopt
    for pool in attached:
        pool.close()


@pytest.fixture
def pools(handoff_config):
    """make(worker_id, num_slots) -> a created pool; attach(name) -> an attached one; all closed afterwards."""
    opened = []

    class Pools:
        config = handoff_config

        def make(self, worker_id: str = "w", num_slots: int = 2) -> HandoffPool:
            pool = HandoffPool.create(worker_id, num_slots, SLOT_TOKENS * 256, handoff_config)
            opened.append(pool)
            return pool

        def attach(self, name: str) -> HandoffPool:
            pool = HandoffPool.attach(name, handoff_config)
            opened.append(pool)
            return pool

    yield Pools()
    for pool in reversed(opened):
        pool.close()
