"""Normalization-activation layers (timm's EvoNorm and Filter Response Normalization): one
expression computes the normalization and the activation, so no norm node splits off them.
They load as opaque calls that say what remains without the normalization; shaping puts that
activation in their place, which gives the network shaped from the same model built with a
separate norm and that activation (BatchNormAct2d), parameter for parameter."""

import functools

import pytest

torch = pytest.importorskip("torch")
evo_norm = pytest.importorskip("timm.layers.evo_norm")
frn = pytest.importorskip("timm.layers.filter_response_norm")
from timm.layers.norm_act import BatchNormAct2d  # noqa: E402

import graphshape  # noqa: E402
from graphshape.errors import GraphshapeError  # noqa: E402

nn = torch.nn

#: (norm-activation layer, the activation left without its normalization)
PAIRS = {
    "EvoNorm2dS0": (functools.partial(evo_norm.EvoNorm2dS0, groups=4), nn.SiLU),
    "EvoNorm2dS0a": (functools.partial(evo_norm.EvoNorm2dS0a, groups=4), nn.SiLU),
    "EvoNorm2dS1-gelu": (functools.partial(evo_norm.EvoNorm2dS1, groups=4, act_layer=nn.GELU),
                         nn.GELU),
    "EvoNorm2dS2a": (functools.partial(evo_norm.EvoNorm2dS2a, groups=4), nn.SiLU),
    "FilterResponseNormTlu2d": (frn.FilterResponseNormTlu2d, nn.ReLU),
    "FilterResponseNormAct2d-tanh": (functools.partial(frn.FilterResponseNormAct2d,
                                                       act_layer=nn.Tanh), nn.Tanh),
}


def _net(norm_layer, width=16):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), norm_layer(width),
        nn.Conv2d(width, width, 3, padding=1, bias=False), norm_layer(width),
        nn.Conv2d(width, width, 3, padding=1, bias=False), norm_layer(width),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5)).eval()


def _x(seed=1):
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _assert_same_network(a, b, x):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["DKS", "TAT"])
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_shaping_leaves_the_activation_of_a_norm_activation_layer(pair, method):
    layer, act = PAIRS[pair]
    x = _x()
    # (TAT's default eta = 0.9 is beyond three ReLU layers' reach: C_f(0) <= 0.6)
    options = {"method": method, "seed": 0, **({"eta": 0.5} if method == "TAT" else {})}
    shaped = graphshape.shape(_net(layer), x, **options)
    plain = graphshape.shape(_net(functools.partial(BatchNormAct2d, act_layer=act)), x, **options)
    report, plain_report = shaped.meta["graphshape"], plain.meta["graphshape"]
    assert report.activation_params == plain_report.activation_params
    # the normalization is gone from each of the three, its activation stays
    layer_name = pair.split("-")[0]
    gone = [r for r in report.removed if f"normalization of {layer_name} (" in r["what"]]
    assert len(gone) == 3
    assert not [m for m in shaped.modules()
                if type(m).__module__.startswith(("timm.layers.evo_norm",
                                                  "timm.layers.filter_response_norm"))]
    _assert_same_network(shaped, plain, x)


def test_a_residual_network_with_filter_response_norms_shapes_as_its_batch_norm_twin():
    """timm's ResNetV2 (resnetv2_50d_frn is this with FilterResponseNormTlu2d, resnetv2_50d
    with BatchNormAct2d): pre-activation blocks, a deep stem, average-pool shortcuts."""
    from timm.layers import create_conv2d
    from timm.models.resnetv2 import ResNetV2

    def net(norm_layer):
        torch.manual_seed(0)
        return ResNetV2(layers=[1, 1], channels=(32, 64), stem_chs=16, stem_type="deep",
                        avg_down=True, conv_layer=create_conv2d, norm_layer=norm_layer,
                        num_classes=7).eval()

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for options in ({"method": "TAT", "eta": 0.5}, {"method": "DKS"}):
        shaped = graphshape.shape(net(frn.FilterResponseNormTlu2d), x, seed=0, **options)
        twin = graphshape.shape(net(BatchNormAct2d), x, seed=0, **options)
        _assert_same_network(shaped, twin, x)
        # and it trains
        shaped.train()
        loss = torch.nn.functional.cross_entropy(shaped(x), torch.tensor([1, 2]))
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for p in shaped.parameters() if p.requires_grad)


