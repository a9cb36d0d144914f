"""Files that are either absent or complete: write a temporary file beside the target, then rename it.

A killed run (or a sweep stopped mid-configuration) therefore never leaves a half-written result, report or
figure; a rerun sees the file missing and redoes it. A writer killed mid-write leaves its temporary file
behind: whoever killed it removes it with ``remove_leftovers``.
"""

from __future__ import annotations

import contextlib
import glob
import os


def _temp_name(name: str, pid: int) -> str:
    # hidden, and named after the writing process, so that concurrent writers never share one
    return f".{name}.{pid}.tmp"


def write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (parent folders created)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, _temp_name(os.path.basename(path), os.getpid()))
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def remove_leftovers(folder, pid: int) -> list[str]:
    """Remove the temporary files that process ``pid`` (killed mid-write) left in ``folder``; returns them."""
    found = glob.glob(os.path.join(glob.escape(os.fspath(folder)), _temp_name("*", pid)))
    for tmp in found:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return found
