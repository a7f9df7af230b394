"""The PyTorch frontend's second way in: a model that torch.fx cannot trace, read through
its ONNX export.

``torch.fx.symbolic_trace`` records a forward without running it, so Python control flow on
a value it does not know (``if H % window:``, ``for blk in blocks[:depth(x)]``, a ``len`` of
a tensor) stops it. ``torch.onnx.export`` (the TorchScript exporter) runs the model on the
example inputs and records the path they take, so many such models (timm's twins, nest,
mobilevit, mvitv2) export fine. ``torch.export``'s programs come this way too: their module
is a graph of ATen operators, which the fx frontend does not map op by op. :func:`load_via_onnx` exports the model in memory, with
the batch axis dynamic, reads the file with :func:`graphshape.frontends.onnx_import.load_onnx`,
and gives the graph what the torch backend needs to emit a module like the source's: the
source's parameter names where a layer or tensor of the model matches
(``node.meta["module_path"]``), its tensors trainable as they were, its output structure
(dicts, tuples) and dtype / device / training mode.

What the export path records differently (the report says so): control flow follows the
example inputs (another image size may need another path); the trace runs in eval mode,
so dropout and drop path are not in the graph (batch norm is: ``TrainingMode.PRESERVE``
keeps it as a BatchNormalization node instead of folding it into the convolution, and the
emitted ``nn.BatchNorm2d`` follows the emitted module's mode); and the shaped module's
forward takes the example inputs' tensors only.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from graphshape.errors import GraphshapeError
from graphshape.frontends.torch_fx import dict_output
from graphshape.ir import DictOutput, Graph, Node, Ref

#: the opset of the in-memory export (the TorchScript exporter's most tested one)
EXPORT_OPSET = 17


@contextlib.contextmanager
def quiet_output():
    """Python's and the process's stdout / stderr discarded: the TorchScript exporter prints
    warnings, and the whole TorchScript graph from C++ when it fails."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            with contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _input_names(module: nn.Module, count: int) -> list[str]:
    """``forward``'s first ``count`` positional parameter names (``input_{i}`` past them)."""
    try:
        params = [p.name for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return params[:count] + [f"input_{i}" for i in range(len(params), count)]


def export_checked(module: nn.Module, inputs: tuple, input_names: list[str]):
    """(ModelProto, output pytree spec, output count): the eval-mode export with axis 0
    dynamic on every input and on every output whose axis 0 is the batch, checked against
    the module in onnxruntime on other inputs (:func:`_check_export`)."""
    import onnx

    batch = inputs[0].shape[0] if inputs and inputs[0].dim() else None
    # the outputs' structure and batch axes from the check's first probe (the negated
    # inputs, the example's shapes), whose outputs the check then reuses: one forward of
    # the model fewer, a large share of reading a big model this way
    known = {}
    with torch.no_grad():
        try:
            outputs = known[0] = module(*_probes(inputs)[0])
        except Exception:  # noqa: BLE001 - the model does not take it: the example's
            outputs = module(*inputs)
    flat, spec = pytree.tree_flatten(outputs)
    if not flat or not all(isinstance(t, torch.Tensor) for t in flat):
        raise GraphshapeError(
            f"its outputs are not all tensors ({_non_tensor_output(outputs)}), so it has no "
            "ONNX export; shape a wrapper module that returns only the tensors, or configure "
            "the model not to return the others (a Hugging Face model's use_cache=False)")
    output_names = [f"output_{i}" for i in range(len(flat))]
    dynamic = {name: {0: "batch"} for name, x in zip(input_names, inputs) if x.dim()}
    dynamic.update({name: {0: "batch"} for name, y in zip(output_names, flat)
                    if y.dim() and batch is not None and y.shape[0] == batch})
    buffer = io.BytesIO()
    with quiet_output():
        # PRESERVE: the caller has put the module in eval mode where it has a mode (and
        # unlike EVAL, batch norm is not folded into the convolutions)
        torch.onnx.export(module, inputs, buffer, opset_version=EXPORT_OPSET, dynamo=False,
                          input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic, training=torch.onnx.TrainingMode.PRESERVE)
    proto = onnx.load_from_string(buffer.getvalue())
    _check_export(proto, module, inputs, input_names, known)
    return proto, spec, len(flat)


def _non_tensor_output(outputs) -> str:
    """Where the first output that is not a tensor is, and its type: ``"past_key_values
    is a DynamicCache"``; ``"no tensor at all"`` when there is none."""
    leaves, _ = pytree.tree_flatten_with_path(outputs)
    for path, leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            where = pytree.keystr(path).lstrip(".") or "the output"
            return f"{where} is a {type(leaf).__name__}"
    return "no tensor at all"


def _probes(inputs: tuple) -> list[tuple]:
    """Inputs unlike the example: its floats negated (a branch on a value such as
    ``if x.sum() > 0`` flips), one more example in the batch (the dynamic axis), and a
    batch of one where the example's is larger (``if x.shape[0] > 1:`` flips)."""
    flipped = tuple(-x if x.is_floating_point() else x for x in inputs)
    generator = torch.Generator().manual_seed(0)
    grown = tuple(
        torch.cat([x, (torch.randn(x[:1].shape, generator=generator).to(x)
                       * x.std() + x.mean()) if x.is_floating_point() else x[:1]])
        if x.dim() else x for x in inputs)
    probes = [flipped, grown]
    if inputs and inputs[0].dim() and inputs[0].shape[0] > 1:
        probes.append(tuple(x[:1] if x.dim() else x for x in inputs))
    return probes


def _check_export(proto, module: nn.Module, inputs: tuple, input_names: list[str],
                  known: dict | None = None) -> None:
    """GraphshapeError unless onnxruntime runs the export to the module's outputs on
    :func:`_probes`: the exporter records the path the example inputs take, so a branch on
    a tensor's value (not only on its shape) would be frozen into the graph."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    # 4 = fatal only: a failed run is reported in the GraphshapeError below, and onnxruntime
    # would also print it to the process's stderr itself
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(proto.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        raise GraphshapeError(f"onnxruntime cannot run its ONNX export to check it "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    for i, probe in enumerate(_probes(inputs)):
        try:
            with torch.no_grad():
                outputs = (known or {})[i] if i in (known or {}) else module(*probe)
        except Exception:  # noqa: BLE001 - the model does not take this input (an
            continue  # ExportedProgram's module guards its batch size): nothing to compare
        try:
            want = [t.detach().float().cpu().numpy() for t in pytree.tree_leaves(outputs)]
            got = session.run(None, {name: x.detach().cpu().numpy()
                                     for name, x in zip(input_names, probe)})
        except Exception as exc:  # noqa: BLE001 - the model's, numpy's or onnxruntime's
            raise GraphshapeError(f"its ONNX export could not be checked on other inputs "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
        if len(got) != len(want):  # (a loop over the batch, unrolled for the example's)
            raise GraphshapeError(
                f"traced on the example inputs, it returns {len(got)} outputs where the model "
                f"returns {len(want)} on other inputs (its outputs depend on the inputs' "
                "sizes or values, which a trace freezes)")
        if not _same_outputs(got, want):
            if not _same_on(session, module, inputs, input_names):
                raise GraphshapeError(
                    "it computes other outputs than the model even on the example inputs (the "
                    "exporter misread an operation; a write into a view of a tensor is a "
                    "known case)")
            raise GraphshapeError(
                "traced on the example inputs, it computes other outputs than the model "
                "on other inputs (its control flow depends on the inputs' values, which a "
                "trace freezes)")


def _same_outputs(got: list, want: list) -> bool:
    import numpy as np

    for g, w in zip(got, want):
        scale = float(np.abs(w).max()) if w.size else 0.0
        if g.shape != w.shape or not np.allclose(g, w, rtol=1e-3, atol=1e-4 * max(scale, 1e-6)):
            return False
    return True


def _same_on(session, module: nn.Module, inputs: tuple, input_names: list[str]) -> bool:
    """Whether the export computes the module's outputs on ``inputs``: a mismatch on other
    inputs only is a frozen branch; one on the example inputs too, a misread op."""
    try:
        with torch.no_grad():
            want = [t.detach().float().cpu().numpy()
                    for t in pytree.tree_leaves(module(*[x.clone() for x in inputs]))]
        got = session.run(None, {name: x.detach().cpu().numpy()
                                 for name, x in zip(input_names, inputs)})
    except Exception:  # noqa: BLE001 - nothing to tell apart: say what the probes showed
        return True
    return len(got) == len(want) and _same_outputs(got, want)


def _fold_transformed_activations(graph: Graph, module: nn.Module) -> list[str]:
    """Put back each of graphshape's own ``TransformedActivation`` modules that the export
    spelled out (its scope's Mul / Add nodes and phi, named ``path.Mul``, ``path.Add_2``...)
    as one activation node with the module's transform, in place; returns their paths. A
    shaped model torch.fx cannot trace either is read through its export again by
    ``graphshape.analyze`` (timm's dm_nfnet_f0 was, before fx traced its "same" padding);
    spelled out, the transform's shifts were taken for variance (predicted q 27 at the
    output, measured 0.15). Only a region with one input and one output read outside it folds."""
    from graphshape.torch_modules import TransformedActivation

    folded = []
    # (the graph's order once: folding a region leaves the others' relative order as it
    # was; a node added since, an earlier fold's, sorts after them)
    rank = {name: i for i, name in enumerate(graph.topo_order())}
    for path, sub in module.named_modules():
        if not isinstance(sub, TransformedActivation) or not path:
            continue
        region = {n.name for n in graph if n.name.startswith(path + ".") and n.op != "constant"}
        if not region:
            continue
        sources = {r for name in region for r in graph[name].inputs
                   if r.node not in region and graph[r.node].op != "constant"}
        ends = [name for name in region
                if graph.is_output(graph[name].out)
                or any(u.name not in region for u in graph.users(name))]
        if len(sources) != 1 or len(ends) != 1:
            continue
        end = graph[ends[0]]
        act = graph.add(Node(graph.unique_name(path), "activation", [next(iter(sources))],
                             {"name": sub.name, **sub.attrs, "transform": dict(sub.transform)},
                             outputs=[end.outputs[0]],
                             meta={"flags": [], "source_name": path, "module_path": path}),
                        after=end.name)
        graph.replace_uses(end.out, act.out, exclude=[act.name])
        constants = {r.node for name in region for r in graph[name].inputs
                     if graph[r.node].op == "constant"}
        for name in sorted(region, key=lambda n: rank.get(n, len(rank)), reverse=True):
            graph.remove(name)
        graph.remove_unread(constants)
        folded.append(path)
    return folded


def _layer_path(node, modules: dict[str, nn.Module], claimed=frozenset()) -> str | None:
    """The source module an imported layer node came from: the owner of the tensors the
    export named its parameters after (``conv1.weight``, ``meta["param_sources"]``; one
    not ``claimed`` by another node first: ``fc2`` whose weight is ``fc1.weight`` has its
    own ``fc2.bias``), or the exporter's scope, after which the importer names nodes
    (``blocks.0.attn.qkv`` or ``blocks.0.attn.qkv.MatMul``; a ``torch.export`` program's
    scopes are ATen op names)."""
    owners = []
    for key, source in (node.meta.get("param_sources") or {}).items():
        owner, _, name = source.rpartition(".")
        if name == key and owner in modules:
            owners.append(owner)
    owners.sort(key=lambda owner: owner in claimed)
    if owners:
        return owners[0]
    name = node.name
    for candidate in (name, name.rsplit(".", 1)[0]):
        module = modules.get(candidate)
        if module is not None and candidate and any(True for _ in module.parameters(recurse=False)):
            return candidate
    return None


def _match_source_names(graph: Graph, module: nn.Module) -> None:
    """Give nodes the source's names (``module_path``: the torch backend's attribute path,
    so ``state_dict`` keys match), and mark constants that were parameters trainable."""
    from graphshape.frontends.torch_fx import in_state_dict

    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    modules = dict(module.named_modules())
    claimed: set[str] = set()
    _note_shared_params(graph, module)
    for node in graph:
        if node.op == "constant":
            source = node.meta.get("source_name")
            node.meta["persistent"] = False  # the export's own constants: not the source's
            node.meta.pop("initializer", None)  # the source says what is trainable
            if source in params:
                node.attrs["trainable"] = params[source].requires_grad
            if (source in params or source in buffers) and source not in claimed:
                node.meta["module_path"] = source
                node.meta["persistent"] = in_state_dict(module, source)
                claimed.add(source)
        elif node.params and node.op not in ("input", "output"):
            path = _layer_path(node, modules, claimed)
            shared = node.meta.get("shared_params") or {}
            if path is not None and (path not in claimed or shared.keys() >= node.params.keys()):
                # (a claimed path again: the same layer called again, which the torch
                # backend emits as that one module when it is)
                node.meta["module_path"] = path
                claimed.add(path)


def _note_shared_params(graph: Graph, module: nn.Module) -> None:
    """``meta["shared_params"]`` on the imported nodes that hold one source parameter
    between them (an initializer two layers read: tied weights, a module called twice), as
    the torch frontend marks them (see docs/CONTRACTS.md): the export names an initializer
    after the source's tensor, so here an initializer shared by two nodes is a source
    tensor shared, not an optimizer's merge of equal constants."""
    names: dict[int, str] = {}
    canonical: dict[str, str] = {}
    for name, t in module.named_parameters(remove_duplicate=False):
        canonical[name] = names.setdefault(id(t), name)
    places: dict[str, list] = {}
    for node in graph:
        sources = dict(node.meta.get("param_sources") or {})
        if node.op == "constant" and node.meta.get("source_name") in canonical:
            sources = {"value": node.meta["source_name"]}
        for key, source in sources.items():
            if source in canonical:
                places.setdefault(canonical[source], []).append((node, key))
    for name, held in places.items():
        if len(held) > 1:
            for node, key in held:
                node.meta.setdefault("shared_params", {})[key] = name


def _eval(module: nn.Module) -> None:
    """``module.eval()``, where the module has a mode: ``torch.export``'s
    ``ExportedProgram.module()`` raises NotImplementedError (its mode is fixed at export)."""
    try:
        module.eval()
    except NotImplementedError:
        pass


def _output_template(spec, refs: list):
    """The module's output structure (``spec``, from ``pytree.tree_flatten`` of its
    outputs) with ``refs`` as the leaves. A dict subclass such as Hugging Face's
    ``ModelOutput`` is kept as a :class:`~graphshape.ir.DictOutput` (the torch backend
    rebuilds it by its class), where unflattening would build one around the Refs (whose
    ``__post_init__`` can read a lone first field as an iterable of pairs)."""
    leaves = iter(refs)

    def build(node):
        if node.is_leaf():
            return next(leaves)
        children = [build(child) for child in node.children()]
        cls, context = node.type, node.context
        if (isinstance(cls, type) and issubclass(cls, dict) and cls is not dict
                and isinstance(context, list) and len(context) == len(children)):
            kept = dict_output(cls, dict(zip(context, children)))
            if isinstance(kept, DictOutput):
                return kept
        return pytree.SUPPORTED_NODES[cls].unflatten_fn(children, context)

    return build(spec)


def load_via_onnx(module: nn.Module, example_inputs: tuple, *, fx_error: str,
                  meta: dict[str, Any], cache_weight_norms: bool = True) -> Graph:
    """``module`` read through its in-memory ONNX export (see the module docstring);
    ``fx_error``: why torch.fx could not trace it (kept in ``graph.meta["fx_error"]`` for the
    report); ``meta``: the torch frontend's graph meta (model class, training mode, dtype,
    device, fixed arguments). A GraphshapeError with both reasons when the export fails."""
    from graphshape.frontends.onnx_import import load_onnx

    inputs = tuple(example_inputs)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise GraphshapeError(f"{fx_error} (the ONNX export that graphshape tries next needs "
                              "tensor example inputs)")
    # each submodule's own mode, put back as it was (a frozen batch norm in eval mode
    # inside a training model stays so; module.train(True) would not keep it)
    modes = [(m, m.training) for m in module.modules()]
    _eval(module)
    try:
        proto, spec, count = export_checked(module, inputs,
                                            _input_names(module, len(inputs)))
    except GraphshapeError as exc:
        raise GraphshapeError(f"{fx_error}. Its ONNX export (torch.onnx.export, which "
                              f"graphshape tries next) cannot stand in for it: {exc}") from None
    except Exception as exc:  # the exporter raises many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise GraphshapeError(
            f"{fx_error}. Its ONNX export (torch.onnx.export, which graphshape tries next) "
            f"failed too: {type(exc).__name__}: {first[:300]}") from None
    finally:
        for submodule, mode in modes:
            submodule.training = mode
    graph = load_onnx(proto, cache_weight_norms=cache_weight_norms)
    _fold_transformed_activations(graph, module)
    _match_source_names(graph, module)
    outputs = graph.output_nodes
    if len(outputs) == count:
        graph.meta["torch_output"] = _output_template(spec, [Ref(n) for n in outputs])
    graph.meta.update(meta)
    graph.meta.update(traced_with="torch.onnx.export", fx_error=fx_error)
    return graph
