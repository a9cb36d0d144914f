"""The flags of ``--search`` read into its level grid and checked, torch-free (``config`` calls ``check``).

A level list is given as text (``--search-sparsities 0,0.5,2:4``, ``--search-wbits 2,3,4``,
``--search-groupsize=-1,128``) and kept so in the RunConfig (the JSON says it as typed); ``levels`` turns
the three lists into the grid every linear may take, and says the first bad entry in one line.
"""

from __future__ import annotations

import argparse

from miq.errors import bad_value
from miq.options import Level


def _split(flag: str, text: str, allowed: str) -> list[str]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items or len(set(items)) != len(items):
        raise bad_value(flag, repr(text), f"need comma-separated distinct values, {allowed}")
    return items


def _masks(text: str) -> list[tuple[float, int, int]]:
    """--search-sparsities: (sparsity, n, m) per entry, an unstructured fraction in [0, 1) or "N:M"."""
    allowed = "each a sparsity in [0, 1) or N:M with 0 < N < M (e.g. 0,0.5,2:4)"
    out = []
    for item in _split("--search-sparsities", text, allowed):
        try:
            n, m = (int(x) for x in item.split(":")) if ":" in item else (0, 0)
            s = 0.0 if ":" in item else float(item)
        except ValueError:
            raise bad_value("--search-sparsities", item, allowed) from None
        if not (0 <= s < 1 and (n, m) == (0, 0) or ":" in item and 0 < n < m):
            raise bad_value("--search-sparsities", item, allowed)
        out.append((s, n, m))
    return out


def _ints(flag: str, text: str, ok, allowed: str) -> list[int]:
    out = []
    for item in _split(flag, text, allowed):
        try:
            v = int(item)
        except ValueError:
            raise bad_value(flag, item, allowed) from None
        if not ok(v):
            raise bad_value(flag, item, allowed)
        out.append(v)
    return out


def levels(cfg) -> tuple[Level, ...]:
    """The level grid of a search (each linear may take any of them): masks x grids x widths, in that order; an
    unquantized width (16) once per mask, as it has no grid. ConfigError naming the flag on a bad list."""
    widths = _ints("--search-wbits", cfg.search_wbits, lambda v: 2 <= v <= 8 or v == 16,
                   "each a width in 2..8, or 16 for not quantized")
    sizes = _ints("--search-groupsize", cfg.search_groupsize, lambda v: v == -1 or v > 0,
                  "each -1 (one grid per row) or a positive number of columns")
    out: list[Level] = []
    for s, n, m in _masks(cfg.search_sparsities):
        out += [Level(s, n, m, w, g) for g in sizes for w in widths if w != 16]
        out += [Level(s, n, m, 16, -1)] if 16 in widths else []
    return tuple(out)


def check(a: argparse.Namespace, groups, count_max: int) -> None:
    """--search chooses each linear's mask and width under --target-bpw; the flags that fix them are refused."""
    if not a.search:
        return
    if a.target_bpw is None:
        raise bad_value("--search", a.search, "needs --target-bpw X (the storage budget the search meets)")
    fixed = [("--sparsity", a.sparsity), ("--prunen", a.prunen), ("--groupsize", a.groupsize != -1),
             ("--groups", groups != 0), ("--gmp", a.gmp)]
    for flag, given in fixed:
        if given:
            raise bad_value("--search", a.search, f"chooses each linear's sparsity, width and grid itself; drop {flag}")
    grid = levels(a)
    if a.act_order and any(lv.prunen for lv in grid):
        raise bad_value("--search-sparsities", a.search_sparsities, "N:M with --act-order: the mask is chosen in "
                        "processing order, so its storage (an N:M index or a bitmask) is not known from the settings")
    for flag, value in [("--search-generations", a.search_generations), ("--search-windows", a.search_windows)]:
        if not 1 <= value <= count_max:
            raise bad_value(flag, value, f"must be in 1..{count_max}")
