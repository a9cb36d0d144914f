"""methods.py: every entry against the real flag parser, the labels reports use, and the sweep matrix."""

from pathlib import Path

import pytest

from miq import methods
from miq.run.config import parse
from miq.sweep import args as sweep_args

# (opt_mi.py flags, label, family): the names every report and sweep has used; a change here renames results
LABELS = [
    ([], "dense", "dense"),
    (["--sparsity", "0.5", "--gmp"], "magnitude", "magnitude"),
    (["--sparsity", "0.5"], "sparsegpt", "sparsegpt"),
    (["--prunen", "2", "--prunem", "4"], "sparsegpt-2:4", "sparsegpt"),
    (["--sparsity", "0.5", "--wbits", "4"], "sparsegpt+uniform", "uniform"),
    (["--wbits", "3"], "uniform", "uniform"),
    (["--sparsity", "0.5", "--wbits", "4", "--gmp"], "magnitude+uniform", "uniform"),
    (["--sparsity", "0.5", "--wbits", "4", "--groupsize", "128"], "sparsegpt+uniform-g128", "uniform-g"),
    (["--prunen", "2", "--prunem", "4", "--wbits", "4", "--groupsize", "64"], "sparsegpt-2:4+uniform-g64", "uniform-g"),
    (["--sparsity", "0.5", "--wbits", "3.5", "--groups", "all"], "sparsegpt+per-channel", "per-channel"),
    (["--sparsity", "0.5", "--wbits", "4", "--groups", "8"], "sparsegpt+mi-B", "mi"),
    (["--wbits", "4", "--groups", "8", "--strategy", "shared"], "mi-A", "mi"),
    (["--wbits", "4", "--groups", "8", "--cluster", "hierarchical"], "mi-B-hier", "mi"),
    (["--wbits", "4", "--groups", "8", "--groupsize", "32"], "mi-B-g32", "mi"),
    (["--wbits", "4", "--groups", "8", "--cluster", "random"], "random-B", "random"),
    (["--wbits", "4", "--groups", "8", "--cluster", "random", "--strategy", "shared"], "random-A", "random"),
    (["--wbits", "4", "--groups", "8", "--cluster", "contiguous"], "contiguous-B", "contiguous"),
    # what else tells runs of one method apart, named only when not the default
    (["--wbits", "3.5", "--groups", "all", "--bit-alloc", "uniform"], "per-channel[uniform]", "per-channel"),
    (["--wbits", "3.5", "--groups", "all", "--alloc-cost", "rtn"], "per-channel[cost=rtn]", "per-channel"),
    (["--wbits", "3.5", "--groups", "8", "--bit-alloc", "hessian-mi"], "mi-B[hessian-mi]", "mi"),
    (["--wbits", "3.5", "--groups", "8", "--bit-alloc", "hessian-mi", "--mi-alpha", "0.5", "--alloc-cost", "rtn"],
     "mi-B[hessian-mi,alpha=0.5,cost=rtn]", "mi"),
    (["--wbits", "3.5", "--groups", "8", "--mi-estimator", "gaussian"], "mi-B[gaussian]", "mi"),
    (["--wbits", "3.5", "--groups", "8", "--cluster", "contiguous", "--mi-estimator", "gaussian"],
     "contiguous-B", "contiguous"),  # contiguous groups estimate no MI
    (["--wbits", "4", "--groups", "8", "--bit-alloc", "uniform"], "mi-B[uniform]", "mi"),
    # issue 10: input-axis groups, act-order, range grouping
    (["--sparsity", "0.5", "--wbits", "3", "--act-order"], "sparsegpt+act-order", "act-order"),
    (["--sparsity", "0.5", "--wbits", "3", "--act-order", "--groupsize", "128"], "sparsegpt+act-order-g128",
     "act-order-g"),
    (["--wbits", "3", "--groups", "6", "--mi-axis", "input"], "mi-in", "mi-in"),
    (["--wbits", "3", "--groups", "6", "--mi-axis", "input", "--act-order"], "mi-in[act-order]", "mi-in"),
    (["--wbits", "3", "--groups", "6", "--mi-axis", "input", "--cluster", "contiguous"], "contiguous-in",
     "contiguous-in"),
    (["--wbits", "3", "--groups", "6", "--mi-axis", "input", "--cluster", "random"], "random-in", "random-in"),
    (["--wbits", "3", "--groups", "6", "--mi-axis", "input", "--cluster", "range"], "range-in", "range-in"),
    (["--wbits", "3.5", "--groups", "6", "--cluster", "range", "--strategy", "shared"], "range-A", "range"),
    (["--sparsity", "0.5", "--act-order"], "sparsegpt-act-order", "sparsegpt-act-order"),
    # --true-sequential changes every later layer's inputs
    (["--sparsity", "0.5", "--true-sequential"], "sparsegpt[true-seq]", "sparsegpt"),
    (["--sparsity", "0.5", "--wbits", "4", "--true-sequential"], "sparsegpt+uniform[true-seq]", "uniform"),
    (["--wbits", "3.5", "--groups", "8", "--bit-alloc", "hessian-mi", "--true-sequential"],
     "mi-B[hessian-mi,true-seq]", "mi"),
    # issue 28: per-linear levels by search
    (["--target-bpw", "3", "--search", "knapsack"], "search-knapsack", "search"),
    (["--target-bpw", "3", "--search", "evo", "--true-sequential"], "search-evo[true-seq]", "search"),
]


