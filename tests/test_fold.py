"""Scale folding (graphshape.passes.fold, issue #6): the folded network computes the same
function and has the same predicted kernels (q rescaled where the scales moved), in torch and
through ONNX; activations and sums it cannot fold are left as they are; the option reaches
shape / shape_onnx / shape_graph / the CLI."""

from __future__ import annotations

import warnings

import networkx as nx
import numpy as np
import pytest
import torch
from torch import nn

from graphshape import torch_modules as tm
from graphshape.api import load
from graphshape.backend_torch import emit
from graphshape.errors import GraphshapeError
from graphshape.ir import Graph, Node, Ref, TensorInfo
from graphshape.passes.fold import fold_scales, homogeneous_scale
from graphshape.passes.shaping import shape_graph

torchvision = pytest.importorskip("torchvision")


CNN_DEPTH = 16  # deep enough for TAT's C_f(0) <= 0.9 target to be reachable


def _vanilla_cnn():
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()]
    for _ in range(CNN_DEPTH - 1):
        layers += [nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)]
    return nn.Sequential(*layers)


def _mlp():
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(48, 64), nn.ReLU()]
    for _ in range(15):
        layers += [nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.1)]
    return nn.Sequential(*layers, nn.Linear(64, 10))


MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), (2, 3, 32, 32)),
    "resnet50": (lambda: torchvision.models.resnet50(weights=None), (2, 3, 32, 32)),
    "vanilla_cnn": (_vanilla_cnn, (2, 3, 16, 16)),
    "mlp": (_mlp, (2, 3, 4, 4)),
}
CASES = [("resnet18", "TAT"), ("resnet18", "DKS"), ("resnet50", "TAT"), ("resnet50", "DKS"),
         ("vanilla_cnn", "TAT"), ("vanilla_cnn", "DKS"), ("mlp", "TAT"), ("mlp", "DKS")]


@pytest.fixture(scope="module")
def shaped_cache():
    return {}


def _shaped(cache, arch, method, mode="parameters"):
    """(source graph, shaped graph, folded graph, fold record, example input)."""
    if (arch, method) not in cache:
        factory, shape = MODELS[arch]
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        graph = load(factory(), (x,))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shaped, _ = shape_graph(graph, method=method, seed=0, fold_scales="none")
        cache[arch, method] = (graph, shaped, x)
    if (arch, method, mode) not in cache:
        graph, shaped, x = cache[arch, method]
        folded, record = fold_scales(shaped, mode=mode)
        cache[arch, method, mode] = (graph, shaped, folded, record, x)
    return cache[arch, method, mode]


def _fingerprint(graph):
    return {n.name: (repr(n.attrs), {k: v.tobytes() for k, v in n.params.items()
                                     if isinstance(v, np.ndarray)}) for n in graph}


def _q_ratios(folded, record):
    """Expected q(folded) / q(shaped) per node: 1 / c^2 from a folded activation up to (not
    including) the layers that took its scale, and w^2 at a layer that took a sum's weight."""
    ratios = {}
    for r in record["rewritten"]:
        if r["op"] == "activation":
            between = {r["node"]}
            for layer in r["into"]:
                between |= nx.descendants(folded.nx, r["node"]) & nx.ancestors(folded.nx, layer)
            for n in between:
                ratios[n] = ratios.get(n, 1.0) / r["scale"] ** 2
        else:
            for layer, w in zip(r["into"], r["scale"]):
                ratios[layer] = ratios.get(layer, 1.0) * w * w
    return ratios


