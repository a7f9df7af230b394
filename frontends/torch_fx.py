"""PyTorch frontend: an ``nn.Module`` -> graphshape IR, via ``torch.fx``.

``load_module(module, example_inputs)`` traces the module with ``torch.fx.symbolic_trace``
(a custom tracer that keeps ``torchvision.ops.StochasticDepth``, timm's fused norm-activation
modules and weight-standardized convs, and any class in ``leaf_modules`` as one call), fills
in shapes and dtypes with
``torch.fx.passes.shape_prop.ShapeProp`` when example inputs are given, and maps every
``call_module`` / ``call_function`` / ``call_method`` node to a canonical op of
:mod:`graphshape.ops`. Anything it does not know becomes an ``opaque`` node holding what
the torch backend needs to call it again (the module object, the function, or the
method name, with argument templates in which :class:`~graphshape.ir.Ref` objects stand
for graph values).

IR node names are the fx node names (``layer1_0_conv1``, ``add_3``, ``relu``), which are
Python identifiers, so ``graphshape.backend_torch.fx_name`` gives them back unchanged.
``node.meta["module_path"]`` keeps the submodule's qualified name (``layer1.0.conv1``), so
the emitted module has the same ``state_dict`` keys as the source.

Parameters and buffers become numpy arrays in ``node.params`` that share memory with the
source module's tensors (the torch backend copies them). A ``get_attr`` tensor that a mapped
op takes as its weight (``F.conv2d(x, self.w)``, ``F.layer_norm(..., self.weight, ...)``) is
folded into that op; any other use becomes a ``constant`` node (``trainable`` for
``nn.Parameter``). Python numbers in arithmetic become 0-d ``constant`` nodes.

In-place ops (``x += y``, ``relu_``, ``nn.ReLU(inplace=True)``) become their out-of-place
ops; readers of the mutated value later in the graph read the op's result instead, which is
what they saw in the source. (Mutations through views are not tracked.) Item assignment
(``x[:, 0] = v``, which fx's own Proxy refuses) is read the same way, as
:func:`graphshape.torch_modules.assigned`, where nothing else sees the write: into the
model's input or state, or into memory another view shares and is read after it, the model
is read through its export (:func:`_assignment_seen_elsewhere`).

Sizes and Python arithmetic on them (``x.size(0)``, ``c // g``) stay ``opaque`` with dtype
"object" and the flag "shape_computation"; calls returning a tuple/list of tensors
(``nn.MultiheadAttention``, ``unbind``) get dtype "object" and the flag
:data:`~graphshape.ir.TENSOR_CONTAINER` (their ``getitem`` readers carry the signal). A
``view``/``reshape`` that uses sizes is a
``reshape`` node whose ``shape`` holds :class:`~graphshape.ir.Ref` entries, each also one of
the node's extra inputs.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import io
import itertools
import operator
import sys
import threading
import types
from typing import Any, Callable

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.immutable_collections import immutable_dict
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from graphshape import torch_modules as _tm
from graphshape.errors import GraphshapeError
from graphshape.ir import (CHECK, DATA_MOVEMENT, FLOAT_DTYPES, TENSOR_CONTAINER, DictOutput,
                           Graph, Node, Ref, TensorInfo, cache_weight_tap_norms, is_non_float,
                           map_template)
from graphshape.ops import prelu_activation
from graphshape.frontends.torch_specialize import (ShapeSpecializingTracer, buffer_values_kept,
                                                  buffers_kept, meta_can_stand_in,
                                                  rng_kept)
from graphshape.passes.elementwise import fuse_decompositions

__all__ = ["load_module", "MODULE_OPS", "FUNCTION_OPS", "METHOD_OPS"]


class _Unmapped(Exception):
    """Raised by a handler when this particular call cannot be mapped: fall back to opaque."""


# ----------------------------------------------------------------------------- tracing
def _stochastic_depth_class():
    try:
        from torchvision.ops import StochasticDepth
    except Exception:  # pragma: no cover - torchvision missing
        return None
    return StochasticDepth


def _norm_act_classes() -> tuple:
    """timm's fused norm-activation modules that graphshape maps itself (kept as fx leaves so
    they become a norm node plus an activation node, rather than being traced into an
    F.batch_norm call and input-rank asserts)."""
    return _imported_classes((("timm.layers.norm_act", ("BatchNormAct2d", "GroupNormAct")),))


#: (module, class names) of batch norms with fixed statistics and affine parameters, looked
#: up only where the model's code has imported that module
_FROZEN_BATCH_NORMS = (("torchvision.ops.misc", ("FrozenBatchNorm2d",)),
                       ("timm.layers.norm_act", ("FrozenBatchNorm2d", "FrozenBatchNormAct2d")),
                       ("detectron2.layers.batch_norm", ("FrozenBatchNorm2d",)))


def _frozen_batch_norm_classes() -> tuple:
    """torchvision's, timm's and detectron2's ``FrozenBatchNorm2d`` (timm's
    ``FrozenBatchNormAct2d`` too): batch norm with fixed statistics and affine parameters,
    kept as fx leaves and mapped to a ``batch_norm`` node with ``frozen=True``, which shaping
    removes like any norm. Traced, they were a multiplication and an addition by computed
    constants that shaping kept: a pretrained detection backbone's statistics then scaled
    every channel of the shaped network, and its q was far from 1."""
    return _imported_classes(_FROZEN_BATCH_NORMS)


def _imported_classes(table) -> tuple:
    """The classes of ``table`` ((module, class names), ...) whose module the model's code
    has imported already (importing timm here would cost ~1 s)."""
    found = []
    for module_name, names in table:
        module = sys.modules.get(module_name)
        for name in names if module is not None else ():
            cls = getattr(module, name, None)
            if isinstance(cls, type) and cls not in found:
                found.append(cls)
    return tuple(found)


#: (module, class names) of normalization-activation layers: one expression computes both
#: the activation and the normalization, so no norm node can be split off them (see
#: :func:`norm_activation_remainder`); looked up only where the model imported the module
_NORM_ACTIVATION_LAYERS = (
    ("timm.layers.evo_norm", ("EvoNorm2dB0", "EvoNorm2dB1", "EvoNorm2dB2", "EvoNorm2dS0",
                              "EvoNorm2dS0a", "EvoNorm2dS1", "EvoNorm2dS1a", "EvoNorm2dS2",
                              "EvoNorm2dS2a")),
    ("timm.layers.filter_response_norm", ("FilterResponseNormTlu2d", "FilterResponseNormAct2d")),
    # (no activation: a normalization the same mechanism removes; traced, its Tensor.norm
    # was refused as a norm graphshape could not map, and convnextv2 with it)
    ("timm.layers.grn", ("GlobalResponseNorm",)),
    ("transformers.models.convnextv2.modeling_convnextv2", ("ConvNextV2GRN",)))

#: Global Response Normalization classes (timm's, Hugging Face's ConvNeXt V2)
_GRN_CLASSES = ("GlobalResponseNorm", "ConvNextV2GRN")


def _norm_activation_classes() -> tuple:
    """timm's EvoNorm and Filter Response Normalization layers (and GlobalResponseNorm),
    kept as fx leaves (opaque calls carrying :func:`norm_activation_remainder`, which
    shaping puts in their place).
    Traced, they were arithmetic that looked like gates and products of two signals
    (``x * sigmoid(v * x) / group_std(x)``), refused for those reasons."""
    return _imported_classes(_NORM_ACTIVATION_LAYERS)


def norm_activation_remainder(mod: nn.Module) -> dict:
    """What is left of a normalization-activation layer without its normalization, as DKS /
    TAT networks have none: ``{"layer", "formula", "activation"}`` with ``activation`` the
    node attributes of the activation that remains (``{"name": "silu"}``), or None where
    only the identity remains (the layer applies no activation); ``{"layer", "formula",
    "refused"}`` where no activation can be separated from the normalization.

    * EvoNorm S0 / S0a: ``x * sigmoid(v * x) / group_std(x) * weight + bias``: SiLU (``v``
      starts at 1; shaping re-initializes, so it is dropped with the statistics).
    * EvoNorm S1 / S1a / S2 / S2a: ``act(x) / group_std(x)`` (or ``group_rms``): ``act``.
    * FilterResponseNormTlu2d: ``max(x / rms(x) * weight + bias, tau)``: ReLU (``tau``
      starts at 0); FilterResponseNormAct2d: ``act(x / rms(x) * weight + bias)``: ``act``.
    * EvoNorm B0 / B1 / B2: ``x / max(batch_std, v * x + instance_std(x))``: the
      nonlinearity is the normalization's own max, so there is nothing to keep: refused.
    * GlobalResponseNorm (ConvNeXt V2; timm's, and Hugging Face's ``ConvNextV2GRN``):
      ``x + gamma * (x * N(x)) + beta`` with ``N(x) = ||x||_spatial / (mean_channels
      ||x||_spatial + eps)``: the identity remains (it is the identity at its init too,
      gamma = beta = 0: ``"identity_while_zero"`` names them).
    """
    cls = type(mod).__name__
    layer = f"{type(mod).__module__}.{cls}"
    if cls in _GRN_CLASSES:
        return {"layer": layer, "activation": None, "identity_while_zero": ("weight", "bias"),
                "formula": "x + gamma * (x * ||x||_spatial / (mean_channels ||x||_spatial + "
                           "eps)) + beta"}

    def act_of(act) -> dict | None:
        if act is None or isinstance(act, nn.Identity):
            return None
        name, attrs = _act_spec(act)  # KeyError: an activation graphshape does not know
        return {"name": name, **attrs}

    if cls.startswith("EvoNorm2dB"):
        if not getattr(mod, "apply_act", True) or getattr(mod, "v", True) is None:
            return {"layer": layer, "formula": "x * weight + bias", "activation": None}
        return {"layer": layer, "formula": "x / max(batch_std(x), v * x + instance_std(x)) "
                                           "* weight + bias",
                "refused": "its only nonlinearity is the max inside the normalization's "
                           "denominator, so removing the normalization leaves no activation "
                           "to transform"}
    if cls in ("EvoNorm2dS0", "EvoNorm2dS0a"):
        applies = getattr(mod, "v", None) is not None
        return {"layer": layer, "formula": "x * sigmoid(v * x) / group_std(x) * weight + bias",
                "activation": {"name": "silu"} if applies else None}
    if cls.startswith("EvoNorm2dS"):
        return {"layer": layer, "formula": "act(x) / group_std(x) * weight + bias",
                "activation": act_of(getattr(mod, "act", None))}
    if cls == "FilterResponseNormTlu2d":
        applies = getattr(mod, "tau", None) is not None
        return {"layer": layer, "formula": "max(x / rms(x) * weight + bias, tau)",
                "activation": {"name": "relu"} if applies else None}
    return {"layer": layer, "formula": "act(x / rms(x) * weight + bias)",
            "activation": act_of(getattr(mod, "act", None))}


def _drop_path_classes() -> tuple:
    """timm's ``DropPath`` (stochastic depth), kept as an fx leaf and mapped to a dropout
    node (torchvision's StochasticDepth, "row" mode: the same computation), so that the
    shaped model drops paths in training mode only. Traced, its ``if not self.training``
    was recorded for the module's mode at tracing: from a training-mode model (timm's
    default), a mask ``x * x.new_empty(...).bernoulli_(keep)`` applied in eval mode too."""
    return _imported_classes((("timm.layers.drop", ("DropPath",)),))


def _std_conv_classes() -> tuple:
    """timm's weight-standardized convs (``StdConv2d``, ``ScaledStdConv2d``: NF-ResNets,
    NFNets, BiT ResNetV2s), kept as fx leaves and mapped to a conv holding the standardized
    weight, as ``torch.onnx.export`` writes them. Traced, their ``F.batch_norm`` on the weight
    and ``F.conv2d`` with a computed weight became opaque nodes: no kernel rule, no
    re-initialization, and other DKS/TAT parameters than the model's ONNX export. The
    ``...Same`` variants (dm_nfnet, which fx traces since its "same" padding's ``max`` of
    a size is answered for the example inputs) pad by the input's size first: an opaque
    :func:`graphshape.torch_modules.pad_same` before the conv."""
    return _imported_classes((("timm.layers.std_conv", ("StdConv2d", "ScaledStdConv2d",
                                                        "StdConv2dSame",
                                                        "ScaledStdConv2dSame")),
                              # Hugging Face's BiT: StdConv2d, "same" padding by a DynamicPad2d
                              ("transformers.models.bit.modeling_bit",
                               ("WeightStandardizedConv2d",))))


#: torch.nn containers traced through rather than kept as one opaque call: their layers
#: (linear, activation, layer norm, residual adds) are what shaping rewrites; their
#: attention stays one nn.MultiheadAttention call
_TRACED_THROUGH = (nn.TransformerEncoder, nn.TransformerEncoderLayer, nn.TransformerDecoder,
                   nn.TransformerDecoderLayer)


_CONTAINERS = (dict, list, set)


def _same_contents(now, saved) -> bool:
    """Whether container ``now`` holds the very objects ``saved`` (a copy of it) held."""
    if len(now) != len(saved):
        return False
    if isinstance(now, dict):
        return all(k in now and now[k] is v for k, v in saved.items())
    if isinstance(now, list):
        return all(a is b for a, b in zip(now, saved))
    return now == saved


@contextlib.contextmanager
def _python_state_kept(module: nn.Module):
    """Undo what a symbolic trace leaves in the model's Python attributes. A forward that
    caches a value on the module (timm's EfficientFormer, LeViT and EfficientViT-MSRA keep
    ``attention_bias_cache[str(device)]`` in eval mode) stores an fx Proxy there while being
    traced: the user's model then holds a value of a graph that is gone, and tracing it again
    failed ("Node add_28 referenced nonexistent value getitem_6"). Every submodule's
    attributes, and the contents of its dict / list / set attributes, are put back as they
    were (the same objects); tensors are not touched here (a buffer a forward updates in
    place: ``buffer_values_kept``).
    Dict subclasses count: a module's forward hooks are an OrderedDict, and Hugging Face's
    forwards register hooks at their first call (output capturing) and set a flag saying so;
    with the flag undone and the hooks kept, each read of the model added them again
    (``hidden_states`` then listed every layer's output twice)."""
    saved = [(mod, dict(vars(mod)),
              {k: (dict(v) if isinstance(v, dict) else type(v)(v))
               for k, v in vars(mod).items() if isinstance(v, _CONTAINERS)})
             for mod in module.modules()]
    try:
        yield
    finally:
        for mod, attrs, contents in saved:
            state = vars(mod)
            for key in [k for k in state if k not in attrs]:
                del state[key]
            for key, value in attrs.items():
                if state.get(key) is not value:
                    state[key] = value
            for key, copy in contents.items():
                container = attrs[key]
                if not _same_contents(container, copy):
                    container.clear()
                    if isinstance(container, list):
                        container.extend(copy)
                    else:
                        container.update(copy)


@contextlib.contextmanager
def _plain_transformer_path():
    """While tracing, let :data:`_TRACED_THROUGH` take their plain path of torch.nn layers:
    their fused fast path is chosen by Python tests on tensor properties (off here), and
    ``nn.TransformerEncoder`` asks ``_get_seq_len`` for ``src.is_nested``, which a traced
    value cannot answer. Its only use is to detect a causal mask, so without a mask
    "unknown" (None) is the same answer; with one, tracing fails as before."""
    from torch.nn.modules import transformer

    fastpath = torch.backends.mha.get_fastpath_enabled()
    original = getattr(transformer, "_get_seq_len", None)

    def seq_len(src, batch_first):
        return None if isinstance(src, torch.fx.Proxy) else original(src, batch_first)

    try:
        torch.backends.mha.set_fastpath_enabled(False)
        if original is not None:
            transformer._get_seq_len = seq_len
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        if original is not None:
            transformer._get_seq_len = original


class _Tracer(ShapeSpecializingTracer):
    """fx's default tracer plus extra leaf module classes, tracing through
    :data:`_TRACED_THROUGH`; with example inputs, Python's questions about traced sizes are
    answered for them (:mod:`graphshape.frontends.torch_specialize`)."""

    def __init__(self, leaf_classes: tuple, empty_varargs=()):
        super().__init__()
        self.leaf_classes = leaf_classes
        #: ``"*args"`` / ``"**kwargs"`` to trace as empty (:func:`_fixed_args`); not fx's
        #: ``concrete_args``, which for a container switches fx to pytree code generation
        self.empty_varargs = frozenset(empty_varargs)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        analysed = inspect.unwrap(root_fn)
        code = analysed.__code__
        n_positional = code.co_argcount  # self included, as the root is the first argument
        keyword_only = code.co_varnames[n_positional:n_positional + code.co_kwonlyargcount]
        rest = iter(code.co_varnames[n_positional + code.co_kwonlyargcount:])
        var_args = ([f"*{next(rest)}"] if code.co_flags & inspect.CO_VARARGS else []) + (
            [f"**{next(rest)}"] if code.co_flags & inspect.CO_VARKEYWORDS else [])
        if not var_args or not set(var_args) <= self.empty_varargs:
            fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        else:
            # placeholders for the named parameters only, from a copy of forward without
            # *args / **kwargs: fx would make one proxy of each and patch root_fn's code
            # to take them positionally, which fails on a decorator's wrapper(self, *args,
            # **kwargs) (Hugging Face's forwards: "co_varnames is too small")
            flags = code.co_flags & ~(inspect.CO_VARARGS | inspect.CO_VARKEYWORDS)
            named = types.FunctionType(code.replace(co_flags=flags), analysed.__globals__,
                                       analysed.__name__, analysed.__defaults__,
                                       analysed.__closure__)
            named.__kwdefaults__ = analysed.__kwdefaults__
            _, args = super().create_args_for_root(named, is_module, concrete_args)

            def fn(*fn_args):
                # forward called as model(*example_inputs) calls it: the traced inputs
                # (Proxies), not the defaults fixed by concrete_args, which a wrapper may
                # set itself (kwargs.setdefault("return_dict", True): "multiple values")
                positional = fn_args[:n_positional]
                last = max((i for i, v in enumerate(positional)
                            if isinstance(v, torch.fx.Proxy)), default=0)
                keywords = {k: v for k, v in zip(keyword_only, fn_args[n_positional:])
                            if isinstance(v, torch.fx.Proxy)}
                return root_fn(*positional[:last + 1], **keywords)

        def traced(*fn_args):
            return self._typed_dicts(fn(*fn_args))
        return traced, args

    def _typed_dicts(self, value):
        """The returned structure with each dict subclass that :func:`dict_output` can
        rebuild (Hugging Face's ``ModelOutput``, an ``OrderedDict``) made a call to its
        class, as fx records a named tuple: fx itself would return a plain dict."""
        if isinstance(value, tuple):
            items = [self._typed_dicts(v) for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
        if isinstance(value, list):
            return [self._typed_dicts(v) for v in value]
        if isinstance(value, dict):
            items = {k: self._typed_dicts(v) for k, v in value.items()}
            if isinstance(dict_output(type(value), items), DictOutput):
                return self.create_proxy("call_function", *_tm.output_call(type(value), items))
            return items
        return value

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_classes and isinstance(m, self.leaf_classes):
            return True
        if type(m) in _TRACED_THROUGH:
            return False
        return super().is_leaf_module(m, module_qualified_name)


#: fx's own dicts and dict itself: a plain dict in an output template
_PLAIN_DICTS = (dict, torch.fx.immutable_collections.immutable_dict)


@functools.lru_cache(maxsize=None)
def _rebuilds(cls: type, keys: tuple) -> bool:
    """Whether ``cls(**{key: tensor})`` is a ``cls`` with exactly those keys, in order."""
    try:
        rebuilt = cls(**{k: torch.zeros(()) for k in keys})
    except Exception:  # noqa: BLE001 - a constructor of another form: keep a plain dict
        return False
    return type(rebuilt) is cls and list(rebuilt.keys()) == list(keys)


def dict_output(cls: type, items: dict):
    """``items`` as the output template of an instance of the dict subclass ``cls``: a
    :class:`~graphshape.ir.DictOutput` when ``cls(**items)`` rebuilds one (Hugging Face's
    ``ModelOutput`` subclasses, ``OrderedDict``), else a plain dict, as before. fx's own
    dicts (``immutable_dict``) are plain dicts."""
    if (cls in _PLAIN_DICTS or not issubclass(cls, dict) or not all(isinstance(k, str) for k in items)
            or not _rebuilds(cls, tuple(items)) or _tm.output_call(cls, items) is None):
        return dict(items)
    return DictOutput(cls, dict(items))


def _is_container_class(target) -> bool:
    """A named tuple class, or a dict subclass other than fx's: a call to it that only the
    output reads builds the returned structure."""
    return isinstance(target, type) and (
        (issubclass(target, tuple) and hasattr(target, "_fields"))
        or (issubclass(target, dict) and target not in _PLAIN_DICTS))


def _output_containers(graph: torch.fx.Graph) -> set:
    """The calls that build the returned structure (named tuples, ``ModelOutput``): calls to
    a container class read only by the output node or by other such calls. They become the
    output template (:func:`_expand_containers`), not opaque nodes, so that what
    they hold are the graph's outputs."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    found: set = set()

    def visit(arg):
        def check(n):
            if (n.op == "call_function"
                    and (_is_container_class(n.target) or n.target is _tm.build_output)
                    and all(u is output or u in found for u in n.users)):
                found.add(n)
                visit((n.args, n.kwargs))
            return n
        torch.fx.node.map_arg(arg, check)

    visit(output.args)
    return found


#: defaults that tracing fixes (:func:`_fixed_args`): values torch.fx can check with ``==``
_FIXABLE_DEFAULTS = (type(None), bool, int, float, str)


def _fixed_args(module: nn.Module, n_given: int) -> dict[str, Any]:
    """``forward``'s parameters that the ``n_given`` positional example inputs leave out and
    whose default is a plain value (``mask=None``, ``return_features=False``, ``scale=1.0``),
    by name, with that default. They are traced at the default, as ``torch.jit.trace``,
    ``torch.export`` and ``torch.onnx.export`` trace ``model(*example_inputs)``: as traced
    values, ``if mask is not None`` took the branch the call never takes and ``if flag:``
    could not be traced at all. Parameters without a default, or with a tensor or container
    default, stay inputs.

    ``**kwargs`` is fixed empty (``"**kwargs": {}``), and so is ``*args`` (``"*args": ()``)
    when the example inputs fill only the named positional parameters: the call
    ``model(*example_inputs)`` passes none, where fx would trace each as one proxy
    (``kwargs.get(...)`` on it fails, and Hugging Face's ``forward(pixel_values=None,
    labels=None, **kwargs)`` was emitted with a positional ``_kwargs`` after a default)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):  # no Python signature: fx sees the same
        return {}
    fixed, position = {}, 0
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            fixed["**" + p.name] = {}
            continue
        if p.kind is p.VAR_POSITIONAL:
            if n_given <= position:
                fixed["*" + p.name] = ()
            continue
        given = p.kind is not p.KEYWORD_ONLY and position < n_given
        position += p.kind is not p.KEYWORD_ONLY
        if not given and p.default is not p.empty and type(p.default) in _FIXABLE_DEFAULTS:
            fixed[p.name] = p.default
    return fixed


