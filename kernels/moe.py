"""The fused routed-expert layer on the CPU: y = sum_k w * down(silu(gate x) * up x), one call.

Shapes: T tokens, K top-k, E experts, H hidden, I expert intermediate; Hp, Ip padded to 128.
A slot is one (token, k) pair, slot = t * K + k; S = T * K slots.

One call runs, with the GIL released:
  route     sort the S slots by expert (tokens that pick the same expert read its weights once)
  phase 1   h[slot, :] = w[slot] * silu(gate_e x_t) * up_e x_t   for every active expert e
  phase 2   y[t, :]   = sum over t's slots of down_e h[slot]
Each phase is one parallel region of exactly `num_threads` tasks. Task i owns a contiguous range of
output rows (of Ip in phase 1, of Hp in phase 2, in whole 16-row tiles) and computes those rows for
every active expert and every slot: every task does the same work whatever the expert loads, no
two tasks write the same output, and each reads one sequential stream per expert and projection.
Per 128 rows, all groups of 4 slots of an expert run before the next rows, so an expert with more
than 4 tokens rereads its rows from L2, not DRAM. INT4 quantizes its activations to int8 in two
short steps (x before phase 1, in a region of its own past a few tokens; h before phase 2).

Measured (bench/kernels.py): a region costs ~2 µs on 2 cores, ~10-12 µs on 16 (omp); a whole call
on a tiny layer ~8 µs on 2 cores, ~22-30 µs on 16.

NOTE: one MoeKernel holds scratch for one call at a time: give each calling thread its own.
NOTE: past 400 lines because the three formats' phases sit side by side: their differences
(activation pre-scaling for FP8, int8 activations for INT4) read at a glance.
"""

from __future__ import annotations

import os
import threading

import numba
import numpy as np
from numba import njit, prange

from .dots import (FASTMATH, TILE_ROWS, bf16_tile, bf16_tile_tokens4, fp8_tile, fp8_tile_tokens4, int4_tile,
                   int4_tile_tokens4, quantize_int8)
from .formats import PAD, ExpertFormat, LayerExperts, padded
from .simd import vadd, vdiv, vexp, vload, vmul, vsplat, vstore

