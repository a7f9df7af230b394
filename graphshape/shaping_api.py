"""The shaping entry points: :func:`shape` (PyTorch) and :func:`shape_onnx` (ONNX files).

Both load the model into the IR, run :func:`graphshape.passes.shaping.shape_graph`, and emit
the result in the source's framework. ``graphshape.shape`` and ``graphshape.shape_onnx``
are these functions.
"""

from __future__ import annotations

import json
import os
from typing import Any

from graphshape.atomic import atomic_write
from graphshape.errors import GraphshapeError
from graphshape.passes.shaping import DEFAULT_SHORTCUT_WEIGHT, ShapeReport, shape_graph

#: a small constant that keeps per-location normalization finite on all-zero locations
PLN_EPS = 1e-6


def _options(method, activation, shortcut_weight, zeta, eta, tau, max_pool_to_avg, seed,
             pln=False, preactivation_shortcuts=None, fold_scales="weights"):
    """The options as shape_graph takes them, after checking their types (the values are
    checked by the solver, which knows the valid ranges)."""
    import math
    import numbers

    if not isinstance(method, str):
        raise GraphshapeError(f"method must be a string (DKS, TAT or untransformed), got "
                              f"{type(method).__name__} {method!r}")
    if activation is not None and not isinstance(activation, str):
        raise GraphshapeError(f"activation must be an activation name such as 'tanh' or None, "
                              f"got {type(activation).__name__} {activation!r}")
    for name, value in (("shortcut_weight", shortcut_weight), ("zeta", zeta), ("eta", eta),
                        ("tau", tau)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise GraphshapeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(float(value)):
            raise GraphshapeError(f"{name} must be a finite number, got {value!r}")
    from graphshape.passes.fold import canonical_fold_mode

    fold_scales = canonical_fold_mode(fold_scales)
    for name, value in (("pln", pln), ("max_pool_to_avg", max_pool_to_avg)):
        if not isinstance(value, bool):
            raise GraphshapeError(f"{name} must be True or False, got {value!r}")
    if preactivation_shortcuts is not None and not isinstance(preactivation_shortcuts, bool):
        raise GraphshapeError("preactivation_shortcuts must be True, False or None (automatic: "
                              f"True for TAT), got {preactivation_shortcuts!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or seed < 0):
        raise GraphshapeError(f"seed must be a non-negative integer or None, got {seed!r}")
    return dict(method=method, activation=activation, shortcut_weight=float(shortcut_weight),
                zeta=float(zeta), eta=float(eta), tau=float(tau),
                max_pool_to_avg=max_pool_to_avg, preactivation_shortcuts=preactivation_shortcuts,
                seed=None if seed is None else int(seed), fold_scales=fold_scales)


def _release_memory() -> None:
    """Collect garbage and return freed heap memory to the OS (glibc ``malloc_trim``):
    the weights' arrays are freed, but glibc would otherwise keep the pages, and the next
    stage's allocations would add to the peak resident memory instead of reusing them."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


#: ONNX ops of quantized models (onnxruntime.quantization's QDQ and QOperator formats,
#: dynamic quantization), besides every ``QLinear*`` op
_QUANTIZED_ONNX_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger",
    "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm", "QAttention",
    "QEmbedLayerNormalization", "QOrderedMatMul"})


def _quantized_op(node) -> str | None:
    """What quantizes, for an opaque node of a quantized model: an ONNX quantization op, a
    ``torch.ao`` quantized / fake-quantized module or a torch quantize function."""
    if node.op != "opaque":
        return None
    a = node.attrs
    if a.get("framework") == "onnx":
        op_type = str(a.get("op_type"))
        quantized = op_type in _QUANTIZED_ONNX_OPS or op_type.startswith("QLinear")
    else:
        # torch.ao's quantized, QAT and fake-quantize modules, and the quantize functions
        # (not every "quantize": a VQ-VAE's VectorQuantizer is a float model)
        description = str(a.get("description", ""))
        quantized = "torch.ao." in description or any(
            f in description for f in ("quantize_per_tensor", "quantize_per_channel",
                                       "fake_quantize", "dequantize"))
    return str(a.get("description")) if quantized else None


def check_not_quantized(graph, what: str) -> None:
    """GraphshapeError for a quantized model: its integer layers have no kernel rule, and
    DKS/TAT describe a float network at initialization; ``what`` is "shape" or
    "analyse"."""
    found: dict[str, int] = {}
    for node in graph:
        op = _quantized_op(node)
        if op is not None:
            found[op] = found.get(op, 0) + 1
    if found:
        ops = ", ".join(f"{n} {op}" for op, n in sorted(found.items(), key=lambda kv: -kv[1])[:4])
        raise GraphshapeError(
            f"the model is quantized ({ops}): graphshape cannot {what} it, because DKS and TAT "
            "describe a floating-point network at initialization. Use the float model "
            "(before quantization), and quantize the shaped one afterwards "
            "(onnxruntime.quantization, torch.ao.quantization)")


def check_shapeable(graph, method: str) -> None:
    """Raise GraphshapeError, saying what to do, for a graph that shaping cannot help: no
    outputs, no floating-point computation, a quantized model, or (for DKS and TAT) not a
    single activation."""
    from graphshape.passes.shaping import canonical_method

    method = canonical_method(method)
    if not graph.output_nodes:
        raise GraphshapeError("the model has no outputs (an empty graph): nothing to shape; "
                              "export the model again")
    check_not_quantized(graph, "shape")
    floating = any(graph[n].outputs and str(graph[n].outputs[0].dtype or "float").startswith(
        ("float", "bfloat")) for n in graph.inputs)
    floating = floating or any(
        getattr(v, "dtype", None) is not None and v.dtype.kind == "f"
        for node in graph for v in node.params.values())
    if not floating:
        dtypes = sorted({str(graph[n].outputs[0].dtype) for n in graph.inputs if graph[n].outputs})
        raise GraphshapeError(
            f"the model computes without floating-point values (inputs: {', '.join(dtypes) or 'none'}, "
            "no floating-point weights): DKS and TAT shape floating-point networks; "
            "export the model in float32")
    from graphshape.passes.normalize import norm_activation_refusal

    for node in graph:  # (before "no activation": such a layer may be the only one)
        refusal = norm_activation_refusal(node)
        if refusal is not None:
            raise refusal
    if method != "untransformed" and not any(
            node.op == "activation" or (node.attrs.get("norm_activation") or {}).get("activation")
            for node in graph):
        # (a normalization-activation layer's activation remains once its norm is removed)
        opaque = sorted({str(n.attrs.get("description")) for n in graph if n.op == "opaque"})
        hint = (f" (its opaque ops, {', '.join(opaque[:5])}, may hide one: graphshape cannot "
                "read them)" if opaque else "")
        raise GraphshapeError(
            f"the model has no activation function (no relu, tanh, gelu, ... node){hint}: "
            f"{method} transforms activations, so there is nothing to shape. Use "
            "method='untransformed' to only remove normalization and re-initialize the weights")


def per_location_normalize(x):
    """PLN (DKS paper): scale every location (all channels at one batch entry and spatial
    position) so that its mean square over channels (axis 1) is 1: q = 1 everywhere."""
    import torch

    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + PLN_EPS)


def _add_pln_torch(gm) -> list[str]:
    """Insert :func:`per_location_normalize` after every floating-point input placeholder."""
    graph = gm.graph
    done = []
    for node in list(graph.nodes):
        if node.op != "placeholder":
            continue
        users = list(node.users)
        if not users:
            continue
        with graph.inserting_after(node):
            pln = graph.call_function(per_location_normalize, (node,))
        for user in users:
            user.replace_input_with(node, pln)
        done.append(node.name)
    graph.lint()
    gm.recompile()
    return done


def shape(module, example_inputs=None, *, method: str = "TAT", activation: str | None = None,
          shortcut_weight: float = DEFAULT_SHORTCUT_WEIGHT, zeta: float = 1.5, eta: float = 0.9,
          tau: float = 0.3, pln: bool = False, max_pool_to_avg: bool = False,
          preactivation_shortcuts: bool | None = None, seed: int | None = None,
          fold_scales: bool | str = "weights", trainable_initializers: bool = False):
    """Shape a model with DKS or TAT and return a ``torch.fx.GraphModule``.

    module:          an ``nn.Module`` (traced with torch.fx), a graphshape ``Graph``, or
                     anything else :func:`graphshape.load` takes (an ONNX file: ONNX in,
                     PyTorch out).
    example_inputs:  a tensor or tuple of tensors (shapes for tracing; values unused).
    method:          "DKS", "TAT" or "untransformed" (structure and initialization only).
    activation:      replace the main-path nonlinearities by this registry name (TAT turns a
                     relu model into leaky_relu by itself, with a warning).
    shortcut_weight: residual joins become ``w * shortcut + sqrt(1 - w^2) * branch``; 0
                     removes the skip connections.
    zeta, eta, tau:  DKS max slope, TAT leaky-relu C_f(0) and TAT max curvature targets.
    pln:             per-location normalization of every input (q = 1 at every location).
    max_pool_to_avg: replace max pooling by average pooling.
    preactivation_shortcuts:
                     in V1 residual blocks (``act(w * act_prev(...) + branch)``, torchvision's
                     ResNets), let the identity shortcut read the residual stream before
                     ``act_prev`` (a pre-activation, V2-style ResNet: every activation then
                     reads a Gaussian). None (default): on for TAT, whose leaky ReLU has a
                     non-zero mean that otherwise makes q grow block after block; off for DKS
                     (zero-mean) and untransformed. See docs/shaping.md.
    seed:            seed of the orthogonal initialization.
    fold_scales:     after initialization, move the activations' positive scales (TAT's
                     TReLU becomes a plain leaky_relu) and the normalized sums' weights onto
                     the neighbouring conv/linear layers
                     (:func:`graphshape.passes.fold.fold_scales`): fewer passes over the
                     activations, the same function. "weights" (default): the layers
                     compute with scaled weights (``ScaledConv2d``...), the parameters and
                     their gradients are those of the unfolded network, so training is
                     unchanged. "parameters" (or True): the stored parameters are scaled,
                     a little faster, but gradient descent then sees differently scaled
                     weights (measured in benchmarks/shortcut_weight.py and
                     examples/train_vanilla_digits.py). "none" (or False): the scales stay
                     elementwise passes.
    trainable_initializers:
                     from an ONNX file: its float initializers that no layer takes as its
                     weight (a ViT's ``pos_embed``, a layer scale) become parameters of the
                     result; False (default): buffers, frozen in training, and the report
                     warns, naming them (see :func:`graphshape.to_torch`).

    ``result.meta["graphshape"]`` is the :class:`ShapeReport`.
    """
    from graphshape.api import load
    from graphshape.backend_torch import emit

    options = _options(method, activation, shortcut_weight, zeta, eta, tau, max_pool_to_avg,
                       seed, pln, preactivation_shortcuts, fold_scales)
    if not isinstance(trainable_initializers, bool):
        raise GraphshapeError(f"trainable_initializers must be True or False, "
                              f"got {trainable_initializers!r}")
    # the weights are about to be re-initialized: no need to read them for the analysis
    graph = load(module, example_inputs, cache_weight_norms=False)
    check_shapeable(graph, method)
    shaped, report = shape_graph(graph, **options, copy=False)  # graph is ours to use up
    del graph
    # shaped owns its (fresh) arrays and is dropped
    gm = emit(shaped, copy_params=False, trainable_initializers=trainable_initializers)
    report.options["trainable_initializers"] = trainable_initializers
    warn_frozen_initializers(shaped, report, trainable_initializers)
    if pln:
        names = _add_pln_torch(gm)
        report.rewritten.extend({"node": n, "op": "input", "what": "per-location normalized"}
                                for n in names)
    report.options["pln"] = pln
    gm.meta["graphshape"] = report
    return gm


def warn_frozen_initializers(graph, report: ShapeReport, trainable_initializers: bool,
                             flag: str = "trainable_initializers=True") -> None:
    """Add a report warning naming the non-scalar float initializers of an ONNX source that
    the torch backend emits as buffers (a pos_embed, a layer scale; 0-d ones are folded
    scalars, not listed), unless ``trainable_initializers`` made them parameters."""
    if trainable_initializers:
        return
    frozen = [node.meta.get("source_name", node.name) for node in graph
              if node.op == "constant" and node.meta.get("initializer")
              and not node.attrs.get("trainable") and node.params["value"].ndim >= 1
              and node.params["value"].dtype.kind == "f" and graph.users(node.name)]
    if frozen:
        names = ", ".join(frozen[:4]) + (", ..." if len(frozen) > 4 else "")
        report.warnings.append(
            f"{len(frozen)} float initializer(s) of the file that no layer takes as its weight "
            f"({names}) are buffers of the PyTorch module, frozen in training; {flag} "
            "makes them parameters")


# --------------------------------------------------------------------------- ONNX
def _add_pln_onnx(model) -> list[str]:
    """x -> x / sqrt(ReduceMean(x * x, axis 1) + eps) after every graph input, in the model's
    own opset (ReduceMean takes axes as an input from opset 18 on)."""
    import numpy as np
    from onnx import helper, numpy_helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    g = model.graph
    inits = {i.name for i in g.initializer}
    new_nodes, done = [], []
    for inp in g.input:
        if inp.name in inits:
            continue
        x, base = inp.name, f"graphshape_pln_{len(done)}"
        sq, mean, shifted, root, out = (f"{base}_{s}" for s in ("sq", "mean", "eps", "sqrt", "out"))
        eps = numpy_helper.from_array(np.array(PLN_EPS, dtype=np.float32), f"{base}_epsilon")
        g.initializer.append(eps)
        nodes = [helper.make_node("Mul", [x, x], [sq])]
        if opset >= 18:
            axes = numpy_helper.from_array(np.array([1], dtype=np.int64), f"{base}_axes")
            g.initializer.append(axes)
            nodes.append(helper.make_node("ReduceMean", [sq, axes.name], [mean], keepdims=1))
        else:
            nodes.append(helper.make_node("ReduceMean", [sq], [mean], axes=[1], keepdims=1))
        nodes += [helper.make_node("Add", [mean, eps.name], [shifted]),
                  helper.make_node("Sqrt", [shifted], [root]),
                  helper.make_node("Div", [x, root], [out])]
        for node in g.node:
            for i, name in enumerate(node.input):
                if name == x:
                    node.input[i] = out
        for o in g.output:
            if o.name == x:  # an input returned as is stays as it is
                raise GraphshapeError(f"ONNX input {x!r} is also an output: cannot apply PLN")
        new_nodes += nodes
        done.append(x)
    old = list(g.node)
    del g.node[:]
    g.node.extend(new_nodes + old)
    return done


def shape_onnx(src, dst, *, method: str = "TAT", activation: str | None = None,
               shortcut_weight: float = DEFAULT_SHORTCUT_WEIGHT, zeta: float = 1.5,
               eta: float = 0.9, tau: float = 0.3, pln: bool = False,
               max_pool_to_avg: bool = False, preactivation_shortcuts: bool | None = None,
               seed: int | None = None, fold_scales: bool | str = "weights") -> ShapeReport:
    """Shape an ONNX model (a path, an ``onnx.ModelProto`` or its serialized bytes) and
    write it to ``dst``.

    Same options as :func:`shape`. The result is checker-valid in the source's opset, carries
    the report as JSON in ``metadata_props["graphshape"]``, and is written atomically (a
    temporary file in ``dst``'s folder, then renamed); ``src`` is never modified."""
    from graphshape.backend_onnx import emit
    from graphshape.frontends.onnx_import import load_onnx

    if not isinstance(dst, (str, os.PathLike)):
        raise GraphshapeError(f"dst must be a file path, got {type(dst).__name__}")
    dst = os.fspath(dst)
    options = _options(method, activation, shortcut_weight, zeta, eta, tau, max_pool_to_avg,
                       seed, pln, preactivation_shortcuts, fold_scales)
    if os.path.isdir(dst):
        raise GraphshapeError(f"destination {dst!r} is a folder: give a file path such as "
                              f"{os.path.join(dst, 'shaped.onnx')!r}")
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise GraphshapeError(f"destination folder {folder!r} does not exist")
    if isinstance(src, (str, os.PathLike)):
        src_path = os.fspath(src)
        if not os.path.exists(src_path):
            raise GraphshapeError(f"no such ONNX file: {src_path!r}")
        if os.path.abspath(src_path) == os.path.abspath(dst) or (
                os.path.exists(dst) and os.path.samefile(src_path, dst)):
            raise GraphshapeError(f"destination {dst!r} is the source file: graphshape never "
                                  "overwrites its input; choose another path")
    graph = load_onnx(src, cache_weight_norms=False)  # the weights are about to be replaced
    _release_memory()  # the parsed protobuf is gone: its pages go back before shaping
    check_shapeable(graph, method)
    shaped, report = shape_graph(graph, **options, copy=False)  # graph is ours to use up
    # the source weights are no longer needed: free them (and hand the freed heap back to
    # the OS) before emitting, so that the peak holds about two copies of the weights
    del graph
    _release_memory()
    model = emit(shaped)
    del shaped
    _release_memory()
    if pln:
        names = _add_pln_onnx(model)
        report.rewritten.extend({"node": n, "op": "input", "what": "per-location normalized"}
                                for n in names)
    report.options["pln"] = pln
    for prop in list(model.metadata_props):
        if prop.key == "graphshape":
            model.metadata_props.remove(prop)
    entry = model.metadata_props.add()
    entry.key, entry.value = "graphshape", report.to_json()
    _check_emitted(model)
    # atomic (temp file in dst's folder, then os.replace); external data past 2 GB
    save(model, dst)
    return report


def _check_emitted(model) -> None:
    """onnx.checker on the shaped model (over 2 GB through a temp file), tolerating what
    the loader tolerates: a declared value without a shape (onnxruntime runs those)."""
    import onnx

    from graphshape.backend_onnx import check

    try:
        check(_without_weights(model), full_check=False)
    except GraphshapeError as e:
        if "'shape' of 'type' is required" in str(e):
            return
        raise GraphshapeError(f"the shaped ONNX model does not pass onnx.checker "
                              f"({str(e).splitlines()[0]}); this is a graphshape bug: please "
                              "report it with the model") from None
    except onnx.checker.ValidationError as e:  # pragma: no cover - check() converts these
        raise GraphshapeError(f"the shaped ONNX model does not pass onnx.checker: {e}") from None


def _without_weights(model, keep_bytes: int | None = 1024):
    """A copy of ``model`` without its large initializers, cheap to serialize.

    ``keep_bytes`` given: initializers over that many bytes become typed graph inputs (for
    the checker, which serializes the model and would copy every weight twice; graphshape's
    emitter writes the weights from numpy arrays, so their data is well-formed already).
    ``keep_bytes=0``: every initializer is left out, nothing added (for streaming)."""
    import onnx

    def copy_fields(src, dst, skip):
        for field, value in src.ListFields():
            if field.name == skip:
                continue
            if hasattr(value, "CopyFrom"):  # a message
                getattr(dst, field.name).CopyFrom(value)
            elif hasattr(value, "extend"):  # a repeated field
                getattr(dst, field.name).extend(value)
            else:
                setattr(dst, field.name, value)

    light = onnx.ModelProto()
    copy_fields(model, light, skip="graph")
    graph, light_graph = model.graph, light.graph
    copy_fields(graph, light_graph, skip="initializer")
    if keep_bytes == 0:
        return light
    inputs = {i.name for i in graph.input}
    for init in graph.initializer:
        size = len(init.raw_data) if init.HasField("raw_data") else init.ByteSize()
        if size <= keep_bytes or init.data_location == onnx.TensorProto.EXTERNAL:
            light_graph.initializer.add().CopyFrom(init)
        elif init.name not in inputs:
            light_graph.input.append(onnx.helper.make_tensor_value_info(
                init.name, init.data_type, list(init.dims)))
    return light


def save(model, dst) -> None:
    """Write an ONNX model atomically: a temp file in ``dst``'s folder, then os.replace;
    models over protobuf's 2 GB limit put their weights in ``<dst>.data`` beside it
    (:func:`graphshape.backend_onnx.save`). Smaller models are streamed: the model without
    its weights, then one initializer at a time, so that writing never holds a second copy
    of all the weights (``SerializeToString`` of the whole model would)."""
    from graphshape import backend_onnx

    dst = os.fspath(dst)
    try:
        if backend_onnx._model_bytes(model) >= backend_onnx._TWO_GB - 64 * 2**20:
            backend_onnx.save(model, dst)
            return
        def write(tmp):
            with open(tmp, "wb") as fh:
                _stream_model(model, fh)

        atomic_write(dst, write)
    except OSError as e:
        raise GraphshapeError(f"cannot write {dst!r}: {e.strerror or e}") from None


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


#: protobuf tags (field number << 3 | wire type 2): ModelProto.graph = 7,
#: GraphProto.initializer = 5
_MODEL_GRAPH_TAG, _GRAPH_INITIALIZER_TAG = bytes([7 << 3 | 2]), bytes([5 << 3 | 2])


def _stream_model(model, fh) -> None:
    """Write ``model``'s protobuf encoding to ``fh`` one initializer at a time.

    Protobuf merges repeated occurrences of an embedded message field, so
    ``model-without-initializers + graph{initializer: t1} + graph{initializer: t2} + ...``
    parses as the whole model (onnx.load and onnxruntime read it unchanged)."""
    light = _without_weights(model, keep_bytes=0)
    fh.write(light.SerializeToString())
    for init in model.graph.initializer:
        tensor = init.SerializeToString()
        graph_part = _GRAPH_INITIALIZER_TAG + _varint(len(tensor))
        fh.write(_MODEL_GRAPH_TAG + _varint(len(graph_part) + len(tensor)) + graph_part)
        fh.write(tensor)
        del tensor


def report_from_onnx(path_or_model) -> dict[str, Any]:
    """The shaping report stored in a shaped ONNX model's metadata, as a dict."""
    import onnx

    model = path_or_model if not isinstance(path_or_model, (str, os.PathLike)) \
        else onnx.load(os.fspath(path_or_model), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == "graphshape":
            return json.loads(prop.value)
    raise GraphshapeError("this ONNX model carries no graphshape report")
