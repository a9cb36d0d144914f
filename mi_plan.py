"""Per-layer quantization plan of the MI method: which rows share bits (and parameters), at which width.

``plan_layer`` takes what SparseGPT accumulated for one linear layer (weights, Hessian, sampled output
activations) and returns a ``LayerPlan``: channel groups, a bit-width per group, and how the quantizer
must be configured. The same function serves the method and its controls (random / contiguous groups,
``--groups all`` per-channel allocation), so every comparison runs through one code path.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

import allocation
import channel_grouping
import mutual_info
from quant import Quantizer


@dataclass
class MIOptions:
    bins: int = 16
    binning: str = "quantile"
    bias: str = "miller-madow"
    normalize: str = "arithmetic"
    estimator: str = "histogram"


@dataclass
class LayerPlan:
    """labels [C] group of each row; group_bits [K]; nmi [C, C] or None when no MI was needed."""

    labels: torch.Tensor
    group_bits: torch.Tensor
    strategy: str
    nmi: torch.Tensor | None = None
    nmi_intra: list = field(default_factory=list)
    nmi_inter: list = field(default_factory=list)
    timing: dict = field(default_factory=dict)

    @property
    def row_bits(self) -> torch.Tensor:
        return self.group_bits[self.labels]

    def quantizer(self, sym: bool = False, mse: bool = False) -> Quantizer:
        q = Quantizer()
        q.configure(self.row_bits, perchannel=True, sym=sym, mse=mse,
                    row_groups=self.labels if self.strategy == "shared" else None)
        return q


class PlanError(ValueError):
    """A user-facing problem with one layer's plan (names the layer)."""


def _finite_list(t: torch.Tensor) -> list:
    return [None if math.isnan(v) else round(v, 6) for v in t.tolist()]


def plan_layer(
    name: str,
    W: torch.Tensor,
    H: torch.Tensor,
    acts: torch.Tensor | None,
    *,
    groups: int | str,
    cluster: str,
    strategy: str,
    bit_alloc: str,
    wbits: float,
    choices: list[int],
    mi: MIOptions,
    alpha: float,
    seed: int,
    sym: bool = False,
    groupsize: int = -1,
) -> LayerPlan:
    """Plan one layer. W [C, in] weights, H [in, in] Hessian, acts [N, C] sampled outputs (None if unused).

    groups: K >= 1 or "all" (every row alone). K above C is clipped to C by the caller.
    """
    C = W.shape[0]
    timing = {"mi_s": 0.0, "cluster_s": 0.0, "alloc_s": 0.0}
    need_mi = groups != "all" and (cluster in ("spectral", "hierarchical", "random") or bit_alloc == "hessian-mi")
    nmi = None
    if need_mi:
        t = time.time()
        res = mutual_info.pairwise_mi(acts, bins=mi.bins, binning=mi.binning, bias=mi.bias,
                                      normalize=mi.normalize, estimator=mi.estimator)
        nmi = res.nmi
        timing["mi_s"] = time.time() - t
        bad = int(torch.isnan(nmi).sum())
        if bad:
            raise PlanError(f"layer {name}: NMI matrix has {bad} NaN entries")

    t = time.time()
    if groups == "all":
        labels = torch.arange(C)
    elif nmi is None:  # contiguous groups need no MI
        labels = torch.from_numpy(channel_grouping.contiguous_labels(C, int(groups)))
    else:
        labels = channel_grouping.group_channels(nmi, int(groups), method=cluster, seed=seed)
    timing["cluster_s"] = time.time() - t

    t = time.time()
    group_bits = allocation.allocate(bit_alloc, W, H, labels, nmi, choices, wbits, strategy=strategy,
                                     alpha=alpha, sym=sym, groupsize=groupsize)
    timing["alloc_s"] = time.time() - t

    intra, inter = ([], [])
    if nmi is not None:
        a, b = channel_grouping.group_stats(nmi, labels)
        intra, inter = _finite_list(a), _finite_list(b)
    return LayerPlan(labels=labels.long(), group_bits=group_bits.long(), strategy=strategy, nmi=nmi,
                     nmi_intra=intra, nmi_inter=inter, timing=timing)