def _drop_fixed_placeholders(graph: torch.fx.Graph, fixed: dict[str, Any]) -> None:
    """Remove the placeholders fx made for the ``concrete_args`` ``fixed`` (named
    ``{name}_1``) and the ``_assert`` nodes checking them: the values are constants in the
    trace, and the torch backend re-adds the parameters with their check
    (``graph.meta["fixed_args"]``)."""
    names = {f"{name}_1" for name in fixed}
    for ph in [n for n in graph.nodes if n.op == "placeholder" and n.target in names]:
        for user in list(ph.users):  # operator.eq -> torch._assert, or _assert_is_none
            for check in list(user.users):
                graph.erase_node(check)
            graph.erase_node(user)
        graph.erase_node(ph)


class _Untraceable(GraphshapeError):
    """torch.fx could not trace the module: ``str(e)`` says why. :func:`load_module` then
    reads the model through its ONNX export (:mod:`graphshape.frontends.torch_onnx`)."""

    #: what the user can do when the export cannot help either
    WHAT_TO_DO = ("What to do: decorate the offending function with torch.fx.wrap, or pass the "
                  "submodule's class in load_module(..., leaf_modules=[TheClass]) so it is kept "
                  "as one opaque call")


def _what_to_do(module: nn.Module) -> str:
    """:attr:`_Untraceable.WHAT_TO_DO`, plus a pointer to the part of a detection or
    segmentation model that graphshape can shape (torchvision's ``model.backbone`` traces
    alone; the detection heads loop over images and boxes)."""
    backbone = getattr(module, "backbone", None)
    if not isinstance(backbone, nn.Module):
        return _Untraceable.WHAT_TO_DO
    return (f"{_Untraceable.WHAT_TO_DO}; or shape its feature extractor alone: "
            f"model.backbone = graphshape.shape(model.backbone, images) "
            f"({type(backbone).__name__})")


#: held while tracing: the tracer's patches (torch's factories, Tensor methods, autocast,
#: nn.Transformer's fast path) and fx's own are process-global, and two traces in two
#: threads at once would put back each other's (torch.zeros left patched for good)
_TRACING = threading.RLock()


def _trace(module: nn.Module, leaf_modules, fixed: dict[str, Any],
           example_inputs: tuple | None = None) -> torch.fx.GraphModule:
    """The fx GraphModule of ``module``; ``gm.meta["specialized"]`` lists the branches on
    sizes taken for ``example_inputs`` (:mod:`graphshape.frontends.torch_specialize`)."""
    leaf_classes = tuple(c for c in (_stochastic_depth_class(), *_norm_act_classes(),
                                     *_frozen_batch_norm_classes(),
                                     *_norm_activation_classes(),
                                     *_std_conv_classes(), *_drop_path_classes(),
                                     *_GRAPHSHAPE_MODULES,
                                     *leaf_modules) if c is not None)
    tracer = _Tracer(leaf_classes, [name for name in fixed if name.startswith("*")])
    if example_inputs is not None:
        tracer.use_examples(module, example_inputs, fixed)
    with _TRACING:
        return _trace_buffers_first(tracer, module, fixed)


def _trace_buffers_first(tracer, module: nn.Module, fixed: dict[str, Any]) -> torch.fx.GraphModule:
    """The GraphModule of ``module`` traced with its buffers as Proxies where it can be,
    else with them as they are (fx's default); the model as it was after either."""
    buffers = [(mod._buffers, dict(mod._buffers)) for mod in module.modules()]
    for buffers_traced in (True, False):
        # Buffers traced like parameters first (fx's proxy_buffer_attributes): a slice
        # `self.position_ids[:, :T]` (BERT) or `self.mask[:T, :T]` is then recorded for any
        # T, where fx would hand the forward the tensor itself and T be answered for the
        # example. A forward that reads a buffer's value in Python (`if self.initialized:`)
        # or assigns a buffer (a cache: ConViT's `self.rel_indices = ...`) is traced again
        # the way fx does by default, the buffers as they are.
        tracer.proxy_buffer_attributes = buffers_traced
        # (the GraphModule is built before the model's attributes are put back: it copies
        # the tensor constants fx stored on the root module while tracing)
        with _python_state_kept(module), buffer_values_kept(module):
            try:
                graph = _symbolic_trace(tracer, module, fixed)
            except _Untraceable:
                if buffers_traced:
                    continue
                raise
            if buffers_traced and _buffers_replaced(buffers):
                continue
            _drop_fixed_placeholders(graph, fixed)
            gm = torch.fx.GraphModule(tracer.root, graph, module.__class__.__name__)
            gm.meta["specialized"] = tracer.specialized
            gm.meta["autocast"] = tracer.autocast
            gm.meta["checkpointed"] = tracer.checkpointed
            return gm


def _buffers_replaced(saved: list[tuple[dict, dict]]) -> bool:
    """Whether the trace set a buffer of a module (each module's ``_buffers`` as it was
    before: ``saved``) to another value, a traced one: a forward that caches a tensor there
    (ConViT's ``self.rel_indices = self.get_rel_indices(N)`` on a size change)."""
    return any(now.keys() != was.keys() or any(now[k] is not was[k] for k in was)
               for now, was in saved)


def _symbolic_trace(tracer, module: nn.Module, fixed: dict[str, Any]) -> torch.fx.Graph:
    try:
        with _plain_transformer_path():
            concrete = {k: v for k, v in fixed.items() if not k.startswith("*")}
            return tracer.trace(module, concrete_args=concrete or None)
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError, ...
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        control_flow = ("control flow" in str(exc) or "iterate" in str(exc)
                        or isinstance(exc, torch.fx.proxy.TraceError))
        why = ("its forward uses data-dependent Python control flow (an `if`/`for`/`len` on a "
               "tensor's value, or on an argument of forward that has no default), which "
               "symbolic tracing cannot record" if control_flow else
               "symbolic tracing failed")
        raise _Untraceable(
            f"torch.fx cannot trace {type(module).__name__}: {why} ({type(exc).__name__}: {msg})"
        ) from None


def _mutable(value):
    """``value`` with fx's immutable_list / immutable_dict (nested, also inside tuples)
    turned into list / dict."""
    if isinstance(value, list):  # immutable_list is a list subclass
        return [_mutable(v) for v in value]
    if type(value) is tuple:
        return tuple(_mutable(v) for v in value)
    if isinstance(value, immutable_dict):
        return {k: _mutable(v) for k, v in value.items()}
    return value


class PlainArgsMixin:
    """For ``torch.fx.Interpreter`` subclasses: call each node with plain lists and dicts,
    as the GraphModule's generated code does (``f([a, b])``), not with the immutable
    containers the Interpreter builds from the node's arguments. A wrapped function that
    edits a list argument (torchvision's ``_get_window_and_shift_size`` in swin3d) otherwise
    fails under the Interpreter while the module itself runs."""

    def fetch_args_kwargs_from_env(self, n):
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return tuple(_mutable(a) for a in args), {k: _mutable(v) for k, v in kwargs.items()}


class _ShapeProp(PlainArgsMixin, ShapeProp):
    pass


def _propagate_shapes(gm: torch.fx.GraphModule, example_inputs: tuple) -> None:
    """ShapeProp in eval mode without gradients, so that loading never changes the user's
    module (train-mode batch norm would update its running statistics; a buffer a forward
    updates in place changes a copy) nor the random state (a forward may draw random
    numbers). The frontend only
    reads each value's shape and dtype (``tensor_meta``), so this first tries 'meta' tensors
    (:func:`_propagate_on_meta`: no compute) and runs the real forward pass only when that
    fails."""

    modes = [(m, m.training) for m in gm.modules()]
    try:
        gm.eval()
        # ShapeProp prints a traceback to stderr before re-raising: keep it quiet, and
        # report the root cause with the fx node it happened at
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()), \
                rng_kept(example_inputs):
            if not _propagate_on_meta(gm, example_inputs):
                with buffers_kept(gm):  # (a counter the forward updates in place)
                    _ShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:
        cause = exc.__cause__ or exc
        where = str(exc).split("node=%", 1)[1].split(" ", 1)[0] if "node=%" in str(exc) else None
        first = (str(cause).strip().splitlines() or [""])[0][:300]
        raise GraphshapeError(
            f"running the traced module on the example inputs failed"
            f"{f' at fx node {where!r}' if where else ''}: {type(cause).__name__}: {first}. "
            "Check that example_inputs match the model's forward (a tensor or a tuple of "
            "tensors of the shapes it expects).") from None
    finally:
        for m, training in modes:
            m.training = training


class _MetaShapeProp(PlainArgsMixin, ShapeProp):
    """ShapeProp on meta tensors, with a shortcut for eval-mode batch norm, whose meta
    kernel is a Python decomposition (~0.6 ms a call: 30 of the 45 ms of ResNet-50): its
    output has its input's shape, dtype and layout."""

    def call_module(self, target, args, kwargs):
        mod = self.fetch_attr(target)
        if not kwargs and len(args) == 1 and _plain_eval_batch_norm(mod, args[0]):
            mod._check_input_dim(args[0])  # the module's own error for a wrong rank
            return torch.empty_like(args[0])
        return super().call_module(target, args, kwargs)


def _plain_eval_batch_norm(mod, x) -> bool:
    """Whether calling ``mod`` on meta tensor ``x`` is certain to succeed with an output like
    ``x``: a torch BatchNorm1d/2d/3d (not a subclass) using its running statistics, with
    parameters and statistics of ``x``'s channel count and dtype (and no hooks: see
    :func:`_propagate_on_meta`)."""
    if (type(mod) not in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) or mod.training
            or not isinstance(x, torch.Tensor) or not x.is_meta or not x.is_floating_point()
            or x.dim() < 2 or x.shape[1] != mod.num_features):
        return False
    stats = (mod.running_mean, mod.running_var)
    if any(t is None for t in stats):
        return False  # no running statistics: batch statistics, even in eval mode
    return all(t is None or (t.shape == (mod.num_features,) and t.dtype == x.dtype)
               for t in (*stats, mod.weight, mod.bias))


@contextlib.contextmanager
def _on_meta(module: nn.Module):
    """Every parameter and buffer of ``module`` and its submodules temporarily replaced by a
    'meta' tensor (shape, dtype and strides, no data; shared tensors stay shared); the
    originals are put back on exit. In-place updates during the forward (counters, running
    statistics) then touch the stand-ins only."""
    swapped = []
    stand_ins: dict[int, torch.Tensor] = {}
    try:
        for mod in module.modules():
            for store in (mod._parameters, mod._buffers):
                for name, t in store.items():
                    if t is None or t.is_meta:
                        continue
                    if id(t) not in stand_ins:
                        meta = torch.empty_like(t, device="meta")
                        if isinstance(t, nn.Parameter):
                            meta = nn.Parameter(meta, requires_grad=t.requires_grad)
                        stand_ins[id(t)] = meta
                    swapped.append((store, name, t))
                    store[name] = stand_ins[id(t)]
        yield
    finally:
        for store, name, t in reversed(swapped):
            store[name] = t


def _propagate_on_meta(gm: torch.fx.GraphModule, example_inputs: tuple) -> bool:
    """ShapeProp with 'meta' example inputs, parameters and buffers: every value's shape and
    dtype without computing anything (ResNet-50 at 224x224: ~45 ms instead of ~95 ms for
    the real forward pass; torch's FakeTensorMode, the other option, is slower than the
    real pass here). Returns False, with no ``tensor_meta`` left behind, where meta tensors
    cannot stand in for the real ones: values read as data (``.item()``, ``.tolist()``,
    ``if`` on a tensor), outputs whose shape depends on data (``nonzero``), ops without a
    meta kernel, or CPU tensors the forward makes itself (``torch.arange(n)``, unregistered
    tensor attributes) meeting meta ones. The caller then runs the real forward pass, which
    also gives the real error message when the inputs do not fit the model.

    Meta kernels check shapes but not everything the real kernels check (a float64 input
    into float32 linear/norm layers, or an index out of range, passes), so this is only
    tried where those checks cannot fail: floating-point example inputs, and one floating
    dtype (float32 or float64) and one device for the inputs, parameters and buffers. Nor
    where forward hooks would see the stand-ins (they may keep or read what they see)."""
    if not meta_can_stand_in(gm, example_inputs, hooks_run=True):
        return False
    inputs = tuple(torch.empty_like(t, device="meta") if isinstance(t, torch.Tensor) else t
                   for t in example_inputs)
    try:
        with _on_meta(gm):
            _MetaShapeProp(gm).propagate(*inputs)
        return True
    except Exception:  # noqa: BLE001 - any failure: fall back to the real forward pass
        for node in gm.graph.nodes:
            node.meta.pop("tensor_meta", None)
            node.meta.pop("type", None)
        return False


# ----------------------------------------------------------------------------- helpers
def _np_dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


#: while a model is read (:meth:`_Loader.run`): id(tensor) -> (tensor, its array), so that
#: a tensor read twice (a weight two layers share, a module called twice) is one array,
#: which :func:`_note_shared_params` finds; the tensor is kept so that its id stays its own
_ARRAYS: dict[int, tuple[torch.Tensor, np.ndarray]] | None = None


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """The tensor's data as numpy, sharing memory where possible (the same array for the
    same tensor while a model is read)."""
    if _ARRAYS is not None and id(t) in _ARRAYS:
        return _ARRAYS[id(t)][1]
    arr = _tensor_to_numpy(t)
    if _ARRAYS is not None:
        _ARRAYS[id(t)] = (t, arr)
    return arr


def _tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.is_meta:
        raise GraphshapeError(
            "the model has parameters on the 'meta' device (no data): materialize it "
            "(module.to_empty(device='cpu') and initialize) before loading")
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        return t.float().numpy()
    return t.numpy()


def _info(meta) -> TensorInfo:
    if isinstance(meta, TensorMetadata):
        return TensorInfo(tuple(int(d) for d in meta.shape), _np_dtype(meta.dtype))
    return TensorInfo(None, "object")


def _holds_float_tensor(meta) -> bool:
    """Whether ShapeProp's ``tensor_meta`` of a container value (tuples, lists and dicts of
    ``TensorMetadata`` and other values) holds a floating-point tensor."""
    if isinstance(meta, TensorMetadata):
        return meta.dtype.is_floating_point
    if isinstance(meta, (list, tuple)):
        return any(_holds_float_tensor(m) for m in meta)
    if isinstance(meta, dict):
        return any(_holds_float_tensor(m) for m in meta.values())
    return False


def _tuple(v, n: int | None = None) -> tuple:
    if isinstance(v, (list, tuple)):
        return tuple(v)
    return (v,) * (n or 1)


def _bind(node: torch.fx.Node, names: list[str], defaults: dict) -> dict:
    """Positional + keyword arguments of ``node`` by parameter name."""
    out = dict(defaults)
    for name, value in zip(names, node.args):
        out[name] = value
    for k, v in node.kwargs.items():
        if k not in names:
            raise _Unmapped(f"unexpected keyword {k!r}")
        out[k] = v
    missing = [n for n in names if n not in out]
    if missing:
        raise _Unmapped(f"missing arguments {missing}")
    return out


def _has_node(value) -> bool:
    found = []
    torch.fx.node.map_arg(value, lambda n: found.append(n))
    return bool(found)


def _sym_pads(padding, dims: int) -> tuple:
    p = _tuple(padding, dims)
    if len(p) != dims:
        raise _Unmapped("padding rank")
    return tuple(int(v) for v in p) * 2


