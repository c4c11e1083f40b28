"""formats.py: layouts, the encoders (every source into every format) and their agreement with the reference."""

from __future__ import annotations

import numpy as np
import pytest

from hmoe.kernels import reference as ref
from hmoe.kernels.formats import (
    CACHE_LINE,
    PROJS,
    ExpertFormat,
    LayerExperts,
    aligned_zeros,
    decode_expert,
    e4m3_code,
    encode_expert,
    layer_arrays,
    layer_nbytes,
    padded,
    proj_shape,
    tile,
    untile,
)

HIDDEN, INTER = 200, 72  # not multiples of 128: exercises padding


def test_layer_arrays_cover_every_projection(fmt):
    arrays = layer_arrays(fmt, 3, 256, 384)
    assert {"gate", "up", "down"} <= set(arrays)
    assert ("gate_scale" in arrays) == (fmt.kind != "bf16")
    bytes_per_weight = {"bf16": 2, "fp8": 1, "int4": 0.5}[fmt.kind]
    weights = sum(np.prod(s) * d.itemsize for n, (d, s) in arrays.items() if not n.endswith("_scale"))
    assert weights == 3 * 3 * 256 * 384 * bytes_per_weight
    assert layer_nbytes(fmt, 3, 256, 384) >= weights


def test_format_names_round_trip():
    for name in ("bf16", "fp8", "int4-g32", "int4-g128"):
        assert ExpertFormat.parse(name).name == name
    with pytest.raises(ValueError):
        ExpertFormat("int4", 64)
    with pytest.raises(ValueError):
        ExpertFormat("fp4")


def test_tile_untile_inverse():
    m = np.arange(32 * 256).reshape(32, 256)
    assert (untile(np.ascontiguousarray(tile(m, 32))) == m).all()
    assert np.ascontiguousarray(tile(m, 32))[0, 1, 2, 3] == m[2, 32 + 3]


@pytest.mark.parametrize("source", ["float32", "bf16", "fp8"])
def test_encode_decode_every_source(fmt, source):
    rng = np.random.default_rng(1)
    layer = LayerExperts.allocate(fmt, 2, HIDDEN, INTER)
    for proj in PROJS:
        w = (rng.standard_normal(proj_shape(proj, HIDDEN, INTER)) * 0.05).astype(np.float32)
        if source == "bf16":
            bits = ref.quantize_bf16(w)
            encode_expert(fmt, layer.arrays, 1, proj, bits)
            exact = ref.dequantize_bf16(bits)
        elif source == "fp8":
            codes, scale_inv = ref.quantize_fp8(w)
            encode_expert(fmt, layer.arrays, 1, proj, codes, scale_inv)
            exact = ref.dequantize_fp8(codes, scale_inv)
        else:
            encode_expert(fmt, layer.arrays, 1, proj, w)
            exact = w.astype(np.float64)
        got = decode_expert(fmt, layer.arrays, 1, proj, HIDDEN, INTER)
        rel = np.abs(got - exact).max() / np.abs(exact).max()
        lossless = fmt.kind == source or (fmt.kind == "bf16" and source == "bf16")
        if fmt.kind == "bf16" and source == "fp8":
            assert rel < 2**-8  # one bf16 rounding of exact fp8 values
        elif lossless:
            assert rel == 0
        else:
            assert rel < {"bf16": 2**-8, "fp8": 0.07, "int4": 0.08}[fmt.kind]


def test_encoders_match_reference_quantizers():
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((INTER, HIDDEN)) * 0.1).astype(np.float32)
    for group in (32, 128):
        fmt = ExpertFormat("int4", group)
        layer = LayerExperts.allocate(fmt, 1, HIDDEN, INTER)
        encode_expert(fmt, layer.arrays, 0, "gate", w)
        packed, scales = ref.quantize_int4(w, group)
        assert (untile(layer.arrays["gate"][0]) == packed).all()
        assert (untile(layer.arrays["gate_scale"][0]) == scales).all()
    fmt = ExpertFormat("fp8")
    layer = LayerExperts.allocate(fmt, 1, HIDDEN, INTER)
    encode_expert(fmt, layer.arrays, 0, "gate", w)
    codes, scale_inv = ref.quantize_fp8(w)
    assert (untile(layer.arrays["gate"][0])[:INTER, :HIDDEN] == codes).all()
    assert (layer.arrays["gate_scale"][0][: scale_inv.shape[0], : scale_inv.shape[1]] == scale_inv).all()


