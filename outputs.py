"""What a run leaves behind: the result JSON, the analysis figures, and the facts (code version, library
versions, device) that make a result comparable with another. The saved model (--save) is ``saving.py``'s."""

from __future__ import annotations

import hashlib
import json
import os
import platform

import torch

import atomic
from compress import CompressionResult
from config import RunConfig


def write_json(path: str, obj) -> None:
    """Strict JSON (no NaN), written atomically."""
    atomic.write_text(path, json.dumps(obj, indent=1, allow_nan=False))


def draw_figures(res: CompressionResult, cfg: RunConfig, total_rows: int) -> list[str]:
    """mi_matrix.png and grouping_result.png of the plotted layer; [] when there is nothing to draw."""
    if not cfg.analysis_dir or res.plot is None:
        return []
    import plots

    name, plan = res.plot
    os.makedirs(cfg.analysis_dir, exist_ok=True)
    paths = []
    if plan.nmi is not None:
        title = (f"{name}: NMI, K={int(plan.group_bits.numel())} {cfg.cluster} groups, "
                 f"{cfg.mi_estimator} estimator, {min(cfg.mi_samples, total_rows)} samples")
        paths.append(plots.plot_nmi_heatmap(plan.nmi, plan.labels, os.path.join(cfg.analysis_dir, "mi_matrix.png"),
                                            title=title))
    rec = next(r for r in res.layers if r["name"] == name)
    paths.append(plots.plot_grouping_result(rec["group_sizes"], rec["group_bits"], rec["nmi_intra"], rec["nmi_inter"],
                                            os.path.join(cfg.analysis_dir, "grouping_result.png"),
                                            title=f"{name}: {cfg.strategy} strategy, {cfg.bit_alloc} allocation"))
    return paths


def code_version() -> str:
    """Hash of the toolkit's own .py files: results from different code must not mix silently in a sweep."""
    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha1()
    for f in sorted(os.listdir(here)):
        if f.endswith(".py"):
            with open(os.path.join(here, f), "rb") as fh:
                h.update(f.encode() + b"\0" + fh.read())
    return h.hexdigest()[:12]


def env_info(dev: torch.device) -> dict:
    import transformers

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"torch": torch.__version__, "transformers": transformers.__version__, "device": str(dev),
            "device_name": name, "python": platform.python_version(), "machine": platform.machine(),
            "code_version": code_version()}
