"""PyTorch building blocks that graphshape's torch backend emits.

Everything here is device-agnostic (no tensor is created on a fixed device inside
``forward``; constants live in buffers) and ``torch.compile``-able.

:data:`ACTIVATION_FUNCTIONS` maps every name of graphshape's activation registry
(``graphshape.activations``) to the torch function computing it, ``fn(x, **attrs)``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

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

#: activations with phi(a * x) = a * phi(x) for a > 0: their scales fold into one another
POSITIVELY_HOMOGENEOUS = frozenset({"relu", "leaky_relu"})

_TRANSFORM_KEYS = ("input_scale", "input_shift", "output_shift", "output_scale")


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


class TransformedActivation(nn.Module):
    """``output_scale * (phi(input_scale * x + input_shift) + output_shift)``.

    Computed with as few elementwise passes as exact algebra allows:

    * the input affine map is one ``torch.addcmul`` (one pass) with the shift and scale
      held as 0-dim buffers (they follow ``.to(device/dtype)``); skipped when identity;
    * for positively homogeneous phi (relu, leaky_relu) and ``input_scale * output_scale
      > 0``, the output scale is folded into the input map
      (``g * phi(a x + b) = phi(g a x + g b)``); for relu the output shift is folded too
      (``relu(y) + d = max(y + d, d)``), so relu takes two passes in all;
    * otherwise the output affine map is one more ``addcmul``.
    """

    def __init__(self, name: str, transform: dict, **attrs):
        super().__init__()
        unknown = set(transform) - set(_TRANSFORM_KEYS)
        if unknown:
            raise GraphshapeError(
                f"transform of activation {name!r} has unknown keys {sorted(unknown)}; "
                f"expected {list(_TRANSFORM_KEYS)}")
        self.name = name
        self.attrs = plain_attrs(attrs)
        self.transform = {k: float(transform.get(k, 1.0 if k.endswith("scale") else 0.0))
                          for k in _TRANSFORM_KEYS}
        self.fn = activation_function(name)
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
        # 0-d buffers in the default float dtype, so they follow .to(device) and
        # .to(dtype)/.half() with the parameters: addcmul then reads them without a
        # conversion. (float64 buffers cost one _to_copy per call and pass -- ~250 tiny
        # copies per ResNet-50 training step.) The exact values stay in self.transform.
        for key, v in (("pre_scale", pre_scale), ("pre_shift", pre_shift),
                       ("post_scale", post_scale), ("post_shift", post_shift)):
            self.register_buffer(key, torch.tensor(v, dtype=torch.get_default_dtype()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre:
            x = torch.addcmul(self.pre_shift, x, self.pre_scale)
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
        return f"{self.name!r}{extra}, {t}"


class WeightedSum(nn.Module):
    """``sum_i weights[i] * xs[i]`` (``weights`` None: plain sum), one ``torch.add`` with
    ``alpha`` per extra input."""

    def __init__(self, weights: Sequence[float] | None = None):
        super().__init__()
        self.weights = None if weights is None else tuple(float(w) for w in weights)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        w = self.weights or (1.0,) * len(xs)
        out = xs[0] if w[0] == 1.0 else xs[0] * w[0]
        for x, wi in zip(xs[1:], w[1:]):
            out = torch.add(out, x, alpha=wi)
        return out

    def extra_repr(self) -> str:
        return f"weights={self.weights}"


class Affine(nn.Module):
    """Per-channel ``x * scale + shift`` along ``axis`` (trainable)."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor | None, axis: int = 1):
        super().__init__()
        self.axis = axis
        self.scale = nn.Parameter(scale)
        self.shift = None if shift is None else nn.Parameter(shift)

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        axis = self.axis % x.dim()
        shape = [1] * x.dim()
        shape[axis] = -1
        return t.reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self._view(self.scale, x)
        if self.shift is None:
            return x * scale
        return torch.addcmul(self._view(self.shift, x), x, scale)

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}, axis={self.axis}"


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


def unsqueeze_axes(x: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
    """Insert size-1 dims at ``axes`` (positions in the output, as ONNX Unsqueeze)."""
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


def slice_axes(x: torch.Tensor, axes: Sequence[int], starts: Sequence[int],
               ends: Sequence[int], steps: Sequence[int]) -> torch.Tensor:
    """ONNX-style Slice, negative steps included (torch indexing has no negative steps)."""
    for axis, start, end, step in zip(axes, starts, ends, steps):
        size = x.shape[axis]
        if step > 0:
            x = x[(slice(None),) * (axis % x.dim()) + (slice(start, end, step),)]
            continue
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
