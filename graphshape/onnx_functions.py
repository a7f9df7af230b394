"""Torch functions with the semantics of the ONNX ops that graphshape keeps opaque.

The ONNX importer maps the ops that carry the signal to canonical ops, and folds shape
computations it can evaluate; what remains is opaque, mostly the shape arithmetic of a model
exported with a dynamic axis (``Shape`` -> ``Gather`` -> ``Concat`` -> ``Reshape`` around the
batch size, ``Expand`` of a class token, the ``Range`` / ``ScatterND`` of a Swin attention
mask). The torch backend emits such a node as a call to the function here of the same name,
so a PyTorch model can be emitted from an ONNX file whatever its dynamic axes. ONNX's
recurrent layers (RNN, GRU, LSTM), which have no canonical op either, are here too: a loop
over the time steps with ONNX's gate order and options, returning the op's outputs as a
tuple (``MULTI_OUTPUT``).

``ONNX_FUNCTIONS`` maps an op type (default domain) to ``(function, opsets)``: the function
takes the node's inputs in ONNX order (``None`` for an absent optional input) and its
attributes as keywords, decoded to Python values (``Cast``'s ``to`` as a ``torch.dtype``);
``opsets`` is the range of opset versions whose signature it follows. Shape values are int64
tensors on the input's device, as in ONNX; they become Python ints where torch needs sizes.
So the emitted module runs eagerly, under ``torch.compile`` (with graph breaks at those
conversions) and ``torch.jit.trace``; ``torch.export`` refuses sizes read from a tensor.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from graphshape.torch_modules import recorded_when_traced


def _ints(value: torch.Tensor | Sequence[int] | None) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in value]


def _scalar(value):
    return value.item() if isinstance(value, torch.Tensor) else value


@recorded_when_traced
def shape(data: torch.Tensor, *, start: int = 0, end: int | None = None) -> torch.Tensor:
    """ONNX Shape: the sizes ``[start:end]`` (Python slicing clamps as ONNX does)."""
    return torch.tensor(tuple(data.shape)[start:end], dtype=torch.int64, device=data.device)


@recorded_when_traced
def size(data: torch.Tensor) -> torch.Tensor:
    return torch.tensor(data.numel(), dtype=torch.int64, device=data.device)


@recorded_when_traced
def reshape(data: torch.Tensor, new_shape: torch.Tensor, *, allowzero: int = 0) -> torch.Tensor:
    """ONNX Reshape: a 0 copies the input's size there unless ``allowzero``."""
    sizes = _ints(new_shape)
    if not allowzero:
        sizes = [data.shape[i] if s == 0 else s for i, s in enumerate(sizes)]
    return data.reshape(sizes)


@recorded_when_traced
def expand(data: torch.Tensor, new_shape: torch.Tensor) -> torch.Tensor:
    """ONNX Expand: broadcasting both ways (a 1 in ``new_shape`` keeps the input's size)."""
    return data.expand(torch.broadcast_shapes(tuple(data.shape), tuple(_ints(new_shape))))


@recorded_when_traced
def cast(data: torch.Tensor, *, to: torch.dtype) -> torch.Tensor:
    return data.to(to)


