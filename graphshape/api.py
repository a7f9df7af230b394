"""The public pipeline entry points. Each imports its framework on first use.

Every entry point raises only :class:`GraphshapeError` for bad input: the frontends and
passes validate what they read and name the node at fault; an unexpected exception from
deeper down (a graphshape bug) is wrapped as a GraphshapeError that says so, with the
original exception as its ``__cause__`` (``graphshape --debug`` prints its traceback).
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any

from graphshape import shaping_api as _shaping_api  # light: imports neither torch nor onnx
from graphshape.errors import GraphshapeError
from graphshape.ir import Graph


def _boundary(what: str):
    """Decorator: let GraphshapeError through; wrap any other exception (a bug) in one."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            _bind(fn, args, kwargs)  # (a misspelt keyword is the caller's, not a bug)
            try:
                return fn(*args, **kwargs)
            except GraphshapeError:
                raise
            except MemoryError:
                raise GraphshapeError(
                    f"ran out of memory while {what}: free memory or use a smaller model "
                    "or example batch") from None
            except RecursionError as e:
                raise GraphshapeError(
                    f"the model is nested too deeply to process while {what} ({e}); "
                    "raise sys.setrecursionlimit or simplify the model") from e
            except Exception as e:  # noqa: BLE001 - the API boundary: a bug, said so
                raise GraphshapeError(
                    f"internal error while {what} ({type(e).__name__}: {e}); this is a "
                    "graphshape bug: please report it with the model (the original traceback "
                    "is this error's __cause__; the CLI prints it with --debug)") from e
        return wrapper
    return decorate


def _bind(fn, args, kwargs) -> None:
    """Check a call's arguments against ``fn``'s signature: a GraphshapeError naming the
    bad argument instead of Python's TypeError."""
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as e:
        params = [p for p in inspect.signature(fn).parameters]
        raise GraphshapeError(f"{fn.__name__}(): {e}; its arguments are: "
                              f"{', '.join(params)}") from None


def load_pt(path: str | os.PathLike, *, trust: bool = False):
    """Read a ``.pt`` / ``.pth`` file with ``torch.load(weights_only=True)``.

    Returns what it holds when that is an ``nn.Module``. A pickled module (a saved
    ``GraphModule``, a ``torch.save(model)``) needs a full unpickle, which can run arbitrary
    code: it is only done with ``trust=True`` (the CLI's ``--trust``). A state dict holds
    no model: build the model in Python and load the state into it. A TorchScript archive
    (``torch.jit.save``) or a torch.export archive (``torch.export.save``, ``.pt2``) is read
    with ``torch.jit.load`` / ``torch.export.load``, also only with ``trust=True``: the
    first is read through its ONNX export, which runs its code; the second may unpickle.
    """
    import pickle

    import torch

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GraphshapeError(f"no such file: {path!r}")
    kind = _archive_kind(path)
    if kind is not None:
        return _load_archive(path, kind, trust)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        if trust or "unsupported global" not in str(e).lower():
            detail = str(e).strip().splitlines()[-1] if trust else "not a PyTorch file"
            raise GraphshapeError(f"{path!r} cannot be unpickled ({detail[:200]}); the file "
                                  "is corrupt or truncated: save it again") from None
        raise GraphshapeError(
            f"{path!r} holds pickled Python objects (a saved nn.Module or GraphModule), which "
            "torch.load(weights_only=True) refuses because unpickling can run arbitrary code. "
            "If you trust the file, pass --trust (CLI) or trust=True (API)") from None
    except Exception as e:  # noqa: BLE001 - zip/pickle/protobuf errors of a corrupt file
        raise GraphshapeError(f"{path!r} is not a readable PyTorch file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); it is corrupt "
                              "or truncated: save it again") from None
    if isinstance(obj, torch.nn.Module):
        return obj
    if isinstance(obj, dict):
        raise GraphshapeError(
            f"{path!r} holds a state dict (weights only, no model): build the model in "
            "Python, call model.load_state_dict(torch.load(path)), and pass the module (or "
            "use a package.module:factory spec on the command line)")
    raise GraphshapeError(f"{path!r} holds a {type(obj).__name__}, not an nn.Module")


#: archive kind -> (what it is, how it is read, why that needs trust)
_ARCHIVES = {
    "torchscript": ("a TorchScript archive (torch.jit.save)", "torch.jit.load",
                    "graphshape reads it through its ONNX export, which runs the archive's "
                    "code"),
    "export": ("a torch.export archive (torch.export.save)", "torch.export.load",
               "torch.export.load unpickles the tensors the archive marks as pickled, "
               "which can run arbitrary code"),
}


