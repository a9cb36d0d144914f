"""A flag that would change nothing given the others is refused (one line naming it and why), or, for the MI
estimator's flags where no MI is computed, warned about and recorded; the method vocabulary produces none."""

import pytest

from miq import methods
from miq.errors import ConfigError
from miq.run.config import parse

T = ["toy", "synthetic"]
Q = ["--sparsity", "0.5", "--wbits", "4"]


@pytest.mark.parametrize("flags, expect", [
    (["--sparsity", "0.5", "--groupsize", "32"], ("--groupsize 32", "does not quantize")),
    (["--sparsity", "0.5", "--sym"], ("--sym", "does not quantize")),
    (["--true-sequential"], ("--true-sequential", "compresses nothing")),
    (["--act-order"], ("--act-order", "compresses nothing")),
    (["--percdamp", "0.1"], ("--percdamp 0.1", "compresses nothing")),
    (["--sparsity", "0.5", "--gmp", "--percdamp", "0.1"], ("--percdamp 0.1", "--gmp")),
    (["--sparsity", "0.5", "--gmp", "--true-sequential"], ("--true-sequential", "--gmp")),
    (["--sparsity", "0.5", "--gmp", "--blocksize", "64"], ("--blocksize 64", "--gmp")),
    ([*Q, "--strategy", "shared"], ("--strategy shared", "--groups K")),
    ([*Q, "--cluster", "range"], ("--cluster range", "--groups K")),
    ([*Q, "--bits-choices", "2,4"], ("--bits-choices 2,4", "--groups K")),
    ([*Q, "--bit-alloc", "uniform"], ("--bit-alloc uniform", "--groups K")),
    ([*Q, "--groups", "all", "--cluster", "random"], ("--cluster random", "nothing is clustered")),
    ([*Q, "--groups", "all", "--strategy", "shared"], ("--strategy shared", "nothing to share")),
    ([*Q, "--groups", "8", "--bit-alloc", "uniform", "--alloc-cost", "rtn"], ("--alloc-cost rtn", "no costs")),
    ([*Q, "--groups", "8", "--mi-alpha", "0.5"], ("--mi-alpha 0.5", "--bit-alloc hessian-mi")),
])
def test_flags_that_change_nothing_are_refused(flags, expect):
    with pytest.raises(ConfigError) as e:
        parse([*T, *flags])
    line = str(e.value)
    assert "\n" not in line and all(piece in line for piece in expect), line


def test_mi_flags_where_no_mi_is_computed_are_warned_about_and_recorded():
    cfg = parse([*T, *Q, "--groups", "8", "--cluster", "contiguous", "--mi-samples", "1024", "--mi-bins", "8"])
    assert cfg.warnings == ("--mi-samples, --mi-bins: no MI is computed with --cluster contiguous and --bit-alloc "
                            "hessian; ignored",)
    assert cfg.as_dict()["warnings"] == cfg.warnings  # the JSON's config block records them
    assert parse([*T, *Q, "--groups", "8", "--mi-samples", "1024"]).warnings == ()  # spectral: MI is computed
    assert parse([*T, *Q, "--groups", "all", "--mi-bins", "8"]).warnings == (
        "--mi-bins: no MI is computed with --groups all; ignored",)
    assert parse([*T, *Q, "--mi-samples", "128"]).warnings == ("--mi-samples: no MI is computed without --groups K; "
                                                               "ignored",)


@pytest.mark.parametrize("m", methods.METHODS, ids=[m.id for m in methods.METHODS])
def test_the_vocabulary_produces_no_flag_that_changes_nothing(m):
    for sparsity, wbits in [("0.5", "4"), ("0", "3"), ("2:4", "4")]:
        if m.role != "reference" and not m.quantized and sparsity == "0":
            continue  # pruning-only methods at sparsity 0 are not in a sweep (they would repeat dense)
        cfg = parse([*T, *methods.run_flags(m, sparsity, wbits, 8)])
        assert cfg.warnings == ()
