"""Compress an OPT model with SparseGPT and joint quantization, optionally with MI channel grouping.

    python opt_mi.py facebook/opt-125m c4 --sparsity 0.5 --wbits 4 --groups 50
    python opt_mi.py toy synthetic --sparsity 0.5 --wbits 4 --groups 8      # offline, about a minute

Flow as IST-DASLab/sparsegpt's opt.py: capture decoder layer 0's inputs on the calibration windows, then
for each decoder layer accumulate every linear layer's Hessian (and sample its outputs for MI), compress
the linear layers, and feed the compressed layer's outputs to the next; finally evaluate perplexity with the
same layer walker.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import sys
import time
import zlib
from dataclasses import dataclass, field

import torch

import atomic
import bitstats
import datautils
import layerwalk
from mi_plan import LayerPlan, MIOptions, PlanError, plan_layer
from quant import STRATEGIES, Quantizer, rtn
from sparsegpt_mi import LayerInputError, SparseGPT, magnitude_prune

CLUSTERS = ("spectral", "hierarchical", "random", "contiguous")
BIT_ALLOCS = ("uniform", "hessian", "hessian-mi")
DEFAULT_EVAL = "wikitext2,ptb,c4"


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        sys.stderr.write(f"opt_mi.py: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> Parser:
    p = Parser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="hub id (facebook/opt-125m ...), a local folder, or 'toy' (built-in, offline)")
    p.add_argument("dataset", help="calibration data: wikitext2, ptb, c4, synthetic, or a .txt/.json/.jsonl file")
    a = p.add_argument_group("reference (IST-DASLab/sparsegpt) options")
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
    a.add_argument("--save", type=str, default="", help="save the compressed model (safetensors) and tokenizer here")
    b = p.add_argument_group("toolkit options")
    b.add_argument("--groupsize", type=int, default=-1, help="GPTQ groups: new quantization parameters every G columns")
    b.add_argument("--sym", action="store_true", help="symmetric quantization (reference default: asymmetric)")
    b.add_argument("--seqlen", type=int, default=None, help="window length (default min(2048, model positions))")
    b.add_argument("--eval", type=str, default=None,
                   help=f"comma-separated eval sets (names or files); default {DEFAULT_EVAL} ('synthetic' for toy)")
    b.add_argument("--device", type=str, default=None, help="cuda, cuda:1, cpu ... (default cuda when available)")
    b.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="model dtype; auto = float32 on cpu, the checkpoint's dtype on cuda")
    b.add_argument("--eval-batch", type=int, default=16, help="windows per layer call during evaluation")
    b.add_argument("--json", type=str, default="", help="write results here (atomically)")
    b.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    m = p.add_argument_group("MI channel grouping")
    m.add_argument("--groups", type=str, default="0",
                   help="K channel groups per layer; 0 = off (uniform per-channel); 'all' = every channel its own")
    m.add_argument("--strategy", choices=STRATEGIES, default="independent",
                   help="independent: a group shares bits, rows keep own scale/zero (B); shared: one scale/zero (A)")
    m.add_argument("--cluster", choices=CLUSTERS, default="spectral", help="how channels are grouped")
    m.add_argument("--bit-alloc", choices=BIT_ALLOCS, default="hessian", help="how bits are given to groups")
    m.add_argument("--bits-choices", type=str, default="2,3,4,5,6,8", help="candidate bit-widths")
    m.add_argument("--mi-samples", type=int, default=8192, help="output rows (tokens) sampled per layer for MI")
    m.add_argument("--mi-bins", type=int, default=16)
    m.add_argument("--mi-binning", choices=("quantile", "uniform"), default="quantile")
    m.add_argument("--mi-bias", choices=("none", "miller-madow"), default="miller-madow")
    m.add_argument("--mi-normalize", choices=("arithmetic", "geometric", "min", "max"), default="arithmetic")
    m.add_argument("--mi-estimator", choices=("histogram", "gaussian"), default="histogram")
    m.add_argument("--mi-alpha", type=float, default=None,
                   help="exponent of the MI redundancy factor (1 - intra NMI)^alpha; default 1 for hessian-mi")
    o = p.add_argument_group("analysis")
    o.add_argument("--analysis-dir", type=str, default="analysis", help="where mi_matrix.png etc. go; '' = none")
    o.add_argument("--plot-layer", type=str, default=None,
                   help="layer to draw (default: fc1 of the middle decoder layer), e.g. model.decoder.layers.0.fc1")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate; a bad value exits with one line on stderr and code 2."""
    p = build_parser()
    args = p.parse_args(argv)

    def bad(flag: str, value, allowed: str):
        p.error(f"{flag} {value}: {allowed}")

    if not 0 <= args.sparsity < 1:
        bad("--sparsity", args.sparsity, "must be in [0, 1)")
    if (args.prunen == 0) != (args.prunem == 0):
        bad("--prunen/--prunem", f"{args.prunen}:{args.prunem}", "set both (N < M) or neither")
    if args.prunen and not 0 < args.prunen < args.prunem:
        bad("--prunen/--prunem", f"{args.prunen}:{args.prunem}", "need 0 < N < M")
    if args.prunen and args.sparsity:
        bad("--sparsity", args.sparsity, "use either --sparsity or --prunen/--prunem, not both")
    if not (2 <= args.wbits <= 8 or args.wbits == 16):
        bad("--wbits", _fmt(args.wbits), "must be in 2..8, or 16 for no quantization")
    if args.groupsize <= 0 and args.groupsize != -1:
        bad("--groupsize", args.groupsize, "must be a positive number of columns, or -1 for none")
    if args.nsamples < 1:
        bad("--nsamples", args.nsamples, "must be at least 1")
    if args.seqlen is not None and args.seqlen < 2:
        bad("--seqlen", args.seqlen, "must be at least 2")
    if args.eval_batch < 1:
        bad("--eval-batch", args.eval_batch, "must be at least 1")
    if args.blocksize < 1:
        bad("--blocksize", args.blocksize, "must be at least 1")
    if args.percdamp <= 0:
        bad("--percdamp", args.percdamp, "must be > 0")
    if args.mi_samples < 2:
        bad("--mi-samples", args.mi_samples, "must be at least 2")
    if args.mi_bins < 2:
        bad("--mi-bins", args.mi_bins, "must be at least 2")

    g = args.groups.strip().lower()
    if g == "all":
        args.groups = "all"
    else:
        try:
            args.groups = int(g)
        except ValueError:
            bad("--groups", args.groups, "must be an integer K >= 0 or 'all'")
        if args.groups < 0:
            bad("--groups", args.groups, "must be an integer K >= 0 or 'all'")
    try:
        choices = [int(c) for c in args.bits_choices.split(",") if c.strip()]
    except ValueError:
        choices = []
    if not choices or choices != sorted(set(choices)) or not all(1 <= c <= 16 for c in choices):
        bad("--bits-choices", repr(args.bits_choices), "need comma-separated increasing integers in 1..16, e.g. 2,3,4")
    args.bits_choices = choices

    quantizing = args.wbits != 16
    if args.groups != 0:
        if not quantizing:
            bad("--groups", args.groups, "needs quantization: set --wbits below 16")
        if not choices[0] <= args.wbits <= choices[-1]:
            bad("--wbits", _fmt(args.wbits), f"the budget must lie within --bits-choices [{choices[0]}, {choices[-1]}]")
        if args.gmp:
            bad("--groups", args.groups, "MI grouping runs inside SparseGPT; it is not available with --gmp")
    elif quantizing and args.wbits != int(args.wbits):
        bad("--wbits", _fmt(args.wbits), "fractional budgets need --groups (uniform quantization uses whole bits)")
    if args.mi_alpha is None:
        args.mi_alpha = 1.0 if args.bit_alloc == "hessian-mi" else 0.0
    if args.mi_alpha < 0:
        bad("--mi-alpha", args.mi_alpha, "must be >= 0")
    for name in [args.dataset] + _eval_names(args):
        try:
            datautils.validate_name(name)
        except datautils.DataError as e:
            flag = "DATASET" if name == args.dataset else "--eval"
            p.error(f"{flag}: {e}")
    return args


