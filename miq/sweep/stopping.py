"""SIGINT and SIGTERM to the sweep, at any moment of its life: one line, exit 128 + N, nothing left running.

The first signal stops the sweep: where nothing is running (reading its arguments, writing the report) it
raises ``Interrupted`` at once, and files being written are removed as they unwind (``atomic`` writes through
a temporary file it removes on any exception); while configurations run the signal is only noted
(``deferring``), and the sweep acts on it between steps (``check``), so that it never lands between starting
a process and recording it. Every later signal is ignored: the sweep is already stopping, and its cleanup (the
configurations stopped and waited for, their staged files removed) must not itself be cut short.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The sweep is being stopped; ``args[0]`` is its exit status."""


class Stop:
    """The sweep's handler of SIGINT/SIGTERM (see the module's doc)."""

    def __init__(self) -> None:
        self.signum = 0
        self.deferred = 0
        self.old: dict = {}

    def install(self) -> None:
        """The handler on, and the signals unblocked (``python -m miq.sweep`` blocks them while it imports): one
        that came meanwhile is delivered now, and raises here."""
        self.old = {sig: signal.signal(sig, self.handler) for sig in SIGNALS}
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)

    def uninstall(self) -> None:
        """The handlers found at ``install``; after a signal, ignore them instead: the process is ending, and
        a signal landing in the interpreter's exit would print a traceback."""
        for sig, old in self.old.items():
            signal.signal(sig, signal.SIG_IGN if self.signum else old)

    def handler(self, signum: int, frame) -> None:
        if self.signum:  # already stopping
            return
        self.signum = signum
        if not self.deferred:
            raise Interrupted(128 + signum)

    @contextlib.contextmanager
    def deferring(self) -> Iterator[None]:
        """Signals only noted inside: the code acts on them at its own ``check`` points."""
        self.deferred += 1
        try:
            yield
        finally:
            self.deferred -= 1

    def check(self) -> None:
        if self.signum:
            raise Interrupted(128 + self.signum)
