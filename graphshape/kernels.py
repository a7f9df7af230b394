"""Local Q/C maps of (transformed) activations, and the DKS/TAT parameter solver.

Notation (DKS/TAT papers, ``docs/CONTRACTS.md``): a transformed activation is
``phi_hat(x) = output_scale * (phi(input_scale * x + input_shift) + output_shift)``
(dks's names; alpha, beta, delta, gamma in DESIGN.md). For unit normals (u, v) with
correlation c:

* ``Q(q) = E[phi_hat(sqrt(q) u)^2]``: the output q value for input q value ``q``;
* ``C(c) = E[phi_hat(u) phi_hat(v)] / Q(1)``: the output correlation for q = 1 inputs;
* ``C'(c) = E[phi_hat'(u) phi_hat'(v)] / Q(1)`` and
  ``C''(c) = E[phi_hat''(u) phi_hat''(v)] / Q(1)``,
  where phi_hat'' includes the delta functions at kinks of the derivative (so C''(1) is
  infinite for relu-like kinks; dks, which differentiates almost everywhere, drops them).

numpy and scipy only: importing this module imports neither torch nor onnx.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import optimize

from graphshape import activations as _acts
from graphshape import gaussian
from graphshape.errors import GraphshapeError

_TRANSFORM_KEYS = ("input_scale", "input_shift", "output_shift", "output_scale")
# Activations that are polynomial between their kinks: no soft features to grade around.
_PIECEWISE_POLYNOMIAL = {"relu", "leaky_relu", "square", "hardtanh", "relu6", "hardsigmoid",
                         "hardswish", "squared_relu"}
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _soft_points(name, alpha, beta, sqrt_q=1.0):
    """(centres, widths) in the standard-normal variable where phi(alpha sqrt_q z + beta)
    changes on a scale below 1 (its nonlinearity sits at phi's input 0, over phi's
    ``soft_width``)."""
    scale = abs(alpha) * sqrt_q / _acts.get(name).soft_width
    if name in _PIECEWISE_POLYNOMIAL or scale <= 1.0:
        return ()
    return ((-beta / (alpha * sqrt_q), 1.0 / scale),)


def _affine_pieces(pieces, alpha, beta, scale, shift, derivative=0):
    """Pieces (lo, hi, c0, c1, c2, k, r) in x of scale * (p^(derivative)(alpha x + beta) +
    shift), for the pieces of p in its own argument (see Activation.pieces)."""
    out = []
    for lo, hi, c0, c1, c2, k, r in pieces:
        for _ in range(derivative):
            c0, c1, c2, k = c1, 2 * c2, 0.0, k * r
        exp_at_beta = k * math.exp(r * beta) if k else 0.0  # k e^{r (alpha x + beta)} at x = 0
        if alpha == 0.0:
            if lo <= beta < hi:
                return ((-math.inf, math.inf, scale * (c0 + c1 * beta + c2 * beta * beta + shift
                                                       + exp_at_beta), 0.0, 0.0, 0.0, 0.0),)
            continue
        a, b = (lo - beta) / alpha, (hi - beta) / alpha
        out.append((min(a, b), max(a, b), scale * (c0 + c1 * beta + c2 * beta * beta + shift),
                    scale * (c1 + 2 * c2 * beta) * alpha, scale * c2 * alpha * alpha,
                    scale * exp_at_beta, r * alpha))
    return tuple(out)


class LocalMaps:
    """The local Q and C maps of ``phi_hat(x) = gamma * (phi(alpha x + beta) + delta)``.

    Build with :func:`local_maps`. Scalar attributes (q = 1 inputs):

    * ``q1``: Q(1) = E[phi_hat(u)^2];
    * ``q_slope_1``: Q'(1) = E[phi_hat(u) phi_hat'(u) u];
    * ``c0``: C(0) = E[phi_hat(u)]^2 / Q(1);
    * ``c_slope_1``: C'(1) = E[phi_hat'(u)^2] / Q(1);
    * ``c_curv_1``: C''(1) = E[phi_hat''(u)^2] / Q(1) (inf if phi has a kink in its
      derivative, e.g. relu, selu, hardtanh; finite for C^1 functions like elu).
    """

    def __init__(self, name: str, attrs: dict, alpha: float, beta: float, delta: float,
                 gamma: float):
        self.name = name
        self.activation = _acts.get(name)
        self.attrs = attrs
        self.alpha, self.beta, self.delta, self.gamma = alpha, beta, delta, gamma
        self._kinks_x = np.asarray(self.activation.kink_points(**attrs), dtype=float)
        self._jumps = np.asarray(self.activation.d1_jumps(**attrs), dtype=float)
        pieces = self.activation.pieces(**attrs)
        # phi_hat, phi_hat', phi_hat'' as pieces in x (activations with pieces only)
        try:
            self._pieces = None if pieces is None else tuple(
                _affine_pieces(pieces, alpha, beta, gamma * alpha ** k, delta if k == 0 else 0.0,
                               k) for k in range(3))
        except OverflowError:  # e^{r beta} of an absurd input shift: integrate numerically
            self._pieces = None
        if name in ("relu", "leaky_relu") and beta == 0.0:
            self._closed = "leaky"
            self._slope = 0.0 if name == "relu" else float(attrs["negative_slope"])
        elif name == "erf" and beta == 0.0:
            self._closed = "erf"
        else:
            self._closed = None
        m = _moments(self.activation, attrs, alpha, beta, need_d2=True)
        q1 = gamma ** 2 * (m.m2 + 2 * delta * m.m1 + delta ** 2)
        if not q1 > 0.0:
            raise GraphshapeError(
                f"activation {name!r} with input_scale={alpha}, input_shift={beta}, "
                f"output_shift={delta}, output_scale={gamma} outputs only zeros for unit "
                "normal inputs (Q(1) = 0): its C map is undefined; check the transform")
        self.q1 = float(q1)
        self.q_slope_1 = float(gamma ** 2 * alpha * (m.yy1z + delta * m.y1z))
        self.c0 = float(gamma ** 2 * (m.m1 + delta) ** 2 / q1)
        self.c_slope_1 = float(gamma ** 2 * alpha ** 2 * m.y1sq / q1)
        if alpha != 0.0 and np.any(self._jumps != 0.0):
            self.c_curv_1 = math.inf
        else:
            self.c_curv_1 = float(gamma ** 2 * alpha ** 4 * m.y2sq / q1)

    def __repr__(self):
        return (f"LocalMaps({self.name!r}, input_scale={self.alpha:.6g}, input_shift="
                f"{self.beta:.6g}, output_shift={self.delta:.6g}, output_scale={self.gamma:.6g}"
                f", q1={self.q1:.6g}, c0={self.c0:.6g}, c_slope_1={self.c_slope_1:.6g})")

    # -- phi_hat and its derivatives ------------------------------------------------------
    def fn(self, x):
        """phi_hat(x)."""
        return self.gamma * (self.activation.fn(self.alpha * x + self.beta, **self.attrs)
                             + self.delta)

    def d1(self, x):
        """phi_hat'(x) (almost everywhere)."""
        return self.gamma * self.alpha * self.activation.d1(self.alpha * x + self.beta,
                                                            **self.attrs)

    def d2(self, x):
        """phi_hat''(x) almost everywhere (without the delta functions at kinks)."""
        return self.gamma * self.alpha ** 2 * self.activation.d2(self.alpha * x + self.beta,
                                                                 **self.attrs)

    def _kinks(self, sqrt_q=1.0):
        """Kinks of x -> phi_hat(sqrt_q x)."""
        if self.alpha == 0.0 or sqrt_q == 0.0:
            return np.empty(0)
        return (self._kinks_x - self.beta) / (self.alpha * sqrt_q)

    # -- maps -----------------------------------------------------------------------------
    def q(self, q_in):
        """Q(q_in) = E[phi_hat(sqrt(q_in) u)^2], for any q_in >= 0 (array or float)."""
        q_arr = np.asarray(q_in, dtype=float)
        if np.any(q_arr < 0) or not np.all(np.isfinite(q_arr)):
            raise GraphshapeError(f"Q map of {self.name!r}: input q values must be finite and "
                                  f">= 0, got {q_in!r}")
        g, d, a = self.gamma, self.delta, self.alpha
        if self._closed == "leaky":
            ns = self._slope
            mean = (1 - ns) * _INV_SQRT_2PI
            amp = abs(a) * np.sqrt(q_arr)
            out = g * g * (amp ** 2 * (1 + ns * ns) / 2 + 2 * d * mean * amp + d * d)
        elif self._closed == "erf":
            k = 2 * a * a * q_arr
            out = g * g * (2 / np.pi * np.arcsin(k / (1 + k)) + d * d)
        else:
            out = self._q_numeric(q_arr.reshape(-1)).reshape(q_arr.shape)
        return float(out) if np.ndim(out) == 0 else out

    def _q_numeric(self, q_in):
        """Q at a 1-D array of q values: one batched rule, cut at each q's kinks."""
        sq = np.sqrt(q_in)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            # q = 0 sends the kinks off the line (+-inf / NaN): phi_hat(0)^2 is then exact.
            kinks = (self._kinks_x[None, :] - self.beta) / (self.alpha * sq)
            soft = None
            width = self.activation.soft_width
            if (self.name not in _PIECEWISE_POLYNOMIAL and self.alpha != 0.0
                    and abs(self.alpha) * np.max(sq) > width):
                soft = (-self.beta / (self.alpha * sq), width / (abs(self.alpha) * sq))
        if self.alpha == 0.0:
            kinks = np.empty((sq.shape[0], 0))
        z, w = gaussian.normal_rule(kinks, soft, (sq.shape[0],))
        return np.einsum("bn,bn->b", w, self.fn(sq * z) ** 2)

    def cov(self, q1, q2, c):
        """E[phi_hat(sqrt(q1) u) phi_hat(sqrt(q2) v)] with corr(u, v) = c (broadcast arrays)."""
        q1, q2, c = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (q1, q2, c)))
        if np.any(np.abs(c) > 1.0) or np.any(q1 < 0) or np.any(q2 < 0):
            raise GraphshapeError(f"C map of {self.name!r}: needs c in [-1, 1] and q >= 0")
        c = np.clip(c, -1.0, 1.0)
        g, d, a = self.gamma, self.delta, self.alpha
        if self._closed == "leaky":
            ns = self._slope
            s = np.sqrt(np.maximum(1 - c * c, 0.0))
            theta = np.arccos(c)
            e_uv = ((1 - ns) ** 2 * (s + (np.pi - theta) * c) / np.pi + 2 * ns * c) / 2
            a1, a2 = abs(a) * np.sqrt(q1), abs(a) * np.sqrt(q2)
            mean = (1 - ns) * _INV_SQRT_2PI
            out = g * g * (a1 * a2 * e_uv + d * mean * (a1 + a2) + d * d)
        elif self._closed == "erf":
            k1, k2 = 2 * a * a * q1, 2 * a * a * q2
            arg = 2 * a * a * c * np.sqrt(q1 * q2) / np.sqrt((1 + k1) * (1 + k2))
            out = g * g * (2 / np.pi * np.arcsin(np.clip(arg, -1, 1)) + d * d)
        else:
            out = self._cov_numeric(q1, q2, c)
        return float(out) if np.ndim(out) == 0 else out

    def _x_kinks_soft(self):
        """phi_hat's kinks and soft points in its own argument x."""
        if self.alpha == 0.0:
            return np.empty(0), []
        kinks = (self._kinks_x - self.beta) / self.alpha
        soft = ([] if self.name in _PIECEWISE_POLYNOMIAL
                else [(-self.beta / self.alpha, self.activation.soft_width / abs(self.alpha))])
        return kinks, soft

    def _cov_numeric(self, q1, q2, c):
        # E is symmetric in (q1, q2) (the same function on both sides): compute each
        # distinct (min q, max q, c) triple once; the analysis passes symmetric matrices.
        lo, hi = np.minimum(q1, q2).reshape(-1), np.maximum(q1, q2).reshape(-1)
        triples, inverse = np.unique(np.stack([lo, hi, c.reshape(-1)], 1), axis=0,
                                     return_inverse=True)
        kinks, soft = self._x_kinks_soft()
        values = gaussian.expect2_same(self.fn, triples[:, 2], np.sqrt(triples[:, 0]),
                                       np.sqrt(triples[:, 1]), kinks, soft,
                                       None if self._pieces is None else self._pieces[0])
        return np.asarray(values)[inverse.reshape(-1)].reshape(c.shape)

    def c(self, c, q1=1.0, q2=1.0):
        """The extended C map: cov(q1, q2, c) / sqrt(Q(q1) Q(q2)), the output correlation
        of two inputs with q values q1, q2 and correlation c."""
        norm = np.sqrt(np.asarray(self.q(q1)) * np.asarray(self.q(q2)))
        if np.any(norm <= 0.0):
            raise GraphshapeError(
                f"C map of {self.name!r}: the output q value is 0 at input q = {q1!r} / {q2!r} "
                "(the activation outputs only zeros there), so its correlation is undefined")
        out = np.asarray(self.cov(q1, q2, c)) / norm
        return float(out) if np.ndim(out) == 0 else out

    def c_slope(self, c):
        """C'(c) = E[phi_hat'(u) phi_hat'(v)] / Q(1), q = 1 inputs (array or float)."""
        c = np.asarray(c, dtype=float)
        g, a = self.gamma, self.alpha
        if self._closed == "leaky":
            ns = self._slope
            theta = np.arccos(np.clip(c, -1, 1))
            out = g * g * a * a * (ns * ns + ns * (1 - ns) + (1 - ns) ** 2 * (np.pi - theta)
                                   / (2 * np.pi))
        elif self._closed == "erf":
            k = 2 * a * a / (1 + 2 * a * a)
            out = g * g * 2 / np.pi * k / np.sqrt(1 - (k * c) ** 2)
        else:
            kinks, soft = self._x_kinks_soft()
            out = gaussian.expect2(self.d1, self.d1, c, kinks, kinks, soft, soft,
                                   pieces_g=None if self._pieces is None else self._pieces[1])
        out = np.asarray(out) / self.q1
        return float(out) if np.ndim(out) == 0 else out

    def c_curv(self, c):
        """C''(c) = E[phi_hat''(u) phi_hat''(v)] / Q(1), q = 1 inputs, including the delta
        functions at kinks of phi_hat' (inf at c = +-1 when there are such kinks)."""
        c = np.asarray(c, dtype=float)
        g, a = self.gamma, self.alpha
        if self._closed == "erf":
            k = 2 * a * a / (1 + 2 * a * a)
            out = g * g * 2 / np.pi * k ** 3 * c / (1 - (k * c) ** 2) ** 1.5
            out = np.asarray(out) / self.q1
            return float(out) if np.ndim(out) == 0 else out
        kinks = self._kinks()
        soft = _soft_points(self.name, a, self.beta)
        if self._closed == "leaky":
            smooth_part = np.zeros(c.shape)
        else:
            smooth_part = np.asarray(gaussian.expect2(
                self.d2, self.d2, c, kinks, kinks, soft, soft,
                pieces_g=None if self._pieces is None else self._pieces[2]))
        out = smooth_part + self._delta_terms(c, kinks, soft)
        out = np.asarray(out) / self.q1
        return float(out) if np.ndim(out) == 0 else out

    def _delta_terms(self, c, kinks, soft):
        """Contributions of the deltas J_k * gamma * |alpha| * delta(x - x_k) in phi_hat''."""
        weights = self.gamma * abs(self.alpha) * self._jumps
        if self.alpha == 0.0 or not np.any(weights):
            return np.zeros(c.shape)
        c = np.asarray(c, dtype=float)
        out = np.zeros(c.shape)
        edge = np.abs(c) >= 1.0
        s = np.sqrt(np.where(edge, 1.0, 1 - c * c))
        pdf = _INV_SQRT_2PI * np.exp(-0.5 * kinks ** 2)
        for xk, wk, pk in zip(kinks, weights, pdf):
            if wk == 0.0:
                continue
            # 2 * J_k pdf(x_k) E[phi_hat''_ac(v) | u = x_k], v | u ~ N(c x_k, 1 - c^2).
            cond = np.array([gaussian.expect(lambda w: self.d2(ci * xk + si * w),
                                             (kinks - ci * xk) / si,
                                             [((p - ci * xk) / si, wd / si) for p, wd in soft])
                             for ci, si in zip(c.reshape(-1), s.reshape(-1))]).reshape(c.shape)
            out = out + 2 * wk * pk * cond
            for xl, wl in zip(kinks, weights):
                # the bivariate normal density at (x_k, x_l)
                dens = (np.exp(-(xk * xk - 2 * c * xk * xl + xl * xl) / (2 * s * s))
                        / (2 * np.pi * s))
                out = out + wk * wl * dens
        return np.where(edge, np.inf, out)


