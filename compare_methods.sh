#!/usr/bin/env bash
# Run the method matrix and build the report: dense; magnitude; SparseGPT; SparseGPT + uniform per-channel
# quantization; + --groupsize 128; per-channel importance allocation (--groups all); MI strategy A and B;
# random- and contiguous-group controls.
#
#   ./compare_methods.sh                                   # toy model, offline, a few minutes on a laptop
#   ./compare_methods.sh --model facebook/opt-125m --calib c4 --eval wikitext2,c4 \
#       --sparsities "0.5" --groups "16 50" --wbits "3 4" --out results/opt125m --jobs 2
#
# Contract:
# - one result per configuration: OUT/<id>.json (written atomically by opt_mi.py --json), its output in
#   OUT/<id>.log and its figures in OUT/analysis/<id>/;
# - a configuration whose OUT/<id>.json exists is skipped, so a killed sweep resumes where it stopped and a
#   second run does nothing new (after changing the code, sweep into a new --out);
# - a configuration that exits non-zero writes OUT/<id>.failed.json (id, command, returncode, last log lines)
#   and the sweep goes on; reruns skip it too unless --retry-failed;
# - SIGINT/SIGTERM stop the running configurations and record nothing for them;
# - the sweep ends with `python report.py OUT` and exits non-zero when any configuration has failed.
# OPT_MI_CMD replaces the command run per configuration (default: python opt_mi.py beside this script);
# PYTHON the interpreter for the helpers (default: python).
set -euo pipefail
# The whole script is one block, so bash parses it all before running any of it: editing or pulling this file
# during a long sweep cannot change what the running sweep does.
{

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
ALL_METHODS="dense magnitude sparsegpt uniform g128 perchannel miA miB random contiguous"

usage() {
    cat <<EOF
usage: $0 [--model M] [--calib D] [--eval LIST] [--sparsities "0.5 ..."] [--groups "8 16 50"]
          [--wbits "3 4"] [--out DIR] [--jobs N] [--nsamples N] [--extra "opt_mi.py flags"]
          [--methods "$ALL_METHODS"] [--retry-failed]

  --model M          hub id, local folder, or a built-in toy: 'toy' (OPT) or 'toy-llama' (default toy)
  --calib D          calibration data (default synthetic)
  --eval LIST        comma-separated eval sets (default synthetic for the toys, else wikitext2,ptb,c4)
  --sparsities LIST  target sparsities (default "0.5"); 0 runs the quantize-only rows
  --groups LIST      K values for the MI and control rows (default "8")
  --wbits LIST       bit budgets (default "4"); fractional budgets skip the uniform and g128 rows
  --out DIR          results folder (default results/sweep)
  --jobs N           configurations run at a time (default 1)
  --nsamples N       calibration windows (default 32 for the toys, else 128)
  --extra "..."      flags appended to every opt_mi.py call, e.g. "--seqlen 64 --seed 1"
  --methods LIST     subset of the matrix to run (default all: $ALL_METHODS)
  --retry-failed     run configurations that have an <id>.failed.json again
EOF
}

die() {
    echo "compare_methods.sh: error: $*" >&2
    exit 2
}

MODEL=toy CALIB=synthetic EVAL="" SPARSITIES="0.5" KS="8" WBITS="4" OUT=results/sweep JOBS=1
NSAMPLES="" EXTRA="" METHODS="$ALL_METHODS" RETRY=0
while (($#)); do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --retry-failed) RETRY=1; shift; continue ;;
    esac
    (($# >= 2)) || die "$1 needs a value (see --help)"
    case "$1" in
        --model) MODEL=$2 ;;
        --calib) CALIB=$2 ;;
        --eval) EVAL=$2 ;;
        --sparsities) SPARSITIES=$2 ;;
        --groups) KS=$2 ;;
        --wbits) WBITS=$2 ;;
        --out) OUT=$2 ;;
        --jobs) JOBS=$2 ;;
        --nsamples) NSAMPLES=$2 ;;
        --extra) EXTRA=$2 ;;
        --methods) METHODS=$2 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift 2
done

