"""Checks kd's ONNX exports outside kd (run by hand, not in CI).

For each model family: trains a tiny run with the kd binary on the bundled digits (as RGB
PNGs at the model's input size, so that no resizing differs between kd and this script),
exports it with `kd export --out model.onnx`, checks the file with `onnx.checker`, runs it in
ONNX Runtime (CPU) and compares the class probabilities with `kd predict --json`; then the
same for a ResNet-18 at 224x224 on RGB images. Prints one line per model and exits 1 if any
probability differs in the 4th decimal.

    python -m venv /tmp/ortvenv && /tmp/ortvenv/bin/pip install onnx onnxruntime pillow numpy
    /tmp/ortvenv/bin/python bench/onnx_check.py target/release/kd /tmp/onnx-check
"""

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
DIGITS = ROOT / "data" / "mnist5k"

MODELS = [
    # name, extra kd flags, image size
    ("resnet18", ["--width", "8"], 64),
    ("resnet50", ["--width", "8"], 64),
    ("coatnet_0", ["--width", "8"], 64),
    ("mobilenet_v3_small", [], 64),
    ("mobilenet_v3_large", [], 64),
    ("efficientnet_b0", [], 64),
    ("resnet18", ["--width", "8"], 224),
]


def make_images(dst: pathlib.Path, size: int, per_class: int = 12) -> None:
    """Digits of classes 0-2 as RGB PNGs of side `size`, tinted per image."""
    rng = np.random.default_rng(size)
    for c in ["0", "1", "2"]:
        (dst / c).mkdir(parents=True, exist_ok=True)
        for i, src in enumerate(sorted((DIGITS / c).iterdir())[:per_class]):
            g = np.asarray(Image.open(src).convert("L").resize((size, size)), np.float32)
            tint = rng.uniform(0.3, 1.0, 3).astype(np.float32)
            rgb = np.clip(g[..., None] * tint + rng.uniform(0, 40, 3), 0, 255)
            Image.fromarray(rgb.astype(np.uint8), "RGB").save(dst / c / f"{i:03}.png")


def kd(binary: str, *args: str) -> str:
    out = subprocess.run([binary, *args], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"kd {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def check(binary: str, work: pathlib.Path, name: str, flags: list, size: int) -> float:
    data = work / f"images{size}"
    if not data.exists():
        make_images(data, size)
    run = work / f"{name}-{size}"
    shutil.rmtree(run, ignore_errors=True)
    kd(binary, "train", "--data", str(data), "--model", name, *flags, "--image-size",
       str(size), "--epochs", "1", "--batch-size", "8", "--quiet", "--out", str(run))
    model_path = work / f"{name}-{size}.onnx"
    kd(binary, "export", "--run", str(run), "--out", str(model_path))
    model = onnx.load(str(model_path))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    classes = json.loads(meta["kd.classes"])
    mean = np.array(json.loads(meta["kd.mean"]), np.float32).reshape(1, 3, 1, 1)
    std = np.array(json.loads(meta["kd.std"]), np.float32).reshape(1, 3, 1, 1)
    preds = json.loads(kd(binary, "predict", "--run", str(run), str(data), "--json",
                          "--top-k", str(len(classes))))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    paths = [p["path"] for p in preds]
    x = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) for p in paths])
    x = (x.transpose(0, 3, 1, 2) / 255.0 - mean) / std
    logits = session.run(["logits"], {"images": x.astype(np.float32)})[0]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    worst = 0.0
    for p, row in zip(preds, probs):
        for top in p["top"]:
            worst = max(worst, abs(top["probability"] - row[classes.index(top["class"])]))
    print(f"{name:20} {size:4}px  {len(paths)} images  onnx.checker ok  "
          f"largest probability difference kd vs ONNX Runtime {worst:.2e}")
    return worst


def main() -> None:
    binary, work = sys.argv[1], pathlib.Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    print(f"onnx {onnx.__version__}, onnxruntime {ort.__version__}")
    worst = max(check(binary, work, *m) for m in MODELS)
    if worst >= 5e-5:
        sys.exit(f"probabilities differ by {worst:.2e} (more than 4 decimals)")


if __name__ == "__main__":
    main()
