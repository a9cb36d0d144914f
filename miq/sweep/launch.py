"""Running one configuration of a sweep: its process, its log, how its end is recorded; and the same as a job of
its own that submitit runs on a Slurm node (``ConfigJob``).

Both executors run a configuration the same way: opt_mi.py (or a test's fake) as a child process in a process
group of its own, its output in OUT/<id>.log (first line ``# <command>``), its result OUT/<id>.json published
atomically by opt_mi.py itself, a failure note OUT/<id>.failed.json when it exits non-zero. The results folder
is all the state there is: a run killed from outside leaves no result and no note, so the next sweep runs it
again.

A Slurm job runs opt_mi.py as a child process rather than calling ``opt_mi.main`` in the submitit worker: the
configuration then runs exactly as the local pool runs it (one command, one log, one code path; a test's fake
runner serves both), the child's memory (GPU memory included) is all returned when it exits, a crash in native
code (out of memory, a segfault) takes the child and not the worker, which is left to record how it ended,
and on preemption the worker stops the child and cleans its staged files before submitit requeues the job.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from submitit.core.job_environment import JobEnvironment
from submitit.helpers import DelayedSubmission

from miq import atomic
from miq.sweep import owned

ERROR_LINES = 20  # log lines kept in a failure note
STOP_GRACE_S = 10  # a configuration still alive this long after SIGTERM is killed
# exit statuses (128 + N) of a job's run killed from outside: Slurm's SIGTERM at a time limit or cancellation
# (SIGKILL after its grace time, or the kernel's out-of-memory killer), Ctrl-C; no failure is recorded
KILLED_BY_SIGNAL = {130: "SIGINT", 137: "SIGKILL", 143: "SIGTERM"}
# the signal Slurm sends before a preemption or the time limit (submitit's --signal, USR2 unless set):
# submitit's handler in the worker acts on it; the child ignores it rather than dying of it unrecorded first
PREEMPT_SIGNAL = getattr(signal, "SIG" + JobEnvironment.USR_SIG, signal.SIGUSR2)


def say(line: str, err: bool = False) -> None:
    print(line, file=sys.stderr if err else sys.stdout, flush=True)


def fmt_dur(seconds: float) -> str:
    """45s, 3m05s, 1h02m."""
    t = int(seconds)
    return f"{t}s" if t < 60 else f"{t // 60}m{t % 60:02d}s" if t < 3600 else f"{t // 3600}h{t % 3600 // 60:02d}m"


def _parent_death_signal() -> Callable[[], object] | None:
    """A hook run in a child before exec (Linux) that has it SIGTERMed when its parent dies, even of SIGKILL,
    which the parent cannot catch to stop it; a rerun would otherwise run its configuration twice at once."""
    if sys.platform != "linux":
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the forked child
    return lambda: prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


DIE_WITH_PARENT = _parent_death_signal()


def _ignoring(signals: tuple[int, ...]) -> Callable[[], None] | None:
    """DIE_WITH_PARENT, and then ``signals`` ignored: an ignored signal stays ignored across exec."""
    if not signals:
        return DIE_WITH_PARENT

    def hook() -> None:
        if DIE_WITH_PARENT is not None:
            DIE_WITH_PARENT()
        for s in signals:
            signal.signal(s, signal.SIG_IGN)
    return hook


def spawn(command: list[str], log=None, env: dict[str, str] | None = None, ignore: tuple[int, ...] = ()
          ) -> subprocess.Popen:
    """Start command in its own process group, so that stopping it reaches whatever it started, and a Ctrl-C
    reaches only the sweep, which then stops its configurations itself. ``env``: variables set for it on top
    of this process's (threads, its GPU)."""
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT if log else None,
                            start_new_session=True, preexec_fn=_ignoring(ignore),
                            env={**os.environ, **env} if env else None)


def stop(proc: subprocess.Popen) -> None:
    """Terminate proc's process group (SIGKILL after STOP_GRACE_S) and wait for it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def exit_status(rc: int) -> int:
    """Popen's returncode as a shell reports it: 128 + N for signal N."""
    return 128 - rc if rc < 0 else rc


def remove_leftovers(out: Path, cfg_id: str, pid: int) -> None:
    """The files a configuration's process ``pid`` was staging when it was killed."""
    for folder in (out, out / "analysis" / cfg_id):
        atomic.remove_leftovers(folder, pid)


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


