"""SparseGPT (Frantar & Alistarh, 2023) with joint quantization, for one linear layer.

Same interface and mathematics as IST-DASLab/sparsegpt: accumulate H = (2/n) sum x x^T over calibration
sequences, then prune column by column with OBS updates driven by the upper Cholesky factor of H^-1,
choosing an adaptive mask per block of columns. Quantization (``self.quantizer``) happens inside the column
loop so that its error is propagated too. Additions: GPTQ-style ``groupsize`` (quantization parameters
recomputed every ``groupsize`` columns), a seeded uniform sample of the layer's output rows for the MI
method, damping retries when Cholesky fails, and finite-input checks naming the layer.
"""

from __future__ import annotations

import math

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

    def _hinv_upper(self, H: torch.Tensor, percdamp: float) -> torch.Tensor:
        """Upper Cholesky factor U of (H + damp I)^-1, H^-1 = U^T U; damping x10 on failure."""
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
                    return U
        raise torch.linalg.LinAlgError(
            f"layer {self.name}: Cholesky of the damped Hessian failed even at percdamp={damp:g}")

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

        Writes the result into ``layer.weight``; returns the summed OBS error sum (w - q)^2 / [U]_ii^2 / 2.
        """
        W = self.layer.weight.data.clone().float()
        q = self.quantizer
        if q is not None and groupsize == -1 and not q.ready():
            q.find_params(W, weight=True)
        if q is not None:
            self.n_param_sets = q.n_param_sets() if groupsize == -1 else 0

        H = self.H
        self.H = None
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        Hinv = self._hinv_upper(H, percdamp)
        del H

        Losses = torch.zeros(self.rows, device=self.dev)
        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Losses1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]

            if prunen == 0 and sparsity > 0:
                # adaptive mask: the block's smallest OBS saliencies w^2 / [H^-1]_ii
                tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                mask1 = tmp <= thresh
            else:  # n:m masks are chosen column by column below; sparsity 0 prunes nothing
                mask1 = torch.zeros_like(W1, dtype=torch.bool)

            for i in range(count):
                w = W1[:, i]
                d = Hinv1[i, i]
                if prunen != 0 and i % prunem == 0:
                    tmp = W1[:, i : i + prunem] ** 2 / (torch.diag(Hinv1)[i : i + prunem].reshape((1, -1))) ** 2
                    mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
                if q is not None and groupsize > 0 and (i1 + i) % groupsize == 0:
                    q.find_params(self._current_columns(W, W1, Err1, Hinv, i1, i2, i, groupsize), weight=True)
                    self.n_param_sets += q.n_param_sets()

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
            Losses += torch.sum(Losses1, 1) / 2
            # lazy batch update: the block's errors reach all later columns in one matmul
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

        if self.dev.type == "cuda":
            torch.cuda.synchronize()
        self.layer.weight.data = W.reshape(self.layer.weight.shape).to(self.layer.weight.data.dtype)
        self.error = float(torch.sum(Losses).item())
        return self.error

    @staticmethod
    def _current_columns(W, W1, Err1, Hinv, i1, i2, i, groupsize) -> torch.Tensor:
        """Columns [i1+i, i1+i+groupsize) as they stand now, with the current block's pending updates."""
        c0, c1 = i1 + i, min(i1 + i + groupsize, W.shape[1])
        inblock = W1[:, i : min(c1, i2) - i1]
        if c1 <= i2:
            return inblock
        # columns past the block have not yet received this block's errors (applied lazily at its end)
        beyond = W[:, i2:c1] - Err1[:, :i].matmul(Hinv[i1 : i1 + i, i2:c1])
        return torch.cat([inblock, beyond], dim=1)[:, : c1 - c0]

    def free(self) -> None:
        self.H = None
        self.sampler = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def magnitude_prune(W: torch.Tensor, sparsity: float, prunen: int = 0, prunem: int = 0) -> torch.Tensor:
    """Boolean prune mask [rows, cols] of the smallest |w| (global per layer, or n:m per row)."""
    if prunen:
        tmp = W.abs().reshape(W.shape[0], -1, prunem)
        idx = torch.topk(tmp, prunen, dim=2, largest=False)[1]
        mask = torch.zeros_like(tmp, dtype=torch.bool).scatter_(2, idx, True)
        return mask.reshape(W.shape)
    k = int(W.numel() * sparsity)
    if k == 0:
        return torch.zeros_like(W, dtype=torch.bool)
    thresh = torch.sort(W.abs().flatten())[0][k]
    return W.abs() <= thresh
