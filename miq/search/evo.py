"""Evolutionary search over per-linear levels under a budget of stored bits (EvoPress's scheme, torch-free).

A configuration gives each compressed linear one level (an index into its row of ``bits``); its cost is the
sum of the chosen levels' exact stored bits, and it is feasible when that sum is at most the budget. The
search keeps one parent and, each generation:

1. draws ``offspring`` distinct mutants of it. A mutation switches one to ``flips`` linears (biased towards
   one) by up to ``step`` places, up or down, in that linear's levels *sorted by bits*: the levels are 2-D
   (sparsity x width x group size), so a level's index says nothing about its cost, and sorting by bits makes
   "one place up" the next dearer option whatever its kind. If the mutant is over budget, other linears move
   down one place at a time (random ones, never those just switched) until it fits, so every mutant is
   feasible by construction; one whose repair changed more than ``max_changes`` linears is drawn again.
   Moves go both ways, so a cheaper *and* better level (the levels are not monotone in quality either) is
   reachable, and with ``flips`` as large as the number of linears every feasible configuration is one
   mutation away (the brute-force tests rely on it).
2. selects in steps: all mutants are scored on few windows, the best ``survivors[0]`` of them on more, and so
   on; the last step scores on every window and includes the parent, whose fitness is known, so the parent
   survives unless a mutant is at least as good (ties go to the mutant, letting the search drift on
   plateaus) and the best fitness never gets worse from one generation to the next.

Fitness values are memoised per (configuration, windows), so the parent is never scored twice. The search is
seeded (``random.Random(seed)``, nothing global): the same inputs give the same result.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

from tqdm import tqdm

Config = tuple[int, ...]
Fitness = Callable[[Config, int], float]  # (configuration, number of windows) -> lower is better


@dataclass(frozen=True)
class EvoOptions:
    """The search's settings.

    generations: parent updates. offspring: mutants drawn per generation. survivors[s]: how many candidates
    step s of the selection keeps (the last must be 1). fractions[s]: the share of the windows step s scores
    on, non-decreasing, the last 1.0 (so the winner is chosen on every window). flips: most level switches one
    mutation makes before the budget repair (the count is the smaller of two uniform draws in 1..flips, so one
    switch is the most likely). step: most places (in bits order) one switch moves. max_changes: a mutant
    whose repair changed more linears than this is redrawn (EvoPress: 10). seed: the generator's seed.
    """

    generations: int
    offspring: int = 16
    survivors: tuple[int, ...] = (4, 1)
    fractions: tuple[float, ...] = (0.25, 1.0)
    flips: int = 3
    step: int = 2
    max_changes: int = 12
    seed: int = 0

    def __post_init__(self) -> None:
        if self.generations < 0 or self.offspring < 1 or self.flips < 1 or self.step < 1 or self.max_changes < 1:
            raise ValueError(f"EvoOptions: generations >= 0 and offspring, flips, step, max_changes >= 1 "
                             f"(got {self.generations}, {self.offspring}, {self.flips}, {self.step}, "
                             f"{self.max_changes})")
        if not self.survivors or len(self.survivors) != len(self.fractions):
            raise ValueError(f"EvoOptions: survivors {self.survivors} and fractions {self.fractions} need one "
                             "entry per selection step each")
        if self.survivors[-1] != 1 or any(a < b for a, b in pairwise(self.survivors)) \
                or self.survivors[0] < 1:
            raise ValueError(f"EvoOptions: survivors {self.survivors} must be non-increasing and end in 1")
        if not all(0 < f <= 1 for f in self.fractions) or self.fractions[-1] != 1 \
                or any(a > b for a, b in pairwise(self.fractions)):
            raise ValueError(f"EvoOptions: fractions {self.fractions} must grow within (0, 1] and end in 1")

    def window_counts(self, n_windows: int) -> tuple[int, ...]:
        """Windows per selection step: ceil(fraction * n_windows), at least one."""
        return tuple(max(1, math.ceil(f * n_windows)) for f in self.fractions)


@dataclass
class EvoResult:
    """best: the level of each linear; fitness: its fitness on every window; trace: one dict per generation,
    the start first (generation 0): the best's fitness and bits, the fitness calls made, the seconds taken."""

    best: Config
    fitness: float
    trace: list[dict] = field(default_factory=list)


