"""StreamingExperts on the CPU (the ring's "copy" a plain copy): every format against kernels/reference.py,
the ring's order, and layer-major prefill passes giving the CPU-kernel path's greedy tokens.

The same code runs on the GPU in test_streaming_gpu.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hmoe.kernels.formats import ExpertFormat
from hmoe.kernels.reference import moe_reference
from hmoe.workers.experts.cpu import layer_from_torch
from hmoe.workers.experts.parallel import ExpertShare, expert_shares
from hmoe.workers.experts.streaming import StreamingExperts

FORMATS = ["bf16", "fp8", "int4-g32", "int4-g128"]


def random_layer(fmt: ExpertFormat, g: torch.Generator, experts: int, hidden: int, inter: int):
    stacks = [
        torch.randn(experts, inter, hidden, generator=g) / hidden**0.5,
        torch.randn(experts, inter, hidden, generator=g) / hidden**0.5,
        torch.randn(experts, hidden, inter, generator=g) / inter**0.5,
    ]
    return layer_from_torch(fmt, *stacks)


def random_inputs(g: torch.Generator, tokens: int, hidden: int, experts: int, top_k: int):
    x = torch.randn(tokens, hidden, generator=g)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    return x, ids, torch.rand(tokens, top_k, generator=g)


@pytest.mark.parametrize("fmt_name", FORMATS)
def test_layers_match_the_reference_in_every_format(fmt_name):
    """Three layers through a ring of two, each layer's tokens in two chunks; hidden 192 pads to 256."""
    g = torch.Generator().manual_seed(0)
    fmt, experts, hidden, inter, top_k = ExpertFormat.parse(fmt_name), 8, 192, 160, 3
    layers = {layer_id: random_layer(fmt, g, experts, hidden, inter) for layer_id in (1, 2, 4)}
    streaming = StreamingExperts(layers, top_k, "cpu", torch.float32, ring_layers=2)
    stream_pass = streaming.open_pass()
    assert stream_pass.bytes_copied == 2 * streaming.layer_bytes  # the ring's two layers, copied at once
    for layer_id, layer in layers.items():
        chunks = [random_inputs(g, tokens, hidden, experts, top_k) for tokens in (5, 11)]
        handles = [stream_pass.submit(layer_id, *chunk) for chunk in chunks]
        for (x, ids, w), handle in zip(chunks, handles):
            got = stream_pass.wait(handle)
            want = moe_reference(x.numpy(), ids.numpy(), w.numpy(), layer)
            assert got.shape == x.shape and got.dtype == torch.float32
            np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-4, atol=1e-5)
    assert stream_pass.bytes_copied == 3 * streaming.layer_bytes  # each layer crossed once
    assert not stream_pass.outputs and not stream_pass.inputs  # nothing held once every chunk took its output
    stream_pass.close()


@pytest.mark.parametrize("fmt_name", FORMATS)
def test_a_layer_computed_a_few_experts_at_a_time_equals_it_whole(fmt_name):
    """A scratch of 3 of 8 experts (groups 3, 3, 2), alone and in an expert-parallel share of experts
    2..7: the same outputs as the whole layer dequantized at once."""
    g = torch.Generator().manual_seed(5)
    fmt, experts, hidden, inter, top_k = ExpertFormat.parse(fmt_name), 8, 192, 160, 3
    layers = {layer_id: random_layer(fmt, g, experts, hidden, inter) for layer_id in (0, 2)}
    for share in (None, ExpertShare(2, 8)):
        whole = StreamingExperts(layers, top_k, "cpu", torch.float32, 2, share).open_pass()
        grouped = StreamingExperts(layers, top_k, "cpu", torch.float32, 1, share, scratch_experts=3)
        assert grouped.gate_up.shape[0] == 3
        grouped_pass = grouped.open_pass()
        for layer_id in layers:
            x, ids, w = random_inputs(g, 13, hidden, experts, top_k)
            torch.testing.assert_close(grouped_pass(layer_id, x, ids, w), whole(layer_id, x, ids, w))
        assert grouped_pass.bytes_copied == len(layers) * grouped.layer_bytes  # each layer crossed once


def test_a_layer_submitted_after_it_computed_is_refused():
    g = torch.Generator().manual_seed(1)
    layer = random_layer(ExpertFormat("bf16"), g, 4, 128, 128)
    stream_pass = StreamingExperts({0: layer}, 2, "cpu", torch.float32).open_pass()
    x, ids, w = random_inputs(g, 3, 128, 4, 2)
    stream_pass.wait(stream_pass.submit(0, x, ids, w))
    with pytest.raises(AssertionError, match="not layer-major"):
        stream_pass.submit(0, x, ids, w)


def test_bf16_compute_stays_close_to_the_reference():
    g = torch.Generator().manual_seed(2)
    layer = random_layer(ExpertFormat("fp8"), g, 8, 256, 128)
    stream_pass = StreamingExperts({0: layer}, 4, "cpu", torch.bfloat16).open_pass()
    x, ids, w = random_inputs(g, 20, 256, 8, 4)
    got = stream_pass(0, x.bfloat16(), ids, w)
    want = moe_reference(x.bfloat16().double().numpy(), ids.numpy(), w.numpy(), layer)
    assert got.dtype == torch.bfloat16
    np.testing.assert_allclose(got.double().numpy(), want, rtol=3e-2, atol=3e-2)


