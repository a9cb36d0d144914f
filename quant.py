"""Uniform affine quantization of weight rows, with the GPTQ/SparseGPT reference interface.

Beyond the reference, a row may have its own bit-width (``maxq`` is a [rows, 1] tensor) and rows may be
tied into groups that share one scale/zero (strategy A of the MI method). Everything broadcasts per row,
so the SparseGPT column loop quantizes a column ``w [rows]`` with ``quantize(w[:, None], scale, zero, maxq)``
whatever the configuration.

Scales and zero-points are rounded to float16 as soon as they are found: the model is evaluated with
exactly the parameters a saved checkpoint stores (zero-points are integers <= 255, exact in fp16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

FP16_TINY = 2.0**-24  # the smallest positive float16: a scale must stay nonzero once stored


def to_fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest float16 value (kept in x's dtype): what a checkpoint stores."""
    return x.to(torch.float16).to(x.dtype)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor) -> torch.Tensor:
    """Round ``x`` to the grid ``scale * (q - zero)``, ``q`` integer in [0, maxq].

    Shapes broadcast: x [rows, cols], scale / zero / maxq [rows, 1] (or scalars). ``zero`` lies in
    [0, maxq], so an exact 0 maps to exactly 0: pruned weights stay pruned after quantization.
    """
    q = torch.minimum((torch.round(x / scale) + zero).clamp_(min=0), maxq)
    return scale * (q - zero)


def _group_reduce(v: torch.Tensor, labels: torch.Tensor, reduce: str) -> torch.Tensor:
    """Reduce a per-row vector v [rows] within groups and broadcast back to rows."""
    ngroups = int(labels.max()) + 1
    init = torch.zeros(ngroups, dtype=v.dtype, device=v.device)
    red = init.scatter_reduce(0, labels, v, reduce=reduce, include_self=False)
    return red[labels]


class Quantizer(nn.Module):
    """Min-max (optionally MSE-shrunk) affine quantizer for a weight matrix [rows, cols].

    ``configure(bits, ...)`` takes an int (all rows) or a tensor [rows] of per-row bit-widths, and an
    optional ``row_groups`` [rows] of group labels: rows with the same label share one scale/zero
    computed over all their weights (strategy A); without it every row has its own (per-channel,
    the reference's behaviour and strategy B).
    """

    def __init__(self, shape: int = 1):
        super().__init__()
        self.register_buffer("maxq", torch.tensor(0.0))
        self.register_buffer("scale", torch.zeros(shape))
        self.register_buffer("zero", torch.zeros(shape))
        self.row_groups: torch.Tensor | None = None

    def configure(
        self,
        bits: int | torch.Tensor,
        perchannel: bool = False,
        sym: bool = True,
        mse: bool = False,
        norm: float = 2.4,
        grid: int = 100,
        maxshrink: float = 0.8,
        row_groups: torch.Tensor | None = None,
    ) -> None:
        if isinstance(bits, torch.Tensor):
            # per-row widths only make sense row by row
            perchannel = True
            self.maxq = (2.0 ** bits.double() - 1).float().reshape(-1, 1)
        else:
            self.maxq = torch.tensor(float(2**bits - 1))
        if row_groups is not None:
            perchannel = True
            row_groups = row_groups.long()
            if isinstance(bits, torch.Tensor):
                _check_one_width_per_group(bits, row_groups)
        self.perchannel = perchannel
        self.sym = sym
        self.mse = mse
        self.norm = norm
        self.grid = grid
        self.maxshrink = maxshrink
        self.row_groups = row_groups

    def _row_maxq(self, rows: int, dev: torch.device) -> torch.Tensor:
        """maxq as a vector [rows]."""
        m = self.maxq.to(dev)
        return m.flatten() if m.numel() > 1 else m.expand(rows)

    def _params(self, xmin: torch.Tensor, xmax: torch.Tensor, maxq: torch.Tensor):
        if self.sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = torch.where(xmin < 0, -xmax, xmin)
        empty = (xmin == 0) & (xmax == 0)
        xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
        xmax = torch.where(empty, torch.ones_like(xmax), xmax)
        scale = to_fp16((xmax - xmin) / maxq).clamp(min=FP16_TINY)
        if self.sym:
            zero = (maxq + 1) / 2
        else:
            zero = torch.round(-xmin / scale)
        return scale, zero

    def find_params(self, x: torch.Tensor, weight: bool = False) -> None:
        """Set scale / zero from ``x`` [rows, cols] (weights) so that later ``quantize`` calls use them."""
        if not weight:
            # kept in the signature for reference compatibility; this toolkit quantizes weights only
            raise ValueError("find_params takes a weight matrix [rows, cols]: call it with weight=True")
        dev = x.device
        x = x.flatten(1).float()
        rows = x.shape[0]
        maxq = self._row_maxq(rows, dev)
        if not self.perchannel:
            x = x.flatten().unsqueeze(0)
            maxq = maxq[:1]
        zeros = torch.zeros(x.shape[0], device=dev)
        xmin = torch.minimum(x.min(1).values, zeros)
        xmax = torch.maximum(x.max(1).values, zeros)
        groups = self.row_groups.to(dev) if self.row_groups is not None else None
        if groups is not None:
            xmin = _group_reduce(xmin, groups, "amin")
            xmax = _group_reduce(xmax, groups, "amax")
        scale, zero = self._params(xmin, xmax, maxq)

        if self.mse:
            best = torch.full_like(scale, float("inf"))
            for i in range(int(self.maxshrink * self.grid)):
                p = 1 - i / self.grid
                scale1, zero1 = self._params(p * xmin, p * xmax, maxq)
                err = (quantize(x, scale1[:, None], zero1[:, None], maxq[:, None]) - x).abs_().pow_(self.norm)
                err = err.sum(1)
                if groups is not None:
                    # a shared grid is judged on the whole group's error
                    err = _group_reduce(err, groups, "sum")
                better = err < best
                best = torch.where(better, err, best)
                scale = torch.where(better, scale1, scale)
                zero = torch.where(better, zero1, zero)

        if not self.perchannel:
            scale = scale.expand(rows)
            zero = zero.expand(rows)
        self.scale = scale.reshape(-1, 1).contiguous()
        self.zero = zero.reshape(-1, 1).contiguous()
        self.maxq = self._row_maxq(rows, dev).reshape(-1, 1).contiguous()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.ready():
            return quantize(x, self.scale, self.zero, self.maxq)
        return x

    def ready(self) -> bool:
        return bool(torch.all(self.scale != 0))

    def n_param_sets(self) -> int:
        """Distinct (scale, zero) pairs one ``find_params`` call produces: what metadata must store."""
        if not self.perchannel:
            return 1
        if self.row_groups is not None:
            return int(torch.unique(self.row_groups).numel())
        return int(self.scale.shape[0])


