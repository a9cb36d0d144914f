"""--save-format compressed-tensors: what the library can express loads through transformers'
from_pretrained with the toolkit's exact weights; what it cannot is one line naming --save-format packed,
exit 2, nothing written."""

import json
import os

import pytest
import torch
from conftest import compress_toy
from transformers import AutoModelForCausalLM, AutoTokenizer

import datautils
import opt_mi
from miq.checkpoint import export_ct
from miq.errors import ConfigError
from miq.model import layerwalk
from miq.run import saving
from quant import QuantizedLayer, rtn_grid
from sparsegpt_mi import column_groups

FAST = ["--nsamples", "4", "--seqlen", "32", "--analysis-dir", ""]
CT = ["--save-format", "compressed-tensors"]


def _refused(capsys, tmp_path, argv, *expect) -> str:
    save, out = tmp_path / "ct", tmp_path / "r.json"
    code = opt_mi.main(argv + ["--save", str(save), "--json", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "--save-format packed" in err and all(e in err for e in expect), err
    assert not out.exists() and not save.exists() and not list(tmp_path.glob("ct.tmp-*"))
    return err


@pytest.mark.parametrize("flags,expect", [
    (["--sparsity", "0.5"], ["does not quantize"]),
    (["--wbits", "4", "--groups", "4", "--strategy", "shared"], ["--strategy shared"]),
    (["--wbits", "3.5", "--groups", "4"], ["--wbits 3.5", "one width per layer"]),
    (["--wbits", "4", "--groups", "4", "--mi-axis", "input", "--bit-alloc", "uniform"], ["--mi-axis input"]),
    (["--wbits", "4", "--groups", "all"], ["--bit-alloc hessian", "one width per layer"]),
], ids=["pruned-only", "mi-A", "fractional-budget", "input-axis", "whole-budget-allocation"])
def test_flags_it_cannot_express_are_refused_before_the_run(capsys, tmp_path, flags, expect):
    _refused(capsys, tmp_path, ["toy", "synthetic", *FAST, *CT, *flags], *expect)


def _layer(bits, *, sym=False, groupsize=-1, C=64, row_groups=None, name="l") -> QuantizedLayer:
    W = torch.randn(16, C)
    Q, s, z, m = rtn_grid(W, bits, sym=sym, groupsize=groupsize, row_groups=row_groups)
    return QuantizedLayer(name, Q, None, s, z, m, column_groups(C, groupsize), sym=sym, row_groups=row_groups)


def test_layers_it_cannot_express_are_refused_by_name():
    mixed = _layer(torch.tensor([3, 4] * 8))
    shared = _layer(4, row_groups=torch.arange(16) // 4)
    perm = _layer(4, groupsize=16)
    perm.g_idx = perm.g_idx[torch.randperm(64)]
    pruned = QuantizedLayer("l", torch.randn(16, 64), None, None, None, None, column_groups(64, -1))
    for q, why in [(mixed, "mix widths"), (shared, "share grids"), (perm, "act-order g_idx"), (pruned, "not quant")]:
        with pytest.raises(ConfigError, match=why):
            export_ct.schemes([q], 16 if q is perm else -1)
    with pytest.raises(ConfigError, match="asymmetric layers of different widths"):
        export_ct.schemes([_layer(3, name="a"), _layer(4, name="b")], -1)
    # symmetric layers may differ: each width its own config group
    assert len(export_ct.schemes([_layer(3, sym=True, name="a"), _layer(4, sym=True, name="b")], -1)) == 2


def test_schemes_channel_group_or_block():
    """Groups that divide every row are 'group'; a partial last group needs 'block' [1, groupsize]."""
    def strategy(layers, gs):
        return [args for args, _ in export_ct.schemes(layers, gs).values()]

    assert strategy([_layer(4)], -1) == [{"num_bits": 4, "type": "int", "symmetric": False, "strategy": "channel"}]
    assert strategy([_layer(4, groupsize=32)], 32)[0]["strategy"] == "group"
    both = strategy([_layer(4, groupsize=48, name="a"), _layer(4, groupsize=48, C=96, name="b")], 48)
    assert len(both) == 1 and both[0]["block_structure"] == [1, 48]


def test_inexpressible_after_compression_writes_nothing(toy_path, tmp_path):
    """Mixed widths found only after compression (an integer budget can still mix): refused, no folder."""
    model, tok, res, cfg = compress_toy(toy_path, "--wbits", "4", *CT, save=str(tmp_path / "ct"))
    res.saved[0] = _layer(torch.tensor([3, 4] * 8), name=res.saved[0].name)
    with pytest.raises(ConfigError, match=f"layer {res.saved[0].name}: its rows mix widths"):
        saving.save(model, tok, res, cfg, cfg.save)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flags,dequantize", [
    (["--sparsity", "0.5", "--wbits", "4"], True),
    (["--sparsity", "0.5", "--wbits", "3", "--groupsize", "128"], False),
    (["--prunen", "2", "--prunem", "4", "--wbits", "4", "--sym", "--groupsize", "32"], False),
], ids=["4bit-channel-asym", "3bit-g128-block-asym", "2of4-4bit-g32-sym"])
def test_from_pretrained_gives_the_same_model(toy_path, tmp_path, capsys, flags, dequantize):
    model, tok, res, cfg = compress_toy(toy_path, *flags, *CT)
    stats = saving.save(model, tok, res, cfg, str(tmp_path / "ct"))
    assert "pruning masks are not stored" in capsys.readouterr().err
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config.get("dequantize", False) == dequantize
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct")).eval()
    tokens = torch.randint(4, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(tokens).logits, loaded(tokens).logits  # the first forward decompresses where needed
    assert (a - b).abs().max() <= 1e-5
    for q in res.saved:
        assert torch.equal(loaded.get_parameter(f"{q.name}.weight"), q.weight)
    assert stats["bytes_on_disk"] > 0


@pytest.mark.slow
def test_opt_mi_export_then_from_pretrained_ppl(toy_path, tmp_path, small_eval):
    save, out = tmp_path / "ct", tmp_path / "r.json"
    argv = [toy_path, "synthetic", *FAST, "--eval", small_eval, "--sparsity", "0.5", "--wbits", "4", *CT,
            "--save", str(save), "--json", str(out)]
    assert opt_mi.main(argv) == 0
    r = json.loads(out.read_text())
    assert r["bits"]["bytes_on_disk"] > 0
    model = AutoModelForCausalLM.from_pretrained(str(save)).eval()
    tokens = datautils.get_eval_tokens(small_eval, 32, AutoTokenizer.from_pretrained(str(save)))
    ppl = layerwalk.full_forward_perplexity(model, tokens, 32, torch.device("cpu"))
    assert ppl == pytest.approx(r["ppl"][small_eval], rel=1e-4)


@pytest.mark.slow
def test_opt_mi_reopens_its_compressed_tensors_folder(toy_path, tmp_path, small_eval):
    """opt_mi.py DIR on a compressed-tensors folder: from_pretrained reads it whole (its tensors are the
    quantizer's, not the architecture's), and the perplexity is the saving run's."""
    save = tmp_path / "ct"
    first = [toy_path, "synthetic", *FAST, "--eval", small_eval, "--wbits", "4", "--sym", *CT, "--save", str(save),
             "--json", str(tmp_path / "a.json")]
    assert opt_mi.main(first) == 0
    assert opt_mi.main([str(save), "synthetic", *FAST, "--eval", small_eval, "--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text())["ppl"][small_eval] for n in "ab")
    assert b == pytest.approx(a, rel=1e-5)
