"""Segment: one pack's shared-memory segment, mapped writable by its loader and read-only by everyone else.

The segment is a POSIX shared-memory object (posix_ipc), or a file on a hugetlbfs mount when one is
configured; either way an fd that is sized, space-reserved (fallocate, so a full /dev/shm is an
error now rather than a SIGBUS later) and mapped MAP_SHARED. Where /dev/shm gives transparent huge
pages, a new segment's pages are first faulted in through its MADV_HUGEPAGE mapping, the one way
tmpfs makes them 2 MiB pages; attaching does not touch the data.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import posix_ipc

from hmoe.shm.config import ShmConfig
from hmoe.shm.errors import ShmError
from hmoe.shm.layout import HUGE_PAGE_BYTES

log = logging.getLogger(__name__)

MADV_POPULATE_WRITE = 23  # linux/mman.h (Linux 5.14)
POPULATE_THREADS = 8


def _open_fd(name: str, config: ShmConfig, *, create: bool = False, writable: bool = False) -> int:
    """An fd this caller owns (close it with os.close)."""
    path = config.segment_path(name)
    try:
        if config.hugetlbfs:
            flags = (os.O_RDWR | os.O_CREAT | os.O_EXCL) if create else (os.O_RDWR if writable else os.O_RDONLY)
            return os.open(path, flags | os.O_CLOEXEC, config.mode)
        shm = posix_ipc.SharedMemory(
            config.segment_name(name),
            posix_ipc.O_CREX if create else 0,
            mode=config.mode,
            read_only=not (create or writable),
        )
        return shm.fd
    except (posix_ipc.ExistentialError, FileExistsError, FileNotFoundError):
        if create:
            raise ShmError(
                "pack_exists", f"pack {name!r} already exists ({path}): attach it, or remove it first"
            ) from None
        raise ShmError(
            "pack_not_found", f"no pack named {name!r} ({path}): load it with `hmoe shm load MODEL_DIR --name {name}`"
        ) from None
    except (posix_ipc.PermissionsError, PermissionError):
        raise ShmError(
            "shm_permission", f"{path}: permission denied; run as the pack's owner or a member of its group"
        ) from None


def segment_bytes(name: str, config: ShmConfig) -> int:
    fd = _open_fd(name, config)
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def read_segment(name: str, config: ShmConfig, offset: int, nbytes: int) -> bytes:
    """Read bytes without mapping the segment (so the reader never shows up as attached)."""
    fd = _open_fd(name, config)
    try:
        return os.pread(fd, nbytes, offset)
    finally:
        os.close(fd)


def unlink_segment(name: str, config: ShmConfig) -> None:
    """Remove the name; processes that mapped it keep their pages until they unmap."""
    try:
        if config.hugetlbfs:
            os.unlink(config.segment_path(name))
        else:
            posix_ipc.unlink_shared_memory(config.segment_name(name))
    except (posix_ipc.ExistentialError, FileNotFoundError):
        pass
    except (posix_ipc.PermissionsError, PermissionError):
        raise ShmError(
            "shm_permission", f"{config.segment_path(name)}: not allowed to remove it; run as its owner"
        ) from None


def _address(mapping: mmap.mmap) -> int:
    """Virtual address of a mapping's first byte."""
    return np.frombuffer(mapping, np.uint8, count=1).ctypes.data


