"""frontier.py: the lower envelope and the best configuration at a storage target, checked against brute force
on hand-made runs (over seeds), and the report's frontier section and figure."""

import itertools
import json
import math
import random

import pytest

from miq import methods
from miq.report import frontier
from miq.report.markdown import build
from miq.report.results import Run, load_dir, units
from miq.run import config


def run(method: str, sparsity: str, wbits: str, bpw: float, ppl: float, seed: int = 0) -> Run:
    flags = methods.run_flags(methods.BY_ID[method], sparsity, wbits, None)
    cfg = config.parse(["toy", "synthetic", *flags, "--seed", str(seed)])
    rid = f"{method}_s{sparsity.replace(':', 'of')}_w{wbits}" + (f"_seed{seed}" if seed else "")
    return Run(rid, {"config": cfg.as_dict(), "ppl": {"syn": ppl}, "bits": {"bpw": bpw, "code_bpw": bpw}})


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
    assert "sparsegpt+uniform at sparsity 0.5, 3.060 bpw: PPL 13.033 ± 0.153 (3 seed(s))" in line
    assert "runner-up uniform at sparsity 0, 3.060 bpw" in line  # GPTQ: dense 3-bit
    assert "the best is significantly better" in line
    line = next(x for x in md.splitlines() if x.startswith("- **at most 3 bpw"))
    assert "sparsegpt+uniform at sparsity 0.5, 2.560 bpw" in line and "runner-up uniform at sparsity 0, 2.060" in line
    none = frontier.best_at(units(load_dir(tmp_path)[0]), "syn", 2.0)
    assert none.best is None and "no configuration stores so few bits" in frontier.best_line(none)
    same = [x for x in md.splitlines() if x.startswith("- **3.060 bpw")]  # 50% + 4-bit against dense 3-bit
    assert len(same) == 1 and "sparsegpt+uniform at sparsity 0.5" in same[0] and "runner-up uniform" in same[0]
