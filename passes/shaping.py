"""The shaping pipeline: any model's IR in, a normalizer-free DKS/TAT-shaped IR out.

Passes, each ``IR -> (IR, record)`` and none modifying its input graph:

1. :func:`graphshape.passes.normalize.remove_normalization` (norm layers and the per-channel
   affine right after them; the layer before gains a zero bias where the norm had a shift);
2. :func:`graphshape.passes.joins.normalize_sums` (every additive join becomes a normalized
   sum; residual joins use ``shortcut_weight``; 0 removes the skip);
3. :func:`max_pool_to_avg_pool` (optional): max pooling has no kernel rule beyond the
   "identity" approximation; average pooling's is closer (it is linear);
4. :func:`substitute_activations` (``activation=NAME`` replaces main-path nonlinearities);
   gates (a nonlinearity whose output multiplies another signal, as in squeeze-excitation:
   :func:`find_gates`) start as the constant 1 where :func:`constant_gates` can make them so
   (their input layer starts at zero, the gate is divided by its value at 0), and are
   refused otherwise; other products of two signals (gMLP, linear attention; softmax
   attention excepted) are refused by :func:`find_signal_products`: there is no kernel
   rule for them;
4b. :func:`graphshape.passes.joins.move_shortcuts_to_preactivation` (``preactivation_shortcuts``,
   default on under TAT): V1 identity shortcuts read the residual stream instead of the
   activation after it, so that every activation reads a Gaussian (docs/shaping.md);
5. :func:`solve_and_inject`: one parameter set per activation name, from
   :func:`graphshape.kernels.solve` and the subnetwork maximizing function that
   :func:`graphshape.passes.subnetworks.subnet_max_func` derives from the graph; stored in
   each activation node's ``attrs["transform"]`` (dks names);
6. :func:`graphshape.init.initialize`: delta-orthogonal convs, SUO dense layers, zero biases;
7. :func:`graphshape.passes.fold.fold_scales` (``fold_scales=True`` only): constant scales
   folded into the conv/linear weights (same function, cheaper to run).

:func:`shape_graph` runs them all and returns a :class:`ShapeReport`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import networkx as nx
import numpy as np

from graphshape.errors import GraphshapeError
from graphshape.ir import Graph, constant_operand, may_hold_signal, moves_data_only
from graphshape.ops import AFFINE_LAYERS
from graphshape.passes.joins import (MAX_POOL_OPS, commutes_with_max_pool,
                                    move_shortcuts_to_preactivation, normalize_sums,
                                    reset_branch_scales)
from graphshape.passes.normalize import (NORM_OPS, merge_duplicate_activations,
                                         remove_normalization)
from graphshape.passes.subnetworks import LOGIT_OPS, attention_logits, used_only_by

#: The default residual shortcut weight, chosen by measurement (benchmarks/shortcut_weight.py,
#: numbers in docs/shaping.md): it is the largest weight (0.05 grid) with which the default
#: method, TAT (leaky ReLU, eta = 0.9, pre-activation shortcuts), can shape every torchvision
#: ResNet -- resnet18 allows at most 0.5 (at 0.55 even negative_slope = 0 gives C_f(0) < 0.9)
#: -- and in the training measurement it reached the best test accuracy of the TAT runs.
DEFAULT_SHORTCUT_WEIGHT = 0.5

METHODS = ("DKS", "TAT", "untransformed")
_TRANSFORM_KEYS = ("input_scale", "input_shift", "output_shift", "output_scale")
# ops a gate's output may pass through (unchanged data) before it multiplies a signal
_PASS_THROUGH = ("reshape", "flatten", "squeeze", "unsqueeze", "transpose", "identity",
                 "dropout", "slice")


@dataclass
class ShapeReport:
    """What shaping did.

    ``method``: "DKS", "TAT" or "untransformed"; ``options``: the options used;
    ``activation_params``: activation name -> dict of dks-named parameters (input_scale,
    input_shift, output_shift, output_scale, negative_slope) injected into every activation
    of that name; ``removed``: nodes removed (dicts: node, op, what); ``rewritten``: nodes
    changed in place (dicts: node, op, what, ...); ``warnings``: approximations and
    anything the user should know; ``subnetworks``: the subnetworks the maximizing function
    ranged over; ``initialized``: number of conv/linear nodes re-initialized;
    ``activations_found``: activation name -> number of nodes in the source model.
    """

    method: str
    options: dict[str, Any] = field(default_factory=dict)
    activation_params: dict[str, dict[str, float]] = field(default_factory=dict)
    removed: list[dict] = field(default_factory=list)
    rewritten: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    subnetworks: list[str] = field(default_factory=list)
    initialized: int = 0
    activations_found: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-serializable dict of every field."""
        return json.loads(json.dumps(asdict(self), default=_jsonable))

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def summary(self) -> str:
        params = "; ".join(f"{k}: " + ", ".join(f"{p}={v:.6g}" for p, v in d.items())
                           for k, d in self.activation_params.items()) or "none"
        return (f"{self.method}: {len(self.removed)} nodes removed, {len(self.rewritten)} "
                f"rewritten, {self.initialized} initialized; parameters: {params}"
                + (f"; {len(self.warnings)} warnings" if self.warnings else ""))


def _jsonable(obj):
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return repr(obj)


def canonical_method(method: str) -> str:
    """"dks" / "tat" / "untransformed" in any case -> the canonical spelling."""
    for m in METHODS:
        if isinstance(method, str) and method.lower() == m.lower():
            return m
    raise GraphshapeError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")


# ----------------------------------------------------------------------- gates
def _signals(graph: Graph) -> set[str]:
    from graphshape.passes.subnetworks import signal_nodes

    return signal_nodes(graph)


def constant_path_activations(graph: Graph, signals: set[str] | None = None) -> list[str]:
    """Activation nodes that read no model input: they compute a constant (swin_v2's
    continuous position-bias MLP, an activation applied to a learned table). They carry no
    signal, so no kernel rule concerns them: the shaping passes leave them, and the layers
    that compute them, as they are."""
    signals = _signals(graph) if signals is None else signals
    return [n.name for n in graph if n.op == "activation" and n.name not in signals]


def _integer_input_paths(graph: Graph, names: list[str]) -> dict[str, list[str]]:
    """For each of ``names`` (nodes that are not signals) that nevertheless depends on the
    values of model inputs, through integer tensors: those inputs, by node name. Sizes
    (``x.size(0)``, flagged shape_computation) are not values."""
    values = graph.nx.subgraph(n for n in graph.nx
                               if "shape_computation" not in graph[n].meta.get("flags", ()))
    inputs = set(graph.inputs)
    found: dict[str, list[str]] = {}
    for name in names:
        reached = nx.ancestors(values, name) & inputs
        if reached:
            found[name] = sorted(reached)
    return found


def _main_path_activations(graph: Graph, signals: set[str] | None = None) -> list:
    """The activation nodes that read a signal (gates included, except those that start as
    the constant 1 and the activations that only compute their input:
    :func:`constant_gates`, :func:`gate_paths`), output links
    (:func:`graphshape.passes.subnetworks.find_output_links`) excepted."""
    from graphshape.passes.subnetworks import find_output_links

    signals = _signals(graph) if signals is None else signals
    links = set(find_output_links(graph))
    return [n for n in graph
            if n.op == "activation" and n.name in signals and n.name not in links
            and CONSTANT_GATE not in n.meta and GATE_PATH not in n.meta]


