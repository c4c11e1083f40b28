"""CpuExperts: the routed experts of every MoE layer on the CPU kernels (hmoe.kernels), as an ExpertBackend.

Shapes: T tokens, K experts per token, E experts, H hidden, I expert intermediate.

The layers are `LayerExperts` (kernels/formats.py): zero-copy views into a weight pack
(`from_source`), or arrays encoded here from checkpoint weights (`from_checkpoint`, `layer_from_torch`).
`submit()` copies the inputs into one of a few staging slots (pinned when the model is on a GPU) and
hands the call to one kernel thread; the kernel releases the GIL, so the caller keeps launching
GPU work meanwhile. `wait()` returns the output on the caller's device and dtype.
"""

from __future__ import annotations

import queue
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from hmoe.kernels.formats import PROJS, ExpertFormat, LayerExperts, encode_expert, proj_shape
from hmoe.kernels.moe import MoeKernel

NUM_SLOTS = 4  # calls in flight at once: two micro-batches need two, with room for prefill's
MAX_TOKENS = 128  # tokens per kernel call; longer inputs run in chunks of this many


@dataclass
class _Slot:
    """Pinned staging for one call's inputs from the GPU."""

    x: torch.Tensor  # f32 [MAX_TOKENS, H]
    ids: torch.Tensor  # i64 [MAX_TOKENS, K]
    weights: torch.Tensor  # f32 [MAX_TOKENS, K]


@dataclass
class _Handle:
    future: Future
    slot: _Slot | None  # staging to give back after the call (GPU inputs only)
    out: torch.Tensor  # f32 [T, H] on the CPU (pinned for a GPU caller)
    device: torch.device
    dtype: torch.dtype


