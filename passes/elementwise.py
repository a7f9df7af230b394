"""Hand-written activations (and norms) read as one node.

Models and exporters often spell an activation out: ``x * torch.sigmoid(x)`` (SiLU),
``0.5 * x * (1 + torch.erf(x / math.sqrt(2)))`` (GELU), ``x * torch.tanh(F.softplus(x))``
(Mish), ``x * F.relu6(x + 3) / 6`` (hard swish), the GPT-2 tanh GELU with ``x ** 3``,
ONNX exports below the opset that has the op. Left as they are, the arithmetic reads as
a gate (a nonlinearity multiplying another signal) or a product of two signals, which
DKS/TAT refuse, and none of it is an activation the maximizing function knows.

:func:`fuse_activation_decompositions` finds every *single-input elementwise region*: ops
that act value by value (add, sub, mul, div, activations, and the opaque elementwise
functions in :data:`TORCH_ELEMENTWISE` / :data:`ONNX_ELEMENTWISE`) whose inputs are one
value ``x``, each other, and scalar constants, with one value ``y`` leaving the region.
``y`` is then a scalar function ``f(x)``. It is evaluated on a grid of points and compared
with the activations of :data:`FUSABLE` (at their default attributes; a leaky ReLU's slope
and an ELU's alpha are read off ``f``, and so is the ``b`` of ``x * sigmoid(b x)``,
CLIP's QuickGELU, read as ``silu(b x) / b``); a match within :data:`TOLERANCE` replaces the
region by one activation node named as ``y`` was. Matching the values, not the spelling,
covers every association order and constant form (``/ sqrt(2)`` or ``* 0.7071...``).
Regions of one node are left alone (they are already what they are), and so is anything
that matches no listed activation.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any

import numpy as np

from graphshape import activations
from graphshape.ir import Graph, Node, Ref, TensorInfo, is_non_float, map_template

#: activations a region may be read as: the ones models spell out. Not ``square`` or
#: ``erf``: ``(x - mean) ** 2`` in a hand-written norm is not a main-path activation.
FUSABLE = ("relu", "silu", "gelu_exact", "gelu", "mish", "hardswish", "hardsigmoid",
           "sigmoid", "tanh", "softplus", "selu", "elu", "relu6", "leaky_relu", "softsign",
           "squared_relu")

#: largest |f - activation| / max(1, |activation|) on the grid for a match: room for
#: float32 constants (1.0507 * elu(x) with the scale rounded is 6e-8 off, relatively),
#: where the closest two candidates (tanh-approximated and exact GELU) differ by 2e-4
TOLERANCE = 1e-6

#: the same for a region in half precision (an fp16 / bf16 ONNX file's spelled-out GELU,
#: its constants rounded: sqrt(2) is 1.4140625; measured 3e-5 and 3.4e-4 off): one unit in
#: the last place, and half of one for bf16 (QuickGELU is 0.011 off the exact GELU).
#: Within it the two GELUs are both candidates: the closer one is taken
HALF_TOLERANCE = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -8}

#: points where f is compared: dense over [-8, 8] (every kink of the candidates is in
#: [-3, 6]), and a few far out, where tails tell softplus from relu
GRID = np.concatenate([np.linspace(-8.0, 8.0, 1601), [-30.0, -15.0, 15.0, 30.0]])

#: the most nodes one region may hold (decompositions have < 15)
MAX_REGION = 24

_ARITHMETIC = {"add", "sub", "mul", "div"}

#: torch functions (fx call_function targets) and Tensor methods that act elementwise and
#: may appear in a spelled-out activation, evaluated by calling them
TORCH_ELEMENTWISE = {
    operator.pow, operator.neg, operator.gt, operator.ge, operator.lt, operator.le,
    "torch.pow", "torch.neg", "torch.exp", "torch.log", "torch.log1p", "torch.expm1",
    "torch.abs", "torch.sqrt", "torch.rsqrt", "torch.reciprocal", "torch.clamp", "torch.clip",
    "torch.clamp_min", "torch.clamp_max", "torch.maximum", "torch.minimum", "torch.where",
    "torch.zeros_like", "torch.ones_like", "torch.full_like",
}
TORCH_ELEMENTWISE_METHODS = {"pow", "neg", "exp", "log", "log1p", "expm1", "abs", "sqrt",
                             "rsqrt", "reciprocal", "clamp", "clip", "clamp_min", "clamp_max",
                             "maximum", "minimum", "gt", "ge", "lt", "le"}

#: ONNX ops (opaque in the IR) that act elementwise, as numpy functions of their inputs
ONNX_ELEMENTWISE = {
    "Pow": np.power, "Neg": np.negative, "Exp": np.exp, "Log": np.log, "Abs": np.abs,
    "Sqrt": np.sqrt, "Reciprocal": np.reciprocal, "Where": np.where,
    "Max": lambda *xs: functools.reduce(np.maximum, xs),
    "Min": lambda *xs: functools.reduce(np.minimum, xs),
    "Greater": np.greater, "GreaterOrEqual": np.greater_equal, "Less": np.less,
    "LessOrEqual": np.less_equal,
}


def _torch_name(target) -> Any:
    """An ``operator`` function itself, ``"torch.exp"`` for torch's own functions, None
    for anything else."""
    if getattr(target, "__module__", None) in ("_operator", "operator"):
        return target
    if getattr(target, "__module__", None) == "torch":
        return f"torch.{getattr(target, '__name__', '')}"
    return None


def _scalar(graph: Graph, ref: Ref) -> float | None:
    """The value of a fixed one-element constant; None for anything else. A trainable one
    (Swish's learnable beta in ``x * sigmoid(beta * x)``) is not fixed: the region it
    enters is not one activation once it trains, and fusing would drop the parameter. (A
    0-d buffer is fixed: the torch backend writes it as a number too.)"""
    node = graph[ref.node]
    fixed = node.op == "constant" and not node.attrs.get("trainable")
    value = node.params.get("value") if fixed else None
    if isinstance(value, np.ndarray) and value.size == 1 and (
            value.dtype.kind in "biuf" or value.dtype.name == "bfloat16"):  # (ml_dtypes')
        return float(value.reshape(-1)[0])
    return None


def _is_elementwise(graph: Graph, node: Node) -> bool:
    """Whether ``node`` acts value by value on its non-scalar inputs (scalar constants
    aside), so that a region of such nodes is a scalar function."""
    a = node.attrs
    if node.op in _ARITHMETIC:
        return True
    if node.op in ("identity", "cast"):  # (casts between float dtypes: values as they are)
        return True
    if node.op == "activation":
        return not (a.get("transform") or a.get("learnable_slope") or node.params)
    if node.op != "opaque":
        return False
    if a.get("framework") == "torch":
        if a.get("fx_op") == "call_function":
            name = _torch_name(a.get("target"))
            return name in TORCH_ELEMENTWISE or (
                name in ("torch.max", "torch.min") and _of_two_tensors(node))
        return a.get("fx_op") == "call_method" and (
            a.get("target") in TORCH_ELEMENTWISE_METHODS
            or (a.get("target") in ("max", "min") and _of_two_tensors(node)))
    if a.get("framework") == "onnx":
        return (a.get("op_type") in ONNX_ELEMENTWISE or a.get("op_type") == "Clip") \
            and a.get("domain") in ("", "ai.onnx")
    return False


def _of_two_tensors(node: Node) -> bool:
    """``torch.max(x, other)`` / ``x.min(other)``, elementwise (GANs' leaky relu
    ``torch.max(x, 0.2 * x)``), not the reduction ``torch.max(x, dim)``: two tensor
    arguments, nothing else."""
    a = node.attrs
    return (len(node.inputs) == 2 and not a.get("kwargs")
            and all(isinstance(v, Ref) for v in a.get("args", ())))


def _signal_inputs(graph: Graph, node: Node) -> list[Ref]:
    if _is_expand(node):  # (its other input is the target shape)
        return node.inputs[:1]
    return [r for r in node.inputs if _scalar(graph, r) is None]


def _is_expand(node: Node) -> bool:
    """An ONNX ``Expand`` or torch ``x.expand(...)`` / ``x.expand_as(y)`` call (opaque)."""
    a = node.attrs
    if node.op != "opaque" or not node.inputs:
        return False
    if a.get("framework") == "onnx":
        return a.get("op_type") == "Expand" and a.get("domain") in ("", "ai.onnx")
    return a.get("fx_op") == "call_method" and a.get("target") in ("expand", "expand_as")


def _broadcasts_to(graph: Graph, node: Node, x: Ref) -> bool:
    """An expand (:func:`_is_expand`) of a value to ``x``'s shape, which the region's
    elementwise ops would broadcast it to anyway (FRN's ``inv_instance_rms(x)
    .expand(x.shape)``, exported as an ``Expand`` to a shape computed from ``x``): its
    output's known dims are ``x``'s, and every reader is arithmetic whose output has
    ``x``'s static dims."""
    src = graph.info(x).shape
    if not _is_expand(node) or src is None:
        return False

    def fits(shape) -> bool:  # x's shape, where either is known
        return shape is not None and len(shape) == len(src) and all(
            a == b or not isinstance(a, int) for a, b in zip(shape, src))

    def same(shape) -> bool:  # x's static dims, static in shape too
        return shape is not None and len(shape) == len(src) and all(
            a == b or not (isinstance(a, int) or isinstance(b, int)) for a, b in zip(shape, src))

    # (the exporter's target shape is computed at run time, so shape inference may not know
    # the expand's dims: its readers, elementwise ops with x, then tell they are x's)
    users = graph.users(node.name)
    return (fits(graph.info(node.out).shape) and bool(users)
            and all(u.op in _ARITHMETIC and same(graph.info(u.out).shape) for u in users))


def pointwise_value(node: Node, args: list) -> np.ndarray | None:
    """The output of an arithmetic, identity / cast or (untransformed) activation node for
    its inputs' values ``args``; None for any other op."""
    a = node.attrs
    if node.op in _ARITHMETIC:
        x, y = args
        if node.op == "add":
            return x + a.get("alpha", 1.0) * y
        return {"sub": np.subtract, "mul": np.multiply, "div": np.divide}[node.op](x, y)
    if node.op in ("identity", "cast"):
        return args[0]
    if node.op == "activation":
        act = activations.get(a["name"])
        attrs = {k: a[k] for k in act.defaults if a.get(k) is not None}
        return np.asarray(act.fn(args[0], **attrs), dtype=float)
    return None


def call_traced(node: Node, leaf) -> Any:
    """An opaque torch node's call (fx ``call_function`` / ``call_method``), each graph
    value among its arguments replaced by ``leaf(ref)``; raises for anything else."""
    import torch

    a = node.attrs

    def value(v):
        return leaf(v) if isinstance(v, Ref) else v

    args, kwargs = map_template(a.get("args", ()), value), map_template(a.get("kwargs", {}), value)
    with torch.no_grad():
        if a.get("fx_op") == "call_method":
            return getattr(args[0], a["target"])(*args[1:], **kwargs)
        if a.get("fx_op") == "call_function":
            return a["target"](*args, **kwargs)
    raise ValueError(f"{node.name!r} is not a traced call")


def _evaluate(graph: Graph, node: Node, values: dict[Ref, np.ndarray]) -> np.ndarray:
    """``node``'s output on the grid, its inputs read from ``values`` (or scalars)."""
    def arg(ref):
        return values[ref] if ref in values else _scalar(graph, ref)

    a = node.attrs
    if node.op in (*_ARITHMETIC, "identity", "cast", "activation"):
        return pointwise_value(node, [arg(r) for r in node.inputs])
    if node.op == "reduce":  # a mean with keepdim (see _mean_axes), or without (_drops_dims)
        return np.mean(arg(node.inputs[0]), axis=tuple(a["axes"]), keepdims=True)
    if node.op == "reshape":  # (one that puts a mean's dims back: _keeps_dims)
        return arg(node.inputs[0])
    # below: comparisons give bool arrays, kept as they are for a where() to read
    if a.get("framework") == "onnx":
        if a["op_type"] == "ReduceL2":  # (in a norm region: see onnx_reduce_l2_axes)
            x = arg(node.inputs[0])
            axes = onnx_reduce_l2_axes(graph, node, np.ndim(x))
            return np.sqrt(np.sum(np.square(x), axis=axes, keepdims=True))
        if a["op_type"] == "Clip":  # bounds as inputs (opset >= 11) or attributes
            bounds = [_onnx_input(node, i) for i in (1, 2)]
            lo, hi = (arg(r) if r is not None else _onnx_attribute(node, k)
                      for r, k in zip(bounds, ("min", "max")))
            return np.clip(arg(node.inputs[0]), lo, hi)
        return ONNX_ELEMENTWISE[a["op_type"]](*(arg(r) for r in node.inputs))
    import torch

    def leaf(ref):
        value = np.asarray(arg(ref))
        return torch.from_numpy(value if value.dtype == bool else value.astype(np.float64))

    return np.asarray(call_traced(node, leaf))


def _mean_axes(node: Node, rank: int | None, keepdims: bool = True) -> tuple[int, ...] | None:
    """The axes of a ``mean(..., keepdim=keepdims)`` of a rank-``rank`` value, as sorted
    non-negative ints; None for any other node."""
    a = node.attrs
    if (node.op != "reduce" or a.get("kind") != "mean" or bool(a.get("keepdims")) != keepdims
            or rank is None or not a.get("axes")):
        return None
    return tuple(sorted(int(ax) % rank for ax in a["axes"]))


#: torch's variance and standard deviation, as functions and Tensor methods: hand-written
#: norms compute their statistic with them as often as with means (``var_mean`` and
#: ``std_mean`` return both, read by ``operator.getitem``)
_MOMENTS = ("var", "std", "var_mean", "std_mean")


def _moment_axes(node: Node, rank: int | None) -> tuple[int, ...] | None:
    """The axes of an opaque ``torch.var`` / ``torch.std`` (function or Tensor method) with
    ``keepdim=True`` over given dims of a rank-``rank`` value, as sorted non-negative ints;
    None for any other node."""
    a = node.attrs
    if node.op != "opaque" or a.get("framework") != "torch" or rank is None:
        return None
    target = a.get("target")
    if a.get("fx_op") == "call_function":
        name = _torch_name(target)
        if name not in tuple(f"torch.{m}" for m in _MOMENTS):
            return None
    elif a.get("fx_op") != "call_method" or target not in _MOMENTS:
        return None
    args, kwargs = tuple(a.get("args") or ()), dict(a.get("kwargs") or {})
    # (input, dim, unbiased, keepdim) or (input, dim, *, correction, keepdim); a bool second
    # argument is the old (input, unbiased): over every dim
    dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], bool) else None)
    keepdim = kwargs.get("keepdim", args[3] if len(args) > 3 else False)
    if keepdim is not True or dim is None:
        return None
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if not dims or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        return None
    return tuple(sorted(d % rank for d in dims))


