"""The spec of every expert format and of one MoE layer, in plain numpy and float64.

Shapes: T tokens, K top-k, E experts, H hidden, I expert intermediate; Hp, Ip padded to 128.
Readable first: the kernels (moe.py) and the encoders (formats.py) are tested against this.
"""

from __future__ import annotations

import numpy as np

from .formats import FP8_BLOCK, LayerExperts, decode_expert, padded


def _fp8_values() -> np.ndarray:
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp, man = (codes >> 3) & 0xF, codes & 0x7
    magnitude = np.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp - 7.0))
    values = sign * magnitude
    values[(codes & 0x7F) == 0x7F] = np.nan  # float8_e4m3fn: no infinities, one NaN per sign
    return values


FP8_VALUES = _fp8_values()  # float64[256]: every E4M3 code's value; max ±448, NaN at 0x7F / 0xFF


# ---------------------------------------------------------------- bf16


def quantize_bf16(w: np.ndarray) -> np.ndarray:
    """float -> bf16 bit patterns (uint16), round to nearest even."""
    u = np.asarray(w, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def dequantize_bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


# ---------------------------------------------------------------- fp8 (E4M3, 128x128 block scales)


def quantize_fp8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [out, in] -> (E4M3 codes uint8 [out, in], weight_scale_inv float32 [ceil(out/128), ceil(in/128)]).

    As DeepSeek ships them: scale = absmax / 448 per 128x128 block; code = nearest (ties to even)
    E4M3 value of w / scale, computed as float32 division.
    """
    w = np.asarray(w, np.float32)
    out_dim, in_dim = w.shape
    full = np.zeros((padded(out_dim), padded(in_dim)), np.float32)
    full[:out_dim, :in_dim] = w
    blocks = np.abs(full).reshape(full.shape[0] // FP8_BLOCK, FP8_BLOCK, full.shape[1] // FP8_BLOCK, FP8_BLOCK)
    scale = (blocks.max(axis=(1, 3)) / np.float32(448.0)).astype(np.float32)
    per_elem = _expand_blocks(scale)[:out_dim, :in_dim]
    ratio = np.where(per_elem > 0, w / np.where(per_elem > 0, per_elem, 1), 0).astype(np.float32)
    scale_inv = scale[: -(-out_dim // FP8_BLOCK), : -(-in_dim // FP8_BLOCK)]
    return nearest_fp8(ratio), scale_inv


def nearest_fp8(v: np.ndarray) -> np.ndarray:
    """Nearest E4M3 code, ties to even, saturating at ±448."""
    positive = FP8_VALUES[:0x7F]  # codes 0..126, increasing
    mids = (positive[:-1] + positive[1:]) / 2
    a = np.minimum(np.abs(v.astype(np.float64)), 448.0)
    idx = np.searchsorted(mids, a, side="left")
    tie = (idx < len(mids)) & (a == mids[np.minimum(idx, len(mids) - 1)]) & (idx % 2 == 1)
    idx = idx + tie
    return (idx | np.where(np.signbit(v), 0x80, 0)).astype(np.uint8)


def dequantize_fp8(codes: np.ndarray, scale_inv: np.ndarray) -> np.ndarray:
    """E4M3 codes [rows, cols] with block scales [ceil(rows/128), ceil(cols/128)] -> float64."""
    return FP8_VALUES[codes] * _expand_blocks(scale_inv)[: codes.shape[0], : codes.shape[1]]


def _expand_blocks(scale: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(scale.astype(np.float64), FP8_BLOCK, 0), FP8_BLOCK, 1)


# ---------------------------------------------------------------- int4 (symmetric, group scales)


def quantize_int4(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """float [out, in] -> (packed codes uint8 [Rp, Cp/2], scales float16 [Rp, Cp/group]) in the pack layout."""
    w = np.asarray(w, np.float32)
    full = np.zeros((padded(w.shape[0]), padded(w.shape[1])), np.float32)
    full[: w.shape[0], : w.shape[1]] = w
    rows, cols = full.shape
    amax = np.abs(full).reshape(rows, cols // group, group).max(axis=2)
    scale16 = np.minimum(amax / np.float32(7.0), np.float32(65504.0)).astype(np.float16)
    s = np.repeat(scale16.astype(np.float32), group, axis=1)
    q = np.where(s > 0, np.clip(np.rint(full / np.where(s > 0, s, 1)), -8, 7), 0).astype(np.int64) + 8
    blocks = q.reshape(rows, cols // 128, 2, 64)  # [row, 128-chunk, low/high nibble, byte]
    packed = (blocks[:, :, 0, :] | (blocks[:, :, 1, :] << 4)).astype(np.uint8)
    return packed.reshape(rows, cols // 2), scale16


def dequantize_int4(packed: np.ndarray, scales: np.ndarray, group: int) -> np.ndarray:
    """Pack layout -> float64 [Rp, Cp]: w = (code - 8) * scale."""
    rows = packed.shape[0]
    chunks = packed.reshape(rows, -1, 1, 64)
    codes = np.concatenate([chunks & 0xF, chunks >> 4], axis=2).reshape(rows, -1).astype(np.float64)
    return (codes - 8) * np.repeat(scales.astype(np.float64), group, axis=1)


def quantize_int8_groups(x: np.ndarray, group: int) -> np.ndarray:
    """What the INT4 kernel does to activations: per group, rint(x / s) * s with s = absmax / 127."""
    x = np.asarray(x, np.float64)
    cols = x.shape[-1]
    g = x.reshape(*x.shape[:-1], cols // group, group)
    s = np.abs(g).max(axis=-1, keepdims=True) / 127
    q = np.where(s > 0, np.rint(g / np.where(s > 0, s, 1)), 0)
    return (q * s).reshape(x.shape)


# ---------------------------------------------------------------- one MoE layer


def silu(v: np.ndarray) -> np.ndarray:
    return v / (1 + np.exp(-v))


def moe_reference(
    x: np.ndarray, ids: np.ndarray, weights: np.ndarray, layer: LayerExperts, kernel_activations: bool = False
) -> np.ndarray:
    """y[t] = sum_k weights[t, k] * down_e(silu(gate_e x[t]) * up_e x[t]), e = ids[t, k]; float64 [T, H].

    kernel_activations: round x and the intermediate (weight included) as the format's kernel reads them:
    int8 per group of G inputs for INT4, bf16 for BF16 and FP8 (AMX takes bf16 inputs; the other paths
    round alike, so that a token's result does not depend on which path its experts took).
    """
    hidden, inter = layer.hidden, layer.inter
    kind = layer.fmt.kind if kernel_activations else None
    if kind == "int4":
        act = lambda v: quantize_int8_groups(_pad_last(v), layer.fmt.group_size)[..., : v.shape[-1]]  # noqa: E731
    elif kind in ("bf16", "fp8"):
        act = lambda v: dequantize_bf16(quantize_bf16(v))  # noqa: E731
    else:
        act = lambda v: v  # noqa: E731
    cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    y = np.zeros((x.shape[0], hidden))
    for t in range(x.shape[0]):
        xt = act(np.asarray(x[t], np.float64))  # [H]
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e not in cache:
                cache[e] = tuple(
                    decode_expert(layer.fmt, layer.arrays, e, p, hidden, inter) for p in ("gate", "up", "down")
                )
            gate, up, down = cache[e]
            h = silu(gate @ xt) * (up @ xt) * float(weights[t, k])  # [I]
            y[t] += down @ act(h)
    return y


def _pad_last(v: np.ndarray) -> np.ndarray:
    out = np.zeros(padded(v.shape[-1]))
    out[: v.shape[-1]] = v
    return out
