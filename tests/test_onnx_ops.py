"""One small round trip per ONNX op the frontend maps, the opset-dependent forms the
backend writes, opaque passthrough, external data and broken files.

Every round trip asserts the canonical op the frontend chose and that onnxruntime gives
the same outputs for the original model and for ``emit(load_onnx(model))``.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphshape import GraphshapeError
from graphshape.backend_onnx import ONNX_EMITTERS, check, emit, save
from graphshape.frontends.onnx_import import load_onnx
from graphshape.ir import Graph, Node, Ref, TensorInfo
from graphshape.ops import OPS

RNG = np.random.default_rng(0)
F = TensorProto.FLOAT


def _init(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def _rand(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _model(nodes, inputs, outputs, inits=(), opset=13):
    """A model from (name, shape) inputs/outputs (outputs' shapes None = inferred)."""
    graph = helper.make_graph(
        nodes, "t",
        [helper.make_tensor_value_info(n, F, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, F, s) for n, s in outputs],
        list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=helper.find_min_ir_version_for(
                                  [helper.make_opsetid("", opset)]))
    if any(s is None for _, s in outputs):  # declare the inferred output shapes
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
        model.graph.ClearField("output")
        model.graph.output.extend(inferred.graph.output)
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model, feeds):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert np.all(np.isfinite(w)), "the reference output is not finite: a vacuous check"
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(w).max())))


def _roundtrip(model, feeds, ops=(), opset=None):
    """Load, check the canonical ops (each of ``ops`` must occur), emit, compare."""
    g = load_onnx(model)
    counts = g.count_ops()
    for op in ops:
        assert counts.get(op, 0) > 0, f"expected a {op!r} node, got {counts}"
    out = emit(g, opset)
    onnx.checker.check_model(out, full_check=True)
    onnx.shape_inference.infer_shapes(out, strict_mode=True)
    assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input
                                                 if i.name not in {t.name for t in model.graph.initializer}]
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    want_opset = opset or model.opset_import[0].version
    assert {o.domain: o.version for o in out.opset_import}[""] == want_opset
    _assert_same(_run(out, feeds), _run(model, feeds))
    return g, out


def _unary(op_type, opset=13, shape=(2, 3, 4, 5), **attrs):
    return _model([helper.make_node(op_type, ["x"], ["y"], **attrs)], [("x", shape)],
                  [("y", None)], opset=opset)


X4 = _rand(2, 3, 4, 5)


# --------------------------------------------------------------------------- activations
@pytest.mark.parametrize("op_type,attrs,opset,act", [
    ("Relu", {}, 13, "relu"),
    ("LeakyRelu", {"alpha": 0.2}, 13, "leaky_relu"),
    ("Elu", {"alpha": 0.7}, 13, "elu"),
    ("Celu", {}, 13, "elu"),  # (alpha 1: the same function)
    ("Selu", {}, 13, "selu"),
    ("Sigmoid", {}, 13, "sigmoid"),
    ("Tanh", {}, 13, "tanh"),
    ("Softplus", {}, 13, "softplus"),
    ("Softsign", {}, 13, "softsign"),
    ("HardSigmoid", {}, 13, "hardsigmoid"),
    ("HardSigmoid", {"alpha": 1 / 6, "beta": 0.5}, 13, "hardsigmoid"),
    ("HardSwish", {}, 14, "hardswish"),
    ("Erf", {}, 13, "erf"),
    ("Gelu", {}, 20, "gelu_exact"),
    ("Gelu", {"approximate": "tanh"}, 20, "gelu"),
    ("Mish", {}, 18, "mish"),
    ("Atan", {}, 13, "atan"),
    ("Asinh", {}, 13, "asinh"),
])
def test_activation_ops(op_type, attrs, opset, act):
    g, _ = _roundtrip(_unary(op_type, opset, **attrs), {"x": X4 * 3}, ["activation"])
    (node,) = [n for n in g if n.op == "activation"]
    assert node.attrs["name"] == act
    if op_type == "LeakyRelu":
        assert node.attrs["negative_slope"] == pytest.approx(0.2)


@pytest.mark.parametrize("slope,weight", [
    (np.float32([0.25]), [0.25]),                                   # one shared slope
    (np.full((1, 1, 5), 0.3, np.float32), [0.3]),                   # equal slopes, any shape
    (np.float32([0.1, -0.2, 0.3]).reshape(3, 1, 1), [0.1, -0.2, 0.3]),   # one per channel
    (np.float32([0.1, 0.2, 0.3]).reshape(1, 3, 1, 1), [0.1, 0.2, 0.3]),
])
def test_prelu_is_a_leaky_relu_with_learnable_slopes(slope, weight):
    m = _model([helper.make_node("PRelu", ["x", "slope"], ["y"])], [("x", (2, 3, 4, 5))],
               [("y", None)], [_init("slope", slope)])
    g, out = _roundtrip(m, {"x": X4}, ["activation"])
    (node,) = [n for n in g if n.op == "activation"]
    assert node.attrs["name"] == "leaky_relu" and node.attrs["learnable_slope"]
    np.testing.assert_allclose(node.params["weight"], weight)
    assert node.attrs["negative_slope"] == pytest.approx(np.mean(weight))
    assert [n.op_type for n in out.graph.node] == ["PRelu"]


def test_prelu_with_slopes_along_another_axis_stays_opaque():
    slope = _init("slope", np.float32([0.1, 0.2, 0.3, 0.4, 0.5]))  # along the width
    m = _model([helper.make_node("PRelu", ["x", "slope"], ["y"])], [("x", (2, 3, 4, 5))],
               [("y", None)], [slope])
    g, _ = _roundtrip(m, {"x": X4}, ["opaque"])
    assert "activation" not in g.count_ops()


@pytest.mark.parametrize("opset,lo,hi,act", [(9, 0.0, 6.0, "relu6"), (13, 0.0, 6.0, "relu6"),
                                             (13, -1.0, 2.0, "hardtanh"), (11, 0.0, None, "relu")])
def test_clip_forms(opset, lo, hi, act):
    if opset < 11:
        node = helper.make_node("Clip", ["x"], ["y"], min=lo, max=hi)
        inits = []
    else:
        inits = [_init("lo", np.float32(lo))] + ([_init("hi", np.float32(hi))] if hi is not None else [])
        node = helper.make_node("Clip", ["x", "lo"] + (["hi"] if hi is not None else []), ["y"])
    m = _model([node], [("x", (2, 3, 4, 5))], [("y", None)], inits, opset)
    g, _ = _roundtrip(m, {"x": X4 * 5}, ["activation"])
    (n,) = [n for n in g if n.op == "activation"]
    assert n.attrs["name"] == act


@pytest.mark.parametrize("gate,act", [("Sigmoid", "silu"), ("HardSigmoid", "hardswish")])
def test_decomposed_gated_activations(gate, act):
    attrs = {"alpha": 1 / 6, "beta": 0.5} if gate == "HardSigmoid" else {}
    m = _model([helper.make_node(gate, ["x"], ["s"], **attrs),
                helper.make_node("Mul", ["x", "s"], ["y"])], [("x", (2, 3, 4, 5))], [("y", None)])
    g, _ = _roundtrip(m, {"x": X4 * 4}, ["activation"])
    assert [n.attrs["name"] for n in g if n.op == "activation"] == [act]
    assert "mul" not in g.count_ops()


