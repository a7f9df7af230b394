"""PReLU (nn.PReLU, F.prelu, ONNX PRelu): a leaky_relu whose slopes are parameters.

Shaping treats it as the leaky_relu it is at initialization (the same maximizing function,
the same solved parameters) and starts every slope from the solved negative_slope; the
emitted network keeps the slopes as parameters, so they train as in the user's model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphshape
from graphshape import torch_modules as tm
from graphshape.backend_torch import emit
from graphshape.frontends.torch_fx import load_module
from graphshape.passes.analysis import FLAG_APPROX, analyze

X = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))


def _plain(depth: int, act) -> nn.Sequential:
    """A BatchNorm conv chain, deep enough that TAT's eta = 0.9 is reachable."""
    layers = [nn.Conv2d(3, 16, 3, padding=1)]
    for _ in range(depth):
        layers += [nn.BatchNorm2d(16), act(), nn.Conv2d(16, 16, 3, padding=1)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def _activations(module):
    return [m for m in module.modules()
            if isinstance(m, (nn.PReLU, nn.LeakyReLU, tm.TransformedActivation))]


def test_functional_prelu_maps_and_its_slope_gets_gradients():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.slope = nn.Parameter(torch.tensor([0.1, 0.2, 0.3, 0.4]))

        def forward(self, x):
            return F.prelu(self.conv(x), self.slope)

    net = Net()
    graph = load_module(net, (X,))
    (node,) = [n for n in graph if n.op == "activation"]
    assert node.attrs["learnable_slope"] and node.attrs["negative_slope"] == pytest.approx(0.25)
    np.testing.assert_allclose(node.params["weight"], [0.1, 0.2, 0.3, 0.4], rtol=1e-6)
    gm = emit(graph)
    torch.testing.assert_close(gm(X), net(X))
    gm(X).square().sum().backward()
    net(X).square().sum().backward()
    (prelu,) = [m for m in gm.modules() if isinstance(m, nn.PReLU)]
    torch.testing.assert_close(prelu.weight.grad, net.slope.grad)


def test_module_prelu_keeps_its_state_dict_key():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.PReLU(4))
    gm = emit(load_module(net, (X,)))
    assert set(gm.state_dict()) == set(net.state_dict())


@pytest.mark.parametrize("method", ["TAT", "DKS"])
@pytest.mark.parametrize("fold", ["weights", "none"])
def test_prelu_shapes_like_leaky_relu_and_its_slopes_start_at_the_solution(method, fold):
    torch.manual_seed(0)
    prelu_net = _plain(20, lambda: nn.PReLU(16))
    torch.manual_seed(0)
    leaky_net = _plain(20, lambda: nn.LeakyReLU(0.25))
    shaped = graphshape.shape(prelu_net, X, method=method, fold_scales=fold, seed=0)
    reference = graphshape.shape(leaky_net, X, method=method, fold_scales=fold, seed=0)
    params = shaped.meta["graphshape"].activation_params["leaky_relu"]
    assert params == reference.meta["graphshape"].activation_params["leaky_relu"]
    # the same function at initialization as the fixed-slope network
    torch.testing.assert_close(shaped(X), reference(X), rtol=1e-5, atol=1e-6)
    acts = _activations(shaped)
    assert len(acts) == 20 and all(isinstance(a, nn.PReLU) for a in acts)
    for a in acts:  # every channel starts from the solved slope, and learns
        torch.testing.assert_close(a.weight.detach(),
                                   torch.full((16,), params["negative_slope"]))
        assert a.weight.requires_grad
    shaped(X).sum().backward()
    assert all(a.weight.grad is not None and a.weight.grad.abs().sum() > 0 for a in acts)
    if method == "TAT" and fold == "weights":
        # TReLU's scale moved into the next conv: a plain nn.PReLU is left
        assert all(type(a) is nn.PReLU for a in acts)


def test_shaped_prelu_reloads_as_the_same_canonical_node():
    shaped = graphshape.shape(_plain(20, lambda: nn.PReLU(16)), X, method="DKS", seed=0,
                              fold_scales="none")
    assert any(isinstance(m, tm.TransformedPReLU) for m in shaped.modules())
    graph = graphshape.load(shaped, X)
    acts = [n for n in graph if n.op == "activation"]
    assert len(acts) == 20
    assert all(n.attrs["learnable_slope"] and n.attrs.get("transform") for n in acts)
    again = emit(graph)
    torch.testing.assert_close(again(X), shaped(X))


def test_trained_slopes_are_flagged_and_reset_by_shaping():
    net = _plain(20, lambda: nn.PReLU(16))
    with torch.no_grad():
        net[2].weight.copy_(torch.linspace(0.0, 0.5, 16))  # as if trained: slopes differ
    stats = analyze(load_module(net, (X,)), X)
    assert FLAG_APPROX in stats["_2"]["flags"]  # net[2] (its fx name)
    assert FLAG_APPROX not in stats["_5"]["flags"]  # equal slopes: exact
    # the kernel of the mean slope, as a LeakyReLU(mean) network's
    leaky = _plain(20, lambda: nn.PReLU(16))
    leaky.load_state_dict(net.state_dict())
    with torch.no_grad():
        leaky[2].weight.fill_(0.25)
    reference = analyze(load_module(leaky, (X,)), X)
    assert stats["_2"]["q_pred"] == pytest.approx(reference["_2"]["q_pred"])
    shaped = graphshape.shape(net, X, method="TAT", seed=0)
    slope = shaped.meta["graphshape"].activation_params["leaky_relu"]["negative_slope"]
    for a in _activations(shaped):
        torch.testing.assert_close(a.weight.detach(), torch.full((16,), slope))


def test_another_activation_replaces_prelu_and_its_slopes():
    shaped = graphshape.shape(_plain(6, lambda: nn.PReLU(16)), X, method="DKS",
                              activation="softplus", seed=0)
    assert not any(isinstance(m, nn.PReLU) for m in shaped.modules())
    # no slope is left behind: the parameters are the convs' and the linear's
    assert sum(p.numel() for p in shaped.parameters()) == 3 * 16 * 9 + 16 + 6 * (
        16 * 16 * 9 + 16) + 16 * 10 + 10


def test_onnx_prelu_model_shapes_and_runs(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    net = _plain(20, lambda: nn.PReLU(16)).eval()
    path = tmp_path / "prelu.onnx"
    torch.onnx.export(net, (X,), str(path), dynamo=False, opset_version=17)
    out = tmp_path / "prelu_tat.onnx"
    report = graphshape.shape_onnx(str(path), str(out), method="TAT", seed=0)
    torch_report = graphshape.shape(_plain(20, lambda: nn.PReLU(16)), X, method="TAT",
                                    seed=0).meta["graphshape"]
    assert report.activation_params == torch_report.activation_params
    import onnx

    model = onnx.load(str(out))
    prelus = [n for n in model.graph.node if n.op_type == "PRelu"]
    assert len(prelus) == 20
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    slope = report.activation_params["leaky_relu"]["negative_slope"]
    np.testing.assert_allclose(inits[prelus[0].input[1]].reshape(-1), slope, rtol=1e-6)
    sess = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: X.numpy()})[0]
    assert y.shape == (4, 10) and np.all(np.isfinite(y)) and y.std() > 0