class _Moments(tuple):
    """Gaussian moments of y = phi(alpha z + beta) and its derivatives y1, y2, z ~ N(0, 1):
    (E[y], E[y^2], E[y y1 z], E[y1 z], E[y1^2], E[y2^2] (nan unless asked for))."""

    __slots__ = ()
    m1 = property(lambda self: self[0])
    m2 = property(lambda self: self[1])
    yy1z = property(lambda self: self[2])
    y1z = property(lambda self: self[3])
    y1sq = property(lambda self: self[4])
    y2sq = property(lambda self: self[5])


def _moments(act, attrs, alpha, beta, need_d2):
    """The moments the local maps and the solver need, from one set of quadrature nodes."""
    kinks = act.kink_points(**attrs) if (act.kinks or act.kinks_fn) and alpha != 0.0 else ()
    if kinks:
        kinks = [(k - beta) / alpha for k in kinks]
    z, w = gaussian.normal_rule_1d(kinks, _soft_points(act.name, alpha, beta))
    x = alpha * z + beta
    y = act.fn(x, **attrs)
    y1 = act.d1(x, **attrs)
    y1z = y1 * z
    rows = [y, y * y, y * y1z, y1z, y1 * y1]
    if need_d2:
        y2 = act.d2(x, **attrs)
        rows.append(y2 * y2)
        return _Moments(np.dot(rows, w).tolist())
    return _Moments(np.dot(rows, w).tolist() + [math.nan])