def test_the_rings_device_memory_is_counted_and_refused_with_a_hint(tiny_models):
    from hmoe.runtime.errors import HmoeError
    from hmoe.workers.experts.streaming import (
        MIN_SCRATCH_EXPERTS,
        check_device_memory,
        pass_bytes_per_token,
        planned_device_bytes,
    )
    from hmoe.workers.weights.checkpoint import Checkpoint

    c = Checkpoint.open(tiny_models("qwen3_moe", "bf16")).config
    layer = random_layer(
        ExpertFormat("fp8"), torch.Generator().manual_seed(3), c.num_experts, c.hidden_size, c.moe_intermediate_size
    )
    need = planned_device_bytes(layer, torch.bfloat16, 2)
    stored = sum(a.nbytes for a in layer.arrays.values())
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size * 2
    assert need == 2 * stored + c.num_experts * per_expert
    assert check_device_memory(layer, c, torch.bfloat16, 2, free_bytes=1 << 40) == 0  # the whole layer

    # Short of room for the whole dequantized layer beside a pass of the longest prompt (4096 tokens here):
    # as many experts at a time as fit beside it; short of room for 8 of them, beside a pass of 256 tokens.
    def beside(tokens: int, experts: int) -> int:
        return 2 * stored + experts * per_expert + int(tokens * pass_bytes_per_token(c, torch.bfloat16) / 0.8) + 1

    assert check_device_memory(layer, c, torch.bfloat16, 2, beside(4096, c.num_experts), 4096) == 0
    assert check_device_memory(layer, c, torch.bfloat16, 2, beside(4096, 9), 4096) == 9
    assert planned_device_bytes(layer, torch.bfloat16, 2, 9) == need - 7 * per_expert
    assert check_device_memory(layer, c, torch.bfloat16, 2, beside(256, 12), 4096) == 12
    assert planned_device_bytes(layer, torch.bfloat16, 2, 12) == need - 4 * per_expert
    with pytest.raises(HmoeError) as refused:  # fewer than MIN_SCRATCH_EXPERTS fit beside 256 tokens
        check_device_memory(layer, c, torch.bfloat16, 2, beside(256, MIN_SCRATCH_EXPERTS) - 2, 4096)
    assert refused.value.code == "config_invalid" and "stream_ring_layers" in refused.value.message


def test_each_rank_sizes_its_scratch_for_its_own_share_and_free_memory(tiny_models, monkeypatch):
    """scratch_for on a GPU (its free memory faked): the share's experts are what must fit; off a GPU, 0."""
    from types import SimpleNamespace

    from hmoe.workers.experts.streaming import pass_bytes_per_token, planned_device_bytes, scratch_for
    from hmoe.workers.weights.checkpoint import Checkpoint

    c = Checkpoint.open(tiny_models("qwen3_moe", "bf16")).config
    layer = random_layer(
        ExpertFormat("fp8"), torch.Generator().manual_seed(6), c.num_experts, c.hidden_size, c.moe_intermediate_size
    )
    source = SimpleNamespace(config=c, layer_experts=lambda layer_id: layer)
    per_expert = planned_device_bytes(layer, torch.bfloat16, 0, 1)
    free = planned_device_bytes(layer, torch.bfloat16, 2, 10)  # the ring of whole layers and 10 of 16 experts
    free += int(256 * pass_bytes_per_token(c, torch.bfloat16) / 0.8) + per_expert // 2
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 1 << 40))
    assert c.num_experts == 16 and scratch_for(source, "cuda", torch.bfloat16, 2, 256) == 10
    half = ExpertShare(0, c.num_experts // 2)  # its ring is half as large: its 8 experts fit at once
    assert scratch_for(source, "cuda", torch.bfloat16, 2, 256, half) == 0
    assert scratch_for(source, "cpu", torch.bfloat16, 2, 256) == 0


@pytest.mark.parametrize("fmt_name", FORMATS)
def test_expert_shares_add_up_to_the_whole_layer(fmt_name):
    """Expert parallelism's arithmetic: three ranks' shares of 8 experts (2, 3, 3), each computing only
    its pairs, sum to what all the experts compute (the all-reduce is that sum)."""
    g = torch.Generator().manual_seed(4)
    fmt, experts, hidden, inter, top_k = ExpertFormat.parse(fmt_name), 8, 192, 160, 3
    layers = {1: random_layer(fmt, g, experts, hidden, inter), 3: random_layer(fmt, g, experts, hidden, inter)}
    shares = expert_shares(experts, 3)
    assert shares == [(0, 2), (2, 5), (5, 8)]
    passes = [StreamingExperts(layers, top_k, "cpu", torch.float32, 1, ExpertShare(*s)).open_pass() for s in shares]
    assert sum(p.owner.layer_bytes for p in passes) == StreamingExperts(layers, top_k, "cpu", torch.float32).layer_bytes
    for layer_id, layer in layers.items():
        x, ids, w = random_inputs(g, 9, hidden, experts, top_k)
        got = sum(p(layer_id, x, ids, w).double() for p in passes)
        want = moe_reference(x.numpy(), ids.numpy(), w.numpy(), layer)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)
