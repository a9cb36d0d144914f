"""One compressed linear layer in the packed format: ``encode`` (QuantizedLayer -> manifest entry + tensors)
and ``decode`` (the inverse, checking every size against the manifest). The layout is specified in
``packed.py``'s docstring; bit streams are ``packbits.py``'s.

Codes are recovered from the weights as ``round(w / scale) + zero``. That is exact: a kept weight is
``scale * k`` with k = code - zero an integer of at most 8 bits and scale fp16-representable (11 significant
bits), so the float32 product has at most 19 significant bits, is exact, and divides back to k exactly.
``encode`` still checks, for every weight, that decoding reproduces it bit for bit, and refuses otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from miq.bitstats import index_bits
from miq.checkpoint import packbits
from quant import GRIDS, QuantizedLayer

DTYPE_NAMES = {torch.uint8: "uint8", torch.int32: "int32", torch.float16: "float16", torch.bfloat16: "bfloat16",
               torch.float32: "float32", torch.float64: "float64"}


def _keeps_perm(q: QuantizedLayer) -> bool:
    """The processing order is stored for quantized act-order layers without column groups (with groups,
    g_idx or contiguous groups carry what decoding needs; it never needs perm)."""
    return q.perm is not None and q.scale is not None and q.scale.shape[1] == 1


@dataclass(frozen=True)
class GridLayout:
    """What a quantized layer's metadata streams hold, by count: ``sets`` (P) parameter sets of ``groups``
    (G) column groups each; the rows' set indices when rows share sets; g_idx when the column groups are not
    contiguous runs; ``width_indices`` indices into a table of ``widths`` distinct widths where widths vary;
    the processing order for act-order without column groups. Also how a run predicts its storage before
    any work (``miq.run.target``), from its flags and the layer's shape."""

    rows: int
    cols: int
    sets: int
    groups: int
    sym: bool
    shared_rows: bool = False
    g_idx: bool = False
    width_indices: int = 0
    widths: int = 1
    perm: bool = False

    def metadata_bits(self) -> float:
        meta = GRIDS[self.sym].parameter_bits() * self.sets * self.groups  # fp16 scales (+ fp16 zero-points)
        meta += self.rows * index_bits(self.sets) if self.shared_rows else 0
        meta += self.cols * index_bits(self.groups) if self.g_idx else 0
        meta += self.width_indices * index_bits(self.widths) if self.width_indices else 0
        return meta + (self.cols * index_bits(self.cols) if self.perm else 0)


