"""Shaped models work with PyTorch's compilers: torch.compile matches eager, and
torch.export.export captures a shaped torchvision ResNet-50 whose exported program gives
the eager outputs."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import graphshape


def _small_resnet_like() -> torch.nn.Module:
    """conv-bn-relu stem, a residual block, pooling, linear head."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.bn1 = torch.nn.BatchNorm2d(8)
            self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.bn2 = torch.nn.BatchNorm2d(8)

        def forward(self, x):
            h = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(x + self.bn2(self.conv2(h)))

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        Block(), Block(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 5))


@pytest.fixture(scope="module")
def shaped_small():
    torch.set_num_threads(1)
    return graphshape.shape(_small_resnet_like(), torch.randn(2, 3, 8, 8), method="DKS", seed=0)


def test_torch_compile_aot_eager_matches_eager(shaped_small):
    torch._dynamo.reset()
    x = torch.randn(3, 3, 8, 8)
    compiled = torch.compile(shaped_small, backend="aot_eager", fullgraph=True)
    eager = shaped_small(x)
    torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
    # and gradients flow through the compiled module the same way
    compiled(x).square().sum().backward()
    grads = [p.grad.clone() for p in shaped_small.parameters()]
    shaped_small.zero_grad()
    shaped_small(x).square().sum().backward()
    for got, want in zip(grads, (p.grad for p in shaped_small.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    shaped_small.zero_grad()


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None,
                    reason="inductor on CPU needs a C++ compiler")
def test_torch_compile_inductor_matches_eager(shaped_small):
    torch._dynamo.reset()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        compiled = torch.compile(shaped_small, backend="inductor", fullgraph=True)
        torch.testing.assert_close(compiled(x), shaped_small(x), rtol=1e-4, atol=1e-5)


def test_torch_export_of_shaped_resnet50():
    import torchvision

    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    shaped = graphshape.shape(torchvision.models.resnet50(weights=None), x, seed=0).eval()
    exported = torch.export.export(shaped, (x,))
    # the shaped model has no batch norm left, and its transformed activations are captured
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in t for t in targets)
    assert any("leaky_relu" in t for t in targets)
    with torch.no_grad():
        want = shaped(x)
        got = exported.module()(x)
        other = torch.randn(2, 3, 32, 32)
        # float32 rounding: the exported program's kernels may sum in another order (on an
        # AMD EPYC, 1.3e-05 apart at an output of 0.23)
        tol = {"rtol": 1e-4, "atol": 1e-5 * float(want.abs().max())}
        torch.testing.assert_close(exported.module()(other), shaped(other), **tol)
    torch.testing.assert_close(got, want, **tol)
    assert torch.isfinite(got).all()
