"""Bit allocation across groups of output channels under a mean-bits budget.

A group of rows gets one bit-width out of ``choices``. Its cost at b bits comes from one of two sources
(``--alloc-cost``):
  obs  SparseGPT's own losses: the sum over the group's rows of the OBS losses sum (w - q)^2 / [H^-1]_ii / 2
       that a pass with every row at b bits incurs (``miq.plan.trials.trial``, masks fixed, error feedback
       included). Once the mask is fixed, rows are independent, so these costs are exactly the loss of the
       layer with the chosen widths: the knapsack below minimises the true objective.
  rtn  a proxy: the Hessian-weighted round-to-nearest error of the group's dense
       rows, sum_r (w_r - q_b(w_r)) H (w_r - q_b(w_r))ᵀ / 2, blind to the mask and to error feedback.
Either is optionally scaled by an MI redundancy factor. The budget is on what is stored: a code for every
kept weight (a pruned one stores none), so a group's size is its kept weights and the mean width over the
layer's kept weights is sum(sizes * bits) / sum(sizes) (dense rows all hold the same count). Picking one
width per group to minimise the total cost is a multiple-choice knapsack, solved exactly (``knapsack``): by
dynamic programming over the integer bit budget where its table is small (dense and n:m layers, whose sizes
share a large common factor), else, since a sparse layer's kept counts make the DP's capacity millions of
bits, by a Lagrangian reduction and an exact search over the few groups it leaves open.

Methods (``--bit-alloc``):
  uniform     every group gets the largest choice <= budget; no costs are computed.
  hessian     exact knapsack on the Hessian-weighted costs.
  hessian-mi  the same with each group's costs times (1 - mean intra-group NMI) ** alpha: redundant
              groups look cheaper to quantize and give bits away. With alpha == 0 it equals hessian.
"""

from __future__ import annotations

import math

import numpy as np
import torch

import quant
from channel_grouping import group_stats
from miq.options import BIT_ALLOC, DEFAULT_MI_ALPHA, STRATEGIES
from miq.plan import knapsack

# above this many cells (K * (capacity + 1) bytes of backtracking table, and ~n numpy operations per cell)
# the DP gives way to knapsack.core
DP_MAX_CELLS = 1 << 24


def _check_choices(choices) -> list[int]:
    """Validate candidate bit-widths: non-empty, strictly increasing ints in [1, 16]."""
    out = [int(b) for b in choices]
    if not out:
        raise ValueError("bit-width choices are empty")
    if any(b != c for b, c in zip(out, choices, strict=True)):
        raise ValueError(f"bit-width choices must be integers, got {list(choices)}")
    if any(b < 1 or b > 16 for b in out):
        raise ValueError(f"bit-width choices must lie in [1, 16], got {out}")
    if any(b >= c for b, c in zip(out, out[1:], strict=False)):
        raise ValueError(f"bit-width choices must be strictly increasing, got {out}")
    if len(out) > 255:  # argmin table is uint8
        raise ValueError("at most 255 bit-width choices")
    return out


def _check_budget(budget: float, choices: list[int]) -> float:
    budget = float(budget)
    if not (choices[0] <= budget <= choices[-1]):
        raise ValueError(
            f"bit budget {budget} is outside the range allowed by the choices: [{choices[0]}, {choices[-1]}]"
        )
    return budget


