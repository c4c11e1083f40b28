"""The fused routed-expert layer on the CPU: y = sum_k w * down(silu(gate x) * up x), one call.

Shapes: T tokens, K top-k, E experts, H hidden, I expert intermediate; Hp, Ip padded to 128.
A slot is one (token, k) pair, slot = t * K + k; S = T * K slots.

One call runs, with the GIL released:
  route     sort the S slots by expert (tokens that pick the same expert read its weights once)
  phase 1   h[slot, :] = w[slot] * silu(gate_e x_t) * up_e x_t   for every active expert e
  phase 2   y[t, :]   = sum over t's slots of down_e h[slot]
The phases run in one parallel region of `num_threads` tasks. Each phase is cut into work items
(phase 1: an expert's rows [r0, r1), gate then up; phase 2: rows [r0, r1) of y, every active expert
summed in expert order), 16 to 128 rows each (item_rows: at least ITEMS_PER_TASK per task, but each
expert's part of an item at least MIN_STREAM_BYTES long; phase 2 ends in up to one item a task of a
quarter of that, down_items), which the tasks claim one at a time from a shared counter; a task that
finds none left waits for the phase's last item to finish, then claims items of the next phase. So
the tasks end each phase together even when cores run at different speeds, no two items write the
same output (results do not depend on who ran what), and one region's start and end (~10 µs on 16
cores) is paid once.
Claiming never waits for a task that has not started: with fewer threads than tasks it still ends.
Within an item, all groups of 4 slots of an expert run over the same rows, so an expert with more
than 4 tokens rereads its rows from L2, not DRAM. INT4 quantizes its activations to int8 in two
short phases of their own (x before phase 1, h before phase 2).

BF16 and FP8 read their activations (x and h) rounded to bf16, as a bf16 model holds them. On CPUs
with AMX (jit.amx_usable) an expert holding AMX_MIN_SLOTS or more of the call's slots runs on AMX tiles,
16 slots a pass (the pack layout of bf16 weights is already the A tile; FP8 weights are decoded to it
exactly as they stream in, amx.py; the tokens are packed as B tiles in a short phase 0, and
phase 1 writes h packed for phase 2); fewer slots, and other CPUs, on the AVX-512 tiles, with the same
products (bf16 x bf16 and E4M3 x bf16 are exact in float32): only the order of the sums differs.
INT4 with 128-input groups takes AMX's int8 tiles (tdpbusd) for experts with INT4_AMX_MIN_SLOTS or more
slots: the codes are unpacked to bytes a block at a time, the int8 activations packed as B tiles in a
phase after each quantization, and each block's exact int32 sums corrected and scaled in float32 as
the AVX-512 tile does. With 32-input groups that fold comes every 32 columns and ate the gain (dev,
Qwen3-30B-A3B shape: AMX 0.65-1.0x the AVX-512 tiles), so those stay on AVX-512.

A call passes its scratch as one buffer, which the kernel's entry cuts into its 23 parts (SCRATCH)
for the layer's parallel body: each array argument costs Numba's dispatch a type check and an unboxing,
a few hundred nanoseconds apiece and more on caches the weights just swept (dev machine, Qwen3-30B-A3B
T=1 after the caches were emptied: the kernel entered 93 -> 59-61 µs after run() began, with run()'s
checks made cheaper; the call's fixed cost 154-161 -> 129-130 µs).

Each call leaves its timeline in `sync` (MoeKernel.timeline: when the kernel was entered, its region
began and ended, each task started, began and ended each phase's wait, and ended), which
bench/kernels.py turns into where a call's time goes.

Every weight stream is prefetched PREFETCH_BYTES ahead into L2 up to its end, and the next stream's
head is prefetched before it starts (dots.py): a core streams at its share of the bandwidth only
with many lines in flight, and the hardware prefetchers restart at each 4 KiB page.

Measured (bench/kernels.py): a region costs ~2 µs on 2 cores, ~10-12 µs on 16 (omp). H200 box, 16
threads, T=1, before -> one region + prefetch: DeepSeek-V3 BF16 7.84 -> 5.26 ms, FP8 4.76 -> 3.63
(bench/results/kernels-h200-explore.json).

NOTE: one MoeKernel holds scratch for one call at a time: give each calling thread its own.
NOTE: past 400 lines because the three formats' phases sit side by side: their differences
(activation pre-scaling for FP8, int8 activations for INT4, the prefetched streams) read at a glance.
"""

from __future__ import annotations

import os
import threading

import numba
import numpy as np
from numba import njit, prange

from .amx import AMX_BLOCK_GROUPS, AMX_CONFIG, amx_pair, fp8_amx_pairs, int4_amx_pairs
from .dots import (
    FASTMATH,
    TILE_ROWS,
    bf16_tile,
    bf16_tile_tokens4,
    fp8_tile,
    fp8_tile_tokens4,
    int4_tile,
    int4_tile_tokens4,
    prefetch_head,
    quantize_int8,
)
from .formats import CACHE_LINE, PAD, ExpertFormat, LayerExperts, aligned_zeros, padded
from .jit import amx_usable
from .simd import (
    atomic_add,
    atomic_read,
    cycles,
    load_i32x16,
    os_yield,
    spin_pause,
    store_bf16_interleaved,
    store_bf16_pairs,
    tile_config,
    tile_release,
    transpose16,
    vadd,
    vcvt,
    vdiv,
    vexp,
    vload,
    vmul,
    vround_bf16,
    vsplat,
    vsplit_parity,
    vstore,
    vsum,
)

jit = njit(nogil=True, cache=True, fastmath=FASTMATH)
parallel_jit = njit(nogil=True, cache=True, fastmath=FASTMATH, parallel=True)
SLOT_BITS = 20  # routing sort key: expert << SLOT_BITS | slot
ITEMS_PER_TASK = 12  # work items per task and phase at least (item_rows), so that the tasks end together
MIN_STREAM_BYTES = 32 << 10  # ... unless that makes an expert's rows in an item shorter than this
QUANT_MIN_COLS = 1024  # INT4: activations quantized to int8 in items of at least this many inputs (see quant_chunk)
SPINS_BEFORE_YIELD = 4000  # pause instructions (~40-140 cycles each) before a waiting task yields its core
LINE_PAIR = 2 * CACHE_LINE  # the adjacent-line prefetcher fetches lines in aligned pairs
SYNC_STRIDE = LINE_PAIR // 8  # int64s between two shared counters: each on a line pair of its own
# A call's timeline (MoeKernel.timeline), in sync past the counters, time-stamp counter ticks: the kernel
# entered, its region started, its region ended; then per task SYNC_STRIDE slots: 2p its own items of
# phase p done (the wait begins), 2p + 1 phase p done (the wait ends), TASK_START, TASK_END.
CALL_STAMPS = 12 * SYNC_STRIDE
TASK_STAMPS = CALL_STAMPS + SYNC_STRIDE
TASK_START, TASK_END = SYNC_STRIDE - 2, SYNC_STRIDE - 1
# Each kernel's phases with a wait, in the order they run (the last, down, ends at TASK_END).
PHASES = {
    "bf16": (("pack x", 0), ("gate/up", 1)),
    "fp8": (("pack x", 0), ("gate/up", 1)),
    "int4": (("quantize x", 0), ("pack x", 4), ("gate/up", 1), ("quantize h", 2), ("pack h", 5)),
}
AMX_MIN_SLOTS = 4  # bf16, fp8: an expert with this many of a call's slots runs on AMX tiles (where usable), 16 a pass
INT4_AMX_MIN_SLOTS = 8  # int4 (group 128): its AMX pass folds every 128 columns in float32, so it pays later
INT4_SINGLE_MAX = 3  # int4: a group of this many slots or fewer takes one-token tiles, one pass each (_int4_tiles)
PACK_COLS = 1024  # AMX: x and h are packed as B tiles in items of this many columns of a group (see pack_chunks)
PREFETCH_BYTES = -4096  # the tile loops prefetch their weight stream 4 KiB ahead into L2 (dots.py: < 0 means L2)


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-thread siblings count once)."""
    cpus = os.sched_getaffinity(0)
    cores = set()
    for cpu in cpus:
        try:
            with (
                open(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_id") as f_core,
                open(f"/sys/devices/system/cpu/cpu{cpu}/topology/physical_package_id") as f_pkg,
            ):
                cores.add((f_pkg.read().strip(), f_core.read().strip()))
        except OSError:
            cores.add(("cpu", cpu))
    return max(1, len(cores))


# ---------------------------------------------------------------- shared pieces


@jit
def route(ids, num_experts, keys, slot_of, active_id, active_start):
    """Group the slots by expert. Returns the number of active experts, or -1 for an id out of range.

    slot_of[active_start[a] : active_start[a + 1]] are the slots of expert active_id[a].
    """
    num_tokens, top_k = ids.shape
    n = num_tokens * top_k
    for t in range(num_tokens):
        for k in range(top_k):
            e = ids[t, k]
            if e < 0 or e >= num_experts:
                return -1
            keys[t * top_k + k] = (e << SLOT_BITS) | (t * top_k + k)
    keys[:n].sort()
    n_active = 0
    for i in range(n):
        e = keys[i] >> SLOT_BITS
        slot_of[i] = keys[i] & ((1 << SLOT_BITS) - 1)
        if i == 0 or e != keys[i - 1] >> SLOT_BITS:
            active_id[n_active] = e
            active_start[n_active] = i
            n_active += 1
    active_start[n_active] = n
    return n_active


@jit
def load_activations(x, act, hp):
    """act[t, :H] = x[t], zero padding; act has T+1 rows of Hp (the last stays zero)."""
    for t in range(x.shape[0]):
        load_x(x, act, hp, t, 0, hp)


@jit
def load_x(x, act, hp, t, c0, c1):
    """act[t, c0:c1] = x[t, c0:c1], zero past H."""
    hidden = x.shape[1]
    for j in range(c0, min(c1, hidden)):
        act[t * hp + j] = x[t, j]
    for j in range(max(c0, hidden), c1):
        act[t * hp + j] = 0.0


@jit
def round_bf16(v, n):
    """v[:n] rounded to bf16 in place (n a multiple of 16): the BF16 layer's activations, on every path."""
    for i in range(0, n, 16):
        vstore(v, i, vround_bf16(vload(v, i)))


