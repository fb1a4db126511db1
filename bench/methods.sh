#!/usr/bin/env bash
# Step time of every distillation method relative to Hinton's, side by side in one run:
#   bench/methods.sh            (KD=path uses a prebuilt kd; REPEATS=n alternates n rounds)
# Two cases, as the methods issue measures them: CoAtNet-0 (width 32) -> ResNet-18 (width 8)
# at 32x32, batch 64; and CoAtNet-2 -> ResNet-18 at 224x224, batch 16. Each round runs every
# method once, in turn, so that the machine's drift touches them alike; the table gives the
# median seconds per step over the rounds and the ratio to Hinton's.
set -euo pipefail
cd "$(dirname "$0")/.."
REPEATS=${REPEATS:-3}
if [ -z "${KD:-}" ]; then
  cargo build --release --quiet
  KD=target/release/kd
fi
methods=("hinton" "tutorial" "dkd" "dist" "nkd" "logit_std" "feature" "hinton+features")
cases=(
  "--teacher coatnet_0 --teacher-width 32 --model resnet18 --width 8 --stem small --image-size 32 --batch 64 --steps 10 --warmup 2"
  "--teacher coatnet_2 --model resnet18 --image-size 224 --batch 16 --steps 3 --warmup 1"
)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for c in "${!cases[@]}"; do
  for r in $(seq "$REPEATS"); do
    for m in "${methods[@]}"; do
      flags=(--method "${m%+features}")
      [ "$m" = "hinton+features" ] && flags+=(--feature-weight 1)
      # shellcheck disable=SC2086
      "$KD" bench --mode distill ${cases[$c]} "${flags[@]}" --json |
        python3 -c "import json,sys; print(json.load(sys.stdin)['seconds_per_step'])" >>"$tmp/$c-$m"
    done
  done
done
python3 - "$tmp" "${#cases[@]}" "${methods[@]}" <<'PY'
import statistics, sys
tmp, n, methods = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
names = ["CoAtNet-0 w32 -> ResNet-18 w8, 32x32, batch 64", "CoAtNet-2 -> ResNet-18, 224x224, batch 16"]
print("| method | " + " | ".join(f"{names[c]}: s/step | vs Hinton" for c in range(n)) + " |")
print("|---|" + "---:|---:|" * n)
med = {(c, m): statistics.median(float(x) for x in open(f"{tmp}/{c}-{m}")) for c in range(n) for m in methods}
for m in methods:
    cells = [f"{med[c, m]:.4f} | {med[c, m] / med[c, 'hinton']:.3f}x" for c in range(n)]
    print(f"| {m} | " + " | ".join(cells) + " |")
PY
