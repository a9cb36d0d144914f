"""The search's fitness: KL divergence of the stitched model's next-token distribution from the dense model's.

The stitched model is the dense model with each compressed linear's weight replaced by its level's weight
from the level database (``db.weight(i, config[i])``); everything else stays dense. Weights are swapped by
copying into the module's own weight tensor, one decoder layer at a time, and the dense values copied back
after that layer ran, so the model is never duplicated and is dense again between calls.

Why the prefix cache: a mutant differs from its parent in a few linears, so every decoder layer before its
first changed one computes exactly what it computed for the parent. ``StitchedKL`` keeps the hidden states
entering every decoder layer for one configuration, the *anchor* (the search's parent: ``anchor`` is given to
``evo.evolve`` as ``on_parent``), and scores a candidate by running only the layers from its first change on,
from the anchor's states there. What it saves is bounded by where mutants change first: a mutation switches
one to three linears and its budget repair cheapens others anywhere in the model, so the first change falls
early, and the head and the KL are paid per candidate either way (bench/bench_search.py, one generation of 16
mutants on an OPT-125m-shaped model: 171 instead of 252 decoder-layer forwards, 1.34x faster).

Memory (say it before choosing windows): the dense log-probabilities are kept whole for exact KL, n_windows x
seqlen x vocab float32 (OPT's 50272 vocabulary at 2048 tokens: 412 MB a window), and the anchor's hidden
states are n_windows x seqlen x hidden x (layers + 1) in the model's dtype (OPT-125m, 32 windows of 2048:
2.6 GB in float32). Both live on ``store`` (default: the compute device).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from miq.model import layerwalk, layouts, onload


@contextlib.contextmanager
def _resident(modules: Sequence[nn.Module], dev: torch.device) -> Iterator[None]:
    """``modules`` on ``dev`` for the block, each back where it was after (a model kept whole on the
    accelerator is never moved; one kept on the host lends a layer at a time, as ``layerwalk.walk`` does)."""
    homes = [next(m.parameters(), torch.empty(0)).device for m in modules]
    for m in modules:
        m.to(dev)
    try:
        yield
    finally:
        for m, home in zip(modules, homes, strict=True):
            if home != dev:
                m.to(home)


class StitchedKL:
    """Mean per-token KL(dense || stitched) over the first n calibration windows, for a configuration of levels.

    model: the dense model (any family of ``layouts``; loaded whole or layer by layer). windows [n, seqlen]:
    token ids, held apart from the database's calibration by the caller. db: the level database (``names`` in
    walk order as state-dict module paths, ``weight(i, level)`` a [rows, cols] tensor). dev: where layers run.
    batch: windows per decoder-layer call (kept fixed so a candidate and a fresh computation agree to float
    rounding). store: where the dense log-probabilities and the cached states live (default ``dev``).
    logits_budget: most float32 logits held at once in the head.

    ``layers_run`` counts the decoder-layer forwards made (each over all the windows scored), so tests and
    benches can see the prefix cache at work.
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, db, dev: torch.device, *, batch: int = 8,
                 store: torch.device | None = None, logits_budget: int = 2**27):
        self.model, self.db, self.dev = model, db, dev
        self.windows = windows
        self.batch = batch
        self.store = store if store is not None else dev
        self.logits_budget = logits_budget
        layout = layouts.of(model)
        self.layers = layout.decoder_layers(model)
        self.heads = layout.head_modules(model)
        self.linear_layer = [_layer_index(layout, name) for name in db.names]
        self.by_layer: list[list[int]] = [[] for _ in self.layers]
        for i, k in enumerate(self.linear_layer):
            self.by_layer[k].append(i)
        self.layers_run = 0
        inps, self.kwargs = layerwalk.capture_inputs(model, windows, dev)
        # states[k]: the anchor's hidden states entering decoder layer k (states[L]: the last layer's output);
        # states[0] is the embeddings' output, the same for every configuration
        self.states: list[torch.Tensor | None] = [inps.to(self.store)] + [None] * len(self.layers)
        self.anchored: tuple[int, ...] | None = None
        self.dense = self._log_probs_dense(self._forward(None, 0, self.n_windows, keep=False))

    @property
    def n_windows(self) -> int:
        return self.windows.shape[0]

    def __call__(self, config: Sequence[int], n_windows: int | None = None) -> float:
        """The KL of ``config`` (one level per ``db.names`` entry) on the first ``n_windows`` windows (all by
        default). The first call anchors the cache on its configuration; later ones start from the anchor's
        states at the first decoder layer holding a linear whose level differs."""
        config = self._checked(config)
        n = self.n_windows if n_windows is None else int(n_windows)
        if not 1 <= n <= self.n_windows:
            raise ValueError(f"n_windows {n} outside 1..{self.n_windows}")
        if self.anchored is None:
            self.anchor(config)
        first = self.first_change(config)
        hidden = self._forward(config, first, n, keep=False)
        return self._kl(hidden, n)

    def anchor(self, config: Sequence[int]) -> None:
        """Make ``config`` the cached one: recompute (on every window) the states from its first difference with
        the current anchor on, and keep them."""
        config = self._checked(config)
        first = 0 if self.anchored is None else self.first_change(config)
        self._forward(config, first, self.n_windows, keep=True)
        self.anchored = config

    def first_change(self, config: Sequence[int]) -> int:
        """The first decoder layer that holds a linear whose level differs from the anchor's (the number of
        layers when none does: only the head runs)."""
        changed = [self.linear_layer[i] for i, (a, b) in enumerate(zip(config, self.anchored, strict=True)) if a != b]
        return min(changed, default=len(self.layers))

    def _checked(self, config: Sequence[int]) -> tuple[int, ...]:
        config = tuple(int(lv) for lv in config)
        if len(config) != len(self.linear_layer):
            raise ValueError(f"configuration has {len(config)} levels for {len(self.linear_layer)} linears")
        return config

    @contextlib.contextmanager
    def _swapped(self, k: int, config: tuple[int, ...] | None) -> Iterator[None]:
        """Layer k's compressed linears at their levels of ``config`` for the block (None: dense), dense after."""
        saved = []
        try:
            for i in self.by_layer[k] if config is not None else ():
                weight = self.model.get_submodule(self.db.names[i]).weight
                saved.append((weight, weight.detach().clone()))
                weight.data.copy_(self.db.weight(i, config[i]).to(device=weight.device, dtype=weight.dtype))
            yield
        finally:
            for weight, dense in saved:
                weight.data.copy_(dense)

    @torch.no_grad()
    def _forward(self, config: tuple[int, ...] | None, first: int, n: int, keep: bool) -> torch.Tensor:
        """The last layer's output [n, seqlen, hidden] for ``config``, running layers ``first``.. from the
        anchor's states; ``keep``: store every layer's output as the new anchor's states."""
        if first == len(self.layers):
            return self.states[first][:n].to(self.dev)
        h = self.states[first][:n].to(self.dev)
        for k in range(first, len(self.layers)):
            out = torch.empty_like(h)
            with onload.layer(self.model, k), _resident([self.layers[k]], self.dev), self._swapped(k, config):
                for j in range(0, n, self.batch):
                    out[j : j + self.batch] = self.layers[k](h[j : j + self.batch], **self.kwargs[k])
            self.layers_run += 1
            h = out
            if keep:
                self.states[k + 1] = h.to(self.store, copy=True)
        return h

    def _chunks(self, hidden: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(first window, log-probabilities [chunk, seqlen, vocab] float32) through the final norm and head, a
        chunk of windows at a time within ``logits_budget``."""
        n, seqlen = hidden.shape[:2]
        chunk = max(1, self.logits_budget // (seqlen * self.heads[-1].out_features))
        with onload.modules(self.model, self.heads), _resident(self.heads, self.dev):
            for j in range(0, n, chunk):
                h = hidden[j : j + chunk]
                for m in self.heads:
                    h = m(h)
                yield j, torch.log_softmax(h.float(), dim=-1)

    @torch.no_grad()
    def _log_probs_dense(self, hidden: torch.Tensor) -> torch.Tensor:
        out = None
        for j, logp in self._chunks(hidden):
            if out is None:
                out = torch.empty((hidden.shape[0], *logp.shape[1:]), dtype=torch.float32, device=self.store)
            out[j : j + len(logp)] = logp.to(self.store)
        return out

    @torch.no_grad()
    def _kl(self, hidden: torch.Tensor, n: int) -> float:
        total = 0.0
        for j, logp in self._chunks(hidden):
            dense = self.dense[j : j + len(logp)].to(self.dev)
            # per token in float32 (over the vocabulary), summed over tokens in float64
            per_token = nn.functional.kl_div(logp, dense, reduction="none", log_target=True).sum(-1)
            total += float(per_token.double().sum())
        return total / (n * self.windows.shape[1])


def _layer_index(layout: layouts.Layout, name: str) -> int:
    """The decoder layer holding linear ``name`` (a state-dict module path such as
    "model.decoder.layers.3.fc1"); ValueError for a module outside the decoder layers."""
    prefix = layout.layers + "."
    head, _, _ = name.removeprefix(prefix).partition(".")
    if not name.startswith(prefix) or not head.isdigit():
        raise ValueError(f"db name {name!r} is not a linear inside {layout.layers}")
    return int(head)
