"""onnxruntime's contrib ops (com.microsoft), as onnxruntime.transformers' optimizer and
Hugging Face Optimum write them, read as the standard ops they fuse: Gelu, FastGelu,
BiasGelu, SkipLayerNormalization, the contrib LayerNormalization; and those of a file
onnxruntime saved optimized (``SessionOptions.optimized_model_filepath``): FusedConv,
FusedGemm, FusedMatMul, QuickGelu."""

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
    # shape inference went on past the fused ops (standard stand-ins for it)
    unknown = [n.name for n in graph for r in range(len(n.outputs))
               if n.op != "output" and graph.info(type(n.out)(n.name, r)).shape is None]
    assert not unknown, unknown
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


# ------------------------------------------------- files onnxruntime saved after optimizing
def _ort_optimized(model, tmp_path, level="ORT_ENABLE_EXTENDED"):
    """``model`` as onnxruntime writes it after its graph optimizations at ``level``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    opts.optimized_model_filepath = str(tmp_path / f"{level}.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return onnx.load(opts.optimized_model_filepath)


def _cnn_export(tmp_path, activation):
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), activation(), nn.Conv2d(8, 8, 3, padding=1), activation(),
        nn.Conv2d(8, 8, 3, stride=2), activation(), nn.Flatten(), nn.Linear(8 * 7 * 7, 16),
        activation(), nn.Linear(16, 4)).eval()
    path = tmp_path / "cnn.onnx"
    torch.onnx.export(model, torch.randn(2, 3, 16, 16), str(path), opset_version=17,
                      dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    return onnx.load(str(path))


@pytest.mark.parametrize("activation, fused", [
    ("ReLU", "FusedConv"), ("SiLU", "QuickGelu"), ("Tanh", "FusedConv"),
    ("Sigmoid", "FusedConv"), ("Hardtanh", "FusedConv")])
def test_onnxruntime_optimized_file_reads_as_its_export(activation, fused, tmp_path):
    from torch import nn

    export = _cnn_export(tmp_path, getattr(nn, activation))
    optimized = _ort_optimized(export, tmp_path)
    assert fused in {n.op_type for n in optimized.graph.node if n.domain == "com.microsoft"}
    graph = graphshape.load(optimized)
    assert "opaque" not in graph.count_ops(), graph.table()
    source = graphshape.load(export)
    assert graph.count_ops()["activation"] == source.count_ops()["activation"] == 4
    # a FusedConv keeps the name of the Conv it fused (the layer's, parameter names follow)
    assert [n.name for n in graph if n.op == "conv"] == [n.name for n in source if n.op == "conv"]
    assert graph.count_ops()["conv"] == 3 and graph.count_ops()["linear"] == 2
    # the shapes of the values after the fused ops are known (shape inference's stand-ins)
    assert all(graph.info(n.inputs[0]).shape is not None for n in graph if n.op == "linear")
    x = RNG.normal(size=(3, 3, 16, 16)).astype(np.float32)
    want_y = run_ort(export, {"x": x})[0]
    written = graphshape.to_onnx(graph)
    assert not any(n.domain for n in written.graph.node)  # written back as standard ONNX
    np.testing.assert_allclose(run_ort(written, {"x": x})[0], want_y, rtol=1e-4, atol=1e-5)
    got = graphshape.to_torch(optimized)(__import__("torch").from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, want_y, rtol=1e-4, atol=1e-5)
    # the same DKS parameters (hardtanh: the same refusal, it has none)
    assert _dks(optimized, tmp_path / "a.onnx") == _dks(export, tmp_path / "b.onnx")


def _dks(model, out):
    try:
        return graphshape.shape_onnx(model, out, method="DKS").activation_params
    except graphshape.GraphshapeError as e:
        return str(e)


def _single_node_model(node, x_shape, inits, opset=17):
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   helper.make_opsetid("com.microsoft", 1)],
                             ir_version=8)


@pytest.mark.parametrize("activation, params, op", [
    ("LeakyRelu", [0.2], "leaky_relu"), ("HardSigmoid", [0.3, 0.4], "hardsigmoid"),
    ("Clip", [-0.5, 0.7], "hardtanh"), ("", [], None)])
@pytest.mark.parametrize("with_sum", [False, True])
def test_fused_conv_with_activation_and_sum(activation, params, op, with_sum):
    inits = [_init("w", RNG.normal(size=(4, 3, 3, 3)) / 3), _init("b", RNG.normal(size=4))]
    inputs = ["x", "w", "b"]
    if with_sum:  # Z, added to the convolution before the activation
        inits.append(_init("z", RNG.normal(size=(2, 4, 5, 5))))
        inputs.append("z")
    attrs = {"activation": activation, "activation_params": params} if activation else {}
    node = helper.make_node("FusedConv", inputs, ["y"], domain="com.microsoft",
                            kernel_shape=[3, 3], pads=[1, 1, 1, 1], **attrs)
    model = _single_node_model(node, (2, 3, 5, 5), inits)
    graph = graphshape.load(model)
    ops = graph.count_ops()
    assert "opaque" not in ops and ops["conv"] == 1 and ops.get("add", 0) == int(with_sum)
    assert [n.attrs["name"] for n in graph if n.op == "activation"] == ([op] if op else [])
    x = RNG.normal(size=(2, 3, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(run_ort(graphshape.to_onnx(graph), {"x": x})[0],
                               run_ort(model, {"x": x})[0], rtol=1e-4, atol=1e-5)


def test_fused_gemm_and_quick_gelu():
    inits = [_init("w", RNG.normal(size=(6, 4)) / 2), _init("c", RNG.normal(size=6))]
    gemm = helper.make_node("FusedGemm", ["x", "w", "c"], ["h"], domain="com.microsoft",
                            transB=1, alpha=0.5, activation="LeakyRelu", activation_alpha=0.1)
    gelu = helper.make_node("QuickGelu", ["h"], ["y"], domain="com.microsoft", alpha=1.702)
    graph = helper.make_graph(
        [gemm, gelu], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              ir_version=8)
    g = graphshape.load(model)
    assert "opaque" not in g.count_ops() and g.count_ops()["linear"] == 1
    acts = {n.attrs["name"]: n.attrs for n in g if n.op == "activation"}
    assert acts["leaky_relu"]["negative_slope"] == pytest.approx(0.1)
    assert acts["silu"]["transform"]["input_scale"] == pytest.approx(1.702)
    x = RNG.normal(size=(3, 4)).astype(np.float32)
    want = run_ort(model, {"x": x})[0]
    np.testing.assert_allclose(run_ort(graphshape.to_onnx(g), {"x": x})[0], want,
                               rtol=1e-4, atol=1e-5)
    got = graphshape.to_torch(g)(__import__("torch").from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("trans_a, trans_b, alpha", [(0, 1, 1.0), (1, 0, 0.125), (1, 1, 2.0)])
@pytest.mark.parametrize("weight", [True, False])
def test_fused_matmul(trans_a, trans_b, alpha, weight):
    """onnxruntime's MatMul with transposes and a scale (MLP-Mixer's token mixing, attention
    scores): a linear when B is a weight, a matmul of two signals otherwise."""
    x_shape = (2, 5, 3) if trans_a else (2, 3, 5)  # A (or Aᵀ) is [2, 3, 5]
    b_shape = (4, 5) if trans_b else (5, 4)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))]
    inits = []
    if weight:
        inits.append(_init("b", RNG.normal(size=b_shape)))
    else:
        b_shape = (2, *b_shape)
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, list(b_shape)))
    nodes = [helper.make_node("FusedMatMul", ["x", "b"], ["h"], domain="com.microsoft",
                              transA=trans_a, transB=trans_b, alpha=alpha),
             helper.make_node("Relu", ["h"], ["y"])]
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              ir_version=8)
    g = graphshape.load(model)
    ops = g.count_ops()
    assert "opaque" not in ops and ops.get("linear" if weight else "matmul") == 1, g.table()
    relu = next(n for n in g if n.op == "activation")
    assert g.info(relu.inputs[0]).shape == (2, 3, 4)  # shape inference went on past it
    feeds = {"x": RNG.normal(size=x_shape).astype(np.float32)}
    if not weight:
        feeds["b"] = RNG.normal(size=b_shape).astype(np.float32)
    np.testing.assert_allclose(run_ort(graphshape.to_onnx(g), feeds)[0],
                               run_ort(model, feeds)[0], rtol=1e-4, atol=1e-5)


def test_a_fused_matmul_that_moves_batch_axes_stays_opaque():
    node = helper.make_node("FusedMatMul", ["x", "b"], ["y"], domain="com.microsoft",
                            transBatchA=1)
    graph = graphshape.load(_single_node_model(node, (2, 3, 4),
                                               [_init("b", RNG.normal(size=(4, 5)))]))
    assert graph.count_ops().get("opaque") == 1


def test_a_fused_activation_graphshape_cannot_read_stays_opaque():
    inits = [_init("w", RNG.normal(size=(4, 3, 1, 1)))]
    node = helper.make_node("FusedConv", ["x", "w"], ["y"], domain="com.microsoft",
                            activation="Softsign")
    graph = graphshape.load(_single_node_model(node, (2, 3, 5, 5), inits))
    assert graph.count_ops().get("opaque") == 1 and "conv" not in graph.count_ops()


def test_a_file_in_onnxruntimes_blocked_layout_is_refused_with_the_way_out():
    inits = [_init("w", RNG.normal(size=(8, 8, 1, 1)))]
    node = helper.make_node("Conv", ["x", "w"], ["y"], domain="com.microsoft.nchwc")
    model = _single_node_model(node, (1, 8, 4, 4), inits)
    model.opset_import.append(helper.make_opsetid("com.microsoft.nchwc", 1))
    with pytest.raises(graphshape.GraphshapeError, match="ORT_ENABLE_ALL.*ORT_ENABLE_EXTENDED"):
        graphshape.load(model)


def test_a_failed_solve_names_the_opaque_layers_it_could_not_count(tmp_path):
    from torch import nn

    export = _cnn_export(tmp_path, nn.ReLU)
    custom = _ort_optimized(export, tmp_path)
    for node in custom.graph.node:  # layers graphshape cannot read
        if node.op_type == "FusedConv":
            node.op_type, node.domain = "MyConv", "com.example"
    custom.opset_import.append(helper.make_opsetid("com.example", 1))
    # five layers: too shallow for TAT's eta = 0.9 either way (the solver's own error)
    with pytest.raises(graphshape.GraphshapeError) as plain:
        graphshape.shape_onnx(export, tmp_path / "a.onnx", method="TAT")
    assert "opaque" not in str(plain.value)
    with pytest.raises(graphshape.GraphshapeError,
                       match=r"\d opaque node\(s\) on the signal path .*com\.example::MyConv"):
        graphshape.shape_onnx(custom, tmp_path / "b.onnx", method="TAT")
