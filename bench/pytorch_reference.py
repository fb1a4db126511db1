#!/usr/bin/env python3
"""PyTorch side of `bench/compare.sh`: the same measurement as `kd bench`.

Synthetic batches, torchvision ResNet or the reference CoAtNet (bench/coatnet_reference.py),
Adam, cross-entropy; median images/s over the timed steps after warm-up. Prints one JSON
object like `kd bench --json`. `--device cuda` runs on the GPU (synchronised before each
timing); `--precision bf16` is autocast bf16 with channels_last, as the issue's reference;
`--mode distill` is a KD step: the teacher's no-grad forward plus the student's step.
`--tf32` lets f32 matrix products use TF32 tensor cores too (PyTorch's default already does so
for cuDNN convolutions but not for matmuls; Burn's CUDA kernels may pick TF32 for both).
"""
import argparse
import json
import statistics
import time

import torch
import torchvision


def build(name, classes, size):
    if name.startswith("coatnet"):
        import os
        import sys

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from coatnet_reference import build as build_coatnet

        return build_coatnet(name, classes, size)
    return getattr(torchvision.models, name)(num_classes=classes)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--mode", choices=["train", "eval", "distill"], default="train")
    p.add_argument("--teacher", default="coatnet_0")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["f32", "bf16", "f16"], default="f32")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--classes", type=int, default=12)
    p.add_argument("--tf32", action="store_true", help="TF32 matmuls (convolutions: cuDNN's default)")
    a = p.parse_args()
    if a.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    device = torch.device(a.device)
    low = {"f32": None, "bf16": torch.bfloat16, "f16": torch.float16}[a.precision]
    fmt = torch.channels_last if low is not None else torch.contiguous_format
    model = build(a.model, a.classes, a.image_size).to(device, memory_format=fmt)
    teacher = None
    if a.mode == "distill":
        teacher = build(a.teacher, a.classes, a.image_size).to(device, memory_format=fmt).eval()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(a.batch, 3, a.image_size, a.image_size, device=device).to(memory_format=fmt)
    y = torch.arange(a.batch, device=device) % a.classes
    model.train(a.mode != "eval")
    autocast = lambda: torch.autocast(device.type, dtype=low, enabled=low is not None)  # noqa: E731
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for step in range(a.warmup + a.steps):
        sync()
        t0 = time.perf_counter()
        if a.mode == "eval":
            with torch.inference_mode(), autocast():
                model(x).sum().item()
        else:
            with autocast():
                logits = model(x)
                loss = torch.nn.functional.cross_entropy(logits, y)
                if teacher is not None:
                    with torch.no_grad():
                        soft = teacher(x).float()
                    t = 7.0
                    kl = torch.nn.functional.kl_div(
                        torch.log_softmax(logits.float() / t, 1),
                        torch.softmax(soft / t, 1),
                        reduction="batchmean",
                    )
                    loss = 0.7 * t * t * kl + 0.3 * loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()
        sync()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
    sps = statistics.median(times)
    print(json.dumps({
        "what": f"{a.model} {a.mode} (PyTorch {torch.__version__}, {a.device}, {a.precision})",
        "batch": a.batch,
        "image_size": a.image_size,
        "images_per_second": a.batch / sps,
        "seconds_per_step": sps,
        "peak_device_mib": (
            torch.cuda.max_memory_reserved(device) / 2**20 if device.type == "cuda" else None
        ),
        "threads": torch.get_num_threads(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_conv": torch.backends.cudnn.allow_tf32,
    }))


if __name__ == "__main__":
    main()
