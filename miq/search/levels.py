"""The level database of a search (``LevelDB``): every compressed decoder linear at every level of the grid, on
disk, and what the search reads of it (bits, losses, and a level's weight, decoded).

``build.py`` fills it (from the dense model's inputs, by the run's own pass); one folder per database, one
safetensors file per linear holding every level in the packed format's own encoding
(``packed_layer.encode``; float32 for an unquantized level's kept values), so a level decodes to the exact
float32 weight and the disk holds about the levels' stored bits, plus ``index.json`` (names, levels, bits,
losses), written last: a folder without it is no database.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

from miq.checkpoint import packed_layer
from miq.options import Level

INDEX = "index.json"


@dataclass
class LevelDB:
    """The database: ``names`` (compressed decoder linears, walk order), the grid ``levels`` (the same for every
    linear), per [linear][level] the stored ``bits`` and the pass's output ``loss`` on the dense inputs
    (layer_error summed: what the knapsack minimises), ``numel`` per linear, and the folder holding the
    weights (``weight``)."""

    names: list[str]
    levels: list[Level]
    bits: list[list[int]]
    loss: list[list[float]]
    numel: list[int]
    folder: str
    build_s: float = 0.0  # seconds this database took to build (0 when reused from the cache)
    reused: bool = False
    _manifests: dict = field(default_factory=dict, repr=False, compare=False)

    def weight(self, linear: int, level: int) -> torch.Tensor:
        """The compressed weight [rows, cols] float32 of ``linear`` at ``level``, decoded from disk (only that
        level's streams are read: a search reads many levels of large linears)."""
        entry = self._entries(linear)[level]
        with safe_open(os.path.join(self.folder, file_of(linear)), framework="pt") as f:
            return packed_layer.decode(f"{level}", entry, lambda part: f.get_tensor(f"{level}.{part}"), torch.float32)

    def _entries(self, linear: int) -> list[dict]:
        """The linear's manifest entries, one per level (read once, kept: they are small)."""
        if linear not in self._manifests:
            with open(os.path.join(self.folder, file_of(linear) + ".json"), encoding="utf-8") as f:
                self._manifests[linear] = json.load(f)
        return self._manifests[linear]

    def size_bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.folder, f)) for f in os.listdir(self.folder))


def file_of(linear: int) -> str:
    """The file holding one linear's levels (its manifest entries beside it, ``+ ".json"``)."""
    return f"linear{linear:05d}.safetensors"


def load(folder: str) -> LevelDB | None:
    """The database in ``folder``, or None when there is none (an unfinished build is never there)."""
    try:
        with open(os.path.join(folder, INDEX), encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    return LevelDB(d["names"], [Level(**lv) for lv in d["levels"]], d["bits"], d["loss"], d["numel"], folder,
                   reused=True)
