"""Supervisor: the child processes of `hmoe serve` — started in order, restarted when one dies, stopped in order.

Children run in their own process group, so a Ctrl-C reaches only the supervisor, which stops them
in order: the router first (it drains, while the workers still run), then the workers. They get
SIGTERM if the supervisor itself dies (Linux PR_SET_PDEATHSIG), so none is left behind.
A child that exits is restarted, at most max_restarts times within window_s; one that failed to
start (exit 2 or 3: restarting cannot fix it) or restarts too often stops everything, exit 1.
A second signal kills every child at once. The signal handler only counts; the loop acts.

Liveness is progress, as under systemd: each child gets a notify socket of its own ($NOTIFY_SOCKET,
$WATCHDOG_USEC = its watchdog_s), and one that said READY=1 but sends no WATCHDOG=1 for watchdog_s
(its main loop hangs: a kernel, a deadlock) is killed and restarted. A child that sends
X_HMOE_STOP=1 before exiting 0 (the router drained by `hmoe drain`) stops the whole service, exit 0.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

NO_RESTART_CODES = (2, 3)  # usage error, start-up failure
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ChildSpec:
    name: str
    argv: tuple[str, ...]
    stop_grace_s: float  # how long it may drain after SIGTERM before it is killed
    watchdog_s: float = 0.0  # after READY=1, a child silent on its notify socket this long is hung; 0 = not watched


class RestartPolicy:
    """Pure: may `name` restart now? At most max_restarts within any window_s."""

    def __init__(self, max_restarts: int = 3, window_s: float = 60.0):
        self.max_restarts, self.window_s = max_restarts, window_s
        self.restarts: dict[str, deque[float]] = {}

    def allow(self, name: str, exit_code: int, now: float) -> bool:
        if exit_code in NO_RESTART_CODES:
            return False
        recent = self.restarts.setdefault(name, deque())
        while recent and now - recent[0] > self.window_s:
            recent.popleft()
        if len(recent) >= self.max_restarts:
            return False
        recent.append(now)
        return True


def _prctl():
    """libc's prctl, resolved in the parent: the child, between fork and exec, only calls it."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None  # not Linux: children may outlive a killed supervisor


class Supervisor:
    def __init__(
        self,
        specs: list[ChildSpec],
        output: IO,
        policy: RestartPolicy | None = None,
        say: Callable[[str], None] = print,
        notify_dir: str | os.PathLike | None = None,
    ):
        self.specs = specs
        self.notify_dir = Path(notify_dir) if notify_dir is not None else None
        self.notify: dict[str, socket.socket] = {}  # child name -> the datagram socket it notifies on
        self.ready: dict[str, bool] = {}
        self.alive_s: dict[str, float] = {}  # child name -> its last READY=1 or WATCHDOG=1
        self.stop_asked_by: str | None = None
        self.output = output  # where the children's stdout and stderr go
        self.policy = policy or RestartPolicy()
        self.say = say
        self.procs: dict[str, subprocess.Popen] = {}
        self.signals = 0
        prctl = _prctl()
        self._preexec = (lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM)) if prctl is not None else None

    def start(self) -> None:
        for spec in self.specs:
            if self.notify_dir is not None:
                path = self.notify_dir / f"notify-{spec.name}.sock"
                path.unlink(missing_ok=True)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
                sock.bind(str(path))
                self.notify[spec.name] = sock
            self._spawn(spec)

    def _spawn(self, spec: ChildSpec) -> None:
        env = None
        if spec.name in self.notify:
            env = {**os.environ, "NOTIFY_SOCKET": self.notify[spec.name].getsockname()}
            env.pop("WATCHDOG_PID", None)
            if spec.watchdog_s > 0:
                env["WATCHDOG_USEC"] = str(int(spec.watchdog_s * 1e6))
        self.ready[spec.name], self.alive_s[spec.name] = False, time.monotonic()
        self.procs[spec.name] = subprocess.Popen(
            spec.argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.output,
            stderr=self.output,
            process_group=0,
            preexec_fn=self._preexec,
        )

    def run(self, on_tick: Callable[[], None] | None = None, tick_s: float = 0.2) -> int:
        """Watch the children until a signal (stop them: 0) or one that cannot be restarted (stop: 1). The
        caller's SIGINT and SIGTERM handlers are back when it returns."""
        previous = {signum: signal.signal(signum, self._on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._watch(on_tick, tick_s)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _watch(self, on_tick: Callable[[], None] | None, tick_s: float) -> int:
        while not self.signals:
            now = time.monotonic()
            for spec in self.specs:
                self._read_notify(spec.name, now)
                code = self.procs[spec.name].poll()
                if code is None:
                    silent_s = now - self.alive_s[spec.name]
                    if self.ready[spec.name] and 0 < spec.watchdog_s < silent_s:
                        self.say(f"{spec.name} made no progress for {silent_s:.1f} s (watchdog): killing it")
                        self.procs[spec.name].kill()  # its exit is seen (and restarted) next turn
                        self.ready[spec.name] = False
                    continue
                if code == 0 and self.stop_asked_by == spec.name:
                    self.say(f"{spec.name} drained on request: stopping the service")
                    return self.stop()
                if not self.policy.allow(spec.name, code, time.monotonic()):
                    self.say(f"{spec.name} exited with status {code}; not restarting it: stopping everything")
                    self.stop()
                    return 1
                self.say(f"{spec.name} exited with status {code}; restarting it")
                self._spawn(spec)
            if on_tick is not None:
                on_tick()
            time.sleep(tick_s)
        return self.stop()

    def _read_notify(self, name: str, now: float) -> None:
        sock = self.notify.get(name)
        while sock is not None:
            try:
                lines = sock.recv(4096).decode(errors="replace").splitlines()
            except BlockingIOError:
                return
            if "READY=1" in lines:
                self.ready[name] = True
            if "READY=1" in lines or "WATCHDOG=1" in lines:
                self.alive_s[name] = now
            if "X_HMOE_STOP=1" in lines:
                self.stop_asked_by = name

    def _on_signal(self, signum, frame) -> None:
        self.signals += 1  # touches nothing else: run() and stop() see it within a tick

    def stop(self) -> int:
        """SIGTERM each child in start order and wait for it to drain; 0 when all exited cleanly."""
        codes = []
        for spec in self.specs:
            proc = self.procs[spec.name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + spec.stop_grace_s
            while proc.poll() is None and time.monotonic() < deadline and self.signals < 2:
                time.sleep(0.05)
            if proc.poll() is None:
                proc.kill()
            codes.append(proc.wait())
        for sock in self.notify.values():
            path = sock.getsockname()
            sock.close()
            Path(path).unlink(missing_ok=True)
        self.notify.clear()
        return 0 if all(c == 0 for c in codes) else 1

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()

    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.procs.items()}
