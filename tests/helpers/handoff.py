"""Hand-off slots for engine tests: a slot filled with a prompt's KV as the fake model wrote it."""

from __future__ import annotations

from helpers.fake_model import FakeModel, make_kv

from hmoe.workers.engine.kv_handoff import HandoffPool
from hmoe.workers.model.batch import ForwardBatch
from hmoe.workers.model.kv_cache import KVPool

BLOCK = 4
SLOT_TOKENS = 16  # 16 tokens * 256 bytes of the fake model's KV = one 4 KiB page
FOREVER_S = 3600.0


def prefilled_kv(request_id: str, prompt: list[int]) -> KVPool:
    """A KV pool holding prompt's KV for request_id, written by the fake model's forward."""
    model = FakeModel()
    kv = make_kv(model.config, 16, BLOCK)
    kv.reserve(request_id, len(prompt))
    model.forward(ForwardBatch.build(kv, [(request_id, prompt, 0)]), kv)
    return kv


def fill(pool: HandoffPool, request_id: str, prompt: list[int], timeout_s: float = FOREVER_S) -> tuple[int, int]:
    """Allocate a slot, write prompt's KV into it; (slot, generation)."""
    slot = pool.allocate(timeout_s)
    assert slot is not None
    pool.write(slot, prefilled_kv(request_id, prompt), request_id, len(prompt))
    return slot, pool.generation(slot)
