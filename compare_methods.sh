#!/usr/bin/env bash
# Run the method matrix and build the report: miq/sweep/cli.py does it, with the same flags (see
# --help or its docstring for the contract: resumable, failures recorded, SIGINT/SIGTERM stop everything it
# started).
#
#   ./compare_methods.sh                                   # toy model, offline, a few minutes on a laptop
#   ./compare_methods.sh --model facebook/opt-125m --calib c4 --eval wikitext2,c4 \
#       --sparsities "0.5" --groups "16 50" --wbits "3 4" --out results/opt125m --jobs 2
#   ./compare_methods.sh --model facebook/opt-1.3b --calib c4 --seeds "0 1 2" --out /shared/results/opt1.3b \
#       --executor slurm --slurm-partition gpu --slurm-time 2:00:00 --slurm-array-parallelism 16
#                                                          # one Slurm job per configuration (docs/workflow.md)
#
# PYTHON: the interpreter (default python3, else python).
if [[ -z ${PYTHON:-} ]]; then
    PYTHON=python3
    command -v python3 >/dev/null || PYTHON=python
fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m miq.sweep "$@"
