"""A decode engine fed by a real prefill engine through a real hand-off pool, for in-process engine tests:
`rigs(config)` makes them (closing all at the end); a Rig adds requests, steps, and collects what came out."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from helpers.fake_model import FakeModel, adopt_msg, make_kv, prefill_msg, token_items
from helpers.handoff import BLOCK

from hmoe.runtime import protocol
from hmoe.shm import ShmConfig
from hmoe.workers.engine.decode import DecodeEngine
from hmoe.workers.engine.kv_handoff import HandoffPool
from hmoe.workers.engine.prefill import PrefillEngine


@dataclass
class Rig:
    prefill: PrefillEngine
    pool: HandoffPool
    engine: DecodeEngine
    model: FakeModel
    tokens: dict[str, list[int]] = field(default_factory=dict)  # request_id -> tokens so far (first one included)
    reasons: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # request_id -> code
    steps: list[list[str]] = field(default_factory=list)  # request ids decoded in each step, sorted

    @property
    def kv(self):
        return self.engine.kv

    def hand_off(self, request_id: str, prompt: list[int], **params) -> protocol.Adopt:
        """Prefill one request for real and return the router's Adopt for it."""
        self.prefill.add(prefill_msg(request_id, prompt, **params))
        while not (out := self.prefill.step()):
            pass
        (msg,) = out
        assert isinstance(msg, protocol.Prefilled) and msg.slot >= 0, msg
        self.tokens[request_id] = [msg.first_token]
        return adopt_msg(msg, prompt, **params)

    def add(self, request_id: str, prompt: list[int], **params) -> None:
        self.collect(self.engine.add(self.hand_off(request_id, prompt, **params)))

    def step(self) -> list[str]:
        """One decode step; the request ids that got a token, sorted (the batch's order is the engine's)."""
        self.steps.append([])
        self.collect(self.engine.step())
        self.steps[-1].sort()
        return self.steps[-1]

    def collect(self, messages: list) -> None:
        for msg in messages:
            if isinstance(msg, protocol.RequestError):
                assert msg.request_id not in self.errors
                self.errors[msg.request_id] = msg.code
                continue
            assert isinstance(msg, protocol.Tokens)
            for request_id, token, reason in token_items(msg):
                assert request_id not in self.reasons, f"{request_id} got a token after it finished"
                self.tokens[request_id].append(token)
                self.steps[-1].append(request_id)
                if reason is not None:
                    self.reasons[request_id] = reason

    def run_until_idle(self, max_steps: int = 100) -> None:
        for _ in range(max_steps):
            if not self.engine.busy:
                return
            self.step()
        raise AssertionError("still busy")


@contextlib.contextmanager
def rigs(config: ShmConfig):
    """make(...) -> a Rig whose decode engine copies adopt_slice_bytes of KV per step, its KV pool on `device`."""
    made = []

    def make(
        num_blocks=16,
        max_batch=8,
        micro_batches=2,
        num_slots=8,
        eos=(),
        slot_tokens=16,
        adopt_slice_bytes=64 << 20,
        device="cpu",
    ) -> Rig:
        prefill_model = FakeModel(eos)
        prefill_kv = make_kv(prefill_model.config, 64, BLOCK)
        pool = HandoffPool.create(f"decode-{len(made)}", num_slots, prefill_kv.bytes_per_token * slot_tokens, config)
        model = FakeModel(eos)
        kv = make_kv(model.config, num_blocks, BLOCK, device)
        engine = DecodeEngine(model, kv, max_batch, micro_batches, config, adopt_slice_bytes=adopt_slice_bytes)
        made.append((engine, pool))
        return Rig(PrefillEngine(prefill_model, prefill_kv, pool, 8, 60.0), pool, engine, model)

    try:
        yield make
    finally:
        for engine, pool in made:
            engine.close()
            pool.close()