@pytest.mark.parametrize("mode", ["parameters", "weights"])
@pytest.mark.parametrize("arch,method", CASES)
def test_folding_keeps_the_function_and_the_kernels(shaped_cache, arch, method, mode):
    from graphshape.passes.analysis import analyze

    _, shaped, folded, record, x = _shaped(shaped_cache, arch, method, mode)
    before = _fingerprint(shaped)
    acts = [n for n in shaped if n.op == "activation"]
    foldable = [n.name for n in acts if homogeneous_scale(n) is not None]
    folded_acts = [r["node"] for r in record["rewritten"] if r["op"] == "activation"]
    folded_sums = [r for r in record["rewritten"] if r["op"] == "sum"]
    if method == "TAT":  # TReLU: c * leaky_relu, folded wherever only layers read it
        assert foldable and folded_acts and set(folded_acts) <= set(foldable)
        if arch in ("vanilla_cnn", "mlp"):  # every TReLU feeds a layer
            assert folded_acts == foldable
    else:  # DKS relu has shifts: left alone
        assert not folded_acts
    if arch.startswith("resnet"):
        assert folded_sums
    for name in folded_acts:
        assert "transform" not in folded[name].attrs and "transform" in shaped[name].attrs
    for r in folded_sums:
        slots = [i for i, ref in enumerate(folded[r["node"]].inputs) if ref.node in r["into"]]
        assert [folded[r["node"]].attrs["weights"][i] for i in slots] == [1.0] * len(slots)
    assert _fingerprint(shaped) == before  # the input graph is not modified
    layers = {n for r in record["rewritten"] for n in r["into"]}
    for name in layers:  # "weights": the scales are attributes, the parameters untouched
        on_attrs = any(k in folded[name].attrs for k in ("weight_scale", "bias_scale"))
        same = all(np.array_equal(v, shaped[name].params[k])
                   for k, v in folded[name].params.items())
        assert on_attrs == same == (mode == "weights"), name

    gen = torch.Generator().manual_seed(2)
    xs = torch.randn(3, *x.shape[1:], generator=gen)
    a, b = emit(shaped).double().eval(), emit(folded).double().eval()
    with torch.no_grad():
        want, got = a(xs.double()), b(xs.double())
    # float32 weights multiplied by c in float32: one rounding per weight
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))

    sa, sb = analyze(shaped, xs.numpy()), analyze(folded, xs.numpy())
    ratios = _q_ratios(folded, record)
    assert len(sa.rows) == len(sb.rows)
    for ra, rb in zip(sa.rows, sb.rows):
        assert ra["node"] == rb["node"]
        if ra["q_pred"] is None:
            assert rb["q_pred"] is None
            continue
        ratio = ratios.get(ra["node"], 1.0)
        np.testing.assert_allclose(sb.kernels[ra["node"]]["q_pred"],
                                   ratio * sa.kernels[ra["node"]]["q_pred"], rtol=1e-5,
                                   err_msg=ra["node"])
        np.testing.assert_allclose(sb.kernels[ra["node"]]["c_pred"],
                                   sa.kernels[ra["node"]]["c_pred"], rtol=1e-5, atol=1e-6,
                                   err_msg=ra["node"])
        for key in ("c0", "c_slope_1"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["node"], key)


@pytest.mark.parametrize("mode", ["parameters", "weights"])
@pytest.mark.parametrize("arch,method", [("resnet18", "TAT"), ("resnet18", "DKS"),
                                         ("vanilla_cnn", "TAT"), ("mlp", "TAT")])
def test_folded_graph_through_onnx_runtime(shaped_cache, arch, method, mode):
    ort = pytest.importorskip("onnxruntime")
    from graphshape.backend_onnx import emit as emit_onnx

    _, shaped, folded, record, x = _shaped(shaped_cache, arch, method, mode)
    xs = torch.randn(*x.shape, generator=torch.Generator().manual_seed(4))  # static batch
    outs = []
    for g in (shaped, folded):
        proto = emit_onnx(g)
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        outs.append((sess.run(None, {sess.get_inputs()[0].name: xs.numpy()})[0], proto))
    (want, p0), (got, p1) = outs
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    with torch.no_grad():  # and the torch backend agrees with onnxruntime on the folded graph
        np.testing.assert_allclose(emit(folded).eval()(xs).numpy(), got, rtol=1e-4,
                                   atol=1e-4 * np.abs(want).max())
    count = lambda p, op: sum(n.op_type == op for n in p.graph.node)  # noqa: E731
    if method == "TAT":  # the activation scales are gone from the emitted graph
        assert count(p1, "Mul") < count(p0, "Mul")
    else:
        assert count(p1, "Mul") <= count(p0, "Mul")


