"""Where a run may write: its output paths (--json, --save, --analysis-dir; a sweep's --out), checked before any
work so that a mistake costs none: never over an input (the data, the model, the toys' cache), never over a
file or folder this toolkit did not write, only where a file can be created. ``guard`` asks again just before
publishing. No torch here: a sweep checks its --out with these rules and starts in half a second.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from miq import atomic
from miq.checkpoint import formats
from miq.errors import ConfigError
from miq.model.toy_specs import TOYS, cache_root
from miq.run.config import RunConfig


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def _probe(flag: str, path: str, folder: str) -> None:
    """Create and remove a file in ``folder``: the only test that tells /proc, read-only mounts and
    permissions apart from a folder we can write to (root passes every permission bit check)."""
    probe = os.path.join(folder, atomic.temp_name("probe", os.getpid()))
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write in {folder} ({e.strerror or e})") from None


def published_at(flag: str, path: str) -> str:
    """Where an output given as ``path`` is published: a symlink's target (written through: the link itself is
    never replaced, as ``Staging`` does); a link into a folder that does not exist, or a loop, is refused."""
    target = os.path.abspath(os.path.expanduser(path))
    if not os.path.islink(target):
        return target
    real = os.path.realpath(target)
    if os.path.islink(real) or not os.path.isdir(os.path.dirname(real)):
        raise ConfigError(f"{flag} {path}: a symlink to {real}, which cannot be written (a loop, or its folder "
                          "does not exist); give a real path or create the link's folder first")
    return real


def replace_problem(flag: str, path: str, kind: str) -> str | None:
    """Why publishing ``path`` would lose something this toolkit did not write, or None: the user's files in a
    saved folder, a folder or file it never wrote. Checked before any work and again at publishing (files may
    be added while a run works)."""
    target = published_at(flag, path)
    if kind == "replace" and os.path.isdir(target):
        try:
            listed = os.listdir(target)
            foreign = formats.foreign(target) if listed else []
        except OSError as e:
            return f"{flag} {path}: cannot read the folder ({e.strerror or e})"
        if listed and not formats.saved_by_toolkit(target):
            return (f"{flag} {path}: an existing folder this toolkit did not save (no {formats.MARKER}) would be "
                    "replaced; remove it or give a new folder")
        if foreign:
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            return (f"{flag} {path}: holds {', '.join(foreign[:3])}{more}, which this toolkit did not write (its "
                    f"{formats.MARKER} does not list it), and replacing the folder would lose it; move it out or "
                    "give a new folder")
    if kind == "file" and os.path.isfile(target) and not _result_json(target):
        return (f"{flag} {path}: an existing file this toolkit did not write (not a result JSON) would be "
                "overwritten; give a new path")
    return None


def guard(flag: str, path: str, kind: str):
    """``replace_problem`` for ``Staging``, asked again just before publishing."""
    return lambda: replace_problem(flag, path, kind)


def check_target(flag: str, path: str, kind: str) -> None:
    """Refuse (ConfigError) a path that the run could not publish at the end. kind: "file" (written whole),
    "folder" (files are put in it) or "replace" (a folder replaced as a whole: the saved model)."""
    target = published_at(flag, path)
    if os.path.lexists(target):
        if kind == "file" and os.path.isdir(target):
            raise ConfigError(f"{flag} {path}: is a folder; give a file path")
        if kind == "file" and not os.path.isfile(target):
            raise ConfigError(f"{flag} {path}: exists and is not a regular file")
        if kind != "file" and not os.path.isdir(target):
            raise ConfigError(f"{flag} {path}: is a file; give a folder path")
        problem = replace_problem(flag, path, kind)
        if problem:
            raise ConfigError(problem)
    where = target if kind == "folder" else os.path.dirname(target)
    existing = _nearest_existing(where)
    if not os.path.isdir(existing):
        raise ConfigError(f"{flag} {path}: {existing} is a file, not a folder")
    _probe(flag, path, existing)


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _result_json(path: str) -> bool:
    """A result JSON this toolkit wrote: its ``env`` names the code version."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and isinstance(d.get("env"), dict) and "code_version" in d["env"]


def inputs_of(model: str, data: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(what, path) of everything a run reads and must never write: the data files ``data`` (as (flag, path)),
    the model folder, the toys' cached folders."""
    toys = [("toy cache", str(cache_root() / spec.version)) for spec in TOYS.values()]
    return [*data, ("MODEL", model), *toys]


def check_apart(flag: str, path: str, kind: str, inputs: list[tuple[str, str]]) -> None:
    """Refuse an output that would overwrite an input, or be written inside an input folder (both ways)."""
    for what, src in inputs:
        if not os.path.exists(src):
            continue
        if kind != "folder" and _inside(src, path):
            raise ConfigError(f"{flag} {path}: would overwrite the {what} {src}")
        if os.path.isdir(src) and _inside(path, src):
            raise ConfigError(f"{flag} {path}: inside the {what} {src}, which this toolkit never writes into")


def check_targets(cfg: RunConfig) -> None:
    """Every output path of the run can be published without touching an input or a file the toolkit did not
    write: checked up front, so that a mistake costs no work. The analysis folder only where figures can be
    drawn (MI-grouped and searched runs): it defaults to one, and a dense run in a read-only folder must not
    fail over figures it never draws."""
    figures = cfg.analysis_dir if cfg.grouped or cfg.search else ""  # --search draws search_levels.png
    targets = [(f, p, k) for f, p, k in [("--json", cfg.json, "file"), ("--save", cfg.save, "replace"),
                                         ("--analysis-dir", figures, "folder")] if p]
    for flag, path, kind in targets:
        check_apart(flag, path, kind, inputs_of(cfg.model, [("DATASET", cfg.dataset),
                                                            *[("--eval", e) for e in cfg.eval_names()]]))
        if cfg.save and flag != "--save" and _inside(path, cfg.save):
            raise ConfigError(f"{flag} {path}: inside the --save folder, which is replaced as a whole")
    if cfg.json and figures and _inside(figures, cfg.json):
        raise ConfigError(f"--analysis-dir {cfg.analysis_dir}: the same path as --json")
    for flag, path, kind in targets:
        check_target(flag, path, kind)
