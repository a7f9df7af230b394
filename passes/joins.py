"""Shaping pass: normalized sums.

Every join of two or more signals that adds them (``add``, ``sub``, ``sum``) becomes a ``sum``
node ``sum_i w_i x_i`` with ``sum_i w_i^2 = 1``, so that it averages the kernels of its
inputs (q and c of the output are ``sum_i w_i^2 q_i`` and ``sum_i w_i^2 c_i``) instead of
adding them up. Joins are found by :func:`graphshape.passes.subnetworks.find_joins` (fork =
immediate dominator; a residual join has one input whose branch holds no activation: an
identity or projection shortcut):

* residual joins: shortcut ``w = shortcut_weight``, branch ``sqrt(1 - w^2)``. ``w = 0``
  removes the skip connection, and the shortcut's own layers (a projection conv) when
  nothing else uses them;
* other joins: equal weights ``1/sqrt(k)`` (sign kept for ``sub``);
* concatenations are left as they are: the analysis weighs them by channel share.
"""

from __future__ import annotations

import math

from graphshape.errors import GraphshapeError
from graphshape.ir import Graph


def normalize_sums(graph: Graph, shortcut_weight: float, *, copy: bool = True) -> tuple[Graph, dict]:
    """Rewrite every additive join into a normalized ``sum`` (see the module docstring).

    Returns ``(new_graph, record)``, ``record = {"removed": [...], "rewritten": [...]}``
    (dicts with ``node``, ``op``, ``what`` and, for rewritten joins, ``weights``). The input
    graph is not modified unless ``copy=False``."""
    from graphshape.passes.subnetworks import find_joins

    w = float(shortcut_weight)
    if not (0.0 <= w <= 1.0) or math.isnan(w):
        raise GraphshapeError(f"shortcut_weight must lie in [0, 1], got {shortcut_weight!r}")
    g = graph.copy() if copy else graph
    removed: list[dict] = []
    rewritten: list[dict] = []
    for join in find_joins(g):
        node = g[join.node]
        if node.op not in ("add", "sub", "sum"):
            continue
        k = len(join.inputs)
        if join.shortcut is not None and w == 0.0:
            branch = join.inputs[1 - join.shortcut]
            g.replace_uses(node.out, branch)
            g.remove(node.name)
            removed.append({"node": node.name, "op": node.op,
                            "what": "skip connection (shortcut_weight = 0): the join now "
                                    f"passes its branch {branch!r} through"})
            continue
        if join.shortcut is not None:
            signal_w = [math.sqrt(1.0 - w * w)] * k
            signal_w[join.shortcut] = w
            kind = f"residual join: shortcut {join.inputs[join.shortcut]!r} weight {w:g}"
        else:
            signal_w = [1.0 / math.sqrt(k)] * k
            kind = f"join of {k} signals: equal weights"
        if node.op == "sub":  # x - y keeps its sign
            signal_w = [sw if slot == 0 else -sw for sw, slot in zip(signal_w, join.slots)]
        weights = [1.0] * len(node.inputs)  # constant operands of a Sum keep weight 1
        for slot, sw in zip(join.slots, signal_w):
            weights[slot] = sw
        old_op = node.op
        node.op = "sum"
        node.attrs = {"weights": tuple(weights)}
        node.meta.setdefault("flags", []).append(f"normalized sum ({kind})")
        rewritten.append({"node": node.name, "op": old_op, "what": f"normalized sum ({kind})",
                          "weights": list(weights)})
    ops = {node.name: node.op for node in g}
    for name in g.remove_dead():
        removed.append({"node": name, "op": ops[name],
                        "what": "unused after removing skip connections"})
    return g, {"removed": removed, "rewritten": rewritten}
