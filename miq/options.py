"""The toolkit's choices and the settings that travel together, torch-free.

Every flag's allowed values and defaults live here, so that the command line (``miq.run.config``), the
algorithms that check their arguments and the reports that read a run's config agree without importing each
other (the reports import no torch). The frozen records are what one step of a run is given whole:
``MIOptions`` (how MI is estimated), ``PassOptions`` (one SparseGPT pass) and ``PlanOptions`` (what one
layer's MI plan is asked for). Each holds the defaults of its fields, once: ``RunConfig``'s fields of the same
names default to them and the command line's flags to ``RunConfig``'s. ``pick`` builds any of the records from
a ``RunConfig``, whose fields carry the same names.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

STRATEGIES = ("independent", "shared")  # B: a group shares bits; A: it shares one scale/zero too
GROUPINGS = ("spectral", "hierarchical", "random", "contiguous")  # channel_grouping.group_channels' methods
CLUSTERS = GROUPINGS + ("range",)  # every --cluster; range groups come from channel_grouping.range_groups
NEEDS_MI = ("spectral", "hierarchical", "random")  # random keeps spectral's group sizes
BIT_ALLOC = ("uniform", "hessian", "hessian-mi")
COSTS = ("obs", "rtn")
DEFAULT_BITS_CHOICES = (2, 3, 4, 5, 6, 8)
DEFAULT_MI_ALPHA = 1.0  # the CLI's exponent for hessian-mi when --mi-alpha is not given (allocate's is 0)
BINNINGS = ("uniform", "quantile")
BIASES = ("none", "miller-madow")
NORMALIZATIONS = ("arithmetic", "geometric", "min", "max")
ESTIMATORS = ("histogram", "gaussian")
AXES = ("output", "input")
TOY_NAMES = ("toy", "toy-llama")  # the built-in offline models (miq.model.toy builds them)
SAVE_FORMATS = ("packed", "compressed-tensors", "dense")  # --save-format (miq/checkpoint/formats.py)
DEFAULT_EVAL = "wikitext2,ptb,c4"
SEARCHES = ("knapsack", "evo")  # --search: per-linear levels under --target-bpw (miq/search/)
DEFAULT_SEARCH_SPARSITIES = "0,0.25,0.5,0.6,0.7"  # "2:4" (n:m) may be listed too
DEFAULT_SEARCH_WBITS = "2,3,4,5,8"  # 16 = not quantized
DEFAULT_SEARCH_GROUPSIZE = "-1,128"  # per-row grids and GPTQ's groups of 128 columns
DEFAULT_SEARCH_GENERATIONS = 50
DEFAULT_SEARCH_WINDOWS = 16  # held-out calibration windows the evolution's fitness reads
TOY_EVAL = "synthetic"


@dataclass(frozen=True)
class MIOptions:
    """How pairwise MI is estimated (``mutual_info.pairwise_mi``'s arguments); the CLI's defaults."""

    bins: int = 16
    binning: str = "quantile"
    bias: str = "miller-madow"
    normalize: str = "arithmetic"
    estimator: str = "histogram"


@dataclass(frozen=True)
class PassOptions:
    """The settings of one SparseGPT pass over a layer (IST-DASLab/sparsegpt's ``fasterprune`` arguments, plus
    GPTQ's column groups and act-order).

    sparsity: the unstructured target in [0, 1); prunen:prunem: N:M instead (0:0 = off); blocksize: columns per
    adaptive-mask block; percdamp: Hessian damping as a fraction of its mean diagonal; groupsize: new
    quantization parameters every G columns (-1 = one set per row); act_order: columns by descending diag H.
    """

    sparsity: float = 0.0
    prunen: int = 0
    prunem: int = 0
    blocksize: int = 128
    percdamp: float = 0.01
    groupsize: int = -1
    act_order: bool = False


@dataclass(frozen=True)
class Level:
    """One linear's compression: what a search chooses per linear and what a uniform run gives every linear.

    ``wbits`` 16 = not quantized; a uniform MI-grouped run's default level carries its mean width (a float)."""

    sparsity: float = 0.0  # unstructured fraction pruned (ignored when prunen)
    prunen: int = 0
    prunem: int = 0
    wbits: int = 16
    groupsize: int = -1  # -1 = one grid per row

    def label(self) -> str:
        """e.g. "s0.5 w3 g128", "2:4 w4", "dense w16": what JSON records and figures name a level by."""
        mask = f"{self.prunen}:{self.prunem}" if self.prunen else f"s{fmt_num(self.sparsity)}" if self.sparsity \
            else "dense"
        return f"{mask} w{fmt_num(self.wbits)}" + (f" g{self.groupsize}" if self.groupsize > 0 else "")

    @property
    def pruning(self) -> bool:
        return self.sparsity > 0 or self.prunen > 0

    @property
    def nm(self) -> tuple[int, int] | None:
        return (self.prunen, self.prunem) if self.prunen else None


@dataclass(frozen=True)
class Recipe:
    """Each compressed linear's level: ``default`` for every linear (a uniform run), or a level per linear
    name (a searched run). Compression reads every linear's level here, so both take one code path."""

    default: Level = Level()
    levels: tuple[tuple[str, Level], ...] = ()  # (linear name, level): a tuple, so the record stays frozen

    def of(self, name: str) -> Level:
        return dict(self.levels).get(name, self.default)

    @classmethod
    def per_linear(cls, default: Level, levels: dict[str, Level]) -> Recipe:
        return cls(default, tuple(levels.items()))


def needs_mi(groups, cluster: str, bit_alloc: str) -> bool:
    """Whether a plan computes MI: for clustering by dependence (random keeps spectral's sizes) or for
    hessian-mi; never with every channel its own group."""
    return groups not in (0, "all") and (cluster in NEEDS_MI or bit_alloc == "hessian-mi")


def nm_pattern(prunen: int, prunem: int) -> tuple[int, int] | None:
    """The n:m pattern of a pruning mask, or None (unstructured or no pruning): what the packed format and the
    bits account are told, so that an aligned n:m mask is stored as indices rather than a bitmask."""
    return (prunen, prunem) if prunen else None


@dataclass(frozen=True)
class PlanOptions:
    """What a layer's plan is asked for: K groups (or "all"), how to find them, how to give them bits
    (``miq.plan.mi_plan.plan_layer``).

    groups: K >= 1 or "all" (every row alone); a K above a layer's rows is clipped to its rows.
    wbits: the mean-bits budget; bits_choices: candidate widths; mi_alpha: the hessian-mi exponent.
    seed: seeds the clustering; sym, groupsize: the quantizer's, so the costs are those of its grid.
    alloc_cost: "obs" (SparseGPT's own losses from trial passes) or "rtn" (the dense round-to-nearest proxy).
    mi_axis: "output" groups rows (channels of the layer's outputs), "input" groups columns (its inputs): a
    column group is a quantization group (a grid per row and group), as GPTQ's groups.
    """

    groups: int | str
    wbits: float
    cluster: str = "spectral"
    strategy: str = "independent"
    bit_alloc: str = "hessian"
    bits_choices: tuple[int, ...] = DEFAULT_BITS_CHOICES
    mi: MIOptions = MIOptions()
    mi_alpha: float = 0.0
    seed: int = 0
    sym: bool = False
    groupsize: int = PassOptions.groupsize
    alloc_cost: str = "obs"
    mi_axis: str = "output"

    @property
    def uniform_bits(self) -> int:
        """The width uniform allocation gives every group: the largest choice within the budget."""
        return max(b for b in self.bits_choices if b <= self.wbits)

    def needs_trial(self) -> bool:
        """Trial passes at every width: whenever widths are allocated (the obs costs need them, and with
        rtn costs the rows are still taken from them, so that the two costs differ in nothing else)."""
        return self.bit_alloc != "uniform"

    def needs_mi(self) -> bool:
        return needs_mi(self.groups, self.cluster, self.bit_alloc)


def pick(cls, source):
    """An options record ``cls`` filled from ``source`` (a RunConfig) by field name."""
    return cls(**{f.name: getattr(source, f.name) for f in dataclasses.fields(cls)})


def fmt_num(x: float) -> str:
    """A bit width, budget or sparsity as given: 4.0 -> "4", 3.5 -> "3.5"; nan and inf as themselves."""
    return str(int(x)) if math.isfinite(x) and x == int(x) else str(x)


def fmt_fixed(v: float | None, digits: int = 4) -> str:
    """A measured value at fixed decimals, so summaries and reports print the same digits and a reader (or a
    test) can parse them back; "n/a" for a missing or non-finite value."""
    return "n/a" if v is None or not math.isfinite(float(v)) else f"{float(v):.{digits}f}"
