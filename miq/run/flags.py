"""The command line of ``opt_mi.py``: the record it is parsed into (``RunConfig``, where every default is
written once) and every flag with its help, grouped as ``-h`` shows them.

Torch-free, like ``config`` (which validates what this parses into one ``RunConfig``). Every flag's default is
``RunConfig``'s field of the flag's name (``_D``), and a field that a step record in ``miq.options``
(``PassOptions``, ``PlanOptions``, ``MIOptions``) carries too defaults to that record's; choice lists come
from ``miq.options``. So neither the help nor a run without the flag can drift from what the code does.
``docs/cli.md`` is generated from ``build_parser()``.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Literal

from miq.errors import ConfigError
from miq.options import (
    AXES,
    BIASES,
    BINNINGS,
    BIT_ALLOC,
    CLUSTERS,
    COSTS,
    DEFAULT_EVAL,
    DEFAULT_MI_ALPHA,
    DEFAULT_SEARCH_GENERATIONS,
    DEFAULT_SEARCH_GROUPSIZE,
    DEFAULT_SEARCH_SPARSITIES,
    DEFAULT_SEARCH_WBITS,
    DEFAULT_SEARCH_WINDOWS,
    ESTIMATORS,
    NORMALIZATIONS,
    SAVE_FORMATS,
    SEARCHES,
    STRATEGIES,
    TOY_EVAL,
    TOY_NAMES,
    Level,
    MIOptions,
    PassOptions,
    PlanOptions,
    Recipe,
    nm_pattern,
)

LOADS = ("layers", "whole")  # --load: layer by layer (miq/model/onload.py) or from_pretrained
_MI = MIOptions()  # the estimator's defaults, under the flags' names (mi_bins ...)


@dataclass(frozen=True)
class RunConfig:
    """One validated run of opt_mi.py. Field names are the flags' (``--bit-alloc`` -> ``bit_alloc``); a field
    that a step record in ``miq.options`` carries too defaults to that record's default."""

    model: str
    dataset: str
    seed: int = PlanOptions.seed
    nsamples: int = 128
    percdamp: float = PassOptions.percdamp
    sparsity: float = PassOptions.sparsity
    prunen: int = PassOptions.prunen
    prunem: int = PassOptions.prunem
    blocksize: int = PassOptions.blocksize
    gmp: bool = False
    wbits: float = 16
    minlayer: int = -1
    maxlayer: int = 1000
    prune_only: str = ""
    invert: bool = False
    save: str = ""
    true_sequential: bool = False
    save_format: str = "packed"
    groupsize: int = PassOptions.groupsize
    sym: bool = PlanOptions.sym
    act_order: bool = PassOptions.act_order
    seqlen: int | None = None  # None until the model's positions are known (``with_seqlen``)
    eval: str | None = None
    device: str | None = None
    dtype: str = "auto"
    load: str = "layers"
    eval_batch: int = 16
    json: str = ""
    trust_remote_code: bool = False
    groups: int | Literal["all"] = 0
    mi_axis: str = PlanOptions.mi_axis
    strategy: str = PlanOptions.strategy
    cluster: str = PlanOptions.cluster
    bit_alloc: str = PlanOptions.bit_alloc
    alloc_cost: str = PlanOptions.alloc_cost
    bits_choices: tuple[int, ...] = PlanOptions.bits_choices
    mi_samples: int = 8192
    mi_bins: int = _MI.bins
    mi_binning: str = _MI.binning
    mi_bias: str = _MI.bias
    mi_normalize: str = _MI.normalize
    mi_estimator: str = _MI.estimator
    mi_alpha: float = PlanOptions.mi_alpha  # --mi-alpha's default depends on --bit-alloc (config.py)
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
    def calibrating(self) -> bool:
        """The run draws calibration windows: SparseGPT's passes and the searches use them; a dense run and
        magnitude pruning with round-to-nearest (--gmp) use none."""
        return (self.compressing and not self.gmp) or bool(self.search)

    @property
    def grouped(self) -> bool:
        """Quantization follows a per-layer plan of channel groups (--groups K or all)."""
        return self.quantizing and self.groups != 0

    @property
    def nm(self) -> tuple[int, int] | None:
        """The run's n:m pattern (``miq.options.nm_pattern``), or None."""
        return nm_pattern(self.prunen, self.prunem)

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


_D = RunConfig  # every flag's default: the record's field of the same name


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors (unknown flag, bad choice): one line, no usage
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="opt_mi.py", description="Compress an OPT or Llama-family model with SparseGPT and joint "
                "quantization, optionally with MI channel grouping.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="hub id (facebook/opt-125m, meta-llama/Llama-3.2-1B ...), a local folder, or a "
                   "built-in offline toy: 'toy' (OPT) or 'toy-llama'")
    p.add_argument("dataset", help="calibration data: wikitext2, ptb, c4, synthetic, or a local file (.json/.jsonl "
                   "records, any other name read as text)")
    _reference_flags(p.add_argument_group("reference (IST-DASLab/sparsegpt) options"))
    _toolkit_flags(p.add_argument_group("toolkit options"))
    _grouping_flags(p.add_argument_group("MI channel grouping"))
    _search_flags(p.add_argument_group("per-linear search (each decoder linear its own sparsity and width)"))
    _task_flags(p.add_argument_group("zero-shot tasks (lm-evaluation-harness)"))
    o = p.add_argument_group("analysis")
    o.add_argument("--analysis-dir", type=str, default=_D.analysis_dir, help="where mi_matrix.png etc. go; '' = none")
    o.add_argument("--plot-layer", type=str, default=_D.plot_layer,
                   help="layer to draw (default: the middle decoder layer's fc1 (OPT) or mlp.up_proj (Llama family)), "
                        "e.g. model.decoder.layers.0.fc1 or model.layers.0.mlp.up_proj")
    return p