def _conv_pads(padding, kernel, dilation, dims: int) -> tuple:
    if padding == "valid":
        return (0,) * (2 * dims)
    if padding == "same":
        # torch pads the extra element of an odd total at the end
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple(t // 2 for t in totals) + tuple(t - t // 2 for t in totals)
    return _sym_pads(padding, dims)


# ----------------------------------------------------------------------------- loader
class _Loader:
    def __init__(self, module: nn.Module, example_inputs: tuple | None, leaf_modules):
        self.module = module
        self.example_inputs = example_inputs
        fixed = _fixed_args(module, len(example_inputs or ()))
        self.gm = _trace(module, leaf_modules, fixed, example_inputs)
        self.has_shapes = example_inputs is not None
        if self.has_shapes:
            _propagate_shapes(self.gm, example_inputs)
        self.graph = Graph({"source": "torch", "has_shapes": self.has_shapes,
                            **_module_meta(module, fixed)})
        for key in ("specialized", "autocast", "checkpointed"):
            if self.gm.meta[key]:
                # one entry per line of the model's code, with how often it was reached
                counts = collections.Counter(self.gm.meta[key])
                self.graph.meta[key] = [
                    place + (f" ({n} times)" if n > 1 else "") for place, n in counts.items()]
        self.env: dict[torch.fx.Node, Any] = {}   # fx node -> Ref | _Lazy | _Multi
        self.nontensor: set[torch.fx.Node] = set()
        self._materialized: list = []  # lazy constants turned into nodes by the current call
        self.order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        # qualified names of modules with forward hooks, in the order their calls are
        # mapped (the root and modules traced through are added by run)
        self._hooked: list[str] = []
        self._pruned: list[str] = []    # layers whose only hooks are prune's masks
        # get_attr target -> the value a forward-made tensor holds after item assignment, or
        # a buffer after an in-place update: what later get_attr nodes of it read
        self._assigned_constants: dict[str, Ref] = {}
        # buffer -> the fx nodes updating it in place (_inplace_result)
        self.state_updates: dict[str, list[str]] = {}

    # ----------------------------------------------------------------- values
    def info(self, fx_node: torch.fx.Node) -> TensorInfo:
        if not self.has_shapes:
            return TensorInfo(None, "object" if fx_node in self.nontensor else None)
        return _info(fx_node.meta.get("tensor_meta"))

    def is_tensor(self, v) -> bool:
        if not isinstance(v, torch.fx.Node):
            return False
        if self.has_shapes:
            return isinstance(v.meta.get("tensor_meta"), TensorMetadata)
        value = self.env.get(v)
        return v not in self.nontensor and not isinstance(value, _Multi)

    def rank(self, v) -> int | None:
        info = self.info(v) if isinstance(v, torch.fx.Node) else None
        return None if info is None or info.shape is None else len(info.shape)

    def ref(self, v) -> Ref:
        """The IR value of fx node ``v`` (materializing a lazy constant)."""
        value = self.env[v]
        if isinstance(value, _Lazy):
            value = self._materialize(v, value)
        if isinstance(value, _Multi):
            raise _Unmapped(f"{v.name} is a tuple of values")
        return value

    def template(self, value):
        """``value`` with fx nodes replaced by Refs (tuple-valued nodes by tuples of Refs)."""
        def leaf(v):
            if not isinstance(v, torch.fx.Node):
                return v
            entry = self.env[v]
            if isinstance(entry, _Multi):
                return tuple(entry.refs)
            return self.ref(v)

        return map_template(value, leaf)

    def _materialize(self, fx_node, lazy: "_Lazy") -> Ref:
        tensor = lazy.tensor
        node = Node(fx_node.name, "constant",
                    attrs={"trainable": isinstance(tensor, nn.Parameter)},
                    params={"value": _to_numpy(tensor)},
                    outputs=[TensorInfo(tuple(tensor.shape), _np_dtype(tensor.dtype))],
                    meta={"source_name": fx_node.name, "module_path": fx_node.target,
                          "persistent": in_state_dict(self.module, fx_node.target),
                          "flags": [], **_dtype_meta(tensor)})
        self.graph.add(node)
        self.env[fx_node] = node.out
        self._materialized.append((fx_node, lazy))
        return node.out

    def scalar_constant(self, base: str, value, like: TensorInfo | None) -> Ref:
        if isinstance(value, bool):
            arr = np.array(value)
        elif isinstance(value, int) and not (like and like.dtype and "float" in like.dtype):
            arr = np.array(value, dtype=np.int64)
        else:
            dtype = like.dtype if like and like.dtype and "float" in like.dtype else "float32"
            arr = np.array(value, dtype=dtype if dtype != "bfloat16" else "float32")
        name = self.graph.unique_name(f"{base}_scalar")
        node = Node(name, "constant", attrs={"trainable": False}, params={"value": arr},
                    outputs=[TensorInfo((), str(arr.dtype))], meta={"flags": ["scalar"]})
        self.graph.add(node)
        return node.out

    # ----------------------------------------------------------------- emitting IR nodes
    def add(self, fx_node, op: str, inputs: list[Ref], attrs=None, params=None,
            outputs: list[TensorInfo] | None = None, name: str | None = None) -> Ref:
        meta = {"source_name": fx_node.name, "flags": []}
        if fx_node.op == "call_module":
            meta["module_path"] = fx_node.target
        elif fx_node.meta.get("nn_module_stack"):
            # the innermost module whose forward made this call (fx records the stack):
            # messages name it (Node.located)
            meta["scope"] = list(fx_node.meta["nn_module_stack"].values())[-1][0]
        node = Node(name or fx_node.name, op, list(inputs), dict(attrs or {}), dict(params or {}),
                    outputs if outputs is not None else [self.info(fx_node)], meta)
        self.graph.add(node)
        return node.out

    def opaque(self, fx_node, function: Callable | None = None,
               outputs: list[TensorInfo] | None = None) -> None:
        """``fx_node`` kept as the call it is (``function``: a call to it instead, with the
        same arguments and ``outputs``)."""
        args = self.template(fx_node.args)
        kwargs = self.template(dict(fx_node.kwargs))
        refs: list[Ref] = []

        def collect(v):
            if isinstance(v, Ref):
                if v not in refs:
                    refs.append(v)
            elif isinstance(v, (list, tuple)):
                for x in v:
                    collect(x)
            elif isinstance(v, dict):
                for x in v.values():
                    collect(x)
            elif isinstance(v, slice):
                collect(v.start), collect(v.stop), collect(v.step)

        collect(args), collect(kwargs)
        fx_op = "call_function" if function is not None else fx_node.op
        attrs = {"framework": "torch", "fx_op": fx_op, "args": args, "kwargs": kwargs}
        if fx_op == "call_module":
            mod = self.gm.get_submodule(fx_node.target)
            attrs["target"] = fx_node.target
            attrs["module"] = mod
            attrs["description"] = f"module {type(mod).__module__}.{type(mod).__name__}"
        elif fx_op == "call_function":
            attrs["target"] = function or fx_node.target
            mod_name = getattr(attrs["target"], "__module__", None) or ""
            fn_name = getattr(attrs["target"], "__name__", str(attrs["target"]))
            attrs["description"] = f"function {mod_name}.{fn_name}".replace("_operator.", "operator.")
        else:
            attrs["target"] = _VIEW_AS_RESHAPE.get(fx_node.target, fx_node.target)
            if fx_node.target in _VIEW_AS_RESHAPE and any(
                    isinstance(a, (torch.dtype, type)) for a in fx_node.args[1:]):
                attrs["target"] = fx_node.target  # x.view(torch.int32): a reinterpretation
            attrs["description"] = f"method Tensor.{fx_node.target}"
        ref = self.add(fx_node, "opaque", refs, attrs, outputs=outputs)
        flags = self.graph[ref.node].meta["flags"]
        entry = self._input_entry(fx_node)
        if entry is not None:
            # batch["image"]: the model's input is a dict (list, tuple) of tensors and this
            # is one of them; the analysis takes its kernel from the example input
            self.graph[ref.node].meta["input_entry"] = entry
            flags.append("input entry")
            self.env[fx_node] = ref
            return
        flags.append("opaque")
        if fx_node.op == "call_function" and fx_node.target in _CHECKS:
            flags.append(CHECK)
        if _reads_metadata_only(fx_node):
            # x.new_empty(shape), torch.zeros_like(x), torch.rand_like(x): a tensor made from
            # x's shape and dtype, not its values (drop path's mask in training mode)
            flags.append("shape_computation")
        elif _moves_data_only(fx_node):
            # torch.roll, a crop by computed sizes, F.pad by computed amounts: entries moved,
            # copied or zero-padded (the analysis' approximate identity, as for slice / pad)
            flags.append(DATA_MOVEMENT)
        elif self.graph[ref.node].outputs[0].dtype == "object":
            if _holds_float_tensor(fx_node.meta.get("tensor_meta")):
                # a tuple/list of tensors ((output, weights), unbind): its getitems are signals
                flags.append(TENSOR_CONTAINER)
            else:
                # sizes and Python arithmetic on them: not on any signal path
                flags.append("shape_computation")
        self.env[fx_node] = ref

    def _input_entry(self, fx_node) -> tuple[str, Any] | None:
        """``(input name, key)`` when ``fx_node`` is ``x[key]`` of a model input that is a
        container (``forward(self, batch)`` called with a dict), ``key`` a constant, and
        the entry a floating-point tensor; None otherwise."""
        if fx_node.op != "call_function" or fx_node.target is not operator.getitem:
            return None
        if len(fx_node.args) != 2 or not isinstance(fx_node.args[1], (str, int)):
            return None
        source = fx_node.args[0]
        if not isinstance(source, torch.fx.Node) or source.op != "placeholder":
            return None
        ref = self.env.get(source)
        if not isinstance(ref, Ref) or self.graph[ref.node].outputs[0].dtype != "object":
            return None
        meta = fx_node.meta.get("tensor_meta")
        if not isinstance(meta, TensorMetadata) or not meta.dtype.is_floating_point:
            return None
        return (ref.node, fx_node.args[1])

    # ----------------------------------------------------------------- main loop
    def run(self) -> Graph:
        global _ARRAYS
        outer, _ARRAYS = _ARRAYS, {}
        try:
            graph = self._run()
            _note_shared_params(graph, self.module, _ARRAYS)
        finally:
            _ARRAYS = outer
        return graph

    def _run(self) -> Graph:
        out_template = None
        containers = _output_containers(self.gm.graph)
        for fx_node in self.gm.graph.nodes:
            if fx_node.op == "placeholder":
                self._placeholder(fx_node)
            elif fx_node.op == "get_attr":
                self._get_attr(fx_node)
            elif fx_node.op == "output":
                out_template = _expand_containers(fx_node.args[0], containers)
            elif fx_node not in containers:
                self._call(fx_node)
        self._outputs(out_template)
        self.graph.validate()
        # fx calls the root's forward, not the root: its hooks are not in the trace; a module
        # fx traced through ran its hooks once, on proxies: what they return is in the trace,
        # what else they do (store the output) happened at trace time only
        called = {n.target for n in self.gm.graph.nodes if n.op == "call_module"}
        traced = [name for name, m in self.module.named_modules()
                  if name and name not in called and _has_hooks(m)]
        dropped = ["(the model)"] * _has_hooks(self.module) + self._hooked
        if dropped:
            self.graph.meta["dropped_hooks"] = dropped
        if self._pruned:
            self.graph.meta["pruned"] = self._pruned
        if traced:
            self.graph.meta["traced_hooks"] = traced
        if self.state_updates:
            self.graph.meta["state_updates"] = [
                f"{buffer} ({', '.join(names)})" for buffer, names in self.state_updates.items()]
        if self.module.training:
            random = [n.name for n in self.graph if n.op == "opaque" and _draws_random(n)]
            if random:
                self.graph.meta["random_in_training"] = random
        return self.graph

    def _placeholder(self, fx_node):
        idx = len(self.graph.inputs)
        if self.has_shapes and idx < len(self.example_inputs) and not isinstance(
                self.example_inputs[idx], torch.Tensor):
            info = TensorInfo(None, "object")
        else:
            info = self.info(fx_node)
        attrs = {"name": fx_node.target}
        if fx_node.args:  # forward(x, mask=None): keep the default so callers may omit it
            attrs["default"] = fx_node.args[0]
        node = Node(fx_node.name, "input", attrs=attrs, outputs=[info],
                    meta={"source_name": fx_node.name, "flags": []})
        self.graph.add(node)
        self.env[fx_node] = node.out

    def _get_attr(self, fx_node):
        if fx_node.target in self._assigned_constants:
            # a tensor the forward made and then wrote into (_assignment), or a buffer it
            # updated in place (_inplace_result): the new value
            self.env[fx_node] = self._assigned_constants[fx_node.target]
            return
        obj = self.gm
        for part in fx_node.target.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, torch.Tensor):
            self.env[fx_node] = _Lazy(obj)
        else:
            # a non-tensor attribute: carry it as an opaque get_attr
            self.env[fx_node] = self.add(
                fx_node, "opaque", [],
                {"framework": "torch", "fx_op": "get_attr", "target": fx_node.target,
                 "value": obj, "args": (), "kwargs": {},
                 "description": f"attribute {fx_node.target}"},
                outputs=[TensorInfo(None, "object")])

    def _call(self, fx_node):
        if (fx_node.op, fx_node.target) in (("call_function", operator.setitem),
                                            ("call_method", "__setitem__")):
            # (the method: assignment of a traced value into a tensor fx does not trace,
            # ``t = torch.zeros(2, 3); t[:, 1] = x.mean(1)``, recorded by its torch function)
            self._assignment(fx_node)
            return
        weight_norm, hooked, pruned = None, False, False
        if fx_node.op == "call_module":
            mod = self.gm.get_submodule(fx_node.target)
            handler = _MODULE_HANDLERS.get(type(mod))
            if handler is None and type(mod) in _norm_act_classes():
                handler = _m_norm_act
            if handler is None and type(mod) in _frozen_batch_norm_classes():
                handler = _m_norm_act if hasattr(mod, "act") else _m_frozen_batch_norm
            if handler is None and type(mod) in _norm_activation_classes():
                handler = _m_norm_activation
            if handler is None and type(mod) in _std_conv_classes():
                handler = _m_std_conv
            if handler is None and type(mod) in _drop_path_classes():
                handler = _m_drop_path
            weight_norm = _weight_normalization(mod)
            hooked = _has_hooks(mod)
            pruned = hooked and _pruned_only(mod)
            if weight_norm is not None:
                handler = _MODULE_HANDLERS.get(weight_norm[0])  # None: stays opaque
                if handler is not None:
                    mod = _WithWeight(mod, weight_norm[3])
            args = (mod,)
        elif fx_node.op == "call_function":
            handler = _FUNCTION_HANDLERS.get(_key(fx_node.target)) or _NAMED_FUNCTIONS.get(
                f"{getattr(fx_node.target, '__module__', '')}."
                f"{getattr(fx_node.target, '__qualname__', '')}")
            args = ()
        else:  # call_method
            handler = METHOD_OPS.get(fx_node.target)
            args = ()
        if handler is not None:
            before = set(self.graph.nx.nodes)
            self._materialized.clear()
            try:
                handler(self, fx_node, *args)
                if weight_norm is not None:
                    self.graph[self.env[fx_node].node].meta["weight_normalization"] = (
                        weight_norm[1], weight_norm[2])
                if pruned:
                    self._pruned.append(fx_node.target)
                elif hooked:
                    self._hooked.append(fx_node.target)
                if args and getattr(args[0], "inplace", False) is True and fx_node.args:
                    # nn.ReLU(inplace=True) etc.: later readers of the input see the result
                    _inplace_result(self, fx_node, fx_node.args[0])
                return
            except (_Unmapped, TypeError, ValueError, KeyError, IndexError, AttributeError):
                # this call's arguments do not fit the canonical op (traced values where
                # constants were expected, unusual forms): undo what the handler added and
                # keep the call as it is
                for name in reversed(self.graph.topo_order()):
                    if name not in before:
                        self.graph.remove(name)
                for v, lazy in self._materialized:
                    if self.env[v].node not in self.graph:
                        self.env[v] = lazy
                self.env.pop(fx_node, None)
            finally:
                self._materialized.clear()
        self._mark_nontensor(fx_node)
        self.opaque(fx_node)
        if _returns_self(fx_node) and fx_node.args:
            # x.clamp_(...) kept as it is: the emitted call updates its input as the source
            # does (a buffer's update too), and later readers of x read this node
            _inplace_result(self, fx_node, fx_node.args[0], state_update=False)

    def _assignment(self, fx_node):
        """``x[key] = value``: a new value, ``torch_modules.assigned(x, key, value)``, that
        the source's later readers of ``x`` read instead (as for ``x += y``). _Untraceable
        (the model is then read through its export, which follows the memory) where another
        view of the same memory is read after it, or the memory is the model's input or
        state: those readers would miss the change."""
        target = fx_node.args[0] if fx_node.args else None
        if not isinstance(target, torch.fx.Node) or (
                self.has_shapes and not isinstance(target.meta.get("tensor_meta"),
                                                   TensorMetadata)):
            raise _Untraceable(
                f"item assignment {fx_node.name} is into {getattr(target, 'name', target)}, "
                "which is not a tensor")
        why = _assignment_seen_elsewhere(self, fx_node, target)
        if why:
            raise _Untraceable(
                f"item assignment `{target.name}[...] = ...` ({fx_node.name}) {why}; graphshape "
                "reads an item assignment as a new value, which that reader would not see")
        self.opaque(fx_node, function=_tm.assigned, outputs=[self.info(target)])
        _inplace_result(self, fx_node, target)
        if target.op == "get_attr":  # fx reads the tensor again through other get_attrs
            self._assigned_constants[target.target] = self.env[fx_node]

    def _mark_nontensor(self, fx_node):
        """Without shapes, remember values that are Python numbers / sizes, not tensors."""
        if self.has_shapes:
            return
        t = fx_node.target
        if fx_node.op == "call_method" and t in ("size", "dim", "numel", "tolist", "item",
                                                 "__len__", "nelement", "ndimension"):
            self.nontensor.add(fx_node)
        elif fx_node.op == "call_function" and t in (getattr, len):
            self.nontensor.add(fx_node)
        elif fx_node.op == "call_function":
            operands = [a for a in fx_node.args if isinstance(a, torch.fx.Node)]
            if operands and all(a in self.nontensor for a in operands):
                self.nontensor.add(fx_node)

    def _outputs(self, template):
        leaves: list[torch.fx.Node] = []
        map_template(template, lambda v: leaves.append(v) if isinstance(v, torch.fx.Node) else v)
        single = isinstance(template, torch.fx.Node)
        names = {}
        for i, leaf in enumerate(leaves):
            name = "output" if single else f"output_{i}"
            name = self.graph.unique_name(name)
            entry = self.env[leaf]
            if isinstance(entry, _Multi):
                raise GraphshapeError(
                    f"the model returns the tuple {leaf.name!r} as one value; return its "
                    "elements instead", node=leaf.name)
            ref = self.ref(leaf)
            self.graph.add(Node(name, "output", [ref], {"name": name},
                                outputs=[self.graph.info(ref)], meta={"flags": []}))
            names.setdefault(leaf, []).append(name)
        counters: dict = {}

        def to_ref(v):
            """A leaf of the output structure: Ref(its output node) for an fx node."""
            if not isinstance(v, torch.fx.Node):
                return v
            k = counters.get(v, 0)
            counters[v] = k + 1
            return Ref(names[v][k])

        self.graph.meta["torch_output"] = map_template(template, to_ref)


def _expand_containers(template, containers: set):
    """The output template with each call of :func:`_output_containers` replaced by what
    it builds: a named tuple of its arguments, or a :class:`DictOutput` of its keywords."""
    def expand(leaf):
        if not (isinstance(leaf, torch.fx.Node) and leaf in containers):
            return leaf
        if leaf.target is _tm.build_output:  # a shaped model's ModelOutput
            module, qualname, keys, *values = leaf.args
            return DictOutput(_tm.output_class(module, qualname),
                              {k: map_template(v, expand) for k, v in zip(keys, values)})
        if issubclass(leaf.target, tuple):
            return leaf.target(*[map_template(a, expand) for a in leaf.args])
        return DictOutput(leaf.target, {k: map_template(v, expand) for k, v in leaf.kwargs.items()})
    return map_template(template, expand)


def _note_shared_params(graph: Graph, module: nn.Module, arrays: dict) -> None:
    """``meta["shared_params"]`` (param key, or an opaque module's parameter path -> the
    tensor's first qualified name in ``module``) on every node holding a tensor that is
    used in more than one place: a weight two layers share (``head.weight =
    emb.weight``), a module called twice (a siamese encoder, a recurrent block). The
    backends keep such a tensor one tensor (the torch backend: one ``nn.Parameter``)."""
    tensor_of = {id(arr): t for t, arr in arrays.values()}
    names: dict[int, str] = {}
    for name, t in [*module.named_parameters(remove_duplicate=False),
                    *module.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), name)
    uses: dict[int, list[tuple[Node, str]]] = {}
    for node in graph:
        if node.op == "opaque" and isinstance(node.attrs.get("module"), nn.Module):
            held = [*node.attrs["module"].named_parameters(remove_duplicate=False),
                    *node.attrs["module"].named_buffers(remove_duplicate=False)]
            for path, t in held:
                uses.setdefault(id(t), []).append((node, path))
            continue
        for key, arr in node.params.items():
            t = tensor_of.get(id(arr))
            if t is not None and id(t) in names:
                uses.setdefault(id(t), []).append((node, key))
    for tid, places in uses.items():
        if len(places) > 1 and tid in names:
            for node, key in places:
                node.meta.setdefault("shared_params", {})[key] = names[tid]


def in_state_dict(module: nn.Module, target: str) -> bool:
    """Whether ``module.state_dict()`` holds the tensor at attribute path ``target``: a
    parameter or a persistent buffer (not a ``persistent=False`` buffer, nor a plain tensor
    attribute, such as the constants torch.fx makes of tensors built in ``forward``)."""
    owner_path, _, name = target.rpartition(".")
    try:
        owner = module.get_submodule(owner_path)
    except AttributeError:
        return False
    return name in owner._parameters or (
        name in owner._buffers and name not in owner._non_persistent_buffers_set)


class _Lazy:
    """A get_attr tensor that becomes a constant node only if used as a graph value."""

    def __init__(self, tensor):
        self.tensor = tensor


class _Multi:
    """A tuple of mapped values: a node with several outputs (split), whose getitem(i)
    reads Ref(name, i), or the given ``refs`` (unbind: a squeeze of each split output)."""

    def __init__(self, name: str, count: int, refs: list[Ref] | None = None):
        self.name, self.count = name, count
        self.refs = refs if refs is not None else [Ref(name, i) for i in range(count)]


def _wrapped_module(module: nn.Module) -> nn.Module | None:
    """The model inside a wrapper that adds no computation of its own: ``torch.compile``'s
    OptimizedModule, ``nn.DataParallel``, ``DistributedDataParallel``; None otherwise."""
    optimized = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    optimized = getattr(optimized, "OptimizedModule", None)
    if optimized is not None and isinstance(module, optimized):
        return module._orig_mod
    if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return module.module
    return None


