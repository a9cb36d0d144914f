"""report.py against hand-written result JSONs (tests/fixtures/report): table = JSONs, best marks, verdicts.

The fixtures are a small sweep at sparsity 0.5 and a 4-bit budget on two eval sets. On synthetic the best MI
run (miB K=8, 3.0641 bpw, PPL 14.2) beats the best baseline at equal or higher bpw (per-channel, 3.0703 bpw,
14.6) and the random control (14.8); on wikitext2 it loses to per-channel (26.9 vs 26.5). The uniform row
(3.0625 bpw) counts as equal bits to miB only through the 0.005 bpw tolerance.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import pytest
from conftest import check_table_matches, md_table

from miq import atomic
from miq.report import markdown as report
from miq.report import plots

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "report"
RENDER = atomic.write_png  # the one test that reads the figures renders them; the others read the text
pytestmark = pytest.mark.usefixtures("unrendered_figures")


@pytest.fixture
def src(tmp_path) -> Path:
    """A writable copy of the fixture sweep."""
    d = tmp_path / "sweep"
    shutil.copytree(FIXTURES, d)
    return d


def edit(d: Path, rid: str, **ppl) -> None:
    p = d / f"{rid}.json"
    j = json.loads(p.read_text())
    j["ppl"].update(ppl)
    p.write_text(json.dumps(j))


def build(d: Path) -> str:
    return report.build(d, d / "performance_report.md")


def verdict_line(md: str, evalset: str) -> list[str]:
    """The verdict bullet for one eval set and its sub-bullets."""
    lines = md.split("## Verdict", 1)[1].splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith("- **") and f", {evalset}**" in ln)
    return lines[i : i + 3]


def test_table_numbers_equal_the_jsons(tmp_path):
    out = tmp_path / "report" / "performance_report.md"
    md = report.build(FIXTURES, out)  # --out elsewhere: the fixture folder stays untouched
    rows = check_table_matches(md, FIXTURES)
    assert len(rows) == 11
    assert out.read_text() == md
    assert not (FIXTURES / "performance_report.md").exists()


def test_best_marks(src):
    rows = {r["run"]: r for r in md_table(build(src), "Results")}
    bold = {(rid, s) for rid, r in rows.items() for s in ("synthetic", "wikitext2")
            if r[f"PPL {s}"].startswith("**")}
    assert bold == {("dense", "synthetic"), ("dense", "wikitext2"),  # alone in (0, 16)
                    ("miB_s0.5_w4_k8", "synthetic"), ("perchannel_s0.5_w4", "wikitext2"),  # (0.5, 4)
                    ("sparsegpt_s0.5", "synthetic"), ("sparsegpt_s0.5", "wikitext2")}  # (0.5, 16)
    assert rows["magnitude_s0.5"]["PPL wikitext2"] == "n/a"
    # rows sorted by (sparsity, budget, bpw)
    order = list(rows)
    assert order[:2] == ["dense", "miA_s0.5_w4_k8"]
    assert set(order[-2:]) == {"magnitude_s0.5", "sparsegpt_s0.5"}


def test_verdict_from_the_fixture_numbers(src):
    md = build(src)
    assert ("MI grouping beats the best baseline at equal bits in 1 of 2 cells; "
            "beats the random control in 2 of 2") in md
    syn = verdict_line(md, "synthetic")
    assert ("MI grouping (sparsegpt+mi-B, K=8, 3.0641 bpw) reaches PPL 14.200 vs 14.600 for the best "
            "baseline at equal or higher bpw (sparsegpt+per-channel, K=all, 3.0703 bpw): "
            "better by 0.400 (2.74%)") in syn[0]
    assert "MI beats the random-group control (random_s0.5_w4_k8, PPL 14.800): better by 0.600" in syn[1]
    wiki = verdict_line(md, "wikitext2")
    assert "reaches PPL 26.900 vs 26.500" in wiki[0] and "worse by 0.400 (1.51%)" in wiki[0]
    assert "0.005" in md  # the tolerance is stated


def test_verdict_flips_when_the_baseline_gets_better(src):
    edit(src, "perchannel_s0.5_w4", synthetic=14.0)
    md = build(src)
    assert "beats the best baseline at equal bits in 0 of 2 cells" in md
    assert "14.200 vs 14.000 for the best baseline" in verdict_line(md, "synthetic")[0]
    assert "worse by 0.200 (1.43%)" in verdict_line(md, "synthetic")[0]


def test_verdict_flips_when_mi_gets_worse(src):
    # miB K=8 now loses; the best MI run becomes miB K=16 (3.068 bpw): uniform (3.0625) no longer counts as
    # equal bits, per-channel (3.0703) and g128 still do
    edit(src, "miB_s0.5_w4_k8", synthetic=15.5)
    md = build(src)
    syn = verdict_line(md, "synthetic")[0]
    assert "MI grouping (sparsegpt+mi-B, K=16, 3.0680 bpw) reaches PPL 14.400 vs 14.600" in syn
    assert "better by 0.200" in syn
    edit(src, "miB_s0.5_w4_k16", synthetic=15.5)
    edit(src, "miA_s0.5_w4_k8", synthetic=15.5)
    syn = verdict_line(build(src), "synthetic")[0]
    assert "worse by 0.900" in syn and "(sparsegpt+per-channel, K=all, 3.0703 bpw)" in syn


def test_random_control_verdict_flips(src):
    edit(src, "random_s0.5_w4_k8", synthetic=14.1)
    md = build(src)
    assert "beats the random control in 1 of 2" in md
    assert ("MI does NOT beat the random-group control (random_s0.5_w4_k8, PPL 14.100): worse by 0.100"
            in verdict_line(md, "synthetic")[1])


def test_control_at_other_bits_is_flagged(src):
    """A control matches K and budget; when its bpw differs from MI's, the line says so and by how much."""
    syn = verdict_line(build(src), "synthetic")[1]
    assert "Not at equal bits" not in syn
    p = src / "random_s0.5_w4_k8.json"
    j = json.loads(p.read_text())
    mi_bpw = json.loads((src / "miB_s0.5_w4_k8.json").read_text())["bits"]["bpw"]
    j["bits"]["bpw"] = mi_bpw - 0.1
    p.write_text(json.dumps(j))
    syn = verdict_line(build(src), "synthetic")[1]
    assert f"Not at equal bits: MI spends 0.1000 more bpw ({mi_bpw:.4f} vs {mi_bpw - 0.1:.4f})." in syn


