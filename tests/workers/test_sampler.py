"""Sampling: greedy, temperature with top-k/top-p, per-request seeds that do not depend on batching."""

from __future__ import annotations

import pytest
import torch

from hmoe.runtime.errors import HmoeError
from hmoe.runtime.sampling_params import SamplingParams
from hmoe.workers.sampler import make_generator, sample


def _draws(logits, params, n=2000):
    gen = make_generator(params, torch.device("cpu"))
    return torch.tensor([sample(logits[None], [params], [gen])[0] for _ in range(n)])


def test_greedy_is_argmax_per_row():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    greedy = SamplingParams()
    assert sample(logits, [greedy] * 5, [None] * 5) == logits.argmax(-1).tolist()


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0])
    top_k = _draws(logits, SamplingParams(temperature=1.0, top_k=3, seed=1))
    assert set(top_k.tolist()) == {0, 1, 2}
    probs = torch.softmax(logits, -1)  # 0.42, 0.26, 0.15, ... : top_p 0.6 keeps exactly the first two
    top_p = _draws(logits, SamplingParams(temperature=1.0, top_p=0.6, seed=1))
    assert set(top_p.tolist()) == {0, 1}
    frac = (top_p == 0).float().mean().item()
    assert abs(frac - probs[0] / (probs[0] + probs[1])) < 0.05


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([1.0, 0.0, -1.0])
    cold = (_draws(logits, SamplingParams(temperature=0.2, seed=3)) == 0).float().mean()
    hot = (_draws(logits, SamplingParams(temperature=5.0, seed=3)) == 0).float().mean()
    assert cold > 0.95 and 0.3 < hot < 0.5


def test_seeded_request_samples_the_same_alone_or_batched():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(temperature=1.0, seed=11), SamplingParams(), SamplingParams(temperature=0.7, top_p=0.9, seed=4)]
    alone = [[sample(logits[i:i + 1], [params[i]], [g])[0] for _ in range(20)]
             for i, g in ((0, make_generator(params[0], torch.device("cpu"))),
                          (2, make_generator(params[2], torch.device("cpu"))))]
    gens = [make_generator(p, torch.device("cpu")) for p in params]
    batched = [sample(logits, params, gens) for _ in range(20)]
    assert [row[0] for row in batched] == alone[0]
    assert [row[2] for row in batched] == alone[1]
    assert len(set(alone[0])) > 3


@pytest.mark.parametrize("kwargs", [
    dict(max_tokens=0), dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_p=0.0),
    dict(top_p=1.5), dict(top_k=-1), dict(seed=-3), dict(stop_token_ids=(1, -2)), dict(stop=("",)),
    dict(max_tokens=True),
])
def test_invalid_params_raise_with_code(kwargs):
    with pytest.raises(HmoeError) as info:
        SamplingParams(**kwargs)
    assert info.value.code == "invalid_sampling" and next(iter(kwargs)) in str(info.value)
