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

import dataclasses
import sys
import time
import zlib
from dataclasses import dataclass, field

import torch
from torch import nn

from miq import bitstats
from miq.checkpoint import packed_layer
from miq.model import layerwalk, layouts, onload
from miq.model.layouts import Layout
from miq.options import PassOptions, PlanOptions, Recipe, pick
from miq.plan import trials
from miq.plan.mi_plan import LayerPlan, plan_layer
from miq.run import target
from miq.run.config import RunConfig
from miq.run.records import LayerRecord
from quant import QuantizedLayer, Quantizer, rtn_grid
from sparsegpt_mi import PassResult, SparseGPT, column_groups, layer_error, magnitude_prune

STAGES = ("mi_s", "cluster_s", "alloc_s", "prune_s")  # per-stage seconds, summed over layers


@dataclass
class CompressionResult:
    layers: list[LayerRecord] = field(default_factory=list)  # one per compressed linear, in walk order
    bits: list[bitstats.LayerBits] = field(default_factory=list)
    timing: dict = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    plot: tuple[str, LayerPlan] | None = None  # the layer the figures show, with its plan
    saved: list[QuantizedLayer] = field(default_factory=list)  # every compressed layer as stored (with --save)
    ledger: target.Ledger | None = None  # --target-bpw: the bits the layers so far left unspent


@dataclass(frozen=True)
class RunOptions:
    """The step records of one run's compression, built once from its RunConfig (``of``) and handed down the
    walk: the SparseGPT pass every linear gets, and what a grouped run's plan asks of every layer (None
    ungrouped; under --target-bpw each layer's budget replaces ``wbits``)."""

    passes: PassOptions
    plan: PlanOptions | None

    @classmethod
    def of(cls, cfg: RunConfig) -> RunOptions:
        return cls(pick(PassOptions, cfg), pick(PlanOptions, cfg) if cfg.grouped else None)


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
def compress_sparsegpt(model, calib: torch.Tensor, cfg: RunConfig, dev: torch.device,
                       saved: list | None = None, recipe: Recipe | None = None) -> CompressionResult:
    """SparseGPT (+ joint quantization, + MI plan) over all selected decoder linear layers. calib [n, seqlen].
    ``saved``: where each compressed layer goes with --save (``CompressionResult.saved``; see ``compress``);
    ``recipe``: each linear's level (default the run's own, ``cfg.recipe``; a search gives one per linear)."""
    res = CompressionResult(saved=[] if saved is None else saved)
    recipe = recipe or cfg.recipe
    options: dict = {}  # the step records of each level: one for a uniform run, one per level a search gives
    layout = layouts.of(model)
    _warn_if_k_exceeds_channels(model, cfg)
    plot_layer = cfg.plot_layer or layout.default_plot_layer(model)
    inps, layer_kwargs = layerwalk.capture_inputs(model, calib, dev)

    def visit(i: int, layer: nn.Module, inps: torch.Tensor) -> bool:
        groups = linear_groups(cfg, layout, i, layer)
        for group in groups:
            for name, g in _accumulate(cfg, group, layer, inps, layer_kwargs[i], calib.numel()).items():
                level = recipe.of(name)
                lcfg = cfg.at(level)
                if level not in options:
                    options[level] = RunOptions.of(lcfg)
                plan = compress_linear(name, g, lcfg, options[level], res)
                if plan is not None and name == plot_layer:
                    res.plot = (name, plan)
        return bool(groups)  # a layer the selection leaves alone is read from the checkpoint again

    layerwalk.walk(model, inps, layer_kwargs, dev, visit=visit, desc="compress")
    return res


def _accumulate(cfg: RunConfig, subset: dict[str, nn.Linear], layer: nn.Module, inps: torch.Tensor, kwargs: dict,
                total_rows: int) -> dict[str, SparseGPT]:
    """One forward pass of the layer with hooks: the Hessian (and output sample) of every linear in subset."""
    gpts = {n: SparseGPT(m, n) for n, m in subset.items()}
    if cfg.grouped:
        for n, g in gpts.items():  # a seed per layer name: the same sample whatever else is selected
            g.sample(total_rows, cfg.mi_samples, cfg.seed + zlib.crc32(n.encode()) % 2**31,
                     inputs=cfg.mi_axis == "input")
    # the tensor itself, not .data (a new object per call): linears fed the same one share its x x^T (``last``)
    last: list = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: gpts[n].add_batch(inp[0], out.data, last))
             for n, m in subset.items()]
    try:
        layerwalk.run_layer(layer, inps, kwargs)
    finally:
        for h in hooks:
            h.remove()
    return gpts


