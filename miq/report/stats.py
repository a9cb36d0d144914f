"""Two configurations compared over seeds: the paired rule every verdict of the report uses.

A configuration (a ``results.Run`` or, over seeds, a ``results.Unit``; anything with ``seed_ppl`` and ``ppl_of``)
beats another only when the mean of their per-seed PPL differences exceeds ``SIGNIFICANCE`` standard errors;
with fewer than two common seeds the single PPLs decide. Pure functions, no project imports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol


class Configuration(Protocol):
    """A run, or runs over seeds: its PPL per seed and its (mean) PPL on an eval set."""

    def seed_ppl(self, evalset: str) -> dict[int, float]: ...

    def ppl_of(self, evalset: str) -> float: ...


SIGNIFICANCE = 2.0  # standard errors the mean paired difference must exceed

Decision = Literal[
    "better",  # the MI run's PPL is lower (or the reference's is n/a)
    "worse",  # higher (or the MI run's is n/a)
    "equal",  # the same PPL: no gain
    "no comparison",  # both PPLs n/a
    "no equal-bits baseline",  # every baseline at this sparsity spends fewer bits than the MI run
    "no baseline",  # no quantized non-MI run at this sparsity at all
    "no control",  # no control run set up like any MI run of the cell
    "no significant difference",  # over seeds: the mean paired difference is within 2 standard errors
]


@dataclass(frozen=True)
class Paired:
    """Reference PPL minus MI PPL, paired by seed: ``n`` seeds, their ``mean`` and its standard error ``se``."""

    n: int
    mean: float
    se: float


def sample_std(v: list[float]) -> float:
    """The sample standard deviation (n - 1 in the denominator); 0 for fewer than two values."""
    if len(v) < 2:
        return 0.0
    mean = sum(v) / len(v)
    return math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1))


def paired(mi: Configuration, ref: Configuration, s: str) -> Paired | None:
    """The paired differences over the seeds both have (finite PPLs only); None with fewer than two."""
    a, b = mi.seed_ppl(s), ref.seed_ppl(s)
    d = [b[k] - a[k] for k in sorted(set(a) & set(b)) if math.isfinite(a[k]) and math.isfinite(b[k])]
    if len(d) < 2:
        return None
    mean = sum(d) / len(d)
    sd = sample_std(d)
    return Paired(len(d), mean, sd / math.sqrt(len(d)))


def decide_runs(mi: Configuration, ref: Configuration, s: str) -> tuple[Decision, Paired | None]:
    """The decision between two configurations: over seeds when both have two or more in common, else on
    their (single) PPLs."""
    p = paired(mi, ref, s)
    if p is None:
        return decide(mi.ppl_of(s), ref.ppl_of(s)), None
    if p.mean == 0 and p.se == 0:
        return "equal", p
    if abs(p.mean) > SIGNIFICANCE * p.se:
        return ("better" if p.mean > 0 else "worse"), p
    return "no significant difference", p


def decide(p: float, q: float) -> Decision:
    """PPL p (the MI run's) against reference PPL q; +inf stands for n/a (diverged or not evaluated)."""
    if math.isinf(p) and math.isinf(q):
        return "no comparison"
    if math.isinf(q) or q > p:  # a finite PPL beats one that diverged
        return "better"
    if math.isinf(p) or q < p:
        return "worse"
    return "equal"
