"""PrefillEngine with a PrefixCache: a prompt reuses the KV of its longest cached prefix and prefills the
rest, hands off its whole KV, and gives the tokens the engine without a cache gives.

First the fake model (what each pass computed is recorded, the KV read back names its tokens), then
tiny random checkpoints of both families in every expert format: greedy tokens and handed-off KV
with the cache on equal those with it off, for prompts sharing none, some and all of their blocks.
"""

from __future__ import annotations

import pytest
import torch
from helpers.fake_model import next_token, prefill_msg
from helpers.prefill_rig import prefilled, run

from hmoe.kernels.formats import ExpertFormat
from hmoe.runtime import protocol
from hmoe.runtime.sampling_params import SamplingParams
from hmoe.workers.engine.kv_handoff import HandoffPool
from hmoe.workers.engine.prefill import PrefillEngine
from hmoe.workers.experts.cpu import CpuExperts
from hmoe.workers.experts.streaming import StreamingExperts
from hmoe.workers.model.causal_lm import load_model
from hmoe.workers.model.kv_cache import KVPool
from hmoe.workers.model.prefix_cache import PrefixCache
from hmoe.workers.weights.checkpoint import Checkpoint

PROMPT = [5, 9, 2, 7, 1, 3, 8, 4, 6, 11]  # two full blocks of 4 and two tokens


def test_a_prompt_with_a_cached_prefix_prefills_only_the_rest_and_hands_off_all_of_it(make_rig, adopter):
    rig = make_rig(chunk_tokens=4, prefix_blocks=8)
    rig.engine.add(prefill_msg("a", PROMPT))
    first = prefilled(rig.engine)
    assert first.cached_tokens == 0 and rig.engine.prefix.cached_tokens == 8  # its two full blocks
    adopter(first)

    longer = [*PROMPT, 13, 14, 15]
    rig.engine.add(prefill_msg("b", longer))
    msg = prefilled(rig.engine)
    assert msg.cached_tokens == 8
    assert rig.model.tokens[-2:] == [[4], [1]]  # positions 8-12 only, in chunks of 4
    assert msg.first_token == next_token(longer)
    assert adopter(msg) == longer  # the hand-off carries the cached blocks too
    assert rig.engine.prefix.cached_tokens == 12
    assert (rig.engine.prefix.query_tokens, rig.engine.prefix.hit_tokens) == (10 + 13, 8)


@pytest.mark.parametrize(
    "prompt, cached",
    [
        ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0),  # shares no block
        ([5, 9, 2, 7, 0, 0, 0, 0, 0], 4),  # shares one
        (PROMPT, 8),  # the same prompt: all blocks but the one holding its last token
        (PROMPT[:8], 4),  # exactly the two cached blocks: the second runs again for the last token's logits
    ],
)
def test_reuse_is_the_longest_cached_block_prefix_short_of_the_last_token(make_rig, adopter, prompt, cached):
    rig = make_rig(chunk_tokens=16, prefix_blocks=8)
    rig.engine.add(prefill_msg("a", PROMPT))
    adopter(prefilled(rig.engine))
    rig.engine.add(prefill_msg("b", prompt))
    msg = prefilled(rig.engine)
    assert msg.cached_tokens == cached and rig.model.tokens[-1] == [len(prompt) - cached]
    assert msg.first_token == next_token(prompt) and adopter(msg) == prompt


def test_a_cancel_of_a_prompt_reading_cached_blocks_keeps_them_cached(make_rig, adopter):
    rig = make_rig(chunk_tokens=4, prefix_blocks=8)
    rig.engine.add(prefill_msg("a", PROMPT))
    adopter(prefilled(rig.engine))
    rig.engine.add(prefill_msg("b", [*PROMPT, 1, 2, 3, 4, 5, 6]))
    rig.engine.step()
    assert rig.kv.free_blocks == rig.kv.num_blocks - 2 - 2  # two cached, two more of its own (16 tokens)
    assert rig.engine.cancel("b")
    assert rig.kv.free_blocks == rig.kv.num_blocks - 2 and rig.engine.prefix.cached_tokens == 8
    rig.engine.add(prefill_msg("c", PROMPT))
    assert prefilled(rig.engine).cached_tokens == 8


def test_a_prompt_the_pool_holds_only_without_the_cache_evicts_it(make_rig, adopter):
    rig = make_rig(num_blocks=4, chunk_tokens=16, prefix_blocks=4)
    rig.engine.add(prefill_msg("a", PROMPT))  # 3 blocks; 2 stay cached
    adopter(prefilled(rig.engine))
    assert rig.kv.free_blocks == 2 and rig.engine.free_tokens() == 16  # cached blocks count as free for a prompt
    big = list(range(1, 15))  # 4 blocks: both cached ones must go
    rig.engine.add(prefill_msg("b", big))
    msg = prefilled(rig.engine)
    assert msg.cached_tokens == 0 and adopter(msg) == big
    rig.engine.add(prefill_msg("c", PROMPT))
    assert prefilled(rig.engine).cached_tokens == 0  # evicted indeed (b's blocks are cached now)


