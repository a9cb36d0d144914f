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

from miq.options import DEFAULT_MI_ALPHA, needs_mi
from miq.run.config import RunConfig, parse

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
    axis: str = ""  # the axis its groups are on ("output", "input"), "" without groups
    about: str = ""

    @property
    def quantized(self) -> bool:
        return self.stage == "quant"


def _prune(id: str, role: Role, flags: str, about: str, seeded: bool = True, in_matrix: bool = True) -> Method:
    return Method(id, id, id, role, "prune", (id,), flags, seeded=seeded, in_matrix=in_matrix, about=about)


def _grouped(id: str, label: str, family: str, role: Role, how: tuple[str, str, str], about: str,
             in_matrix: bool = True) -> Method:
    """A method that groups channels into K groups per layer: ``how`` = (axis, cluster, strategy), rows (output
    axis) or input columns."""
    axis, cluster, strategy = how
    flags = "--groups {k}" + (" --mi-axis input" if axis == "input" else f" --strategy {strategy}")
    flags += "" if cluster == "spectral" else f" --cluster {cluster}"
    return Method(id, label, family, role, "quant", ("groups", axis, cluster, strategy), flags, per_k=True,
                  in_matrix=in_matrix, axis=axis, about=about)


METHODS: tuple[Method, ...] = (
    _prune("dense", "reference", "", "the model as loaded", seeded=False),
    _prune("magnitude", "baseline", "--gmp", "magnitude pruning per layer (reference --gmp)", seeded=False),
    _prune("sparsegpt", "baseline", "", "SparseGPT pruning only"),
    _prune("sparsegpt-act-order", "baseline", "--act-order",
           "SparseGPT pruning only, columns by descending diag H (the mask blocks follow that order)",
           in_matrix=False),
    Method("uniform", "uniform", "uniform", "baseline", "quant", ("uniform", False, False), whole_bits=True,
           about="SparseGPT + per-channel B-bit quantization (the reference)"),
    Method("g128", "uniform-g{groupsize}", "uniform-g", "baseline", "quant", ("uniform", True, False),
           "--groupsize 128", whole_bits=True, about="+ GPTQ groups of 128 columns"),
    Method("act-order", "act-order", "act-order", "baseline", "quant", ("uniform", False, True), "--act-order",
           whole_bits=True, in_matrix=False, about="+ columns by descending diag H (GPTQ's desc_act)"),
    Method("act-order-g128", "act-order-g{groupsize}", "act-order-g", "baseline", "quant", ("uniform", True, True),
           "--act-order --groupsize 128", whole_bits=True, in_matrix=False,
           about="act-order with GPTQ groups of 128 columns, parameters fixed before the pass (static groups)"),
    Method("perchannel", "per-channel", "per-channel", "baseline", "quant", ("per-channel",), "--groups all",
           about="every channel its own group: per-channel importance (Hessian) bit allocation"),
    _grouped("miA", "mi-A", "mi", "method", ("output", "spectral", "shared"),
             "MI row groups, one scale/zero per group"),
    _grouped("miB", "mi-B", "mi", "method", ("output", "spectral", "independent"),
             "MI row groups share bits, rows keep own scale/zero"),
    _grouped("miA-hier", "mi-A-hier", "mi", "method", ("output", "hierarchical", "shared"),
             "mi-A with hierarchical (complete-linkage) clustering", in_matrix=False),
    _grouped("miB-hier", "mi-B-hier", "mi", "method", ("output", "hierarchical", "independent"),
             "mi-B with hierarchical (complete-linkage) clustering", in_matrix=False),
    _grouped("random", "random-B", "random", "control", ("output", "random", "independent"),
             "spectral's group sizes, random membership: does MI matter?"),
    _grouped("randomA", "random-A", "random", "control", ("output", "random", "shared"),
             "the random control of mi-A", in_matrix=False),
    _grouped("contiguous", "contiguous-B", "contiguous", "control", ("output", "contiguous", "independent"),
             "consecutive rows (the reference quantizer's grouprows)"),
    _grouped("contiguousA", "contiguous-A", "contiguous", "control", ("output", "contiguous", "shared"),
             "consecutive rows sharing one scale/zero", in_matrix=False),
    _grouped("range-A", "range-A", "range", "control", ("output", "range", "shared"),
             "rows by range (k-means on min/max, RPTQ's criterion) sharing one grid: the control of mi-A",
             in_matrix=False),
    _grouped("range-B", "range-B", "range", "control", ("output", "range", "independent"),
             "rows by range sharing bits, rows keep own scale/zero", in_matrix=False),
    _grouped("mi-in", "mi-in", "mi-in", "method", ("input", "spectral", "independent"),
             "MI groups of input columns, each a quantization group (a grid per row and group, g_idx)",
             in_matrix=False),
    _grouped("mi-in-hier", "mi-in-hier", "mi-in", "method", ("input", "hierarchical", "independent"),
             "mi-in with hierarchical clustering", in_matrix=False),
    _grouped("contiguous-in", "contiguous-in", "contiguous-in", "control", ("input", "contiguous", "independent"),
             "K runs of consecutive columns: GPTQ's groups with the same K (the like-for-like baseline)",
             in_matrix=False),
    _grouped("random-in", "random-in", "random-in", "control", ("input", "random", "independent"),
             "mi-in's group sizes, random columns", in_matrix=False),
    _grouped("range-in", "range-in", "range-in", "control", ("input", "range", "independent"),
             "columns by k-means on their scale (log max |w|, log diag H)", in_matrix=False),
    # per-linear levels (issue 28); "baseline" to the report until it compares searches (the MI verdict
    # reads every "method" family as an MI one)
    Method("search-knapsack", "search-knapsack", "search", "baseline", "quant", ("search", "knapsack"),
           "--search knapsack", in_matrix=False,
           about="each linear its own sparsity, width and grid under --target-bpw: summed output losses, exact"),
    Method("search-evo", "search-evo", "search", "baseline", "quant", ("search", "evo"), "--search evo",
           in_matrix=False, about="from the knapsack's levels, evolution of the stitched model's KL (EvoPress)"),
)
BY_ID = {m.id: m for m in METHODS}
MATRIX_IDS = tuple(m.id for m in METHODS if m.in_matrix)