def test_pow_two_is_square_and_other_pow_is_opaque():
    m = _model([helper.make_node("Pow", ["x", "two"], ["y"]),
                helper.make_node("Pow", ["y", "three"], ["z"])],
               [("x", (2, 3))], [("z", None)],
               [_init("two", np.float32(2)), _init("three", np.float32(3))])
    g, _ = _roundtrip(m, {"x": _rand(2, 3)}, ["activation", "opaque"])
    assert [n.attrs["name"] for n in g if n.op == "activation"] == ["square"]


@pytest.mark.parametrize("square", ["Pow", "Mul"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("opset", [13, 18])
def test_decomposed_layer_norm_is_fused(square, affine, opset):
    """The exporters' opset<17 LayerNorm (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div,
    Mul, Add) reads as one layer_norm node."""
    def reduce_mean(src, out):
        if opset >= 18:
            return helper.make_node("ReduceMean", [src, "axes"], [out])
        return helper.make_node("ReduceMean", [src], [out], axes=[-1])

    nodes = [reduce_mean("x", "mean"), helper.make_node("Sub", ["x", "mean"], ["d"]),
             helper.make_node("Pow", ["d", "two"], ["sq"]) if square == "Pow"
             else helper.make_node("Mul", ["d", "d"], ["sq"]),
             reduce_mean("sq", "var"),
             helper.make_node("Constant", [], ["eps"], value=_init("e", np.float32(1e-5))),
             helper.make_node("Add", ["var", "eps"], ["ve"]),
             helper.make_node("Sqrt", ["ve"], ["std"]),
             helper.make_node("Div", ["d", "std"], ["n" if affine else "y"])]
    inits = [_init("two", np.float32(2.0)), _init("axes", np.array([-1]))]
    weight = _rand(5) + 1 if affine else np.ones(5, np.float32)
    if affine:
        nodes += [helper.make_node("Mul", ["n", "w"], ["nw"]),
                  helper.make_node("Add", ["b", "nw"], ["y"])]
        inits += [_init("w", weight), _init("b", _rand(5))]
    m = _model(nodes, [("x", (2, 3, 4, 5))], [("y", None)], inits, opset)
    g, _ = _roundtrip(m, {"x": X4 * 2 + 1}, ["layer_norm"])
    assert set(g.count_ops()) == {"input", "layer_norm", "output"}
    (ln,) = [n for n in g if n.op == "layer_norm"]
    assert ln.attrs["normalized_shape"] == (5,) and ln.attrs["eps"] == pytest.approx(1e-5)
    np.testing.assert_array_equal(ln.params["weight"], weight)


@pytest.mark.parametrize("half_first", [False, True])
def test_decomposed_gelu_is_fused(half_first):
    nodes = [helper.make_node("Div", ["x", "sqrt2"], ["s"]),
             helper.make_node("Erf", ["s"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"])]
    if half_first:
        nodes += [helper.make_node("Mul", ["x", "half"], ["xh"]),
                  helper.make_node("Mul", ["xh", "e1"], ["y"])]
    else:
        nodes += [helper.make_node("Mul", ["x", "e1"], ["xe"]),
                  helper.make_node("Mul", ["xe", "half"], ["y"])]
    m = _model(nodes, [("x", (2, 3, 4, 5))], [("y", None)],
               [_init("sqrt2", np.float32(np.sqrt(2))), _init("one", np.float32(1)),
                _init("half", np.float32(0.5))])
    g, _ = _roundtrip(m, {"x": X4 * 3}, ["activation"])
    assert set(g.count_ops()) == {"input", "activation", "output"}
    assert [n.attrs["name"] for n in g if n.op == "activation"] == ["gelu_exact"]


def test_partial_patterns_are_not_fused():
    # the erf value is also a graph output: the GELU pattern must not swallow it
    m = _model([helper.make_node("Div", ["x", "sqrt2"], ["s"]),
                helper.make_node("Erf", ["s"], ["e"]),
                helper.make_node("Add", ["e", "one"], ["e1"]),
                helper.make_node("Mul", ["x", "e1"], ["xe"]),
                helper.make_node("Mul", ["xe", "half"], ["y"])],
               [("x", (2, 3))], [("y", None), ("e", None)],
               [_init("sqrt2", np.float32(np.sqrt(2))), _init("one", np.float32(1)),
                _init("half", np.float32(0.5))])
    g, _ = _roundtrip(m, {"x": _rand(2, 3)}, ["activation", "mul"])
    assert [n.attrs["name"] for n in g if n.op == "activation"] == ["erf"]


# --------------------------------------------------------------------------- affine
@pytest.mark.parametrize("attrs", [
    {"pads": [1, 1, 1, 1], "strides": [2, 2]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
    {"dilations": [2, 2], "pads": [2, 1, 2, 1]},
    {"group": 3, "pads": [0, 1, 2, 1]},
])
def test_conv(attrs):
    groups = attrs.get("group", 1)
    w = _rand(6, 3 // groups, 3, 3)
    m = _model([helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], **attrs)],
               [("x", (2, 3, 9, 9))], [("y", None)], [_init("w", w), _init("b", _rand(6))])
    g, _ = _roundtrip(m, {"x": _rand(2, 3, 9, 9)}, ["conv"])
    (conv,) = [n for n in g if n.op == "conv"]
    assert conv.params["weight"].shape == (6, 3 // groups, 3, 3)
    assert len(conv.attrs["pads"]) == 4 and conv.attrs["groups"] == groups


def test_conv1d_and_conv_transpose():
    m = _model([helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1]),
                helper.make_node("ConvTranspose", ["h", "wt", "bt"], ["y"], strides=[2],
                                 pads=[1, 0], output_padding=[1], group=2)],
               [("x", (1, 4, 7))], [("y", None)],
               [_init("w", _rand(4, 4, 3)), _init("wt", _rand(4, 3, 3)), _init("bt", _rand(6))])
    g, _ = _roundtrip(m, {"x": _rand(1, 4, 7)}, ["conv", "conv_transpose"])
    (ct,) = [n for n in g if n.op == "conv_transpose"]
    assert ct.attrs["out_channels"] == 6 and ct.params["weight"].shape == (4, 3, 3)


@pytest.mark.parametrize("attrs", [{"output_shape": [10, 9]}, {"auto_pad": "SAME_UPPER"},
                                   {"auto_pad": "SAME_LOWER", "output_shape": [9, 8]}])
def test_conv_transpose_output_shape_and_auto_pad_become_pads(attrs):
    m = _model([helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2],
                                 kernel_shape=[3, 3], **attrs)],
               [("x", (1, 2, 5, 4))], [("y", None)], [_init("w", _rand(2, 3, 3, 3))])
    g, _ = _roundtrip(m, {"x": _rand(1, 2, 5, 4)}, ["conv_transpose"])
    assert len([n for n in g if n.op == "conv_transpose"][0].attrs["pads"]) == 4


@pytest.mark.parametrize("attrs,cshape", [
    ({"transB": 1}, (5,)),
    ({"transB": 0, "alpha": 0.5, "beta": 2.0}, (1, 5)),
    ({"transA": 1, "transB": 1}, (3, 5)),
    ({"transB": 1}, None),
])
def test_gemm(attrs, cshape):
    b = _rand(5, 4) if attrs.get("transB") else _rand(4, 5)
    a_shape = (4, 3) if attrs.get("transA") else (3, 4)
    inits = [_init("b", b)] + ([_init("c", _rand(*cshape))] if cshape else [])
    m = _model([helper.make_node("Gemm", ["a", "b"] + (["c"] if cshape else []), ["y"], **attrs)],
               [("a", a_shape)], [("y", None)], inits)
    g, _ = _roundtrip(m, {"a": _rand(*a_shape)}, ["linear"])
    (lin,) = [n for n in g if n.op == "linear"]
    assert lin.params["weight"].shape == (5, 4)  # PyTorch (out, in) layout
    assert ("bias" in lin.params) == (cshape in ((5,), (1, 5)))


def test_matmul_constant_is_linear_with_fused_bias_and_signal_matmul():
    m = _model([helper.make_node("MatMul", ["x", "w"], ["h"]),
                helper.make_node("Add", ["h", "b"], ["h2"]),
                helper.make_node("MatMul", ["h2", "xt"], ["y"])],
               [("x", (2, 3, 4)), ("xt", (2, 5, 3))], [("y", None)],
               [_init("w", _rand(4, 5)), _init("b", _rand(5))])
    g, _ = _roundtrip(m, {"x": _rand(2, 3, 4), "xt": _rand(2, 5, 3)}, ["linear", "matmul"])
    (lin,) = [n for n in g if n.op == "linear"]
    assert lin.params["weight"].shape == (5, 4) and lin.params["bias"].shape == (5,)
    assert "add" not in g.count_ops()


# --------------------------------------------------------------------------- arithmetic, joins
@pytest.mark.parametrize("op_type,op", [("Add", "add"), ("Sub", "sub"), ("Mul", "mul"),
                                        ("Div", "div")])
def test_binary(op_type, op):
    m = _model([helper.make_node("Tanh", ["x"], ["r"]),  # x / tanh(x) stays finite
                helper.make_node(op_type, ["x", "r"], ["s"]),
                helper.make_node(op_type, ["s", "k"], ["y"])],
               [("x", (2, 3, 4, 5))], [("y", None)], [_init("k", _rand(3, 1, 1) + 3)])
    g, _ = _roundtrip(m, {"x": X4}, [op])
    joins = [n for n in g if n.op == op]
    assert len(joins) == 2
    assert {r.node for r in joins[0].inputs} == {"x", "r"}  # a join of two signals


def test_sum_concat_split():
    m = _model([helper.make_node("Relu", ["x"], ["a"]),
                helper.make_node("Sigmoid", ["x"], ["b"]),
                helper.make_node("Sum", ["x", "a", "b"], ["s"]),
                helper.make_node("Split", ["s", "sizes"], ["p", "q"], axis=1),
                helper.make_node("Concat", ["q", "p", "a"], ["y"], axis=-3)],
               [("x", (2, 3, 4, 5))], [("y", None)], [_init("sizes", np.array([1, 2]))])
    g, _ = _roundtrip(m, {"x": X4}, ["sum", "split", "concat"])
    (s,) = [n for n in g if n.op == "sum"]
    assert len(s.inputs) == 3
    assert [n for n in g if n.op == "concat"][0].attrs["axis"] == 1
    assert [n for n in g if n.op == "split"][0].attrs["sizes"] == (1, 2)


@pytest.mark.parametrize("opset,attrs,inputs", [(11, {"split": [2, 4]}, []),
                                                (18, {"num_outputs": 2}, []),
                                                (13, {}, [])])
def test_split_forms(opset, attrs, inputs):
    outs = ["p", "q"]
    m = _model([helper.make_node("Split", ["x"] + inputs, outs, axis=-1, **attrs)],
               [("x", (2, 6))], [(o, None) for o in outs], opset=opset)
    g, _ = _roundtrip(m, {"x": _rand(2, 6)}, ["split"])
    assert sum([n for n in g if n.op == "split"][0].attrs["sizes"]) == 6


@pytest.mark.parametrize("axis,index", [(0, 1), (2, -1), (-1, 0)])
def test_gather_of_one_index_from_a_signal_is_a_select(axis, index):
    # torch's dynamo exporter writes unbind (attention's q, k, v) as Gather with a scalar
    # index; it was opaque, and the analysis stopped there ("unknown after opaque")
    m = _model([helper.make_node("Relu", ["x"], ["r"]),
                helper.make_node("Gather", ["r", "i"], ["y"], axis=axis)],
               [("x", (3, 2, 4, 5))], [("y", None)], [_init("i", np.array(index))])
    g, _ = _roundtrip(m, {"x": _rand(3, 2, 4, 5)}, ["slice", "squeeze"])
    assert g.count_ops().get("opaque", 0) == 0


@pytest.mark.parametrize("axis, index, mapped", [(0, 1, True), (1, 0, True), (-1, 0, False),
                                                 (0, -1, False)])
def test_gather_select_of_unknown_rank(axis, index, mapped):
    # the TorchScript export of attention splits q, k, v behind shapes computed at run
    # time, so shape inference loses the rank: a select on a non-negative axis needs none
    # (here: a Reshape to a shape fed at run time; a constant Reshape restores the output's)
    out_shape = np.take(np.zeros((3, 2, 4, 5)), index, axis=axis).shape
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["h"]),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Gather", ["r", "i"], ["g"], axis=axis),
         helper.make_node("Reshape", ["g", "out_shape"], ["y"])], "t",
        [helper.make_tensor_value_info("x", F, (3, 2, 4, 5)),
         helper.make_tensor_value_info("shape", onnx.TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("y", F, out_shape)],
        [_init("i", np.array(index)), _init("out_shape", np.array(out_shape))])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    feeds = {"x": _rand(3, 2, 4, 5), "shape": np.array([3, 2, 4, 5])}
    g, _ = _roundtrip(m, feeds, ["slice", "squeeze"] if mapped else [])
    assert any(n.attrs.get("op_type") == "Gather" for n in g if n.op == "opaque") != mapped


