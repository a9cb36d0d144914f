"""Accuracy on zero-shot (or few-shot) tasks through lm-evaluation-harness, beside perplexity (``--tasks``).

The harness (PyPI ``lm-eval``, 0.4.x) runs on the model in memory, the compressed one or a saved folder read
back, through its ``HFLM`` wrapper and ``simple_evaluate``, so the numbers are the harness's own (those its
``lm_eval`` command prints for the same weights), not a re-implementation. ``prepare`` checks everything
that needs no model before any work: the harness is installed, every task file defines a task, every name
is one of the harness's tasks, groups or tags (its index of task YAMLs is local: no network). ``evaluate``
runs the tasks; ``record`` is what the result JSON keeps under ``tasks``.

The harness is imported inside the functions, never at module level: runs without --tasks must work where
it is not installed (it is heavy and optional), and where it is missing the user gets one line naming the
install command instead of a traceback.

Task datasets: a harness task name downloads its dataset on first use (the Hugging Face hub) and reads the
cache after; where the hub does not answer, the run reads the cache only (``loading.offline_mode``), as model
and dataset loading do. Tasks given as YAML files whose data are local files need no network, and the run
does not probe for one.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import importlib.util
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
import yaml

from miq.errors import ConfigError, DataError
from miq.model import loading, onload
from miq.options import fmt_fixed
from miq.run.config import RunConfig, is_task_file

INSTALL = "pip install 'lm-eval>=0.4,<0.5' 'accelerate>=1.0'"
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas")  # datasets' builders over data files
METRICS = ("acc", "acc_norm")  # kept under their own names (with their stderr) where a task reports them


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
                          f"({loading.first_line(e)}); install it: {INSTALL}") from None
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
            raise ConfigError(f"{where}: {file} does not import ({loading.first_line(e)})") from None
        if not callable(getattr(code, func, None)):
            raise ConfigError(f"{where}: {file} has no function {func}")


def _file_name(given: str, defined: dict, names: dict) -> str:
    """The task (or group) the file ``given`` defines, as the harness indexed it; ConfigError when it did not."""
    found = defined.get(Path(given).resolve())
    if found is not None:
        return found[0]
    spec = _read_yaml(given)
    name = spec.get("task") or spec.get("group")
    if isinstance(name, str) and name in names:  # the harness keeps one file per name
        raise ConfigError(f"--tasks {given}: defines task {name}, as {names[name]} does; give each task once")
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
        defined = {Path(path).resolve(): (name, entry) for name, entry in _entries(manager).items()
                   if (path := _field(entry, "yaml_path"))}
        mine = [defined[k][1] for k in {Path(f).resolve() for f in files} if k in defined]
        local = local and all(_plain_task(e) and _reads_local_files(_field(e, "cfg") or
                                                                    _read_yaml(str(_field(e, "yaml_path"))))
                              for e in mine)
        if len(files) == len(given) and not local:  # a group, or a hub dataset: the harness's tasks may be named
            manager = _manager(folders, defaults=True)
    by_name = {name: str(path) for path, (name, _) in defined.items()}
    names = []
    for g in given:
        name = _file_name(g, defined, by_name) if is_task_file(g) else g
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


def _hub(p: TaskPlan):
    """The hub switched off for tasks over local files (no probe: nothing to reach), and where it does not
    answer (the datasets' cache only); otherwise datasets download on first use."""
    return loading.offline_mode() if p.local or loading.hub_probe() else contextlib.nullcontext()


def evaluate(model, tokenizer, p: TaskPlan, cfg: RunConfig, dev: torch.device) -> dict:
    """Run the plan's tasks on ``model`` (moved to ``dev`` for it, and back to the CPU after, where the rest of
    the run keeps it; loaded layer by layer, one decoder layer at a time: ``onload.streamed``); returns
    ``record``'s block. A task the harness cannot run (its dataset not downloadable, a broken task file) is a
    DataError naming it."""
    lm_eval = harness()
    from lm_eval.models.huggingface import HFLM

    try:  # a model loaded layer by layer holds one decoder layer at a time, read as each forward reaches it
        with quiet(), _hub(p), onload.streamed(model, dev):
            # a copy: the harness gives a tokenizer without a pad token one, and --save writes the run's own
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=cfg.tasks_batch)
            out = lm_eval.simple_evaluate(model=lm, tasks=list(p.names), num_fewshot=cfg.tasks_fewshot,
                                          limit=cfg.tasks_limit, task_manager=p.manager, log_samples=False)
    except (OSError, ValueError, KeyError) as e:  # datasets (download, offline, parsing), task files; out of
        # memory is no such error (a MemoryError or a RuntimeError): opt_mi.main says what to lower
        where = "cached datasets only (the hub does not answer); " if not p.local and loading.hub_probe() else ""
        raise DataError(f"--tasks {','.join(p.sources)}: the harness could not run them ({where}"
                        f"{loading.first_line(e)})") from None
    return record(out, p, cfg)


