"""Issue 10 end to end on the toy model: input-column groups, act-order, range grouping; budgets and levels."""

import json

import pytest
import torch

import opt_mi
from miq.checkpoint import packed

pytestmark = pytest.mark.slow
FAST = ["--nsamples", "16", "--seqlen", "64", "--analysis-dir", "", "--sparsity", "0.5"]


@pytest.fixture
def run(toy_path, tmp_path, small_eval):
    """run(*flags, name=...): opt_mi.py on the toy in this process, evaluated on the session's small_eval (a
    tenth of the synthetic test text: what is checked here does not depend on the eval set); its JSON."""
    def run(*extra, name="r") -> dict:
        out = tmp_path / f"{name}.json"
        assert opt_mi.main([toy_path, "synthetic", *FAST, "--eval", small_eval, "--json", str(out), *extra]) == 0
        return json.loads(out.read_text())
    return run


def test_contiguous_input_groups_equal_gptq_groups_bit_for_bit(run):
    """K = in_features / G consecutive column groups at the uniform width are GPTQ's --groupsize G."""
    sel = ["--prune_only", "self_attn", "--wbits", "3"]  # the attention projections: 64 input columns each
    g = run(*sel, "--groupsize", "32", name="g")
    c = run(*sel, "--groups", "2", "--mi-axis", "input", "--cluster", "contiguous",
            "--bit-alloc", "uniform", name="c")
    assert c["method"] == "sparsegpt+contiguous-in[uniform]" and g["method"] == "sparsegpt+uniform-g32"
    assert c["ppl"] == g["ppl"]
    assert [x["loss"]["incurred"] for x in c["layers"]] == [x["loss"]["incurred"] for x in g["layers"]]
    assert all(x["labels"] == [0] * 32 + [1] * 32 for x in c["layers"])


@pytest.mark.parametrize("extra", [
    ["--mi-axis", "input"],
    ["--mi-axis", "input", "--act-order"],
    ["--mi-axis", "input", "--cluster", "random"],
    ["--mi-axis", "input", "--cluster", "range"],
    ["--cluster", "range", "--strategy", "shared"],
    ["--act-order"],
], ids=["mi-in", "mi-in-act-order", "random-in", "range-in", "range-A", "mi-B-act-order"])
def test_methods_hold_the_budget_and_the_levels(run, tmp_path, extra):
    save = tmp_path / "model"
    r = run("--wbits", "3.5", "--groups", "4", "--save", str(save), *extra)
    weights = packed.load_compressed(str(save)).state_dict()  # the saved (packed) model, decoded
    for layer in r["layers"]:
        sizes, bits, labels = layer["group_sizes"], layer["group_bits"], layer["labels"]
        n = layer["in_features"] if layer["axis"] == "input" else layer["channels"]
        assert len(labels) == n and sum(sizes) == n and len(sizes) == 4
        kept = layer["channels"] * layer["in_features"] - layer["pruned"]
        assert layer["charged_code_bits"] == layer["code_bits"] <= 3.5 * kept  # the budget, on kept weights
        W = weights[f"{layer['name']}.weight"]
        for g in range(4):  # every (row, group) holds at most 2^bits values (pruned zeros included)
            part = W[:, torch.tensor(labels) == g] if layer["axis"] == "input" else W[torch.tensor(labels) == g]
            assert max(torch.unique(row).numel() for row in part) <= 2 ** bits[g]
        assert {"predicted", "incurred", "obs"} <= set(layer["loss"])
        if layer["axis"] == "input":
            assert len(layer["h_mass"]) == 4 and abs(sum(layer["h_mass"]) - 1) < 1e-5
    assert abs(r["sparsity"] - 0.5) < 1e-9


def test_input_axis_predicted_and_incurred_losses_are_close(run):
    """Column groups are coupled, so the trial's per-column losses only predict the mixed-width pass."""
    r = run("--wbits", "3.5", "--groups", "4", "--mi-axis", "input")
    for layer in r["layers"]:
        p, i = layer["loss"]["predicted"], layer["loss"]["incurred"]
        assert i == pytest.approx(layer["loss"]["obs"], rel=1e-3)  # the loop's losses add up to the error
        assert 0.5 < i / p < 2.0, (layer["name"], p, i)
