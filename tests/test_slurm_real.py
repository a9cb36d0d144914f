"""The sweep's Slurm executor against a real Slurm: the single-node cluster of tests/slurm/start.sh (the
``slurm_cluster`` fixture), with sbatch, squeue, scontrol and scancel as a user's cluster has them, and no
accounting (sacct only says "accounting storage is disabled", as on many small clusters).

End to end on the toy model with the real opt_mi.py at the smallest settings (4 windows of 32 tokens, a
2,000-character eval text, one thread per job): each configuration is a job of about half a minute here. A
test's hook (``Hook``) has one configuration sleep the first time it runs, so that it is still running when
the test cancels it or when its time limit comes; on the next submission it runs opt_mi.py as the others do.
"""

import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest
from sweep_helpers import results, wait_for

from miq import atomic
from miq.report import markdown as report
from miq.sweep import cli as sweep
from miq.sweep import slurm

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]  # one worker runs them, on one cluster

SETTINGS = ("--nsamples", "4", "--extra", "--seqlen 32", "--executor", "slurm", "--slurm-gpus-per-job", "0")
STARTS = "Starting with JobEnvironment"  # submitit's worker log, once per start of the job
LONG_S = 600  # generous bounds on the waits for the cluster, so that a stuck job fails the test, not the suite

# DIR/hook.py: argv = marker folder, the id to hold, "--", opt_mi.py's command
HOOK = r"""
import os, sys, time
marker_dir, hit = sys.argv[1:3]
command = sys.argv[4:]
rid = os.path.basename(command[command.index("--json") + 1])[: -len(".json")]
marker = os.path.join(marker_dir, rid + ".held")
if rid == hit and not os.path.exists(marker):
    open(marker, "w").close()
    time.sleep(600)  # until Slurm (a cancellation, the time limit) stops it
    sys.exit("not stopped")
os.execv(command[0], command)
"""


@dataclass(frozen=True)
class Hook:
    """A sweep runner: opt_mi.py behind HOOK, which holds configuration ``hit`` the first time it runs."""

    dir: Path
    hit: str

    def __call__(self, args: list[str]) -> list[str]:
        script = self.dir / "hook.py"
        if not script.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic.write_text(script, HOOK)
        return [sys.executable, str(script), str(self.dir), self.hit, "--", *sweep.opt_mi_command(args)]

    def held(self) -> bool:
        return (self.dir / f"{self.hit}.held").exists()


