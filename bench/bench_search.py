"""Benchmark: one generation of the evolutionary level search with the prefix-cached KL, against scoring the
same candidates by whole forwards.

    python bench/bench_search.py                       # the toy and an OPT-125m-shaped random model, CPU
    python bench/bench_search.py --device cuda         # the same on a GPU
    python bench/bench_search.py --windows 16 --seqlen 256 --offspring 32

For each model it builds ``StitchedKL`` on --windows random windows of --seqlen tokens and a stand-in level
database (four levels per decoder linear: the dense weight plus seeded random perturbations of growing size,
priced like 2, 3, 4 and 16 bits a weight), starts from every linear at the 3-bit level with room for a few
switches, and times, side by side:
- cached: ``evo.evolve`` for one generation (--offspring mutants on a quarter of the windows, 4 survivors on
  all, the parent anchored), which runs each candidate from its first changed decoder layer;
- whole: the very same fitness calls (recorded from the cached run) each computed from decoder layer 0, as a
  search without the cache would (the head and the KL cost the same in both).
It prints seconds, decoder-layer forwards and the ratio. The dense log-probabilities and the first anchor are
built before the clock starts in both arms. Random models: the timings are about compute, not quality.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from miq.model import layouts, loading, toy  # noqa: E402
from miq.search import evo  # noqa: E402
from miq.search.fitness import StitchedKL  # noqa: E402

LEVEL_BITS = (2, 3, 4, 16)  # what the stand-in levels are priced at, per weight
LEVEL_NOISE = (0.3, 0.1, 0.03, 0.0)  # their relative perturbation


class PerturbedDB:
    """A LevelDB stand-in: level l of linear i is its dense weight plus seeded noise of LEVEL_NOISE[l] times
    the weight's standard deviation (drawn anew on each call, as a database read costs something too)."""

    def __init__(self, model):
        layout = layouts.of(model)
        n_layers = len(layout.decoder_layers(model))
        self.names = [layout.layer_prefix(k) + lin for k in range(n_layers) for lin in layout.linear_names]
        self.numel = [model.get_submodule(n).weight.numel() for n in self.names]
        self.bits = [[n * b for b in LEVEL_BITS] for n in self.numel]
        self.model = model

    def weight(self, linear: int, level: int) -> torch.Tensor:
        w = self.model.get_submodule(self.names[linear]).weight.detach().float()
        g = torch.Generator().manual_seed(1000 * linear + level)
        return w + LEVEL_NOISE[level] * w.std() * torch.randn(w.shape, generator=g).to(w.device)


def opt125m_shaped(seed: int):
    """OPT-125m's shapes (12 layers, 768 wide, 3072 MLP, 50272 vocabulary) with random weights."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                       vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=768)
    return OPTForCausalLM(config).eval()


def one_generation(name: str, model, args) -> dict:
    dev = torch.device(args.device)
    model.to(dev)
    g = torch.Generator().manual_seed(args.seed)
    windows = torch.randint(4, model.config.vocab_size, (args.windows, args.seqlen), generator=g)
    db = PerturbedDB(model)
    start = tuple(1 for _ in db.names)
    budget = sum(b[1] for b in db.bits) + 4 * min(db.numel)
    kl = StitchedKL(model, windows, db, dev, batch=args.batch)
    kl(start)  # the dense log-probs (in __init__) and the first anchor: before the clock
    calls: list[tuple[tuple[int, ...], int]] = []

    def recorded(config, n):
        calls.append((config, n))
        return kl(config, n)

    opts = evo.EvoOptions(generations=1, offspring=args.offspring, seed=args.seed)
    ran, t0 = kl.layers_run, time.perf_counter()
    res = evo.evolve(db.bits, budget, recorded, start, opts, args.windows, progress=False, on_parent=kl.anchor)
    cached_s, cached_layers = time.perf_counter() - t0, kl.layers_run - ran
    kl.first_change = lambda config: 0  # every call from decoder layer 0: a search without the cache
    ran, t0 = kl.layers_run, time.perf_counter()
    for config, n in calls:
        kl(config, n)
    whole_s, whole_layers = time.perf_counter() - t0, kl.layers_run - ran
    return {"model": name, "windows": f"{args.windows}x{args.seqlen}", "calls": len(calls),
            "cached_s": cached_s, "whole_s": whole_s, "cached_layers": cached_layers, "whole_layers": whole_layers,
            "improved": res.fitness < res.trace[0]["fitness"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=64)
    p.add_argument("--offspring", type=int, default=16)
    p.add_argument("--batch", type=int, default=8, help="windows per decoder-layer call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-opt", action="store_true", help="the toy only")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}, device {args.device}")
    src, _ = loading.open_source(toy.toy_model_path())
    models = [("toy", lambda: loading.load_model(src, "auto", torch.device("cpu")))]
    if not args.skip_opt:
        models.append(("opt-125m-shaped", lambda: opt125m_shaped(args.seed)))
    print(f"{'model':<16} {'windows':>8} {'calls':>5} {'cached s':>9} {'whole s':>8} {'layers':>11} {'ratio':>6}")
    for name, build in models:
        r = one_generation(name, build(), args)
        print(f"{r['model']:<16} {r['windows']:>8} {r['calls']:>5} {r['cached_s']:>9.2f} {r['whole_s']:>8.2f} "
              f"{r['cached_layers']:>5}/{r['whole_layers']:<5} {r['whole_s'] / r['cached_s']:>6.2f}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
