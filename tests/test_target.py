"""--target-bpw: the storage a run is asked to meet, met from below within 0.01 bpw, or refused before work.

The prediction it rests on is checked against what really happens: the kept weights against SparseGPT's
masks, the metadata bound against what the packed format stores, and the whole against runs' ``bits.bpw``.
"""

import json

import pytest
import torch
from torch import nn

import opt_mi
from miq.errors import ConfigError
from miq.options import PassOptions
from miq.run import config, target
from sparsegpt_mi import SparseGPT

FAST = ["--nsamples", "16", "--seqlen", "64", "--analysis-dir", ""]


@pytest.mark.parametrize("flags", [(0.5, 0, 0, 128), (0.37, 0, 0, 48), (0.6, 0, 0, 7), (0.0, 2, 4, 128),
                                   (0.0, 1, 8, 32)])
def test_kept_weights_are_what_sparsegpt_keeps(flags):
    sparsity, n, m, blocksize = flags
    g = torch.Generator().manual_seed(1)
    layer = nn.Linear(104, 24, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(24, 104, generator=g))
    gpt = SparseGPT(layer)
    gpt.add_batch(torch.randn(64, 104, generator=g), layer(torch.randn(64, 104, generator=g)))
    args = ["toy", "synthetic", "--blocksize", str(blocksize)] + (
        ["--prunen", str(n), "--prunem", str(m)] if n else ["--sparsity", str(sparsity)])
    cfg = config.parse(args)
    gpt.prune(PassOptions(sparsity=sparsity, prunen=n, prunem=m, blocksize=blocksize), None)
    assert target.kept_weights(24, 104, cfg) == int((~gpt.result.mask).sum())


def _run(toy, tmp_path, eval_set, *flags, name="r"):
    out = tmp_path / f"{name}.json"
    assert opt_mi.main([toy, "synthetic", *FAST, "--eval", eval_set, "--json", str(out), *flags]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("flags", [
    ["--sparsity", "0.5", "--groups", "8", "--target-bpw", "3.0"],
    ["--groups", "all", "--target-bpw", "3.3", "--alloc-cost", "rtn"],
    ["--prunen", "2", "--prunem", "4", "--groups", "6", "--strategy", "shared", "--target-bpw", "2.6",
     "--act-order", "--sym"],
    ["--sparsity", "0.6", "--groups", "4", "--mi-axis", "input", "--cluster", "range", "--target-bpw", "3.6"],
], ids=["unstructured", "dense-all", "2of4-shared", "input-axis"])
@pytest.mark.slow
def test_runs_meet_the_target_from_below(toy_path, tmp_path, small_eval, flags):
    r = _run(toy_path, tmp_path, small_eval, *flags)
    want = float(flags[flags.index("--target-bpw") + 1])
    # within 0.01 below; on the input axis a column group's cost is an estimate (columns are coupled) that
    # may say a wider width buys nothing, and the last layer's bits then stay unspent: 3.577 here
    assert want - (0.03 if "input" in flags else 0.01) <= r["bits"]["bpw"] <= want
    for layer in r["layers"]:  # each layer's knapsack: its kept weights at their widths, within its budget
        kept = layer["channels"] * layer["in_features"] - layer["pruned"]
        assert layer["charged_code_bits"] == layer["code_bits"] <= layer["wbits_budget"] * kept + 1e-6


@pytest.mark.slow
def test_the_metadata_bound_holds_for_stored_layers(toy_path):
    """grid_bound's metadata is at least what the packed format stores, layer by layer."""
    from conftest import compress_toy

    for flags in (["--sparsity", "0.5", "--wbits", "3.5", "--groups", "8"],
                  ["--prunen", "2", "--prunem", "4", "--wbits", "3", "--groups", "4", "--act-order"],
                  ["--wbits", "3", "--groups", "5", "--strategy", "shared", "--groupsize", "32", "--act-order"],
                  ["--wbits", "3", "--groups", "3", "--mi-axis", "input", "--cluster", "random"]):
        _, _, res, cfg = compress_toy(toy_path, *flags)
        for q, b in zip(res.saved, res.bits, strict=True):
            rows, cols = q.weight.shape
            assert b.metadata_bits <= target.grid_bound(rows, cols, cfg).metadata_bits()
            assert b.mask_bits <= target.overhead(rows, cols, cfg) - target.grid_bound(rows, cols, cfg).metadata_bits()


def test_an_unreachable_target_is_refused_before_work(toy_path, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = opt_mi.main([toy_path, "synthetic", *FAST, "--json", str(out), "--sparsity", "0.5", "--groups", "8",
                        "--target-bpw", "1.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and not out.exists()
    assert "--target-bpw 1.5" in err[0] and "nearest feasible target is" in err[0]
    low = float(err[0].split("stores ")[1].split(" to ")[0])
    cfg = config.parse([toy_path, "synthetic", *FAST, "--sparsity", "0.5", "--groups", "8",
                        "--target-bpw", str(low)])
    assert opt_mi.prepare(cfg)[0].wbits >= cfg.bits_choices[0]  # the range said is feasible
    with pytest.raises(ConfigError, match="nearest feasible target"):
        opt_mi.prepare(config.parse([toy_path, "synthetic", *FAST, "--groups", "8", "--target-bpw", "15"]))


@pytest.mark.parametrize("flags, words", [
    (["--wbits", "4", "--groups", "8", "--target-bpw", "3"], "either --wbits"),
    (["--target-bpw", "3"], "give --groups"),
    (["--groups", "8", "--bit-alloc", "uniform", "--target-bpw", "3"], "takes an allocation"),
    (["--groups", "8", "--target-bpw", "nan"], "finite"),
    (["--groups", "8", "--target-bpw", "16"], "below 16"),
])
def test_target_flags_are_checked(flags, words):
    with pytest.raises(ConfigError, match=words):
        config.parse(["toy", "synthetic", *flags])


@pytest.mark.slow
def test_testbed_meets_the_target(testbed, tmp_path):
    out = tmp_path / "tb.json"
    small = tmp_path / "eval.txt"
    small.write_text("the cat sat on the mat. " * 400)
    # 8 windows of 64 tokens, 256 MI samples in 8 bins (not the default 8192 in 16, which made MI most of the
    # run): the target is met by the allocation, whatever the grouping it is handed
    assert opt_mi.main([str(testbed), "synthetic", "--nsamples", "8", "--seqlen", "64", "--mi-samples", "256",
                        "--mi-bins", "8", "--analysis-dir", "", "--eval", str(small), "--sparsity", "0.5",
                        "--groups", "16", "--target-bpw", "3.1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert 3.09 <= r["bits"]["bpw"] <= 3.1
