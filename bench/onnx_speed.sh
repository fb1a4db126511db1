#!/usr/bin/env bash
# Inference speed of a deployed ResNet-18 at 224x224 on the CPU, side by side in one run:
# kd (`kd bench --mode eval`), ONNX Runtime (CPU execution provider, on kd's export and on
# PyTorch's), and PyTorch eager (`inference_mode`), all with the same number of threads, at
# batch 1 (latency) and batch 16 (throughput). Run by hand, not in CI:
#
#   python -m venv /tmp/ortvenv
#   /tmp/ortvenv/bin/pip install onnx onnxruntime numpy pillow
#   /tmp/ortvenv/bin/pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu
#   PYTHON=/tmp/ortvenv/bin/python bench/onnx_speed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
KD=${KD:-target/release/kd}
PYTHON=${PYTHON:-python3}
THREADS=${THREADS:-2}
WORK=${WORK:-/tmp/kd-onnx-speed}
STEPS=${STEPS:-20}
MODEL=${MODEL:-resnet18}
mkdir -p "$WORK"
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS

# A run of the model at 224 px to export (one short epoch on the digits; the weights do not
# change the speed).
if [ ! -f "$WORK/run/checkpoints/best.bpk" ]; then
  rm -rf "$WORK/run"
  "$KD" train --data data/mnist5k --model "$MODEL" --image-size 224 --epochs 1 \
    --train-limit 16 --val-limit 16 --batch-size 16 --quiet --out "$WORK/run" >/dev/null
fi
"$KD" export --run "$WORK/run" --out "$WORK/kd.onnx" >/dev/null

for batch in 1 16; do
  kd_ips=$("$KD" bench --mode eval --model "$MODEL" --classes 10 --batch "$batch" \
    --image-size 224 --steps "$STEPS" --json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["images_per_second"])')
  "$PYTHON" - "$WORK" "$batch" "$THREADS" "$STEPS" "$kd_ips" "$MODEL" <<'EOF'
import statistics, sys, time
import numpy as np, onnxruntime as ort, torch, torchvision

work, batch, threads, steps, kd_ips, model_name = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
torch.set_num_threads(threads)
x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)

def timed(fn):
    for _ in range(3):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return batch / statistics.median(times)

net = getattr(torchvision.models, model_name)(num_classes=10).eval()
torch_onnx = f"{work}/torch.onnx"
torch.onnx.export(net, torch.from_numpy(x), torch_onnx, input_names=["images"],
                  output_names=["logits"], dynamic_axes={"images": {0: "batch"}}, opset_version=17,
                  dynamo=False)
def session(path):
    o = ort.SessionOptions(); o.intra_op_num_threads = threads; o.inter_op_num_threads = 1
    return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
ort_kd = session(f"{work}/kd.onnx"); ort_pt = session(torch_onnx)
r_kd = timed(lambda: ort_kd.run(["logits"], {"images": x}))
r_pt = timed(lambda: ort_pt.run(None, {ort_pt.get_inputs()[0].name: x}))
xt = torch.from_numpy(x)
with torch.inference_mode():
    r_eager = timed(lambda: net(xt))
print(f"{model_name} batch {batch:2} ({threads} threads), images/s: kd {kd_ips:.1f} | "
      f"ORT on kd's ONNX {r_kd:.1f} | ORT on PyTorch's ONNX {r_pt:.1f} | PyTorch eager {r_eager:.1f} "
      f"|| kd / ORT(kd) {kd_ips / r_kd:.2f}x, kd / ORT(torch) {kd_ips / r_pt:.2f}x, kd / eager {kd_ips / r_eager:.2f}x")
EOF
done
