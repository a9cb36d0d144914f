"""The method vocabulary, defined once: every method, baseline and control, and the sweep matrix.

A ``Method`` is a named way of running ``opt_mi.py``: the flags that select it, the label and family reports
give its runs, its role in a comparison (reference, baseline, method under test, control) and how it enters
a sweep (once, per sparsity, per bit budget, per K). Labels are derived from a run's ``RunConfig`` through
``signature``, so a run is named the same way by ``opt_mi.py``, the sweep and the report.

Adding a method: add one ``Method`` here (its flags, label, family, role and ``key``); if it is selected by
a flag that ``signature`` does not read yet, add that flag to ``signature`` too. The sweep, labels and the
report's families follow. ``tests/test_methods.py`` checks every entry against the real flag parser.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import allocation
from config import RunConfig, parse

Role = Literal["reference", "baseline", "method", "control"]
Stage = Literal["prune", "quant"]  # what part of a run's label the method names


@dataclass(frozen=True)
class Method:
    id: str  # sweep id prefix and --methods name, e.g. "miB"
    label: str  # the label of its stage; "{groupsize}" is filled from the run
    family: str  # what reports group and colour by
    role: Role
    stage: Stage
    key: tuple  # signature(cfg) of its runs, for its stage
    flags: str = ""  # opt_mi.py flags beyond --sparsity/--wbits; "{k}" stands for K
    per_k: bool = False  # one run per number of groups K
    whole_bits: bool = False  # integer bit budgets only
    in_matrix: bool = True  # part of the default sweep
    seeded: bool = True  # its result depends on --seed (calibration windows, MI samples, clustering)
    about: str = ""

    @property
    def quantized(self) -> bool:
        return self.stage == "quant"


def _prune(id: str, role: Role, flags: str, about: str, seeded: bool = True) -> Method:
    return Method(id, id, id, role, "prune", (id,), flags, seeded=seeded, about=about)


METHODS: tuple[Method, ...] = (
    _prune("dense", "reference", "", "the model as loaded", seeded=False),
    _prune("magnitude", "baseline", "--gmp", "magnitude pruning per layer (reference --gmp)", seeded=False),
    _prune("sparsegpt", "baseline", "", "SparseGPT pruning only"),
    Method("uniform", "uniform", "uniform", "baseline", "quant", ("uniform", False), whole_bits=True,
           about="SparseGPT + per-channel B-bit quantization (the reference)"),
    Method("g128", "uniform-g{groupsize}", "uniform-g", "baseline", "quant", ("uniform", True), "--groupsize 128",
           whole_bits=True, about="+ GPTQ groups of 128 columns"),
    Method("perchannel", "per-channel", "per-channel", "baseline", "quant", ("per-channel",), "--groups all",
           about="every channel its own group: per-channel importance (Hessian) bit allocation"),
    Method("miA", "mi-A", "mi", "method", "quant", ("groups", "spectral", "shared"),
           "--groups {k} --strategy shared", per_k=True, about="MI groups, one scale/zero per group"),
    Method("miB", "mi-B", "mi", "method", "quant", ("groups", "spectral", "independent"),
           "--groups {k} --strategy independent", per_k=True, about="MI groups share bits, rows keep own scale/zero"),
    Method("miA-hier", "mi-A-hier", "mi", "method", "quant", ("groups", "hierarchical", "shared"),
           "--groups {k} --strategy shared --cluster hierarchical", per_k=True, in_matrix=False,
           about="mi-A with hierarchical (complete-linkage) clustering"),
    Method("miB-hier", "mi-B-hier", "mi", "method", "quant", ("groups", "hierarchical", "independent"),
           "--groups {k} --strategy independent --cluster hierarchical", per_k=True, in_matrix=False,
           about="mi-B with hierarchical (complete-linkage) clustering"),
    Method("random", "random-B", "random", "control", "quant", ("groups", "random", "independent"),
           "--groups {k} --strategy independent --cluster random", per_k=True,
           about="spectral's group sizes, random membership: does MI matter?"),
    Method("randomA", "random-A", "random", "control", "quant", ("groups", "random", "shared"),
           "--groups {k} --strategy shared --cluster random", per_k=True, in_matrix=False,
           about="the random control of mi-A"),
    Method("contiguous", "contiguous-B", "contiguous", "control", "quant", ("groups", "contiguous", "independent"),
           "--groups {k} --strategy independent --cluster contiguous", per_k=True,
           about="consecutive rows (the reference quantizer's grouprows)"),
    Method("contiguousA", "contiguous-A", "contiguous", "control", "quant", ("groups", "contiguous", "shared"),
           "--groups {k} --strategy shared --cluster contiguous", per_k=True, in_matrix=False,
           about="consecutive rows sharing one scale/zero"),
)
BY_ID = {m.id: m for m in METHODS}
MATRIX_IDS = tuple(m.id for m in METHODS if m.in_matrix)


def families(role: Role, quantized: bool | None = None) -> tuple[str, ...]:
    """Families of the methods with this role (and stage), in METHODS order, each once."""
    fams = [m.family for m in METHODS if m.role == role and (quantized is None or m.quantized == quantized)]
    return tuple(dict.fromkeys(fams))


# ----------------------------------------------------------------------------------------------------------
# naming a run


def signature(cfg: RunConfig) -> tuple[tuple, tuple | None]:
    """(prune key, quant key) of a run: the flags that decide which methods it is an instance of."""
    prune = ("magnitude",) if cfg.gmp and cfg.pruning else ("sparsegpt",) if cfg.pruning else ("dense",)
    if not cfg.quantizing:
        return prune, None
    if cfg.groups == 0:
        return prune, ("uniform", cfg.groupsize > 0)
    if cfg.groups == "all":
        return prune, ("per-channel",)
    return prune, ("groups", cfg.cluster, cfg.strategy)


def _find(stage: Stage, key: tuple) -> Method:
    for m in METHODS:
        if m.stage == stage and m.key == key:
            return m
    raise ValueError(f"no method in methods.METHODS has the {stage} signature {key}")


def identify(cfg: RunConfig) -> Method:
    """The method a run is an instance of: its quantization method, or its pruning method if unquantized."""
    prune, quant = signature(cfg)
    return _find("prune", prune) if quant is None else _find("quant", quant)


def label(cfg: RunConfig) -> tuple[str, str]:
    """(label, family) naming a run in reports, e.g. ("sparsegpt+mi-B", "mi")."""
    prune_key, quant_key = signature(cfg)
    prune = _find("prune", prune_key).label
    if cfg.prunen:
        prune += f"-{cfg.prunen}:{cfg.prunem}"
    if quant_key is None:
        return prune, _find("prune", prune_key).family
    m = _find("quant", quant_key)
    quant = m.label.format(groupsize=cfg.groupsize)
    if cfg.groupsize > 0 and "{groupsize}" not in m.label:
        quant += f"-g{cfg.groupsize}"
    details = allocation_details(cfg)
    if details:
        quant += f"[{','.join(details)}]"
    return (quant if prune == "dense" else f"{prune}+{quant}"), m.family


def allocation_details(cfg: RunConfig) -> list[str]:
    """What distinguishes runs of one method besides K: the allocation, its MI exponent, the cost source and
    the MI estimator, each named only when it is not the default (so default runs keep their plain label)."""
    if not cfg.grouped:
        return []
    out = []
    if cfg.bit_alloc != "hessian":
        out.append(cfg.bit_alloc)
    if cfg.bit_alloc == "hessian-mi" and cfg.mi_alpha != allocation.DEFAULT_MI_ALPHA:
        out.append(f"alpha={cfg.mi_alpha:g}")
    if cfg.bit_alloc != "uniform" and cfg.alloc_cost != "obs":
        out.append(f"cost={cfg.alloc_cost}")
    uses_mi = cfg.groups != "all" and (cfg.cluster != "contiguous" or cfg.bit_alloc == "hessian-mi")
    if uses_mi and cfg.mi_estimator != "histogram":
        out.append(cfg.mi_estimator)
    return out


def strategy_label(cfg: RunConfig) -> str:
    """"A (shared)", "B (independent)", or "-" when no parameters are shared (no K groups)."""
    if not cfg.quantizing or cfg.groups in (0, "all"):
        return "-"
    return "A (shared)" if cfg.strategy == "shared" else "B (independent)"


def example_config(m: Method, k: int = 8, sparsity: str = "0.5", wbits: str = "4") -> RunConfig:
    """The RunConfig of one of the method's sweep runs (for tests and documentation)."""
    return parse(["toy", "synthetic", *run_flags(m, sparsity, wbits, k)])