def find_gates(graph: Graph) -> list[tuple[str, str]]:
    """(activation node, product node) pairs where an activation's output (possibly after
    reshapes) multiplies or divides another signal that does not descend from it: a gate, as
    in squeeze-and-excitation (``x * sigmoid(fc(pool(x)))``: the sigmoid is the gate, x's
    activation the gated main path) or a decomposed SiLU (``x * sigmoid(x)``)."""
    signals = _signals(graph)
    gates = []
    for node in graph:
        if node.op != "activation":
            continue
        frontier = [node]
        seen = set()
        while frontier:
            cur = frontier.pop()
            for user in graph.users(cur.name):
                if user.name in seen:
                    continue
                seen.add(user.name)
                if user.op in _PASS_THROUGH or (moves_data_only(user)  # (g.expand_as(x))
                                                and user.inputs[0].node == cur.name):
                    frontier.append(user)
                elif user.op in ("mul", "div", "matmul"):
                    # the other operand must be a signal that does not itself come from
                    # this activation (then this one is the gated main path, not the gate)
                    others = [r for r in user.inputs if r.node != cur.name]
                    if any(r.node in signals and not nx.has_path(graph.nx, node.name, r.node)
                           for r in others):
                        gates.append((node.name, user.name))
                    elif (user.op == "mul" or (user.op == "div"
                                               and user.inputs[0].node == cur.name)) and not any(
                            r.node in signals for r in others):
                        frontier.append(user)  # a gate scaled by a constant (2 * sigmoid(z))
    return gates


#: meta key of a gate activation that starts as the constant 1 (:func:`constant_gates`):
#: the name of the layer that computes its input
CONSTANT_GATE = "constant_gate"
#: meta key of the nodes that only compute such a gate's input (:func:`gate_paths`)
GATE_PATH = "gate_path"


def _value_at_zero(node) -> float | None:
    """``f(0)`` of activation ``node`` (its attributes included; its transform not), None
    when unknown."""
    from graphshape import activations as registry
    from graphshape.passes.analysis import _act_attrs

    try:
        name, _, attrs = _act_attrs(node)
        return float(np.asarray(registry.get(name).fn(np.zeros(1), **attrs)).reshape(-1)[0])
    except Exception:  # noqa: BLE001 - a name or attribute the registry does not take
        return None


def constant_gates(graph: Graph, gates: list[tuple[str, str]]
                   ) -> tuple[dict[str, str], list[tuple[str, str]], dict[str, str]]:
    """Which ``gates`` (:func:`find_gates`) shaping can start as the constant 1.

    A gate ``g = f(A(...))`` whose input comes from a conv / linear layer ``A`` that nothing
    else reads (through reshapes), with ``f(0) > 0`` (sigmoid and hard sigmoid: 1/2), is the
    constant ``f(0)`` for every example once ``A`` starts at zero. Divided by ``f(0)`` (an
    output scale on the gate), it is exactly 1 at initialization: each gated product
    ``x * g`` is then the identity, so the kernel rules and the maximizing function (which
    takes ``g`` for mixing weights: the identity on ``x``'s kernel) hold exactly, and
    DKS/TAT shape the network around the gates. The gates learn from the first step: the
    gradient of ``A``'s weight is that of the gate times ``A``'s input, which is not zero.
    Squeeze-and-excitation (``x * sigmoid(W2 act(W1 pool(x)))``), CBAM's spatial gate and
    GLU qualify; a gate with ``f(0) = 0`` (SwiGLU's SiLU, GEGLU, tanh) would start as 0 and
    cut the signal, and one computed without a layer of its own has nothing to start at
    zero.

    Returns ``({gate activation: (its input layer, the gate's value at 0)}, [(activation,
    product) of the other gates], {activation: why not} for those)``. A gate scaled by a
    constant on its way to the product (a shaped ONNX file's ``Mul(sigmoid(z), 2)``), or a
    product scaled right after it (NF-Nets' ``attn_gain * (x * sigmoid(z))``), counts with
    that scale; a transform it has (from an earlier shaping) is replaced."""
    starting: dict[str, tuple[str, float]] = {}
    why: dict[str, str] = {}
    for act in dict.fromkeys(a for a, _ in gates):
        node = graph[act]
        f0 = _value_at_zero(node)
        if f0 is None or not math.isfinite(f0) or f0 <= 0:
            why[act] = (f"{node.attrs.get('name')}(0) = {f0:g}: started as 0 it would cut the "
                        "signal" if f0 is not None else "its value at 0 is unknown")
            continue
        scales = set()  # the gate's value multiplier on its way to, and after, each product
        for prod in (p for a, p in gates if a == act):
            before = _gate_scale(graph, act, prod)
            scales.add(None if before is None else before * _product_scale(graph, prod))
        if len(scales) != 1 or None in scales or not next(iter(scales)) > 0:
            why[act] = ("it divides a signal or is scaled by a constant that is not one "
                        "positive number on its way to the product")
            continue
        # (a shaped ONNX file's gate: Mul(sigmoid(z), 2); NF-Nets' 2 * (x * sigmoid(z)))
        f0 *= scales.pop()
        src = graph[node.inputs[0].node] if node.inputs else None
        while src is not None and src.op in _PASS_THROUGH and len(graph.users(src.name)) == 1:
            src = graph[src.inputs[0].node]
        if src is None or src.op not in AFFINE_LAYERS or len(graph.users(src.name)) != 1:
            why[act] = "its input is not a conv / linear layer of its own"
            continue
        if (src.meta.get("shared_params") or {}).get("weight") is not None \
                or not isinstance(src.params.get("weight"), np.ndarray):
            why[act] = f"its input layer {src.name!r} shares or computes its weight"
            continue
        starting[act] = (src.name, f0)
    # a product whose other factor starts as 1 gates that activation's output: it is the
    # gated main path (LR-ASPP's relu(conv(x)) * sigmoid(conv(pool(x)))), not a gate
    gated = {prod for act, prod in gates if act in starting}
    others = [(a, p) for a, p in gates if a not in starting and p not in gated]
    return starting, others, why


def _scalar_operand(graph: Graph, node, ref) -> float | None:
    """The finite non-zero scalar constant that ``mul`` / ``div`` ``node`` scales ``ref`` by
    (``c * x``, ``x * c``, ``x / c``), else None."""
    operand = constant_operand(graph, node) if node.op in ("mul", "div") else None
    if (operand is None or node.inputs[operand[0]] != ref or operand[1].size != 1
            or (node.op == "div" and operand[0] != 0)):
        return None
    value = float(operand[1].reshape(-1)[0])
    if value == 0 or not math.isfinite(value):
        return None
    return value if node.op == "mul" else 1.0 / value


def _gate_scale(graph: Graph, act: str, prod: str) -> float | None:
    """The constant a gate's value is multiplied by between activation ``act`` and the
    ``mul`` node ``prod`` it gates (1 through reshapes; a scalar ``mul`` / ``div`` by a
    constant multiplies it); None for a ``div`` by the gate or a scaling by a non-scalar."""
    node = graph[prod]
    if node.op != "mul":
        return None
    ref = next((r for r in node.inputs if r.node == act or nx.has_path(graph.nx, act, r.node)),
               None)
    scale = 1.0
    cur = graph[ref.node] if ref is not None else None
    while cur is not None and cur.name != act:
        if cur.op in _PASS_THROUGH or moves_data_only(cur):
            cur = graph[cur.inputs[0].node]
            continue
        # the operand on the way back to the gate, scaled by a constant (2 * g, g / 2)
        ref = next((r for r in cur.inputs
                    if r.node == act or nx.has_path(graph.nx, act, r.node)), None)
        value = None if ref is None else _scalar_operand(graph, cur, ref)
        if value is None:
            return None
        scale *= value
        cur = graph[ref.node]
    return scale if cur is not None else None


