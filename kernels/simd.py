"""Explicit 512-bit vectors for Numba kernels: three value types and the few operations they need.

LLVM's auto-vectorizer decides widths, unrolling and gathers on its own; for the decode loops it
chose ymm, gathers or per-block reductions (tests/kernels/test_simd.py reads the assembly for
zmm). These intrinsics pin the instruction shapes instead, and the loops around them stay plain
Numba:

    f32x16   <16 x float>   accumulators, activations
    i32x16   <16 x i32>     integer dot-product accumulators (VNNI)
    u8x64    <64 x i8>      raw weight / activation bytes

and the AMX tile operations (tile_*), by tile register number (a compile-time constant).

Every load reads at `arr.ctypes.data + i * itemsize` with no bounds check: the callers check
shapes once, in their Python wrappers. Loads are unaligned (vmovups costs the same on aligned data).

Past 400 lines because every intrinsic is an llvmlite codegen body of its own, and they read best
side by side, grouped by vector type.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, models, register_model

from .jit import amx_targeted, has_cpu_feature

F32 = ir.FloatType()
HALF = ir.HalfType()
I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
V16F = ir.VectorType(F32, 16)
V16I = ir.VectorType(I32, 16)
V64B = ir.VectorType(I8, 64)


class _VectorType(types.Type):
    def __init__(self, name: str):
        super().__init__(name=name)


f32x16 = _VectorType("f32x16")
i32x16 = _VectorType("i32x16")
u8x64 = _VectorType("u8x64")
_LLVM_OF = {"f32x16": V16F, "i32x16": V16I, "u8x64": V64B}


@register_model(_VectorType)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _LLVM_OF[fe_type.name])


def _ptr(context, builder, arrty, arr, idx, idxty, elem: ir.Type):
    """Address of arr[idx] (flat, C order) as a pointer to `elem`."""
    data = context.make_array(arrty)(context, builder, arr).data
    i = context.cast(builder, idx, idxty, types.intp)
    return builder.bitcast(builder.gep(data, [i]), elem.as_pointer())


def _consts(ty: ir.Type, values) -> ir.Constant:
    return ir.Constant(ir.VectorType(ty, len(values)), [ir.Constant(ty, v) for v in values])


def _llvm_fn(builder, name: str, ret: ir.Type, args: list[ir.Type]):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


# ---------------------------------------------------------------- float vectors


@intrinsic
def vzero(typingctx):
    """16 zeros."""

    def codegen(context, builder, sig, args):
        return ir.Constant(V16F, None)

    return f32x16(), codegen


@intrinsic
def vsplat(typingctx, value):
    """16 copies of a float32 scalar."""

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], types.float32)
        lane = builder.insert_element(ir.Constant(V16F, ir.Undefined), v, ir.Constant(I32, 0))
        return builder.shuffle_vector(lane, lane, ir.Constant(V16I, None))

    return f32x16(value), codegen


@intrinsic
def vload(typingctx, arr, idx):
    """arr[idx : idx+16] of a float32 array."""

    def codegen(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], V16F), align=4)

    return f32x16(arr, idx), codegen


@intrinsic
def vstore(typingctx, arr, idx, vec):
    """arr[idx : idx+16] = vec for a float32 array."""

    def codegen(context, builder, sig, args):
        builder.store(args[2], _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], V16F), align=4)
        return context.get_dummy_value()

    return types.void(arr, idx, vec), codegen


@intrinsic
def vfma(typingctx, a, b, c):
    """a * b + c, one rounding."""

    def codegen(context, builder, sig, args):
        return builder.call(_llvm_fn(builder, "llvm.fma.v16f32", V16F, [V16F] * 3), list(args))

    return f32x16(a, b, c), codegen


@intrinsic
def vadd(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return builder.fadd(*args)

    return f32x16(a, b), codegen


@intrinsic
def vmul(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return builder.fmul(*args)

    return f32x16(a, b), codegen


@intrinsic
def vmax_abs(typingctx, m, vec):
    """max(m, |vec|) per lane."""

    def codegen(context, builder, sig, args):
        fabs = _llvm_fn(builder, "llvm.fabs.v16f32", V16F, [V16F])
        maxnum = _llvm_fn(builder, "llvm.maxnum.v16f32", V16F, [V16F, V16F])
        return builder.call(maxnum, [args[0], builder.call(fabs, [args[1]])])

    return f32x16(m, vec), codegen


@intrinsic
def vmax_lanes(typingctx, vec):
    """The largest of the 16 lanes (a shuffle tree, as vsum)."""

    def codegen(context, builder, sig, args):
        v, width = args[0], 16
        while width > 1:
            width //= 2
            maxnum = _llvm_fn(
                builder, f"llvm.maxnum.v{width}f32", ir.VectorType(F32, width), [ir.VectorType(F32, width)] * 2
            )
            lo = builder.shuffle_vector(v, v, _consts(I32, range(width)))
            hi = builder.shuffle_vector(v, v, _consts(I32, range(width, 2 * width)))
            v = builder.call(maxnum, [lo, hi])
        return builder.extract_element(v, ir.Constant(I32, 0))

    return types.float32(vec), codegen


@intrinsic
def store_rint_s8(typingctx, arr, idx, vec):
    """arr[idx : idx+16] = the lanes rounded to the nearest integer, ties to even (as np.rint), as int8
    (arr any 1-byte dtype; the lanes must lie in -128..127)."""

    def codegen(context, builder, sig, args):
        rint = _llvm_fn(builder, "llvm.rint.v16f32", V16F, [V16F])
        codes = builder.fptosi(builder.call(rint, [args[2]]), ir.VectorType(I8, 16))
        ptr = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], ir.VectorType(I8, 16))
        builder.store(codes, ptr, align=1)
        return context.get_dummy_value()

    return types.void(arr, idx, vec), codegen


@intrinsic
def vsum(typingctx, vec):
    """Sum of the 16 lanes as float32 (a shuffle tree: 4 halvings)."""

    def codegen(context, builder, sig, args):
        v = args[0]
        width = 16
        while width > 1:
            width //= 2
            lo = builder.shuffle_vector(v, v, _consts(I32, range(width)))
            hi = builder.shuffle_vector(v, v, _consts(I32, range(width, 2 * width)))
            v = builder.fadd(lo, hi)
        return builder.extract_element(v, ir.Constant(I32, 0))

    return types.float32(vec), codegen


def _prefetch(locality: int):
    def codegen(context, builder, sig, args):
        ptr = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], I8)
        fn = _llvm_fn(builder, "llvm.prefetch.p0", ir.VoidType(), [ptr.type, I32, I32, I32])
        builder.call(fn, [ptr, ir.Constant(I32, 0), ir.Constant(I32, locality), ir.Constant(I32, 1)])
        return context.get_dummy_value()

    return codegen


@intrinsic
def prefetch(typingctx, arr, idx):
    """Hint: start loading the cache line that holds arr[idx] into L1 (prefetcht0). Never faults, even past the end."""
    return types.void(arr, idx), _prefetch(3)


@intrinsic
def prefetch_l2(typingctx, arr, idx):
    """Hint: start loading the cache line that holds arr[idx] into L2, not L1 (prefetcht2). Never faults."""
    return types.void(arr, idx), _prefetch(1)


# ---------------------------------------------------------------- work sharing between the threads of one region


@intrinsic
def atomic_add(typingctx, arr, idx, value):
    """arr[idx] += value as one atomic step (sequentially consistent) on an int64 array; returns the old value."""

    def codegen(context, builder, sig, args):
        ptr = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], I64)
        v = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("add", ptr, v, "seq_cst")

    return types.int64(arr, idx, value), codegen


@intrinsic
def atomic_read(typingctx, arr, idx):
    """arr[idx] of an int64 array, read atomically (acquire: what was written before the matching add is seen)."""

    def codegen(context, builder, sig, args):
        ptr = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], I64)
        return builder.load_atomic(ptr, "acquire", 8)

    return types.int64(arr, idx), codegen


@intrinsic
def spin_pause(typingctx):
    """The x86 `pause` hint for a spin-wait loop (lets the sibling hyper-thread run, saves power)."""

    def codegen(context, builder, sig, args):
        builder.call(_llvm_fn(builder, "llvm.x86.sse2.pause", ir.VoidType(), []), [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def cycles(typingctx):
    """The core's time-stamp counter (rdtsc): constant-rate ticks, comparable across the cores of one machine."""

    def codegen(context, builder, sig, args):
        return builder.call(_llvm_fn(builder, "llvm.readcyclecounter", I64, []), [])

    return types.int64(), codegen


