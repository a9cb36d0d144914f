"""compare_methods.sh: resume, skip, failure records, interruption; and one real sweep on the toy model.

Most tests drive the script with a fake opt_mi (OPT_MI_CMD) that writes a plausible result JSON after a
short sleep, with a PPL that is a deterministic function of its flags: the sweep's bookkeeping is what is
under test there, in seconds instead of minutes. The test marked slow runs the real opt_mi.py.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import check_table_matches

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "compare_methods.sh"
DEFAULT_IDS = {"dense", "magnitude_s0.5", "sparsegpt_s0.5", "uniform_s0.5_w4", "g128_s0.5_w4",
               "perchannel_s0.5_w4", "miA_s0.5_w4_k8", "miB_s0.5_w4_k8", "random_s0.5_w4_k8",
               "contiguous_s0.5_w4_k8"}

FAKE = r'''
import argparse, json, os, sys, time, zlib
p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("dataset")
p.add_argument("--sparsity", type=float, default=0.0)
p.add_argument("--wbits", type=float, default=16.0)
p.add_argument("--groupsize", type=int, default=-1)
p.add_argument("--nsamples", type=int, default=128)
p.add_argument("--groups", default="0")
p.add_argument("--strategy", default="independent")
p.add_argument("--cluster", default="spectral")
p.add_argument("--eval", default="synthetic")
p.add_argument("--json", required=True)
p.add_argument("--analysis-dir", default="")
p.add_argument("--seqlen", type=int, default=128)
p.add_argument("--gmp", action="store_true")
a = p.parse_args()
rid = os.path.basename(a.json)[: -len(".json")]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(rid + "\n")
if os.environ.get("FAKE_PID_DIR"):
    with open(os.path.join(os.environ["FAKE_PID_DIR"], rid + ".pid"), "w") as f:
        f.write(str(os.getpid()))
time.sleep(float(os.environ.get("FAKE_SLEEP", "0.05")))
if os.environ.get("FAKE_FAIL") and os.environ["FAKE_FAIL"] in rid:
    sys.exit("RuntimeError: fake failure in " + rid)
groups = "all" if a.groups == "all" else int(a.groups)
letter = "A" if a.strategy == "shared" else "B"
if a.wbits == 16:
    method = family = "dense" if a.sparsity == 0 else ("magnitude" if a.gmp else "sparsegpt")
elif groups == 0:
    method, family = ("uniform-g%d" % a.groupsize, "uniform-g") if a.groupsize > 0 else ("uniform", "uniform")
elif groups == "all":
    method, family = "per-channel", "per-channel"
elif a.cluster == "spectral":
    method, family = "mi-" + letter, "mi"
else:
    method, family = a.cluster + "-" + letter, a.cluster
if a.sparsity > 0 and a.wbits != 16:
    method = "sparsegpt+" + method
key = " ".join(x for x in sys.argv[1:] if not x.startswith(os.path.dirname(a.json)))
ppl = {e: 10 + zlib.crc32((key + e).encode()) % 1000 / 100 for e in a.eval.split(",")}
meta = 0.0 if a.wbits == 16 else 0.06 + zlib.crc32(key.encode()) % 100 / 10000
cfg = {"model": a.model, "dataset": a.dataset, "sparsity": a.sparsity, "wbits": a.wbits, "groups": groups,
       "strategy": a.strategy, "cluster": a.cluster, "bit_alloc": "hessian", "groupsize": a.groupsize,
       "prunen": 0, "prunem": 0, "gmp": a.gmp, "seed": 0, "nsamples": a.nsamples, "seqlen": a.seqlen,
       "eval": a.eval}
out = {"config": cfg, "method": method, "family": family, "ppl": ppl, "sparsity": a.sparsity,
       "bits": {"avg_weight_bits": a.wbits, "metadata_bpw": meta, "bpw": a.wbits + meta,
                "mask_bpw": 1.0 if a.sparsity else 0.0},
       "timing": {"calibration_s": 0.1, "compress_s": 0.2, "eval_s": 0.1, "mi_s": 0.05, "cluster_s": 0.01,
                  "alloc_s": 0.01, "prune_s": 0.1, "total_s": 0.5},
       "env": {"torch": "fake", "transformers": "fake", "device": "cpu", "device_name": "fake",
               "python": "3", "machine": "x"},
       "figures": [], "layers": []}
tmp = a.json + ".%d.tmp" % os.getpid()
with open(tmp, "w") as f:
    json.dump(out, f)
os.replace(tmp, a.json)
print("method", method)
'''


@pytest.fixture
def fake(tmp_path):
    """Environment for compare_methods.sh with the fake opt_mi; returns (env, path of the invocation log)."""
    script = tmp_path / "fake_opt_mi.py"
    script.write_text(FAKE)
    log = tmp_path / "invocations.txt"
    log.touch()
    env = {**os.environ, "OPT_MI_CMD": f"{sys.executable} {script}", "PYTHON": sys.executable,
           "FAKE_LOG": str(log), "FAKE_SLEEP": "0.05"}
    return env, log


def sweep(out: Path, env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--out", str(out), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def results(out: Path) -> dict[str, dict]:
    """id -> ppl dict of every result JSON in out."""
    return {p.stem: json.loads(p.read_text())["ppl"] for p in out.glob("*.json")
            if not p.name.endswith((".failed.json", ".skipped.json"))}


def invocations(log: Path) -> list[str]:
    return log.read_text().split()


def test_sweep_runs_matrix_then_rerun_does_nothing_new(tmp_path, fake):
    env, log = fake
    out = tmp_path / "sweep"
    r = sweep(out, env)
    assert r.returncode == 0, r.stderr
    assert set(results(out)) == DEFAULT_IDS
    assert sorted(invocations(log)) == sorted(DEFAULT_IDS)
    for rid in DEFAULT_IDS:
        assert (out / f"{rid}.log").is_file()
    # progress: which of how many, elapsed, and an estimate once one configuration has finished
    assert re.search(r"^\[1/10\] dense \.\.\. \(elapsed \d+s\)$", r.stdout, re.M), r.stdout
    assert re.search(r"^\[10/10\] contiguous_s0.5_w4_k8 \.\.\. \(elapsed \S+, about \S+ left\)$", r.stdout,
                     re.M)
    report = (out / "performance_report.md").read_text()
    check_table_matches(report, out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}

    r2 = sweep(out, env)
    assert r2.returncode == 0, r2.stderr
    assert sorted(invocations(log)) == sorted(DEFAULT_IDS), "the rerun ran opt_mi again"
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")} == mtimes
    assert r2.stdout.count("exists, skipped") == 10
    assert "[2/10] magnitude_s0.5 exists, skipped" in r2.stdout


@pytest.mark.parametrize("target", ["sweep", "group"])
def test_killed_sweep_resumes_to_the_same_results(tmp_path, fake, target):
    """SIGTERM to the sweep alone (it must stop its child itself), or to its whole process group (as
    timeout(1) or a batch scheduler does; the child dies of the signal too, which is no failure to record)."""
    env, log = fake
    env = {**env, "FAKE_SLEEP": "0.4"}
    whole = tmp_path / "whole"
    assert sweep(whole, env).returncode == 0
    expected = results(whole)
    assert set(expected) == DEFAULT_IDS

    out = tmp_path / "killed"
    p = subprocess.Popen(["bash", str(SCRIPT), "--out", str(out)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while not results(out) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)  # the next configuration is running now
    if target == "sweep":
        p.send_signal(signal.SIGTERM)
    else:
        os.killpg(p.pid, signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0
    assert "interrupted" in err
    partial = results(out)
    assert 1 <= len(partial) < len(DEFAULT_IDS)
    assert not list(out.glob("*.failed.json")), "an interrupted configuration was recorded as failed"
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.tmp"))
    assert not (out / "performance_report.md").exists()
    time.sleep(0.5)  # a child left running would still write its JSON now
    assert results(out) == partial, "a configuration kept running after the sweep was killed"

    before = len(invocations(log))
    r = sweep(out, env)
    assert r.returncode == 0, r.stderr
    assert results(out) == expected
    ran = len(invocations(log)) - before
    assert ran == len(DEFAULT_IDS) - len(partial), "finished configurations ran again"
    assert r.stdout.count("exists, skipped") == len(partial)


def test_configuration_killed_by_sigterm_stops_the_sweep_unrecorded(tmp_path, fake):
    """A child that dies of SIGTERM/SIGINT means the run is being stopped: nothing is recorded for it."""
    env, log = fake
    pids = tmp_path / "pids"
    pids.mkdir()
    env = {**env, "FAKE_SLEEP": "5", "FAKE_PID_DIR": str(pids)}
    out = tmp_path / "sweep"
    p = subprocess.Popen(["bash", str(SCRIPT), "--out", str(out)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (pids / "dense.pid").is_file() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    os.kill(int((pids / "dense.pid").read_text()), signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode != 0 and "dense interrupted" in err
    assert invocations(log) == ["dense"]
    assert not list(out.glob("*.json"))


def test_failed_configuration_is_recorded_and_the_sweep_goes_on(tmp_path, fake):
    env, log = fake
    out = tmp_path / "sweep"
    r = sweep(out, {**env, "FAKE_FAIL": "miA_"})
    assert r.returncode != 0
    assert "1 failed" in r.stdout
    note = json.loads((out / "miA_s0.5_w4_k8.failed.json").read_text())
    assert note["id"] == "miA_s0.5_w4_k8" and note["returncode"] == 1
    assert "fake failure" in note["error"] and "--strategy shared" in note["command"]
    assert set(results(out)) == DEFAULT_IDS - {"miA_s0.5_w4_k8"}
    report = (out / "performance_report.md").read_text()
    assert "miA_s0.5_w4_k8" in report.split("## Failed configurations")[1]

    n = len(invocations(log))
    r = sweep(out, env)  # without --retry-failed a rerun does nothing new, and still reports the failure
    assert r.returncode != 0 and len(invocations(log)) == n
    assert "miA_s0.5_w4_k8 failed before, skipped" in r.stdout

    r = sweep(out, env, "--retry-failed")
    assert r.returncode == 0, r.stderr
    assert invocations(log)[n:] == ["miA_s0.5_w4_k8"]
    assert not (out / "miA_s0.5_w4_k8.failed.json").exists()
    assert set(results(out)) == DEFAULT_IDS


def test_parallel_jobs_give_the_same_results(tmp_path, fake):
    env, _ = fake
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    args = ("--sparsities", "0.5 0.6", "--groups", "4 8", "--wbits", "4")
    assert sweep(serial, env, *args).returncode == 0
    r = sweep(parallel, env, *args, "--jobs", "3")
    assert r.returncode == 0, r.stderr
    assert results(parallel) == results(serial)
    assert len(results(serial)) == 1 + 2 * (2 + 3 + 2 * 4)


def test_fractional_budget_skips_uniform_rows_with_a_note(tmp_path, fake):
    env, log = fake
    out = tmp_path / "sweep"
    r = sweep(out, env, "--wbits", "3.5", "--methods", "uniform g128 perchannel miB")
    assert r.returncode == 0, r.stderr
    assert set(results(out)) == {"perchannel_s0.5_w3.5", "miB_s0.5_w3.5_k8"}
    assert sorted(invocations(log)) == sorted(results(out))
    for rid in ("uniform_s0.5_w3.5", "g128_s0.5_w3.5"):
        assert "whole bits" in json.loads((out / f"{rid}.skipped.json").read_text())["reason"]
        assert f"{rid} skipped: uniform quantization needs whole bits" in r.stdout
    report = (out / "performance_report.md").read_text()
    assert "## Skipped configurations" in report and "uniform_s0.5_w3.5" in report


@pytest.mark.parametrize("args", [["--jobs", "0"], ["--bogus"], ["--wbits"], ["--methods", "miC"],
                                  ["--sparsities", "1.5"], ["--groups", "all"]])
def test_bad_arguments_exit_2_with_one_line(tmp_path, fake, args):
    env, log = fake
    r = sweep(tmp_path / "sweep", env, *args)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "error" in r.stderr
    assert invocations(log) == []


@pytest.mark.slow
def test_real_sweep_on_the_toy_model(tmp_path):
    """The full method matrix at one sparsity, K and budget with the real opt_mi.py, then a rerun."""
    from datautils import synthetic_text

    out = tmp_path / "sweep"
    evalset = tmp_path / "heldout.txt"  # a slice of the synthetic test split: evaluating all of it dominates
    evalset.write_text(synthetic_text("test")[:6_000])
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OPT_MI_CMD", None)
    args = ["--groups", "4", "--nsamples", "8", "--eval", str(evalset), "--jobs", "2",
            "--extra", "--seqlen 32 --mi-samples 256"]
    t = time.time()
    r = sweep(out, env, *args, timeout=900)
    first = time.time() - t
    assert r.returncode == 0, r.stdout + r.stderr
    ids = {i.replace("_k8", "_k4") for i in DEFAULT_IDS}
    assert set(results(out)) == ids
    for rid, ppl in results(out).items():
        assert all(v is not None for v in ppl.values()), rid
    report = (out / "performance_report.md").read_text()
    rows = check_table_matches(report, out)
    assert {"uniform_s0.5_w4", "random_s0.5_w4_k4", "miB_s0.5_w4_k4"} <= set(rows)
    assert "## Verdict" in report and "random-group control" in report
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}

    t = time.time()
    r = sweep(out, env, *args)
    again = time.time() - t
    assert r.returncode == 0, r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")} == mtimes
    assert again < 0.5 * first, (again, first)


@pytest.mark.slow
def test_test_mi_sh_passes_and_catches_missing_outputs(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "TEST_MI_OUT": str(tmp_path / "ok")}
    r = subprocess.run(["bash", str(ROOT / "test_mi.sh")], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "test_mi.sh: OK" in r.stdout
    # later flags win in opt_mi.py: no analysis dir -> no figures, which test_mi.sh must report
    env["TEST_MI_OUT"] = str(tmp_path / "no_figures")
    r = subprocess.run(["bash", str(ROOT / "test_mi.sh"), "--analysis-dir", ""], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "FAIL: mi_matrix.png is missing" in r.stderr and "FAIL: grouping_result.png is missing" in r.stderr
    r = subprocess.run(["bash", str(ROOT / "test_mi.sh"), "--wbits", "99"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "FAIL: opt_mi.py exited with code 2" in r.stderr