def _unwrap(module: nn.Module) -> tuple[nn.Module, list[str]]:
    """``module`` without its wrappers (:func:`_wrapped_module`), and their class names,
    outermost first: torch.fx cannot trace them (a compiled module has no ``forward`` of
    its own; DataParallel scatters over devices), and what they wrap is the network."""
    wrappers = []
    while (inner := _wrapped_module(module)) is not None:
        wrappers.append(type(module).__name__)
        module = inner
    return module, wrappers


def _placement_meta(module: nn.Module) -> dict:
    """``torch_dtype`` / ``torch_device``: the one floating dtype and the one device of the
    module's parameters and buffers, where they agree (the IR keeps numpy arrays on the CPU,
    bfloat16 as float32; the torch backend puts the emitted module back there);
    ``torch_memory_format``: ``"channels_last"`` (``"channels_last_3d"``) where the model
    was converted to it (``model.to(memory_format=torch.channels_last)``: every 4-d (5-d)
    floating tensor is laid out so, and some only so), which the shaped model keeps."""
    tensors = list(module.parameters()) + list(module.buffers())
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    devices = {t.device for t in tensors}
    meta = {}
    if len(dtypes) == 1:
        meta["torch_dtype"] = str(dtypes.pop()).removeprefix("torch.")
    if len(devices) == 1:
        meta["torch_device"] = str(devices.pop())
    for rank, name in ((4, "channels_last"), (5, "channels_last_3d")):
        laid = [t for t in tensors if t.is_floating_point() and t.dim() == rank]
        layout = getattr(torch, name)
        if laid and all(t.is_contiguous(memory_format=layout) for t in laid) and any(
                not t.is_contiguous() for t in laid):
            meta["torch_memory_format"] = name
    return meta


def _is_aten_graph(module: nn.Module) -> bool:
    """Whether ``module`` is a GraphModule calling ATen operator overloads
    (``torch.ops.aten.convolution.default``): what ``torch.export`` produces."""
    overload = getattr(torch._ops, "OpOverload", None)
    return (overload is not None and isinstance(module, torch.fx.GraphModule)
            and any(n.op == "call_function" and isinstance(n.target, overload)
                    for n in module.graph.nodes))


def _module_meta(module: nn.Module, fixed: dict[str, Any]) -> dict:
    """What the torch backend needs to emit a module like the source, whichever way it was
    read: ``model_class``, ``training``, the placement (:func:`_placement_meta`),
    ``frozen_params`` (the qualified names of the parameters with ``requires_grad=False``;
    the backend freezes the emitted parameters of those names) and ``fixed_args``
    (``forward``'s parameters traced at their defaults; the backend re-adds them)."""
    # a TorchScript module's class is RecursiveScriptModule; its original_name is the source's
    name = (module.original_name if isinstance(module, torch.jit.ScriptModule)
            else type(module).__name__)
    meta = {"model_class": name, "training": module.training,
            **_placement_meta(module)}
    frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
    if frozen:
        meta["frozen_params"] = frozen
    if fixed:
        meta["fixed_args"] = fixed
    return meta


def _dtype_meta(t: torch.Tensor) -> dict:
    return {"torch_dtype": "bfloat16"} if t.dtype == torch.bfloat16 else {}


def _key(target):
    try:
        hash(target)
        return target
    except TypeError:
        return id(target)


# ----------------------------------------------------------------------------- handlers
def _param(ld: _Loader, v, what: str) -> np.ndarray | None:
    """A weight argument given as a get_attr tensor -> numpy (None stays None)."""
    if v is None:
        return None
    if isinstance(v, torch.fx.Node) and isinstance(ld.env.get(v), _Lazy):
        return _to_numpy(ld.env[v].tensor)
    raise _Unmapped(f"{what} is not a parameter")


def _module_params(mod: nn.Module, names) -> dict:
    out = {}
    for n in names:
        t = getattr(mod, n, None)
        if t is not None:
            out[n] = _to_numpy(t)
    return out


def _input(ld: _Loader, fx_node, v=None) -> Ref:
    v = fx_node.args[0] if v is None else v
    if not ld.is_tensor(v):
        raise _Unmapped("input is not a tensor")
    return ld.ref(v)


def _emit(ld, fx_node, op, inputs, attrs=None, params=None, module_path=None):
    ld.env[fx_node] = ref = ld.add(fx_node, op, inputs, attrs, params)
    if module_path:
        ld.graph[ref.node].meta["module_path"] = module_path


def _owner_path(weight, name: str = "weight") -> str | None:
    """``features.0.1`` for a functional call whose weight is get_attr ``features.0.1.weight``
    (so the emitted module keeps the source's state_dict keys)."""
    if isinstance(weight, torch.fx.Node) and weight.op == "get_attr" and "." in weight.target:
        owner, leaf = weight.target.rsplit(".", 1)
        if leaf == name:
            return owner
    return None


# -- modules
def _m_conv(ld, fx_node, mod, params=None, x: Ref | None = None):
    dims = len(mod.kernel_size)
    pads = _conv_pads(mod.padding, mod.kernel_size, mod.dilation, dims)
    attrs = {"dims": dims, "in_channels": mod.in_channels, "out_channels": mod.out_channels,
             "kernel_shape": tuple(mod.kernel_size), "stride": tuple(mod.stride), "pads": pads,
             "dilation": tuple(mod.dilation), "groups": mod.groups,
             "padding_mode": mod.padding_mode}
    if params is None:
        params = _module_params(mod, ["weight", "bias"])
    _emit(ld, fx_node, "conv", [_input(ld, fx_node) if x is None else x], attrs, params)


def _m_std_conv(ld, fx_node, mod):
    """timm's StdConv2d / ScaledStdConv2d, their "same" variants, Hugging Face BiT's
    WeightStandardizedConv2d (see :func:`_std_conv_classes`): a conv with the
    weight its forward computes (standardized per output channel, times ``gain * scale``
    for the scaled variant). The node's ``meta["weight_normalization"]`` names the class;
    shaping removes the standardization with the other normalization (the conv is then
    re-initialized). Without shaping the emitted conv computes the same function, but
    trains without the standardization, as the model's ONNX export would."""
    if len(fx_node.args) != 1 or fx_node.kwargs:
        raise _Unmapped("extra arguments")
    gain = getattr(mod, "gain", None)
    with torch.no_grad():
        weight = F.batch_norm(
            mod.weight.reshape(1, mod.out_channels, -1), None, None,
            weight=None if gain is None else (gain * mod.scale).view(-1),
            training=True, momentum=0.0, eps=mod.eps).reshape_as(mod.weight)
    params = {"weight": _to_numpy(weight), **_module_params(mod, ["bias"])}
    x = None
    if _pads_same(mod):  # StdConv2dSame, ScaledStdConv2dSame, BiT's: padded first
        x = _same_padded(ld, fx_node, mod)
    _m_conv(ld, fx_node, mod, params, x)
    ld.graph[ld.env[fx_node].node].meta["weight_normalization"] = (
        "weight standardization", type(mod).__name__)


def _pads_same(mod) -> bool:
    """Whether a weight-standardized conv pads its input for a "same" convolution first:
    timm's ``same_pad`` flag, or Hugging Face BiT's ``pad`` module (a ``DynamicPad2d`` of
    the conv's kernel, stride and dilation, by zeros)."""
    pad = getattr(mod, "pad", None)
    if isinstance(pad, nn.Module):
        if (getattr(pad, "value", None) != 0 or tuple(getattr(pad, "kernel_size", ())) !=
                tuple(mod.kernel_size) or tuple(getattr(pad, "stride", ())) != tuple(mod.stride)
                or tuple(getattr(pad, "dilation", ())) != tuple(mod.dilation)):
            raise _Unmapped(f"padding by a {type(pad).__name__} graphshape does not know")
        return True
    return bool(getattr(mod, "same_pad", False))


def _same_padded(ld, fx_node, mod) -> Ref:
    """An opaque :func:`graphshape.torch_modules.pad_same` of the layer's input (TensorFlow's
    "same" padding, by the input's size at run time), flagged as data movement."""
    x = _input(ld, fx_node)
    info = ld.graph.info(x)
    shape = None
    if info.shape is not None and all(isinstance(d, int) for d in info.shape[-2:]):
        pads = _tm.same_pads(info.shape[-2:], mod.kernel_size, mod.stride, mod.dilation)
        shape = (*info.shape[:-2], info.shape[-2] + pads[2] + pads[3],
                 info.shape[-1] + pads[0] + pads[1])
    args = (x, tuple(mod.kernel_size), tuple(mod.stride), tuple(mod.dilation))
    ref = ld.add(fx_node, "opaque", [x], {
        "framework": "torch", "fx_op": "call_function", "target": _tm.pad_same, "args": args,
        "kwargs": {}, "description": "function graphshape.torch_modules.pad_same"},
        outputs=[TensorInfo(shape, info.dtype)], name=f"{fx_node.name}_pad")
    ld.graph[ref.node].meta["flags"] += ["opaque", DATA_MOVEMENT]
    return ref


#: layers whose weight torch.nn.utils' weight_norm / spectral_norm may reparametrize
_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                  nn.ConvTranspose3d, nn.Linear)


def _weight_normalization(mod: nn.Module):
    """``(layer class, kind, source, weight)`` for a conv / linear layer whose weight is
    computed by weight normalization or spectral normalization (``torch.nn.utils``'
    parametrizations, or their older forward pre-hooks): the plain layer's class, "weight
    normalization" / "spectral normalization", what did it, and the weight it computes now
    (spectral norm: from its current singular-vector estimates, as in eval mode: no power
    iteration, so the model is not changed). The class is None where the module must stay
    an opaque call (hooks on another tensor or several of them), and so is the whole answer
    for any other module (another parametrization or a parametrized bias: an opaque call
    as well, being a ``Parametrized*`` class)."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.spectral_norm import SpectralNorm

    if parametrize.is_parametrized(mod):
        layer_class = type(mod).__bases__[0]
        found = dict(mod.parametrizations.items())
        if layer_class not in _WEIGHT_LAYERS or set(found) != {"weight"}:
            return None
        chain = found["weight"]
        names = [type(p).__name__ for p in chain]
        kinds = {"_WeightNorm": "weight normalization", "_SpectralNorm": "spectral normalization"}
        if len(chain) != 1 or names[0] not in kinds:
            return None
        modes = [(m, m.training) for m in chain.modules()]
        try:
            chain.eval()
            with torch.no_grad():
                weight = mod.weight
        finally:
            for m, training in modes:
                m.training = training
        kind = kinds[names[0]]
        return layer_class, kind, f"{kind.split()[0]}_norm parametrization", weight
    if type(mod) not in _WEIGHT_LAYERS:
        return None
    hooks = [h for h in mod._forward_pre_hooks.values() if isinstance(h, _weight_norm_hooks())]
    if not hooks:
        return None
    if len(hooks) != 1 or hooks[0].name != "weight":  # its own attribute would be stale
        return None, None, None, None
    hook = hooks[0]
    with torch.no_grad():
        if isinstance(hook, SpectralNorm):
            kind, weight = "spectral normalization", hook.compute_weight(mod, do_power_iteration=False)
        else:
            kind, weight = "weight normalization", hook.compute_weight(mod)
    return type(mod), kind, f"{kind.split()[0]}_norm hook", weight


class _WithWeight:
    """A layer as its handler reads it, with ``weight`` the weight its forward computes
    (see :func:`_weight_normalization`); every other attribute is the layer's."""

    def __init__(self, mod: nn.Module, weight: torch.Tensor):
        self._mod, self.weight = mod, weight

    def __getattr__(self, name):
        return getattr(self._mod, name)


def _weight_norm_hooks() -> tuple[type, type]:
    """The forward pre-hook classes of torch.nn.utils' older weight_norm / spectral_norm."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return WeightNorm, SpectralNorm


def _has_hooks(mod: nn.Module) -> bool:
    """Whether ``mod`` has forward hooks or pre-hooks (other than weight / spectral
    normalization's, see :func:`_weight_normalization`). Neither a module torch.fx traces
    through nor a layer graphshape maps to its own op runs them in the emitted model: fx
    records what the module computes, not its hooks."""
    return bool(mod._forward_hooks) or any(
        not isinstance(h, _weight_norm_hooks()) for h in mod._forward_pre_hooks.values())


def _pruned_only(mod: nn.Module) -> bool:
    """Whether ``mod``'s hooks (:func:`_has_hooks`) are all ``torch.nn.utils.prune``'s masks:
    the layer is read with the masked weight they computed."""
    from torch.nn.utils.prune import BasePruningMethod

    pre = [h for h in mod._forward_pre_hooks.values() if not isinstance(h, _weight_norm_hooks())]
    return not mod._forward_hooks and bool(pre) and all(
        isinstance(h, BasePruningMethod) for h in pre)


def _m_conv_transpose(ld, fx_node, mod):
    if len(fx_node.args) > 1 or fx_node.kwargs:
        raise _Unmapped("output_size given")
    dims = len(mod.kernel_size)
    attrs = {"dims": dims, "in_channels": mod.in_channels, "out_channels": mod.out_channels,
             "kernel_shape": tuple(mod.kernel_size), "stride": tuple(mod.stride),
             "pads": _sym_pads(mod.padding, dims), "output_padding": tuple(mod.output_padding),
             "dilation": tuple(mod.dilation), "groups": mod.groups}
    _emit(ld, fx_node, "conv_transpose", [_input(ld, fx_node)], attrs,
          _module_params(mod, ["weight", "bias"]))


def _m_linear(ld, fx_node, mod):
    _emit(ld, fx_node, "linear", [_input(ld, fx_node)],
          {"in_features": mod.in_features, "out_features": mod.out_features},
          _module_params(mod, ["weight", "bias"]))


def _m_batch_norm(ld, fx_node, mod):
    dims = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(type(mod))
    attrs = {"num_features": mod.num_features, "eps": mod.eps, "momentum": mod.momentum,
             "affine": mod.affine, "track_running_stats": mod.track_running_stats}
    if dims is not None:
        attrs["dims"] = dims
    _emit(ld, fx_node, "batch_norm", [_input(ld, fx_node)], attrs,
          _module_params(mod, ["weight", "bias", "running_mean", "running_var",
                               "num_batches_tracked"]))


def _frozen_batch_norm_attrs(mod) -> dict:
    """A frozen batch norm's node attributes (see :func:`_frozen_batch_norm_classes`)."""
    return {"num_features": int(mod.running_mean.numel()), "eps": float(mod.eps),
            "momentum": None, "affine": True, "track_running_stats": True, "frozen": True}


_FROZEN_BATCH_NORM_PARAMS = ["weight", "bias", "running_mean", "running_var"]


def _m_frozen_batch_norm(ld, fx_node, mod):
    if len(fx_node.args) != 1 or fx_node.kwargs:
        raise _Unmapped("extra arguments")
    _emit(ld, fx_node, "batch_norm", [_input(ld, fx_node)], _frozen_batch_norm_attrs(mod),
          _module_params(mod, _FROZEN_BATCH_NORM_PARAMS))


def _m_instance_norm(ld, fx_node, mod):
    dims = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}[type(mod)]
    attrs = {"dims": dims, "num_features": mod.num_features, "eps": mod.eps,
             "momentum": mod.momentum, "affine": mod.affine,
             "track_running_stats": mod.track_running_stats}
    _emit(ld, fx_node, "instance_norm", [_input(ld, fx_node)], attrs,
          _module_params(mod, ["weight", "bias", "running_mean", "running_var",
                               "num_batches_tracked"]))


def _m_layer_norm(ld, fx_node, mod):
    _emit(ld, fx_node, "layer_norm", [_input(ld, fx_node)],
          {"normalized_shape": tuple(mod.normalized_shape), "eps": mod.eps},
          _module_params(mod, ["weight", "bias"]))


def _m_rms_norm(ld, fx_node, mod):
    _emit(ld, fx_node, "rms_norm", [_input(ld, fx_node)],
          {"normalized_shape": tuple(mod.normalized_shape),
           "eps": None if mod.eps is None else float(mod.eps)},
          _module_params(mod, ["weight"]))


def _m_group_norm(ld, fx_node, mod):
    _emit(ld, fx_node, "group_norm", [_input(ld, fx_node)],
          {"num_groups": mod.num_groups, "num_channels": mod.num_channels, "eps": mod.eps},
          _module_params(mod, ["weight", "bias"]))


def _m_lrn(ld, fx_node, mod):
    if mod.size % 2 == 0:
        # torch's even-size window leans the other way from ONNX's (the canonical one)
        raise _Unmapped("even LRN size")
    _emit(ld, fx_node, "lrn", [_input(ld, fx_node)],
          {"size": mod.size, "alpha": mod.alpha, "beta": mod.beta, "k": mod.k})


def _act(ld, fx_node, name, x=None, **attrs):
    _emit(ld, fx_node, "activation", [_input(ld, fx_node, x)], {"name": name, **attrs})


def _prelu(ld, fx_node, x, weight: np.ndarray, transform: dict | None = None,
           module_path: str | None = None):
    """A PReLU (``nn.PReLU``, ``F.prelu``, graphshape's ``TransformedPReLU``) as a
    leaky_relu whose slopes are learnable: ``learnable_slope`` set, the slopes in
    ``params["weight"]`` (one shared or one per channel), ``negative_slope`` their mean
    (:func:`graphshape.ops.prelu_activation`)."""
    weight = np.asarray(weight)
    if weight.ndim > 1 or weight.size == 0:
        raise _Unmapped("prelu weight is not a vector")
    attrs, params = prelu_activation(weight)
    if transform:
        attrs["transform"] = dict(transform)
    _emit(ld, fx_node, "activation", [_input(ld, fx_node, x)], attrs, params,
          module_path=module_path)


def _m_prelu(ld, fx_node, mod):
    if len(fx_node.args) != 1 or fx_node.kwargs:
        raise _Unmapped("extra arguments")
    _prelu(ld, fx_node, fx_node.args[0], _to_numpy(mod.weight), module_path=fx_node.target)


def _f_prelu(ld, fx_node):
    a = _bind(fx_node, ["input", "weight"], {})
    _prelu(ld, fx_node, a["input"], _param(ld, a["weight"], "prelu weight"),
           module_path=_owner_path(a["weight"]))


def _act_spec(mod) -> tuple[str, dict]:
    """(registry name, attributes) of an activation module; KeyError if not one."""
    t = type(mod)
    if t is nn.LeakyReLU or t is _tm.LeakyReLU:
        return "leaky_relu", {"negative_slope": float(mod.negative_slope)}
    if t is nn.ReLU6:
        return "relu6", {}
    if t is nn.Hardtanh:
        return "hardtanh", {"min_val": float(mod.min_val), "max_val": float(mod.max_val)}
    if t is nn.ELU:
        return "elu", {"alpha": float(mod.alpha)}
    if t is nn.CELU:
        return _celu_name({"alpha": mod.alpha}), {"alpha": 1.0}
    if t is nn.GELU:
        return ("gelu" if mod.approximate == "tanh" else "gelu_exact"), {}
    if t is nn.Softplus:
        if mod.beta != 1 or mod.threshold != 20:
            raise _Unmapped("softplus with beta != 1")
        return "softplus", {}
    if t.__module__ == "timm.layers.activations" and t.__name__ in _TIMM_ACT_MODULES:
        return _TIMM_ACT_MODULES[t.__name__], {}
    return _SIMPLE_ACT_MODULES[t], {}


#: timm's own activation modules (``timm.layers.activations``, what ``act_layer="gelu"``
#: creates), by class name. Traced, they are the torch functions they call; as the ``act``
#: of a fused norm-activation module (BatchNormAct2d, GroupNormAct), they are read here:
#: unknown, the whole module stayed one opaque call that shaping could not remove
#: (efficientformerv2's BatchNormAct2d with timm's GELU).
_TIMM_ACT_MODULES = {"GELU": "gelu_exact", "GELUTanh": "gelu", "Sigmoid": "sigmoid",
                     "Tanh": "tanh", "Swish": "silu", "Mish": "mish", "HardSwish": "hardswish",
                     "HardSigmoid": "hardsigmoid"}


def _m_activation(ld, fx_node, mod):
    name, attrs = _act_spec(mod)
    return _act(ld, fx_node, name, **attrs)


