"""The evolutionary level search (miq.search.evo) against brute force on tiny instances, its budget and
selection contracts, and the stitched-model KL fitness (miq.search.fitness) against plain full forwards of an
explicitly stitched copy of the toy OPT and of tiny random models of the other families."""

import copy
import itertools
import random
from itertools import pairwise

import pytest
import torch
from family_helpers import FAMILIES, tiny_model

from miq.model import layouts, loading
from miq.search import evo
from miq.search.fitness import StitchedKL

# ----------------------------------------------------------------------------------------------------------
# evo: tiny instances solved by brute force


def _instance(seed: int, linears: int = 4, levels: int = 3):
    """(bits, budget, table): random stored bits (not monotone in the level index), a budget between the
    cheapest and the dearest configuration, and a random fitness per configuration (not separable)."""
    rng = random.Random(seed)
    bits = [[rng.randint(1, 40) for _ in range(levels)] for _ in range(linears)]
    lo = sum(min(r) for r in bits)
    hi = sum(max(r) for r in bits)
    budget = rng.randint(lo, (lo + hi) // 2 + 1)
    table = {c: rng.random() for c in itertools.product(range(levels), repeat=linears)}
    return bits, budget, table


def _cost(bits, config):
    return sum(bits[i][lv] for i, lv in enumerate(config))


def _cheapest(bits):
    return tuple(min(range(len(r)), key=r.__getitem__) for r in bits)


def _brute_force(bits, budget, fitness):
    feasible = [c for c in itertools.product(*(range(len(r)) for r in bits)) if _cost(bits, c) <= budget]
    return min(feasible, key=fitness)


N = 8  # windows of the toy fitnesses: with fewer, the score is the truth plus a deterministic error


def _noisy(table, bits, budget, calls=None):
    """A fitness over ``table`` that asserts it is never asked about a configuration over budget; on fewer
    than N windows it adds an error that shrinks with the window count (what few windows do to a KL)."""

    def fitness(config, n):
        assert _cost(bits, config) <= budget, (config, budget)
        if calls is not None:
            calls.append((config, n))
        err = 0.0 if n == N else random.Random(hash((config, n))).gauss(0, 0.05 / n)
        return table[config] + err

    return fitness


@pytest.mark.parametrize("seed", range(8))
def test_evolve_finds_the_brute_force_optimum_of_a_random_fitness(seed):
    bits, budget, table = _instance(seed)
    truth = _brute_force(bits, budget, table.__getitem__)
    opts = evo.EvoOptions(generations=60, offspring=8, survivors=(3, 1), fractions=(0.25, 1.0), flips=4, seed=seed)
    res = evo.evolve(bits, budget, _noisy(table, bits, budget), _cheapest(bits), opts, N, progress=False)
    assert res.best == truth
    assert res.fitness == table[truth]


def test_evolve_finds_the_optimum_of_a_separable_fitness():
    rng = random.Random(7)
    bits = [[rng.randint(1, 30) for _ in range(3)] for _ in range(5)]
    loss = [[rng.random() for _ in range(3)] for _ in range(5)]
    budget = sum(min(r) for r in bits) + 25

    def separable(c, n=N):
        return sum(loss[i][lv] for i, lv in enumerate(c))

    truth = _brute_force(bits, budget, separable)
    opts = evo.EvoOptions(generations=80, offspring=8, flips=5, seed=1)
    res = evo.evolve(bits, budget, separable, _cheapest(bits), opts, N, progress=False)
    assert res.best == truth and res.fitness == pytest.approx(separable(truth))


@pytest.mark.parametrize("seed", range(20))
def test_no_configuration_over_budget_is_scored_or_returned(seed):
    rng = random.Random(100 + seed)
    linears, levels = rng.randint(2, 7), rng.randint(2, 6)
    bits = [[rng.randint(0, 50) for _ in range(levels)] for _ in range(linears)]
    budget = rng.randint(sum(min(r) for r in bits), sum(max(r) for r in bits))
    table: dict = {}

    def fitness(config, n):  # asserts the budget itself, whatever the search's own guard does
        assert _cost(bits, config) <= budget, (config, budget)
        return table.setdefault(config, random.Random(hash(config)).random())

    opts = evo.EvoOptions(generations=15, offspring=6, step=rng.randint(1, 3), seed=seed)
    res = evo.evolve(bits, budget, fitness, _cheapest(bits), opts, 4, progress=False)
    assert _cost(bits, res.best) <= budget
    assert all(t["bits"] <= budget for t in res.trace)


def test_mutations_keep_the_budget_and_move_in_bits_order():
    rng = random.Random(3)
    bits = [[rng.randint(0, 100) for _ in range(10)] for _ in range(6)]
    budget = sum(sorted(r)[4] for r in bits)
    space = evo.Space(bits, budget)
    opts = evo.EvoOptions(generations=1, flips=1, step=1, max_changes=100)
    parent = tuple(sorted(range(10), key=lambda lv, r=r: (r[lv], lv))[4] for r in bits)
    for _ in range(300):
        child = space.mutate(parent, rng, opts)
        if child is None:
            continue
        assert _cost(bits, child) <= budget
        # one switch of one place: the switched linear is at the neighbouring place in bits order
        moved = [i for i in range(6) if child[i] != parent[i]]
        ups = [i for i in moved if space.place[i][child[i]] > space.place[i][parent[i]]]
        assert len(ups) <= 1
        for i in ups:
            assert space.place[i][child[i]] == space.place[i][parent[i]] + 1


def test_the_same_seed_gives_the_same_search_and_the_trace_never_gets_worse():
    bits, budget, table = _instance(11, linears=6, levels=4)
    opts = evo.EvoOptions(generations=25, offspring=6, seed=5)
    a = evo.evolve(bits, budget, _noisy(table, bits, budget), _cheapest(bits), opts, N, progress=False)
    b = evo.evolve(bits, budget, _noisy(table, bits, budget), _cheapest(bits), opts, N, progress=False)
    assert a.best == b.best and a.fitness == b.fitness
    assert [t["fitness"] for t in a.trace] == [t["fitness"] for t in b.trace]
    fits = [t["fitness"] for t in a.trace]
    assert len(fits) == 26 and fits[0] == table[_cheapest(bits)]
    assert all(x >= y for x, y in pairwise(fits))
    assert fits[-1] == a.fitness < fits[0]


def test_selection_scores_all_offspring_on_few_windows_and_the_survivors_on_all():
    bits, budget, table = _instance(2, linears=6, levels=4)
    calls: list = []
    opts = evo.EvoOptions(generations=1, offspring=10, survivors=(3, 1), fractions=(0.25, 1.0), seed=0)
    evo.evolve(bits, budget, _noisy(table, bits, budget, calls), _cheapest(bits), opts, N, progress=False)
    assert calls[0] == (_cheapest(bits), N)  # the start, on every window
    gen = calls[1:]
    few = [c for c, n in gen if n == 2]
    assert len(few) == 10 and len(set(few)) == 10 and _cheapest(bits) not in few
    full = [c for c, n in gen if n == N]
    assert len(full) == 3 and set(full) <= set(few)  # the parent's full score is remembered, not asked again
    assert len(gen) == 13


def test_on_parent_follows_the_parent_and_the_start_is_checked():
    bits, budget, table = _instance(11, linears=6, levels=4)
    seen = []
    res = evo.evolve(bits, budget, _noisy(table, bits, budget), _cheapest(bits),
                     evo.EvoOptions(generations=20, offspring=4, seed=2), N, progress=False, on_parent=seen.append)
    assert seen[0] == _cheapest(bits) and seen[-1] == res.best
    assert all(a != b for a, b in pairwise(seen))
    improved = sum(x["fitness"] != y["fitness"] for x, y in pairwise(res.trace))
    assert 1 + improved <= len(seen) <= 21 and improved > 0  # a tie may also hand over the parent
    dear = tuple(max(range(4), key=r.__getitem__) for r in bits)
    with pytest.raises(ValueError, match="over the budget"):
        evo.evolve(bits, _cost(bits, dear) - 1, table.get, dear, evo.EvoOptions(generations=1), N, progress=False)
    with pytest.raises(ValueError, match="not one of its levels"):
        evo.evolve(bits, budget, table.get, (0, 0, 0, 0, 0, 4), evo.EvoOptions(generations=1), N, progress=False)
    with pytest.raises(ValueError, match="end in 1"):
        evo.EvoOptions(generations=1, survivors=(4, 2))
    with pytest.raises(ValueError, match="fractions"):
        evo.EvoOptions(generations=1, fractions=(0.5, 0.75))


# ----------------------------------------------------------------------------------------------------------
# the stitched KL on the toy models


class StandInDB:
    """The LevelDB interface, deterministic and cheap: level 0 prunes each row's smaller half by magnitude,
    level 1 rounds to a 3-bit per-row grid, level 2 is the dense weight."""

    def __init__(self, model):
        layout = layouts.of(model)
        self.names = [f"{layout.layer_prefix(k)}{lin}" for k in range(len(layout.decoder_layers(model)))
                      for lin in layout.linear_names]
        self.dense = [model.get_submodule(n).weight.detach().float().clone() for n in self.names]

    def weight(self, linear: int, level: int) -> torch.Tensor:
        w = self.dense[linear].clone()
        if level == 0:
            w[w.abs() < w.abs().median(dim=1, keepdim=True).values] = 0
        elif level == 1:
            scale = w.abs().amax(dim=1, keepdim=True) / 3
            w = torch.round(w / scale).clamp(-4, 3) * scale
        return w


def _load(path):
    src, _ = loading.open_source(path)
    return loading.load_model(src, "auto", torch.device("cpu"))


@pytest.fixture(scope="session", params=["toy", *FAMILIES[1:]])
def toy(request):
    """The trained toy OPT, and a tiny random model of every other family (sliding windows shorter than the
    windows where the family has them)."""
    model = _load(request.getfixturevalue("toy_path")) if request.param == "toy" else tiny_model(request.param)
    windows = torch.randint(4, model.config.vocab_size, (5, 24), generator=torch.Generator().manual_seed(0))
    return model, windows, StandInDB(model)


@torch.no_grad()
def _reference_kl(model, windows, db, config, n=None):
    """The KL by plain full forwards: a deep copy with every level's weight copied in, against the model."""
    w = windows[:n]
    stitched = copy.deepcopy(model)
    for i, lv in enumerate(config):
        stitched.get_submodule(db.names[i]).weight.copy_(db.weight(i, lv))
    p = torch.log_softmax(model(w, use_cache=False).logits.double(), -1)
    q = torch.log_softmax(stitched(w, use_cache=False).logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_stitched_kl_equals_full_forwards_of_a_stitched_copy(toy):
    model, windows, db = toy
    kl = StitchedKL(model, windows, db, torch.device("cpu"), batch=2)
    rng = random.Random(0)
    first = tuple(rng.randrange(3) for _ in db.names)
    assert kl(first) == pytest.approx(_reference_kl(model, windows, db, first), rel=1e-4, abs=1e-7)
    # a candidate after the cached parent, on all windows and on the first three
    second = list(first)
    second[len(second) // 2] = (second[len(second) // 2] + 1) % 3
    second[-1] = (second[-1] + 1) % 3
    assert kl(second) == pytest.approx(_reference_kl(model, windows, db, second), rel=1e-4, abs=1e-7)
    assert kl(second, 3) == pytest.approx(_reference_kl(model, windows, db, second, 3), rel=1e-4, abs=1e-7)
    fresh = StitchedKL(model, windows, db, torch.device("cpu"), batch=2)
    assert kl(second) == pytest.approx(fresh(second), rel=1e-6, abs=1e-9)
    # the model is dense again between calls
    assert all(torch.equal(model.get_submodule(n).weight, d) for n, d in zip(db.names, db.dense, strict=True))


def test_the_all_dense_configuration_has_zero_kl(toy):
    model, windows, db = toy
    kl = StitchedKL(model, windows, db, torch.device("cpu"))
    dense = tuple(2 for _ in db.names)
    assert kl(dense) == 0.0
    assert kl(tuple(1 for _ in db.names)) > 1e-4


def test_the_prefix_cache_runs_only_the_layers_from_the_first_change(toy):
    model, windows, db = toy
    layers = len(layouts.of(model).decoder_layers(model))
    per_layer = len(db.names) // layers
    kl = StitchedKL(model, windows, db, torch.device("cpu"))
    base = tuple(1 for _ in db.names)
    kl(base)  # anchors on base: every layer
    ran = kl.layers_run
    last = list(base)
    last[-1] = 0  # a linear of the last layer
    value = kl(tuple(last))
    assert kl.layers_run - ran == 1
    ran = kl.layers_run
    kl(base)  # the anchor itself: the head only
    assert kl.layers_run == ran
    early = list(base)
    early[per_layer - 1] = 2  # the last linear of layer 0
    kl(tuple(early))
    assert kl.layers_run - ran == layers
    kl.anchor(tuple(last))  # re-anchoring recomputes from the first difference: the last layer
    assert kl.layers_run - ran == layers + 1
    assert kl(tuple(last)) == pytest.approx(value, rel=1e-6)
    assert kl.layers_run - ran == layers + 1


def test_evolve_with_the_stitched_kl_returns_its_reported_fitness(toy):
    model, windows, db = toy
    kl = StitchedKL(model, windows, db, torch.device("cpu"), batch=2)
    numel = [d.numel() for d in db.dense]
    bits = [[n * 2, n * 3, n * 16] for n in numel]  # the stand-in's levels priced like 50%+mask, 3 bits, dense
    start = tuple(0 for _ in numel)
    budget = _cost(bits, start) + 4 * min(numel)
    res = evo.evolve(bits, budget, kl, start, evo.EvoOptions(generations=4, offspring=4, seed=0),
                     kl.n_windows, progress=False, on_parent=kl.anchor)
    assert _cost(bits, res.best) <= budget
    assert res.fitness <= res.trace[0]["fitness"]
    assert res.fitness == pytest.approx(_reference_kl(model, windows, db, res.best), rel=1e-4, abs=1e-7)
