"""Spatial resampling: F.interpolate / nn.Upsample and ONNX Resize / Upsample as the
canonical ``resize``, its kernel rule, and shaping a U-Net that upsamples to a size read
from its input at run time."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import graphshape
from graphshape import GraphshapeError
from graphshape.backend_onnx import emit as emit_onnx
from graphshape.backend_torch import emit as emit_torch
from graphshape.frontends.onnx_import import load_onnx
from graphshape.frontends.torch_fx import load_module
from graphshape.passes.analysis import FLAG_APPROX

RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)


def _run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _resize_model(attrs, *, opset=13, scales=None, sizes=None, op_type="Resize",
                  batch=2):
    inits, inputs = [], ["x"]
    if op_type == "Resize":
        inputs.append("")  # roi
        if scales is not None:
            inits.append(numpy_helper.from_array(np.float32(scales), "scales"))
            inputs.append("scales")
        else:
            inputs.append("")
            inits.append(numpy_helper.from_array(np.int64(sizes), "sizes"))
            inputs.append("sizes")
        if opset == 10:  # Resize-10: (X, scales)
            inputs = ["x", "scales"]
        elif opset < 13:  # roi (and scales beside sizes) were required inputs
            inits.append(numpy_helper.from_array(np.zeros(0, np.float32), "empty"))
            inputs = [i or "empty" for i in inputs]
    elif scales is not None and opset >= 9:
        inits.append(numpy_helper.from_array(np.float32(scales), "scales"))
        inputs.append("scales")
    node = helper.make_node(op_type, inputs, ["y"], **attrs)
    graph = helper.make_graph([node], "t",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                             [batch, 3, 4, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=8)
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    model.graph.ClearField("output")
    model.graph.output.extend(inferred.graph.output)
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("attrs,opset,scales,sizes,mode", [
    ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
      "nearest_mode": "floor"}, 13, [1, 1, 2, 3], None, "nearest"),
    ({"mode": "nearest", "coordinate_transformation_mode": "half_pixel",
      "nearest_mode": "round_prefer_ceil"}, 13, None, [2, 3, 7, 3], "nearest-exact"),
    ({"mode": "linear", "coordinate_transformation_mode": "half_pixel"}, 13, [1, 1, 2, 2], None,
     "linear"),
    ({"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, 11,
     [1, 1, 1.5, 0.5], None, "linear"),
    ({"mode": "linear", "coordinate_transformation_mode": "align_corners"}, 18, None,
     [2, 3, 9, 4], "linear"),
    ({"mode": "cubic", "coordinate_transformation_mode": "half_pixel"}, 13, [1, 1, 2, 1.5], None,
     "cubic"),
    # half_pixel nearest by integer factors: rounding picks torch's pixel (what
    # onnx.version_converter makes of an opset 7 Upsample)
    ({"mode": "nearest"}, 13, [1, 1, 3, 2], None, "nearest"),
    ({"mode": "nearest", "coordinate_transformation_mode": "pytorch_half_pixel",
      "nearest_mode": "round_prefer_floor"}, 13, None, [2, 3, 12, 5], "nearest"),
])
def test_onnx_resize_forms_load_as_resize_and_run_alike(attrs, opset, scales, sizes, mode):
    model = _resize_model(attrs, opset=opset, scales=scales, sizes=sizes)
    graph = load_onnx(model)
    (node,) = [n for n in graph if n.op == "resize"]
    assert node.attrs["mode"] == mode
    want = _run(model, {"x": X})[0]
    # the torch module computes what onnxruntime computes
    got = emit_torch(graph)(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and graphshape's own Resize (written from torch's terms) too
    out = emit_onnx(graph, max(opset, 11))
    np.testing.assert_allclose(_run(out, {"x": X})[0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op_type,opset", [("Upsample", 9), ("Resize", 10)])
def test_nearest_before_opset_11_is_a_resize_when_it_upsamples(op_type, opset):
    model = _resize_model({"mode": "nearest"}, opset=opset, op_type=op_type,
                          scales=[1, 1, 2, 3])
    graph = load_onnx(model)
    assert graph.count_ops().get("resize") == 1
    np.testing.assert_allclose(emit_torch(graph)(torch.from_numpy(X)).numpy(),
                               _run(model, {"x": X})[0])
    # downsampling (Resize-10; Upsample has scales >= 1 only) onnxruntime rounds otherwise
    # than torch's nearest (measured: 2.9 apart on X at scales 0.5, 0.6)
    down = _resize_model({"mode": "nearest"}, opset=opset, op_type=op_type,
                         scales=[1, 1, 0.5, 0.6])
    assert "resize" not in load_onnx(down).count_ops()


@pytest.mark.parametrize("attrs", [
    # what a TensorFlow converter writes: no torch interpolate mode rounds this way
    {"mode": "nearest", "coordinate_transformation_mode": "asymmetric"},
    {"mode": "linear", "coordinate_transformation_mode": "tf_half_pixel_for_nn"},
    {"mode": "cubic", "coordinate_transformation_mode": "half_pixel", "cubic_coeff_a": -0.5},
    {"mode": "nearest", "coordinate_transformation_mode": "half_pixel"},  # not by integers
    {"mode": "nearest", "coordinate_transformation_mode": "half_pixel", "nearest_mode": "ceil"},
    # onnxruntime's antialias filter is not torch's
    {"mode": "linear", "coordinate_transformation_mode": "half_pixel", "antialias": 1},
])
def test_resize_forms_without_a_torch_twin_stay_opaque_and_round_trip(attrs):
    model = _resize_model(attrs, opset=18, scales=[1, 1, 0.5, 2])
    graph = load_onnx(model)
    assert "resize" not in graph.count_ops() and graph.count_ops()["opaque"] == 1
    np.testing.assert_allclose(_run(emit_onnx(graph), {"x": X})[0], _run(model, {"x": X})[0])


def test_resize_of_a_dynamic_batch_keeps_it_dynamic_in_onnx():
    # sizes = concat(shape(x)[:2], [6, 7]), as exporters write it for a dynamic batch
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Slice", ["shape", "zero", "two"], ["lead"]),
             helper.make_node("Concat", ["lead", "hw"], ["sizes"], axis=0),
             helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear")]
    inits = [numpy_helper.from_array(np.int64(v), k)
             for k, v in (("zero", [0]), ("two", [2]), ("hw", [6, 7]))]
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 6, 7])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    graph = load_onnx(model)
    assert graph.count_ops().get("resize") == 1
    out = emit_onnx(graph)
    x4 = RNG.standard_normal((4, 3, 4, 5)).astype(np.float32)  # another batch size
    (y,) = _run(out, {"x": x4})
    assert y.shape == (4, 3, 6, 7)
    want = F.interpolate(torch.from_numpy(x4), size=(6, 7), mode="bilinear").numpy()
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


class UNet(nn.Module):
    """Two levels; the decoder upsamples to the size of the skip it joins, read at run
    time, as torchvision's segmentation heads and most U-Nets do."""

    def __init__(self, width=8):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())

        self.enc1, self.enc2 = block(3, width), block(width, 2 * width)
        self.dec = block(3 * width, width)
        self.head = nn.Conv2d(width, 2, 1)

    def forward(self, x):
        a = self.enc1(x)
        b = self.enc2(F.max_pool2d(a, 2))
        up = F.interpolate(b, size=a.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.dec(torch.cat([up, a], 1)))


