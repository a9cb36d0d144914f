"""Compress an OPT or Llama-family model (Llama, Mistral, Qwen2, Qwen3) with SparseGPT and joint quantization,
optionally with MI channel grouping.

    python opt_mi.py facebook/opt-125m c4 --sparsity 0.5 --wbits 4 --groups 50
    python opt_mi.py Qwen/Qwen2.5-0.5B c4 --sparsity 0.5 --wbits 4 --true-sequential
    python opt_mi.py toy synthetic --sparsity 0.5 --wbits 4 --groups 8        # offline, about a minute
    python opt_mi.py toy-llama synthetic --sparsity 0.5 --wbits 4 --groups 8  # the same on a tiny Llama

Flow as IST-DASLab/sparsegpt's opt.py: parse the flags into a RunConfig (miq/run/config.py), check everything
that can be checked before any work (``prepare``: device, output paths, the model's config, tokenizer, weight
headers and structure: miq/run/preflight.py), load the data (datautils.py), then the model
(miq/model/loading.py), compress it layer by layer (miq/run/compress.py), evaluate perplexity with the same
layer walker (miq/model/layerwalk.py), and publish the outputs together (miq/run/outputs.py). A user error is
one line and exit 2, an interrupt one line and exit 130; neither leaves a file.
``python opt_mi.py -h`` lists the flags.
"""

from __future__ import annotations

import os
import signal
import sys

INTERRUPTED = 130  # the exit status of an interrupted run (Ctrl-C or SIGTERM), as a shell reports SIGINT


def _interrupted_early(signum, frame) -> None:
    """An interrupt while the imports below run (torch takes seconds): nothing is written yet, so just go."""
    os.write(2, b"opt_mi.py: interrupted\n")
    os._exit(INTERRUPTED)


if __name__ == "__main__":  # before the heavy imports, so that an early Ctrl-C is one line too
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, _interrupted_early)

import contextlib
import math
import threading
import time
from collections.abc import Iterator

import torch

import datautils
from miq import bitstats, methods
from miq.data_names import KNOWN
from miq.errors import USER_ERRORS, DataError, PublishError, first_line
from miq.model import layerwalk, loading, onload
from miq.model.loading import ModelSource, load_model, open_source
from miq.run import destinations, outputs, preflight, saving, task_plan, tasks
from miq.run.compress import compress, decoder_linear_weights, mask_sparsity, zero_fraction
from miq.run.config import RunConfig, parse
from miq.search import run as search
from miq.staging import Staging

OUT_OF_MEMORY = (MemoryError, torch.OutOfMemoryError)


def prepare(cfg: RunConfig) -> tuple[RunConfig, ModelSource, object, torch.device, task_plan.TaskPlan | None]:
    """Every check that needs neither data nor weights, cheapest first, before any work: the device, the
    output paths, the model's config and tokenizer, its weights' headers, the run against the model's
    structure (selection, n:m, plotted layer, memory), and --tasks against the harness (installed, every task
    known). Returns the resolved config, source, tokenizer, device and the tasks' plan (None without --tasks)."""
    dev = preflight.device(cfg)
    destinations.check_targets(cfg)
    src, tokenizer = open_source(cfg.model, cfg.trust_remote_code)
    cfg = cfg.with_seqlen(src.positions)
    skeleton = loading.skeleton(src)
    loading.check_weights(src, skeleton)
    cfg = preflight.check_model(cfg, skeleton, dev)
    return cfg, src, tokenizer, dev, task_plan.prepare(cfg)


@contextlib.contextmanager
def _naming(what: str) -> Iterator[None]:
    """A data error's line names the argument it came from (DATASET or --eval), as the flag checks do."""
    try:
        yield
    except DataError as e:
        raise DataError(f"{what}: {e}") from None


