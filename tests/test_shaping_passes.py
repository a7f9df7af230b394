"""The shaping passes on hand-built IR graphs (no framework needed)."""

import math

import numpy as np
import pytest

from graphshape import GraphshapeError
from graphshape.ir import Graph, Node, Ref, TensorInfo
from graphshape.passes.joins import normalize_sums
from graphshape.passes.normalize import remove_normalization
from graphshape.passes.shaping import (find_gates, inject_transforms, max_pool_to_avg_pool,
                                       shape_graph, substitute_activations)

C, H = 8, 6


def _conv(g, name, src, cin=C, cout=C, k=3, stride=1, bias=False):
    p = {"weight": np.ones((cout, cin, k, k), np.float32)}
    if bias:
        p["bias"] = np.ones(cout, np.float32)
    return g.add(Node(name, "conv", [Ref(src)], attrs={
        "dims": 2, "in_channels": cin, "out_channels": cout, "kernel_shape": (k, k),
        "stride": (stride, stride), "pads": (k // 2,) * 4, "dilation": (1, 1), "groups": 1},
        params=p, outputs=[TensorInfo((1, cout, H, H), "float32")])).name


def _bn(g, name, src, c=C):
    return g.add(Node(name, "batch_norm", [Ref(src)], attrs={"num_features": c, "eps": 1e-5},
                      params={"weight": np.ones(c, np.float32), "bias": np.zeros(c, np.float32),
                              "running_mean": np.zeros(c, np.float32),
                              "running_var": np.ones(c, np.float32)},
                      outputs=[TensorInfo((1, c, H, H), "float32")])).name


def _act(g, name, src, fn="relu", **attrs):
    return g.add(Node(name, "activation", [Ref(src)], attrs={"name": fn, **attrs},
                      outputs=[TensorInfo((1, C, H, H), "float32")])).name


def _op(g, name, op, *srcs, **attrs):
    return g.add(Node(name, op, [Ref(s) for s in srcs], attrs=attrs,
                      outputs=[TensorInfo((1, C, H, H), "float32")])).name


def _const(g, name, value):
    return g.add(Node(name, "constant", [], params={"value": np.asarray(value, np.float32)},
                      outputs=[TensorInfo(np.shape(value), "float32")])).name


def mini_resnet():
    """stem conv-bn-relu, an identity block and a projection block (ResNet V1), head."""
    g = Graph({"source": "torch"})
    g.add(Node("x", "input", attrs={"name": "x"}, outputs=[TensorInfo((1, C, H, H), "float32")]))
    s = _act(g, "relu0", _bn(g, "bn0", _conv(g, "conv0", "x")))
    b = _bn(g, "bn2", _conv(g, "conv2", _act(g, "relu1", _bn(g, "bn1", _conv(g, "conv1", s)))))
    s = _act(g, "relu2", _op(g, "add1", "add", b, s))
    b = _bn(g, "bn4", _conv(g, "conv4", _act(g, "relu3", _bn(g, "bn3", _conv(g, "conv3", s)))))
    d = _bn(g, "bn5", _conv(g, "conv5", s, k=1))
    s = _act(g, "relu4", _op(g, "add2", "add", d, b))  # shortcut in slot 0 here
    p = _op(g, "pool", "global_avg_pool", s)
    f = _op(g, "flat", "flatten", p, start_dim=1, end_dim=-1)
    g.add(Node("fc", "linear", [Ref(f)], attrs={"in_features": C, "out_features": 3},
               params={"weight": np.ones((3, C), np.float32), "bias": np.ones(3, np.float32)},
               outputs=[TensorInfo((1, 3), "float32")]))
    g.add(Node("out", "output", [Ref("fc")], attrs={"name": "out"}))
    g.validate()
    return g


def test_remove_normalization_bypasses_norms_and_adds_zero_biases():
    g = mini_resnet()
    new, rec = remove_normalization(g)
    assert "batch_norm" not in new.count_ops()
    assert sorted(r["node"] for r in rec["removed"]) == ["bn0", "bn1", "bn2", "bn3", "bn4", "bn5"]
    for conv in ("conv0", "conv1", "conv2", "conv3", "conv4", "conv5"):
        assert np.array_equal(new[conv].params["bias"], np.zeros(C))
    assert new["add1"].inputs == [Ref("conv2"), Ref("relu0")]
    assert new["relu0"].inputs == [Ref("conv0")]
    assert "bias" not in g["conv0"].params and "bn0" in g  # input untouched
    new.validate()


def test_caffe2_style_bn_mul_add_chain_is_removed():
    g = Graph({"source": "onnx"})
    g.add(Node("x", "input", outputs=[TensorInfo((1, C, H, H), "float32")]))
    c = _conv(g, "conv", "x", bias=True)
    b = _bn(g, "bn", c)
    m = _op(g, "mul", "mul", b, _const(g, "scale", np.full((1, C, 1, 1), 2.0)))
    a = _op(g, "add", "add", m, _const(g, "shift", np.full((C, 1, 1), 0.5)))
    r = _act(g, "relu", a)
    # a constant that is not per-channel (varies over space) is not part of the norm
    m2 = _op(g, "mul2", "mul", r, _const(g, "mask", np.ones((1, 1, H, H))))
    g.add(Node("out", "output", [Ref(m2)]))
    new, rec = remove_normalization(g)
    assert {r["node"] for r in rec["removed"]} == {"bn", "mul", "add"}
    assert set(new.count_ops()) == {"input", "conv", "activation", "mul", "constant", "output"}
    assert "scale" not in new and "shift" not in new and "mask" in new
    assert new["relu"].inputs == [Ref("conv")]
    assert rec["rewritten"] == []  # the conv already had a bias


def test_normalized_sums_residual_weights():
    g, _ = remove_normalization(mini_resnet())
    w = 0.6
    new, rec = normalize_sums(g, w)
    b = math.sqrt(1 - w * w)
    assert new["add1"].op == "sum" and new["add1"].attrs["weights"] == pytest.approx((b, w))
    # add2's shortcut (the projection conv5) is its first input
    assert new["add2"].attrs["weights"] == pytest.approx((w, b))
    assert {r["node"] for r in rec["rewritten"]} == {"add1", "add2"}
    assert g["add1"].op == "add"  # input untouched


def test_shortcut_weight_zero_removes_skips_and_projection_layers():
    g, _ = remove_normalization(mini_resnet())
    new, rec = normalize_sums(g, 0.0)
    assert "add1" not in new and "add2" not in new and "conv5" not in new
    assert new["relu2"].inputs == [Ref("conv2")] and new["relu4"].inputs == [Ref("conv4")]
    assert {r["node"] for r in rec["removed"]} == {"add1", "add2", "conv5"}
    new.validate()


def test_joins_of_two_nonlinear_branches_get_equal_weights_and_sub_keeps_sign():
    g = Graph({"source": "torch"})
    g.add(Node("x", "input", outputs=[TensorInfo((1, C, H, H), "float32")]))
    a = _act(g, "ra", _conv(g, "ca", "x"))
    b = _act(g, "rb", _conv(g, "cb", "x"))
    s = _op(g, "join", "add", a, b)
    d = _op(g, "diff", "sub", _act(g, "rc", _conv(g, "cc", s)), _act(g, "rd", _conv(g, "cd", s)))
    g.add(Node("out", "output", [Ref(d)]))
    new, _ = normalize_sums(g, 0.0)  # no residual joins: the shortcut weight is irrelevant
    r = 1 / math.sqrt(2)
    assert new["join"].attrs["weights"] == pytest.approx((r, r))
    assert new["diff"].attrs["weights"] == pytest.approx((r, -r))


@pytest.mark.parametrize("w", [-0.1, 1.5, float("nan")])
def test_bad_shortcut_weight(w):
    with pytest.raises(GraphshapeError, match="shortcut_weight"):
        normalize_sums(mini_resnet(), w)


def squeeze_excitation():
    g = Graph({"source": "torch"})
    g.add(Node("x", "input", outputs=[TensorInfo((1, C, H, H), "float32")]))
    x = _act(g, "relu", _conv(g, "conv", "x"))
    p = _op(g, "se_pool", "global_avg_pool", x)
    e = _act(g, "se_relu", _conv(g, "se_fc1", p, k=1, bias=True))
    s = _act(g, "se_gate", _conv(g, "se_fc2", e, k=1, bias=True), "sigmoid")
    m = _op(g, "se_mul", "mul", x, s)
    g.add(Node("out", "output", [Ref(m)]))
    return g


def test_gates_are_found_and_a_squeeze_excitation_starts_at_one():
    g = squeeze_excitation()
    assert find_gates(g) == [("se_gate", "se_mul")]
    assert find_gates(mini_resnet()) == []
    new, report = shape_graph(g, method="DKS", activation="tanh", seed=0)
    assert not new["se_fc2"].params["weight"].any() and not new["se_fc2"].params["bias"].any()
    assert new["se_gate"].attrs == {"name": "sigmoid", "transform": {"output_scale": 2.0}}
    assert new["se_relu"].attrs["name"] == "relu"  # inside the excitation: left as it is
    assert new["relu"].attrs["name"] == "tanh" and "transform" in new["relu"].attrs
    assert any("1 gate(s) ('se_gate'" in w and "'se_fc2'" in w for w in report.warnings)
    # a gate that is 0 at 0 (SwiGLU's SiLU) would cut the signal: refused, saying why
    g["se_gate"].attrs["name"] = "silu"
    with pytest.raises(GraphshapeError, match=r"se_gate.*se_mul.*silu\(0\) = 0"):
        shape_graph(g, method="DKS", activation="tanh")


def test_substitution_skips_gates_and_drops_foreign_attrs():
    g = squeeze_excitation()
    g["relu"].attrs.update(inplace=True)
    new, rec = substitute_activations(g, "leaky_relu")
    assert new["relu"].attrs == {"name": "leaky_relu", "inplace": True}
    assert new["se_gate"].attrs["name"] == "sigmoid"
    assert {r["node"] for r in rec["rewritten"]} == {"relu", "se_relu"}
    h = Graph({"source": "torch"})
    h.add(Node("x", "input", outputs=[TensorInfo((1, C), "float32")]))
    _act(h, "lr", "x", "leaky_relu", negative_slope=0.2)
    h.add(Node("out", "output", [Ref("lr")]))
    assert substitute_activations(h, "tanh")[0]["lr"].attrs == {"name": "tanh"}
    with pytest.raises(GraphshapeError, match="nosuchact"):
        substitute_activations(h, "nosuchact")


def test_max_pool_to_avg_pool():
    g = Graph({"source": "torch"})
    g.add(Node("x", "input", outputs=[TensorInfo((1, C, H, H), "float32")]))
    p = _op(g, "mp", "max_pool", "x", dims=2, kernel_shape=(3, 3), stride=(2, 2),
            pads=(1, 1, 1, 1), ceil_mode=False, dilation=(1, 1))
    q = _op(g, "gmp", "global_max_pool", p)
    g.add(Node("out", "output", [Ref(q)]))
    new, rec = max_pool_to_avg_pool(g)
    assert new["mp"].op == "avg_pool" and new["mp"].attrs["count_include_pad"] is False
    assert "dilation" not in new["mp"].attrs and new["mp"].attrs["kernel_shape"] == (3, 3)
    assert new["gmp"].op == "global_avg_pool"
    assert g["mp"].op == "max_pool"


def test_inject_transforms():
    g, _ = substitute_activations(mini_resnet(), "leaky_relu")
    params = {"leaky_relu": {"negative_slope": 0.3, "input_shift": 0.1, "output_shift": -0.2,
                             "output_scale": 1.2}}
    new, rec = inject_transforms(g, params)
    assert new["relu3"].attrs["negative_slope"] == 0.3
    assert new["relu3"].attrs["transform"] == {"input_shift": 0.1, "output_shift": -0.2,
                                               "output_scale": 1.2}
    assert len(rec["rewritten"]) == 5 and "transform" not in g["relu3"].attrs


@pytest.mark.parametrize("method,act", [("DKS", "softplus"), ("TAT", "leaky_relu"),
                                        ("TAT", "softplus")])
@pytest.mark.parametrize("preactivation", [False, True])
def test_shape_graph_solves_from_the_graphs_own_subnetworks(method, act, preactivation):
    """Two blocks after a stem, as built (V1): M(x, r) = max(r(w2 y + (1-w2) r(y)) twice from
    y = r(x), r(x)); with pre-activation shortcuts the identity block's shortcut reads the
    stem conv and the projection reads the stream's activation: M = max(r(y2), r(r(x))),
    y1 = w2 x + (1-w2) r(r(x)), y2 = w2 r(y1) + (1-w2) r(r(y1)). Solved directly with
    kernels.solve, equal to what shape_graph injects."""
    from graphshape import kernels

    w = 0.5
    eta = 0.5  # two blocks are too shallow to reach TAT's default eta = 0.9

    def hand(x, r):
        if preactivation:
            y = w * w * x + (1 - w * w) * r(r(x))
            y = w * w * r(y) + (1 - w * w) * r(r(y))
            return max(r(y), r(r(x)))
        y = r(x)
        for _ in range(2):
            y = r(w * w * y + (1 - w * w) * r(y))
        return max(y, r(x))

    expected = kernels.solve([act], method, hand, eta=eta)[act]
    new, report = shape_graph(mini_resnet(), method=method, activation=act,
                              shortcut_weight=w, eta=eta, seed=0,
                              preactivation_shortcuts=preactivation, fold_scales="none")
    assert report.activation_params[act] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert new["add1"].inputs[1] == (Ref("conv0") if preactivation else Ref("relu0"))
    assert new["add2"].inputs[0] == Ref("conv5")  # a projection shortcut stays
    assert "batch_norm" not in new.count_ops()
    t = new["relu3"].attrs.get("transform", {})
    for k in ("input_scale", "input_shift", "output_shift", "output_scale"):
        if k in expected:
            assert t[k] == pytest.approx(expected[k])
    assert report.initialized == 7
    w0 = new["conv1"].params["weight"]
    assert np.count_nonzero(w0[:, :, [0, 2], :]) == 0  # delta-orthogonal
    d = report.to_dict()
    assert d["activation_params"] == report.activation_params and d["method"] == method


def test_shape_graph_unreachable_target_is_a_graphshape_error():
    with pytest.raises(GraphshapeError):
        shape_graph(mini_resnet(), method="TAT", activation="leaky_relu", shortcut_weight=0.5)


def test_rewiring_updates_attribute_templates():
    """An opaque node names its inputs inside attrs["args"] (backends resolve them by name):
    bypassing the norm before it must rewrite the template too."""
    g = Graph({"source": "torch"})
    g.add(Node("x", "input", outputs=[TensorInfo((1, C, H, H), "float32")]))
    b = _bn(g, "bn", _conv(g, "conv", "x"))
    g.add(Node("up", "opaque", [Ref(b)], attrs={
        "framework": "torch", "fx_op": "call_function", "target": "interpolate",
        "args": (Ref(b),), "kwargs": {"scale_factor": 2, "size": [Ref(b), None]},
        "description": "function interpolate"}, outputs=[TensorInfo((1, C, 12, 12), "float32")]))
    g.add(Node("out", "output", [Ref("up")]))
    new, _ = remove_normalization(g)
    assert new["up"].inputs == [Ref("conv")]
    assert new["up"].attrs["args"] == (Ref("conv"),)
    assert new["up"].attrs["kwargs"] == {"scale_factor": 2, "size": [Ref("conv"), None]}
    assert g["up"].attrs["args"] == (Ref("bn"),)


def test_constant_scales_far_from_one_are_reported():
    g = mini_resnet()
    scale = _const(g, "layer_scale", np.full((1, C, 1, 1), 1e-6))
    m = _op(g, "scaled", "mul", "relu4", scale)
    g.set_inputs("pool", [Ref(m)])
    _, report = shape_graph(g, method="untransformed", shortcut_weight=0.5, seed=0)
    assert any("'scaled' (rms 1e-06)" in w for w in report.warnings)
    _, clean = shape_graph(mini_resnet(), method="untransformed", shortcut_weight=0.5, seed=0)
    assert not any("far from 1" in w for w in clean.warnings)