def _fmt(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)


def _eval_names(args) -> list[str]:
    spec = args.eval if args.eval is not None else ("synthetic" if args.model == "toy" else DEFAULT_EVAL)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    return names


def method_label(args) -> tuple[str, str]:
    """(label, family) naming the configuration for reports, e.g. ("sparsegpt+mi-B", "mi")."""
    pruned = args.sparsity > 0 or args.prunen > 0
    prune = "dense" if not pruned else ("magnitude" if args.gmp else "sparsegpt")
    if args.prunen:
        prune += f"-{args.prunen}:{args.prunem}"
    if args.wbits == 16:
        return prune, prune.split("-")[0]
    letter = "A" if args.strategy == "shared" else "B"
    if args.groups == 0:
        quant, family = "uniform", "uniform"
    elif args.groups == "all":
        quant, family = "per-channel", "per-channel"
    elif args.cluster in ("spectral", "hierarchical"):
        quant, family = f"mi-{letter}" + ("-hier" if args.cluster == "hierarchical" else ""), "mi"
    else:
        quant, family = f"{args.cluster}-{letter}", args.cluster
    if args.groupsize > 0:
        quant += f"-g{args.groupsize}"
        family = "uniform-g" if family == "uniform" else family
    return (quant if prune == "dense" else f"{prune}+{quant}"), family