def _transform_values(transform, act_attrs):
    transform = dict(transform or {})
    # solve() returns negative_slope beside the transform for leaky_relu: accept it here.
    for key in list(transform):
        if key not in _TRANSFORM_KEYS:
            act_attrs.setdefault(key, transform.pop(key))
    vals = []
    for key, default in zip(_TRANSFORM_KEYS, (1.0, 0.0, 0.0, 1.0)):
        v = transform.get(key)
        v = default if v is None else float(v)
        if not math.isfinite(v):
            raise GraphshapeError(f"transform parameter {key}={v} is not finite")
        vals.append(v)
    return vals


def local_maps(name: str, transform: Mapping[str, float] | None = None, **act_attrs) -> LocalMaps:
    """Local Q/C maps of ``output_scale * (phi(input_scale * x + input_shift) + output_shift)``.

    ``name``: registry name (:func:`graphshape.activations.names`); ``transform``: dict with
    dks's keys ``input_scale``, ``input_shift``, ``output_shift``, ``output_scale`` (missing
    or None = identity; other keys, like the ``negative_slope`` that :func:`solve` returns for
    leaky_relu, are taken as activation attributes); ``act_attrs``: the activation's
    attributes (``negative_slope``, ``min_val``, ``max_val``, ``alpha``), defaults otherwise.
    Results are cached: calling this again with the same arguments is free.
    """
    act = _acts.get(name)
    act_attrs = dict(act_attrs)
    vals = _transform_values(transform, act_attrs)
    attrs = act.attrs(**{k: float(v) for k, v in act_attrs.items()})
    return _local_maps_cached(name, tuple(vals), tuple(sorted(attrs.items())))