def test_random_control_like_for_like_when_the_best_mi_run_has_none(src):
    edit(src, "miA_s0.5_w4_k8", synthetic=14.0)  # best MI is now strategy A; the random control is B
    syn = verdict_line(build(src), "synthetic")
    assert "MI grouping (sparsegpt+mi-A, K=8, 3.0165 bpw) reaches PPL 14.000" in syn[0]
    assert ("the best MI run has no random-group control with its settings; like for like, miB_s0.5_w4_k8 "
            "(PPL 14.200) beats the random-group control (random_s0.5_w4_k8, PPL 14.800)") in syn[1]


def test_no_baseline_at_equal_bits(src):
    for rid in ("g128_s0.5_w4", "perchannel_s0.5_w4"):
        (src / f"{rid}.json").unlink()
    p = src / "uniform_s0.5_w4.json"
    j = json.loads(p.read_text())
    j["bits"].update(metadata_bpw=0.03, bpw=3.03)
    p.write_text(json.dumps(j))
    md = build(src)
    syn = verdict_line(md, "synthetic")[0]
    assert "uses more bits than every baseline" in syn and "no equal-bits claim" in syn
    assert "MI 3.0641 bpw vs 3.0300 bpw" in syn
    assert "beats the best baseline at equal bits in 0 of 0 cells" in md
    assert "2 of 2 cells have no baseline at equal or higher bpw" in md


def test_no_mi_run_and_no_random_run(src):
    (src / "random_s0.5_w4_k8.json").unlink()
    md = build(src)
    assert "Random control: no random-group control run with the same K" in md
    assert "beats the random control in 0 of 0" in md
    for p in src.glob("mi*.json"):
        p.unlink()
    assert "No MI-grouping run (family mi) in this directory: no verdict can be given." in build(src)


def test_pngs_are_images_of_the_stated_size(src, monkeypatch):
    monkeypatch.setattr(atomic, "write_png", RENDER)
    md = build(src)
    pngs = sorted(p.name for p in src.glob("*.png"))
    assert pngs == ["frontier.png", "frontier_1.png", "ppl_vs_bpw_synthetic.png", "ppl_vs_bpw_wikitext2.png",
                    "ppl_vs_k.png"]
    for name in pngs:
        assert f"]({name})" in md
        h, w = mpimg.imread(src / name).shape[:2]
        assert w >= 800 and h >= 600, (name, w, h)


def test_one_run_with_null_ppl_and_failures(tmp_path):
    d = tmp_path / "one"
    d.mkdir()
    j = json.loads((FIXTURES / "miB_s0.5_w4_k8.json").read_text())
    j["ppl"] = {"synthetic": None}
    (d / "miB_s0.5_w4_k8.json").write_text(json.dumps(j))
    shutil.copy(FIXTURES / "miA_s0.5_w4_k16.failed.json", d)
    (d / "notes.json").write_text("[1, 2]")  # not a result: ignored
    md = build(d)
    check_table_matches(md, d)
    assert md_table(md, "Results")[0]["PPL synthetic"] == "n/a"
    assert "no quantized non-MI baseline at this sparsity" in md
    assert "RuntimeError: fixture failure" in md_table(md, "Failed configurations")[0]["last error line"]
    assert not (d / "ppl_vs_k.png").exists()
    assert (d / "ppl_vs_bpw_synthetic.png").is_file()


