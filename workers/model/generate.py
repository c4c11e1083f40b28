"""Offline generation: prefill a prompt, then decode one token at a time from the KV cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hmoe.runtime.sampling_params import SamplingParams, with_seed
from hmoe.workers.model.batch import ForwardBatch
from hmoe.workers.model.causal_lm import CausalLM
from hmoe.workers.model.kv_cache import KVPool
from hmoe.workers.model.sampler import sample


@dataclass(frozen=True)
class Generation:
    token_ids: tuple[int, ...]  # generated tokens only
    finish_reason: str  # "stop" | "length"


def stop_reason(token_id: int, num_generated: int, params: SamplingParams, eos_ids: tuple[int, ...]) -> str | None:
    """Why a sequence ends after emitting token_id as its num_generated-th token, or None."""
    if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in eos_ids):
        return "stop"
    if num_generated >= params.max_tokens:
        return "length"
    return None


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
    kv.reserve(seq_id, len(prompt_ids) + params.max_tokens)
    params = with_seed(params)
    out: list[int] = []
    try:
        batch = ForwardBatch.build(kv, [(seq_id, list(prompt_ids), 0)])
        while True:
            token = sample(model.forward(batch, kv), [params], [len(out)])[0]
            out.append(token)
            if on_token is not None:
                on_token(token)
            reason = stop_reason(token, len(out), params, model.config.eos_token_ids)
            if reason is not None:
                return Generation(tuple(out), reason)
            batch = ForwardBatch.build(kv, [(seq_id, [token], len(prompt_ids) + len(out) - 1)])
    finally:
        kv.free(seq_id)
