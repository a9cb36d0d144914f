import itertools

import numpy as np
import pytest
import torch

import quant
from miq import options
from miq.plan import allocation as al
from miq.plan import knapsack

CHOICES = list(options.DEFAULT_BITS_CHOICES)


def _brute_force(costs: np.ndarray, sizes: np.ndarray, choices: list[int], budget: float):
    """(best objective, least total bits among optimal picks) by enumerating every combination."""
    best, best_bits = np.inf, None
    limit = budget * sizes.sum() + 1e-9
    for pick in itertools.product(range(len(choices)), repeat=len(sizes)):
        bits = int(sum(s * choices[j] for s, j in zip(sizes, pick, strict=True)))
        if bits > limit:
            continue
        obj = sum(costs[g, j] for g, j in enumerate(pick))
        if obj < best or (obj == best and bits < best_bits):
            best, best_bits = obj, bits
    return best, best_bits


def _random_instance(rng, integer_costs: bool):
    k = int(rng.integers(1, 6))
    choices = sorted(rng.choice(np.arange(1, 9), size=int(rng.integers(1, 5)), replace=False).tolist())
    sizes = rng.integers(1, 20, size=k)
    if integer_costs:  # exact float sums, so ties are real ties
        costs = rng.integers(0, 4, size=(k, len(choices))).astype(float)
    else:
        costs = rng.random((k, len(choices))) * rng.choice([1e-3, 1.0, 1e3])
    budget = float(rng.choice([rng.uniform(choices[0], choices[-1]), rng.choice(choices)]))
    return costs, sizes, choices, budget


@pytest.mark.parametrize("integer_costs", [False, True])
def test_allocate_bits_equals_brute_force(integer_costs):
    rng = np.random.default_rng(int(integer_costs))
    for _ in range(300):
        costs, sizes, choices, budget = _random_instance(rng, integer_costs)
        bits = al.allocate_bits(costs, sizes, choices, budget).numpy()
        assert bits.dtype == np.int64 and bits.shape == sizes.shape
        pick = [choices.index(b) for b in bits]
        obj = sum(costs[g, j] for g, j in enumerate(pick))
        total = int((sizes * bits).sum())
        assert total <= budget * sizes.sum() + 1e-9
        best, best_bits = _brute_force(costs, sizes, choices, budget)
        assert obj == pytest.approx(best, rel=1e-12, abs=0)
        if integer_costs:
            assert total == best_bits


def _weights_cap(sizes, choices, budget):
    """allocate_bits' knapsack: extra bits over the smallest width, before the gcd."""
    weights = np.asarray(sizes)[:, None] * (np.asarray(choices) - choices[0])[None, :]
    return weights, int(np.floor((budget - choices[0]) * np.sum(sizes) + 1e-9))


@pytest.mark.parametrize("integer_costs", [False, True])
def test_the_core_search_and_the_integer_program_equal_brute_force(monkeypatch, integer_costs):
    """Large tables go to knapsack.core (and HiGHS past its limit): both forced here on small instances,
    some groups keeping no weight at all. Integer costs make ties real: core then spends the fewest bits."""
    monkeypatch.setattr(al, "DP_MAX_CELLS", 0)
    rng = np.random.default_rng(10 + int(integer_costs))
    for _ in range(200):
        costs, sizes, choices, budget = _random_instance(rng, integer_costs)
        sizes[rng.random(len(sizes)) < 0.2] = 0
        if sizes.sum() == 0:
            sizes[0] = 1
        best, best_bits = _brute_force(costs, sizes, choices, budget)
        bits = al.allocate_bits(costs, sizes, choices, budget).numpy()
        assert int((sizes * bits).sum()) <= budget * sizes.sum() + 1e-9
        obj = sum(costs[g, choices.index(b)] for g, b in enumerate(bits))
        assert obj == pytest.approx(best, rel=1e-12, abs=0)
        if integer_costs:
            assert int((sizes * bits).sum()) == best_bits
        weights, cap = _weights_cap(sizes, choices, budget)
        picks = knapsack.milp(costs, weights, cap)
        assert weights[np.arange(len(sizes)), picks].sum() <= cap
        assert costs[np.arange(len(sizes)), picks].sum() == pytest.approx(best, rel=1e-9, abs=1e-12)


