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
