"""Group a layer's output channels (rows of W [out, in]) by the mutual information of their activations.

Channels in the same group are meant to be redundant, so they can share quantization parameters and
bit-widths. Everything here takes a normalized-mutual-information matrix nmi [C, C] (e.g. from
``mutual_info.pairwise_mi``) and returns labels [C] in [0, K) with K = min(k, C), all groups non-empty,
renumbered canonically: group ids follow each group's smallest channel index, so labels from different
methods or runs compare directly.

Methods:
  spectral      scikit-learn SpectralClustering on the NMI matrix as a precomputed affinity.
  hierarchical  SciPy complete linkage on the distance 1 - NMI, cut to exactly K clusters.
  random        spectral's group sizes with uniformly random membership: the control for "does MI matter".
  contiguous    consecutive rows, as the reference quantizer's row grouping (sizes differ by at most one).
  range         not by MI: k-means on each channel's range features (``range_groups``; RPTQ's criterion).
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.sparse.csgraph import laplacian
from scipy.spatial.distance import squareform

from miq.options import GROUPINGS

ASSIGN_LABELS = ("cluster_qr", "kmeans", "discretize")

# Constant channels have NMI 0 with everything and would be isolated nodes; a disconnected graph makes the
# spectral embedding degenerate (one zero eigenvalue per component, sklearn warns). A uniform floor keeps
# the graph connected. In the normalized Laplacian an isolated node then links uniformly to every other
# node, so it sits at the embedding's centroid and joins some group instead of demanding a cluster of
# its own. 1e-6 is far below the estimation bias of any binned NMI (~1e-3 and up), so it does not move
# real structure.
AFFINITY_FLOOR = 1e-6


def _as_nmi(nmi) -> np.ndarray:
    """Validate and convert an NMI matrix (torch or numpy) [C, C] to float64 numpy."""
    if isinstance(nmi, torch.Tensor):
        nmi = nmi.detach().cpu().double().numpy()
    a = np.asarray(nmi, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"NMI matrix must be square [C, C], got shape {tuple(a.shape)}")
    if a.shape[0] == 0:
        raise ValueError("NMI matrix is empty (C = 0)")
    n_nan = int(np.isnan(a).sum())
    if n_nan:
        raise ValueError(f"NMI matrix has {n_nan} NaN entries")
    return a


def _symmetric(a: np.ndarray) -> np.ndarray:
    """(A + Aᵀ) / 2 clipped to [0, 1] with a unit diagonal [C, C]."""
    s = np.clip((a + a.T) / 2, 0.0, 1.0)
    np.fill_diagonal(s, 1.0)
    return s


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Renumber labels [C] so that group ids increase with each group's smallest channel index."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.ravel()]


def _fiedler_halves(aff: np.ndarray) -> np.ndarray:
    """Boolean mask [n] of one half of a balanced spectral bisection of an affinity block [n, n], n >= 2."""
    n = aff.shape[0]
    if n == 2:
        return np.array([True, False])
    lap = laplacian(aff, normed=True)
    _, vec = scipy.linalg.eigh(lap, subset_by_index=[0, 1])
    f = vec[:, 1]
    # an eigenvector's sign is arbitrary; fix it so the split does not depend on the LAPACK build
    if f[np.argmax(np.abs(f))] < 0:
        f = -f
    order = np.argsort(f, kind="stable")
    mask = np.zeros(n, dtype=bool)
    mask[order[: n // 2]] = True
    return mask


def _split_to_k(labels: np.ndarray, aff: np.ndarray, k: int) -> np.ndarray:
    """Split groups until there are exactly k non-empty ones (k <= C).

    Rule: repeatedly take the largest group (ties: lowest canonical id) and bisect it in two halves of
    sizes floor(n/2) and ceil(n/2) along the Fiedler vector of its own affinity block, i.e. the MI-aware
    balanced cut. The label assignment can leave some of the k clusters empty (discretize often does,
    cluster_qr rarely); this keeps the contract of exactly k groups and only refines the groups found.
    """
    labels = _canonical(labels)
    while labels.max() + 1 < k:
        sizes = np.bincount(labels)
        g = int(np.argmax(sizes))
        members = np.flatnonzero(labels == g)
        half = _fiedler_halves(aff[np.ix_(members, members)])
        labels = labels.copy()
        labels[members[half]] = labels.max() + 1
        labels = _canonical(labels)
    return labels


def _spectral(a: np.ndarray, k: int, seed: int, assign_labels: str) -> np.ndarray:
    # scikit-learn is imported where it is used: its import (pandas, pyarrow) took 1.3 of the 3 s that every
    # opt_mi.py process, a --help or a refused flag included, spent starting
    from sklearn.cluster import SpectralClustering

    aff = np.maximum(_symmetric(a), AFFINITY_FLOOR)
    # arpack (shift-invert) is sklearn's default and, on dense NMI matrices, the solver that converged
    # every time; lobpcg was 2-4x faster at C = 3072 but stopped with unconverged eigenpairs
    # (residuals ~1), and amg needs pyamg.
    model = SpectralClustering(
        n_clusters=k,
        affinity="precomputed",
        assign_labels=assign_labels,
        eigen_solver="arpack",
        random_state=seed,
    )
    labels = model.fit(aff).labels_
    return _split_to_k(labels, aff, k)


def _hierarchical(a: np.ndarray, k: int) -> np.ndarray:
    dist = 1.0 - _symmetric(a)
    np.fill_diagonal(dist, 0.0)
    z = linkage(squareform(dist, checks=False), method="complete")
    # cut_tree gives exactly k clusters for a monotone linkage (complete is); fcluster maxclust may give
    # fewer when merge heights tie
    return cut_tree(z, n_clusters=k).ravel()


def _random(a: np.ndarray, k: int, seed: int, assign_labels: str) -> np.ndarray:
    sizes = np.bincount(_spectral(a, k, seed, assign_labels))
    perm = np.random.RandomState(seed).permutation(a.shape[0])
    labels = np.empty(a.shape[0], dtype=np.int64)
    labels[perm] = np.repeat(np.arange(len(sizes)), sizes)
    return labels


def contiguous_labels(c: int, k: int) -> np.ndarray:
    """Labels [c] of k consecutive blocks; the first c % k blocks are one row larger."""
    k = min(k, c)
    sizes = np.full(k, c // k, dtype=np.int64)
    sizes[: c % k] += 1
    return np.repeat(np.arange(k), sizes)


def group_channels(
    nmi, k: int, method: str = "spectral", seed: int = 0, assign_labels: str = "cluster_qr"
) -> torch.Tensor:
    """Partition C channels into exactly min(k, C) non-empty groups.

    Args:
        nmi: [C, C] normalized mutual information (torch or numpy, float), values in [0, 1]; it is
            symmetrised in float64, so a one-sided estimate is fine.
        k: requested number of groups, >= 1. k >= C puts every channel alone, k == 1 all together.
        method: one of GROUPINGS.
        seed: random_state of the clusterer and the permutation of ``random``.
        assign_labels: SpectralClustering's label assignment ("cluster_qr", "kmeans", "discretize");
            cluster_qr is deterministic and gives balanced groups.

    Returns:
        LongTensor [C] of canonical labels in [0, min(k, C)).
    """
    a = _as_nmi(nmi)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if method not in GROUPINGS:
        raise ValueError(f"unknown grouping method {method!r}; expected one of {GROUPINGS}")
    if assign_labels not in ASSIGN_LABELS:
        raise ValueError(f"unknown assign_labels {assign_labels!r}; expected one of {ASSIGN_LABELS}")
    c = a.shape[0]
    k = min(int(k), c)

    if k == c:
        labels = np.arange(c)
    elif k == 1:
        labels = np.zeros(c, dtype=np.int64)
    elif method == "spectral":
        labels = _spectral(a, k, seed, assign_labels)
    elif method == "hierarchical":
        labels = _hierarchical(a, k)
    elif method == "random":
        labels = _random(a, k, seed, assign_labels)
    else:
        labels = contiguous_labels(c, k)

    labels = _canonical(labels)
    if labels.max() + 1 != k:  # a broken invariant, not a user error
        raise RuntimeError(f"{method} grouping produced {labels.max() + 1} groups instead of {k}")
    return torch.from_numpy(labels.astype(np.int64))


def range_groups(features, k: int, seed: int = 0) -> torch.Tensor:
    """Exactly min(k, C) groups of channels with similar ranges: k-means (scikit-learn, seeded, 10 starts) on
    features [C, d] standardised per column, as RPTQ groups channels by their (min, max).

    Rows of W are described by their (min, max) (what a shared grid must cover); input columns by
    log max|w| over rows and log diag H (how large their weights are and how much they matter). K-means can
    leave a cluster empty on tied points; the largest group is then split in halves along its first feature
    until there are exactly k, so the contract matches group_channels'. Returns canonical labels [C].
    """
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    x = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if x.ndim != 2 or len(x) == 0 or not np.isfinite(x).all():
        raise ValueError(f"range features must be a finite [C >= 1, d] array, got shape {x.shape}")
    c = len(x)
    k = min(int(k), c)
    sd = x.std(0)
    z = (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)
    if k == c:
        labels = np.arange(c)
    elif k == 1:
        labels = np.zeros(c, dtype=np.int64)
    else:
        with warnings.catch_warnings():  # tied points leave clusters empty: handled below
            warnings.simplefilter("ignore", ConvergenceWarning)
            labels = KMeans(n_clusters=k, random_state=seed, n_init=10).fit(z).labels_
        labels = _canonical(labels)
        while labels.max() + 1 < k:  # empty clusters on ties: split the largest group along feature 0
            g = int(np.argmax(np.bincount(labels)))
            members = np.flatnonzero(labels == g)
            half = members[np.argsort(z[members, 0], kind="stable")[len(members) // 2:]]
            labels = labels.copy()
            labels[half] = labels.max() + 1
            labels = _canonical(labels)
    return torch.from_numpy(_canonical(labels).astype(np.int64))


def row_range_features(W: torch.Tensor) -> torch.Tensor:
    """[R, 2]: every row's (min, max), the range a shared grid must cover."""
    return torch.stack([W.min(1).values, W.max(1).values], dim=1)