def _product_scale(graph: Graph, prod: str) -> float:
    """The scalar constant a gated product is multiplied by before anything else reads it:
    NF-Nets' ``attn_gain * (x * sigmoid(z))``, whose 2.0 makes up for sigmoid(0) = 1/2.
    Started as 1 by itself, the gate made such a block's output twice its input (shaped
    nf_regnet_b0: q ~ 3e9 at the output); counted here, gate and gain together start at 1.
    1.0 when there is none."""
    scale, cur = 1.0, graph[prod]
    while not graph.is_output(cur.out):
        users = graph.users(cur.name)
        if len(users) != 1:
            break
        user = users[0]
        if user.op in _PASS_THROUGH or (moves_data_only(user) and user.inputs[0] == cur.out):
            cur = user
            continue
        value = _scalar_operand(graph, user, cur.out)
        if value is None:
            break
        scale *= value
        cur = user
    return scale


def drop_scales_after_transforms(graph: Graph) -> dict:
    """Remove the multiplication by a positive scalar constant that alone reads a
    transformed activation's output: ``phi(x) * c``, NF-Nets' ``act(x) * beta`` (beta =
    1/sqrt(expected variance) of the un-normalized residual stream) or an exported
    ``gamma * gelu(x)``. The solved transform ``phi_hat = s * phi(a x + b) + d`` is what the
    kernel rules and the maximizing function assume the next layer reads; kept, ``c`` scales
    its q by ``c**2`` (nf_regnet_b0 shaped: q 0.31 at the output). Dropping it equals
    solving for ``c * phi`` (whose output scale would be ``s / c``). Gates and activations
    without a transform are left. In place; returns the record (``removed``)."""
    removed = []
    for act in [n for n in graph if n.op == "activation"]:
        if (not act.attrs.get("transform") or act.meta.get(CONSTANT_GATE)
                or act.meta.get(GATE_PATH) or graph.is_output(act.out)):
            continue
        users = graph.users(act.name)
        if len(users) != 1:
            continue
        mul = users[0]
        value = _scalar_operand(graph, mul, act.out)
        if value is None or value <= 0 or value == 1.0 or graph.is_output(mul.out):
            continue  # (one that scales the model's output sets its range: kept)
        const = next(r.node for r in mul.inputs if r != act.out)
        graph.replace_uses(mul.out, act.out)
        graph.remove(mul.name)
        removed.append({"node": mul.name, "op": mul.op,
                        "what": f"scale {value:.4g} after transformed activation {act.name!r} "
                                "(its solved output scale takes its place)"})
        graph.remove_unread([const])
    return {"removed": removed, "rewritten": []}


def gate_paths(graph: Graph, layers) -> set[str]:
    """The nodes whose every use ends in one of ``layers`` (the input layers of gates that
    start as the constant 1): squeeze-excitation's pool, first layer and activation. While
    those layers are zero they do not reach the signal at all, so shaping leaves their
    activations as they are (not substituted, not transformed: TAT does not refuse a
    network for the ReLU inside its squeeze-excitation)."""
    layers = set(layers)
    return used_only_by(graph, lambda user, found: user.name in found, layers) - layers


def start_gates_at_one(graph: Graph, starting: dict[str, tuple[str, float]], *,
                       zero_layers: bool = True) -> dict:
    """Make each gate of ``starting`` (:func:`constant_gates`) start as the constant 1: its
    input layer's weight and bias set to zero (``zero_layers``), the gate divided by its
    value at 0 (``attrs["transform"] = {"output_scale": 1 / f(0)}``). In place; returns the
    record (``rewritten``)."""
    rewritten = []
    for act, (layer, value) in starting.items():
        node = graph[act]
        scale = 1.0 / value  # (a transform it had, from an earlier shaping, is replaced)
        node.attrs["transform"] = {"output_scale": scale}
        rewritten.append({"node": act, "op": "activation",
                          "what": f"gate divided by its value at 0: output scale {scale:g}, "
                                  "1 at initialization"})
        if zero_layers:
            src = graph[layer]
            for key in ("weight", "bias"):
                if isinstance(src.params.get(key), np.ndarray):
                    src.params[key] = np.zeros_like(src.params[key])
            rewritten.append({"node": layer, "op": src.op,
                              "what": f"zero-initialized: gate {act!r} starts as the "
                                      "constant 1"})
    return {"removed": [], "rewritten": rewritten}


def find_signal_products(graph: Graph, gates: list[tuple[str, str]] = ()) -> list[str]:
    """``mul`` / ``matmul`` nodes that multiply two signals, other than attention's: a gMLP
    spatial gating unit (``u * proj(v)``), linear attention (``q @ (kᵀ v)``), a bilinear
    layer. Left out: the products of ``gates``; attention logits (``q kᵀ``, whose output
    reaches a softmax through reshapes, scalings and added biases); a product with softmax
    weights (``softmax(q kᵀ) v``, a convex average over tokens). The q of a product is the
    product of its factors' q values, so its fixed point at q = 1 is unstable: no activation
    transform keeps q near 1 through a stack of them (gmlp_ti16_224, shaped with such
    products: q 1.5 after 8 blocks, 175 after 11, inf at the output)."""
    from graphshape.passes.subnetworks import _is_signal_product, mixing_weights

    signals = _signals(graph)
    mixing = mixing_weights(graph)
    logits = attention_logits(graph)
    gated = {prod for _, prod in gates}
    found = []
    for node in graph:
        if (node.op not in ("mul", "matmul") or node.name in gated
                or not _is_signal_product(node, signals)
                or any(r.node in mixing for r in node.inputs)
                or node.name in logits):
            continue
        found.append(node.name)
    return found


def _feeds_only_attention_logits(graph: Graph, node) -> bool:
    """Whether every use of ``node``'s output ends in a softmax, through reshapes, scalings,
    sums, opaque calls and products: XCiT's and EdgeNeXt's ``F.normalize`` of q and k (cosine
    attention). Such a normalization only sets the attention weights, which the maximizing
    function does not see (it averages over tokens whatever they are), so it is kept."""
    frontier, seen = [node.name], {node.name}
    while frontier:
        users = graph.users(frontier.pop())
        if not users:
            return False  # a model output
        for user in users:
            if user.op == "softmax" or user.name in seen:
                continue
            # (no layer: a normalized q / k reaches the logits through products only)
            if user.op not in (*LOGIT_OPS, "matmul"):
                return False
            seen.add(user.name)
            frontier.append(user.name)
    return True


def _product_error(graph: Graph, products: list[str]) -> GraphshapeError:
    node = graph[products[0]]
    more = f" (and {len(products) - 1} more)" if len(products) > 1 else ""
    factors = " and ".join(graph[r.node].located for r in node.inputs[:2])
    return GraphshapeError(
        f"{node.op} node {node.located}{more} multiplies two signals ({factors}), as gMLP's "
        "spatial gating unit or linear attention do. The q of a product is the product of "
        "its factors' q values, so q = 1 is an unstable fixed point: a deviation doubles at "
        "each such product, and no DKS/TAT activation transform keeps q near 1 through a "
        "stack of them (softmax attention is fine: it averages over tokens). Remove or "
        "replace those products, or use method='untransformed' to rewrite structure and "
        "initialization only.", node=node.name, op=node.op)


