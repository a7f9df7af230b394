"""Kernel propagation: per-node q and c at initialization, predicted from theory.

For a batch of B examples the **kernel** of a value is its per-example q (mean squared entry,
per spatial location, averaged over locations) and its per-pair covariance
``cov[i, j] = c[i, j] * sqrt(q[i] q[j])`` (c: mean over features of the product of the two
examples' entries, normalized per location, averaged over locations). The analysis pushes the
kernel of the example inputs through the graph, node by node, with one **kernel rule** per
canonical op (:data:`KERNEL_RULES`, keyed by the op names of :data:`graphshape.ops.OPS`):

* affine layers (conv, linear, conv_transpose, matmul by a constant) use their actual
  weights: ``q_out = ||W||_F^2 / out_features * q_in + mean(b^2)``, and the same map on every
  covariance entry (exact in the infinite-width limit for weights independent of the input,
  and for inputs constant across locations);
* activations use the extended local maps of ``graphshape.kernels`` (any input q);
* sums (``add``, ``sub``, ``sum`` with their actual weights) add ``w_i^2``-weighted kernels
  (branches after a fork through a random layer are uncorrelated); ``concat`` weighs by
  channel share ``n_i / N``; products of two signals multiply q and covariances (independent
  signals, flagged);
* normalization layers at initialization set q to 1 per channel (batch norm: training-mode
  batch statistics, which also center the batch's covariance); flagged
  ``"normalization at init"``;
* pooling, slicing and padding are the identity on q and c, flagged ``"approximate"``
  (exact for inputs constant across locations); reshapes, dropout and identity are exact;
* ops without a rule (softmax, reductions, opaque nodes) make their output unknown, and every
  node downstream is unknown too (flag ``"unknown after <op>"``): never silently wrong.

Alongside, each node gets the input-independent ``C_f(0)``, ``C_f'(1)`` and ``C_f''(1)`` of
the network from the model input to that node: the pair propagated is (q = 1, c = 0) for
``C_f(0)``; the slope and curvature at c = 1 follow by the chain rule, each local map taken
at the q the unit-q input reaches there.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from graphshape.errors import GraphshapeError
from graphshape.ir import (_TAP_CACHE, Graph, Node, Ref, constant_operand,  # noqa: F401
                           holds_tensors, may_hold_signal, moves_data_only, weight_tap_norms)

FLAG_APPROX = "approximate"
FLAG_NORM = "normalization at init"
FLAG_PRODUCT = "product of signals (assumed independent)"
FLAG_NONGAUSSIAN = "non-gaussian input (V1 shortcut)"
FLAG_STACKED = "non-gaussian input (after an activation)"

_FLOAT_DTYPES = (None, "float16", "float32", "float64", "bfloat16")


@dataclass
class Kernel:
    """The kernel of one value.

    q:   (B,) per-example q.
    cov: (B, B) per-pair covariance; its diagonal equals q.
    unit_q, unit_c0: q and c reached from a pair of unit-q, uncorrelated model inputs
         (``unit_c0`` is C_f(0) of the network up to here).
    unit_slope, unit_curv: C_f'(1) and C_f''(1) of the network up to here.
    """

    q: np.ndarray
    cov: np.ndarray
    unit_q: float = 1.0
    unit_c0: float = 0.0
    unit_slope: float = 1.0
    unit_curv: float = 0.0

    @property
    def c(self) -> np.ndarray:
        """(B, B) correlations; entries with a zero-q example are 0 (1 on the diagonal)."""
        c = self.__dict__.get("_c")
        if c is None:
            c = self.__dict__["_c"] = _corr(self.q, self.cov)
        return c


def _corr(q, cov):
    scale = np.sqrt(np.outer(q, q))
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(scale > 0, cov / np.where(scale > 0, scale, 1.0), 0.0)
    c = np.clip(c, -1.0, 1.0)
    np.fill_diagonal(c, 1.0)
    return c


_TRIU: dict[int, tuple] = {}


def _triu(b: int) -> tuple:
    """np.triu_indices(b, 1), cached."""
    iu = _TRIU.get(b)
    if iu is None:
        iu = _TRIU[b] = np.triu_indices(b, 1)
    return iu


#: Entries per chunk of locations in :func:`kernel_of` (float64: 32 MB).
_KERNEL_CHUNK = 1 << 22


def kernel_of(x: np.ndarray) -> Kernel:
    """The kernel of a batch ``x`` (examples on axis 0, features on axis 1, locations after).

    q per example: mean over locations of the mean over features of x^2; c per pair: mean
    over features of the product, normalized per location, averaged over locations.
    """
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[:, None]
    b, f = x.shape[0], x.shape[1]
    flat = x.reshape(b, f, -1)
    n_loc = flat.shape[2]
    q_loc = np.empty((b, n_loc))
    gram = np.zeros((b, b))
    # c_ij = mean over l of <x_il, x_jl> / (f sqrt(q_il q_jl)): scale every location's
    # feature vector to unit mean square, then all pairs are one matrix product (a location
    # where either example is all zeros contributes 0). In float64, by chunks of locations
    # of ~32 MB: a large batch of large activations is never copied whole.
    step = max(1, _KERNEL_CHUNK // max(1, b * f))
    for start in range(0, n_loc, step):
        chunk = np.asarray(flat[:, :, start:start + step], dtype=np.float64)
        q_chunk = np.einsum("bfl,bfl->bl", chunk, chunk) / f
        q_loc[:, start:start + step] = q_chunk
        with np.errstate(divide="ignore", invalid="ignore"):
            inv_norm = np.where(q_chunk > 0, 1.0 / np.sqrt(f * q_chunk), 0.0)
        unit = (chunk * inv_norm[:, None, :]).reshape(b, -1)
        gram += unit @ unit.T
    q = q_loc.mean(axis=1)
    c = np.clip(gram / n_loc, -1.0, 1.0)
    np.fill_diagonal(c, 1.0)
    cov = c * np.sqrt(np.outer(q, q))
    return Kernel(q=q, cov=cov)


# --------------------------------------------------------------------------- local maps
_LM_CACHE: dict = {}


def _local_maps_factory(name, transform, **attrs):
    from graphshape.kernels import local_maps

    return local_maps(name, transform, **attrs)


#: Replaceable for tests (a stand-in before graphshape.kernels existed); signature of
#: ``graphshape.kernels.local_maps``.
local_maps_factory: Callable = _local_maps_factory


def _act_attrs(node: Node) -> tuple[str, dict | None, dict]:
    from graphshape import activations

    name = node.attrs.get("name")
    try:
        act = activations.get(name)
    except GraphshapeError as e:
        raise GraphshapeError(f"{e}", node=node.name, op=node.op) from None
    attrs = {k: node.attrs[k] for k in act.defaults if node.attrs.get(k) is not None}
    transform = node.attrs.get("transform") or None
    return name, transform, attrs


def _maps(name, transform, attrs, input_scale_factor=1.0):
    """LocalMaps of ``name`` with ``transform``, its input scaled by ``input_scale_factor``
    (the maps at q = s^2 inputs are the q = 1 maps of phi(s x)). Cached."""
    t = dict(transform or {})
    if input_scale_factor != 1.0:
        t["input_scale"] = t.get("input_scale", 1.0) * input_scale_factor
    key = (local_maps_factory, name, tuple(sorted(t.items())), tuple(sorted(attrs.items())))
    lm = _LM_CACHE.get(key)
    if lm is None:
        if len(_LM_CACHE) > 4096:
            _LM_CACHE.clear()
        lm = local_maps_factory(name, t or None, **attrs)
        _LM_CACHE[key] = lm
    return lm


# --------------------------------------------------------------------------- rule context
class RuleContext:
    """What a kernel rule gets: the graph, the node, and the kernels of its inputs
    (``None`` for inputs that are not signals: constants, shapes)."""

    def __init__(self, graph: Graph, node: Node, inputs: list[Kernel | None],
                 q_only: bool = False, constants: dict[str, np.ndarray] | None = None,
                 sources: dict[str, int] | None = None):
        self.graph = graph
        self.node = node
        self.inputs = inputs
        # signal node -> bitset of the layers it is computed from (signal_sources), found
        # when first asked for if not given
        self._sources = sources
        # values computed from constants alone (computed_constants), by producer name
        self.constants = constants or {}
        # only q of the output is wanted (q_local): rules may skip covariances and the unit
        # track, leaving them at placeholder values
        self.q_only = q_only
        self.flags: list[str] = []
        self.notes: list[str] = []

    def flag(self, flag: str, note: str | None = None):
        if flag not in self.flags:
            self.flags.append(flag)
        if note:
            self.notes.append(note)

    @property
    def signals(self) -> list[tuple[int, Kernel]]:
        return [(i, k) for i, k in enumerate(self.inputs) if k is not None]

    @property
    def sources(self) -> dict[str, int]:
        if self._sources is None:
            from graphshape.passes.subnetworks import signal_sources

            self._sources = signal_sources(self.graph)
        return self._sources

    def constant(self, slot: int) -> np.ndarray | None:
        """The value of input ``slot`` when it is a constant node or a value computed from
        constants alone (``gamma.reshape(1, -1, 1, 1)``, a class token expanded over the
        batch: :func:`computed_constants`), else None."""
        if slot >= len(self.node.inputs):
            return None
        return _constant_value(self.graph, self.node.inputs[slot], self.constants)


def _constant_value(graph: Graph, ref: Ref, constants: dict[str, np.ndarray]):
    """The value of ``ref`` when a constant node or a computed constant gives it, else None
    (see :meth:`RuleContext.constant`)."""
    prod = graph[ref.node]
    if prod.op == "constant" and "value" in prod.params:
        return np.asarray(prod.params["value"], dtype=np.float64)
    return constants.get(ref.node) if ref.index == 0 else None


class UnknownKernel(Exception):
    """Raised by a rule that cannot say anything about its output."""


def _gain(k: Kernel, gain: float, bias_sq: float = 0.0) -> Kernel:
    """The kernel of ``a * x + b`` for an affine map with ``mean_rows ||a||^2 = gain`` and
    ``mean b^2 = bias_sq``: linear on q and on every covariance entry."""
    q = gain * k.q + bias_sq
    cov = gain * k.cov + bias_sq
    uq = gain * k.unit_q + bias_sq
    if uq > 0:
        frac = gain * k.unit_q / uq  # dc_out/dc_in along the unit track
        c0 = (gain * k.unit_q * k.unit_c0 + bias_sq) / uq
    else:
        frac, c0 = 0.0, 1.0
    return Kernel(q, cov, uq, c0, frac * k.unit_slope, frac * k.unit_curv)


def _only_signal(ctx: RuleContext) -> Kernel:
    sig = ctx.signals
    if not sig:
        raise UnknownKernel("no signal input")
    return sig[0][1]


# --------------------------------------------------------------------------- rules
def rule_identity(ctx: RuleContext) -> Kernel:
    return _only_signal(ctx)


def rule_approx_identity(ctx: RuleContext) -> Kernel:
    ctx.flag(FLAG_APPROX, f"{ctx.node.op} taken as the identity on q and c "
                          "(exact for inputs constant across locations)")
    return _only_signal(ctx)


def rule_resize(ctx: RuleContext) -> Kernel:
    a = ctx.node.attrs
    scales = a.get("scales")
    # nearest upsampling by integer factors copies every entry equally often: q and c exact
    exact = (a.get("mode") == "nearest" and scales is not None
             and all(float(s) >= 1.0 and float(s).is_integer() for s in scales))
    if not exact:
        ctx.flag(FLAG_APPROX, "resize taken as the identity on q and c (exact for nearest "
                              "upsampling by integer factors)")
    return _only_signal(ctx)


def rule_unknown(ctx: RuleContext) -> Kernel:
    what = ctx.node.attrs.get("description") if ctx.node.op == "opaque" else None
    if moves_data_only(ctx.node) and ctx.inputs and ctx.inputs[0] is not None:
        # (torch.roll, a crop by computed sizes, F.pad by computed amounts: as slice / pad;
        # the tensor moved is the first argument, another one gives a shape at most:
        # x.expand_as(y), x.reshape_as(y))
        ctx.flag(FLAG_APPROX, f"{what}: moves entries, taken as the identity on q and c")
        return ctx.inputs[0]
    raise UnknownKernel(f"no kernel rule for {ctx.node.op}" + (f" ({what})" if what else ""))


def rule_opaque(ctx: RuleContext) -> Kernel:
    """An opaque call: a normalization-activation layer (:func:`rule_norm_activation`), or
    no rule (:func:`rule_unknown`)."""
    if ctx.node.attrs.get("norm_activation"):
        return rule_norm_activation(ctx)
    return rule_unknown(ctx)


def _module_array(module, name: str) -> np.ndarray | None:
    value = getattr(module, name, None)
    return None if value is None else value.detach().cpu().double().numpy().reshape(-1)


def _as_activation(ctx: RuleContext, attrs: dict, k: Kernel) -> Kernel:
    """``k`` through the activation node ``attrs`` would be (rule_activation's maps)."""
    node = Node(ctx.node.name, "activation", list(ctx.node.inputs[:1]), dict(attrs))
    sub = RuleContext(ctx.graph, node, [k], q_only=ctx.q_only)
    out = rule_activation(sub)
    for flag, note in zip(sub.flags, sub.notes + [None] * len(sub.flags)):
        ctx.flag(flag, note)
    return out


def rule_norm_activation(ctx: RuleContext) -> Kernel:
    """timm's EvoNorm S* and Filter Response Normalization layers (opaque calls carrying
    ``attrs["norm_activation"]``: frontends/torch_fx.norm_activation_remainder), at the
    layer's own parameters. Their statistics are per example, taken as the kernel's q
    (features assumed zero-mean, as for the other per-example norms):

    * FRN: ``act(x / rms(x) * weight + bias)``: q set to 1 per example, c kept, the affine
      map, then the activation (the TLU ``max(y, tau)`` is ReLU while tau = 0; no rule else);
    * EvoNorm S: ``act(x) / std(x) * weight + bias``: the activation on the kernel as it
      is, then divided by sqrt(q) of its input per example (c unchanged by that), then the
      affine map. S0's ``x * sigmoid(v x)`` is SiLU at ``v`` = 1 (``silu(v x) / v`` for one
      ``v`` shared by all channels; no rule for ``v`` that differ);
    * GlobalResponseNorm (ConvNeXt V2): the identity while its weight and bias are 0, as at
      its init (no rule else)."""
    remainder = ctx.node.attrs["norm_activation"]
    if "refused" in remainder:
        raise UnknownKernel(f"no kernel rule for {remainder['layer']}: {remainder['refused']}")
    module = ctx.node.attrs.get("module")
    k = _only_signal(ctx)
    if "identity_while_zero" in remainder:
        # GRN, x + gamma * (x * N(x)) + beta: the identity while gamma and beta are 0 (its init)
        if any(np.any(p != 0.0) for p in (_module_array(module, name)
                                          for name in remainder["identity_while_zero"])
               if p is not None):
            raise UnknownKernel(f"no kernel rule for a {remainder['layer']} whose "
                                f"{' or '.join(remainder['identity_while_zero'])} is not 0 "
                                "(the identity only at its init)")
        return k
    weight, bias = _module_array(module, "weight"), _module_array(module, "bias")
    gain = 1.0 if weight is None else float(np.mean(np.square(weight)))
    bias_sq = 0.0 if bias is None else float(np.mean(np.square(bias)))
    act = remainder.get("activation")
    ctx.flag(FLAG_NORM, f"{remainder['layer'].rsplit('.', 1)[-1]}: its statistics per example "
                        "taken as the kernel's q (features assumed zero-mean)")
    if type(module).__name__.startswith("FilterResponse") or act is None:
        k = _gain(Kernel(np.ones_like(k.q), k.c, 1.0, k.unit_c0, k.unit_slope, k.unit_curv),
                  gain, bias_sq)
        if act is None:
            return k
        tau = _module_array(module, "tau")
        if tau is not None and np.any(tau != 0.0):
            raise UnknownKernel("no kernel rule for a TLU max(y, tau) with tau != 0")
        return _as_activation(ctx, act, k)
    act = _v_transform(_module_array(module, "v") if act == {"name": "silu"} else None, act)
    return _gain(_activation_over_own_std(ctx, act, k), gain, bias_sq)


def _activation_over_own_std(ctx: RuleContext, act: dict, k: Kernel) -> Kernel:
    """EvoNorm S's ``act(x) / std(x)`` on the kernel ``k`` of x: the activation's maps,
    then divided by sqrt(q) of x per example (its statistic, features assumed zero-mean);
    c is unchanged by that division."""
    if np.any(k.q <= 0) or k.unit_q <= 0:
        raise UnknownKernel("a normalization of an all-zero signal")
    out = _as_activation(ctx, act, k)
    root = np.sqrt(k.q)
    return Kernel(out.q / k.q, out.cov / np.outer(root, root), out.unit_q / k.unit_q,
                  out.unit_c0, out.unit_slope, out.unit_curv)


def _v_transform(v: np.ndarray | None, act: dict) -> dict:
    """EvoNorm S0's ``x * sigmoid(v x)`` as an activation: SiLU at v = 1, ``silu(v x) / v``
    for one v shared by all channels; no rule for v that differ."""
    if v is None or not v.size:
        return act
    if np.ptp(v) > 0:
        raise UnknownKernel("no kernel rule for x * sigmoid(v x) with v differing across "
                            "channels")
    scale = float(v.reshape(-1)[0])
    if scale != 1.0:
        return {"name": "silu", "transform": {"input_scale": scale, "output_scale": 1.0 / scale}}
    return act


#: flag of a node inside a layer an exporter spelled out (:func:`written_out_layers`)
FLAG_INSIDE_LAYER = "inside a layer written out"


def written_out_layers(graph: Graph) -> dict[str, dict]:
    """Normalization-activation layers spelled out in elementwise nodes (by an exporter, or
    by hand), which the analysis reads whole, as it reads the torch frontend's modules
    (:func:`rule_norm_activation`): EvoNorm S (``normalize._exported_evo_norm``) and ConvNeXt
    V2's GlobalResponseNorm (``normalize._exported_response_norm``). Node by node, their
    products and divisions of signals have no rule. Returns, by the node whose kernel the
    layer's rule gives (EvoNorm's division, GRN's final add), ``{"x", "inside", "layer",
    "rule"}``: the layer's input, the nodes inside it (no kernel of their own), what it is,
    and ``rule(ctx, kernel of x)``."""
    from graphshape.passes import normalize

    layers: dict[str, dict] = {}
    for node in graph:
        if node.op == "div":
            found = normalize._exported_evo_norm(graph, node)
            if found is None:
                continue
            numerator, gate = found["numerator"], found["gate"]
            # x * sigmoid(v * x): SiLU at v's init of 1; else the activation itself
            act = {"name": "silu"} if gate else dict(numerator.attrs)
            layer = f"EvoNorm S ({found['formula']}, written out)"
            layers[node.name] = {
                "x": found["x"], "layer": layer,
                "inside": [n.name for n in (*gate, *([numerator] if gate else []),
                                            *found["statistic"])],
                "rule": functools.partial(_written_evo_norm, act=act, v=found["v"],
                                          layer=layer)}
        elif node.op == "opaque" and node.attrs.get("op_type") == "ReduceL2":
            found = normalize._exported_response_norm(graph, node)
            if found is None:
                continue
            x, nodes = found  # (l2, mean, eps, div, x * N, then gamma's and beta's chain, add)
            layers[nodes[-1].name] = {
                "x": x, "layer": "GlobalResponseNorm (written out)",
                "inside": [n.name for n in nodes[:-1]],
                "rule": functools.partial(_written_response_norm, chain=nodes[5:-1])}
    return layers


def layer_members(layers: dict[str, dict]) -> dict[str, str]:
    """The nodes inside the layers of :func:`written_out_layers`, each with its layer's key
    (the layer's last node)."""
    return {name: key for key, layer in layers.items() for name in layer["inside"]}


def _written_evo_norm(ctx: RuleContext, k: Kernel, *, act: dict, v: np.ndarray | None,
                      layer: str) -> Kernel:
    act = _v_transform(v, act)
    ctx.flag(FLAG_NORM, f"{layer}: its statistics per example taken as the kernel's q "
                        "(features assumed zero-mean)")
    return _activation_over_own_std(ctx, act, k)


def _written_response_norm(ctx: RuleContext, k: Kernel, *, chain: list[Node]) -> Kernel:
    """GRN, ``x + (gamma * (x * N(x)) + beta)``: the identity while gamma and beta are 0 (the
    ``chain`` of ``mul`` / ``add`` by constants after ``x * N``)."""
    scales = [np.asarray(found[1]) for n in chain if n.op == "mul"
              and (found := constant_operand(ctx.graph, n)) is not None]
    shifts = [np.asarray(found[1]) for n in chain if n.op == "add"
              and (found := constant_operand(ctx.graph, n)) is not None]
    if not any(np.all(v == 0.0) for v in scales) or any(np.any(v != 0.0) for v in shifts):
        raise UnknownKernel("no kernel rule for a GlobalResponseNorm whose weight or bias is "
                            "not 0 (the identity only at its init)")
    return k


def _weight_gain(node: Node, weight: np.ndarray, out_axis: int, groups: int = 1) -> float:
    w = np.asarray(weight)
    n_out = w.shape[out_axis] * (groups if out_axis == 1 else 1)
    if n_out == 0:
        return 0.0
    flat = w.reshape(-1)
    return float(np.dot(flat, flat)) / n_out  # BLAS dot: accurate in float32 too


def rule_affine(ctx: RuleContext) -> Kernel:
    node = ctx.node
    k = _only_signal(ctx)
    if node.op == "affine":
        scale = node.params.get("scale")
        shift = node.params.get("shift")
        gain = 1.0 if scale is None else float(np.mean(np.square(scale, dtype=np.float64)))
        bias_sq = 0.0 if shift is None else float(np.mean(np.square(shift, dtype=np.float64)))
        return _gain(k, gain, bias_sq)
    weight = node.params.get("weight")
    if weight is None and len(node.inputs) > 1:
        weight = ctx.constant(1)
    if weight is None:
        raise UnknownKernel(f"{node.op} without a constant weight")
    bias = node.params.get("bias")
    if bias is None and len(node.inputs) > 2:
        bias = ctx.constant(2)
    bias_sq = 0.0 if bias is None else float(np.mean(np.square(bias, dtype=np.float64)))
    if node.op == "conv_transpose":
        # each output location sums about prod(kernel)/prod(stride) taps of every input
        groups = int(node.attrs.get("groups", 1) or 1)
        gain = _weight_gain(node, weight, 1, groups)
        stride = node.attrs.get("stride") or (1,)
        gain /= float(np.prod(stride))
        ctx.flag(FLAG_APPROX, "conv_transpose: taps per output location taken as "
                              "prod(kernel)/prod(stride)")
    elif node.op == "conv":
        gain = _conv_gain(ctx, weight if isinstance(weight, np.ndarray) else np.asarray(weight))
    else:
        # linear (out, in): rows are output features
        w = weight if isinstance(weight, np.ndarray) else np.asarray(weight)
        gain = float(_tap_norms(w).sum()) / max(1, w.shape[0]) if w.ndim == 2 else \
            _weight_gain(node, w, 0)
    # scales a fold moved onto the layer (graphshape.passes.fold, mode "weights")
    gain *= float(node.attrs.get("weight_scale", 1.0)) ** 2
    bias_sq *= float(node.attrs.get("bias_scale", 1.0)) ** 2
    return _gain(k, gain, bias_sq)


# per-tap squared norms, cached per weight array (filled at load time by the torch frontend)
_tap_norms = weight_tap_norms


def _conv_gain(ctx: RuleContext, w: np.ndarray) -> float:
    """Mean over output locations of sum over the taps that fall inside the input (zero
    padding contributes nothing) of ||W_tap||^2, per output channel."""
    node = ctx.node
    n_out = w.shape[0]
    tap_sq = _tap_norms(w) / max(1, n_out)
    in_shape = ctx.graph.info(node.inputs[0]).shape
    out_shape = node.shape
    dims = w.ndim - 2
    if (in_shape is None or out_shape is None or len(in_shape) != dims + 2
            or len(out_shape) != dims + 2
            or not all(isinstance(d, int) for d in (*in_shape[2:], *out_shape[2:]))
            or node.attrs.get("padding_mode", "zeros") != "zeros"):
        return float(tap_sq.sum())
    stride = tuple(node.attrs.get("stride") or (1,) * dims)
    dilation = tuple(node.attrs.get("dilation") or (1,) * dims)
    pads = tuple(node.attrs.get("pads") or (0,) * (2 * dims))
    for d in range(dims):
        inside = _inside_fraction(w.shape[2 + d], out_shape[2 + d], in_shape[2 + d],
                                  stride[d], pads[d], dilation[d])
        shape = [1] * dims
        shape[d] = w.shape[2 + d]
        tap_sq = tap_sq * inside.reshape(shape)
    return float(tap_sq.sum())


@functools.lru_cache(maxsize=1024)
def _inside_fraction(k: int, n_out: int, n_in: int, stride: int, pad: int,
                     dilation: int) -> np.ndarray:
    """Per tap of one spatial dim: the fraction of output positions at which it reads the
    input rather than zero padding."""
    o = np.arange(n_out)[:, None]
    idx = o * stride - pad + np.arange(k)[None, :] * dilation
    return ((idx >= 0) & (idx < n_in)).mean(axis=0)


def rule_matmul(ctx: RuleContext) -> Kernel:
    sig = ctx.signals
    if len(sig) == 1:
        slot, k = sig[0]
        other = ctx.constant(1 - slot)
        if other is None:
            raise UnknownKernel("matmul by a non-constant, non-signal operand")
        # x @ W with W (in, out): output features are W's columns
        w = other if slot == 0 else other.T
        gain = float(np.sum(np.square(w))) / max(1, w.shape[-1])
        return _gain(k, gain)
    if len(sig) == 2:
        (_, a), (_, b) = sig
        shape = ctx.graph.info(ctx.node.inputs[0]).shape
        inner = shape[-1] if shape and isinstance(shape[-1], int) else None
        if inner is None:
            raise UnknownKernel("matmul of two signals with an unknown inner size")
        ctx.flag(FLAG_PRODUCT)
        ctx.flag(FLAG_APPROX, "matmul of two signals: entries taken as independent")
        out = _product(a, b)
        return _gain(out, float(inner))
    raise UnknownKernel("matmul without a signal input")


def rule_activation(ctx: RuleContext) -> Kernel:
    k = _only_signal(ctx)
    name, transform, attrs = _act_attrs(ctx.node)
    slopes = ctx.node.params.get("weight") if ctx.node.attrs.get("learnable_slope") else None
    if slopes is not None and np.ptp(np.asarray(slopes, dtype=np.float64)) > 0:
        ctx.flag(FLAG_APPROX, "PReLU slopes differ across channels: the kernel of their mean")
    lm = _maps(name, transform, attrs)
    b = k.q.shape[0]
    uq_in = k.unit_q
    # one Q-map call and one covariance call per node: the batch and the unit track together
    q_all = np.asarray(lm.q(np.append(k.q, uq_in)), dtype=np.float64)
    q, uq = q_all[:b], float(q_all[b])
    if ctx.q_only:
        return Kernel(q, np.diag(q))
    c = k.c
    iu = _triu(b)
    q1 = np.concatenate([k.q[iu[0]], [uq_in]])
    q2 = np.concatenate([k.q[iu[1]], [uq_in]])
    pair_c = np.concatenate([c[iu], [min(1.0, max(-1.0, k.unit_c0))]])
    pair_cov = np.asarray(lm.cov(q1, q2, pair_c), dtype=np.float64).reshape(-1)
    cov = np.diag(q)
    cov[iu] = pair_cov[:-1]
    cov[(iu[1], iu[0])] = pair_cov[:-1]
    # unit track: the pair (q, c0) and the slope/curvature at c = 1 of the extended C map at
    # the q reached there (= the q = 1 maps of phi(sqrt(q) x))
    if uq_in > 0 and uq > 0:
        c0 = min(1.0, max(-1.0, float(pair_cov[-1]) / uq))
        lm_q = lm if uq_in == 1.0 else _maps(name, transform, attrs, math.sqrt(uq_in))
        s, kk = float(lm_q.c_slope_1), float(lm_q.c_curv_1)
        slope = s * k.unit_slope
        curv = _finite_sum(kk * k.unit_slope ** 2, s * k.unit_curv)
    else:
        c0, slope, curv = 1.0, 0.0, 0.0
    return Kernel(q, cov, uq, c0, slope, curv)


def _finite_sum(a, b):
    """a + b, where an infinite curvature (ReLU-like kinks) stays +inf rather than NaN."""
    total = a + b
    return math.inf if math.isnan(total) else total


def _mix(kernels: Sequence[Kernel], weights_sq: Sequence[float]) -> Kernel:
    """sum_i w_i^2 K_i: the kernel of a weighted sum of uncorrelated signals."""
    q = sum(w * k.q for w, k in zip(weights_sq, kernels))
    cov = sum(w * k.cov for w, k in zip(weights_sq, kernels))
    uqs = [w * k.unit_q for w, k in zip(weights_sq, kernels)]
    uq = sum(uqs)
    if uq > 0:
        share = [u / uq for u in uqs]
        c0 = sum(s * k.unit_c0 for s, k in zip(share, kernels))
        slope = sum(s * k.unit_slope for s, k in zip(share, kernels))
        curv = sum(s * k.unit_curv for s, k in zip(share, kernels) if s > 0)
    else:
        c0, slope, curv = 1.0, 0.0, 0.0
    return Kernel(np.asarray(q, float), np.asarray(cov, float), uq, c0, slope, curv)


def _sum_weights(node: Node) -> list[float]:
    n = len(node.inputs)
    if node.op == "sum":
        w = node.attrs.get("weights")
        return [float(v) for v in w] if w is not None else [1.0] * n
    if node.op == "sub":
        return [1.0, -1.0][:n]
    alpha = node.attrs.get("alpha")
    return [1.0, 1.0 if alpha is None else float(alpha)][:n]


#: ops that pass a value on unchanged (at initialization): x and dropout(x) are one value
_SAME_VALUE = ("identity", "dropout", "cast")


def _scaled_value(ctx: RuleContext, ref: Ref) -> tuple[Ref, float]:
    """``(base, s)`` with ``ref``'s value equal to ``s`` times ``base``'s, followed back through
    scalings by a uniform constant and ops that pass their input on (``0.5 * x`` -> ``(x,
    0.5)``; ``(ref, 1)`` when there are none)."""
    graph, scale = ctx.graph, 1.0
    while ref.index == 0:
        node = graph[ref.node]
        if node.op in _SAME_VALUE and len(node.inputs) == 1:
            ref = node.inputs[0]
            continue
        if node.op not in ("mul", "div") or len(node.inputs) != 2:
            break
        signal_slots = [i for i, r in enumerate(node.inputs) if r.node in ctx.sources]
        if len(signal_slots) != 1 or (node.op == "div" and signal_slots[0] != 0):
            break
        slot = signal_slots[0]
        value = _constant_value(graph, node.inputs[1 - slot], ctx.constants)
        if value is None or value.size == 0 or np.ptp(value) > 0 or float(value.flat[0]) == 0:
            break
        if graph.info(ref).shape != graph.info(node.inputs[slot]).shape:
            break  # (a broadcasting scale: a different value)
        factor = float(value.flat[0])
        scale *= 1.0 / factor if node.op == "div" else factor
        ref = node.inputs[slot]
    return ref, scale


def rule_sum(ctx: RuleContext) -> Kernel:
    node = ctx.node
    weights = _sum_weights(node)
    sig = ctx.signals
    if not sig:
        raise UnknownKernel("no signal input")
    # inputs that are multiples of one value add up before squaring: x + x is 2x, not
    # sqrt(2)x, and x + 0.5 * x is 1.5x
    merged: dict[Ref, float] = {}
    kernels: dict[Ref, Kernel] = {}
    for slot, k in sig:
        base, scale = _scaled_value(ctx, node.inputs[slot])
        merged[base] = merged.get(base, 0.0) + weights[slot] * scale
        # the base's kernel, from this input's: a scaling by s multiplies it by s^2
        kernels[base] = k if scale == 1.0 else _gain(k, 1.0 / (scale * scale))
    bases = list(merged)
    shared = [(a, b) for i, a in enumerate(bases) for b in bases[i + 1:]
              if ctx.sources.get(a.node, 0) & ctx.sources.get(b.node, 0)]
    if shared:
        a, b = shared[0]
        ctx.flag(FLAG_APPROX, f"inputs {a.node!r} and {b.node!r} are correlated (computed from "
                              "one value with no conv/linear layer between): the sum's kernel "
                              "is that of uncorrelated inputs")
    out = _mix([kernels[r] for r in merged], [w * w for w in merged.values()])
    # constant operands: a shift by b adds mean(b^2) to q and to every covariance entry
    # (assuming the signal has zero mean across features: flagged)
    bias_sq = 0.0
    for slot in range(len(node.inputs)):
        if ctx.inputs[slot] is not None:
            continue
        value = ctx.constant(slot)
        if value is None:
            raise UnknownKernel(f"{node.op} with an operand that is neither a signal nor a constant")
        bias_sq += weights[slot] ** 2 * float(np.mean(np.square(value)))
    if bias_sq > 0:
        ctx.flag(FLAG_APPROX, f"{node.op} of a constant: signal assumed zero-mean")
        out = _gain(out, 1.0, bias_sq)
    return out


def _product(a: Kernel, b: Kernel) -> Kernel:
    slope = a.unit_slope + b.unit_slope
    curv = _finite_sum(a.unit_curv + b.unit_curv, 2 * a.unit_slope * b.unit_slope)
    return Kernel(a.q * b.q, a.cov * b.cov, a.unit_q * b.unit_q, a.unit_c0 * b.unit_c0,
                  slope, curv)


def rule_product(ctx: RuleContext) -> Kernel:
    node = ctx.node
    sig = ctx.signals
    if node.op == "matmul":
        return rule_matmul(ctx)
    if len(sig) >= 2:
        if node.op == "div":
            raise UnknownKernel("division by a signal has no finite moments")
        ctx.flag(FLAG_PRODUCT)
        out = sig[0][1]
        for _, k in sig[1:]:
            out = _product(out, k)
        return out
    if not sig:
        raise UnknownKernel("no signal input")
    slot, k = sig[0]
    if node.op == "div" and slot != 0:
        raise UnknownKernel("division by a signal has no finite moments")
    value = ctx.constant(1 - slot) if len(node.inputs) == 2 else None
    if value is None:
        raise UnknownKernel(f"{node.op} by an operand that is neither a signal nor a constant")
    if node.op == "div":
        if np.any(value == 0):
            raise UnknownKernel("division by a constant that holds zeros")
        value = 1.0 / value
    if np.size(value) > 1 and np.ptp(value) > 0:
        ctx.flag(FLAG_APPROX, "scaling by a non-uniform constant: q taken as mean(scale^2) q")
    return _gain(k, float(np.mean(np.square(value))))


def rule_concat(ctx: RuleContext) -> Kernel:
    node = ctx.node
    axis = node.attrs.get("axis", 1)
    kernels, shares = [], []
    const_sq = 0.0
    total = 0.0
    for slot, ref in enumerate(node.inputs):
        k = ctx.inputs[slot]
        value = ctx.constant(slot) if k is None else None
        shape = ctx.graph.info(ref).shape
        if value is not None and (shape is None or len(shape) == value.ndim):
            shape = value.shape  # (an exporter's Expand that shape inference cannot follow)
        try:
            n = shape[axis]
        except (TypeError, IndexError):
            n = None
        if not isinstance(n, (int, np.integer)):
            raise UnknownKernel(f"concat input {ref!r} has an unknown size along axis {axis}")
        total += n
        if k is None:
            if value is None:
                raise UnknownKernel(f"concat input {ref!r} is neither a signal nor a constant")
            const_sq += n * float(np.mean(np.square(value)))
            ctx.flag(FLAG_APPROX, "concat of a constant: its channels add to q and covariances")
        else:
            kernels.append(k)
            shares.append(float(n))
    if not kernels:
        raise UnknownKernel("no signal input")
    if total == 0:
        raise UnknownKernel("concat of empty tensors")
    out = _mix(kernels, [s / total for s in shares])
    if const_sq:
        out = _gain(out, 1.0, const_sq / total)
    return out


def rule_norm(ctx: RuleContext) -> Kernel:
    node = ctx.node
    k = _only_signal(ctx)
    weight = node.params.get("weight")
    bias = node.params.get("bias")
    gain = 1.0 if weight is None else float(np.mean(np.square(weight, dtype=np.float64)))
    bias_sq = 0.0 if bias is None else float(np.mean(np.square(bias, dtype=np.float64)))
    if node.op == "lrn":
        ctx.flag(FLAG_APPROX, "lrn taken as the identity on q and c")
        return k
    if node.op == "batch_norm" and node.attrs.get("frozen"):
        # fixed statistics (FrozenBatchNorm2d): x * scale + shift per channel, as "affine"
        mean, var = node.params.get("running_mean"), node.params.get("running_var")
        if mean is None or var is None:
            raise UnknownKernel("frozen batch norm without running statistics")
        scale = 1.0 / np.sqrt(np.asarray(var, np.float64) + float(node.attrs.get("eps", 1e-5)))
        if weight is not None:
            scale = scale * np.asarray(weight, np.float64)
        shift = -np.asarray(mean, np.float64) * scale
        if bias is not None:
            shift = shift + np.asarray(bias, np.float64)
        return _gain(k, float(np.mean(np.square(scale))), float(np.mean(np.square(shift))))
    if node.op == "batch_norm":
        # Training-mode batch statistics at init. Per channel, the mean over a large batch
        # and all locations is the part every example shares: for unrelated examples that is
        # the correlation C_f(0) = unit_c0 the network has built up to here (the mean of the
        # activations). Removing it maps c to (c - c0) / (1 - c0); the variance scales q to
        # 1 on average.
        ctx.flag(FLAG_NORM, "batch norm with training-mode batch statistics: channels scaled "
                            "to q = 1 on average over the batch, the component shared by "
                            "unrelated examples (C_f(0)) removed: c -> (c - c0) / (1 - c0)")
        scale = float(np.mean(k.q))
        if scale <= 0:
            raise UnknownKernel("batch norm of an all-zero signal: the output is the bias")
        q = k.q / scale
        c0 = min(max(float(k.unit_c0), -1.0), 1.0)
        if c0 < 1.0 - 1e-9:
            c = np.clip((k.c - c0) / (1.0 - c0), -1.0, 1.0)
            np.fill_diagonal(c, 1.0)
            stretch = 1.0 / (1.0 - c0)
            unit = (0.0, k.unit_slope * stretch, k.unit_curv * stretch)
        else:  # every example alike: nothing to center against
            c, unit = k.c, (k.unit_c0, k.unit_slope, k.unit_curv)
        out = Kernel(q, c * np.sqrt(np.outer(q, q)), 1.0, *unit)
        return _gain(out, gain, bias_sq)
    # per-example normalizations: q -> 1 per example; c kept (features assumed zero-mean)
    ctx.flag(FLAG_NORM, f"{node.op}: q set to 1 per example, c assumed unchanged")
    if node.op == "instance_norm":
        ctx.flag(FLAG_APPROX, "instance norm normalizes over locations: not defined for "
                              "inputs constant across locations")
    q = 1.0
    if node.op == "std_norm" and node.attrs.get("correction") and node.attrs.get("centre", True):
        # x - mean divided by a variance that divides by n - correction: its mean square is
        # (n - correction) / n. (Not centred, x's own mean adds mean^2 / var, 1 / n on
        # average for zero-mean features: q = 1 again)
        n = int(np.prod(node.attrs["normalized_shape"]))
        q = (n - int(node.attrs["correction"])) / n
    return _gain(Kernel(np.full_like(k.q, q), k.c * q, q, k.unit_c0, k.unit_slope, k.unit_curv),
                 gain, bias_sq)


#: ops whose output has its input's layout (same axes, same feature axis)
_SAME_LAYOUT = frozenset((
    "activation", "add", "sub", "mul", "div", "sum", "concat", "dropout", "identity", "cast",
    "slice", "pad", "avg_pool", "max_pool", "global_avg_pool", "global_max_pool",
    "adaptive_avg_pool", "adaptive_max_pool", "resize"))
#: ops that put the features on axis 1 (channels-first)
_CHANNELS_FIRST = frozenset((
    "conv", "conv_transpose", "batch_norm", "group_norm", "instance_norm", "lrn"))
#: ops that put the features on the last axis
_FEATURES_LAST = frozenset(("linear", "layer_norm", "rms_norm", "std_norm"))


def _rank(graph: Graph, ref: Ref) -> int | None:
    shape = graph.info(ref).shape
    return None if shape is None else len(shape)


def feature_axis(graph: Graph, ref: Ref, _depth: int = 0) -> int | None:
    """The axis of ``ref`` that holds the features (non-negative), read from the layer
    that last set them: a conv or batch / group norm puts them on axis 1, a linear layer
    or layer / RMS norm on the last axis (tokens, or a channels-last image); elementwise
    ops, pools, slices and concats keep them where they are, a transpose moves them.
    None when no such layer is found before a reshape or another op that re-lays the
    value out."""
    node = graph[ref.node]
    rank = _rank(graph, ref)
    if rank is None or _depth > 256:
        return None
    if node.op in _CHANNELS_FIRST:
        return 1 if rank >= 2 else None
    if node.op in _FEATURES_LAST:
        return rank - 1
    if node.op == "affine":
        axis = node.attrs.get("axis", 1)
        return axis % rank if isinstance(axis, int) else None
    if node.op == "transpose":
        perm = node.attrs.get("perm")
        inner = feature_axis(graph, node.inputs[0], _depth + 1) if node.inputs else None
        if inner is None or perm is None or inner not in perm:
            return None
        return list(perm).index(inner)
    if node.op in ("flatten", "reshape", "squeeze", "unsqueeze") and node.inputs:
        # the features stay put when every dim up to theirs is kept, or when they are
        # last and the last dim keeps its size (x.flatten(2) of NCHW; N,H,W,C -> N,HW,C)
        src = node.inputs[0]
        inner = feature_axis(graph, src, _depth + 1)
        shape_in, shape_out = graph.info(src).shape, graph.info(ref).shape
        if inner is None or shape_in is None:
            return None
        if inner == len(shape_in) - 1 and isinstance(shape_in[-1], int) \
                and shape_in[-1] == shape_out[-1] and shape_in[-1] > 1:
            return rank - 1
        if (inner < rank and tuple(shape_in[:inner + 1]) == tuple(shape_out[:inner + 1])
                and all(isinstance(d, int) for d in shape_in[1:inner + 1])):
            return inner
        return None
    if node.op in _SAME_LAYOUT:
        for src in node.inputs:
            if graph[src.node].op == "constant":
                continue
            inner = feature_axis(graph, src, _depth + 1)
            inner_rank = _rank(graph, src)
            if inner is not None and inner_rank is not None and inner_rank <= rank:
                return inner + rank - inner_rank  # (broadcasting prepends axes)
        return None
    return None


def rule_reduce(ctx: RuleContext) -> Kernel:
    """A mean or max over locations (or tokens) is taken as the identity on q and c, as
    pooling is; a reduction over the features has no rule. The features' axis is read from
    the layers before (:func:`feature_axis`: axis 1 after a conv, the last after a linear
    layer or a layer norm); where it cannot be, a reduction over axes 2 and up counts as
    one over locations (channels-first)."""
    node = ctx.node
    axes = node.attrs.get("axes")
    kind = node.attrs.get("kind")
    if kind in ("mean", "max") and axes is not None and node.inputs \
            and all(isinstance(a, int) and a >= 0 for a in axes):
        features = feature_axis(ctx.graph, node.inputs[0])
        over_locations = (all(a >= 2 for a in axes) if features is None
                          else features not in axes and 0 not in axes)
        if over_locations:
            what = "locations" if features in (None, 1) else "tokens / locations"
            ctx.flag(FLAG_APPROX, f"{kind} over {what} taken as the identity on q and c")
            return _only_signal(ctx)
        if features is not None and features in axes:
            raise UnknownKernel(f"{kind} over the features (axis {features}): no kernel rule")
    return rule_unknown(ctx)


def rule_none(ctx: RuleContext) -> Kernel:
    raise UnknownKernel("io/constant node")


#: canonical op -> kernel rule (RuleContext -> Kernel; raises UnknownKernel when it cannot
#: say). Every op of graphshape.ops.OPS has an entry (tests/test_analysis.py checks).
KERNEL_RULES: dict[str, Callable[[RuleContext], Kernel]] = {
    "input": rule_none,
    "constant": rule_none,
    "output": rule_identity,
    "conv": rule_affine,
    "conv_transpose": rule_affine,
    "linear": rule_affine,
    "affine": rule_affine,
    "matmul": rule_product,
    "add": rule_sum,
    "sub": rule_sum,
    "sum": rule_sum,
    "mul": rule_product,
    "div": rule_product,
    "concat": rule_concat,
    "activation": rule_activation,
    "batch_norm": rule_norm,
    "layer_norm": rule_norm,
    "rms_norm": rule_norm,
    "std_norm": rule_norm,
    "group_norm": rule_norm,
    "instance_norm": rule_norm,
    "lrn": rule_norm,
    "avg_pool": rule_approx_identity,
    "max_pool": rule_approx_identity,
    "global_avg_pool": rule_approx_identity,
    "global_max_pool": rule_approx_identity,
    "adaptive_avg_pool": rule_approx_identity,
    "adaptive_max_pool": rule_approx_identity,
    "flatten": rule_identity,
    "reshape": rule_identity,
    "transpose": rule_approx_identity,
    "depth_to_space": rule_approx_identity,  # (entries regrouped into other locations)
    "space_to_depth": rule_approx_identity,
    "squeeze": rule_identity,
    "unsqueeze": rule_identity,
    "slice": rule_approx_identity,
    "split": rule_approx_identity,
    "pad": rule_approx_identity,
    "resize": rule_resize,
    "dropout": rule_identity,
    "identity": rule_identity,
    "cast": rule_identity,
    "softmax": rule_unknown,
    "log_softmax": rule_unknown,
    "reduce": rule_reduce,
    "opaque": rule_opaque,
}


def apply_rule(graph: Graph, node: Node, inputs: list[Kernel | None], *,
               q_only: bool = False, constants: dict[str, np.ndarray] | None = None,
               sources: dict[str, int] | None = None,
               ) -> tuple[Kernel | None, list[str], list[str]]:
    """Apply ``node``'s kernel rule to the kernels of its inputs: (kernel or None, flags,
    notes). ``q_only``: only the output's q is wanted (its other fields are placeholders).
    ``constants``: values of computed constants (:func:`computed_constants`) by node name.
    ``sources``: :func:`graphshape.passes.subnetworks.signal_sources` of ``graph`` (found
    here when a rule needs it and it is not given)."""
    rule = KERNEL_RULES.get(node.op)
    ctx = RuleContext(graph, node, inputs, q_only, constants, sources)
    if rule is None:
        return None, [f"unknown after {node.op}"], [f"no kernel rule for op {node.op!r}"]
    try:
        out = rule(ctx)
    except UnknownKernel as e:
        return None, ctx.flags + [f"unknown after {node.op}"], ctx.notes + [str(e)]
    if not (np.all(np.isfinite(out.q)) and np.all(np.isfinite(out.cov))):
        return None, ctx.flags + [f"unknown after {node.op}"], ctx.notes + [
            "the predicted kernel overflowed"]
    return out, ctx.flags, ctx.notes


# --------------------------------------------------------------------------- propagation
def is_float_value(graph: Graph, ref: Ref) -> bool:
    """A floating-point tensor (or of unknown dtype), or a container of them."""
    return graph.info(ref).dtype in _FLOAT_DTYPES or holds_tensors(graph[ref.node])


def example_kernels(graph: Graph, example_inputs) -> tuple[dict[str, Kernel | None], int, str]:
    """Kernels of the model inputs: from ``example_inputs`` (tensors/arrays in input order),
    or, without them, two unit-q uncorrelated examples per input."""
    if example_inputs is None:
        k = Kernel(np.ones(2), np.eye(2))
        # (integer inputs, token ids, have no kernel: as with example inputs)
        return ({name: k if may_hold_signal(graph[name]) else None for name in graph.inputs},
                2, "two unit-q, uncorrelated examples (no inputs given)")
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    if len(example_inputs) != len(graph.inputs):
        raise GraphshapeError(
            f"the graph has {len(graph.inputs)} inputs {graph.inputs}, "
            f"{len(example_inputs)} example inputs were given")
    result: dict[str, Kernel | None] = {}
    batch = None
    # a model input that is a container (a dict of tensors): its entries' kernels, by the
    # name of the node reading each one (meta["input_entry"], from the torch frontend)
    by_input = dict(zip(graph.inputs, example_inputs))
    values = [(name, x) for name, x in by_input.items()
              if not isinstance(x, (dict, list, tuple))]
    for node in graph:
        entry = node.meta.get("input_entry")
        if entry is not None and isinstance(by_input.get(entry[0]), (dict, list, tuple)):
            try:
                values.append((node.name, by_input[entry[0]][entry[1]]))
            except (KeyError, IndexError, TypeError):
                raise GraphshapeError(f"the example input for {entry[0]!r} has no entry "
                                      f"{entry[1]!r}, which the model reads", node=node.name) from None
    for name, x in values:
        arr = _to_numpy(x)
        if arr is None or arr.dtype.kind != "f" or arr.ndim == 0:
            result[name] = None
            continue
        if batch is not None and arr.shape[0] != batch:
            raise GraphshapeError(f"example inputs disagree on the batch size "
                                  f"({batch} and {arr.shape[0]} at input {name!r})")
        batch = arr.shape[0]
        result[name] = kernel_of(arr)
    return result, batch or 0, f"{batch} example(s) given"


def _to_numpy(x) -> np.ndarray | None:
    if isinstance(x, np.ndarray):
        return x
    detach = getattr(x, "detach", None)
    if detach is not None:
        return detach().cpu().double().numpy() if x.is_floating_point() else detach().cpu().numpy()
    if isinstance(x, (float, int, list)):
        return np.asarray(x, dtype=np.float64)
    return None


def propagate(graph: Graph, input_kernels: dict[str, Kernel | None],
              measured: dict[str, Kernel] | None = None,
              constants: dict[str, np.ndarray] | None = None,
              layers: dict[str, dict] | None = None,
              sources: dict[str, int] | None = None):
    """Push kernels through ``graph``. Returns ({Ref: Kernel or None}, {name: flags},
    {name: notes}); nodes that read constants only (not signals) get no flags entry.
    ``measured``: kernels for values computed from integer inputs
    (:func:`integer_derived`), used where no rule gives one (their first float values, an
    embedding, a sin of a timestep): the rules start again from there.
    ``constants``: values of computed constants (:func:`computed_constants`), which the
    rules read as they read constant nodes. ``layers``: :func:`written_out_layers`
    (found here when None). ``sources``: as for :func:`apply_rule`."""
    from graphshape.passes.subnetworks import signal_sources

    measured = measured or {}
    sources = signal_sources(graph) if sources is None else sources
    kernels: dict[Ref, Kernel | None] = {}
    unknown_origin: dict[Ref, str] = {}  # values unknown for want of a rule, and why
    flags: dict[str, list[str]] = {}
    notes: dict[str, list[str]] = {}
    layers = written_out_layers(graph) if layers is None else layers
    inside = layer_members(layers)
    for node in graph:
        node_flags = list(node.meta.get("flags", []))
        if node.op == "input" or node.name in input_kernels:  # (also a dict input's entry)
            kernels[node.out] = input_kernels.get(node.name)
            flags[node.name], notes[node.name] = node_flags, []
            continue
        if node.op == "constant" or not may_hold_signal(node) or \
                "shape_computation" in node.meta.get("flags", ()):
            # constants, integer values (sizes, indices) and tensors made from a value's
            # shape alone (torch.zeros_like(x)) are not signals
            continue
        if node.name in inside:  # (read only inside its layer, whose last node has a rule)
            key = inside[node.name]
            flags[node.name] = node_flags + [FLAG_INSIDE_LAYER]
            notes[node.name] = [f"inside {layers[key]['layer']}: the layer's kernel is "
                                f"given at {key!r}"]
            continue
        unknown_in = [unknown_origin[r] for r in node.inputs
                      if r in unknown_origin and is_float_value(graph, r)]
        ins = [kernels.get(r) if is_float_value(graph, r) else None for r in node.inputs]
        if node.name in layers:  # the layer's rule, from the kernel of its input
            x = layers[node.name]["x"]
            unknown_in = [unknown_origin[x]] if x in unknown_origin else []
            ins = [kernels.get(x)]
        if unknown_in:
            out, f, n = None, [f"unknown after {unknown_in[0]}"], []
        elif not any(k is not None for k in ins):
            if node.name not in measured:
                continue  # reads constants (or non-float values) only: not a signal
            out, f, n = None, [], []
        elif node.name in layers:
            ctx = RuleContext(graph, node, ins, constants=constants, sources=sources)
            try:
                out, f, n = layers[node.name]["rule"](ctx, ins[0]), ctx.flags, ctx.notes
            except UnknownKernel as e:
                out, f, n = None, ctx.flags + [f"unknown after {node.op}"], ctx.notes + [str(e)]
        else:
            out, f, n = apply_rule(graph, node, ins, constants=constants, sources=sources)
        if out is None and node.name in measured:
            out, f, n = measured[node.name], [FLAG_FROM_INTEGERS], []
        for i in range(len(node.outputs)):
            ref = Ref(node.name, i)
            kernels[ref] = out
            if out is None:
                unknown_origin[ref] = next(
                    (x[len("unknown after "):] for x in f if x.startswith("unknown after ")),
                    node.op)
        flags[node.name] = node_flags + [x for x in f if x not in node_flags]
        notes[node.name] = n
    return kernels, flags, notes


#: flag of the values whose kernel was measured on the example inputs (integer_derived)
FLAG_FROM_INTEGERS = "from integer inputs: measured"


def _input_dependent(graph: Graph) -> tuple[set[str], list[str]]:
    """(nodes whose value depends on a model input's values, not only on its shape; those
    of them that are floating-point and depend on the inputs only through integer ones)."""
    float_inputs = {name for name in graph.inputs if may_hold_signal(graph[name])}
    values: set[str] = set(graph.inputs)       # depends on an input's values
    from_floats: set[str] = set(float_inputs)  # ... on a floating-point input's
    from_integers = []
    for node in graph:
        if node.op == "input" or "shape_computation" in node.meta.get("flags", ()):
            continue
        sources = [r.node for r in node.inputs if r.node in values]
        if not sources:
            continue
        values.add(node.name)
        if any(s in from_floats for s in sources) or node.meta.get("input_entry") is not None:
            from_floats.add(node.name)  # (a dict input's entry is an input of its own)
        elif may_hold_signal(node):
            from_integers.append(node.name)
    return values, from_integers


def integer_derived(graph: Graph) -> list[str]:
    """Floating-point values that depend on the model's inputs only through integer ones:
    a diffusion model's timestep embedding (``t[:, None].float()`` -> sin / cos -> MLP), a
    token or label embedding. No kernel rule starts from integers, but at initialization
    such a value is a fixed function of the example inputs, so its kernel is measured."""
    return _input_dependent(graph)[1]


def computed_constants(graph: Graph) -> list[str]:
    """Floating-point values computed from constants alone (and at most the inputs'
    shapes) that a node on the signal path reads: a layer scale reshaped for broadcasting
    (``x * self.gamma.reshape(1, -1, 1, 1)``), a class token expanded over the batch
    (``torch.cat([self.cls_token.expand(n, -1, -1), x], 1)``), a positional encoding built
    from ``arange``, ``sin`` and ``cos``. The rules read them as constants; their values
    are those of one run of the model (:func:`analyze`)."""
    dependent, _ = _input_dependent(graph)
    found: dict[str, None] = {}
    for node in graph:
        if node.name not in dependent:
            continue
        for ref in node.inputs:
            prod = graph[ref.node]
            # (a float "shape computation", torch.zeros_like(x), is one: sizes are not float)
            if (ref.node not in dependent and ref.index == 0 and prod.op != "constant"
                    and may_hold_signal(prod) and not holds_tensors(prod)):
                found[ref.node] = None
    return list(found)


def analyze(graph: Graph, example_inputs=None, *, empirical: bool = False, module=None):
    """Per-node kernel statistics of ``graph`` (see :class:`graphshape.stats.KernelStats`).

    ``example_inputs``: a tensor/array or tuple of them, one per graph input, with the batch
    on axis 0 (2 or more examples for c); None: two unit-q, uncorrelated examples.
    ``empirical=True`` also runs the model on ``example_inputs`` (``module``: a
    ``torch.fx.GraphModule`` emitted from ``graph``; emitted here when not given) and records
    the measured q and c and the one-step prediction ``q_local`` at every node.
    The model also runs once, without ``empirical``, where the rules need values computed
    from constants (:func:`computed_constants`; on zeros of the inputs' shapes when no
    example inputs are given) or kernels of values computed from integer inputs
    (:func:`integer_derived`).
    """
    from graphshape.stats import KernelStats

    if not isinstance(graph, Graph):
        raise GraphshapeError(f"analyze() takes a graphshape Graph, got {type(graph).__name__}")
    in_kernels, batch, source = example_kernels(graph, example_inputs)
    measured = None
    from_integers = integer_derived(graph) if example_inputs is not None else []
    computed = computed_constants(graph)
    constants: dict[str, np.ndarray] = {}
    run_inputs = example_inputs
    if run_inputs is None and computed:
        # computed constants depend on the inputs' shapes at most: any inputs of those
        # shapes give their values
        run_inputs = _placeholder_inputs(graph)
    if run_inputs is not None and (from_integers or computed or empirical):
        from graphshape.passes.measure import measure_with_values

        try:
            measured, constants = measure_with_values(
                graph, run_inputs, module=module, values_of=computed,
                kernels_of=None if empirical else from_integers)
        except GraphshapeError:
            if empirical and example_inputs is not None:
                raise
            # (a graph torch cannot run: those values stay unknown)
            from_integers, measured = [], None
    from graphshape.passes.subnetworks import signal_sources

    layers = written_out_layers(graph)
    members = layer_members(layers)
    sources = signal_sources(graph)
    kernels, flags, notes = propagate(
        graph, in_kernels, {name: measured[name] for name in from_integers
                            if measured.get(name) is not None}, constants, layers, sources)
    from graphshape.passes.shaping import find_nongaussian_activations
    from graphshape.passes.subnetworks import stacked_activations

    for name, prev in stacked_activations(graph).items():
        if name in flags and FLAG_STACKED not in flags[name]:
            flags[name].append(FLAG_STACKED)
            notes[name].append(f"input computed from activation {prev!r} with no conv/linear "
                               "layer between: not Gaussian, the prediction is approximate")
    for name in find_nongaussian_activations(graph):
        if name in flags and FLAG_NONGAUSSIAN not in flags[name]:
            # say why measured q departs from the prediction here (see the function's doc)
            flags[name].append(FLAG_NONGAUSSIAN)
            notes[name].append("input is a join whose identity shortcut carries a non-zero-mean "
                               "activation output: not Gaussian, q under-predicted")
    if empirical and example_inputs is None:
        raise GraphshapeError("empirical=True needs example_inputs to run the model on")
    if not empirical:
        measured = None  # (measured above for the integer-derived values only)
    elif example_inputs is None:
        measured = None  # (placeholder inputs, for computed constants only)
    rows = []
    per_node: dict[str, dict] = {}
    for node in graph:
        if node.op == "output" or node.name not in flags:
            continue  # outputs repeat their input; constants are not signals
        k = kernels.get(node.out)
        row: dict[str, Any] = {
            "node": node.name,
            "op": node.op,
            "activation": node.attrs.get("name") if node.op == "activation" else None,
            "q_pred": None if k is None else float(np.mean(k.q)),
            "c_pred": None if k is None else _mean_offdiag(k.c),
            "c0": None if k is None else float(k.unit_c0),
            "c_slope_1": None if k is None else float(k.unit_slope),
            "c_curv_1": None if k is None else float(k.unit_curv),
            "flags": flags.get(node.name, []),
            "notes": notes.get(node.name, []),
        }
        if measured is not None:
            m = measured.get(node.name)
            row["q_emp"] = None if m is None else float(np.mean(m.q))
            row["c_emp"] = None if m is None else _mean_offdiag(m.c)
            row["q_local"] = _q_local(graph, node, measured, in_kernels, constants, layers,
                                      members, sources)
        _no_nan(row)
        rows.append(row)
        pair = {}
        if k is not None:
            pair["q_pred"], pair["c_pred"] = k.q, k.c
        m = measured.get(node.name) if measured is not None else None
        if m is not None:
            pair["q_emp"], pair["c_emp"] = m.q, m.c
        if pair:
            per_node[node.name] = pair
    meta = {"inputs": source, "batch": batch, "empirical": empirical, "nodes": len(graph)}
    warnings = []
    if graph.meta.get("traced_with") == "torch.onnx.export":
        meta["traced_with"] = "torch.onnx.export"
        warnings.append(
            f"{graph.meta.get('fx_error')}; these are the statistics of its ONNX export "
            "(frontends/torch_onnx.py), traced in eval mode: dropout and drop path are left "
            "out")
    if example_inputs is None:
        integer_inputs = [name for name in graph.inputs if not may_hold_signal(graph[name])]
        waiting = integer_derived(graph)
        if integer_inputs and waiting:
            # (a token model: without example ids nothing after its embedding is known)
            warnings.append(
                f"the model reads integer input(s) {', '.join(map(repr, integer_inputs))} "
                f"(token ids, a timestep, labels): no rule starts from integers, so "
                f"{len(waiting)} value(s) computed from them (first {waiting[0]!r}) and the "
                "nodes after them are not shown; pass example inputs to measure them there "
                "(graphshape.analyze(model, example_inputs))")
    if warnings:
        meta["warnings"] = warnings
    return KernelStats(rows, kernels=per_node, meta=meta)


def graph_input_specs(graph: Graph) -> list[tuple[tuple[int, ...], str | None]] | None:
    """[(shape, dtype)] of the model inputs, unknown or symbolic dims (a dynamic batch, a
    sequence length) as 2, the batch the analysis assumes without example inputs; None
    where an input's shape is unknown or the input is a container."""
    specs = []
    for name in graph.inputs:
        info = graph.info(Ref(name, 0))
        if info.shape is None or holds_tensors(graph[name]):
            return None
        specs.append((tuple(d if isinstance(d, int) and d > 0 else 2 for d in info.shape),
                      info.dtype))
    return specs


def _placeholder_inputs(graph: Graph):
    """Zeros of each model input's shape and dtype (:func:`graph_input_specs`), or None."""
    import torch

    specs = graph_input_specs(graph)
    if specs is None:
        return None
    inputs = []
    for shape, dtype in specs:
        dtype = getattr(torch, dtype or "", None)  # "float32", "int64", "bool", ...
        inputs.append(torch.zeros(shape, dtype=dtype if isinstance(dtype, torch.dtype)
                                  else torch.float32))
    return tuple(inputs)


def _no_nan(row: dict) -> None:
    """NaN never reaches the user: a number that came out NaN (an overflowing model run, a
    0 * inf in a chain rule) is reported as unknown, and said so."""
    bad = [k for k, v in row.items() if isinstance(v, float) and math.isnan(v)]
    for k in bad:
        row[k] = None
    if bad:
        row["flags"] = list(row["flags"]) + [f"not a number: {', '.join(bad)}"]


def _q_local(graph: Graph, node: Node, measured: dict, in_kernels,
             constants: dict[str, np.ndarray], layers: dict[str, dict],
             members: dict[str, str], sources: dict[str, int] | None = None) -> float | None:
    """q predicted by the node's rule from the measured kernels of its own inputs (at the
    last node of a layer written out, :func:`written_out_layers`: the layer's rule from the
    measured kernel of the layer's input; none inside it: ``members``,
    :func:`layer_members`)."""
    if node.op == "input":
        k = in_kernels.get(node.name)
        return None if k is None else float(np.mean(k.q))
    if node.name in layers:
        x = layers[node.name]["x"]
        m = measured.get(x.node) if x.index == 0 else None
        if m is None:
            return None
        try:
            out = layers[node.name]["rule"](RuleContext(graph, node, [m], constants=constants), m)
        except UnknownKernel:
            return None
        return float(np.mean(out.q))
    if node.name in members:
        return None
    ins = []
    for r in node.inputs:
        m = measured.get(r.node) if r.index == 0 else None
        ins.append(m if (m is not None and is_float_value(graph, r)) else None)
    if not any(k is not None for k in ins):
        return None
    out, _, _ = apply_rule(graph, node, ins, q_only=True, constants=constants, sources=sources)
    return None if out is None else float(np.mean(out.q))


def _mean_offdiag(c: np.ndarray) -> float | None:
    """Mean of the off-diagonal entries of a symmetric matrix with unit diagonal."""
    b = c.shape[0]
    if b < 2:
        return None
    return (float(c.sum()) - b) / (b * (b - 1))