def _is_moment_item(graph: Graph, node: Node) -> bool:
    """``pair[0]`` or ``pair[1]`` of a ``torch.var_mean`` / ``torch.std_mean`` call."""
    a = node.attrs
    if (node.op != "opaque" or a.get("fx_op") != "call_function"
            or a.get("target") is not operator.getitem or len(node.inputs) != 1):
        return False
    args = tuple(a.get("args") or ())
    source = graph[node.inputs[0].node]
    return (len(args) == 2 and args[1] in (0, 1) and source.op == "opaque"
            and _torch_name(source.attrs.get("target")) in ("torch.var_mean", "torch.std_mean"))


def _l2_normalize(node: Node, rank: int | None) -> tuple[tuple[int], float] | None:
    """``((axis,), eps)`` for an opaque ``F.normalize(x, p=2, dim=axis, eps=eps)`` of a
    rank-``rank`` value (``x / max(||x||, eps)`` along the axis); None for any other node."""
    a = node.attrs
    target = a.get("target")
    if (node.op != "opaque" or a.get("framework") != "torch" or rank is None
            or a.get("fx_op") != "call_function" or getattr(target, "__name__", None) != "normalize"
            or getattr(target, "__module__", None) != "torch.nn.functional"):
        return None
    args, kwargs = tuple(a.get("args") or ()), dict(a.get("kwargs") or {})
    p = kwargs.get("p", args[1] if len(args) > 1 else 2.0)
    dim = kwargs.get("dim", args[2] if len(args) > 2 else 1)
    eps = kwargs.get("eps", args[3] if len(args) > 3 else 1e-12)
    if p != 2 or not isinstance(dim, int) or isinstance(dim, bool) or not isinstance(
            eps, (int, float)) or not eps > 0:
        return None
    return (dim % rank,), float(eps)