def test_gather_of_several_indices_stays_opaque():
    several = _model([helper.make_node("Gather", ["x", "i"], ["y"], axis=1)],
                     [("x", (2, 4))], [("y", None)], [_init("i", np.array([0, 2]))])
    g, _ = _roundtrip(several, {"x": _rand(2, 4)}, ["opaque"])
    assert "slice" not in g.count_ops()


# --------------------------------------------------------------------------- normalization
def test_batch_norm_instance_norm_lrn():
    c = 3
    m = _model([helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["h"],
                                 epsilon=1e-3, momentum=0.8),
                helper.make_node("InstanceNormalization", ["h", "s", "b"], ["i"], epsilon=1e-4),
                helper.make_node("LRN", ["i"], ["y"], size=3, alpha=1e-3, beta=0.7, bias=2.0)],
               [("x", (2, 3, 4, 5))], [("y", None)],
               [_init("s", _rand(c) + 1), _init("b", _rand(c)), _init("m", _rand(c)),
                _init("v", np.abs(_rand(c)) + 0.5)])
    g, _ = _roundtrip(m, {"x": X4}, ["batch_norm", "instance_norm", "lrn"])
    bn = [n for n in g if n.op == "batch_norm"][0]
    assert bn.attrs["eps"] == pytest.approx(1e-3) and bn.attrs["momentum"] == pytest.approx(0.2)
    lrn = [n for n in g if n.op == "lrn"][0]
    assert (lrn.attrs["size"], lrn.attrs["k"]) == (3, 2.0)


