"""SparseGPT (Frantar & Alistarh, 2023) with joint quantization, for one linear layer.

Same interface and mathematics as IST-DASLab/sparsegpt: accumulate H = (2/n) sum x x^T over calibration
sequences, then prune column by column with OBS updates driven by the upper Cholesky factor of H^-1,
choosing an adaptive mask per block of columns. Quantization (``self.quantizer``) happens inside the column
loop so that its error is propagated too. The loop is ``obs_pass``: the reference's ``fasterprune`` loop, its
OBS update step for step, on transposed blocks and with stacked candidates and column-group refits (its
docstring says where it departs). Additions:
GPTQ-style ``groupsize``; the grid used (scale, zero, maxq per row and column group) and the mask, returned;
per-row and per-column OBS losses, and the layer error 1/2 (W0 - W) H (W0 - W)^T they add up to;
``run_pass(reps=S)``: the layer stacked S times, masks chosen on the first copy's rows (``miq.plan.trials``);
a seeded sample of the layer's output rows for the MI method, damping retries, finite-input checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from miq.errors import LayerInputError
from miq.finite import nonfinite
from miq.options import PassOptions
from miq.sampling import RowSampler
from quant import GridRecorder, Quantizer, quantize, static_grid


@dataclass
class PassResult:
    """What one OBS pass produced for W [R, C] with G column groups (G = 1 without groups).

    W: final (pruned, quantized) weights. mask: [R, C] True where pruned. row_loss [R] / col_loss [S, C]:
    sum of (w - q)^2 / [H^-1]_ii / 2 over a row / over the rows of each of S stacked candidates per column.
    scale, zero, maxq: [R, G] the grid each row used in each column group (None when not quantizing).
    n_param_sets: distinct (scale, zero) sets stored. Columns are in the layer's own order.
    """

    W: torch.Tensor
    mask: torch.Tensor
    row_loss: torch.Tensor
    col_loss: torch.Tensor
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    maxq: torch.Tensor | None = None
    n_param_sets: int = 0

    @property
    def loss(self) -> float:
        return float(self.row_loss.sum())


@dataclass(frozen=True)
class ColumnGrid:
    """How quantization parameters change along the input axis, in processing order.

    gid [C]: the group of every column as the loop meets it. Without ``static``, a group must be one run of
    columns: its parameters are found at its first column from the current, error-updated weights (GPTQ
    groups). ``static`` (scale, zero, maxq) [R, G]: parameters fixed before the pass (GPTQ's static groups,
    needed with act-order, where a group's columns are not met in one run). ``maxq`` [G]: every group's
    maximum code, 2^bits - 1 (input-axis allocation); None keeps the quantizer's per-row widths.
    """

    gid: torch.Tensor
    maxq: torch.Tensor | None = None
    static: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def column_groups(columns: int, groupsize: int) -> torch.Tensor:
    """g_idx [C]: the quantization group of every column (all 0 without groups)."""
    return torch.arange(columns) // groupsize if groupsize > 0 else torch.zeros(columns, dtype=torch.long)


@torch.no_grad()
def obs_pass(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    q: Quantizer | None,
    opts: PassOptions,
    cols: ColumnGrid | None = None,
    mask_rows: int | None = None,
    mask: torch.Tensor | None = None,
) -> PassResult:
    """The SparseGPT column loop over W [R, C] (a float copy, modified in place) with Hinv = U, H^-1 = U^T U,
    both in processing order; ``opts``: the mask (sparsity or n:m) and the block width (its damping, groups
    and order were applied by the caller, ``SparseGPT.run_pass``).

    The OBS step reads as the reference's ``fasterprune``, line by line: per block of columns an adaptive mask
    (``tmp``, or n:m every prunem columns), then per column ``q`` = the column pruned and quantized, its loss
    (w - q)^2 / d^2, ``err1`` = (w - q) / d pushed onto the block's later columns through ``Hinv1[i, i:]``,
    and at the block's end the lazy update of every later column. Where it departs:

    - the block is held transposed, [count, R], so that column i is the contiguous row ``W1[i]``: a strided
      column was most of a pass's time. Same arithmetic, same order;
    - ``mask_rows`` = m stacks candidates: W is S copies of m rows (``miq.plan.trials``, every width at once),
      masks are chosen on the first m rows and repeated, and ``col_loss`` is kept per copy [S, C];
    - ``cols`` refits the quantizer at column-group starts: GPTQ's groups, found on the group's columns as they
      stand then (pending block updates included), or static parameters fixed before the pass (act-order);
      without ``cols``, ``q``'s parameters were found before the pass, as the reference finds them;
    - ``mask`` [R, C] fixes the prune mask instead of choosing one; the adaptive mask prunes exactly k weights
      per block (the reference's ``<=`` prunes k + 1).
    """
    sparsity, prunen, prunem, blocksize = opts.sparsity, opts.prunen, opts.prunem, opts.blocksize
    rows, columns = W.shape
    ref = rows if mask_rows is None else mask_rows
    reps = rows // ref
    gid = cols.gid.to(W.device) if cols is not None else torch.zeros(columns, dtype=torch.long, device=W.device)
    groups = gid.tolist()  # read at every column: Python lists, not tensor indexing
    starts = [True] + [a != b for a, b in zip(groups[1:], groups[:-1], strict=True)]
    grid = GridRecorder(rows, int(gid.max()) + 1, W.device) if q is not None else None
    if grid is not None and cols is None:
        grid.record(0, q)
    fixed = mask
    mask = torch.zeros_like(W, dtype=torch.bool)
    Losses = torch.zeros(rows, device=W.device)
    col_loss = torch.zeros(reps, columns, device=W.device)

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        # the block transposed, [count, R]: block column i is row W1[i], contiguous. A column of a row-major
        # block is strided, and these per-column steps were most of a pass (3x in a trial's stacked rows)
        W1 = W[:, i1:i2].t().contiguous()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        outer = torch.empty_like(W1)  # the rank-one updates' products, in one buffer rather than one each
        Hinv1 = Hinv[i1:i2, i1:i2]

        if fixed is not None:
            mask1 = fixed[:, i1:i2].t().contiguous()
        elif prunen == 0 and sparsity > 0:
            # adaptive mask: the block's k smallest OBS saliencies w^2 / [H^-1]_ii (the reference's
            # `tmp <= sorted[k]` prunes k + 1, one weight per block beyond the target)
            tmp = W[:ref, i1:i2] ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            mask1 = smallest(tmp, int(tmp.numel() * sparsity)).repeat(reps, 1).t().contiguous()
        else:  # n:m masks are chosen column by column below; sparsity 0 prunes nothing
            mask1 = torch.zeros_like(W1, dtype=torch.bool)

        for i in range(count):
            w = W1[i]
            d = Hinv1[i, i]
            if fixed is None and prunen != 0 and i % prunem == 0:
                tmp = W1[i : i + prunem, :ref].t() ** 2 / (torch.diag(Hinv1)[i : i + prunem].reshape((1, -1))) ** 2
                mask1[i : i + prunem].t().scatter_(
                    1, torch.topk(tmp, prunen, dim=1, largest=False)[1].repeat(reps, 1), True)
            if q is not None and cols is not None and starts[i1 + i]:
                g = groups[i1 + i]
                if cols.static is not None:  # GPTQ's static groups: parameters fixed before the pass
                    q.scale, q.zero, q.maxq = (t[:, g : g + 1] for t in cols.static)
                else:  # found on the group's run of columns from here, as they stand now
                    run = int((gid[i1 + i :] == g).int().cumprod(0).sum())
                    _fit_group(q, cols, g, _current_columns(W, W1, Err1, Hinv, i1, i2, i, run))
                grid.record(g, q)

            qw = w.masked_fill(mask1[i], 0)
            if q is not None:
                qw = quantize(qw.unsqueeze(1), q.scale, q.zero, q.maxq).flatten()

            Q1[i] = qw
            Losses1[i] = (w - qw) ** 2 / d**2
            err1 = (w - qw) / d
            W1[i:] -= torch.mm(Hinv1[i, i:].unsqueeze(1), err1.unsqueeze(0), out=outer[: count - i])
            Err1[i] = err1

        W[:, i1:i2] = Q1.t()
        mask[:, i1:i2] = mask1.t()
        Losses1 = Losses1.t().contiguous()  # [R, count], summed as the reference sums it
        Losses += torch.sum(Losses1, 1) / 2
        col_loss[:, i1:i2] = Losses1.reshape(reps, ref, count).sum(1) / 2
        # lazy batch update: the block's errors reach all later columns in one matmul
        W[:, i2:] -= Err1.t().contiguous().matmul(Hinv[i1:i2, i2:])

    if W.device.type == "cuda":
        torch.cuda.synchronize()
    res = PassResult(W, mask, Losses, col_loss)
    if grid is not None:
        res.scale, res.zero, res.maxq = grid.scale, grid.zero, grid.maxq
        res.n_param_sets = grid.scale.shape[1] * q.n_param_sets()
    return res


def _fit_group(q: Quantizer, cols: ColumnGrid, g: int, W: torch.Tensor) -> None:
    """q's parameters for column group g, found on its columns W [R, size] (at the group's width, if given)."""
    if cols.maxq is not None:
        q.maxq = torch.full((W.shape[0], 1), float(cols.maxq[g]), device=W.device)
    q.find_params(W, weight=True)


def _current_columns(W, W1, Err1, Hinv, i1, i2, i, size) -> torch.Tensor:
    """Columns [i1+i, i1+i+size) as they stand now, with the current block's pending updates (W1, Err1: the
    block transposed, [count, R])."""
    c0, c1 = i1 + i, min(i1 + i + size, W.shape[1])
    inblock = W1[i : min(c1, i2) - i1].t()
    if c1 <= i2:
        return inblock
    # columns past the block have not yet received this block's errors (applied lazily at its end)
    beyond = W[:, i2:c1] - Err1[:i].t().matmul(Hinv[i1 : i1 + i, i2:c1])
    return torch.cat([inblock, beyond], dim=1)[:, : c1 - c0]


def layer_error(W0: torch.Tensor, W: torch.Tensor, H: torch.Tensor, step: int = 256) -> torch.Tensor:
    """Per-row 1/2 (w0 - w) H (w0 - w)^T [R], float64: the quadratic error SparseGPT's losses add up to.
    H goes to float64 ``step`` columns at a time: whole, its copy (8 C^2 bytes, 128 MB for C = 4096) was the
    largest tensor of a layer's compression; each product column is the same dot product either way."""
    d = (W0 - W).double()
    prod = torch.empty_like(d)
    for c in range(0, H.shape[1], step):
        torch.mm(d, H[:, c : c + step].double(), out=prod[:, c : c + step])
    return 0.5 * prod.mul_(d).sum(1)


