"""Shaping passes on joins: layer scales, normalized sums, and pre-activation shortcuts.

Every join of two or more signals that adds them (``add``, ``sub``, ``sum``) becomes a ``sum``
node ``sum_i w_i x_i`` with ``sum_i w_i^2 = 1``, so that it averages the kernels of its
inputs (q and c of the output are ``sum_i w_i^2 q_i`` and ``sum_i w_i^2 c_i``) instead of
adding them up. Joins are found by :func:`graphshape.passes.subnetworks.find_joins` (fork =
immediate dominator; a residual join has one input whose branch holds no nonlinear layer, an
identity or projection shortcut, and inputs of its output's shape):

* residual joins: shortcut ``w = shortcut_weight``, branch ``sqrt(1 - w^2)``. ``w = 0``
  removes the skip connection, and the shortcut's own layers (a projection conv) when
  nothing else uses them;
* other joins: equal weights ``1/sqrt(k)`` (sign kept for ``sub``);
* concatenations are left as they are: the analysis weighs them by channel share.

:func:`reset_branch_scales` runs first: a constant scale that ends a residual branch (a
layer scale, ``x + gamma * f(x)``) is set to 1, since the normalized sum assumes the branch
carries q ~ 1; so is a layer scale far from 1 right after a layer on a path with no
shortcut around it (nothing else would bring q back once the norms are gone).
:func:`move_shortcuts_to_preactivation` then lets V1 blocks' identity shortcuts read the
residual stream rather than the activation after it (TAT's default; see its docstring).
"""

from __future__ import annotations

import math

import numpy as np

from graphshape.errors import GraphshapeError
from graphshape.ir import Graph, Node, TensorInfo, constant_operand


def normalize_sums(graph: Graph, shortcut_weight: float, *, copy: bool = True) -> tuple[Graph, dict]:
    """Rewrite every additive join into a normalized ``sum`` (see the module docstring).

    Returns ``(new_graph, record)``, ``record = {"removed": [...], "rewritten": [...]}``
    (dicts with ``node``, ``op``, ``what`` and, for rewritten joins, ``weights``). The input
    graph is not modified unless ``copy=False``."""
    from graphshape.passes.subnetworks import attention_logits, find_joins

    w = float(shortcut_weight)
    if not (0.0 <= w <= 1.0) or math.isnan(w):
        raise GraphshapeError(f"shortcut_weight must lie in [0, 1], got {shortcut_weight!r}")
    g = graph.copy() if copy else graph
    removed: list[dict] = []
    rewritten: list[dict] = []
    linear_mixes: list[str] = []
    correlated: list[str] = []
    logits = attention_logits(g, only=True)
    for join in find_joins(g):
        node = g[join.node]
        if node.op not in ("add", "sub", "sum"):
            continue
        if join.linear_mix:
            # w_i^2-weighted kernels hold for uncorrelated inputs only: pool(x) - x (PoolFormer,
            # EfficientFormer), mixer(x) - norm(x) (FastViT's RepMixer), weighted as if
            # uncorrelated, cancelled most of the signal (FastViT-T8, DKS: q 0.018 and c 0.994
            # measured at its last residual join). The model's own weights are kept.
            linear_mixes.append(join.node)
            continue
        if join.correlated and join.node not in logits:
            # (a sum of attention logits, q kᵀ + rel_pos(q), feeds a softmax, whose weights
            # average the values whatever the logits' kernel: nothing to say there)
            correlated.append(join.node)
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
    warnings = []
    if linear_mixes:
        warnings.append(
            f"{len(linear_mixes)} sum(s) of correlated signals ({_some(linear_mixes)}) left as "
            "they are: their inputs are computed from the same value with no nonlinearity and "
            "no conv/linear layer between (as PoolFormer's pool(x) - x), a linear filter of one "
            "signal, to which a normalized sum's weights (they assume uncorrelated inputs) do "
            "not apply")
    if correlated:
        warnings.append(
            f"{len(correlated)} sum(s) ({_some(correlated)}) join a nonlinear branch with a "
            "value correlated with their other input (both computed from one value with no "
            "conv/linear layer between): normalized as if uncorrelated, so q and c there are "
            "approximate (the analysis flags them)")
    return g, {"removed": removed, "rewritten": rewritten, "warnings": warnings}


