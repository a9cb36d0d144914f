"""Per-layer quantization plan of the MI method: which rows share bits (and parameters), at which width.

``plan_layer`` takes what SparseGPT accumulated for one linear layer (weights, Hessian, sampled output
activations) and returns a ``LayerPlan``: channel groups, a bit-width per group, and how the quantizer
must be configured. The same function serves the method and its controls (random / contiguous groups,
``--groups all`` per-channel allocation), so every comparison runs through one code path.

With ``alloc_cost="obs"`` the caller passes ``trial``: a function of the row groups that runs SparseGPT at
every candidate width (``miq.plan.trials.trial``); its per-row losses are the allocation's costs, and the plan keeps the
trial so that the compressed rows are taken from it (what the knapsack minimised is what is incurred).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import channel_grouping
import mutual_info
from miq.errors import PlanError
from miq.options import PlanOptions
from miq.plan import allocation
from miq.plan.trials import TrialResult
from quant import Quantizer

# (row groups for strategy A, column groups g_idx for the input axis) -> every width's pass
Trial = Callable[[torch.Tensor | None, torch.Tensor | None], TrialResult]


@dataclass
class LayerPlan:
    """labels [C] group of each row (axis "output") or input column (axis "input"); group_bits [K];
    nmi [C, C] or None when no MI was needed."""

    labels: torch.Tensor
    group_bits: torch.Tensor
    strategy: str
    axis: str = "output"
    nmi: torch.Tensor | None = None
    nmi_intra: list = field(default_factory=list)
    nmi_inter: list = field(default_factory=list)
    timing: dict = field(default_factory=dict)
    trial: TrialResult | None = None  # every width's pass, when widths were allocated
    predicted_loss: float | None = None  # the allocation's objective at its optimum (1/2 dW H dW^T units)
    h_mass: list = field(default_factory=list)  # input axis: each column group's share of diag H
    charged_bits: int | None = None  # the code bits the allocation charged: kept weights x their widths

    @property
    def row_bits(self) -> torch.Tensor:
        """[R] every row's width (output axis only)."""
        if self.axis != "output":
            raise ValueError("an input-axis plan gives widths to column groups, not rows")
        return self.group_bits[self.labels]

    def quantizer(self, sym: bool = False, mse: bool = False) -> Quantizer:
        q = Quantizer()
        q.configure(self.row_bits, perchannel=True, sym=sym, mse=mse,
                    row_groups=self.labels if self.strategy == "shared" else None)
        return q


def _finite_list(t: torch.Tensor) -> list:
    return [None if math.isnan(v) else round(v, 6) for v in t.tolist()]


def plan_layer(name: str, W: torch.Tensor, H: torch.Tensor, acts: torch.Tensor | None,
               opts: PlanOptions, trial: Trial | None = None) -> LayerPlan:
    """Plan one layer. W [C, in] weights, H [in, in] Hessian, acts [N, C] sampled outputs (None if unused);
    ``trial`` is needed when ``opts.needs_trial()``."""
    output = opts.mi_axis == "output"
    C = W.shape[0] if output else W.shape[1]
    groups = opts.groups if opts.groups == "all" else min(int(opts.groups), C)
    timing = {"mi_s": 0.0, "cluster_s": 0.0, "alloc_s": 0.0}
    nmi = None
    if opts.needs_mi():
        t = time.time()
        mi = opts.mi
        # on the layer's device: the samples wait on the CPU, the counting runs where the layer does (int8
        # cuBLAS on a GPU, ~100x the CPU at 3072 channels)
        res = mutual_info.pairwise_mi(acts, bins=mi.bins, binning=mi.binning, bias=mi.bias,
                                      normalize=mi.normalize, estimator=mi.estimator, device=W.device)
        nmi = res.nmi
        timing["mi_s"] = time.time() - t
        bad = int(torch.isnan(nmi).sum())
        if bad:
            raise PlanError(f"layer {name}: NMI matrix has {bad} NaN entries")

    t = time.time()
    labels = _group(W, H, nmi, groups, opts)
    timing["cluster_s"] = time.time() - t
    h_mass = []
    if not output:  # how much of the layer's input energy each column group carries
        d = torch.diag(H).double().cpu()
        h_mass = _finite_list(torch.zeros(int(labels.max()) + 1, dtype=torch.float64).index_add_(
            0, labels.cpu(), d) / d.sum().clamp(min=1e-300))

    t = time.time()
    costs = None
    if opts.bit_alloc != "uniform" and opts.alloc_cost == "rtn":  # before the trial, which consumes H
        costs = (allocation.group_costs(W, H, labels, opts.bits_choices, strategy=opts.strategy, sym=opts.sym,
                                        groupsize=opts.groupsize) if output
                 else allocation.column_group_costs(W, H, labels, opts.bits_choices, sym=opts.sym)).cpu() / 2
    done = None
    if opts.needs_trial() and trial:
        done = trial(labels if output and opts.strategy == "shared" else None, None if output else labels)
    if done is None and opts.alloc_cost == "obs" and opts.bit_alloc != "uniform":
        raise ValueError("obs costs come from trial passes: plan_layer needs trial=")
    if done is not None and opts.alloc_cost == "obs":
        losses = done.row_loss if output else done.col_loss
        costs = allocation.obs_group_costs(losses, labels.to(losses.device)).cpu()
    # the budget is on stored codes: each row's (or, on the input axis, column's) kept weights under the
    # trial's mask, which the compressed layer keeps; without a trial every weight counts
    kept = None if done is None else (~done.mask).sum(1 if output else 0).cpu()
    group_bits = allocation.allocate(opts.bit_alloc, labels, costs, opts.bits_choices, opts.wbits, nmi=nmi,
                                     alpha=opts.mi_alpha, kept=kept)
    timing["alloc_s"] = time.time() - t

    intra, inter = ([], [])
    if nmi is not None:
        a, b = channel_grouping.group_stats(nmi, labels)
        intra, inter = _finite_list(a), _finite_list(b)
    plan = LayerPlan(labels=labels.long(), group_bits=group_bits.long(), strategy=opts.strategy, axis=opts.mi_axis,
                     nmi=nmi, nmi_intra=intra, nmi_inter=inter, timing=timing, trial=done, h_mass=h_mass)
    if kept is not None:
        plan.charged_bits = int((kept.long() * plan.group_bits.cpu()[plan.labels.cpu()]).sum())
    if costs is not None:  # what the allocation counted on (before any MI factor), to set beside what happened
        pick = torch.tensor([opts.bits_choices.index(int(b)) for b in plan.group_bits.tolist()])
        plan.predicted_loss = float(costs[torch.arange(len(pick)), pick].sum())
    return plan


def _group(W: torch.Tensor, H: torch.Tensor, nmi: torch.Tensor | None, groups: int | str,
           opts: PlanOptions) -> torch.Tensor:
    """Labels [C] of the rows (or input columns) in K groups by the method opts.cluster names."""
    C = W.shape[0] if opts.mi_axis == "output" else W.shape[1]
    if groups == "all":
        return torch.arange(C)
    if opts.cluster == "range":
        feats = (channel_grouping.row_range_features(W) if opts.mi_axis == "output"
                 else channel_grouping.column_range_features(W, H))
        return channel_grouping.range_groups(feats, groups, seed=opts.seed)
    if nmi is None:  # contiguous groups need no MI
        return torch.from_numpy(channel_grouping.contiguous_labels(C, int(groups)))
    return channel_grouping.group_channels(nmi, groups, method=opts.cluster, seed=opts.seed)
