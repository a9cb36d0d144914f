"""SparseGPT (Frantar & Alistarh, 2023) with joint quantization, for one linear layer.

Same interface and mathematics as IST-DASLab/sparsegpt: accumulate H = (2/n) sum x x^T over calibration
sequences, then prune column by column with OBS updates driven by the upper Cholesky factor of H^-1,
choosing an adaptive mask per block of columns. Quantization (``self.quantizer``) happens inside the column
loop so that its error is propagated too. The loop is ``obs_pass``, kept line for line comparable with the
reference's ``fasterprune``. Additions:
- GPTQ-style ``groupsize`` (quantization parameters recomputed every ``groupsize`` columns);
- the grid actually used (scale, zero, maxq per row and column group) and the pruning mask, returned;
- per-row and per-column OBS losses, and the layer error 1/2 (W0 - W) H (W0 - W)^T they add up to;
- ``trial``: one pass over the layer stacked once per candidate bit-width, all candidates pruned with
  the mask of one reference width, so that every row's loss at every width is known and rows of
  different widths can be combined exactly (rows are independent once the mask is fixed);
- a seeded uniform sample of the layer's output rows for the MI method, damping retries when Cholesky
  fails, and finite-input checks naming the layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from quant import Quantizer, quantize


class LayerInputError(ValueError):
    """Calibration inputs of a layer are not finite: a user-facing error naming the layer."""


class RowSampler:
    """Uniform sample without replacement of ``k`` out of ``total`` rows that arrive in order, in chunks.

    The kept indices are drawn up front from a seeded generator, so the sample is exact, reproducible and
    bounded by ``k`` rows whatever the chunk sizes.
    """

    def __init__(self, total: int, k: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        k = min(k, total)
        self.keep = torch.sort(torch.randperm(total, generator=g)[:k]).values
        self.seen = 0
        self.rows: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        """x [rows, C]: rows numbered seen .. seen + rows - 1."""
        lo, hi = self.seen, self.seen + x.shape[0]
        a, b = torch.searchsorted(self.keep, torch.tensor([lo, hi])).tolist()
        if b > a:
            idx = (self.keep[a:b] - lo).to(x.device)
            self.rows.append(x[idx].detach().float().cpu())
        self.seen = hi

    def samples(self) -> torch.Tensor:
        """[k, C] float32 on CPU."""
        return torch.cat(self.rows) if self.rows else torch.empty(0)


@dataclass
class PassResult:
    """What one OBS pass produced for W [R, C] with G column groups (G = 1 without --groupsize).

    W: final (pruned, quantized) weights. mask: [R, C] True where pruned. row_loss [R] / col_loss [C]:
    sum of (w - q)^2 / [H^-1]_ii / 2 over a row / column. scale, zero, maxq: [R, G] the grid each row used
    in each column group (None when not quantizing). n_param_sets: distinct (scale, zero) sets stored.
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


@dataclass
class TrialResult:
    """``trial``'s candidates: W [S, R, C], row_loss [S, R] and grids [S, R, G] at ``bits`` [S]; one mask."""

    bits: list[int]
    W: torch.Tensor
    row_loss: torch.Tensor
    mask: torch.Tensor
    scale: torch.Tensor | None
    zero: torch.Tensor | None
    maxq: torch.Tensor | None
    param_sets_per_row_group: int  # parameter sets each candidate stores per row (or shared row group)

    def select(self, row_bits: torch.Tensor) -> PassResult:
        """Row r taken from the candidate at row_bits[r]: the result of a pass with those per-row widths."""
        pick = torch.tensor([self.bits.index(int(b)) for b in row_bits.tolist()], device=self.W.device)
        rows = torch.arange(self.W.shape[1], device=self.W.device)
        grid = [None if t is None else t[pick, rows] for t in (self.scale, self.zero, self.maxq)]
        loss = self.row_loss[pick, rows]
        return PassResult(self.W[pick, rows], self.mask, loss, torch.full((self.W.shape[2],), float("nan")),
                          *grid)


def column_groups(columns: int, groupsize: int) -> torch.Tensor:
    """gid [C]: the quantization group of every column (all 0 without groups)."""
    return torch.arange(columns) // groupsize if groupsize > 0 else torch.zeros(columns, dtype=torch.long)


