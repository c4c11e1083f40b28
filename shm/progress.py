"""Progress: bytes done of a known total as GB/s and ETA — one updating line on a terminal, a log line now and
then; Ticker: the seconds spent so far on a wait of unknown length (kernel compile, start-up)."""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import TextIO

log = logging.getLogger(__name__)
TTY_INTERVAL_S = 0.2  # redraw the terminal line at most this often
LOG_INTERVAL_S = 10.0  # log a progress line at most this often


class Progress:
    """Thread-safe meter; advance() from any loader thread, finish() once."""

    def __init__(
        self, label: str, total_bytes: int, stream: TextIO | None = None, log_interval_s: float = LOG_INTERVAL_S
    ):
        self.label = label
        self.total_bytes = total_bytes
        self.done_bytes = 0
        self._stream = stream if stream is not None else sys.stderr
        self._tty = self._stream.isatty()
        self._log_interval_s = log_interval_s
        self._lock = threading.Lock()
        self._start = time.perf_counter()
        self._last_draw = self._last_log = self._start

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self.done_bytes += nbytes
            now = time.perf_counter()
            if self._tty and now - self._last_draw >= TTY_INTERVAL_S:
                self._last_draw = now
                self._stream.write("\r\x1b[K" + self.line(now))
                self._stream.flush()
            if now - self._last_log >= self._log_interval_s:
                self._last_log = now
                if self._tty:  # the log line may go to the same terminal: start it on a clean line
                    self._stream.write("\r\x1b[K")
                    self._stream.flush()
                log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed_s = max((now or time.perf_counter()) - self._start, 1e-9)
        rate = self.done_bytes / elapsed_s
        eta_s = (self.total_bytes - self.done_bytes) / rate if rate > 0 else float("inf")
        percent = 100.0 * self.done_bytes / max(self.total_bytes, 1)
        return (
            f"{self.label}: {self.done_bytes / 1e9:.2f}/{self.total_bytes / 1e9:.2f} GB ({percent:.0f}%) "
            f"{rate / 1e9:.2f} GB/s ETA {eta_s:.0f} s"
        )

    def finish(self) -> float:
        """Close the terminal line, log the total; the elapsed seconds."""
        elapsed_s = time.perf_counter() - self._start
        if self._tty:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
        log.info(
            "%s: %.2f GB in %.1f s (%.2f GB/s)",
            self.label,
            self.done_bytes / 1e9,
            elapsed_s,
            self.done_bytes / 1e9 / max(elapsed_s, 1e-9),
        )
        return elapsed_s


class Ticker:
    """`with Ticker("compiling the CPU kernels"):` — says what a person is waiting for once it has taken
    longer than after_s, then every every_s (an updating line on a terminal), and how long it took."""

    def __init__(self, label: str, stream: TextIO | None = None, after_s: float = 2.0, every_s: float = 5.0):
        self.label, self.after_s, self.every_s = label, after_s, every_s
        self._stream = stream if stream is not None else sys.stderr
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="hmoe-ticker", daemon=True)
        self._start = 0.0
        self._said = False

    def __enter__(self) -> Ticker:
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        if self._said:
            end = "\r\x1b[K" if self._stream.isatty() else ""
            self._stream.write(f"{end}{self.label}: done in {time.perf_counter() - self._start:.1f} s\n")
            self._stream.flush()

    def _tick(self) -> None:
        wait_s = self.after_s
        while not self._done.wait(wait_s):
            tty = self._stream.isatty()
            line = f"{self.label}... {time.perf_counter() - self._start:.0f} s"
            self._stream.write("\r\x1b[K" + line if tty else line + "\n")
            self._stream.flush()
            self._said = True
            wait_s = 1.0 if tty else self.every_s
