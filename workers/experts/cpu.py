"""CpuExperts: the routed experts of every MoE layer on the CPU kernels (hmoe.kernels), as an ExpertBackend.

Shapes: T tokens, K experts per token, E experts, H hidden, I expert intermediate.

The layers are `LayerExperts` (kernels/formats.py): zero-copy views into a weight pack
(`from_source`), or arrays encoded here from checkpoint weights (`from_checkpoint`, `layer_from_torch`).
`submit()` copies the inputs into one of a few staging slots made once (pinned buffers and CUDA events
when the model is on a GPU) and hands the call to one kernel thread; the kernel releases the GIL, so
the caller keeps launching GPU work meanwhile. `wait()` returns the output on the caller's device and
dtype. The decode step runs on the kernel thread whole (`call`) and uses the same slots through
stage/staged/run_staged: each layer's kernels start on the thread that saw the GPU's inputs land, so
no thread wakes another between two segments.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from hmoe.kernels.formats import PROJS, ExpertFormat, LayerExperts, encode_expert, proj_shape
from hmoe.kernels.moe import MoeKernel

NUM_SLOTS = 4  # calls in flight at once: two micro-batches need two, with room for prefill's
MAX_TOKENS = 128  # tokens per kernel call; longer inputs run in chunks of this many


@dataclass(eq=False)
class _Slot:
    """One call's staging, made once: pinned inputs and output (GPU callers), the events that order them
    against the device, and what the kernel thread runs next."""

    x: torch.Tensor  # f32 [MAX_TOKENS, H], pinned for a GPU caller
    ids: torch.Tensor  # i64 [MAX_TOKENS, K]
    weights: torch.Tensor  # f32 [MAX_TOKENS, K]
    out: torch.Tensor  # f32 [MAX_TOKENS, H]
    ready: torch.cuda.Event | None  # the input copies have landed
    consumed: torch.cuda.Event | None  # the output was copied out: the kernel may overwrite it
    done: threading.Event = field(default_factory=threading.Event)
    busy: bool = False
    sync: bool = False  # wait for the events before running (staged GPU inputs)
    job: tuple | None = None  # (layer, x, ids, w, out) numpy views for the kernel thread
    result: torch.Tensor | None = None  # the generic path's output (CPU callers)
    error: BaseException | None = None
    device: torch.device | None = None
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        self.x_np, self.ids_np, self.w_np, self.out_np = (t.numpy() for t in (self.x, self.ids, self.weights, self.out))

    def wait_for_device(self) -> None:
        """Until the input copies from the GPU have landed and the last output was copied out of the slot."""
        self.ready.synchronize()
        self.consumed.synchronize()


@dataclass(eq=False)
class _Call:
    """A function the kernel thread runs for another thread (CpuExperts.call), on the caller's stream."""

    fn: Callable
    args: tuple
    stream: torch.cuda.Stream | None
    done: threading.Event = field(default_factory=threading.Event)
    result: object = None
    error: BaseException | None = None


