"""Build a performance report (markdown + plots) from the result JSONs of a sweep.

    python -m miq.report results/sweep   # -> results/sweep/performance_report.md and PNGs

Reads every DIR/*.json that holds "ppl" and "bits" (as written by ``opt_mi.py --json``); the
``<id>.failed.json`` and ``<id>.skipped.json`` notes written by compare_methods.sh are listed, not plotted.
Every number and the verdict are computed from those files, so the report can be rebuilt at any time and
says the same thing whichever way the data falls.

This module only renders: reading the JSONs is ``results.py``, the tables of runs ``tables.py``, the verdict's
decisions ``verdict.py``, the figures ``plots.py``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path

from miq import atomic, methods, slurm_queue
from miq.options import fmt_num
from miq.report import frontier, plots, tasks_table
from miq.report.results import BASELINE_FAMILIES, Run, counted_control, eval_sets, load_dir, units
from miq.report.stats import SIGNIFICANCE
from miq.report.tables import environment, fmt_ppl, md_table, overhead_table, results_table, seeds_table
from miq.report.verdict import BPW_TOL, Cell, Comparison, Verdict, judge

# ----------------------------------------------------------------------------------------------------------
# figures


def figure_names(sets: list[str]) -> dict[str, str]:
    """Eval set -> its ppl_vs_bpw file name: a file's base name for paths, numbered if two would collide."""
    names: dict[str, str] = {}
    for s in sets:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(s).name).strip("_") or "eval"
        name, i = f"ppl_vs_bpw_{base}.png", 2
        while name in names.values():
            name, i = f"ppl_vs_bpw_{base}_{i}.png", i + 1
        names[s] = name
    return names


def run_figures(runs: list[Run], src: Path, out_dir: Path) -> list[tuple[str, str]]:
    """(run id, link) for each per-run figure (mi_matrix.png, ...) that exists, relative to out_dir."""
    found = []
    for r in runs:
        for f in r.data.get("figures") or []:
            for cand in (Path(f), src / f):
                if cand.is_file():
                    found.append((r.id, os.path.relpath(cand.resolve(), out_dir.resolve())))
                    break
    return found


def figures(runs: list[Run], sets: list[str], src: Path, out_dir: Path) -> list[str]:
    """Draw the report's figures into out_dir and link them, with the per-run figures the JSONs list."""
    lines = ["## Figures", ""]
    for s, name in figure_names(sets).items():
        plots.plot_ppl_vs_bpw(runs, s, out_dir / name)
        lines += [f"![PPL vs bpw on {s}]({name})", ""]
    kpath = out_dir / "ppl_vs_k.png"
    if plots.plot_ppl_vs_k(runs, sets[0], kpath):
        lines += [f"![PPL vs K on {sets[0]}](ppl_vs_k.png)", ""]
    else:
        kpath.unlink(missing_ok=True)  # a stale plot from an earlier build would mislead
        lines += ["No run with a numeric K has a finite PPL: no PPL-vs-K plot.", ""]
    per_run = run_figures(runs, src, out_dir)
    if per_run:
        lines += ["Per-run analysis figures:", ""]
        lines += [f"- {rid}: [{Path(p).name}]({p})" for rid, p in per_run] + [""]
    return lines


def frontier_section(us: list, sets: list[str], out_dir: Path) -> list[str]:
    """PPL against total stored bpw and the best configuration per storage target (``frontier.py``)."""
    if not frontier.wanted(us):
        return []
    names = frontier.figure_names(sets)
    for s, name in names.items():
        plots.plot_frontier(us, s, frontier.envelope(us, s), out_dir / name)
    return frontier.section(us, sets, names)


# ----------------------------------------------------------------------------------------------------------
# the verdict's text (the decisions are verdict.py's)

