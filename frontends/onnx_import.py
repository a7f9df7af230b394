"""ONNX frontend: read an ONNX model (opset 9 and newer) into graphshape's IR.

``load_onnx(path_or_modelproto) -> Graph``.

What it does, in order:

1. reads the file (external data included; locations outside the model's folder are
   refused) and checks it with ``onnx.checker``; a corrupt or truncated file is a
   :class:`GraphshapeError`. A model below opset 9 (the ONNX model zoo's classic files) is
   converted to opset 13 with ``onnx.version_converter`` first (``graph.meta
   ["converted_from_opset"]``; shaping reports it);
2. runs ``onnx.shape_inference`` (with data propagation) on a copy of the model whose
   large initializers are replaced by typed inputs, so that big models are not copied;
3. walks the nodes in order. Initializers, ``Constant`` nodes, and every node whose
   inputs are all constant (``ConstantOfShape``, ``Shape`` of a statically shaped value,
   the ``Shape -> Gather -> Concat -> Reshape`` chains exporters write) are folded to
   numpy constants; the fold uses numpy for the common ops and
   ``onnx.reference.ReferenceEvaluator`` for the rest;
4. maps each remaining node to a canonical op of :mod:`graphshape.ops` (weights in
   PyTorch layout, pads begin/end, non-negative axes), or to an ``opaque`` node that
   carries ``op_type``, ``domain`` and the original ``AttributeProto`` objects so that
   :mod:`graphshape.backend_onnx` writes it back unchanged.

Also: exporters' decompositions are read back as one op (the opset<17 LayerNorm chain ->
layer_norm, x ** 2 -> square; spelled-out activations such as x * sigmoid(x) or the
opset<20 erf GELU, by :mod:`graphshape.passes.elementwise` at the end), so that opset 13
and 17 exports of a model give the same IR; and shape vectors computed from a partly known
shape (a dynamic batch) are evaluated as far as they are known, so that
``x.view(x.size(0), ...)`` becomes a reshape with -1 for the batch and shape inference
continues past it: a dim copied from the input's symbolic shape stays a copy
(``x.flatten(2)``: ``Concat(Shape(x)[:2], [-1])``), and the other ops on small int
tensors (the exporter's ``F.pad`` idiom, a window size's ``Mod``) are evaluated with
``onnx.reference`` once their inputs are known.

Constants are materialized as ``constant`` IR nodes only where a signal op consumes them.
"""

from __future__ import annotations

import copy
import io
import math
import os
from typing import Any

import numpy as np

from graphshape.backend_onnx import HELPER_PREFIX
from graphshape.errors import GraphshapeError
from graphshape.ir import (FLOAT_DTYPES, TENSOR_CONTAINER, Graph, Node, Ref, TensorInfo,
                           cache_weight_tap_norms, constant_operand, is_non_float)
from graphshape.ops import prelu_activation, same_pads
from graphshape.passes.elementwise import fuse_decompositions, is_onnx_norm

# Initializers larger than this many bytes are replaced by typed graph inputs in the copy
# that shape inference sees (shape inference only reads small constants' values).
_SHAPE_INFERENCE_INLINE_BYTES = 4096

# Ops never folded even when their inputs are constant (non-deterministic or stateful).
_NEVER_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
               "Multinomial", "Bernoulli", "If", "Loop", "Scan", "SequenceConstruct",
               "SequenceEmpty", "Optional"}

#: ops that onnxruntime defines in the default ONNX domain although ONNX does not (its
#: transformer optimizer writes them there): LayerNormalization before opset 17, and the
#: RMS norm SimplifiedLayerNormalization. Read as the standard ops; not checked against
#: the ONNX schemas.
_ORT_DEFAULT_DOMAIN_OPS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization"})

#: onnxruntime contrib ops (com.microsoft) -> (standard op with the same output shape, how
#: many inputs it takes, the attributes it keeps): what shape inference sees in their place
_ORT_SHAPE_STAND_INS = {
    "FusedConv": ("Conv", 3, {"auto_pad", "dilations", "group", "kernel_shape", "pads",
                              "strides"}),
    "FusedGemm": ("Gemm", 3, {"alpha", "beta", "transA", "transB"}),
    "QuickGelu": ("Identity", 1, set()), "Gelu": ("Identity", 1, set()),
    "BiasGelu": ("Add", 2, set()), "FastGelu": ("Add", 2, set()),
    # norms: output 0 (and a skip norm's output 3, the sum) has the shape of input + skip
    "LayerNormalization": ("Identity", 1, set()),
    "SimplifiedLayerNormalization": ("Identity", 1, set()),
    "SkipLayerNormalization": ("Add", 2, set()),
    "SkipSimplifiedLayerNormalization": ("Add", 2, set()),
}

# ONNX activation ops with a direct registry name (graphshape.activations).
_SIMPLE_ACTIVATIONS = {
    "Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Softplus": "softplus",
    "Softsign": "softsign", "Erf": "erf", "Mish": "mish", "HardSwish": "hardswish",
    "Atan": "atan", "Asinh": "asinh",
}

# ops whose integer outputs _track_partial follows
_PARTIAL_OPS = {"Shape", "Gather", "Unsqueeze", "Concat", "Cast", "Slice", "Identity"}

_REDUCE_KINDS = {"ReduceMean": "mean", "ReduceSum": "sum", "ReduceMax": "max",
                 "ReduceMin": "min", "ReduceProd": "prod"}


def _copy_zero_dims(target: list[int], in_shape) -> list[int]:
    """A constant Reshape target with ONNX's 0 ("copy this input dim") spelled out: the
    known dims copied; one unknown dim copied (a dynamic batch: GroupNorm's ``[0, G, -1]``)
    becomes -1, the target's own -1 then computed from the input's other, known dims."""
    unknown = [i for i, d in enumerate(target) if d == 0 and (
        in_shape is None or i >= len(in_shape) or not isinstance(in_shape[i], int))]
    if len(unknown) > 1 or (unknown and not all(
            isinstance(d, int) for i, d in enumerate(in_shape) if i != unknown[0])):
        raise _Unsupported("0 copies an unknown dim")
    target = [in_shape[i] if d == 0 and i not in unknown else d for i, d in enumerate(target)]
    if unknown:
        k = unknown[0]
        target = _fill_minus_one(target, in_shape, {k})
        if target is None:
            raise _Unsupported("0 copies an unknown dim")
        target[k] = -1
    return target


def _fill_minus_one(target: list, in_shape, copies) -> list | None:
    """``target`` with its -1 (if any) computed from the input's dims outside ``copies``
    (the positions where the target copies the input's dim), or None when those dims or
    the target's other entries are not all known, or do not divide."""
    if -1 not in target:
        return list(target)
    others = [d for i, d in enumerate(target) if i not in copies and d != -1]
    rest = [d for i, d in enumerate(in_shape) if i not in copies]
    if not all(isinstance(d, int) for d in others + rest):
        return None
    known, total = int(np.prod(others)), int(np.prod(rest))
    if known <= 0 or total % known:
        return None
    return [total // known if d == -1 else d for d in target]


class _FusedParts:
    """The standard nodes a fused contrib op (``node``) stands for, built one by one, then
    read by their own readers (:meth:`read`). The values between them are named after
    ``node``'s output; the last part writes that output."""

    def __init__(self, reader, node):
        self.reader, self.node, self.nodes = reader, node, []

    def add(self, op_type: str, inputs, info: TensorInfo | None = None, **attrs) -> str:
        """A part; its output's info is ``info`` (default: the fused node's output's)."""
        out = self.node.output[0]
        value = f"{out}::{len(self.nodes)}.{op_type}"
        self.reader.infos[value] = info if info is not None else self.reader.info(out)
        self.reader.uses[value] = 1
        self.nodes.append(self.reader.onnx.helper.make_node(op_type, list(inputs), [value],
                                                            **attrs))
        return value

    def const(self, label: str, value: np.ndarray) -> str:
        name = f"{self.node.output[0]}::{label}"
        self.reader.consts[name] = value
        return name

    def read(self, name: str) -> None:
        """Read the parts: the layer (Conv, Gemm, MatMul) takes IR name ``name``, the others
        ``name`` and their op type."""
        self.nodes[-1].output[0] = self.node.output[0]
        for part in self.nodes:
            handler = self.reader._handler("", part.op_type)
            layer = part.op_type in ("Conv", "Gemm", "MatMul")
            handler(part, _attr_dict(part), name if layer else f"{name}_{part.op_type.lower()}")


class _Unsupported(Exception):
    """Raised by an op handler when this instance cannot be mapped: becomes opaque."""


def load_onnx(model: Any, *, cache_weight_norms: bool = True) -> Graph:
    """Read an ONNX file path, ``onnx.ModelProto`` or serialized model (bytes, or a binary
    file object such as the ``BytesIO`` ``torch.onnx.export`` wrote, read from its current
    position; as ``onnxruntime.InferenceSession`` takes them) into a :class:`Graph`.

    ``graph.meta`` gets ``source="onnx"``, ``opset`` (default-domain version),
    ``opset_imports`` (domain -> version), ``ir_version``, ``producer_name``,
    ``input_names``, ``output_names`` and ``graph_name``. ``cache_weight_norms``: read
    every conv/linear weight now for the analysis
    (:func:`graphshape.ir.cache_weight_tap_norms`), as the PyTorch frontend does; False
    where the weights are about to be replaced (shaping).
    """
    import onnx

    if isinstance(model, (str, os.PathLike)):
        proto = _read_file(os.fspath(model))
    elif is_serialized(model):
        proto = _parse_bytes(model)
    elif isinstance(model, onnx.ModelProto):
        proto = model
        _check_external_loaded(proto)
    else:
        raise GraphshapeError(
            f"load_onnx expects a file path, an onnx.ModelProto or its serialized bytes, not "
            f"{type(model).__name__}")
    proto, old_opset = _convert_old_opset(proto)
    graph = _Importer(proto).run()
    # what the exporter spelled out and the import's own patterns left (the RMS norm
    # chain, mish before opset 18, the tanh GELU before opset 20, hand-written forms)
    fuse_decompositions(graph, copy=False)
    fold_written_transforms(graph)
    if old_opset is not None:
        graph.meta["converted_from_opset"] = old_opset
    if cache_weight_norms:
        cache_weight_tap_norms(graph)
    return graph


def fold_written_transforms(graph: Graph) -> list[str]:
    """Fold the scalar ``Mul`` / ``Add`` nodes graphshape's ONNX backend wrote around a
    transformed activation ``act`` (named ``act.input_scale``, ``act.input_shift``,
    ``act.output_shift``, ``act.output_scale``: ``s * (phi(a x + b) + d)``) back into its
    ``transform``, in place; returns the activations folded. Read as separate nodes, the
    shifts were taken for variance: ``graphshape.analyze`` of a DKS-shaped ONNX ResNet-18
    predicted q = 11 at the output (measured 0.92; 1.00 predicted for the same network
    shaped in PyTorch), and shaping the file again kept the old transform around the new
    one. Only nodes with exactly these names, one scalar constant each and no other reader
    fold."""
    folded = []
    for act in [n for n in graph if n.op == "activation" and not n.attrs.get("transform")]:
        if len(act.inputs) != 1:
            continue
        transform, pre, post = {}, [], []
        ref = act.inputs[0]  # producer side: x -> Mul(a) -> Add(b) -> act
        for key, op in (("input_shift", "add"), ("input_scale", "mul")):
            prev = graph[ref.node]
            found = _named_scalar_op(graph, prev, act.name, key, op)
            if found is None or len(graph.users(prev.name)) != 1 or graph.is_output(prev.out):
                continue
            ref, transform[key] = found
            pre.append(prev)
        source, cur = ref, act  # consumer side: act -> Add(d) -> Mul(s)
        for key, op in (("output_shift", "add"), ("output_scale", "mul")):
            users = graph.users(cur.name)
            if len(users) != 1 or graph.is_output(cur.out):
                break
            found = _named_scalar_op(graph, users[0], act.name, key, op)
            if found is None or found[0].node != cur.name:
                continue
            transform[key] = found[1]
            post.append(users[0])
            cur = users[0]
        if not transform:
            continue
        graph.replace_uses(cur.out, act.out, exclude=[act.name])
        graph.set_inputs(act.name, [source])
        constants = {r.node for n in pre + post for r in n.inputs
                     if graph[r.node].op == "constant"}
        for node in [*reversed(post), *pre]:  # (each read by the next one only)
            graph.remove(node.name)
        graph.remove_unread(constants)
        act.attrs["transform"] = transform
        folded.append(act.name)
    return folded


def _named_scalar_op(graph: Graph, node, act: str, key: str, op: str
                     ) -> tuple[Ref, float] | None:
    """``(its other input, the constant)`` when ``node`` is ``op`` named ``<base>.<key>``
    with one scalar constant operand, where activation ``act`` is named ``base`` (or
    ``base_<n>``, as the backend names a node whose name was taken), else None."""
    if node is None or node.op != op or len(node.inputs) != 2 \
            or not node.name.endswith(f".{key}"):
        return None
    base = node.name[:-len(key) - 1]
    if act != base and not (act.startswith(f"{base}_") and act[len(base) + 1:].isdigit()):
        return None
    operand = constant_operand(graph, node)
    if operand is None or operand[1].size != 1:
        return None
    return node.inputs[operand[0]], float(operand[1].reshape(-1)[0])


def is_serialized(model: Any) -> bool:
    """Bytes, or a binary file object (read / seek): a serialized model, not a path."""
    return isinstance(model, (bytes, bytearray, memoryview)) or (
        hasattr(model, "read") and hasattr(model, "seek") and not isinstance(model, str))


def _has_graph(proto) -> bool:
    """Whether a parsed model holds a graph (an empty or truncated file parses to none)."""
    return proto.HasField("graph") and bool(proto.graph.node or proto.graph.output)


def _parse_bytes(data):
    """An ``onnx.ModelProto`` from serialized bytes or a binary file object."""
    import onnx

    if hasattr(data, "read"):
        if isinstance(data, io.TextIOBase):
            raise GraphshapeError("the file object is open in text mode: open the ONNX file "
                                  "with 'rb', or pass its path")
        data = data.read()
    data = bytes(data)
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf DecodeError: truncated, or not a model at all
        raise GraphshapeError(
            f"the {len(data)} bytes given are not a readable ONNX model ({type(e).__name__}: "
            f"{e}); they are corrupt or truncated: export the model again") from None
    if not _has_graph(proto):
        raise GraphshapeError(f"the {len(data)} bytes given hold no ONNX graph (empty or "
                              "truncated); export the model again")
    _check_external_loaded(proto)
    return proto


#: the opset older models are converted to (onnx.version_converter has adapters up to it
#: from every opset since 1, and every runtime of the last years runs it)
CONVERT_TO_OPSET = 13


def _opset_imports(proto) -> dict[str, int]:
    """Domain -> version of the model's opset imports ("ai.onnx" read as "")."""
    return {(o.domain if o.domain != "ai.onnx" else ""): o.version for o in proto.opset_import}


def _convert_old_opset(proto):
    """``(proto, None)``, or for a model below opset 9 (the ONNX model zoo's classic
    ResNet, VGG, SqueezeNet, GoogLeNet files are opset 3-8) ``(converted copy, old
    opset)``: onnx.version_converter rewrites it to :data:`CONVERT_TO_OPSET` (BatchNorm's
    ``spatial``, Upsample's scales attribute, Dropout's ``is_test``...). The caller's model
    is not changed."""
    import onnx
    from onnx import version_converter

    opset = _opset_imports(proto).get("", 0)
    if not opset or opset >= 9:
        return proto, None
    try:
        converted = version_converter.convert_version(proto, CONVERT_TO_OPSET)
        _declare_initializers_as_inputs(converted)
        onnx.checker.check_model(converted)
    except Exception as e:  # the converter's own errors name the op it has no adapter for
        raise GraphshapeError(
            f"the model uses ONNX opset {opset}; graphshape reads opset 9 and newer, and "
            f"onnx.version_converter could not convert it to opset {CONVERT_TO_OPSET} "
            f"({type(e).__name__}: {str(e).strip()[:300]}). Re-export the model at a newer "
            "opset") from None
    return converted, opset


def _declare_initializers_as_inputs(proto) -> None:
    """Below IR version 4 every initializer must also be a graph input; the converter's
    adapters add initializers (Pad-11's pads, Upsample's scales...) without declaring them,
    and the checker then refuses the converted model."""
    from onnx import helper

    if proto.ir_version >= 4:
        return
    declared = {i.name for i in proto.graph.input}
    for init in proto.graph.initializer:
        if init.name not in declared:
            proto.graph.input.append(
                helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))


