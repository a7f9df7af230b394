"""RMS normalization (nn.RMSNorm, F.rms_norm, ONNX RMSNormalization, onnxruntime's
SimplifiedLayerNormalization and its Skip form) is the canonical ``rms_norm``: it round-trips
on both backends, the analysis sets q to 1, and shaping removes it like a layer norm."""

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import graphshape
from test_onnx_roundtrip import run_ort


class _FunctionalRMS(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(width))

    def forward(self, x):
        return F.rms_norm(x, (16,), self.weight, 1e-6)


def _mlp(norm):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), norm(), nn.GELU())
                           for _ in range(4)], nn.Linear(16, 3)).eval()


NORMS = {
    "RMSNorm": lambda: nn.RMSNorm(16),
    "RMSNorm eps, no affine": lambda: nn.RMSNorm(16, eps=1e-3, elementwise_affine=False),
    "F.rms_norm": lambda: _FunctionalRMS(16),
}
X = torch.randn(5, 16) * 3


def _ort(model, x):
    return run_ort(model, {model.graph.input[0].name: x})[0]


@pytest.mark.parametrize("norm", list(NORMS))
def test_torch_rms_norm_round_trips_on_both_backends(norm):
    model = _mlp(NORMS[norm])
    graph = graphshape.load(model, X)
    assert graph.count_ops()["rms_norm"] == 4 and "opaque" not in graph.count_ops()
    with torch.no_grad():
        want = model(X)
        torch.testing.assert_close(graphshape.to_torch(graph)(X), want, rtol=0, atol=0)
    for opset in (17, 23):  # decomposed before opset 23, RMSNormalization from it
        out = graphshape.to_onnx(graph, opset=opset)
        onnx.checker.check_model(out)
        assert any(n.op_type == "RMSNormalization" for n in out.graph.node) == (opset >= 23)
        np.testing.assert_allclose(_ort(out, X.numpy()), want.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["DKS", "untransformed"])
def test_shaping_removes_rms_norm_and_analysis_predicts_it(method):
    model = _mlp(NORMS["RMSNorm"])
    rows = graphshape.analyze(model, X).rows
    norms = [r for r in rows if r["op"] == "rms_norm"]
    assert len(norms) == 4 and all(r["q_pred"] == pytest.approx(1.0) for r in norms)
    shaped = graphshape.shape(model, X, method=method)
    report = shaped.meta["graphshape"]
    assert [r["op"] for r in report.removed].count("rms_norm") == 4
    assert not any(isinstance(m, nn.RMSNorm) for m in shaped.modules())
    assert torch.isfinite(shaped(X)).all()


def _onnx_model(nodes, inits, opsets):
    graph = helper.make_graph(
        nodes, "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 8])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets],
                             ir_version=10)


RNG = np.random.default_rng(0)
GAMMA = 1 + 0.1 * RNG.normal(size=8)
SKIP_BIAS = 0.1 * RNG.normal(size=8)

ONNX_FORMS = {
    "RMSNormalization": _onnx_model(
        [helper.make_node("RMSNormalization", ["x", "g"], ["y"], axis=-1, epsilon=1e-5)],
        {"g": GAMMA}, [("", 23)]),
    # onnxruntime defines it in the default domain, where ONNX has no such op
    "SimplifiedLayerNormalization": _onnx_model(
        [helper.make_node("SimplifiedLayerNormalization", ["x", "g"], ["y"], axis=-1,
                          epsilon=1e-5)],
        {"g": GAMMA}, [("", 17)]),
    "SkipSimplifiedLayerNormalization": _onnx_model(
        [helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("SkipSimplifiedLayerNormalization", ["r", "x", "g", "sb"], ["y"],
                          epsilon=1e-5, domain="com.microsoft")],
        {"g": GAMMA, "sb": SKIP_BIAS}, [("", 17), ("com.microsoft", 1)]),
}


