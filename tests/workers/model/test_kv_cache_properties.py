"""KVPool under any sequence of reserve and free: blocks are conserved, never held twice, a sequence
holds exactly the blocks its largest reservation needs, and a refused reservation changes nothing."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from helpers.fake_model import make_kv, tiny_config
from hypothesis import given, settings

from hmoe.workers.model.kv_cache import KVCapacityError

NUM_BLOCKS, BLOCK = 6, 4
SEQS = ["a", "b", "c", "d"]

ops = st.lists(
    st.one_of(
        # From 1: the engines never reserve nothing (a prompt is never empty), and reserve(seq, 0) of a new
        # sequence leaves it an empty table that a later refusal of the same sequence drops.
        st.tuples(st.just("reserve"), st.sampled_from(SEQS), st.integers(1, NUM_BLOCKS * BLOCK + 3)),
        st.tuples(st.just("free"), st.sampled_from(SEQS), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=100, deadline=None)
@given(ops)
def test_reserve_and_free_conserve_blocks_and_never_alias_them(operations):
    kv = make_kv(tiny_config(), NUM_BLOCKS, BLOCK)
    reserved: dict[str, int] = {}  # seq -> most tokens it asked for since its last free
    for op, seq, num_tokens in operations:
        if op == "free":
            kv.free(seq)
            reserved.pop(seq, None)
        else:
            before = {s: list(t) for s, t in kv.block_tables.items()}
            free_before = kv.free_blocks
            grown = max(reserved.get(seq, 0), num_tokens)
            try:
                kv.reserve(seq, num_tokens)
            except KVCapacityError as exc:
                assert exc.code == "kv_capacity"
                assert kv.blocks_for(grown) - kv.blocks_for(reserved.get(seq, 0)) > free_before
                assert kv.block_tables == before and kv.free_blocks == free_before  # refused: nothing changed
            else:
                reserved[seq] = grown
        held = [b for table in kv.block_tables.values() for b in table]
        assert kv.free_blocks + len(held) == NUM_BLOCKS
        assert len(set(held)) == len(held) and set(held) <= set(range(NUM_BLOCKS))
        for s, table in kv.block_tables.items():
            assert len(table) == kv.blocks_for(reserved[s])
        slots = [x for s in kv.block_tables for x in kv.slots(s, 0, reserved[s]).tolist()]
        assert len(set(slots)) == len(slots)  # no token slot shared by two positions
    for seq in SEQS:
        kv.free(seq)
    assert kv.free_blocks == NUM_BLOCKS and not kv.block_tables


def test_freeing_an_unknown_sequence_is_a_no_op():
    kv = make_kv(tiny_config(), NUM_BLOCKS, BLOCK)
    kv.reserve("a", 5)
    kv.free("nobody")
    assert kv.free_blocks == NUM_BLOCKS - 2 and kv.block_tables.keys() == {"a"}


@pytest.mark.parametrize("num_tokens, blocks", [(0, 0), (1, 1), (4, 1), (5, 2), (24, 6)])
def test_blocks_for_rounds_up(num_tokens, blocks):
    assert make_kv(tiny_config(), NUM_BLOCKS, BLOCK).blocks_for(num_tokens) == blocks
