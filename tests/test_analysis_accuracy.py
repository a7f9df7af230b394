"""The analysis against measurements ("Done when" of the analysis issue).

Inputs are constant across spatial locations, where the kernel theory is exact up to finite
width. Over the nodes with both numbers: median |c_pred - c_emp| <= 0.03, worst <= 0.10, and
median |q_local / q_emp - 1| <= 8%. Networks are shaped by hand with graphshape.kernels
(delta-orthogonal convolutions, scaled-orthogonal dense layers, zero biases).
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from graphshape.frontends.torch_fx import load_module  # noqa: E402
from graphshape.init import delta_orthogonal, suo_  # noqa: E402
from graphshape.kernels import solve  # noqa: E402
from graphshape.passes.analysis import analyze  # noqa: E402
from graphshape.passes.subnetworks import find_joins, subnet_max_func  # noqa: E402

C_MEDIAN, C_WORST, Q_LOCAL_MEDIAN = 0.03, 0.10, 0.08


def _orthogonal_init(graph, seed):
    """Delta-orthogonal convolutions, scaled-orthogonal dense layers, zero biases."""
    rng = np.random.default_rng(seed)
    for node in graph:
        if node.op == "conv":
            w = node.params["weight"]
            node.params["weight"] = delta_orthogonal(w.shape, node.attrs.get("groups", 1), rng)
        elif node.op == "linear":
            suo_(node.params["weight"], rng)
        if node.op in ("conv", "linear") and node.params.get("bias") is not None:
            node.params["bias"] = np.zeros_like(node.params["bias"])


def _constant_inputs(batch, channels, size, seed, offset=0.0):
    """Unit-q examples, constant across locations. ``offset`` adds a common component to all
    channels (like the mean colour of images): the pairs' c then lie in (0, 1) rather than
    anywhere in (-1, 1), which few channels would give."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(channels)
    mix = np.linspace(0.0, 0.95, batch)
    v = np.stack([m * common + math.sqrt(1 - m * m) * rng.standard_normal(channels) for m in mix])
    v = v + offset
    v = v / np.sqrt(np.mean(v * v, axis=1, keepdims=True))
    x = np.broadcast_to(v[:, :, None, None], (batch, channels, size, size))
    return torch.tensor(np.ascontiguousarray(x), dtype=torch.float32)


def _errors(stats):
    rows = [r for r in stats.rows if r["c_pred"] is not None and r["c_emp"] is not None]
    c_err = np.array([abs(r["c_pred"] - r["c_emp"]) for r in rows])
    q_rows = [r for r in stats.rows if r.get("q_local") and r.get("q_emp")]
    q_err = np.array([abs(r["q_local"] / r["q_emp"] - 1) for r in q_rows])
    return c_err, q_err, len(rows)


def _check(stats, min_rows):
    c_err, q_err, n = _errors(stats)
    assert n >= min_rows
    assert np.median(c_err) <= C_MEDIAN, np.median(c_err)
    assert np.max(c_err) <= C_WORST, np.max(c_err)
    assert np.median(q_err) <= Q_LOCAL_MEDIAN, np.median(q_err)
    return c_err, q_err


def test_tat_vanilla_cnn_30_layers_width_512():
    torch.manual_seed(0)
    depth, width = 30, 512
    layers = [torch.nn.Conv2d(16, width, 3, padding=1), torch.nn.LeakyReLU()]
    for _ in range(depth - 1):
        layers += [torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.LeakyReLU()]
    x = _constant_inputs(4, 16, 4, seed=1)
    graph = load_module(torch.nn.Sequential(*layers), x)

    def chain(z, r):
        for _ in range(depth):
            z = r(z)
        return z

    params = solve(["leaky_relu"], "TAT", chain)["leaky_relu"]
    for node in graph:
        if node.op == "activation":
            node.attrs["negative_slope"] = params["negative_slope"]
            node.attrs["transform"] = {"output_scale": params["output_scale"]}
    _orthogonal_init(graph, seed=2)
    with torch.no_grad():
        stats = analyze(graph, x, empirical=True)
    _check(stats, min_rows=2 * depth)
    # TReLU: C_f(0) of the whole network is the target eta = 0.9, and q stays 1
    last = stats.rows[-1]
    assert last["c0"] == pytest.approx(0.9, abs=1e-6)
    assert last["q_pred"] == pytest.approx(1.0, rel=1e-6)


def _dks_resnet50(w, seed, batch=8):
    model = torchvision.models.resnet50()
    x = _constant_inputs(batch, 3, 32, seed=seed)
    graph = load_module(model.eval(), x)
    for node in list(graph):
        if node.op == "batch_norm":
            graph.bypass(node.name)
    for join in find_joins(graph):
        node = graph[join.node]
        weights = [math.sqrt(1 - w * w)] * 2
        weights[join.slots[join.shortcut]] = w
        node.op = "sum"
        node.attrs = {"weights": tuple(weights)}
    params = solve(["relu"], "DKS", subnet_max_func(graph))["relu"]
    for node in graph:
        if node.op == "activation":
            node.attrs["transform"] = dict(params)
    _orthogonal_init(graph, seed=seed)
    return graph, x


def test_dks_resnet50():
    """Finite width shows here: c drifts like q does (a random walk). Over seeds 3-8 the
    median |c_pred - c_emp| was 0.003-0.034 (5 of 6 within 0.03; docs/analysis.md, with
    the distribution over 18 seeds of the shaping pipeline); this seed is a typical one."""
    torch.manual_seed(0)
    graph, x = _dks_resnet50(0.8, seed=4)
    with torch.no_grad():
        stats = analyze(graph, x, empirical=True)
    _check(stats, min_rows=110)
    # DKS: q = 1 at every activation input, C(0) = 0 locally
    act_inputs = {n.inputs[0].node for n in graph if n.op == "activation"}
    for r in stats.rows:
        if r["node"] in act_inputs:
            assert r["q_pred"] == pytest.approx(1.0, rel=1e-4)


def test_unshaped_relu_mlp_default_init():
    torch.manual_seed(0)
    depth, width = 8, 512
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    x = torch.randn(6, width)
    graph = load_module(torch.nn.Sequential(*layers), x)
    with torch.no_grad():
        stats = analyze(graph, x, empirical=True)
    _check(stats, min_rows=2 * depth)
    q = [r["q_pred"] for r in stats.rows if r["activation"] == "relu"]
    # default init: ||W||^2/out = 1/3, ReLU halves: q decays about 6x per layer
    assert all(b < a / 3 for a, b in zip(q, q[1:4]))
