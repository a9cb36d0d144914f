"""Compress a model's decoder linear layers: SparseGPT (+ joint quantization, + a per-layer MI plan), or the
magnitude baseline; one record and one bits account per compressed layer.

The walk follows IST-DASLab/sparsegpt's ``opt_sequential``: layer 0's inputs are captured on the calibration
windows, then for each decoder layer the selected linears accumulate their Hessians (and, for a plan, a
sample of their outputs) in one forward pass, are compressed one by one, and the compressed layer's outputs
feed the next layer. With --true-sequential (IST-DASLab/gptq's ``llama.py``) a layer's linears go in the
family's sub-groups instead, one forward pass per sub-group, so later sub-groups see the earlier ones
compressed. Every family in ``layouts.py`` takes the same path; only the names differ.
"""

from __future__ import annotations

import math
import sys
import time
import zlib
from dataclasses import dataclass, field

import torch
from torch import nn

import bitstats
import layerwalk
import layouts
from config import RunConfig
from layouts import Layout
from mi_plan import LayerPlan, PlanOptions, plan_layer
from quant import Quantizer, rtn
from sparsegpt_mi import SparseGPT, magnitude_prune

STAGES = ("mi_s", "cluster_s", "alloc_s", "prune_s")  # per-stage seconds, summed over layers


@dataclass
class CompressionResult:
    layers: list[dict] = field(default_factory=list)  # one record per compressed linear, in walk order
    bits: list[bitstats.LayerBits] = field(default_factory=list)
    timing: dict = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    plot: tuple[str, LayerPlan] | None = None  # the layer the figures show, with its plan


def selected(cfg: RunConfig, index: int, name: str) -> bool:
    """The reference's --minlayer/--maxlayer/--prune_only/--invert rule."""
    return (cfg.minlayer <= index < cfg.maxlayer and cfg.prune_only in name) != cfg.invert


def selected_linears(cfg: RunConfig, layout: Layout, index: int, layer: nn.Module) -> dict[str, nn.Linear]:
    """The linears of decoder layer ``index`` to compress, keyed by state-dict name, in the module's order."""
    linears = layerwalk.find_linears(layer, layout.layer_prefix(index))
    return {n: m for n, m in linears.items() if selected(cfg, index, n)}


def linear_groups(cfg: RunConfig, layout: Layout, index: int, layer: nn.Module) -> list[dict[str, nn.Linear]]:
    """The selected linears of a layer in the groups that are compressed one after another.

    By default one group: every linear accumulates its Hessian from the uncompressed layer's activations, as
    in IST-DASLab/sparsegpt. With --true-sequential the family's sub-groups (attention q/k/v, the output
    projection, the MLP's input projection(s), its output projection), each accumulated after the groups
    before it are compressed (IST-DASLab/gptq's llama.py).
    """
    chosen = selected_linears(cfg, layout, index, layer)
    if not cfg.true_sequential:
        return [chosen] if chosen else []
    prefix = layout.layer_prefix(index)
    unknown = set(chosen) - {prefix + n for n in layout.linear_names}
    if unknown:  # a layer the layout does not describe: compressing it out of order would go unnoticed
        raise RuntimeError(f"--true-sequential: {sorted(unknown)} are in no sub-group of the {layout.family} layout")
    groups = [{prefix + n: chosen[prefix + n] for n in names if prefix + n in chosen} for names in layout.sequential]
    return [g for g in groups if g]


def plan_options(cfg: RunConfig) -> PlanOptions:
    return PlanOptions(groups=cfg.groups, cluster=cfg.cluster, strategy=cfg.strategy, bit_alloc=cfg.bit_alloc,
                       wbits=cfg.wbits, choices=cfg.bits_choices, mi=cfg.mi, alpha=cfg.mi_alpha, seed=cfg.seed,
                       sym=cfg.sym, groupsize=cfg.groupsize)


def _warn_if_k_exceeds_channels(model, cfg: RunConfig) -> None:
    if not cfg.grouped or cfg.groups == "all":
        return
    layout = layouts.of(model)
    narrow = sorted({m.out_features for i, layer in enumerate(layout.decoder_layers(model))
                     for m in selected_linears(cfg, layout, i, layer).values() if m.out_features < cfg.groups})
    if narrow:
        print(f"warning: --groups {cfg.groups} exceeds the {narrow[0]} channels of some layers; "
              f"using K = channels where a layer has fewer", file=sys.stderr)


@torch.no_grad()
def compress_sparsegpt(model, calib: torch.Tensor, cfg: RunConfig, dev: torch.device) -> CompressionResult:
    """SparseGPT (+ joint quantization, + MI plan) over all selected decoder linear layers. calib [n, seqlen]."""
    res = CompressionResult()
    layout = layouts.of(model)
    _warn_if_k_exceeds_channels(model, cfg)
    plot_layer = cfg.plot_layer or layout.default_plot_layer(model)
    inps, layer_kwargs = layerwalk.capture_inputs(model, calib, dev)

    def visit(i: int, layer: nn.Module, inps: torch.Tensor) -> None:
        for group in linear_groups(cfg, layout, i, layer):
            for name, g in _accumulate(cfg, group, layer, inps, layer_kwargs[i], calib.numel()).items():
                plan = compress_linear(name, g, cfg, res)
                if plan is not None and name == plot_layer:
                    res.plot = (name, plan)

    layerwalk.walk(model, inps, layer_kwargs, dev, visit=visit, desc="compress")
    return res


