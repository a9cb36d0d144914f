"""The packed compressed-model format ("miq-packed", version 3): the bits the toolkit reports, on disk, and a
loader that rebuilds the evaluated model bit for bit.

A folder written by ``opt_mi.py ... --save DIR`` (``--save-format packed``, the default) holds:

- ``config.json``, ``generation_config.json`` and the tokenizer files, as ``save_pretrained`` writes them;
- ``dense.safetensors``: every state-dict tensor that is not a compressed linear's weight (embeddings,
  positions, norms, all biases, ``lm_head`` unless tied to the embeddings, decoder linears left
  uncompressed), in the dtype the model was evaluated in (float32 on CPU, fp16 when the run used fp16), so
  that the reload is exact; tied tensors once (the manifest's ``tied`` maps alias -> source);
- ``packed.safetensors``: the compressed decoder linears, as below. Its tensor bytes are the run's
  ``bits.bytes_on_disk``;
- ``quantization.json``: the manifest.

A compressed linear L with weight W [R, C] stores these tensors, named ``<L>.<part>``. Integer arrays are bit
streams (``packbits.py``: width w, ceil(N w / 8) bytes, value k at bits k*w.., least significant bit first):

- parameter sets: P sets of grids per column group. Without shared grids P = R and row r uses set r; with
  rows sharing grids (strategy A) P = K and ``row_groups`` is the stream of every row's set s(r) at
  ceil(log2 K) bits;
- column groups: G groups; contiguous runs of ``groupsize`` columns, g(c) = c // groupsize (the last may be
  shorter), or ``g_idx``, the stream of g(c) per column at ceil(log2 G) bits (input-axis groups, act-order).
  ``perm``, for act-order layers without column groups, is the stream of the order the columns were
  processed in, at ceil(log2 C) bits (decoding does not need it; bits accounting charges it). Version 1
  stored both as int32 [C]; its folders still load;
- widths b[p, g] in 1..8: the manifest's ``widths.table`` (sorted distinct widths) and ``widths.layout``:
  ``uniform`` (the table's one width), ``per_set`` (``widths``: P indices into the table, at
  ceil(log2 |table|) bits), ``per_group`` (G indices: column groups whose width every row shares, as
  input-axis groups) or ``per_set_group`` (P*G indices, row-major [P, G]);
- ``scale`` float16 [P, G]; ``zero`` float16 [P, G] integer zero-points, for asymmetric grids only (a
  symmetric grid's zero-point is 2^(b-1) = (maxq + 1) / 2: not stored);
- codes: with w(r, c) = b[s(r), g(c)], for each width w of the table ``codes.w<w>`` is the stream of the codes
  q(r, c) in [0, 2^w - 1] of the kept positions whose width is w, in row-major order (r, then c: the order
  the mask enumerates kept weights); the manifest's ``codes`` counts them and ``codes_of`` is ``"kept"``. A
  pruned weight stores no code: it decodes to 0. Version 2 stored every weight's code (a pruned one as the
  zero-point; ``codes_of`` absent); its folders still load;
- W[r, c] = scale[s(r), g(c)] * (q(r, c) - zero[s(r), g(c)]) in float32, cast to the model dtype;
- the mask (True = pruned), when pruned: ``mask``, the R*C stream of 1 bit, or for an aligned n:m mask
  ``nm_index``, one index per group of m columns into the n-subsets of range(m) (``packbits``). The loader
  checks that pruned weights decode to 0;
- a pruned-only (unquantized) layer stores ``values``: its kept weights in row-major order, model dtype.

The manifest: ``{"format": "miq-packed", "version": 3, "dtype", "files", "tied", "bit_order", "run" (the
run's flags), "weights", "bytes_on_disk", "layers": {L: {"shape": [R, C], "quantized", "sym", "sets",
"row_groups", "columns": {"groups", "groupsize" | "g_idx"}, "widths", "codes": {w: count}, "codes_of", "mask": null |
{"kind": "bitmask"} | {"kind": "n:m", "n", "m", "index_bits"}, "perm", "tensors": {name: {"dtype",
"shape"}}}}}``. Every tensor's dtype and shape is checked against it on load; any mismatch, a missing or
truncated file or a tensor that does not decode is one ``PackedFormatError`` line naming file and tensor.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable

import torch
from safetensors import SafetensorError, safe_open

from miq.checkpoint import formats, packed_layer, stream
from miq.errors import ModelError
from miq.model import onload
from quant import QuantizedLayer

FORMAT, VERSION = "miq-packed", 3
READS = (1, 2, 3)  # version 2 stores a code for every weight, pruned ones too; version 1 also int32 g_idx, perm
MANIFEST, PACKED, DENSE = "quantization.json", "packed.safetensors", "dense.safetensors"
HASHED = (PACKED, DENSE)  # the tensor files, whose sha256 the manifest holds (version 3 on)
DTYPES = {v: k for k, v in packed_layer.DTYPE_NAMES.items()}
SAFETENSORS_DTYPES = {"U8": "uint8", "I32": "int32", "I64": "int64", "F16": "float16", "BF16": "bfloat16",
                      "F32": "float32", "F64": "float64", "BOOL": "bool"}


class PackedFormatError(ModelError):
    """A saved folder that cannot be read back exactly: one line naming the file, the tensor and the problem."""


def is_packed(path: str) -> bool:
    """True when ``path`` is a folder in this format, damaged or not: its manifest says so, or it holds
    packed.safetensors (then a broken manifest is reported as such, not as some other kind of folder)."""
    if os.path.isfile(os.path.join(path, PACKED)):
        return True
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


# ----------------------------------------------------------------------------------------------------------
# writing


def write_packed(folder: str, model, tokenizer, layers: list[QuantizedLayer], nm: tuple[int, int] | None = None,
                 run: dict | None = None) -> dict:
    """Write the packed format into ``folder`` (existing and empty). Returns {"bytes_on_disk", "bpw_on_disk"}.

    ``layers``: the compressed linears as stored (``CompressionResult.saved``: QuantizedLayers, or already
    encoded as ``PackedLayers``); ``nm``: the run's n:m pattern,
    if any (masks that follow it are stored as n:m indices); ``run``: recorded in the manifest.
    """
    dtype = model.dtype
    if not isinstance(layers, PackedLayers):
        layers = PackedLayers.of(layers, dtype, nm)
    entries, weights = layers.entries, layers.weights
    specs, get, tied = dense_tensors(model, {f"{name}.weight" for name in entries})
    # one metadata key: safetensors writes several in no fixed order, and the same run must give the same bytes;
    # both files tensor by tensor (stream.save), so that saving holds one tensor, not the model
    stream.save(os.path.join(folder, PACKED), layers.spill.specs, layers.spill.get, metadata={"format": FORMAT})
    stream.save(os.path.join(folder, DENSE), specs, get, metadata={"format": FORMAT})
    nbytes = sum(tensor_bytes(os.path.join(folder, PACKED)).values())
    manifest = {"format": FORMAT, "version": VERSION, "dtype": packed_layer.DTYPE_NAMES[dtype],
                "files": {"packed": PACKED, "dense": DENSE}, "tied": tied,
                "bit_order": "integer arrays are LSB-first bit streams (see packed.py / packbits.py)",
                "run": run or {}, "weights": weights, "bytes_on_disk": nbytes,
                "sha256": {f: formats.sha256(os.path.join(folder, f)) for f in HASHED}, "layers": entries}
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"bytes_on_disk": nbytes, "bpw_on_disk": 8 * nbytes / weights if weights else None}


class PackedLayers:
    """Compressed linears encoded as they arrive (``append``, as a list of QuantizedLayer takes them): the
    manifest entries, and the format's tensors (a few bits per weight) put away on disk layer by layer
    (``spill``) until the writer streams them into the file: a run holds neither every layer's float32 copy
    nor every layer's packed bits. ``dtype``: the model's; ``nm``: the run's n:m pattern, if any."""

    def __init__(self, dtype: torch.dtype, nm: tuple[int, int] | None = None):
        self.dtype, self.nm = dtype, nm
        self.entries: dict[str, dict] = {}  # layer -> manifest entry, in the order compressed
        self.spill = stream.Spill("miq-packed-")
        self.weights = 0

    @classmethod
    def of(cls, layers: list[QuantizedLayer], dtype: torch.dtype, nm: tuple[int, int] | None) -> PackedLayers:
        out = cls(dtype, nm)
        for q in layers:
            out.append(q)
        return out

    def append(self, q: QuantizedLayer) -> None:
        self.entries[q.name], t = packed_layer.encode(q, self.dtype, self.nm)
        self.spill.put(t)
        self.weights += q.weight.numel()

    def __len__(self) -> int:
        return len(self.entries)