def compress_linear(name: str, g: SparseGPT, cfg: RunConfig, opts: RunOptions,
                    res: CompressionResult) -> LayerPlan | None:
    """Plan (if grouped), quantizer, SparseGPT pass for one linear; appends its record and bits to res."""
    plan, budget = None, None
    t = time.time()
    if opts.plan is not None:
        acts = g.sampler.samples() if g.sampler is not None else None
        asked = opts.plan
        if cfg.target_bpw is not None:
            res.ledger = res.ledger or target.Ledger(cfg)
            budget = res.ledger.budget(g.rows, g.columns)
            asked = dataclasses.replace(asked, wbits=budget)
        plan = plan_layer(name, g.layer.weight.data.float(), g.H, acts, asked,
                          trial=_trial_fn(g, cfg, asked, opts.passes))
        for key in ("mi_s", "cluster_s", "alloc_s"):
            res.timing[key] += plan.timing[key]
    t_prune = time.time()
    _final_pass(g, cfg, opts, plan)
    prune_s = time.time() - t_prune
    res.timing["prune_s"] += prune_s
    W0, Hd = g.prepare(opts.passes.percdamp)
    loss = {"incurred": float(layer_error(W0, g.result.W, Hd).sum()), "obs": g.error}
    if plan is not None and plan.predicted_loss is not None:
        loss["predicted"] = plan.predicted_loss
    stored = _stored(name, g.result, g.perm, cfg, plan)
    bits = _bits(cfg, g.result.mask, stored)
    if res.ledger is not None:
        res.ledger.spend(g.rows, g.columns, bits.code_bits + bits.metadata_bits + bits.mask_bits)
    raised = g.percdamp_used if g.percdamp_used not in (None, opts.passes.percdamp) else None
    st = LayerStats(name, g.rows, g.columns, g.result.mask.cpu(), prune_s, loss)
    _record(res, bits, _layer_record(st, bits, plan, time.time() - t, wbits_budget=budget, percdamp_used=raised))
    if cfg.save:
        res.saved.append(stored)
    g.free()
    onload.trim()  # the pass's small temporaries given back before the next linear's
    return plan


def _final_pass(g: SparseGPT, cfg: RunConfig, opts: RunOptions, plan: LayerPlan | None) -> None:
    """The layer's compressed weights: rows at their widths taken from the trial (output axis, rows are
    independent), or one pass (no plan; uniform widths; input-axis column groups, under the trial's mask)."""
    if plan is not None and plan.axis == "output" and plan.trial is not None:
        g.finish(plan.trial.select(plan.row_bits.to(g.dev)))
        return
    q, kw = None, {}
    if plan is not None and plan.axis == "output":
        q = plan.quantizer(sym=cfg.sym)
    elif cfg.quantizing:  # uniform, or the input axis (its group widths replace this width group by group)
        q = Quantizer()
        q.configure(int(cfg.wbits) if plan is None else opts.plan.uniform_bits, perchannel=True, sym=cfg.sym)
        if plan is not None:
            kw = {"g_idx": plan.labels.to(g.dev), "group_bits": plan.group_bits,
                  "mask": None if plan.trial is None else plan.trial.mask}
    g.prune(opts.passes, q, **kw)


def _g_idx(columns: int, cfg: RunConfig, plan: LayerPlan | None) -> torch.Tensor:
    """Every input column's quantization group."""
    if plan is not None and plan.axis == "input":
        return plan.labels.cpu()
    return column_groups(columns, cfg.groupsize)


def _stored(name: str, r: PassResult, perm: torch.Tensor | None, cfg: RunConfig,
            plan: LayerPlan | None) -> QuantizedLayer:
    """A compressed layer as a checkpoint would hold it (CPU copies: the walk moves on to the next layer);
    r: its pass, perm: the order the pass processed columns in."""

    def cpu(t):
        return None if t is None else t.detach().cpu().clone()

    shared = plan is not None and plan.axis == "output" and cfg.strategy == "shared"
    return QuantizedLayer(name, cpu(r.W).float(), cpu(r.mask) if cfg.pruning else None, cpu(r.scale), cpu(r.zero),
                          cpu(r.maxq), _g_idx(r.W.shape[1], cfg, plan), sym=cfg.sym,
                          perm=cpu(perm) if cfg.act_order else None, row_groups=cpu(plan.labels) if shared else None)


def _trial_fn(g: SparseGPT, cfg: RunConfig, asked: PlanOptions, passes: PassOptions):
    """The plan's trial: every candidate width at once, masks of the uniform width (see trials.trial)."""

    def trial(row_groups: torch.Tensor | None, g_idx: torch.Tensor | None):
        return trials.trial(g, list(asked.bits_choices), asked.uniform_bits, passes, sym=cfg.sym,
                            row_groups=row_groups, g_idx=None if g_idx is None else g_idx.to(g.dev))

    return trial


@dataclass(frozen=True)
class LayerStats:
    """What one compressed layer's record counts: its shape, its mask [R, C] (True = pruned), the pass's
    seconds and its losses."""

    name: str
    rows: int
    cols: int
    mask: torch.Tensor
    prune_s: float
    loss: dict | None = None


def _bits(cfg: RunConfig, mask: torch.Tensor, stored: QuantizedLayer) -> bitstats.LayerBits:
    """One layer's bits account: what the packed format stores for it (mask [R, C], True = pruned)."""
    rows, cols = stored.weight.shape
    return bitstats.LayerBits(rows * cols, int((~mask).sum()), *packed_layer.stored_bits(stored, cfg.nm))


