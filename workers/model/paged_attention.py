"""Decode attention that reads the paged KV cache through a block table: one query token per row.

Shapes: B rows, h query heads, g kv heads, d head_dim, MB block-table width, bs block size,
r MLA latent rank, dr MLA rope dims. Row b's context is its first seq_lens[b] positions; position p
lives in slot block_table[b, p // bs] * bs + p % bs.

Two forms, the same numbers:
- `*_reference`: gathers the rows' padded contexts and runs SDPA (any device; the CPU path and the
  reference the GPU kernels are tested against).
- Triton kernels (CUDA): every shape is fixed by (B, MB) and the context length is read on the device,
  so a CUDA graph captured once serves every step. One program per (row, kv head) for GQA and per
  (row, 16 heads) for MLA's latent form, an online softmax over BLOCK_N keys at a time. Written here
  rather than taken from FlashInfer/FlashMLA: Triton ships with CUDA builds of torch (no new
  dependency), and at decode sizes the step is bound by launch count, which graphs remove, not by
  these kernels' bandwidth. Long contexts at batch 1 would want a split-K variant (not done).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hmoe.workers.gpu_kernels import tl, triton, use_kernels


def _context(block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int):
    """-> slots [B, MB * bs] int64 and mask [B, 1, 1, MB * bs] (True inside the context)."""
    num_rows, width = block_table.shape
    slots = block_table.long()[:, :, None] * block_size + torch.arange(block_size, device=block_table.device)
    slots = slots.view(num_rows, width * block_size)
    mask = torch.arange(width * block_size, device=block_table.device)[None, :] < seq_lens[:, None]
    # Slots past the context may never have been written (NaN * 0 is NaN): read position 0 there instead.
    return torch.where(mask, slots, slots[:, :1]), mask[:, None, None, :]


def gqa_decode_reference(q, k_cache, v_cache, block_table, seq_lens, block_size: int, scale: float):
    """q [B, h, d], k/v_cache [slots, g * d] -> [B, h, d] in q's dtype."""
    num_rows, _, d = q.shape
    slots, mask = _context(block_table, seq_lens, block_size)
    keys = k_cache[slots].to(q.dtype).view(num_rows, slots.shape[1], -1, d).transpose(1, 2)  # [B, g, S, d]
    values = v_cache[slots].to(q.dtype).view(num_rows, slots.shape[1], -1, d).transpose(1, 2)
    o = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return o[:, :, 0]


def mla_decode_reference(q_latent, q_rope, cache, block_table, seq_lens, block_size: int, scale: float):
    """q_latent [B, h, r], q_rope [B, h, dr], cache [slots, r + dr] -> o_latent [B, h, r] in q's dtype."""
    slots, mask = _context(block_table, seq_lens, block_size)
    ctx = cache[slots].to(q_latent.dtype)  # [B, S, r + dr]
    q = torch.cat([q_latent, q_rope], dim=-1)[:, :, None]  # [B, h, 1, r + dr]
    latent = ctx[..., : q_latent.shape[-1]]
    o = F.scaled_dot_product_attention(
        q, ctx[:, None], latent[:, None], attn_mask=mask, scale=scale, enable_gqa=True
    )  # [B, h, 1, r]
    return o[:, :, 0]


def gqa_decode(q, k_cache, v_cache, block_table, seq_lens, block_size: int, scale: float):
    if not use_kernels(q):
        return gqa_decode_reference(q, k_cache, v_cache, block_table, seq_lens, block_size, scale)
    num_rows, heads, d = q.shape
    kv_heads = k_cache.shape[1] // d
    group = heads // kv_heads
    q = q.contiguous()
    out = torch.empty_like(q)
    _gqa_kernel[(num_rows, kv_heads)](
        q,
        k_cache,
        v_cache,
        block_table,
        seq_lens,
        out,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        block_table.stride(0),
        scale,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        D=d,
        D_PAD=triton.next_power_of_2(d),
        BS=block_size,
        BLOCK_N=64,
        IEEE=q.dtype == torch.float32,
        num_warps=4,
    )
    return out


def mla_decode(q_latent, q_rope, cache, block_table, seq_lens, block_size: int, scale: float):
    if not use_kernels(q_latent):
        return mla_decode_reference(q_latent, q_rope, cache, block_table, seq_lens, block_size, scale)
    num_rows, heads, rank = q_latent.shape
    rope = q_rope.shape[-1]
    q_latent, q_rope = q_latent.contiguous(), q_rope.contiguous()
    out = torch.empty_like(q_latent)
    head_block = 16
    fp32 = q_latent.dtype == torch.float32
    _mla_kernel[(num_rows, triton.cdiv(heads, head_block))](
        q_latent,
        q_rope,
        cache,
        block_table,
        seq_lens,
        out,
        heads,
        cache.stride(0),
        block_table.stride(0),
        scale,
        HB=head_block,
        R=rank,
        R_PAD=triton.next_power_of_2(rank),
        DR=rope,
        DR_PAD=max(16, triton.next_power_of_2(rope)),
        BS=block_size,
        BLOCK_N=16 if fp32 else 32,
        IEEE=fp32,
        num_warps=8,
    )
    return out