def _m_norm_act(ld, fx_node, mod):
    """timm's BatchNormAct2d / GroupNormAct / FrozenBatchNormAct2d: ``act(drop(norm(x)))``
    as a batch_norm or group_norm node (named after the module, so the emitted module keeps
    its state_dict keys) followed by an activation node; dropout is the identity at
    inference."""
    if len(fx_node.args) != 1 or fx_node.kwargs:
        raise _Unmapped("extra arguments")
    if not isinstance(mod.drop, (nn.Identity, nn.Dropout)):
        raise _Unmapped("unknown drop module")
    act = None if isinstance(mod.act, nn.Identity) else _act_spec(mod.act)
    x = _input(ld, fx_node)
    if isinstance(mod, nn.BatchNorm2d):
        attrs = {"num_features": mod.num_features, "eps": mod.eps, "momentum": mod.momentum,
                 "affine": mod.affine, "track_running_stats": mod.track_running_stats,
                 "dims": 2}
        op, names = "batch_norm", ["weight", "bias", "running_mean", "running_var",
                                   "num_batches_tracked"]
    elif isinstance(mod, nn.GroupNorm):
        attrs = {"num_groups": mod.num_groups, "num_channels": mod.num_channels, "eps": mod.eps}
        op, names = "group_norm", ["weight", "bias"]
    elif type(mod) in _frozen_batch_norm_classes():  # timm's FrozenBatchNormAct2d
        op, attrs, names = "batch_norm", _frozen_batch_norm_attrs(mod), _FROZEN_BATCH_NORM_PARAMS
    else:
        raise _Unmapped("unknown norm-act module")
    norm = ld.add(fx_node, op, [x], attrs, _module_params(mod, names))
    ld.graph[norm.node].meta["module_path"] = fx_node.target
    ld.env[fx_node] = norm
    if act is not None:
        name, act_attrs = act
        ld.env[fx_node] = ld.add(fx_node, "activation", [norm], {"name": name, **act_attrs},
                                 name=ld.graph.unique_name(f"{fx_node.name}_act"))


def _m_norm_activation(ld, fx_node, mod):
    """An EvoNorm / FRN / GRN layer (:func:`_norm_activation_classes`): an opaque call holding
    ``attrs["norm_activation"]``, what shaping leaves in its place (and what the analysis'
    ``rule_norm_activation`` reads)."""
    remainder = norm_activation_remainder(mod)
    ld.opaque(fx_node)
    node = ld.graph[ld.env[fx_node].node]
    node.attrs["norm_activation"] = remainder
    kind = "normalization-activation" if remainder.get("activation") else "normalization"
    node.attrs["description"] = f"{kind} layer {remainder['layer']} ({remainder['formula']})"


_SIMPLE_ACT_MODULES = {nn.ReLU: "relu", nn.SELU: "selu", nn.SiLU: "silu", nn.Mish: "mish",
                       nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid",
                       nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Softsign: "softsign"}


def _m_softmax(ld, fx_node, mod):
    if mod.dim is None:
        raise _Unmapped("implicit softmax dim")
    op = "softmax" if isinstance(mod, nn.Softmax) else "log_softmax"
    _emit(ld, fx_node, op, [_input(ld, fx_node)], {"axis": _axis(ld, fx_node.args[0], mod.dim)})


def _m_dropout(ld, fx_node, mod):
    attrs = {"p": float(mod.p)}
    if type(mod) is not nn.Dropout:
        attrs["variant"] = type(mod).__name__
    _emit(ld, fx_node, "dropout", [_input(ld, fx_node)], attrs)


def _m_stochastic_depth(ld, fx_node, mod):
    _emit(ld, fx_node, "dropout", [_input(ld, fx_node)],
          {"p": float(mod.p), "variant": "StochasticDepth", "mode": mod.mode})


def _m_drop_path(ld, fx_node, mod):
    if not getattr(mod, "scale_by_keep", True) and float(mod.drop_prob) > 0:
        raise _Unmapped("DropPath(scale_by_keep=False)")  # (no StochasticDepth twin)
    _emit(ld, fx_node, "dropout", [_input(ld, fx_node)],
          {"p": float(mod.drop_prob), "variant": "StochasticDepth", "mode": "row"})


def _m_identity(ld, fx_node, mod):
    _emit(ld, fx_node, "identity", [_input(ld, fx_node)])


def _m_flatten(ld, fx_node, mod):
    _flatten(ld, fx_node, fx_node.args[0], mod.start_dim, mod.end_dim)


def _block_move(ld, fx_node, op, x, factor):
    """torch's pixel_shuffle / pixel_unshuffle of an (N, C, H, W) tensor: a
    ``depth_to_space`` / ``space_to_depth`` node in torch's channel order ("CRD"). More
    leading dims (torch takes (*, C, H, W)) stay opaque."""
    if not isinstance(factor, int) or isinstance(factor, bool) or ld.rank(x) != 4:
        raise _Unmapped("pixel (un)shuffle of a tensor other than (N, C, H, W)")
    _emit(ld, fx_node, op, [_input(ld, fx_node, x)], {"blocksize": factor, "mode": "CRD"})


def _m_pixel_shuffle(ld, fx_node, mod):
    _block_move(ld, fx_node, "depth_to_space", fx_node.args[0], mod.upscale_factor)


def _m_pixel_unshuffle(ld, fx_node, mod):
    _block_move(ld, fx_node, "space_to_depth", fx_node.args[0], mod.downscale_factor)


def _pool_attrs(kernel, stride, padding, dims, ceil_mode):
    kernel = _tuple(kernel, dims)
    stride = _tuple(stride if stride not in (None, []) else kernel, dims)
    return {"dims": dims, "kernel_shape": tuple(int(k) for k in kernel),
            "stride": tuple(int(s) for s in stride), "pads": _sym_pads(padding, dims),
            "ceil_mode": bool(ceil_mode)}


_POOL_DIMS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1,
              nn.AvgPool2d: 2, nn.AvgPool3d: 3, nn.AdaptiveAvgPool1d: 1,
              nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
              nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3}


def _m_max_pool(ld, fx_node, mod):
    if mod.return_indices:
        raise _Unmapped("return_indices")
    dims = _POOL_DIMS[type(mod)]
    attrs = _pool_attrs(mod.kernel_size, mod.stride, mod.padding, dims, mod.ceil_mode)
    attrs["dilation"] = tuple(int(d) for d in _tuple(mod.dilation, dims))
    _emit(ld, fx_node, "max_pool", [_input(ld, fx_node)], attrs)


def _m_avg_pool(ld, fx_node, mod):
    if getattr(mod, "divisor_override", None):
        raise _Unmapped("divisor_override")
    dims = _POOL_DIMS[type(mod)]
    attrs = _pool_attrs(mod.kernel_size, mod.stride, mod.padding, dims, mod.ceil_mode)
    attrs["count_include_pad"] = bool(mod.count_include_pad)
    _emit(ld, fx_node, "avg_pool", [_input(ld, fx_node)], attrs)


def _adaptive(ld, fx_node, x, output_size, dims, op):
    size = tuple(None if s is None else int(s) for s in _tuple(output_size, dims))
    _emit(ld, fx_node, op, [_input(ld, fx_node, x)], {"dims": dims, "output_size": size})


#: torch interpolate modes -> (canonical resize mode, the spatial dims the torch mode takes)
_RESIZE_MODES = {"nearest": ("nearest", None), "nearest-exact": ("nearest-exact", None),
                 "linear": ("linear", 1), "bilinear": ("linear", 2), "trilinear": ("linear", 3),
                 "bicubic": ("cubic", 2)}


def _resize(ld, fx_node, x, size, scale_factor, mode, align_corners,
            recompute_scale_factor=None, antialias=False):
    """``F.interpolate`` / ``nn.Upsample`` as a ``resize`` node. ``size`` may be computed
    at run time (``x.shape[-2:]``, as segmentation heads do): its fx values become extra
    inputs, as a dynamic reshape's, so the emitted network still follows its input's size."""
    if mode not in _RESIZE_MODES or not isinstance(antialias, bool):
        raise _Unmapped(f"interpolate mode {mode!r}")  # "area" is adaptive pooling
    canonical, dims = _RESIZE_MODES[mode]
    rank = ld.rank(x)
    if rank is None or rank < 3 or (dims is not None and rank - 2 != dims):
        raise _Unmapped("input rank")
    dims = rank - 2
    attrs = {"dims": dims, "mode": canonical}
    if canonical in ("linear", "cubic"):
        attrs["align_corners"] = bool(align_corners)
        attrs["antialias"] = antialias
    elif align_corners or antialias:
        raise _Unmapped("align_corners / antialias with nearest")
    out = ld.info(fx_node)
    dynamic: list[Ref] = []
    if size is not None:
        if isinstance(size, torch.fx.Node):  # a whole torch.Size (x.shape[2:])
            if ld.is_tensor(size) and ld.has_shapes:
                raise _Unmapped("tensor-valued size")
            dynamic.append(ld.ref(size))
            sizes = dynamic[0]
        else:
            sizes = []
            for s in _tuple(size, dims):
                if isinstance(s, torch.fx.Node):
                    dynamic.append(ld.ref(s))
                    sizes.append(dynamic[-1])
                elif isinstance(s, int):
                    sizes.append(int(s))
                else:
                    raise _Unmapped("size entry")
            sizes = tuple(sizes)
        attrs["sizes"] = sizes
    elif scale_factor is not None and not _has_node(scale_factor):
        if recompute_scale_factor:
            # the coordinates then follow the output size, not the factor
            if out.shape is None:
                raise _Unmapped("recompute_scale_factor without shapes")
            attrs["sizes"] = tuple(int(d) for d in out.shape[2:])
        else:
            attrs["scales"] = tuple(float(f) for f in _tuple(scale_factor, dims))
    else:
        raise _Unmapped("no static size or scale factor")
    if dynamic and out.shape is not None:
        attrs["static_sizes"] = tuple(int(d) for d in out.shape[2:])  # for ONNX
    _emit(ld, fx_node, "resize", [_input(ld, fx_node, x), *dynamic], attrs)


def _m_upsample(ld, fx_node, mod):
    if len(fx_node.args) != 1 or fx_node.kwargs:
        raise _Unmapped("extra arguments")
    _resize(ld, fx_node, fx_node.args[0], mod.size, mod.scale_factor, mod.mode,
            mod.align_corners, getattr(mod, "recompute_scale_factor", None))


def _f_interpolate(ld, fx_node):
    a = _bind(fx_node, ["input", "size", "scale_factor", "mode", "align_corners",
                        "recompute_scale_factor", "antialias"],
              {"size": None, "scale_factor": None, "mode": "nearest", "align_corners": None,
               "recompute_scale_factor": None, "antialias": False})
    if _has_node([a["mode"], a["align_corners"], a["recompute_scale_factor"], a["antialias"]]):
        raise _Unmapped("dynamic flags")
    _resize(ld, fx_node, a["input"], a["size"], a["scale_factor"], a["mode"], a["align_corners"],
            a["recompute_scale_factor"], a["antialias"])


def _m_adaptive_avg(ld, fx_node, mod):
    _adaptive(ld, fx_node, fx_node.args[0], mod.output_size, _POOL_DIMS[type(mod)],
              "adaptive_avg_pool")


def _m_adaptive_max(ld, fx_node, mod):
    if mod.return_indices:
        raise _Unmapped("return_indices")
    _adaptive(ld, fx_node, fx_node.args[0], mod.output_size, _POOL_DIMS[type(mod)],
              "adaptive_max_pool")


def _m_pad(ld, fx_node, mod):
    mode = {nn.ZeroPad1d: "constant", nn.ZeroPad2d: "constant", nn.ZeroPad3d: "constant",
            nn.ConstantPad1d: "constant", nn.ConstantPad2d: "constant",
            nn.ConstantPad3d: "constant", nn.ReflectionPad1d: "reflect",
            nn.ReflectionPad2d: "reflect", nn.ReflectionPad3d: "reflect",
            nn.ReplicationPad1d: "replicate", nn.ReplicationPad2d: "replicate",
            nn.ReplicationPad3d: "replicate"}[type(mod)]
    _pad(ld, fx_node, fx_node.args[0], mod.padding, mode, getattr(mod, "value", 0.0))


#: (module class, handler); matched on the exact type (a subclass may change forward)
MODULE_OPS: list[tuple[type, Callable]] = [
    *[(c, _m_conv) for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d)],
    *[(c, _m_conv_transpose) for c in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)],
    (nn.Linear, _m_linear),
    *[(c, _m_batch_norm) for c in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)],
    *[(c, _m_instance_norm) for c in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)],
    (nn.LayerNorm, _m_layer_norm), (nn.GroupNorm, _m_group_norm),
    *([(nn.RMSNorm, _m_rms_norm)] if hasattr(nn, "RMSNorm") else []),  # torch >= 2.4
    (nn.LocalResponseNorm, _m_lrn),
    *[(c, _m_activation) for c in (nn.LeakyReLU, nn.ReLU6, nn.Hardtanh, nn.ELU, nn.CELU,
                                   nn.GELU, nn.Softplus, *_SIMPLE_ACT_MODULES)],
    (nn.PReLU, _m_prelu),
    *[(c, _m_upsample) for c in (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)],
    (nn.Softmax, _m_softmax), (nn.LogSoftmax, _m_softmax),
    *[(c, _m_dropout) for c in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                                nn.AlphaDropout)],
    (nn.Identity, _m_identity), (nn.Flatten, _m_flatten),
    (nn.PixelShuffle, _m_pixel_shuffle), (nn.PixelUnshuffle, _m_pixel_unshuffle),
    *[(c, _m_max_pool) for c in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)],
    *[(c, _m_avg_pool) for c in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)],
    *[(c, _m_adaptive_avg) for c in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)],
    *[(c, _m_adaptive_max) for c in (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)],
    *[(c, _m_pad) for c in (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d,
                            nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d,
                            nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
                            nn.ReplicationPad2d, nn.ReplicationPad3d)],
]


# -- graphshape's own emitted modules (re-loading a shaped model): each maps back to the
# canonical IR node backend_torch built it from, so a shaped model analyzes, re-shapes and
# exports like the original rather than as opaque addcmul/threshold calls
def _m_gs_transformed_activation(ld, fx_node, mod):
    _act(ld, fx_node, mod.name, **mod.attrs, transform=dict(mod.transform))


def _m_gs_transformed_prelu(ld, fx_node, mod):
    _prelu(ld, fx_node, fx_node.args[0], _to_numpy(mod.weight), transform=mod.transform,
           module_path=fx_node.target)


def _m_gs_activation(ld, fx_node, mod):
    _act(ld, fx_node, mod.name, **mod.attrs)


def _m_gs_weighted_sum(ld, fx_node, mod):
    if fx_node.kwargs or not fx_node.args:
        raise _Unmapped("unexpected arguments")
    xs = [_input(ld, fx_node, v) for v in fx_node.args]
    attrs = {} if mod.weights is None else {"weights": tuple(mod.weights)}
    _emit(ld, fx_node, "sum", xs, attrs)


def _m_gs_scaled_layer(plain_handler):
    """A graphshape scaled conv / linear (passes.fold, mode "weights"): the plain layer's
    node with its ``weight_scale`` / ``bias_scale`` attributes."""
    def handler(ld, fx_node, mod):
        plain_handler(ld, fx_node, mod)
        node = ld.graph[ld.env[fx_node].node]
        for key in ("weight_scale", "bias_scale"):
            if getattr(mod, key) != 1.0:
                node.attrs[key] = float(getattr(mod, key))
    return handler


def _m_gs_affine(ld, fx_node, mod):
    _emit(ld, fx_node, "affine", [_input(ld, fx_node)], {"axis": mod.axis},
          _module_params(mod, ["scale", "shift"]), module_path=fx_node.target)


def _m_gs_lrn(ld, fx_node, mod):
    # graphshape's LocalResponseNorm uses ONNX's (canonical) window for every size
    _emit(ld, fx_node, "lrn", [_input(ld, fx_node)],
          {"size": mod.size, "alpha": mod.alpha, "beta": mod.beta, "k": mod.k})


def _m_gs_std_norm(ld, fx_node, mod):
    _emit(ld, fx_node, "std_norm", [_input(ld, fx_node)],
          {"normalized_shape": mod.normalized_shape, "eps": mod.eps, "centre": mod.centre,
           "correction": mod.correction, "eps_added_to": mod.eps_added_to})


_GRAPHSHAPE_MODULE_OPS = [
    (_tm.TransformedActivation, _m_gs_transformed_activation),
    (_tm.Activation, _m_gs_activation),
    (_tm.TransformedPReLU, _m_gs_transformed_prelu),
    (_tm.WeightedSum, _m_gs_weighted_sum),
    (_tm.Affine, _m_gs_affine),
    (_tm.LocalResponseNorm, _m_gs_lrn),
    (_tm.StdNorm, _m_gs_std_norm),
    (_tm.FrozenBatchNorm, _m_frozen_batch_norm),
    (_tm.LeakyReLU, _m_activation),  # a folded TReLU read by other layers too
    *[(c, _m_gs_scaled_layer(_m_conv)) for c in (_tm.ScaledConv1d, _tm.ScaledConv2d,
                                                  _tm.ScaledConv3d)],
    *[(c, _m_gs_scaled_layer(_m_conv_transpose))
      for c in (_tm.ScaledConvTranspose1d, _tm.ScaledConvTranspose2d, _tm.ScaledConvTranspose3d)],
    (_tm.ScaledLinear, _m_gs_scaled_layer(_m_linear)),
]
#: graphshape.torch_modules classes traced as fx leaves and mapped by the handlers above
_GRAPHSHAPE_MODULES = tuple(c for c, _ in _GRAPHSHAPE_MODULE_OPS)
MODULE_OPS.extend(_GRAPHSHAPE_MODULE_OPS)
_SD = _stochastic_depth_class()
if _SD is not None:
    MODULE_OPS.append((_SD, _m_stochastic_depth))
_MODULE_HANDLERS = dict(MODULE_OPS)


# -- shared helpers for functions and methods
def _axis(ld, x, axis) -> int:
    if not isinstance(axis, int):
        raise _Unmapped("axis is not an int")
    r = ld.rank(x)
    if axis < 0:
        if r is None:
            return axis
        axis += r
    return axis


def _flatten(ld, fx_node, x, start, end):
    if not (isinstance(start, int) and isinstance(end, int)):
        raise _Unmapped("dynamic flatten dims")
    r = ld.rank(x)
    if r is not None:
        start, end = start % max(r, 1), end % max(r, 1)
    _emit(ld, fx_node, "flatten", [_input(ld, fx_node, x)], {"start_dim": start, "end_dim": end})


def _f_block_move(op, factor_name):
    def mapper(ld, fx_node):
        a = _bind(fx_node, ["input", factor_name], {})
        _block_move(ld, fx_node, op, a["input"], a[factor_name])
    return mapper