def _archive_kind(path: str) -> str | None:
    """"torchscript" or "export" for the zip archives torch.jit.save / torch.export.save
    write (told apart by their members: TorchScript's ``code/`` and ``constants.pkl``,
    torch.export's ``archive_format``), None for anything else."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            members = [name.partition("/")[2] for name in archive.namelist()]
    except (zipfile.BadZipFile, OSError):
        return None
    if "archive_format" in members or any(m.startswith("models/") for m in members):
        return "export"
    if "constants.pkl" in members or any(m.startswith("code/") for m in members):
        return "torchscript"
    return None


def _load_archive(path: str, kind: str, trust: bool):
    """A TorchScript module or an ``ExportedProgram`` from ``path`` (``trust`` needed)."""
    import torch

    what, reader, why = _ARCHIVES[kind]
    if not trust:
        raise GraphshapeError(
            f"{path!r} is {what}: {why}. If you trust the file, pass --trust (CLI) or "
            "trust=True (API)")
    try:
        if kind == "torchscript":
            import warnings

            with warnings.catch_warnings():  # "torch.jit.load is deprecated": we know
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.load(path, map_location="cpu")
        return torch.export.load(path)
    except Exception as e:  # noqa: BLE001 - the readers' own errors on a damaged archive
        raise GraphshapeError(f"{path!r} is {what} that {reader} cannot read "
                              f"({type(e).__name__}: {str(e).strip()[:200]}); it is corrupt, "
                              "truncated or from a newer PyTorch: save it again") from None


@_boundary("loading the model")
def load(model: Any, example_inputs: Any = None, *, trust: bool = False,
         cache_weight_norms: bool = True) -> Graph:
    """Read a model into graphshape's IR.

    ``model``: a ``torch.nn.Module`` (traced with torch.fx; ``example_inputs``, a tensor
    or tuple of tensors, gives the shapes), a ``torch.export.ExportedProgram`` (read
    through its ONNX export, with its own example inputs by default), an ONNX file path, a
    ``.pt`` / ``.pth`` / ``.pt2`` file (see :func:`load_pt`; ``trust=True`` allows a full
    unpickle, a TorchScript or a torch.export archive),
    an ``onnx.ModelProto``, or its serialized bytes (or a binary file object: a ``BytesIO``
    that ``torch.onnx.export`` wrote). A :class:`Graph` is returned unchanged.
    ``cache_weight_norms=False``: the conv/linear weights are not read for the analysis
    at load time (for callers that replace them, such as shaping).
    """
    if isinstance(model, Graph):
        return model
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.exists(path):
            raise GraphshapeError(f"no such file: {path!r}")
        if path.endswith(".onnx") or not path.endswith((".pt", ".pth", ".pt2")):
            from graphshape.frontends.onnx_import import load_onnx

            return load_onnx(path, cache_weight_norms=cache_weight_norms)
        return load(load_pt(path, trust=trust), example_inputs,
                    cache_weight_norms=cache_weight_norms)
    from graphshape.frontends.onnx_import import is_serialized, load_onnx

    if type(model).__module__.startswith("onnx") or is_serialized(model):
        return load_onnx(model, cache_weight_norms=cache_weight_norms)
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    exported = getattr(getattr(torch, "export", None), "ExportedProgram", None)
    if exported is not None and isinstance(model, exported):
        # torch.export's program: its module is a graph of ATen operators, which the torch
        # frontend reads through its ONNX export; the program keeps its example inputs
        if example_inputs is None and model.example_inputs is not None:
            example_inputs = tuple(model.example_inputs[0])
        model = model.module()
    if torch is not None and isinstance(model, torch.nn.Module):
        from graphshape.frontends.torch_fx import load_module

        return load_module(model, example_inputs, cache_weight_norms=cache_weight_norms)
    raise GraphshapeError(
        f"cannot load a {type(model).__name__}: pass a torch.nn.Module, a "
        "torch.export.ExportedProgram, an ONNX file path or an onnx.ModelProto")


@_boundary("emitting the PyTorch module")
def to_torch(graph: Graph, *, trainable_initializers: bool = False):
    """Emit a ``torch.fx.GraphModule`` (device-agnostic, trainable, torch.compile-able).

    ``graph``: anything :func:`load` takes. Layers' weights are parameters. From an ONNX
    file, its other float initializers (a ViT's ``pos_embed``, a layer scale) are buffers,
    as onnx2torch makes them, unless ``trainable_initializers=True`` makes them parameters:
    the file does not say which were parameters (an attention mask is stored the same way).
    A graph read from a PyTorch model keeps the source's parameters and buffers either way.
    """
    from graphshape.backend_torch import emit

    if not isinstance(trainable_initializers, bool):
        raise GraphshapeError(f"trainable_initializers must be True or False, "
                              f"got {trainable_initializers!r}")
    return emit(load(graph), trainable_initializers=trainable_initializers)


@_boundary("emitting the ONNX model")
def to_onnx(graph: Graph, opset: int | None = None):
    """Emit an ``onnx.ModelProto`` in ``opset`` (default: the source's opset)."""
    from graphshape.backend_onnx import emit

    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int)):
        raise GraphshapeError(f"opset must be an integer or None, got {opset!r}")
    return emit(load(graph), opset=opset)