def start_log(log: Path, command: Sequence[str], env: dict[str, str] | None = None):
    """OUT/<id>.log opened for the child, its first line the command (what proves the log the sweep's:
    ``owned.own_log``), then the variables the sweep set for it (its threads, its GPU). A file there that the
    sweep did not write is kept aside first."""
    cfg_id = log.name.removesuffix(".log")
    owned.make_way(log, lambda p: owned.own_log(p, cfg_id), lambda line: say(line, err=True))
    f = open(log, "w")  # noqa: SIM115 (closed by the caller once the child is started)
    try:
        f.write(f"# {shlex.join(command)}\n")
        if env:
            f.write(f"# env: {' '.join(f'{k}={v}' for k, v in sorted(env.items()))}\n")
        f.flush()  # before the child writes after it, through the same file offset
    except BaseException:
        f.close()
        raise
    return f


def note_path(out: Path, cfg_id: str) -> tuple[Path, Callable[[Path], bool]]:
    """OUT/<id>.failed.json and the test of whether a file there is the sweep's own."""
    return out / f"{cfg_id}.failed.json", lambda p: owned.own_failure(p, cfg_id)


def remove_failure(out: Path, cfg_id: str) -> None:
    """A retry: the old failure note no longer stands (one the sweep did not write is kept aside)."""
    owned.remove_own(*note_path(out, cfg_id), lambda line: say(line, err=True))


def write_failure(out: Path, cfg_id: str, command: Sequence[str], rc: int) -> None:
    """OUT/<id>.failed.json: id, command, exit status and the last lines of its log."""
    try:
        error = "\n".join((out / f"{cfg_id}.log").read_text(errors="replace").splitlines()[-ERROR_LINES:])
    except OSError as e:
        error = f"(no log: {e})"
    note = {"id": cfg_id, "command": shlex.join(command), "returncode": rc, "error": error}
    path, own = note_path(out, cfg_id)
    owned.make_way(path, own, lambda line: say(line, err=True))
    atomic.write_text(path, json.dumps(note, indent=1))


def append_log(log: Path, line: str) -> None:
    with contextlib.suppress(OSError), open(log, "a") as f:
        f.write(line + "\n")


@dataclass(frozen=True)
class Outcome:
    """How a job's configuration ended: done, failed (exit status ``rc``, note written), killed (from outside,
    nothing recorded) or exists (a result was already there: another submission finished it)."""

    status: str
    rc: int = 0
    seconds: float = 0.0


@dataclass
class ConfigJob:
    """One configuration as a submitit job: calling it runs ``command`` and records how it ended in ``out``
    (the worker pickles the Outcome back to the sweep); ``checkpoint()`` is submitit's hook on preemption (the
    job is then requeued and starts over)."""

    id: str
    command: tuple[str, ...]
    out: str
    _proc: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_proc": None}  # a process handle does not travel

    def __call__(self) -> Outcome:
        out, t0 = Path(self.out), time.monotonic()
        result, log = out / f"{self.id}.json", out / f"{self.id}.log"
        if result.is_file() and readable(result) is not False:
            return Outcome("exists")
        remove_failure(out, self.id)
        with start_log(log, self.command) as f:
            self._proc = spawn(list(self.command), f, ignore=(PREEMPT_SIGNAL,))
        try:
            rc = exit_status(self._proc.wait())
        except BaseException:  # submitit's preemption or time-limit handler raises out of the wait, as Ctrl-C does
            append_log(log, "# stopped from outside (preemption, time limit, cancellation): no result recorded")
            raise
        finally:
            if self._proc.returncode is None:  # nothing outlives the job
                stop(self._proc)
            remove_leftovers(out, self.id, self._proc.pid)
        seconds = time.monotonic() - t0
        if rc in KILLED_BY_SIGNAL:
            append_log(log, f"# killed by {KILLED_BY_SIGNAL[rc]} (Slurm's time limit, a cancellation, or out of "
                       "memory): no result recorded; the next submission runs it again")
            return Outcome("killed", rc, seconds)
        if rc == 0 and result.is_file():
            return Outcome("done", 0, seconds)
        if rc == 0:
            rc = 1
            append_log(log, f"opt_mi exited 0 but wrote no {result}")
        write_failure(out, self.id, self.command, rc)
        return Outcome("failed", rc, seconds)

    def checkpoint(self) -> DelayedSubmission:
        """Called by submitit in the worker's signal handler when Slurm warns of a preemption (or the time
        limit): the run is stopped (only signalled here; the wait it interrupts reaps it) and a fresh copy of
        this job is handed back to be requeued. opt_mi.py keeps no partial state, so the requeued job starts
        the configuration over. A time limit is not requeued (the sweep's executor allows no timeouts): the
        same limit would end it again; the next submission runs it."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)
        return DelayedSubmission(ConfigJob(self.id, self.command, self.out))