def test_cached_blocks_in_use_are_not_counted_free(make_rig):
    rig = make_rig(chunk_tokens=4, prefix_blocks=8)
    rig.engine.add(prefill_msg("a", PROMPT))
    run(rig.engine)
    rig.engine.add(prefill_msg("b", [*PROMPT, 1]))
    rig.engine.step()  # holds the two cached blocks and one of its own
    assert rig.engine.free_tokens() == (rig.kv.num_blocks - 3) * 4


# -- real tiny checkpoints ------------------------------------------------------------------------------

CHUNK, BLOCK_SIZE = 8, 4
CASES = [
    ("deepseek_v3", "bf16", False),
    ("qwen3_moe", "bf16", False),
    ("deepseek_v3", "fp8", True),  # and the rest of a prompt streamed when long enough
    ("qwen3_moe", "fp8", False),
    ("deepseek_v3", "int4-g32", False),
    ("qwen3_moe", "int4-g128", True),
]


@pytest.fixture
def pair(tiny_models, shm_config, request):
    """(engine without a prefix cache, engine with one, model) over one model and its expert layers."""
    arch, fmt_name, streamed = request.param
    checkpoint = Checkpoint.open(tiny_models(arch, "bf16"))
    cpu = CpuExperts.from_checkpoint(checkpoint, ExpertFormat.parse(fmt_name), num_threads=2)
    model = load_model(checkpoint, "cpu", "fp32", experts=cpu)
    engines = []
    for name, cached in (("off", False), ("on", True)):
        kv = KVPool.from_budget(model.config, 1 << 24, BLOCK_SIZE, model.dtype, model.device)
        handoff = HandoffPool.create(f"test-{name}", 1, kv.bytes_per_token * 64, shm_config)
        streaming = None
        if streamed:
            streaming = StreamingExperts(cpu.layers, model.config.num_experts_per_tok, "cpu", torch.float32, 1)
        prefix = PrefixCache(kv, 32, arch) if cached else None
        engines.append(PrefillEngine(model, kv, handoff, CHUNK, 60.0, streaming, 9, prefix=prefix))
    yield engines[0], engines[1], model
    for engine in engines:
        engine.handoff.close()
    cpu.close()


def prefill(engine: PrefillEngine, request_id: str, prompt: list[int]) -> tuple[protocol.Prefilled, torch.Tensor]:
    """(Prefilled, the prompt's handed-off KV as [entries * L, n, W]); the slot freed again."""
    engine.add(protocol.Prefill(request_id, prompt, SamplingParams(max_tokens=4, temperature=0.0)))
    msg = prefilled(engine)
    receiver = KVPool.from_budget(engine.model.config, 1 << 22, BLOCK_SIZE, engine.model.dtype, engine.model.device)
    receiver.reserve(request_id, len(prompt))
    engine.handoff.adopt(msg.slot, receiver, request_id, len(prompt))
    positions = receiver.slots(request_id, 0, len(prompt))
    return msg, torch.cat([entry[:, positions] for entry in receiver.data.values()])


@pytest.mark.parametrize("pair", CASES, indirect=True, ids=["-".join(map(str, c)) for c in CASES])
def test_greedy_tokens_and_kv_with_the_cache_equal_those_without(pair):
    off, on, model = pair
    vocab = model.config.vocab_size
    conversation = [(7 * i + 3) % vocab for i in range(29)]
    other = [(5 * i + 1) % vocab for i in range(21)]
    cached, tokens = {"off": [], "on": []}, {"off": [], "on": []}
    for name, engine in (("off", off), ("on", on)):
        context = list(conversation)
        for turn in range(3):  # a growing conversation: each prompt extends the last by its greedy token
            msg, kv = prefill(engine, f"{name}-{turn}", context)
            if name == "off":
                reference = kv
            tokens[name].append(msg.first_token)
            cached[name].append(msg.cached_tokens)
            context.append(msg.first_token)
        for i, prompt in enumerate((context, other, conversation)):  # the same again, none shared, a prefix
            msg, kv = prefill(engine, f"{name}-again-{i}", prompt)
            tokens[name].append(msg.first_token)
            cached[name].append(msg.cached_tokens)
            if name == "on" and i == 0:  # the reused KV is what the engine without a cache computes there
                reused = msg.cached_tokens
                # Up to how the chunks grouped the tokens: the order of float32 sums, and where such a difference
                # moves a bf16 expert activation by one rounding step (BF16 kernels read bf16 activations).
                wrong = (kv[:, :reused] - reference[:, :reused]).norm() / reference[:, :reused].norm()
                assert wrong < 1e-3, wrong
    assert tokens["on"] == tokens["off"]
    assert cached["off"] == [0] * 6
    assert cached["on"] == [0, 28, 28, 28, 0, 28]  # 29 then 30, 31 tokens: 7 full blocks; 31 again: 7 (30 // 4)
