"""Torch backend: graphshape IR -> ``torch.fx.GraphModule``.

``emit(graph)`` writes one fx node per IR node, named :func:`fx_name` of the IR node's
name (``gm.meta["graphshape_nodes"]`` maps every IR node name to its fx node name, and is
authoritative where two names collide after sanitizing). Ops with weights or state become
real ``torch.nn`` modules (``nn.Conv2d``, ``nn.Linear``, ``nn.BatchNorm2d``, ...) whose
parameters are fresh ``nn.Parameter`` copies of ``node.params``; the module sits at
``node.meta["module_path"]`` when the frontend recorded one (so a torch model's
``state_dict`` keys survive a round trip), else at the fx node name. Constants are buffers
(or parameters when ``attrs["trainable"]``). Nothing in ``forward`` creates a tensor on a
fixed device, so the result follows ``.to(device)`` and compiles with ``torch.compile``.

:data:`TORCH_EMITTERS` maps every canonical op to its emitter
``fn(ctx, node, xs) -> fx value``; ``xs`` are the fx values of ``node.inputs``.
"""

from __future__ import annotations

import builtins
import copy
import keyword
import math
import operator
import re
from typing import Any, Callable

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from graphshape import torch_modules as tm
from graphshape.errors import GraphshapeError
from graphshape.ir import Graph, Node, Ref, map_template

__all__ = ["emit", "fx_name", "TORCH_EMITTERS"]

_ILLEGAL = re.compile(r"[^0-9a-zA-Z_]+")
# names fx's generated code binds itself (torch.fx.graph._custom_builtins)
_FX_RESERVED = frozenset({"inf", "nan", "NoneType", "torch", "device", "fx_pytree", "pytree"})
#: a GraphModule's own attributes (methods, properties, instance state): a submodule or
#: tensor stored under one of these names would shadow it or be shadowed (a fused
#: activation named after its trailing cast, 'to': `self.to(x)` called Module.to, and a
#: parameter 'float' is refused by register_parameter)
_MODULE_ATTRIBUTES = frozenset(dir(torch.fx.GraphModule(nn.Module(), torch.fx.Graph())))


def fx_name(ir_name: str) -> str:
    """The fx node name for IR node ``ir_name``: non-identifier characters become ``_``, a
    leading digit gets a ``_`` prefix, and Python keywords / builtins get a ``_`` suffix
    (fx would otherwise rename them)."""
    name = _ILLEGAL.sub("_", ir_name) or "_unnamed"
    if name[0].isdigit():
        name = "_" + name
    if keyword.iskeyword(name) or name in builtins.__dict__ or name in _FX_RESERVED:
        name += "_"
    return name


def _pads(node: Node, dims: int) -> tuple[tuple, tuple]:
    pads = tuple(node.attrs.get("pads") or (0,) * (2 * dims))
    if len(pads) != 2 * dims:
        raise GraphshapeError(f"pads {pads} do not match {dims} spatial dims", node=node.name, op=node.op)
    return tuple(int(p) for p in pads[:dims]), tuple(int(p) for p in pads[dims:])


def _torch_pad(begin, end) -> list[int]:
    """ONNX-order begin/end pads -> F.pad's (last dim first) list, leading zero pairs trimmed."""
    out = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [int(b), int(e)]
    while len(out) > 2 and out[-1] == 0 and out[-2] == 0:
        out = out[:-2]
    return out


