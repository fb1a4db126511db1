#!/usr/bin/env bash
# The GPU check, prepared to run in one go on an NVIDIA machine with a kd built here with
# `--features cuda` (scripts/setup-cuda-build.sh, then cargo build --release --features cuda):
#
#   KD=path/to/kd bench/gpu.sh                  # kd only
#   KD=path/to/kd PYTHON=python3 bench/gpu.sh   # side by side, when that Python has torch
#
# Rows are the issue's reference table (synthetic 224x224 batches, Adam, median after warm-up)
# in f32 and in bf16 (kd: autocast; PyTorch: autocast bf16 + channels_last), the issue's
# targets first, so a run cut short by the device's time limit still answers them. Then the
# batch-16 rows the tutorial's study runs at, the input pipeline's img/s on this machine's
# CPUs, and the demo's accuracy in f32 and bf16 on the GPU. Each case is cut off after
# CASE_TIMEOUT seconds (default 180) and reported as such.
# Precision "f32-tf32" is kd in f32 against PyTorch f32 with TF32 matmuls (--tf32): Burn's
# autotuner may run f32 products on TF32 tensor cores, PyTorch's default only its convolutions.
# For a dry run elsewhere: DEVICE=cpu GPU_CASES=file (lines "precision model mode batch size
# [teacher]") DEMO=0.
set -uo pipefail
cd "$(dirname "$0")/.."
KD=${KD:-target/release/kd}
STEPS=${STEPS:-10}
CASE_TIMEOUT=${CASE_TIMEOUT:-180}
DEVICE=${DEVICE:-cuda}
# precision model mode batch size [teacher]
cases() {
  if [ -n "${GPU_CASES:-}" ]; then cat "$GPU_CASES"; return; fi
  cat <<'CASES'
f32 resnet18 train 128 224
bf16 resnet18 train 128 224
f32 coatnet_2 train 128 224
f32 resnet18 distill 128 224 coatnet_2
bf16 coatnet_2 train 128 224
bf16 resnet18 distill 128 224 coatnet_2
f32 coatnet_2 train 16 224
f32 resnet18 train 16 224
f32 resnet18 distill 16 224 coatnet_2
f32-tf32 coatnet_2 train 128 224
f32-tf32 resnet18 train 128 224
f32 coatnet_0 train 128 224
f32 resnet18 eval 256 224
f32 coatnet_2 eval 256 224
bf16 coatnet_2 train 16 224
bf16 resnet18 train 16 224
bf16 coatnet_0 train 128 224
bf16 resnet18 eval 256 224
bf16 coatnet_2 eval 256 224
CASES
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
have_torch=0
if [ -n "${PYTHON:-}" ] && "$PYTHON" -c "import torch; assert '$DEVICE' == 'cpu' or torch.cuda.is_available()" 2>/dev/null; then
  have_torch=1
fi
if [ "$have_torch" = 1 ]; then
  echo "| precision | work | batch | size | kd img/s | PyTorch img/s | kd / PyTorch | kd MiB | PyTorch MiB |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
else
  echo "kd only (no PYTHON with CUDA torch)"
  echo "| precision | work | batch | size | kd img/s | kd MiB |"
  echo "|---|---|---:|---:|---:|---:|"
fi
one_case=$(mktemp)
cases | while read -r label model mode batch size teacher; do
  precision=${label%-tf32} pt_tf32=0
  if [ "$precision" != "$label" ]; then
    # Only PyTorch's side differs from the f32 row: nothing to run without it.
    [ "$have_torch" = 1 ] || continue
    pt_tf32=1
  fi
  if [ "$have_torch" = 1 ]; then
    echo "$model $mode $batch $size $teacher" > "$one_case"
    KD=$KD DEVICE=$DEVICE PRECISION=$precision PT_TF32=$pt_tf32 STEPS=$STEPS WARMUP=3 CASES_FILE=$one_case \
      timeout "$CASE_TIMEOUT" bench/compare.sh | grep -E '^\| [^ ]+ (train|eval|distill) \|' | sed "s/^/| $label /" ||
      echo "| $label | $model $mode | $batch | $size | timed out or failed | | | | |"
  else
    out=$(timeout "$CASE_TIMEOUT" "$KD" bench --model "$model" --mode "$mode" --batch "$batch" \
      --image-size "$size" --teacher "${teacher:-coatnet_0}" --device "$DEVICE" --precision "$precision" \
      --steps "$STEPS" --warmup 3 --json 2>/tmp/kd-gpu.err) ||
      { echo "| $label | $model $mode | $batch | $size | failed: $(tail -1 /tmp/kd-gpu.err) | |"; continue; }
    echo "$out" | python3 -c "import json,sys; r=json.load(sys.stdin); print(f\"| $label | $model $mode | $batch | $size | {r['images_per_second']:.1f} | {'-' if r['peak_device_mib'] is None else round(r['peak_device_mib'])} |\")"
  fi
done
rm -f "$one_case"
echo
# The input pipeline on this machine's CPUs, next to the GPU's img/s above: photo-sized PNGs
# (bench/make_images.py), decoded and augmented as in the tutorial, then served from the cache.
images=/tmp/kd-gpu-images
if python3 bench/make_images.py "$images" --per-class 64; then
  for cache in off resized; do
    timeout "$CASE_TIMEOUT" "$KD" bench --data "$images" --image-size 224 --batch 32 --steps 3 --warmup 1 --cache-images "$cache" ||
      echo "data pipeline ($cache cache) failed"
  done
fi
echo
[ "${DEMO:-1}" = 0 ] && exit 0
for precision in f32 bf16; do
  rm -rf "/tmp/kd-gpu-demo-$precision"
  start=$(date +%s)
  timeout 300 "$KD" demo --device "$DEVICE" --precision "$precision" --out "/tmp/kd-gpu-demo-$precision" --quiet |
    grep -E "^\|" | tail -4
  echo "demo $precision on $DEVICE: $(( $(date +%s) - start )) s"
done