@recorded_when_traced
def cast_like(data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return data.to(target.dtype)


@recorded_when_traced
def constant_of_shape(sizes: torch.Tensor, *, value: float | int | bool = 0.0,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.full(_ints(sizes), value, dtype=dtype, device=sizes.device)


@recorded_when_traced
def range_(start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return torch.arange(_scalar(start), _scalar(limit), _scalar(delta), dtype=start.dtype,
                        device=start.device)


def _normalized_axes(axes: Sequence[int], rank: int) -> list[int]:
    return [a + rank if a < 0 else a for a in axes]


@recorded_when_traced
def unsqueeze(data: torch.Tensor, axes: torch.Tensor | None = None, *,
              attr_axes: Sequence[int] | None = None) -> torch.Tensor:
    """ONNX Unsqueeze: axes index the output (an input from opset 13, an attribute before)."""
    axes = _ints(axes) if axes is not None else list(attr_axes)
    for axis in sorted(_normalized_axes(axes, data.dim() + len(axes))):
        data = data.unsqueeze(axis)
    return data


@recorded_when_traced
def squeeze(data: torch.Tensor, axes: torch.Tensor | None = None, *,
            attr_axes: Sequence[int] | None = None) -> torch.Tensor:
    axes = _ints(axes) if axes is not None else (None if attr_axes is None else list(attr_axes))
    if axes is None:
        return data.squeeze()
    for axis in sorted(_normalized_axes(axes, data.dim()), reverse=True):
        data = data.squeeze(axis)
    return data


@recorded_when_traced
def concat(*inputs: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.cat(inputs, dim=axis)


@recorded_when_traced
def gather(data: torch.Tensor, indices: torch.Tensor, *, axis: int = 0) -> torch.Tensor:
    """ONNX Gather: ``data``'s slices along ``axis`` at ``indices`` (any shape; negative
    indices count from the end)."""
    axis = axis + data.dim() if axis < 0 else axis
    index = indices.to(torch.int64)
    index = torch.where(index < 0, index + data.shape[axis], index)
    picked = data.index_select(axis, index.reshape(-1))
    return picked.reshape(tuple(data.shape[:axis]) + tuple(indices.shape)
                          + tuple(data.shape[axis + 1:]))


@recorded_when_traced
def slice_(data: torch.Tensor, starts=None, ends=None, axes=None, steps=None, *,
           attr_starts=None, attr_ends=None, attr_axes=None) -> torch.Tensor:
    """ONNX Slice (inputs from opset 10, attributes before), negative steps included, with
    ONNX's clamping: to [0, size] for a positive step, to [0, size - 1] (start) and
    [-1, size - 1] (end) for a negative one."""
    starts = _ints(starts) if starts is not None else list(attr_starts)
    ends = _ints(ends) if ends is not None else list(attr_ends)
    axes = _ints(axes) if axes is not None else (
        list(attr_axes) if attr_axes is not None else list(range(len(starts))))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, _normalized_axes(axes, data.dim()), steps):
        dim = data.shape[axis]
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        else:
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
        if step == 1:
            data = data.narrow(axis, start, max(end - start, 0))
        else:
            index = torch.arange(start, end, step, dtype=torch.int64, device=data.device)
            data = data.index_select(axis, index)
    return data


@recorded_when_traced
def pad(data: torch.Tensor, pads: torch.Tensor | None = None,
        constant_value: torch.Tensor | None = None, axes: torch.Tensor | None = None, *,
        mode: str = "constant", attr_pads: Sequence[int] | None = None,
        value: float = 0.0) -> torch.Tensor:
    """ONNX Pad (pads, value and axes as inputs from opset 11 / 18, attributes before);
    negative pads crop, as in ONNX."""
    pads = _ints(pads) if pads is not None else list(attr_pads)
    rank = data.dim()
    axes = _normalized_axes(_ints(axes), rank) if axes is not None else list(range(rank))
    n = len(axes)
    begin, end = [0] * rank, [0] * rank
    for i, axis in enumerate(axes):
        begin[axis], end[axis] = pads[i], pads[n + i]
    torch_pads = []
    for axis in reversed(range(rank)):  # F.pad: last dim first
        torch_pads += [begin[axis], end[axis]]
    while len(torch_pads) > 2 and torch_pads[-2:] == [0, 0]:  # the modes other than
        del torch_pads[-2:]  # "constant" pad at most the last 3 dims
    fill = _scalar(constant_value) if constant_value is not None else value
    modes = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}
    if mode == "constant":
        return F.pad(data, torch_pads, mode="constant", value=fill)
    return F.pad(data, torch_pads, mode=modes[mode])


@recorded_when_traced
def scatter_nd(data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, *,
               reduction: str = "none") -> torch.Tensor:
    """ONNX ScatterND: a copy of ``data`` with ``updates`` written (or added / multiplied /
    max / min-ed) at the index tuples in the last axis of ``indices``."""
    out = data.clone()
    index = tuple(indices.to(torch.int64).unbind(-1))
    if reduction == "none":
        out[index] = updates
    elif reduction == "add":
        out.index_put_(index, updates, accumulate=True)
    else:
        current = out[index]
        combine = {"mul": torch.mul, "max": torch.maximum, "min": torch.minimum}[reduction]
        out[index] = combine(current, updates)
    return out


@recorded_when_traced
def tile(data: torch.Tensor, repeats: torch.Tensor) -> torch.Tensor:
    return data.repeat(_ints(repeats))


@recorded_when_traced
def clip(data: torch.Tensor, low: torch.Tensor | None = None, high: torch.Tensor | None = None,
         *, attr_min: float | None = None, attr_max: float | None = None) -> torch.Tensor:
    low = _scalar(low) if low is not None else attr_min
    high = _scalar(high) if high is not None else attr_max
    return torch.clamp(data, low, high) if (low, high) != (None, None) else data


@recorded_when_traced
def reduce_l2(data: torch.Tensor, axes: torch.Tensor | None = None, *, keepdims: int = 1,
              noop_with_empty_axes: int = 0, attr_axes: Sequence[int] | None = None) -> torch.Tensor:
    axes = _ints(axes) if axes is not None else (list(attr_axes) if attr_axes else [])
    if not axes:
        if noop_with_empty_axes:
            return data
        axes = list(range(data.dim()))
    return torch.linalg.vector_norm(data, 2, dim=axes, keepdim=bool(keepdims))


@recorded_when_traced
def mod(a: torch.Tensor, b: torch.Tensor, *, fmod: int = 0) -> torch.Tensor:
    """ONNX Mod: the sign of the divisor (Python's %), or of the dividend with ``fmod``."""
    return torch.fmod(a, b) if fmod else torch.remainder(a, b)


@recorded_when_traced
def div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ONNX Div: integer inputs divide with truncation, as onnxruntime does."""
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


@recorded_when_traced
def cumsum(data: torch.Tensor, axis: torch.Tensor, *, exclusive: int = 0,
           reverse: int = 0) -> torch.Tensor:
    """ONNX CumSum: ``exclusive`` leaves each element out of its own sum (shifts by one),
    ``reverse`` sums from the end."""
    dim = int(_scalar(axis.reshape(-1)[0]) if isinstance(axis, torch.Tensor) else axis)
    dim = dim + data.dim() if dim < 0 else dim
    x = data.flip(dim) if reverse else data
    out = torch.cumsum(x, dim)
    if exclusive:
        out = torch.cat([torch.zeros_like(out.narrow(dim, 0, 1)),
                         out.narrow(dim, 0, out.shape[dim] - 1)], dim)
    return out.flip(dim) if reverse else out


@recorded_when_traced
def einsum(*inputs: torch.Tensor, equation: str) -> torch.Tensor:
    return torch.einsum(equation, *inputs)


@recorded_when_traced
def minimum(*inputs: torch.Tensor) -> torch.Tensor:
    return functools.reduce(torch.minimum, inputs)


@recorded_when_traced
def maximum(*inputs: torch.Tensor) -> torch.Tensor:
    return functools.reduce(torch.maximum, inputs)


@recorded_when_traced
def identity(data: torch.Tensor) -> torch.Tensor:
    return data


# ---------------------------------------------------------------- losses
def softmax_cross_entropy_loss(scores: torch.Tensor, labels: torch.Tensor,
                               weights: torch.Tensor | None = None, *,
                               reduction: str = "mean", ignore_index: int | None = None):
    """``(loss, log_prob)``: ``F.cross_entropy`` on scores (N, C, D1, ...) and labels (N, D1,
    ...), as a model's forward that takes labels computes it (Hugging Face's ``labels=``);
    without ``ignore_index`` no label is ignored. Two outputs, the second optional."""
    log_prob = F.log_softmax(scores, dim=1)
    return negative_log_likelihood_loss(log_prob, labels, weights, reduction=reduction,
                                        ignore_index=ignore_index), log_prob


def negative_log_likelihood_loss(log_prob: torch.Tensor, target: torch.Tensor,
                                 weight: torch.Tensor | None = None, *,
                                 reduction: str = "mean", ignore_index: int | None = None):
    """``F.nll_loss`` on log-probabilities (N, C, D1, ...) and targets (N, D1, ...)."""
    return F.nll_loss(log_prob, target.long(), weight=weight, reduction=reduction,
                      ignore_index=-(1 << 62) if ignore_index is None else ignore_index)


# ---------------------------------------------------------------- recurrent layers
#: ONNX's recurrent activations: name -> f(x, alpha, beta) (alpha / beta: the op's
#: activation_alpha / activation_beta entries, None where the list gives none)
_RNN_ACTIVATIONS: dict[str, Callable] = {
    "Sigmoid": lambda x, a, b: torch.sigmoid(x), "Tanh": lambda x, a, b: torch.tanh(x),
    "Relu": lambda x, a, b: torch.relu(x), "Softsign": lambda x, a, b: F.softsign(x),
    "Softplus": lambda x, a, b: F.softplus(x),
    "LeakyRelu": lambda x, a, b: F.leaky_relu(x, 0.01 if a is None else a),
    "ThresholdedRelu": lambda x, a, b: x * (x > (1.0 if a is None else a)),
    "Elu": lambda x, a, b: F.elu(x, 1.0 if a is None else a),
    "Affine": lambda x, a, b: (1.0 if a is None else a) * x + (0.0 if b is None else b),
    "ScaledTanh": lambda x, a, b: (1.0 if a is None else a) * torch.tanh(
        (1.0 if b is None else b) * x),
    "HardSigmoid": lambda x, a, b: torch.clamp((0.2 if a is None else a) * x
                                               + (0.5 if b is None else b), 0.0, 1.0),
}


def _rnn_activations(names, alphas, betas, defaults: list[str], directions: int):
    """Per direction, the ``len(defaults)`` activation functions (ONNX lists them for all
    directions in one list; ``alphas`` / ``betas`` are consumed in the order of the
    activations that take them, as onnxruntime reads them)."""
    names = [n.decode() if isinstance(n, bytes) else n for n in names] if names \
        else defaults * directions
    if len(names) != len(defaults) * directions:
        raise ValueError(f"{len(names)} activations for {directions} direction(s)")
    alphas, betas = list(alphas or ()), list(betas or ())
    takes_alpha = {"LeakyRelu", "ThresholdedRelu", "Elu", "Affine", "ScaledTanh", "HardSigmoid"}
    takes_beta = {"Affine", "ScaledTanh", "HardSigmoid"}
    fns = []
    for name in names:
        if name not in _RNN_ACTIVATIONS:
            raise ValueError(f"unknown recurrent activation {name!r}")
        a = alphas.pop(0) if name in takes_alpha and alphas else None
        b = betas.pop(0) if name in takes_beta and betas else None
        fns.append(functools.partial(_RNN_ACTIVATIONS[name], a=a, b=b))
    return [fns[d * len(defaults):(d + 1) * len(defaults)] for d in range(directions)]


def _recurrent(op_type, X, W, R, B, sequence_lens, initial_h, initial_c, P, hidden_size,
               direction, activations, activation_alpha, activation_beta, clip, layout,
               cell):
    """The loop that ONNX RNN / GRU / LSTM share: per direction, per time step, ``cell(x_t
    W^T + Wb, h, c, R, Rb, P, fs)`` -> (h, c); outputs (Y, Y_h[, Y_c])."""
    if layout:  # [batch, seq, ...] -> [seq, batch, ...]
        X = X.transpose(0, 1)
        initial_h = None if initial_h is None else initial_h.transpose(0, 1)
        initial_c = None if initial_c is None else initial_c.transpose(0, 1)
    steps, batch = X.shape[0], X.shape[1]
    directions = 2 if direction == "bidirectional" else 1
    gates = W.shape[1] // hidden_size
    fs = _rnn_activations(activations, activation_alpha, activation_beta,
                          {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"],
                           "LSTM": ["Sigmoid", "Tanh", "Tanh"]}[op_type], directions)
    if clip is not None:
        # clips the input of the gates' activations (f, g), as onnxruntime does: not that
        # of LSTM's h, which reads the cell state
        fs = [[functools.partial(lambda x, f, c: f(torch.clamp(x, -c, c)), f=f, c=float(clip))
               if k < 2 else f for k, f in enumerate(d)] for d in fs]
    zeros = X.new_zeros(directions, batch, hidden_size)
    h0 = zeros if initial_h is None else initial_h
    c0 = zeros if initial_c is None else initial_c
    lens = None if sequence_lens is None else sequence_lens.to(X.device).reshape(-1, 1)
    # no B: zero biases, made once rather than in every step's cell
    biases = B if B is not None else X.new_zeros(directions, 2 * gates * hidden_size)
    ys, hs, cs = [], [], []
    for d in range(directions):
        reverse = direction == "reverse" or d == 1
        wb, rb = biases[d, :gates * hidden_size], biases[d, gates * hidden_size:]
        inputs = torch.matmul(X, W[d].t()) + wb  # all time steps at once
        peep = None if P is None else P[d]
        h, c = h0[d], c0[d]
        out = [None] * steps
        for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
            h_new, c_new = cell(inputs[t], h, c, R[d], rb, peep, fs[d])
            if lens is not None:  # steps past a sequence's length: no update, zero output
                valid = t < lens
                h_new = torch.where(valid, h_new, h)
                c_new = torch.where(valid, c_new, c)
                out[t] = torch.where(valid, h_new, torch.zeros_like(h_new))
            else:
                out[t] = h_new
            h, c = h_new, c_new
        ys.append(torch.stack(out))
        hs.append(h)
        cs.append(c)
    Y = torch.stack(ys, 1)  # [seq, directions, batch, hidden]
    Y_h, Y_c = torch.stack(hs), torch.stack(cs)
    if layout:
        Y, Y_h, Y_c = Y.permute(2, 0, 1, 3), Y_h.transpose(0, 1), Y_c.transpose(0, 1)
    return (Y, Y_h, Y_c) if op_type == "LSTM" else (Y, Y_h)


def _rnn_cell(x, h, c, r, rb, peep, fs):
    return fs[0](x + h @ r.t() + rb), c


def _gru_cell(x, h, c, r, rb, peep, fs, linear_before_reset=0):
    n = h.shape[-1]
    xz, xr, xh = x.split(n, -1)
    rz, rr, rh = r.split(n)
    bz, br, bh = rb.split(n)
    z = fs[0](xz + h @ rz.t() + bz)
    reset = fs[0](xr + h @ rr.t() + br)
    if linear_before_reset:
        candidate = fs[1](xh + reset * (h @ rh.t() + bh))
    else:
        candidate = fs[1](xh + (reset * h) @ rh.t() + bh)
    return (1 - z) * candidate + z * h, c


def _lstm_cell(x, h, c, r, rb, peep, fs, input_forget=0):
    n = h.shape[-1]
    pre = x + h @ r.t() + rb
    gi, go, gf, gc = pre.split(n, -1)  # ONNX's gate order: input, output, forget, cell
    pi, po, pf = (None, None, None) if peep is None else peep.split(n)
    i = fs[0](gi if pi is None else gi + pi * c)
    f = 1 - i if input_forget else fs[0](gf if pf is None else gf + pf * c)
    c_new = f * c + i * fs[1](gc)
    o = fs[0](go if po is None else go + po * c_new)
    return o * fs[2](c_new), c_new


@recorded_when_traced
def rnn(X, W, R, B=None, sequence_lens=None, initial_h=None, *, hidden_size: int,
        direction: str = "forward", activations=None, activation_alpha=None,
        activation_beta=None, clip=None, layout: int = 0):
    """ONNX RNN: ``H_t = f(X_t W^T + H_{t-1} R^T + Wb + Rb)``; returns (Y, Y_h)."""
    return _recurrent("RNN", X, W, R, B, sequence_lens, initial_h, None, None, hidden_size,
                      direction, activations, activation_alpha, activation_beta, clip, layout,
                      _rnn_cell)


@recorded_when_traced
def gru(X, W, R, B=None, sequence_lens=None, initial_h=None, *, hidden_size: int,
        direction: str = "forward", activations=None, activation_alpha=None,
        activation_beta=None, clip=None, layout: int = 0, linear_before_reset: int = 0):
    """ONNX GRU (gates z, r, h; ``linear_before_reset`` applies the reset gate after the
    recurrent product, as PyTorch's GRU does); returns (Y, Y_h)."""
    return _recurrent("GRU", X, W, R, B, sequence_lens, initial_h, None, None, hidden_size,
                      direction, activations, activation_alpha, activation_beta, clip, layout,
                      functools.partial(_gru_cell, linear_before_reset=linear_before_reset))


@recorded_when_traced
def lstm(X, W, R, B=None, sequence_lens=None, initial_h=None, initial_c=None, P=None, *,
         hidden_size: int, direction: str = "forward", activations=None,
         activation_alpha=None, activation_beta=None, clip=None, layout: int = 0,
         input_forget: int = 0):
    """ONNX LSTM (gates in ONNX's order i, o, f, c; peepholes ``P``; ``input_forget``
    couples the forget gate to ``1 - i``); returns (Y, Y_h, Y_c)."""
    return _recurrent("LSTM", X, W, R, B, sequence_lens, initial_h, initial_c, P, hidden_size,
                      direction, activations, activation_alpha, activation_beta, clip, layout,
                      functools.partial(_lstm_cell, input_forget=input_forget))


#: op types whose function returns a tuple, one entry per ONNX output
MULTI_OUTPUT = frozenset({"RNN", "GRU", "LSTM", "SoftmaxCrossEntropyLoss"})

_ANY = (1, 10_000)

#: ONNX op type (default domain) -> (torch function, (first, last) opset it follows)
ONNX_FUNCTIONS: dict[str, tuple[Callable[..., torch.Tensor], tuple[int, int]]] = {
    "Shape": (shape, _ANY), "Size": (size, _ANY), "Reshape": (reshape, (5, 10_000)),
    "Expand": (expand, _ANY), "Cast": (cast, (6, 10_000)), "CastLike": (cast_like, _ANY),
    "ConstantOfShape": (constant_of_shape, _ANY), "Range": (range_, _ANY),
    "Unsqueeze": (unsqueeze, _ANY), "Squeeze": (squeeze, _ANY), "Concat": (concat, (4, 10_000)),
    "Gather": (gather, _ANY), "Slice": (slice_, _ANY), "Pad": (pad, (2, 10_000)),
    "ScatterND": (scatter_nd, _ANY), "Tile": (tile, (6, 10_000)), "Clip": (clip, (6, 10_000)),
    "ReduceL2": (reduce_l2, _ANY), "Mod": (mod, _ANY), "Div": (div, (7, 10_000)),
    "Einsum": (einsum, _ANY), "CumSum": (cumsum, _ANY), "Min": (minimum, (8, 10_000)), "Max": (maximum, (8, 10_000)),
    "Identity": (identity, _ANY),
    "Add": (torch.add, (7, 10_000)), "Sub": (torch.sub, (7, 10_000)),
    "Mul": (torch.mul, (7, 10_000)), "Neg": (torch.neg, (6, 10_000)),
    "Equal": (torch.eq, (7, 10_000)), "Less": (torch.lt, (7, 10_000)),
    "Greater": (torch.gt, (7, 10_000)), "LessOrEqual": (torch.le, _ANY),
    "GreaterOrEqual": (torch.ge, _ANY), "Not": (torch.logical_not, _ANY),
    "And": (torch.logical_and, (7, 10_000)), "Or": (torch.logical_or, (7, 10_000)),
    "Where": (torch.where, _ANY), "Sqrt": (torch.sqrt, (6, 10_000)),
    "Floor": (torch.floor, (6, 10_000)), "Ceil": (torch.ceil, (6, 10_000)),
    "Abs": (torch.abs, (6, 10_000)), "Exp": (torch.exp, (6, 10_000)),
    "Log": (torch.log, (6, 10_000)), "Reciprocal": (torch.reciprocal, (6, 10_000)),
    "Sin": (torch.sin, _ANY), "Cos": (torch.cos, _ANY), "Tan": (torch.tan, _ANY),
    "Atan": (torch.atan, _ANY), "Pow": (torch.pow, (7, 10_000)), "Sign": (torch.sign, _ANY),
    "Round": (torch.round, _ANY),  # both round half to even
    # layout (batch first) is an attribute from opset 14; before it, its default
    "RNN": (rnn, (7, 10_000)), "GRU": (gru, (7, 10_000)), "LSTM": (lstm, (7, 10_000)),
    "SoftmaxCrossEntropyLoss": (softmax_cross_entropy_loss, (12, 10_000)),
    "NegativeLogLikelihoodLoss": (negative_log_likelihood_loss, (12, 10_000)),
}

#: attributes that an older opset gives where a newer one takes an input, by op type:
#: ONNX attribute name -> the function's keyword
ATTRIBUTE_KEYWORDS: dict[str, dict[str, str]] = {
    "Unsqueeze": {"axes": "attr_axes"}, "Squeeze": {"axes": "attr_axes"},
    "Slice": {"starts": "attr_starts", "ends": "attr_ends", "axes": "attr_axes"},
    "Pad": {"pads": "attr_pads"}, "Clip": {"min": "attr_min", "max": "attr_max"},
    "ReduceL2": {"axes": "attr_axes"},
}


def attribute_keywords(op_type: str, attributes: dict[str, Any]) -> dict[str, Any]:
    """The function's keywords for the node's decoded ONNX attributes."""
    names = ATTRIBUTE_KEYWORDS.get(op_type, {})
    return {names.get(k, k): v for k, v in attributes.items()}
