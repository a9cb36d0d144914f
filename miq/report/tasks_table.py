"""Zero-shot task accuracy in a sweep's report: what runs with ``--tasks`` recorded (``miq/run/tasks.py``), as a
table per configuration (mean +- std over seeds) and as the verdict's comparisons made again on the mean task
accuracy.

A run's *mean task accuracy* is the mean of ``acc`` over the tasks it recorded (tasks that report no ``acc``
are left out). Two configurations are compared on it only when they ran the same tasks with the same number
of examples per prompt and document limit; over seeds, with the paired rule of ``stats.py`` applied to the
task error 1 - accuracy (lower is better, as for perplexity), so "better" means a higher accuracy by more
than twice the standard error of the paired differences.

Runs and configurations are read through what ``results.Run`` and ``results.Unit`` offer (``data``,
``config.seed``, ``runs``), without importing them: the verdict imports this module, and the floors of the
layering stay as they were. No torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from miq.options import fmt_fixed
from miq.report.stats import Decision, Paired, decide_runs, sample_std


def _runs(conf) -> list:
    """The runs of a configuration: a Unit's over seeds, or the run itself."""
    return list(getattr(conf, "runs", None) or [conf])


def _block(run) -> dict:
    block = run.data.get("tasks")
    return block if isinstance(block, dict) and isinstance(block.get("results"), dict) else {}


def accuracies(run) -> dict[str, float]:
    """{task: acc} of one run, the tasks with a finite accuracy only."""
    out = {}
    for name, e in _block(run).get("results", {}).items():
        v = e.get("acc") if isinstance(e, dict) else None
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[name] = float(v)
    return out


def settings(run) -> tuple:
    """What makes two runs' accuracies comparable: the tasks, the examples per prompt and the document limit."""
    b = _block(run)
    return tuple(sorted(accuracies(run))), b.get("fewshot"), b.get("limit")


def mean_accuracy(run) -> float | None:
    acc = accuracies(run)
    return sum(acc.values()) / len(acc) if acc else None


def ran_tasks(conf) -> bool:
    return any(accuracies(r) for r in _runs(conf))


class TaskError:
    """A configuration seen through its mean task error (1 - mean accuracy) per seed, so that ``stats``'s
    paired rule, written for perplexities (lower is better), compares accuracies."""

    def __init__(self, conf):
        self.conf = conf

    def seed_ppl(self, evalset: str) -> dict[int, float]:
        out = {}
        for r in _runs(self.conf):
            m = mean_accuracy(r)
            out[r.config.seed] = math.inf if m is None else 1 - m
        return out

    def ppl_of(self, evalset: str) -> float:
        v = list(self.seed_ppl(evalset).values())
        return sum(v) / len(v) if v and all(math.isfinite(x) for x in v) else math.inf


@dataclass(frozen=True)
class TaskComparison:
    """An MI configuration against its reference on mean task accuracy (means over tasks, then seeds).

    ``paired``: over seeds, the MI accuracy minus the reference's, per seed (positive: MI is better).
    """

    decision: Decision
    mi_accuracy: float | None
    reference_accuracy: float | None
    paired: Paired | None = None


def _mean_over_seeds(conf) -> float | None:
    v = [mean_accuracy(r) for r in _runs(conf)]
    return sum(v) / len(v) if v and None not in v else None


def compare(mi, ref) -> TaskComparison | None:
    """``mi`` against ``ref`` on mean task accuracy; None when neither ran tasks. "no comparison" when only one
    did, or they ran different tasks or settings."""
    if ref is None or not (ran_tasks(mi) or ran_tasks(ref)):
        return None
    kinds = {settings(r) for r in _runs(mi) + _runs(ref)}
    a, b = _mean_over_seeds(mi), _mean_over_seeds(ref)
    if len(kinds) > 1 or a is None or b is None:
        return TaskComparison("no comparison", a, b)
    decision, p = decide_runs(TaskError(mi), TaskError(ref), "tasks")
    return TaskComparison(decision, a, b, p)


# ----------------------------------------------------------------------------------------------------------
# the report's section


def _cell(values: list[float | None]) -> str:
    """mean +- sample std over seeds (the value alone for one seed); n/a when a seed lacks it."""
    if not values or None in values:
        return "n/a"
    mean = sum(values) / len(values)
    return fmt_fixed(mean) if len(values) == 1 else f"{fmt_fixed(mean)} +- {fmt_fixed(sample_std(values))}"


