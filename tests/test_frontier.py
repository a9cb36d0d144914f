"""frontier.py: the lower envelope and the best configuration at a storage target, checked against brute force
on hand-made runs (over seeds), and the report's frontier section and figure."""

import itertools
import json
import math
import random

import pytest
from conftest import md_table
from report_helpers import run

from miq import methods
from miq.report import frontier, naming
from miq.report.markdown import build
from miq.report.results import Run, load_dir, units
from miq.run import config


def random_units(n: int, seed: int):
    rng = random.Random(seed)
    runs = []
    for i, (s, w) in enumerate(itertools.product(("0", "0.5", "0.6"), ("2", "3", "4", "5"))):
        if i >= n:
            break
        bpw = rng.uniform(2, 6)
        for sd in range(3):
            runs.append(run("uniform", s, w, bpw + 0.001 * sd, rng.uniform(10, 40), seed=sd))
    return units(runs)


@pytest.mark.parametrize("seed", range(5))
def test_envelope_is_the_brute_force_lower_envelope(seed):
    us = random_units(12, seed)
    env = frontier.envelope(us, "syn")
    for u in us:  # u is on the envelope iff no unit stores no more bits at a lower PPL (ties: the cheaper)
        dominated = any((v.bpw < u.bpw and v.ppl_of("syn") <= u.ppl_of("syn")) or
                        (v.bpw == u.bpw and v.ppl_of("syn") < u.ppl_of("syn")) for v in us if v is not u)
        assert (u in env) == (not dominated), u.id
    assert [u.bpw for u in env] == sorted(u.bpw for u in env)


@pytest.mark.parametrize("seed", range(5))
def test_best_at_a_target_is_the_lowest_mean_in_the_window(seed):
    us = random_units(12, seed)
    for target in frontier.TARGETS:
        b = frontier.best_at(us, "syn", target)
        near = [u for u in us if u.bpw <= target]  # the models that fit in the budget
        if not near:
            assert b.best is None
            continue
        ranked = sorted(near, key=lambda u: u.ppl_of("syn"))
        assert b.best is ranked[0] and b.runner_up is (ranked[1] if len(ranked) > 1 else None)
        if b.runner_up is not None:  # the verdict: paired over the 3 seeds, 2 SE
            d = [b.runner_up.seed_ppl("syn")[k] - b.best.seed_ppl("syn")[k] for k in range(3)]
            mean = sum(d) / 3
            se = math.sqrt(sum((x - mean) ** 2 for x in d) / 2) / math.sqrt(3)
            assert b.paired.mean == pytest.approx(mean) and b.paired.se == pytest.approx(se)
            assert b.decision == ("better" if mean > 2 * se else "no significant difference")


def test_report_draws_the_frontier_and_names_the_best_at_each_target(tmp_path):
    rows = [("dense", "0", "16", 16.0, 10.0), ("uniform", "0", "3", 3.06, 14.0), ("uniform", "0.5", "4", 3.06, 13.0),
            ("uniform", "0.5", "3", 2.56, 16.0), ("uniform", "0", "2", 2.06, 30.0), ("sparsegpt", "0.5", "", 9.0, 11.0)]
    for seed, jitter in enumerate((0.0, 0.2, -0.1)):
        for m, s, w, bpw, ppl in rows:
            r = run(m, s, w or "16", bpw, ppl + jitter, seed=seed)
            (tmp_path / f"{r.id}.json").write_text(json.dumps({**r.data, "method": r.method, "family": r.family}))
    md = build(tmp_path, tmp_path / "performance_report.md")
    assert "## Frontier: the best model at a given storage" in md
    assert (tmp_path / "frontier.png").read_bytes().startswith(b"\x89PNG")
    line = next(x for x in md.splitlines() if x.startswith("- **at most 3.5 bpw"))
    assert "50% + 4-bit (sparsegpt+uniform), 3.060 bpw: PPL 13.033 ± 0.153 (3 seed(s))" in line
    assert "runner-up dense 3-bit (uniform), 3.060 bpw" in line  # GPTQ: dense 3-bit
    assert "the best is significantly better" in line
    line = next(x for x in md.splitlines() if x.startswith("- **at most 3 bpw"))
    assert "50% + 3-bit (sparsegpt+uniform), 2.560 bpw" in line and "runner-up dense 2-bit (uniform), 2.060" in line
    none = frontier.best_at(units(load_dir(tmp_path)[0]), "syn", 2.0)
    assert none.best is None and "no configuration stores so few bits" in frontier.best_line(none)
    same = [x for x in md.splitlines() if x.startswith("- **3.060 bpw")]  # 50% + 4-bit against dense 3-bit
    assert len(same) == 1 and "50% + 4-bit (sparsegpt+uniform)" in same[0] and "runner-up dense 3-bit" in same[0]


