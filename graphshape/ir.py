"""graphshape's intermediate representation: a dataflow graph over ``networkx.DiGraph``.

A :class:`Graph` holds :class:`Node` objects. Each node has a canonical ``op`` (a key of
:data:`graphshape.ops.OPS`), ``attrs`` (everything needed to emit the op again),
``params`` (named numpy arrays: weights, biases, constant values) and ``outputs`` (one
:class:`TensorInfo` per produced value). A node consumes values through ``inputs``, an
ordered list of :class:`Ref` (producer node name, output index).

The ordered ``Node.inputs`` lists are the source of truth; the networkx graph
(``graph.nx``) mirrors them as edges ``producer -> consumer`` carrying the list of
``(output_index, input_slot)`` pairs, so that users can run any networkx algorithm on it
(dominators, topological sorts, paths). Mutate the graph through :class:`Graph` methods
so that the two stay in step.

This module imports numpy and networkx only.
"""

from __future__ import annotations

import copy as _copy
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import networkx as nx
import numpy as np

from graphshape.errors import GraphshapeError
from graphshape.ops import AFFINE_LAYERS


class Ref(NamedTuple):
    """One value in the graph: output ``index`` of node ``node``."""

    node: str
    index: int = 0

    def __repr__(self) -> str:
        return self.node if self.index == 0 else f"{self.node}:{self.index}"


@dataclass(frozen=True)
class DictOutput:
    """A dict subclass in an output template (Hugging Face's ``ModelOutput``, an
    ``OrderedDict``): ``cls`` and its entries (templates). The torch backend rebuilds it as
    ``cls(**items)``, so a shaped model returns what the source returned (``out.logits``,
    ``out[0]``), where a plain dict would lose both."""

    cls: type
    items: dict


@dataclass
class TensorInfo:
    """Static facts about one value. ``shape`` entries are ints, or None / a string for
    unknown or symbolic dimensions; ``shape`` itself is None when the rank is unknown.
    ``dtype`` is a numpy dtype name ("float32", "int64", ...) or None when unknown;
    values that are not tensors (a Python int from ``x.size(0)``, a tuple) use
    dtype "object"."""

    shape: tuple | None = None
    dtype: str | None = None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    def __repr__(self) -> str:
        if self.shape is None:
            s = "?"
        else:
            s = "x".join("?" if d is None else str(d) for d in self.shape) or "scalar"
        return f"{self.dtype or '?'}[{s}]"


#: ``Node.meta["flags"]`` entry of a node whose value is not a tensor but a tuple / list /
#: dict holding floating-point tensors (an opaque call returning ``(x, thw)``,
#: ``nn.MultiheadAttention``'s ``(output, weights)``, ``Tensor.unbind``). Its dtype is
#: "object", but it carries signals to the ``getitem`` nodes that read it.
TENSOR_CONTAINER = "tensor_container"
#: flag of opaque nodes that only move, copy or zero-pad their input's entries (torch.roll,
#: a crop by computed sizes, F.pad by computed amounts), or average them (an average pool
#: by a computed window): the analysis takes them as the identity on q and c (approximate,
#: as slice, pad and its pools), shaping does not warn of them
DATA_MOVEMENT = "data movement"
#: flag of an opaque node kept for what it does, not its value: a check that raises when the
#: model's inputs do not fit (``torch._assert``: timm's "Input height doesn't match model",
#: graphshape's guards of branches traced for the example inputs' sizes).
#: :meth:`Graph.remove_dead` keeps it while what it reads is computed anyway.
CHECK = "check"


def holds_tensors(node: "Node") -> bool:
    """Whether ``node``'s "object" value holds floating-point tensors (:data:`TENSOR_CONTAINER`)."""
    return TENSOR_CONTAINER in node.meta.get("flags", ())


def moves_data_only(node: "Node") -> bool:
    """Whether ``node`` is an opaque call that only moves its first input's entries
    (:data:`DATA_MOVEMENT`: ``torch.roll``, ``x.expand_as(y)``, ``x.reshape_as(y)``...)."""
    return node.op == "opaque" and DATA_MOVEMENT in node.meta.get("flags", ())


