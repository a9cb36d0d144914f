"""The sweep's Slurm executor: each configuration still missing is one Slurm job, submitted through submitit
(an array job, ``--slurm-array-parallelism`` of them at a time), which runs opt_mi.py (``launch.ConfigJob``).

Submission, the jobs' state and requeueing are submitit's and Slurm's; the sweep keeps no state beyond the
results folder, which must be on a filesystem the nodes share:

- a job publishes OUT/<id>.json itself (opt_mi.py stages and renames it), writes OUT/<id>.log, and a failure note
  when opt_mi.py exits non-zero; a job Slurm kills (time limit, cancellation, out of memory) leaves neither, so
  the next submission runs it again;
- on preemption (Slurm's warning signal) submitit calls the job's ``checkpoint()`` and requeues it; a time
  limit is not requeued (``max_num_timeout=0``): the same limit would end it again;
- submitit's own files (pickled jobs, the workers' logs) go to OUT/submitit/, which the results reader never
  looks in (it reads OUT/*.json); OUT/submitit/jobs.json maps each configuration to its last Slurm job, so
  that a submission made while an earlier one is still queued, running or requeued does not submit it twice,
  and waits for it before the report, even when its configuration already has a result (a requeued job);
- the jobs' states come from squeue (``miq.slurm_queue``), not from sacct, which clusters without accounting
  do not answer.

``CLUSTER`` names submitit's executor: "slurm"; the tests set "local" (submitit's LocalExecutor runs the same
jobs as local processes, without a cluster).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import submitit
from submitit.core.utils import FailedJobError, FailedSubmissionError, UncompletedJobError

from miq import atomic, slurm_queue
from miq.errors import ConfigError, bad_value
from miq.sweep.launch import ConfigJob, Outcome, fmt_dur, say
from miq.sweep.stopping import Interrupted

CLUSTER = "slurm"
ROOT = Path(__file__).resolve().parents[2]  # the checkout: the jobs import the miq package from it
POLL_S = 0.2  # how often the sweep looks for a signal or, on the local executor, a job's end (a file check)
QUEUE_POLL_S = 5.0  # how often squeue is asked for the jobs' states, all at once
RESULT_GRACE_S = 10.0  # a job squeue no longer lists whose outcome file is not there yet (a shared filesystem's lag)
# sbatch options the sweep's own flags or submitit set: --slurm-extra may not set them a second way
OWN = {"time": "--slurm-time", "partition": "--slurm-partition", "mem": "--slurm-mem",
       "gpus-per-node": "--slurm-gpus-per-job", "array": "submitit", "output": "submitit", "error": "submitit",
       "signal": "submitit", "open-mode": "submitit", "job-name": "submitit"}


@dataclass(frozen=True)
class SlurmOptions:
    """The --slurm-* flags, validated. ``time_min``: the time limit of one job, in minutes; ``extra``: sbatch
    options as (name, value) pairs, a value of True for an option without one."""

    partition: str | None = None
    gpus_per_job: int = 1
    time_min: int = 240
    mem: str | None = None
    array_parallelism: int | None = None
    extra: tuple[tuple[str, str | bool], ...] = ()
    wait: bool = True


def parse_time(text: str) -> int:
    """Minutes from "90", "1:30:00" (H:MM:SS) or "1-12:00:00" (days-H:MM:SS), rounded up to whole minutes."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+):([0-5]\d):([0-5]\d)|(\d+)", text.strip())
    if not m:
        raise bad_value("--slurm-time", repr(text),
                        "minutes (e.g. 240) or HH:MM:SS (e.g. 4:00:00), optionally D-HH:MM:SS")
    if m[5] is not None:
        minutes = int(m[5])
    else:
        seconds = (int(m[1] or 0) * 24 + int(m[2])) * 3600 + int(m[3]) * 60 + int(m[4])
        minutes = -(-seconds // 60)
    if minutes < 1:
        raise bad_value("--slurm-time", repr(text), "at least one minute")
    return minutes


def parse_extra(items: Sequence[str]) -> tuple[tuple[str, str | bool], ...]:
    """--slurm-extra KEY=VALUE (or KEY alone, for an option without a value), as sbatch spells KEY."""
    out: dict[str, str | bool] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().removeprefix("--").replace("_", "-")
        if not re.fullmatch(r"[a-z][a-z0-9-]*", key) or (eq and not value):
            raise bad_value("--slurm-extra", repr(item),
                            "an sbatch option as KEY=VALUE (e.g. account=myproj, constraint=a100) or KEY alone "
                            "(e.g. exclusive)")
        if key in OWN:
            who = OWN[key]
            raise bad_value("--slurm-extra", repr(item),
                            f"{key} is set by {who}" + ("" if who == "submitit" else ": use it"))
        out[key] = value if eq else True
    return tuple(out.items())


def options(raw: dict[str, str], extra: Sequence[str], wait: bool) -> SlurmOptions:
    """SlurmOptions from the flags' raw values ("" when not given); ConfigError naming the flag otherwise."""
    def count(flag: str, least: int) -> int | None:
        v = raw[flag]
        if v == "":
            return None
        if not re.fullmatch(r"\d+", v) or int(v) < least:
            raise bad_value(flag, repr(v), f"an integer >= {least}")
        return int(v)

    mem = raw["--slurm-mem"] or None
    if mem is not None and not re.fullmatch(r"[1-9][0-9]*[KMGT]?", mem):
        raise bad_value("--slurm-mem", repr(mem), "memory per job as sbatch takes it, e.g. 64G or 64000M")
    if CLUSTER == "slurm" and (missing := [c for c in ("sbatch", "srun") if shutil.which(c) is None]):
        raise ConfigError(f"--executor slurm: {' and '.join(missing)} not on PATH; run the sweep where Slurm jobs "
                          "are submitted (a login node)")
    gpus = count("--slurm-gpus-per-job", 0)
    return SlurmOptions(partition=raw["--slurm-partition"] or None, gpus_per_job=1 if gpus is None else gpus,
                        time_min=parse_time(raw["--slurm-time"]), mem=mem,
                        array_parallelism=count("--slurm-array-parallelism", 1), extra=parse_extra(extra), wait=wait)


def executor(folder: Path, opts: SlurmOptions) -> submitit.AutoExecutor:
    """submitit's executor for the sweep's jobs: one task on one node each, ``gpus_per_job`` GPUs."""
    ex = submitit.AutoExecutor(folder, cluster=CLUSTER, slurm_max_num_timeout=0, local_max_num_timeout=0)
    # the workers unpickle launch.ConfigJob: they import miq from this checkout, wherever sbatch starts them
    # (not set up so for the local executor: a shell around its process would keep a cancellation from it)
    setup = [f"export PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"]
    params = {"name": "miq-sweep", "timeout_min": opts.time_min, "gpus_per_node": opts.gpus_per_job or None,
              "nodes": 1, "tasks_per_node": 1, "stderr_to_stdout": True, "slurm_setup": setup,
              "slurm_partition": opts.partition, "slurm_mem": opts.mem,
              "slurm_array_parallelism": opts.array_parallelism}
    if opts.extra:
        params["slurm_additional_parameters"] = dict(opts.extra)
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return ex


def refuse_local_over_jobs(out: Path) -> None:
    """ConfigError when the Slurm jobs of an earlier --executor slurm sweep (--no-wait) are still in flight in
    ``out``: a local sweep there would run their configurations a second time, at the same time."""
    if flying := slurm_queue.in_flight_if_known(out):
        raise ConfigError(f"--out {out}: {len(flying)} Slurm job(s) of an earlier --executor slurm sweep are still "
                          "queued or running into it, which a local sweep would run a second time; rerun with "
                          "--executor slurm to wait for them, or scancel them")


@contextlib.contextmanager
def importable() -> Iterator[None]:
    """PYTHONPATH holding this checkout while jobs are submitted, for the processes that inherit the sweep's
    environment (the local executor's; sbatch exports it too): their workers import miq to unpickle the job."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(ROOT) + ("" if old is None else os.pathsep + old)
    try:
        yield
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


@dataclass(frozen=True)
class Task:
    """A configuration to run: its id, its place in the matrix (progress lines) and its command."""

    id: str
    n: int
    command: tuple[str, ...]


class SubmitError(Exception):
    """The jobs could not be submitted: ``str(e)`` is the one line the sweep prints before exiting with
    ``status``: 2 when nothing was submitted (sbatch refused the options, submitit refused them first), 1 when
    sbatch may have queued them under an id it did not print."""

    def __init__(self, line: str, status: int = 2):
        super().__init__(line)
        self.status = status


def submission_error(e: Exception) -> SubmitError:
    """The one line for an error submitit raised while submitting: sbatch's own complaint (its last line), an
    answer without a job id, or submitit's errors (a parameter it does not know, a job it cannot pickle)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    if isinstance(e, FailedSubmissionError):  # sbatch exited 0: the array may be queued, its id unknown
        answer = re.sub(r'^Could not make sense of sbatch output "?|"$', "", lines[0])
        return SubmitError(f"--executor slurm: sbatch's answer names no job id ({answer!r}): the jobs may be "
                           "queued under an id this sweep cannot follow; look with squeue --me --name miq-sweep "
                           "and cancel them (scancel --name miq-sweep) before running the same command again", 1)
    why = lines[-1] if isinstance(e, FailedJobError) else lines[0]  # sbatch's error comes last in its output
    return SubmitError(f"--executor slurm: submitting the jobs failed: {why}")


@dataclass
class Tally:
    submitted: int = 0
    failed: int = 0
    killed: int = 0


class Batch:
    """The sweep's Slurm jobs: submitted, found still in flight from an earlier submission, waited for.

    On Slurm, a job's state is squeue's (``slurm_queue``), asked at most every QUEUE_POLL_S for all the jobs at
    once and printed when it changes (pending, running, pending again after a requeue); a job has ended when
    squeue no longer shows it queued or running, and only then is its outcome read. submitit's own polling is
    not used: it asks sacct, which clusters without accounting answer with a warning on every poll, and it
    takes a requeued job's earlier outcome for its end."""

    def __init__(self, out: Path, opts: SlurmOptions, total: int):
        self.out, self.opts, self.total = out, opts, total
        self.folder = out / "submitit"
        self.record = slurm_queue.record_path(out)
        self.jobs: dict[str, tuple[Task, submitit.Job]] = {}
        self.tally = Tally()
        self.seen: dict[str, str] = {}  # configuration -> its job's state as last printed
        self.gone: dict[str, float] = {}  # configuration -> when squeue first stopped listing its job
        self.polled = float("-inf")

    def recorded(self) -> dict[str, str]:
        return slurm_queue.recorded(self.out)

    def in_flight(self, ids: dict[str, str]) -> dict[str, str]:
        """Of these configurations' recorded jobs (id -> job id), those still queued, running or requeued."""
        if CLUSTER != "slurm" or not ids:  # a local job's process belongs to the sweep that started it
            return {}
        try:
            now = slurm_queue.states(ids.values())
        except slurm_queue.QueueError as e:  # submitting blind could run a configuration twice at once
            raise SubmitError(f"--executor slurm: cannot tell which jobs of {self.out} are still in flight ({e}); "
                              "rerun once squeue answers") from None
        return {cfg: job for cfg, job in ids.items() if job in now and now[job].active}

    def job_of(self, job_id: str) -> submitit.Job:
        """submitit's handle on an earlier submission's job: its files (outcome, log) and its cancellation."""
        return submitit.SlurmJob(self.folder, job_id)

    def submit(self, tasks: list[Task], others: Sequence[Task] = ()) -> None:
        """Submit every task that has no job in flight already (one array job); record their job ids. ``others``:
        the configurations not to run (present, failed, skipped) whose job from an earlier submission may still
        be in flight (requeued after writing its result): waited for too, never submitted."""
        self.folder.mkdir(parents=True, exist_ok=True)
        ids = self.recorded()
        flying, new = self.in_flight({t.id: ids[t.id] for t in [*tasks, *others] if t.id in ids}), []
        for t in [*tasks, *others]:
            if t.id in flying:
                say(f"[{t.n}/{self.total}] {t.id} queued or running as Slurm job {flying[t.id]} (an earlier "
                    "submission): waiting for it, not submitted again")
                self.jobs[t.id] = (t, self.job_of(flying[t.id]))
            elif t in tasks:
                new.append(t)
        if new:
            staged = set(self.folder.glob("*.pkl"))
            try:
                ex = executor(self.folder, self.opts)
                # submitit echoes sbatch's complaint itself: it is in the one line below instead
                with importable(), contextlib.redirect_stderr(io.StringIO()), ex.batch():
                    submitted = [ex.submit(ConfigJob(t.id, t.command, str(self.out))) for t in new]
            except Interrupted:
                raise
            except Exception as e:  # whatever submitit raises (its own types too): one line, never a traceback
                for p in set(self.folder.glob("*.pkl")) - staged:  # the jobs it pickled for this submission
                    p.unlink(missing_ok=True)
                raise submission_error(e) from None
            for t, job in zip(new, submitted, strict=True):
                say(f"[{t.n}/{self.total}] {t.id} submitted as job {job.job_id}")
                self.jobs[t.id] = (t, job)
                ids[t.id] = job.job_id
            atomic.write_text(self.record, json.dumps(ids, indent=1))
        self.tally.submitted = len(new)

    def wait(self, check_signal: Callable[[], None]) -> Tally:
        """Wait for every job, printing how each ended; ``check_signal`` raises when the sweep is stopped."""
        t0, pending = time.monotonic(), dict(self.jobs)
        say(f"waiting for {len(pending)} job(s); their logs: {self.out}/<id>.log and {self.folder}/")
        while pending:
            check_signal()
            for cfg_id in self.ended(pending):
                task, job = pending.pop(cfg_id)
                self.finish(task, job, time.monotonic() - t0)
            if pending:
                time.sleep(POLL_S)
        return self.tally

    def ended(self, pending: dict[str, tuple[Task, submitit.Job]]) -> list[str]:
        """The configurations of ``pending`` whose job has ended; on Slurm, the state changes are printed."""
        if CLUSTER != "slurm":
            return [cfg_id for cfg_id, (_, job) in pending.items() if job.done()]
        if time.monotonic() - self.polled < QUEUE_POLL_S:
            return []
        self.polled = time.monotonic()
        try:
            now = slurm_queue.states(job.job_id for _, job in pending.values())
        except slurm_queue.QueueError as e:  # the controller busy or restarting: asked again at the next poll
            self.changed("squeue", f"not answering ({e}); asking again", err=True)
            return []
        self.changed("squeue", "answering")
        done = []
        for cfg_id, (task, job) in pending.items():
            state = now.get(job.job_id)
            if state is not None and state.active:
                self.gone.pop(cfg_id, None)
                self.changed(cfg_id, f"[{task.n}/{self.total}] {task.id} job {job.job_id} {state}")
            elif job.paths.result_pickle.exists() or time.monotonic() - self.gone.setdefault(
                    cfg_id, time.monotonic()) >= RESULT_GRACE_S:
                done.append(cfg_id)
        return done

    def changed(self, key: str, line: str, err: bool = False) -> None:
        """Print ``line`` unless it is what was last printed for ``key``: one line per state change."""
        if self.seen.get(key, "answering" if key == "squeue" else None) != line:
            self.seen[key] = line
            if line != "answering":
                say(line, err=err)

    def finish(self, task: Task, job: submitit.Job, waited: float) -> None:
        head = f"[{task.n}/{self.total}] {task.id}"
        log = f"{self.out}/{task.id}.log"
        try:
            if CLUSTER == "slurm" and not job.paths.result_pickle.exists():
                raise UncompletedJobError("ended without writing an outcome (killed before its worker could)")
            outcome: Outcome = job.result()
        except (UncompletedJobError, FailedJobError) as e:
            # the worker itself ended without an outcome: killed (time limit, cancellation, node failure) or
            # not requeued; nothing was recorded for the configuration
            self.tally.killed += 1
            why = _first_line(e)
            say(f"{head} job {job.job_id} did not finish after {fmt_dur(waited)} ({why}); not recorded: the "
                f"next submission runs it again; see {log} and {job.paths.stdout}", err=True)
            return
        if outcome.status == "done":
            say(f"{head} done in {fmt_dur(outcome.seconds)}")
        elif outcome.status == "exists":
            say(f"{head} exists (another submission finished it), skipped")
        elif outcome.status == "killed":
            self.tally.killed += 1
            say(f"{head} killed (exit {outcome.rc}) after {fmt_dur(outcome.seconds)} (job {job.job_id}); not "
                f"recorded: the next submission runs it again; see {log}", err=True)
        else:
            self.tally.failed += 1
            say(f"{head} FAILED (exit {outcome.rc}) after {fmt_dur(outcome.seconds)}; see {log}", err=True)

    def cancel(self) -> None:
        """Cancel every job that has not ended (the sweep was stopped while waiting)."""
        live = [job for _, job in self.jobs.values()]
        if CLUSTER != "slurm":
            live = [job for job in live if not job.done()]
        with contextlib.suppress(slurm_queue.QueueError):  # squeue not answering: every job is cancelled
            if CLUSTER == "slurm":
                now = slurm_queue.states(job.job_id for job in live)
                live = [job for job in live if job.job_id in now and now[job.job_id].active]
        for job in live:
            job.cancel(check=False)
        say(f"cancelled {len(live)} job(s)", err=True)


def _first_line(e: Exception) -> str:
    """Why a job ended without an outcome, in one line: the exception submitit's worker raised (the last line
    of the trace it hands back, e.g. "Job not requeued because: timed-out too many times."), else the first."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    raised = [ln for ln in lines if ln.startswith("submitit.core.utils.")]
    if raised:
        return raised[-1].removeprefix("submitit.core.utils.")
    return lines[0] if lines else type(e).__name__
