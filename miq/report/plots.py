"""The sweep report's figures (perplexity against bits per weight, and against K), written straight to PNG
files through ``miq.atomic.write_png``."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from miq import atomic
from miq.report import naming
from miq.report.results import Run

REPORT_FIG_SIZE = (10, 6.5)  # inches at REPORT_FIG_DPI -> 1000 x 650 px
REPORT_FIG_DPI = 100
FAMILY_STYLE = {  # family -> (color, marker); fixed so colors mean the same thing in every figure
    "dense": ("black", "*"),
    "magnitude": ("tab:gray", "v"),
    "sparsegpt": ("tab:brown", "^"),
    "sparsegpt-act-order": ("tab:brown", "<"),
    "uniform": ("tab:blue", "s"),
    "uniform-g": ("tab:cyan", "D"),
    "per-channel": ("tab:purple", "P"),
    "mi": ("tab:red", "o"),
    "random": ("tab:olive", "X"),
    "contiguous": ("tab:orange", "h"),
    "act-order": ("tab:green", "s"),
    "act-order-g": ("tab:green", "D"),
    "mi-in": ("tab:red", "p"),
    "contiguous-in": ("tab:orange", "8"),
    "random-in": ("tab:olive", "H"),
    "range-in": ("tab:pink", "d"),
    "range": ("tab:pink", "<"),
}
# K-plot lines; blue and purple are left to the uniform and per-channel baselines
LINE_COLORS = ("tab:red", "tab:green", "tab:orange", "tab:olive", "tab:brown", "tab:pink", "tab:gray", "k")


def _style(family: str) -> tuple[str, str]:
    return FAMILY_STYLE.get(family, ("tab:pink", "x"))


def _set_name(evalset: str) -> str:
    """An eval set as figures name it: a file's base name (c4_heldout.jsonl), never the full path, which
    would leak the machine's folders into the figure and overflow the title."""
    return Path(evalset).name or evalset


def _log_if_wide(ax: Axes, values: list[float]) -> None:
    """Log scale when the PPLs span more than 5x, so one diverged run does not flatten the others."""
    if values and min(values) > 0 and max(values) / min(values) > 5:
        ax.set_yscale("log")


def _spread_labels(ax: Axes, pts: list[tuple[float, float, str]], gap_px: float = 11.0) -> None:
    """Annotate points, pushing labels of nearby points apart vertically so they stay readable."""
    ax.get_xlim(), ax.get_ylim()  # autoscaled now: the data -> pixel transforms are final (no draw needed)
    placed: list[tuple[float, float]] = []
    for x, y, text in sorted(pts, key=lambda p: p[1]):
        px, py = ax.transData.transform((x, y))
        ly = py
        while any(abs(px - qx) < 220 and abs(ly - qy) < gap_px for qx, qy in placed):
            ly += gap_px
        placed.append((px, ly))
        dy = (ly - py) * 72 / REPORT_FIG_DPI  # pixels -> points
        ax.annotate(text, (x, y), xytext=(8, dy), textcoords="offset points", fontsize=7, va="center",
                    arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5} if dy else None)


def _report_figure() -> tuple[Figure, Axes]:
    """A figure whose tight layout is computed when it is drawn, as it is written: not in a draw of its own."""
    fig = Figure(figsize=REPORT_FIG_SIZE, dpi=REPORT_FIG_DPI, layout="tight")
    return fig, fig.add_subplot()


def _bpw_points(ax: Axes, pts: list[Run], refs: list[Run], evalset: str) -> None:
    """Scatter ``pts`` by family; draw ``refs`` as horizontal lines, each with its own dash pattern."""
    for fam in dict.fromkeys(r.family for r in pts):
        color, marker = _style(fam)
        fam_runs = [r for r in pts if r.family == fam]
        ax.scatter([r.bpw for r in fam_runs], [r.ppl_of(evalset) for r in fam_runs], c=color, marker=marker,
                   s=60, label=fam, zorder=3)
    for i, r in enumerate(refs):
        ax.axhline(r.ppl_of(evalset), color=_style(r.family)[0], linestyle=(0, (1 + i, 2)), lw=1,
                   label=f"{r.method} s={r.sparsity_label} ({r.bpw:g} bpw, reference)")


