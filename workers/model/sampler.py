"""Token sampling: greedy, or temperature with top-k and top-p, numerically safe for every accepted value.

Shapes: B sequences, V vocab, R sampled rows. The random draw for a request's n-th token is seeded by
(seed, n) alone (`draw_uniform`), so a request samples the same tokens alone or batched, in one process or split
between the prefill and the decode worker; no generator state travels between them. The draw is
one uniform number from a CPU generator, inverted through the distribution on the logits' device:
CUDA's generator (Philox) would pick other tokens than the CPU's for the same seed.

Numerical contract (tests/workers/model/test_sampler.py checks it against a float64 reference):
- temperature below MIN_TEMPERATURE is greedy (1e-40 is a float32 subnormal and 1e-300 is 0 there:
  dividing by either gave NaN probabilities and the last vocabulary id);
- from MIN_TEMPERATURE up, no finite logit overflows (softmax subtracts the row max itself);
- top_k keeps at least one token (ties with the k-th are kept); top_p always keeps the most likely
  token (top_p is raised to MIN_TOP_P on the host: 1e-50 is 0 in float32, and "mass before >= 0"
  dropped even the first token);
- the draw lands on a token of non-zero probability: the uniform is capped below 1 on the host, so
  the target stays under the total mass. All three cost no device work.
"""

from __future__ import annotations

import torch

from hmoe.runtime.sampling_params import SamplingParams

MIN_TEMPERATURE = 1e-5  # below: greedy. A logit gap of 1e-3 at this temperature is a 1e-87 probability ratio
MIN_TOP_P = 1e-30  # a normal float32: "the first token's mass before it (0) >= top_p" is then never true
MAX_UNIFORM = 1.0 - 2.0**-23  # u * total rounds below total in float32
_MIX_A, _MIX_B, _MASK = 6364136223846793005, 1442695040888963407, (1 << 63) - 1


def sample(logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> list[int]:
    """logits [B, V] float32 -> one token id per row; steps[i] is how many tokens row i already made.

    The sampled rows go through one batched pass (temperature, top-k, top-p as [R] tensors), not a loop
    of per-row launches: the kernels launched per step do not grow with the batch.
    """
    tokens = logits.argmax(dim=-1)  # [B]
    rows = [i for i, p in enumerate(params) if p.temperature >= MIN_TEMPERATURE]
    if rows:
        chosen = [params[i] for i in rows]
        knobs = torch.tensor(
            [
                [p.temperature, p.top_k, max(p.top_p, MIN_TOP_P), min(draw_uniform(p.seed, steps[i]), MAX_UNIFORM)]
                for i, p in zip(rows, chosen)
            ],
            dtype=torch.float64,
        ).to(logits.device, non_blocking=True)  # [R, 4]: one transfer
        index = torch.tensor(rows, dtype=torch.int64).to(logits.device, non_blocking=True)
        max_k = max((p.top_k for p in chosen if p.top_k), default=0)
        any_top_p = any(p.top_p < 1.0 for p in chosen)
        tokens[index] = _sample_rows(logits[index], knobs, max_k, any_top_p)
    return tokens.tolist()  # the step's one host sync


def draw_uniform(seed: int, step: int) -> float:
    """The draw for a request's step-th token: (seed, step) alone decide it, on every device."""
    gen = torch.Generator().manual_seed((seed * _MIX_A + step * _MIX_B + 1) & _MASK)
    return torch.rand((), generator=gen).item()


def _sample_rows(logits: torch.Tensor, knobs: torch.Tensor, max_k: int, any_top_p: bool) -> torch.Tensor:
    """logits [R, V]; knobs [R, 4] float64 (temperature, top_k or 0, top_p, uniform) -> token ids [R]."""
    vocab = logits.shape[-1]
    knobs = knobs.to(logits.dtype)
    logits = logits / knobs[:, :1]
    if 0 < max_k:
        top_k = knobs[:, 1].long()
        kth = torch.topk(logits, min(max_k, vocab), dim=-1).values  # [R, max_k], descending
        kth = kth.gather(1, (top_k.clamp(1, min(max_k, vocab)) - 1)[:, None])  # [R, 1]
        limited = (top_k > 0) & (top_k < vocab)
        logits = logits.masked_fill(limited[:, None] & (logits < kth), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if any_top_p:
        top_p = knobs[:, 2:3]
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = (sorted_probs.cumsum(-1) - sorted_probs >= top_p) & (top_p < 1.0)
        probs = probs.scatter(1, order, sorted_probs.masked_fill(drop, 0.0))
    cdf = probs.cumsum(-1)  # [R, V]
    target = knobs[:, 3:4] * cdf[:, -1:]  # < the total (uniform <= MAX_UNIFORM): lands on a token with mass
    return torch.searchsorted(cdf, target, right=True).clamp_(max=vocab - 1)[:, 0]


def token_logprobs(logits: torch.Tensor, tokens: list[int], top_ks: list[int | None]) -> list | None:
    """logits [B, V] (those `sample` picked from) -> per row that asked (top_ks[i] not None): [the picked
    token's logprob, [[id, logprob] of the top_ks[i] most likely]]; None for the others, and None in
    all (no work at all) when no row asked. Logprobs of the model's distribution (log-softmax of the
    logits, before temperature, top-k and top-p), computed on their device; two host copies."""
    rows = [i for i, k in enumerate(top_ks) if k is not None]
    if not rows:
        return None
    logprobs = torch.log_softmax(logits[rows].float(), dim=-1)  # [R, V]
    picked = torch.tensor([tokens[i] for i in rows], device=logits.device).unsqueeze(1)  # [R, 1]
    k = max(top_ks[i] for i in rows)
    columns, ids = [logprobs.gather(1, picked)], [[] for _ in rows]  # [R, 1]
    if k:
        top = logprobs.topk(k, dim=-1)  # [R, k]
        columns.append(top.values)
        ids = top.indices.tolist()
    values = torch.cat(columns, dim=1).tolist()  # [R, 1 + k]
    out: list = [None] * len(top_ks)
    for j, i in enumerate(rows):
        out[i] = [values[j][0], [[t, v] for t, v in zip(ids[j][: top_ks[i]], values[j][1 : 1 + top_ks[i]])]]
    return out
