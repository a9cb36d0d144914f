"""The command line of ``opt_mi.py``: every flag, its default and its help, grouped as ``-h`` shows them.

Torch-free, like ``config`` (which validates what this parses into one ``RunConfig``): choice lists and
defaults come from ``miq.options`` so the help cannot
drift from what the code accepts. ``docs/cli.md`` is generated from ``build_parser()``.
"""

from __future__ import annotations

import argparse

from miq.errors import ConfigError
from miq.options import (
    AXES,
    BIASES,
    BINNINGS,
    BIT_ALLOC,
    CLUSTERS,
    COSTS,
    DEFAULT_BITS_CHOICES,
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
    MIOptions,
)

_MI = MIOptions()  # the estimator defaults
LOADS = ("layers", "whole")  # --load: layer by layer (miq/model/onload.py) or from_pretrained


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
    o.add_argument("--analysis-dir", type=str, default="analysis", help="where mi_matrix.png etc. go; '' = none")
    o.add_argument("--plot-layer", type=str, default=None,
                   help="layer to draw (default: the middle decoder layer's fc1 (OPT) or mlp.up_proj (Llama family)), "
                        "e.g. model.decoder.layers.0.fc1 or model.layers.0.mlp.up_proj")
    return p


def _reference_flags(a) -> None:
    """The flags of IST-DASLab/sparsegpt's opt.py, same names and defaults (plus --true-sequential from gptq)."""
    a.add_argument("--seed", type=int, default=0, help="seed for calibration sampling and everything seeded")
    a.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    a.add_argument("--percdamp", type=float, default=0.01, help="Hessian damping, fraction of mean diagonal")
    a.add_argument("--sparsity", type=float, default=0.0, help="target unstructured sparsity in [0, 1)")
    a.add_argument("--prunen", type=int, default=0, help="N of N:M structured sparsity")
    a.add_argument("--prunem", type=int, default=0, help="M of N:M structured sparsity")
    a.add_argument("--blocksize", type=int, default=128, help="columns per adaptive-mask block")
    a.add_argument("--gmp", action="store_true", help="magnitude pruning instead of SparseGPT (baseline)")
    a.add_argument("--wbits", type=float, default=16,
                   help="bits per weight: 2..8, or 16 for none; with --groups an average budget (e.g. 3.5)")
    a.add_argument("--minlayer", type=int, default=-1, help="compress decoder layers with index >= this")
    a.add_argument("--maxlayer", type=int, default=1000, help="compress decoder layers with index < this")
    a.add_argument("--prune_only", type=str, default="", help="compress only linear layers whose name contains this")
    a.add_argument("--invert", action="store_true", help="invert the layer selection above")
    a.add_argument("--save", type=str, default="", help="save the compressed model here (see --save-format)")
    a.add_argument("--true-sequential", action="store_true",
                   help="compress a layer's linears in sub-groups (attention q/k/v, output projection, MLP in, MLP "
                        "out), each from the outputs of the sub-groups compressed before it (IST-DASLab/gptq)")
    a.add_argument("--save-format", choices=SAVE_FORMATS, default="packed",
                   help="packed: codes at their widths, reloads exactly; compressed-tensors: loads with "
                        "transformers' from_pretrained; dense: save_pretrained of the fake-quantized weights")


