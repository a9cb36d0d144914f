"""A configuration of the frontier in words, and what sets it apart: "50% + 3-bit g128", "search-evo @3.0".

Method labels ("sparsegpt+uniform") name how a run was made, not where it sits: five points of one frontier
share that label. The figure and the report name each point by its sparsity and kept width (and grid and
order), and a searched one by its search and budget. Kept apart from ``frontier.py`` so the figure
(``plots.py``) names points the same way without depending on the frontier's comparisons.
"""

from __future__ import annotations

from typing import Protocol

from miq import methods
from miq.options import fmt_num
from miq.run.config import RunConfig


class Configuration(Protocol):
    """A ``results.Run`` or ``results.Unit``: its recorded config, its method label and its JSON."""

    config: RunConfig
    method: str
    data: dict
    sparsity_label: str


def searched(u: Configuration) -> bool:
    """A configuration whose masks and widths a search chose per linear (``--search``)."""
    return bool(u.config.search)


def line_of(u: Configuration) -> str:
    """What sets a configuration apart on the frontier: its sparsity, or for a searched one its search
    (a line of the figure each; configurations of different ones at one storage are compared there)."""
    return u.method if searched(u) else f"sparsity {u.sparsity_label}"


def _sparsity_name(u: Configuration) -> str:
    cfg = u.config
    if not cfg.pruning:
        return "dense"
    pattern = f"{cfg.prunen}:{cfg.prunem}" if cfg.prunen else f"{100 * cfg.sparsity:g}%"
    return pattern + (" magnitude" if cfg.gmp else "")


def _budget(bpw: float) -> str:
    """A budget as the figure names it: 3.0, 2.5, 3.25 (one decimal at least, so it reads as bpw)."""
    return f"{bpw:.1f}" if round(bpw, 1) == bpw else f"{bpw:g}"


def name(u: Configuration) -> str:
    """What a configuration is, in a few words: "50% + 3-bit g128", "dense 4-bit act-order", "2:4 fp16",
    or for a searched one its budget and the share of weights it pruned: "search-evo @3.0, 12% pruned"."""
    cfg = u.config
    if searched(u):
        pruned = float(u.data.get("sparsity") or 0.0)
        return f"{u.method} @{_budget(cfg.target_bpw)}" + (f", {100 * pruned:.0f}% pruned" if pruned >= 0.005 else "")
    sparsity = _sparsity_name(u)
    if not cfg.quantizing:
        return f"{sparsity} fp16"
    quant = methods.signature(cfg)[1]
    if quant is not None and quant[0] == "uniform":
        how = ["act-order"] * cfg.act_order + [f"g{cfg.groupsize}"] * (cfg.groupsize > 0)
    else:  # a grouped method: its label says how
        how = [u.method.split("+")[-1]]
    width = " ".join([f"{fmt_num(cfg.wbits)}-bit", *how])
    return f"{sparsity} {width}" if sparsity == "dense" else f"{sparsity} + {width}"