@functools.lru_cache(maxsize=4096)
def _local_maps_cached(name, vals, attrs_items):
    alpha, beta, delta, gamma = vals
    return LocalMaps(name, dict(attrs_items), alpha, beta, delta, gamma)


# ------------------------------------------------------------------------------------------
# Solver
# ------------------------------------------------------------------------------------------

# dks's starting points for the root search: first these, in this order ...
_ALWAYS_TRY = {"input_shift": (0.0, 1.0, -1.0), "input_scale": (1.0, 0.1),
               "output_shift": (0.0, 1.0, -1.0), "negative_slope": (0.0, 0.5)}
# ... then uniform random ones from these ranges (numpy legacy seed 123), 50 in all.
_SAMPLE_RANGE = {"input_shift": (-3.0, 3.0), "input_scale": (0.0, 2.0),
                 "output_shift": (-3.0, 3.0), "negative_slope": (0.0, 1.0)}
_NUM_TRIES = 50
_RANDOM_SEED = 123
# The largest local C'(1) a ReLU reaches with input_shift = +1 (dks's constant): above it,
# dks uses input_shift = -1.
_RELU_MAX_C_SLOPE_1_POSITIVE_SHIFT = 1.466942206924260361


def leaky_relu_c_map(c, negative_slope):
    """The local C map of leaky ReLU (any positive scale, no shift): the arc-cosine kernel
    ``[(1-a)^2 (sqrt(1-c^2) + (pi - arccos c) c) / pi + 2 a c] / (1 + a^2)``."""
    a = negative_slope
    if isinstance(c, (float, int)):  # the solver's scalar hot path: math, not numpy
        c = min(max(float(c), -1.0), 1.0)
        return (((1 - a) ** 2 * (math.sqrt(1 - c * c) + (math.pi - math.acos(c)) * c) / math.pi
                 + 2 * a * c) / (1 + a * a))
    c_arr = np.clip(np.asarray(c, dtype=float), -1.0, 1.0)
    out = ((1 - a) ** 2 * (np.sqrt(1 - c_arr ** 2) + (np.pi - np.arccos(c_arr)) * c_arr) / np.pi
           + 2 * a * c_arr) / (1 + a * a)
    return float(out) if np.ndim(out) == 0 else out


