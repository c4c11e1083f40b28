"""Engine tests: a private hand-off namespace per test (every kv-handoff segment unlinked afterwards)."""

from __future__ import annotations

import pytest

from hmoe.shm.segment import unlink_segment


@pytest.fixture
def handoff_config(shm_config):
    """shm_config, also sweeping the hand-off segments a test's pools left behind."""
    yield shm_config
    for name in shm_config.handoff_names():
        unlink_segment(name, shm_config)
