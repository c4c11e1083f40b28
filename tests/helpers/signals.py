"""Children that take Ctrl-C as a terminal's foreground job does."""

from __future__ import annotations

import signal


def foreground() -> None:
    """Popen's preexec_fn for a child the test sends SIGINT (Ctrl-C): SIGINT back to its default.

    A shell starts a background job (`pytest ... &`, a CI runner's detached step) with SIGINT ignored, and
    children inherit that; Python then installs no KeyboardInterrupt handler, and the child sleeps through
    the test's Ctrl-C. From a terminal the same command gets SIGINT at its default.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
