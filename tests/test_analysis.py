"""Kernel rules, propagation, KernelStats and the inspect CLI on small hand-built graphs."""

import json
import math

import numpy as np
import pytest

from graphshape import GraphshapeError
from graphshape.ir import Graph, Node, Ref, TensorInfo
from graphshape.ops import OPS
from graphshape.passes import analysis
from graphshape.passes.analysis import KERNEL_RULES, analyze, apply_rule, kernel_of


def test_every_canonical_op_has_a_kernel_rule():
    assert set(OPS) <= set(KERNEL_RULES), sorted(set(OPS) - set(KERNEL_RULES))
    # the table follows each op's declared kernel category
    by_kind = {"affine": analysis.rule_affine, "activation": analysis.rule_activation,
               "concat": analysis.rule_concat, "norm": analysis.rule_norm,
               "approx_identity": analysis.rule_approx_identity}
    # (resize: the identity too, but unflagged where it is exact, nearest upsampling by
    # integer factors)
    refined = {"affine": None, "resize": analysis.rule_resize}
    for name, spec in OPS.items():
        if spec.kernel in by_kind and name not in refined:
            assert KERNEL_RULES[name] is by_kind[spec.kernel], name
    assert OPS["resize"].kernel == "approx_identity"
    assert KERNEL_RULES["resize"] is refined["resize"]


def _relu_c(c):
    return (math.sqrt(max(0.0, 1 - c * c)) + (math.pi - math.acos(c)) * c) / math.pi


class _G:
    def __init__(self, batch=4, width=256):
        self.g = Graph({"source": "test"})
        self.b, self.w = batch, width
        self.g.add(Node("x", "input", outputs=[TensorInfo((batch, width), "float32")]))
        self.last = "x"

    def add(self, name, op, inputs=None, attrs=None, params=None, width=None):
        inputs = [self.last] if inputs is None else inputs
        shape = (self.b, width or self.w)
        self.g.add(Node(name, op, [Ref(i) for i in inputs], attrs or {}, params or {},
                        [TensorInfo(shape, "float32")]))
        self.last = name
        return name

    def done(self):
        self.g.add(Node("out", "output", [Ref(self.last)]))
        self.g.validate()
        return self.g


def _relu_mlp(depth, width, rng, gain=2.0, bias=0.0):
    b = _G(width=width)
    for i in range(depth):
        w = rng.standard_normal((width, width)) * math.sqrt(gain / width)
        b.add(f"fc{i}", "linear", params={"weight": w, "bias": np.full(width, bias)})
        b.add(f"relu{i}", "activation", attrs={"name": "relu"})
    return b.done()


def test_relu_chain_matches_arccos_kernel_and_weights():
    rng = np.random.default_rng(0)
    g = _relu_mlp(6, 64, rng, gain=1.5, bias=0.1)
    x = rng.standard_normal((3, 64))
    stats = analyze(g, x)
    k = kernel_of(x)
    q, c01 = k.q.copy(), k.c[0, 1]
    unit_q, c0 = 1.0, 0.0
    for i in range(6):
        w = g[f"fc{i}"].params["weight"]
        gain = float(np.sum(w ** 2)) / w.shape[0]
        cov01 = gain * c01 * math.sqrt(q[0] * q[1]) + 0.01
        q = gain * q + 0.01
        c01 = cov01 / math.sqrt(q[0] * q[1])
        row = stats[f"fc{i}"]
        assert row["q_pred"] == pytest.approx(q.mean(), rel=1e-12)
        c0 = (gain * unit_q * c0 + 0.01) / (gain * unit_q + 0.01)
        unit_q = gain * unit_q + 0.01
        assert row["c0"] == pytest.approx(c0, rel=1e-12)
        # ReLU: Q(q) = q/2, cov = sqrt(q1 q2)/2 * C(c)
        cov01 = math.sqrt(q[0] * q[1]) / 2 * _relu_c(c01)
        q = q / 2
        c01 = cov01 / math.sqrt(q[0] * q[1])
        c0 = _relu_c(c0)
        unit_q /= 2
        row = stats[f"relu{i}"]
        assert row["q_pred"] == pytest.approx(q.mean(), rel=1e-9)
        assert row["c0"] == pytest.approx(c0, rel=1e-9)
        assert row["c_curv_1"] == math.inf  # the ReLU kink: C''(1) is infinite
    assert stats["relu5"]["flags"] == []


