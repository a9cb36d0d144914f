"""Probe the sweep (``python -m miq.sweep``) with bad and odd input, as a new user would: files it did not
write in its results folder, --extra flags that would change what a configuration is, a results folder that
fills up, Slurm answers without a job id, signals at any moment, flags that would be ignored, GPUs that are not
there. Prints one row per case: exit code (and the one expected), whether a traceback was printed, whether a
file of the user's was lost, whether the case behaved as documented.

    python bench/probe_sweep.py            # about 2-4 minutes; needs no GPU, no network
    python bench/probe_sweep.py --only signal

Configurations run test_sweep's fake opt_mi.py (``FakeRunner``: a result in a fraction of a second), through a
harness that calls ``miq.sweep.cli.main`` the way ``python -m miq.sweep`` does; the cases about the entry point
itself run ``python -m miq.sweep``. The disk-full cases put --out on a 256 KiB tmpfs (root only; skipped
otherwise). Reproducible: fixed cases, fixed signal delays, fresh folders under a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from sweep_helpers import FakeRunner  # noqa: E402 (after the path: the fake lives with the tests)

HARNESS = r"""
import json, os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # as python -m miq.sweep does
sys.path[:0] = sys.argv[1:3]
import sweep_helpers
from miq.sweep import cli, gpu_slots
if os.environ.get("PROBE_GPUS") is not None:  # a machine with this many CUDA devices, as torch counts them
    gpu_slots.torch.cuda.device_count = lambda: int(os.environ["PROBE_GPUS"])
sys.exit(cli.main(sys.argv[4:], runner=sweep_helpers.FakeRunner(**json.loads(sys.argv[3]))))
"""
FOUR = ["--methods", "dense magnitude sparsegpt uniform"]


@dataclass
class Case:
    name: str
    klass: str
    args: list[str]
    expect: set[int]
    user_files: dict[str, bytes | None] = field(default_factory=dict)  # name -> content (None: a folder)
    env: dict[str, str] = field(default_factory=dict)
    signal_at: float | None = None  # seconds after start: SIGNAL sent 5 times, 20 ms apart
    signum: int = signal.SIGTERM
    entry: bool = False  # run python -m miq.sweep itself (else the harness with the fake runner)
    tmpfs: bool = False
    sleep: float = 0.05
    must_say: str = ""


@dataclass
class Row:
    case: Case
    rc: int | None = None
    traceback: bool = False
    lost: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)  # temporary files or live configurations left behind
    said: bool = True
    note: str = ""

    @property
    def ok(self) -> bool:
        return (self.rc in self.case.expect and not self.traceback and not self.lost and not self.left
                and self.said)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def plant(out: Path, files: dict[str, bytes | None]) -> dict[str, str]:
    """The user's files written into out; returns name -> content hash (folders: the hash of a file inside)."""
    out.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for name, content in files.items():
        p = out / name
        if content is None:
            p.mkdir(parents=True)
            (p / "inside.txt").write_text("a file of mine inside a folder")
            hashes[name] = sha(b"a file of mine inside a folder")
        else:
            p.write_bytes(content)
            hashes[name] = sha(content)
    return hashes


def lost_files(out: Path, hashes: dict[str, str]) -> list[str]:
    """The user's files whose content is nowhere under out any more (kept aside counts as kept)."""
    present = {sha(p.read_bytes()) for p in out.rglob("*") if p.is_file()} if out.exists() else set()
    return [name for name, h in hashes.items() if h not in present]


def leftovers(out: Path, fake: FakeRunner) -> list[str]:
    left = [p.name for p in out.rglob("*.tmp")] if out.exists() else []
    pids = Path(fake.dir, "pids")
    for p in pids.glob("*.pid") if pids.exists() else []:
        with contextlib.suppress(OSError, ValueError):
            pid = int(p.read_text())
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] != "Z" and b"fake_opt_mi" in Path(f"/proc/{pid}/cmdline").read_bytes():
                left.append(f"live configuration {p.stem}")
    return left


