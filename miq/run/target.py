"""``--target-bpw X``: the total storage a run must meet, turned into the kept weights' mean width before work.

What a compressed layer stores besides its codes is fixed by the flags and the layer's shape: the mask (a
bitmask, or an index per m weights), and the grids' metadata (``packed_layer.GridLayout``: scales and
zero-points, shared-set and column-group indices, the width indices, act-order's order). How many weights
it keeps is fixed too: SparseGPT's adaptive mask prunes exactly int(rows x block columns x sparsity) weights
per column block, and an n:m mask n of every m. So only the codes are left to the allocation, and

    X x (all decoder linear weights) = 16 x (weights left uncompressed) + overhead + B x (kept weights)

gives the budget B of every layer's knapsack, which charges each group's kept weights at its width
(``allocation.allocate``): a run stores at most X. The overhead counted here is an upper bound (width
indices as if widths varied in every layer, g_idx as if column groups were not contiguous runs), so a run
lands a little below X, by what the knapsack leaves unspent and what the bound over-counts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from torch import nn

from miq.checkpoint.packed_layer import GridLayout, mask_bits
from miq.errors import ConfigError
from miq.run.config import RunConfig

TARGET_DIGITS = 3  # the feasible range is said to this many decimals, rounded inwards


@dataclass(frozen=True)
class Storage:
    """A selection's storage apart from its codes: decoder linear weights in all, those left at 16 bits, the
    compressed layers' kept weights, and their mask and metadata bits (an upper bound)."""

    total: int
    uncompressed: int
    kept: int
    overhead: float

    def bpw(self, width: float) -> float:
        """Total bits per weight with every kept weight at ``width`` bits on average."""
        return (16.0 * self.uncompressed + self.overhead + width * self.kept) / self.total

    def width(self, bpw: float) -> float:
        """The kept weights' mean width that stores ``bpw`` in all."""
        return (bpw * self.total - 16.0 * self.uncompressed - self.overhead) / self.kept


def kept_weights(rows: int, cols: int, cfg: RunConfig) -> int:
    """The weights SparseGPT keeps in a [rows, cols] layer under cfg's mask (sparsegpt_mi.obs_pass's rule)."""
    if cfg.prunen:
        return rows * cols // cfg.prunem * (cfg.prunem - cfg.prunen)
    pruned = sum(int(rows * min(cfg.blocksize, cols - i) * cfg.sparsity) for i in range(0, cols, cfg.blocksize))
    return rows * cols - pruned


