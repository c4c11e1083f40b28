"""Helpers shared by the runtime tests (imported by name: tests/ has no packages)."""

from __future__ import annotations

from dataclasses import dataclass

EOS = 256


@dataclass
class _Encoding:
    ids: list[int]


class ByteTokenizer:
    """Token i < 256 is byte i; 256 is EOS (a special token: it decodes to nothing)."""

    def encode(self, text: str) -> _Encoding:
        return _Encoding(list(text.encode()))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RouterProcess:
    proc: object  # subprocess.Popen
    frontend: str
    backend: str
    log_path: object  # Path of its JSON log lines

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def start_router(tmp_path, *flags: str, env: dict | None = None, wait: bool = True) -> RouterProcess:
    """`python -m hmoe.runtime.router` on a free port with its own runtime dir; waits until it answers."""
    import os
    import subprocess
    import sys
    import time

    frontend = f"tcp://127.0.0.1:{free_port()}"
    runtime_dir = tmp_path / f"run-{frontend.rsplit(':', 1)[1]}"
    log_path = runtime_dir.with_suffix(".log")
    cmd = [sys.executable, "-m", "hmoe.runtime.router", "--frontend", frontend, "--runtime-dir", str(runtime_dir), *flags]
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stderr=log_file, stdout=log_file, env={**os.environ, **(env or {})})
    router = RouterProcess(proc, frontend, f"ipc://{runtime_dir}/backend.sock", log_path)
    deadline = time.monotonic() + 30
    while wait and '"listening"' not in router.log():
        assert proc.poll() is None, router.log()
        assert time.monotonic() < deadline, "router did not start"
        time.sleep(0.05)
    return router