def fake_slurm(folder: Path, sbatch: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sbatch").write_text("#!/bin/sh\n" + sbatch + "\n")
    (folder / "srun").write_text("#!/bin/sh\nexit 0\n")
    for n in ("sbatch", "srun"):
        (folder / n).chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


@contextlib.contextmanager
def small_disk(path: Path):
    """path on a 256 KiB tmpfs, nearly full; None when it cannot be mounted (not root)."""
    path.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)],
                      capture_output=True).returncode:
        yield None
        return
    try:
        filler = path / "filler.bin"
        with contextlib.suppress(OSError), open(filler, "wb") as f:  # closing it may fail too: the disk is full
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        size = filler.stat().st_size
        filler.unlink()
        filler.write_bytes(b"\0" * (size - 3 * 4096))  # room for the lock, a log, and little more
        yield filler
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def run_case(c: Case, base: Path) -> Row:
    d = base / c.name
    fake = FakeRunner(str(d / "fake"), sleep=c.sleep)
    out = d / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **c.env}
    if "PATH_PREPEND" in c.env:
        env["PATH"] = fake_slurm(d / "bin", c.env["PATH_PREPEND"])
    row = Row(c)
    with small_disk(d / "disk") if c.tmpfs else contextlib.nullcontext() as disk:
        if c.tmpfs:
            if disk is None:
                row.note = "skipped: mounting a tmpfs needs root"
                row.rc, row.said = next(iter(c.expect)), True
                return row
            out = d / "disk" / "out"
        hashes = plant(out, c.user_files) if c.user_files else {}
        if c.entry:
            command = [sys.executable, "-m", "miq.sweep", "--out", str(out), *c.args]
        else:
            command = [sys.executable, "-c", HARNESS, str(ROOT), str(ROOT / "tests"),
                       json.dumps(dataclasses.asdict(fake)), "--out", str(out), *c.args]
        p = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        if c.signal_at is not None:
            time.sleep(c.signal_at)
            for _ in range(5):
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(c.signum)
                time.sleep(0.02)
        try:
            stdout, stderr = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            stdout, stderr = p.communicate()
            row.note = "timed out"
        row.rc = p.returncode
        row.traceback = "Traceback" in stderr
        time.sleep(0.3)  # a configuration left running would show now
        row.lost, row.left = lost_files(out, hashes), leftovers(out, fake)
        errors = [ln for ln in stderr.splitlines() if "error:" in ln]
        row.said = (not c.must_say or c.must_say in stderr) and len(errors) <= 1
        if c.tmpfs and disk is not None and row.rc == 1:  # room again: the same command finishes the sweep
            disk.unlink()
            again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
            row.note = f"rerun with room: exit {again.returncode}"
            row.said = row.said and again.returncode == 0
    if not row.said and not row.note:
        row.note = (stderr.strip().splitlines() or [""])[-1][:100]
    return row


