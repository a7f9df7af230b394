"""Gates that start as the constant 1 (``passes.shaping.constant_gates``): squeeze-excitation
and other gates ``f(A(...))`` with ``f(0) > 0`` are shaped, not refused: their input layer
starts at zero and the gate is divided by ``f(0)``, so each gated product is exactly the
identity at initialization."""

import io

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import graphshape


class SE(nn.Module):
    def __init__(self, channels, gate=nn.Sigmoid):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // 2, 1)
        self.fc2 = nn.Conv2d(channels // 2, channels, 1)
        self.gate = gate()

    def forward(self, x):
        s = self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * self.gate(s)


class Net(nn.Module):
    """Conv blocks with a residual join, each followed (optionally) by squeeze-excitation."""

    def __init__(self, se=True, gate=nn.Sigmoid, width=16, depth=3):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(depth))
        self.ses = nn.ModuleList((SE(width, gate) if se else nn.Identity()) for _ in range(depth))
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        x = self.stem(x)
        for conv, se in zip(self.convs, self.ses):
            x = x + se(nn.functional.gelu(conv(x)))
        return self.head(x.mean((2, 3)))


X = torch.randn(4, 3, 12, 12)


@pytest.mark.parametrize("method", ["DKS", "TAT"])
@pytest.mark.parametrize("gate", [nn.Sigmoid, nn.Hardsigmoid], ids=["sigmoid", "hardsigmoid"])
def test_squeeze_excitation_is_the_identity_at_initialization(method, gate):
    torch.manual_seed(0)
    shaped = graphshape.shape(Net(gate=gate), X, method=method, seed=0)
    plain = graphshape.shape(Net(se=False), X, method=method, seed=0)
    # the same maximizing function, hence the same parameters, as without the gates
    assert shaped.meta["graphshape"].activation_params == plain.meta["graphshape"].activation_params
    stats = graphshape.analyze(shaped, X, empirical=True)
    rows = {r["node"]: r for r in stats.rows}
    gates = [r for r in stats.rows if r["op"] == "activation" and r["activation"] != "gelu_exact"
             and "gate" in r["node"]]
    assert len(gates) == 3
    for r in gates:  # exactly 1 for every example and channel
        assert r["q_emp"] == pytest.approx(1.0, abs=1e-6) and r["c_emp"] == pytest.approx(1.0)
        assert r["q_pred"] == pytest.approx(1.0)
    graph = graphshape.load(shaped, X)
    for node in graph:
        if node.op == "mul" and any(graph[r.node].op == "activation" for r in node.inputs):
            x_in = next(r.node for r in node.inputs if "gate" not in r.node)
            assert rows[node.name]["q_emp"] == pytest.approx(rows[x_in]["q_emp"], rel=1e-6)


