"""The built-in toys' names, cache folders and recipes, apart from building them (``toy.py``): what a sweep or
an output-path check needs to know about the toys (their names, where they are cached) without importing torch.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from miq.synthetic import synthetic_text

TOY_SEED = 0


@dataclass(frozen=True)
class ToySpec:
    """One built-in toy: its MODEL name, its cache folder, and the recipe its weights follow from."""

    name: str  # MODEL on the command line
    version: str  # the cache folder's name; a cached toy of another recipe() is rebuilt anyway
    model_type: str  # "opt" or "llama": which config and model class (see _CONFIGS)
    layers: int
    hidden: int
    heads: int
    ffn: int  # OPT's ffn_dim, Llama's intermediate_size
    kv_heads: int | None = None  # Llama: key/value heads (grouped-query attention when < heads)
    seqlen: int = 128  # training window = max_position_embeddings
    steps: int = 1000
    batch: int = 8
    lr: float = 3e-3
    warmup: int = 100

    def recipe(self, steps: int | None = None, seed: int = TOY_SEED) -> dict:
        """Everything the toy's weights depend on (besides the library versions); saved in TOY.json."""
        r = {
            "version": self.version, "layers": self.layers, "hidden": self.hidden, "heads": self.heads,
            "ffn_dim": self.ffn, "seqlen": self.seqlen, "steps": self.steps if steps is None else steps,
            "batch": self.batch, "lr": self.lr, "warmup": self.warmup, "seed": seed,
            "corpus_sha256": hashlib.sha256(synthetic_text("train").encode()).hexdigest()[:16],
        }
        if self.kv_heads is not None:  # only where it exists: the OPT toy's recipe (and cache) stay as they were
            r["kv_heads"] = self.kv_heads
        return r


# Hidden 64 rather than 128: in the same ~25 s a 128-wide model stays so under-trained that zeroing half of
# each layer's weights by magnitude costs it ~1-2% perplexity (nothing to compress); at 64 every weight is
# worked harder and 50% magnitude pruning costs ~12%, SparseGPT ~2%, as on real LMs.
OPT_TOY = ToySpec("toy", "toy-opt-v1", "opt", layers=2, hidden=64, heads=4, ffn=256)
# The Llama toy at the same width and cost: 4 heads of 16 dims sharing 2 key/value heads, and a gated MLP of
# 192 (3 matrices of 64 x 192 hold about as many weights as OPT's 2 of 64 x 256).
LLAMA_TOY = ToySpec("toy-llama", "toy-llama-v1", "llama", layers=2, hidden=64, heads=4, ffn=192, kv_heads=2)
TOYS: dict[str, ToySpec] = {t.name: t for t in (OPT_TOY, LLAMA_TOY)}


def cache_root(cache_dir: str | None = None) -> Path:
    """Where the toys are cached: cache_dir, else $MIQ_CACHE_DIR, else ~/.cache/mutual_info_quantization."""
    return Path(cache_dir or os.environ.get("MIQ_CACHE_DIR") or "~/.cache/mutual_info_quantization").expanduser()
