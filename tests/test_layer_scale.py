"""Layer scales (``x + gamma * f(x)``, gamma initialized to 1e-6) are set to 1 at shaping:
a normalized sum assumes the branch carries q ~ 1. Before, torchvision's convnext_tiny was
shaped with its layer scales and the residual stream's q fell by w² = 1/4 per block."""

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

import graphshape


class Block(nn.Module):
    """ConvNeXt's block, small: depthwise conv, pointwise MLP, layer scale, residual."""

    def __init__(self, dim=16, reshaped_gamma=False):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.mlp = nn.Sequential(nn.Conv2d(dim, 4 * dim, 1), nn.GELU(), nn.Conv2d(4 * dim, dim, 1))
        self.reshaped_gamma = reshaped_gamma
        shape = (dim,) if reshaped_gamma else (dim, 1, 1)
        self.gamma = nn.Parameter(torch.full(shape, 1e-6))
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        gamma = self.gamma.reshape(1, -1, 1, 1) if self.reshaped_gamma else self.gamma
        return x + self.drop(gamma * self.mlp(self.dw(x)))


def _net(depth=8, **kwargs):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1),
                         *[Block(**kwargs) for _ in range(depth)]).eval()


def _output_q(model, x):
    with torch.no_grad():
        return float(model(x).pow(2).mean())


@pytest.mark.parametrize("reshaped_gamma", [False, True])
@pytest.mark.parametrize("method", ["DKS", "TAT"])
def test_layer_scales_are_set_to_one(method, reshaped_gamma):
    model, x = _net(reshaped_gamma=reshaped_gamma), torch.randn(4, 3, 16, 16)
    shaped = graphshape.shape(model, x, method=method, seed=0)
    report = shaped.meta["graphshape"]
    resets = [r for r in report.rewritten if r["what"].startswith("branch scale")]
    assert len(resets) == 8 and "was 1e-06" in resets[0]["what"]
    gammas = [p for name, p in shaped.named_parameters() if "gamma" in name]
    assert len(gammas) == 8 and all(torch.equal(g, torch.ones_like(g)) for g in gammas)
    assert all(g.requires_grad for g in gammas)  # still a trainable parameter
    assert 0.5 < _output_q(shaped, x) < 2.0  # was ~(1/4)^8 with the 1e-6 scales kept
    assert float(model[1].gamma.detach().abs().max()) == pytest.approx(1e-6)  # source untouched


def test_a_shared_scale_and_initialize_false_are_left_alone():
    from graphshape.passes.joins import reset_branch_scales

    model, x = _net(depth=2), torch.randn(2, 3, 16, 16)
    model[2].gamma = model[1].gamma  # tied: another block reads it too
    g, record = reset_branch_scales(graphshape.load(model, x))
    assert record["rewritten"] == []
    from graphshape.passes.shaping import shape_graph

    _, report = shape_graph(graphshape.load(_net(depth=2), x), method="DKS", initialize=False)
    assert not [r for r in report.rewritten if r["what"].startswith("branch scale")]


def test_onnx_layer_scales_are_set_to_one(tmp_path):
    model, x = _net(depth=3), torch.randn(2, 3, 16, 16)
    src, dst = tmp_path / "convnext.onnx", tmp_path / "shaped.onnx"
    torch.onnx.export(model, (x,), str(src), opset_version=17, dynamo=False)
    report = graphshape.shape_onnx(src, dst, method="DKS", seed=0)
    assert len([r for r in report.rewritten if r["what"].startswith("branch scale")]) == 3
    values = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(dst)).graph.initializer}
    gammas = [v for name, v in values.items() if "gamma" in name]
    assert len(gammas) == 3 and all(np.array_equal(v, np.ones_like(v)) for v in gammas)