class CpuExperts:
    """ExpertBackend over `layers` ({layer_id: LayerExperts}, one shape for all), on `num_threads` cores.

    Two ways in. The contract (`submit`/`wait`) works for any input. The decode step's static path
    runs on the kernel thread (`call(step, ...)`) and splits a call so a CUDA graph can hold the device
    half: `stage(slot, ...)` only enqueues copies into the slot's pinned buffers (capturable),
    `staged(slot)` marks them in the stream, `run_staged(slot, layer, n, into)` waits for them, runs the
    kernels there and then enqueues the output's copy into a device buffer. Nothing is allocated, no
    event created and no thread woken per layer.
    """

    max_stage_rows = MAX_TOKENS  # the most rows stage() takes (a decode micro-batch's bucket)

    def __init__(
        self,
        layers: dict[int, LayerExperts],
        top_k: int,
        num_threads: int | None = None,
        device: torch.device | str = "cpu",
    ):
        """`device`: where the callers' tensors live; on a GPU the slots are pinned and the kernel thread
        uses that device (it replays the decode step's graphs)."""
        first = next(iter(layers.values()))
        assert all((lay.hidden, lay.inter) == (first.hidden, first.inter) for lay in layers.values())
        self.layers, self.top_k = layers, top_k
        self.hidden = first.hidden
        self.kernel = MoeKernel(first.hidden, first.inter, MAX_TOKENS, top_k, num_threads)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.slots = [self._slot(self.device.type == "cuda") for _ in range(NUM_SLOTS)]
        # One kernel thread: MoeKernel's scratch serves one call at a time, and calls run in launch order.
        # Every parallel region of the kernels starts from it, warm-up included, so the process holds one
        # OpenMP team for them (a second master thread would bring a second team onto the same cores).
        self._queue: deque[_Slot | _Call] = deque()  # what the kernel thread runs next, in order
        self._pending = threading.Semaphore(0)
        self._closed = False
        self._thread = threading.Thread(target=self._serve, args=(first.fmt,), name="cpu-experts", daemon=True)
        self._warmed, self._warm_error = threading.Event(), None
        self._thread.start()
        self._warmed.wait()
        if self._warm_error is not None:
            raise self._warm_error

    def _slot(self, pin: bool) -> _Slot:
        h, k = self.hidden, self.top_k
        return _Slot(
            torch.zeros(MAX_TOKENS, h, dtype=torch.float32, pin_memory=pin),
            torch.zeros(MAX_TOKENS, k, dtype=torch.int64, pin_memory=pin),
            torch.zeros(MAX_TOKENS, k, dtype=torch.float32, pin_memory=pin),
            torch.zeros(MAX_TOKENS, h, dtype=torch.float32, pin_memory=pin),
            torch.cuda.Event() if pin else None,
            torch.cuda.Event() if pin else None,
        )

    @classmethod
    def from_source(cls, source, device: torch.device | str = "cpu", num_threads: int | None = None) -> CpuExperts:
        """Every MoE layer of a weight pack (PackSource.layer_experts: zero-copy views)."""
        c = source.config
        layers = {layer_id: source.layer_experts(layer_id) for layer_id in c.moe_layer_ids}
        return cls(layers, c.num_experts_per_tok, num_threads, device)

    @classmethod
    def from_checkpoint(
        cls, source, fmt: ExpertFormat, device: torch.device | str = "cpu", num_threads: int | None = None
    ) -> CpuExperts:
        """Every MoE layer of a checkpoint, encoded into `fmt` in memory (encode_layers)."""
        layers = encode_layers(source, fmt)
        return cls(layers, source.config.num_experts_per_tok, num_threads, device)

    # -- the static path (decode graphs) ----------------------------------------------------------

    def call(self, fn: Callable, *args):
        """fn(*args) on the kernel thread, after the calls launched before it; its result, or its error raised.

        The decode step runs there whole. Each MoE layer's kernels then start on the thread that waited
        for the layer's inputs, and the next segment is launched by the thread that ran them: before, two
        threads woke each other twice per layer and micro-batch (~55 us per MoE layer on the H200 box,
        device part minus its graphs alone, bench/results/decode-h200.json)."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        c = _Call(fn, args, torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None)
        self._enqueue(c)
        c.done.wait()
        if c.error is not None:
            raise c.error
        return c.result

    def stage(self, slot: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        """Enqueue the copies of a GPU call's inputs ([T <= MAX_TOKENS] rows) into slot's pinned buffers."""
        s, n = self.slots[slot], hidden.shape[0]
        s.x[:n].copy_(hidden.to(torch.float32), non_blocking=True)
        s.ids[:n].copy_(topk_ids, non_blocking=True)
        s.weights[:n].copy_(topk_weights.to(torch.float32), non_blocking=True)

    def staged(self, slot: int) -> None:
        """Mark the copies stage() enqueued so far (after the segment that staged them is launched)."""
        s = self.slots[slot]
        if s.ready is not None:
            s.ready.record()

    def run_staged(self, slot: int, layer_id: int, num_tokens: int, into: torch.Tensor) -> None:
        """On the kernel thread (inside `call`): once the staged copies have landed, the layer's experts on
        slot's first num_tokens rows; then the copy of the output into the device buffer `into`
        (float32 [>= num_tokens, H]) is enqueued."""
        if threading.current_thread() is not self._thread:
            raise RuntimeError("run_staged runs on the kernel thread: call it inside CpuExperts.call")
        s, n = self.slots[slot], num_tokens
        if s.busy:
            raise RuntimeError(f"expert slot {slot} is in use by a submitted call")
        if s.ready is not None:
            s.wait_for_device()
        self._run_chunks(self.layers[layer_id], s.x_np[:n], s.ids_np[:n], s.w_np[:n], s.out_np[:n])
        into.copy_(s.out[: into.shape[0]], non_blocking=True)
        if s.consumed is not None:
            s.consumed.record()

    # -- the ExpertBackend contract ----------------------------------------------------------------

    def submit(self, layer_id: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> _Slot:
        """Start the layer's routed experts on the kernel thread; returns at once.

        CPU inputs already float32/int64 and contiguous are used in place (no copy): the caller leaves
        them untouched until wait(). GPU inputs go through a free slot's pinned staging.
        """
        num_tokens = hidden.shape[0]
        layer = self.layers[layer_id]
        on_gpu = hidden.device.type == "cuda"
        # More than NUM_SLOTS calls in flight is a caller bug: fail loudly.
        s = next((s for s in reversed(self.slots) if not s.busy), None)
        if s is None:
            raise RuntimeError(f"more than {NUM_SLOTS} expert calls in flight")
        s.device, s.dtype = hidden.device, hidden.dtype
        if num_tokens > MAX_TOKENS or not on_gpu:
            x, ids, w = _f32_cpu(hidden), topk_ids.to("cpu", torch.int64).contiguous(), _f32_cpu(topk_weights)
            s.result = torch.empty(num_tokens, self.hidden, dtype=torch.float32, pin_memory=on_gpu)
            self._start(s, (layer, x.numpy(), ids.numpy(), w.numpy(), s.result.numpy()), ready=False)
            return s
        self.stage(self.slots.index(s), hidden, topk_ids, topk_weights)
        s.result = None
        s.ready.record()
        n = num_tokens
        self._start(s, (layer, s.x_np[:n], s.ids_np[:n], s.w_np[:n], s.out_np[:n]))
        return s

    def wait(self, handle: _Slot) -> torch.Tensor:
        """[T, H] in the submitted hidden's dtype, on its device."""
        n = handle.job[1].shape[0]
        self._finish(handle)
        out = handle.result if handle.result is not None else handle.out[:n]
        if handle.device.type == "cpu" and handle.dtype == torch.float32:
            return out
        y = out.to(handle.device, handle.dtype, non_blocking=True)
        if handle.consumed is not None and handle.result is None:
            handle.consumed.record()
        return y

    def __call__(
        self, layer_id: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        return self.wait(self.submit(layer_id, hidden, topk_ids, topk_weights))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pending.release()
            self._thread.join()

    # -- the kernel thread -------------------------------------------------------------------------

    def _start(self, s: _Slot, job: tuple, ready: bool = True) -> None:
        s.busy, s.error, s.job = True, None, job
        s.sync = ready and s.ready is not None
        s.done.clear()
        self._enqueue(s)

    def _enqueue(self, item: _Slot | _Call) -> None:
        self._queue.append(item)
        self._pending.release()

    def _finish(self, s: _Slot) -> _Slot:
        s.done.wait()
        s.busy = False
        if s.error is not None:
            raise s.error
        return s

    def _serve(self, fmt: ExpertFormat) -> None:
        try:
            self.kernel.warm_up(formats=(fmt,))  # compiled (or loaded from the cache) before the first call
        except BaseException as exc:  # raised by __init__
            self._warm_error = exc
        self._warmed.set()
        if self._warm_error is not None:
            return
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # the decode step's graphs replay from here
        while True:
            self._pending.acquire()
            if self._closed and not self._queue:
                return
            s = self._queue.popleft()
            if isinstance(s, _Call):
                self._run_call(s)
                continue
            try:
                if s.sync:
                    s.wait_for_device()
                self._run_chunks(*s.job)
            except BaseException as exc:  # handed to the caller of collect/wait
                s.error = exc
            s.done.set()

    @staticmethod
    def _run_call(c: _Call) -> None:
        try:
            if c.stream is None:
                c.result = c.fn(*c.args)
            else:
                with torch.cuda.stream(c.stream):
                    c.result = c.fn(*c.args)
        except BaseException as exc:  # raised by call() in the caller's thread
            c.error = exc
        c.done.set()

    def _run_chunks(self, layer: LayerExperts, x_np, ids_np, w_np, out_np) -> None:
        """The kernel on numpy arrays (GIL released inside), MAX_TOKENS at a time."""
        for lo in range(0, x_np.shape[0], MAX_TOKENS):
            hi = min(x_np.shape[0], lo + MAX_TOKENS)
            self.kernel.run(x_np[lo:hi], ids_np[lo:hi], w_np[lo:hi], layer, out_np[lo:hi])


def encode_layers(source, fmt: ExpertFormat) -> dict[int, LayerExperts]:
    """Every MoE layer of a checkpoint (anything with .config/.raw/.is_fp8), encoded into `fmt` in memory.
    FP8 checkpoints stay FP8 when fmt is fp8 (codes copied, no rounding); anything converts to anything."""
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
    return layers


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