@jit
def store_gate(res, n, slots, h, ip, r):
    """h[slot, r:r+16] = gate x (res[16 * i + row]) for the n slots of a group."""
    for i in range(n):
        vstore(h, slots[i] * ip + r, vload(res, 16 * i))


@jit
def silu(g):
    return vdiv(g, vadd(vsplat(1.0), vexp(vmul(g, vsplat(-1.0)))))


@jit
def finish_up(res, n, slots, weights, h, ip, r, to_bf16):
    """h[slot, r:r+16] = weight * silu(h) * up x (res[16 * i + row]) for the n slots of a group, rounded
    to bf16 where to_bf16 (BF16, FP8: their down projection reads h so)."""
    for i in range(n):
        at = slots[i] * ip + r
        v = vmul(vmul(silu(vload(h, at)), vload(res, 16 * i)), vsplat(weights[slots[i]]))
        vstore(h, at, vround_bf16(v) if to_bf16 else v)


@jit
def accumulate_out(res, res0, n, slots, top_k, out, hidden, r):
    """out[t, r:r+16] += res[res0 + 16 * i:] for the n slots of a group (rows past H are padding)."""
    for i in range(n):
        at = (slots[i] // top_k) * hidden + r
        if r + TILE_ROWS <= hidden:
            vstore(out, at, vadd(vload(out, at), vload(res, res0 + 16 * i)))
        else:
            for rr in range(hidden - r):
                out[at + rr] += res[res0 + 16 * i + rr]


@jit
def zero_out_rows(out, num_tokens, hidden, lo, hi):
    for t in range(num_tokens):
        for r in range(lo, min(hi, hidden)):
            out[t * hidden + r] = 0.0


@jit
def group_offsets(slot_of, g0, s1, slots, offs, base, stride, zero):
    """Slots g0.. (up to 4, before s1) of one expert; offs[i] = base + i * stride, or `zero` past them. Returns n."""
    n = min(4, s1 - g0)
    for i in range(4):
        slots[i] = slot_of[g0 + min(i, n - 1)]
        offs[i] = base + i * stride if i < n else zero
    return n


# ---------------------------------------------------------------- work items and the barrier


@jit
def item_rows(rows, units, num_tasks, row_bytes):
    """Rows per work item: the largest of 128, 64, 32, 16 that still cuts `units` x `rows` rows into at
    least ITEMS_PER_TASK items per task (small items balance the tasks), but never so few rows that
    one expert's part of an item (r x row_bytes) is shorter than MIN_STREAM_BYTES (streams ramp up)."""
    r = 128
    while (
        r > TILE_ROWS
        and units * (-(-rows // r)) < ITEMS_PER_TASK * num_tasks
        and (r // 2) * row_bytes >= MIN_STREAM_BYTES
    ):
        r //= 2
    return r


@jit
def _down_split(hp, rows, num_tasks):
    """(rows the large items cover, rows of a small item): up to num_tasks small items last, at most half the rows."""
    small = max(TILE_ROWS, rows // 4)
    return hp - min(hp // 2 // small, num_tasks) * small, small


@jit
def down_items(hp, rows, num_tasks):
    """Down's work items over the hp output rows (all experts each): items of `rows` first, then up to
    num_tasks of a quarter of that (TILE_ROWS at least), so that the tasks that finish their large items
    early take the small ones and all end together. With one size the same items took 57-95 us on different
    tasks of one call (Qwen3-30B-A3B INT4-g128, T=1, H200 box: 16 items of 128 rows, one a task). Against
    one size, call by call on that box: 8 tokens on the same experts of that shape 1.20x, the other 23 cases
    (T=1 and 8 shared, both shapes, four formats) 0.95-1.08x."""
    large, small = _down_split(hp, rows, num_tasks)
    return -(-large // rows) + (hp - large) // small


@jit
def down_item(i, hp, rows, num_tasks):
    """Rows [r0, r1) of down's item i (down_items)."""
    large, small = _down_split(hp, rows, num_tasks)
    first_small = -(-large // rows)
    if i < first_small:
        return i * rows, min((i + 1) * rows, large)
    r0 = large + (i - first_small) * small
    return r0, r0 + small


# MoeKernel's scratch: one buffer cut into these parts, each on a line pair. A kernel's entry (moe_fp8,
# moe_bf16, moe_int4) takes the buffer and `lay` (each part's byte offset and length), two arguments
# rather than 23, each of which costs Numba's dispatch a type check and an unboxing on the way in and a
# release on the way out; it cuts the parts (scratch_parts) and hands them to the layer's parallel body
# as arguments. As arguments, not as locals of the body: Numba's dead-code pass drops a store into an
# array it cannot tie to an argument once nothing reads that array again (it does not follow .view()),
# which dropped the timeline's stamps when the body cut the parts itself.
SCRATCH = (
    "act h res keys slot_of active_id active_start slots offsets sync gfirst gexp bx bh acc dec xs q corr ascale"
    " bc bs itmp"
).split()


@jit
def part(s, lay, i):
    """Part i of MoeKernel's scratch (SCRATCH's order) as bytes."""
    return s[lay[2 * i] : lay[2 * i] + lay[2 * i + 1]]


@jit
def scratch_parts(s, lay):
    """Every part of MoeKernel's scratch, in SCRATCH's order, as its array."""
    return (
        part(s, lay, 0).view(np.float32),  # act
        part(s, lay, 1).view(np.float32),  # h
        part(s, lay, 2).view(np.float32),  # res
        part(s, lay, 3).view(np.int64),  # keys
        part(s, lay, 4).view(np.int64),  # slot_of
        part(s, lay, 5).view(np.int64),  # active_id
        part(s, lay, 6).view(np.int64),  # active_start
        part(s, lay, 7).view(np.int64),  # slots
        part(s, lay, 8).view(np.int64),  # offsets
        part(s, lay, 9).view(np.int64),  # sync
        part(s, lay, 10).view(np.int64),  # gfirst
        part(s, lay, 11).view(np.int64),  # gexp
        part(s, lay, 12).view(np.uint16),  # bx
        part(s, lay, 13).view(np.uint16),  # bh
        part(s, lay, 14).view(np.float32),  # acc
        part(s, lay, 15).view(np.uint16),  # dec
        part(s, lay, 16).view(np.float32),  # xs
        part(s, lay, 17).view(np.int8),  # q
        part(s, lay, 18).view(np.int32),  # corr
        part(s, lay, 19).view(np.float32),  # ascale
        part(s, lay, 20).view(np.float32),  # bc
        part(s, lay, 21).view(np.float32),  # bs
        part(s, lay, 22).view(np.int32),  # itmp
    )


@jit
def int4_views(parts):
    """INT4's views of scratch_parts' bx, bh (int8 and int32: the packed B tiles), q (int32) and dec (bytes)."""
    bx, bh, dec, q = parts[12], parts[13], parts[15], parts[17]
    return (
        bx.view(np.int8),
        bx.view(np.int32),
        bh.view(np.int8),
        bh.view(np.int32),
        q.view(np.int32),
        dec.view(np.uint8),
    )


@jit
def start_call(sync, entered):
    """Zero the phase counters and the timeline; stamp the kernel's entry and the region's start. A call of
    its own: written inside a parallel kernel, `sync[:] = 0` is a parallel region of its own (a fork and a
    join of every thread, ~20 µs after the caches were emptied, before the kernel's one region)."""
    sync[:] = 0
    sync[CALL_STAMPS], sync[CALL_STAMPS + 1] = entered, cycles()


@jit
def take_item(sync, phase):
    """The next unclaimed item of a phase (0, 1, 2, ...); every task calls it until it passes the phase's count."""
    return atomic_add(sync, SYNC_STRIDE * (2 * phase), 1)


@jit
def item_done(sync, phase):
    atomic_add(sync, SYNC_STRIDE * (2 * phase + 1), 1)


@jit
def wait_phase(sync, phase, num_items, task):
    """Wait until every item of the phase is done (their writes are then visible to this task): spin a
    while, then yield the core at each check, as the task still working may need it (more threads than
    free cores: other processes, or a second worker on the same cores). Stamps the wait's start and end."""
    stamps = TASK_STAMPS + SYNC_STRIDE * task + 2 * phase
    sync[stamps] = cycles()
    spins = 0
    while atomic_read(sync, SYNC_STRIDE * (2 * phase + 1)) < num_items:
        if spins < SPINS_BEFORE_YIELD:
            spins += 1
            spin_pause()
        else:
            os_yield()
    sync[stamps + 1] = cycles()


@jit
def stamp(sync, task, slot):
    """The time-stamp counter into task's slot of the call's timeline (TASK_START, TASK_END)."""
    sync[TASK_STAMPS + SYNC_STRIDE * task + slot] = cycles()


@jit
def _head1(gate, i, items, per_expert, rows, ip, hp, active_id, pf, line_elems):
    """Prefetch the head of phase-1 item i's stream in gate (none past the last item)."""
    if i < items:
        e, c = active_id[i // per_expert], i % per_expert
        prefetch_head(gate, (e * ip + c * rows) * hp, (e * ip + min(ip, (c + 1) * rows)) * hp, pf, line_elems)


@jit
def _head2(down, i, items, rows, num_tasks, hp, ip, active_id, pf, line_elems):
    """Prefetch the head of phase-2 item i's first stream (its rows of the first active expert's down)."""
    if i < items:
        e = active_id[0]
        r0, r1 = down_item(i, hp, rows, num_tasks)
        prefetch_head(down, (e * hp + r0) * ip, (e * hp + r1) * ip, pf, line_elems)


# ---------------------------------------------------------------- AMX groups (bf16, fp8)


@jit
def amx_groups(n_active, active_start, amx, gfirst, gexp, min_slots=AMX_MIN_SLOTS):
    """Number the AMX passes (groups of up to 16 slots of one expert): gfirst[a] = active expert a's first
    group, -1 where it runs on the AVX-512 tiles (fewer than min_slots slots, or no AMX); gexp[g] =
    group g's active expert. Returns the number of groups."""
    ng = 0
    for a in range(n_active):
        c = active_start[a + 1] - active_start[a]
        gfirst[a] = ng if amx and c >= min_slots else -1
        if gfirst[a] >= 0:
            for g in _amx_groups_of(a, gfirst, active_start):
                gexp[g] = a
                ng = g + 1
    return ng


@jit
def _amx_group_slots(a, g, gfirst, active_start):
    """(first slot index into slot_of, number of slots) of AMX group g of active expert a."""
    first = active_start[a] + 16 * (g - gfirst[a])
    return first, min(16, active_start[a + 1] - first)


@jit
def _amx_groups_of(a, gfirst, active_start):
    """The AMX groups of active expert a (gfirst[a] >= 0): 16 of its slots each."""
    return range(gfirst[a], gfirst[a] + -(-(active_start[a + 1] - active_start[a]) // 16))


@jit
def pack_chunks(cols):
    """Pack items per AMX group: PACK_COLS columns each. A group's whole row in one item left the phase to
    a few tasks (8 tokens on 8 experts: 8 items for 16), each writing the B tiles' lines one 4-byte pair at
    a time, missing on each. H200 box, DeepSeek-V3 shape, those 8 tokens, caches emptied, old and new
    alternating: the phase FP8 139 -> 79 µs, INT4-g128 100 -> 61, BF16 135 -> 81 (calls of 4-6 ms)."""
    return -(-cols // PACK_COLS)


@jit
def pack_item(i, cols):
    """Pack item i of a row of `cols` columns: (its AMX group, its columns [c0, c1))."""
    chunks = pack_chunks(cols)
    c0 = i % chunks * PACK_COLS
    return i // chunks, c0, min(cols, c0 + PACK_COLS)


@jit
def _amx_pack_x(g, c0, c1, gfirst, gexp, active_start, slot_of, top_k, act, hp, bx):
    """Columns [c0, c1) of group g's tokens as the AMX B tiles of gate and up: bx[16 * hp * g:], one
    512-value block per 32 columns (lanes of missing tokens keep stale values: they only feed output
    columns nobody reads)."""
    first, n = _amx_group_slots(gexp[g], g, gfirst, active_start)
    for i in range(n):
        t = slot_of[first + i] // top_k
        for j in range(c0, c1, 32):
            store_bf16_pairs(bx, 16 * hp * g + 16 * j + 2 * i, 32, vload(act, t * hp + j), vload(act, t * hp + j + 16))


@jit
def _amx_group_weights(a, g, gfirst, active_start, slot_of, weights, res):
    """AMX group g's slot weights as a vector (0 past its slots), by way of res[512:528]."""
    first, n = _amx_group_slots(a, g, gfirst, active_start)
    for i in range(16):
        res[512 + i] = weights[slot_of[first + i]] if i < n else 0.0
    return vload(res, 512)


@jit
def _amx_store_h(gu, g0, w, bh, at):
    """h = w * silu(gate) * up for 16 rows x 16 tokens (gu[g0 + 16 * row + token]: gate; up 256 further),
    rounded to bf16 into bh[at:]: the down projection's B tile rows for these 16 inputs (r0 = at's rows, a
    multiple of 16: the column step of r0, its pairs from (r0 % 32) / 2 on)."""
    for q in range(8):  # rows 2q, 2q+1: one B row of bh, 16 tokens x the pair
        m = g0 + 32 * q
        he = vmul(vmul(silu(vload(gu, m)), vload(gu, 256 + m)), w)
        ho = vmul(vmul(silu(vload(gu, m + 16)), vload(gu, 272 + m)), w)
        store_bf16_interleaved(bh, at + 32 * q, he, ho)


@jit
def _amx_accumulate_pair(res, r0, n, slots, top_k, out, hidden, r, rb):
    """out += an AMX pass's two tile-rows (res[r0:] for rows r.., res[r0 + 256:] for rows rb..; rb == r:
    one tile-row), each transposed in place to [16 * token + row] first, as accumulate_out reads."""
    transpose16(res, r0)
    accumulate_out(res, r0, n, slots, top_k, out, hidden, r)
    if rb != r:
        transpose16(res, r0 + 256)
        accumulate_out(res, r0 + 256, n, slots, top_k, out, hidden, rb)


@jit
def _amx_pack_phase(sync, ng, cfg, gfirst, gexp, active_start, slot_of, top_k, act, hp, bx):
    """A task's part of phase 0: its thread's tile configuration (where the call has AMX groups), then
    the groups' tokens packed as B tiles, PACK_COLS columns of a group an item, claimed one at a time.
    Returns the phase's number of items (the caller waits for them later)."""
    if ng:
        tile_config(cfg)
    items = ng * pack_chunks(hp)
    i = take_item(sync, 0)
    while i < items:
        g, c0, c1 = pack_item(i, hp)
        _amx_pack_x(g, c0, c1, gfirst, gexp, active_start, slot_of, top_k, act, hp, bx)
        item_done(sync, 0)
        i = take_item(sync, 0)
    return items


# ---------------------------------------------------------------- fp8


@jit
def _fp8_scale_acts(src, src0, cols, scale, s0, dst, d0):
    """dst[d0 + j] = src[src0 + j] * scale[s0 + j // 128] * 2**8 (the decoder's 2**-8 undone), each 32
    columns stored as the 16 even ones, then the 16 odd ones (the order load_fp8x64 decodes into)."""
    for cb in range(cols // 128):
        s = vsplat(scale[s0 + cb] * np.float32(256.0))
        for j in range(cb * 128, cb * 128 + 128, 32):
            even, odd = vsplit_parity(vload(src, src0 + j), vload(src, src0 + j + 16))
            vstore(dst, d0 + j, vmul(even, s))
            vstore(dst, d0 + j + 16, vmul(odd, s))


@jit
def _fp8_gate_up(
    e,
    s0,
    s1,
    r0,
    r1,
    hp,
    ip,
    top_k,
    gate,
    gate_s,
    up,
    up_s,
    slot_of,
    weights,
    act,
    h,
    xs,
    x_task,
    xs_row,
    res,
    slots,
    offs,
    pf,
):
    """Rows [r0, r1) (inside one 128-row block) of expert e's gate and up for its slots slot_of[s0:s1] → h."""
    nb_in, rb = hp // 128, r0 // 128
    xg, xu, zero = x_task, x_task + 4 * xs_row, x_task + 8 * xs_row
    first, end = (e * ip + r0) * hp, (e * ip + r1) * hp  # this item's stream in gate, and the same in up
    prefetch_head(up, first, end, pf, 64)  # up's rows follow gate's
    for proj, scale, x0 in ((gate, gate_s, xg), (up, up_s, xu)):  # gate then up: one activation set in L1
        for g0 in range(s0, s1, 4):  # every group of 4 slots over the same rows (they stay in L2)
            n = group_offsets(slot_of, g0, s1, slots, offs, x0, xs_row, zero)
            for i in range(n):
                _fp8_scale_acts(act, (slots[i] // top_k) * hp, hp, scale, (e * (ip // 128) + rb) * nb_in, xs, offs[i])
            for r in range(r0, r1, TILE_ROWS):
                if n == 1:
                    fp8_tile(proj, (e * ip + r) * hp, hp, xs, x0, res, pf, end)
                else:
                    fp8_tile_tokens4(proj, (e * ip + r) * hp, hp, xs, offs, res, pf, end)
                if x0 == xg:
                    store_gate(res, n, slots, h, ip, r)
                else:
                    finish_up(res, n, slots, weights, h, ip, r, True)


@jit
def _fp8_gate_up_amx(
    a, e, r0, r1, hp, ip, gfirst, active_start, slot_of, weights, gate, gate_s, up, up_s, bx, bh, res, acc, dec, pf
):
    """Rows [r0, r1) (inside one 128-row block) of expert e's gate and up for all its slots on AMX tiles;
    h = w * silu(gate x) * up x goes, rounded to bf16, into bh as the B tiles of the down projection."""
    s0 = (e * (ip // 128) + r0 // 128) * (hp // 128)  # the row block's scales
    end = (e * ip + r1) * hp
    prefetch_head(up, (e * ip + r0) * hp, end, pf, 64)  # gate's head is the caller's (_head1)
    g_lo, g_hi = gfirst[a], gfirst[a] + len(_amx_groups_of(a, gfirst, active_start))
    for g0 in range(g_lo, g_hi, AMX_BLOCK_GROUPS):  # each decoded block serves up to AMX_BLOCK_GROUPS groups
        ng = min(AMX_BLOCK_GROUPS, g_hi - g0)
        for r in range(r0, r1, TILE_ROWS):
            row = (e * ip + r) * hp
            fp8_amx_pairs(gate, row, gate_s, s0, up, row, up_s, s0, hp, bx, 16 * hp * g0, ng, dec, res, acc, pf, end)
            for g in range(ng):
                w = _amx_group_weights(a, g0 + g, gfirst, active_start, slot_of, weights, res)
                _amx_store_h(acc, 512 * g, w, bh, 16 * ip * (g0 + g) + 16 * r)


@jit
def _fp8_down_amx(
    a, e, r0, r1, hp, ip, hidden, top_k, gfirst, active_start, slot_of, down, down_s, bh, out, res, acc, dec, slots, pf
):
    """out[t, r0:r1] += expert e's down rows [r0, r1) (inside one 128-row block) . h for all its slots, on
    AMX tiles, two tile-rows a pass."""
    s0 = (e * (hp // 128) + r0 // 128) * (ip // 128)
    end = (e * hp + r1) * ip
    g_lo, g_hi = gfirst[a], gfirst[a] + len(_amx_groups_of(a, gfirst, active_start))
    for g0 in range(g_lo, g_hi, AMX_BLOCK_GROUPS):
        ng = min(AMX_BLOCK_GROUPS, g_hi - g0)
        for r in range(r0, r1, 2 * TILE_ROWS):
            rb = r + TILE_ROWS if r + TILE_ROWS < r1 else r
            fp8_amx_pairs(
                down,
                (e * hp + r) * ip,
                down_s,
                s0,
                down,
                (e * hp + rb) * ip,
                down_s,
                s0,
                ip,
                bh,
                16 * ip * g0,
                ng,
                dec,
                res,
                acc,
                pf,
                end,
            )
            for g in range(ng):
                first, n = _amx_group_slots(a, g0 + g, gfirst, active_start)
                for i in range(n):
                    slots[i] = slot_of[first + i]
                _amx_accumulate_pair(acc, 512 * g, n, slots, top_k, out, hidden, r, rb)


@jit
def _fp8_down(
    r0,
    r1,
    hp,
    ip,
    hidden,
    num_tokens,
    top_k,
    down,
    down_s,
    n_active,
    active_id,
    active_start,
    slot_of,
    h,
    out,
    xs,
    x_task,
    xs_row,
    res,
    slots,
    offs,
    pf,
    gfirst,
    bh,
    acc,
    dec,
):
    """Rows [r0, r1) (inside one 128-row block) of out: every active expert's down, summed in expert order."""
    zero_out_rows(out, num_tokens, hidden, r0, r1)
    nb_in, rb = ip // 128, r0 // 128
    x0, zero = x_task, x_task + 8 * xs_row
    for a in range(n_active):
        e, s0, s1 = active_id[a], active_start[a], active_start[a + 1]
        if a + 1 < n_active:  # the next expert's rows follow this one's
            prefetch_head(down, (active_id[a + 1] * hp + r0) * ip, (active_id[a + 1] * hp + r1) * ip, pf, 64)
        if gfirst[a] >= 0:
            _fp8_down_amx(
                a,
                e,
                r0,
                r1,
                hp,
                ip,
                hidden,
                top_k,
                gfirst,
                active_start,
                slot_of,
                down,
                down_s,
                bh,
                out,
                res,
                acc,
                dec,
                slots,
                pf,
            )
            continue
        end = (e * hp + r1) * ip
        for g0 in range(s0, s1, 4):
            n = group_offsets(slot_of, g0, s1, slots, offs, x0, xs_row, zero)
            for i in range(n):
                _fp8_scale_acts(h, slots[i] * ip, ip, down_s, (e * (hp // 128) + rb) * nb_in, xs, offs[i])
            for r in range(r0, r1, TILE_ROWS):
                if n == 1:
                    fp8_tile(down, (e * hp + r) * ip, ip, xs, x0, res, pf, end)
                else:
                    fp8_tile_tokens4(down, (e * hp + r) * ip, ip, xs, offs, res, pf, end)
                accumulate_out(res, 0, n, slots, top_k, out, hidden, r)


@parallel_jit
def _fp8_layer(
    x,
    ids,
    weights,
    out,
    num_experts,
    gate,
    gate_s,
    up,
    up_s,
    down,
    down_s,
    num_threads,
    pf,
    amx,
    cfg,
    entered,
    act,
    h,
    res,
    keys,
    slot_of,
    active_id,
    active_start,
    slots,
    offsets,
    sync,
    gfirst,
    gexp,
    bx,
    bh,
    acc,
    dec,
    xs,
    q,
    corr,
    ascale,
    bc,
    bs,
    itmp,
):
    """moe_fp8's body: weights f32[S] and out f32[T*H] flat, the scratch's parts as SCRATCH names them.
    x and h are read rounded to bf16 on every path, as in moe_bf16; where `amx`, experts with at least
    AMX_MIN_SLOTS of the call's slots run on AMX tiles (their weights decoded to bf16 a block at a time),
    the others on the AVX-512 tiles."""
    num_tokens, hidden = x.shape
    top_k = ids.shape[1]
    hp = padded_in(hidden)
    ip = gate.size // (num_experts * hp)
    n_active = route(ids, num_experts, keys, slot_of, active_id, active_start)
    if n_active < 0:
        return -1
    load_activations(x, act, hp)
    round_bf16(act, num_tokens * hp)
    ng = amx_groups(n_active, active_start, amx, gfirst, gexp)
    xs_row = max(hp, ip)
    rows1, rows2 = item_rows(ip, n_active, num_threads, hp), item_rows(hp, 1, num_threads, ip)
    per_expert = -(-ip // rows1)
    items1, items2 = n_active * per_expert, down_items(hp, rows2, num_threads)
    start_call(sync, entered)
    for task in prange(num_threads):
        x_task, t_res, t_slots, t_offs = (
            task * 9 * xs_row,
            res[task * 1024 : (task + 1) * 1024],
            slots[task * 16 : (task + 1) * 16],
            offsets[task * 16 : (task + 1) * 16],
        )
        t_acc, t_dec = (
            acc[task * 512 * AMX_BLOCK_GROUPS : (task + 1) * 512 * AMX_BLOCK_GROUPS],
            dec[task * 4096 : (task + 1) * 4096],
        )
        stamp(sync, task, TASK_START)
        items0 = _amx_pack_phase(sync, ng, cfg, gfirst, gexp, active_start, slot_of, top_k, act, hp, bx)
        i = take_item(sync, 1)
        _head1(gate, i, items1, per_expert, rows1, ip, hp, active_id, pf, 64)
        wait_phase(sync, 0, items0, task)
        while i < items1:
            a, c = i // per_expert, i % per_expert
            if gfirst[a] >= 0:
                _fp8_gate_up_amx(
                    a,
                    active_id[a],
                    c * rows1,
                    min(ip, (c + 1) * rows1),
                    hp,
                    ip,
                    gfirst,
                    active_start,
                    slot_of,
                    weights,
                    gate,
                    gate_s,
                    up,
                    up_s,
                    bx,
                    bh,
                    t_res,
                    t_acc,
                    t_dec,
                    pf,
                )
            else:
                _fp8_gate_up(
                    active_id[a],
                    active_start[a],
                    active_start[a + 1],
                    c * rows1,
                    min(ip, (c + 1) * rows1),
                    hp,
                    ip,
                    top_k,
                    gate,
                    gate_s,
                    up,
                    up_s,
                    slot_of,
                    weights,
                    act,
                    h,
                    xs,
                    x_task,
                    xs_row,
                    t_res,
                    t_slots,
                    t_offs,
                    pf,
                )
            item_done(sync, 1)
            i = take_item(sync, 1)
            _head1(gate, i, items1, per_expert, rows1, ip, hp, active_id, pf, 64)
        i = take_item(sync, 2)
        _head2(down, i, items2, rows2, num_threads, hp, ip, active_id, pf, 64)  # in while phase 1 ends
        wait_phase(sync, 1, items1, task)
        while i < items2:
            r0, r1 = down_item(i, hp, rows2, num_threads)
            _fp8_down(
                r0,
                r1,
                hp,
                ip,
                hidden,
                num_tokens,
                top_k,
                down,
                down_s,
                n_active,
                active_id,
                active_start,
                slot_of,
                h,
                out,
                xs,
                x_task,
                xs_row,
                t_res,
                t_slots,
                t_offs,
                pf,
                gfirst,
                bh,
                t_acc,
                t_dec,
            )
            i = take_item(sync, 2)
            _head2(down, i, items2, rows2, num_threads, hp, ip, active_id, pf, 64)
        if ng:
            tile_release()
        stamp(sync, task, TASK_END)
    sync[CALL_STAMPS + 2] = cycles()  # the region's end: every task joined
    return n_active


@jit
def moe_fp8(
    x, ids, topk_weights, y, num_experts, gate, gate_s, up, up_s, down, down_s, num_threads, pf, amx, cfg, s, lay
):
    """FP8 layer: y f32[T, H] = the experts of ids int64[T, K] applied to x f32[T, H], weighted by
    topk_weights f32[T, K]; the weights flat; s, lay MoeKernel's scratch, cut into its parts here."""
    entered = cycles()
    w, out = topk_weights.reshape(-1), y.reshape(-1)
    run = (num_threads, pf, amx, cfg, entered)
    return _fp8_layer(x, ids, w, out, num_experts, gate, gate_s, up, up_s, down, down_s, *run, *scratch_parts(s, lay))


@jit
def padded_in(n):
    return -(-n // PAD) * PAD


# ---------------------------------------------------------------- bf16


@jit
def _bf16_gate_up_amx(a, e, r0, r1, hp, ip, gfirst, active_start, slot_of, weights, gate, up, bx, bh, res, pf):
    """Rows [r0, r1) of expert e's gate and up for all its slots on AMX tiles; h = w * silu(gate x) * up x
    goes, rounded to bf16, straight into bh as the B tiles of the down projection."""
    end = (e * ip + r1) * hp
    prefetch_head(up, (e * ip + r0) * hp, end, pf // 2, 32)  # gate's head is the caller's (_head1)
    for g in _amx_groups_of(a, gfirst, active_start):
        w = _amx_group_weights(a, g, gfirst, active_start, slot_of, weights, res)
        for r in range(r0, r1, TILE_ROWS):
            row = (e * ip + r) * hp
            amx_pair(gate, row, up, row, hp, bx, 16 * hp * g, res, pf, end)  # res[16 * row + token]: gate, then up
            _amx_store_h(res, 0, w, bh, 16 * ip * g + 16 * r)


@jit
def _bf16_down_amx(a, e, r0, r1, hp, ip, hidden, top_k, gfirst, active_start, slot_of, down, bh, out, res, slots, pf):
    """out[t, r0:r1] += expert e's down rows [r0, r1) . h for all its slots, on AMX tiles, two tile-rows a pass."""
    end = (e * hp + r1) * ip
    for g in _amx_groups_of(a, gfirst, active_start):
        first, n = _amx_group_slots(a, g, gfirst, active_start)
        for i in range(n):
            slots[i] = slot_of[first + i]
        for r in range(r0, r1, 2 * TILE_ROWS):
            rb = r + TILE_ROWS if r + TILE_ROWS < r1 else r
            amx_pair(down, (e * hp + r) * ip, down, (e * hp + rb) * ip, ip, bh, 16 * ip * g, res, pf, end)
            _amx_accumulate_pair(res, 0, n, slots, top_k, out, hidden, r, rb)


@jit
def _bf16_gate_up(e, s0, s1, r0, r1, hp, ip, top_k, gate, up, slot_of, weights, act, zero, h, res, slots, offs, pf):
    """Rows [r0, r1) of expert e's gate and up for its slots slot_of[s0:s1] → h."""
    first, end = (e * ip + r0) * hp, (e * ip + r1) * hp  # this item's stream in gate, and the same in up
    prefetch_head(up, first, end, pf // 2, 32)
    for p in range(2):  # gate then up
        proj = gate if p == 0 else up
        for g0 in range(s0, s1, 4):
            n = group_offsets(slot_of, g0, s1, slots, offs, 0, 0, zero)
            for i in range(n):
                offs[i] = (slots[i] // top_k) * hp
            for r in range(r0, r1, TILE_ROWS):
                if n == 1:
                    bf16_tile(proj, (e * ip + r) * hp, hp, act, offs[0], res, pf, end)
                else:
                    bf16_tile_tokens4(proj, (e * ip + r) * hp, hp, act, offs, res, pf, end)
                if p == 0:
                    store_gate(res, n, slots, h, ip, r)
                else:
                    finish_up(res, n, slots, weights, h, ip, r, True)


@jit
def _bf16_down(
    r0,
    r1,
    hp,
    ip,
    hidden,
    num_tokens,
    top_k,
    down,
    n_active,
    active_id,
    active_start,
    slot_of,
    h,
    zero,
    out,
    res,
    slots,
    offs,
    pf,
    gfirst,
    bh,
):
    """Rows [r0, r1) of out: every active expert's down, summed in expert order."""
    zero_out_rows(out, num_tokens, hidden, r0, r1)
    for a in range(n_active):
        e, s0, s1 = active_id[a], active_start[a], active_start[a + 1]
        if a + 1 < n_active:
            prefetch_head(down, (active_id[a + 1] * hp + r0) * ip, (active_id[a + 1] * hp + r1) * ip, pf // 2, 32)
        if gfirst[a] >= 0:
            _bf16_down_amx(
                a, e, r0, r1, hp, ip, hidden, top_k, gfirst, active_start, slot_of, down, bh, out, res, slots, pf
            )
            continue
        end = (e * hp + r1) * ip
        for g0 in range(s0, s1, 4):
            n = group_offsets(slot_of, g0, s1, slots, offs, 0, 0, zero)
            for i in range(n):
                offs[i] = slots[i] * ip
            for r in range(r0, r1, TILE_ROWS):
                if n == 1:
                    bf16_tile(down, (e * hp + r) * ip, ip, h, offs[0], res, pf, end)
                else:
                    bf16_tile_tokens4(down, (e * hp + r) * ip, ip, h, offs, res, pf, end)
                accumulate_out(res, 0, n, slots, top_k, out, hidden, r)


@parallel_jit
def _bf16_layer(
    x,
    ids,
    weights,
    out,
    num_experts,
    gate,
    up,
    down,
    num_threads,
    pf,
    amx,
    cfg,
    entered,
    act,
    h,
    res,
    keys,
    slot_of,
    active_id,
    active_start,
    slots,
    offsets,
    sync,
    gfirst,
    gexp,
    bx,
    bh,
    acc,
    dec,
    xs,
    q,
    corr,
    ascale,
    bc,
    bs,
    itmp,
):
    """moe_bf16's body, as _fp8_layer's. x and h are read rounded to bf16 on every path (the same products
    everywhere; a path changes only the order of sums). Where `amx`, experts with at least AMX_MIN_SLOTS of
    the call's slots run on AMX tiles (phase 0 packs x for them, phase 1 writes their h packed for phase 2);
    the others on the AVX-512 tiles."""
    num_tokens, hidden = x.shape
    top_k = ids.shape[1]
    hp = padded_in(hidden)
    ip = gate.size // (num_experts * hp)
    n_active = route(ids, num_experts, keys, slot_of, active_id, active_start)
    if n_active < 0:
        return -1
    load_activations(x, act, hp)
    round_bf16(act, num_tokens * hp)
    ng = amx_groups(n_active, active_start, amx, gfirst, gexp)
    act_zero, h_zero = (act.size // hp - 1) * hp, (h.size // ip - 1) * ip  # last rows stay zero
    rows1, rows2 = item_rows(ip, n_active, num_threads, 2 * hp), item_rows(hp, 1, num_threads, 2 * ip)
    per_expert = -(-ip // rows1)
    items1, items2 = n_active * per_expert, down_items(hp, rows2, num_threads)
    start_call(sync, entered)
    for task in prange(num_threads):
        t_res, t_slots, t_offs = (
            res[task * 1024 : (task + 1) * 1024],
            slots[task * 16 : (task + 1) * 16],
            offsets[task * 16 : (task + 1) * 16],
        )
        stamp(sync, task, TASK_START)
        items0 = _amx_pack_phase(sync, ng, cfg, gfirst, gexp, active_start, slot_of, top_k, act, hp, bx)
        i = take_item(sync, 1)
        _head1(gate, i, items1, per_expert, rows1, ip, hp, active_id, pf // 2, 32)
        wait_phase(sync, 0, items0, task)
        while i < items1:
            a, c = i // per_expert, i % per_expert
            if gfirst[a] >= 0:
                _bf16_gate_up_amx(
                    a,
                    active_id[a],
                    c * rows1,
                    min(ip, (c + 1) * rows1),
                    hp,
                    ip,
                    gfirst,
                    active_start,
                    slot_of,
                    weights,
                    gate,
                    up,
                    bx,
                    bh,
                    t_res,
                    pf,
                )
            else:
                _bf16_gate_up(
                    active_id[a],
                    active_start[a],
                    active_start[a + 1],
                    c * rows1,
                    min(ip, (c + 1) * rows1),
                    hp,
                    ip,
                    top_k,
                    gate,
                    up,
                    slot_of,
                    weights,
                    act,
                    act_zero,
                    h,
                    t_res,
                    t_slots,
                    t_offs,
                    pf,
                )
            item_done(sync, 1)
            i = take_item(sync, 1)
            _head1(gate, i, items1, per_expert, rows1, ip, hp, active_id, pf // 2, 32)
        i = take_item(sync, 2)
        _head2(down, i, items2, rows2, num_threads, hp, ip, active_id, pf // 2, 32)  # in while phase 1 ends
        wait_phase(sync, 1, items1, task)
        while i < items2:
            r0, r1 = down_item(i, hp, rows2, num_threads)
            _bf16_down(
                r0,
                r1,
                hp,
                ip,
                hidden,
                num_tokens,
                top_k,
                down,
                n_active,
                active_id,
                active_start,
                slot_of,
                h,
                h_zero,
                out,
                t_res,
                t_slots,
                t_offs,
                pf,
                gfirst,
                bh,
            )
            i = take_item(sync, 2)
            _head2(down, i, items2, rows2, num_threads, hp, ip, active_id, pf // 2, 32)
        if ng:
            tile_release()
        stamp(sync, task, TASK_END)
    sync[CALL_STAMPS + 2] = cycles()  # the region's end: every task joined
    return n_active


# ---------------------------------------------------------------- int4


@jit
def moe_bf16(x, ids, topk_weights, y, num_experts, gate, up, down, num_threads, pf, amx, cfg, s, lay):
    """BF16 layer: moe_fp8's contract."""
    entered = cycles()
    w, out = topk_weights.reshape(-1), y.reshape(-1)
    run = (num_threads, pf, amx, cfg, entered)
    return _bf16_layer(x, ids, w, out, num_experts, gate, up, down, *run, *scratch_parts(s, lay))


@jit
def _int4_gate_up(
    e,
    s0,
    s1,
    r0,
    r1,
    hp,
    ip,
    group,
    top_k,
    gate,
    gate_s,
    up,
    up_s,
    slot_of,
    weights,
    q,
    corr,
    ascale,
    zero,
    h,
    res,
    slots,
    qa,
    la,
    pf,
):
    """Rows [r0, r1) of expert e's gate and up for its slots slot_of[s0:s1] → h (int8 activations)."""
    first, end = (e * ip + r0) * (hp // 2), (e * ip + r1) * (hp // 2)  # this item's stream in gate, and the same in up
    prefetch_head(up, first, end, pf, 64)
    prefetch_head(up_s, first * 2 // group, end * 2 // group, pf * (128 // group) // 64, 32)
    for p in range(2):  # gate then up
        proj, scale = (gate, gate_s) if p == 0 else (up, up_s)
        for g0 in range(s0, s1, 4):
            n = group_offsets(slot_of, g0, s1, slots, qa, 0, 0, zero)
            for i in range(4):
                t = slots[i] // top_k if i < n else zero
                qa[i], la[i] = t * hp, t * (hp // 4)
            for r in range(r0, r1, TILE_ROWS):
                row, srow = (e * ip + r) * (hp // 2), (e * ip + r) * (hp // group)
                if n == 1:
                    int4_tile(proj, row, hp, scale, srow, group, q, qa[0], corr, ascale, la[0], res, pf, end)
                else:
                    _int4_tiles(proj, row, hp, scale, srow, group, q, qa, corr, ascale, la, res, pf, end, n)
                if p == 0:
                    store_gate(res, n, slots, h, ip, r)
                else:
                    finish_up(res, n, slots, weights, h, ip, r, False)


@jit
def _int4_tiles(w, row, cols, ws, srow, group, q, qa, corr, ascale, la, res, pf, end, n):
    """16 rows of int4 · 2 <= n <= 4 int8 activations → res[16 * i + r]. Up to INT4_SINGLE_MAX tokens
    take one-token tiles, a pass each (the first streams the rows in, the others read them from L2):
    the 4-token tile's work per token is the same whether its four are real or padding. One core, a
    16 x 7168 tile in L2: one token 2.34 us (g32) and 1.15 (g128), the 4-token tile 7.49 and 4.49."""
    if n > INT4_SINGLE_MAX:
        int4_tile_tokens4(w, row, cols, ws, srow, group, q, qa, corr, ascale, la, res, pf, end)
        return
    for i in range(n):
        int4_tile(w, row, cols, ws, srow, group, q, qa[i], corr, ascale, la[i], res[16 * i :], pf if i == 0 else 0, end)


@jit
def _int4_down(
    r0,
    r1,
    hp,
    ip,
    group,
    hidden,
    num_tokens,
    top_k,
    down,
    down_s,
    n_active,
    active_id,
    active_start,
    slot_of,
    q,
    corr,
    ascale,
    zero,
    out,
    res,
    slots,
    qa,
    la,
    pf,
    gfirst,
    bh8,
    bc,
    bs,
    acc,
    dec,
    tmp,
    slots16,
):
    """Rows [r0, r1) of out: every active expert's down, summed in expert order."""
    zero_out_rows(out, num_tokens, hidden, r0, r1)
    for a in range(n_active):
        e, s0, s1 = active_id[a], active_start[a], active_start[a + 1]
        if a + 1 < n_active:
            _int4_head(down, down_s, active_id[a + 1], hp, r0, r1, ip, group, pf)
        if gfirst[a] >= 0:
            _int4_down_amx(
                a,
                e,
                r0,
                r1,
                hp,
                ip,
                hidden,
                top_k,
                gfirst,
                active_start,
                slot_of,
                down,
                down_s,
                bh8,
                bc,
                bs,
                out,
                acc,
                dec,
                tmp,
                slots16,
                pf,
            )
            continue
        end = (e * hp + r1) * (ip // 2)
        for g0 in range(s0, s1, 4):
            n = group_offsets(slot_of, g0, s1, slots, qa, 0, 0, zero)
            for i in range(4):
                s = slots[i] if i < n else zero
                qa[i], la[i] = s * ip, s * (ip // 4)
            for r in range(r0, r1, TILE_ROWS):
                row, srow = (e * hp + r) * (ip // 2), (e * hp + r) * (ip // group)
                if n == 1:
                    int4_tile(down, row, ip, down_s, srow, group, q, qa[0], corr, ascale, la[0], res, pf, end)
                else:
                    _int4_tiles(down, row, ip, down_s, srow, group, q, qa, corr, ascale, la, res, pf, end, n)
                accumulate_out(res, 0, n, slots, top_k, out, hidden, r)


@jit
def _int4_head(w, ws, e, rows_per_e, r0, r1, cols, group, pf):
    """Prefetch the head of expert e's rows [r0, r1) in w (packed codes) and ws (its scales)."""
    first, end = (e * rows_per_e + r0) * (cols // 2), (e * rows_per_e + r1) * (cols // 2)
    prefetch_head(w, first, end, pf, 64)
    prefetch_head(ws, first * 2 // group, end * 2 // group, pf * (128 // group) // 64, 32)


@jit
def _int4_head1(gate, gate_s, i, items, per_expert, rows, ip, hp, group, active_id, pf):
    if i < items:
        c = i % per_expert
        _int4_head(gate, gate_s, active_id[i // per_expert], ip, c * rows, min(ip, (c + 1) * rows), hp, group, pf)


@jit
def _int4_amx_pack(g, first, n, slot_of, div, q32, cols, c0, c1, corr, ascale, b32, bc, bs):
    """Columns [c0, c1) (whole 128s) of AMX group g's n slots (codes row slot_of[first + i] // div of q: a
    token of x, or a slot of h; cols each) as the B tiles of int4_amx_pairs: b32[4 * cols * g:], 4 codes an
    int32, per 128-column block 32 rows of 16 tokens; and bc, bs[16 * (cols // 128) * g:], per block, the 16
    slots' corrections (-8 x the sum of their codes: quantize_int8's lanes 0-15, the high half folded in)
    and scales, 0 past n (B's lanes there are stale: they only feed sums nobody reads). Each half block is
    its n slots' 16 int32s laid down as rows, then transposed in place."""
    v0 = 16 * (cols // 128) * g
    for c in range(c0 // 128, c1 // 128):
        for half in range(2):
            at = 4 * cols * g + 512 * c + 256 * half
            for i in range(n):
                row = slot_of[first + i] // div
                vstore(b32, at + 16 * i, vload(q32, row * (cols // 4) + 32 * c + 16 * half))
            transpose16(b32, at)
        for i in range(n):
            lanes = slot_of[first + i] // div * (cols // 4) + 32 * c
            bc[v0 + 16 * c + i] = vsum(vcvt(load_i32x16(corr, lanes)))  # exact: |sum| < 2^24
            bs[v0 + 16 * c + i] = ascale[lanes]
        bc[v0 + 16 * c + n : v0 + 16 * c + 16] = 0.0
        bs[v0 + 16 * c + n : v0 + 16 * c + 16] = 0.0


@jit
def _int4_amx_pack_phase(
    sync, task, phase, ng, gfirst, gexp, active_start, slot_of, div, q32, cols, corr, ascale, b32, bc, bs
):
    """A task's part of a pack phase: PACK_COLS columns of an AMX group an item, claimed one at a time, then
    the wait for all of them."""
    items = ng * pack_chunks(cols)
    i = take_item(sync, phase)
    while i < items:
        g, c0, c1 = pack_item(i, cols)
        first, n = _amx_group_slots(gexp[g], g, gfirst, active_start)
        _int4_amx_pack(g, first, n, slot_of, div, q32, cols, c0, c1, corr, ascale, b32, bc, bs)
        item_done(sync, phase)
        i = take_item(sync, phase)
    wait_phase(sync, phase, items, task)


@jit
def _int4_gate_up_amx(
    a,
    e,
    r0,
    r1,
    hp,
    ip,
    gfirst,
    active_start,
    slot_of,
    weights,
    gate,
    gate_s,
    up,
    up_s,
    bx8,
    bc,
    bs,
    h,
    acc,
    dec,
    tmp,
    pf,
):
    """Rows [r0, r1) of expert e's gate and up for all its slots on AMX tiles → h = w * silu(gate x) * up x."""
    end = (e * ip + r1) * (hp // 2)
    prefetch_head(up, (e * ip + r0) * (hp // 2), end, pf, 64)  # gate's head is the caller's (_int4_head1)
    g_lo, g_hi = gfirst[a], gfirst[a] + len(_amx_groups_of(a, gfirst, active_start))
    for g0 in range(g_lo, g_hi, AMX_BLOCK_GROUPS):  # each unpacked block serves up to AMX_BLOCK_GROUPS groups
        ng = min(AMX_BLOCK_GROUPS, g_hi - g0)
        for r in range(r0, r1, TILE_ROWS):
            row, srow = (e * ip + r) * (hp // 2), (e * ip + r) * (hp // 128)
            v0 = 16 * (hp // 128) * g0
            int4_amx_pairs(
                gate,
                row,
                gate_s,
                srow,
                up,
                row,
                up_s,
                srow,
                hp,
                bx8,
                16 * hp * g0,
                bc,
                bs,
                v0,
                ng,
                dec,
                tmp,
                acc,
                pf,
                end,
            )
            for g in range(ng):
                first, n = _amx_group_slots(a, g0 + g, gfirst, active_start)
                transpose16(acc, 512 * g)
                transpose16(acc, 512 * g + 256)
                for i in range(n):
                    sl = slot_of[first + i]
                    gu = 512 * g + 16 * i
                    v = vmul(vmul(silu(vload(acc, gu)), vload(acc, 256 + gu)), vsplat(weights[sl]))
                    vstore(h, sl * ip + r, v)


@jit
def _int4_down_amx(
    a,
    e,
    r0,
    r1,
    hp,
    ip,
    hidden,
    top_k,
    gfirst,
    active_start,
    slot_of,
    down,
    down_s,
    bh8,
    bc,
    bs,
    out,
    acc,
    dec,
    tmp,
    slots,
    pf,
):
    """out[t, r0:r1] += expert e's down rows [r0, r1) . h for all its slots, on AMX tiles, two tile-rows a pass."""
    end = (e * hp + r1) * (ip // 2)
    g_lo, g_hi = gfirst[a], gfirst[a] + len(_amx_groups_of(a, gfirst, active_start))
    for g0 in range(g_lo, g_hi, AMX_BLOCK_GROUPS):
        ng = min(AMX_BLOCK_GROUPS, g_hi - g0)
        for r in range(r0, r1, 2 * TILE_ROWS):
            rb = r + TILE_ROWS if r + TILE_ROWS < r1 else r
            int4_amx_pairs(
                down,
                (e * hp + r) * (ip // 2),
                down_s,
                (e * hp + r) * (ip // 128),
                down,
                (e * hp + rb) * (ip // 2),
                down_s,
                (e * hp + rb) * (ip // 128),
                ip,
                bh8,
                16 * ip * g0,
                bc,
                bs,
                16 * (ip // 128) * g0,
                ng,
                dec,
                tmp,
                acc,
                pf,
                end,
            )
            for g in range(ng):
                first, n = _amx_group_slots(a, g0 + g, gfirst, active_start)
                for i in range(n):
                    slots[i] = slot_of[first + i]
                _amx_accumulate_pair(acc, 512 * g, n, slots, top_k, out, hidden, r, rb)


@jit
def quant_chunk(cols, rows, num_tasks):
    """Inputs per int8-quantization item: a share of rows x cols for each task in whole 128s, at least
    QUANT_MIN_COLS (an item must outweigh its two contended counter updates), at most one row."""
    units = cols // 128
    return 128 * min(units, max(QUANT_MIN_COLS // 128, -(-(rows * units) // num_tasks)))


@parallel_jit
def _int4_layer(
    x,
    ids,
    weights,
    out,
    num_experts,
    group,
    gate,
    gate_s,
    up,
    up_s,
    down,
    down_s,
    num_threads,
    pf,
    amx,
    cfg,
    entered,
    act,
    h,
    res,
    keys,
    slot_of,
    active_id,
    active_start,
    slots,
    offsets,
    sync,
    gfirst,
    gexp,
    bx,
    bh,
    acc,
    dec,
    xs,
    q,
    corr,
    ascale,
    bc,
    bs,
    itmp,
    bx8,
    bx32,
    bh8,
    bh32,
    q32,
    dec8,
):
    """moe_int4's body, as _fp8_layer's, with int4_views' views last: int8 activations (VNNI, and AMX tiles
    where `amx` and the groups are 128 inputs, for experts with INT4_AMX_MIN_SLOTS or more of the call's slots).

    The phases of the one region: quantize x (items of `cx` inputs of a token, each copied into act
    first: no copy of x before the region, where one thread did it alone), pack the AMX groups' x
    as B tiles, gate/up, quantize h (items of `ch` inputs of a slot, and one that zeroes the padding
    row), pack the AMX groups' h, down. The pack phases have no items where no expert runs on AMX.
    """
    num_tokens, hidden = x.shape
    top_k = ids.shape[1]
    n_slots = num_tokens * top_k
    hp = padded_in(hidden)
    ip = gate.size * 2 // (num_experts * hp)
    n_active = route(ids, num_experts, keys, slot_of, active_id, active_start)
    if n_active < 0:
        return -1
    q_rows = q.size // max(hp, ip)
    zero = q_rows - 1
    _zero_row(q, corr, ascale, zero, hp)  # phase 1's padding row lies past every token's codes
    rows1, rows2 = item_rows(ip, n_active, num_threads, hp // 2), item_rows(hp, 1, num_threads, ip // 2)
    cx, ch = quant_chunk(hp, num_tokens, num_threads), quant_chunk(ip, n_slots, num_threads)
    nx, nh = -(-hp // cx), -(-ip // ch)  # items per token, per slot
    per_expert = -(-ip // rows1)
    items1, items2 = n_active * per_expert, down_items(hp, rows2, num_threads)
    ng = amx_groups(n_active, active_start, amx and group == 128, gfirst, gexp, INT4_AMX_MIN_SLOTS)
    start_call(sync, entered)
    for task in prange(num_threads):
        t_res, t_slots = res[task * 128 : (task + 1) * 128], slots[task * 16 : task * 16 + 4]
        t_qa, t_la = offsets[task * 16 : task * 16 + 4], offsets[task * 16 + 4 : task * 16 + 8]
        t_acc, t_dec, t_tmp = (
            acc[task * 512 * AMX_BLOCK_GROUPS : (task + 1) * 512 * AMX_BLOCK_GROUPS],
            dec8[task * 4096 : (task + 1) * 4096],
            itmp[task * 512 : (task + 1) * 512],
        )
        stamp(sync, task, TASK_START)
        if ng:
            tile_config(cfg)
        i = take_item(sync, 0)
        while i < num_tokens * nx:
            t, c0 = i // nx, i % nx * cx
            c1 = min(hp, c0 + cx)
            load_x(x, act, hp, t, c0, c1)  # here rather than before the region: the copy spreads over the tasks
            quantize_int8(act, t * hp + c0, c1 - c0, group, q, t * hp + c0, corr, ascale, (t * hp + c0) // 4)
            item_done(sync, 0)
            i = take_item(sync, 0)
        wait_phase(sync, 0, num_tokens * nx, task)
        _int4_amx_pack_phase(
            sync, task, 4, ng, gfirst, gexp, active_start, slot_of, top_k, q32, hp, corr, ascale, bx32, bc, bs
        )
        i = take_item(sync, 1)
        _int4_head1(gate, gate_s, i, items1, per_expert, rows1, ip, hp, group, active_id, pf)
        while i < items1:
            a, c = i // per_expert, i % per_expert
            if gfirst[a] >= 0:
                _int4_gate_up_amx(
                    a,
                    active_id[a],
                    c * rows1,
                    min(ip, (c + 1) * rows1),
                    hp,
                    ip,
                    gfirst,
                    active_start,
                    slot_of,
                    weights,
                    gate,
                    gate_s,
                    up,
                    up_s,
                    bx8,
                    bc,
                    bs,
                    h,
                    t_acc,
                    t_dec,
                    t_tmp,
                    pf,
                )
            else:
                _int4_gate_up(
                    active_id[a],
                    active_start[a],
                    active_start[a + 1],
                    c * rows1,
                    min(ip, (c + 1) * rows1),
                    hp,
                    ip,
                    group,
                    top_k,
                    gate,
                    gate_s,
                    up,
                    up_s,
                    slot_of,
                    weights,
                    q,
                    corr,
                    ascale,
                    zero,
                    h,
                    t_res,
                    t_slots,
                    t_qa,
                    t_la,
                    pf,
                )
            item_done(sync, 1)
            i = take_item(sync, 1)
            _int4_head1(gate, gate_s, i, items1, per_expert, rows1, ip, hp, group, active_id, pf)
        wait_phase(sync, 1, items1, task)
        i = take_item(sync, 2)
        while i <= n_slots * nh:
            if i == n_slots * nh:
                _zero_row(q, corr, ascale, zero, ip)  # phase 3's padding row (it may overlap x's codes: now unused)
            else:
                sl, c0 = i // nh, i % nh * ch
                quantize_int8(
                    h, sl * ip + c0, min(ch, ip - c0), group, q, sl * ip + c0, corr, ascale, (sl * ip + c0) // 4
                )
            item_done(sync, 2)
            i = take_item(sync, 2)
        wait_phase(sync, 2, n_slots * nh + 1, task)
        _int4_amx_pack_phase(
            sync, task, 5, ng, gfirst, gexp, active_start, slot_of, 1, q32, ip, corr, ascale, bh32, bc, bs
        )
        i = take_item(sync, 3)
        while i < items2:
            r0, r1 = down_item(i, hp, rows2, num_threads)
            _int4_head(down, down_s, active_id[0], hp, r0, r1, ip, group, pf)
            _int4_down(
                r0,
                r1,
                hp,
                ip,
                group,
                hidden,
                num_tokens,
                top_k,
                down,
                down_s,
                n_active,
                active_id,
                active_start,
                slot_of,
                q,
                corr,
                ascale,
                zero,
                out,
                t_res,
                t_slots,
                t_qa,
                t_la,
                pf,
                gfirst,
                bh8,
                bc,
                bs,
                t_acc,
                t_dec,
                t_tmp,
                slots[task * 16 : (task + 1) * 16],
            )
            i = take_item(sync, 3)
        if ng:
            tile_release()
        stamp(sync, task, TASK_END)
    sync[CALL_STAMPS + 2] = cycles()  # the region's end: every task joined
    return n_active


@jit
def moe_int4(
    x, ids, topk_weights, y, num_experts, group, gate, gate_s, up, up_s, down, down_s, num_threads, pf, amx, cfg, s, lay
):
    """INT4 layer: moe_fp8's contract; `group` inputs per scale, the scales as uint16 (float16 bits)."""
    entered = cycles()
    w, out = topk_weights.reshape(-1), y.reshape(-1)
    run, parts = (num_threads, pf, amx, cfg, entered), scratch_parts(s, lay)
    weights = (gate, gate_s, up, up_s, down, down_s)
    return _int4_layer(x, ids, w, out, num_experts, group, *weights, *run, *parts, *int4_views(parts))


@jit
def _zero_row(q, corr, ascale, row, cols):
    """The padding row that missing tokens of a group of 4 point at: codes, corrections, scales 0."""
    q[row * cols : (row + 1) * cols] = 0
    corr[row * (cols // 4) : (row + 1) * (cols // 4)] = 0
    ascale[row * (cols // 4) : (row + 1) * (cols // 4)] = 0.0


# ---------------------------------------------------------------- the Python face


WARM_UP_FORMATS = (ExpertFormat("bf16"), ExpertFormat("fp8"), ExpertFormat("int4", 32), ExpertFormat("int4", 128))


class MoeKernel:
    """Scratch for one layer call of up to `max_tokens` tokens, and the call itself (GIL released).

    prefetch_bytes: how far ahead the tile loops prefetch (> 0 into L1, < 0 into L2, 0 off); see dots.py.
    amx: let layers use AMX tiles for experts with AMX_MIN_SLOTS (int4-g128: INT4_AMX_MIN_SLOTS) or more slots,
    int4-g32 never (None: wherever the CPU and the kernel allow it, jit.amx_usable).
    """

    def __init__(
        self,
        hidden: int,
        inter: int,
        max_tokens: int,
        top_k: int,
        num_threads: int | None = None,
        prefetch_bytes: int = PREFETCH_BYTES,
        amx: bool | None = None,
    ):
        self.hidden, self.inter, self.max_tokens, self.top_k = hidden, inter, max_tokens, top_k
        self._row = (hidden,)
        self.num_threads = min(num_threads or physical_cores(), numba.config.NUMBA_NUM_THREADS)
        self.prefetch_bytes = prefetch_bytes
        self.amx = amx_usable() if amx is None else amx and amx_usable()
        hp, ip = padded(hidden), padded(inter)
        cols = max(hp, ip)
        n_slots = max_tokens * top_k
        nt = self.num_threads
        rows_q = max(max_tokens, n_slots) + 1
        # AMX: an expert with c >= AMX_MIN_SLOTS slots takes ceil(c / 16) <= c / AMX_MIN_SLOTS groups.
        groups = n_slots // AMX_MIN_SLOTS + 1 if self.amx else 1
        block_lanes = groups * (cols // 128) * 16 if self.amx else 16  # bc, bs
        sizes = {  # SCRATCH's parts: (elements, dtype)
            "act": ((max_tokens + 1) * hp, np.float32),  # x padded, + a zero row
            "h": ((n_slots + 1) * ip, np.float32),  # intermediate per slot, + a zero row
            "res": (nt * 1024, np.float32),  # per task: 2 AMX tiles' results (512) and the group's weights
            "keys": (n_slots, np.int64),
            "slot_of": (n_slots, np.int64),
            "active_id": (n_slots, np.int64),
            "active_start": (n_slots + 1, np.int64),
            "slots": (nt * 16, np.int64),  # 4 per task, a line pair apart (no false sharing)
            "offsets": (nt * 16, np.int64),
            # per phase (6 at most: int4): next item, items done; then the call's timeline
            "sync": (TASK_STAMPS + SYNC_STRIDE * nt, np.int64),
            "gfirst": (n_slots, np.int64),
            "gexp": (groups, np.int64),
            # packed x, h per group (pages touched lazily)
            "bx": (groups * 16 * hp if self.amx else 32, np.uint16),
            "bh": (groups * 16 * ip if self.amx else 32, np.uint16),
            "acc": (nt * 512 * AMX_BLOCK_GROUPS if self.amx else 1, np.float32),  # fp8, int4: block sums
            "dec": (nt * 4096 if self.amx else 1, np.uint16),  # fp8, int4: per task, two decoded blocks
            "xs": (nt * 9 * cols, np.float32),  # fp8: per task 4 gate + 4 up scaled rows + a zero row
            "q": (rows_q * cols, np.int8),  # int4: int8 activations (x, then h)
            "corr": (rows_q * cols // 4, np.int32),
            "ascale": (rows_q * cols // 4, np.float32),
            # int4: per AMX group and 128 inputs, 16 slots' corrections and scales; per task one pass's int32 sums
            "bc": (block_lanes, np.float32),
            "bs": (block_lanes, np.float32),
            "itmp": (nt * 512 if self.amx else 16, np.int32),
        }
        assert tuple(sizes) == tuple(SCRATCH)
        # Each part starts on a pair of lines (the adjacent-line prefetcher's unit): sync's counters, a
        # SYNC_STRIDE apart, and the tasks' slices of the per-task parts then never share one.
        self.layout = aligned_zeros(2 * len(SCRATCH), np.int64)
        at = 0
        for k, (n, dtype) in enumerate(sizes.values()):
            nbytes = n * np.dtype(dtype).itemsize
            self.layout[2 * k : 2 * k + 2] = at, nbytes
            at += -(-nbytes // LINE_PAIR) * LINE_PAIR
        self.scratch = aligned_zeros(at, np.uint8, LINE_PAIR)
        # Each part as its array (the kernel cuts the same ones): for the timeline and tests.
        self.parts = {
            name: self.scratch[o : o + nbytes].view(dtype)
            for name, (o, nbytes), (_, dtype) in zip(SCRATCH, self.layout.reshape(-1, 2), sizes.values())
        }
        self.sync = self.parts["sync"]
        self._bound: dict[int, tuple] = {}  # id(layer) -> (layer, kernel, the arguments after x, ids, weights, out)
        self._threads_set = threading.local()

    def run(
        self, x: np.ndarray, topk_ids: np.ndarray, topk_weights: np.ndarray, layer: LayerExperts, out: np.ndarray
    ) -> int:
        """out[T, H] = the layer's routed experts applied to x[T, H]; returns the number of active experts.

        x, out float32 [T, H] C-contiguous; topk_ids int64 [T, K]; topk_weights float32 [T, K].
        """
        # Every step here runs once per layer and token step, as often on caches the weights just swept:
        # each costs a few µs there (the dtypes compared as one tuple: identical objects compare at once).
        bound = self._bound.get(id(layer))
        if bound is None or bound[0] is not layer:
            bound = self._bind(layer)
        if (x.dtype, topk_ids.dtype, topk_weights.dtype, out.dtype) != _DTYPES:
            raise TypeError(
                f"dtypes x {x.dtype}, ids {topk_ids.dtype}, weights {topk_weights.dtype}, out {out.dtype}: "
                "want f32, i64, f32, f32"
            )
        shape = x.shape
        if (
            shape[1:] != self._row
            or out.shape != shape
            or topk_ids.shape != (shape[0], self.top_k)
            or topk_weights.shape != topk_ids.shape
            or shape[0] > self.max_tokens
        ):
            raise ValueError(
                f"x {x.shape}, out {out.shape}, ids {topk_ids.shape}, weights {topk_weights.shape}: kernel made for "
                f"H={self.hidden}, at most {self.max_tokens} tokens, top-{self.top_k}"
            )
        if not (
            x.flags.c_contiguous
            and out.flags.c_contiguous
            and topk_ids.flags.c_contiguous
            and topk_weights.flags.c_contiguous
        ):
            raise ValueError("x, topk_ids, topk_weights and out must be C-contiguous")
        if self._threads_set.__dict__.get("n") != self.num_threads:
            # Per calling thread, once (~3 µs a call otherwise); not callable from cached jitted code. Another
            # set_num_threads() on this thread later only changes how the tasks spread, never the result.
            numba.set_num_threads(self.num_threads)
            self._threads_set.n = self.num_threads
        n_active = bound[1](x, topk_ids, topk_weights, out, *bound[2])
        if n_active < 0:
            raise ValueError(f"topk_ids holds an expert id outside [0, {layer.num_experts})")
        return n_active

    def timeline(self) -> tuple[int, int, int, np.ndarray]:
        """The last call's time stamps, in simd.cycles ticks: the kernel entered, its region started, its
        region ended (every task joined), and per task SYNC_STRIDE slots (2p, 2p + 1: its wait for phase p
        began, ended; TASK_START, TASK_END)."""
        s = self.sync
        entered, region, ended = (int(v) for v in s[CALL_STAMPS : CALL_STAMPS + 3])
        return entered, region, ended, s[TASK_STAMPS:].reshape(-1, SYNC_STRIDE).copy()

    def _bind(self, layer: LayerExperts) -> tuple:
        """(layer, its kernel, the kernel's arguments after x, ids, weights and out), made once per layer."""
        if layer.hidden != self.hidden or layer.inter != self.inter:
            raise ValueError(f"layer H={layer.hidden} I={layer.inter}: kernel made for H={self.hidden} I={self.inter}")
        a, fmt = layer.arrays, layer.fmt
        run = (self.num_threads, self.prefetch_bytes, self.amx, AMX_CONFIG, self.scratch, self.layout)
        if fmt.kind == "fp8":
            fn, args = moe_fp8, _flat(a, "gate", "gate_scale", "up", "up_scale", "down", "down_scale")
        elif fmt.kind == "bf16":
            fn, args = moe_bf16, _flat(a, "gate", "up", "down")
        else:
            weights = _flat(a, "gate", "gate_scale", "up", "up_scale", "down", "down_scale")
            fn, args = moe_int4, (fmt.group_size, *(v.view(np.uint16) if v.dtype == np.float16 else v for v in weights))
        bound = self._bound[id(layer)] = (layer, fn, (layer.num_experts, *args, *run))
        return bound

    def warm_up(self, formats=WARM_UP_FORMATS) -> None:
        """Compile (or load from the cache) every kernel signature, so that no request pays for JIT."""
        rng = np.random.default_rng(0)
        for fmt in formats:
            layer = LayerExperts.allocate(fmt, 2, self.hidden, self.inter)
            for t in (1, min(2, self.max_tokens)):
                x = rng.standard_normal((t, self.hidden)).astype(np.float32)
                ids = np.zeros((t, self.top_k), np.int64)
                ids[:, 0] = 1
                w = np.ones((t, self.top_k), np.float32)
                self.run(x, ids, w, layer, np.empty_like(x))


_DTYPES = (np.dtype(np.float32), np.dtype(np.int64), np.dtype(np.float32), np.dtype(np.float32))


def _flat(arrays: dict[str, np.ndarray], *names: str) -> tuple[np.ndarray, ...]:
    return tuple(arrays[n].reshape(-1) for n in names)


KERNELS = (moe_fp8, moe_bf16, moe_int4)
