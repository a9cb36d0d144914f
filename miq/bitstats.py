"""Bits accounting over the decoder's linear weights.

Conventions (stated in the README and the summary):
- ``avg_weight_bits``: mean bit-width over every decoder linear weight, pruned ones included (dense
  storage); weights left uncompressed (``--prune_only``, ``--minlayer`` ...) or unquantized count 16 (fp16).
- ``metadata_bpw``: per weight, for every parameter set the quantizer stored (one per row, per group with
  shared parameters, and again per column group): an fp16 scale, plus an fp16 zero-point unless the grid is
  symmetric (its zero-point is implied); plus the bit-width table (ceil(log2 |choices|) bits per group)
  and, when channels are grouped by a criterion (not consecutive runs, not one channel a group), every
  grouped channel's group index (ceil(log2 K) bits: per row for row groups, per input column for column
  groups, the g_idx); plus what else a layer stores (``extra_bits``: act-order's permutation).
- ``bpw`` = the two added; ``bpw_compressed`` the same over the compressed layers only, and
  ``compressed_fraction`` the share of decoder linear weights they hold.
- ``mask_bpw``: reported apart: 1 bit per weight for an unstructured mask, ceil(log2 C(m, n)) bits per m
  weights for n:m, 0 when dense.
- Embeddings, positions, norms, biases and lm_head stay fp16 and are outside all of these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class LayerBits:
    weights: int
    weight_bits: float
    metadata_bits: float
    mask_bits: float


def index_bits(n: int) -> int:
    """Bits to name one of n things (at least 1)."""
    return math.ceil(math.log2(max(n, 2)))


@dataclass(frozen=True)
class Stored:
    """What one compressed [rows, cols] layer stores, as the bits account charges it.

    row_bits: each row's width (None = unquantized, 16 bits; a float mean is fine). n_param_sets: (scale, zero)
    sets, 16 bits each with sym (no zero-point) else 32. n_groups: K groups with a width table (None = no
    grouping), each naming one of n_choices widths. indexed: how many channels store a group index (default:
    every row, unless each row is its own group; 0 when the groups are consecutive runs, whose K sizes
    suffice). mask: None, "unstructured" (one bit per weight) or (n, m). extra_bits: anything else stored
    (act-order's permutation).
    """

    rows: int
    cols: int
    row_bits: list[int] | list[float] | None
    n_param_sets: int = 0
    n_groups: int | None = None
    n_choices: int = 1
    mask: str | tuple[int, int] | None = None
    sym: bool = False
    indexed: int | None = None
    extra_bits: float = 0.0


def layer_bits(st: Stored) -> LayerBits:
    """Bits of one layer: its weights' codes, its metadata and its mask, apart."""
    rows, cols, row_bits, n_groups, indexed, mask = st.rows, st.cols, st.row_bits, st.n_groups, st.indexed, st.mask
    weights = rows * cols
    wb = 16.0 * weights if row_bits is None else float(sum(row_bits)) * cols
    meta = (16.0 if st.sym else 32.0) * st.n_param_sets + st.extra_bits
    if n_groups is not None:
        meta += n_groups * index_bits(st.n_choices)
        if indexed is None:
            indexed = rows if n_groups < rows else 0
        meta += indexed * index_bits(n_groups)
    if mask is None:
        mb = 0.0
    elif mask == "unstructured":
        mb = float(weights)
    else:
        n, m = mask
        mb = weights / m * index_bits(math.comb(m, n))
    return LayerBits(weights, wb, meta, mb)


def summarize(layers: list[LayerBits], total_weights: int | None = None) -> dict:
    """Bits per weight over ``total_weights`` decoder linear weights (default: the compressed ones only),
    of which ``layers`` are the compressed part; the rest count 16 bits each."""
    n = sum(x.weights for x in layers)
    total = max(total_weights if total_weights is not None else n, n)
    if total == 0:
        return {"avg_weight_bits": 16.0, "metadata_bpw": 0.0, "bpw": 16.0, "mask_bpw": 0.0,
                "bpw_compressed": 16.0, "compressed_fraction": 0.0}
    wbits = sum(x.weight_bits for x in layers)
    meta = sum(x.metadata_bits for x in layers)
    avg = (wbits + 16.0 * (total - n)) / total
    return {"avg_weight_bits": avg, "metadata_bpw": meta / total, "bpw": avg + meta / total,
            "mask_bpw": sum(x.mask_bits for x in layers) / total,
            "bpw_compressed": (wbits + meta) / n if n else 16.0, "compressed_fraction": n / total}
