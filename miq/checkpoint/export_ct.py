"""``--save-format compressed-tensors``: the compressed model in the compressed-tensors library's
``pack-quantized`` format, so that ``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` loads it.

The weights go through the library's own compressor (``PackedQuantizationCompressor.compress``; codes packed
into int32 at their width) from the exact grid each layer used, and every layer is decompressed again
right away and compared with the evaluated weights bit for bit. Scales are stored in float32 (float16 for an
fp16 model): the library dequantizes in the scale's dtype, and only then does ``(q - z) * s`` reproduce
the float32 product the model was evaluated with.

What compressed-tensors 0.20 can express, and so what this exports (anything else is one ConfigError line
that names ``--save-format packed``, raised before anything is written):

- one width per layer (2..8 bits; layers may differ), symmetric or asymmetric, per channel (``channel``) or
  per ``--groupsize`` group: ``group`` when every layer's width is a multiple of the group size, else
  ``block`` [1, groupsize] (a partial last block is padded by the library, exactly like our last group);
- act-order processing (``perm``) with contiguous groups (``actorder: weight``); not a permuted ``g_idx``
  (the library removed ``actorder: group`` and its g_idx);
- not per-row mixed widths (MI-B at a fractional budget), not grids shared by several rows (strategy A);
- no masks: the library's sparse formats (sparse-bitmask, sparse-24-bitmask, marlin-24) are gone in 0.20.
  A pruned weight is exactly the code of zero, so a pruned and quantized layer loads exactly as
  quantized-only; a warning says the mask is not stored. A pruned-only (unquantized) model is refused.

Loading: asymmetric ``channel``/``group`` layers store their zero-points packed, which the library's
compressed-module load path cannot receive (it builds them unpacked, a size mismatch). For those, config.json
asks transformers to decompress at load time (``"dequantize": true``); transformers then applies the first
config group to every layer, so such a model must have a single scheme (one width for all layers).
"""

from __future__ import annotations

import os
import sys

import torch

from miq.checkpoint import packed, stream
from miq.checkpoint.formats import USE_PACKED
from miq.errors import ConfigError
from quant import QuantizedLayer
from sparsegpt_mi import column_groups

FORMAT = "pack-quantized"


def _layer_problem(q: QuantizedLayer, groupsize: int) -> str | None:
    """Why one compressed layer cannot be expressed (one phrase), or None."""
    if q.scale is None:
        return "it is pruned but not quantized"
    if q.row_groups is not None:
        return "rows share grids (strategy A)"
    widths = sorted(set(q.bits().flatten().tolist()))
    if len(widths) > 1:
        return f"its rows mix widths {widths}; compressed-tensors stores one width per layer"
    if not torch.equal(q.g_idx.long(), column_groups(q.weight.shape[1], groupsize)):
        return "its columns are grouped out of order (act-order g_idx, removed in compressed-tensors 0.20)"
    return None


def schemes(layers: list[QuantizedLayer], groupsize: int) -> dict[str, tuple[dict, list[str]]]:
    """{config group name: (QuantizationArgs fields, layer names)}; ConfigError when a layer is not expressible."""
    for q in layers:
        why = _layer_problem(q, groupsize)
        if why is not None:
            raise ConfigError(f"--save-format compressed-tensors: layer {q.name}: {why}; {USE_PACKED}")
    whole = groupsize > 0 and all(q.weight.shape[1] % groupsize == 0 for q in layers)
    out: dict[str, tuple[dict, list[str]]] = {}
    for q in layers:
        args = {"num_bits": int(q.bits()[0, 0]), "type": "int", "symmetric": q.grid.symmetric}
        if groupsize <= 0:
            args["strategy"] = "channel"
        elif whole:
            args.update(strategy="group", group_size=groupsize)
        else:
            args.update(strategy="block", block_structure=[1, groupsize])
        if q.perm is not None:
            args["actorder"] = "weight"
        key = "_".join(f"{k}-{v}" for k, v in sorted(args.items()))
        out.setdefault(key, (args, []))[1].append(q.name)
    decompress = [a for a, _ in out.values() if not a["symmetric"] and a["strategy"] != "block"]
    if decompress and len(out) > 1:
        raise ConfigError("--save-format compressed-tensors: asymmetric layers of different widths; transformers "
                          "loads asymmetric compressed-tensors checkpoints with one scheme for all layers; "
                          f"{USE_PACKED}")
    return {f"group_{i}": v for i, v in enumerate(out.values())}


