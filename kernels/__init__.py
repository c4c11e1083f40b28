"""CPU expert kernels: formats, reference, fused MoE layer (Numba, AVX-512)."""

from .jit import configure_numba

configure_numba()