def test_fp8_native_copy_is_exact_and_rejects_nan():
    rng = np.random.default_rng(3)
    fmt = ExpertFormat("fp8")
    layer = LayerExperts.allocate(fmt, 1, HIDDEN, INTER)
    codes = rng.integers(0, 256, (INTER, HIDDEN), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x7E
    scale_inv = rng.random((1, 2), dtype=np.float32) + 0.5
    encode_expert(fmt, layer.arrays, 0, "gate", codes, scale_inv)
    assert (untile(layer.arrays["gate"][0])[:INTER, :HIDDEN] == codes).all()
    assert (untile(layer.arrays["gate"][0])[INTER:] == 0).all()
    codes[5, 7] = 0xFF
    with pytest.raises(ValueError, match="NaN"):
        encode_expert(fmt, layer.arrays, 0, "gate", codes, scale_inv)
    with pytest.raises(ValueError, match="scale_inv"):
        encode_expert(fmt, layer.arrays, 0, "gate", codes)


def test_e4m3_rounding_every_code_and_the_edges():
    finite = np.array([c for c in range(256) if (c & 0x7F) != 0x7F])
    values = ref.FP8_VALUES[finite].astype(np.float32)
    assert [e4m3_code(v) for v in values] == list(finite)  # -0.0 -> 0x80 included
    assert e4m3_code(np.float32(1e6)) == 0x7E and e4m3_code(np.float32(-1e6)) == 0xFE  # saturate at ±448
    assert ref.nearest_fp8(np.array([1e6, -1e6, -0.0], np.float32)).tolist() == [0x7E, 0xFE, 0x80]
    mids = ((values[1:0x7E] + values[2:0x7F]) / 2).astype(np.float32)  # exact ties between neighbours
    got = np.array([e4m3_code(m) for m in mids])
    assert (got % 2 == 0).all() and (got == ref.nearest_fp8(mids)).all()


def test_fp8_values_match_torch_float8():
    torch = pytest.importorskip("torch")
    decoded = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double().numpy()
    assert np.array_equal(decoded, ref.FP8_VALUES, equal_nan=True)
    assert np.signbit(ref.FP8_VALUES[0x80]) and ref.FP8_VALUES[0x7E] == 448 and ref.FP8_VALUES[0xFE] == -448
    assert np.isnan(ref.FP8_VALUES[[0x7F, 0xFF]]).all()


def test_encode_rejects_wrong_shapes_and_bad_values():
    fmt = ExpertFormat("int4", 32)
    layer = LayerExperts.allocate(fmt, 1, HIDDEN, INTER)
    with pytest.raises(ValueError, match="does not fit"):
        encode_expert(fmt, layer.arrays, 0, "gate", np.ones((HIDDEN, INTER), np.float32))
    w = np.ones((INTER, HIDDEN), np.float32)
    w[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        encode_expert(fmt, layer.arrays, 0, "gate", w)
    with pytest.raises(ValueError):
        LayerExperts(fmt, 1, HIDDEN, INTER, {**layer.arrays, "gate": layer.arrays["gate"][:, :1]})


def test_padding_is_128():
    assert padded(1) == 128 and padded(128) == 128 and padded(7168) == 7168 and padded(200) == 256


@pytest.mark.parametrize(
    "shape,dtype", [(1, np.float32), ((3, 5), np.int64), ((2, 4, 16, 64), np.uint8), (4097, np.uint16)]
)
@pytest.mark.parametrize("align", [CACHE_LINE, 4096])
def test_aligned_zeros_are_zeros_starting_on_a_cache_line(shape, dtype, align):
    a = aligned_zeros(shape, dtype) if align == CACHE_LINE else aligned_zeros(shape, dtype, align)
    assert a.shape == (shape if isinstance(shape, tuple) else (shape,)) and a.dtype == dtype
    assert a.ctypes.data % align == 0 and a.flags.c_contiguous and a.flags.writeable and not a.any()


def test_kernel_scratch_and_allocated_layers_start_on_a_cache_line(fmt):
    """Every array a layer call reads or writes starts on a cache line, as the pack aligns the weights:
    otherwise each 64-byte load or AMX tile row of it straddles two lines (NumPy puts its own 16 bytes in),
    and where that fell differed from one process to the next (dev machine, 8 tokens on the same
    DeepSeek-V3-shape experts, INT4-g128: 11.7-18.2 ms over five processes, 10.6-11.4 aligned)."""
    from hmoe.kernels.moe import LINE_PAIR, SCRATCH, MoeKernel

    layer = LayerExperts.allocate(fmt, 3, 256, 384)
    kernel = MoeKernel(256, 384, 16, 4, num_threads=3)
    assert tuple(kernel.parts) == tuple(SCRATCH)
    for name, a in {**layer.arrays, **kernel.parts}.items():
        assert a.ctypes.data % CACHE_LINE == 0, name
    for name, a in kernel.parts.items():  # and on a line pair: sync's counters and the tasks' slices apart
        assert a.ctypes.data % LINE_PAIR == 0, name


def test_the_kernels_cut_the_scratch_parts_moe_kernel_sized():
    """The kernels take MoeKernel's scratch as one buffer and cut its parts by index (scratch_parts): each
    cut is the part MoeKernel sized, same start, length and type, and no two parts overlap."""
    from hmoe.kernels.moe import SCRATCH, MoeKernel, scratch_parts

    kernel = MoeKernel(256, 384, 16, 4, num_threads=3, amx=True)
    cut = scratch_parts(kernel.scratch, kernel.layout)
    assert len(cut) == len(SCRATCH)
    for name, a in zip(SCRATCH, cut, strict=True):
        want = kernel.parts[name]
        assert (a.ctypes.data, a.size, a.dtype) == (want.ctypes.data, want.size, want.dtype), name
    spans = sorted((a.ctypes.data, a.ctypes.data + a.nbytes) for a in kernel.parts.values())
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