# ------------------------------------------------------------------ small graphs
def _conv(name, src, rng, bias=True, weight=None):
    params = {"weight": weight if weight is not None
              else (rng.standard_normal((4, 4, 3, 3)) / 6).astype(np.float32)}
    if bias:
        params["bias"] = rng.standard_normal(4).astype(np.float32)
    return Node(name, "conv", [Ref(src)], {"dims": 2, "pads": (1, 1, 1, 1)}, params)


TRELU = {"input_scale": 1.0, "output_scale": 1.4}


def _act(name, src, transform=TRELU, fn="leaky_relu", slope=0.1):
    attrs = {"name": fn, "transform": dict(transform)}
    if fn == "leaky_relu":
        attrs["negative_slope"] = slope
    return Node(name, "activation", [Ref(src)], attrs)


def _graph(*nodes, out):
    g = Graph({"source": "torch"})
    g.add(Node("x", "input", [], outputs=[TensorInfo((2, 4, 6, 6), "float32")]))
    for n in nodes:
        g.add(n)
    for i, o in enumerate(out):
        g.add(Node(f"y{i}", "output", [Ref(o)]))
    return g


def _check_same_function(g, folded):
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = emit(g).double()(x), emit(folded).double()(x)
    for a, b in zip(want if isinstance(want, tuple) else (want,),
                    got if isinstance(got, tuple) else (got,)):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_folds_through_pooling_and_reshapes_into_a_linear_and_keeps_biases():
    rng = np.random.default_rng(0)
    g = _graph(_conv("c1", "x", rng), _act("a", "c1"),
               Node("p", "max_pool", [Ref("a")], {"dims": 2, "kernel_shape": (2, 2),
                                                   "stride": (2, 2), "pads": (0, 0, 0, 0)}),
               Node("pad", "pad", [Ref("p")], {"pads": (0, 0, 1, 1, 0, 0, 1, 1),
                                                "mode": "constant", "value": 0.0}),
               Node("gp", "global_avg_pool", [Ref("pad")]),
               Node("f", "flatten", [Ref("gp")], {"start_dim": 1, "end_dim": -1}),
               Node("fc", "linear", [Ref("f")], {"in_features": 4, "out_features": 3},
                    {"weight": rng.standard_normal((3, 4)).astype(np.float32),
                     "bias": rng.standard_normal(3).astype(np.float32)}),
               out=["fc"])
    folded, rec = fold_scales(g)
    assert [(r["node"], r["into"]) for r in rec["rewritten"]] == [("a", ["fc"])]
    assert "transform" not in folded["a"].attrs and "transform" in g["a"].attrs
    np.testing.assert_allclose(folded["fc"].params["weight"], 1.4 * g["fc"].params["weight"],
                               rtol=1e-6)
    np.testing.assert_array_equal(folded["fc"].params["bias"], g["fc"].params["bias"])
    _check_same_function(g, folded)
    # a pad with a non-zero value does not commute with the scale
    g["pad"].attrs["value"] = 1.0
    assert fold_scales(g)[1]["rewritten"] == []


@pytest.mark.parametrize("case", ["sum", "output", "activation", "concat", "shifts",
                                  "negative_scales", "negative_slope", "relu6"])
