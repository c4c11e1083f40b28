"""CpuExperts (workers/cpu_experts.py) as the model's expert backend: same greedy tokens as torch.

Tiny random checkpoints of both families, every expert format: the CPU kernels run the routed
experts; the reference is the torch backend over exactly the weights the kernels hold (decoded).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from hmoe.kernels.formats import PROJS, ExpertFormat, decode_expert
from hmoe.kernels.moe import MoeKernel
from hmoe.kernels.reference import quantize_int8_groups
from hmoe.runtime.sampling_params import SamplingParams
from hmoe.workers.experts.backend import TorchExperts
from hmoe.workers.experts.cpu import CpuExperts, layer_from_torch
from hmoe.workers.model.batch import ForwardBatch
from hmoe.workers.model.causal_lm import load_model
from hmoe.workers.model.generate import generate
from hmoe.workers.model.kv_cache import KVPool
from hmoe.workers.weights.checkpoint import Checkpoint

# (expert format, checkpoint dtype): every format, every conversion path the encoders offer.
CASES = [("bf16", "bf16"), ("fp8", "fp8"), ("fp8", "fp32"), ("int4-g32", "bf16"), ("int4-g128", "fp8")]
PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]


class KernelActivationTorchExperts(TorchExperts):
    """Torch reference reading activations as the format's kernel does: int8 per group of G inputs for
    INT4, bf16 for BF16 and FP8 (reference.moe_reference's kernel_activations)."""

    def __init__(self, layers, fmt: ExpertFormat):
        super().__init__(layers)
        self.fmt = fmt

    def _round(self, v: torch.Tensor) -> torch.Tensor:
        if self.fmt.kind in ("bf16", "fp8"):
            return v.bfloat16().to(v.dtype)
        return torch.from_numpy(quantize_int8_groups(v.double().numpy(), self.fmt.group_size)).to(v.dtype)

    def __call__(self, layer_id, hidden, topk_ids, topk_weights):
        gate, up, down = self.layers[layer_id]
        x = self._round(hidden)
        out = torch.zeros_like(hidden)
        for e in torch.unique(topk_ids).tolist():
            t, k = torch.where(topk_ids == e)
            h = torch.nn.functional.silu(x[t] @ gate[e].T) * (x[t] @ up[e].T) * topk_weights[t, k, None]
            out.index_add_(0, t, self._round(h) @ down[e].T)
        return out


def decoded_torch_experts(cpu: CpuExperts, kernel_activations: bool = False) -> TorchExperts:
    """The torch reference over the very weights the CPU kernels use (and, with kernel_activations, their
    int8 or bf16 activations)."""
    layers = {}
    for layer_id, lay in cpu.layers.items():
        stacks = [
            torch.from_numpy(
                np.stack(
                    [decode_expert(lay.fmt, lay.arrays, e, p, lay.hidden, lay.inter) for e in range(lay.num_experts)]
                )
            ).float()
            for p in PROJS
        ]
        layers[layer_id] = tuple(stacks)
    fmt = next(iter(cpu.layers.values())).fmt
    if kernel_activations:
        return KernelActivationTorchExperts(layers, fmt)
    return TorchExperts(layers)


def greedy(checkpoint, experts, n: int = 12) -> list[int]:
    model = load_model(checkpoint, "cpu", "fp32", experts=experts)
    kv = KVPool.from_budget(model.config, 1 << 24, 16, model.dtype, model.device)
    prompt = [t % model.config.vocab_size for t in PROMPT]
    return list(generate(model, kv, prompt, SamplingParams(max_tokens=n, temperature=0.0)).token_ids)


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe"])
@pytest.mark.parametrize("fmt_name,ckpt_dtype", CASES)
def test_greedy_tokens_match_torch_backend(tiny_models, arch, fmt_name, ckpt_dtype):
    checkpoint = Checkpoint.open(tiny_models(arch, ckpt_dtype))
    cpu = CpuExperts.from_checkpoint(checkpoint, ExpertFormat.parse(fmt_name), num_threads=2)
    try:
        assert greedy(checkpoint, cpu) == greedy(checkpoint, decoded_torch_experts(cpu, kernel_activations=True))
    finally:
        cpu.close()


@pytest.mark.parametrize("fmt_name", ["int4-g32", "int4-g128", "bf16", "fp8"])
def test_kernel_activations_cost_little(tiny_models, fmt_name):
    """What the kernels' activations (int8 for INT4, bf16 for BF16 and FP8) cost against float32 ones on the
    same weights: logits stay close."""
    checkpoint = Checkpoint.open(tiny_models("deepseek_v3", "bf16"))
    cpu = CpuExperts.from_checkpoint(checkpoint, ExpertFormat.parse(fmt_name), num_threads=2)
    logits = []
    for experts in (cpu, decoded_torch_experts(cpu)):
        model = load_model(checkpoint, "cpu", "fp32", experts=experts)
        kv = KVPool.from_budget(model.config, 1 << 24, 16, model.dtype, model.device)
        kv.reserve("s", len(PROMPT))
        logits.append(model.forward(ForwardBatch.build(kv, [("s", PROMPT, 0)]), kv, all_logits=True))
    cpu.close()
    rel = ((logits[0] - logits[1]).norm() / logits[1].norm()).item()
    print(f"{fmt_name}: the kernel's activations move the logits by {rel:.2e} (relative L2)")
    assert rel < 0.02


def test_layer_outputs_match_and_submit_overlaps(tiny_models):
    """Per call: CPU kernels vs torch on the same decoded weights; two calls in flight at once."""
    checkpoint = Checkpoint.open(tiny_models("qwen3_moe", "bf16"))
    cpu = CpuExperts.from_checkpoint(checkpoint, ExpertFormat("bf16"), num_threads=2)
    ref = decoded_torch_experts(cpu, kernel_activations=True)
    c = checkpoint.config
    layer_id = c.moe_layer_ids[0]
    g = torch.Generator().manual_seed(0)
    calls = []
    for tokens in (1, 5, 300):  # 300 > MAX_TOKENS: chunked
        x = torch.randn(tokens, c.hidden_size, generator=g)
        ids = torch.stack([torch.randperm(c.num_experts, generator=g)[: c.num_experts_per_tok] for _ in range(tokens)])
        w = torch.rand(tokens, c.num_experts_per_tok, generator=g)
        calls.append((x, ids, w, cpu.submit(layer_id, x, ids, w)))
    for x, ids, w, handle in calls:
        got, want = cpu.wait(handle), ref(layer_id, x, ids, w)
        assert got.dtype == x.dtype and got.shape == x.shape
        # bf16 activations: an element of h whose float32 and float64 values round apart moves by one bf16 step
        assert ((got - want).norm() / want.norm()).item() < 1e-4
    bf = cpu(layer_id, calls[1][0].bfloat16(), calls[1][1], calls[1][2])
    assert bf.dtype == torch.bfloat16
    cpu.close()


def test_layer_from_stacked_torch_weights():
    g = torch.Generator().manual_seed(1)
    gate, up = (torch.randn(4, 128, 256, generator=g) * 0.1 for _ in range(2))
    down = torch.randn(4, 256, 128, generator=g) * 0.1
    for fmt in ("bf16", "fp8", "int4-g32"):
        layer = layer_from_torch(ExpertFormat.parse(fmt), gate.bfloat16(), up.bfloat16(), down.bfloat16())
        back = torch.from_numpy(decode_expert(layer.fmt, layer.arrays, 2, "down", 256, 128)).float()
        assert (back - down[2]).abs().max() < {"bf16": 2e-3, "fp8": 0.03, "int4-g32": 0.06}[fmt]
    codes = (gate / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn)
    scales = torch.full((4, 1, 2), 0.01)
    layer = layer_from_torch(
        ExpertFormat("fp8"),
        codes,
        codes,
        (down / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn),
        scales=(scales, scales, torch.full((4, 2, 1), 0.01)),
    )
    back = torch.from_numpy(decode_expert(layer.fmt, layer.arrays, 1, "gate", 256, 128)).float()
    assert torch.equal(back, codes[1].float() * 0.01)


def test_backend_is_chosen_per_forward(tiny_models):
    """One model, built once: each forward runs its routed experts on the backend it is handed."""
    checkpoint = Checkpoint.open(tiny_models("deepseek_v3", "bf16"))
    cpu = CpuExperts.from_checkpoint(checkpoint, ExpertFormat("bf16"), num_threads=2)
    model = load_model(checkpoint, "cpu", "fp32", experts=decoded_torch_experts(cpu, kernel_activations=True))
    kv = KVPool.from_budget(model.config, 1 << 24, 16, model.dtype, model.device)
    silent = TorchExperts({k: tuple(torch.zeros_like(w) for w in ws) for k, ws in model.experts.layers.items()})
    logits = {}
    try:
        for name, experts in (("default", None), ("cpu", cpu), ("silent", silent)):
            kv.reserve(name, len(PROMPT))
            logits[name] = model.forward(ForwardBatch.build(kv, [(name, PROMPT, 0)]), kv, True, experts=experts)
    finally:
        cpu.close()
    torch.testing.assert_close(logits["cpu"], logits["default"], rtol=1e-4, atol=1e-4)
    assert (logits["silent"] - logits["default"]).abs().max() > 1e-2  # the experts handed in did run


def _small_layer():
    g = torch.Generator().manual_seed(2)
    gate, up = (torch.randn(4, 128, 128, generator=g) * 0.1 for _ in range(2))
    return layer_from_torch(ExpertFormat("bf16"), gate, up, torch.randn(4, 128, 128, generator=g) * 0.1)


def test_every_kernel_region_starts_on_the_expert_thread(monkeypatch):
    """Warm-up and calls run on the one expert thread: a second thread starting parallel regions would bring
    a second OpenMP team onto the same cores (hmoe/workers/__init__.py has the numbers)."""
    seen = []  # (method, thread)

    def spy(name: str):
        original = getattr(MoeKernel, name)

        def method(self, *args, **kwargs):
            seen.append((name, threading.get_ident()))
            return original(self, *args, **kwargs)

        return method

    for name in ("warm_up", "run"):
        monkeypatch.setattr(MoeKernel, name, spy(name))
    cpu = CpuExperts({0: _small_layer()}, top_k=2, num_threads=2)
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(3)])
    out = cpu(0, torch.randn(3, 128, generator=g), ids, torch.rand(3, 2, generator=g))
    expert_thread = cpu._thread.ident
    cpu.close()
    assert out.shape == (3, 128) and out.abs().sum() > 0
    assert {name for name, _ in seen} == {"warm_up", "run"}
    assert {thread for _, thread in seen} == {expert_thread} != {threading.get_ident()}


