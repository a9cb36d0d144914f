"""The command line of ``opt_mi.py`` validated into one frozen ``RunConfig`` (the flags are in ``flags.py``).

Every choice list and default comes from ``miq.options`` (which the algorithms check their arguments against)
and the save formats from ``miq.checkpoint.formats``, so the CLI cannot drift from what the code accepts; the
module imports no torch, so reports read a run's config without it. ``parse(argv)`` returns a ``RunConfig``
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
from dataclasses import dataclass
from typing import Literal

from miq.checkpoint import formats
from miq.data_names import validate_name
from miq.errors import ConfigError, DataError, bad_value
from miq.options import (
    DEFAULT_BITS_CHOICES,
    DEFAULT_EVAL,
    DEFAULT_MI_ALPHA,
    DEFAULT_SEARCH_GENERATIONS,
    DEFAULT_SEARCH_GROUPSIZE,
    DEFAULT_SEARCH_SPARSITIES,
    DEFAULT_SEARCH_WBITS,
    DEFAULT_SEARCH_WINDOWS,
    TOY_EVAL,
    TOY_NAMES,
    Level,
    MIOptions,
    Recipe,
    fmt_num,
)
from miq.run import no_effect, search_flags
from miq.run.flags import build_parser

_MI = MIOptions()  # the estimator defaults
SEED_MAX = 2**32 - 1  # numpy's and scikit-learn's random_state take 0 .. 2**32 - 1
PERCDAMP_MAX = 100.0  # damping of 100x the mean diagonal already makes H^-1 a scaled identity (RTN)
PERCDAMP_MIN = 1e-12  # below, the damping is lost to float32 rounding of H's diagonal: Cholesky of a singular H
DEVICE = re.compile(r"(cpu|cuda)(:(0|[1-9][0-9]*))?")  # --device syntax; preflight checks the machine has it
COUNT_MAX = 2**31 - 1  # the largest window count, length, block, bin or sample count a flag may give


@dataclass(frozen=True)
class RunConfig:
    """One validated run of opt_mi.py. Field names are the flags' (``--bit-alloc`` -> ``bit_alloc``)."""

    model: str
    dataset: str
    seed: int = 0
    nsamples: int = 128
    percdamp: float = 0.01
    sparsity: float = 0.0
    prunen: int = 0
    prunem: int = 0
    blocksize: int = 128
    gmp: bool = False
    wbits: float = 16
    minlayer: int = -1
    maxlayer: int = 1000
    prune_only: str = ""
    invert: bool = False
    save: str = ""
    true_sequential: bool = False
    save_format: str = "packed"
    groupsize: int = -1
    sym: bool = False
    act_order: bool = False
    seqlen: int | None = None  # None until the model's positions are known (``with_seqlen``)
    eval: str | None = None
    device: str | None = None
    dtype: str = "auto"
    load: str = "layers"
    eval_batch: int = 16
    json: str = ""
    trust_remote_code: bool = False
    groups: int | Literal["all"] = 0
    mi_axis: str = "output"
    strategy: str = "independent"
    cluster: str = "spectral"
    bit_alloc: str = "hessian"
    alloc_cost: str = "obs"
    bits_choices: tuple[int, ...] = DEFAULT_BITS_CHOICES
    mi_samples: int = 8192
    mi_bins: int = _MI.bins
    mi_binning: str = _MI.binning
    mi_bias: str = _MI.bias
    mi_normalize: str = _MI.normalize
    mi_estimator: str = _MI.estimator
    mi_alpha: float = 0.0
    target_bpw: float | None = None  # --wbits is then the kept weights' mean width that meets it (miq/run/target.py)
    analysis_dir: str = "analysis"
    plot_layer: str | None = None
    tasks: str = ""  # comma-separated harness task names and task YAML paths; "" = none (``task_names``)
    tasks_fewshot: int | None = None  # None: each task's own number of examples
    tasks_limit: int | None = None
    tasks_batch: int = 8
    search: str = ""  # "knapsack" or "evo": per-linear levels under --target-bpw (miq/search/); "" = uniform
    search_sparsities: str = DEFAULT_SEARCH_SPARSITIES  # the level grid, as given (``search_flags.levels``)
    search_wbits: str = DEFAULT_SEARCH_WBITS
    search_groupsize: str = DEFAULT_SEARCH_GROUPSIZE
    search_cache: str = ""  # "" = MIQ_CACHE_DIR (or ~/.cache/mutual_info_quantization)/search
    search_generations: int = DEFAULT_SEARCH_GENERATIONS
    search_windows: int = DEFAULT_SEARCH_WINDOWS
    warnings: tuple[str, ...] = ()  # flags given that change nothing in this run (no_effect.py), said on stderr

    # --- what the run does, derived (never stored twice)
    @property
    def quantizing(self) -> bool:
        return self.wbits != 16 or self.target_bpw is not None

    @property
    def pruning(self) -> bool:
        return self.sparsity > 0 or self.prunen > 0

    @property
    def compressing(self) -> bool:
        return self.pruning or self.quantizing

    @property
    def grouped(self) -> bool:
        """Quantization follows a per-layer plan of channel groups (--groups K or all)."""
        return self.quantizing and self.groups != 0

    @property
    def mask(self) -> str | tuple[int, int] | None:
        """The pruning mask's kind, as bits accounting charges it."""
        if self.prunen:
            return (self.prunen, self.prunem)
        return "unstructured" if self.sparsity > 0 else None

    @property
    def level(self) -> Level:
        """Every compressed linear's level in a uniform run (``wbits`` as given: a float budget with --groups)."""
        return Level(self.sparsity, self.prunen, self.prunem, self.wbits, self.groupsize)

    @property
    def recipe(self) -> Recipe:
        """A uniform run's recipe: every linear at ``level``; a search replaces it with one level per linear."""
        return Recipe(self.level)

    def at(self, level: Level) -> RunConfig:
        """The config one linear is compressed with: this run's, or at a searched level (the budget is then
        met by the search, not by the mean width: --target-bpw and --search dropped)."""
        if level == self.level and not self.search:
            return self
        return dataclasses.replace(self, sparsity=level.sparsity, prunen=level.prunen, prunem=level.prunem,
                                   wbits=level.wbits, groupsize=level.groupsize, target_bpw=None, search="")

    @property
    def nm(self) -> tuple[int, int] | None:
        """The n:m pattern a save encodes masks with: the run's, or the one the search grid holds."""
        if self.prunen:
            return (self.prunen, self.prunem)
        return next((lv.nm for lv in search_flags.levels(self) if lv.nm), None) if self.search else None

    @property
    def mi(self) -> MIOptions:
        return MIOptions(self.mi_bins, self.mi_binning, self.mi_bias, self.mi_normalize, self.mi_estimator)

    def eval_names(self) -> list[str]:
        spec = self.eval if self.eval is not None else (TOY_EVAL if self.model in TOY_NAMES else DEFAULT_EVAL)
        return [s.strip() for s in spec.split(",") if s.strip()]

    def task_names(self) -> list[str]:
        """--tasks split: harness task names and paths of task YAML files, in the order given."""
        return [s.strip() for s in self.tasks.split(",") if s.strip()]

    def with_seqlen(self, positions: int) -> RunConfig:
        """This config with --seqlen resolved against the model's ``positions``."""
        if self.seqlen is None:
            return dataclasses.replace(self, seqlen=min(2048, positions))
        if self.seqlen > positions:
            raise ConfigError(f"--seqlen {self.seqlen}: larger than the model's {positions} positions")
        return self

    def as_dict(self) -> dict:
        """The JSON ``config`` block: every field, under its flag's name."""
        return dataclasses.asdict(self)


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
    knows the names is checked before any work too (``miq.run.tasks.prepare``), as that needs the harness."""
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


_ACTIONS = [a for a in build_parser()._actions if a.dest != "help"]
_DEFAULTS = {a.dest: a.default for a in _ACTIONS}


def takes_value(flag: str) -> bool:
    """Whether ``flag`` (e.g. "--sym", "--groupsize") is followed by a value on the command line."""
    return next(a.nargs != 0 for a in _ACTIONS if flag in a.option_strings)


def parse(argv: list[str] | None = None) -> RunConfig:
    """Parse and validate opt_mi.py's command line (``-h`` prints help and exits 0)."""
    return from_namespace(build_parser().parse_args(argv))


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
