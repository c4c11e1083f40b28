"""CpuExperts called from a GPU model: pinned staging, the CUDA event and the copy back change nothing."""

from __future__ import annotations

import pytest
import torch

from hmoe.kernels.formats import ExpertFormat
from hmoe.workers.experts.cpu import CpuExperts, layer_from_torch

pytestmark = pytest.mark.gpu


def test_gpu_inputs_give_the_cpu_answer_with_micro_batches_in_flight():
    g = torch.Generator().manual_seed(0)
    experts, hidden, inter, top_k = 8, 256, 128, 4
    stacks = [
        torch.randn(experts, inter, hidden, generator=g) / 16,
        torch.randn(experts, inter, hidden, generator=g) / 16,
        torch.randn(experts, hidden, inter, generator=g) / 11,
    ]
    layer = layer_from_torch(ExpertFormat("bf16"), *stacks)
    on_cpu = CpuExperts({0: layer}, top_k)
    on_gpu = CpuExperts({0: layer}, top_k, device="cuda")
    try:
        for tokens in (1, 7, 64, 200):  # 200: more than one kernel call's worth of tokens
            xs = [torch.randn(tokens, hidden, generator=g) for _ in range(2)]
            ids = [torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)]) for _ in range(2)]
            ws = [torch.rand(tokens, top_k, generator=g) for _ in range(2)]
            handles = [on_gpu.submit(0, x.cuda(), i.cuda(), w.cuda()) for x, i, w in zip(xs, ids, ws)]  # both in flight
            for x, i, w, h in zip(xs, ids, ws, handles):
                y = on_gpu.wait(h)
                assert y.device.type == "cuda" and y.dtype == torch.float32
                assert torch.equal(y.cpu(), on_cpu(0, x, i, w)), tokens
            y16 = on_gpu(0, xs[0].cuda().bfloat16(), ids[0].cuda(), ws[0].cuda())
            assert y16.dtype == torch.bfloat16
            torch.testing.assert_close(
                y16.float().cpu(), on_cpu(0, xs[0].bfloat16().float(), ids[0], ws[0]), rtol=2e-2, atol=2e-2
            )
    finally:
        on_cpu.close()
        on_gpu.close()
