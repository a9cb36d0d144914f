"""Bits accounting over the compressed decoder linear weights.

Conventions (stated in the README and the summary):
- ``avg_weight_bits``: mean bit-width over all compressed weights, pruned ones included (dense storage).
  Unquantized layers count 16 (fp16).
- ``metadata_bpw``: per weight, fp16 scale + fp16 zero (32 bits) for every parameter set the quantizer
  produced (one per row, per group with shared parameters, and again for every ``--groupsize`` columns),
  plus the bit-width table (ceil(log2 |choices|) bits per group) and the group index of every channel
  (ceil(log2 K) bits) when the MI method groups rows.
- ``mask_bpw``: reported apart: 1 bit per weight for an unstructured mask, ceil(log2 C(m, n)) bits per m
  weights for n:m, 0 when dense.
- Embeddings, positions, layer norms, biases and lm_head stay fp16 and are not counted.
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


def layer_bits(
    rows: int,
    cols: int,
    row_bits: list[int] | None,
    n_param_sets: int,
    n_groups: int | None,
    n_choices: int,
    mask: str | tuple[int, int] | None,
) -> LayerBits:
    """Bits of one [rows, cols] layer. row_bits None = unquantized (16 bits); n_groups None = no grouping."""
    weights = rows * cols
    wb = 16.0 * weights if row_bits is None else float(sum(row_bits)) * cols
    meta = 32.0 * n_param_sets
    if n_groups is not None:
        table_entries = n_groups
        meta += table_entries * math.ceil(math.log2(max(n_choices, 2)))
        if n_groups < rows:
            meta += rows * math.ceil(math.log2(max(n_groups, 2)))
    if mask is None:
        mb = 0.0
    elif mask == "unstructured":
        mb = float(weights)
    else:
        n, m = mask
        mb = weights / m * math.ceil(math.log2(math.comb(m, n)))
    return LayerBits(weights, wb, meta, mb)


def summarize(layers: list[LayerBits]) -> dict:
    """{"avg_weight_bits", "metadata_bpw", "bpw", "mask_bpw"} over all layers."""
    n = sum(x.weights for x in layers)
    if n == 0:
        return {"avg_weight_bits": 16.0, "metadata_bpw": 0.0, "bpw": 16.0, "mask_bpw": 0.0}
    avg = sum(x.weight_bits for x in layers) / n
    meta = sum(x.metadata_bits for x in layers) / n
    return {"avg_weight_bits": avg, "metadata_bpw": meta, "bpw": avg + meta,
            "mask_bpw": sum(x.mask_bits for x in layers) / n}