def chain_subnet_max_func(depth: int) -> Callable:
    """dks's ``subnet_max_func`` of a plain chain of ``depth`` nonlinear layers (no skips):
    ``M(x, r) = r(r(...r(x)))``, r applied ``depth`` times (depth 0: the identity)."""
    if int(depth) != depth or depth < 0:
        raise GraphshapeError(f"depth must be a non-negative integer, got {depth!r}")

    def subnet_max_func(x, r):
        for _ in range(int(depth)):
            x = r(x)
        return x

    return subnet_max_func


def _call_m(subnet_max_func, x, r, what):
    try:
        value = float(subnet_max_func(x, r))
    except GraphshapeError:
        raise
    except Exception as exc:
        raise GraphshapeError(f"subnet_max_func failed while computing {what}: "
                              f"{type(exc).__name__}: {exc}") from exc
    if math.isnan(value):
        raise GraphshapeError(f"subnet_max_func returned NaN while computing {what}")
    return value


def _solve_increasing(fn, target, lo, start, hi=math.inf, unreachable=None):
    """x in [lo, hi] with fn(x) = target, fn increasing; brackets by doubling from ``start``
    when hi is infinite. ``unreachable(sup)`` builds the error message."""
    f_lo = fn(lo)
    if f_lo >= target:
        if f_lo == target:
            return lo
        raise GraphshapeError(unreachable(f_lo, below=True))
    if math.isinf(hi):
        b = start
        for _ in range(200):
            fb = fn(b)
            if fb >= target:
                break
            lo, b = b, b * 2.0
        else:
            raise GraphshapeError(unreachable(fb, below=False))
        hi = b
    else:
        fb = fn(hi)
        if fb < target:
            raise GraphshapeError(unreachable(fb, below=False))
        if fb == target:
            return hi
    return optimize.brentq(lambda x: fn(x) - target, lo, hi, xtol=1e-15, rtol=1e-15,
                           maxiter=500)


