"""Run the method matrix of ``methods.py`` with ``opt_mi.py``, one process per configuration, then the report.

    python -m miq.experiments.sweep                  # toy model, offline, a few minutes on a laptop
    python -m miq.experiments.sweep --model facebook/opt-125m --calib c4 --eval wikitext2,c4 \\
        --sparsities "0.5" --groups "16 50" --wbits "3 4" --out results/opt125m --jobs 2

``compare_methods.sh`` runs this with the same flags. Contract:

- one result per configuration: OUT/<id>.json (written atomically by ``opt_mi.py --json``), its output in
  OUT/<id>.log (first line ``# <command line>``) and its figures in OUT/analysis/<id>/;
- a configuration whose OUT/<id>.json holds a result is skipped, so a killed sweep resumes where it stopped and
  a second run does nothing new (after changing the code, sweep into a new --out); an unreadable one
  (truncated) is removed, with a note, and run again;
- every configuration's arguments are checked as opt_mi.py checks them (flags, data files) before the first
  job, and equal values have one spelling in ids (``.5`` is ``0.5``); one sweep at a time holds OUT (a lock
  the kernel drops if the sweep dies: a second sweep into OUT is refused, naming the holder's pid);
- a configuration that exits non-zero writes OUT/<id>.failed.json (id, command, returncode, error = the last
  log lines) and the sweep goes on; reruns skip it too unless --retry-failed;
- a configuration that cannot run (a whole-bit method at a fractional budget) gets OUT/<id>.skipped.json;
- SIGINT/SIGTERM to the sweep, or a configuration dying of one, stop every running configuration and record
  nothing for them: exit 130 (SIGINT) or 143 (SIGTERM), no report;
- no configuration outlives the sweep (a rerun must never run one twice at once): each runs in a process group
  of its own, which the sweep terminates and waits for when it stops, and (Linux) is SIGTERMed by the kernel
  if the sweep dies of anything else, SIGKILL included;
- otherwise the sweep ends with the report (``python -m miq.experiments.report OUT``) and exits 1 when any
  configuration has failed;
- bad arguments (an --out that cannot be written included): exit 2 with one line on stderr, nothing run.

``main(argv, runner)``: ``runner`` turns opt_mi.py's arguments into the command that runs a configuration
(default ``opt_mi_command``); tests swap in a fake.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from miq import atomic
from miq.experiments import methods, report
from miq.experiments.sweep_args import Sweep, UsageError, check_matrix, config_args, parse_args
from miq.options import TOY_NAMES

ROOT = Path(__file__).resolve().parents[2]  # the checkout: opt_mi.py and the miq package
Runner = Callable[[list[str]], list[str]]
POLL_S = 0.05  # how often running configurations are looked at (a cheap waitpid each)
STOP_GRACE_S = 10  # a configuration still alive this long after SIGTERM is killed
ERROR_LINES = 20  # log lines kept in a failure note
NOT_RUN = {"exists": "exists, skipped", "failed": "failed before, skipped (--retry-failed to run it again)",
           "skip": "skipped: {reason}"}  # progress lines of configurations that do not run

def opt_mi_command(args: list[str]) -> list[str]:
    """The default runner: opt_mi.py beside this file, under the interpreter running the sweep."""
    return [sys.executable, str(ROOT / "opt_mi.py"), *args]


# ----------------------------------------------------------------------------------------------------------
# running


def fmt_dur(seconds: float) -> str:
    """45s, 3m05s, 1h02m."""
    t = int(seconds)
    return f"{t}s" if t < 60 else f"{t // 60}m{t % 60:02d}s" if t < 3600 else f"{t // 3600}h{t % 3600 // 60:02d}m"


def say(line: str, err: bool = False) -> None:
    print(line, file=sys.stderr if err else sys.stdout, flush=True)


class Interrupted(Exception):
    """The sweep is being stopped; ``args[0]`` is its exit status."""


@dataclass
class Job:
    id: str
    n: int  # its place in the matrix, for progress lines
    command: list[str]
    proc: subprocess.Popen
    t0: float = field(default_factory=time.monotonic)


def _parent_death_signal() -> Callable[[], object] | None:
    """A hook run in a child before exec (Linux) that has it SIGTERMed when the sweep dies, even of SIGKILL,
    which the sweep cannot catch to stop it; a rerun would otherwise run its configuration twice at once."""
    if sys.platform != "linux":
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the forked child
    return lambda: prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


DIE_WITH_SWEEP = _parent_death_signal()


def spawn(command: list[str], log=None, threads: int | None = None) -> subprocess.Popen:
    """Start command in its own process group, so that stopping it reaches whatever it started, and a Ctrl-C
    reaches only the sweep, which then stops its configurations itself. ``threads``: the CPU threads each
    configuration may use (OMP_NUM_THREADS, unless the caller set it), so that parallel jobs share the cores
    instead of oversubscribing them: OpenMP threads that wait on each other made runs here 10-40x slower."""
    env = None
    if threads is not None and "OMP_NUM_THREADS" not in os.environ:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT if log else None,
                            start_new_session=True, preexec_fn=DIE_WITH_SWEEP, env=env)


class Sweeper:
    """One run of a sweep: the matrix, what of it still needs running, the running jobs and the tallies."""

    def __init__(self, sweep: Sweep, runner: Runner):
        self.s, self.runner = sweep, runner
        self.configs = methods.matrix(sweep.matrix)
        self.running: list[Job] = []
        self.signalled = 0
        self.t0 = time.monotonic()
        self.states = [self.state(c) for c in self.configs]  # run | exists | failed | skip
        self.to_run = self.states.count("run")
        self.launched = self.done_n = self.new_failed = 0
        self.done_s = 0.0

    def path(self, cfg_id: str, suffix: str) -> Path:
        return self.s.out / f"{cfg_id}{suffix}"

    def state(self, cfg: methods.SweepConfig) -> str:
        if cfg.skip:
            return "skip"
        result = self.path(cfg.id, ".json")
        if result.is_file():
            if readable(result) is not False:  # a result, or a file this process may not read: left alone
                return "exists"
            say(f"{cfg.id}: {result} is not a readable result (truncated?): removed, to run again", err=True)
            result.unlink()
        if self.path(cfg.id, ".failed.json").is_file() and not self.s.retry_failed:
            return "failed"
        return "run"

    def run(self) -> int:
        self.s.out.mkdir(parents=True, exist_ok=True)
        say(f"sweep: {len(self.configs)} configurations, {self.to_run} to run, {self.s.jobs} at a time -> "
            f"{self.s.out}")
        old = {sig: signal.signal(sig, self.note_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            # the default runner needs the toy model: a fake one (tests) does not
            if self.to_run and self.s.model in TOY_NAMES and self.runner is opt_mi_command and (rc := self.build_toy()):
                return rc
            self.run_all()
        except Interrupted as e:
            say(f"interrupted: stopping {len(self.running)} running configuration(s); rerun the same command to "
                "resume", err=True)
            return e.args[0]
        finally:
            self.stop_all()  # whatever happened (an error included), nothing is left running
            for sig, handler in old.items():
                signal.signal(sig, handler)
        return self.conclude()

    def note_signal(self, signum: int, frame) -> None:
        # Only noted: the sweep acts on it between steps (check_signal), so that it never lands between
        # starting a process and recording it, which would leave that process running unseen.
        self.signalled = signum

    def run_all(self) -> None:
        for n, (cfg, state) in enumerate(zip(self.configs, self.states, strict=True), 1):
            if state == "run":
                while len(self.running) >= self.s.jobs:
                    self.finish(*self.wait_any())
                self.launch(n, cfg)
                continue
            say(f"[{n}/{len(self.configs)}] {cfg.id} " + NOT_RUN[state].format(reason=cfg.skip))
            note = self.path(cfg.id, ".skipped.json")
            if state == "skip" and not note.is_file():
                atomic.write_text(note, json.dumps({"id": cfg.id, "reason": cfg.skip}, indent=1))
        while self.running:
            self.finish(*self.wait_any())

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
        s = self.s
        command = self.runner([*config_args(s, cfg), "--json", str(self.path(cfg.id, ".json")),
                               "--analysis-dir", str(s.out / "analysis" / cfg.id)])
        self.path(cfg.id, ".failed.json").unlink(missing_ok=True)  # a retry: the old failure no longer stands
        with open(self.path(cfg.id, ".log"), "w") as log:
            log.write(f"# {shlex.join(command)}\n")
            log.flush()  # before the child writes after it, through the same file offset
            threads = max(1, (os.cpu_count() or 1) // self.s.jobs) if self.s.jobs > 1 else None
            self.running.append(Job(cfg.id, n, command, spawn(command, log, threads)))
        self.launched += 1

    def check_signal(self) -> None:
        if self.signalled:
            raise Interrupted(128 + self.signalled)

    def wait_any(self) -> tuple[Job, int]:
        """The first running job to end and its exit status (128 + N for signal N, as a shell reports it)."""
        while True:
            self.check_signal()
            for job in self.running:
                rc = job.proc.poll()
                if rc is not None:
                    self.running.remove(job)
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
            self.path(job.id, ".failed.json").unlink(missing_ok=True)
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
        try:
            error = "\n".join(self.path(job.id, ".log").read_text(errors="replace").splitlines()[-ERROR_LINES:])
        except OSError as e:
            error = f"(no log: {e})"
        note = {"id": job.id, "command": shlex.join(job.command), "returncode": rc, "error": error}
        atomic.write_text(self.path(job.id, ".failed.json"), json.dumps(note, indent=1))
        self.new_failed += 1

    def stop_all(self) -> None:
        """Terminate every running job's process group, wait for it, and remove its half-written files."""
        for job in self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.proc.pid, signal.SIGTERM)
        for job in self.running:
            try:
                job.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(job.proc.pid, signal.SIGKILL)
                job.proc.wait()
            self.remove_leftovers(job)
        self.running.clear()

    def remove_leftovers(self, job: Job) -> None:
        for folder in (self.s.out, self.s.out / "analysis" / job.id):
            atomic.remove_leftovers(folder, job.proc.pid)

    def conclude(self) -> int:
        failed = sum(self.path(c.id, ".failed.json").is_file() for c in self.configs)
        say(f"sweep done in {fmt_dur(time.monotonic() - self.t0)}: {self.launched} run now, "
            f"{len(self.configs) - self.launched} present or skipped; {failed} failed ({self.new_failed} in this "
            "run)")
        rc = report.main([str(self.s.out)])
        if rc or not failed:
            return rc
        say(f"{failed} configuration(s) failed; see {self.s.out}/*.failed.json, rerun with --retry-failed", err=True)
        return 1


def readable(result: Path) -> bool | None:
    """Whether a result JSON is one opt_mi.py finished writing (an object with its perplexities); None when the
    file cannot be read at all (permissions): then nothing is known of it, and it is not removed."""
    try:
        text = result.read_text()
    except OSError:
        return None
    try:
        return "ppl" in json.loads(text)
    except (ValueError, TypeError):
        return False


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
    try:
        sweep = parse_args(sys.argv[1:] if argv is None else argv)
        if sweep is None:
            return 0
        check_matrix(sweep, methods.matrix(sweep.matrix))
        with locked(sweep.out):
            return Sweeper(sweep, runner).run()
    except UsageError as e:
        say(f"sweep.py: error: {e}", err=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