# ----------------------------------------------------------------------------------------------------------
# model loading


def resolve_model(name: str) -> str:
    if name == "toy":
        import toy

        return toy.toy_model_path()
    if os.path.isdir(name):
        return name
    if name.startswith((".", "/", "~")) or os.path.exists(name):
        raise UserError(f"MODEL {name}: model folder not found (give a local folder, a hub id or 'toy')")
    return name


def load_config_and_tokenizer(args):
    """Config and tokenizer only: cheap, so bad input fails before the weights load."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # our own bars cover layers and evaluation; keep stderr for errors
    path = resolve_model(args.model)
    trust = args.trust_remote_code
    reason = None if os.path.isdir(path) else datautils.hub_probe()
    try:
        # unreachable hub: read the local cache only, instead of huggingface_hub's retries (about 25 s)
        with datautils.offline_mode() if reason else contextlib.nullcontext():
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    except (OSError, ValueError) as e:
        why = f"{reason} and not in the cache" if reason else _first_line(e)
        raise UserError(f"MODEL {args.model}: could not load it from the Hugging Face hub or the local cache "
                        f"({why}); offline? pass a local model folder or 'toy'") from None
    args._hub_offline = bool(reason)
    if config.model_type != "opt":
        raise UserError(f"MODEL {args.model}: model_type '{config.model_type}' is not OPT; this toolkit walks OPT")
    positions = config.max_position_embeddings
    if args.seqlen is None:
        args.seqlen = min(2048, positions)
    elif args.seqlen > positions:
        raise UserError(f"--seqlen {args.seqlen}: larger than the model's {positions} positions")
    with datautils.offline_mode() if reason else contextlib.nullcontext():
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    return path, tokenizer


def load_model(args, path: str, dev: torch.device):
    from transformers import AutoModelForCausalLM

    if args.dtype == "auto":
        dtype = torch.float32 if dev.type == "cpu" else "auto"
    else:
        dtype = getattr(torch, args.dtype)
    with datautils.offline_mode() if getattr(args, "_hub_offline", False) else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=args.trust_remote_code)
    model.eval()
    model.config.use_cache = False
    return model


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__


# ----------------------------------------------------------------------------------------------------------
# compression


@dataclass
class CompressionResult:
    layers: list[dict] = field(default_factory=list)
    bits: list[bitstats.LayerBits] = field(default_factory=list)
    timing: dict = field(default_factory=lambda: {"mi_s": 0.0, "cluster_s": 0.0, "alloc_s": 0.0, "prune_s": 0.0})
    plot: tuple | None = None  # (layer name, LayerPlan) kept for the figures


def selected(args, index: int, name: str) -> bool:
    """The reference's --minlayer/--maxlayer/--prune_only/--invert rule."""
    return (args.minlayer <= index < args.maxlayer and args.prune_only in name) != args.invert


def _mask_kind(args):
    if args.prunen:
        return (args.prunen, args.prunem)
    return "unstructured" if args.sparsity > 0 else None