def _onnx_attribute(node: Node, name: str, default=None):
    """The value of an attribute of an opaque ONNX node."""
    import onnx

    proto = (node.attrs.get("attributes") or {}).get(name)
    return default if proto is None else onnx.helper.get_attribute_value(proto)


def _onnx_input(node: Node, position: int) -> Ref | None:
    """The input of an opaque ONNX node at its ONNX position (absent optional inputs are not
    in ``node.inputs``), or None."""
    positions = tuple(node.attrs.get("input_positions") or range(len(node.inputs)))
    return node.inputs[positions[position]] if position < len(positions) \
        and positions[position] is not None else None


def is_onnx_norm(graph: Graph, ref: Ref) -> bool:
    """Whether ``ref`` is an ONNX L1 / L2 norm (ReduceL2, ReduceL1, ReduceSumSquare): a Clip
    or Max of one at 0 is F.normalize's guard (its eps rounded to 0 in an fp16 export),
    which is not a ReLU for shaping to transform."""
    node = graph[ref.node] if ref.node in graph else None
    return (node is not None and node.op == "opaque" and node.attrs.get("framework") == "onnx"
            and node.attrs.get("op_type") in ("ReduceL2", "ReduceL1", "ReduceSumSquare"))


def onnx_reduce_l2_axes(graph: Graph, node: Node, rank: int | None) -> tuple[int, ...] | None:
    """The axes of an ONNX ``ReduceL2`` with keepdims (``||x||`` along them: an exported
    ``F.normalize``), as sorted non-negative ints; None for any other node."""
    a = node.attrs
    if (node.op != "opaque" or a.get("framework") != "onnx" or a.get("op_type") != "ReduceL2"
            or a.get("domain") not in ("", "ai.onnx") or rank is None
            or _onnx_attribute(node, "keepdims", 1) != 1):
        return None
    axes = _onnx_attribute(node, "axes")
    ref = _onnx_input(node, 1)
    if axes is None and ref is not None and graph[ref.node].op == "constant":
        axes = np.asarray(graph[ref.node].params.get("value")).reshape(-1).tolist()
    if not axes:
        return None
    return tuple(sorted(int(ax) % rank for ax in axes))


def _statistic_axes(graph: Graph, node: Node, rank: int | None) -> tuple[int, ...] | None:
    """The axes of a mean, variance or standard deviation with keepdim, or of an L2 norm or
    normalization; None for any other node."""
    axes = _mean_axes(node, rank)
    if axes is None:
        axes = _moment_axes(node, rank)
    if axes is None:
        found = _l2_normalize(node, rank)
        axes = found[0] if found is not None else onnx_reduce_l2_axes(graph, node, rank)
    return axes


def _normalizable_axes(axes: tuple[int, ...] | None, rank: int | None) -> bool:
    """The last dims (a layer_norm / rms_norm as it is), or one other axis (channels
    first: read between two transposes)."""
    if axes is None or rank is None:
        return False
    return axes == tuple(range(rank - len(axes), rank)) or len(axes) == 1


def _norm_weight(graph: Graph, node: Node, rank: int | None,
                 axes: tuple[int, ...] | None) -> Ref | None:
    """The constant that ``node`` multiplies by when it is a ``mul`` by a (trainable or
    fixed, non-scalar) constant varying along the normalized ``axes`` only (the trailing
    dims, or one other axis: :func:`_normalizable_axes`): the weight of a hand-written norm
    applied before its division or scale (the Annotated Transformer's ``a_2 * (x - mean) /
    (std + eps)``, denoising-diffusion-pytorch's ``F.normalize(x, dim=1) * g * sqrt(n)``);
    else None."""
    if (node.op != "mul" or len(node.inputs) != 2 or not axes
            or not _normalizable_axes(axes, rank)):
        return None
    for ref in node.inputs:
        const = graph[ref.node]
        value = const.params.get("value") if const.op == "constant" else None
        if value is None or np.asarray(value).dtype.kind != "f" or _scalar(graph, ref) is not None:
            continue
        shape = np.shape(value)
        if len(shape) <= rank and all(d == 1 or rank - len(shape) + i in axes
                                      for i, d in enumerate(shape)):
            return ref
    return None


