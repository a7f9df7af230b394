"""Write the small ONNX files of tests/data/dynamo/ with torch's default exporter.

``torch.onnx.export(..., dynamo=True)`` (the default since torch 2.9) writes graphs unlike the
TorchScript exporter's: opset 18+, BatchNorm folded into the convolutions of an eval-mode
model, nodes named after the FX graph ("node_Conv_12", "n4"), attention decomposed into
MatMul/Softmax. It needs the ``onnxscript`` package, which neither graphshape nor its tests
install, so the exports are recorded here once and the tests only read them
(tests/test_onnx_dynamo_exports.py). The models are defined here; the tests build the same
ones (same seeds) to compare the PyTorch path with the ONNX one.

Regenerate (needs ``pip install onnxscript``):  python tests/data/make_dynamo_exports.py
"""

from __future__ import annotations

import contextlib
import io
import os

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dynamo")


class TinyResNet(nn.Module):
    """torchvision's BasicBlock in a ResNet of widths 8 and 16 (a stem with max pooling, an
    identity block, a stride-2 block with a 1x1 projection)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.blocks = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8),
                                    BasicBlock(8, 16, stride=2, downsample=down))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class _Block(nn.Module):
    """A pre-norm transformer block (vit's encoder layer, small)."""

    def __init__(self, dim):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding, a learned position embedding, two pre-norm blocks, a final LayerNorm,
    mean over tokens, a head. nn.MultiheadAttention is an opaque call from PyTorch; the
    exporter writes it out as MatMul/Softmax."""

    def __init__(self, dim=16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, stride=8)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        self.blocks = nn.Sequential(_Block(dim), _Block(dim))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


#: file stem -> (model class, example input shape)
MODELS = {"tiny_resnet": (TinyResNet, (2, 3, 32, 32)), "tiny_vit": (TinyViT, (2, 3, 32, 32))}


def build(name: str):
    """The model (eval mode, seed 0) and its example input (seed 1)."""
    cls, shape = MODELS[name]
    torch.manual_seed(0)
    model = cls().eval()
    torch.manual_seed(1)
    return model, torch.randn(*shape)


def main():
    os.makedirs(HERE, exist_ok=True)
    for name in MODELS:
        model, x = build(name)
        path = os.path.join(HERE, f"{name}.onnx")
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
            torch.onnx.export(model, (x,), path, dynamo=True, external_data=False,
                              input_names=["x"], output_names=["logits"])
        print(f"wrote {path} ({os.path.getsize(path)} bytes), torch {torch.__version__}")


if __name__ == "__main__":
    main()
