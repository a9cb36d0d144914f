"""Benchmark: the obs allocation (trial passes at every width) against one SparseGPT pass and the MI stage.

    python bench/bench_alloc.py                  # OPT-125m layer shapes, CPU
    python bench/bench_alloc.py --device cuda    # the same on a GPU
    python bench/bench_alloc.py --testbed        # + per-layer totals of real runs on ../shared/testbed
    python bench/bench_alloc.py --oracle         # + the widths an exact width-skipping trial must compute

For each shape [rows, cols] (768 x 768: attention, 3072 x 768: fc1, 768 x 3072: fc2) on a synthetic layer
(correlated inputs with a few heavy channels, 128 x 128 calibration tokens), it times side by side, best of
--repeat:
- one SparseGPT pass at 50% + 3 bits (``fasterprune``): the reference's cost;
- the obs allocation: ``trial`` over the 6 default widths (one stacked pass) + the knapsack on kept weights;
- the rtn proxy costs (``allocation.group_costs``) + the knapsack;
- the MI stage: ``pairwise_mi`` over 8192 sampled output rows of the layer.
Ratios are to the SparseGPT pass. The Hessian is accumulated once; each timed pass starts from a copy.

``--oracle`` asks whether the trial could skip widths and stay exact. A candidate (row, width) can be left
out once a lower bound on its OBS loss proves the knapsack would not take it; the bounds a pass gives for
free are its partial sums (the loss over the columns done so far, which only grows). An oracle that knows
the final multiplier and optimum stops each candidate at the first block where its partial loss proves it
unused; the figure is the rows' mean count of widths' work it still does (the trial does 6).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from miq import options  # noqa: E402
from miq.plan import allocation, knapsack, trials  # noqa: E402
from mutual_info import pairwise_mi  # noqa: E402
from quant import Quantizer  # noqa: E402
from sparsegpt_mi import SparseGPT, obs_pass  # noqa: E402

CHOICES = list(options.DEFAULT_BITS_CHOICES)
SHAPES = [(768, 768), (3072, 768), (768, 3072)]


def layer_with_hessian(rows: int, cols: int, dev: torch.device, seed: int = 0) -> SparseGPT:
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(rows, cols, generator=g) * 0.05)
    layer = layer.to(dev)
    gpt = SparseGPT(layer, f"bench.{rows}x{cols}")
    mix = (torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)).to(dev)
    for _ in range(128):
        x = torch.randn(1, 128, cols, generator=g).to(dev) @ mix
        x[..., :4] *= 8
        gpt.add_batch(x, layer(x))
    return gpt


def timed(fn, dev: torch.device) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def bench_shape(rows: int, cols: int, dev: torch.device, repeat: int) -> dict:
    base = layer_with_hessian(rows, cols, dev)
    W, H = base.layer.weight.data.clone(), base.H.clone()

    def fresh() -> SparseGPT:
        g = copy.copy(base)
        g.layer = nn.Linear(cols, rows, bias=False).to(dev)
        g.layer.weight.data = W.clone()
        g.H, g._prepared, g._factors = H.clone(), None, {}  # nothing cached from an earlier timed pass
        return g

    def sparsegpt():
        g = fresh()
        g.quantizer = Quantizer()
        g.quantizer.configure(3, perchannel=True, sym=False)
        g.fasterprune(0.5)

    def obs():
        t = trials.trial(fresh(), CHOICES, 3, options.PassOptions(sparsity=0.5))
        costs = allocation.obs_group_costs(t.row_loss, torch.arange(rows, device=dev))
        # as runs do: each row charged its kept weights (a sparse layer's table goes to knapsack.core)
        allocation.allocate_bits(costs, (~t.mask).sum(1).cpu(), CHOICES, 3.5)

    def rtn():
        labels = torch.arange(rows, device=dev)
        costs = allocation.group_costs(W.float(), H, labels, CHOICES)
        allocation.allocate_bits(costs, torch.ones(rows, dtype=torch.long), CHOICES, 3.5)

    acts = torch.randn(8192, rows, device=dev) @ torch.randn(rows, rows, device=dev) / rows**0.5

    def mi():
        pairwise_mi(acts, bias="miller-madow")

    out = {}
    for name, fn in (("sparsegpt", sparsegpt), ("obs", obs), ("rtn", rtn), ("mi", mi)):
        fn()  # warm-up (allocations, kernels)
        out[name] = min(timed(fn, dev) for _ in range(repeat))
    return out


def oracle_widths(rows: int, cols: int, dev: torch.device, budget: float = 3.5) -> float:
    """Mean widths of row work per row that an exact trial skipping widths by partial-loss bounds needs at
    least (module docstring): the same stacked pass as ``trial``, stopped at every block boundary."""
    g = layer_with_hessian(rows, cols, dev)
    W0, _ = g.prepare(0.01)
    U = g.factor(None)
    order = [3] + [b for b in CHOICES if b != 3]
    back = [order.index(b) for b in CHOICES]
    ends = list(range(128, cols, 128)) + [cols]
    partial = []
    for m in ends:
        q = Quantizer()
        q.configure(torch.cat([torch.full((rows,), b) for b in order]), perchannel=True, sym=False)
        q.find_params(g.layer.weight.data.float().repeat(len(order), 1), weight=True)
        res = obs_pass(W0.repeat(len(order), 1)[:, :m].clone(), U[:m, :m], q, options.PassOptions(sparsity=0.5),
                       mask_rows=rows)
        partial.append(res.row_loss.reshape(len(order), rows)[back].T.double().cpu().numpy())
    costs, kept = partial[-1], (~res.mask[:rows]).sum(1).cpu().numpy()
    weights = kept[:, None] * (np.asarray(CHOICES) - CHOICES[0])[None, :]
    cap = int((budget - CHOICES[0]) * kept.sum())
    r = np.arange(rows)
    picks, lam = knapsack.core(costs, weights, cap), knapsack.multiplier(costs, weights, cap)
    reduced = costs + lam * weights
    least = reduced.min(1, keepdims=True)
    # the optimum's distance to the Lagrangian bound, as knapsack.core sums it (terms >= 0, no cancellation)
    gap = (reduced - least)[r, picks].sum() + lam * (cap - weights[r, picks].sum())
    work = np.ones_like(costs)
    for k in range(len(ends) - 1, -1, -1):  # partial losses only grow: the earliest proving block wins
        work[partial[k] + lam * weights - least > gap] = ends[k] / cols
    work[r, picks] = 1.0
    return float(work.sum() / rows)


def testbed_runs(device: str) -> list[tuple[str, float, float, float]]:
    """(run, SparseGPT s, alloc s, MI s) summed over layers, from real opt_mi.py runs on the testbed."""
    tb = ROOT.parent / "shared" / "testbed" / "tiny-opt-dev"
    data = ROOT.parent / "shared" / "data"
    if not tb.is_dir():
        print("(../shared/testbed not present: testbed runs skipped)")
        return []
    common = [sys.executable, str(ROOT / "opt_mi.py"), str(tb), str(data / "c4_train.jsonl"), "--nsamples", "32",
              "--eval", str(data / "c4_heldout.jsonl"), "--analysis-dir", "", "--sparsity", "0.5",
              "--device", device]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("uniform 3-bit", ["--wbits", "3"]),
                            ("per-channel obs, 3.5", ["--wbits", "3.5", "--groups", "all"]),
                            ("MI-B K=16 obs, 3.5", ["--wbits", "3.5", "--groups", "16"]),
                            ("per-channel rtn, 3.5", ["--wbits", "3.5", "--groups", "all", "--alloc-cost", "rtn"])):
            out = Path(tmp) / "r.json"
            subprocess.run(common + extra + ["--json", str(out)], check=True, capture_output=True)
            t = json.loads(out.read_text())["timing"]
            rows.append((name, t["prune_s"], t["alloc_s"], t["mi_s"]))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--testbed", action="store_true", help="also time real runs on ../shared/testbed")
    p.add_argument("--oracle", action="store_true", help="also count the widths an exact width-skipping trial needs")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); on a machine shared with other jobs use 1: "
                        "OpenMP threads that wait on each other made a pass 40x slower here under load")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} on {name}; load average {os.getloadavg()[0]:.1f}")
    print(f"{'shape':>10} | {'SparseGPT s':>11} | {'obs alloc s':>11} | {'obs/SparseGPT':>13} | "
          f"{'rtn alloc s':>11} | {'MI s':>7} | {'obs/MI':>6}")
    for rows, cols in SHAPES:
        r = bench_shape(rows, cols, dev, args.repeat)
        print(f"{rows:>5}x{cols:<4} | {r['sparsegpt']:11.3f} | {r['obs']:11.3f} | {r['obs'] / r['sparsegpt']:12.2f}x"
              f" | {r['rtn']:11.3f} | {r['mi']:7.2f} | {r['obs'] / r['mi']:5.2f}x")
    if args.oracle:
        print("\nwidths of row work an exact trial needs at least, skipping by partial losses (the trial does "
              f"{len(CHOICES)}):")
        for rows, cols in SHAPES:
            print(f"{rows:>5}x{cols:<4} | {oracle_widths(rows, cols, dev):.2f}")
    if args.testbed:
        print("\ntestbed (tiny-opt-dev, 32 x 256 calibration tokens, 50% sparsity), seconds summed over layers:")
        print(f"{'run':>24} | {'SparseGPT pass s':>16} | {'alloc s':>8} | {'MI s':>6}")
        for name, prune, alloc, mi in testbed_runs(args.device):
            print(f"{name:>24} | {prune:16.2f} | {alloc:8.2f} | {mi:6.2f}")


if __name__ == "__main__":
    main()
