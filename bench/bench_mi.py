"""Benchmark: all-pairs `pairwise_mi` against a per-pair sklearn loop; peak memory of a 3072-channel layer.

    python bench/bench_mi.py            # C = 512, 768 vs sklearn; C = 3072 alone (N = 8192, 16 quantile bins)
    python bench/bench_mi.py --quick    # smaller sizes, a few seconds

The sklearn loop (`mutual_info_score` on the same bin codes) is timed on a random sample of pairs and
extrapolated to all C(C-1)/2 pairs; `pairwise_mi` is timed end to end (discretisation included). The two
are timed alternately and the best of each is kept. The large case runs in a fresh subprocess so that its
peak RSS (VmHWM) is its own.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch
from sklearn.metrics import mutual_info_score

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rss import peak_rss  # bench/rss.py, beside this script

from mutual_info import discretize, pairwise_mi  # noqa: E402


def structured_acts(n: int, c: int, seed: int = 0) -> torch.Tensor:
    """Activations [n, c] float32 that look like a layer's: shared latent factors (groups of dependent
    channels), ReLU channels (about half exact zeros), heavy tails, coarse values with ties, one constant."""
    g = torch.Generator().manual_seed(seed)
    n_factors = 32
    z = torch.randn(n, n_factors, generator=g)
    group = torch.randint(0, n_factors, (c,), generator=g)
    w = torch.zeros(n_factors, c)
    w[group, torch.arange(c)] = 0.5 + 2 * torch.rand(c, generator=g)  # one main factor per channel
    w += 0.3 * torch.randn(n_factors, c, generator=g) * (torch.rand(n_factors, c, generator=g) < 0.1)
    x = z @ w + torch.randn(n, c, generator=g)
    x[:, 0::3] = torch.relu(x[:, 0::3])  # ReLU outputs: ties at exactly 0
    x[:, 1::5] = torch.sinh(2 * x[:, 1::5])  # heavy tails
    x[:, 2::7] = torch.round(2 * x[:, 2::7]) / 2  # coarse values: many ties
    x[:, c // 2] = 0.25  # a dead channel
    return x


def compare(c: int, n: int, bins: int, n_pairs: int, repeats: int, seed: int = 0) -> None:
    """Time pairwise_mi and the sampled sklearn loop alternately `repeats` times; report the best of each,
    so that load from other processes on the shared machine biases neither side."""
    acts = structured_acts(n, c, seed)
    codes = discretize(acts, bins, "quantile").numpy()
    rng = np.random.default_rng(seed)
    pairs = set()
    while len(pairs) < n_pairs:
        i, j = sorted(rng.choice(c, size=2, replace=False).tolist())
        pairs.add((i, j))
    pairs = sorted(pairs)

    t_all, t_pair = math.inf, math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = pairwise_mi(acts, bins=bins, binning="quantile")
        t_all = min(t_all, time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = [mutual_info_score(codes[:, i], codes[:, j]) for i, j in pairs]
        t_pair = min(t_pair, (time.perf_counter() - t0) / len(pairs))
    t_loop = t_pair * c * (c - 1) / 2

    err = max(abs(r - res.mi[i, j].item()) for r, (i, j) in zip(ref, pairs, strict=True))
    sym = torch.equal(res.mi, res.mi.T)
    finite = bool(torch.isfinite(res.mi).all() and torch.isfinite(res.nmi).all())
    print(f"C={c:5d} N={n} bins={bins}: pairwise_mi {t_all:7.2f} s | sklearn loop {t_pair * 1e3:.3f} ms/pair"
          f" x {c * (c - 1) // 2} pairs = {t_loop:8.1f} s (extrapolated from {len(pairs)} pairs)"
          f" | speedup = {t_loop / t_all:6.1f}x | max |dMI| = {err:.1e} | symmetric={sym} finite={finite}"
          f" | best of {repeats}", flush=True)


def single(c: int, n: int, bins: int) -> None:
    """One pairwise_mi call, reported with this process's peak RSS (run in a subprocess)."""
    acts = structured_acts(n, c)
    rss_before = peak_rss() / 2**30
    t0 = time.perf_counter()
    res = pairwise_mi(acts, bins=bins, binning="quantile")
    dt = time.perf_counter() - t0
    finite = bool(torch.isfinite(res.mi).all())
    print(f"C={c:5d} N={n} bins={bins}: pairwise_mi {dt:7.2f} s | peak RSS {peak_rss() / 2**30:.2f} GiB"
          f" (process incl. torch and the float32 acts, {rss_before:.2f} GiB before the call)"
          f" | finite={finite}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    p.add_argument("--pairs", type=int, default=300, help="sampled pairs for the sklearn loop (>= 200)")
    p.add_argument("--repeats", type=int, default=3, help="alternating timings of each side; best is kept")
    p.add_argument("--single", type=int, default=0, help=argparse.SUPPRESS)  # internal: subprocess mode
    p.add_argument("--n", type=int, default=8192, help=argparse.SUPPRESS)
    args = p.parse_args()
    bins = 16
    if args.single:
        single(args.single, args.n, bins)
        return

    n, sizes, big = (2048, (128, 256), 768) if args.quick else (8192, (512, 768), 3072)
    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
          f" ({torch.get_num_threads()} threads), {bins} quantile bins, structured activations;"
          f" load average {os.getloadavg()[0]:.1f} at start")
    pairwise_mi(structured_acts(256, 64), bins=bins)  # warm-up: first-call library initialisation
    mutual_info_score(np.arange(10) % 3, np.arange(10) % 2)
    for c in sizes:
        compare(c, n, bins, max(200, args.pairs), max(1, args.repeats))
    cmd = [sys.executable, os.path.abspath(__file__), "--single", str(big), "--n", str(n)]
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
