"""PackLock: the flock that serializes loaders (and removers) of one pack name.

flock, not a POSIX semaphore: the kernel drops it when its holder dies, SIGKILL included, so a
crashed loader never wedges the next one. The lock file can be removed by `gc` while others wait
on it; whoever acquires it checks that the path still names the inode it locked, else retries.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time

from hmoe.shm.config import ShmConfig
from hmoe.shm.errors import ShmError

log = logging.getLogger(__name__)
POLL_S = 0.05  # between non-blocking tries while waiting with a timeout


class PackLock:
    """Exclusive (loader, remover) or shared (a reader waiting for a loader) lock on one pack name."""

    def __init__(self, name: str, config: ShmConfig):
        self.name = name
        self.path = config.lock_path(name)
        self._config = config
        self._fd: int | None = None

    def acquire(self, exclusive: bool = True, timeout_s: float | None = None) -> bool:
        """Block until held (timeout_s None), or give up after timeout_s (0: one try); True when held."""
        assert self._fd is None, "already held"
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        while True:
            fd = self._open()
            try:
                if not self._flock(fd, op, deadline):
                    os.close(fd)
                    return False
                if self._is_current(fd):
                    self._fd = fd
                    return True
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # gc removed the file while we waited: lock the new one

    def release(self) -> None:
        assert self._fd is not None, "not held"
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def remove_file(self) -> None:
        """Unlink the lock file; only while holding it exclusively (gc of an abandoned name)."""
        assert self._fd is not None, "hold the lock to remove its file"
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> PackLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _open(self) -> int:
        try:
            # Read-only is enough for flock, and lets a group member (mode 0640) wait on a loader.
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, self._config.mode)
        except PermissionError:
            raise ShmError(
                "shm_permission", f"{self.path}: cannot open the pack's lock file; run as its owner"
            ) from None
        except FileNotFoundError:
            raise ShmError("shm_permission", f"{self._config.lock_dir}: lock directory does not exist") from None
        if os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, self._config.mode)  # O_CREAT applied the umask
            gid = self._config.group_id()
            if gid is not None:
                os.fchown(fd, -1, gid)
        return fd

    def _flock(self, fd: int, op: int, deadline: float | None) -> bool:
        if deadline is None:
            fcntl.flock(fd, op)
            return True
        while True:
            try:
                fcntl.flock(fd, op | fcntl.LOCK_NB)
                return True
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)

    def _is_current(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
