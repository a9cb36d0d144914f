"""Issue 28's answer on the dev testbed: the per-linear search (knapsack, evo) against the best uniform
configuration at no more storage, and against dense 3-bit GPTQ, over seeds, on C4 held-out.

    OMP_NUM_THREADS=1 python bench/search_answer.py --out /tmp/search-answer            # run what is missing
    OMP_NUM_THREADS=1 python bench/search_answer.py --out /tmp/search-answer --summary  # only the tables

Every run is one ``opt_mi.py`` call with ``--json OUT/<config>_seed<n>.json`` (an existing JSON is kept, so a
cut-off run resumes). The level database is cached per (model, calibration, seed, levels, flags) under
OUT/cache: a seed's first knapsack builds it, its other searches wait for that and reuse it. ``--jobs`` runs
at once, in the order of ``tasks``. Results depend on the
thread count: keep OMP_NUM_THREADS the same for every run (1 here).

The summary prints per configuration its stored bpw and C4 held-out PPL per seed, then the paired verdicts
(the report's rule, ``miq.report.stats.decide_runs``: mean paired difference beyond 2 standard errors).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Lock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from miq.report.results import Run, Unit  # noqa: E402
from miq.report.stats import decide_runs, sample_std  # noqa: E402

TESTBED = "../shared/testbed/tiny-opt-dev"
CALIB = "../shared/data/c4_train.jsonl"
HELDOUT = "../shared/data/c4_heldout.jsonl"
EVALSET = HELDOUT  # the JSON keys a file eval set by the path given
BUDGETS = ("2.5", "3.0", "3.5")
# the best uniform configuration within each budget (docs/results.md's frontier table), and dense 3-bit
UNIFORM = {"u60_w3": ["--sparsity", "0.6", "--wbits", "3"],
           "u50_w3_g128": ["--sparsity", "0.5", "--wbits", "3", "--groupsize", "128"],
           "u0_w3": ["--wbits", "3"],
           "u0_w3_g128": ["--wbits", "3", "--groupsize", "128"]}
BEST_UNIFORM = {"2.5": "u60_w3", "3.0": "u50_w3_g128", "3.5": "u0_w3_g128"}
DENSE3 = "u0_w3"


def base(seed: int, out: Path) -> list[str]:
    return [sys.executable, "opt_mi.py", TESTBED, CALIB, "--nsamples", "128", "--seqlen", "256", "--seed",
            str(seed), "--eval", HELDOUT, "--analysis-dir", ""]


def tasks(args) -> list[tuple[str, list[str], str | None]]:
    """(result id, command, the id whose JSON must exist first), in the order they start: the 3.0 bpw
    answer (knapsack, evo, dense 3-bit, the best uniform) seed by seed first, then the other budgets. A seed's
    evo waits for its first knapsack, which builds (or finds) the seed's level database; other knapsacks of the
    seed wait too, so that two runs never build one database at once."""
    cache = ["--search-cache", str(args.out / "cache")]
    evo = [*cache, "--search-generations", str(args.generations), "--search-windows", str(args.windows)]
    first = args.budgets[len(args.budgets) // 2]  # 3.0 with the default budgets

    def search(kind: str, b: str, s: int) -> tuple[str, list[str], str | None]:
        flags = ["--target-bpw", b, "--search", kind, *(evo if kind == "evo" else cache)]
        needs = None if (kind, b) == ("knapsack", first) else f"knapsack_{first}_seed{s}"
        return f"{kind}_{b}_seed{s}", base(s, args.out) + flags, needs

    def uniform(u: str, s: int) -> tuple[str, list[str], None]:
        return f"{u}_seed{s}", base(s, args.out) + UNIFORM[u], None

    out = []
    for s in args.seeds:
        out += [search("knapsack", first, s), search("evo", first, s), uniform(DENSE3, s),
                uniform(BEST_UNIFORM["3.0"], s)]
    rest = [b for b in args.budgets if b != first]
    out += [search("knapsack", b, s) for b in rest for s in args.seeds]
    out += [uniform(BEST_UNIFORM[b], s) for b in rest for s in args.seeds]
    out += [search("evo", b, s) for b in rest for s in args.seeds]
    return [t for t in out if args.only in ("all", "search" if "--search" in t[1] else "uniform")]


class Queue:
    """The tasks, handed out in order to whichever worker asks, each once its dependency has its JSON."""

    def __init__(self, todo, out: Path):
        self.todo, self.out, self.lock = todo, out, Lock()

    def started(self, rid: str) -> bool:
        """Its JSON or its log exists: it ran, or runs now (in this runner or an earlier one); delete the log of
        a failed run to run it again."""
        return (self.out / f"{rid}.json").exists() or (self.out / "logs" / f"{rid}.log").exists()

    def next(self):
        while True:
            with self.lock:
                if not self.todo:
                    return None
                self.todo = [t for t in self.todo if not self.started(t[0])]
                for t in self.todo:
                    if t[2] is None or (self.out / f"{t[2]}.json").exists():
                        self.todo.remove(t)
                        return t
            time.sleep(5)


def worker(queue: Queue, out: Path) -> None:
    while (t := queue.next()) is not None:
        rid, cmd, _ = t
        start = time.time()
        with open(out / "logs" / f"{rid}.log", "w") as log:
            rc = subprocess.run([*cmd, "--json", str(out / f"{rid}.json")], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT).returncode
        print(f"{time.strftime('%H:%M:%S')} {rid}: rc {rc}, {time.time() - start:.0f} s", flush=True)
        if rc != 0:  # a dependant would wait for ever
            queue.todo = [x for x in queue.todo if x[2] != rid]


def units(out: Path) -> dict[str, Unit]:
    """The runs of OUT grouped over seeds, by id without its _seed suffix."""
    import json

    groups: dict[str, list[Run]] = {}
    for p in sorted(out.glob("*_seed*.json")):
        groups.setdefault(p.stem.rsplit("_seed", 1)[0], []).append(Run(p.stem, json.loads(p.read_text())))
    return {k: Unit(k, v) for k, v in groups.items()}


def verdict(u: dict[str, Unit], a: str, b: str) -> str:
    if a not in u or b not in u:
        return f"| {a} | {b} | missing | | |"
    d, p = decide_runs(u[a], u[b], EVALSET)
    pa, pb = u[a].ppl_of(EVALSET), u[b].ppl_of(EVALSET)
    se = f"{p.mean:+.2f} ± {p.se:.2f} (n={p.n})" if p else "single seed"
    return f"| {a} | {b} | {pa:.2f} vs {pb:.2f} | {se} | {d} |"


def where(u: dict[str, Unit]) -> None:
    """Each search run's levels by linear type (rows) and layer (columns): "s0.7 w2" etc., and per run the
    share of decoder linear weights under a mask; then the search's own figures (KL, times)."""
    for k, unit in u.items():
        if not k.startswith(("knapsack", "evo")):
            continue
        for r in unit.runs:
            sr = r.data["search"]
            by: dict[str, dict[int, str]] = {}
            for name, label in sr["levels"].items():
                layer = int(name.split(".layers.")[1].split(".")[0])
                by.setdefault(name.rsplit(".", 1)[1], {})[layer] = label.replace("dense ", "")
            sparse = sum(rec["channels"] * rec["in_features"] for rec in r.data["layers"]
                         if rec["level"]["sparsity"] > 0 or rec["level"]["prunen"])
            total = sum(rec["channels"] * rec["in_features"] for rec in r.data["layers"])
            kl = f", KL {sr['kl']:.4f} (start {sr['start']['from']}, {sr['start']['kl']:.4f})" if "kl" in sr else ""
            print(f"\n{r.id}: bpw {sr['bpw']:.3f}, {sparse / total:.0%} of the weights in masked linears, "
                  f"r.sparsity {r.data['sparsity']:.3f}{kl}; database {sr['db_s']:.0f} s "
                  f"({'reused' if sr['db_reused'] else 'built'}, {sr['db_size_bytes'] / 2**20:.1f} MiB), "
                  f"search {sr['search_s']:.1f} s")
            layers = sorted({n for v in by.values() for n in v})
            print("| linear | " + " | ".join(f"layer {n}" for n in layers) + " |")
            print("|---|" + "---|" * len(layers))
            for lin in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"):
                if lin in by:
                    print(f"| {lin} | " + " | ".join(by[lin].get(n, "") for n in layers) + " |")


