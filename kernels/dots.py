"""Micro-kernels: one weight tile-row (16 rows, all C columns) times 1 or 4 activation vectors.

Shapes: C columns (a multiple of 128); all arrays flat (1-D, C order). Weights are stored in tiles
of 16 rows (formats.py): `row` is the flat offset of a tile-row, where one column step holds the
16 rows' next 32 values (fp8, bf16) or next 128 values (int4) side by side, so each call reads one
sequential stream. `a*` are flat offsets of activation vectors. Results: res[16 * i + r] for
token i, row r of the tile.

`pf` (bytes, 0 = off): each column step also prefetches the stream that many bytes ahead, into L1
(prefetcht0) for pf > 0 and into L2 only (prefetcht2) at -pf bytes for pf < 0, up to `end` (the
element of w where the caller's stream ends; the caller prefetches the head of its next stream). A core
must keep many lines in flight to stream at its share of the memory bandwidth, and the hardware
prefetchers stop at every 4 KiB page, i.e. every 4-8 column steps here.

Sixteen rows per pass read each activation value once per 16 weight rows: one token's activation
(28 KiB at H = 7168) then stays in L1 beside the weight stream (4 rows per pass spilled it to L2:
11 vs 16 GB/s per core). With 4 tokens the tile is done as 4 passes of 4 rows x 4 tokens (16
accumulators), each weight byte decoded once for all 4 tokens.

Activation formats per weight format:
    bf16  float32 activations
    fp8   float32 activations pre-multiplied by the 128x128 block scale and 2**8, each 32 columns
          stored as their 16 even then their 16 odd ones (simd.load_fp8x64, vsplit_parity)
    int4  int8 codes per group of G inputs, plus per 4-input lane the negated correction
          -8 * sum(codes) (dpbusd of unsigned nibbles then gives sum((nibble - 8) * code)) and
          the activation scale; see quantize_int8()
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .simd import (
    dpbusd,
    load_bf16x16,
    load_f16,
    load_f16_pair,
    load_fp8x64,
    load_i32x16,
    load_u8x64,
    nibbles_hi,
    nibbles_lo,
    prefetch,
    prefetch_l2,
    store_corrections,
    store_rint_s8,
    vcvt,
    vfma,
    vload,
    vmax_abs,
    vmax_lanes,
    vmul,
    vsplat,
    vstore,
    vsum,
    vsums16,
    vzero,
)

FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}  # no nnan/ninf: silu(-inf) stays defined
TILE_ROWS = 16
jit = njit(nogil=True, cache=True, fastmath=FASTMATH)


@jit
def prefetch_ahead(w, at, pf, lines, line_elems, end):
    """Prefetch `lines` cache lines from element at + |pf| of w if that is before `end` (the stream's end:
    what lies past it is another task's): into L1 for pf > 0, into L2 for pf < 0."""
    if pf > 0 and at + pf < end:
        for k in range(lines):
            prefetch(w, at + pf + k * line_elems)
    elif pf < 0 and at - pf < end:
        for k in range(lines):
            prefetch_l2(w, at - pf + k * line_elems)


@jit
def prefetch_head(w, start, end, pf, line_elems):
    """Prefetch the first |pf| elements of the stream w[start:end] before it is read, so that it starts
    at full speed (the tile loops then keep |pf| ahead): into L1 for pf > 0, into L2 for pf < 0."""
    for at in range(start, min(end, start + abs(pf)), line_elems):
        if pf > 0:
            prefetch(w, at)
        else:
            prefetch_l2(w, at)


@jit
def _sums(res, r0, s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15):
    vstore(res, r0, vsums16(s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15))


# ---------------------------------------------------------------- fp8: 512 B per column step


@jit
def _fp8(w, at, x0, x1, acc0, acc1):
    """Two rows' next 32 codes (64 bytes at `at`) · the activation's even (x0) and odd (x1) columns."""
    e0, o0, e1, o1 = load_fp8x64(w, at)
    return vfma(o0, x1, vfma(e0, x0, acc0)), vfma(o1, x1, vfma(e1, x0, acc1))


@jit
def fp8_tile(w, row, cols, a, a0, res, pf, end):
    """16 rows of E4M3 codes · 1 pre-scaled activation → res[0:16]."""
    s0, s1, s2, s3, s4, s5, s6, s7 = vzero(), vzero(), vzero(), vzero(), vzero(), vzero(), vzero(), vzero()
    s8, s9, s10, s11, s12, s13, s14, s15 = vzero(), vzero(), vzero(), vzero(), vzero(), vzero(), vzero(), vzero()
    for j in range(0, cols, 32):
        x0, x1 = vload(a, a0 + j), vload(a, a0 + j + 16)
        b = row + 16 * j
        prefetch_ahead(w, b, pf, 8, 64, end)
        s0, s1 = _fp8(w, b, x0, x1, s0, s1)
        s2, s3 = _fp8(w, b + 64, x0, x1, s2, s3)
        s4, s5 = _fp8(w, b + 128, x0, x1, s4, s5)
        s6, s7 = _fp8(w, b + 192, x0, x1, s6, s7)
        s8, s9 = _fp8(w, b + 256, x0, x1, s8, s9)
        s10, s11 = _fp8(w, b + 320, x0, x1, s10, s11)
        s12, s13 = _fp8(w, b + 384, x0, x1, s12, s13)
        s14, s15 = _fp8(w, b + 448, x0, x1, s14, s15)
    _sums(res, 0, s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15)


@jit
def fp8_tile_tokens4(w, row, cols, a, offs, res, pf, end):
    """16 rows of E4M3 codes · 4 pre-scaled activations at a[offs[i]:] → res[16 * i + r]."""
    a0, a1, a2, a3 = offs[0], offs[1], offs[2], offs[3]
    for sub in range(0, 16, 4):
        p0, p1, p2, p3 = vzero(), vzero(), vzero(), vzero()  # row sub+0, tokens 0..3
        q0, q1, q2, q3 = vzero(), vzero(), vzero(), vzero()  # row sub+1
        u0, u1, u2, u3 = vzero(), vzero(), vzero(), vzero()  # row sub+2
        v0, v1, v2, v3 = vzero(), vzero(), vzero(), vzero()  # row sub+3
        for j in range(0, cols, 32):
            b = row + 16 * j + 32 * sub
            if sub == 0:  # the first pass brings the tile-row in; the other three find it in cache
                prefetch_ahead(w, b, pf, 8, 64, end)
            x0, x1, y0, y1 = vload(a, a0 + j), vload(a, a0 + j + 16), vload(a, a1 + j), vload(a, a1 + j + 16)
            z0, z1, t0, t1 = vload(a, a2 + j), vload(a, a2 + j + 16), vload(a, a3 + j), vload(a, a3 + j + 16)
            e0, o0, e1, o1 = load_fp8x64(w, b)
            p0, p1, p2, p3 = (
                vfma(o0, x1, vfma(e0, x0, p0)),
                vfma(o0, y1, vfma(e0, y0, p1)),
                vfma(o0, z1, vfma(e0, z0, p2)),
                vfma(o0, t1, vfma(e0, t0, p3)),
            )
            q0, q1, q2, q3 = (
                vfma(o1, x1, vfma(e1, x0, q0)),
                vfma(o1, y1, vfma(e1, y0, q1)),
                vfma(o1, z1, vfma(e1, z0, q2)),
                vfma(o1, t1, vfma(e1, t0, q3)),
            )
            e0, o0, e1, o1 = load_fp8x64(w, b + 64)
            u0, u1, u2, u3 = (
                vfma(o0, x1, vfma(e0, x0, u0)),
                vfma(o0, y1, vfma(e0, y0, u1)),
                vfma(o0, z1, vfma(e0, z0, u2)),
                vfma(o0, t1, vfma(e0, t0, u3)),
            )
            v0, v1, v2, v3 = (
                vfma(o1, x1, vfma(e1, x0, v0)),
                vfma(o1, y1, vfma(e1, y0, v1)),
                vfma(o1, z1, vfma(e1, z0, v2)),
                vfma(o1, t1, vfma(e1, t0, v3)),
            )
        _sub_sums(res, sub, p0, p1, p2, p3, q0, q1, q2, q3, u0, u1, u2, u3, v0, v1, v2, v3)


@jit
def _sub_sums(res, sub, p0, p1, p2, p3, q0, q1, q2, q3, u0, u1, u2, u3, v0, v1, v2, v3):
    """4 rows (p, q, u, v) x 4 tokens (0..3) → res[16 * token + sub + row]."""
    res[sub], res[16 + sub], res[32 + sub], res[48 + sub] = vsum(p0), vsum(p1), vsum(p2), vsum(p3)
    res[sub + 1], res[17 + sub], res[33 + sub], res[49 + sub] = vsum(q0), vsum(q1), vsum(q2), vsum(q3)
    res[sub + 2], res[18 + sub], res[34 + sub], res[50 + sub] = vsum(u0), vsum(u1), vsum(u2), vsum(u3)
    res[sub + 3], res[19 + sub], res[35 + sub], res[51 + sub] = vsum(v0), vsum(v1), vsum(v2), vsum(v3)


# ---------------------------------------------------------------- bf16: 1 KiB per column step


@jit
def _bf16(w, at, x0, x1, acc):
    return vfma(load_bf16x16(w, at + 16), x1, vfma(load_bf16x16(w, at), x0, acc))


@jit
def bf16_tile(w, row, cols, a, a0, res, pf, end):
    """16 rows of bf16 · 1 float32 activation → res[0:16]."""
    s0, s1, s2, s3, s4, s5, s6, s7 = vzero(), vzero(), vzero(), vzero(), vzero(), vzero(), vzero(), vzero()
    s8, s9, s10, s11, s12, s13, s14, s15 = vzero(), vzero(), vzero(), vzero(), vzero(), vzero(), vzero(), vzero()
    for j in range(0, cols, 32):
        x0, x1 = vload(a, a0 + j), vload(a, a0 + j + 16)
        b = row + 16 * j
        prefetch_ahead(w, b, pf // 2, 16, 32, end)
        s0, s1, s2, s3 = (
            _bf16(w, b, x0, x1, s0),
            _bf16(w, b + 32, x0, x1, s1),
            _bf16(w, b + 64, x0, x1, s2),
            _bf16(w, b + 96, x0, x1, s3),
        )
        s4, s5, s6, s7 = (
            _bf16(w, b + 128, x0, x1, s4),
            _bf16(w, b + 160, x0, x1, s5),
            _bf16(w, b + 192, x0, x1, s6),
            _bf16(w, b + 224, x0, x1, s7),
        )
        s8, s9, s10, s11 = (
            _bf16(w, b + 256, x0, x1, s8),
            _bf16(w, b + 288, x0, x1, s9),
            _bf16(w, b + 320, x0, x1, s10),
            _bf16(w, b + 352, x0, x1, s11),
        )
        s12, s13, s14, s15 = (
            _bf16(w, b + 384, x0, x1, s12),
            _bf16(w, b + 416, x0, x1, s13),
            _bf16(w, b + 448, x0, x1, s14),
            _bf16(w, b + 480, x0, x1, s15),
        )
    _sums(res, 0, s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15)


@jit
def bf16_tile_tokens4(w, row, cols, a, offs, res, pf, end):
    """16 rows of bf16 · 4 float32 activations at a[offs[i]:] → res[16 * i + r]."""
    a0, a1, a2, a3 = offs[0], offs[1], offs[2], offs[3]
    for sub in range(0, 16, 4):
        p0, p1, p2, p3 = vzero(), vzero(), vzero(), vzero()
        q0, q1, q2, q3 = vzero(), vzero(), vzero(), vzero()
        u0, u1, u2, u3 = vzero(), vzero(), vzero(), vzero()
        v0, v1, v2, v3 = vzero(), vzero(), vzero(), vzero()
        for j in range(0, cols, 32):
            b = row + 16 * j + 32 * sub
            if sub == 0:
                prefetch_ahead(w, row + 16 * j, pf // 2, 16, 32, end)
            x0, x1, y0, y1 = vload(a, a0 + j), vload(a, a0 + j + 16), vload(a, a1 + j), vload(a, a1 + j + 16)
            z0, z1, t0, t1 = vload(a, a2 + j), vload(a, a2 + j + 16), vload(a, a3 + j), vload(a, a3 + j + 16)
            lo, hi = load_bf16x16(w, b), load_bf16x16(w, b + 16)
            p0, p1, p2, p3 = (
                vfma(hi, x1, vfma(lo, x0, p0)),
                vfma(hi, y1, vfma(lo, y0, p1)),
                vfma(hi, z1, vfma(lo, z0, p2)),
                vfma(hi, t1, vfma(lo, t0, p3)),
            )
            lo, hi = load_bf16x16(w, b + 32), load_bf16x16(w, b + 48)
            q0, q1, q2, q3 = (
                vfma(hi, x1, vfma(lo, x0, q0)),
                vfma(hi, y1, vfma(lo, y0, q1)),
                vfma(hi, z1, vfma(lo, z0, q2)),
                vfma(hi, t1, vfma(lo, t0, q3)),
            )
            lo, hi = load_bf16x16(w, b + 64), load_bf16x16(w, b + 80)
            u0, u1, u2, u3 = (
                vfma(hi, x1, vfma(lo, x0, u0)),
                vfma(hi, y1, vfma(lo, y0, u1)),
                vfma(hi, z1, vfma(lo, z0, u2)),
                vfma(hi, t1, vfma(lo, t0, u3)),
            )
            lo, hi = load_bf16x16(w, b + 96), load_bf16x16(w, b + 112)
            v0, v1, v2, v3 = (
                vfma(hi, x1, vfma(lo, x0, v0)),
                vfma(hi, y1, vfma(lo, y0, v1)),
                vfma(hi, z1, vfma(lo, z0, v2)),
                vfma(hi, t1, vfma(lo, t0, v3)),
            )
        _sub_sums(res, sub, p0, p1, p2, p3, q0, q1, q2, q3, u0, u1, u2, u3, v0, v1, v2, v3)


# ---------------------------------------------------------------- int4 (VNNI): 1 KiB per 128 columns
# A column step c covers inputs 128c .. 128c+127: per row 64 bytes (low nibbles: inputs 0-63, high:
# 64-127) and 128/G float16 scales. Activation lanes (per 4 inputs) are laid out per step as
# [32c + l] for the low half's 16 lanes and [32c + 16 + l] for the high half's.


@jit
def _int4(nlo, nhi, ws, s_at, group, alo, ahi, clo, chi, slo, shi, acc):
    """acc + one row's 128 inputs (nibbles nlo, nhi) · one token: dpbusd per half, then scale per lane."""
    if group == 128:  # one scale: both halves share one integer accumulator (clo holds both corrections)
        lanes = dpbusd(dpbusd(clo, nlo, alo), nhi, ahi)
        return vfma(vcvt(lanes), vmul(vsplat(load_f16(ws, s_at)), slo), acc)
    acc = vfma(vcvt(dpbusd(clo, nlo, alo)), vmul(load_f16_pair(ws, s_at), slo), acc)
    return vfma(vcvt(dpbusd(chi, nhi, ahi)), vmul(load_f16_pair(ws, s_at + 2), shi), acc)


@jit
def _int4_row(w, at, ws, s_at, group, alo, ahi, clo, chi, slo, shi, acc):
    v = load_u8x64(w, at)
    return _int4(nibbles_lo(v), nibbles_hi(v), ws, s_at, group, alo, ahi, clo, chi, slo, shi, acc)


@jit
def int4_tile(w, row, cols, ws, srow, group, q, q0, corr, ascale, l0, res, pf, end):
    """16 rows of int4 · 1 int8 activation → res[0:16]. row/srow: offsets of the tile-row's codes/scales."""
    s0, s1, s2, s3, s4, s5, s6, s7 = vzero(), vzero(), vzero(), vzero(), vzero(), vzero(), vzero(), vzero()
    s8, s9, s10, s11, s12, s13, s14, s15 = vzero(), vzero(), vzero(), vzero(), vzero(), vzero(), vzero(), vzero()
    gs = 128 // group  # scales per row per column step
    for c in range(cols // 128):
        alo, ahi = load_u8x64(q, q0 + 128 * c), load_u8x64(q, q0 + 128 * c + 64)
        clo, chi = load_i32x16(corr, l0 + 32 * c), load_i32x16(corr, l0 + 32 * c + 16)
        slo, shi = vload(ascale, l0 + 32 * c), vload(ascale, l0 + 32 * c + 16)
        b, sb = row + 1024 * c, srow + 16 * gs * c
        prefetch_ahead(w, b, pf, 16, 64, end)
        prefetch_ahead(
            ws, sb, pf * gs // 64, max(1, gs // 2), 32, end * 2 // group
        )  # scales: 32 * gs bytes per 1 KiB of codes
        s0 = _int4_row(w, b, ws, sb, group, alo, ahi, clo, chi, slo, shi, s0)
        s1 = _int4_row(w, b + 64, ws, sb + gs, group, alo, ahi, clo, chi, slo, shi, s1)
        s2 = _int4_row(w, b + 128, ws, sb + 2 * gs, group, alo, ahi, clo, chi, slo, shi, s2)
        s3 = _int4_row(w, b + 192, ws, sb + 3 * gs, group, alo, ahi, clo, chi, slo, shi, s3)
        s4 = _int4_row(w, b + 256, ws, sb + 4 * gs, group, alo, ahi, clo, chi, slo, shi, s4)
        s5 = _int4_row(w, b + 320, ws, sb + 5 * gs, group, alo, ahi, clo, chi, slo, shi, s5)
        s6 = _int4_row(w, b + 384, ws, sb + 6 * gs, group, alo, ahi, clo, chi, slo, shi, s6)
        s7 = _int4_row(w, b + 448, ws, sb + 7 * gs, group, alo, ahi, clo, chi, slo, shi, s7)
        s8 = _int4_row(w, b + 512, ws, sb + 8 * gs, group, alo, ahi, clo, chi, slo, shi, s8)
        s9 = _int4_row(w, b + 576, ws, sb + 9 * gs, group, alo, ahi, clo, chi, slo, shi, s9)
        s10 = _int4_row(w, b + 640, ws, sb + 10 * gs, group, alo, ahi, clo, chi, slo, shi, s10)
        s11 = _int4_row(w, b + 704, ws, sb + 11 * gs, group, alo, ahi, clo, chi, slo, shi, s11)
        s12 = _int4_row(w, b + 768, ws, sb + 12 * gs, group, alo, ahi, clo, chi, slo, shi, s12)
        s13 = _int4_row(w, b + 832, ws, sb + 13 * gs, group, alo, ahi, clo, chi, slo, shi, s13)
        s14 = _int4_row(w, b + 896, ws, sb + 14 * gs, group, alo, ahi, clo, chi, slo, shi, s14)
        s15 = _int4_row(w, b + 960, ws, sb + 15 * gs, group, alo, ahi, clo, chi, slo, shi, s15)
    _sums(res, 0, s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15)


@jit
def _int4_token(nlo, nhi, ws, s_at, group, q, qo, corr, ascale, lo, c, acc):
    return _int4(
        nlo,
        nhi,
        ws,
        s_at,
        group,
        load_u8x64(q, qo + 128 * c),
        load_u8x64(q, qo + 128 * c + 64),
        load_i32x16(corr, lo + 32 * c),
        load_i32x16(corr, lo + 32 * c + 16),
        vload(ascale, lo + 32 * c),
        vload(ascale, lo + 32 * c + 16),
        acc,
    )


@jit
def _int4_row_tokens4(w, at, ws, s_at, group, q, qa, corr, ascale, la, c, p0, p1, p2, p3):
    v = load_u8x64(w, at)
    nlo, nhi = nibbles_lo(v), nibbles_hi(v)
    return (
        _int4_token(nlo, nhi, ws, s_at, group, q, qa[0], corr, ascale, la[0], c, p0),
        _int4_token(nlo, nhi, ws, s_at, group, q, qa[1], corr, ascale, la[1], c, p1),
        _int4_token(nlo, nhi, ws, s_at, group, q, qa[2], corr, ascale, la[2], c, p2),
        _int4_token(nlo, nhi, ws, s_at, group, q, qa[3], corr, ascale, la[3], c, p3),
    )


@jit
def int4_tile_tokens4(w, row, cols, ws, srow, group, q, qa, corr, ascale, la, res, pf, end):
    """16 rows of int4 · 4 int8 activations (code offsets qa[i], lane offsets la[i]) → res[16 * i + r]."""
    gs = 128 // group
    for sub in range(0, 16, 4):
        p0, p1, p2, p3 = vzero(), vzero(), vzero(), vzero()
        q0, q1, q2, q3 = vzero(), vzero(), vzero(), vzero()
        u0, u1, u2, u3 = vzero(), vzero(), vzero(), vzero()
        v0, v1, v2, v3 = vzero(), vzero(), vzero(), vzero()
        for c in range(cols // 128):
            b, sb = row + 1024 * c + 64 * sub, srow + 16 * gs * c + gs * sub
            if sub == 0:
                prefetch_ahead(w, b, pf, 16, 64, end)
                prefetch_ahead(ws, sb, pf * gs // 64, max(1, gs // 2), 32, end * 2 // group)
            p0, p1, p2, p3 = _int4_row_tokens4(w, b, ws, sb, group, q, qa, corr, ascale, la, c, p0, p1, p2, p3)
            q0, q1, q2, q3 = _int4_row_tokens4(
                w, b + 64, ws, sb + gs, group, q, qa, corr, ascale, la, c, q0, q1, q2, q3
            )
            u0, u1, u2, u3 = _int4_row_tokens4(
                w, b + 128, ws, sb + 2 * gs, group, q, qa, corr, ascale, la, c, u0, u1, u2, u3
            )
            v0, v1, v2, v3 = _int4_row_tokens4(
                w, b + 192, ws, sb + 3 * gs, group, q, qa, corr, ascale, la, c, v0, v1, v2, v3
            )
        _sub_sums(res, sub, p0, p1, p2, p3, q0, q1, q2, q3, u0, u1, u2, u3, v0, v1, v2, v3)


@jit
def quantize_int8(v, v0, cols, group, q, q0, corr, ascale, l0):
    """Activation v[v0 : v0+cols] (whole 128s) → int8 codes q[q0:], per group s = absmax / 127, code =
    rint(v / s); per 4-input lane (layout above) corr = -8 * sum(codes), ascale = s of the lane's group.
    For G = 128 the high half's corrections are folded into the low half's (one accumulator per step)."""
    for g0 in range(0, cols, group):
        m = vzero()
        for j in range(g0, g0 + group, 16):
            m = vmax_abs(m, vload(v, v0 + j))
        s = vmax_lanes(m) / np.float32(127.0)
        inv = vsplat(np.float32(1.0) / s if s > 0 else np.float32(0.0))
        for j in range(g0, g0 + group, 16):
            store_rint_s8(q, q0 + j, vmul(vload(v, v0 + j), inv))
        for j in range(g0, g0 + group, 4):
            ascale[l0 + (j // 128) * 32 + (j % 64) // 4 + (16 if j % 128 >= 64 else 0)] = s
    for j in range(0, cols, 64):
        store_corrections(corr, l0 + (j // 128) * 32 + (16 if j % 128 >= 64 else 0), load_u8x64(q, q0 + j))
    for c in range(cols // 128 if group == 128 else 0):
        for lane in range(l0 + c * 32, l0 + c * 32 + 16):
            corr[lane] += corr[lane + 16]