VERDICT_RULES = (
    "Computed from the table above. For each target sparsity, wbits budget and eval set, the best MI "
    "run (family mi for row groups, mi-in for input-column groups; lowest PPL) is compared with the best "
    f"quantized non-MI baseline ({', '.join(BASELINE_FAMILIES)}) at the same target sparsity whose bpw is at least "
    f"the MI run's bpw minus {BPW_TOL} (a rounding tolerance): the MI run uses equal or fewer bits. "
    "It is also compared with the random-group control of its axis (same K, strategy, allocation, wbits and "
    "sparsity); when the best MI run has no such control, the best MI run that has one is compared, "
    "like for like. Relative differences are of the reference PPL. ")
ONE_SEED = ("Each configuration ran once, with one seed: differences of a fraction of a percent may be "
            "run-to-run noise (sweep again with `--seeds \"0 1 2\"` to see).")
OVER_SEEDS = (f"Configurations run with several seeds are judged on their mean PPL, and compared on the PPL "
              f"differences paired by seed: one beats the other only when the mean paired difference exceeds "
              f"{SIGNIFICANCE:g} standard errors; otherwise there is no significant difference. Configurations "
              "with one seed are compared on that one PPL.")
VERDICT_HEAD = ["## Verdict", "", VERDICT_RULES + ONE_SEED, ""]


def describe(r: Run) -> str:
    k = "" if r.groups == 0 else f", K={r.groups}"
    return f"{r.method}{k}, {r.bpw:.4f} bpw"


def outcome_text(c: Comparison) -> str:
    """'better by 0.400 (2.74%)' and the like: the decision, with the difference when both PPLs exist; over
    seeds, the mean paired difference with its standard error."""
    if c.paired is not None:
        d, se, n = c.paired.mean, c.paired.se, c.paired.n
        stats = f"{abs(d):.3f} +- {se:.3f} SE over {n} seeds ({100 * abs(d) / c.reference_ppl:.2f}%)"
        if c.decision == "no significant difference":
            side = "lower" if d > 0 else "higher"  # d = other PPL - MI PPL, paired by seed
            return (f"no significant difference (MI's PPL {side} by {abs(d):.3f} +- {se:.3f} SE on average over "
                    f"{n} seeds, within {SIGNIFICANCE:g} SE)")
        if c.decision == "equal":
            return f"equal over {n} seeds (no gain)"
        return f"{c.decision} by {stats}"
    p, q = c.mi_ppl, c.reference_ppl
    if c.decision == "no comparison":
        return "no comparison (both n/a)"
    if c.decision == "equal":
        return "equal (no gain)"
    d = q - p  # printed as 100 * d / q, not from c.relative, so the digits stay those of earlier reports
    if c.decision == "better":
        return "better (reference PPL n/a)" if math.isinf(q) else f"better by {d:.3f} ({100 * d / q:.2f}%)"
    return "worse (MI PPL n/a)" if math.isinf(p) else f"worse by {-d:.3f} ({100 * -d / q:.2f}%)"


def baseline_text(c: Comparison) -> str:
    m, b, s = c.mi, c.reference, c.evalset
    mi = f"MI grouping ({describe(m)}) reaches PPL {fmt_ppl(m.ppl.get(s))}"
    if c.decision == "no baseline" or b is None:
        return f"{mi}; there is no quantized non-MI baseline at this sparsity to compare with."
    if c.decision == "no equal-bits baseline":
        return (f"{mi}, but it uses more bits than every baseline at this sparsity, so no equal-bits claim "
                f"can be made; nearest baseline: {describe(b)}, PPL {fmt_ppl(b.ppl.get(s))} "
                f"(MI {m.bpw:.4f} bpw vs {b.bpw:.4f} bpw).")
    if c.decision == "no comparison":
        return (f"{mi}; the best baseline at equal or higher bpw ({describe(b)}) is n/a too: "
                f"{outcome_text(c)}.")
    return (f"{mi} vs {fmt_ppl(b.ppl.get(s))} for the best baseline at equal or higher bpw "
            f"({describe(b)}): {outcome_text(c)}.")


