"""Flags that would change nothing given the others: refused, so that a run never looks like what it is not.

A flag counts as given when its value differs from the parser's default. Most such combinations are refused
(``ConfigError``: one line naming the flag and why it does nothing). The MI estimator's flags are warned about
instead where no MI is computed: a sweep's ``--extra`` gives them to every method, and only some compute MI.
"""

from __future__ import annotations

import argparse

from miq.errors import NoEffectError
from miq.options import needs_mi

# --plot-layer without figures: preflight warns (a sweep's --extra gives it to every configuration)
GROUP_FLAGS = ("strategy", "cluster", "bit_alloc", "alloc_cost", "bits_choices", "mi_alpha", "target_bpw")
MI_FLAGS = ("mi_samples", "mi_bins", "mi_binning", "mi_bias", "mi_normalize", "mi_estimator")
HESSIAN_FLAGS = ("true_sequential", "percdamp", "blocksize")
TASK_FLAGS = ("tasks_fewshot", "tasks_limit", "tasks_batch")
SEARCH_FLAGS = ("search_sparsities", "search_wbits", "search_groupsize", "search_cache", "search_generations",
                "search_windows")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-") if dest != "prune_only" else "--prune_only"


def check(a: argparse.Namespace, groups, defaults: dict) -> tuple[str, ...]:
    """Refuse the first flag that would do nothing (NoEffectError); return warnings for MI flags that do nothing."""
    given = [d for d in defaults if d in vars(a) and getattr(a, d) != defaults[d]]
    quantizing, pruning = a.wbits != 16 or a.target_bpw is not None, bool(a.sparsity or a.prunen)
    for d in given:
        why = _why(d, a, groups, quantizing, pruning)
        if why:
            raise NoEffectError(f"{_flag(d)} {_value(getattr(a, d))}: {why}", _flag(d))
    unused = [_flag(d) for d in given if d in MI_FLAGS]
    if unused and not (quantizing and needs_mi(groups, a.cluster, a.bit_alloc)):
        why = ("without --groups K" if groups == 0 or not quantizing else
               "with --groups all" if groups == "all" else f"with --cluster {a.cluster} and --bit-alloc {a.bit_alloc}")
        return (f"{', '.join(unused)}: no MI is computed {why}; ignored",)
    return ()


def _value(v) -> str:
    return "" if isinstance(v, bool) else str(v)


def _why(d: str, a: argparse.Namespace, groups, quantizing: bool, pruning: bool) -> str | None:
    """Why the given flag ``d`` does nothing in this run, or None."""
    if d in SEARCH_FLAGS and not a.search:
        return "acts on the per-linear search; give --search knapsack or evo (with --target-bpw)"
    if d in ("search_generations", "search_windows") and a.search != "evo":
        return "acts on the evolutionary search; give --search evo"
    if d == "target_bpw" and a.search:
        return None  # the search's budget
    if d == "save_format" and not a.save:
        return "chooses the format of --save's folder; give --save DIR"
    if d in TASK_FLAGS and not a.tasks.strip():
        return "acts on the harness's tasks; give --tasks (task names or task YAML files)"
    if not (quantizing or pruning) and d in (*HESSIAN_FLAGS, "act_order"):
        return "this run compresses nothing (give --sparsity, --prunen/--prunem or --wbits)"
    if a.gmp and d in HESSIAN_FLAGS:
        return "magnitude pruning (--gmp) accumulates no Hessian and has no column blocks"
    if not quantizing and d in ("groupsize", "sym", *GROUP_FLAGS):
        return "acts on quantization; this run does not quantize (set --wbits below 16)"
    if groups == 0 and d in GROUP_FLAGS:
        return "acts on channel groups; give --groups K (or all)"
    if groups == "all" and d == "cluster":
        return "with --groups all every channel is its own group: nothing is clustered"
    if groups == "all" and d == "strategy":
        return "with --groups all every row is its own group: there is nothing to share"
    if a.bit_alloc == "uniform" and d == "target_bpw":
        return "--bit-alloc uniform gives every group one whole width; meeting a storage target takes an allocation"
    if a.bit_alloc == "uniform" and d == "alloc_cost":
        return "--bit-alloc uniform gives every group the same width and computes no costs"
    if a.bit_alloc != "hessian-mi" and d == "mi_alpha":
        return "weighs hessian-mi's costs; give --bit-alloc hessian-mi"
    return None
