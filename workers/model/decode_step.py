"""DecodeStep: a decode step over persistent rows (DecodeRows), cut at the MoE layers into segments that
run eagerly or replay CUDA graphs captured once per (micro-batch, bucket, segment) at start-up.

Shapes: R rows of a micro-batch (its bucket), H hidden, V vocab, M MoE layers.

Segment k of micro-batch i (k = 0..M):
    finish MoE layer k-1 (h + routed + shared; segment 0 embeds the input ids instead)
    -> every layer up to MoE layer k: norm, paged attention, (dense MLPs), router, shared experts
    -> stage the routed experts' inputs into expert slot i (pinned, fixed addresses)
The last segment finishes the last MoE layer, runs the layers after it, and writes the logits.
The step runs on the experts' kernel thread. Between segments it does only: wait for slot i's staged
inputs, run the layer's experts on the CPU kernels, enqueue one copy of their output into the device
buffer the next segment reads, replay, mark slot i's next inputs (record an event). While micro-batch
i's experts run on the CPU, the device runs micro-batch i+1's segment.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hmoe.runtime.errors import HmoeError
from hmoe.workers.model.batch import BUCKETS, DecodeRows
from hmoe.workers.model.fused import add_rms_norm
from hmoe.workers.model.layers import MoE

log = logging.getLogger(__name__)


class GraphCaptureError(HmoeError):
    """A decode graph could not be captured at start-up."""


@dataclass(eq=False)
class _Part:
    """A micro-batch: its rows, its expert slot, and the static buffers its segments pass along."""

    rows: DecodeRows
    slot: int
    h: torch.Tensor  # [R, H] residual after the last MoE layer's attention
    shared: torch.Tensor  # [R, H] that layer's shared experts (zeros without)
    routed: torch.Tensor  # [R, H] float32, its routed experts, copied back from the CPU
    cos: torch.Tensor  # [R, D/2]
    sin: torch.Tensor
    logits: torch.Tensor  # [R, V] float32
    graphs: dict[int, list[torch.cuda.CUDAGraph]] = field(default_factory=dict)  # bucket -> per segment


class DecodeStep:
    def __init__(self, model, kv, parts: list[DecodeRows], experts):
        self.model, self.kv, self.experts = model, kv, experts
        layers = model.layers
        self.moe_ids = [i for i, layer in enumerate(layers) if isinstance(layer.mlp, MoE)]
        c, dtype, device = model.config, model.dtype, model.device
        self.parts = []
        for slot, rows in enumerate(parts):
            r = rows.capacity
            half = model.rotary.dim // 2
            self.parts.append(
                _Part(
                    rows,
                    slot,
                    torch.zeros(r, c.hidden_size, dtype=dtype, device=device),
                    torch.zeros(r, c.hidden_size, dtype=dtype, device=device),
                    torch.zeros(r, c.hidden_size, dtype=torch.float32, device=device),
                    torch.zeros(r, half, dtype=dtype, device=device),
                    torch.zeros(r, half, dtype=dtype, device=device),
                    torch.zeros(r, c.vocab_size, dtype=torch.float32, device=device),
                )
            )
        self.graphed = False
        self._warned: set[int] = set()

    @property
    def num_segments(self) -> int:
        return len(self.moe_ids) + 1

    def buckets(self, part: _Part) -> list[int]:
        cap = part.rows.capacity
        return sorted({b for b in BUCKETS if b <= cap} | {cap})

    # -- one step ------------------------------------------------------------------------------------

    def run(self, buckets: list[int]) -> list[torch.Tensor]:
        """Every part with rows (their inputs prepared for `buckets[i]` rows) -> logits [n_i, V] each.

        Runs on the experts' kernel thread (CpuExperts.call): the thread that runs a layer's experts is
        the one that launches the next segment, so no thread waits for another between two segments."""
        return self.experts.call(self._run, buckets)

    @torch.inference_mode()
    def _run(self, buckets: list[int]) -> list[torch.Tensor]:
        active = [(p, len(p.rows), b) for p, b in zip(self.parts, buckets) if len(p.rows)]
        graphs = []
        for p, _, b in active:
            g = p.graphs.get(b) if self.graphed else None
            if self.graphed and g is None and b not in self._warned:
                self._warned.add(b)
                log.warning("no decode graph for a micro-batch of %d rows: running it eagerly", b)
            graphs.append(g)
        last = self.num_segments - 1
        for k in range(self.num_segments):
            for (p, n, b), g in zip(active, graphs):
                if k:  # meanwhile the device runs the other micro-batch's segment
                    self.experts.run_staged(p.slot, self.moe_ids[k - 1], n, p.routed[:b])
                if g is not None:
                    g[k].replay()
                else:
                    self._segment(p, k, b)
                if k < last:
                    self.experts.staged(p.slot)
        return [p.logits[:n] for p, n, _ in active]

    def _segment(self, p: _Part, k: int, b: int) -> None:
        m = self.model
        view = p.rows.view(b, full_width=self.graphed or m.device.type == "cuda")
        lo = self.moe_ids[k - 1] + 1 if k else 0
        hi = self.moe_ids[k] if k < len(self.moe_ids) else len(m.layers) - 1
        first_norm = m.layers[lo].input_norm if lo <= hi else m.norm
        if k == 0:
            x = F.embedding(p.rows.input_ids[:b], m.embed)
            normed = first_norm(x)
            cos, sin = m.rotary.cos_sin(p.rows.positions[:b], m.dtype)
            p.cos[:b].copy_(cos)
            p.sin[:b].copy_(sin)
        else:  # finish the previous MoE layer and norm for the next layer in one pass
            x, normed = add_rms_norm(first_norm, p.h[:b], p.routed[:b], p.shared[:b])
        cos, sin = p.cos[:b], p.sin[:b]
        for layer_id in range(lo, hi + 1):
            layer = m.layers[layer_id]
            ends_segment = k < len(self.moe_ids) and layer_id == hi  # the MoE layer that ends this segment
            attn = layer.attn.decode(normed, view, self.kv, m.rotary, cos, sin)
            h, t = add_rms_norm(layer.post_attention_norm, x, attn, out=p.h[:b] if ends_segment else None)
            if ends_segment:
                moe = layer.mlp
                topk_ids, topk_weights = moe.router(t)
                self.experts.stage(p.slot, t, topk_ids, topk_weights)
                if moe.shared is not None:
                    p.shared[:b].copy_(moe.shared(t))
                return
            next_norm = m.layers[layer_id + 1].input_norm if layer_id < hi else m.norm
            x, normed = add_rms_norm(next_norm, h, layer.mlp(t))
        p.logits[:b].copy_(F.linear(normed, m.lm_head).to(torch.float32))

    # -- start-up ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def capture(self) -> int:
        """Capture every (part, bucket, segment) graph; GraphCaptureError names the bucket that failed."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        pool = torch.cuda.graph_pool_handle()
        count = 0
        with torch.cuda.stream(stream):
            for p in self.parts:
                for b in self.buckets(p):
                    p.rows.prepare([], [], b)  # every row padding: reads and writes the scratch block
                    try:
                        for _ in range(2):  # warm-up: Triton compiles, cuBLAS picks its kernels
                            for k in range(self.num_segments):
                                self._segment(p, k, b)
                        stream.synchronize()
                        p.graphs[b] = []
                        for k in range(self.num_segments):
                            g = torch.cuda.CUDAGraph()
                            with torch.cuda.graph(g, pool=pool, stream=stream):
                                self._segment(p, k, b)
                            p.graphs[b].append(g)
                            count += 1
                    except Exception as exc:
                        raise GraphCaptureError(
                            "graph_capture_failed",
                            f"decode graph capture failed for micro-batch {p.slot}, bucket {b} rows: {exc}",
                        ) from exc
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.graphed = True
        return count