def control_text(c: Comparison) -> str:
    name = f"{c.against}-group control"
    x, ctl, s = c.mi, c.reference, c.evalset
    if c.decision == "no control" or ctl is None:
        return f"no {name} run with the same K, strategy, allocation, wbits and sparsity as any MI run."
    of = f"best of {c.candidates} runs: " if c.candidates > 1 else ""
    who = "MI" if not c.like_for_like else (f"the best MI run has no {name} with its settings; like for like, "
                                            f"{x.id} (PPL {fmt_ppl(x.ppl.get(s))})")
    verb = {"better": "beats", "no significant difference": "does not significantly differ from"}.get(
        c.decision, "does NOT beat")
    line = f"{who} {verb} the {name} ({of}{ctl.id}, PPL {fmt_ppl(ctl.ppl.get(s))}): {outcome_text(c)}."
    gap = x.bpw - ctl.bpw  # controls match K and budget, not the bits spent: say when those differ
    if abs(gap) > BPW_TOL:
        line += (f" Not at equal bits: MI spends {abs(gap):.4f} {'more' if gap > 0 else 'fewer'} bpw "
                 f"({x.bpw:.4f} vs {ctl.bpw:.4f}).")
    return line


def cell_lines(cell: Cell, several_budgets: bool, several_families: bool = False) -> list[str]:
    """A cell's bullet (MI against the baseline) and one sub-bullet per control; the budget (the MI family)
    is named only when the MI runs have several, so the usual one-budget sweep reads short."""
    budget = f", {fmt_num(cell.wbits)}-bit budget" if several_budgets else ""
    family = f", {cell.family}" if several_families else ""
    lines = [f"- **sparsity {cell.sparsity}{family}{budget}, {cell.evalset}**: {baseline_text(cell.baseline)}"
             + mixed_text(cell.baseline)]
    for c in cell.controls:
        counted = "" if c.against == counted_control(cell.family) else " (not counted above)"
        lines.append(f"  - {c.against.capitalize()} control{counted}: {control_text(c)}{mixed_text(c)}")
    return lines


MIXED = "different devices or thread counts"


def mixed_text(c: Comparison) -> str:
    """The mark of a comparison whose runs ran on different devices or thread counts ("" otherwise)."""
    if not c.mixed:
        return ""
    return f" *Not like for like: these runs ran on {MIXED} ({'; '.join(c.executions)}).*"


def headline(v: Verdict, family: str | None = None) -> str:
    """The counts of wins (and of cells without a significant difference, over seeds) of one MI family."""
    (bw, bn), (rw, rn) = v.baseline_wins, v.control_wins
    who = "MI grouping" if family is None else f"MI grouping on the {methods.axis_of(family)} axis ({family})"
    overall = (f"**{who} beats the best baseline at equal bits in {bw} of {bn} "
               f"cells; beats the random control in {rw} of {rn}.**")
    nb, nr = v.not_significant
    if v.over_seeds:
        overall += (f" No significant difference from the baseline in {nb} of {bn} cells, from the random "
                    f"control in {nr} of {rn}.")
    if bn < len(v.cells):
        overall += (f" ({len(v.cells) - bn} of {len(v.cells)} cells have no baseline at equal or higher bpw "
                    "to compare with.)")
    return overall


def verdict_section(runs: list[Run], sets: list[str]) -> list[str]:
    """The rules, the counts of wins (with the cells left out of them), then every cell."""
    v = judge(runs, sets)
    if v is None:
        return VERDICT_HEAD + ["**No MI-grouping run (family mi) in this directory: no verdict can be given.**", ""]
    head = VERDICT_HEAD if not v.over_seeds else ["## Verdict", "", VERDICT_RULES + OVER_SEEDS, ""]
    several = len(v.families) > 1
    overall = [headline(v.of(f), f) for f in v.families] if several else [headline(v)]
    lines = [ln for cell in v.cells for ln in cell_lines(cell, v.several_budgets, several)]
    mixed = sum(c.mixed for cell in v.cells for c in (cell.baseline, *cell.controls))
    if mixed:  # counted as they fall, but said: the thread count alone moved PPLs by up to 0.5% in one test
        overall.append(f"{mixed} of the comparisons below pair or average runs made on {MIXED} (marked *not "
                       "like for like*): their differences may come from that alone; rerun them on one device and "
                       "thread count (the sweep's --threads) before reading them.")
    return head + [ln for o in overall for ln in (o, "")] + lines + [""]