def calibration(cfg: RunConfig, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration windows [nsamples, seqlen] and the evolution's held-out ones [search_windows, seqlen].
    A run that uses none (``RunConfig.calibrating``: dense, a saved model evaluated, magnitude) neither
    tokenizes nor downloads a named corpus, while a local file is still read and checked, so that a bad DATASET
    is the same one line in every run."""
    if not cfg.calibrating and cfg.dataset in KNOWN:
        return torch.empty(0, cfg.seqlen, dtype=torch.long), torch.empty(0, cfg.seqlen, dtype=torch.long)
    held = cfg.search_windows if cfg.search == "evo" else 0  # the evolution's windows: the same draw, after
    with _naming("DATASET"):
        calib = datautils.get_calibration(cfg.dataset, cfg.nsamples + held, cfg.seed, cfg.seqlen, tokenizer)
    return torch.cat([inp for inp, _ in calib], dim=0).split([cfg.nsamples, held])


def run(cfg: RunConfig) -> dict:
    """One run end to end; returns the result dict that --json writes. Outputs are published together at the
    end (Staging): an error or an interrupt anywhere leaves none of them."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    onload.return_freed_memory()  # host memory a few layers deep, not a heap of what earlier layers freed
    cfg, src, tokenizer, dev, task_plan = prepare(cfg)
    model_s = time.time() - t0  # checks, tokenizer and (first use) building the toy
    label, family = methods.label(cfg)

    t = time.time()
    calib, heldout = calibration(cfg, tokenizer)
    calibration_s = time.time() - t
    t = time.time()
    with _naming("--eval"):
        eval_tokens = {name: datautils.get_eval_tokens(name, cfg.seqlen, tokenizer) for name in cfg.eval_names()}
    eval_load_s = time.time() - t
    t = time.time()
    model = load_model(src, cfg.dtype, dev, cfg.load)
    loading.check_finite(model, cfg.model)
    model_s += time.time() - t

    t = time.time()
    found = search.search(model, calib, heldout, cfg, dev, src.path) if cfg.search else None
    res = compress(model, calib, cfg, dev, saving.sink(model, cfg), found.recipe if found else None)
    searched = {"search": search.finish(res, found)} if found else {}
    compress_s = time.time() - t
    t = time.time()
    ppl = evaluate(model, eval_tokens, cfg, dev)
    eval_s = time.time() - t + eval_load_s
    t = time.time()
    task_results = tasks.evaluate(model, tokenizer, task_plan, cfg, dev) if task_plan else None

    timing = {"model_s": model_s, "calibration_s": calibration_s, "compress_s": compress_s, "eval_s": eval_s,
              **({"tasks_s": time.time() - t} if task_results else {})}
    try:
        with Staging() as stage:
            disk = saving.write(stage.folder(cfg.save, destinations.guard("--save", cfg.save, "replace")), model,
                                tokenizer, res, cfg) if cfg.save else None
            out = {
                "config": {**cfg.as_dict(), "model_path": src.path},
                "method": label,
                "family": family,
                "ppl": {k: (v if math.isfinite(v) else None) for k, v in ppl.items()},
                **({"tasks": task_results} if task_results else {}),  # present only with --tasks
                "sparsity": mask_sparsity(res),
                "zero_fraction": zero_fraction(model, [r.name for r in res.layers]),
                "bits": {**bitstats.summarize(res.bits, decoder_linear_weights(model)), **(disk or {})},
                "timing": {**timing, **res.timing, "total_s": time.time() - t0},
                "env": outputs.env_info(dev),
                "figures": outputs.draw_figures(res, cfg, calib.numel(), stage),
                **searched,  # --search only: the levels per linear, the budget, the trace, the database
                "layers": [r.to_json() for r in res.layers],
            }
            if cfg.json:
                outputs.write_json(stage.file(cfg.json, destinations.guard("--json", cfg.json, "file")), out)
    except saving.WRITE_ERRORS as e:  # at writing or publishing: Staging has removed whatever this run wrote
        raise PublishError(f"could not write the outputs ({saving.why(e)}); the run was done, nothing was "
                           "written") from None
    loading.release(model)  # the compressed layers' temporary files (--load layers), now written where asked
    print(summary({**out, "ppl": ppl}, str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")))
    for w in cfg.warnings:  # flags that changed nothing (also in the JSON's config block); said last, so that
        print(f"warning: {w}", file=sys.stderr)  # a failing run's one line stays one line
    return out


def evaluate(model, eval_tokens: dict[str, torch.Tensor], cfg: RunConfig, dev: torch.device) -> dict[str, float]:
    """Perplexity on every eval set, with the layer walker (a warning for a non-finite one)."""
    ppl = {}
    for name, tokens in eval_tokens.items():
        ppl[name] = layerwalk.perplexity(model, tokens, cfg.seqlen, dev, desc=f"eval {name}", batch=cfg.eval_batch)
        if not math.isfinite(ppl[name]):
            print(f"warning: perplexity on {name} is not finite", file=sys.stderr)
    return ppl


def summary(out: dict, dense_dtype: str) -> str:
    """The few lines printed at the end of a run; ``dense_dtype``: what the embeddings and head are kept in."""
    b, t = out["bits"], out["timing"]
    ppl = " | ".join(f"{k} {v:.3f}" for k, v in out["ppl"].items())
    return "\n".join([
        f"method    {out['method']}",
        f"ppl       {ppl}",
        *([tasks.summary_line(out["tasks"])] if out.get("tasks") else []),
        *([search.summary_line(out["search"])] if out.get("search") else []),
        f"sparsity  {out['sparsity']:.4f} removed by the masks ({out['zero_fraction']:.4f} exact zeros after "
        "quantization)",
        f"bits      {b['code_bpw']:.3f} codes + {b['metadata_bpw']:.4f} metadata + {b['mask_bpw']:.3f} mask = "
        f"{b['bpw']:.3f} bpw stored over all decoder linears ({100 * b['compressed_fraction']:.0f}% compressed, at "
        f"{b['bpw_compressed']:.3f} bpw; {b['bits_per_kept_weight']:.3f} bits per kept weight; embeddings, "
        f"lm_head {dense_dtype})",
        *([disk_line(b, out["config"])] if b.get("bytes_on_disk") is not None else []),
        f"time      model {t['model_s']:.1f}s, calibration {t['calibration_s']:.1f}s, compress {t['compress_s']:.1f}s "
        f"(MI {t['mi_s']:.1f}s, cluster {t['cluster_s']:.1f}s, alloc {t['alloc_s']:.1f}s, "
        f"prune {t['prune_s']:.1f}s), eval {t['eval_s']:.1f}s"
        + (f", tasks {t['tasks_s']:.1f}s" if "tasks_s" in t else "") + f", total {t['total_s']:.1f}s",
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
    return f"{line}; accounted {b['bpw_compressed']:.3f} (bpw_compressed)"


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised as Ctrl-C raises KeyboardInterrupt, so that both take the same way out."""


def _raise_interrupted(signum, frame) -> None:
    # the first signal starts the way out; a repeated one (a supervisor's second SIGTERM, Ctrl-C pressed twice)
    # must not break into the cleanup it started (staged outputs, the layers' temporary folder)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread while the run is on, so that every
    ``finally`` (staged outputs removed) runs; the previous handlers come back after (tests call main
    in-process, under pytest's own), unless an interrupt came: then both stay ignored, so that a repeated
    signal cannot cut short the way out (exit 130, the temporary folders removed at exit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            if signal.getsignal(sig) is not signal.SIG_IGN:
                signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """Exit code: 0 done; 2 a user error (one line on stderr, nothing written); 130 interrupted (Ctrl-C or
    SIGTERM: one line, nothing written)."""
    with interrupts_raise():
        try:
            run(parse(argv))
        except USER_ERRORS as e:
            sys.stderr.write(f"opt_mi.py: error: {e}\n")
            return 2
        except PublishError as e:
            sys.stderr.write(f"opt_mi.py: error: {e}\n")
            return 1
        except OUT_OF_MEMORY as e:
            sys.stderr.write(f"opt_mi.py: error: out of memory ({first_line(e)}); lower --nsamples, "
                             "--mi-samples or --eval-batch, or use a device with more memory\n")
            return 2
        except KeyboardInterrupt:
            sys.stderr.write("opt_mi.py: interrupted\n")
            return INTERRUPTED
    return 0


if __name__ == "__main__":
    code = main()
    for _sig in (signal.SIGINT, signal.SIGTERM):  # the run is over: a late signal must not cut short the exit's
        signal.signal(_sig, signal.SIG_IGN)  # cleanup (a --load layers run's temporary folder is removed then)
    sys.exit(code)
