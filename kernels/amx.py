"""AMX tiles for the BF16 layer: the tile configuration and one pass of two tile-rows x 16 tokens.

The bf16 pack layout (formats.py) is already an AMX A tile per column step: 16 rows of 32 values, 64
bytes apart. B holds the tokens: per column step, 16 rows (pairs of columns) of 16 tokens x 2 bf16
(simd.store_bf16_pairs, store_bf16_interleaved). Tiles: 0, 1 accumulators (C, 16 x 16 float32);
2, 3 weights (A); 4 tokens (B). Where the CPU lacks AMX the tile operations compile to nothing and
nothing calls them (jit.amx_usable).

Measured (one core of the 2-core dev machine, Sapphire-Rapids class, weights in L2): 16 tokens x 16
rows x 2048 columns at 281 GMAC/s, against 37 for the AVX-512 FMA tile (dots.bf16_tile_tokens4, four
groups of 4); AVX512-BF16's vdpbf16ps in the same tile ran at 32, below the FMA path.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .dots import FASTMATH
from .simd import tile_dp_bf16, tile_load, tile_store, tile_zero

jit = njit(nogil=True, cache=True, fastmath=FASTMATH)
AMX_CONFIG = np.zeros(64, np.uint8)  # ldtilecfg: palette 1, tiles 0-4 of 16 rows x 64 bytes
AMX_CONFIG[0] = 1
AMX_CONFIG[16:26:2] = 64
AMX_CONFIG[48:53] = 16


@jit
def amx_pair(wa, rowa, wb, rowb, cols, b, b0, res):
    """Two 16-row tile-rows (wa at rowa, wb at rowb; bf16 pack layout) · 16 tokens packed at b[b0:] →
    res[16 * r + token] for the first, res[256 + 16 * r + token] for the second."""
    tile_zero(0)
    tile_zero(1)
    for j in range(0, cols, 32):
        tile_load(4, b, b0 + 16 * j, 64)
        tile_load(2, wa, rowa + 16 * j, 64)
        tile_load(3, wb, rowb + 16 * j, 64)
        tile_dp_bf16(0, 2, 4)
        tile_dp_bf16(1, 3, 4)
    tile_store(0, res, 0, 64)
    tile_store(1, res, 256, 64)
