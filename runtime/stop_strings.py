"""StopStrings: find a request's stop strings in its streamed text without ever emitting part of one.

The last (longest stop - 1) characters are held back, since they may begin a stop string that the
next token completes; any stop occurrence that ends in new text therefore lies inside
held + new. The stop that completes first wins, however the text was cut into pieces; the text is
cut just before it (a stop string is never shown).
"""

from __future__ import annotations


class StopStrings:
    __slots__ = ("stops", "keep", "held", "stopped")

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.keep = max((len(s) for s in stops), default=1) - 1
        self.held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """New detokenized text -> the part that is safe to show now (after a match: up to the stop)."""
        assert not self.stopped, "push after a stop string matched"
        if not self.stops:
            return text
        buf = self.held + text
        hits = [(i + len(s), i) for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            cut = min(hits)[1]  # the stop that completes first, as if tokens came one character at a time
            self.stopped, self.held = True, ""
            return buf[:cut]
        split = max(len(buf) - self.keep, 0)
        self.held = buf[split:]
        return buf[:split]

    def flush(self) -> str:
        """At the end of the request: the held-back tail (it held no stop string)."""
        held, self.held = self.held, ""
        return held
