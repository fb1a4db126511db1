#!/usr/bin/env bash
# Runs kd's GPU code path (Burn's CubeCL kernels, fusion and autotune instead of kd's flex
# kernels) on the CPU, through Burn's CubeCL CPU runtime, for machines without a GPU:
# train, distil, evaluate, predict, compare, and a bf16 benchmark step, with a few images on a
# width-2 ResNet-18; training, distillation and evaluation must agree with the flex CPU path.
# Slow: about half an hour on 2 cores (CubeCL's CPU kernels are not built for speed).
#
#   scripts/setup-cuda-build.sh        # once: the LLVM that CubeCL's runtimes link
#   scripts/check-gpu-path-on-cpu.sh   # builds kd --features cubecl-cpu into target/cubecl-cpu
#
# KD=path uses a kd already built with --features cubecl-cpu. Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${KD:-}" ]; then
  CARGO_TARGET_DIR=target/cubecl-cpu cargo build --release --features cubecl-cpu
  KD=target/cubecl-cpu/release/kd
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# Two images of each class for eval and predict.
for class in data/mnist5k/*/; do
  images=("$class"*.png)
  mkdir -p "$out/few/$(basename "$class")"
  cp "${images[@]:0:2}" "$out/few/$(basename "$class")/"
done
fail() { echo "FAILED: $*" >&2; exit 1; }
step() { echo "== $1 ($(date +%T))"; }
common=(--data data/mnist5k --epochs 1 --batch-size 4 --image-size 32 --stem small --width 2
        --train-limit 16 --val-limit 8 --quiet)
# Each backend draws its own random initial weights, so both paths start from one exported
# set and must then agree on every loss (same images, same augmentation, same order).
agree() {
  python3 - "$1/metrics.json" "$2/metrics.json" <<'PY' || fail "$3 differs between cubecl-cpu and cpu"
import json, sys
cube, flex = (json.load(open(f))[-1] for f in sys.argv[1:])
for key in ("train_loss", "train_kd_loss", "val_loss"):
    if flex[key] is None:
        continue
    print(f"{key}: {cube[key]:.6f} on cubecl-cpu, {flex[key]:.6f} on cpu")
    assert abs(cube[key] - flex[key]) <= 1e-3 * max(1.0, abs(flex[key])), key
PY
}

step "initial weights (flex)"
"$KD" train "${common[@]}" --model resnet18 --out "$out/init"
"$KD" export --run "$out/init" --out "$out/init.safetensors" > /dev/null

step "train, against the flex CPU path"
"$KD" train "${common[@]}" --model resnet18 --init-from "$out/init.safetensors" --out "$out/teacher" --device cubecl-cpu
"$KD" train "${common[@]}" --model resnet18 --init-from "$out/init.safetensors" --out "$out/teacher-flex"
agree "$out/teacher" "$out/teacher-flex" train
python3 - "$out/teacher/metrics.json" "$out/teacher-flex/metrics.json" <<'PY' || fail "device memory not recorded"
import json, sys
cube, flex = (json.load(open(f))[-1] for f in sys.argv[1:])
print(f"peak device memory: {cube['peak_device_mib']:.1f} MiB on cubecl-cpu, {flex['peak_device_mib']} on cpu")
assert cube["peak_device_mib"] > 0 and flex["peak_device_mib"] is None
PY

step "distill (teacher logits stay on the device), against the flex CPU path"
"$KD" distill "${common[@]}" --model resnet18 --teacher "$out/teacher" --init-from "$out/init.safetensors" --out "$out/kd" --device cubecl-cpu
"$KD" distill "${common[@]}" --model resnet18 --teacher "$out/teacher" --init-from "$out/init.safetensors" --out "$out/kd-flex"
agree "$out/kd" "$out/kd-flex" distill

step "eval, against the flex CPU path"
"$KD" eval --run "$out/kd" --data "$out/few" --device cubecl-cpu --json > "$out/eval.json"
"$KD" eval --run "$out/kd" --data "$out/few" --device cpu --json > "$out/eval-flex.json"
python3 - "$out/eval.json" "$out/eval-flex.json" <<'PY' || fail "eval differs between cubecl-cpu and cpu"
import json, sys
cube, flex = (json.load(open(f)) for f in sys.argv[1:])
print(f"loss {cube['loss']:.6f} on cubecl-cpu, {flex['loss']:.6f} on cpu")
assert abs(cube["loss"] - flex["loss"]) < 1e-3 * max(1.0, abs(flex["loss"]))
assert abs(cube["accuracy"] - flex["accuracy"]) <= 1 / flex["images"]  # a near-tie may flip
PY

step "predict"
n=$("$KD" predict --run "$out/kd" "$out/few/3" --device cubecl-cpu | grep -c '\.png')
[ "$n" = 2 ] || fail "predict printed $n rows for 2 images"

step "compare"
"$KD" compare "$out/teacher" "$out/kd" --out "$out/report" --device cubecl-cpu > /dev/null
python3 -c "import json,sys; rows=json.load(open(sys.argv[1])); assert all(r['inference_device'].startswith('cubecl-cpu') and r['inference_images_per_second'] > 0 for r in rows), rows" \
  "$out/report/results.json" || fail "compare did not measure on cubecl-cpu"

step "bench bf16"
"$KD" bench --model resnet18 --batch 2 --image-size 32 --stem small --width 2 --steps 1 \
  --warmup 1 --device cubecl-cpu --precision bf16 --json > "$out/bench.json"
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); assert r['images_per_second'] > 0 and r['peak_device_mib'] > 0, r" \
  "$out/bench.json" || fail "bench reported no speed or device memory"
echo "the GPU code path works on CubeCL's CPU runtime"
