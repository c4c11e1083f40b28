"""HostRegistration: a pack's mapping registered with CUDA as pinned memory, so copies to the GPU DMA from it.

Stream-loading prefill copies each layer's experts from the pack to the GPU; pageable memory
copies at a fraction of pinned speed (the H100 box: 8 GB/s vs 55 GB/s). cudaHostRegister pins the
mapping in place, no staging copy. A PROT_READ mapping registers only with cudaHostRegisterReadOnly.

NOTE: torch is imported inside the two calls only: shm/ must not depend on torch, and a process
that never pins never pays for it.

NOTE: a refused cudaHostRegister also sets the CUDA runtime's per-thread "last error", which torch's
binding does not clear; the next torch call that checks for launch errors then fails with that stale
error ("CUDA error: invalid argument", far from its cause). register() clears it on failure.
"""

from __future__ import annotations

import ctypes
import logging

from hmoe.shm.errors import ShmError

log = logging.getLogger(__name__)
CUDA_HOST_REGISTER_DEFAULT = 0
CUDA_HOST_REGISTER_READ_ONLY = 8  # cudaHostRegisterReadOnly; flags 0 fail on a read-only mapping (measured)


class HostRegistration:
    """One registered range (register ↔ unregister); unregister before the mapping goes away."""

    def __init__(self, address: int, nbytes: int):
        self.address = address
        self.nbytes = nbytes
        self.registered = True

    @classmethod
    def register(cls, address: int, nbytes: int, read_only: bool = True) -> HostRegistration:
        import torch

        if not torch.cuda.is_available():
            raise ShmError(
                "cuda_unavailable", "pinning a pack needs a CUDA device; run without pinning on this machine"
            )
        flags = CUDA_HOST_REGISTER_READ_ONLY if read_only else CUDA_HOST_REGISTER_DEFAULT
        err = int(torch.cuda.cudart().cudaHostRegister(address, nbytes, flags))
        if err:
            _clear_last_cuda_error()
            raise ShmError(
                "cuda_register_failed",
                f"cudaHostRegister of {nbytes / 2**30:.2f} GiB at {address:#x} (flags {flags}) "
                f"failed with cudaError {err}: "
                "check the locked-memory limit (ulimit -l, LimitMEMLOCK=infinity) or run without pinning (slower H2D)",
            )
        log.info("pinned %.2f GiB at %#x for CUDA (flags %d)", nbytes / 2**30, address, flags)
        return cls(address, nbytes)

    def unregister(self) -> None:
        if not self.registered:
            return
        import torch

        err = int(torch.cuda.cudart().cudaHostUnregister(self.address))
        assert err == 0, f"cudaHostUnregister({self.address:#x}) failed with cudaError {err}"
        self.registered = False

    def __enter__(self) -> HostRegistration:
        return self

    def __exit__(self, *exc) -> None:
        self.unregister()


def _clear_last_cuda_error() -> int:
    """cudaGetLastError() of the CUDA runtime torch loaded (it returns and resets the thread's last error)."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
    for path in sorted(paths):
        return int(ctypes.CDLL(path).cudaGetLastError())
    log.warning("no libcudart in this process: a failed cudaHostRegister may surface at a later CUDA call")
    return 0