def _training_mode_batch_norm(graph_outputs=("y",)):
    """As torch writes it: three outputs (onnxruntime crashes on fewer in training mode),
    ``graph_outputs`` of them read."""
    c = 3
    return _model([helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"],
                                    ["y", "mean", "var"], epsilon=1e-3, momentum=0.8,
                                    training_mode=1)],
                  [("x", (2, 3, 4, 5))], [(o, None) for o in graph_outputs],
                  [_init("s", _rand(c) + 1), _init("b", _rand(c)), _init("m", _rand(c)),
                   _init("v", np.abs(_rand(c)) + 0.5)], opset=15)


def test_training_mode_batch_norm_normalizes_by_the_batch():
    # what torch.onnx.export(..., training=TrainingMode.TRAINING) writes: the batch's
    # statistics, the updated running statistics unused; written back as the computation
    model = _training_mode_batch_norm()
    g, out = _roundtrip(model, {"x": X4}, ["batch_norm"])
    bn = next(n for n in g if n.op == "batch_norm")
    assert bn.attrs["track_running_stats"] is False and "running_mean" not in bn.params
    assert "BatchNormalization" not in {n.op_type for n in out.graph.node}
    x = _rand(2, 3, 4, 5, scale=3.0) + 2.0  # another batch: other statistics
    _assert_same(_run(out, {"x": x}), _run(model, {"x": x}))


def test_exported_batch_norm_without_running_statistics_is_a_batch_norm():
    """torch.onnx.export of ``BatchNorm2d(track_running_stats=False)`` computes the batch's
    mean and variance in the graph (ReduceMean...) and gives them to a training-mode
    BatchNormalization, which reads them only for the running-statistic outputs: one
    batch norm (it was opaque, and the file could not be emitted to torch)."""
    torch = pytest.importorskip("torch")
    import io

    import graphshape

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3),
                                torch.nn.BatchNorm2d(4, track_running_stats=False),
                                torch.nn.ReLU()).eval()
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.randn(2, 3, 7, 7),), buffer, dynamo=False, opset_version=17)
    exported = onnx.load_from_string(buffer.getvalue())
    assert "ReduceMean" in {n.op_type for n in exported.graph.node}
    g = load_onnx(exported)
    assert sorted(g.count_ops()) == ["activation", "batch_norm", "conv", "input", "output"]
    x = torch.randn(3, 3, 7, 7) * 2 + 1
    torch.testing.assert_close(graphshape.to_torch(g)(x), model(x), rtol=1e-4, atol=1e-5)


def test_training_mode_batch_norm_whose_running_statistics_are_read_stays_opaque():
    g = load_onnx(_training_mode_batch_norm(("y", "mean")))
    assert g.count_ops().get("opaque") == 1 and "batch_norm" not in g.count_ops()


@pytest.mark.parametrize("affine", [True, False])
def test_torch_batch_norm_without_running_statistics_to_onnx(affine):
    torch = pytest.importorskip("torch")
    import graphshape

    torch.manual_seed(0)
    # default init (weight 1, bias 0): onnxruntime's BatchNormalization(training_mode=1)
    # gets these wrong once its optimizer shares them with the zeros / ones it is given
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3),
                                torch.nn.BatchNorm2d(4, affine=affine, track_running_stats=False),
                                torch.nn.ReLU()).eval()
    x = torch.randn(3, 3, 7, 7)
    for opset in (11, 18):
        out = graphshape.to_onnx(graphshape.load(model, x), opset=opset)
        np.testing.assert_allclose(_run(out, {out.graph.input[0].name: x.numpy()})[0],
                                   model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("axis", [-1, 2])
def test_layer_norm(axis):
    shape = (2, 3, 4, 5)
    norm_shape = shape[axis:] if axis >= 0 else shape[-1:]
    m = _model([helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], axis=axis,
                                 epsilon=1e-3)],
               [("x", shape)], [("y", None)],
               [_init("s", _rand(*norm_shape)), _init("b", _rand(*norm_shape))], opset=17)
    g, _ = _roundtrip(m, {"x": X4}, ["layer_norm"])
    assert [n for n in g if n.op == "layer_norm"][0].attrs["normalized_shape"] == norm_shape
    # before opset 17 the backend decomposes it
    out13 = emit(g, 13)
    assert "LayerNormalization" not in {n.op_type for n in out13.graph.node}
    onnx.checker.check_model(out13, full_check=True)
    _assert_same(_run(out13, {"x": X4}), _run(m, {"x": X4}))


@pytest.mark.parametrize("scale_shape", [(5,), (1,)])
def test_layer_norm_over_dims_shape_inference_does_not_know(scale_shape):
    """swin's ONNX export pads its windows by amounts computed at run time, so the last
    dim of a LayerNormalization input is unknown: the scale's shape gives the normalized
    shape, unless it is 1 (then it may be broadcasting, and the node stays opaque)."""
    m = _model([helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], axis=-1)],
               [("x", (2, 3, 4, "c"))], [("y", (2, 3, 4, "c"))],
               [_init("s", _rand(*scale_shape)), _init("b", _rand(*scale_shape))], opset=17)
    g = load_onnx(m)
    nodes = [n for n in g if n.op == "layer_norm"]
    if scale_shape == (1,):
        assert not nodes and g.count_ops().get("opaque") == 1
        return
    assert nodes[0].attrs["normalized_shape"] == (5,)
    out = emit(g)
    onnx.checker.check_model(out, full_check=True)
    _assert_same(_run(out, {"x": X4}), _run(m, {"x": X4}))


def test_a_sequence_of_tensors_carries_the_signal():
    """Sequences of float tensors (mvit's export builds pooled tensors with Loop and
    SequenceInsert) are "object" values; before, they ended every signal path, so all that
    followed counted as constant (mvit: "no model output depends on a model input")."""
    from graphshape.ir import holds_tensors
    from graphshape.passes.subnetworks import signal_nodes

    m = _model([helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
                helper.make_node("Relu", ["h"], ["r"]),
                helper.make_node("SequenceConstruct", ["r", "r"], ["seq"]),
                helper.make_node("ConcatFromSequence", ["seq"], ["cat"], axis=1),
                helper.make_node("Conv", ["cat", "w2"], ["h2"], pads=[1, 1, 1, 1]),
                helper.make_node("Relu", ["h2"], ["y"])],
               [("x", (2, 3, 4, 5))], [("y", (2, 3, 4, 5))],
               [_init("w1", _rand(3, 3, 3, 3)), _init("w2", _rand(3, 6, 3, 3))], opset=17)
    g = load_onnx(m)
    seq = next(n for n in g if n.op == "opaque" and n.attrs["op_type"] == "SequenceConstruct")
    assert seq.dtype == "object" and holds_tensors(seq)
    relus = [n.name for n in g if n.op == "activation"]
    assert set(relus) <= signal_nodes(g) and len(relus) == 2
    out = emit(g)
    _assert_same(_run(out, {"x": X4[:, :, :, :5]}), _run(m, {"x": X4[:, :, :, :5]}))


