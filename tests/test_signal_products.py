"""Products of two signals other than softmax attention's are refused under DKS/TAT: the q
of a product is the product of its factors' q, an unstable fixed point at 1 (before, such
models were shaped and gmlp_ti16_224's output was inf)."""

import pytest
import torch
import torch.nn as nn

import graphshape
from graphshape import GraphshapeError
from graphshape.passes.shaping import find_signal_products


class SpatialGating(nn.Module):
    """gMLP's block, small: GELU, split, u * proj_tokens(v), a residual add."""

    def __init__(self, dim=16, tokens=6):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(2 * dim, dim)
        self.proj = nn.Linear(tokens, tokens)

    def forward(self, x):
        u, v = nn.functional.gelu(self.fc1(x)).chunk(2, dim=-1)
        v = self.proj(v.transpose(1, 2)).transpose(1, 2)
        return x + self.fc2(u * v)


class LinearAttention(nn.Module):
    """q @ (softmax(k)^T v): the softmax weights average v (fine), then q multiplies it."""

    def __init__(self, dim=16):
        super().__init__()
        self.qkv, self.mlp = nn.Linear(dim, 3 * dim), nn.Sequential(
            nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = x + q @ (k.softmax(dim=1).transpose(1, 2) @ v)
        return x + self.mlp(x)


@pytest.mark.parametrize("method", ["DKS", "TAT"])
def test_spatial_gating_is_refused_naming_the_product(tmp_path, method):
    model, x = nn.Sequential(SpatialGating(), SpatialGating()), torch.randn(2, 6, 16)
    assert len(find_signal_products(graphshape.load(model, x))) == 2
    with pytest.raises(GraphshapeError, match=r"mul node 'mul' \(and 1 more\) multiplies two "
                                              r"signals .*unstable fixed point") as info:
        graphshape.shape(model, x, method=method)
    assert info.value.node == "mul"
    src = tmp_path / "gmlp.onnx"
    torch.onnx.export(model, (x,), str(src), opset_version=17, dynamo=False)
    with pytest.raises(GraphshapeError, match="multiplies two signals"):
        graphshape.shape_onnx(src, tmp_path / "out.onnx", method=method)
    assert not (tmp_path / "out.onnx").exists()


def test_untransformed_keeps_the_products_and_says_so():
    model, x = SpatialGating(), torch.randn(2, 6, 16)
    shaped = graphshape.shape(model, x, method="untransformed", seed=0)
    assert any("product(s) of two signals (mul)" in w
               for w in shaped.meta["graphshape"].warnings)
    assert shaped(x).shape == model(x).shape


def test_linear_attention_is_refused_but_its_softmax_average_is_not_the_reason():
    model, x = LinearAttention(), torch.randn(2, 6, 16)
    g = graphshape.load(model, x)
    (product,) = find_signal_products(g)
    assert g[product].op == "matmul"
    # the refused product is q @ (...), not the softmax-weighted average (...) @ v
    assert all(g[r.node].op != "transpose" or g[g[r.node].inputs[0].node].op != "softmax"
               for r in g[product].inputs)
    with pytest.raises(GraphshapeError, match="multiplies two signals"):
        graphshape.shape(model, x, method="DKS")