# ----------------------------------------------------------------------------------------------------------
# notes from the sweep


def skipped_section(skipped: list[dict]) -> list[str]:
    rows = [[s["id"], str(s.get("reason", ""))] for s in skipped]
    return ["## Skipped configurations", ""] + md_table(["configuration", "reason"], rows) + [""]


def failed_section(failed: list[dict], src: Path, out_dir: Path) -> list[str]:
    """Each failure with its exit code, the last line of its error and a link to its log."""
    rows = []
    for f in failed:
        err = [ln for ln in str(f.get("error", "")).splitlines() if ln.strip()]
        log = os.path.relpath(src / f"{f['id']}.log", out_dir)
        rows.append([f["id"], str(f.get("returncode", "?")), err[-1].strip()[:200] if err else "",
                     f"[{f['id']}.log]({log})"])
    return ["## Failed configurations", "",
            f"{len(failed)} configuration(s) failed; the sweep's --retry-failed runs them again.", ""] + \
        md_table(["configuration", "exit code", "last error line", "log"], rows) + [""]


# ----------------------------------------------------------------------------------------------------------


def build(src: Path, out: Path) -> str:
    """Write the report to out (atomically) and the figures beside it; returns the markdown."""
    runs, failed, skipped = load_dir(src)
    sets = eval_sets(runs)
    out_dir = out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    md = ["# Performance report", "",
          f"Generated by miq.report.markdown from {len(runs)} result JSON(s) in `{src}` on "
          f"{time.strftime('%Y-%m-%d %H:%M:%S')}; rebuild with `python -m miq.report {src}`.", ""]
    if not runs:
        md += ["No result JSONs (with \"ppl\" and \"bits\") were found.", ""]
    else:
        md += environment(runs) + results_table(runs, sets) + seeds_table(runs, sets) + overhead_table(runs)
        md += figures(runs, sets, src, out_dir) + frontier_section(units(runs), sets, out_dir)
        md += verdict_section(runs, sets) + tasks_table.section(units(runs), judge(runs, sets))
    if skipped:
        md += skipped_section(skipped)
    if failed:
        md += failed_section(failed, src, out_dir)
    text = "\n".join(md)
    atomic.write_text(out, text)
    return text


def not_replaceable(out: Path) -> str | None:
    """Why the report may not be written to ``out`` (a folder; a file it did not write), or None."""
    if out.is_dir():
        return "is a folder; give a file path"
    try:
        if out.exists() and not out.read_bytes().startswith(b"# Performance report"):
            return "an existing file this toolkit did not write"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dir", help="folder with result JSONs (e.g. written by compare_methods.sh)")
    p.add_argument("--out", default=None,
                   help="report file (default DIR/performance_report.md); the PNGs are written beside it")
    args = p.parse_args(argv)
    src = Path(args.dir)
    if not src.is_dir():
        print(f"miq.report: error: {src} is not a directory", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else src / "performance_report.md"
    if why := not_replaceable(out):
        print(f"miq.report: error: --out {out}: {why}", file=sys.stderr)
        return 2
    if warning := slurm_queue.in_flight_note(src):
        print(f"miq.report: warning: {warning}", file=sys.stderr)
    try:
        build(src, out)
    except OSError as e:  # disk full, permissions: the figures already drawn stay (each written whole)
        print(f"miq.report: error: could not write the report ({e.strerror or e})", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0