def _table(confs: list, names: list[str]) -> list[str]:
    header = ["configuration", "method", "target sparsity", "wbits budget", "K", "seeds", "bpw (mean)",
              *names, "mean"]
    rows = []
    for u in confs:
        runs = _runs(u)
        cells = [_cell([accuracies(r).get(n) for r in runs]) for n in names]
        k = "-" if u.groups == 0 else str(u.groups)
        rows.append([u.id, u.method, u.sparsity_label, u.wbits_label, k, str(len(runs)), f"{u.bpw:.4f}", *cells,
                     _cell([mean_accuracy(r) for r in runs])])
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]


def outcome(t: TaskComparison) -> str:
    """'better by 0.0140 +- 0.0030 SE over 3 seeds' and the like."""
    acc = f"mean accuracy {fmt_fixed(t.mi_accuracy)} vs {fmt_fixed(t.reference_accuracy)}"
    if t.decision == "no comparison":
        return f"{acc}: no comparison (not the same tasks, examples per prompt and limit on both sides)"
    if t.paired is not None:
        d, se, n = t.paired.mean, t.paired.se, t.paired.n
        if t.decision == "no significant difference":
            return f"{acc}: no significant difference ({d:+.4f} +- {se:.4f} SE over {n} seeds)"
        return f"{acc}: {t.decision} by {abs(d):.4f} +- {se:.4f} SE over {n} seeds"
    return f"{acc}: {t.decision}"


def _comparisons(verdict) -> list:
    """(cell, comparison) of every verdict comparison with a task comparison, each pair of runs once."""
    seen, out = set(), []
    for cell in getattr(verdict, "cells", ()):
        for c in (cell.baseline, *cell.controls):
            key = (c.against, c.mi.id, c.reference_id)
            if c.on_tasks is not None and key not in seen:
                seen.add(key)
                out.append((cell, c))
    return out


def verdict_lines(verdict) -> list[str]:
    """The verdict's pairs (chosen on perplexity) compared again on mean task accuracy, with the counts."""
    pairs = _comparisons(verdict)
    if not pairs:
        return []
    lines = []
    for against in dict.fromkeys(c.against for _, c in pairs):
        mine = [c for _, c in pairs if c.against == against]
        wins = sum(c.on_tasks.decision == "better" for c in mine)
        counted = sum(c.on_tasks.decision != "no comparison" for c in mine)
        lines.append(f"- against the {against}: MI has the higher mean task accuracy in {wins} of {counted} "
                     "comparisons")
    for cell, c in pairs:
        lines.append(f"  - sparsity {cell.sparsity}, {cell.family}, {cell.wbits:g}-bit budget (paired on "
                     f"{cell.evalset}): {c.mi.id} vs {c.against} {c.reference_id}: {outcome(c.on_tasks)}")
    return lines


def section(confs: list, verdict) -> list[str]:
    """The report's "Zero-shot tasks" section ([] when no run recorded tasks): the accuracy table over the
    configurations ``confs`` (``results.units``) and the ``verdict``'s comparisons on mean task accuracy."""
    confs = [u for u in confs if ran_tasks(u)]
    if not confs:
        return []
    names = list(dict.fromkeys(n for u in confs for r in _runs(u) for n in accuracies(r)))
    shots = sorted({str(e.get("n_shot")) for u in confs for r in _runs(u) for e in _block(r).get("results", {}).values()
                    if isinstance(e, dict)})
    limits = sorted({str(_block(r).get("limit")) for u in confs for r in _runs(u)})
    versions = sorted({str(_block(r).get("harness_version")) for u in confs for r in _runs(u)})
    lines = ["## Zero-shot tasks", "",
             f"Accuracy (`acc`) on the lm-evaluation-harness tasks the runs were given (`--tasks`; lm-eval "
             f"{', '.join(versions)}; {'/'.join(shots)}-shot; document limit {', '.join(limits)}), mean +- "
             "sample std over seeds where a configuration ran several; mean = the mean over tasks.", ""]
    lines += _table(confs, names) + [""]
    more = verdict_lines(verdict)
    if more:
        lines += ["The verdict's comparisons (the runs it chose on perplexity) made again on the mean task "
                  "accuracy; over seeds, one is better only when the mean paired difference exceeds 2 standard "
                  "errors.", ""] + more + [""]
    return lines
