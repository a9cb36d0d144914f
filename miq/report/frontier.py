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

Searched configurations (``--search knapsack|evo`` at a ``--target-bpw``: every linear its own sparsity and
width) are points of their own, not of a sparsity: each is compared with the best configuration of one
sparsity and width for all linears (uniform) that stores no more bits, paired by seed: does the search earn
its place at its budget?
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from miq.report.naming import line_of, name, searched
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
        if len({line_of(v) for v in same}) > 1:
            out.append(_best(evalset, sum(v.bpw for v in same) / len(same), same))
    return out


def describe(u: Unit) -> str:
    """A configuration as the frontier names it: what it is (sparsity and width), its method, its bpw."""
    return f"{name(u)}, {u.bpw:.3f} bpw" if searched(u) else f"{name(u)} ({u.method}), {u.bpw:.3f} bpw"


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
    """A frontier needs configurations at two sparsities (or more), or a searched one beside uniform ones."""
    return len({line_of(u) for u in us}) >= 2


@dataclass(frozen=True)
class Searched:
    """A searched configuration on ``evalset`` against the best uniform one that stores no more bits."""

    evalset: str
    point: Unit
    uniform: Unit | None  # None: no uniform configuration stores so few bits
    decision: Decision | None  # the search against it ("better": the search's PPL is lower)
    paired: Paired | None  # uniform minus searched PPL, paired by seed


def against_uniform(us: list[Unit], evalset: str) -> list[Searched]:
    """Every searched configuration against the best (lowest-PPL) unsearched one at <= its bpw."""
    pts, out = points(us, evalset), []
    for u in (u for u in pts if searched(u)):
        fits = sorted((v for v in pts if not searched(v) and v.bpw <= u.bpw + 1e-9),
                      key=lambda v: (v.ppl_of(evalset), v.bpw, v.id))
        if not fits:
            out.append(Searched(evalset, u, None, None, None))
            continue
        decision, p = decide_runs(u, fits[0], evalset)
        out.append(Searched(evalset, u, fits[0], decision, p))
    return sorted(out, key=lambda c: (c.point.method, c.point.config.target_bpw, c.point.id))


SEARCH_OUTCOME = {"better": "the search is significantly better", "worse": "the search is significantly worse",
                  "no significant difference": "no significant difference", "equal": "equal (no gain)"}


def searched_line(c: Searched) -> str:
    """One sentence per searched configuration and eval set."""
    u, s = c.point, c.evalset
    head = f"**{name(u)}, {s}** ({u.bpw:.3f} bpw): PPL {fmt_ppl(u, s)} ({u.seeds} seed(s))"
    if c.uniform is None:
        return head + f"; no uniform configuration stores {u.bpw:.3f} bpw or less."
    b = c.uniform
    line = head + f"; the best uniform at <= its bpw, {describe(b)}: PPL {fmt_ppl(b, s)}"
    if c.paired is None:
        one = {"better": "the search is better", "worse": "the search is worse"}.get(c.decision or "", c.decision)
        return line + f": {one} (one seed in common: single PPLs, no spread to judge by)."
    return (line + f"; uniform minus search, paired over {c.paired.n} seeds: {c.paired.mean:+.3f} ± "
            f"{c.paired.se:.3f} SE: {SEARCH_OUTCOME.get(c.decision or '', c.decision)}.")


def search_tally(cs: list[Searched]) -> list[str]:
    """Per search method: in how many budgets it beats the best uniform at <= its bpw (paired rule)."""
    out = []
    for m in dict.fromkeys(c.point.method for c in cs):
        mine = [c for c in cs if c.point.method == m and c.uniform is not None]
        wins, ties = (sum(c.decision == d for c in mine) for d in ("better", "no significant difference"))
        out.append(f"**{m} beats the best uniform configuration at <= its bpw in {wins} of {len(mine)} "
                   f"budget(s)**" + (f"; no significant difference in {ties}" if ties else "") + ".")
    return out


def searched_section(us: list[Unit], evalset: str) -> list[str]:
    """The searched configurations of one eval set against uniform ones ([] when there are none)."""
    cs = against_uniform(us, evalset)
    if not cs:
        return []
    return ([f"Searched against uniform at equal storage, {evalset}: each searched configuration against the "
             "best uniform one (one sparsity and width for every linear) that stores no more bits, paired by "
             "seed (2 SE).", ""] + [ln for t in search_tally(cs) for ln in (t, "")]
            + [f"- {searched_line(c)}" for c in cs] + [""])


def figure_names(sets: list[str]) -> dict[str, str]:
    return {s: "frontier.png" if i == 0 else f"frontier_{i}.png" for i, s in enumerate(sets)}


def section(us: list[Unit], sets: list[str], figures: dict[str, str]) -> list[str]:
    """The report's frontier section: its figures (eval set -> file) and the best configuration at each
    target, per eval set."""
    md = ["## Frontier: the best model at a given storage", "",
          "Perplexity against total bpw (codes of kept weights, metadata and mask), a line per sparsity, "
          "searched configurations (each linear its own sparsity and width) as their own markers, the lower "
          "envelope dashed and each of its points named; dense as a horizontal line. The best configuration "
          "that fits in each budget, against the runner-up that fits too (paired over seeds, 2 SE); then every "
          "storage that configurations of different sparsities share; then each searched configuration against "
          "the best uniform one at no more bits.", ""]
    for s in sets:
        if s in figures:
            md += [f"![frontier {s}]({figures[s]})", ""]
        md += [f"- {best_line(best_at(us, s, t))}" for t in TARGETS] + [""]
        same = equal_storage(us, s)
        if same:
            md += [f"At equal storage (configurations of different sparsities within {SAME:g} bpw), {s}:", ""]
            md += [f"- {best_line(b)}" for b in same] + [""]
        md += searched_section(us, s)
    return md
