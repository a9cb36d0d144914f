"""verdict.py's decisions, checked on its dataclasses (no markdown): which runs a cell compares, their PPLs,
the difference, the decision and whether it is counted.

Runs are built in memory with real RunConfigs (the flags a sweep gives each method), so families and
strategies come from methods.py exactly as for result JSONs. Expected numbers are worked out by hand in
each test.
"""

import math

import pytest

from miq import methods
from miq.report import verdict
from miq.report.results import (
    BASELINE_FAMILIES,
    CONTROL_FAMILIES,
    MI_FAMILIES,
    Run,
    control_families,
    counted_control,
)
from miq.report.stats import decide
from miq.report.verdict import judge
from miq.run import config


def run(rid: str, method: str, ppl: dict, bpw: float, *, k: int = 8, sparsity: str = "0.5", wbits: str = "4",
        extra: tuple[str, ...] = ()) -> Run:
    """A result as opt_mi.py would write it for methods.BY_ID[method] (no stored label: derived)."""
    flags = methods.run_flags(methods.BY_ID[method], sparsity, wbits, k)
    cfg = config.parse(["toy", "synthetic", *flags, *extra])
    return Run(rid, {"config": cfg.as_dict(), "ppl": ppl, "bits": {"bpw": bpw}})


def only_cell(runs: list[Run], evalset: str = "syn") -> verdict.Cell:
    v = judge(runs, [evalset])
    assert v is not None and len(v.cells) == 1
    return v.cells[0]


def test_families_come_from_methods():
    assert BASELINE_FAMILIES == ("uniform", "uniform-g", "act-order", "act-order-g", "per-channel", "search")
    assert CONTROL_FAMILIES == ("random", "contiguous", "range", "contiguous-in", "random-in", "range-in")
    assert MI_FAMILIES == ("mi", "mi-in")
    assert control_families("mi") == ("random", "contiguous", "range")
    assert control_families("mi-in") == ("contiguous-in", "random-in", "range-in")
    assert (counted_control("mi"), counted_control("mi-in")) == ("random", "random-in")


@pytest.mark.parametrize(("p", "q", "expected"), [
    (14.2, 14.6, "better"), (14.6, 14.2, "worse"), (14.2, 14.2, "equal"),
    (14.2, math.inf, "better"),  # the reference diverged
    (math.inf, 14.2, "worse"),  # MI diverged
    (math.inf, math.inf, "no comparison"),
])
def test_decide(p, q, expected):
    assert decide(p, q) == expected


def test_mi_better_than_the_best_baseline_at_equal_bits():
    mi = run("mi", "miB", {"syn": 14.2}, 4.0641)
    runs = [mi,
            run("uni", "uniform", {"syn": 15.4}, 4.0625),  # 0.0016 fewer bits: equal within BPW_TOL
            run("pc", "perchannel", {"syn": 14.6}, 4.0703),  # the best of the three: the reference
            run("g128", "g128", {"syn": 14.9}, 4.25),
            run("dense", "dense", {"syn": 10.0}, 16.0)]  # not a baseline (unquantized, other sparsity)
    c = only_cell(runs).baseline
    assert (c.against, c.mi_id, c.reference_id, c.candidates) == ("baseline", "mi", "pc", 3)
    assert (c.mi_ppl, c.reference_ppl) == (14.2, 14.6)
    assert c.difference == pytest.approx(0.4)  # 14.6 - 14.2
    assert c.relative == pytest.approx(0.4 / 14.6)  # 2.74 %
    assert (c.decision, c.counted, c.won) == ("better", True, True)
    assert judge(runs, ["syn"]).baseline_wins == (1, 1)


def test_mi_worse_than_the_baseline():
    runs = [run("mi", "miB", {"syn": 14.2}, 4.0641), run("pc", "perchannel", {"syn": 14.0}, 4.0703)]
    c = only_cell(runs).baseline
    assert c.reference_id == "pc"
    assert c.difference == pytest.approx(-0.2)  # 14.0 - 14.2
    assert c.relative == pytest.approx(-0.2 / 14.0)  # 1.43 % worse
    assert (c.decision, c.won) == ("worse", False)
    assert judge(runs, ["syn"]).baseline_wins == (0, 1)


def test_a_better_baseline_with_fewer_bits_is_not_compared():
    # only baselines spending at least MI's bits are references: uniform spends 4.0641 - 4.0590 = 0.0051 bpw
    # less, just past the 0.005 tolerance, so it is left out despite its lower PPL; g128 (4.25 bpw) remains
    runs = [run("mi", "miB", {"syn": 14.2}, 4.0641), run("uni", "uniform", {"syn": 13.0}, 4.0590),
            run("g128", "g128", {"syn": 14.9}, 4.25)]
    c = only_cell(runs).baseline
    assert (c.reference_id, c.candidates, c.decision) == ("g128", 1, "better")
    assert c.difference == pytest.approx(0.7)  # 14.9 - 14.2