def _reference_flags(a) -> None:
    """The flags of IST-DASLab/sparsegpt's opt.py, same names and defaults (plus --true-sequential from gptq)."""
    a.add_argument("--seed", type=int, default=_D.seed, help="seed for calibration sampling and everything seeded")
    a.add_argument("--nsamples", type=int, default=_D.nsamples, help="calibration windows")
    a.add_argument("--percdamp", type=float, default=_D.percdamp, help="Hessian damping, fraction of mean diagonal")
    a.add_argument("--sparsity", type=float, default=_D.sparsity, help="target unstructured sparsity in [0, 1)")
    a.add_argument("--prunen", type=int, default=_D.prunen, help="N of N:M structured sparsity")
    a.add_argument("--prunem", type=int, default=_D.prunem, help="M of N:M structured sparsity")
    a.add_argument("--blocksize", type=int, default=_D.blocksize, help="columns per adaptive-mask block")
    a.add_argument("--gmp", action="store_true", help="magnitude pruning instead of SparseGPT (baseline)")
    a.add_argument("--wbits", type=float, default=_D.wbits,
                   help="bits per weight: 2..8, or 16 for none; with --groups an average budget (e.g. 3.5)")
    a.add_argument("--minlayer", type=int, default=_D.minlayer, help="compress decoder layers with index >= this")
    a.add_argument("--maxlayer", type=int, default=_D.maxlayer, help="compress decoder layers with index < this")
    a.add_argument("--prune_only", type=str, default=_D.prune_only,
                   help="compress only linear layers whose name contains this")
    a.add_argument("--invert", action="store_true", help="invert the layer selection above")
    a.add_argument("--save", type=str, default=_D.save, help="save the compressed model here (see --save-format)")
    a.add_argument("--true-sequential", action="store_true",
                   help="compress a layer's linears in sub-groups (attention q/k/v, output projection, MLP in, MLP "
                        "out), each from the outputs of the sub-groups compressed before it (IST-DASLab/gptq)")
    a.add_argument("--save-format", choices=SAVE_FORMATS, default=_D.save_format,
                   help="packed: codes at their widths, reloads exactly; compressed-tensors: loads with "
                        "transformers' from_pretrained; dense: save_pretrained of the fake-quantized weights")


def _toolkit_flags(b) -> None:
    """Quantization grid, data, device and output flags the reference lacks."""
    b.add_argument("--groupsize", type=int, default=_D.groupsize,
                   help="GPTQ groups: new quantization parameters every G columns")
    b.add_argument("--sym", action="store_true", help="symmetric quantization (reference default: asymmetric)")
    b.add_argument("--act-order", action="store_true",
                   help="process columns by descending diag H (GPTQ's desc_act); with column groups their "
                        "parameters are fixed before the pass (static groups), so g_idx stays valid")
    b.add_argument("--seqlen", type=int, default=_D.seqlen, help="window length (default min(2048, model positions))")
    b.add_argument("--eval", type=str, default=_D.eval,
                   help=f"comma-separated eval sets (names or files); default {DEFAULT_EVAL} "
                        f"('{TOY_EVAL}' for the toys)")
    b.add_argument("--device", type=str, default=_D.device, help="cuda, cuda:1, cpu ... (default cuda when available)")
    b.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default=_D.dtype,
                   help="model dtype; auto = float32 on cpu, the checkpoint's dtype on cuda")
    b.add_argument("--load", choices=LOADS, default=_D.load,
                   help="layers: build the model on the meta device and read each decoder layer's weights from the "
                        "safetensors checkpoint (one file or shards) when compression or evaluation reaches it, "
                        "releasing them after: host memory holds a few layers, not the model; whole: "
                        "from_pretrained reads every weight first. Pickled .bin checkpoints and packed folders "
                        "always load whole")
    b.add_argument("--eval-batch", type=int, default=_D.eval_batch, help="windows per layer call during evaluation")
    b.add_argument("--json", type=str, default=_D.json, help="write results here (atomically)")
    b.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")