def test_leaves_alone_what_it_cannot_fold(case):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((4, 4, 3, 3)) / 6).astype(np.float32)
    act = {"shifts": lambda: _act("a", "c1", {"input_scale": 1.2, "input_shift": 0.1,
                                              "output_scale": 1.1}),
           "negative_scales": lambda: _act("a", "c1", {"input_scale": -1.2,
                                                       "output_scale": -1.1}),
           "negative_slope": lambda: _act("a", "c1", slope=-0.2),
           "relu6": lambda: _act("a", "c1", {"output_scale": 1.5}, fn="relu6"),
           }.get(case, lambda: _act("a", "c1"))()
    nodes = [_conv("c1", "x", rng), act, _conv("c2", "a", rng, weight=w)]
    out = ["c2"]
    if case == "sum":  # the activation also reaches a sum, through an identity
        nodes += [Node("i", "identity", [Ref("a")]),
                  Node("s", "sum", [Ref("c2"), Ref("i")], {"weights": (1.0, 0.8)})]
        out = ["s"]
    elif case == "output":
        out = ["c2", "a"]
    elif case == "activation":
        nodes += [Node("b", "activation", [Ref("a")], {"name": "tanh"})]
        out = ["c2", "b"]
    elif case == "concat":
        nodes += [Node("cat", "concat", [Ref("a"), Ref("c1")], {"axis": 1})]
        out = ["c2", "cat"]
    g = _graph(*nodes, out=out)
    folded, rec = fold_scales(g)
    assert [r for r in rec["rewritten"] if r["op"] == "activation"] == []
    assert folded["a"].attrs == g["a"].attrs
    np.testing.assert_array_equal(folded["c2"].params["weight"], w)
    _check_same_function(g, folded)


@pytest.mark.parametrize("mode", ["parameters", "weights"])
def test_a_tied_weight_is_folded_on_the_layer_and_stays_tied(mode):
    # c3 shares c2's weight array and reads another value: scaling the array would scale
    # c3 too (or, copied, untie them), so the scale goes on c2 as its weight_scale
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((4, 4, 3, 3)) / 6).astype(np.float32)
    g = _graph(_conv("c1", "x", rng), _act("a", "c1"), _conv("c2", "a", rng, weight=w),
               _conv("c3", "c1", rng, weight=w), out=["c2", "c3"])
    folded, rec = fold_scales(g, mode=mode)
    assert [r["into"] for r in rec["rewritten"] if r["op"] == "activation"] == [["c2"]]
    assert folded["c2"].params["weight"] is folded["c3"].params["weight"]
    np.testing.assert_array_equal(folded["c2"].params["weight"], w)
    assert folded["c2"].attrs["weight_scale"] != 1.0 and "weight_scale" not in folded["c3"].attrs
    _check_same_function(g, folded)


def test_sum_weights_fold_only_into_layers_the_sum_alone_reads():
    rng = np.random.default_rng(2)
    g = _graph(_conv("c1", "x", rng), _conv("c2", "x", rng), _conv("c3", "x", rng, bias=False),
               Node("s", "sum", [Ref("c1"), Ref("c2"), Ref("c3"), Ref("x")],
                    {"weights": (0.6, -0.5, 0.3, 0.4)}),
               Node("t", "activation", [Ref("c2")], {"name": "tanh"}),
               out=["s", "t"])
    folded, rec = fold_scales(g)
    assert rec == {"removed": [], "rewritten": [
        {"node": "s", "op": "sum", "what": "weights 0.6 folded into 'c1', 0.3 folded into 'c3'",
         "scale": [0.6, 0.3], "into": ["c1", "c3"], "mode": "parameters"}]}
    assert folded["s"].attrs["weights"] == (1.0, -0.5, 1.0, 0.4)  # c2 is read by t too
    np.testing.assert_allclose(folded["c1"].params["bias"], 0.6 * g["c1"].params["bias"],
                               rtol=1e-6)
    np.testing.assert_allclose(folded["c3"].params["weight"], 0.3 * g["c3"].params["weight"],
                               rtol=1e-6)
    np.testing.assert_array_equal(folded["c2"].params["weight"], g["c2"].params["weight"])
    _check_same_function(g, folded)
    assert g["s"].attrs["weights"] == (0.6, -0.5, 0.3, 0.4)
    same, _ = fold_scales(g, copy=False)  # copy=False rewrites the graph itself
    assert same is g and g["s"].attrs["weights"] == (1.0, -0.5, 1.0, 0.4)


