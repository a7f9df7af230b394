"""PyTorch building blocks that graphshape's torch backend emits.

Everything here is device-agnostic (no tensor is created on a fixed device inside
``forward``; constants live in buffers) and ``torch.compile``-able.

:data:`ACTIVATION_FUNCTIONS` maps every name of graphshape's activation registry
(``graphshape.activations``) to the torch function computing it, ``fn(x, **attrs)``.
"""

from __future__ import annotations

import functools
import keyword
import operator
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from graphshape import ops
from graphshape.activations import POSITIVELY_HOMOGENEOUS
from graphshape.errors import GraphshapeError


def _bentid(x: torch.Tensor) -> torch.Tensor:
    """dks' bent identity: (sqrt(x^2 + 1) - 1) / 2 + x."""
    return (torch.sqrt(x * x + 1.0) - 1.0) * 0.5 + x


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


#: registry name -> torch function ``fn(x, **attrs)`` (attrs as in the registry's defaults)
ACTIVATION_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "erf": torch.erf,
    "relu": torch.relu,
    "softplus": F.softplus,
    "selu": torch.selu,
    "elu": F.elu,
    "swish": F.silu,
    "silu": F.silu,
    "bentid": _bentid,
    "atan": torch.atan,
    "asinh": torch.asinh,
    "square": torch.square,
    "squared_relu": lambda x: torch.relu(x).square(),
    "softsign": F.softsign,
    "leaky_relu": F.leaky_relu,
    "gelu": _gelu_tanh,
    "gelu_exact": F.gelu,
    "mish": F.mish,
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    "relu6": F.relu6,
    "hardtanh": F.hardtanh,
}


_TRANSFORM_KEYS = ("input_scale", "input_shift", "output_shift", "output_scale")


def _full_transform(transform: dict, what: str) -> dict[str, float]:
    """``transform`` with every key of :data:`_TRANSFORM_KEYS` (missing ones the identity),
    as floats; GraphshapeError naming ``what`` for an unknown key."""
    unknown = set(transform) - set(_TRANSFORM_KEYS)
    if unknown:
        raise GraphshapeError(f"transform of {what} has unknown keys {sorted(unknown)}; "
                              f"expected {list(_TRANSFORM_KEYS)}")
    return {k: float(transform.get(k, 1.0 if k.endswith("scale") else 0.0))
            for k in _TRANSFORM_KEYS}


def _register_affine_buffers(module: nn.Module, pre: tuple, post: tuple) -> None:
    """``pre_scale``, ``pre_shift``, ``post_scale``, ``post_shift`` as 0-d buffers in the
    default float dtype, so they follow .to(device) and .to(dtype)/.half() with the
    parameters: addcmul then reads them without a conversion. (float64 buffers cost one
    _to_copy per call and pass -- ~250 tiny copies per ResNet-50 training step.)"""
    for key, v in (("pre_scale", pre[0]), ("pre_shift", pre[1]),
                   ("post_scale", post[0]), ("post_shift", post[1])):
        module.register_buffer(key, torch.tensor(v, dtype=torch.get_default_dtype()))


def plain_attrs(attrs: dict) -> dict:
    """Attributes as plain Python values (numpy scalars -> int/float)."""
    return {k: (v.item() if hasattr(v, "item") and not isinstance(v, torch.Tensor) else v)
            for k, v in attrs.items() if k != "inplace"}


def activation_function(name: str) -> Callable[..., torch.Tensor]:
    try:
        return ACTIVATION_FUNCTIONS[name]
    except KeyError:
        raise GraphshapeError(
            f"activation {name!r} has no torch implementation; known: "
            f"{', '.join(sorted(ACTIVATION_FUNCTIONS))}") from None


class Activation(nn.Module):
    """A registry activation that torch has no module for (erf, bentid, atan, ...)."""

    def __init__(self, name: str, **attrs):
        super().__init__()
        self.name = name
        self.attrs = plain_attrs(attrs)
        self.fn = activation_function(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, **self.attrs)

    def extra_repr(self) -> str:
        return ", ".join([repr(self.name)] + [f"{k}={v!r}" for k, v in self.attrs.items()])


# torch >= 2.1 is supported: older releases lack some of these checks
_is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
_is_exporting = getattr(torch.compiler, "is_exporting", None) or (lambda: False)


def _fx_tracing() -> bool:
    """Whether torch.fx is symbolically tracing (a user's ``symbolic_trace`` of a shaped
    model): its proxies have no value, so no branch may read one."""
    trace = torch.fx._symbolic_trace
    check = getattr(trace, "is_fx_symbolic_tracing", None) or getattr(trace, "is_fx_tracing", None)
    return bool(check and check())


