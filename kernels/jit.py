"""Numba set-up for the expert kernels: CPU features, threading layer, cache directory.

NOTE: Numba fixes its code generator (CPU name and features) the first time anything compiles in
the process, and its threading layer the first time a parallel region runs. `configure_numba()`
runs when `hmoe.kernels` is imported, before any kernel compiles, so the settings live here, in
the package, and never in the user's environment:

- LLVM tunes every Intel AVX-512 server core (skylake-avx512 … emeraldrapids) with
  `prefer-256-bit`, so auto-vectorized loops use ymm only. We append `-prefer-256-bit` to the host
  features; the explicit vector code in `simd.py` is 512-bit either way.
- Threading layer `omp` (GNU libgomp): ~1-2 µs per parallel region, safe to call from any thread.
  `workqueue` costs ~100 µs per region and is the fallback only where libgomp is missing.
"""

from __future__ import annotations

import os
import warnings

import llvmlite.binding as llvm
import numba
from numba.core import config
from numba.core.registry import cpu_target

NO_PREFER_256 = "-prefer-256-bit"


def host_cpu_features() -> str:
    """The host's LLVM feature string with the 256-bit vector preference switched off."""
    features = llvm.get_host_cpu_features().flatten()
    return features if NO_PREFER_256 in features else f"{features},{NO_PREFER_256}"


def has_cpu_feature(name: str) -> bool:
    """True if the code generator targets a CPU with this LLVM feature (e.g. 'avx512f', 'avx512vnni')."""
    features = config.CPU_FEATURES or llvm.get_host_cpu_features().flatten()
    return f"+{name}" in features.split(",")


def amx_targeted() -> bool:
    """True if the code generator targets AMX with the tile types the kernels use (amx-tile, -bf16, -int8)."""
    return all(has_cpu_feature(f) for f in ("amx-tile", "amx-bf16", "amx-int8"))


_AMX: bool | None = None


def amx_usable() -> bool:
    """True if the kernels may use AMX tiles (bf16, int8): the code generator targets amx-tile, -bf16 and -int8, and
    Linux granted this process the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM, asked once)."""
    global _AMX
    if _AMX is None:
        _AMX = False
        if amx_targeted():
            import ctypes

            sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18
            libc = ctypes.CDLL(None, use_errno=True)
            _AMX = libc.syscall(sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) == 0
    return _AMX


def _threading_layer() -> str:
    try:
        from numba.np.ufunc import omppool  # noqa: F401  (import fails where libgomp is missing)
    except ImportError:
        warnings.warn("libgomp not found: Numba falls back to the workqueue layer (~100 µs per region)", stacklevel=2)
        return "workqueue"
    return "omp"


def configure_numba() -> None:
    """Point Numba at the host CPU with 512-bit vectors and pin the threading layer (idempotent)."""
    if "_toplevel_target_context" in cpu_target.__dict__:
        # Something compiled before us: our features only apply if they were already in force.
        if NO_PREFER_256 not in (config.CPU_FEATURES or ""):
            warnings.warn("numba compiled before hmoe.kernels was imported: kernels may use ymm only", stacklevel=2)
        return
    if config.CPU_FEATURES is None:
        config.CPU_FEATURES = host_cpu_features()
    if config.THREADING_LAYER == "default":
        config.THREADING_LAYER = _threading_layer()


def use_cache_dir(path: str | os.PathLike) -> int:
    """Cache every compiled kernel of the package under `path` (a directory the service can write).

    Call before the first kernel compiles (warm-up). Without it Numba caches next to the sources, or
    under the user's cache directory where those are read-only. Returns how many kernels it re-pointed.
    """
    import importlib

    from numba.core.dispatcher import Dispatcher

    os.makedirs(path, exist_ok=True)
    config.CACHE_DIR = os.fspath(path)
    count = 0
    for name in ("simd", "dots", "amx", "formats", "moe"):
        module = importlib.import_module(f"{__package__}.{name}")
        for obj in vars(module).values():
            if (
                isinstance(obj, Dispatcher)
                and obj._cache.__class__.__name__ == "FunctionCache"
                and obj.__module__ == module.__name__
            ):
                obj.enable_caching()  # re-creates the cache locator, which reads CACHE_DIR
                count += 1
    return count


def codegen_features() -> str:
    """The feature string the kernels were actually compiled with."""
    return cpu_target.target_context.codegen()._tm_features


def threading_layer() -> str:
    """The threading layer in use (only known once a parallel kernel ran)."""
    return numba.threading_layer()
