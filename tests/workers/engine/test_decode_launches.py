"""Kernel launches per MoE layer of a decode step, counted with torch.profiler on the tiny models (CPU).

Counted: leaf aten ops that are not views or no-op casts (each is one kernel launch on a GPU). With
graphs, a segment (everything between two expert hand-offs) is one replay, so what the host still
launches per MoE layer and micro-batch is the replay plus the copy of the experts' output back.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from hmoe.kernels.formats import ExpertFormat
from hmoe.runtime.sampling_params import SamplingParams
from hmoe.workers.engine.decode import DecodeEngine, DecodeRequest
from hmoe.workers.experts.cpu import CpuExperts
from hmoe.workers.model.batch import ForwardBatch
from hmoe.workers.model.causal_lm import load_model
from hmoe.workers.model.kv_cache import KVPool
from hmoe.workers.model.sampler import sample
from hmoe.workers.weights.checkpoint import Checkpoint

NOT_LAUNCHES = {
    *("view", "reshape", "_reshape_alias", "as_strided", "slice", "select", "transpose", "unsqueeze", "squeeze"),
    *("expand", "split", "split_with_sizes", "t", "permute", "detach", "alias", "_unsafe_view", "narrow", "unbind"),
    *("lift_fresh", "result_type", "item", "_local_scalar_dense", "empty", "empty_strided", "contiguous"),
    *("to", "_to_copy", "resolve_conj", "resolve_neg"),
}


def launches(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()

    def counts(e) -> bool:
        return e.name.startswith("aten::") and e.name[6:] not in NOT_LAUNCHES

    return sum(counts(e) and not any(counts(c) for c in e.cpu_children) for e in prof.events())


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_a_graphed_decode_step_launches_two_things_per_moe_layer(arch, tiny_models):
    checkpoint = Checkpoint.open(tiny_models(arch, "fp32"))
    experts = CpuExperts.from_checkpoint(checkpoint, ExpertFormat("bf16"))
    model = load_model(checkpoint, "cpu", "fp32", experts=experts)
    moe_layers = len(model.config.moe_layer_ids)
    try:
        counted = {}
        for mode in ("legacy", "static"):
            kv = KVPool(model.config, 64, 4, model.dtype, torch.device("cpu"))
            engine = DecodeEngine(model, kv, max_batch=4, micro_batches=2, shm=None, mode=mode, split="always")
            params = SamplingParams(max_tokens=8, ignore_eos=True)
            for i in range(4):
                kv.reserve(f"r{i}", 5 + params.max_tokens)
                logits = model.forward(ForwardBatch.build(kv, [(f"r{i}", [3, 4, 5, 6, 7 + i], 0)]), kv)
                engine.join(DecodeRequest(f"r{i}", params, 5, -1, "", [sample(logits, [params], [0])[0]]))
            engine.step()
            # The static step runs on the experts' kernel thread, where the profiler must run to see its ops.
            counted[mode] = experts.call(launches, engine.step) if mode == "static" else launches(engine.step)
            if mode == "static":
                step = engine.static
                # What one graph holds: finish of a MoE layer through the next one's hand-off.
                counted["segment"] = launches(lambda step=step: step._segment(step.parts[0], 1, 2))
                replays: list[int] = []
                step._segment = lambda part, k, bucket, r=replays: r.append(k)  # a replay launches no op here
                counted["graphed"] = experts.call(launches, engine.step) + len(replays)
        parts = 2
        # Per step and micro-batch: 2 copies stage its rows, the last segment (norm, lm_head) is one more
        # replay; the sampler reads all logits (cat, argmax). The rest is per MoE layer and micro-batch.
        per_layer = (counted["graphed"] - parts * 3 - 2) / (moe_layers * parts)
        assert per_layer <= 2, counted  # the segment's replay and the copy of the experts' output back
        assert counted["legacy"] / (moe_layers * parts) >= 40, counted  # what it was (eager, per layer)
        assert counted["segment"] <= {"qwen3_moe": 95, "deepseek_v3": 140}[arch], counted  # eager CPU ops
    finally:
        experts.close()


def test_sampling_launches_do_not_grow_with_the_batch():
    """The sampled rows go through one batched pass; only the CPU draws (uniform_, one per row) are per row."""
    logits = torch.randn(16, 1000, generator=torch.Generator().manual_seed(0))
    params = [
        SamplingParams(temperature=0.8, top_k=(0, 20)[i % 2], top_p=(1.0, 0.9)[i % 3 == 0], seed=i) for i in range(16)
    ]

    def device_launches(rows: int) -> int:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            sample(logits[:rows], params[:rows], list(range(rows)))
        return sum(
            e.name.startswith("aten::")
            and e.name[6:] not in NOT_LAUNCHES | {"uniform_", "rand"}
            and not any(c.name.startswith("aten::") and c.name[6:] not in NOT_LAUNCHES for c in e.cpu_children)
            for e in prof.events()
        )

    assert device_launches(16) == device_launches(3) <= 40  # the per-row loop took about 18 per sampled row
