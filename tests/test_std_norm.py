"""Hand-written norms that compute their statistic with ``torch.var`` / ``torch.std`` /
``torch.var_mean`` read as norms: ``layer_norm`` where they are one, else the canonical
``std_norm`` (an unbiased variance, x not centred as timm's SimpleNorm, eps added to the
standard deviation as the Annotated Transformer's LayerNorm). Before, their statistic was an
opaque call: DKS "shaped" such a network with the norms kept (an opaque-node warning only),
and TAT refused the division as a product of two signals."""

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import graphshape
from graphshape.torch_modules import StdNorm
from test_onnx_roundtrip import run_ort

WIDTH = 16


class _VarNorm(nn.Module):
    """A norm over the last dim written with a variance or standard deviation call."""

    def __init__(self, form, width=WIDTH, eps=1e-5):
        super().__init__()
        self.form, self.eps = form, eps
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x):
        if self.form == "var, biased":  # lucidrains-style LayerNorm
            var = torch.var(x, dim=-1, unbiased=False, keepdim=True)
            mean = x.mean(dim=-1, keepdim=True)
            return (x - mean) / (var + self.eps).sqrt() * self.weight + self.bias
        if self.form == "var_mean":
            var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
            return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias
        if self.form == "var, unbiased":
            mean = x.mean(-1, keepdim=True)
            return self.weight * (x - mean) / torch.sqrt(x.var(-1, keepdim=True) + self.eps) \
                + self.bias
        if self.form == "annotated transformer":  # its weight before the division
            mean = x.mean(-1, keepdim=True)
            std = x.std(-1, keepdim=True)
            return self.weight * (x - mean) / (std + self.eps) + self.bias
        if self.form == "simple norm":  # timm's SimpleNorm: x itself divided
            return x * torch.rsqrt(torch.var(x, dim=-1, keepdim=True) + self.eps) * self.weight
        if self.form == "clamped variance":  # imagen-pytorch's ChanLayerNorm, on tokens
            var = torch.var(x, dim=-1, unbiased=False, keepdim=True)
            mean = torch.mean(x, dim=-1, keepdim=True)
            return (x - mean) * var.clamp(min=self.eps).rsqrt() * self.weight + self.bias
        raise AssertionError(self.form)


#: form -> (op, the std_norm attributes it reads as)
FORMS = {
    "var, biased": ("layer_norm", {}),
    "var_mean": ("layer_norm", {}),
    "var, unbiased": ("std_norm", {"centre": True, "correction": 1, "eps_added_to": "variance"}),
    "annotated transformer": ("std_norm", {"centre": True, "correction": 1,
                                           "eps_added_to": "std"}),
    "simple norm": ("std_norm", {"centre": False, "correction": 1, "eps_added_to": "variance"}),
    "clamped variance": ("std_norm", {"centre": True, "correction": 0, "eps_added_to": "clamp"}),
}
# tokens: (batch, tokens, features), the norm and its affine over the last dim
X = torch.randn(3, 5, WIDTH) * 2 + 0.5


def _mlp(norm, depth=4):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, WIDTH), norm(), nn.GELU())
                           for _ in range(depth)], nn.Linear(WIDTH, 3)).eval()


