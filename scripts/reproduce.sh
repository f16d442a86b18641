#!/usr/bin/env bash
# The paper's grid on one data set: RS and IDRS (r = 0.01, k = 20) at sigma_b in {0.12, 0.25, 0.5},
# each trained with `fit` and certified with `certify` (n0 = 100, n = 100,000, alpha = 0.001, every
# 20th test image). Resumable: a finished fit or certified point is never redone, a stopped fit
# resumes from its last.ckpt, and a certification finished with the same settings (certified.txt) is
# not started again. Use the wrappers: scripts/reproduce_cifar10.sh, scripts/reproduce_mnist.sh.
#
# Settings (environment variables; defaults give the paper's setup):
#   DATA      folder holding the torchvision data set (required)    OUT      output folder
#   M         paper (the authors' constant m) or ours (the training set's mean kNN distance)
#   SIGMAS    "0.12 0.25 0.5"     EPOCHS   90      DEVICES  GPUs per run (fit and certify)
#   N / N0 / SKIP / MAX           certification: samples, selection samples, every SKIP-th test point, at most MAX
#   EXTRA_FIT extra flags for fit (e.g. --data.download true)   PYTHON   the interpreter (default: python)
set -euo pipefail
dataset=${1:?usage: reproduce.sh cifar10|mnist}
: "${DATA:?set DATA to the folder holding the $dataset files (torchvision layout)}"
OUT=${OUT:-runs/$dataset}
M=${M:-paper}
SIGMAS=${SIGMAS:-0.12 0.25 0.5}
EPOCHS=${EPOCHS:-90}
DEVICES=${DEVICES:-1}
N=${N:-100000}; N0=${N0:-100}; SKIP=${SKIP:-20}; MAX=${MAX:-}
case "$dataset" in
  cifar10) ARCH=${ARCH:-resnet110}; BATCH=${BATCH:-400}; M_PAPER=5.0 ;;
  mnist)   ARCH=${ARCH:-lenet};     BATCH=${BATCH:-400}; M_PAPER=1.5 ;;
  *) echo "error: unknown data set $dataset (cifar10 or mnist)" >&2; exit 2 ;;
esac
case "$M" in
  paper) m_flags=(--model.sigma.m "$M_PAPER") ;;
  ours)  m_flags=() ;;
  *) echo "error: M must be paper or ours, got $M" >&2; exit 2 ;;
esac
accelerator=auto
if [ "$DEVICES" -gt 1 ]; then accelerator=gpu; fi

for sigma in $SIGMAS; do
  for kind in rs idrs; do
    name=${kind}_sb${sigma}
    [ "$kind" = idrs ] && name=${name}_m$M
    dir=$OUT/$name
    mkdir -p "$dir"
    if [ ! -s "$dir/checkpoint.txt" ]; then
      sigma_flags=(--model.sigma.sigma_base "$sigma")
      if [ "$kind" = rs ]; then
        sigma_flags=(--config rs "${sigma_flags[@]}")
      else
        sigma_flags+=(--model.sigma.semi_elasticity 0.01 --model.sigma.k 20 "${m_flags[@]}")
      fi
      resume=()
      last=$(find "$dir/fit" -name last.ckpt 2>/dev/null | head -n 1 || true)
      [ -n "$last" ] && resume=(--ckpt_path "$last")
      # shellcheck disable=SC2086
      "${PYTHON:-python}" -m lightning_idrs fit --config "$dataset" "${sigma_flags[@]}" --model.arch "$ARCH" \
          --model.optimizer.init_args.lr 0.1 --data.root "$DATA" --data.batch_size "$BATCH" --trainer.max_epochs "$EPOCHS" \
          --trainer.devices "$DEVICES" --trainer.logger false --trainer.default_root_dir "$dir/fit" \
          "${resume[@]}" ${EXTRA_FIT:-} 2>&1 | tee -a "$dir/fit.log"
      sed -n 's/^best checkpoint: //p' "$dir/fit.log" | tail -n 1 > "$dir/checkpoint.txt"
    fi
    certify=("${PYTHON:-python}" -m lightning_idrs certify --ckpt_path "$(cat "$dir/checkpoint.txt")" --certify.n "$N"
        --certify.n0 "$N0" --certify.skip "$SKIP" ${MAX:+--certify.max "$MAX"} --certify.out "$dir/certify"
        --certify.radii 0,0.25,0.5,0.75,1.0 --certify.accelerator "$accelerator" --certify.devices "$DEVICES"
        --wandb.mode disabled)
    if [ "$(cat "$dir/certified.txt" 2>/dev/null)" != "${certify[*]}" ]; then  # else: done, with these settings
      "${certify[@]}" 2>&1 | tee -a "$dir/certify.log"
      echo "${certify[*]}" > "$dir/certified.txt"
    fi
  done
done
cohen=()
[ "$dataset" = cifar10 ] && cohen=(--cohen)
"${PYTHON:-python}" "$(dirname "$0")/summarize_runs.py" "$OUT" --title "$dataset: RS vs IDRS (r = 0.01, k = 20, m = $M)" "${cohen[@]}"