def test_group_norm():
    # GroupNormalization-18 (per-group scale) is deprecated and fails onnx.checker: the
    # model is written at 21, where scale and bias are per channel
    opset = 21
    groups, c = 2, 4
    per = c
    x = _rand(2, c, 3, 3)
    m = _model([helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=groups,
                                 epsilon=1e-4)],
               [("x", x.shape)], [("y", x.shape)], [_init("s", _rand(per) + 1), _init("b", _rand(per))],
               opset=opset)
    g, _ = _roundtrip(m, {"x": x}, ["group_norm"])
    assert [n for n in g if n.op == "group_norm"][0].params["weight"].shape == (c,)
    for target in (13, 18, 21):  # decomposed before 21, native from 21
        out = emit(g, target)
        onnx.checker.check_model(out, full_check=True)
        assert ("GroupNormalization" in {n.op_type for n in out.graph.node}) == (target >= 21)
        _assert_same(_run(out, {"x": x}), _run(m, {"x": x}))


# --------------------------------------------------------------------------- pooling
@pytest.mark.parametrize("op_type,attrs,opset", [
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, 13),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                     "count_include_pad": 1, "ceil_mode": 1}, 13),
    ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}, 9),
    ("MaxPool", {"kernel_shape": [3, 3], "dilations": [2, 1], "ceil_mode": 1}, 13),
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}, 13),
])
def test_pools(op_type, attrs, opset):
    x = _rand(1, 2, 9, 8)
    m = _model([helper.make_node(op_type, ["x"], ["y"], **attrs)], [("x", x.shape)],
               [("y", None)], opset=opset)
    op = "avg_pool" if op_type == "AveragePool" else "max_pool"
    g, _ = _roundtrip(m, {"x": x}, [op])
    assert [n for n in g if n.op == op][0].attrs["ceil_mode"] == bool(attrs.get("ceil_mode"))


@pytest.mark.parametrize("op_type,op", [("GlobalAveragePool", "global_avg_pool"),
                                        ("GlobalMaxPool", "global_max_pool")])
def test_global_pools(op_type, op):
    _roundtrip(_unary(op_type), {"x": X4}, [op])


# --------------------------------------------------------------------------- shape ops
@pytest.mark.parametrize("axis,ops", [(1, ["flatten"]), (2, ["flatten"]), (0, ["reshape"]),
                                      (4, ["reshape"]), (-1, ["flatten"]), (-4, ["reshape"])])
def test_flatten(axis, ops):
    _roundtrip(_unary("Flatten", axis=axis), {"x": X4}, ops)


def test_reshape_transpose_and_folded_shape_chain():
    # the exporters' Shape -> Gather -> Unsqueeze -> Concat -> Reshape chain folds away
    m = _model([helper.make_node("Shape", ["x"], ["shp"]),
                helper.make_node("Gather", ["shp", "zero"], ["n"], axis=0),
                helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"]),
                helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
                helper.make_node("Reshape", ["x", "target"], ["flat"]),
                helper.make_node("Reshape", ["flat", "shape2"], ["r"]),
                helper.make_node("Transpose", ["r"], ["y"], perm=[0, 2, 1])],
               [("x", (2, 3, 4, 5))], [("y", (2, 10, 6))],
               [_init("zero", np.array(0)), _init("axes0", np.array([0])),
                _init("minus1", np.array([-1])), _init("shape2", np.array([0, 6, -1]))])
    g, _ = _roundtrip(m, {"x": X4}, ["reshape", "transpose"])
    counts = g.count_ops()
    assert "opaque" not in counts and counts["reshape"] == 2
    reshapes = [n for n in g if n.op == "reshape"]
    assert reshapes[0].attrs["shape"] == (2, -1) and reshapes[1].attrs["shape"] == (2, 6, -1)


def test_shape_chains_on_a_dynamic_batch_resolve_to_static_ops():
    """x.view(x.size(0), -1)-style chains and chunk slices computed from x.shape with a
    symbolic batch: every entry but the batch is known, so they map to reshape (-1 for
    the batch) and constant slices, and shape inference continues after them."""
    nodes = [helper.make_node("Shape", ["x"], ["shp"]),
             helper.make_node("Gather", ["shp", "zero"], ["n"], axis=0),
             helper.make_node("Gather", ["shp", "one"], ["c"], axis=0),
             helper.make_node("Div", ["c", "two"], ["half"]),
             helper.make_node("Unsqueeze", ["half", "axes0"], ["half1"]),
             helper.make_node("Slice", ["x", "start0", "half1", "axes1"], ["part"]),
             helper.make_node("Shape", ["part"], ["pshp"]),
             helper.make_node("Gather", ["pshp", "zero"], ["pn"], axis=0),
             helper.make_node("Unsqueeze", ["pn", "axes0"], ["pn1"]),
             helper.make_node("Concat", ["pn1", "rest"], ["target"], axis=0),
             helper.make_node("Reshape", ["part", "target"], ["flat"]),
             helper.make_node("Relu", ["flat"], ["y"])]
    m = _model(nodes, [("x", ("batch", 4, 3, 5))], [("y", ("batch", 30))],
               [_init("zero", np.array(0)), _init("one", np.array(1)), _init("two", np.array(2)),
                _init("axes0", np.array([0])), _init("start0", np.array([0])),
                _init("axes1", np.array([1])), _init("rest", np.array([30]))])
    g, out = _roundtrip(m, {"x": _rand(3, 4, 3, 5)}, ["slice", "reshape"])
    assert set(g.count_ops()) == {"input", "slice", "reshape", "activation", "output"}
    (sl,) = [n for n in g if n.op == "slice"]
    assert (sl.attrs["starts"], sl.attrs["ends"]) == ((0,), (2,))
    (rs,) = [n for n in g if n.op == "reshape"]
    assert rs.attrs["shape"] == (-1, 30)
    assert g["y"].shape[1] == 30  # shape inference went on past the resolved reshape
    # the batch stays symbolic in the emitted model
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_expand_with_minus_one_entries_resolves_its_shape():
    """torch's exporter writes ``cls_token.expand(n, -1, -1)`` as Expand(cls, Where(Equal(
    target, ConstantOfShape(3) * -1), ConstantOfShape(3), target)); ONNX shape inference
    leaves the expanded token count unknown, and so everything computed from the token.
    Evaluated, it is known: a later concat of the token and the patches then has known sizes (cait and xcit solved other parameters from
    their ONNX exports, which weighed such a concat's inputs equally)."""
    def const(name, value):  # Constant nodes, as the exporter writes them
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value))

    nodes = [const("three", np.array([3])), const("minus1", np.array(-1)),
             const("target", np.array([2, -1, -1])),
             helper.make_node("ConstantOfShape", ["three"], ["ones"],
                              value=numpy_helper.from_array(np.array([1], np.int64))),
             helper.make_node("Mul", ["ones", "minus1"], ["minus_ones"]),
             helper.make_node("Equal", ["target", "minus_ones"], ["is_minus1"]),
             helper.make_node("Where", ["is_minus1", "ones", "target"], ["expand_to"]),
             helper.make_node("Expand", ["cls", "expand_to"], ["tokens"]),
             # the token then meets the signal (as in class attention): not foldable
             helper.make_node("ReduceMean", ["x"], ["pooled"], axes=[1], keepdims=1),
             helper.make_node("Add", ["tokens", "pooled"], ["token"]),
             helper.make_node("Concat", ["token", "x"], ["y"], axis=1)]
    m = _model(nodes, [("x", (2, 5, 4))], [("y", None)],
               [_init("cls", _rand(1, 1, 4))])
    g, _ = _roundtrip(m, {"x": _rand(2, 5, 4)}, ["concat"])
    (cat,) = [n for n in g if n.op == "concat"]
    assert [g.info(r).shape for r in cat.inputs] == [(2, 1, 4), (2, 5, 4)]


