"""Fused forms of the small operations around attention and routing: Triton on CUDA, eager torch elsewhere.

Shapes: T rows, H hidden, h query heads, g kv heads, d head_dim, E experts, K experts per token.

At decode sizes each of these operations is a few microseconds of launch and tail even replayed from a
CUDA graph, and one MoE layer of Qwen3 was about sixty of them. Each function here replaces a chain:
- add_rms_norm: a residual sum and the next RMSNorm (three adds, casts, the norm and its weight);
- qk_norm_rope_store: the per-head RMSNorm of queries and keys, the rotary embedding and the two KV
  cache writes of a Qwen3 attention;
- softmax_topk: a softmax router's scores, top-k, renormalization and scaling.
The kernels compute in float32 and round to the output dtype where the eager form does, so the two
agree to within a rounding or two of that dtype (the eager norm sums in another order). The eager form is
the CPU path and the reference the kernels are tested against (tests/workers/model/test_fused.py).

Measured on the H200 box (Qwen3-30B-A3B FP8 shape, 8 layers, bf16, batch 1): a decode segment went from
57 kernels and 132 us per replay to 13 kernels and 42 us; a step with its CPU experts from 14.9 to 7.2 ms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hmoe.workers.gpu_kernels import tl, triton, use_kernels

MAX_ROW = 16384  # the widest row a kernel holds in registers at once (hidden sizes, expert counts)


def add_rms_norm(norm, x: torch.Tensor, *terms: torch.Tensor, out: torch.Tensor | None = None):
    """-> (s, norm(s)) with s = x + (terms[0] + terms[1] + ...) in x's dtype ([T, H] each; `norm` an
    RMSNorm). The sum is written into `out` when given."""
    if use_kernels(x) and 1 <= len(terms) <= 2 and x.shape[-1] <= MAX_ROW:
        rows, hidden = x.shape
        s = torch.empty_like(x) if out is None else out
        y = torch.empty_like(x)
        second = terms[-1]
        _add_rms_norm_kernel[(rows,)](
            x,
            terms[0],
            second,
            norm.weight,
            s,
            y,
            x.stride(0),
            terms[0].stride(0),
            second.stride(0),
            s.stride(0),
            y.stride(0),
            norm.eps,
            H=hidden,
            H_PAD=triton.next_power_of_2(hidden),
            TERMS=len(terms),
            num_warps=4 if hidden <= 4096 else 8,
        )
        return s, y
    added = terms[0].to(x.dtype)
    for t in terms[1:]:
        added = added + t
    s = torch.add(x, added, out=out) if out is not None else x + added
    return s, norm(s)


def qk_norm_rope_store(q, k, v, q_norm, k_norm, rotary, cos, sin, write_slots, k_cache, v_cache) -> torch.Tensor:
    """q [T, h*d], k/v [T, g*d] (rows may be strided views of one projection) -> rotated, normalized
    queries [T, h, d]; the normalized, rotated keys and the values are written to k/v_cache [slots, g*d]
    at write_slots [T]. q_norm/k_norm are per-head RMSNorms over d; cos/sin [T, d/2]."""
    rows, d = q.shape[0], q_norm.weight.shape[0]
    heads, kv_heads = q.shape[1] // d, k.shape[1] // d
    if use_kernels(q) and rotary.dim == d and not rotary.rope.interleave and d & (d - 1) == 0:
        out = torch.empty(rows, heads, d, dtype=q.dtype, device=q.device)
        _qk_norm_rope_store_kernel[(rows, heads + 2 * kv_heads)](
            q,
            k,
            v,
            q_norm.weight,
            k_norm.weight,
            cos,
            sin,
            write_slots,
            out,
            k_cache,
            v_cache,
            q.stride(0),
            k.stride(0),
            v.stride(0),
            cos.stride(0),
            k_cache.stride(0),
            v_cache.stride(0),
            q_norm.eps,
            k_norm.eps,
            HEADS=heads,
            KV_HEADS=kv_heads,
            D=d,
            num_warps=1,
        )
        return out
    q = rotary.apply(q_norm(q.reshape(rows, heads, d)), cos, sin)
    k = rotary.apply(k_norm(k.reshape(rows, kv_heads, d)), cos, sin)
    k_cache[write_slots] = k.reshape(rows, kv_heads * d).to(k_cache.dtype)
    v_cache[write_slots] = v.to(v_cache.dtype)
    return q


def softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool, scale: float):
    """A softmax router's choice: logits [T, E] -> topk_ids [T, K] int64 (best first), topk_weights [T, K]
    float32 (the chosen probabilities, renormalized to sum 1 when asked, times scale)."""
    if use_kernels(logits) and logits.shape[-1] <= MAX_ROW:
        rows, num_experts = logits.shape
        ids = torch.empty(rows, top_k, dtype=torch.int64, device=logits.device)
        weights = torch.empty(rows, top_k, dtype=torch.float32, device=logits.device)
        _softmax_topk_kernel[(rows,)](
            logits,
            ids,
            weights,
            logits.stride(0),
            scale,
            E=num_experts,
            E_PAD=triton.next_power_of_2(num_experts),
            K=top_k,
            K_PAD=triton.next_power_of_2(top_k),
            RENORM=renormalize,
            num_warps=1 if num_experts <= 256 else 4,
        )
        return ids, weights
    scores = F.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = scores.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * scale


if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(
        x_ptr, a_ptr, b_ptr, w_ptr, s_ptr, y_ptr,
        x_stride, a_stride, b_stride, s_stride, y_stride, eps,
        H: tl.constexpr, H_PAD: tl.constexpr, TERMS: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, H_PAD)
        mask = offs < H
        dtype = s_ptr.dtype.element_ty  # rounded where the eager form rounds: x + (a + b) in x's dtype
        added = tl.load(a_ptr + row * a_stride + offs, mask=mask, other=0.0).to(dtype).to(tl.float32)
        if TERMS == 2:
            b = tl.load(b_ptr + row * b_stride + offs, mask=mask, other=0.0).to(tl.float32)
            added = (added + b).to(dtype).to(tl.float32)
        x = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0).to(tl.float32)
        s = (x + added).to(dtype)
        tl.store(s_ptr + row * s_stride + offs, s, mask=mask)
        sf = s.to(tl.float32)
        rms = tl.rsqrt(tl.sum(sf * sf, axis=0) / H + eps)
        normed = (sf * rms).to(y_ptr.dtype.element_ty).to(tl.float32)  # the eager form rounds here
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * y_stride + offs, (w * normed).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _norm_rope(x1, x2, w_ptr, cos, sin, eps, D: tl.constexpr, dtype: tl.constexpr):
        """One head's halves (pairs i, i + D/2) -> normalized, scaled by w, rotated."""
        half = tl.arange(0, D // 2)
        rms = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / D + eps)
        w1 = tl.load(w_ptr + half).to(tl.float32)
        w2 = tl.load(w_ptr + D // 2 + half).to(tl.float32)
        n1 = (w1 * (x1 * rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        n2 = (w2 * (x2 * rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        return n1 * cos - n2 * sin, n2 * cos + n1 * sin

    @triton.jit
    def _qk_norm_rope_store_kernel(
        q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, slots_ptr, out_ptr, kc_ptr, vc_ptr,
        q_stride, k_stride, v_stride, cs_stride, kc_stride, vc_stride, q_eps, k_eps,
        HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        half = tl.arange(0, D // 2)
        if head < HEADS + KV_HEADS:
            cos = tl.load(cos_ptr + row * cs_stride + half).to(tl.float32)
            sin = tl.load(sin_ptr + row * cs_stride + half).to(tl.float32)
            if head < HEADS:
                src = q_ptr + row * q_stride + head * D
                y1, y2 = _norm_rope(
                    tl.load(src + half).to(tl.float32),
                    tl.load(src + D // 2 + half).to(tl.float32),
                    qw_ptr, cos, sin, q_eps, D, out_ptr.dtype.element_ty,
                )  # fmt: skip
                dst = out_ptr + (row * HEADS + head) * D
            else:
                src = k_ptr + row * k_stride + (head - HEADS) * D
                y1, y2 = _norm_rope(
                    tl.load(src + half).to(tl.float32),
                    tl.load(src + D // 2 + half).to(tl.float32),
                    kw_ptr, cos, sin, k_eps, D, out_ptr.dtype.element_ty,
                )  # fmt: skip
                dst = kc_ptr + tl.load(slots_ptr + row) * kc_stride + (head - HEADS) * D
            tl.store(dst + half, y1.to(out_ptr.dtype.element_ty).to(dst.dtype.element_ty))
            tl.store(dst + D // 2 + half, y2.to(out_ptr.dtype.element_ty).to(dst.dtype.element_ty))
        else:
            src = v_ptr + row * v_stride + (head - HEADS - KV_HEADS) * D
            dst = vc_ptr + tl.load(slots_ptr + row) * vc_stride + (head - HEADS - KV_HEADS) * D
            full = tl.arange(0, D)
            tl.store(dst + full, tl.load(src + full).to(dst.dtype.element_ty))

    @triton.jit
    def _softmax_topk_kernel(
        logits_ptr, ids_ptr, w_ptr, stride, scale,
        E: tl.constexpr, E_PAD: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, RENORM: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, E_PAD)
        x = tl.load(logits_ptr + row * stride + offs, mask=offs < E, other=float("-inf")).to(tl.float32)
        p = tl.exp(x - tl.max(x, axis=0))
        p = p / tl.sum(p, axis=0)
        left = tl.where(offs < E, p, -1.0)  # probabilities not yet chosen; padding never is
        ks = tl.arange(0, K_PAD)
        ids = tl.zeros([K_PAD], dtype=tl.int64)
        vals = tl.zeros([K_PAD], dtype=tl.float32)
        for i in tl.static_range(K):
            best = tl.argmax(left, axis=0)
            ids = tl.where(ks == i, best.to(tl.int64), ids)
            vals = tl.where(ks == i, tl.max(left, axis=0), vals)
            left = tl.where(offs == best, -1.0, left)
        if RENORM:
            vals = vals / (tl.sum(vals, axis=0) + 1e-20)
        tl.store(ids_ptr + row * K + ks, ids, mask=ks < K)
        tl.store(w_ptr + row * K + ks, vals * scale, mask=ks < K)