jit = njit(nogil=True, cache=True, fastmath=FASTMATH)
parallel_jit = njit(nogil=True, cache=True, fastmath=FASTMATH, parallel=True)
SLOT_BITS = 20  # routing sort key: expert << SLOT_BITS | slot


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-thread siblings count once)."""
    cpus = os.sched_getaffinity(0)
    cores = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_id") as f_core, \
                 open(f"/sys/devices/system/cpu/cpu{cpu}/topology/physical_package_id") as f_pkg:
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
def row_share(task, num_tasks, rows):
    """Rows [lo, hi) of task `task`: whole tile-rows of 16, as even as possible."""
    units = rows // TILE_ROWS
    q, rem = units // num_tasks, units % num_tasks
    lo = task * q + min(task, rem)
    return TILE_ROWS * lo, TILE_ROWS * (lo + q + (1 if task < rem else 0))


@jit
def load_activations(x, act, hp):
    """act[t, :H] = x[t], zero padding; act has T+1 rows of Hp (the last stays zero)."""
    num_tokens, hidden = x.shape
    for t in range(num_tokens):
        for j in range(hidden):
            act[t * hp + j] = x[t, j]
        for j in range(hidden, hp):
            act[t * hp + j] = 0.0


@jit
def store_gate(res, n, slots, h, ip, r):
    """h[slot, r:r+16] = gate x (res[16 * i + row]) for the n slots of a group."""
    for i in range(n):
        vstore(h, slots[i] * ip + r, vload(res, 16 * i))


@jit
def finish_up(res, n, slots, weights, h, ip, r):
    """h[slot, r:r+16] = weight * silu(h) * up x (res[16 * i + row]) for the n slots of a group."""
    for i in range(n):
        at = slots[i] * ip + r
        g = vload(h, at)
        silu = vdiv(g, vadd(vsplat(1.0), vexp(vmul(g, vsplat(-1.0)))))
        vstore(h, at, vmul(vmul(silu, vload(res, 16 * i)), vsplat(weights[slots[i]])))


@jit
def accumulate_out(res, n, slots, top_k, out, hidden, r):
    """out[t, r:r+16] += res for the n slots of a group (rows past H are padding)."""
    for i in range(n):
        at = (slots[i] // top_k) * hidden + r
        if r + TILE_ROWS <= hidden:
            vstore(out, at, vadd(vload(out, at), vload(res, 16 * i)))
        else:
            for rr in range(hidden - r):
                out[at + rr] += res[16 * i + rr]


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


# ---------------------------------------------------------------- fp8


@jit
def _fp8_scale_acts(src, src0, cols, scale, s0, dst, d0):
    """dst[d0 + j] = src[src0 + j] * scale[s0 + j // 128] * 2**8 (the decoder's 2**-8 undone)."""
    for cb in range(cols // 128):
        s = scale[s0 + cb] * np.float32(256.0)
        for j in range(cb * 128, cb * 128 + 128):
            dst[d0 + j] = src[src0 + j] * s


@jit
def _fp8_gate_up(task, num_tasks, hp, ip, top_k, gate, gate_s, up, up_s, n_active, active_id, active_start,
                 slot_of, weights, act, h, xs, xs_row, res, slots, offs):
    lo, hi = row_share(task, num_tasks, ip)
    nb_in = hp // 128
    xg, xu, zero = task * 9 * xs_row, task * 9 * xs_row + 4 * xs_row, task * 9 * xs_row + 8 * xs_row
    for a in range(n_active):
        e, s0, s1 = active_id[a], active_start[a], active_start[a + 1]
        for rb in range(lo // 128, -(-hi // 128)):  # per 128 rows: every group of 4 slots (rows stay in L2),
            r0, r1 = max(lo, rb * 128), min(hi, rb * 128 + 128)  # gate then up (one activation set in L1)
            for proj, scale, x0 in ((gate, gate_s, xg), (up, up_s, xu)):
                for g0 in range(s0, s1, 4):
                    n = group_offsets(slot_of, g0, s1, slots, offs, x0, xs_row, zero)
                    for i in range(n):
                        _fp8_scale_acts(act, (slots[i] // top_k) * hp, hp, scale, (e * (ip // 128) + rb) * nb_in, xs, offs[i])
                    for r in range(r0, r1, TILE_ROWS):
                        if n == 1:
                            fp8_tile(proj, (e * ip + r) * hp, hp, xs, x0, res)
                        else:
                            fp8_tile_tokens4(proj, (e * ip + r) * hp, hp, xs, offs, res)
                        if x0 == xg:
                            store_gate(res, n, slots, h, ip, r)
                        else:
                            finish_up(res, n, slots, weights, h, ip, r)


@jit
def _fp8_down(task, num_tasks, hp, ip, hidden, num_tokens, top_k, down, down_s, n_active, active_id, active_start,
              slot_of, h, out, xs, xs_row, res, slots, offs):
    lo, hi = row_share(task, num_tasks, hp)
    zero_out_rows(out, num_tokens, hidden, lo, hi)
    nb_in = ip // 128
    x0, zero = task * 9 * xs_row, task * 9 * xs_row + 8 * xs_row
    for a in range(n_active):
        e, s0, s1 = active_id[a], active_start[a], active_start[a + 1]
        for rb in range(lo // 128, -(-hi // 128)):
            for g0 in range(s0, s1, 4):
                n = group_offsets(slot_of, g0, s1, slots, offs, x0, xs_row, zero)
                for i in range(n):
                    _fp8_scale_acts(h, slots[i] * ip, ip, down_s, (e * (hp // 128) + rb) * nb_in, xs, offs[i])
                for r in range(max(lo, rb * 128), min(hi, rb * 128 + 128), TILE_ROWS):
                    if n == 1:
                        fp8_tile(down, (e * hp + r) * ip, ip, xs, x0, res)
                    else:
                        fp8_tile_tokens4(down, (e * hp + r) * ip, ip, xs, offs, res)
                    accumulate_out(res, n, slots, top_k, out, hidden, r)


@parallel_jit
def moe_fp8(x, ids, weights, num_experts, gate, gate_s, up, up_s, down, down_s, out,
            num_threads, act, h, xs, res, keys, slot_of, active_id, active_start, slots, offsets):
    """FP8 layer. x f32[T, H], ids int64[T, K], weights f32[S], out f32[T*H]; the rest flat."""
    num_tokens, hidden = x.shape
    top_k = ids.shape[1]
    hp = padded_in(hidden)
    ip = gate.size // (num_experts * hp)
    n_active = route(ids, num_experts, keys, slot_of, active_id, active_start)
    if n_active < 0:
        return -1
    load_activations(x, act, hp)
    xs_row = max(hp, ip)
    for task in prange(num_threads):
        _fp8_gate_up(task, num_threads, hp, ip, top_k, gate, gate_s, up, up_s, n_active, active_id, active_start,
                     slot_of, weights, act, h, xs, xs_row, res[task * 128:(task + 1) * 128], slots[task * 4:(task + 1) * 4],
                     offsets[task * 16:(task + 1) * 16])
    for task in prange(num_threads):
        _fp8_down(task, num_threads, hp, ip, hidden, num_tokens, top_k, down, down_s, n_active, active_id, active_start,
                  slot_of, h, out, xs, xs_row, res[task * 128:(task + 1) * 128], slots[task * 4:(task + 1) * 4],
                  offsets[task * 16:(task + 1) * 16])
    return n_active


@jit
def padded_in(n):
    return -(-n // PAD) * PAD


# ---------------------------------------------------------------- bf16


@jit
def _bf16_gate_up(task, num_tasks, hp, ip, top_k, gate, up, n_active, active_id, active_start, slot_of, weights,
                  act, zero, h, res, slots, offs):
    lo, hi = row_share(task, num_tasks, ip)
    for a in range(n_active):
        e, s0, s1 = active_id[a], active_start[a], active_start[a + 1]
        for r0 in range(lo, hi, 128):  # per 128 rows: every group of 4 slots, gate then up
            for p in range(2):
                proj = gate if p == 0 else up
                for g0 in range(s0, s1, 4):
                    n = group_offsets(slot_of, g0, s1, slots, offs, 0, 0, zero)
                    for i in range(n):
                        offs[i] = (slots[i] // top_k) * hp
                    for r in range(r0, min(hi, r0 + 128), TILE_ROWS):
                        if n == 1:
                            bf16_tile(proj, (e * ip + r) * hp, hp, act, offs[0], res)
                        else:
                            bf16_tile_tokens4(proj, (e * ip + r) * hp, hp, act, offs, res)
                        if p == 0:
                            store_gate(res, n, slots, h, ip, r)
                        else:
                            finish_up(res, n, slots, weights, h, ip, r)


@jit
def _bf16_down(task, num_tasks, hp, ip, hidden, num_tokens, top_k, down, n_active, active_id, active_start, slot_of,
               h, zero, out, res, slots, offs):
    lo, hi = row_share(task, num_tasks, hp)
    zero_out_rows(out, num_tokens, hidden, lo, hi)
    for a in range(n_active):
        e, s0, s1 = active_id[a], active_start[a], active_start[a + 1]
        for r0 in range(lo, hi, 128):
            for g0 in range(s0, s1, 4):
                n = group_offsets(slot_of, g0, s1, slots, offs, 0, 0, zero)
                for i in range(n):
                    offs[i] = slots[i] * ip
                for r in range(r0, min(hi, r0 + 128), TILE_ROWS):
                    if n == 1:
                        bf16_tile(down, (e * hp + r) * ip, ip, h, offs[0], res)
                    else:
                        bf16_tile_tokens4(down, (e * hp + r) * ip, ip, h, offs, res)
                    accumulate_out(res, n, slots, top_k, out, hidden, r)


@parallel_jit
def moe_bf16(x, ids, weights, num_experts, gate, up, down, out,
             num_threads, act, h, res, keys, slot_of, active_id, active_start, slots, offsets):
    """BF16 layer. Same contract as moe_fp8."""
    num_tokens, hidden = x.shape
    top_k = ids.shape[1]
    hp = padded_in(hidden)
    ip = gate.size // (num_experts * hp)
    n_active = route(ids, num_experts, keys, slot_of, active_id, active_start)
    if n_active < 0:
        return -1
    load_activations(x, act, hp)
    act_zero, h_zero = (act.size // hp - 1) * hp, (h.size // ip - 1) * ip  # last rows stay zero
    for task in prange(num_threads):
        _bf16_gate_up(task, num_threads, hp, ip, top_k, gate, up, n_active, active_id, active_start, slot_of, weights,
                      act, act_zero, h, res[task * 128:(task + 1) * 128], slots[task * 4:(task + 1) * 4],
                      offsets[task * 16:(task + 1) * 16])
    for task in prange(num_threads):
        _bf16_down(task, num_threads, hp, ip, hidden, num_tokens, top_k, down, n_active, active_id, active_start,
                   slot_of, h, h_zero, out, res[task * 128:(task + 1) * 128], slots[task * 4:(task + 1) * 4],
                   offsets[task * 16:(task + 1) * 16])
    return n_active


# ---------------------------------------------------------------- int4


@jit
def _int4_gate_up(task, num_tasks, hp, ip, group, top_k, gate, gate_s, up, up_s, n_active, active_id, active_start,
                  slot_of, weights, q, corr, ascale, zero, h, res, slots, qa, la):
    lo, hi = row_share(task, num_tasks, ip)
    for a in range(n_active):
        e, s0, s1 = active_id[a], active_start[a], active_start[a + 1]
        for r0 in range(lo, hi, 128):  # per 128 rows: every group of 4 slots, gate then up
            for p in range(2):
                proj, scale = (gate, gate_s) if p == 0 else (up, up_s)
                for g0 in range(s0, s1, 4):
                    n = group_offsets(slot_of, g0, s1, slots, qa, 0, 0, zero)
                    for i in range(4):
                        t = slots[i] // top_k if i < n else zero
                        qa[i], la[i] = t * hp, t * (hp // 4)
                    for r in range(r0, min(hi, r0 + 128), TILE_ROWS):
                        row, srow = (e * ip + r) * (hp // 2), (e * ip + r) * (hp // group)
                        if n == 1:
                            int4_tile(proj, row, hp, scale, srow, group, q, qa[0], corr, ascale, la[0], res)
                        else:
                            int4_tile_tokens4(proj, row, hp, scale, srow, group, q, qa, corr, ascale, la, res)
                        if p == 0:
                            store_gate(res, n, slots, h, ip, r)
                        else:
                            finish_up(res, n, slots, weights, h, ip, r)


@jit
def _int4_down(task, num_tasks, hp, ip, group, hidden, num_tokens, top_k, down, down_s, n_active, active_id,
               active_start, slot_of, q, corr, ascale, zero, out, res, slots, qa, la):
    lo, hi = row_share(task, num_tasks, hp)
    zero_out_rows(out, num_tokens, hidden, lo, hi)
    for a in range(n_active):
        e, s0, s1 = active_id[a], active_start[a], active_start[a + 1]
        for r0 in range(lo, hi, 128):
            for g0 in range(s0, s1, 4):
                n = group_offsets(slot_of, g0, s1, slots, qa, 0, 0, zero)
                for i in range(4):
                    s = slots[i] if i < n else zero
                    qa[i], la[i] = s * ip, s * (ip // 4)
                for r in range(r0, min(hi, r0 + 128), TILE_ROWS):
                    row, srow = (e * hp + r) * (ip // 2), (e * hp + r) * (ip // group)
                    if n == 1:
                        int4_tile(down, row, ip, down_s, srow, group, q, qa[0], corr, ascale, la[0], res)
                    else:
                        int4_tile_tokens4(down, row, ip, down_s, srow, group, q, qa, corr, ascale, la, res)
                    accumulate_out(res, n, slots, top_k, out, hidden, r)


@parallel_jit
def moe_int4(x, ids, weights, num_experts, group, gate, gate_s, up, up_s, down, down_s, out,
             num_threads, act, h, q, corr, ascale, res, keys, slot_of, active_id, active_start, slots, offsets):
    """INT4 layer (int8 activations, VNNI). Same contract as moe_fp8; scales as uint16 (float16 bits)."""
    num_tokens, hidden = x.shape
    top_k = ids.shape[1]
    n_slots = num_tokens * top_k
    hp = padded_in(hidden)
    ip = gate.size * 2 // (num_experts * hp)
    n_active = route(ids, num_experts, keys, slot_of, active_id, active_start)
    if n_active < 0:
        return -1
    load_activations(x, act, hp)
    q_rows = q.size // max(hp, ip)
    if num_tokens * hp <= 32768:  # a few tokens: cheaper here than another parallel region (~10 µs on 16 cores)
        for t in range(num_tokens):
            quantize_int8(act, t * hp, hp, group, q, t * hp, corr, ascale, t * (hp // 4))
    else:
        for t in prange(num_tokens):
            quantize_int8(act, t * hp, hp, group, q, t * hp, corr, ascale, t * (hp // 4))
    _zero_row(q, corr, ascale, (q_rows - 1), hp)
    for task in prange(num_threads):
        _int4_gate_up(task, num_threads, hp, ip, group, top_k, gate, gate_s, up, up_s, n_active, active_id,
                      active_start, slot_of, weights, q, corr, ascale, q_rows - 1, h, res[task * 128:(task + 1) * 128],
                      slots[task * 4:(task + 1) * 4], offsets[task * 16:task * 16 + 4], offsets[task * 16 + 4:task * 16 + 8])
    for s in prange(n_slots):
        quantize_int8(h, s * ip, ip, group, q, s * ip, corr, ascale, s * (ip // 4))
    _zero_row(q, corr, ascale, (q_rows - 1), ip)
    for task in prange(num_threads):
        _int4_down(task, num_threads, hp, ip, group, hidden, num_tokens, top_k, down, down_s, n_active, active_id,
                   active_start, slot_of, q, corr, ascale, q_rows - 1, out, res[task * 128:(task + 1) * 128],
                   slots[task * 4:(task + 1) * 4], offsets[task * 16:task * 16 + 4], offsets[task * 16 + 4:task * 16 + 8])
    return n_active


@jit
def _zero_row(q, corr, ascale, row, cols):
    """The padding row that missing tokens of a group of 4 point at: codes, corrections, scales 0."""
    q[row * cols:(row + 1) * cols] = 0
    corr[row * (cols // 4):(row + 1) * (cols // 4)] = 0
    ascale[row * (cols // 4):(row + 1) * (cols // 4)] = 0.0


# ---------------------------------------------------------------- the Python face


class MoeKernel:
    """Scratch for one layer call of up to `max_tokens` tokens, and the call itself (GIL released)."""

    def __init__(self, hidden: int, inter: int, max_tokens: int, top_k: int, num_threads: int | None = None):
        self.hidden, self.inter, self.max_tokens, self.top_k = hidden, inter, max_tokens, top_k
        self.num_threads = min(num_threads or physical_cores(), numba.config.NUMBA_NUM_THREADS)
        hp, ip = padded(hidden), padded(inter)
        cols = max(hp, ip)
        n_slots = max_tokens * top_k
        nt = self.num_threads
        self.act = np.zeros((max_tokens + 1) * hp, np.float32)  # x padded, + a zero row
        self.h = np.zeros((n_slots + 1) * ip, np.float32)  # intermediate per slot, + a zero row
        self.xs = np.zeros(nt * 9 * cols, np.float32)  # fp8: per task 4 gate + 4 up scaled rows + a zero row
        rows_q = max(max_tokens, n_slots) + 1
        self.q = np.zeros(rows_q * cols, np.int8)  # int4: int8 activations (x, then h)
        self.corr = np.zeros(rows_q * cols // 4, np.int32)
        self.ascale = np.zeros(rows_q * cols // 4, np.float32)
        self.res = np.zeros(nt * 128, np.float32)
        self.keys = np.zeros(n_slots, np.int64)
        self.slot_of = np.zeros(n_slots, np.int64)
        self.active_id = np.zeros(n_slots, np.int64)
        self.active_start = np.zeros(n_slots + 1, np.int64)
        self.slots = np.zeros(nt * 4, np.int64)
        self.offsets = np.zeros(nt * 16, np.int64)
        self._bound: dict[int, tuple] = {}  # id(layer) -> (layer, (kernel, weights, scratch))
        self._threads_set = threading.local()

    def run(self, x: np.ndarray, topk_ids: np.ndarray, topk_weights: np.ndarray, layer: LayerExperts,
            out: np.ndarray) -> int:
        """out[T, H] = the layer's routed experts applied to x[T, H]; returns the number of active experts.

        x, out float32 [T, H] C-contiguous; topk_ids int64 [T, K]; topk_weights float32 [T, K].
        """
        num_tokens = x.shape[0]
        if x.dtype != np.float32 or out.dtype != np.float32 or topk_weights.dtype != np.float32 or topk_ids.dtype != np.int64:
            raise TypeError(f"dtypes x {x.dtype}, ids {topk_ids.dtype}, weights {topk_weights.dtype}, out {out.dtype}: want f32, i64, f32, f32")
        if x.shape != (num_tokens, self.hidden) or out.shape != x.shape or layer.hidden != self.hidden or layer.inter != self.inter:
            raise ValueError(f"x {x.shape}, out {out.shape}, layer H={layer.hidden} I={layer.inter}: kernel made for H={self.hidden} I={self.inter}")
        if topk_ids.shape != (num_tokens, self.top_k) or topk_weights.shape != topk_ids.shape or num_tokens > self.max_tokens:
            raise ValueError(f"ids {topk_ids.shape}, weights {topk_weights.shape}: kernel made for at most {self.max_tokens} tokens, top-{self.top_k}")
        if not (x.flags.c_contiguous and out.flags.c_contiguous and topk_ids.flags.c_contiguous and topk_weights.flags.c_contiguous):
            raise ValueError("x, topk_ids, topk_weights and out must be C-contiguous")
        if self._threads_set.__dict__.get("n") != self.num_threads:
            # Per calling thread, once (~3 µs a call otherwise); not callable from cached jitted code. Another
            # set_num_threads() on this thread later only changes how the tasks spread, never the result.
            numba.set_num_threads(self.num_threads)
            self._threads_set.n = self.num_threads
        fn, weights, scratch = self._bind(layer)
        n_active = fn(x, topk_ids, topk_weights.reshape(-1), layer.num_experts, *weights, out.reshape(-1), *scratch)
        if n_active < 0:
            raise ValueError(f"topk_ids holds an expert id outside [0, {layer.num_experts})")
        return n_active

    def _bind(self, layer: LayerExperts) -> tuple:
        """(kernel, the layer's flat weight arrays, this kernel's scratch), made once per layer."""
        bound = self._bound.get(id(layer))
        if bound is not None and bound[0] is layer:
            return bound[1]
        a, fmt = layer.arrays, layer.fmt
        routing = (self.keys, self.slot_of, self.active_id, self.active_start, self.slots)
        if fmt.kind == "fp8":
            args = (moe_fp8, _flat(a, "gate", "gate_scale", "up", "up_scale", "down", "down_scale"),
                    (self.num_threads, self.act, self.h, self.xs, self.res, *routing, self.offsets))
        elif fmt.kind == "bf16":
            args = (moe_bf16, _flat(a, "gate", "up", "down"), (self.num_threads, self.act, self.h, self.res, *routing, self.offsets))
        else:
            weights = [v.view(np.uint16) if v.dtype == np.float16 else v for v in _flat(a, "gate", "gate_scale", "up", "up_scale", "down", "down_scale")]
            args = (moe_int4, (fmt.group_size, *weights), (self.num_threads, self.act, self.h, self.q, self.corr, self.ascale,
                                                            self.res, *routing, self.offsets))
        self._bound[id(layer)] = (layer, args)
        return args

    def warm_up(self, formats=(ExpertFormat("bf16"), ExpertFormat("fp8"), ExpertFormat("int4", 32), ExpertFormat("int4", 128))) -> None:
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


def _flat(arrays: dict[str, np.ndarray], *names: str) -> tuple[np.ndarray, ...]:
    return tuple(arrays[n].reshape(-1) for n in names)


KERNELS = (moe_fp8, moe_bf16, moe_int4)
