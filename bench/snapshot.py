"""Not a benchmark: the refactoring check. Runs a fixed set of toy configurations (OPT and Llama toys, every
method family, save + reload) through ``opt_mi.py`` and prints one digest per configuration: the result JSON
without what legitimately changes between runs (timings, paths, code version, environment), and the sha256 of
every file a ``--save`` wrote. Two checkouts give the same digests when behaviour, labels, JSON keys and saved
files are identical.

    python bench/snapshot.py --out /tmp/before.json      # on the old tree
    python bench/snapshot.py --out /tmp/after.json --compare /tmp/before.json
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from miq.run.config import RunConfig  # noqa: E402  (the checkout's own, run from anywhere)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--nsamples", "8", "--seqlen", "64", "--eval-batch", "4", "--analysis-dir", ""]
CONFIGS = {
    "opt-dense": ["toy", "synthetic", "--sparsity", "0"],
    "opt-gmp": ["toy", "synthetic", "--sparsity", "0.5", "--gmp", "--wbits", "4"],
    "opt-sparsegpt": ["toy", "synthetic", "--sparsity", "0.5"],
    "opt-2:4-w4": ["toy", "synthetic", "--prunen", "2", "--prunem", "4", "--wbits", "4"],
    "opt-uniform3": ["toy", "synthetic", "--sparsity", "0.5", "--wbits", "3"],
    "opt-g32-sym": ["toy", "synthetic", "--sparsity", "0.5", "--wbits", "4", "--groupsize", "32", "--sym"],
    "opt-act-order": ["toy", "synthetic", "--sparsity", "0.5", "--wbits", "3", "--act-order"],
    "opt-act-order-g32": ["toy", "synthetic", "--sparsity", "0.5", "--wbits", "4", "--act-order", "--groupsize", "32"],
    "opt-miB": ["toy", "synthetic", "--sparsity", "0.5", "--wbits", "3.5", "--groups", "8"],
    "opt-miA": ["toy", "synthetic", "--sparsity", "0.5", "--wbits", "3.5", "--groups", "8", "--strategy", "shared"],
    "opt-perchannel-rtn": ["toy", "synthetic", "--sparsity", "0.5", "--wbits", "3", "--groups", "all",
                           "--alloc-cost", "rtn"],
    "opt-random-hmi": ["toy", "synthetic", "--sparsity", "0.5", "--wbits", "3", "--groups", "8", "--cluster",
                       "random", "--bit-alloc", "hessian-mi"],
    "opt-range-B": ["toy", "synthetic", "--sparsity", "0.5", "--wbits", "3.5", "--groups", "8", "--cluster", "range"],
    "opt-mi-in": ["toy", "synthetic", "--sparsity", "0.5", "--wbits", "3.5", "--groups", "4", "--mi-axis", "input"],
    "opt-contig-in-ao": ["toy", "synthetic", "--sparsity", "0.5", "--wbits", "3", "--groups", "4", "--mi-axis",
                         "input", "--cluster", "contiguous", "--act-order"],
    "opt-hier-trueseq": ["toy", "synthetic", "--sparsity", "0.5", "--wbits", "4", "--groups", "8", "--cluster",
                         "hierarchical", "--true-sequential"],
    "llama-sparsegpt-w4": ["toy-llama", "synthetic", "--sparsity", "0.5", "--wbits", "4"],
    "llama-miB-trueseq": ["toy-llama", "synthetic", "--sparsity", "0.5", "--wbits", "3.5", "--groups", "8",
                          "--true-sequential"],
    "llama-mi-in": ["toy-llama", "synthetic", "--sparsity", "0.5", "--wbits", "3", "--groups", "4", "--mi-axis",
                    "input"],
}
SAVES = {  # configuration -> formats saved and then evaluated again from the folder
    "opt-miB": ["packed", "dense"],
    "opt-mi-in": ["packed"],
    "opt-act-order": ["packed"],
    "opt-uniform3": ["packed", "compressed-tensors"],
    "llama-sparsegpt-w4": ["packed"],
}
VOLATILE = {"timing", "env", "model_path", "save", "json", "analysis_dir", "figures", "bytes_path"}


def _at_default(key: str, value) -> bool:
    """A config entry at its field's default: a flag added since the other checkout changes no digest while it is
    left at its default (what it changes, if anything, shows in the results and files)."""
    field = RunConfig.__dataclass_fields__.get(key)
    default = getattr(field, "default", dataclasses.MISSING)
    return default is not dataclasses.MISSING and (value == default or (isinstance(default, tuple)
                                                                        and value == list(default)))


def _clean(x):
    if isinstance(x, dict):
        config = "model" in x and "dataset" in x  # a run's config block (result JSON, a save's manifest)
        return {k: _clean(v) for k, v in sorted(x.items())
                if k not in VOLATILE and not (config and _at_default(k, v))}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _files(folder: str) -> dict:
    out = {}
    for f in sorted(os.listdir(folder)):
        if f == "miq_save.json":  # the files' raw sha256 (safetensors headers vary); their content is hashed here
            continue
        with open(os.path.join(folder, f), "rb") as fh:
            data = fh.read()
        if f.endswith(".safetensors"):  # safetensors' header keeps its metadata in no fixed order: hash the content
            data = _safetensors_content(os.path.join(folder, f))
        elif f.endswith(".json"):  # run metadata inside a manifest names paths and code versions
            try:
                data = json.dumps(_clean(json.loads(data)), sort_keys=True).encode()
            except ValueError:
                pass
        out[f] = hashlib.sha256(data).hexdigest()[:16]
    return out


def _safetensors_content(path: str) -> bytes:
    """The tensors' names, dtypes, shapes and bytes, and the metadata with sorted keys."""
    h = hashlib.sha256()
    with safe_open(path, "pt") as f:
        h.update(json.dumps(f.metadata() or {}, sort_keys=True).encode())
        for k in sorted(f.keys()):
            t = f.get_tensor(k)
            raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            h.update(f"{k}|{t.dtype}|{list(t.shape)}|".encode() + raw)
    return h.digest()