def plot_ppl_vs_bpw(runs: list[Run], evalset: str, path: Path | str) -> None:
    """PPL over bpw on one eval set. Quantized runs are points; unquantized (16-bit) runs are horizontal
    references, so the 3-5 bpw region is not squeezed into a corner by a lone point at 16. Writes a
    1000 x 650 PNG to ``path`` atomically."""
    fig, ax = _report_figure()
    finite = [r for r in runs if math.isfinite(r.ppl_of(evalset))]
    pts = [r for r in finite if r.config.quantizing] or finite  # a searched run's --wbits stays 16
    refs = [r for r in finite if r not in pts]
    _bpw_points(ax, pts, refs, evalset)
    if finite:
        _log_if_wide(ax, [r.ppl_of(evalset) for r in finite])
        if pts:
            lo, hi = min(r.bpw for r in pts), max(r.bpw for r in pts)
            pad = max(0.1, 0.25 * (hi - lo))
            ax.set_xlim(lo - pad, hi + 2.5 * pad)  # room on the right for the labels
        _spread_labels(ax, [(r.bpw, r.ppl_of(evalset), f"{r.id}") for r in pts])
    _finish_bpw_figure(fig, ax, bool(finite), evalset, "PPL vs bpw", path)


def _finish_bpw_figure(fig: Figure, ax: Axes, drawn: bool, evalset: str, title: str, path: Path | str,
                       log: bool = False) -> None:
    """Legend (or a note that nothing was drawn), the stored-bpw axis, labels and title; written as a PNG."""
    if drawn:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no finite perplexity on this eval set", ha="center", transform=ax.transAxes)
    name = _set_name(evalset)
    ax.set_xlabel("bits per weight stored (kept codes + metadata + mask), all decoder linears")
    ax.set_ylabel(f"perplexity on {name} ({'log scale, ' if log else ''}lower is better)")
    ax.set_title(f"{title} on {name}")
    ax.grid(True, which="both" if log else "major", alpha=0.3)
    atomic.write_png(fig, path, dpi=REPORT_FIG_DPI)


def _k_lines(ax: Axes, kruns: list[Run], evalset: str) -> list[float]:
    """A line over K per (method, sparsity, wbits), MI lines first so they get the first colors; returns
    the PPLs drawn."""
    lines: dict[tuple, list[Run]] = {}
    for r in sorted(kruns, key=lambda r: r.family != "mi"):
        lines.setdefault((r.method, r.sparsity_label, r.wbits), []).append(r)
    ys: list[float] = []
    for i, ((method, slabel, _), rs) in enumerate(lines.items()):
        rs.sort(key=lambda r: r.groups)
        y = [r.ppl_of(evalset) for r in rs]
        ys += y
        ax.plot([r.groups for r in rs], y, color=LINE_COLORS[i % len(LINE_COLORS)], marker=_style(rs[0].family)[1],
                markersize=8, label=f"{method} (s={slabel}, w={rs[0].wbits_label})")
    return ys


def _k_baselines(ax: Axes, runs: list[Run], kruns: list[Run], evalset: str) -> list[float]:
    """Uniform and per-channel runs at each (sparsity, wbits) of the K lines as horizontal lines (their
    colors as in the bpw plots, one dash style per (sparsity, wbits)); returns the PPLs drawn."""
    styles = iter(["--", "-.", ":", (0, (5, 1))])
    ys: list[float] = []
    for slabel, w in dict.fromkeys((r.sparsity_label, r.wbits) for r in kruns):
        ls = next(styles, "--")
        for b in runs:
            if (b.family in ("uniform", "per-channel") and b.sparsity_label == slabel and b.wbits == w
                    and math.isfinite(b.ppl_of(evalset))):
                ax.axhline(b.ppl_of(evalset), color=_style(b.family)[0], linestyle=ls,
                           label=f"{b.method} baseline (s={slabel}, w={b.wbits_label})")
                ys.append(b.ppl_of(evalset))
    return ys


def plot_ppl_vs_k(runs: list[Run], evalset: str, path: Path | str) -> bool:
    """PPL over numeric K on one eval set, with the baselines as horizontal lines; writes a 1000 x 650 PNG
    to ``path`` atomically. False (no figure written) when no run with a numeric K has a finite PPL."""
    kruns = [r for r in runs if r.groups != "all" and r.groups > 0 and math.isfinite(r.ppl_of(evalset))]
    if not kruns:
        return False
    fig, ax = _report_figure()
    ys = _k_lines(ax, kruns, evalset) + _k_baselines(ax, runs, kruns, evalset)
    ks = sorted({r.groups for r in kruns})
    if len(ks) > 1 and ks[-1] / ks[0] >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    if len(ks) == 1:
        ax.set_xlim(ks[0] / 2, ks[0] * 1.5)
    _log_if_wide(ax, ys)
    name = _set_name(evalset)
    ax.set_xlabel("K (channel groups per layer)")
    ax.set_ylabel(f"perplexity on {name} (lower is better)")
    ax.set_title(f"PPL vs K on {name} (horizontal: uniform and per-channel at the same sparsity/wbits)")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    atomic.write_png(fig, path, dpi=REPORT_FIG_DPI)
    return True


