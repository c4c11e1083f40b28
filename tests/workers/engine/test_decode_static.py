"""The static decode path (persistent rows, paged attention, segments; graphs on a GPU) against the
legacy path (a ForwardBatch per step) on the tiny models with the CPU experts: the same tokens while
requests join and leave, greedy and sampled."""

from __future__ import annotations

import threading

import pytest
import torch

from hmoe.kernels.formats import ExpertFormat
from hmoe.runtime.sampling_params import SamplingParams
from hmoe.workers.engine.decode import DecodeEngine, DecodeRequest, SplitChooser
from hmoe.workers.experts.cpu import CpuExperts
from hmoe.workers.model.batch import ForwardBatch
from hmoe.workers.model.causal_lm import load_model
from hmoe.workers.model.decode_step import DecodeStep
from hmoe.workers.model.kv_cache import KVPool
from hmoe.workers.model.sampler import sample
from hmoe.workers.weights.checkpoint import Checkpoint


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v3"])
def tiny(request, tiny_models):
    checkpoint = Checkpoint.open(tiny_models(request.param, "fp32"))
    experts = CpuExperts.from_checkpoint(checkpoint, ExpertFormat("bf16"))
    yield checkpoint, experts
    experts.close()


def _requests():
    gen = torch.Generator().manual_seed(7)
    out = {}
    for i, (length, max_tokens) in enumerate([(1, 9), (5, 3), (17, 12), (3, 6), (30, 4), (8, 10), (2, 7)]):
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        if i % 3 == 2:
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.9, top_k=20, seed=i)
        out[f"r{i}"] = (torch.randint(2, 90, (length,), generator=gen).tolist(), params)
    return out


def decode_all(model, mode: str, device: str = "cpu", max_batch: int = 4, split="auto") -> dict[str, list[int]]:
    """Prefill every request alone, then decode: four join at once, the rest as rows free up."""
    kv = KVPool(model.config, 64, 4, model.dtype, torch.device(device))
    engine = DecodeEngine(model, kv, max_batch=max_batch, micro_batches=2, shm=None, mode=mode, split=split)
    pending = list(_requests().items())
    done: dict[str, list[int]] = {}
    while pending or engine.running:
        while pending and len(engine.running) < max_batch:
            rid, (prompt, params) = pending.pop(0)
            kv.reserve(rid, len(prompt) + params.max_tokens)
            logits = model.forward(ForwardBatch.build(kv, [(rid, prompt, 0)]), kv)
            first = sample(logits, [params], [0])[0]
            engine.join(DecodeRequest(rid, params, len(prompt), -1, "", [first]))
        running = dict(engine.running)
        engine.step()
        for rid, req in running.items():
            if rid not in engine.running:
                done[rid] = req.output
    assert kv.free_blocks == kv.num_blocks
    return done


def test_static_rows_give_the_legacy_tokens_as_requests_join_and_leave(tiny):
    checkpoint, experts = tiny
    model = load_model(checkpoint, "cpu", "fp32", experts=experts)
    legacy = decode_all(model, "legacy")
    static = decode_all(model, "static")  # "auto": one and two micro-batches alternate while it times them
    assert static == legacy
    assert decode_all(model, "static", split="always") == legacy
    assert {rid: len(t) for rid, t in static.items()} == {rid: p.max_tokens for rid, (_, p) in _requests().items()}
    assert len({t for tokens in static.values() for t in tokens}) > 5  # real continuations


def test_the_static_step_runs_whole_on_the_experts_kernel_thread(tiny, monkeypatch):
    """Segments and expert calls on one thread: nothing wakes another thread between two segments."""
    checkpoint, experts = tiny
    model = load_model(checkpoint, "cpu", "fp32", experts=experts)
    threads = set()
    for name in ("_segment", "run_staged"):
        owner = DecodeStep if name == "_segment" else CpuExperts
        original = getattr(owner, name)

        def spy(self, *args, _original=original):
            threads.add(threading.get_ident())
            return _original(self, *args)

        monkeypatch.setattr(owner, name, spy)
    assert decode_all(model, "static", split="always")
    assert threads == {experts._thread.ident}


@pytest.mark.gpu
def test_graphs_on_a_gpu_give_the_cpu_tokens(tiny):
    """fp32 on the GPU: the graphs (Triton paged attention, staged experts) pick the CPU's tokens."""
    checkpoint, _ = tiny
    cpu_model = load_model(
        checkpoint, "cpu", "fp32", experts=CpuExperts.from_checkpoint(checkpoint, ExpertFormat("bf16"))
    )
    gpu_experts = CpuExperts.from_checkpoint(checkpoint, ExpertFormat("bf16"), device="cuda")
    gpu_model = load_model(checkpoint, "cuda", "fp32", experts=gpu_experts)
    try:
        assert decode_all(gpu_model, "graphs", "cuda") == decode_all(cpu_model, "legacy")
        assert decode_all(gpu_model, "graphs", "cuda", max_batch=8) == decode_all(cpu_model, "legacy")
    finally:
        gpu_experts.close()


def test_the_split_is_timed_both_ways_then_the_faster_kept():
    chooser = SplitChooser("auto", trials=2, every=10)
    assert chooser.choose(1) is False  # one row: nothing to split
    seen = []
    for _ in range(4):
        split = chooser.choose(8)
        seen.append(split)
        chooser.record(8, split, 0.01 if split else 0.03)
    assert seen == [False, False, True, True]
    assert chooser.choose(8) is True
    for _ in range(6):
        chooser.record(8, True, 0.01)
    assert chooser.choose(8) is False  # re-timed after `every` steps of the bucket
    assert SplitChooser("never").choose(8) is False and SplitChooser("always").choose(8) is True


def test_batches_wider_than_the_expert_staging_run_the_legacy_path(tiny):
    checkpoint, experts = tiny
    model = load_model(checkpoint, "cpu", "fp32", experts=experts)
    kv = KVPool(model.config, 64, 4, model.dtype, torch.device("cpu"))
    assert DecodeEngine(model, kv, max_batch=experts.max_stage_rows, micro_batches=2, shm=None).static is not None
    assert DecodeEngine(model, kv, max_batch=experts.max_stage_rows + 1, micro_batches=2, shm=None).static is None
