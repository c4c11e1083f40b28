"""A streamed layer's experts, from the pack's tiles to the compute dtype: one Triton kernel on CUDA, eager
torch elsewhere (the CPU path and the reference the kernel is tested against, bit for bit).

Shapes: n experts, R rows and C columns of one projection (padded: multiples of 128). The pack's tiles
(kernels/formats.py): bf16 and fp8 codes [n, R/16, C/32, 16, 32]; int4 bytes [n, R/16, C/128, 16, 64]
(low nibble input j, high nibble input 64 + j of each 128). Scales: fp8 float32 [n, R/128, C/128] per
128x128 block; int4 float16 [n, R/16, C/128, 16, 128/G] per G inputs of a row.

The eager form is three kernels over the layer (the untiling copy, a subtraction for int4, the scale
multiplied in place), each a strided, broadcast elementwise pass that torch runs unvectorized: on the H200
box DeepSeek-V3's FP8 layer (11.3 GB of codes, 22.5 GB in bf16) took ~110 ms, a third of a 32K prompt's
MoE layer. The kernel reads the codes and scales from memory once and writes each weight once, computing as the eager
form does: w = code (int4: code - 8) times the scale in float32, rounded once to the output dtype.
"""

from __future__ import annotations

import torch

from hmoe.kernels.formats import FP8_BLOCK, TILE_ROWS, ExpertFormat
from hmoe.workers.gpu_kernels import tl, triton, use_kernels

_FMT = {"bf16": 0, "fp8": 1, "int4": 2}
BLOCK_ROWS, BLOCK_COLS = 64, 128  # one program's output block (R and C are multiples of both)


def kernel_takes(dst: torch.Tensor, fmt: ExpertFormat) -> bool:
    """Whether dequantize_into runs the Triton kernel for dst: on CUDA, except FP8 on GPUs before sm_89
    (Ampere), where Triton has no E4M3 type."""
    return use_kernels(dst) and (fmt.kind != "fp8" or torch.cuda.get_device_capability(dst.device) >= (8, 9))


def dequantize_into(dst: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor | None, fmt: ExpertFormat) -> None:
    """dst [n, R, C] (a view with unit column stride) = the n experts' weights of one projection."""
    if kernel_takes(dst, fmt):
        _dequantize_kernel(dst, codes, scale, fmt)
    else:
        dequantize_eager(dst, codes, scale, fmt)


def dequantize_eager(dst: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor | None, fmt: ExpertFormat) -> None:
    e, rows, cols = dst.shape
    if fmt.kind == "int4":
        tiles = codes.permute(0, 1, 3, 2, 4)  # [n, R/16, 16, C/128, 64]
        out = dst.view(e, rows // TILE_ROWS, TILE_ROWS, cols // 128, 2, 64)
        out[..., 0, :].copy_(tiles & 0xF)
        out[..., 1, :].copy_(tiles >> 4)
        out.sub_(8)
        group = fmt.group_size
        per_group = scale.permute(0, 1, 3, 2, 4).reshape(e, rows, cols // group)  # [n, R, C/G] float16
        dst.view(e, rows, cols // group, group).mul_(per_group[..., None])
        return
    src = codes.view(torch.bfloat16 if fmt.kind == "bf16" else torch.float8_e4m3fn)
    dst.view(e, rows // TILE_ROWS, TILE_ROWS, cols // 32, 32).copy_(src.permute(0, 1, 3, 2, 4))
    if scale is not None:  # fp8: w = e4m3 * scale per 128x128 block, one rounding (float32 product)
        blocks = dst.view(e, rows // FP8_BLOCK, FP8_BLOCK, cols // FP8_BLOCK, FP8_BLOCK)
        blocks.mul_(scale[:, :, None, :, None])


def _dequantize_kernel(dst: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor | None, fmt: ExpertFormat) -> None:
    e, rows, cols = dst.shape
    assert dst.stride(2) == 1 and rows % BLOCK_ROWS == 0 and cols % BLOCK_COLS == 0, (dst.shape, dst.stride())
    codes = codes.contiguous()
    if fmt.kind != "int4":  # the element type the kernel reads
        codes = codes.view(torch.bfloat16 if fmt.kind == "bf16" else torch.float8_e4m3fn)
    scale = codes if scale is None else scale.contiguous()  # bf16: no scale (the pointer is never read)
    grid = (e * rows // BLOCK_ROWS, cols // BLOCK_COLS)
    _dequant_kernel[grid](
        codes,
        scale,
        dst,
        rows,
        cols,
        dst.stride(0),
        dst.stride(1),
        FMT=_FMT[fmt.kind],
        GROUP=fmt.group_size,
        BLOCK_R=BLOCK_ROWS,
        BLOCK_C=BLOCK_COLS,
        num_warps=4,
    )


if triton is not None:

    @triton.jit
    def _dequant_kernel(
        CODES,
        SCALE,
        DST,
        R,
        C,
        stride_de,
        stride_dr,
        FMT: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # rows counted over all n experts (R is a multiple of 128, so tile-rows and fp8 blocks never straddle
        # two experts); int64: a layer's projection has up to 256 * 4096 * 7168 elements
        row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        col = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        tile, r16 = (row // 16)[:, None], (row % 16)[:, None]
        c = col[None, :]
        if FMT == 2:
            byte = tl.load(CODES + tile * (C * 8) + (c // 128) * 1024 + r16 * 64 + c % 64)
            code = tl.where(c % 128 < 64, byte & 0xF, byte >> 4)
            per_row = 128 // GROUP  # scales per row of a 128-wide step
            s = tl.load(SCALE + (tile * (C // 128) + c // 128) * (16 * per_row) + r16 * per_row + c % 128 // GROUP)
            w = (code.to(tl.float32) - 8.0) * s.to(tl.float32)
        else:
            w = tl.load(CODES + tile * (C * 16) + (c // 32) * 512 + r16 * 32 + c % 32).to(tl.float32)
            if FMT == 1:
                w = w * tl.load(SCALE + (row // 128)[:, None] * (C // 128) + c // 128)
        expert, r = (row // R)[:, None], (row % R)[:, None]
        tl.store(DST + expert * stride_de + r * stride_dr + c, w.to(DST.dtype.element_ty))
