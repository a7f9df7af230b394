"""Products of two signals other than softmax attention's are refused under DKS/TAT: the q
of a product is the product of its factors' q, an unstable fixed point at 1 (before, such
models were shaped and gmlp_ti16_224's output was inf)."""

import math

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
    # (fx names a method's node after the call: the message adds the submodule it is in)
    with pytest.raises(GraphshapeError, match=r"mul node 'mul' \(in 0\) \(and 1 more\) "
                                              r"multiplies two signals \('chunk' \(in 0\) "
                                              r"and .*unstable fixed point") as info:
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


class TalkingHeads(nn.Module):
    """CaiT's attention: linear layers mix the heads' logits before the softmax and their
    weights after it; still softmax attention."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.proj_l, self.proj_w = nn.Linear(heads, heads), nn.Linear(heads, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(
            2, 0, 3, 1, 4).unbind(0)
        attn = self.proj_l((q @ k.transpose(-2, -1)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = self.proj_w(attn.softmax(-1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(x)


def test_talking_heads_attention_is_not_a_product_of_signals():
    model, x = TalkingHeads(), torch.randn(2, 6, 16)
    assert find_signal_products(graphshape.load(model, x)) == []
    shaped = graphshape.shape(model, x, method="DKS", seed=0)
    assert any("1 attention node(s)" in w for w in shaped.meta["graphshape"].warnings)
    assert torch.isfinite(shaped(x)).all()


class ConvTalkingHeads(nn.Module):
    """EfficientFormerV2's attention on a feature map: 1x1 convs over the heads axis mix
    the logits before the softmax and the weights after it."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Conv2d(dim, 3 * dim, 1), nn.Conv2d(dim, dim, 1)
        self.head1 = nn.Conv2d(heads, heads, 1)
        self.head2 = nn.Conv2d(heads, heads, 1)
        self.mlp = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GELU(), nn.Conv2d(dim, dim, 1))

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        attn = self.head1((q.transpose(-2, -1) @ k) * 0.5)
        attn = self.head2(attn.softmax(-1))
        x = x + self.proj((v @ attn.transpose(-2, -1)).reshape(b, c, h, w))
        return x + self.mlp(x)


def test_pointwise_conv_talking_heads_attention_is_not_a_product_of_signals():
    # before: "matmul node 'matmul' multiplies two signals", efficientformerv2 refused
    x = torch.randn(2, 16, 3, 3)
    model = nn.Sequential(*[ConvTalkingHeads() for _ in range(3)])
    assert find_signal_products(graphshape.load(model, x)) == []
    shaped = graphshape.shape(model, x, method="DKS", seed=0)
    assert any("3 attention node(s)" in w for w in shaped.meta["graphshape"].warnings)
    assert torch.isfinite(shaped(x)).all()


def test_efficientformerv2_attention_is_softmax_attention():
    timm = pytest.importorskip("timm")
    x = torch.randn(1, 3, 224, 224)
    model = timm.create_model("efficientformerv2_s0", num_classes=10).eval()
    assert find_signal_products(graphshape.load(model, x)) == []
    shaped = graphshape.shape(model, x, method="TAT", seed=0)
    assert torch.isfinite(shaped(x)).all()


class MaskedAttention(nn.Module):
    """The Annotated Transformer's attention: logits scaled by the head size read at run
    time and masked with masked_fill, both opaque calls."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x, mask):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(
            2, 0, 3, 1, 4).unbind(0)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
        scores = scores.masked_fill(mask.unsqueeze(1) == 0, -1e9)
        x = x + self.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(x)


def test_opaque_ops_that_only_compute_attention_logits_are_not_warned_about():
    # before: "2 opaque node(s) without a kernel rule ('truediv', 'masked_fill'): the solved
    # parameters ignore what they do" (and the same beside a solve's refusal): they only
    # set the softmax's weights, which the maximizing function does not see
    x, mask = torch.randn(2, 6, 16), torch.ones(2, 1, 6)
    shaped = graphshape.shape(MaskedAttention(), (x, mask), method="DKS", seed=0)
    warnings = shaped.meta["graphshape"].warnings
    assert any("1 attention node(s)" in w for w in warnings)
    assert not any("opaque node" in w for w in warnings), warnings
    assert torch.isfinite(shaped(x, mask)).all()


@pytest.mark.parametrize("method, activation", [("DKS", "relu"), ("TAT", "leaky_relu")])
def test_split_attention_is_an_average_from_pytorch_and_onnx(tmp_path, method, activation):
    # SKNet's selective kernel: two conv paths, summed with softmax weights. The weighted
    # sum is an average of the paths, so skresnet18 solves exactly as resnet18 (the same
    # chain of one activation per residual branch). Before, the paths times their softmax
    # weights was a product in M: DKS solved other parameters, and TAT refused skresnet18
    # (eta = 0.9 out of reach).
    timm = pytest.importorskip("timm")
    x = torch.randn(1, 3, 32, 32)
    model = timm.create_model("skresnet18", pretrained=False, num_classes=10).eval()
    assert find_signal_products(graphshape.load(model, x)) == []
    shaped = graphshape.shape(model, x, method=method, seed=0)
    got = shaped.meta["graphshape"].activation_params[activation]
    assert torch.isfinite(shaped(x)).all()
    plain = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    want = graphshape.shape(plain, x, method=method, seed=0).meta["graphshape"]
    assert got == pytest.approx(want.activation_params[activation], rel=1e-9)

    src = tmp_path / "skresnet18.onnx"
    torch.onnx.export(model, (x,), str(src), opset_version=17, dynamo=False)
    report = graphshape.shape_onnx(src, tmp_path / "shaped.onnx", method=method, seed=0)
    assert report.activation_params[activation] == pytest.approx(got, rel=1e-9)