def families(role: Role, quantized: bool | None = None, axis: str | None = None) -> tuple[str, ...]:
    """Families of the methods with this role (and stage, and group axis), in METHODS order, each once."""
    fams = [m.family for m in METHODS if m.role == role and (quantized is None or m.quantized == quantized)
            and (axis is None or m.axis == axis)]
    return tuple(dict.fromkeys(fams))


def axis_of(family: str) -> str:
    """The group axis of a family's methods ("" for families without groups)."""
    return next(m.axis for m in METHODS if m.family == family)


# ----------------------------------------------------------------------------------------------------------
# naming a run


def signature(cfg: RunConfig) -> tuple[tuple, tuple | None]:
    """(prune key, quant key) of a run: the flags that decide which methods it is an instance of."""
    if cfg.search:  # masks and widths chosen per linear: the search's method names both (prune key: none fixed)
        return ("dense",), ("search", cfg.search)
    prune = ("magnitude",) if cfg.gmp and cfg.pruning else ("sparsegpt",) if cfg.pruning else ("dense",)
    if not cfg.quantizing:
        return (("sparsegpt-act-order",) if prune == ("sparsegpt",) and cfg.act_order else prune), None
    if cfg.groups == 0:
        return prune, ("uniform", cfg.groupsize > 0, cfg.act_order)
    if cfg.groups == "all":
        return prune, ("per-channel",)
    return prune, ("groups", cfg.mi_axis, cfg.cluster, cfg.strategy)


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
    order = ["true-seq"] if cfg.true_sequential and (cfg.pruning or cfg.quantizing) else []  # changes the inputs
    if quant_key is None:
        return prune + (f"[{order[0]}]" if order else ""), _find("prune", prune_key).family
    m = _find("quant", quant_key)
    quant = m.label.format(groupsize=cfg.groupsize)
    if cfg.groupsize > 0 and "{groupsize}" not in m.label:
        quant += f"-g{cfg.groupsize}"
    details = allocation_details(cfg) + order
    if details:
        quant += f"[{','.join(details)}]"
    return (quant if prune == "dense" else f"{prune}+{quant}"), m.family