@pytest.mark.parametrize("form", list(ONNX_FORMS))
def test_onnx_rms_norm_forms_read_as_rms_norm(form):
    model = ONNX_FORMS[form]
    graph = graphshape.load(model)
    assert graph.count_ops()["rms_norm"] == 1 and "opaque" not in graph.count_ops()
    x = RNG.normal(size=(2, 5, 8)).astype(np.float32)
    for opset in (17, 23):
        out = graphshape.to_onnx(graph, opset=opset)
        assert not any(n.domain == "com.microsoft" for n in out.graph.node)
        np.testing.assert_allclose(_ort(out, x), _ort(model, x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ hand-written norms
class _LlamaRMSNorm(nn.Module):
    def __init__(self, width, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, h):
        variance = h.pow(2).mean(-1, keepdim=True)
        return self.weight * (h * torch.rsqrt(variance + self.eps))


class _HandLayerNorm(nn.Module):
    """A hand-written LayerNorm over the last dim (BERT-era code), or over the channels of
    NCHW (``channels_first``: ConvNeXt's official one)."""

    def __init__(self, width, eps=1e-12, channels_first=False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))
        self.eps, self.axis = eps, 1 if channels_first else -1

    def forward(self, x):
        u = x.mean(self.axis, keepdim=True)
        s = (x - u).pow(2).mean(self.axis, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        if self.axis == 1:
            return self.weight[:, None, None] * x + self.bias[:, None, None]
        return self.weight * x + self.bias


@pytest.mark.parametrize("norm, op, eps, module", [
    (lambda: _LlamaRMSNorm(16), "rms_norm", 1e-6, lambda: nn.RMSNorm(16, eps=1e-6)),
    (lambda: _HandLayerNorm(16), "layer_norm", 1e-12, lambda: nn.LayerNorm(16, eps=1e-12)),
])
def test_hand_written_norms_read_as_norms(norm, op, eps, module):
    # the division by the root of the variance read as a product of two signals: DKS
    # refused the LLaMA-style RMSNorm, and neither norm was removed
    model = _mlp(norm)
    graph = graphshape.load(model, X)
    nodes = [n for n in graph if n.op == op]
    assert len(nodes) == 4 and all(n.attrs["eps"] == eps for n in nodes), graph.table()
    assert "opaque" not in graph.count_ops()
    with torch.no_grad():
        torch.testing.assert_close(graphshape.to_torch(graph)(X), model(X), rtol=1e-5, atol=1e-5)
    shaped = graphshape.shape(model, X, method="DKS", seed=0)
    twin = graphshape.shape(_mlp(module), X, method="DKS", seed=0)
    assert [r["op"] for r in shaped.meta["graphshape"].removed].count(op) == 4
    assert shaped.meta["graphshape"].activation_params == twin.meta["graphshape"].activation_params


def test_onnx_rms_norm_chain_reads_as_rms_norm():
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"]),
             helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1),
             helper.make_node("Add", ["ms", "eps"], ["mse"]),
             helper.make_node("Sqrt", ["mse"], ["rms"]),
             helper.make_node("Div", ["x", "rms"], ["n"]),
             helper.make_node("Mul", ["n", "g"], ["y"])]
    model = _onnx_model(nodes, {"two": 2.0, "eps": 1e-6, "g": GAMMA}, [("", 17)])
    graph = graphshape.load(model)
    assert graph.count_ops().get("rms_norm") == 1 and "opaque" not in graph.count_ops()
    x = RNG.normal(size=(2, 5, 8)).astype(np.float32)
    np.testing.assert_allclose(_ort(graphshape.to_onnx(graph), x), _ort(model, x),
                               rtol=1e-5, atol=1e-5)


def _convnet(norm):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), norm(), nn.GELU())
                           for _ in range(4)]).eval()


