#!/usr/bin/env bash
# The GPU check, prepared to run in one go on an NVIDIA machine with a kd built here with
# `--features cuda` (scripts/setup-cuda-build.sh, then cargo build --release --features cuda):
#
#   KD=path/to/kd bench/gpu.sh            # kd only
#   KD=path/to/kd PYTHON=python3 bench/gpu.sh   # side by side, when that Python has torch
#
# Rows are the issue's reference table (synthetic 224x224 batches, Adam, median after warm-up)
# in f32 and in bf16 (kd: autocast; PyTorch: autocast bf16 + channels_last), then the demo's
# accuracy in f32 and bf16 on the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
KD=${KD:-target/release/kd}
STEPS=${STEPS:-10}
cases() {
  cat <<'CASES'
resnet18 train 128 224
resnet18 train 16 224
coatnet_2 train 128 224
coatnet_2 train 16 224
coatnet_0 train 128 224
resnet18 distill 128 224 coatnet_2
resnet18 eval 256 224
coatnet_2 eval 256 224
CASES
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
have_torch=0
if [ -n "${PYTHON:-}" ] && "$PYTHON" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  have_torch=1
fi
for precision in f32 bf16; do
  if [ "$have_torch" = 1 ]; then
    cases > /tmp/kd-gpu-cases
    KD=$KD DEVICE=cuda PRECISION=$precision STEPS=$STEPS WARMUP=3 CASES_FILE=/tmp/kd-gpu-cases bench/compare.sh
  else
    echo "device cuda, precision $precision (kd only: no PYTHON with CUDA torch)"
    echo "| work | batch | size | kd img/s | peak host RSS MiB |"
    echo "|---|---:|---:|---:|---:|"
    cases | while read -r model mode batch size teacher; do
      out=$("$KD" bench --model "$model" --mode "$mode" --batch "$batch" --image-size "$size" \
        --teacher "${teacher:-coatnet_0}" --device cuda --precision "$precision" \
        --steps "$STEPS" --warmup 3 --json 2>/tmp/kd-gpu.err) || { echo "| $model $mode | $batch | $size | failed: $(tail -1 /tmp/kd-gpu.err) | |"; continue; }
      echo "$out" | python3 -c "import json,sys; r=json.load(sys.stdin); print(f\"| $model $mode | $batch | $size | {r['images_per_second']:.1f} | {r['peak_rss_mib'] or 0:.0f} |\")"
    done
  fi
  echo
done
for precision in f32 bf16; do
  rm -rf "/tmp/kd-gpu-demo-$precision"
  start=$(date +%s)
  "$KD" demo --device cuda --precision "$precision" --out "/tmp/kd-gpu-demo-$precision" --quiet |
    grep -E "^\|" | tail -4
  echo "demo $precision on cuda: $(( $(date +%s) - start )) s"
done