class Space:
    """The feasible configurations: each linear's levels in bits order, and the budget-keeping mutation."""

    def __init__(self, bits: Sequence[Sequence[int]], budget: int):
        self.bits = [[int(b) for b in row] for row in bits]
        self.budget = budget
        # order[i][r]: linear i's level at place r, cheapest first (ties by level index)
        self.order = [sorted(range(len(row)), key=lambda lv, row=row: (row[lv], lv)) for row in self.bits]
        self.place = [{lv: r for r, lv in enumerate(o)} for o in self.order]
        self.movable = [i for i, o in enumerate(self.order) if len(o) > 1]

    def cost(self, config: Config) -> int:
        return sum(self.bits[i][lv] for i, lv in enumerate(config))

    def check_start(self, start: Sequence[int]) -> Config:
        if len(start) != len(self.bits):
            raise ValueError(f"start has {len(start)} levels for {len(self.bits)} linears")
        for i, lv in enumerate(start):
            if lv not in self.place[i]:
                raise ValueError(f"start: linear {i} at level {lv}, which is not one of its levels")
        start = tuple(int(lv) for lv in start)
        if self.cost(start) > self.budget:
            raise ValueError(f"start costs {self.cost(start)} bits, over the budget of {self.budget}")
        return start

    def mutate(self, parent: Config, rng: random.Random, opts: EvoOptions) -> Config | None:
        """A feasible mutant of ``parent`` (see the module docstring), or None when this draw found none."""
        if not self.movable:
            return None
        places = [self.place[i][lv] for i, lv in enumerate(parent)]
        total = self.cost(parent)
        switched = set()
        for _ in range(min(rng.randint(1, opts.flips), rng.randint(1, opts.flips))):
            i = rng.choice(self.movable)
            move = rng.choice([d for d in range(-opts.step, opts.step + 1) if d])
            new = min(max(places[i] + move, 0), len(self.order[i]) - 1)
            total += self.bits[i][self.order[i][new]] - self.bits[i][self.order[i][places[i]]]
            places[i] = new
            switched.add(i)
        while total > self.budget:  # repair: cheapen other linears one place at a time
            down = [j for j in self.movable if j not in switched and places[j] > 0]
            if not down:
                return None
            j = rng.choice(down)
            total += self.bits[j][self.order[j][places[j] - 1]] - self.bits[j][self.order[j][places[j]]]
            places[j] -= 1
        child = tuple(self.order[i][r] for i, r in enumerate(places))
        if sum(a != b for a, b in zip(child, parent, strict=True)) > opts.max_changes:
            return None
        return child


class _Scorer:
    """Fitness memoised per (configuration, windows), counting the calls made and refusing any configuration
    over budget (the search must never ask for one; this makes a bug loud instead of a wrong answer)."""

    def __init__(self, fitness: Fitness, space: Space):
        self.fitness = fitness
        self.space = space
        self.memo: dict[tuple[Config, int], float] = {}
        self.calls = 0

    def __call__(self, config: Config, n: int) -> float:
        key = (config, n)
        if key not in self.memo:
            if self.space.cost(config) > self.space.budget:
                raise RuntimeError(f"search scored a configuration over budget: {config}")
            self.calls += 1
            self.memo[key] = float(self.fitness(config, n))
        return self.memo[key]


def _offspring(space: Space, parent: Config, rng: random.Random, opts: EvoOptions) -> list[Config]:
    """Up to ``opts.offspring`` distinct mutants, none equal to the parent (fewer when the space is small)."""
    found: list[Config] = []
    seen = {parent}
    for _ in range(50 * opts.offspring):
        if len(found) == opts.offspring:
            break
        child = space.mutate(parent, rng, opts)
        if child is not None and child not in seen:
            seen.add(child)
            found.append(child)
    return found


def _select(score: _Scorer, pool: list[Config], parent: Config, opts: EvoOptions, counts: tuple[int, ...]) -> Config:
    """The multi-step selection: each step keeps the best ``survivors[s]`` on ``counts[s]`` windows; the parent
    joins the last step, after the mutants, so a tie goes to a mutant."""
    for s, (keep, n) in enumerate(zip(opts.survivors, counts, strict=True)):
        if s == len(counts) - 1 and parent not in pool:
            pool = pool + [parent]
        ranked = sorted(range(len(pool)), key=lambda k, n=n: (score(pool[k], n), k))
        pool = [pool[k] for k in ranked[:keep]]
    return pool[0]


def evolve(bits: Sequence[Sequence[int]], budget: int, fitness: Fitness, start: tuple[int, ...], opts: EvoOptions,
           n_windows: int, progress: bool = True, *, on_parent: Callable[[Config], None] | None = None) -> EvoResult:
    """The best configuration found, from ``start``, by ``opts.generations`` generations of mutation and
    selection.

    bits[i][l]: linear i's stored bits at level l (rows may differ in length). budget: the most total bits a
    configuration may cost; ``start`` must fit (ValueError otherwise), and no configuration over it is ever
    scored or returned. fitness(config, n): lower is better, scored on the first n of ``n_windows`` windows
    (deterministic: it is memoised). on_parent(config): called with the start and with every new parent, so a
    fitness that caches the parent's hidden states (``fitness.StitchedKL.anchor``) can follow it. progress: a
    tqdm bar on stderr.
    """
    space = Space(bits, int(budget))
    parent = space.check_start(start)
    if n_windows < 1:
        raise ValueError(f"n_windows must be at least 1 (got {n_windows})")
    rng = random.Random(opts.seed)
    score = _Scorer(fitness, space)
    counts = opts.window_counts(n_windows)
    t0 = time.perf_counter()
    best = score(parent, n_windows)
    if on_parent is not None:
        on_parent(parent)
    trace = [{"generation": 0, "fitness": best, "bits": space.cost(parent), "evaluations": score.calls,
              "seconds": time.perf_counter() - t0}]
    bar = tqdm(range(1, opts.generations + 1), desc="evo search", file=sys.stderr, disable=not progress,
               leave=False)
    for generation in bar:
        t0, calls = time.perf_counter(), score.calls
        winner = _select(score, _offspring(space, parent, rng, opts), parent, opts, counts)
        if winner != parent:
            parent, best = winner, score(winner, n_windows)
            if on_parent is not None:
                on_parent(parent)
        trace.append({"generation": generation, "fitness": best, "bits": space.cost(parent),
                      "evaluations": score.calls - calls, "seconds": time.perf_counter() - t0})
        bar.set_postfix(fitness=f"{best:.4g}")
    return EvoResult(parent, best, trace)
