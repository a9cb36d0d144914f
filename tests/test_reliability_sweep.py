"""Issue 30 for the sweep and its report: nothing the user owns is lost, every failure is one line, and what
the sweep is told is either done or refused.

- files the sweep did not write (a user's dense.json, dense.log, dense.failed.json) are kept under a new name,
  never deleted or written over;
- --extra may not set what the matrix sets per configuration (sparsity, width, K, seed, the method);
- a full --out, sbatch answering without a job id, submitit's own errors, and repeated signals at any moment
  end in one line and the documented exit status, with nothing left running or half-written;
- flags that would be ignored are refused (--groups without a grouped method) or warned about where a script
  travels between machines (--jobs-per-gpu without GPUs); the GPU count is torch's;
- the report says what its rows count, and marks runs made on other devices or thread counts.

The sweeps run sweep_helpers' fake opt_mi.py (``FakeRunner``) unless the real entry point is what is tested.
"""

import contextlib
import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import md_table
from report_helpers import run as frontier_run
from sweep_helpers import ROOT, FakeRunner, Recording, alive, results, start, wait_for

from miq import atomic
from miq.report import markdown as report
from miq.run import outputs
from miq.sweep import cli as sweep
from miq.sweep import gpu_slots, launch, slurm

# the sweep machinery is under test here, and the report's tables; its figures are rendered in test_report
pytestmark = pytest.mark.usefixtures("unrendered_figures")

FOUR = ("--methods", "dense magnitude sparsegpt uniform")  # 4 configurations, in this order


@pytest.fixture
def fake(tmp_path) -> FakeRunner:
    return FakeRunner(str(tmp_path / "fake"))


@pytest.fixture(autouse=True)
def no_gpus(monkeypatch):
    """This machine as the tests see it: no CUDA, whatever CUDA_VISIBLE_DEVICES says."""
    monkeypatch.setattr(gpu_slots, "device_count", lambda: 0)


