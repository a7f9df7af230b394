"""timm's fused norm-activation modules (BatchNormAct2d, GroupNormAct) map to a norm node
plus an activation node, round-trip exactly, and are removed by shaping; its
weight-standardized convs (StdConv2d, ScaledStdConv2d) map to convs holding the standardized
weights, and shaping removes the standardization."""

import pytest

torch = pytest.importorskip("torch")
norm_act = pytest.importorskip("timm.layers.norm_act")

import graphshape  # noqa: E402


def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        norm_act.BatchNormAct2d(8, act_layer=torch.nn.SiLU),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        norm_act.GroupNormAct(8, 2, act_layer=torch.nn.ReLU),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        norm_act.BatchNormAct2d(8, apply_act=False),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    with torch.no_grad():  # non-trivial statistics and affine parameters
        for bn in (m[1], m[5]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
            bn.bias.normal_()
    return m.eval()


def test_norm_act_maps_to_norm_plus_activation_and_round_trips():
    model = _model()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    graph = graphshape.load(model, x)
    ops = graph.count_ops()
    assert "opaque" not in ops  # no F.batch_norm / _assert / ndim nodes
    assert ops["batch_norm"] == 2 and ops["group_norm"] == 1
    acts = [n.attrs["name"] for n in graph if n.op == "activation"]
    assert acts == ["silu", "relu"]  # apply_act=False adds none
    gm = graphshape.to_torch(graph)
    assert sorted(gm.state_dict()) == sorted(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)
    # training mode: batch statistics, as in timm's forward
    gm.train(), model.train()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_shape_removes_fused_norms():
    model = _model()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    shaped = graphshape.shape(model, x, method="DKS", activation="tanh", seed=0)
    report = shaped.meta["graphshape"]
    removed = sorted(r["op"] for r in report.removed)
    assert removed.count("batch_norm") == 2 and removed.count("group_norm") == 1
    assert not [m for m in shaped.modules()
                if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm))]
    out = shaped(x)
    assert out.shape == (2, 4) and torch.isfinite(out).all()
    assert set(report.activation_params) == {"tanh"}


def _std_conv_model():
    std_conv = pytest.importorskip("timm.layers.std_conv")
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        std_conv.ScaledStdConv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        std_conv.StdConv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
        std_conv.ScaledStdConv2d(8, 8, 1, bias=False),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    with torch.no_grad():  # weights far from standardized, a non-trivial gain
        for conv in (m[0], m[2], m[4]):
            conv.weight.mul_(3.0).add_(0.5)
        m[0].gain.uniform_(0.5, 2.0)
    return m.eval()


def test_weight_standardized_convs_load_as_convs_with_their_standardized_weights():
    # before: traced into F.batch_norm on the weight and an opaque F.conv2d, which had no
    # kernel rule and no re-initialization (timm's nf_resnet26 then solved TAT slope 0.1229
    # from PyTorch and 0.1656 from its ONNX export, which holds the standardized weights)
    model, x = _std_conv_model(), torch.randn(2, 3, 8, 8)
    g = graphshape.load(model, x)
    convs = [n for n in g if n.op == "conv"]
    assert len(convs) == 3 and "opaque" not in g.count_ops()
    assert [n.meta["weight_normalization"][1] for n in convs] == [
        "ScaledStdConv2d", "StdConv2d", "ScaledStdConv2d"]
    w = convs[1].params["weight"].reshape(8, -1)  # standardized per output channel
    assert abs(w.mean(1)).max() < 1e-5 and abs(w.std(1) - 1).max() < 1e-3
    emitted = graphshape.to_torch(g)
    with torch.no_grad():
        torch.testing.assert_close(emitted(x), model(x), rtol=1e-5, atol=1e-5)
    # kernel rules apply: every layer's q is predicted (an opaque conv had none)
    rows = [r for r in graphshape.analyze(g, x).rows
            if r["op"] in ("conv", "activation", "linear")]
    assert len(rows) == 6 and all(r["q_pred"] is not None for r in rows)


def test_shape_removes_weight_standardization():
    model, x = _std_conv_model(), torch.randn(2, 3, 8, 8)
    shaped = graphshape.shape(model, x, method="DKS", seed=0)
    report = shaped.meta["graphshape"]
    assert sorted(r["node"] for r in report.rewritten
                  if r["what"].startswith("weight standardization removed")) == ["_0", "_2", "_4"]
    assert report.initialized == 4
    assert not any("gain" in k for k in shaped.state_dict())
    assert "0.weight" in shaped.state_dict()  # the source's keys
    out = shaped(x)
    assert torch.isfinite(out).all() and out.shape == (2, 4)


