"""What a run leaves behind: the result JSON, the analysis figures, and the facts (code
version, library versions, device) that make a result comparable with another.

All or nothing: every output is written to a staging place beside its target (``Staging``) and the targets
are published together, by renames, only when the whole run has succeeded; a failure or an interrupt at any
point leaves no new file or folder behind. ``destinations.check_targets`` refuses, before any work, the paths
that could not be published at the end. The saved model (--save) is written by ``saving.py`` into a staged
folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import torch

from miq import atomic
from miq.run import figures
from miq.run.compress import CompressionResult
from miq.run.config import RunConfig
from miq.staging import Staging


def write_json(path: str, obj) -> None:
    """Strict JSON (no NaN), written atomically."""
    atomic.write_text(path, json.dumps(obj, indent=1, allow_nan=False))


def draw_figures(res: CompressionResult, cfg: RunConfig, total_rows: int, stage: Staging) -> list[str]:
    """mi_matrix.png and grouping_result.png of the plotted layer, staged; their final paths ([] when there is
    nothing to draw)."""
    searched = [r for r in res.layers if r.level is not None]  # --search: each record's level
    if not cfg.analysis_dir or (res.plot is None and not searched):
        return []
    paths = []
    if searched:
        paths.append(os.path.join(cfg.analysis_dir, "search_levels.png"))
        figures.plot_search_levels([r.name for r in searched], [r.level for r in searched],
                                   stage.file(paths[-1]), title=f"--search {cfg.search} at --target-bpw "
                                   f"{cfg.target_bpw:g}: each linear's sparsity and width")
    if res.plot is None:
        return paths
    name, plan = res.plot
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
    """The facts that make two results comparable; ``threads`` (torch's intra-op threads) among them: the same
    run at 1 and at 2 threads differs in the last digits of its reductions, up to 0.5% in perplexity."""
    import transformers

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"torch": torch.__version__, "transformers": transformers.__version__, "device": str(dev),
            "device_name": name, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "machine": platform.machine(), "code_version": code_version()}
