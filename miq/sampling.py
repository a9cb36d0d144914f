"""A bounded, reproducible sample of the rows a layer produces (or takes in) during calibration.

The MI method estimates a layer's channel dependencies from its activations, but calibration sees
nsamples x seqlen rows in chunks, one sequence at a time: keeping them all would hold the whole
calibration output of the layer. The sample is drawn up front, so it does not depend on the chunking.
"""

from __future__ import annotations

import torch


class RowSampler:
    """Uniform sample without replacement of ``k`` out of ``total`` rows that arrive in order, in chunks.

    The kept indices are drawn up front from a seeded generator, so the sample is exact, reproducible and
    bounded by ``k`` rows whatever the chunk sizes.
    """

    def __init__(self, total: int, k: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        k = min(k, total)
        self.keep = torch.sort(torch.randperm(total, generator=g)[:k]).values
        self.seen = 0
        self.rows: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        """x [rows, C]: rows numbered seen .. seen + rows - 1."""
        lo, hi = self.seen, self.seen + x.shape[0]
        a, b = torch.searchsorted(self.keep, torch.tensor([lo, hi])).tolist()
        if b > a:
            idx = (self.keep[a:b] - lo).to(x.device)
            self.rows.append(x[idx].detach().float().cpu())
        self.seen = hi

    def samples(self) -> torch.Tensor:
        """[k, C] float32 on CPU."""
        return torch.cat(self.rows) if self.rows else torch.empty(0)
