"""``--save DIR``: the compressed model in one of three formats, written whole or not at all.

- ``packed`` (default, ``miq/checkpoint/packed.py``): the integer codes at their widths, fp16 scales and
  zero-points, masks as bits, everything else in the evaluated dtype; reloads bit-exactly
  (``packed.load_compressed``, or ``opt_mi.py DIR ...``), and its size is the run's ``bits.bytes_on_disk``.
- ``compressed-tensors`` (``miq/checkpoint/export_ct.py``): the ``pack-quantized`` format of the
  compressed-tensors library, which ``transformers.AutoModelForCausalLM.from_pretrained`` loads; only what
  that format can express.
- ``dense``: ``save_pretrained`` of the fake-quantized weights + tokenizer + a ``quantization.json`` summary
  (groups and bits per layer, no grids): plain HF weights, no smaller than the original model.

``save`` builds the folder beside DIR and renames it into place; ``write`` fills a given folder (for callers
that stage all outputs themselves).

Saving holds one layer, not the model, for ``packed`` and ``compressed-tensors`` (with --load layers as with
--load whole): each compressed linear goes to a temporary file as compression produces it (``sink``: packed,
encoded at once; compressed-tensors, its exact weights and grid), and the writers stream every tensor into
their files one at a time (``miq/checkpoint/stream.py``): the embeddings, head, norms and biases read from
the checkpoint (or the compressed layers' temporary files) when their turn comes. ``dense`` is
``save_pretrained``, which takes the whole model: a model loaded layer by layer is read back into memory
first.
"""

from __future__ import annotations

import json
import os

from safetensors import SafetensorError

from miq.checkpoint import export_ct, formats, packed
from miq.model import onload
from miq.run import search_flags
from miq.run.compress import CompressionResult
from miq.run.config import RunConfig
from miq.run.records import LayerRecord
from miq.staging import Staging

# what writing a saved model may raise when the disk is full or a folder goes away: the OS's error, and
# safetensors' own (its writer is Rust: an I/O error reaches Python as SafetensorError, not OSError)
WRITE_ERRORS = (OSError, SafetensorError)


def why(e: BaseException) -> str:
    """A write error in a few words: the OS's reason (``No space left on device``), else its first line."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def save(model, tokenizer, res: CompressionResult, cfg: RunConfig, out: str) -> dict | None:
    """Write the model to ``out`` in ``cfg.save_format``, staged beside it and renamed into place (no
    half-written model on failure). Returns the on-disk sizes ({"bytes_on_disk", "bpw_on_disk"}) or None."""
    with Staging() as stage:
        return write(stage.folder(out), model, tokenizer, res, cfg)


def save_nm(cfg: RunConfig) -> tuple[int, int] | None:
    """The n:m pattern the packed format encodes masks with: the run's, or the one a search's levels hold."""
    if cfg.nm or not cfg.search:
        return cfg.nm
    return next((lv.nm for lv in search_flags.levels(cfg) if lv.nm), None)


def sink(model, cfg: RunConfig) -> list:
    """What compression appends each compressed linear to (``compress.compress``'s ``saved``): for the packed
    format a ``packed.PackedLayers``, which encodes each layer as it comes, so that a run holds the packed
    bits (a few per weight) rather than a float32 copy of every compressed weight until the end; the other
    formats need the layers themselves (a list)."""
    if cfg.save and cfg.save_format == "packed":
        return packed.PackedLayers(model.dtype, save_nm(cfg))
    if cfg.save and cfg.save_format == "compressed-tensors":
        return export_ct.SpilledLayers()
    return []


def write(folder: str, model, tokenizer, res: CompressionResult, cfg: RunConfig) -> dict | None:
    """Fill the existing, empty ``folder`` with the model in ``cfg.save_format``, then the marker that says this
    toolkit saved it (so that a later --save may replace it) with every file's sha256 (checked on loading);
    see ``save``."""
    disk = None
    if cfg.save_format == "dense" and onload.of(model) is not None:
        # save_pretrained takes the whole model: read back (the compressed layers from their temporary files)
        onload.of(model).materialize()
    if cfg.save_format == "packed":
        disk = packed.write_packed(folder, model, tokenizer, res.saved, nm=save_nm(cfg), run=cfg.as_dict())
    elif cfg.save_format == "compressed-tensors":
        disk = export_ct.write_ct(folder, model, tokenizer, res.saved, cfg.groupsize)
    else:
        write_dense(folder, model, tokenizer, res, cfg)
    with open(os.path.join(folder, formats.MARKER), "w", encoding="utf-8") as f:
        f.write(formats.marker(cfg.save_format, folder))
    return disk


def write_dense(folder: str, model, tokenizer, res: CompressionResult, cfg: RunConfig) -> None:
    """save_pretrained (safetensors) of the fake-quantized weights + tokenizer + quantization.json."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    bits = None if not cfg.quantizing else int(cfg.wbits)
    qinfo = {"format": "dense", "wbits": cfg.wbits, "strategy": cfg.strategy, "groupsize": cfg.groupsize,
             "layers": {r.name: _dense_layer(r, bits) for r in res.layers}}
    with open(os.path.join(folder, "quantization.json"), "w", encoding="utf-8") as f:
        json.dump(qinfo, f, indent=1, allow_nan=False)


def _dense_layer(r: LayerRecord, bits: int | None) -> dict:
    """One layer's entry in a dense save's quantization.json: its groups' widths, or its width (a searched
    run's own level, with the level itself)."""
    if r.level is not None:
        return {"labels": None, "group_bits": None, "bits": r.level["wbits"], "level": r.level}
    return {"labels": r.labels, "group_bits": r.group_bits, "bits": None if r.group_bits is not None else bits}