def _run(argv: list[str], tmp: str, name: str) -> dict:
    path = os.path.join(tmp, name + ".json")
    subprocess.run([sys.executable, os.path.join(ROOT, "opt_mi.py"), *argv, "--json", path], check=True,
                   cwd=tmp, stdout=subprocess.DEVNULL)
    with open(path) as f:
        return json.load(f)


def snapshot(names: list[str]) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            argv = CONFIGS[name] + BASE
            r = _run(argv, tmp, name)
            entry = {"result": _digest(_clean(r)), "ppl": r["ppl"], "method": r["method"],
                     "keys": sorted(r), "bits_keys": sorted(r["bits"])}
            for fmt in SAVES.get(name, []):
                folder = os.path.join(tmp, f"{name}-{fmt}")
                _run(argv + ["--save", folder, "--save-format", fmt], tmp, name + "-saved")
                entry[f"saved-{fmt}"] = _files(folder)
                if fmt != "compressed-tensors":  # opt_mi.py reads packed and dense folders
                    again = _run([folder, "synthetic", "--eval", "synthetic", *BASE], tmp, name + "-reload")
                    entry[f"reload-{fmt}"] = again["ppl"]
            out[name] = entry
            print(name, entry["result"], entry["method"], flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--compare", default=None, help="a snapshot to compare with: exit 1 on any difference")
    p.add_argument("--only", default="", help="comma-separated configuration names (default: all)")
    a = p.parse_args()
    names = [n for n in a.only.split(",") if n] or list(CONFIGS)
    snap = snapshot(names)
    with open(a.out, "w") as f:
        json.dump(snap, f, indent=1, sort_keys=True)
    if a.compare:
        with open(a.compare) as f:
            ref = json.load(f)
        diff = [n for n in names if ref.get(n) != snap[n]]
        print(f"{len(names) - len(diff)} of {len(names)} configurations identical" + (f"; differ: {diff}" if diff
                                                                                        else ""))
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
