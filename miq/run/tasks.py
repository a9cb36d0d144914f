"""Accuracy on zero-shot (or few-shot) tasks through lm-evaluation-harness, beside perplexity (``--tasks``).

The harness (PyPI ``lm-eval``, 0.4.x) runs on the model in memory, the compressed one or a saved folder read
back, through its ``HFLM`` wrapper and ``simple_evaluate``, so the numbers are the harness's own (those its
``lm_eval`` command prints for the same weights), not a re-implementation. ``task_plan.prepare`` checks
everything that needs no model before any work; ``evaluate`` runs the tasks; ``record`` is what the result JSON
keeps under ``tasks``. The harness is imported inside the functions (see ``task_plan``).

Task datasets: a harness task name downloads its dataset on first use (the Hugging Face hub) and reads the
cache after; where the hub does not answer, the run reads the cache only (``loading.offline_mode``), as model
and dataset loading do. Tasks given as YAML files whose data are local files need no network, and the run
does not probe for one.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch

from miq.errors import DataError, first_line
from miq.model import loading, onload
from miq.options import fmt_fixed
from miq.run.config import RunConfig
from miq.run.task_plan import TaskPlan, harness, quiet

METRICS = ("acc", "acc_norm")  # kept under their own names (with their stderr) where a task reports them


def _hub(p: TaskPlan):
    """The hub switched off for tasks over local files (no probe: nothing to reach), and where it does not
    answer (the datasets' cache only); otherwise datasets download on first use."""
    return loading.offline_mode() if p.local or loading.hub_probe() else contextlib.nullcontext()


def evaluate(model, tokenizer, p: TaskPlan, cfg: RunConfig, dev: torch.device) -> dict:
    """Run the plan's tasks on ``model`` (moved to ``dev`` for it, and back to the CPU after, where the rest of
    the run keeps it; loaded layer by layer, one decoder layer at a time: ``onload.streamed``); returns
    ``record``'s block. A task the harness cannot run (its dataset not downloadable, a broken task file) is a
    DataError naming it."""
    lm_eval = harness()
    from lm_eval.models.huggingface import HFLM

    try:  # a model loaded layer by layer holds one decoder layer at a time, read as each forward reaches it
        with quiet(), _hub(p), onload.streamed(model, dev):
            # a copy: the harness gives a tokenizer without a pad token one, and --save writes the run's own
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=cfg.tasks_batch)
            out = lm_eval.simple_evaluate(model=lm, tasks=list(p.names), num_fewshot=cfg.tasks_fewshot,
                                          limit=cfg.tasks_limit, task_manager=p.manager, log_samples=False)
    except (OSError, ValueError, KeyError) as e:  # datasets (download, offline, parsing), task files; out of
        # memory is no such error (a MemoryError or a RuntimeError): opt_mi.main says what to lower
        where = "cached datasets only (the hub does not answer); " if not p.local and loading.hub_probe() else ""
        raise DataError(f"--tasks {','.join(p.sources)}: the harness could not run them ({where}"
                        f"{first_line(e)})") from None
    return record(out, p, cfg)


def _number(v) -> float | None:
    """A metric as JSON keeps it: a finite float, else None (the harness writes "N/A" for a missing stderr)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _metric(result: dict, metric: str) -> str | None:
    """The harness's key of ``metric`` ("acc,none": metric, filter), the unfiltered one first."""
    keys = [k for k in result if k.split(",")[0] == metric and "," in k]
    return f"{metric},none" if f"{metric},none" in keys else (keys[0] if keys else None)


def task_entry(result: dict, source: str, version, n_shot, samples) -> dict:
    """One task's record: acc and acc_norm with their stderr where present, every other numeric metric as the
    harness keys it ("word_perplexity,none"), the task's version, its examples per prompt, documents evaluated."""
    entry = {"source": source, "version": version, "n_shot": n_shot, "samples": samples}
    named = set()
    for m in METRICS:
        key = _metric(result, m)
        if key is not None:
            err = key.replace(m, f"{m}_stderr", 1)
            entry[m], entry[f"{m}_stderr"] = _number(result[key]), _number(result.get(err))
            named |= {key, err}
    entry["metrics"] = {k: _number(v) for k, v in result.items()
                        if "," in k and k not in named and _number(v) is not None}  # the others (perplexity ...)
    return entry


def record(out: dict, p: TaskPlan, cfg: RunConfig) -> dict:
    """The JSON's ``tasks`` block from ``simple_evaluate``'s output: one entry per task given (a group's is its
    aggregate as the harness reports it), with the settings that make the numbers comparable."""
    results = {}
    for name, source in zip(p.names, p.sources, strict=True):
        r = out.get("results", {}).get(name) or out.get("groups", {}).get(name) or {}
        samples = (out.get("n-samples", {}).get(name) or {}).get("effective")
        results[name] = task_entry(r, source, out.get("versions", {}).get(name), out.get("n-shot", {}).get(name),
                                   samples)
    return {"harness": "lm-eval", "harness_version": p.version, "fewshot": cfg.tasks_fewshot,
            "limit": cfg.tasks_limit, "batch": cfg.tasks_batch, "results": results}


def summary_line(block: dict) -> str:
    """The summary's line: accuracy +- stderr per task (acc_norm too where reported), then the settings."""
    parts = []
    for name, e in block["results"].items():
        acc = f"acc {fmt_fixed(e.get('acc'))} +- {fmt_fixed(e.get('acc_stderr'))}" if "acc" in e else "no acc"
        norm = f", acc_norm {fmt_fixed(e['acc_norm'])}" if "acc_norm" in e else ""
        parts.append(f"{name} {acc}{norm}")
    shots = sorted({str(e.get("n_shot")) for e in block["results"].values()})
    limit = f", first {block['limit']} documents" if block.get("limit") else ""
    return (f"tasks     {' | '.join(parts)} ({'/'.join(shots)}-shot{limit}; lm-eval {block['harness_version']})")
