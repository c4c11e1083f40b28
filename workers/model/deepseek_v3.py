"""DeepSeek-V3 / R1, Kimi-K2 (and the V2 graph): Multi-head Latent Attention.

Shapes: N tokens in the batch, S context tokens of one sequence, h heads, H hidden,
r kv_lora_rank, dn qk_nope_head_dim, dr qk_rope_head_dim, dv v_head_dim.

The KV cache holds the compressed latent per token: [c (r, normalized) | k_rope (dr, rotated)].
Attention runs in one of two equal forms:
  plain:    k_nope, v = kv_b_proj(c) per head (one GEMM, see _plain); scores = q_nope.k_nope + q_rope.k_rope
  absorbed: q_nope is folded through kv_b_proj's key half into latent space, so scores and the
            weighted sum run over the r-wide latent directly and nothing is expanded per head —
            far fewer bytes per decode step on long contexts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hmoe.workers.model.batch import DecodeView, ForwardBatch, causal_attention
from hmoe.workers.model.kv_cache import KVPool
from hmoe.workers.model.layers import RMSNorm, Rotary
from hmoe.workers.model.paged_attention import mla_decode
from hmoe.workers.weights.model_config import ModelConfig


def absorbed_is_cheaper(c: ModelConfig, q_len: int) -> bool:
    """Whether q_len queries attend their context in fewer FLOPs in the absorbed form (over the latents,
    r + dr wide) than in the plain one (_plain: the context expanded to per-head keys and values, both
    w = dn + dr wide, first). Per key and head: absorbed 2 q (2r + dr); plain 4 (r + dr) w for the expansion
    plus 4 q w, so the context's length cancels out: DeepSeek-V3 (r 512, dr 64, dn 128) crosses at q = 314.
    A long chunk in the absorbed form also takes SDPA's math kernel (heads r + dr = 576 wide are too wide
    for the fused ones): float32 scores [128 heads, 2048, S] would be 34 GB for the last 2K chunk of a 32K
    prompt."""
    r, dr, width = c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim + c.qk_rope_head_dim
    return q_len * (2 * (2 * r + dr) - 4 * width) < 4 * (r + dr) * width


class MLAttention:
    def __init__(self, config: ModelConfig, layer_id: int, load, absorb: str = "auto"):
        """load(name, shape) -> tensor on the model's device; absorb: "auto" | "always" | "never"."""
        c = config
        self.config, self.layer_id, self.absorb = config, layer_id, absorb
        self.num_heads = h = c.num_heads
        qk_dim = c.qk_nope_head_dim + c.qk_rope_head_dim
        assert c.v_head_dim <= qk_dim, f"v_head_dim {c.v_head_dim} > the keys' {qk_dim}: _plain pads values to keys"
        if c.q_lora_rank is None:
            self.q_proj = load("q_proj.weight", (h * qk_dim, c.hidden_size))
        else:
            self.q_a_proj = load("q_a_proj.weight", (c.q_lora_rank, c.hidden_size))
            self.q_a_norm = RMSNorm(load("q_a_layernorm.weight", (c.q_lora_rank,)), 1e-6)
            self.q_b_proj = load("q_b_proj.weight", (h * qk_dim, c.q_lora_rank))
        self.kv_a_proj = load("kv_a_proj_with_mqa.weight", (c.kv_lora_rank + c.qk_rope_head_dim, c.hidden_size))
        self.kv_a_norm = RMSNorm(load("kv_a_layernorm.weight", (c.kv_lora_rank,)), 1e-6)
        kv_b = load("kv_b_proj.weight", (h * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank))
        kv_b = kv_b.view(h, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        self.w_uk = kv_b[:, : c.qk_nope_head_dim]  # [h, dn, r]
        self.w_uv = kv_b[:, c.qk_nope_head_dim :]  # [h, dv, r]
        self.o_proj = load("o_proj.weight", (c.hidden_size, h * c.v_head_dim))
        self.scale = c.attn_softmax_scale

    def _project(self, x, write_slots, kv: KVPool, rotary: Rotary, cos, sin):
        """-> q_nope [N, h, dn], rotated q_rope [N, h, dr] and the layer's cache, the new latents written."""
        c = self.config
        n = x.shape[0]
        q = (
            F.linear(x, self.q_proj)
            if c.q_lora_rank is None
            else F.linear(self.q_a_norm(F.linear(x, self.q_a_proj)), self.q_b_proj)
        )
        q = q.view(n, self.num_heads, -1)  # [N, h, dn + dr]
        q_nope, q_rope = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        q_rope = rotary.apply(q_rope, cos, sin)
        latent, k_rope = F.linear(x, self.kv_a_proj).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        k_rope = rotary.apply(k_rope[:, None, :], cos, sin)[:, 0]  # [N, dr], shared by all heads
        cache = kv.data["latent"][self.layer_id]  # [slots, r + dr]
        cache[write_slots] = torch.cat([self.kv_a_norm(latent), k_rope], dim=-1).to(cache.dtype)
        return q_nope, q_rope, cache

    def decode(self, x: torch.Tensor, view: DecodeView, kv: KVPool, rotary: Rotary, cos, sin) -> torch.Tensor:
        """One token per row, static shapes: the absorbed form over the paged latents (graph-capturable)."""
        q_nope, q_rope, cache = self._project(x, view.write_slots, kv, rotary, cos, sin)
        q_latent = torch.einsum("thd,hdr->thr", q_nope, self.w_uk)  # [B, h, r]
        o_latent = mla_decode(q_latent, q_rope, cache, view.block_table, view.seq_lens, kv.block_size, self.scale)
        return F.linear(torch.einsum("thr,hvr->thv", o_latent, self.w_uv).reshape(x.shape[0], -1), self.o_proj)

    def __call__(self, x: torch.Tensor, batch: ForwardBatch, kv: KVPool, rotary: Rotary, cos, sin) -> torch.Tensor:
        c = self.config
        n = x.shape[0]
        q_nope, q_rope, cache = self._project(x, batch.write_slots, kv, rotary, cos, sin)
        out = x.new_empty(n, self.num_heads, c.v_head_dim)
        for seq in batch.seqs:
            rows = slice(seq.q_start, seq.q_start + seq.q_len)
            ctx = cache[seq.ctx_slots].to(x.dtype)  # [S, r + dr]
            absorb = self.absorb == "always" or (self.absorb == "auto" and absorbed_is_cheaper(c, seq.q_len))
            attend = self._absorbed if absorb else self._plain
            out[rows] = attend(q_nope[rows], q_rope[rows], ctx)
        if batch.decode is not None:  # one-token sequences together, in the absorbed form (or plain, one by one)
            group = batch.decode
            if self.absorb == "never":
                for row, slots, mask in zip(group.rows.tolist(), group.slots, group.mask):
                    ctx = cache[slots[mask[0, 0]]].to(x.dtype)
                    out[row : row + 1] = self._plain(q_nope[row : row + 1], q_rope[row : row + 1], ctx)
            else:
                out[group.rows] = self._absorbed_group(
                    q_nope[group.rows], q_rope[group.rows], cache[group.slots].to(x.dtype), group.mask
                )
        return F.linear(out.reshape(n, -1), self.o_proj)

    def _plain(self, q_nope, q_rope, ctx):
        """Keys and values of every head from the cache rows [c | k_rope] in one GEMM, both dn + dr wide:
        keys through w_uk plus an identity that copies k_rope into each head, values through w_uv padded
        with zero rows (exact: products by 1 and sums of zeros). Equal widths let SDPA take its flash
        kernel, which needs one head dim: with values 128 wide against keys 192 it fell to the
        memory-efficient kernel, and a 32K DeepSeek-V3 prompt's attention took 0.35 s a layer on the
        H200 box against 0.19 s now. cuDNN's kernel takes the two widths (0.12 s) but builds a plan
        for every new (chunk, context) shape: 70 ms each, and up to 1.7 s where it compiles a kernel for
        an unaligned one, which every prompt length would pay. Building the keys in the GEMM also drops
        the concatenation that copied them (10% of the GPU time of such a prompt)."""
        c = self.config
        s, h, r, width = ctx.shape[0], self.num_heads, c.kv_lora_rank, c.qk_nope_head_dim + c.qk_rope_head_dim
        w = ctx.new_zeros(2, h, width, ctx.shape[1])  # [keys | values, h, dn + dr, r + dr]
        w[0, :, : c.qk_nope_head_dim, :r] = self.w_uk
        w[0, :, c.qk_nope_head_dim :, r:] = torch.eye(c.qk_rope_head_dim, dtype=ctx.dtype, device=ctx.device)
        w[1, :, : c.v_head_dim, :r] = self.w_uv
        kv = F.linear(ctx, w.view(-1, ctx.shape[1])).view(s, 2, h, width)
        k, v = kv[:, 0], kv[:, 1]  # [S, h, dn + dr]; v's last dr - (dv - dn) columns are zeros
        q = torch.cat([q_nope, q_rope], dim=-1)
        o = causal_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), self.scale)  # [h, T, dn + dr]
        return o[..., : c.v_head_dim].transpose(0, 1)

    def _absorbed(self, q_nope, q_rope, ctx):
        q_latent = torch.einsum("thd,hdr->htr", q_nope, self.w_uk)  # [h, T, r]
        q = torch.cat([q_latent, q_rope.transpose(0, 1)], dim=-1)  # [h, T, r + dr]
        latent = ctx[:, : self.config.kv_lora_rank]
        o_latent = causal_attention(q, ctx[None], latent[None], self.scale)  # [h, T, r]
        return torch.einsum("htr,hvr->thv", o_latent, self.w_uv)

    def _absorbed_group(self, q_nope, q_rope, ctx, mask):
        """q [D, h, *] one token each, ctx [D, S, r + dr] padded, mask [D, 1, 1, S] -> [D, h, dv]."""
        q_latent = torch.einsum("thd,hdr->thr", q_nope, self.w_uk)  # [D, h, r]
        q = torch.cat([q_latent, q_rope], dim=-1)[:, :, None]  # [D, h, 1, r + dr]
        latent = ctx[..., : self.config.kv_lora_rank]
        o_latent = F.scaled_dot_product_attention(
            q, ctx[:, None], latent[:, None], attn_mask=mask, scale=self.scale, enable_gqa=True
        )  # [D, h, 1, r]
        return torch.einsum("thr,hvr->thv", o_latent[:, :, 0], self.w_uv)


def build_attention(config: ModelConfig, layer_id: int, load, absorb: str = "auto") -> MLAttention:
    return MLAttention(config, layer_id, load, absorb)
