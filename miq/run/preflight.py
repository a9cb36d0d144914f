"""Checks made before any work, against this machine and the model's structure: a mistake that would only
show after minutes of calibration and compression (an absent GPU, n:m that does not divide a layer, a
selection that compresses nothing, a figure of a layer that is not compressed, sizes beyond memory) is one
line (``ConfigError``) within a second of starting.

The model is looked at as ``models.skeleton`` builds it, on the meta device: the same modules, names and
shapes the run will walk, and no weights read.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch
from torch import nn

import mutual_info
from miq.errors import ConfigError
from miq.model import layerwalk, layouts
from miq.options import needs_mi
from miq.run import compress, target
from miq.run.config import RunConfig
from miq.search import budget

# ----------------------------------------------------------------------------------------------------------
# the machine


def device(cfg: RunConfig) -> torch.device:
    """The run's device: --device (syntax checked in config) if this machine has it, else cuda when available."""
    if cfg.device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {cfg.device}: CUDA is not available on this machine; use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"--device {cfg.device}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    return dev


def available_memory(dev: torch.device | None = None) -> int:
    """Bytes that can be allocated now: the GPU's free memory for a CUDA device, else the RAM the kernel
    reports available (MemAvailable: free plus reclaimable caches)."""
    if dev is not None and dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


# ----------------------------------------------------------------------------------------------------------
# the model's structure


def model_selection(cfg: RunConfig, model: nn.Module) -> dict[str, nn.Linear]:
    """The whole model's decoder linears that --minlayer/--maxlayer/--prune_only/--invert select, by state-dict
    path, as the compression walk will find them layer by layer (``compress.selected_linears``)."""
    layout = layouts.of(model)
    out: dict[str, nn.Linear] = {}
    for i, layer in enumerate(layout.decoder_layers(model)):
        out.update(compress.selected_linears(cfg, layout, i, layer))
    return out


def all_linears(model: nn.Module) -> dict[str, nn.Linear]:
    layout = layouts.of(model)
    return {n: m for i, layer in enumerate(layout.decoder_layers(model))
            for n, m in layerwalk.find_linears(layer, layout.layer_prefix(i)).items()}


def _selection_flags(cfg: RunConfig) -> str:
    """The selection flags the user changed, as typed: what the 'selects nothing' line names."""
    default = RunConfig(cfg.model, cfg.dataset)
    parts = [f"--minlayer {cfg.minlayer}" if cfg.minlayer != default.minlayer else "",
             f"--maxlayer {cfg.maxlayer}" if cfg.maxlayer != default.maxlayer else "",
             f"--prune_only {cfg.prune_only!r}" if cfg.prune_only != default.prune_only else "",
             "--invert" if cfg.invert else ""]
    return " ".join(p for p in parts if p) or "the layer selection"


def check_selection(cfg: RunConfig, model: nn.Module, chosen: dict[str, nn.Linear]) -> None:
    """A compressing run must compress something: a selection that matches no linear would label the run
    sparsegpt (or magnitude) while leaving the model dense."""
    if cfg.compressing and not chosen:
        n_layers = len(layerwalk.decoder_layers(model))
        example = next(iter(all_linears(model)))
        raise ConfigError(f"{_selection_flags(cfg)}: selects none of the {len(all_linears(model))} decoder linear "
                          f"layers (decoder layers 0..{n_layers - 1}, names like {example}); nothing would be "
                          "compressed")


def check_nm(cfg: RunConfig, chosen: dict[str, nn.Linear]) -> None:
    """n:m groups M consecutive input columns: every selected layer's width, and the SparseGPT block that
    the groups are cut from, must be whole multiples of M, else the last group is short (wrong sparsity, or
    fewer than N weights to drop)."""
    if not cfg.prunen:
        return
    nm = f"{cfg.prunen}:{cfg.prunem}"
    for name, m in chosen.items():
        if m.in_features % cfg.prunem:
            raise ConfigError(f"--prunen/--prunem {nm}: {name} has {m.in_features} input columns, not a multiple "
                              f"of M={cfg.prunem}")
        if not cfg.gmp and cfg.blocksize < m.in_features and cfg.blocksize % cfg.prunem:
            raise ConfigError(f"--blocksize {cfg.blocksize}: must be a multiple of --prunem {cfg.prunem} for n:m "
                              f"masks (or at least the layer width, {m.in_features})")


def draws_figures(cfg: RunConfig) -> bool:
    """Figures show a layer's MI plan: only MI-grouped runs have one, and only with an --analysis-dir."""
    return cfg.grouped and bool(cfg.analysis_dir)