# ----------------------------------------------------------------------------------------------------------
# searched configurations (issue 28): their own points, against the best uniform one at <= their bpw


def searched_run(method: str, budget: str, bpw: float, ppl: float, seed: int, pruned: float = 0.0) -> Run:
    flags = methods.run_flags(methods.BY_ID[method], "", budget, None)
    cfg = config.parse(["toy", "synthetic", *flags, "--seed", str(seed)])
    return Run(f"{method}_b{budget}_seed{seed}", {"config": cfg.as_dict(), "ppl": {"syn": ppl}, "sparsity": pruned,
                                                  "bits": {"bpw": bpw, "code_bpw": bpw}})


# (method, sparsity, wbits, bpw, PPL per seed); dense 3-bit is the best at 3.125 bpw, above the searches' 2.99
UNIFORM = [("dense", "0", "16", 16.0, (10.0,)), ("uniform", "0", "3", 3.125, (12.0, 12.1, 11.9)),
           ("g128", "0.5", "3", 2.75, (14.0, 14.3, 13.8)), ("uniform", "0.5", "3", 2.625, (15.0, 15.2, 15.1)),
           ("uniform", "0", "2", 2.125, (30.0, 31.0, 29.0)), ("uniform", "0", "8", 8.125, (10.1, 10.2, 10.0))]
SEARCHED = [("search-evo", "3", 2.99, (13.0, 13.2, 12.9), 0.12),
            ("search-knapsack", "3", 2.98, (14.1, 14.1, 13.8), 0.0), ("search-evo", "2", 1.99, (40.0, 41.0, 39.0), 0.3)]


@pytest.fixture
def searched_dir(tmp_path):
    for m, s, w, bpw, ppls in UNIFORM:
        for seed, ppl in enumerate(ppls):
            r = run(m, s, w, bpw, ppl, seed=seed)
            (tmp_path / f"{r.id}.json").write_text(json.dumps({**r.data, "method": r.method, "family": r.family}))
    for m, b, bpw, ppls, pruned in SEARCHED:
        for seed, ppl in enumerate(ppls):
            r = searched_run(m, b, bpw, ppl, seed, pruned)
            (tmp_path / f"{r.id}.json").write_text(json.dumps({**r.data, "method": r.method, "family": r.family}))
    return tmp_path


def test_a_searched_point_is_paired_with_the_best_uniform_at_or_below_its_bpw(searched_dir):
    md = build(searched_dir, searched_dir / "performance_report.md")
    us = units(load_dir(searched_dir)[0])
    for m, b, bpw, ppls, _ in SEARCHED:
        line = next(x for x in md.splitlines() if x.startswith(f"- **{m} @{float(b):.1f}"))
        fits = [(sum(p) / len(p), s, w, mid, ub) for mid, s, w, ub, p in UNIFORM if ub <= bpw]  # by brute force
        if not fits:
            assert "no uniform configuration stores 1.990 bpw or less" in line
            continue
        _, s, w, mid, ub = min(fits)
        best = next(u for u in us if u.bpw == ub)
        assert f"the best uniform at <= its bpw, {frontier.describe(best)}" in line, line
        d = [best.seed_ppl("syn")[k] - ppls[k] for k in range(3)]  # uniform minus search, paired by seed
        mean = sum(d) / 3
        se = math.sqrt(sum((x - mean) ** 2 for x in d) / 2) / math.sqrt(3)
        assert f"paired over 3 seeds: {mean:+.3f} ± {se:.3f} SE" in line, line
        outcome = "the search is significantly better" if mean > 2 * se else "no significant difference"
        assert line.endswith(f": {outcome}."), line
    evo = next(x for x in md.splitlines() if x.startswith("- **search-evo @3.0"))
    assert "50% + 3-bit g128 (sparsegpt+uniform-g128), 2.750 bpw" in evo and "dense 3-bit" not in evo
    assert "**search-evo beats the best uniform configuration at <= its bpw in 1 of 1 budget(s)**." in md
    assert ("**search-knapsack beats the best uniform configuration at <= its bpw in 0 of 1 budget(s)**; no "
            "significant difference in 1.") in md


