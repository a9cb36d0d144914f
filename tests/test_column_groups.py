"""Issue 10, the loop: column groups of any shape (g_idx), act-order with static groups, per-group widths;
checked against the textbook OBS loop (conftest.obs_loop) run in the same order."""

import pytest
import torch
from conftest import obs_loop
from torch import nn

from miq.options import PassOptions
from quant import Quantizer
from sparsegpt_mi import SparseGPT, layer_error


def _gpt(rows=24, cols=96, seed=0, outliers=3) -> SparseGPT:
    """A layer with correlated inputs and a few heavy input channels, its Hessian accumulated."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(rows, cols, generator=g))
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    X = torch.randn(8, 32, cols, generator=g) @ mix
    heavy = torch.randperm(cols, generator=g)[:outliers]  # not the first columns: act-order must find them
    X[..., heavy] *= 10
    gpt = SparseGPT(layer, "test.layer")
    for j in range(8):
        gpt.add_batch(X[j : j + 1], layer(X[j : j + 1]))
    return gpt


def _quantize(gpt: SparseGPT, bits: int = 3, **kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W0 as loaded, H, W after fasterprune with a bits-wide per-row quantizer and kw)."""
    W0, H = gpt.layer.weight.data.clone(), gpt.H.clone()
    q = Quantizer()
    q.configure(bits, perchannel=True, sym=False)
    _prune(gpt, q, **kw)
    return W0, H, gpt.layer.weight.data


def _prune(gpt: SparseGPT, q: Quantizer | None, **kw) -> None:
    """SparseGPT.prune with PassOptions from kw (blocksize 32 unless given) and the column-group keywords."""
    groups = {k: kw.pop(k) for k in ("g_idx", "group_bits", "mask") if k in kw}
    gpt.prune(PassOptions(**{"blocksize": 32, **kw}), q, **groups)


CASES = [
    dict(act_order=True),
    dict(act_order=True, sparsity=0.5),
    dict(act_order=True, groupsize=32),
    dict(act_order=True, groupsize=32, prunen=2, prunem=4),
    dict(g_idx="shuffled"),
    dict(g_idx="shuffled", sparsity=0.5),
    dict(g_idx="shuffled", act_order=True),
    dict(g_idx="shuffled", group_bits=True),
    dict(g_idx="shuffled", group_bits=True, act_order=True, sparsity=0.5),
]


@pytest.mark.parametrize("kw", CASES, ids=[",".join(k for k in c) for c in CASES])
def test_matches_the_textbook_loop_in_the_same_order(kw):
    kw = dict(kw)
    gpt = _gpt()
    ref = {}
    if kw.get("g_idx") == "shuffled":  # 5 groups of uneven sizes, columns scattered
        kw["g_idx"] = torch.randint(0, 5, (96,), generator=torch.Generator().manual_seed(1))
        ref["g_idx"] = kw["g_idx"]
    if kw.pop("group_bits", False):
        kw["group_bits"] = torch.tensor([2, 4, 3, 5, 3])
        ref["group_bits"] = kw["group_bits"]
    H = gpt.H.clone()
    W0, _, W = _quantize(gpt, **kw)
    order = gpt.perm
    if kw.get("act_order"):
        assert order is not None and torch.equal(order, torch.sort(torch.diag(H), descending=True, stable=True)[1])
    expected = obs_loop(W0, H, bits=3, blocksize=32, order=order, static=kw.get("act_order", False) and (
        "g_idx" in kw or "groupsize" in kw), **ref, **{k: v for k, v in kw.items() if k in (
            "sparsity", "groupsize", "prunen", "prunem")})
    assert (W.double() - expected).abs().max() < 1e-4


def test_act_order_lowers_the_loss_with_outlier_inputs():
    """No pruning, no groups: quantizing the heavy input channels first lets the rest absorb their error."""
    for seed in range(3):
        natural, ordered = _gpt(seed=seed), _gpt(seed=seed)
        W0, H, Wn = _quantize(natural)
        _, _, Wa = _quantize(ordered, act_order=True)
        W0d, Hd = natural.prepare(0.01)
        assert float(layer_error(W0d, Wa, Hd).sum()) < float(layer_error(W0d, Wn, Hd).sum()), seed


def test_groupsize_equals_the_same_groups_given_as_g_idx():
    a, b = _gpt(), _gpt()
    _, _, Wa = _quantize(a, groupsize=32, sparsity=0.5)
    _, _, Wb = _quantize(b, g_idx=torch.arange(96) // 32, sparsity=0.5)
    assert torch.equal(Wa, Wb)
    assert a.result.n_param_sets == b.result.n_param_sets == 24 * 3


def test_permutation_round_trip_leaves_an_unquantized_unpruned_layer_unchanged():
    gpt = _gpt()
    W0 = gpt.layer.weight.data.clone()
    _prune(gpt, None, g_idx=torch.randint(0, 4, (96,)), act_order=True)
    assert gpt.perm is not None
    assert torch.allclose(gpt.layer.weight.data, W0, atol=1e-6) and not gpt.result.mask.any()


def test_every_row_and_group_holds_at_most_2_to_the_bits_values():
    gpt = _gpt()
    g_idx = torch.randint(0, 5, (96,), generator=torch.Generator().manual_seed(2))
    bits = torch.tensor([2, 4, 3, 5, 3])
    _, _, W = _quantize(gpt, g_idx=g_idx, group_bits=bits, act_order=True, sparsity=0.5)
    for g in range(5):
        for row in W[:, g_idx == g]:
            assert torch.unique(row).numel() <= 2 ** int(bits[g])
    r = gpt.result
    assert torch.equal(torch.log2(r.maxq + 1).round().long(), bits.expand(24, 5))
