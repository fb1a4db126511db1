#!/usr/bin/env bash
# Inference speed of a deployed student on the CPU, side by side in one run: kd's inference
# plan (`kd bench --mode eval`) and kd's training-path forward (`--engine forward`), ONNX
# Runtime (CPU execution provider, on kd's export and on PyTorch's), and PyTorch eager
# (`inference_mode`), all with the same number of threads, at batch 1 (latency) and batch 16
# (throughput); then this CPU's single-precision GEMM peak (the best of PyTorch's and
# OpenBLAS's square products), for the GFLOP/s of each row. GFLOP/s count the direct
# convolutions' multiply-adds: kd's Winograd convolutions do fewer, so kd's rate can pass
# the GEMM peak. Run by hand, not in CI:
#
#   python -m venv /tmp/ortvenv
#   /tmp/ortvenv/bin/pip install onnx onnxruntime numpy pillow torch torchvision
#   PYTHON=/tmp/ortvenv/bin/python bench/onnx_speed.sh
#   MODELS="resnet18 mobilenet_v3_large" PYTHON=... bench/onnx_speed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
KD=${KD:-target/release/kd}
PYTHON=${PYTHON:-python3}
THREADS=${THREADS:-2}
WORK=${WORK:-/tmp/kd-onnx-speed}
STEPS=${STEPS:-20}
MODELS=${MODELS:-resnet18}
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS

for model in $MODELS; do
  mkdir -p "$WORK/$model"
  # A run of the model at 224 px to export (one short epoch on the digits; the weights do
  # not change the speed).
  if [ ! -f "$WORK/$model/run/checkpoints/best.bpk" ]; then
    rm -rf "$WORK/$model/run"
    "$KD" train --data data/mnist5k --model "$model" --image-size 224 --epochs 1 \
      --train-limit 16 --val-limit 16 --batch-size 16 --quiet --out "$WORK/$model/run" >/dev/null
  fi
  "$KD" export --run "$WORK/$model/run" --out "$WORK/$model/kd.onnx" >/dev/null
  for batch in 1 16; do
    kd_bench() {
      "$KD" bench --mode eval --model "$model" --classes 10 --batch "$batch" --image-size 224 \
        --steps "$STEPS" --warmup 3 --json "$@" \
        | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["images_per_second"])'
    }
    kd_plan=$(kd_bench)
    kd_forward=$(kd_bench --engine forward)
    "$PYTHON" - "$WORK/$model" "$batch" "$THREADS" "$STEPS" "$kd_plan" "$kd_forward" "$model" <<'PY'
import statistics, sys, time
import numpy as np, onnxruntime as ort, torch, torchvision

work, batch, threads, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
kd_plan, kd_forward, model_name = float(sys.argv[5]), float(sys.argv[6]), sys.argv[7]
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
# Multiply-adds per image, counted on the convolutions and linear layers.
macs = 0
def count(m, i, o):
    global macs
    if isinstance(m, torch.nn.Conv2d):
        macs += o.numel() // o.shape[0] * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
    elif isinstance(m, torch.nn.Linear):
        macs += m.in_features * m.out_features
hooks = [m.register_forward_hook(count) for m in net.modules()]
with torch.inference_mode():
    net(torch.zeros(1, 3, 224, 224))
for h in hooks:
    h.remove()
gflop = 2 * macs / 1e9
# This CPU's single-precision GEMM peak: the best of PyTorch's and NumPy's (OpenBLAS) square
# products at 2048 and 4096, same threads.
def gemm_rate(mm, a, b, n):
    for _ in range(2):
        mm(a, b)
    t = time.perf_counter()
    for _ in range(5):
        mm(a, b)
    return 2 * n**3 / ((time.perf_counter() - t) / 5) / 1e9
peak = max(
    max(gemm_rate(torch.mm, torch.randn(n, n), torch.randn(n, n), n) for n in (2048, 4096)),
    max(gemm_rate(np.matmul, *np.random.default_rng(n).random((2, n, n), dtype=np.float32), n)
        for n in (2048, 4096)),
)
rate = lambda r: f"{r:.1f} ({r * gflop:.0f} GFLOP/s, {r * gflop / peak:.0%})"
print(f"{model_name} batch {batch:2} ({threads} threads, {gflop:.2f} GFLOP/image, GEMM peak {peak:.0f} GFLOP/s), images/s: "
      f"kd plan {rate(kd_plan)} | kd forward {kd_forward:.1f} | ORT on kd's ONNX {rate(r_kd)} | "
      f"ORT on PyTorch's ONNX {r_pt:.1f} | PyTorch eager {r_eager:.1f} "
      f"|| kd / ORT(kd) {kd_plan / r_kd:.2f}x, kd / ORT(torch) {kd_plan / r_pt:.2f}x, "
      f"kd / eager {kd_plan / r_eager:.2f}x, plan / forward {kd_plan / kd_forward:.2f}x")
PY
  done
done