def _gate_error(graph: Graph, gates: list[tuple[str, str]],
                why: dict[str, str] | None = None) -> GraphshapeError:
    act, prod = gates[0]
    node = graph[act]
    more = f" (and {len(gates) - 1} more)" if len(gates) > 1 else ""
    reason = (why or {}).get(act)
    return GraphshapeError(
        f"the {node.attrs.get('name', '?')} activation {node.located} gates another signal "
        f"through {graph[prod].op} node {graph[prod].located}{more}, as in a gated linear "
        "unit or attention. "
        "A gate is not a main-path nonlinearity: graphshape starts a gate as the constant 1 "
        "(its input layer at zero, the gate divided by its value at 0, as for "
        "squeeze-excitation), but not this one"
        + (f" ({reason})" if reason else "")
        + ", and it has no kernel rule for other gated products, so DKS/TAT parameters "
        "would be wrong for it. Remove the gating modules or use method='untransformed' "
        "to rewrite structure and initialization only.",
        node=act, op="activation")


# ----------------------------------------------------------------------- small passes
def max_pool_to_avg_pool(graph: Graph, *, copy: bool = True) -> tuple[Graph, dict]:
    """Replace max pooling (plain, global, adaptive) by average pooling with the same
    window. Padding is excluded from the averages (count_include_pad=False). Returns
    ``(new_graph, record)``; the input graph is not modified unless ``copy=False``."""
    g = graph.copy() if copy else graph
    rewritten = []
    for node in g:
        if node.op == "max_pool":
            dilation = tuple(node.attrs.get("dilation") or ())
            if any(d != 1 for d in dilation):
                continue  # avg_pool has no dilation: keep it (reported by the caller)
            attrs = {k: v for k, v in node.attrs.items() if k != "dilation"}
            attrs["count_include_pad"] = False
            node.op, node.attrs = "avg_pool", attrs
        elif node.op == "global_max_pool":
            node.op = "global_avg_pool"
        elif node.op == "adaptive_max_pool":
            node.op = "adaptive_avg_pool"
        else:
            continue
        node.meta.setdefault("flags", []).append("max pooling replaced by average pooling")
        rewritten.append({"node": node.name, "op": node.op.replace("avg", "max"),
                          "what": f"replaced by {node.op}"})
    return g, {"removed": [], "rewritten": rewritten}


def _activation_attrs_for(name: str, old: dict) -> dict:
    """The attrs an activation node keeps when its function becomes ``name``."""
    from graphshape import activations

    defaults = activations.get(name).defaults
    keep = {k: v for k, v in old.items() if k == "inplace"}
    for k, v in old.items():
        if k in defaults:
            keep[k] = v
    return {"name": name, **keep}


def substitute_activations(graph: Graph, activation: str | None,
                           gates: list[tuple[str, str]] | None = None, *,
                           copy: bool = True) -> tuple[Graph, dict]:
    """Replace every main-path activation's function by ``activation`` (gates and
    activations that read no model input excepted). ``None`` keeps them. Returns
    ``(new_graph, record)``; the input graph is not modified unless ``copy=False``."""
    g = graph.copy() if copy else graph
    rewritten = []
    if activation is None:
        return g, {"removed": [], "rewritten": rewritten}
    from graphshape import activations

    activations.get(activation)  # unknown name: GraphshapeError listing the known ones
    gate_nodes = {a for a, _ in (gates if gates is not None else find_gates(g))}
    for node in _main_path_activations(g):
        if node.name in gate_nodes:
            continue
        old = node.attrs.get("name")
        if old == activation:
            continue
        node.attrs = _activation_attrs_for(activation, node.attrs)
        node.params = {}  # a PReLU's slopes go with its function
        rewritten.append({"node": node.name, "op": "activation",
                          "what": f"{old} replaced by {activation}"})
    return g, {"removed": [], "rewritten": rewritten}


# ----------------------------------------------------------------------- solve + inject
def solve_activation_params(graph: Graph, method: str, *, zeta: float = 1.5, eta: float = 0.9,
                            tau: float = 0.3):
    """Solve DKS/TAT parameters for the names of ``graph``'s main-path activations (those
    that read a model input) from the subnetwork maximizing function derived from the
    graph. Returns ``(params, subnet_max_func)``."""
    from graphshape import kernels
    from graphshape.passes.subnetworks import subnet_max_func

    from graphshape import activations as registry

    # one parameter set per activation name: the nodes of one name must agree on the
    # attributes the kernel depends on (hardtanh bounds, elu alpha); a solved leaky_relu
    # negative_slope is not one of them under DKS/TAT
    attrs_by_name: dict[str, dict] = {}
    for node in _main_path_activations(graph):
        name = node.attrs["name"]
        # an attribute left at its default equals one spelled out (ONNX's Elu with and
        # without alpha=1.0; a fused region's elu has none)
        attrs = {k: float(node.attrs.get(k, v)) for k, v in registry.get(name).defaults.items()}
        if name == "leaky_relu" and method != "untransformed":
            attrs.pop("negative_slope", None)
        if name in attrs_by_name and attrs_by_name[name] != attrs:
            raise GraphshapeError(
                f"activation nodes named {name!r} have different attributes "
                f"({attrs_by_name[name]} and {attrs}); graphshape solves one parameter set per "
                "activation name: pass activation=... to make them all the same",
                node=node.name, op="activation")
        if str(method).upper() == "TAT" and name not in attrs_by_name:
            reason = kernels.tat_unsupported(name, attrs)
            if reason:
                raise GraphshapeError(reason, node=node.name, op="activation")
        attrs_by_name[name] = attrs
    smf = subnet_max_func(graph)
    if not attrs_by_name or method == "untransformed":
        return {}, smf
    params = kernels.solve(attrs_by_name, method, smf, zeta=zeta, eta=eta, tau=tau)
    return {k: {p: float(v) for p, v in d.items()} for k, d in params.items()}, smf


def inject_transforms(graph: Graph, params: dict[str, dict[str, float]], *,
                      copy: bool = True) -> tuple[Graph, dict]:
    """Write ``params`` into every main-path activation node (one that reads a model input):
    ``attrs["transform"]`` gets the dks-named input/output scales and shifts,
    ``attrs["negative_slope"]`` the solved slope. Returns ``(new_graph, record)``; the input
    graph is not modified unless ``copy=False``."""
    g = graph.copy() if copy else graph
    rewritten = []
    for node in _main_path_activations(g):
        if node.attrs.get("name") not in params:
            continue
        p = params[node.attrs["name"]]
        transform = {k: float(p[k]) for k in _TRANSFORM_KEYS if k in p}
        if transform:
            node.attrs["transform"] = transform
        if "negative_slope" in p:
            node.attrs["negative_slope"] = float(p["negative_slope"])
            if node.attrs.get("learnable_slope"):
                # a PReLU starts from the solved slope in every channel (and learns on)
                node.params["weight"] = np.full_like(node.params["weight"],
                                                     float(p["negative_slope"]))
        rewritten.append({"node": node.name, "op": "activation",
                          "what": f"transformed {node.attrs['name']}", "params": dict(p)})
    return g, {"removed": [], "rewritten": rewritten}