def _region_value(graph: Graph, x: Ref, sub: list[Node], data: np.ndarray,
                  weights: dict[Ref, np.ndarray] | None = None) -> np.ndarray | None:
    """The value of ``sub``'s last node with ``data`` for ``x`` (and ``weights`` for those
    constants), evaluated node by node; None where an op does not evaluate (then nothing
    in the region can match)."""
    values: dict[Ref, np.ndarray] = {x: data, **(weights or {})}
    try:
        with np.errstate(all="ignore"):
            for node in sub:
                if _is_expand(node):  # (only to x's shape inside a region: _broadcasts_to)
                    values[node.out] = np.broadcast_to(values[node.inputs[0]], data.shape)
                    continue
                values[node.out] = np.asarray(_evaluate(graph, node, values))
    except Exception:  # noqa: BLE001 - an op that does not evaluate: no match
        return None
    return values[sub[-1].out]


#: operator functions a traced size is computed with (``x.shape[1] ** 0.5``), and the ones
#: that scale a tensor by such a size
_SIZE_ARITHMETIC = (operator.pow, operator.mul, operator.truediv, operator.add, operator.sub,
                    operator.floordiv, math.sqrt)
_SCALED_BY_SIZE = (operator.mul, operator.truediv)


def _size_of(graph: Graph, node: Node, x: Ref, axes: tuple[int, ...], sizes: dict) -> str | None:
    """What a traced call computes from ``x``'s shape along the normalized ``axes`` only
    (fixed by the norm: its ``normalized_shape``): ``"shape"`` for ``x.shape`` / ``x.size()``,
    ``"number"`` for ``x.shape[i]`` / ``x.size(i)`` with i in ``axes`` and arithmetic on
    such numbers (``sizes``: the region's nodes of either kind so far); else None. A size
    along another axis (a batch) is not: a norm read with it would keep the traced value."""
    a = node.attrs
    if node.op != "opaque" or a.get("framework") != "torch" or node.dtype != "object":
        return None
    args, rank = a.get("args") or (), graph.info(x).rank

    def axis_of(i):
        return i % rank if isinstance(i, int) and not isinstance(i, bool) and rank else None

    if a.get("fx_op") == "call_method" and a.get("target") == "size" and args[:1] == (x,):
        if len(args) == 1 and not a.get("kwargs"):
            return "shape"
        return "number" if len(args) == 2 and axis_of(args[1]) in axes else None
    if a.get("fx_op") != "call_function":
        return None
    target = a.get("target")
    if target is getattr and args == (x, "shape"):
        return "shape"
    if target is operator.getitem and len(args) == 2 and isinstance(args[0], Ref) \
            and sizes.get(args[0].node) == "shape":
        return "number" if axis_of(args[1]) in axes else None
    if target in _SIZE_ARITHMETIC:
        refs = [v for v in args if isinstance(v, Ref)]
        if refs and all(sizes.get(r.node) == "number" for r in refs) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool)
                for v in args if not isinstance(v, Ref)):
            return "number"
    return None


def _scaled_by_size(node: Node, sizes: dict) -> bool:
    """A traced ``tensor * size`` or ``tensor / size`` (a number of :func:`_size_of`)."""
    a = node.attrs
    args = a.get("args") or ()
    return (node.op == "opaque" and a.get("framework") == "torch"
            and a.get("fx_op") == "call_function" and a.get("target") in _SCALED_BY_SIZE
            and len(args) == 2 and any(isinstance(v, Ref) and sizes.get(v.node) == "number"
                                       for v in args))


def _region(graph: Graph, x: Ref, rank: dict[str, int],
            mean_axes: tuple[int, ...] | None = None) -> list[Node]:
    """The elementwise nodes computed from ``x`` alone (and scalar constants), in
    topological order: grown user by user while every signal input is ``x`` or inside.
    ``mean_axes``: means, variances and standard deviations over exactly these axes may be
    inside too (a norm), a product by a weight along them (:func:`_norm_weight`), and
    sizes of x along them (``F.normalize(x, dim=1) * x.shape[1] ** 0.5``:
    :func:`_size_of`)."""
    x_rank = graph.info(x).rank if mean_axes is not None else None
    sizes: dict[str, str] = {}
    inside: set[Ref] = {x}
    # values of a mean that dropped the normalized dims, until a reshape puts them back as
    # size 1 (torch's dynamo exporter writes torch.var so: ReduceMean(keepdims=0), its
    # scaling, Reshape): only arithmetic with scalars may read them, so that evaluating
    # them with the dims kept (see _evaluate) computes what the graph computes
    dropped: set[Ref] = set()
    region: list[Node] = []
    pending = sorted({u.name for u in graph.users(x.node)}, key=rank.get)
    seen: set[str] = set()
    while pending and len(region) < MAX_REGION:
        name = pending.pop(0)
        if name in seen:
            continue
        seen.add(name)
        node = graph[name]
        signals = _signal_inputs(graph, node)
        weight = _norm_weight(graph, node, x_rank, mean_axes)
        if weight is not None:  # (inside a norm: see _fuse_norm_in)
            signals = [r for r in signals if r != weight]
        size = _size_of(graph, node, x, mean_axes, sizes) if mean_axes is not None else None
        acts = _is_elementwise(graph, node) or _broadcasts_to(graph, node, x) or (
            mean_axes is not None and (_statistic_axes(graph, node, x_rank) == mean_axes
                                       or _is_moment_item(graph, node) or size is not None
                                       or _scaled_by_size(node, sizes)))
        reads_dropped = any(r in dropped for r in signals)
        if mean_axes is not None and not reads_dropped and _drops_dims(graph, node, x, mean_axes):
            acts = True
            dropped.add(node.out)
        elif reads_dropped:
            restores = _keeps_dims(graph, node, x, mean_axes)
            acts = restores or (len(signals) == 1 and _is_elementwise(graph, node))
            if acts and not restores:
                dropped.add(node.out)
        if (not signals or not acts or len(node.outputs) != 1
                or not all(r in inside for r in signals)):
            dropped.discard(node.out)
            continue
        if size is not None:
            sizes[node.name] = size
        region.append(node)
        inside.add(node.out)
        pending = sorted(set(pending) | {u.name for u in graph.users(name)}, key=rank.get)
    return region


