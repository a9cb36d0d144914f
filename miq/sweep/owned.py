"""Which files in a results folder are the sweep's own, and what happens to the others: a sweep deletes or
writes over only files it can prove it wrote; any other file at a name it needs is kept, renamed beside it.

How a file proves it is the sweep's (docs/workflow.md says the same):
- ``<id>.log``: its first line is ``# `` and the command the sweep ran for that configuration, which ends in
  ``--json .../<id>.json --analysis-dir .../analysis/<id>`` (``launch.start_log`` writes it before anything else);
- ``<id>.failed.json``: a JSON object whose ``id`` is the configuration's and that holds its ``command`` and
  ``returncode`` (``launch.write_failure`` writes nothing else there);
- ``<id>.json``: a result is never removed; one that does not read as a result (cut short, or not one at all) is
  kept aside like any foreign file, and the configuration runs again.

A file kept aside is renamed ``<name>.foreign-<n>``, the first ``n`` free, in the same folder: no other file is
written over, the report (which reads ``*.json``) does not read it, and the sweep says where it went.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable
from pathlib import Path


def own_log(path: Path, cfg_id: str) -> bool:
    """Whether ``path`` is a log the sweep wrote for configuration ``cfg_id`` (its first line the command)."""
    try:
        with open(path, "rb") as f:
            first = f.readline(65536).decode("utf-8", "replace").rstrip("\n")
    except OSError:
        return False
    if not first.startswith("# "):
        return False
    try:
        words = shlex.split(first[2:])
    except ValueError:
        return False
    tail = words[-4:]
    return (len(tail) == 4 and tail[0] == "--json" and Path(tail[1]).name == f"{cfg_id}.json"
            and tail[2] == "--analysis-dir" and Path(tail[3]).name == cfg_id)


def own_failure(path: Path, cfg_id: str) -> bool:
    """Whether ``path`` is a failure note the sweep wrote for configuration ``cfg_id``."""
    try:
        note = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(note, dict) and note.get("id") == cfg_id and {"command", "returncode"} <= set(note)


def set_aside(path: Path) -> Path:
    """Rename ``path`` to ``<name>.foreign-<n>`` beside it, the first ``n`` free; returns the new path. The
    caller holds the results folder's lock, so no other sweep takes the name between the check and the rename."""
    n = 1
    while os.path.lexists(path.with_name(f"{path.name}.foreign-{n}")):
        n += 1
    new = path.with_name(f"{path.name}.foreign-{n}")
    os.rename(path, new)
    return new


def make_way(path: Path, own: Callable[[Path], bool], say: Callable[[str], None]) -> bool:
    """Before the sweep writes ``path`` or removes it: a file there that ``own`` does not recognise is set aside
    (said in one line through ``say``). Returns whether the sweep's own file is there (to replace or remove)."""
    if not os.path.lexists(path):
        return False
    if not path.is_symlink() and path.is_file() and own(path):
        return True
    new = set_aside(path)
    say(f"{path} was not written by this sweep: kept as {new.name}")
    return False


def remove_own(path: Path, own: Callable[[Path], bool], say: Callable[[str], None]) -> None:
    """Remove the sweep's own ``path`` (a failure note that no longer stands); a foreign one is set aside."""
    if make_way(path, own, say):
        path.unlink(missing_ok=True)