def _kept_count_instance(rng, k, degenerate=False):
    """Costs shaped like a layer's (each row's scale times 4^-bits), sizes like a sparse layer's kept counts.
    ``degenerate``: exactly proportional rows, so that many columns tie at the multiplier."""
    sizes = rng.integers(100, 400, size=k)
    noise = 1.0 if degenerate else 1 + 0.1 * rng.random((k, len(CHOICES)))
    scale = np.ones((k, 1)) if degenerate else rng.lognormal(0, 1, (k, 1))
    return scale * sizes[:, None] * 4.0 ** -np.asarray(CHOICES)[None, :] * noise, sizes


def test_the_core_search_equals_the_dp_and_the_integer_program_at_kept_count_scale(monkeypatch):
    """Kept counts of a sparse layer (gcd 1, hundreds per row): the DP (exact, slow at this size), the core
    search and HiGHS find the same optimal cost within the budget."""
    rng = np.random.default_rng(3)
    for k, budget, degenerate in ((40, 3.5, False), (300, 2.7, False), (300, 4.4, False), (120, 3.2, True)):
        costs, sizes = _kept_count_instance(rng, k, degenerate)
        dp = al.allocate_bits(costs, sizes, CHOICES, budget).numpy()
        with monkeypatch.context() as m:
            m.setattr(al, "DP_MAX_CELLS", 0)
            core = al.allocate_bits(costs, sizes, CHOICES, budget).numpy()
        weights, cap = _weights_cap(sizes, CHOICES, budget)
        ip = np.asarray(CHOICES)[knapsack.milp(costs, weights, cap)]

        def cost(bits, costs=costs):
            return sum(costs[g, CHOICES.index(b)] for g, b in enumerate(bits))

        for bits in (core, ip):
            assert (sizes * bits).sum() <= budget * sizes.sum()
            assert cost(bits) == pytest.approx(cost(dp), rel=1e-12)


@pytest.mark.slow
def test_the_core_search_equals_the_integer_program_at_layer_scale():
    """fc1-sized tables (3072 rows), too large for the DP here: the core search and HiGHS agree, at
    budgets across the range."""
    rng = np.random.default_rng(4)
    for budget in (2.4, 3.5, 5.1):
        costs, sizes = _kept_count_instance(rng, 3072)
        weights, cap = _weights_cap(sizes, CHOICES, budget)
        rows = np.arange(len(sizes))
        core, ip = knapsack.core(costs, weights, cap), knapsack.milp(costs, weights, cap)
        assert weights[rows, core].sum() <= cap
        assert costs[rows, core].sum() == pytest.approx(costs[rows, ip].sum(), rel=1e-12)


def test_allocate_charges_kept_weights():
    """With kept counts, a group's size is its channels' kept weights summed (a plain loop here)."""
    rng = np.random.default_rng(5)
    labels = torch.as_tensor(rng.integers(0, 4, size=12))
    labels[:4] = torch.arange(4)  # no empty group
    kept = torch.as_tensor(rng.integers(0, 30, size=12))
    costs = torch.as_tensor(rng.random((4, len(CHOICES))))
    sizes = np.zeros(4, dtype=np.int64)
    for c, g in enumerate(labels.tolist()):
        sizes[g] += int(kept[c])
    got = al.allocate("hessian", labels, costs, CHOICES, 3.7, kept=kept)
    assert torch.equal(got, al.allocate_bits(costs, sizes, CHOICES, 3.7))
    assert float((sizes * got.numpy()).sum()) <= 3.7 * sizes.sum()
    with pytest.raises(ValueError, match="kept"):
        al.allocate("hessian", labels, costs, CHOICES, 3.7, kept=kept.float())


def test_never_exceeds_budget_at_scale():
    rng = np.random.default_rng(7)
    for _ in range(20):
        k = int(rng.integers(1, 300))
        sizes = rng.integers(1, 100, size=k)
        # realistic shape: error shrinks ~4x per extra bit, groups differ in sensitivity
        costs = rng.random((k, 1)) * 4.0 ** -np.asarray(CHOICES)[None, :] * sizes[:, None]
        budget = float(rng.uniform(2, 8))
        bits = al.allocate_bits(torch.from_numpy(costs), torch.from_numpy(sizes), CHOICES, budget).numpy()
        assert (sizes * bits).sum() <= budget * sizes.sum() + 1e-9
        assert set(bits.tolist()) <= set(CHOICES)


