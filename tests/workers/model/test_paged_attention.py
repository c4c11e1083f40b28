"""Paged decode attention: the SDPA reference against float64 softmax attention row by row, and the
Triton kernels (GPU) against the reference, on random data with scattered blocks and ragged contexts."""

from __future__ import annotations

import pytest
import torch

from hmoe.workers.model import paged_attention as pa

BS = 16


def _paged(num_rows: int, width: int, seq_lens: list[int], gen):
    """A block table of distinct random blocks per row (the pool holds rows * width + 1 blocks)."""
    blocks = torch.randperm(num_rows * width + 1, generator=gen)[: num_rows * width].view(num_rows, width)
    return blocks.to(torch.int32), torch.tensor(seq_lens, dtype=torch.int64), (num_rows * width + 1) * BS


def _positions(block_table, row: int, seq_len: int) -> torch.Tensor:
    p = torch.arange(seq_len)
    return block_table[row].long()[p // BS] * BS + p % BS


def _gqa_f64(q, k_cache, v_cache, block_table, seq_lens, scale):
    num_rows, heads, d = q.shape
    g = k_cache.shape[1] // d
    out = torch.empty(num_rows, heads, d, dtype=torch.float64)
    for row in range(num_rows):
        slots = _positions(block_table, row, int(seq_lens[row]))
        k = k_cache[slots].double().view(-1, g, d).repeat_interleave(heads // g, dim=1)  # [S, h, d]
        v = v_cache[slots].double().view(-1, g, d).repeat_interleave(heads // g, dim=1)
        w = torch.softmax(torch.einsum("hd,shd->hs", q[row].double(), k) * scale, dim=-1)
        out[row] = torch.einsum("hs,shd->hd", w, v)
    return out


def _mla_f64(q_latent, q_rope, cache, block_table, seq_lens, scale):
    r = q_latent.shape[-1]
    out = torch.empty(q_latent.shape, dtype=torch.float64)
    for row in range(q_latent.shape[0]):
        ctx = cache[_positions(block_table, row, int(seq_lens[row]))].double()  # [S, r + dr]
        q = torch.cat([q_latent[row], q_rope[row]], dim=-1).double()  # [h, r + dr]
        w = torch.softmax(q @ ctx.T * scale, dim=-1)
        out[row] = w @ ctx[:, :r]
    return out


def _gqa_case(gen, heads=8, kv_heads=2, d=64, seq_lens=(1, 17, 40, 16), dtype=torch.float32):
    block_table, lens, slots = _paged(len(seq_lens), max(seq_lens) // BS + 1, list(seq_lens), gen)
    q = torch.randn(len(seq_lens), heads, d, generator=gen).to(dtype)
    k = torch.randn(slots, kv_heads * d, generator=gen).to(dtype)
    v = torch.randn(slots, kv_heads * d, generator=gen).to(dtype)
    return q, k, v, block_table, lens


def _mla_case(gen, heads=16, r=64, dr=16, seq_lens=(1, 17, 40, 16), dtype=torch.float32):
    block_table, lens, slots = _paged(len(seq_lens), max(seq_lens) // BS + 1, list(seq_lens), gen)
    ql = torch.randn(len(seq_lens), heads, r, generator=gen).to(dtype) / 4
    qr = torch.randn(len(seq_lens), heads, dr, generator=gen).to(dtype) / 4
    cache = torch.randn(slots, r + dr, generator=gen).to(dtype)
    return ql, qr, cache, block_table, lens


def test_references_match_float64_attention_and_ignore_unwritten_slots():
    gen = torch.Generator().manual_seed(0)
    q, k, v, table, lens = _gqa_case(gen)
    k[table[0, 1:].long() * BS] = float("nan")  # past row 0's single token: never read
    v[table[0, 1:].long() * BS] = float("nan")
    got = pa.gqa_decode_reference(q, k, v, table, lens, BS, 0.125)
    torch.testing.assert_close(got.double(), _gqa_f64(q, k, v, table, lens, 0.125), rtol=1e-5, atol=1e-5)
    ql, qr, cache, table, lens = _mla_case(gen)
    got = pa.mla_decode_reference(ql, qr, cache, table, lens, BS, 0.1)
    torch.testing.assert_close(got.double(), _mla_f64(ql, qr, cache, table, lens, 0.1), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_match_the_reference(dtype):
    gen = torch.Generator().manual_seed(1)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    lens = (1, 63, 64, 65, 200, 7)
    for heads, kv_heads, d in ((8, 2, 64), (32, 4, 128), (4, 4, 64)):  # tiny, Qwen3-30B-A3B, no grouping
        case = _gqa_case(gen, heads, kv_heads, d, lens, dtype)
        want = _gqa_f64(*case, d**-0.5)
        got = pa.gqa_decode(*(t.cuda() for t in case), BS, d**-0.5).cpu()
        torch.testing.assert_close(got.double(), want, **tol)
    for heads, r, dr in ((4, 64, 16), (128, 512, 64)):  # tiny DeepSeek, DeepSeek-V3
        case = _mla_case(gen, heads, r, dr, lens, dtype)
        want = _mla_f64(*case, 0.1)
        got = pa.mla_decode(*(t.cuda() for t in case), BS, 0.1).cpu()
        torch.testing.assert_close(got.double(), want, **tol)
