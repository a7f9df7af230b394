"""Scale folding: move the constant scales of a shaped network into its conv/linear weights.

After shaping, two kinds of constant multiplies are left on the signal path:

* TAT's TReLU (and any relu / leaky_relu with slope >= 0 whose transform has no shifts and
  positive scales) computes ``phi_hat(x) = c * phi(x)`` with ``c = input_scale *
  output_scale``, because ``phi(a x) = a phi(x)`` for ``a > 0``;
* a normalized ``sum`` computes ``sum_i w_i x_i``.

:func:`fold_scales` moves ``c`` into the weights of the convs / linears that read the
activation (``W (c x) + b = (c W) x + b``, through ops that commute with a positive scale:
pooling, reshapes, dropout, zero padding...), and ``w_i`` into the conv / linear that
produces ``x_i`` when the sum is its only reader (weight and bias). The network computes the
same function at initialization; the activation becomes a plain ``leaky_relu`` / ``relu``
and the sum ``x + w x'``: fewer elementwise passes over activations. Two ways to move a scale:

* ``mode="weights"`` (shaping's default): the parameters stay as they are and the layer gets
  ``weight_scale`` / ``bias_scale`` attributes: it computes with ``weight_scale * W`` (and
  ``bias_scale * b``), a pass over the weight rather than over the activation. The same
  function, the same parameters and, by the chain rule, the same gradients as without
  folding: training is unchanged, step for step, under any optimizer (up to float
  rounding). The weights are usually smaller than the activations they meet (ResNet-50 at
  8x3x224x224: 25.5M conv/linear weights against 85M values of those layers' inputs per
  forward pass).
* ``mode="parameters"`` (``fold_scales=True``): the stored parameters are multiplied. No
  pass at all, but a different parametrization for training: a folded weight is ``c W``, so
  its gradient is ``1/c`` of the original's and an Adam step moves ``c W`` as much as one
  moved ``W``.

Backends: PyTorch emits a layer with scales as :class:`graphshape.torch_modules.ScaledConv2d`
(and its 1d/3d, transposed and linear siblings); ONNX multiplies the initializers (an
inference graph has no parametrization to keep).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from graphshape.activations import POSITIVELY_HOMOGENEOUS
from graphshape.ir import Graph, Node, Ref
from graphshape.ops import AFFINE_LAYERS

#: ops with op(c x) = c op(x) for c > 0, reading the signal in input 0 (pad: see _commutes)
_COMMUTING = ("avg_pool", "max_pool", "global_avg_pool", "global_max_pool",
              "adaptive_avg_pool", "adaptive_max_pool", "flatten", "reshape", "squeeze",
              "unsqueeze", "transpose", "identity", "dropout", "slice", "split", "pad",
              "resize", "depth_to_space", "space_to_depth")


def homogeneous_scale(node: Node) -> float | None:
    """``c`` when activation ``node`` computes ``c * phi(x)`` with ``phi`` positively
    homogeneous (relu, leaky_relu with slope >= 0) and ``c > 0``: a transform with zero shifts
    and positive input and output scales. None otherwise (no transform, shifts, other phi)."""
    if node.op != "activation" or node.attrs.get("name") not in POSITIVELY_HOMOGENEOUS:
        return None
    slope = float(node.attrs.get("negative_slope", 0.01))
    if node.attrs.get("name") == "leaky_relu" and not slope >= 0:
        return None
    t = node.attrs.get("transform")
    if not t:
        return None
    if float(t.get("input_shift", 0.0)) != 0.0 or float(t.get("output_shift", 0.0)) != 0.0:
        return None
    a, g = float(t.get("input_scale", 1.0)), float(t.get("output_scale", 1.0))
    # both positive: phi(a x) = a phi(x) needs a > 0 (a < 0 with g < 0 gives c > 0 but
    # reflects phi)
    if not (a > 0.0 and g > 0.0 and math.isfinite(a * g)):
        return None
    return a * g


def _commutes(node: Node) -> bool:
    if node.op != "pad":
        return True
    mode = node.attrs.get("mode", "constant")
    return mode != "constant" or float(node.attrs.get("value", 0.0) or 0.0) == 0.0


def _param_counts(g: Graph) -> Counter:
    """id(array) -> number of (node, key) slots holding it: a tied parameter (a weight two
    layers share, a module called twice) is not scaled in place, which would untie it or
    scale the other layer too; the scale goes on the layer (:func:`scale_layer`)."""
    return Counter(id(v) for node in g for v in node.params.values() if isinstance(v, np.ndarray))


def _float_param(node: Node, key: str) -> bool:
    v = node.params.get(key)
    return isinstance(v, np.ndarray) and v.dtype.kind == "f"


def _foldable(node: Node) -> bool:
    """A conv/linear that reads one signal and has a (float) weight and bias."""
    if node.op not in AFFINE_LAYERS or len(node.inputs) != 1:
        return False
    if not _float_param(node, "weight"):
        return False
    return node.params.get("bias") is None or _float_param(node, "bias")


def _linear_readers(g: Graph, ref: Ref) -> list[Node] | None:
    """The conv/linear nodes that read ``ref``, directly or through ops commuting with a
    positive scale; None when any path reaches something else (a sum, an activation, a
    model output, an opaque node, a concat...)."""
    readers: dict[str, Node] = {}
    stack, seen = [Ref(*ref)], set()
    while stack:
        r = stack.pop()
        if r in seen:
            continue
        seen.add(r)
        for user, slot in g.uses(r):
            if slot == 0 and _foldable(user):
                readers[user.name] = user
            elif slot == 0 and user.op in _COMMUTING and _commutes(user):
                stack.extend(Ref(user.name, i) for i in range(len(user.outputs)))
            else:
                return None
    return list(readers.values())


def _scaled(a: np.ndarray, s: float) -> np.ndarray:
    """A new array ``s * a`` in ``a``'s dtype (the input graph keeps its own arrays)."""
    return np.multiply(a, s, dtype=a.dtype)