def _populate_huge(mapping: mmap.mmap) -> None:
    """Allocate a new segment's pages through its MADV_HUGEPAGE mapping, so they are 2 MiB pages.

    tmpfs mounted huge=advise gives huge pages only to faults through a mapping that asked for them:
    pages fallocate or write() allocate have no mapping and come as 4 KiB pages, which the kernels then
    stream at about half their speed (the hardware prefetchers stop at every 4 KiB page and each page
    costs a TLB walk). MADV_POPULATE_WRITE (Linux 5.14) faults the range in, zeroing each page: one
    thread does ~2.4 GB/s on the dev machine, so POPULATE_THREADS share it (ctypes drops the GIL).
    Where it is missing or the mount is full, the fallocate that follows reserves (or reports) the space.
    """
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except OSError as exc:  # EINVAL where THP is compiled out
        log.debug("MADV_HUGEPAGE failed (%s): fallocate reserves 4 KiB pages instead", exc)
        return
    base, nbytes = _address(mapping), len(mapping)
    step = -(-nbytes // POPULATE_THREADS // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    def populate(lo: int) -> int:
        return 0 if madvise(base + lo, min(step, nbytes - lo), MADV_POPULATE_WRITE) == 0 else ctypes.get_errno()

    with ThreadPoolExecutor(POPULATE_THREADS) as pool:
        failed = [e for e in pool.map(populate, range(0, nbytes, step)) if e]
    if failed:
        log.debug("populating huge pages failed (%s): fallocate reserves 4 KiB pages instead", os.strerror(failed[0]))


def _tmpfs_huge_option(directory: Path) -> str:
    """The `huge=` option of the tmpfs mounted at `directory` ("never" when absent)."""
    huge = "never"
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 3 and fields[1] == str(directory):
                huge = dict(o.partition("=")[::2] for o in fields[3].split(",")).get("huge", "never")
    except OSError:
        pass
    return huge


def uses_huge_pages(config: ShmConfig) -> bool:
    """Whether packs here get 2 MiB pages (hugetlbfs, or transparent huge pages through MADV_HUGEPAGE)."""
    if config.hugetlbfs:
        return True
    return config.hugepages == "auto" and _tmpfs_huge_option(config.pack_dir) in ("always", "within_size", "advise")


def huge_page_policy(config: ShmConfig) -> str:
    """Which pages back packs here, in words (for the one log line at create and attach)."""
    if config.hugetlbfs:
        return f"hugetlbfs pages ({config.hugetlbfs})"
    if config.hugepages == "off":
        return "4 KiB pages (hugepages=off)"
    huge = _tmpfs_huge_option(config.pack_dir)
    if uses_huge_pages(config):
        return f"transparent huge pages (MADV_HUGEPAGE, {config.pack_dir} mounted huge={huge})"
    return f"4 KiB pages ({config.pack_dir} is mounted huge={huge}; remount it with huge=advise for 2 MiB pages)"


class Segment:
    """A mapping of one pack's segment; close() unmaps (deferred while views of it are alive)."""

    def __init__(self, name: str, mapping: mmap.mmap, writable: bool, config: ShmConfig):
        self.name = name
        self.nbytes = len(mapping)
        self.writable = writable
        self._mmap: mmap.mmap | None = mapping
        self._config = config
        self._local = threading.local()  # one write fd per loader thread: sendfile writes at its own position
        self._write_fds: list[int] = []
        self._fds_lock = threading.Lock()

    @classmethod
    def create(cls, name: str, nbytes: int, config: ShmConfig) -> Segment:
        """Create, size, reserve and map a new segment writable, with the configured mode and group."""
        assert nbytes > 0 and (not config.hugetlbfs or nbytes % HUGE_PAGE_BYTES == 0), nbytes
        gid = config.group_id()
        space = os.statvfs(config.pack_dir)
        free_bytes = space.f_bavail * space.f_frsize
        if nbytes > free_bytes:
            raise ShmError(
                "shm_no_space",
                f"pack {name!r} needs {nbytes / 2**30:.2f} GiB, "
                f"{config.pack_dir} has {free_bytes / 2**30:.2f} GiB free: "
                "remove packs (hmoe shm gc), or enlarge it (mount -o remount,size=... /dev/shm)",
            )
        fd = _open_fd(name, config, create=True)
        mapping = None
        try:
            os.fchmod(fd, config.mode)  # shm_open applied the umask
            if gid is not None:
                os.fchown(fd, -1, gid)
            os.ftruncate(fd, nbytes)
            mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            if uses_huge_pages(config) and not config.hugetlbfs:
                _populate_huge(mapping)
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as exc:
            if mapping is not None:
                mapping.close()
            os.close(fd)
            unlink_segment(name, config)
            if exc.errno == errno.ENOSPC:
                raise ShmError(
                    "shm_no_space", f"{config.pack_dir} ran out of space reserving {nbytes} bytes for {name!r}"
                ) from None
            if exc.errno == errno.EPERM:
                raise ShmError(
                    "shm_permission", f"cannot give {name!r} to group {config.group!r}: not a member"
                ) from None
            raise
        os.close(fd)
        return cls._advised(name, mapping, config, writable=True)

    @classmethod
    def attach(cls, name: str, config: ShmConfig, writable: bool = False) -> Segment:
        """Map an existing segment, read-only (PROT_READ: writes through any view fail) unless writable."""
        fd = _open_fd(name, config, writable=writable)
        try:
            nbytes = os.fstat(fd).st_size
            if nbytes == 0:
                raise ShmError("pack_not_ready", f"pack {name!r} is empty: its loader is starting or died; retry or gc")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=prot)
        finally:
            os.close(fd)
        return cls._advised(name, mapping, config, writable=writable)

    @classmethod
    def _advised(cls, name: str, mapping: mmap.mmap, config: ShmConfig, writable: bool) -> Segment:
        if config.hugepages == "auto" and not config.hugetlbfs and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                mapping.madvise(mmap.MADV_HUGEPAGE)
            except OSError as exc:  # EINVAL where THP is compiled out: fall back to 4 KiB pages
                log.debug("MADV_HUGEPAGE on %s failed: %s", name, exc)
        return cls(name, mapping, writable, config)

    def buffer(self, offset: int = 0, nbytes: int | None = None) -> memoryview:
        """A view of the mapping (read-only unless this is the loader's mapping)."""
        assert self._mmap is not None, "segment is closed"
        end = self.nbytes if nbytes is None else offset + nbytes
        assert 0 <= offset <= end <= self.nbytes, (offset, end, self.nbytes)
        return memoryview(self._mmap)[offset:end]

    @property
    def address(self) -> int:
        """Virtual address of the mapping's first byte (for cudaHostRegister)."""
        assert self._mmap is not None, "segment is closed"
        return _address(self._mmap)

    def copy_from_file(self, offset: int, src_fd: int, src_offset: int, nbytes: int) -> None:
        """Copy file bytes into the segment inside the kernel (sendfile: no copy through user space and
        no page faults in this process); through the mapping where the segment takes no write() (hugetlbfs)."""
        assert self._mmap is not None and self.writable and 0 <= offset and offset + nbytes <= self.nbytes, (
            offset,
            nbytes,
        )
        if not self._config.hugetlbfs:
            fd = getattr(self._local, "fd", None)
            if fd is None:
                fd = self._local.fd = _open_fd(self.name, self._config, writable=True)
                with self._fds_lock:
                    self._write_fds.append(fd)
            os.lseek(fd, offset, os.SEEK_SET)
            while nbytes:
                sent = os.sendfile(fd, src_fd, src_offset, nbytes)
                if sent == 0:
                    raise EOFError(f"source file ended {nbytes} bytes early")
                src_offset, nbytes = src_offset + sent, nbytes - sent
            return
        view = self.buffer(offset, nbytes)
        while view:
            got = os.preadv(src_fd, [view[: 1 << 30]], src_offset)
            if got == 0:
                raise EOFError(f"source file ended {len(view)} bytes early")
            view, src_offset = view[got:], src_offset + got

    def close(self) -> None:
        """Unmap now, or, while numpy/torch views still export the buffer, when the last of them dies."""
        with self._fds_lock:
            for fd in self._write_fds:
                os.close(fd)
            self._write_fds.clear()
        if self._mmap is None:
            return
        try:
            self._mmap.close()
        except BufferError:
            log.debug("segment %s: views still alive, unmapping when they are collected", self.name)
        self._mmap = None

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
