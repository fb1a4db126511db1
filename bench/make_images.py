#!/usr/bin/env python3
"""Writes an image folder of photo-sized PNGs for `kd bench --data` (Python standard library only).

    python3 bench/make_images.py OUT [--classes 2] [--per-class 64] [--size 500] [--seed 0]

Each image is a smooth colour pattern with 5 bits of seeded noise per channel, so it
compresses about as badly as a photograph (about 0.5-0.7 MB per 500x500 PNG, like the Plant
Seedlings photos): decoding costs what it would on real data. Same seed, same files.
"""
import argparse
import math
import os
import random
import struct
import zlib

HIGH = bytes(v & 0xE0 for v in range(256))  # keep the top 3 bits of the pattern
LOW = bytes(v & 0x1F for v in range(256))  # and 5 bits of noise


def png(width, height, rgb):
    """PNG file bytes of 8-bit RGB rows (filter type 0)."""
    stride = width * 3
    raw = b"".join(b"\x00" + rgb[y * stride:(y + 1) * stride] for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
            + chunk(b"IEND", b""))


def image(rng, size):
    """A diagonal colour pattern (one period per image, random colours) plus noise."""
    colours = [[rng.randrange(256) for _ in range(3)] for _ in range(2)]
    period = rng.uniform(40, 160)
    pattern = bytearray()
    for i in range(2 * size):
        t = 0.5 + 0.5 * math.sin(2 * math.pi * i / period)
        pattern += bytes(int(a + (b - a) * t) for a, b in zip(*colours))
    rows = b"".join(bytes(pattern[3 * y:3 * (y + size)]) for y in range(size))
    noise = rng.randbytes(len(rows)).translate(LOW)
    n = len(rows)
    # The two parts share no bits, so OR-ing them as big integers adds them bytewise.
    pixels = int.from_bytes(rows.translate(HIGH), "big") | int.from_bytes(noise, "big")
    return png(size, size, pixels.to_bytes(n, "big"))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--per-class", type=int, default=64)
    p.add_argument("--size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = random.Random(a.seed)
    for c in range(a.classes):
        folder = os.path.join(a.out, f"class{c}")
        os.makedirs(folder, exist_ok=True)
        for i in range(a.per_class):
            with open(os.path.join(folder, f"img{i:04}.png"), "wb") as f:
                f.write(image(rng, a.size))


if __name__ == "__main__":
    main()
