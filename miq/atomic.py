"""Files that are either absent or complete: write a temporary file beside the target, then rename it.

A killed run (or a sweep stopped mid-configuration) therefore never leaves a half-written result, report or
figure; a rerun sees the file missing and redoes it. A writer killed mid-write leaves its temporary file
behind: whoever killed it removes it with ``remove_leftovers``, and ``remove_stale`` removes those of any
writer that is gone. ``staging.Staging`` names its staging files and folders the same way (``temp_name``).
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import shutil


def temp_name(name: str, pid: int | str) -> str:
    """The temporary name of ``name`` for process ``pid``: hidden, and named after the writing process, so
    that concurrent writers never share one and a leftover tells whose it was."""
    return f".{name}.{pid}.tmp"


def write_png(fig, path, dpi: float | None = None) -> None:
    """Write the matplotlib figure ``fig`` as a PNG to ``path`` atomically: no half-written figure, whatever
    interrupts us (run figures and report figures alike)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi if dpi is not None else "figure")
    write_bytes(path, buf.getvalue())


def write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (parent folders created)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, temp_name(os.path.basename(path), os.getpid()))
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


def remove(path: str) -> None:
    """Remove a temporary file or folder (a staged model is a folder), whichever it is, if still there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def remove_leftovers(folder, pid: int) -> list[str]:
    """Remove the temporary files and folders that process ``pid`` (killed mid-write) left in ``folder``;
    returns them."""
    found = glob.glob(os.path.join(glob.escape(os.fspath(folder)), temp_name("*", pid)))
    for tmp in found:
        remove(tmp)
    return found


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a zombie counts: its parent has not reaped it yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale(folder, name: str) -> list[str]:
    """Remove the temporary files and folders of ``name`` in ``folder`` whose writing process is gone (killed
    with SIGKILL, which no cleanup survives); returns them. Those of live processes are left alone."""
    pattern = re.compile(re.escape(f".{name}.") + r"(?:[^/]*\.)?(\d+)\.tmp")
    found = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.listdir(folder):
            m = pattern.fullmatch(entry)
            if m and int(m.group(1)) != os.getpid() and not alive(int(m.group(1))):
                found.append(os.path.join(os.fspath(folder), entry))
                remove(found[-1])
    return found