def summary(out: Path) -> None:
    u = units(out)
    print("| configuration | bpw (per seed) | C4 held-out PPL per seed | mean ± std | wall s (per seed) |")
    print("|---|---|---|---|---|")
    for k, unit in u.items():
        bpw = ", ".join(f"{r.bpw:.3f}" for r in unit.runs)
        ppl = ", ".join(f"{r.config.seed}: {r.ppl_of(EVALSET):.2f}" for r in unit.runs)
        secs = ", ".join(f"{r.data['timing']['total_s']:.0f}" for r in unit.runs)
        std = sample_std([r.ppl_of(EVALSET) for r in unit.runs])
        print(f"| {k} | {bpw} | {ppl} | {unit.ppl_of(EVALSET):.2f} ± {std:.2f} | {secs} |")
    print("\npaired (reference PPL - first PPL, mean ± SE over seeds; 'better' = the first is better):\n")
    print("| first | reference | PPL | paired diff | verdict |")
    print("|---|---|---|---|---|")
    for b in BUDGETS:
        for a, ref in ((f"evo_{b}", f"knapsack_{b}"), (f"evo_{b}", BEST_UNIFORM[b]),
                       (f"knapsack_{b}", BEST_UNIFORM[b]), (f"evo_{b}", DENSE3), (f"knapsack_{b}", DENSE3)):
            print(verdict(u, a, ref))
    where(u)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/search-answer"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budgets", nargs="+", default=list(BUDGETS))
    ap.add_argument("--generations", type=int, default=50)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", choices=("all", "uniform", "search"), default="all")
    ap.add_argument("--summary", action="store_true", help="only print the tables of what OUT holds")
    args = ap.parse_args()
    args.out = args.out.resolve()
    if not args.summary:
        if os.environ.get("OMP_NUM_THREADS") != "1":
            sys.exit("search_answer: set OMP_NUM_THREADS=1 (results depend on the thread count)")
        (args.out / "logs").mkdir(parents=True, exist_ok=True)
        queue = Queue(tasks(args), args.out)
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda _: worker(queue, args.out), range(args.jobs)))
    summary(args.out)


if __name__ == "__main__":
    main()