# ------------------------------------------------------------------ emission
def test_folded_trelu_and_sum_emit_the_cheap_torch_path():
    rng = np.random.default_rng(3)
    g = _graph(_conv("c1", "x", rng), _act("a", "c1"), _conv("c2", "a", rng),
               _act("b", "c2"),  # read by the sum too: not overwritable
               _conv("c3", "b", rng),
               Node("s", "sum", [Ref("b"), Ref("c3")], {"weights": (0.6, 0.8)}),
               out=["s"])
    folded, rec = fold_scales(g)
    assert [r["node"] for r in rec["rewritten"]] == ["a", "s"]
    gm = emit(folded)
    assert type(gm.a) is nn.LeakyReLU and gm.a.inplace and gm.a.negative_slope == 0.1
    assert isinstance(gm.b, tm.TransformedActivation)  # b reaches the sum: kept
    assert gm.s.weights == (0.6, 1.0) and gm.s.overwrite_input == 1  # add_(b, alpha=0.6)
    ref = emit(g)
    gm, ref = gm.double(), ref.double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    got, want = gm(x), ref(xr)
    tol = dict(rtol=1e-5, atol=1e-6)  # float32 weights and constants, rounded once
    torch.testing.assert_close(got, want, **tol)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, **tol)
    # the gradients of the folded layers are those of the unfolded ones, divided by the scale
    torch.testing.assert_close(gm.c2.weight.grad * 1.4, ref.c2.weight.grad, **tol)
    torch.testing.assert_close(gm.c3.bias.grad * 0.8, ref.c3.bias.grad, **tol)


def test_plain_relu_is_emitted_in_place_only_where_nothing_else_reads_its_input():
    rng = np.random.default_rng(4)
    g = _graph(_conv("c1", "x", rng), _conv("c2", "x", rng), _conv("c3", "x", rng),
               Node("r", "activation", [Ref("c1")], {"name": "relu"}),
               Node("k", "activation", [Ref("c2")], {"name": "leaky_relu",
                                                      "negative_slope": 0.2}),
               Node("n", "activation", [Ref("x")], {"name": "leaky_relu",
                                                     "negative_slope": 0.2}),
               # torch has no in-place backward for a negative slope
               Node("m", "activation", [Ref("c3")], {"name": "leaky_relu",
                                                      "negative_slope": -0.2}),
               Node("t", "activation", [Ref("c3")], {"name": "tanh"}),
               out=["r", "k", "n", "m", "t"])
    gm = emit(g)
    assert gm.r.inplace and gm.k.inplace and gm.k.negative_slope == 0.2
    assert not gm.n.inplace and not gm.m.inplace  # the model input; c3 is read twice
    g.set_inputs("t", [Ref("c1")])
    assert not emit(g).r.inplace  # c1 now read by r and t
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    outs = gm(x)
    sum(o.sum() for o in outs).backward()  # the in-place backward runs
    assert torch.isfinite(x.grad).all()


# ------------------------------------------------------------------ options
def _train_grads(net, x):
    net.train()
    net.zero_grad(set_to_none=True)
    out = net(x)
    out.square().mean().backward()
    return out.detach(), {k: p.grad.clone() for k, p in net.named_parameters()}


