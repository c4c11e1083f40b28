"""PrefillEngine: layer-major passes (streamed experts on the CPU) give the chunk-major CPU-kernel path's
greedy tokens; one step() is one layer; a cancel mid-pass leaves the engine ready for the next prompt.

Tiny random checkpoints of both families; the streamed passes run StreamingExperts over the very
layers the CPU kernels read, with the ring's copy a plain copy.
"""

from __future__ import annotations

import pytest
import torch

from hmoe.kernels.formats import ExpertFormat
from hmoe.runtime import protocol
from hmoe.runtime.sampling_params import SamplingParams
from hmoe.workers.engine.kv_handoff import HandoffPool
from hmoe.workers.engine.prefill import PrefillEngine
from hmoe.workers.experts.cpu import CpuExperts
from hmoe.workers.experts.streaming import StreamingExperts
from hmoe.workers.model.causal_lm import load_model
from hmoe.workers.model.kv_cache import KVPool
from hmoe.workers.weights.checkpoint import Checkpoint

CHUNK = 8
PROMPT = [(7 * i + 3) % 97 for i in range(29)]  # four chunks of 8 (the last one 5)


@pytest.fixture
def engines(tiny_models, shm_config, request):
    """(chunk-major CPU engine, streaming engine, model) over one model and one set of expert layers."""
    arch, fmt_name, max_pass_tokens = request.param
    checkpoint = Checkpoint.open(tiny_models(arch, "bf16"))
    cpu = CpuExperts.from_checkpoint(checkpoint, ExpertFormat.parse(fmt_name), num_threads=2)
    model = load_model(checkpoint, "cpu", "fp32", experts=cpu)
    kv = KVPool.from_budget(model.config, 1 << 24, 16, model.dtype, model.device)
    handoff = HandoffPool.create("test", 2, kv.bytes_per_token * 64, shm_config)
    streaming = StreamingExperts(cpu.layers, model.config.num_experts_per_tok, "cpu", torch.float32, ring_layers=1)
    plain = PrefillEngine(model, kv, handoff, CHUNK, 60.0)
    streamed = PrefillEngine(
        model, kv, handoff, CHUNK, 60.0, streaming, stream_min_tokens=9, max_pass_tokens=max_pass_tokens
    )
    yield plain, streamed, model
    handoff.close()
    cpu.close()


def first_token(engine: PrefillEngine, request_id: str, prompt: list[int]) -> tuple[int, int]:
    """(first token, steps taken) of one prompt, its hand-off slot given back at once."""
    engine.add(protocol.Prefill(request_id, prompt, SamplingParams(max_tokens=4, temperature=0.0)))
    steps = 0
    while True:
        steps += 1
        out = engine.step()
        if out:
            (msg,) = out
            assert isinstance(msg, protocol.Prefilled), msg
            engine.handoff.release(msg.slot)
            return msg.first_token, steps


CASES = [
    ("deepseek_v3", "bf16", 1 << 20),
    ("qwen3_moe", "bf16", 1 << 20),
    ("deepseek_v3", "fp8", 24),  # a streamed pass of 24 tokens, then a CPU one of 5-7 (< stream_min_tokens)
    ("qwen3_moe", "fp8", 1 << 20),
    ("deepseek_v3", "int4-g32", 1 << 20),
    ("qwen3_moe", "int4-g128", 1 << 20),
]


@pytest.mark.parametrize("engines", CASES, indirect=True, ids=["-".join(map(str, c)) for c in CASES])
def test_streamed_layer_major_passes_give_the_cpu_tokens(engines):
    plain, streamed, model = engines
    prompt = [t % model.config.vocab_size for t in PROMPT]
    tokens = {"plain": [], "streamed": []}
    for name, engine in (("plain", plain), ("streamed", streamed)):
        context = list(prompt)
        for i in range(3):  # greedy: each prompt extended by the token the last one gave
            token, _ = first_token(engine, f"{name}-{i}", context)
            tokens[name].append(token)
            context.append(token)
    assert tokens["streamed"] == tokens["plain"]
    assert plain.passes == {"cpu": 3 * 4, "stream": 0}  # 29, 30, 31 tokens: four chunks each
    assert streamed.passes == {"cpu": 3 if streamed.max_pass_tokens == 24 else 0, "stream": 3}


@pytest.mark.parametrize("engines", [("qwen3_moe", "bf16", 1 << 20)], indirect=True)
def test_a_step_is_a_layer_and_a_cancel_mid_pass_frees_the_prompt(engines):
    _, streamed, model = engines
    prompt = [t % model.config.vocab_size for t in PROMPT]
    _, steps = first_token(streamed, "whole", prompt)
    assert steps == model.config.num_layers + 1  # one step per layer, then the one that samples
    free_blocks = streamed.kv.free_blocks
    streamed.add(protocol.Prefill("cancelled", prompt, SamplingParams(max_tokens=4, temperature=0.0)))
    streamed.step()
    streamed.step()
    assert streamed.kv.free_blocks < free_blocks and streamed.busy
    assert streamed.cancel("cancelled")
    assert streamed.kv.free_blocks == free_blocks and not streamed.busy
    assert first_token(streamed, "after", prompt)[0] == first_token(streamed, "again", prompt)[0]