def cases() -> list[Case]:
    note = b"# my notes on this configuration\nkeep me\n"
    cs = [
        # files the sweep did not write
        Case("foreign-result-yaml", "foreign", FOUR, {0}, {"magnitude_s0.5.json": b"ppl: 12.3\n"}),
        Case("foreign-log", "foreign", FOUR, {0}, {"sparsegpt_s0.5.log": note}),
        Case("foreign-note-array", "foreign", FOUR, {0}, {"uniform_s0.5_w4.failed.json": b"[1, 2]"}),
        Case("foreign-log-is-a-folder", "foreign", FOUR, {0}, {"dense.log": None}),
        Case("empty-result", "foreign", FOUR, {0}, {"dense.json": b""}),
        Case("kept-name-taken", "foreign", FOUR, {0}, {"dense.json": b"{", "dense.json.foreign-1": note}),
        Case("foreign-report", "foreign", FOUR, {2}, {"performance_report.md": note}, must_say="did not write"),
        Case("retry-over-foreign-note", "foreign", [*FOUR, "--retry-failed"], {0},
             {"dense.failed.json": b'{"id": "someone else"}'}),
        # --extra
        Case("extra-sparsity-dot", "extra", ["--extra", "--sparsity .6"], {2}, must_say="use --sparsities"),
        Case("extra-seed-equals", "extra", ["--seeds", "0 1", "--extra", "--seed=3"], {2}, must_say="use --seeds"),
        Case("extra-wbits-abbrev", "extra", ["--extra", "--wbit 3"], {2}, must_say="use --wbits"),
        Case("extra-cluster", "extra", ["--extra", "--cluster contiguous"], {2}, must_say="use --methods"),
        Case("extra-nm", "extra", ["--extra", "--prunem 4 --prunen 2"], {2}, must_say="use --sparsities"),
        Case("extra-json", "extra", ["--extra", "--json /tmp/x.json"], {2}, must_say="use --out"),
        Case("extra-gmp-pruning-only", "extra", ["--methods", "sparsegpt", "--extra", "--gmp"], {2},
             must_say="use --methods"),
        Case("extra-harmless", "extra", ["--methods", "dense uniform", "--extra", "--seqlen 32 --sym"], {0}),
        # a results folder that fills up
        Case("disk-full-mid-sweep", "disk full", [*FOUR, "--jobs", "2"], {1}, tmpfs=True,
             must_say="No space left on device"),
        # Slurm submission
        Case("sbatch-no-job-id", "slurm", [*FOUR, "--executor", "slurm"], {1},
             env={"PATH_PREPEND": "echo 'Submitted, probably'"}, must_say="no job id"),
        Case("sbatch-refuses", "slurm", [*FOUR, "--executor", "slurm"], {2},
             env={"PATH_PREPEND": "echo 'sbatch: error: Invalid account' >&2; exit 1"},
             must_say="Invalid account"),
        # flags that would be ignored; GPUs
        Case("groups-frontier", "ignored flag", ["--matrix", "frontier", "--groups", "8"], {2}),
        Case("groups-ungrouped", "ignored flag", ["--methods", "dense g128", "--groups", "4"], {2}),
        Case("jobs-per-gpu-no-gpu", "ignored flag", ["--methods", "dense", "--jobs-per-gpu", "3"], {0},
             env={"PROBE_GPUS": "0"}, must_say="warning: --jobs-per-gpu 3"),
        Case("mask-without-cuda", "gpus", [*FOUR, "--jobs", "4"], {0},
             env={"PROBE_GPUS": "0", "CUDA_VISIBLE_DEVICES": "0,1,2"}),
        Case("mask-longer-than-gpus", "gpus", [*FOUR, "--jobs", "3"], {2},
             env={"PROBE_GPUS": "2", "CUDA_VISIBLE_DEVICES": "4,5,6"}, must_say="this machine has 2 GPU(s) (4,5)"),
        Case("threads-zero", "threads", ["--threads", "0"], {2}),
        Case("threads-with-slurm", "threads", ["--threads", "2", "--executor", "slurm"], {2}),
    ]
    # signals: the entry point while it imports, then the harness at fixed moments of a sweep of 4
    for sig, name in ((signal.SIGINT, "int"), (signal.SIGTERM, "term")):
        cs.append(Case(f"sig{name}-x5-importing", "signal", ["--methods", "dense"], {128 + sig}, entry=True,
                       signal_at=0.2, signum=sig))
        for at in (0.4, 2.5, 3.5, 5.0):  # (a signal in Python's own start-up, before line 1, is beyond reach)
            cs.append(Case(f"sig{name}-x5-at-{at}s", "signal", [*FOUR, "--jobs", "2"], {0, 128 + sig},
                           signal_at=at, signum=sig, sleep=0.4))
    return cs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="run only the cases whose name or class contains this")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="probe-sweep-") as tmp:
        for c in cases():
            if args.only and args.only not in c.name and args.only not in c.klass:
                continue
            rows.append(run_case(c, Path(tmp)))
            r = rows[-1]
            print(f"{r.case.name}: exit {r.rc}", file=sys.stderr, flush=True)
    print("| case | class | exit | expected | traceback | user files lost | left behind | as documented | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.case.name} | {r.case.klass} | {r.rc} | {'/'.join(map(str, sorted(r.case.expect)))} | "
              f"{'yes' if r.traceback else 'no'} | {', '.join(r.lost) or 'no'} | {', '.join(r.left) or 'no'} | "
              f"{'yes' if r.ok else 'NO'} | {r.note} |")
    bad = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} cases as documented")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