def processing_order(H: torch.Tensor, g_idx: torch.Tensor | None, act_order: bool) -> torch.Tensor | None:
    """The order the loop meets columns in: by descending diag H (act-order, GPTQ's desc_act), else groups
    made contiguous (stable, so GPTQ's consecutive groups keep their order); None for the natural order."""
    if act_order:
        return torch.sort(torch.diag(H), descending=True, stable=True)[1]
    if g_idx is not None and bool((g_idx[1:] < g_idx[:-1]).any()):
        return torch.sort(g_idx.to(H.device), stable=True)[1]
    return None


class SparseGPT:
    """Pruning (and joint quantization) state for one ``nn.Linear``."""

    def __init__(self, layer: nn.Module, name: str = ""):
        self.layer = layer
        self.name = name
        self.dev = layer.weight.device
        W = layer.weight.data
        self.rows, self.columns = W.shape[0], W.shape[1]
        self.H = torch.zeros((self.columns, self.columns), device=self.dev)
        self.nsamples = 0
        self.quantizer: Quantizer | None = None
        self.sampler: RowSampler | None = None
        self.sample_inputs = False  # sample the layer's inputs (input axis) instead of its outputs
        self.percdamp_used: float | None = None
        self.error: float | None = None
        self.n_param_sets = 0
        self.result: PassResult | None = None
        self.perm: torch.Tensor | None = None  # the processing order of the last pass (None: natural)
        self._prepared, self._factors = None, {}  # (W0, Hd) once prepared; U per processing order

    def sample(self, total_rows: int, k: int, seed: int, inputs: bool = False) -> None:
        """Keep a uniform sample of ``k`` of the ``total_rows`` output rows (or input rows) add_batch will see."""
        self.sampler, self.sample_inputs = RowSampler(total_rows, k, seed), inputs

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor, last: list | None = None) -> None:
        """inp [batch, seq, in] or [tokens, in] (one sequence, as the reference); out [..., rows]. ``last``: the
        previous call's [(inp, count), x x^T]: the next linear fed that very tensor (q, k, v) adds it, bit for bit."""
        if self.sampler is not None:
            x = inp if self.sample_inputs else out
            self.sampler.add(x.reshape(-1, x.shape[-1]))
        tmp = 1 if inp.dim() == 2 else inp.shape[0]
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        if last and last[0][0] is inp and last[0][1] == self.nsamples:
            inc = last[1]
        else:
            if last:  # another input: the cached increment goes before this one is made, not after
                last.clear()
            x = math.sqrt(2 / self.nsamples) * inp.reshape(-1, inp.shape[-1]).t().float()
            inc = x.matmul(x.t())
            # a NaN or inf input reaches the diagonal (x_j^2): checked there, in O(in) rather than O(tokens x in)
            if not torch.isfinite(inc.diagonal()).all():
                raise LayerInputError(f"layer {self.name}: calibration inputs hold NaN or inf (or overflow squared)")
            if last is not None:
                last[:] = [(inp, self.nsamples), inc]
        self.H += inc

    def _damped(self, H: torch.Tensor, percdamp: float, order: Callable | None = None) -> torch.Tensor:
        """H + damp * mean(diag H) * I, the damping x10 until H and its inverse have Cholesky factors. In place
        (a retry damps the saved diagonal again): a copy would be one more [in, in] at the layer's peak. The
        factors are checked and kept in the order ``order(H)`` the first pass takes (None: natural)."""
        diag = torch.arange(self.columns, device=self.dev)
        mean_diag = torch.mean(torch.diag(H))
        undamped = H[diag, diag]
        for attempt in range(5):
            damp = percdamp * (10**attempt)
            H[diag, diag] = undamped + damp * mean_diag
            perm = None if order is None else order(H)
            U = _upper_factor(H if perm is None else H[perm][:, perm])
            if U is not None:
                if attempt:
                    print(f"warning: {self.name}: Hessian not positive definite, damping raised to "
                          f"{damp:g} x mean(diag H)")
                self.percdamp_used = damp
                self._factors[None if perm is None else tuple(perm.tolist())] = U  # factor() need not redo it
                return H
        raise torch.linalg.LinAlgError(
            f"layer {self.name}: Cholesky of the damped Hessian failed even at percdamp={damp:g}")

    def prepare(self, percdamp: float, order: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(W0, Hd): the layer's float weights with dead columns zeroed and the damped Hessian, in the
        layer's own column order. Computed once; every pass of the layer shares them (``order``: _damped's)."""
        if self._prepared is None:
            W = self.layer.weight.data.clone().float()
            H = self.H
            self.H = None
            dead = torch.diag(H) == 0
            H[dead, dead] = 1
            W[:, dead] = 0
            self._prepared = (W, self._damped(H, percdamp, order))
        return self._prepared

    def factor(self, perm: torch.Tensor | None) -> torch.Tensor:
        """U, the upper Cholesky factor of Hd^-1 with Hd's columns in the order ``perm`` (cached per order)."""
        key = None if perm is None else tuple(perm.tolist())
        if key not in self._factors:
            Hd = self._prepared[1]
            U = _upper_factor(Hd if perm is None else Hd[perm][:, perm])
            if U is None:
                raise torch.linalg.LinAlgError(f"layer {self.name}: the reordered damped Hessian has no Cholesky")
            self._factors[key] = U
        return self._factors[key]

    def fasterprune(self, sparsity: float, prunen: int = PassOptions.prunen, prunem: int = PassOptions.prunem,
                    blocksize: int = PassOptions.blocksize, percdamp: float = PassOptions.percdamp,
                    groupsize: int = PassOptions.groupsize, act_order: bool = PassOptions.act_order) -> float:
        """The reference's entry point: prune ``sparsity`` of the weights (or n:m) and quantize with
        ``self.quantizer`` if set; returns the summed OBS error sum (w - q)^2 / [U]_ii^2 / 2."""
        opts = PassOptions(sparsity, prunen, prunem, blocksize, percdamp, groupsize, act_order)
        return self.prune(opts, self.quantizer)

    def prune(self, opts: PassOptions, q: Quantizer | None, *, g_idx: torch.Tensor | None = None,
              group_bits: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> float:
        """One pass with quantizer ``q`` (None: prune only), written into ``layer.weight`` (and ``self.result``).

        Column groups: ``opts.groupsize`` (GPTQ) or any ``g_idx`` [C] (input-axis groups) with ``group_bits`` [G]
        widths; ``opts.act_order`` processes columns by descending diag H, with static group parameters.
        ``mask``: a fixed prune mask. Returns the summed OBS error.
        """
        self.finish(self.run_pass(q, opts, g_idx=g_idx, group_bits=group_bits, mask=mask))
        return self.error

    def run_pass(self, q: Quantizer | None, opts: PassOptions, *, g_idx: torch.Tensor | None = None,
                 group_bits: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                 reps: int = 1) -> PassResult:
        """One obs_pass over the layer (stacked ``reps`` times), columns in their processing order and back.
        ``opts.groupsize`` > 0 without ``g_idx``: GPTQ's consecutive column groups."""
        if g_idx is None and opts.groupsize > 0:
            g_idx = column_groups(self.columns, opts.groupsize)
        if q is not None and g_idx is None and not q.ready():
            # as the reference: per-row parameters from the weights as loaded, before dead columns are zeroed
            q.find_params(self.layer.weight.data.float().repeat(reps, 1), weight=True)
        W0, Hd = self.prepare(opts.percdamp, lambda H: processing_order(H, g_idx, opts.act_order))
        perm = processing_order(Hd, g_idx, opts.act_order)
        cols = None
        if g_idx is not None:
            g_idx = g_idx.to(self.dev)
            static = static_grid(q, W0.repeat(reps, 1), g_idx, group_bits) if opts.act_order and q else None
            maxq = None if group_bits is None else 2.0 ** group_bits.to(self.dev).double() - 1
            cols = ColumnGrid(g_idx if perm is None else g_idx[perm], maxq, static)
        W = W0.repeat(reps, 1)
        if perm is not None:
            W, mask = W[:, perm], (None if mask is None else mask[:, perm])
        res = obs_pass(W, self.factor(perm), q, opts, cols, mask_rows=self.rows if reps > 1 else None, mask=mask)
        self.perm = perm
        if perm is not None:  # back to the layer's column order
            inv = torch.argsort(perm)
            res.W, res.mask, res.col_loss = res.W[:, inv], res.mask[:, inv], res.col_loss[:, inv]
        return res

    def finish(self, res: PassResult) -> None:
        """Write a pass's weights into the layer and keep its bookkeeping."""
        # into the loaded storage: a new tensor would leave the old pages (of a memory-mapped checkpoint) resident
        self.layer.weight.data.copy_(res.W.reshape(self.layer.weight.shape))
        self._factors = {}  # no pass follows the final one: U ([in, in]) goes before the layer's error is computed
        self.result = res
        self.error = res.loss
        self.n_param_sets = res.n_param_sets

    def free(self) -> None:
        self.H = None
        self.sampler = None
        self._prepared = None
        self._factors = {}
        self.result = None  # its weights are in the layer; kept, every finished linear's would pile up to the last
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _upper_factor(Hd: torch.Tensor) -> torch.Tensor | None:
    """U with Hd^-1 = U^T U (upper Cholesky of the inverse), or None when either factorization fails."""
    L, info = torch.linalg.cholesky_ex(Hd)
    if info != 0:
        return None
    # both steps in L's storage (the same values as into new tensors): one [in, in] beside Hd rather than two,
    # 64 MB less at a 4096-input layer's peak
    torch.cholesky_inverse(L, out=L)
    U, info = torch.linalg.cholesky_ex(L, upper=True, out=(L, info))
    # counted in chunks: isfinite(U) whole made 1.75 [in, in] of temporaries, the largest term of fc2's peak
    return U if info == 0 and nonfinite(U) == 0 else None


def smallest(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly the k smallest entries of x; ties at the threshold go in index order (as a
    stable sort would), so the mask is deterministic. O(n) through kthvalue rather than a full sort."""
    mask = torch.zeros_like(x, dtype=torch.bool)
    if k <= 0:
        return mask
    flat = x.flatten()
    thresh = torch.kthvalue(flat, k).values
    below = flat < thresh
    ties = (flat == thresh).nonzero().flatten()[: k - int(below.sum())]
    below[ties] = True
    return below.reshape(x.shape)


def magnitude_prune(W: torch.Tensor, sparsity: float, prunen: int = 0, prunem: int = 0) -> torch.Tensor:
    """Boolean prune mask [rows, cols] of the smallest |w| (global per layer, or n:m per row)."""
    if prunen:
        tmp = W.abs().reshape(W.shape[0], -1, prunem)
        idx = torch.topk(tmp, prunen, dim=2, largest=False)[1]
        mask = torch.zeros_like(tmp, dtype=torch.bool).scatter_(2, idx, True)
        return mask.reshape(W.shape)
    return smallest(W.abs(), int(W.numel() * sparsity))  # exactly k (the reference's <= prunes k + 1)