def default_plot_layer(model) -> str:
    n = len(layerwalk.decoder_layers(model))
    return f"model.decoder.layers.{n // 2}.fc1"


@torch.no_grad()
def compress_sparsegpt(model, calib: torch.Tensor, args, dev: torch.device) -> CompressionResult:
    """SparseGPT (+ joint quantization, + MI plan) over all selected decoder linear layers."""
    res = CompressionResult()
    quantizing = args.wbits != 16
    use_plan = quantizing and args.groups != 0
    plot_layer = args.plot_layer or default_plot_layer(model)
    mi = MIOptions(args.mi_bins, args.mi_binning, args.mi_bias, args.mi_normalize, args.mi_estimator)
    if use_plan and args.groups != "all":
        narrow = sorted({m.out_features for i, layer in enumerate(layerwalk.decoder_layers(model))
                         for n, m in layerwalk.find_linears(layer, f"model.decoder.layers.{i}.").items()
                         if selected(args, i, n) and m.out_features < args.groups})
        if narrow:
            print(f"warning: --groups {args.groups} exceeds the {narrow[0]} channels of some layers; "
                  f"using K = channels where a layer has fewer", file=sys.stderr)
    inps, kwargs = layerwalk.capture_inputs(model, calib, dev)
    total_rows = calib.shape[0] * calib.shape[1]

    def visit(i: int, layer, inps: torch.Tensor) -> None:
        subset = {n: m for n, m in layerwalk.find_linears(layer, f"model.decoder.layers.{i}.").items()
                  if selected(args, i, n)}
        gpts = {n: SparseGPT(m, n) for n, m in subset.items()}
        if use_plan:
            for n, g in gpts.items():
                g.sample_outputs(total_rows, args.mi_samples, args.seed + zlib.crc32(n.encode()) % 2**31)
        hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: gpts[n].add_batch(inp[0].data, out.data))
                 for n, m in subset.items()]
        try:
            layerwalk.run_layer(layer, inps, kwargs)
        finally:
            for h in hooks:
                h.remove()
        for n, g in gpts.items():
            rows, cols = g.rows, g.columns
            plan = None
            if use_plan:
                k = args.groups if args.groups == "all" else min(args.groups, rows)
                acts = g.sampler.samples() if g.sampler is not None else None
                plan = plan_layer(n, g.layer.weight.data.float(), g.H, acts, groups=k, cluster=args.cluster,
                                  strategy=args.strategy, bit_alloc=args.bit_alloc, wbits=args.wbits,
                                  choices=args.bits_choices, mi=mi, alpha=args.mi_alpha,
                                  seed=args.seed, sym=args.sym, groupsize=args.groupsize)
                g.quantizer = plan.quantizer(sym=args.sym)
                for key in ("mi_s", "cluster_s", "alloc_s"):
                    res.timing[key] += plan.timing[key]
            elif quantizing:
                g.quantizer = Quantizer()
                g.quantizer.configure(int(args.wbits), perchannel=True, sym=args.sym)
            t = time.time()
            g.fasterprune(args.sparsity, prunen=args.prunen, prunem=args.prunem, blocksize=args.blocksize,
                          percdamp=args.percdamp, groupsize=args.groupsize)
            prune_s = time.time() - t
            res.timing["prune_s"] += prune_s
            _record(res, args, n, rows, cols, g, plan, prune_s)
            if plan is not None and n == plot_layer:
                res.plot = (n, plan)
            g.free()

    layerwalk.walk(model, inps, kwargs, dev, visit=visit, desc="compress")
    return res