@intrinsic
def os_yield(typingctx):
    """sched_yield(): give the core to another runnable thread (a waiting task whose peer is not running)."""

    def codegen(context, builder, sig, args):
        builder.call(_llvm_fn(builder, "sched_yield", I32, []), [])
        return context.get_dummy_value()

    return types.void(), codegen


# ---------------------------------------------------------------- weight decoders


@intrinsic
def load_fp8x64(typingctx, arr, idx):
    """Decode 64 E4M3 bytes arr[idx : idx+64] (two rows of 32) → four f32x16 holding value * 2**-8, exactly:
    (row 0's even columns, row 0's odd columns, row 1's even, row 1's odd).

    The bytes are read as 32 little-endian words. The low byte (an even column) moves into the half-
    precision layout s.0eeee.mmm0000000 by a shift left by 8, an arithmetic shift right by 1 that copies
    the sign, and a mask that clears the copy; the high byte (an odd column) is already in place after
    the shift right. That half equals value * 2**-8 for every finite code, subnormals included (they
    land on half subnormals), and vcvtph2ps widens it: no float32 denormal ever appears (a microcode
    assist each, see the note). Splitting columns by parity instead of widening bytes saves the two
    zero-extending shuffles per 64 codes; the activations are stored split the same way.
    NaN codes 0x7F/0xFF decode to ±480 * 2**-8: callers never see them (the encoder rejects them).
    """

    def codegen(context, builder, sig, args):
        v32h = ir.VectorType(I16, 32)
        ptr = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], v32h)
        even, odd = _e4m3_halves(builder, builder.load(ptr, align=1))
        out = []
        for row in (range(16), range(16, 32)):
            for h in (even, odd):
                half = builder.bitcast(h, ir.VectorType(HALF, 32))
                out.append(builder.fpext(builder.shuffle_vector(half, half, _consts(I32, row)), V16F))
        return context.make_tuple(builder, sig.return_type, out)

    return types.UniTuple(f32x16, 4)(arr, idx), codegen


