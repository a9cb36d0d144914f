"""Mutual information between the output channels of a layer, from their activations.

Histogram (plug-in) estimator. Each channel is discretised into `bins` codes; for a pair of channels (i, j)
with joint code counts n_ab over N samples

    H(i)    = -sum_a p_a log p_a  = log N - (1/N) sum_a  n_a  log n_a         p_a = n_a / N
    H(i, j) = -sum_ab p_ab log p_ab = log N - (1/N) sum_ab n_ab log n_ab
    MI(i,j) = H(i) + H(j) - H(i, j)                                           (nats)

`pairwise_mi` does all C^2 pairs at once: with the one-hot codes X [N, C*bins], the Gram matrix X^T X
[C*bins, C*bins] holds the bins x bins contingency table of every pair of channels. It is computed exactly
(int8 x int8 -> int32) a block of channels at a time, against the channels at and after the block only
(symmetry), and each block is reduced to joint entropies right away, so memory stays bounded.

Counting route, measured on the 2-core AVX-512/VNNI CPU this project runs on (shared: timings vary +-50%).
For [8192, 4096]^T x [8192, 4096] 0/1 codes: `torch._int_mm` (oneDNN int8 -> int32) takes ~1.1 s, bfloat16
1.2-2.3 s, float32 1.6-4.4 s (numpy float32 2.3 s), float64 8.4 s, an int8 `@` without BLAS 5 s. Counting
pairs with bincount (N operations a pair instead of N*bins^2, but random access) takes 4 s (numpy) to 22 s
(torch) for a 512-channel layer that `_int_mm` does in ~1.5 s of CPU time. So `_int_mm` it is, on CPU and
CUDA, as int8 [p, N] @ ([q, N] int8).T: that layout measured ~20% faster than [N, p].T @ [N, q]. A float32
matmul of the 0/1 codes is the fallback, exact since products are 0/1 and float32 sums are exact integers
below 2^24, which the token chunking guarantees. Not done: dropping each channel's last bin and completing
the tables from the marginals saves 12% of the products but needs two short-axis reductions that cost more.

Sums of n log n are done in 62-bit fixed point (int64): integer sums are exact, so an entropy is the same
number whatever the block shape, memory budget, channel order or device, and H(i, j) = H(j, i) to the bit.
Each term is rounded once, at float64 precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from miq.options import BIASES, BINNINGS, ESTIMATORS, NORMALIZATIONS

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes

_CHUNK_ELEMENTS = 1 << 24  # activations discretised per chunk of channels (128 MiB in float64)
_FP32_EXACT = 1 << 24  # float32 holds every integer count below this
_BYTES_PER_CELL = 16  # one count block: int32 counts (+ int32 chunk partial) + int64 n log n


@dataclass
class MIResult:
    """All-pairs mutual information of C channels (CPU tensors, float64, nats)."""

    mi: torch.Tensor  # [C, C], symmetric, diagonal = entropy
    nmi: torch.Tensor  # [C, C], diagonal 1 (0 for a constant channel)
    entropy: torch.Tensor  # [C]
    estimator: str
    bins: int
    n_samples: int


# ----------------------------------------------------------------------------- input checks


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")


def _check_bins(bins) -> int:
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 2:
        raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
    return int(bins)


def _as_acts(acts, device=None) -> torch.Tensor:
    """Validated activations: a floating tensor [N, C] on `device` (None: where `acts` already are)."""
    if isinstance(acts, np.ndarray):
        acts = torch.from_numpy(acts)
    if not isinstance(acts, torch.Tensor):
        raise ValueError(f"acts must be a torch.Tensor or numpy.ndarray, got {type(acts).__name__}")
    if acts.dim() != 2:
        raise ValueError(f"acts must be 2-D [N samples, C channels], got shape {tuple(acts.shape)}")
    n, c = acts.shape
    if n < 2 or c < 1:
        raise ValueError(f"acts needs N >= 2 samples and C >= 1 channels, got shape {tuple(acts.shape)}")
    if n >= 2**31 - 1:
        raise ValueError(f"N={n} samples overflow the int32 counts; subsample the tokens")
    acts = acts.detach()
    if not acts.is_floating_point():
        acts = acts.to(torch.float64)
    if device is not None:
        acts = acts.to(device)
    bad = int((~torch.isfinite(acts).all(dim=0)).sum())
    if bad:
        raise ValueError(f"acts hold NaN or inf in {bad} of {c} channels")
    return acts


# ----------------------------------------------------------------------------- discretisation


def _quantile_codes(x: torch.Tensor, bins: int) -> torch.Tensor:
    """Codes [c, N] = floor(bins * r / N), r = #values of the row strictly below x, for rows x [c, N].

    code >= m  <=>  r >= q_m = ceil(m N / bins)  <=>  the q_m-th smallest value is < x, so the codes are the
    number of such edges below x: a binary search over bins - 1 edges instead of a rank per value.
    """
    n = x.shape[1]
    if x.device.type == "cpu":  # numpy's SIMD sort is several times faster than torch.sort on CPU
        s = torch.from_numpy(np.sort(x.numpy(), axis=1))
    else:
        s = torch.sort(x, dim=1).values
    q = -(-torch.arange(1, bins, device=x.device) * n // bins)  # ceil(m N / bins), m = 1 .. bins-1
    edges = s[:, q - 1].contiguous()  # [c, bins-1], non-decreasing
    return torch.searchsorted(edges, x.contiguous())  # left: number of edges strictly below x


def _uniform_codes(x: torch.Tensor, bins: int) -> torch.Tensor:
    """Codes [c, N] of equal-width bins over each row's [min, max] of x [c, N] float64; max -> last bin."""
    lo = x.amin(dim=1, keepdim=True)
    width = x.amax(dim=1, keepdim=True) - lo
    width = torch.where(width > 0, width, torch.ones_like(width))  # constant row -> code 0
    return torch.floor((x - lo) * (bins / width)).clamp_(0, bins - 1).long()


