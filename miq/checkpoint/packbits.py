"""Bit streams: unsigned integers of any width 1..32 packed densely into bytes, and pruning masks.

The packed model format (``packed.py``) stores every integer array, whatever its width, as one such stream,
so there is exactly one packing rule to specify and to test:

- A stream holds N values of width w (1 <= w <= 32; codes use 1..8, column indices and permutations more)
  in ``ceil(N * w / 8)`` bytes (uint8), no padding between
  values and no alignment of any kind: rows of any length, widths that do not divide 8, all fine.
- Value k occupies stream bits ``k*w .. k*w + w - 1``, its least significant bit first; stream bit i is bit
  ``i % 8`` (value 2^(i % 8)) of byte ``i // 8`` (LSB-first, as numpy's ``packbits(bitorder="little")``).
  Bits past the last value in the last byte are 0.

Masks (True = pruned) are either a bitmask (a stream of width 1 over the mask's row-major order) or, for an
n:m mask whose every aligned group of m columns prunes exactly n, one index per group into the sorted list
of the C(m, n) n-subsets of range(m) (``itertools.combinations`` order), as a stream of width
``ceil(log2 C(m, n))``: the ``ceil(log2 C(m, n)) / m`` bits per weight that bits accounting charges.
"""

from __future__ import annotations

import itertools
import math

import torch

from miq.bitstats import index_bits

MAX_NM_M = 16  # n:m index tables have 2^m entries; beyond this a bitmask is used


def stream_bytes(count: int, width: int) -> int:
    """Bytes of a stream of ``count`` values of ``width`` bits."""
    return (count * width + 7) // 8


MAX_WIDTH = 32
# values packed at a time, a multiple of 8 (eight values of w bits are w bytes): the int64 copies below are
# 8 to 16 times the values' count in bytes, 100 MB at once for a 1024 x 4096 layer's mask packed whole
PACK_CHUNK = 1 << 18


def _check_width(width: int) -> None:
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"bit width {width} outside 1..{MAX_WIDTH}")


def pack_bits(values: torch.Tensor, width: int) -> torch.Tensor:
    """values (any shape, integers in [0, 2^width)) in row-major order -> uint8 stream [stream_bytes(N, width)].

    Eight values of w bits are exactly w bytes, so for w <= 7 values are taken eight at a time into one int64
    (at most 56 bits) and cut into bytes; w == 8 is the values themselves; wider values (indices, not codes)
    are spread into their bits first.
    """
    _check_width(width)
    flat = values.reshape(-1)
    if flat.numel() > PACK_CHUNK:  # whole bytes per chunk, so the chunks' streams join into the stream
        return torch.cat([pack_bits(c, width) for c in flat.split(PACK_CHUNK)])
    v = flat.to(torch.int64)
    n = v.numel()
    if n and (int(v.min()) < 0 or int(v.max()) >= 1 << width):
        raise ValueError(f"values outside [0, {(1 << width) - 1}] cannot be packed at {width} bits")
    if width == 8:
        return v.to(torch.uint8)
    if width > 8:
        return pack_bits((v[:, None] >> torch.arange(width, dtype=torch.int64)) & 1, 1)
    v = torch.nn.functional.pad(v, (0, -n % 8)).reshape(-1, 8)
    words = (v << (torch.arange(8, dtype=torch.int64) * width)).sum(1)  # disjoint bit ranges: sum == or
    out = (words[:, None] >> (torch.arange(width, dtype=torch.int64) * 8)) & 0xFF
    return out.to(torch.uint8).reshape(-1)[: stream_bytes(n, width)]


def unpack_bits(stream: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """The inverse of ``pack_bits``: ``count`` values (int64 [count]) from a uint8 stream of the right length."""
    _check_width(width)
    if stream.dtype != torch.uint8 or stream.dim() != 1 or stream.numel() != stream_bytes(count, width):
        raise ValueError(f"expected {stream_bytes(count, width)} bytes (uint8) for {count} values of {width} bits, "
                         f"found {stream.numel()} ({stream.dtype})")
    b = stream.to(torch.int64)
    if width == 8:
        return b
    if width > 8:
        bits = unpack_bits(stream, 1, count * width).reshape(count, width)
        return (bits << torch.arange(width, dtype=torch.int64)).sum(1)
    b = torch.nn.functional.pad(b, (0, -b.numel() % width)).reshape(-1, width)
    words = (b << (torch.arange(width, dtype=torch.int64) * 8)).sum(1)
    out = (words[:, None] >> (torch.arange(8, dtype=torch.int64) * width)) & ((1 << width) - 1)
    return out.reshape(-1)[:count]


# ----------------------------------------------------------------------------------------------------------
# masks


def _nm_tables(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of every m-bit pattern, -1 where it does not prune exactly n [2^m]; pattern of every index)."""
    patterns = torch.tensor([sum(1 << i for i in c) for c in itertools.combinations(range(m), n)])
    lookup = torch.full((1 << m,), -1, dtype=torch.int64)
    lookup[patterns] = torch.arange(len(patterns))
    return lookup, patterns


def nm_index_bits(n: int, m: int) -> int:
    return index_bits(math.comb(m, n))


def nm_indices(mask: torch.Tensor, n: int, m: int) -> torch.Tensor | None:
    """mask [R, C] -> [R, C / m] indices into the n-subsets of range(m), or None when it is not an aligned n:m
    mask (then it is stored as a bitmask)."""
    R, C = mask.shape
    if m > MAX_NM_M or C % m:
        return None
    lookup, _ = _nm_tables(n, m)
    groups = mask.reshape(R, C // m, m).to(torch.int64)
    idx = lookup[(groups << torch.arange(m)).sum(-1)]
    return None if bool((idx < 0).any()) else idx


def encode_nm(mask: torch.Tensor, n: int, m: int) -> torch.Tensor | None:
    """mask [R, C] -> n:m index stream, or None when it is not an aligned n:m mask (then store a bitmask)."""
    idx = nm_indices(mask, n, m)
    return None if idx is None else pack_bits(idx, nm_index_bits(n, m))


def decode_nm(stream: torch.Tensor, n: int, m: int, shape: tuple[int, int]) -> torch.Tensor:
    """The bool mask [R, C] from its n:m index stream (ValueError when an index names no subset)."""
    R, C = shape
    _, patterns = _nm_tables(n, m)
    idx = unpack_bits(stream, nm_index_bits(n, m), R * C // m)
    if bool((idx >= len(patterns)).any()):
        raise ValueError(f"n:m indices beyond the {len(patterns)} subsets of {n} in {m}")
    return ((patterns[idx][:, None] >> torch.arange(m)) & 1).bool().reshape(R, C)
