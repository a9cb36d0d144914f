"""``LayerRecord``: what a run reports of one compressed linear, the result JSON's ``layers`` entries.

Torch-free plain values, so the record reads the same in compression (``compress``), the figures
(``outputs``), the dense save's summary (``saving``) and the JSON (``to_json``). The fields are in the JSON's
order; an optional field is left out of the JSON while it is None (``groups`` alone is written as null).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerRecord:
    """One compressed linear: its shape (``channels`` rows, ``in_features`` columns), the weights its mask
    pruned, its code bits and the seconds of each stage; with a plan (``axis`` set) its groups, their sizes,
    widths and NMI, the code bits the allocation charged, and on the input axis each group's share of diag H;
    ``wbits_budget`` under --target-bpw, ``percdamp_used`` where the damping had to be raised, ``level`` with
    --search."""

    name: str
    channels: int
    in_features: int
    groups: int | None  # the plan's K; None without a plan
    pruned: int
    code_bits: float
    timing: dict[str, float]  # mi_s, cluster_s, alloc_s, prune_s (+ total_s with SparseGPT)
    loss: dict[str, float] | None = None  # incurred, obs (+ predicted, by the allocation)
    axis: str | None = None
    labels: list[int] | None = None
    group_sizes: list[int] | None = None
    group_bits: list[int] | None = None
    nmi_intra: list | None = None
    nmi_inter: list | None = None
    charged_code_bits: int | None = None
    h_mass: list[float] | None = None
    wbits_budget: float | None = None
    percdamp_used: float | None = None
    level: dict | None = None  # --search: the level this linear was given (label and fields)

    @property
    def weights(self) -> int:
        return self.channels * self.in_features

    def to_json(self) -> dict:
        """The record as the result JSON holds it."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None or f.name == "groups"}