read -ra SPARSITY_LIST <<<"$SPARSITIES"
read -ra WBITS_LIST <<<"$WBITS"
read -ra K_LIST <<<"$KS"
read -ra METHOD_LIST <<<"$METHODS"
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || die "--jobs $JOBS: must be a positive integer"
[[ -z $NSAMPLES || $NSAMPLES =~ ^[1-9][0-9]*$ ]] || die "--nsamples $NSAMPLES: must be a positive integer"
for s in "${SPARSITY_LIST[@]}"; do [[ $s =~ ^0?(\.[0-9]*)?$ ]] || die "--sparsities: $s is not in [0, 1)"; done
for w in "${WBITS_LIST[@]}"; do [[ $w =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--wbits: $w is not a number"; done
for k in "${K_LIST[@]}"; do [[ $k =~ ^[1-9][0-9]*$ ]] || die "--groups: $k is not a positive integer K"; done
for m in "${METHOD_LIST[@]}"; do [[ " $ALL_METHODS " == *" $m "* ]] || die "--methods: unknown $m (known: $ALL_METHODS)"; done
((${#SPARSITY_LIST[@]} && ${#WBITS_LIST[@]} && ${#METHOD_LIST[@]})) || die "--sparsities, --wbits and --methods must not be empty"
is_toy() { [[ $MODEL == toy || $MODEL == toy-llama ]]; } # the built-in offline models (toy.TOY_NAMES)
if [[ -z $NSAMPLES ]]; then
    if is_toy; then NSAMPLES=32; else NSAMPLES=128; fi
fi
if [[ -z $EVAL ]]; then
    if is_toy; then EVAL=synthetic; else EVAL=wikitext2,ptb,c4; fi
fi
if [[ -n ${OPT_MI_CMD:-} ]]; then
    read -ra CMD <<<"$OPT_MI_CMD"
else
    CMD=("$PYTHON" "$HERE/opt_mi.py")
fi
read -ra EXTRA_ARGS <<<"$EXTRA"
mkdir -p "$OUT"

# ---- the matrix: parallel arrays of ids and opt_mi.py flags ("SKIP:reason" for rows that cannot run)
IDS=() FLAGS=()
want() { [[ " ${METHOD_LIST[*]} " == *" $1 "* ]]; }
add() { IDS+=("$1"); FLAGS+=("$2"); }
want dense && add dense "--sparsity 0 --wbits 16"
for s in "${SPARSITY_LIST[@]}"; do
    pruned=1
    [[ $s =~ ^[0.]+$ ]] && pruned=0 # s = 0: the pruning-only rows would repeat dense
    if ((pruned)); then
        want magnitude && add "magnitude_s$s" "--sparsity $s --gmp"
        want sparsegpt && add "sparsegpt_s$s" "--sparsity $s"
    fi
    for w in "${WBITS_LIST[@]}"; do
        q="--sparsity $s --wbits $w"
        whole=1
        [[ $w =~ ^[0-9]+(\.0*)?$ ]] || whole=0
        for m in uniform g128; do
            want "$m" || continue
            flags="$q"
            [[ $m == g128 ]] && flags="$q --groupsize 128"
            ((whole)) || flags="SKIP:uniform quantization needs whole bits; a ${w}-bit budget needs --groups"
            add "${m}_s${s}_w${w}" "$flags"
        done
        want perchannel && add "perchannel_s${s}_w${w}" "$q --groups all"
        for k in "${K_LIST[@]}"; do
            want miA && add "miA_s${s}_w${w}_k$k" "$q --groups $k --strategy shared"
            want miB && add "miB_s${s}_w${w}_k$k" "$q --groups $k --strategy independent"
            want random && add "random_s${s}_w${w}_k$k" "$q --groups $k --strategy independent --cluster random"
            want contiguous && add "contiguous_s${s}_w${w}_k$k" \
                "$q --groups $k --strategy independent --cluster contiguous"
        done
    done
done
TOTAL=${#IDS[@]}

fmt_dur() { # seconds -> 45s / 3m05s / 1h02m
    local t=$1
    if ((t < 60)); then
        printf '%ds' "$t"
    elif ((t < 3600)); then
        printf '%dm%02ds' $((t / 60)) $((t % 60))
    else
        printf '%dh%02dm' $((t / 3600)) $((t % 3600 / 60))
    fi
}

write_note() { # path json-fields... : write {"k": v, ...} atomically (python does the JSON escaping)
    "$PYTHON" - "$@" <<'PY'
import json, os, sys
path, *kv = sys.argv[1:]
obj = dict(zip(kv[::2], kv[1::2]))
if "log" in obj:  # the error is the last lines of the log
    try:
        with open(obj.pop("log"), errors="replace") as f:
            obj["error"] = "\n".join(f.read().splitlines()[-20:])
    except OSError as e:
        obj["error"] = f"(no log: {e})"
if "returncode" in obj:
    obj["returncode"] = int(obj["returncode"])
tmp = f"{path}.{os.getpid()}.tmp"
with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
os.replace(tmp, path)
PY
}

# ---- what needs running
STATE=() # run | exists | failed | skip
TO_RUN=0
for i in "${!IDS[@]}"; do
    id=${IDS[i]}
    if [[ ${FLAGS[i]} == SKIP:* ]]; then
        STATE+=(skip)
    elif [[ -f $OUT/$id.json ]]; then
        STATE+=(exists)
    elif [[ -f $OUT/$id.failed.json && $RETRY == 0 ]]; then
        STATE+=(failed)
    else
        STATE+=(run)
        TO_RUN=$((TO_RUN + 1))
    fi
done
echo "sweep: $TOTAL configurations, $TO_RUN to run, $JOBS at a time -> $OUT"

if ((TO_RUN)) && is_toy && [[ -z ${OPT_MI_CMD:-} ]]; then
    # build the toy model once here rather than in several jobs at the same time
    (cd "$HERE" && "$PYTHON" -c "import sys, models; models.resolve(sys.argv[1])" "$MODEL")
fi

declare -A RUN_ID=() RUN_IDX=() RUN_T0=() RUN_CMD=() # by pid of the running opt_mi.py
LAUNCHED=0 DONE_N=0 DONE_S=0 NEW_FAILED=0

on_signal() { # stop everything running; opt_mi.py writes its JSON atomically, so nothing partial remains
    trap - INT TERM
    echo "interrupted: stopping ${#RUN_ID[@]} running configuration(s); rerun the same command to resume" >&2
    local pid
    for pid in "${!RUN_ID[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${!RUN_ID[@]}"; do
        wait "$pid" 2>/dev/null || true
        rm -f "$OUT/.${RUN_ID[$pid]}.json."*.tmp
    done
    exit "$1"
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

finish() { # pid rc: record the outcome of one configuration
    local pid=$1 rc=$2 id=${RUN_ID[$1]} idx=${RUN_IDX[$1]}
    local dt=$((SECONDS - RUN_T0[$1]))
    if ((rc == 130 || rc == 143)); then
        # killed by SIGINT/SIGTERM from outside (Ctrl-C to the group, timeout): the sweep is being stopped,
        # so this is no failure to record; stop the rest as well
        echo "[$idx/$TOTAL] $id interrupted after $(fmt_dur $dt); not recorded" >&2
        unset "RUN_ID[$pid]"
        on_signal 130
    elif ((rc == 0)) && [[ -f $OUT/$id.json ]]; then
        rm -f "$OUT/$id.failed.json"
        echo "[$idx/$TOTAL] $id done in $(fmt_dur $dt)"
    else
        ((rc != 0)) || { rc=1; echo "opt_mi exited 0 but wrote no $OUT/$id.json" >>"$OUT/$id.log"; }
        write_note "$OUT/$id.failed.json" id "$id" command "${RUN_CMD[$pid]}" returncode "$rc" log "$OUT/$id.log"
        NEW_FAILED=$((NEW_FAILED + 1))
        echo "[$idx/$TOTAL] $id FAILED (exit $rc) after $(fmt_dur $dt); see $OUT/$id.log" >&2
    fi
    DONE_N=$((DONE_N + 1))
    DONE_S=$((DONE_S + dt))
    unset "RUN_ID[$pid]" "RUN_IDX[$pid]" "RUN_T0[$pid]" "RUN_CMD[$pid]"
}

wait_one() {
    local fin rc=0
    wait -n -p fin "${!RUN_ID[@]}" || rc=$?
    finish "$fin" "$rc"
}

for i in "${!IDS[@]}"; do
    id=${IDS[i]} n=$((i + 1))
    case ${STATE[i]} in
        exists) echo "[$n/$TOTAL] $id exists, skipped"; continue ;;
        failed) echo "[$n/$TOTAL] $id failed before, skipped (--retry-failed to run it again)"; continue ;;
        skip)
            reason=${FLAGS[i]#SKIP:}
            echo "[$n/$TOTAL] $id skipped: $reason"
            [[ -f $OUT/$id.skipped.json ]] || write_note "$OUT/$id.skipped.json" id "$id" reason "$reason"
            continue
            ;;
    esac
    while ((${#RUN_ID[@]} >= JOBS)); do wait_one; done
    left=$((TO_RUN - LAUNCHED))
    eta=""
    if ((DONE_N)); then
        par=$((left < JOBS ? left : JOBS))
        eta=", about $(fmt_dur $((DONE_S * left / DONE_N / par))) left"
    fi
    echo "[$n/$TOTAL] $id ... (elapsed $(fmt_dur $SECONDS)$eta)"
    read -ra flags <<<"${FLAGS[i]}"
    full=("${CMD[@]}" "$MODEL" "$CALIB" --eval "$EVAL" --nsamples "$NSAMPLES" "${flags[@]}" "${EXTRA_ARGS[@]}"
        --json "$OUT/$id.json" --analysis-dir "$OUT/analysis/$id")
    cmdline=$(printf '%q ' "${full[@]}")
    rm -f "$OUT/$id.failed.json" # a retry: the old failure no longer stands
    { echo "# $cmdline"; exec "${full[@]}"; } >"$OUT/$id.log" 2>&1 &
    RUN_ID[$!]=$id RUN_IDX[$!]=$n RUN_T0[$!]=$SECONDS RUN_CMD[$!]=$cmdline
    LAUNCHED=$((LAUNCHED + 1))
done
while ((${#RUN_ID[@]})); do wait_one; done
trap - INT TERM

failed=0
for id in "${IDS[@]}"; do [[ -f $OUT/$id.failed.json ]] && failed=$((failed + 1)); done
echo "sweep done in $(fmt_dur $SECONDS): $LAUNCHED run now, $((TOTAL - LAUNCHED)) present or skipped;" \
    "$failed failed ($NEW_FAILED in this run)"
"$PYTHON" "$HERE/report.py" "$OUT"
if ((failed)); then
    echo "$failed configuration(s) failed; see $OUT/*.failed.json, rerun with --retry-failed" >&2
    exit 1
fi
exit 0
}
