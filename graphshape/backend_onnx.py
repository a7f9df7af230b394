"""ONNX backend: emit a graphshape IR :class:`~graphshape.ir.Graph` as an ``onnx.ModelProto``.

``emit(graph, opset=None) -> onnx.ModelProto``. The default opset is the source's
(``graph.meta["opset"]``) for ONNX sources and 17 for torch sources. Each canonical op has
an emitter in :data:`ONNX_EMITTERS`; version-dependent forms (Squeeze/Unsqueeze/Split/
Reduce axes as attribute or input, Pad and Clip inputs, LayerNormalization from 17,
GroupNormalization from 21, Gelu from 20, HardSwish from 14, Mish from 18) are chosen
from the target opset, and ops the target lacks are built from older ones.

Weights are written as initializers; :func:`save` writes a model atomically and moves
tensors to an external data file when the model would exceed protobuf's 2 GB.
The result passes ``onnx.checker.check_model(m, full_check=True)``.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any, Callable

import numpy as np

from graphshape.atomic import default_file_mode
from graphshape.errors import GraphshapeError
from graphshape.ir import CHECK, Graph, Node, Ref

#: opset used for graphs from torch (and any source without an opset)
DEFAULT_TORCH_OPSET = 17
#: newest IR version written (onnxruntime >= 1.17 reads IR 10)
MAX_IR_VERSION = 10
_TWO_GB = 2**31 - 1

#: name prefix of the helper constants the backend adds (see _Ctx.scalar)
HELPER_PREFIX = "graphshape."


class _Ctx:
    """Emission state: ONNX nodes, initializers, and the tensor name of each IR value."""

    def __init__(self, graph: Graph, opset: int):
        import onnx

        self.onnx = onnx
        self.helper = onnx.helper
        self.graph = graph
        self.opset = opset
        self.nodes: list = []
        self.initializers: list = []
        self.names: dict[Ref, str] = {}
        self.used: set[str] = set()          # tensor names (values and initializers)
        # node names: a namespace of their own in ONNX, so a layer's node keeps the IR
        # node's name even though its output tensor has it too (a file written and read
        # back keeps "conv1", not "conv1_1")
        self.used_node_names: set[str] = set()
        self._const_cache: dict[tuple, str] = {}
        # id(parameter array) -> (its initializer's name, the array, kept so the id stays its own)
        self.param_names: dict[int, tuple[str, np.ndarray]] = {}

    # ----------------------------------------------------------------- names
    def fresh(self, base: str, used: set[str] | None = None) -> str:
        """A tensor name from ``base`` that is not taken (``used``: another namespace)."""
        used = self.used if used is None else used
        base = base or "t"
        name = base
        i = 1
        while name in used:
            name = f"{base}_{i}"
            i += 1
        used.add(name)
        return name

    def fresh_node_name(self, base: str) -> str:
        return self.fresh(base, self.used_node_names)

    def value(self, ref: Ref) -> str:
        try:
            return self.names[Ref(*ref)]
        except KeyError:
            raise GraphshapeError(f"value {ref!r} is used before it is emitted",
                                  node=ref[0]) from None

    def out_name(self, node: Node, index: int = 0) -> str:
        """The tensor name for output ``index`` of IR node ``node``."""
        ref = Ref(node.name, index)
        if ref not in self.names:
            self.names[ref] = self.fresh(node.name if index == 0 else f"{node.name}:{index}")
        return self.names[ref]

    def dtype(self, ref: Ref) -> str:
        info = self.graph.info(ref)
        return info.dtype or "float32"

    def rank(self, ref: Ref) -> int | None:
        return self.graph.info(ref).rank

    # ----------------------------------------------------------------- building
    def const(self, value, base: str, dtype=None, *, shared: bool = True) -> str:
        """An initializer holding ``value`` (small scalars/vectors are shared, unless
        ``shared`` is False: a layer's own parameter, which trains apart from an equal one)."""
        arr = np.asarray(value, dtype=dtype)
        if arr.dtype == object:
            raise GraphshapeError(f"constant {base!r} is not a numeric tensor")
        key = None
        if arr.size <= 16 and shared:
            key = (arr.dtype.str, arr.shape, arr.tobytes())
            if key in self._const_cache:
                return self._const_cache[key]
        name = self.fresh(base)
        self.initializers.append((name, arr))
        if key is not None:
            self._const_cache[key] = name
        return name

    # Helper constants (axes, shapes, pads, scalars: no node's own parameter) are named
    # "graphshape.<what>". A bare name can collide with one that a runtime gives its own
    # initializers: onnxruntime 1.32's Gather-to-Split fusion adds one and fails to load
    # the model ("Attempt to replace the existing tensor") when ours was "squeeze_axes".
    def scalar(self, value: float, like: Ref | str, base: str = "c") -> str:
        dtype = self.dtype(like) if isinstance(like, tuple) else like
        return self.const(np.asarray(value, dtype=dtype), f"{HELPER_PREFIX}{base}")

    def ints(self, values, base: str) -> str:
        return self.const(np.asarray(list(values), np.int64), f"{HELPER_PREFIX}{base}")

    def add_node(self, op_type: str, inputs: list[str], outputs: list[str] | int = 1,
                 name: str | None = None, domain: str = "", **attrs) -> list[str]:
        if isinstance(outputs, int):
            base = name or op_type
            outputs = [self.fresh(f"{base}.{op_type}" if name else op_type) for _ in range(outputs)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        node = self.helper.make_node(op_type, inputs, outputs,
                                     name=self.fresh_node_name(name or op_type),
                                     domain=domain or None,
                                     **attrs)
        self.nodes.append(node)
        return outputs

    def emit1(self, node: Node, op_type: str, inputs: list[str], **attrs) -> None:
        """Emit one ONNX op that produces IR node ``node``'s (only) output."""
        self.add_node(op_type, inputs, [self.out_name(node)], name=node.name, **attrs)


# --------------------------------------------------------------------------- helpers
def _input(ctx: _Ctx, node: Node, i: int = 0) -> str:
    return ctx.value(node.inputs[i])


def _param_or_input(ctx: _Ctx, node: Node, pname: str, slot: int, transform=None):
    """Parameter ``pname`` as an initializer name, or the IR input at ``slot``; None if
    neither exists."""
    if pname in node.params and node.params[pname] is not None:
        value = node.params[pname]
        # a scale that a fold moved onto the layer (graphshape.passes.fold, mode "weights"):
        # an inference graph has no parametrization to keep, so it goes into the initializer
        scale = float(node.attrs.get(f"{pname}_scale", 1.0))
        if scale != 1.0:
            value = np.multiply(value, scale, dtype=value.dtype)
        if transform is not None:
            value = transform(value)
        elif scale == 1.0 and isinstance(value, np.ndarray):
            # one array that several nodes hold (one initializer two Gemms read, a weight
            # two layers share in the source) is written once
            written = ctx.param_names.get(id(value))
            if written is None:
                written = ctx.param_names[id(value)] = (
                    ctx.const(value, f"{node.name}.{pname}", shared=False), value)
            return written[0]
        return ctx.const(value, f"{node.name}.{pname}", shared=False)
    if len(node.inputs) > slot:
        if transform is not None:
            raise GraphshapeError(
                f"{pname} is a graph value here; the ONNX backend needs it as a parameter",
                node=node.name, op=node.op)
        return ctx.value(node.inputs[slot])
    return None


def _axes_form(ctx: _Ctx, op_type: str, axes, input_from: int):
    """(extra inputs, attrs) for axes that became an input in opset ``input_from``."""
    if axes is None:
        return [], {}
    if ctx.opset >= input_from:
        return [ctx.ints(axes, f"{op_type.lower()}_axes")], {}
    return [], {"axes": list(axes)}


def _reduce_mean(ctx: _Ctx, x: str, axes, keepdims: int, name: str, out=None) -> str:
    extra, attrs = _axes_form(ctx, "ReduceMean", axes, 18)
    outs = out if out is not None else 1
    return ctx.add_node("ReduceMean", [x] + extra, outs, name=name, keepdims=keepdims, **attrs)[0]


def _clip(ctx: _Ctx, x: str, lo, hi, like: Ref, name: str, out=None) -> str:
    outs = out if out is not None else 1
    if ctx.opset < 11:
        return ctx.add_node("Clip", [x], outs, name=name,
                            min=None if lo is None else float(lo),
                            max=None if hi is None else float(hi))[0]
    inputs = [x, "" if lo is None else ctx.scalar(lo, like, "clip_min"),
              "" if hi is None else ctx.scalar(hi, like, "clip_max")]
    while inputs[-1] == "":
        inputs.pop()
    return ctx.add_node("Clip", inputs, outs, name=name)[0]


def _spatial_attrs(node: Node):
    a = node.attrs
    return dict(kernel_shape=list(a["kernel_shape"]), strides=list(a.get("stride") or
                                                                    (1,) * len(a["kernel_shape"])),
                pads=list(a.get("pads") or (0,) * (2 * len(a["kernel_shape"]))))


def _pad_node(ctx: _Ctx, x: str, pads_all, mode: str, value: float, like: Ref, name: str,
              out=None) -> str:
    """Pad over all dims (begin..., end...) in the target opset's form."""
    outs = out if out is not None else 1
    if mode == "circular":
        if ctx.opset < 19:
            raise GraphshapeError(
                f"circular padding needs ONNX opset 19 (Pad mode 'wrap'); emit with opset>=19",
                node=name)
        mode = "wrap"
    if mode == "replicate":
        mode = "edge"
    if ctx.opset < 11:
        return ctx.add_node("Pad", [x], outs, name=name, pads=[int(p) for p in pads_all],
                            mode=mode, value=float(value))[0]
    inputs = [x, ctx.ints(pads_all, "pads")]
    if mode == "constant" and value != 0.0:
        inputs.append(ctx.scalar(value, like, "pad_value"))
    return ctx.add_node("Pad", inputs, outs, name=name, mode=mode)[0]


# --------------------------------------------------------------------------- emitters
def _emit_constant(ctx, node):
    value = node.params.get("value")
    if value is None:
        raise GraphshapeError("constant node without a value", node=node.name, op=node.op)
    ctx.initializers.append((ctx.out_name(node), np.asarray(value)))


def _emit_conv(ctx, node):
    a = node.attrs
    k = a.get("dims", len(a["kernel_shape"]))
    x = _input(ctx, node)
    pads = list(a.get("pads") or (0,) * (2 * k))
    mode = a.get("padding_mode", "zeros")
    if mode != "zeros" and any(pads):
        # torch's non-zero padding modes: an explicit Pad over the spatial dims first
        x = _pad_node(ctx, x, [0, 0] + pads[:k] + [0, 0] + pads[k:], mode, 0.0, node.inputs[0],
                      f"{node.name}.pad")
        pads = [0] * (2 * k)
    w = _param_or_input(ctx, node, "weight", 1)
    b = _param_or_input(ctx, node, "bias", 2)
    ctx.emit1(node, "Conv", [x, w] + ([b] if b else []),
              kernel_shape=list(a["kernel_shape"]), strides=list(a.get("stride") or (1,) * k),
              pads=pads, dilations=list(a.get("dilation") or (1,) * k),
              group=int(a.get("groups", 1)))


def _emit_conv_transpose(ctx, node):
    a = node.attrs
    k = a.get("dims", len(a["kernel_shape"]))
    w = _param_or_input(ctx, node, "weight", 1)
    b = _param_or_input(ctx, node, "bias", 2)
    ctx.emit1(node, "ConvTranspose", [_input(ctx, node), w] + ([b] if b else []),
              kernel_shape=list(a["kernel_shape"]), strides=list(a.get("stride") or (1,) * k),
              pads=list(a.get("pads") or (0,) * (2 * k)),
              output_padding=list(a.get("output_padding") or (0,) * k) if any(
                  a.get("output_padding") or ()) else None,
              dilations=list(a.get("dilation") or (1,) * k), group=int(a.get("groups", 1)))


def _emit_linear(ctx, node):
    x = _input(ctx, node)
    rank = ctx.rank(node.inputs[0])
    has_bias = node.params.get("bias") is not None or len(node.inputs) > 2
    if rank == 2:
        w = _param_or_input(ctx, node, "weight", 1)
        b = _param_or_input(ctx, node, "bias", 2) if has_bias else None
        ctx.emit1(node, "Gemm", [x, w] + ([b] if b else []), transB=1)
        return
    # any other rank: MatMul by W^T (+ bias)
    wt = _param_or_input(ctx, node, "weight", 1, transform=lambda w: w.T)
    if not has_bias:
        ctx.emit1(node, "MatMul", [x, wt])
        return
    # the MatMul carries the layer's name (the ONNX frontend names the linear layer it reads
    # after its MatMul), so a file written and read back keeps its layers' names
    y = ctx.add_node("MatMul", [x, wt], 1, name=node.name)[0]
    b = _param_or_input(ctx, node, "bias", 2)
    ctx.add_node("Add", [y, b], [ctx.out_name(node)], name=f"{node.name}.add_bias")


def _emit_binary(op_type):
    def emit(ctx, node):
        ctx.emit1(node, op_type, [_input(ctx, node, 0), _input(ctx, node, 1)])
    return emit


def _emit_add(ctx, node):
    y = _input(ctx, node, 1)
    alpha = node.attrs.get("alpha")
    if alpha is not None and alpha != 1:
        y = ctx.add_node("Mul", [y, ctx.scalar(alpha, node.inputs[1], "alpha")], 1,
                         name=f"{node.name}.alpha")[0]
    ctx.emit1(node, "Add", [_input(ctx, node, 0), y])


def _emit_sum(ctx, node):
    weights = node.attrs.get("weights")
    inputs = [ctx.value(r) for r in node.inputs]
    if weights is not None:
        inputs = [x if w == 1 else ctx.add_node("Mul", [x, ctx.scalar(w, r, "w")], 1,
                                                 name=f"{node.name}.w{i}")[0]
                  for i, (x, w, r) in enumerate(zip(inputs, weights, node.inputs))]
    ctx.emit1(node, "Sum", inputs)


def _emit_concat(ctx, node):
    ctx.emit1(node, "Concat", [ctx.value(r) for r in node.inputs], axis=int(node.attrs["axis"]))


# ---- activations ---------------------------------------------------------------------
def _act_core(ctx: _Ctx, node: Node, x: str, out: list[str] | int) -> str:
    """The untransformed activation ``name`` applied to tensor ``x``."""
    a = node.attrs
    name = a["name"]
    like = node.inputs[0]
    nm = node.name
    simple = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "softplus": "Softplus",
              "softsign": "Softsign", "erf": "Erf", "atan": "Atan", "asinh": "Asinh"}
    if name in simple:
        return ctx.add_node(simple[name], [x], out, name=nm)[0]
    if name == "leaky_relu" and a.get("learnable_slope"):
        # PRelu's slope broadcasts from the right: one per channel is (C, 1, ..., 1)
        slope = np.asarray(node.params["weight"]).reshape(-1)
        rank = ctx.rank(like)
        if slope.size > 1:
            if rank is None or rank < 2:
                raise GraphshapeError("a PReLU with one slope per channel needs its input's "
                                      "rank (>= 2) to lay the slopes along axis 1",
                                      node=node.name, op=node.op)
            slope = slope.reshape((slope.size,) + (1,) * (rank - 2))
        w = ctx.const(slope.astype(ctx.dtype(like)), f"{nm}.weight")
        return ctx.add_node("PRelu", [x, w], out, name=nm)[0]
    if name == "leaky_relu":
        return ctx.add_node("LeakyRelu", [x], out, name=nm,
                            alpha=float(a.get("negative_slope", 0.01)))[0]
    if name == "elu":
        return ctx.add_node("Elu", [x], out, name=nm, alpha=float(a.get("alpha", 1.0)))[0]
    if name == "selu":
        from graphshape.activations import SELU_ALPHA, SELU_SCALE

        return ctx.add_node("Selu", [x], out, name=nm, alpha=SELU_ALPHA, gamma=SELU_SCALE)[0]
    if name in ("silu", "swish"):
        s = ctx.add_node("Sigmoid", [x], 1, name=f"{nm}.sigmoid")[0]
        return ctx.add_node("Mul", [x, s], out, name=nm)[0]
    if name == "hardsigmoid":
        return ctx.add_node("HardSigmoid", [x], out, name=nm, alpha=1.0 / 6.0, beta=0.5)[0]
    if name == "hardswish":
        if ctx.opset >= 14:
            return ctx.add_node("HardSwish", [x], out, name=nm)[0]
        s = ctx.add_node("HardSigmoid", [x], 1, name=f"{nm}.hardsigmoid",
                         alpha=1.0 / 6.0, beta=0.5)[0]
        return ctx.add_node("Mul", [x, s], out, name=nm)[0]
    if name == "relu6":
        return _clip(ctx, x, 0.0, 6.0, like, nm, out)
    if name == "hardtanh":
        return _clip(ctx, x, float(a.get("min_val", -1.0)), float(a.get("max_val", 1.0)),
                     like, nm, out)
    if name == "mish":
        if ctx.opset >= 18:
            return ctx.add_node("Mish", [x], out, name=nm)[0]
        sp = ctx.add_node("Softplus", [x], 1, name=f"{nm}.softplus")[0]
        t = ctx.add_node("Tanh", [sp], 1, name=f"{nm}.tanh")[0]
        return ctx.add_node("Mul", [x, t], out, name=nm)[0]
    if name in ("gelu", "gelu_exact"):
        approximate = "tanh" if name == "gelu" else "none"
        if ctx.opset >= 20:
            return ctx.add_node("Gelu", [x], out, name=nm, approximate=approximate)[0]
        half = ctx.add_node("Mul", [x, ctx.scalar(0.5, like, "half")], 1, name=f"{nm}.half")[0]
        if name == "gelu_exact":
            inner = ctx.add_node("Mul", [x, ctx.scalar(1.0 / math.sqrt(2.0), like, "inv_sqrt2")],
                                 1, name=f"{nm}.scale")[0]
            e = ctx.add_node("Erf", [inner], 1, name=f"{nm}.erf")[0]
        else:
            from graphshape.activations import GELU_TANH_COEF

            x3 = ctx.add_node("Mul", [x, x], 1, name=f"{nm}.sq")[0]
            x3 = ctx.add_node("Mul", [x3, x], 1, name=f"{nm}.cube")[0]
            x3 = ctx.add_node("Mul", [x3, ctx.scalar(GELU_TANH_COEF, like, "gelu_coef")], 1,
                              name=f"{nm}.cubec")[0]
            inner = ctx.add_node("Add", [x, x3], 1, name=f"{nm}.poly")[0]
            inner = ctx.add_node("Mul", [inner, ctx.scalar(math.sqrt(2.0 / math.pi), like,
                                                           "sqrt_2_over_pi")], 1,
                                 name=f"{nm}.scale")[0]
            e = ctx.add_node("Tanh", [inner], 1, name=f"{nm}.tanh")[0]
        one_plus = ctx.add_node("Add", [e, ctx.scalar(1.0, like, "one")], 1,
                                name=f"{nm}.one_plus")[0]
        return ctx.add_node("Mul", [half, one_plus], out, name=nm)[0]
    if name == "square":
        return ctx.add_node("Mul", [x, x], out, name=nm)[0]
    if name == "squared_relu":
        r = ctx.add_node("Relu", [x], 1, name=f"{nm}.relu")[0]
        return ctx.add_node("Mul", [r, r], out, name=nm)[0]
    if name == "bentid":
        sq = ctx.add_node("Mul", [x, x], 1, name=f"{nm}.sq")[0]
        r = ctx.add_node("Sqrt", [ctx.add_node("Add", [sq, ctx.scalar(1.0, like, "one")], 1,
                                               name=f"{nm}.sq1")[0]], 1, name=f"{nm}.sqrt")[0]
        r = ctx.add_node("Sub", [r, ctx.scalar(1.0, like, "one")], 1, name=f"{nm}.sub")[0]
        r = ctx.add_node("Mul", [r, ctx.scalar(0.5, like, "half")], 1, name=f"{nm}.half")[0]
        return ctx.add_node("Add", [r, x], out, name=nm)[0]
    raise GraphshapeError(
        f"the ONNX backend has no emitter for activation {name!r}; known: "
        + ", ".join(sorted(_ACTIVATION_NAMES)), node=node.name, op=node.op)


_ACTIVATION_NAMES = {"relu", "sigmoid", "tanh", "softplus", "softsign", "erf", "atan", "asinh",
                     "leaky_relu", "elu", "selu", "silu", "swish", "hardsigmoid", "hardswish",
                     "relu6", "hardtanh", "mish", "gelu", "gelu_exact", "square", "bentid",
                     "squared_relu"}


def _emit_activation(ctx, node):
    t = node.attrs.get("transform") or {}
    like = node.inputs[0]
    x = _input(ctx, node)
    nm = node.name
    in_scale = float(t.get("input_scale", 1.0))
    in_shift = float(t.get("input_shift", 0.0))
    out_shift = float(t.get("output_shift", 0.0))
    out_scale = float(t.get("output_scale", 1.0))
    if in_scale != 1.0:
        x = ctx.add_node("Mul", [x, ctx.scalar(in_scale, like, "input_scale")], 1,
                         name=f"{nm}.input_scale")[0]
    if in_shift != 0.0:
        x = ctx.add_node("Add", [x, ctx.scalar(in_shift, like, "input_shift")], 1,
                         name=f"{nm}.input_shift")[0]
    post = [(out_shift != 0.0, "Add", out_shift, "output_shift"),
            (out_scale != 1.0, "Mul", out_scale, "output_scale")]
    post = [p for p in post if p[0]]
    y = _act_core(ctx, node, x, [ctx.out_name(node)] if not post else 1)
    for i, (_, op_type, value, label) in enumerate(post):
        out = [ctx.out_name(node)] if i == len(post) - 1 else 1
        y = ctx.add_node(op_type, [y, ctx.scalar(value, like, label)], out,
                         name=f"{nm}.{label}")[0]


# ---- normalization -------------------------------------------------------------------
def _emit_batch_norm(ctx, node):
    a = node.attrs
    weight = node.params.get("weight")
    bias = node.params.get("bias")
    mean, var = node.params.get("running_mean"), node.params.get("running_var")
    eps = float(a.get("eps", 1e-5))
    if mean is None or var is None:
        # no running statistics (PyTorch's track_running_stats=False, an ONNX training-mode
        # export): normalized by the batch's own, written out rather than as
        # BatchNormalization(training_mode=1), whose running-statistics outputs
        # onnxruntime writes over initializers that its optimizer shares (zeros, ones)
        rank = ctx.rank(node.inputs[0])
        cs = _channel_shape(rank, -1)
        _normalize(ctx, node, _input(ctx, node), [0, *range(2, rank)], eps, True,
                   None if weight is None else weight.reshape(cs),
                   None if bias is None else bias.reshape(cs))
        return
    c = int(a.get("num_features") or len(mean))
    dtype = mean.dtype
    inputs = [_input(ctx, node),
              ctx.const(weight if weight is not None else np.ones(c, dtype), f"{node.name}.weight"),
              ctx.const(bias if bias is not None else np.zeros(c, dtype), f"{node.name}.bias"),
              ctx.const(mean, f"{node.name}.running_mean"),
              ctx.const(var, f"{node.name}.running_var")]
    momentum = a.get("momentum")
    ctx.emit1(node, "BatchNormalization", inputs, epsilon=eps,
              momentum=None if momentum is None else float(1.0 - momentum))


def _emit_layer_norm(ctx, node):
    _emit_trailing_norm(ctx, node, "LayerNormalization", 17, float(node.attrs.get("eps", 1e-5)),
                        centre=True)


def _emit_rms_norm(ctx, node):
    eps = node.attrs.get("eps")
    if eps is None:  # torch's default: the input dtype's machine epsilon
        dtype = ctx.dtype(node.inputs[0])
        eps = np.finfo(dtype if dtype in ("float16", "float64") else "float32").eps
    _emit_trailing_norm(ctx, node, "RMSNormalization", 23, float(eps), centre=False)


def _emit_std_norm(ctx, node):
    """``std_norm`` (see graphshape.ops) from primitives: no ONNX op divides by the
    standard deviation other than LayerNormalization's."""
    a = node.attrs
    shape = tuple(a["normalized_shape"])
    axes = list(range(-len(shape), 0))
    n, correction = int(np.prod(shape)), int(a.get("correction", 0))
    x = _input(ctx, node)
    dtype = ctx.dtype(node.inputs[0])
    nm = node.name
    d, var = _mean_square(ctx, x, axes, nm, centre=True)
    if correction:  # (the mean square divides by n: the variance by n - correction)
        var = ctx.add_node("Mul", [var, ctx.scalar(n / (n - correction), dtype, "bessel")], 1,
                           name=f"{nm}.unbiased")[0]
    eps = ctx.scalar(float(a["eps"]), dtype, "eps")
    if a.get("eps_added_to", "variance") == "std":
        std = ctx.add_node("Sqrt", [var], 1, name=f"{nm}.std")[0]
        std = ctx.add_node("Add", [std, eps], 1, name=f"{nm}.std_eps")[0]
    elif a.get("eps_added_to") == "clamp":
        var = ctx.add_node("Max", [var, eps], 1, name=f"{nm}.var_clamped")[0]
        std = ctx.add_node("Sqrt", [var], 1, name=f"{nm}.std")[0]
    else:
        var = ctx.add_node("Add", [var, eps], 1, name=f"{nm}.var_eps")[0]
        std = ctx.add_node("Sqrt", [var], 1, name=f"{nm}.std")[0]
    ctx.add_node("Div", [d if a.get("centre", True) else x, std], [ctx.out_name(node)],
                 name=f"{nm}.normalize")


def _emit_trailing_norm(ctx, node, op_type: str, since: int, eps: float, centre: bool):
    """A layer norm (``centre``) or RMS norm over the trailing dims: ``op_type`` from opset
    ``since`` on; before it, ``(x - mean) / sqrt(var + eps)`` (RMS: ``x / sqrt(mean(x^2) +
    eps)``), times the weight, plus the bias, each where the node has one."""
    shape = tuple(node.attrs["normalized_shape"])
    x = _input(ctx, node)
    dtype = ctx.dtype(node.inputs[0])
    weight = node.params.get("weight")
    bias = node.params.get("bias")
    nm = node.name
    if ctx.opset >= since:
        w = ctx.const(weight if weight is not None else np.ones(shape, dtype), f"{nm}.weight")
        inputs = [x, w]
        if bias is not None:
            inputs.append(ctx.const(bias, f"{nm}.bias"))
        ctx.emit1(node, op_type, inputs, axis=-len(shape), epsilon=eps)
        return
    _normalize(ctx, node, x, list(range(-len(shape), 0)), eps, centre, weight, bias)


def _mean_square(ctx, x: str, axes, nm: str, centre: bool) -> tuple[str, str]:
    """``(d, ms)``: ``x - mean(x)`` and its variance over ``axes`` (``centre``), or ``x``
    and ``mean(x^2)``, as nodes named after ``nm``."""
    d = x
    if centre:
        mean = _reduce_mean(ctx, x, axes, 1, f"{nm}.mean")
        d = ctx.add_node("Sub", [x, mean], 1, name=f"{nm}.centre")[0]
    square = "var" if centre else "mean_square"
    ms = _reduce_mean(ctx, ctx.add_node("Mul", [d, d], 1, name=f"{nm}.sq")[0], axes, 1,
                      f"{nm}.{square}")
    return d, ms


def _normalize(ctx, node, x: str, axes, eps: float, centre: bool, weight, bias) -> None:
    """Node ``node``'s output from primitives: ``(x - mean) / sqrt(var + eps)`` over ``axes``
    (not ``centre``: ``x / sqrt(mean(x^2) + eps)``), times ``weight``, plus ``bias`` (arrays
    broadcasting against ``x``; either may be None)."""
    dtype = ctx.dtype(node.inputs[0])
    nm = node.name
    d, ms = _mean_square(ctx, x, axes, nm, centre)
    square, root = ("var", "std") if centre else ("mean_square", "rms")
    std = ctx.add_node("Sqrt", [ctx.add_node("Add", [ms, ctx.scalar(eps, dtype, "eps")], 1,
                                             name=f"{nm}.{square}_eps")[0]], 1,
                       name=f"{nm}.{root}")[0]
    steps = []
    if weight is not None:
        steps.append(("Mul", ctx.const(weight, f"{nm}.weight")))
    if bias is not None:
        steps.append(("Add", ctx.const(bias, f"{nm}.bias")))
    y = ctx.add_node("Div", [d, std], [ctx.out_name(node)] if not steps else 1,
                     name=f"{nm}.normalize")[0]
    for i, (op_type_i, arg) in enumerate(steps):
        y = ctx.add_node(op_type_i, [y, arg], [ctx.out_name(node)] if i == len(steps) - 1 else 1,
                         name=f"{nm}.{op_type_i.lower()}")[0]


def _channel_shape(rank: int | None, c: int, axis: int = 1):
    if rank is None:
        raise GraphshapeError("per-channel parameters need the input's rank")
    return (c,) + (1,) * (rank - axis - 1)


def _emit_group_norm(ctx, node):
    a = node.attrs
    groups, c = int(a["num_groups"]), int(a["num_channels"])
    eps = float(a.get("eps", 1e-5))
    x = _input(ctx, node)
    dtype = ctx.dtype(node.inputs[0])
    weight = node.params.get("weight")
    bias = node.params.get("bias")
    weight = np.ones(c, dtype) if weight is None else weight
    bias = np.zeros(c, dtype) if bias is None else bias
    if ctx.opset >= 21:
        ctx.emit1(node, "GroupNormalization",
                  [x, ctx.const(weight, f"{node.name}.weight"), ctx.const(bias, f"{node.name}.bias")],
                  num_groups=groups, epsilon=eps)
        return
    # before 21 (GroupNormalization-18 scales per group): normalize (N, G, -1) with
    # InstanceNormalization, restore the shape, then the per-channel affine
    nm = node.name
    rank = ctx.rank(node.inputs[0])
    shape = ctx.add_node("Shape", [x], 1, name=f"{nm}.shape")[0]
    grouped = ctx.add_node("Reshape", [x, ctx.ints([0, groups, -1], "group_shape")], 1,
                           name=f"{nm}.group")[0]
    normed = ctx.add_node("InstanceNormalization",
                          [grouped, ctx.const(np.ones(groups, dtype), f"{nm}.ones"),
                           ctx.const(np.zeros(groups, dtype), f"{nm}.zeros")], 1,
                          name=f"{nm}.instnorm", epsilon=eps)[0]
    y = ctx.add_node("Reshape", [normed, shape], 1, name=f"{nm}.ungroup")[0]
    cs = _channel_shape(rank, c)
    y = ctx.add_node("Mul", [y, ctx.const(weight.reshape(cs), f"{nm}.weight")], 1,
                     name=f"{nm}.scale")[0]
    ctx.emit1(node, "Add", [y, ctx.const(bias.reshape(cs), f"{nm}.bias")])


def _emit_instance_norm(ctx, node):
    a = node.attrs
    c = int(a["num_features"])
    dtype = ctx.dtype(node.inputs[0])
    if a.get("track_running_stats") and node.params.get("running_mean") is not None:
        # torch InstanceNorm with running stats uses them in eval: that is a batch norm
        return _emit_batch_norm(ctx, node)
    weight = node.params.get("weight")
    bias = node.params.get("bias")
    ctx.emit1(node, "InstanceNormalization",
              [_input(ctx, node),
               ctx.const(weight if weight is not None else np.ones(c, dtype), f"{node.name}.weight"),
               ctx.const(bias if bias is not None else np.zeros(c, dtype), f"{node.name}.bias")],
              epsilon=float(a.get("eps", 1e-5)))


def _emit_lrn(ctx, node):
    a = node.attrs
    ctx.emit1(node, "LRN", [_input(ctx, node)], size=int(a["size"]),
              alpha=float(a.get("alpha", 1e-4)), beta=float(a.get("beta", 0.75)),
              bias=float(a.get("k", 1.0)))


def _emit_affine(ctx, node):
    axis = int(node.attrs.get("axis", 1))
    rank = ctx.rank(node.inputs[0])
    scale = node.params["scale"]
    shape = _channel_shape(rank, scale.shape[0], axis) if scale.ndim == 1 else scale.shape
    shift = node.params.get("shift")
    x = _input(ctx, node)
    s = ctx.const(scale.reshape(shape), f"{node.name}.scale")
    if shift is None:
        ctx.emit1(node, "Mul", [x, s])
        return
    y = ctx.add_node("Mul", [x, s], 1, name=f"{node.name}.scale")[0]
    ctx.emit1(node, "Add", [y, ctx.const(shift.reshape(shape), f"{node.name}.shift")])


# ---- pooling -------------------------------------------------------------------------
def _pool_attrs(ctx, node) -> dict:
    """kernel/stride/pads of a pool, plus ceil_mode (an attribute from opset 10)."""
    kw = _spatial_attrs(node)
    if node.attrs.get("ceil_mode"):
        if ctx.opset < 10:
            raise GraphshapeError("ceil_mode pooling needs opset 10 or newer", node=node.name,
                                  op=node.op)
        kw["ceil_mode"] = 1
    return kw


def _emit_avg_pool(ctx, node):
    a = node.attrs
    kw = _pool_attrs(ctx, node)
    kw["count_include_pad"] = int(bool(a.get("count_include_pad", False)))
    ctx.emit1(node, "AveragePool", [_input(ctx, node)], **kw)


def _emit_max_pool(ctx, node):
    a = node.attrs
    kw = _pool_attrs(ctx, node)
    dil = a.get("dilation")
    if dil and any(d != 1 for d in dil):
        if ctx.opset < 10:
            raise GraphshapeError("dilated max pooling needs opset 10 or newer",
                                  node=node.name, op=node.op)
        kw["dilations"] = list(dil)
    ctx.emit1(node, "MaxPool", [_input(ctx, node)], **kw)


def _emit_global(op_type):
    def emit(ctx, node):
        ctx.emit1(node, op_type, [_input(ctx, node)])
    return emit


def _emit_adaptive(kind):
    def emit(ctx, node):
        info = ctx.graph.info(node.inputs[0])
        out_size = tuple(node.attrs["output_size"])
        dims = int(node.attrs.get("dims", len(out_size)))
        if all(o == 1 for o in out_size):
            ctx.emit1(node, "GlobalAveragePool" if kind == "avg" else "GlobalMaxPool",
                      [_input(ctx, node)])
            return
        spatial = None if info.shape is None else info.shape[-dims:]
        if spatial is None or not all(isinstance(s, int) for s in spatial):
            raise GraphshapeError(
                "adaptive pooling to a size other than 1 needs static spatial sizes in ONNX",
                node=node.name, op=node.op)
        kernel = []
        for s, o in zip(spatial, out_size):
            o = s if o is None else o
            if s % o:
                raise GraphshapeError(
                    f"adaptive pooling from {tuple(spatial)} to {out_size}: ONNX has no adaptive "
                    "pooling and the output size does not divide the input size; change the "
                    "input resolution", node=node.name, op=node.op)
            kernel.append(s // o)
        ctx.emit1(node, "AveragePool" if kind == "avg" else "MaxPool", [_input(ctx, node)],
                  kernel_shape=kernel, strides=kernel)
    return emit


# ---- shape ops -----------------------------------------------------------------------
def _emit_flatten(ctx, node):
    rank = ctx.rank(node.inputs[0])
    x = _input(ctx, node)
    if rank is None:
        raise GraphshapeError("flatten needs the input's rank", node=node.name, op=node.op)
    start = int(node.attrs.get("start_dim", 0)) % max(rank, 1)
    end = int(node.attrs.get("end_dim", -1)) % max(rank, 1)
    if rank == 0 or start == end:
        ctx.emit1(node, "Identity", [x])
        return
    if start > end:
        raise GraphshapeError(f"flatten start_dim {start} is after end_dim {end}",
                              node=node.name, op=node.op)
    if start == 1 and end == rank - 1:
        ctx.emit1(node, "Flatten", [x], axis=1)
        return
    if start == 0 and end == rank - 1:
        ctx.emit1(node, "Reshape", [x, ctx.ints([-1], "shape")])
        return
    shape = ctx.graph.info(node.inputs[0]).shape
    tail = shape[end + 1:]
    if not all(isinstance(d, int) for d in tail):
        raise GraphshapeError("flatten of inner dims needs static trailing sizes in ONNX",
                              node=node.name, op=node.op)
    # 0 copies the input's leading dims (same positions); the trailing dims are static
    ctx.emit1(node, "Reshape", [x, ctx.ints([0] * start + [-1] + list(tail), "shape")])


def _emit_reshape(ctx, node):
    target = node.attrs.get("shape")
    out_shape = node.outputs[0].shape
    copy_dims = node.attrs.get("copy_dims") or ()
    if copy_dims and target is not None and len(node.inputs) == 1:
        # ONNX's own 0 ("copy the input's dim"), allowzero off
        target = [0 if i in copy_dims else int(d) for i, d in enumerate(target)]
        if 0 in (d for i, d in enumerate(target) if i not in copy_dims):
            raise GraphshapeError("a reshape that both copies dims and makes a 0-size one "
                                  "cannot be written to ONNX", node=node.name, op=node.op)
        ctx.emit1(node, "Reshape", [_input(ctx, node), ctx.ints(target, "shape")])
        return
    if target is None or any(not isinstance(d, int) for d in target) or len(node.inputs) > 1:
        if out_shape is not None and all(isinstance(d, int) for d in out_shape):
            target = out_shape
        else:
            raise GraphshapeError("reshape to a dynamic shape is not supported by the ONNX "
                                  "backend; give the model static shapes", node=node.name, op=node.op)
    kw = {"allowzero": 1} if ctx.opset >= 14 and 0 in target else {}
    ctx.emit1(node, "Reshape", [_input(ctx, node), ctx.ints(target, "shape")], **kw)


def _emit_transpose(ctx, node):
    ctx.emit1(node, "Transpose", [_input(ctx, node)], perm=list(node.attrs["perm"]))


def _crd_positions(node, channels) -> np.ndarray:
    """``p`` with ``p[k*C + c] = c*b*b + k`` (k = i*b + j): where each channel of ONNX's
    block order ("DCR") sits in torch's pixel_shuffle order ("CRD"), ``channels`` = C*b*b."""
    b2 = int(node.attrs["blocksize"]) ** 2
    if not isinstance(channels, int) or channels % b2:
        raise GraphshapeError(f"{node.op} in torch's channel order (pixel_shuffle before "
                              "opset 11, pixel_unshuffle) needs a known channel count in ONNX",
                              node=node.name, op=node.op)
    c = channels // b2
    return np.asarray([cc * b2 + k for k in range(b2) for cc in range(c)], np.int64)


def _channels(info) -> int | None:
    return info.shape[1] if info.shape is not None and len(info.shape) == 4 else None


def _emit_depth_to_space(ctx, node):
    x, b = _input(ctx, node), int(node.attrs["blocksize"])
    mode = node.attrs.get("mode", "CRD")
    if ctx.opset >= 11:
        ctx.emit1(node, "DepthToSpace", [x], blocksize=b, mode=mode)
        return
    if mode == "CRD":  # before opset 11, DepthToSpace is "DCR" only: reorder the channels
        order = _crd_positions(node, _channels(ctx.graph.info(node.inputs[0])))
        (x,) = ctx.add_node("Gather", [x, ctx.ints(order, "block_order")], name=node.name,
                            axis=1)
    ctx.emit1(node, "DepthToSpace", [x], blocksize=b)


def _emit_space_to_depth(ctx, node):
    x, b = _input(ctx, node), int(node.attrs["blocksize"])
    if node.attrs.get("mode", "CRD") == "DCR":
        ctx.emit1(node, "SpaceToDepth", [x], blocksize=b)
        return
    # ONNX's SpaceToDepth writes "DCR" order; torch's pixel_unshuffle is that reordered
    order = np.argsort(_crd_positions(node, _channels(node.outputs[0])))
    (y,) = ctx.add_node("SpaceToDepth", [x], name=node.name, blocksize=b)
    ctx.emit1(node, "Gather", [y, ctx.ints(order, "block_order")], axis=1)


def _emit_squeeze(ctx, node):
    extra, attrs = _axes_form(ctx, "Squeeze", node.attrs.get("axes"), 13)
    ctx.emit1(node, "Squeeze", [_input(ctx, node)] + extra, **attrs)


def _emit_unsqueeze(ctx, node):
    extra, attrs = _axes_form(ctx, "Unsqueeze", node.attrs["axes"], 13)
    ctx.emit1(node, "Unsqueeze", [_input(ctx, node)] + extra, **attrs)


def _emit_slice(ctx, node):
    a = node.attrs
    steps = list(a.get("steps") or (1,) * len(a["starts"]))
    # INT64-safe clamp: torch-style "to the end" may be sys.maxsize
    ends = [min(int(e), 2**63 - 1) for e in a["ends"]]
    if ctx.opset < 10:
        if any(s != 1 for s in steps):
            raise GraphshapeError("strided slices need opset 10 or newer", node=node.name,
                                  op=node.op)
        ctx.emit1(node, "Slice", [_input(ctx, node)], starts=list(a["starts"]), ends=ends,
                  axes=list(a["axes"]))
        return
    ctx.emit1(node, "Slice", [_input(ctx, node), ctx.ints(a["starts"], "starts"),
                              ctx.ints(ends, "ends"), ctx.ints(a["axes"], "axes"),
                              ctx.ints(steps, "steps")])


def _emit_split(ctx, node):
    a = node.attrs
    sizes = [int(s) for s in a["sizes"]]
    outs = [ctx.out_name(node, i) for i in range(len(sizes))]
    if ctx.opset < 13:
        ctx.add_node("Split", [_input(ctx, node)], outs, name=node.name, axis=int(a["axis"]),
                     split=sizes)
    else:
        ctx.add_node("Split", [_input(ctx, node), ctx.ints(sizes, "split")], outs,
                     name=node.name, axis=int(a["axis"]))


def _emit_pad(ctx, node):
    a = node.attrs
    _pad_node(ctx, _input(ctx, node), list(a["pads"]), a.get("mode", "constant"),
              float(a.get("value", 0.0) or 0.0), node.inputs[0], node.name,
              out=[ctx.out_name(node)])


def _emit_resize(ctx, node):
    """Resize with the ONNX attributes torch's interpolate modes export to (the canonical
    ``resize`` is in PyTorch's terms). A size computed at run time is written as the size
    traced for the example inputs (``static_sizes``), as a dynamic reshape is."""
    a = node.attrs
    mode = a.get("mode")
    if ctx.opset < 11:
        raise GraphshapeError(f"resize needs opset 11 or newer (got {ctx.opset}): pass "
                              "opset=17", node=node.name, op=node.op)
    attrs: dict[str, Any] = {}
    if mode == "nearest":
        attrs = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                 "nearest_mode": "floor"}
    elif mode == "nearest-exact":
        attrs = {"mode": "nearest", "coordinate_transformation_mode": "half_pixel",
                 "nearest_mode": "round_prefer_ceil"}
    elif mode in ("linear", "cubic"):
        attrs = {"mode": mode, "coordinate_transformation_mode":
                 "align_corners" if a.get("align_corners") else "half_pixel"}
        if a.get("antialias"):
            raise GraphshapeError(
                "antialiased interpolation has no exact ONNX form: onnxruntime's antialias "
                "filter is not torch's (measured 0.07 apart on a 0.4x bilinear resize). "
                "Use antialias=False in the model, or export the torch module itself",
                node=node.name, op=node.op)
        if mode == "cubic":  # torch's coefficient
            attrs["cubic_coeff_a"] = -0.75
    else:
        raise GraphshapeError(f"unknown resize mode {mode!r}", node=node.name, op=node.op)
    x = _input(ctx, node)
    # roi: required (empty) before opset 13, an empty optional input after
    roi = ctx.const(np.zeros(0, np.float32), f"{HELPER_PREFIX}roi") if ctx.opset < 13 else ""
    sizes = a.get("sizes")
    if sizes is None:
        scales = np.asarray([1.0, 1.0, *a["scales"]], np.float32)
        ctx.emit1(node, "Resize", [x, roi, ctx.const(scales, f"{HELPER_PREFIX}scales")], **attrs)
        return
    if isinstance(sizes, Ref) or any(isinstance(s, Ref) for s in sizes):
        sizes = a.get("static_sizes")
        if sizes is None:
            raise GraphshapeError("resize to a size computed at run time, with no traced size "
                                  "to write: load the model with example inputs",
                                  node=node.name, op=node.op)
    out_shape = node.outputs[0].shape
    lead = None if out_shape is None else out_shape[:2]
    if lead is not None and all(isinstance(d, int) for d in lead):
        full = ctx.ints([*lead, *sizes], "sizes")
    else:  # a dynamic batch: the input's first two dims, then the spatial sizes
        shape = ctx.add_node("Shape", [x], 1, name=f"{node.name}.shape")[0]
        lead = ctx.add_node("Slice", [shape, ctx.ints([0], "zero"), ctx.ints([2], "two")], 1,
                            name=f"{node.name}.lead")[0]
        full = ctx.add_node("Concat", [lead, ctx.ints(sizes, "sizes")], 1,
                            name=f"{node.name}.sizes", axis=0)[0]
    empty = ctx.const(np.zeros(0, np.float32), f"{HELPER_PREFIX}scales") if ctx.opset < 13 else ""
    ctx.emit1(node, "Resize", [x, roi, empty, full], **attrs)


def _emit_dropout(ctx, node):
    p = float(node.attrs.get("p", 0.5))
    if ctx.opset < 12:
        ctx.emit1(node, "Dropout", [_input(ctx, node)], ratio=p)
    else:
        ctx.emit1(node, "Dropout", [_input(ctx, node), ctx.scalar(p, node.inputs[0], "ratio")])


def _emit_identity(ctx, node):
    ctx.emit1(node, "Identity", [_input(ctx, node)])


def _emit_cast(ctx, node):
    import onnx

    to = {"float16": onnx.TensorProto.FLOAT16, "bfloat16": onnx.TensorProto.BFLOAT16,
          "float32": onnx.TensorProto.FLOAT, "float64": onnx.TensorProto.DOUBLE}
    ctx.emit1(node, "Cast", [_input(ctx, node)], to=to[node.attrs["dtype"]])


def _emit_softmax(op_type):
    def emit(ctx, node):
        axis = int(node.attrs.get("axis", -1))
        rank = ctx.rank(node.inputs[0])
        x = _input(ctx, node)
        if ctx.opset >= 13:
            ctx.emit1(node, op_type, [x], axis=axis)
            return
        if rank is None:
            if axis != -1:
                raise GraphshapeError("softmax needs the input rank below opset 13",
                                      node=node.name, op=node.op)
            raise GraphshapeError("softmax over the last axis needs the input rank below "
                                  "opset 13", node=node.name, op=node.op)
        axis %= rank
        if axis == rank - 1:
            ctx.emit1(node, op_type, [x], axis=axis)
            return
        # before 13 Softmax flattens at `axis`: move the axis last, softmax, move it back
        perm = [d for d in range(rank) if d != axis] + [axis]
        inv = [perm.index(d) for d in range(rank)]
        t = ctx.add_node("Transpose", [x], 1, name=f"{node.name}.to_last", perm=perm)[0]
        s = ctx.add_node(op_type, [t], 1, name=f"{node.name}.last", axis=rank - 1)[0]
        ctx.emit1(node, "Transpose", [s], perm=inv)
    return emit


_REDUCE_OPS = {"mean": "ReduceMean", "sum": "ReduceSum", "max": "ReduceMax",
               "min": "ReduceMin", "prod": "ReduceProd"}


def _emit_reduce(ctx, node):
    a = node.attrs
    kind = a.get("kind", "mean")
    if kind not in _REDUCE_OPS:
        raise GraphshapeError(f"unknown reduction {kind!r}", node=node.name, op=node.op)
    op_type = _REDUCE_OPS[kind]
    axes = a.get("axes")
    input_from = 13 if op_type == "ReduceSum" else 18
    extra, attrs = _axes_form(ctx, op_type, None if axes is None else list(axes), input_from)
    ctx.emit1(node, op_type, [_input(ctx, node)] + extra,
              keepdims=int(bool(a.get("keepdims", False))), **attrs)


# ---- opaque --------------------------------------------------------------------------
def _emit_opaque(ctx, node):
    import onnx

    a = node.attrs
    if a.get("framework") != "onnx":
        raise GraphshapeError(
            f"opaque {a.get('framework', 'unknown')} op "
            f"({a.get('description') or a.get('target') or 'unknown'}) has no ONNX form; "
            "replace it in the model by standard layers or export the model with "
            "torch.onnx.export instead", node=node.name, op=node.op)
    op_type, domain = a["op_type"], a.get("domain", "")
    source_opset = a.get("source_opset")
    if domain == "" and source_opset and source_opset != ctx.opset:
        try:
            old = onnx.defs.get_schema(op_type, source_opset, "").since_version
            new = onnx.defs.get_schema(op_type, ctx.opset, "").since_version
        except Exception:
            old = new = None
        if old != new:
            raise GraphshapeError(
                f"opaque ONNX op {op_type} was read at opset {source_opset}, and its definition "
                f"differs at opset {ctx.opset}; emit with opset={source_opset}",
                node=node.name, op=node.op)
    n_regular = len(a.get("input_positions", ()))
    positions = a.get("input_positions") or tuple(range(len(node.inputs)))
    inputs = ["" if p is None else ctx.value(node.inputs[p]) for p in positions]
    while inputs and inputs[-1] == "":
        inputs.pop()
    # values the node's subgraphs read by their original names
    for i, outer in enumerate(a.get("outer_scope", ())):
        ref = node.inputs[n_regular - sum(p is None for p in positions) + i]
        have = ctx.value(ref)
        if have != outer:
            if outer in ctx.used:
                raise GraphshapeError(f"subgraph value name {outer!r} is taken", node=node.name)
            ctx.used.add(outer)
            ctx.add_node("Identity", [have], [outer], name=f"{node.name}.outer")
    absent = set(a.get("absent_outputs", ()))
    outputs = ["" if i in absent else ctx.out_name(node, i) for i in range(len(node.outputs))]
    proto = onnx.NodeProto()
    proto.op_type = op_type
    proto.domain = domain
    proto.name = ctx.fresh_node_name(node.name)
    proto.input.extend(inputs)
    proto.output.extend(outputs)
    for attr in (a.get("attributes") or {}).values():
        proto.attribute.append(attr if isinstance(attr, onnx.AttributeProto)
                               else onnx.helper.make_attribute(*attr))
    ctx.nodes.append(proto)


def _not_emitted(ctx, node):  # input/output are handled by emit() itself
    return None


#: canonical op -> emitter(ctx, node). Every op of graphshape.ops.OPS has an entry.
ONNX_EMITTERS: dict[str, Callable[[_Ctx, Node], Any]] = {
    "input": _not_emitted,
    "output": _not_emitted,
    "constant": _emit_constant,
    "conv": _emit_conv,
    "conv_transpose": _emit_conv_transpose,
    "linear": _emit_linear,
    "matmul": _emit_binary("MatMul"),
    "add": _emit_add,
    "sub": _emit_binary("Sub"),
    "mul": _emit_binary("Mul"),
    "div": _emit_binary("Div"),
    "sum": _emit_sum,
    "concat": _emit_concat,
    "activation": _emit_activation,
    "batch_norm": _emit_batch_norm,
    "layer_norm": _emit_layer_norm,
    "rms_norm": _emit_rms_norm,
    "std_norm": _emit_std_norm,
    "group_norm": _emit_group_norm,
    "instance_norm": _emit_instance_norm,
    "lrn": _emit_lrn,
    "affine": _emit_affine,
    "avg_pool": _emit_avg_pool,
    "max_pool": _emit_max_pool,
    "global_avg_pool": _emit_global("GlobalAveragePool"),
    "global_max_pool": _emit_global("GlobalMaxPool"),
    "adaptive_avg_pool": _emit_adaptive("avg"),
    "adaptive_max_pool": _emit_adaptive("max"),
    "flatten": _emit_flatten,
    "reshape": _emit_reshape,
    "transpose": _emit_transpose,
    "squeeze": _emit_squeeze,
    "unsqueeze": _emit_unsqueeze,
    "slice": _emit_slice,
    "split": _emit_split,
    "pad": _emit_pad,
    "depth_to_space": _emit_depth_to_space, "space_to_depth": _emit_space_to_depth,
    "dropout": _emit_dropout,
    "identity": _emit_identity, "cast": _emit_cast,
    "resize": _emit_resize,
    "softmax": _emit_softmax("Softmax"),
    "log_softmax": _emit_softmax("LogSoftmax"),
    "reduce": _emit_reduce,
    "opaque": _emit_opaque,
}


# --------------------------------------------------------------------------- entry points
def _value_info(name: str, info, helper):
    import onnx

    dtype = info.dtype if info.dtype and info.dtype != "object" else "float32"
    try:
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except Exception:
        elem = onnx.TensorProto.FLOAT
    shape = None
    if info.shape is not None:
        shape = [d if isinstance(d, (int, str)) else None for d in info.shape]
    return helper.make_tensor_value_info(name, elem, shape)


def _static_shape_arithmetic(graph: Graph) -> set[str]:
    """Opaque nodes that only compute Python values (``x.size()``, ``getitem`` on the size
    tuple, ``floordiv``...) feeding reshapes whose output shape is static: the reshape is
    written with its static shape, so these nodes are dead in the ONNX model and are not
    emitted (they have no ONNX form of their own)."""
    dead: set[str] = set()
    outputs = {r.node for r in graph.outputs}
    for name in reversed(graph.topo_order()):
        node = graph[name]
        if (node.op != "opaque" or name in outputs or not node.outputs
                or not all(o.dtype == "object" for o in node.outputs)):
            continue
        users = graph.users(name)
        if users and all(u.name in dead or _static_reshape_shape_use(u, name) for u in users):
            dead.add(name)
    return dead


def _static_reshape_shape_use(user, name: str) -> bool:
    """Whether ``user`` is a reshape (or resize) with a fully static output shape that reads
    ``name`` only as a shape entry (not as the data input)."""
    shape = user.outputs[0].shape if user.outputs else None
    if user.op == "resize":
        # written with its traced static_sizes (and the batch and channels from Shape)
        return user.attrs.get("static_sizes") is not None and bool(user.inputs) \
            and user.inputs[0].node != name
    return (user.op == "reshape" and shape is not None
            and all(isinstance(d, int) for d in shape)
            and bool(user.inputs) and user.inputs[0].node != name)


def _without_checks(graph: Graph) -> Graph:
    """``graph`` without its :data:`~graphshape.ir.CHECK` nodes (a PyTorch model's
    ``torch._assert``, graphshape's checks of branches traced for the example inputs'
    sizes) and the size computations only they read: ONNX has no op that raises, and the
    ONNX exporters drop such checks too. ``graph`` itself when it has none."""
    checks = [n.name for n in graph if CHECK in n.meta.get("flags", ())]
    if not checks:
        return graph
    g = graph.copy(share=[a for n in graph for a in n.params.values()])  # (read only)
    for name in checks:
        g.remove(name)
    g.remove_dead()
    return g


def emit(graph: Graph, opset: int | None = None):
    """Emit ``graph`` as an ``onnx.ModelProto`` in ``opset`` (default: the source's opset
    for ONNX graphs, 17 otherwise). Input and output names are kept. Raises
    GraphshapeError naming the node when an op cannot be written in that opset."""
    import onnx

    helper = onnx.helper
    source = graph.meta.get("source")
    if opset is None:
        opset = graph.meta.get("opset") if source == "onnx" else None
        opset = int(opset or DEFAULT_TORCH_OPSET)
    opset = int(opset)
    max_opset = onnx.defs.onnx_opset_version()
    if not 9 <= opset <= max_opset:
        raise GraphshapeError(f"opset {opset} is not supported: graphshape writes opsets 9 to "
                              f"{max_opset}")
    graph = _without_checks(graph)
    ctx = _Ctx(graph, opset)
    order = graph.topo_order()
    # graph inputs and outputs keep their names: reserve them first
    inputs_vi = []
    for name in graph.inputs:
        node = graph[name]
        tensor = str(node.attrs.get("name") or name)
        if tensor in ctx.used:
            raise GraphshapeError(f"two graph inputs are named {tensor!r}", node=name)
        ctx.used.add(tensor)
        ctx.names[node.out] = tensor
        inputs_vi.append(_value_info(tensor, node.outputs[0], helper))
    out_names = []
    for name in graph.output_nodes:
        node = graph[name]
        out_names.append(str(node.attrs.get("name") or name))
    for tensor in out_names:
        if tensor in ctx.used and tensor not in ctx.names.values():
            raise GraphshapeError(f"two graph outputs are named {tensor!r}")
        ctx.used.add(tensor)
    # an output value produced by an op takes the output's name directly
    claimed: set[Ref] = set()
    pending_identity = []
    for name, tensor in zip(graph.output_nodes, out_names):
        ref = graph[name].inputs[0]
        producer = graph[ref.node]
        # graph inputs and initializers cannot be outputs under another name: Identity
        if (ref in claimed or ref in ctx.names or producer.op in ("input", "constant")
                or tensor in ctx.names.values()):
            pending_identity.append((ref, tensor))
        else:
            ctx.names[ref] = tensor
            claimed.add(ref)

    skipped = _static_shape_arithmetic(graph)
    for name in order:
        if name in skipped:
            continue
        node = graph[name]
        emitter = ONNX_EMITTERS.get(node.op)
        if emitter is None:
            raise GraphshapeError(f"the ONNX backend cannot emit op {node.op!r}",
                                  node=name, op=node.op)
        try:
            emitter(ctx, node)
        except GraphshapeError as e:
            if e.node is None:
                raise GraphshapeError(str(e), node=name, op=node.op) from None
            raise
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise GraphshapeError(
                f"cannot emit this {node.op} node as ONNX ({type(e).__name__}: {e}); its "
                "attributes do not follow graphshape.ops' conventions", node=name,
                op=node.op) from None
    for ref, tensor in pending_identity:
        ctx.add_node("Identity", [ctx.value(ref)], [tensor], name=f"{tensor}.identity")

    outputs_vi = []
    for name, tensor in zip(graph.output_nodes, out_names):
        node = graph[name]
        info = node.outputs[0] if node.outputs and node.outputs[0].dtype else graph.info(node.inputs[0])
        outputs_vi.append(_value_info(tensor, info, helper))

    g = helper.make_graph(ctx.nodes, str(graph.meta.get("graph_name") or "graphshape"),
                          inputs_vi, outputs_vi)
    imports = {"": opset}
    for domain, version in (graph.meta.get("opset_imports") or {}).items():
        if domain not in ("", "ai.onnx"):
            imports[domain] = version
    functions = list(graph.meta.get("functions") or [])
    used_domains = {n.domain for n in ctx.nodes} | {
        o.domain for f in functions for o in f.opset_import} | {f.domain for f in functions}
    opset_ids = [helper.make_opsetid(d, v) for d, v in imports.items()
                 if d == "" or d in used_domains]
    try:
        min_ir = helper.find_min_ir_version_for(opset_ids, ignore_unknown=True)
    except TypeError:  # older onnx without ignore_unknown
        min_ir = 7
    ir_version = max(min_ir, 4)
    if source == "onnx":
        ir_version = max(ir_version, int(graph.meta.get("ir_version") or 0))
    # capped for onnxruntime, but never below what the opsets require
    ir_version = max(min(ir_version, MAX_IR_VERSION), min_ir)
    model = helper.make_model(g, opset_imports=opset_ids, ir_version=ir_version,
                              producer_name="graphshape")
    model.functions.extend(functions)  # model-local functions that opaque nodes call
    if graph.meta.get("metadata_props"):
        helper.set_model_props(model, dict(graph.meta["metadata_props"]))
    if graph.meta.get("doc_string"):
        model.doc_string = graph.meta["doc_string"]
    if source == "onnx" and graph.meta.get("producer_name"):
        model.producer_name = f"graphshape (from {graph.meta['producer_name']})"
    if any(not vi.type.tensor_type.HasField("shape") for vi in outputs_vi):
        _infer_output_types(model, ctx.initializers)
    # initializers are written straight into the model: make_graph / from_array would
    # copy every weight twice more
    for name, arr in ctx.initializers:
        _write_tensor(model.graph.initializer.add(), name, arr)
    return model


def _infer_output_types(model, initializers) -> None:
    """Fill in graph outputs whose shape the IR does not know, by shape inference on the
    model with its initializers given as typed inputs (no weights are copied)."""
    import onnx

    helper = onnx.helper
    light = onnx.ModelProto()
    light.CopyFrom(model)
    for name, arr in initializers:
        if arr.size <= 64:
            _write_tensor(light.graph.initializer.add(), name, arr)
        else:
            light.graph.input.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape)))
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception as e:
        raise GraphshapeError(f"shape inference fails on the emitted model: {e}") from None
    found = {vi.name: vi for vi in inferred.graph.output}
    for vi in model.graph.output:
        new = found.get(vi.name)
        if new is not None and new.type.tensor_type.HasField("shape"):
            vi.type.CopyFrom(new.type)
        elif not vi.type.tensor_type.HasField("shape"):
            raise GraphshapeError(
                f"the shape of graph output {vi.name!r} is unknown and cannot be inferred; "
                "give the model's inputs static shapes")


