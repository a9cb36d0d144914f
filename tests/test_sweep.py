"""sweep.py: resume, skip, failure records, interruption; and one real sweep on the toy model.

Most tests run ``sweep.main`` with a fake runner (``sweep_helpers.FakeRunner``) in place of opt_mi.py: cheap
child processes that write plausible results, so the sweep's bookkeeping is what is under test, in seconds
instead of minutes. Tests where signals reach the sweep run it in a subprocess. The tests marked slow run the
real opt_mi.py.
"""

import dataclasses
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import check_table_matches
from sweep_helpers import ROOT, FakeRunner, alive, results, start, wait_for

from miq.sweep import args as sweep_args
from miq.sweep import cli as sweep
from miq.synthetic import synthetic_text

# the sweep machinery is under test here, and the report's tables; its figures are rendered in test_report
pytestmark = pytest.mark.usefixtures("unrendered_figures")

DEFAULT_IDS = {"dense", "magnitude_s0.5", "sparsegpt_s0.5", "uniform_s0.5_w4", "g128_s0.5_w4",
               "perchannel_s0.5_w4", "miA_s0.5_w4_k8", "miB_s0.5_w4_k8", "random_s0.5_w4_k8",
               "contiguous_s0.5_w4_k8"}


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def fake(tmp_path) -> FakeRunner:
    return FakeRunner(str(tmp_path / "fake"))


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> dict[str, dict]:
    """The results of an uninterrupted default sweep (the fake's PPLs depend on the flags alone)."""
    out = tmp_path_factory.mktemp("reference")
    assert sweep.main(["--out", str(out / "sweep")], runner=FakeRunner(str(out / "fake"))) == 0
    assert set(results(out / "sweep")) == DEFAULT_IDS
    return results(out / "sweep")


@pytest.fixture
def run(capsys):
    """run(out, runner, *args): sweep.main in this process, its exit status and output."""
    def run(out: Path, runner, *args: str) -> Done:
        capsys.readouterr()
        rc = sweep.main(["--out", str(out), *args], runner=runner)
        return Done(rc, *capsys.readouterr())
    return run


def test_sweep_runs_matrix_then_rerun_does_nothing_new(tmp_path, fake, run):
    out = tmp_path / "sweep"
    r = run(out, fake)
    assert r.returncode == 0, r.stderr
    assert set(results(out)) == DEFAULT_IDS
    assert sorted(fake.invocations()) == sorted(DEFAULT_IDS)
    for rid in DEFAULT_IDS:
        log = (out / f"{rid}.log").read_text()
        assert log.startswith(f"# {sys.executable} ") and log.splitlines()[0].endswith(
            f"--json {out}/{rid}.json --analysis-dir {out}/analysis/{rid}")
        assert json.loads((out / f"{rid}.json").read_text())["config"]["analysis_dir"] == str(out / "analysis" / rid)
    # progress: which of how many, elapsed, and an estimate once one configuration has finished
    assert re.search(r"^\[1/10\] dense \.\.\. \(elapsed \d+s\)$", r.stdout, re.M), r.stdout
    assert re.search(r"^\[10/10\] contiguous_s0.5_w4_k8 \.\.\. \(elapsed \S+, about \S+ left\)$", r.stdout,
                     re.M)
    assert re.search(r"^\[10/10\] contiguous_s0.5_w4_k8 done in \d+s$", r.stdout, re.M)
    report = (out / "performance_report.md").read_text()
    check_table_matches(report, out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}

    r2 = run(out, fake)
    assert r2.returncode == 0, r2.stderr
    assert sorted(fake.invocations()) == sorted(DEFAULT_IDS), "the rerun ran opt_mi again"
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")} == mtimes
    assert r2.stdout.count("exists, skipped") == 10
    assert "[2/10] magnitude_s0.5 exists, skipped" in r2.stdout


@pytest.mark.slow
@pytest.mark.parametrize("target, sig", [("sweep", signal.SIGTERM), ("group", signal.SIGINT),
                                         ("everything", signal.SIGTERM)])