def _discretize(acts: torch.Tensor, bins: int, binning: str, dtype: torch.dtype) -> torch.Tensor:
    """Bin codes [N, C] of validated acts [N, C], a chunk of channels at a time (bounded float copies)."""
    n, c = acts.shape
    codes = torch.empty(n, c, dtype=dtype, device=acts.device)
    step = max(1, _CHUNK_ELEMENTS // n)
    for c0 in range(0, c, step):
        x = acts[:, c0 : c0 + step].T
        if binning == "quantile":
            # sorting only compares values: float32 or float64 is exact, half types widen exactly to float32
            x = x if x.dtype in (torch.float32, torch.float64) else x.float()
            code = _quantile_codes(x, bins)
        else:
            # float64 arithmetic, so the codes do not depend on the input dtype
            code = _uniform_codes(x.double(), bins)
        codes[:, c0 : c0 + step] = code.T
    return codes


def discretize(acts, bins: int = 16, binning: str = "quantile") -> torch.Tensor:
    """Per-channel bin codes of activations.

    acts: [N, C] torch tensor (any float dtype, any device) or numpy array, finite.
    Returns a LongTensor [N, C] of codes in [0, bins), on the device of `acts`.

    binning="uniform": `bins` equal-width bins over each channel's [min, max]; the max goes in the last bin.
    binning="quantile": equal-frequency bins by rank: code = floor(bins * r / N), with r the number of values
        of the channel strictly smaller than the value. Equal values have the same r, hence the same code, so
        a group of ties never straddles a bin edge: the exact zeros after a ReLU all land in one bin, and the
        bins that such a group spans stay empty. With distinct values every bin holds N/bins samples (+-1).
    A constant channel is all code 0 under both rules. Deterministic, independent of the input float dtype.
    """
    bins = _check_bins(bins)
    _check_choice("binning", binning, BINNINGS)
    return _discretize(_as_acts(acts), bins, binning, torch.long)


# ----------------------------------------------------------------------------- entropies from counts


def _xlogx_table(n: int, device) -> tuple[torch.Tensor, int]:
    """(t, shift): t[k] = round(k log k * 2^shift) as int64 for k = 0..n.

    A table turns n log n into a gather. Fixed point makes the sums exact integers (so independent of their
    order); a sum over one contingency table is at most N log N, which 2^shift keeps below 2^62.
    """
    shift = 62 - max(0, math.ceil(math.log2(n * math.log(n))))
    k = torch.arange(n + 1, dtype=torch.float64, device=device)
    return torch.round(torch.special.xlogy(k, k) * 2.0**shift).long(), shift


def _entropy_from_sums(s: torch.Tensor, table: torch.Tensor, shift: int, occupied: torch.Tensor | None,
                       bias: str) -> torch.Tensor:
    """Entropy (float64) from s = sum_cells table[n_cell]; Miller-Madow adds (m - 1) / 2N, m = occupied.

    H = log N - s / N = (N log N - s) / N, subtracted in fixed point: exactly 0 for a constant channel.
    """
    n = table.numel() - 1
    h = (table[n] - s).double() * (2.0**-shift / n)
    if bias == "miller-madow":
        h = h + (occupied.double() - 1) / (2 * n)
    return h


def _marginal_counts(codes: torch.Tensor, bins: int) -> torch.Tensor:
    """counts [C, bins] (int64) of every code in every channel of codes [N, C]."""
    n, c = codes.shape
    counts = torch.empty(c, bins, dtype=torch.int64, device=codes.device)
    step = max(1, _CHUNK_ELEMENTS // n)
    for c0 in range(0, c, step):
        cc = codes[:, c0 : c0 + step].long()
        cc = cc + torch.arange(cc.shape[1], device=codes.device) * bins  # a separate code range per channel
        counts[c0 : c0 + step] = torch.bincount(cc.flatten(), minlength=cc.shape[1] * bins).view(-1, bins)
    return counts


# ----------------------------------------------------------------------------- exact joint counts


def _onehot_t(codes: torch.Tensor, bins: int) -> torch.Tensor:
    """codes [n, c] -> transposed one-hot int8 [c*bins, n]: row j*bins + b is 1 where channel j has code b."""
    levels = torch.arange(bins, dtype=codes.dtype, device=codes.device).view(1, bins, 1)
    # contiguous [c, 1, n] first, else the comparison inherits transposed strides and flatten must copy
    onehot = codes.T.contiguous().unsqueeze(1) == levels  # [c, bins, n] bool
    return onehot.view(torch.int8).flatten(0, 1)  # bool -> int8 is a free view


def _int_mm_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T for int8 a [p, n], b [q, n] -> int32 [p, q], zero-padded to shapes cuBLAS int8 GEMM accepts
    (more than 16 rows, inner and column sizes multiples of 8); zero rows and columns add no counts."""
    p, n = a.shape
    q = b.shape[0]
    pad_n = -n % 8
    a = torch.nn.functional.pad(a, (0, pad_n, 0, max(17 - p, 0)))
    b = torch.nn.functional.pad(b, (0, pad_n, 0, -q % 8))
    return torch._int_mm(a, b.T)[:p, :q]


def _gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact a @ b.T -> int32 [p, q] for 0/1 int8 a [p, n], b [q, n], n < 2^24."""
    if a.device.type == "cpu":
        return torch._int_mm(a, b.T)  # oneDNN VNNI kernel, any shape; this layout measured fastest
    if a.device.type == "cuda":
        try:
            return _int_mm_padded(a, b)
        except RuntimeError:  # no int8 GEMM for this GPU or build: take the float route
            pass
    return (a.float() @ b.float().T).round_().int()  # exact: 0/1 products, integer sums < 2^24


def _blocks(n: int, c: int, bins: int, memory_budget: int) -> tuple[int, int]:
    """(tokens per one-hot chunk, channels per count block) within the budget. cb channels a block: the lower
    triangle inside the diagonal block is wasted (~cb / 2C of the work), C/16 keeps that small while the
    products stay large."""
    chunk = max(8, min(n, _FP32_EXACT - 1, memory_budget // 2 // (c * bins)))
    cb = max(1, min(math.ceil(c / 16), memory_budget // 2 // (_BYTES_PER_CELL * bins * bins * c)))
    return chunk, cb


def pairwise_mi_bytes(n: int, c: int, bins: int = 16, estimator: str = "histogram",
                      memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Peak bytes (an upper estimate) of `pairwise_mi` on n samples of c channels, so that a caller can refuse
    a size that cannot fit before computing anything: the budget bounds the joint counts only, and a block is
    never less than one channel, [c*bins, bins] cells, however many bins."""
    chunk, cb = _blocks(n, c, bins, memory_budget)
    total = n * c * (8 + (1 if bins <= 256 else 4)) + 16 * c * bins + 8 * (n + 1) + 4 * 8 * c * c
    if estimator == "gaussian":
        return total + 16 * n * c
    return total + 16 * _CHUNK_ELEMENTS + min(chunk, n) * c * bins + _BYTES_PER_CELL * c * bins * cb * bins


def _joint_entropies(codes: torch.Tensor, bins: int, bias: str, memory_budget: int, table: torch.Tensor,
                     shift: int) -> torch.Tensor:
    """H(i, j) [C, C] float64 (symmetric, on the device of codes) of every pair of channels of codes [N, C];
    table, shift: the fixed-point n log n of `_xlogx_table`.

    memory_budget bounds the working set: the int8 one-hot codes [C*bins, N] (all of them when they fit in
    half the budget, else one token chunk at a time) plus one block of counts [C*bins, cb*bins] with its
    n log n (~16 bytes a cell) in the other half. A block is never less than one channel, [C*bins, bins].
    """
    n, c = codes.shape
    hxy = torch.empty(c, c, dtype=torch.float64, device=codes.device)
    chunk, cb = _blocks(n, c, bins, memory_budget)
    onehot = _onehot_t(codes, bins) if chunk >= n else None  # fits: encode once, reuse for every block

    for i0 in range(0, c, cb):
        bi, bj = min(cb, c - i0), c - i0
        counts = None  # [bj*bins, bi*bins]: n_ab of pairs (j, i), j in [i0, C), i in [i0, i0 + bi)
        for t0 in range(0, n, chunk):
            x = onehot[i0 * bins :] if onehot is not None else _onehot_t(codes[t0 : t0 + chunk, i0:], bins)
            part = _gram(x, x[: bi * bins])
            counts = part if counts is None else counts.add_(part)
        s = table.index_select(0, counts.flatten()).view(bj, bins, bi, bins).sum(dim=(1, 3))  # [bj, bi]
        occupied = (counts > 0).view(bj, bins, bi, bins).sum(dim=(1, 3)) if bias == "miller-madow" else None
        h = _entropy_from_sums(s, table, shift, occupied, bias)  # [bj, bi]
        hxy[i0:, i0 : i0 + bi] = h
        hxy[i0 : i0 + bi, i0:] = h.T  # H(i, j) and H(j, i) sum the same integers: equal to the bit
        del counts, s, occupied, h
    return hxy


# ----------------------------------------------------------------------------- estimators


def _gaussian_mi(acts: torch.Tensor) -> torch.Tensor:
    """MI = -1/2 log(1 - rho^2) [C, C] from the correlations of acts [N, C]; rho = 0 for constant channels."""
    x = acts.double()
    x = x - x.mean(dim=0)
    sd = x.norm(dim=0)
    inv = torch.where(sd > 0, 1 / sd, torch.zeros_like(sd))
    rho = (x.T @ x) * inv[:, None] * inv[None, :]
    rho = (rho + rho.T) / 2  # exactly symmetric
    # duplicated channels have rho^2 = 1: the floor keeps their MI finite (<= 13.8 nats)
    return -0.5 * torch.log((1 - rho.square()).clamp_(min=1e-12))


def _normalize(mi: torch.Tensor, h: torch.Tensor, normalize: str) -> torch.Tensor:
    """NMI [C, C] = MI / mean(H_i, H_j) for the chosen mean; 0 where that mean is 0 (constant channels)."""
    hi, hj = h[:, None], h[None, :]
    if normalize == "arithmetic":
        den = (hi + hj) / 2
    elif normalize == "geometric":
        den = torch.sqrt(hi * hj)
    elif normalize == "min":
        den = torch.minimum(hi, hj)
    else:
        den = torch.maximum(hi, hj)
    den = den.expand_as(mi)
    return torch.where(den > 0, mi / torch.where(den > 0, den, 1.0), 0.0)


def pairwise_mi(acts, bins: int = 16, binning: str = "quantile", bias: str = "none",
                normalize: str = "arithmetic", estimator: str = "histogram", device=None,
                memory_budget: int = DEFAULT_MEMORY_BUDGET) -> MIResult:
    """Mutual information of every pair of channels of activations acts [N samples, C channels].

    acts: torch tensor (any float dtype, any device) or numpy array [N, C]; N >= 2, all finite.
    bins, binning: the discretisation, see `discretize`.
    bias: "none" (plug-in) or "miller-madow": every entropy gets + (m - 1) / 2N, m = occupied cells.
    normalize: NMI = MI / mean(H_i, H_j) with the arithmetic (2 MI / (H_i + H_j)), geometric, min or max mean.
    estimator: "histogram" (exact plug-in on the bin codes) or "gaussian": MI = -1/2 log(1 - rho^2) from the
        Pearson correlations, a cheap comparison. Its entropies (diagonal, NMI normalisers) are still those of
        the binned channels, and its NMI is not bounded by 1.
    device: where to compute; None = the device of acts. The results are returned on the CPU.
    memory_budget: bytes for the joint-count stage: the int8 one-hot codes (or a token chunk of them) and one
        row block of counts with its scratch; the [C*bins, C*bins] count matrix is never built. The
        activations, their codes [N, C] and the [C, C] outputs come on top.

    Returns MIResult: mi [C, C] (nats, symmetric, diagonal = entropy), nmi [C, C] (diagonal 1, or 0 for a
    constant channel), entropy [C], float64 on the CPU. A constant channel has entropy 0, MI 0 and NMI 0.
    The plug-in MI is clipped at 0 (it is >= 0 but for rounding, as in sklearn); Miller-Madow MI can be < 0.
    """
    bins = _check_bins(bins)
    _check_choice("binning", binning, BINNINGS)
    _check_choice("bias", bias, BIASES)
    _check_choice("normalize", normalize, NORMALIZATIONS)
    _check_choice("estimator", estimator, ESTIMATORS)
    if not isinstance(memory_budget, (int, np.integer)) or memory_budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
    acts = _as_acts(acts, device)
    n = acts.shape[0]

    codes = _discretize(acts, bins, binning, torch.uint8 if bins <= 256 else torch.int32)
    marginals = _marginal_counts(codes, bins)
    table, shift = _xlogx_table(n, codes.device)
    s = table.index_select(0, marginals.flatten()).view(-1, bins).sum(dim=1)
    h = _entropy_from_sums(s, table, shift, (marginals > 0).sum(dim=1), bias)

    if estimator == "gaussian":
        del codes
        mi = _gaussian_mi(acts)
    else:
        hxy = _joint_entropies(codes, bins, bias, int(memory_budget), table, shift)
        mi = (h[:, None] + h[None, :]).sub_(hxy)  # h_i + h_j first: exactly symmetric
        del hxy
        if bias == "none":
            mi.clamp_(min=0)
    mi.diagonal().copy_(h)  # MI(i, i) = H(i), exactly

    nmi = _normalize(mi, h, normalize)
    nmi.diagonal().copy_((h > 0).double())
    return MIResult(mi=mi.cpu(), nmi=nmi.cpu(), entropy=h.cpu(), estimator=estimator, bins=bins,
                    n_samples=n)


# ----------------------------------------------------------------------------- scalar API


def _codes_1d(x, bins: int, binning: str) -> torch.Tensor:
    x = torch.from_numpy(x) if isinstance(x, np.ndarray) else torch.as_tensor(x)
    if x.dim() != 1:
        raise ValueError(f"x must be 1-D [N], got shape {tuple(x.shape)}")
    return discretize(x[:, None], bins, binning)[:, 0].cpu()


def _entropy_of_codes(codes: torch.Tensor, bias: str) -> float:
    """Entropy (nats) of the empirical distribution of integer codes [N], one term per occupied cell."""
    counts = torch.bincount(codes)
    counts = counts[counts > 0].double()
    n = codes.numel()
    h = float(-(counts / n * torch.log(counts / n)).sum())
    if bias == "miller-madow":
        h += (counts.numel() - 1) / (2 * n)
    return h


def entropy(x, bins: int = 16, *, binning: str = "quantile", bias: str = "none") -> float:
    """Entropy (nats) of the binned 1-D activations x [N]."""
    _check_choice("bias", bias, BIASES)
    return _entropy_of_codes(_codes_1d(x, bins, binning), bias)


def joint_entropy(x, y, bins: int = 16, *, binning: str = "quantile", bias: str = "none") -> float:
    """Joint entropy (nats) of the 1-D activations x [N] and y [N], each binned on its own."""
    _check_choice("bias", bias, BIASES)
    cx, cy = _codes_1d(x, bins, binning), _codes_1d(y, bins, binning)
    if cx.numel() != cy.numel():
        raise ValueError(f"x and y need the same number of samples, got {cx.numel()} and {cy.numel()}")
    return _entropy_of_codes(cx * bins + cy, bias)


def compute_mutual_information(x, y, bins: int = 16, *, binning: str = "quantile", bias: str = "none",
                               normalize: str = "arithmetic") -> tuple[float, float]:
    """(MI, NMI) in nats of the binned 1-D activations x [N] and y [N]; NMI = 2 MI / (H(x) + H(y)) by default.

    The definitions of `pairwise_mi` (which does every pair of a layer at once), one pair at a time.
    """
    _check_choice("normalize", normalize, NORMALIZATIONS)
    hx, hy = entropy(x, bins, binning=binning, bias=bias), entropy(y, bins, binning=binning, bias=bias)
    mi = hx + hy - joint_entropy(x, y, bins, binning=binning, bias=bias)
    if bias == "none":
        mi = max(mi, 0.0)
    den = {"arithmetic": (hx + hy) / 2, "geometric": math.sqrt(hx * hy), "min": min(hx, hy),
           "max": max(hx, hy)}[normalize]
    return mi, (mi / den if den > 0 else 0.0)
