"""AMX tiles for the BF16, FP8 and INT4 layers: the tile configuration and passes of two tile-rows x 16 tokens.

The bf16 pack layout (formats.py) is already an AMX A tile per column step: 16 rows of 32 values, 64
bytes apart. B holds the tokens: per column step, 16 rows (pairs of columns) of 16 tokens x 2 bf16
(simd.store_bf16_pairs, store_bf16_interleaved). Tiles: 0, 1 accumulators (C, 16 x 16 float32);
2, 3 weights (A); 4 tokens (B). Where the CPU lacks AMX the tile operations compile to nothing and
nothing calls them (jit.amx_usable).

FP8 weights are decoded to bf16 first (simd.decode_fp8_bf16, exact: an E4M3 value has 4 significant
bits), 128 columns of the two tile-rows at a time into an 8 KiB scratch that stays in L1 (a tile-row
decoded whole to L2 halved the decode rate: 6.7 against 11.3 G codes/s on one dev core). Each 128x128
block has its own scale, so the tiles accumulate one block's columns, and the block's float32 sums are
scaled and added outside AMX: the products stay exact, as on the AVX-512 path. The first group of
tokens multiplies each 32-column step as soon as it is decoded, so that the core decodes the next step
while the tiles work (decoding, then multiplying, a whole block ran the two in sequence).

INT4 (128-input groups) uses the int8 tiles: a block's codes are unpacked to unsigned bytes (the low
nibbles are columns 0-63, the high ones 64-127: two A tiles per tile-row), the tokens' int8 codes are
the B tiles, and tdpbusd sums codes x activations exactly in int32; the codes' -8 offset and the
token's and row's scales are applied per block in float32 (int4_amx_pairs).

Measured (one core of the 2-core dev machine, Sapphire-Rapids class, weights in L2): 16 tokens x 16
rows x 2048 columns at 281 GMAC/s, against 37 for the AVX-512 FMA tile (dots.bf16_tile_tokens4, four
groups of 4); AVX512-BF16's vdpbf16ps in the same tile ran at 32, below the FMA path.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .dots import FASTMATH, prefetch_ahead
from .simd import (
    decode_fp8_bf16,
    load_f16,
    load_i32x16,
    load_u8x64,
    nibbles_hi,
    nibbles_lo,
    store_u8x64,
    tile_dp_bf16,
    tile_dp_u8s8,
    tile_load,
    tile_store,
    tile_zero,
    vadd,
    vcvt,
    vfma,
    vload,
    vmul,
    vsplat,
    vstore,
    vzero,
)

jit = njit(nogil=True, cache=True, fastmath=FASTMATH)
AMX_CONFIG = np.zeros(64, np.uint8)  # ldtilecfg: palette 1, tiles 0-4 of 16 rows x 64 bytes
AMX_CONFIG[0] = 1
AMX_CONFIG[16:26:2] = 64
AMX_CONFIG[48:53] = 16
AMX_BLOCK_GROUPS = (
    8  # groups of 16 tokens that one decoded (fp8) or unpacked (int4) block serves (acc: 512 floats each)
)


@jit
def _amx_step(wa, a0, wb, b0w, b, b0):
    """One column step: the A tiles at wa[a0:], wb[b0w:] (16 rows of 32 bf16, 64 bytes apart) · the B tile
    at b[b0:], into accumulators 0 and 1."""
    tile_load(4, b, b0, 64)
    tile_load(2, wa, a0, 64)
    tile_load(3, wb, b0w, 64)
    tile_dp_bf16(0, 2, 4)
    tile_dp_bf16(1, 3, 4)


@jit
def amx_pair(wa, rowa, wb, rowb, cols, b, b0, res, pf, end):
    """Two 16-row tile-rows (wa at rowa, wb at rowb; bf16 pack layout) · 16 tokens packed at b[b0:] →
    res[16 * r + token] for the first, res[256 + 16 * r + token] for the second. Both weight streams are
    prefetched |pf| bytes ahead up to element `end` (pf 0: not at all), as the AVX-512 tiles do (dots.py)."""
    tile_zero(0)
    tile_zero(1)
    for j in range(0, cols, 32):
        prefetch_ahead(wa, rowa + 16 * j, pf // 2, 16, 32, end)
        prefetch_ahead(wb, rowb + 16 * j, pf // 2, 16, 32, end)
        _amx_step(wa, rowa + 16 * j, wb, rowb + 16 * j, b, b0 + 16 * j)
    tile_store(0, res, 0, 64)
    tile_store(1, res, 256, 64)


@jit
def _fp8_decode_step(wa, at_a, wb, at_b, dec, d0, pf, end):
    """One column step of two fp8 tile-rows (16 rows x 32 codes each, at wa[at_a:], wb[at_b:]) → bf16 A tiles
    at dec[d0:] and dec[2048 + d0:]; both streams prefetched |pf| ahead up to `end`."""
    prefetch_ahead(wa, at_a, pf, 8, 64, end)
    prefetch_ahead(wb, at_b, pf, 8, 64, end)
    for k in range(0, 512, 64):
        decode_fp8_bf16(wa, at_a + k, dec, d0 + k)
        decode_fp8_bf16(wb, at_b + k, dec, 2048 + d0 + k)


@jit
def _fold_block(tmp, fa, fb, acc, a0):
    """acc[a0:a0 + 256] += tmp[0:256] * fa, acc[a0 + 256:a0 + 512] += tmp[256:512] * fb: one block's sums, scaled."""
    for m in range(0, 256, 16):
        vstore(acc, a0 + m, vfma(vload(tmp, m), fa, vload(acc, a0 + m)))
        vstore(acc, a0 + 256 + m, vfma(vload(tmp, 256 + m), fb, vload(acc, a0 + 256 + m)))


