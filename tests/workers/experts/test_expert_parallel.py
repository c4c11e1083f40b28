"""Expert-parallel streamed prefill over real processes: two ranks on gloo, each streaming half of every
MoE layer's experts, give the one-process pass's logits and greedy token for both families and every
format; a rank that dies mid-pass is reported as rank_lost by the other, not waited for.

The ranks are spawned processes over TCP on localhost; every rank runs the same layer-major pass of the
same prompt (the worker's ranks get theirs from rank 0: test_worker_processes.py), and each writes its
last-token logits for the parent to compare.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers.net import free_port

from hmoe.kernels.formats import ExpertFormat
from hmoe.runtime.errors import HmoeError
from hmoe.workers.experts.cpu import encode_layers
from hmoe.workers.experts.parallel import ExpertShare, expert_shares
from hmoe.workers.experts.streaming import StreamingExperts
from hmoe.workers.model.batch import ForwardBatch
from hmoe.workers.model.causal_lm import load_model
from hmoe.workers.model.kv_cache import KVPool
from hmoe.workers.weights.checkpoint import Checkpoint

CHUNK = 8
PROMPT = [(5 * i + 2) % 97 for i in range(21)]  # three chunks: a pass of 8 + 8 + 5 tokens
CASES = [
    ("deepseek_v3", "bf16"),
    ("qwen3_moe", "fp8"),
    ("deepseek_v3", "int4-g32"),
    ("qwen3_moe", "int4-g128"),
]


def last_logits(path: str, fmt: str, prompt: list[int], share: ExpertShare | None) -> np.ndarray:
    """The streamed layer-major pass of `prompt` (in chunks of CHUNK) -> its last token's logits."""
    checkpoint = Checkpoint.open(path)
    model = load_model(checkpoint, "cpu", "fp32")
    kv = KVPool.from_budget(model.config, 1 << 22, 16, model.dtype, model.device)
    kv.reserve("p", len(prompt))
    batches = [ForwardBatch.build(kv, [("p", prompt[i : i + CHUNK], i)]) for i in range(0, len(prompt), CHUNK)]
    layers = encode_layers(checkpoint, ExpertFormat.parse(fmt))
    streaming = StreamingExperts(layers, model.config.num_experts_per_tok, "cpu", torch.float32, 1, share)
    return model.forward_overlapped(batches, kv, experts=streaming.open_pass())[-1][-1].numpy()


def rank_main(rank: int, port: int, cases: list[tuple[str, str]], out: str, dies: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=20)
    )
    for path, fmt in cases:
        if dies and rank == 1:
            os._exit(0)  # gone while rank 0 runs the pass: no goodbye to the group
        num_experts = Checkpoint.open(path).config.num_experts
        share = ExpertShare(*expert_shares(num_experts, 2)[rank], dist.group.WORLD)
        name = f"{Path(path).name}-{fmt}-rank{rank}"
        try:
            np.save(f"{out}/{name}.npy", last_logits(path, fmt, PROMPT, share))
        except HmoeError as exc:
            Path(f"{out}/{name}.error").write_text(exc.code)
            return
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def checkpoints(tiny_models):
    return {arch: str(tiny_models(arch, "bf16")) for arch in {arch for arch, _ in CASES}}


def test_two_ranks_prefill_as_one_process_does(checkpoints, tmp_path):
    cases = [(checkpoints[arch], fmt) for arch, fmt in CASES]
    mp.spawn(rank_main, args=(free_port(), cases, str(tmp_path), False), nprocs=2)
    for path, fmt in cases:
        whole = last_logits(path, fmt, PROMPT, None)
        for rank in (0, 1):  # the all-reduce leaves the same sums on every rank
            ranked = np.load(tmp_path / f"{Path(path).name}-{fmt}-rank{rank}.npy")
            np.testing.assert_allclose(ranked, whole, rtol=0, atol=1e-5 * np.abs(whole).max())
            assert ranked.argmax() == whole.argmax()


def test_a_rank_that_dies_mid_pass_is_reported_not_waited_for(checkpoints, tmp_path):
    cases = [(checkpoints["qwen3_moe"], "bf16")]
    mp.spawn(rank_main, args=(free_port(), cases, str(tmp_path), True), nprocs=2, join=True)
    name = f"{Path(cases[0][0]).name}-bf16-rank0"
    assert (tmp_path / f"{name}.error").read_text() == "rank_lost"
    assert not (tmp_path / f"{name}.npy").exists()
