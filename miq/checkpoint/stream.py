"""A safetensors file written one tensor at a time, and tensors kept on disk until then: what the writers
use so that saving a model holds one tensor (or one layer's), not all of them.

Why: ``safetensors.torch.save_file`` takes every tensor at once (and copies each to bytes), so a writer that
gathers a model's tensors holds the model, twice. The format allows streaming: the header (each tensor's
dtype, shape and byte range) needs only the shapes, then the bytes follow in its order. ``save`` writes the
same bytes ``save_file`` writes for the same tensors and metadata: tensors ordered by dtype (safetensors'
order, largest first), then name; the header's JSON compact, padded with spaces to a multiple of 8 bytes.
``Spill`` keeps tensors in small safetensors files in a temporary folder (removed by ``close``, when
collected, or when the process ends) and reads one back when asked.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# safetensors' dtype names, in its own order (the order of its Dtype enum, which save_file sorts by)
ORDER = [("BOOL", torch.bool), ("U8", torch.uint8), ("I8", torch.int8), ("I16", torch.int16),
         ("U16", torch.uint16), ("F16", torch.float16), ("BF16", torch.bfloat16), ("I32", torch.int32),
         ("U32", torch.uint32), ("F32", torch.float32), ("F64", torch.float64), ("I64", torch.int64),
         ("U64", torch.uint64)]
NAME = {dtype: name for name, dtype in ORDER}
RANK = {dtype: i for i, (_, dtype) in enumerate(ORDER)}
Spec = tuple[torch.dtype, tuple[int, ...]]


def _nbytes(spec: Spec) -> int:
    n = spec[0].itemsize
    for d in spec[1]:
        n *= d
    return n


def header(specs: dict[str, Spec], metadata: dict[str, str] | None) -> tuple[bytes, list[str]]:
    """(the header's bytes with its 8-byte length, the tensors' names in the order their bytes follow)."""
    order = sorted(specs, key=lambda n: (-RANK[specs[n][0]], n))
    head: dict = {"__metadata__": metadata} if metadata else {}
    start = 0
    for n in order:
        dtype, shape = specs[n]
        head[n] = {"dtype": NAME[dtype], "shape": list(shape), "data_offsets": [start, start + _nbytes(specs[n])]}
        start += _nbytes(specs[n])
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, order


def save(path: str, specs: dict[str, Spec], get: Callable[[str], torch.Tensor],
         metadata: dict[str, str] | None = None) -> None:
    """Write the tensors ``specs`` names ({name: (dtype, shape)}) to ``path``, asking ``get(name)`` for each
    in turn; each must have the dtype and shape its spec says (checked: a mismatch would shift every later
    tensor's bytes)."""
    head, order = header(specs, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for n in order:
            t = get(n)
            if (t.dtype, tuple(t.shape)) != (specs[n][0], tuple(specs[n][1])):
                raise ValueError(f"tensor {n} is {t.dtype} {list(t.shape)}, its spec says {specs[n][0]} "
                                 f"{list(specs[n][1])}")
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t


class Spill:
    """Tensors put away in groups (one small safetensors file each, in a temporary folder) and read back one
    at a time: ``specs`` says what is there, ``get`` reads one."""

    def __init__(self, prefix: str = "miq-spill-") -> None:
        self.prefix = prefix
        self._dir: tempfile.TemporaryDirectory | None = None
        self.specs: dict[str, Spec] = {}
        self._file: dict[str, str] = {}

    def put(self, tensors: dict[str, torch.Tensor]) -> None:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix=self.prefix)
        path = os.path.join(self._dir.name, f"{len(set(self._file.values())):06d}.safetensors")
        save_file({n: t.contiguous() for n, t in tensors.items()}, path)
        for n, t in tensors.items():
            self.specs[n], self._file[n] = (t.dtype, tuple(t.shape)), path

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self._file[name], "pt") as f:
            return f.get_tensor(name)

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
        self._dir = None