def _drops_dims(graph: Graph, node: Node, x: Ref, axes: tuple[int, ...]) -> bool:
    """A mean over ``axes`` of a value of ``x``'s shape, without keepdim."""
    return _mean_axes(node, graph.info(x).rank, keepdims=False) == axes


def _keeps_dims(graph: Graph, node: Node, x: Ref, axes: tuple[int, ...]) -> bool:
    """A reshape from ``x``'s shape without ``axes`` to ``x``'s shape with them as 1."""
    shape = graph.info(x).shape
    if node.op != "reshape" or shape is None or not node.inputs:
        return False
    before, after = graph.info(node.inputs[0]).shape, node.outputs[0].shape
    dropped = tuple(d for i, d in enumerate(shape) if i not in axes)
    kept = tuple(1 if i in axes else d for i, d in enumerate(shape))
    return (before is not None and after is not None and tuple(before) == dropped
            and tuple(after) == kept and None not in kept)


def _closed_subregion(graph: Graph, region: list[Node], y: Node) -> list[Node] | None:
    """The nodes of ``region`` that ``y`` depends on, if none of them but ``y`` is read
    outside them or is a model output; else None."""
    by_name = {n.name: n for n in region}
    chosen, stack = {y.name}, [y]
    while stack:
        for ref in stack.pop().inputs:
            if ref.node in by_name and ref.node not in chosen:
                chosen.add(ref.node)
                stack.append(by_name[ref.node])
    for name in chosen - {y.name}:
        if graph.is_output(name) or any(u.name not in chosen for u in graph.users(name)):
            return None
    return [n for n in region if n.name in chosen]


def _short(value: float) -> float:
    return float(str(np.float32(value)))


def _grid_error(f: np.ndarray, g: np.ndarray) -> float:
    """``max |f - g| / max(1, |g|)`` on GRID: how far region values ``f`` are from an
    activation's values ``g``, compared with a tolerance."""
    return float(np.max(np.abs(f - g) / np.maximum(1.0, np.abs(g))))


def _match(f: np.ndarray, names: tuple[str, ...] = FUSABLE,
           tolerance: float = TOLERANCE) -> tuple[str, dict] | None:
    """The activation of ``names`` closest to ``f`` on GRID, within ``tolerance`` (the
    first of equally close ones), with its attributes."""
    if f.dtype.kind != "f" or not np.all(np.isfinite(f)):
        return None
    best, best_error = None, math.inf
    for name in names:
        act = activations.get(name)
        attrs: dict = {}
        # a slope / alpha read off f, as the shortest decimal of its float32 value (the
        # model's constants are float32 mostly: 0.2, not 0.20000000298)
        if name == "leaky_relu":  # f(x) = slope x for x < 0
            attrs = {"negative_slope": _short(f[GRID == -8.0][0] / -8.0)}
        elif name == "elu":  # f(x) = alpha (e^x - 1) for x < 0
            attrs = {"alpha": _short(f[GRID == -30.0][0] / (math.exp(-30.0) - 1.0))}
        with np.errstate(all="ignore"):
            g = np.asarray(act.fn(GRID, **attrs), dtype=float)
        error = _grid_error(f, g)
        if error <= tolerance and error < best_error:
            # (a slope or alpha of 0 is relu, listed first)
            if name == "leaky_relu" and not 0.0 < attrs["negative_slope"] < 1.0:
                continue
            if name == "elu" and not attrs["alpha"] > 0.0:
                continue
            if name == "elu" and attrs["alpha"] == 1.0:
                attrs = {}
            best, best_error = (name, attrs), error
    return best


#: points next to 0, where a bound of eps (``max(x, 1e-12)``) differs from relu by more
#: than its size: GRID's absolute tolerance does not see it
NEAR_ZERO = np.array([-1e-6, -1e-12, -1e-30, 0.0, 1e-30, 1e-12, 1e-6])


def _same_near_zero(g: Graph, x: Ref, sub: list[Node], name: str, attrs: dict) -> bool:
    """Whether ``sub`` computes activation ``name`` next to 0 too, to a relative 1e-5."""
    f = _region_value(g, x, sub, NEAR_ZERO.copy())
    if f is None:
        return False
    with np.errstate(all="ignore"):
        want = np.asarray(activations.get(name).fn(NEAR_ZERO, **attrs), dtype=float)
    return bool(np.allclose(np.broadcast_to(f, want.shape), want, rtol=1e-5, atol=0.0))


def _match_scaled(f: np.ndarray, tolerance: float = TOLERANCE) -> tuple[str, dict, float] | None:
    """``(name, attrs, c)`` when ``f = c * phi`` for an activation ``phi`` of FUSABLE and a
    positive constant ``c`` other than 1 (NF-Nets' ``gamma * gelu(x)``, as an exporter
    spells it out), else None. ``c`` is read at x = 8, where every candidate is positive."""
    if f.dtype.kind != "f" or not np.all(np.isfinite(f)):
        return None
    at = int(np.flatnonzero(GRID == 8.0)[0])
    for name in FUSABLE:
        with np.errstate(all="ignore"):
            ref = float(np.asarray(activations.get(name).fn(GRID[at:at + 1]),
                                   dtype=float).reshape(-1)[0])
        c = float(f[at]) / ref if ref > 0 else 0.0
        if not c > 0 or abs(c - 1.0) <= tolerance:
            continue
        found = _match(f / c, (name,), tolerance)
        if found is not None:
            return found[0], found[1], _short(c)
    return None


def _match_swish_beta(f: np.ndarray, tolerance: float = TOLERANCE) -> tuple[str, dict] | None:
    """``("silu", {"transform": ...})`` when ``f(x) = x * sigmoid(b x)`` for a constant
    ``b > 0`` other than 1, i.e. ``silu(b x) / b``: CLIP's QuickGELU (b = 1.702), a Swish
    of fixed beta (onnxruntime's QuickGelu op reads the same). ``b`` is read at x = 1,
    where ``f(x) / x = sigmoid(b x)``; the grid then checks the rest."""
    if f.dtype.kind != "f" or not np.all(np.isfinite(f)):
        return None
    at = int(np.argmin(np.abs(GRID - 1.0)))
    p = float(f[at]) / float(GRID[at])
    if not 0.5 < p < 1.0:
        return None
    b = _short(math.log(p / (1.0 - p)) / float(GRID[at]))
    if abs(b - 1.0) <= tolerance:
        return None  # (silu itself: _match's)
    with np.errstate(all="ignore"):
        g = GRID / (1.0 + np.exp(-b * GRID))
    if _grid_error(f, g) > tolerance:
        return None
    return "silu", {"transform": {"input_scale": b, "output_scale": 1.0 / b}}


