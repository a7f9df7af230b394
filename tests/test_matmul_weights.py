"""``x @ self.w`` with a parameter ``w``: a linear layer written by hand (research code,
relative-position logits ``q @ rel.transpose(-1, -2)`` in timm's BotNet). Shaping reads it as
one (``passes.shaping.linear_matmuls``), as the ONNX frontend reads ``MatMul(x,
initializer)``: it initializes it like nn.Linear, and a model shaped from PyTorch and from
its ONNX export is the same network. Before, shaping left such weights as they were (q 62 at
the first tanh of a DKS-shaped ``tanh(x @ w)`` MLP with randn weights, where shaping puts it
at 1), with no warning, and ``w.t()`` / ``w.T`` were opaque."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import graphshape
from same_network import assert_same_outputs, shape_both_ways

FORMS = {
    "x @ w": lambda x, w: x @ w,
    "x @ w.t()": lambda x, w: x @ w.t(),
    "x @ w.T": lambda x, w: x @ w.T,
    "x @ w.mT": lambda x, w: x @ w.mT,
    "x @ w.transpose(-1, -2)": lambda x, w: x @ w.transpose(-1, -2),
    "torch.matmul(x, w.permute(1, 0))": lambda x, w: torch.matmul(x, w.permute(1, 0)),
    "x.matmul(torch.t(w))": lambda x, w: x.matmul(torch.t(w)),
    "torch.mm(x, w)": lambda x, w: torch.mm(x, w),
}


class HandLinearMLP(nn.Module):
    def __init__(self, form, width=64):
        super().__init__()
        self.form = FORMS[form]
        self.w1 = nn.Parameter(torch.randn(width, width))
        self.w2 = nn.Parameter(torch.randn(width, width))

    def forward(self, x):
        return self.form(torch.tanh(self.form(x, self.w1)), self.w2)


@pytest.mark.parametrize("form", FORMS)
def test_a_matmul_by_a_parameter_is_shaped_as_a_linear_layer(form):
    torch.manual_seed(0)
    model = HandLinearMLP(form)
    x = torch.randn(32, 64)
    graph = graphshape.load(model, x)
    # loading keeps the matmuls (w.t() and w.T as transposes, no longer opaque): a
    # converted module keeps the source's state_dict, keys and layout
    assert graph.count_ops().get("matmul") == 2 and "opaque" not in graph.count_ops()
    emitted = graphshape.to_torch(graph)
    assert emitted.state_dict().keys() == model.state_dict().keys()
    emitted.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert emitted(x) == pytest.approx(model(x), rel=1e-5, abs=1e-5)
    # shaping reads each as the linear layer it is, and initializes it
    shaped = graphshape.shape(model, x, method="DKS", seed=0)
    report = shaped.meta["graphshape"]
    assert report.initialized == 2
    assert sum("a matmul by parameter" in r["what"] for r in report.rewritten) == 2
    assert graphshape.load(shaped, x).count_ops().get("linear") == 2
    # where shaping puts q: 1 at the activation's input (62 with the randn weights kept)
    stats = graphshape.analyze(graphshape.load(shaped, x), x, empirical=True)
    first = next(r for r in stats.rows if r["op"] == "linear")
    assert first["q_emp"] == pytest.approx(1.0, rel=0.1)
    # and the weights train
    shaped(x).square().mean().backward()
    grads = [p.grad for p in shaped.parameters()]
    assert len(grads) == 2 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_onnx_matmul_weights_become_contiguous_torch_parameters(tmp_path):
    """The ONNX frontend reads ``MatMul(x, w)`` as a linear layer whose (out, in) weight is a
    transposed view of the initializer; the torch backend makes it a contiguous parameter."""
    model = HandLinearMLP("x @ w").eval()
    x = torch.randn(4, 64)
    path = str(tmp_path / "m.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (x,), path, opset_version=17, dynamo=False, input_names=["x"])
    emitted = graphshape.to_torch(graphshape.load(path))
    assert [tuple(p.shape) for p in emitted.parameters()] == [(64, 64)] * 2
    assert all(p.is_contiguous() for p in emitted.parameters())
    with torch.no_grad():
        assert emitted(x) == pytest.approx(model(x), rel=1e-5, abs=1e-5)


class Kept(nn.Module):
    """Matmuls that are not a layer of their own: a weight read twice (tied), a buffer (a
    fixed projection), a constant on the left, a computed weight."""

    def __init__(self):
        super().__init__()
        self.tied = nn.Parameter(torch.randn(16, 16) / 4)
        self.register_buffer("fixed", torch.randn(16, 16) / 4)
        self.left = nn.Parameter(torch.randn(16, 16) / 4)
        self.scaled = nn.Parameter(torch.randn(16, 16) / 4)

    def forward(self, x):
        h = torch.tanh(x @ self.tied)
        h = torch.tanh(h @ self.tied.t())
        h = torch.tanh(h @ self.fixed)
        h = torch.tanh((self.left @ h.t()).t())
        return h @ (2 * self.scaled)


def test_matmuls_that_are_not_a_layer_of_their_own_stay_matmuls():
    model = Kept()
    x = torch.randn(8, 16)
    graph = graphshape.load(model, x)
    assert graph.count_ops()["matmul"] == 5 and "opaque" not in graph.count_ops()
    with torch.no_grad():  # (h.t(), self.tied.t(): transposes of a signal and a parameter)
        assert graphshape.to_torch(graph)(x) == pytest.approx(model(x), rel=1e-5, abs=1e-6)
    shaped = graphshape.shape(model, x, method="DKS", seed=0)
    assert shaped.meta["graphshape"].initialized == 0
    assert "linear" not in graphshape.load(shaped, x).count_ops()
    # the tied weight is still one parameter, read twice
    assert len(list(shaped.parameters())) == 3
    with torch.no_grad():
        assert torch.isfinite(shaped(x)).all()


class RelPosLogits(nn.Module):
    """A block with BotNet-style relative-position logits: ``q @ rel.transpose(-1, -2)``."""

    def __init__(self, dim=32, tokens=9):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.rel = nn.Parameter(torch.randn(tokens, dim) * dim ** -0.5)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        logits = q @ k.transpose(-1, -2) + q @ self.rel.transpose(-1, -2)
        return x + self.proj(torch.relu(logits.softmax(-1) @ v))


def test_shaped_from_pytorch_and_from_onnx_the_same_network(tmp_path):
    """The parity that found this (timm's botnet26t_256: same solved parameters, outputs 1.2
    apart, the ONNX path having initialized the relative-position weights)."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(RelPosLogits(), RelPosLogits())
    both = shape_both_ways(model, torch.randn(2, 9, 32), tmp_path, method="DKS", seed=1)
    assert both.torch_report.initialized == both.onnx_report.initialized == 6
    assert_same_outputs(both)


class ReadsItsShape(nn.Module):
    """timm's HaloNet relative-position logits: ``q @ rel.transpose(-1, -2)``, with
    ``rel.shape[0]`` read too."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 16)
        self.rel = nn.Parameter(torch.randn(7, 16) / 4)

    def forward(self, x):
        logits = torch.tanh(self.inp(x)) @ self.rel.transpose(-1, -2)
        return logits.reshape(-1, self.rel.shape[0]).softmax(-1)


def test_a_weight_whose_shape_is_read_too_is_a_linear_layer():
    x = torch.randn(4, 16)
    shaped = graphshape.shape(ReadsItsShape(), x, method="DKS", seed=0)
    assert shaped.meta["graphshape"].initialized == 2
    # the tensor stays for the shape read, as a buffer: no parameter left without a gradient
    shaped(x).square().sum().backward()
    assert all(p.grad is not None for p in shaped.parameters())
    assert len(list(shaped.parameters())) == 3  # inp's weight and bias, the new linear's
