"""Issue 9: bits allocated on SparseGPT's own losses (trial passes), checked against the textbook OBS loop.

Every width's trial runs under the mask of one reference width; with the mask fixed, rows are independent,
so the layer compressed at any per-row choice of widths is the chosen rows of the trials, its loss is the
sum of their losses, and the knapsack on those losses minimises the true layer error.
"""

import pytest
import torch
from conftest import obs_loop
from torch import nn

from miq.options import PassOptions
from miq.plan import mi_plan
from miq.plan.trials import trial as run_trial
from quant import Quantizer
from sparsegpt_mi import SparseGPT, layer_error

CHOICES = [2, 3, 4, 5]


def _gpt(rows=24, cols=96, seed=0) -> SparseGPT:
    """A layer with correlated inputs and a few heavy input channels, its Hessian accumulated."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(rows, cols, generator=g) * torch.linspace(0.3, 3, rows)[:, None])
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    X = torch.randn(8, 32, cols, generator=g) @ mix
    X[..., :3] *= 6
    gpt = SparseGPT(layer, "test.layer")
    for j in range(8):
        gpt.add_batch(X[j : j + 1], layer(X[j : j + 1]))
    return gpt


@pytest.mark.parametrize("prune", [dict(sparsity=0.5), dict(prunen=2, prunem=4), dict(sparsity=0.0)],
                         ids=["50%", "2:4", "dense"])
def test_batched_trial_equals_separate_single_width_passes(prune):
    gpt = _gpt()
    W0, H = gpt.layer.weight.data.clone(), gpt.H.clone()
    trial = run_trial(gpt, CHOICES, 3, PassOptions(blocksize=32, **prune))
    # the reference width: exactly the plain SparseGPT pass at that width (mask chosen by itself)
    ref_W, ref_loss, ref_mask = obs_loop(W0, H, bits=3, blocksize=32, full=True, **prune)
    i3 = CHOICES.index(3)
    assert torch.equal(trial.mask, ref_mask)
    assert (trial.W[i3].double() - ref_W).abs().max() < 1e-4
    assert torch.allclose(trial.row_loss[i3].double(), ref_loss, rtol=1e-4, atol=1e-6)
    # every other width: a separate pass under that same mask
    for j, b in enumerate(CHOICES):
        W, loss, _ = obs_loop(W0, H, bits=b, mask=trial.mask, full=True)
        assert (trial.W[j].double() - W).abs().max() < 1e-4, b
        assert torch.allclose(trial.row_loss[j].double(), loss, rtol=1e-4, atol=1e-6), b
        assert bool((trial.W[j][trial.mask] == 0).all())


@pytest.mark.parametrize("strategy", ["independent", "shared"])
def test_final_rows_are_the_trial_rows_and_predicted_equals_incurred(strategy):
    gpt = _gpt(seed=1)
    W0, H = gpt.layer.weight.data.clone(), gpt.H.clone()
    acts = torch.randn(400, 24, generator=torch.Generator().manual_seed(5))
    opts = mi_plan.PlanOptions(groups=6, cluster="contiguous", strategy=strategy, wbits=3.5,
                               bits_choices=tuple(CHOICES))

    def trial(row_groups, g_idx):
        return run_trial(gpt, CHOICES, opts.uniform_bits, PassOptions(sparsity=0.5, blocksize=32),
                         row_groups=row_groups)

    plan = mi_plan.plan_layer("test.layer", W0.clone(), gpt.H, acts, opts, trial=trial)
    final = plan.trial.select(plan.row_bits)
    assert len(set(plan.group_bits.tolist())) > 1, "the test needs a mixed allocation"
    # a fresh pass with those per-row widths under the trial's mask gives the same rows
    if strategy == "independent":
        W, loss, _ = obs_loop(W0, H, bits=plan.row_bits, mask=plan.trial.mask, full=True)
        assert (final.W.double() - W).abs().max() < 1e-4
        assert float(loss.sum()) == pytest.approx(plan.predicted_loss, rel=1e-4)
    # what the knapsack counted on is what the layer incurs: 1/2 dW H dW^T of the final weights
    W0d, Hd = gpt.prepare(0.01)
    incurred = float(layer_error(W0d, final.W, Hd).sum())
    assert incurred == pytest.approx(plan.predicted_loss, rel=1e-3)
    assert float(final.row_loss.sum()) == pytest.approx(plan.predicted_loss, rel=1e-6)
    assert (final.mask.float().mean() - 0.5).abs() < 1e-9  # the fixed mask: exactly on target


def test_obs_costs_never_lose_to_rtn_costs_on_the_true_loss():
    for seed in range(3):
        losses = {}
        for cost in ("obs", "rtn"):
            gpt = _gpt(seed=seed)
            W0 = gpt.layer.weight.data.clone()
            opts = mi_plan.PlanOptions(groups="all", wbits=3.25, bits_choices=tuple(CHOICES), alloc_cost=cost)
            def trial(rg, gi, gpt=gpt, o=opts):
                return run_trial(gpt, CHOICES, o.uniform_bits, PassOptions(sparsity=0.5, blocksize=32), row_groups=rg)

            plan = mi_plan.plan_layer("l", W0.clone(), gpt.H, None, opts, trial=trial)
            W0d, Hd = gpt.prepare(0.01)
            losses[cost] = float(layer_error(W0d, plan.trial.select(plan.row_bits).W, Hd).sum())
            assert float((plan.row_bits.float()).mean()) <= 3.25
        assert losses["obs"] <= losses["rtn"] * (1 + 1e-6), (seed, losses)


def test_single_width_mask_is_exactly_on_target():
    gpt = _gpt(rows=24, cols=96)
    gpt.quantizer = Quantizer()
    gpt.quantizer.configure(3, perchannel=True, sym=False)
    gpt.fasterprune(0.5, blocksize=32)
    assert int(gpt.result.mask.sum()) == 24 * 96 // 2


def test_a_shared_group_must_have_one_width():
    q = Quantizer()
    with pytest.raises(ValueError, match="one bit-width"):
        q.configure(torch.tensor([3, 3, 4, 4]), row_groups=torch.tensor([0, 0, 0, 1]))
    q.configure(torch.tensor([3, 3, 4, 4]), row_groups=torch.tensor([0, 0, 1, 1]))  # one width per group: fine
    W = torch.randn(4, 10)
    q.find_params(W, weight=True)
    assert q.n_param_sets() == 2
    assert len({(float(s), float(z)) for s, z in zip(q.scale.flatten(), q.zero.flatten(), strict=True)}) == 2