def _record(res: CompressionResult, args, name, rows, cols, g: SparseGPT | None, plan: LayerPlan | None,
            prune_s: float) -> None:
    quantizing = args.wbits != 16
    if plan is not None:
        row_bits = plan.row_bits.tolist()
        ngroups = int(plan.group_bits.numel())
    else:
        row_bits = [int(args.wbits)] * rows if quantizing else None
        ngroups = None
    if not quantizing:
        n_sets = 0
    elif g is not None:
        n_sets = g.n_param_sets  # counted by the quantizer as SparseGPT used it
    else:  # round-to-nearest per row, once per --groupsize block
        n_sets = rows * (math.ceil(cols / args.groupsize) if args.groupsize > 0 else 1)
    res.bits.append(bitstats.layer_bits(rows, cols, row_bits, n_sets, ngroups, len(args.bits_choices),
                                        _mask_kind(args)))
    rec = {"name": name, "channels": rows, "in_features": cols, "groups": ngroups,
           "timing": {"mi_s": 0.0, "cluster_s": 0.0, "alloc_s": 0.0, "prune_s": prune_s}}
    if g is not None and g.percdamp_used is not None and g.percdamp_used != args.percdamp:
        rec["percdamp_used"] = g.percdamp_used
    if plan is not None:
        labels = plan.labels.tolist()
        sizes = torch.bincount(plan.labels, minlength=ngroups).tolist()
        rec.update({"labels": labels, "group_sizes": sizes, "group_bits": plan.group_bits.tolist(),
                    "nmi_intra": plan.nmi_intra, "nmi_inter": plan.nmi_inter})
        rec["timing"].update({k: plan.timing[k] for k in ("mi_s", "cluster_s", "alloc_s")})
    res.layers.append(rec)


@torch.no_grad()
def compress_magnitude(model, args) -> CompressionResult:
    """The --gmp baseline: magnitude pruning per layer, then round-to-nearest per-channel quantization."""
    res = CompressionResult()
    for i, layer in enumerate(layerwalk.decoder_layers(model)):
        for n, m in layerwalk.find_linears(layer, f"model.decoder.layers.{i}.").items():
            if not selected(args, i, n):
                continue
            t = time.time()
            W = m.weight.data
            W[magnitude_prune(W.float(), args.sparsity, args.prunen, args.prunem)] = 0
            if args.wbits != 16:
                W.copy_(rtn(W.float(), int(args.wbits), sym=args.sym, groupsize=args.groupsize).to(W.dtype))
            dt = time.time() - t
            res.timing["prune_s"] += dt
            _record(res, args, n, W.shape[0], W.shape[1], None, None, dt)
    return res


def measured_sparsity(model, names: list[str]) -> float:
    """Fraction of exactly-zero weights over the named linear layers (all decoder linears if none named)."""
    mods = dict(model.named_modules())
    if not names:
        names = [n for n, m in mods.items() if isinstance(m, torch.nn.Linear) and ".decoder.layers." in n]
    zeros = sum(int((mods[n].weight.data == 0).sum()) for n in names)
    total = sum(mods[n].weight.numel() for n in names)
    return zeros / max(total, 1)


# ----------------------------------------------------------------------------------------------------------
# output


def write_json_atomic(path: str, obj) -> None:
    atomic.write_text(path, json.dumps(obj, indent=1, allow_nan=False))


def save_model(model, tokenizer, res: CompressionResult, args, out: str) -> None:
    """save_pretrained (safetensors) + tokenizer + quantization.json, built beside ``out`` then moved in."""
    out = os.path.abspath(out)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    qinfo = {"wbits": args.wbits, "strategy": args.strategy, "groupsize": args.groupsize,
             "layers": {r["name"]: {"labels": r.get("labels"), "group_bits": r.get("group_bits"),
                                    "bits": None if args.wbits == 16 else (
                                        None if "group_bits" in r else int(args.wbits))}
                        for r in res.layers}}
    write_json_atomic(os.path.join(tmp, "quantization.json"), qinfo)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)


def code_version() -> str:
    """Hash of the toolkit's own .py files: results from different code must not mix silently in a sweep."""
    import hashlib

    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha1()
    for f in sorted(os.listdir(here)):
        if f.endswith(".py"):
            with open(os.path.join(here, f), "rb") as fh:
                h.update(f.encode() + b"\0" + fh.read())
    return h.hexdigest()[:12]


def env_info(dev: torch.device) -> dict:
    import transformers

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"torch": torch.__version__, "transformers": transformers.__version__, "device": str(dev),
            "device_name": name, "python": platform.python_version(), "machine": platform.machine(),
            "code_version": code_version()}