def _starting_points(opt_params):
    fixed = list(itertools.product(*(_ALWAYS_TRY[p] for p in opt_params)))
    yield from fixed
    rng = np.random.RandomState(_RANDOM_SEED)
    for _ in range(_NUM_TRIES - len(fixed)):
        yield tuple(rng.uniform(*_SAMPLE_RANGE[p]) for p in opt_params)


def _symmetric_start(act, start, c0_target):
    """True at a starting point where the residual of a point-symmetric activation is even
    in the shifts (input_shift = 0 and, when solved for, output_shift = -m for
    phi(-x) = 2 m - phi(x)). The finite-difference Jacobian there is singular, so the root
    finder's first step is set by rounding noise: dks's 100,000-point sums make it land
    nowhere, and dks moves on to its next starting point. Skipping it picks dks's root
    deterministically."""
    m = act.point_symmetry
    if m is None or start.get("input_shift", 0.0) != 0.0 or "input_scale" not in start:
        return False
    return c0_target is not None or start.get("output_shift") == -m


def _solve_activation(name, attrs, *, q_slope_target, c0_target, c_slope_1_target,
                      c_curv_target, reject_large_gain):
    """dks's per-activation root search: the same unknowns, residuals, starting points and
    root finder (MINPACK hybrd), with exact quadrature instead of 100,000 grid points."""
    act = _acts.get(name)
    constant = {}
    if name == "relu":
        constant["input_shift"] = (1.0 if c_slope_1_target < _RELU_MAX_C_SLOPE_1_POSITIVE_SHIFT
                                   else -1.0)
        opt_params = ("input_scale",)
        q_slope_target = None  # one degree of freedom fewer: dks drops the Q slope condition
    elif name == "leaky_relu":
        opt_params = ("negative_slope", "input_shift")
    elif c0_target is not None:
        opt_params = ("input_scale", "input_shift")
    else:
        opt_params = ("input_scale", "input_shift", "output_shift")

    def evaluate(p):
        params = dict(constant)
        params.update(zip(opt_params, (float(v) for v in p)))
        local_attrs = dict(attrs)
        if "negative_slope" in params:
            local_attrs["negative_slope"] = params["negative_slope"]
        alpha = params.get("input_scale", 1.0)
        beta = params.get("input_shift", 0.0)
        m = _moments(act, local_attrs, alpha, beta, need_d2=c_curv_target is not None)
        if c0_target is not None:
            delta = math.sqrt(c0_target) - m.m1
        else:
            delta = params["output_shift"]
        second = m.m2 + 2 * delta * m.m1 + delta * delta
        gamma = 1.0 / math.sqrt(second) if second > 0 else math.nan
        g2 = gamma * gamma
        residual = []
        if q_slope_target is not None:
            residual.append(g2 * alpha * (m.yy1z + delta * m.y1z) - q_slope_target)
        residual.append(g2 * alpha * alpha * m.y1sq - c_slope_1_target)
        if c_curv_target is not None:
            residual.append(g2 * alpha ** 4 * m.y2sq - c_curv_target)
        params["output_shift"] = delta
        params["output_scale"] = gamma
        return residual, params

    rejected = []
    for start in _starting_points(opt_params):
        if _symmetric_start(act, dict(zip(opt_params, start)), c0_target):
            continue
        with np.errstate(all="ignore"):
            sol = optimize.root(lambda p: evaluate(p)[0], np.asarray(start, dtype=float),
                                method="hybr")
        if not sol.success:
            continue
        residual, params = evaluate(sol.x)
        if not all(math.isfinite(v) for v in params.values()):
            continue
        # hybrd can report success where the conditions are not met (e.g. a saturated
        # hardtanh, whose output variance is lost to rounding): dks would return that; we
        # move on to the next starting point.
        if max(abs(r) for r in residual) > 1e-6:
            continue
        if reject_large_gain and params["input_scale"] * params["output_scale"] >= 2.0:
            rejected.append(params)
            continue
        return {k: float(v) for k, v in params.items()}
    targets = {"Q'(1)": q_slope_target, "C(0)": c0_target, "C'(1)": c_slope_1_target,
               "C''(1)": c_curv_target}
    wanted = ", ".join(f"{k} = {v:.6g}" for k, v in targets.items() if v is not None)
    extra = (f" ({len(rejected)} roots had input_scale * output_scale >= 2, which TAT rejects"
             " because their Q maps are unstable)" if rejected else "")
    if name in _QUADRATIC_GROWTH and q_slope_target is not None:
        extra += (f"; {name} grows like x^2, and no input scale and shift brings the slope "
                  "of its Q map at q = 1 down to Q'(1) = 1 (dks 0.1.2 finds no parameters "
                  "for 'square' under either method either)")
    raise GraphshapeError(
        f"no parameters found for activation {name!r} with local {wanted}, Q(1) = 1, from "
        f"{_NUM_TRIES} starting points{extra}. This activation cannot be shaped to these "
        "targets: try another activation (e.g. tanh, softplus, leaky_relu; shape(..., "
        "activation=...) substitutes it) or other targets.")


