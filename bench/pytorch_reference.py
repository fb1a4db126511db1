#!/usr/bin/env python3
"""PyTorch side of `bench/compare.sh`: the same measurement as `kd bench`.

Synthetic batches, torchvision ResNet or the reference CoAtNet (bench/coatnet_reference.py),
Adam, cross-entropy; median images/s over the timed steps after warm-up. Prints one JSON
object like `kd bench --json`.
"""
import argparse
import json
import statistics
import time

import torch
import torchvision


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--mode", choices=["train", "eval"], default="train")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--classes", type=int, default=12)
    a = p.parse_args()

    if a.model.startswith("coatnet"):
        import os
        import sys

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from coatnet_reference import build

        model = build(a.model, a.classes, a.image_size)
    else:
        model = getattr(torchvision.models, a.model)(num_classes=a.classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(a.batch, 3, a.image_size, a.image_size)
    y = torch.arange(a.batch) % a.classes
    model.train(a.mode == "train")
    times = []
    for step in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        if a.mode == "train":
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()
        else:
            with torch.inference_mode():
                model(x).sum().item()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
    sps = statistics.median(times)
    print(json.dumps({
        "what": f"{a.model} {a.mode} (PyTorch {torch.__version__})",
        "batch": a.batch,
        "image_size": a.image_size,
        "images_per_second": a.batch / sps,
        "seconds_per_step": sps,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