def test_budget_rounding_allows_exact_fit():
    # (3.3 - 3) * 10 evaluates to 2.9999999999999982; the 3-row group upgrading to 4 bits uses exactly 33
    bits = al.allocate_bits(np.array([[10.0, 0.0], [1.0, 1.0]]), np.array([3, 7]), [3, 4], 3.3)
    assert bits.tolist() == [4, 3]


def test_per_channel_scale():
    rows = 3072
    rng = np.random.default_rng(0)
    costs = rng.random((rows, 1)) * 4.0 ** -np.asarray(CHOICES)[None, :]
    bits = al.allocate_bits(costs, np.ones(rows, dtype=np.int64), CHOICES, 3.5).numpy()
    assert bits.sum() <= 3.5 * rows
    assert bits.sum() >= 3.5 * rows - 2  # with that many cheap upgrades the budget is used up


def test_ties_take_fewest_bits():
    bits = al.allocate_bits(np.zeros((4, 3)), np.array([1, 2, 3, 4]), [2, 4, 8], 8.0)
    assert bits.tolist() == [2, 2, 2, 2]
    # the 8-bit option buys nothing over 4 bits
    bits = al.allocate_bits(np.array([[5.0, 1.0, 1.0]]), np.array([1]), [2, 4, 8], 8.0)
    assert bits.tolist() == [4]


def test_allocate_bits_invalid():
    costs, sizes = np.ones((2, 3)), np.array([1, 2])
    for budget in (1.9, 8.5, float("nan")):
        with pytest.raises(ValueError, match=r"bit budget .* \[2, 8\]"):
            al.allocate_bits(costs, sizes, [2, 4, 8], budget)
    for choices in ([], [4, 2, 8], [2, 2, 8], [0, 2, 4], [2, 4, 17], [2, 4.5, 8]):
        with pytest.raises(ValueError, match="choices"):
            al.allocate_bits(np.ones((2, max(len(choices), 1))), sizes, choices, 4)
    bad = costs.copy()
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match="1 NaN"):
        al.allocate_bits(bad, sizes, [2, 4, 8], 4)
    with pytest.raises(ValueError, match=">= 0"):
        al.allocate_bits(-costs, sizes, [2, 4, 8], 4)
    with pytest.raises(ValueError, match=">= 0"):
        al.allocate_bits(costs * np.inf, sizes, [2, 4, 8], 4)
    with pytest.raises(ValueError, match="sizes"):
        al.allocate_bits(costs, np.array([0, 0]), [2, 4, 8], 4)
    with pytest.raises(ValueError, match="sizes"):
        al.allocate_bits(costs, np.array([-1, 2]), [2, 4, 8], 4)
    with pytest.raises(ValueError, match="sizes"):
        al.allocate_bits(costs, np.array([1.0, 2.0]), [2, 4, 8], 4)
    with pytest.raises(ValueError, match="sizes"):
        al.allocate_bits(costs, np.array([1, 2, 3]), [2, 4, 8], 4)
    with pytest.raises(ValueError, match="costs"):
        al.allocate_bits(np.ones((2, 2)), sizes, [2, 4, 8], 4)


def _layer(rows=9, cols=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * (1 + 3 * torch.rand(rows, 1, generator=g))
    X = torch.randn(64, cols, generator=g)
    X[:, 0] *= 10  # an outlier feature makes H far from isotropic
    H = X.T @ X / 64 + 0.01 * torch.eye(cols)
    return W, H


@pytest.mark.parametrize("strategy", options.STRATEGIES)
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("groupsize", [-1, 4])
def test_group_costs_matches_loop(strategy, sym, groupsize):
    W, H = _layer()
    labels = torch.tensor([0, 2, 1, 0, 2, 2, 1, 0, 2])
    costs = al.group_costs(W, H, labels, CHOICES, strategy=strategy, sym=sym, groupsize=groupsize)
    assert costs.dtype == torch.float64 and costs.shape == (3, len(CHOICES))
    h = H.double().numpy()
    ref = np.zeros((3, len(CHOICES)))
    for j, b in enumerate(CHOICES):
        groups = labels if strategy == "shared" else None
        q = quant.rtn(W, b, sym=sym, row_groups=groups, groupsize=groupsize).double().numpy()
        for r in range(W.shape[0]):
            e = W[r].double().numpy() - q[r]
            ref[labels[r], j] += e @ h @ e
    np.testing.assert_allclose(costs.numpy(), ref, rtol=1e-10, atol=0)


def test_group_costs_shared_differs_from_independent():
    W, H = _layer()
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])
    a = al.group_costs(W, H, labels, [3], strategy="shared")
    b = al.group_costs(W, H, labels, [3], strategy="independent")
    assert (a > b).all()  # one grid for rows of different ranges costs more