#: activations growing like x^2 (their Q maps' slope at 1 stays above 1)
_QUADRATIC_GROWTH = ("square", "squared_relu")


def _normalize_activations(activations):
    if isinstance(activations, str):
        activations = [activations]
    if isinstance(activations, Mapping):
        items = [(n, dict(a or {})) for n, a in activations.items()]
    elif isinstance(activations, Sequence):
        items = [(n, {}) for n in activations]
    else:
        raise GraphshapeError("activations must be a list of activation names (or a dict "
                              "name -> attributes)")
    out = {}
    for name, attrs in items:
        act = _acts.get(name)
        out[name] = act.attrs(**attrs)
    if not out:
        raise GraphshapeError("solve() needs at least one activation name")
    return out


def tat_unsupported(name: str, attrs: dict | None = None) -> str | None:
    """Why TAT's smooth-activation solve cannot take activation ``name`` (relu, or an
    activation with a kink in its derivative, where C''(1) is infinite), or None if it can.
    leaky_relu has its own TAT solve (TReLU) and is never refused here."""
    if name == "leaky_relu":
        return None
    if name == "relu":
        return ("TAT does not support relu (its C map has infinite curvature at c = 1): "
                "use leaky_relu instead")
    act = _acts.get(name)
    if not act.is_differentiable(**(attrs or {})):
        return (f"TAT needs a continuously differentiable activation or leaky_relu; {name!r} "
                f"has a kink in its derivative at {act.kink_points(**(attrs or {}))}, where "
                "C''(1) is infinite: use a smooth activation (e.g. tanh, softplus, gelu, silu) "
                "or leaky_relu")
    return None


