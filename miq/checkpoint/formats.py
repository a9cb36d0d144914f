"""The save formats, and what each rules out from the flags alone (checked with the flags, before any work).

Torch-free, so that ``miq.run.config`` can refuse a format the run cannot be saved in; the writers are
``packed.py``, ``export_ct.py`` and ``miq.run.saving`` (dense).
"""

from __future__ import annotations

from miq.options import fmt_num

FORMATS = ("packed", "compressed-tensors", "dense")
USE_PACKED = "use --save-format packed"


def flag_problem(cfg) -> str | None:
    """Why the flags of ``cfg`` (a RunConfig) rule out its --save-format (one line), or None."""
    if cfg.save and cfg.save_format == "compressed-tensors":
        return _ct_problem(cfg)
    return None


def _ct_problem(cfg) -> str | None:
    """What compressed-tensors cannot hold, from the flags alone."""
    flag = "--save-format compressed-tensors"
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
    if cfg.grouped and cfg.bit_alloc != "uniform":
        return (f"{flag}: --groups with --bit-alloc {cfg.bit_alloc} may give rows different widths even at a "
                f"whole-bit budget, and compressed-tensors stores one width per layer; use --bit-alloc uniform "
                f"or --save-format packed")
    return None
