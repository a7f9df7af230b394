"""The emitted module's ``state_dict`` holds what the source's holds: parameters and
persistent buffers, under the source's names, so a source checkpoint loads into the
converted module with ``strict=True``. Constants graphshape emits as buffers that the
source's ``state_dict`` did not hold (an export's shape integers, a ``persistent=False``
buffer, a tensor attribute torch.fx made a constant of) are non-persistent buffers: still
saved by ``torch.save(module)``, left out of ``state_dict``."""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import graphshape
from graphshape.backend_torch import emit
from graphshape.frontends.torch_fx import load_module
from untraceable import finite_or_raise


class Constants(nn.Module):
    """A persistent buffer, a ``persistent=False`` one and a plain tensor attribute."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("scale", torch.full((1, 4, 1, 1), 2.0))
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5), persistent=False)
        self.shift = torch.full((1, 4, 1, 1), 0.25)  # not registered: fx makes a constant
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x - self.mean) * self.scale + self.shift)
        return self.fc(h.mean((2, 3)))


class UntraceableConstants(Constants):
    """The same, with a check fx cannot trace (read through the ONNX export) and a reshape
    to twice the batch size (shape arithmetic on the dynamic batch, which the importer
    keeps as computed: integer constants in the export)."""

    def forward(self, x):
        h = torch.relu(self.conv(x - self.mean) * self.scale + self.shift)
        h = finite_or_raise(F.pad(h, (0, 1, 0, 1)))
        n = h.shape[0]
        return self.fc(h.reshape(n * 2, 2, -1).mean(-1).reshape(n, 4))


def _x(batch=2):
    return torch.randn(batch, 3, 7, 7, generator=torch.Generator().manual_seed(batch))


def _assert_source_state_dict(model):
    torch.manual_seed(0)
    graph = load_module(model, _x())
    gm = emit(graph)
    assert set(gm.state_dict()) == set(model.state_dict()) == {
        "conv.weight", "conv.bias", "scale", "fc.weight", "fc.bias"}
    # a checkpoint of the source loads strictly, and the module computes the source's
    for p in model.parameters():
        p.data.normal_()
    gm.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(gm(_x(3)), model(_x(3)), rtol=1e-5, atol=1e-5)
    # the left-out constants still travel with the pickled module
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(again(_x(3)), model(_x(3)), rtol=1e-5, atol=1e-5)
    return graph


def test_traced_module_keeps_the_sources_state_dict_keys():
    graph = _assert_source_state_dict(Constants().eval())
    assert graph.meta.get("traced_with") != "torch.onnx.export"


def test_module_read_through_its_export_keeps_the_sources_state_dict_keys():
    graph = _assert_source_state_dict(UntraceableConstants().eval())
    assert graph.meta["traced_with"] == "torch.onnx.export"
    assert any(n.op == "constant" and n.params["value"].dtype.kind == "i" for n in graph)


def test_an_onnx_files_weights_are_its_state_dict(tmp_path):
    """The file's float initializers (its stored weights) and nothing else: not its
    Constant nodes (the exported persistent=False buffer) nor the shape integers."""
    import onnx

    path = tmp_path / "m.onnx"
    torch.onnx.export(UntraceableConstants().eval(), _x(), str(path), dynamo=False,
                      opset_version=17, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    model = onnx.load(str(path))
    assert {n.op_type for n in model.graph.node} >= {"Constant", "Shape"}
    gm = graphshape.to_torch(str(path))
    state = gm.state_dict()
    assert sorted(v.numel() for v in state.values()) == sorted(
        int(np.prod(i.dims)) for i in model.graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT), sorted(state)
    assert all(v.is_floating_point() for v in state.values())
    assert any(not b.is_floating_point() for b in gm.buffers())  # emitted, not persistent
    x = _x(4)
    import onnxruntime as ort

    want = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(gm(x).detach().numpy(), want, rtol=1e-5, atol=1e-5)


class FoldedBuffers(nn.Module):
    """Buffers no node reads once loaded: ``beta`` (0-d) inside SiLU spelled out, ``halve``
    (one element) a scale the activation region takes in, ``offset`` (0-d) written as a
    number; and a layer in a submodule, so that a folded buffer's owner exists."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(8, 8)
        self.block = nn.Module()
        self.block.register_buffer("beta", torch.tensor(1.0))
        self.register_buffer("halve", torch.tensor([0.5]))
        self.register_buffer("offset", torch.tensor(0.25))
        self.l2 = nn.Linear(8, 3)

    def forward(self, x):
        x = self.l1(x)
        x = x * torch.sigmoid(self.block.beta * x) * self.halve
        return self.l2(x) + self.offset


def test_buffers_folded_into_an_activation_stay_in_the_state_dict():
    model = FoldedBuffers().eval()
    x = torch.randn(4, 8)
    graph = load_module(model, x)
    assert "silu" in {n.attrs.get("name") for n in graph if n.op == "activation"}
    assert not {"beta", "block_beta", "halve"} & {n.name for n in graph}   # folded
    gm = emit(graph)
    assert set(gm.state_dict()) == set(model.state_dict())
    gm.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(gm(x), model(x))
    # a shaped model is a new one: the transformed activation reads none of them
    shaped = graphshape.shape(model, x, method="DKS")
    assert not {"block.beta", "halve"} & set(shaped.state_dict())


def test_an_onnx_initializer_folded_into_an_activation_stays_in_the_state_dict():
    """torch.onnx.export writes the zero-initialized ``b`` of ``elu(conv(x) + b)`` as an
    initializer; the region folds it (elu(x + 0) is elu), the file's initializers are
    still the module's state_dict."""
    import onnx

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return F.elu(self.conv(x) + self.b)

    buffer = io.BytesIO()
    torch.onnx.export(Block().eval(), _x(), buffer, dynamo=False, opset_version=17)
    model = onnx.load_from_string(buffer.getvalue())
    graph = graphshape.load(buffer.getvalue())
    assert [n.op for n in graph if n.op not in ("input", "output")] == ["conv", "activation"]
    gm = graphshape.to_torch(graph)
    assert sorted(v.numel() for v in gm.state_dict().values()) == sorted(
        int(np.prod(i.dims)) for i in model.graph.initializer)
