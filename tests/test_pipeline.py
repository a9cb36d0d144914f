"""End to end on the toy model (and the ../shared testbed when present): walker, methods, bits, save (the packed
format, read back through its loader) and reload."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import datautils
import opt_mi
from miq.checkpoint import packed
from miq.model import layerwalk

pytestmark = pytest.mark.slow
FAST = ["--nsamples", "16", "--seqlen", "64", "--analysis-dir", ""]


@pytest.fixture
def run(toy_path, tmp_path, small_eval):
    """run(*flags, name=...): opt_mi.py on the toy in this process, evaluated on a tenth of the synthetic test
    text (the comparisons below hold on it; evaluating the whole text was a third of each run); its JSON."""
    def run(*extra, name="r") -> dict:
        out = tmp_path / f"{name}.json"
        code = opt_mi.main([toy_path, "synthetic", *FAST, "--eval", small_eval, "--json", str(out), *extra])
        assert code == 0
        return json.loads(out.read_text())
    return run


def ppl(result: dict) -> float:
    """The run's one perplexity (it was evaluated on one set)."""
    (value,) = result["ppl"].values()
    return value


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_dense_walker_equals_full_forward(toy_path, attn):
    """SDPA layers get attention_mask=None and rely on is_causal; eager ones get an explicit 4-D mask.
    The walker replays whatever the model passed, so both must equal the full forward pass."""
    model = AutoModelForCausalLM.from_pretrained(toy_path, attn_implementation=attn).eval()
    tok = AutoTokenizer.from_pretrained(toy_path)
    tokens = datautils.get_eval_tokens("synthetic", 128, tok)[:, : 128 * 20]
    dev = torch.device("cpu")
    a = layerwalk.perplexity(model, tokens, 128, dev)
    b = layerwalk.full_forward_perplexity(model, tokens, 128, dev)
    assert abs(a - b) / b < 1e-4


def test_walker_matches_testbed_documented_ppl(testbed):
    model = AutoModelForCausalLM.from_pretrained(testbed).eval()
    tok = AutoTokenizer.from_pretrained(testbed)
    path = str(testbed.parents[1] / "data" / "c4_heldout.jsonl")
    tokens = datautils.get_eval_tokens(path, 256, tok)
    ppl = layerwalk.perplexity(model, tokens, 256, torch.device("cpu"))
    assert abs(ppl - 240.963) < 0.01  # TRAINED.md's full-forward figure


def test_sparsegpt_beats_magnitude_and_hits_sparsity(run):
    dense = run(name="dense")
    sgpt = run("--sparsity", "0.5", name="sgpt")
    mag = run("--sparsity", "0.5", "--gmp", name="mag")
    d, s, m = ppl(dense), ppl(sgpt), ppl(mag)
    assert d < s < m
    assert abs(sgpt["sparsity"] - 0.5) < 0.005
    assert abs(mag["sparsity"] - 0.5) < 0.005
    assert sgpt["method"] == "sparsegpt" and mag["method"] == "magnitude" and dense["method"] == "dense"
    assert dense["bits"]["bpw"] == 16 and sgpt["bits"]["mask_bpw"] == 1.0


def test_same_seed_same_result_and_seed_matters(run):
    a = run("--sparsity", "0.5", "--wbits", "4", "--groups", "4", name="a")
    b = run("--sparsity", "0.5", "--wbits", "4", "--groups", "4", name="b")
    c = run("--sparsity", "0.5", "--wbits", "4", "--groups", "4", "--seed", "1", name="c")
    assert a["ppl"] == b["ppl"]
    assert [r["labels"] for r in a["layers"]] == [r["labels"] for r in b["layers"]]
    assert [r["group_bits"] for r in a["layers"]] == [r["group_bits"] for r in b["layers"]]
    assert a["ppl"] != c["ppl"]


def test_groups_all_uniform_alloc_equals_per_channel_baseline(run, tmp_path):
    base = run("--sparsity", "0.5", "--wbits", "4", "--save", str(tmp_path / "m0"), name="u")
    allg = run("--sparsity", "0.5", "--wbits", "4", "--groups", "all", "--bit-alloc", "uniform",
               "--save", str(tmp_path / "m1"), name="all")
    assert base["ppl"] == allg["ppl"]
    w0 = packed.load_compressed(str(tmp_path / "m0")).state_dict()
    w1 = packed.load_compressed(str(tmp_path / "m1")).state_dict()
    assert set(w0) == set(w1) and all(torch.equal(w0[k], w1[k]) for k in w0)


def _levels_within_bits(save_dir, result: dict) -> tuple[int, float]:
    """Independent count: distinct values per row of the reloaded (packed) model vs 2^bits of the row's group
    as the run recorded it (labels, group_bits), and the widths the manifest stores vs those; returns
    (rows, mean bits)."""
    model = packed.load_compressed(str(save_dir))
    manifest = json.loads((save_dir / "quantization.json").read_text())
    rows, bits_sum, n = 0, 0.0, 0
    for layer in result["layers"]:
        W = model.get_parameter(f"{layer['name']}.weight")
        row_bits = ([layer["group_bits"][g] for g in layer["labels"]] if layer.get("group_bits")
                    else [int(result["config"]["wbits"])] * len(W))
        assert manifest["layers"][layer["name"]]["widths"]["table"] == sorted(set(row_bits))
        for r, b in zip(W, row_bits, strict=True):
            assert torch.unique(r).numel() <= 2**b
            rows += 1
        bits_sum += sum(row_bits) * W.shape[1]
        n += W.numel()
    return rows, bits_sum / n


