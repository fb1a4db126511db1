"""A PyTorch CoAtNet with the structure and state-dict names of the reference code the
tutorial imports as `model.coatnet` (see tests/fixtures/README.md), for side-by-side
benchmarks and for checking `kd export` files in PyTorch.

`python bench/coatnet_reference.py --check tests/fixtures/coatnet_tiny.safetensors`
verifies it against the fixture (eval logits), so the benchmark compares like with like.
"""
import argparse

import torch
from torch import nn


class PreNorm(nn.Module):
    def __init__(self, dim, fn, norm):
        super().__init__()
        self.norm = norm(dim)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.norm(x))


class SE(nn.Module):
    def __init__(self, inp, oup, expansion=0.25):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        hidden = int(inp * expansion)
        self.fc = nn.Sequential(nn.Linear(oup, hidden, bias=False), nn.GELU(),
                                nn.Linear(hidden, oup, bias=False), nn.Sigmoid())

    def forward(self, x):
        b, c = x.shape[:2]
        return x * self.fc(self.avg_pool(x).view(b, c)).view(b, c, 1, 1)


def conv_3x3_bn(inp, oup, size, downsample=False):
    return nn.Sequential(nn.Conv2d(inp, oup, 3, 2 if downsample else 1, 1, bias=False),
                         nn.BatchNorm2d(oup), nn.GELU())


class MBConv(nn.Module):
    def __init__(self, inp, oup, size, downsample=False, expansion=4):
        super().__init__()
        self.downsample = downsample
        hidden = int(inp * expansion)
        if downsample:
            self.pool = nn.MaxPool2d(3, 2, 1)
            self.proj = nn.Conv2d(inp, oup, 1, 1, 0, bias=False)
        body = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 2 if downsample else 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.GELU(),
            SE(inp, hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))
        self.conv = PreNorm(inp, body, nn.BatchNorm2d)

    def forward(self, x):
        if self.downsample:
            return self.proj(self.pool(x)) + self.conv(x)
        return x + self.conv(x)


class Attention(nn.Module):
    def __init__(self, inp, oup, size, heads=8, dim_head=32):
        super().__init__()
        inner = heads * dim_head
        self.ih, self.iw = size
        self.heads, self.scale = heads, dim_head ** -0.5
        self.relative_bias_table = nn.Parameter(torch.zeros((2 * self.ih - 1) * (2 * self.iw - 1), heads))
        ys, xs = torch.meshgrid(torch.arange(self.ih), torch.arange(self.iw), indexing="ij")
        coords = torch.stack([ys.flatten(), xs.flatten()])
        rel = coords[:, :, None] - coords[:, None, :]
        index = (rel[0] + self.ih - 1) * (2 * self.iw - 1) + (rel[1] + self.iw - 1)
        self.register_buffer("relative_index", index.flatten().unsqueeze(1))
        self.to_qkv = nn.Linear(inp, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, oup), nn.Dropout(0.0))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        dots = q @ k.transpose(-1, -2) * self.scale
        bias = self.relative_bias_table.gather(0, self.relative_index.repeat(1, self.heads))
        dots = dots + bias.view(n, n, self.heads).permute(2, 0, 1).unsqueeze(0)
        out = dots.softmax(dim=-1) @ v
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(hidden, dim), nn.Dropout(0.0))

    def forward(self, x):
        return self.net(x)


class Transformer(nn.Module):
    def __init__(self, inp, oup, size, downsample=False):
        super().__init__()
        self.downsample = downsample
        if downsample:
            self.pool1 = nn.MaxPool2d(3, 2, 1)
            self.pool2 = nn.MaxPool2d(3, 2, 1)
            self.proj = nn.Conv2d(inp, oup, 1, 1, 0, bias=False)
        # Keys attn.1.norm / attn.1.fn.* and ff.1.norm / ff.1.fn.net.*, as in the reference,
        # whose Sequential also holds the (parameter-free) Rearrange layers at 0 and 2.
        self.attn = nn.Sequential(nn.Identity(), PreNorm(inp, Attention(inp, oup, size), nn.LayerNorm), nn.Identity())
        self.ff = nn.Sequential(nn.Identity(), PreNorm(oup, FeedForward(oup, inp * 4), nn.LayerNorm), nn.Identity())
        self.size = size

    def _tokens(self, block, x):
        b = x.shape[0]
        h, w = self.size
        y = block[1](x.flatten(2).transpose(1, 2))
        return y.transpose(1, 2).reshape(b, -1, h, w)

    def forward(self, x):
        if self.downsample:
            x = self.proj(self.pool1(x)) + self._tokens(self.attn, self.pool2(x))
        else:
            x = x + self._tokens(self.attn, x)
        return x + self._tokens(self.ff, x)


class CoAtNet(nn.Module):
    def __init__(self, size, num_blocks, channels, num_classes=1000, head_bias=False):
        super().__init__()
        ih, iw = size
        kinds = [conv_3x3_bn, MBConv, MBConv, Transformer, Transformer]
        inp = 3
        for s in range(5):
            stage_size = (ih // 2 ** (s + 1), iw // 2 ** (s + 1))
            layers = [kinds[s](inp if i == 0 else channels[s], channels[s], stage_size, downsample=(i == 0))
                      for i in range(num_blocks[s])]
            setattr(self, f"s{s}", nn.Sequential(*layers))
            inp = channels[s]
        self.fc = nn.Linear(channels[-1], num_classes, bias=head_bias)

    def forward(self, x):
        for s in range(5):
            x = getattr(self, f"s{s}")(x)
        return self.fc(x.mean(dim=(2, 3)))


CONFIGS = {
    "coatnet_0": ([2, 2, 3, 5, 2], [64, 96, 192, 384, 768]),
    "coatnet_1": ([2, 2, 6, 14, 2], [64, 96, 192, 384, 768]),
    "coatnet_2": ([2, 2, 6, 14, 2], [128, 128, 256, 512, 1026]),
    "coatnet_3": ([2, 2, 6, 14, 2], [192, 192, 384, 768, 1536]),
    "coatnet_4": ([2, 2, 12, 28, 2], [192, 192, 384, 768, 1536]),
}


def build(name, num_classes=12, size=224):
    blocks, channels = CONFIGS[name]
    return CoAtNet((size, size), blocks, channels, num_classes, head_bias=True)


def tiny():
    return CoAtNet((64, 64), [2, 2, 2, 2, 2], [16, 16, 32, 64, 128], 12, head_bias=True)


if __name__ == "__main__":
    from safetensors.torch import load_file

    p = argparse.ArgumentParser()
    p.add_argument("--check", required=True, help="coatnet_tiny.safetensors fixture")
    a = p.parse_args()
    fx = load_file(a.check)
    model = tiny()
    model.load_state_dict({k[6:]: v for k, v in fx.items() if k.startswith("model.")}, strict=True)
    model.eval()
    with torch.no_grad():
        err = (model(fx["input"]) - fx["expected_logits_eval"]).abs().max().item()
    print(f"max abs error vs fixture eval logits: {err:.2e}")
    assert err < 1e-4