#: what the frontends recorded about how the model was read (``graph.meta`` key) -> the
#: report's warning about it, from that value and the whole meta
_SOURCE_WARNINGS: dict[str, Callable[[Any, dict], str]] = {
    "converted_from_opset": lambda old, meta: (
        f"the model's ONNX opset {old} was converted to {meta.get('opset')} "
        "(onnx.version_converter) to be read; an ONNX output is written at opset "
        f"{meta.get('opset')}"),
    "unwrapped_from": lambda wrappers, meta: (
        f"the model was wrapped, {'('.join(wrappers)}({meta.get('model_class')}"
        f"{')' * len(wrappers)}: graphshape shaped the module inside, and returns it "
        "unwrapped; wrap the result again (torch.compile, DataParallel, "
        "DistributedDataParallel) to train it that way"),
    "traced_with": lambda tracer, meta: (
        f"{meta.get('fx_error')}; graphshape read the model through its ONNX export "
        "(torch.onnx.export, eval mode, batch axis dynamic) instead: its control flow "
        "follows the example inputs (another input size may need another path), dropout "
        "and drop path are not in the shaped model, and names without a matching source "
        "module or tensor follow the export"),
    "specialized": lambda places, meta: (
        f"forward asks Python for the value of a traced size at {len(places)} place(s) "
        f"({_some(places, 2)}): torch.fx traced them for the example inputs' sizes (none "
        "depends on the batch size), and the shaped model checks each, raising on an input "
        "that would take another path: shape again with example inputs of that size to use "
        "it"),
    "autocast": lambda places, meta: (
        f"forward enters torch.autocast at {len(places)} place(s) ({_some(places, 2)}), "
        "which torch.fx does not record: the shaped model computes those regions in the "
        "precision of the code around them (float32, or an outer autocast's lower precision "
        "where the source disabled autocast to keep float32)"),
    "checkpointed": lambda places, meta: (
        f"forward calls torch.utils.checkpoint at {len(places)} place(s) "
        f"({_some(places, 2)}), which torch.fx traces through: the shaped model keeps "
        "those activations for the backward pass instead of computing them again (the same "
        "values, more memory in training)"),
    "state_updates": lambda updates, meta: (
        f"forward updates {len(updates)} buffer(s) in place ({_some(updates, 2)}: a "
        "running statistic, a counter), which the shaped model does not: it reads them as "
        "they were when shaped, at every call (normalization layers graphshape removes take "
        "their statistics with them)"),
    "frozen_params": lambda frozen, meta: (
        f"{len(frozen)} parameter(s) were frozen (requires_grad=False: {_some(frozen)}) and "
        "stay frozen in the shaped model under the same names, although shaping "
        "re-initializes the layers it rewrites: unfreeze them (requires_grad_(True)) to "
        "train those"),
    "fixed_args": lambda fixed, meta: (
        "forward was traced with " + ", ".join(
            f"{k} empty" if k.startswith("*") else f"{k}={v!r}" for k, v in fixed.items())
        + " (the defaults the example inputs leave out, as torch.jit.trace and torch.export "
        "do): the shaped model computes that case only and raises on other values; to keep "
        "a tensor argument as an input, give it in the example inputs"),
    "dropped_hooks": lambda hooked, meta: (
        f"{len(hooked)} module(s) had forward hooks ({_some(hooked)}): the shaped model's "
        "layers do not run them (torch.fx records what a module computes, not its hooks); "
        "register them again on the result if you need them"),
    "pruned": lambda pruned, meta: (
        f"{len(pruned)} layer(s) were pruned with torch.nn.utils.prune ({_some(pruned)}): "
        "its masks are forward pre-hooks, which the shaped model does not run, and shaping "
        "re-initializes the layers: they are dense; prune the result again to make them "
        "sparse"),
    "random_in_training": lambda random, meta: (
        f"the model was traced in training mode, with {len(random)} op(s) drawing random "
        f"numbers ({_some(random)}): torch.fx records the branch a forward took while "
        "tracing (`if self.training:`), so the shaped model draws them in eval mode too. If "
        "they belong to training only (a hand-written drop path, noise), shape the model in "
        "eval mode (model.eval()) or write them as nn.Dropout modules (or timm's DropPath, "
        "torchvision's StochasticDepth), which the shaped model keeps as modules"),
    "traced_hooks": lambda hooked, meta: (
        f"{len(hooked)} module(s) that torch.fx traced through had forward hooks "
        f"({_some(hooked)}): they ran once, while tracing; an output they return is part of "
        "the shaped model, but what else they do (store or print the output) does not "
        "happen in it"),
}


def source_warnings(meta: dict) -> list[str]:
    """The report's warnings about how the model was read (``graph.meta``)."""
    return [warn(meta[key], meta) for key, warn in _SOURCE_WARNINGS.items() if meta.get(key)]


def _holds_weights(node) -> bool:
    """An opaque call of a PyTorch module with parameters (a ``ParametrizedLinear``...)."""
    parameters = getattr(node.attrs.get("module"), "parameters", None)
    return callable(parameters) and any(True for _ in parameters())


def _some(names: list[str], shown: int = 3) -> str:
    """The first ``shown`` names, quoted, and "..." when there are more."""
    return ", ".join(map(repr, names[:shown])) + (" ..." if len(names) > shown else "")


def _attention_nodes(graph: Graph) -> list[str]:
    """Softmax nodes whose weights average a signal (``softmax(q kᵀ) v``) and opaque
    attention calls (``nn.MultiheadAttention``, ``F.scaled_dot_product_attention``, ONNX
    ``Attention``)."""
    from graphshape.passes.subnetworks import is_attention_call, mixing_weights

    mixing = mixing_weights(graph, gates=False)
    found = []
    for node in graph:
        if node.op == "opaque":
            if is_attention_call(node):
                found.append(node.name)
        elif node.op in ("matmul", "mul") and any(r.node in mixing for r in node.inputs):
            found.append(node.name)
    return found


def _constant_scales(graph: Graph) -> list[tuple[str, float]]:
    """``mul``/``div`` nodes scaling a signal by a constant whose RMS is off 1 by 10x+
    (attention logits' ``q kᵀ * scale`` left out: softmax weights average the values
    whatever the scale; so are scales inside a linear filter of one signal,
    :attr:`~graphshape.passes.subnetworks.Join.linear_mix`: PoolFormer's ``x + ls * (pool(x)
    - x)`` maps every c to itself whatever ``ls``)."""
    import numpy as np

    from graphshape.passes.subnetworks import find_joins

    signals = _signals(graph)
    logits = attention_logits(graph)
    in_linear_mix = {n for join in find_joins(graph) if join.linear_mix
                     for branch in join.branches for n in branch}
    found = []
    for node in graph:
        if (node.op not in ("mul", "div") or len(node.inputs) != 2 or node.name in logits
                or node.name in in_linear_mix):
            continue
        consts = [graph[r.node] for r in node.inputs if graph[r.node].op == "constant"]
        if len(consts) != 1 or not any(r.node in signals for r in node.inputs):
            continue
        value = consts[0].params.get("value")
        if value is None or np.size(value) == 0:
            continue
        rms = float(np.sqrt(np.mean(np.square(np.asarray(value, dtype=np.float64)))))
        if node.op == "div" and rms > 0:
            rms = 1.0 / rms
        if not 0.1 <= rms <= 10.0:
            found.append((node.name, rms))
    return found


# ----------------------------------------------------------------------- pipeline
#: |C(0)| = E[phi_hat]^2 / Q(1) above which an activation's output counts as non-zero-mean
NONZERO_MEAN_C0 = 1e-4
#: op kernels that pass a value on unchanged in distribution (its mean included)
_PASS_THROUGH_KERNELS = ("identity", "approx_identity")


def _activation_c0(node) -> float:
    """C(0) = E[phi_hat(z)]^2 / Q(1) of activation ``node`` (its transform included); 0.0
    when graphshape has no local maps for it."""
    from graphshape.kernels import local_maps

    attrs = {k: float(v) for k, v in node.attrs.items()
             if k not in ("name", "transform", "inplace") and isinstance(v, (int, float, np.number))
             and not isinstance(v, bool)}
    try:
        return float(local_maps(node.attrs.get("name"), node.attrs.get("transform"), **attrs).c0)
    except Exception:  # an activation without local maps: nothing to say about its mean
        return 0.0