def run(capsys, out: Path, runner, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = sweep.main(["--out", str(out), *args], runner=runner)
    return rc, *capsys.readouterr()


def one_line(stderr: str, *words: str) -> str:
    """The single error line of stderr (progress lines aside), which names every word."""
    assert "Traceback" not in stderr, stderr
    errors = [ln for ln in stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1, stderr
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def set_asides(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*.foreign-*"))


# ----------------------------------------------------------------------------------------------------------
# 1. files the sweep cannot prove it wrote


def test_a_foreign_result_and_log_are_kept_aside_not_deleted(tmp_path, fake, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "dense.json").write_text("my notes on dense, not a result\n")
    (out / "dense.log").write_text("my own log\n")
    rc, _, stderr = run(capsys, out, fake, "--methods", "dense")
    assert rc == 0, stderr
    assert (out / "dense.json.foreign-1").read_text() == "my notes on dense, not a result\n"
    assert (out / "dense.log.foreign-1").read_text() == "my own log\n"
    assert json.loads((out / "dense.json").read_text())["ppl"], "the configuration did not run again"
    assert "dense.json.foreign-1" in stderr and "dense.log.foreign-1" in stderr
    # a second one is kept under the next free name: the first kept file is never written over
    (out / "dense.json").write_text('{"config": {"model": "to')
    rc, _, stderr = run(capsys, out, fake, "--methods", "dense")
    assert rc == 0 and (out / "dense.json.foreign-2").read_text() == '{"config": {"model": "to'
    assert (out / "dense.json.foreign-1").read_text() == "my notes on dense, not a result\n"
    assert set_asides(out) == ["dense.json.foreign-1", "dense.json.foreign-2", "dense.log.foreign-1"]


def test_a_foreign_failure_note_is_kept_aside_and_the_configuration_runs(tmp_path, fake, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "dense.failed.json").write_text('{"mine": "a note of my own"}')
    rc, _, stderr = run(capsys, out, fake, "--methods", "dense")
    assert rc == 0, stderr
    assert json.loads((out / "dense.failed.json.foreign-1").read_text()) == {"mine": "a note of my own"}
    assert (out / "dense.json").is_file() and fake.invocations() == ["dense"]


def test_the_sweeps_own_notes_and_logs_are_replaced_without_set_asides(tmp_path, fake, capsys):
    out = tmp_path / "sweep"
    rc, _, _ = run(capsys, out, dataclasses.replace(fake, fail="sparsegpt"), *FOUR)
    assert rc == 1 and (out / "sparsegpt_s0.5.failed.json").is_file()
    rc, _, stderr = run(capsys, out, fake, *FOUR, "--retry-failed")
    assert rc == 0, stderr
    assert not (out / "sparsegpt_s0.5.failed.json").exists() and set_asides(out) == []
    assert "fake failure" not in (out / "sparsegpt_s0.5.log").read_text()  # its log is the new run's


def test_a_foreign_report_in_out_is_refused_before_anything_runs(tmp_path, fake, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "performance_report.md").write_text("# my own report\n")
    rc, stdout, stderr = run(capsys, out, fake, *FOUR)
    assert rc == 2 and stdout == "" and fake.invocations() == []
    one_line(stderr, "performance_report.md", "did not write")
    assert (out / "performance_report.md").read_text() == "# my own report\n"


# ----------------------------------------------------------------------------------------------------------
# 2. --extra may not set what the matrix sets


@pytest.mark.parametrize("extra, flag, use", [
    ("--sparsity 0.7", "--sparsity", "--sparsities"),
    ("--sparsity=0.7", "--sparsity", "--sparsities"),
    ("--spars 0.7", "--spars", "--sparsities"),  # argparse's abbreviation of --sparsity
    ("--prunen 2 --prunem 4", "--prunen", "--sparsities"),
    ("--wbits 3", "--wbits", "--wbits"),
    ("--seed 5", "--seed", "--seeds"),
    ("--groups 4", "--groups", "--methods"),
    ("--gmp", "--gmp", "--methods"),
    ("--act-order", "--act-order", "--methods"),
    ("--groupsize 32", "--groupsize", "--methods"),
    ("--strategy shared", "--strategy", "--methods"),
    ("--cluster random", "--cluster", "--methods"),
    ("--mi-axis input", "--mi-axis", "--methods"),
    ("--json other.json", "--json", "--out"),
    ("--analysis-dir figs", "--analysis-dir", "--out"),
])
def test_extra_may_not_set_what_the_matrix_sets(tmp_path, fake, capsys, extra, flag, use):
    out = tmp_path / "sweep"
    rc, stdout, stderr = run(capsys, out, fake, "--seeds", "0 1", "--extra", extra)
    assert rc == 2 and stdout == "" and len(stderr.strip().splitlines()) == 1, stderr
    one_line(stderr, f"--extra {flag}", f"use {use}")
    assert fake.invocations() == [] and not out.exists()


def test_extra_that_keeps_every_configuration_what_its_id_says_is_accepted(tmp_path, fake, capsys):
    out = tmp_path / "sweep"
    rc, _, stderr = run(capsys, out, fake, "--methods", "dense sparsegpt uniform perchannel miB", "--seeds", "0 1",
                        "--extra", "--sym --alloc-cost rtn --mi-samples 512")
    assert rc == 0, stderr
    got = {rid: json.loads((out / f"{rid}.json").read_text())["config"] for rid in results(out)}
    assert got["miB_s0.5_w4_k8_seed1"]["seed"] == 1 and got["miB_s0.5_w4_k8_seed1"]["mi_samples"] == 512
    assert got["uniform_s0.5_w4_seed0"]["sym"] and got["dense"]["sparsity"] == 0


# ----------------------------------------------------------------------------------------------------------
# 4. failures: a full --out, Slurm submission, signals


def disk_full_for(monkeypatch, suffix: str) -> None:
    """Writing any file whose name ends in suffix fails as on a full disk."""
    real = atomic.write_bytes

    def write_bytes(path, data):
        if str(path).endswith(suffix):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    monkeypatch.setattr(atomic, "write_bytes", write_bytes)


def test_a_failure_note_that_cannot_be_written_is_one_line_and_the_sweep_resumes(tmp_path, fake, capsys,
                                                                                 monkeypatch):
    out = tmp_path / "sweep"
    disk_full_for(monkeypatch, ".failed.json")
    rc, _, stderr = run(capsys, out, dataclasses.replace(fake, fail="magnitude"), *FOUR)
    assert rc == 1
    one_line(stderr, "No space left on device", "magnitude_s0.5.failed.json", "rerun")
    assert not [p for p in out.rglob("*.tmp")]
    monkeypatch.undo()
    rc, _, stderr = run(capsys, out, fake, *FOUR)  # space again: the same command finishes the sweep
    assert rc == 0, stderr
    assert set(results(out)) == {"dense", "magnitude_s0.5", "sparsegpt_s0.5", "uniform_s0.5_w4"}


def test_a_log_that_cannot_be_written_is_one_line(tmp_path, fake, capsys, monkeypatch):
    real_open = open

    def full_open(path, mode="r", *a, **k):
        if str(path).endswith("sparsegpt_s0.5.log") and "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(launch, "open", full_open, raising=False)
    out = tmp_path / "sweep"
    rc, _, stderr = run(capsys, out, fake, *FOUR)
    assert rc == 1
    one_line(stderr, "No space left on device", "sparsegpt_s0.5.log")
    assert "uniform_s0.5_w4" not in fake.invocations()  # stopped: every next write would fail the same way


def fake_sbatch(folder: Path, output: str) -> str:
    """PATH with an sbatch that prints ``output`` and exits 0, and an srun (submitit looks for both)."""
    folder.mkdir()
    (folder / "sbatch").write_text(f"#!/bin/sh\necho '{output}'\n")
    (folder / "srun").write_text("#!/bin/sh\nexit 0\n")
    for name in ("sbatch", "srun"):
        (folder / name).chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def test_sbatch_output_without_a_job_id_is_one_line(tmp_path, fake, capsys, monkeypatch):
    monkeypatch.setattr(slurm, "CLUSTER", "slurm")
    monkeypatch.setenv("PATH", fake_sbatch(tmp_path / "bin", "sbatch: your jobs are welcome"))
    out = tmp_path / "slurm"
    rc, _, stderr = run(capsys, out, fake, *FOUR, "--executor", "slurm")
    assert rc == 1
    one_line(stderr, "no job id", "your jobs are welcome", "squeue", "miq-sweep")
    assert fake.invocations() == [] and not (out / "submitit" / "jobs.json").exists()


def test_sbatch_refusing_the_jobs_is_one_line_and_leaves_no_pickled_jobs(tmp_path, fake, capsys, monkeypatch):
    monkeypatch.setattr(slurm, "CLUSTER", "slurm")
    bin = tmp_path / "bin"
    monkeypatch.setenv("PATH", fake_sbatch(bin, ""))
    (bin / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Invalid account' >&2\n"
                                "exit 1\n")
    out = tmp_path / "slurm"
    rc, _, stderr = run(capsys, out, fake, *FOUR, "--executor", "slurm")
    assert rc == 2
    one_line(stderr, "submitting the jobs failed", "Invalid account")  # not twice: submitit echoes it too
    assert not list((out / "submitit").glob("*.pkl")) and fake.invocations() == []


@pytest.mark.parametrize("error", [RuntimeError('Could not detect "srun", are you indeed on a slurm cluster?'),
                                   ValueError("Unavailable parameter(s): ['slurm_foo']\nValid parameters are: ..."),
                                   TypeError("cannot pickle '_thread.lock' object")])
def test_submitits_own_errors_at_submission_are_one_line(tmp_path, fake, capsys, monkeypatch, error):
    class Failing:
        def batch(self):
            raise error

    monkeypatch.setattr(slurm, "CLUSTER", "local")
    monkeypatch.setattr(slurm, "executor", lambda folder, opts: Failing())
    rc, _, stderr = run(capsys, tmp_path / "slurm", fake, *FOUR, "--executor", "slurm")
    assert rc == 2
    one_line(stderr, "submitting the jobs failed", str(error).splitlines()[0])
    assert fake.invocations() == []


def storm(p: subprocess.Popen, sig: int, n: int = 5) -> tuple[str, str]:
    """Send sig n times, 20 ms apart, then wait for the process."""
    for _ in range(n):
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(sig)
        time.sleep(0.02)
    return p.communicate(timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_repeated_signals_while_the_entry_point_starts(tmp_path, sig):
    """python -m miq.sweep stopped while it imports torch: one line, 128 + N, nothing written."""
    out = tmp_path / "sweep"
    p = subprocess.Popen([sys.executable, "-m", "miq.sweep", "--out", str(out), "--methods", "dense"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    time.sleep(0.3)
    _, err = storm(p, sig)
    assert p.returncode == 128 + sig, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() or {f.name for f in out.iterdir()} <= {".sweep.lock"}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_repeated_signals_while_configurations_run(tmp_path, fake, sig):
    slow = dataclasses.replace(fake, sleep=0.5)
    out = tmp_path / "sweep"
    p = start(out, slow, *FOUR, "--jobs", "2")
    wait_for(lambda: slow.pid("magnitude_s0.5") and alive(slow.pid("magnitude_s0.5")))
    _, err = storm(p, sig)
    assert p.returncode == 128 + sig and "Traceback" not in err, err
    assert not [f for f in out.rglob("*.tmp")]
    time.sleep(0.2)
    assert not [rid for rid in slow.invocations() if alive(slow.pid(rid))], "a configuration outlived the sweep"


# The sweep in a process of its own whose report signals it (n times) half-way through its figures.
REPORT_STORM = r"""
import json, os, signal, sys
sys.path[:0] = sys.argv[1:3]
import sweep_helpers
from miq.report import plots
from miq.sweep import cli as sweep
real, sig = plots.plot_ppl_vs_bpw, int(sys.argv[4])
def plot(*a, **k):
    real(*a, **k)
    for _ in range(3):
        os.kill(os.getpid(), sig)
    real(*a, **k)
plots.plot_ppl_vs_bpw = plot
sys.exit(sweep.main(sys.argv[5:], runner=sweep_helpers.FakeRunner(**json.loads(sys.argv[3]))))
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_repeated_signals_while_the_report_is_written(tmp_path, fake, sig):
    out = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-c", REPORT_STORM, str(ROOT), str(ROOT / "tests"),
                        json.dumps(dataclasses.asdict(fake)), str(int(sig)), "--out", str(out), *FOUR], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 128 + sig, r.stderr
    assert "Traceback" not in r.stderr and "interrupted" in r.stderr
    assert not [f for f in out.rglob("*.tmp")] and not (out / "performance_report.md").exists()


# ----------------------------------------------------------------------------------------------------------
# 6. flags that would be ignored; the GPU count; the report's prose


def test_groups_without_a_grouped_method_is_refused(tmp_path, fake, capsys):
    for args in (["--matrix", "frontier", "--groups", "16"], ["--methods", "dense uniform", "--groups", "16"]):
        rc, stdout, stderr = run(capsys, tmp_path / "sweep", fake, *args)
        assert rc == 2 and stdout == "" and len(stderr.strip().splitlines()) == 1, stderr
        one_line(stderr, "--groups 16", "--methods")
    assert not (tmp_path / "sweep").exists()


def test_jobs_per_gpu_without_gpus_is_a_warning(tmp_path, fake, capsys, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    rc, _, stderr = run(capsys, tmp_path / "sweep", fake, "--methods", "dense", "--jobs-per-gpu", "2")
    assert rc == 0, stderr
    warnings = [ln for ln in stderr.splitlines() if "warning:" in ln]
    assert len(warnings) == 1 and "--jobs-per-gpu 2" in warnings[0] and "no GPU" in warnings[0]


def test_the_gpu_count_is_torchs_not_the_mask_alone(tmp_path, fake, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # set, on a machine without CUDA
    assert gpu_slots.visible() == []
    rc, _, stderr = run(capsys, tmp_path / "sweep", fake, *FOUR, "--jobs", "3")
    assert rc == 0, stderr
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,7")  # more entries than devices: CUDA stops at the last
    monkeypatch.setattr(gpu_slots, "device_count", lambda: 2)
    assert gpu_slots.visible() == ["3", "5"]


def results_prose(md: str) -> str:
    return md.split("## Results\n", 1)[1].split("\n|", 1)[0]


def test_the_results_prose_says_what_the_rows_count(tmp_path, fake, capsys):
    out = tmp_path / "sweep"
    assert run(capsys, out, fake, "--methods", "dense sparsegpt uniform")[0] == 0
    prose = results_prose((out / "performance_report.md").read_text())
    assert "reported apart" not in prose and "fp16" not in prose
    assert "mask bpw" in prose and "float32" in prose  # the mask is in bpw; auto on CPU is float32
    for rid in ("sparsegpt_s0.5", "uniform_s0.5_w4"):  # the rows do what the prose says
        row = {r["run"]: r for r in md_table((out / "performance_report.md").read_text(), "Results")}[rid]
        total = sum(float(row[c]) for c in ("code bpw", "metadata bpw", "mask bpw"))
        assert abs(total - float(row["bpw"])) < 2e-4 and float(row["mask bpw"]) > 0
    p = out / "uniform_s0.5_w4.json"
    j = json.loads(p.read_text())
    j["config"]["dtype"] = "float16"
    p.write_text(json.dumps(j))
    prose = results_prose(report.build(out, out / "performance_report.md"))
    assert "float16 (1 run)" in prose and "float32 (2 runs)" in prose


# ----------------------------------------------------------------------------------------------------------
# 7. threads


def test_env_info_records_the_threads():
    assert outputs.env_info(torch.device("cpu"))["threads"] == torch.get_num_threads()


def test_every_job_runs_with_the_sweeps_thread_count(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    rec = Recording(FakeRunner(str(tmp_path / "fake")))
    rc, stdout, stderr = run(capsys, tmp_path / "a", rec, "--methods", "dense sparsegpt", "--threads", "3")
    assert rc == 0, stderr
    assert {ln.split()[3] for ln in rec.events.read_text().splitlines()} == {"3"}
    assert "3 thread(s) each" in stdout
    assert "OMP_NUM_THREADS=3" in (tmp_path / "a" / "dense.log").read_text()  # recorded with the run
    rec.events.unlink()
    rc, _, stderr = run(capsys, tmp_path / "b", rec, "--methods", "dense sparsegpt")  # --jobs 1: all the cores
    assert rc == 0, stderr
    assert {ln.split()[3] for ln in rec.events.read_text().splitlines()} == {str(os.cpu_count() or 1)}


def retime(out: Path, threads: dict[str, int]) -> None:
    for p in out.glob("*.json"):
        if p.name.endswith((".failed.json", ".skipped.json")):
            continue
        j = json.loads(p.read_text())
        n = threads.get(p.stem, 1)
        j["env"].update(device="cpu", device_name=f"cpu ({n} threads)", threads=n)
        p.write_text(json.dumps(j))


def test_runs_on_other_thread_counts_are_marked_where_they_are_paired(tmp_path, fake, capsys):
    out = tmp_path / "sweep"
    assert run(capsys, out, fake, "--methods", "uniform perchannel miB random", "--seeds", "0 1")[0] == 0
    retime(out, {})
    md = report.build(out, out / "performance_report.md")
    assert "different devices or thread counts" not in md and "device, threads" not in md
    retime(out, {"miB_s0.5_w4_k8_seed1": 2})
    md = report.build(out, out / "performance_report.md")
    rows = {r["run"]: r for r in md_table(md, "Results")}
    assert rows["miB_s0.5_w4_k8_seed1"]["device, threads"] == "cpu, 2 threads"
    assert rows["uniform_s0.5_w4_seed0"]["device, threads"] == "cpu, 1 thread"
    seeds = {r["configuration"]: r for r in md_table(md, "Over seeds")}
    assert "mixed" in seeds["miB_s0.5_w4_k8"]["seeds"] and "mixed" not in seeds["uniform_s0.5_w4"]["seeds"]
    verdict = md.split("## Verdict", 1)[1].split("\n## ", 1)[0]
    marked = [ln for ln in verdict.splitlines() if "Not like for like" in ln]
    assert len(marked) == 2, verdict  # mi-B against the baseline and against the random control
    assert all("(cpu, 1 thread; cpu, 2 threads)" in ln for ln in marked)
    assert "2 of the comparisons below pair or average runs made on different devices or thread counts" in verdict


def test_the_frontier_marks_a_best_and_runner_up_of_other_thread_counts():
    from miq.report import frontier
    from miq.report.results import units

    def runs(threads: dict[int, int]):
        out = []
        for seed in range(3):
            for m, s, w, bpw, ppl in (("uniform", "0", "3", 3.06, 14.0), ("uniform", "0.5", "4", 3.06, 13.0)):
                r = frontier_run(m, s, w, bpw, ppl + 0.1 * seed, seed=seed)
                n = threads.get(seed, 1) if s == "0.5" else 1
                r.data["env"] = {"device": "cpu", "device_name": f"cpu ({n} threads)", "threads": n}
                out.append(r)
        return units(out)

    assert "Not like for like" not in frontier.best_line(frontier.best_at(runs({}), "syn", 3.5))
    line = frontier.best_line(frontier.best_at(runs({2: 2}), "syn", 3.5))
    assert "Not like for like: these runs ran on different devices or thread counts (cpu, 1 thread; cpu, 2 threads)" \
        in line