@pytest.mark.parametrize("flags,label,family", LABELS, ids=[x[1] for x in LABELS])
def test_labels(flags, label, family):
    assert methods.label(parse(["toy", "synthetic", *flags])) == (label, family)


@pytest.mark.parametrize("m", methods.METHODS, ids=[m.id for m in methods.METHODS])
def test_every_method_is_what_its_flags_select(m):
    cfg = methods.example_config(m)
    assert methods.identify(cfg) is m
    assert methods.label(cfg)[1] == m.family
    assert cfg.quantizing == m.quantized
    assert (cfg.groups not in (0, "all")) == m.per_k


def test_signatures_are_unique():
    keys = [(m.stage, m.key) for m in methods.METHODS]
    assert len(keys) == len(set(keys))
    assert len({m.id for m in methods.METHODS}) == len(methods.METHODS)


def test_default_matrix_is_the_documented_one():
    ids = [c.id for c in methods.matrix(methods.SweepOptions())]
    assert ids == ["dense", "magnitude_s0.5", "sparsegpt_s0.5", "uniform_s0.5_w4", "g128_s0.5_w4",
                   "perchannel_s0.5_w4", "miA_s0.5_w4_k8", "miB_s0.5_w4_k8", "random_s0.5_w4_k8",
                   "contiguous_s0.5_w4_k8"]
    for c in methods.matrix(methods.SweepOptions()):
        cfg = parse(["toy", "synthetic", *c.flags])  # every configuration is a valid opt_mi.py command line
        assert methods.identify(cfg).id == c.id.split("_")[0]


def test_matrix_sizes_skips_and_zero_sparsity():
    opts = methods.SweepOptions(sparsities=("0", "0.5", "0.6"), wbits=("3", "3.5"), ks=(4, 8))
    cfgs = methods.matrix(opts)
    # dense + 2 pruned sparsities x 2 + 3 sparsities x 2 budgets x (3 + 4 x 2)
    assert len(cfgs) == 1 + 2 * 2 + 3 * 2 * (3 + 4 * 2)
    assert not any(c.id.startswith(("magnitude_s0_", "sparsegpt_s0_")) or c.id in ("magnitude_s0", "sparsegpt_s0")
                   for c in cfgs)
    skipped = {c.id for c in cfgs if c.skip}
    assert skipped == {f"{m}_s{s}_w3.5" for m in ("uniform", "g128") for s in ("0", "0.5", "0.6")}
    assert all("whole bits" in c.skip for c in cfgs if c.skip)


def test_unknown_signature_is_an_error():
    with pytest.raises(ValueError, match="signature"):
        methods._find("quant", ("groups", "nosuch", "independent"))


def test_the_readme_names_every_method():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [m.id for m in methods.METHODS if f"`{m.id}`" not in readme]
    assert not missing, f"README.md does not name {missing}"


