"""simd.py and the generated code: exact E4M3 / bf16 / f16 decoding, and 512-bit vectors in the hot loops."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from hmoe.kernels import jit as kjit
from hmoe.kernels import reference as ref
from hmoe.kernels.dots import quantize_int8
from hmoe.kernels.simd import (
    decode_fp8_bf16,
    dpbusd,
    load_bf16x16,
    load_f16_pair,
    load_fp8x64,
    load_u8x64,
    nibbles_hi,
    nibbles_lo,
    store_bf16_interleaved,
    store_bf16_pairs,
    transpose16,
    vcvt,
    vload,
    vsplit_parity,
    vstore,
)

AVX512 = kjit.has_cpu_feature("avx512f")


@njit
def _decode_fp8(codes, out):
    """Back to column order: load_fp8x64 gives (row 0 even, row 0 odd, row 1 even, row 1 odd) columns."""
    tmp = np.empty(16, np.float32)
    for i in range(0, codes.size, 64):
        vecs = load_fp8x64(codes, i)
        for k in range(4):
            vstore(tmp, 0, vecs[k])
            for lane in range(16):
                out[i + 32 * (k // 2) + 2 * lane + k % 2] = tmp[lane]


@njit
def _split(x, even, odd):
    e, o = vsplit_parity(vload(x, 0), vload(x, 16))
    vstore(even, 0, e)
    vstore(odd, 0, o)


def test_all_256_e4m3_codes_decode_exactly():
    codes = np.arange(256, dtype=np.uint8)
    out = np.empty(256, np.float32)
    _decode_fp8(codes, out)
    finite = (codes & 0x7F) != 0x7F
    want = ref.FP8_VALUES * 2.0**-8  # the decoder's documented 2**-8 factor
    assert np.array_equal(out[finite].astype(np.float64), want[finite])  # subnormals and ±448 exactly
    assert np.signbit(out[0x80]) and out[0x80] == 0  # negative zero keeps its sign
    assert out[0x7F] == 480 * 2.0**-8 and out[0xFF] == -480 * 2.0**-8  # NaN codes: never stored (encoder rejects them)
    shuffled = np.random.default_rng(0).permutation(256).astype(np.uint8)  # every code in both byte positions
    _decode_fp8(shuffled, out)
    assert np.array_equal(out[(shuffled & 0x7F) != 0x7F].astype(np.float64), want[shuffled][(shuffled & 0x7F) != 0x7F])
    x, even, odd = np.arange(32, dtype=np.float32), np.empty(16, np.float32), np.empty(16, np.float32)
    _split(x, even, odd)
    assert even.tolist() == list(range(0, 32, 2)) and odd.tolist() == list(range(1, 32, 2))


@njit
def _fp8_to_bf16(codes, out):
    for i in range(0, codes.size, 64):
        decode_fp8_bf16(codes, i, out, i)


def test_e4m3_codes_become_bf16_exactly_in_place():
    """What the FP8 AMX path feeds its tiles: every finite code, in both bytes of a word and in either row,
    as the bf16 of value * 2**-8, at its own position; the smallest code stays a normal bf16 (AMX flushes
    subnormal inputs)."""
    codes = np.random.default_rng(1).permutation(np.r_[np.arange(256), np.arange(256)]).astype(np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3C  # NaN codes are never stored (the encoder rejects them)
    out = np.empty(codes.size, np.uint16)
    _fp8_to_bf16(codes, out)
    assert np.array_equal(ref.dequantize_bf16(out), ref.FP8_VALUES[codes] * 2.0**-8)
    smallest = out[codes == 0x01]
    assert ((smallest >> 7) & 0xFF).min() > 0  # exponent field: normal, 2**-17


@njit
def _decode_bf16(bits, out):
    for i in range(0, bits.size, 16):
        vstore(out, i, load_bf16x16(bits, i))


@njit
def _f16_pairs(bits, out):
    for i in range(0, bits.size, 2):
        vstore(out, 8 * i, load_f16_pair(bits, i))


def test_bf16_and_f16_decode_exactly():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(64).astype(np.float32)
    bits = ref.quantize_bf16(x)
    out = np.empty(64, np.float32)
    _decode_bf16(bits, out)
    assert np.array_equal(out, ref.dequantize_bf16(bits).astype(np.float32))
    h = rng.standard_normal(4).astype(np.float16)
    out = np.empty(32, np.float32)
    _f16_pairs(h.view(np.uint16), out)
    assert np.array_equal(out, np.repeat(h.astype(np.float32), 8))


@njit
def _dot_nibbles(packed, act, corr, out):
    v = load_u8x64(packed, 0)
    vstore(out, 0, vcvt(dpbusd(load_i32(corr), nibbles_lo(v), load_u8x64(act, 0))))
    vstore(out, 16, vcvt(dpbusd(load_i32(corr), nibbles_hi(v), load_u8x64(act, 64))))


from hmoe.kernels.simd import load_i32x16  # noqa: E402


@njit
def load_i32(a):
    return load_i32x16(a, 0)


def test_dpbusd_on_nibbles_is_exact():
    rng = np.random.default_rng(1)
    packed = rng.integers(0, 256, 64, dtype=np.uint8)
    act = rng.integers(-127, 128, 128).astype(np.int8)
    corr = rng.integers(-1000, 1000, 16).astype(np.int32)
    out = np.empty(32, np.float32)
    _dot_nibbles(packed, act, corr, out)
    lo, hi = (packed & 15).astype(np.int64), (packed >> 4).astype(np.int64)
    a = act.astype(np.int64)
    want_lo = corr + (lo * a[:64]).reshape(16, 4).sum(1)
    want_hi = corr + (hi * a[64:]).reshape(16, 4).sum(1)
    assert np.array_equal(out, np.r_[want_lo, want_hi].astype(np.float32))


@pytest.mark.parametrize("group", [32, 128])
def test_quantize_int8_codes_scales_and_corrections(group):
    """quantize_int8's contract, in float32 as it computes: per group s = absmax / 127 and code =
    rint(v * (1 / s)), ties to even; per 4-input lane (64 inputs: 16 lanes, the low half of a 128-input
    step at 32c, the high at 32c + 16) the group's s and -8 x the lane's codes' sum, the high half's sums
    folded into the low half's for G = 128. Random values, exact ties, an all-zero group, and offsets; nothing
    written outside the three ranges."""
    rng = np.random.default_rng(group)
    cols, v0, q0, l0 = 640, 48, 64, 96
    v = (rng.standard_normal(v0 + cols) * 4).astype(np.float32)
    v[v0 : v0 + group] = 0  # s = 0: codes 0
    ties = v0 + group + np.arange(0, group, 3)
    v[ties] = rng.integers(-40, 40, ties.size) + np.float32(0.5)
    v[v0 + group] = 127  # that group's s is 1: its ties stay ties
    q = np.full(q0 + cols + 64, 99, np.int8)
    corr = np.full(l0 + cols // 4 + 16, 7, np.int32)
    ascale = np.full_like(corr, np.nan, dtype=np.float32)
    quantize_int8(v, v0, cols, group, q, q0, corr, ascale, l0)

    g = v[v0 : v0 + cols].reshape(-1, group)
    lanes = l0 + np.array([(j // 128) * 32 + (j % 64) // 4 + (16 if j % 128 >= 64 else 0) for j in range(0, cols, 4)])
    s = ascale[lanes][:: group // 4]  # its scales (absmax x 1/127 under fastmath: an ulp from absmax / 127)
    assert np.allclose(s, np.abs(g).max(axis=1) / np.float32(127), rtol=2**-22, atol=0)
    assert np.array_equal(ascale[lanes], np.repeat(s, group // 4))
    inv = np.where(s > 0, np.float32(1) / np.where(s > 0, s, 1), 0).astype(np.float32)
    codes = np.rint(g * inv[:, None]).astype(np.int8).reshape(-1)
    assert np.array_equal(q[q0 : q0 + cols], codes)
    assert (q[:q0] == 99).all() and (q[q0 + cols :] == 99).all()
    assert np.array_equal(codes[(ties - v0)[1:]] % 2, np.zeros(ties.size - 1, np.int8))  # ties went to even
    sums = -8 * codes.astype(np.int32).reshape(-1, 4).sum(axis=1)  # per lane, in input order
    want = sums.copy()
    if group == 128:
        low = (np.arange(cols // 4) % 32) < 16
        want[low] += sums[~low]
    assert np.array_equal(corr[lanes], want)
    assert (corr[:l0] == 7).all() and (corr[l0 + cols // 4 :] == 7).all()
    assert np.isnan(ascale[:l0]).all() and np.isnan(ascale[l0 + cols // 4 :]).all()


ASM_PROBE = r"""
import json, sys
import numpy as np
from hmoe.kernels import dots, moe
cols, w8, w16 = 128, np.zeros(16 * 128, np.uint8), np.zeros(16 * 128, np.uint16)
a, res, offs = np.ones(4 * cols, np.float32), np.zeros(128, np.float32), np.zeros(4, np.int64)
q, corr, ws = np.zeros(4 * cols, np.int8), np.zeros(cols, np.int32), np.zeros(64, np.uint16)
dots.fp8_tile(w8, 0, cols, a, 0, res, 4096, w8.size)
dots.fp8_tile_tokens4(w8, 0, cols, a, offs, res, 4096, w8.size)
dots.bf16_tile(w16, 0, cols, a, 0, res, 4096, w16.size)
dots.int4_tile(w8, 0, cols, ws, 0, 32, q, 0, corr, a, 0, res, 4096, w8.size)
moe._fp8_scale_acts(a, 0, cols, a, 0, a, cols)
dots.quantize_int8(a, 0, cols, 128, q, 0, corr, a, 0)
print(json.dumps({f.__name__: "\n".join(f.inspect_asm().values()) for f in
                  (dots.fp8_tile, dots.fp8_tile_tokens4, dots.bf16_tile, dots.int4_tile, moe._fp8_scale_acts,
                   dots.quantize_int8)}))
