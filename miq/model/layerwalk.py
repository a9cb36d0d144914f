"""Walk a decoder-only model layer by layer, so that a model larger than the accelerator can be compressed and
evaluated one decoder layer at a time (as IST-DASLab/sparsegpt's ``opt_sequential`` and ``opt_eval``). The
same code walks every family in ``layouts.py`` (OPT, Llama, Mistral, Qwen2/3); the layout only says where
the decoder layers, the embeddings and the head are.

The first decoder layer's inputs are captured together with *every* keyword argument the model passes to
each decoder layer (attention mask, position ids, rotary position embeddings, ... whatever the installed
transformers sends). Replaying exactly those keeps attention causal: transformers 5 passes
``attention_mask=None`` to SDPA layers and relies on the layer's ``is_causal``, while eager attention gets an
explicit 4-D mask; a walker that rebuilds the mask itself gets one of the two wrong. They are captured per
layer because layers may differ: a Qwen2 with sliding-window layers gives those another mask than layer 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

from miq.model import layouts, onload

Visit = Callable[[int, nn.Module, torch.Tensor], bool]  # True when it changed the layer's weights
LayerKwargs = list[dict]  # the keyword arguments of each decoder layer, as the model passed them
LOGITS_BUDGET = 2**23  # logits per head call in evaluation (32 MB of float32): see window_losses


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return layouts.of(model).decoder_layers(model)


def find_linears(module: nn.Module, prefix: str = "") -> dict[str, nn.Linear]:
    """All nn.Linear inside ``module``, keyed by dotted path (prefixed)."""
    return {f"{prefix}{n}": m for n, m in module.named_modules() if isinstance(m, nn.Linear)}


class _Stop(Exception):
    pass


class _Capture:
    """What the stand-ins record: layer 0's input per window, and each layer's arguments (first window only)."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.inputs: list[torch.Tensor] = []
        self.calls: list[tuple[tuple, dict]] = []

    @property
    def complete(self) -> bool:
        return len(self.calls) == self.n_layers


class _StandIn(nn.Module):
    """Stands in for one decoder layer during capture and passes its input through unchanged.

    Layer 0's stand-in records the window's hidden states. On the first window every stand-in records the
    arguments the model passed it, and the last one stops the forward (before the head, whose logits are the
    largest tensor of all); on later windows layer 0's stand-in stops it, as their arguments are the same.
    """

    def __init__(self, layer: nn.Module, index: int, capture: _Capture):
        super().__init__()
        self.layer = layer
        self.index = index
        self.capture = capture

    def forward(self, hidden_states, *args, **kwargs):
        c = self.capture
        if self.index == 0:
            c.inputs.append(hidden_states)
        if c.complete:
            raise _Stop
        c.calls.append((args, kwargs))
        if c.complete:
            raise _Stop
        return hidden_states


def _replayable(args: tuple, kwargs: dict) -> dict:
    """A layer's captured arguments without the KV cache (the walk runs without one)."""
    if args:
        raise RuntimeError(f"decoder layer got {len(args)} unexpected positional arguments")
    kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "use_cache")}
    kwargs["use_cache"] = False
    return kwargs


@torch.no_grad()
def capture_inputs(model: nn.Module, windows: torch.Tensor, dev: torch.device) -> tuple[torch.Tensor, LayerKwargs]:
    """Run the embeddings on ``windows`` [n, seqlen] (token ids) and return layer 0's inputs.

    Returns (inps [n, seqlen, hidden] in the model's dtype on ``dev``, each layer's kwargs). Windows go
    through one at a time, as in the reference, so every kwarg is that of a batch of one and valid for each
    window. Kwargs tensors (masks, rotary cos/sin) are shared between layers, not copied.
    """
    layout = layouts.of(model)
    layers = layout.decoder_layers(model)
    capture = _Capture(len(layers))
    originals = list(layers)
    with onload.modules(model, layout.embedding_modules(model)):  # read here when loading layer by layer
        for m in layout.embedding_modules(model):
            m.to(dev)
        for i, layer in enumerate(originals):
            layers[i] = _StandIn(layer, i, capture)
        try:
            for j in range(windows.shape[0]):
                try:
                    model(windows[j : j + 1].to(dev), use_cache=False)
                except _Stop:
                    pass
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer
            if dev.type != "cpu":
                for m in layout.embedding_modules(model):
                    m.cpu()
    return torch.cat(capture.inputs, dim=0), [_replayable(args, kwargs) for args, kwargs in capture.calls]