def test_slope_and_curvature_follow_the_chain_rule():
    from graphshape.kernels import local_maps

    b = _G(width=32)
    b.add("fc0", "linear", params={"weight": np.eye(32) * 1.3})
    b.add("t0", "activation", attrs={"name": "tanh"})
    b.add("fc1", "linear", params={"weight": np.eye(32) * 0.7})
    b.add("t1", "activation", attrs={"name": "softplus"})
    g = b.done()
    stats = analyze(g)
    q1 = 1.3 ** 2
    m1 = local_maps("tanh", {"input_scale": math.sqrt(q1)})
    q2 = 0.49 * float(local_maps("tanh").q(q1))
    m2 = local_maps("softplus", {"input_scale": math.sqrt(q2)})
    s = m1.c_slope_1 * m2.c_slope_1
    k = m1.c_curv_1 * m2.c_slope_1 + m2.c_curv_1 * m1.c_slope_1 ** 2
    assert stats["t1"]["c_slope_1"] == pytest.approx(s, rel=1e-9)
    assert stats["t1"]["c_curv_1"] == pytest.approx(k, rel=1e-9)
    # no example inputs: two unit-q uncorrelated examples, so c_pred is C_f(0)
    assert stats["t1"]["c_pred"] == pytest.approx(stats["t1"]["c0"], abs=1e-12)
    assert stats.meta["batch"] == 2


def test_joins_products_and_constants():
    rng = np.random.default_rng(1)
    b = _G(width=8)
    b.add("a", "activation", ["x"], {"name": "tanh"})
    b.add("s", "sum", ["x", "a"], {"weights": (0.6, 0.8)})
    b.add("two", "constant", [], params={"value": np.float32(2.0)})
    b.add("scaled", "mul", ["s", "two"])
    b.add("prod", "mul", ["scaled", "a"])
    b.add("xx", "add", ["x", "x"])
    b.add("cat", "concat", ["xx", "a"], {"axis": 1}, width=16)
    g = b.done()
    x = rng.standard_normal((4, 8))
    k_in = kernel_of(x)
    stats = analyze(g, x)
    from graphshape.kernels import local_maps

    qa = local_maps("tanh").q(k_in.q)
    q_s = 0.36 * k_in.q + 0.64 * qa
    assert stats["s"]["q_pred"] == pytest.approx(np.mean(q_s), rel=1e-12)
    assert stats["scaled"]["q_pred"] == pytest.approx(4 * np.mean(q_s), rel=1e-12)
    assert stats["prod"]["q_pred"] == pytest.approx(np.mean(4 * q_s * qa), rel=1e-12)
    assert "product of signals (assumed independent)" in stats["prod"]["flags"]
    assert stats["xx"]["q_pred"] == pytest.approx(4 * np.mean(k_in.q), rel=1e-12)  # x + x = 2x
    assert stats["cat"]["q_pred"] == pytest.approx(np.mean(2 * k_in.q + qa / 2), rel=1e-12)
    assert "two" not in [r["node"] for r in stats.rows]  # constants are not signals


def test_batch_norm_rule_matches_numpy_batch_norm():
    """Training-mode batch statistics over batch and locations, signals varying across
    locations: q scaled to 1 on average per channel, c unchanged."""
    rng = np.random.default_rng(2)
    g = Graph({"source": "test"})
    shape = (6, 256, 8, 8)
    g.add(Node("x", "input", outputs=[TensorInfo(shape, "float32")]))
    g.add(Node("bn", "batch_norm", [Ref("x")], {"num_features": 256, "eps": 0.0},
               {"weight": np.full(256, 2.0), "bias": np.zeros(256)},
               [TensorInfo(shape, "float32")]))
    # examples sharing a common component (c ~ 0.5) with different scales
    common = rng.standard_normal(shape[1:])
    x = np.stack([s * (0.7 * common + 0.7 * rng.standard_normal(shape[1:]))
                  for s in (0.5, 1, 1, 2, 3, 1.5)])
    out, flags, _ = apply_rule(g, g["bn"], [kernel_of(x)])
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    y = 2 * (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True))
    want = kernel_of(y)
    assert "normalization at init" in flags
    assert np.mean(out.q) == pytest.approx(4.0, rel=1e-12)
    np.testing.assert_allclose(out.q, want.q, rtol=0.05)
    np.testing.assert_allclose(out.c, want.c, atol=0.04)
    assert np.mean(out.c[np.triu_indices(6, 1)]) > 0.4


def test_opaque_makes_everything_downstream_unknown():
    b = _G(width=8)
    b.add("a", "activation", attrs={"name": "relu"})
    b.add("weird", "opaque", attrs={"framework": "torch", "description": "torch.special.foo"})
    b.add("after", "linear", params={"weight": np.eye(8)})
    b.add("side", "activation", ["a"], {"name": "tanh"})
    g = b.done()
    stats = analyze(g, np.random.default_rng(3).standard_normal((3, 8)))
    assert stats["a"]["q_pred"] is not None and stats["side"]["q_pred"] is not None
    for name in ("weird", "after"):
        row = stats[name]
        assert row["q_pred"] is None and row["c_pred"] is None and row["c0"] is None
        assert "unknown after opaque" in row["flags"]
    assert "torch.special.foo" in " ".join(stats["weird"]["notes"])
    text = stats.to_json()
    rows = {r["node"]: r for r in json.loads(text)["rows"]}
    assert "NaN" not in text and rows["after"]["q_pred"] is None