@pytest.mark.parametrize("opset", [11, 13])
def test_squeeze_unsqueeze_forms(opset):
    if opset < 13:
        nodes = [helper.make_node("Unsqueeze", ["x"], ["u"], axes=[0, -1]),
                 helper.make_node("Squeeze", ["u"], ["y"], axes=[0])]
        inits = []
    else:
        nodes = [helper.make_node("Unsqueeze", ["x", "ua"], ["u"]),
                 helper.make_node("Squeeze", ["u", "sa"], ["y"])]
        inits = [_init("ua", np.array([0, -1])), _init("sa", np.array([0]))]
    m = _model(nodes, [("x", (3, 4))], [("y", None)], inits, opset)
    g, _ = _roundtrip(m, {"x": _rand(3, 4)}, ["squeeze", "unsqueeze"])
    assert [n for n in g if n.op == "unsqueeze"][0].attrs["axes"] == (0, 3)
    for target in (9, 13, 21):  # attribute form before 13, input form after
        out = emit(g, target)
        onnx.checker.check_model(out, full_check=True)
        _assert_same(_run(out, {"x": _rand(3, 4) * 0 + 1}), [np.ones((3, 4, 1), np.float32)])


@pytest.mark.parametrize("opset", [9, 13])
def test_slice_forms(opset):
    if opset < 10:
        nodes = [helper.make_node("Slice", ["x"], ["y"], starts=[1, 0], ends=[3, 1000], axes=[1, 3])]
        inits = []
    else:
        nodes = [helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["y"])]
        inits = [_init("st", np.array([1, -1])), _init("en", np.array([2**63 - 1, 0])),
                 _init("ax", np.array([1, 3])), _init("sp", np.array([1, -2]))]
    m = _model(nodes, [("x", (2, 3, 4, 5))], [("y", None)], inits, opset)
    g, _ = _roundtrip(m, {"x": X4}, ["slice"])
    assert [n for n in g if n.op == "slice"][0].attrs["axes"] == (1, 3)


@pytest.mark.parametrize("opset,mode", [(9, "constant"), (13, "reflect"), (13, "edge"),
                                        (18, "constant")])
def test_pad_forms(opset, mode):
    pads = [0, 0, 1, 2, 0, 0, 2, 1]
    if opset < 11:
        nodes = [helper.make_node("Pad", ["x"], ["y"], pads=pads, mode=mode, value=1.5)]
        inits = []
    elif opset >= 18:  # pads over selected axes only
        nodes = [helper.make_node("Pad", ["x", "p", "v", "ax"], ["y"], mode=mode)]
        inits = [_init("p", np.array([1, 2, 2, 1])), _init("v", np.float32(1.5)),
                 _init("ax", np.array([2, 3]))]
    else:
        nodes = [helper.make_node("Pad", ["x", "p"], ["y"], mode=mode)]
        inits = [_init("p", np.array(pads))]
    m = _model(nodes, [("x", (2, 3, 4, 5))], [("y", None)], inits, opset)
    g, _ = _roundtrip(m, {"x": X4}, ["pad"])
    assert [n for n in g if n.op == "pad"][0].attrs["pads"] == tuple(pads)
    out9 = emit(g, 9 if mode != "reflect" else 11)  # and in the other form
    _assert_same(_run(out9, {"x": X4}), _run(m, {"x": X4}))


@pytest.mark.parametrize("opset", [9, 13])
def test_dropout_identity(opset):
    if opset < 12:
        drop = helper.make_node("Dropout", ["x"], ["d"], ratio=0.3)
        inits = []
    else:
        drop = helper.make_node("Dropout", ["x", "r"], ["d"])
        inits = [_init("r", np.float32(0.3))]
    m = _model([drop, helper.make_node("Identity", ["d"], ["y"])], [("x", (2, 3))],
               [("y", None)], inits, opset)
    g, _ = _roundtrip(m, {"x": _rand(2, 3)}, ["dropout", "identity"])
    assert [n for n in g if n.op == "dropout"][0].attrs["p"] == pytest.approx(0.3)


@pytest.mark.parametrize("opset,axis", [(11, 1), (11, -1), (13, 1), (9, None)])
@pytest.mark.parametrize("op_type", ["Softmax", "LogSoftmax"])
def test_softmax_semantics_by_opset(opset, axis, op_type):
    attrs = {} if axis is None else {"axis": axis}
    m = _unary(op_type, opset, **attrs)
    op = "softmax" if op_type == "Softmax" else "log_softmax"
    g, _ = _roundtrip(m, {"x": X4}, [op])
    if opset < 13 and axis != -1:
        # before 13 the op flattens to 2-D at `axis`: kept exact by reshapes around it
        assert g.count_ops()["reshape"] == 2
    # the same IR written at the other side of the opset-13 change
    other = emit(g, 11 if opset >= 13 else 13)
    onnx.checker.check_model(other, full_check=True)
    _assert_same(_run(other, {"x": X4}), _run(m, {"x": X4}))


@pytest.mark.parametrize("op_type,opset,kind", [("ReduceMean", 11, "mean"),
                                                ("ReduceMean", 18, "mean"),
                                                ("ReduceSum", 13, "sum"),
                                                ("ReduceMax", 13, "max"),
                                                ("ReduceMin", 13, "min"),
                                                ("ReduceProd", 13, "prod")])
def test_reduce_forms(op_type, opset, kind):
    input_form = opset >= 18 or (op_type == "ReduceSum" and opset >= 13)
    if input_form:
        node = helper.make_node(op_type, ["x", "axes"], ["y"], keepdims=0)
        inits = [_init("axes", np.array([-1, 1]))]
    else:
        node = helper.make_node(op_type, ["x"], ["y"], axes=[-1, 1], keepdims=0)
        inits = []
    m = _model([node], [("x", (2, 3, 4, 5))], [("y", None)], inits, opset)
    g, _ = _roundtrip(m, {"x": X4}, ["reduce"])
    r = [n for n in g if n.op == "reduce"][0]
    assert (r.attrs["kind"], r.attrs["axes"], r.attrs["keepdims"]) == (kind, (3, 1), False)
    for target in (13, 18):
        _assert_same(_run(emit(g, target), {"x": X4}), _run(m, {"x": X4}))


# --------------------------------------------------------------------------- folding
def test_initializer_inputs_constant_of_shape_and_constant_are_folded():
    nodes = [helper.make_node("Constant", [], ["shape"], value=_init("v", np.array([4, 3, 1, 1]))),
             helper.make_node("ConstantOfShape", ["shape"], ["w"],
                              value=_init("fill", np.array([0.25], np.float32))),
             helper.make_node("Conv", ["x", "w", "b"], ["y"])]
    graph = helper.make_graph(
        nodes, "t",
        [helper.make_tensor_value_info("x", F, (1, 3, 4, 4)),
         helper.make_tensor_value_info("b", F, (4,))],  # an initializer listed as input
        [helper.make_tensor_value_info("y", F, (1, 4, 4, 4))], [_init("b", _rand(4))])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=4)
    g, out = _roundtrip(m, {"x": _rand(1, 3, 4, 4)}, ["conv"])
    assert g.inputs == ["x"]
    (conv,) = [n for n in g if n.op == "conv"]
    assert np.all(conv.params["weight"] == 0.25) and conv.params["weight"].shape == (4, 3, 1, 1)
    assert [i.name for i in out.graph.input] == ["x"]