@torch.no_grad()
def walk(
    model: nn.Module,
    inps: torch.Tensor,
    layer_kwargs: LayerKwargs,
    dev: torch.device,
    visit: Visit | None = None,
    desc: str = "layers",
    batch: int = 1,
) -> torch.Tensor:
    """Feed ``inps`` [n, seqlen, hidden] through every decoder layer; return the last layer's outputs.

    For each layer: move it to ``dev``, call ``visit(index, layer, inps)`` (compression hooks in here and may
    change the layer's weights), then compute the layer's outputs on ``inps`` *after* the visit, so each layer
    is compressed from the already compressed model's activations, and move the layer back. ``batch``
    windows go through a layer per call: the captured kwargs (mask, positions, rotary cos/sin) have batch
    size one and broadcast, so the result is the same up to float summation order.

    The outputs overwrite ``inps`` batch by batch (windows are independent, and a batch is read before it is
    written): one activation buffer instead of two, which for evaluation is the one term of host memory that
    grows with the evaluation text. The returned tensor is ``inps``.

    A model loaded layer by layer (``onload``) has each layer read when its turn comes and released after;
    a layer the visit changed (compressed) is kept in the Store first, where evaluation reads it.
    """
    layers = decoder_layers(model)
    for i in tqdm(range(len(layers)), desc=desc, leave=False, disable=None):
        with onload.layer(model, i) as held:
            layer = layers[i].to(dev)
            if visit is not None:
                held.keep = visit(i, layer, inps)
            for j in range(0, inps.shape[0], batch):
                inps[j : j + batch] = layer(inps[j : j + batch], **layer_kwargs[i])
            if dev.type != "cpu":
                layers[i] = layer.cpu()
                torch.cuda.empty_cache()
    return inps


def run_layer(layer: nn.Module, inps: torch.Tensor, kwargs: dict) -> None:
    """Forward every sample through ``layer`` for its hooks' sake (outputs discarded)."""
    for j in range(inps.shape[0]):
        layer(inps[j : j + 1], **kwargs)


@torch.no_grad()
def window_losses(model: nn.Module, hidden: torch.Tensor, windows: torch.Tensor, dev: torch.device,
                  logits_budget: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of each window [n] from the last layer's outputs [n, seqlen, hidden].

    Positions go through the head in slices of at most ``logits_budget`` logits (``LOGITS_BUDGET``; float32, and
    cross-entropy's log-softmax of the same size beside them), across window boundaries: a 50k vocabulary
    makes logits the largest tensor of evaluation, and a slice bounds them whatever the length of the text,
    the window or the vocabulary (one window of 2048 tokens over 128k tokens is 1 GB of logits). Every
    position's loss is its own, so slicing changes no loss beyond the head's float summation order.
    """
    heads = layouts.of(model).head_modules(model)
    n, seqlen = windows.shape
    positions = n * (seqlen - 1)  # every position but a window's last predicts the next token
    step = max(1, (logits_budget or LOGITS_BUDGET) // heads[-1].out_features)
    flat = hidden.reshape(n * seqlen, hidden.shape[-1])
    targets = windows[:, 1:].reshape(-1)
    nll = torch.empty(positions)
    with onload.modules(model, heads):  # read here when loading layer by layer
        for m in heads:
            m.to(dev)
        for j in range(0, positions, step):
            at = torch.arange(j, min(j + step, positions))
            rows = at // (seqlen - 1) * seqlen + at % (seqlen - 1)  # the hidden rows of those positions
            h = flat[rows.to(flat.device)].to(dev)
            for m in heads[:-1]:  # final norm (and OPT's project_out)
                h = m(h)
            logits = heads[-1](h).float()
            nll[at] = nn.functional.cross_entropy(logits, targets[at].to(dev), reduction="none").cpu()
            del logits, h  # before the next slice's are made
        if dev.type != "cpu":
            for m in heads:
                m.cpu()
    return nll.view(n, seqlen - 1).double().mean(1)


def eval_windows(tokens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Non-overlapping windows [n, seqlen] of the stream tokens [1, T]; the remainder is dropped."""
    n = tokens.shape[1] // seqlen
    return tokens[0, : n * seqlen].reshape(n, seqlen)


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, seqlen: int, dev: torch.device, desc: str = "eval",
               batch: int = 8) -> float:
    """exp(mean window loss) over non-overlapping windows, computed layer by layer (reference ``opt_eval``)."""
    windows = eval_windows(tokens, seqlen)
    inps, layer_kwargs = capture_inputs(model, windows, dev)
    hidden = walk(model, inps, layer_kwargs, dev, desc=desc, batch=batch)
    return float(torch.exp(window_losses(model, hidden, windows, dev).mean()))


@torch.no_grad()
def full_forward_perplexity(model: nn.Module, tokens: torch.Tensor, seqlen: int, dev: torch.device,
                            batch: int = 1) -> float:
    """The same perplexity from the model's own full forward pass: the check on the layer walker."""
    windows = eval_windows(tokens, seqlen)
    model.to(dev)
    losses = []
    for j in range(0, windows.shape[0], batch):
        w = windows[j : j + batch].to(dev)
        # windows are equally long, so the batch's mean token loss is the mean of its window losses
        losses.append(model(w, labels=w, use_cache=False).loss.double().cpu() * len(w))
    return float(torch.exp(torch.stack(losses).sum() / windows.shape[0]))
