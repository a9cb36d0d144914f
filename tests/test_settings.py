"""One home per setting: a flag's default is its ``RunConfig`` field's, and a field that a step record
(``PassOptions``, ``PlanOptions``, ``MIOptions``) carries too has that record's default. Derived from the
parser and the records themselves, so a default restated differently anywhere fails here."""

from __future__ import annotations

import dataclasses

import pytest

from miq import options
from miq.options import MIOptions, PassOptions, PlanOptions, pick
from miq.run import config
from miq.run.flags import RunConfig, build_parser

ACTIONS = [a for a in build_parser()._actions if a.dest not in ("help", "model", "dataset")]
BARE = config.parse(["toy", "synthetic"])  # every flag left at its default
DEFAULT = RunConfig("toy", "synthetic")


def test_every_flag_is_a_field():
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    assert [a.dest for a in ACTIONS if a.dest not in fields] == []


@pytest.mark.parametrize("action", ACTIONS, ids=[a.option_strings[0] for a in ACTIONS])
def test_a_flag_left_out_gives_the_fields_default(action):
    assert getattr(BARE, action.dest) == getattr(DEFAULT, action.dest)
    assert type(getattr(BARE, action.dest)) is type(getattr(DEFAULT, action.dest))  # 16, not 16.0, in the JSON


def test_the_step_records_defaults_are_the_runs():
    assert pick(PassOptions, BARE) == PassOptions()
    assert BARE.mi == MIOptions()
    grouped = config.parse(["toy", "synthetic", "--wbits", "3.5", "--groups", "4"])
    assert pick(PlanOptions, grouped) == PlanOptions(groups=4, wbits=3.5)


def test_the_nm_pattern_is_derived_once():
    assert config.parse(["toy", "synthetic", "--prunen", "2", "--prunem", "4"]).nm == (2, 4)
    assert config.parse(["toy", "synthetic", "--sparsity", "0.5"]).nm is None
    assert BARE.nm is None and options.nm_pattern(1, 8) == (1, 8)