def _check_one_width_per_group(bits: torch.Tensor, row_groups: torch.Tensor) -> None:
    """A shared grid has one width: rows of a group with different bits would need different grids."""
    b = bits.reshape(-1).long().to(row_groups.device)
    lo = _group_reduce(b, row_groups, "amin")
    hi = _group_reduce(b, row_groups, "amax")
    if not torch.equal(lo, hi):
        bad = sorted(set(row_groups[lo != hi].tolist()))
        raise ValueError(f"rows of a shared group must have one bit-width; groups {bad[:5]} mix widths")


class GridRecorder:
    """Collects the (scale, zero, maxq) a quantizer holds for each column group (found at its first column, or
    before the pass for static groups): [R, G] each. A group's first record stands: with act-order a static
    group is met again and again with the same parameters; writing them anew was 10-20% of such a pass."""

    def __init__(self, rows: int, ngroups: int, dev: torch.device):
        self.scale = torch.zeros(rows, ngroups, device=dev)
        self.zero = torch.zeros(rows, ngroups, device=dev)
        self.maxq = torch.zeros(rows, ngroups, device=dev)
        self.met: set[int] = set()

    def record(self, g: int, q: Quantizer) -> None:
        if g in self.met:
            return
        self.met.add(g)
        rows = self.scale.shape[0]
        self.scale[:, g] = q.scale.reshape(-1).expand(rows)
        self.zero[:, g] = q.zero.reshape(-1).expand(rows)
        self.maxq[:, g] = q.maxq.reshape(-1).expand(rows)


def static_grid(q: Quantizer, W: torch.Tensor, g_idx: torch.Tensor, group_bits: torch.Tensor | None):
    """(scale, zero, maxq) [R, G] of every column group, found before the pass on the weights W [R, C]
    (dead columns zeroed), as GPTQ's static groups; ``group_bits`` [G] overrides the per-row widths."""
    G = int(g_idx.max()) + 1
    grid = GridRecorder(W.shape[0], G, W.device)
    row_maxq = q.maxq
    for g in range(G):
        if group_bits is not None:
            q.maxq = torch.full((W.shape[0], 1), float(2 ** int(group_bits[g]) - 1), device=W.device)
        else:
            q.maxq = row_maxq
        q.find_params(W[:, g_idx == g], weight=True)
        grid.record(g, q)
    q.maxq = row_maxq  # the quantizer leaves as it came: the pass takes every group's width from the grid
    return grid.scale, grid.zero, grid.maxq


