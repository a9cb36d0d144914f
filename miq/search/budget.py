"""A search's budget in stored bits, checked before any work, and the knapsack search under it.

The budget is the one ``--target-bpw`` means for any run: X bits per decoder linear weight, over every
decoder linear (``compress.decoder_linear_weights``), those left uncompressed by the selection charged 16
bits each, the compressed ones what the packed format stores for them (codes + metadata + mask, as the
bits account and ``bpw`` in the results count them). A level's bits follow from its settings and the layer's
shape (``level_bits``), so the feasible range is known from the model's shapes before the database
is built, and the final run's ``bpw`` is the chosen levels' bits exactly.

The knapsack search (``knapsack``): each linear one level, the summed per-linear output losses (the pass's
``layer_error`` on the dense inputs) minimised under the budget, solved exactly by ``miq.plan.knapsack``
(the multiple-choice knapsack of bit allocation, with linears for groups and levels for choices). The losses
of different linears are on their own scales (each an output reconstruction error); summing them is the
per-layer-error baseline the evolutionary search is compared with (EvoPress's "DP over per-layer errors").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from torch import nn

from miq.checkpoint import packed_layer
from miq.errors import ConfigError
from miq.options import Level, fmt_num
from miq.plan import knapsack as solvers
from miq.run import target
from miq.run.config import RunConfig
from miq.run.search_flags import levels as search_levels

DIGITS = 3  # the feasible range is said to this many decimals, rounded inwards


def level_bits(rows: int, cols: int, level: Level, cfg: RunConfig) -> int:
    """The bits a [rows, cols] linear stores at ``level`` (codes + metadata + mask), from the settings and the
    shape alone, by the packed format's rules: SparseGPT keeps a fixed number of weights per column block
    (``target.kept_weights``), every kept weight is a code of the level's width (fp16 for an unquantized
    level), every row has its own grid per column group, act-order without groups stores its order."""
    lcfg = cfg.at(level)
    kept = target.kept_weights(rows, cols, lcfg)
    mask = int(packed_layer.mask_bits(rows, cols, level.nm)) if level.pruning else 0
    if level.wbits == 16:
        return 16 * kept + mask
    groups = -(-cols // level.groupsize) if level.groupsize > 0 else 1
    meta = packed_layer.GridLayout(rows, cols, rows, groups, cfg.sym, perm=cfg.act_order and groups == 1)
    return int(level.wbits) * kept + int(meta.metadata_bits()) + mask


@dataclass(frozen=True)
class Budget:
    """``total`` decoder linear weights, ``uncompressed`` of them at 16 bits, and ``bits`` the compressed
    linears may store in all: floor(X * total - 16 * uncompressed)."""

    total: int
    uncompressed: int
    bits: int

    @classmethod
    def of(cls, bpw: float, total: int, compressed: int) -> Budget:
        return cls(total, total - compressed, math.floor(bpw * total - 16 * (total - compressed)))

    def bpw(self, stored_bits: float) -> float:
        """The run's bpw with the compressed linears storing ``stored_bits``."""
        return (stored_bits + 16.0 * self.uncompressed) / self.total


def shape_bits(cfg: RunConfig, chosen: dict[str, nn.Linear]) -> list[list[int]]:
    """[linear][level] stored bits of the selected linears at every level of the grid, from shapes alone."""
    levels = search_levels(cfg)
    return [[level_bits(m.out_features, m.in_features, lv, cfg) for lv in levels] for m in chosen.values()]


def check(cfg: RunConfig, chosen: dict[str, nn.Linear], total_weights: int) -> None:
    """ConfigError naming the feasible range when --target-bpw is below what the cheapest levels store."""
    if not cfg.search:
        return
    bits = shape_bits(cfg, chosen)
    budget = Budget.of(cfg.target_bpw, total_weights, sum(m.weight.numel() for m in chosen.values()))
    lo, hi = budget.bpw(sum(min(b) for b in bits)), budget.bpw(sum(max(b) for b in bits))
    if budget.bits < sum(min(b) for b in bits):
        scale = 10**DIGITS
        lo_in, hi_in = math.ceil(lo * scale) / scale, math.floor(hi * scale) / scale
        raise ConfigError(f"--target-bpw {fmt_num(cfg.target_bpw)}: with --search's levels this model stores "
                          f"{lo_in:.{DIGITS}f} to {hi_in:.{DIGITS}f} bpw (every linear at its cheapest to its "
                          f"dearest level, with mask and metadata); give at least {lo_in:.{DIGITS}f}")


def knapsack(loss: list[list[float]], bits: list[list[int]], budget_bits: int) -> list[int]:
    """Each linear's level (an index into its row) minimising the summed loss with the summed bits <=
    ``budget_bits``: the multiple-choice knapsack, exact. ValueError when even the cheapest levels exceed it."""
    costs, weights = np.asarray(loss, dtype=np.float64), np.asarray(bits, dtype=np.int64)
    floor = weights.min(1)
    cap = int(budget_bits - floor.sum())
    if cap < 0:
        raise ValueError(f"the cheapest levels store {int(floor.sum())} bits, over the budget of {budget_bits}")
    # the solvers take choices by weight, the lightest first and at zero: each linear's levels sorted so
    order = _order(costs, weights)
    rows = np.arange(len(costs))[:, None]
    c, w = costs[rows, order], weights[rows, order] - floor[:, None]
    cap = min(cap, int(w[:, -1].sum()))  # past every level's dearest the capacity binds nothing
    picks = solvers.core(c, w, cap)
    if picks is None:
        picks = solvers.milp(c, w, cap)
    return [int(order[i, p]) for i, p in enumerate(picks)]


def _order(costs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per row, the levels by weight, then by cost (so equal weights keep the cheaper first)."""
    return np.stack([np.lexsort((c, w)) for c, w in zip(costs, weights, strict=True)])