#: ops a layer scale may pass through between its mul and the residual join (or, for its
#: parameter, between the parameter and the mul)
_BRANCH_PASS = ("dropout", "identity", "reshape", "transpose", "flatten", "squeeze",
                "unsqueeze")


def reset_branch_scales(graph: Graph, *, copy: bool = True) -> tuple[Graph, dict]:
    """Set to 1 the constant scale that ends a residual branch: LayerScale (ConvNeXt,
    CaiT, XCiT, PoolFormer...: ``x + gamma * f(x)`` with ``gamma`` initialized to 1e-6..0.1)
    and ReZero-style scalars. A normalized sum ``w x + sqrt(1 - w²) f(x)`` assumes the branch
    carries q ~ 1; with gamma = 1e-6 it carries ~0, and the residual stream's q shrinks by w²
    per block (torchvision convnext_tiny, shaped with its layer scales: q 0.25 after the
    first block, 0.0000 at mid-depth). The parameter stays (trainable, same shape and
    dtype); only its initial value changes. A scale that only branch ends read (tied, or
    stored once by an exporter) is reset once and stays one tensor. One that another node
    also reads is left alone from PyTorch (a tensor read twice is one parameter); in an ONNX
    graph, where an exporter may have stored equal values once, each branch end gets a
    constant of ones of its own and the other readers keep the original.

    Returns ``(new_graph, record)`` (``rewritten``: one entry per reset scale); the input
    graph is not modified unless ``copy=False``."""
    from graphshape.passes.subnetworks import find_joins, signal_nodes

    g = graph.copy() if copy else graph
    rewritten: list[dict] = []
    signals = signal_nodes(g)  # resetting a constant's value does not change which are signals
    # (join, constant, mul, the reshapes between) in the order found
    scales: list[tuple[str, Node, str, list[str]]] = []
    readers: dict[str, set[str]] = {}  # constant -> the scale muls and reshapes reading it
    for join in find_joins(g):
        if (g[join.node].op not in ("add", "sub", "sum") or len(join.inputs) != 2
                or join.linear_mix):  # (left as it is by normalize_sums: so is its scale)
            continue
        shortcut = join.shortcut
        if shortcut is None:
            # a branch without a nonlinearity (ResMLP's token mixing: x + ls * W x^T) has
            # no "shortcut" for the maximizing function, but the empty path is the skip
            empty = [i for i, branch in enumerate(join.branches) if not branch]
            if len(empty) != 1:
                continue
            shortcut = empty[0]
        node = g[join.inputs[1 - shortcut].node]
        # every scale in a row at the branch's end: NF-Nets' out * skipinit_gain * alpha
        # (skipinit 0: with alpha reset alone, dm_nfnet's branches stayed zero)
        while True:
            while node.op in _BRANCH_PASS and len(node.inputs) >= 1:
                node = g[node.inputs[0].node]
            if node.op != "mul" or len(node.inputs) != 2:
                break
            held = _scale_constant(g, node, signals)
            if held is None:
                break
            const, chain = held
            scales.append((join.node, const, node.name, chain))
            readers.setdefault(const.name, set()).update([node.name, *chain])
            node = g[next(r.node for r in node.inputs if r.node in signals)]
    done = set()
    for join_node, const, mul, chain in scales:
        # a constant only scales that end residual branches read (one layer scale, or the
        # equal ones an exporter stored once: torch.onnx's dynamo exporter writes ConvNeXt's
        # 1e-6 scales of one width as one initializer) is reset, once
        if const.name in done:
            continue
        value = const.params["value"]
        what = (f"branch scale before join {join_node!r} set to 1 (was "
                f"{float(np.abs(value).mean()):.3g} on average: a layer scale)")
        if all(user.name in readers[const.name]
               for name in readers[const.name] | {const.name} if g[name].op != "mul"
               for user in g.users(name)):
            done.add(const.name)
            const.params["value"] = np.ones_like(value)
            rewritten.append({"node": const.name, "op": "constant", "what": what})
        elif g.meta.get("source") == "onnx" and not chain and len(g.users(const.name)) > 1:
            # an ONNX initializer that other nodes read too: the file cannot say whether
            # the source tied them or the exporter stored equal values once (the dynamo
            # exporter does: CaiT's 1e-5 layer scales and its class-attention blocks' are
            # one initializer), so this scale gets a constant of its own, of ones. (From
            # PyTorch a tensor read twice is one parameter: left alone.)
            ones = g.add(Node(g.unique_name(f"{const.name}_{mul}"), "constant", [],
                              {"trainable": const.attrs.get("trainable", False)},
                              {"value": np.ones_like(value)}, list(const.outputs),
                              {"source_name": const.name, "flags": []}))
            g.set_inputs(mul, [ones.out if r.node == const.name else r for r in g[mul].inputs])
            rewritten.append({"node": ones.name, "op": "constant", "what": what})
        # (anything else: another node reads the scale, which is left alone)
    _reset_lone_layer_scales(g, signals, rewritten)
    return g, {"removed": [], "rewritten": rewritten}


