"""The fused decode operations (workers/model/fused.py): the eager forms against float64 on the CPU, the
Triton kernels against the eager forms on a GPU, on random data and on the shapes of the tiny models and
Qwen3-30B-A3B."""

from __future__ import annotations

import pytest
import torch

from hmoe.workers.model import fused
from hmoe.workers.model.layers import RMSNorm, Rotary
from hmoe.workers.weights.model_config import RopeConfig


def _on_gpu(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to("cuda") for t in tensors]


def _rms_f64(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return w.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rope_f64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2, cos, sin = x[..., :half], x[..., half:], cos.double()[:, None], sin.double()[:, None]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _case_norm(gen, rows: int, hidden: int, dtype: torch.dtype):
    norm = RMSNorm((1 + torch.randn(hidden, generator=gen) / 4).to(dtype), 1e-6)
    x, attn = (torch.randn(rows, hidden, generator=gen).to(dtype) for _ in range(2))
    routed = torch.randn(rows, hidden, generator=gen)  # float32, as the experts hand it back
    return norm, x, attn, routed


def _case_attention(gen, rows: int, heads: int, kv_heads: int, d: int, dtype: torch.dtype):
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d, generator=gen).to(dtype)  # one projection's output
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    norms = [RMSNorm((1 + torch.randn(d, generator=gen) / 4).to(dtype), 1e-6) for _ in range(2)]
    rotary = Rotary(RopeConfig(theta=1e6), d, torch.device("cpu"))
    cos, sin = rotary.cos_sin(torch.randint(0, 4096, (rows,), generator=gen), dtype)
    slots = torch.randperm(4 * rows, generator=gen)[:rows]
    caches = [torch.full((4 * rows, kv_heads * d), 7.0, dtype=dtype) for _ in range(2)]
    return q, k, v, *norms, rotary, cos, sin, slots, *caches


def test_eager_forms_match_float64():
    gen = torch.Generator().manual_seed(0)
    norm, x, attn, routed = _case_norm(gen, 5, 96, torch.float32)
    s, y = fused.add_rms_norm(norm, x, routed, attn)
    want = x.double() + routed.double() + attn.double()
    torch.testing.assert_close(s.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y.double(), _rms_f64(want, norm.weight, norm.eps), rtol=1e-5, atol=1e-5)

    q, k, v, qn, kn, rotary, cos, sin, slots, kc, vc = _case_attention(gen, 3, 4, 2, 32, torch.float32)
    out = fused.qk_norm_rope_store(q, k, v, qn, kn, rotary, cos, sin, slots, kc, vc)
    want_q = _rope_f64(_rms_f64(q.reshape(3, 4, 32), qn.weight, qn.eps), cos, sin)
    want_k = _rope_f64(_rms_f64(k.reshape(3, 2, 32), kn.weight, kn.eps), cos, sin).reshape(3, 64)
    torch.testing.assert_close(out.double(), want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kc[slots].double(), want_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vc[slots], v)
    untouched = torch.ones(len(kc), dtype=torch.bool).index_fill_(0, slots, False)
    assert (kc[untouched] == 7).all() and (vc[untouched] == 7).all()

    logits = torch.randn(6, 40, generator=gen)
    ids, weights = fused.softmax_topk(logits, 4, True, 2.5)
    p = torch.softmax(logits.double(), -1)
    want_ids = p.argsort(-1, descending=True)[:, :4]
    assert torch.equal(ids, want_ids)
    chosen = p.gather(1, want_ids)
    torch.testing.assert_close(weights.double(), 2.5 * chosen / chosen.sum(-1, keepdim=True), rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_the_eager_forms(dtype):
    gen = torch.Generator().manual_seed(1)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1.6e-2)
    for rows, hidden in ((1, 64), (3, 2048), (16, 7168)):  # tiny, Qwen3-30B-A3B, DeepSeek-V3
        norm, x, attn, routed = _case_norm(gen, rows, hidden, dtype)
        want = [fused.add_rms_norm(norm, x, routed, attn), fused.add_rms_norm(norm, x, attn)]
        norm.weight, x, attn, routed = _on_gpu(norm.weight, x, attn, routed)
        into = torch.empty_like(x)
        got = [fused.add_rms_norm(norm, x, routed, attn, out=into), fused.add_rms_norm(norm, x, attn)]
        assert got[0][0] is into
        for (s, y), (ws, wy) in zip(got, want):
            torch.testing.assert_close(s.cpu(), ws, **tol)
            torch.testing.assert_close(y.cpu(), wy, **tol)

    for rows, heads, kv_heads, d in ((2, 4, 2, 32), (5, 32, 4, 128), (1, 8, 8, 64)):
        case = _case_attention(gen, rows, heads, kv_heads, d, dtype)
        q, k, v, qn, kn, rotary, cos, sin, slots, kc, vc = case
        want_kc, want_vc = kc.clone(), vc.clone()
        want = fused.qk_norm_rope_store(q, k, v, qn, kn, rotary, cos, sin, slots, want_kc, want_vc)
        qn.weight, kn.weight, q, k, v, cos, sin, slots, kc, vc = _on_gpu(
            qn.weight, kn.weight, q, k, v, cos, sin, slots, kc, vc
        )
        got = fused.qk_norm_rope_store(q, k, v, qn, kn, rotary, cos, sin, slots, kc, vc)
        torch.testing.assert_close(got.cpu(), want, **tol)
        torch.testing.assert_close(kc.cpu(), want_kc, **tol)  # untouched slots too
        torch.testing.assert_close(vc.cpu(), want_vc, rtol=0, atol=0)

    for rows, experts, top_k, renorm in ((1, 16, 4, True), (7, 128, 8, True), (4, 160, 6, False)):
        logits = torch.randn(rows, experts, generator=gen).to(dtype)
        want_ids, want_w = fused.softmax_topk(logits, top_k, renorm, 1.5)
        ids, w = fused.softmax_topk(*_on_gpu(logits), top_k, renorm, 1.5)
        assert torch.equal(ids.cpu(), want_ids)
        torch.testing.assert_close(w.cpu(), want_w, rtol=1e-5, atol=1e-6)
