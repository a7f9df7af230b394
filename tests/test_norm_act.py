"""timm's fused norm-activation modules (BatchNormAct2d, GroupNormAct) map to a norm node
plus an activation node, round-trip exactly, and are removed by shaping."""

import pytest

torch = pytest.importorskip("torch")
norm_act = pytest.importorskip("timm.layers.norm_act")

import graphshape  # noqa: E402


def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        norm_act.BatchNormAct2d(8, act_layer=torch.nn.SiLU),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        norm_act.GroupNormAct(8, 2, act_layer=torch.nn.ReLU),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        norm_act.BatchNormAct2d(8, apply_act=False),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    with torch.no_grad():  # non-trivial statistics and affine parameters
        for bn in (m[1], m[5]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
            bn.bias.normal_()
    return m.eval()


def test_norm_act_maps_to_norm_plus_activation_and_round_trips():
    model = _model()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    graph = graphshape.load(model, x)
    ops = graph.count_ops()
    assert "opaque" not in ops  # no F.batch_norm / _assert / ndim nodes
    assert ops["batch_norm"] == 2 and ops["group_norm"] == 1
    acts = [n.attrs["name"] for n in graph if n.op == "activation"]
    assert acts == ["silu", "relu"]  # apply_act=False adds none
    gm = graphshape.to_torch(graph)
    assert sorted(gm.state_dict()) == sorted(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)
    # training mode: batch statistics, as in timm's forward
    gm.train(), model.train()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_shape_removes_fused_norms():
    model = _model()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    shaped = graphshape.shape(model, x, method="DKS", activation="tanh", seed=0)
    report = shaped.meta["graphshape"]
    removed = sorted(r["op"] for r in report.removed)
    assert removed.count("batch_norm") == 2 and removed.count("group_norm") == 1
    assert not [m for m in shaped.modules()
                if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm))]
    out = shaped(x)
    assert out.shape == (2, 4) and torch.isfinite(out).all()
    assert set(report.activation_params) == {"tanh"}
