"""The local executor's GPUs: which GPUs this machine lets the sweep use, and which one each running
configuration gets.

Every configuration process sees one GPU (``CUDA_VISIBLE_DEVICES`` set to it), so opt_mi.py's ``cuda`` is that
GPU: without it, N parallel jobs all took GPU 0. A GPU offers ``--jobs-per-gpu`` slots (default 1); a job takes
a free slot when it starts and gives it back when it ends.
"""

from __future__ import annotations

import os

# The device nodes of the drivers torch.cuda runs on (NVIDIA's, AMD's ROCm, WSL's): where none exists torch
# counts no GPU, and the sweep need not import it (a second of its start) to be told so.
DRIVER_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def device_count() -> int:
    """``torch.cuda.device_count()``; 0 without importing torch where no GPU driver is present."""
    if not any(os.path.exists(node) for node in DRIVER_NODES):
        return 0
    import torch  # only where a GPU may be: the sweep itself computes nothing

    return torch.cuda.device_count()


def visible() -> list[str]:
    """The GPUs configuration processes may be given, as ``CUDA_VISIBLE_DEVICES`` names them.

    As many as torch counts (``torch.cuda.device_count()``, which follows ``CUDA_VISIBLE_DEVICES`` where CUDA
    exists and is 0 where it does not: a mask set on a machine without CUDA names no GPU). When the sweep runs
    under a ``CUDA_VISIBLE_DEVICES`` (a scheduler's allocation, a user's choice), its entries, in order, up to
    the first that CUDA would stop at (empty or negative: ``-1`` hides every GPU), and no more than torch
    counts; an entry may be an index or a ``GPU-``/``MIG-`` UUID, passed on as it is. Otherwise the indices
    ``0 .. count - 1``."""
    count = device_count()
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return [str(i) for i in range(count)]
    ids = []
    for entry in (e.strip() for e in mask.split(",")):
        if not entry or entry.startswith("-"):
            break
        ids.append(entry)
    return ids[:count]


class GpuSlots:
    """Free (GPU, slot) places, handed out in turn: with K slots per GPU, the first jobs spread over the GPUs
    (GPU 0, 1, ..., then each GPU's second slot), and a slot given back goes to the end of the queue, so the
    GPU that has waited longest is taken next. ``take()`` with none free is a defect of the caller, which runs
    at most ``len(gpus) * per_gpu`` jobs at a time."""

    def __init__(self, gpus: list[str], per_gpu: int):
        self.free = [g for _ in range(per_gpu) for g in gpus]

    def take(self) -> str:
        return self.free.pop(0)

    def give_back(self, gpu: str) -> None:
        self.free.append(gpu)
