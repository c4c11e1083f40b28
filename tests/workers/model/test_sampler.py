"""Sampling: greedy, temperature with top-k/top-p, per-request seeds that do not depend on batching."""

from __future__ import annotations

import pytest
import torch

from hmoe.runtime.errors import HmoeError
from hmoe.runtime.sampling_params import SamplingParams, with_seed
from hmoe.workers.model.sampler import sample


def _draws(logits, params, n=2000):
    return torch.tensor([sample(logits[None], [params], [step])[0] for step in range(n)])


def test_greedy_is_argmax_per_row():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    greedy = SamplingParams()
    assert sample(logits, [greedy] * 5, [0, 3, 1, 0, 9]) == logits.argmax(-1).tolist()


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
    """The n-th token depends on (seed, n) only: batching and process boundaries do not matter."""
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(5))
    params = [
        SamplingParams(temperature=1.0, seed=11),
        SamplingParams(),
        SamplingParams(temperature=0.7, top_p=0.9, seed=4),
    ]
    alone = [[sample(logits[i : i + 1], [params[i]], [step])[0] for step in range(20)] for i in (0, 2)]
    batched = [sample(logits, params, [step, 0, step]) for step in range(20)]
    assert [row[0] for row in batched] == alone[0]
    assert [row[2] for row in batched] == alone[1]
    assert len(set(alone[0])) > 3
    other_seed = [sample(logits[:1], [SamplingParams(temperature=1.0, seed=12)], [s])[0] for s in range(20)]
    assert other_seed != alone[0]


def test_with_seed_fixes_a_seed_once():
    assert with_seed(SamplingParams(seed=5)).seed == 5
    seeded = with_seed(SamplingParams(temperature=1.0))
    assert seeded.seed is not None and with_seed(seeded) == seeded


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_tokens=0),
        dict(temperature=-1.0),
        dict(temperature=float("nan")),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(seed=-3),
        dict(stop_token_ids=(1, -2)),
        dict(stop=("",)),
        dict(max_tokens=True),
    ],
)
def test_invalid_params_raise_with_code(kwargs):
    with pytest.raises(HmoeError) as info:
        SamplingParams(**kwargs)
    assert info.value.code == "invalid_sampling" and next(iter(kwargs)) in str(info.value)
