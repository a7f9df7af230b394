"""Shaping pass: remove normalization layers.

DKS/TAT networks have no normalization: at initialization the kernel is controlled by the
activation transforms and the orthogonal init instead. This pass removes every
``batch_norm``, ``layer_norm``, ``rms_norm``, ``std_norm``, ``group_norm``, ``instance_norm``
and ``lrn`` node, and with it the affine map that directly follows one (an ``affine`` node,
or ``mul`` then ``add`` by constants as in caffe2-style ONNX files: BatchNormalization, Mul,
Add; per channel, or along a layer / RMS / std norm's normalized trailing dims), and a
``mul`` then ``add`` by per-channel constants right after a conv / linear layer (a frozen
batch norm as it is exported). A normalization-activation layer (timm's EvoNorm, Filter
Response Normalization, and ConvNeXt V2's GlobalResponseNorm, which applies none: an opaque
call whose ``attrs["norm_activation"]`` the frontend wrote) becomes the activation it
applies without its normalization, or the identity. Where the
norm supplied a shift (batch norm's running mean, or a learned bias), the conv / linear layer
feeding it gains a zero-initialized bias, so the shaped model can still learn that shift.
"""

from __future__ import annotations

import numpy as np

from graphshape.errors import GraphshapeError
from graphshape.ir import Graph, Node, Ref, constant_operand
from graphshape.ops import AFFINE_LAYERS

NORM_OPS = ("batch_norm", "layer_norm", "rms_norm", "std_norm", "group_norm", "instance_norm",
            "lrn")


def _out_features(node: Node) -> int | None:
    w = node.params.get("weight")
    if w is None:
        return None
    shape = np.shape(w)
    if node.op == "conv_transpose":
        return int(shape[1]) * int(node.attrs.get("groups", 1) or 1)
    return int(shape[0])


def _is_per_channel(value: np.ndarray, channels: int | None, rank: int | None) -> bool:
    """Whether a constant broadcasts along the channel axis (axis 1) only, or is a scalar."""
    if value.size == 1:
        return True
    if channels is None or value.size != channels:
        return False
    shape = tuple(value.shape)
    # (C,) broadcasts against the last axis: per-channel only for rank-2 (N, C) tensors
    if len(shape) == 1:
        return rank == 2
    # (C, 1, ..., 1) or (1, C, 1, ..., 1) aligned to (N, C, *spatial)
    squeezed = [i for i, d in enumerate(shape) if d != 1]
    if len(squeezed) != 1:
        return False
    axis_from_end = len(shape) - squeezed[0]
    return rank is not None and axis_from_end == rank - 1


def _sole_user(graph: Graph, node: Node) -> Node | None:
    uses = graph.uses(node.out)
    if len(uses) != 1 or graph.is_output(node.out):
        return None
    return uses[0][0]


#: torch functions that normalize (a frontend that does not map them leaves them opaque, as
#: when timm's fused norm-activation modules are traced through to F.batch_norm)
_TORCH_NORM_FUNCTIONS = ("batch_norm", "layer_norm", "group_norm", "instance_norm",
                         "local_response_norm", "rms_norm")


def opaque_norm_input(node: Node):
    """The normalized input (a Ref) of an opaque node that calls a torch normalization
    function (``torch.nn.functional.batch_norm`` and the like), else None."""
    if node.op != "opaque" or node.attrs.get("framework") != "torch":
        return None
    if node.attrs.get("fx_op") != "call_function":
        return None
    target = node.attrs.get("target")
    name = getattr(target, "__name__", None)
    module = getattr(target, "__module__", "") or ""
    if name not in _TORCH_NORM_FUNCTIONS or not module.startswith("torch"):
        return None
    args = node.attrs.get("args") or ()
    first = args[0] if args else (node.attrs.get("kwargs") or {}).get("input")
    from graphshape.ir import Ref

    return first if isinstance(first, Ref) else None


def _cancel_transposes(g: Graph, source: Ref, user: Node, removed: list) -> Ref | None:
    """Drop a transpose pair that the removed norm stood between: ``source`` made by a
    transpose read by nothing else, ``user`` the inverse transpose (a norm over a
    non-trailing axis, read between two transposes: see
    :func:`graphshape.passes.elementwise.fuse_norm_decompositions`). Returns the value
    the pair read, or None where there is no such pair."""
    first = g[source.node]
    if (first.op != "transpose" or user.op != "transpose" or user.inputs != [source]
            or len(g.users(first.name)) != 1 or g.is_output(first.name)):
        return None
    perm, back = tuple(first.attrs.get("perm") or ()), tuple(user.attrs.get("perm") or ())
    if not perm or len(perm) != len(back) or tuple(perm[i] for i in back) != tuple(range(len(perm))):
        return None
    original = first.inputs[0]
    g.replace_uses(user.out, original)
    for node in (user, first):
        g.remove(node.name)
        removed.append({"node": node.name, "op": "transpose",
                        "what": "transpose pair around a removed normalization"})
    return original


