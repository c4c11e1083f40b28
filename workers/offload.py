"""OffloadedExperts: routed experts of a model on a GPU, computed by CPU kernels on their own thread.

Shapes: T tokens, K top-k, H hidden.

    submit:  device -> pinned host staging (x [T, H] f32, ids [T, K], weights [T, K]), non-blocking,
             then a CUDA event; the kernel thread is handed (slot, layer, T, event) and submit returns.
    thread:  waits for the event, runs the host backend (Numba kernels, GIL released) from the
             staging buffers into the slot's pinned output, signals completion.
    wait:    waits for the signal, copies the output back to the device (non-blocking).

Staging is allocated once per slot; two slots let two micro-batches be in flight (one running on
the CPU while the device computes the other's attention). A slot is reused only two submits
later, after the event that orders its previous copy-back: no buffer is overwritten in flight.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import torch

from hmoe.workers.experts import ExpertBackend


@dataclass
class _Pending:
    slot: int
    num_tokens: int
    dtype: torch.dtype
    done: threading.Event
    error: BaseException | None = None


class OffloadedExperts:
    def __init__(self, host: ExpertBackend, device: torch.device, hidden: int, top_k: int, max_tokens: int, slots: int = 2):
        self.host, self.device, self.max_tokens = host, torch.device(device), max_tokens
        pin = self.device.type == "cuda"
        self.x = torch.empty(slots, max_tokens, hidden, dtype=torch.float32, pin_memory=pin)
        self.ids = torch.empty(slots, max_tokens, top_k, dtype=torch.int64, pin_memory=pin)
        self.weights = torch.empty(slots, max_tokens, top_k, dtype=torch.float32, pin_memory=pin)
        self.out = torch.empty(slots, max_tokens, hidden, dtype=torch.float32, pin_memory=pin)
        self.next_slot = 0
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="expert-kernels", daemon=True)
        self.thread.start()

    def submit(self, layer_id: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> _Pending:
        t = hidden.shape[0]
        assert t <= self.max_tokens, f"{t} tokens exceed the staging for {self.max_tokens}"
        slot = self.next_slot
        self.next_slot = (slot + 1) % self.x.shape[0]
        self.x[slot, :t].copy_(hidden.to(torch.float32), non_blocking=True)
        self.ids[slot, :t].copy_(topk_ids, non_blocking=True)
        self.weights[slot, :t].copy_(topk_weights, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        pending = _Pending(slot, t, hidden.dtype, threading.Event())
        self.jobs.put((pending, layer_id, event))
        return pending

    def wait(self, pending: _Pending) -> torch.Tensor:
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        out = self.out[pending.slot, : pending.num_tokens]
        return out.to(self.device, non_blocking=True).to(pending.dtype)

    def __call__(self, layer_id: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return self.wait(self.submit(layer_id, hidden, topk_ids, topk_weights))

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            pending, layer_id, event = job
            s, t = pending.slot, pending.num_tokens
            try:
                if event is not None:
                    event.synchronize()  # the staging copies have landed (GIL released while waiting)
                self.out[s, :t] = self.host(layer_id, self.x[s, :t], self.ids[s, :t], self.weights[s, :t])
            except BaseException as exc:  # handed to the waiting thread, which raises it
                pending.error = exc
            pending.done.set()