#: a lone scale after a layer counts as a layer scale when its RMS is outside this range
#: (the range of shaping's "constants far from 1" warning)
LONE_LAYER_SCALE_RANGE = (0.1, 10.0)


def _reset_lone_layer_scales(g: Graph, signals: set[str], rewritten: list) -> None:
    """Set to 1 a layer scale that ends no residual branch: a ``mul`` of a conv / linear
    layer's output (through data movement, nothing else reading it) by a scalar or
    per-channel float constant nothing else reads, with an RMS off 1 by 10x or more, that
    does not end the network. timm's MobileNetV5 keeps its blocks' layer scale (1e-5) in
    the first block of a stage, which has no shortcut: with its norms removed, each such
    block scaled the whole signal by 1e-5 (measured q at the residual joins of the shaped
    mobilenetv5_base fell from ~1 to 7e-4 after the second stage). With the layer, the
    scale is one affine map, which the orthogonal initialization sets as a whole."""
    from graphshape.ops import AFFINE_LAYERS
    from graphshape.passes.normalize import _is_per_channel, _out_features
    from graphshape.passes.subnetworks import ends_the_network

    low, high = LONE_LAYER_SCALE_RANGE
    for node in list(g):
        if node.op != "mul" or len(node.inputs) != 2:
            continue
        const = _sole_constant(g, node, signals)
        if const is None:
            continue
        layer = g[next(r.node for r in node.inputs if r.node in signals)]
        # (through data movement and other such scales in a row)
        while layer.inputs and len(g.users(layer.name)) == 1:
            if layer.op in _BRANCH_PASS:
                layer = g[layer.inputs[0].node]
            elif layer.op == "mul" and _sole_constant(g, layer, signals) is not None:
                layer = g[next(r.node for r in layer.inputs if r.node in signals)]
            else:
                break
        if layer.op not in AFFINE_LAYERS or len(g.users(layer.name)) != 1:
            continue
        value = const.params["value"]
        rms = float(np.sqrt(np.mean(np.square(value, dtype=np.float64))))
        if low <= rms <= high or ends_the_network(g, node.name):
            continue
        # (per channel as the mul reads it: gamma.reshape(1, -1, 1, 1) of a (C,) parameter)
        operand = next(r for r in node.inputs if r.node not in signals)
        shape = g.info(operand).shape
        if shape is None or not all(isinstance(d, int) for d in shape) or not _is_per_channel(
                np.empty(shape, np.float32), _out_features(layer), g.info(node.out).rank):
            continue
        const.params["value"] = np.ones_like(value)
        rewritten.append({"node": const.name, "op": "constant",
                          "what": f"layer scale after {layer.name!r} set to 1 (was {rms:.3g} "
                                  "RMS; no shortcut around it)"})