def _split_already(sub: list[Node], y: Node, name: str, attrs: dict) -> bool:
    """Whether ``sub`` is already ``activation(name) -> y`` (a scale after an activation
    node): left as it is."""
    if len(sub) != 2 or sub[0].op != "activation" or sub[0].attrs.get("name") != name:
        return False
    have = {k: v for k, v in sub[0].attrs.items() if k not in ("name", "inplace")}
    # (a slope read off the values is float32-rounded: 0.0248341675 vs 0.024834167)
    return have.keys() == attrs.keys() and all(
        math.isclose(float(have[k]), float(attrs[k]), rel_tol=1e-6) for k in attrs)


def fuse_activation_decompositions(graph: Graph, *, copy: bool = True) -> tuple[Graph, dict]:
    """Replace every spelled-out activation (see the module docstring) by one activation
    node. Returns the graph (a copy unless ``copy=False``) and ``{"fused": [{"node",
    "activation", "attrs", "replaced"}, ...]}``."""
    g = graph.copy() if copy else graph
    fused: list[dict] = []
    rank = {name: i for i, name in enumerate(g.topo_order())}
    for x_name in list(rank):
        if x_name not in g or g[x_name].op == "constant":
            continue
        for index, info in enumerate(g[x_name].outputs):
            if is_non_float(info.dtype):
                continue  # sizes, indices, masks: no activation acts on them
            x = Ref(x_name, index)
            region = _region(g, x, rank)
            for y in reversed(region):
                sub = _closed_subregion(g, region, y)
                if sub is None or (len(sub) < 2 and sub[0].op != "opaque"):
                    continue  # (one opaque call may be one: torch.maximum(x, zero))
                f = _region_value(g, x, sub, GRID.copy())
                if f is None:
                    break
                f = np.broadcast_to(f, GRID.shape)
                tolerance = HALF_TOLERANCE.get(info.dtype, TOLERANCE)
                # (x * sigmoid(b x) first: QuickGELU is 0.011 off GELU, which a wider
                # half-precision tolerance would take it for)
                found = _match_swish_beta(f, tolerance) or _match(f, FUSABLE, tolerance)
                if found is None:
                    scaled = _match_scaled(f, tolerance)
                    if scaled is None or _split_already(sub, y, scaled[0], scaled[1]):
                        continue
                    _replace_scaled(g, x, sub, y, *scaled)
                    fused.append({"node": y.name, "activation": scaled[0],
                                  "attrs": scaled[1], "scale": scaled[2],
                                  "replaced": [n.name for n in sub]})
                    break
                if y.op == "activation" and {"name": found[0], **found[1]} == {
                        k: v for k, v in y.attrs.items() if k != "inplace"}:
                    break  # y is that activation already: the rest is identities, kept
                if len(sub) == 1 and (not _same_near_zero(g, x, sub, *found)
                                      or is_onnx_norm(g, x)):
                    continue  # a clamp(min=eps) before a division is not a relu
                _replace(g, x, sub, y, *found)
                fused.append({"node": y.name, "activation": found[0], "attrs": found[1],
                              "replaced": [n.name for n in sub]})
                break
    return g, {"fused": fused}


def _replace(g: Graph, x: Ref, sub: list[Node], y: Node, name: str, attrs: dict,
             op: str = "activation", keep: set[str] = frozenset()) -> None:
    """``y`` becomes the activation ``name`` of ``x`` (or the node ``op`` with ``attrs``
    alone when ``name`` is None), its name, output and users kept; the rest of ``sub``
    and the scalar constants only ``sub`` read (not those in ``keep``) are dropped."""
    names = {n.name for n in sub}
    constants = {r.node for n in sub for r in n.inputs
                 if r.node not in names and g[r.node].op == "constant"} - set(keep)
    # an expand's target shape, computed from x at run time (Shape, Gather, Concat...)
    shapes = {r.node for n in sub if _is_expand(n) for r in n.inputs[1:]}
    # (y may have been an opaque call, the ** of relu(x) ** 2: it is not one any more)
    flags = [f for f in y.meta.get("flags", []) if f != "opaque"]
    kept = {k: y.meta[k] for k in ("source_name", "module_path", "scope") if k in y.meta}
    if "module_path" not in kept:
        # y is often a trailing cast (gelu(x.float()).to(dtype)): the emitted module takes
        # the path of the source module the region called (self.act), where there is one
        paths = [n.meta["module_path"] for n in sub if n.meta.get("module_path")]
        if paths:
            kept["module_path"] = paths[-1]
    y.meta = {"flags": flags, "fused_from": [n.name for n in sub], **kept}
    y.op, y.attrs, y.params = op, ({"name": name} if name else {}) | attrs, {}
    g.set_inputs(y.name, [x])
    for node in reversed(sub):
        if node.name != y.name:
            g.remove(node.name)
    state = [g[c] for c in constants if g[c].meta.get("persistent")]
    g.remove_unread(constants)
    # a source buffer (an ONNX file's initializer) the region folded in is still in the
    # source's state_dict: the torch backend keeps it there, unread, so that a source
    # checkpoint loads with strict=True
    g.meta.setdefault("folded_state", []).extend(n for n in state if n.name not in g)
    # now read by nothing: the shape computation, back to what else reads x
    g.remove_unread(shapes, upstream=True)


def _replace_scaled(g: Graph, x: Ref, sub: list[Node], y: Node, name: str, attrs: dict,
                    scale: float) -> None:
    """``y`` becomes ``activation(name)(x) * scale``: a new activation node, and ``y`` a
    ``mul`` by a scalar constant (its name, output and users kept)."""
    info = y.outputs[0]
    act = g.add(Node(g.unique_name(f"{y.name}_act"), "activation", [x],
                     {"name": name, **attrs}, outputs=[TensorInfo(info.shape, info.dtype)]),
                after=x.node)
    dtype = info.dtype if info.dtype and not is_non_float(info.dtype) else "float32"
    const = g.add(Node(g.unique_name(f"{y.name}_scale"), "constant", [], {},
                       {"value": np.asarray(scale, dtype=np.dtype(dtype))},
                       outputs=[TensorInfo((), dtype)]), after=x.node)
    _replace(g, x, sub, y, None, {}, op="mul")
    g.set_inputs(y.name, [act.out, const.out])


#: largest relative difference to a norm on random data for a match (float32 constants)
NORM_TOLERANCE = 1e-5