@torch.no_grad()
def obs_pass(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    q: Quantizer | None,
    sparsity: float = 0.0,
    prunen: int = 0,
    prunem: int = 0,
    blocksize: int = 128,
    groupsize: int = -1,
    mask_rows: int | None = None,
) -> PassResult:
    """The SparseGPT column loop over W [R, C] (a float copy, modified in place) with Hinv = U, H^-1 = U^T U.

    ``q``'s parameters must already be found when ``groupsize`` is -1 (the reference finds them on the
    weights before the pass); with groups they are found at each group's first column from the current,
    error-updated weights. ``mask_rows`` = m: masks are chosen on rows [0, m) and repeated for the
    following blocks of m rows (``trial``'s stacked candidates); default: every row for itself.
    """
    rows, columns = W.shape
    ref = rows if mask_rows is None else mask_rows
    reps = rows // ref
    gid = column_groups(columns, groupsize)
    ngroups = int(gid[-1]) + 1
    grid = _GridRecorder(rows, ngroups, W.device) if q is not None else None
    if grid is not None and groupsize <= 0:
        grid.record(0, q)

    mask = torch.zeros_like(W, dtype=torch.bool)
    Losses = torch.zeros(rows, device=W.device)
    col_loss = torch.zeros(columns, device=W.device)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        if prunen == 0 and sparsity > 0:
            # adaptive mask: the block's k smallest OBS saliencies w^2 / [H^-1]_ii (the reference's
            # `tmp <= sorted[k]` prunes k + 1, one weight per block beyond the target)
            tmp = W1[:ref] ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            mask1 = smallest(tmp, int(tmp.numel() * sparsity)).repeat(reps, 1)
        else:  # n:m masks are chosen column by column below; sparsity 0 prunes nothing
            mask1 = torch.zeros_like(W1, dtype=torch.bool)

        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:ref, i : i + prunem] ** 2 / (torch.diag(Hinv1)[i : i + prunem].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1].repeat(reps, 1), True)
            if q is not None and groupsize > 0 and (i1 + i) % groupsize == 0:
                q.find_params(_current_columns(W, W1, Err1, Hinv, i1, i2, i, groupsize), weight=True)
                grid.record(int(gid[i1 + i]), q)

            qw = w.clone()
            qw[mask1[:, i]] = 0
            if q is not None:
                qw = quantize(qw.unsqueeze(1), q.scale, q.zero, q.maxq).flatten()

            Q1[:, i] = qw
            Losses1[:, i] = (w - qw) ** 2 / d**2
            err1 = (w - qw) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1

        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        Losses += torch.sum(Losses1, 1) / 2
        col_loss[i1:i2] = torch.sum(Losses1, 0) / 2
        # lazy batch update: the block's errors reach all later columns in one matmul
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    if W.device.type == "cuda":
        torch.cuda.synchronize()
    res = PassResult(W, mask, Losses, col_loss)
    if grid is not None:
        res.scale, res.zero, res.maxq = grid.scale, grid.zero, grid.maxq
        res.n_param_sets = ngroups * q.n_param_sets()
    return res


class _GridRecorder:
    """Collects the (scale, zero, maxq) a quantizer holds at each column group's start: [R, G] each."""

    def __init__(self, rows: int, ngroups: int, dev: torch.device):
        self.scale = torch.zeros(rows, ngroups, device=dev)
        self.zero = torch.zeros(rows, ngroups, device=dev)
        self.maxq = torch.zeros(rows, ngroups, device=dev)

    def record(self, g: int, q: Quantizer) -> None:
        rows = self.scale.shape[0]
        self.scale[:, g] = q.scale.reshape(-1).expand(rows)
        self.zero[:, g] = q.zero.reshape(-1).expand(rows)
        self.maxq[:, g] = q.maxq.reshape(-1).expand(rows)


def _current_columns(W, W1, Err1, Hinv, i1, i2, i, groupsize) -> torch.Tensor:
    """Columns [i1+i, i1+i+groupsize) as they stand now, with the current block's pending updates."""
    c0, c1 = i1 + i, min(i1 + i + groupsize, W.shape[1])
    inblock = W1[:, i : min(c1, i2) - i1]
    if c1 <= i2:
        return inblock
    # columns past the block have not yet received this block's errors (applied lazily at its end)
    beyond = W[:, i2:c1] - Err1[:, :i].matmul(Hinv[i1 : i1 + i, i2:c1])
    return torch.cat([inblock, beyond], dim=1)[:, : c1 - c0]


