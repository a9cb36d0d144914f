"""sweep.py --executor slurm without a cluster: submitit's LocalExecutor runs the same jobs (``launch.ConfigJob``
pickled, unpickled and run by submitit's worker, as on a Slurm node) as local processes.

The configurations are sweep_helpers' fake opt_mi.py, behind a wrapper (``WRAPPER``) that can have one
configuration die the first time it runs: killed by SIGKILL mid-run (as Slurm's kill or the out-of-memory
killer does; it leaves a staged file behind, as a killed opt_mi.py would), or preempted (it sends submitit's
preemption signal to its worker, as Slurm does before a preemption, and then waits to be stopped).
"""

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import md_table
from submitit.core.utils import FailedJobError
from sweep_helpers import ROOT, FakeRunner, alive, results, start, wait_for

from miq import atomic
from miq.report import markdown as report
from miq.sweep import cli as sweep
from miq.sweep import launch, slurm

# the sweep machinery is under test here, and the report's tables; its figures are rendered in test_report
pytestmark = pytest.mark.usefixtures("unrendered_figures")

METHODS = ("--methods", "dense sparsegpt uniform")  # 3 configurations
IDS = {"dense", "sparsegpt_s0.5", "uniform_s0.5_w4"}

# DIR/wrapper.py: argv = marker folder, mode (kill | preempt), the id to hit, "--", the command to run
WRAPPER = r"""
import os, signal, sys, time
marker_dir, mode, hit = sys.argv[1:4]
command = sys.argv[5:]
target = command[command.index("--json") + 1]
rid = os.path.basename(target)[: -len(".json")]
marker = os.path.join(marker_dir, rid + "." + mode)
if rid == hit and not os.path.exists(marker):
    open(marker, "w").close()
    if mode == "kill":  # mid-run: a staged result written, as opt_mi.py stages it, then killed
        open(os.path.join(os.path.dirname(target), "." + os.path.basename(target) + "." + str(os.getpid()) + ".tmp"),
             "w").write("{half")
        os.kill(os.getpid(), signal.SIGKILL)
    os.kill(os.getppid(), int(os.environ.get("PREEMPT_SIGNAL", signal.SIGUSR2)))  # to submitit's worker
    time.sleep(60)  # stopped by the worker's checkpoint() long before this ends
    sys.exit("not stopped")
os.execv(command[0], command)
"""


@dataclass(frozen=True)
class Dying:
    """A sweep runner: ``fake``'s command behind WRAPPER, which has configuration ``hit`` die in ``mode``
    the first time it runs (it leaves a marker file saying so)."""

    fake: FakeRunner
    hit: str
    mode: str

    def __call__(self, args: list[str]) -> list[str]:
        script = Path(self.fake.dir, "wrapper.py")
        if not script.exists():  # once and atomically: a job starting meanwhile must not read it half written
            atomic.write_text(script, WRAPPER)
        return [sys.executable, str(script), self.fake.dir, self.mode, self.hit, "--", *self.fake(args)]

    def died(self) -> bool:
        return Path(self.fake.dir, f"{self.hit}.{self.mode}").exists()


@pytest.fixture(autouse=True)
def local_cluster(monkeypatch):
    monkeypatch.setattr(slurm, "CLUSTER", "local")
    monkeypatch.setenv("PREEMPT_SIGNAL", str(int(launch.PREEMPT_SIGNAL)))


@pytest.fixture
def fake(tmp_path) -> FakeRunner:
    return FakeRunner(str(tmp_path / "fake"), sleep=0.2)


