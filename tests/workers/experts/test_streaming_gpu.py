"""StreamingExperts on the GPU: copy stream, events, on-device dequantization and grouped GEMMs in bf16,
against kernels/reference.py in every format, and from a pinned pack against the same code on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_streaming import FORMATS, random_inputs, random_layer

from hmoe.kernels.formats import ExpertFormat, padded
from hmoe.kernels.reference import moe_reference
from hmoe.workers.experts.dequant import dequantize_eager, kernel_takes
from hmoe.workers.experts.streaming import StreamingExperts

pytestmark = pytest.mark.gpu


def relative_error(got: torch.Tensor, want: np.ndarray) -> float:
    return float(np.linalg.norm(got.double().cpu().numpy() - want) / np.linalg.norm(want))


@pytest.mark.parametrize("scratch_experts", [0, 3], ids=["whole-layer", "3-experts-at-a-time"])
@pytest.mark.parametrize("fmt_name", FORMATS)
def test_gpu_layers_match_the_reference_in_every_format(fmt_name, scratch_experts):
    g = torch.Generator().manual_seed(0)
    fmt, experts, hidden, inter, top_k = ExpertFormat.parse(fmt_name), 8, 256, 128, 3
    layers = {layer_id: random_layer(fmt, g, experts, hidden, inter) for layer_id in (1, 2, 4)}
    streaming = StreamingExperts(layers, top_k, "cuda", torch.bfloat16, 2, scratch_experts=scratch_experts)
    stream_pass = streaming.open_pass()
    for layer_id, layer in layers.items():
        chunks = [random_inputs(g, tokens, hidden, experts, top_k) for tokens in (40, 300)]
        handles = [stream_pass.submit(layer_id, x.cuda().bfloat16(), i.cuda(), w.cuda()) for x, i, w in chunks]
        for (x, ids, w), handle in zip(chunks, handles):
            got = stream_pass.wait(handle)
            assert got.device.type == "cuda" and got.dtype == torch.bfloat16
            want = moe_reference(x.bfloat16().double().numpy(), ids.numpy(), w.numpy(), layer)
            assert relative_error(got, want) < 1e-2, (fmt_name, layer_id)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("fmt_name", FORMATS)
def test_the_dequantization_kernel_equals_the_eager_form_bit_for_bit(fmt_name, dtype):
    """Every group of a layer dequantized 3 of 8 experts at a time (views into the scratch, gate and up
    halves of one tensor), by the Triton kernel, against the eager form on the same slot."""
    g = torch.Generator().manual_seed(3)
    fmt, inter = ExpertFormat.parse(fmt_name), 200  # pads to 256
    streaming = StreamingExperts({0: random_layer(fmt, g, 8, 384, inter)}, 2, "cuda", dtype, 1, scratch_experts=3)
    slot = streaming.ring[0]
    streaming.copy_layer(0, slot)
    torch.cuda.synchronize()
    ip = padded(inter)
    for first in (0, 3, 6):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            gate_up, down = (t.clone() for t in streaming.dequantize(slot, first))
        if kernel_takes(gate_up, fmt):
            assert any("_dequant_kernel" in e.key for e in prof.key_averages()), "the eager form ran"
        n = gate_up.shape[0]
        want_gate_up, want_down = torch.full_like(gate_up, float("nan")), torch.full_like(down, float("nan"))
        for proj, dst in (("gate", want_gate_up[:, :ip]), ("up", want_gate_up[:, ip:]), ("down", want_down)):
            scale = slot.arrays.get(f"{proj}_scale")
            scale = None if scale is None else scale[first : first + n]
            dequantize_eager(dst, slot.arrays[proj][first : first + n], scale, fmt)
        assert not gate_up.isnan().any()
        assert torch.equal(gate_up, want_gate_up) and torch.equal(down, want_down), (fmt_name, first)


def test_a_pinned_pack_streams_what_the_cpu_computes(tiny_models, shm_config):
    from hmoe.workers.weights.pack_loader import load_pack
    from hmoe.workers.weights.pack_source import PackSource

    pack, _ = load_pack(tiny_models("qwen3_moe", "fp8"), name="s", config=shm_config)
    pack.close()
    with PackSource.attach("s", shm_config) as source:
        source.pin()
        c = source.config
        on_gpu = StreamingExperts.from_source(source, "cuda", torch.bfloat16, ring_layers=1)
        on_cpu = StreamingExperts.from_source(source, "cpu", torch.float32, ring_layers=1)
        assert all(t.is_pinned() for t in on_gpu.sources[c.moe_layer_ids[0]].values())
        g = torch.Generator().manual_seed(1)
        passes = on_gpu.open_pass(), on_cpu.open_pass()
        for layer_id in c.moe_layer_ids:
            x, ids, w = random_inputs(g, 64, c.hidden_size, c.num_experts, c.num_experts_per_tok)
            got = passes[0](layer_id, x.cuda().bfloat16(), ids.cuda(), w.cuda())
            want = passes[1](layer_id, x.bfloat16().float(), ids, w)
            assert relative_error(got, want.double().numpy()) < 1e-2, layer_id
        torch.cuda.synchronize()
        del on_gpu, passes