def solve(activations, method: str, subnet_max_func: Callable, *, zeta: float = 1.5,
          q_slope: float = 1.0, eta: float = 0.9, tau: float = 0.3) -> dict[str, dict[str, float]]:
    """Transformation parameters for each activation under DKS or TAT (dks 0.1.2's solver).

    activations:      activation names (or a dict name -> attributes, e.g. hardtanh bounds).
    method:           "DKS", "TAT" or "untransformed" (any case).
    subnet_max_func:  ``M(x, r)``, dks's "subnetwork maximizing function": the maximum over
                      the network's subnetworks of their composed C map at input ``x``, when
                      every nonlinear layer applies the scalar function ``r`` (for a chain of
                      L nonlinear layers, ``r`` applied L times to ``x``).
    zeta:             DKS: target maximal C'_f(1) over subnetworks f (dks c_slope_1_target).
    q_slope:          DKS: target local Q'(1) (dks local_q_slope_target).
    eta:              TAT with leaky_relu: target maximal C_f(0) (dks c_val_0_target).
    tau:              TAT with smooth activations: target maximal C''_f(1) (dks c_curve_target).

    Returns ``{name: params}`` with dks's keys. The transformed activation is
    ``output_scale * (phi(input_scale * x + input_shift) + output_shift)``:

    * DKS: ``input_scale``, ``input_shift``, ``output_shift``, ``output_scale`` such that
      Q(1) = 1, Q'(1) = q_slope, C(0) = 0 and C'(1) = s* with M(1, y -> s* y) = zeta; relu:
      ``input_shift`` fixed to +-1 and no Q'(1) condition; leaky_relu: ``negative_slope`` and
      ``input_shift`` solved, no ``input_scale`` (= 1).
    * TAT, smooth (C^1) activations: all four, with Q(1) = 1, Q'(1) = 1, C'(1) = 1 and
      C''(1) = t* where M(0, y -> y + t*) = tau; roots with input_scale * output_scale >= 2
      are rejected (as dks does).
    * TAT, leaky_relu (alone): ``negative_slope`` a with M(0, C_a) = eta and
      ``output_scale`` = sqrt(2 / (1 + a^2)).
    * untransformed: ``{}`` per name.

    Every failure (bad targets, relu under TAT, a target the network cannot reach, no root)
    is a GraphshapeError.
    """
    method_key = str(method).strip().upper()
    if method_key not in ("DKS", "TAT", "UNTRANSFORMED"):
        raise GraphshapeError(f"unknown method {method!r}: use 'DKS', 'TAT' or 'untransformed'")
    acts = _normalize_activations(activations)
    if method_key == "UNTRANSFORMED":
        return {name: {} for name in acts}
    if not callable(subnet_max_func):
        raise GraphshapeError("subnet_max_func must be a callable M(x, r); for a chain of L "
                              "nonlinear layers it applies r L times to x")

    if method_key == "DKS":
        if not (zeta > 1.0 and math.isfinite(zeta)):
            raise GraphshapeError(f"DKS needs zeta > 1 (the maximal C'_f(1)), got zeta={zeta}")
        if not (q_slope > 0.0 and math.isfinite(q_slope)):
            raise GraphshapeError(f"DKS needs q_slope > 0 (the local Q'(1)), got {q_slope}")

        def unreachable(value, below):
            return (f"DKS target zeta={zeta} is out of reach: this network's maximal slope "
                    f"function M(1, y -> s y) only reaches {value:.6g} (does it have any "
                    "nonlinear layer?): lower zeta")

        s_star = _solve_increasing(
            lambda s: _call_m(subnet_max_func, 1.0, lambda y: s * y, "the maximal slope"),
            zeta, 1.0, 1.1, unreachable=unreachable)
        return {name: _solve_activation(name, attrs, q_slope_target=q_slope, c0_target=0.0,
                                        c_slope_1_target=s_star, c_curv_target=None,
                                        reject_large_gain=False)
                for name, attrs in acts.items()}

    # TAT
    if "leaky_relu" in acts:
        if len(acts) > 1:
            raise GraphshapeError("TAT with leaky_relu needs leaky_relu to be the only "
                                  f"activation; got {sorted(acts)}")
        if not (0.0 <= eta <= 1.0):
            raise GraphshapeError(f"TAT needs eta (the maximal C_f(0)) in [0, 1], got {eta}")

        def max_c0(a):
            return _call_m(subnet_max_func, 0.0, lambda c: leaky_relu_c_map(c, a),
                           "the maximal C_f(0)")

        def unreachable(value, below):
            # (a shallow network, or one of short paths, keeps C_f(0) below eta for any
            # slope: an eta below its C_f(0) gives the most linear leaky ReLU reaching it)
            reachable = math.floor((1 - value) * 100) / 100
            return (f"even with negative_slope=0 this network's C_f(0) is only {1 - value:.4g}"
                    f" < eta={eta}: lower eta (eta={reachable:.2f} or less reaches it), or the "
                    "shortcut weight, in a network with shortcuts, or shape it with "
                    "method='DKS'")

        # 1 - M(0, C_a) increases with a from 1 - M(0, C_0) (most nonlinear) to 1 (a = 1).
        a = _solve_increasing(lambda a: 1.0 - max_c0(a), 1.0 - eta, 0.0, 0.5, 1.0,
                              unreachable=unreachable)
        return {"leaky_relu": {"output_scale": math.sqrt(2.0 / (1.0 + a * a)),
                               "negative_slope": float(a)}}

    for name, attrs in acts.items():
        reason = tat_unsupported(name, attrs)
        if reason:
            raise GraphshapeError(reason)
    if not (tau > 0.0 and math.isfinite(tau)):
        raise GraphshapeError(f"TAT needs tau > 0 (the maximal C''_f(1)), got tau={tau}")

    def unreachable(value, below):
        return (f"TAT target tau={tau} is out of reach: this network's maximal curvature "
                f"function M(0, y -> y + t) only reaches {value:.6g}: lower tau")

    t_star = _solve_increasing(
        lambda t: _call_m(subnet_max_func, 0.0, lambda y: y + t, "the maximal curvature"),
        tau, 0.0, 0.1, unreachable=unreachable)
    return {name: _solve_activation(name, attrs, q_slope_target=1.0, c0_target=None,
                                    c_slope_1_target=1.0, c_curv_target=t_star,
                                    reject_large_gain=True)
            for name, attrs in acts.items()}
