"""HmoeError, the one error type users see, and ShmError: what can go wrong at the weight pack's edges.

HmoeError lives here because shm/ is the lowest layer that raises errors at an edge (it may import
nothing of hmoe); runtime/errors.py re-exports it for everyone else. Every error carries a stable
`code` (snake_case, never renamed) and a sentence that says what to do; it crosses the wire as
{code, message}.
"""

from __future__ import annotations

CODES = frozenset(
    {
        "pack_name_invalid",  # a name with a path separator, bad characters or too long
        "pack_not_found",  # no segment of that name
        "pack_not_ready",  # a loader is still writing it, or died halfway
        "pack_version",  # built by another pack format version
        "pack_not_hmoe",  # a segment under our prefix that is not a weight pack
        "pack_corrupt",  # header or manifest fails validation (checksum, bounds, types)
        "pack_mismatch",  # built from another checkpoint or with another expert format
        "pack_exists",  # create over an existing segment
        "pack_busy",  # removal while a loader holds the pack's lock
        "pack_tensor_missing",  # a name the manifest does not hold
        "shm_no_space",  # /dev/shm (or the hugetlbfs mount) cannot hold the pack
        "shm_permission",  # the segment or lock file is not ours to open
        "shm_group_unknown",  # the configured group does not exist
        "shm_lock_timeout",  # waited too long for another loader
        "cuda_unavailable",  # pinning asked for on a machine without CUDA
        "cuda_register_failed",  # cudaHostRegister refused the mapping
    }
)


class HmoeError(Exception):
    """An error a user can act on: `code` is stable, the message says what happened and what to do."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code

    @property
    def message(self) -> str:
        return self.args[0]

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class ShmError(HmoeError):
    """A weight-pack failure; its code is one of CODES."""

    def __init__(self, code: str, message: str):
        assert code in CODES, code
        super().__init__(code, message)