def _number(v) -> float | None:
    """A metric as JSON keeps it: a finite float, else None (the harness writes "N/A" for a missing stderr)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _metric(result: dict, metric: str) -> str | None:
    """The harness's key of ``metric`` ("acc,none": metric, filter), the unfiltered one first."""
    keys = [k for k in result if k.split(",")[0] == metric and "," in k]
    return f"{metric},none" if f"{metric},none" in keys else (keys[0] if keys else None)


def task_entry(result: dict, source: str, version, n_shot, samples) -> dict:
    """One task's record: acc and acc_norm with their stderr where present, every other numeric metric as the
    harness keys it ("word_perplexity,none"), the task's version, its examples per prompt, documents evaluated."""
    entry = {"source": source, "version": version, "n_shot": n_shot, "samples": samples}
    named = set()
    for m in METRICS:
        key = _metric(result, m)
        if key is not None:
            err = key.replace(m, f"{m}_stderr", 1)
            entry[m], entry[f"{m}_stderr"] = _number(result[key]), _number(result.get(err))
            named |= {key, err}
    entry["metrics"] = {k: _number(v) for k, v in result.items()
                        if "," in k and k not in named and _number(v) is not None}  # the others (perplexity ...)
    return entry


def record(out: dict, p: TaskPlan, cfg: RunConfig) -> dict:
    """The JSON's ``tasks`` block from ``simple_evaluate``'s output: one entry per task given (a group's is its
    aggregate as the harness reports it), with the settings that make the numbers comparable."""
    results = {}
    for name, source in zip(p.names, p.sources, strict=True):
        r = out.get("results", {}).get(name) or out.get("groups", {}).get(name) or {}
        samples = (out.get("n-samples", {}).get(name) or {}).get("effective")
        results[name] = task_entry(r, source, out.get("versions", {}).get(name), out.get("n-shot", {}).get(name),
                                   samples)
    return {"harness": "lm-eval", "harness_version": p.version, "fewshot": cfg.tasks_fewshot,
            "limit": cfg.tasks_limit, "batch": cfg.tasks_batch, "results": results}


def summary_line(block: dict) -> str:
    """The summary's line: accuracy +- stderr per task (acc_norm too where reported), then the settings."""
    parts = []
    for name, e in block["results"].items():
        acc = f"acc {fmt_fixed(e.get('acc'))} +- {fmt_fixed(e.get('acc_stderr'))}" if "acc" in e else "no acc"
        norm = f", acc_norm {fmt_fixed(e['acc_norm'])}" if "acc_norm" in e else ""
        parts.append(f"{name} {acc}{norm}")
    shots = sorted({str(e.get("n_shot")) for e in block["results"].values()})
    limit = f", first {block['limit']} documents" if block.get("limit") else ""
    return (f"tasks     {' | '.join(parts)} ({'/'.join(shots)}-shot{limit}; lm-eval {block['harness_version']})")