def run(capsys, out: Path, runner, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = sweep.main(["--out", str(out), *METHODS, *args], runner=runner)
    return rc, *capsys.readouterr()


def tables(out: Path) -> dict[str, list[dict[str, str]]]:
    """The report's tables but the overhead one (timings), and its verdict, from OUT/performance_report.md."""
    md = (out / "performance_report.md").read_text()
    verdict = md.split("## Verdict\n", 1)[1].split("\n## ", 1)[0] if "## Verdict" in md else ""
    return {"Results": md_table(md, "Results"), "verdict": verdict.replace(str(out), "OUT")}


@pytest.mark.slow
def test_killed_job_leaves_nothing_and_runs_again_on_resubmission(tmp_path, fake, capsys):
    dying = Dying(fake, hit="sparsegpt_s0.5", mode="kill")
    out = tmp_path / "slurm"
    rc, stdout, stderr = run(capsys, out, dying, "--executor", "slurm")
    assert dying.died()
    assert rc == 1, stdout + stderr  # incomplete: the report is built, the sweep says what to rerun
    assert re.search(r"\[2/3\] sparsegpt_s0.5 killed \(exit 137\)", stderr), stderr
    assert "rerun the same command" in stderr
    assert set(results(out)) == IDS - {"sparsegpt_s0.5"}
    assert not list(out.glob("*.failed.json")), "a job killed from outside was recorded as failed"
    assert not [p for p in out.rglob("*.tmp")], "the killed run's staged file was left behind"
    assert "killed by SIGKILL" in (out / "sparsegpt_s0.5.log").read_text()
    assert (out / "submitit").is_dir() and (out / "performance_report.md").exists()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}
    before = list(fake.invocations())

    rc, stdout, stderr = run(capsys, out, dying, "--executor", "slurm")
    assert rc == 0, stdout + stderr
    assert fake.invocations()[len(before):] == ["sparsegpt_s0.5"], "only the killed configuration runs again"
    assert sorted(fake.invocations()) == sorted(IDS), "a configuration ran twice"
    assert stdout.count("exists, skipped") == 2
    assert set(results(out)) == IDS
    assert {n: t for n, t in ((p.name, p.stat().st_mtime_ns) for p in out.glob("*.json")) if n in mtimes} == mtimes

    local = tmp_path / "local"
    rc, stdout, stderr = run(capsys, local, FakeRunner(str(tmp_path / "fake_local")))
    assert rc == 0, stderr
    assert results(local) == results(out)
    assert tables(out) == tables(local)
    assert len(tables(out)["Results"]) == 3


@pytest.mark.slow
def test_preempted_job_is_requeued_by_submitit_and_finishes(tmp_path, fake, capsys):
    """Slurm's warning signal before a preemption: submitit calls ConfigJob.checkpoint(), which stops the run,
    and requeues the job, which runs the configuration again from the start in the same submission."""
    dying = Dying(fake, hit="uniform_s0.5_w4", mode="preempt")
    out = tmp_path / "slurm"
    rc, stdout, stderr = run(capsys, out, dying, "--executor", "slurm")
    assert dying.died()
    assert rc == 0, stdout + stderr
    assert set(results(out)) == IDS and not list(out.glob("*.failed.json"))
    assert sorted(fake.invocations()) == sorted(IDS)
    assert "uniform_s0.5_w4 done in" in stdout
    worker_logs = "".join(p.read_text() for p in (out / "submitit").glob("*_log.out"))
    assert "Calling checkpoint method" in worker_logs and "Requeued job" in worker_logs


@pytest.mark.slow
def test_no_wait_submits_and_exits_then_the_report_is_built_later(tmp_path, fake, capsys):
    out = tmp_path / "slurm"
    rc, stdout, _ = run(capsys, out, fake, "--executor", "slurm", "--no-wait")
    assert rc == 0 and f"python -m miq.report {out}" in stdout
    assert not (out / "performance_report.md").exists()
    assert set(json.loads((out / "submitit" / "jobs.json").read_text())) == IDS  # configuration -> job id
    wait_for(lambda: set(results(out)) == IDS)  # the jobs run on after the sweep has exited
    assert sorted(fake.invocations()) == sorted(IDS)
    assert report.main([str(out)]) == 0 and (out / "performance_report.md").exists()


@pytest.mark.slow
def test_failed_configuration_leaves_its_note(tmp_path, fake, capsys):
    out = tmp_path / "slurm"
    rc, stdout, stderr = run(capsys, out, dataclasses.replace(fake, fail="uniform"), "--executor", "slurm")
    assert rc == 1 and "uniform_s0.5_w4 FAILED (exit 1)" in stderr
    note = json.loads((out / "uniform_s0.5_w4.failed.json").read_text())
    assert note["returncode"] == 1 and "fake failure" in note["error"] and "--wbits 4" in note["command"]
    n = len(fake.invocations())
    rc, stdout, _ = run(capsys, out, fake, "--executor", "slurm")
    assert rc == 1 and "failed before, skipped" in stdout and len(fake.invocations()) == n
    rc, _, _ = run(capsys, out, fake, "--executor", "slurm", "--retry-failed")
    assert rc == 0 and fake.invocations()[n:] == ["uniform_s0.5_w4"]
    assert not (out / "uniform_s0.5_w4.failed.json").exists()


