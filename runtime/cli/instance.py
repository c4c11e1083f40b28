"""ServeFiles: what one `hmoe serve` keeps in the runtime dir, named after its frontend (one per port).

    serve-PORT.pid     its pid, locked (fcntl) while it runs: a second serve on the port is refused at once
    serve-PORT.log     its children's output (per instance: a failing serve never writes another's log)
    serve-PORT.failed  one line, written when it fails to start; `hmoe generate --wait` stops on it
    backend-PORT.sock  the router's worker endpoint, removed when serve stops

`hmoe generate --wait` reads the same files to stop waiting for a serve that has exited or failed.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from pathlib import Path

from hmoe.runtime.errors import HmoeError

RECENT_S = 60.0  # a failure marker or an orphaned pid file this fresh speaks for the serve a client waits for
SETTLE_S = 2.0  # ...once a serve started with the client had the time to claim its files (the README one-liner)


def instance_tag(frontend: str) -> str:
    """tcp://127.0.0.1:5555 -> "5555"; ipc:///run/x/front.sock -> "front.sock" (file-name safe)."""
    tail = frontend.rsplit(":", 1)[-1] if frontend.startswith("tcp://") else frontend.rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._-]", "_", tail.strip("/")) or "default"


class ServeFiles:
    def __init__(self, runtime_dir: str | os.PathLike, frontend: str):
        self.dir = Path(runtime_dir)
        tag = instance_tag(frontend)
        self.pid_path = self.dir / f"serve-{tag}.pid"
        self.log_path = self.dir / f"serve-{tag}.log"
        self.failed_path = self.dir / f"serve-{tag}.failed"
        self.backend_path = self.dir / f"backend-{tag}.sock"
        self._pid_fd: int | None = None

    @property
    def backend(self) -> str:
        return f"ipc://{self.backend_path}"

    # -- the serve side --------------------------------------------------------------------------

    def claim(self) -> None:
        """Lock the pid file (startup_failed when another serve holds it); clear an old failure marker."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.pid_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise HmoeError(
                "startup_failed",
                f"another hmoe serve (pid {other}) serves this endpoint: stop it or pick another --port",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._pid_fd = fd
        self.failed_path.unlink(missing_ok=True)

    def fail(self, message: str) -> None:
        """Leave the one-line reason for clients waiting on this serve (only once the files are ours)."""
        if self._pid_fd is not None:
            self.failed_path.write_text(message + "\n")

    def release(self) -> None:
        """Remove the pid file and the sockets (the log and a failure marker stay for the user); a
        serve that never claimed the files (another one holds them) touches nothing."""
        if self._pid_fd is None:
            return
        for path in (self.backend_path, self.pid_path):
            path.unlink(missing_ok=True)
        os.close(self._pid_fd)
        self._pid_fd = None

    # -- the client side -------------------------------------------------------------------------

    def gone(self, since: float) -> str | None:
        """Why the serve a client started waiting for at wall time `since` will not come, or None."""
        waited_s = time.time() - since
        fresh = lambda path: (
            path.stat().st_mtime >= since
            or (  # noqa: E731
                waited_s >= SETTLE_S and path.stat().st_mtime >= since - RECENT_S
            )
        )
        try:
            with open(self.pid_path, "rb") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    return None  # a serve holds it: alive, whatever an older marker says
                if fresh(self.pid_path):
                    pid = f.read().decode(errors="replace").strip() or "?"
                    return f"hmoe serve (pid {pid}) has exited; its log: {self.log_path}"
        except FileNotFoundError:
            pass
        try:
            if fresh(self.failed_path):
                return f"hmoe serve failed to start: {self.failed_path.read_text().strip()}"
        except FileNotFoundError:
            pass
        return None
