"""ForwardBatch.build on a real KVPool: positions, KV slots, last rows and the padded decode group,
against answers worked out by hand (block size 4; a fresh pool hands out blocks 0, 1, 2, ... in order)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers.fake_model import make_kv, tiny_config

from hmoe.workers.model.batch import ForwardBatch, causal_attention
from hmoe.workers.model.deepseek_v3 import MLAttention


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


def reference_attention(q, k, v, scale):
    """Plain float64 softmax(q k^T) v with query i of T at position S - T + i, kv heads repeated."""
    t, s = q.shape[1], k.shape[1]
    k, v = (x.repeat_interleave(q.shape[0] // k.shape[0], 0).double() for x in (k, v))
    scores = q.double() @ k.transpose(1, 2) * scale  # [h, T, S]
    visible = torch.arange(s)[None, :] <= torch.arange(t)[:, None] + (s - t)
    return (scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v).to(q.dtype)


@pytest.mark.parametrize("q_len, ctx_len", [(1, 7), (7, 7), (3, 7), (6, 7)])
def test_causal_attention_lets_each_query_see_its_past_and_itself(q_len, ctx_len):
    g = torch.Generator().manual_seed(q_len)
    q = torch.randn(4, q_len, 8, generator=g)  # 4 query heads over 2 kv heads
    k, v = torch.randn(2, ctx_len, 8, generator=g), torch.randn(2, ctx_len, 6, generator=g)
    out = causal_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out, reference_attention(q, k, v, 0.3), rtol=1e-5, atol=1e-5)


def test_causal_attention_takes_a_fused_kernel_not_the_math_one():
    """The math kernel scores in float32 [h, T, S] on a GPU; SDPA picks it for 3-D inputs."""
    q, k, v = torch.randn(4, 16, 8), torch.randn(2, 48, 8), torch.randn(2, 48, 8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        causal_attention(q, k, v)  # a later chunk: lower-right causal
        causal_attention(q, k[:, :16], v[:, :16])  # the first chunk: is_causal
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_attention_math" not in ops, sorted(ops)


@pytest.mark.gpu
@pytest.mark.parametrize("q_len, ctx_len", [(256, 256), (256, 1024)])  # a first chunk, a later one
def test_causal_attention_on_a_gpu_is_fused_and_right(q_len, ctx_len):
    """bf16, Qwen3-30B-A3B's heads (32 over 4, d 128): the reference's numbers, without the math kernel."""
    g = torch.Generator().manual_seed(ctx_len)
    q = torch.randn(32, q_len, 128, generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(4, ctx_len, 128, generator=g, dtype=torch.bfloat16) for _ in range(2))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = causal_attention(q.cuda(), k.cuda(), v.cuda(), scale=128**-0.5).cpu()
    assert "aten::_scaled_dot_product_attention_math" not in {e.key for e in prof.key_averages()}
    torch.testing.assert_close(out, reference_attention(q, k, v, 128**-0.5), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_mla_plain_prefill_on_a_gpu_takes_flash_and_is_right():
    """bf16, DeepSeek-V3's attention widths (128 heads, latent 512, keys 192, values 128), a later 512-token
    chunk of a 2048-token context: MLAttention._plain pads the values to the keys' width, so SDPA takes its
    flash kernel (not the memory-efficient one, at 55% of its speed there, nor the math one)."""
    c = SimpleNamespace(
        num_heads=128, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, kv_lora_rank=512,
        q_lora_rank=None, hidden_size=256, attn_softmax_scale=192**-0.5,
    )  # fmt: skip
    g = torch.Generator().manual_seed(7)
    weights = {}

    def load(name, shape):
        weights[name] = torch.randn(shape, generator=g, dtype=torch.bfloat16) / shape[-1] ** 0.5
        return weights[name].cuda()

    attn = MLAttention(c, 0, load)
    q = torch.randn(512, 128, 192, generator=g, dtype=torch.bfloat16)
    ctx = torch.randn(2048, 512 + 64, generator=g, dtype=torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = attn._plain(q[..., :128].cuda(), q[..., 128:].cuda(), ctx.cuda()).cpu()  # [T, h, dv]
    assert "aten::_scaled_dot_product_flash_attention" in {e.key for e in prof.key_averages()}
    kv_b = weights["kv_b_proj.weight"].double().view(128, 256, 512)
    latent, k_rope = ctx.double().split([512, 64], dim=-1)
    k = torch.cat([torch.einsum("sr,hdr->hsd", latent, kv_b[:, :128]), k_rope.expand(128, -1, -1)], dim=-1)
    v = torch.einsum("sr,hvr->hsv", latent, kv_b[:, 128:])
    want = reference_attention(q.double().transpose(0, 1), k, v, 192**-0.5).transpose(0, 1)
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)
