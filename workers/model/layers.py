"""Building blocks shared by the model families: RMSNorm, rotary embeddings, dense MLP, router, MoE.

Shapes: T tokens, H hidden, E routed experts, K experts per token, D rotary dims.
Blocks hold plain tensors (already on their device, in their dtype) and are called like functions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hmoe.workers.experts.backend import ExpertBackend
from hmoe.workers.model.fused import softmax_topk
from hmoe.workers.weights.model_config import ModelConfig, RopeConfig, yarn_mscale


class RMSNorm:
    def __init__(self, weight: torch.Tensor, eps: float):
        self.weight = weight
        self.eps = eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """weight * (x / rms(x)) with the normalization in float32 (as the reference models do);
        torch's fused rms_norm makes it one kernel instead of six."""
        normed = F.rms_norm(x.to(torch.float32), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class Rotary:
    """Rotary embedding over the last D dims, with YaRN frequency blending and attention factor."""

    def __init__(self, rope: RopeConfig, dim: int, device: torch.device):
        self.rope = rope
        self.dim = dim
        self.inv_freq, self.attention_factor = _inv_freq(rope, dim)
        self.inv_freq = self.inv_freq.to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, D/2] (the attention factor folded in)."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        return (freqs.cos() * self.attention_factor).to(dtype), (freqs.sin() * self.attention_factor).to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, D] rotated by cos/sin [T, D/2].

        Interleaved (DeepSeek): pairs (x0, x1), (x2, x3) ... rotate together and the result is laid
        out [evens | odds]; queries and keys get the same permutation, so their dot products are
        those of the interleaved rotation. Otherwise pairs are (x_i, x_{i+D/2}).
        """
        cos, sin = cos[:, None, :], sin[:, None, :]
        if self.rope.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x[..., : self.dim // 2], x[..., self.dim // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _inv_freq(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if rope.type == "default":
        return 1.0 / pos_freqs, 1.0

    # YaRN: interpolate low frequencies, keep high ones, ramp between (arXiv 2309.00071).
    def correction_dim(num_rotations: float) -> float:
        return (
            dim
            * math.log(rope.original_max_position_embeddings / (num_rotations * 2 * math.pi))
            / (2 * math.log(rope.theta))
        )

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (rope.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    if rope.attention_factor is not None:
        factor = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        factor = yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
    else:
        factor = yarn_mscale(rope.factor)
    return inv_freq, float(factor)


class MLP:
    """Dense SwiGLU MLP: down(silu(gate x) * up x)."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        self.gate, self.up, self.down = gate, up, down

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, self.gate)) * F.linear(x, self.up), self.down)

    def submit(self, x: torch.Tensor, experts: ExpertBackend | None = None) -> torch.Tensor:
        """The MoE block's two halves, for a dense layer: all the work is on the device, done here."""
        return self(x)

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        return out


class Router:
    """Top-k expert choice: softmax (Qwen3, DeepSeek-V2) or sigmoid with correction bias and
    grouped top-k (DeepSeek-V3, Kimi-K2)."""

    def __init__(self, config: ModelConfig, weight: torch.Tensor, correction_bias: torch.Tensor | None):
        self.config = config
        self.weight = weight  # [E, H]
        self.correction_bias = correction_bias  # [E] float32 or None

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> topk_ids [T, K] int64, topk_weights [T, K] float32."""
        cfg = self.config
        if cfg.scoring == "softmax" and cfg.n_group <= 1 and self.correction_bias is None:  # Qwen3
            return softmax_topk(
                F.linear(x, self.weight), cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.routed_scaling_factor
            )
        if cfg.scoring == "softmax":
            scores = F.softmax(F.linear(x, self.weight), dim=-1, dtype=torch.float32)  # [T, E]
        else:
            scores = F.linear(x.to(torch.float32), self.weight.to(torch.float32)).sigmoid()
        choice = scores if self.correction_bias is None else scores + self.correction_bias
        if cfg.n_group > 1:
            grouped = choice.view(-1, cfg.n_group, cfg.num_experts // cfg.n_group)  # [T, G, E/G]
            if cfg.use_correction_bias:
                group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            else:
                group_scores = grouped.amax(-1)
            keep = group_scores.topk(cfg.topk_group, dim=-1).indices  # [T, topk_group]
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            # expand, not repeat_interleave: that one syncs with the host, which a CUDA graph cannot hold
            group_mask = group_mask[:, :, None].expand(grouped.shape).reshape(choice.shape)
            choice = choice.masked_fill(~group_mask, float("-inf"))
        topk_ids = choice.topk(cfg.num_experts_per_tok, dim=-1).indices  # [T, K]
        topk_weights = scores.gather(1, topk_ids)
        if cfg.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(-1, keepdim=True) + 1e-20)
        return topk_ids, topk_weights * cfg.routed_scaling_factor


class MoE:
    """Routed experts (run by the backend each forward hands in) plus optional shared experts."""

    def __init__(self, layer_id: int, router: Router, shared: MLP | None):
        self.layer_id = layer_id
        self.router = router
        self.shared = shared

    def submit(self, x: torch.Tensor, experts: ExpertBackend):
        """Route on the device, start the routed experts on `experts`, run the shared experts meanwhile."""
        topk_ids, topk_weights = self.router(x)
        handle = experts.submit(self.layer_id, x, topk_ids, topk_weights.to(torch.float32))
        return experts, handle, (self.shared(x) if self.shared is not None else None)

    def finish(self, pending) -> torch.Tensor:
        experts, handle, shared = pending
        out = experts.wait(handle)
        return out if shared is None else out + shared