def _pad(ld, fx_node, x, pad, mode, value):
    r = ld.rank(x)
    pad = _tuple(pad, 1)
    if r is None or _has_node(pad) or len(pad) % 2 or len(pad) // 2 > r:
        raise _Unmapped("pad needs a known rank")
    if mode == "circular":
        raise _Unmapped("circular pad")
    begin, end = [0] * r, [0] * r
    for i in range(len(pad) // 2):
        begin[r - 1 - i], end[r - 1 - i] = int(pad[2 * i]), int(pad[2 * i + 1])
    _emit(ld, fx_node, "pad", [_input(ld, fx_node, x)],
          {"pads": tuple(begin + end), "mode": {"replicate": "edge"}.get(mode, mode),
           "value": float(value or 0.0)})


def _shape_args(args) -> tuple:
    """view(*shape) / view(shape): the shape tuple (may hold fx nodes)."""
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return tuple(args[0])
    if len(args) == 1 and isinstance(args[0], torch.fx.Node):
        raise _Unmapped("shape is a traced value")
    return tuple(args)


#: tensor methods and functions whose output depends on their tensor argument's shape,
#: dtype and device only
_METADATA_METHODS = frozenset({"new_empty", "new_zeros", "new_ones", "new_full",
                               "new_empty_strided", "new_tensor"})
_METADATA_FUNCTIONS = frozenset({torch.empty_like, torch.zeros_like, torch.ones_like,
                                 torch.full_like, torch.rand_like, torch.randn_like,
                                 torch.randint_like})


def _calls(op: str | None, target, methods: frozenset, functions: frozenset) -> bool:
    """Whether a call (fx ``op`` and ``target``) is a method of ``methods`` or a function of
    ``functions``."""
    if op == "call_method":
        return target in methods
    return op == "call_function" and target in functions


def _reads_metadata_only(fx_node) -> bool:
    return _calls(fx_node.op, fx_node.target, _METADATA_METHODS, _METADATA_FUNCTIONS)


_DATA_MOVEMENT_METHODS = frozenset({"roll", "flip", "narrow", "expand", "expand_as",
                                    "reshape_as", "view_as"})
_DATA_MOVEMENT_FUNCTIONS = frozenset({torch.roll, torch.flip, torch.narrow})
#: average pools left opaque (a window computed from the input's size: the CIFAR ResNet's
#: ``F.avg_pool2d(out, out.size()[3])``): linear maps of the entries, which the analysis
#: takes as the identity as it does its pools, so they count as moving data here
_AVERAGING_FUNCTIONS = frozenset({F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                                  F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                                  F.adaptive_avg_pool3d})


def _moves_data_only(fx_node) -> bool:
    """torch.roll / flip / narrow, Tensor.expand, ``x.reshape_as(y)`` / ``view_as``
    (LeViT's ``bn(x.flatten(0, 1)).reshape_as(x)``: y gives a shape only), a tensor indexed
    by slices and ints (a crop whose ends are computed: ``x[:, :H, :W]`` after a pad),
    ``F.pad`` with zeros (by computed amounts): what stays opaque of them carries its
    input's entries only; and average pools by computed windows (their averages)."""
    target = fx_node.target
    if _calls(fx_node.op, target, _DATA_MOVEMENT_METHODS,
              _DATA_MOVEMENT_FUNCTIONS | _AVERAGING_FUNCTIONS):
        return True
    if fx_node.op == "call_function" and target is _tm.pad_same:
        return True  # zeros around (a shaped model's timm StdConv2dSame, read again)
    if fx_node.op != "call_function":
        return False
    if target is F.pad:
        mode = fx_node.kwargs.get("mode", fx_node.args[2] if len(fx_node.args) > 2 else "constant")
        value = fx_node.kwargs.get("value", fx_node.args[3] if len(fx_node.args) > 3 else None)
        return mode == "constant" and value in (None, 0, 0.0)
    if target is operator.getitem and len(fx_node.args) == 2:
        meta = fx_node.args[0].meta.get("tensor_meta") if isinstance(
            fx_node.args[0], torch.fx.Node) else None
        index = fx_node.args[1] if isinstance(fx_node.args[1], tuple) else (fx_node.args[1],)
        # the batch axis kept whole (x[0], x[:2], x[None] would change what the examples are)
        first = index[0] if index else Ellipsis
        if not (first is Ellipsis or first == slice(None)):
            return False
        return isinstance(meta, TensorMetadata) and all(
            isinstance(i, (slice, int, torch.fx.Node, type(None), type(Ellipsis)))
            and not (isinstance(i, torch.fx.Node)
                     and isinstance(i.meta.get("tensor_meta"), TensorMetadata))
            for i in index)
    return False


#: Tensor.view / view_as left opaque (their shape computed: ``x.view(x.size()[:-2] + (c,))``)
#: are called as reshape / reshape_as: ``.contiguous()`` before them is the identity in the
#: graph, so the emitted view could meet a permuted tensor ("view size is not compatible
#: with input tensor's size and stride": Hugging Face's Swin V2 and GLPN attention)
_VIEW_AS_RESHAPE = {"view": "reshape", "view_as": "reshape_as"}

#: functions called for what they do: they raise when a condition fails
_CHECKS = frozenset({torch._assert, _tm.check_traced_branch})

#: tensor methods and functions that draw random numbers
_RANDOM_METHODS = frozenset({"bernoulli", "bernoulli_", "uniform_", "normal_", "random_",
                             "exponential_", "geometric_", "cauchy_", "log_normal_"})
_RANDOM_FUNCTIONS = frozenset({torch.rand, torch.randn, torch.randint, torch.rand_like,
                               torch.randn_like, torch.randint_like, torch.bernoulli,
                               torch.multinomial, torch.normal, torch.randperm})


def _draws_random(node) -> bool:
    """An opaque call that draws random numbers (a hand-written drop path's mask, noise)."""
    return _calls(node.attrs.get("fx_op"), node.attrs.get("target"), _RANDOM_METHODS,
                  _RANDOM_FUNCTIONS)


def _reshape(ld, fx_node, x, shape):
    dyn = []
    entries = []
    for s in shape:
        if isinstance(s, torch.fx.Node):
            if ld.is_tensor(s) and ld.has_shapes:
                raise _Unmapped("tensor-valued dim")
            r = ld.ref(s)
            dyn.append(r)
            entries.append(r)
        elif isinstance(s, int):
            entries.append(int(s))
        else:
            raise _Unmapped("shape entry")
    attrs = {"shape": tuple(entries)}
    out = ld.info(fx_node)
    if dyn and out.shape is not None:
        # the shape this reshape produced for the example inputs, for backends that need a
        # static one (ONNX); torch re-emits the dynamic form
        attrs["static_shape"] = tuple(out.shape)
    _emit(ld, fx_node, "reshape", [_input(ld, fx_node, x), *dyn], attrs)


def _permute(ld, fx_node, x, dims):
    dims = tuple(dims)
    if not all(isinstance(d, int) for d in dims):
        raise _Unmapped("dynamic perm")
    r = len(dims)
    _emit(ld, fx_node, "transpose", [_input(ld, fx_node, x)], {"perm": tuple(d % r for d in dims)})


def _transpose(ld, fx_node, x, d0, d1):
    r = ld.rank(x)
    if r is None or not (isinstance(d0, int) and isinstance(d1, int)):
        raise _Unmapped("transpose needs a known rank")
    perm = list(range(r))
    perm[d0 % r], perm[d1 % r] = perm[d1 % r], perm[d0 % r]
    _emit(ld, fx_node, "transpose", [_input(ld, fx_node, x)], {"perm": tuple(perm)})


def _axes(ld, x, dim):
    """torch's ``dim`` argument (an int or a sequence of ints) as sorted non-negative axes
    of ``x``; None when ``dim`` is None (all axes)."""
    if dim is None:
        return None
    dims = _tuple(dim, 1)
    if not all(isinstance(d, int) for d in dims):
        raise _Unmapped("dynamic dim")
    r = ld.rank(x)
    if r is None and any(d < 0 for d in dims):
        raise _Unmapped("negative dim, rank unknown")
    return tuple(sorted(d % r if r else d for d in dims))


def _squeeze(ld, fx_node, x, dim):
    _emit(ld, fx_node, "squeeze", [_input(ld, fx_node, x)], {"axes": _axes(ld, x, dim)})


def _unsqueeze(ld, fx_node, x, dim):
    if not isinstance(dim, int):
        raise _Unmapped("dynamic dim")
    r = ld.rank(x)
    if dim < 0:
        if r is None:
            raise _Unmapped("negative dim, rank unknown")
        dim += r + 1
    _emit(ld, fx_node, "unsqueeze", [_input(ld, fx_node, x)], {"axes": (dim,)})


def _split(ld, fx_node, x, sizes_or_chunks, dim, chunk: bool):
    info = ld.info(x) if isinstance(x, torch.fx.Node) else None
    if info is None or info.shape is None or not isinstance(dim, int) or _has_node(sizes_or_chunks):
        raise _Unmapped("split needs known shapes")
    dim %= len(info.shape)
    n = info.shape[dim]
    if chunk:
        step = -(-n // int(sizes_or_chunks))
        sizes = [step] * (n // step) + ([n % step] if n % step else [])
    elif isinstance(sizes_or_chunks, int):
        sizes = [sizes_or_chunks] * (n // sizes_or_chunks) + (
            [n % sizes_or_chunks] if n % sizes_or_chunks else [])
    else:
        sizes = [int(s) for s in sizes_or_chunks]
    metas = fx_node.meta.get("tensor_meta")
    outputs = [_info(m) for m in metas] if isinstance(metas, (list, tuple)) else None
    if outputs is None or len(outputs) != len(sizes):
        raise _Unmapped("split output structure")
    ref = ld.add(fx_node, "split", [_input(ld, fx_node, x)], {"axis": dim, "sizes": tuple(sizes)},
                 outputs=outputs)
    ld.env[fx_node] = _Multi(ref.node, len(sizes))


#: torch's floating dtypes -> the canonical cast's names
_FLOAT_DTYPES = {getattr(torch, name): name for name in FLOAT_DTYPES}


def _dtype_arg(v) -> torch.dtype | None:
    """A dtype argument: a ``torch.dtype``, or ``y.dtype`` (fx ``getattr(y, "dtype")``)
    where ShapeProp recorded ``y``'s dtype (LlamaRMSNorm's ``.to(input_dtype)``)."""
    if isinstance(v, torch.dtype):
        return v
    if (isinstance(v, torch.fx.Node) and v.op == "call_function" and v.target is getattr
            and v.args[1:] == ("dtype",) and isinstance(v.args[0], torch.fx.Node)):
        meta = v.args[0].meta.get("tensor_meta")
        return meta.dtype if isinstance(meta, TensorMetadata) else None
    return None


def _cast(ld, fx_node, x, dtype) -> None:
    """A conversion between floating dtypes (``x.to(torch.float32)``, ``x.float()``,
    ``x.type_as(y)``): the canonical cast. Other conversions stay calls."""
    target = _FLOAT_DTYPES.get(dtype)
    if target is None or not ld.is_tensor(x) or is_non_float(ld.info(x).dtype):
        raise _Unmapped("not a cast between floating dtypes")
    _emit(ld, fx_node, "cast", [_input(ld, fx_node, x)], {"dtype": target})


def _m_to(ld, fx_node):
    """``x.to(dtype)``, ``x.to(dtype=...)``, ``x.to(y.dtype)``; a device, a tensor or
    ``copy=True`` stays a call."""
    args, kwargs = list(fx_node.args[1:]), dict(fx_node.kwargs)
    dtype = kwargs.pop("dtype", None)
    if dtype is None and len(args) == 1:
        dtype = args.pop()
    if args or set(kwargs) - {"non_blocking", "copy"} or kwargs.get("copy"):
        raise _Unmapped("to() with a device or copy")
    _cast(ld, fx_node, fx_node.args[0], _dtype_arg(dtype))
    if isinstance(dtype, torch.fx.Node) and len(dtype.users) == 1:
        # the y.dtype call read only for this cast: no longer needed
        entry = ld.env.get(dtype)
        if isinstance(entry, Ref) and not ld.graph.users(entry.node):
            ld.graph.remove(entry.node)


def _m_cast_to(dtype):
    def h(ld, fx_node):
        if len(fx_node.args) != 1 or fx_node.kwargs:
            raise _Unmapped("arguments")
        _cast(ld, fx_node, fx_node.args[0], dtype)
    return h


def _m_type_as(ld, fx_node):
    x, other = fx_node.args[:2]
    meta = other.meta.get("tensor_meta") if isinstance(other, torch.fx.Node) else None
    _cast(ld, fx_node, x, meta.dtype if isinstance(meta, TensorMetadata) else None)


#: the most pieces an unbind is mapped into (one squeeze node each); more stay one call
_MAX_UNBIND = 64


def _f_unbind(ld, fx_node):
    """``x.unbind(dim)`` (timm attention's ``q, k, v = qkv.unbind(0)``): a split into size-1
    pieces and a squeeze of each, as the ONNX exporters write it; opaque, it ended the
    analysis' view of q, k and v."""
    a = _bind(fx_node, ["input", "dim"], {"dim": 0})
    x, dim = a["input"], a["dim"]
    info = ld.info(x) if isinstance(x, torch.fx.Node) else None
    metas = fx_node.meta.get("tensor_meta")
    if (info is None or info.shape is None or not isinstance(dim, int)
            or not isinstance(metas, (list, tuple))):
        raise _Unmapped("unbind needs known shapes")
    dim %= len(info.shape)
    count = info.shape[dim]
    if not isinstance(count, int) or not 0 < count <= _MAX_UNBIND or len(metas) != count:
        raise _Unmapped("unbind size")
    piece = TensorInfo((*info.shape[:dim], 1, *info.shape[dim + 1:]), info.dtype)
    split = ld.add(fx_node, "split", [_input(ld, fx_node, x)],
                   {"axis": dim, "sizes": (1,) * count}, outputs=[piece] * count,
                   name=ld.graph.unique_name(f"{fx_node.name}_split"))
    refs = [ld.add(fx_node, "squeeze", [Ref(split.node, i)], {"axes": (dim,)},
                   outputs=[_info(metas[i])], name=ld.graph.unique_name(f"{fx_node.name}_{i}"))
            for i in range(count)]
    ld.env[fx_node] = _Multi(split.node, count, refs)


def _reduce(ld, fx_node, kind, x, dim, keepdim, dtype=None):
    if dtype is not None:
        raise _Unmapped("dtype")
    _emit(ld, fx_node, "reduce", [_input(ld, fx_node, x)],
          {"kind": kind, "axes": None if dim in ((), []) else _axes(ld, x, dim),  # () is all
           "keepdims": bool(keepdim)})


def _binary(ld, fx_node, op, a, b, alpha=1):
    if ld.has_shapes and not ld.is_tensor(fx_node):
        raise _Unmapped("not a tensor operation")
    tensors = [v for v in (a, b) if isinstance(v, torch.fx.Node)]
    if not tensors or not all(ld.is_tensor(v) for v in tensors):
        raise _Unmapped("operand is not a tensor")
    like = ld.info(tensors[0])
    refs = []
    for v in (a, b):
        if isinstance(v, torch.fx.Node):
            refs.append(ld.ref(v))
        elif isinstance(v, (int, float, bool)):
            refs.append(None)
        else:
            raise _Unmapped("operand type")
    if alpha != 1 and op != "add":
        raise _Unmapped("alpha")
    # scalars become 0-d constant nodes (created last so a fallback leaves nothing behind)
    refs = [r if r is not None else ld.scalar_constant(fx_node.name, v, like)
            for r, v in zip(refs, (a, b))]
    attrs = {"alpha": float(alpha)} if alpha != 1 else {}
    _emit(ld, fx_node, op, refs, attrs)


#: methods whose result may share its argument's memory (a view, or the tensor itself when
#: there is nothing to do: ``x.contiguous()``, ``x.float()`` of a float tensor)
_ALIASING_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze",
    "unsqueeze", "transpose", "permute", "t", "expand", "expand_as", "narrow", "select",
    "unbind", "split", "split_with_sizes", "chunk", "tensor_split", "unfold", "diagonal",
    "movedim", "moveaxis", "swapaxes", "swapdims", "as_strided", "detach", "contiguous", "to",
    "type", "type_as", "float", "double", "half", "bfloat16", "cpu", "cuda", "__getitem__",
    "requires_grad_", "real", "imag"})
_ALIASING_FUNCTIONS = frozenset({
    operator.getitem, torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze,
    torch.transpose, torch.permute, torch.narrow, torch.select, torch.unbind, torch.split,
    torch.chunk, torch.tensor_split, torch.movedim, torch.moveaxis, torch.swapaxes,
    torch.diagonal, torch.as_strided, torch.detach, torch.t, torch.real, torch.imag})
_ALIASING_KEYS = frozenset(map(_key, _ALIASING_FUNCTIONS))
#: attributes that are views (``x.T``, ``x.data``)
_ALIASING_ATTRIBUTES = frozenset({"T", "mT", "H", "mH", "data", "real", "imag"})
#: modules that may hand their input back (in eval mode, or always)
_ALIASING_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                     nn.AlphaDropout, nn.Flatten, nn.Unflatten)


def _may_alias(ld, node: torch.fx.Node) -> bool:
    """Whether ``node``'s value may share memory with its first argument's."""
    if node.op == "call_method":
        return node.target in _ALIASING_METHODS or _returns_self(node)
    if node.op == "call_function":
        if node.target is getattr:
            return len(node.args) > 1 and node.args[1] in _ALIASING_ATTRIBUTES
        return _key(node.target) in _ALIASING_KEYS
    if node.op == "call_module":
        mod = ld.gm.get_submodule(node.target)
        return isinstance(mod, _ALIASING_MODULES) or type(mod) in _drop_path_classes()
    return False


def _alias_base(ld, node: torch.fx.Node) -> torch.fx.Node:
    """The value whose memory ``node`` may share, following views and in-place results back
    (:func:`_may_alias`): ``node`` itself where it is not one."""
    while _may_alias(ld, node) and node.args and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return node


def _made_by_forward(ld, node: torch.fx.Node) -> bool:
    """Whether get_attr ``node`` is a tensor fx stored on the root while tracing (a tensor the
    forward made of constants, ``_tensor_constant0``), not one of the model's own: the
    source makes it anew at each call, so writing into it changes nothing else."""
    owned = itertools.chain(ld.module.named_parameters(), ld.module.named_buffers())
    return node.target.startswith("_tensor_constant") and node.target not in dict(owned)


def _assignment_seen_elsewhere(ld, fx_node, target) -> str | None:
    """Why ``target[key] = value`` (``fx_node``) cannot be read as a new value of ``target``
    alone: the memory it writes is the model's input or state, or another view of that
    memory made before it is read after it (``v = x[:, 0]; x[0] = 1; v + 1``); None if
    nothing else sees the change."""
    base = _alias_base(ld, target)
    if base.op == "placeholder":
        return f"writes into the model's input {base.name!r}, which its caller would see"
    position = ld.order[fx_node]
    roots = [base]
    if base.op == "get_attr":
        if not _made_by_forward(ld, base):
            return f"writes into the model's parameter or buffer {base.target!r}"
        # fx reads such a tensor through a get_attr node per use: they are one memory
        roots = [n for n in ld.gm.graph.nodes if n.op == "get_attr" and n.target == base.target]
        later = [n for n in roots if ld.order[n] > position]
        if target is not base and later:
            return (f"writes into a view of {base.target}, which {later[0].name} reads "
                    "after it")
    views, todo = set(roots), list(roots)
    while todo:  # the base and every view of it (views of views too)
        for user in todo.pop().users:
            if user not in views and _may_alias(ld, user) and user.args and user.args[0] in views:
                views.add(user)
                todo.append(user)
    for view in sorted(views, key=ld.order.__getitem__):
        if view is target or ld.order[view] > position:
            continue  # target's later readers read the new value; later views are made of it
        later = [u for u in view.users if ld.order[u] > position]
        if later:
            return (f"writes into memory that {view.name} shares, and {later[0].name} reads "
                    f"{view.name} after it")
    return None


def _inplace_result(ld, fx_node, mutated, state_update: bool = True):
    """After an in-place op on ``mutated``, later readers of it see the op's result. An
    activation records ``inplace=True`` (the torch backend emits it out of place). An update
    of one of the model's buffers (a running statistic: ``self.avg.mul_(m).add_(...)``) by
    an op read out of place is noted in ``ld.state_updates`` (``state_update``): the IR has
    no state, so the shaped model reads the buffer as it was when shaped, at every call
    (later reads of the buffer in the same call read the new value, as in the source's
    first call)."""
    ref = ld.env.get(fx_node)
    if isinstance(ref, Ref) and ld.graph[ref.node].op == "activation":
        ld.graph[ref.node].attrs["inplace"] = True
    if not isinstance(mutated, torch.fx.Node) or fx_node not in ld.env:
        return
    same = mutated
    while True:  # mutated, and what it is the same tensor as: x.mul_(m).add_(y) updates x
        if any(ld.order[u] > ld.order[fx_node] for u in same.users):
            ld.env[same] = ld.env[fx_node]
        if not (_returns_self(same) and same.args and isinstance(same.args[0], torch.fx.Node)):
            break
        same = same.args[0]
    base = _alias_base(ld, same)
    if state_update and base.op == "get_attr" and not _made_by_forward(ld, base):
        ld.state_updates.setdefault(base.target, []).append(fx_node.name)
        if base is same:
            ld._assigned_constants[base.target] = ld.env[fx_node]


def _returns_self(node: torch.fx.Node) -> bool:
    """An in-place Tensor method (``x.add_(y)`` returns ``x``)."""
    return (node.op == "call_method" and node.target.endswith("_")
            and not node.target.startswith("__"))


def _with_inplace(handler, arg_index=0):
    def wrapped(ld, fx_node, *extra):
        handler(ld, fx_node, *extra)
        _inplace_result(ld, fx_node, fx_node.args[arg_index] if fx_node.args else None)
    return wrapped


