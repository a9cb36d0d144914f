"""Which of a results folder's Slurm jobs are still queued or running, as squeue says.

The sweep's Slurm executor records each configuration's last job in OUT/submitit/jobs.json. Whether those jobs
are still in flight is asked of squeue, not sacct: squeue reads the controller's memory, which every cluster
has, while sacct reads the accounting database, which many small clusters run without (sacct then only says
so, and submitit's status polling, which asks sacct, logs that warning on every poll). A job squeue no longer
lists has ended: the controller forgets a finished job MinJobAge (300 s by default) after its end.

Both the sweep (never submit a configuration twice, never build the report while jobs will still write into
the folder) and the report (a warning when built over jobs in flight) ask here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# Slurm states of a job that is queued or running, or will run again (a requeued one)
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
          "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}
SQUEUE_TIMEOUT_S = 60  # a controller that does not answer in this long is reported, not waited for


class QueueError(Exception):
    """squeue could not be asked (missing, the controller not answering): ``str(e)`` is one line."""


@dataclass(frozen=True)
class JobState:
    """A job as squeue lists it: its state (PENDING, RUNNING, COMPLETED, ...) and Slurm's reason (BeginTime,
    JobArrayTaskLimit, None, ...)."""

    state: str
    reason: str = "None"

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def __str__(self) -> str:
        return self.state.lower() + ("" if self.reason in ("None", "") else f" ({self.reason})")


def record_path(out: Path) -> Path:
    return out / "submitit" / "jobs.json"


def recorded(out: Path) -> dict[str, str]:
    """Configuration id -> the id of its last Slurm job, as OUT/submitit/jobs.json keeps them ({} without one)."""
    try:
        ids = json.loads(record_path(out).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in ids.items()} if isinstance(ids, dict) else {}


def states(job_ids: Iterable[str]) -> dict[str, JobState]:
    """Job id (an array's task as <array>_<task>) -> its state, for the jobs the controller still knows, finished
    ones included; a job it does not list has ended. One squeue call for all of them."""
    arrays = sorted({j.split("_")[0] for j in job_ids})
    if not arrays:
        return {}
    command = ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T|%r", "--jobs=" + ",".join(arrays)]
    try:
        r = subprocess.run(command, capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise QueueError(f"squeue: {e}") from None
    if r.returncode:
        if "Invalid job id" in r.stderr:  # every one of them ended long enough ago to be forgotten
            return {}
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()] or [f"exit {r.returncode}"]
        raise QueueError(f"squeue: {lines[-1].strip()}")
    out = {}
    for line in r.stdout.splitlines():
        job_id, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        if job_id:
            out[job_id] = JobState(state.strip().split(" ")[0], reason.strip() or "None")
    return out


def in_flight(out: Path) -> dict[str, str]:
    """Configuration id -> job id, for the folder's recorded jobs still queued, running or requeued."""
    ids = recorded(out)
    now = states(ids.values())
    return {cfg: job for cfg, job in ids.items() if job in now and now[job].active}


def in_flight_if_known(out: Path) -> dict[str, str]:
    """``in_flight(out)``, or {} when no controller answers here (the folder was copied from a cluster)."""
    if not recorded(out) or shutil.which("squeue") is None:
        return {}
    try:
        return in_flight(out)
    except QueueError:
        return {}


def in_flight_note(out: Path) -> str | None:
    """The warning of a report built over ``out`` while its recorded Slurm jobs are still queued or running."""
    if not (flying := in_flight_if_known(out)):
        return None
    return (f"{len(flying)} Slurm job(s) still queued or running into {out} ({', '.join(sorted(flying))}): this "
            "report lacks what they will write; rerun the sweep's command to wait for them and rebuild it")