def test_shaped_unet_follows_its_input_size_and_exports():
    x = torch.randn(2, 3, 16, 16)
    shaped = graphshape.shape(UNet(), x, method="DKS", seed=0)
    report = shaped.meta["graphshape"]
    assert not any("opaque" in w for w in report.warnings), report.warnings
    # the upsampling follows the input: another size runs, and gives that size
    assert shaped(torch.randn(1, 3, 24, 40)).shape == (1, 2, 24, 40)
    graph = graphshape.load(shaped, x)
    (node,) = [n for n in graph if n.op == "resize"]
    assert node.attrs["static_sizes"] == (16, 16) and len(node.inputs) == 2
    # ONNX: written with the traced size, no shape arithmetic left behind
    model = emit_onnx(graph)
    assert [n.op_type for n in model.graph.node].count("Resize") == 1
    assert not {"Shape", "Gather"} & {n.op_type for n in model.graph.node}
    (y,) = _run(model, {model.graph.input[0].name: x.numpy()})
    np.testing.assert_allclose(y, shaped(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_nearest_integer_upsampling_is_exact_and_bilinear_is_flagged():
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                        nn.Upsample(scale_factor=2), nn.Conv2d(16, 16, 3, padding=1),
                        nn.Upsample(scale_factor=2, mode="bilinear"))
    x = torch.randn(4, 3, 8, 8)
    stats = graphshape.analyze(net, x, empirical=True)
    nearest, bilinear = (r for r in stats.rows if r["op"] == "resize")
    assert FLAG_APPROX not in nearest["flags"] and FLAG_APPROX in bilinear["flags"]
    # copying each entry four times leaves q and c as they were, measured exactly
    before = stats["_1"]
    assert nearest["q_emp"] == pytest.approx(before["q_emp"], rel=1e-5)
    assert nearest["c_emp"] == pytest.approx(before["c_emp"], rel=1e-5, abs=1e-6)
    assert nearest["q_pred"] == before["q_pred"]


def test_antialiased_interpolation_is_refused_by_the_onnx_backend():
    net = nn.Sequential(nn.Conv2d(3, 4, 1))
    graph = load_module(_Antialias(), (torch.randn(1, 3, 8, 8),))
    (node,) = [n for n in graph if n.op == "resize"]
    assert node.attrs["antialias"] is True
    with pytest.raises(GraphshapeError, match="antialias"):
        emit_onnx(graph)
    del net


class _Antialias(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True)