def test_hand_written_channels_first_layer_norm_reads_between_transposes():
    # before: kept in the shaped model, its pow and sqrt listed as opaque ops the solved
    # parameters ignore
    model = _convnet(lambda: _HandLayerNorm(8, eps=1e-6, channels_first=True))
    x = torch.randn(2, 8, 6, 6)
    graph = graphshape.load(model, x)
    assert graph.count_ops()["layer_norm"] == 4 and graph.count_ops()["transpose"] == 8
    assert "opaque" not in graph.count_ops()
    with torch.no_grad():
        torch.testing.assert_close(graphshape.to_torch(graph)(x), model(x), rtol=1e-5, atol=1e-5)
    shaped = graphshape.shape(model, x, method="DKS", seed=0)
    removed = [r["op"] for r in shaped.meta["graphshape"].removed]
    assert removed.count("layer_norm") == 4 and removed.count("transpose") == 8
    assert "permute" not in shaped.code  # the transpose pairs went with the norms
    # and so did its weight and bias, after the transpose back (as a BatchNorm's affine)
    assert removed.count("mul") == 4 and removed.count("add") == 4
    plain = graphshape.shape(_convnet(nn.Identity), x, method="DKS", seed=0)
    assert shaped.meta["graphshape"].activation_params == plain.meta["graphshape"].activation_params
    assert sorted(shaped.state_dict()) == sorted(plain.state_dict())  # no norm weights left
    torch.testing.assert_close(shaped(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model, x, dynamic, op", [
    (lambda: _convnet(lambda: _HandLayerNorm(8, eps=1e-6, channels_first=True)),
     torch.randn(2, 8, 6, 6), {0: "batch"}, "layer_norm"),
    (lambda: _mlp(lambda: _LlamaRMSNorm(16)), X, {0: "batch"}, "rms_norm"),
])
def test_hand_written_norms_read_as_norms_in_an_export_with_a_dynamic_batch(
        tmp_path, model, x, dynamic, op):
    """An export with ``dynamic_axes`` (as users write them) has a symbolic batch dim: the
    norms were not read (their region was evaluated only at static shapes), so the division
    by the root of a mean read as a product of two signals and shaping the file was
    refused; timm's mobilenetv5 (RMS norms over the channels), read through its export."""
    model = model()
    path = str(tmp_path / "m.onnx")
    torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": dynamic, "y": {0: "batch"}})
    graph = graphshape.load(path)
    assert graph.count_ops().get(op) == 4 and "opaque" not in graph.count_ops(), graph.table()
    bigger = torch.cat([x, x[:1] * 0.5])  # another batch size than the export's
    np.testing.assert_allclose(_ort(graphshape.to_onnx(graph), bigger.numpy()),
                               _ort(onnx.load(path), bigger.numpy()), rtol=1e-5, atol=1e-5)
    shaped = graphshape.shape_onnx(path, str(tmp_path / "shaped.onnx"), method="DKS", seed=0)
    from_torch = graphshape.shape(model, x, method="DKS", seed=0)
    assert shaped.activation_params == from_torch.meta["graphshape"].activation_params


# ------------------------------------------------------- F.normalize(x) * sqrt(n) (lucidrains)
class _L2RMSNorm(nn.Module):
    """x-transformers' RMSNorm: ``F.normalize(x, dim=-1) * sqrt(n) * gamma``, the RMS norm
    with its eps as a clamp of the L2 norm."""

    def __init__(self, width):
        super().__init__()
        self.scale = width ** 0.5
        self.gamma = nn.Parameter(1 + 0.1 * torch.randn(width))

    def forward(self, x):
        return F.normalize(x, dim=-1) * self.scale * self.gamma


class _Cosine(nn.Module):
    def forward(self, x):
        return F.normalize(x, dim=-1)


def test_l2_normalize_times_root_n_reads_as_rms_norm():
    # before: refused, "'function torch.nn.functional.normalize' looks like a normalization
    # layer that graphshape could not map to a known norm op"
    model = _mlp(lambda: _L2RMSNorm(16))
    x = torch.randn(3, 5, 16)
    graph = graphshape.load(model, x)
    assert graph.count_ops()["rms_norm"] == 4 and "opaque" not in graph.count_ops()
    with torch.no_grad():
        torch.testing.assert_close(graphshape.to_torch(graph)(x), model(x), rtol=1e-5, atol=1e-6)
        zeros = torch.zeros(2, 16)  # (a row of zeros: 0 from both, as F.normalize gives)
        assert torch.equal(graphshape.to_torch(graphshape.load(_L2RMSNorm(16), zeros))(zeros),
                           zeros)
    shaped = graphshape.shape(model, x, method="DKS", seed=0)
    twin = graphshape.shape(_mlp(lambda: nn.RMSNorm(16)), x, method="DKS", seed=0)
    assert shaped.meta["graphshape"].activation_params == twin.meta["graphshape"].activation_params
    assert sorted(shaped.state_dict()) == sorted(twin.state_dict())  # gamma went with it


