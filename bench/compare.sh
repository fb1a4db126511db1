#!/usr/bin/env bash
# Side-by-side throughput of kd (Burn) and PyTorch on this machine, same models and
# settings, one after the other. Needs a Python with torch and torchvision:
#   PYTHON=/path/to/python bench/compare.sh
# Prints a markdown table with the ratio kd / PyTorch. CASES_FILE=path replaces the list of
# "model mode batch size [teacher]" lines below (e.g. "coatnet_2 train 16 224",
# "resnet18 distill 128 224 coatnet_2").
# DEVICE=cuda runs both sides on the GPU; PRECISION=bf16 is kd's bf16 autocast against
# PyTorch's autocast bf16 + channels_last. KD=path uses a prebuilt kd (e.g. a --features cuda
# build carried to a GPU machine) instead of building one. REPEATS=n runs each side n times,
# alternating, and reports the median run (for machines with noisy neighbours). PT_TF32=1 lets
# PyTorch's f32 matmuls use TF32 tensor cores as its convolutions already do (on a GPU, Burn's
# autotuner may pick TF32 kernels for f32 products).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-5}
WARMUP=${WARMUP:-1}
DEVICE=${DEVICE:-cpu}
PRECISION=${PRECISION:-f32}
REPEATS=${REPEATS:-1}
pt_flags=()
if [ "${PT_TF32:-0}" = 1 ]; then pt_flags=(--tf32); fi
if [ -z "${KD:-}" ]; then
  cargo build --release --quiet
  KD=target/release/kd
fi
field() { "$PYTHON" -c "import json,sys; v=json.load(open('$1'))['$2']; print('' if v is None else f'{v:.0f}' if '$2'.startswith('peak') else v)" 2>/dev/null; }
default_cases() {
  cat <<'CASES'
resnet18 train 64 64
resnet18 train 128 32
resnet18 train 16 224
resnet18 eval 16 224
coatnet_0 train 16 224
CASES
}
# On a GPU the table adds each side's peak device memory (kd: its allocator's reserved pool;
# PyTorch: torch.cuda.max_memory_reserved).
mem_cols="" mem_rule=""
if [ "$DEVICE" != cpu ]; then mem_cols=" kd MiB | PyTorch MiB |" mem_rule="---:|---:|"; fi
echo "device $DEVICE, precision $PRECISION${pt_flags:+ (PyTorch ${pt_flags[*]})}, median of $STEPS steps, median of $REPEATS alternating runs"
echo
echo "| work | batch | size | kd img/s | PyTorch img/s | kd / PyTorch |$mem_cols"
echo "|---|---:|---:|---:|---:|---:|$mem_rule"
kd_json=$(mktemp) pt_json=$(mktemp)
trap 'rm -f "$kd_json" "$pt_json"' EXIT
{ if [ -n "${CASES_FILE:-}" ]; then cat "$CASES_FILE"; else default_cases; fi; } |
while read -r model mode batch size teacher; do
  [ -z "$model" ] && continue
  teacher=${teacher:-coatnet_0}
  common=(--model "$model" --mode "$mode" --batch "$batch" --image-size "$size" --steps "$STEPS"
          --warmup "$WARMUP" --teacher "$teacher" --device "$DEVICE" --precision "$PRECISION")
  # A failing case (e.g. out of memory) becomes a row saying so; the table goes on.
  kd_runs=() pt_runs=() failed=
  for _ in $(seq "$REPEATS"); do
    if ! "$KD" bench "${common[@]}" --json >"$kd_json" 2>/tmp/kd-compare.err ||
       ! ips=$(field "$kd_json" images_per_second); then
      echo "| $model $mode | $batch | $size | failed: $(tail -1 /tmp/kd-compare.err) | | |"
      failed=1 && break
    fi
    kd_runs+=("$ips")
    if ! "$PYTHON" bench/pytorch_reference.py "${common[@]}" ${pt_flags[@]+"${pt_flags[@]}"} >"$pt_json" 2>/tmp/kd-compare.err ||
       ! ips=$(field "$pt_json" images_per_second); then
      echo "| $model $mode | $batch | $size | ${kd_runs[0]} | failed: $(tail -1 /tmp/kd-compare.err) | |"
      failed=1 && break
    fi
    pt_runs+=("$ips")
  done
  [ -n "$failed" ] && continue
  median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
  kd_ips=$(median "${kd_runs[@]}")
  pt_ips=$(median "${pt_runs[@]}")
  ratio=$("$PYTHON" -c "print(f'{$kd_ips / $pt_ips:.2f}x')")
  mem=""
  if [ -n "$mem_cols" ]; then
    mem=" $(field "$kd_json" peak_device_mib) | $(field "$pt_json" peak_device_mib) |"
  fi
  printf '| %s %s | %s | %s | %.1f | %.1f | %s |%s\n' "$model" "$mode" "$batch" "$size" "$kd_ips" "$pt_ips" "$ratio" "$mem"
done