def mask_bits(rows: int, cols: int, nm: tuple[int, int] | None) -> float:
    """An unstructured mask's bits (a bitmask), or an aligned n:m mask's (an index per m weights; beyond
    ``MAX_NM_M`` a bitmask)."""
    if nm is None or nm[1] > packbits.MAX_NM_M:
        return float(rows * cols)
    return float(rows * cols // nm[1] * packbits.nm_index_bits(*nm))


CODE_ROWS = 1 << 18  # weights stored_bits counts and encode's codes go through at a time (2 MB of int64)


def stored_bits(q: QuantizedLayer, nm: tuple[int, int] | None) -> tuple[float, float, float]:
    """(codes, metadata, mask): the bits ``encode`` stores for layer q, each stream unpadded (on disk every
    stream rounds up to a byte). What the bits account charges, decided by the format's own rules; a pruned-only
    layer's kept values count 16 bits each (fp16)."""
    R, C = q.weight.shape
    kept = torch.ones_like(q.weight, dtype=torch.bool) if q.mask is None else ~q.mask
    mask = 0.0
    if q.mask is not None:
        aligned = nm is not None and packbits.nm_indices(q.mask, *nm) is not None
        mask = mask_bits(R, C, nm if aligned else None)
    if q.scale is None:
        return 16.0 * int(kept.sum()), 0.0, mask
    sets, first = _parameter_sets(q)
    bits = _bits_of(q.maxq.float()[first])
    table, _, stored = _width_layout(bits)
    layout = GridLayout(R, C, len(first), q.scale.shape[1], q.sym, shared_rows=sets is not None,
                        g_idx=_groupsize(q.g_idx.long(), q.scale.shape[1]) is None,
                        width_indices=0 if stored is None else stored.numel(), widths=len(table),
                        perm=_keeps_perm(q))
    row_set = sets if sets is not None else torch.arange(R)
    g_idx = q.g_idx.long()
    # every weight's width, a few rows at a time: [R, C] of int64 at once (with its product) was 64 MB for a
    # 1024 x 4096 layer, the largest term at the end of its compression; an integer sum either way
    step = max(1, CODE_ROWS // max(C, 1))
    codes = sum(int((bits[row_set[r : r + step]][:, g_idx] * kept[r : r + step]).sum()) for r in range(0, R, step))
    return float(codes), layout.metadata_bits(), mask


def _bits_of(maxq: torch.Tensor) -> torch.Tensor:
    return torch.log2(maxq.double() + 1).round().long()


def encode(q: QuantizedLayer, dtype: torch.dtype, nm: tuple[int, int] | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The manifest entry and the tensors ({"<layer>.<part>": tensor}) of one layer; ``dtype``: the model's."""
    R, C = q.weight.shape
    keep_perm = _keeps_perm(q)
    entry: dict = {"shape": [R, C], "quantized": q.scale is not None, "mask": None, "perm": keep_perm}
    t: dict[str, torch.Tensor] = {}
    if q.mask is not None:
        if bool((q.weight.ne(0) & q.mask).any()):  # not q.weight[q.mask]: a float copy of half the layer
            raise ValueError(f"layer {q.name}: pruned weights are not 0")
        entry["mask"] = _encode_mask(q.mask, nm, t)
    if keep_perm:  # at ceil(log2 C) bits per column
        t["perm"] = packbits.pack_bits(q.perm, index_bits(C))
    if q.scale is None:  # pruned only: the kept weights as evaluated
        w = q.weight.to(dtype)
        t["values"] = (w if q.mask is None else w[~q.mask]).reshape(-1)
    else:
        entry.update(_encode_grid(q, dtype, t))
    tensors = {f"{q.name}.{k}": v.contiguous() for k, v in t.items()}
    entry["tensors"] = {k: {"dtype": DTYPE_NAMES[v.dtype], "shape": list(v.shape)} for k, v in tensors.items()}
    return entry, tensors


def _encode_mask(mask: torch.Tensor, nm: tuple[int, int] | None, t: dict) -> dict:
    if nm is not None:
        stream = packbits.encode_nm(mask, *nm)
        if stream is not None:
            t["nm_index"] = stream
            return {"kind": "n:m", "n": nm[0], "m": nm[1], "index_bits": packbits.nm_index_bits(*nm)}
    t["mask"] = packbits.pack_bits(mask, 1)
    return {"kind": "bitmask"}


def _parameter_sets(q: QuantizedLayer) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(set index of every row [R] or None when each row is its own set, the first row of every set [P])."""
    R = q.weight.shape[0]
    if q.row_groups is None:
        return None, torch.arange(R)
    _, sets = torch.unique(q.row_groups.long(), return_inverse=True)
    first = torch.full((int(sets.max()) + 1,), R, dtype=torch.long)
    first = first.scatter_reduce(0, sets, torch.arange(R), reduce="amin")
    return sets, first


def _encode_grid(q: QuantizedLayer, dtype: torch.dtype, t: dict) -> dict:
    """Sets, columns, widths, scales, zero-points and codes of a quantized layer; returns the manifest keys."""
    sets, first = _parameter_sets(q)
    row_set = sets if sets is not None else torch.arange(q.weight.shape[0])
    scale, zero, maxq = (x.float()[first] for x in (q.scale, q.zero, q.maxq))
    for label, x, per_set in (("scale", q.scale, scale), ("zero", q.zero, zero), ("maxq", q.maxq, maxq)):
        if not torch.equal(x.float(), per_set[row_set]):
            raise ValueError(f"layer {q.name}: rows of a shared group have different {label}s")
    bits = _bits_of(maxq)
    if not torch.equal((2**bits - 1).float(), maxq) or not bool(((bits >= 1) & (bits <= 8)).all()):
        raise ValueError(f"layer {q.name}: maxq must be 2^b - 1 with b in 1..8")
    if not torch.equal(scale.half().float(), scale):
        raise ValueError(f"layer {q.name}: scales are not float16 values")
    g_idx = q.g_idx.long()
    info = {"sym": q.sym, "sets": len(first), "row_groups": sets is not None,
            "columns": _encode_columns(g_idx, scale.shape[1], t)}
    if sets is not None:
        t["row_groups"] = packbits.pack_bits(sets, index_bits(len(first)))
    info["widths"] = _encode_widths(bits, t)
    implied = q.grid.implied_zero(bits)
    if implied is not None and not torch.equal(zero, implied):
        raise ValueError(f"layer {q.name}: a {q.grid.name} grid's zero-point must be 2^(bits-1)")
    if implied is None and (not torch.equal(zero, zero.round()) or bool(((zero < 0) | (zero > maxq)).any())):
        raise ValueError(f"layer {q.name}: zero-points must be integers in [0, maxq]")
    for part, x in (("scale", scale), ("zero", zero)):
        if part in q.grid.stored:
            t[part] = x.half()
    info["codes"] = _encode_codes(q, (scale, zero, bits), row_set, g_idx, dtype, t)
    info["codes_of"] = "kept"  # version 3: a pruned weight stores no code (version 1 and 2 stored every weight's)
    return info


def _groupsize(g_idx: torch.Tensor, G: int) -> int | None:
    """The size of contiguous column groups (named by their size alone), or None when g_idx must be stored."""
    C = g_idx.numel()
    if C == 0 or int(g_idx.min()) < 0 or int(g_idx.max()) != G - 1:
        raise ValueError(f"g_idx must name the {G} column groups of the grid")
    size = int((g_idx == 0).sum())
    return size if torch.equal(g_idx, torch.arange(C) // size) and G == -(-C // size) else None


def _encode_columns(g_idx: torch.Tensor, G: int, t: dict) -> dict:
    size = _groupsize(g_idx, G)
    if size is not None:
        return {"groups": G, "groupsize": size}
    t["g_idx"] = packbits.pack_bits(g_idx, index_bits(G))  # ceil(log2 G) bits per column
    return {"groups": G, "g_idx": True}


def _width_layout(bits: torch.Tensor) -> tuple[list[int], str, torch.Tensor | None]:
    """bits [P, G] as (the table of distinct widths, the layout, the indices into the table it stores)."""
    table = sorted(set(bits.flatten().tolist()))
    if len(table) == 1:
        return table, "uniform", None
    idx = torch.searchsorted(torch.tensor(table), bits)
    if bool((bits == bits[:, :1]).all()):  # row (set) widths: output-axis groups
        return table, "per_set", idx[:, 0]
    if bool((bits == bits[:1]).all()):  # column-group widths shared by every row: input-axis groups
        return table, "per_group", idx[0]
    return table, "per_set_group", idx


def _encode_widths(bits: torch.Tensor, t: dict) -> dict:
    """bits [P, G] as a table of distinct widths plus, where they vary, a stream of indices into it."""
    table, layout, stored = _width_layout(bits)
    spec = {"table": table, "index_bits": index_bits(len(table)), "layout": layout}
    if stored is not None:
        t["widths"] = packbits.pack_bits(stored, spec["index_bits"])
    return spec


def _encode_codes(q: QuantizedLayer, grid, row_set, g_idx, dtype, t: dict) -> dict[str, int]:
    """One stream per width of the kept weights' codes round(w / scale) + zero (row-major, as the mask
    enumerates kept weights), checked to decode to the weights exactly; grid: (scale, zero, bits) [P, G]."""
    widths = sorted(set(grid[2].flatten().tolist()))
    kept_codes: dict[int, list[torch.Tensor]] = {w: [] for w in widths}
    R, C = q.weight.shape
    step = max(1, CODE_ROWS // max(C, 1))
    # a few rows at a time, kept codes gathered as bytes (widths are at most 8 bits): the whole layer's grid,
    # codes and checks at once were [R, C] float and int64 tensors, 130 MB for a 1024 x 4096 layer
    for r in range(0, R, step):
        s, z, b = (x[row_set[r : r + step]][:, g_idx] for x in grid)
        weight = q.weight[r : r + step]
        kept = torch.ones_like(weight, dtype=torch.bool) if q.mask is None else ~q.mask[r : r + step]
        codes = torch.round(weight.float() / s) + z
        in_range = bool(((codes >= 0) & (codes <= 2.0**b - 1)).all())
        if not in_range or not torch.equal((s * (codes - z)).to(dtype), weight.to(dtype)):
            raise ValueError(f"layer {q.name}: weights are not exactly on their stored grid; cannot pack them "
                             "losslessly")
        for w in widths:
            kept_codes[w].append(codes[(b == w) & kept].to(torch.uint8))
    counts = {}
    for w in widths:
        codes = torch.cat(kept_codes.pop(w))
        t[f"codes.w{w}"] = packbits.pack_bits(codes, w)
        counts[str(w)] = codes.numel()
    return counts


# ----------------------------------------------------------------------------------------------------------
# decoding: every size is derived from the manifest and checked; a ValueError names what is wrong


def decode(name: str, entry: dict, get: Callable[[str], torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The weight [R, C] in ``dtype`` of layer ``name``; get(part) returns its tensor "<name>.<part>"."""
    R, C = (int(x) for x in entry["shape"])
    mask = _decode_mask(entry["mask"], get, (R, C)) if entry["mask"] is not None else None
    if not entry["quantized"]:
        values = get("values")
        kept = R * C if mask is None else int((~mask).sum())
        if values.numel() != kept:
            raise ValueError(f"{values.numel()} stored values for {kept} kept weights")
        w = torch.zeros(R, C, dtype=values.dtype)
        w[torch.ones_like(w, dtype=torch.bool) if mask is None else ~mask] = values
        return w.to(dtype)
    P, G = int(entry["sets"]), int(entry["columns"]["groups"])
    row_set = packbits.unpack_bits(get("row_groups"), index_bits(P), R) if entry["row_groups"] else torch.arange(R)
    g_idx = _decode_columns(entry["columns"], get, C)
    if int(row_set.max()) >= P or int(g_idx.max()) >= G or int(g_idx.min()) < 0:
        raise ValueError("row_groups or g_idx name a parameter set or column group beyond the manifest's")
    bits = _decode_widths(entry["widths"], get, P, G)
    scale = _grid_tensor(get("scale"), "scale", P, G)
    zero = GRIDS[bool(entry["sym"])].implied_zero(bits)
    zero = _grid_tensor(get("zero"), "zero", P, G) if zero is None else zero
    b = bits[row_set][:, g_idx]
    z = zero[row_set][:, g_idx]
    kept_only = entry.get("codes_of", "all") == "kept" and mask is not None  # version 3 stores kept codes only
    coded = ~mask if kept_only else torch.ones(R, C, dtype=torch.bool)
    codes = z.clone()  # a pruned weight without a code decodes as its zero-point: 0
    for w, count in entry["codes"].items():
        sel = (b == int(w)) & coded
        if int(sel.sum()) != int(count):
            raise ValueError(f"{int(sel.sum())} stored weights have width {w}, the manifest counts {count}")
        codes[sel] = packbits.unpack_bits(get(f"codes.w{w}"), int(w), int(count)).float()
    if sum(int(c) for c in entry["codes"].values()) != int(coded.sum()):
        raise ValueError(f"code streams cover {sum(int(c) for c in entry['codes'].values())} of "
                         f"{int(coded.sum())} stored weights")
    w = (scale[row_set][:, g_idx] * (codes - z)).to(dtype)
    if mask is not None and bool(w[mask].any()):
        raise ValueError("the mask marks weights pruned whose codes are not the zero-point")
    return w


def _decode_mask(spec: dict, get, shape: tuple[int, int]) -> torch.Tensor:
    if spec["kind"] == "bitmask":
        return packbits.unpack_bits(get("mask"), 1, shape[0] * shape[1]).bool().reshape(shape)
    if spec["kind"] == "n:m":
        n, m = int(spec["n"]), int(spec["m"])
        if not 0 < n < m <= packbits.MAX_NM_M or shape[1] % m:
            raise ValueError(f"n:m mask {n}:{m} does not fit rows of {shape[1]}")
        return packbits.decode_nm(get("nm_index"), n, m, shape)
    raise ValueError(f"unknown mask kind {spec['kind']!r}")


def _decode_columns(spec: dict, get, C: int) -> torch.Tensor:
    if spec.get("g_idx"):
        stored = get("g_idx")
        if stored.dtype == torch.int32:  # version 1 stored g_idx as int32
            if stored.shape != (C,):
                raise ValueError(f"g_idx has shape {list(stored.shape)}, expected [{C}]")
            return stored.long()
        return packbits.unpack_bits(stored, index_bits(int(spec["groups"])), C)
    size = int(spec["groupsize"])
    if size < 1 or -(-C // size) != int(spec["groups"]):
        raise ValueError(f"groupsize {size} does not give {spec['groups']} groups over {C} columns")
    return torch.arange(C) // size


def _decode_widths(spec: dict, get, P: int, G: int) -> torch.Tensor:
    table = torch.tensor([int(x) for x in spec["table"]], dtype=torch.long)
    if table.numel() == 0 or bool(((table < 1) | (table > 8)).any()):
        raise ValueError(f"widths table {spec['table']} must hold widths in 1..8")
    if spec["layout"] == "uniform":
        return table[:1].expand(P, G)
    shape = {"per_set": (P, 1), "per_group": (1, G), "per_set_group": (P, G)}.get(spec["layout"])
    if shape is None:
        raise ValueError(f"unknown widths layout {spec['layout']!r}")
    idx = packbits.unpack_bits(get("widths"), index_bits(table.numel()), shape[0] * shape[1])
    if int(idx.max()) >= table.numel():
        raise ValueError("width indices beyond the widths table")
    return table[idx].reshape(shape).expand(P, G)


def _grid_tensor(x: torch.Tensor, label: str, P: int, G: int) -> torch.Tensor:
    if tuple(x.shape) != (P, G):
        raise ValueError(f"{label} has shape {list(x.shape)}, expected [{P}, {G}]")
    return x.float()
