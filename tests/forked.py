"""opt_mi.main paused at a chosen step, in a process of its own, forked from a server that imported the toolkit
once: what the signal tests send their signals to (test_bad_input, test_reliability_run).

A signal test needs a process to signal, not a fresh interpreter: a fresh one spends about 5 s of CPU on
importing torch and transformers before its run begins, most of such a test. multiprocessing's forkserver
imports this module (and with it the toolkit and the toy's modeling code) once per pytest worker, then forks a
child per run. The child is a process of its own: its pid to signal, its exit code, its output in files, and
the signal handling that opt_mi.main installs. It is stricter than a fresh interpreter in one way: it ends
with os._exit, so nothing is left to the interpreter's shutdown (atexit); what a run must clean up, it cleans
as main unwinds. The tests of a signal during the imports and of the command line start fresh interpreters.
"""

import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# what a run imports only when it first needs it (drawing, clustering, the toy's modeling code), imported here
# so that the server holds it too
import matplotlib.backends.backend_agg  # noqa: F401
import pytest
import sklearn.cluster  # noqa: F401
import transformers.models.opt.modeling_opt  # noqa: F401
from run_helpers import RUN

import opt_mi
from miq.run import outputs, saving
from miq.synthetic import synthetic_text

STEPS = {"load_model": opt_mi, "write": saving, "write_json": outputs}  # a step: the module it is called through
# What the server imports: this module's imports, by names it finds from the repository's root (its working
# folder; Python 3.11's forkserver does not take the tests' sys.path); a child imports this module itself.
PRELOAD = ["opt_mi", "miq.run.outputs", "miq.run.saving", "matplotlib.backends.backend_agg", "sklearn.cluster",
           "transformers.models.opt.modeling_opt"]
_SERVER = multiprocessing.get_context("forkserver")
_SERVER.set_forkserver_preload(PRELOAD)
ONE_SERVER = pytest.mark.xdist_group("forkserver")  # the tests that use it run in one worker: one server to start


def _run(cwd: str, marker: str, step: str, argv: list[str], env: dict, out: str, err: str) -> None:
    """In the child: the environment, folder and output files of a process started with them; then opt_mi.main,
    with ``step`` followed by writing ``marker`` and sleeping until a signal ends the run."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # read from TMPDIR again, as a fresh process does
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    owner = STEPS[step]
    real = getattr(owner, step)

    def paused(*args, **kwargs):
        result = real(*args, **kwargs)
        Path(marker).write_text("paused")
        time.sleep(120)
        return result

    setattr(owner, step, paused)
    sys.exit(opt_mi.main(argv))


class Paused:
    """opt_mi.main(argv) run in ``cwd`` and paused after ``step``, with subprocess.Popen's methods; started at
    once, and ``wait_paused`` returns when the step is done. Its output goes to files beside ``marker``."""

    def __init__(self, cwd: Path, marker: Path, step: str, argv: list[str], env: dict | None = None):
        self.marker = marker
        self._files = (marker.with_name(marker.name + ".out"), marker.with_name(marker.name + ".err"))
        self._process = _SERVER.Process(target=_run, args=(str(cwd), str(marker), step, list(argv),
                                                           dict(os.environ if env is None else env),
                                                           *map(str, self._files)))
        self._process.start()

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode  # None while it runs

    def send_signal(self, sig: int) -> None:
        os.kill(self._process.pid, sig)

    def kill(self) -> None:
        self._process.kill()

    def communicate(self, timeout: float) -> tuple[str, str]:
        """(stdout, stderr) once it has ended; TimeoutExpired when it has not within ``timeout`` seconds."""
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired("opt_mi.main", timeout)
        return tuple(f.read_text() if f.exists() else "" for f in self._files)

    def wait_paused(self, limit_s: float = 120) -> None:
        """Until the step is done; fails the test when the run ends or takes longer than ``limit_s``."""
        deadline = time.time() + limit_s
        while not self.marker.exists():
            assert self.poll() is None, self.communicate(timeout=5)
            assert time.time() < deadline, "the run never reached the step"
            time.sleep(0.05)


def paused(tmp_path: Path, step: str, *extra: str, env: dict | None = None) -> tuple[Paused, Path]:
    """RUN (every output) with ``extra`` on the toy in tmp_path/work, paused after ``step``: (process, work)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "short_eval.txt").write_text(synthetic_text("test")[:3000])
    p = Paused(work, tmp_path / "marker", step, ["toy", "synthetic", *RUN, *extra], env)
    p.wait_paused()
    return p, work
