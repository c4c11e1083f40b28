"""Engine tests: a private hand-off namespace per test (every kv-handoff segment unlinked afterwards)."""

from __future__ import annotations

import pytest
from helpers.handoff import SLOT_TOKENS

from hmoe.shm.segment import unlink_segment
from hmoe.workers.engine.kv_handoff import HandoffPool


@pytest.fixture
def handoff_config(shm_config):
    """shm_config, also sweeping the hand-off segments a test's pools left behind."""
    yield shm_config
    for name in shm_config.handoff_names():
        unlink_segment(name, shm_config)


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
