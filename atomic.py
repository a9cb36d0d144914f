"""Files that are either absent or complete: write a temporary file beside the target, then rename it.

A killed run (or a sweep stopped mid-configuration) therefore never leaves a half-written result, report or
figure; a rerun sees the file missing and redoes it.
"""

from __future__ import annotations

import contextlib
import os


def write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (parent folders created)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
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