# --------------------------------------------------------------------------- reading
def _read_file(path: str):
    import onnx
    from onnx import external_data_helper

    if not os.path.isfile(path):
        raise GraphshapeError(f"no such ONNX file: {path!r}")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf DecodeError, truncated file, not a model at all
        raise GraphshapeError(
            f"{path!r} is not a readable ONNX model ({type(e).__name__}: {e}); "
            "the file is corrupt or truncated: export or download it again") from None
    if not _has_graph(proto):
        raise GraphshapeError(
            f"{path!r} holds no ONNX graph (empty or truncated file); export it again")
    base_dir = os.path.dirname(os.path.abspath(path))
    real_base = os.path.realpath(base_dir)
    needs_external = False
    for tensor in external_data_helper._get_all_tensors(proto):
        if not external_data_helper.uses_external_data(tensor):
            continue
        needs_external = True
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = os.path.realpath(os.path.join(base_dir, location))
        if (not location or os.path.isabs(location)
                or os.path.commonpath([real_base, target]) != real_base):
            raise GraphshapeError(
                f"{path!r}: tensor {tensor.name!r} points to external data at {location!r}, "
                "which lies outside the model's folder; graphshape only reads external data "
                "stored beside the model (move the data file next to the .onnx file)")
        if not os.path.isfile(target):
            raise GraphshapeError(
                f"{path!r}: external data file {location!r} of tensor {tensor.name!r} is "
                "missing; copy it next to the model")
    if needs_external:
        try:
            external_data_helper.load_external_data_for_model(proto, base_dir)
        except Exception as e:
            raise GraphshapeError(
                f"{path!r}: could not read external data ({type(e).__name__}: {e}); the data "
                "file is truncated or does not match the model") from None
    return proto


def _check_external_loaded(proto) -> None:
    from onnx import external_data_helper

    for tensor in external_data_helper._get_all_tensors(proto):
        if external_data_helper.uses_external_data(tensor):
            raise GraphshapeError(
                f"the ModelProto's tensor {tensor.name!r} still points to external data; "
                "pass the .onnx file path instead (graphshape then reads the data beside it)")


# --------------------------------------------------------------------------- helpers
def _attr_dict(node) -> dict[str, Any]:
    import onnx

    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode("utf-8")
        out[a.name] = v
    return out


def _holds_float_tensors(type_proto) -> bool:
    """A sequence / optional (nested) of floating-point tensors: an "object" value that
    carries signals (mvit's export builds its pooled tensors with Loop and SequenceInsert)."""
    from onnx import TensorProto

    floats = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
    if type_proto.HasField("sequence_type"):
        return _holds_float_tensors(type_proto.sequence_type.elem_type)
    if type_proto.HasField("optional_type"):
        return _holds_float_tensors(type_proto.optional_type.elem_type)
    if type_proto.HasField("tensor_type"):
        return type_proto.tensor_type.elem_type in floats
    return False


def _dtype_name(elem_type: int) -> str:
    """An ONNX element type as the IR's dtype name ("float32", "int64", "bfloat16")."""
    import onnx

    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except Exception:  # a type numpy does not have
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _tensor_info(type_proto) -> TensorInfo:
    import onnx

    if not type_proto.HasField("tensor_type"):
        return TensorInfo(None, "object")
    tt = type_proto.tensor_type
    dtype = _dtype_name(tt.elem_type) if tt.elem_type else None
    if not tt.HasField("shape"):
        return TensorInfo(None, dtype)
    dims = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return TensorInfo(tuple(dims), dtype)


def _known_dims(info: TensorInfo) -> int:
    """How much of a value's shape is known: -1 for unknown rank, else the static dims."""
    if info.shape is None:
        return -1
    return sum(isinstance(d, int) for d in info.shape)


# the ops _resolve_dynamic_reshapes evaluates (their inputs are never substituted)
_CHAIN_OPS = {"Constant", "Shape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Gather",
              "Concat", "Add", "Sub", "Mul", "Div", "ConstantOfShape", "Equal", "Where"}


def _broadcast(*vectors):
    """Int vectors (entries may be None) broadcast to one length, or None when they do not
    broadcast."""
    lengths = {len(v) for v in vectors if len(v) != 1}
    if len(lengths) > 1:
        return None
    n = lengths.pop() if lengths else 1
    return [v * n if len(v) == 1 else v for v in vectors]


def _copied_dims(target: list, in_shape) -> list[int] | None:
    """A Reshape target computed at run time, as a constant for shape inference, or None.
    Its entries are ints, symbols (dims copied from a symbolic shape) or None (unknown). A
    symbol at the position where the input has that same symbol copies that dim
    (``x.flatten(2)`` exported as ``Concat(Shape(x)[:2], [-1])`` with a dynamic batch):
    ONNX's 0. With one such copy, the target's -1 is computed from the input's other,
    known dims; otherwise at most one entry may be unknown (written -1)."""
    copies = [i for i, d in enumerate(target) if isinstance(d, str) and in_shape is not None
              and i < len(in_shape) and in_shape[i] == d]
    others = [d for i, d in enumerate(target) if i not in copies]
    if copies and all(isinstance(d, int) and d != 0 for d in others):
        target = _fill_minus_one(target, in_shape, set(copies))
        if target is None:
            return None
        return [0 if i in copies else d for i, d in enumerate(target)]  # ONNX: copy
    target = [None if isinstance(d, str) else d for d in target]
    if 0 in target or sum(d is None or d == -1 for d in target) > 1:
        return None
    return [-1 if d is None else d for d in target]


# ops on small integer tensors that _resolve_dynamic_reshapes evaluates with onnx.reference
# when all their inputs are known (the exporter's F.pad idiom: Reshape(-1, 2) -> Slice with
# step -1 -> Transpose -> Reshape(-1); a window size's Mod)
_EVALUATED_OPS = {"Reshape", "Transpose", "Slice", "Mod", "Range", "Neg", "Abs", "Max", "Min",
                  "ReduceProd", "ReduceSum", "ReduceMax", "ReduceMin", "Expand", "Tile",
                  "Flatten", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And",
                  "Or", "Sign", "Size"}
_SMALL = 256  # entries: a shape computation's tensors, never a layer's


def _evaluate_small(node, inputs, opset, memo):
    """Outputs of ``node`` on small int arrays (onnx.reference), or None."""
    key = (node.op_type, tuple(node.input), tuple(node.output),
           tuple((a.shape, a.tobytes()) if a is not None else None for a in inputs))
    if key not in memo:
        from onnx.reference import ReferenceEvaluator

        try:
            names = [n for n in node.input if n]
            feeds = {n: a for n, a in zip(node.input, inputs) if n}
            evaluator = ReferenceEvaluator(node, opsets={"": opset})
            memo[key] = dict(zip(node.output, evaluator.run(None, feeds))) if names or \
                node.op_type == "Range" else None
        except Exception:  # noqa: BLE001 - any failure leaves the value unknown
            memo[key] = None
    return memo[key]


def _resolve_dynamic_reshapes(nodes, consts, infos, done, opset=17, memo=None):
    """Integer vectors computed at run time from shapes (Shape, Gather, Unsqueeze,
    Squeeze, Concat, Cast, Identity, Slice, integer Add/Sub/Mul/Div, Constant, and the
    ConstantOfShape / Equal / Where that torch's exporter writes for ``expand(n, -1, -1)``),
    evaluated from the known dims of ``infos`` and the constants. Returns (node, input index, value)
    for every input of a non-shape op that is fully known, and for Reshape targets (not in
    ``done``) with at most one unknown entry, given as -1."""
    from onnx import numpy_helper

    # value -> entries: an int, a dim's symbol (str, from a Shape of a tensor whose dim is
    # symbolic: "batch", "unk__0") or None (unknown); scalars as 1-element
    known: dict[str, list] = {}
    scalars: set[str] = set()
    # small int tensors fully known, any rank (the 2-D pads of the F.pad idiom)
    arrays: dict[str, np.ndarray] = {}
    memo = {} if memo is None else memo

    def array(name):
        if name in arrays:
            return arrays[name]
        if name in consts and consts[name].dtype.kind in "iub" and consts[name].size <= _SMALL:
            return consts[name]
        values = known.get(name)
        if values is not None and all(isinstance(v, int) for v in values):
            return np.array(values[0] if name in scalars else values, np.int64)
        return None

    def vec(name):
        if name in known:
            return known[name]
        if name in consts and consts[name].dtype.kind in "iu" and consts[name].ndim <= 1:
            if consts[name].ndim == 0:
                scalars.add(name)
            return [int(v) for v in consts[name].reshape(-1)]
        return None

    out = []
    for node in nodes:
        if node.domain not in ("", "ai.onnx"):
            continue
        op, a = node.op_type, None
        try:
            if op == "Constant":
                value = _constant_value(node, _attr_dict(node))
                if value is not None and value.dtype.kind in "iu" and value.ndim <= 1:
                    known[node.output[0]] = [int(v) for v in value.reshape(-1)]
                    if value.ndim == 0:
                        scalars.add(node.output[0])
            elif op == "Shape":
                info = infos.get(node.input[0])
                if info is not None and info.shape is not None:
                    a = _attr_dict(node)
                    dims = [d if isinstance(d, (int, str)) and d != "" else None
                            for d in info.shape]
                    known[node.output[0]] = dims[a.get("start", 0):a.get("end", None)]
            elif op in ("Cast", "Identity", "Squeeze", "Unsqueeze"):
                src = vec(node.input[0])
                if src is not None and (op != "Squeeze" or len(src) == 1):
                    known[node.output[0]] = src
                    if op == "Squeeze" or (op in ("Cast", "Identity") and node.input[0] in scalars):
                        scalars.add(node.output[0])
            elif op == "Gather":
                src, idx = vec(node.input[0]), vec(node.input[1])
                if src is not None and idx is not None and _attr_dict(node).get("axis", 0) == 0:
                    known[node.output[0]] = [src[i] for i in idx]
                    if node.input[1] in scalars:
                        scalars.add(node.output[0])
            elif op == "Concat":
                parts = [vec(n) for n in node.input]
                if all(p is not None for p in parts):
                    known[node.output[0]] = [d for p in parts for d in p]
            elif op == "Slice" and len(node.input) >= 3:
                src, st, en = vec(node.input[0]), vec(node.input[1]), vec(node.input[2])
                steps = vec(node.input[4]) if len(node.input) > 4 and node.input[4] else [1]
                if src is not None and st is not None and en is not None and None not in st + en:
                    known[node.output[0]] = src[st[0]:min(en[0], 2**62):steps[0]]
            elif op in ("Add", "Sub", "Mul", "Div", "Equal"):
                x, y = vec(node.input[0]), vec(node.input[1])
                pair = _broadcast(x, y) if x is not None and y is not None else None
                if pair is not None:
                    fn = {"Add": lambda p, q: p + q, "Sub": lambda p, q: p - q,
                          "Mul": lambda p, q: p * q,
                          "Div": lambda p, q: int(p / q) if q else None,
                          "Equal": lambda p, q: int(p == q)}[op]
                    known[node.output[0]] = [fn(p, q) if isinstance(p, int) and isinstance(
                        q, int) else None for p, q in zip(*pair)]
                    if node.input[0] in scalars and node.input[1] in scalars:
                        scalars.add(node.output[0])
            elif op == "Where":
                parts = [vec(n) for n in node.input[:3]]
                parts = _broadcast(*parts) if None not in parts else None
                if parts is not None:
                    known[node.output[0]] = [(p if c else q) if isinstance(c, int) else None
                                             for c, p, q in zip(*parts)]
            elif op == "ConstantOfShape":
                shape = vec(node.input[0])
                fill = _attr_dict(node).get("value")
                fill = (np.zeros(1, np.float32) if fill is None
                        else numpy_helper.to_array(fill).reshape(-1))
                if (shape is not None and len(shape) == 1 and isinstance(shape[0], int)
                        and fill.dtype.kind in "iu"):
                    known[node.output[0]] = [int(fill[0])] * shape[0]
            if (op in _EVALUATED_OPS and node.output and node.output[0] not in known
                    and all(n == "" or array(n) is not None for n in node.input)):
                outputs = _evaluate_small(node, [array(n) if n else None for n in node.input],
                                          opset, memo)
                for name, value in (outputs or {}).items():
                    value = np.asarray(value)
                    if value.dtype.kind in "iub" and value.size <= _SMALL:
                        arrays[name] = value
                        if value.ndim <= 1:
                            known[name] = [int(v) for v in value.reshape(-1)]
                            if value.ndim == 0:
                                scalars.add(name)
                if node.output[0] in arrays:
                    continue  # (a step of a shape computation: nothing to hand over)
            if op not in _CHAIN_OPS:
                # a fully known int vector computed at run time (Slice starts, Expand
                # shapes, ...): hand it to shape inference as a constant
                for index, name in enumerate(node.input):
                    if not name or name in consts or (op == "Reshape" and index == 1):
                        continue
                    values = known.get(name)
                    if values is not None and all(isinstance(v, int) for v in values):
                        out.append((node, index, values if name not in scalars else values[0]))
            if op == "Reshape" and node.output[0] not in done and node.input[1] not in consts:
                target = vec(node.input[1])
                info = infos.get(node.input[0])
                if target is None:
                    continue
                a = _attr_dict(node)
                in_shape = None if info is None else info.shape
                if not a.get("allowzero", 0) and in_shape is not None:
                    target = [in_shape[i] if d == 0 and i < len(in_shape) else d
                              for i, d in enumerate(target)]
                target = _copied_dims(target, in_shape)
                if target is None:
                    continue
                out.append((node, 1, target))
        except (IndexError, TypeError, ValueError, KeyError):
            continue  # an unexpected form: leave the value unknown
    return out


