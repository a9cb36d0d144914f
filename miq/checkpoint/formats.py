"""The save formats, what each rules out from the flags alone (checked with the flags, before any work), and
how a folder this toolkit saved is recognised (only such a folder, or an empty one, may be replaced).

Torch-free, so that ``miq.run.config`` can refuse a format the run cannot be saved in; the writers are
``packed.py``, ``export_ct.py`` and ``miq.run.saving`` (dense).
"""

from __future__ import annotations

import hashlib
import json
import os

from miq.options import fmt_num

USE_PACKED = "use --save-format packed"
MARKER = "miq_save.json"  # in every saved folder: {"written_by": WRITER, "format": ...}
WRITER = "mutual_info_quantization"
OWN_MANIFESTS = ("miq-packed", "dense")  # quantization.json formats of saves from before the marker


def marker(fmt: str, folder: str) -> str:
    """The marker file's content for ``folder``, saved in ``fmt``: the sha256 of every file it holds."""
    sums = {f: sha256(os.path.join(folder, f)) for f in sorted(os.listdir(folder)) if f != MARKER}
    return json.dumps({"format": fmt, "sha256": sums, "written_by": WRITER}, indent=1, sort_keys=True)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checksum_problem(folder: str, hashed_elsewhere: tuple[str, ...] = ()) -> str | None:
    """Why a folder this toolkit saved is not as it was written (a file changed or missing), or None; the
    files ``hashed_elsewhere`` (a packed folder's, against its manifest) are only checked to exist."""
    mark = _json(os.path.join(folder, MARKER))
    if not isinstance(mark, dict) or not isinstance(mark.get("sha256"), dict):
        return None  # not saved by this toolkit, or before checksums: nothing to check against
    for name, digest in mark["sha256"].items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing (the folder's {MARKER} lists it)"
        if name not in hashed_elsewhere and sha256(path) != digest:
            return f"{name} changed after it was written (its sha256 differs from {MARKER}'s)"
    return None


def _json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def foreign(folder: str) -> list[str]:
    """What in ``folder`` (a folder a --save would replace) is not this toolkit's own: every entry its marker
    does not list as a file it wrote (a note, an ``evals/`` folder added since). A folder saved before the
    marker listed its files cannot tell the user's files from its own: all of them count as foreign."""
    mark = _json(os.path.join(folder, MARKER))
    own = set()
    if isinstance(mark, dict) and mark.get("written_by") == WRITER and isinstance(mark.get("sha256"), dict):
        own = {MARKER, *mark["sha256"]}
    return [n for n in sorted(os.listdir(folder))
            if n not in own or os.path.islink(os.path.join(folder, n)) or not os.path.isfile(os.path.join(folder, n))]


def saved_by_toolkit(folder: str) -> bool:
    """Whether ``folder`` is a model this toolkit saved (its marker, or a packed or dense manifest)."""
    mark = _json(os.path.join(folder, MARKER))
    if isinstance(mark, dict) and mark.get("written_by") == WRITER:
        return True
    manifest = _json(os.path.join(folder, "quantization.json"))
    return isinstance(manifest, dict) and manifest.get("format") in OWN_MANIFESTS


def flag_problem(cfg) -> str | None:
    """Why the flags of ``cfg`` (a RunConfig) rule out its --save-format (one line), or None."""
    if cfg.save and cfg.save_format == "compressed-tensors":
        return _ct_problem(cfg)
    return None


def _ct_problem(cfg) -> str | None:
    """What compressed-tensors cannot hold, from the flags alone."""
    flag = "--save-format compressed-tensors"
    if getattr(cfg, "search", ""):
        return (f"{flag}: --search gives linears different widths, grids and masks (some unquantized), and "
                f"this export holds one --groupsize and, asymmetric, one width for all layers; {USE_PACKED}")
    if not cfg.quantizing:
        return (f"{flag}: this run does not quantize, and compressed-tensors 0.20 has no sparse format to store "
                f"a pruned-only model; {USE_PACKED} (or dense)")
    if cfg.grouped and cfg.strategy == "shared":
        return (f"{flag}: --strategy shared gives rows of a group one shared grid, which compressed-tensors "
                f"cannot express (a grid per row or per column group only); {USE_PACKED}")
    if cfg.grouped and cfg.wbits != int(cfg.wbits):
        return (f"{flag}: --wbits {fmt_num(cfg.wbits)} with --groups mixes widths within a layer, and "
                f"compressed-tensors stores one width per layer; {USE_PACKED}")
    if cfg.grouped and cfg.mi_axis == "input":
        return (f"{flag}: --mi-axis input groups columns out of order (a g_idx), which compressed-tensors 0.20 "
                f"cannot store; {USE_PACKED}")
    if cfg.grouped and cfg.target_bpw is not None:  # --bit-alloc uniform, one width, cannot meet a target
        return (f"{flag}: --target-bpw gives a layer's groups different widths to meet the target, and "
                f"compressed-tensors stores one width per layer; {USE_PACKED}")
    if cfg.grouped and cfg.bit_alloc != "uniform":
        return (f"{flag}: --groups with --bit-alloc {cfg.bit_alloc} may give rows different widths even at a "
                f"whole-bit budget, and compressed-tensors stores one width per layer; use --bit-alloc uniform "
                f"or --save-format packed")
    return None