@pytest.mark.parametrize(
    "extra",
    [
        ["--strategy", "independent"],
        ["--strategy", "shared"],
        ["--cluster", "random"],
        ["--cluster", "contiguous"],
        ["--cluster", "hierarchical"],
        ["--bit-alloc", "hessian-mi"],
    ],
    ids=["mi-B", "mi-A", "random", "contiguous", "hierarchical", "hessian-mi"],
)
def test_mi_methods_end_to_end_with_budget_and_levels(run, tmp_path, small_eval, extra):
    save = tmp_path / "model"
    r = run("--sparsity", "0.5", "--wbits", "3.5", "--groups", "6", "--save", str(save), *extra)
    assert all(math.isfinite(v) for v in r["ppl"].values())
    for layer in r["layers"]:
        sizes = layer["group_sizes"]
        assert len(sizes) == 6 and min(sizes) > 0
        # the knapsack charged each row's kept weights at its width: exactly the codes the layer stores,
        # within the budget of 3.5 bits per kept weight
        kept = layer["channels"] * layer["in_features"] - layer["pruned"]
        assert layer["charged_code_bits"] == layer["code_bits"] <= 3.5 * kept
        assert set(layer["timing"]) >= {"mi_s", "cluster_s", "alloc_s", "prune_s"}
    rows, _ = _levels_within_bits(save, r)
    assert rows == sum(layer["channels"] for layer in r["layers"])
    # what the account charges for codes is what the folder stores: its code streams, kept weights only
    manifest = json.loads((save / "quantization.json").read_text())
    stored = sum(int(w) * n for e in manifest["layers"].values() for w, n in e["codes"].items())
    kept = sum(layer["channels"] * layer["in_features"] - layer["pruned"] for layer in r["layers"])
    assert sum(n for e in manifest["layers"].values() for n in e["codes"].values()) == kept
    assert r["bits"]["bits_per_kept_weight"] == pytest.approx(stored / kept, rel=1e-12)
    assert stored <= 3.5 * kept  # --wbits: the mean width of the kept weights
    # reload gives the same perplexity
    code = opt_mi.main([str(save), "synthetic", *FAST, "--eval", small_eval, "--json", str(tmp_path / "re.json")])
    assert code == 0
    again = json.loads((tmp_path / "re.json").read_text())
    assert ppl(again) == pytest.approx(ppl(r), rel=1e-6)


def test_layer_records_and_figures(toy_path, tmp_path, small_eval):
    out = tmp_path / "r.json"
    code = opt_mi.main([toy_path, "synthetic", "--nsamples", "16", "--seqlen", "64", "--wbits", "4", "--groups", "4",
                        "--eval", small_eval, "--analysis-dir", str(tmp_path / "an"), "--json", str(out)])
    assert code == 0
    r = json.loads(out.read_text())
    names = [x["name"] for x in r["layers"]]
    assert "model.decoder.layers.0.fc1" in names and len(names) == 12
    assert (tmp_path / "an" / "mi_matrix.png").is_file() and (tmp_path / "an" / "grouping_result.png").is_file()
    # no pruning: no mask is charged; weights that round onto the zero grid point still count as zeros
    assert r["bits"]["mask_bpw"] == 0 and r["method"] == "mi-B"


def test_layer_selection_flags(run):
    r = run("--sparsity", "0.5", "--minlayer", "1", "--prune_only", "fc")
    assert [x["name"] for x in r["layers"]] == ["model.decoder.layers.1.fc1", "model.decoder.layers.1.fc2"]
    inv = run("--sparsity", "0.5", "--minlayer", "1", "--prune_only", "fc", "--invert", name="i")
    assert len(inv["layers"]) == 10


def test_walker_handles_opt350m_layout():
    """OPT-350m projects 512 <-> 1024 around the decoder and norms after attention: same walker, same PPL."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                    max_position_embeddings=64, word_embed_proj_dim=16, do_layer_norm_before=False)
    model = OPTForCausalLM(cfg).eval()
    assert model.model.decoder.project_in is not None and model.model.decoder.final_layer_norm is None
    tokens = torch.randint(4, 97, (1, 32 * 6))
    dev = torch.device("cpu")
    a = layerwalk.perplexity(model, tokens, 32, dev)
    b = layerwalk.full_forward_perplexity(model, tokens, 32, dev)
    assert abs(a - b) / b < 1e-5


def test_k_above_channels_warns_once_and_clips(run, capsys):
    r = run("--wbits", "4", "--groups", "100")  # toy: 64-row attention, 256-row fc1
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning: --groups 100")]
    assert len(warnings) == 1 and "64 channels" in warnings[0]
    assert {(x["channels"], x["groups"]) for x in r["layers"]} == {(64, 64), (256, 100)}