class _Ctx:
    """Emission state: the fx graph being built and the modules/tensors it refers to."""

    def __init__(self, graph: Graph, copy_params: bool = True,
                 trainable_initializers: bool = False):
        self.g = graph
        self.copy_params = copy_params
        self.trainable_initializers = trainable_initializers
        self.fx = torch.fx.Graph()
        self.attrs: dict[str, Any] = {}        # target -> module / tensor
        self.non_persistent: list[str] = []    # buffer targets the state_dict leaves out
        # the source's buffers no node reads any more (a scalar written as a number, one
        # folded into an activation), kept in the state_dict: {target: tensor}
        self.unread_state: dict[str, torch.Tensor] = {}
        self.used_targets: set[str] = set()
        self.target_prefixes: set[str] = set()
        self.values: dict[str, Any] = {}       # IR name -> fx node (or list for split)
        self.getitems: dict[Ref, torch.fx.Node] = {}
        self.names: dict[str, str] = {}        # IR name -> fx name
        self.reserved = {fx_name(n) for n in graph.nx.nodes}
        # a tensor several places share in the source (node.meta["shared_params"]): its
        # name -> (the first place's array, or None for an opaque module's, its tensor)
        self.shared: dict[str, tuple[Any, torch.Tensor]] = {}
        # one deepcopy memo for every opaque module: a module called twice is one copy,
        # and opaque modules sharing a parameter still share it
        self.copy_memo: dict[int, Any] = {}

    # ------------------------------------------------------------- naming
    def _aux_name(self, base: str) -> str:
        name, i = fx_name(base), 1
        while name in self.reserved:
            name = f"{fx_name(base)}_aux{i}"
            i += 1
        self.reserved.add(name)
        return name

    def _main_name(self, node: Node) -> str:
        return fx_name(node.name)

    def _record(self, node: Node, fx_node: torch.fx.Node) -> torch.fx.Node:
        self.names[node.name] = fx_node.name
        return fx_node

    def target_for(self, node: Node, *, prefer_path: bool = True) -> str:
        """A free attribute path for the node's module: its source module path when free."""
        candidates = []
        path = node.meta.get("module_path") if prefer_path else None
        if isinstance(path, str) and path and all(p and p.isprintable() for p in path.split(".")):
            candidates.append(path)
        candidates.append(fx_name(node.name))
        for cand in candidates:
            if self._target_free(cand):
                return self._claim(cand)
        base, i = fx_name(node.name), 1
        while not self._target_free(f"{base}_{i}"):
            i += 1
        return self._claim(f"{base}_{i}")

    def _target_free(self, target: str) -> bool:
        if (target in self.used_targets or target in self.target_prefixes
                or target.split(".")[0] in _MODULE_ATTRIBUTES):
            return False
        parts = target.split(".")
        return not any(".".join(parts[:k]) in self.used_targets for k in range(1, len(parts)))

    def _claim(self, target: str) -> str:
        self.used_targets.add(target)
        parts = target.split(".")
        for k in range(1, len(parts)):
            self.target_prefixes.add(".".join(parts[:k]))
        return target

    # ------------------------------------------------------------- building fx nodes
    def module(self, node: Node, mod: nn.Module, args, kwargs=None) -> torch.fx.Node:
        target = self._same_module_target(node, mod)
        if target is None:
            target = self.target_for(node)
            self.attrs[target] = mod
        fx_node = self.fx.create_node("call_module", target, tuple(args), kwargs or {},
                                      name=self._main_name(node))
        return self._record(node, fx_node)

    def _same_module_target(self, node: Node, mod: nn.Module) -> str | None:
        """The target of the module already emitted for the same source module when
        ``mod`` is that module again (a module the source calls twice: same class, same
        settings, the same tensors), so that it stays one module, called twice."""
        path = node.meta.get("module_path")
        prev = self.attrs.get(path) if isinstance(path, str) else None
        if prev is mod:
            return path
        if not isinstance(prev, nn.Module) or type(prev) is not type(mod):
            return None
        if prev._modules or mod._modules:  # a container: compared by identity only
            return None
        settings = lambda m: {k: v for k, v in vars(m).items() if not k.startswith("_")}  # noqa: E731
        try:
            if settings(prev) != settings(mod):
                return None
        except Exception:  # settings that do not compare with == (tensors)
            return None
        for a, b in ((prev._parameters, mod._parameters), (prev._buffers, mod._buffers)):
            if a.keys() != b.keys() or any(
                    (a[k] is None) != (b[k] is None)
                    or (a[k] is not None and _storage_key(a[k]) != _storage_key(b[k]))
                    for k in a):
                return None
        return path

    def function(self, node: Node, fn: Callable, args, kwargs=None) -> torch.fx.Node:
        fx_node = self.fx.create_node("call_function", fn, tuple(args), kwargs or {},
                                      name=self._main_name(node))
        return self._record(node, fx_node)

    def method(self, node: Node, name: str, args, kwargs=None) -> torch.fx.Node:
        fx_node = self.fx.create_node("call_method", name, tuple(args), kwargs or {},
                                      name=self._main_name(node))
        return self._record(node, fx_node)

    def aux_function(self, base: str, fn: Callable, args, kwargs=None) -> torch.fx.Node:
        return self.fx.create_node("call_function", fn, tuple(args), kwargs or {},
                                   name=self._aux_name(base))

    def value(self, ref: Ref):
        entry = self.values[ref.node]
        if isinstance(entry, list):  # several outputs: getitem on the tuple node
            if ref not in self.getitems:
                self.getitems[ref] = self.aux_function(f"{ref.node}_{ref.index}", operator.getitem,
                                                       (entry[0], ref.index))
            return self.getitems[ref]
        if ref.index != 0:
            raise GraphshapeError(f"node {ref.node!r} has one output; output {ref.index} was asked for",
                                  node=ref.node)
        return entry

    def template(self, value):
        """Replace Refs in an argument template by fx values."""
        return map_template(value, lambda v: self.value(v) if isinstance(v, Ref) else v)

    # ------------------------------------------------------------- tensors
    def tensor(self, node: Node, name: str) -> torch.Tensor:
        arr = node.params.get(name)
        if arr is None:
            raise GraphshapeError(f"missing parameter {name!r}", node=node.name, op=node.op)
        tied = (node.meta.get("shared_params") or {}).get(name)
        if tied is not None and tied in self.shared:
            t = self._shared_tensor(tied, arr)
            if t is not None:
                return t
            tied = None
        arr = np.asarray(arr)
        if arr.dtype.name == "bfloat16":  # (ml_dtypes' bfloat16, as onnx reads it: torch
            # takes no such array; the same 16 bits)
            t = torch.from_numpy(np.array(arr.view(np.int16), copy=True)).view(torch.bfloat16)
        elif self.copy_params or not arr.flags.writeable:
            # (C order: a transposed view, a MatMul weight read as a linear's, becomes a
            # contiguous parameter)
            t = torch.from_numpy(np.array(arr, copy=True, order="C"))
        else:  # the caller hands the graph's arrays over (see emit); np.require keeps a
            # 0-d array 0-d (np.ascontiguousarray makes it 1-d)
            t = torch.from_numpy(np.require(arr, requirements="C"))
        if node.meta.get("torch_dtype") == "bfloat16":
            t = t.to(torch.bfloat16)
        if tied is not None:
            self.shared[tied] = (arr, t)
        return t

    def _shared_tensor(self, tied: str, arr: np.ndarray) -> torch.Tensor | None:
        """The tensor already emitted for shared tensor ``tied`` when ``arr`` still holds its
        value (a pass that re-initialized or scaled one place but not the other made them
        two tensors: None)."""
        first, t = self.shared[tied]
        if first is arr:
            return t
        if tuple(np.shape(arr)) != tuple(t.shape):
            return None
        return t if np.array_equal(np.asarray(arr), t.detach().float().cpu().numpy()) else None

    def share_opaque_tensors(self, node: Node, mod: nn.Module) -> None:
        """Let an opaque module's copy hold the shared tensors (``meta["shared_params"]``:
        parameter path -> source name) that emitted layers also use."""
        for path, tied in (node.meta.get("shared_params") or {}).items():
            owner_path, _, attr = path.rpartition(".")
            owner = mod.get_submodule(owner_path)
            store = owner._parameters if attr in owner._parameters else owner._buffers
            t = store.get(attr)
            if t is None:
                continue
            if tied not in self.shared:
                self.shared[tied] = (None, t.detach())
                continue
            first = self.shared[tied][1]
            if _storage_key(first) == _storage_key(t):  # this very copy (a module called twice)
                continue
            if first.shape == t.shape and torch.equal(first.detach().cpu().to(t.dtype),
                                                      t.detach().cpu()):
                store[attr] = (nn.Parameter(first, requires_grad=t.requires_grad)
                               if isinstance(t, nn.Parameter) else first)

    def rank(self, node: Node, slot: int = 0) -> int | None:
        info = self.g.info(node.inputs[slot])
        return None if info.shape is None else len(info.shape)


def _build(ctx: _Ctx, node: Node, cls, param_names: dict[str, str] | None = None,
           fills: dict[str, float] | None = None, **kwargs) -> nn.Module:
    """``cls(**kwargs)`` built on the meta device (no random init), then given copies of
    ``node.params`` as parameters/buffers. ``param_names`` maps module attribute -> IR param
    name (default: the same name); ``fills`` gives constant values for parameters the node
    lacks (a norm with a scale but no shift)."""
    mod = cls(**kwargs, device="meta")
    param_names = param_names or {}
    fills = fills or {}
    for attr, p in list(mod.named_parameters(recurse=False)):
        key = param_names.get(attr, attr)
        if key not in node.params and attr in fills:
            like = ctx.tensor(node, next(k for k in ("weight", "bias") if k in node.params))
            t = torch.full(p.shape, fills[attr], dtype=like.dtype)
        else:
            t = ctx.tensor(node, key)
        if tuple(t.shape) != tuple(p.shape):
            raise GraphshapeError(f"parameter {attr!r} has shape {tuple(t.shape)}, "
                                  f"{cls.__name__} expects {tuple(p.shape)}", node=node.name, op=node.op)
        setattr(mod, attr, nn.Parameter(t, requires_grad=True))
    for attr, b in list(mod.named_buffers(recurse=False)):
        key = param_names.get(attr, attr)
        if key in node.params:
            t = ctx.tensor(node, key)
            if tuple(t.shape) != tuple(b.shape):
                raise GraphshapeError(f"buffer {attr!r} has shape {tuple(t.shape)}, "
                                      f"{cls.__name__} expects {tuple(b.shape)}", node=node.name, op=node.op)
            if attr == "num_batches_tracked":
                t = t.to(torch.long)
        elif attr == "num_batches_tracked":
            t = torch.zeros((), dtype=torch.long)
        elif attr == "running_var":
            t = torch.ones(b.shape, dtype=b.dtype)
        else:
            t = torch.zeros(b.shape, dtype=b.dtype)
        mod._buffers[attr] = t
    return mod