def test_a_call_runs_on_the_kernel_thread_its_error_reaches_the_caller_and_the_thread_serves_on():
    cpu = CpuExperts({0: _small_layer()}, top_k=2, num_threads=2)
    g = torch.Generator().manual_seed(4)
    x, ids = torch.randn(3, 128, generator=g), torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(3)])
    w = torch.rand(3, 2, generator=g)
    try:
        before = cpu(0, x, ids, w)
        assert cpu.call(threading.get_ident) == cpu._thread.ident != threading.get_ident()
        assert cpu.call(cpu.call, lambda a, b: a + b, 2, 3) == 5  # from the kernel thread itself: inline
        with pytest.raises(ZeroDivisionError):
            cpu.call(lambda: 1 / 0)
        with pytest.raises(RuntimeError, match="kernel thread"):
            cpu.run_staged(0, 0, 3, torch.zeros(3, 128))
        assert torch.equal(cpu(0, x, ids, w), before)  # the thread survived both and still serves

        def staged_on_the_thread():  # the decode step's path: stage, mark, run there, copy out
            cpu.stage(1, x, ids, w)
            cpu.staged(1)
            out = torch.full((3, 128), float("nan"))
            cpu.run_staged(1, 0, 3, out)
            return out

        assert torch.equal(cpu.call(staged_on_the_thread), before)
    finally:
        cpu.close()


def test_a_failed_warm_up_is_raised_by_the_constructor(monkeypatch):
    def broken(self, formats):
        raise RuntimeError("no code generator for this CPU")

    monkeypatch.setattr(MoeKernel, "warm_up", broken)
    with pytest.raises(RuntimeError, match="no code generator"):
        CpuExperts({0: _small_layer()}, top_k=2, num_threads=2)