def _scale_constant(g: Graph, mul, signals: set[str]):
    """``(constant node, the pass-through nodes between)`` that ``mul`` multiplies its signal
    by (through reshapes of the parameter: ``gamma.reshape(1, -1, 1, 1)``), when it is a
    float constant; None otherwise. Others may read it too (see :func:`_sole_constant`)."""
    others = [r for r in mul.inputs if r.node not in signals]
    if len(others) != 1 or len(mul.inputs) - len(others) != 1:
        return None
    node, chain = g[others[0].node], []
    while node.op in _BRANCH_PASS and node.inputs:
        chain.append(node.name)
        node = g[node.inputs[0].node]
    value = node.params.get("value") if node.op == "constant" else None
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
        return None
    return node, chain


def _sole_constant(g: Graph, mul, signals: set[str]):
    """The float constant node that ``mul`` multiplies its signal by, when nothing else
    reads it (through reshapes of the parameter: ``gamma.reshape(1, -1, 1, 1)``)."""
    others = [r for r in mul.inputs if r.node not in signals]
    if len(others) != 1 or len(mul.inputs) - len(others) != 1:
        return None
    node = g[others[0].node]
    while node.op in _BRANCH_PASS and len(g.users(node.name)) == 1 and node.inputs:
        node = g[node.inputs[0].node]
    value = node.params.get("value") if node.op == "constant" else None
    if (not isinstance(value, np.ndarray) or value.dtype.kind != "f"
            or len(g.users(node.name)) != 1):
        return None
    return node


#: the max-pooling ops (one rule for all: they take the max over a window)
MAX_POOL_OPS = ("max_pool", "global_max_pool", "adaptive_max_pool")


def commutes_with_max_pool(node) -> bool:
    """True if activation ``node`` (its transform included, if it has one) is nondecreasing,
    so that ``max_pool(act(x)) = act(max_pool(x))``."""
    from graphshape.activations import get

    if node.op != "activation" or node.attrs.get("learnable_slope"):
        return False  # (a PReLU's slopes train, and may turn negative)
    t = node.attrs.get("transform") or {}
    if float(t.get("input_scale", 1.0)) * float(t.get("output_scale", 1.0)) <= 0.0:
        return False
    attrs = {k: v for k, v in node.attrs.items() if k not in ("name", "transform", "inplace")}
    try:
        return get(node.attrs.get("name")).is_nondecreasing(**attrs)
    except GraphshapeError:  # an unknown activation or attribute: assume nothing
        return False


def _commute_max_pool(g: Graph, pool, act) -> None:
    """``pool(act(x))`` -> ``act(pool(x))`` (equal for a nondecreasing ``act``; max pooling's
    padding is -inf, so edges agree too). Node names and attributes stay; the activation then
    runs on the smaller, pooled tensor."""
    x = act.inputs[0]
    pooled_info = pool.outputs[0]
    g.set_inputs(pool.name, [x])
    g.replace_uses(pool.out, act.out)  # the pool's consumers now read the activation
    g.set_inputs(act.name, [pool.out])
    pool.outputs = [TensorInfo(pooled_info.shape, g.info(x).dtype)]
    act.outputs = [pooled_info]
    # shaping checks after solving that the transform keeps the activation nondecreasing
    act.meta["commuted_with_max_pool"] = pool.name


def _before_neutral_affine(g: Graph, node):
    """The node before a chain of products by 1 and sums with 0 (one-element constants)
    ending at ``node``, or ``node``: timm HGNetV2's LearnableAffineBlock after an
    activation (a trainable scale 1 and bias 0 at initialization), which the ONNX importer
    folds into the activation (:func:`graphshape.passes.elementwise.fuse_activation_decompositions`),
    so that a shortcut from it is a V1 shortcut on both paths."""
    while node.op in ("mul", "add"):
        found = constant_operand(g, node)
        neutral = 1.0 if node.op == "mul" else 0.0
        if found is None or found[1].size != 1 or float(found[1].reshape(())) != neutral:
            break
        node = g[node.inputs[found[0]].node]
    return node


