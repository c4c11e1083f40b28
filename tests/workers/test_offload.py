"""OffloadedExperts: the kernel thread, staging slots and submit/wait give the host backend's answer."""

from __future__ import annotations

import pytest
import torch

from hmoe.workers.experts import TorchExperts
from hmoe.workers.offload import OffloadedExperts


def _backend(num_experts=6, hidden=32, inter=16, seed=0) -> TorchExperts:
    g = torch.Generator().manual_seed(seed)
    layers = {3: (torch.randn(num_experts, inter, hidden, generator=g), torch.randn(num_experts, inter, hidden, generator=g),
                  torch.randn(num_experts, hidden, inter, generator=g))}
    return TorchExperts(layers)


def test_two_micro_batches_in_flight_match_the_host_backend():
    host = _backend()
    offload = OffloadedExperts(host, torch.device("cpu"), hidden=32, top_k=2, max_tokens=8, slots=2)
    g = torch.Generator().manual_seed(1)
    try:
        for _ in range(5):
            xs = [torch.randn(t, 32, generator=g) for t in (3, 8)]
            ids = [torch.randint(0, 6, (t, 2), generator=g) for t in (3, 8)]
            ws = [torch.rand(t, 2, generator=g) for t in (3, 8)]
            handles = [offload.submit(3, x, i, w) for x, i, w in zip(xs, ids, ws)]  # both in flight
            for x, i, w, h in zip(xs, ids, ws, handles):
                torch.testing.assert_close(offload.wait(h), host(3, x, i, w))
    finally:
        offload.close()


def test_a_kernel_error_reaches_the_caller():
    offload = OffloadedExperts(_backend(), torch.device("cpu"), hidden=32, top_k=2, max_tokens=4)
    try:
        handle = offload.submit(99, torch.randn(2, 32), torch.zeros(2, 2, dtype=torch.int64), torch.ones(2, 2))
        try:
            offload.wait(handle)
        except KeyError:
            pass
        else:
            raise AssertionError("the error of an unknown layer was swallowed")
        # ... and the thread keeps serving.
        x, ids, w = torch.randn(1, 32), torch.tensor([[1, 4]]), torch.tensor([[0.3, 0.7]])
        torch.testing.assert_close(offload(3, x, ids, w), _backend()(3, x, ids, w))
    finally:
        offload.close()


@pytest.mark.gpu
def test_cuda_staging_round_trip():
    """On a GPU: pinned staging, the CUDA event and the copy back give the host backend's answer."""
    host = _backend()
    offload = OffloadedExperts(host, torch.device("cuda"), hidden=32, top_k=2, max_tokens=8)
    try:
        assert offload.x.is_pinned()
        x, ids, w = torch.randn(5, 32), torch.randint(0, 6, (5, 2)), torch.rand(5, 2)
        handles = [offload.submit(3, x.cuda().to(torch.bfloat16), ids.cuda(), w.cuda()) for _ in range(2)]
        for h in handles:
            y = offload.wait(h)
            assert y.device.type == "cuda" and y.dtype == torch.bfloat16
            torch.testing.assert_close(y.float().cpu(), host(3, x.to(torch.bfloat16).float(), ids, w), rtol=2e-2, atol=2e-2)
    finally:
        offload.close()
