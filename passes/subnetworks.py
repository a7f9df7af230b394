"""Subnetworks of a graph and its subnetwork maximizing function, derived from the IR alone.

DKS/TAT (``DESIGN.md`` §1, "Subnetworks") need ``M(x, r)``: the maximum, over the set S(f) of
subnetworks of the network f, of the subnetwork's composed map at ``x`` where every nonlinear
layer applies the scalar function ``r``. dks users write M by hand; here it is derived:

* **signals** are the values that depend on a model input (everything else is a constant);
* a **join** is a ``sum`` node, an ``add``/``sub`` node with two signal inputs, or a ``concat``
  with two or more signal inputs;
* the **fork** of a join is its immediate dominator in the dataflow graph (computed with
  ``networkx.immediate_dominators`` from a virtual root feeding every model input);
* a **branch** is the part of the graph between the fork and one join input: the nodes that
  descend from the fork and lead to that input. Fed ``x`` at the fork, it is a network of its own.

S(f) is f plus every branch of every join. The DKS definition is recursive (the branches of
the joins inside a branch, and so on), but the fork dominates every node of its branches, so
the joins inside a branch and their forks are joins and forks of f too: the flat set over all
joins of f is the same set. Branches without any nonlinear layer (identity and projection
shortcuts) compose to the identity map; they are left out of S(f), as in dks's hand-written
functions (a linear subnetwork has nothing to shape). A branch through a softmax, a product
of two signals or an opaque call (attention) is not a shortcut either; an opaque call that
only moves entries (``torch.roll``, ``x.reshape_as(y)``: flagged data movement) is linear.

Composition rules on the scalar ``x`` (an entry of the kernel: a c value, a slope, ...):
nonlinear layers (``activation`` nodes) apply ``r``; joins average their inputs with kernel
weights that sum to 1 (normalized sum ``sum w_i x_i`` with ``sum w_i^2 = 1``: weights ``w_i^2``;
concat: ``n_i / N`` by channel count); products of two signals multiply (``mul``, ``div``,
``matmul``: the c of a product of independent signals is the product of their c values), except
that a factor computed by a softmax (through reshapes, transposes, dropout, or the linear
layers of CaiT's talking heads) is a set of mixing weights, not a signal. A ``matmul`` or
``mul`` by them is the identity on the other factor's kernel:

* attention's ``softmax(q kᵀ) v`` averages the tokens of ``v`` with convex weights, which is
  treated like average pooling (the same map the PyTorch frontend gives an opaque attention
  call, so a model and its ONNX export get the same M);
* split attention (ResNeSt, SKNet: ``sum_i softmax(z)_i * x_i`` over the radix or kernel
  axis) averages the paths the same way. Even without the sum, an elementwise product by
  positive weights ``g`` has ``c = c_g * c_x``, and positive weights have ``c_g`` near 1.
  Measured at initialization in TAT-shaped resnest14d and skresnet18
  (``benchmarks/split_attention_c.py``): the softmax weights have c >= 0.997, and c from
  the paths to their weighted sum moves by at most 0.027 (-0.007 to +0.027), where the
  product ``c * r(c)`` predicted drops of 0.007 to 0.08.

Every other op (affine layers, pooling, reshapes, normalization, ops with a constant operand)
is the identity on ``x``.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import networkx as nx
import numpy as np

from graphshape.errors import GraphshapeError
from graphshape.ir import Graph, Ref, may_hold_signal, moves_data_only
from graphshape.ops import spec

#: key of the virtual root node added to the dataflow graph before computing dominators
_ROOT = ("__graphshape_root__",)

_SUM_LIKE = ("sum", "add", "sub")
_PRODUCT_OPS = ("mul", "div", "matmul")


def signal_nodes(graph: Graph) -> set[str]:
    """Names of the nodes whose outputs depend on a model input: the inputs, and every node
    with a signal input whose output is a floating-point tensor (or of unknown dtype).
    Integer and object values computed from inputs (``x.size(0)``, argmax indices) and
    tensors made from an input's shape alone (``x.new_empty(...)``, ``torch.zeros_like(x)``,
    flagged shape_computation) are not signals."""
    found: set[str] = set(graph.inputs)
    for node in graph:
        if node.name in found:
            continue
        if not may_hold_signal(node) or "shape_computation" in node.meta.get("flags", ()):
            continue  # (x.new_empty(...), torch.zeros_like(x): made from x's shape only)
        if any(ref.node in found for ref in node.inputs):
            found.add(node.name)
    return found


#: bounded activations that, as a network's last op, link its output to the loss (a
#: probability, a bounded image) rather than form a hidden layer
OUTPUT_LINKS = ("sigmoid", "tanh", "hardsigmoid", "hardtanh", "softsign")


def find_output_links(graph: Graph) -> list[str]:
    """Activation nodes of :data:`OUTPUT_LINKS` whose value reaches the model's outputs
    through data movement only (reshapes, squeezes, dropout...): a GAN discriminator's
    final sigmoid, a generator's final tanh. Like a classifier's softmax, they belong to the
    output, not to the network whose kernel DKS/TAT shape: the maximizing function skips
    them and shaping leaves them as they are (a transformed sigmoid is no probability)."""
    return [node.name for node in graph
            if node.op == "activation" and node.attrs.get("name") in OUTPUT_LINKS
            and ends_the_network(graph, node.name)]


def ends_the_network(graph: Graph, name: str) -> bool:
    """Whether node ``name``'s value reaches the model's outputs, and nothing else, through
    data movement only (reshapes, squeezes, dropout...)."""
    frontier, seen, reaches_output = [name], set(), False
    while frontier:
        for user in graph.users(frontier.pop()):
            if user.op == "output":
                reaches_output = True
            elif spec(user.op).category != "shape":
                return False
            elif user.name not in seen:
                seen.add(user.name)
                frontier.append(user.name)
    return reaches_output


def is_join(graph: Graph, name: str, signals: set[str] | None = None) -> bool:
    """Whether node ``name`` joins two or more signals (see the module docstring)."""
    node = graph[name]
    if node.op not in (*_SUM_LIKE, "concat"):
        return False
    signals = signal_nodes(graph) if signals is None else signals
    n_signal = sum(1 for ref in node.inputs if ref.node in signals)
    return n_signal >= 2


@dataclass
class Join:
    """One join: ``node`` (name), ``fork`` (its immediate dominator, None for the virtual root
    when the join's inputs meet only at the model inputs), ``inputs`` (its signal inputs, in
    slot order), ``slots`` (their input slots on the node), ``branches`` (node names of the
    branch leading to each signal input, topological order; the fork itself excluded),
    ``nonlinear`` (per branch: whether it holds a nonlinear layer: an activation, softmax,
    product of two signals or opaque call), ``shortcut`` (the position in
    ``inputs`` of the shortcut of a residual join, else None), ``correlated`` (whether two
    of its inputs share a source, :func:`signal_sources`: they are computed from the same
    value with no layer of fresh weights between, as PoolFormer's ``pool(x) - x``; a sum of
    them is not a sum of uncorrelated signals). :attr:`linear_mix`: a correlated join whose
    branches are all linear, a fixed linear filter of one signal."""

    node: str
    op: str
    fork: str | None
    inputs: list[Ref]
    slots: list[int]
    branches: list[list[str]]
    nonlinear: list[bool]
    shortcut: int | None = None
    correlated: bool = False

    @property
    def linear_mix(self) -> bool:
        """A sum of correlated inputs with no nonlinear layer on any branch: ``pool(x) - x``,
        ``x + 0.5 * x``, FastViT's ``mixer(x) - norm(x)`` (two depthwise conv paths that
        share an identity path). It filters one signal; it does not join independent ones."""
        return self.correlated and not any(self.nonlinear) and self.op in _SUM_LIKE


@dataclass
class _Analysis:
    order: list[str]
    index: dict[str, int]
    signals: set[str]
    idom: dict
    joins: list[Join] = field(default_factory=list)


def _analyse(graph: Graph) -> _Analysis:
    order = [n for n in graph.topo_order()]
    index = {n: i for i, n in enumerate(order)}
    signals = signal_nodes(graph)
    dag = nx.DiGraph()
    dag.add_nodes_from(n for n in order if n in signals)
    dag.add_edges_from((u, v) for u, v in graph.nx.edges if u in signals and v in signals)
    dag.add_node(_ROOT)
    dag.add_edges_from((_ROOT, n) for n in graph.inputs)
    idom = nx.immediate_dominators(dag, _ROOT)

    # Ancestor / descendant sets as Python-int bitsets over topological positions: one
    # pass each way, so that a branch (ancestors of a join input that descend from the fork)
    # is two AND operations even for graphs with thousands of joins (DenseNets).
    anc = {}
    for n in order:
        if n not in signals:
            continue
        bits = 0
        for p in graph.nx.predecessors(n):
            if p in signals:
                bits |= anc[p] | (1 << index[p])
        anc[n] = bits
    desc = {}
    for n in reversed(order):
        if n not in signals:
            continue
        bits = 0
        for s in graph.nx.successors(n):
            if s in signals:
                bits |= desc[s] | (1 << index[s])
        desc[n] = bits
    all_signals = 0
    for n in signals:
        all_signals |= 1 << index[n]

    logits = attention_logits(graph, only=True)
    sources = signal_sources(graph, signals)
    result = _Analysis(order, index, signals, idom)
    act_bits = 0  # the nodes that make a branch nonlinear (see _is_nonlinear_layer)
    for n in signals:
        if _is_nonlinear_layer(graph[n], signals):
            act_bits |= 1 << index[n]
    for n in order:
        if n not in signals or not is_join(graph, n, signals):
            continue
        node = graph[n]
        fork = idom[n]
        fork_desc = all_signals if fork == _ROOT else desc[fork]
        inputs, slots, branches, nonlinear = [], [], [], []
        for slot, ref in enumerate(node.inputs):
            if ref.node not in signals:
                continue
            bits = (anc[ref.node] | (1 << index[ref.node])) & fork_desc
            inputs.append(ref)
            slots.append(slot)
            branches.append(_decode(bits, order))
            nonlinear.append(bool(bits & act_bits))
        # (the same value twice, x + x, shares its sources too)
        correlated = any(sources.get(a.node, 0) & sources.get(b.node, 0)
                         for i, a in enumerate(inputs) for b in inputs[i + 1:])
        shortcut = None
        if (node.op in _SUM_LIKE and len(inputs) == 2 and nonlinear.count(False) == 1
                and not _broadcasts(graph, node, inputs) and n not in logits):
            # residual join: one identity/projection shortcut (no nonlinear layer between the
            # fork and the join) and one branch that holds the nonlinear layers. Not a sum
            # of attention logits (botnet's q kᵀ * scale + a relative-position term linear
            # in q): its scale is not a branch's layer scale, nor its terms a skip.
            shortcut = nonlinear.index(False)
        result.joins.append(Join(n, node.op, None if fork == _ROOT else fork, inputs, slots,
                                 branches, nonlinear, shortcut, correlated))
    return result


def _broadcasts(graph: Graph, node, inputs: Sequence[Ref]) -> bool:
    """Whether an input of ``node`` has a (known) shape other than its output's: an add that
    broadcasts (mvit's decomposed relative-position terms, ``(.., 1, 7, 7) + (.., 8, 1, 1)``)
    is not a residual connection, and dropping one of its inputs would change the shape."""
    out = node.shape
    if out is None:
        return False

    def differs(shape) -> bool:  # symbolic dims ("N", "unk__3") may differ only in name
        return shape is not None and (len(shape) != len(out) or any(
            isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(shape, out)))

    return any(differs(graph.info(ref).shape) for ref in inputs)


def _is_nonlinear_layer(node, signals: set[str]) -> bool:
    """Whether a branch through ``node`` cannot be an identity or projection shortcut: an
    activation, a softmax, a product of two signals, or an opaque call on a signal (a
    transformer's attention from PyTorch: ``nn.MultiheadAttention``, swin's attention
    function). Without the last three, a pre-norm transformer's attention sublayer
    (``x + attn(norm(x))``) had no nonlinear branch: its join got equal weights and
    ``shortcut_weight=0`` kept its skip."""
    if node.meta.get("input_entry") is not None:  # batch["image"]: the model's input
        return False
    if moves_data_only(node):
        return False  # (torch.roll, a crop, x.reshape_as(y): entries moved, a linear map)
    return (node.op in ("activation", "softmax", "log_softmax", "opaque")
            or _is_signal_product(node, signals))


def mixes_heads(node) -> bool:
    """A linear layer or a pointwise (1x1) convolution: on attention logits or weights, the
    talking heads that mix them across heads (CaiT's linear, EfficientFormerV2's conv)."""
    return node.op == "linear" or (node.op == "conv" and all(
        k == 1 for k in node.attrs.get("kernel_shape") or (0,)))


def mixing_weights(graph: Graph, *, gates: bool = True) -> set[str]:
    """Softmax outputs, possibly reshaped (transposes, reshapes, dropout) or mixed across
    heads by a linear layer or 1x1 conv (talking heads): attention's and split attention's
    mixing weights;
    scaled by a constant (a shaped ONNX file's ``Mul(sigmoid(z), 2)``); and the gates that
    start as the constant 1 (meta ``constant_gate``, set by shaping:
    ``passes.shaping.constant_gates``), which are exactly the identity on what they gate
    (``gates=False`` leaves them out).
    A product with one of them averages its other factor over tokens or paths (see the module
    docstring)."""
    found: set[str] = set()
    for node in graph:
        if node.op == "softmax" or (gates and "constant_gate" in node.meta) or (
                (spec(node.op).category == "shape" or mixes_heads(node)
                 or moves_data_only(node)  # (g.expand_as(x))
                 or (node.op in ("mul", "div") and len(node.inputs) == 2
                     and graph[node.inputs[1].node].op == "constant"))
                and node.inputs and node.inputs[0].node in found):
            found.add(node.name)  # linear: CaiT's talking heads mix the weights of the heads
    return found


def is_attention_call(node) -> bool:
    """An opaque call of attention (``nn.MultiheadAttention``,
    ``F.scaled_dot_product_attention``, swin's attention function, ONNX ``Attention``)."""
    return node.op == "opaque" and "attention" in str(node.attrs.get("description", "")).lower()


def selects_attention_output(graph: Graph, node) -> bool:
    """``attn(q, k, v)[0]`` of an opaque attention call that returns a tuple
    (``nn.MultiheadAttention``'s ``(output, weights)``): the attention's output itself, part
    of the call for the kernel rules' warnings."""
    a = node.attrs
    return (node.op == "opaque" and a.get("fx_op") == "call_function"
            and a.get("target") is operator.getitem and len(node.inputs) == 1
            and tuple(a.get("args") or ())[1:] == (0,)
            and is_attention_call(graph[node.inputs[0].node]))


def attention_values(node) -> Ref | None:
    """The value argument of an opaque attention call: ``nn.MultiheadAttention(q, k, v)``,
    ``F.scaled_dot_product_attention(q, k, v)`` (the third argument, or ``value=``). Its
    output averages the values' tokens, so that is the input whose kernel it carries on
    (a decoder's cross-attention reads its query from the decoder, its values from the
    encoder). None for other nodes, or when the values are not a graph value."""
    if not is_attention_call(node):
        return None
    args, kwargs = node.attrs.get("args") or (), node.attrs.get("kwargs") or {}
    value = args[2] if isinstance(args, (tuple, list)) and len(args) > 2 else kwargs.get("value")
    return value if isinstance(value, Ref) else None


#: ops between a value and the softmax of the attention logits it feeds (``softmax(q kᵀ *
#: scale + bias)``: reshapes, scalings, sums, opaque calls such as ``masked_fill``).
#: :func:`_logit_op` adds the layers that mix heads (CaiT's talking heads, a linear layer;
#: EfficientFormerV2's, a 1x1 conv: :func:`mixes_heads`)
LOGIT_OPS = ("reshape", "flatten", "squeeze", "unsqueeze", "transpose", "identity", "dropout",
             "slice", "mul", "div", "add", "sub", "sum", "affine", "opaque")


def _logit_op(node) -> bool:
    return node.op in LOGIT_OPS or mixes_heads(node)


def _counts_as_use(user) -> bool:
    """A use of a value that can carry its signal on (shape computations, ``x.shape``, are
    not: a scale computed from ``x.shape`` does not make ``x`` a logit)."""
    return may_hold_signal(user) and "shape_computation" not in user.meta.get("flags", ())


def used_only_by(graph: Graph, ends: Callable[[Any, set[str]], bool],
                 seeds: Sequence[str] = ()) -> set[str]:
    """``seeds`` and the nodes every use of which ``ends(user, found)`` accepts (``found``:
    the nodes taken so far; users are visited before their inputs)."""
    found = set(seeds)
    for node in reversed(list(graph)):
        if node.name in found:
            continue
        users = [u for u in graph.users(node.name) if _counts_as_use(u)]
        if users and all(ends(u, found) for u in users):
            found.add(node.name)
    return found


def attention_logits(graph: Graph, *, only: bool = False) -> set[str]:
    """Names of the nodes whose output reaches a softmax through :data:`LOGIT_OPS` only:
    attention logits and what computes them (``q kᵀ``, a relative-position term added to
    it). The maximizing function does not see them (softmax weights average their values
    whatever they are). ``only=True``: those whose every use ends in a softmax that way
    (not a value that also carries on elsewhere). Shape computations are not uses."""
    if only:
        return used_only_by(graph, lambda user, found: user.op == "softmax" or (
            user.name in found and _logit_op(user)))
    found: set[str] = set()
    frontier = [n.name for n in graph if n.op == "softmax"]
    while frontier:
        for ref in graph[frontier.pop()].inputs:
            prod = graph[ref.node]
            if ref.node in found or not _counts_as_use(prod):
                continue
            found.add(ref.node)
            if _logit_op(prod):
                frontier.append(ref.node)
    return found


def draws_fresh_weights(node, signals: set[str]) -> bool:
    """Whether ``node`` applies its own random weights to a signal: a conv, transposed conv
    or linear layer (or a matmul by a constant) whose weight is not itself a signal, or an
    attention call that holds its projections (``nn.MultiheadAttention``, swin's attention
    function with its weights passed in, ONNX ``Attention``). At initialization its output
    is, unit by unit and in expectation over those weights, uncorrelated with every value
    not computed from it: what makes the inputs of a residual join uncorrelated. Other
    opaque module calls count as such layers too (their weights are not visible)."""
    n_signal = sum(1 for r in node.inputs if r.node in signals)
    if node.op in ("conv", "conv_transpose", "linear", "matmul"):
        return n_signal == 1 and (node.op == "matmul" or node.inputs[0].node in signals)
    if node.op == "opaque" and not moves_data_only(node):
        if node.attrs.get("fx_op") == "call_module":
            return True
        return is_attention_call(node) and n_signal < len(node.inputs)
    return False


def signal_sources(graph: Graph, signals: set[str] | None = None) -> dict[str, int]:
    """For every signal node, the layers its value is computed from without passing through
    another layer that draws fresh weights (:func:`draws_fresh_weights`), as a bitset: the
    model inputs (and the entries read from a dict input) and those layers are their own
    sources; every other node has the union of its signal inputs' sources. Layers that share
    a weight (a module called twice, tied weights) are one source. Two values with no source in common are uncorrelated at
    initialization (in the sense of :func:`draws_fresh_weights`); two that share one (``x``
    and ``pool(x)``; ``h`` and ``tanh(h)``; ``x`` and ``0.5 * x``) are not. A product by
    mixing weights (:func:`mixing_weights`: attention's softmax, a gate that starts at 1)
    has its other factor's sources."""
    signals = signal_nodes(graph) if signals is None else signals
    mixing = mixing_weights(graph)
    bit_of: dict[Any, int] = {}
    sources: dict[str, int] = {}
    for node in graph:
        if node.name not in signals:
            continue
        if (node.name in graph.inputs or node.meta.get("input_entry") is not None
                or draws_fresh_weights(node, signals)):  # (batch["image"]: a model input)
            weight = node.params.get("weight")
            consts = [r.node for r in node.inputs if r.node not in signals]
            # (a weight passed in as a constant input, an ONNX MatMul's initializer: by name)
            key = (("weight", id(weight)) if weight is not None
                   else ("input", consts[0]) if consts and node.op in ("conv", "conv_transpose",
                                                                         "linear", "matmul")
                   else ("node", node.name))
            sources[node.name] = 1 << bit_of.setdefault(key, len(bit_of))
            continue
        ins = node.inputs
        if node.op in _PRODUCT_OPS and any(r.node in mixing for r in ins):
            # softmax(q kᵀ) @ v averages v's tokens with weights computed from q and k: the
            # values come from v alone (mvitv2's residual pooling adds q to it)
            ins = [r for r in ins if r.node not in mixing]
        bits = 0
        for ref in ins:
            bits |= sources.get(ref.node, 0)
        sources[node.name] = bits
    return sources


def stacked_activations(graph: Graph) -> dict[str, str]:
    """Activations whose input is another activation's output passed on through ops that
    draw no fresh weights and join nothing: pooling, normalization, reshapes, scalings by a
    constant (``relu(bn(max_pool(relu(x))))``, the pre-activation stems of DPN and Xception;
    ``act(act(x))``). Such an input is not Gaussian, as the kernel rules assume of an
    activation's input (a conv / linear layer before it makes it so), and their error there
    is not bounded (measured at width 96: q 0.54x to 1.9x the rule's). Returns
    {activation: the activation before it}. The V1 residual pattern, an activation's output
    reaching another through a sum, is
    :func:`graphshape.passes.shaping.find_nongaussian_activations`."""
    signals = signal_nodes(graph)
    found: dict[str, str] = {}
    for node in graph:
        if node.op != "activation" or not node.inputs:
            continue
        prev = graph[node.inputs[0].node]
        while prev.op != "activation":
            ins = [r for r in prev.inputs if r.node in signals]
            if len(ins) != 1 or not _passes_value_on(prev):
                break
            prev = graph[ins[0].node]
        if prev.op == "activation":
            found[node.name] = prev.name
    return found


def _passes_value_on(node) -> bool:
    """An op of one signal that keeps the shape of its entries' distribution up to an affine
    map (or averages them): what :func:`stacked_activations` looks through."""
    if node.op in ("mul", "div", "affine"):
        return True  # (with one signal input: a scaling by a constant)
    try:
        return spec(node.op).kernel in ("identity", "approx_identity", "norm")
    except Exception:  # (an op unknown to the table)
        return False


def _is_signal_product(node, signals: set[str]) -> bool:
    """A ``mul`` / ``div`` / ``matmul`` of two signals (not a scaling by a constant)."""
    return node.op in _PRODUCT_OPS and sum(r.node in signals for r in node.inputs) >= 2


def _decode(bits: int, order: list[str]) -> list[str]:
    names = []
    i = 0
    while bits:
        if bits & 1:
            names.append(order[i])
        bits >>= 1
        i += 1
    return names


def find_joins(graph: Graph) -> list[Join]:
    """Every join of ``graph`` with its fork, branches and (for residual joins) shortcut."""
    return _analyse(graph).joins


def join_kernel_weights(graph: Graph, join: Join, *, weights: Mapping | None = None,
                        shortcut_weight: float | None = None) -> tuple[list[float], list[str]]:
    """Kernel weights of a join's signal inputs (they sum to 1) and flags explaining them.

    A normalized sum ``sum w_i x_i`` (``sum w_i^2 = 1``) has kernel weights ``w_i^2``; the
    weights are taken, in this order of precedence, from ``weights[join.node]`` (one per signal
    input), from ``shortcut_weight`` for residual joins (shortcut ``w^2``, branch ``1 - w^2``),
    from ``attrs["weights"]`` of ``sum`` nodes, from ``alpha`` of ``add`` / the sign of
    ``sub``; sums whose weights are not normalized are taken as the normalized sum they
    become under shaping (``w_i^2 / sum_j w_j^2``), flagged. Concatenations weigh each input by
    its share ``n_i / N`` of the channels along the concatenation axis.
    """
    node = graph[join.node]
    k = len(join.inputs)
    flags: list[str] = []
    if node.op == "concat":
        axis = node.attrs.get("axis", 1)
        sizes = []
        for ref in join.inputs:
            shape = graph.info(ref).shape
            try:
                size = shape[axis]
            except (TypeError, IndexError):
                size = None
            sizes.append(size if isinstance(size, (int, np.integer)) else None)
        if any(s is None for s in sizes):
            flags.append("approximate: concat with unknown input sizes weighted equally")
            return [1.0 / k] * k, flags
        total = float(sum(sizes))
        return [s / total for s in sizes], flags
    if weights is not None and join.node in weights:
        raw = [float(w) for w in weights[join.node]]
        if len(raw) != k:
            raise GraphshapeError(
                f"weights for join {join.node!r} has {len(raw)} entries, the join has {k} "
                "signal inputs", node=join.node, op=node.op)
    elif shortcut_weight is not None and join.shortcut is not None:
        w = float(shortcut_weight)
        if not 0.0 <= w <= 1.0:
            raise GraphshapeError(f"shortcut_weight must lie in [0, 1], got {w}")
        raw = [np.sqrt(1.0 - w * w)] * k
        raw[join.shortcut] = w
    elif node.op == "sum" and node.attrs.get("weights") is not None:
        all_w = [float(w) for w in node.attrs["weights"]]
        raw = [all_w[s] for s in join.slots]
    elif node.op == "add":
        raw = [1.0, float(node.attrs.get("alpha", 1.0) or 1.0)]
        raw = [raw[min(s, 1)] for s in join.slots]
        flags.append("unweighted add: analysed as the normalized sum with equal weights")
    elif node.op == "sub":
        raw = [1.0, -1.0]
        flags.append("unweighted sub: analysed as the normalized sum with equal weights")
    else:
        raw = [1.0] * k
        flags.append("unweighted sum: analysed as the normalized sum with equal weights")
    squares = [w * w for w in raw]
    total = sum(squares)
    if total <= 0:
        raise GraphshapeError("all weights of this join are zero", node=join.node, op=node.op)
    if abs(total - 1.0) > 1e-9 and not any(f.startswith("unweighted") for f in flags):
        flags.append(f"unnormalized sum (sum of squared weights {total:.4g}): analysed as "
                     "the normalized sum it becomes")
    return [s / total for s in squares], flags


# --------------------------------------------------------------------------- programs
# A subnetwork compiles to a straight-line program over registers; register 0 holds x.
# Instructions: ("r", a) -> r(v[a]); ("mix", ((a, w), ...)) -> sum w v[a];
# ("prod", (a, b, ...)) -> product. Programs are canonical tuples, so equal subnetworks
# (all the residual branches of a ResNet stage, say) are evaluated once.


def _compile(graph: Graph, nodes: Sequence[str], sources: Sequence[str], out: str,
             join_weights: Mapping[str, list[float]], joins_by_node: Mapping[str, Join],
             signals: set[str], mixing: set[str], links: set[str] = frozenset()) -> tuple:
    """``mixing``: :func:`mixing_weights` of ``graph``; ``links``: its
    :func:`find_output_links`, passed through as part of the output."""
    reg: dict[str, int] = {s: 0 for s in sources}
    prog: list[tuple] = []
    for name in nodes:
        node = graph[name]
        refs = [r for r in node.inputs if r.node in reg]
        if not refs:
            continue
        if node.op == "activation" and name not in links:
            prog.append(("r", reg[refs[0].node]))
            reg[name] = len(prog)
        elif name in joins_by_node:
            join = joins_by_node[name]
            mix: dict[int, float] = {}
            for ref, w in zip(join.inputs, join_weights[name]):
                if ref.node in reg:  # inside a branch every signal input is in reg
                    mix[reg[ref.node]] = mix.get(reg[ref.node], 0.0) + w
            if len(mix) == 1:
                reg[name] = next(iter(mix))
            else:
                prog.append(("mix", tuple(sorted(mix.items()))))
                reg[name] = len(prog)
        elif _is_signal_product(node, signals):
            factors = [r for r in refs if r.node not in mixing]
            if len(factors) == 1 and len(refs) == 2 and node.op in ("mul", "matmul"):
                # softmax weights times values: the identity on the values' kernel (see the
                # module docstring)
                reg[name] = reg[factors[0].node]
            else:
                prog.append(("prod", tuple(reg[r.node] for r in refs)))
                reg[name] = len(prog)
        else:
            values = attention_values(node)
            reg[name] = reg[(values if values is not None and values.node in reg
                             else refs[0]).node]
    if out not in reg:
        return ()
    return _prune(prog, reg[out])


def _prune(prog: list[tuple], out: int) -> tuple:
    """Dead-code elimination and renumbering: the canonical form of a program."""
    live = {out}
    for i in range(len(prog), 0, -1):
        if i in live:
            ins = prog[i - 1]
            if ins[0] == "r":
                live.add(ins[1])
            elif ins[0] == "mix":
                live.update(a for a, _ in ins[1])
            else:
                live.update(ins[1])
    new = {0: 0}
    result = []
    for i in range(1, len(prog) + 1):
        if i not in live:
            continue
        ins = prog[i - 1]
        if ins[0] == "r":
            result.append(("r", new[ins[1]]))
        elif ins[0] == "mix":
            result.append(("mix", tuple((new[a], w) for a, w in ins[1])))
        else:
            result.append(("prod", tuple(new[a] for a in ins[1])))
        new[i] = len(result)
    return tuple(result) + (("out", new[out]),)


def _run(prog: tuple, x, r: Callable):
    vals = [x]
    for ins in prog:
        kind = ins[0]
        if kind == "r":
            vals.append(r(vals[ins[1]]))
        elif kind == "mix":
            acc = 0.0
            for a, w in ins[1]:
                acc = acc + w * vals[a]
            vals.append(acc)
        elif kind == "prod":
            acc = 1.0
            for a in ins[1]:
                acc = acc * vals[a]
            vals.append(acc)
        else:  # ("out", register)
            return vals[ins[1]]
    return vals[-1]


class SubnetMaxFunc:
    """``M(x, r)``: callable following dks's ``subnet_max_func(x, r_fn)`` convention.

    Attributes: ``subnetworks`` (one description per distinct subnetwork: "network" or
    "branch <fork> -> <join>[input]"), ``programs`` (their compiled forms), ``joins``,
    ``flags`` (join name -> list of strings explaining how its weights were chosen).
    """

    def __init__(self, programs: list[tuple], descriptions: list[str], joins: list[Join],
                 flags: dict[str, list[str]]):
        self.programs = programs
        self.subnetworks = descriptions
        self.joins = joins
        self.flags = flags

    def __call__(self, x, r: Callable):
        values = [_run(p, x, r) for p in self.programs]
        if any(isinstance(v, np.ndarray) for v in values):
            return functools.reduce(np.maximum, values)
        return max(values)

    def __repr__(self) -> str:
        return (f"<SubnetMaxFunc over {len(self.programs)} distinct subnetworks: "
                f"{', '.join(self.subnetworks[:4])}{' ...' if len(self.programs) > 4 else ''}>")


def subnet_max_func(graph: Graph, weights: Mapping[str, Sequence[float]] | None = None, *,
                    shortcut_weight: float | None = None) -> SubnetMaxFunc:
    """The subnetwork maximizing function of ``graph`` (see the module docstring).

    ``weights``: optional join node name -> weights of its signal inputs (the normalized sum
    ``sum w_i x_i`` they will have), overriding everything else; ``shortcut_weight``: the
    weight w of the shortcut of every residual join (shortcut ``w``, branch ``sqrt(1-w^2)``),
    as dks's ResNet examples take it. Joins without either use their own weights (``sum``
    ``attrs["weights"]``), and unweighted adds count as normalized sums with equal weights
    (flagged in ``.flags``).
    """
    info = _analyse(graph)
    mixing = mixing_weights(graph)  # one pass for every subnetwork's program
    links = set(find_output_links(graph))
    if not graph.inputs:
        raise GraphshapeError("the graph has no input nodes: nothing to analyse")
    joins_by_node = {j.node: j for j in info.joins}
    join_w: dict[str, list[float]] = {}
    flags: dict[str, list[str]] = {}
    for j in info.joins:
        join_w[j.node], flags[j.node] = join_kernel_weights(
            graph, j, weights=weights, shortcut_weight=shortcut_weight)

    programs: list[tuple] = []
    descriptions: list[str] = []
    seen: set[tuple] = set()

    def add(prog, description, always=False):
        if not prog or prog in seen:
            return
        if not always and not any(ins[0] == "r" for ins in prog):
            return  # a linear subnetwork composes to the identity: nothing to shape
        seen.add(prog)
        programs.append(prog)
        descriptions.append(description)

    signal_order = [n for n in info.order if n in info.signals]
    outs = [graph[o].inputs[0].node for o in graph.output_nodes]
    outs = [o for o in outs if o in info.signals]
    if not outs:
        raise GraphshapeError("no model output depends on a model input: nothing to analyse")
    for o in outs:
        add(_compile(graph, signal_order, graph.inputs, o, join_w, joins_by_node, info.signals,
                     mixing, links),
            "network", always=True)

    done: set[tuple[str | None, str]] = set()
    for j in info.joins:
        for ref, branch, nonlinear in zip(j.inputs, j.branches, j.nonlinear):
            key = (j.fork, ref.node)
            if not nonlinear or key in done:
                continue
            done.add(key)
            sources = [j.fork] if j.fork is not None else list(graph.inputs)
            add(_compile(graph, branch, sources, ref.node, join_w, joins_by_node, info.signals,
                         mixing, links),
                f"branch {j.fork or 'inputs'} -> {j.node}[{ref!r}]")
    return SubnetMaxFunc(programs, descriptions, info.joins, flags)
