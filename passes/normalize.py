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
    node: an affine chain, an exported GRN), what read its last node reading ``source``
    instead; records each as ``what(node)``. Returns the constants it read (for
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
    from graphshape.passes.elementwise import _onnx_reduce_l2_axes

    if not l2.inputs or _onnx_reduce_l2_axes(g, l2, g.info(l2.inputs[0]).rank) is None:
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
