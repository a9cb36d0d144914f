"""A model loaded from a compressed-tensors folder, made a plain model of its decompressed weights.

transformers loads such a folder with the compressed-tensors library attached: each quantized linear keeps
its ``weight_scale`` (and ``weight_shape``, ``weight_zero_point`` ...) beside the weight, the model decompresses
itself on its first forward, and config.json's ``quantization_config`` stays on the model. Compressed again by
this toolkit, those tensors describe a grid the new weights no longer use: saved with them, a folder does not
reopen (a packed folder refuses the unknown tensors; a dense or compressed-tensors one would pair the new
weights with the old scheme). Decompressed once, here, and stripped of all that, the model is what every
other loaded model is: its weights, evaluated as they are (the library's decompressed forward is the plain
one: checked in tests/test_reliability_run.py).
"""

from __future__ import annotations

from torch import nn

PLAIN = ("weight", "bias")  # a linear's own tensors; everything else on a quantized module is the library's


def make_plain(model: nn.Module) -> nn.Module:
    """``model`` (from ``from_pretrained`` of a compressed-tensors folder) decompressed and detached from the
    library, in place; returned for chaining. A model without the library is returned unchanged."""
    compressor = getattr(getattr(model, "hf_quantizer", None), "compressor", None)
    if compressor is not None:
        compressor.decompress_model(model)  # what its hook would do on the first forward; idempotent
    for module in model.modules():
        if not hasattr(module, "quantization_scheme"):
            continue
        for name in [n for n, _ in module.named_parameters(recurse=False) if n not in PLAIN]:
            delattr(module, name)
        for name in [n for n, _ in module.named_buffers(recurse=False) if n not in PLAIN]:
            delattr(module, name)
        for attr in ("forward", "quantization_scheme", "quantization_status"):  # the library's wrapped forward
            module.__dict__.pop(attr, None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    return model
