"""Pinning a pack for the GPU: cudaHostRegister on the read-only mapping, copies from it, unregister.

GPU tests run on the GPU box (`pytest -m gpu tests/workers/weights`); here only the no-CUDA error runs.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers.shm_pack import expected, fill_pattern, small_manifest

from hmoe.shm import Pack, ShmError, build_pack
from hmoe.workers.weights.pinned import HostRegistration

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def torch_view(pack: Pack, name: str) -> torch.Tensor:
    entry = pack.entry(name)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(pack.segment.buffer(entry.offset, entry.nbytes), dtype=torch.uint8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_pinning_without_cuda_is_a_clear_error(ready_pack):
    with pytest.raises(ShmError) as err:
        HostRegistration.register(ready_pack.segment.address, ready_pack.segment.nbytes)
    assert err.value.code == "cuda_unavailable"


@pytest.mark.gpu
@needs_cuda
def test_registered_pack_is_pinned_and_copies_exactly(shm_config):
    pack, _ = build_pack(small_manifest(expert_bytes=64 << 20), fill_pattern, shm_config)
    with pack:
        view = torch_view(pack, "experts.1.w")
        assert not view.is_pinned()
        with HostRegistration.register(pack.segment.address, pack.segment.nbytes) as registration:
            assert view.is_pinned()
            on_gpu = view.to("cuda", non_blocking=True)
            torch.cuda.synchronize()
            np.testing.assert_array_equal(on_gpu.cpu().numpy(), expected(pack.entry("experts.1.w")).reshape(-1))
        assert not registration.registered and not view.is_pinned()


@pytest.mark.gpu
@needs_cuda
def test_read_only_mapping_needs_the_read_only_flag(ready_pack):
    with pytest.raises(ShmError) as err:
        HostRegistration.register(ready_pack.segment.address, ready_pack.segment.nbytes, read_only=False)
    assert err.value.code == "cuda_register_failed"
    HostRegistration.register(ready_pack.segment.address, ready_pack.segment.nbytes).unregister()


@pytest.mark.gpu
@needs_cuda
def test_a_refused_registration_leaves_cuda_usable(ready_pack):
    """A refused cudaHostRegister sets CUDA's last error; left there, it failed the next kernel launch of
    whatever ran later ("CUDA error: invalid argument": test_pack_source_pins_until_closed, after the test above)."""
    with pytest.raises(ShmError):
        HostRegistration.register(ready_pack.segment.address, ready_pack.segment.nbytes, read_only=False)
    assert (torch.arange(8, device="cuda") * 2).sum().item() == 56  # a kernel launch checks the last error


@pytest.mark.gpu
@needs_cuda
def test_pack_source_pins_until_closed(tiny_models, shm_config):
    from hmoe.workers.weights.pack_loader import load_pack
    from hmoe.workers.weights.pack_source import PackSource

    pack, _ = load_pack(tiny_models("deepseek_v3", "fp8"), name="m", config=shm_config)
    pack.close()
    source = PackSource.attach("m", shm_config)
    source.pin()
    experts = source.layer_experts(source.config.moe_layer_ids[0]).arrays["gate"]
    gate = torch.from_numpy(experts.copy())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        pinned_view = torch.from_numpy(experts)
    assert source.pinned and pinned_view.is_pinned()
    assert torch.equal(pinned_view.to("cuda", non_blocking=True).cpu(), gate)
    source.close()
    assert not source.pinned