def _e4m3_bf16_bytes() -> tuple[list[int], list[int]]:
    """(high bytes, low bytes) of bf16(value * 2**-8) for the magnitude codes 0..127 (0x7F, NaN: 0; never stored)."""
    from .reference import FP8_VALUES

    value = np.nan_to_num(FP8_VALUES[:128]) * 2.0**-8
    bits = (value.astype(np.float32).view(np.uint32) >> 16).astype(int)  # exact: 4 significant bits
    return (bits >> 8).tolist(), (bits & 0xFF).tolist()


def _e4m3_halves(builder, w):
    """32 little-endian words of E4M3 byte pairs → (even bytes, odd bytes) as the half bit patterns of
    value * 2**-8 (load_fp8x64 says how)."""
    mask = _consts(I16, [0xBF80] * 32)
    even = builder.and_(builder.ashr(builder.shl(w, _consts(I16, [8] * 32)), _consts(I16, [1] * 32)), mask)
    return even, builder.and_(builder.ashr(w, _consts(I16, [1] * 32)), mask)


_E4M3_HI, _E4M3_LO = _e4m3_bf16_bytes()


@intrinsic
def decode_fp8_bf16(typingctx, src, idx, dst, d0):
    """Decode 64 E4M3 bytes src[idx : idx+64] → dst[d0 : d0+64] as bf16 bit patterns (uint16) of value * 2**-8,
    exactly and in the same order: an fp8 pack column step's rows become a bf16 one's (an AMX A tile).
    The smallest code, 2**-9, becomes 2**-17: a normal bf16, which AMX does not flush as it does
    subnormal inputs.

    With AVX512-VBMI (every CPU with AMX has it): two 128-entry byte lookups (vpermi2b) give each code's
    high and low bf16 byte, the sign is or'ed in, and two byte interleaves (vpermt2b) make the words:
    17.8 G codes/s on one dev core, L1 to L1. Without it, as load_fp8x64: the half value * 2**-8
    (subnormal codes land on half subnormals), widened exactly by vcvtph2ps, whose high half is the bf16
    (an E4M3 value has 4 significant bits, so nothing is rounded): 11-12 G codes/s.
    """

    def codegen(context, builder, sig, args):
        v64b = ir.VectorType(I8, 64)
        if has_cpu_feature("avx512vbmi"):
            code = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], v64b), align=1)
            mag = builder.and_(code, _consts(I8, [0x7F] * 64))
            lookup = _llvm_fn(builder, "llvm.x86.avx512.vpermi2var.qi.512", v64b, [v64b] * 3)
            hi = builder.call(lookup, [_consts(I8, _E4M3_HI[:64]), mag, _consts(I8, _E4M3_HI[64:])])
            lo = builder.call(lookup, [_consts(I8, _E4M3_LO[:64]), mag, _consts(I8, _E4M3_LO[64:])])
            hi = builder.or_(hi, builder.and_(code, _consts(I8, [0x80] * 64)))
            out = builder.shuffle_vector(lo, hi, _consts(I32, [v for i in range(64) for v in (i, 64 + i)]))
            out = builder.bitcast(out, ir.VectorType(I16, 64))
        else:
            v32h = ir.VectorType(I16, 32)
            w = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], v32h), align=1)
            even, odd = _e4m3_halves(builder, w)
            words = [
                builder.bitcast(
                    builder.fpext(builder.bitcast(h, ir.VectorType(HALF, 32)), ir.VectorType(F32, 32)),
                    ir.VectorType(I16, 64),
                )
                for h in (even, odd)
            ]  # lane 2i + 1: the high half (the bf16) of code 2i (even) or 2i + 1 (odd)
            out = builder.shuffle_vector(
                words[0], words[1], _consts(I32, [c + 1 if c % 2 == 0 else 64 + c for c in range(64)])
            )
        ptr = _ptr(context, builder, sig.args[2], args[2], args[3], sig.args[3], ir.VectorType(I16, 64))
        builder.store(out, ptr, align=2)
        return context.get_dummy_value()

    return types.void(src, idx, dst, d0), codegen