@_boundary("analysing the model")
def analyze(model_or_path_or_graph: Any, example_inputs: Any = None, *, empirical: bool = False):
    """Per-node kernel statistics at initialization: a :class:`graphshape.stats.KernelStats`.

    ``model_or_path_or_graph``: anything :func:`load` takes (an ``nn.Module`` needs
    ``example_inputs`` for tracing). ``example_inputs``: the batch whose kernel is propagated
    (2 or more examples for c); None: two unit-q, uncorrelated examples. ``empirical=True``
    also runs the model on ``example_inputs`` and adds the measured q and c per node.
    """
    from graphshape.passes.analysis import analyze as _analyze

    graph = load(model_or_path_or_graph, example_inputs)
    _shaping_api.check_not_quantized(graph, "analyse")
    check_example_inputs(graph, example_inputs)
    return _analyze(graph, example_inputs, empirical=empirical)


def check_example_inputs(graph: Graph, example_inputs: Any) -> None:
    """GraphshapeError, naming the graph input, when ``example_inputs`` cannot be the
    model's inputs: not tensors or arrays, the wrong number, a rank or a non-batch size
    that differs from the model's, or NaN / infinite values (the kernel would be NaN)."""
    import numpy as np

    if example_inputs is None:
        return
    items = list(example_inputs) if isinstance(example_inputs, (tuple, list)) else [example_inputs]
    if len(items) != len(graph.inputs):
        raise GraphshapeError(f"the model has {len(graph.inputs)} input(s) "
                              f"{list(graph.inputs)}, but {len(items)} example input(s) were "
                              "given: pass one tensor per model input, as a tuple")
    checks = []  # (name, example, the node reading it)
    for name, item in zip(graph.inputs, items):
        if isinstance(item, (dict, list, tuple)) and graph[name].outputs[0].dtype == "object":
            # a container input (a dict of tensors): check the entries the model reads
            for node in graph:
                entry = node.meta.get("input_entry")
                if entry is None or entry[0] != name:
                    continue
                try:
                    checks.append((f"{name}[{entry[1]!r}]", item[entry[1]], node.name))
                except (KeyError, IndexError, TypeError):
                    raise GraphshapeError(f"the example input for {name!r} has no entry "
                                          f"{entry[1]!r}, which the model reads",
                                          node=node.name) from None
        else:
            checks.append((name, item, name))
    for name, item, node_name in checks:
        if hasattr(item, "detach") and hasattr(item, "numpy"):  # a torch tensor
            shape = tuple(item.shape)
            floating = item.is_floating_point()
            finite = bool(item.isfinite().all()) if floating else True
        elif isinstance(item, np.ndarray):
            shape = item.shape
            floating = item.dtype.kind == "f"
            finite = bool(np.isfinite(item).all()) if floating else True
        else:
            raise GraphshapeError(f"example input for {name!r} is a {type(item).__name__}: "
                                  "pass a torch.Tensor or numpy array (or, for a model that "
                                  "takes a dict, list or tuple, one of tensors)", node=node_name)
        if not finite:
            raise GraphshapeError(f"example input for {name!r} holds NaN or infinite values: "
                                  "pass finite example inputs", node=node_name)
        declared = graph[node_name].outputs[0].shape if graph[node_name].outputs else None
        if declared is None:
            continue
        if len(declared) != len(shape):
            raise GraphshapeError(
                f"example input for {name!r} has shape {shape}, but the model's input has "
                f"rank {len(declared)} ({declared}): pass an example of that rank", node=node_name)
        for axis, (want, got) in enumerate(zip(declared, shape)):
            # axis 0 is the batch: any size; symbolic dims (strings) and None match anything
            if axis > 0 and isinstance(want, int) and want > 0 and want != got:
                raise GraphshapeError(
                    f"example input for {name!r} has shape {shape}, but the model's input "
                    f"is {tuple(declared)} (axis {axis}: {got} instead of {want}): pass an "
                    "example of the model's input shape (the batch size may differ)",
                    node=node_name)


@functools.wraps(_shaping_api.shape)  # the real signature and docstring for help() and IDEs
def shape(*args, **kwargs):
    _shape = _shaping_api.shape
    return _boundary("shaping the model")(_shape)(*args, **kwargs)


@functools.wraps(_shaping_api.shape_onnx)
def shape_onnx(*args, **kwargs):
    _shape_onnx = _shaping_api.shape_onnx
    return _boundary("shaping the ONNX model")(_shape_onnx)(*args, **kwargs)