#: dtype prefixes of values that are never signals (sizes, indices, masks, Python objects)
NON_FLOAT_DTYPES = ("int", "uint", "bool", "object")
#: the floating dtypes a ``cast`` node converts between
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def is_non_float(dtype: str | None) -> bool:
    """Whether ``dtype`` is known and not floating point (:data:`NON_FLOAT_DTYPES`)."""
    return (dtype or "").startswith(NON_FLOAT_DTYPES)


def constant_operand(graph: "Graph", node: "Node") -> tuple[int, np.ndarray] | None:
    """(slot of the other operand, constant value) if two-input ``node`` has exactly one
    input that is a ``constant`` node with a value, else None."""
    if len(node.inputs) != 2:
        return None
    kinds = [graph[r.node].op == "constant" for r in node.inputs]
    if kinds.count(True) != 1:
        return None
    value = graph[node.inputs[kinds.index(True)].node].params.get("value")
    if value is None:
        return None
    return kinds.index(False), np.asarray(value)


def may_hold_signal(node: "Node") -> bool:
    """Whether ``node``'s value can carry a signal: a floating-point tensor, a value of
    unknown dtype, or a container of floating-point tensors (:func:`holds_tensors`).
    Integer and object values (``x.size(0)``, argmax indices) cannot."""
    return not is_non_float(node.dtype) or holds_tensors(node)


@dataclass
class Node:
    """One operation. See the module docstring for the meaning of each field.

    ``meta`` holds frontend/pass bookkeeping that is not semantics: ``source`` (the
    original framework node's name), ``flags`` (list of strings the analysis reports),
    and frontend-specific payloads needed to re-emit opaque nodes losslessly.
    """

    name: str
    op: str
    inputs: list[Ref] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: list[TensorInfo] = field(default_factory=lambda: [TensorInfo()])
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def out(self) -> Ref:
        """The node's first (usually only) output."""
        return Ref(self.name, 0)

    @property
    def shape(self) -> tuple | None:
        return self.outputs[0].shape if self.outputs else None

    @property
    def dtype(self) -> str | None:
        return self.outputs[0].dtype if self.outputs else None

    @property
    def located(self) -> str:
        """The quoted name, with the submodule whose forward computed it where the name does
        not say (``'matmul_1' (in stages.2.blocks.1.context_module.main)``: fx names a
        function's or method's node after the call only; ``meta["scope"]``)."""
        scope = self.meta.get("scope")
        return f"{self.name!r} (in {scope})" if scope else repr(self.name)