def test_pooling_is_flagged_approximate_and_reshape_is_exact():
    g = Graph({"source": "test"})
    g.add(Node("x", "input", outputs=[TensorInfo((2, 3, 4, 4), "float32")]))
    g.add(Node("p", "max_pool", [Ref("x")], {"kernel_shape": (2, 2)},
               outputs=[TensorInfo((2, 3, 2, 2), "float32")]))
    g.add(Node("f", "flatten", [Ref("p")], {"start_dim": 1, "end_dim": -1},
               outputs=[TensorInfo((2, 12), "float32")]))
    g.add(Node("o", "output", [Ref("f")]))
    stats = analyze(g, np.ones((2, 3, 4, 4)))
    assert stats["p"]["flags"] == ["approximate"]
    assert stats["f"]["flags"] == []
    assert stats["f"]["q_pred"] == pytest.approx(1.0)


def test_kernel_of_averages_c_over_locations():
    x = np.zeros((2, 2, 2))  # 2 examples, 2 features, 2 locations
    x[0, :, 0], x[1, :, 0] = (1, 0), (1, 0)  # location 0: identical (c = 1)
    x[0, :, 1], x[1, :, 1] = (3, 0), (0, 3)  # location 1: orthogonal (c = 0), larger q
    k = kernel_of(x)
    assert k.c[0, 1] == pytest.approx(0.5)
    np.testing.assert_allclose(k.q, [(0.5 + 4.5) / 2] * 2)


def test_kernel_of_matches_the_pair_by_pair_definition(monkeypatch):
    """kernel_of computes every pair at once (one matrix product of per-location unit
    vectors): the same numbers as the definition written pair by pair, including locations
    where one example is all zeros (they count as c = 0) and an all-zero example."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 5, 3, 4))
    x[0] = 0.0
    x[2, :, 1, 2] = 0.0
    x[4] *= 7.0
    k = kernel_of(x)
    b, f = x.shape[:2]
    flat = x.reshape(b, f, -1)
    q_loc = (flat ** 2).mean(axis=1)
    want = np.eye(b)
    for i in range(b):
        for j in range(b):
            if i != j:
                dot = (flat[i] * flat[j]).mean(axis=0)
                scale = np.sqrt(q_loc[i] * q_loc[j])
                want[i, j] = np.mean([d / s if s > 0 else 0.0 for d, s in zip(dot, scale)])
    np.testing.assert_allclose(k.q, q_loc.mean(axis=1), rtol=1e-14)
    np.testing.assert_allclose(k.c, want, rtol=1e-12, atol=1e-14)
    assert k.c[0, 1] == 0.0
    # by chunks of locations (large activations), from float32: the same numbers
    monkeypatch.setattr(analysis, "_KERNEL_CHUNK", 2 * b * f)
    chunked = kernel_of(x.astype(np.float32))
    want32 = kernel_of(x.astype(np.float32).astype(np.float64))
    monkeypatch.undo()
    np.testing.assert_allclose(chunked.cov, want32.cov, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(chunked.q, want32.q, rtol=1e-14)


def test_a_large_batch_of_smooth_activations_needs_no_pairwise_quadrature(monkeypatch):
    """With 64 examples a GELU or tanh layer has 2016 pairs: their covariances come from
    one Hermite expansion per example (Mehler's formula), not a 2-D quadrature per pair,
    and equal the quadrature's."""
    from graphshape import gaussian
    from graphshape.kernels import local_maps

    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 16)) * rng.uniform(0.3, 2.0, (64, 1))
    for name in ("gelu", "tanh"):
        g = _G(batch=64, width=16)
        g.add("a", "activation", attrs={"name": name})
        graph = g.done()
        calls = []
        real_expect2 = gaussian.expect2
        monkeypatch.setattr(gaussian, "expect2", lambda *a, **k: calls.append(1) or
                            real_expect2(*a, **k))
        analysis._LM_CACHE.clear()
        out, _, _ = apply_rule(graph, graph["a"], [kernel_of(x)])
        monkeypatch.setattr(gaussian, "expect2", real_expect2)
        assert calls == []
        k_in = kernel_of(x)
        lm = local_maps(name)
        iu = np.triu_indices(64, 1)
        pick = rng.choice(iu[0].size, 40, replace=False)
        i, j = iu[0][pick], iu[1][pick]
        kinks, soft = lm._x_kinks_soft()
        want = real_expect2(lm.fn, lm.fn, k_in.c[i, j], kinks, kinks, soft, soft,
                            np.sqrt(k_in.q[i]), np.sqrt(k_in.q[j]))
        np.testing.assert_allclose(out.cov[i, j], want, rtol=1e-10, atol=1e-12)