def fuse_norm_decompositions(graph: Graph, *, copy: bool = True) -> tuple[Graph, dict]:
    """Replace hand-written norms over the trailing dims (or one other axis, read between
    two transposes) by ``layer_norm`` / ``rms_norm`` / ``std_norm`` nodes: ``(x - mean) /
    sqrt(var + eps)`` (BERT-era LayerNorm modules), ``x * rsqrt(mean(x ** 2) + eps)``
    (LLaMA's and T5's RMSNorm), and the forms with ``torch.var`` / ``torch.std`` that are
    neither (an unbiased variance, ``x / sqrt(var + eps)`` as timm's SimpleNorm, ``(x -
    mean) / (std + eps)`` as the Annotated Transformer's LayerNorm), and x-transformers'
    ``F.normalize(x) * sqrt(n)`` (see :func:`_eps_candidates`), in any spelling. Left
    as they are, the division reads as a product of two signals (refused by DKS/TAT) and
    the norm is not removed. A region from ``x`` of elementwise ops and means, variances
    or standard deviations over the same dims (``x``'s shape known) is evaluated on random
    data and compared with each norm, for every scalar constant of the region as ``eps``,
    then again on data whose variance is near that eps (where eps's place matters).
    A scale and shift after it
    (``weight * y + bias``) read parameters, so they are not in the region: they stay
    nodes of their own, which shaping removes with the norm. Returns the graph and
    ``{"fused": [{"node", "op", "attrs", "replaced"}, ...]}``."""
    g = graph.copy() if copy else graph
    fused: list[dict] = []
    rank = {name: i for i, name in enumerate(g.topo_order())}
    rng = np.random.default_rng(0)
    for mean_name in list(rank):
        if mean_name not in g:
            continue
        reduce = g[mean_name]
        if reduce.op not in ("reduce", "opaque") or not reduce.inputs:
            continue
        # the norm's input: the statistic's input, or (RMS norm) what that square was made of
        for x in _norm_input_candidates(g, reduce):
            info = g.info(x)
            axes = _statistic_axes(g, reduce, info.rank)
            if (not _normalizable_axes(axes, info.rank) or info.shape is None
                    or not all(isinstance(info.shape[a], int) and info.shape[a] > 0
                               for a in axes)
                    or is_non_float(info.dtype)):
                continue
            region = _region(g, x, rank, mean_axes=axes)
            if not any(_statistic_axes(g, n, info.rank) is not None for n in region):
                continue
            # a dynamic dim outside the normalized ones (an ONNX file's batch axis "N") is
            # evaluated at 2: the norm's value does not depend on it
            concrete = tuple(d if isinstance(d, int) and d > 0 else 2 for d in info.shape)
            data = rng.standard_normal(concrete) * 2.0 + 0.5
            if _fuse_norm_in(g, x, region, axes, data, fused):
                break
    return g, {"fused": fused}


def _norm_input_candidates(g: Graph, reduce: Node) -> list[Ref]:
    src = reduce.inputs[0]
    out = [src]
    node = g[src.node]
    while node.op == "cast" and node.inputs:  # x.square().float().mean(...) (FRN)
        node = g[node.inputs[0].node]
    if node.op in ("mul", "opaque", "activation") and node.inputs:
        out.append(node.inputs[0])  # x ** 2, x * x, square(x): the RMS norm's input
    return out


def _norm_forms() -> list[tuple[str, dict, Any]]:
    """``(op, attrs, value)`` for every norm a region may compute, ``value(data, axes,
    eps)`` its output: ``layer_norm`` and ``rms_norm`` first, then the ``std_norm`` forms (a
    variance divided by n - 1, x not centred, eps added to the standard deviation)."""
    def layer_norm(data, axes, eps):
        centered = data - data.mean(axis=axes, keepdims=True)
        return centered / np.sqrt(np.mean(centered ** 2, axis=axes, keepdims=True) + eps)

    def rms_norm(data, axes, eps):
        return data / np.sqrt(np.mean(data ** 2, axis=axes, keepdims=True) + eps)

    def std_norm(centre: bool, correction: int, added_to: str):
        def value(data, axes, eps):
            n = int(np.prod([data.shape[a] for a in axes]))
            centered = data - data.mean(axis=axes, keepdims=True)
            var = np.sum(centered ** 2, axis=axes, keepdims=True) / (n - correction)
            divided = centered if centre else data
            if added_to == "std":
                return divided / (np.sqrt(var) + eps)
            if added_to == "clamp":
                return divided / np.sqrt(np.maximum(var, eps))
            return divided / np.sqrt(var + eps)
        return value

    forms: list[tuple[str, dict, Any]] = [("layer_norm", {}, layer_norm),
                                          ("rms_norm", {}, rms_norm)]
    for centre in (True, False):
        for correction in (0, 1):
            for added_to in ("variance", "std", "clamp"):
                if centre and not correction and added_to == "variance":
                    continue  # (that one is layer_norm)
                forms.append(("std_norm", {"centre": centre, "correction": correction,
                                           "eps_added_to": added_to},
                              std_norm(centre, correction, added_to)))
    return forms


def _close(f: np.ndarray | None, want: np.ndarray) -> bool:
    with np.errstate(all="ignore"):
        return bool(f is not None and f.shape == want.shape and np.all(
            np.abs(f - want) / np.maximum(1.0, np.abs(want)) <= NORM_TOLERANCE))


def _lower_bound(node: Node) -> float | None:
    """The lower bound a clamp written as an attribute or keyword applies (``x.clamp(min=
    eps)``, ``torch.clamp_min(x, eps)``, an ONNX Clip before opset 11), else None (a bound
    that is an input is a scalar constant of the region)."""
    a = node.attrs
    if node.op != "opaque":
        return None
    if a.get("framework") == "onnx":
        return _onnx_attribute(node, "min") if a.get("op_type") == "Clip" else None
    name = a.get("target") if a.get("fx_op") == "call_method" else _torch_name(a.get("target"))
    name = str(name).rsplit(".", 1)[-1]
    if name not in ("clamp", "clip", "clamp_min"):
        return None
    args, kwargs = a.get("args") or (), a.get("kwargs") or {}
    bound = kwargs.get("min", args[1] if len(args) > 1 else None)
    return float(bound) if isinstance(bound, (int, float)) and not isinstance(bound, bool) \
        else None


def _eps_candidates(g: Graph, sub: list[Node], rank: int, shape: tuple) -> tuple[list, bool]:
    """The eps values to try for the norm ``sub`` may compute (its scalar constants in
    (0, 1), and the lower bounds in (0, 1) of its clamps: ``var.clamp(min=eps)``, an ONNX
    Clip's attribute), and whether it clamps an L2 norm instead of adding eps.

    x-transformers' RMSNorm, ``F.normalize(x) * sqrt(n)``: ``x * sqrt(n) / max(||x||,
    eps)`` is an RMS norm with eps^2 / n added to the mean square (the same but where ||x||
    is within a few eps of 0). Its export: ReduceL2, Clip(min=eps), Expand, Div, the bound an
    attribute before opset 11. ``F.normalize`` without that scale (cosine attention, an
    embedding) matches no norm."""
    bounds = [v for n in sub if isinstance(v := _lower_bound(n), float) and 0 < v < 1]
    scalars = sorted({v for n in sub for r in n.inputs
                      if (v := _scalar(g, r)) is not None and 0 < v < 1} | set(bounds))
    clamps = [found[1] for n in sub if (found := _l2_normalize(n, rank)) is not None]
    if any(onnx_reduce_l2_axes(g, n, rank) is not None for n in sub):
        clamps += scalars
    if not clamps:
        return scalars, False
    n_elems = int(np.prod(shape))
    return sorted({c * c / n_elems for c in clamps}), True