def _dims(ctx: _Ctx, node: Node, default: int | None = None) -> int:
    dims = node.attrs.get("dims")
    if dims is None:
        r = ctx.rank(node)
        dims = default if r is None else max(r - 2, 1)
    if dims not in (1, 2, 3):
        raise GraphshapeError(f"{dims}-d {node.op} is not supported by torch (1, 2 or 3 spatial dims)",
                              node=node.name, op=node.op)
    return dims


def _layer_class(node: Node, cls: type) -> tuple[type, dict]:
    """``(cls, {})``, or its scaled sibling (graphshape.torch_modules.SCALED_LAYERS) and the
    scales it takes when a fold moved a scale onto the layer (``weight_scale`` /
    ``bias_scale``, passes.fold)."""
    scales = {k: float(node.attrs.get(k, 1.0)) for k in ("weight_scale", "bias_scale")}
    if all(v == 1.0 for v in scales.values()):
        return cls, {}
    return tm.SCALED_LAYERS[cls], scales


# ----------------------------------------------------------------------------- emitters
def _e_input(ctx, node, xs):
    args = (node.attrs["default"],) if "default" in node.attrs else ()
    name = fx_name(node.name)
    # forward(self, *xs) given several example inputs: the tuple is one input, taken as *xs
    stars = _stars(node.attrs.get("name"))
    return ctx._record(node, ctx.fx.create_node("placeholder", stars + name, args, {}, name=name))


def _stars(source_name) -> str:
    """``"*"`` / ``"**"`` for a ``*args`` / ``**kwargs`` parameter's name, else ``""``."""
    if not isinstance(source_name, str) or not source_name.startswith("*"):
        return ""
    return "**" if source_name.startswith("**") else "*"


def _trainable_constant(ctx, node: Node) -> bool:
    """A parameter rather than a buffer: the source's parameter, or (when asked) a float
    initializer of an ONNX file that no layer took as its weight."""
    return bool(node.attrs.get("trainable") or (
        ctx.trainable_initializers and node.meta.get("initializer")
        and node.params["value"].dtype.kind == "f"))


def _e_constant(ctx, node, xs):
    t = ctx.tensor(node, "value")
    trainable = _trainable_constant(ctx, node)
    if trainable:
        t = nn.Parameter(t, requires_grad=True)
    target = ctx.target_for(node)
    ctx.attrs[target] = t
    if not trainable and not node.meta.get("persistent"):
        # a buffer the state_dict leaves out, unless the source's state_dict held it: an
        # ONNX file's shape integers and folded constants, a tensor built in forward
        ctx.non_persistent.append(target)
    return ctx._record(node, ctx.fx.create_node("get_attr", target, (), {}, name=fx_name(node.name)))


def _e_output(ctx, node, xs):
    return xs[0]


def _e_conv(ctx, node, xs):
    a = node.attrs
    dims = _dims(ctx, node, len(node.params["weight"].shape) - 2)
    begin, end = _pads(node, dims)
    x = xs[0]
    mode = a.get("padding_mode", "zeros")
    padding: Any = begin
    if begin != end:
        if mode != "zeros":
            raise GraphshapeError(f"asymmetric pads with padding_mode={mode!r}", node=node.name, op=node.op)
        x = ctx.aux_function(f"{node.name}_pad", F.pad, (x, _torch_pad(begin, end)))
        padding = (0,) * dims
    w = node.params["weight"]
    groups = int(a.get("groups", 1))
    cls, scales = _layer_class(node, (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1])
    mod = _build(ctx, node, cls, **scales, in_channels=int(w.shape[1]) * groups,
                 out_channels=int(w.shape[0]),
                 kernel_size=tuple(w.shape[2:]), stride=tuple(a.get("stride", (1,) * dims)),
                 padding=tuple(padding), dilation=tuple(a.get("dilation", (1,) * dims)),
                 groups=groups, bias="bias" in node.params, padding_mode=mode)
    return ctx.module(node, mod, (x,))


def _e_conv_transpose(ctx, node, xs):
    a = node.attrs
    w = node.params["weight"]
    dims = _dims(ctx, node, len(w.shape) - 2)
    begin, end = _pads(node, dims)
    sym = begin == end
    groups = int(a.get("groups", 1))
    cls, scales = _layer_class(
        node, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 1])
    mod = _build(ctx, node, cls, **scales, in_channels=int(w.shape[0]),
                 out_channels=int(w.shape[1]) * groups,
                 kernel_size=tuple(w.shape[2:]), stride=tuple(a.get("stride", (1,) * dims)),
                 padding=tuple(begin) if sym else (0,) * dims,
                 output_padding=tuple(a.get("output_padding", (0,) * dims)),
                 groups=groups, bias="bias" in node.params,
                 dilation=tuple(a.get("dilation", (1,) * dims)))
    if sym:
        return ctx.module(node, mod, (xs[0],))
    # asymmetric pads: full transposed conv, then crop begin/end from each spatial dim
    target = ctx.target_for(node)
    ctx.attrs[target] = mod
    full = ctx.fx.create_node("call_module", target, (xs[0],), {}, name=ctx._aux_name(f"{node.name}_full"))
    index = (slice(None), slice(None)) + tuple(slice(b, -e if e else None) for b, e in zip(begin, end))
    return ctx.function(node, operator.getitem, (full, index))


def _e_linear(ctx, node, xs):
    w = node.params["weight"]
    cls, scales = _layer_class(node, nn.Linear)
    mod = _build(ctx, node, cls, **scales, in_features=int(w.shape[1]),
                 out_features=int(w.shape[0]), bias="bias" in node.params)
    return ctx.module(node, mod, (xs[0],))


def _e_matmul(ctx, node, xs):
    return ctx.function(node, torch.matmul, (xs[0], xs[1]))


def _binary(fn):
    def e(ctx, node, xs):
        if len(xs) != 2:
            raise GraphshapeError(f"{node.op} takes 2 inputs, got {len(xs)}", node=node.name, op=node.op)
        alpha = node.attrs.get("alpha", 1)
        if alpha not in (1, None):
            return ctx.function(node, torch.add, (xs[0], xs[1]), {"alpha": alpha})
        return ctx.function(node, fn, (xs[0], xs[1]))
    return e