if triton is not None:

    @triton.jit
    def _gqa_kernel(
        Q,
        K,
        V,
        BT,
        SL,
        O,
        stride_qb,
        stride_qh,
        stride_ks,
        stride_bt,
        scale,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        D: tl.constexpr,
        D_PAD: tl.constexpr,
        BS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        row = tl.program_id(0)
        kvh = tl.program_id(1)
        seq_len = tl.load(SL + row).to(tl.int32)
        hs = tl.arange(0, GROUP_PAD)
        ds = tl.arange(0, D_PAD)
        hmask = hs < GROUP
        dmask = ds < D
        q_ptrs = Q + row * stride_qb + (kvh * GROUP + hs)[:, None] * stride_qh + ds[None, :]
        q = tl.load(q_ptrs, mask=hmask[:, None] & dmask[None, :], other=0.0)  # [GP, D]
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        den = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
        for start in range(0, seq_len, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            nmask = n < seq_len
            block = tl.load(BT + row * stride_bt + n // BS, mask=nmask, other=0).to(tl.int64)
            slot = block * BS + n % BS
            kv_off = slot[:, None] * stride_ks + kvh * D + ds[None, :]
            kv_mask = nmask[:, None] & dmask[None, :]
            k = tl.load(K + kv_off, mask=kv_mask, other=0.0).to(q.dtype)  # [BN, D]
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(nmask[None, :], s * scale, float("-inf"))  # [GP, BN]
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            den = den * alpha + tl.sum(p, 1)
            v = tl.load(V + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = acc / tl.where(den > 0, den, 1.0)[:, None]
        o_ptrs = O + row * stride_qb + (kvh * GROUP + hs)[:, None] * stride_qh + ds[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=hmask[:, None] & dmask[None, :])

    @triton.jit
    def _mla_kernel(
        QL,
        QR,
        C,
        BT,
        SL,
        O,
        heads,
        stride_cs,
        stride_bt,
        scale,
        HB: tl.constexpr,
        R: tl.constexpr,
        R_PAD: tl.constexpr,
        DR: tl.constexpr,
        DR_PAD: tl.constexpr,
        BS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        row = tl.program_id(0)
        hs = tl.program_id(1) * HB + tl.arange(0, HB)
        hmask = hs < heads
        seq_len = tl.load(SL + row).to(tl.int32)
        rs = tl.arange(0, R_PAD)
        es = tl.arange(0, DR_PAD)
        rmask = rs < R
        emask = es < DR
        head_rows = row * heads + hs
        ql = tl.load(QL + head_rows[:, None] * R + rs[None, :], mask=hmask[:, None] & rmask[None, :], other=0.0)
        qr = tl.load(QR + head_rows[:, None] * DR + es[None, :], mask=hmask[:, None] & emask[None, :], other=0.0)
        m = tl.full([HB], float("-inf"), tl.float32)
        den = tl.zeros([HB], tl.float32)
        acc = tl.zeros([HB, R_PAD], tl.float32)
        for start in range(0, seq_len, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            nmask = n < seq_len
            block = tl.load(BT + row * stride_bt + n // BS, mask=nmask, other=0).to(tl.int64)
            base = (block * BS + n % BS)[:, None] * stride_cs
            c = tl.load(C + base + rs[None, :], mask=nmask[:, None] & rmask[None, :], other=0.0).to(ql.dtype)
            cr = tl.load(C + base + R + es[None, :], mask=nmask[:, None] & emask[None, :], other=0.0).to(ql.dtype)
            if IEEE:
                s = tl.dot(ql, tl.trans(c), input_precision="ieee") + tl.dot(qr, tl.trans(cr), input_precision="ieee")
            else:
                s = tl.dot(ql, tl.trans(c)) + tl.dot(qr, tl.trans(cr))
            s = tl.where(nmask[None, :], s * scale, float("-inf"))  # [HB, BN]
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            den = den * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c)
            m = m_new
        out = acc / tl.where(den > 0, den, 1.0)[:, None]
        tl.store(
            O + head_rows[:, None] * R + rs[None, :],
            out.to(O.dtype.element_ty),
            mask=hmask[:, None] & rmask[None, :],
        )
