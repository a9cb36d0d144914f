"""The results reader shared by the sweep and the report: one ``Run`` per result JSON, and the loading of a
folder of them.

A result JSON (written by ``opt_mi.py --json``) records its flags in a ``config`` block. ``Run`` reads that
block back through ``config.from_json`` into the same frozen ``RunConfig`` opt_mi.py ran with, and names the
run with the vocabulary of ``methods.py``, so a run's method, family, strategy and K are derived one way
everywhere instead of being re-derived here from raw dict keys.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from miq import methods
from miq.options import fmt_num
from miq.report.stats import sample_std
from miq.run.config import RunConfig, from_json

# The families the verdict sorts runs into, from the method vocabulary: a new baseline or control added to
# methods.METHODS is compared without touching the report.
BASELINE_FAMILIES = methods.families("baseline", quantized=True)  # quantized, non-MI, not a control
CONTROL_FAMILIES = methods.families("control")  # same group sizes as an MI method, other membership
MI_FAMILIES = methods.families("method")  # one per axis: "mi" (rows), "mi-in" (input columns)


def control_families(mi_family: str) -> tuple[str, ...]:
    """The like-for-like controls of an MI family: the control families on its axis."""
    return methods.families("control", axis=methods.axis_of(mi_family))


def counted_control(mi_family: str) -> str:
    """The control the verdict's headline counts for an MI family: its random-membership control."""
    return next(f for f in control_families(mi_family) if f.startswith("random"))


@dataclass
class Run:
    """One result JSON: its id (file stem), the JSON as read, and the RunConfig recorded in it."""

    id: str
    data: dict
    config: RunConfig = field(init=False)

    def __post_init__(self) -> None:
        self.config = from_json(self.data.get("config") or {})

    def _derived_label(self) -> tuple[str, str]:
        """(label, family) from the config; the id and "?" when the config names no known method, so an odd
        JSON is still listed rather than dropped."""
        try:
            return methods.label(self.config)
        except ValueError:
            return self.id, "?"

    @property
    def method(self) -> str:
        """The label opt_mi.py stored (it is what the run was called when it ran), else the derived one."""
        stored = self.data.get("method")
        return str(stored) if stored is not None else self._derived_label()[0]

    @property
    def family(self) -> str:
        stored = self.data.get("family")
        return str(stored) if stored is not None else self._derived_label()[1]

    @property
    def ppl(self) -> dict:
        return self.data["ppl"]

    @property
    def bits(self) -> dict:
        return self.data["bits"]

    @property
    def bpw(self) -> float:
        return float(self.bits["bpw"])

    @property
    def wbits(self) -> float:
        return float(self.config.wbits)

    @property
    def wbits_label(self) -> str:
        return fmt_num(self.wbits)

    @property
    def groups(self) -> int | str:
        """0 (no grouping), "all" (every channel its own group) or an int K."""
        g = self.config.groups
        return g if g == "all" else int(g)

    @property
    def _nm(self) -> tuple[int, int]:
        return int(self.config.prunen or 0), int(self.config.prunem or 0)

    @property
    def sparsity_label(self) -> str:
        """Target sparsity as configured: "0.5", or "2:4" for N:M."""
        n, m = self._nm
        return f"{n}:{m}" if n else fmt_num(float(self.config.sparsity or 0.0))

    @property
    def sparsity_key(self) -> tuple:
        """Orders unstructured sparsities first (ascending), then N:M patterns by their sparsity."""
        n, m = self._nm
        return (1, 1 - n / m, n, m) if n else (0, float(self.config.sparsity or 0.0), 0, 0)

    @property
    def strategy(self) -> str:
        return methods.strategy_label(self.config)

    def ppl_of(self, evalset: str) -> float:
        """PPL on evalset, +inf when null (diverged) or missing, so that min() never picks it."""
        v = self.ppl.get(evalset)
        return float(v) if v is not None and math.isfinite(float(v)) else math.inf

    def sort_key(self) -> tuple:
        return (self.sparsity_key, self.wbits, self.bpw, self.method, self.id)

    @property
    def seeds(self) -> int:
        return 1

    def seed_ppl(self, evalset: str) -> dict[int, float]:
        """{seed: PPL} (+inf for n/a): what paired comparisons over seeds pair."""
        return {self.config.seed: self.ppl_of(evalset)}

    @property
    def execution(self) -> str:
        """Where the run ran, as far as its PPL depends on it: "cpu, 2 threads", "cuda NVIDIA H100, 16 threads"
        (the same run gave PPLs up to 0.5% apart at 1 and 2 threads: summation order)."""
        env = self.data.get("env") or {}
        device = str(env.get("device") or "device not recorded")
        where = "cpu" if device == "cpu" else f"{device.split(':')[0]} {env.get('device_name') or ''}".strip()
        n = threads_of(env)
        return f"{where}, " + ("threads not recorded" if n is None else f"{n} thread{'s' if n != 1 else ''}")

    @property
    def executions(self) -> tuple[str, ...]:
        return (self.execution,)


SEED_SUFFIX = re.compile(r"_seed\d+$")


def threads_of(env: dict) -> int | None:
    """The run's thread count: ``env.threads``, else as results before it was recorded name it on CPU
    (``device_name`` "cpu (2 threads)"); None when not recorded."""
    n = env.get("threads")
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    m = re.fullmatch(r"cpu \((\d+) threads?\)", str(env.get("device_name") or ""))
    return int(m.group(1)) if m else None