#: ops whose torch output is a fresh tensor (never a view of an input) that their own
#: backward does not read: a module that is its only reader may write over it
_FRESH_OUTPUT_OPS = frozenset({"conv", "linear", "add", "sub", "mul", "div"})


def _overwritable(ctx: _Ctx, node: Node, slot: int) -> bool:
    """Whether ``node`` may overwrite its input ``slot`` in place (as torchvision's
    ``nn.ReLU(inplace=True)`` does): the value comes from a fresh-output op (a conv, a
    binary op, a sum of two or more inputs) and ``node`` reads it once and nothing else
    reads it (not another node, not the model's outputs)."""
    ref = node.inputs[slot]
    producer = ctx.g[ref.node]
    fresh = producer.op in _FRESH_OUTPUT_OPS or (producer.op == "sum" and len(producer.inputs) >= 2)
    if not fresh or len(producer.outputs) != 1:
        return False
    use = ctx.g.sole_use(ref)
    return use is not None and (use[0].name, use[1]) == (node.name, slot)


def _e_sum(ctx, node, xs):
    weights = node.attrs.get("weights")
    if weights is None and len(xs) == 2:
        return ctx.function(node, operator.add, tuple(xs))
    if weights is not None and len(weights) != len(xs):
        raise GraphshapeError(f"{len(weights)} weights for {len(xs)} inputs", node=node.name, op=node.op)
    over = [i for i in range(len(xs)) if _overwritable(ctx, node, i)]
    # an input of weight 1 is overwritten as is; another one would first be scaled in place
    over = next((i for i in over if weights is None or weights[i] == 1.0), over[0] if over else None)
    return ctx.module(node, tm.WeightedSum(weights, overwrite_input=over), tuple(xs))


def _e_concat(ctx, node, xs):
    return ctx.function(node, torch.cat, (list(xs),), {"dim": int(node.attrs.get("axis", 1))})


_ACT_MODULES: dict[str, Callable[..., nn.Module]] = {
    "relu": lambda: nn.ReLU(), "relu6": lambda: nn.ReLU6(),
    "leaky_relu": lambda negative_slope=0.01: nn.LeakyReLU(negative_slope),
    "elu": lambda alpha=1.0: nn.ELU(alpha), "selu": lambda: nn.SELU(),
    "gelu": lambda: nn.GELU(approximate="tanh"), "gelu_exact": lambda: nn.GELU(),
    "silu": lambda: nn.SiLU(), "swish": lambda: nn.SiLU(), "mish": lambda: nn.Mish(),
    "hardswish": lambda: nn.Hardswish(), "hardsigmoid": lambda: nn.Hardsigmoid(),
    "hardtanh": lambda min_val=-1.0, max_val=1.0: nn.Hardtanh(min_val, max_val),
    "tanh": lambda: nn.Tanh(), "sigmoid": lambda: nn.Sigmoid(),
    "softplus": lambda: nn.Softplus(), "softsign": lambda: nn.Softsign(),
}


def _e_activation(ctx, node, xs):
    a = dict(node.attrs)
    name = a.pop("name", None)
    transform = a.pop("transform", None)
    if a.pop("learnable_slope", False):
        return _e_prelu(ctx, node, xs, transform)
    a = tm.plain_attrs(a)
    if name not in tm.ACTIVATION_FUNCTIONS:
        raise GraphshapeError(f"activation {name!r} has no torch implementation; known: "
                              f"{', '.join(sorted(tm.ACTIVATION_FUNCTIONS))}", node=node.name, op=node.op)
    # relu, or leaky_relu with a slope >= 0: its output's sign tells its input's
    relu_like = name == "relu" or (name == "leaky_relu"
                                   and float(a.get("negative_slope", 0.01)) >= 0)
    if transform:
        mod = tm.TransformedActivation(name, transform, overwrite_input=_overwritable(ctx, node, 0),
                                       **a)
    elif relu_like and _overwritable(ctx, node, 0):
        # in place as torchvision's nn.ReLU(inplace=True) (what a folded TReLU becomes,
        # graphshape.passes.fold); torch has no in-place backward for a negative slope
        try:
            mod = (nn.ReLU(inplace=True, **a) if name == "relu"
                   else nn.LeakyReLU(a.pop("negative_slope", 0.01), inplace=True, **a))
        except TypeError:
            raise GraphshapeError(f"activation {name!r} does not take attributes {sorted(a)}",
                                  node=node.name, op=node.op) from None
    elif name == "leaky_relu" and relu_like and set(a) <= {"negative_slope"}:
        # read by other layers too: out of place, with the backward of the in-place one
        mod = tm.LeakyReLU(float(a.get("negative_slope", 0.01)))
    elif name in _ACT_MODULES:
        try:
            mod = _ACT_MODULES[name](**a)
        except TypeError:
            raise GraphshapeError(f"activation {name!r} does not take attributes {sorted(a)}",
                                  node=node.name, op=node.op) from None
    else:
        mod = tm.Activation(name, **a)
    return ctx.module(node, mod, (xs[0],), )


def _e_prelu(ctx, node, xs, transform):
    """A leaky_relu with learnable slopes: ``nn.PReLU``, or graphshape's
    ``TransformedPReLU`` under a transform; the slopes are ``params["weight"]``."""
    weight = ctx.tensor(node, "weight").reshape(-1)
    mod = (tm.TransformedPReLU(weight.numel(), transform) if transform
           else nn.PReLU(weight.numel()))
    mod.weight = nn.Parameter(weight, requires_grad=True)
    return ctx.module(node, mod, (xs[0],))


def _channel_norm(ctx, node, xs, classes):
    """batch_norm and instance_norm: the same constructor arguments, 1/2/3-d by rank."""
    a = node.attrs
    cls = classes[_dims(ctx, node, 2) - 1]
    channels = a.get("num_features") or len(next(iter(node.params.values())))
    mod = _build(ctx, node, cls, num_features=int(channels), eps=float(a.get("eps", 1e-5)),
                 momentum=a.get("momentum", 0.1),
                 fills={"weight": 1.0, "bias": 0.0},
                 affine=a.get("affine", "weight" in node.params or "bias" in node.params),
                 track_running_stats=a.get("track_running_stats", "running_mean" in node.params))
    return ctx.module(node, mod, (xs[0],))


def _e_batch_norm(ctx, node, xs):
    if node.attrs.get("frozen"):
        mod = tm.FrozenBatchNorm(int(node.attrs.get("num_features") or
                                     len(node.params["running_mean"])),
                                 eps=float(node.attrs.get("eps", 1e-5)))
        for name in ("weight", "bias", "running_mean", "running_var"):
            if name in node.params:
                mod._buffers[name] = ctx.tensor(node, name)
        return ctx.module(node, mod, (xs[0],))
    return _channel_norm(ctx, node, xs, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))


def _e_instance_norm(ctx, node, xs):
    return _channel_norm(ctx, node, xs, (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d))


