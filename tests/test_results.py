"""results.py: a Run is named through config.from_json and methods.py; load_dir reads a sweep folder."""

import json
import shutil
from pathlib import Path

from miq.report.results import Run, load_dir

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "report"


def test_derived_labels_equal_what_opt_mi_stored():
    runs, _, _ = load_dir(FIXTURES)
    assert len(runs) == 11
    for r in runs:
        bare = Run(r.id, {k: v for k, v in r.data.items() if k not in ("method", "family")})
        assert (bare.method, bare.family) == (r.data["method"], r.data["family"]), r.id


def test_stored_label_wins_and_strategy_k_sparsity_come_from_the_config():
    j = json.loads((FIXTURES / "miA_s0.5_w4_k8.json").read_text())
    j["method"] = "renamed"
    r = Run("x", j)
    assert (r.method, r.family) == ("renamed", "mi")
    assert (r.strategy, r.groups, r.sparsity_label, r.wbits_label) == ("A (shared)", 8, "0.5", "4")
    j["config"].update(sparsity=0.0, prunen=2, prunem=4, wbits=16.0, groups=0)
    r = Run("y", j)
    assert (r.strategy, r.groups, r.sparsity_label, r.wbits_label) == ("-", 0, "2:4", "16")


def test_unknown_method_keeps_the_id_and_bad_configs_are_skipped(tmp_path, capsys):
    j = json.loads((FIXTURES / "miB_s0.5_w4_k8.json").read_text())
    del j["method"], j["family"]
    j["config"]["cluster"] = "no-such-clustering"
    assert (Run("odd", j).method, Run("odd", j).family) == ("odd", "?")
    shutil.copy(FIXTURES / "dense.json", tmp_path)
    j["config"]["groups"] = "twelve"
    (tmp_path / "bad.json").write_text(json.dumps(j))
    runs, failed, skipped = load_dir(tmp_path)
    assert [r.id for r in runs] == ["dense"] and failed == skipped == []
    assert "skipping" in capsys.readouterr().err


def test_results_of_the_bits_schema_before_kept_only_storage_are_skipped_by_name(tmp_path, capsys):
    """Their bpw charged every pruned weight a code and left the mask out: not comparable with today's."""
    shutil.copy(FIXTURES / "dense.json", tmp_path)
    j = json.loads((FIXTURES / "miB_s0.5_w4_k8.json").read_text())
    j["bits"] = {"avg_weight_bits": 4.0, "metadata_bpw": 0.0641, "bpw": 4.0641, "mask_bpw": 1.0}
    (tmp_path / "old.json").write_text(json.dumps(j))
    runs, _, _ = load_dir(tmp_path)
    assert [r.id for r in runs] == ["dense"]
    assert "old.json" in (err := capsys.readouterr().err) and "kept-only" in err