class Graph:
    """A model as a dataflow graph. ``graph.nx`` is the underlying ``networkx.DiGraph``
    (node key: node name; node attribute ``"node"``: the :class:`Node`).

    ``inputs``: names of the ``input`` nodes, in the model's argument order.
    ``output_nodes``: names of the ``output`` nodes (one input each: the returned
    value), in the model's return order; ``outputs`` lists the values they return.
    ``meta``: model-level facts: ``source`` ("torch" or "onnx"), ``opset``,
    ``ir_version``, names of ONNX inputs/outputs, the torch output structure, etc.
    """

    def __init__(self, meta: dict | None = None):
        self.nx = nx.DiGraph()
        self.inputs: list[str] = []
        self.output_nodes: list[str] = []
        self.meta: dict[str, Any] = dict(meta or {})
        self._order: dict[str, int] = {}  # insertion rank, used to break ties in topo order
        self._next_rank = 0
        self._topo_cache: list[str] | None = None
        self._topo_rank_cache: dict[str, int] | None = None

    # ----------------------------------------------------------------- access
    def __len__(self) -> int:
        return self.nx.number_of_nodes()

    def __contains__(self, name: str) -> bool:
        return name in self.nx

    def __getitem__(self, name: str) -> Node:
        try:
            return self.nx.nodes[name]["node"]
        except KeyError:
            raise GraphshapeError(f"no node named {name!r} in the graph") from None

    def node(self, name: str) -> Node:
        return self[name]

    def __iter__(self) -> Iterator[Node]:
        """Nodes in a deterministic topological order (ties: insertion order)."""
        for name in self.topo_order():
            yield self.nx.nodes[name]["node"]

    @property
    def nodes(self) -> list[Node]:
        return list(self)

    def topo_order(self) -> list[str]:
        if self._topo_cache is None:
            self._topo_rank_cache = None
            try:
                self._topo_cache = list(
                    nx.lexicographical_topological_sort(self.nx, key=self._order.__getitem__)
                )
            except nx.NetworkXUnfeasible:
                cycle = nx.find_cycle(self.nx)
                raise GraphshapeError(
                    "the graph has a cycle through nodes "
                    + " -> ".join(u for u, _ in cycle)
                    + "; graphshape handles acyclic dataflow graphs only"
                ) from None
        return list(self._topo_cache)

    def _topo_rank(self) -> dict[str, int]:
        """Node name -> position in :meth:`topo_order` (cached until the graph changes)."""
        self.topo_order()
        if getattr(self, "_topo_rank_cache", None) is None:
            self._topo_rank_cache = {n: i for i, n in enumerate(self._topo_cache)}
        return self._topo_rank_cache

    @property
    def outputs(self) -> list[Ref]:
        """The values the model returns (the inputs of its ``output`` nodes), in order."""
        return [self[name].inputs[0] for name in self.output_nodes]

    def producer(self, ref: Ref) -> Node:
        return self[ref.node]

    def info(self, ref: Ref) -> TensorInfo:
        node = self[ref.node]
        if ref.index >= len(node.outputs):
            raise GraphshapeError(
                f"node {node.name!r} has {len(node.outputs)} outputs, output {ref.index} was asked for",
                node=node.name, op=node.op)
        return node.outputs[ref.index]

    def users(self, name: str) -> list[Node]:
        """Nodes that consume any output of node ``name`` (topological order)."""
        succ = list(self.nx.successors(name))
        if len(succ) > 1:
            rank = self._topo_rank()
            succ.sort(key=rank.__getitem__)
        return [self.nx.nodes[n]["node"] for n in succ]

    def uses(self, ref: Ref) -> list[tuple[Node, int]]:
        """(consumer, input slot) for every use of value ``ref``."""
        result = []
        for user in self.users(ref.node):
            for slot, r in enumerate(user.inputs):
                if r == ref:
                    result.append((user, slot))
        return result

    def sole_use(self, ref: Ref) -> tuple[Node, int] | None:
        """The one (consumer, input slot) reading value ``ref``; None when it is read more
        than once (an ``output`` node counts as a reader) or not at all."""
        uses = self.uses(Ref(*ref))
        return uses[0] if len(uses) == 1 else None

    def is_output(self, ref_or_name) -> bool:
        """Whether a value (or any output of a node) is returned by the model."""
        if isinstance(ref_or_name, str):
            return any(r.node == ref_or_name for r in self.outputs)
        return Ref(*ref_or_name) in self.outputs

    # ----------------------------------------------------------------- mutation
    def unique_name(self, base: str) -> str:
        if base not in self.nx:
            return base
        i = 1
        while f"{base}_{i}" in self.nx:
            i += 1
        return f"{base}_{i}"

    def add(self, node: Node, *, after: str | None = None) -> Node:
        """Add ``node``; its inputs must already exist. ``after`` only influences the tie
        break of the topological order (the node sorts right after that node)."""
        if node.name in self.nx:
            raise GraphshapeError(f"a node named {node.name!r} already exists")
        for ref in node.inputs:
            if ref.node not in self.nx:
                raise GraphshapeError(
                    f"input {ref!r} of node {node.name!r} does not exist (dangling reference)",
                    node=node.name, op=node.op)
        self.nx.add_node(node.name, node=node)
        if after is not None and after in self._order:
            # fractional ranks keep "right after" without renumbering everything
            rank_after = self._order[after]
            later = [r for r in self._order.values() if r > rank_after]
            nxt = min(later) if later else rank_after + 1
            self._order[node.name] = (rank_after + nxt) / 2
        else:
            self._order[node.name] = self._next_rank
        self._next_rank += 1
        self._link_inputs(node)
        if node.op == "input" and node.name not in self.inputs:
            self.inputs.append(node.name)
        if node.op == "output" and node.name not in self.output_nodes:
            self.output_nodes.append(node.name)
        self._topo_cache = None
        return node

    def _link_inputs(self, node: Node) -> None:
        for slot, ref in enumerate(node.inputs):
            if self.nx.has_edge(ref.node, node.name):
                self.nx.edges[ref.node, node.name]["slots"].append((ref.index, slot))
            else:
                self.nx.add_edge(ref.node, node.name, slots=[(ref.index, slot)])

    def _unlink_inputs(self, node: Node) -> None:
        for ref in set(node.inputs):
            if self.nx.has_edge(ref.node, node.name):
                self.nx.remove_edge(ref.node, node.name)

    def set_inputs(self, name: str, inputs: Iterable[Ref]) -> None:
        node = self[name]
        self._unlink_inputs(node)
        node.inputs = [Ref(*r) for r in inputs]
        for ref in node.inputs:
            if ref.node not in self.nx:
                raise GraphshapeError(f"input {ref!r} of node {name!r} does not exist",
                                      node=name, op=node.op)
        self._link_inputs(node)
        self._topo_cache = None

    def replace_uses(self, old: Ref, new: Ref, *, exclude: Iterable[str] = ()) -> int:
        """Make every consumer of value ``old`` (``output`` nodes included) read
        ``new`` instead: in its ``inputs`` (and the networkx edges) and in any
        :class:`Ref` nested in its ``attrs`` (opaque nodes' ``args``/``kwargs`` templates,
        a reshape's dynamic ``shape`` entries name graph values too, and backends resolve
        them by name). Returns the number of consumers rewritten."""
        old, new = Ref(*old), Ref(*new)
        exclude = set(exclude)
        count = 0
        for user in self.users(old.node):
            if user.name in exclude:
                continue
            if old in user.inputs:
                user.attrs = substitute_ref(user.attrs, old, new)
                self.set_inputs(user.name, [new if r == old else r for r in user.inputs])
                count += 1
        return count

    def remove(self, name: str) -> Node:
        """Remove a node that nothing uses any more."""
        node = self[name]
        if any(True for _ in self.nx.successors(name)):
            users = [u.name for u in self.users(name)]
            raise GraphshapeError(f"cannot remove node {name!r}: still used by {users}",
                                  node=name, op=node.op)
        self.nx.remove_node(name)
        del self._order[name]
        if name in self.inputs:
            self.inputs.remove(name)
        if name in self.output_nodes:
            self.output_nodes.remove(name)
        self._topo_cache = None
        return node

    def remove_unread(self, names: Iterable[str], *, upstream: bool = False) -> list[str]:
        """Remove those of ``names`` still in the graph that nothing reads (the constants a
        removed node alone used); returns the names removed. ``upstream``: then the nodes
        those read, in turn, where nothing else reads them (a constant's reshapes, a
        shape computation), never an input or output node."""
        gone = []
        pending = sorted(set(names))
        while pending:
            name = pending.pop(0)
            if (name in self.nx and not any(True for _ in self.nx.successors(name))
                    and self[name].op not in ("input", "output")):
                inputs = [r.node for r in self[name].inputs]
                self.remove(name)
                gone.append(name)
                if upstream:
                    pending.extend(n for n in inputs if n not in pending)
        return gone

    def bypass(self, name: str, input_slot: int = 0) -> Node:
        """Remove a one-output node, wiring its consumers to its input ``input_slot``."""
        node = self[name]
        self.replace_uses(node.out, node.inputs[input_slot])
        return self.remove(name)

    def remove_dead(self) -> list[str]:
        """Remove nodes from which no graph output is reachable (inputs are kept), except
        :data:`CHECK` nodes whose inputs are computed for the outputs, or from their values'
        sizes (a check would not keep a removed branch alive)."""
        live = set()
        for name in self.output_nodes:
            live.add(name)
            live |= nx.ancestors(self.nx, name)
        for name in [n for n in self.topo_order() if n not in live
                     and CHECK in self[n].meta.get("flags", ())]:
            needed = nx.ancestors(self.nx, name) - live
            if all("shape_computation" in self[n].meta.get("flags", ()) for n in needed):
                live |= needed | {name}
        dead = [n for n in reversed(self.topo_order())
                if n not in live and self[n].op not in ("input", "output")]
        for n in dead:
            self.nx.remove_node(n)
            del self._order[n]
        self._topo_cache = None
        return dead

    def copy(self, *, share: Iterable[Any] = ()) -> "Graph":
        """A deep copy (parameters included): passes never modify their input graph.
        Objects in ``share`` (parameter arrays a caller will replace rather than modify,
        such as weights about to be re-initialized) are shared, not copied."""
        memo = {id(obj): obj for obj in share}
        return _copy.deepcopy(self, memo)

    # ----------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise GraphshapeError if the graph is malformed (dangling refs, cycles,
        unknown ops, edges out of step with ``Node.inputs``)."""
        from graphshape.ops import OPS

        self.topo_order()
        for name in self.nx.nodes:
            node = self[name]
            if node.name != name:
                raise GraphshapeError(f"node stored under {name!r} is named {node.name!r}")
            if node.op not in OPS:
                raise GraphshapeError(f"unknown canonical op {node.op!r}", node=name, op=node.op)
            for ref in node.inputs:
                if ref.node not in self.nx:
                    raise GraphshapeError(f"dangling input {ref!r}", node=name, op=node.op)
                if ref.index >= len(self[ref.node].outputs):
                    raise GraphshapeError(
                        f"input {ref!r} refers to a missing output of {ref.node!r}",
                        node=name, op=node.op)
                if not self.nx.has_edge(ref.node, name):
                    raise GraphshapeError(f"edge {ref.node!r} -> {name!r} missing", node=name)
        for name in self.output_nodes:
            if name not in self.nx or len(self[name].inputs) != 1:
                raise GraphshapeError(f"graph output node {name!r} is missing or malformed")

    # ----------------------------------------------------------------- display
    def table(self, max_rows: int | None = None) -> str:
        """The nodes as a text table: name, op, inputs, output shapes, key attributes."""
        rows = [("node", "op", "inputs", "output", "attrs")]
        for node in self:
            attrs = _short_attrs(node)
            rows.append((node.name, node.op, ", ".join(map(repr, node.inputs)),
                         ", ".join(map(repr, node.outputs)), attrs))
        if max_rows is not None and len(rows) > max_rows + 1:
            rows = rows[: max_rows + 1] + [("...", f"{len(rows) - 1 - max_rows} more", "", "", "")]
        widths = [min(40, max(len(r[i]) for r in rows)) for i in range(4)]
        lines = []
        for i, r in enumerate(rows):
            cells = [(c if len(c) <= w else c[: w - 1] + "…").ljust(w) for c, w in zip(r[:4], widths)]
            lines.append("  ".join(cells) + "  " + r[4])
            if i == 0:
                lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 5)
        outs = ", ".join(map(repr, self.outputs))
        lines.append(f"outputs: {outs}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        src = self.meta.get("source", "?")
        return f"<graphshape.Graph from {src}: {len(self)} nodes, inputs {self.inputs}, outputs {self.outputs}>"

    def count_ops(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self:
            counts[node.op] = counts.get(node.op, 0) + 1
        return counts


def map_template(value, leaf: Callable[[Any], Any],
                 dict_output: Callable[[type, dict], Any] = DictOutput):
    """``value`` (an argument or output template: nested lists, tuples, named tuples,
    dicts, :class:`DictOutput` and slices) with ``leaf(x)`` in place of every leaf ``x``.
    A :class:`Ref` is a leaf, not a tuple to descend into. Each :class:`DictOutput` becomes
    ``dict_output(cls, mapped items)`` (by default a DictOutput again). The one walker over
    templates: frontends, backends and passes pass their own ``leaf``."""
    def walk(v):
        return map_template(v, leaf, dict_output)

    if isinstance(value, Ref):
        return leaf(value)
    if isinstance(value, tuple):
        items = [walk(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [walk(v) for v in value]
    if isinstance(value, dict):
        return {k: walk(v) for k, v in value.items()}
    if isinstance(value, DictOutput):
        return dict_output(value.cls, {k: walk(v) for k, v in value.items.items()})
    if isinstance(value, slice):
        return slice(walk(value.start), walk(value.stop), walk(value.step))
    return leaf(value)


def substitute_ref(value, old: Ref, new: Ref):
    """``value`` (an attribute template) with every ``old`` :class:`Ref` replaced by
    ``new``; other leaves are kept as they are (the same objects)."""
    return map_template(value, lambda v: new if isinstance(v, Ref) and v == old else v)


# id(weight) -> (weakref to it, fingerprint, per-tap squared norms). Reading every weight
# of a ResNet-50 (25.5M floats, a memory-bound pass) would be most of a predicted-only
# analysis; the torch frontend fills this at load time and weights rarely change between
# analyses.
_TAP_CACHE: dict = {}
_TAP_BLOCK = 1 << 14


def weight_tap_norms(w: np.ndarray) -> np.ndarray:
    """Per-tap squared Frobenius norms of a conv weight (out, in, *k) as float64, shape k
    (a linear weight (out, in) has one tap: its squared norm, shape ()).

    Computed in the weight's own dtype by blocks, summed in float64 (relative error ~1e-7,
    no float64 copy), and cached per array. The fingerprint (shape, dtype, data
    address and 64 sampled entries) notices re-initializations and replaced arrays (a change
    of a few single entries in place would not show, and would change the norms
    negligibly)."""
    flat_all = w.reshape(-1)
    step = max(1, flat_all.size // 64)
    fingerprint = (w.shape, w.dtype.str, w.__array_interface__["data"][0],
                   flat_all[::step][:64].tobytes())
    hit = _TAP_CACHE.get(id(w))
    if hit is not None and hit[0]() is w and hit[1] == fingerprint:
        return hit[2]
    data = w if w.dtype in (np.float32, np.float64) else w.astype(np.float32)  # fp16: range
    k = int(np.prod(w.shape[2:])) if w.ndim > 2 else 1
    flat = data.reshape(-1, k)
    # BLAS products over blocks of ~16K entries, summed in float64: one pass over the
    # weight, no float64 copy, and accurate to ~1e-7 (one float32 dot over a whole 512x512x3x3
    # weight errs by ~1e-7 *systematically*, 3e-6 after 30 layers; numpy's einsum, 1e-4)
    rows = max(1, _TAP_BLOCK // k)
    taps = np.zeros(k, dtype=np.float64)
    with np.errstate(over="ignore"):  # huge float32 entries: redone in float64 below
        if k == 1:
            v = flat[:, 0]
            taps[0] = sum(float(np.dot(v[i:i + rows], v[i:i + rows]))
                          for i in range(0, v.size, rows))
        else:
            for i in range(0, flat.shape[0], rows):
                block = flat[i:i + rows]
                taps += (block.T @ block).diagonal()
    if not np.all(np.isfinite(taps)) and data.dtype != np.float64:
        # a block's float32 sum of squares overflowed (entries ~1e19 and up): float64 has
        # the range (infinite or NaN weights stay infinite or NaN)
        taps = np.square(flat, dtype=np.float64).sum(axis=0)
    taps = taps.reshape(w.shape[2:])
    try:
        ref = weakref.ref(w)
    except TypeError:  # pragma: no cover - views of some buffers cannot be weakly referenced
        return taps
    if len(_TAP_CACHE) > 4096:
        _TAP_CACHE.clear()
    _TAP_CACHE[id(w)] = (ref, fingerprint, taps)
    return taps


def cache_weight_tap_norms(graph: "Graph") -> None:
    """Compute (and cache, see :func:`weight_tap_norms`) the per-tap weight norms of every
    conv and linear layer now, while loading: the analysis needs them, and reading all
    weights (25.5M floats for ResNet-50, ~15-25 ms) would otherwise be most of the first
    predicted-only analysis. Both frontends call it unless told the weights are about to
    be replaced."""
    for data in graph.nx.nodes.values():  # any order: no topological sort needed
        node = data["node"]
        if node.op in AFFINE_LAYERS:
            w = node.params.get("weight")
            if isinstance(w, np.ndarray) and w.dtype.kind == "f" and w.ndim >= 2:
                weight_tap_norms(w)


def _short_attrs(node: Node) -> str:
    parts = []
    for k, v in node.attrs.items():
        if k.startswith("_"):
            continue
        s = repr(v)
        if len(s) > 30:
            s = s[:27] + "..."
        parts.append(f"{k}={s}")
    for k, v in node.params.items():
        parts.append(f"{k}:{tuple(np.shape(v))}")
    s = " ".join(parts)
    return s if len(s) <= 80 else s[:77] + "..."