def _e_layer_norm(ctx, node, xs):
    a = node.attrs
    mod = _build(ctx, node, nn.LayerNorm, normalized_shape=tuple(a["normalized_shape"]),
                 eps=float(a.get("eps", 1e-5)),
                 fills={"weight": 1.0, "bias": 0.0},
                 elementwise_affine="weight" in node.params or "bias" in node.params,
                 bias="bias" in node.params)
    return ctx.module(node, mod, (xs[0],))


def _e_rms_norm(ctx, node, xs):
    a = node.attrs
    mod = _build(ctx, node, nn.RMSNorm, normalized_shape=tuple(a["normalized_shape"]),
                 eps=a.get("eps"), elementwise_affine="weight" in node.params)
    return ctx.module(node, mod, (xs[0],))


def _e_std_norm(ctx, node, xs):
    a = node.attrs
    mod = tm.StdNorm(tuple(a["normalized_shape"]), float(a["eps"]), bool(a.get("centre", True)),
                     int(a.get("correction", 0)), a.get("eps_added_to", "variance"))
    return ctx.module(node, mod, (xs[0],))


def _e_group_norm(ctx, node, xs):
    a = node.attrs
    mod = _build(ctx, node, nn.GroupNorm, num_groups=int(a["num_groups"]),
                 num_channels=int(a["num_channels"]), eps=float(a.get("eps", 1e-5)),
                 fills={"weight": 1.0, "bias": 0.0},
                 affine="weight" in node.params or "bias" in node.params)
    return ctx.module(node, mod, (xs[0],))


def _e_lrn(ctx, node, xs):
    a = node.attrs
    size = int(a["size"])
    args = dict(size=size, alpha=float(a.get("alpha", 1e-4)), beta=float(a.get("beta", 0.75)),
                k=float(a.get("k", 1.0)))
    mod = nn.LocalResponseNorm(**args) if size % 2 else tm.LocalResponseNorm(**args)
    return ctx.module(node, mod, (xs[0],))


def _e_affine(ctx, node, xs):
    shift = ctx.tensor(node, "shift") if "shift" in node.params else None
    mod = tm.Affine(ctx.tensor(node, "scale"), shift, int(node.attrs.get("axis", 1)),
                    rank=ctx.rank(node))
    return ctx.module(node, mod, (xs[0],))


def _pool_window(ctx, node):
    """``(dims, begin, end, kernel, stride, ceil_mode)`` of a pooling node's attributes
    (stride defaults to the kernel, as in ONNX)."""
    a = node.attrs
    dims = _dims(ctx, node, len(a["kernel_shape"]))
    begin, end = _pads(node, dims)
    kernel = tuple(int(k) for k in a["kernel_shape"])
    stride = tuple(int(s) for s in a.get("stride") or kernel)
    return dims, begin, end, kernel, stride, bool(a.get("ceil_mode", False))


