"""Probe one run (opt_mi.py on the toy) with bad input and faults, as a user meets them, and print a table:
per case the exit code (and the one expected), whether stderr holds a traceback, how many lines it has,
what was left behind (new files, staging ``.*.tmp``, ``miq-layers-*`` in $TMPDIR) and whether a file the user
owns was lost or changed.

    OMP_NUM_THREADS=1 python bench/probe_run.py            # every case, about 5 minutes on the toy
    OMP_NUM_THREADS=1 python bench/probe_run.py symlink    # the cases whose name holds "symlink"

Each case runs ``opt_mi.py`` as a process of its own in a fresh folder, with $TMPDIR inside it; faults are
real where a process allows it: a file-size limit (RLIMIT_FSIZE, as a full disk: every writer's error,
the libraries' own included), signals sent while the run works. Exit code 0 for a refused case, a traceback,
a leftover or a lost file is a finding (``ok`` column ``NO``).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAST = ["--nsamples", "4", "--seqlen", "32", "--eval", "eval.txt"]
CT = ["--wbits", "4", "--groupsize", "16", "--sym", "--act-order"]


@dataclass
class Case:
    name: str
    argv: list[str]  # after "opt_mi.py"; FAST is appended
    expect: int
    setup: Callable[[Path], list[str]] = lambda d: []  # returns the user's files (relative) that must survive
    fsize: int | None = None  # RLIMIT_FSIZE in bytes
    signals: list[float] = field(default_factory=list)  # seconds after start to send SIGTERM
    outputs: tuple[str, ...] = ()  # what the run may leave (its own outputs, when it succeeds)
    check: Callable[[Path], str] = lambda d: ""  # a further finding, "" when none


def opt_mi(d: Path, argv: list[str], fsize: int | None = None, signals: list[float] = ()) -> tuple[int, str]:
    def limit():
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))

    env = {**os.environ, "TMPDIR": str(d / "tmp"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    p = subprocess.Popen([sys.executable, str(ROOT / "opt_mi.py"), *argv, *FAST], cwd=d / "work", env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit)
    start = time.time()
    for at in signals:
        time.sleep(max(0.0, at - (time.time() - start)))
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=600)
    return p.returncode, err


def files(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            out[str(p.relative_to(root))] = "link" if p.is_symlink() else digest
    return out


# ----------------------------------------------------------------------------------------------------------
# setups: each makes the user's state in work/ and returns the files that are the user's


def saved(d: Path, folder: str = "m", *flags: str) -> None:
    code, err = opt_mi(d, ["toy", "synthetic", "--sparsity", "0.5", "--save", folder, *flags])
    assert code == 0, err


def with_notes(d: Path) -> list[str]:
    saved(d)
    (d / "work/m/README.md").write_text("what I tried")
    return ["m/README.md"]


def with_results(d: Path) -> list[str]:
    saved(d)
    (d / "work/m/lm_eval").mkdir()
    (d / "work/m/lm_eval/results.json").write_text("{}")
    return ["m/lm_eval/results.json"]


def foreign_json(d: Path) -> list[str]:
    (d / "work/r.json").write_text(json.dumps({"env": {"torch": "2"}, "mine": True}))
    return ["r.json"]


def link_to_saved(d: Path) -> list[str]:
    (d / "work/elsewhere").mkdir()
    saved(d, "elsewhere/model")
    os.symlink("elsewhere/model", d / "work/m")
    return []


def link_to_new_json(d: Path) -> list[str]:
    (d / "work/results").mkdir()
    os.symlink("results/r.json", d / "work/r.json")
    return []


def link_loop(d: Path) -> list[str]:
    os.symlink("m", d / "work/m")
    return []


def sharded_wrong(d: Path) -> list[str]:
    from safetensors.torch import load_file, save_file

    from miq.model import toy

    dst = d / "work/sharded"
    shutil.copytree(toy.toy_model_path(), dst)
    w = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    names = sorted(w)
    parts = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    for f, part in parts.items():
        save_file({n: w[n] for n in part}, str(dst / f), metadata={"format": "pt"})
    wmap = {n: f for f, part in parts.items() for n in part}
    wmap[names[-1]] = "a.safetensors"  # the last tensor is in b
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return []


def task_function(d: Path) -> list[str]:
    (d / "work/docs.jsonl").write_text(json.dumps({"q": "the", "choices": ["a", "b"], "label": 0}) + "\n")
    (d / "work/t.yaml").write_text(f"""task: probe_fn
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / "work/docs.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
process_docs: !function helpers.keep
metric_list:
  - metric: acc
""")
    return ["t.yaml", "docs.jsonl"]


def jsonl_u2028(d: Path) -> list[str]:
    from miq.synthetic import synthetic_text

    lines = [json.dumps({"text": line + "\u2028" + line}, ensure_ascii=False)
             for line in synthetic_text("train").splitlines() if line.strip()]
    (d / "work/data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ["data.jsonl"]


def ct_saved(d: Path) -> list[str]:
    code, err = opt_mi(d, ["toy", "synthetic", *CT, "--save", "ct", "--save-format", "compressed-tensors"])
    assert code == 0, err
    return []


def reopens(d: Path) -> str:
    """The folder saved from a compressed-tensors model reopens with the run's perplexity."""
    if not (d / "work/again").is_dir():
        return "nothing saved"
    code, err = opt_mi(d, ["again", "synthetic", "--json", "reopened.json"])
    if code:
        return "does not reopen: " + err.strip().splitlines()[-1][:80]
    ppl = [json.loads((d / f"work/{f}").read_text())["ppl"] for f in ("r.json", "reopened.json")]
    return "" if ppl[0] == ppl[1] else f"ppl {ppl[0]} reopened as {ppl[1]}"