"""


@njit
def _transpose_at(a, at):
    transpose16(a, at)


@njit
def _pairs(dst, at, stride, v):
    store_bf16_pairs(dst, at, stride, vload(v, 0), vload(v, 16))


@njit
def _interleaved(dst, at, v):
    store_bf16_interleaved(dst, at, vload(v, 0), vload(v, 16))


def test_the_amx_packing_helpers_transpose_and_round_to_bf16_exactly():
    """What the AMX path builds its tiles with: a 16 x 16 transpose in place, and float32 -> bf16 (round to
    nearest even, as reference.quantize_bf16) stored as column pairs or as interleaved lanes."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal(600).astype(np.float32)
    b = a.copy()
    _transpose_at(b, 256)
    assert np.array_equal(b[256:512].reshape(16, 16), a[256:512].reshape(16, 16).T)
    assert np.array_equal(b[:256], a[:256]) and np.array_equal(b[512:], a[512:])
    v = (rng.standard_normal(32) * 10.0 ** rng.integers(-30, 30, 32)).astype(np.float32)
    v[:4] = [1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -0.0, np.float32(3.0e38)]  # ties to even, a sign, near the top
    want = ref.quantize_bf16(v)
    dst = np.zeros(600, np.uint16)
    _pairs(dst, 5, 32, v)
    for p in range(16):  # pair p (columns 2p, 2p+1) at 5 + 32p
        assert dst[5 + 32 * p] == want[2 * p] and dst[6 + 32 * p] == want[2 * p + 1]
    assert np.count_nonzero(dst) == np.count_nonzero(want)  # nothing written elsewhere
    dst = np.zeros(40, np.uint16)
    _interleaved(dst, 3, v)
    assert np.array_equal(dst[3:35:2], want[:16]) and np.array_equal(dst[4:36:2], want[16:])
    assert not dst[:3].any() and not dst[35:].any()