def test_without_its_activation_only_the_identity_remains():
    x = _x(2)
    layer = functools.partial(evo_norm.EvoNorm2dS0, groups=4, apply_act=False)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), layer(8), nn.SiLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), layer(8), nn.SiLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    shaped = graphshape.shape(model, x, method="DKS", seed=0)
    report = shaped.meta["graphshape"]
    removed = [r for r in report.removed if r["op"] == "opaque"]
    assert len(removed) == 2 and all("applies no activation" in r["what"] for r in removed)
    # the convs took over the layers' shift
    assert [r["node"] for r in report.rewritten if "gained a zero bias" in r["what"]] == ["_0", "_3"]


def test_evonorm_b0_is_refused_with_what_it_is():
    """EvoNorm B0's only nonlinearity is the max in its denominator: nothing stays."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), evo_norm.EvoNorm2dB0(8),
                          nn.Conv2d(8, 8, 3, padding=1), evo_norm.EvoNorm2dB0(8)).eval()
    with pytest.raises(GraphshapeError) as err:
        graphshape.shape(model, _x(), method="TAT")
    msg = str(err.value)
    assert "EvoNorm2dB0 is a normalization-activation layer" in msg
    assert "no activation to transform" in msg and "BatchNormAct2d" in msg
    assert err.value.node == "_1"
    with pytest.raises(GraphshapeError, match="EvoNorm2dB0 is a normalization-activation"):
        graphshape.shape(nn.Sequential(*model, nn.ReLU()), _x(), method="DKS")
    # without its activation (v), B0 is x * weight + bias: the identity remains
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), evo_norm.EvoNorm2dB0(8, apply_act=False),
                          nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    shaped = graphshape.shape(plain, _x(), method="DKS", seed=0)
    assert [r["node"] for r in shaped.meta["graphshape"].removed] == ["_1"]


def test_loaded_unshaped_it_is_one_opaque_call_that_runs_as_the_original():
    model = _net(PAIRS["EvoNorm2dS0"][0])
    with torch.no_grad():  # trained-looking parameters: v, weight and bias away from init
        for m in model.modules():
            if isinstance(m, evo_norm.EvoNorm2dS0):
                m.v.uniform_(0.5, 2.0), m.weight.uniform_(0.5, 2.0), m.bias.normal_()
    x = _x(4)
    graph = graphshape.load(model, x)
    layers = [n for n in graph if n.op == "opaque"]
    assert [n.name for n in layers] == ["_1", "_3", "_5"]
    assert all(n.attrs["norm_activation"]["activation"] == {"name": "silu"} for n in layers)
    gm = graphshape.to_torch(graph)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)
    # with v differing across channels, x * sigmoid(v x) is no one activation: the analysis
    # says so, and is unknown from there on
    rows = {r["node"]: r for r in graphshape.analyze(model, x).rows}
    assert rows["_0"]["q_pred"] is not None
    assert rows["_1"]["q_pred"] is None and rows["_2"]["q_pred"] is None
    assert "v differing across channels" in " ".join(rows["_1"]["notes"])


def _wide_net(layer, width=128):
    torch.manual_seed(0)
    return nn.Sequential(*[m for i in range(3) for m in (
        nn.Conv2d(3 if i == 0 else width, width, 3, padding=1, bias=False), layer(width))],
        nn.Conv2d(width, 8, 1)).eval()


@pytest.mark.parametrize("pair", sorted(PAIRS) + ["EvoNorm2dS0-v2"])
def test_the_analysis_predicts_q_and_c_through_them(pair):
    """Their statistics per example taken as the kernel's q: predicted q within 10% of the
    measured at every layer of a 128-wide net (before: unknown from the first one on)."""
    layer = PAIRS[pair.replace("-v2", "")][0]
    model = _wide_net(functools.partial(layer, groups=8) if "EvoNorm" in pair
                      and not isinstance(layer, functools.partial) else layer)
    if pair.endswith("-v2"):  # one v for every channel, not 1: silu(2 x) / 2
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, evo_norm.EvoNorm2dS0):
                    m.v.fill_(2.0)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    stats = graphshape.analyze(model, x, empirical=True)
    rows = [r for r in stats.rows if r["op"] in ("opaque", "conv")]
    assert len(rows) == 7 and all(r["q_pred"] is not None for r in rows)
    *hidden, output = rows
    for r in hidden:
        assert r["q_emp"] == pytest.approx(r["q_pred"], rel=0.1), r["node"]
    # (the output layer has 8 channels: measured q 0.88-0.90 of predicted, finite width)
    assert output["q_emp"] == pytest.approx(output["q_pred"], rel=0.25)
    # c between examples at the first layer (deeper, FRN's measured c falls behind: 0.51
    # measured, 0.60 predicted at the third)
    assert rows[1]["c_emp"] == pytest.approx(rows[1]["c_pred"], abs=0.05)
    assert all("normalization at init" in r["flags"] for r in rows if r["op"] == "opaque")


def test_an_exported_filter_response_norm_reads_as_rms_norm_and_relu(tmp_path):
    """Exported, FRN is ``x * (1 / sqrt(mean(x^2) + eps)).expand(x's shape)`` (the target
    shape computed at run time) then ``max(y, tau)``: both stayed opaque and the file was
    refused ("no activation function"), while the PyTorch model shapes."""
    import numpy as np
    import onnxruntime as ort

    model = _net(frn.FilterResponseNormTlu2d)
    x = _x()
    path = str(tmp_path / "frn.onnx")
    torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    graph = graphshape.load(path)
    ops = graph.count_ops()
    assert ops.get("rms_norm") == 3 and "opaque" not in ops, graph.table()
    assert [n.attrs["name"] for n in graph if n.op == "activation"] == ["relu"] * 3
    bigger = torch.cat([x, x[:1]]).numpy()  # another batch size than the export's

    def run(proto):
        session = ort.InferenceSession(proto.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        return session.run(None, {"x": bigger})[0]

    import onnx

    np.testing.assert_allclose(run(graphshape.to_onnx(graph)), run(onnx.load(path)),
                               rtol=1e-5, atol=1e-5)
    for method, options in (("DKS", {}), ("TAT", {"eta": 0.5})):
        report = graphshape.shape_onnx(path, str(tmp_path / f"{method}.onnx"), method=method,
                                       seed=0, **options)
        twin = graphshape.shape(model, x, method=method, seed=0, **options)
        assert report.activation_params == twin.meta["graphshape"].activation_params


def test_a_max_with_a_nonzero_threshold_stays_what_it_is(tmp_path):
    """Only max(x, 0) is a ReLU: a trained TLU threshold is not read as one."""
    model = _net(frn.FilterResponseNormTlu2d)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, frn.FilterResponseNormTlu2d):
                m.tau.fill_(0.25)
    path = str(tmp_path / "frn.onnx")
    torch.onnx.export(model, (_x(),), path, dynamo=False, opset_version=17)
    graph = graphshape.load(path)
    assert not [n for n in graph if n.op == "activation"]
    assert graph.count_ops().get("rms_norm") == 3


# --------------------------------------------------------------- GlobalResponseNorm (ConvNeXt V2)
grn = pytest.importorskip("timm.layers.grn")


class _GrnBlock(nn.Module):
    """ConvNeXt V2's MLP on channels-last tokens: linear, GELU, GRN (or not), linear; a
    residual around it."""

    def __init__(self, width=16, with_grn=True):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        self.grn = grn.GlobalResponseNorm(4 * width, channels_last=True) if with_grn else None

    def forward(self, x):
        h = self.act(self.fc1(x))
        return x + self.fc2(h if self.grn is None else self.grn(h))


def _grn_net(with_grn):
    torch.manual_seed(0)
    return nn.Sequential(*[_GrnBlock(with_grn=with_grn) for _ in range(4)]).eval()


@pytest.mark.parametrize("method", ["DKS", "TAT"])
def test_global_response_norm_is_removed_as_the_identity(method):
    # before: refused, "'method Tensor.norm' looks like a normalization layer that graphshape
    # could not map" (every convnextv2 model)
    x = torch.randn(2, 5, 5, 16, generator=torch.Generator().manual_seed(3))
    shaped = graphshape.shape(_grn_net(True), x, method=method, seed=0)
    plain = graphshape.shape(_grn_net(False), x, method=method, seed=0)
    removed = [r for r in shaped.meta["graphshape"].removed if r["op"] == "opaque"]
    assert len(removed) == 4 and all("GlobalResponseNorm" in r["what"] for r in removed)
    _assert_same_network(shaped, plain, x)


def test_global_response_norm_at_its_init_is_the_identity_to_the_analysis():
    model, x = _grn_net(True), torch.randn(4, 5, 5, 16, generator=torch.Generator().manual_seed(3))
    stats = graphshape.analyze(model, x, empirical=True)
    rows = [r for r in stats.rows if r["op"] == "opaque"]
    assert len(rows) == 4
    for row in rows:  # gamma = beta = 0: exactly the identity, predicted and measured
        act = stats[row["node"].replace("grn", "act")]
        assert row["q_pred"] == act["q_pred"] and row["q_emp"] == pytest.approx(act["q_emp"])
    with torch.no_grad():  # trained: no rule, said so
        for m in model.modules():
            if isinstance(m, grn.GlobalResponseNorm):
                m.weight.fill_(0.5)
    rows = [r for r in graphshape.analyze(model, x).rows if r["op"] == "opaque"]
    assert rows[0]["q_pred"] is None and "weight or bias is not 0" in " ".join(rows[0]["notes"])


def test_convnextv2_shapes():
    timm = pytest.importorskip("timm")
    x = torch.randn(2, 3, 64, 64)
    model = timm.create_model("convnextv2_atto", num_classes=10).eval()
    shaped = graphshape.shape(model, x, method="TAT", seed=0)
    assert not any(k.endswith(("grn.weight", "grn.bias")) for k in shaped.state_dict())
    assert torch.isfinite(shaped(x)).all()


@pytest.mark.parametrize("opset", [13, 18])  # ReduceL2's axes an attribute / an input
def test_an_exported_global_response_norm_is_removed_too(tmp_path, opset):
    # before: refused, "mul node '0.grn.Mul' multiplies two signals"
    x = torch.randn(2, 5, 5, 16, generator=torch.Generator().manual_seed(3))
    model = _grn_net(True)
    path = str(tmp_path / "grn.onnx")
    torch.onnx.export(model, (x,), path, dynamo=False, opset_version=opset)
    report = graphshape.shape_onnx(path, str(tmp_path / "shaped.onnx"), method="DKS", seed=0)
    from_torch = graphshape.shape(model, x, method="DKS", seed=0).meta["graphshape"]
    assert report.activation_params == from_torch.activation_params
    import onnx

    shaped = onnx.load(str(tmp_path / "shaped.onnx"))
    assert not any(n.op_type == "ReduceL2" for n in shaped.graph.node)
    assert sum("Global Response Normalization" in r["what"] for r in report.removed) >= 4


# ------------------------------------------------ EvoNorm S written out (exported, or by hand)
def _export(model, x, path, opset, dynamic):
    torch.onnx.export(model, (x,), path, dynamo=False, opset_version=opset, input_names=["x"],
                      output_names=["y"],
                      dynamic_axes={"x": {0: "b"}, "y": {0: "b"}} if dynamic else None)


def _run_onnx(path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy()})[0]


@pytest.mark.parametrize("opset, dynamic", [(13, True), (17, False)])
@pytest.mark.parametrize("pair", ["EvoNorm2dS0", "EvoNorm2dS0a", "EvoNorm2dS1-gelu",
                                  "EvoNorm2dS2a"])
def test_an_exported_evonorm_s_layer_becomes_its_activation(tmp_path, pair, opset, dynamic):
    """Exported, EvoNorm S0 is ``x * sigmoid(v * x) / group_std(x) * weight + bias`` written
    out (Reshape, ReduceMean, Sub, Mul, ReduceMean, Add, Sqrt, Expand, Reshape; with a dynamic
    batch, their shapes computed from x's): the file was refused ("the sigmoid activation
    gates another signal"; timm's resnetv2_50d_evos), while the PyTorch model shapes. Now
    it shapes into the PyTorch model's network: its parameters, its function."""
    import onnx

    layer, _ = PAIRS[pair]
    model, x = _net(layer), _x()
    path = str(tmp_path / "evo.onnx")
    _export(model, x, path, opset, dynamic)
    for method, options in (("DKS", {}), ("TAT", {"eta": 0.5})):
        out = str(tmp_path / f"{method}.onnx")
        report = graphshape.shape_onnx(path, out, method=method, seed=0, **options)
        twin = graphshape.shape(model, x, method=method, seed=0, **options)
        assert report.activation_params == twin.meta["graphshape"].activation_params
        assert sum("activation remains" in r["what"] for r in report.removed) == 3
        shaped = onnx.load(out)
        assert not {"ReduceMean", "Div", "Sqrt", "Expand"} & {n.op_type for n in shaped.graph.node}
        batch = torch.cat([x, x[:1]]) if dynamic else x  # (another batch size than exported)
        with torch.no_grad():
            want = twin(batch).numpy()
        import numpy as np

        np.testing.assert_allclose(_run_onnx(out, batch), want, rtol=1e-4, atol=1e-5)


def _group_std(x, groups, eps=1e-5):
    b, c, h, w = x.shape
    grouped = x.reshape(b, groups, c // groups, h, w)
    std = grouped.float().var(dim=(2, 3, 4), unbiased=False, keepdim=True).add(eps).sqrt()
    return std.expand(grouped.shape).reshape(b, c, h, w)


class _HandWrittenEvoNormS0(nn.Module):
    """EvoNorm S0 as a user writes it (not timm's module, which loads as an fx leaf)."""

    def __init__(self, channels, groups=4, statistic=_group_std):
        super().__init__()
        self.groups, self.statistic = groups, statistic
        self.v = nn.Parameter(torch.ones(channels))
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        shape = (1, -1, 1, 1)
        x = x * (x * self.v.view(shape)).sigmoid() / self.statistic(x, self.groups)
        return x * self.weight.view(shape) + self.bias.view(shape)


def test_a_hand_written_evonorm_s0_shapes_as_timms():
    # before: refused as a gate, as the export was
    x = _x()
    for method, options in (("DKS", {}), ("TAT", {"eta": 0.5})):
        shaped = graphshape.shape(_net(_HandWrittenEvoNormS0), x, method=method, seed=0,
                                  **options)
        timms = graphshape.shape(_net(PAIRS["EvoNorm2dS0"][0]), x, method=method, seed=0,
                                 **options)
        assert shaped.meta["graphshape"].activation_params == \
            timms.meta["graphshape"].activation_params
        assert not [k for k in shaped.state_dict() if k.endswith((".v", "weight_1"))]
        assert sum(p.numel() for p in shaped.parameters()) == \
            sum(p.numel() for p in timms.parameters())
        with torch.no_grad():
            torch.testing.assert_close(shaped(x), timms(x), rtol=1e-5, atol=1e-6)


def _group_variance(x, groups, eps=1e-5):  # (no square root: not a standard deviation)
    return _group_std(x, groups, eps) ** 2


def _std_of_the_mean_square(x, groups, eps=1e-5):  # a statistic of x ** 2, not of x
    return _group_std(x * x, groups, eps)


@pytest.mark.parametrize("statistic", [_group_variance, _std_of_the_mean_square])
def test_a_division_by_another_statistic_is_not_read_as_evonorm(tmp_path, statistic):
    model = _net(functools.partial(_HandWrittenEvoNormS0, statistic=statistic))
    x = _x()
    path = str(tmp_path / "not_evo.onnx")
    _export(model, x, path, 17, False)
    with pytest.raises(GraphshapeError, match="gates another signal"):
        graphshape.shape(model, x, method="DKS")
    with pytest.raises(GraphshapeError, match="gates another signal"):
        graphshape.shape_onnx(path, str(tmp_path / "out.onnx"), method="DKS")
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("pair", ["EvoNorm2dS0", "EvoNorm2dS1-gelu", "EvoNorm2dS2a"])
def test_the_analysis_reads_an_exported_evonorm_s_as_the_module(tmp_path, pair):
    """Node by node, an exported EvoNorm S is a product of signals and a division by a
    statistic: no rule, and no prediction after the first one. Read whole, it predicts
    what the torch frontend's module does, to the last digit."""
    from graphshape.passes.analysis import FLAG_INSIDE_LAYER

    model, x = _net(PAIRS[pair][0]), _x()
    path = str(tmp_path / "evo.onnx")
    _export(model, x, path, 17, True)
    from_torch = graphshape.analyze(model, x, empirical=True)
    from_onnx = graphshape.analyze(graphshape.load(path), x, empirical=True)
    layers = [r for r in from_torch.rows if r["op"] == "opaque"]
    divisions = [r for r in from_onnx.rows if r["op"] == "div"]
    assert len(layers) == len(divisions) == 3
    for layer, division in zip(layers, divisions):
        assert division["q_pred"] == pytest.approx(layer["q_pred"], rel=1e-12)
        assert division["c_pred"] == pytest.approx(layer["c_pred"], rel=1e-12, abs=1e-14)
        # the one-step prediction from the measured input too (the layer's rule)
        assert division["q_local"] == pytest.approx(layer["q_local"], rel=1e-6)
        assert division["q_emp"] == pytest.approx(layer["q_emp"], rel=1e-5)
    assert from_onnx.rows[-1]["q_pred"] == pytest.approx(from_torch.rows[-1]["q_pred"],
                                                         rel=1e-12)
    inside = [r for r in from_onnx.rows if FLAG_INSIDE_LAYER in r["flags"]]
    assert inside and all(r["q_pred"] is None and r["q_local"] is None for r in inside)


def test_the_analysis_reads_an_exported_global_response_norm_as_the_identity(tmp_path):
    x = torch.randn(4, 5, 5, 16, generator=torch.Generator().manual_seed(3))
    model = _grn_net(True)
    path = str(tmp_path / "grn.onnx")
    torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17)
    from_torch, from_onnx = graphshape.analyze(model, x), graphshape.analyze(graphshape.load(path), x)
    assert from_onnx.rows[-1]["q_pred"] == pytest.approx(from_torch.rows[-1]["q_pred"],
                                                         rel=1e-12)
    with torch.no_grad():  # trained: no rule, said so, as for the module
        for m in model.modules():
            if isinstance(m, grn.GlobalResponseNorm):
                m.weight.fill_(0.5)
    torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17)
    rows = graphshape.analyze(graphshape.load(path), x).rows
    said = [r for r in rows if any("GlobalResponseNorm whose weight or bias is not 0" in n
                                   for n in r["notes"])]
    # (the first layer's last node; after it, everything is "unknown after" it)
    assert [r["node"] for r in said] == ["0.grn.Add_2"] and said[0]["q_pred"] is None


def test_the_analysis_of_an_exported_evonorm_s0_follows_its_v(tmp_path):
    """S0's ``x * sigmoid(v x)`` is ``silu(v x) / v`` for one v shared by all channels (as
    for the module), and has no rule for v that differ."""
    model, x = _net(PAIRS["EvoNorm2dS0"][0]), _x()
    path = str(tmp_path / "evo.onnx")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, evo_norm.EvoNorm2dS0):
                m.v.fill_(0.5)
    _export(model, x, path, 17, False)
    from_torch = graphshape.analyze(model, x)
    from_onnx = graphshape.analyze(graphshape.load(path), x)
    assert from_onnx.rows[-1]["q_pred"] == pytest.approx(from_torch.rows[-1]["q_pred"],
                                                         rel=1e-12)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, evo_norm.EvoNorm2dS0):
                m.v.copy_(torch.linspace(0.5, 1.5, m.v.numel()))
    _export(model, x, path, 17, False)
    rows = graphshape.analyze(graphshape.load(path), x).rows
    division = next(r for r in rows if r["op"] == "div")
    assert division["q_pred"] is None and "v differing across channels" in division["notes"][-1]
