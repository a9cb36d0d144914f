"""The sweep's command line: its flags, the --matrix presets, and their validation into one frozen ``Sweep``.

Parsed by hand, not argparse, since a value may start with "-" (``--extra "--sym"``). Every bad argument is a
``UsageError`` whose text is the one line ``sweep.py`` prints before exiting with code 2, before anything runs.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from miq import methods
from miq.errors import ConfigError, NoEffectError
from miq.options import DEFAULT_EVAL, TOY_EVAL, TOY_NAMES, fmt_num
from miq.run import config, destinations, task_plan
from miq.sweep import extra_flags, gpu_slots, slurm
from miq.sweep.slurm import SlurmOptions

# flag -> (metavar, default, help); "" defaults depend on --model
FLAGS: dict[str, tuple[str, str, str]] = {
    "--model": ("M", "toy", "hub id, local folder, or a built-in toy: 'toy' (OPT) or 'toy-llama' (default toy)"),
    "--calib": ("D", "synthetic", "calibration data (default synthetic)"),
    "--eval": ("LIST", "", f"comma-separated eval sets (default {TOY_EVAL} for toy, else {DEFAULT_EVAL})"),
    "--matrix": ("NAME", "mi", "mi (default: the MI study's methods) or frontier: sparsity {0, 0.5, 0.6, 0.7, 2:4} "
                 "x kept width {2, 3, 4, 5, 8, 16} x {per-row, g128} x {natural order, act-order}, and the per-linear "
                 "searches at --search-budgets, compared at total stored bpw (--sparsities, --wbits, --methods and "
                 "--search-budgets given explicitly still win)"),
    "--sparsities": ("LIST", "0.5", 'target sparsities (default "0.5"), or N:M (e.g. 2:4); 0 runs the '
                     'quantize-only rows'),
    "--groups": ("LIST", "8", 'K values for the MI and control rows (default "8")'),
    "--wbits": ("LIST", "4", 'bit budgets (default "4"); fractional budgets skip the uniform and g128 rows'),
    "--search-budgets": ("LIST", "", "total stored bpw (opt_mi.py --target-bpw) at which the searched methods "
                         '(search-knapsack, search-evo) run, e.g. "2.5 3 3.5" (default none; --matrix frontier: '
                         '"2.5 3 3.5"); each above 0 and below 16'),
    "--out": ("DIR", "results/sweep", "results folder (default results/sweep)"),
    "--jobs": ("N", "1", "configurations run at a time (default 1)"),
    "--nsamples": ("N", "", "calibration windows (default 32 for toy, else 128)"),
    "--threads": ("N", "", "local: threads of each configuration (OMP_NUM_THREADS and MKL_NUM_THREADS in its "
                  "environment; default: the sweep's own OMP_NUM_THREADS if set, else the cores / --jobs), written "
                  "in its log and recorded in its result; perplexities move with the thread count"),
    "--seeds": ("LIST", "0", 'seeds (calibration, MI sampling, clustering); several, e.g. "0 1 2", run every '
                "seeded configuration once per seed (ids end in _seed<n>) and give the report mean +- std and "
                "a seed-aware verdict"),
    "--extra": ('"..."', "", 'flags appended to every opt_mi.py call, e.g. "--seqlen 64"'),
    "--tasks": ("LIST", "", "lm-evaluation-harness tasks every configuration runs after perplexity "
                "(comma-separated names or task YAML files, as opt_mi.py --tasks; --extra \"--tasks-limit N\" "
                "etc. set the rest); the report tabulates their accuracy and adds it to the verdict"),
    "--methods": ("LIST", " ".join(methods.MATRIX_IDS), "methods to run (default the matrix: "
                  f"{' '.join(methods.MATRIX_IDS)}; also "
                  f"{' '.join(m.id for m in methods.METHODS if not m.in_matrix)})"),
    "--executor": ("NAME", "local", "local (default: --jobs processes on this machine, each on a GPU of its own "
                   "when it has GPUs) or slurm (one Slurm job per configuration, through submitit; the --out "
                   "folder must be on a filesystem the nodes share)"),
    "--jobs-per-gpu": ("K", "1", "local, on a machine with GPUs: configurations that may share one GPU (default "
                       "1); --jobs may not exceed GPUs x K"),
    "--slurm-partition": ("P", "", "slurm: the partition (default the cluster's)"),
    "--slurm-gpus-per-job": ("N", "1", "slurm: GPUs per job (default 1; 0 for CPU jobs)"),
    "--slurm-time": ("T", "240", "slurm: time limit of one job, minutes or HH:MM:SS (default 240); a job that "
                     "reaches it leaves no result and runs again on the next submission"),
    "--slurm-mem": ("MEM", "", "slurm: memory per job, e.g. 64G (default the partition's)"),
    "--slurm-array-parallelism": ("N", "", "slurm: jobs running at a time (default: all, up to submitit's 256)"),
    "--slurm-extra": ("KEY=VALUE", "", "slurm: another sbatch option, e.g. account=myproj or constraint=a100 "
                      "(repeatable; KEY alone for an option without a value)"),
}
SLURM_FLAGS = [f for f in FLAGS if f.startswith("--slurm-")]

# --matrix presets: the flags they set unless given
FRONTIER_METHODS = ("dense", "sparsegpt", "sparsegpt-act-order", "uniform", "g128", "act-order", "act-order-g128",
                    "search-knapsack", "search-evo")
SEARCHED = {m.id for m in methods.METHODS if methods.searched(m)}
MATRICES: dict[str, dict[str, str]] = {
    "mi": {},
    "frontier": {"--sparsities": "0 0.5 0.6 0.7 2:4", "--wbits": "2 3 4 5 8", "--methods": " ".join(FRONTIER_METHODS),
                 "--search-budgets": "2.5 3 3.5"},
}

def usage() -> str:
    lines = ["usage: sweep.py [--FLAG VALUE ...] [--retry-failed]  (compare_methods.sh takes the same)", ""]
    for flag, (meta, _, text) in FLAGS.items():  # a name too long for the column puts its text below it
        name = f"{flag} {meta}" + ("\n" + " " * 21 if len(flag) + len(meta) >= 18 else "")
        lines.append(f"  {name:<19}{textwrap.fill(text, 100, subsequent_indent=' ' * 21)}")
    return "\n".join(lines + [f"  {'--retry-failed':<19}run configurations that have an <id>.failed.json again",
                              f"  {'--no-wait':<19}slurm: submit and exit; build the report later with "
                              "python -m miq.report OUT"])


class UsageError(Exception):
    """A bad argument: ``str(e)`` is the one line printed before exiting with code 2."""


@dataclass(frozen=True)
class Sweep:
    """A validated command line."""

    model: str
    calib: str
    eval: str
    nsamples: int
    out: Path
    jobs: int
    extra: tuple[str, ...]
    retry_failed: bool
    matrix: methods.SweepOptions
    jobs_per_gpu: int = 1
    threads: int = 1  # local: each configuration's OMP_NUM_THREADS / MKL_NUM_THREADS
    warnings: tuple[str, ...] = ()  # accepted flags that do nothing on this machine, said before the sweep runs
    gpus: tuple[str, ...] = ()  # local: the GPUs handed out to configurations (none: CPU)
    slurm: SlurmOptions | None = None  # with --executor slurm (None: the local pool)
    tasks: str = ""  # --tasks, passed to every configuration


def parse_args(argv: Sequence[str]) -> Sweep | None:
    """The validated command line, or None after printing --help."""
    raw = {flag: default for flag, (_, default, _) in FLAGS.items()}
    switches, args, given, extra = set(), list(argv), set(), []
    while args:  # by hand, not argparse: a value may start with "-" (--extra "--sym")
        flag = args.pop(0)
        if flag in ("-h", "--help"):
            print(usage())
            return None
        if flag in ("--retry-failed", "--no-wait"):
            switches.add(flag)
        elif flag not in FLAGS:
            raise UsageError(f"unknown option {flag} (see --help)")
        elif not args:
            raise UsageError(f"{flag} needs a value (see --help)")
        else:
            raw[flag] = args.pop(0)
            given.add(flag)
            if flag == "--slurm-extra":  # repeatable
                extra.append(raw[flag])
    if raw["--matrix"] not in MATRICES:
        raise UsageError(f"--matrix {raw['--matrix']}: one of {', '.join(MATRICES)}")
    raw.update({f: v for f, v in MATRICES[raw["--matrix"]].items() if f not in given})
    if "--search-budgets" not in given and not any(m in SEARCHED for m in raw["--methods"].split()):
        raw["--search-budgets"] = ""  # the preset's budgets, with the searched methods narrowed away
    # the executor's flags first: they are checked in microseconds, --tasks (in validate) builds the
    # harness's task index, which takes seconds
    executor = executor_options(raw, given | switches, extra)
    sweep = dataclasses.replace(validate(raw, "--retry-failed" in switches), **executor)
    check_groups(sweep, raw, given)
    return sweep


def check_groups(s: Sweep, raw: dict[str, str], given: set[str]) -> None:
    """--groups sets K for the grouped methods only: given to a sweep without one (the frontier matrix, say),
    it would change nothing."""
    if "--groups" in given and not any(methods.BY_ID[m].per_k for m in s.matrix.methods):
        grouped = " ".join(m.id for m in methods.METHODS if m.per_k)
        raise UsageError(f"--groups {raw['--groups']}: no method of this sweep groups channels, so K would change "
                         f"nothing; add a grouped method to --methods ({grouped}) or leave --groups out")


def executor_options(raw: dict[str, str], given: set[str], extra: list[str]) -> dict:
    """The Sweep fields of --executor and the flags that go with it; a flag of the other executor is refused
    (it would change nothing)."""
    executor = raw["--executor"]
    _check([raw["--jobs"]], "[1-9][0-9]*", "--jobs {}: must be a positive integer")
    if executor not in ("local", "slurm"):
        raise UsageError(f"--executor {executor}: one of local, slurm")
    if executor == "slurm":
        if wrong := given & {"--jobs", "--jobs-per-gpu", "--threads"}:
            raise UsageError(f"{min(wrong)}: not with --executor slurm (Slurm runs the jobs; "
                             "--slurm-array-parallelism sets how many at a time)")
        try:
            return {"slurm": slurm.options(raw, extra, wait="--no-wait" not in given)}
        except ConfigError as e:
            raise UsageError(str(e)) from None
    if wrong := given & {*SLURM_FLAGS, "--no-wait"}:
        raise UsageError(f"{min(wrong)}: only with --executor slurm")
    _check([raw["--jobs-per-gpu"]], "[1-9][0-9]*", "--jobs-per-gpu {}: must be a positive integer")
    jobs, per_gpu, gpus = int(raw["--jobs"]), int(raw["--jobs-per-gpu"]), gpu_slots.visible()
    if gpus and jobs > len(gpus) * per_gpu:
        raise UsageError(f"--jobs {jobs}: this machine has {len(gpus)} GPU(s) ({','.join(gpus)}) and "
                         f"--jobs-per-gpu {per_gpu} lets {len(gpus) * per_gpu} configuration(s) run at a time; "
                         "lower --jobs or raise --jobs-per-gpu")
    warnings = []
    if "--jobs-per-gpu" in given and not gpus:  # a warning, not a refusal: one script serves laptop and cluster
        warnings.append(f"--jobs-per-gpu {per_gpu}: this machine has no GPU that torch can use, so it changes "
                        f"nothing here; --jobs {jobs} configuration(s) share the cores")
    threads, note = local_threads(raw, "--threads" in given, jobs)
    return {"jobs_per_gpu": per_gpu, "gpus": tuple(gpus), "threads": threads, "warnings": (*warnings, *note)}


def local_threads(raw: dict[str, str], given: bool, jobs: int) -> tuple[int, list[str]]:
    """Each configuration's thread count, and a warning when --threads x --jobs oversubscribes the cores.
    Pinned for every job, whatever the default: a perplexity depends on the thread count (summation order),
    so the sweep decides it and each result records it, rather than each job taking what it finds."""
    cores = os.cpu_count() or 1
    if given:
        _check([raw["--threads"]], "[1-9][0-9]*", "--threads {}: must be a positive integer")
        threads = int(raw["--threads"])
        if threads * jobs > cores:
            return threads, [f"--threads {threads} x --jobs {jobs} = {threads * jobs} threads on {cores} core(s): "
                             "the jobs will slow each other down (threads waiting on each other made runs 10-40x "
                             "slower here)"]
        return threads, []
    pinned = os.environ.get("OMP_NUM_THREADS", "")
    if re.fullmatch("[1-9][0-9]*", pinned.strip()):
        return int(pinned), []
    return max(1, cores // jobs), []


def _check(values: list[str], pattern: str, message: str) -> None:
    for v in values:
        if not re.fullmatch(pattern, v):
            raise UsageError(message.format(v))


def validate(raw: dict[str, str], retry: bool) -> Sweep:
    """The matrix, data and output flags checked (``executor_options`` has checked --jobs)."""
    sparsities, wbits, ks, chosen, seeds = (raw[f].split() for f in
                                            ("--sparsities", "--wbits", "--groups", "--methods", "--seeds"))
    _check([raw["--nsamples"]], "|[1-9][0-9]*", "--nsamples {}: must be a positive integer")
    _check(sparsities, r"0\.?|0?\.[0-9]+|[1-9][0-9]*:[1-9][0-9]*", "--sparsities: {} is not in [0, 1) or N:M")
    _check(wbits, r"[0-9]+(\.[0-9]+)?", "--wbits: {} is not a number")
    _check(ks, "[1-9][0-9]*", "--groups: {} is not a positive integer K")
    _check(seeds, "[0-9]{1,9}", "--seeds: {} is not a seed (an integer 0 .. 999999999)")
    # one spelling per value ("0.5" and ".5", "4" and "4.0", "0" and "00"), so equal configurations get one id
    sparsities = [s if ":" in s else fmt_num(float(s)) for s in sparsities]
    wbits, seeds = [fmt_num(float(w)) for w in wbits], [str(int(n)) for n in seeds]
    for flag, values in (("--sparsities", sparsities), ("--wbits", wbits), ("--seeds", seeds)):
        if len(set(values)) != len(values) or (flag == "--seeds" and not values):
            raise UsageError(f"{flag} {raw[flag]!r}: give distinct values, e.g. \"0 1 2\"")
    for m in chosen:
        if m not in methods.BY_ID:
            raise UsageError(f"--methods: unknown {m} (known: {' '.join(methods.BY_ID)})")
    budgets = search_budgets(raw["--search-budgets"], [methods.BY_ID[m] for m in chosen])
    if not (sparsities and wbits and chosen):
        raise UsageError("--sparsities, --wbits and --methods must not be empty")
    try:
        extra = shlex.split(raw["--extra"])
    except ValueError as e:
        raise UsageError(f"--extra: {e}") from None
    try:  # before anything runs: a folder the results cannot go to is found now, not after the first run
        data = [("--calib", raw["--calib"]), *[("--eval", e) for e in raw["--eval"].split(",") if e]]
        destinations.check_apart("--out", raw["--out"], "folder", destinations.inputs_of(raw["--model"], data))
        destinations.check_target("--out", raw["--out"], "folder")
        task_names = [t.strip() for t in raw["--tasks"].split(",") if t.strip()]
        if task_names:  # installed, every name known: before the first job, not in every configuration's log
            task_plan.plan(task_names)
        elif given := [a for a in extra if a.startswith("--tasks")]:  # would be dropped from every configuration
            raise ConfigError(f"--extra: {given[0]} acts on the harness's tasks; give the sweep --tasks")
    except ConfigError as e:
        raise UsageError(str(e)) from None
    toy = raw["--model"] in TOY_NAMES
    return Sweep(model=raw["--model"], calib=raw["--calib"], eval=raw["--eval"] or (TOY_EVAL if toy else DEFAULT_EVAL),
                 nsamples=int(raw["--nsamples"] or (32 if toy else 128)), out=Path(raw["--out"]),
                 jobs=int(raw["--jobs"]), extra=tuple(extra), retry_failed=retry, tasks=raw["--tasks"].strip(),
                 matrix=methods.SweepOptions(tuple(sparsities), tuple(wbits), tuple(map(int, ks)), tuple(chosen),
                                             tuple(int(n) for n in seeds), budgets))


def search_budgets(given: str, chosen: list[methods.Method]) -> tuple[str, ...]:
    """--search-budgets checked against the searched methods chosen: each a number in (0, 16), once; none
    without a searched method (they would run nothing) and some with one (it would run nothing)."""
    values = given.split()
    _check(values, r"[0-9]+(\.[0-9]+)?", "--search-budgets: {} is not a number")
    budgets = [fmt_num(float(b)) for b in values]
    if bad := [b for b in budgets if not 0 < float(b) < 16]:
        raise UsageError(f"--search-budgets: {bad[0]} is not above 0 and below 16 (total stored bpw; fp16 is 16)")
    if len(set(budgets)) != len(budgets):
        raise UsageError(f"--search-budgets {given!r}: give distinct values, e.g. \"2.5 3 3.5\"")
    searched = [m.id for m in chosen if methods.searched(m)]
    if budgets and not searched:
        raise UsageError(f"--search-budgets {given!r}: no searched method in --methods (search-knapsack, "
                         "search-evo) to run at them")
    if searched and not budgets:
        raise UsageError(f"--methods {searched[0]}: a searched method needs --search-budgets (its --target-bpw "
                         'values), e.g. --search-budgets "2.5 3 3.5"')
    return tuple(budgets)


def config_args(s: Sweep, cfg: methods.SweepConfig) -> list[str]:
    """opt_mi.py's arguments for one configuration, its outputs apart: the --extra flags that change something
    in it (``--extra "--sym"`` reaches the quantized configurations, not dense or pruning-only ones)."""
    extra = list(s.extra)
    while True:
        args = [s.model, s.calib, "--eval", s.eval, "--nsamples", str(s.nsamples),
                *(["--tasks", s.tasks] if s.tasks else []), *cfg.flags, *extra]
        try:
            config.parse(args)
            return args
        except NoEffectError as e:
            if e.flag not in extra:  # the method's own flags: a defect of the vocabulary, said as it is
                raise
            i = extra.index(e.flag)
            del extra[i : i + 1 + (config.takes_value(e.flag) and i + 1 < len(extra))]
        except ConfigError:
            return args  # check_matrix reports it


def check_matrix(s: Sweep, configs: list[methods.SweepConfig]) -> None:
    """Every configuration's arguments parsed and checked as opt_mi.py would (flags, data files), before the
    first job: a mistake in them is found now, not by every configuration failing in turn."""
    plain = dataclasses.replace(s, extra=())
    try:  # first: a flag that changes what a configuration is, named as such rather than as its error
        extra_flags.check(s.extra, configs, lambda cfg, extra: config_args(s if extra else plain, cfg))
    except ConfigError as e:
        raise UsageError(str(e)) from None
    for cfg in configs:
        if cfg.skip is None:
            try:
                config.parse(config_args(s, cfg))
            except ConfigError as e:
                raise UsageError(f"configuration {cfg.id}: {e}") from None
