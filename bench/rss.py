"""Peak resident memory of this process, for the benches that report it."""

from __future__ import annotations

import resource


def peak_rss() -> int:
    """This process's peak resident set in bytes. Linux's VmHWM belongs to the exec'd image alone; ru_maxrss
    also counts a forking parent's peak (kept across fork and exec), so it is the fallback only."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