def test_group_costs_invalid():
    W, H = _layer()
    labels = torch.zeros(9, dtype=torch.long)
    with pytest.raises(ValueError, match="H must be"):
        al.group_costs(W, H[:4, :4], labels, CHOICES)
    with pytest.raises(ValueError, match="W must be"):
        al.group_costs(W[0], H, labels, CHOICES)
    with pytest.raises(ValueError, match="labels"):
        al.group_costs(W, H, labels[:5], CHOICES)
    with pytest.raises(ValueError, match="labels"):
        al.group_costs(W, H, labels.float(), CHOICES)
    with pytest.raises(ValueError, match="strategy"):
        al.group_costs(W, H, labels, CHOICES, strategy="tied")


def test_redundancy_factor_by_hand():
    nmi = np.array(
        [
            [1.0, 0.5, 0.2, 0.0, 0.1],
            [0.7, 1.0, 0.4, 0.0, 0.3],
            [0.2, 0.4, 1.0, 0.9, 0.0],
            [0.0, 0.0, 0.9, 1.0, 0.0],
            [0.1, 0.3, 0.0, 0.0, 1.0],
        ]
    )
    labels = torch.tensor([0, 0, 1, 1, 2])  # pairs: (0, 1) -> (0.5 + 0.7) / 2 = 0.6; (2, 3) -> 0.9
    f = al.redundancy_factor(nmi, labels, 2.0)
    np.testing.assert_allclose(f.numpy(), [0.4**2, 0.1**2, 1.0], rtol=1e-12)
    three = al.redundancy_factor(nmi, torch.tensor([0, 0, 0, 1, 1]), 1.0)
    np.testing.assert_allclose(three.numpy(), [1 - (0.6 + 0.2 + 0.4) / 3, 1.0], rtol=1e-12)
    assert torch.equal(al.redundancy_factor(nmi, labels, 0.0), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="alpha"):
        al.redundancy_factor(nmi, labels, -1.0)


def _layer_with_nmi(rows=24, cols=16, k=5, seed=1):
    W, H = _layer(rows, cols, seed)
    labels = torch.arange(rows) % k
    nmi = np.random.default_rng(seed).random((rows, rows))
    return W, H, labels, nmi


def _rtn(W, H, labels):
    """The RTN group costs plan_layer hands to allocate for --alloc-cost rtn."""
    return al.group_costs(W, H, labels, CHOICES) / 2


def test_hessian_mi_alpha_zero_equals_hessian():
    W, H, labels, nmi = _layer_with_nmi()
    costs = _rtn(W, H, labels)
    for budget in (2.0, 3.5, 4.25, 8.0):
        h = al.allocate("hessian", labels, costs, CHOICES, budget)
        assert torch.equal(al.allocate("hessian-mi", labels, costs, CHOICES, budget, nmi=nmi, alpha=0.0), h)


def test_hessian_mi_scales_costs():
    W, H, labels, nmi = _layer_with_nmi()
    costs = _rtn(W, H, labels)
    sizes = torch.bincount(labels)
    for alpha in (0.5, 3.0):
        factor = al.redundancy_factor(nmi, labels, alpha)
        ref = al.allocate_bits(costs * factor[:, None], sizes, CHOICES, 3.5)
        assert torch.equal(al.allocate("hessian-mi", labels, costs, CHOICES, 3.5, nmi=nmi, alpha=alpha), ref)
    default = al.allocate("hessian-mi", labels, costs, CHOICES, 3.5, nmi=nmi, alpha=None)
    explicit = al.allocate("hessian-mi", labels, costs, CHOICES, 3.5, nmi=nmi, alpha=options.DEFAULT_MI_ALPHA)
    assert torch.equal(default, explicit)
    with pytest.raises(ValueError, match="NMI"):
        al.allocate("hessian-mi", labels, costs, CHOICES, 3.5, alpha=1.0)
    # every row alone: all factors are one, so no NMI is needed and the result is plain hessian
    alone = torch.arange(W.shape[0])
    alone_costs = _rtn(W, H, alone)
    assert torch.equal(
        al.allocate("hessian-mi", alone, alone_costs, CHOICES, 3.5, alpha=1.0),
        al.allocate("hessian", alone, alone_costs, CHOICES, 3.5),
    )