def _grouping_flags(m) -> None:
    """The MI method and its controls: groups, axis, clustering, allocation, estimator."""
    m.add_argument("--groups", type=str, default=str(_D.groups),
                   help="K channel groups per layer; 0 = off (uniform per-channel); 'all' = every channel its own")
    m.add_argument("--mi-axis", choices=AXES, default=_D.mi_axis,
                   help="output: group rows (output channels) by their outputs' MI; input: group input columns by "
                        "the layer inputs' MI, each column group a quantization group (a grid per row and group)")
    m.add_argument("--strategy", choices=STRATEGIES, default=_D.strategy,
                   help="independent: a group shares bits, rows keep own scale/zero (B); shared: one scale/zero (A)")
    m.add_argument("--cluster", choices=CLUSTERS, default=_D.cluster,
                   help="how channels are grouped: by MI (spectral, hierarchical), controls (random, contiguous), "
                        "or by range (k-means on row min/max, or on column scale and diag H)")
    m.add_argument("--bit-alloc", choices=BIT_ALLOC, default=_D.bit_alloc, help="how bits are given to groups")
    m.add_argument("--alloc-cost", choices=COSTS, default=_D.alloc_cost,
                   help="group costs: obs = SparseGPT's own losses at every width (trial passes); "
                        "rtn = Hessian-weighted round-to-nearest error of the dense weights (a proxy)")
    m.add_argument("--target-bpw", type=float, default=_D.target_bpw,
                   help="instead of --wbits: the total storage to meet, in bits per decoder linear weight (codes of "
                        "kept weights + scales, zero-points, indices + mask, as `bpw` in the results): the mean "
                        "width of kept weights is set before any work so that the run stores at most this")
    m.add_argument("--bits-choices", type=str, default=",".join(map(str, _D.bits_choices)),
                   help="candidate bit-widths")
    m.add_argument("--mi-samples", type=int, default=_D.mi_samples,
                   help="rows (tokens) of each layer's outputs (or inputs, --mi-axis input) sampled for MI")
    m.add_argument("--mi-bins", type=int, default=_D.mi_bins)
    m.add_argument("--mi-binning", choices=BINNINGS, default=_D.mi_binning)
    m.add_argument("--mi-bias", choices=BIASES, default=_D.mi_bias)
    m.add_argument("--mi-normalize", choices=NORMALIZATIONS, default=_D.mi_normalize)
    m.add_argument("--mi-estimator", choices=ESTIMATORS, default=_D.mi_estimator)
    m.add_argument("--mi-alpha", type=float, default=None,  # None: RunConfig's 0, or the default for hessian-mi
                   help="exponent of the MI redundancy factor (1 - intra NMI)^alpha; "
                        f"default {DEFAULT_MI_ALPHA:g} for hessian-mi, else 0")


def _search_flags(s) -> None:
    """Each compressed linear's level (mask, width, grid) chosen from a database of levels under --target-bpw."""
    s.add_argument("--search", choices=SEARCHES, default="",
                   help="with --target-bpw: give each decoder linear its own sparsity, width and grid from the "
                        "levels below, under the stored-bits budget. knapsack: the per-linear output losses "
                        "summed, solved exactly; evo: from the knapsack's answer, an evolutionary search of the "
                        "stitched model's KL from the dense model on held-out calibration windows")
    s.add_argument("--search-sparsities", type=str, default=DEFAULT_SEARCH_SPARSITIES,
                   help="the masks a linear may take: unstructured sparsities in [0, 1) and/or N:M (e.g. 2:4)")
    s.add_argument("--search-wbits", type=str, default=DEFAULT_SEARCH_WBITS,
                   help="the widths a linear may take: 2..8, or 16 for not quantized")
    s.add_argument("--search-groupsize", type=str, default=DEFAULT_SEARCH_GROUPSIZE,
                   help="the grids a linear may take: -1 (one per row) and/or G (new parameters every G columns); a "
                        "list that starts with -1 goes after '=': --search-groupsize=-1,64")
    s.add_argument("--search-cache", type=str, default="",
                   help="where level databases are kept and reused (default $MIQ_CACHE_DIR/search, or "
                        "~/.cache/mutual_info_quantization/search)")
    s.add_argument("--search-generations", type=int, default=DEFAULT_SEARCH_GENERATIONS,
                   help="generations of the evolutionary search (--search evo)")
    s.add_argument("--search-windows", type=int, default=DEFAULT_SEARCH_WINDOWS,
                   help="calibration windows held apart from the database's for the evolution's KL (--search evo)")


def _task_flags(t) -> None:
    """Accuracy on the harness's tasks, beside perplexity, on the compressed model (or a saved folder) in memory."""
    t.add_argument("--tasks", type=str, default=_D.tasks,
                   help="comma-separated lm-evaluation-harness tasks after perplexity: names (piqa, arc_easy, "
                        "lambada_openai ...; their datasets download on first use) and/or paths to task YAML "
                        "files (.yaml/.yml, read as local tasks); '' = none. Needs pip install lm-eval")
    t.add_argument("--tasks-fewshot", type=int, default=_D.tasks_fewshot,
                   help="examples in each prompt (default: each task's own, 0 when it sets none)")
    t.add_argument("--tasks-limit", type=int, default=_D.tasks_limit,
                   help="evaluate only the first N documents of each task (a quick look; default all)")
    t.add_argument("--tasks-batch", type=int, default=_D.tasks_batch, help="requests per forward pass of the harness")