#: how :func:`fold_scales` may move a scale into a layer
FOLD_MODES = ("weights", "parameters")


def canonical_fold_mode(value) -> str:
    """``fold_scales`` as shaping takes it -> "weights", "parameters" or "none": the mode
    names themselves, True (= "parameters", what ``fold_scales=True`` has always meant) or
    False (= "none")."""
    from graphshape.errors import GraphshapeError

    if value is True:
        return "parameters"
    if value is False or value is None:
        return "none"
    if isinstance(value, str) and value.lower() in FOLD_MODES + ("none",):
        return value.lower()
    raise GraphshapeError(f"fold_scales must be 'weights' (default: the scales computed on the "
                          f"weights, training unchanged), 'parameters' (or True: multiplied "
                          f"into the stored parameters) or 'none' (or False), got {value!r}")


def scale_layer(layer: Node, key: str, scale: float, mode: str, shared: bool = False) -> None:
    """Make ``layer`` compute with ``scale`` times its parameter ``key`` ("weight" or "bias"):
    the ``{key}_scale`` attribute in mode "weights", the stored array in mode "parameters"
    unless other nodes hold that array too (``shared``: it keeps its value, and the scale
    goes on this layer only)."""
    if mode == "weights" or shared:
        total = float(layer.attrs.get(f"{key}_scale", 1.0)) * scale
        layer.attrs[f"{key}_scale"] = total
    else:
        layer.params[key] = _scaled(layer.params[key], scale)


def fold_scales(graph: Graph, *, mode: str = "parameters",
                copy: bool = True) -> tuple[Graph, dict]:
    """Fold activation scales and normalized-sum weights into conv/linear layers (see the
    module docstring for ``mode``). Run it after initialization (the weights are final).

    a. an activation with :func:`homogeneous_scale` ``c`` whose every path reaches only
       foldable conv/linear layers loses its transform (a plain relu / leaky_relu), and those
       layers' weights are scaled by ``c`` (biases are not);
    b. a ``sum`` input ``i`` produced by a foldable conv/linear whose only reader is the sum
       has that layer's weight and bias scaled by ``weights[i]``, and ``weights[i] = 1``.

    Returns ``(new_graph, record)``, ``record = {"removed": [], "rewritten": [...]}`` (dicts
    with ``node``, ``op``, ``what``, ``scale``, ``into``: the layers scaled, and ``mode``).
    The input graph is not modified unless ``copy=False``."""
    if mode not in FOLD_MODES:
        raise ValueError(f"fold mode {mode!r}: expected one of {FOLD_MODES}")
    g = graph.copy() if copy else graph
    counts = _param_counts(g)
    rewritten: list[dict] = []
    for node in g:
        c = homogeneous_scale(node)
        if c is None:
            continue
        readers = _linear_readers(g, node.out)
        if not readers:
            continue
        for layer in readers:
            scale_layer(layer, "weight", c, mode, counts[id(layer.params["weight"])] > 1)
        node.attrs = {k: v for k, v in node.attrs.items() if k != "transform"}
        node.meta.setdefault("flags", []).append(f"scale {c:.6g} folded into the next layers")
        rewritten.append({"node": node.name, "op": "activation",
                          "what": f"scale {c:.6g} folded into the weights of "
                                  f"{', '.join(repr(n.name) for n in readers)}: plain "
                                  f"{node.attrs.get('name')}",
                          "scale": c, "into": [n.name for n in readers], "mode": mode})
    counts = _param_counts(g)  # the arrays replaced above are new
    for node in g:
        weights = node.attrs.get("weights") if node.op == "sum" else None
        if not weights:
            continue
        weights = list(weights)
        into = []
        for slot, ref in enumerate(node.inputs):
            w = float(weights[slot])
            producer = g[ref.node]
            if w in (0.0, 1.0) or not _foldable(producer) or len(producer.outputs) != 1:
                continue
            use = g.sole_use(ref)
            if use is None or (use[0].name, use[1]) != (node.name, slot):
                continue  # another reader needs the unscaled value
            for key in ("weight", "bias"):
                if producer.params.get(key) is not None:
                    scale_layer(producer, key, w, mode, counts[id(producer.params[key])] > 1)
            weights[slot] = 1.0
            into.append((producer.name, w))
        if into:
            node.attrs["weights"] = tuple(weights)
            rewritten.append({"node": node.name, "op": "sum",
                              "what": "weights " + ", ".join(f"{w:.6g} folded into {n!r}"
                                                             for n, w in into),
                              "scale": [w for _, w in into], "into": [n for n, _ in into],
                              "mode": mode})
    return g, {"removed": [], "rewritten": rewritten}