def test_allocate_hessian_respects_budget_and_prefers_sensitive_groups():
    W, H, labels, _ = _layer_with_nmi()
    W[labels == 2] *= 20  # a group with much larger weights has much larger error at equal bits
    bits = al.allocate("hessian", labels, _rtn(W, H, labels), CHOICES, 3.5)
    assert bits.shape == (5,) and bits.dtype == torch.int64
    assert bits[labels].double().mean() <= 3.5
    assert bits[2] == bits.max()


def test_uniform():
    W, H, labels, _ = _layer_with_nmi()
    for budget, expect in [(3.5, 3), (2.0, 2), (7.9, 6), (8.0, 8)]:
        bits = al.allocate("uniform", labels, None, CHOICES, budget)
        assert bits.tolist() == [expect] * 5
    with pytest.raises(ValueError, match="bit budget"):
        al.allocate("uniform", labels, None, CHOICES, 1.5)


def test_allocate_invalid():
    W, H, labels, nmi = _layer_with_nmi()
    costs = _rtn(W, H, labels)
    with pytest.raises(ValueError, match="bit allocation"):
        al.allocate("greedy", labels, costs, CHOICES, 3.5, nmi=nmi)
    with pytest.raises(ValueError, match="empty"):
        al.allocate("hessian", labels * 2, costs, CHOICES, 3.5, nmi=nmi)
    with pytest.raises(ValueError, match="needs costs of shape"):
        al.allocate("hessian", labels, None, CHOICES, 3.5)
    with pytest.raises(ValueError, match="needs costs of shape"):
        al.allocate("hessian", labels, costs[:, :3], CHOICES, 3.5)


def test_large_tables_go_to_the_core_search_and_past_its_limit_to_the_integer_program(monkeypatch):
    """The DP's table is K * (capacity + 1) cells: past DP_MAX_CELLS knapsack.core solves instead, and
    HiGHS when core's search outgrows its work limit; all three give the same optimal cost."""
    used, real = [], {name: getattr(knapsack, name) for name in ("dp", "core", "milp")}
    for name, f in real.items():
        monkeypatch.setattr(knapsack, name, lambda *a, _n=name, _f=f, **kw: used.append(_n) or _f(*a, **kw))
    costs, sizes = _kept_count_instance(np.random.default_rng(0), 30)
    sizes //= 50  # 2..7 kept weights per row: a DP table of about 2,000 cells

    def cost(bits):
        return sum(costs[g, CHOICES.index(b)] for g, b in enumerate(bits.tolist()))

    found = [cost(al.allocate_bits(costs, sizes, CHOICES, 3.5))]
    monkeypatch.setattr(al, "DP_MAX_CELLS", 100)
    found.append(cost(al.allocate_bits(costs, sizes, CHOICES, 3.5)))
    monkeypatch.setattr(knapsack, "core", lambda *a: used.append("core") or real["core"](*a, max_work=0))
    found.append(cost(al.allocate_bits(costs, sizes, CHOICES, 3.5)))
    assert found == pytest.approx([found[0]] * 3, rel=1e-12)
    assert used == ["dp", "core", "core", "milp"]


def test_core_and_milp_stay_exact_when_the_multiplier_times_capacity_dwarfs_the_costs():
    """1,000 groups whose upgrade saves half its weight's worth and costs nothing after it (lam * cap is
    ~1e8 against an optimum of 0.55), and three small groups that share the 2 bits left: the optimum takes
    the two 1-bit upgrades (0.3 + 0.05 + 0.2). A gap computed as upper - lower cancelled there and lost it;
    HiGHS with its capacity row scaled to one let picks run over cap and, tightened, lost it too."""
    r = np.random.default_rng(1).integers(1000, 100000, size=1000)
    costs = np.concatenate([np.stack([r * 0.5, 0 * r], 1), [[0.3, 0.0], [0.3, 0.05], [0.3, 0.2]]])
    weights = np.concatenate([np.stack([0 * r, r], 1), [[0, 2], [0, 1], [0, 1]]])
    cap = int(r.sum()) + 2
    rows = np.arange(len(costs))
    for picks in (knapsack.core(costs, weights, cap), knapsack.milp(costs, weights, cap)):
        assert weights[rows, picks].sum() <= cap
        assert picks[:-3].tolist() == [1] * 1000 and picks[-3:].tolist() == [0, 1, 1]
        assert costs[rows, picks].sum() == pytest.approx(0.55, rel=1e-12)