def _e_avg_pool(ctx, node, xs):
    dims, begin, end, kernel, stride, ceil_mode = _pool_window(ctx, node)
    include = bool(node.attrs.get("count_include_pad", False))
    cls = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[dims - 1]
    x = xs[0]
    if begin == end and all(p <= k // 2 for p, k in zip(begin, kernel)):
        mod = cls(kernel, stride, begin, ceil_mode, include)
        return ctx.module(node, mod, (x,))
    if include:
        x = ctx.aux_function(f"{node.name}_pad", F.pad, (x, _torch_pad(begin, end)))
        return ctx.module(node, cls(kernel, stride, 0, ceil_mode, True), (x,))
    return ctx.function(node, tm.avg_pool_exclude_pad,
                        (x, tuple(begin + end), kernel, stride, ceil_mode))


def _e_max_pool(ctx, node, xs):
    dims, begin, end, kernel, stride, ceil_mode = _pool_window(ctx, node)
    dilation = tuple(int(d) for d in node.attrs.get("dilation") or (1,) * dims)
    cls = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[dims - 1]
    x = xs[0]
    padding = begin
    if begin != end or any(p > k // 2 for p, k in zip(begin, kernel)):
        x = ctx.aux_function(f"{node.name}_pad", F.pad, (x, _torch_pad(begin, end)),
                             {"value": -math.inf})
        padding = (0,) * dims
    return ctx.module(node, cls(kernel, stride, padding, dilation, ceil_mode=ceil_mode), (x,))


def _global(avg: bool):
    def e(ctx, node, xs):
        r = ctx.rank(node)
        if r is None or r - 2 not in (1, 2, 3):
            dims_axes = None
        else:
            dims_axes = r - 2
        if dims_axes is None:
            # rank unknown: reduce over every dim after the channel axis
            return ctx.function(node, tm.global_pool, (xs[0],), {"avg": avg})
        cls = ((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d) if avg else
               (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d))[dims_axes - 1]
        return ctx.module(node, cls(1), (xs[0],))
    return e


def _adaptive(avg: bool):
    def e(ctx, node, xs):
        size = tuple(node.attrs["output_size"])
        dims = int(node.attrs.get("dims") or len(size))
        cls = ((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d) if avg else
               (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d))[dims - 1]
        return ctx.module(node, cls(size if len(size) > 1 else size[0]), (xs[0],))
    return e


def _e_flatten(ctx, node, xs):
    return ctx.function(node, torch.flatten, (xs[0], int(node.attrs.get("start_dim", 1)),
                                              int(node.attrs.get("end_dim", -1))))


def _e_reshape(ctx, node, xs):
    shape = node.attrs.get("shape")
    if shape is None:
        raise GraphshapeError("reshape without a static `shape` attribute (a shape computed at run "
                              "time) cannot be emitted to torch", node=node.name, op=node.op)
    # canonical reshape: -1 is inferred, 0 is a real 0 (frontends resolve ONNX's "copy"),
    # except at copy_dims
    entries = [ctx.template(s) if isinstance(s, Ref) else int(s) for s in shape]
    copy_dims = tuple(int(i) for i in node.attrs.get("copy_dims") or ())
    if copy_dims:
        return ctx.function(node, tm.reshape_copying, (xs[0], tuple(entries), copy_dims))
    return ctx.method(node, "reshape", (xs[0], tuple(entries)))


def _e_transpose(ctx, node, xs):
    return ctx.function(node, torch.permute, (xs[0], tuple(int(p) for p in node.attrs["perm"])))


def _e_depth_to_space(ctx, node, xs):
    a = node.attrs
    if a.get("mode", "CRD") == "CRD":  # (written as the source wrote it)
        return ctx.function(node, F.pixel_shuffle, (xs[0], int(a["blocksize"])))
    return ctx.function(node, tm.depth_to_space, (xs[0], int(a["blocksize"])))


def _e_space_to_depth(ctx, node, xs):
    a = node.attrs
    if a.get("mode", "CRD") == "CRD":
        return ctx.function(node, F.pixel_unshuffle, (xs[0], int(a["blocksize"])))
    return ctx.function(node, tm.space_to_depth, (xs[0], int(a["blocksize"])))


def _e_squeeze(ctx, node, xs):
    axes = node.attrs.get("axes")
    if axes is None:
        return ctx.function(node, torch.squeeze, (xs[0],))
    return ctx.function(node, torch.squeeze, (xs[0], tuple(int(a) for a in axes)))


def _e_unsqueeze(ctx, node, xs):
    axes = tuple(int(a) for a in node.attrs["axes"])
    if len(axes) == 1:
        return ctx.function(node, torch.unsqueeze, (xs[0], axes[0]))
    return ctx.function(node, tm.unsqueeze_axes, (xs[0], axes))


def _e_slice(ctx, node, xs):
    a = node.attrs
    axes = [int(v) for v in a["axes"]]
    starts = [int(v) for v in a["starts"]]
    ends = [int(v) for v in a["ends"]]
    steps = [int(v) for v in (a.get("steps") or [1] * len(axes))]
    if all(s > 0 for s in steps) and all(ax >= 0 for ax in axes):
        index = [slice(None)] * (max(axes) + 1)
        for ax, s, e, st in zip(axes, starts, ends, steps):
            index[ax] = slice(s, e, None if st == 1 else st)
        return ctx.function(node, operator.getitem, (xs[0], tuple(index)))
    return ctx.function(node, tm.slice_axes, (xs[0], tuple(axes), tuple(starts), tuple(ends), tuple(steps)))


def _e_split(ctx, node, xs):
    sizes = [int(s) for s in node.attrs["sizes"]]
    fx_node = ctx.function(node, torch.split, (xs[0], sizes), {"dim": int(node.attrs.get("axis", 0))})
    return [fx_node]


def _e_pad(ctx, node, xs):
    a = node.attrs
    pads = tuple(int(p) for p in a["pads"])
    r = len(pads) // 2
    mode = {"edge": "replicate", "wrap": "circular"}.get(a.get("mode", "constant"), a.get("mode", "constant"))
    torch_pads = _torch_pad(pads[:r], pads[r:])
    kwargs = {"mode": mode}
    if mode == "constant":
        kwargs["value"] = float(a.get("value", 0.0) or 0.0)
    return ctx.function(node, F.pad, (xs[0], torch_pads), kwargs)


def _e_dropout(ctx, node, xs):
    a = node.attrs
    variant = a.get("variant", "Dropout")
    p = float(a.get("p", 0.5))
    if variant == "StochasticDepth":
        from torchvision.ops import StochasticDepth

        mod = StochasticDepth(p, a.get("mode", "row"))
    else:
        cls = {"Dropout": nn.Dropout, "Dropout1d": nn.Dropout1d, "Dropout2d": nn.Dropout2d,
               "Dropout3d": nn.Dropout3d, "AlphaDropout": nn.AlphaDropout}.get(variant)
        if cls is None:
            raise GraphshapeError(f"unknown dropout variant {variant!r}", node=node.name, op=node.op)
        mod = cls(p)
    return ctx.module(node, mod, (xs[0],))


def _e_identity(ctx, node, xs):
    return ctx.module(node, nn.Identity(), (xs[0],))


def _e_cast(ctx, node, xs):
    return ctx.method(node, "to", (xs[0], getattr(torch, node.attrs["dtype"])))


def _e_softmax(log: bool):
    def e(ctx, node, xs):
        mod = (nn.LogSoftmax if log else nn.Softmax)(dim=int(node.attrs.get("axis", -1)))
        return ctx.module(node, mod, (xs[0],))
    return e


def _e_reduce(ctx, node, xs):
    a = node.attrs
    kind = a.get("kind", "mean")
    axes = a.get("axes")
    axes = None if axes is None else tuple(int(v) for v in axes)
    keepdim = bool(a.get("keepdims", True))
    if kind == "prod":
        return ctx.function(node, tm.reduce_prod, (xs[0], axes, keepdim))
    fn = {"mean": torch.mean, "sum": torch.sum, "max": torch.amax, "min": torch.amin}.get(kind)
    if fn is None:
        raise GraphshapeError(f"unknown reduction {kind!r}", node=node.name, op=node.op)
    if axes is None and kind in ("max", "min"):
        axes = ()
    return ctx.function(node, fn, (xs[0],), {"dim": axes, "keepdim": keepdim})


def _onnx_attribute(attr) -> Any:
    """An ONNX AttributeProto as the Python value graphshape.onnx_functions takes."""
    import onnx
    from onnx import numpy_helper

    value = onnx.helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, onnx.TensorProto):  # ConstantOfShape's value
        array = numpy_helper.to_array(value)
        return array.reshape(-1)[0].item() if array.size else 0
    if attr.name == "to":  # Cast
        return _onnx_torch_dtype(value)
    return list(value) if isinstance(value, (list, tuple)) else value


def _onnx_torch_dtype(elem_type: int) -> torch.dtype:
    import onnx

    if elem_type == onnx.TensorProto.BFLOAT16:
        return torch.bfloat16
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    return torch.from_numpy(np.zeros(0, np_dtype)).dtype


def _e_onnx_function(ctx, node, xs):
    """An opaque ONNX node as a call to its graphshape.onnx_functions function, or None
    when there is none for its op type and opset."""
    import inspect

    from graphshape import onnx_functions

    a = node.attrs
    entry = onnx_functions.ONNX_FUNCTIONS.get(a.get("op_type")) if not a.get("domain") else None
    multi = a.get("op_type") in onnx_functions.MULTI_OUTPUT
    if entry is None or a.get("outer_scope") or (
            not multi and (a.get("absent_outputs") or len(node.outputs) != 1)):
        return None
    fn, (first, last) = entry
    if not first <= int(a.get("source_opset") or first) <= last:
        return None
    kwargs = onnx_functions.attribute_keywords(
        a["op_type"], {k: _onnx_attribute(v) for k, v in (a.get("attributes") or {}).items()})
    if a["op_type"] == "ConstantOfShape":
        tensor = (a.get("attributes") or {}).get("value")
        kwargs["dtype"] = (_onnx_torch_dtype(tensor.t.data_type) if tensor is not None
                           else torch.float32)
    positions = a.get("input_positions") or tuple(range(len(xs)))
    args = [None if p is None else xs[p] for p in positions]
    while args and args[-1] is None:
        args.pop()
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError:  # an attribute or input the function does not take
        return None
    except ValueError:  # a torch builtin (torch.eq, ...): its ONNX op has no attributes
        if kwargs or None in args:
            return None
    called = ctx.function(node, fn, tuple(args), kwargs)
    return [called] if multi else called  # a tuple: its outputs are read by getitem


def _e_opaque(ctx, node, xs):
    a = node.attrs
    if a.get("framework") == "onnx":
        emitted = _e_onnx_function(ctx, node, xs)
        if emitted is not None:
            return emitted
    if a.get("framework") != "torch":
        desc = a.get("description") or a.get("op_type") or "?"
        raise GraphshapeError(
            f"opaque {a.get('framework', 'unknown')} op {desc} cannot be emitted to torch; "
            "emit this graph with graphshape.to_onnx, or replace the op in the source model",
            node=node.name, op=node.op)
    args = ctx.template(a.get("args", ()))
    kwargs = ctx.template(a.get("kwargs", {}))
    fx_op = a["fx_op"]
    if fx_op == "call_module":
        mod = copy.deepcopy(a["module"], ctx.copy_memo)
        ctx.share_opaque_tensors(node, mod)
        return ctx.module(node, mod, args, kwargs)
    if fx_op == "call_function":
        return ctx.function(node, a["target"], args, kwargs)
    if fx_op == "call_method":
        return ctx.method(node, a["target"], args, kwargs)
    if fx_op == "get_attr":
        target = ctx.target_for(node)
        ctx.attrs[target] = copy.deepcopy(a["value"])
        return ctx._record(node, ctx.fx.create_node("get_attr", target, (), {}, name=fx_name(node.name)))
    raise GraphshapeError(f"unknown fx op {fx_op!r}", node=node.name, op=node.op)


#: canonical resize mode -> torch interpolate mode by spatial dims (None: any)
_INTERPOLATE_MODES = {"nearest": {None: "nearest"}, "nearest-exact": {None: "nearest-exact"},
                      "linear": {1: "linear", 2: "bilinear", 3: "trilinear"},
                      "cubic": {2: "bicubic"}}


def _e_resize(ctx, node, xs):
    a = node.attrs
    dims = _dims(ctx, node, 2)
    by_dims = _INTERPOLATE_MODES.get(a.get("mode"), {})
    mode = by_dims.get(None) or by_dims.get(dims)
    if mode is None:
        raise GraphshapeError(f"torch has no {dims}-d {a.get('mode')!r} interpolation",
                              node=node.name, op=node.op)
    kwargs = {"mode": mode}
    if a.get("mode") in ("linear", "cubic"):
        kwargs["align_corners"] = bool(a.get("align_corners", False))
        if a.get("antialias"):
            kwargs["antialias"] = True
    sizes = a.get("sizes")
    if sizes is not None:
        kwargs["size"] = (ctx.template(sizes) if isinstance(sizes, Ref)
                          else tuple(ctx.template(s) if isinstance(s, Ref) else int(s)
                                     for s in sizes))
    else:
        kwargs["scale_factor"] = tuple(float(f) for f in a["scales"])
    return ctx.function(node, F.interpolate, (xs[0],), kwargs)


#: canonical op -> emitter ``fn(ctx, node, xs)``
TORCH_EMITTERS: dict[str, Callable] = {
    "input": _e_input, "output": _e_output, "constant": _e_constant,
    "conv": _e_conv, "conv_transpose": _e_conv_transpose, "linear": _e_linear,
    "matmul": _e_matmul,
    "add": _binary(operator.add), "sub": _binary(operator.sub), "mul": _binary(operator.mul),
    "div": _binary(operator.truediv), "sum": _e_sum, "concat": _e_concat,
    "activation": _e_activation,
    "batch_norm": _e_batch_norm, "layer_norm": _e_layer_norm, "rms_norm": _e_rms_norm,
    "std_norm": _e_std_norm,
    "group_norm": _e_group_norm,
    "instance_norm": _e_instance_norm, "lrn": _e_lrn, "affine": _e_affine,
    "avg_pool": _e_avg_pool, "max_pool": _e_max_pool,
    "global_avg_pool": _global(True), "global_max_pool": _global(False),
    "adaptive_avg_pool": _adaptive(True), "adaptive_max_pool": _adaptive(False),
    "flatten": _e_flatten, "reshape": _e_reshape, "transpose": _e_transpose,
    "depth_to_space": _e_depth_to_space, "space_to_depth": _e_space_to_depth,
    "squeeze": _e_squeeze, "unsqueeze": _e_unsqueeze, "slice": _e_slice, "split": _e_split,
    "pad": _e_pad, "dropout": _e_dropout, "identity": _e_identity, "cast": _e_cast,
    "resize": _e_resize,
    "softmax": _e_softmax(False), "log_softmax": _e_softmax(True), "reduce": _e_reduce,
    "opaque": _e_opaque,
}


def _untie_initializers(graph: Graph) -> Graph:
    """``graph``, or a copy of it (sharing its arrays) in which each node reading an ONNX
    initializer constant (``meta["initializer"]``) that several nodes read has a copy of
    its own: the exporter writes equal tensors once (the 1e-6 layer scales of a ConvNeXt
    stage are one initializer), and a parameter shared by the layers would train as one.
    As for layers' weights (docs/CONTRACTS.md), the file's sharing is not taken for tying."""
    shared = [node for node in graph if node.op == "constant" and node.meta.get("initializer")
              and len(graph.users(node.name)) > 1]
    if not shared:
        return graph
    graph = graph.copy(share=[v for node in graph for v in node.params.values()])
    for original in shared:
        node = graph[original.name]
        users = graph.users(node.name)
        for user in users[1:]:
            twin = Node(graph.unique_name(node.name), "constant", [], dict(node.attrs),
                        {"value": np.array(node.params["value"], copy=True)},
                        list(node.outputs), {**node.meta, "module_path": None})
            graph.add(twin, after=node.name)
            graph.replace_uses(node.out, twin.out,
                               exclude=[u.name for u in users if u.name != user.name])
    return graph


def emit(graph: Graph, *, copy_params: bool = True,
         trainable_initializers: bool = False) -> torch.fx.GraphModule:
    """Emit ``graph`` as a ``torch.fx.GraphModule`` (see the module docstring).

    ``copy_params=False`` lets the module's parameters share memory with the graph's
    arrays instead of copying them: for callers that discard the graph afterwards and whose
    graph shares no arrays with anything else (the shaping API: after re-initialization
    every array is the graph's own), saving one copy of all weights.

    ``trainable_initializers=True``: the float initializers of an ONNX file that are no
    layer's weight (a ViT's ``pos_embed``, a layer scale, a relative-position bias table;
    also a folded constant or an attention mask the exporter stored) become parameters
    instead of buffers, one per node that reads them (an initializer several nodes read is
    the exporter's merge of equal tensors more often than a tie). The file does not say
    which of them were parameters; a graph read from a PyTorch model keeps the source's
    choice either way."""
    if trainable_initializers:
        graph = _untie_initializers(graph)
    ctx = _Ctx(graph, copy_params, trainable_initializers)
    for node in graph:
        emitter = TORCH_EMITTERS.get(node.op)
        if emitter is None:
            raise GraphshapeError(f"op {node.op!r} has no torch emitter", node=node.name, op=node.op)
        xs = [ctx.value(r) for r in node.inputs]
        if node.op == "output":
            ctx.values[node.name] = xs[0]
            continue
        if (node.op == "constant" and not _trainable_constant(ctx, node)
                and _inlinable_scalar(graph, node)):
            # a 0-d constant that only feeds arithmetic is written as a Python number
            # (as in the source `x * 0.5`): no buffer, no state_dict entry
            ctx.values[node.name] = node.params["value"].item()
            if node.meta.get("persistent"):  # (the source's buffer: kept, unread)
                ctx.unread_state[ctx.target_for(node)] = ctx.tensor(node, "value")
            continue
        try:
            ctx.values[node.name] = emitter(ctx, node, xs)
        except GraphshapeError:
            raise
        except Exception as exc:
            raise GraphshapeError(f"emitting {node.op} to torch failed: {type(exc).__name__}: {exc}",
                                  node=node.name, op=node.op) from exc
    for node in graph.meta.get("folded_state") or ():
        # a source buffer folded into an activation (elementwise.py): unread, but in the
        # source's state_dict
        ctx.unread_state[ctx.target_for(node)] = ctx.tensor(node, "value")
    _add_fixed_args(ctx, graph.meta.get("fixed_args"))
    template = graph.meta.get("torch_output")
    if template is not None:
        result = _map_outputs(ctx, template)
    else:
        outs = [ctx.values[n] for n in graph.output_nodes]
        result = outs[0] if len(outs) == 1 else tuple(outs)
    ctx.fx.output(result)
    class_name = str(graph.meta.get("model_class") or "GraphModule")
    gm = torch.fx.GraphModule(ctx.attrs, ctx.fx, class_name=class_name)
    for target in ctx.non_persistent:
        owner_path, _, name = target.rpartition(".")
        owner = gm.get_submodule(owner_path)
        owner.register_buffer(name, owner._buffers[name], persistent=False)
    for target, tensor in ctx.unread_state.items():
        # (GraphModule copies only the attributes its graph reads)
        owner = gm
        for part in target.split(".")[:-1]:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        owner.register_buffer(target.rpartition(".")[2], tensor)
    gm.meta["graphshape_nodes"] = dict(ctx.names)
    gm.train(bool(graph.meta.get("training", True)))
    _tie_shared(gm, ctx)
    _restore_placement(gm, graph)
    frozen = set(graph.meta.get("frozen_params") or ())
    for name, param in gm.named_parameters():
        if name in frozen:  # requires_grad=False in the source, by the same name
            param.requires_grad_(False)
    return gm


def _storage_key(t: torch.Tensor) -> tuple:
    """What makes two tensors the same data: storage, offset, shape, strides, dtype."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
            t.dtype, t.device)


def _tie_shared(gm: torch.fx.GraphModule, ctx: _Ctx) -> None:
    """Make every parameter (buffer) built on a shared tensor's data the same
    ``nn.Parameter`` (tensor) object, as in the source: ``head.weight is emb.weight``, one
    gradient, one optimizer entry. Done before the module moves to its device and dtype,
    which keeps shared objects shared."""
    keys = {_storage_key(t) for _, t in ctx.shared.values()}
    if not keys:
        return
    first: dict[tuple, torch.Tensor] = {}
    for mod in gm.modules():
        for store in (mod._parameters, mod._buffers):
            for attr, t in store.items():
                if t is None or _storage_key(t) not in keys:
                    continue
                kept = first.setdefault((_storage_key(t), isinstance(t, nn.Parameter)), t)
                store[attr] = kept


def _add_fixed_args(ctx: _Ctx, fixed: dict | None) -> None:
    """``forward``'s parameters that the torch frontend traced at their defaults
    (``graph.meta["fixed_args"]``), added back after the inputs with those defaults, so the
    shaped model takes the source's calls (``model(x)``, ``model(x, mask=None)``); each is
    checked (:func:`graphshape.torch_modules.check_fixed_arg`), since the graph holds only
    that case."""
    if not fixed:
        return
    placeholders = [n for n in ctx.fx.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else None
    for name, value in fixed.items():
        stars = _stars(name)  # *args / **kwargs, traced empty: no default in the signature
        with ctx.fx.inserting_after(anchor):
            arg = ctx.fx.create_node("placeholder", name, () if stars else (value,), {},
                                     name=ctx._aux_name(name[len(stars):]))
        with ctx.fx.inserting_after(arg):
            anchor = ctx.fx.call_function(tm.check_fixed_arg, (arg, value, name))


def _restore_placement(gm: torch.fx.GraphModule, graph: Graph) -> None:
    """Put the module where the source model was (``graph.meta["torch_dtype"]`` /
    ``["torch_device"]``, set by the torch frontend when all of the source's floating
    tensors share one dtype and all its tensors one device; ``["torch_memory_format"]``, a
    model converted to channels_last): as ``model.to(dtype)`` / ``.to(device)`` /
    ``.to(memory_format=...)`` would. The IR holds float32 numpy arrays for bfloat16, layers
    that passes add (a bias, a transform's constants) are made in the default dtype, and
    everything is emitted on the CPU, contiguous; a half-precision, CUDA or channels_last
    model comes back as one."""
    dtype = graph.meta.get("torch_dtype")
    if dtype is not None:
        gm.to(getattr(torch, dtype))
    device = graph.meta.get("torch_device")
    if device is not None and device != "cpu":
        gm.to(torch.device(device))
    memory_format = graph.meta.get("torch_memory_format")
    if memory_format is not None:  # (the new weights are made contiguous)
        gm.to(memory_format=getattr(torch, memory_format))


_SCALAR_USERS = ("add", "sub", "mul", "div")


def _inlinable_scalar(graph: Graph, node: Node) -> bool:
    value = node.params.get("value")
    if (node.attrs.get("trainable") or not isinstance(value, np.ndarray) or value.ndim != 0
            or value.dtype.kind not in "biuf" or node.meta.get("torch_dtype")):
        return False
    users = graph.users(node.name)
    if not users:
        return False
    for user in users:
        if user.op not in _SCALAR_USERS or len(user.inputs) != 2:
            return False
        other = user.inputs[1] if user.inputs[0].node == node.name else user.inputs[0]
        if other.node == node.name or graph[other.node].op == "constant":
            return False
    return True


def _map_outputs(ctx: _Ctx, template):
    """The torch output structure with each Ref(output node) replaced by its value, and
    each :class:`~graphshape.ir.DictOutput` (a ``ModelOutput``) built by a call to its class,
    as fx builds a named tuple."""
    return map_template(template,
                        lambda v: ctx.values[v.node] if isinstance(v, Ref) else v,
                        lambda cls, items: _build_dict_output(ctx, cls, items))


def _build_dict_output(ctx: _Ctx, cls: type, items: dict):
    """A call building ``cls(**items)`` (:func:`~graphshape.torch_modules.output_call`: by
    the class's name, which survives pickling, or for a class defined inside a function, to
    the class itself; unpickled, that module returns a plain dict); a plain dict when
    neither can."""
    call = tm.output_call(cls, items)
    return items if call is None else ctx.fx.call_function(*call)
