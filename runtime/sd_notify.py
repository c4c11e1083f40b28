"""SdNotify: tell systemd (Type=notify) that a process is ready, alive or stopping; no dependency.

The protocol is one datagram of newline-separated `KEY=VALUE` lines on the unix socket named by
$NOTIFY_SOCKET (a path, or `@name` for the abstract namespace). Without that variable (run by hand,
under `hmoe serve`, in tests) every call is a no-op that returns False.

Contract for the services (deploy/systemd):
- `ready()` once the process can serve: router sockets bound; worker pack attached, weights on the
  device, kernels compiled and its I/O thread started (it sends Register; READY does not wait for
  the router's answer, since the router unit starts after the workers). Never earlier: systemd
  orders the next unit on it.
- `tick()` from the main loop (every iteration is fine: it sends at most every half watchdog
  interval). A loop that hangs stops pinging and systemd restarts the service (WatchdogSec).
- `stopping()` when a drain begins (first SIGTERM or a Drain message), with
  `extend_timeout(drain_grace_s + margin)` so a grace longer than TimeoutStopSec is still honoured.
"""

from __future__ import annotations

import os
import socket
import time
import typing


class SdNotify:
    """One process's line to systemd. Environment is read once, in `from_env`."""

    def __init__(self, address: str = "", watchdog_s: float | None = None):
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_s = watchdog_s  # WatchdogSec; ping every half of it
        self._last_ping_s = -float("inf")

    @classmethod
    def from_env(cls, env: typing.Mapping[str, str] | None = None) -> SdNotify:
        env = os.environ if env is None else env
        return cls(env.get("NOTIFY_SOCKET", ""), watchdog_interval_s(env))

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *lines: str) -> bool:
        """Send `KEY=VALUE` lines as one datagram; False when not under systemd or it was not taken.

        NOTE: never blocks and never raises. A full receive queue (a unix datagram socket holds only
        net.unix.max_dgram_qlen messages) would otherwise stall the caller's loop in sendto, and a
        serving process must not die because its supervisor's socket hiccuped; a lost ping is
        followed by the next one."""
        if not self.address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(lines).encode(), socket.MSG_DONTWAIT, self.address)
        except OSError:
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for `seconds` more before systemd gives up on the current start or stop (long loads, drains)."""
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def watchdog(self) -> bool:
        self._last_ping_s = time.monotonic()
        return self.send("WATCHDOG=1")

    def tick(self) -> bool:
        """WATCHDOG=1 if half the watchdog interval passed since the last ping; cheap to call often."""
        if self.watchdog_s is None or not self.address:
            return False
        if time.monotonic() - self._last_ping_s < self.watchdog_s / 2:
            return False
        return self.watchdog()


def watchdog_interval_s(env: typing.Mapping[str, str]) -> float | None:
    """WatchdogSec from WATCHDOG_USEC, or None when systemd set no watchdog for this very process."""
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6
