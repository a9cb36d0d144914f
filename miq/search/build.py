"""Building the level database (``levels.LevelDB``) of a search, or finding it in the cache.

Each linear's Hessian comes from the *dense* model's inputs (the walk leaves every layer as loaded, so a
layer's inputs are the dense previous layer's outputs; --true-sequential changes only the final run), and
every level is compressed from it by the run's own pass (``compress._final_pass``, the code a uniform run
takes), one level after another, the layer's weights put back between them. So a level from the database
is bit for bit what compressing that linear alone at that level on the same inputs gives. Levels are
separate passes, not one stacked trial pass: a stacked pass takes its masks from one width's rows
(``trials.trial``), and a single-width SparseGPT pass chooses its mask on its own quantized rows, so
stacking would change the pruned levels (measured on the toy at 50%: fc2's stacked widths 2, 3 and 8 differ
from their own passes; the other linears and every dense level came out equal). Each level is charged
what the packed format stores for it (``packed_layer.stored_bits``), checked equal to what its settings
and shape predict (``budget.level_bits``), so that the budget is known before any work and the final run
stores what was charged.

One folder per database under ``--search-cache`` (``folder_for``: a hash of the model's files, calibration,
seed, levels, pass and selection flags, device kind, dtype and the code that computes levels), built in a
temporary folder and renamed into place, reused while the key matches. One linear's levels are in memory
at a time. Disk: about the sum of the levels' stored bits per weight (the default 50 levels on the dev
testbed's 2.65M decoder linear weights: 58.5 MiB, 23 bytes per weight; at that rate OPT-1.3B's 1.2e9: ~28 GB).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

import quant
import sparsegpt_mi
from miq.checkpoint import packed_layer
from miq.model import layerwalk, layouts, toy
from miq.options import Level
from miq.run import compress
from miq.run.config import RunConfig
from miq.run.search_flags import levels as search_levels
from miq.search import budget, levels
from miq.search.levels import INDEX, LevelDB, file_of

VERSION = 1


def cache_root(cfg: RunConfig) -> str:
    return cfg.search_cache or os.path.join(str(toy.cache_root()), "search")


def _model_id(model_path: str) -> list:
    """The model's files by name, size and modification time (a local folder), or its hub id."""
    if not os.path.isdir(model_path):
        return [model_path]
    files = sorted(f for f in os.listdir(model_path) if f.endswith((".safetensors", ".bin", ".json")))
    return [os.path.abspath(model_path)] + [(f, os.path.getsize(os.path.join(model_path, f)),
                                             os.path.getmtime(os.path.join(model_path, f))) for f in files]


def key(cfg: RunConfig, model_path: str, dev: torch.device) -> str:
    """What a database depends on: model, calibration, seed, levels, pass and selection flags, the device kind
    (CPU and GPU round differently), the dtype and the code."""
    what = {"model": _model_id(model_path), "data": [cfg.dataset, cfg.nsamples, cfg.seqlen, cfg.seed],
            "levels": [dataclasses.astuple(lv) for lv in search_levels(cfg)],
            "pass": [cfg.percdamp, cfg.blocksize, cfg.sym, cfg.act_order, cfg.dtype, dev.type],
            "select": [cfg.minlayer, cfg.maxlayer, cfg.prune_only, cfg.invert], "code": _code(),
            "version": VERSION}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]


def folder_for(cfg: RunConfig, model_path: str, dev: torch.device) -> str:
    return os.path.join(cache_root(cfg), key(cfg, model_path, dev))


def build(model, calib: torch.Tensor, cfg: RunConfig, dev: torch.device, folder: str) -> LevelDB:
    """The database of ``model`` (dense) on ``calib`` [n, seqlen], built into a temporary folder beside
    ``folder`` and renamed into place; the one already there if another build got there first."""
    t0 = time.time()
    grid = list(search_levels(cfg))
    os.makedirs(os.path.dirname(folder) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".building-", dir=os.path.dirname(folder) or ".")
    try:
        db = LevelDB([], grid, [], [], [], tmp)
        _walk(model, calib, cfg, dev, lambda name, g: _linear(db, name, g, cfg))
        with open(os.path.join(tmp, INDEX), "w", encoding="utf-8") as f:
            json.dump({"names": db.names, "levels": [dataclasses.asdict(lv) for lv in grid], "bits": db.bits,
                       "loss": db.loss, "numel": db.numel}, f)
        try:
            os.rename(tmp, folder)
        except OSError:  # built meanwhile by another run with the same key: theirs is as good
            if levels.load(folder) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dataclasses.replace(db, folder=folder, build_s=time.time() - t0)


def _walk(model, calib: torch.Tensor, cfg: RunConfig, dev: torch.device, each: Callable) -> None:
    """Every selected linear's Hessian from the dense model's inputs, handed to ``each(name, gpt)``; the layers
    are left as loaded (the visit says it changed nothing), so the next layer's inputs are dense too."""
    layout = layouts.of(model)
    inps, layer_kwargs = layerwalk.capture_inputs(model, calib, dev)

    def visit(i: int, layer, inps: torch.Tensor) -> bool:
        chosen = compress.selected_linears(cfg, layout, i, layer)
        if chosen:
            for name, g in compress._accumulate(cfg, chosen, layer, inps, layer_kwargs[i], calib.numel()).items():
                each(name, g)
                g.free()
        return False

    layerwalk.walk(model, inps, layer_kwargs, dev, visit=visit, desc="level database")


def _linear(db: LevelDB, name: str, g, cfg: RunConfig) -> None:
    """Every level of one linear: the run's own pass at that level, then the weights put back as loaded."""
    linear = len(db.names)
    original = g.layer.weight.data.clone()
    bits, losses, entries, tensors = [], [], [], {}
    for j, level in enumerate(db.levels):
        lcfg = cfg.at(level)
        compress._final_pass(g, lcfg, compress.RunOptions.of(lcfg), None)
        W0, Hd = g.prepare(lcfg.percdamp)
        losses.append(float(sparsegpt_mi.layer_error(W0, g.result.W, Hd).sum()))
        stored = compress._stored(str(j), g.result, g.perm, lcfg, None)
        bits.append(_bits(stored, level, cfg, name))
        entry, t = packed_layer.encode(stored, torch.float32, level.nm)
        entries.append(entry)
        tensors.update(t)
        g.layer.weight.data.copy_(original)
    save_file(tensors, os.path.join(db.folder, file_of(linear)))
    with open(os.path.join(db.folder, file_of(linear) + ".json"), "w", encoding="utf-8") as f:
        json.dump(entries, f)
    db.names.append(name)
    db.bits.append(bits)
    db.loss.append(losses)
    db.numel.append(g.rows * g.columns)


def _bits(stored, level: Level, cfg: RunConfig, name: str) -> int:
    """The level's stored bits by the packed format's rules, checked against what its settings predict."""
    total = sum(packed_layer.stored_bits(stored, level.nm))
    rows, cols = stored.weight.shape
    predicted = budget.level_bits(rows, cols, level, cfg)
    if total != predicted:
        raise AssertionError(f"{name} at {level.label()}: stores {total} bits, its settings predict {predicted}")
    return int(total)


def _code() -> str:
    """The code a level's weights and bits come from (the pass, the quantizer, the walk, the packed rules), as
    syntax trees without docstrings: comments and docs do not invalidate a database of many gigabytes."""
    h = hashlib.sha1()
    for path in [m.__file__ for m in (sparsegpt_mi, quant, compress, packed_layer, budget, levels)] + [__file__]:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                    isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        h.update(ast.dump(tree).encode())
    return h.hexdigest()[:12]
