"""StreamingExperts: a prefill pass's routed experts on the GPU, each MoE layer streamed once from the pack.

Shapes: T tokens of the pass, K experts per token, E experts, H hidden, I expert intermediate; Hp, Ip
padded to 128 (kernels/formats.py). TK = T * K (token, expert) pairs.

The weight pack keeps every layer's experts in the CPU kernels' tiled formats, registered with CUDA
(PackSource.pin). A pass (`open_pass()`, one `StreamPass`, an ExpertBackend) DMAs layer after layer
straight from those pages into a ring of `ring_layers` device buffers on a copy stream: layer L+R is
copied while layer L computes, ordered by events (copy -> compute: `ready`; compute -> next copy into
the slot: `slot_free`), never by a host synchronization. On the compute stream a layer is untiled and
dequantized to the compute dtype (bf16 on a GPU) in one pass over the slot, then every token of the
pass meets its experts in two grouped GEMMs (tokens sorted by expert: gate+up [TK, 2Ip], down [TK, Hp]).
Where the GPU has no room for a whole dequantized layer (DeepSeek-V3: 22.5 GiB in bf16 beside an 11 GiB
slot), the scratch holds `scratch_experts` experts and a layer computes in groups of that many, each
dequantized and multiplied in turn (check_device_memory picks the size).

The pass is layer-major (CausalLM.forward_layer_major): every chunk submits layer L before any waits
on it, so the first wait() of a layer computes all the chunks' tokens at once, and the layer's bytes
cross PCIe once per pass. On the CPU the same code runs with a plain copy into the ring (tests).

With an ExpertShare (parallel.py) the object streams and computes only experts [first, end) of every
layer, and each layer's partial output is summed over the ranks before the chunks take theirs.

Past 400 lines because the ring, its passes, the grouped GEMMs and the device-memory plan that sizes the
ring and the scratch change together; split, each would reach into the others' shapes.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hmoe.kernels.formats import LayerExperts, layer_arrays, padded
from hmoe.runtime.errors import HmoeError
from hmoe.workers.experts.dequant import dequantize_into
from hmoe.workers.experts.parallel import ExpertShare

# Pack dtype -> the torch dtype its bytes travel as: bf16 bit patterns as int16 (copies of uint16 are not
# implemented everywhere), reinterpreted on the device.
TORCH_OF_NUMPY = {"uint8": torch.uint8, "uint16": torch.int16, "float32": torch.float32, "float16": torch.float16}


@dataclass
class _Slot:
    arrays: dict[str, torch.Tensor]  # one layer's arrays as stored in the pack, on the device
    free: torch.cuda.Event | None = None  # recorded after the last dequantization that read this slot


class StreamingExperts:
    """The ring, the copy stream and the dequantization scratch; one pass at a time (`open_pass`)."""

    def __init__(
        self,
        layers: dict[int, LayerExperts],
        top_k: int,
        device: torch.device | str,
        dtype: torch.dtype,
        ring_layers: int = 2,
        share: ExpertShare | None = None,
        scratch_experts: int = 0,
    ):
        """layers: {layer_id: LayerExperts} of every MoE layer; share: this rank's part of each (None: all);
        scratch_experts: experts dequantized at a time (0: the whole layer)."""
        self.share = share
        if share is not None:
            layers = {layer_id: lay.share(share.first, share.end) for layer_id, lay in layers.items()}
        first = next(iter(layers.values()))
        assert all(
            (lay.fmt, lay.hidden, lay.inter) == (first.fmt, first.hidden, first.inter) for lay in layers.values()
        )
        self.device, self.dtype, self.top_k = torch.device(device), dtype, top_k
        self.fmt, self.hidden, self.inter, self.num_experts = first.fmt, first.hidden, first.inter, first.num_experts
        self.layer_ids = sorted(layers)
        self.ring_layers = min(ring_layers, len(self.layer_ids))
        on_gpu = self.device.type == "cuda"
        with warnings.catch_warnings():  # the pack is read-only: nothing here writes through these views
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self.sources = {
                layer_id: {name: torch.from_numpy(_travelling(a)) for name, a in lay.arrays.items()}
                for layer_id, lay in layers.items()
            }
        shapes = layer_arrays(self.fmt, self.num_experts, self.hidden, self.inter)
        self.ring = [
            _Slot(
                {
                    name: torch.empty(shape, dtype=TORCH_OF_NUMPY[dt.name], device=self.device)
                    for name, (dt, shape) in shapes.items()
                }
            )
            for _ in range(self.ring_layers)
        ]
        hp, ip = padded(self.hidden), padded(self.inter)
        e = self.scratch_experts = min(scratch_experts or self.num_experts, self.num_experts)
        self.gate_up = torch.empty(e, 2 * ip, hp, dtype=dtype, device=self.device)  # [E, 2Ip, Hp]: gate rows, then up
        self.down = torch.empty(e, hp, ip, dtype=dtype, device=self.device)  # [E, Hp, Ip]
        self.copy_stream = torch.cuda.Stream(self.device) if on_gpu else None
        self.grouped_gemm = _grouped_mm_works(self.device, dtype)  # else one GEMM per expert (a host sync per layer)

    @classmethod
    def from_source(
        cls,
        source,
        device,
        dtype: torch.dtype,
        ring_layers: int = 2,
        share: ExpertShare | None = None,
        scratch_experts: int = 0,
    ) -> StreamingExperts:
        """Every MoE layer of a PackSource; pin the source first for DMA speed (pageable copies crawl)."""
        c = source.config
        layers = {layer_id: source.layer_experts(layer_id) for layer_id in c.moe_layer_ids}
        return cls(layers, c.num_experts_per_tok, device, dtype, ring_layers, share, scratch_experts)

    @property
    def layer_bytes(self) -> int:
        """Bytes one layer's experts take in the pack (what crosses PCIe per layer)."""
        return sum(t.nbytes for t in self.ring[0].arrays.values())

    @property
    def device_bytes(self) -> int:
        """Device memory this object holds: the ring plus the dequantized scratch."""
        return self.ring_layers * self.layer_bytes + self.gate_up.nbytes + self.down.nbytes

    def open_pass(self, resident: bool = False) -> StreamPass:
        """A pass; `resident`: the ring holds every layer already (an earlier pass copied them), copy nothing
        (the bench's compute floor)."""
        assert not resident or self.ring_layers == len(self.layer_ids), "resident needs a ring of every layer"
        return StreamPass(self, copy=not resident)

    def close(self) -> None:
        """Nothing to release beyond memory; the worker calls it like every backend's close()."""

    # -- the two halves of one layer ---------------------------------------------------------------

    def copy_layer(self, layer_id: int, slot: _Slot) -> torch.cuda.Event | None:
        """Enqueue the layer's arrays pack -> slot on the copy stream, after the slot's last reader."""
        if self.copy_stream is None:
            for name, dst in slot.arrays.items():
                dst.copy_(self.sources[layer_id][name])
            return None
        with torch.cuda.stream(self.copy_stream):
            if slot.free is not None:
                self.copy_stream.wait_event(slot.free)
            for name, dst in slot.arrays.items():
                dst.copy_(self.sources[layer_id][name], non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        return ready

    def dequantize(self, slot: _Slot, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot's experts [first, first + scratch_experts) (the pack's tiles) -> (gate_up [n, 2Ip, Hp],
        down [n, Hp, Ip]) in the compute dtype, views of the scratch."""
        ip, n = padded(self.inter), min(self.scratch_experts, self.num_experts - first)
        gate_up, down = self.gate_up[:n], self.down[:n]
        for proj, dst in (("gate", gate_up[:, :ip]), ("up", gate_up[:, ip:]), ("down", down)):
            scale = slot.arrays.get(f"{proj}_scale")
            dequantize_into(
                dst, slot.arrays[proj][first : first + n], None if scale is None else scale[first : first + n], self.fmt
            )
        return gate_up, down


class StreamPass:
    """One prefill pass's ExpertBackend: the ring's next layers are copied as soon as it opens."""

    def __init__(self, owner: StreamingExperts, copy: bool = True):
        self.owner, self.copy = owner, copy
        self.next_copy = 0  # index into owner.layer_ids of the next layer to copy
        self.ready: dict[int, tuple[_Slot, torch.cuda.Event | None]] = {}
        self.inputs: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self.outputs: dict[int, list[torch.Tensor | None]] = {}  # a layer's outputs until each chunk took its own
        self.computed: set[int] = set()
        self.bytes_copied = 0
        for _ in range(owner.ring_layers):
            self._copy_next()

    def submit(self, layer_id: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        """Keep the chunk's inputs; the layer computes at its first wait(), when every chunk has submitted."""
        assert layer_id not in self.computed, f"layer {layer_id} submitted after it computed: not layer-major"
        chunks = self.inputs.setdefault(layer_id, [])
        chunks.append((hidden, topk_ids, topk_weights))
        return layer_id, len(chunks) - 1

    def wait(self, handle) -> torch.Tensor:
        layer_id, index = handle
        if layer_id not in self.computed:
            self._compute(layer_id)
        outputs = self.outputs[layer_id]
        out, outputs[index] = outputs[index], None
        if all(o is None for o in outputs):
            del self.outputs[layer_id]
        return out

    def __call__(self, layer_id, hidden, topk_ids, topk_weights) -> torch.Tensor:
        return self.wait(self.submit(layer_id, hidden, topk_ids, topk_weights))

    def close(self) -> None:
        """Drop the pass's tensors. Copies still in flight finish into the ring; the next pass's copies
        wait on the slots' events, so an abandoned pass needs no synchronization."""
        self.inputs.clear()
        self.outputs.clear()
        self.ready.clear()

    def _free(self, slot: _Slot) -> None:
        """The slot's layer is dequantized: the ring's next layer copies into it while this one computes."""
        if self.copy and self.owner.copy_stream is not None:
            slot.free = torch.cuda.Event()
            slot.free.record()
        self._copy_next()

    def _copy_next(self) -> None:
        owner = self.owner
        if self.next_copy >= len(owner.layer_ids):
            return
        layer_id = owner.layer_ids[self.next_copy]
        slot = owner.ring[self.next_copy % owner.ring_layers]
        self.ready[layer_id] = (slot, owner.copy_layer(layer_id, slot) if self.copy else None)
        self.bytes_copied += owner.layer_bytes if self.copy else 0
        self.next_copy += 1

    def _compute(self, layer_id: int) -> None:
        owner = self.owner
        slot, ready = self.ready.pop(layer_id)
        if ready is not None:
            torch.cuda.current_stream(owner.device).wait_event(ready)
        self.computed.add(layer_id)
        chunks = self.inputs.pop(layer_id)
        hidden = torch.cat([c[0] for c in chunks]) if len(chunks) > 1 else chunks[0][0]
        ids = torch.cat([c[1] for c in chunks]) if len(chunks) > 1 else chunks[0][1]
        weights = torch.cat([c[2] for c in chunks]) if len(chunks) > 1 else chunks[0][2]
        if owner.share is not None:
            ids, weights = ids.contiguous(), weights.contiguous()
            owner.share.agree(ids, weights)
        base = owner.share.first if owner.share is not None else 0
        out = None
        for first in range(0, owner.num_experts, owner.scratch_experts):
            gate_up, down = owner.dequantize(slot, first)
            if first + owner.scratch_experts >= owner.num_experts:  # the slot's last reader
                self._free(slot)
            whole = owner.share is None and gate_up.shape[0] == owner.num_experts  # no expert to leave out
            part = grouped_experts(
                hidden, ids, weights, gate_up, down, owner.grouped_gemm, None if whole else base + first
            )
            out = part if out is None else out.add_(part)
        if owner.share is not None:
            owner.share.reduce(out)
        self.outputs[layer_id] = list(out.to(hidden.dtype).split([c[0].shape[0] for c in chunks]))


def grouped_experts(
    hidden: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    grouped_gemm: bool = True,
    first_expert: int | None = None,
) -> torch.Tensor:
    """hidden [T, H], ids [T, K], weights [T, K] float32, gate_up [E, 2Ip, Hp], down [E, Hp, Ip] -> [T, H]
    float32 (summed over each token's K experts).

    (token, expert) pairs sorted by expert, so each expert's rows meet its weights in one grouped GEMM;
    no host synchronization (the group offsets stay on the device). With first_expert, gate_up and down
    hold experts [first_expert, first_expert + E) only: the other pairs sort last, past every group, are
    not computed, and add nothing.
    """
    num_tokens, hidden_size = hidden.shape
    top_k, num_experts, ip, hp = ids.shape[1], gate_up.shape[0], down.shape[2], down.shape[1]
    flat = ids.reshape(-1)  # [TK]
    if first_expert is not None:
        local = flat - first_expert
        mine = (local >= 0) & (local < num_experts)
        flat = torch.where(mine, local, num_experts)  # the other ranks' pairs: past the last group
    sorted_ids, order = flat.sort(stable=True)  # [TK] pair index, grouped by expert
    # [E] end of each group; NOTE: not bincount, which reads its input's min and max back to the host on a GPU
    experts = torch.arange(num_experts, device=flat.device)
    offsets = torch.searchsorted(sorted_ids, experts, right=True).to(torch.int32)
    x = hidden[order // top_k].to(gate_up.dtype)  # [TK, H]
    if hp != hidden_size:  # tiny models only: real widths are multiples of 128
        x = F.pad(x, (0, hp - hidden_size))
    gu = _grouped_mm(x, gate_up.transpose(1, 2), offsets, grouped_gemm)  # [TK, 2Ip]
    h = F.silu(gu[:, :ip]) * gu[:, ip:]  # [TK, Ip]
    y = _grouped_mm(h, down.transpose(1, 2), offsets, grouped_gemm)[:, :hidden_size]  # [TK, H]
    y = y * weights.reshape(-1)[order, None].to(y.dtype)
    if first_expert is not None:  # rows past the last group hold whatever the GEMMs left there
        y = torch.where(mine[order, None], y, 0)
    pairs = torch.empty_like(y)
    pairs[order] = y  # back to (token, k) order: summing over k is deterministic, unlike index_add
    return pairs.view(num_tokens, top_k, hidden_size).sum(1, dtype=torch.float32)


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, grouped_gemm: bool) -> torch.Tensor:
    """a [M, K] rows grouped by `offsets` (group g ends at offsets[g]) times b [G, K, N] -> [M, N].

    torch's grouped GEMM takes bf16 on a Hopper GPU and anything on the CPU; elsewhere (float32 test
    models on a GPU) one GEMM per group runs, at the price of one host synchronization.
    """
    if grouped_gemm:
        return torch._grouped_mm(a, b, offs=offsets)
    out = a.new_empty(a.shape[0], b.shape[2])
    start = 0
    for group, end in enumerate(offsets.tolist()):
        if end > start:
            torch.matmul(a[start:end], b[group], out=out[start:end])
        start = end
    return out


def _grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's grouped GEMM runs here (a probe: its support depends on the torch build, GPU and dtype)."""
    a = torch.ones(16, 32, device=device, dtype=dtype)
    b = torch.ones(2, 32, 16, device=device, dtype=dtype)
    try:
        out = torch._grouped_mm(a, b, offs=torch.tensor([8, 16], dtype=torch.int32, device=device))
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return bool((out == 32).all())


def _travelling(a):
    """A pack array as the bytes that travel: uint16 (bf16 bits) seen as int16, the rest as is."""
    return a.view("int16") if a.dtype.name == "uint16" else a


def measure_copy_s(experts: StreamingExperts, repeats: int = 3) -> float:
    """Seconds to copy one layer pack -> ring (the best of `repeats`), with nothing else running."""
    best = float("inf")
    layer_id = experts.layer_ids[0]
    for _ in range(repeats):
        if experts.copy_stream is not None:
            torch.cuda.synchronize(experts.device)
        start = time.perf_counter()
        ready = experts.copy_layer(layer_id, experts.ring[0])
        if ready is not None:
            ready.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def measure_cpu_s_per_token(cpu_experts, config, tokens: int = 64) -> float:
    """Seconds the CPU kernels take per token for one MoE layer (random inputs, after one warm call)."""
    g = torch.Generator().manual_seed(0)
    layer_id, k = config.moe_layer_ids[0], config.num_experts_per_tok
    x = torch.randn(tokens, config.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(config.num_experts, generator=g)[:k] for _ in range(tokens)])
    weights = torch.full((tokens, k), 1.0 / k)
    cpu_experts(layer_id, x, ids, weights)
    start = time.perf_counter()
    cpu_experts(layer_id, x, ids, weights)
    return (time.perf_counter() - start) / tokens


