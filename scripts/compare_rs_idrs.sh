#!/usr/bin/env bash
# Train RS and IDRS at the same sigma_b, certify both on the same test points, overlay the curves.
#   bash scripts/compare_rs_idrs.sh [DATA] [OUT] [extra certify flags...]
# DATA: digits (default) or mnist5k (no download), mnist or cifar10 (pass --data.root via FIT_ARGS).
# Example: FIT_ARGS="--data.root ~/data" bash scripts/compare_rs_idrs.sh cifar10 runs/cifar10 --certify.skip 20
set -euo pipefail
data=${1:-digits}
out=${2:-runs/${data}_compare}
shift $(( $# > 2 ? 2 : $# )) || true
mkdir -p "$out"

for kind in rs idrs; do
  configs=(--config "$data")
  [ "$kind" = rs ] && configs+=(--config rs)   # the packaged RS override keeps the data set's sigma_b
  python -m lightning_idrs fit "${configs[@]}" \
      --trainer.default_root_dir "$out/$kind" ${FIT_ARGS:-} | tee "$out/$kind.fit.log"
  ckpt=$(sed -n 's/^best checkpoint: //p' "$out/$kind.fit.log" | tail -n 1)
  compare=()
  [ "$kind" = idrs ] && compare=(--certify.compare "$out/rs/certify/certify.tsv")
  python -m lightning_idrs certify --ckpt_path "$ckpt" --certify.out "$out/$kind/certify" "${compare[@]}" "$@"
done
echo "RS vs IDRS curves: $out/idrs/certify/certified_accuracy.png"