def column_range_features(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """[C, 2]: every input column's log max |w| over rows and log diag H (tiny floor for dead columns)."""
    tiny = torch.finfo(torch.float32).tiny
    return torch.stack([W.abs().max(0).values.clamp(min=tiny).log(), torch.diag(H).clamp(min=tiny).log()], dim=1)


def group_stats(nmi, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean NMI inside and across groups, on the symmetrised matrix (A + Aᵀ) / 2.

    Args:
        nmi: [C, C] NMI matrix (torch or numpy).
        labels: [C] integer group labels in [0, K).

    Returns:
        (nmi_intra [K], nmi_inter [K]) float64: nmi_intra[g] is the mean over pairs i != j both in g
        (NaN for a singleton or empty group); nmi_inter[g] the mean between members of g and channels
        outside g (NaN if g holds every channel or is empty).
    """
    a = _as_nmi(nmi)
    c = a.shape[0]
    lab = torch.from_numpy(_as_labels(labels, c))
    a = torch.from_numpy((a + a.T) / 2)
    k = int(lab.max()) + 1
    # scatter-adds rather than one-hot matmuls: O(C²) instead of O(C²·K), which matters at K = C
    to_group = torch.zeros(k, c, dtype=torch.float64).index_add_(0, lab, a)  # [K, C] summed over members
    own = to_group[lab, torch.arange(c)]  # [C]: NMI of each channel to its own group, itself included
    inside = torch.zeros(k, dtype=torch.float64).index_add_(0, lab, own)  # ordered pairs, diagonal too
    diag = torch.zeros(k, dtype=torch.float64).index_add_(0, lab, a.diagonal())
    n = torch.bincount(lab, minlength=k).double()
    pairs_in = n * (n - 1)
    pairs_out = n * (c - n)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    intra = torch.where(pairs_in > 0, (inside - diag) / pairs_in.clamp(min=1), nan)
    inter = torch.where(pairs_out > 0, (to_group.sum(1) - inside) / pairs_out.clamp(min=1), nan)
    return intra, inter


def _as_labels(labels, c: int) -> np.ndarray:
    """Validate labels [c] of non-negative integers and return them as int64 numpy."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    lab = np.asarray(labels)
    if lab.shape != (c,):
        raise ValueError(f"labels must have shape ({c},), got {tuple(lab.shape)}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {lab.dtype}")
    if lab.min() < 0:
        raise ValueError("labels must be >= 0")
    return lab.astype(np.int64)