#: norms over the trailing dims (``normalized_shape``): their affine acts on those dims
TRAILING_NORMS = ("layer_norm", "rms_norm", "std_norm")


def _fits_trailing(value: np.ndarray, normalized_shape: tuple) -> bool:
    """Whether a constant is a scalar or varies along the trailing ``normalized_shape``
    dims only (a hand-written LayerNorm's ``weight * y + bias``, of any rank)."""
    if value.size == 1:
        return True
    shape, lead = tuple(value.shape), value.ndim - len(normalized_shape)
    return bool(normalized_shape) and lead >= 0 and all(d == 1 for d in shape[:lead]) and all(
        d in (1, n) for d, n in zip(shape[lead:], normalized_shape))


def _norm_affine_fits(norm: Node, channels: int | None, rank: int | None):
    """What a constant of the affine map after ``norm`` may be: along the normalized
    trailing dims for a layer / RMS / std norm (or channels-first, along axis 1, as it is
    for the others and for a norm read between two transposes), or a scalar."""
    if norm.op in TRAILING_NORMS and norm.attrs.get("normalized_shape"):
        shape = tuple(norm.attrs["normalized_shape"])
        return lambda value: _fits_trailing(value, shape)
    return lambda value: _is_per_channel(value, channels, rank)


def _affine_walk(g: Graph, first: Node | None, signal: Ref, fits,
                 constant_of) -> tuple[list[Node], list[str]]:
    """``[mul]``, ``[add]`` or ``[mul, add]`` from ``first`` on, each scaling / shifting the
    value before it (``signal`` for the first) by a constant that ``constant_of(g, ref)``
    reads as ``(value, the nodes that only shape it)`` and ``fits(value)`` accepts (one
    per channel, or a scalar), each read only by the next; with those shaping nodes."""
    chain, shaping = [], []
    node = first
    for op in ("mul", "add"):  # (scale first, then shift; either may be missing)
        if node is None or node.op != op or len(node.inputs) != 2:
            continue
        if signal not in node.inputs:
            break
        found = constant_of(g, node.inputs[1 - node.inputs.index(signal)])
        if found is None or not fits(found[0]):
            break
        chain.append(node)
        shaping += found[1]
        signal, node = node.out, _sole_user(g, node)
    return chain, shaping


def _plain_constant(g: Graph, ref: Ref) -> tuple[np.ndarray, list[str]] | None:
    value = g[ref.node].params.get("value") if g[ref.node].op == "constant" else None
    return None if value is None else (np.asarray(value), [])


def _constant_affine_chain(g: Graph, start: Node, fits) -> list[Node]:
    """The ``mul`` and / or ``add`` by constants that ``fits`` accepts (per channel, or
    scalars) that alone read ``start``'s output, one after the other (scale first, then
    shift)."""
    return _affine_walk(g, _sole_user(g, start), start.out, fits, _plain_constant)[0]


def _affine_after(g: Graph, first: Node, source: Ref) -> tuple[list[Node], list[str]]:
    """``([first], ...)`` (and the ``add`` after it, for a ``mul``) when ``first`` scales or
    shifts ``source`` by a per-channel constant along ``source``'s axis 1 (read through
    reshapes: ``weight[:, None, None]``), with the nodes that only shape those constants;
    else ``([], [])``."""
    info = g.info(source)
    channels = info.shape[1] if info.shape and len(info.shape) >= 2 else None
    if not isinstance(channels, int):
        return [], []
    return _affine_walk(g, first, source,
                        lambda value: _is_per_channel(value, channels, info.rank),
                        _shaped_constant)


#: ops that only give a constant another shape (``weight[:, None, None]``, ``.view``)
_SHAPE_ONLY = ("reshape", "unsqueeze", "squeeze", "identity", "flatten")


def _shaped_constant(g: Graph, ref: Ref) -> tuple[np.ndarray, list[str]] | None:
    """(value as ``ref`` holds it, the reshaping nodes in between) when ``ref`` is a float
    constant, or one given another shape by ops that nothing else reads; else None."""
    shape = g.info(ref).shape
    node, between = g[ref.node], []
    while node.op in _SHAPE_ONLY and len(node.inputs) == 1 and len(g.users(node.name)) == 1:
        between.append(node.name)
        node = g[node.inputs[0].node]
    value = node.params.get("value") if node.op == "constant" else None
    if value is None or np.asarray(value).dtype.kind != "f":
        return None
    value = np.asarray(value)
    if between:
        if shape is None or not all(isinstance(d, int) for d in shape) \
                or int(np.prod(shape)) != value.size:
            return None
        value = value.reshape(shape)
    return value, between