def move_shortcuts_to_preactivation(graph: Graph, *, copy: bool = True) -> tuple[Graph, dict]:
    """Give V1 residual blocks pre-activation shortcuts: an identity shortcut that reads
    the activation ``a = act(h)`` which also starts the block's branch reads ``h`` instead.

    A V1 block (torchvision's ResNets) computes ``act(w * a + v * B(a))`` with
    ``a = act(j_prev)``. When ``act``'s transform has a non-zero mean (TAT's leaky ReLU), ``a``
    is not a centred Gaussian, so the next activation's input is not one either: its q grows
    block after block and the kernel rules under-predict it
    (:func:`graphshape.passes.shaping.find_nongaussian_activations`). After the rewrite the
    residual stream is ``j = w * j_prev + v * B(act(j_prev))``: every activation reads a
    weighted sum of linear-layer outputs (Gaussian at initialization in the wide limit), as
    in a pre-activation (V2) ResNet; for a torchvision ResNet-50 the result has exactly the
    structure of dks's own "modified ResNet" V2. Same layers and parameters: only shortcut
    edges move. Projection shortcuts (a conv reading ``a``) stay: the conv's output is
    Gaussian already.

    A stem ``conv -> act -> max_pool`` feeding an identity shortcut (resnet18/34's first
    block) is first reordered to ``conv -> max_pool -> act`` when ``act`` is nondecreasing
    (the same function; :func:`commutes_with_max_pool`), so that the shortcut can read the
    pooled conv output. Such activations get ``meta["commuted_with_max_pool"]``: their
    solved transform must keep them nondecreasing (``input_scale * output_scale > 0``).

    The shortcut may pass through ``identity`` nodes (an ``nn.Identity`` projection, as in
    timm's DLA); the join then reads the pre-activation directly, and those identity nodes
    are removed when nothing else reads them; and the activation may be followed by
    products by 1 and sums with 0 (:func:`_before_neutral_affine`: a learnable affine at
    its initial value, which stays on the branch).

    Run it after :func:`normalize_sums` (weights) and before solving. Returns
    ``(new_graph, record)``, ``record["rewritten"]`` listing each moved shortcut and
    reordered pool, ``record["removed"]`` the identity nodes left unused; the input graph is
    not modified unless ``copy=False``."""
    from graphshape.passes.subnetworks import find_joins

    g = graph.copy() if copy else graph
    removed: list[dict] = []
    rewritten: list[dict] = []
    for join in find_joins(g):
        node = g[join.node]
        if join.shortcut is None or node.op != "sum":
            continue
        shortcut = join.inputs[join.shortcut]
        source, passed = g[shortcut.node], []
        while source.name != join.fork and source.op == "identity":
            # nn.Identity between the block's input and the join (timm's DLA: a `project`
            # that is nn.Identity when the widths match; ONNX exports drop such nodes, and
            # the two paths must agree)
            passed.append(source.name)
            source = g[source.inputs[0].node]
        if source.name != join.fork:
            continue  # not an identity shortcut from the block's input
        source = _before_neutral_affine(g, source)
        if len(source.inputs) != 1:
            continue
        if source.op in MAX_POOL_OPS:
            act = g[source.inputs[0].node]
            if not commutes_with_max_pool(act) or len(g.users(act.name)) != 1:
                continue
            _commute_max_pool(g, source, act)
            rewritten.append({"node": source.name, "op": source.op,
                              "what": f"moved before activation {act.name!r} (equal for a "
                                      "nondecreasing activation) so that the shortcut of "
                                      f"{node.name!r} can read the pooled pre-activation"})
            pre = source.out  # the activation now reads the pool
        elif source.op == "activation":
            pre = source.inputs[0]
            act = source
        else:
            continue
        inputs = list(node.inputs)
        inputs[join.slots[join.shortcut]] = pre
        g.set_inputs(node.name, inputs)
        for name in passed:  # identity nodes nothing reads any more
            if g.users(name) or g.is_output(name):
                break
            g.remove(name)
            removed.append({"node": name, "op": "identity",
                            "what": f"identity on the shortcut of {node.name!r}, now unused"})
        node.meta.setdefault("flags", []).append(
            f"pre-activation shortcut: reads {pre.node!r} instead of {act.name!r}")
        rewritten.append({"node": node.name, "op": "sum",
                          "what": f"pre-activation shortcut: reads {pre.node!r} instead of "
                                  f"the activation {act.name!r}",
                          "shortcut_from": act.name, "shortcut_to": pre.node})
    return g, {"removed": removed, "rewritten": rewritten}


def _some(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