def allocation_details(cfg: RunConfig) -> list[str]:
    """What distinguishes runs of one method besides K: the allocation, its MI exponent, the cost source and
    the MI estimator, each named only when it is not the default (so default runs keep their plain label)."""
    if not cfg.grouped:
        return []
    out = ["act-order"] if cfg.act_order else []
    if cfg.bit_alloc != RunConfig.bit_alloc:
        out.append(cfg.bit_alloc)
    if cfg.bit_alloc == "hessian-mi" and cfg.mi_alpha != DEFAULT_MI_ALPHA:
        out.append(f"alpha={cfg.mi_alpha:g}")
    if cfg.bit_alloc != "uniform" and cfg.alloc_cost != RunConfig.alloc_cost:
        out.append(f"cost={cfg.alloc_cost}")
    if needs_mi(cfg.groups, cfg.cluster, cfg.bit_alloc) and cfg.mi_estimator != RunConfig.mi_estimator:
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
    budgets: tuple[str, ...] = ()  # --target-bpw of the searched methods (search-knapsack, search-evo)


@dataclass(frozen=True)
class SweepConfig:
    """One configuration of a sweep: its result id, its opt_mi.py flags, or why it cannot run."""

    id: str
    flags: tuple[str, ...]
    skip: str | None = None


def sparsity_flags(sparsity: str) -> list[str]:
    """``--sparsity S``, or ``--prunen N --prunem M`` for an "N:M" sparsity."""
    if ":" in sparsity:
        n, m = sparsity.split(":")
        return ["--prunen", n, "--prunem", m]
    return ["--sparsity", sparsity]


def _pruned(sparsity: str) -> bool:
    return ":" in sparsity or float(sparsity) > 0


def _sid(sparsity: str) -> str:
    """The sparsity as result ids spell it ("2:4" -> "2of4": no colon in file names)."""
    return sparsity.replace(":", "of")


def searched(m: Method) -> bool:
    """A method whose masks and widths a search picks per linear: it enters a sweep once per storage budget."""
    return m.key[0] == "search"


def run_flags(m: Method, sparsity: str, wbits: str, k: int | None) -> list[str]:
    """opt_mi.py flags of method m at one point of the matrix (sparsity and wbits as strings; a searched
    method's point is its budget, given as ``wbits``)."""
    if m.role == "reference":
        base = ["--sparsity", "0", "--wbits", "16"]
    elif searched(m):  # the search picks masks and widths: the budget is its only point
        base = ["--target-bpw", wbits]
    elif m.quantized:
        base = [*sparsity_flags(sparsity), "--wbits", wbits]
    else:
        base = sparsity_flags(sparsity)
    return base + m.flags.format(k=k).split()


def _whole(wbits: str) -> bool:
    return float(wbits) == int(float(wbits))


def matrix(options: SweepOptions) -> list[SweepConfig]:
    """Every configuration of a sweep, in run order: references, then per sparsity the pruning baselines,
    per budget the quantized methods, per K the grouped ones, then the searched methods once per storage
    budget (``budgets``, ids ``<method>_b<bpw>``), each once per seed (seed-independent ones, dense and
    magnitude, once; a searched run and the uniform ones share seeds, so the report pairs them). Sparsity 0
    has no pruning-only rows (they would repeat dense); whole-bit methods at a fractional budget are listed
    with a skip reason."""
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
        if _pruned(s):
            out += [SweepConfig(f"{m.id}_s{_sid(s)}", tuple(run_flags(m, s, "", None)))
                    for m in chosen if m.stage == "prune" and m.role != "reference"]
        for w in options.wbits:
            for m in (m for m in chosen if m.quantized and not m.per_k and not searched(m)):
                skip = None
                if m.whole_bits and not _whole(w):
                    skip = f"uniform quantization needs whole bits; a {w}-bit budget needs --groups"
                out.append(SweepConfig(f"{m.id}_s{_sid(s)}_w{w}", tuple(run_flags(m, s, w, None)), skip))
            for k in options.ks:
                out += [SweepConfig(f"{m.id}_s{_sid(s)}_w{w}_k{k}", tuple(run_flags(m, s, w, k)))
                        for m in chosen if m.per_k]
    out += [SweepConfig(f"{m.id}_b{b}", tuple(run_flags(m, "", b, None)))
            for m in chosen if searched(m) for b in options.budgets]
    return out
