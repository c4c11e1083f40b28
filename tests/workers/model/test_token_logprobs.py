"""token_logprobs: the picked token's logprob and the top-k alternatives, from the logits sample() used,
against a float64 numpy log-softmax on random logits."""

from __future__ import annotations

import numpy as np
import torch

from hmoe.runtime.sampling_params import SamplingParams
from hmoe.workers.model.sampler import sample, token_logprobs


def reference(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    return row - row.max() - np.log(np.exp(row - row.max()).sum())


def test_logprobs_of_picked_and_top_tokens_match_a_float64_reference():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=gen) * 4
    params = [SamplingParams(temperature=t, seed=i, logprobs=k) for i, (t, k) in enumerate(
        [(0.0, 3), (0.9, 0), (1.3, 5), (0.7, None), (0.0, 20)])]  # fmt: skip
    tokens = sample(logits, params, [0] * 5)
    got = token_logprobs(logits, tokens, [p.logprobs for p in params])
    assert got[3] is None
    for row, (p, token, entry) in enumerate(zip(params, tokens, got)):
        if p.logprobs is None:
            continue
        want = reference(logits[row].numpy())
        assert abs(entry[0] - want[token]) < 1e-5
        ids = [t for t, _ in entry[1]]
        assert len(ids) == p.logprobs and ids == list(np.argsort(-want, kind="stable")[: p.logprobs])
        assert all(abs(v - want[t]) < 1e-5 for t, v in entry[1])
    assert got[0][0] == got[0][1][0][1] and tokens[0] == got[0][1][0][0]  # greedy picks the most likely


def test_nothing_is_computed_when_no_row_asks():
    assert token_logprobs(torch.randn(3, 10), [1, 2, 3], [None, None, None]) is None