def test_environment_differences_are_flagged(src):
    p = src / "dense.json"
    j = json.loads(p.read_text())
    j["env"]["device_name"] = "NVIDIA H200"
    p.write_text(json.dumps(j))
    env = {r["item"]: r["value"] for r in md_table(build(src), "Environment")}
    assert env["torch"] == "2.13.0+cpu"
    assert "differs between runs" in env["device name"] and "NVIDIA H200 (1 run)" in env["device name"]


def test_cli(src, tmp_path):
    r = subprocess.run([sys.executable, "-m", "miq.report", str(src)], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert (src / "performance_report.md").is_file()
    r = subprocess.run([sys.executable, "-m", "miq.report", str(tmp_path / "nope")], cwd=ROOT,
                       capture_output=True,
                       text=True)
    assert r.returncode == 2 and "not a directory" in r.stderr


def test_out_never_replaces_a_folder_or_a_file_the_toolkit_did_not_write(src, tmp_path, capsys):
    notes = tmp_path / "notes.md"
    notes.write_text("my notes")
    (tmp_path / "folder").mkdir()
    for out, why in [(notes, "did not write"), (tmp_path / "folder", "is a folder"),
                     (src / "miB_s0.5_w4_k8.json", "did not write")]:
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
        assert report.main([str(src), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--out {out}" in err[0] and why in err[0]
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
        assert not list(tmp_path.glob("*.png"))
    assert notes.read_text() == "my notes"
    assert report.main([str(src), "--out", str(tmp_path / "r.md")]) == 0  # a report it wrote: replaced
    assert report.main([str(src), "--out", str(tmp_path / "r.md")]) == 0


def test_figures_name_eval_sets_by_base_name(src, monkeypatch):
    """Titles and axis labels show c4_heldout.jsonl, never the folder it was read from."""
    for p in src.glob("*.json"):
        j = json.loads(p.read_text())
        if "ppl" in j:
            j["ppl"] = {"/abs/data/c4_heldout.jsonl": j["ppl"]["synthetic"]}
            p.write_text(json.dumps(j))
    texts = []
    monkeypatch.setattr(plots.atomic, "write_png", lambda fig, path, dpi=None: texts.extend(
        t for ax in fig.axes for t in (ax.get_title(), ax.get_ylabel())))
    build(src)
    assert len(texts) == 6  # PPL vs bpw, PPL vs K and the frontier: a title and a y label each
    assert all("c4_heldout.jsonl" in t and "/abs" not in t for t in texts), texts


def test_seeds_give_mean_std_and_a_paired_verdict(tmp_path):
    """A sweep with --seeds: one row per run, a mean +- std row per configuration, paired decisions."""
    d = tmp_path / "seeds"
    d.mkdir()
    ppls = {"miB_s0.5_w4_k8": [14.0, 14.6, 14.2], "perchannel_s0.5_w4": [14.5, 14.3, 14.3],
            "random_s0.5_w4_k8": [14.4, 15.0, 14.6]}
    for rid, values in ppls.items():
        j = json.loads((FIXTURES / f"{rid}.json").read_text())
        for seed, v in enumerate(values):
            j["config"]["seed"], j["ppl"] = seed, {"synthetic": v}
            (d / f"{rid}_seed{seed}.json").write_text(json.dumps(j))
    md = build(d)
    check_table_matches(md, d)
    over = {r["configuration"]: r for r in md_table(md, "Over seeds")}
    assert over["miB_s0.5_w4_k8"]["PPL synthetic (mean +- std)"] == "14.267 +- 0.306"
    assert over["perchannel_s0.5_w4"]["seeds"] == "3"
    syn = verdict_line(md, "synthetic")
    # MI vs per-channel: paired differences 0.5, -0.3, 0.1 -> 0.100 +- 0.231 SE: not significant
    assert "no significant difference (MI's PPL lower by 0.100 +- 0.231 SE on average over 3 seeds" in syn[0]
    # MI vs random: 0.4 on every seed -> beats
    assert "MI beats the random-group control" in syn[1] and "better by 0.400 +- 0.000 SE over 3 seeds" in syn[1]
    assert "No significant difference from the baseline in 1 of 1 cells" in md
    assert "paired by seed" in md


def test_a_full_disk_is_one_line_and_exit_1(src, tmp_path, capsys, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "write_text", full)
    monkeypatch.setattr(atomic, "write_bytes", full)
    assert report.main([str(src), "--out", str(tmp_path / "r.md")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["miq.report: error: could not write the report (No space left on device)"]
    assert not (tmp_path / "r.md").exists()