# --------------------------------------------------------------------------- opaque
@pytest.mark.parametrize("attrs", [{"transA": 1, "beta": 2.0}, {"transB": 1, "alpha": 0.5},
                                   {"transA": 1, "transB": 1, "alpha": 3.0, "beta": 0.5}])
def test_gemm_of_signals_is_matmul_with_scales(attrs):
    a_shape = (4, 3) if attrs.get("transA") else (3, 4)
    b_shape = (5, 4) if attrs.get("transB") else (4, 5)
    m = _model([helper.make_node("Relu", ["b0"], ["b"]),
                helper.make_node("Gemm", ["a", "b", "c"], ["y"], **attrs)],
               [("a", a_shape), ("b0", b_shape), ("c", (3, 5))], [("y", None)])
    feeds = {"a": _rand(*a_shape), "b0": _rand(*b_shape), "c": _rand(3, 5)}
    g, _ = _roundtrip(m, feeds, ["matmul", "add"])
    counts = g.count_ops()
    assert "opaque" not in counts and "linear" not in counts
    assert counts.get("transpose", 0) == attrs.get("transA", 0) + attrs.get("transB", 0)


def test_opaque_passthrough_keeps_attributes_and_optional_inputs():
    m = _model([helper.make_node("Cos", ["x"], ["c"]),
                helper.make_node("TopK", ["c", "k"], ["v", "i"], axis=-1, largest=0),
                # (a TensorFlow form of Resize: graphshape has no canonical op for it)
                helper.make_node("Resize", ["v", "", "scales"], ["y"], mode="nearest",
                                 coordinate_transformation_mode="tf_half_pixel_for_nn")],
               [("x", (1, 2, 3, 6))], [("y", None)],
               [_init("k", np.array([4])), _init("scales", np.array([1, 1, 2, 1], np.float32))])
    g, out = _roundtrip(m, {"x": _rand(1, 2, 3, 6)}, ["opaque"])
    ops = {n.attrs["op_type"]: n for n in g if n.op == "opaque"}
    assert set(ops) == {"Cos", "TopK", "Resize"}
    assert ops["TopK"].attrs["attributes"]["largest"].i == 0
    assert ops["Resize"].attrs["input_positions"] == (0, None, 1)
    resize = [n for n in out.graph.node if n.op_type == "Resize"][0]
    assert resize.input[1] == ""
    # TopK changed at opset 11: writing the opset-13 node into opset 10 is refused
    with pytest.raises(GraphshapeError, match="TopK"):
        emit(g, 10)


def test_opaque_subgraph_reads_outer_values():
    then_g = helper.make_graph([helper.make_node("Add", ["x", "x"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", F, None)])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", F, None)])
    m = _model([helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
                helper.make_node("Greater", ["s", "zero"], ["cond"]),
                helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)],
               [("x", (2, 3))], [("y", None)], [_init("zero", np.float32(0))], opset=11)
    g, _ = _roundtrip(m, {"x": _rand(2, 3)}, ["opaque"])
    (iff,) = [n for n in g if n.op == "opaque" and n.attrs["op_type"] == "If"]
    assert iff.attrs["outer_scope"] == ("x",)


def test_model_local_function_is_carried_through():
    fn = helper.make_function("custom.fn", "Swish2", ["a"], ["b"],
                              [helper.make_node("Sigmoid", ["a"], ["s"]),
                               helper.make_node("Mul", ["a", "s"], ["m"]),
                               helper.make_node("Add", ["m", "m"], ["b"])],
                              [helper.make_opsetid("", 13)])
    graph = helper.make_graph([helper.make_node("Swish2", ["x"], ["y"], domain="custom.fn")], "t",
                              [helper.make_tensor_value_info("x", F, (2, 3))],
                              [helper.make_tensor_value_info("y", F, (2, 3))])
    m = helper.make_model(graph, functions=[fn], ir_version=8,
                          opset_imports=[helper.make_opsetid("", 13),
                                         helper.make_opsetid("custom.fn", 1)])
    g, out = _roundtrip(m, {"x": _rand(2, 3)}, ["opaque"])
    (node,) = [n for n in g if n.op == "opaque"]
    assert (node.attrs["op_type"], node.attrs["domain"]) == ("Swish2", "custom.fn")
    assert [f.name for f in out.functions] == ["Swish2"]


def test_conv_padding_mode_becomes_pad_then_conv():
    torch = pytest.importorskip("torch")
    conv = torch.nn.Conv2d(3, 4, 3, padding=(1, 2), padding_mode="reflect").eval()
    x = _rand(1, 3, 6, 7)
    weight, bias = conv.weight.detach().numpy(), conv.bias.detach().numpy()
    g = _ir_graph(lambda g: g.add(Node(
        "conv", "conv", [Ref("x")],
        {"dims": 2, "in_channels": 3, "out_channels": 4, "kernel_shape": (3, 3),
         "stride": (1, 1), "pads": (1, 2, 1, 2), "dilation": (1, 1), "groups": 1,
         "padding_mode": "reflect"}, {"weight": weight, "bias": bias},
        outputs=[TensorInfo((1, 4, 6, 9), "float32")])).out, shape=(1, 3, 6, 7))
    out = emit(g)
    assert [n.op_type for n in out.graph.node] == ["Pad", "Conv"]
    onnx.checker.check_model(out, full_check=True)
    with torch.no_grad():
        want = conv(torch.from_numpy(x)).numpy()
    _assert_same(_run(out, {"x": x}), [want])


def test_outputs_that_are_constants_or_repeated_keep_their_names():
    m = _model([helper.make_node("Relu", ["x"], ["r"]),
                helper.make_node("Identity", ["r"], ["r2"]),
                helper.make_node("Shape", ["x"], ["shp"])],
               [("x", (2, 3))], [("r", (2, 3)), ("r2", (2, 3))], opset=13)
    m.graph.output.append(helper.make_tensor_value_info("shp", TensorProto.INT64, (2,)))
    g, out = _roundtrip(m, {"x": _rand(2, 3)})
    assert [o.name for o in out.graph.output] == ["r", "r2", "shp"]
    assert g[g.output_nodes[2]].inputs[0].node in {n.name for n in g if n.op == "constant"}


def test_an_output_that_is_the_input_goes_through_identity():
    g = _ir_graph(lambda g: Ref("x"), shape=(2, 3))
    out = emit(g)
    onnx.checker.check_model(out, full_check=True)
    assert [n.op_type for n in out.graph.node] == ["Identity"]
    x = _rand(2, 3)
    _assert_same(_run(out, {"x": x}), [x])


def test_torch_opaque_is_refused_with_node_name():
    g = Graph({"source": "torch"})
    g.add(Node("x", "input", [], {"name": "x"}, outputs=[TensorInfo((2, 3), "float32")]))
    g.add(Node("weird_call", "opaque", [Ref("x")],
               {"framework": "torch", "fx_op": "call_function", "target": "torch.cumsum",
                "description": "torch.cumsum"}, outputs=[TensorInfo((2, 3), "float32")]))
    g.add(Node("out", "output", [Ref("weird_call")], {"name": "out"}))
    with pytest.raises(GraphshapeError, match="weird_call"):
        emit(g)


# --------------------------------------------------------------------------- torch-style IR
def _ir_graph(build, shape=(2, 3, 4, 5), source="torch"):
    g = Graph({"source": source})
    g.add(Node("x", "input", [], {"name": "x"}, outputs=[TensorInfo(shape, "float32")]))
    last = build(g)
    g.add(Node("out", "output", [last], {"name": "out"}))
    return g


