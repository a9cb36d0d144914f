"""What the sweep tests share (test_sweep, test_gpu_slots, test_slurm, test_slurm_real, test_reliability_sweep):
a fake opt_mi.py runner whose configurations are cheap child processes, a recorder of the GPU each one got, the
sweep started in a process of its own for signals, and small readers of what a sweep leaves behind.
Kept apart from any test module so that each test file stands on its own and a child process can import the
fake without importing a test module.

``FakeRunner`` reads each configuration's flags with the real ``config.parse`` and names the run with
``methods.label``, as opt_mi.py does, and writes a plausible result JSON whose PPL is a deterministic function
of the flags, through a child process that sleeps a little first: the sweep's bookkeeping is what is under test,
in seconds instead of minutes. The JSON is built in the sweep's process because importing ``config`` (torch) in
every child would cost seconds each.
"""

import dataclasses
import json
import subprocess
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from miq import atomic, methods
from miq.run import config

ROOT = Path(__file__).resolve().parents[1]

# The fake configuration process, DIR/fake_opt_mi.py: argv = root, runner fields (JSON), staged result, result
# path, then the opt_mi.py arguments (unused: they are there so that logs and failure notes read as for opt_mi.py).
CHILD = r"""
import json, os, sys, time
root, fake, staged, target = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
sys.path.insert(0, root)
from miq import atomic
rid = os.path.basename(target)[: -len(".json")]
with open(os.path.join(fake["dir"], "invocations.txt"), "a") as f:
    f.write(rid + "\n")
atomic.write_text(os.path.join(fake["dir"], "pids", rid + ".pid"), str(os.getpid()))
time.sleep(fake["sleep"])
if fake["fail"] and fake["fail"] in rid:
    sys.exit("RuntimeError: fake failure in " + rid)
with open(staged) as f:
    text = f.read()
atomic.write_text(target, text)
print("method", json.loads(text)["method"])
"""


def fake_result(cfg: config.RunConfig) -> dict:
    """A plausible opt_mi.py result for cfg, its numbers a function of the flags (not of where it is written)."""
    key = json.dumps({k: v for k, v in cfg.as_dict().items() if k not in ("json", "analysis_dir")}, sort_keys=True)
    method, family = methods.label(cfg)
    ppl = {e: 10 + zlib.crc32((key + e).encode()) % 1000 / 100 for e in cfg.eval_names()}
    meta = 0.06 + zlib.crc32(key.encode()) % 100 / 10000 if cfg.quantizing else 0.0
    return {"config": cfg.as_dict(), "method": method, "family": family, "ppl": ppl, "sparsity": cfg.sparsity,
            "bits": {"code_bpw": cfg.wbits, "metadata_bpw": meta, "mask_bpw": 1.0 if cfg.pruning else 0.0,
                     "bpw": cfg.wbits + meta + (1.0 if cfg.pruning else 0.0)},
            "timing": {"calibration_s": 0.1, "compress_s": 0.2, "eval_s": 0.1, "mi_s": 0.05, "cluster_s": 0.01,
                       "alloc_s": 0.01, "prune_s": 0.1, "total_s": 0.5},
            "env": {"torch": "fake", "transformers": "fake", "device": "cpu", "device_name": "fake",
                    "python": "3", "machine": "x"},
            "figures": [], "layers": []}


@dataclass(frozen=True)
class FakeRunner:
    """A sweep runner: each configuration logs its id to DIR/invocations.txt and its pid to DIR/pids/, sleeps
    ``sleep`` seconds, then fails if its id contains ``fail``, else writes ``fake_result`` atomically."""

    dir: str
    sleep: float = 0.05
    fail: str = ""

    def __call__(self, args: list[str]) -> list[str]:
        cfg = config.parse(args)
        staged = Path(self.dir, "staged", Path(cfg.json).name)
        atomic.write_text(staged, json.dumps(fake_result(cfg)))
        script = Path(self.dir, "fake_opt_mi.py")
        if not script.exists():
            atomic.write_text(script, CHILD)
        return [sys.executable, str(script), str(ROOT), json.dumps(dataclasses.asdict(self)), str(staged), cfg.json,
                *args]

    def invocations(self) -> list[str]:
        log = Path(self.dir, "invocations.txt")
        return log.read_text().split() if log.exists() else []

    def pid(self, rid: str) -> int | None:
        p = Path(self.dir, "pids", f"{rid}.pid")
        return int(p.read_text()) if p.exists() else None


def start(out: Path, runner: FakeRunner, *args: str, setup: str = "") -> subprocess.Popen:
    """The sweep with ``runner`` in a process of its own (and its own process group), for signals; ``setup``
    is Python run in that process first (after miq is importable)."""
    code = ("import json, sys; sys.path[:0] = sys.argv[1:3]; import sweep_helpers; "
            f"from miq.sweep import cli as sweep; {setup}\n"
            "sys.exit(sweep.main(sys.argv[4:], runner=sweep_helpers.FakeRunner(**json.loads(sys.argv[3]))))")
    return subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(ROOT / "tests"),
                             json.dumps(dataclasses.asdict(runner)), "--out", str(out), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def results(out: Path) -> dict[str, dict]:
    """id -> ppl dict of every result JSON in out."""
    return {p.stem: json.loads(p.read_text())["ppl"] for p in out.glob("*.json")
            if not p.name.endswith((".failed.json", ".skipped.json"))}


def wait_for(condition, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """pid is still one of our fake configurations, not exited (nor a zombie, nor a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and b"fake_opt_mi.py" in cmdline


# DIR/recorder.py: argv = events file, "--", the command; one line per start and end: event id gpu threads
RECORDER = r"""
import os, subprocess, sys
events, command = sys.argv[1], sys.argv[3:]
rid = os.path.basename(command[command.index("--json") + 1])[: -len(".json")]
gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "-")
threads = os.environ.get("OMP_NUM_THREADS", "-")
def note(event):
    with open(events, "a") as f:
        f.write(f"{event} {rid} {gpu} {threads}\n")
note("start")
rc = subprocess.call(command)
note("end")
sys.exit(rc)
"""


@dataclass(frozen=True)
class Recording:
    """A sweep runner that wraps ``fake`` in a recorder logging each configuration's start and end with the
    CUDA_VISIBLE_DEVICES and OMP_NUM_THREADS it was given, so a test can replay which GPU held what."""

    fake: FakeRunner

    def __call__(self, args: list[str]) -> list[str]:
        script = Path(self.fake.dir, "recorder.py")
        if not script.exists():  # written once, atomically: a recorder starting meanwhile must not read it half
            atomic.write_text(script, RECORDER)  # written (an empty script exits 0 having run nothing)
        return [sys.executable, str(script), str(self.events), "--", *self.fake(args)]

    @property
    def events(self) -> Path:
        return Path(self.fake.dir, "events.txt")

    def replay(self) -> tuple[dict[str, str], int]:
        """(id -> the GPU it got, the most configurations one GPU held at once)."""
        got, busy, most = {}, Counter(), 0
        for line in self.events.read_text().splitlines():
            event, rid, gpu, _ = line.split()
            if event == "start":
                got[rid] = gpu
                busy[gpu] += 1
                most = max(most, busy[gpu])
            else:
                busy[gpu] -= 1
        assert not +busy, "a configuration never ended"
        return got, most