def test_same_padded_weight_standardized_convs_pad_by_the_input_size():
    """timm's ``ScaledStdConv2dSame`` / ``StdConv2dSame`` (dm_nfnet): padded for a "same"
    convolution by the input's size, then a weight-standardized conv. fx traces them since
    their padding's ``max`` of a size is answered for the example inputs; traced through,
    their convs were opaque (no kernel rule, no re-initialization)."""
    std_conv = pytest.importorskip("timm.layers.std_conv")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        std_conv.ScaledStdConv2dSame(3, 8, 3, stride=2), torch.nn.GELU(),
        std_conv.StdConv2dSame(8, 8, 3, stride=2), torch.nn.GELU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    x = torch.randn(2, 3, 9, 9)
    g = graphshape.load(model, x)
    convs = [n for n in g if n.op == "conv"]
    assert [n.meta["weight_normalization"][1] for n in convs] == [
        "ScaledStdConv2dSame", "StdConv2dSame"]
    pads = [n for n in g if n.op == "opaque"]
    assert len(pads) == 2 and all("data movement" in n.meta["flags"] for n in pads)
    emitted = graphshape.to_torch(g)
    with torch.no_grad():
        for side in (9, 12):  # the padding follows the input's size
            y = torch.randn(3, 3, side, side)
            torch.testing.assert_close(emitted(y), model(y), rtol=1e-5, atol=1e-5)
    rows = [r for r in graphshape.analyze(g, x).rows if r["op"] in ("conv", "linear")]
    assert len(rows) == 3 and all(r["q_pred"] is not None for r in rows)
    shaped = graphshape.shape(model, x, method="DKS", seed=0)
    assert shaped.meta["graphshape"].initialized == 3
    again = [r for r in graphshape.analyze(shaped, x).rows if r["op"] == "activation"]
    assert len(again) == 2 and all(r["q_pred"] is not None for r in again)  # read again


@pytest.fixture
def hf_bit_conv(monkeypatch):
    """Hugging Face BiT's ``WeightStandardizedConv2d`` and ``DynamicPad2d`` (as
    ``transformers.models.bit.modeling_bit`` writes them), registered under that module's
    name as if transformers were imported."""
    import math
    import sys
    import types

    name = "transformers.models.bit.modeling_bit"

    class DynamicPad2d(torch.nn.Module):
        def __init__(self, kernel_size, stride, dilation, value=0):
            super().__init__()
            self.kernel_size, self.stride, self.dilation, self.value = (
                (kernel_size,) * 2, (stride,) * 2, (dilation,) * 2, value)

        def forward(self, x):
            pads = [max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0) for n, k, s, d in
                    zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation)]
            return torch.nn.functional.pad(x, [pads[1] // 2, pads[1] - pads[1] // 2,
                                               pads[0] // 2, pads[0] - pads[0] // 2])

    class WeightStandardizedConv2d(torch.nn.Conv2d):
        def __init__(self, c_in, c_out, kernel_size, stride=1, eps=1e-6):
            dynamic = stride > 1
            super().__init__(c_in, c_out, kernel_size, stride=stride,
                             padding=0 if dynamic else kernel_size // 2, bias=False)
            self.pad = DynamicPad2d(kernel_size, stride, 1) if dynamic else None
            self.eps = eps

        def forward(self, x):
            if self.pad is not None:
                x = self.pad(x)
            weight = torch.nn.functional.batch_norm(
                self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                momentum=0.0, eps=self.eps).reshape_as(self.weight)
            return torch.nn.functional.conv2d(x, weight, self.bias, self.stride, self.padding,
                                              self.dilation, self.groups)

    module = types.ModuleType(name)
    for cls in (DynamicPad2d, WeightStandardizedConv2d):
        cls.__module__ = name
        setattr(module, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, name, module)
    return WeightStandardizedConv2d


def test_hugging_face_bit_weight_standardized_convs_load_as_convs(hf_bit_conv):
    """Traced through (Hugging Face's BiT is traced by fx now), its ``F.batch_norm`` on the
    weight and ``F.conv2d`` with a computed weight were opaque: 17 opaque convs in BiT,
    none re-initialized."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        hf_bit_conv(3, 8, 3, stride=2), torch.nn.ReLU(), hf_bit_conv(8, 8, 3),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 4)).eval()
    x = torch.randn(2, 3, 9, 9)
    g = graphshape.load(model, x)
    assert [n.meta["weight_normalization"][1] for n in g if n.op == "conv"] == [
        "WeightStandardizedConv2d"] * 2
    assert [n.name for n in g if n.op == "opaque"] == ["_0_pad"]
    with torch.no_grad():
        for side in (9, 12):
            y = torch.randn(3, 3, side, side)
            torch.testing.assert_close(graphshape.to_torch(g)(y), model(y), rtol=1e-5,
                                       atol=1e-5)
    assert graphshape.shape(model, x, method="DKS", seed=0).meta["graphshape"].initialized == 3


@pytest.mark.parametrize("act_layer, name", [("gelu", "gelu_exact"), ("gelu_tanh", "gelu"),
                                             ("sigmoid", "sigmoid"), ("tanh", "tanh")])
def test_norm_act_with_timm_s_own_activation_modules(act_layer, name):
    """``act_layer="gelu"`` creates timm's own GELU module (efficientformerv2): unknown to
    the mapping, the whole BatchNormAct2d stayed opaque and shaping refused it ("looks like
    a normalization layer that graphshape could not map")."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), norm_act.BatchNormAct2d(8, act_layer=act_layer),
        torch.nn.Conv2d(8, 8, 3, padding=1), norm_act.BatchNormAct2d(8, act_layer=act_layer),
        torch.nn.Conv2d(8, 4, 3, padding=1)).eval()
    assert type(model[1].act).__module__ in ("timm.layers.activations", "torch.nn.modules.activation")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    graph = graphshape.load(model, x)
    assert "opaque" not in graph.count_ops()
    assert [n.attrs["name"] for n in graph if n.op == "activation"] == [name, name]
    with torch.no_grad():
        torch.testing.assert_close(graphshape.to_torch(graph)(x), model(x), rtol=1e-5, atol=1e-6)
    shaped = graphshape.shape(model, x, method="DKS", seed=0)
    assert [r["op"] for r in shaped.meta["graphshape"].removed].count("batch_norm") == 2
