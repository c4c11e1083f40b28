"""Adoption: one request's KV on its way from a hand-off slot into its reserved decode KV blocks, a
bounded slice per decode step, so a long prompt's copy never stalls the running streams for longer
than one slice (a 32K DeepSeek-V3 prompt is 2.3 GB of latent: ~0.3 s copied whole).

Shapes: L layers, n the prompt's tokens, W an entry's width. The slot holds each entry as [L, n, W];
the copy walks entry by entry and layer by layer, whole layers at once while they fit the budget,
else a token range of one layer, so every piece is one contiguous source range (one DMA) scattered
into the request's blocks.

On a GPU the pieces go out on the decode engine's side stream (from the segment registered with
CUDA: a DMA straight from shared memory) and overlap the step's forward; the request joins only once
the event recorded after its last piece has completed (`landed`) and the slot still holds the same
fill (`finish`; a slot reclaimed under the copy is handoff_lost for this request only). On a CPU the
pieces are plain copies, done when `copy` returns.

Lifecycle: Adoption(...) (the slot checked) -> copy(budget) per step -> landed() -> finish()
| abandon() (cancelled or lost: the slot freed if still this fill).
"""

from __future__ import annotations

import contextlib

import torch

from hmoe.workers.engine.kv_handoff import HandoffPool
from hmoe.workers.model.kv_cache import KVPool


class Adoption:
    def __init__(
        self,
        request_id: str,
        pool: HandoffPool,
        slot: int,
        kv: KVPool,
        num_tokens: int,
        expected_generation: int = -1,
        stream: torch.cuda.Stream | None = None,
    ):
        """kv already holds request_id's blocks for num_tokens; HandoffError when the slot holds no such fill."""
        assert num_tokens > 0, num_tokens
        self.request_id, self.pool, self.slot, self._kv, self._stream = request_id, pool, slot, kv, stream
        self.generation = pool.open_adoption(slot, num_tokens, expected_generation)
        self._src = pool.slot_kv(slot, kv, num_tokens)  # name -> [L, n, W] views of the mapping
        self._names = list(self._src)
        self._positions = kv.slots(request_id, 0, num_tokens)  # [n] each token's slot in the pool
        self._cursor = (0, 0, 0)  # entry, layer, token: where the next piece starts
        self._event = torch.cuda.Event() if stream is not None else None
        if stream is not None:  # the positions were made on the main stream; the side stream reads them
            stream.wait_stream(torch.cuda.current_stream(stream.device))
            self._positions.record_stream(stream)
        self.total_bytes = sum(t.numel() * t.element_size() for t in self._src.values())
        self.copied_bytes = 0  # issued so far (on a GPU, landed once the event completes)

    @property
    def issued(self) -> bool:
        return self._cursor[0] == len(self._names)

    def copy(self, budget_bytes: int) -> int:
        """Copy (on a GPU: issue) up to budget_bytes more of the KV, in whole rows; the bytes taken.
        HandoffError handoff_lost when the slot was reclaimed meanwhile."""
        self.pool.check_adopting(self.slot, self.generation)
        done = 0
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            while not self.issued and (piece := self._next_piece(budget_bytes - done)) is not None:
                name, layers, tokens = piece
                src = self._src[name][layers, tokens]  # [l, t, W], contiguous
                dst = self._kv.data[name]
                dst[layers, self._positions[tokens]] = src.to(dst.device, non_blocking=True)
                done += src.numel() * src.element_size()
            if self._event is not None and done:
                self._event.record()
        self.copied_bytes += done
        return done

    def landed(self) -> bool:
        """Every piece issued and (on a GPU) completed: the KV is in the pool. Never blocks."""
        return self.issued and (self._event is None or self._event.query())

    def finish(self) -> None:
        """The KV has landed: free the slot, or HandoffError handoff_lost if it was reclaimed under the copy."""
        assert self.landed(), self.request_id
        self._src = {}
        self.pool.close_adoption(self.slot, self.generation)

    def abandon(self) -> None:
        """Give up (cancelled, or the slot lost): the slot is freed if it still holds this fill. The caller
        frees the KV blocks; main-stream work after this waits for a piece still in flight into them."""
        if self._event is not None and self.copied_bytes:
            torch.cuda.current_stream(self._stream.device).wait_event(self._event)
        self._src = {}
        self.pool.release_if(self.slot, self.generation)

    def _next_piece(self, budget_bytes: int) -> tuple[str, slice, slice] | None:
        """The largest next piece within budget_bytes (whole layers if they fit, else rows of one layer), cursor
        moved past it; None when not even one row fits."""
        entry, layer, token = self._cursor
        name = self._names[entry]
        num_layers, num_tokens, width = self._src[name].shape
        row_bytes = width * self._src[name].element_size()
        if token == 0 and num_tokens * row_bytes <= budget_bytes:
            count = min(num_layers - layer, budget_bytes // (num_tokens * row_bytes))
            piece = (name, slice(layer, layer + count), slice(0, num_tokens))
            layer += count
        else:
            count = min(num_tokens - token, budget_bytes // row_bytes)
            if count == 0:
                return None
            piece = (name, slice(layer, layer + 1), slice(token, token + count))
            token += count
            if token == num_tokens:
                layer, token = layer + 1, 0
        if layer == num_layers:
            entry, layer = entry + 1, 0
        self._cursor = (entry, layer, token)
        return piece
