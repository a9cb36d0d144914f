"""Benchmark: what the per-linear search costs, database build, knapsack and evolution, through ``opt_mi.py``.

    OMP_NUM_THREADS=1 python bench/bench_search_cost.py                      # dev testbed + OPT-125m shape, CPU
    OMP_NUM_THREADS=1 python bench/bench_search_cost.py --models opt125m --nsamples 8 --seqlen 128 \\
        --sparsities 0,0.5 --wbits 3,4 --generations 3

Per model it runs ``opt_mi.py --target-bpw B --search knapsack`` into an empty cache (the run that builds the
level database: its JSON's ``search.db_s`` and ``db_size_bytes``; ``search_s`` is then the knapsack alone),
then ``--search evo`` on the cached database (``search.trace``: seconds per generation, the start's scoring
apart). Models: ``dev`` = ``../shared/testbed/tiny-opt-dev``; ``opt125m`` = ``OPTConfig()``'s defaults (OPT-125m's
shapes: 12 layers, 768 wide, 3072 MLP, 50272 vocabulary) with random weights, saved to a temporary folder
with the testbed's tokenizer (its ids fit the larger vocabulary; random weights: the timings are about
compute, not quality). Calibration: C4 train; evaluation (needed by a run, not timed here): the first records
of C4 held-out. It prints one line per model and the machine's load before and after (``os.getloadavg``):
figures taken under load are slower than idle ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TESTBED = SHARED / "testbed" / "tiny-opt-dev"
CALIB = SHARED / "data" / "c4_train.jsonl"
HELDOUT = SHARED / "data" / "c4_heldout.jsonl"


def opt125m_shaped(folder: Path, seed: int) -> Path:
    """OPTConfig's defaults (OPT-125m) with random weights, saved with the testbed's tokenizer."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    OPTForCausalLM(OPTConfig()).eval().save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TESTBED / f, folder / f)
    return folder


def run(model: Path, flags: list[str], js: Path, args) -> dict:
    """One opt_mi.py run; its JSON's ``search`` block and the run's wall seconds."""
    cmd = [sys.executable, "opt_mi.py", str(model), str(CALIB), "--nsamples", str(args.nsamples), "--seqlen",
           str(args.seqlen), "--seed", "0", "--eval", str(args.eval_file), "--analysis-dir", "", "--target-bpw",
           str(args.budget), "--search-cache", str(args.tmp / "cache"), "--search-sparsities", args.sparsities,
           f"--search-wbits={args.wbits}", f"--search-groupsize={args.groupsize}", "--json", str(js), *flags]
    t = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    rec = json.loads(js.read_text())["search"]
    rec["wall_s"] = time.time() - t
    return rec


def measure(name: str, model: Path, args) -> dict:
    k = run(model, ["--search", "knapsack"], args.tmp / f"{name}-knapsack.json", args)
    e = run(model, ["--search", "evo", "--search-generations", str(args.generations), "--search-windows",
                    str(args.windows)], args.tmp / f"{name}-evo.json", args)
    gens = [g["seconds"] for g in e["trace"][1:]]
    return {"model": name, "linears": len(k["levels"]), "levels": k["levels_tried"], "db_s": k["db_s"],
            "db_MiB": k["db_size_bytes"] / 2**20, "knapsack_s": k["search_s"], "evo_reused_db": e["db_reused"],
            "evo_s": e["search_s"], "generations": len(gens), "s_per_generation": sum(gens) / max(1, len(gens)),
            "start_s": e["trace"][0]["seconds"], "knapsack_wall_s": k["wall_s"], "evo_wall_s": e["wall_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="dev,opt125m", help="comma-separated: dev, opt125m")
    ap.add_argument("--nsamples", type=int, default=128, help="calibration windows of the database")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--sparsities", default="0,0.25,0.5,0.6,0.7")
    ap.add_argument("--wbits", default="2,3,4,5,8")
    ap.add_argument("--groupsize", default="-1,128")
    ap.add_argument("--budget", type=float, default=3.0)
    ap.add_argument("--generations", type=int, default=5)
    ap.add_argument("--windows", type=int, default=16, help="held-out calibration windows of the evolution")
    ap.add_argument("--eval-records", type=int, default=20, help="C4 held-out records the (untimed) eval reads")
    args = ap.parse_args()
    if os.environ.get("OMP_NUM_THREADS") is None:
        sys.exit("bench_search_cost: set OMP_NUM_THREADS (e.g. 1) so figures name their thread count")
    with tempfile.TemporaryDirectory(prefix="search-cost-") as tmp:
        args.tmp = Path(tmp)
        args.eval_file = args.tmp / "c4_heldout_head.jsonl"
        args.eval_file.write_text("".join(HELDOUT.read_text().splitlines(keepends=True)[:args.eval_records]))
        print(f"{platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, "
              f"load before {os.getloadavg()}; {args.nsamples} x {args.seqlen} calibration tokens, levels "
              f"{args.sparsities} x {args.wbits} x {args.groupsize}, evo {args.generations} generations on "
              f"{args.windows} windows", flush=True)
        for name in args.models.split(","):
            model = TESTBED if name == "dev" else opt125m_shaped(args.tmp / "opt125m", 0)
            print(json.dumps(measure(name, model, args)), flush=True)
        print(f"load after {os.getloadavg()}")


if __name__ == "__main__":
    main()
