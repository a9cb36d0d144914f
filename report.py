"""Build a performance report (markdown + plots) from the result JSONs of a sweep.

    python report.py results/sweep            # -> results/sweep/performance_report.md and PNGs beside it

Reads every DIR/*.json that holds "ppl" and "bits" (as written by ``opt_mi.py --json``); the
``<id>.failed.json`` and ``<id>.skipped.json`` notes written by compare_methods.sh are listed, not plotted.
Every number and the verdict are computed from those files, so the report can be rebuilt at any time and
says the same thing whichever way the data falls.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import atomic

# A baseline counts as "equal bits" when it spends at least the MI run's bpw minus this: bpw is printed
# with 4 decimals and two methods at the same budget can differ in the last digits of metadata.
BPW_TOL = 0.005
BIT_KEYS = ("avg_weight_bits", "metadata_bpw", "bpw", "mask_bpw")  # the table's bit columns, in order
BASELINE_FAMILIES = ("uniform", "uniform-g", "per-channel")  # quantized, non-MI, not a control
FIG_SIZE = (10, 6.5)  # inches at FIG_DPI -> 1000 x 650 px
FIG_DPI = 100
FAMILY_STYLE = {  # family -> (color, marker); fixed so colors mean the same thing in every figure
    "dense": ("black", "*"),
    "magnitude": ("tab:gray", "v"),
    "sparsegpt": ("tab:brown", "^"),
    "uniform": ("tab:blue", "s"),
    "uniform-g": ("tab:cyan", "D"),
    "per-channel": ("tab:purple", "P"),
    "mi": ("tab:red", "o"),
    "random": ("tab:olive", "X"),
    "contiguous": ("tab:orange", "h"),
}


@dataclass
class Run:
    id: str
    data: dict
    cfg: dict = field(init=False)

    def __post_init__(self):
        self.cfg = self.data.get("config", {})

    @property
    def method(self) -> str:
        return str(self.data.get("method", self.id))

    @property
    def family(self) -> str:
        return str(self.data.get("family", "?"))

    @property
    def ppl(self) -> dict:
        return self.data["ppl"]

    @property
    def bits(self) -> dict:
        return self.data["bits"]

    @property
    def bpw(self) -> float:
        return float(self.bits["bpw"])

    @property
    def wbits(self) -> float:
        return float(self.cfg.get("wbits", 16))

    @property
    def groups(self):
        """0 (no grouping), "all" (every channel its own group) or an int K."""
        g = self.cfg.get("groups", 0)
        return g if g == "all" else int(g)

    @property
    def sparsity_label(self) -> str:
        """Target sparsity as configured: "0.5", or "2:4" for N:M."""
        n, m = int(self.cfg.get("prunen", 0) or 0), int(self.cfg.get("prunem", 0) or 0)
        return f"{n}:{m}" if n else fmt_num(float(self.cfg.get("sparsity", 0.0)))

    @property
    def sparsity_key(self) -> tuple:
        n, m = int(self.cfg.get("prunen", 0) or 0), int(self.cfg.get("prunem", 0) or 0)
        return (1, 1 - n / m, n, m) if n else (0, float(self.cfg.get("sparsity", 0.0)), 0, 0)

    @property
    def strategy(self) -> str:
        if self.groups in (0, "all") or self.wbits == 16:  # one channel per group: nothing is shared
            return "-"
        return "A (shared)" if self.cfg.get("strategy") == "shared" else "B (independent)"

    def ppl_of(self, evalset: str) -> float:
        """PPL on evalset, +inf when null (diverged) or missing, so that min() never picks it."""
        v = self.ppl.get(evalset)
        return float(v) if v is not None and math.isfinite(float(v)) else math.inf

    def sort_key(self) -> tuple:
        return (self.sparsity_key, self.wbits, self.bpw, self.method, self.id)


# ----------------------------------------------------------------------------------------------------------
# loading


def load_dir(d: Path) -> tuple[list[Run], list[dict], list[dict]]:
    """(result runs, failure notes, skip notes) from the JSON files directly in d."""
    runs, failed, skipped = [], [], []
    for p in sorted(d.glob("*.json")):
        if p.name.startswith("."):
            continue
        try:
            obj = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            print(f"report.py: warning: skipping {p}: {e}", file=sys.stderr)
            continue
        if not isinstance(obj, dict):
            continue
        if p.name.endswith(".failed.json"):
            failed.append({"id": p.name[: -len(".failed.json")], **obj})
        elif p.name.endswith(".skipped.json"):
            skipped.append({"id": p.name[: -len(".skipped.json")], **obj})
        elif isinstance(obj.get("ppl"), dict) and isinstance(obj.get("bits"), dict):
            if not isinstance(obj["bits"].get("bpw"), (int, float)):
                print(f"report.py: warning: skipping {p}: no bits.bpw", file=sys.stderr)
                continue
            runs.append(Run(p.stem, obj))
    runs.sort(key=Run.sort_key)
    done = {r.id for r in runs}
    failed = [f for f in failed if f["id"] not in done]  # a failure since rerun successfully
    return runs, failed, skipped


def eval_sets(runs: list[Run]) -> list[str]:
    seen: dict[str, None] = {}
    for r in runs:
        for k in r.ppl:
            seen.setdefault(k, None)
    return list(seen)


# ----------------------------------------------------------------------------------------------------------
# formatting: fixed decimals so a reader (or a test) can parse the table back and compare to the JSONs


def fmt_num(x: float) -> str:
    return str(int(x)) if float(x) == int(x) else f"{x:g}"


def fmt_ppl(v) -> str:
    return "n/a" if v is None or not math.isfinite(float(v)) else f"{float(v):.3f}"


def fmt_bits(v) -> str:
    return "n/a" if v is None else f"{float(v):.4f}"


def fmt_s(v) -> str:
    return "n/a" if v is None else f"{float(v):.2f}"


def fmt_k(g) -> str:
    return "-" if g == 0 else str(g)


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


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


# ----------------------------------------------------------------------------------------------------------
# sections


def environment(runs: list[Run]) -> list[str]:
    items = [
        ("torch", lambda r: r.data.get("env", {}).get("torch")),
        ("transformers", lambda r: r.data.get("env", {}).get("transformers")),
        ("device", lambda r: r.data.get("env", {}).get("device")),
        ("device name", lambda r: r.data.get("env", {}).get("device_name")),
        ("python", lambda r: r.data.get("env", {}).get("python")),
        ("machine", lambda r: r.data.get("env", {}).get("machine")),
        # a resumed sweep can mix results of different code; shown when opt_mi.py records it
        ("code version", lambda r: r.data.get("env", {}).get("code_version", "not recorded")),
        ("model", lambda r: r.cfg.get("model")),
        ("calibration data", lambda r: r.cfg.get("dataset")),
        ("nsamples", lambda r: r.cfg.get("nsamples")),
        ("seqlen", lambda r: r.cfg.get("seqlen")),
        ("seed", lambda r: r.cfg.get("seed")),
    ]
    rows, differ = [], []
    for name, get in items:
        counts = Counter(str(get(r)) for r in runs)
        if len(counts) == 1:
            rows.append([name, next(iter(counts))])
        else:
            differ.append(name)
            values = "; ".join(f"{v} ({n} run{'s' if n > 1 else ''})" for v, n in counts.most_common())
            rows.append([name, values + " - **differs between runs**"])
    lines = ["## Environment", ""] + md_table(["item", "value"], rows) + [""]
    if differ:
        lines += [f"Runs differ in: {', '.join(differ)}. Compare their numbers with care.", ""]
    return lines


def results_table(runs: list[Run], sets: list[str]) -> list[str]:
    # the best (lowest) PPL per eval set within each (sparsity, wbits budget) group, marked bold
    best: dict[tuple, float] = {}
    for r in runs:
        for s in sets:
            key = (r.sparsity_label, r.wbits, s)
            best[key] = min(best.get(key, math.inf), round(r.ppl_of(s), 3))
    header = ["run", "method", "target sparsity", "measured sparsity", "wbits budget", "K", "strategy",
              "avg bits", "metadata bpw", "bpw", "mask bpw"] + [f"PPL {s}" for s in sets]
    rows = []
    for r in runs:
        b = r.bits
        row = [r.id, r.method, r.sparsity_label, fmt_bits(r.data.get("sparsity")), fmt_num(r.wbits),
               fmt_k(r.groups), r.strategy] + [fmt_bits(b.get(k)) for k in BIT_KEYS]
        for s in sets:
            if s not in r.ppl:
                row.append("-")
                continue
            cell = fmt_ppl(r.ppl[s])
            v = round(r.ppl_of(s), 3)
            is_best = math.isfinite(v) and v == best[(r.sparsity_label, r.wbits, s)]
            row.append(f"**{cell}**" if is_best else cell)
        rows.append(row)
    return [
        "## Results", "",
        "One row per run, sorted by target sparsity, wbits budget and bpw. bpw = average weight bits + "
        "quantization metadata (scales, zeros, bit table, group indices) per weight; the sparsity mask is "
        "reported apart (mask bpw); embeddings and lm_head stay fp16 and are not counted. "
        "**Bold** = best PPL for that eval set among runs with the same target sparsity and wbits budget; "
        "n/a = not finite; - = not evaluated.", "",
    ] + md_table(header, rows) + [""]


def overhead_table(runs: list[Run]) -> list[str]:
    header = ["run", "method", "MI s", "clustering s", "allocation s", "pruning s", "evaluation s", "total s",
              "MI+clustering+allocation share", "pruning share"]
    rows = []
    for r in runs:
        t = r.data.get("timing", {})
        total = t.get("total_s")
        grouping = sum(float(t.get(k) or 0.0) for k in ("mi_s", "cluster_s", "alloc_s"))
        prune = float(t.get("prune_s") or 0.0)
        shares = [f"{100 * x / total:.1f}%" if total else "n/a" for x in (grouping, prune)]
        stages = [fmt_s(t.get(k)) for k in ("mi_s", "cluster_s", "alloc_s", "prune_s", "eval_s", "total_s")]
        rows.append([r.id, r.method] + stages + shares)
    return ["## Overhead", "",
            "Seconds per stage, summed over layers. Pruning = the SparseGPT / magnitude pass itself "
            "(quantization happens inside it); total includes model loading and calibration.", ""] + \
        md_table(header, rows) + [""]


# ----------------------------------------------------------------------------------------------------------
# verdict


def describe(r: Run) -> str:
    k = "" if r.groups == 0 else f", K={r.groups}"
    return f"{r.method}{k}, {r.bpw:.4f} bpw"


def compare(p: float, q: float) -> tuple[str, bool]:
    """Text for PPL p against reference q ('better by ...' / 'worse by ...') and whether p wins."""
    if math.isinf(p) and math.isinf(q):
        return "no comparison (both n/a)", False
    if math.isinf(q):
        return "better (reference PPL n/a)", True
    if math.isinf(p):
        return "worse (MI PPL n/a)", False
    d = q - p
    if d > 0:
        return f"better by {d:.3f} ({100 * d / q:.2f}%)", True
    if d < 0:
        return f"worse by {-d:.3f} ({100 * -d / q:.2f}%)", False
    return "equal (no gain)", False


CONTROL_KEYS = ("strategy", "bit_alloc", "groupsize")  # beside sparsity, wbits and K, what a control shares


def controls_of(m: Run, runs: list[Run], family: str) -> list[Run]:
    """Control runs of a family set up like M: same sparsity, wbits, K, strategy, allocation and groupsize."""
    return [r for r in runs if r.family == family and r.sparsity_label == m.sparsity_label
            and r.wbits == m.wbits and r.groups == m.groups
            and all(r.cfg.get(k) == m.cfg.get(k) for k in CONTROL_KEYS)]


def control_line(m: Run, mis: list[Run], runs: list[Run], family: str, name: str,
                 s: str) -> tuple[str, bool | None]:
    """The best MI run M against its control runs. When M has none (say M is strategy A and the controls are
    B), the best MI run of the cell that has one is compared instead, like for like, and the text says so."""
    order = [m] + [r for r in sorted(mis, key=lambda r: r.ppl_of(s)) if r is not m]
    pairs = [(r, cs) for r in order if (cs := controls_of(r, runs, family))]
    if not pairs:
        return f"no {name} run with the same K, strategy, allocation, wbits and sparsity as any MI run.", None
    x, same = pairs[0]
    c = min(same, key=lambda r: r.ppl_of(s))  # the best control: MI must beat all of them
    text, won = compare(x.ppl_of(s), c.ppl_of(s))
    of = f"best of {len(same)} runs: " if len(same) > 1 else ""
    who = "MI" if x is m else (f"the best MI run has no {name} with its settings; like for like, "
                               f"{x.id} (PPL {fmt_ppl(x.ppl.get(s))})")
    verb = "beats" if won else "does NOT beat"
    return f"{who} {verb} the {name} ({of}{c.id}, PPL {fmt_ppl(c.ppl.get(s))}): {text}.", won


def baseline_line(m: Run, baselines: list[Run], s: str) -> tuple[str, bool | None]:
    """M against the best baseline that spends at least as many bits (None = no equal-bits comparison)."""
    mi = f"MI grouping ({describe(m)}) reaches PPL {fmt_ppl(m.ppl.get(s))}"
    comp = [r for r in baselines if r.bpw >= m.bpw - BPW_TOL]
    if comp:
        b = min(comp, key=lambda r: r.ppl_of(s))
        text, won = compare(m.ppl_of(s), b.ppl_of(s))
        if text.startswith("no comparison"):
            return f"{mi}; the best baseline at equal or higher bpw ({describe(b)}) is n/a too: {text}.", None
        return (f"{mi} vs {fmt_ppl(b.ppl.get(s))} for the best baseline at equal or higher bpw "
                f"({describe(b)}): {text}."), won
    if baselines:
        near = min(baselines, key=lambda r: (abs(r.bpw - m.bpw), r.ppl_of(s)))
        return (f"{mi}, but it uses more bits than every baseline at this sparsity, so no equal-bits claim "
                f"can be made; nearest baseline: {describe(near)}, PPL {fmt_ppl(near.ppl.get(s))} "
                f"(MI {m.bpw:.4f} bpw vs {near.bpw:.4f} bpw)."), None
    return f"{mi}; there is no quantized non-MI baseline at this sparsity to compare with.", None


def verdict(runs: list[Run], sets: list[str]) -> list[str]:
    head = ["## Verdict", "",
            "Computed from the table above. For each target sparsity, wbits budget and eval set, the best MI "
            "run (family mi, lowest PPL) is compared with the best quantized non-MI baseline "
            f"({', '.join(BASELINE_FAMILIES)}) at the same target sparsity whose bpw is at least the MI "
            f"run's bpw minus {BPW_TOL} (a rounding tolerance): the MI run uses equal or fewer bits. "
            "It is also compared with the random-group control (same K, strategy, allocation, wbits and "
            "sparsity); when the best MI run has no such control, the best MI run that has one is compared, "
            "like for like. Relative differences are of the reference PPL. Each configuration ran once, with "
            "one seed: differences of a fraction of a percent may be run-to-run noise (sweep again with "
            "`--extra \"--seed 1\"` into another folder to see).", ""]
    mi_runs = [r for r in runs if r.family == "mi"]
    if not mi_runs:
        return head + ["**No MI-grouping run (family mi) in this directory: no verdict can be given.**", ""]
    several_budgets = len({r.wbits for r in mi_runs}) > 1
    base_wins, rand_wins, lines = [], [], []
    ncells = 0
    for skey in sorted({r.sparsity_key for r in mi_runs}):
        at_s = [r for r in runs if r.sparsity_key == skey]
        baselines = [r for r in at_s if r.family in BASELINE_FAMILIES and r.wbits != 16]
        for w in sorted({r.wbits for r in at_s if r.family == "mi"}):
            mis = [r for r in at_s if r.family == "mi" and r.wbits == w]
            for s in sets:
                m = min(mis, key=lambda r: r.ppl_of(s))
                budget = f", {fmt_num(w)}-bit budget" if several_budgets else ""
                btext, bwon = baseline_line(m, baselines, s)
                rtext, rwon = control_line(m, mis, runs, "random", "random-group control", s)
                ctext, _ = control_line(m, mis, runs, "contiguous", "contiguous-group control", s)
                lines += [f"- **sparsity {m.sparsity_label}{budget}, {s}**: {btext}",
                          f"  - Random control: {rtext}",
                          f"  - Contiguous control (not counted above): {ctext}"]
                ncells += 1
                base_wins += [] if bwon is None else [bwon]
                rand_wins += [] if rwon is None else [rwon]
    overall = (f"**MI grouping beats the best baseline at equal bits in {sum(base_wins)} of {len(base_wins)} "
               f"cells; beats the random control in {sum(rand_wins)} of {len(rand_wins)}.**")
    if len(base_wins) < ncells:
        overall += (f" ({ncells - len(base_wins)} of {ncells} cells have no baseline at equal or higher bpw "
                    "to compare with.)")
    return head + [overall, ""] + lines + [""]


# ----------------------------------------------------------------------------------------------------------
# figures


def _save(fig, path: Path) -> None:
    import plots  # matplotlib only when figures are drawn

    plots.save_png(fig, path, dpi=FIG_DPI)


def _style(family: str) -> tuple[str, str]:
    return FAMILY_STYLE.get(family, ("tab:pink", "x"))


def _log_if_wide(ax, values: list[float]) -> None:
    if values and min(values) > 0 and max(values) / min(values) > 5:
        ax.set_yscale("log")


def _spread_labels(ax, pts: list[tuple[float, float, str]], gap_px: float = 11.0) -> None:
    """Annotate points, pushing labels of nearby points apart vertically so they stay readable."""
    ax.figure.canvas.draw()  # fixes limits and scales, so data -> pixel transforms are final
    placed: list[tuple[float, float]] = []
    for x, y, text in sorted(pts, key=lambda p: p[1]):
        px, py = ax.transData.transform((x, y))
        ly = py
        while any(abs(px - qx) < 220 and abs(ly - qy) < gap_px for qx, qy in placed):
            ly += gap_px
        placed.append((px, ly))
        dy = (ly - py) * 72 / FIG_DPI  # pixels -> points
        ax.annotate(text, (x, y), xytext=(8, dy), textcoords="offset points", fontsize=7, va="center",
                    arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5} if dy else None)


def plot_ppl_vs_bpw(runs: list[Run], evalset: str, path: Path) -> None:
    """Quantized runs as points; unquantized (16-bit) runs as horizontal references, so the 3-5 bpw
    region is not squeezed into a corner by a lone point at 16."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=FIG_SIZE)
    finite = [r for r in runs if math.isfinite(r.ppl_of(evalset))]
    pts = [r for r in finite if r.wbits != 16] or finite
    refs = [r for r in finite if r not in pts]
    for fam in dict.fromkeys(r.family for r in pts):
        color, marker = _style(fam)
        fam_runs = [r for r in pts if r.family == fam]
        ax.scatter([r.bpw for r in fam_runs], [r.ppl_of(evalset) for r in fam_runs], c=color, marker=marker,
                   s=60, label=fam, zorder=3)
    for i, r in enumerate(refs):
        ax.axhline(r.ppl_of(evalset), color=_style(r.family)[0], linestyle=(0, (1 + i, 2)), lw=1,
                   label=f"{r.method} s={r.sparsity_label} ({r.bpw:g} bpw, reference)")
    ys = [r.ppl_of(evalset) for r in finite]
    if finite:
        _log_if_wide(ax, ys)
        if pts:
            lo, hi = min(r.bpw for r in pts), max(r.bpw for r in pts)
            pad = max(0.1, 0.25 * (hi - lo))
            ax.set_xlim(lo - pad, hi + 2.5 * pad)  # room on the right for the labels
        _spread_labels(ax, [(r.bpw, r.ppl_of(evalset), f"{r.id}") for r in pts])
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no finite perplexity on this eval set", ha="center", transform=ax.transAxes)
    ax.set_xlabel("bits per weight (weights + quantization metadata; mask not counted)")
    ax.set_ylabel(f"perplexity on {evalset} (lower is better)")
    ax.set_title(f"PPL vs bpw on {evalset}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


# K-plot lines; blue and purple are left to the uniform and per-channel baselines
LINE_COLORS = ("tab:red", "tab:green", "tab:orange", "tab:olive", "tab:brown", "tab:pink", "tab:gray", "k")


def plot_ppl_vs_k(runs: list[Run], evalset: str, path: Path) -> bool:
    """PPL over numeric K, a line per (method, sparsity, wbits); False (no figure) when no run has a K."""
    import matplotlib.pyplot as plt

    kruns = [r for r in runs if r.groups != "all" and r.groups > 0 and math.isfinite(r.ppl_of(evalset))]
    if not kruns:
        return False
    fig, ax = plt.subplots(figsize=FIG_SIZE)
    lines: dict[tuple, list[Run]] = {}
    for r in sorted(kruns, key=lambda r: r.family != "mi"):  # MI lines first: they get the first colors
        lines.setdefault((r.method, r.sparsity_label, r.wbits), []).append(r)
    ys = []
    for i, ((method, slabel, w), rs) in enumerate(lines.items()):
        rs.sort(key=lambda r: r.groups)
        y = [r.ppl_of(evalset) for r in rs]
        ys += y
        color = LINE_COLORS[i % len(LINE_COLORS)]
        ax.plot([r.groups for r in rs], y, color=color, marker=_style(rs[0].family)[1], markersize=8,
                label=f"{method} (s={slabel}, w={fmt_num(w)})")
    # baselines (blue = uniform, purple = per-channel, as in the bpw plots); one dash style per (s, w)
    styles = iter(["--", "-.", ":", (0, (5, 1))])
    for slabel, w in dict.fromkeys((r.sparsity_label, r.wbits) for r in kruns):
        ls = next(styles, "--")
        for b in runs:
            if (b.family in ("uniform", "per-channel") and b.sparsity_label == slabel and b.wbits == w
                    and math.isfinite(b.ppl_of(evalset))):
                ax.axhline(b.ppl_of(evalset), color=_style(b.family)[0], linestyle=ls,
                           label=f"{b.method} baseline (s={slabel}, w={fmt_num(w)})")
                ys.append(b.ppl_of(evalset))
    ks = sorted({r.groups for r in kruns})
    if len(ks) > 1 and ks[-1] / ks[0] >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    if len(ks) == 1:
        ax.set_xlim(ks[0] / 2, ks[0] * 1.5)
    _log_if_wide(ax, ys)
    ax.set_xlabel("K (channel groups per layer)")
    ax.set_ylabel(f"perplexity on {evalset} (lower is better)")
    ax.set_title(f"PPL vs K on {evalset} (horizontal: uniform and per-channel at the same sparsity/wbits)")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


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


# ----------------------------------------------------------------------------------------------------------


def build(src: Path, out: Path) -> str:
    """Write the report to out (atomically) and the figures beside it; returns the markdown."""
    import matplotlib

    matplotlib.use("Agg")
    runs, failed, skipped = load_dir(src)
    sets = eval_sets(runs)
    out_dir = out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    md = ["# Performance report", "",
          f"Generated by report.py from {len(runs)} result JSON(s) in `{src}` on "
          f"{time.strftime('%Y-%m-%d %H:%M:%S')}; rebuild with `python report.py {src}`.", ""]
    if not runs:
        md += ["No result JSONs (with \"ppl\" and \"bits\") were found.", ""]
    else:
        md += environment(runs) + results_table(runs, sets) + overhead_table(runs)
        figs = ["## Figures", ""]
        for s, name in figure_names(sets).items():
            plot_ppl_vs_bpw(runs, s, out_dir / name)
            figs += [f"![PPL vs bpw on {s}]({name})", ""]
        kpath = out_dir / "ppl_vs_k.png"
        if plot_ppl_vs_k(runs, sets[0], kpath):
            figs += [f"![PPL vs K on {sets[0]}](ppl_vs_k.png)", ""]
        else:
            kpath.unlink(missing_ok=True)  # a stale plot from an earlier build would mislead
            figs += ["No run with a numeric K has a finite PPL: no PPL-vs-K plot.", ""]
        per_run = run_figures(runs, src, out_dir)
        if per_run:
            figs += ["Per-run analysis figures:", ""]
            figs += [f"- {rid}: [{Path(p).name}]({p})" for rid, p in per_run] + [""]
        md += figs + verdict(runs, sets)
    if skipped:
        md += ["## Skipped configurations", ""] + md_table(
            ["configuration", "reason"], [[s["id"], str(s.get("reason", ""))] for s in skipped]) + [""]
    if failed:
        rows = []
        for f in failed:
            err = [ln for ln in str(f.get("error", "")).splitlines() if ln.strip()]
            log = os.path.relpath(src / f"{f['id']}.log", out_dir)
            rows.append([f["id"], str(f.get("returncode", "?")), err[-1].strip()[:200] if err else "",
                         f"[{f['id']}.log]({log})"])
        md += ["## Failed configurations", "",
               f"{len(failed)} configuration(s) failed; the sweep's --retry-failed runs them again.", ""]
        md += md_table(["configuration", "exit code", "last error line", "log"], rows) + [""]
    text = "\n".join(md)
    atomic.write_text(out, text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dir", help="folder with result JSONs (e.g. written by compare_methods.sh)")
    p.add_argument("--out", default=None,
                   help="report file (default DIR/performance_report.md); the PNGs are written beside it")
    args = p.parse_args(argv)
    src = Path(args.dir)
    if not src.is_dir():
        print(f"report.py: error: {src} is not a directory", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else src / "performance_report.md"
    build(src, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