def _remove_chain(g: Graph, chain: list[Node], source: Ref, removed: list, what) -> set[str]:
    """Remove ``chain`` (in topological order, read only by each other but for its last
    node: an affine chain, an exported GRN or EvoNorm), what read its last node reading
    ``source`` instead; records each as ``what(node)``. Returns the constants it read (for
    :meth:`Graph.remove_unread`, once nothing else does)."""
    g.replace_uses(chain[-1].out, source)
    constants = {r.node for node in chain for r in node.inputs if g[r.node].op == "constant"}
    for node in reversed(chain):
        g.remove(node.name)
        removed.append({"node": node.name, "op": node.op, "what": what(node)})
    return constants


def _give_zero_bias(layer: Node, shift_of: str, rewritten: list) -> None:
    """A zero bias for conv / linear ``layer`` (in place, recorded) where it has a weight and
    no bias: it takes over the shift of ``shift_of``, which shaping removed."""
    if (layer.op in AFFINE_LAYERS and layer.params.get("bias") is None
            and layer.params.get("weight") is not None):
        layer.params["bias"] = np.zeros(_out_features(layer),
                                        dtype=np.asarray(layer.params["weight"]).dtype)
        rewritten.append({"node": layer.name, "op": layer.op,
                          "what": f"gained a zero bias (replacing the shift of {shift_of})"})


def _exported_frozen_norm(g: Graph, layer: Node) -> list[Node] | None:
    """``[mul, add]`` when the output of conv / linear ``layer`` is read only by a ``mul`` by
    a per-channel constant, whose output is read only by an ``add`` of one: a frozen batch
    norm (torchvision's ``FrozenBatchNorm2d``) as ``torch.onnx.export`` writes it, or one
    folded into constants (caffe-style ``Scale`` after a conv). Its values come from the
    trained weights that shaping replaces, and kept they scale every channel of the shaped
    network (a pretrained ResNet's: q ~ 1e4 at the output). A scale alone (a layer scale)
    or a scalar is not matched."""
    channels = _out_features(layer)
    rank = layer.outputs[0].rank if layer.outputs else None
    if channels is None or channels < 2:
        return None
    chain = _constant_affine_chain(g, layer, lambda v: _is_per_channel(v, channels, rank))
    if [n.op for n in chain] != ["mul", "add"] or any(
            constant_operand(g, n)[1].size != channels for n in chain):
        return None
    return chain


def _exported_response_norm(g: Graph, l2: Node) -> tuple[Ref, list[Node]] | None:
    """``(x, nodes)`` when ``l2`` is the ``ReduceL2`` of a Global Response Normalization as
    ``torch.onnx.export`` writes ConvNeXt V2's: ``x + (gamma * (x * N) + beta)`` with ``N =
    ||x|| / (mean(||x||) + eps)``, the norm over the spatial axes and its mean over the
    channels; ``nodes`` are the layer's, from ``l2`` to the final add (the torch frontend
    reads the module itself: see ``norm_activation_remainder``)."""
    from graphshape.passes.elementwise import onnx_reduce_l2_axes

    if not l2.inputs or onnx_reduce_l2_axes(g, l2, g.info(l2.inputs[0]).rank) is None:
        return None
    x = l2.inputs[0]
    readers = {u.op: u for u in g.users(l2.name)}
    mean, div = readers.get("reduce"), readers.get("div")
    if len(g.users(l2.name)) != 2 or mean is None or div is None or div.inputs[0] != l2.out \
            or mean.attrs.get("kind") != "mean":
        return None
    eps = _sole_user(g, mean)
    if eps is None or eps.op != "add" or _sole_user(g, eps) is not div \
            or constant_operand(g, eps) is None:
        return None
    product = _sole_user(g, div)
    if product is None or product.op != "mul" or set(product.inputs) != {x, div.out}:
        return None
    chain, node = [], _sole_user(g, product)  # gamma *, (addcmul's value) *, beta +
    while node is not None and node.op in ("mul", "add") and constant_operand(g, node) is not None:
        chain.append(node)
        node = _sole_user(g, node)
    last = chain[-1] if chain else product
    if node is None or node.op != "add" or set(node.inputs) != {x, last.out}:
        return None
    return x, [l2, mean, eps, div, product, *chain, node]


