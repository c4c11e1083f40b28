"""Offline generation: prefill a prompt, then decode one token at a time from the KV cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hmoe.runtime.sampling_params import FinishReason, SamplingParams, finish_reason, kv_need, with_seed
from hmoe.workers.model.batch import ForwardBatch
from hmoe.workers.model.causal_lm import CausalLM
from hmoe.workers.model.kv_cache import KVPool
from hmoe.workers.model.sampler import sample


@dataclass(frozen=True)
class Generation:
    token_ids: tuple[int, ...]  # generated tokens only
    finish_reason: FinishReason


def generate(
    model: CausalLM,
    kv: KVPool,
    prompt_ids: list[int],
    params: SamplingParams,
    on_token: Callable[[int], None] | None = None,
    seq_id: str = "offline",
) -> Generation:
    """Generate for one prompt; KV for prompt + max_tokens is reserved up front and freed at the end."""
    if not prompt_ids:
        raise ValueError("prompt is empty")
    kv.reserve(seq_id, kv_need(len(prompt_ids), params))
    params = with_seed(params)
    out: list[int] = []
    try:
        batch = ForwardBatch.build(kv, [(seq_id, list(prompt_ids), 0)])
        while True:
            token = sample(model.forward(batch, kv), [params], [len(out)])[0]
            out.append(token)
            if on_token is not None:
                on_token(token)
            reason = finish_reason(token, len(out), params, model.config.eos_token_ids)
            if reason is not None:
                return Generation(tuple(out), reason)
            batch = ForwardBatch.build(kv, [(seq_id, [token], len(prompt_ids) + len(out) - 1)])
    finally:
        kv.free(seq_id)