# ----------------------------------------------------------------------------------------------------------
# the sweep matrix


@dataclass(frozen=True)
class SweepOptions:
    """What a sweep iterates over. Values stay strings as given: they name the result files."""

    sparsities: tuple[str, ...] = ("0.5",)
    wbits: tuple[str, ...] = ("4",)
    ks: tuple[int, ...] = (8,)
    methods: tuple[str, ...] = MATRIX_IDS
    seeds: tuple[int, ...] = (0,)  # other than (0,): every seeded configuration once per seed, id + _seed<n>


@dataclass(frozen=True)
class SweepConfig:
    """One configuration of a sweep: its result id, its opt_mi.py flags, or why it cannot run."""

    id: str
    flags: tuple[str, ...]
    skip: str | None = None


def run_flags(m: Method, sparsity: str, wbits: str, k: int | None) -> list[str]:
    """opt_mi.py flags of method m at one point of the matrix (sparsity and wbits as strings)."""
    if m.role == "reference":
        base = ["--sparsity", "0", "--wbits", "16"]
    elif m.quantized:
        base = ["--sparsity", sparsity, "--wbits", wbits]
    else:
        base = ["--sparsity", sparsity]
    return base + m.flags.format(k=k).split()


def _whole(wbits: str) -> bool:
    return float(wbits) == int(float(wbits))


