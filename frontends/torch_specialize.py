"""Python control flow on tensor shapes, traced for the example inputs' shapes.

``torch.fx.symbolic_trace`` cannot record ``if x.shape[1] != self.num_channels:`` (Hugging
Face's embeddings), ``if pad_r > 0:`` after ``pad_r = (ws - W % ws) % ws`` (twins),
``int(N ** 0.5)`` (ConViT, NesT) or ``math.ceil(H / patch)`` (MobileViT): each asks Python
for the value of a traced size (``bool``, ``int``, ``float``, ``len``, ``range``), which a
Proxy does not have. fx leaves this to a custom tracer (``Tracer.to_bool``: "a custom tracer
... can choose to return a value"); :class:`ShapeSpecializingTracer` answers when

- the value is computed from tensors' metadata only (``.shape``, ``.size()``, ``.dim()``,
  ``.ndim``, ``.dtype``, ``.device``, ``len(x)``) and Python arithmetic on it, never from a
  tensor's entries (``if x.sum() > 0`` stays an error: that branch depends on the data), and
- it is the same on the example inputs and on them with another batch size (axis 0 of
  the inputs of the examples' batch size made 1 and 2b + 1): a branch on the batch size
  would make the traced graph right for some batch sizes only. (A threshold between
  those sizes, ``if B > 8:`` for a batch of 2, is not seen: probing is not proof.)

The value is computed by running the part of the graph traced so far (an fx ``Interpreter``
on the graph under construction, its values cached for the next question), on 'meta' tensors
where they can stand in (no compute), else on the real inputs in eval mode without
gradients, on copies of the buffers and with the random state put back: reading the model
never changes it. The traced graph gets a check of each answer
(:func:`graphshape.torch_modules.check_traced_branch`), which the shaped model keeps: an
input that would take another branch raises a GraphshapeError naming the line instead of
computing the wrong thing. ``torch.onnx.export``, graphshape's other way in,
follows the example inputs' path too, without the guard, and without the source's
dropout and drop path.

Calls plain fx cannot trace are recorded as calls: item assignment (``x[key] = value``,
:meth:`Proxy.__setitem__`; the loader reads it out of place); torch's factories given traced
sizes as separate arguments or as data (``torch.zeros(B, C, H, W)``, ``torch.tensor(N)``,
``torch.eye(C)``: :data:`_SIZES_AS_ARGUMENTS`, :data:`_AS_CALLED`); and Tensor methods
taking sizes, called on a tensor fx does not trace (a buffer read as it is:
``self.table.expand(B, -1, -1)``, :data:`_SIZE_METHODS`). torch's argument parser refuses
traced sizes there, or this tracer would answer them for the example's sizes. (Buffers are
traced like parameters where the forward lets them be:
:func:`graphshape.frontends.torch_fx._trace`.) A ``torch.autocast`` region may be
entered with a traced device type (fx records no autocast region: the report lists them);
``torch.utils.checkpoint`` calls, which fx traces through, are listed too.

``torch.fx.experimental.meta_tracer.MetaTracer`` answers every ``.shape`` with the meta
tensor's sizes, so the batch size would be a constant in every reshape of the traced graph;
here only the values Python asks for become constants.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import os
import sys
from typing import Any

import torch
import torch.fx
from torch import nn

from graphshape import torch_modules as _tm

#: how a method call reads its tensor: metadata only
_METADATA_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement",
                               "is_floating_point", "is_complex", "get_device"})
#: ``getattr(x, name)`` that reads metadata only
_METADATA_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "is_meta",
                                  "layout"})
#: Python functions of Python values (sizes, flags): computed from their arguments only
_PURE_FUNCTIONS = frozenset({
    *(getattr(operator, name) for name in (
        "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs",
        "eq", "ne", "lt", "le", "gt", "ge", "not_", "and_", "or_", "xor", "getitem",
        "index", "lshift", "rshift", "invert", "truth", "contains", "is_", "is_not")),
    int, float, bool, len, min, max, abs, round, divmod, sum, tuple, list,
    math.ceil, math.floor, math.sqrt, math.log, math.log2, math.prod, math.gcd})

#: the frames of this package's tracing code and fx's, skipped to find the model's line
_TRACING_FILES = (os.path.dirname(torch.fx.__file__), os.path.dirname(__file__))


def _metadata_rule(node: torch.fx.Node) -> bool | list:
    """True / False where ``node`` alone decides whether its value reads metadata only, else
    the operands that must all read metadata only."""
    operands = list(node.all_input_nodes)
    if node.op == "call_method" and node.target in _METADATA_METHODS:
        return operands[1:]  # (x.size(d): d too)
    if node.op == "call_function" and node.target is getattr:
        # a tensor's metadata, or an attribute of metadata (``x.device.type``)
        return True if node.args[1:2] and node.args[1] in _METADATA_ATTRIBUTES else operands
    if node.op == "call_function" and node.target is len:
        return True  # the length of a tensor is its size along axis 0
    if node.op == "call_function" and node.target in _PURE_FUNCTIONS:
        return operands
    if node.op == "call_method" and node.target in ("numel", "index", "count", "__getitem__"):
        return operands  # a method of a size (torch.Size.numel, tuple.index)
    return False


def reads_metadata_only(node: torch.fx.Node, memo: dict) -> bool:
    """Whether fx node ``node``'s value is computed from tensors' shapes, dtypes and devices
    and constants only (never from a tensor's entries, a model input that is not a tensor's
    metadata, or a module's state). ``memo`` caches the answers by node. (Without recursion:
    a chain of residual adds is as long as the network.)"""
    stack = [node]
    while stack:
        n = stack[-1]
        if n in memo:
            stack.pop()
            continue
        rule = _metadata_rule(n)
        if isinstance(rule, bool):
            memo[stack.pop()] = rule
            continue
        pending = [a for a in rule if a not in memo]
        if pending:
            stack.extend(pending)
            continue
        memo[stack.pop()] = all(memo[a] for a in rule)
    return memo[node]


class _NoMeta(Exception):
    """Meta tensors cannot stand in for the real ones in this computation."""


class ExampleValues:
    """Values of the nodes of a graph being traced, computed on the example inputs, or on
    them with another batch size (axis 0 of the tensors whose axis 0 is the first tensor
    input's, cut or repeated), cached by node and batch size."""

    def __init__(self, root: nn.Module, graph: torch.fx.Graph, fixed: dict[str, Any],
                 inputs_by_name: dict[str, Any]):
        self.root = root
        self.graph = graph
        #: forward's parameters by name: the example inputs, and those traced at a constant
        self.inputs_by_name = inputs_by_name
        self.fixed = fixed
        # (the modules' hooks are off while the graph is evaluated: _hooks_off)
        self.on_meta = meta_can_stand_in(root, inputs_by_name.values(), hooks_run=False)
        #: the device of the inputs, which meta tensors report as theirs
        self.device = next((t.device for t in inputs_by_name.values()
                            if isinstance(t, torch.Tensor)), None)
        self.envs: dict[int | None, dict] = {}
        #: id(tensor) -> (tensor, what the evaluation reads for a get_attr of it: a meta
        #: stand-in, or a copy that in-place ops may change)
        self.stand_ins: dict[int, tuple] = {}
        #: the example inputs' batch size: the first tensor input's axis 0 (None: none)
        self.batch = next((t.shape[0] for t in inputs_by_name.values()
                           if isinstance(t, torch.Tensor) and t.dim()), None)

    def values(self, node: torch.fx.Node, batches: list[int | None]) -> list:
        """``node``'s value for each batch size of ``batches`` (None: the examples')."""
        try:
            return self._values(node, batches)
        except _NoMeta:
            self.on_meta, self.envs, self.stand_ins = False, {}, {}
            return self._values(node, batches)

    def _needed(self, node: torch.fx.Node, env: dict) -> list[torch.fx.Node]:
        """``node`` and its ancestors not yet in ``env``, each after its inputs."""
        needed, seen, stack = [], set(env), [(node, False)]
        while stack:
            n, inputs_done = stack.pop()
            if inputs_done:
                needed.append(n)
            elif n not in seen:
                seen.add(n)
                stack.append((n, True))
                stack.extend((a, False) for a in n.all_input_nodes if a not in seen)
        return needed

    def _values(self, node: torch.fx.Node, batches: list[int | None]) -> list:
        from graphshape.frontends.torch_fx import (PlainArgsMixin, _on_meta,
                                                   _python_state_kept)

        plans = [(batch, self._needed(node, self.envs.setdefault(batch, {})))
                 for batch in batches]
        # the modules that run (the graph's leaf calls): their state, hooks, modes and
        # tensors are what the evaluation could touch; get_attr tensors are copied
        running = nn.ModuleList({id(m): m for m in (
            self.root.get_submodule(n.target) for _, needed in plans for n in needed
            if n.op == "call_module")}.values())
        device = self.device if self.on_meta else None
        stand_ins = self.stand_ins

        class Interp(PlainArgsMixin, torch.fx.Interpreter):
            def get_attr(self, target, args, kwargs):
                value = super().get_attr(target, args, kwargs)
                if not isinstance(value, torch.Tensor):
                    return value
                if id(value) not in stand_ins:  # (kept with the tensor: ids stay its own)
                    stand_ins[id(value)] = (value, torch.empty_like(value, device="meta")
                                            if device is not None else value.clone())
                return stand_ins[id(value)][1]

            def call_function(self, target, args, kwargs):
                # a meta tensor reports the device of the tensors it stands in for
                if device is not None and target is getattr and len(args) == 2 and \
                        isinstance(args[0], torch.Tensor) and args[0].is_meta:
                    if args[1] == "device":
                        return device
                    if args[1] in ("is_meta", "is_cuda"):
                        return device.type == args[1][3:]
                return super().call_function(target, args, kwargs)

            def call_method(self, target, args, kwargs):
                if device is not None and target == "get_device" and isinstance(
                        args[0], torch.Tensor) and args[0].is_meta:
                    return -1 if device.type == "cpu" else device.index
                return super().call_method(target, args, kwargs)

        interp = Interp(self.root, garbage_collect_values=False, graph=self.graph)
        # fx's patches of nn.Module.__call__ / __getattr__ and of wrapped functions are
        # undone while the model runs: they would record the real calls into the graph
        revert = getattr(torch.fx._symbolic_trace, "_maybe_revert_all_patches")
        with revert(), _python_state_kept(running), _modes_kept(running), \
                _hooks_off(running), torch.no_grad(), rng_kept(self.inputs_by_name.values()), \
                (_on_meta(running) if self.on_meta else buffers_kept(running)):
            running.eval()
            for batch, needed in plans:
                interp.env = env = self.envs[batch]
                for n in needed:
                    if n.op == "placeholder":
                        env[n] = self._input(n, batch)
                        continue
                    try:
                        env[n] = interp.run_node(n)
                    except Exception as exc:
                        if self.on_meta:
                            raise _NoMeta from exc
                        raise
        return [self.envs[batch][node] for batch in batches]

    def _input(self, n: torch.fx.Node, batch: int | None):
        name = n.target.lstrip("*")
        if name in self.inputs_by_name:
            value = self.inputs_by_name[name]
            if not isinstance(value, torch.Tensor):
                return value
            if value.dim() and value.shape[0] == self.batch and batch not in (None,
                                                                               self.batch):
                if self.on_meta:
                    return torch.empty((batch, *value.shape[1:]), dtype=value.dtype,
                                       device="meta")
                return torch.cat([value] * math.ceil(batch / self.batch))[:batch]
            return torch.empty_like(value, device="meta") if self.on_meta else value
        if name in self.fixed:
            return self.fixed[name]
        if n.args:
            return n.args[0]  # the parameter's default
        raise KeyError(name)


def rng_kept(tensors):
    """``torch.random.fork_rng`` for the CPU and the CUDA devices of ``tensors``: random
    numbers a forward draws while graphshape reads the model (``torch.rand_like``, dropout
    in training mode) leave the user's random state as it was."""
    devices = sorted({t.device.index or 0 for t in tensors
                      if isinstance(t, torch.Tensor) and t.device.type == "cuda"})
    return torch.random.fork_rng(devices=devices)


def meta_can_stand_in(module: nn.Module, inputs, *, hooks_run: bool) -> bool:
    """Whether 'meta' tensors can stand in for ``inputs`` and ``module``'s tensors when the
    module runs (shape inference without compute): floating-point inputs (integer ones may
    be indices, whose values the real kernels check), one floating dtype (float32 or
    float64) and one device (meta kernels skip some checks the real ones make); no global
    forward hooks, nor module hooks where ``hooks_run`` (a hook would see the stand-ins)."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    if hooks_run and any(m._forward_hooks or m._forward_pre_hooks for m in module.modules()):
        return False
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    if not all(t.is_floating_point() for t in tensors):
        return False
    tensors += [*module.parameters(), *module.buffers()]
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    devices = {t.device for t in tensors}
    return (len(dtypes) == 1 and dtypes <= {torch.float32, torch.float64}
            and len(devices) == 1 and next(iter(devices)).type != "meta")


@contextlib.contextmanager
def _modes_kept(module: nn.Module):
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


#: nn.Module's stores of forward hooks
_HOOK_STORES = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


@contextlib.contextmanager
def _hooks_off(module: nn.Module):
    """The modules' forward hooks off while the graph is evaluated: the graph does not call
    a leaf module's hooks (fx records what it computes), and a hook that records what it
    sees (Hugging Face's output capturing, which collects ``hidden_states``) would keep
    values of the evaluation and give the rest of the trace wrong ones."""
    saved = []
    try:
        for mod in module.modules():
            for store in _HOOK_STORES:
                hooks = getattr(mod, store, None)
                if hooks:
                    saved.append((mod, store, hooks))
                    setattr(mod, store, type(hooks)())
        yield
    finally:
        for mod, store, hooks in saved:
            setattr(mod, store, hooks)


@contextlib.contextmanager
def buffer_values_kept(module: nn.Module):
    """The values of ``module``'s buffers put back on exit, in the same tensors: torch.fx
    hands a forward its module's buffers themselves (not Proxies), so an in-place update
    of one (``self.steps.add_(1)``) runs on the user's tensor while tracing."""
    saved = [(t, t.clone()) for t in {id(t): t for t in module.buffers()}.values()]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, value in saved:
                if not torch.equal(t, value):
                    t.copy_(value)


@contextlib.contextmanager
def buffers_kept(module: nn.Module):
    """Each buffer replaced by a copy while the model runs (a counter or running statistic a
    forward updates in eval mode changes the copy)."""
    swapped = []
    try:
        for mod in module.modules():
            for name, t in mod._buffers.items():
                if t is not None:
                    swapped.append((mod._buffers, name, t))
                    mod._buffers[name] = t.clone()
        yield
    finally:
        for store, name, t in reversed(swapped):
            store[name] = t


#: with them, torch's own (``torch.cuda.amp.autocast`` calls ``torch.autocast``)
_TORCH_FILES = (*_TRACING_FILES, os.path.dirname(torch.__file__))


def _model_line(skipped: tuple[str, ...] = _TRACING_FILES) -> tuple[str, str]:
    """(``file:line``, the source line) of the model's code that asked for a value: the
    first caller outside ``skipped`` (directories)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(skipped):
        frame = frame.f_back
    if frame is None:
        return "?", ""
    import linecache

    filename, line = frame.f_code.co_filename, frame.f_lineno
    return f"{os.path.basename(filename)}:{line}", linecache.getline(filename, line).strip()


#: torch functions taking sizes as separate arguments (``torch.zeros(B, C, H, W)``): given
#: a traced size there, torch's argument parser raises "zeros() takes 1 positional argument
#: but 4 were given" (the tuple form, ``torch.zeros((B, C, H, W))``, fx records)
_SIZES_AS_ARGUMENTS = ("zeros", "ones", "empty", "rand", "randn")
#: torch functions taking Python data or an int, recorded as called when a traced size is
#: among them: ``torch.tensor(N)`` / ``torch.as_tensor([H, W])`` cannot read one, and
#: ``torch.eye(C)`` / ``torch.randperm(N)`` would be answered for the example's size (a
#: tensor, not a traced value: ``torch.eye(C).expand(B, -1, -1)`` then fails)
_AS_CALLED = ("tensor", "as_tensor", "eye", "randperm")


#: Tensor methods taking sizes, which a tensor that is not traced (a buffer where the
#: buffers are read as they are: ConViT's ``self.rel_indices``, which its forward replaces,
#: once the model has run: ``.expand(B, -1, -1, -1)``) cannot take as traced values
#: ("expand() takes 1 positional argument but 4 were given"). No dunder: set on torch.Tensor
#: even for a while, one changes the type's slots for the rest of the process
#: (``__getitem__`` made tensors sequences: "len() of a 0-d tensor" in the TorchScript
#: exporter), so there ``buffer[:, :T]`` is answered for the example's T, and checked
_SIZE_METHODS = ("expand", "view", "reshape", "repeat", "tile", "new_zeros", "new_ones",
                 "new_empty", "new_full", "narrow", "unflatten", "repeat_interleave", "split")


def _holds_proxy(value) -> bool:
    found = []
    torch.fx.node.map_aggregate(value, lambda v: found.append(v) if isinstance(
        v, torch.fx.Proxy) else v)
    return bool(found)


def _recorded_with_sizes(tracer, fn, as_called: bool):
    """``fn`` recorded as a call when traced sizes are among its arguments; the sizes as one
    tuple (the form torch's parser takes from a Proxy) where they were separate."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if as_called and _holds_proxy(args):
            return tracer.create_proxy("call_function", fn, args, kwargs)
        if not as_called and len(args) > 1 and _holds_proxy(args):
            return tracer.create_proxy("call_function", fn, (tuple(args),), kwargs)
        return fn(*args, **kwargs)

    return call


def _method_recorded(tracer, name: str, method):
    """Tensor method ``name`` recorded as a call (of the tensor as fx stores a constant: a
    ``get_attr`` of the module's buffer) when traced values are among its arguments."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if _holds_proxy((args, kwargs)):
            return tracer.create_proxy("call_method", name, (self, *args), kwargs)
        return method(self, *args, **kwargs)

    return call


@contextlib.contextmanager
def _set_for_now(owner, name: str, value):
    """``owner.name = value`` until exit; then the attribute as it was: put back where
    ``owner`` had its own, deleted where it was inherited (most Tensor methods are
    TensorBase's)."""
    own = owner.__dict__.get(name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if own is None:
            delattr(owner, name)
        else:
            setattr(owner, name, own)


@contextlib.contextmanager
def _torch_calls_patched(tracer):
    """While tracing, :data:`_SIZES_AS_ARGUMENTS`, :data:`_AS_CALLED` and the Tensor methods
    :data:`_SIZE_METHODS` take traced sizes (:func:`_recorded_with_sizes`,
    :func:`_method_recorded`), and ``torch.autocast`` takes a traced device type
    (:func:`_autocast_noted`); the originals are put back after."""
    autocast = torch.amp.autocast_mode.autocast
    init, enter = _autocast_noted(tracer, autocast.__init__, autocast.__enter__)
    with contextlib.ExitStack() as patches:
        for name in (*_SIZES_AS_ARGUMENTS, *_AS_CALLED):
            fn = _recorded_with_sizes(tracer, getattr(torch, name), name in _AS_CALLED)
            patches.enter_context(_set_for_now(torch, name, fn))
        for name in _SIZE_METHODS:
            method = _method_recorded(tracer, name, getattr(torch.Tensor, name))
            patches.enter_context(_set_for_now(torch.Tensor, name, method))
        patches.enter_context(_set_for_now(autocast, "__init__", init))
        patches.enter_context(_set_for_now(autocast, "__enter__", enter))
        for owner, name, checkpointed in _checkpoint_noted(tracer):
            patches.enter_context(_set_for_now(owner, name, checkpointed))
        yield


def _checkpoint_noted(tracer) -> list[tuple[Any, str, Any]]:
    """``torch.utils.checkpoint``'s two ways in (reentrant: ``CheckpointFunction.apply``;
    not: ``_checkpoint_without_reentrant_generator_impl``, both looked up when
    ``checkpoint`` is called, so models that imported ``checkpoint`` itself are seen), each
    call noted in ``tracer.checkpointed`` and then made as it was: fx traces through the
    checkpointed function, and the shaped model keeps its activations for the backward
    pass, which the report says (gradient checkpointing saves memory in training)."""
    from torch.utils import checkpoint as ckpt

    def note():
        where, source = _model_line(_TORCH_FILES)
        tracer.checkpointed.append(f"{where} `{source}`")

    without_reentrant = ckpt._checkpoint_without_reentrant_generator_impl
    reentrant = ckpt.CheckpointFunction.apply

    @functools.wraps(without_reentrant)
    def traced_generator(*args, **kwargs):
        note()
        return without_reentrant(*args, **kwargs)

    def traced_apply(cls, *args):
        note()
        return reentrant(*args)

    return [(ckpt, "_checkpoint_without_reentrant_generator_impl", traced_generator),
            (ckpt.CheckpointFunction, "apply", classmethod(traced_apply))]


def _autocast_noted(tracer, init, enter):
    """``torch.autocast``'s ``__init__`` and ``__enter__`` while tracing: a traced device type
    (EfficientViT's ``torch.autocast(device_type=v.device.type, enabled=False)``, which
    autocast refuses: "Expected `device_type` of type `str`") stands as "cpu", and each
    region entered is noted in ``tracer.autocast``. fx records no autocast region (entering
    one changes no traced op), so what it is entered with does not reach the graph; the
    shaped model computes the region as the code around it, which the report says."""

    def traced_init(self, device_type, *args, **kwargs):
        init(self, "cpu" if isinstance(device_type, torch.fx.Proxy) else device_type,
             *args, **kwargs)

    def traced_enter(self):
        where, source = _model_line(_TORCH_FILES)
        state = "enabled" if self._enabled else "disabled"
        tracer.autocast.append(f"{where} `{source}` ({state})")
        return enter(self)

    return traced_init, traced_enter


class Proxy(torch.fx.Proxy):
    """fx's Proxy, which asks its tracer for ``int()``, ``float()``, ``operator.index`` (a
    size in ``range``, a slice, ``math.ceil``) and ``len()`` where fx raises."""

    def __getattr__(self, k: str):
        return Attribute(self, k)

    def __len__(self) -> int:
        return self.tracer.concrete(self, "len")

    def __int__(self) -> int:
        return self.tracer.concrete(self, "int")

    def __index__(self) -> int:
        return self.tracer.concrete(self, "index")

    def __float__(self) -> float:
        return self.tracer.concrete(self, "float")

    def __setitem__(self, key, value) -> None:
        # x[key] = value, which fx's Proxy refuses ("does not support item assignment"):
        # recorded as the call it is; the loader reads it out of place
        # (graphshape.torch_modules.assigned) where no other view of x sees the change
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


class Attribute(Proxy, torch.fx.proxy.Attribute):
    """fx's Attribute (``x.shape`` before it is called or read) as a :class:`Proxy`."""


class ShapeSpecializingTracer(torch.fx.Tracer):
    """A Tracer that answers Python's questions about traced sizes for the example inputs
    (module docstring). Set :meth:`use_examples` before tracing; without examples it raises
    as fx does."""

    #: set by :meth:`use_examples`: (root, fixed parameters, example inputs by name)
    _example_setup: tuple | None = None
    examples: ExampleValues | None = None

    def use_examples(self, root: nn.Module, inputs: tuple, fixed: dict[str, Any]) -> None:
        """Answer for ``root(*inputs)``, with ``fixed`` the parameters traced at a constant
        (:func:`graphshape.frontends.torch_fx._fixed_args`)."""
        import inspect

        try:
            params = [p for p in inspect.signature(root.forward).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            return
        if len(inputs) > len(params):
            return  # forward(*xs) given several inputs: fx traces them as one value
        self._example_setup = (root, fixed, {p.name: v for p, v in zip(params, inputs)})

    def trace(self, root, concrete_args=None):
        self.examples = None
        #: fx node -> whether it reads metadata only (:func:`reads_metadata_only`)
        self.metadata_memo: dict = {}
        #: "file:line `source` -> value" of each branch taken for the examples, in order
        self.specialized: list[str] = []
        #: "file:line `source` (enabled|disabled)" of each autocast region entered
        self.autocast: list[str] = []
        #: "file:line `source`" of each torch.utils.checkpoint call traced through
        self.checkpointed: list[str] = []
        with _torch_calls_patched(self):
            return super().trace(root, concrete_args)

    def _values(self) -> ExampleValues | None:
        if self.examples is None and self._example_setup is not None:
            root, fixed, by_name = self._example_setup
            self.examples = ExampleValues(root, self.graph, fixed, by_name)
        return self.examples

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return Proxy(node, self)

    def to_bool(self, obj) -> bool:
        return self.concrete(obj, "bool")

    def iter(self, obj):
        if self._values() is None:
            return super().iter(obj)
        length = len(obj)  # (checked: see concrete)
        return iter([obj[i] for i in range(length)])

    def concrete(self, obj, read: str):
        """``read`` (``"bool"``, ``"int"``, ``"float"``, ``"index"``, ``"len"``) of
        ``obj``'s value for the example inputs, checked in the graph
        (:func:`graphshape.torch_modules.check_traced_branch`); fx's TraceError where the
        value is not a function of sizes (``len`` reads a size only) or depends on the batch
        size."""
        values = self._values()
        if values is None or not (read == "len" or reads_metadata_only(obj.node,
                                                                       self.metadata_memo)):
            super().to_bool(obj)  # fx's "... cannot be used as inputs to control flow"
        where, source = _model_line()
        place = f"`{source}` ({where})"
        convert = _tm._BRANCH_READS[read]
        batch = values.batch
        probes = [b for b in ((1, 2 * batch + 1) if batch else ()) if b != batch]
        try:
            value, *others = map(convert, values.values(obj.node, [None, *probes]))
            for other, answer in zip(probes, others):
                if answer != value:
                    raise torch.fx.proxy.TraceError(
                        f"{read}() of a traced size at {place} depends on the batch size "
                        f"({value!r} for the example inputs' {batch}, {answer!r} for "
                        f"{other}): the trace would be right for some batch sizes only")
        except torch.fx.proxy.TraceError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure: a TraceError, as fx's
            raise torch.fx.proxy.TraceError(
                f"{read}() of a traced size at {place} could not be computed for the example "
                f"inputs ({type(exc).__name__}: {str(exc)[:200]})") from None
        self.create_proxy("call_function", _tm.check_traced_branch,
                          (obj, read, value, place), {})
        self.specialized.append(f"{where} `{source}` -> {value!r}")
        return value