# -- functions
def _f_conv(dims):
    def h(ld, fx_node):
        a = _bind(fx_node, ["input", "weight", "bias", "stride", "padding", "dilation", "groups"],
                  {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
        w = _param(ld, a["weight"], "weight")
        params = {"weight": w}
        b = _param(ld, a["bias"], "bias")
        if b is not None:
            params["bias"] = b
        kernel = tuple(w.shape[2:])
        dil = tuple(_tuple(a["dilation"], dims))
        attrs = {"dims": dims, "in_channels": w.shape[1] * a["groups"], "out_channels": w.shape[0],
                 "kernel_shape": kernel, "stride": tuple(_tuple(a["stride"], dims)),
                 "pads": _conv_pads(a["padding"], kernel, dil, dims), "dilation": dil,
                 "groups": int(a["groups"]), "padding_mode": "zeros"}
        _emit(ld, fx_node, "conv", [_input(ld, fx_node, a["input"])], attrs, params,
              _owner_path(a["weight"]))
    return h


def _f_linear(ld, fx_node):
    a = _bind(fx_node, ["input", "weight", "bias"], {"bias": None})
    w = _param(ld, a["weight"], "weight")
    params = {"weight": w}
    b = _param(ld, a["bias"], "bias")
    if b is not None:
        params["bias"] = b
    _emit(ld, fx_node, "linear", [_input(ld, fx_node, a["input"])],
          {"in_features": w.shape[1], "out_features": w.shape[0]}, params,
          _owner_path(a["weight"]))


def _f_layer_norm(ld, fx_node):
    a = _bind(fx_node, ["input", "normalized_shape", "weight", "bias", "eps"],
              {"weight": None, "bias": None, "eps": 1e-5})
    params = {k: v for k in ("weight", "bias")
              if (v := _param(ld, a[k], k)) is not None}
    _emit(ld, fx_node, "layer_norm", [_input(ld, fx_node, a["input"])],
          {"normalized_shape": tuple(int(s) for s in _tuple(a["normalized_shape"])),
           "eps": float(a["eps"])}, params, _owner_path(a["weight"]))


def _f_rms_norm(ld, fx_node):
    a = _bind(fx_node, ["input", "normalized_shape", "weight", "eps"],
              {"weight": None, "eps": None})
    params = {"weight": w} if (w := _param(ld, a["weight"], "weight")) is not None else {}
    _emit(ld, fx_node, "rms_norm", [_input(ld, fx_node, a["input"])],
          {"normalized_shape": tuple(int(s) for s in _tuple(a["normalized_shape"])),
           "eps": None if a["eps"] is None else float(a["eps"])}, params,
          _owner_path(a["weight"]))


def _f_batch_norm(ld, fx_node):
    a = _bind(fx_node, ["input", "running_mean", "running_var", "weight", "bias", "training",
                        "momentum", "eps"],
              {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5})
    if not isinstance(a["training"], bool) or not isinstance(a["eps"], (int, float)) \
            or _has_node(a["momentum"]):
        raise _Unmapped("traced flags")
    params = {k: v for k in ("weight", "bias", "running_mean", "running_var")
              if (v := _param(ld, a[k], k)) is not None}
    if ("running_mean" in params) != ("running_var" in params) or (
            not a["training"] and "running_mean" not in params):
        raise _Unmapped("running statistics")
    owner_path = _owner_path(a["weight"]) or _owner_path(a["running_mean"], "running_mean")
    owner = None
    if owner_path is not None:
        try:
            owner = ld.module.get_submodule(owner_path)  # the traced copy keeps only tensors
        except AttributeError:
            owner = None
    # a module that calls F.batch_norm itself (timm's BatchNormAct2d) passes momentum 0 when
    # traced in eval mode; its own momentum is the one that matters once it trains
    momentum = getattr(owner, "momentum", a["momentum"])
    if isinstance(getattr(owner, "num_batches_tracked", None), torch.Tensor):
        params["num_batches_tracked"] = _to_numpy(owner.num_batches_tracked)
    info = ld.info(a["input"])
    channels = next((len(v) for v in params.values() if v.ndim == 1), None) or (
        info.shape[1] if info.shape else None)
    if channels is None:
        raise _Unmapped("channel count unknown")
    _emit(ld, fx_node, "batch_norm", [_input(ld, fx_node, a["input"])],
          {"num_features": int(channels), "eps": float(a["eps"]), "momentum": momentum,
           "affine": "weight" in params, "track_running_stats": "running_mean" in params},
          params, owner_path)


def _f_group_norm(ld, fx_node):
    a = _bind(fx_node, ["input", "num_groups", "weight", "bias", "eps"],
              {"weight": None, "bias": None, "eps": 1e-5})
    params = {k: v for k in ("weight", "bias")
              if (v := _param(ld, a[k], k)) is not None}
    info = ld.info(a["input"])
    channels = info.shape[1] if info.shape else (len(params["weight"]) if params else None)
    if channels is None:
        raise _Unmapped("channel count unknown")
    _emit(ld, fx_node, "group_norm", [_input(ld, fx_node, a["input"])],
          {"num_groups": int(a["num_groups"]), "num_channels": int(channels),
           "eps": float(a["eps"])}, params, _owner_path(a["weight"]))


def _f_act(name, names=("input",), defaults=None, attrs_of=None):
    defaults = dict(defaults or {})

    def h(ld, fx_node):
        a = _bind(fx_node, list(names), defaults)
        attrs = attrs_of(a) if attrs_of else {}
        _act(ld, fx_node, name if isinstance(name, str) else name(a), a["input"], **attrs)
        if a.get("inplace") or getattr(fx_node.target, "__name__", "").endswith("_"):
            _inplace_result(ld, fx_node, a["input"])
    return h


def _celu_name(a):
    """CELU with alpha 1 is ELU with alpha 1 (max(0, x) + min(0, alpha (e^(x / alpha) - 1)));
    another alpha, alpha * elu(x / alpha), has no registry form: it stays opaque."""
    if float(a["alpha"]) != 1.0:
        raise _Unmapped("celu with alpha != 1")
    return "elu"


def _softplus_name(a):
    if a["beta"] != 1 or a["threshold"] != 20:
        raise _Unmapped("softplus beta")
    return "softplus"


def _f_clamp(names):
    """``torch.clamp`` / ``clip`` / ``clamp_min`` (and their Tensor methods, whose tensor
    argument binds as ``input`` too) with constant bounds that make an activation:
    ``clamp(min=0)`` is relu, ``clamp(0, 6)`` relu6, ``clamp(a, b)`` hardtanh(a, b). Other
    bounds (``clamp(min=eps)`` before a sqrt) stay opaque."""
    def h(ld, fx_node):
        a = _bind(fx_node, list(names), {"min": None, "max": None})
        lo, hi = a["min"], a.get("max")
        if not all(v is None or isinstance(v, (int, float)) for v in (lo, hi)):
            raise _Unmapped("bounds are not constants")
        if ld.is_tensor(a["input"]) and is_non_float(ld.info(a["input"]).dtype):
            raise _Unmapped("not a floating-point tensor")
        if lo == 0 and hi is None:
            name, attrs = "relu", {}
        elif lo == 0 and hi == 6:
            name, attrs = "relu6", {}
        elif lo is not None and hi is not None and lo < hi:
            name, attrs = "hardtanh", {"min_val": float(lo), "max_val": float(hi)}
        else:
            raise _Unmapped("bounds make no activation")
        _act(ld, fx_node, name, a["input"], **attrs)
        if str(getattr(fx_node.target, "__name__", fx_node.target)).endswith("_"):
            _inplace_result(ld, fx_node, a["input"])
    return h


def _f_softmax(op):
    def h(ld, fx_node):
        a = _bind(fx_node, ["input", "dim", "_stacklevel", "dtype"],
                  {"dim": None, "_stacklevel": 3, "dtype": None})
        if a["dim"] is None or a["dtype"] is not None:
            raise _Unmapped("implicit dim or dtype")
        _emit(ld, fx_node, op, [_input(ld, fx_node, a["input"])],
              {"axis": _axis(ld, a["input"], a["dim"])})
    return h


def _f_cat(ld, fx_node):
    a = _bind(fx_node, ["tensors", "dim"], {"dim": 0})
    if "axis" in fx_node.kwargs:
        a["dim"] = fx_node.kwargs["axis"]
    tensors = a["tensors"]
    if isinstance(tensors, torch.fx.Node):
        entry = ld.env[tensors]
        if not isinstance(entry, _Multi):
            raise _Unmapped("traced list")
        refs = list(entry.refs)
        first = None
    else:
        refs = []
        for t in tensors:
            if isinstance(t, torch.fx.Node) and isinstance(ld.env.get(t), _Multi):
                raise _Unmapped("nested tuple")
            refs.append(_input(ld, fx_node, t))
        first = tensors[0]
    axis = a["dim"]
    if not isinstance(axis, int):
        raise _Unmapped("axis")
    if axis < 0:
        r = len(ld.info(fx_node).shape) if ld.info(fx_node).shape is not None else (
            ld.rank(first) if first is not None else None)
        if r is None:
            raise _Unmapped("negative axis with unknown rank")
        axis += r
    _emit(ld, fx_node, "concat", refs, {"axis": axis})


def _f_stack(ld, fx_node):
    """``torch.stack(tensors, dim)``: an unsqueeze per tensor, then a concat, as the ONNX
    exporters write it (SKNet stacks its kernel paths): the kernel rules and the maximizing
    function see the join, where an opaque call hid it."""
    a = _bind(fx_node, ["tensors", "dim"], {"dim": 0})
    tensors, dim = a["tensors"], a["dim"]
    if isinstance(tensors, torch.fx.Node) or not tensors:
        raise _Unmapped("traced list")
    if not isinstance(dim, int):
        raise _Unmapped("dynamic dim")
    if dim < 0:
        rank = ld.rank(tensors[0])
        if rank is None:
            raise _Unmapped("negative dim with unknown rank")
        dim += rank + 1
    refs = []
    for t in tensors:
        if isinstance(t, torch.fx.Node) and isinstance(ld.env.get(t), _Multi):
            raise _Unmapped("nested tuple")
        ref = _input(ld, fx_node, t)
        info = ld.graph.info(ref)
        shape = None if info.shape is None else (*info.shape[:dim], 1, *info.shape[dim:])
        refs.append(ld.add(fx_node, "unsqueeze", [ref], {"axes": (dim,)},
                           outputs=[TensorInfo(shape, info.dtype)],
                           name=ld.graph.unique_name(f"{fx_node.name}_unsqueeze")))
    _emit(ld, fx_node, "concat", refs, {"axis": dim})


def _f_getitem(ld, fx_node):
    src, idx = fx_node.args
    entry = ld.env.get(src) if isinstance(src, torch.fx.Node) else None
    if isinstance(entry, _Multi):
        if not isinstance(idx, int):
            raise _Unmapped("slice of a tuple")
        ld.env[fx_node] = entry.refs[idx % entry.count]
        return
    if not ld.is_tensor(src) or _has_node(idx):
        raise _Unmapped("not a static tensor slice")
    items = idx if isinstance(idx, tuple) else (idx,)
    if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items) \
            or items.count(Ellipsis) > 1 or any(isinstance(i, bool) for i in items):
        raise _Unmapped("index other than ints, slices, None and ...")
    r = ld.rank(src)
    consuming = sum(1 for i in items if i is not None and i is not Ellipsis)
    if Ellipsis in items:
        if r is None:
            raise _Unmapped("ellipsis with unknown rank")
        k = items.index(Ellipsis)
        items = items[:k] + (slice(None),) * (r - consuming) + items[k + 1:]
    big = int(np.iinfo(np.int64).max)
    axes, starts, ends, steps, squeeze_axes, unsqueeze_axes = [], [], [], [], [], []
    in_axis = out_axis = 0
    for item in items:
        if item is None:
            unsqueeze_axes.append(out_axis)
            out_axis += 1
            continue
        if isinstance(item, int):
            axes.append(in_axis), starts.append(item), steps.append(1)
            ends.append(big if item == -1 else item + 1)
            squeeze_axes.append(in_axis)
        elif item != slice(None):
            step = 1 if item.step is None else int(item.step)
            if step <= 0:
                raise _Unmapped("non-positive step")
            axes.append(in_axis), steps.append(step)
            starts.append(0 if item.start is None else int(item.start))
            ends.append(big if item.stop is None else int(item.stop))
            out_axis += 1
        else:
            out_axis += 1
        in_axis += 1
    # one IR node per step; the last one carries the fx node's name
    steps_ir = []
    if axes:
        steps_ir.append(("slice", {"axes": tuple(axes), "starts": tuple(starts),
                                   "ends": tuple(ends), "steps": tuple(steps)}))
    if squeeze_axes:
        steps_ir.append(("squeeze", {"axes": tuple(squeeze_axes)}))
    if unsqueeze_axes:
        steps_ir.append(("unsqueeze", {"axes": tuple(unsqueeze_axes)}))
    if not steps_ir:
        steps_ir.append(("identity", {}))
    ref = _input(ld, fx_node, src)
    info = ld.info(src)
    for k, (op, attrs) in enumerate(steps_ir):
        info = _index_info(info, op, attrs)
        last = k == len(steps_ir) - 1
        name = None if last else ld.graph.unique_name(f"{fx_node.name}_{op}")
        ref = ld.add(fx_node, op, [ref], attrs, outputs=None if last else [info], name=name)
    ld.env[fx_node] = ref


def _index_info(info: TensorInfo, op: str, attrs: dict) -> TensorInfo:
    """Output shape of an intermediate indexing step (None when the input's is unknown)."""
    if info.shape is None:
        return TensorInfo(None, info.dtype)
    shape = list(info.shape)
    if op == "slice":
        for a, s, e, st in zip(attrs["axes"], attrs["starts"], attrs["ends"], attrs["steps"]):
            shape[a] = len(range(shape[a])[slice(s, e, st)])
    elif op == "squeeze":
        shape = [d for i, d in enumerate(shape) if i not in attrs["axes"]]
    elif op == "unsqueeze":
        for a in attrs["axes"]:
            shape.insert(a, 1)
    return TensorInfo(tuple(shape), info.dtype)


def _f_pad(ld, fx_node):
    a = _bind(fx_node, ["input", "pad", "mode", "value"], {"mode": "constant", "value": None})
    _pad(ld, fx_node, a["input"], a["pad"], a["mode"], a["value"])


def _f_dropout(variant):
    def h(ld, fx_node):
        a = _bind(fx_node, ["input", "p", "training", "inplace"],
                  {"p": 0.5, "training": True, "inplace": False})
        if not isinstance(a["training"], bool) or not isinstance(a["p"], (int, float)):
            raise _Unmapped("dynamic flags")
        if not a["training"]:
            # F.dropout(..., training=False) never drops (fx records the flag's traced value)
            _emit(ld, fx_node, "identity", [_input(ld, fx_node, a["input"])])
        else:
            attrs = {"p": float(a["p"])}
            if variant:
                attrs["variant"] = variant
            _emit(ld, fx_node, "dropout", [_input(ld, fx_node, a["input"])], attrs)
    return h


def _f_pool(op, dims):
    def h(ld, fx_node):
        if op == "max_pool":
            a = _bind(fx_node, ["input", "kernel_size", "stride", "padding", "dilation",
                                "ceil_mode", "return_indices"],
                      {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False,
                       "return_indices": False})
            if a["return_indices"]:
                raise _Unmapped("return_indices")
        else:
            a = _bind(fx_node, ["input", "kernel_size", "stride", "padding", "ceil_mode",
                                "count_include_pad", "divisor_override"],
                      {"stride": None, "padding": 0, "ceil_mode": False,
                       "count_include_pad": True, "divisor_override": None})
            if a["divisor_override"]:
                raise _Unmapped("divisor_override")
        if _has_node([v for k, v in a.items() if k != "input"]):
            raise _Unmapped("dynamic pool args")
        attrs = _pool_attrs(a["kernel_size"], a["stride"], a["padding"], dims, a["ceil_mode"])
        if op == "max_pool":
            attrs["dilation"] = tuple(int(d) for d in _tuple(a["dilation"], dims))
        else:
            attrs["count_include_pad"] = bool(a["count_include_pad"])
        _emit(ld, fx_node, op, [_input(ld, fx_node, a["input"])], attrs)
    return h


def _f_adaptive(op, dims):
    def h(ld, fx_node):
        a = _bind(fx_node, ["input", "output_size", "return_indices"], {"return_indices": False})
        if a["return_indices"] or _has_node(a["output_size"]):
            raise _Unmapped("return_indices / dynamic size")
        _adaptive(ld, fx_node, a["input"], a["output_size"], dims, op)
    return h


def _f_binary(op, names=("input", "other")):
    def h(ld, fx_node):
        a = _bind(fx_node, [*names, "alpha", "rounding_mode"], {"alpha": 1, "rounding_mode": None})
        if a["rounding_mode"] is not None:
            raise _Unmapped("rounding_mode")
        _binary(ld, fx_node, op, a[names[0]], a[names[1]], a["alpha"])
        if getattr(fx_node.target, "__name__", "").startswith("i"):  # operator.iadd etc.
            _inplace_result(ld, fx_node, a[names[0]])
    return h


def _f_addcmul(ld, fx_node):
    """``torch.addcmul(input, t1, t2, value=v)`` = ``input + v * t1 * t2`` (timm's ResMLP
    affine, ``addcmul(beta, alpha, x)``): a mul node, then an add with alpha ``v``."""
    a = _bind(fx_node, ["input", "tensor1", "tensor2", "value"], {"value": 1})
    operands = (a["input"], a["tensor1"], a["tensor2"])
    if (not all(ld.is_tensor(v) for v in operands) or isinstance(a["value"], torch.fx.Node)
            or (ld.has_shapes and not ld.is_tensor(fx_node))):
        raise _Unmapped("addcmul operands")
    first, second = ld.info(a["tensor1"]), ld.info(a["tensor2"])
    shape = None
    if first.shape is not None and second.shape is not None:
        shape = tuple(np.broadcast_shapes(first.shape, second.shape))
    product = ld.add(fx_node, "mul", [ld.ref(a["tensor1"]), ld.ref(a["tensor2"])],
                     outputs=[TensorInfo(shape, ld.info(fx_node).dtype)],
                     name=ld.graph.unique_name(f"{fx_node.name}_mul"))
    value = float(a["value"])
    _emit(ld, fx_node, "add", [ld.ref(a["input"]), product],
          {"alpha": value} if value != 1 else {})


def _f_neg(ld, fx_node):
    """``-x``: a mul by the constant -1 (rotary embeddings' ``rotate_half``)."""
    _binary(ld, fx_node, "mul", fx_node.args[0], -1.0)


def _f_matmul(ld, fx_node):
    a, b = fx_node.args[:2]
    if fx_node.kwargs or not (ld.is_tensor(a) and ld.is_tensor(b)):
        raise _Unmapped("matmul operands")
    _emit(ld, fx_node, "matmul", [ld.ref(a), ld.ref(b)])


def _f_flatten(ld, fx_node):
    a = _bind(fx_node, ["input", "start_dim", "end_dim"], {"start_dim": 0, "end_dim": -1})
    _flatten(ld, fx_node, a["input"], a["start_dim"], a["end_dim"])


def _f_reshape(ld, fx_node):
    a = _bind(fx_node, ["input", "shape"], {})
    _reshape(ld, fx_node, a["input"], _shape_args((a["shape"],)))


def _f_permute(ld, fx_node):
    a = _bind(fx_node, ["input", "dims"], {})
    _permute(ld, fx_node, a["input"], a["dims"])


def _f_transpose(ld, fx_node):
    a = _bind(fx_node, ["input", "dim0", "dim1"], {})
    _transpose(ld, fx_node, a["input"], a["dim0"], a["dim1"])


def _f_squeeze(ld, fx_node):
    a = _bind(fx_node, ["input", "dim"], {"dim": None})
    _squeeze(ld, fx_node, a["input"], a["dim"])


def _f_unsqueeze(ld, fx_node):
    a = _bind(fx_node, ["input", "dim"], {})
    _unsqueeze(ld, fx_node, a["input"], a["dim"])


def _f_split(chunk):
    def h(ld, fx_node):
        if chunk:
            a = _bind(fx_node, ["input", "chunks", "dim"], {"dim": 0})
            _split(ld, fx_node, a["input"], a["chunks"], a["dim"], True)
        else:
            a = _bind(fx_node, ["tensor", "split_size_or_sections", "dim"], {"dim": 0})
            _split(ld, fx_node, a["tensor"], a["split_size_or_sections"], a["dim"], False)
    return h


def _f_reduce(kind):
    def h(ld, fx_node):
        dim_default = () if kind in ("max", "min") else None
        a = _bind(fx_node, ["input", "dim", "keepdim", "dtype"],
                  {"dim": dim_default, "keepdim": False, "dtype": None})
        _reduce(ld, fx_node, kind, a["input"], a["dim"], a["keepdim"], a["dtype"])
    return h


def _f_identity(ld, fx_node):
    if len(fx_node.args) != 1 or fx_node.kwargs:
        raise _Unmapped("extra args")
    _emit(ld, fx_node, "identity", [_input(ld, fx_node)])


def _f_t(ld, fx_node):
    """``x.t()`` / ``torch.t(x)``: the transpose of a matrix (a vector or a scalar as it is)."""
    if len(fx_node.args) != 1 or fx_node.kwargs:
        raise _Unmapped("extra args")
    r = ld.rank(fx_node.args[0])
    if r is None or r > 2:
        raise _Unmapped("t() needs a rank of at most 2")
    if r < 2:
        _emit(ld, fx_node, "identity", [_input(ld, fx_node)])
    else:
        _emit(ld, fx_node, "transpose", [_input(ld, fx_node)], {"perm": (1, 0)})


def _f_mvit_unsqueeze(ld, fx_node):
    """torchvision MViT's ``_unsqueeze(x, target_dim, expand_dim)`` (``torch.fx.wrap``-ed, so
    fx keeps the call): ``(x.unsqueeze(expand_dim), x.dim())`` when ``x`` has
    ``target_dim - 1`` dims, else ``(x, x.dim())``; the rank is a constant."""
    x, target_dim, expand_dim = _mvit_args(fx_node, 3)
    r = ld.rank(x)
    if r is None or r not in (target_dim - 1, target_dim):
        raise _Unmapped("rank")
    name = ld.graph.unique_name(f"{fx_node.name}_x")
    if r == target_dim - 1:
        out = ld.add(fx_node, "unsqueeze", [_input(ld, fx_node, x)],
                     {"axes": (expand_dim % (r + 1),)},
                     outputs=[_mvit_info(ld, x, r + 1, expand_dim)], name=name)
    else:
        out = ld.add(fx_node, "identity", [_input(ld, fx_node, x)], outputs=[ld.info(x)],
                     name=name)
    rank = ld.scalar_constant(fx_node.name, r, None)
    ld.env[fx_node] = _Multi(fx_node.name, 2, refs=[out, rank])


def _f_mvit_squeeze(ld, fx_node):
    """torchvision MViT's ``_squeeze(x, target_dim, expand_dim, tensor_dim)``: undoes
    :func:`_f_mvit_unsqueeze` (``tensor_dim``: the rank it returned)."""
    x, target_dim, expand_dim, tensor_dim = _mvit_args(fx_node, 4)
    value = ld.graph[ld.env[tensor_dim].node].params.get("value") \
        if isinstance(tensor_dim, torch.fx.Node) and isinstance(ld.env.get(tensor_dim), Ref) \
        else tensor_dim
    if not isinstance(value, (int, np.integer, np.ndarray)) or np.ndim(value) != 0:
        raise _Unmapped("tensor_dim")
    if int(value) == target_dim - 1:
        _emit(ld, fx_node, "squeeze", [_input(ld, fx_node, x)],
              {"axes": (expand_dim % target_dim,)})
    else:
        _emit(ld, fx_node, "identity", [_input(ld, fx_node, x)])


def _f_tensor_split(ld, fx_node):
    """``torch.tensor_split(x, indices=(i, j, ...), dim)``: a split at those indices (MViT
    takes its class token off with ``indices=(1,)``)."""
    a = _bind(fx_node, ["input", "indices", "dim"], {"dim": 0})
    indices = a["indices"]  # (an int: that many sections, not mapped)
    info = ld.info(a["input"]) if isinstance(a["input"], torch.fx.Node) else None
    if not isinstance(indices, (tuple, list)) or not all(isinstance(i, int) for i in indices) \
            or info is None or info.shape is None or not isinstance(a["dim"], int):
        raise _Unmapped("tensor_split needs static indices and shapes")
    n = info.shape[a["dim"] % len(info.shape)]
    bounds = [0, *[min(max(i if i >= 0 else i + n, 0), n) for i in indices], n]
    _split(ld, fx_node, a["input"], [hi - lo for lo, hi in zip(bounds, bounds[1:])], a["dim"],
           False)


def _mvit_args(fx_node, n):
    if fx_node.kwargs or len(fx_node.args) != n or not all(
            isinstance(a, int) for a in fx_node.args[1:3]):
        raise _Unmapped("arguments")
    return fx_node.args


def _mvit_info(ld, x, rank, axis):
    info = ld.info(x)
    if info.shape is None:
        return TensorInfo(None, info.dtype)
    shape = list(info.shape)
    shape.insert(axis % rank, 1)
    return TensorInfo(tuple(shape), info.dtype)


#: functions fx keeps as calls (``torch.fx.wrap``) that are known ops, by qualified name (no
#: import of their package here)
_NAMED_FUNCTIONS = {"torchvision.models.video.mvit._unsqueeze": _f_mvit_unsqueeze,
                    "torchvision.models.video.mvit._squeeze": _f_mvit_squeeze}


def _f_getattr(ld, fx_node):
    """``x.T`` (all axes reversed) and ``x.mT`` (the last two swapped) of a tensor; other
    attributes (``x.shape``, ``x.dtype``...) stay opaque (shape computations)."""
    if len(fx_node.args) != 2 or fx_node.kwargs or fx_node.args[1] not in ("T", "mT") \
            or not ld.is_tensor(fx_node.args[0]):
        raise _Unmapped("attribute")
    r = ld.rank(fx_node.args[0])
    if r is None or (fx_node.args[1] == "mT" and r < 2):
        raise _Unmapped("transpose needs a known rank")
    perm = tuple(reversed(range(r))) if fx_node.args[1] == "T" else (
        *range(r - 2), r - 1, r - 2)
    _emit(ld, fx_node, "transpose", [_input(ld, fx_node)], {"perm": perm})


_INPLACE = {"inplace": False}
FUNCTION_OPS: dict[Any, Callable] = {
    F.conv1d: _f_conv(1), F.conv2d: _f_conv(2), F.conv3d: _f_conv(3),
    torch.conv1d: _f_conv(1), torch.conv2d: _f_conv(2), torch.conv3d: _f_conv(3),
    F.linear: _f_linear, F.layer_norm: _f_layer_norm, F.group_norm: _f_group_norm,
    **({F.rms_norm: _f_rms_norm} if hasattr(F, "rms_norm") else {}),
    F.batch_norm: _f_batch_norm,
    # activations
    F.relu: _f_act("relu", ("input", "inplace"), _INPLACE), torch.relu: _f_act("relu"),
    torch.relu_: _f_act("relu"), F.relu_: _f_act("relu"),
    F.relu6: _f_act("relu6", ("input", "inplace"), _INPLACE),
    F.leaky_relu: _f_act("leaky_relu", ("input", "negative_slope", "inplace"),
                         {"negative_slope": 0.01, "inplace": False},
                         lambda a: {"negative_slope": float(a["negative_slope"])}),
    F.elu: _f_act("elu", ("input", "alpha", "inplace"), {"alpha": 1.0, "inplace": False},
                  lambda a: {"alpha": float(a["alpha"])}),
    F.celu: _f_act(_celu_name, ("input", "alpha", "inplace"), {"alpha": 1.0, "inplace": False},
                   lambda a: {"alpha": 1.0}),
    F.selu: _f_act("selu", ("input", "inplace"), _INPLACE), torch.selu: _f_act("selu"),
    F.gelu: _f_act(lambda a: "gelu" if a["approximate"] == "tanh" else "gelu_exact",
                   ("input", "approximate"), {"approximate": "none"}),
    F.silu: _f_act("silu", ("input", "inplace"), _INPLACE),
    F.mish: _f_act("mish", ("input", "inplace"), _INPLACE),
    F.hardswish: _f_act("hardswish", ("input", "inplace"), _INPLACE),
    F.hardsigmoid: _f_act("hardsigmoid", ("input", "inplace"), _INPLACE),
    F.hardtanh: _f_act("hardtanh", ("input", "min_val", "max_val", "inplace"),
                       {"min_val": -1.0, "max_val": 1.0, "inplace": False},
                       lambda a: {"min_val": float(a["min_val"]), "max_val": float(a["max_val"])}),
    torch.tanh: _f_act("tanh"), F.tanh: _f_act("tanh"),
    torch.sigmoid: _f_act("sigmoid"), F.sigmoid: _f_act("sigmoid"),
    F.softplus: _f_act(_softplus_name, ("input", "beta", "threshold"),
                       {"beta": 1.0, "threshold": 20.0}),
    F.softsign: _f_act("softsign"),
    torch.erf: _f_act("erf"), torch.special.erf: _f_act("erf"),
    torch.atan: _f_act("atan"), torch.arctan: _f_act("atan"),
    torch.asinh: _f_act("asinh"), torch.arcsinh: _f_act("asinh"),
    torch.square: _f_act("square"),
    F.prelu: _f_prelu, torch.prelu: _f_prelu,
    torch.clamp: _f_clamp(("input", "min", "max")), torch.clip: _f_clamp(("input", "min", "max")),
    torch.clamp_min: _f_clamp(("input", "min")),
    # softmax
    F.softmax: _f_softmax("softmax"), torch.softmax: _f_softmax("softmax"),
    F.log_softmax: _f_softmax("log_softmax"), torch.log_softmax: _f_softmax("log_softmax"),
    # arithmetic
    operator.add: _f_binary("add", ("a", "b")), operator.sub: _f_binary("sub", ("a", "b")),
    operator.mul: _f_binary("mul", ("a", "b")), operator.truediv: _f_binary("div", ("a", "b")),
    operator.iadd: _f_binary("add", ("a", "b")), operator.isub: _f_binary("sub", ("a", "b")),
    operator.imul: _f_binary("mul", ("a", "b")), operator.itruediv: _f_binary("div", ("a", "b")),
    torch.add: _f_binary("add"), torch.sub: _f_binary("sub"), torch.subtract: _f_binary("sub"),
    torch.mul: _f_binary("mul"), torch.multiply: _f_binary("mul"),
    torch.div: _f_binary("div"), torch.divide: _f_binary("div"), torch.true_divide: _f_binary("div"),
    torch.matmul: _f_matmul, operator.matmul: _f_matmul, torch.mm: _f_matmul, torch.bmm: _f_matmul,
    torch.addcmul: _f_addcmul, operator.neg: _f_neg, torch.neg: _f_neg, torch.negative: _f_neg,
    # joins and shapes
    torch.cat: _f_cat, torch.concat: _f_cat, torch.stack: _f_stack, torch.concatenate: _f_cat,
    torch.flatten: _f_flatten, torch.reshape: _f_reshape, torch.permute: _f_permute,
    torch.transpose: _f_transpose, torch.swapaxes: _f_transpose, torch.swapdims: _f_transpose,
    torch.t: _f_t, getattr: _f_getattr, torch.tensor_split: _f_tensor_split,
    torch.squeeze: _f_squeeze, torch.unsqueeze: _f_unsqueeze,
    torch.chunk: _f_split(True), torch.split: _f_split(False), torch.unbind: _f_unbind,
    operator.getitem: _f_getitem, F.pad: _f_pad, F.interpolate: _f_interpolate,
    F.upsample: _f_interpolate,
    torch.pixel_shuffle: _f_block_move("depth_to_space", "upscale_factor"),
    torch.pixel_unshuffle: _f_block_move("space_to_depth", "downscale_factor"),
    F.dropout: _f_dropout(None), F.dropout1d: _f_dropout("Dropout1d"),
    F.dropout2d: _f_dropout("Dropout2d"), F.dropout3d: _f_dropout("Dropout3d"),
    F.alpha_dropout: _f_dropout("AlphaDropout"),
    # reductions
    torch.mean: _f_reduce("mean"), torch.sum: _f_reduce("sum"), torch.amax: _f_reduce("max"),
    torch.amin: _f_reduce("min"),
    # pools
    F.max_pool1d: _f_pool("max_pool", 1), F.max_pool2d: _f_pool("max_pool", 2),
    F.max_pool3d: _f_pool("max_pool", 3), F.avg_pool1d: _f_pool("avg_pool", 1),
    F.avg_pool2d: _f_pool("avg_pool", 2), F.avg_pool3d: _f_pool("avg_pool", 3),
    F.adaptive_avg_pool1d: _f_adaptive("adaptive_avg_pool", 1),
    F.adaptive_avg_pool2d: _f_adaptive("adaptive_avg_pool", 2),
    F.adaptive_avg_pool3d: _f_adaptive("adaptive_avg_pool", 3),
    F.adaptive_max_pool1d: _f_adaptive("adaptive_max_pool", 1),
    F.adaptive_max_pool2d: _f_adaptive("adaptive_max_pool", 2),
    F.adaptive_max_pool3d: _f_adaptive("adaptive_max_pool", 3),
}
_FUNCTION_HANDLERS = {_key(k): v for k, v in FUNCTION_OPS.items()}


# -- methods: handlers read fx_node.args with the tensor first
def _m_method_act(name):
    def h(ld, fx_node):
        if len(fx_node.args) != 1 or fx_node.kwargs:
            raise _Unmapped("extra args")
        _act(ld, fx_node, name, fx_node.args[0])
        if fx_node.target.endswith("_"):
            _inplace_result(ld, fx_node, fx_node.args[0])
    return h


def _m_method_binary(op):
    def h(ld, fx_node):
        a = _bind(fx_node, ["self", "other", "alpha", "rounding_mode"],
                  {"alpha": 1, "rounding_mode": None})
        if a["rounding_mode"] is not None:
            raise _Unmapped("rounding_mode")
        _binary(ld, fx_node, op, a["self"], a["other"], a["alpha"])
        if fx_node.target.endswith("_"):
            _inplace_result(ld, fx_node, a["self"])
    return h


def _mm_view(ld, fx_node):
    _reshape(ld, fx_node, fx_node.args[0], _shape_args(fx_node.args[1:]))


def _mm_permute(ld, fx_node):
    _permute(ld, fx_node, fx_node.args[0], _shape_args(fx_node.args[1:]))


def _mm_transpose(ld, fx_node):
    _f_transpose(ld, fx_node)


def _mm_flatten(ld, fx_node):
    _f_flatten(ld, fx_node)


def _mm_split(chunk):
    def h(ld, fx_node):
        a = _bind(fx_node, ["self", "n", "dim"], {"dim": 0})
        _split(ld, fx_node, a["self"], a["n"], a["dim"], chunk)
    return h


# x.mean(dim) binds like torch.mean(x, dim): the same handler serves both
_mm_reduce = _f_reduce


def _mm_softmax(op):
    def h(ld, fx_node):
        a = _bind(fx_node, ["input", "dim", "dtype"], {"dtype": None})
        if a["dtype"] is not None:
            raise _Unmapped("dtype")
        _emit(ld, fx_node, op, [_input(ld, fx_node, a["input"])],
              {"axis": _axis(ld, a["input"], a["dim"])})
    return h


METHOD_OPS: dict[str, Callable] = {
    "relu": _m_method_act("relu"), "relu_": _m_method_act("relu"),
    "sigmoid": _m_method_act("sigmoid"), "sigmoid_": _m_method_act("sigmoid"),
    "tanh": _m_method_act("tanh"), "tanh_": _m_method_act("tanh"),
    "erf": _m_method_act("erf"), "atan": _m_method_act("atan"), "asinh": _m_method_act("asinh"),
    "square": _m_method_act("square"),
    **{m: _f_clamp(("input", "min", "max")) for m in ("clamp", "clip", "clamp_", "clip_")},
    **{m: _f_clamp(("input", "min")) for m in ("clamp_min", "clamp_min_")},
    "add": _m_method_binary("add"), "sub": _m_method_binary("sub"),
    "addcmul": _f_addcmul, "neg": _f_neg, "negative": _f_neg, "unbind": _f_unbind,
    "to": _m_to, "type_as": _m_type_as, "float": _m_cast_to(torch.float32),
    "double": _m_cast_to(torch.float64), "half": _m_cast_to(torch.float16),
    "bfloat16": _m_cast_to(torch.bfloat16),
    "mul": _m_method_binary("mul"), "div": _m_method_binary("div"),
    "add_": _m_method_binary("add"), "sub_": _m_method_binary("sub"),
    "mul_": _m_method_binary("mul"), "div_": _m_method_binary("div"),
    "matmul": _f_matmul,
    "view": _mm_view, "reshape": _mm_view, "permute": _mm_permute,
    "transpose": _mm_transpose, "flatten": _mm_flatten, "t": _f_t,
    "squeeze": _f_squeeze, "unsqueeze": _f_unsqueeze,
    "chunk": _mm_split(True), "split": _mm_split(False),
    "contiguous": _f_identity, "clone": _f_identity,
    "mean": _mm_reduce("mean"), "sum": _mm_reduce("sum"), "amax": _mm_reduce("max"),
    "amin": _mm_reduce("min"),
    "softmax": _mm_softmax("softmax"), "log_softmax": _mm_softmax("log_softmax"),
}


# ----------------------------------------------------------------------------- entry point
def load_module(module: nn.Module, example_inputs=None, *, leaf_modules=(),
                cache_weight_norms: bool = True) -> Graph:
    """Trace ``module`` with torch.fx into a graphshape :class:`Graph`.

    ``example_inputs``: a tensor or a tuple of tensors for ``forward``; gives every value's
    shape and dtype (without it, shapes are None and ops that need a rank to be mapped,
    such as ``transpose`` or ``chunk``, stay opaque). ``leaf_modules``: module classes to
    keep as single opaque calls instead of tracing into them. ``cache_weight_norms``: read
    every conv/linear weight now for the analysis
    (:func:`graphshape.ir.cache_weight_tap_norms`); False
    where the weights are about to be replaced (shaping re-initializes them): ~20 ms less
    for ResNet-50.

    When torch.fx cannot trace the module (Python control flow on values it does not know)
    and example inputs are given, the model is read through its in-memory ONNX export
    instead (:mod:`graphshape.frontends.torch_onnx`; ``graph.meta["traced_with"]`` is then
    ``"torch.onnx.export"`` and ``graph.meta["fx_error"]`` says why).
    """
    if not isinstance(module, nn.Module):
        raise GraphshapeError(f"load_module needs a torch.nn.Module, got {type(module).__name__}")
    module, wrappers = _unwrap(module)
    _check_materialized(module)
    if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    inputs = None if example_inputs is None else tuple(example_inputs)
    aten = _is_aten_graph(module)
    try:
        if aten:
            raise _Untraceable(
                f"{type(module).__name__} is a graph of ATen operators (torch.export's "
                "ExportedProgram.module()), which graphshape does not map op by op")
        graph = _Loader(module, inputs, tuple(leaf_modules)).run()
    except _Untraceable as exc:
        graph = _load_untraceable(module, inputs, str(exc), aten, cache_weight_norms)
    else:
        # hand-written norms and activations: (x - mean) / sqrt(var + eps) -> layer_norm,
        # x * sigmoid(x) -> silu, ... (load_onnx does the same for the other way in)
        fuse_decompositions(graph, copy=False)
        if cache_weight_norms:
            cache_weight_tap_norms(graph)
    if wrappers:
        graph.meta["unwrapped_from"] = wrappers
    return graph


def _check_materialized(module: nn.Module) -> None:
    """GraphshapeError when the module's tensors are on the meta device (built under
    ``torch.device("meta")``, or by ``init_empty_weights``): they hold no values to read,
    run or keep, and the error torch gives deep inside does not say so. The same for the
    tensors a lazy module (``nn.LazyConv2d``) has not created yet."""
    tensors = list(itertools.chain(module.named_parameters(), module.named_buffers()))
    on_meta = [name for name, t in tensors if t.is_meta]
    if on_meta:
        more = f" and {len(on_meta) - 1} more" if len(on_meta) > 1 else ""
        raise GraphshapeError(
            f"{type(module).__name__}'s tensors are on the meta device ({on_meta[0]!r}{more}): "
            "they hold no values. Materialize the model first (build it on the CPU, or "
            "model.to_empty(device='cpu') and initialize or load its weights)")
    lazy = [name for name, t in tensors if nn.parameter.is_lazy(t)]
    if lazy:
        owner = type(module.get_submodule(lazy[0].rpartition(".")[0])).__name__
        more = f" and {len(lazy) - 1} more" if len(lazy) > 1 else ""
        raise GraphshapeError(
            f"{type(module).__name__} has lazy modules whose parameters do not exist yet "
            f"({lazy[0]!r} of {owner}{more}): run the model once on an example input, "
            "model(x), to create them, then load or shape it")


def _load_untraceable(module: nn.Module, inputs: tuple | None, fx_error: str, aten: bool,
                      cache_weight_norms: bool) -> Graph:
    """A module torch.fx cannot trace, read through its ONNX export
    (:mod:`graphshape.frontends.torch_onnx`); a GraphshapeError saying what to do when
    there are no example inputs or the export cannot stand in for the model."""
    if inputs is None:
        raise GraphshapeError(
            f"{fx_error}. {_what_to_do(module)}; or pass example inputs: graphshape then "
            "reads the model through its ONNX export (torch.onnx.export), which runs "
            "the forward instead of tracing it") from None
    from graphshape.frontends.torch_onnx import load_via_onnx

    meta = _module_meta(module, _fixed_args(module, len(inputs)))
    # an ExportedProgram's module has no mode (its ops were fixed at export, batch norm
    # included): the emitted module computes them in eval mode
    meta["training"] = module.training and not aten
    try:
        return load_via_onnx(module, inputs, fx_error=fx_error, meta=meta,
                             cache_weight_norms=cache_weight_norms)
    except GraphshapeError as failed:
        raise GraphshapeError(f"{failed}. {_what_to_do(module)}.") from None
