"""PrefixCache over a real KVPool: under any mix of prompts that share prefixes, cancels, finishes and
evictions, every block's holders are counted exactly, a cached block is never written while read,
reused KV is the KV of the same tokens at the same positions, and the cache keeps to its budget.

"Prefilling" here writes each token's id into its KV slot, so what a prompt reuses can be read back."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from helpers.fake_model import make_kv, tiny_config
from hypothesis import given, settings

from hmoe.workers.model.kv_cache import KVCapacityError, KVPool
from hmoe.workers.model.prefix_cache import PrefixCache

NUM_BLOCKS, BLOCK, BUDGET = 12, 4, 6


def write(kv: KVPool, seq: str, token_ids: list[int], start: int) -> None:
    """The prefill of positions [start, len): each token's id into its slot. Never into a shared block."""
    table = kv.block_tables[seq]
    for position in range(start, len(token_ids)):
        assert kv.holders(table[position // kv.block_size]) == 1, "wrote a block someone else holds"
    kv.data["k"][0, kv.slots(seq, start, len(token_ids)), 0] = torch_ids(token_ids[start:])


def read(kv: KVPool, seq: str, end: int) -> list[int]:
    return [int(x) for x in kv.data["k"][0, kv.slots(seq, 0, end), 0].tolist()]


def torch_ids(ids: list[int]):
    import torch

    return torch.tensor(ids, dtype=torch.float32)


def start(cache: PrefixCache, seq: str, token_ids: list[int]) -> int:
    """What PrefillEngine does before a prompt's first pass; the cached token count."""
    shared = cache.match(token_ids)
    cache.kv.share(seq, shared)
    cache.make_room(cache.kv.blocks_for(len(token_ids)) - len(shared))
    try:
        cache.kv.reserve(seq, len(token_ids))
    except KVCapacityError:
        cache.kv.free(seq)
        raise
    cache.count(len(token_ids), len(shared) * cache.kv.block_size)
    return len(shared) * cache.kv.block_size


def check(kv: KVPool, cache: PrefixCache, live: dict[str, list[int]]) -> None:
    holders = [0] * kv.num_blocks
    for table in kv.block_tables.values():
        for block in table:
            holders[block] += 1
    for block in cache.blocks.values():
        holders[block] += 1
    assert [kv.holders(b) for b in range(kv.num_blocks)] == holders
    assert sorted(kv._free) == [b for b in range(kv.num_blocks) if holders[b] == 0]  # each free block once
    assert len(cache.blocks) <= cache.budget_blocks
    assert len(set(cache.blocks.values())) == len(cache.blocks)  # no block under two keys
    for seq, token_ids in live.items():  # a running prompt reads its own tokens, cached part included
        assert read(kv, seq, len(token_ids)) == token_ids


prompts = st.lists(st.integers(0, 2), min_size=1, max_size=22)  # a 3-letter alphabet: prefixes collide
ops = st.lists(
    st.one_of(
        st.tuples(st.just("start"), st.sampled_from("abc"), prompts),
        st.tuples(st.just("finish"), st.sampled_from("abc"), st.just([])),
        st.tuples(st.just("cancel"), st.sampled_from("abc"), st.just([])),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_holders_are_exact_shared_blocks_are_never_written_and_reuse_reads_the_same_tokens(operations):
    kv = make_kv(tiny_config(), NUM_BLOCKS, BLOCK)
    cache = PrefixCache(kv, BUDGET, "model")
    live: dict[str, list[int]] = {}
    for op, seq, token_ids in operations:
        if op == "start" and seq not in live:
            try:
                cached = start(cache, seq, token_ids)
            except KVCapacityError:
                assert seq not in kv.block_tables
                continue
            assert cached <= len(token_ids) - 1 and cached % BLOCK == 0
            assert read(kv, seq, cached) == token_ids[:cached]  # the reused KV is of these very tokens
            write(kv, seq, token_ids, cached)
            live[seq] = token_ids
        elif op == "finish" and seq in live:
            cache.insert(seq, live.pop(seq))
            kv.free(seq)
        elif op == "cancel" and seq in live:
            del live[seq]
            kv.free(seq)
        check(kv, cache, live)
    for seq in list(live):
        kv.free(seq)
    cache.clear()
    assert kv.free_blocks == NUM_BLOCKS


def test_a_repeated_prompt_reuses_all_but_its_last_token():
    kv = make_kv(tiny_config(), NUM_BLOCKS, BLOCK)
    cache = PrefixCache(kv, BUDGET, "model")
    prompt = list(range(8))  # two full blocks
    assert start(cache, "a", prompt) == 0
    cache.insert("a", prompt)
    kv.free("a")
    assert cache.cached_tokens == 8
    assert start(cache, "b", prompt) == 4  # the last token's block runs again: its logits are the answer
    assert start(cache, "c", [*prompt, 9]) == 8
    assert (cache.query_tokens, cache.hit_tokens) == (8 + 8 + 9, 4 + 8)


def test_other_models_or_block_contents_never_match():
    kv = make_kv(tiny_config(), NUM_BLOCKS, BLOCK)
    cache = PrefixCache(kv, BUDGET, "model-a")
    start(cache, "a", list(range(9)))
    cache.insert("a", list(range(9)))
    kv.free("a")
    assert cache.match([0, 1, 2, 3, 4, 5, 6, 99, 8]) == cache.match(list(range(4)) + [0] * 5)  # one block
    assert len(cache.match([0, 1, 2, 3, 4, 5, 6, 99, 8])) == 1
    assert cache.match([1, 0, 2, 3, 4, 5, 6, 7, 8]) == []
    assert PrefixCache(kv, BUDGET, "model-b").keys(range(8), 2) != cache.keys(range(8), 2)


def test_eviction_trims_the_least_recent_prefix_from_its_end_and_spares_blocks_in_use():
    kv = make_kv(tiny_config(), NUM_BLOCKS, BLOCK)
    cache = PrefixCache(kv, 4, "model")
    old, new = [1] * 12, [2] * 12  # three full blocks each (the cache takes 4 blocks)
    for seq, prompt in (("old", old), ("new", new)):
        start(cache, seq, prompt)
        write(kv, seq, prompt, 0)
        cache.insert(seq, prompt)
        kv.free(seq)
    # "new" needed three: the two last blocks of "old" went, its first stays reachable
    assert cache.cached_tokens == 16
    assert len(cache.match(old + [0])) == 1 and len(cache.match(new + [0])) == 3
    in_use = start(cache, "reader", new + [0])  # holds the three blocks of "new"
    assert in_use == 12
    cache.make_room(NUM_BLOCKS)  # wants everything: only the block of "old" can go
    assert cache.cached_tokens == 12 and kv.free_blocks == NUM_BLOCKS - 4
    kv.free("reader")
    cache.make_room(NUM_BLOCKS)
    assert cache.cached_tokens == 0 and kv.free_blocks == NUM_BLOCKS


@pytest.mark.parametrize("budget", [0, 1, 3])
def test_insert_keeps_to_the_budget(budget):
    kv = make_kv(tiny_config(), NUM_BLOCKS, BLOCK)
    cache = PrefixCache(kv, budget, "model")
    prompt = list(range(20))
    start(cache, "a", prompt)
    cache.insert("a", prompt)
    kv.free("a")
    assert cache.cached_tokens == budget * BLOCK
    assert kv.free_blocks == NUM_BLOCKS - budget
    assert len(cache.match(prompt)) == budget  # what it kept is the prompt's first blocks