@pytest.mark.parametrize("args, words", [
    (["--executor", "slurm", "--jobs", "2"], "--jobs: not with --executor slurm"),
    (["--executor", "slurm", "--jobs-per-gpu", "2"], "--jobs-per-gpu: not with --executor slurm"),
    (["--slurm-partition", "gpu"], "--slurm-partition: only with --executor slurm"),
    (["--no-wait"], "--no-wait: only with --executor slurm"),
    (["--executor", "pbs"], "--executor pbs: one of local, slurm"),
    (["--executor", "slurm", "--slurm-time", "1:75:00"], "--slurm-time '1:75:00'"),
    (["--executor", "slurm", "--slurm-time", "0"], "at least one minute"),
    (["--executor", "slurm", "--slurm-mem", "lots"], "--slurm-mem 'lots'"),
    (["--executor", "slurm", "--slurm-gpus-per-job", "-1"], "--slurm-gpus-per-job '-1'"),
    (["--executor", "slurm", "--slurm-array-parallelism", "0"], "--slurm-array-parallelism '0'"),
    (["--executor", "slurm", "--slurm-extra", "time=10"], "time is set by --slurm-time"),
    (["--executor", "slurm", "--slurm-extra", "array=0-3"], "array is set by submitit"),
    (["--executor", "slurm", "--slurm-extra", "account="], "--slurm-extra 'account='"),
])
def test_bad_executor_arguments_exit_2_with_one_line(tmp_path, fake, capsys, args, words):
    rc, stdout, stderr = run(capsys, tmp_path / "out", fake, *args)
    assert rc == 2 and stdout == "" and len(stderr.strip().splitlines()) == 1, stderr
    assert words in stderr
    assert not (tmp_path / "out").exists() and fake.invocations() == []


def test_slurm_without_sbatch_is_refused(tmp_path, fake, capsys, monkeypatch):
    monkeypatch.setattr(slurm, "CLUSTER", "slurm")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    rc, stdout, stderr = run(capsys, tmp_path / "out", fake, "--executor", "slurm")
    assert rc == 2 and "sbatch and srun not on PATH" in stderr and not (tmp_path / "out").exists()


def fake_slurm_commands(folder: Path) -> str:
    """A folder holding sbatch and srun that do nothing: submitit's Slurm executor looks for them."""
    folder.mkdir()
    for name in ("sbatch", "srun"):
        (folder / name).write_text("#!/bin/sh\nexit 1\n")
        (folder / name).chmod(0o755)
    return str(folder)


@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30:00", 90), ("0:00:30", 1), ("0:01:01", 2),
                                           ("2-01:00:00", 2 * 24 * 60 + 60)])
def test_slurm_time(text, minutes):
    h = m = s = d = 0
    if ":" in text:
        d, _, hms = text.rpartition("-")
        h, m, s = map(int, hms.split(":"))
        d = int(d or 0)
    else:
        m = int(text)
    total_s = ((d * 24 + h) * 60 + m) * 60 + s
    assert slurm.parse_time(text) == minutes == (total_s + 59) // 60


def test_options_reach_submitit(tmp_path, monkeypatch):
    """The flags become submitit's parameters and, on Slurm, these #SBATCH lines."""
    monkeypatch.setattr(slurm, "CLUSTER", "slurm")
    monkeypatch.setenv("PATH", fake_slurm_commands(tmp_path / "bin"))
    raw = {"--slurm-partition": "gpu", "--slurm-gpus-per-job": "2", "--slurm-time": "1:00:00",
           "--slurm-mem": "64G", "--slurm-array-parallelism": "16"}
    opts = slurm.options(raw, ["account=proj", "constraint=a100", "exclusive"], wait=True)
    assert opts == slurm.SlurmOptions("gpu", 2, 60, "64G", 16, (("account", "proj"), ("constraint", "a100"),
                                                                 ("exclusive", True)), True)
    ex = slurm.executor(tmp_path / "submitit", opts)
    assert ex._executor.max_num_timeout == 0  # a time limit is not requeued
    assert ex._executor.parameters["array_parallelism"] == 16  # sbatch --array=0-<n-1>%16 for a batch
    text = ex._executor._make_submission_file_text("python -m submitit.core._submit X", "uid") + "\n"
    for line in ("--partition=gpu", "--time=60", "--gpus-per-node=2", "--mem=64G", "--nodes=1",
                 "--ntasks-per-node=1", "--account=proj", "--constraint=a100", "--exclusive", "--job-name=miq-sweep"):
        assert f"#SBATCH {line}\n" in text, (line, text)
    assert f"export PYTHONPATH={slurm.ROOT}" in text  # the worker imports miq from this checkout


