"""The verdict of a sweep, as data: which run is compared with which, and what the comparison decides.

For each target sparsity, MI bit budget and eval set (a *cell*), the best MI run is compared with
- the best quantized non-MI baseline (uniform, GPTQ groups, act-order, per-channel allocation) at the same
  sparsity that spends at least as many bits (bpw within ``BPW_TOL``), since a claim that MI wins must not
  come from spending more bits;
- the best run of each control family set up like it (same K, strategy, allocation, groupsize, wbits and
  sparsity), since a control tells whether the *MI* membership matters, not grouping as such.

Runs that differ only in their seed (a sweep's ``--seeds``) are judged together, as ``results.Unit``s: their
PPL is the mean over seeds, and two of them are compared on the PPL differences paired by seed. One beats
the other only when the mean paired difference exceeds twice its standard error; otherwise the decision is
"no significant difference". A configuration with one seed is compared on its single PPL.

Where the runs ran zero-shot tasks (``--tasks``), each comparison also carries the same two configurations
compared on mean task accuracy (``Comparison.on_tasks``, ``tasks_table.compare``), for the report's tasks
section; the decisions and counts above stay those of perplexity.

Everything here is a pure function of the runs and returns frozen dataclasses, so tests check the decisions
directly; ``report.py`` turns them into the verdict's text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from miq.report.results import BASELINE_FAMILIES, MI_FAMILIES, Run, control_families, counted_control, units
from miq.report.stats import Decision, Paired, decide_runs
from miq.report.tasks_table import TaskComparison, compare

# A baseline counts as "equal bits" when it spends at least the MI run's bpw minus this: bpw is printed
# with 4 decimals and two methods at the same budget can differ in the last digits of metadata.
BPW_TOL = 0.005
# beside sparsity, wbits and K, what a control shares with the MI run it controls
CONTROL_KEYS = ("strategy", "bit_alloc", "groupsize", "alloc_cost", "mi_alpha")
for _fam in MI_FAMILIES:  # fail on import, not with a wrong count in a report
    counted_control(_fam)

@dataclass(frozen=True)
class Comparison:
    """The MI run ``mi`` against ``reference`` on ``evalset``; ``against`` is "baseline" or a control family.

    ``reference`` is the best of ``candidates`` qualifying runs; for "no equal-bits baseline" it is the
    nearest baseline in bpw (shown, not compared), for "no baseline" and "no control" it is None.
    ``counted`` says whether the comparison enters the verdict's count of wins.
    """

    against: str
    decision: Decision
    evalset: str
    mi: Run
    reference: Run | None = None
    candidates: int = 0
    counted: bool = False
    like_for_like: bool = False  # controls: ``mi`` is not the cell's best MI run but one that has a control
    paired: Paired | None = None  # over seeds, when both sides have two or more in common
    on_tasks: TaskComparison | None = None  # the same two on mean task accuracy, where they ran --tasks

    @property
    def mi_id(self) -> str:
        return self.mi.id

    @property
    def reference_id(self) -> str | None:
        return None if self.reference is None else self.reference.id

    @property
    def mi_ppl(self) -> float:
        return self.mi.ppl_of(self.evalset)

    @property
    def reference_ppl(self) -> float:
        return math.inf if self.reference is None else self.reference.ppl_of(self.evalset)

    @property
    def difference(self) -> float | None:
        """Reference PPL minus MI PPL (positive: MI is better); None unless both are finite."""
        p, q = self.mi_ppl, self.reference_ppl
        return q - p if math.isfinite(p) and math.isfinite(q) else None

    @property
    def executions(self) -> tuple[str, ...]:
        """Where the compared runs ran (``Run.execution``), when a comparison was made; more than one: it pairs
        or averages runs of different devices or thread counts, whose PPLs differ by that alone."""
        if self.reference is None or self.decision not in ("better", "worse", "equal", "no significant difference"):
            return ()
        return tuple(sorted({e for r in (self.mi, self.reference) for e in r.executions}))

    @property
    def mixed(self) -> bool:
        return len(self.executions) > 1

    @property
    def relative(self) -> float | None:
        """``difference`` as a fraction of the reference PPL."""
        d = self.difference
        return None if d is None else d / self.reference_ppl

    @property
    def won(self) -> bool | None:
        """What the count of wins records: True/False when counted, None when left out."""
        return self.decision == "better" if self.counted else None


def baseline_comparison(m: Run, baselines: list[Run], s: str) -> Comparison:
    """M against the best baseline that spends at least as many bits (bpw >= M's - BPW_TOL)."""
    comp = [r for r in baselines if r.bpw >= m.bpw - BPW_TOL]
    if comp:
        b = min(comp, key=lambda r: r.ppl_of(s))
        decision, p = decide_runs(m, b, s)
        return Comparison("baseline", decision, s, m, b, len(comp), counted=decision != "no comparison", paired=p,
                          on_tasks=compare(m, b))
    if baselines:  # more bits than every baseline: name the nearest so a reader sees the gap
        near = min(baselines, key=lambda r: (abs(r.bpw - m.bpw), r.ppl_of(s)))
        return Comparison("baseline", "no equal-bits baseline", s, m, near)
    return Comparison("baseline", "no baseline", s, m)


def controls_of(m: Run, runs: list[Run], family: str) -> list[Run]:
    """Control runs of a family set up like M: same sparsity, wbits, K, strategy, allocation and groupsize."""
    return [r for r in runs if r.family == family and r.sparsity_label == m.sparsity_label
            and r.wbits == m.wbits and r.groups == m.groups
            and all(getattr(r.config, k) == getattr(m.config, k) for k in CONTROL_KEYS)]


def control_comparison(m: Run, mis: list[Run], runs: list[Run], family: str, s: str) -> Comparison:
    """The best MI run M against its control runs (the best of them: MI must beat all). When M has none
    (say M is strategy A and the controls are B), the best MI run of the cell that has one is compared
    instead, like for like. Counted even when both PPLs are n/a: a control the MI run cannot be shown to
    beat is a loss."""
    order = [m] + [r for r in sorted(mis, key=lambda r: r.ppl_of(s)) if r is not m]
    pairs = [(r, cs) for r in order if (cs := controls_of(r, runs, family))]
    if not pairs:
        return Comparison(family, "no control", s, m)
    x, same = pairs[0]
    c = min(same, key=lambda r: r.ppl_of(s))
    decision, p = decide_runs(x, c, s)
    return Comparison(family, decision, s, x, c, len(same), counted=True, like_for_like=x is not m, paired=p,
                      on_tasks=compare(x, c))


@dataclass(frozen=True)
class Cell:
    """One (target sparsity, MI family, MI bit budget, eval set) of the verdict and its comparisons."""

    sparsity: str  # as configured: "0.5" or "2:4"
    wbits: float
    evalset: str
    best: Run  # the MI run with the lowest PPL in the cell
    baseline: Comparison
    controls: tuple[Comparison, ...]  # one per control family on the MI family's axis
    family: str = "mi"  # the MI family (one per axis)

    def control(self, family: str) -> Comparison:
        return next(c for c in self.controls if c.against == family)

    @property
    def counted(self) -> Comparison:
        """The control comparison the headline counts (the random control of the cell's axis)."""
        return self.control(counted_control(self.family))


def _tally(comparisons: list[Comparison]) -> tuple[int, int]:
    counted = [c.won for c in comparisons if c.won is not None]
    return sum(counted), len(counted)


@dataclass(frozen=True)
class Verdict:
    """Every cell, in order of sparsity, budget and eval set, and the counts of wins over them."""

    cells: tuple[Cell, ...]

    @property
    def several_budgets(self) -> bool:
        return len({c.wbits for c in self.cells}) > 1

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.family for c in self.cells))

    def of(self, family: str) -> Verdict:
        """The cells of one MI family."""
        return Verdict(tuple(c for c in self.cells if c.family == family))

    @property
    def over_seeds(self) -> bool:
        """Whether any comparison was made over seeds."""
        return any(c.paired is not None for cell in self.cells for c in (cell.baseline, *cell.controls))

    @property
    def not_significant(self) -> tuple[int, int]:
        """(baseline comparisons, counted-control comparisons) that found no significant difference."""
        return (sum(c.baseline.decision == "no significant difference" for c in self.cells),
                sum(c.counted.decision == "no significant difference" for c in self.cells))

    @property
    def baseline_wins(self) -> tuple[int, int]:
        """(cells where MI beats the best equal-bits baseline, cells that have one to compare with)."""
        return _tally([c.baseline for c in self.cells])

    @property
    def control_wins(self) -> tuple[int, int]:
        """(cells where MI beats the counted control, cells that have one)."""
        return _tally([c.counted for c in self.cells])