def summary(out: dict) -> str:
    b, t = out["bits"], out["timing"]
    ppl = " | ".join(f"{k} {v:.3f}" for k, v in out["ppl"].items())
    lines = [
        f"method    {out['method']}",
        f"ppl       {ppl}",
        f"sparsity  {out['sparsity']:.4f}",
        f"bits      {b['avg_weight_bits']:.3f} avg weight + {b['metadata_bpw']:.4f} metadata = {b['bpw']:.3f} bpw"
        f" (mask {b['mask_bpw']:.3f} bpw apart; embeddings, lm_head fp16)",
        f"time      calibration {t['calibration_s']:.1f}s, compress {t['compress_s']:.1f}s "
        f"(MI {t['mi_s']:.1f}s, cluster {t['cluster_s']:.1f}s, alloc {t['alloc_s']:.1f}s, "
        f"prune {t['prune_s']:.1f}s), eval {t['eval_s']:.1f}s, total {t['total_s']:.1f}s",
    ]
    return "\n".join(lines)


def draw(res: CompressionResult, args, total_rows: int) -> list[str]:
    if not args.analysis_dir or res.plot is None:
        return []
    import plots

    name, plan = res.plot
    os.makedirs(args.analysis_dir, exist_ok=True)
    paths = []
    if plan.nmi is not None:
        title = (f"{name}: NMI, K={int(plan.group_bits.numel())} {args.cluster} groups, "
                 f"{args.mi_estimator} estimator, {min(args.mi_samples, total_rows)} samples")
        paths.append(plots.plot_nmi_heatmap(plan.nmi, plan.labels, os.path.join(args.analysis_dir, "mi_matrix.png"),
                                            title=title))
    rec = next(r for r in res.layers if r["name"] == name)
    paths.append(plots.plot_grouping_result(rec["group_sizes"], rec["group_bits"], rec["nmi_intra"], rec["nmi_inter"],
                                            os.path.join(args.analysis_dir, "grouping_result.png"),
                                            title=f"{name}: {args.strategy} strategy, {args.bit_alloc} allocation"))
    return paths


def run(args) -> dict:
    t0 = time.time()
    torch.manual_seed(args.seed)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path, tokenizer = load_config_and_tokenizer(args)
    label, family = method_label(args)

    t = time.time()
    calib = datautils.get_calibration(args.dataset, args.nsamples, args.seed, args.seqlen, tokenizer)
    calib = torch.cat([inp for inp, _ in calib], dim=0)
    calibration_s = time.time() - t
    t = time.time()
    eval_tokens = {name: datautils.get_eval_tokens(name, args.seqlen, tokenizer) for name in _eval_names(args)}
    eval_load_s = time.time() - t
    model = load_model(args, path, dev)

    t = time.time()
    res = CompressionResult()
    if args.gmp and (args.sparsity > 0 or args.prunen or args.wbits != 16):
        res = compress_magnitude(model, args)
    elif args.sparsity > 0 or args.prunen or args.wbits != 16:
        res = compress_sparsegpt(model, calib, args, dev)
    compress_s = time.time() - t

    t = time.time()
    ppl = {}
    for name, tokens in eval_tokens.items():
        ppl[name] = layerwalk.perplexity(model, tokens, args.seqlen, dev, desc=f"eval {name}", batch=args.eval_batch)
        if not math.isfinite(ppl[name]):
            print(f"warning: perplexity on {name} is not finite", file=sys.stderr)
    eval_s = time.time() - t + eval_load_s

    if args.save:
        save_model(model, tokenizer, res, args, args.save)
    figures = draw(res, args, calib.numel())
    names = [r["name"] for r in res.layers]
    config = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    config["model_path"] = path
    out = {
        "config": config,
        "method": label,
        "family": family,
        "ppl": {k: (v if math.isfinite(v) else None) for k, v in ppl.items()},
        "sparsity": measured_sparsity(model, names),
        "bits": bitstats.summarize(res.bits),
        "timing": {"calibration_s": calibration_s, "compress_s": compress_s, "eval_s": eval_s,
                   **res.timing, "total_s": time.time() - t0},
        "env": env_info(dev),
        "figures": figures,
        "layers": res.layers,
    }
    if args.json:
        write_json_atomic(args.json, out)
    print(summary({**out, "ppl": ppl}))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (UserError, datautils.DataError, PlanError, LayerInputError) as e:
        sys.stderr.write(f"opt_mi.py: error: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