def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def _readable_names(nodes) -> list[str]:
    """Short readable IR names for ONNX nodes. PyTorch's exporter writes scope paths
    like ``/layer1/layer1.0/conv1/Conv``: drop the scope parts that the next part
    repeats (``layer1``), join with dots, and drop the op type where the rest is unique
    (``layer1.0.conv1``)."""
    long_names, short_names = [], []
    for node in nodes:
        raw = node.name or (node.output[0] if node.output else node.op_type)
        if raw.startswith("/"):
            parts = [p for p in raw.split("/") if p]
            if len(parts) > 1 and parts[-1].endswith("Fusion"):
                parts.pop()  # onnxruntime names a fused node <its first node's>/<fusion>/
            keep = [p for i, p in enumerate(parts)
                    if not (i + 1 < len(parts) and parts[i + 1].startswith(p + "."))]
            long_name = ".".join(keep)
            # (onnxruntime keeps the name of the Conv it fused into a FusedConv)
            op_types = (node.op_type, node.op_type.removeprefix("Fused"))
            short = ".".join(keep[:-1]) if len(keep) > 1 and keep[-1].split("_")[0] in op_types \
                else None
        else:
            long_name, short = raw, None
        long_names.append(long_name)
        short_names.append(short)
    counts: dict[str, int] = {}
    for s in short_names:
        if s:
            counts[s] = counts.get(s, 0) + 1
    return [s if s and counts[s] == 1 else ln for s, ln in zip(short_names, long_names)]


def _pads_from_auto(auto_pad, in_spatial, kernel, strides, dilations):
    """Explicit begin/end pads for ``auto_pad`` SAME_UPPER / SAME_LOWER / VALID."""
    k = len(kernel)
    if auto_pad in ("", "NOTSET"):
        return None
    if auto_pad == "VALID":
        return (0,) * (2 * k)
    if in_spatial is None or not _static(in_spatial):
        raise _Unsupported(f"auto_pad={auto_pad} needs static spatial sizes")
    upper = same_pads(in_spatial, kernel, strides, dilations)
    if auto_pad != "SAME_UPPER":  # SAME_LOWER: the odd pad at the beginning
        upper = [(end, begin) for begin, end in upper]
    return tuple(b for b, _ in upper) + tuple(e for _, e in upper)


# --------------------------------------------------------------------------- constant folding
def _fold_numpy(op, inputs, attrs, opset):
    """Evaluate common shape/constant ops with numpy; None if not handled here."""
    if op == "Identity":
        return [inputs[0]]
    if op == "Cast":
        import onnx

        return [np.asarray(inputs[0]).astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))]
    if op == "Gather":
        axis = attrs.get("axis", 0)
        return [np.take(inputs[0], inputs[1].astype(np.int64), axis=axis)]
    if op == "Concat":
        return [np.concatenate([np.asarray(x) for x in inputs], axis=attrs["axis"])]
    if op == "Unsqueeze":
        axes = attrs.get("axes") if opset < 13 else inputs[1].tolist()
        x = inputs[0]
        rank = x.ndim + len(axes)
        for a in sorted(a % rank for a in axes):
            x = np.expand_dims(x, a)
        return [x]
    if op == "Squeeze":
        axes = attrs.get("axes") if opset < 13 else (inputs[1].tolist() if len(inputs) > 1 else None)
        x = inputs[0]
        return [np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(a % x.ndim for a in axes))]
    if op in ("Add", "Sub", "Mul") and all(np.asarray(x).dtype.kind == "f" for x in inputs) or (
            op in ("Add", "Sub", "Mul") and all(np.asarray(x).dtype.kind in "iu" for x in inputs)):
        a, b = inputs
        out = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op](a, b)
        return [out.astype(np.result_type(a.dtype, b.dtype) if a.dtype == b.dtype else out.dtype)]
    if op == "Reshape":
        shape = [int(s) for s in inputs[1]]
        x = inputs[0]
        if not attrs.get("allowzero", 0):
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return [x.reshape(shape)]
    if op == "Transpose":
        perm = attrs.get("perm")
        return [np.transpose(inputs[0], perm)]
    return None


def _fold_reference(node, inputs):
    """Evaluate one node on constant inputs with onnx.reference.ReferenceEvaluator."""
    from onnx.reference import ReferenceEvaluator

    feeds = {}
    for name, value in zip(node.input, inputs):
        if name:
            feeds[name] = value
    results = ReferenceEvaluator(node).run(None, feeds)
    return [np.asarray(r) for r in results]


def _constant_value(node, attrs):
    import onnx
    from onnx import numpy_helper

    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    if "value_float" in attrs:
        return np.array(attrs["value_float"], np.float32)
    if "value_floats" in attrs:
        return np.array(attrs["value_floats"], np.float32)
    if "value_int" in attrs:
        return np.array(attrs["value_int"], np.int64)
    if "value_ints" in attrs:
        return np.array(attrs["value_ints"], np.int64)
    return None


