#!/usr/bin/env bash
# The GPU check of issue 25, in one log and under 10 minutes on one H200-class GPU:
#
#     bash scripts/gpu_check.sh gpu_check.log
#
# doctor --gpu; benchmarks/bench_gpu.py (its preset); the kNN GPU benchmark if this checkout has one; fit
# --config mnist5k for 3 epochs on the GPU; certify 100 of its test points at n = 100,000 eager fp32, eager
# bf16-mixed and compiled (the GPU default), with the rows compared; the tests marked gpu; the fast test tier.
# Each section prints its exit code and seconds and the script goes on after a failure. Every section runs
# under a time limit, and none may run past the whole budget (BUDGET seconds, default 570), so the script
# ends in time; a section cut short says so (exit 124). Runs from a checkout with `python3 -m
# lightning_idrs` (no install of the package, nothing on PATH, no network): the checkout goes first on
# PYTHONPATH, in front of whatever PYTHONPATH holds (e.g. packages installed with pip --target).
set -u
LOG=${1:?usage: bash scripts/gpu_check.sh LOG}
PYTHON=${PYTHON:-python3}
BUDGET=${BUDGET:-570}
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=offline WANDB_SILENT=true
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
mkdir -p "$(dirname "$LOG")" && : > "$LOG" || exit 2
exec > >(tee -a "$LOG") 2>&1
START=$(date +%s)

section() {  # section NAME LIMIT COMMAND...: run COMMAND for at most LIMIT seconds (and within the budget)
    local name=$1 limit=$2 began left code
    shift 2
    began=$(date +%s)
    left=$((BUDGET - (began - START)))
    ((left < limit)) && limit=$left
    if ((limit < 5)); then
        echo "=== $name: skipped, the ${BUDGET} s budget is spent"
        return 0
    fi
    echo "=== $name (at most ${limit} s): $*"
    timeout --kill-after=5 "$limit" "$@"
    code=$?
    ((code == 124 || code == 137)) && echo "(cut short after ${limit} s)"
    echo "=== $name: exit $code, $(($(date +%s) - began)) s (total $(($(date +%s) - START)) s)"
    return 0
}

echo "gpu_check: $(date -u +%FT%TZ), checkout $(git rev-parse --short HEAD 2>/dev/null || echo '?'), work folder $WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
"$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda",
torch.version.cuda, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name())'

section "doctor --gpu" 35 "$PYTHON" -m lightning_idrs doctor --gpu

section "bench_gpu (preset)" 170 "$PYTHON" benchmarks/bench_gpu.py

if [ -f benchmarks/bench_knn_gpu.py ]; then
    section "bench_knn_gpu" 25 "$PYTHON" benchmarks/bench_knn_gpu.py --cpu-rows 500
else
    echo "=== bench_knn_gpu: skipped, this checkout has no benchmarks/bench_knn_gpu.py"
fi

section "fit --config mnist5k, 3 epochs on the GPU" 60 "$PYTHON" -m lightning_idrs fit --config mnist5k \
    --trainer.max_epochs 3 --trainer.accelerator gpu --trainer.logger false --trainer.enable_progress_bar false \
    --trainer.default_root_dir "$WORK/fit"
CKPT=$(ls "$WORK"/fit/checkpoints/best-*.ckpt 2>/dev/null | head -n 1)

CERTIFY=(--certify.max 100 --certify.n 100000 --certify.accelerator gpu --wandb.mode disabled)
if [ -n "$CKPT" ]; then
    section "certify eager fp32" 50 "$PYTHON" -m lightning_idrs certify --ckpt_path "$CKPT" "${CERTIFY[@]}" \
        --certify.compile none --certify.out "$WORK/eager"
    section "certify eager bf16-mixed" 50 "$PYTHON" -m lightning_idrs certify --ckpt_path "$CKPT" "${CERTIFY[@]}" \
        --certify.compile none --certify.precision bf16-mixed --certify.out "$WORK/bf16"
    section "certify compiled (the GPU default)" 90 "$PYTHON" -m lightning_idrs certify --ckpt_path "$CKPT" \
        "${CERTIFY[@]}" --certify.out "$WORK/compiled"
    section "rows compared" 15 "$PYTHON" - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
from lightning_idrs.tsv_log import read_tsv
work = Path(sys.argv[1])
runs = {name: read_tsv(work / name / "certify.tsv") for name in ("eager", "bf16", "compiled")
        if (work / name / "certify.tsv").is_file()}
for name in runs:
    settings = json.loads((work / name / "settings.json").read_text())
    summary = work / name / "summary.json"
    acr = json.loads(summary.read_text())["acr"] if summary.is_file() else float("nan")
    print(f"{name:>8}: {len(runs[name]['idx'])} rows, ACR {acr:.4f}, precision {settings['precision']}, "
          f"compile {settings.get('compile', 'none')}, mean time per point "
          f"{np.mean(runs[name]['time']) if len(runs[name]['time']) else float('nan'):.3f} s")
for other in ("bf16", "compiled"):
    if "eager" in runs and other in runs and len(runs["eager"]["idx"]) \
            and np.array_equal(runs["eager"]["idx"], runs[other]["idx"]):
        a, b = runs["eager"], runs[other]
        differ = np.zeros(len(a["idx"]), dtype=bool)
        for key in ("predict", "radius", "correct", "sigma", "p_a_lower", "samples"):
            differ |= a[key] != b[key]
        print(f"eager fp32 vs {other}: {int(differ.sum())} of {len(differ)} rows differ (prediction differs in "
              f"{int((a['predict'] != b['predict']).sum())}, max |p_a_lower difference| "
              f"{float(np.abs(a['p_a_lower'] - b['p_a_lower']).max()):.2e})")
EOF
else
    echo "=== certify: skipped, the fit wrote no best-*.ckpt under $WORK/fit/checkpoints"
fi

section "pytest -m gpu" 90 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider -rs
section "pytest fast tier, GPU visible" 150 "$PYTHON" -m pytest -m "not slow and not gpu" -q -p no:cacheprovider
echo "gpu_check: done in $(($(date +%s) - START)) s; log $LOG"
