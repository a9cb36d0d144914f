import itertools
import warnings

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

import channel_grouping as cg
from miq import options

N_SOURCES, PER_SOURCE, N_SAMPLES, N_BINS = 4, 6, 4000, 16


def _quantile_codes(x: np.ndarray, bins: int) -> np.ndarray:
    edges = np.quantile(x, np.linspace(0, 1, bins + 1)[1:-1])
    return np.searchsorted(edges, x, side="right")


def _binned_nmi(acts: np.ndarray, bins: int = N_BINS) -> np.ndarray:
    """Reference NMI [C, C]: sklearn's score on quantile-binned codes, pair by pair."""
    codes = [_quantile_codes(acts[:, j], bins) for j in range(acts.shape[1])]
    c = acts.shape[1]
    nmi = np.eye(c)
    for i, j in itertools.combinations(range(c), 2):
        nmi[i, j] = nmi[j, i] = normalized_mutual_info_score(codes[i], codes[j])
    return nmi


@pytest.fixture(scope="session")
def latent():
    """NMI of channels driven by N_SOURCES independent sources through monotone nonlinearities.

    Returns (nmi [C, C], truth [C]) with the channels shuffled, so source membership is not contiguous.
    """
    rng = np.random.default_rng(0)
    sources = rng.standard_normal((N_SAMPLES, N_SOURCES))
    fs = [np.tanh, lambda s: s**3, lambda s: np.maximum(s, 0), np.exp]
    cols, truth = [], []
    for j in range(N_SOURCES * PER_SOURCE):
        src = j // PER_SOURCE
        y = fs[j % len(fs)](sources[:, src] * rng.uniform(0.5, 2.0))
        y = (y - y.mean()) / y.std()
        cols.append(y + 0.1 * rng.standard_normal(N_SAMPLES))
        truth.append(src)
    perm = rng.permutation(len(cols))
    acts = np.stack(cols, 1)[:, perm]
    return _binned_nmi(acts), np.asarray(truth)[perm]


def _random_nmi(c: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).random((c, c))
    a = (a + a.T) / 2
    np.fill_diagonal(a, 1.0)
    return a


def _assert_valid(labels: torch.Tensor, c: int, k: int) -> None:
    assert labels.dtype == torch.int64 and labels.shape == (c,)
    lab = labels.numpy()
    kk = min(k, c)
    assert lab.min() == 0 and lab.max() == kk - 1
    assert len(np.unique(lab)) == kk
    # canonical: group ids appear in order of first occurrence
    _, first = np.unique(lab, return_index=True)
    assert (np.diff(first) > 0).all()