FRONTIER_ZOOM = (1.5, 6.0)  # total bpw: the budgets the frontier's question is about (8-bit and fp16 lie beyond)
SEARCH_STYLE = {"evo": ("tab:blue", "*"), "knapsack": ("tab:purple", "P")}  # blue and purple: not in LINE_COLORS


def _frontier_lines(ax: Axes, us: list, evalset: str) -> None:
    """A line per sparsity through its configurations; searched ones as large markers, one kind per search."""
    lines: dict[str, list] = {}
    for u in (u for u in us if not naming.searched(u)):
        lines.setdefault(naming.line_of(u), []).append(u)
    for i, (label, line) in enumerate(sorted(lines.items(), key=lambda kv: kv[1][0].sparsity_key)):
        ax.plot([u.bpw for u in line], [u.ppl_of(evalset) for u in line], color=LINE_COLORS[i % len(LINE_COLORS)],
                marker="o", ms=4, lw=1, label=label)
    found: dict[str, list] = {}
    for u in (u for u in us if naming.searched(u)):
        found.setdefault(u.method, []).append(u)
    for method, pts in found.items():
        color, marker = SEARCH_STYLE.get(pts[0].config.search, ("tab:pink", "X"))
        ax.scatter([u.bpw for u in pts], [u.ppl_of(evalset) for u in pts], c=color, marker=marker, s=170,
                   edgecolors="black", linewidths=0.5, zorder=4, label=f"{method} (each linear its own level)")


def _zoom(ax: Axes, us: list, refs: list, evalset: str) -> list:
    """Limit the axes to FRONTIER_ZOOM (widened to any point below it) when points lie there, and note how
    many lie beyond; the units left in view."""
    xs = [u.bpw for u in us]
    if not any(FRONTIER_ZOOM[0] <= x <= FRONTIER_ZOOM[1] for x in xs):
        return us
    lo, hi = min(FRONTIER_ZOOM[0], min(xs)) - 0.15, FRONTIER_ZOOM[1] + 0.15
    shown = [u for u in us if u.bpw <= hi]
    ys = [u.ppl_of(evalset) for u in shown + refs]
    ax.set_xlim(lo, hi + 0.2 * (hi - lo))  # room on the right for the labels of the last points
    ax.set_ylim(min(ys) / 1.15, max(ys) * 1.15)  # below the dense line: room for the note
    if beyond := len(us) - len(shown):
        ax.text(0.99, 0.01, f"{beyond} configuration(s) above {FRONTIER_ZOOM[1]:g} bpw not drawn (see the table)",
                transform=ax.transAxes, ha="right", va="bottom", fontsize=8, color="0.4")
    return shown


def plot_frontier(units: list, evalset: str, envelope: list, path: Path | str) -> None:
    """PPL (log scale) over total stored bpw: a line per sparsity through its configurations, searched
    configurations as large markers, the lower envelope dashed on top with each of its points named by what
    it is ("50% + 3-bit g128"), uncompressed dense as a horizontal line; zoomed on FRONTIER_ZOOM. 1000 x 650
    PNG to ``path``, atomically."""
    fig, ax = _report_figure()
    finite = sorted((u for u in units if math.isfinite(u.ppl_of(evalset))), key=lambda u: u.bpw)
    refs = [u for u in finite if not u.config.compressing]
    pts = [u for u in finite if u.config.compressing]
    _frontier_lines(ax, pts, evalset)
    for u in refs:
        ax.axhline(u.ppl_of(evalset), color="black", ls=":", lw=1.2,
                   label=f"{naming.name(u)} ({u.bpw:g} bpw): PPL {u.ppl_of(evalset):.3f}")
    if envelope:
        ax.plot([u.bpw for u in envelope], [u.ppl_of(evalset) for u in envelope], color="black", ls="--", lw=1.5,
                marker="s", mfc="none", ms=9, label="lower envelope")
    if finite:
        ax.set_yscale("log")
    shown = _zoom(ax, pts, refs, evalset)
    named = [u for u in shown if u in envelope or naming.searched(u)]
    _spread_labels(ax, [(u.bpw, u.ppl_of(evalset), naming.name(u)) for u in named])
    _finish_bpw_figure(fig, ax, bool(finite), evalset, "Sparsity x width frontier", path, log=True)
