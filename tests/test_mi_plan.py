"""mi_plan.plan_layer: the per-layer plan against a brute-force allocation and its contract."""

import itertools

import numpy as np
import pytest
import torch

from miq.plan.mi_plan import PlanOptions, plan_layer


def _rtn_row(w: np.ndarray, bits: int) -> np.ndarray:
    """Asymmetric min-max round-to-nearest of one row, written out as in GPTQ's quantizer (a plain loop)."""
    maxq = 2**bits - 1
    lo, hi = min(w.min(), 0.0), max(w.max(), 0.0)
    scale = float(np.float16(np.float32(hi - lo) / np.float32(maxq)))  # stored as fp16
    zero = np.round(-lo / scale)
    return np.array([scale * (min(max(np.round(x / scale) + zero, 0), maxq) - zero) for x in w])


def _layer(rows=6, cols=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * torch.linspace(0.2, 3, rows)[:, None]
    X = torch.randn(200, cols, generator=g)
    H = 2 * X.T @ X / 200
    acts = torch.randn(300, rows, generator=g)
    return W, H, acts


def test_every_row_alone_matches_brute_force_allocation():
    W, H, acts = _layer()
    choices, budget = (2, 3, 4), 3.0
    plan = plan_layer("l", W, H, None, PlanOptions(groups="all", wbits=budget, bits_choices=choices, alloc_cost="rtn"))
    Wn, Hn = W.double().numpy(), H.double().numpy()
    cost = {(r, b): float((Wn[r] - _rtn_row(Wn[r], b)) @ Hn @ (Wn[r] - _rtn_row(Wn[r], b)))
            for r in range(len(Wn)) for b in choices}
    best = min((a for a in itertools.product(choices, repeat=len(Wn)) if sum(a) <= budget * len(Wn)),
               key=lambda a: sum(cost[r, b] for r, b in enumerate(a)))
    assert plan.labels.tolist() == list(range(len(Wn)))
    assert plan.group_bits.tolist() == list(best)
    assert plan.row_bits.tolist() == list(best)
    assert plan.nmi is None and plan.timing["mi_s"] == 0.0
    with pytest.raises(ValueError, match="trial"):  # obs costs need SparseGPT's trial passes
        plan_layer("l", W, H, None, PlanOptions(groups="all", wbits=budget, bits_choices=choices))


@pytest.mark.parametrize("cluster", ["spectral", "hierarchical", "random", "contiguous"])
def test_k_groups_within_budget(cluster):
    W, H, acts = _layer(rows=16, cols=8, seed=1)
    opts = PlanOptions(groups=4, cluster=cluster, wbits=3.5, bits_choices=(2, 3, 4, 5), alloc_cost="rtn")
    plan = plan_layer("l", W, H, acts if cluster != "contiguous" else None, opts)
    sizes = torch.bincount(plan.labels, minlength=4)
    assert plan.labels.shape == (16,) and int(plan.labels.max()) == 3 and bool((sizes > 0).all())
    assert float((sizes * plan.group_bits).sum()) <= 3.5 * 16
    assert set(plan.group_bits.tolist()) <= {2, 3, 4, 5}
    assert (plan.nmi is None) == (cluster == "contiguous")  # contiguous groups need no MI
    if cluster == "contiguous":
        assert plan.labels.tolist() == [g for g in range(4) for _ in range(4)]


def test_k_above_rows_is_clipped_and_shared_strategy_ties_rows():
    W, H, acts = _layer(rows=5, cols=8, seed=2)
    plan = plan_layer("l", W, H, acts, PlanOptions(groups=50, wbits=4, bits_choices=(2, 3, 4, 5), alloc_cost="rtn"))
    assert sorted(plan.labels.tolist()) == list(range(5))
    opts = PlanOptions(groups=2, strategy="shared", wbits=4, bits_choices=(3, 4, 5), alloc_cost="rtn")
    shared = plan_layer("l", W, H, acts, opts)
    q = shared.quantizer()
    assert torch.equal(q.row_groups, shared.labels)
    q.find_params(W, weight=True)
    for g in range(2):  # one scale/zero per group
        rows = shared.labels == g
        assert q.scale[rows].unique().numel() == 1 and q.zero[rows].unique().numel() == 1
