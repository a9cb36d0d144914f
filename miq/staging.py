"""A run's outputs built in hidden staging files and folders beside their targets and published together:
all old or all new, whatever interrupts the run (an error, Ctrl-C, SIGTERM). Staged names are
``atomic.temp_name``'s, so a process killed beyond any cleanup leaves only what ``atomic.remove_stale``
recognises and removes."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from miq import atomic
from miq.errors import PublishError

Guard = Callable[[], "str | None"]  # why the target may not be replaced now (one line), or None


@dataclass
class _Staged:
    target: str  # absolute final path
    staged: str  # where it is built: beside the target, so that publishing is a rename
    folder: bool
    guard: Guard | None = None


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT/SIGTERM wait until the block is done (renames that must all happen, or all be undone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Staging:
    """A run's outputs, built in hidden staging files and folders and published together.

        with Staging() as stage:
            write_json(stage.file(cfg.json), result)      # any writer, given the staged path
            saving.write(stage.folder(cfg.save), ...)        # an empty folder to fill
        # left normally: every target replaced by its staged version; left by an exception (a user error,
        # Ctrl-C): every staged path and every parent folder this created removed, nothing published

    Staged names are ``atomic.temp_name(name, pid)`` beside the target, so a process killed beyond any cleanup
    (SIGKILL) leaves something ``atomic.remove_leftovers`` and the next run's ``atomic.remove_stale`` remove.
    """

    def __init__(self) -> None:
        self._items: list[_Staged] = []
        self._made: list[str] = []  # parent folders created for targets, outermost first

    def file(self, target, guard: Guard | None = None) -> str:
        """The staged path to write ``target``'s content to (its parent folder exists). ``guard``: asked again
        just before publishing, since a long run gives the user time to put files where it publishes."""
        return self._stage(target, folder=False, guard=guard)

    def folder(self, target, guard: Guard | None = None) -> str:
        """An empty staged folder that replaces the folder ``target`` on publishing (``guard``: as ``file``)."""
        return self._stage(target, folder=True, guard=guard)

    def _stage(self, target, folder: bool, guard: Guard | None = None) -> str:
        target = os.path.abspath(os.path.expanduser(os.fspath(target)))
        if os.path.islink(target):  # written through: a rename onto the link would replace the link itself
            target = os.path.realpath(target)
        if any(it.target == target for it in self._items):
            raise ValueError(f"{target} is staged twice")
        parent, name = os.path.split(target)
        self._make_parents(parent)
        atomic.remove_stale(parent, name)
        staged = os.path.join(parent, atomic.temp_name(name, os.getpid()))
        atomic.remove(staged)
        self._items.append(_Staged(target, staged, folder, guard))  # before it exists: an interrupt between the two
        if folder:  # would otherwise leave a folder that discard does not know of
            os.mkdir(staged)
        return staged

    def _make_parents(self, parent: str) -> None:
        missing = []
        while not os.path.lexists(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        for d in reversed(missing):
            self._made.append(d)  # first, as above
            os.mkdir(d)

    def publish(self) -> None:
        """Rename every staged output onto its target (an existing target is replaced); if one rename fails,
        undo the others, so that the targets are all old or all new."""
        with _signals_held():
            done: list[tuple[_Staged, str | None]] = []
            try:
                for it in self._items:
                    problem = it.guard() if it.guard is not None and os.path.lexists(it.target) else None
                    if problem:
                        raise PublishError(f"{problem}; the run was done, nothing was written")
                for it in self._items:
                    old = None
                    if os.path.lexists(it.target):  # set aside, to be restored if a later rename fails
                        parent, name = os.path.split(it.target)
                        old = os.path.join(parent, atomic.temp_name(name + ".old", os.getpid()))
                        os.replace(it.target, old)
                    done.append((it, old))
                    os.replace(it.staged, it.target)
            except BaseException:
                self._roll_back(done)
                self._discard()
                raise
            for _, old in done:
                if old is not None:
                    atomic.remove(old)
            self._items, self._made = [], []

    @staticmethod
    def _roll_back(done: list[tuple[_Staged, str | None]]) -> None:
        for it, old in reversed(done):
            if os.path.lexists(it.staged):  # this one's rename did not happen
                atomic.remove(it.staged)
            else:
                atomic.remove(it.target)
            if old is not None:
                os.replace(old, it.target)

    def discard(self) -> None:
        """Remove every staged output and every folder created for them: nothing of this run remains."""
        with _signals_held():
            self._discard()

    def _discard(self) -> None:
        for it in self._items:
            atomic.remove(it.staged)
        for d in reversed(self._made):
            with contextlib.suppress(OSError):  # not empty: something else was put there meanwhile
                os.rmdir(d)
        self._items, self._made = [], []

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.publish()
        else:
            self.discard()