@pytest.mark.parametrize("name,attrs", [
    ("relu", {}), ("leaky_relu", {"negative_slope": 0.1}), ("elu", {"alpha": 0.5}),
    ("selu", {}), ("sigmoid", {}), ("tanh", {}), ("softplus", {}), ("softsign", {}),
    ("hardsigmoid", {}), ("hardswish", {}), ("relu6", {}),
    ("hardtanh", {"min_val": -0.5, "max_val": 2.0}), ("erf", {}), ("gelu", {}),
    ("gelu_exact", {}), ("silu", {}), ("swish", {}), ("mish", {}), ("square", {}),
    ("bentid", {}), ("atan", {}), ("asinh", {}),
])
@pytest.mark.parametrize("opset", [13, 21])
def test_registry_activations_emit_with_transform(name, attrs, opset):
    """torch-style IR: activation by registry name with attrs["transform"]; the ONNX
    output must equal output_scale * (phi(input_scale * x + input_shift) + output_shift)
    with phi from graphshape.activations."""
    from graphshape import activations

    transform = {"input_scale": 1.3, "input_shift": -0.2, "output_shift": 0.1,
                 "output_scale": 0.7}
    g = _ir_graph(lambda g: g.add(Node("act", "activation", [Ref("x")],
                                       {"name": name, **attrs, "transform": transform},
                                       outputs=[TensorInfo((2, 3, 4, 5), "float32")])).out)
    out = emit(g, opset)
    onnx.checker.check_model(out, full_check=True)
    x = X4 * 3
    (got,) = _run(out, {"x": x})
    phi = activations.get(name).fn
    want = 0.7 * (phi(1.3 * x.astype(np.float64) - 0.2, **attrs) + 0.1)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_torch_style_shape_ops_and_weighted_sum():
    def build(g):
        g.add(Node("f", "flatten", [Ref("x")], {"start_dim": 1, "end_dim": 2},
                   outputs=[TensorInfo((2, 12, 5), "float32")]))
        g.add(Node("r", "reshape", [Ref("f")], {"shape": (2, -1)},
                   outputs=[TensorInfo((2, 60), "float32")]))
        g.add(Node("a", "affine", [Ref("x")], {"axis": 1},
                   {"scale": np.array([1, 2, 3], np.float32), "shift": np.ones(3, np.float32)},
                   outputs=[TensorInfo((2, 3, 4, 5), "float32")]))
        g.add(Node("af", "flatten", [Ref("a")], {"start_dim": 1, "end_dim": -1},
                   outputs=[TensorInfo((2, 60), "float32")]))
        g.add(Node("s", "sum", [Ref("r"), Ref("af")], {"weights": (0.6, 0.8)},
                   outputs=[TensorInfo((2, 60), "float32")]))
        g.add(Node("ad", "adaptive_avg_pool", [Ref("x")], {"dims": 2, "output_size": (2, 1)},
                   outputs=[TensorInfo((2, 3, 2, 1), "float32")]))
        g.add(Node("adf", "flatten", [Ref("ad")], {"start_dim": 1, "end_dim": -1},
                   outputs=[TensorInfo((2, 6), "float32")]))
        g.add(Node("c", "concat", [Ref("s"), Ref("adf")], {"axis": 1},
                   outputs=[TensorInfo((2, 66), "float32")]))
        return Ref("c")

    g = _ir_graph(build)
    out = emit(g)
    assert out.opset_import[0].version == 17  # torch sources default to opset 17
    onnx.checker.check_model(out, full_check=True)
    (got,) = _run(out, {"x": X4})
    scale = np.array([1, 2, 3], np.float32).reshape(3, 1, 1)
    want_s = 0.6 * X4.reshape(2, -1) + 0.8 * (X4 * scale + 1).reshape(2, -1)
    want_ad = X4.reshape(2, 3, 2, 2, 5).mean(axis=(3, 4)).reshape(2, 6)
    np.testing.assert_allclose(got, np.concatenate([want_s, want_ad], 1), rtol=1e-5, atol=1e-5)


def test_check_and_opset_range_errors():
    out = emit(load_onnx(_unary("Relu")))
    check(out)  # passes
    out.graph.node[0].input[0] = "nowhere"
    with pytest.raises(GraphshapeError, match="onnx.checker"):
        check(out)
    with pytest.raises(GraphshapeError, match="opset 8"):
        emit(load_onnx(_unary("Relu")), 8)


def test_every_canonical_op_has_an_onnx_emitter():
    assert set(ONNX_EMITTERS) == set(OPS)


# --------------------------------------------------------------------------- files
def _conv_model():
    return _model([helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1]),
                   helper.make_node("Relu", ["h"], ["y"])],
                  [("x", (1, 3, 8, 8))], [("y", None)], [_init("w", _rand(16, 3, 3, 3))])


def test_external_data_round_trip(tmp_path):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    model = _conv_model()
    reference = onnx.ModelProto()
    reference.CopyFrom(model)  # onnx.save converts `model` to external data in place
    onnx.save(model, src_dir / "m.onnx", save_as_external_data=True, location="m.weights",
              size_threshold=0)
    assert (src_dir / "m.weights").stat().st_size >= 16 * 27 * 4
    g = load_onnx(str(src_dir / "m.onnx"))
    out = emit(g)
    dst = tmp_path / "dst" / "out.onnx"
    before = out.SerializeToString()
    save(out, dst, external_data=True, size_threshold=0)
    assert out.SerializeToString() == before  # the caller's model keeps its weights
    assert sorted(os.listdir(dst.parent)) == ["out.onnx", "out.onnx.data"]  # no temp files left
    assert os.path.getsize(dst) < 16 * 27 * 4  # the weights are in the data file
    reloaded = onnx.load(str(dst))
    feeds = {"x": _rand(1, 3, 8, 8)}
    _assert_same(_run(reloaded, feeds), _run(reference, feeds))
    # and it reads back through graphshape as well
    assert load_onnx(str(dst)).count_ops()["conv"] == 1


def test_save_without_external_data_is_one_file(tmp_path):
    out = emit(load_onnx(_conv_model()))
    save(out, tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == ["m.onnx"]
    assert onnx.load(str(tmp_path / "m.onnx")).graph.node[0].op_type == "Conv"


@pytest.mark.parametrize("location", ["../outside.bin", "ABSOLUTE"])
def test_external_data_outside_the_folder_is_refused(tmp_path, location):
    inner = tmp_path / "model"
    inner.mkdir()
    outside = tmp_path / "outside.bin"
    w = _rand(16, 3, 3, 3)
    outside.write_bytes(w.tobytes())
    model = _conv_model()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    loc = str(outside) if location == "ABSOLUTE" else location
    for key, value in (("location", loc), ("offset", "0"), ("length", str(w.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    path = inner / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(GraphshapeError, match="outside the model's folder"):
        load_onnx(str(path))


def test_corrupt_truncated_and_missing_files(tmp_path):
    data = _conv_model().SerializeToString()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\xff\xff\xff" + os.urandom(64))
    for path in (truncated, garbage):
        with pytest.raises(GraphshapeError, match="truncated"):
            load_onnx(str(path))
    with pytest.raises(GraphshapeError, match="no such"):
        load_onnx(str(tmp_path / "missing.onnx"))
