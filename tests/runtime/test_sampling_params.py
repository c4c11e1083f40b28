"""The rules spelled once in sampling_params: why a sequence ends, the KV a request needs, seeds."""

from __future__ import annotations

import pytest

from hmoe.runtime.errors import HmoeError
from hmoe.runtime.sampling_params import SamplingParams, finish_reason, kv_need, require_seed, with_seed

EOS = (256, 7)


@pytest.mark.parametrize(
    "token, n, params, reason",
    [
        (5, 1, SamplingParams(max_tokens=1), "length"),  # the first token is the last one allowed
        (5, 1, SamplingParams(max_tokens=2), None),
        (5, 2, SamplingParams(max_tokens=2), "length"),
        (256, 1, SamplingParams(max_tokens=1), "stop"),  # EOS wins over length
        (7, 3, SamplingParams(max_tokens=9), "stop"),
        (256, 1, SamplingParams(max_tokens=5, ignore_eos=True), None),
        (256, 5, SamplingParams(max_tokens=5, ignore_eos=True), "length"),
        (9, 1, SamplingParams(max_tokens=5, ignore_eos=True, stop_token_ids=(9,)), "stop"),  # stop ids still stop
        (9, 1, SamplingParams(max_tokens=5, stop_token_ids=(9,)), "stop"),
    ],
)
def test_finish_reason(token, n, params, reason):
    assert finish_reason(token, n, params, EOS) == reason


def test_kv_need_is_the_prompt_and_every_token_it_may_generate():
    assert kv_need(100, SamplingParams(max_tokens=28)) == 128
    assert kv_need(1, SamplingParams()) == 1 + SamplingParams().max_tokens


def test_seeds_are_given_where_a_request_enters_and_required_by_workers():
    sampled = SamplingParams(temperature=0.7)
    with pytest.raises(HmoeError) as info:
        require_seed(sampled)
    assert info.value.code == "invalid_sampling"
    seeded = with_seed(sampled)
    assert require_seed(seeded) is seeded and 0 <= seeded.seed < 2**63
    assert with_seed(seeded) is seeded and require_seed(SamplingParams()) == SamplingParams()  # greedy needs none