def _accumulate(cfg: RunConfig, subset: dict[str, nn.Linear], layer: nn.Module, inps: torch.Tensor, kwargs: dict,
                total_rows: int) -> dict[str, SparseGPT]:
    """One forward pass of the layer with hooks: the Hessian (and output sample) of every linear in subset."""
    gpts = {n: SparseGPT(m, n) for n, m in subset.items()}
    if cfg.grouped:
        for n, g in gpts.items():  # a seed per layer name: the same sample whatever else is selected
            g.sample_outputs(total_rows, cfg.mi_samples, cfg.seed + zlib.crc32(n.encode()) % 2**31)
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: gpts[n].add_batch(inp[0].data, out.data))
             for n, m in subset.items()]
    try:
        layerwalk.run_layer(layer, inps, kwargs)
    finally:
        for h in hooks:
            h.remove()
    return gpts


def compress_linear(name: str, g: SparseGPT, cfg: RunConfig, res: CompressionResult) -> LayerPlan | None:
    """Plan (if grouped), quantizer, SparseGPT pass for one linear; appends its record and bits to res."""
    plan = None
    if cfg.grouped:
        acts = g.sampler.samples() if g.sampler is not None else None
        plan = plan_layer(name, g.layer.weight.data.float(), g.H, acts, plan_options(cfg))
        g.quantizer = plan.quantizer(sym=cfg.sym)
        for key in ("mi_s", "cluster_s", "alloc_s"):
            res.timing[key] += plan.timing[key]
    elif cfg.quantizing:
        g.quantizer = Quantizer()
        g.quantizer.configure(int(cfg.wbits), perchannel=True, sym=cfg.sym)
    t = time.time()
    g.fasterprune(cfg.sparsity, prunen=cfg.prunen, prunem=cfg.prunem, blocksize=cfg.blocksize,
                  percdamp=cfg.percdamp, groupsize=cfg.groupsize)
    prune_s = time.time() - t
    res.timing["prune_s"] += prune_s
    n_sets = g.n_param_sets if cfg.quantizing else 0  # counted by the quantizer as SparseGPT used it
    _record(res, cfg, name, g.rows, g.columns, n_sets, plan, prune_s)
    if g.percdamp_used is not None and g.percdamp_used != cfg.percdamp:
        res.layers[-1]["percdamp_used"] = g.percdamp_used
    g.free()
    return plan


def _record(res: CompressionResult, cfg: RunConfig, name: str, rows: int, cols: int, n_sets: int,
            plan: LayerPlan | None, prune_s: float) -> None:
    """Append one layer's bits account and JSON record (schema in the README)."""
    if plan is not None:
        row_bits, ngroups = plan.row_bits.tolist(), int(plan.group_bits.numel())
    else:
        row_bits, ngroups = ([int(cfg.wbits)] * rows if cfg.quantizing else None), None
    res.bits.append(bitstats.layer_bits(rows, cols, row_bits, n_sets, ngroups, len(cfg.bits_choices), cfg.mask))
    rec = {"name": name, "channels": rows, "in_features": cols, "groups": ngroups,
           "timing": {"mi_s": 0.0, "cluster_s": 0.0, "alloc_s": 0.0, "prune_s": prune_s}}
    if plan is not None:
        sizes = torch.bincount(plan.labels, minlength=ngroups).tolist()
        rec.update({"labels": plan.labels.tolist(), "group_sizes": sizes, "group_bits": plan.group_bits.tolist(),
                    "nmi_intra": plan.nmi_intra, "nmi_inter": plan.nmi_inter})
        rec["timing"].update({k: plan.timing[k] for k in ("mi_s", "cluster_s", "alloc_s")})
    res.layers.append(rec)


@torch.no_grad()
def compress_magnitude(model, cfg: RunConfig) -> CompressionResult:
    """The --gmp baseline: magnitude pruning per layer, then round-to-nearest per-channel quantization."""
    res = CompressionResult()
    layout = layouts.of(model)
    for i, layer in enumerate(layout.decoder_layers(model)):
        for n, m in selected_linears(cfg, layout, i, layer).items():
            t = time.time()
            W = m.weight.data
            W[magnitude_prune(W.float(), cfg.sparsity, cfg.prunen, cfg.prunem)] = 0
            if cfg.quantizing:
                W.copy_(rtn(W.float(), int(cfg.wbits), sym=cfg.sym, groupsize=cfg.groupsize).to(W.dtype))
            dt = time.time() - t
            res.timing["prune_s"] += dt
            rows, cols = W.shape
            # round-to-nearest per row, once per --groupsize block
            n_sets = rows * (math.ceil(cols / cfg.groupsize) if cfg.groupsize > 0 else 1) if cfg.quantizing else 0
            _record(res, cfg, n, rows, cols, n_sets, None, dt)
    return res


def compress(model, calib: torch.Tensor, cfg: RunConfig, dev: torch.device) -> CompressionResult:
    """The run's compression path: magnitude (--gmp), SparseGPT, or nothing for a dense run."""
    if not cfg.compressing:
        return CompressionResult()
    if cfg.gmp:
        return compress_magnitude(model, cfg)
    return compress_sparsegpt(model, calib, cfg, dev)


def measured_sparsity(model, names: list[str]) -> float:
    """Fraction of exactly-zero weights over the named linear layers (all decoder linears if none named)."""
    mods = dict(model.named_modules())
    if not names:
        layout = layouts.of(model)
        names = [n for i, layer in enumerate(layout.decoder_layers(model))
                 for n in layerwalk.find_linears(layer, layout.layer_prefix(i))]
    zeros = sum(int((mods[n].weight.data == 0).sum()) for n in names)
    total = sum(mods[n].weight.numel() for n in names)
    return zeros / max(total, 1)