def dense_tensors(model, compressed: set[str]) -> tuple[dict[str, stream.Spec], Callable[[str], torch.Tensor],
                                                        dict[str, str]]:
    """The state dict less the compressed weights, each shared tensor once, for ``stream.save``: ({name:
    (dtype, shape)}, get(name) -> tensor, {alias: source}). A model loaded layer by layer reads each tensor
    when asked, from the checkpoint or the compressed layers' files."""
    if onload.of(model) is not None:
        return onload.of(model).dense(compressed)
    out, tied, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        if name in compressed:
            continue
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        out[name] = t
    return {n: (t.dtype, tuple(t.shape)) for n, t in out.items()}, out.__getitem__, tied


def tensor_bytes(path: str) -> dict[str, int]:
    """{tensor: data bytes} from a safetensors file's header (the 8-byte length, then JSON)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


# ----------------------------------------------------------------------------------------------------------
# reading


def read_manifest(path: str) -> dict:
    """The manifest, with the files it names checked against it (cheap: headers only). PackedFormatError."""
    p = os.path.join(path, MANIFEST)
    try:
        with open(p, encoding="utf-8") as f:
            manifest = json.load(f)
    except OSError as e:
        raise PackedFormatError(f"{p}: cannot read the manifest ({e.strerror})") from None
    except ValueError as e:
        raise PackedFormatError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PackedFormatError(f"{p}: not a {FORMAT} manifest")
    if manifest.get("version") not in READS:
        raise PackedFormatError(f"{p}: format version {manifest.get('version')!r}; this toolkit reads "
                                f"{' and '.join(map(str, READS))}")
    _check_schema(p, manifest)
    expected = {k: v for e in manifest["layers"].values() for k, v in e["tensors"].items()}
    _check_file(os.path.join(path, PACKED), expected)
    _check_file(os.path.join(path, DENSE), None)
    for file, digest in manifest.get("sha256", {}).items():  # version 3 on: every byte as it was written
        if file not in HASHED:
            raise PackedFormatError(f"{p}: sha256 names {file}, no file of the format")
        if formats.sha256(os.path.join(path, file)) != digest:
            raise PackedFormatError(f"{os.path.join(path, file)}: its sha256 differs from the manifest's: the "
                                    "file changed after it was written")
    return manifest


_TOP = {"dtype": str, "tied": dict, "weights": int, "bytes_on_disk": int, "layers": dict}
_LAYER = {"shape": list, "quantized": bool, "tensors": dict}
_GRID = {"sym": bool, "sets": int, "row_groups": bool, "columns": dict, "widths": dict, "codes": dict}


def _check_schema(p: str, manifest: dict) -> None:
    """Every key decoding reads, with its type, before any data is read: one line naming the first that is not."""
    def need(where: str, d: dict, spec: dict) -> None:
        for key, kind in spec.items():
            if not isinstance(d.get(key), kind) or (kind is int and isinstance(d.get(key), bool)):
                raise PackedFormatError(f"{p}: {where}{key} is missing or not a {kind.__name__}")

    need("", manifest, {**_TOP, **({"sha256": dict} if manifest["version"] >= 3 or "sha256" in manifest else {})})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in manifest["tied"].items()):
        raise PackedFormatError(f"{p}: tied must map tensor names to tensor names")
    if manifest["dtype"] not in DTYPES:
        raise PackedFormatError(f"{p}: unknown dtype {manifest['dtype']!r}")
    for name, e in manifest["layers"].items():
        if not isinstance(e, dict):
            raise PackedFormatError(f"{p}: layers.{name} is not an object")
        need(f"layers.{name}.", e, {**_LAYER, **(_GRID if e.get("quantized") else {})})
        for t, spec in e["tensors"].items():
            if not isinstance(spec, dict):
                raise PackedFormatError(f"{p}: layers.{name}.tensors.{t} is not an object")
            need(f"layers.{name}.tensors.{t}.", spec, {"dtype": str, "shape": list})
        if e.get("mask") is not None and not isinstance(e["mask"], dict):
            raise PackedFormatError(f"{p}: layers.{name}.mask is not null or an object")
        if e.get("quantized"):
            need(f"layers.{name}.columns.", e["columns"], {"groups": int})
            need(f"layers.{name}.widths.", e["widths"], {"table": list, "layout": str})


def _check_file(path: str, expected: dict | None) -> None:
    """The file opens as safetensors (complete) and holds exactly the expected tensors, dtypes and shapes."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise PackedFormatError(f"{path}: missing")
    try:
        with safe_open(path, "pt") as f:
            found = {k: (SAFETENSORS_DTYPES.get(f.get_slice(k).get_dtype()), list(f.get_slice(k).get_shape()))
                     for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise PackedFormatError(f"{path}: unreadable safetensors file, truncated or corrupted? ({e})") from None
    if expected is None:
        return
    for k, spec in expected.items():
        if k not in found:
            raise PackedFormatError(f"{name}: tensor {k} is missing")
        if found[k] != (spec["dtype"], list(spec["shape"])):
            raise PackedFormatError(f"{name}: tensor {k} is {found[k][0]} {found[k][1]}, the manifest says "
                                    f"{spec['dtype']} {list(spec['shape'])}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise PackedFormatError(f"{name}: tensor {extra[0]} is not in the manifest")


def load_compressed(path: str, dtype: torch.dtype | None = None, manifest: dict | None = None):
    """The saved model, rebuilt on CPU in eval mode: decompressed weights equal the evaluated ones exactly.

    ``dtype``: None = the dtype the model was evaluated (and saved) in. ``manifest``: what ``read_manifest``
    returned for the folder, if it was called already (its files are then not hashed again). PackedFormatError
    (a ModelError) names the file and tensor when the folder is incomplete, truncated or inconsistent.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    manifest = manifest or read_manifest(path)  # given: read and its files hashed already (opt_mi.py DIR)
    dtype = dtype or DTYPES[manifest["dtype"]]
    config = AutoConfig.from_pretrained(path)
    try:  # no random init: every parameter comes from the files (buffers the files lack, e.g. a rotary
        from transformers.initialization import no_init_weights  # embedding's inv_freq, are computed as usual)
    except ImportError:  # older transformers: initialised, then overwritten
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    expected = model.state_dict()
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(os.path.join(path, DENSE)).items()}
    for name, entry in manifest["layers"].items():
        state[f"{name}.weight"] = _decode_layer(path, name, entry, expected, dtype)
    for alias, source in manifest["tied"].items():
        if source in state:
            state[alias] = state[source]
    _check_state(path, state, expected)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model.eval()


def _decode_layer(path: str, name: str, entry: dict, expected: dict, dtype: torch.dtype) -> torch.Tensor:
    """One compressed weight, decoded; any inconsistency becomes one PackedFormatError line naming the layer."""
    key = f"{name}.weight"
    if key not in expected:
        raise PackedFormatError(f"{MANIFEST}: layer {name} is not a layer of the model in config.json")
    if list(entry.get("shape", [])) != list(expected[key].shape):
        raise PackedFormatError(f"{MANIFEST}: layer {name} has shape {entry.get('shape')}, the model in config.json "
                                f"has {list(expected[key].shape)}")
    with safe_open(os.path.join(path, PACKED), "pt") as f:
        def get(part: str) -> torch.Tensor:
            return f.get_tensor(f"{name}.{part}")

        try:
            return packed_layer.decode(name, entry, get, dtype)
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError, SafetensorError) as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PackedFormatError(f"{PACKED}: layer {name}: {why}") from None


def _check_state(path: str, state: dict, expected: dict) -> None:
    """Every tensor the model needs is there, with its shape, and nothing else."""
    for k, t in expected.items():
        if k not in state:
            raise PackedFormatError(f"{DENSE}: tensor {k} is missing")
        if state[k].shape != t.shape:
            raise PackedFormatError(f"{DENSE}: tensor {k} has shape {list(state[k].shape)}, the model in "
                                    f"config.json has {list(t.shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise PackedFormatError(f"{DENSE}: tensor {extra[0]} is not a tensor of the model in config.json")
