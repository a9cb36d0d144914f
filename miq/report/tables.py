"""The report's tables of runs: the environment, the results (one row per run), the mean over seeds and the
overhead, with the fixed-decimal formatting a reader (or a test) parses back and compares to the JSONs.
``markdown.py`` places them in the report."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

from miq.options import fmt_fixed, fmt_num
from miq.report import naming
from miq.report.results import Run, dtype_of, threads_of, units

BIT_KEYS = ("code_bpw", "metadata_bpw", "mask_bpw", "bpw")  # the table's bit columns, in order

# ----------------------------------------------------------------------------------------------------------
# formatting: fixed decimals so a reader (or a test) can parse the table back and compare to the JSONs


def fmt_ppl(v: float | None) -> str:
    return fmt_fixed(v, 3)


def fmt_bpw(v: float | None) -> str:
    return fmt_fixed(v, 4)


def fmt_s(v: float | None) -> str:
    return fmt_fixed(v, 2)


def fmt_k(g: int | str) -> str:
    return "-" if g == 0 else str(g)


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


# ----------------------------------------------------------------------------------------------------------
# sections


def _env(key: str) -> Callable[[Run], object]:
    return lambda r: r.data.get("env", {}).get(key)


def _recorded(key: str) -> Callable[[Run], object]:
    # the config block as written, not RunConfig's defaults: the table says what each run recorded
    return lambda r: (r.data.get("config") or {}).get(key)


ENV_ITEMS: list[tuple[str, Callable[[Run], object]]] = [
    ("torch", _env("torch")), ("transformers", _env("transformers")), ("device", _env("device")),
    ("device name", _env("device_name")), ("python", _env("python")), ("machine", _env("machine")),
    # a resumed sweep can mix results of different code; shown when opt_mi.py records it
    ("code version", lambda r: r.data.get("env", {}).get("code_version", "not recorded")),
    ("threads", lambda r: threads_of(r.data.get("env") or {}) or "not recorded"),
    ("model", _recorded("model")), ("calibration data", _recorded("dataset")),
    ("nsamples", _recorded("nsamples")), ("seqlen", _recorded("seqlen")), ("seed", _recorded("seed")),
]


def environment(runs: list[Run]) -> list[str]:
    """One row per item; an item whose value differs between runs lists every value and is flagged."""
    rows, differ = [], []
    for name, get in ENV_ITEMS:
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


def _ppl_cells(r: Run, sets: list[str], best: dict[tuple, float], group: tuple) -> list[str]:
    cells = []
    for s in sets:
        if s not in r.ppl:
            cells.append("-")
            continue
        v = round(r.ppl_of(s), 3)  # compared as printed, so ties at 3 decimals are all bold
        is_best = math.isfinite(v) and v == best[(*group, s)]
        cells.append(f"**{fmt_ppl(r.ppl[s])}**" if is_best else fmt_ppl(r.ppl[s]))
    return cells


def budget_cells(r) -> list[str]:
    """The target sparsity and wbits budget cells: as configured, or for a searched run (``--search``), which
    chose both per linear, the search and its --target-bpw (its --sparsity and --wbits stay 0 and 16)."""
    if naming.searched(r):
        return [f"searched ({r.config.search})", f"{fmt_num(r.config.target_bpw)} bpw in all"]
    return [r.sparsity_label, r.wbits_label]


def _result_row(r: Run, sets: list[str], best: dict[tuple, float], mixed: bool) -> list[str]:
    target, budget = budget_cells(r)
    return ([r.id, r.method, target, fmt_bpw(r.data.get("sparsity")), budget, fmt_k(r.groups), r.strategy]
            + [fmt_bpw(r.bits.get(k)) for k in BIT_KEYS] + _ppl_cells(r, sets, best, (target, budget))
            + ([r.execution] if mixed else []))


def results_table(runs: list[Run], sets: list[str]) -> list[str]:
    # the best (lowest) PPL per eval set within each (sparsity, wbits budget) group, marked bold
    best: dict[tuple, float] = {}
    for r in runs:
        for s in sets:
            key = (*budget_cells(r), s)
            best[key] = min(best.get(key, math.inf), round(r.ppl_of(s), 3))
    mixed = len({r.execution for r in runs}) > 1  # then each row says where it ran: PPLs move with it
    header = ["run", "method", "target sparsity", "measured sparsity", "wbits budget", "K", "strategy",
              "code bpw", "metadata bpw", "mask bpw", "bpw"] + [f"PPL {s}" for s in sets] + \
        (["device, threads"] if mixed else [])
    rows = [_result_row(r, sets, best, mixed) for r in runs]
    dtypes = Counter(dtype_of(r) for r in runs)
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else "; ".join(
        f"{d} ({n} run{'s' if n > 1 else ''})" for d, n in dtypes.most_common())
    return [
        "## Results", "",
        "One row per run, sorted by target sparsity, wbits budget and bpw. Per decoder linear weight: code bpw = "
        "the kept weights' codes (a pruned weight stores none; a weight left uncompressed counts 16 bits), "
        "metadata bpw = quantization metadata (scales, zeros, bit table, group indices, permutations), mask bpw = "
        "the sparsity mask; bpw = the three added, what the model stores. Embeddings, positions, norms, biases "
        f"and lm_head are not counted; they stay in the run's dtype ({dtype}). "
        "**Bold** = best PPL for that eval set among runs with the same target sparsity and wbits budget; "
        "n/a = not finite; - = not evaluated." + (" The runs ran on different devices or thread counts (last "
                                                  "column): their PPLs can differ by that alone." if mixed else ""),
        "",
    ] + md_table(header, rows) + [""]


def seeds_table(runs: list[Run], sets: list[str]) -> list[str]:
    """Mean +- standard deviation over seeds of every configuration run with two or more; [] when none was."""
    many = [u for u in units(runs) if u.seeds > 1]
    if not many:
        return []
    header = ["configuration", "method", "target sparsity", "wbits budget", "K", "seeds", "bpw (mean)"] + \
        [f"PPL {s} (mean +- std)" for s in sets]
    rows = [[u.id, u.method, *budget_cells(u), fmt_k(u.groups), seeds_cell(u), fmt_bpw(u.bpw)]
            + [f"{fmt_ppl(u.ppl_of(s))} +- {u.spread(s):.3f}" if math.isfinite(u.ppl_of(s)) else "n/a"
               for s in sets] for u in many]
    return ["## Over seeds", "",
            "Configurations run with several seeds (calibration windows, MI samples, clustering): mean and "
            "sample standard deviation of the PPL over seeds. The verdict compares these configurations "
            "by the PPL differences paired by seed.", ""] + md_table(header, rows) + [""]


def seeds_cell(u) -> str:
    """The number of seeds, and where they ran when not all on one device and thread count."""
    execs = u.executions
    return str(u.seeds) if len(execs) == 1 else f"{u.seeds} (mixed: {'; '.join(execs)})"


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