def find_nongaussian_activations(graph: Graph) -> list[str]:
    """Activations (in graph order) whose input is a join that reads, through an identity
    shortcut (identity / pooling / shape-only nodes), the output of another activation with
    non-zero mean (E[phi_hat] != 0, i.e. C(0) > NONZERO_MEAN_C0): the V1 ResNet pattern
    ``act(w * act_prev(...) + branch)``. That input is not a centred Gaussian, so the kernel
    rules, which assume one, under-predict q there; the error compounds block after block.
    Join inputs with weight 0 (``shortcut_weight=0``) do not count."""
    from graphshape.ops import spec

    def kernel_of(op: str) -> str:
        try:
            return spec(op).kernel
        except Exception:
            return "none"

    def source(ref):
        """The node reached from ``ref`` through pass-through nodes."""
        node = graph[ref.node]
        while kernel_of(node.op) in _PASS_THROUGH_KERNELS and node.inputs:
            node = graph[node.inputs[0].node]
        return node

    c0_cache: dict[str, float] = {}
    found = []
    for node in graph:
        if node.op != "activation" or not node.inputs:
            continue
        join = source(node.inputs[0])
        if kernel_of(join.op) != "sum" or len(join.inputs) < 2:
            continue
        weights = join.attrs.get("weights") if join.op == "sum" else None
        for i, ref in enumerate(join.inputs):
            if weights is not None and i < len(weights) and float(weights[i]) == 0.0:
                continue
            prev = source(ref)
            if prev.op != "activation":
                continue
            if prev.name not in c0_cache:
                c0_cache[prev.name] = _activation_c0(prev)
            if c0_cache[prev.name] > NONZERO_MEAN_C0:
                found.append(node.name)
                break
    return found


def linear_matmuls(graph: Graph, *, copy: bool = True) -> tuple[Graph, dict]:
    """``x @ w``, ``w`` a trainable 2-D constant (a parameter from PyTorch) that nothing else
    reads, directly or through one transpose (``x @ w.t()``): a linear layer written as a
    matmul (research code's hand-written layers, timm BotNet's relative-position logits
    ``q @ rel.transpose(-1, -2)``). It becomes a ``linear`` node with the ``(out, in)``
    weight ``wᵀ`` (or ``w``), as the ONNX frontend reads ``MatMul(x, initializer)``: shaping
    then initializes it like ``nn.Linear``, and a model shaped from PyTorch and from its ONNX
    export is the same network. (Loading keeps the matmul: a converted model's
    ``state_dict`` has the source's key ``w``, in its layout; a shaped model is a new one.)
    A buffer, a weight read anywhere else (tied, or held by a module; reads of its shape
    aside), a computed weight and ``w @ x`` stay matmuls. Returns ``(graph, {"rewritten":
    [...]})``."""
    g = graph.copy() if copy else graph
    rewritten = []
    for node in list(g):
        if node.op != "matmul" or len(node.inputs) != 2:
            continue
        x_ref, w_ref = node.inputs
        first = weight = g[w_ref.node]
        if (weight.op == "transpose" and tuple(weight.attrs.get("perm") or ()) == (1, 0)
                and len(g.users(weight.name)) == 1):
            weight = g[weight.inputs[0].node]
        value = weight.params.get("value")
        # (reads of its shape only, ``rel.shape[0]`` in timm's HaloNet, do not count)
        shape_reads = [u for u in g.users(weight.name)
                       if u.op == "opaque" and "shape_computation" in u.meta.get("flags", ())]
        if (weight.op != "constant" or not weight.attrs.get("trainable")
                or weight.meta.get("shared_params")
                or len(g.users(weight.name)) != 1 + len(shape_reads)
                or g[x_ref.node].op == "constant" or np.ndim(value) != 2
                or not np.issubdtype(np.asarray(value).dtype, np.floating)):
            continue
        matrix = value if first is not weight else value.T  # (out, in)
        if shape_reads:  # the tensor stays for them: a buffer, not a parameter left unused
            weight.attrs["trainable"] = False
            weight.meta["persistent"] = False
        node.op = "linear"
        node.attrs = {"in_features": int(matrix.shape[1]), "out_features": int(matrix.shape[0])}
        node.params = {"weight": matrix}
        if "torch_dtype" in weight.meta:
            node.meta["torch_dtype"] = weight.meta["torch_dtype"]
        g.set_inputs(node.name, [x_ref])
        g.remove_unread([first.name], upstream=True)
        rewritten.append({"node": node.name, "op": "matmul",
                          "what": f"linear layer (a matmul by parameter {weight.name!r})"})
    return g, {"rewritten": rewritten}


def _merge(report: ShapeReport, record: dict) -> None:
    report.removed.extend(record.get("removed", ()))
    report.rewritten.extend(record.get("rewritten", ()))
    report.warnings.extend(record.get("warnings", ()))


