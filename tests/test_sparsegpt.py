"""SparseGPT against an independent textbook OBS loop (``conftest.obs_loop``).

The reference loop never forms a Cholesky factor and never batches columns: it keeps the full inverse
Hessian of the not-yet-processed columns and eliminates one column at a time by a Schur complement,
applying the OBS update dW = -(w_i - q_i) / [H^-1]_ii * H^-1[i, :] immediately. The block-Cholesky
implementation must give the same weights.
"""

import pytest
import torch
from conftest import obs_loop
from scipy import stats
from torch import nn

from miq.errors import LayerInputError
from miq.sampling import RowSampler
from quant import Quantizer, quantize
from sparsegpt_mi import SparseGPT, magnitude_prune


def _layer_and_inputs(rows=48, cols=256, n=12, seqlen=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(rows, cols, generator=g) * (1 + torch.rand(cols, generator=g)))
    # correlated inputs so H is far from diagonal, plus a few heavy channels, as in real activations
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    X = torch.randn(n, seqlen, cols, generator=g) @ mix
    X[..., :4] *= 8
    return layer, X


def _run(layer, X, bits=None, groupsize=-1, **kw):
    gpt = SparseGPT(layer, "test.layer")
    for j in range(X.shape[0]):
        gpt.add_batch(X[j : j + 1], layer(X[j : j + 1]))
    H = gpt.H.clone()
    W0 = layer.weight.data.clone()
    if bits is not None:
        gpt.quantizer = Quantizer()
        gpt.quantizer.configure(bits, perchannel=True, sym=False)
    gpt.fasterprune(groupsize=groupsize, **kw)
    return W0, H, layer.weight.data