def test_shape_option_folds_and_keeps_outputs():
    import graphshape

    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nets = {mode: graphshape.shape(_vanilla_cnn(), x, seed=0, fold_scales=mode)
                for mode in (False, "weights", True)}
        default = graphshape.shape(_vanilla_cnn(), x, seed=0)
    plain, on_weights, on_params = nets[False], nets["weights"], nets[True]
    options = {m: n.meta["graphshape"].options["fold_scales"] for m, n in nets.items()}
    assert options == {False: "none", "weights": "weights", True: "parameters"}
    assert default.meta["graphshape"].options["fold_scales"] == "weights"
    for net in (on_weights, on_params):
        folds = [r for r in net.meta["graphshape"].rewritten if "folded into" in r["what"]]
        assert len(folds) == CNN_DEPTH
        assert not any(isinstance(m, tm.TransformedActivation) for m in net.modules())
    assert not [r for r in plain.meta["graphshape"].rewritten if "folded into" in r["what"]]
    assert any(isinstance(m, tm.TransformedActivation) for m in plain.modules())
    # "weights": the scales sit on the layers, the parameters are the unfolded ones
    scaled = [m for m in on_weights.modules() if isinstance(m, tm.ScaledConv2d)]
    assert len(scaled) == CNN_DEPTH - 1 and all(m.weight_scale > 1.0 for m in scaled)
    assert not any(isinstance(m, tm.ScaledConv2d) for m in on_params.modules())
    params = dict(plain.named_parameters())  # (its state_dict also holds TReLU's constants)
    assert list(dict(on_weights.named_parameters())) == list(params)
    for k, v in on_weights.named_parameters():
        torch.testing.assert_close(v, params[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(v, params[k]) for k, v in on_params.named_parameters())
    # the same function; with "weights" also the same gradients (training is unchanged),
    # with "parameters" a folded weight c W gets 1/c of the original's gradient
    out, grads = _train_grads(plain, x)
    out_w, grads_w = _train_grads(on_weights, x)
    out_p, grads_p = _train_grads(on_params, x)
    torch.testing.assert_close(out_w, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_p, out, rtol=1e-5, atol=1e-6)
    for k, g in grads.items():
        torch.testing.assert_close(grads_w[k], g, rtol=1e-4, atol=1e-6, msg=k)  # rounding
    conv = next(k for k in grads if k.endswith("weight") and k != "0.weight")
    ratio = (grads_p[conv].norm() / grads[conv].norm()).item()
    assert ratio < 0.9, ratio  # 1/c, c = TReLU's scale (> 1)
    with pytest.raises(GraphshapeError, match="fold_scales"):
        graphshape.shape(_vanilla_cnn(), x, fold_scales="yes")


def test_folded_default_keeps_training_step_for_step():
    """Five Adam steps of the default (scales on the weights) and of the unfolded network
    from the same parameters end at the same parameters."""
    import graphshape

    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(1))
    final = {}
    for mode in ("none", "weights"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = graphshape.shape(_vanilla_cnn(), x, seed=0, fold_scales=mode).train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        final[mode] = {k: v.detach() for k, v in net.named_parameters()}
    for k, v in final["none"].items():
        torch.testing.assert_close(final["weights"][k], v, rtol=1e-4, atol=1e-6, msg=k)


def test_shape_onnx_and_cli_fold_scales(tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import json

    import graphshape
    from graphshape.backend_onnx import emit as emit_onnx
    from graphshape.cli import main

    x = torch.randn(2, 3, 16, 16)
    src = tmp_path / "cnn.onnx"
    onnx.save(emit_onnx(load(_vanilla_cnn(), (x,))), str(src))
    outs, inits = {}, {}
    for fold, mode in ((False, "none"), ("weights", "weights"), (True, "parameters")):
        dst = tmp_path / f"shaped_{mode}.onnx"
        report = graphshape.shape_onnx(src, dst, seed=0, fold_scales=fold)
        assert report.options["fold_scales"] == mode
        sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
        outs[mode] = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        model = onnx.load(str(dst))
        meta = json.loads({p.key: p.value for p in model.metadata_props}["graphshape"])
        assert meta["options"]["fold_scales"] == mode
        inits[mode] = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
        assert sum(n.op_type == "Mul" for n in model.graph.node) == (mode == "none") * CNN_DEPTH
    np.testing.assert_allclose(outs["parameters"], outs["none"], rtol=1e-4, atol=1e-5)
    # an inference graph has no parametrization: both folds write the same initializers
    np.testing.assert_array_equal(outs["weights"], outs["parameters"])
    assert inits["weights"].keys() == inits["parameters"].keys()
    for k, v in inits["weights"].items():
        np.testing.assert_array_equal(v, inits["parameters"][k])

    for flag, mode in (([], "weights"), (["--fold-scales"], "parameters"),
                       (["--fold-scales", "none"], "none")):
        dst, rep = tmp_path / f"cli_{mode}.onnx", tmp_path / f"cli_{mode}.json"
        assert main(["shape", str(src), "-o", str(dst), "--report", str(rep)] + flag) == 0
        data = json.loads(rep.read_text())
        assert data["options"]["fold_scales"] == mode
        assert any("folded into" in r["what"] for r in data["rewritten"]) is (mode != "none")
    capsys.readouterr()


def test_shape_graph_records_the_fold(shaped_cache):
    graph, _, folded, record, _ = _shaped(shaped_cache, "mlp", "TAT")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g, report = shape_graph(graph, method="TAT", seed=0, fold_scales=True)
    assert report.options["fold_scales"] == "parameters"
    assert all(r in report.rewritten for r in record["rewritten"])
    assert g.meta["graphshape"]["options"]["fold_scales"] == "parameters"
    for n in g:
        assert n.attrs == folded[n.name].attrs
        for k, v in n.params.items():
            np.testing.assert_array_equal(v, folded[n.name].params[k])


# ------------------------------------------------------------------ scaled layers (torch)
@pytest.mark.parametrize("batch", [1, 64])  # input smaller / larger than the weight
@pytest.mark.parametrize("kind", ["conv", "conv_transpose", "linear"])
def test_scaled_layers_match_the_plain_formula_and_its_gradients(kind, batch):
    """A scaled layer computes layer(x; s W, t b) with the gradients of that formula for its
    unscaled parameters, whether it scales its input or its weight (the smaller one)."""
    gen = torch.Generator().manual_seed(0)
    s, t = 1.37, 0.6
    if kind == "conv":
        layer = tm.ScaledConv2d(8, 8, 3, padding=1, weight_scale=s, bias_scale=t)
        x = torch.randn(batch, 8, 4, 4, generator=gen, dtype=torch.float64)
        ref = lambda x, w, b: nn.functional.conv2d(x, w, b, padding=1)  # noqa: E731
    elif kind == "conv_transpose":
        layer = tm.ScaledConvTranspose2d(8, 8, 3, stride=2, weight_scale=s, bias_scale=t)
        x = torch.randn(batch, 8, 4, 4, generator=gen, dtype=torch.float64)
        ref = lambda x, w, b: nn.functional.conv_transpose2d(x, w, b, stride=2)  # noqa: E731
    else:
        layer = tm.ScaledLinear(24, 24, weight_scale=s, bias_scale=t)
        x = torch.randn(batch, 24, generator=gen, dtype=torch.float64)
        ref = nn.functional.linear
    layer = layer.double()
    assert layer._scales_input(x) == (batch == 1)
    x.requires_grad_(True)
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    got, want = layer(x), ref(x, s * w, t * b)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    v = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    gx, = torch.autograd.grad(got, x, v, retain_graph=True)
    got.backward(v)
    gx_want, gw, gb = torch.autograd.grad(want, (x, w, b), v)
    for a, e in ((gx, gx_want), (layer.weight.grad, gw), (layer.bias.grad, gb)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    # compiled: s * layer(x; W, b t / s), the same values and parameter gradients
    layer.zero_grad()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(x.detach())
    torch.testing.assert_close(out, want.detach(), rtol=1e-12, atol=1e-12)
    out.backward(v)
    for a, e in ((layer.weight.grad, gw), (layer.bias.grad, gb)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
