"""ForwardBatch.build on a real KVPool: positions, KV slots, last rows and the padded decode group,
against answers worked out by hand (block size 4; a fresh pool hands out blocks 0, 1, 2, ... in order)."""

from __future__ import annotations

import torch
from helpers.fake_model import make_kv, tiny_config

from hmoe.workers.model.batch import ForwardBatch, causal_mask


def pool_with(*reservations: tuple[str, int]):
    kv = make_kv(tiny_config(), 8, 4)
    for seq_id, num_tokens in reservations:
        kv.reserve(seq_id, num_tokens)
    return kv


def ints(t: torch.Tensor) -> list:
    assert t.dtype == torch.int64
    return t.tolist()


def test_a_prompt_chunk_after_cached_tokens():
    kv = pool_with(("x", 4), ("a", 7))  # x: block 0; a: blocks 1, 2
    assert kv.block_tables == {"x": [0], "a": [1, 2]}
    batch = ForwardBatch.build(kv, [("a", [10, 11, 12], 4)])  # positions 4..6 of a
    assert ints(batch.input_ids) == [10, 11, 12]
    assert ints(batch.positions) == [4, 5, 6]
    assert ints(batch.write_slots) == [8, 9, 10]  # block 2 starts at slot 8
    assert ints(batch.last_rows) == [2] and batch.decode is None
    (seq,) = batch.seqs
    assert (seq.q_start, seq.q_len, seq.ctx_len) == (0, 3, 7)
    assert ints(seq.ctx_slots) == [4, 5, 6, 7, 8, 9, 10]


def test_a_mixed_batch_groups_its_one_token_sequences_padded_and_masked():
    kv = pool_with(("a", 6), ("b", 3), ("c", 9))  # a: blocks 0, 1; b: block 2; c: blocks 3, 4, 5
    batch = ForwardBatch.build(kv, [("a", [10, 11], 4), ("b", [20], 2), ("c", [30], 8)])
    assert ints(batch.input_ids) == [10, 11, 20, 30]
    assert ints(batch.positions) == [4, 5, 2, 8]
    assert ints(batch.write_slots) == [4, 5, 10, 20]
    assert ints(batch.last_rows) == [1, 2, 3]  # one per sequence, in the order given
    (prompt,) = batch.seqs  # only the two-token sequence stays on its own
    assert (prompt.q_start, prompt.q_len, prompt.ctx_len) == (0, 2, 6) and ints(prompt.ctx_slots) == list(range(6))
    group = batch.decode
    assert ints(group.rows) == [2, 3]
    assert ints(group.slots) == [[8, 9, 10, 0, 0, 0, 0, 0, 0], list(range(12, 21))]  # padded with slot 0
    assert group.mask.shape == (2, 1, 1, 9)
    assert group.mask.reshape(2, 9).tolist() == [[True] * 3 + [False] * 6, [True] * 9]


def test_a_lone_decode_token_is_not_grouped():
    kv = pool_with(("a", 5))
    batch = ForwardBatch.build(kv, [("a", [7], 4)])
    assert batch.decode is None and ints(batch.positions) == [4] and ints(batch.write_slots) == [4]
    (seq,) = batch.seqs
    assert (seq.q_start, seq.q_len, seq.ctx_len) == (0, 1, 5)


def test_sequences_freed_and_reserved_again_get_the_recycled_blocks():
    kv = pool_with(("a", 8), ("b", 4))  # a: 0, 1; b: 2
    kv.free("a")
    kv.reserve("c", 5)  # the two freed blocks, in the order they were held
    batch = ForwardBatch.build(kv, [("b", [1], 3), ("c", [2, 3, 4, 5, 6], 0)])
    assert ints(batch.write_slots) == [11, 0, 1, 2, 3, 4]
    assert ints(batch.positions) == [3, 0, 1, 2, 3, 4] and ints(batch.last_rows) == [0, 5]


def test_causal_mask_lets_each_query_see_its_past_and_itself():
    mask = causal_mask(q_len=2, ctx_len=4, device=torch.device("cpu"))  # queries at positions 2 and 3
    assert mask.tolist() == [[True, True, True, False], [True, True, True, True]]
    assert causal_mask(q_len=1, ctx_len=4, device=torch.device("cpu")) is None