# --------------------------------------------------------------------------- importer
class _Importer:
    def __init__(self, proto):
        import onnx

        self.onnx = onnx
        self.proto = proto
        self.opset_imports = _opset_imports(proto)
        self.opset = self.opset_imports.get("", 0)  # >= 9: load_onnx converts older models
        self.g = Graph({
            "source": "onnx", "opset": self.opset, "opset_imports": dict(self.opset_imports),
            "ir_version": proto.ir_version, "producer_name": proto.producer_name,
            "producer_version": proto.producer_version, "graph_name": proto.graph.name,
            "input_names": [], "output_names": [o.name for o in proto.graph.output],
            "functions": list(proto.functions),
            "metadata_props": {p.key: p.value for p in proto.metadata_props},
            "doc_string": proto.doc_string,
            # an ONNX graph describes inference: the torch backend emits it in eval mode
            "training": False,
        })
        for f in proto.functions:  # their domains' versions, needed to emit calls again
            for o in f.opset_import:
                self.g.meta["opset_imports"].setdefault(o.domain, o.version)
        self.consts: dict[str, np.ndarray] = {}
        self.initializer_names: set[str] = set()  # the file's stored weights (run() fills it)
        # a value equal to an initializer that a node made from it (Expand to its own shape):
        # value name -> the initializer's name, which names its constant node
        self.weight_names: dict[str, str] = {}
        # shape vectors with some entries unknown (see _track_partial)
        self.partials: dict[str, list] = {}
        # Reshape output -> target resolved from a partly known shape (-1 = the unknown)
        self.reshape_targets: dict[str, tuple] = {}
        self.scalar_partials: set[str] = set()
        self.refs: dict[str, Ref] = {}
        self.infos: dict[str, TensorInfo] = {}
        self.tensor_containers: set[str] = set()  # "object" values holding float tensors
        self.uses: dict[str, int] = {}
        # ("node", IR name) / ("ref", ONNX value) in creation order, to undo a handler
        # that gives up half way
        self._journal: list[tuple[str, str]] = []

    # ----------------------------------------------------------------- setup
    def _check_structure(self) -> None:
        """Name the node behind the structural faults that onnx.checker reports without
        one: dangling tensor names, cycles, two producers of one value, ops that are not
        ONNX ops (or not in this opset), graph outputs nothing produces. Nodes that are
        merely out of order (an acyclic graph) are sorted, in a copy of the model."""
        import networkx as nx

        onnx = self.onnx
        graph = self.proto.graph
        defined = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {
            s.values.name for s in graph.sparse_initializer}
        producer: dict[str, int] = {}
        labels = [n.name or f"#{i} ({n.op_type})" for i, n in enumerate(graph.node)]
        for i, node in enumerate(graph.node):
            domain = node.domain if node.domain != "ai.onnx" else ""
            if domain == "com.microsoft.nchwc":
                raise GraphshapeError(
                    "this file was saved by onnxruntime at optimization level ORT_ENABLE_ALL: "
                    "its com.microsoft.nchwc ops hold convolutions in one CPU's blocked memory "
                    "layout, which graphshape cannot read; shape the model as exported, or one "
                    "saved at ORT_ENABLE_EXTENDED or lower (SessionOptions."
                    "graph_optimization_level)", node=labels[i], op=node.op_type)
            if domain == "" and node.op_type in _ORT_DEFAULT_DOMAIN_OPS:
                pass  # onnxruntime's own ops in the default domain: read as their fused ops
            elif domain == "":
                if not onnx.defs.has(node.op_type):
                    raise GraphshapeError(
                        f"{node.op_type!r} is not an ONNX op: the file is corrupt, or a custom "
                        "op was written without its own domain; give custom ops a domain "
                        "(node.domain = 'com.example') so that graphshape carries them as is",
                        node=labels[i], op=node.op_type)
                try:
                    onnx.defs.get_schema(node.op_type, self.opset or 1, "")
                except onnx.defs.SchemaError:
                    raise GraphshapeError(
                        f"ONNX op {node.op_type!r} does not exist in opset {self.opset}, the "
                        "model's opset: the exporter wrote a wrong opset_import; re-export "
                        "the model with a newer opset", node=labels[i], op=node.op_type) from None
            for out in node.output:
                if not out:
                    continue
                if out in defined or out in producer:
                    other = labels[producer[out]] if out in producer else "a graph input or initializer"
                    raise GraphshapeError(
                        f"value {out!r} is produced twice (also by {other}); ONNX values have "
                        "one producer: the model is broken, export it again",
                        node=labels[i], op=node.op_type)
                producer[out] = i
        unsorted = False
        for i, node in enumerate(graph.node):
            for name in node.input:
                if not name or name in defined:
                    continue
                if name not in producer:
                    raise GraphshapeError(
                        f"input {name!r} is produced by no node and is neither a graph input "
                        "nor an initializer (a dangling tensor name): the model is broken; "
                        "export it again or fix the name", node=labels[i], op=node.op_type)
                if producer[name] >= i:
                    unsorted = True
        for out in graph.output:
            if out.name not in defined and out.name not in producer:
                raise GraphshapeError(
                    f"graph output {out.name!r} is produced by no node: the model is broken; "
                    "export it again")
        if not unsorted:
            return
        deps = nx.DiGraph()
        deps.add_nodes_from(range(len(graph.node)))
        for i, node in enumerate(graph.node):
            for name in node.input:
                if name and name not in defined:
                    deps.add_edge(producer[name], i)
        try:
            cycle = nx.find_cycle(deps)
        except nx.NetworkXNoCycle:
            cycle = None
        if cycle:
            path = " -> ".join(labels[a] for a, _ in cycle) + f" -> {labels[cycle[0][0]]}"
            raise GraphshapeError(
                f"the graph has a cycle ({path}); ONNX graphs must be acyclic: the model is "
                "broken, export it again", node=labels[cycle[0][0]],
                op=graph.node[cycle[0][0]].op_type)
        # acyclic but out of order: sort a copy (the caller's ModelProto stays as it is)
        order = list(nx.lexicographical_topological_sort(deps))
        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        nodes = [proto.graph.node[i] for i in order]
        sorted_nodes = [onnx.NodeProto() for _ in nodes]
        for dst, src in zip(sorted_nodes, nodes):
            dst.CopyFrom(src)
        del proto.graph.node[:]
        proto.graph.node.extend(sorted_nodes)
        self.proto = proto

    def _ort_ops_aside(self, nodes):
        """``nodes`` and the opset imports for checking and shape inference, with copies of
        onnxruntime's default-domain ops that ONNX does not define at this opset
        (:data:`_ORT_DEFAULT_DOMAIN_OPS`) moved to a domain of their own, which the checker
        and shape inference leave alone, and standard stand-ins for the contrib ops in
        :data:`_ORT_SHAPE_STAND_INS` (the model itself is not changed)."""
        onnx = self.onnx
        out, moved = [], False
        init_ranks = {i.name: len(i.dims) for i in self.proto.graph.initializer}
        for node in nodes:
            stand_in = _ORT_SHAPE_STAND_INS.get(node.op_type) \
                if node.domain == "com.microsoft" else None
            if node.domain == "com.microsoft" and node.op_type == "FusedMatMul":
                a = _attr_dict(node)
                if not (a.get("transBatchA", 0) or a.get("transBatchB", 0)):
                    # MatMul with the last two axes of A and/or B swapped, any rank
                    # (an operand stored as a 2-d initializer gets no ellipsis: Einsum's
                    # shape inference does not broadcast ellipses of different ranks)
                    lhs = "ji" if a.get("transA", 0) else "ij"
                    rhs = "kj" if a.get("transB", 0) else "jk"
                    lhs, rhs = (t if init_ranks.get(v) == 2 else "..." + t
                                for t, v in zip((lhs, rhs), node.input))
                    node = onnx.helper.make_node("Einsum", list(node.input[:2]),
                                                 node.output[:1], name=node.name,
                                                 equation=f"{lhs},{rhs}->...ik")
            elif stand_in is not None:
                # a standard op with the output shape of the contrib op, so that shape
                # inference goes on past it (ONNX has no schemas for onnxruntime's ops)
                op_type, count, keep = stand_in
                inputs = [i for i in node.input[:count] if i]
                if op_type == "Add" and len(inputs) < 2:  # FastGelu without its bias
                    op_type = "Identity"
                attrs = [a for a in node.attribute if a.name in keep]
                if node.op_type.startswith("Skip") and len(node.output) > 3 and node.output[3]:
                    out.append(onnx.helper.make_node(op_type, inputs, node.output[3:4]))
                node = onnx.helper.make_node(op_type, inputs, node.output[:1], name=node.name)
                node.attribute.extend(attrs)
            elif node.op_type in _ORT_DEFAULT_DOMAIN_OPS and node.domain in ("", "ai.onnx"):
                try:
                    onnx.defs.get_schema(node.op_type, self.opset or 1, "")
                except onnx.defs.SchemaError:
                    node = copy.deepcopy(node)
                    node.domain, moved = "com.microsoft", True
            out.append(node)
        imports = list(self.proto.opset_import)
        if moved and not any(o.domain == "com.microsoft" for o in imports):
            imports.append(onnx.helper.make_opsetid("com.microsoft", 1))
        return out, imports

    def _infer_shapes(self) -> None:
        self._check_structure()
        onnx = self.onnx
        graph = self.proto.graph
        small, typed_inputs = [], []
        for init in graph.initializer:
            # from dims and type: reading init.raw_data would copy the bytes
            nbytes = math.prod(init.dims) * (8 if init.data_type in (7, 11, 13) else 4)
            if nbytes > _SHAPE_INFERENCE_INLINE_BYTES:
                typed_inputs.append(onnx.helper.make_tensor_value_info(
                    init.name, init.data_type, list(init.dims)))
            else:
                small.append(init)
        init_names = {i.name for i in graph.initializer}
        inputs = [i for i in graph.input if i.name not in init_names] + typed_inputs
        nodes, opset_imports = self._ort_ops_aside(graph.node)
        light_graph = onnx.helper.make_graph(
            nodes, graph.name, inputs, graph.output, small, value_info=graph.value_info)
        light = onnx.helper.make_model(light_graph, opset_imports=opset_imports,
                                       ir_version=max(self.proto.ir_version, 4))
        light.functions.extend(self.proto.functions)
        try:
            # the light copy keeps every node and the structure, so checking it is cheap
            # and catches truncated files that still parse
            onnx.checker.check_model(light)
        except Exception as e:
            if "'shape' of 'type' is required" in str(e):
                # a declared value without shape: onnxruntime runs such models, so do we
                pass
            else:
                raise GraphshapeError(
                    f"the ONNX model is not valid: {str(e).strip().splitlines()[0]}; the file "
                    "may be truncated or written by a broken exporter") from None
        self._check_shapes_strict(light)
        if not self._run_inference(light):
            return
        # Reshapes whose target is computed from a dynamic shape (x.view(x.size(0), ...))
        # stop shape inference; resolve those whose target has one unknown entry, write
        # the target into the light copy, and infer again (one stage per round)
        small_consts = {i.name: onnx.numpy_helper.to_array(i) for i in small}
        memo: dict = {}  # (evaluations of small int ops, kept across the rounds)
        for _ in range(256):
            resolved = _resolve_dynamic_reshapes(light.graph.node, small_consts, self.infos,
                                                 self.reshape_targets, self.opset, memo)
            if not resolved:
                break
            for node, index, value in resolved:
                const_name = f"{node.output[0]}::graphshape_input{index}"
                array = np.array(value, np.int64)
                light.graph.initializer.append(onnx.numpy_helper.from_array(array, const_name))
                small_consts[const_name] = array
                node.input[index] = const_name
                if node.op_type == "Reshape" and index == 1:
                    self.reshape_targets[node.output[0]] = tuple(value)
            if not self._run_inference(light):
                break

    def _check_shapes_strict(self, light) -> None:
        """Strict shape inference, to name the node whose inputs do not fit together (an
        initializer of the wrong shape, say): onnxruntime would refuse such a model. Errors
        in nodes that are not standard ONNX ops, and errors caused by them (an input
        without a type), are left to the non-strict pass."""
        import re

        onnx = self.onnx
        try:
            onnx.shape_inference.infer_shapes(light, strict_mode=True, data_prop=True)
            return
        except Exception as e:  # InferenceError; anything else is left to the normal pass
            text = str(e)
        for match in re.finditer(r"\(op_type:([^,)]*)(?:, node name: ([^)]*))?\): (.*)", text):
            op_type, node_name, message = match.groups()
            if "instead is null" in message or not onnx.defs.has(op_type):
                continue
            if "ShapeInferenceError" not in message and "TypeInferenceError" not in message:
                continue
            raise GraphshapeError(
                f"the node's inputs do not fit together ({message.strip()}): an initializer "
                "or input has the wrong shape or type; onnxruntime would refuse this model. "
                "Fix or re-export the model", node=node_name or None, op=op_type)

    def _run_inference(self, light) -> bool:
        """Shape inference on the light copy; record what it finds in self.infos."""
        onnx = self.onnx
        ok = True
        try:
            inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
            value_infos = list(inferred.graph.value_info) + list(inferred.graph.output) + \
                list(inferred.graph.input)
        except Exception:
            # Inference fails on some custom ops; shapes then come from the declared
            # value_info only (and from folding).
            graph = self.proto.graph
            value_infos = list(graph.value_info) + list(graph.output) + list(graph.input)
            ok = False
        for vi in value_infos:
            info = _tensor_info(vi.type)
            if not vi.type.HasField("tensor_type") and _holds_float_tensors(vi.type):
                self.tensor_containers.add(vi.name)
            old = self.infos.get(vi.name)
            if old is None or _known_dims(info) > _known_dims(old):
                self.infos[vi.name] = info
        return ok

    def _count_uses(self) -> None:
        for node in self.proto.graph.node:
            for name in node.input:
                if name:
                    self.uses[name] = self.uses.get(name, 0) + 1
        for out in self.proto.graph.output:
            self.uses[out.name] = self.uses.get(out.name, 0) + 1

    # ----------------------------------------------------------------- values
    def info(self, name: str) -> TensorInfo:
        if name in self.consts:
            c = self.consts[name]
            return TensorInfo(tuple(c.shape), c.dtype.name)
        return self.infos.get(name, TensorInfo())

    def is_const(self, name: str) -> bool:
        return name in self.consts

    def const(self, name: str) -> np.ndarray:
        return self.consts[name]

    def signal(self, name: str) -> Ref:
        """The IR value for ONNX value ``name`` (a constant node is made on first use)."""
        if name in self.refs:
            return self.refs[name]
        if name in self.consts:
            value = self.consts[name]
            source_name = self.weight_names.get(name, name)
            node_name = self.g.unique_name(source_name or "const")
            # a float weight the file stores (an initializer) stays in the torch backend's
            # state_dict; a Constant node's or a folded value, or integers (shapes), not
            persistent = name in self.initializer_names and value.dtype.kind == "f"
            meta = {"source_name": source_name, "flags": [], "persistent": persistent}
            if persistent and not source_name.startswith(HELPER_PREFIX):
                # a weight the file stores that no layer took (a ViT's pos_embed, a layer
                # scale): a buffer unless to_torch(..., trainable_initializers=True). Not
                # the helper constants graphshape's own ONNX backend wrote (a shaped
                # file's shortcut weight "graphshape.w")
                meta["initializer"] = True
            self.g.add(Node(node_name, "constant", [], {"trainable": False}, {"value": value},
                            [TensorInfo(tuple(value.shape), value.dtype.name)], meta))
            self.refs[name] = Ref(node_name)
            self._journal += [("node", node_name), ("ref", name)]
            return self.refs[name]
        raise GraphshapeError(
            f"ONNX value {name!r} is used before it is produced; the model's nodes are not "
            "in topological order or an input is missing (run onnx.checker on it)")

    def add(self, base: str, op: str, inputs, attrs=None, params=None, outputs=None,
            source: str | None = None, infos=None) -> Node:
        name = self.g.unique_name(base)
        if infos is None:
            infos = [self.info(o) for o in (outputs or [])] or [TensorInfo()]
        node = Node(name, op, list(inputs), dict(attrs or {}), dict(params or {}), list(infos),
                    {"source_name": source or base, "flags": []})
        self.g.add(node)
        self._journal.append(("node", name))
        for i, out in enumerate(outputs or []):
            if out:
                self.refs[out] = Ref(name, i)
                self._journal.append(("ref", out))
        return node

    # ----------------------------------------------------------------- main
    def run(self) -> Graph:
        onnx = self.onnx
        from onnx import numpy_helper

        self._infer_shapes()  # (may replace self.proto by a topologically sorted copy)
        graph = self.proto.graph
        self._count_uses()
        self.initializer_names = {init.name for init in graph.initializer} | {
            sparse.values.name for sparse in graph.sparse_initializer}
        for init in graph.initializer:
            try:
                self.consts[init.name] = numpy_helper.to_array(init)
            except Exception as e:
                raise GraphshapeError(
                    f"initializer {init.name!r} cannot be read ({type(e).__name__}: {e}); "
                    "the model file is corrupt or its external data is missing") from None
        for sparse in graph.sparse_initializer:
            dense = numpy_helper.to_array(sparse.values)
            full = np.zeros(tuple(sparse.dims), dense.dtype)
            idx = numpy_helper.to_array(sparse.indices)
            if idx.ndim == 1:
                full.reshape(-1)[idx] = dense
            else:
                full[tuple(idx.T)] = dense
            self.consts[sparse.values.name] = full
        for inp in graph.input:
            if inp.name in self.consts:
                continue  # an initializer listed as input (IR < 4 style): a constant
            info = _tensor_info(inp.type)
            self.infos[inp.name] = info
            name = self.g.unique_name(inp.name)
            self.g.add(Node(name, "input", [], {"name": inp.name}, {}, [info],
                            {"source_name": inp.name, "flags": []}))
            self.refs[inp.name] = Ref(name)
            self.g.meta["input_names"].append(inp.name)

        nodes = _fuse_layer_norms(list(graph.node), self)
        names = _readable_names(nodes)
        for node, readable in zip(nodes, names):
            self._convert(node, readable)

        for out in graph.output:
            if out.name not in self.refs and out.name not in self.consts:
                raise GraphshapeError(f"graph output {out.name!r} is produced by no node")
            ref = self.signal(out.name)
            name = self.g.unique_name(out.name if out.name not in self.g else f"output.{out.name}")
            info = _tensor_info(out.type)
            produced = self.g.info(ref)
            if info.shape is None or (produced.shape is not None and _static(produced.shape)):
                info = TensorInfo(produced.shape, produced.dtype or info.dtype)
            self.g.add(Node(name, "output", [ref], {"name": out.name}, {}, [info],
                            {"source_name": out.name, "flags": []}))
        # nodes nothing reads any more (the shape computations of reshapes resolved above)
        self.g.remove_dead()
        self.g.validate()
        return self.g

    def _convert(self, node, readable: str) -> None:
        op = node.op_type
        attrs = _attr_dict(node)
        domain = node.domain if node.domain != "ai.onnx" else ""
        if domain == "" and self._try_fold(node, attrs):
            return
        if domain == "" and op in _PARTIAL_OPS:
            self._track_partial(node, attrs)
        handler = self._handler(domain, op)
        if handler is not None:
            self._journal.clear()
            mark = 0
            try:
                handler(node, attrs, readable)
                self._note_param_sources(node)
                return
            except (ValueError, IndexError, KeyError, TypeError, AttributeError) as e:
                # a malformed node that passed the checks above (wrong initializer rank,
                # a missing attribute): name it rather than fail deep inside a handler
                shapes = ", ".join(
                    f"{n}: {self.info(n).dtype}{list(self.info(n).shape) if self.info(n).shape is not None else '[?]'}"
                    for n in node.input if n)
                raise GraphshapeError(
                    f"cannot read this ONNX node: its inputs or attributes do not have the "
                    f"form the ONNX spec requires ({type(e).__name__}: {e}; inputs {shapes}); "
                    "the model is malformed: check the initializer shapes and attributes "
                    "(onnx.shape_inference.infer_shapes(model, strict_mode=True))",
                    node=node.name or readable, op=op) from None
            except _Unsupported:
                # undo what the handler added before giving up, then carry the op as is
                for kind, key in reversed(self._journal[mark:]):
                    if kind == "node":
                        self.g.remove(key)
                    else:
                        self.refs.pop(key, None)
                del self._journal[mark:]
        self._opaque(node, readable)

    def _note_param_sources(self, node) -> None:
        """``meta["param_sources"]``: for the IR nodes just read from ONNX ``node``, the
        initializer each parameter is (or is a view of, such as a MatMul weight's
        transpose), by parameter key: the names an exporter gave the source's tensors
        (``conv1.weight``), by which the torch frontend finds the source's layers."""
        inputs = {id(self.consts[n]): self.weight_names.get(n, n)
                  for n in node.input if n in self.initializer_names}
        if not inputs:
            return
        for kind, key in self._journal:
            if kind != "node" or key not in self.g:
                continue
            found = {k: inputs.get(id(v), inputs.get(id(getattr(v, "base", None))))
                     for k, v in self.g[key].params.items()}
            found = {k: v for k, v in found.items() if v is not None}
            if found:
                self.g[key].meta["param_sources"] = found

    def _handler(self, domain: str, op: str):
        """The method that reads op ``op`` of ``domain``, or None (the node stays opaque)."""
        if domain == "com.microsoft":
            return getattr(self, f"_ms_{op}", None)
        if domain != "":
            return None
        handler = getattr(self, f"_op_{op}", None)
        if handler is None and op in _SIMPLE_ACTIVATIONS:
            handler = self._simple_activation
        return handler

    def _try_fold(self, node, attrs) -> bool:
        op = node.op_type
        if op in _NEVER_FOLD or any(a.type in (5, 10) for a in node.attribute):  # GRAPH(S)
            return False
        if op == "Constant":
            value = _constant_value(node, attrs)
            if value is None:
                value = _fold_reference(node, [])[0]
            self.consts[node.output[0]] = value
            return True
        if op in ("Shape", "Size") and node.input[0] not in self.consts:
            shape = self.info(node.input[0]).shape
            if not _static(shape):
                return False
            if op == "Size":
                self.consts[node.output[0]] = np.array(int(np.prod(shape)), np.int64)
            else:
                start, end = attrs.get("start", 0), attrs.get("end", None)
                self.consts[node.output[0]] = np.array(shape[start:end], np.int64)
            return True
        present = [n for n in node.input if n]
        if not node.input and op not in ("ConstantOfShape",):
            return False
        if not all(n in self.consts for n in present):
            return False
        inputs = [self.consts[n] if n else None for n in node.input]
        result = None
        if op == "ConstantOfShape":
            value = attrs.get("value")
            fill = self.onnx.numpy_helper.to_array(value).reshape(-1)[0] if value is not None \
                else np.float32(0)
            result = [np.full(tuple(int(d) for d in inputs[0]), fill, dtype=np.asarray(fill).dtype)]
        elif all(x is not None for x in inputs):
            try:
                result = _fold_numpy(op, inputs, attrs, self.opset)
            except Exception:
                result = None
        if result is None:
            try:
                result = _fold_reference(node, inputs)
            except Exception:
                return False  # not evaluable here: mapped as a normal node
        for name, value in zip(node.output, result):
            if name:
                self.consts[name] = np.asarray(value)
        self._note_copied_weight(node, result)
        return True

    def _note_copied_weight(self, node, result) -> None:
        """A folded node whose value is one float initializer's, unchanged (same shape, dtype
        and values), is that stored weight, not a derived constant: it stays in the
        state_dict and trains with ``trainable_initializers``. torch.onnx.export writes equal
        parameters once and the others as Identity nodes of it (a ConvNeXt stage's layer
        scales, all 1e-6 at init: "features.1.1.layer_scale" = Identity("features.1.0.
        layer_scale")): each is a weight of its own under its own name, not a tie. A class
        token expanded to a static batch of 1 (``Expand(class_token, (1, 1, 768))``) keeps
        the initializer's name."""
        out = node.output[0] if node.output else ""
        sources = [n for n in node.input if n in self.initializer_names
                   and self.consts[n].dtype.kind == "f"]
        if not out or len(result) != 1 or len(sources) != 1:
            return
        source, value = self.consts[sources[0]], np.asarray(result[0])
        if value.shape != source.shape or value.dtype != source.dtype \
                or not np.array_equal(value, source):
            return
        self.initializer_names.add(out)
        self.consts[out] = np.array(source, copy=True)  # a weight of its own
        if node.op_type != "Identity":  # (an Identity's output is the exporter's name for it)
            self.weight_names[out] = self.weight_names.get(sources[0], sources[0])

    # ----------------------------------------------------------------- partial shapes
    def _partial(self, name: str):
        """A 1-D int vector whose entries are partly known: list of int/None, or None."""
        if name in self.consts:
            value = self.consts[name]
            if value.dtype.kind in "iu" and value.ndim <= 1:
                return [int(v) for v in value.reshape(-1)]
            return None
        return self.partials.get(name)

    def _track_partial(self, node, a) -> None:
        """Follow shape vectors of tensors whose shape is partly known (a dynamic batch):
        Shape, Gather, Unsqueeze, Concat, Cast, Slice, Identity. A Gather that picks only
        known entries becomes a constant, so that the arithmetic after it folds, and a
        Reshape whose target has one unknown entry can use -1 for it."""
        op, out = node.op_type, node.output[0]
        if op == "Shape":
            shape = self.info(node.input[0]).shape
            if shape is None:
                return
            dims = [d if isinstance(d, int) else None for d in shape]
            self.partials[out] = dims[a.get("start", 0):a.get("end", None)]
            return
        src = self._partial(node.input[0])
        if src is None:
            return
        result = None
        if op in ("Cast", "Identity"):
            result, scalar = src, node.input[0] in self.scalar_partials
        elif op == "Gather" and a.get("axis", 0) == 0 and self.is_const(node.input[1]):
            idx = self.const(node.input[1])
            scalar = idx.ndim == 0
            try:
                result = [src[int(i)] for i in idx.reshape(-1)]
            except IndexError:
                return
        elif op == "Unsqueeze" and node.input[0] in self.scalar_partials:
            result, scalar = src, False
        elif op == "Concat" and a.get("axis", 0) in (0, -1):
            parts = [self._partial(n) for n in node.input]
            if any(p is None for p in parts) or any(n in self.scalar_partials for n in node.input):
                return
            result, scalar = [d for p in parts for d in p], False
        elif op == "Slice" and self.opset >= 10 and all(
                self.is_const(n) for n in node.input[1:] if n):
            starts, ends = self.const(node.input[1]), self.const(node.input[2])
            steps = self._const_input(node, 4)
            step = 1 if steps is None else int(steps.reshape(-1)[0])
            result = src[int(starts.reshape(-1)[0]):int(min(ends.reshape(-1)[0], 2**62)):step]
            scalar = False
        if result is None:
            return
        if all(d is not None for d in result):  # every entry known: a plain constant
            value = np.array(result, np.int64)
            self.consts[out] = value.reshape(()) if scalar else value
            return
        self.partials[out] = result
        if scalar:
            self.scalar_partials.add(out)

    # ----------------------------------------------------------------- opaque
    def _opaque(self, node, readable: str) -> None:
        import copy

        inputs, positions = [], []
        for name in node.input:
            if not name:
                positions.append(None)
            else:
                positions.append(len(inputs))
                inputs.append(self.signal(name))
        outer = self._outer_scope_names(node)
        for name in outer:
            inputs.append(self.signal(name))
        domain = node.domain if node.domain != "ai.onnx" else ""
        attrs = {
            "framework": "onnx", "op_type": node.op_type, "domain": domain,
            "attributes": {a.name: copy.deepcopy(a) for a in node.attribute},
            "input_positions": tuple(positions),
            "absent_outputs": tuple(i for i, o in enumerate(node.output) if not o),
            "outer_scope": tuple(outer),
            "source_opset": self.opset_imports.get(domain, self.opset),
            "description": f"ONNX {domain + '::' if domain else ''}{node.op_type}",
        }
        n = self.add(readable, "opaque", inputs, attrs, outputs=list(node.output),
                     source=node.name or node.output[0])
        n.meta["flags"].append(f"opaque ONNX op {node.op_type}")
        if domain == "" and node.op_type in ("Shape", "Size"):
            # reads its input's shape, not its values (as the torch frontend's x.size(0))
            n.meta["flags"].append("shape_computation")
        if any(o in self.tensor_containers for o in node.output):
            n.meta["flags"].append(TENSOR_CONTAINER)

    def _outer_scope_names(self, node) -> list[str]:
        """Values a node's subgraphs read from the enclosing graph."""
        found: list[str] = []

        def visit(graph, defined):
            defined = set(defined) | {i.name for i in graph.input} | \
                {i.name for i in graph.initializer}
            for n in graph.node:
                for name in n.input:
                    if name and name not in defined and name not in found:
                        found.append(name)
                for a in n.attribute:
                    if a.type == 5:
                        visit(a.g, defined)
                    elif a.type == 10:
                        for sub in a.graphs:
                            visit(sub, defined)
                defined |= set(n.output)

        for a in node.attribute:
            if a.type == 5:
                visit(a.g, set())
            elif a.type == 10:
                for sub in a.graphs:
                    visit(sub, set())
        return [n for n in found if n in self.refs or n in self.consts]

    # ----------------------------------------------------------------- small utils
    def _const_input(self, node, index: int, default=None):
        """Constant value of optional input ``index`` (default if absent); _Unsupported if
        present but not constant."""
        if len(node.input) <= index or not node.input[index]:
            return default
        name = node.input[index]
        if name not in self.consts:
            raise _Unsupported(f"input {index} is not constant")
        return self.consts[name]

    def _rank(self, name: str) -> int | None:
        return self.info(name).rank

    def _norm_axes(self, axes, rank):
        if axes is None:
            return None
        if rank is None:
            if any(a < 0 for a in axes):
                raise _Unsupported("negative axes with unknown rank")
            return tuple(int(a) for a in axes)
        return tuple(int(a) % rank if a < 0 else int(a) for a in axes)

    def _only_first_output_used(self, node) -> None:
        for extra in node.output[1:]:
            if extra and self.uses.get(extra, 0):
                raise _Unsupported("optional outputs are used")

    # ----------------------------------------------------------------- affine ops
    def _op_Conv(self, node, a, name):
        if not self.is_const(node.input[1]):
            raise _Unsupported("weight is not constant")
        w = self.const(node.input[1])
        bias = self._const_input(node, 2)
        k = w.ndim - 2
        kernel = tuple(a.get("kernel_shape", w.shape[2:]))
        strides = tuple(a.get("strides", (1,) * k))
        dilations = tuple(a.get("dilations", (1,) * k))
        in_shape = self.info(node.input[0]).shape
        pads = _pads_from_auto(a.get("auto_pad", "NOTSET"),
                               in_shape[2:] if in_shape else None, kernel, strides, dilations)
        if pads is None:
            pads = tuple(a.get("pads", (0,) * (2 * k)))
        groups = int(a.get("group", 1))
        params = {"weight": w}
        if bias is not None:
            params["bias"] = bias
        self.add(name, "conv", [self.signal(node.input[0])],
                 {"dims": k, "in_channels": int(w.shape[1]) * groups,
                  "out_channels": int(w.shape[0]), "kernel_shape": kernel, "stride": strides,
                  "pads": pads, "dilation": dilations, "groups": groups,
                  "padding_mode": "zeros"}, params, node.output, node.name)

    def _op_ConvTranspose(self, node, a, name):
        if not self.is_const(node.input[1]):
            raise _Unsupported("weight is not constant")
        w = self.const(node.input[1])
        bias = self._const_input(node, 2)
        k = w.ndim - 2
        groups = int(a.get("group", 1))
        a = dict(a)
        auto_pad = a.get("auto_pad", "NOTSET")
        if "output_shape" in a or auto_pad not in ("NOTSET", ""):
            a["pads"] = self._conv_transpose_pads(node, a, w, k)
        params = {"weight": w}
        if bias is not None:
            params["bias"] = bias
        self.add(name, "conv_transpose", [self.signal(node.input[0])],
                 {"dims": k, "in_channels": int(w.shape[0]),
                  "out_channels": int(w.shape[1]) * groups,
                  "kernel_shape": tuple(a.get("kernel_shape", w.shape[2:])),
                  "stride": tuple(a.get("strides", (1,) * k)),
                  "pads": tuple(a.get("pads", (0,) * (2 * k))),
                  "output_padding": tuple(a.get("output_padding", (0,) * k)),
                  "dilation": tuple(a.get("dilations", (1,) * k)), "groups": groups},
                 params, node.output, node.name)

    def _conv_transpose_pads(self, node, a, w, k):
        """Explicit pads for ConvTranspose's output_shape / auto_pad forms (the ONNX
        spec's formula: total = stride * (in - 1) + output_padding + (kernel - 1) *
        dilation + 1 - out)."""
        in_shape = self.info(node.input[0]).shape
        if in_shape is None or not _static(in_shape[2:]):
            raise _Unsupported("needs static spatial sizes")
        strides = a.get("strides", (1,) * k)
        dilations = a.get("dilations", (1,) * k)
        out_pad = a.get("output_padding", (0,) * k)
        kernel = a.get("kernel_shape", w.shape[2:])
        auto_pad = a.get("auto_pad", "NOTSET")
        if auto_pad == "VALID":
            return (0,) * (2 * k)
        out_shape = a.get("output_shape")
        if out_shape is None:  # SAME_*: output = input * stride
            out_shape = [in_shape[2 + i] * strides[i] for i in range(k)]
        out_shape = list(out_shape)[-k:]
        begins, ends = [], []
        for i in range(k):
            total = (strides[i] * (in_shape[2 + i] - 1) + out_pad[i]
                     + (kernel[i] - 1) * dilations[i] + 1 - out_shape[i])
            if total < 0:
                raise _Unsupported("output_shape larger than the kernel reaches")
            if auto_pad == "SAME_UPPER":
                begins.append(total // 2)
                ends.append(total - total // 2)
            else:
                begins.append(total - total // 2)
                ends.append(total // 2)
        return tuple(begins + ends)

    def _gemm_of_signals(self, node, a, name):
        """Gemm whose B is computed: transpose(s), matmul, then alpha and beta * C."""
        alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
        dtype = self.info(node.input[0]).dtype or "float32"

        def operand(index, transposed):
            ref = self.signal(node.input[index])
            if not transposed:
                return ref
            shape = self.info(node.input[index]).shape
            t = self.add(f"{name}.trans{'AB'[index]}", "transpose", [ref], {"perm": (1, 0)},
                         infos=[TensorInfo(None if shape is None else tuple(reversed(shape)),
                                           dtype)])
            return t.out

        out_info = self.info(node.output[0])
        has_c = len(node.input) > 2 and bool(node.input[2])
        steps = (alpha != 1.0) + has_c
        y = self.add(name if not steps else f"{name}.matmul", "matmul",
                     [operand(0, a.get("transA", 0)), operand(1, a.get("transB", 0))],
                     outputs=None if steps else node.output, source=node.name,
                     infos=[out_info]).out
        if alpha != 1.0:
            steps -= 1
            y = self.add(name if not steps else f"{name}.alpha", "mul",
                         [y, self.signal_value(f"{name}.alpha_value", np.array(alpha, dtype))],
                         outputs=None if steps else node.output, source=node.name,
                         infos=[out_info]).out
        if has_c:
            c = self.signal(node.input[2])
            if beta != 1.0:
                c = self.add(f"{name}.beta", "mul",
                             [c, self.signal_value(f"{name}.beta_value", np.array(beta, dtype))],
                             infos=[self.info(node.input[2])]).out
            self.add(name, "add", [y, c], outputs=node.output, source=node.name)

    def _op_Gemm(self, node, a, name):
        if not self.is_const(node.input[1]):
            return self._gemm_of_signals(node, a, name)
        alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
        has_c = len(node.input) > 2 and bool(node.input[2])
        if has_c and not self.is_const(node.input[2]) and beta != 1.0:
            return self._gemm_of_signals(node, a, name)
        b = self.const(node.input[1])
        weight = b if a.get("transB", 0) else b.T
        if alpha != 1.0:
            weight = weight * np.asarray(alpha, weight.dtype)
        out_f, in_f = weight.shape
        x = self.signal(node.input[0])
        if a.get("transA", 0):
            shape = self.info(node.input[0]).shape
            t = self.add(f"{name}.transA", "transpose", [x], {"perm": (1, 0)},
                         infos=[TensorInfo(None if shape is None else tuple(reversed(shape)),
                                           self.info(node.input[0]).dtype)])
            x = t.out
        c = self.const(node.input[2]) if has_c and self.is_const(node.input[2]) else None
        extra_add = None
        params = {"weight": weight}
        if has_c:
            if c is not None and c.size in (1, out_f) and c.ndim <= 2 and (
                    c.ndim == 0 or c.shape[-1] in (1, out_f)) and (c.ndim < 2 or c.shape[0] == 1):
                if c.shape == (out_f,) and c.dtype == weight.dtype and beta == 1.0:
                    params["bias"] = c  # the initializer itself: param_sources name it
                else:
                    bias = np.broadcast_to(c.reshape(-1), (out_f,)).astype(weight.dtype)
                    params["bias"] = np.ascontiguousarray(bias * np.asarray(beta, bias.dtype)
                                                          if beta != 1.0 else bias)
            else:
                extra_add = node.input[2]
        outputs = list(node.output) if extra_add is None else []
        lin = self.add(name, "linear", [x], {"in_features": int(in_f), "out_features": int(out_f)},
                       params, outputs, node.name,
                       infos=None if outputs else [self.info(node.output[0])])
        if extra_add is not None:
            if self.is_const(extra_add):
                cval = self.const(extra_add)
                cref = self.signal_value(f"{name}.C", cval * np.asarray(beta, cval.dtype))
            else:
                cref = self.signal(extra_add)
            self.add(f"{name}.addC", "add", [lin.out, cref], {}, outputs=node.output,
                     source=node.name)

    def signal_value(self, base: str, value: np.ndarray) -> Ref:
        node_name = self.g.unique_name(base)
        self.g.add(Node(node_name, "constant", [], {"trainable": False}, {"value": value},
                        [TensorInfo(tuple(value.shape), value.dtype.name)],
                        {"source_name": base, "flags": []}))
        self._journal.append(("node", node_name))
        return Ref(node_name)

    def _op_MatMul(self, node, a, name):
        x_name, w_name = node.input
        if self.is_const(w_name) and self.const(w_name).ndim == 2 and not self.is_const(x_name):
            w = self.const(w_name)
            self.add(name, "linear", [self.signal(x_name)],
                     {"in_features": int(w.shape[0]), "out_features": int(w.shape[1])},
                     # a transposed view: the ONNX backend writes w back without a copy
                     {"weight": w.T}, node.output, node.name)
            return
        self.add(name, "matmul", [self.signal(x_name), self.signal(w_name)], {},
                 outputs=node.output, source=node.name)

    # ----------------------------------------------------------------- arithmetic
    def _binary(self, node, name, op):
        x, y = node.input
        if op == "add" and self.is_const(x) and y in self.refs:
            x, y = y, x  # the exporter wrote bias + x
        # MatMul (linear without bias) + constant vector: fold the vector in as the bias
        if op == "add" and x in self.refs and self.is_const(y):
            prod = self.g[self.refs[x].node]
            bias = self.const(y)
            if (prod.op == "linear" and "bias" not in prod.params and self.uses.get(x) == 1
                    and bias.ndim == 1 and bias.shape[0] == prod.attrs["out_features"]
                    and bias.dtype == prod.params["weight"].dtype):
                prod.params["bias"] = bias
                prod.outputs = [self.info(node.output[0])]
                self.refs[node.output[0]] = prod.out
                return
        x, y = node.input  # keep the operand order (it matters for sub/div)
        self.add(name, op, [self.signal(x), self.signal(y)], {}, outputs=node.output,
                 source=node.name)

    def _op_Add(self, node, a, name):
        self._binary(node, name, "add")

    def _op_Sub(self, node, a, name):
        self._binary(node, name, "sub")

    def _op_Div(self, node, a, name):
        if is_non_float(self.info(node.output[0]).dtype):
            # ONNX divides integers with truncation; the canonical div is x / y
            raise _Unsupported("integer division")
        self._binary(node, name, "div")

    def _op_Mul(self, node, a, name):
        self._binary(node, name, "mul")

    def _op_Pow(self, node, a, name):
        # x ** 2 (LayerNorm decompositions) is the registry's "square"
        exponent = self._const_input(node, 1)
        if exponent is None or exponent.size != 1 or float(exponent.reshape(-1)[0]) != 2.0:
            raise _Unsupported("only x ** 2 is mapped")
        self._act(node, name, "square")

    def _op_Sum(self, node, a, name):
        inputs = [self.signal(n) for n in node.input]
        self.add(name, "sum" if len(inputs) > 1 else "identity", inputs, {},
                 outputs=node.output, source=node.name)

    def _op_Concat(self, node, a, name):
        rank = self._rank(node.output[0])
        axis = int(a["axis"])
        if axis < 0:
            if rank is None:
                raise _Unsupported("negative axis, unknown rank")
            axis %= rank
        self.add(name, "concat", [self.signal(n) for n in node.input], {"axis": axis},
                 outputs=node.output, source=node.name)

    # ----------------------------------------------------------------- activations
    def _act(self, node, name, act_name, **attrs):
        self.add(name, "activation", [self.signal(node.input[0])], {"name": act_name, **attrs},
                 outputs=node.output, source=node.name)

    def _simple_activation(self, node, a, name):
        self._act(node, name, _SIMPLE_ACTIVATIONS[node.op_type])

    def _op_Max(self, node, a, name):
        """``max(x, 0)`` by a constant of zeros: ReLU (Filter Response Normalization's TLU,
        ``max(y, tau)``, at its initial threshold tau = 0, as torch exports it). Any other
        Max stays opaque."""
        if len(node.input) != 2:
            raise _Unsupported("not max(x, constant)")
        consts = [i for i in (0, 1) if self.is_const(node.input[i])]
        if len(consts) != 1:
            raise _Unsupported("not max(x, constant)")
        zeros, x = self.const(node.input[consts[0]]), node.input[1 - consts[0]]
        if self._clamps_a_norm(x):
            raise _Unsupported("the guard of a norm")
        x_shape, out_shape = self.info(x).shape, self.info(node.output[0]).shape
        if zeros.size == 0 or np.any(zeros != 0) or x_shape is None or x_shape != out_shape:
            raise _Unsupported("not max(x, 0) of x's shape")
        self.add(name, "activation", [self.signal(x)], {"name": "relu"},
                 outputs=node.output, source=node.name)

    def _op_LeakyRelu(self, node, a, name):
        self._act(node, name, "leaky_relu", negative_slope=float(a.get("alpha", 0.01)))

    def _op_PRelu(self, node, a, name):
        """A constant slope shared by all entries or one per channel (axis 1): a leaky_relu
        with learnable slopes, as the PyTorch frontend reads ``nn.PReLU``."""
        if not self.is_const(node.input[1]):
            raise _Unsupported("slope is not constant")
        slope = np.asarray(self.const(node.input[1]))
        rank = self._rank(node.input[0])
        if rank is None or slope.ndim > rank:
            raise _Unsupported("slope rank unknown or larger than the input's")
        shape = (1,) * (rank - slope.ndim) + slope.shape
        if slope.size == 1 or np.all(slope == slope.reshape(-1)[0]):
            weight = slope.reshape(-1)[:1]
        elif rank >= 2 and all(d == 1 for i, d in enumerate(shape) if i != 1):
            weight = slope.reshape(-1)
        else:
            raise _Unsupported("slopes vary along an axis other than the channels")
        attrs, params = prelu_activation(weight)
        self.add(name, "activation", [self.signal(node.input[0])], attrs, params,
                 outputs=node.output, source=node.name)

    # ----------------------------------------------------------------- resampling
    def _op_Resize(self, node, a, name):
        """Resize in PyTorch's terms (the canonical ``resize``): the attribute combinations
        torch's interpolate modes export to, and half_pixel nearest by integer factors; any
        other (a TensorFlow converter's asymmetric round_prefer_floor or
        tf_half_pixel_for_nn, tf_crop_and_resize, another cubic coefficient...) stays
        opaque."""
        if a.get("axes") is not None or a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
            raise _Unsupported("axes / keep_aspect_ratio_policy")
        if self.opset < 11:  # Resize-10: (X, scales), asymmetric coordinates
            if a.get("mode", "nearest") != "nearest":
                raise _Unsupported("linear resize with asymmetric coordinates")
            self._resize(node, name, {"mode": "nearest"}, 1, None, need="upsampling")
            return
        ctm, scales_at, sizes_at = a.get("coordinate_transformation_mode", "half_pixel"), 2, 3
        mode = a.get("mode", "nearest")
        half_pixel = ctm in ("half_pixel", "pytorch_half_pixel")
        if a.get("antialias", 0):
            # onnxruntime's antialias filter is not torch's (measured: 0.07 apart on a
            # bilinear 0.4x resize of N(0, 1) data): no torch twin
            raise _Unsupported("antialias")
        need = None
        if mode == "nearest":
            nearest_mode = a.get("nearest_mode", "round_prefer_floor")
            if (ctm, nearest_mode) == ("asymmetric", "floor"):
                attrs = {"mode": "nearest"}
            elif half_pixel and nearest_mode == "round_prefer_ceil":
                attrs = {"mode": "nearest-exact"}
            elif half_pixel and nearest_mode == "round_prefer_floor":
                # upsampling by an integer k, (x + 0.5) / k - 0.5 lies within 1/2 of
                # floor(x / k): rounding picks torch's nearest pixel (the form
                # onnx.version_converter gives an old Upsample)
                attrs, need = {"mode": "nearest"}, "integer upsampling"
            else:
                raise _Unsupported(f"nearest with {ctm} / {nearest_mode}")
        elif mode in ("linear", "cubic") and (half_pixel or ctm == "align_corners"):
            attrs = {"mode": mode, "align_corners": ctm == "align_corners", "antialias": False}
            if mode == "cubic" and (float(a.get("cubic_coeff_a", -0.75)),
                                    int(a.get("exclude_outside", 0))) != (-0.75, 0):
                raise _Unsupported("cubic coefficients other than torch's")
        else:
            raise _Unsupported(f"{mode} with {ctm}")
        self._resize(node, name, attrs, scales_at, sizes_at,
                     pytorch_half_pixel=ctm == "pytorch_half_pixel", need=need)

    def _op_Upsample(self, node, a, name):
        """Upsample (opset 9): asymmetric coordinates; only nearest has a torch twin."""
        if a.get("mode", "nearest") != "nearest":
            raise _Unsupported("linear upsampling with asymmetric coordinates")
        self._resize(node, name, {"mode": "nearest"}, 1, None, need="upsampling")

    def _resize(self, node, name, attrs, scales_at, sizes_at, pytorch_half_pixel=False,
                need=None):
        """``need``: "upsampling" (Upsample-9 and Resize-10 have no nearest_mode;
        upsampling, onnxruntime rounds down as torch's nearest does, but not downsampling:
        Resize-10 at scales 0.5, 0.6 measured 2.9 apart from torch on N(0, 1) data), or
        "integer upsampling" (every spatial factor a whole number >= 1)."""
        x = node.input[0]
        in_shape = self.info(x).shape
        out_shape = self.info(node.output[0]).shape
        rank = self._rank(x)
        if rank is None or rank < 3:
            raise _Unsupported("input rank unknown or below 3")
        dims = rank - 2
        scales = self._const_input(node, scales_at)
        if scales is not None and np.asarray(scales).size == 0:
            scales = None  # opset 11-12 write an empty scales beside sizes
        if scales is None and sizes_at is not None and len(node.input) > sizes_at \
                and node.input[sizes_at]:
            sizes = self._partial(node.input[sizes_at])
            if sizes is None or len(sizes) != rank or any(d is None for d in sizes[2:]):
                raise _Unsupported("sizes not known")
            if in_shape is None or any(s is not None and s != d  # (a symbolic d too)
                                       for s, d in zip(sizes[:2], in_shape[:2])):
                raise _Unsupported("resizes the batch or channel axis")
            attrs["sizes"] = tuple(int(d) for d in sizes[2:])
            factors = [s / d if isinstance(d, int) and d > 0 else math.nan
                       for s, d in zip(attrs["sizes"], in_shape[2:])]
        elif scales is not None:
            scales = np.asarray(scales, np.float64).reshape(-1)
            if scales.size != rank or np.any(scales[:2] != 1.0):
                raise _Unsupported("scales the batch or channel axis")
            factors = scales[2:]
            attrs["scales"] = tuple(float(np.float32(s)) for s in scales[2:])
        else:
            raise _Unsupported("neither scales nor sizes")
        factors = np.asarray(factors, np.float64)
        if need == "upsampling" and not np.all(factors >= 1.0):
            raise _Unsupported("nearest downsampling before opset 11")
        if need == "integer upsampling" and not np.all((factors >= 1.0)
                                                       & (factors == np.round(factors))):
            raise _Unsupported("half_pixel nearest other than integer upsampling")
        if pytorch_half_pixel and attrs["mode"] != "nearest" and (
                out_shape is None or any(not isinstance(d, int) or d == 1
                                         for d in out_shape[2:])):
            # pytorch_half_pixel reads entry 0 where an output axis has one entry; torch
            # (and half_pixel) its centre
            raise _Unsupported("pytorch_half_pixel with an output axis of size 1 (or unknown)")
        self.add(name, "resize", [self.signal(x)], {"dims": dims, **attrs},
                 outputs=node.output, source=node.name)

    def _op_Elu(self, node, a, name):
        self._act(node, name, "elu", alpha=float(a.get("alpha", 1.0)))

    def _op_Celu(self, node, a, name):
        # alpha 1: ELU with alpha 1; another alpha is alpha * elu(x / alpha), no registry form
        if float(a.get("alpha", 1.0)) != 1.0:
            raise _Unsupported("celu with alpha != 1")
        self._act(node, name, "elu", alpha=1.0)

    def _op_Selu(self, node, a, name):
        from graphshape.activations import SELU_ALPHA, SELU_SCALE

        alpha = float(a.get("alpha", 1.67326319217681884765625))
        gamma = float(a.get("gamma", 1.05070102214813232421875))
        if abs(alpha - SELU_ALPHA) > 1e-6 or abs(gamma - SELU_SCALE) > 1e-6:
            raise _Unsupported("non-standard selu constants")
        self._act(node, name, "selu")

    def _op_HardSigmoid(self, node, a, name):
        alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
        if abs(alpha - 1 / 6) < 1e-7 and abs(beta - 0.5) < 1e-7:
            self._act(node, name, "hardsigmoid")
        else:
            # max(0, min(1, alpha x + beta)) = hardsigmoid_torch(6 alpha x + 6 beta - 3)
            self._act(node, name, "hardsigmoid",
                      transform={"input_scale": 6.0 * alpha, "input_shift": 6.0 * beta - 3.0})

    def _op_Gelu(self, node, a, name):
        self._act(node, name, "gelu" if a.get("approximate", "none") == "tanh" else "gelu_exact")

    def _clamps_a_norm(self, value: str) -> bool:
        """Whether ``value`` is an L1 / L2 norm (:func:`~graphshape.passes.elementwise.is_onnx_norm`)."""
        ref = self.refs.get(value)
        return ref is not None and is_onnx_norm(self.g, ref)

    def _op_Clip(self, node, a, name):
        if self._clamps_a_norm(node.input[0]):
            raise _Unsupported("the guard of a norm")
        if self.opset < 11:
            lo, hi = a.get("min"), a.get("max")
        else:
            lo = self._const_input(node, 1)
            hi = self._const_input(node, 2)
            lo = None if lo is None else float(lo)
            hi = None if hi is None else float(hi)
        lo = None if lo is None or lo <= -3.0e38 else float(lo)
        hi = None if hi is None or hi >= 3.0e38 else float(hi)
        if lo == 0.0 and hi == 6.0:
            self._act(node, name, "relu6")
        elif lo == 0.0 and hi is None:
            self._act(node, name, "relu")
        elif lo is not None and hi is not None and lo < hi:
            self._act(node, name, "hardtanh", min_val=lo, max_val=hi)
        else:
            raise _Unsupported("one-sided clip")

    # ----------------------------------------------------------------- normalization
    def _channels(self, name_in: str):
        shape = self.info(name_in).shape
        return shape[1] if shape is not None and len(shape) > 1 and isinstance(shape[1], int) else None

    def _op_BatchNormalization(self, node, a, name):
        self._only_first_output_used(node)
        # a training-mode export is normalized by the batch's statistics, and the updated
        # running statistics (outputs 1, 2) are unused, as torch writes it: a batch norm
        # that keeps none (PyTorch's track_running_stats=False). Its mean and var inputs
        # only feed those outputs: torch computes them in the graph for a batch norm with
        # track_running_stats=False (ReduceMean...), left unread here
        tracks = not a.get("training_mode", 0)
        scale, bias = self._const_input(node, 1), self._const_input(node, 2)
        mean, var = (self._const_input(node, i) for i in (3, 4)) if tracks else (0, 0)
        if any(v is None for v in (scale, bias, mean, var)):
            raise _Unsupported("non-constant statistics")
        momentum = a.get("momentum", 0.9)
        params = {"weight": scale, "bias": bias}
        if tracks:
            params.update(running_mean=mean, running_var=var)
        self.add(name, "batch_norm", [self.signal(node.input[0])],
                 {"num_features": int(scale.shape[0]), "eps": float(a.get("epsilon", 1e-5)),
                  "momentum": round(1.0 - float(momentum), 12), "affine": True,
                  "track_running_stats": tracks},
                 params, node.output[:1], node.name)

    def _op_InstanceNormalization(self, node, a, name):
        scale, bias = self._const_input(node, 1), self._const_input(node, 2)
        if scale is None or bias is None:
            raise _Unsupported("non-constant scale")
        self.add(name, "instance_norm", [self.signal(node.input[0])],
                 {"num_features": int(scale.shape[0]), "eps": float(a.get("epsilon", 1e-5)),
                  "momentum": 0.1, "affine": True, "track_running_stats": False},
                 {"weight": scale, "bias": bias}, node.output, node.name)

    def _op_LayerNormalization(self, node, a, name):
        self._trailing_norm(node, a, name, "layer_norm")

    def _op_RMSNormalization(self, node, a, name):
        self._trailing_norm(node, a, name, "rms_norm")

    def _trailing_norm(self, node, a, name, op):
        """LayerNormalization / RMSNormalization (and their contrib forms) over the dims
        from ``axis`` on: ``layer_norm`` / ``rms_norm`` with the scale (and a layer norm's
        bias) broadcast to the normalized shape."""
        self._only_first_output_used(node)
        scale = self._const_input(node, 1)
        bias = self._const_input(node, 2) if op == "layer_norm" else None
        if scale is None:
            raise _Unsupported("non-constant scale")
        rank = self._rank(node.input[0])
        axis = int(a.get("axis", -1))
        shape = self.info(node.input[0]).shape
        if rank is None:
            if axis >= 0:
                raise _Unsupported("positive axis with unknown rank")
            normalized = tuple(scale.shape[axis:]) if scale.ndim >= -axis else None
        else:
            axis %= rank
            normalized = tuple(shape[axis:])
            # dims unknown to shape inference (shapes computed at run time, as in swin's
            # padded windows): the scale has the normalized shape, where no dim of it is a
            # 1 that could be broadcasting
            if (not _static(normalized) and scale.ndim == rank - axis
                    and all(d == s if isinstance(d, int) else s != 1
                            for d, s in zip(normalized, scale.shape))):
                normalized = tuple(int(s) for s in scale.shape)
        if normalized is None or not _static(normalized):
            raise _Unsupported("normalized shape unknown")
        params = {"weight": np.ascontiguousarray(np.broadcast_to(scale, normalized))}
        if op == "layer_norm":
            params["bias"] = (np.zeros(normalized, scale.dtype) if bias is None
                              else np.ascontiguousarray(np.broadcast_to(bias, normalized)))
        self.add(name, op, [self.signal(node.input[0])],
                 {"normalized_shape": normalized, "eps": float(a.get("epsilon", 1e-5))},
                 params, node.output[:1], node.name)

    # --------------------------------------------- onnxruntime's contrib ops (com.microsoft)
    # written by onnxruntime.transformers' optimizer and Hugging Face Optimum: fused forms of
    # standard ops, read as those ops (and written back as standard ONNX)
    def _ms_Gelu(self, node, a, name):
        self._act(node, name, "gelu_exact")

    def _ms_FastGelu(self, node, a, name):  # the tanh approximation, optional bias first
        self._biased_activation(node, name, "gelu")

    def _ms_BiasGelu(self, node, a, name):
        self._biased_activation(node, name, "gelu_exact")

    def _biased_activation(self, node, name, act_name):
        x = self.signal(node.input[0])
        if len(node.input) > 1 and node.input[1]:
            x = self.add(f"{name}_bias", "add", [x, self.signal(node.input[1])],
                         infos=[self.info(node.output[0])], source=node.name).out
        self.add(name, "activation", [x], {"name": act_name}, outputs=node.output,
                 source=node.name)

    def _ms_QuickGelu(self, node, a, name):
        """``x * sigmoid(alpha x)`` (onnxruntime fuses SiLU into it with alpha = 1):
        ``silu(alpha x) / alpha``."""
        alpha = float(a.get("alpha", 1.702))
        if not alpha > 0:
            raise _Unsupported("alpha <= 0")
        if alpha == 1.0:
            self._act(node, name, "silu")
        else:
            self._act(node, name, "silu",
                      transform={"input_scale": alpha, "output_scale": 1.0 / alpha})

    def _ms_FusedConv(self, node, a, name):
        """onnxruntime's Conv (+ Z, its optional 4th input, added) + activation."""
        conv = {k: v for k, v in a.items() if k not in ("activation", "activation_params")}
        self._read_fused(node, name, ("Conv", node.input[:3], conv),
                         node.input[3] if len(node.input) > 3 else "",
                         a.get("activation", ""), list(a.get("activation_params", [])))

    def _ms_FusedGemm(self, node, a, name):
        """onnxruntime's Gemm + activation (``activation_alpha`` / ``_beta``: its params)."""
        gemm = {k: a[k] for k in ("alpha", "beta", "transA", "transB") if k in a}
        params = [a[k] for k in ("activation_alpha", "activation_beta") if k in a]
        self._read_fused(node, name, ("Gemm", node.input, gemm), "",
                         a.get("activation", ""), params)

    def _read_fused(self, node, name, layer, addend: str, activation: str, params) -> None:
        """Read a fused contrib op as ``layer`` (op type, inputs, attributes of a Conv /
        Gemm), then ``+ addend`` when given, then ``activation`` (one of onnxruntime's
        fusable activations, with its parameters)."""
        parts = _FusedParts(self, node)
        layer_type, layer_inputs, layer_attrs = layer
        x = parts.add(layer_type, list(layer_inputs), **layer_attrs)
        if addend:
            x = parts.add("Add", [x, addend])
        if activation in ("Relu", "Tanh", "Sigmoid"):
            parts.add(activation, [x])
        elif activation == "LeakyRelu" and len(params) == 1:
            parts.add(activation, [x], alpha=float(params[0]))
        elif activation == "HardSigmoid" and len(params) == 2:
            parts.add(activation, [x], alpha=float(params[0]), beta=float(params[1]))
        elif activation == "Clip" and len(params) == 2:
            if self.opset < 11:
                parts.add(activation, [x], min=float(params[0]), max=float(params[1]))
            else:
                bounds = [parts.const(label, np.asarray(value, np.float32))
                          for label, value in zip(("min", "max"), params)]
                parts.add(activation, [x, *bounds])
        elif activation:
            raise _Unsupported(f"fused activation {activation!r}")
        parts.read(name)

    def _ms_FusedMatMul(self, node, a, name):
        """onnxruntime's ``alpha * MatMul(A or Aᵀ, B or Bᵀ)`` (ᵀ: the last two axes
        swapped); ``transBatchA`` / ``transBatchB`` (batch axes moved) stay opaque."""
        if a.get("transBatchA", 0) or a.get("transBatchB", 0):
            raise _Unsupported("transBatch")
        parts = _FusedParts(self, node)
        operands = []
        for i, flag in enumerate(("transA", "transB")):
            value = node.input[i]
            if a.get(flag, 0):
                if self.is_const(value):  # a weight: stored transposed, read as a linear
                    value = parts.const(flag, np.swapaxes(self.const(value), -1, -2))
                else:
                    shape = self.info(value).shape
                    if shape is None or len(shape) < 2:
                        raise _Unsupported("rank unknown")
                    perm = [*range(len(shape) - 2), len(shape) - 1, len(shape) - 2]
                    value = parts.add("Transpose", [value], perm=perm,
                                      info=TensorInfo(tuple(shape[p] for p in perm),
                                                      self.info(value).dtype))
            operands.append(value)
        x = parts.add("MatMul", operands)
        alpha = float(a.get("alpha", 1.0))
        if alpha != 1.0:
            dtype = self.info(node.output[0]).dtype
            parts.add("Mul", [x, parts.const("alpha", np.asarray(
                alpha, dtype if dtype in FLOAT_DTYPES and dtype != "bfloat16" else "float32"))])
        parts.read(name)

    def _ms_LayerNormalization(self, node, a, name):  # the contrib op before opset 17's
        self._trailing_norm(node, a, name, "layer_norm")

    def _op_SimplifiedLayerNormalization(self, node, a, name):
        """onnxruntime's RMS norm, in the default domain (:data:`_ORT_DEFAULT_DOMAIN_OPS`)."""
        self._trailing_norm(node, a, name, "rms_norm")

    def _ms_SkipLayerNormalization(self, node, a, name):
        self._skip_norm(node, a, name, "layer_norm")

    def _ms_SkipSimplifiedLayerNormalization(self, node, a, name):
        self._skip_norm(node, a, name, "rms_norm")

    def _skip_norm(self, node, a, name, op):
        """``Norm(input + skip + bias) * gamma (+ beta)`` over the last dim: the residual add
        (a join, output 3 when used) and a layer_norm / rms_norm (output 0). Inputs: input,
        skip, gamma, then beta and bias (layer norm) or bias (RMS norm)."""
        if any(len(node.output) > i and node.output[i] and self.uses.get(node.output[i], 0)
               for i in (1, 2)):
            raise _Unsupported("mean / inverse std outputs are used")
        gamma = self._const_input(node, 2)
        beta = self._const_input(node, 3) if op == "layer_norm" else None
        bias_at = 4 if op == "layer_norm" else 3
        bias = len(node.input) > bias_at and node.input[bias_at]
        if gamma is None or gamma.ndim != 1:
            raise _Unsupported("gamma is not a constant vector")
        summed = [node.output[3] if len(node.output) > 3 and node.output[3] else ""]
        info = [self.info(node.output[0])]
        total = self.add(f"{name}_skip", "add", [self.signal(node.input[0]),
                                                 self.signal(node.input[1])],
                         outputs=None if bias else summed, infos=info, source=node.name)
        if bias:
            total = self.add(f"{name}_skip_bias", "add",
                             [total.out, self.signal(node.input[bias_at])],
                             outputs=summed, infos=info, source=node.name)
        params = {"weight": gamma}
        if op == "layer_norm":
            params["bias"] = np.zeros_like(gamma) if beta is None else beta
        self.add(name, op, [total.out],
                 {"normalized_shape": tuple(gamma.shape), "eps": float(a.get("epsilon", 1e-12))},
                 params, node.output[:1], node.name)

    def _op_GroupNormalization(self, node, a, name):
        scale, bias = self._const_input(node, 1), self._const_input(node, 2)
        channels = self._channels(node.input[0])
        if scale is None or bias is None or channels is None:
            raise _Unsupported("non-constant scale or unknown channels")
        groups = int(a["num_groups"])
        if self.opset < 21:  # opset 18-20: scale and bias per group
            scale = np.repeat(scale, channels // groups)
            bias = np.repeat(bias, channels // groups)
        self.add(name, "group_norm", [self.signal(node.input[0])],
                 {"num_groups": groups, "num_channels": int(channels),
                  "eps": float(a.get("epsilon", 1e-5))},
                 {"weight": scale, "bias": bias}, node.output, node.name)

    def _op_LRN(self, node, a, name):
        self.add(name, "lrn", [self.signal(node.input[0])],
                 {"size": int(a["size"]), "alpha": float(a.get("alpha", 1e-4)),
                  "beta": float(a.get("beta", 0.75)), "k": float(a.get("bias", 1.0))},
                 outputs=node.output, source=node.name)

    # ----------------------------------------------------------------- pooling
    def _pool(self, node, a, name, op):
        self._only_first_output_used(node)
        kernel = tuple(a["kernel_shape"])
        k = len(kernel)
        strides = tuple(a.get("strides", (1,) * k))
        dilations = tuple(a.get("dilations", (1,) * k))
        in_shape = self.info(node.input[0]).shape
        pads = _pads_from_auto(a.get("auto_pad", "NOTSET"),
                               in_shape[2:] if in_shape else None, kernel, strides, dilations)
        if pads is None:
            pads = tuple(a.get("pads", (0,) * (2 * k)))
        attrs = {"dims": k, "kernel_shape": kernel, "stride": strides, "pads": pads,
                 "ceil_mode": bool(a.get("ceil_mode", 0))}
        if op == "avg_pool":
            if any(d != 1 for d in dilations):
                raise _Unsupported("dilated average pooling")
            attrs["count_include_pad"] = bool(a.get("count_include_pad", 0))
        else:
            if a.get("storage_order", 0):
                raise _Unsupported("storage_order")
            attrs["dilation"] = dilations
        self.add(name, op, [self.signal(node.input[0])], attrs, outputs=node.output[:1],
                 source=node.name)

    def _op_AveragePool(self, node, a, name):
        self._pool(node, a, name, "avg_pool")

    def _op_MaxPool(self, node, a, name):
        self._pool(node, a, name, "max_pool")

    def _op_GlobalAveragePool(self, node, a, name):
        self.add(name, "global_avg_pool", [self.signal(node.input[0])], {},
                 outputs=node.output, source=node.name)

    def _op_GlobalMaxPool(self, node, a, name):
        self.add(name, "global_max_pool", [self.signal(node.input[0])], {},
                 outputs=node.output, source=node.name)

    # ----------------------------------------------------------------- shape ops
    def _op_Flatten(self, node, a, name):
        rank = self._rank(node.input[0])
        if rank is None:
            raise _Unsupported("unknown rank")
        axis = int(a.get("axis", 1))
        axis = axis + rank if axis < 0 else axis  # Flatten's axis lies in [-rank, rank]
        x = self.signal(node.input[0])
        shape = self.info(node.input[0]).shape
        if axis == 0:
            self.add(name, "reshape", [x], {"shape": (1, -1)}, outputs=node.output,
                     source=node.name)
        elif axis == 1 or axis == rank:
            if axis == rank:
                # every dim goes to the first output dim; the second is 1
                if not _static(shape):
                    raise _Unsupported("unknown shape")
                self.add(name, "reshape", [x], {"shape": (int(np.prod(shape)), 1)},
                         outputs=node.output, source=node.name)
            else:
                self.add(name, "flatten", [x], {"start_dim": 1, "end_dim": rank - 1},
                         outputs=node.output, source=node.name)
        else:
            inner = self.add(f"{name}.inner", "flatten", [x],
                             {"start_dim": axis, "end_dim": rank - 1},
                             infos=[TensorInfo(None if shape is None else tuple(shape[:axis]) + (
                                 int(np.prod(shape[axis:])) if _static(shape[axis:]) else None,),
                                 self.info(node.input[0]).dtype)])
            self.add(name, "flatten", [inner.out], {"start_dim": 0, "end_dim": axis - 1},
                     outputs=node.output, source=node.name)

    def _op_Reshape(self, node, a, name):
        if self.opset < 5:
            raise _Unsupported("old reshape")
        if not self.is_const(node.input[1]):
            # a shape computed at run time (Shape -> Gather -> Concat on a dynamic batch):
            # when all entries but one are known, -1 stands for that one
            target = self.reshape_targets.get(node.output[0]) or self._partial(node.input[1])
            in_shape = self.info(node.input[0]).shape
            if target is not None and not a.get("allowzero", 0):
                target = [in_shape[i] if d == 0 and in_shape is not None and i < len(in_shape)
                          and isinstance(in_shape[i], int) else d for i, d in enumerate(target)]
            copy_dims = tuple(i for i, d in enumerate(target or ()) if d == 0)
            if (copy_dims and not a.get("allowzero", 0) and len(copy_dims) + (-1 in target) > 1
                    and all(isinstance(d, int) for d in target)):
                # several unknown dims copied from the input (a dynamic batch and sequence
                # length): a reshape that keeps them (ONNX's 0)
                n = self.add(name, "reshape", [self.signal(node.input[0])],
                             {"shape": tuple(target), "copy_dims": copy_dims},
                             outputs=node.output, source=node.name)
                n.meta["flags"].append("reshape target computed at run time; dims "
                                       f"{list(copy_dims)} copied from the input")
                return
            if target is None or 0 in target or sum(d is None or d == -1 for d in target) > 1:
                out_shape = self.info(node.output[0]).shape  # or from shape inference
                if out_shape is None or sum(not isinstance(d, int) for d in out_shape) > 1:
                    raise _Unsupported("dynamic shape")
                target = out_shape
            target = tuple(d if isinstance(d, int) else -1 for d in target)
            n = self.add(name, "reshape", [self.signal(node.input[0])], {"shape": target},
                         outputs=node.output, source=node.name)
            n.meta["flags"].append("reshape target computed at run time; taken from shape "
                                   "inference")
            return
        target = [int(s) for s in self.const(node.input[1])]
        in_shape = self.info(node.input[0]).shape
        if not a.get("allowzero", 0):
            target = _copy_zero_dims(target, in_shape)
        n = self.add(name, "reshape", [self.signal(node.input[0])], {"shape": tuple(target)},
                     outputs=node.output, source=node.name)
        if n.shape is None and _static(in_shape):
            # shape inference could not follow a folded shape chain: resolve -1 here
            known = int(np.prod([d for d in target if d != -1]))
            out = tuple(int(np.prod(in_shape)) // max(known, 1) if d == -1 else d for d in target)
            n.outputs = [TensorInfo(out, self.info(node.input[0]).dtype)]
            self.infos[node.output[0]] = n.outputs[0]

    def _op_DepthToSpace(self, node, a, name):
        mode = a.get("mode", "DCR") if self.opset >= 11 else "DCR"
        if mode not in ("DCR", "CRD"):
            raise _Unsupported(f"mode {mode!r}")
        self.add(name, "depth_to_space", [self.signal(node.input[0])],
                 {"blocksize": int(a["blocksize"]), "mode": mode}, outputs=node.output,
                 source=node.name)

    def _op_SpaceToDepth(self, node, a, name):
        self.add(name, "space_to_depth", [self.signal(node.input[0])],
                 {"blocksize": int(a["blocksize"]), "mode": "DCR"}, outputs=node.output,
                 source=node.name)

    def _op_Transpose(self, node, a, name):
        perm = a.get("perm")
        if perm is None:
            rank = self._rank(node.input[0])
            if rank is None:
                raise _Unsupported("unknown rank")
            perm = list(reversed(range(rank)))
        self.add(name, "transpose", [self.signal(node.input[0])], {"perm": tuple(perm)},
                 outputs=node.output, source=node.name)

    def _op_Squeeze(self, node, a, name):
        axes = a.get("axes") if self.opset < 13 else self._const_input(node, 1)
        axes = None if axes is None else [int(x) for x in np.asarray(axes).reshape(-1)]
        axes = self._norm_axes(axes, self._rank(node.input[0]))
        self.add(name, "squeeze", [self.signal(node.input[0])], {"axes": axes},
                 outputs=node.output, source=node.name)

    def _op_Unsqueeze(self, node, a, name):
        axes = a.get("axes") if self.opset < 13 else self._const_input(node, 1)
        if axes is None:
            raise _Unsupported("axes missing")
        axes = [int(x) for x in np.asarray(axes).reshape(-1)]
        rank = self._rank(node.input[0])
        axes = self._norm_axes(axes, None if rank is None else rank + len(axes))
        self.add(name, "unsqueeze", [self.signal(node.input[0])], {"axes": tuple(sorted(axes))},
                 outputs=node.output, source=node.name)

    def _op_Slice(self, node, a, name):
        if self.opset < 10:
            starts, ends = a["starts"], a["ends"]
            axes = a.get("axes", list(range(len(starts))))
            steps = [1] * len(starts)
        else:
            starts = self._const_input(node, 1)
            ends = self._const_input(node, 2)
            axes = self._const_input(node, 3)
            steps = self._const_input(node, 4)
            if starts is None or ends is None:
                raise _Unsupported("dynamic slice")
            starts, ends = starts.tolist(), ends.tolist()
            axes = list(range(len(starts))) if axes is None else axes.tolist()
            steps = [1] * len(starts) if steps is None else steps.tolist()
        rank = self._rank(node.input[0])
        axes = self._norm_axes(axes, rank)
        shape = self.info(node.input[0]).shape
        big = 2**62
        norm_ends = []
        for ax, e, st in zip(axes, ends, steps):
            dim = shape[ax] if shape is not None and isinstance(shape[ax], int) else None
            if dim is not None and st > 0 and e > dim:
                e = dim  # INT64_MAX means "to the end": keep ends readable
            elif st > 0 and e > big:
                e = big
            norm_ends.append(int(e))
        self.add(name, "slice", [self.signal(node.input[0])],
                 {"axes": tuple(axes), "starts": tuple(int(s) for s in starts),
                  "ends": tuple(norm_ends), "steps": tuple(int(s) for s in steps)},
                 outputs=node.output, source=node.name)

    def _op_Gather(self, node, a, name):
        """Gather of one constant index from a signal: a select (``x[:, i]``, the exporters'
        form of ``unbind`` / ``chunk``: attention's q, k, v taken from the stacked qkv),
        written as a slice and a squeeze. Other Gathers (an embedding table indexed by
        token ids, several indices) stay opaque."""
        data, index = node.input[0], node.input[1]
        if self.is_const(data) or not self.is_const(index) or self.const(index).ndim != 0:
            raise _Unsupported("not a select from a signal")
        shape = self.info(data).shape
        rank = self._rank(data)
        axis, i = int(a.get("axis", 0)), int(self.const(index))
        if rank is None or shape is None:
            # (a shape computed at run time, as in the TorchScript export of attention's
            # q, k, v split): a select along a non-negative axis needs no rank
            if axis < 0 or i < 0:
                raise _Unsupported("negative axis or index, unknown rank")
            sliced = None
        else:
            axis = self._norm_axes([axis], rank)[0]
            dim = shape[axis]
            if i < 0:
                if not isinstance(dim, int):
                    raise _Unsupported("negative index into an unknown dim")
                i += dim
            sliced = tuple(1 if k == axis else d for k, d in enumerate(shape))
        dtype = self.info(data).dtype or "float32"
        picked = self.add(f"{name}.slice", "slice", [self.signal(data)],
                          {"axes": (axis,), "starts": (i,), "ends": (i + 1,), "steps": (1,)},
                          infos=[TensorInfo(sliced, dtype)])
        self.add(name, "squeeze", [picked.out], {"axes": [axis]}, outputs=node.output,
                 source=node.name)

    def _op_Split(self, node, a, name):
        rank = self._rank(node.input[0])
        axis = int(a.get("axis", 0))
        if axis < 0:
            if rank is None:
                raise _Unsupported("negative axis, unknown rank")
            axis %= rank
        sizes = a.get("split") if self.opset < 13 else self._const_input(node, 1)
        if sizes is None:
            shape = self.info(node.input[0]).shape
            dim = shape[axis] if shape is not None else None
            if not isinstance(dim, int):
                raise _Unsupported("unknown split dim")
            n = len(node.output)
            chunk = -(-dim // n)
            sizes = [chunk] * (n - 1) + [dim - chunk * (n - 1)]
        sizes = tuple(int(s) for s in np.asarray(sizes).reshape(-1))
        self.add(name, "split", [self.signal(node.input[0])], {"axis": axis, "sizes": sizes},
                 outputs=node.output, source=node.name)

    def _op_Pad(self, node, a, name):
        mode = a.get("mode", "constant")
        if mode not in ("constant", "reflect", "edge"):
            raise _Unsupported(f"pad mode {mode}")
        if self.opset < 11:
            pads = list(a["pads"])
            value = float(a.get("value", 0.0))
        else:
            pads = self._const_input(node, 1)
            if pads is None:
                raise _Unsupported("dynamic pads")
            pads = [int(p) for p in pads]
            cv = self._const_input(node, 2)
            value = 0.0 if cv is None else float(np.asarray(cv).reshape(-1)[0]) if np.asarray(cv).size else 0.0
            axes = self._const_input(node, 3)
            if axes is not None:
                rank = self._rank(node.input[0])
                if rank is None:
                    raise _Unsupported("pad axes with unknown rank")
                axes = [int(x) % rank for x in axes]
                full = [0] * (2 * rank)
                for i, ax in enumerate(axes):
                    full[ax] = pads[i]
                    full[rank + ax] = pads[len(axes) + i]
                pads = full
        self.add(name, "pad", [self.signal(node.input[0])],
                 {"pads": tuple(int(p) for p in pads), "mode": mode, "value": value},
                 outputs=node.output[:1], source=node.name)

    def _op_Dropout(self, node, a, name):
        self._only_first_output_used(node)
        if self.opset < 12:
            p = float(a.get("ratio", 0.5))
        else:
            ratio = self._const_input(node, 1)
            training = self._const_input(node, 2)
            if training is not None and bool(np.asarray(training).reshape(-1)[0]):
                raise _Unsupported("training mode")
            p = 0.5 if ratio is None else float(np.asarray(ratio).reshape(-1)[0])
        self.add(name, "dropout", [self.signal(node.input[0])], {"p": p},
                 outputs=node.output[:1], source=node.name)

    def _op_Cast(self, node, a, name):
        # between floating types: the canonical cast (the identity on the kernel); integer
        # casts (sizes, indices) stay ONNX ops
        source = self.info(node.input[0]).dtype
        target = _dtype_name(int(a.get("to", 0)))
        if target not in FLOAT_DTYPES or source not in FLOAT_DTYPES:
            raise _Unsupported("not a cast between floating types")
        self.add(name, "cast", [self.signal(node.input[0])], {"dtype": target},
                 outputs=node.output, source=node.name)

    def _op_Identity(self, node, a, name):
        self.add(name, "identity", [self.signal(node.input[0])], {}, outputs=node.output,
                 source=node.name)

    def _softmax(self, node, a, name, op):
        rank = self._rank(node.input[0])
        default = -1 if self.opset >= 13 else 1
        axis = int(a.get("axis", default))
        if rank is None:
            if axis != -1:
                raise _Unsupported("unknown rank")
            self.add(name, op, [self.signal(node.input[0])], {"axis": -1},
                     outputs=node.output, source=node.name)
            return
        axis %= rank
        if self.opset >= 13 or axis == rank - 1:
            self.add(name, op, [self.signal(node.input[0])], {"axis": axis},
                     outputs=node.output, source=node.name)
            return
        # opset < 13: softmax over the input flattened to 2-D at `axis`
        shape = self.info(node.input[0]).shape
        if not _static(shape):
            raise _Unsupported("opset<13 softmax over several axes needs static shapes")
        dtype = self.info(node.input[0]).dtype
        rows, cols = int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))
        flat = self.add(f"{name}.flatten", "reshape", [self.signal(node.input[0])],
                        {"shape": (rows, cols)}, infos=[TensorInfo((rows, cols), dtype)])
        soft = self.add(f"{name}.2d", op, [flat.out], {"axis": 1},
                        infos=[TensorInfo((rows, cols), dtype)])
        self.add(name, "reshape", [soft.out], {"shape": tuple(shape)}, outputs=node.output,
                 source=node.name)

    def _op_Softmax(self, node, a, name):
        self._softmax(node, a, name, "softmax")

    def _op_LogSoftmax(self, node, a, name):
        self._softmax(node, a, name, "log_softmax")

    def _reduce(self, node, a, name):
        kind = _REDUCE_KINDS[node.op_type]
        axes_as_input = self.opset >= 18 or (node.op_type == "ReduceSum" and self.opset >= 13)
        if axes_as_input:
            axes = self._const_input(node, 1)
            axes = None if axes is None or np.asarray(axes).size == 0 else \
                [int(x) for x in np.asarray(axes).reshape(-1)]
            if axes is None and a.get("noop_with_empty_axes", 0):
                raise _Unsupported("noop_with_empty_axes")
        else:
            axes = a.get("axes")
        axes = self._norm_axes(axes, self._rank(node.input[0]))
        self.add(name, "reduce", [self.signal(node.input[0])],
                 {"kind": kind, "axes": axes, "keepdims": bool(a.get("keepdims", 1))},
                 outputs=node.output, source=node.name)

    _op_ReduceMean = _op_ReduceSum = _op_ReduceMax = _op_ReduceMin = _op_ReduceProd = _reduce


# --------------------------------------------------------------------------- patterns
def _fuse_layer_norms(nodes, imp: "_Importer"):
    """Replace exporters' decomposed layer norms (opset < 17)

        mean = ReduceMean(x); d = x - mean; var = ReduceMean(d ** 2)
        y = d / Sqrt(var + eps) [* weight] [+ bias]

    over the trailing axes by one ``LayerNormalization`` node (read by the normal
    handler), so that the IR has a ``layer_norm`` the shaping passes can see. Only
    patterns whose intermediate values have no other use are fused."""
    import onnx

    if not any(n.op_type == "Sqrt" for n in nodes):
        return nodes
    producer = {out: n for n in nodes for out in n.output if out}
    consts = _pre_consts(nodes, imp)

    def prod(name, op_type):
        n = producer.get(name)
        return n if n is not None and n.op_type == op_type and n.domain in ("", "ai.onnx") else None

    def single_use(name):
        return imp.uses.get(name, 0) == 1

    def scalar(name):
        v = consts.get(name)
        return None if v is None or v.size != 1 else float(v.reshape(-1)[0])

    def reduce_axes(n):
        if n.op_type != "ReduceMean" or not _attr_dict(n).get("keepdims", 1):
            return None
        if imp.opset >= 18:
            if len(n.input) < 2 or n.input[1] not in consts:
                return None
            return sorted(int(a) for a in consts[n.input[1]].reshape(-1))
        axes = _attr_dict(n).get("axes")
        return None if axes is None else sorted(int(a) for a in axes)

    # consumers of each value, to find the optional affine after the division
    consumers: dict[str, list] = {}
    for n in nodes:
        for name in n.input:
            consumers.setdefault(name, []).append(n)

    replace: dict[int, object] = {}  # id(first removed node) -> new node
    drop: set[int] = set()
    for div in nodes:
        if div.op_type != "Div" or div.domain not in ("", "ai.onnx"):
            continue
        d_name, s_name = div.input
        sqrt = prod(s_name, "Sqrt")
        sub = prod(d_name, "Sub")
        if sqrt is None or sub is None or not single_use(s_name):
            continue
        add_eps = prod(sqrt.input[0], "Add")
        if add_eps is None or not single_use(sqrt.input[0]):
            continue
        var_name, eps_name = add_eps.input
        if scalar(eps_name) is None:
            var_name, eps_name = eps_name, var_name
        eps = scalar(eps_name)
        var = producer.get(var_name)
        if eps is None or var is None or not single_use(var_name):
            continue
        pow_ = prod(var.input[0], "Pow")
        sq = pow_ if pow_ is not None and scalar(pow_.input[1]) == 2.0 and pow_.input[0] == d_name \
            else None
        if sq is None:
            mul = prod(var.input[0], "Mul")
            sq = mul if mul is not None and list(mul.input) == [d_name, d_name] else None
        if sq is None or not single_use(var.input[0]):
            continue
        x_name, mean_name = sub.input
        mean = producer.get(mean_name)
        if mean is None or mean.input[0] != x_name or not single_use(mean_name):
            continue
        axes_mean, axes_var = reduce_axes(mean), reduce_axes(var)
        if axes_mean is None or axes_var is None:
            continue
        rank = imp.info(x_name).rank
        if rank is None:
            continue
        axes = sorted(a % rank for a in axes_mean)
        if axes != sorted(a % rank for a in axes_var) or axes != list(range(rank - len(axes), rank)):
            continue
        if imp.uses.get(d_name, 0) != (2 if sq.op_type == "Pow" else 3):
            continue
        # optional affine: Div -> Mul(const) -> Add(const)
        out_name = div.output[0]
        chain = [mean, sub, sq, var, add_eps, sqrt, div]
        weight = bias = None
        users = consumers.get(out_name, [])
        if single_use(out_name) and len(users) == 1 and users[0].op_type == "Mul":
            mul = users[0]
            other = mul.input[1] if mul.input[0] == out_name else mul.input[0]
            if other in consts:
                weight, out_name = other, mul.output[0]
                chain.append(mul)
                users = consumers.get(out_name, [])
                if single_use(out_name) and len(users) == 1 and users[0].op_type == "Add":
                    add = users[0]
                    other = add.input[1] if add.input[0] == out_name else add.input[0]
                    if other in consts:
                        bias, out_name = other, add.output[0]
                        chain.append(add)
        if weight is None:
            shape = imp.info(x_name).shape
            trailing = shape[rank - len(axes):] if shape is not None else None
            if not _static(trailing):
                continue
            weight = imp.g.unique_name(f"{div.name or out_name}.ones")
            imp.consts[weight] = np.ones(trailing, imp.info(x_name).dtype or "float32")
        inputs = [x_name, weight] + ([bias] if bias else [])
        for name in inputs[1:]:
            if name not in imp.consts:
                imp.consts[name] = consts[name]  # a Constant node's value, needed early
        fused = onnx.helper.make_node("LayerNormalization", inputs, [out_name],
                                      name=_common_scope(chain), axis=-len(axes), epsilon=eps)
        first = min(chain, key=lambda n: nodes.index(n))
        replace[id(first)] = fused
        drop |= {id(n) for n in chain if n is not first}
    if not replace:
        return nodes
    # the fused node takes the place of the chain's last node so that its inputs exist
    out = []
    pending = {}
    for n in nodes:
        if id(n) in replace:
            fused = replace[id(n)]
            pending[fused.output[0]] = fused
            continue
        if id(n) in drop:
            if n.output and n.output[0] in pending:
                out.append(pending.pop(n.output[0]))
            continue
        out.append(n)
    out.extend(pending.values())
    return out


def _common_scope(chain) -> str:
    """The shared scope of the fused nodes' names ("/features/features.1/LayerNormalization")."""
    names = [n.name for n in chain if n.name]
    if not names:
        return ""
    prefix = os.path.commonprefix(names)
    prefix = prefix[: prefix.rfind("/") + 1] if "/" in prefix else prefix
    return (prefix + "LayerNormalization") if prefix.startswith("/") else (prefix or names[-1])


def _pre_consts(nodes, imp: "_Importer") -> dict:
    """Values known before conversion: initializers, Constant nodes and their aliases
    (exporters alias shared weights through Identity nodes)."""
    consts = dict(imp.consts)
    for n in nodes:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            value = _constant_value(n, _attr_dict(n))
            if value is not None:
                consts[n.output[0]] = value
        elif n.op_type == "Identity" and n.input and n.input[0] in consts:
            consts[n.output[0]] = consts[n.input[0]]
    return consts