def test_frontier_matrix_spans_sparsity_width_grid_and_order():
    raw = {f: d for f, (_, d, _) in sweep_args.FLAGS.items()}
    sweep = sweep_args.parse_args(["--matrix", "frontier", "--out", "/tmp/unused-frontier"])
    assert raw["--sparsities"] != " ".join(sweep.matrix.sparsities)
    cfgs = methods.matrix(sweep.matrix)
    ids = {c.id for c in cfgs}
    # sparsity 0, 0.5, 0.6, 0.7 and 2:4 x widths 2, 3, 4, 5, 8 x per-row/g128 x natural/act-order, plus the
    # 16-bit column: dense, and pruning only with and without act-order; plus knapsack and evo at 3 budgets
    assert len(cfgs) == 5 * 5 * 4 + 4 * 2 + 1 + 2 * 3 and len(ids) == len(cfgs)
    assert {"dense", "uniform_s0_w3", "g128_s0.7_w2", "act-order-g128_s2of4_w4", "sparsegpt_s2of4",
            "sparsegpt-act-order_s0.6"} <= ids
    two_four = next(c for c in cfgs if c.id == "uniform_s2of4_w4")
    cfg = parse(["toy", "synthetic", *two_four.flags])
    assert (cfg.prunen, cfg.prunem, cfg.wbits, cfg.sparsity) == (2, 4, 4, 0.0)
    assert all(c.skip is None for c in cfgs)
    # explicit flags still win over the preset
    mine = sweep_args.parse_args(["--matrix", "frontier", "--wbits", "3", "--out", "/tmp/unused-frontier"])
    assert mine.matrix.wbits == ("3",) and mine.matrix.sparsities == ("0", "0.5", "0.6", "0.7", "2:4")
    with pytest.raises(sweep_args.UsageError, match="--matrix nope: one of mi, frontier"):
        sweep_args.parse_args(["--matrix", "nope"])


def test_frontier_matrix_runs_the_searches_at_their_budgets_paired_by_seed_with_uniform():
    sweep = sweep_args.parse_args(["--matrix", "frontier", "--seeds", "0 1 2", "--out", "/tmp/unused-frontier"])
    assert sweep.matrix.budgets == ("2.5", "3", "3.5")
    cfgs = {c.id: c for c in methods.matrix(sweep.matrix)}
    sweep_args.check_matrix(sweep, list(cfgs.values()))  # every configuration through opt_mi.py's parser
    for m in ("search-knapsack", "search-evo"):
        for b in ("2.5", "3", "3.5"):
            for seed in (0, 1, 2):
                cfg = parse(sweep_args.config_args(sweep, cfgs[f"{m}_b{b}_seed{seed}"]))
                assert (cfg.search, cfg.target_bpw, cfg.seed) == (m.split("-")[1], float(b), seed)
                assert methods.identify(cfg).id == m and not cfg.pruning and cfg.wbits == 16
                assert parse(sweep_args.config_args(sweep, cfgs[f"uniform_s0_w3_seed{seed}"])).seed == seed
    assert not [i for i in cfgs if i.startswith("search") and "_s0" in i]  # not once per sparsity or width
    # explicit budgets win; narrowing the methods away from the searches drops the preset's budgets
    mine = sweep_args.parse_args(["--matrix", "frontier", "--search-budgets", "2.75 3.0", "--out", "/tmp/u"])
    assert {c.id for c in methods.matrix(mine.matrix) if c.id.startswith("search-evo")} == {
        "search-evo_b2.75", "search-evo_b3"}
    plain = sweep_args.parse_args(["--matrix", "frontier", "--methods", "dense uniform", "--out", "/tmp/u"])
    assert plain.matrix.budgets == () and all(c.id.startswith(("dense", "uniform")) for c in methods.matrix(
        plain.matrix))


@pytest.mark.parametrize("argv, message", [
    (["--methods", "search-evo"], "--methods search-evo: a searched method needs --search-budgets"),
    (["--search-budgets", "3"], "--search-budgets '3': no searched method in --methods"),
    (["--matrix", "frontier", "--search-budgets", "3 3.0"], "--search-budgets '3 3.0': give distinct values"),
    (["--matrix", "frontier", "--search-budgets", "16"], "--search-budgets: 16 is not above 0 and below 16"),
    (["--matrix", "frontier", "--search-budgets", "0"], "--search-budgets: 0 is not above 0 and below 16"),
    (["--matrix", "frontier", "--search-budgets", "three"], "--search-budgets: three is not a number"),
])
def test_search_budgets_are_checked_before_the_first_job(argv, message):
    with pytest.raises(sweep_args.UsageError) as e:
        sweep_args.parse_args([*argv, "--out", "/tmp/unused-frontier"])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