def test_no_baseline_at_equal_or_higher_bits():
    # MI spends more than every baseline: no equal-bits claim, the nearest one is named, nothing is counted
    runs = [run("mi", "miB", {"syn": 14.2}, 4.0641), run("uni", "uniform", {"syn": 15.4}, 4.03),
            run("uni3", "uniform", {"syn": 19.0}, 3.03, wbits="3")]
    v = judge(runs, ["syn"])
    c = v.cells[0].baseline
    assert (c.decision, c.reference_id) == ("no equal-bits baseline", "uni")  # |4.03 - 4.0641| is smallest
    assert (c.counted, c.won) == (False, None)
    assert v.baseline_wins == (0, 0) and len(v.cells) == 1


def test_no_baseline_at_all():
    c = only_cell([run("mi", "miB", {"syn": 14.2}, 4.0641), run("sgpt", "sparsegpt", {"syn": 13.2}, 16.0)]).baseline
    assert (c.decision, c.reference, c.won) == ("no baseline", None, None)


def test_control_like_for_like_and_best_of_several():
    # the best MI run is strategy A; the random controls are B (one with another allocation, which is not a
    # control of anything): the comparison falls back to the best MI-B run, like for like
    runs = [run("miA", "miA", {"syn": 14.0}, 4.0165), run("miB", "miB", {"syn": 14.2}, 4.0641),
            run("rnd1", "random", {"syn": 14.8}, 4.0641), run("rnd2", "random", {"syn": 14.5}, 4.0641),
            run("rnd_mi", "random", {"syn": 12.0}, 4.0641, extra=("--bit-alloc", "hessian-mi")),
            run("rnd_k16", "random", {"syn": 12.0}, 4.0680, k=16)]
    cell = only_cell(runs)
    assert cell.best.id == "miA"
    c = cell.control("random")
    assert (c.against, c.mi_id, c.like_for_like) == ("random", "miB", True)
    assert (c.reference_id, c.candidates) == ("rnd2", 2)  # the better of rnd1 and rnd2
    assert c.difference == pytest.approx(0.3)  # 14.5 - 14.2
    assert c.relative == pytest.approx(0.3 / 14.5)
    assert (c.decision, c.won) == ("better", True)
    assert cell.control("contiguous").decision == "no control"
    assert cell.control("contiguous").won is None


def test_control_of_the_best_mi_run_itself():
    runs = [run("miB", "miB", {"syn": 14.2}, 4.0641), run("rnd", "random", {"syn": 14.1}, 4.0641)]
    c = only_cell(runs).control("random")
    assert (c.mi_id, c.like_for_like, c.decision, c.won) == ("miB", False, "worse", False)
    assert c.difference == pytest.approx(-0.1)


def test_na_ppls():
    runs = [run("mi", "miB", {"a": None, "b": 14.2, "c": None}, 4.0641),
            run("pc", "perchannel", {"a": 14.6, "b": math.inf, "c": None}, 4.0703),
            run("rnd", "random", {"a": 14.8, "b": 14.0, "c": None}, 4.0641)]
    v = judge(runs, ["a", "b", "c", "d"])  # "d": evaluated by nobody
    a, b, c, d = (cell.baseline for cell in v.cells)
    assert (a.decision, a.difference, a.won) == ("worse", None, False)  # MI diverged
    assert (b.decision, b.difference, b.won) == ("better", None, True)  # the baseline diverged
    assert (c.decision, c.counted) == ("no comparison", False)  # both n/a: not counted against MI
    assert (d.decision, d.counted) == ("no comparison", False)
    assert v.baseline_wins == (1, 2)
    # a control MI cannot be shown to beat counts as a loss, even when both are n/a
    rc = v.cells[2].control("random")
    assert (rc.decision, rc.counted, rc.won) == ("no comparison", True, False)
    assert v.control_wins == (0, 4)  # a: worse (MI n/a), b: worse (14.2 > 14.0), c and d: no comparison


def test_cells_in_order_and_budgets():
    runs = [run("mi4", "miB", {"syn": 14.2}, 4.0641), run("mi3", "miB", {"syn": 17.0}, 3.0641, wbits="3"),
            run("mi24", "miB", {"syn": 15.0}, 4.0641, sparsity="0", extra=("--prunen", "2", "--prunem", "4")),
            run("pc", "perchannel", {"syn": 14.6}, 4.0703)]
    v = judge(runs, ["syn"])
    assert [(c.sparsity, c.wbits, c.best.id) for c in v.cells] == [
        ("0.5", 3.0, "mi3"), ("0.5", 4.0, "mi4"), ("2:4", 4.0, "mi24")]  # unstructured first, then N:M
    assert v.several_budgets
    # the 3-bit MI run is compared with the 4-bit per-channel run (more bits, same sparsity): 14.6 - 17.0
    assert v.cells[0].baseline.difference == pytest.approx(-2.4)
    assert v.cells[2].baseline.decision == "no baseline"  # no baseline at 2:4


