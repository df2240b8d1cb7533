#!/usr/bin/env bash
# NEU-DET 3+3 on one H100/H200: teacher, joint, fine-tune, ERD, SD-IDD, the strongest single model (sdidd+) and two-models in
# <= 9 minutes, after a ~60 s CUDA smoke stage that stops the run with the error if any job fails.
#
# First, on a machine with the data (NEU-DET in $SDIDD_DATA or ../shared/data) and internet for one wheel:
#     python benchmarks/stage_gpu.py            # writes .stage/ (git-ignored, ~48 MiB) and prints the command
# Then, on the GPU machine (no internet needed), with the repository and its .stage/ copied there, from its root:
#     bash benchmarks/gpu_table.sh
# The report (neu-det_3+3_gpu.md / .json / _per_class.png: GPU, date, command and wall time inside) lands in $OUT.
#
# Extra arguments go to benchmarks/gpu_table.py, e.g. `--smoke-only`, `--parallel 2`, `--set train.batch_size=64`.
# On a machine without the stage (CI, a laptop): `bash benchmarks/gpu_table.sh --dry-run` (tiny, CPU).
# Outputs ($OUT, else outputs/gpu_table; at most 8 files, easy to copy back): neu-det_3+3_gpu.md,
# .json, _per_class.png, _sdidd_losses.png, logs.tar.gz (every job's log, log.csv, metrics) and run.log.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${STAGE:-.stage}
OUT=${OUT:-outputs/gpu_table}
BUDGET=${BUDGET:-560}   # seconds for gpu_table.py; unfinished jobs are stopped then (the device allows 600 a command)
mkdir -p "$OUT"
say() { echo "[gpu_table.sh] $*"; }
dry=0
for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done

# 1. pycocotools (the GPU image lacks it): install the staged wheel to /tmp; AP is never computed by hand.
if ! python3 -c "import pycocotools" 2>/dev/null; then
    whl=$(ls "$STAGE"/wheels/pycocotools-*.whl 2>/dev/null | head -n 1)
    if [ -z "$whl" ]; then
        say "error: pycocotools is not installed and $STAGE/wheels holds no wheel: run python benchmarks/stage_gpu.py first" \
            "(the evaluation needs pycocotools)"
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sdidd_site "$whl" || exit 2
    export PYTHONPATH=/tmp/sdidd_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}   # sdidd from this checkout, not installed

# 2. NEU-DET from the stage (unless SDIDD_DATA is set), 3. the staged backbone weights.
set_args=()
if [ "$dry" = 0 ]; then
    if [ -z "${SDIDD_DATA:-}" ]; then
        if [ ! -f "$STAGE/NEU-DET.tar.gz" ]; then
            say "error: $STAGE/NEU-DET.tar.gz missing and SDIDD_DATA unset: run python benchmarks/stage_gpu.py first"; exit 2
        fi
        mkdir -p /tmp/sdidd_data && tar xzf "$STAGE/NEU-DET.tar.gz" -C /tmp/sdidd_data || exit 2
        export SDIDD_DATA=/tmp/sdidd_data
    fi
    weights=$(ls "$STAGE"/*_body.pth 2>/dev/null | head -n 1)
    [ -n "$weights" ] && set_args=(--set "model.pretrained=$PWD/$weights")
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
say "python $(python3 -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())')"

export PYTHONUNBUFFERED=1
timeout -k 10 $((BUDGET + 25)) python3 benchmarks/gpu_table.py --out "$OUT" --budget "$BUDGET" \
    --command "bash benchmarks/gpu_table.sh $*" ${set_args[@]+"${set_args[@]}"} "$@" 2>&1 | tee "$OUT/run.log"
rc=${PIPESTATUS[0]}
say "exit $rc (0: table written; 2: smoke stage failed, see above; 3: full stage failed or out of time)"
exit "$rc"