@intrinsic
def vsplit_parity(typingctx, lo, hi):
    """(even lanes, odd lanes) of the 32 values lo ++ hi: the column order load_fp8x64 decodes into."""

    def codegen(context, builder, sig, args):
        even = builder.shuffle_vector(args[0], args[1], _consts(I32, range(0, 32, 2)))
        odd = builder.shuffle_vector(args[0], args[1], _consts(I32, range(1, 32, 2)))
        return context.make_tuple(builder, sig.return_type, [even, odd])

    return types.UniTuple(f32x16, 2)(lo, hi), codegen


@intrinsic
def load_bf16x16(typingctx, arr, idx):
    """Decode 16 bf16 values (uint16 bit patterns) arr[idx : idx+16] → f32x16, exactly."""

    def codegen(context, builder, sig, args):
        ptr = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], ir.VectorType(I16, 16))
        w = builder.zext(builder.load(ptr, align=2), V16I)
        return builder.bitcast(builder.shl(w, _consts(I32, [16] * 16)), V16F)

    return f32x16(arr, idx), codegen


@intrinsic
def load_f16_pair(typingctx, arr, idx):
    """Two float16 scales (uint16 bit patterns) arr[idx], arr[idx+1] → lanes 0-7 and 8-15."""

    def codegen(context, builder, sig, args):
        ptr = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], ir.VectorType(I16, 2))
        pair = builder.bitcast(builder.load(ptr, align=2), ir.VectorType(HALF, 2))
        wide = builder.fpext(pair, ir.VectorType(F32, 2))
        return builder.shuffle_vector(wide, wide, _consts(I32, [0] * 8 + [1] * 8))

    return f32x16(arr, idx), codegen