def shape_graph(graph: Graph, *, method: str = "TAT", activation: str | None = None,
                shortcut_weight: float = DEFAULT_SHORTCUT_WEIGHT, zeta: float = 1.5,
                eta: float = 0.9, tau: float = 0.3, max_pool_to_avg: bool = False,
                preactivation_shortcuts: bool | None = None,
                initialize: bool = True, seed: int | None = None,
                fold_scales: bool | str = "weights",
                copy: bool = True) -> tuple[Graph, ShapeReport]:
    """Shape ``graph`` with DKS / TAT (see the module docstring). Returns the new graph and a
    :class:`ShapeReport`; ``graph`` is not modified unless ``copy=False``. Raises
    GraphshapeError when the model cannot be shaped (a gate, a target no parameter reaches,
    an unknown activation...).

    ``copy=False``: the passes work on ``graph`` itself (no deep copy of the IR: ~25 ms for
    ResNet-50), for callers that drop it afterwards, as :func:`graphshape.shape` does. The
    result still shares no parameter array with ``graph`` (which may share memory with a
    source model): arrays the passes did not replace are copied at the end.

    ``preactivation_shortcuts``: move V1 identity shortcuts onto the residual stream
    (:func:`graphshape.passes.joins.move_shortcuts_to_preactivation`); None (default) does it for
    TAT, whose transformed activations have non-zero mean, and not for DKS (zero mean) or
    untransformed networks.

    ``fold_scales``: after initialization, move the activations' positive scales (TReLU) and
    the normalized sums' weights onto the neighbouring conv/linear layers
    (:func:`graphshape.passes.fold.fold_scales`): the same function with fewer elementwise
    passes. "weights" (default): the layers compute with scaled weights, the parameters and
    gradients are unchanged; "parameters" (True): the stored parameters are scaled, which
    changes the parametrization training sees; "none" (False): no folding."""
    from graphshape.passes.fold import canonical_fold_mode

    method = canonical_method(method)
    fold_scales = canonical_fold_mode(fold_scales)
    if preactivation_shortcuts is None:
        preactivation_shortcuts = method == "TAT"
    report = ShapeReport(method, options={
        "method": method, "activation": activation, "shortcut_weight": shortcut_weight,
        "zeta": zeta, "eta": eta, "tau": tau, "max_pool_to_avg": max_pool_to_avg,
        "preactivation_shortcuts": bool(preactivation_shortcuts), "seed": seed,
        "fold_scales": fold_scales})
    graph.validate()
    report.warnings.extend(source_warnings(graph.meta))
    for node in graph:
        if node.op == "activation":
            name = node.attrs.get("name", "?")
            report.activations_found[name] = report.activations_found.get(name, 0) + 1

    # one copy up front; the passes then work on it in place. Weights that the init pass
    # replaces with new arrays (no pass modifies them in place) are shared, not copied:
    # ResNet-50's 100 MB, twice.
    replaced = [n.params["weight"] for n in graph
                if initialize and n.op in AFFINE_LAYERS
                and isinstance(n.params.get("weight"), np.ndarray)]
    # arrays that must not stay shared with the source model unless a pass replaces them
    # (held here, so that their ids stay theirs): with copy=True only those the copy shares
    shared = replaced if copy else [v for n in graph for v in n.params.values()
                                    if isinstance(v, np.ndarray)]
    g, rec = remove_normalization(graph.copy(share=replaced) if copy else graph, copy=False)
    _merge(report, rec)
    # the source's buffers folded into activations at load stay in a converted model's
    # state_dict (backend_torch); a shaped model is a new one, its transformed activations
    # read none of them
    g.meta.pop("folded_state", None)
    g, rec = merge_duplicate_activations(g, copy=False)
    _merge(report, rec)
    g, rec = linear_matmuls(g, copy=False)
    _merge(report, rec)
    from graphshape.passes.subnetworks import ends_the_network, find_output_links

    for node in g:
        if node.op != "opaque" or "norm" not in str(node.attrs.get("description", "")).lower():
            continue
        if ends_the_network(g, node.name):
            # an embedding's final F.normalize (metric learning, CLIP-style heads) belongs
            # to the output, as a classifier's softmax does
            report.warnings.append(
                f"{node.attrs.get('description')!r} ({node.name!r}) ends the network: kept as "
                "part of the output (a normalized embedding), not shaped")
        elif not _feeds_only_attention_logits(g, node):
            raise GraphshapeError(
                f"{node.attrs.get('description')!r} looks like a normalization layer that "
                "graphshape could not map to a known norm op, so it cannot remove it",
                node=node.name, op=node.op)

    if initialize:  # before normalize_sums, which removes the joins at w = 0
        g, rec = reset_branch_scales(g, copy=False)
        _merge(report, rec)
    g, rec = normalize_sums(g, shortcut_weight, copy=False)
    _merge(report, rec)

    if max_pool_to_avg:
        g, rec = max_pool_to_avg_pool(g, copy=False)
        _merge(report, rec)
        for node in g:
            if node.op == "max_pool":
                report.warnings.append(f"max_pool {node.name!r} has dilation: kept as max_pool")

    gates = find_gates(g)
    starting: dict[str, tuple[str, float]] = {}
    if gates and method != "untransformed":
        starting, others, why = constant_gates(g, gates)
        if others:
            raise _gate_error(g, others, why)
        gates = [(a, p) for a, p in gates if a in starting]  # (not the paths they gate)
        layers = {act: layer for act, (layer, _) in starting.items()}
        for act, layer in layers.items():
            g[act].meta[CONSTANT_GATE] = layer
        path = gate_paths(g, layers.values())
        for name in path:
            g[name].meta[GATE_PATH] = True
        path_acts = [n for n in path if g[n].op == "activation"]
        report.warnings.append(
            f"{len(starting)} gate(s) ({_some(list(starting))}: squeeze-excitation or "
            "similar) start as the constant 1: the layer(s) computing their input ("
            f"{_some(list(layers.values()))}) start at zero and each gate is divided by its "
            "value at 0, so the gated products are the identity at initialization and the "
            "network is shaped around them; the gates learn from the first step"
            + (f"; the {len(path_acts)} activation(s) inside them ({_some(path_acts)}) are left "
               "as they are" if path_acts else "")
            + ("" if initialize else " (initialize=False: the layers keep their weights, so "
               "the gates are not constant)"))
    elif gates:
        report.warnings.append(
            f"{len(gates)} gating activation(s) ({', '.join(a for a, _ in gates)}) left as they are")
    products = find_signal_products(g, gates)
    if products and method != "untransformed":
        raise _product_error(g, products)
    if products:
        report.warnings.append(
            f"{len(products)} product(s) of two signals ({', '.join(products[:3])}"
            f"{', ...' if len(products) > 3 else ''}) left as they are: q is not controlled "
            "through them")
    signals = _signals(g)
    links = find_output_links(g)
    if links and method != "untransformed":
        report.warnings.append(
            f"{len(links)} output activation(s) left as they are ("
            + ", ".join(f"{n!r} ({g[n].attrs['name']})" for n in links[:3])
            + (", ..." if len(links) > 3 else "") + "): a bounded activation that ends the "
            "network links its output to the loss (a probability, an image in [-1, 1]), as a "
            "softmax does; DKS/TAT shape the network before it")
    constant_acts = constant_path_activations(g, signals)
    # those that do read a model input, through integer values only: t[:, None].float()
    # -> sin/cos -> MLP (a diffusion model's timestep embedding), a label lookup
    through_ints = _integer_input_paths(g, constant_acts)
    constant_acts = [a for a in constant_acts if a not in through_ints]
    if constant_acts:
        report.warnings.append(
            f"{len(constant_acts)} activation(s) read no model input (first "
            f"{constant_acts[0]!r}: a computed constant, e.g. a position-bias MLP): left as "
            "they are, with the layers that compute them")
    if through_ints:
        first, inputs = next(iter(through_ints.items()))
        report.warnings.append(
            f"{len(through_ints)} activation(s) read model input(s) only through integer "
            f"values (first {first!r}, from {_some(inputs)}: e.g. a timestep, label or "
            "token-id embedding): graphshape has no kernel rule for integer inputs, so they "
            "are left as they are, with the layers that compute them (the analysis measures "
            "their values on example inputs)")
    if method == "TAT" and activation is None:
        gate_nodes = {a for a, _ in gates}
        main = [n for n in _main_path_activations(g, signals) if n.name not in gate_nodes]
        names = {n.attrs["name"] for n in main}
        if names == {"relu"}:
            # TAT has no ReLU version (its C map cannot be made closer to the identity);
            # TReLU, the TAT leaky ReLU, is what the TAT paper uses in place of ReLU
            activation = "leaky_relu"
            report.warnings.append("TAT does not transform relu: relu replaced by leaky_relu "
                                   "(TReLU); pass activation=... to choose another")
        elif "relu" in names:
            first = next(n.name for n in main if n.attrs["name"] == "relu")
            raise GraphshapeError(
                "TAT has no relu version (its C map has infinite curvature at c = 1). "
                "graphshape turns relu into leaky_relu (TReLU) by itself only when relu is "
                f"the network's one main-path activation; this network also has "
                f"{', '.join(sorted(names - {'relu'}))}, and TAT solves leaky_relu alone. "
                "Pass activation='leaky_relu' (every main-path activation becomes TReLU), "
                "another smooth activation (e.g. activation='gelu'), or method='DKS'",
                node=first, op="activation")
    report.options["activation_used"] = activation
    g, rec = substitute_activations(g, activation, gates, copy=False)
    _merge(report, rec)
    if preactivation_shortcuts:
        g, rec = move_shortcuts_to_preactivation(g, copy=False)
        _merge(report, rec)

    from graphshape.passes.subnetworks import is_attention_call, selects_attention_output

    max_pools, opaque, weighted, signals = [], [], [], _signals(g)
    # (what only computes attention logits -- masked_fill, a scale from the head size --
    # sets the softmax's weights, which the maximizing function does not see; one holding
    # weights is still named: shaping leaves them as they are)
    only_logits = attention_logits(g, only=True)
    for node in g:
        if node.op == "opaque" and node.name in signals and may_hold_signal(node) \
                and not is_attention_call(node) and not selects_attention_output(g, node) \
                and node.meta.get("input_entry") is None \
                and not moves_data_only(node) \
                and (node.name not in only_logits or _holds_weights(node)):
            # (opaque nodes computing Python values or sizes -- x.size(), an ONNX Shape --
            # or constants carry no signal and need no kernel rule; nor does one that only
            # shapes the output, unless it is a layer with weights, which shaping leaves
            # as they are; attention calls get their own warning below)
            weights = _holds_weights(node)
            if weights or not ends_the_network(g, node.name):
                opaque.append(f"{node.name!r} ({node.attrs.get('description', '?')})")
            if weights:
                weighted.append(node)
        elif node.op in MAX_POOL_OPS:
            max_pools.append(node.name)
    shown_opaque = ", ".join(opaque[:3]) + (" ..." if len(opaque) > 3 else "")
    if opaque:
        report.warnings.append(
            f"{len(opaque)} opaque node(s) without a kernel rule ({shown_opaque}): the "
            "solved parameters ignore what they do"
            + (f"; {len(weighted)} of them ({_some([n.name for n in weighted])}) hold weights, "
               "which shaping leaves as they are (not re-initialized)" if weighted else "")
            + ("; a torch.nn.utils.parametrize parametrization other than weight_norm / "
               "spectral_norm keeps its layer opaque: remove_parametrizations(layer, "
               "'weight') to shape it" if any("Parametrized" in str(n.attrs.get("description"))
                                             for n in weighted) else ""))
    scaled = _constant_scales(g)
    if scaled:
        shown = ", ".join(f"{n!r} (rms {rms:.2g})" for n, rms in scaled[:3])
        report.warnings.append(
            f"{len(scaled)} multiplication(s) by constants far from 1 on the signal path "
            f"({shown}{' ...' if len(scaled) > 3 else ''}), e.g. a layer scale that does not "
            "end a residual branch or that another node shares (those that end one are set "
            "to 1): the kernel rules treat them as the identity, so the shaped network's "
            "kernel differs from the one solved for; consider initializing them to 1")
    attention = _attention_nodes(g)
    if attention:
        report.warnings.append(
            f"{len(attention)} attention node(s) ({', '.join(g[n].located for n in attention[:3])}"
            f"{' ...' if len(attention) > 3 else ''}) treated as the identity on the kernel: "
            "DKS/TAT do not cover attention, which averages over tokens and shrinks q at "
            "initialization (vit_b_16 shaped with DKS: q in the residual stream 0.26 after the "
            "first attention sublayer, 0.08 at mid-depth; docs/shaping.md)")
    if max_pools:
        shown = ", ".join(repr(n) for n in max_pools[:3]) + (" ..." if len(max_pools) > 3 else "")
        report.warnings.append(
            f"{len(max_pools)} max pooling node(s) ({shown}) treated as the identity on the "
            "kernel, an approximation (max_pool_to_avg=True replaces them by average pooling)")
    act_names = sorted({n.attrs["name"] for n in g if n.op == "activation"})
    if not act_names:
        report.warnings.append("the model has no activation nodes: nothing to transform")

    try:
        params, smf = solve_activation_params(g, method, zeta=zeta, eta=eta, tau=tau)
    except GraphshapeError as e:
        if not opaque:
            raise
        # the solve counts each opaque node as a layer of unknown effect: say so beside the
        # solver's own advice, which assumes it read the whole network
        raise GraphshapeError(
            f"{e} -- note: {len(opaque)} opaque node(s) on the signal path "
            f"({shown_opaque}) have no kernel rule, so the network solved for is not the "
            "whole model; if one of them is a layer or an activation (a custom op, a "
            "runtime's fused op), shape the model in a form written with standard ops (as "
            "exported, before a runtime optimized it)",
            node=e.node, op=e.op) from None
    report.subnetworks = list(getattr(smf, "subnetworks", []))
    report.activation_params = params
    if params:
        g, rec = inject_transforms(g, params, copy=False)
        _merge(report, rec)
        _merge(report, drop_scales_after_transforms(g))
    for node in g:
        if "commuted_with_max_pool" in node.meta and not commutes_with_max_pool(node):
            raise GraphshapeError(
                f"the solved transform of {node.attrs.get('name')!r} decreases somewhere, so "
                f"max pool {node.meta['commuted_with_max_pool']!r} cannot run before it; "
                "pass preactivation_shortcuts=False", node=node.name, op=node.op)

    from graphshape.passes.subnetworks import stacked_activations

    stacked = stacked_activations(g)
    if stacked and method != "untransformed":
        first = next(iter(stacked))
        report.warnings.append(
            f"{len(stacked)} activation(s) (first {first!r}, after {stacked[first]!r}) read "
            "another activation's output with no conv/linear layer between (a pre-activation "
            "stem: act -> pool -> act): that input is not Gaussian, so the C maps DKS/TAT "
            "compose there, and the analysis's predictions, are approximate")
    nongaussian = find_nongaussian_activations(g)
    if nongaussian:
        report.warnings.append(
            f"{len(nongaussian)} activation(s) (first {nongaussian[0]!r}) read a residual join "
            "whose identity shortcut carries another activation's output, which has non-zero "
            "mean under this transform (V1 ResNet pattern): that input is not Gaussian, so "
            "the kernel rules under-predict q there and the error grows block after block. "
            "Use preactivation_shortcuts=True (the default under TAT), method='DKS' (its "
            "phi_hat has zero mean) or shortcut_weight=0; see docs/shaping.md")

    if initialize:
        from graphshape.init import initialize as init_pass

        # layers that compute a constant (no model input reaches them) keep their weights
        signals = _signals(g)
        g, init_report = init_pass(g, seed, copy=False,
                                   skip=[n.name for n in g if n.name not in signals])
        report.initialized = len(init_report.records)
        if init_report.kept_shared:
            kept = init_report.kept_shared
            report.warnings.append(
                f"{len(kept)} layer(s) share their weight with a module or function that "
                f"shaping does not re-initialize ({_some([k['node'] for k in kept])}: "
                f"{_some(sorted({k['tensor'] for k in kept}))}): their weights are left as they "
                "are, still shared, and the kernel rules assume them re-initialized")
    # copy what is still shared: with copy=True a weight tied to another node's parameter
    # that init did not replace; with copy=False every parameter no pass replaced
    shared_ids = {id(a) for a in shared}
    copies: dict[int, np.ndarray] = {}  # one copy of an array several nodes hold
    for node in g:
        for key, value in node.params.items():
            if id(value) in shared_ids:
                if id(value) not in copies:
                    copies[id(value)] = np.array(value, copy=True)
                node.params[key] = copies[id(value)]
    if starting:  # (after the draws: the gates' input layers start at zero)
        _merge(report, start_gates_at_one(g, starting, zero_layers=initialize))
    if fold_scales != "none":
        from graphshape.passes.fold import fold_scales as fold_pass

        g, rec = fold_pass(g, mode=fold_scales, copy=False)
        _merge(report, rec)
    g.meta["graphshape"] = report.to_dict()
    g.validate()
    leftover = [n.name for n in g if n.op in NORM_OPS]
    if leftover:  # pragma: no cover - remove_normalization removes them all
        raise GraphshapeError(f"normalization nodes left after shaping: {leftover}")
    return g, report
