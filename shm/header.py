"""Header: the fixed 4 KiB page at offset 0 of every pack; its state word says whether the pack is ready.

A loader writes the header as LOADING, then the data, then the manifest and its sha256, and only
then flips `state` to READY (a single aligned 4-byte store). A reader trusts nothing else: it
checks magic, format version, bounds and the manifest checksum before looking at the manifest.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hmoe.shm.errors import ShmError

MAGIC = b"HMOEPACK"
FORMAT_VERSION = 1
HEADER_BYTES = 4096
LOADING = 1
READY = 2

# magic, format_version, state, total_bytes, manifest_offset, manifest_bytes, manifest_sha256, loader_pid, created_ns
_LAYOUT = struct.Struct("<8sIIQQQ32sqQ")
STATE_OFFSET = 12  # the state word's byte offset: written last, on its own
assert _LAYOUT.size <= HEADER_BYTES and struct.calcsize("<8sI") == STATE_OFFSET


@dataclass(frozen=True)
class Header:
    format_version: int
    state: int
    total_bytes: int
    manifest_offset: int
    manifest_bytes: int
    manifest_sha256: bytes
    loader_pid: int
    created_ns: int

    def pack(self) -> bytes:
        return _LAYOUT.pack(
            MAGIC,
            self.format_version,
            self.state,
            self.total_bytes,
            self.manifest_offset,
            self.manifest_bytes,
            self.manifest_sha256,
            self.loader_pid,
            self.created_ns,
        )

    @classmethod
    def unpack(cls, data: bytes, where: str) -> Header:
        """Parse and check magic and version only; bounds are checked by `check_bounds`."""
        if not data:
            return cls(0, 0, 0, 0, 0, b"\0" * 32, 0, 0)  # created, not yet sized
        if len(data) < _LAYOUT.size:
            raise ShmError("pack_not_hmoe", f"{where}: {len(data)} bytes, too small to be a weight pack; remove it")
        magic, *fields = _LAYOUT.unpack_from(data)
        if magic == b"\0" * len(MAGIC):
            return cls(0, 0, 0, 0, 0, b"\0" * 32, 0, 0)  # created, header not yet written
        if magic != MAGIC:
            raise ShmError("pack_not_hmoe", f"{where}: not an hmoe weight pack (magic {magic!r}); remove it")
        header = cls(*fields)
        if header.format_version != FORMAT_VERSION:
            raise ShmError(
                "pack_version",
                f"{where}: built with pack format {header.format_version}, this hmoe reads format {FORMAT_VERSION}: "
                "remove it (hmoe shm rm) and load it again",
            )
        return header

    def check_bounds(self, segment_bytes: int, max_manifest_bytes: int, where: str) -> None:
        """The manifest lies after the header, inside the segment, within the size limit."""
        end = self.manifest_offset + self.manifest_bytes
        if not (
            self.total_bytes == segment_bytes
            and HEADER_BYTES <= self.manifest_offset
            and 0 < self.manifest_bytes <= max_manifest_bytes
            and end <= segment_bytes
        ):
            raise ShmError(
                "pack_corrupt",
                f"{where}: header is inconsistent (segment {segment_bytes} B, header says {self.total_bytes} B, "
                f"manifest {self.manifest_bytes} B at {self.manifest_offset}); remove it and load it again",
            )