def _exporting() -> bool:
    """Whether an exporter or torch.fx is tracing the module (torch.export, ONNX or
    TorchScript export, fx symbolic tracing): they need standard ops, not
    autograd.Functions, and fx cannot branch on a tensor's attributes."""
    return (_fx_tracing() or torch.onnx.is_in_onnx_export() or _is_exporting()
            or torch.jit.is_tracing() or torch.jit.is_scripting())


def _tracing() -> bool:
    """Whether a compiler or exporter is tracing the module. They get out-of-place ops:
    compilers fuse the elementwise passes and plan memory themselves."""
    return _is_compiling() or _exporting()


def recorded_when_traced(fn: Callable) -> Callable:
    """``fn``, called as usual on values, but recorded as one call when torch.fx traces it
    (its arguments are Proxies): as unpickling a GraphModule does, which traces its code
    again. Without this, fx would run ``fn`` on the Proxies, and a function that reads
    values (a size list, an ``is None`` check) fails there or is lost from the graph.
    Uses ``__torch_function__`` dispatch, as ``torch._assert`` does."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.overrides.has_torch_function(args):
            return torch.overrides.handle_torch_function(call, args, *args, **kwargs)
        return fn(*args, **kwargs)

    return call


@recorded_when_traced
def check_fixed_arg(value: Any, fixed: Any, name: str) -> None:
    """Raise when a caller passes ``name=value`` to a shaped model traced with ``name=fixed``
    (its default, which the example inputs left out): the graph holds that case only."""
    if name.startswith("*"):  # *args / **kwargs, traced empty
        if len(value):  # (any container: an exported program's module passes its own kind)
            given = (f"keyword argument(s) {', '.join(map(repr, value))}"
                     if isinstance(value, dict) else f"{len(value)} more positional argument(s)")
            raise GraphshapeError(
                f"this model was traced without extra arguments ({name} empty, as in the "
                f"example call) and computes only that case, not with {given}: to have them, "
                "shape a wrapper module whose forward calls the source model with them")
        return
    if fixed is None:
        same = value is None
    else:
        same = not isinstance(value, torch.Tensor) and value is not None and value == fixed
    if not same:
        todo = (f"shape the source model with a tensor for {name} in the example inputs"
                if fixed is None else
                f"shape a wrapper module whose forward calls the source model with {name}=...")
        raise GraphshapeError(
            f"this model was traced with {name}={fixed!r} (the default of the source's forward, "
            f"which the example inputs did not give) and computes only that case, not "
            f"{name}={value!r}: to have it, {todo}")


#: (module, qualified name) -> class, for :func:`build_output`: filled as the backend emits
#: a call, and from the import on first use after unpickling
_OUTPUT_CLASSES: dict[tuple[str, str], type] = {}


def register_output_class(cls: type) -> tuple[str, str] | None:
    """``(cls.__module__, cls.__qualname__)`` for :func:`build_output`, or None when the class
    cannot be found again by that name (defined inside a function)."""
    if "<locals>" in cls.__qualname__:
        return None
    key = (cls.__module__, cls.__qualname__)
    _OUTPUT_CLASSES[key] = cls
    return key


def output_class(module: str, qualname: str) -> type:
    """The class :func:`register_output_class` named ``(module, qualname)``."""
    cls = _OUTPUT_CLASSES.get((module, qualname))
    if cls is None:
        import importlib
        cls = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        _OUTPUT_CLASSES[(module, qualname)] = cls
    return cls


def output_call(cls: type, items: dict) -> tuple[Callable, tuple, dict] | None:
    """``(target, args, kwargs)`` of a GraphModule call that builds ``cls(**items)``:
    :func:`build_output` by the class's name (it survives pickling, and takes any string
    keys: an FPN's ``OrderedDict`` has "0", "1", ...), or for a class defined inside a
    function, a call to the class (keyword arguments: keys that are identifiers). None when
    neither can."""
    key = register_output_class(cls)
    if key is not None:
        return build_output, (*key, tuple(items), *items.values()), {}
    if all(k.isidentifier() and not keyword.iskeyword(k) for k in items):
        return cls, (), dict(items)
    return None


def same_pads(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
              dilation: Sequence[int]) -> tuple[int, int, int, int]:
    """:func:`graphshape.ops.same_pads` of a 2-d input of ``size`` (H, W), in ``F.pad``
    order: (left, right, top, bottom)."""
    (top, bottom), (left, right) = ops.same_pads(size, kernel, stride, dilation)
    return left, right, top, bottom


@recorded_when_traced
def pad_same(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int],
             dilation: Sequence[int]) -> torch.Tensor:
    """``x`` zero-padded for a "same" convolution (timm's ``pad_same``, before its
    ``StdConv2dSame`` / ``ScaledStdConv2dSame`` / ``Conv2dSame``): by ``x``'s size, so at
    any input size."""
    return F.pad(x, same_pads(x.shape[-2:], kernel, stride, dilation))


@recorded_when_traced
def depth_to_space(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """ONNX DepthToSpace in its default "DCR" mode (its "CRD" mode is ``F.pixel_shuffle``)."""
    n, c, h, w = x.shape
    b = blocksize
    return (x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
            .reshape(n, c // (b * b), h * b, w * b))


def space_to_depth(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """ONNX SpaceToDepth ("DCR" order; torch's ``F.pixel_unshuffle`` is "CRD")."""
    n, c, h, w = x.shape
    b = blocksize
    return (x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
            .reshape(n, c * b * b, h // b, w // b))


def assigned(x: torch.Tensor, key: Any, value: Any) -> torch.Tensor:
    """``x`` after ``x[key] = value``, as a new tensor (``x`` itself unchanged): the source's
    item assignment (timm ConViT's ``rel_indices[:, :, :, 2] = indd``, MViTv2's
    ``attn[:, :, 1:, 1:] = attn[:, :, 1:, 1:] + rel``) read out of place, as graphshape reads
    ``x += y``; the source's later readers of ``x`` read this value instead."""
    out = x.clone()
    out[key] = value
    return out


#: how :func:`check_traced_branch` reads the value Python asked for
_BRANCH_READS = {"bool": bool, "int": int, "float": float, "index": operator.index, "len": len}


@recorded_when_traced
def check_traced_branch(value: Any, read: str, expected: Any, where: str) -> None:
    """Raise unless ``read(value)`` (``"bool"``, ``"int"``, ``"float"``, ``"index"``,
    ``"len"``) is ``expected``: the graph was traced with that answer to a question the
    model's Python code asked about sizes at ``where`` (an ``if`` on a padding, an
    ``int(sqrt(N))``: :mod:`graphshape.frontends.torch_specialize`), so another answer
    would take a path the graph does not have."""
    got = _BRANCH_READS[read](value)
    if got != expected:
        raise GraphshapeError(
            f"this model was traced for inputs of the example inputs' sizes, where {where} "
            f"gave {expected!r}; these inputs give {got!r} and take another path: shape the "
            "source model with example inputs of these sizes to use them")


@recorded_when_traced
def build_output(module: str, qualname: str, keys: tuple, *values) -> dict:
    """The source model's dict-like output, ``cls(**dict(zip(keys, values)))`` (Hugging
    Face's ``ModelOutput``, an ``OrderedDict``). A call by the class's name rather than to
    the class: a GraphModule is traced again when unpickled, and fx turns a dict subclass
    built from Proxies into a plain dict (it keeps named tuples only)."""
    return output_class(module, qualname)(**dict(zip(keys, values)))


def _affine_into(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None,
                 overwrite: bool) -> torch.Tensor:
    """``scale * x + shift`` (``shift`` None: no shift) in one pass, written over ``x``
    when ``overwrite`` (its dtype is kept: the 0-d constants are in the module's dtype)."""
    out = x if overwrite else None
    if shift is None:
        return torch.mul(x, scale, out=out)
    return torch.addcmul(shift, x, scale, out=out)


class _HomogeneousActivation(torch.autograd.Function):
    """``phi(scale * x + shift)`` for relu-like phi, ``scale > 0`` (``scale`` None: no
    affine map). Only the output is saved: with ``scale > 0`` it tells which side of the
    kink every input was on, so the backward is one ``threshold_backward`` /
    ``leaky_relu_backward`` and one mul by ``scale``.

    ``in_place=True``: two passes and one buffer: the affine map writes into a fresh buffer
    (or over ``x`` when ``overwrite``), then phi runs in place on it; the backward scales in
    place. ``in_place=False``: plain out-of-place ops, for compilers (which fuse and plan
    memory themselves) and for inputs that other layers read.

    ``kind`` is ``"threshold"`` (``max(z, m)``: relu with a folded output shift ``m``) or
    ``"leaky_relu"`` (slope ``m >= 0``). The backward is built from differentiable ops, so
    double backward works (phi'' is 0 away from the kink, as for torch's own relu)."""

    @staticmethod
    def forward(ctx, x, scale, shift, kind: str, m: float, overwrite: bool, in_place: bool):
        if in_place:
            y = _affine_into(x, scale, shift, overwrite)
            if kind == "threshold":
                torch.threshold_(y, m, m)
            else:
                F.leaky_relu_(y, m)
            if overwrite:
                ctx.mark_dirty(x)
        else:
            if scale is None:
                z = x
            else:
                z = x * scale if shift is None else torch.addcmul(shift, x, scale)
            y = F.threshold(z, m, m) if kind == "threshold" else F.leaky_relu(z, m)
        ctx.save_for_backward(y, scale)
        ctx.kind, ctx.m, ctx.in_place = kind, m, in_place
        return y

    @staticmethod
    def backward(ctx, grad):
        y, scale = ctx.saved_tensors
        # y > m exactly where phi's input was above m (threshold), y > 0 exactly where it
        # was positive (leaky_relu, slope >= 0)
        if ctx.kind == "threshold":
            gx = torch.ops.aten.threshold_backward(grad, y, ctx.m)
        else:
            gx = torch.ops.aten.leaky_relu_backward(grad, y, ctx.m, True)
        if scale is not None:
            gx = gx.mul_(scale) if ctx.in_place else gx * scale
        return gx, None, None, None, None, None, None


class LeakyReLU(nn.LeakyReLU):
    """``nn.LeakyReLU`` (slope >= 0, out of place) whose backward reads its output, as the
    in-place ``nn.LeakyReLU(inplace=True)``'s does, instead of its input: the layer after it
    keeps the output anyway, so the input need not be kept alive, and under
    ``torch.compile`` no ``x > 0`` bool mask is saved (inductor's CPU kernels store those
    ~25x slower than floats). For a leaky ReLU whose input other layers read too (a folded
    TReLU on a residual stream, :mod:`graphshape.passes.fold`)."""

    def __init__(self, negative_slope: float = 0.01):
        if negative_slope < 0:
            raise GraphshapeError("LeakyReLU with a saved output needs negative_slope >= 0 "
                                  f"(the output's sign must tell the input's), got {negative_slope}")
        super().__init__(negative_slope, inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _exporting() and torch.is_grad_enabled() and x.requires_grad:
            return _HomogeneousActivation.apply(x, None, None, "leaky_relu",
                                                self.negative_slope, False, False)
        return F.leaky_relu(x, self.negative_slope)


class TransformedActivation(nn.Module):
    """``output_scale * (phi(input_scale * x + input_shift) + output_shift)``.

    Computed with as few elementwise passes and fresh buffers as exact algebra allows:

    * for positively homogeneous phi (relu, leaky_relu) and ``input_scale * output_scale
      > 0``, the output scale is folded into the input map
      (``g * phi(a x + b) = phi(g a x + g b)``); for relu the output shift is folded too
      (``relu(y) + d = max(y + d, d)``). Then (relu; leaky_relu with slope >= 0 and no
      output shift) the whole activation is one ``_HomogeneousActivation``: one affine pass
      into one buffer, phi in place on it, and a backward of one mask pass and one scale
      pass that reads only the output;
    * otherwise the input affine map is one ``torch.addcmul`` (one pass), phi, and the
      output affine map one more ``addcmul``; each skipped when identity.

    The shift and scale are 0-dim buffers in the default float dtype (they follow
    ``.to(device/dtype)`` with the parameters). ``overwrite_input=True`` (set by the torch
    backend only where nothing else reads the input: a conv or sum output with this module
    as its one reader, as ``nn.ReLU(inplace=True)`` in torchvision) lets the relu-like path
    write its result over the input tensor instead of a fresh buffer. Under
    ``torch.compile`` with autograd the relu-like path is one out-of-place Function whose
    backward also reads only the output (the compiler fuses the passes; reading the input
    would make it save a bool mask, slow on CPU); under ``torch.export`` / ONNX export, and
    compiled without autograd, the module is the plain formula.
    """

    def __init__(self, name: str, transform: dict, *, overwrite_input: bool = False, **attrs):
        super().__init__()
        self.name = name
        self.attrs = plain_attrs(attrs)
        self.transform = _full_transform(transform, f"activation {name!r}")
        self.fn = activation_function(name)
        self.overwrite_input = bool(overwrite_input)
        a, b = self.transform["input_scale"], self.transform["input_shift"]
        d, g = self.transform["output_shift"], self.transform["output_scale"]
        self.clamp_min: float | None = None  # relu with folded output shift: max(y, clamp_min)
        if name in POSITIVELY_HOMOGENEOUS and a * g > 0 and g > 0:
            pre_scale, pre_shift = g * a, g * b
            if name == "relu":
                pre_shift += g * d
                self.clamp_min = g * d
                post_scale, post_shift = 1.0, 0.0
            else:
                post_scale, post_shift = 1.0, g * d
        else:
            pre_scale, pre_shift, post_scale, post_shift = a, b, g, g * d
        self.pre = (pre_scale, pre_shift) != (1.0, 0.0)
        self.post = (post_scale, post_shift) != (1.0, 0.0)
        # the one-Function path: (kind, m) for _HomogeneousActivation, None where it does not apply
        self._fused: tuple[str, float] | None = None
        if self.clamp_min is not None and self.pre:
            self._fused = ("threshold", self.clamp_min)
        elif (name == "leaky_relu" and pre_scale > 0 and self.pre and not self.post
              and float(self.attrs.get("negative_slope", 0.01)) >= 0):
            self._fused = ("leaky_relu", float(self.attrs.get("negative_slope", 0.01)))
        self._has_shift = pre_shift != 0.0
        # (the exact values stay in self.transform)
        _register_affine_buffers(self, (pre_scale, pre_shift), (post_scale, post_shift))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.pre_scale
        if self._fused is not None and not _exporting() and x.dtype == scale.dtype:
            kind, m = self._fused
            shift = self.pre_shift if self._has_shift else None
            in_place = not _is_compiling()
            if torch.is_grad_enabled() and x.requires_grad:
                # compiled too: a backward that reads phi's output (which the next layer
                # keeps anyway); autograd's own formulas for leaky_relu / threshold read
                # their input, and torch.compile then saves an x > 0 bool mask for the
                # backward, which inductor's CPU kernels store ~25x slower than floats
                # (measured, torch 2.14: ResNet-50 TAT training step 1.20x of the compiled
                # original with it)
                return _HomogeneousActivation.apply(x, scale, shift, kind, m,
                                                    self.overwrite_input and in_place, in_place)
            if in_place:  # no autograd: the same two passes, no Function
                y = _affine_into(x, scale, shift, self.overwrite_input)
                return torch.threshold_(y, m, m) if kind == "threshold" else F.leaky_relu_(y, m)
        if self.pre:
            x = torch.addcmul(self.pre_shift, x, scale)
        if self.clamp_min is not None:
            # max(x, m) as threshold(x, m, m): same values, but its backward is one
            # threshold_backward pass, where clamp_min's is gt + where (measured 4.6x slower
            # forward+backward on an 8x256x24x24 tensor, CPU). torch.onnx.export's
            # TorchScript exporter has no non-zero threshold: it gets clamp_min (a Max).
            if torch.onnx.is_in_onnx_export():
                return torch.clamp_min(x, self.clamp_min)
            return F.threshold(x, self.clamp_min, self.clamp_min)
        y = self.fn(x, **self.attrs)
        if self.post:
            y = torch.addcmul(self.post_shift, y, self.post_scale)
        return y

    def extra_repr(self) -> str:
        t = ", ".join(f"{k}={v:.6g}" for k, v in self.transform.items())
        extra = "".join(f", {k}={v!r}" for k, v in self.attrs.items())
        over = ", overwrite_input=True" if self.overwrite_input else ""
        return f"{self.name!r}{extra}, {t}{over}"


class TransformedPReLU(nn.PReLU):
    """``output_scale * (prelu(input_scale * x + input_shift) + output_shift)``: an
    ``nn.PReLU`` (a leaky ReLU whose negative slopes are parameters, one shared or one per
    channel) under a DKS/TAT transform. Its ``weight`` is nn.PReLU's, under the same name
    and shape, so the model's state_dict keys stay and the slopes keep training.

    prelu is positively homogeneous whatever its slopes, so for ``output_scale > 0`` the
    output scale moves into the input map (``g prelu(a x + b) = prelu(g a x + g b)``): one
    ``addcmul`` pass, ``F.prelu``, and the output shift (if any) one more pass. The constants
    are 0-dim buffers in the default float dtype, as in :class:`TransformedActivation`.
    """

    def __init__(self, num_parameters: int = 1, transform: dict | None = None,
                 init: float = 0.25):
        super().__init__(num_parameters, init)
        self.transform = _full_transform(transform or {}, "a PReLU")
        a, b = self.transform["input_scale"], self.transform["input_shift"]
        d, g = self.transform["output_shift"], self.transform["output_scale"]
        if g > 0:
            pre, post = (g * a, g * b), (1.0, g * d)
        else:
            pre, post = (a, b), (g, g * d)
        self.pre = pre != (1.0, 0.0)
        self.post = post != (1.0, 0.0)
        _register_affine_buffers(self, pre, post)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre:
            x = torch.addcmul(self.pre_shift, x, self.pre_scale)
        y = F.prelu(x, self.weight)
        if self.post:
            y = torch.addcmul(self.post_shift, y, self.post_scale)
        return y

    def extra_repr(self) -> str:
        t = ", ".join(f"{k}={v:.6g}" for k, v in self.transform.items())
        return f"num_parameters={self.num_parameters}, {t}"


class WeightedSum(nn.Module):
    """``sum_i weights[i] * xs[i]`` (``weights`` None: plain sum) with one fresh buffer:
    the first term is written into it (or over ``xs[overwrite_input]`` when the torch
    backend found that nothing else reads that input), and every further input is added
    in place with ``alpha``. Under ``torch.compile`` / export: the plain formula."""

    def __init__(self, weights: Sequence[float] | None = None, *,
                 overwrite_input: int | None = None):
        super().__init__()
        self.weights = None if weights is None else tuple(float(w) for w in weights)
        self.overwrite_input = overwrite_input

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        w = self.weights or (1.0,) * len(xs)
        first = self.overwrite_input if self.overwrite_input is not None else 0
        x0 = xs[first]
        rest = [(x, wi) for i, (x, wi) in enumerate(zip(xs, w)) if i != first]
        if (not rest or _tracing()
                or not all(x.shape == x0.shape and x.dtype == x0.dtype for x, _ in rest)):
            # the plain formula (compilers fuse it; broadcasting or type promotion need it)
            out = x0 if w[first] == 1.0 else x0 * w[first]
            for x, wi in rest:
                out = torch.add(out, x, alpha=wi)
            return out
        if self.overwrite_input is not None:
            out = x0 if w[first] == 1.0 else x0.mul_(w[first])
        elif w[first] == 1.0:  # one fresh buffer, started in one pass
            (x1, w1), rest = rest[0], rest[1:]
            out = torch.add(x0, x1, alpha=w1)
        else:
            out = torch.mul(x0, w[first])
        for x, wi in rest:
            out.add_(x, alpha=wi)
        return out

    def extra_repr(self) -> str:
        over = "" if self.overwrite_input is None else f", overwrite_input={self.overwrite_input}"
        return f"weights={self.weights}{over}"


class _ScaledWeights:
    """Mixin for a conv / linear layer that computes with ``weight_scale * weight`` and
    ``bias_scale * bias``: where :func:`graphshape.passes.fold.fold_scales` (mode
    "weights") moved the constant scale of an activation or of a normalized sum. The
    parameters are the unscaled ones (same ``state_dict`` keys and values as the plain
    layer's), so the gradients are those of the network before folding; the scale costs
    one pass over the weight rather than one over the activation."""

    weight_scale: float = 1.0
    bias_scale: float = 1.0

    def __init__(self, *args, weight_scale: float = 1.0, bias_scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)  # the torch layer's own arguments
        self.weight_scale = float(weight_scale)
        self.bias_scale = float(bias_scale)

    def scaled_weight(self) -> torch.Tensor:
        w = self.weight
        return w if self.weight_scale == 1.0 else w * self.weight_scale

    def scaled_bias(self) -> torch.Tensor | None:
        b = self.bias
        return b if b is None or self.bias_scale == 1.0 else b * self.bias_scale

    def _scales_input(self, x) -> bool:
        """Whether to scale the input rather than the weight: ``layer(s x; W)`` and
        ``layer(x; s W)`` are the same, with the same gradients, so the scale goes on the
        smaller tensor (ResNet-50's last stage at 8x3x224x224: inputs of 0.2-0.8M values,
        weights of 1-2.4M). Never under torch.compile (which scales the output, see forward):
        inductor would fuse ``s x`` into the leaky ReLU that produced ``x``, whose output is
        then not materialized, so its backward saves a bool mask (slow on CPU, see
        TransformedActivation): ResNet-50 TAT training step 1.35x of the compiled floor,
        against 1.02x with the stored parameters folded. Nor when
        exporting (a scaled initializer is constant-folded, onnxruntime does it) or under fx
        symbolic tracing, whose proxies have no size."""
        if (self.weight_scale == 1.0 or not isinstance(x, torch.Tensor) or _exporting()
                or _is_compiling()):
            return False
        return x.numel() < self.weight.numel()

    def _layer(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               *args) -> torch.Tensor:
        """The plain layer with these parameters."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        s = self.weight_scale
        if s != 1.0 and _is_compiling() and not _exporting():
            # s * layer(x; W, b t / s), the same values and gradients: inductor fuses
            # "s *" into the elementwise kernel that reads the output (the next activation
            # or sum), where a weight pass would stay a pass
            b = self.bias
            bias = None if b is None else b * (self.bias_scale / s)
            return self._layer(x, self.weight, bias, *args) * s
        if self._scales_input(x):
            return self._layer(x * s, self.weight, self.scaled_bias(), *args)
        return self._layer(x, self.scaled_weight(), self.scaled_bias(), *args)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, weight_scale={self.weight_scale:.6g}"
                + ("" if self.bias_scale == 1.0 else f", bias_scale={self.bias_scale:.6g}"))


class _ScaledConv(_ScaledWeights):
    def _layer(self, x, weight, bias):
        return self._conv_forward(x, weight, bias)


class ScaledConv1d(_ScaledConv, nn.Conv1d):
    """``nn.Conv1d`` computing with scaled parameters (see :class:`_ScaledWeights`)."""


class ScaledConv2d(_ScaledConv, nn.Conv2d):
    """``nn.Conv2d`` computing with scaled parameters (see :class:`_ScaledWeights`)."""


class ScaledConv3d(_ScaledConv, nn.Conv3d):
    """``nn.Conv3d`` computing with scaled parameters (see :class:`_ScaledWeights`)."""


class _ScaledConvTranspose(_ScaledWeights):
    _conv_transpose: Callable[..., torch.Tensor]
    _spatial_dims: int

    def _layer(self, x, weight, bias, output_size: list[int] | None = None):
        output_padding = self._output_padding(x, output_size, self.stride, self.padding,
                                              self.kernel_size, self._spatial_dims,
                                              self.dilation)
        return type(self)._conv_transpose(x, weight, bias, self.stride, self.padding,
                                          output_padding, self.groups, self.dilation)


class ScaledConvTranspose1d(_ScaledConvTranspose, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` computing with scaled parameters (see :class:`_ScaledWeights`)."""
    _conv_transpose, _spatial_dims = F.conv_transpose1d, 1


class ScaledConvTranspose2d(_ScaledConvTranspose, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` computing with scaled parameters (see :class:`_ScaledWeights`)."""
    _conv_transpose, _spatial_dims = F.conv_transpose2d, 2


class ScaledConvTranspose3d(_ScaledConvTranspose, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` computing with scaled parameters (see :class:`_ScaledWeights`)."""
    _conv_transpose, _spatial_dims = F.conv_transpose3d, 3


class ScaledLinear(_ScaledWeights, nn.Linear):
    """``nn.Linear`` computing with scaled parameters (see :class:`_ScaledWeights`)."""

    def _layer(self, x, weight, bias):
        return F.linear(x, weight, bias)


#: plain torch layer class -> its scaled sibling (the torch backend's choice for a layer
#: with ``weight_scale`` / ``bias_scale`` attributes)
SCALED_LAYERS: dict[type, type] = {
    nn.Conv1d: ScaledConv1d, nn.Conv2d: ScaledConv2d, nn.Conv3d: ScaledConv3d,
    nn.ConvTranspose1d: ScaledConvTranspose1d, nn.ConvTranspose2d: ScaledConvTranspose2d,
    nn.ConvTranspose3d: ScaledConvTranspose3d, nn.Linear: ScaledLinear,
}


class Affine(nn.Module):
    """Per-channel ``x * scale + shift`` along ``axis`` (trainable)."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor | None, axis: int = 1,
                 rank: int | None = None):
        super().__init__()
        self.axis = axis
        # the input's rank when known: the view shape is then plain ints, and a user's
        # torch.fx.symbolic_trace of the model does not meet x.dim() in Python arithmetic
        self.rank = rank
        self.scale = nn.Parameter(scale)
        self.shift = None if shift is None else nn.Parameter(shift)

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        rank = getattr(self, "rank", None)  # (None too in a module pickled before it)
        rank = x.dim() if rank is None else rank
        shape = [1] * rank
        shape[self.axis % rank] = -1
        return t.reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self._view(self.scale, x)
        if self.shift is None:
            return x * scale
        return torch.addcmul(self._view(self.shift, x), x, scale)

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}, axis={self.axis}"


class FrozenBatchNorm(nn.Module):
    """Batch norm with fixed statistics and fixed affine parameters, in training mode too:
    ``(x - running_mean) / sqrt(running_var + eps) * weight + bias`` along axis 1, for any
    rank >= 2. The four tensors are buffers, with the state_dict keys of torchvision's
    ``FrozenBatchNorm2d`` (which the torch backend emits this for; timm's and detectron2's
    are the same computation)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = float(eps)
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"


class StdNorm(nn.Module):
    """The ``std_norm`` op (see graphshape.ops): over the last ``len(normalized_shape)``
    dims, ``x`` (minus its mean when ``centre``) divided by ``sqrt(var + eps)`` or, with
    ``eps_added_to="std"``, by ``std + eps``, or with ``"clamp"`` by ``sqrt(max(var,
    eps))``; the variance divides by ``n - correction``."""

    def __init__(self, normalized_shape: Sequence[int], eps: float, centre: bool = True,
                 correction: int = 0, eps_added_to: str = "variance"):
        super().__init__()
        if eps_added_to not in ("variance", "std", "clamp"):
            raise ValueError("eps_added_to must be 'variance', 'std' or 'clamp', not "
                             f"{eps_added_to!r}")
        self.normalized_shape = tuple(int(d) for d in normalized_shape)
        self.eps, self.centre, self.correction = float(eps), bool(centre), int(correction)
        self.eps_added_to = eps_added_to

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-len(self.normalized_shape), 0))
        var = torch.var(x, dim=dims, correction=self.correction, keepdim=True)
        if self.centre:
            x = x - x.mean(dim=dims, keepdim=True)
        if self.eps_added_to == "std":
            return x / (var.sqrt() + self.eps)
        if self.eps_added_to == "clamp":
            return x * torch.rsqrt(var.clamp(min=self.eps))
        return x * torch.rsqrt(var + self.eps)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, centre={self.centre}, "
                f"correction={self.correction}, eps_added_to={self.eps_added_to!r}")


class LocalResponseNorm(nn.Module):
    """ONNX LRN: ``x / (k + alpha / size * sum_{window} x^2) ** beta`` with the window
    ``[c - floor((size - 1) / 2), c + ceil((size - 1) / 2)]``. Equals
    ``nn.LocalResponseNorm`` for odd ``size``; for even ``size`` torch's window leans the
    other way."""

    def __init__(self, size: int, alpha: float, beta: float, k: float):
        super().__init__()
        self.size, self.alpha, self.beta, self.k = int(size), float(alpha), float(beta), float(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sq = (x * x).unsqueeze(1).flatten(3)  # (N, 1, C, rest)
        front = (self.size - 1) // 2
        back = self.size - 1 - front
        sq = F.pad(sq, (0, 0, front, back))
        div = F.avg_pool2d(sq, (self.size, 1), stride=1).squeeze(1).reshape(x.shape)
        return x / (div * self.alpha + self.k).pow(self.beta)


def reshape_copying(x: torch.Tensor, shape: Sequence[int],
                    copy_dims: Sequence[int]) -> torch.Tensor:
    """``x.reshape(shape)`` where the dims at ``copy_dims`` keep ``x``'s size (ONNX
    Reshape's 0: a target computed from a dynamic batch and sequence length)."""
    return x.reshape([x.shape[i] if i in copy_dims else d for i, d in enumerate(shape)])


def unsqueeze_axes(x: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
    """Insert size-1 dims at ``axes`` (positions in the output, as ONNX Unsqueeze)."""
    if any(a < 0 for a in axes):
        rank = x.dim() + len(axes)
        axes = [a % rank for a in axes]
    for a in sorted(axes):  # (non-negative axes need no rank: fx-traceable)
        x = x.unsqueeze(a)
    return x


def slice_axes(x: torch.Tensor, axes: Sequence[int], starts: Sequence[int],
               ends: Sequence[int], steps: Sequence[int]) -> torch.Tensor:
    """ONNX-style Slice, negative steps included (torch indexing has no negative steps)."""
    for axis, start, end, step in zip(axes, starts, ends, steps):
        if step > 0:
            lead = axis if axis >= 0 else axis % x.dim()  # (no x.dim() when known: fx)
            x = x[(slice(None),) * lead + (slice(start, end, step),)]
            continue
        size = x.shape[axis]
        # walk [start, end) backwards = flip, then a forward slice on the flipped axis
        start = min(max(start + size if start < 0 else start, -1), size - 1)
        end = min(max(end + size if end < 0 else end, -1), size - 1)
        x = torch.flip(x, (axis,))
        fstart, fend = size - 1 - start, size - 1 - end
        x = x[(slice(None),) * (axis % x.dim()) + (slice(fstart, fend, -step),)]
    return x


def reduce_prod(x: torch.Tensor, axes: Sequence[int] | None, keepdim: bool) -> torch.Tensor:
    """Product over several axes (torch.prod takes one)."""
    if axes is None:
        out = torch.prod(x)
        return out.reshape([1] * x.dim()) if keepdim else out
    for a in sorted((a % x.dim() for a in axes), reverse=True):
        x = torch.prod(x, dim=a, keepdim=keepdim)
    return x


def avg_pool_exclude_pad(x: torch.Tensor, pads: Sequence[int], kernel: Sequence[int],
                         stride: Sequence[int], ceil_mode: bool) -> torch.Tensor:
    """Average pooling over zero-padded ``x`` (asymmetric ``pads``, ONNX order) that divides
    by the number of real (unpadded) elements in each window."""
    dims = len(kernel)
    torch_pads = []
    for i in reversed(range(dims)):
        torch_pads += [pads[i], pads[i + dims]]
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dims - 1]
    summed = pool(F.pad(x, torch_pads), kernel, stride, 0, ceil_mode, True, 1)
    ones = torch.ones_like(x[:1, :1])
    count = pool(F.pad(ones, torch_pads), kernel, stride, 0, ceil_mode, True, 1)
    return summed / count


def global_pool(x: torch.Tensor, avg: bool = True) -> torch.Tensor:
    """Mean (or max) over every dim after the channel axis, keeping them as size 1."""
    dims = tuple(range(2, x.dim()))
    return x.mean(dims, keepdim=True) if avg else x.amax(dims, keepdim=True)