def grid_bound(rows: int, cols: int, cfg: RunConfig) -> GridLayout:
    """The largest metadata a grouped run can store for a [rows, cols] layer (the widths index always there)."""
    widths = len(cfg.bits_choices)
    if cfg.mi_axis == "input":
        k = min(int(cfg.groups), cols)
        return GridLayout(rows, cols, rows, k, cfg.sym, g_idx=k > 1, width_indices=k, widths=min(widths, k),
                          perm=cfg.act_order and k == 1)
    groups = -(-cols // cfg.groupsize) if cfg.groupsize > 0 else 1
    k = rows if cfg.groups == "all" else min(int(cfg.groups), rows)
    sets = k if cfg.strategy == "shared" else rows
    return GridLayout(rows, cols, sets, groups, cfg.sym, shared_rows=cfg.strategy == "shared",
                      width_indices=sets, widths=min(widths, k), perm=cfg.act_order and groups == 1)


def overhead(rows: int, cols: int, cfg: RunConfig) -> float:
    """A [rows, cols] layer's mask and metadata bits under cfg (metadata: the upper bound ``grid_bound``).
    Under act-order an n:m mask holds n of every m columns in processing order, not in the stored one: a
    bitmask then (unless the order happens to keep the columns' m-blocks, which the bound ignores)."""
    nm = None if cfg.act_order else cfg.nm
    return grid_bound(rows, cols, cfg).metadata_bits() + (mask_bits(rows, cols, nm) if cfg.pruning else 0.0)


def storage(cfg: RunConfig, chosen: dict[str, nn.Linear], total_weights: int) -> Storage:
    """The storage of compressing ``chosen`` (the selected linears) out of ``total_weights`` with cfg."""
    shapes = [tuple(m.weight.shape) for m in chosen.values()]
    return Storage(total_weights, total_weights - sum(r * c for r, c in shapes),
                   sum(kept_weights(r, c, cfg) for r, c in shapes), sum(overhead(r, c, cfg) for r, c in shapes))


class Ledger:
    """Bits a --target-bpw run has left unspent so far, passed on to the layers still to come.

    Every layer is given B x its kept weights for codes and the bound for its overhead; what its knapsack
    leaves unspent and what the bound over-counts go to the next layer's budget (up to the widest width),
    so the run ends short of the target by the last layers' remainder only, instead of every layer's."""

    def __init__(self, cfg: RunConfig):
        self.cfg, self.spare = cfg, 0.0

    def budget(self, rows: int, cols: int) -> float:
        """The mean width the next [rows, cols] layer's kept weights may have."""
        if self.cfg.target_bpw is None:
            return self.cfg.wbits
        width = self.cfg.wbits + self.spare / kept_weights(rows, cols, self.cfg)
        return min(max(width, float(self.cfg.bits_choices[0])), float(self.cfg.bits_choices[-1]))

    def spend(self, rows: int, cols: int, stored_bits: float) -> None:
        """A [rows, cols] layer stored ``stored_bits`` (codes, metadata and mask) in all."""
        given = self.cfg.wbits * kept_weights(rows, cols, self.cfg) + overhead(rows, cols, self.cfg)
        self.spare += given - stored_bits


def resolve(cfg: RunConfig, chosen: dict[str, nn.Linear], total_weights: int) -> RunConfig:
    """cfg with --wbits set to the kept weights' mean width that meets --target-bpw; ConfigError, naming the
    feasible range, when the candidate widths cannot meet it. Unchanged without --target-bpw."""
    if cfg.target_bpw is None or cfg.search:  # a search meets it by its levels (miq/search/budget.py)
        return cfg
    s = storage(cfg, chosen, total_weights)
    low, high = cfg.bits_choices[0], cfg.bits_choices[-1]
    lo, hi = s.bpw(low), s.bpw(high)
    scale = 10**TARGET_DIGITS
    lo_in, hi_in = math.ceil(lo * scale) / scale, math.floor(hi * scale) / scale
    if lo_in > hi_in:  # one width (or a range narrower than the digits said): no target to allocate towards
        bits, stored = (f"{low}", f"{lo:.4f}") if low == high else (f"{low} to {high}", f"{lo:.4f} to {hi:.4f}")
        raise ConfigError(
            f"--target-bpw {cfg.target_bpw:g}: --bits-choices {','.join(map(str, cfg.bits_choices))} leaves every "
            f"kept weight at {bits} bits, which this model with these flags stores at {stored} bpw: nothing to "
            f"allocate; give --wbits {low} instead of --target-bpw")
    width = s.width(cfg.target_bpw)
    slack = 1e-9 * max(1.0, high)  # a target said to TARGET_DIGITS at the range's end lands on it, not a hair past
    if not low - slack <= width <= high + slack:
        nearest = lo_in if width < low else hi_in
        raise ConfigError(
            f"--target-bpw {cfg.target_bpw:g}: this model with these flags stores {lo_in:.{TARGET_DIGITS}f} to "
            f"{hi_in:.{TARGET_DIGITS}f} bpw (kept weights at {low} to {high} bits "
            f"of --bits-choices, with mask and metadata); the nearest feasible target is "
            f"{nearest:.{TARGET_DIGITS}f}")
    width = min(max(width, float(low)), float(high))
    return dataclasses.replace(cfg, wbits=width)
