"""Bits accounting over the decoder's linear weights: what a compressed model stores, per weight.

A compressed layer is charged exactly what the packed format stores for it (``packed_layer.stored_bits``,
by the format's own rules; ``packed.py``'s docstring specifies them), byte padding and headers apart:
- ``code_bpw``: the codes, for kept weights only (a pruned weight stores no code: the mask says where it
  is), at each weight's width; weights left uncompressed (``--prune_only``, ``--minlayer`` ...) count 16
  (fp16), and so do the kept weights of a pruned-only layer.
- ``metadata_bpw``: fp16 scales, fp16 zero-points unless the grid is symmetric, the rows' parameter-set
  indices where rows share grids, g_idx where column groups are not contiguous runs, the width indices where
  widths vary, act-order's permutation where no column group carries the order.
- ``mask_bpw``: 1 bit per weight for an unstructured mask, ceil(log2 C(m, n)) bits per m weights for an
  aligned n:m mask, 0 when dense.
- ``bpw`` = the three added, over every decoder linear weight: the one number that compares any two runs,
  sparse or dense, at equal storage. ``bpw_compressed``: the same over the compressed layers only, and
  ``compressed_fraction`` the share of decoder linear weights they hold. ``bits_per_kept_weight``: the
  compressed layers' code bits per kept weight (the mean width of what is stored).
- Embeddings, positions, norms, biases and lm_head stay in the model's dtype and are outside all of these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class LayerBits:
    """One compressed layer: its weights, the kept ones, and the bits of its codes, metadata and mask."""

    weights: int
    kept: int
    code_bits: float
    metadata_bits: float
    mask_bits: float


def index_bits(n: int) -> int:
    """Bits to name one of n things (at least 1)."""
    return math.ceil(math.log2(max(n, 2)))


def summarize(layers: list[LayerBits], total_weights: int | None = None) -> dict:
    """Bits per weight over ``total_weights`` decoder linear weights (default: the compressed ones only),
    of which ``layers`` are the compressed part; the rest count 16 bits each."""
    n = sum(x.weights for x in layers)
    total = max(total_weights if total_weights is not None else n, n)
    if total == 0:
        return {"code_bpw": 16.0, "metadata_bpw": 0.0, "mask_bpw": 0.0, "bpw": 16.0, "bpw_compressed": 16.0,
                "compressed_fraction": 0.0, "bits_per_kept_weight": 16.0}
    codes = sum(x.code_bits for x in layers)
    meta = sum(x.metadata_bits for x in layers)
    mask = sum(x.mask_bits for x in layers)
    kept = sum(x.kept for x in layers)
    code_bpw = (codes + 16.0 * (total - n)) / total
    return {"code_bpw": code_bpw, "metadata_bpw": meta / total, "mask_bpw": mask / total,
            "bpw": code_bpw + (meta + mask) / total, "bpw_compressed": (codes + meta + mask) / n if n else 16.0,
            "compressed_fraction": n / total, "bits_per_kept_weight": codes / kept if kept else 16.0}
