"""Trial passes: a layer compressed at every candidate bit-width in one pass, for the allocation's costs.

The layer's weights are stacked once per candidate width and go through one ``obs_pass``: the Cholesky factor,
the Python column loop and the masks are shared, the arithmetic grows with the candidates. Masks are chosen
on the reference width's rows and applied to all, so with the mask fixed, rows are independent: a layer
compressed with any per-row choice of widths is exactly the chosen candidates' rows (``TrialResult.select``)
and its loss their losses' sum. Columns are not independent (the OBS update couples them), so per-column
losses only estimate what a column group at a width would cost (input-axis allocation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miq.options import PassOptions
from quant import Quantizer
from sparsegpt_mi import PassResult, SparseGPT


@dataclass
class TrialResult:
    """``trial``'s candidates at ``bits`` [S]: W [S, R, C], row_loss [S, R], col_loss [S, C] and grids
    [S, R, G]; one mask [R, C] for all."""

    bits: list[int]
    W: torch.Tensor
    row_loss: torch.Tensor
    col_loss: torch.Tensor
    mask: torch.Tensor
    scale: torch.Tensor | None
    zero: torch.Tensor | None
    maxq: torch.Tensor | None
    param_sets_per_row_group: int  # parameter sets each candidate stores

    def select(self, row_bits: torch.Tensor) -> PassResult:
        """Row r taken from the candidate at row_bits[r]: the result of a pass with those per-row widths."""
        pick = torch.tensor([self.bits.index(int(b)) for b in row_bits.tolist()], device=self.W.device)
        rows = torch.arange(self.W.shape[1], device=self.W.device)
        grid = [None if t is None else t[pick, rows] for t in (self.scale, self.zero, self.maxq)]
        return PassResult(self.W[pick, rows], self.mask, self.row_loss[pick, rows],
                          torch.full((1, self.W.shape[2]), float("nan")), *grid,
                          n_param_sets=self.param_sets_per_row_group)


def trial(gpt: SparseGPT, bits: list[int], ref_bits: int, opts: PassOptions, *, sym: bool = False,
          row_groups: torch.Tensor | None = None, g_idx: torch.Tensor | None = None) -> TrialResult:
    """Every row at every width of ``bits`` in one pass over the layer stacked len(bits) times.

    The masks are those of the ``ref_bits`` candidate (chosen on its rows, applied to all), so rows
    are independent: the pass with any per-row choice of widths gives exactly the chosen candidates'
    rows (``TrialResult.select``). ``row_groups`` [R]: rows sharing one grid (strategy A). Per-column
    losses (``col_loss``) cost column groups (input axis), where columns are not independent.
    """
    order = [ref_bits] + [b for b in bits if b != ref_bits]  # masks come from the first block of rows
    S, R = len(order), gpt.rows
    q = Quantizer()
    stacked_groups = None
    if row_groups is not None:
        k = int(row_groups.max()) + 1
        stacked_groups = torch.cat([row_groups.to(gpt.dev) + j * k for j in range(S)])
    q.configure(torch.cat([torch.full((R,), b, device=gpt.dev) for b in order]), perchannel=True, sym=sym,
                row_groups=stacked_groups)
    res = gpt.run_pass(q, opts, g_idx=g_idx, reps=S)
    back = [order.index(b) for b in bits]  # candidates in the order of ``bits``

    def per_candidate(t):
        return None if t is None else t.reshape(S, -1, *t.shape[1:])[back]

    return TrialResult(list(bits), per_candidate(res.W), per_candidate(res.row_loss), res.col_loss[back],
                       res.mask[:R], per_candidate(res.scale), per_candidate(res.zero), per_candidate(res.maxq),
                       res.n_param_sets // S)
