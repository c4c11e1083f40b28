"""ColocatedEngine: one process that prefills and decodes, the way KTransformers and SGLang run a model
on one machine (chunked prefill): the running requests' decode steps alternate with the prompt's
chunks, one chunk through every layer between two decode steps. The worker runs it with passes of one
chunk (prefill_chunk_tokens), so a long prompt's experts cross to the GPU once per chunk, as the peers'
do, and each chunk holds back the running streams' next token. The baseline the disaggregated layout
is measured against (bench/mixed.py), and the lighter layout for a small machine (one model, one KV
pool, one set of threads instead of two competing).

A step is still one layer at most of prefill, so cancels, heartbeats and the watchdog are served
between layers; the decode step simply waits for the chunk's last layer.

The two engines are the disaggregated ones over one model and one KV pool: a prompt's KV still goes
through a hand-off slot of this process's own pool, so the router's protocol (Prefill -> Prefilled ->
Adopt) is unchanged and the worker registers once, as role "colocated" (both roles to the router).
"""

from __future__ import annotations

from hmoe.runtime import protocol
from hmoe.workers.engine.decode import DecodeEngine
from hmoe.workers.engine.prefill import PrefillEngine


class ColocatedEngine:
    def __init__(self, prefill: PrefillEngine, decode: DecodeEngine):
        self.prefill, self.decode = prefill, decode

    @property
    def busy(self) -> bool:
        return self.prefill.busy or self.decode.busy

    @property
    def awaiting_slot(self) -> bool:
        """Only a prompt waiting for a hand-off slot is left: the decode side has nothing to run either."""
        return self.prefill.awaiting_slot and not self.decode.busy

    def load(self) -> tuple[int, int]:
        (pr, pw), (dr, dw) = self.prefill.load(), self.decode.load()
        return pr + dr, pw + dw

    def request_ids(self) -> list[str]:
        return self.prefill.request_ids() + self.decode.request_ids()

    def add(self, msg: protocol.Prefill | protocol.Adopt) -> list:
        return (self.prefill if isinstance(msg, protocol.Prefill) else self.decode).add(msg)

    def cancel(self, request_id: str) -> bool:
        return self.decode.cancel(request_id) or self.prefill.cancel(request_id)

    def drop_all(self) -> None:
        self.decode.drop_all()
        self.prefill.drop_all()

    def release_unadopted(self) -> None:
        self.prefill.release_unadopted()

    def step(self) -> list:
        """One decode step between two prefill passes (chunks), else the running pass's next layer."""
        out = self.decode.step() if self.decode.busy and not self.prefill.mid_pass else []
        if self.prefill.busy:
            out += self.prefill.step()
        return out

    def close(self) -> None:
        self.decode.close()