@pytest.mark.skipif(not AVX512, reason="CPU without AVX-512")
def test_hot_loops_use_512_bit_vectors(tmp_path):
    """The tile kernels (explicit vectors) and the auto-vectorized glue both emit zmm code.

    Compiled afresh in a child with an empty cache dir: functions loaded from the cache carry no assembly.
    """
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    asm = json.loads(
        subprocess.run([sys.executable, "-c", ASM_PROBE], env=env, capture_output=True, text=True, check=True).stdout
    )
    wanted = {
        "fp8_tile": ("vcvtph2ps", "vfmadd"),
        "fp8_tile_tokens4": ("vcvtph2ps", "vfmadd"),
        "bf16_tile": ("vfmadd",),
        "int4_tile": ("vpdpbusd", "vpmaddubsw"),
        "_fp8_scale_acts": ("vmulps",),
        "quantize_int8": ("vcvtps2dq",),
    }
    for name, mnemonics in wanted.items():
        zmm_lines = [ln for ln in asm[name].splitlines() if "zmm" in ln]
        assert any(any(m in ln for m in mnemonics) for ln in zmm_lines), (name, mnemonics)
    if kjit.has_cpu_feature("avx512vnni"):
        assert any("vpdpbusd" in ln and "zmm" in ln for ln in asm["int4_tile"].splitlines())
    for name in ("fp8_tile", "fp8_tile_tokens4", "bf16_tile", "int4_tile"):  # the weight stream is prefetched ahead
        assert "prefetcht0" in asm[name], name


def test_cache_dir_is_configurable(tmp_path):
    """A service points the kernel cache at a directory it can write; compiled kernels land there."""
    import os
    import subprocess
    import sys

    code = (
        "from hmoe.kernels import jit; n = jit.use_cache_dir({!r}); "
        "from hmoe.kernels.formats import e4m3_code; assert e4m3_code(1.0) == 0x38; print(n)".format(
            str(tmp_path / "cache")
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert int(out.split()[-1]) > 20
    assert any(p.suffix == ".nbi" for p in (tmp_path / "cache").rglob("*"))