def _fuse_norm_in(g: Graph, x: Ref, region: list[Node], axes, data, fused) -> bool:
    shape = tuple(data.shape[a] for a in axes)
    forms = _norm_forms()
    expected: dict[tuple[int, float], np.ndarray] = {}  # (the same for every y: computed once)
    rng = np.random.default_rng(1)
    for y in reversed(region):
        if _norm_weight(g, y, data.ndim, axes) is not None:
            continue  # a weight after the norm stays a node of its own: the norm is before
        sub = _closed_subregion(g, region, y)
        if sub is None or not any(_statistic_axes(g, n, data.ndim) is not None for n in sub):
            continue
        inner = [w for n in sub if (w := _norm_weight(g, n, data.ndim, axes)) is not None]
        if len(inner) > 1:
            continue
        # a weight applied before the division, evaluated at random values (its own may be
        # all ones, which would not tell where it acts): the region is weight * norm(x)
        weights = {w: rng.uniform(0.5, 1.5, np.shape(g[w.node].params["value"]))
                   for w in inner}
        gain = weights[inner[0]] if inner else 1.0
        f = _region_value(g, x, sub, data, weights)
        if f is None:
            return False
        if f.shape != data.shape or f.dtype.kind != "f":
            continue
        eps_candidates, clamped = _eps_candidates(g, sub, data.ndim, shape)
        for eps in eps_candidates:
            for i, (op, form, value) in enumerate(forms):
                if not _variance_defined(shape, form) or (clamped and op != "rms_norm"):
                    continue
                if (i, eps) not in expected:
                    expected[i, eps] = value(data, axes, eps)
                if not _close(f, gain * expected[i, eps]):
                    continue
                # where eps matters too (a variance near eps): where it is added, and
                # which of two forms equal on data of unit scale this is (not for a clamp,
                # which differs from an added eps there: see _eps_candidates)
                small = data * math.sqrt(eps)
                if not clamped and not _close(_region_value(g, x, sub, small, weights),
                                              gain * value(small, axes, eps)):
                    continue
                # a variance clamped at eps: also below eps (where no eps at all differs)
                tiny = data * (0.1 * math.sqrt(eps))
                if form.get("eps_added_to") == "clamp" and not _close(
                        _region_value(g, x, sub, tiny, weights), gain * value(tiny, axes, eps)):
                    continue
                attrs = {"normalized_shape": shape, "eps": _short(eps), **form}
                trailing = axes == tuple(range(data.ndim - len(axes), data.ndim))
                if inner:
                    _replace_weighted(g, x, sub, y, op, attrs, inner[0],
                                      None if trailing else axes[0])
                elif trailing:
                    _replace(g, x, sub, y, None, attrs, op=op)
                else:
                    _replace_between_transposes(g, x, sub, y, op, attrs, axes[0])
                fused.append({"node": y.name, "op": op, "attrs": attrs,
                              "replaced": [n.name for n in sub]})
                return True
    return False


def _variance_defined(shape: tuple, form: dict) -> bool:
    """Whether a variance over ``shape`` divided by n - correction is defined (n > 1 for
    an unbiased one)."""
    return int(np.prod(shape)) > form.get("correction", 0)


def _replace_weighted(g: Graph, x: Ref, sub: list[Node], y: Node, op: str, attrs: dict,
                      weight: Ref, axis: int | None = None) -> None:
    """The norm ``op`` of ``x`` as a new node (over ``axis`` between two new transposes
    when it is not the trailing dims: :func:`_transposed_norm`), and ``y`` (its name,
    output and users kept) the product of it and ``weight``, which ``sub`` applied before
    its division or scale."""
    info = y.outputs[0]
    if axis is None:
        normed = g.add(Node(g.unique_name(f"{y.name}.norm"), op, [x], dict(attrs),
                            outputs=[TensorInfo(info.shape, info.dtype)],
                            meta={"flags": [], "fused_from": [n.name for n in sub]}),
                       after=x.node).out
    else:
        norm, back = _transposed_norm(g, x, y, op, attrs, axis, sub)
        normed = g.add(Node(g.unique_name(f"{y.name}.to_first"), "transpose", [norm.out],
                            {"perm": back}, outputs=[TensorInfo(info.shape, info.dtype)],
                            meta={"flags": []})).out
    _replace(g, normed, sub, y, None, {}, op="mul", keep={weight.node})
    g.set_inputs(y.name, [normed, weight])


def _transposed_norm(g: Graph, x: Ref, y: Node, op: str, attrs: dict, axis: int,
                     sub: list[Node]) -> tuple[Node, tuple[int, ...]]:
    """A ``transpose`` of ``x`` putting ``axis`` last and the norm ``op`` over the last dim
    after it, as new nodes: (the norm, the permutation back)."""
    info = g.info(x)
    rank = len(info.shape)
    perm = tuple(i for i in range(rank) if i != axis) + (axis,)
    back = tuple(perm.index(i) for i in range(rank))
    moved = TensorInfo(tuple(info.shape[i] for i in perm), info.dtype)
    to_last = g.add(Node(g.unique_name(f"{y.name}.to_last"), "transpose", [x],
                         {"perm": perm}, outputs=[moved], meta={"flags": []}))
    norm = g.add(Node(g.unique_name(f"{y.name}.norm"), op, [to_last.out], dict(attrs),
                      outputs=[moved], meta={"flags": [], "fused_from": [n.name for n in sub]}))
    return norm, back


def _replace_between_transposes(g: Graph, x: Ref, sub: list[Node], y: Node, op: str,
                                attrs: dict, axis: int) -> None:
    """A norm over one axis that is not the last (ConvNeXt's hand-written channels-first
    LayerNorm): ``transpose`` (``axis`` last), the norm over the last dim, and ``y``
    becomes the transpose back. Shaping removes the norm and then the transpose pair."""
    norm, back = _transposed_norm(g, x, y, op, attrs, axis, sub)
    _replace(g, norm.out, sub, y, None, {"perm": back}, op="transpose")


def fuse_decompositions(graph: Graph, *, copy: bool = True) -> tuple[Graph, dict]:
    """:func:`fuse_norm_decompositions`, then :func:`fuse_activation_decompositions` (what
    both frontends run last). Returns the graph and ``{"norms": [...], "activations":
    [...]}``, their ``fused`` records."""
    g, norms = fuse_norm_decompositions(graph, copy=copy)
    g, acts = fuse_activation_decompositions(g, copy=False)
    return g, {"norms": norms["fused"], "activations": acts["fused"]}
