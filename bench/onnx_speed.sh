#!/usr/bin/env bash
# Inference speed of a deployed student on the CPU, side by side in one run: kd's inference
# plan (`kd bench --mode eval`) and kd's training-path forward (`--engine forward`), ONNX
# Runtime (CPU execution provider, on kd's export and on PyTorch's), and PyTorch eager
# (`inference_mode`), all with the same number of threads, at batch 1 (latency) and batch 16
# (throughput); then this CPU's single-precision GEMM peak (the best of PyTorch's and
# OpenBLAS's square products), for the GFLOP/s of each row. GFLOP/s count the direct
# convolutions' multiply-adds: kd's Winograd convolutions do fewer, so kd's rate can pass
# the GEMM peak. This machine's speed drifts (other tenants): each of ROUNDS rounds times every
# engine back to back, and the table gives each engine's median over the rounds and the
# ratios of the medians (with each round's kd / ORT ratio). Run by hand, not in CI:
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
STEPS=${STEPS:-20}  # batches of 16 images (batch 1 runs 16 times the steps)
ROUNDS=${ROUNDS:-3}
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
    "$PYTHON" - "$WORK/$model" "$batch" "$THREADS" "$STEPS" "$model" "$KD" "$ROUNDS" <<'PY'
import json, statistics, subprocess, sys, time
import numpy as np, onnxruntime as ort, torch, torchvision

work, batch, threads, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
# STEPS batches of 16 images' worth at every batch size: a batch-1 timing of a few
# milliseconds per step would otherwise last a fraction of a second, at the mercy of
# whatever else runs on the machine in that moment.
steps = max(1, steps * 16 // batch)
model_name, kd, rounds = sys.argv[5], sys.argv[6], int(sys.argv[7])
torch.set_num_threads(threads)
x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)

def timed(fn):
    for _ in range(3):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return batch / statistics.median(times)

def kd_bench(*extra):
    out = subprocess.run([kd, "bench", "--mode", "eval", "--model", model_name, "--classes", "10",
                          "--batch", str(batch), "--image-size", "224", "--steps", str(steps),
                          "--warmup", "3", "--json", *extra], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out)["images_per_second"]

net = getattr(torchvision.models, model_name)(num_classes=10).eval()
torch_onnx = f"{work}/torch.onnx"
torch.onnx.export(net, torch.from_numpy(x), torch_onnx, input_names=["images"],
                  output_names=["logits"], dynamic_axes={"images": {0: "batch"}}, opset_version=17,
                  dynamo=False)
def session(path):
    o = ort.SessionOptions(); o.intra_op_num_threads = threads; o.inter_op_num_threads = 1
    return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
ort_kd = session(f"{work}/kd.onnx"); ort_pt = session(torch_onnx)
xt = torch.from_numpy(x)
engines = {
    "kd plan": lambda: kd_bench(),
    "kd forward": lambda: kd_bench("--engine", "forward"),
    "ORT (kd)": lambda: timed(lambda: ort_kd.run(["logits"], {"images": x})),
    "ORT (torch)": lambda: timed(lambda: ort_pt.run(None, {ort_pt.get_inputs()[0].name: x})),
}
def eager():
    with torch.inference_mode():
        return timed(lambda: net(xt))
engines["eager"] = eager
runs = {name: [] for name in engines}
for _ in range(rounds):
    for name, run in engines.items():
        time.sleep(0.5)  # the previous engine's threads stop spinning
        runs[name].append(run())
med = {name: statistics.median(r) for name, r in runs.items()}
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
per_round = ", ".join(f"{p / o:.2f}" for p, o in zip(runs["kd plan"], runs["ORT (kd)"]))
print(f"{model_name} batch {batch:2} ({threads} threads, {gflop:.2f} GFLOP/image, GEMM peak {peak:.0f} GFLOP/s), "
      f"images/s, median of {rounds} rounds: kd plan {rate(med['kd plan'])} | kd forward {med['kd forward']:.1f} | "
      f"ORT on kd's ONNX {rate(med['ORT (kd)'])} | ORT on PyTorch's ONNX {med['ORT (torch)']:.1f} | "
      f"PyTorch eager {med['eager']:.1f} "
      f"|| kd / ORT(kd) {med['kd plan'] / med['ORT (kd)']:.2f}x (rounds: {per_round}), "
      f"kd / ORT(torch) {med['kd plan'] / med['ORT (torch)']:.2f}x, "
      f"kd / eager {med['kd plan'] / med['eager']:.2f}x, plan / forward {med['kd plan'] / med['kd forward']:.2f}x")
PY
  done
done