def _perturbed(model):
    """The model with its norms' weights and biases away from 1 and 0 (a trained one)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _VarNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return model


@pytest.mark.parametrize("form", list(FORMS))
def test_variance_written_norms_read_as_norms_and_run_the_same(form):
    op, attrs = FORMS[form]
    model = _perturbed(_mlp(lambda: _VarNorm(form)))
    graph = graphshape.load(model, X)
    nodes = [n for n in graph if n.op == op]
    assert len(nodes) == 4, graph.table()
    assert all(n.attrs["eps"] == pytest.approx(1e-5) and n.attrs["normalized_shape"] == (WIDTH,)
               and {k: n.attrs[k] for k in attrs} == attrs for n in nodes)
    assert "opaque" not in graph.count_ops()
    with torch.no_grad():
        want = model(X)
        emitted = graphshape.to_torch(graph)
        torch.testing.assert_close(emitted(X), want, rtol=1e-5, atol=1e-5)
    assert (sum(isinstance(m, StdNorm) for m in emitted.modules()) == 4) == (op == "std_norm")
    exported = graphshape.to_onnx(graph, opset=17)
    onnx.checker.check_model(exported)
    np.testing.assert_allclose(run_ort(exported, {exported.graph.input[0].name: X.numpy()})[0],
                               want.numpy(), rtol=1e-4, atol=1e-4)
    # the emitted module reads back as the same op (graphshape's StdNorm is canonical)
    again = graphshape.load(emitted, X)
    assert again.count_ops()[op] == 4 and "opaque" not in again.count_ops()


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("method", ["DKS", "TAT"])
def test_shaping_removes_them_with_their_weight_and_bias(form, method):
    # the weight and bias act along the last of three dims: before, only a (C,) affine of a
    # rank-2 value was read as the norm's, and on tokens they stayed (trainable maps at 1, 0)
    kind = dict(method=method, seed=0, **({"eta": 0.7} if method == "TAT" else {}))
    shaped = graphshape.shape(_mlp(lambda: _VarNorm(form), depth=12), X, **kind)
    twin = graphshape.shape(_mlp(lambda: nn.LayerNorm(WIDTH), depth=12), X, **kind)
    removed = [r["op"] for r in shaped.meta["graphshape"].removed]
    assert removed.count(FORMS[form][0]) == 12
    assert shaped.meta["graphshape"].activation_params == \
        twin.meta["graphshape"].activation_params
    assert sorted(shaped.state_dict()) == sorted(twin.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(shaped(X), twin(X), rtol=1e-5, atol=1e-5)


def test_where_eps_is_added_is_read_from_the_values():
    # with eps 0.01, std + eps and sqrt(var + eps) differ only where the variance is small:
    # each form is read as itself, and runs the same on inputs of small variance
    class StdPlusEps(_VarNorm):
        def forward(self, x):
            mean = x.mean(-1, keepdim=True)
            return (x - mean) / (x.std(-1, keepdim=True, unbiased=False) + self.eps)

    class RootOfVarPlusEps(_VarNorm):
        def forward(self, x):
            mean = x.mean(-1, keepdim=True)
            return (x - mean) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + self.eps)

    class ClampedVar(_VarNorm):  # equal to the others where the variance is far above eps
        def forward(self, x):
            mean = x.mean(-1, keepdim=True)
            return (x - mean) * x.var(-1, keepdim=True, unbiased=False).clamp(min=self.eps).rsqrt()

    class NoEpsHalved(_VarNorm):  # no eps: its 0.5 is not one, nor a clamp
        def forward(self, x):
            mean = x.mean(-1, keepdim=True)
            return 0.5 * (x - mean) / x.std(-1, keepdim=True, unbiased=False) + 0.5 * x

    small = X * 0.01
    for cls, op, added_to in ((StdPlusEps, "std_norm", "std"),
                              (RootOfVarPlusEps, "layer_norm", None),
                              (ClampedVar, "std_norm", "clamp")):
        model = _mlp(lambda: cls(None, eps=0.01))
        graph = graphshape.load(model, X)
        nodes = [n for n in graph if n.op == op]
        assert len(nodes) == 4 and all(n.attrs.get("eps_added_to") == added_to for n in nodes)
        with torch.no_grad():
            torch.testing.assert_close(graphshape.to_torch(graph)(small), model(small),
                                       rtol=1e-5, atol=1e-5)
    graph = graphshape.load(_mlp(lambda: NoEpsHalved(None, eps=0.01)), X)
    assert not [n for n in graph if n.op in ("std_norm", "layer_norm")]


def test_a_weight_inside_the_statistic_is_not_read_as_the_norms():
    # h = weight * (x - mean) whose variance is then taken is the norm of h, not weight *
    # norm(x): at its init weights of ones the two are equal, so the region is evaluated
    # at other weights, and the norm found reads h
    class WeightFirst(_VarNorm):
        def forward(self, x):
            h = self.weight * (x - x.mean(-1, keepdim=True))
            return h / torch.sqrt(h.var(-1, keepdim=True) + 1e-5)

    model = _mlp(lambda: WeightFirst(None))
    graph = graphshape.load(model, X)
    norms = [n for n in graph if n.op == "std_norm"]
    assert len(norms) == 4 and all(n.attrs["centre"] is False for n in norms)
    for norm in norms:
        weighted = graph[norm.inputs[0].node]
        assert weighted.op == "mul" and any(
            graph[r.node].op == "constant" and graph[r.node].attrs.get("trainable")
            for r in weighted.inputs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, WeightFirst):
                m.weight.uniform_(0.5, 1.5)
        torch.testing.assert_close(graphshape.to_torch(graphshape.load(model, X))(X), model(X),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form, q, rel", [
    # x - mean over a variance divided by n - 1: mean square (n - 1) / n, exactly
    ("var, unbiased", (WIDTH - 1) / WIDTH, 1e-3),
    # x itself: its mean adds mean^2 / var, 1 / n on average for zero-mean features
    ("simple norm", 1.0, 0.05),
])
def test_analysis_predicts_through_them(form, q, rel):
    model = _mlp(lambda: _VarNorm(form))
    x = torch.randn(16, 5, WIDTH)
    rows = graphshape.analyze(model, x, empirical=True).rows
    norms = [r for r in rows if r["op"] == "std_norm"]
    assert len(norms) == 4
    for row in norms:
        assert row["q_pred"] == pytest.approx(q)
        assert row["q_emp"] == pytest.approx(q, rel=rel)


@pytest.mark.parametrize("form", ["annotated transformer", "clamped variance"])
def test_an_export_of_them_reads_the_same(tmp_path, form):
    model = _mlp(lambda: _VarNorm(form))
    path = str(tmp_path / "m.onnx")
    torch.onnx.export(model, (X,), path, dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    before = open(path, "rb").read()
    graph = graphshape.load(path)
    assert graph.count_ops().get("std_norm") == 4 and "opaque" not in graph.count_ops()
    shaped = graphshape.shape_onnx(path, str(tmp_path / "shaped.onnx"), method="DKS", seed=0)
    from_torch = graphshape.shape(model, X, method="DKS", seed=0)
    assert shaped.activation_params == from_torch.meta["graphshape"].activation_params
    assert open(path, "rb").read() == before


def test_timm_simple_norm_convnext_shapes_as_the_layer_norm_one():
    # convnext_zepto_rms: timm's SimpleNorm2d, x / sqrt(unbiased var + eps) * weight between
    # two permutes; before, refused as a product of two signals
    timm = pytest.importorskip("timm")
    x = torch.randn(2, 3, 64, 64)
    shaped, counts = {}, {}
    for norm_layer in ("simplenorm", "layernorm2d"):
        torch.manual_seed(0)
        model = timm.create_model("convnext_zepto_rms", num_classes=10,
                                  norm_layer=norm_layer).eval()
        counts[norm_layer] = sum(type(m).__name__ == "SimpleNorm2d" for m in model.modules())
        shaped[norm_layer] = graphshape.shape(model, x, method="DKS", seed=0)
    simple, ln = shaped.values()
    removed = [r["op"] for r in simple.meta["graphshape"].removed]
    assert removed.count("std_norm") == counts["simplenorm"] > 10
    assert simple.meta["graphshape"].activation_params == \
        ln.meta["graphshape"].activation_params
    assert {k: v.shape for k, v in simple.state_dict().items()} == \
        {k: v.shape for k, v in ln.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(simple(x), ln(x), rtol=1e-5, atol=1e-5)


def _dynamo_simple_norm_net(restore_shape=None, broadcast_reduced=False):
    """Conv, then timm's SimpleNorm2d as torch's dynamo exporter writes it: between two
    transposes, ``torch.var`` as ReduceMean(keepdims=1), Sub, Mul(d, d),
    ReduceMean(keepdims=0), the n / (n - 1) scaling, and a Reshape putting the dim back;
    then a GELU and a conv head. ``restore_shape``: another Reshape target;
    ``broadcast_reduced``: divide x by the dropped-dim statistic directly (a broadcast over
    other axes, not a norm)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    c, side = 4, 4  # (equal: the broadcast variant must be valid ONNX)
    inits = [numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32) * 0.3, "w1"),
             numpy_helper.from_array(rng.standard_normal((c, c, 1, 1)).astype(np.float32) * 0.3, "w2"),
             numpy_helper.from_array(np.ones(c, np.float32), "gamma"),
             numpy_helper.from_array(np.array([3], np.int64), "axis"),
             numpy_helper.from_array(np.array(c, np.float32), "n"),
             numpy_helper.from_array(np.array(c - 1, np.float32), "n_1"),
             numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
             numpy_helper.from_array(np.array(restore_shape or (1, side, side, 1), np.int64), "keep")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["h"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("ReduceMean", ["t", "axis"], ["mu"], keepdims=1),
             helper.make_node("Sub", ["t", "mu"], ["d"]),
             helper.make_node("Mul", ["d", "d"], ["d2"]),
             helper.make_node("ReduceMean", ["d2", "axis"], ["m2"], keepdims=0),
             helper.make_node("Mul", ["m2", "n"], ["s2"]),
             helper.make_node("Div", ["s2", "n_1"], ["var"])]
    if broadcast_reduced:
        nodes += [helper.make_node("Add", ["var", "eps"], ["ve"]),
                  helper.make_node("Sqrt", ["ve"], ["sd"]),
                  helper.make_node("Div", ["t", "sd"], ["normed"])]
    else:
        nodes += [helper.make_node("Reshape", ["var", "keep"], ["var_k"]),
                  helper.make_node("Add", ["var_k", "eps"], ["ve"]),
                  helper.make_node("Sqrt", ["ve"], ["sd"]),
                  helper.make_node("Reciprocal", ["sd"], ["r"]),
                  helper.make_node("Mul", ["t", "r"], ["normed"])]
    nodes += [helper.make_node("Mul", ["normed", "gamma"], ["scaled"]),
              helper.make_node("Transpose", ["scaled"], ["back"], perm=[0, 3, 1, 2]),
              helper.make_node("Gelu", ["back"], ["g"]),
              helper.make_node("Conv", ["g", "w2"], ["y"])]
    graph = helper.make_graph(
        nodes, "dynamo_simple_norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, side, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, side, side])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(model)
    return model


def test_a_dynamo_exported_variance_with_dropped_dims_reads_as_the_norm(tmp_path):
    """torch's default exporter writes convnext_zepto_rms's SimpleNorm2d with its
    variance's dim dropped and reshaped back: the norm was not found, and the file was
    refused ("multiplies two signals": the Mul(d, d)) where PyTorch's model shapes."""
    model = _dynamo_simple_norm_net()
    x = np.random.default_rng(1).standard_normal((1, 3, 4, 4)).astype(np.float32)
    path = str(tmp_path / "m.onnx")
    onnx.save(model, path)
    graph = graphshape.load(path)
    ops = graph.count_ops()
    assert ops.get("std_norm") == 1 and "reshape" not in ops and "reduce" not in ops
    node = next(n for n in graph if n.op == "std_norm")
    assert node.attrs["centre"] is False and node.attrs["correction"] == 1
    # the graph computes what the file computes
    from graphshape.backend_onnx import emit
    [got], [want] = run_ort(emit(graph), {"x": x}), run_ort(path, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    shaped = graphshape.shape_onnx(path, str(tmp_path / "shaped.onnx"), method="TAT", seed=0)
    assert any(r["op"] == "std_norm" for r in shaped.removed)


@pytest.mark.parametrize("variant", ["other reshape", "broadcast"])
def test_a_dropped_dim_statistic_used_otherwise_is_not_a_norm(variant):
    """The dropped dims are only read back as size 1 by a reshape that restores them; a
    reshape elsewhere, or the statistic broadcast against x over other axes, is not a norm
    (evaluating it with the dims kept would not be what the file computes)."""
    model = (_dynamo_simple_norm_net(restore_shape=(1, 4, 1, 4)) if variant == "other reshape"
             else _dynamo_simple_norm_net(broadcast_reduced=True))
    graph = graphshape.load(model)
    assert "std_norm" not in graph.count_ops() and "layer_norm" not in graph.count_ops()