@intrinsic
def load_f16(typingctx, arr, idx):
    """One float16 (uint16 bit pattern) arr[idx] → float32."""

    def codegen(context, builder, sig, args):
        ptr = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], I16)
        return builder.fpext(builder.bitcast(builder.load(ptr, align=2), HALF), F32)

    return types.float32(arr, idx), codegen


# ---------------------------------------------------------------- bytes and VNNI


@intrinsic
def load_u8x64(typingctx, arr, idx):
    """64 raw bytes arr[idx : idx+64] (any 1-byte dtype)."""

    def codegen(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], V64B), align=1)

    return u8x64(arr, idx), codegen


@intrinsic
def store_u8x64(typingctx, arr, idx, vec):
    """arr[idx : idx+64] = the 64 bytes of vec (any 1-byte dtype)."""

    def codegen(context, builder, sig, args):
        builder.store(args[2], _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], V64B), align=1)
        return context.get_dummy_value()

    return types.void(arr, idx, vec), codegen


@intrinsic
def nibbles_lo(typingctx, vec):
    """The low nibble of each byte (0..15)."""

    def codegen(context, builder, sig, args):
        return builder.and_(args[0], _consts(I8, [15] * 64))

    return u8x64(vec), codegen


@intrinsic
def nibbles_hi(typingctx, vec):
    """The high nibble of each byte (0..15)."""

    def codegen(context, builder, sig, args):
        return builder.lshr(args[0], _consts(I8, [4] * 64))

    return u8x64(vec), codegen


@intrinsic
def load_i32x16(typingctx, arr, idx):
    """arr[idx : idx+16] of an int32 array."""

    def codegen(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], V16I), align=4)

    return i32x16(arr, idx), codegen


def _dpbusd(builder, acc, u, s):
    """acc + sums of 4 u8 x s8 products per i32 lane: one vpdpbusd on AVX512-VNNI; vpmaddubsw + vpmaddwd +
    vpaddd otherwise (exact for our operands: u ≤ 15 times int8, or 1 times int8, never saturate the int16
    pair sums)."""
    if has_cpu_feature("avx512vnni"):
        # Declared over dwords, its signature up to LLVM 21; newer LLVMs auto-upgrade it to bytes.
        fn = _llvm_fn(builder, "llvm.x86.avx512.vpdpbusd.512", V16I, [V16I, V16I, V16I])
        return builder.call(fn, [acc, builder.bitcast(u, V16I), builder.bitcast(s, V16I)])
    v32h = ir.VectorType(I16, 32)
    maddubs = _llvm_fn(builder, "llvm.x86.avx512.pmaddubs.w.512", v32h, [V64B, V64B])
    maddwd = _llvm_fn(builder, "llvm.x86.avx512.pmaddw.d.512", V16I, [v32h, v32h])
    pairs = builder.call(maddubs, [u, s])
    return builder.add(acc, builder.call(maddwd, [pairs, _consts(I16, [1] * 32)]))


@intrinsic
def dpbusd(typingctx, acc, unsigned_bytes, signed_bytes):
    """acc[l] + sum_{j<4} u8(unsigned_bytes[4l+j]) * s8(signed_bytes[4l+j]) for the 16 lanes l."""

    def codegen(context, builder, sig, args):
        return _dpbusd(builder, *args)

    return i32x16(acc, unsigned_bytes, signed_bytes), codegen