def test_hessian_is_two_over_n_sum_xxt():
    layer, X = _layer_and_inputs(n=5)
    gpt = SparseGPT(layer)
    for j in range(5):
        gpt.add_batch(X[j : j + 1], layer(X[j : j + 1]))
    flat = X.reshape(-1, X.shape[-1]).double()
    expected = 2 / 5 * flat.t() @ flat
    assert torch.allclose(gpt.H.double(), expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize(
    "kw",
    [
        dict(sparsity=0.5),
        dict(sparsity=0.0, prunen=2, prunem=4),
        dict(sparsity=0.5, bits=4),
        dict(sparsity=0.0, bits=3),
        dict(sparsity=0.5, bits=4, groupsize=32),
        dict(sparsity=0.0, bits=4, groupsize=96),  # groups straddle the 128-column blocks
        dict(sparsity=0.6, blocksize=64),
    ],
    ids=["unstructured50", "2:4", "50%+4bit", "3bit", "50%+4bit-g32", "4bit-g96", "60%-block64"],
)
def test_matches_independent_obs_loop(kw):
    layer, X = _layer_and_inputs()
    W0, H, Wq = _run(layer, X, **kw)
    ref = obs_loop(W0, H, **kw)
    assert torch.equal(Wq == 0, ref == 0)
    assert (Wq.double() - ref).abs().max().item() <= 1e-4


def test_two_four_pattern_and_sparsity():
    layer, X = _layer_and_inputs()
    _, _, W = _run(layer, X, sparsity=0.0, prunen=2, prunem=4)
    zeros = (W.reshape(W.shape[0], -1, 4) == 0).sum(-1)
    assert torch.all(zeros == 2)


def test_unstructured_sparsity_is_on_target():
    layer, X = _layer_and_inputs()
    _, _, W = _run(layer, X, sparsity=0.5)
    assert abs((W == 0).float().mean().item() - 0.5) < 0.005


def test_joint_quantization_levels_and_exact_zeros():
    layer, X = _layer_and_inputs()
    _, _, W = _run(layer, X, sparsity=0.5, bits=4)
    for row in W:
        assert torch.unique(row).numel() <= 16
    assert abs((W == 0).float().mean().item() - 0.5) < 0.01


def test_sparsegpt_beats_magnitude_on_layer_output_error():
    layer, X = _layer_and_inputs()
    W0 = layer.weight.data.clone()
    _, _, W = _run(layer, X, sparsity=0.5)
    Wm = W0.clone()
    Wm[magnitude_prune(W0, 0.5)] = 0
    flat = X.reshape(-1, X.shape[-1])
    err_s = ((flat @ (W - W0).t()) ** 2).sum()
    err_m = ((flat @ (Wm - W0).t()) ** 2).sum()
    assert err_s < 0.7 * err_m


def test_strategy_b_same_bits_equals_uniform_bit_for_bit():
    layer, X = _layer_and_inputs()
    layer2 = nn.Linear(layer.in_features, layer.out_features, bias=False)
    layer2.weight.data.copy_(layer.weight.data)
    _, _, W_uniform = _run(layer, X, sparsity=0.5, bits=4)
    gpt = SparseGPT(layer2)
    for j in range(X.shape[0]):
        gpt.add_batch(X[j : j + 1], layer2(X[j : j + 1]))
    gpt.quantizer = Quantizer()
    gpt.quantizer.configure(torch.full((layer2.out_features,), 4), sym=False)  # per-row bits, all 4
    gpt.fasterprune(0.5)
    assert torch.equal(W_uniform, layer2.weight.data)


def test_cholesky_failure_raises_damping():
    layer = nn.Linear(2, 3, bias=False)
    gpt = SparseGPT(layer, "odd")
    gpt.H = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # indefinite, positive diagonal
    gpt.nsamples = 1
    gpt.fasterprune(0.0)
    assert gpt.percdamp_used is not None and gpt.percdamp_used > 0.01
    assert torch.isfinite(layer.weight).all()


def test_nonfinite_inputs_name_the_layer():
    layer = nn.Linear(4, 3)
    gpt = SparseGPT(layer, "model.decoder.layers.3.fc1")
    x = torch.randn(1, 5, 4)
    x[0, 2, 1] = float("nan")
    with pytest.raises(LayerInputError, match="layers.3.fc1"):
        gpt.add_batch(x, layer(x))


def test_linears_fed_one_tensor_share_its_increment_bit_for_bit():
    """q, k and v see the very same input tensor: the second and third add the first's x x^T (``last``), and
    their Hessians equal those of linears accumulating alone, bit for bit. Another tensor at the same count,
    or the same tensor at another count, gets its own increment."""
    layer, X = _layer_and_inputs(rows=8, cols=32, n=5, seqlen=16)
    alone, shared, last = SparseGPT(layer, "alone"), [SparseGPT(layer, n) for n in "qkv"], []
    reused = 0
    for j in range(X.shape[0]):
        x = X[j : j + 1].clone()
        alone.add_batch(x.clone(), None)
        for g in shared:
            before = last[1] if last else None
            g.add_batch(x, None, last)
            reused += last[1] is before
    assert reused == 2 * X.shape[0] and all(torch.equal(g.H, alone.H) for g in shared)

    def own(windows_before):
        g = SparseGPT(layer, "own")
        for _ in range(windows_before):
            g.add_batch(X[0:1], None)
        return g

    y = X[1:2].clone()
    last = []
    own(0).add_batch(X[0:1].clone(), None, last)  # last: another tensor at count 1
    a, b = own(0), own(0)
    a.add_batch(y, None, last)
    b.add_batch(y, None)
    assert torch.equal(a.H, b.H)
    a, b = own(2), own(2)  # y again, now at count 3
    a.add_batch(y, None, last)
    b.add_batch(y, None)
    assert torch.equal(a.H, b.H)


def test_compressed_weights_go_into_the_loaded_storage():
    layer, X = _layer_and_inputs(rows=8, cols=32, n=4, seqlen=16)
    ptr = layer.weight.data_ptr()
    W0, _, W = _run(layer, X, sparsity=0.5)
    assert layer.weight.data_ptr() == ptr and not torch.equal(W, W0) and float((W == 0).float().mean()) == 0.5


def test_row_sampler_is_exact_uniform_subset():
    total, k = 1000, 37
    s = RowSampler(total, k, seed=3)
    data = torch.arange(total, dtype=torch.float32)[:, None].repeat(1, 2)
    for lo in range(0, total, 64):  # rows arrive in uneven chunks
        s.add(data[lo : lo + 64])
    got = s.samples()[:, 0].long()
    assert got.numel() == k and torch.equal(got, s.keep)
    assert len(set(got.tolist())) == k
    # uniform: across seeds every row is picked about k/total of the time
    counts = torch.zeros(total)
    for seed in range(300):
        counts[RowSampler(total, k, seed).keep] += 1
    # early and late rows equally likely (a first-k or chunk-biased sampler fails this)
    per_decile = counts.reshape(10, 100).sum(1).numpy()
    assert stats.chisquare(per_decile).pvalue > 1e-3


def test_quantize_keeps_zero_exact_and_uses_at_most_2b_levels():
    torch.manual_seed(0)
    W = torch.randn(16, 100)
    W[:, ::4] = 0
    for bits in (2, 3, 4, 8):
        q = Quantizer()
        q.configure(bits, perchannel=True, sym=False)
        q.find_params(W, weight=True)
        Q = quantize(W, q.scale, q.zero, q.maxq)
        assert torch.all(Q[W == 0] == 0)
        assert max(torch.unique(r).numel() for r in Q) <= 2**bits


def test_find_params_takes_weights_only():
    q = Quantizer()
    q.configure(4, perchannel=True, sym=False)
    with pytest.raises(ValueError, match="weight=True"):
        q.find_params(torch.randn(3, 5))