class CpuExperts:
    """ExpertBackend over `layers` ({layer_id: LayerExperts}, one shape for all), on `num_threads` cores."""

    def __init__(self, layers: dict[int, LayerExperts], top_k: int, num_threads: int | None = None, pin: bool = False):
        first = next(iter(layers.values()))
        assert all((lay.hidden, lay.inter) == (first.hidden, first.inter) for lay in layers.values())
        self.layers, self.top_k = layers, top_k
        self.hidden = first.hidden
        self.kernel = MoeKernel(first.hidden, first.inter, MAX_TOKENS, top_k, num_threads)
        self.kernel.warm_up(formats=(first.fmt,))
        # One kernel thread: MoeKernel's scratch serves one call at a time, and calls run in submit order.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpu-experts")
        self.free_slots: queue.Queue[_Slot] = queue.Queue()
        for _ in range(NUM_SLOTS if pin else 0):
            self.free_slots.put(
                _Slot(
                    *(
                        torch.empty(shape, dtype=dt, pin_memory=True)
                        for shape, dt in (
                            ((MAX_TOKENS, self.hidden), torch.float32),
                            ((MAX_TOKENS, top_k), torch.int64),
                            ((MAX_TOKENS, top_k), torch.float32),
                        )
                    )
                )
            )

    @classmethod
    def from_source(cls, source, device: torch.device | str = "cpu", num_threads: int | None = None) -> CpuExperts:
        """Every MoE layer of a weight pack (PackSource.layer_experts: zero-copy views)."""
        c = source.config
        layers = {layer_id: source.layer_experts(layer_id) for layer_id in c.moe_layer_ids}
        return cls(layers, c.num_experts_per_tok, num_threads, pin=torch.device(device).type == "cuda")

    @classmethod
    def from_checkpoint(
        cls, source, fmt: ExpertFormat, device: torch.device | str = "cpu", num_threads: int | None = None
    ) -> CpuExperts:
        """Every MoE layer of a checkpoint (anything with .config/.raw/.is_fp8), encoded into `fmt` in memory.

        FP8 checkpoints stay FP8 when fmt is fp8 (codes copied, no rounding); anything converts to anything.
        """
        c = source.config
        layers = {}
        for layer_id in c.moe_layer_ids:
            layer = LayerExperts.allocate(fmt, c.num_experts, c.hidden_size, c.moe_intermediate_size)
            for e in range(c.num_experts):
                for proj in PROJS:
                    name = f"model.layers.{layer_id}.mlp.experts.{e}.{proj}_proj.weight"
                    scale_inv = source.raw(name + "_scale_inv").float().numpy() if source.is_fp8(name) else None
                    encode_expert(fmt, layer.arrays, e, proj, _as_numpy(source.raw(name)), scale_inv)
            layers[layer_id] = layer
        return cls(layers, c.num_experts_per_tok, num_threads, pin=torch.device(device).type == "cuda")

    # -- the ExpertBackend contract ----------------------------------------------------------------

    def submit(
        self, layer_id: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> _Handle:
        """Start the layer's routed experts on the kernel thread; returns at once.

        CPU inputs already float32/int64 and contiguous are used in place (no copy): the caller leaves
        them untouched until wait(). GPU inputs go through a pinned staging slot.
        """
        num_tokens = hidden.shape[0]
        layer = self.layers[layer_id]
        on_gpu = hidden.device.type == "cuda"
        out = torch.empty(num_tokens, self.hidden, dtype=torch.float32, pin_memory=on_gpu)
        if num_tokens > MAX_TOKENS or not on_gpu:
            x, ids, w = _f32_cpu(hidden), topk_ids.to("cpu", torch.int64).contiguous(), _f32_cpu(topk_weights)
            future = self.executor.submit(self._run_chunks, layer, x, ids, w, out, None)
            return _Handle(future, None, out, hidden.device, hidden.dtype)
        slot = self.free_slots.get_nowait()  # more than NUM_SLOTS calls in flight is a caller bug: fail loudly
        x, ids, w = (t[:num_tokens] for t in (slot.x, slot.ids, slot.weights))
        x.copy_(hidden, non_blocking=True)
        ids.copy_(topk_ids, non_blocking=True)
        w.copy_(topk_weights, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        future = self.executor.submit(self._run_chunks, layer, x, ids, w, out, ready)
        return _Handle(future, slot, out, hidden.device, hidden.dtype)

    def wait(self, handle: _Handle) -> torch.Tensor:
        """[T, H] in the submitted hidden's dtype, on its device."""
        handle.future.result()
        if handle.slot is not None:
            self.free_slots.put(handle.slot)  # its inputs were consumed by the finished call
        if handle.device.type == "cpu" and handle.dtype == torch.float32:
            return handle.out
        return handle.out.to(handle.device, handle.dtype, non_blocking=True)

    def __call__(
        self, layer_id: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        return self.wait(self.submit(layer_id, hidden, topk_ids, topk_weights))

    def close(self) -> None:
        self.executor.shutdown(wait=True)

    # -- the kernel thread -------------------------------------------------------------------------

    def _run_chunks(self, layer: LayerExperts, x, ids, w, out, ready) -> None:
        """The kernel on numpy views of CPU tensors (GIL released inside), MAX_TOKENS at a time."""
        if ready is not None:
            ready.synchronize()  # the input copies from the GPU have landed
        x_np, ids_np, w_np, out_np = x.numpy(), ids.numpy(), w.numpy(), out.numpy()
        for lo in range(0, x_np.shape[0], MAX_TOKENS):
            hi = min(x_np.shape[0], lo + MAX_TOKENS)
            self.kernel.run(x_np[lo:hi], ids_np[lo:hi], w_np[lo:hi], layer, out_np[lo:hi])


def layer_from_torch(
    fmt: ExpertFormat,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> LayerExperts:
    """LayerExperts from stacked weights gate/up [E, I, H], down [E, H, I] (float32, bf16, or float8_e4m3fn
    with `scales` = the stacked weight_scale_inv [E, ceil(out/128), ceil(in/128)] of each)."""
    num_experts, inter, hidden = gate.shape
    layer = LayerExperts.allocate(fmt, num_experts, hidden, inter)
    for p, (proj, stack) in enumerate(zip(PROJS, (gate, up, down))):
        assert tuple(stack.shape[1:]) == proj_shape(proj, hidden, inter), (proj, tuple(stack.shape))
        for e in range(num_experts):
            scale_inv = scales[p][e].float().numpy() if scales is not None else None
            encode_expert(fmt, layer.arrays, e, proj, _as_numpy(stack[e]), scale_inv)
    return layer


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as encode_expert takes it: float32, uint16 (bf16 bits) or uint8 (E4M3 codes); no copy
    where possible."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy()
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy()
    return t.to(torch.float32).numpy()


def _f32_cpu(t: torch.Tensor) -> torch.Tensor:
    """The tensor itself when already CPU float32 contiguous (no copy), else a converted copy."""
    return t.to("cpu", torch.float32).contiguous()