#: what a group statistic of x may be made of as exported (timm's ``group_std`` /
#: ``group_rms``: Reshape, Cast, ReduceMean, Sub, Mul, Add, Sqrt, Expand, Reshape; opaque
#: nodes are evaluated by onnx.reference)
_STATISTIC_OPS = ("reshape", "cast", "identity", "reduce", "add", "sub", "mul", "div",
                  "activation", "opaque", "slice", "squeeze", "unsqueeze", "concat")
# (with a dynamic batch, the exporter computes the reshapes' and the expand's shapes from
# the input's: Shape, Gather, Unsqueeze, Concat, Equal, Where, about 40 nodes)
_STATISTIC_NODES = 64
# the most entries of x a statistic is evaluated on (float64 data and a few intermediates:
# ~1 GB); resnetv2_50d_evos's largest, at 224 px and batch 1: 0.4M
_STATISTIC_DATA = 1 << 25


def _group_statistics(data: np.ndarray, eps: float):
    """``(groups, kind, value)`` for every way to split ``data``'s axis 1 into groups:
    the per-(example, group) standard deviation (biased, eps added to the variance) or root
    mean square over the group's channels and the spatial axes, per (example, channel)
    (timm's ``group_std`` and ``group_rms``, which broadcast it over the spatial axes)."""
    n, channels = data.shape[:2]
    flat = data.reshape(n, channels, -1)
    # (per-channel sums once: each split only adds them up)
    sums, squares = flat.sum(axis=2), np.square(flat).sum(axis=2)
    for groups in [d for d in range(1, channels + 1) if channels % d == 0]:
        count = flat.shape[2] * (channels // groups)
        mean = sums.reshape(n, groups, -1).sum(axis=2) / count
        mean_square = squares.reshape(n, groups, -1).sum(axis=2) / count
        for kind, moment in (("std", mean_square - mean * mean), ("rms", mean_square)):
            yield groups, kind, np.repeat(np.sqrt(moment + eps), channels // groups, axis=1)


def _statistic_region(g: Graph, x: Ref, out: Ref) -> list[Node] | None:
    """The nodes from ``x`` to ``out`` (inputs before the nodes reading them) when ``out`` is
    computed from ``x`` alone, and constants, by the ops of :data:`_STATISTIC_OPS`, and
    nothing outside reads any of them but ``out``'s own reader; else None."""
    order: list[Node] = []  # (depth-first post-order: every node after its inputs)
    seen: set[str] = set()
    stack: list[tuple[Ref, bool]] = [(out, False)]
    while stack:
        ref, inputs_done = stack.pop()
        node = g[ref.node]
        if inputs_done:
            order.append(node)
            continue
        if ref == x or node.name in seen or node.op == "constant":
            continue
        if node.op not in _STATISTIC_OPS or len(node.outputs) != 1 or node.params \
                or len(seen) >= _STATISTIC_NODES:
            return None
        seen.add(node.name)
        stack.append((ref, True))
        stack.extend((r, False) for r in node.inputs)
    if not order or not any(r == x for n in order for r in n.inputs):
        return None
    for node in order:  # (successors unsorted: users() would rank the changing graph)
        if node.out != out and (g.is_output(node.out)
                                or any(u not in seen for u in g.nx.successors(node.name))):
            return None
    return order


def _onnx_node_value(g: Graph, node: Node, args: list) -> np.ndarray:
    """An opaque ONNX node's output for ``args`` (its inputs in order), by onnx.reference."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    # (input_positions: per ONNX input position, the index in node.inputs, None if absent)
    positions = tuple(node.attrs.get("input_positions") or range(len(args)))
    names = [f"in{index}" if index is not None else "" for index in positions]
    feeds = {f"in{index}": args[index] for index in positions if index is not None}
    proto = onnx.helper.make_node(node.attrs["op_type"], names, ["out"])
    proto.attribute.extend((node.attrs.get("attributes") or {}).values())
    opset = node.attrs.get("source_opset") or g.meta.get("opset") or 17
    evaluator = ReferenceEvaluator(proto, opsets={"": int(opset)})
    return np.asarray(evaluator.run(None, feeds)[0])


def _node_value(g: Graph, node: Node, args: list) -> np.ndarray:
    """``node``'s output for ``args`` (its inputs' values) in a statistic region: the
    elementwise, reduction, shape and data-movement ops an exporter writes there, an
    opaque ONNX node by onnx.reference; anything else raises."""
    from graphshape.passes.elementwise import pointwise_value

    a, op = node.attrs, node.op
    if op != "activation" or not node.params:
        found = pointwise_value(node, args)  # (arithmetic, identity / cast, an activation)
        if found is not None:
            return found
    if op == "reduce" and a.get("kind") == "mean":
        return np.mean(args[0], axis=tuple(a["axes"]), keepdims=bool(a.get("keepdims", True)))
    if op == "reshape":  # (a traced one's shape may be values of the graph: its static one)
        shape = list(a.get("static_shape") or a["shape"])
        for i in a.get("copy_dims", ()):
            shape[i] = args[0].shape[i]
        return np.reshape(args[0], shape)
    if op == "slice":
        index = [slice(None)] * np.ndim(args[0])
        for axis, begin, stop, step in zip(a["axes"], a["starts"], a["ends"],
                                           a.get("steps") or [1] * len(a["axes"])):
            index[axis] = slice(begin, stop, step)
        return args[0][tuple(index)]
    if op == "squeeze":
        return np.squeeze(args[0], axis=tuple(a["axes"]))
    if op == "unsqueeze":
        return np.expand_dims(args[0], tuple(a["axes"]))
    if op == "concat":
        return np.concatenate(args, axis=a["axis"])
    if op == "opaque" and a.get("framework") == "onnx" and a.get("domain") in ("", "ai.onnx"):
        return _onnx_node_value(g, node, args)
    if op == "opaque" and a.get("framework") == "torch":
        return _torch_node_value(node, dict(zip(node.inputs, args)))
    raise ValueError(f"{op} is not evaluated in a statistic region")


def _torch_node_value(node: Node, values: dict):
    """A traced call's output (``x.shape``, ``x.var(...)``, ``x.expand(shape)``) with its
    signal arguments from ``values`` (arrays in float64, other values -- a torch.Size, an
    int -- as they are, which reshapes and expands need)."""
    import torch

    from graphshape.passes.elementwise import call_traced

    def leaf(ref):
        value = values[ref]
        return torch.from_numpy(np.asarray(value, dtype=np.float64)) \
            if isinstance(value, np.ndarray) else value

    out = call_traced(node, leaf)
    return out.numpy() if isinstance(out, torch.Tensor) else out


def _region_data(g: Graph, x: Ref, region: list[Node], data: np.ndarray) -> np.ndarray | None:
    """The value of ``region``'s last node with ``data`` for ``x`` (:func:`_node_value`,
    constants read from their nodes), or None where a node does not evaluate."""
    values: dict[Ref, np.ndarray] = {x: data}

    def value(ref):
        if ref in values:
            return values[ref]
        return np.asarray(g[ref.node].params["value"])  # (a constant: see _statistic_region)

    try:
        with np.errstate(all="ignore"):
            for node in region:
                out = _node_value(g, node, [value(r) for r in node.inputs])
                # (a traced shape, or an item of it, stays a torch.Size or an int)
                values[node.out] = out if node.dtype == "object" else np.asarray(out)
    except Exception:  # noqa: BLE001 - an op that does not evaluate: no match
        return None
    return values[region[-1].out]


def _exported_evo_norm(g: Graph, div: Node) -> dict | None:
    """An EvoNorm S layer (timm's ``EvoNorm2dS0`` / ``S1`` / ``S2``) as ``torch.onnx.export``
    writes it, found from its division ``div``: ``x * sigmoid(v * x)`` (S0: SiLU at v's
    init of 1) or ``act(x)`` (S1, S2: the importer's activation) divided by a standard
    deviation or root mean square of ``x`` over groups of channels and the spatial axes
    (checked on random data, every split into groups and every small constant as eps), and
    the per-channel ``* weight + bias`` after it. Returns ``{"x", "numerator", "gate", "v",
    "statistic", "div", "affine", "shaping", "formula"}`` (the numerator: the ``mul`` by
    ``x``, with the ``mul`` by ``v`` and the ``sigmoid`` before it as ``gate``, or the
    activation; ``v``: its value, None without a gate; ``shaping``: the nodes that only
    reshape v, weight and bias), or None.
    The torch frontend reads timm's modules themselves (``norm_activation_remainder``); the
    same layer written by hand is found in its trace here."""
    if div.op != "div" or len(div.inputs) != 2:
        return None
    numerator = g[div.inputs[0].node]
    shaping: list[str] = []  # nodes that only reshape v, weight or bias (traced: .view)
    v_value = None
    if numerator.op == "activation" and len(numerator.inputs) == 1 and not numerator.params:
        x, gate_nodes, formula = numerator.inputs[0], [], "act(x) / group_std(x) * weight + bias"
    elif numerator.op == "mul" and len(numerator.inputs) == 2:
        gate_nodes = []
        for x, gate in (numerator.inputs, numerator.inputs[::-1]):
            sigmoid = g[gate.node]
            if sigmoid.op != "activation" or sigmoid.attrs.get("name") != "sigmoid" \
                    or sigmoid.params or _sole_user(g, sigmoid) is not numerator:
                continue
            scaled = g[sigmoid.inputs[0].node]
            if scaled.op == "mul" and len(scaled.inputs) == 2 and x in scaled.inputs \
                    and _sole_user(g, scaled) is sigmoid:
                v = _shaped_constant(g, scaled.inputs[1 - scaled.inputs.index(x)])
                if v is not None:  # (v, or v.view(1, -1, 1, 1) as traced)
                    gate_nodes, shaping, v_value = [scaled, sigmoid], list(v[1]), v[0]
                    break
        if not gate_nodes:
            return None
        formula = "x * sigmoid(v * x) / group_std(x) * weight + bias"
    else:
        return None
    info = g.info(x)
    if info.rank is None or info.rank < 3 or _sole_user(g, numerator) is not div \
            or not isinstance(info.shape[1], int) or g.is_output(div.out):
        return None
    statistic = _statistic_region(g, x, div.inputs[1])
    if statistic is None or _sole_user(g, statistic[-1]) is not div:
        return None
    concrete = tuple(d if isinstance(d, int) and d > 0 else 2 for d in info.shape)
    if int(np.prod(concrete)) > _STATISTIC_DATA:
        return None  # (not evaluated: left as it is, refused as a gate or product)
    data = np.random.default_rng(0).standard_normal(concrete) * 2.0 + 0.5
    found = _region_data(g, x, statistic, data)
    if found is None or found.shape != data.shape:
        return None
    found = found.reshape(data.shape[0], data.shape[1], -1)
    if not np.allclose(found, found[..., :1], rtol=1e-12, atol=0.0):
        return None  # (not one value per example and channel)
    found = found[..., 0]
    constants = [found_constant[1] for n in statistic
                 if (found_constant := constant_operand(g, n)) is not None]
    eps_values = {float(np.reshape(c, -1)[0]) for c in constants
                  if np.size(c) == 1 and np.asarray(c).dtype.kind == "f"
                  and 0 < float(np.reshape(c, -1)[0]) < 1}
    matched = next((kind for eps in sorted(eps_values)
                    for _groups, kind, value in _group_statistics(data, eps)
                    if np.allclose(found, value, rtol=1e-6, atol=1e-9)), None)
    if matched is None:
        return None
    if matched == "rms":
        formula = formula.replace("group_std", "group_rms")
    channels = info.shape[1]
    affine, affine_shaping = _affine_walk(
        g, _sole_user(g, div), div.out,
        lambda value: _is_per_channel(value, channels, info.rank), _shaped_constant)
    return {"x": x, "numerator": numerator, "gate": gate_nodes, "v": v_value,
            "statistic": statistic, "div": div, "affine": affine, "shaping": shaping + affine_shaping,
            "formula": formula}


def norm_activation_refusal(node: Node) -> GraphshapeError | None:
    """The error for a normalization-activation layer whose normalization cannot be removed
    (EvoNorm B0: see the frontend's ``norm_activation_remainder``), else None."""
    remainder = node.attrs.get("norm_activation") if node.op == "opaque" else None
    if not remainder or "refused" not in remainder:
        return None
    layer = remainder["layer"].rsplit(".", 1)[-1]
    return GraphshapeError(
        f"{layer} is a normalization-activation layer, {remainder['formula']}: "
        f"{remainder['refused']}. Replace these layers by a norm and an activation module "
        "(timm: norm_layer=BatchNormAct2d, or the model's BatchNorm variant) before shaping",
        node=node.name, op=node.op)


def _remove_from_norm_activation(g: Graph, node: Node, removed: list, rewritten: list) -> None:
    """Put what remains of a normalization-activation layer without its normalization in
    the place of opaque ``node`` (its ``attrs["norm_activation"]``, from the frontend's
    ``norm_activation_remainder``): an activation node of the same name, or nothing."""
    refusal = norm_activation_refusal(node)
    if refusal is not None:
        raise refusal
    remainder = node.attrs["norm_activation"]
    layer = remainder["layer"].rsplit(".", 1)[-1]
    args = node.attrs.get("args") or ()
    source = args[0] if args and isinstance(args[0], Ref) else node.inputs[0]
    activation = remainder["activation"]
    if activation is None:
        g.replace_uses(node.out, source)
        g.remove(node.name)
        removed.append({"node": node.name, "op": node.op,
                        "what": f"normalization ({layer}: {remainder['formula']}; it applies "
                                "no activation)"})
    else:
        g.set_inputs(node.name, [source])
        node.op, node.attrs, node.params = "activation", dict(activation), {}
        node.meta["flags"] = [f for f in node.meta.get("flags", []) if f != "opaque"]
        # (reported as removed, as a BatchNormAct2d's norm is: the node stays, as the
        # activation the layer applied)
        removed.append({"node": node.name, "op": "opaque",
                        "what": f"normalization of {layer} ({remainder['formula']}): its "
                                f"{activation['name']} activation remains, as this node"})
    _give_zero_bias(g[source.node], repr(node.name), rewritten)


def _remove_exported_evo_norm(g: Graph, found: dict, removed: list, rewritten: list) -> None:
    """Put what an EvoNorm S layer written out (:func:`_exported_evo_norm`) applies without
    its normalization in its place, as the torch frontend's ``norm_activation_remainder``
    does with the module: S0's ``x * sigmoid(v * x)`` becomes a SiLU node (the ``mul``'s
    name; v starts at 1 and shaping re-initializes, so it goes with the statistics), S1's
    and S2's activation stays; the statistic, the division and the affine are removed."""
    x, numerator, gate = found["x"], found["numerator"], found["gate"]
    if gate:  # (then nothing reads the gate: it goes with the rest)
        g.set_inputs(numerator.name, [x])
        numerator.op, numerator.attrs = "activation", {"name": "silu"}
    what = f"EvoNorm S ({found['formula']}, written out): removed with its normalization"
    constants = _remove_chain(g, [*gate, *found["statistic"], found["div"], *found["affine"]],
                              numerator.out, removed, lambda n: what)
    # (with the nodes that only reshaped v, weight and bias)
    g.remove_unread(constants | set(found["shaping"]), upstream=True)
    # (reported as removed, as a module's normalization is: the node stays, as the
    # activation the layer applied)
    removed.append({"node": numerator.name, "op": "mul" if gate else "activation",
                    "what": f"normalization of an EvoNorm S layer ({found['formula']}, "
                            f"written out): its {numerator.attrs['name']} activation remains, "
                            "as this node"})
    _give_zero_bias(g[x.node], repr(numerator.name), rewritten)


def remove_normalization(graph: Graph, *, copy: bool = True) -> tuple[Graph, dict]:
    """Remove normalization nodes (and a per-channel affine right after each).

    Returns ``(new_graph, record)`` with ``record = {"removed": [...], "rewritten": [...]}``;
    each entry is a dict with ``node``, ``op`` and ``what``. The input graph is not modified
    unless ``copy=False``.
    """
    g = graph.copy() if copy else graph
    removed: list[dict] = []
    rewritten: list[dict] = []
    for name in [n.name for n in g if n.op in NORM_OPS]:
        norm = g[name]
        if not norm.inputs:
            raise GraphshapeError("normalization node without an input", node=name, op=norm.op)
        channels = None
        rank = norm.outputs[0].rank if norm.outputs else None
        if norm.shape is not None and len(norm.shape) >= 2 and isinstance(norm.shape[1], int):
            channels = norm.shape[1]
        supplies_shift = norm.op == "batch_norm" or norm.params.get("bias") is not None
        # the per-channel affine chain right after the norm: affine, or mul and/or add by
        # constants (scale first, then shift)
        user = _sole_user(g, norm)
        if user is not None and user.op == "affine" and user.inputs[0] == norm.out:
            chain = [user]
            supplies_shift |= user.params.get("shift") is not None
        else:
            chain = _constant_affine_chain(g, norm, _norm_affine_fits(norm, channels, rank))
            supplies_shift |= any(node.op == "add" for node in chain)
        # consumers of the chain's last node now read the norm's input
        source = norm.inputs[0]
        last = _sole_user(g, chain[-1] if chain else norm)
        affine_after = f"per-channel affine after {norm.name!r}"
        constants = _remove_chain(g, [norm, *chain], source, removed,
                                  lambda n: "normalization" if n is norm else affine_after)
        if last is not None:  # (the norm's input was one of a pair: what that read)
            after = None if chain else _sole_user(g, last)
            cancelled = _cancel_transposes(g, source, last, removed)
            if cancelled is not None:
                source = cancelled
                # the affine after the transpose back, in the channels-first layout
                # (ConvNeXt's hand-written LayerNorm, timm's RmsNorm2d: weight[:, None, None])
                moved, shaping = _affine_after(g, after, source) if after else ([], [])
                if moved:
                    supplies_shift |= any(node.op == "add" for node in moved)
                    constants |= _remove_chain(g, moved, source, removed,
                                               lambda n: affine_after)
                    constants |= set(shaping)  # (their constants go with them: upstream)
        # the affine's constants (and what only shaped them), if nothing else reads them
        g.remove_unread(constants, upstream=True)
        if supplies_shift:
            _give_zero_bias(g[source.node], repr(norm.name), rewritten)
    # a frozen batch norm as an exporter writes it: x * scale + shift by per-channel
    # constants right after a layer (see _exported_frozen_norm)
    for layer in [n for n in g if n.op in AFFINE_LAYERS]:
        chain = _exported_frozen_norm(g, layer)
        if chain is None:
            continue
        constants = _remove_chain(
            g, chain, layer.out, removed,
            lambda n: f"per-channel affine after {layer.name!r} (a frozen batch norm's x * "
                      "scale + shift by constants)")
        g.remove_unread(constants)
        _give_zero_bias(layer, "the per-channel affine after it", rewritten)
    for node in [n for n in g if n.op == "opaque" and n.attrs.get("norm_activation")]:
        _remove_from_norm_activation(g, node, removed, rewritten)
    # EvoNorm S layers as exported, or written by hand (timm's modules: just above)
    for div in [n for n in g if n.op == "div"]:
        found = _exported_evo_norm(g, div) if div.name in g else None
        if found is not None:
            _remove_exported_evo_norm(g, found, removed, rewritten)
    # ConvNeXt V2's GlobalResponseNorm as exported (its module is removed just above)
    for l2 in [n for n in g if n.op == "opaque" and n.attrs.get("op_type") == "ReduceL2"]:
        found = _exported_response_norm(g, l2) if l2.name in g else None
        if found is None:
            continue
        source, nodes = found
        constants = _remove_chain(
            g, nodes, source, removed,
            lambda n: "Global Response Normalization (x + gamma * (x * N(x)) + beta, as "
                      "exported): removed with it")
        g.remove_unread(constants)
    # normalization calls a frontend left opaque (F.batch_norm inside timm's BatchNormAct2d)
    opaque_norms = [n.name for n in g if opaque_norm_input(n) is not None]
    for name in opaque_norms:
        node = g[name]
        source = opaque_norm_input(node)
        g.replace_uses(node.out, source)
        g.remove(name)
        removed.append({"node": name, "op": "opaque",
                        "what": f"normalization ({node.attrs.get('description', 'opaque')})"})
        _give_zero_bias(g[source.node], repr(name), rewritten)
    if opaque_norms:
        # their statistics, shape checks and asserts are now dead code
        ops = {node.name: node.op for node in g}
        for name in g.remove_dead():
            removed.append({"node": name, "op": ops[name],
                            "what": "unused after removing normalization"})
    # weight standardization (timm's StdConv2d / ScaledStdConv2d), spectral and weight
    # normalization (torch.nn.utils' hooks and parametrizations), loaded as a layer holding
    # the weight they compute: the layer becomes a plain one
    for node in g:
        found = node.meta.pop("weight_normalization", None)
        if found is not None:
            kind, source = found
            rewritten.append({"node": node.name, "op": node.op,
                              "what": f"{kind} removed (was a {source})"})
    return g, {"removed": removed, "rewritten": rewritten}


def merge_duplicate_activations(graph: Graph, *, copy: bool = True) -> tuple[Graph, dict]:
    """Merge activation nodes that read the same value with the same attributes: they
    compute the same output, always (shaping gives every activation of a name the same
    transform). Activations with parameters (a PReLU's slopes, which train apart) are
    left alone.

    Removing normalization exposes them: DPN's dual-path blocks normalize one input twice
    (``bn_a(x)``, ``bn_b(x)``, each followed by a ReLU); once the norms are gone both ReLUs
    read ``x``. torch's dynamo ONNX exporter already merges them in an untrained model (whose
    norms are identical), which moved the fork of the block's joins and gave dpn68 another
    maximizing function (TAT slope 0.329 from that export, 0.3175 from PyTorch). Merged,
    every path sees one activation, and the shaped network computes it once.

    Returns ``(new_graph, record)``, ``record["removed"]`` naming each merged node and the
    node it was merged into; the input graph is not modified unless ``copy=False``."""
    import json

    g = graph.copy() if copy else graph
    removed: list[dict] = []
    seen: dict[tuple, str] = {}
    for name in g.topo_order():
        node = g[name]
        if node.op != "activation" or len(node.inputs) != 1 or node.params:
            continue
        key = (node.inputs[0], json.dumps(node.attrs, sort_keys=True, default=repr))
        kept = seen.setdefault(key, name)
        if kept == name:
            continue
        g.replace_uses(node.out, g[kept].out)
        g.remove(name)
        removed.append({"node": name, "op": node.op,
                        "what": f"duplicate of {kept!r} (same input and attributes), merged"})
    return g, {"removed": removed, "rewritten": []}
