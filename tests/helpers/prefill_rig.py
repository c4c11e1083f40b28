"""A PrefillEngine over the fake model, a real KVPool (with or without a PrefixCache) and a real
HandoffPool; the steps that run it until it speaks, and a stand-in for StreamingExperts (fixtures
`make_rig` and `adopter` in tests/workers/engine/conftest.py build them; sizes as in helpers/handoff.py)."""

from __future__ import annotations

from dataclasses import dataclass

from helpers.fake_model import FakeModel

from hmoe.runtime import protocol
from hmoe.workers.engine.kv_handoff import HandoffPool
from hmoe.workers.engine.prefill import PrefillEngine


@dataclass
class Rig:
    engine: PrefillEngine
    model: FakeModel
    pool: HandoffPool

    @property
    def kv(self):
        return self.engine.kv


def run(engine: PrefillEngine, max_steps: int = 100) -> tuple[list, int]:
    """Step until the engine says something; (messages, steps taken)."""
    for steps in range(1, max_steps + 1):
        out = engine.step()
        if out:
            return out, steps
    raise AssertionError(f"no message after {max_steps} steps")


def prefilled(engine: PrefillEngine) -> protocol.Prefilled:
    (msg,), _ = run(engine)
    assert isinstance(msg, protocol.Prefilled), msg
    return msg


class FakeStreaming:
    """Stands in for StreamingExperts: counts the passes it opens and closes (the fake model ignores experts)."""

    def __init__(self):
        self.opened = self.closed = 0

    def open_pass(self):
        self.opened += 1
        return self

    def close(self):
        self.closed += 1