def still_link(d: Path) -> str:
    return "" if (d / "work/m").is_symlink() or (d / "work/r.json").is_symlink() else "the link was replaced"


T = ["toy", "synthetic"]
CASES = [
    Case("save-over-user-notes", [*T, "--sparsity", "0.5", "--save", "m"], 2, with_notes),
    Case("save-over-user-results-folder", [*T, "--wbits", "4", "--save", "m", "--save-format", "dense"], 2,
         with_results),
    Case("json-over-foreign-json", [*T, "--sparsity", "0.5", "--json", "r.json"], 2, foreign_json),
    Case("save-through-symlink", [*T, "--sparsity", "0.5", "--save", "m"], 0, link_to_saved, check=still_link),
    Case("json-through-symlink-new", [*T, "--sparsity", "0.5", "--json", "r.json"], 0, link_to_new_json,
         outputs=("results/r.json",), check=still_link),
    Case("save-into-symlink-loop", [*T, "--sparsity", "0.5", "--save", "m"], 2, link_loop),
    *[Case(f"disk-full-{fmt}", [*T, "--wbits", "3", "--save", "m", "--save-format", fmt, "--json", "r.json"], 1,
           fsize=250_000) for fmt in ("packed", "compressed-tensors", "dense")],
    Case("tmpdir-full-load-layers", [*T, "--wbits", "3", "--load", "layers"], 2, fsize=40_000),
    Case("shard-index-wrong", ["sharded", "synthetic", "--sparsity", "0.5"], 2, sharded_wrong),
    Case("task-function-missing", [*T, "--sparsity", "0.5", "--tasks", "t.yaml"], 2, task_function),
    *[Case(f"sigterm-x3-at-{at}s", [*T, "--wbits", "4", "--groups", "4", "--save", "m", "--json", "r.json"], 130,
           signals=[at, at + 0.002, at + 0.2]) for at in (2.0, 4.0, 6.0)],
    Case("jsonl-u2028-dataset", ["toy", "data.jsonl", "--sparsity", "0.5"], 0, jsonl_u2028),
    Case("save-format-without-save", [*T, "--sparsity", "0.5", "--save-format", "dense"], 2),
    Case("target-bpw-one-width", [*T, "--groups", "4", "--bits-choices", "3", "--target-bpw", "3.2"], 2),
    Case("its-suggestion", [*T, "--groups", "4", "--bits-choices", "3", "--wbits", "3"], 0, outputs=("analysis",)),
    Case("ct-target-bpw", [*T, "--groups", "4", "--target-bpw", "3.5", "--save", "x", "--save-format",
                           "compressed-tensors"], 2),
    Case("its-suggestion-ct", [*T, "--groups", "4", "--target-bpw", "3.5", "--save", "x"], 0,
         outputs=("x", "analysis")),  # a grouped run draws its figures into analysis/ by default
    Case("ct-model-saved-packed", ["ct", "synthetic", *CT, "--save", "again", "--json", "r.json"], 0, ct_saved,
         outputs=("again", "r.json", "reopened.json"), check=reopens),
]


def probe(c: Case) -> dict:
    from miq.synthetic import synthetic_text

    d = Path(tempfile.mkdtemp(prefix="probe-"))
    try:
        (d / "work").mkdir()
        (d / "tmp").mkdir()
        (d / "work/eval.txt").write_text(synthetic_text("test")[:3000])
        users = c.setup(d)
        before = files(d / "work")
        code, err = opt_mi(d, c.argv, c.fsize, c.signals)
        after = files(d / "work")
        extra = c.check(d) if code == 0 else ""
        new = [k for k in after if k not in before and not any(k == o or k.startswith(o + "/") for o in c.outputs)]
        staged = [k for k in after if ".tmp" in k]
        layers = [p.name for p in (d / "tmp").glob("miq-layers-*")]
        lost = [u for u in users if before.get(u) != after.get(u)]
        lines = err.strip().splitlines()
        return {"case": c.name, "exit": code, "expected": c.expect, "traceback": "Traceback" in err,
                "stderr_lines": len([x for x in lines if not x.startswith(("warning", "Applying"))]) if code else 0,
                "left": len(set(new) | set(staged)) + len(layers), "lost": len(lost), "finding": extra,
                "line": lines[-1][:110] if lines and code else ""}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str]) -> int:
    picked = [c for c in CASES if not argv or any(a in c.name for a in argv)]
    rows = []
    print(f"{'case':32} {'exit':>4} {'want':>4} {'tb':>3} {'lines':>5} {'left':>4} {'lost':>4}  ok   line / finding")
    for c in picked:
        r = probe(c)
        ok = (r["exit"] == r["expected"] and not r["traceback"] and not r["left"] and not r["lost"]
              and not r["finding"] and r["stderr_lines"] <= 1)
        rows.append(ok)
        print(f"{r['case']:32} {r['exit']:>4} {r['expected']:>4} {'yes' if r['traceback'] else 'no':>3} "
              f"{r['stderr_lines']:>5} {r['left']:>4} {r['lost']:>4}  {'ok ' if ok else 'NO '}  "
              f"{r['finding'] or r['line']}", flush=True)
    print(f"{sum(rows)} of {len(rows)} clean")
    return 0 if all(rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
