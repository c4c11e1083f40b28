"""Sampling: greedy, temperature with top-k/top-p, per-request seeds that do not depend on batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hmoe.runtime.errors import HmoeError
from hmoe.runtime.sampling_params import SamplingParams, with_seed
from hmoe.workers.model.sampler import MIN_TEMPERATURE, draw_uniform, sample


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


def _reference(logits: np.ndarray, p: SamplingParams, step: int) -> int:
    """The sampling rule in float64 numpy, one row at a time: temperature, top-k, top-p, inverse CDF."""
    gen = torch.Generator().manual_seed((p.seed * 6364136223846793005 + step * 1442695040888963407 + 1) & (2**63 - 1))
    uniform = torch.rand((), generator=gen).item()
    x = logits.astype(np.float64) / p.temperature
    if p.top_k and p.top_k < x.size:
        x = np.where(x < np.sort(x)[::-1][p.top_k - 1], -np.inf, x)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if p.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_probs = probs[order]
        drop = np.cumsum(sorted_probs) - sorted_probs >= p.top_p
        probs[order[drop]] = 0.0
    cdf = np.cumsum(probs)
    return min(int(np.searchsorted(cdf, uniform * cdf[-1], side="right")), x.size - 1)


def test_batched_sampling_matches_a_float64_reference_on_random_logits():
    """Mixed rows (greedy, top-k, top-p, both) in one batch: float64 logits give the reference's tokens."""
    gen = torch.Generator().manual_seed(21)
    for trial in range(20):
        logits = torch.randn(12, 500, generator=gen, dtype=torch.float64) * 4
        params = [
            SamplingParams(
                temperature=0.0 if i % 5 == 0 else 0.3 + 0.1 * i,
                top_k=(0, 3, 40, 600)[i % 4],
                top_p=(1.0, 0.8, 0.3, 0.95)[(i + trial) % 4],
                seed=100 * trial + i,
            )
            for i in range(12)
        ]
        steps = [trial + i for i in range(12)]
        got = sample(logits, params, steps)
        want = [
            int(logits[i].argmax()) if p.temperature == 0 else _reference(logits[i].numpy(), p, steps[i])
            for i, p in enumerate(params)
        ]
        assert got == want, trial


def _contract_reference(logits: np.ndarray, p: SamplingParams, uniform: float) -> tuple[int | None, np.ndarray]:
    """float64 numpy: the token the contract picks for this uniform draw, and the cdf it inverts
    (None where top_p cuts through tied tokens, or float32 rounding may move the cut)."""
    if p.temperature < MIN_TEMPERATURE:
        return int(np.argmax(logits)), np.ones(1)
    z = (logits - logits.max()) / p.temperature
    if p.top_k and p.top_k < len(z):
        z = np.where(z < np.sort(z)[-p.top_k], -np.inf, z)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    mass_before = np.cumsum(probs[order]) - probs[order]
    keep = np.zeros(len(z), bool)
    keep[order[(mass_before < p.top_p) | (np.arange(len(z)) == 0)]] = True
    live = probs > 0
    if np.any(probs[~keep & live] == probs[keep & live].min()) or (
        p.top_p < 1 and np.min(np.abs(mass_before[1:] - p.top_p)) < 1e-5
    ):
        return None, np.ones(1)
    probs = np.where(keep, probs, 0.0)
    cdf = np.cumsum(probs)
    return int(np.searchsorted(cdf, uniform * cdf[-1], side="right")), cdf / cdf[-1]


EDGE_TEMPERATURES = [1e-300, 1e-40, 1e-8, MIN_TEMPERATURE / 2, MIN_TEMPERATURE, 1e-3, 0.7, 1.0, 5.0, 100.0]
EDGE_TOP_P = [1e-300, 1e-50, 1e-8, 0.05, 0.5, 0.9, 1.0]
EDGE_TOP_K = [0, 1, 2, 63, 64, 1000]


@pytest.mark.parametrize("temperature", EDGE_TEMPERATURES)
def test_sampler_matches_a_float64_reference_at_every_edge_value(temperature):
    """Random logits (and ones with ties and huge gaps) x every edge of top_p / top_k, at drawn uniforms."""
    rng = np.random.default_rng(int(temperature * 1e6) % 2**32)
    rows = [rng.normal(0, 3, 64), rng.normal(0, 3, 64) * 1e3, np.round(rng.normal(0, 1, 64))]
    rows.append(np.where(np.arange(64) % 7 == 0, 40.0, -40.0))  # few huge winners tied
    compared = boundary = 0
    for logits64 in rows:
        logits = torch.tensor(logits64, dtype=torch.float32)
        logits64 = logits.double().numpy()  # the same float32 values, in float64
        for top_p in EDGE_TOP_P:
            for top_k in EDGE_TOP_K:
                p = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=int(rng.integers(2**62)))
                for step in range(3):
                    got = sample(logits[None], [p], [step])[0]
                    want, cdf = _contract_reference(logits64, p, draw_uniform(p.seed, step))
                    u = draw_uniform(p.seed, step)
                    if (
                        want is None or np.min(np.abs(cdf - u)) < 1e-4
                    ):  # float32 and float64 may round a draw this close apart
                        boundary += 1
                        continue
                    assert got == want, (temperature, top_p, top_k, step, got, want)
                    compared += 1
    assert compared > 0.5 * (compared + boundary)  # the rest: top_p cutting through the rows with ties


def test_tiny_temperature_and_top_p_are_the_greedy_answer_not_the_last_id():
    """The values that once gave the last vocabulary id for every token."""
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(2))
    greedy = logits.argmax(-1).tolist()
    for kwargs in (dict(temperature=1e-40), dict(temperature=1e-300), dict(temperature=1.0, top_p=1e-50)):
        params = [SamplingParams(seed=7, **kwargs)] * 4
        assert sample(logits, params, [0, 1, 2, 3]) == greedy, kwargs


def test_a_row_without_finite_mass_falls_back_to_its_argmax():
    logits = torch.full((1, 16), float("-inf"))
    logits[0, 5] = float("nan")
    assert 0 <= sample(logits, [SamplingParams(temperature=1.0, seed=1)], [0])[0] < 16


@pytest.mark.parametrize("field", ["temperature", "top_p", "top_k", "max_tokens", "seed"])
def test_a_bool_is_not_a_number(field):
    with pytest.raises(HmoeError) as info:
        SamplingParams(**{field: True})
    assert info.value.code == "invalid_sampling" and field in str(info.value)