def _layer_record(st: LayerStats, bits: bitstats.LayerBits, plan: LayerPlan | None, total_s: float | None = None,
                  **extra) -> LayerRecord:
    """One layer's record: its stats, code bits and, with a plan, its groups (``extra``: the optional fields)."""
    timing = {"mi_s": 0.0, "cluster_s": 0.0, "alloc_s": 0.0, "prune_s": st.prune_s}
    grouping = {}
    if plan is not None:
        timing.update({k: plan.timing[k] for k in ("mi_s", "cluster_s", "alloc_s")})
        k = int(plan.group_bits.numel())
        grouping = {"groups": k, "axis": plan.axis, "labels": plan.labels.tolist(),
                    "group_sizes": torch.bincount(plan.labels, minlength=k).tolist(),
                    "group_bits": plan.group_bits.tolist(), "nmi_intra": plan.nmi_intra, "nmi_inter": plan.nmi_inter,
                    "charged_code_bits": plan.charged_bits, "h_mass": plan.h_mass if plan.axis == "input" else None}
    if total_s is not None:
        timing["total_s"] = total_s
    return LayerRecord(**{"groups": None, **grouping}, name=st.name, channels=st.rows, in_features=st.cols,
                       pruned=int(st.mask.sum()), code_bits=bits.code_bits, timing=timing, loss=st.loss, **extra)


def _record(res: CompressionResult, bits: bitstats.LayerBits, rec: LayerRecord) -> None:
    """Append one layer's bits account and record."""
    res.bits.append(bits)
    res.layers.append(rec)


@torch.no_grad()
def compress_magnitude(model, cfg: RunConfig, saved: list | None = None) -> CompressionResult:
    """The --gmp baseline: magnitude pruning per layer, then round-to-nearest per-channel quantization."""
    res = CompressionResult(saved=[] if saved is None else saved)
    layout = layouts.of(model)
    for i, layer in enumerate(layout.decoder_layers(model)):
        linears = selected_linears(cfg, layout, i, layer)  # by name: the weights may still be on meta
        with onload.layer(model, i, keep=bool(linears)):  # read, compressed and kept, layer by layer
            _magnitude_layer(res, cfg, linears)
    return res


def _magnitude_layer(res: CompressionResult, cfg: RunConfig, linears: dict[str, nn.Linear]) -> None:
    """Magnitude pruning and RTN of one decoder layer's selected linears; records appended to res."""
    for n, m in linears.items():
        t = time.time()
        W = m.weight.data
        mask = magnitude_prune(W.float(), cfg.sparsity, cfg.prunen, cfg.prunem)
        W[mask] = 0
        grid = (None, None, None)
        if cfg.quantizing:
            Q, *grid = rtn_grid(W.float(), int(cfg.wbits), sym=cfg.sym, groupsize=cfg.groupsize)
            W.copy_(Q.to(W.dtype))
        dt = time.time() - t
        res.timing["prune_s"] += dt
        rows, cols = W.shape
        stored = _stored(n, PassResult(W.float(), mask, torch.zeros(0), torch.zeros(0), *grid), None, cfg, None)
        bits = _bits(cfg, mask, stored)
        _record(res, bits, _layer_record(LayerStats(n, rows, cols, mask.cpu(), dt), bits, None))
        if cfg.save:
            res.saved.append(stored)


def compress(model, calib: torch.Tensor, cfg: RunConfig, dev: torch.device,
             saved: list | None = None, recipe: Recipe | None = None) -> CompressionResult:
    """The run's compression path: magnitude (--gmp), SparseGPT, or nothing for a dense run. ``saved``: what
    each compressed layer is appended to with --save (default a list of QuantizedLayer; ``saving.sink`` gives
    one that encodes each layer at once, so that their float32 copies do not pile up)."""
    if not cfg.compressing:
        return CompressionResult()
    if cfg.gmp:
        return compress_magnitude(model, cfg, saved)
    return compress_sparsegpt(model, calib, cfg, dev, saved, recipe)


def decoder_linear_weights(model) -> int:
    """Number of weights in all decoder linear layers: what whole-model bits per weight divide by."""
    layout = layouts.of(model)
    return sum(m.weight.numel() for layer in layout.decoder_layers(model)
               for m in layerwalk.find_linears(layer).values())


def mask_sparsity(res: CompressionResult) -> float:
    """Fraction of the compressed layers' weights that the pruning masks removed."""
    total = sum(r.weights for r in res.layers)
    return sum(r.pruned for r in res.layers) / max(total, 1)


def zero_fraction(model, names: list[str]) -> float:
    """Fraction of exactly-zero weights over the named linear layers after compression: pruned weights and
    weights that quantization rounded onto the grid's zero (reported apart from the mask's sparsity)."""
    mods = dict(model.named_modules())
    zeros = sum(onload.zeros(model, f"{n}.weight") for n in names)  # counted when stored, if read layer by layer
    total = sum(mods[n].weight.numel() for n in names)
    return zeros / max(total, 1)
