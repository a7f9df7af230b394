import networkx as nx
import numpy as np
import pytest

from graphshape import GraphshapeError
from graphshape.ir import Graph, Node, Ref, TensorInfo


def _chain():
    g = Graph({"source": "test"})
    g.add(Node("x", "input", outputs=[TensorInfo((2, 4), "float32")]))
    g.add(Node("fc", "linear", [Ref("x")], {"in_features": 4, "out_features": 3},
               {"weight": np.ones((3, 4), np.float32)}, [TensorInfo((2, 3), "float32")]))
    g.add(Node("act", "activation", [Ref("fc")], {"name": "relu"}))
    g.add(Node("res", "add", [Ref("act"), Ref("fc")]))
    g.add(Node("out", "output", [Ref("res")]))
    return g


def test_topological_order_and_networkx_view():
    g = _chain()
    assert [n.name for n in g] == ["x", "fc", "act", "res", "out"]
    assert isinstance(g.nx, nx.DiGraph)
    assert g.nx.edges["fc", "res"]["slots"] == [(0, 1)]
    assert g.outputs == [Ref("res")]
    assert nx.immediate_dominators(g.nx, "x")["res"] == "fc"
    g.validate()


def test_bypass_and_remove_dead():
    g = _chain()
    g.bypass("act")
    assert g["res"].inputs == [Ref("fc"), Ref("fc")]
    assert g.nx.edges["fc", "res"]["slots"] == [(0, 0), (0, 1)]
    g.add(Node("unused", "activation", [Ref("fc")], {"name": "tanh"}))
    assert g.remove_dead() == ["unused"]
    g.validate()


def test_errors_name_the_node():
    g = _chain()
    with pytest.raises(GraphshapeError, match="fc"):
        g.remove("fc")
    with pytest.raises(GraphshapeError, match="dangling"):
        g.add(Node("bad", "identity", [Ref("nope")]))
    g.add(Node("loop", "identity", [Ref("res")]))
    g.set_inputs("fc", [Ref("loop")])
    with pytest.raises(GraphshapeError, match="cycle"):
        g.topo_order()


def test_copy_is_deep_and_table_prints():
    g = _chain()
    h = g.copy()
    h["fc"].params["weight"][0, 0] = 5
    assert g["fc"].params["weight"][0, 0] == 1
    text = g.table()
    assert "linear" in text and "fc" in text and "float32[2x3]" in text


def test_replace_uses_rewrites_refs_inside_attribute_templates():
    """Opaque nodes' args/kwargs and a reshape's dynamic shape name graph values inside
    attrs; rewiring must update them together with inputs and the networkx edges."""
    g = _chain()
    g.add(Node("size", "opaque", [Ref("act")],
               {"framework": "torch", "args": (Ref("act"), [1, {"dim": Ref("act")}]),
                "kwargs": {"other": slice(None, Ref("act"), None)}}))
    g.add(Node("view", "reshape", [Ref("act"), Ref("size")],
               {"shape": [Ref("size"), -1], "static_shape": (2, 3)}))
    g.add(Node("skip", "opaque", [Ref("act")], {"args": (Ref("act"),), "kwargs": {}}))
    g.add(Node("out2", "output", [Ref("view")]))
    count = g.replace_uses(Ref("act"), Ref("fc"), exclude=["skip"])
    assert count == 3  # res, size, view (skip excluded)
    size = g["size"]
    assert size.inputs == [Ref("fc")]
    assert size.attrs["args"] == (Ref("fc"), [1, {"dim": Ref("fc")}])
    assert size.attrs["kwargs"]["other"].stop == Ref("fc")
    assert g["view"].inputs == [Ref("fc"), Ref("size")]
    assert g["view"].attrs["shape"] == [Ref("size"), -1]
    assert g["skip"].attrs["args"] == (Ref("act"),) and g["skip"].inputs == [Ref("act")]
    assert sorted(g.nx.successors("act")) == ["skip"]
    assert g.nx.edges["fc", "view"]["slots"] == [(0, 0)]
    g.validate()


def test_weight_tap_norms_match_float64_and_notice_reinit():
    from graphshape.ir import weight_tap_norms

    rng = np.random.default_rng(0)
    conv = rng.standard_normal((256, 128, 3, 3)).astype(np.float32)  # several blocks
    expect = np.einsum("oikl,oikl->kl", conv.astype(np.float64), conv.astype(np.float64))
    np.testing.assert_allclose(weight_tap_norms(conv), expect, rtol=1e-6)
    one_by_one = rng.standard_normal((512, 256, 1, 1)).astype(np.float32)
    got = weight_tap_norms(one_by_one)
    assert got.shape == (1, 1)
    np.testing.assert_allclose(got[0, 0], np.sum(one_by_one.astype(np.float64) ** 2), rtol=1e-6)
    dense = rng.standard_normal((10, 7)).astype(np.float16)
    np.testing.assert_allclose(weight_tap_norms(dense),
                               np.sum(dense.astype(np.float64) ** 2), rtol=1e-3)
    conv[...] = 2 * rng.standard_normal(conv.shape)  # re-initialized in place: not stale
    np.testing.assert_allclose(weight_tap_norms(conv),
                               np.einsum("oikl,oikl->kl", conv.astype(np.float64),
                                         conv.astype(np.float64)), rtol=1e-5)


def test_torch_load_precomputes_weight_norms_for_the_analysis():
    """The first predicted-only analysis after load must not read the weights again."""
    import torch

    import graphshape
    from graphshape import ir
    from graphshape.passes.analysis import analyze

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 5, bias=False))
    graph = graphshape.load(model, torch.randn(2, 3, 6, 6))
    weights = [n.params["weight"] for n in graph if n.op in ("conv", "linear")]
    entries = [ir._TAP_CACHE.get(id(w)) for w in weights]
    assert all(e is not None and e[0]() is w for e, w in zip(entries, weights))
    stats = analyze(graph)
    # the same cache entries: nothing was recomputed
    assert all(ir._TAP_CACHE.get(id(w)) is e for e, w in zip(entries, weights))
    before = [r["q_pred"] for r in stats.rows if r["op"] == "linear"][0]
    model[3].weight.data.mul_(2)  # in place, shared with the graph: the cache must notice
    after = [r["q_pred"] for r in analyze(graph).rows if r["op"] == "linear"][0]
    assert ir._TAP_CACHE.get(id(weights[1])) is not entries[1]
    assert after == pytest.approx(4 * before, rel=1e-4)


@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 3, 3)])
def test_weight_tap_norms_of_huge_float32_weights_do_not_overflow(shape):
    """Float32 blocks whose sum of squares passes float32's range (entries ~1e19: fuzzed
    or diverged models) are summed in float64 instead of becoming inf, without warnings."""
    import warnings

    from graphshape import ir

    w = np.full(shape, 3e19, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        taps = ir.weight_tap_norms(w)
    expected = np.square(w.astype(np.float64)).sum(axis=(0, 1))
    np.testing.assert_allclose(taps, expected, rtol=1e-6)
    assert np.all(np.isfinite(taps)) and taps.shape == shape[2:]
    w[0, 0] = np.inf
    assert not np.all(np.isfinite(ir.weight_tap_norms(w)))
