#!/usr/bin/env bash
# Quick end-to-end check on the toy model (about a minute, offline): SparseGPT at 50% with 4-bit MI grouping
# (K=8), saving the model (packed format) and the analysis figures, then checks that every output exists and
# every perplexity is finite. Exits non-zero with a message naming what is missing or wrong.
#
#   ./test_mi.sh                         # outputs in a temporary folder, removed afterwards
#   ./test_mi.sh --strategy shared       # extra flags go to opt_mi.py
#   TEST_MI_OUT=runs/check ./test_mi.sh  # keep the outputs there
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
if [[ -n ${TEST_MI_OUT:-} ]]; then
    OUT=$TEST_MI_OUT
    rm -rf "$OUT/model" "$OUT/analysis" "$OUT/r.json" # stale outputs would hide a missing one
    mkdir -p "$OUT"
else
    OUT=$(mktemp -d)
    trap 'rm -rf "$OUT"' EXIT
fi

echo "test_mi.sh: opt_mi.py toy synthetic --sparsity 0.5 --wbits 4 --groups 8 $* -> $OUT"
rc=0
"$PYTHON" "$HERE/opt_mi.py" toy synthetic --sparsity 0.5 --wbits 4 --groups 8 --nsamples 16 \
    --json "$OUT/r.json" --analysis-dir "$OUT/analysis" --save "$OUT/model" "$@" || rc=$?
if ((rc != 0)); then
    echo "test_mi.sh: FAIL: opt_mi.py exited with code $rc" >&2
    exit 1
fi

"$PYTHON" - "$OUT" <<'PY'
import json
import math
import sys
from pathlib import Path

out = Path(sys.argv[1])
problems = []


def need_file(p: Path, what: str) -> bool:
    if not p.is_file() or p.stat().st_size == 0:
        problems.append(f"{what} is missing or empty: {p}")
        return False
    return True


if need_file(out / "r.json", "result JSON"):
    r = json.loads((out / "r.json").read_text())
    ppl = r.get("ppl") or {}
    if not ppl:
        problems.append("result JSON has no perplexity")
    for name, v in ppl.items():
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            problems.append(f"perplexity on {name} is not finite: {v}")
    bpw = (r.get("bits") or {}).get("bpw")
    if not isinstance(bpw, (int, float)) or not 2 <= bpw < 16:
        problems.append(f"bpw {bpw} is not that of a quantized model")
    if abs(float(r.get("sparsity", 0)) - 0.5) > 0.05:
        problems.append(f"measured sparsity {r.get('sparsity')} is not about 0.5")
    if r.get("family") != "mi":
        problems.append(f"family {r.get('family')!r}, expected 'mi'")
    print("test_mi.sh: " + ", ".join(f"ppl {k} {v}" for k, v in ppl.items()) + f", {bpw} bpw")
for png in ("mi_matrix.png", "grouping_result.png"):
    p = out / "analysis" / png
    if need_file(p, png) and not p.read_bytes().startswith(b"\x89PNG\r\n\x1a\n"):
        problems.append(f"{p} is not a PNG")
# the packed format (packed.py): codes, scales and masks; everything else; the manifest; the HF config
for f in ("packed.safetensors", "dense.safetensors", "quantization.json", "config.json"):
    need_file(out / "model" / f, f"saved model's {f}")
if (out / "model" / "quantization.json").is_file():
    manifest = json.loads((out / "model" / "quantization.json").read_text())
    if manifest.get("format") != "miq-packed" or not manifest.get("layers"):
        problems.append("quantization.json is not a miq-packed manifest with compressed layers")

for p in problems:
    print(f"test_mi.sh: FAIL: {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
PY
echo "test_mi.sh: OK"