def resolve_plot_layer(cfg: RunConfig, model: nn.Module, chosen: dict[str, nn.Linear]) -> RunConfig:
    """--plot-layer must name a compressed layer when figures are drawn (a typo would draw nothing, silently);
    named in a run that draws no figures it is a warning. Left to its default (the middle layer's fc1), a
    selection without that layer plots the first selected layer instead of nothing."""
    known = all_linears(model)
    if cfg.plot_layer is not None:
        if cfg.plot_layer not in known:
            raise ConfigError(f"--plot-layer {cfg.plot_layer}: not a decoder linear layer of the model (e.g. "
                              f"{next(iter(known))})")
        if not draws_figures(cfg):
            print(f"warning: --plot-layer {cfg.plot_layer}: this run draws no figures (they need MI grouping, "
                  "--groups with --wbits < 16, and an --analysis-dir)", file=sys.stderr)
        elif cfg.plot_layer not in chosen:
            raise ConfigError(f"--plot-layer {cfg.plot_layer}: not among the layers this run compresses (e.g. "
                              f"{next(iter(chosen))})")
        return cfg
    if draws_figures(cfg) and layouts.of(model).default_plot_layer(model) not in chosen:
        return dataclasses.replace(cfg, plot_layer=next(iter(chosen)))
    return cfg


# ----------------------------------------------------------------------------------------------------------
# memory


def _elem_bytes(cfg: RunConfig, model: nn.Module, dev: torch.device) -> int:
    """Bytes per activation value: the run's dtype (auto: float32 on CPU, the checkpoint's on CUDA)."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype).itemsize
    stored = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if dev.type == "cpu" or stored is None:
        return 4
    return (getattr(torch, stored) if isinstance(stored, str) else stored).itemsize


def check_calibration_memory(cfg: RunConfig, model: nn.Module, dev: torch.device) -> None:
    """The walk holds every calibration window's hidden states twice (a layer's inputs and its outputs) on the
    device: nsamples x seqlen x hidden x bytes x 2. Refused beyond the memory available now, before the
    windows are even drawn (a billion windows would otherwise grow memory for minutes, silently)."""
    hidden = model.config.hidden_size
    elem = _elem_bytes(cfg, model, dev)
    need = 2 * cfg.nsamples * cfg.seqlen * hidden * elem
    have = available_memory(dev)
    if need > have:
        raise ConfigError(f"--nsamples {cfg.nsamples}: the calibration activations need {fmt_bytes(need)} (2 x "
                          f"{cfg.nsamples} windows x {cfg.seqlen} tokens x {hidden} hidden x {elem} bytes), more "
                          f"than the {fmt_bytes(have)} of memory available on {dev}; use fewer windows")


def _mi_bytes(cfg: RunConfig, n: int, c: int, bins: int) -> int:
    """MI of one layer (c channels, n sampled rows) plus the output sampler (a permutation of every row)."""
    mi = mutual_info.pairwise_mi_bytes(n, c, bins, cfg.mi_estimator) if needs_mi(cfg.groups, cfg.cluster,
                                                                                 cfg.bit_alloc) else 0
    return mi + 8 * cfg.nsamples * cfg.seqlen + 4 * n * c


def check_mi_memory(cfg: RunConfig, chosen: dict[str, nn.Linear]) -> None:
    """The widest selected layer's output sample and MI fit in RAM; the line names --mi-bins when the bins
    are what does not fit (the count tables grow with bins^2), else --mi-samples."""
    if not cfg.grouped:
        return
    n = min(cfg.mi_samples, cfg.nsamples * cfg.seqlen)
    c = max(m.out_features if cfg.mi_axis == "output" else m.in_features for m in chosen.values())
    need, have = _mi_bytes(cfg, n, c, cfg.mi_bins), available_memory()
    if need <= have:
        return
    if _mi_bytes(cfg, n, c, min(cfg.mi_bins, 16)) <= have:
        flag, what = f"--mi-bins {cfg.mi_bins}", "use fewer bins"
    else:
        flag, what = f"--mi-samples {cfg.mi_samples}", "use fewer samples"
    raise ConfigError(f"{flag}: MI over {n} samples of {c} channels needs {fmt_bytes(need)}, more than the "
                      f"{fmt_bytes(have)} of memory available; {what}")


def check_model(cfg: RunConfig, model: nn.Module, dev: torch.device) -> RunConfig:
    """Every check against the model's structure (``models.skeleton``); returns cfg with the plotted layer
    resolved. Run right after the config is read: before calibration data and weights are."""
    chosen = model_selection(cfg, model)
    check_selection(cfg, model, chosen)
    check_nm(cfg, chosen)
    cfg = resolve_plot_layer(cfg, model, chosen)
    cfg = target.resolve(cfg, chosen, compress.decoder_linear_weights(model))
    budget.check(cfg, chosen, compress.decoder_linear_weights(model))
    check_calibration_memory(cfg, model, dev)
    check_mi_memory(cfg, chosen)
    return cfg