def _write_tensor(tensor, name: str, arr: np.ndarray) -> None:
    import onnx

    arr = np.asarray(arr)
    tensor.name = name
    tensor.dims.extend(arr.shape)
    if arr.dtype == np.bool_ or arr.dtype.kind in "fiuc" and arr.dtype.str[0] != ">":
        tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
        tensor.raw_data = np.ascontiguousarray(arr).tobytes()
    else:  # strings, big-endian and exotic dtypes: let onnx handle them
        tensor.CopyFrom(onnx.numpy_helper.from_array(arr, name))


def check(model, full_check: bool = True) -> None:
    """``onnx.checker.check_model`` that also works for models over 2 GB (via a temp file),
    raising GraphshapeError with the checker's message."""
    import onnx

    try:
        if model.ByteSize() < _TWO_GB:
            onnx.checker.check_model(model, full_check=full_check)
        else:
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "model.onnx")
                save(model, path)
                onnx.checker.check_model(path, full_check=full_check)
    except onnx.checker.ValidationError as e:
        raise GraphshapeError(f"the emitted ONNX model fails onnx.checker: {e}") from None


def save(model, path: str | os.PathLike, *, external_data: bool | None = None,
         size_threshold: int = 1024) -> None:
    """Write ``model`` to ``path`` atomically: temp files in the destination folder, then
    ``os.replace``, so that a crash never leaves a half-written model under ``path``.

    ``external_data``: store initializers of ``size_threshold`` bytes or more in
    ``<name>.data`` beside the model (default: only when the model exceeds protobuf's
    2 GB limit). Tensors are moved out one at a time and put back afterwards, so ``model``
    is unchanged and memory never holds a second copy of the weights."""
    import onnx

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if external_data is None:
        external_data = _model_bytes(model) >= _TWO_GB - 64 * 2**20
    base = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp_data = None
    moved = []  # (tensor, offset, length) written to the data file
    try:
        if external_data:
            data_name = f"{base}.data"
            fd, tmp_data = tempfile.mkstemp(prefix=f".{data_name}.", suffix=".tmp", dir=folder)
            with os.fdopen(fd, "wb") as data_file:
                for tensor in model.graph.initializer:
                    if tensor.data_location == onnx.TensorProto.EXTERNAL:
                        continue
                    raw = (tensor.raw_data if tensor.HasField("raw_data")
                           else onnx.numpy_helper.to_array(tensor).tobytes())
                    if len(raw) < size_threshold:
                        continue
                    offset = data_file.tell()
                    pad = -offset % 4096  # aligned like onnx's own writer, for mmap
                    data_file.write(b"\0" * pad)
                    offset += pad
                    data_file.write(raw)
                    moved.append((tensor, offset, len(raw)))
                    _set_external(tensor, data_name, offset, len(raw))
                    del raw
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
            default_file_mode(tmp_data)  # mkstemp makes 0600 files
            os.replace(tmp_data, os.path.join(folder, data_name))
            tmp_data = None
        else:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
        default_file_mode(tmp)
        os.replace(tmp, path)
    finally:
        # put the weights back into the caller's model
        if moved:
            data_path = tmp_data or os.path.join(folder, f"{base}.data")
            with open(data_path, "rb") as data_file:
                for tensor, offset, length in moved:
                    data_file.seek(offset)
                    tensor.ClearField("external_data")
                    tensor.ClearField("data_location")
                    tensor.raw_data = data_file.read(length)
        for leftover in (tmp, tmp_data):
            if leftover and os.path.exists(leftover):
                os.remove(leftover)


def _set_external(tensor, location: str, offset: int, length: int) -> None:
    import onnx

    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                  "uint64_data", "string_data"):
        tensor.ClearField(field)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _model_bytes(model) -> int:
    """Size of the serialized model, summed cheaply from its initializers."""
    total = 0
    for init in model.graph.initializer:
        total += len(init.raw_data) if init.HasField("raw_data") else init.ByteSize()
    return total
