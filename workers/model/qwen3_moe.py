"""Qwen3-MoE: grouped-query attention with per-head RMSNorm on queries and keys.

Shapes: N tokens in the batch, S context tokens of one sequence, h query heads, g kv heads,
d head_dim. The KV cache holds rotated keys and values: "k", "v" [slots, g * d].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hmoe.workers.model.batch import DecodeView, ForwardBatch, causal_attention
from hmoe.workers.model.fused import qk_norm_rope_store
from hmoe.workers.model.kv_cache import KVPool
from hmoe.workers.model.layers import RMSNorm, Rotary
from hmoe.workers.model.paged_attention import gqa_decode
from hmoe.workers.weights.model_config import ModelConfig


class GQAttention:
    def __init__(self, config: ModelConfig, layer_id: int, load):
        c = config
        self.config, self.layer_id = config, layer_id
        h, g, d = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = load("q_proj.weight", (h * d, c.hidden_size))
        self.k_proj = load("k_proj.weight", (g * d, c.hidden_size))
        self.v_proj = load("v_proj.weight", (g * d, c.hidden_size))
        self.o_proj = load("o_proj.weight", (c.hidden_size, h * d))
        if c.attention_bias:
            self.q_bias, self.k_bias, self.v_bias = (
                load(f"{p}_proj.bias", (n * d,)) for p, n in (("q", h), ("k", g), ("v", g))
            )
            self.o_bias = load("o_proj.bias", (c.hidden_size,))
        else:
            self.q_bias = self.k_bias = self.v_bias = self.o_bias = None
        self.q_norm = RMSNorm(load("q_norm.weight", (d,)), c.rms_norm_eps)
        self.k_norm = RMSNorm(load("k_norm.weight", (d,)), c.rms_norm_eps)
        self.qkv_proj = self.qkv_bias = None
        if self.q_proj.device.type == "cuda":  # one GEMM instead of three; q/k/v_proj become its views
            self.qkv_proj = torch.cat([self.q_proj, self.k_proj, self.v_proj])
            self.q_proj, self.k_proj, self.v_proj = self.qkv_proj.split([h * d, g * d, g * d])
            if c.attention_bias:
                self.qkv_bias = torch.cat([self.q_bias, self.k_bias, self.v_bias])
                self.q_bias, self.k_bias, self.v_bias = self.qkv_bias.split([h * d, g * d, g * d])

    def _project(self, x, write_slots, kv: KVPool, rotary: Rotary, cos, sin):
        """-> rotated queries [N, h, d] and this layer's caches, with the new keys and values written."""
        c = self.config
        h, g, d = c.num_heads, c.num_kv_heads, c.head_dim
        if self.qkv_proj is not None:
            q, k, v = F.linear(x, self.qkv_proj, self.qkv_bias).split([h * d, g * d, g * d], dim=-1)
        else:  # on the CPU the weights stay where the source put them (the pack's, zero-copy)
            q, k, v = (
                F.linear(x, w, b)
                for w, b in ((self.q_proj, self.q_bias), (self.k_proj, self.k_bias), (self.v_proj, self.v_bias))
            )
        k_cache, v_cache = kv.data["k"][self.layer_id], kv.data["v"][self.layer_id]  # [slots, g * d]
        q = qk_norm_rope_store(q, k, v, self.q_norm, self.k_norm, rotary, cos, sin, write_slots, k_cache, v_cache)
        return q, k_cache, v_cache

    def decode(self, x: torch.Tensor, view: DecodeView, kv: KVPool, rotary: Rotary, cos, sin) -> torch.Tensor:
        """One token per row, static shapes: paged attention through the block table (graph-capturable)."""
        n, h, d = x.shape[0], self.config.num_heads, self.config.head_dim
        q, k_cache, v_cache = self._project(x, view.write_slots, kv, rotary, cos, sin)
        o = gqa_decode(q, k_cache, v_cache, view.block_table, view.seq_lens, kv.block_size, d**-0.5)
        return F.linear(o.reshape(n, h * d), self.o_proj, self.o_bias)

    def __call__(self, x: torch.Tensor, batch: ForwardBatch, kv: KVPool, rotary: Rotary, cos, sin) -> torch.Tensor:
        c = self.config
        n, h, g, d = x.shape[0], c.num_heads, c.num_kv_heads, c.head_dim
        q, k_cache, v_cache = self._project(x, batch.write_slots, kv, rotary, cos, sin)

        out = x.new_empty(n, h, d)
        for seq in batch.seqs:
            rows = slice(seq.q_start, seq.q_start + seq.q_len)
            keys = k_cache[seq.ctx_slots].to(x.dtype).view(-1, g, d).transpose(0, 1)  # [g, S, d]
            values = v_cache[seq.ctx_slots].to(x.dtype).view(-1, g, d).transpose(0, 1)
            o = causal_attention(q[rows].transpose(0, 1), keys, values)  # [h, T, d]
            out[rows] = o.transpose(0, 1)
        if batch.decode is not None:
            group = batch.decode
            keys = k_cache[group.slots].to(x.dtype).view(*group.slots.shape, g, d).transpose(1, 2)  # [D, g, S, d]
            values = v_cache[group.slots].to(x.dtype).view(*group.slots.shape, g, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(
                q[group.rows][:, :, None], keys, values, attn_mask=group.mask, enable_gqa=True
            )  # [D, h, 1, d]
            out[group.rows] = o[:, :, 0]
        return F.linear(out.reshape(n, h * d), self.o_proj, self.o_bias)


def build_attention(config: ModelConfig, layer_id: int, load, absorb: str = "auto") -> GQAttention:
    return GQAttention(config, layer_id, load)