def _check_labels(labels: torch.Tensor, rows: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(np.asarray(labels))
    if labels.shape != (rows,):
        raise ValueError(f"labels must have shape ({rows},), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if rows and int(labels.min()) < 0:
        raise ValueError("labels must be >= 0")
    return labels.long()


def group_costs(
    W: torch.Tensor,
    H: torch.Tensor,
    labels: torch.Tensor,
    choices,
    strategy: str = "independent",
    sym: bool = False,
    groupsize: int = -1,
) -> torch.Tensor:
    """Hessian-weighted RTN error of every group at every candidate bit-width.

    Args:
        W: [rows, cols] weights (after pruning, if any).
        H: [cols, cols] layer Hessian (symmetric PSD, e.g. 2 XᵀX / n, damped).
        labels: [rows] group labels in [0, K).
        choices: candidate bit-widths.
        strategy: "independent" (each row its own scale/zero) or "shared" (one per group), as quant.rtn.
        sym, groupsize: passed to quant.rtn.

    Returns:
        float64 [K, len(choices)] on W's device: cost[g, j] = sum over rows r in g of
        (w_r - q(w_r)) H (w_r - q(w_r))ᵀ with q at choices[j] bits.
    """
    choices = _check_choices(choices)
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D [rows, cols], got shape {tuple(W.shape)}")
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"H must be [cols, cols] = [{cols}, {cols}], got shape {tuple(H.shape)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    labels = _check_labels(labels, rows).to(W.device)
    k = int(labels.max()) + 1 if rows else 0

    W32, W64 = W.float(), W.double()
    # float64 costs ~50 ms per choice at [3072, 768] on 2 CPU cores, twice float32, and float32's
    # ~1e-6 relative error is avoidable noise between near-equal candidates
    H64 = H.to(device=W.device, dtype=torch.float64)
    row_groups = labels if strategy == "shared" else None
    cost = torch.zeros(k, len(choices), dtype=torch.float64, device=W.device)
    for j, b in enumerate(choices):
        err = W64 - quant.rtn(W32, b, sym=sym, row_groups=row_groups, groupsize=groupsize).double()
        per_row = ((err @ H64) * err).sum(1)
        cost[:, j].index_add_(0, labels, per_row)
    return cost


def column_group_costs(W: torch.Tensor, H: torch.Tensor, labels: torch.Tensor, choices, sym: bool = False
                       ) -> torch.Tensor:
    """The rtn proxy for groups of input columns: [K, len(choices)] float64, cost[g, j] = sum over rows of
    e_g H_gg e_gᵀ, e_g the round-to-nearest error of the group's columns (one min-max grid per row and group)
    at choices[j] bits and H_gg the group's diagonal block of H (the coupling between groups is ignored).

    W [rows, cols], H [cols, cols], labels [cols] in [0, K).
    """
    choices = _check_choices(choices)
    labels = _check_labels(labels, W.shape[1]).to(W.device)
    k = int(labels.max()) + 1
    H64 = H.to(device=W.device, dtype=torch.float64)
    cost = torch.zeros(k, len(choices), dtype=torch.float64, device=W.device)
    for g in range(k):
        cols = labels == g
        Wg, Hg = W[:, cols].float(), H64[cols][:, cols]
        for j, b in enumerate(choices):
            err = Wg.double() - quant.rtn(Wg, b, sym=sym).double()
            cost[g, j] = ((err @ Hg) * err).sum()
    return cost


def obs_group_costs(row_loss: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Group costs [K, n] float64 from losses [n, M] at n candidate widths (``trial``): per row, for groups
    of rows (labels [R]), or per column, for groups of input columns (labels [C])."""
    labels = _check_labels(labels, row_loss.shape[1]).to(row_loss.device)
    k = int(labels.max()) + 1
    cost = torch.zeros(k, row_loss.shape[0], dtype=torch.float64, device=row_loss.device)
    return cost.index_add_(0, labels, row_loss.double().T)


def redundancy_factor(nmi, labels, alpha: float) -> torch.Tensor:
    """Cost multiplier [K] float64: (1 - mean intra-group NMI) ** alpha.

    Singleton groups (no intra-group pair) get 1; alpha == 0 gives ones without touching nmi. The mean
    NMI is clipped to [0, 1] so estimation noise cannot make the factor negative or above one.
    """
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"MI alpha must be a finite number >= 0, got {alpha}")
    lab = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    k = int(lab.max()) + 1
    if alpha == 0:
        return torch.ones(k, dtype=torch.float64)
    intra, _ = group_stats(nmi, lab)
    factor = (1.0 - intra.clamp(0.0, 1.0)) ** alpha
    return torch.where(torch.isnan(intra), torch.ones_like(factor), factor)


def _check_costs_sizes(costs, sizes, n_choices: int) -> tuple[np.ndarray, np.ndarray]:
    """costs [K, n] finite >= 0 as float64 numpy; sizes [K] positive ints as int64 numpy."""
    if isinstance(costs, torch.Tensor):
        costs = costs.detach().cpu().double().numpy()
    costs = np.asarray(costs, dtype=np.float64)
    if isinstance(sizes, torch.Tensor):
        sizes = sizes.detach().cpu().numpy()
    sizes_arr = np.asarray(sizes)
    if costs.ndim != 2 or costs.shape[1] != n_choices or costs.shape[0] == 0:
        raise ValueError(f"costs must be [K >= 1, {n_choices}], got shape {costs.shape}")
    k = costs.shape[0]
    if sizes_arr.shape != (k,):
        raise ValueError(f"sizes must have shape ({k},), got {sizes_arr.shape}")
    if not np.issubdtype(sizes_arr.dtype, np.integer):
        raise ValueError(f"sizes must be integers, got dtype {sizes_arr.dtype}")
    if (sizes_arr < 0).any() or sizes_arr.sum() <= 0:
        raise ValueError("sizes must be >= 0 with a positive total (a group with no kept weight stores no code)")
    n_nan = int(np.isnan(costs).sum())
    if n_nan:
        raise ValueError(f"costs have {n_nan} NaN entries")
    if not np.isfinite(costs).all() or (costs < 0).any():
        raise ValueError("costs must be finite and >= 0")
    sizes_arr = sizes_arr.astype(np.int64)
    return costs, sizes_arr


def allocate_bits(costs, sizes, choices, budget: float) -> torch.Tensor:
    """Exact minimum-cost choice of one bit-width per group under a mean-bits budget.

    Minimises sum_g costs[g, c_g] subject to sum_g sizes[g] * choices[c_g] <= budget * sum_g sizes.

    Every group pays sizes * min(choices) anyway, so the knapsack runs over the extra bits only, with
    weights and capacity divided by their gcd. Where the DP table fits ``DP_MAX_CELLS`` (K * (cap + 1)):
    ``knapsack.dp``, O(K * cap * n) numpy element operations. Larger tables (a sparse layer's kept counts
    have gcd 1, so cap is the budget's extra bits themselves) go to ``knapsack.core``, and to HiGHS's
    branch and bound (``knapsack.milp``) if its search grows too large. Ties: among optimal allocations the
    one with the fewest total bits (bits that buy nothing are not spent; HiGHS: as it breaks them).

    Args:
        costs: [K, n] float >= 0 (torch or numpy).
        sizes: [K] ints >= 0, the weights each group stores a code for (rows, or kept weights).
        choices: n strictly increasing bit-widths in [1, 16].
        budget: mean bits per weight, min(choices) <= budget <= max(choices); fractional allowed.

    Returns:
        LongTensor [K] (CPU) of chosen bit-widths.
    """
    choices = _check_choices(choices)
    budget = _check_budget(budget, choices)
    costs, sizes_arr = _check_costs_sizes(costs, sizes, len(choices))
    k = costs.shape[0]

    extra = np.asarray(choices, dtype=np.int64) - choices[0]
    weights = sizes_arr[:, None] * extra[None, :]  # [K, n], column 0 is 0
    total = int(sizes_arr.sum())
    # the epsilon absorbs float error in budget * total (3.3 * 10 = 32.999...), not a real allowance
    cap = math.floor((budget - choices[0]) * total + 1e-9)
    cap = min(cap, int(weights[:, -1].sum()))  # more capacity than everything-at-max buys nothing
    g = math.gcd(*(int(w) for w in np.unique(weights)))
    if g > 1:
        weights //= g
        cap //= g
    if k * (cap + 1) <= DP_MAX_CELLS:
        picks = knapsack.dp(costs, weights, cap)
    else:
        picks = knapsack.core(costs, weights, cap)
        if picks is None:
            picks = knapsack.milp(costs, weights, cap)
    return torch.as_tensor(np.asarray(choices, dtype=np.int64)[picks])


def allocate(method: str, labels: torch.Tensor, costs: torch.Tensor | None, choices, budget: float,
             nmi=None, alpha: float | None = 0.0, kept: torch.Tensor | None = None) -> torch.Tensor:
    """Bits per group [K] (LongTensor on labels' device) for one layer; per-row bits are bits[labels].

    Args:
        method: one of BIT_ALLOC.
        labels: [C] the group in [0, K) of every channel (row, or input column on the input axis).
        costs: [K, len(choices)] each group's cost at each width (``group_costs`` / 2, ``obs_group_costs``);
            unused (may be None) for "uniform".
        choices, budget: as allocate_bits.
        nmi: [C, C] NMI matrix, needed only by "hessian-mi" with alpha != 0 and some group of two or more
            channels (singletons have factor 1).
        alpha: exponent of the redundancy factor for "hessian-mi"; None means DEFAULT_MI_ALPHA. 0 makes
            hessian-mi identical to hessian.
        kept: [C] ints, the weights of each channel that store a code (the kept ones, from the mask); the
            budget is the mean width over them. None: every channel holds the same count (dense).
    """
    if method not in BIT_ALLOC:
        raise ValueError(f"unknown bit allocation {method!r}; expected one of {BIT_ALLOC}")
    choices = _check_choices(choices)
    budget = _check_budget(budget, choices)
    labels = _check_labels(labels, len(labels))
    count = torch.bincount(labels.cpu())
    if (count == 0).any():
        raise ValueError(f"labels leave {int((count == 0).sum())} of {len(count)} groups empty")
    sizes = count
    if kept is not None:
        if tuple(kept.shape) != tuple(labels.shape) or kept.dtype.is_floating_point or bool((kept < 0).any()):
            raise ValueError(f"kept must be [{len(labels)}] integers >= 0, got {tuple(kept.shape)} {kept.dtype}")
        sizes = torch.zeros(len(count), dtype=torch.long).index_add_(0, labels.cpu(), kept.cpu().long())

    if method == "uniform":
        bits = max(b for b in choices if b <= budget)
        return torch.full((len(count),), bits, dtype=torch.long, device=labels.device)

    if costs is None or tuple(costs.shape) != (len(count), len(choices)):
        got = None if costs is None else tuple(costs.shape)
        raise ValueError(f"{method} allocation needs costs of shape ({len(count)}, {len(choices)}), got {got}")
    costs = costs.cpu().double()
    if method == "hessian-mi":
        alpha = DEFAULT_MI_ALPHA if alpha is None else alpha
        # all-singleton groups (one row each) and alpha == 0 both give factors of one: no NMI needed
        if alpha != 0 and bool((count > 1).any()):
            if nmi is None:
                raise ValueError("hessian-mi with alpha > 0 and multi-row groups needs the NMI matrix")
            costs = costs * redundancy_factor(nmi, labels.cpu(), alpha)[:, None]
    return allocate_bits(costs, sizes, choices, budget).to(labels.device)
