"""The shaping entry points: :func:`shape` (PyTorch) and :func:`shape_onnx` (ONNX files).

Both load the model into the IR, run :func:`graphshape.passes.shaping.shape_graph`, and emit
the result in the source's framework. ``graphshape.shape`` and ``graphshape.shape_onnx``
are these functions.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from graphshape.errors import GraphshapeError
from graphshape.passes.shaping import DEFAULT_SHORTCUT_WEIGHT, ShapeReport, shape_graph

#: a small constant that keeps per-location normalization finite on all-zero locations
PLN_EPS = 1e-6


def _options(method, activation, shortcut_weight, zeta, eta, tau, max_pool_to_avg, seed):
    return dict(method=method, activation=activation, shortcut_weight=shortcut_weight,
                zeta=zeta, eta=eta, tau=tau, max_pool_to_avg=max_pool_to_avg, seed=seed)


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
          seed: int | None = None):
    """Shape a PyTorch model with DKS or TAT and return a ``torch.fx.GraphModule``.

    module:          an ``nn.Module`` (traced with torch.fx) or a graphshape ``Graph``.
    example_inputs:  a tensor or tuple of tensors (shapes for tracing; values unused).
    method:          "DKS", "TAT" or "untransformed" (structure and initialization only).
    activation:      replace the main-path nonlinearities by this registry name (TAT turns a
                     relu model into leaky_relu by itself, with a warning).
    shortcut_weight: residual joins become ``w * shortcut + sqrt(1 - w^2) * branch``; 0
                     removes the skip connections.
    zeta, eta, tau:  DKS max slope, TAT leaky-relu C_f(0) and TAT max curvature targets.
    pln:             per-location normalization of every input (q = 1 at every location).
    max_pool_to_avg: replace max pooling by average pooling.
    seed:            seed of the orthogonal initialization.

    ``result.meta["graphshape"]`` is the :class:`ShapeReport`.
    """
    from graphshape.api import load
    from graphshape.backend_torch import emit

    graph = load(module, example_inputs)
    shaped, report = shape_graph(graph, **_options(method, activation, shortcut_weight, zeta,
                                                   eta, tau, max_pool_to_avg, seed))
    gm = emit(shaped)
    if pln:
        names = _add_pln_torch(gm)
        report.rewritten.extend({"node": n, "op": "input", "what": "per-location normalized"}
                                for n in names)
    report.options["pln"] = pln
    gm.meta["graphshape"] = report
    return gm


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
               max_pool_to_avg: bool = False, seed: int | None = None) -> ShapeReport:
    """Shape an ONNX model (a path or ``onnx.ModelProto``) and write it to ``dst``.

    Same options as :func:`shape`. The result is checker-valid in the source's opset, carries
    the report as JSON in ``metadata_props["graphshape"]``, and is written atomically (a
    temporary file in ``dst``'s folder, then renamed); ``src`` is never modified."""
    import onnx

    from graphshape.backend_onnx import emit
    from graphshape.frontends.onnx_import import load_onnx

    dst = os.fspath(dst)
    if isinstance(src, (str, os.PathLike)):
        src_path = os.fspath(src)
        if not os.path.exists(src_path):
            raise GraphshapeError(f"no such ONNX file: {src_path!r}")
        if os.path.abspath(src_path) == os.path.abspath(dst):
            raise GraphshapeError(f"destination {dst!r} is the source file: graphshape never "
                                  "overwrites its input; choose another path")
    graph = load_onnx(src)
    shaped, report = shape_graph(graph, **_options(method, activation, shortcut_weight, zeta,
                                                   eta, tau, max_pool_to_avg, seed))
    model = emit(shaped)
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
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise GraphshapeError(f"the shaped ONNX model does not pass onnx.checker: {e}") from None
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise GraphshapeError(f"destination folder {folder!r} does not exist")
    try:
        data = model.SerializeToString()
    except ValueError as e:  # protobuf's 2 GB limit
        raise GraphshapeError(f"the shaped model cannot be serialized ({e}); models over 2 GB "
                              "need ONNX external data, which shape_onnx does not write yet") from None
    fd, tmp = tempfile.mkstemp(suffix=".onnx.tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return report


def report_from_onnx(path_or_model) -> dict[str, Any]:
    """The shaping report stored in a shaped ONNX model's metadata, as a dict."""
    import onnx

    model = path_or_model if not isinstance(path_or_model, (str, os.PathLike)) \
        else onnx.load(os.fspath(path_or_model), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == "graphshape":
            return json.loads(prop.value)
    raise GraphshapeError("this ONNX model carries no graphshape report")