@pytest.mark.parametrize("opset", [10, 13, 18])  # Clip's bound an attribute / an input
def test_an_exported_l2_rms_norm_reads_as_rms_norm(tmp_path, opset):
    model = _mlp(lambda: _L2RMSNorm(16))
    path = str(tmp_path / "m.onnx")
    torch.onnx.export(model, (X,), path, dynamo=False, opset_version=opset)
    graph = graphshape.load(path)
    assert graph.count_ops().get("rms_norm") == 4 and "opaque" not in graph.count_ops()
    np.testing.assert_allclose(_ort(graphshape.to_onnx(graph), X.numpy()),
                               _ort(onnx.load(path), X.numpy()), rtol=1e-5, atol=1e-5)
    shaped = graphshape.shape_onnx(path, str(tmp_path / "shaped.onnx"), method="DKS", seed=0)
    from_torch = graphshape.shape(model, X, method="DKS", seed=0)
    assert shaped.activation_params == from_torch.meta["graphshape"].activation_params


def test_l2_normalize_alone_is_not_an_rms_norm():
    # (cosine attention's q and k, an embedding's output: not a norm layer to remove)
    graph = graphshape.load(_mlp(_Cosine), X)
    assert "rms_norm" not in graph.count_ops() and graph.count_ops()["opaque"] == 4
    with pytest.raises(graphshape.GraphshapeError, match="looks like a normalization layer"):
        graphshape.shape(_mlp(_Cosine), X, method="DKS")


class _ChannelsFirstL2RMSNorm(nn.Module):
    """denoising-diffusion-pytorch's RMSNorm: ``F.normalize(x, dim=1) * g * sqrt(n)`` on
    (N, C, H, W), its weight between the normalization and the constant scale; its older
    versions take sqrt(n) from the input's shape (``size_axis``)."""

    def __init__(self, channels, size_axis=None):
        super().__init__()
        self.scale, self.size_axis = channels ** 0.5, size_axis
        self.g = nn.Parameter(1 + 0.1 * torch.randn(1, channels, 1, 1))

    def forward(self, x):
        scale = self.scale if self.size_axis is None else x.shape[self.size_axis] ** 0.5
        return F.normalize(x, dim=1) * self.g * scale


@pytest.mark.parametrize("size_axis", [None, 1, -3])
def test_a_channels_first_rms_norm_weighted_before_its_scale_reads_as_rms_norm(tmp_path,
                                                                                size_axis):
    # before: refused, "'function torch.nn.functional.normalize' looks like a normalization
    # layer that graphshape could not map" (a weight inside a norm's region was read only
    # for norms over the trailing dims; a size of x inside it was not read at all)
    model = _convnet(lambda: _ChannelsFirstL2RMSNorm(8, size_axis))
    x = torch.randn(2, 8, 6, 6)
    graph = graphshape.load(model, x)
    ops = graph.count_ops()
    assert ops["rms_norm"] == 4 and ops["transpose"] == 8 and "opaque" not in ops
    with torch.no_grad():
        torch.testing.assert_close(graphshape.to_torch(graph)(x), model(x), rtol=1e-5, atol=1e-5)
    shaped = graphshape.shape(model, x, method="DKS", seed=0)
    plain = graphshape.shape(_convnet(nn.Identity), x, method="DKS", seed=0)
    assert shaped.meta["graphshape"].activation_params == plain.meta["graphshape"].activation_params
    assert sorted(shaped.state_dict()) == sorted(plain.state_dict())  # g went with the norm
    assert "permute" not in shaped.code
    torch.testing.assert_close(shaped(x), plain(x), rtol=1e-5, atol=1e-5)
    # its export: the same norms, the same solved parameters
    path = str(tmp_path / "m.onnx")
    torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17)
    assert graphshape.load(path).count_ops().get("rms_norm") == 4
    report = graphshape.shape_onnx(path, str(tmp_path / "shaped.onnx"), method="DKS", seed=0)
    assert report.activation_params == plain.meta["graphshape"].activation_params


def test_a_size_along_another_axis_is_not_read_into_a_norm():
    # with 8 examples of 8 channels, x.shape[0] ** 0.5 is the norm's sqrt(n) on the traced
    # batch only: read as the norm, the converted model would be wrong at any other batch
    model = _convnet(lambda: _ChannelsFirstL2RMSNorm(8, size_axis=0))
    x = torch.randn(8, 8, 6, 6)
    graph = graphshape.load(model, x)
    assert "rms_norm" not in graph.count_ops()
    other = torch.randn(3, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(graphshape.to_torch(graph)(other), model(other),
                                   rtol=1e-5, atol=1e-5)