def matrix(options: SweepOptions) -> list[SweepConfig]:
    """Every configuration of a sweep, in run order: references, then per sparsity the pruning baselines,
    per budget the quantized methods, per K the grouped ones, each once per seed (seed-independent ones,
    dense and magnitude, once). Sparsity 0 has no pruning-only rows (they would repeat dense); whole-bit
    methods at a fractional budget are listed with a skip reason."""
    out = []
    for c in _matrix_one_seed(options):
        m = BY_ID[c.id.split("_")[0]]
        if options.seeds == (0,) or not m.seeded:
            out.append(c)
        else:
            out += [SweepConfig(f"{c.id}_seed{n}", (*c.flags, "--seed", str(n)), c.skip) for n in options.seeds]
    return out


def _matrix_one_seed(options: SweepOptions) -> list[SweepConfig]:
    chosen = [m for m in METHODS if m.id in options.methods]
    out = [SweepConfig(m.id, tuple(run_flags(m, "0", "16", None))) for m in chosen if m.role == "reference"]
    for s in options.sparsities:
        if float(s) > 0:
            out += [SweepConfig(f"{m.id}_s{s}", tuple(run_flags(m, s, "", None)))
                    for m in chosen if m.stage == "prune" and m.role != "reference"]
        for w in options.wbits:
            for m in (m for m in chosen if m.quantized and not m.per_k):
                skip = None
                if m.whole_bits and not _whole(w):
                    skip = f"uniform quantization needs whole bits; a {w}-bit budget needs --groups"
                out.append(SweepConfig(f"{m.id}_s{s}_w{w}", tuple(run_flags(m, s, w, None)), skip))
            for k in options.ks:
                out += [SweepConfig(f"{m.id}_s{s}_w{w}_k{k}", tuple(run_flags(m, s, w, k)))
                        for m in chosen if m.per_k]
    return out