def fake_squeue(folder: Path, stdout: str, rc: int = 0, stderr: str = "") -> str:
    """A folder holding an squeue that prints ``stdout`` (and ``stderr``), exits ``rc`` and keeps its arguments
    in folder/args."""
    folder.mkdir()
    (folder / "squeue").write_text(f"#!/bin/sh\necho \"$@\" > {folder}/args\nprintf %s '{stdout}'\n"
                                   f"printf %s '{stderr}' >&2\nexit {rc}\n")
    (folder / "squeue").chmod(0o755)
    return str(folder)


def test_a_job_still_queued_or_running_is_not_submitted_twice(tmp_path, monkeypatch):
    """jobs.json maps configurations to their last Slurm job: one squeue lists as queued, running or requeued
    is waited for, not submitted again; one it lists as ended, or no longer lists, is submitted."""
    monkeypatch.setattr(slurm, "CLUSTER", "slurm")
    lines = ["1_0|RUNNING|None", "1_1|PENDING|JobArrayTaskLimit", "1_2|COMPLETED|None", "1_3|CANCELLED|None",
             "1_5|PENDING|BeginTime", "1_6|TIMEOUT|None", "2|REQUEUED|None"]
    monkeypatch.setenv("PATH", fake_squeue(tmp_path / "bin", "\n".join(lines) + "\n"))
    batch = slurm.Batch(tmp_path, slurm.SlurmOptions(), 9)
    flying = batch.in_flight({f"c{i}": f"1_{i}" for i in range(7)} | {"c8": "2"})  # 1_4: forgotten, ended
    assert flying == {"c0": "1_0", "c1": "1_1", "c5": "1_5", "c8": "2"}
    assert (tmp_path / "bin" / "args").read_text().split() == [
        "--noheader", "--array", "--states=all", "--format=%i|%T|%r", "--jobs=1,2"]  # one call, by array


@pytest.mark.parametrize("rc, stderr, flying", [
    (1, "slurm_load_jobs error: Invalid job id specified", {}),  # all forgotten by the controller: ended
    (1, "slurm_load_jobs error: Unable to contact slurm controller (connect failure)", None)])
def test_squeue_failing_stops_the_submission(tmp_path, monkeypatch, rc, stderr, flying):
    monkeypatch.setattr(slurm, "CLUSTER", "slurm")
    monkeypatch.setenv("PATH", fake_squeue(tmp_path / "bin", "", rc, stderr))
    batch = slurm.Batch(tmp_path, slurm.SlurmOptions(), 1)
    if flying is not None:
        assert batch.in_flight({"c0": "7_0"}) == flying
    else:
        with pytest.raises(slurm.SubmitError, match="cannot tell which jobs .* Unable to contact slurm controller"):
            batch.in_flight({"c0": "7_0"})


def test_checkpoint_stops_the_run_and_hands_back_a_fresh_job(tmp_path):
    job = launch.ConfigJob("dense", ("sleep", "30"), str(tmp_path))
    job._proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    again = job.checkpoint()
    assert job._proc.wait(timeout=10) == -signal.SIGTERM
    assert again.function == launch.ConfigJob("dense", ("sleep", "30"), str(tmp_path))
    assert again.function._proc is None and again.args == () and again.kwargs == {}


@pytest.mark.slow
def test_stopping_the_waiting_sweep_cancels_its_jobs(tmp_path, fake):
    """SIGTERM to a sweep waiting for its jobs cancels them: the running configuration is stopped and nothing is
    recorded for it, as with the local executor."""
    slow = dataclasses.replace(fake, sleep=60)
    out = tmp_path / "slurm"
    p = start(out, slow, "--methods", "dense", "--executor", "slurm",
              setup="from miq.sweep import slurm; slurm.CLUSTER = 'local'")
    wait_for(lambda: slow.pid("dense") and alive(slow.pid("dense")))
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and "cancelled 1 job(s)" in err, err
    wait_for(lambda: not alive(slow.pid("dense")))
    assert not list(out.glob("*.json")) and not (out / "performance_report.md").exists()
    assert "no result recorded" in (out / "dense.log").read_text()