def write_ct(folder: str, model, tokenizer, layers: list[QuantizedLayer], groupsize: int) -> dict:
    """Write the compressed-tensors checkpoint into ``folder``; returns {"bytes_on_disk", "bpw_on_disk"}:
    the bytes of the compressed linears' tensors (packed codes, scales, zero-points, shapes)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    groups = schemes(layers, groupsize)  # refuses before anything is written
    if any(q.mask is not None for q in layers):
        print("warning: --save-format compressed-tensors: the pruning masks are not stored (compressed-tensors "
              "0.20 has no sparse format); pruned weights load exactly as the code of zero. --save-format packed "
              "stores them", file=sys.stderr)
    compressor = BaseCompressor.get_value_from_registry(FORMAT)
    scheme_of, config_groups = {}, {}
    for gname, (args, names) in groups.items():
        scheme = QuantizationScheme(targets=names, weights=QuantizationArgs(**args), format=FORMAT)
        config_groups[gname] = scheme
        scheme_of.update(dict.fromkeys(names, scheme))
    specs, get, _ = packed.dense_tensors(model, {f"{q.name}.weight" for q in layers})
    spill, nbytes = stream.Spill("miq-ct-"), 0
    try:  # layer by layer into temporary files, then every tensor streamed into the one file: one layer held
        for q in layers:
            tensors = _compress_layer(q, scheme_of[q.name], compressor, model.dtype)
            nbytes += sum(t.numel() * t.element_size() for t in tensors.values())
            spill.put({f"{q.name}.{k}": v for k, v in tensors.items()})
        stream.save(os.path.join(folder, "model.safetensors"), {**specs, **spill.specs},
                    lambda n: spill.get(n) if n in spill.specs else get(n), metadata={"format": "pt"})
    finally:
        spill.close()
    model.config.save_pretrained(folder)
    qconfig = QuantizationConfig(config_groups=config_groups, format=FORMAT, quantization_status="compressed",
                                 ignore=["lm_head"])
    ModelCompressor(quantization_config=qconfig).update_config(folder)
    if any(not a["symmetric"] and a["strategy"] != "block" for a, _ in groups.values()):
        _ask_dequantize_on_load(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    weights = sum(q.weight.numel() for q in layers)
    return {"bytes_on_disk": nbytes, "bpw_on_disk": 8 * nbytes / weights if weights else None}


class SpilledLayers:
    """The compressed linears as compression produces them (``append``, as a list takes them), kept in
    temporary files and read back one at a time on each iteration: what this writer needs of every layer (its
    exact float32 weights and grid) without holding every layer's float32 copy until the end of the run."""

    PARTS = ("weight", "mask", "scale", "zero", "maxq", "g_idx", "perm", "row_groups")

    def __init__(self) -> None:
        self.spill = stream.Spill("miq-ct-layers-")
        self.kept: list[tuple[str, bool, tuple[str, ...]]] = []  # (name, sym, parts present) per layer

    def append(self, q: QuantizedLayer) -> None:
        parts = {p: getattr(q, p) for p in self.PARTS if getattr(q, p) is not None}
        self.spill.put({f"{len(self.kept)}.{p}": t for p, t in parts.items()})
        self.kept.append((q.name, q.sym, tuple(parts)))

    def __len__(self) -> int:
        return len(self.kept)

    def __iter__(self):
        for i, (name, sym, parts) in enumerate(self.kept):
            t = {p: self.spill.get(f"{i}.{p}") if p in parts else None for p in self.PARTS}
            yield QuantizedLayer(name, sym=sym, **t)


def _compress_layer(q: QuantizedLayer, scheme, compressor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The library's compressed tensors of one layer, checked to decompress to its weights bit for bit."""
    half = 2 ** (int(q.bits()[0, 0]) - 1)  # the library's codes are signed: q - 2^(b-1)
    scale_dtype = torch.float16 if dtype == torch.float16 else torch.float32
    local = {"weight": q.weight.float(), "weight_scale": q.scale.to(scale_dtype),
             "weight_zero_point": (q.zero - half).round().to(torch.int8)}
    out = compressor.compress(local, scheme)
    back = compressor.decompress(out, scheme)["weight"].to(dtype)
    if not torch.equal(back, q.weight.to(dtype)):
        raise RuntimeError(f"compressed-tensors does not reproduce layer {q.name} exactly "
                           f"(max difference {float((back.float() - q.weight.float()).abs().max()):g})")
    return out


def _ask_dequantize_on_load(folder: str) -> None:
    """Set ``quantization_config.dequantize`` in config.json (see the module docstring for why)."""
    import json

    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["quantization_config"]["dequantize"] = True
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