def layer_error(W0: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per-row 1/2 (w0 - w) H (w0 - w)^T [R], float64: the quadratic error SparseGPT's losses add up to."""
    d = (W0 - W).double()
    return 0.5 * ((d @ H.double()) * d).sum(1)


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
        self.percdamp_used: float | None = None
        self.error: float | None = None
        self.n_param_sets = 0
        self.result: PassResult | None = None
        self._prepared: tuple | None = None

    def sample_outputs(self, total_rows: int, k: int, seed: int) -> None:
        """Keep a uniform sample of ``k`` of the ``total_rows`` output rows that add_batch will see."""
        self.sampler = RowSampler(total_rows, k, seed)

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        """inp [batch, seq, in] or [tokens, in] (counted as one sequence, as the reference); out [..., rows]."""
        if not torch.isfinite(inp).all():
            raise LayerInputError(f"layer {self.name}: calibration inputs hold NaN or inf")
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape(-1, inp.shape[-1]).t()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())
        if self.sampler is not None:
            self.sampler.add(out.reshape(-1, out.shape[-1]))

    def _hinv_upper(self, H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, damped H): U the upper Cholesky factor of (H + damp I)^-1, H^-1 = U^T U; damping x10 on failure."""
        diag = torch.arange(self.columns, device=self.dev)
        mean_diag = torch.mean(torch.diag(H))
        for attempt in range(5):
            damp = percdamp * (10**attempt)
            Hd = H.clone()
            Hd[diag, diag] += damp * mean_diag
            L, info = torch.linalg.cholesky_ex(Hd)
            if info == 0:
                Hinv = torch.cholesky_inverse(L)
                U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
                if info == 0 and torch.isfinite(U).all():
                    if attempt:
                        print(f"warning: {self.name}: Hessian not positive definite, damping raised to "
                              f"{damp:g} x mean(diag H)")
                    self.percdamp_used = damp
                    return U, Hd
        raise torch.linalg.LinAlgError(
            f"layer {self.name}: Cholesky of the damped Hessian failed even at percdamp={damp:g}")

    def prepare(self, percdamp: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W0, U, Hd): the layer's float weights with dead columns zeroed, the factor the loop uses and the
        damped Hessian. Computed once; trial and final passes share it (the reference recomputes per pass)."""
        if self._prepared is None:
            W = self.layer.weight.data.clone().float()
            H = self.H
            self.H = None
            dead = torch.diag(H) == 0
            H[dead, dead] = 1
            W[:, dead] = 0
            U, Hd = self._hinv_upper(H, percdamp)
            self._prepared = (W, U, Hd)
        return self._prepared

    def fasterprune(
        self,
        sparsity: float,
        prunen: int = 0,
        prunem: int = 0,
        blocksize: int = 128,
        percdamp: float = 0.01,
        groupsize: int = -1,
    ) -> float:
        """Prune ``sparsity`` of the weights (or n:m) and quantize with ``self.quantizer`` if set.

        Writes the result into ``layer.weight`` (and ``self.result``); returns the summed OBS error
        sum (w - q)^2 / [U]_ii^2 / 2.
        """
        q = self.quantizer
        if q is not None and groupsize == -1 and not q.ready():
            # as the reference: per-row parameters from the weights as loaded, before dead columns are zeroed
            q.find_params(self.layer.weight.data.float(), weight=True)
        W0, U, _ = self.prepare(percdamp)
        res = obs_pass(W0.clone(), U, q, sparsity, prunen, prunem, blocksize, groupsize)
        self.finish(res)
        return self.error

    def trial(self, bits: list[int], ref_bits: int, *, sym: bool = False, row_groups: torch.Tensor | None = None,
              sparsity: float = 0.0, prunen: int = 0, prunem: int = 0, blocksize: int = 128,
              percdamp: float = 0.01, groupsize: int = -1) -> TrialResult:
        """Every row at every width of ``bits`` in one pass over the layer stacked len(bits) times.

        The masks are those of the ``ref_bits`` candidate (chosen on its rows, applied to all), so rows
        are independent: the pass with any per-row choice of widths gives exactly the chosen candidates'
        rows (``TrialResult.select``). ``row_groups`` [R]: rows sharing one grid (strategy A).
        """
        order = [ref_bits] + [b for b in bits if b != ref_bits]  # masks come from the first block of rows
        W0, U, _ = self.prepare(percdamp)
        Wl = self.layer.weight.data.float()
        S, R = len(order), self.rows
        q = Quantizer()
        stacked_groups = None
        if row_groups is not None:
            k = int(row_groups.max()) + 1
            stacked_groups = torch.cat([row_groups.to(self.dev) + j * k for j in range(S)])
        q.configure(torch.cat([torch.full((R,), b, device=self.dev) for b in order]), perchannel=True, sym=sym,
                    row_groups=stacked_groups)
        if groupsize == -1:
            q.find_params(Wl.repeat(S, 1), weight=True)
        res = obs_pass(W0.repeat(S, 1), U, q, sparsity, prunen, prunem, blocksize, groupsize, mask_rows=R)
        back = [order.index(b) for b in bits]  # candidates in the order of ``bits``

        def per_candidate(t):
            return None if t is None else t.reshape(S, R, *t.shape[1:])[back]

        return TrialResult(list(bits), per_candidate(res.W), per_candidate(res.row_loss), res.mask[:R],
                           per_candidate(res.scale), per_candidate(res.zero), per_candidate(res.maxq),
                           res.n_param_sets // S)

    def finish(self, res: PassResult) -> None:
        """Write a pass's weights into the layer and keep its bookkeeping."""
        self.layer.weight.data = res.W.reshape(self.layer.weight.shape).to(self.layer.weight.data.dtype)
        self.result = res
        self.error = res.loss
        self.n_param_sets = res.n_param_sets

    def free(self) -> None:
        self.H = None
        self.sampler = None
        self._prepared = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


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