def test_no_mi_run_no_verdict():
    assert judge([run("pc", "perchannel", {"syn": 14.6}, 4.0703)], ["syn"]) is None


# ----------------------------------------------------------------------------------------------------------
# over seeds: configurations run with several seeds are compared on differences paired by seed


def seeded(method: str, ppls: list[float], bpw: float) -> list[Run]:
    """One configuration run with seeds 0, 1, ... as a sweep with --seeds names them."""
    return [run(f"{method}_s0.5_w4_seed{i}", method, {"syn": p}, bpw, extra=("--seed", str(i)))
            for i, p in enumerate(ppls)]


def test_seed_spread_that_covers_the_gap_is_no_significant_difference():
    # MI is 0.1 better on average, but the paired differences (0.5, -0.3, 0.1) scatter: mean 0.1,
    # sd 0.4, se 0.4 / sqrt(3) = 0.2309 > 0.1 / 2
    runs = seeded("miB", [14.0, 14.6, 14.2], 4.06) + seeded("perchannel", [14.5, 14.3, 14.3], 4.07)
    c = only_cell(runs).baseline
    assert c.paired is not None and c.paired.n == 3
    assert c.paired.mean == pytest.approx(0.1)
    assert c.paired.se == pytest.approx(0.4 / math.sqrt(3))
    assert c.decision == "no significant difference" and c.won is False
    assert (c.mi_id, c.reference_id) == ("miB_s0.5_w4", "perchannel_s0.5_w4")
    assert c.mi_ppl == pytest.approx(14.2666667) and c.reference_ppl == pytest.approx(14.3666667)
    v = judge(runs, ["syn"])
    assert v.baseline_wins == (0, 1) and v.not_significant == (1, 0) and v.over_seeds


def test_consistent_paired_gap_beats_even_when_means_are_close():
    # every seed 0.10 +- 0.02 better: mean 0.1, se small; seeds shift both PPLs together by up to 1.0
    runs = seeded("miB", [14.0, 15.0, 14.5], 4.06) + seeded("perchannel", [14.12, 15.08, 14.6], 4.07)
    c = only_cell(runs).baseline
    assert c.paired.mean == pytest.approx(0.1)
    assert c.paired.se == pytest.approx(0.02 / math.sqrt(3))
    assert c.decision == "better" and c.won is True
    # and the other way round: MI consistently worse
    worse = seeded("miB", [14.2, 15.2, 14.7], 4.06) + seeded("perchannel", [14.12, 15.08, 14.6], 4.07)
    assert only_cell(worse).baseline.decision == "worse"


def test_controls_are_paired_too_and_one_seed_falls_back():
    runs = seeded("miB", [14.0, 14.6, 14.2], 4.06) + seeded("random", [14.4, 15.0, 14.6], 4.06)
    c = only_cell(runs).control("random")
    assert c.paired.mean == pytest.approx(0.4) and c.paired.se == pytest.approx(0.0, abs=1e-12)
    assert c.decision == "better"
    single = [run("mi", "miB", {"syn": 14.2}, 4.06), run("rnd", "random", {"syn": 14.3}, 4.06)]
    c1 = only_cell(single).control("random")
    assert c1.paired is None and c1.decision == "better"  # one seed: compared on the one PPL


def test_each_axis_is_judged_against_its_own_controls():
    """MI on rows (mi) and on input columns (mi-in) make separate cells, each with its axis's controls."""
    runs = [run("miB", "miB", {"syn": 14.2}, 4.06), run("rnd", "random", {"syn": 14.5}, 4.06),
            run("mi-in", "mi-in", {"syn": 13.9}, 4.30), run("rnd-in", "random-in", {"syn": 13.8}, 4.30),
            run("ctg-in", "contiguous-in", {"syn": 14.0}, 4.30),
            run("g128", "g128", {"syn": 14.1}, 4.31)]
    v = judge(runs, ["syn"])
    assert [c.family for c in v.cells] == ["mi", "mi-in"]
    out, inp = v.cells
    assert [c.against for c in out.controls] == ["random", "contiguous", "range"]
    assert [c.against for c in inp.controls] == ["contiguous-in", "random-in", "range-in"]
    assert (out.counted.reference_id, out.counted.decision) == ("rnd", "better")
    assert (inp.counted.reference_id, inp.counted.decision) == ("rnd-in", "worse")  # 13.9 vs 13.8
    assert (inp.control("contiguous-in").decision, inp.baseline.reference_id) == ("better", "g128")
    assert v.of("mi").control_wins == (1, 1) and v.of("mi-in").control_wins == (0, 1)
