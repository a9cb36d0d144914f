"""The sparsity x width frontier: which configuration gives the lowest perplexity at a given storage.

Every configuration (over seeds, a ``results.Unit``) is a point (total bpw, PPL): bpw is what the model stores
per decoder linear weight, kept codes, metadata and mask included (``bitstats``), so a 50%-sparse 4-bit model
and a dense 3-bit one sit on one axis. The lower envelope is the best PPL reachable at or below each bpw.

Two answers, each against the runner-up by the report's paired rule (``stats.decide_runs``: 2 standard errors
of the per-seed differences, or the single PPLs with one seed): the best model that fits in a budget of B bpw
(every configuration storing at most B), and, at every storage that configurations of different sparsities
share, the best of those (equal storage, exactly). A window of +-0.1 around B was tried first and misled: per-row
metadata puts the testbed's configurations at x.125 bpw, so at 3 bpw it compared 2:4 sparsity against 60%
while dense 3-bit, better than both, sat 0.125 away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from miq.report.results import Unit
from miq.report.stats import Decision, Paired, decide_runs

TARGETS = (2.5, 3.0, 3.5, 4.0, 5.0)  # budgets (total bpw) the report answers for
SAME = 0.01  # configurations within this many bpw of each other store the same (metadata differs in digits)


def points(us: list[Unit], evalset: str) -> list[Unit]:
    """The units with a finite PPL on evalset, by bpw then PPL."""
    return sorted((u for u in us if math.isfinite(u.ppl_of(evalset))), key=lambda u: (u.bpw, u.ppl_of(evalset)))


def envelope(us: list[Unit], evalset: str) -> list[Unit]:
    """The lower envelope: each unit whose PPL is below that of every unit storing no more bits."""
    out: list[Unit] = []
    for u in points(us, evalset):
        if not out or u.ppl_of(evalset) < out[-1].ppl_of(evalset):
            out.append(u)
    return out


@dataclass(frozen=True)
class Best:
    """The best configuration on ``evalset`` among those storing at most ``target`` bpw (or, from
    ``equal_storage``, the same storage), against the runner-up."""

    evalset: str
    target: float
    best: Unit | None
    runner_up: Unit | None
    decision: Decision | None  # the best against the runner-up
    paired: Paired | None


def best_at(us: list[Unit], evalset: str, target: float) -> Best:
    """The best model that fits in ``target`` bpw."""
    return _best(evalset, target, [u for u in points(us, evalset) if u.bpw <= target + 1e-9])


def _best(evalset: str, target: float, near: list[Unit]) -> Best:
    near = sorted(near, key=lambda u: (u.ppl_of(evalset), u.bpw, u.id))
    if not near:
        return Best(evalset, target, None, None, None, None)
    if len(near) == 1:
        return Best(evalset, target, near[0], None, None, None)
    decision, p = decide_runs(near[0], near[1], evalset)
    return Best(evalset, target, near[0], near[1], decision, p)


def equal_storage(us: list[Unit], evalset: str) -> list[Best]:
    """At every storage that configurations of different sparsities share (within SAME bpw): the best of them
    against the runner-up. The frontier's question asked where it has an exact answer."""
    out, pts = [], points(us, evalset)
    for i, u in enumerate(pts):
        if i and u.bpw - pts[i - 1].bpw <= SAME:
            continue  # counted with the first of its cluster
        same = [v for v in pts[i:] if v.bpw - u.bpw <= SAME]
        if len({v.sparsity_label for v in same}) > 1:
            out.append(_best(evalset, sum(v.bpw for v in same) / len(same), same))
    return out


def describe(u: Unit) -> str:
    """A configuration as the frontier names it: method, sparsity (or n:m), bpw."""
    return f"{u.method} at sparsity {u.sparsity_label}, {u.bpw:.3f} bpw"


def fmt_ppl(u: Unit, evalset: str) -> str:
    spread = u.spread(evalset)
    return f"{u.ppl_of(evalset):.3f}" + (f" ± {spread:.3f}" if u.seeds > 1 and math.isfinite(spread) else "")


def best_line(b: Best) -> str:
    """One sentence per (eval set, target)."""
    where = f"at most {b.target:g} bpw" if b.target in TARGETS else f"{b.target:.3f} bpw"
    head = f"**{where}, {b.evalset}**: "
    if b.best is None:
        return head + "no configuration stores so few bits."
    line = head + f"{describe(b.best)}: PPL {fmt_ppl(b.best, b.evalset)} ({b.best.seeds} seed(s))"
    if b.runner_up is None:
        return line + "; the only configuration in the window."
    gap = b.runner_up.ppl_of(b.evalset) - b.best.ppl_of(b.evalset)
    line += f"; runner-up {describe(b.runner_up)}: PPL {fmt_ppl(b.runner_up, b.evalset)}, {gap:.3f} higher"
    if b.paired is not None:
        line += f" (paired over {b.paired.n} seeds: {b.paired.mean:+.3f} ± {b.paired.se:.3f} SE)"
    verdict = {"better": "the best is significantly better",
               "no significant difference": "no significant difference"}.get(b.decision or "", b.decision or "")
    execs = sorted({*b.best.executions, *b.runner_up.executions})
    mixed = f" *Not like for like: these runs ran on different devices or thread counts ({'; '.join(execs)}).*"
    return f"{line}: {verdict}." + (mixed if len(execs) > 1 else "")


def wanted(us: list[Unit]) -> bool:
    """A frontier needs configurations at two sparsities (or more)."""
    return len({u.sparsity_label for u in us}) >= 2


def figure_names(sets: list[str]) -> dict[str, str]:
    return {s: "frontier.png" if i == 0 else f"frontier_{i}.png" for i, s in enumerate(sets)}


def section(us: list[Unit], sets: list[str], figures: dict[str, str]) -> list[str]:
    """The report's frontier section: its figures (eval set -> file) and the best configuration at each
    target, per eval set."""
    md = ["## Frontier: the best model at a given storage", "",
          "Perplexity against total bpw (codes of kept weights, metadata and mask), a line per sparsity, the "
          "lower envelope dashed. The best configuration that fits in each budget, against the runner-up that "
          "fits too (paired over seeds, 2 SE); then every storage that configurations of different sparsities "
          "share.", ""]
    for s in sets:
        if s in figures:
            md += [f"![frontier {s}]({figures[s]})", ""]
        md += [f"- {best_line(best_at(us, s, t))}" for t in TARGETS] + [""]
        same = equal_storage(us, s)
        if same:
            md += [f"At equal storage (configurations of different sparsities within {SAME:g} bpw), {s}:", ""]
            md += [f"- {best_line(b)}" for b in same] + [""]
    return md
