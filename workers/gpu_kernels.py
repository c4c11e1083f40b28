"""Triton, where torch ships it: CUDA builds of torch bring it, so the GPU kernels of workers/ (decode
attention, the fused small operations, the streamed experts' dequantization) add no dependency. On a
CPU-only install `triton` and `tl` are None and every caller runs its eager torch form instead."""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = tl = None


def use_kernels(t: torch.Tensor) -> bool:
    return triton is not None and t.device.type == "cuda"
