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
    prefill_chunk_tokens: int | None = None,
    on_prefill: Callable[[int, int], None] | None = None,
) -> Generation:
    """Generate for one prompt; KV for prompt + max_tokens is reserved up front and freed at the end.
    With prefill_chunk_tokens the prompt runs in chunks of that many tokens, on_prefill(done, total) after each."""
    if not prompt_ids:
        raise ValueError("prompt is empty")
    kv.reserve(seq_id, kv_need(len(prompt_ids), params))
    params = with_seed(params)
    out: list[int] = []
    try:
        chunk = prefill_chunk_tokens or len(prompt_ids)
        for done in range(0, len(prompt_ids) - chunk, chunk):  # every chunk but the last, whose logits we sample
            model.forward(ForwardBatch.build(kv, [(seq_id, list(prompt_ids[done : done + chunk]), done)]), kv)
            if on_prefill is not None:
                on_prefill(done + chunk, len(prompt_ids))
        last = (len(prompt_ids) - 1) // chunk * chunk
        batch = ForwardBatch.build(kv, [(seq_id, list(prompt_ids[last:]), last)])
        while True:
            token = sample(model.forward(batch, kv), [params], [len(out)])[0]
            if not out and on_prefill is not None:
                on_prefill(len(prompt_ids), len(prompt_ids))
            out.append(token)
            if on_token is not None:
                on_token(token)
            reason = finish_reason(token, len(out), params, model.config.eos_token_ids)
            if reason is not None:
                return Generation(tuple(out), reason)
            batch = ForwardBatch.build(kv, [(seq_id, [token], len(prompt_ids) + len(out) - 1)])
    finally:
        kv.free(seq_id)
