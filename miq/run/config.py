"""The command line of ``opt_mi.py`` validated into one frozen ``RunConfig`` (the record, its defaults and the flags
are in ``flags.py``).

Every choice list comes from ``miq.options`` (which the algorithms check their arguments against) and the save
formats from ``miq.checkpoint.formats``, so the CLI cannot drift from what the code accepts; the module
imports no torch, so reports read a run's config without it. ``parse(argv)`` returns a ``RunConfig``
whose fields keep one type each (``groups`` is an int or the string "all", ``bits_choices`` a tuple of ints,
``mi_alpha`` a float); a bad value raises ``ConfigError``, whose text is the one line the CLI prints before
exiting with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from typing import Literal

from miq.checkpoint import formats
from miq.data_names import validate_name
from miq.errors import ConfigError, DataError, bad_value
from miq.options import DEFAULT_MI_ALPHA, fmt_num
from miq.run import no_effect, search_flags
from miq.run.flags import RunConfig, build_parser

SEED_MAX = 2**32 - 1  # numpy's and scikit-learn's random_state take 0 .. 2**32 - 1
PERCDAMP_MAX = 100.0  # damping of 100x the mean diagonal already makes H^-1 a scaled identity (RTN)
PERCDAMP_MIN = 1e-12  # below, the damping is lost to float32 rounding of H's diagonal: Cholesky of a singular H
DEVICE = re.compile(r"(cpu|cuda)(:(0|[1-9][0-9]*))?")  # --device syntax; preflight checks the machine has it
COUNT_MAX = 2**31 - 1  # the largest window count, length, block, bin or sample count a flag may give


def _groups(text: str) -> int | Literal["all"]:
    g = text.strip().lower()
    if g == "all":
        return "all"
    try:
        k = int(g)
    except ValueError:
        k = -1
    if k < 0:
        raise bad_value("--groups", text, "must be an integer K >= 0 or 'all'")
    return k


def _bits_choices(text: str) -> tuple[int, ...]:
    try:
        choices = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        choices = []
    if not choices or choices != sorted(set(choices)) or not all(1 <= c <= 8 for c in choices):
        raise bad_value("--bits-choices", repr(text), "need comma-separated increasing integers in 1..8 (the "
                        "widths the packed format and the bits account store), e.g. 2,3,4")
    return tuple(choices)


def _check_finite(a: argparse.Namespace) -> None:
    """NaN passes every comparison that a range check makes (nan < 0 is False), so reject it by name first."""
    for flag, value in [("--sparsity", a.sparsity), ("--wbits", a.wbits), ("--percdamp", a.percdamp),
                        ("--mi-alpha", a.mi_alpha), ("--target-bpw", a.target_bpw)]:
        if value is not None and not math.isfinite(value):
            raise bad_value(flag, value, "must be a finite number")


def _check_ranges(a: argparse.Namespace) -> None:
    _check_finite(a)
    if not 0 <= a.seed <= SEED_MAX:
        raise bad_value("--seed", a.seed, f"must be in 0..{SEED_MAX} (the range numpy and scikit-learn seeds take)")
    if not 0 <= a.sparsity < 1:
        raise bad_value("--sparsity", a.sparsity, "must be in [0, 1)")
    if (a.prunen == 0) != (a.prunem == 0):
        raise bad_value("--prunen/--prunem", f"{a.prunen}:{a.prunem}", "set both (N < M) or neither")
    if a.prunen and not 0 < a.prunen < a.prunem:
        raise bad_value("--prunen/--prunem", f"{a.prunen}:{a.prunem}", "need 0 < N < M")
    if a.prunen and a.sparsity:
        raise bad_value("--sparsity", a.sparsity, "use either --sparsity or --prunen/--prunem, not both")
    if not (2 <= a.wbits <= 8 or a.wbits == 16):
        raise bad_value("--wbits", fmt_num(a.wbits), "must be in 2..8, or 16 for no quantization")
    if a.groupsize <= 0 and a.groupsize != -1:
        raise bad_value("--groupsize", a.groupsize, "must be a positive number of columns, or -1 for none")
    _check_counts(a)
    if not PERCDAMP_MIN <= a.percdamp <= PERCDAMP_MAX:
        raise bad_value("--percdamp", a.percdamp, f"must be in [{PERCDAMP_MIN:g}, {PERCDAMP_MAX:g}]")
    if a.gmp and not (a.sparsity or a.prunen or a.wbits != 16):
        raise ConfigError("--gmp: nothing to prune or quantize; add --sparsity, --prunen/--prunem or --wbits")


def _check_counts(a: argparse.Namespace) -> None:
    """Counts lie in [low, COUNT_MAX]: beyond 2**31 - 1 they overflow the int32/int64 index arithmetic of
    torch before any memory check could speak (larger sizes that fit are bounded by memory, in preflight)."""
    counts = [("--nsamples", a.nsamples, 1), ("--seqlen", a.seqlen, 2), ("--eval-batch", a.eval_batch, 1),
              ("--blocksize", a.blocksize, 1), ("--groupsize", a.groupsize, -1), ("--prunen", a.prunen, 0),
              ("--prunem", a.prunem, 0), ("--mi-samples", a.mi_samples, 2), ("--mi-bins", a.mi_bins, 2),
              ("--tasks-fewshot", a.tasks_fewshot, 0), ("--tasks-limit", a.tasks_limit, 1),
              ("--tasks-batch", a.tasks_batch, 1)]
    for flag, value, low in counts:
        if value is None:
            continue
        if value < low:
            raise bad_value(flag, value, f"must be at least {low}")
        if value > COUNT_MAX:
            raise bad_value(flag, value, f"must be at most {COUNT_MAX}")


def _check_device(text: str | None) -> None:
    """The syntax of --device (is it a device at all); whether this machine has it is checked in preflight."""
    if text is not None and not DEVICE.fullmatch(text):
        raise bad_value("--device", repr(text), "must be cpu, cuda or cuda:N")


def _check_eval(cfg: RunConfig) -> None:
    """Every eval set exists (name or file), and there is at least one: a run that evaluates nothing is a slip."""
    if not cfg.eval_names():
        raise bad_value("--eval", repr(cfg.eval), "names no eval set; give at least one (a name or a file)")


def is_task_file(name: str) -> bool:
    """Whether a --tasks entry names a task YAML file rather than a harness task (names hold no path separator)."""
    return name.lower().endswith((".yaml", ".yml")) or "/" in name or os.sep in name


def _check_tasks(cfg: RunConfig) -> None:
    """--tasks names something, nothing twice, and every task file exists; whether the harness is installed and
    knows the names is checked before any work too (``miq.run.task_plan.prepare``), as that needs the harness."""
    names = cfg.task_names()
    if cfg.tasks.strip() and not names:
        raise bad_value("--tasks", repr(cfg.tasks), "names no task; give harness task names or task YAML files")
    for i, name in enumerate(names):
        if name in names[:i]:
            raise bad_value("--tasks", name, "is named twice")
        if is_task_file(name) and not os.path.isfile(name):
            raise bad_value("--tasks", name, "no such task file (a task YAML; harness task names hold no '/' and no "
                            ".yaml)")


def _check_target(a: argparse.Namespace) -> None:
    """--target-bpw replaces --wbits; whether a model can meet it is known from its shapes (miq/run/target.py)."""
    if a.target_bpw is None:
        return
    if a.wbits != 16:
        raise bad_value("--target-bpw", fmt_num(a.target_bpw), "give either --wbits (the kept weights' mean width) or "
                        "--target-bpw (the total storage), not both")
    if not 0 < a.target_bpw < 16:
        raise bad_value("--target-bpw", fmt_num(a.target_bpw), "must be above 0 and below 16 (fp16)")


def _check_grouping(a: argparse.Namespace, groups, choices: tuple[int, ...]) -> None:
    _check_target(a)
    quantizing = a.wbits != 16 or a.target_bpw is not None
    if groups != 0:
        if not quantizing:
            raise bad_value("--groups", groups, "needs quantization: set --wbits below 16")
        if a.target_bpw is None and not choices[0] <= a.wbits <= choices[-1]:
            raise bad_value("--wbits", fmt_num(a.wbits),
                            f"the budget must lie within --bits-choices [{choices[0]}, {choices[-1]}]")
        if a.gmp:
            raise bad_value("--groups", groups, "MI grouping runs inside SparseGPT; it is not available with --gmp")
        if a.mi_axis == "input" and a.groupsize > 0:
            raise bad_value("--groupsize", a.groupsize, "--mi-axis input makes the column groups; drop --groupsize "
                            "(--cluster contiguous with K = in_features / G gives GPTQ's groups)")
        if a.mi_axis == "input" and groups == "all":
            raise bad_value("--groups", "all", "on --mi-axis input every column its own group would store a scale per "
                            "weight; give a number of column groups K")
        if a.mi_axis == "input" and a.strategy == "shared":
            raise bad_value("--strategy", "shared", "shares a grid between rows; on --mi-axis input every (row, "
                            "column group) has its own scale/zero")
    elif quantizing and a.wbits != int(a.wbits):
        raise bad_value("--wbits", fmt_num(a.wbits),
                        "fractional budgets need --groups (uniform quantization uses whole bits)")


def from_namespace(a: argparse.Namespace) -> RunConfig:
    """Validate parsed flags into a RunConfig (ConfigError on the first problem, in flag order)."""
    _check_ranges(a)
    groups = _groups(a.groups)
    choices = _bits_choices(a.bits_choices)
    _check_grouping(a, groups, choices)
    search_flags.check(a, groups, COUNT_MAX)
    alpha = a.mi_alpha
    if alpha is None:
        alpha = DEFAULT_MI_ALPHA if a.bit_alloc == "hessian-mi" else 0.0
    if alpha < 0:
        raise bad_value("--mi-alpha", alpha, "must be >= 0")
    if a.gmp and a.act_order:
        raise ConfigError("--act-order: orders SparseGPT's column loop; magnitude pruning (--gmp) has none")
    if a.mi_axis == "input" and groups == 0:
        raise bad_value("--mi-axis", "input", "groups input columns: give --groups K (and --wbits below 16)")
    _check_device(a.device)
    warnings = no_effect.check(a, groups, _DEFAULTS)
    cfg = RunConfig(**{**vars(a), "groups": groups, "bits_choices": choices, "mi_alpha": float(alpha),
                       "warnings": warnings})
    _check_eval(cfg)
    _check_tasks(cfg)
    for name in [cfg.dataset] + cfg.eval_names():
        try:
            validate_name(name)
        except DataError as e:
            raise ConfigError(f"{'DATASET' if name == cfg.dataset else '--eval'}: {e}") from None
    problem = formats.flag_problem(cfg)
    if problem:
        raise ConfigError(problem)
    return cfg


_PARSER = build_parser()  # built once: parse_args leaves it as it was (a sweep parses every configuration)
_ACTIONS = [a for a in _PARSER._actions if a.dest != "help"]
_DEFAULTS = {a.dest: a.default for a in _ACTIONS}


def takes_value(flag: str) -> bool:
    """Whether ``flag`` (e.g. "--sym", "--groupsize") is followed by a value on the command line."""
    return next(a.nargs != 0 for a in _ACTIONS if flag in a.option_strings)


def parse(argv: list[str] | None = None) -> RunConfig:
    """Parse and validate opt_mi.py's command line (``-h`` prints help and exits 0)."""
    return from_namespace(_PARSER.parse_args(argv))


def from_json(d: dict) -> RunConfig:
    """The RunConfig recorded in a result JSON's ``config`` block (unknown keys ignored, missing ones default).

    Reports and sweeps read runs through this, so they derive labels exactly as opt_mi.py did.
    """
    names = {f.name for f in dataclasses.fields(RunConfig)}
    kw = {k: v for k, v in d.items() if k in names}
    for key in ("bits_choices", "warnings"):
        if key in kw:
            kw[key] = tuple(kw[key])
    if isinstance(kw.get("groups"), str) and kw["groups"] != "all":
        kw["groups"] = int(kw["groups"])
    return RunConfig(**{"model": "?", "dataset": "?", **kw})