@pytest.fixture(autouse=True)
def cluster(slurm_cluster, toy_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", slurm_cluster)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # each job one thread: sbatch passes the environment on
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(slurm, "QUEUE_POLL_S", 1.0)


@pytest.fixture(scope="session")
def evalset(tmp_path_factory) -> str:
    from miq import synthetic

    path = tmp_path_factory.mktemp("eval") / "heldout.txt"
    path.write_text(synthetic.synthetic_text("test", 30)[:2000], encoding="utf-8")
    return str(path)


def run(capsys, out: Path, evalset: str, *args: str, runner=None) -> tuple[int, str, str]:
    """The sweep into ``out`` on this cluster: (exit status, stdout, stderr)."""
    capsys.readouterr()
    argv = ["--out", str(out), "--eval", evalset, *SETTINGS, *args]
    rc = sweep.main(argv) if runner is None else sweep.main(argv, runner=runner)
    stdout, stderr = capsys.readouterr()
    assert "sacct" not in stdout + stderr and "Bypassing" not in stdout + stderr  # quiet polling
    return rc, stdout, stderr


def job_ids(out: Path) -> dict[str, str]:
    return json.loads((out / "submitit" / "jobs.json").read_text())


def squeue(*args: str) -> list[str]:
    r = subprocess.run(["squeue", "--noheader", "--array", "--states=all", *args], capture_output=True, text=True,
                       check=True)
    return r.stdout.split()


def state(job: str) -> str:
    return dict(ln.split("|", 1) for ln in squeue("--format=%i|%T", f"--jobs={job.split('_')[0]}")).get(job, "")


def starts(out: Path) -> int:
    """How many times the sweep's jobs started (requeued ones count again): their workers' logs say so."""
    return sum(p.read_text().count(STARTS) for p in (out / "submitit").glob("*_log.out"))


def leftovers(out: Path) -> list[Path]:
    """Staged files left behind (atomic writes stage as .<name>.<pid>.tmp)."""
    return [p for p in out.rglob("*.tmp")]


def test_no_wait_then_the_same_command_waits_and_reports_at_most_n_at_a_time(tmp_path, evalset, capsys):
    """Two configurations submitted with --no-wait and --slurm-array-parallelism 1: Slurm holds the array to one
    task at a time (its throttle); a local sweep into the folder is refused while they fly; the report over it
    warns of them; the same command again waits for them without resubmitting, and writes the report."""
    out = tmp_path / "out"
    flags = ("--methods", "dense sparsegpt", "--slurm-array-parallelism", "1")
    rc, stdout, stderr = run(capsys, out, evalset, *flags, "--no-wait")
    assert rc == 0, stdout + stderr
    assert "submitted 2 job(s); 2 job(s) in flight" in stdout and not (out / "performance_report.md").exists()
    ids = job_ids(out)
    array = {j.split("_")[0] for j in ids.values()}
    assert len(array) == 1 and sorted(ids.values()) == [f"{min(array)}_{i}" for i in range(2)]
    show = subprocess.run(["scontrol", "show", "job", min(array)], capture_output=True, text=True).stdout
    assert "ArrayTaskThrottle=1" in show, show

    capsys.readouterr()
    assert sweep.main(["--out", str(out), "--eval", evalset, "--methods", "dense", "--nsamples", "4"]) == 2
    assert "2 Slurm job(s) of an earlier --executor slurm sweep are still queued or running" in capsys.readouterr().err
    report.main([str(out)])
    assert "miq.report: warning: " in capsys.readouterr().err

    rc, stdout, stderr = run(capsys, out, evalset, *flags)
    assert rc == 0, stdout + stderr
    assert "submitted as job" not in stdout and stdout.count("waiting for it, not submitted again") == 2
    assert set(results(out)) == {"dense", "sparsegpt_s0.5"}
    assert all(v is not None for ppl in results(out).values() for v in ppl.values())
    assert (out / "performance_report.md").exists() and not leftovers(out)
    changes = [ln for ln in stdout.splitlines() if re.search(r" job \d+_\d+ (pending|running|completing)", ln)]
    assert len(changes) == len(set(changes)), "a state printed twice without a change between"
    # the throttle held: no two tasks ran at once (their start and end times, as the controller keeps them)
    spans = sorted(tuple(ln.split("|")) for ln in squeue("--format=%S|%e", f"--jobs={min(array)}"))
    assert len(spans) == 2 and all(end <= start for (_, end), (start, _) in pairwise(spans)), spans


def test_a_requeued_job_finishes_once_and_the_rerun_waits_for_it(tmp_path, evalset, capsys):
    """scontrol requeue of a running task: the run is stopped (its staged files removed) and runs again from
    the start; a rerun meanwhile waits for it rather than reporting. Requeued after it wrote its result, it does
    not write it again, and the rerun waits for it too (the issue's report over a job still pending)."""
    out, flags = tmp_path / "out", ("--methods", "sparsegpt")
    rc, stdout, stderr = run(capsys, out, evalset, *flags, "--no-wait")
    assert rc == 0, stdout + stderr
    job = job_ids(out)["sparsegpt_s0.5"]
    wait_for(lambda: state(job) == "RUNNING" and (out / "sparsegpt_s0.5.log").exists(), LONG_S)
    subprocess.run(["scontrol", "requeue", job], check=True)
    wait_for(lambda: state(job) == "PENDING", LONG_S)

    rc, stdout, stderr = run(capsys, out, evalset, *flags)
    assert rc == 0, stdout + stderr
    assert f"sparsegpt_s0.5 queued or running as Slurm job {job}" in stdout and "submitted as job" not in stdout
    assert re.search(rf"job {job} pending \(BeginTime\)\n.*job {job} running\n", stdout), stdout
    assert stdout.count("sparsegpt_s0.5 done in") == 1
    assert list(results(out)) == ["sparsegpt_s0.5"] and not leftovers(out)
    assert starts(out) == 2  # stopped once, ran again

    result = out / "sparsegpt_s0.5.json"
    written = result.stat().st_mtime_ns
    subprocess.run(["scontrol", "requeue", job], check=True)  # a finished task, requeued
    rc, stdout, stderr = run(capsys, out, evalset, *flags)
    assert rc == 0, stdout + stderr
    assert "sparsegpt_s0.5 exists, skipped" in stdout and f"queued or running as Slurm job {job}" in stdout
    assert "sparsegpt_s0.5 exists (another submission finished it), skipped" in stdout
    assert state(job) == "COMPLETED" and result.stat().st_mtime_ns == written
    assert starts(out) == 3


def test_a_cancelled_job_is_reported_with_its_log_and_runs_on_the_next_submission(tmp_path, evalset, capsys):
    out, hook = tmp_path / "out", Hook(tmp_path / "hook", "dense")

    def cancel_when_held() -> None:
        wait_for(lambda: hook.held() and (out / "submitit" / "jobs.json").exists(), LONG_S)
        subprocess.run(["scancel", job_ids(out)["dense"]], check=True)

    canceller = threading.Thread(target=cancel_when_held, daemon=True)
    canceller.start()
    rc, stdout, stderr = run(capsys, out, evalset, "--methods", "dense", runner=hook)
    canceller.join()
    log = out / "dense.log"
    assert rc == 1, stdout + stderr
    assert re.search(rf"\[1/1\] dense killed \(exit 143\) .*; see {re.escape(str(log))}", stderr), stderr
    assert "killed by SIGTERM" in log.read_text()
    assert not results(out) and not list(out.glob("*.failed.json")) and not leftovers(out)

    rc, stdout, stderr = run(capsys, out, evalset, "--methods", "dense", runner=hook)
    assert rc == 0 and "[1/1] dense submitted as job" in stdout and "dense done in" in stdout, stdout + stderr
    assert list(results(out)) == ["dense"]


def test_a_job_past_its_time_limit_is_reported_and_runs_on_the_next_submission(tmp_path, evalset, capsys):
    """--slurm-time 1: Slurm warns the job (submitit's signal, 90 s before the limit, so at once), submitit
    calls its checkpoint, which stops the run, and does not requeue it (a time limit would end it again)."""
    out, hook = tmp_path / "out", Hook(tmp_path / "hook", "dense")
    rc, stdout, stderr = run(capsys, out, evalset, "--methods", "dense", "--slurm-time", "1", runner=hook)
    assert hook.held() and rc == 1, stdout + stderr
    assert re.search(r"\[1/1\] dense job \d+ did not finish .*timed-out.*; see .*dense\.log", stderr), stderr
    assert "stopped from outside" in (out / "dense.log").read_text()
    assert not results(out) and not list(out.glob("*.failed.json")) and not leftovers(out)

    rc, stdout, stderr = run(capsys, out, evalset, "--methods", "dense", runner=hook)
    assert rc == 0 and "dense done in" in stdout, stdout + stderr
    assert list(results(out)) == ["dense"]


def test_the_cluster_has_no_accounting(slurm_cluster):
    """What the quiet polling is for: sacct fails on this cluster, as on many small ones."""
    r = subprocess.run(["sacct", "-j", "1"], capture_output=True, text=True, env={**os.environ,
                                                                                  "SLURM_CONF": slurm_cluster})
    assert r.returncode != 0 and "accounting storage is disabled" in (r.stdout + r.stderr).lower()
