"""Which datasets the toolkit knows and what a local data file looks like: checked before any work.

Torch-free, so that flag validation (``miq.run.config``) checks DATASET and --eval without importing the data
loading itself (``datautils``).
"""

from __future__ import annotations

import os
from pathlib import Path

from miq.errors import DataError

KNOWN = ("wikitext2", "ptb", "c4", "synthetic")
RECORD_SUFFIXES = (".json", ".jsonl")  # files of {"text": ...} records; any other file is plain text


def is_local_path(name: str) -> bool:
    """True when ``name`` is not a KNOWN dataset and looks like a file path.

    Looks like a path: has a suffix (``x.txt``), a path separator (``data/x``) or exists on disk.
    """
    if name in KNOWN:
        return False
    path = Path(name).expanduser()
    return bool(path.suffix) or os.sep in name or "/" in name or path.exists()


def validate_name(name: str) -> None:
    """Raise :class:`DataError` unless ``name`` is a KNOWN dataset or an existing file.

    Cheap (no loading), so a CLI can call it before spending time on the model.
    """
    if name in KNOWN:
        return
    if not is_local_path(name):
        choices = ", ".join(KNOWN)
        raise DataError(f"unknown dataset {name!r}: use {choices} or a path to a text, .json or .jsonl file")
    path = Path(name).expanduser()
    if path.is_dir():
        raise DataError(f"unsupported dataset {name!r}: a folder; give a text, .json or .jsonl file")
    if not path.is_file():
        raise DataError(f"file not found: {name}")
