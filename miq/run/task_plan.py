"""--tasks checked before any work: lm-evaluation-harness is installed, every task file defines a task over
data that exist, every name is one of the harness's tasks, groups or tags (its index of task YAMLs is local: no
network). ``plan`` returns the ``TaskPlan`` that ``tasks.evaluate`` runs; a sweep checks its --tasks with it too,
so nothing here imports torch.

The harness is imported inside the functions, never at module level: runs without --tasks must work where
it is not installed (it is heavy and optional), and where it is missing the user gets one line naming the
install command instead of a traceback.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import yaml

from miq.errors import ConfigError, first_line
from miq.run.config import RunConfig, is_task_file

INSTALL = "pip install 'lm-eval>=0.4,<0.5' 'accelerate>=1.0'"
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas")  # datasets' builders over data files


@dataclass(frozen=True, eq=False)
class TaskPlan:
    """The tasks of one run, checked before any work.

    ``names``: the harness's names, in --tasks order (a task file stands for the task or group it defines);
    ``sources``: each as given (a name, or the file's path); ``manager``: the harness's TaskManager, which
    knows them all (the task files' folders included); ``local``: every task is a file over local data.
    """

    names: tuple[str, ...]
    sources: tuple[str, ...]
    manager: object
    version: str
    local: bool


def harness():
    """The ``lm_eval`` package; ConfigError naming the install command where it (or what it needs) is missing."""
    try:
        import lm_eval  # lazily, see the module docstring
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (needs accelerate: checked now, not at the end)
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"--tasks: needs lm-evaluation-harness, which cannot be imported "
                          f"({first_line(e)}); install it: {INSTALL}") from None
    return lm_eval


def _version(lm_eval) -> str:
    try:
        return version("lm_eval")
    except Exception:  # an unusual install (a source tree on the path): the attribute, or nothing
        return str(getattr(lm_eval, "__version__", "unknown"))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The harness's log at ERROR only: it warns at length about things that are expected here (a model
    passed as an object, default aggregations), and this toolkit keeps stderr for what needs attention."""
    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _entries(manager) -> dict:
    """{name: index entry} of the manager (an Entry object in lm-eval 0.4.13; older 0.4 releases kept dicts
    with the same keys, "type" for "kind")."""
    return dict(getattr(manager, "task_index", {}) or {})


def _field(entry, key: str):
    return entry.get(key) if isinstance(entry, dict) else getattr(entry, key, None)


def _plain_task(entry) -> bool:
    """A task defined by its file alone (not a group or tag, which name other tasks)."""
    kind = _field(entry, "kind") or _field(entry, "type")
    return str(getattr(kind, "name", kind)).lower() == "task"


@functools.cache
def _harness_tasks():
    """The index of the harness's own tasks alone: built once per process (it reads thousands of YAML files,
    seconds; they do not change while it runs)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _manager(folders: list[str], defaults: bool):
    """A TaskManager over the harness's tasks (``defaults``) and the task files' ``folders``."""
    from lm_eval.tasks import TaskManager

    if defaults and not folders:
        return _harness_tasks()
    try:
        return TaskManager(include_path=folders or None, include_defaults=defaults)
    except TypeError:  # an older 0.4.x without include_defaults: the harness's tasks are always indexed
        return TaskManager(include_path=folders or None)


def _read_yaml(path: str) -> dict:
    """A task file's own keys (its ``include`` not followed), for what the harness's index does not say; the
    harness's tags (``!function``) read as None. {} when the file is not a YAML mapping."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.load(f, Loader)  # noqa: S506  (a SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _data_files(cfg: dict) -> list[str]:
    """The task's ``dataset_kwargs.data_files`` flattened (a path, a list, or {split: path or list})."""
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    files = list(files.values()) if isinstance(files, dict) else [files] if isinstance(files, str) else files or []
    return [str(f) for x in files for f in (x if isinstance(x, list) else [x])]


def _reads_local_files(cfg: dict) -> bool:
    """A task whose documents are files on this machine: a local dataset folder, or one of datasets' file
    builders over local data files. Such tasks run with the hub switched off (``loading.offline_mode``):
    datasets otherwise tries the network even for local files (it counts the builder's use online)."""
    path = cfg.get("dataset_path")
    if isinstance(path, str) and os.path.isdir(path):
        return True
    files = _data_files(cfg)
    return path in LOCAL_BUILDERS and bool(files) and not any("://" in f for f in files)


def _check_data_files(given: str, cfg: dict) -> None:
    """Every local data file a task file names exists (patterns with * ? [ are left to datasets): found now,
    not when the harness opens it after compression. Relative paths are the working directory's, as for
    datasets."""
    for f in _data_files(cfg):
        if "://" not in f and not any(c in f for c in "*?[") and not os.path.isfile(f):
            raise ConfigError(f"--tasks {given}: its data file {f} does not exist (data_files are read relative "
                              "to the working directory, not to the task file)")


def _function_tags(path: str, seen: set[str]) -> list[tuple[str, str]]:
    """(task file, dotted name) of every ``!function`` tag in the task file ``path`` and the files it
    includes (``include:``, relative to its folder, as the harness reads it)."""
    path = os.path.abspath(path)
    if path in seen or not os.path.isfile(path):
        return []
    seen.add(path)
    names: list[str] = []

    class Loader(yaml.SafeLoader):
        pass

    def tag(loader, suffix, node):
        if suffix == "function" and isinstance(node, yaml.ScalarNode):
            names.append(str(loader.construct_scalar(node)))

    Loader.add_multi_constructor("!", tag)
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.load(f, Loader)  # noqa: S506  (a SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []  # an unreadable file is _file_name's to refuse
    found = [(path, n) for n in names]
    include = cfg.get("include") if isinstance(cfg, dict) else None
    if isinstance(include, str):
        found += _function_tags(os.path.join(os.path.dirname(path), include), seen)
    return found


def _check_functions(given: str) -> None:
    """Every ``!function`` a task file names imports and holds that function, as the harness will import it
    when the tasks run: found before compression, not after it (the finished work would be lost)."""
    for path, dotted in _function_tags(given, set()):
        module, _, func = dotted.rpartition(".")
        file = os.path.join(os.path.dirname(path), f"{module}.py")
        where = f"--tasks {given}: !function {dotted} in {os.path.basename(path)}"
        if not module or not os.path.isfile(file):
            raise ConfigError(f"{where}: no module file {file} (the harness looks beside the task file)")
        try:
            spec = importlib.util.spec_from_file_location(module, file)
            code = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(code)
        except Exception as e:  # the user's module, whatever it raises on import: one line
            raise ConfigError(f"{where}: {file} does not import ({first_line(e)})") from None
        if not callable(getattr(code, func, None)):
            raise ConfigError(f"{where}: {file} has no function {func}")


def _defined(manager, files: list[str]) -> dict:
    """{resolved path: (name, entry)} of the index entries read from ``files``. The index holds thousands of
    entries: only those whose file bears the name of one of ``files`` are resolved (a look at the disk each)."""
    wanted = {Path(f).resolve().name for f in files}
    return {Path(path).resolve(): (name, entry) for name, entry in _entries(manager).items()
            if (path := _field(entry, "yaml_path")) and os.path.basename(path) in wanted}


def _file_name(given: str, defined: dict, manager) -> str:
    """The task (or group) the file ``given`` defines, as the harness indexed it; ConfigError when it did not."""
    found = defined.get(Path(given).resolve())
    if found is not None:
        return found[0]
    spec = _read_yaml(given)
    name = spec.get("task") or spec.get("group")
    other = _field(_entries(manager).get(name), "yaml_path") if isinstance(name, str) else None
    if other:  # the harness keeps one file per name
        raise ConfigError(f"--tasks {given}: defines task {name}, as {Path(other).resolve()} does; "
                          "give each task once")
    raise ConfigError(f"--tasks {given}: not a task file the harness can read (a YAML with a 'task:' or 'group:' "
                      "name; see the harness's docs/new_task_guide.md)")


def plan(given: list[str]) -> TaskPlan:
    """Check --tasks against the harness (installed, every file a task, every name known) and return the plan.

    Task files are included through their folders (the harness's ``include_path``). When every task is a
    file that defines a plain task over local data files, the harness's own tasks are not indexed (that takes
    seconds) and the run makes no network access; a group file may name the harness's tasks, so then they
    are indexed.
    """
    lm_eval = harness()
    files = [g for g in given if is_task_file(g)]
    for f in files:
        if not os.path.isfile(f):
            raise ConfigError(f"--tasks {f}: no such task file")
    folders = sorted({str(Path(f).resolve().parent) for f in files})
    local = len(files) == len(given)
    with quiet():
        manager = _manager(folders, defaults=not local)
        defined = _defined(manager, files)
        mine = [defined[k][1] for k in {Path(f).resolve() for f in files} if k in defined]
        local = local and all(_plain_task(e) and _reads_local_files(_field(e, "cfg") or
                                                                    _read_yaml(str(_field(e, "yaml_path"))))
                              for e in mine)
        if len(files) == len(given) and not local:  # a group, or a hub dataset: the harness's tasks may be named
            manager = _manager(folders, defaults=True)
    names = []
    for g in given:
        name = _file_name(g, defined, manager) if is_task_file(g) else g
        if is_task_file(g):
            entry = defined[Path(g).resolve()][1]
            _check_data_files(g, _field(entry, "cfg") or _read_yaml(g))
            _check_functions(g)
        if not is_task_file(g) and name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError(f"--tasks {g}: not a task, group or tag of lm-eval {_version(lm_eval)} ({hint}"
                              "`lm-eval ls tasks` lists them; or give the path of a task YAML file)")
        if name in names:
            raise ConfigError(f"--tasks {g}: task {name} is given twice ({given[names.index(name)]} defines it)")
        names.append(name)
    return TaskPlan(tuple(names), tuple(given), manager, _version(lm_eval), local)


def prepare(cfg: RunConfig) -> TaskPlan | None:
    """The run's TaskPlan (None without --tasks); a ConfigError before any work when it cannot run."""
    return plan(cfg.task_names()) if cfg.task_names() else None
