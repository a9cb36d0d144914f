"""Tests for mutual_info.py (and miq.run.figures).

References are independent of the code under test: sklearn's `mutual_info_score` /
`normalized_mutual_info_score` on the same bin codes, scipy entropies of np.unique counts, numpy formulas.
"""

import math

import matplotlib.image
import numpy as np
import pytest
import torch
from scipy.stats import entropy as scipy_entropy
from sklearn.metrics import mutual_info_score, normalized_mutual_info_score

import mutual_info
from miq.run.figures import plot_grouping_result, plot_nmi_heatmap
from mutual_info import (
    MIResult,
    compute_mutual_information,
    discretize,
    entropy,
    joint_entropy,
    pairwise_mi,
)


def structured_acts(n: int, c: int, seed: int = 0) -> torch.Tensor:
    """[n, c] float32: shared latent factors, ReLU ties, heavy tails, coarse ties, a constant channel."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 6, generator=g)
    w = torch.randn(6, c, generator=g) * (torch.rand(6, c, generator=g) < 0.4)
    x = z @ w + 0.7 * torch.randn(n, c, generator=g)
    x[:, 0::3] = torch.relu(x[:, 0::3])
    x[:, 1::5] = torch.sinh(2 * x[:, 1::5])
    x[:, 2::7] = torch.round(2 * x[:, 2::7]) / 2
    x[:, c // 2] = 3.0
    return x


def sklearn_mi_matrix(codes: np.ndarray) -> np.ndarray:
    """MI [C, C] from sklearn one pair at a time; diagonal = scipy entropy of the channel's codes."""
    c = codes.shape[1]
    ref = np.zeros((c, c))
    for i in range(c):
        ref[i, i] = scipy_entropy(np.unique(codes[:, i], return_counts=True)[1])
        for j in range(i + 1, c):
            ref[i, j] = ref[j, i] = mutual_info_score(codes[:, i], codes[:, j])
    return ref


def occupied(*cols: np.ndarray) -> int:
    return len(np.unique(np.stack(cols, axis=1), axis=0))


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("binning", ["quantile", "uniform"])
def test_every_pair_equals_sklearn(binning):
    x = structured_acts(3000, 24, seed=1)  # 24 channels: several count blocks (C/16 channels each)
    res = pairwise_mi(x, bins=16, binning=binning)
    ref = sklearn_mi_matrix(discretize(x, 16, binning).numpy())
    np.testing.assert_allclose(res.mi.numpy(), ref, rtol=0, atol=1e-9)
    np.testing.assert_allclose(res.entropy.numpy(), np.diag(ref), rtol=0, atol=1e-9)


def test_miller_madow_equals_brute_force():
    x = structured_acts(1500, 20, seed=2)
    n, c = x.shape
    res = pairwise_mi(x, bins=12, bias="miller-madow")
    codes = discretize(x, 12).numpy()
    m = [occupied(codes[:, i]) for i in range(c)]
    for i in range(c):
        h = scipy_entropy(np.unique(codes[:, i], return_counts=True)[1]) + (m[i] - 1) / (2 * n)
        assert abs(res.entropy[i].item() - h) < 1e-9
        for j in range(i + 1, c):
            # H_i + H_j - H_ij with each entropy corrected by (cells - 1) / 2N
            m_ij = occupied(codes[:, i], codes[:, j])
            ref = mutual_info_score(codes[:, i], codes[:, j]) + (m[i] + m[j] - m_ij - 1) / (2 * n)
            assert abs(res.mi[i, j].item() - ref) < 1e-9


@pytest.mark.parametrize("normalize", ["arithmetic", "geometric", "min", "max"])
def test_nmi_equals_sklearn(normalize):
    x = structured_acts(2000, 20, seed=3)
    res = pairwise_mi(x, bins=16, normalize=normalize)
    codes = discretize(x, 16).numpy()
    for i in range(20):
        for j in range(20):
            if i == 20 // 2 or j == 20 // 2:  # the constant channel: sklearn's own convention differs
                assert res.nmi[i, j].item() == 0.0
                continue
            ref = normalized_mutual_info_score(codes[:, i], codes[:, j], average_method=normalize)
            assert abs(res.nmi[i, j].item() - ref) < 1e-9, (i, j)


