"""ColocatedEngine: one process's prefill and decode engines over one model and one KV pool. A prompt
prefilled there is adopted there (through its own hand-off slot) and decodes what the fake model says;
while a long prompt prefills, its chunks (one pass each) alternate with decode steps, as in the peers'
chunked prefill: one token of each running request between two chunks, none inside one."""

from __future__ import annotations

from helpers.fake_model import FakeModel, adopt_msg, continuation, make_kv, prefill_msg
from helpers.handoff import BLOCK

from hmoe.runtime import protocol
from hmoe.workers.engine.colocated import ColocatedEngine
from hmoe.workers.engine.decode import DecodeEngine
from hmoe.workers.engine.kv_handoff import HandoffPool
from hmoe.workers.engine.prefill import PrefillEngine


def make(handoff_config, num_blocks: int = 64) -> ColocatedEngine:
    model = FakeModel()
    kv = make_kv(model.config, num_blocks, BLOCK)
    pool = HandoffPool.create("colocated", 2, kv.bytes_per_token * 64, handoff_config)
    prefill = PrefillEngine(model, kv, pool, 4, 60.0)
    return ColocatedEngine(prefill, DecodeEngine(model, kv, 4, 1, handoff_config))


def prefill_then_adopt(engine: ColocatedEngine, request_id: str, prompt: list[int], max_tokens: int) -> list:
    """Run until prefilled, send the Adopt the router would; the messages seen on the way."""
    engine.add(prefill_msg(request_id, prompt, max_tokens=max_tokens))
    seen = []
    while True:
        out = engine.step()
        seen += out
        done = [m for m in out if isinstance(m, protocol.Prefilled) and m.request_id == request_id]
        if done:
            engine.add(adopt_msg(done[0], prompt, max_tokens=max_tokens))
            return seen


def test_a_request_prefills_and_decodes_in_one_process_while_a_long_prompt_prefills(handoff_config):
    engine = make(handoff_config)
    try:
        short = [5, 9, 2]
        prefill_then_adopt(engine, "a", short, max_tokens=40)
        engine.step()  # adopted and joined
        long = [(3 * i) % 60 + 1 for i in range(24)]  # six passes of 4 tokens, two layers each
        engine.add(prefill_msg("long", long, max_tokens=4))
        tokens, steps, prefilled = [], 0, False
        while not prefilled:
            mid_pass = engine.prefill.mid_pass
            out = engine.step()
            steps += 1
            items = [i for m in out if isinstance(m, protocol.Tokens) for i in m.items if i.request_id == "a"]
            assert len(items) == (0 if mid_pass else 1)  # a token between two chunks, none inside one
            tokens += [i.token for i in items]
            prefilled = any(isinstance(m, protocol.Prefilled) for m in out)
        assert steps >= 6 * 2 and len(tokens) == 6  # six chunks of two layers each: a token before each
        got = engine.decode.running["a"].output
        assert got == continuation(short, len(got))  # what the fake model decodes after that context
        assert tokens == got[-len(tokens) :]
        engine.drop_all()
        assert not engine.busy and engine.prefill.kv.free_blocks == engine.prefill.kv.num_blocks
    finally:
        engine.close()
        engine.prefill.handoff.close()