def test_the_tables_say_a_searched_run_was_searched_at_its_budget(searched_dir):
    """Its --sparsity and --wbits stay 0 and 16 (the search chose both per linear): the tables name the search
    and its --target-bpw instead, and its PPL is marked best among the runs of that search and budget only."""
    md = build(searched_dir, searched_dir / "performance_report.md")
    rows = {r["run"]: r for r in md_table(md, "Results")}
    seeds = {r["configuration"]: r for r in md_table(md, "Over seeds")}
    for m, b, *_ in SEARCHED:
        for seed in range(3):
            row = rows[f"{m}_b{b}_seed{seed}"]
            assert (row["target sparsity"], row["wbits budget"]) == (f"searched ({m.split('-')[1]})", f"{b} bpw in all")
        assert (seeds[f"{m}_b{b}"]["target sparsity"], seeds[f"{m}_b{b}"]["wbits budget"]) == (
            f"searched ({m.split('-')[1]})", f"{b} bpw in all")
    best = [r["run"] for r in rows.values() if r["PPL syn"].startswith("**")]
    assert "search-evo_b3_seed2" in best and "search-knapsack_b3_seed2" in best  # each its own group
    assert (rows["g128_s0.5_w3"]["target sparsity"], rows["g128_s0.5_w3"]["wbits budget"]) == ("0.5", "3")


def test_the_frontier_figure_names_each_point_and_zooms_on_the_budgets_that_matter(searched_dir, monkeypatch):
    from miq.report import plots

    figs = []
    monkeypatch.setattr(plots.atomic, "write_png", lambda fig, path, dpi=None: figs.append(fig))
    build(searched_dir, searched_dir / "performance_report.md")
    ax = next(f.axes[0] for f in figs if f.axes[0].get_title().startswith("Sparsity x width frontier"))
    texts = [t.get_text() for t in ax.texts]
    named = {"dense 2-bit", "50% + 3-bit", "50% + 3-bit g128", "dense 3-bit", "search-knapsack @3.0",
             "search-evo @3.0, 12% pruned", "search-evo @2.0, 30% pruned"}
    assert named <= set(texts), texts
    assert not any("+uniform" in t or t == "uniform" for t in texts), texts  # method labels name no width
    lo, hi = ax.get_xlim()
    assert lo <= 1.5 and 6 <= hi < 8.125  # 1.5-6 bpw in view; dense 8-bit (8.125 bpw) is not
    assert "dense 8-bit" not in texts and "1 configuration(s) above 6 bpw not drawn (see the table)" in texts
    dense = [ln for ln in ax.get_lines() if list(ln.get_ydata()) == [10.0, 10.0]]  # axhline: a horizontal line
    assert len(dense) == 1 and dense[0].get_label() == "dense fp16 (16 bpw): PPL 10.000"
    bottom, top = ax.get_ylim()
    assert bottom < 10.0 < 41 < top


def test_searched_points_are_a_line_of_their_own_at_equal_storage(searched_dir):
    us = units(load_dir(searched_dir)[0])
    evo = next(u for u in us if u.id == "search-evo_b3")
    assert naming.line_of(evo) == "search-evo" and evo.sparsity_label == "0"  # not of the sparsity-0 line
    assert frontier.wanted([evo, next(u for u in us if u.id == "uniform_s0_w3")])
