"""PackWriter: builds one pack — create (LOADING) → fill arrays and blobs → publish (READY) or abort.

`build_pack` is the only way a pack comes to exist: under the pack's loader lock it attaches a
ready pack built from the same source, or removes an incomplete one left by a dead loader and
builds anew. A second loader started meanwhile waits on the lock, then attaches what the first built.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable

import numpy as np

from hmoe.shm.config import ShmConfig
from hmoe.shm.errors import ShmError
from hmoe.shm.header import FORMAT_VERSION, HEADER_BYTES, LOADING, READY, STATE_OFFSET, Header
from hmoe.shm.layout import HUGE_PAGE_BYTES, PAGE_BYTES, manifest_offset, segment_bytes
from hmoe.shm.lock import PackLock
from hmoe.shm.manifest import MAX_MANIFEST_BYTES, Manifest, TensorEntry
from hmoe.shm.pack import Pack
from hmoe.shm.segment import Segment, huge_page_policy, read_segment, unlink_segment

log = logging.getLogger(__name__)


class PackWriter:
    """The loader's writable mapping of a pack under construction (create ↔ publish | abort)."""

    def __init__(self, segment: Segment, manifest: Manifest, config: ShmConfig):
        self.segment = segment
        self.manifest = manifest
        self._config = config
        self._tensors = {t.name: t for t in manifest.tensors}
        self._blobs = {b.name: b for b in manifest.blobs}

    @classmethod
    def create(cls, manifest: Manifest, config: ShmConfig) -> PackWriter:
        """A new segment holding header (LOADING) and manifest; the caller holds the pack's lock."""
        encoded = manifest.encode()
        assert len(encoded) <= MAX_MANIFEST_BYTES, f"manifest of {len(encoded)} bytes"
        page = HUGE_PAGE_BYTES if config.hugetlbfs else PAGE_BYTES
        nbytes = segment_bytes(manifest, len(encoded), page)
        segment = Segment.create(manifest.name, nbytes, config)
        header = Header(
            FORMAT_VERSION,
            LOADING,
            nbytes,
            manifest_offset(manifest),
            len(encoded),
            hashlib.sha256(encoded).digest(),
            os.getpid(),
            time.time_ns(),
        )
        segment.buffer(0, HEADER_BYTES)[: len(header.pack())] = header.pack()
        segment.buffer(header.manifest_offset, len(encoded))[:] = encoded
        log.info("creating pack %s: %.2f GiB on %s", manifest.name, nbytes / 2**30, huge_page_policy(config))
        return cls(segment, manifest, config)

    def manifest_entry(self, name: str) -> TensorEntry:
        return self._tensors[name]

    def buffer(self, entry: TensorEntry) -> memoryview:
        return self.segment.buffer(entry.offset, entry.nbytes)

    def array(self, name: str) -> np.ndarray:
        """Writable view of one array, in its numpy storage dtype."""
        entry = self._tensors[name]
        return np.frombuffer(self.buffer(entry), entry.numpy_dtype).reshape(entry.shape)

    def write_blob(self, name: str, data: bytes) -> None:
        entry = self._blobs[name]
        assert len(data) == entry.nbytes, (name, len(data), entry.nbytes)
        self.segment.buffer(entry.offset, entry.nbytes)[:] = data

    def publish(self) -> None:
        """Flip the state word to READY, last and alone, then unmap."""
        self.segment.buffer(STATE_OFFSET, 4)[:] = READY.to_bytes(4, "little")
        self.segment.close()

    def abort(self) -> None:
        self.segment.close()
        unlink_segment(self.manifest.name, self._config)


def build_pack(
    manifest: Manifest, fill: Callable[[PackWriter], None], config: ShmConfig = ShmConfig(), wait_s: float | None = None
) -> tuple[Pack, bool]:
    """Attach the pack `manifest` describes, building it with `fill` unless a ready one from the same
    source and expert format exists; (pack, True when this call built it). wait_s bounds the wait for
    another loader (None: no bound)."""
    name = manifest.name
    lock = PackLock(name, config)
    if not lock.acquire(timeout_s=0):
        pid = _loader_pid(name, config)
        log.info("pack %s is being loaded by pid %s; waiting for it", name, pid or "?")
        if not lock.acquire(timeout_s=wait_s):
            raise ShmError(
                "shm_lock_timeout", f"pack {name!r}: pid {pid or '?'} held its loader lock for more than {wait_s:.0f} s"
            )
    try:
        state = _state(name, config)
        if state == READY:
            pack = Pack.attach(name, config)
            try:
                pack.check_matches(manifest.source, manifest.experts)
            except ShmError:
                pack.close()
                raise
            return pack, False
        if state is not None:
            log.warning(
                "pack %s was left incomplete by a dead loader (pid %s); rebuilding it", name, _loader_pid(name, config)
            )
            unlink_segment(name, config)
        writer = PackWriter.create(manifest, config)
        try:
            fill(writer)
        except BaseException:
            writer.abort()
            raise
        writer.publish()
        return Pack.attach(name, config), True  # before letting go of the lock: nobody can remove it meanwhile
    finally:
        lock.release()


def _header(name: str, config: ShmConfig) -> Header | None:
    try:
        return Header.unpack(read_segment(name, config, 0, HEADER_BYTES), f"pack {name!r}")
    except ShmError as exc:
        if exc.code == "pack_not_found":
            return None
        raise


def _state(name: str, config: ShmConfig) -> int | None:
    """READY, another state for an incomplete pack, None when there is no segment."""
    try:
        header = _header(name, config)
    except ShmError as exc:
        if exc.code in ("pack_not_hmoe", "pack_version"):
            raise
        return 0
    return None if header is None else header.state


def _loader_pid(name: str, config: ShmConfig) -> int | None:
    try:
        header = _header(name, config)
    except ShmError:
        return None
    return header.loader_pid if header else None
