"""Routed-expert formats and the per-layer layout shared by the weight pack and the kernels.

Shapes: E experts, H hidden, I expert intermediate; Hp, Ip are H, I rounded up to 128 (PAD).
Checkpoint layout is [out, in]: gate and up are [I, H], down is [H, I].

One layer's routed experts occupy the named arrays of `layer_arrays()`; the pack allocates exactly
these (aligned) and hands them back as numpy views, `encode_expert()` fills one expert's projection.

    kind  array          dtype    shape                           logical [out, in] per expert
    bf16  gate, up       uint16   [E, Ip/16, Hp/32, 16, 32]       bf16 bit patterns [Ip, Hp]
          down           uint16   [E, Hp/16, Ip/32, 16, 32]       [Hp, Ip]
    fp8   gate, up       uint8    [E, Ip/16, Hp/32, 16, 32]       E4M3 codes (float8_e4m3fn), as shipped
          gate_scale, …  float32  [E, Ip/128, Hp/128]             weight_scale_inv: w = e4m3 * scale
          down           uint8    [E, Hp/16, Ip/32, 16, 32]
          down_scale     float32  [E, Hp/128, Ip/128]
    int4  gate, up       uint8    [E, Ip/16, Hp/128, 16, 64]      packed codes [Ip, Hp/2], see below
          gate_scale, …  float16  [E, Ip/16, Hp/128, 16, 128/G]   one scale per G inputs [Ip, Hp/G]
          down           uint8    [E, Hp/16, Ip/128, 16, 64]
          down_scale     float16  [E, Hp/16, Ip/128, 16, 128/G]

Tiles: the logical [out, in] matrix is cut into tile-rows of 16 rows; inside one, a column step (32
values for bf16/fp8, 128 inputs = 64 bytes for int4) holds the 16 rows' values side by side. So
the kernel that computes 16 rows at once reads one sequential stream (4 rows at a stride of a row
length: 7-10 GB/s per core from DRAM; tiles: 15-16 GB/s, the in-cache decode rate), and each
activation value is loaded once per 16 rows. `tile()` / `untile()` convert.

INT4 is symmetric: w = (code - 8) * scale, code in 0..15, scale = float16(absmax / 7) of the group.
In the logical packed row, each 128 inputs take 64 bytes: byte j holds input j in its low nibble and
input 64 + j in its high nibble. So a 64-byte load splits with one mask and one shift into two runs
of 64 consecutive inputs, which meet int8 activations in natural order (VNNI, no shuffles).

Rows and columns are zero-padded to multiples of 128 so that every kernel loop runs whole
128-wide blocks (real models need no padding: 2048, 768, 7168, 4096, 1536 are all multiples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

PAD = 128  # rows and columns are padded to this; also the FP8 scale block
CACHE_LINE = 64  # every array the kernels stream or tile starts on one (the pack's MIN_ALIGN too)
FP8_BLOCK = 128
TILE_ROWS = 16
PROJS = ("gate", "up", "down")
KINDS = ("bf16", "fp8", "int4")


@dataclass(frozen=True)
class ExpertFormat:
    """How routed-expert weights are stored: "bf16", "fp8" (E4M3, 128x128 scales) or "int4"."""

    kind: str
    group_size: int = 128  # int4 only: inputs per scale, 32 or 128

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"expert format {self.kind!r}: choose one of {', '.join(KINDS)}")
        if self.kind == "int4" and self.group_size not in (32, 128):
            raise ValueError(f"int4 group size {self.group_size}: choose 32 or 128")

    @property
    def name(self) -> str:
        return f"int4-g{self.group_size}" if self.kind == "int4" else self.kind

    @classmethod
    def parse(cls, name: str) -> ExpertFormat:
        """'bf16' | 'fp8' | 'int4' (group 128) | 'int4-g32' | 'int4-g128'."""
        if name.startswith("int4-g"):
            return cls("int4", int(name.removeprefix("int4-g")))
        return cls(name)


def padded(n: int) -> int:
    return -(-n // PAD) * PAD


def proj_shape(proj: str, hidden: int, inter: int) -> tuple[int, int]:
    """Checkpoint [out, in] of one projection."""
    return (hidden, inter) if proj == "down" else (inter, hidden)


def aligned_zeros(shape, dtype, align: int = CACHE_LINE) -> np.ndarray:
    """np.zeros(shape, dtype) starting on a cache line (or on `align` bytes), as the pack places every
    array. NumPy's own arrays start wherever malloc puts them, 16 bytes into a line as often as not, and
    then every 64-byte load or AMX tile row of theirs straddles two lines: the kernel's scratch placed so
    made 8 tokens on the same DeepSeek-V3-shape experts (INT4-g128, dev machine, caches emptied) take
    11.7-18.2 ms over five processes, 10.6-11.4 aligned."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape if isinstance(shape, tuple) else (shape,)) * dtype.itemsize
    raw = np.zeros(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def layer_arrays(
    fmt: ExpertFormat, num_experts: int, hidden: int, inter: int
) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Name -> (dtype, shape) of every array one layer's routed experts occupy (see the table above)."""
    arrays = {}
    for proj in PROJS:
        rows, cols = (padded(n) for n in proj_shape(proj, hidden, inter))
        tiles = (num_experts, rows // TILE_ROWS)
        if fmt.kind == "bf16":
            arrays[proj] = (np.dtype(np.uint16), (*tiles, cols // 32, TILE_ROWS, 32))
        elif fmt.kind == "fp8":
            arrays[proj] = (np.dtype(np.uint8), (*tiles, cols // 32, TILE_ROWS, 32))
            arrays[f"{proj}_scale"] = (np.dtype(np.float32), (num_experts, rows // FP8_BLOCK, cols // FP8_BLOCK))
        else:
            arrays[proj] = (np.dtype(np.uint8), (*tiles, cols // 128, TILE_ROWS, 64))
            arrays[f"{proj}_scale"] = (np.dtype(np.float16), (*tiles, cols // 128, TILE_ROWS, 128 // fmt.group_size))
    return arrays


def tile(m: np.ndarray, step: int) -> np.ndarray:
    """Logical [R, C] -> tiled [R/16, C/step, 16, step] (a transposed view; assign it to copy)."""
    rows, cols = m.shape
    return m.reshape(rows // TILE_ROWS, TILE_ROWS, cols // step, step).transpose(0, 2, 1, 3)


def untile(t: np.ndarray) -> np.ndarray:
    """Tiled [R/16, C/step, 16, step] -> logical [R, C] (a copy)."""
    n_tiles, n_steps, rows, step = t.shape
    return t.transpose(0, 2, 1, 3).reshape(n_tiles * rows, n_steps * step)


def layer_nbytes(fmt: ExpertFormat, num_experts: int, hidden: int, inter: int) -> int:
    return sum(
        dt.itemsize * int(np.prod(shape)) for dt, shape in layer_arrays(fmt, num_experts, hidden, inter).values()
    )


def expert_nbytes(fmt: ExpertFormat, hidden: int, inter: int) -> int:
    """Bytes one expert's three projections occupy (what one token reads per picked expert)."""
    return layer_nbytes(fmt, 1, hidden, inter)


@dataclass(frozen=True)
class LayerExperts:
    """One layer's routed experts: the format, the sizes and the arrays of `layer_arrays()`."""

    fmt: ExpertFormat
    num_experts: int
    hidden: int
    inter: int
    arrays: dict[str, np.ndarray]

    def __post_init__(self):
        want = layer_arrays(self.fmt, self.num_experts, self.hidden, self.inter)
        if set(want) != set(self.arrays):
            raise ValueError(
                f"layer arrays {sorted(self.arrays)} do not match format {self.fmt.name}: want {sorted(want)}"
            )
        for name, (dtype, shape) in want.items():
            a = self.arrays[name]
            if a.dtype != dtype or a.shape != shape or not a.flags.c_contiguous:
                raise ValueError(
                    f"array {name}: {a.dtype}{list(a.shape)} (contiguous={a.flags.c_contiguous}), "
                    f"want {dtype}{list(shape)} contiguous"
                )

    @classmethod
    def allocate(cls, fmt: ExpertFormat, num_experts: int, hidden: int, inter: int) -> LayerExperts:
        """Zeroed arrays in ordinary memory (tests, and runs without a weight pack), aligned as the pack's."""
        arrays = {
            name: aligned_zeros(shape, dtype)
            for name, (dtype, shape) in layer_arrays(fmt, num_experts, hidden, inter).items()
        }
        return cls(fmt, num_experts, hidden, inter, arrays)

    @property
    def nbytes_per_expert(self) -> int:
        return expert_nbytes(self.fmt, self.hidden, self.inter)

    def share(self, first: int, end: int) -> LayerExperts:
        """Experts [first, end) of the layer, as views of the same arrays (each one's first axis is the expert)."""
        assert 0 <= first < end <= self.num_experts, (first, end, self.num_experts)
        arrays = {name: a[first:end] for name, a in self.arrays.items()}
        return LayerExperts(self.fmt, end - first, self.hidden, self.inter, arrays)


# ---------------------------------------------------------------- encoding


def encode_expert(
    fmt: ExpertFormat,
    arrays: dict[str, np.ndarray],
    expert: int,
    proj: str,
    weight: np.ndarray,
    scale_inv: np.ndarray | None = None,
) -> None:
    """Write one expert's projection, in checkpoint form [out, in], into `arrays` (views; in place).

    `weight`: uint16 bf16 bit patterns, float32, or uint8 E4M3 codes with float32 `scale_inv`
    [ceil(out/128), ceil(in/128)]. Every source converts to every format: fp8->fp8 and bf16->bf16
    copy, anything->int4 quantizes, float->fp8 quantizes per 128x128 block, fp8->bf16 dequantizes.
    Temporaries stay within one expert. E4M3 NaN codes (0x7F, 0xFF) are rejected: no checkpoint
    holds them, and the kernels decode only finite codes.
    """
    if proj not in PROJS:
        raise ValueError(f"projection {proj!r}: choose one of {PROJS}")
    out_dim, in_dim = weight.shape
    dst = arrays[proj][expert]
    if dst.shape[0] * TILE_ROWS != padded(out_dim) or dst.shape[1] * dst.shape[3] * (
        2 if fmt.kind == "int4" else 1
    ) != padded(in_dim):
        raise ValueError(
            f"expert {expert} {proj}: weight [{out_dim}, {in_dim}] does not fit layer array {list(dst.shape)}"
        )
    if weight.dtype == np.uint8:
        if scale_inv is None or scale_inv.shape != (-(-out_dim // FP8_BLOCK), -(-in_dim // FP8_BLOCK)):
            raise ValueError(
                f"fp8 weight [{out_dim}, {in_dim}] needs scale_inv [{-(-out_dim // 128)}, {-(-in_dim // 128)}]"
            )
        if fmt.kind == "fp8":
            if _copy_count_nan(np.ascontiguousarray(weight), dst):
                raise ValueError(
                    f"expert {expert} {proj}: fp8 weight holds NaN codes (0x7F/0xFF): the checkpoint is damaged"
                )
            scale_dst = arrays[f"{proj}_scale"][expert]
            scale_dst[...] = 0.0
            scale_dst[: scale_inv.shape[0], : scale_inv.shape[1]] = scale_inv
            return
        weight = fp8_to_float32(weight, scale_inv)
    elif weight.dtype == np.uint16:
        if fmt.kind == "bf16":
            full = np.zeros((padded(out_dim), padded(in_dim)), np.uint16)
            full[:out_dim, :in_dim] = weight
            dst[...] = tile(full, 32)
            return
        weight = bf16_to_float32(weight)
    elif weight.dtype != np.float32:
        raise ValueError(f"weight dtype {weight.dtype}: give uint16 (bf16 bits), float32 or uint8 (E4M3) + scale_inv")
    if not np.isfinite(weight).all():
        raise ValueError(f"expert {expert} {proj}: weight holds NaN or inf: the checkpoint is damaged")
    rows, cols = padded(out_dim), padded(in_dim)
    full = np.zeros((rows, cols), np.float32)  # padded to whole 128 blocks: one expert's temporary
    full[:out_dim, :in_dim] = weight
    if fmt.kind == "bf16":
        dst[...] = tile(float32_to_bf16(full), 32)
    elif fmt.kind == "fp8":
        scale = fp8_block_scales(full)
        arrays[f"{proj}_scale"][expert] = scale
        codes = np.empty((rows, cols), np.uint8)
        _fp8_codes(full, scale, codes)
        dst[...] = tile(codes, 32)
    else:
        scale = int4_group_scales(full, fmt.group_size)
        arrays[f"{proj}_scale"][expert] = tile(scale, 128 // fmt.group_size)
        packed = np.empty((rows, cols // 2), np.uint8)
        _int4_codes(full, scale.astype(np.float32), fmt.group_size, packed)
        dst[...] = tile(packed, 64)


def decode_expert(
    fmt: ExpertFormat, arrays: dict[str, np.ndarray], expert: int, proj: str, hidden: int, inter: int
) -> np.ndarray:
    """One expert's projection back in checkpoint form [out, in] as float64 (the readable spec)."""
    from . import reference

    out_dim, in_dim = proj_shape(proj, hidden, inter)
    w = untile(arrays[proj][expert])
    if fmt.kind == "bf16":
        full = reference.dequantize_bf16(w)
    elif fmt.kind == "fp8":
        full = reference.dequantize_fp8(w, arrays[f"{proj}_scale"][expert])
    else:
        full = reference.dequantize_int4(w, untile(arrays[f"{proj}_scale"][expert]), fmt.group_size)
    return full[:out_dim, :in_dim]


# ---------------------------------------------------------------- element conversions


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def fp8_to_float32(codes: np.ndarray, scale_inv: np.ndarray) -> np.ndarray:
    """E4M3 codes [out, in] times their 128x128 block scales → float32 (exact in float32)."""
    from .reference import FP8_VALUES

    values = FP8_VALUES.astype(np.float32)[codes]
    scale = np.repeat(np.repeat(scale_inv.astype(np.float32), FP8_BLOCK, 0), FP8_BLOCK, 1)
    return values * scale[: codes.shape[0], : codes.shape[1]]


@njit(nogil=True, cache=True)
def _copy_count_nan(src, dst):
    """dst (tiled [R/16, C/32, 16, 32]) = src [out, in] zero-padded; returns how many NaN codes src holds."""
    rows, cols = src.shape
    if rows != dst.shape[0] * TILE_ROWS or cols != dst.shape[1] * 32:
        dst[...] = 0  # padding (only tiny models have any)
    nan_count = 0
    for r in range(rows):
        for c in range(cols // 32):
            d, s = dst[r // TILE_ROWS, c, r % TILE_ROWS], src[r, c * 32 : c * 32 + 32]
            for j in range(32):
                d[j] = s[j]
                nan_count += (s[j] & 0x7F) == 0x7F
        for j in range(cols - cols % 32, cols):
            dst[r // TILE_ROWS, j // 32, r % TILE_ROWS, j % 32] = src[r, j]
            nan_count += (src[r, j] & 0x7F) == 0x7F
    return nan_count


def fp8_block_scales(w: np.ndarray) -> np.ndarray:
    """DeepSeek's weight_scale_inv of a padded float32 [rows, cols]: absmax / 448 per 128x128 block."""
    rows, cols = w.shape
    blocks = np.abs(w).reshape(rows // FP8_BLOCK, FP8_BLOCK, cols // FP8_BLOCK, FP8_BLOCK)
    return (blocks.max(axis=(1, 3)) / np.float32(448.0)).astype(np.float32)


def int4_group_scales(w: np.ndarray, group: int) -> np.ndarray:
    """float16(absmax / 7) per group of `group` inputs of a padded float32 [rows, cols]."""
    rows, cols = w.shape
    amax = np.abs(w).reshape(rows, cols // group, group).max(axis=2)
    return np.minimum(amax / np.float32(7.0), np.float32(65504.0)).astype(np.float16)


@njit(nogil=True, cache=True)
def e4m3_code(v):
    """Nearest E4M3 code (ties to even) of a float v; saturates at ±448 (NaN is the caller's to reject)."""
    sign = 0x80 if math.copysign(1.0, v) < 0 else 0
    a = min(abs(float(v)), 448.0)
    if a < 2.0**-6:  # subnormals: steps of 2**-9; m == 8 becomes the smallest normal code, rightly
        return sign | int(np.rint(a * 512.0))
    frac, e = math.frexp(a)  # a = frac * 2**e, frac in [0.5, 1)
    m = int(np.rint((frac * 2.0 - 1.0) * 8.0))
    exp = e - 1 + 7
    if m == 8:
        m, exp = 0, exp + 1
    return sign | (exp << 3) | m


@njit(nogil=True, cache=True)
def _fp8_codes(w, scale, dst):
    """dst = nearest E4M3 of w / scale (float32 division, as the reference does)."""
    for r in range(w.shape[0]):
        for c in range(w.shape[1]):
            s = scale[r // 128, c // 128]
            dst[r, c] = e4m3_code(w[r, c] / s) if s > 0 else 0


@njit(nogil=True, cache=True)
def _int4_codes(w, scale, group, dst):
    """Codes clip(rint(w / scale), -8, 7) + 8, packed per 128 inputs as the module doc says."""
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], 128):
            for j in range(64):
                lo = _int4_code(w[r, c0 + j], scale[r, (c0 + j) // group])
                hi = _int4_code(w[r, c0 + 64 + j], scale[r, (c0 + 64 + j) // group])
                dst[r, c0 // 2 + j] = lo | (hi << 4)


@njit(nogil=True, cache=True, inline="always")
def _int4_code(v, s):
    code = min(max(np.rint(v / s), -8.0), 7.0) if s > 0 else 0.0
    return np.uint8(int(code) + 8)