@jit
def fp8_amx_pairs(wa, rowa, sa, sa0, wb, rowb, sb, sb0, cols, b, b0, ng, dec, tmp, acc, pf, end):
    """Two fp8 tile-rows (wa at rowa, wb at rowb: E4M3 codes in the pack layout; 128-column block scales
    sa[sa0 + c // 128], sb[sb0 + c // 128]) · ng (<= AMX_BLOCK_GROUPS) groups of 16 tokens packed at
    b[b0 + 16 * cols * g:] → acc[512 g + 16 r + token] for the first, acc[512 g + 256 + 16 r + token] for
    the second. dec: 4096 uint16 (two decoded blocks); tmp: 512 float32. Prefetches both streams |pf|
    ahead up to `end` (an element index past which neither stream is this caller's).

    The first group multiplies each column step as soon as it is decoded, so that the core decodes the
    next step while the tiles work (decoding the whole block first ran the two in sequence; one core,
    weights in L2: dev 13.8 -> 16.7, H200 box 12.6 -> 14.4 G codes/s; dev, from DRAM, 7.8 -> 9.9 GB/s);
    the other groups then multiply the decoded block from L1."""
    for m in range(0, 512 * ng, 16):
        vstore(acc, m, vzero())
    for c in range(0, cols, 128):
        fa, fb = vsplat(sa[sa0 + c // 128] * 256.0), vsplat(sb[sb0 + c // 128] * 256.0)  # 256: the decoder's 2**-8
        tile_zero(0)
        tile_zero(1)
        for j in range(0, 128, 32):
            _fp8_decode_step(wa, rowa + 16 * (c + j), wb, rowb + 16 * (c + j), dec, 16 * j, pf, end)
            _amx_step(dec, 16 * j, dec, 2048 + 16 * j, b, b0 + 16 * (c + j))
        tile_store(0, tmp, 0, 64)
        tile_store(1, tmp, 256, 64)
        _fold_block(tmp, fa, fb, acc, 0)
        for g in range(1, ng):
            amx_pair(dec, 0, dec, 2048, 128, b, b0 + 16 * cols * g + 16 * c, tmp, 0, 0)
            _fold_block(tmp, fa, fb, acc, 512 * g)


@jit
def _unpack_int4(w, at, dec, d0):
    """One int4 tile-row's 128-column block (16 rows x 64 bytes at w[at:]) → its codes as unsigned bytes,
    an AMX A tile each half: dec[d0:] columns 0-63 of the 16 rows (low nibbles), dec[d0 + 1024:] 64-127."""
    for i in range(16):
        v = load_u8x64(w, at + 64 * i)
        store_u8x64(dec, d0 + 64 * i, nibbles_lo(v))
        store_u8x64(dec, d0 + 1024 + 64 * i, nibbles_hi(v))


@jit
def _int4_fold(tmp, t0, ws, s_at, fc, av, acc, a0):
    """acc[a0 + 16 i + token] += (C[i, token] + fc[token]) * av[token] * (row i's scale ws[s_at + i]) for one
    tile's 16 rows (C: int32 at tmp[t0 + 16 i:]). C + fc is exact in float32 (|.| < 2**24)."""
    for i in range(16):
        v = vadd(vcvt(load_i32x16(tmp, t0 + 16 * i)), fc)
        vstore(acc, a0 + 16 * i, vfma(v, vmul(vsplat(load_f16(ws, s_at + i)), av), vload(acc, a0 + 16 * i)))


@jit
def int4_amx_pairs(wa, rowa, sa, sra, wb, rowb, sb, srb, cols, b, b0, bc, bs, v0, ng, dec, tmp, acc, pf, end):
    """Two int4-g128 tile-rows (wa at rowa, wb at rowb: codes in the pack layout; their float16 scales, one
    per row and 128 columns, at sra, srb as formats.py lays them) · ng (<= AMX_BLOCK_GROUPS) groups of 16
    int8 tokens → acc[512 g + 16 r + token] for the first, acc[512 g + 256 + 16 r + token] for the second
    (float32).

    b[b0 + 16 * cols * g:]: group g's tokens as B tiles, per 128-column block 32 rows (4 inputs each) of 16
    tokens x 4 bytes; bc, bs[v0 + 16 * (cols // 128) * g:]: per block, its 16 tokens' -8 x (sum of their
    codes) and their scales. AMX sums codes (0..15) x int8 over the block exactly in int32; the correction
    makes the codes' -8 offset, then the token's and the row's scales scale it: the AVX-512 tile's
    arithmetic (dots.int4_tile), in another order of sums. Each block is unpacked once for all ng groups.
    dec: 4096 bytes (the unpacked codes); tmp: 512 int32. Prefetches both streams and their scales |pf|
    ahead up to `end` (an element index of the codes)."""
    for m in range(0, 512 * ng, 16):
        vstore(acc, m, vzero())
    for c in range(cols // 128):
        at_a, at_b, s_a, s_b = rowa + 1024 * c, rowb + 1024 * c, sra + 16 * c, srb + 16 * c
        prefetch_ahead(wa, at_a, pf, 16, 64, end)
        prefetch_ahead(wb, at_b, pf, 16, 64, end)
        prefetch_ahead(sa, s_a, pf // 64, 1, 32, end // 64)  # scales: 32 bytes per 1 KiB of codes
        prefetch_ahead(sb, s_b, pf // 64, 1, 32, end // 64)
        _unpack_int4(wa, at_a, dec, 0)
        _unpack_int4(wb, at_b, dec, 2048)
        for g in range(ng):
            tile_zero(0)
            tile_zero(1)
            for half in range(2):  # columns 0-63 (the low nibbles), then 64-127
                tile_load(4, b, b0 + 16 * cols * g + 2048 * c + 1024 * half, 64)
                tile_load(2, dec, 1024 * half, 64)
                tile_load(3, dec, 2048 + 1024 * half, 64)
                tile_dp_u8s8(0, 2, 4)
                tile_dp_u8s8(1, 3, 4)
            tile_store(0, tmp, 0, 64)
            tile_store(1, tmp, 256, 64)
            at = v0 + 16 * (cols // 128) * g + 16 * c
            fc, av = vload(bc, at), vload(bs, at)
            _int4_fold(tmp, 0, sa, s_a, fc, av, acc, 512 * g)
            _int4_fold(tmp, 256, sb, s_b, fc, av, acc, 512 * g + 256)