@pytest.mark.parametrize("method", options.GROUPINGS)
def test_exactly_min_k_c_groups(method):
    for c in (1, 2, 5, 12, 30):
        dead = _random_nmi(c, c)
        dead[: c // 3] = 0  # constant channels: zero NMI with everything (disconnected graph)
        dead[:, : c // 3] = 0
        for nmi in (_random_nmi(c, c), dead, np.zeros((c, c))):
            for k in sorted({1, 2, 3, max(c - 1, 1), c, c + 3}):
                _assert_valid(cg.group_channels(nmi, k, method), c, k)


def test_k_extremes():
    nmi = _random_nmi(7, 0)
    for method in options.GROUPINGS:
        assert cg.group_channels(nmi, 1, method).tolist() == [0] * 7
        assert cg.group_channels(nmi, 7, method).tolist() == list(range(7))
        assert cg.group_channels(nmi, 50, method).tolist() == list(range(7))


def test_contiguous_sizes():
    assert cg.group_channels(_random_nmi(10, 0), 4, "contiguous").tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    for c, k in [(768, 50), (3072, 7), (13, 13), (5, 2)]:
        lab = cg.group_channels(np.zeros((c, c)), k, "contiguous").numpy()
        sizes = np.bincount(lab)
        assert (np.diff(lab) >= 0).all()
        assert sizes.max() - sizes.min() <= 1
        assert (sizes[: c % k] == c // k + 1).all() and (sizes[c % k :] == c // k).all()


def test_random_keeps_spectral_sizes(latent):
    nmi, _ = latent
    for k in (3, 4, 7):
        spec = cg.group_channels(nmi, k, "spectral", seed=1).numpy()
        rand = cg.group_channels(nmi, k, "random", seed=1).numpy()
        assert sorted(np.bincount(rand)) == sorted(np.bincount(spec))
        assert adjusted_rand_score(spec, rand) < 0.5
    other = cg.group_channels(nmi, 4, "random", seed=2).numpy()
    assert not np.array_equal(other, cg.group_channels(nmi, 4, "random", seed=1).numpy())


@pytest.mark.parametrize("method", options.GROUPINGS)
def test_same_seed_same_labels(method, latent):
    nmi, _ = latent
    a = cg.group_channels(nmi, 5, method, seed=3)
    b = cg.group_channels(torch.from_numpy(nmi).float(), 5, method, seed=3)
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["spectral", "hierarchical"])
def test_recovers_latent_sources(method, latent):
    nmi, truth = latent
    labels = cg.group_channels(nmi, N_SOURCES, method, seed=0).numpy()
    assert adjusted_rand_score(truth, labels) == 1.0


@pytest.mark.parametrize("method", ["contiguous", "random"])
def test_controls_do_not_recover_sources(method, latent):
    nmi, truth = latent
    labels = cg.group_channels(nmi, N_SOURCES, method, seed=0).numpy()
    assert adjusted_rand_score(truth, labels) < 0.5


def test_spectral_disconnected_graph():
    """Dead channels (NMI 0 to all) must not warn, nor break the live channels' clusters."""
    rng = np.random.default_rng(0)
    block = np.repeat([0, 1], [8, 8])
    nmi = 0.02 * rng.random((16, 16)) + 0.7 * (block[:, None] == block[None, :])
    nmi = np.pad(nmi, ((0, 4), (0, 4)))  # four constant channels at the end
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        labels = cg.group_channels(nmi, 2, "spectral").numpy()
    assert adjusted_rand_score(block, labels[:16]) == 1.0


def test_split_to_k_bisects_the_largest_group():
    aff = cg._symmetric(_random_nmi(11, 4))
    labels = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    out = cg._split_to_k(labels, aff, 3)
    assert len(np.unique(out)) == 3
    assert sorted(np.bincount(out[:7])) == [3, 4]  # the 7-group is cut into floor/ceil halves
    assert len(np.unique(out[7:])) == 1 and out[7] not in out[:7]
    out5 = cg._split_to_k(labels, aff, 5)
    assert len(np.unique(out5)) == 5
    # refinement only: each new group lies inside an old one
    for g in np.unique(out5):
        assert len(np.unique(labels[out5 == g])) == 1


def test_split_keeps_k_when_assignment_returns_fewer():
    # discretize often leaves clusters empty on these matrices; group_channels must still return k
    for seed in range(15):
        c = 10 + seed
        nmi = np.random.default_rng(seed).random((c, c)) ** 4
        k = c // 2
        _assert_valid(cg.group_channels(nmi, k, "spectral", assign_labels="discretize"), c, k)


def test_hierarchical_is_complete_linkage_on_one_minus_nmi():
    nmi = _random_nmi(20, 5)  # continuous values: no tied merge heights, so fcluster is exact too
    z = linkage(squareform(1 - nmi, checks=False), method="complete")
    ref = fcluster(z, t=4, criterion="maxclust")
    assert adjusted_rand_score(ref, cg.group_channels(nmi, 4, "hierarchical").numpy()) == 1.0


def test_invalid_inputs():
    nmi = _random_nmi(5, 0)
    bad = nmi.copy()
    bad[1, 2] = bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NMI matrix has 2 NaN entries"):
        cg.group_channels(bad, 2)
    with pytest.raises(ValueError, match="square"):
        cg.group_channels(nmi[:4], 2)
    with pytest.raises(ValueError, match="square"):
        cg.group_channels(nmi[None], 2)
    with pytest.raises(ValueError, match="empty"):
        cg.group_channels(np.zeros((0, 0)), 1)
    for k in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="k must be"):
            cg.group_channels(nmi, k)
    with pytest.raises(ValueError, match="method"):
        cg.group_channels(nmi, 2, "kmeans")
    with pytest.raises(ValueError, match="assign_labels"):
        cg.group_channels(nmi, 2, assign_labels="qr")
    with pytest.raises(ValueError, match="NaN"):
        cg.group_stats(bad, np.zeros(5, dtype=int))
    with pytest.raises(ValueError, match="shape"):
        cg.group_stats(nmi, np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="integers"):
        cg.group_stats(nmi, np.zeros(5))


def test_group_stats_matches_loop():
    rng = np.random.default_rng(1)
    c = 13
    nmi = rng.random((c, c))  # deliberately asymmetric: stats use (A + Aᵀ) / 2
    labels = np.array([0, 1, 1, 2, 0, 2, 2, 3, 0, 1, 1, 2, 0])  # group 3 is a singleton
    intra, inter = cg.group_stats(torch.from_numpy(nmi), torch.from_numpy(labels))
    assert intra.dtype == torch.float64 and intra.shape == (4,)
    sym = (nmi + nmi.T) / 2
    for g in range(4):
        ins = [i for i in range(c) if labels[i] == g]
        outs = [i for i in range(c) if labels[i] != g]
        pairs = [sym[i, j] for i in ins for j in ins if i != j]
        cross = [sym[i, j] for i in ins for j in outs]
        if pairs:
            assert intra[g].item() == pytest.approx(np.mean(pairs), rel=1e-12)
        else:
            assert np.isnan(intra[g].item())
        assert inter[g].item() == pytest.approx(np.mean(cross), rel=1e-12)

    intra, inter = cg.group_stats(nmi, np.zeros(c, dtype=np.int64))
    assert intra[0].item() == pytest.approx(sym[~np.eye(c, dtype=bool)].mean(), rel=1e-12)
    assert np.isnan(inter[0].item())


def test_range_groups_rows_with_similar_ranges():
    """Rows drawn at three scales (and one skewed family) come back as their four families, whatever order."""
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([1.0, 4.0, 12.0, 4.0])
    family = torch.randint(0, 4, (60,), generator=g)
    W = torch.randn(60, 400, generator=g) * scales[family][:, None]
    W[family == 3] = W[family == 3].abs()  # the scale of family 1, but all positive: another range
    labels = cg.range_groups(cg.row_range_features(W), 4, seed=0)
    assert adjusted_rand_score(family.numpy(), labels.numpy()) == 1.0
    assert torch.equal(labels, cg.range_groups(cg.row_range_features(W), 4, seed=0))  # seeded
    assert int(labels.max()) == 3 and labels.shape == (60,)


def test_range_groups_always_give_exactly_k():
    x = torch.zeros(10, 2)
    x[5:] = 1.0  # two distinct points only: k-means leaves clusters empty, the split fills them
    for k in (1, 2, 3, 7, 10, 12):
        labels = cg.range_groups(x, k, seed=1)
        assert len(torch.unique(labels)) == min(k, 10)


def test_column_range_features_follow_weight_scale_and_diag_h():
    W = torch.tensor([[1.0, -4.0, 0.0], [2.0, 1.0, 0.0]])
    H = torch.diag(torch.tensor([1.0, 9.0, 0.0]))
    f = cg.column_range_features(W, H)
    assert torch.allclose(f[:2], torch.log(torch.tensor([[2.0, 1.0], [4.0, 9.0]])))
    assert torch.isfinite(f).all()  # a dead column gets a tiny floor, not -inf
