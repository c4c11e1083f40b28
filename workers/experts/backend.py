"""Expert backends: where the routed experts of a MoE layer run.

Shapes: T tokens, K experts per token (top-k), E routed experts, H hidden, I expert intermediate.

The model hands every MoE layer's routed-expert work to one object with a narrow contract
(`ExpertBackend`), so the CPU kernels, a GPU backend or stream-loading prefill plug in from the
outside without touching the model. `TorchExperts` is the reference: plain torch, any device.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class ExpertBackend(Protocol):
    """y[t] = sum_k w[t, k] * down_e(silu(gate_e(x[t])) * up_e(x[t])) with e = ids[t, k].

    Two halves, so the caller can do other work while the experts run (the decode step overlaps
    one micro-batch's attention with the other's experts): submit() starts the layer's experts and
    returns a handle at once, wait(handle) returns the output.
    """

    def submit(self, layer_id: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        """hidden [T, H], topk_ids [T, K] int64, topk_weights [T, K] float32 -> a handle for wait()."""
        ...

    def wait(self, handle) -> torch.Tensor:
        """-> [T, H] in hidden's dtype, on hidden's device."""
        ...


class TorchExperts:
    """Reference backend: per layer, stacked weights gate/up [E, I, H] and down [E, H, I]."""

    def __init__(self, layers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
        self.layers = layers

    def submit(self, layer_id: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        return self(layer_id, hidden, topk_ids, topk_weights)  # on the device's own queue already

    def wait(self, handle: torch.Tensor) -> torch.Tensor:
        return handle

    def __call__(
        self, layer_id: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        gate, up, down = self.layers[layer_id]
        out = torch.zeros_like(hidden)
        flat_ids = topk_ids.reshape(-1)  # [T*K]
        # One Python iteration per active expert, never per token.
        for expert_id in torch.unique(flat_ids).tolist():
            token_idx, slot = torch.where(topk_ids == expert_id)
            x = hidden[token_idx]  # [n, H]
            h = F.silu(F.linear(x, gate[expert_id])) * F.linear(x, up[expert_id])  # [n, I]
            y = F.linear(h, down[expert_id]) * topk_weights[token_idx, slot, None].to(h.dtype)
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out