def test_killed_sweep_resumes_to_the_same_results(tmp_path, fake, run, reference, target, sig):
    """SIGTERM to the sweep alone (it must stop its child itself); SIGINT to its whole process group (Ctrl-C,
    or timeout(1) with SIGTERM; the configurations run in process groups of their own, so the sweep stops
    them); or SIGTERM to the sweep and its running configuration at once (as a batch scheduler does: the
    child dies of it, which is no failure to record)."""
    expected = reference
    out = tmp_path / "killed"
    slow = dataclasses.replace(fake, sleep=0.4)
    p = start(out, slow)

    def running() -> list[int]:
        return [pid for rid in DEFAULT_IDS - set(results(out)) if (pid := slow.pid(rid)) and alive(pid)]

    wait_for(lambda: results(out) and running())  # one has finished, the next one is running
    children = running()
    if target == "sweep":
        p.send_signal(sig)
    else:
        os.killpg(p.pid, sig)
    if target == "everything":
        for pid in children:
            os.kill(pid, sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig, err
    assert "interrupted" in err
    partial = results(out)
    assert 1 <= len(partial) < len(DEFAULT_IDS)
    assert not list(out.glob("*.failed.json")), "an interrupted configuration was recorded as failed"
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.tmp"))
    assert not (out / "performance_report.md").exists()
    time.sleep(0.5)  # a child left running would still write its JSON now
    assert results(out) == partial, "a configuration kept running after the sweep was killed"

    before = len(fake.invocations())
    r = run(out, fake)
    assert r.returncode == 0, r.stderr
    assert results(out) == expected
    ran = len(fake.invocations()) - before
    assert ran == len(DEFAULT_IDS) - len(partial), "finished configurations ran again"
    assert r.stdout.count("exists, skipped") == len(partial)


@pytest.mark.slow
def test_configuration_killed_by_sigterm_stops_the_sweep_unrecorded(tmp_path, fake):
    """A child that dies of SIGTERM/SIGINT means the run is being stopped: nothing is recorded for it."""
    slow = dataclasses.replace(fake, sleep=5)
    out = tmp_path / "sweep"
    p = start(out, slow, "--jobs", "2")
    wait_for(lambda: slow.pid("dense") and slow.pid("magnitude_s0.5"))
    time.sleep(0.2)
    os.kill(slow.pid("dense"), signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 143 and "dense interrupted" in err, err
    assert sorted(slow.invocations()) == ["dense", "magnitude_s0.5"]
    assert not alive(slow.pid("magnitude_s0.5")), "the other configuration was not stopped"
    assert not list(out.glob("*.json"))


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the children die with the sweep through PR_SET_PDEATHSIG")
def test_sigkilled_sweep_leaves_no_configuration_running(tmp_path, fake):
    slow = dataclasses.replace(fake, sleep=30)
    p = start(tmp_path / "sweep", slow)
    wait_for(lambda: slow.pid("dense") and alive(slow.pid("dense")))
    p.kill()
    p.communicate(timeout=30)
    wait_for(lambda: not alive(slow.pid("dense")), timeout=10)


def opt_mi_processes(marker: str) -> list[int]:
    """Live opt_mi.py processes whose command line holds marker (the sweep's --out)."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            cmdline = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if b"opt_mi.py" in cmdline and marker.encode() in cmdline and alive_pid(int(d.name)):
            found.append(int(d.name))
    return found


def alive_pid(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the children die with the sweep through PR_SET_PDEATHSIG")
def test_sigkilled_compare_methods_sh_leaves_no_opt_mi_running(tmp_path):
    """compare_methods.sh execs sweep.py: killing the script beyond any cleanup (SIGKILL) still ends the real
    opt_mi.py it was running, so that a rerun never runs the same configuration twice at once."""
    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHON": sys.executable}
    p = subprocess.Popen(["bash", str(ROOT / "compare_methods.sh"), "--out", str(out), "--methods", "dense",
                          "--nsamples", "8"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: opt_mi_processes(str(out)), timeout=120)
    p.kill()
    p.wait(timeout=30)
    wait_for(lambda: not opt_mi_processes(str(out)), timeout=30)
    assert not (out / "dense.json").exists()
    assert not [f for f in out.rglob("*") if f.name.endswith(".tmp")]


def test_failed_configuration_is_recorded_and_the_sweep_goes_on(tmp_path, fake, run):
    out = tmp_path / "sweep"
    r = run(out, dataclasses.replace(fake, fail="miA_"))
    assert r.returncode == 1
    assert "1 failed" in r.stdout
    assert "miA_s0.5_w4_k8 FAILED (exit 1) after" in r.stderr
    note = json.loads((out / "miA_s0.5_w4_k8.failed.json").read_text())
    assert note["id"] == "miA_s0.5_w4_k8" and note["returncode"] == 1
    assert "fake failure" in note["error"] and "--strategy shared" in note["command"]
    assert set(results(out)) == DEFAULT_IDS - {"miA_s0.5_w4_k8"}
    report = (out / "performance_report.md").read_text()
    assert "miA_s0.5_w4_k8" in report.split("## Failed configurations")[1]

    n = len(fake.invocations())
    r = run(out, fake)  # without --retry-failed a rerun does nothing new, and still reports the failure
    assert r.returncode == 1 and len(fake.invocations()) == n
    assert "miA_s0.5_w4_k8 failed before, skipped" in r.stdout

    r = run(out, fake, "--retry-failed")
    assert r.returncode == 0, r.stderr
    assert fake.invocations()[n:] == ["miA_s0.5_w4_k8"]
    assert not (out / "miA_s0.5_w4_k8.failed.json").exists()
    assert set(results(out)) == DEFAULT_IDS


@pytest.mark.slow
def test_parallel_jobs_give_the_same_results(tmp_path, fake, run):
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    args = ("--sparsities", "0.5 0.6", "--groups", "4 8", "--wbits", "4")
    assert run(serial, fake, *args).returncode == 0
    r = run(parallel, fake, *args, "--jobs", "3")
    assert r.returncode == 0, r.stderr
    assert results(parallel) == results(serial)
    assert len(results(serial)) == 1 + 2 * (2 + 3 + 2 * 4)


def test_fractional_budget_skips_uniform_rows_with_a_note(tmp_path, fake, run):
    out = tmp_path / "sweep"
    r = run(out, fake, "--wbits", "3.5", "--methods", "uniform g128 perchannel miB")
    assert r.returncode == 0, r.stderr
    assert set(results(out)) == {"perchannel_s0.5_w3.5", "miB_s0.5_w3.5_k8"}
    assert sorted(fake.invocations()) == sorted(results(out))
    for rid in ("uniform_s0.5_w3.5", "g128_s0.5_w3.5"):
        assert "whole bits" in json.loads((out / f"{rid}.skipped.json").read_text())["reason"]
        assert f"{rid} skipped: uniform quantization needs whole bits" in r.stdout
    report = (out / "performance_report.md").read_text()
    assert "## Skipped configurations" in report and "uniform_s0.5_w3.5" in report


def test_seeds_run_every_seeded_configuration_per_seed(tmp_path, fake, run):
    out = tmp_path / "sweep"
    r = run(out, fake, "--seeds", "0 1 2", "--methods", "dense magnitude uniform miB")
    assert r.returncode == 0, r.stderr
    # dense and magnitude use no calibration: once; the rest once per seed, with --seed n
    assert set(results(out)) == {"dense", "magnitude_s0.5"} | {
        f"{c}_seed{n}" for c in ("uniform_s0.5_w4", "miB_s0.5_w4_k8") for n in range(3)}
    for n in range(3):
        assert json.loads((out / f"miB_s0.5_w4_k8_seed{n}.json").read_text())["config"]["seed"] == n
    report = (out / "performance_report.md").read_text()
    assert "## Over seeds" in report and "paired by seed" in report


@pytest.mark.parametrize("args", [["--jobs", "0"], ["--bogus"], ["--wbits"], ["--methods", "miC"],
                                  ["--sparsities", "1.5"], ["--groups", "all"], ["--extra", "--eval 'x"],
                                  ["--seeds", "0 0"], ["--seeds", "-1"], ["--seeds", ""],
                                  ["--out", "/proc/sweep"], ["--out", "/dev/null/sweep"],
                                  ["--seeds", "0 00"], ["--sparsities", "0.5 .5"], ["--wbits", "4 4.0"],
                                  ["--extra", "--no-such-flag"], ["--calib", "missing.txt"],
                                  ["--extra", "--wbits 3.5"]])
def test_bad_arguments_exit_2_with_one_line(tmp_path, fake, run, args):
    r = run(tmp_path / "sweep", fake, *args)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "error" in r.stderr
    assert r.stdout == "" and fake.invocations() == [] and not (tmp_path / "sweep").exists()


def test_out_inside_the_model_folder_or_the_toy_cache_is_refused(tmp_path, fake, run, toy_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for out, args, what in [(model / "results", ["--model", str(model)], "MODEL"),
                            (Path(toy_path) / "results", [], "toy cache")]:
        r = run(out, fake, *args)
        assert r.returncode == 2 and f"inside the {what}" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not out.exists() and fake.invocations() == []


def test_extra_flags_reach_only_the_configurations_they_change(tmp_path, fake, run):
    """--extra "--sym --alloc-cost rtn" quantizes symmetrically and allocates bits by RTN error; dense and
    pruning-only rows run without them, and the uniform row (no allocation) without --alloc-cost: they would
    change nothing there, and opt_mi.py refuses such flags."""
    out = tmp_path / "sweep"
    r = run(out, fake, "--methods", "dense sparsegpt uniform perchannel", "--extra", "--sym --alloc-cost rtn")
    assert r.returncode == 0, r.stderr
    first = {p.stem: p.read_text().splitlines()[0] for p in out.glob("*.log")}
    assert "--sym" not in first["dense"] and "--alloc-cost" not in first["sparsegpt_s0.5"]
    assert "--sym" in first["uniform_s0.5_w4"] and "--alloc-cost" not in first["uniform_s0.5_w4"]
    assert "--sym --alloc-cost rtn" in first["perchannel_s0.5_w4"]


def test_one_spelling_per_value_in_ids(tmp_path, fake, run):
    r = run(tmp_path / "sweep", fake, "--sparsities", ".5", "--wbits", "4.0", "--seeds", "00 1", "--methods", "uniform")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "sweep").glob("uniform*.json")) == [
        "uniform_s0.5_w4_seed0.json", "uniform_s0.5_w4_seed1.json"]


def test_an_unreadable_result_is_run_again(tmp_path, fake, run):
    out = tmp_path / "sweep"
    assert run(out, fake, "--methods", "dense").returncode == 0
    (out / "dense.json").write_text('{"config": {"model": "to')  # a result cut short
    r = run(out, fake, "--methods", "dense")
    assert r.returncode == 0 and "not a readable result" in r.stderr
    assert json.loads((out / "dense.json").read_text())["ppl"] and len(fake.invocations()) == 2


def test_a_second_sweep_into_the_same_out_is_refused(tmp_path, fake, run):
    out = tmp_path / "sweep"
    out.mkdir()
    with open(out / ".sweep.lock", "a+") as held:  # as a running sweep holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        r = run(out, fake, "--methods", "dense")
        assert r.returncode == 2 and "another sweep (pid 4242)" in r.stderr and fake.invocations() == []
    assert run(out, fake, "--methods", "dense").returncode == 0  # released (or its holder died): taken over


def test_help(run, tmp_path):
    r = run(tmp_path / "sweep", None, "--help")
    assert r.returncode == 0 and r.stderr == "" and not (tmp_path / "sweep").exists()
    assert all(flag in r.stdout for flag in [*sweep_args.FLAGS, "--retry-failed"])


@pytest.mark.slow
def test_compare_methods_sh_runs_sweep_py(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "compare_methods.sh"), "--jobs", "0", "--out", str(tmp_path / "x")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "sweep.py: error: --jobs 0: must be a positive integer"


REAL_SWEEP = ("dense", "sparsegpt", "uniform", "miB", "random")


@pytest.mark.slow
def test_real_sweep_on_the_toy_model(tmp_path):
    """compare_methods.sh with the real opt_mi.py: dense, pruning alone, the uniform baseline, MI grouping and
    its random-group control (what the verdict needs) at one sparsity, K and budget, then a rerun. Every
    method of the matrix goes through opt_mi.py's parser in test_methods and runs in test_pipeline; each
    configuration here is a process of its own (about 6 s of CPU, 4 of them imports)."""
    out = tmp_path / "sweep"
    evalset = tmp_path / "heldout.txt"  # a slice of the synthetic test split: evaluating all of it dominates
    evalset.write_text(synthetic_text("test")[:6_000])
    env = {**os.environ, "PYTHON": sys.executable}
    args = ["--out", str(out), "--methods", " ".join(REAL_SWEEP), "--groups", "4", "--nsamples", "8", "--eval",
            str(evalset), "--jobs", "2", "--extra", "--seqlen 32 --mi-samples 256"]

    def sweep_sh() -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ROOT / "compare_methods.sh"), *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=900)

    r = sweep_sh()
    assert r.returncode == 0, r.stdout + r.stderr
    ids = {i.replace("_k8", "_k4") for i in DEFAULT_IDS if i.split("_")[0] in REAL_SWEEP}
    assert set(results(out)) == ids
    for rid, ppl in results(out).items():
        assert all(v is not None for v in ppl.values()), rid
    report = (out / "performance_report.md").read_text()
    rows = check_table_matches(report, out)
    assert {"uniform_s0.5_w4", "random_s0.5_w4_k4", "miB_s0.5_w4_k4"} <= set(rows)
    assert "## Verdict" in report and "random-group control" in report
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}

    r = sweep_sh()  # nothing new to run: every result kept as it was
    assert r.returncode == 0, r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")} == mtimes


@pytest.mark.slow
def test_test_mi_sh_passes_and_catches_missing_outputs(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "TEST_MI_OUT": str(tmp_path / "ok")}
    r = subprocess.run(["bash", str(ROOT / "test_mi.sh")], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "test_mi.sh: OK" in r.stdout
    # later flags win in opt_mi.py: no analysis dir -> no figures, which test_mi.sh must report
    env["TEST_MI_OUT"] = str(tmp_path / "no_figures")
    small = ["--nsamples", "4", "--seqlen", "32", "--mi-samples", "128", "--eval", str(tmp_path / "eval.txt")]
    (tmp_path / "eval.txt").write_text(synthetic_text("test")[:3000])  # this run only has to draw nothing
    r = subprocess.run(["bash", str(ROOT / "test_mi.sh"), "--analysis-dir", "", *small], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "FAIL: mi_matrix.png is missing" in r.stderr and "FAIL: grouping_result.png is missing" in r.stderr
    r = subprocess.run(["bash", str(ROOT / "test_mi.sh"), "--wbits", "99"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "FAIL: opt_mi.py exited with code 2" in r.stderr
