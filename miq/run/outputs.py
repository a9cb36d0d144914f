"""What a run leaves behind: the result JSON, the analysis figures, and the facts (code
version, library versions, device) that make a result comparable with another.

All or nothing: every output is written to a staging place beside its target (``Staging``) and the targets
are published together, by renames, only when the whole run has succeeded; a failure or an interrupt at any
point leaves no new file or folder behind. ``check_targets`` refuses, before any work, the paths that could
not be published at the end. The saved model (--save) is written by ``saving.py`` into a staged folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import torch

from miq import atomic
from miq.checkpoint import formats
from miq.errors import ConfigError
from miq.model import toy
from miq.run.compress import CompressionResult
from miq.run.config import RunConfig
from miq.staging import Staging

# ----------------------------------------------------------------------------------------------------------
# output paths, checked before any work


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


def check_target(flag: str, path: str, kind: str) -> None:
    """Refuse (ConfigError) a path that the run could not publish at the end. kind: "file" (written whole),
    "folder" (files are put in it) or "replace" (a folder replaced as a whole: the saved model)."""
    target = os.path.abspath(os.path.expanduser(path))
    if os.path.lexists(target):
        if kind == "file" and os.path.isdir(target):
            raise ConfigError(f"{flag} {path}: is a folder; give a file path")
        if kind == "file" and not os.path.isfile(target):
            raise ConfigError(f"{flag} {path}: exists and is not a regular file")
        if kind != "file" and not os.path.isdir(target):
            raise ConfigError(f"{flag} {path}: is a file; give a folder path")
        try:
            listed = os.listdir(target) if kind == "replace" else []
        except OSError as e:
            raise ConfigError(f"{flag} {path}: cannot read the folder ({e.strerror or e})") from None
        if listed and not formats.saved_by_toolkit(target):
            raise ConfigError(f"{flag} {path}: an existing folder this toolkit did not save (no {formats.MARKER}) "
                              "would be replaced; remove it or give a new folder")
        if kind == "file" and not _result_json(target):
            raise ConfigError(f"{flag} {path}: an existing file this toolkit did not write (not a result JSON) "
                              "would be overwritten; give a new path")
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
    toys = [("toy cache", str(toy.cache_root() / spec.version)) for spec in toy.TOYS.values()]
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
    drawn (MI-grouped runs): it defaults to one, and a dense run in a read-only folder must not fail over figures
    it never draws."""
    figures = cfg.analysis_dir if cfg.grouped else ""
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


# ----------------------------------------------------------------------------------------------------------
# the writers


def write_json(path: str, obj) -> None:
    """Strict JSON (no NaN), written atomically."""
    atomic.write_text(path, json.dumps(obj, indent=1, allow_nan=False))


def draw_figures(res: CompressionResult, cfg: RunConfig, total_rows: int, stage: Staging) -> list[str]:
    """mi_matrix.png and grouping_result.png of the plotted layer, staged; their final paths ([] when there is
    nothing to draw)."""
    if not cfg.analysis_dir or res.plot is None:
        return []
    from miq.run import figures  # matplotlib takes a second to import: only runs that draw pay for it

    name, plan = res.plot
    paths = []
    what = "input channels" if plan.axis == "input" else "output channels"
    if plan.nmi is not None:
        title = (f"{name}: NMI of {what}, K={int(plan.group_bits.numel())} {cfg.cluster} groups, "
                 f"{cfg.mi_estimator} estimator, {min(cfg.mi_samples, total_rows)} samples")
        paths.append(os.path.join(cfg.analysis_dir, "mi_matrix.png"))
        figures.plot_nmi_heatmap(plan.nmi, plan.labels, stage.file(paths[-1]), title=title)
    rec = next(r for r in res.layers if r.name == name)
    how = "column groups" if plan.axis == "input" else f"{cfg.strategy} strategy"
    paths.append(os.path.join(cfg.analysis_dir, "grouping_result.png"))
    figures.plot_grouping_result(rec.group_sizes, rec.group_bits, rec.nmi_intra, rec.nmi_inter,
                               stage.file(paths[-1]), title=f"{name}: {how} of {what}, {cfg.bit_alloc} allocation",
                               h_mass=rec.h_mass)
    return paths


def code_version() -> str:
    """Hash of the toolkit's own .py files (the root scripts and the miq package): results from different code
    must not mix silently in a sweep."""
    root = Path(__file__).resolve().parents[2]
    files = sorted(root.glob("*.py")) + sorted((root / "miq").rglob("*.py"))
    h = hashlib.sha1()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def env_info(dev: torch.device) -> dict:
    import transformers

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"torch": torch.__version__, "transformers": transformers.__version__, "device": str(dev),
            "device_name": name, "python": platform.python_version(), "machine": platform.machine(),
            "code_version": code_version()}
