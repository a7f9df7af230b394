"""The public pipeline entry points. Each imports its framework on first use."""

from __future__ import annotations

import os
from typing import Any

from graphshape.errors import GraphshapeError
from graphshape.ir import Graph


def load(model: Any, example_inputs: Any = None) -> Graph:
    """Read a model into graphshape's IR.

    ``model``: a ``torch.nn.Module`` (traced with torch.fx; ``example_inputs``, a tensor
    or tuple of tensors, gives the shapes), an ONNX file path, or an ``onnx.ModelProto``.
    A :class:`Graph` is returned unchanged.
    """
    if isinstance(model, Graph):
        return model
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.exists(path):
            raise GraphshapeError(f"no such file: {path!r}")
        if path.endswith(".onnx") or not path.endswith((".pt", ".pth")):
            from graphshape.frontends.onnx_import import load_onnx

            return load_onnx(path)
        raise GraphshapeError(
            f"{path!r}: load .pt files with torch yourself and pass the nn.Module "
            "(graphshape never unpickles files for you)")
    mod = type(model).__module__
    if mod.startswith("onnx"):
        from graphshape.frontends.onnx_import import load_onnx

        return load_onnx(model)
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(model, torch.nn.Module):
        from graphshape.frontends.torch_fx import load_module

        return load_module(model, example_inputs)
    raise GraphshapeError(
        f"cannot load a {type(model).__name__}: pass a torch.nn.Module, an ONNX file path "
        "or an onnx.ModelProto")


def to_torch(graph: Graph):
    """Emit a ``torch.fx.GraphModule`` (device-agnostic, trainable, torch.compile-able)."""
    from graphshape.backend_torch import emit

    return emit(load(graph))


def to_onnx(graph: Graph, opset: int | None = None):
    """Emit an ``onnx.ModelProto`` in ``opset`` (default: the source's opset)."""
    from graphshape.backend_onnx import emit

    return emit(load(graph), opset=opset)


def analyze(model_or_path_or_graph: Any, example_inputs: Any = None, *, empirical: bool = False):
    """Per-node kernel statistics at initialization: a :class:`graphshape.stats.KernelStats`.

    ``model_or_path_or_graph``: anything :func:`load` takes (an ``nn.Module`` needs
    ``example_inputs`` for tracing). ``example_inputs``: the batch whose kernel is propagated
    (2 or more examples for c); None: two unit-q, uncorrelated examples. ``empirical=True``
    also runs the model on ``example_inputs`` and adds the measured q and c per node.
    """
    from graphshape.passes.analysis import analyze as _analyze

    graph = load(model_or_path_or_graph, example_inputs)
    return _analyze(graph, example_inputs, empirical=empirical)


def shape(*args, **kwargs):
    """Shape a PyTorch model with DKS / TAT: see :func:`graphshape.shaping_api.shape`."""
    from graphshape.shaping_api import shape as _shape

    return _shape(*args, **kwargs)


def shape_onnx(*args, **kwargs):
    """Shape an ONNX model file: see :func:`graphshape.shaping_api.shape_onnx`."""
    from graphshape.shaping_api import shape_onnx as _shape_onnx

    return _shape_onnx(*args, **kwargs)

