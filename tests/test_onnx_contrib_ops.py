"""onnxruntime's contrib ops (com.microsoft), as onnxruntime.transformers' optimizer and
Hugging Face Optimum write them, read as the standard ops they fuse: Gelu, FastGelu,
BiasGelu, SkipLayerNormalization, the contrib LayerNormalization."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphshape
from test_onnx_roundtrip import run_ort

RNG = np.random.default_rng(0)
HIDDEN = 8


def _init(name, value):
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _block(gelu: str, skip_bias: bool, use_sum: bool, standard: bool = False):
    """Two post-norm blocks on x[2, 5, 8]: MatMul -> gelu -> MatMul -> SkipLayerNorm(skip
    = the residual stream) -> (out, sum). The next block reads ``out``; its skip is the
    previous ``sum`` when ``use_sum`` (the fused op's output 3), else ``out``. ``standard``:
    the same function written with standard ops only (Add, LayerNormalization, Gelu of
    opset 20)."""
    nodes, inits = [], []
    x = stream = "x"
    for b in range(2):
        w1, w2, bias1 = f"w1_{b}", f"w2_{b}", f"b1_{b}"
        inits += [_init(w1, RNG.normal(size=(HIDDEN, HIDDEN)) / np.sqrt(HIDDEN)),
                  _init(w2, RNG.normal(size=(HIDDEN, HIDDEN)) / np.sqrt(HIDDEN)),
                  _init(bias1, RNG.normal(size=HIDDEN) * 0.1),
                  _init(f"g_{b}", 1 + 0.1 * RNG.normal(size=HIDDEN)),
                  _init(f"be_{b}", 0.1 * RNG.normal(size=HIDDEN)),
                  _init(f"sb_{b}", 0.1 * RNG.normal(size=HIDDEN))]
        nodes.append(helper.make_node("MatMul", [x, w1], [f"h_{b}"]))
        if standard:
            nodes.append(helper.make_node("Add", [f"h_{b}", bias1], [f"hb_{b}"]))
            approx = "tanh" if gelu == "FastGelu" else "none"
            nodes.append(helper.make_node("Gelu", [f"hb_{b}"], [f"a_{b}"], approximate=approx))
        elif gelu == "Gelu":
            nodes.append(helper.make_node("Add", [f"h_{b}", bias1], [f"hb_{b}"]))
            nodes.append(helper.make_node("Gelu", [f"hb_{b}"], [f"a_{b}"], domain="com.microsoft"))
        else:  # FastGelu / BiasGelu add the bias themselves
            nodes.append(helper.make_node(gelu, [f"h_{b}", bias1], [f"a_{b}"],
                                          domain="com.microsoft"))
        nodes.append(helper.make_node("MatMul", [f"a_{b}", w2], [f"m_{b}"]))
        if standard:
            nodes.append(helper.make_node("Add", [f"m_{b}", stream], [f"s0_{b}"]))
            total = f"s0_{b}"
            if skip_bias:
                nodes.append(helper.make_node("Add", [total, f"sb_{b}"], [f"s_{b}"]))
                total = f"s_{b}"
            nodes.append(helper.make_node("LayerNormalization", [total, f"g_{b}", f"be_{b}"],
                                          [f"y_{b}"], epsilon=1e-5))
        else:
            ins = [f"m_{b}", stream, f"g_{b}", f"be_{b}"] + ([f"sb_{b}"] if skip_bias else [])
            total = f"s_{b}"
            nodes.append(helper.make_node("SkipLayerNormalization", ins,
                                          [f"y_{b}", "", "", total if use_sum else ""],
                                          domain="com.microsoft", epsilon=1e-5))
        x, stream = f"y_{b}", total if use_sum else f"y_{b}"
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, HIDDEN])],
        [helper.make_tensor_value_info("y_1", TensorProto.FLOAT, [2, 5, HIDDEN])], inits)
    opsets = [helper.make_opsetid("", 20 if standard else 17)]
    if not standard:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)


CASES = [("Gelu", False, False), ("FastGelu", True, True), ("BiasGelu", True, False),
         ("Gelu", True, True)]


@pytest.mark.parametrize("gelu, skip_bias, use_sum", CASES)
def test_contrib_ops_read_as_standard_ops_and_round_trip(gelu, skip_bias, use_sum):
    model = _block(gelu, skip_bias, use_sum)
    graph = graphshape.load(model)
    ops = graph.count_ops()
    assert "opaque" not in ops and ops["layer_norm"] == 2, graph.table()
    act = "gelu" if gelu == "FastGelu" else "gelu_exact"
    assert [n.attrs["name"] for n in graph if n.op == "activation"] == [act, act]
    x = RNG.normal(size=(2, 5, HIDDEN)).astype(np.float32)
    out = graphshape.to_onnx(graph)
    onnx.checker.check_model(out)
    assert not any(n.domain == "com.microsoft" for n in out.graph.node)
    np.testing.assert_allclose(run_ort(out, {"x": x})[0], run_ort(model, {"x": x})[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gelu, skip_bias, use_sum", CASES)
def test_contrib_model_shapes_as_its_standard_twin(gelu, skip_bias, use_sum, tmp_path):
    fused = graphshape.shape_onnx(_block(gelu, skip_bias, use_sum), tmp_path / "f.onnx",
                                  method="DKS")
    twin = graphshape.shape_onnx(_block(gelu, skip_bias, use_sum, standard=True),
                                 tmp_path / "t.onnx", method="DKS")
    assert fused.activation_params == twin.activation_params
    assert len([r for r in fused.removed if r["op"] == "layer_norm"]) == 2
    x = RNG.normal(size=(2, 5, HIDDEN)).astype(np.float32)
    assert np.isfinite(run_ort(str(tmp_path / "f.onnx"), {"x": x})[0]).all()


def test_skip_layer_norm_statistics_outputs_stay_opaque():
    model = _block("Gelu", False, False)
    sln = next(n for n in model.graph.node if n.op_type == "SkipLayerNormalization")
    sln.output[1] = "mean"
    model.graph.output.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, None))
    graph = graphshape.load(model)
    assert graph.count_ops().get("opaque") == 1 and graph.count_ops()["layer_norm"] == 1


def test_onnxruntimes_default_domain_layer_norm_before_opset_17():
    # onnxruntime registers LayerNormalization in the default domain for any opset, and its
    # optimizer writes it into opset 13/14 files, where ONNX has none
    graph = helper.make_graph(
        [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-5)],
        "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, HIDDEN])],
        [_init("g", 1 + 0.1 * RNG.normal(size=HIDDEN)), _init("b", RNG.normal(size=HIDDEN))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    g = graphshape.load(model)
    assert g.count_ops().get("layer_norm") == 1
    x = RNG.normal(size=(2, 5, HIDDEN)).astype(np.float32)
    out = graphshape.to_onnx(g)  # opset 13: written as the decomposition
    np.testing.assert_allclose(run_ort(out, {"x": x})[0], run_ort(model, {"x": x})[0], rtol=1e-4, atol=1e-5)