def test_errors_are_graphshape_errors():
    g = _relu_mlp(1, 4, np.random.default_rng(0))
    with pytest.raises(GraphshapeError, match="1 inputs"):
        analyze(g, (np.ones((2, 4)), np.ones((2, 4))))
    with pytest.raises(GraphshapeError, match="example_inputs"):
        analyze(g, empirical=True)
    bad = _G(width=4)
    bad.add("a", "activation", attrs={"name": "nonexistent"})
    with pytest.raises(GraphshapeError, match="nonexistent"):
        analyze(bad.done())


def test_stats_table_json_and_plot(tmp_path):
    rng = np.random.default_rng(4)
    g = _relu_mlp(3, 16, rng)
    stats = analyze(g, rng.standard_normal((3, 16)))
    table = stats.table()
    header = table.splitlines()[0].split()
    assert header[:4] == ["node", "op", "q_pred", "c_pred"] and "c_curv_1" in header
    assert "activation:relu" in table
    assert len(table.splitlines()) == len(stats.rows) + 2
    data = json.loads(stats.to_json())
    assert data["rows"][-1]["c_curv_1"] == "inf"  # JSON has no infinity: written as a string
    assert [r["node"] for r in data["rows"]] == [r["node"] for r in stats.rows]
    # the per-pair numbers behind the means
    k = stats.kernels["relu2"]
    assert k["c_pred"].shape == (3, 3) and k["q_pred"].shape == (3,)
    assert stats["relu2"]["c_pred"] == pytest.approx(k["c_pred"][np.triu_indices(3, 1)].mean())
    full = json.loads(stats.to_json(kernels=True))
    assert np.allclose(full["kernels"]["relu2"]["c_pred"], k["c_pred"])
    path = stats.plot(tmp_path / "k.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- CLI
def test_cli_bad_arguments_exit_2(capsys):
    from graphshape.cli import main

    with pytest.raises(SystemExit) as e:
        main(["inspect"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "SRC" in err
    assert main(["inspect", "torchvision.models:resnet18", "--input-shape", "1,x,3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--input-shape" in err
    assert main(["inspect", "no_such_package_xyz:f"]) == 2
    assert main(["inspect", "missing.onnx"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_inspect_factory_json_and_plot(capsys, tmp_path):
    pytest.importorskip("torchvision")
    from graphshape.cli import main

    png = tmp_path / "out.png"
    assert main(["inspect", "torchvision.models:resnet18", "--input-shape", "2,3,32,32",
                 "--json", "--plot", str(png), "--empirical"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["meta"]["empirical"] and data["meta"]["batch"] == 2
    measured = [r for r in data["rows"] if r["q_emp"] is not None]
    assert len(measured) == len(data["rows"])
    # exact rules at reshapes: measured q equals the one-step prediction
    flat = next(r for r in data["rows"] if r["op"] == "flatten")
    assert flat["q_local"] == pytest.approx(flat["q_emp"], rel=1e-5)
    ops = [r["op"] for r in data["rows"]]
    assert ops.count("batch_norm") == 20 and ops.count("activation") == 17
    assert {r["activation"] for r in data["rows"] if r["op"] == "activation"} == {"relu"}
    bn_rows = [r for r in data["rows"] if r["op"] == "batch_norm"]
    assert all("normalization at init" in r["flags"] for r in bn_rows)
    assert png.stat().st_size > 1000


def test_cli_inspect_onnx_file(capsys, tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from graphshape.cli import main

    rng = np.random.default_rng(5)
    width = 256
    w1, w2 = (numpy_helper.from_array(
        (rng.standard_normal((width, width)) * math.sqrt(2 / width)).astype(np.float32), name)
        for name in ("W1", "W2"))
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["h"]),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "W2"], ["b"]),
             helper.make_node("Add", ["X", "b"], ["s"]),
             helper.make_node("Tanh", ["s"], ["Y"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [4, width])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4, width])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "tiny.onnx"
    onnx.save(model, str(path))
    assert main(["inspect", str(path), "--empirical", "--json"]) == 0
    rows = {r["node"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert (rows["a"]["activation"], rows["Y"]["activation"]) == ("relu", "tanh")
    for r in rows.values():
        assert r["q_local"] == pytest.approx(r["q_emp"], rel=0.15), r["node"]
    # the add of two signals: q adds up (unnormalized sum)
    assert rows["s"]["q_pred"] == pytest.approx(rows["X"]["q_pred"] + rows["b"]["q_pred"])