@dataclass(frozen=True)
class Grid:
    """A kind of quantization grid as storage sees it: the float16 parameters kept per (parameter set, column
    group), and the zero-point a grid implies rather than stores. The packed format (``packed_layer``: encode,
    decode and ``GridLayout``'s metadata bits, which the bits account and ``--target-bpw`` charge) and the
    compressed-tensors export read this description instead of each re-deriving it from ``sym``; a new grid
    kind is one entry in ``GRIDS`` plus how ``Quantizer`` finds its parameters."""

    name: str
    stored: tuple[str, ...]  # parameters stored per (set, column group), fp16 each
    symmetric: bool

    def implied_zero(self, bits: torch.Tensor) -> torch.Tensor | None:
        """The zero-point of widths ``bits`` when the grid does not store one: 2^(b-1) = (maxq + 1) / 2, the
        middle of the codes (``Quantizer._params``); None when it is stored."""
        return None if "zero" in self.stored else 2.0 ** (bits - 1).float()

    def parameter_bits(self) -> float:
        return 16.0 * len(self.stored)


GRIDS = {False: Grid("asymmetric", ("scale", "zero"), False), True: Grid("symmetric", ("scale",), True)}  # by sym


@dataclass
class QuantizedLayer:
    """A compressed linear layer as a checkpoint stores it.

    Every kept weight is ``scale[r, g] * (code - zero[r, g])`` with ``g = g_idx[c]`` and an integer code in
    [0, maxq[r, g]]; pruned weights (``mask`` True) are 0. ``weight`` [R, C] float32 holds exactly those
    values (what was evaluated). ``scale``/``zero``/``maxq`` [R, G] (fp16-representable) are None for an
    unquantized layer. ``perm`` [C]: the order columns were processed in (act-order), or None.
    ``row_groups`` [R]: rows sharing one grid (strategy A), or None.
    """

    name: str
    weight: torch.Tensor
    mask: torch.Tensor | None
    scale: torch.Tensor | None
    zero: torch.Tensor | None
    maxq: torch.Tensor | None
    g_idx: torch.Tensor
    sym: bool = False
    perm: torch.Tensor | None = None
    row_groups: torch.Tensor | None = None

    @property
    def grid(self) -> Grid:
        return GRIDS[self.sym]

    def bits(self) -> torch.Tensor | None:
        """[R, G] bit-width of every (row, column group)."""
        return None if self.maxq is None else torch.log2(self.maxq.double() + 1).round().long()


def rtn_grid(w: torch.Tensor, bits: int | torch.Tensor, sym: bool = False, row_groups: torch.Tensor | None = None,
             groupsize: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest quantization of w [rows, cols] with per-row (or per-group) min-max parameters.

    Returns (quantized w [rows, cols] float32, scale, zero, maxq [rows, G]); with ``groupsize`` > 0 the
    parameters are recomputed for every block of that many columns (G blocks), else G = 1.
    """
    q = Quantizer()
    q.configure(bits, perchannel=True, sym=sym, row_groups=row_groups)
    step = groupsize if groupsize > 0 else w.shape[1]
    out = torch.empty_like(w, dtype=torch.float32)
    params = []
    for c in range(0, w.shape[1], step):
        blk = w[:, c : c + step].float()
        q.find_params(blk, weight=True)
        out[:, c : c + step] = q.quantize(blk)
        params.append((q.scale, q.zero, q.maxq))
    scale, zero, maxq = (torch.cat([p[i] for p in params], dim=1) for i in range(3))
    return out, scale, zero, maxq


def rtn(w: torch.Tensor, bits: int | torch.Tensor, sym: bool = False, row_groups: torch.Tensor | None = None,
        groupsize: int = -1) -> torch.Tensor:
    """``rtn_grid``'s quantized weights alone. Used to cost bit-widths for the rtn allocation and by the
    magnitude baseline, not inside SparseGPT (which quantizes with error feedback)."""
    return rtn_grid(w, bits, sym, row_groups, groupsize)[0]