class ExpandedSE(nn.Module):
    """Squeeze-excitation with linear layers and ``g[:, :, None, None].expand_as(x)``
    (an opaque call that only moves entries, between the gate and the product)."""

    def __init__(self, channels):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(channels, channels // 2), nn.Linear(channels // 2, channels)

    def forward(self, x):
        g = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
        return x * g[:, :, None, None].expand_as(x)


def test_a_gate_expanded_before_its_product_starts_at_one():
    """The expand_as between gate and product hid the gate: 'multiplies two signals'."""
    torch.manual_seed(0)
    model = Net()
    model.ses = nn.ModuleList(ExpandedSE(16) for _ in range(3))
    shaped = graphshape.shape(model, X, method="DKS", seed=0)
    plain = graphshape.shape(Net(se=False), X, method="DKS", seed=0)
    assert shaped.meta["graphshape"].activation_params == plain.meta["graphshape"].activation_params
    gates = [r for r in graphshape.analyze(shaped, X, empirical=True).rows
             if r["activation"] == "sigmoid"]
    assert len(gates) == 3 and all(r["q_emp"] == pytest.approx(1.0) for r in gates)
    torch.fx.symbolic_trace(shaped)  # (its unsqueeze helper takes no branch on x.dim())


def test_the_zeroed_layer_learns_and_the_rest_is_reinitialized():
    torch.manual_seed(0)
    shaped = graphshape.shape(Net(), X, method="DKS", seed=0)
    fc2 = [p for n, p in shaped.named_parameters() if "fc2" in n]
    assert fc2 and all(not p.detach().any() for p in fc2)
    assert all(p.detach().abs().sum() > 0 for n, p in shaped.named_parameters()
               if "fc1.weight" in n)
    report = shaped.meta["graphshape"]
    assert any("start as the constant 1" in w and "left as they are" in w
               for w in report.warnings), report.warnings
    loss = nn.functional.cross_entropy(shaped(X), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fc2
               if p.dim() > 1)


def test_the_onnx_export_is_shaped_alike(tmp_path):
    torch.manual_seed(0)
    model = Net().eval()
    buf = io.BytesIO()
    torch.onnx.export(model, (X,), buf, opset_version=17, dynamo=False)
    want = graphshape.shape(model, X, method="DKS", seed=0).meta["graphshape"]
    report = graphshape.shape_onnx(buf.getvalue(), tmp_path / "se.onnx", method="DKS", seed=0)
    for name, params in want.activation_params.items():
        assert report.activation_params[name] == pytest.approx(params, rel=1e-9)
    sess = ort.InferenceSession(str(tmp_path / "se.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: X.numpy()})[0]
    assert np.isfinite(out).all() and out.shape == (4, 5)


def test_a_shaped_model_shapes_again_to_the_same_parameters(tmp_path):
    """A shaped model's gates are transformed (PyTorch) or followed by a Mul by 1/f(0)
    (ONNX); shaping it again starts them at 1 again: before, the transformed gate was
    refused, and the ONNX file's scaled gate was a product of two signals in the
    maximizing function (DKS input_scale 0.080 instead of 0.448)."""
    torch.manual_seed(0)
    model = Net(depth=4).eval()
    once = graphshape.shape(model, X, method="DKS", seed=0)
    again = graphshape.shape(once, X, method="DKS", seed=1)
    for name, params in once.meta["graphshape"].activation_params.items():
        assert again.meta["graphshape"].activation_params[name] == pytest.approx(params)
    src = tmp_path / "net.onnx"
    torch.onnx.export(model, (X,), str(src), opset_version=17, dynamo=False)
    first = graphshape.shape_onnx(src, tmp_path / "once.onnx", method="DKS", seed=0)
    second = graphshape.shape_onnx(tmp_path / "once.onnx", tmp_path / "twice.onnx",
                                   method="DKS", seed=0)
    for name, params in first.activation_params.items():
        assert second.activation_params[name] == pytest.approx(params, rel=1e-9)


class ScaledHead(nn.Module):
    """LR-ASPP's head: ``relu(conv(x)) * sigmoid(conv(pool(x)))``; the relu's output is the
    gated path, not a gate of the sigmoid's."""

    def __init__(self):
        super().__init__()
        self.stem, self.cbr = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.scale, self.out = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.tanh(self.stem(x))
        s = torch.sigmoid(self.scale(x.mean((2, 3), keepdim=True)))
        return self.out(torch.relu(self.cbr(x)) * s)


def test_the_path_a_constant_gate_multiplies_is_not_a_gate():
    shaped = graphshape.shape(ScaledHead(), X, method="DKS", seed=0)
    graph = graphshape.load(shaped, X)
    relu = next(n for n in graph if n.op == "activation" and n.attrs["name"] == "relu")
    assert relu.attrs.get("transform")  # main path: transformed
    assert set(shaped.meta["graphshape"].activation_params) == {"tanh", "relu"}


class Unowned(nn.Module):
    """A gate computed without a layer of its own: nothing to start at zero."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3), nn.Linear(8, 2)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.head((x * torch.sigmoid(x.mean(1, keepdim=True))).mean((2, 3)))


class SwiGLU(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, 2)

    def forward(self, x):
        return self.w3(nn.functional.silu(self.w1(x)) * self.w2(x))


@pytest.mark.parametrize("model, x, words", [
    (Unowned(), X, "not a conv / linear layer of its own"),
    (SwiGLU(), torch.randn(4, 8), r"silu\(0\) = 0"),
], ids=["no_layer", "swiglu"])
def test_gates_that_cannot_start_at_one_are_refused(model, x, words):
    with pytest.raises(graphshape.GraphshapeError, match=words):
        graphshape.shape(model, x, method="DKS")


def test_untransformed_leaves_the_gates_as_they_are():
    torch.manual_seed(0)
    model = Net()
    shaped = graphshape.shape(model, X, method="untransformed", seed=0)
    assert all(p.detach().abs().sum() > 0 for n, p in shaped.named_parameters()
               if "fc2.weight" in n)
    assert any("gating activation(s)" in w for w in shaped.meta["graphshape"].warnings)


class DoubledSE(nn.Module):
    """Squeeze-excitation with its gate doubled, the constant written first or last."""

    def __init__(self, channels, constant_first):
        super().__init__()
        self.se = SE(channels)
        self.constant_first = constant_first

    def forward(self, x):
        se = self.se
        g = torch.sigmoid(se.fc2(torch.relu(se.fc1(x.mean((2, 3), keepdim=True)))))
        return x * (2.0 * g if self.constant_first else g * 2.0)


@pytest.mark.parametrize("constant_first", [False, True], ids=["g * 2", "2 * g"])
def test_a_doubled_gate_starts_at_one_whichever_side_its_constant_is(constant_first):
    """``2 * sigmoid(z)`` was "a product of two signals" (the walk from the gate followed a
    scaling only with the gate first); both spellings start at 1: sigmoid(0) * 2."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(),
                          DoubledSE(8, constant_first), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh())
    report = graphshape.shape(model, torch.randn(2, 3, 8, 8), method="DKS",
                              seed=0).meta["graphshape"]
    gates = [r["what"] for r in report.rewritten if "gate divided" in r["what"]]
    assert gates == ["gate divided by its value at 0: output scale 1, 1 at initialization"]
