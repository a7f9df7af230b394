"""torch's pixel_shuffle / pixel_unshuffle and ONNX DepthToSpace / SpaceToDepth (the
upsampler of ESPCN, EDSR, SwinIR) are the canonical ops ``depth_to_space`` /
``space_to_depth``: data movement the analysis follows (q exactly, c approximately as for a
transpose; they were opaque: the kernel unknown past them, and an ONNX file with one
could not be emitted to torch)."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

import graphshape
from graphshape.backend_onnx import emit as emit_onnx
from graphshape.backend_torch import emit as emit_torch
from graphshape.frontends.onnx_import import load_onnx
from graphshape.frontends.torch_fx import load_module


class Upsampler(nn.Module):
    """EDSR's upsampler shape: conv, pixel shuffle, conv, ReLU; then a pixel unshuffle
    (function form) and a conv, so both ops sit mid-network."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 16, 3, padding=1)
        self.expand = nn.Conv2d(16, 64, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.tail = nn.Conv2d(64, 3, 3, padding=1)

    def forward(self, x):
        h = self.shuffle(self.expand(torch.relu(self.head(x))))
        h = torch.relu(self.mid(h))
        return self.tail(F.pixel_unshuffle(h, 2))


def _x(batch=2, size=8, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_torch_pixel_shuffle_is_canonical_and_emits_for_any_size():
    model = Upsampler().eval()
    graph = load_module(model, _x())
    modes = {n.op: n.attrs for n in graph if n.op in ("depth_to_space", "space_to_depth")}
    assert modes == {"depth_to_space": {"blocksize": 2, "mode": "CRD"},
                     "space_to_depth": {"blocksize": 2, "mode": "CRD"}}
    gm = emit_torch(graph)
    for x in (_x(3, 8, 1), _x(1, 12, 2)):  # another batch and another image size
        torch.testing.assert_close(gm(x), model(x))
    assert "pixel_shuffle" in gm.code and "pixel_unshuffle" in gm.code


def test_the_analysis_follows_the_kernel_through_them():
    model = Upsampler().eval()
    stats = graphshape.analyze(model, _x(4), empirical=True)
    rows = {r["node"]: r for r in stats.to_dict()["rows"]}
    shuffle, expand = rows["shuffle"], rows["expand"]
    assert not any("unknown" in f for r in rows.values() for f in r["flags"])
    # a permutation of each example's entries: q as before it (c, per location, approx)
    assert shuffle["q_pred"] == pytest.approx(expand["q_pred"])
    assert shuffle["c_pred"] == pytest.approx(expand["c_pred"])
    assert shuffle["q_emp"] == pytest.approx(expand["q_emp"], rel=1e-5)
    tail = rows["tail"]
    assert np.isfinite(tail["q_pred"]) and tail["q_emp"] / tail["q_pred"] == pytest.approx(1, rel=0.5)


def test_shaping_sees_no_opaque_node():
    shaped = graphshape.shape(Upsampler().eval(), _x(), method="DKS")
    report = shaped.meta["graphshape"]
    assert not any("opaque" in w for w in report.warnings), report.warnings
    out = shaped(_x(3, 12))
    assert out.shape == (3, 3, 12, 12) and torch.isfinite(out).all()


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("op_type,attrs,opset", [
    ("DepthToSpace", {"blocksize": 2}, 13),                   # ONNX's default, DCR
    ("DepthToSpace", {"blocksize": 2, "mode": "CRD"}, 13),    # torch's pixel_shuffle
    ("DepthToSpace", {"blocksize": 3}, 9),                    # DCR only before opset 11
    ("SpaceToDepth", {"blocksize": 2}, 13),
])
def test_onnx_ops_load_and_emit_to_torch_and_onnx(op_type, attrs, opset):
    shape = (2, 36, 3, 5) if op_type == "DepthToSpace" else (2, 3, 6, 4)
    model = helper.make_model(
        helper.make_graph([helper.make_node(op_type, ["x"], ["y"], **attrs)], "t",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]),
        opset_imports=[helper.make_opsetid("", opset)], ir_version=7)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    want = _run(model, x)
    graph = load_onnx(model)
    assert {n.op for n in graph} >= {"depth_to_space" if op_type == "DepthToSpace"
                                     else "space_to_depth"}
    np.testing.assert_array_equal(emit_torch(graph)(torch.from_numpy(x)).numpy(), want)
    again = emit_onnx(graph)
    onnx.checker.check_model(again, full_check=True)
    np.testing.assert_array_equal(_run(again, x), want)


@pytest.mark.parametrize("opset", [9, 13, 17])
def test_torch_channel_order_written_to_onnx(opset):
    """pixel_shuffle is DepthToSpace CRD from opset 11, before that DCR after a channel
    Gather; pixel_unshuffle is SpaceToDepth then a channel Gather at every opset."""
    model = Upsampler().eval()
    out = emit_onnx(load_module(model, _x()), opset)
    onnx.checker.check_model(out, full_check=True)
    types = [n.op_type for n in out.graph.node]
    assert "DepthToSpace" in types and "SpaceToDepth" in types
    x = _x(2, 8, 3)
    np.testing.assert_allclose(_run(out, x.numpy()), model(x).detach().numpy(),
                               rtol=1e-5, atol=1e-5)


def test_an_exported_pixel_shuffle_reads_back_as_the_source():
    model = Upsampler().eval()
    buffer = io.BytesIO()
    torch.onnx.export(model, (_x(),), buffer, dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes={"x": {0: "n"}})
    graph = graphshape.load(buffer.getvalue())
    assert "depth_to_space" in {n.op for n in graph}
    x = _x(3, 8, 4)
    torch.testing.assert_close(graphshape.to_torch(graph)(x), model(x), rtol=1e-5, atol=1e-5)