@intrinsic
def store_corrections(typingctx, arr, idx, codes):
    """arr[idx + l] = -8 x (the sum of the int8 codes 4l..4l+3) for the 16 lanes l (arr int32): what the
    codes' -8 offset of a nibble costs their dot product (dots.int4_tile)."""

    def codegen(context, builder, sig, args):
        sums = _dpbusd(builder, ir.Constant(V16I, None), _consts(I8, [1] * 64), args[2])
        corr = builder.mul(sums, _consts(I32, [-8] * 16))
        builder.store(corr, _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], V16I), align=4)
        return context.get_dummy_value()

    return types.void(arr, idx, codes), codegen


@intrinsic
def vcvt(typingctx, vec):
    """int32 lanes → float32 lanes."""

    def codegen(context, builder, sig, args):
        return builder.sitofp(args[0], V16F)

    return f32x16(vec), codegen


# ---------------------------------------------------------------- reductions and exp


@intrinsic
def vsums16(typingctx, s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15):
    """Lane i = sum of the 16 lanes of s_i: a transpose-and-add tree (15 x (2 shuffles + 1 add), 1 permute)
    instead of 16 separate horizontal sums."""

    def codegen(context, builder, sig, args):
        vecs = [(v, [(k, p) for p in range(16)]) for k, v in enumerate(args)]  # (vector, lane -> (source, partial))
        while len(vecs) > 1:
            merged = []
            for (u, ul), (v, vl) in zip(vecs[0::2], vecs[1::2]):
                groups = len({s for s, _ in ul})
                size = 16 // groups  # partials per source group
                lo, hi, labels = [], [], []
                for g in range(groups):
                    for src, off in ((ul, 0), (vl, 16)):
                        base = g * size
                        lo += [off + base + p for p in range(size // 2)]
                        hi += [off + base + size // 2 + p for p in range(size // 2)]
                        labels += [(src[base][0], p) for p in range(size // 2)]
                s = builder.fadd(
                    builder.shuffle_vector(u, v, _consts(I32, lo)), builder.shuffle_vector(u, v, _consts(I32, hi))
                )
                merged.append((s, labels))
            vecs = merged
        total, labels = vecs[0]
        order = [labels.index((k, 0)) for k in range(16)]
        return builder.shuffle_vector(total, total, _consts(I32, order))

    return f32x16(*([f32x16] * 16)), codegen


@intrinsic
def vexp(typingctx, vec):
    """exp of 16 lanes, float32, ~2 ulp on [-87, 88] (Cody-Waite reduction, degree-6 polynomial, 2**n by
    exponent arithmetic); inputs are clamped to that range, so the result is never inf or denormal."""

    def codegen(context, builder, sig, args):
        splat = lambda c: ir.Constant(V16F, [ir.Constant(F32, c)] * 16)  # noqa: E731
        fma = _llvm_fn(builder, "llvm.fma.v16f32", V16F, [V16F] * 3)
        minf, maxf = (
            _llvm_fn(builder, "llvm.minnum.v16f32", V16F, [V16F] * 2),
            _llvm_fn(builder, "llvm.maxnum.v16f32", V16F, [V16F] * 2),
        )
        x = builder.call(maxf, [builder.call(minf, [args[0], splat(88.0)]), splat(-87.0)])
        rint = _llvm_fn(builder, "llvm.roundeven.v16f32", V16F, [V16F])
        n = builder.call(rint, [builder.fmul(x, splat(1.4426950408889634))])
        r = builder.call(fma, [n, splat(-0.693359375), x])
        r = builder.call(fma, [n, splat(2.12194440e-4), r])
        p = splat(1.9875691500e-4)
        for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
            p = builder.call(fma, [p, r, splat(c)])
        p = builder.call(fma, [builder.fmul(p, r), r, builder.fadd(r, splat(1.0))])
        scale = builder.shl(builder.add(builder.fptosi(n, V16I), _consts(I32, [127] * 16)), _consts(I32, [23] * 16))
        return builder.fmul(p, builder.bitcast(scale, V16F))

    return f32x16(vec), codegen


@intrinsic
def vdiv(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return builder.fdiv(*args)

    return f32x16(a, b), codegen


# ---------------------------------------------------------------- AMX tiles
# Tile registers are named by literal ints. On a code generator without AMX (jit.amx_targeted) every tile
# operation compiles to nothing: callers reach them only where jit.amx_usable() said yes.

_I8P, _VOID = I8.as_pointer(), ir.VoidType()


def _tile_number(t) -> int | None:
    return t.literal_value if isinstance(t, types.IntegerLiteral) else None


@intrinsic
def tile_config(typingctx, cfg):
    """ldtilecfg from the 64-byte configuration cfg (uint8 array); per thread, before its first tile op."""

    def codegen(context, builder, sig, args):
        if amx_targeted():
            at = _ptr(context, builder, sig.args[0], args[0], context.get_constant(types.intp, 0), types.intp, I8)
            builder.call(_llvm_fn(builder, "llvm.x86.ldtilecfg", _VOID, [_I8P]), [at])
        return context.get_dummy_value()

    return types.void(cfg), codegen


@intrinsic
def tile_release(typingctx):
    def codegen(context, builder, sig, args):
        if amx_targeted():
            builder.call(_llvm_fn(builder, "llvm.x86.tilerelease", _VOID, []), [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def tile_zero(typingctx, tile):
    t = _tile_number(tile)
    if t is None:
        return None

    def codegen(context, builder, sig, args):
        if amx_targeted():
            builder.call(_llvm_fn(builder, "llvm.x86.tilezero", _VOID, [I8]), [ir.Constant(I8, t)])
        return context.get_dummy_value()

    return types.void(tile), codegen


def _tile_memory(name: str):
    def typer(typingctx, tile, arr, idx, stride_bytes):
        t = _tile_number(tile)
        if t is None:
            return None

        def codegen(context, builder, sig, args):
            if amx_targeted():
                at = _ptr(context, builder, sig.args[1], args[1], args[2], sig.args[2], I8)
                stride = context.cast(builder, args[3], sig.args[3], types.int64)
                builder.call(_llvm_fn(builder, name, _VOID, [I8, _I8P, I64]), [ir.Constant(I8, t), at, stride])
            return context.get_dummy_value()

        return types.void(tile, arr, idx, stride_bytes), codegen

    return typer


tile_load = intrinsic(_tile_memory("llvm.x86.tileloadd64"))
tile_load.__doc__ = "tileloadd: the tile's rows from arr[idx:], `stride_bytes` apart."
tile_store = intrinsic(_tile_memory("llvm.x86.tilestored64"))
tile_store.__doc__ = "tilestored: the tile's rows to arr[idx:], `stride_bytes` apart."


def _tile_dp(name: str):
    def typer(typingctx, c, a, b):
        tiles = [_tile_number(v) for v in (c, a, b)]
        if None in tiles:
            return None

        def codegen(context, builder, sig, args):
            if amx_targeted():
                builder.call(_llvm_fn(builder, name, _VOID, [I8, I8, I8]), [ir.Constant(I8, t) for t in tiles])
            return context.get_dummy_value()

        return types.void(c, a, b), codegen

    return typer


tile_dp_bf16 = intrinsic(_tile_dp("llvm.x86.tdpbf16ps"))
tile_dp_bf16.__doc__ = "C += A . B over bf16 pairs (tdpbf16ps): A rows of 32 bf16, B rows of 16 pairs, C float32."
tile_dp_u8s8 = intrinsic(_tile_dp("llvm.x86.tdpbusd"))
tile_dp_u8s8.__doc__ = (
    "C += A . B over 4-byte groups (tdpbusd): A rows of unsigned bytes, B rows of 16 x 4 signed bytes, C int32."
)


def _bf16_round(builder, v):
    """float32 lanes -> their bf16 bit patterns (round to nearest even) in the low 16 bits of i32 lanes."""
    b = builder.bitcast(v, V16I)
    odd = builder.and_(builder.lshr(b, _consts(I32, [16] * 16)), _consts(I32, [1] * 16))
    return builder.lshr(builder.add(builder.add(b, _consts(I32, [0x7FFF] * 16)), odd), _consts(I32, [16] * 16))


@intrinsic
def store_bf16_pairs(typingctx, dst, idx, stride, lo, hi):
    """The 32 values lo ++ hi rounded to bf16, as 16 pairs (2p, 2p+1): pair p goes to dst[idx + p * stride]
    and the next element (dst: uint16; one AMX B-tile column per call)."""

    def codegen(context, builder, sig, args):
        a, b = _bf16_round(builder, args[3]), _bf16_round(builder, args[4])
        even = builder.shuffle_vector(a, b, _consts(I32, range(0, 32, 2)))
        odd = builder.shuffle_vector(a, b, _consts(I32, range(1, 32, 2)))
        pairs = builder.or_(even, builder.shl(odd, _consts(I32, [16] * 16)))
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        base = context.cast(builder, args[1], sig.args[1], types.intp)
        step = context.cast(builder, args[2], sig.args[2], types.intp)
        for p in range(16):
            at = builder.add(base, builder.mul(step, context.get_constant(types.intp, p)))
            ptr = builder.bitcast(builder.gep(data, [at]), I32.as_pointer())
            builder.store(builder.extract_element(pairs, ir.Constant(I32, p)), ptr, align=2)
        return context.get_dummy_value()

    return types.void(dst, idx, stride, lo, hi), codegen


@intrinsic
def store_bf16_interleaved(typingctx, dst, idx, even, odd):
    """dst[idx + 2l], dst[idx + 2l + 1] = bf16(even[l]), bf16(odd[l]) for the 16 lanes l (dst: uint16;
    one AMX B-tile row: 16 columns of one pair)."""

    def codegen(context, builder, sig, args):
        odd = builder.shl(_bf16_round(builder, args[3]), _consts(I32, [16] * 16))
        pairs = builder.or_(_bf16_round(builder, args[2]), odd)
        builder.store(pairs, _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], V16I), align=2)
        return context.get_dummy_value()

    return types.void(dst, idx, even, odd), codegen


@intrinsic
def transpose16(typingctx, arr, idx):
    """Transpose the 16 x 16 float32 block arr[idx : idx+256] in place (rows of 16): four stages of
    two-source shuffles, each swapping one bit of the row number with the same bit of the lane."""

    def codegen(context, builder, sig, args):
        rows_at = [builder.add(args[1], ir.Constant(args[1].type, 16 * r)) for r in range(16)]
        at = [_ptr(context, builder, sig.args[0], args[0], i, sig.args[1], V16F) for i in rows_at]
        rows = [builder.load(a, align=4) for a in at]
        for k in (8, 4, 2, 1):
            lo = [lane if not lane & k else 16 + lane - k for lane in range(16)]
            hi = [lane + k if not lane & k else 16 + lane for lane in range(16)]
            for i in range(16):
                if not i & k:
                    a, b = rows[i], rows[i + k]
                    rows[i] = builder.shuffle_vector(a, b, _consts(I32, lo))
                    rows[i + k] = builder.shuffle_vector(a, b, _consts(I32, hi))
        for a, v in zip(at, rows):
            builder.store(v, a, align=4)
        return context.get_dummy_value()

    return types.void(arr, idx), codegen


@intrinsic
def vround_bf16(typingctx, vec):
    """The 16 float32 lanes rounded to bf16 (nearest even), as float32: what a bf16 activation holds."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.shl(_bf16_round(builder, args[0]), _consts(I32, [16] * 16)), V16F)

    return f32x16(vec), codegen