@pytest.mark.parametrize("binning", ["quantile", "uniform"])
@pytest.mark.parametrize("bias", ["none", "miller-madow"])
def test_scalar_api_agrees_with_pairwise(binning, bias):
    x = structured_acts(1000, 12, seed=4)
    res = pairwise_mi(x, bins=10, binning=binning, bias=bias, normalize="geometric")
    for i, j in [(0, 1), (1, 4), (2, 9), (3, 3), (5, 6), (6, 11)]:
        mi, nmi = compute_mutual_information(x[:, i], x[:, j], bins=10, binning=binning, bias=bias,
                                             normalize="geometric")
        assert abs(mi - res.mi[i, j].item()) < 1e-12
        assert abs(nmi - res.nmi[i, j].item()) < 1e-12
        hi = entropy(x[:, i].numpy(), 10, binning=binning, bias=bias)
        assert abs(hi - res.entropy[i].item()) < 1e-12
        hij = joint_entropy(x[:, i], x[:, j], 10, binning=binning, bias=bias)
        assert abs(hij - (res.entropy[i] + res.entropy[j] - res.mi[i, j]).item()) < 1e-12
    # the arithmetic default: NMI = 2 MI / (H(x) + H(y))
    mi, nmi = compute_mutual_information(x[:, 0], x[:, 1])
    assert abs(nmi - 2 * mi / (entropy(x[:, 0]) + entropy(x[:, 1]))) < 1e-15


def test_joint_entropy_equals_scipy():
    x = structured_acts(800, 4, seed=5).numpy()
    cx, cy = discretize(x[:, :2], 8).numpy().T
    ref = scipy_entropy(np.unique(np.stack([cx, cy], 1), axis=0, return_counts=True)[1])
    assert abs(joint_entropy(x[:, 0], x[:, 1], 8) - ref) < 1e-12


# ----------------------------------------------------------------------------- memory bound, symmetry


def test_memory_bounded_path_is_identical(monkeypatch):
    x = structured_acts(1000, 24, seed=6)
    full = pairwise_mi(x, bins=16, bias="miller-madow", memory_budget=1 << 34)
    largest = []  # cells of every count product
    gram = mutual_info._gram

    def recording_gram(a, b):
        largest.append(a.shape[0] * b.shape[0])
        return gram(a, b)

    monkeypatch.setattr(mutual_info, "_gram", recording_gram)
    for budget in (1 << 17, 1 << 20):
        largest.clear()
        small = pairwise_mi(x, bins=16, bias="miller-madow", memory_budget=budget)
        assert torch.equal(small.mi, full.mi) and torch.equal(small.nmi, full.nmi)
        assert torch.equal(small.entropy, full.entropy)
        assert max(largest) < (24 * 16) ** 2  # never the full [C*bins, C*bins] count matrix
        if budget == 1 << 17:
            assert len(largest) > 24  # one-channel blocks, each over several token chunks


def test_permuting_channels_permutes_the_matrix():
    x = structured_acts(1500, 30, seed=7)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    res, res_p = pairwise_mi(x), pairwise_mi(x[:, perm])
    assert torch.equal(res_p.mi, res.mi[perm][:, perm])  # fixed-point sums: exact, not just close
    assert torch.equal(res_p.nmi, res.nmi[perm][:, perm])
    assert torch.equal(res_p.entropy, res.entropy[perm])


def test_result_contract():
    x = structured_acts(600, 16, seed=8)
    res = pairwise_mi(x.numpy().astype(np.float64), bins=8)
    assert isinstance(res, MIResult)
    assert (res.estimator, res.bins, res.n_samples) == ("histogram", 8, 600)
    for t, shape in ((res.mi, (16, 16)), (res.nmi, (16, 16)), (res.entropy, (16,))):
        assert t.shape == shape and t.dtype == torch.float64 and t.device.type == "cpu"
        assert torch.isfinite(t).all()
    assert torch.equal(res.mi, res.mi.T) and torch.equal(res.nmi, res.nmi.T)
    assert torch.equal(res.mi.diagonal(), res.entropy)
    assert (res.mi >= 0).all() and (res.nmi <= 1 + 1e-12).all()
    expected_diag = (res.entropy > 0).double()
    assert torch.equal(res.nmi.diagonal(), expected_diag) and expected_diag.sum() == 15
    # numpy float64 and torch float32 of the same values give the same result; so do float16 inputs
    assert torch.equal(pairwise_mi(x, bins=8).mi, res.mi)
    xh = x.clamp(-6e4, 6e4).half()  # sinh tails overflow float16
    assert torch.equal(pairwise_mi(xh, bins=8).mi, pairwise_mi(xh.float(), bins=8).mi)
    assert torch.equal(pairwise_mi(xh, bins=8, binning="uniform").mi,
                       pairwise_mi(xh.double(), bins=8, binning="uniform").mi)


