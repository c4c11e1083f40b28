"""Token sampling: greedy, or temperature with top-k and top-p.

Shapes: B sequences, V vocab. The random draw for a request's n-th token is seeded by
(seed, n) alone, so a request samples the same tokens alone or batched, in one process or split
between the prefill and the decode worker; no generator state travels between them. The draw is
one uniform number from a CPU generator, inverted through the distribution on the logits' device:
CUDA's generator (Philox) would pick other tokens than the CPU's for the same seed.
"""

from __future__ import annotations

import torch

from hmoe.runtime.sampling_params import SamplingParams

_MIX_A, _MIX_B, _MASK = 6364136223846793005, 1442695040888963407, (1 << 63) - 1


def sample(logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> list[int]:
    """logits [B, V] float32 -> one token id per row; steps[i] is how many tokens row i already made."""
    tokens = logits.argmax(dim=-1)  # [B]
    for row, (p, step) in enumerate(zip(params, steps)):
        if p.temperature > 0:
            gen = torch.Generator().manual_seed((p.seed * _MIX_A + step * _MIX_B + 1) & _MASK)
            tokens[row] = _sample_row(logits[row], p, torch.rand((), generator=gen).item())
    return tokens.tolist()  # the step's one host sync


def _sample_row(logits: torch.Tensor, p: SamplingParams, uniform: float) -> torch.Tensor:
    """logits [V] and a uniform draw in [0, 1) -> token id (0-d tensor), never syncing with the host."""
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    cdf = probs.cumsum(-1)  # [V]
    target = torch.full((1,), uniform, dtype=cdf.dtype, device=cdf.device) * cdf[-1]
    return torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)[0]
