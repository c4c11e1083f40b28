"""Token sampling: greedy, or temperature with top-k and top-p, seeded per request.

Shapes: B sequences, V vocab. Each request owns its torch.Generator, so a request samples the same
tokens alone or batched with others.
"""

from __future__ import annotations

import secrets

import torch

from hmoe.runtime.sampling_params import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator(device=device).manual_seed(seed)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits [B, V] float32 -> one token id per row (one host sync for the whole batch)."""
    tokens = logits.argmax(dim=-1)  # [B]
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.temperature > 0:
            tokens[row] = _sample_row(logits[row], p, gen)
    return tokens.tolist()


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> torch.Tensor:
    """logits [V] -> token id (0-d tensor), never syncing with the host."""
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
    return torch.multinomial(probs, 1, generator=gen)[0]