def planned_device_bytes(layer: LayerExperts, dtype: torch.dtype, ring_layers: int, scratch_experts: int = 0) -> int:
    """What StreamingExperts will hold on the device: `ring_layers` layers as stored + `scratch_experts`
    experts dequantized (0: all of them)."""
    scratch = min(scratch_experts or layer.num_experts, layer.num_experts)
    dequantized = 3 * scratch * padded(layer.hidden) * padded(layer.inter) * dtype.itemsize
    stored = sum(a.nbytes for a in layer.arrays.values())
    return ring_layers * stored + dequantized


MIN_SCRATCH_EXPERTS = 8  # fewer experts per group would cost a pass more in launches than it saves
PASS_FRACTION = 0.8  # of the device memory left beside the ring and the scratch, what a pass's activations may take


def check_device_memory(
    layer: LayerExperts, config, dtype: torch.dtype, ring_layers: int, free_bytes: int, pass_tokens: int = 256
) -> int:
    """The scratch experts of the streaming this GPU has room for: the whole layer dequantized
    at once (scratch experts 0) where it fits beside a pass of `pass_tokens` (the longest prompt, so that it
    streams every layer once), else the most experts at a time that fit beside it; where not even
    MIN_SCRATCH_EXPERTS do, the same beside a pass of 256 tokens (long prompts then take several passes);
    config_invalid, with what to change, when not even that fits."""
    stored = sum(a.nbytes for a in layer.arrays.values())
    per_expert, least = planned_device_bytes(layer, dtype, 0, 1), min(MIN_SCRATCH_EXPERTS, layer.num_experts)
    for tokens in dict.fromkeys((pass_tokens, 256)):
        room = free_bytes - tokens * pass_bytes_per_token(config, dtype) / PASS_FRACTION - ring_layers * stored
        scratch = min(layer.num_experts, int(room // per_expert))
        if scratch >= least:
            return 0 if scratch == layer.num_experts else scratch
    raise HmoeError(
        "config_invalid",
        f"streaming prefill needs {planned_device_bytes(layer, dtype, ring_layers, least) / 2**30:.2f} GiB "
        f"of GPU memory at least ({ring_layers} ring layers of {stored / 2**30:.2f} GiB and {least} experts "
        f"dequantized at a time), {free_bytes / 2**30:.2f} GiB is free after the model and the KV cache: "
        'lower [worker] stream_ring_layers or kv_cache_gib, or set [worker] prefill_experts = "cpu"',
    )


def scratch_for(source, device, dtype: torch.dtype, ring_layers: int, pass_tokens: int, share=None) -> int:
    """The scratch experts a StreamingExperts of `source` (this rank's `share`) gets on `device`: on a GPU, what
    check_device_memory finds room for in its free memory now (config_invalid when not even the least fits);
    elsewhere 0, the whole layer."""
    if torch.device(device).type != "cuda":
        return 0
    layer = source.layer_experts(source.config.moe_layer_ids[0])
    if share is not None:
        layer = layer.share(share.first, share.end)
    free = torch.cuda.mem_get_info(device)[0]
    return check_device_memory(layer, source.config, dtype, ring_layers, free, pass_tokens)


def pass_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Device bytes a streamed pass needs per prompt token, at most: the residual stream and the layer's
    live activations (about a dozen [H] rows) plus the MoE's per-(token, expert) rows (x, gate+up, h, y twice)."""
    h, i, k = padded(config.hidden_size), padded(config.moe_intermediate_size), config.num_experts_per_tok
    return dtype.itemsize * (12 * h + k * (3 * h + 3 * i)) + 64 * k