def _cell(at_s: list[Run], mis: list[Run], runs: list[Run], s: str, family: str) -> Cell:
    m = min(mis, key=lambda r: r.ppl_of(s))
    baselines = [r for r in at_s if r.family in BASELINE_FAMILIES and r.wbits != 16]
    controls = tuple(control_comparison(m, mis, runs, fam, s) for fam in control_families(family))
    return Cell(m.sparsity_label, m.wbits, s, m, baseline_comparison(m, baselines, s), controls, family)


def judge(runs: list[Run], sets: list[str]) -> Verdict | None:
    """The verdict over runs on the eval sets; None when there is no MI run, so no verdict can be given.
    Runs of one configuration over several seeds are judged as one ``Unit``."""
    runs = units(runs)
    mi_runs = [r for r in runs if r.family in MI_FAMILIES]
    if not mi_runs:
        return None
    cells = []
    for skey in sorted({r.sparsity_key for r in mi_runs}):
        at_s = [r for r in runs if r.sparsity_key == skey]
        for fam in [f for f in MI_FAMILIES if any(r.family == f for r in at_s)]:
            for w in sorted({r.wbits for r in at_s if r.family == fam}):
                mis = [r for r in at_s if r.family == fam and r.wbits == w]
                cells += [_cell(at_s, mis, runs, s, fam) for s in sets]
    return Verdict(tuple(cells))
