"""``--search``: each compressed decoder linear its own level (mask, width, grid) under ``--target-bpw``.

``search`` builds (or reuses) the level database from the dense model (``build.py``, ``levels.py``), solves the knapsack
of summed per-linear losses under the budget (``budget.py``), and for ``--search evo`` starts the evolution
of the stitched model's KL from that answer, on calibration windows held apart from the database's
(``miq.search.evo``, ``miq.search.fitness``). The run then compresses the model the usual way, layer by
layer from the compressed model's own inputs, each linear at its chosen level (``compress.compress`` with
the ``Recipe``), and ``finish`` checks that every linear stored exactly the bits the database charged it (a
level's bits follow from its settings and shape, not from its inputs), records each layer's level and
returns the JSON's ``search`` block.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from miq.options import Level, Recipe
from miq.run import compress
from miq.run.compress import CompressionResult
from miq.run.config import RunConfig
from miq.search import build, evo, fitness, levels
from miq.search.budget import Budget, knapsack
from miq.search.levels import LevelDB

UNIFORM_STARTS = 4  # uniform configurations the evolution's start is compared with


@dataclass
class Searched:
    """A search's answer: the database, the budget, each linear's level index, and the JSON record so far."""

    db: LevelDB
    budget: Budget
    choice: list[int]
    record: dict = field(default_factory=dict)

    @property
    def recipe(self) -> Recipe:
        """Each linear at its chosen level (no linear falls back on the default: the database holds them all)."""
        return Recipe.per_linear(Level(), {n: self.db.levels[j] for n, j in zip(self.db.names, self.choice,
                                                                                  strict=True)})

    def stored_bits(self) -> int:
        return sum(self.db.bits[i][j] for i, j in enumerate(self.choice))


def database(model, calib: torch.Tensor, cfg: RunConfig, dev: torch.device, model_path: str) -> LevelDB:
    """The level database of this model, calibration, seed, levels and pass flags: from the cache, or built."""
    folder = build.folder_for(cfg, model_path, dev)
    return levels.load(folder) or build.build(model, calib, cfg, dev, folder)


def search(model, calib: torch.Tensor, heldout: torch.Tensor, cfg: RunConfig, dev: torch.device,
           model_path: str) -> Searched:
    """Each linear's level for ``cfg.target_bpw``: the knapsack's, then (evo) the evolution's from there.
    ``calib`` builds the database; ``heldout`` [k, seqlen] (evo only) are the fitness's windows."""
    t = time.time()
    db = database(model, calib, cfg, dev, model_path)
    db_s = time.time() - t
    budget = Budget.of(cfg.target_bpw, compress.decoder_linear_weights(model), sum(db.numel))
    t = time.time()
    choice = knapsack(db.loss, db.bits, budget.bits)
    objective = sum(db.loss[i][j] for i, j in enumerate(choice))
    out = Searched(db, budget, choice)
    record = {"method": cfg.search, "budget_bpw": cfg.target_bpw, "budget_bits": budget.bits,
              "knapsack": {"loss": objective, "bpw": budget.bpw(out.stored_bits())}, "trace": [objective]}
    if cfg.search == "evo":
        stitched = fitness.StitchedKL(model, heldout, db, dev)
        start, record["start"] = _start(db, budget.bits, choice, stitched, int(heldout.shape[0]))
        opts = evo.EvoOptions(generations=cfg.search_generations, seed=cfg.seed)
        result = evo.evolve(db.bits, budget.bits, stitched, start, opts, stitched.n_windows, on_parent=stitched.anchor)
        out.choice = [int(j) for j in result.best]
        record.update(trace=[float(x) if isinstance(x, int | float) else x for x in result.trace],
                      kl=float(result.fitness), windows=int(heldout.shape[0]))
    if out.stored_bits() > budget.bits:
        raise AssertionError(f"the {cfg.search} search returned {out.stored_bits()} bits, over the budget of "
                             f"{budget.bits}")
    record.update(search_s=time.time() - t, db_s=db_s, db_reused=db.reused, db_size_bytes=db.size_bytes(),
                  cache=db.folder, levels_tried=len(db.levels))
    out.record = record
    return out


def _start(db: LevelDB, budget_bits: int, choice: list[int], stitched, windows: int) -> tuple[list[int], dict]:
    """The evolution's start: the knapsack's levels, or a uniform configuration (every linear at one level)
    within the budget where its KL on all the windows is lower; the uniform ones tried are the
    ``UNIFORM_STARTS`` dearest that fit (the best uniform models at <= the budget are among them). So an
    evolution that keeps its best ends no worse than those (the acceptance's "it is in the search space")."""
    totals = sorted((sum(b[j] for b in db.bits), j) for j in range(len(db.levels)))
    fits = [j for total, j in totals if total <= budget_bits][-UNIFORM_STARTS:]
    tried = [("knapsack", choice)] + [(db.levels[j].label(), [j] * len(db.names)) for j in fits]
    scored = [(float(stitched(c, windows)), name, c) for name, c in tried]
    kl, name, best = min(scored, key=lambda x: x[0])  # the knapsack's first: it wins ties
    return best, {"from": name, "kl": kl, "tried": {n: k for k, n, _ in scored}}


def finish(res: CompressionResult, found: Searched) -> dict:
    """The JSON ``search`` block, once the final model is compressed; every layer record gets its level.
    AssertionError when a linear stored other bits than the database charged its level (the budget would
    no longer hold)."""
    index = {n: i for i, n in enumerate(found.db.names)}
    if sorted(r.name for r in res.layers) != sorted(found.db.names):  # --true-sequential: another order
        raise AssertionError("the final run compressed other linears than the level database holds")
    for k, (rec, bits) in enumerate(zip(res.layers, res.bits, strict=True)):
        i = index[rec.name]
        level = found.db.levels[found.choice[i]]
        stored = bits.code_bits + bits.metadata_bits + bits.mask_bits
        if stored != found.db.bits[i][found.choice[i]]:
            raise AssertionError(f"{rec.name} at {level.label()} stored {stored} bits, the database charged "
                                 f"{found.db.bits[i][found.choice[i]]}")
        res.layers[k] = dataclasses.replace(rec, level={"label": level.label(), **dataclasses.asdict(level)})
    levels_by_name = {n: found.db.levels[j].label() for n, j in zip(found.db.names, found.choice, strict=True)}
    return {**found.record, "bpw": found.budget.bpw(found.stored_bits()), "levels": levels_by_name}


def summary_line(rec: dict) -> str:
    """The run summary's line on the search: what it chose, how often each level, and what it took."""
    counts: dict[str, int] = {}
    for label in rec["levels"].values():
        counts[label] = counts.get(label, 0) + 1
    chosen = ", ".join(f"{n} x {label}" for label, n in sorted(counts.items(), key=lambda x: -x[1]))
    kl = f", KL {rec['kl']:.4f} on {rec['windows']} held-out windows" if "kl" in rec else ""
    return (f"search    {rec['method']} at {rec['budget_bpw']:g} bpw: {chosen}{kl}; database {rec['db_s']:.1f}s "
            f"({'reused' if rec['db_reused'] else 'built'}, {rec['db_size_bytes'] / 2**20:.1f} MiB, {rec['cache']}), "
            f"search {rec['search_s']:.1f}s")