@pytest.mark.slow
def test_compare_methods_sh_passes_the_executor_flags_on(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "compare_methods.sh"), "--executor", "slurm", "--jobs", "2", "--out",
                        str(tmp_path / "x")], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("sweep.py: error: --jobs: not with --executor slurm")


@pytest.mark.slow
def test_real_opt_mi_through_submitit(tmp_path, capsys):
    """The real opt_mi.py on the toy model as submitit jobs: the worker finds miq and opt_mi.py, the results
    are those opt_mi.py writes, and the report is built from them."""
    from datautils import synthetic_text

    evalset = tmp_path / "heldout.txt"
    evalset.write_text(synthetic_text("test")[:3_000])
    out = tmp_path / "slurm"
    capsys.readouterr()
    rc = sweep.main(["--out", str(out), "--methods", "dense sparsegpt", "--nsamples", "8", "--eval", str(evalset),
                     "--extra", "--seqlen 32", "--executor", "slurm"])
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stdout + stderr
    assert set(results(out)) == {"dense", "sparsegpt_s0.5"}
    assert all(v is not None for ppl in results(out).values() for v in ppl.values())
    assert (out / "sparsegpt_s0.5.log").read_text().startswith(f"# {sys.executable} {ROOT / 'opt_mi.py'} ")
    rows = md_table((out / "performance_report.md").read_text(), "Results")
    assert {r["run"] for r in rows} == {"dense", "sparsegpt_s0.5"}


def test_sbatch_refusing_the_jobs_exits_2_with_its_line(tmp_path, fake, capsys, monkeypatch):
    class Refusing:
        @contextlib.contextmanager
        def batch(self):
            yield

        def submit(self, job):
            raise FailedJobError("sbatch: error: invalid partition specified: gpuz\n")

    monkeypatch.setattr(slurm, "executor", lambda folder, opts: Refusing())
    rc, stdout, stderr = run(capsys, tmp_path / "out", fake, "--executor", "slurm", "--slurm-partition", "gpuz")
    assert rc == 2 and stderr.strip().splitlines() == [
        "sweep.py: error: --executor slurm: submitting the jobs failed: sbatch: error: invalid partition specified: "
        "gpuz"]
    assert not (tmp_path / "out" / "submitit" / "jobs.json").exists() and fake.invocations() == []


@dataclass
class InFlight:
    """A job an earlier submission left queued or running, as submitit's SlurmJob reads it: done once the
    configuration's result is there."""

    job_id: str
    result_path: Path

    def done(self) -> bool:
        return self.result_path.exists()

    def result(self) -> launch.Outcome:
        return launch.Outcome("done", 0, 0.0)


@pytest.mark.slow
def test_rerun_waits_for_the_jobs_still_in_flight_instead_of_submitting_them_again(tmp_path, fake, capsys,
                                                                                  monkeypatch):
    slow = dataclasses.replace(fake, sleep=4)  # still running when the rerun starts
    out = tmp_path / "slurm"
    rc, stdout, _ = run(capsys, out, slow, "--executor", "slurm", "--no-wait")
    assert rc == 0 and stdout.count("submitted as job") == 3

    def in_flight(self, ids):  # squeue's answer: every recorded job without its result is still running
        return {cfg: job for cfg, job in ids.items() if not (out / f"{cfg}.json").exists()}

    by_job = {job: cfg for cfg, job in json.loads((out / "submitit" / "jobs.json").read_text()).items()}
    monkeypatch.setattr(slurm.Batch, "in_flight", in_flight)
    monkeypatch.setattr(slurm.Batch, "job_of", lambda self, job: InFlight(job, out / f"{by_job[job]}.json"))
    rc, stdout, stderr = run(capsys, out, slow, "--executor", "slurm")
    assert rc == 0, stdout + stderr
    assert "submitted as job" not in stdout and "not submitted again" in stdout
    assert set(results(out)) == IDS and sorted(slow.invocations()) == sorted(IDS)
    assert (out / "performance_report.md").exists()