def dtype_of(r: Run) -> str:
    """The dtype the run's model ran in: as recorded (``env.dtype``), else its --dtype, else what "auto" picks
    (float32 on CPU, the checkpoint's dtype on a GPU: ``model.loading.load_model``)."""
    env = r.data.get("env") or {}
    if env.get("dtype"):
        return str(env["dtype"]).removeprefix("torch.")
    if r.config.dtype != "auto":
        return r.config.dtype
    return "float32" if env.get("device") == "cpu" else "the checkpoint's dtype"


@dataclass
class Unit:
    """One configuration over seeds: the runs whose ids differ only in a ``_seed<n>`` suffix (as a sweep with
    ``--seeds`` names them). It reads like a Run: its PPL is the mean over seeds (n/a if any seed's is), its
    bpw the mean (runs differ in bpw only through data-dependent allocations), its config the first run's."""

    id: str
    runs: list[Run]

    def __getattr__(self, name: str):  # the configuration's attributes are those of any of its runs
        if name in ("method", "family", "wbits", "wbits_label", "groups", "sparsity_label", "sparsity_key",
                    "strategy", "config", "data", "bits"):
            return getattr(self.runs[0], name)
        raise AttributeError(name)

    @property
    def seeds(self) -> int:
        return len(self.runs)

    @property
    def bpw(self) -> float:
        return sum(r.bpw for r in self.runs) / len(self.runs)

    def seed_ppl(self, evalset: str) -> dict[int, float]:
        return {r.config.seed: r.ppl_of(evalset) for r in self.runs}

    @property
    def executions(self) -> tuple[str, ...]:
        """Where its runs ran (more than one: its mean mixes devices or thread counts)."""
        return tuple(sorted({r.execution for r in self.runs}))

    def ppl_of(self, evalset: str) -> float:
        v = [r.ppl_of(evalset) for r in self.runs]
        return sum(v) / len(v) if all(math.isfinite(x) for x in v) else math.inf

    @property
    def ppl(self) -> dict:
        sets = dict.fromkeys(k for r in self.runs for k in r.ppl)
        return {s: (self.ppl_of(s) if math.isfinite(self.ppl_of(s)) else None) for s in sets}

    def spread(self, evalset: str) -> float:
        """Standard deviation of the PPL over seeds (0 for one seed; +inf if any is n/a)."""
        v = [r.ppl_of(evalset) for r in self.runs]
        if not all(math.isfinite(x) for x in v):
            return math.inf
        return sample_std(v)

    def sort_key(self) -> tuple:
        return (self.sparsity_key, self.wbits, self.bpw, self.method, self.id)


def units(runs: list[Run]) -> list[Unit]:
    """Runs grouped into configurations over seeds (a run without a seed suffix is a unit of one)."""
    by_key: dict[str, list[Run]] = {}
    for r in runs:
        by_key.setdefault(SEED_SUFFIX.sub("", r.id), []).append(r)
    out = [Unit(k, sorted(rs, key=lambda r: r.config.seed)) for k, rs in by_key.items()]
    return sorted(out, key=Unit.sort_key)


def _warn(path: Path, why: object) -> None:
    # named after the running program: the same reader serves report.py and the sweep
    print(f"{Path(sys.argv[0]).name or 'results'}: warning: skipping {path}: {why}", file=sys.stderr)


def _read(p: Path) -> dict | None:
    """The JSON object in p, or None (with a warning if it is unreadable) when there is none."""
    try:
        obj = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        _warn(p, e)
        return None
    return obj if isinstance(obj, dict) else None


def _as_run(p: Path, obj: dict) -> Run | None:
    """A Run when obj is a result (it holds "ppl" and "bits" with a numeric bpw), else None."""
    if not (isinstance(obj.get("ppl"), dict) and isinstance(obj.get("bits"), dict)):
        return None
    if not isinstance(obj["bits"].get("bpw"), (int, float)):
        _warn(p, "no bits.bpw")
        return None
    if "code_bpw" not in obj["bits"]:  # its bpw charged a code to every pruned weight and left the mask out
        _warn(p, "bits of the schema before kept-only storage (no bits.code_bpw): not comparable, rerun it")
        return None
    try:
        return Run(p.stem, obj)
    except (TypeError, ValueError) as e:  # a config block RunConfig cannot hold
        _warn(p, f"bad config: {e}")
        return None


def load_dir(d: Path) -> tuple[list[Run], list[dict], list[dict]]:
    """(result runs, failure notes, skip notes) from the JSON files directly in d.

    ``<id>.failed.json`` and ``<id>.skipped.json`` are the sweep's notes; a failure whose id has since
    produced a result is dropped, since the rerun succeeded. Runs come sorted by ``Run.sort_key``.
    """
    runs, failed, skipped = [], [], []
    for p in sorted(d.glob("*.json")):
        if p.name.startswith("."):
            continue
        obj = _read(p)
        if obj is None:
            continue
        if p.name.endswith(".failed.json"):
            failed.append({"id": p.name[: -len(".failed.json")], **obj})
        elif p.name.endswith(".skipped.json"):
            skipped.append({"id": p.name[: -len(".skipped.json")], **obj})
        elif (run := _as_run(p, obj)) is not None:
            runs.append(run)
    runs.sort(key=Run.sort_key)
    done = {r.id for r in runs}
    failed = [f for f in failed if f["id"] not in done]
    return runs, failed, skipped


def eval_sets(runs: list[Run]) -> list[str]:
    """Every eval set any run was evaluated on, in first-seen order (the table's column order)."""
    seen: dict[str, None] = {}
    for r in runs:
        for k in r.ppl:
            seen.setdefault(k, None)
    return list(seen)