def _toolkit_flags(b) -> None:
    """Quantization grid, data, device and output flags the reference lacks."""
    b.add_argument("--groupsize", type=int, default=-1, help="GPTQ groups: new quantization parameters every G columns")
    b.add_argument("--sym", action="store_true", help="symmetric quantization (reference default: asymmetric)")
    b.add_argument("--act-order", action="store_true",
                   help="process columns by descending diag H (GPTQ's desc_act); with column groups their "
                        "parameters are fixed before the pass (static groups), so g_idx stays valid")
    b.add_argument("--seqlen", type=int, default=None, help="window length (default min(2048, model positions))")
    b.add_argument("--eval", type=str, default=None,
                   help=f"comma-separated eval sets (names or files); default {DEFAULT_EVAL} "
                        f"('{TOY_EVAL}' for the toys)")
    b.add_argument("--device", type=str, default=None, help="cuda, cuda:1, cpu ... (default cuda when available)")
    b.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="model dtype; auto = float32 on cpu, the checkpoint's dtype on cuda")
    b.add_argument("--load", choices=LOADS, default="layers",
                   help="layers: build the model on the meta device and read each decoder layer's weights from the "
                        "safetensors checkpoint (one file or shards) when compression or evaluation reaches it, "
                        "releasing them after: host memory holds a few layers, not the model; whole: "
                        "from_pretrained reads every weight first. Pickled .bin checkpoints and packed folders "
                        "always load whole")
    b.add_argument("--eval-batch", type=int, default=16, help="windows per layer call during evaluation")
    b.add_argument("--json", type=str, default="", help="write results here (atomically)")
    b.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")


def _grouping_flags(m) -> None:
    """The MI method and its controls: groups, axis, clustering, allocation, estimator."""
    m.add_argument("--groups", type=str, default="0",
                   help="K channel groups per layer; 0 = off (uniform per-channel); 'all' = every channel its own")
    m.add_argument("--mi-axis", choices=AXES, default="output",
                   help="output: group rows (output channels) by their outputs' MI; input: group input columns by "
                        "the layer inputs' MI, each column group a quantization group (a grid per row and group)")
    m.add_argument("--strategy", choices=STRATEGIES, default="independent",
                   help="independent: a group shares bits, rows keep own scale/zero (B); shared: one scale/zero (A)")
    m.add_argument("--cluster", choices=CLUSTERS, default="spectral",
                   help="how channels are grouped: by MI (spectral, hierarchical), controls (random, contiguous), "
                        "or by range (k-means on row min/max, or on column scale and diag H)")
    m.add_argument("--bit-alloc", choices=BIT_ALLOC, default="hessian", help="how bits are given to groups")
    m.add_argument("--alloc-cost", choices=COSTS, default="obs",
                   help="group costs: obs = SparseGPT's own losses at every width (trial passes); "
                        "rtn = Hessian-weighted round-to-nearest error of the dense weights (a proxy)")
    m.add_argument("--target-bpw", type=float, default=None,
                   help="instead of --wbits: the total storage to meet, in bits per decoder linear weight (codes of "
                        "kept weights + scales, zero-points, indices + mask, as `bpw` in the results): the mean "
                        "width of kept weights is set before any work so that the run stores at most this")
    m.add_argument("--bits-choices", type=str, default=",".join(map(str, DEFAULT_BITS_CHOICES)),
                   help="candidate bit-widths")
    m.add_argument("--mi-samples", type=int, default=8192,
                   help="rows (tokens) of each layer's outputs (or inputs, --mi-axis input) sampled for MI")
    m.add_argument("--mi-bins", type=int, default=_MI.bins)
    m.add_argument("--mi-binning", choices=BINNINGS, default=_MI.binning)
    m.add_argument("--mi-bias", choices=BIASES, default=_MI.bias)
    m.add_argument("--mi-normalize", choices=NORMALIZATIONS, default=_MI.normalize)
    m.add_argument("--mi-estimator", choices=ESTIMATORS, default=_MI.estimator)
    m.add_argument("--mi-alpha", type=float, default=None,
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
    t.add_argument("--tasks", type=str, default="",
                   help="comma-separated lm-evaluation-harness tasks after perplexity: names (piqa, arc_easy, "
                        "lambada_openai ...; their datasets download on first use) and/or paths to task YAML "
                        "files (.yaml/.yml, read as local tasks); '' = none. Needs pip install lm-eval")
    t.add_argument("--tasks-fewshot", type=int, default=None,
                   help="examples in each prompt (default: each task's own, 0 when it sets none)")
    t.add_argument("--tasks-limit", type=int, default=None,
                   help="evaluate only the first N documents of each task (a quick look; default all)")
    t.add_argument("--tasks-batch", type=int, default=8, help="requests per forward pass of the harness")
