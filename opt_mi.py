"""Compress an OPT model with SparseGPT and joint quantization, optionally with MI channel grouping.

    python opt_mi.py facebook/opt-125m c4 --sparsity 0.5 --wbits 4 --groups 50
    python opt_mi.py toy synthetic --sparsity 0.5 --wbits 4 --groups 8      # offline, about a minute

Flow as IST-DASLab/sparsegpt's opt.py: parse the flags into a RunConfig (config.py), load the tokenizer and
the data, then the model (models.py), compress it layer by layer (compress.py), evaluate perplexity with the
same layer walker (layerwalk.py), and write the outputs (outputs.py). ``python opt_mi.py -h`` lists the flags.
"""

from __future__ import annotations

import math
import sys
import time

import torch

import bitstats
import datautils
import layerwalk
import methods
import outputs
import saving
from compress import compress, decoder_linear_weights, mask_sparsity, zero_fraction
from config import ConfigError, RunConfig, parse
from mi_plan import PlanError
from models import ModelError, load_model, open_source
from sparsegpt_mi import LayerInputError

USER_ERRORS = (ConfigError, ModelError, datautils.DataError, PlanError, LayerInputError)


def run(cfg: RunConfig) -> dict:
    """One run end to end; returns the result dict that --json writes."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    dev = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    src, tokenizer = open_source(cfg.model, cfg.trust_remote_code)
    cfg = cfg.with_seqlen(src.positions)
    label, family = methods.label(cfg)

    t = time.time()
    calib = datautils.get_calibration(cfg.dataset, cfg.nsamples, cfg.seed, cfg.seqlen, tokenizer)
    calib = torch.cat([inp for inp, _ in calib], dim=0)
    calibration_s = time.time() - t
    t = time.time()
    eval_tokens = {name: datautils.get_eval_tokens(name, cfg.seqlen, tokenizer) for name in cfg.eval_names()}
    eval_load_s = time.time() - t
    model = load_model(src, cfg.dtype, dev)

    t = time.time()
    res = compress(model, calib, cfg, dev)
    compress_s = time.time() - t

    t = time.time()
    ppl = {}
    for name, tokens in eval_tokens.items():
        ppl[name] = layerwalk.perplexity(model, tokens, cfg.seqlen, dev, desc=f"eval {name}", batch=cfg.eval_batch)
        if not math.isfinite(ppl[name]):
            print(f"warning: perplexity on {name} is not finite", file=sys.stderr)
    eval_s = time.time() - t + eval_load_s

    disk = saving.save(model, tokenizer, res, cfg, cfg.save) if cfg.save else None
    figures = outputs.draw_figures(res, cfg, calib.numel())
    out = {
        "config": {**cfg.as_dict(), "model_path": src.path},
        "method": label,
        "family": family,
        "ppl": {k: (v if math.isfinite(v) else None) for k, v in ppl.items()},
        "sparsity": mask_sparsity(res),
        "zero_fraction": zero_fraction(model, [r["name"] for r in res.layers]),
        "bits": {**bitstats.summarize(res.bits, decoder_linear_weights(model)), **(disk or {})},
        "timing": {"calibration_s": calibration_s, "compress_s": compress_s, "eval_s": eval_s,
                   **res.timing, "total_s": time.time() - t0},
        "env": outputs.env_info(dev),
        "figures": figures,
        "layers": res.layers,
    }
    if cfg.json:
        outputs.write_json(cfg.json, out)
    print(summary({**out, "ppl": ppl}))
    return out


def summary(out: dict) -> str:
    """The few lines printed at the end of a run."""
    b, t = out["bits"], out["timing"]
    ppl = " | ".join(f"{k} {v:.3f}" for k, v in out["ppl"].items())
    return "\n".join([
        f"method    {out['method']}",
        f"ppl       {ppl}",
        f"sparsity  {out['sparsity']:.4f} removed by the masks ({out['zero_fraction']:.4f} exact zeros after "
        "quantization)",
        f"bits      {b['avg_weight_bits']:.3f} avg weight + {b['metadata_bpw']:.4f} metadata = {b['bpw']:.3f} bpw"
        f" over all decoder linears ({100 * b['compressed_fraction']:.0f}% compressed, at "
        f"{b['bpw_compressed']:.3f} bpw; mask {b['mask_bpw']:.3f} bpw apart; embeddings, lm_head fp16)",
        *([disk_line(b, out["config"])] if b.get("bytes_on_disk") is not None else []),
        f"time      calibration {t['calibration_s']:.1f}s, compress {t['compress_s']:.1f}s "
        f"(MI {t['mi_s']:.1f}s, cluster {t['cluster_s']:.1f}s, alloc {t['alloc_s']:.1f}s, "
        f"prune {t['prune_s']:.1f}s), eval {t['eval_s']:.1f}s, total {t['total_s']:.1f}s",
    ])


def disk_line(b: dict, config: dict) -> str:
    """What --save wrote for the compressed linears; for the packed format, beside what the bits accounting
    says it should be (compressed-tensors has its own layout: no mask, float32 scales, packed zero-points)."""
    line = (f"disk      {b['bytes_on_disk']} bytes for the compressed linears ({config['save_format']}, "
            f"{config['save']})")
    if b.get("bpw_on_disk") is None:
        return line
    line += f" = {b['bpw_on_disk']:.3f} bpw"
    if config["save_format"] != "packed":
        return line
    accounted = b["bpw_compressed"] + b["mask_bpw"] / max(b["compressed_fraction"], 1e-12)
    return f"{line}; accounted {accounted:.3f} (bpw_compressed + mask)"


def main(argv: list[str] | None = None) -> int:
    """Exit code: 0 done, 2 a user error (one line on stderr, no result written)."""
    try:
        run(parse(argv))
    except USER_ERRORS as e:
        sys.stderr.write(f"opt_mi.py: error: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