def test_int_mm_padding_route_is_exact():
    # the CUDA path pads to the shapes cuBLAS int8 GEMM accepts; the padding logic is checked on CPU
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(5, 13, generator=g) < 0.5).to(torch.int8)
    b = (torch.rand(11, 13, generator=g) < 0.5).to(torch.int8)
    assert torch.equal(mutual_info._int_mm_padded(a, b), a.int() @ b.int().T)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    x = structured_acts(3000, 64, seed=9)
    cpu = pairwise_mi(x, bias="miller-madow")
    gpu = pairwise_mi(x.cuda(), bias="miller-madow")
    assert torch.equal(gpu.mi, cpu.mi) and torch.equal(gpu.entropy, cpu.entropy)
    # fp16 activations (as a fp16 model on CUDA gives them); scaled first: the heavy tails overflow fp16
    xh = (x / x.abs().amax()).half()
    assert torch.equal(pairwise_mi(xh, device="cuda").mi, pairwise_mi(xh).mi)


# ----------------------------------------------------------------------------- statistics


def test_miller_madow_removes_the_bias_of_independent_pairs():
    bins, n, c = 8, 512, 40  # N / bins^2 = 8
    x = torch.rand(n, c, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    off = ~torch.eye(c, dtype=torch.bool)
    plug_in = pairwise_mi(x, bins=bins).mi[off].mean().item()
    mm = pairwise_mi(x, bins=bins, bias="miller-madow").mi[off].mean().item()
    expected_bias = (bins - 1) ** 2 / (2 * n)  # first-order bias of the plug-in MI
    assert abs(plug_in - expected_bias) < 0.15 * expected_bias
    assert abs(mm) < 0.1 * expected_bias  # measured: 4% of it at N / bins^2 = 8


@pytest.mark.parametrize("rho", [0.3, 0.6, 0.9])
def test_histogram_mi_approaches_gaussian_mi(rho):
    g = torch.Generator().manual_seed(11)
    n = 400_000
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x = torch.stack([z[:, 0], rho * z[:, 0] + math.sqrt(1 - rho**2) * z[:, 1]], dim=1)
    exact = -0.5 * math.log(1 - rho**2)
    coarse = pairwise_mi(x, bins=8, binning="uniform", bias="miller-madow").mi[0, 1].item()
    fine = pairwise_mi(x, bins=64, binning="uniform", bias="miller-madow").mi[0, 1].item()
    assert abs(fine - exact) < 0.02 * exact + 2e-3
    assert abs(fine - exact) < abs(coarse - exact)  # finer bins get closer
    gauss = pairwise_mi(x, bins=64, estimator="gaussian")
    r = np.corrcoef(x.numpy().T)[0, 1]
    assert abs(gauss.mi[0, 1].item() + 0.5 * math.log(1 - r**2)) < 1e-12
    assert abs(gauss.mi[0, 1].item() - exact) < 0.01 * exact + 1e-3


# ----------------------------------------------------------------------------- edge cases and validation


@pytest.mark.parametrize("estimator", ["histogram", "gaussian"])
@pytest.mark.parametrize("normalize", ["arithmetic", "geometric", "min", "max"])
@pytest.mark.parametrize("binning", ["quantile", "uniform"])
def test_constant_channels(estimator, normalize, binning):
    x = structured_acts(500, 10, seed=12)
    x[:, 3] = 0.0
    x[:, 7] = -2.5
    for bias in ("none", "miller-madow"):
        res = pairwise_mi(x, bins=8, binning=binning, bias=bias, normalize=normalize, estimator=estimator)
        for t in (res.mi, res.nmi, res.entropy):
            assert torch.isfinite(t).all()
        for k in (3, 7, 10 // 2):
            assert res.entropy[k] == 0
            assert (res.mi[k] == 0).all() and (res.mi[:, k] == 0).all()
            assert (res.nmi[k] == 0).all() and (res.nmi[:, k] == 0).all()
        assert res.nmi.diagonal().sum() == 7
    mi, nmi = compute_mutual_information(x[:, 3], x[:, 0], normalize=normalize, binning=binning)
    assert (mi, nmi) == (0.0, 0.0) and entropy(x[:, 7], binning=binning) == 0.0


def test_nonfinite_input_raises():
    x = structured_acts(100, 10, seed=13)
    x[5, 2] = float("nan")
    x[7, 2] = float("inf")
    x[0, 4] = float("-inf")
    x[9, 8] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf in 3 of 10 channels"):
        pairwise_mi(x)
    with pytest.raises(ValueError, match="3 of 10"):
        discretize(x.numpy())
    with pytest.raises(ValueError, match="1 of 1"):
        entropy(x[:, 2])


@pytest.mark.parametrize("kwargs, match", [
    ({"bins": 1}, "bins"),
    ({"bins": 2.5}, "bins"),
    ({"binning": "equal"}, "binning"),
    ({"bias": "panzeri"}, "bias"),
    ({"normalize": "sqrt"}, "normalize"),
    ({"estimator": "ksg"}, "estimator"),
    ({"memory_budget": 0}, "memory_budget"),
])
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pairwise_mi(torch.randn(50, 4), **kwargs)


@pytest.mark.parametrize("acts", [torch.randn(50), torch.randn(2, 3, 4), torch.randn(1, 5), [[1.0, 2.0]]])
def test_bad_shapes_raise(acts):
    with pytest.raises(ValueError):
        pairwise_mi(acts)


def test_quantile_codes():
    n, bins = 1000, 16
    g = torch.Generator().manual_seed(14)
    x = torch.randn(n, 3, generator=g)
    x[:, 1] = torch.relu(x[:, 1])  # ~half exact zeros
    x[:, 2] = torch.randint(0, 5, (n,), generator=g).float()  # five values, heavy ties
    codes = discretize(x, bins)
    assert codes.dtype == torch.long and codes.min() >= 0 and codes.max() < bins
    # distinct values: equal-frequency bins
    assert set(torch.bincount(codes[:, 0], minlength=bins).tolist()) <= {n // bins, n // bins + 1}
    # the rule, value by value: code = floor(bins * #(values < v) / N)
    xn = x.numpy()
    for col in range(3):
        rank = (xn[None, :, col] < xn[:, None, col]).sum(axis=1)
        np.testing.assert_array_equal(codes[:, col].numpy(), bins * rank // n)
    # ties never straddle an edge: equal values have equal codes; all ReLU zeros share one bin
    for col in (1, 2):
        for v in np.unique(xn[:, col]):
            assert len(np.unique(codes[:, col].numpy()[xn[:, col] == v])) == 1
    zeros = xn[:, 1] == 0
    assert (codes[zeros, 1] == 0).all() and (codes[~zeros, 1] > 0).all()


def test_uniform_codes():
    x = torch.randn(500, 4, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    x[:, 3] = 1.0
    codes = discretize(x, 10, "uniform").numpy()
    xn = x.numpy()
    lo, hi = xn.min(0), xn.max(0)
    for col in range(3):
        ref = np.minimum(np.floor((xn[:, col] - lo[col]) * (10 / (hi[col] - lo[col]))), 9)
        np.testing.assert_array_equal(codes[:, col], ref)
    assert (codes[xn.argmax(0)[:3], range(3)] == 9).all() and (codes[:, 3] == 0).all()


# ----------------------------------------------------------------------------- plot


def test_plot_nmi_heatmap(tmp_path):
    res = pairwise_mi(structured_acts(500, 30, seed=16), bins=8)
    labels = np.arange(30) % 4
    path = tmp_path / "nmi.png"
    assert plot_nmi_heatmap(res.nmi, labels, path, title="test") == path
    img = matplotlib.image.imread(path)
    assert img.shape[0] >= 600 and img.shape[1] >= 800
    assert [p.name for p in tmp_path.iterdir()] == ["nmi.png"]  # no temporary file left behind
    with pytest.raises(ValueError):
        plot_nmi_heatmap(res.nmi, labels[:-1], tmp_path / "bad.png")


def test_grouping_result_png(tmp_path):
    import matplotlib.image as mpimg

    p = plot_grouping_result([5, 3, 8], [4, 2, 3], [0.5, None, 0.2], [0.1, 0.1, 0.05], tmp_path / "g.png", title="t")
    img = mpimg.imread(p)
    assert img.shape[1] >= 800 and img.shape[0] >= 600
    assert list(tmp_path.iterdir()) == [tmp_path / "g.png"]


def test_memory_estimate_bounds_what_was_measured_and_grows_with_bins():
    """pairwise_mi_bytes is what preflight refuses sizes on: above the peak RSS measured for 8192 samples of
    3072 channels (1.29 GiB, README), not wildly so, and quadratic in bins once a block is one channel."""
    gib = 2**30
    assert 1.29 * gib <= mutual_info.pairwise_mi_bytes(8192, 3072, 16) <= 3 * gib
    small, large = (mutual_info.pairwise_mi_bytes(128, 256, b) for b in (10_000, 100_000))
    assert 90 < large / small < 110
    assert mutual_info.pairwise_mi_bytes(8192, 3072, 16, "gaussian") < mutual_info.pairwise_mi_bytes(8192, 3072, 16)
