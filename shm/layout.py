"""PackLayout: assigns every array and blob of a pack an aligned offset before any byte is written.

Offsets are planned from the checkpoint's metadata alone, so the segment is sized once and the
manifest is known before the data: [header page | arrays and blobs | manifest], page-rounded.
"""

from __future__ import annotations

import math

from hmoe.shm.header import HEADER_BYTES
from hmoe.shm.manifest import DTYPES, MIN_ALIGN, BlobEntry, Manifest, TensorEntry

PAGE_BYTES = 4096
HUGE_PAGE_BYTES = 2 << 20


def align_up(value: int, align: int) -> int:
    return -(-value // align) * align


class PackLayout:
    """Append-only planner: add arrays and blobs, then freeze into a Manifest."""

    def __init__(self):
        self._cursor = HEADER_BYTES
        self._tensors: list[TensorEntry] = []
        self._blobs: list[BlobEntry] = []

    def add_tensor(
        self, name: str, dtype: str, shape: tuple[int, ...], align: int = MIN_ALIGN, layer: int = -1
    ) -> TensorEntry:
        assert align % MIN_ALIGN == 0 and dtype in DTYPES, (align, dtype)
        offset = align_up(self._cursor, align)
        entry = TensorEntry(
            name, dtype, tuple(int(d) for d in shape), offset, math.prod(shape) * DTYPES[dtype].itemsize, layer
        )
        self._tensors.append(entry)
        self._cursor = offset + entry.nbytes
        return entry

    def add_blob(self, name: str, nbytes: int) -> BlobEntry:
        entry = BlobEntry(name, align_up(self._cursor, MIN_ALIGN), nbytes)
        self._blobs.append(entry)
        self._cursor = entry.offset + nbytes
        return entry

    def manifest(self, name: str, source: dict, model: dict, experts: dict) -> Manifest:
        return Manifest(name, source, model, experts, tuple(self._tensors), tuple(self._blobs))


def manifest_offset(manifest: Manifest) -> int:
    return align_up(manifest.data_end, MIN_ALIGN)


def segment_bytes(manifest: Manifest, manifest_bytes: int, page_bytes: int = PAGE_BYTES) -> int:
    """The segment's size: data, then the manifest, rounded up to whole pages."""
    return align_up(manifest_offset(manifest) + manifest_bytes, page_bytes)
