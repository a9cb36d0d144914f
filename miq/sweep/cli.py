"""Run the method matrix of ``methods.py`` with ``opt_mi.py``, one process per configuration, then the report.

    python -m miq.sweep                  # toy model, offline, a few minutes on a laptop
    python -m miq.sweep --model facebook/opt-125m --calib c4 --eval wikitext2,c4 \\
        --sparsities "0.5" --groups "16 50" --wbits "3 4" --out results/opt125m --jobs 2

``compare_methods.sh`` runs this with the same flags. Contract:

- one result per configuration: OUT/<id>.json (written atomically by ``opt_mi.py --json``), its output in
  OUT/<id>.log (first line ``# <command line>``, then ``# env: ...``, the threads and GPU it was given) and its
  figures in OUT/analysis/<id>/;
- a configuration whose OUT/<id>.json holds a result is skipped, so a killed sweep resumes where it stopped and
  a second run does nothing new (after changing the code, sweep into a new --out); an unreadable one (cut
  short, or not a result at all) is kept as OUT/<id>.json.foreign-<n>, said in one line, and run again;
- the sweep deletes or writes over only files it can prove it wrote (``owned.py``): a log or failure note it
  did not write, at a name it needs, is kept the same way;
- every configuration runs with --threads threads (OMP_NUM_THREADS, MKL_NUM_THREADS): a perplexity depends on
  the thread count, so it is the sweep's to pin, not each job's to find;
- --extra may add to what each configuration runs, never change its sparsity, width, K, seed, method or
  outputs (``extra_flags.py``): such a flag is refused naming the sweep option to use;
- every configuration's arguments are checked as opt_mi.py checks them (flags, data files) before the first
  job, and equal values have one spelling in ids (``.5`` is ``0.5``); one sweep at a time holds OUT (a lock
  the kernel drops if the sweep dies: a second sweep into OUT is refused, naming the holder's pid);
- a configuration that exits non-zero writes OUT/<id>.failed.json (id, command, returncode, error = the last
  log lines) and the sweep goes on; reruns skip it too unless --retry-failed;
- a configuration that cannot run (a whole-bit method at a fractional budget) gets OUT/<id>.skipped.json;
- SIGINT/SIGTERM to the sweep at any moment (repeated too), or a configuration dying of one, stop every running
  configuration and record nothing for them: one line, exit 130 (SIGINT) or 143 (SIGTERM), no report, no
  temporary file left (``stopping.py``);
- no configuration outlives the sweep (a rerun must never run one twice at once): each runs in a process group
  of its own, which the sweep terminates and waits for when it stops, and (Linux) is SIGTERMed by the kernel
  if the sweep dies of anything else, SIGKILL included;
- otherwise the sweep ends with the report (``python -m miq.report OUT``) and exits 1 when any
  configuration has failed (or, with --executor slurm, a job was killed before finishing);
- bad arguments (an --out that cannot be written included): exit 2 with one line on stderr, nothing run;
- OUT that cannot be written mid-sweep (disk full): one line naming the file, every running configuration
  stopped, nothing half-written left, exit 1; the same command resumes once there is room;
- on a machine with GPUs each running configuration sees one GPU of its own (CUDA_VISIBLE_DEVICES; at most
  --jobs-per-gpu on one GPU, and --jobs above GPUs x that is refused); on CPU, --jobs share the cores.

``--executor slurm`` keeps this contract with Slurm jobs in place of processes (``slurm.py``): each
configuration to run is one job, which writes its result, log and failure note itself; a job Slurm kills
records nothing and runs again on the next submission, as does a configuration whose job is neither queued nor
running any more; SIGINT/SIGTERM while waiting cancel the jobs; ``--no-wait`` submits and exits 0, saying how
many jobs are in flight in OUT. A rerun waits for every job of OUT still queued, running or requeued (squeue),
whether or not its configuration has a result, and only then writes the report (with --no-wait it exits 0
saying how many are in flight); a local sweep into OUT while any is in flight is refused (exit 2).
A submission that fails is one line: exit 2 when nothing was submitted (sbatch or submitit refused it), exit 1
when sbatch's answer names no job id (the jobs may be queued: the line says how to find and cancel them).

``main(argv, runner)``: ``runner`` turns opt_mi.py's arguments into the command that runs a configuration
(default ``opt_mi_command``); tests swap in a fake.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from miq import atomic, methods
from miq.errors import ConfigError
from miq.options import TOY_NAMES
from miq.report import markdown as report
from miq.sweep import owned, slurm
from miq.sweep.args import Sweep, UsageError, check_matrix, config_args, parse_args
from miq.sweep.gpu_slots import GpuSlots
from miq.sweep.launch import (
    fmt_dur,
    note_path,
    readable,
    remove_failure,
    remove_leftovers,
    say,
    spawn,
    start_log,
    stop,
    write_failure,
)
from miq.sweep.stopping import Interrupted, Stop

ROOT = Path(__file__).resolve().parents[2]  # the checkout: opt_mi.py and the miq package
Runner = Callable[[list[str]], list[str]]
POLL_S = 0.05  # how often running configurations are looked at (a cheap waitpid each)
NOT_RUN = {"exists": "exists, skipped", "failed": "failed before, skipped (--retry-failed to run it again)",
           "skip": "skipped: {reason}"}  # progress lines of configurations that do not run

def opt_mi_command(args: list[str]) -> list[str]:
    """The default runner: opt_mi.py beside this file, under the interpreter running the sweep."""
    return [sys.executable, str(ROOT / "opt_mi.py"), *args]


# ----------------------------------------------------------------------------------------------------------
# running


@dataclass
class Job:
    id: str
    n: int  # its place in the matrix, for progress lines
    command: list[str]
    proc: subprocess.Popen
    gpu: str | None = None  # the GPU it was given (CUDA_VISIBLE_DEVICES), on a machine with GPUs
    t0: float = field(default_factory=time.monotonic)


class Sweeper:
    """One run of a sweep: the matrix, what of it still needs running, the running jobs and the tallies."""

    def __init__(self, sweep: Sweep, runner: Runner, stopper: Stop | None = None):
        self.s, self.runner = sweep, runner
        self.stop = stopper or Stop()
        self.configs = methods.matrix(sweep.matrix)
        self.running: list[Job] = []
        self.t0 = time.monotonic()
        self.states = [self.state(c) for c in self.configs]  # run | exists | failed | skip
        self.to_run = self.states.count("run")
        self.launched = self.done_n = self.new_failed = 0
        self.done_s = 0.0
        self.killed = 0  # Slurm jobs that ended without recording anything
        self.waited = 0  # Slurm jobs of an earlier submission, still in flight, waited for
        self.gpus = GpuSlots(list(sweep.gpus), sweep.jobs_per_gpu)

    def path(self, cfg_id: str, suffix: str) -> Path:
        return self.s.out / f"{cfg_id}{suffix}"

    def state(self, cfg: methods.SweepConfig) -> str:
        if cfg.skip:
            return "skip"
        result = self.path(cfg.id, ".json")
        if result.is_file():
            if readable(result) is not False:  # a result, or a file this process may not read: left alone
                return "exists"
            kept = owned.set_aside(result)  # never deleted: it may be the user's, or all that is left of a run
            say(f"{cfg.id}: {result} is not a readable result (cut short, or not the sweep's): kept as {kept.name}; "
                "running it again", err=True)
        note, own = note_path(self.s.out, cfg.id)
        if owned.make_way(note, own, lambda line: say(line, err=True)) and not self.s.retry_failed:
            return "failed"
        return "run"

    def run(self) -> int:
        try:
            with self.stop.deferring():  # signals noted, acted on between steps (check_signal)
                rc = self.execute()
        except Interrupted as e:
            stopping = "" if self.s.slurm else f": stopping {len(self.running)} running configuration(s)"
            say(f"interrupted{stopping}; rerun the same command to resume", err=True)
            return e.args[0]
        except OSError as e:  # the results folder full or gone: each next write would fail the same way
            say(f"sweep.py: error: {e.strerror or e}: {e.filename or self.s.out}; the sweep stopped (nothing "
                "half-written is left); once it can write there again, rerun the same command to resume", err=True)
            return 1
        finally:
            self.stop_all()  # whatever happened (an error included), nothing is left running
        self.stop.check()  # a signal during the last configuration: no report
        return self.conclude() if rc is None else rc

    def execute(self) -> int | None:
        """Run (or submit) what is to run; an exit status, or None to go on to the report."""
        self.s.out.mkdir(parents=True, exist_ok=True)
        at_a_time = "as Slurm jobs" if self.s.slurm else f"{self.s.jobs} at a time" + (
            f" on GPU(s) {','.join(self.s.gpus)}" if self.s.gpus else "") + f", {self.s.threads} thread(s) each"
        say(f"sweep: {len(self.configs)} configurations, {self.to_run} to run, {at_a_time} -> {self.s.out}")
        # the default runner needs the toy model: a fake one (tests) does not
        if self.to_run and self.s.model in TOY_NAMES and self.runner is opt_mi_command and (rc := self.build_toy()):
            return rc
        if self.s.slurm:
            return self.run_slurm(slurm.Batch(self.s.out, self.s.slurm, len(self.configs)))
        self.run_all()
        return None

    def run_all(self) -> None:
        for n, (cfg, state) in enumerate(zip(self.configs, self.states, strict=True), 1):
            if state == "run":
                while len(self.running) >= self.s.jobs:
                    self.finish(*self.wait_any())
                self.launch(n, cfg)
            else:
                self.not_run(n, cfg, state)
        while self.running:
            self.finish(*self.wait_any())

    def not_run(self, n: int, cfg: methods.SweepConfig, state: str) -> None:
        say(f"[{n}/{len(self.configs)}] {cfg.id} " + NOT_RUN[state].format(reason=cfg.skip))
        note = self.path(cfg.id, ".skipped.json")
        if state == "skip" and not note.is_file():
            atomic.write_text(note, json.dumps({"id": cfg.id, "reason": cfg.skip}, indent=1))

    def command(self, cfg: methods.SweepConfig) -> list[str]:
        return self.runner([*config_args(self.s, cfg), "--json", str(self.path(cfg.id, ".json")),
                            "--analysis-dir", str(self.s.out / "analysis" / cfg.id)])

    def run_slurm(self, batch: slurm.Batch) -> int | None:
        """Submit the configurations to run as Slurm jobs and, unless --no-wait, wait for them (None: go on to
        the report); a stop while waiting cancels them."""
        tasks, others = [], []  # to submit; present or failed before, whose earlier job may still be in flight
        for n, (cfg, state) in enumerate(zip(self.configs, self.states, strict=True), 1):
            if state == "run":
                tasks.append(slurm.Task(cfg.id, n, tuple(self.command(cfg))))
            else:
                self.not_run(n, cfg, state)
                if state != "skip":
                    others.append(slurm.Task(cfg.id, n, ()))
        self.check_signal()
        try:
            batch.submit(tasks, others)
        except slurm.SubmitError as e:  # a bad --slurm-* value, found by sbatch; or an answer without a job id
            say(f"sweep.py: error: {e}", err=True)
            return e.status
        self.launched, self.waited = batch.tally.submitted, len(batch.jobs) - batch.tally.submitted
        if not self.s.slurm.wait:
            say(f"submitted {batch.tally.submitted} job(s); {len(batch.jobs)} job(s) in flight in {self.s.out}: rerun "
                "the same command to wait for them (it resubmits what is missing, then writes the report); "
                f"python -m miq.report {self.s.out} reports what is there now")
            return 0
        try:
            tally = batch.wait(self.check_signal) if batch.jobs else batch.tally
        except Interrupted:
            batch.cancel()
            raise
        self.new_failed, self.killed = tally.failed, tally.killed
        return None

    def build_toy(self) -> int:
        """Build the toy model once here rather than in several jobs at the same time; its exit status."""
        code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from miq.model import toy; "
                f"toy.toy_model_path(name={self.s.model!r})")
        command = [sys.executable, "-c", code]
        self.running.append(Job("toy model", 0, command, spawn(command)))
        _, rc = self.wait_any()
        if rc in (130, 143):
            raise Interrupted(rc)
        if rc:
            say(f"sweep.py: error: building the toy model failed (exit {rc})", err=True)
        return rc

    def launch(self, n: int, cfg: methods.SweepConfig) -> None:
        self.check_signal()
        left = self.to_run - self.launched
        eta = ""
        if self.done_n:  # the mean time per configuration so far, over the jobs that will run at once
            eta = f", about {fmt_dur(self.done_s / self.done_n * left / min(left, self.s.jobs))} left"
        say(f"[{n}/{len(self.configs)}] {cfg.id} ... (elapsed {fmt_dur(time.monotonic() - self.t0)}{eta})")
        command = self.command(cfg)
        remove_failure(self.s.out, cfg.id)  # a retry: the old failure no longer stands
        # pinned, whatever the machine: a perplexity depends on the thread count, and parallel jobs share the
        # cores instead of oversubscribing them (OpenMP threads waiting on each other made runs 10-40x slower)
        env = {"OMP_NUM_THREADS": str(self.s.threads), "MKL_NUM_THREADS": str(self.s.threads)}
        gpu = self.gpus.take() if self.s.gpus else None
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu  # its own GPU: opt_mi.py's cuda is that one
        with start_log(self.path(cfg.id, ".log"), command, env) as log:
            try:
                self.running.append(Job(cfg.id, n, command, spawn(command, log, env), gpu))
            except BaseException:
                if gpu is not None:
                    self.gpus.give_back(gpu)
                raise
        self.launched += 1

    def check_signal(self) -> None:
        self.stop.check()

    def wait_any(self) -> tuple[Job, int]:
        """The first running job to end and its exit status (128 + N for signal N, as a shell reports it)."""
        while True:
            self.check_signal()
            for job in self.running:
                rc = job.proc.poll()
                if rc is not None:
                    self.running.remove(job)
                    if job.gpu is not None:
                        self.gpus.give_back(job.gpu)
                    return job, 128 - rc if rc < 0 else rc
            time.sleep(POLL_S)

    def finish(self, job: Job, rc: int) -> None:
        """Record how one configuration ended."""
        dt = time.monotonic() - job.t0
        head = f"[{job.n}/{len(self.configs)}] {job.id}"
        result, log = self.path(job.id, ".json"), self.path(job.id, ".log")
        if rc in (130, 143):
            # killed by SIGINT/SIGTERM from outside (Ctrl-C to its group, a scheduler): the run is being
            # stopped, so this is no failure to record; stop the rest as well
            say(f"{head} interrupted after {fmt_dur(dt)}; not recorded", err=True)
            self.remove_leftovers(job)
            raise Interrupted(rc)
        if rc == 0 and result.is_file():
            remove_failure(self.s.out, job.id)
            say(f"{head} done in {fmt_dur(dt)}")
        else:
            if rc == 0:
                rc = 1
                with open(log, "a") as f:
                    f.write(f"opt_mi exited 0 but wrote no {result}\n")
            self.record_failure(job, rc)
            say(f"{head} FAILED (exit {rc}) after {fmt_dur(dt)}; see {log}", err=True)
        self.done_n += 1
        self.done_s += dt

    def record_failure(self, job: Job, rc: int) -> None:
        write_failure(self.s.out, job.id, job.command, rc)
        self.new_failed += 1

    def stop_all(self) -> None:
        """Terminate every running job's process group, wait for it, and remove its half-written files."""
        for job in self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.proc.pid, signal.SIGTERM)
        for job in self.running:
            stop(job.proc)  # SIGTERMed above all at once; SIGKILLed if it outlives the grace time
            self.remove_leftovers(job)
        self.running.clear()

    def remove_leftovers(self, job: Job) -> None:
        remove_leftovers(self.s.out, job.id, job.proc.pid)

    def conclude(self) -> int:
        failed = sum(self.path(c.id, ".failed.json").is_file() for c in self.configs)
        waited = f" ({self.waited} job(s) of an earlier submission waited for)" if self.waited else ""
        say(f"sweep done in {fmt_dur(time.monotonic() - self.t0)}: {self.launched} run now, "
            f"{len(self.configs) - self.launched} present or skipped{waited}; {failed} failed ({self.new_failed} "
            "in this run)")
        rc = report.main([str(self.s.out)])
        if rc or not (failed or self.killed):
            return rc
        if self.killed:
            say(f"{self.killed} job(s) killed before finishing, not recorded: rerun the same command to run them "
                "again", err=True)
        if failed:
            say(f"{failed} configuration(s) failed; see {self.s.out}/*.failed.json, rerun with --retry-failed",
                err=True)
        return 1


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold OUT/.sweep.lock for the sweep: a second sweep into the same folder is refused (UsageError naming the
    holder's pid). The kernel drops the lock when its holder dies, however it dies: a killed sweep's lock is
    taken over."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".sweep.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise UsageError(f"--out {out}: another sweep (pid {f.read().strip() or '?'}) is running into it; "
                             "wait for it or give another folder") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield


def main(argv: Sequence[str] | None = None, runner: Runner = opt_mi_command) -> int:
    stopper = Stop()
    try:
        stopper.install()  # for the whole sweep: a signal at any moment is one line and 128 + N
        sweep = parse_args(sys.argv[1:] if argv is None else argv)
        if sweep is None:
            return 0
        check_matrix(sweep, methods.matrix(sweep.matrix))
        if sweep.slurm is None:
            slurm.refuse_local_over_jobs(sweep.out)
        if why := report.not_replaceable(sweep.out / "performance_report.md"):  # found now, not after every run
            raise UsageError(f"--out {sweep.out}: its performance_report.md {why}; move it or give another --out")
        for warning in sweep.warnings:
            say(f"sweep.py: warning: {warning}", err=True)
        with locked(sweep.out):
            return Sweeper(sweep, runner, stopper).run()
    except (UsageError, ConfigError) as e:
        say(f"sweep.py: error: {e}", err=True)
        return 2
    except Interrupted as e:
        say("sweep.py: interrupted; nothing more is run: rerun the same command to resume", err=True)
        return e.args[0]
    except OSError as e:  # the results folder cannot be written (its lock, say): nothing was run
        say(f"sweep.py: error: {e.strerror or e}: {e.filename or ''}; nothing was run", err=True)
        return 1
    finally:
        stopper.uninstall()
