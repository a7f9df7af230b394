"""Gaussian expectations of piecewise-smooth functions, by split composite Gauss–Legendre.

``E[f(z)]`` for z ~ N(0, 1) and ``E[f(u) g(v)]`` for unit normals (u, v) with correlation c.

The real line is truncated to ``[-LIMIT, LIMIT]`` (the normal density there is 2e-22,
below anything a polynomially growing f can make visible), cut into ``PANELS`` equal
panels, and the panels are further cut at the integrand's kinks, so every panel holds a
smooth piece, and graded geometrically (ratio 3) around "soft" points where a smooth
integrand varies on a scale below a panel (tanh(8 z) at 0): a fixed ``ORDER``-point
Gauss–Legendre rule per panel is then accurate to about 1e-13 for the activations of
:mod:`graphshape.activations`, and exact across kinks (no kink falls inside a panel). The
rules are computed once (``scipy.special.roots_legendre``).

For the 2-D expectation, v = c u + sqrt(1 - c^2) w with w independent of u: the inner
integral over w is cut at g's kinks for every u (or done in closed form when g is piecewise
a quadratic plus an exponential, :func:`expect_pieces`); the outer one over u is cut at f's kinks and graded
around the points where g's kink crosses w = 0 (the inner integral is a kink smoothed over
a width sqrt(1 - c^2) / |c| there), so it stays accurate as |c| -> 1. |c| = 1 is computed
as the 1-D expectation it is.

numpy and scipy only.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import log_ndtr, ndtr, roots_legendre

LIMIT = 10.0
PANELS = 10
ORDER = 20

_NODES, _WEIGHTS = roots_legendre(ORDER)
_INV_SQRT_2PI = 1.0 / np.sqrt(2.0 * np.pi)
# Offsets, in units of a feature's width, of the breakpoints graded around it (ratio 3).
_GRADING = np.array([-27.0, -9.0, -3.0, -1.0, 0.0, 1.0, 3.0, 9.0, 27.0])
# Around a kink smoothed by a Gaussian of width w, the integrand differs from the kink's
# smooth pieces by < e^{-40} beyond 9 w: a shorter grading suffices.
_GRADING_SMOOTHED = np.array([-9.0, -3.0, -1.0, 0.0, 1.0, 3.0, 9.0])
_UNIFORM = np.linspace(-LIMIT, LIMIT, PANELS + 1)
_PANEL_WIDTH = 2 * LIMIT / PANELS


def _graded(centres, widths, grading=_GRADING):
    """Breakpoints graded geometrically (ratio 3) around each centre, shape (..., S * G)."""
    # Farther from the centre than a base panel's width, grading adds nothing: keep the
    # levels some batch member still needs.
    with np.errstate(invalid="ignore"):
        smallest = np.nanmin(widths) if np.size(widths) else np.inf
        grading = grading[np.abs(grading) * smallest < _PANEL_WIDTH]
        pts = centres[..., None] + widths[..., None] * grading  # inf * 0 -> NaN: dropped
    return pts.reshape(pts.shape[:-2] + (-1,))


def breakpoints(kinks=None, soft=None, batch_shape=(), smoothed=None) -> np.ndarray:
    """Sorted panel edges, shape ``batch_shape + (PANELS + 1 + ...,)``.

    ``kinks`` (shape ``batch_shape + (K,)``, or K floats shared by the batch) are points
    where the integrand is not smooth: they become panel edges. ``soft`` is a pair
    ``(centres, widths)`` (each shaped like ``kinks``) of places where the integrand is
    smooth but varies on a scale ``width`` (e.g. tanh(8 z) at 0, width 1/8): panel edges
    are graded geometrically around them; ``smoothed`` likewise, for kinks smoothed by a
    Gaussian of that width (a shorter grading). Points off the truncated line (or NaN/inf,
    e.g. from a zero input scale) are dropped where the whole batch has them, else they only
    add empty panels at its ends.
    """
    parts = []
    for arr in ([] if kinks is None else kinks,
                *(() if soft is None or np.size(soft[0]) == 0 else
                  (_graded(np.asarray(soft[0], float), np.asarray(soft[1], float)),)),
                *(() if smoothed is None or np.size(smoothed[0]) == 0 else
                  (_graded(np.asarray(smoothed[0], float), np.asarray(smoothed[1], float),
                           _GRADING_SMOOTHED),))):
        arr = np.asarray(arr, dtype=float)
        if arr.ndim == 1 and batch_shape:
            arr = np.broadcast_to(arr, tuple(batch_shape) + arr.shape)
        parts.append(arr)
    batch_shape = max((p.shape[:-1] for p in parts), key=len, default=tuple(batch_shape))
    parts = [np.broadcast_to(p, batch_shape + p.shape[-1:]) for p in parts]
    uniform = np.broadcast_to(_UNIFORM, batch_shape + _UNIFORM.shape)
    extra = np.concatenate(parts, axis=-1) if parts else np.empty(batch_shape + (0,))
    if extra.shape[-1]:
        inside = np.abs(extra) < LIMIT  # False for NaN too
        keep = inside.reshape(-1, extra.shape[-1]).any(axis=0)
        extra = extra[..., keep]
        extra = np.where(inside[..., keep], extra, LIMIT)
    if not extra.shape[-1]:
        return uniform
    return np.sort(np.concatenate([uniform, extra], axis=-1), axis=-1)


def rule(edges: np.ndarray):
    """Nodes and weights of the composite rule for E over N(0, 1) on panels ``edges``.

    ``edges``: shape ``(..., P + 1)`` sorted. Returns ``(z, w)`` of shape ``(..., P * ORDER)``
    with ``E[f(z)] ~= sum(w * f(z), -1)`` (the normal density is folded into ``w``).
    """
    lo = edges[..., :-1, None]
    half = 0.5 * (edges[..., 1:, None] - lo)
    z = lo + half * (_NODES + 1.0)
    w = half * _WEIGHTS * (_INV_SQRT_2PI * np.exp(-0.5 * z * z))
    shape = z.shape[:-2] + (-1,)
    return z.reshape(shape), w.reshape(shape)


def normal_rule(kinks=None, soft=None, batch_shape=(), smoothed=None):
    """``(z, w)``: the rule for E[f(z)], z ~ N(0, 1), f smooth between ``kinks`` (see
    :func:`breakpoints` for ``soft`` and ``smoothed``)."""
    return rule(breakpoints(kinks, soft, batch_shape, smoothed))


def normal_rule_1d(kinks=(), soft=()):
    """Fast path of :func:`normal_rule` for one integrand (the solver's hot loop): ``kinks``
    a sequence of floats, ``soft`` a sequence of (centre, width) float pairs. Returns
    ``(z, w)``, 1-D."""
    if not kinks and not soft:
        return _BASE
    parts = [_UNIFORM_INNER]
    if kinks:
        parts.append(np.asarray(kinks, dtype=float))
    for centre, width in soft:
        parts.append(centre + width * _GRADING)
    edges = np.concatenate(parts)
    # Points off the line add nothing: drop them (NaN compares False and is dropped too).
    edges = edges[np.abs(edges) < LIMIT]
    edges = np.concatenate((_ENDS, edges))
    edges.sort()
    lo = edges[:-1, None]
    half = 0.5 * (edges[1:, None] - lo)
    z = (lo + half * _NODES_PLUS_1).ravel()
    w = (half * _WEIGHTS).ravel() * (_INV_SQRT_2PI * np.exp(-0.5 * z * z))
    return z, w


def _soft_arrays(soft):
    soft = list(soft or ())
    if not soft:
        return None
    centres, widths = zip(*soft)
    return np.asarray(centres, float), np.asarray(widths, float)


def expect(f, kinks=(), soft=()) -> float:
    """E[f(z)] for z ~ N(0, 1).

    ``f`` is vectorized and smooth between ``kinks``; ``soft`` lists ``(centre, width)``
    pairs where f changes on a scale ``width`` smaller than 1 (see :func:`breakpoints`).
    """
    z, w = normal_rule(kinks, _soft_arrays(soft))
    return float(w @ f(z))


def expect_pieces(pieces, mean, std):
    """E[g(mean + std w)], w ~ N(0, 1), in closed form for g piecewise a polynomial of degree
    <= 2 plus an exponential.

    ``pieces``: rows ``(lo, hi, c0, c1, c2)`` or ``(lo, hi, c0, c1, c2, k, r)``, g(x) = c0 +
    c1 x + c2 x^2 + k e^{r x} on [lo, hi) (lo, hi may be infinite; k = 0 without the last
    two); ``mean``, ``std`` (> 0) broadcast together.
    """
    mean, std = np.broadcast_arrays(np.asarray(mean, float), np.asarray(std, float))
    total = np.zeros(mean.shape)
    for row in pieces:
        lo, hi, c0, c1, c2, k, r = (tuple(row) + (0.0, 0.0))[:7]
        t1, t2 = (lo - mean) / std, (hi - mean) / std
        if c0 != 0.0 or c1 != 0.0 or c2 != 0.0:
            # P(t1 < w < t2) from the tail that keeps its digits: Phi(-t1) - Phi(-t2) when
            # t1 > 0, else Phi(t2) - Phi(t1) (the arguments picked first: two ndtr calls)
            upper_tail = t1 > 0
            m0 = (ndtr(np.where(upper_tail, -t1, t2))
                  - ndtr(np.where(upper_tail, -t2, t1)))
            p1 = np.exp(-0.5 * t1 * t1) * _INV_SQRT_2PI
            p2 = np.exp(-0.5 * t2 * t2) * _INV_SQRT_2PI
            m1 = p1 - p2                                               # int w pdf(w)
            with np.errstate(invalid="ignore"):  # inf * 0 at infinite ends: the limit is 0
                tp1 = np.where(np.isfinite(t1), t1 * p1, 0.0)
                tp2 = np.where(np.isfinite(t2), t2 * p2, 0.0)
            m2 = m0 + tp1 - tp2                                        # int w^2 pdf(w)
            # c0 + c1 x + c2 x^2 with x = mean + std w, as a polynomial in w
            b0 = c0 + c1 * mean + c2 * mean * mean
            b1 = (c1 + 2 * c2 * mean) * std
            b2 = c2 * std * std
            total = total + b0 * m0 + b1 * m1 + b2 * m2
        if k != 0.0:
            # int_{t1}^{t2} k e^{r (mean + std w)} pdf(w) dw
            #   = k e^{r mean + (r std)^2 / 2} (Phi(t2 - r std) - Phi(t1 - r std)),
            # in logs: e^{r mean} alone overflows where the Phi difference underflows
            shift = r * mean + 0.5 * (r * std) ** 2
            a, b = t1 - r * std, t2 - r * std
            upper_tail = a > 0
            with np.errstate(over="ignore"):
                upper = np.exp(shift + log_ndtr(np.where(upper_tail, -a, b)))
                lower = np.exp(shift + log_ndtr(np.where(upper_tail, -b, a)))
            total = total + k * (upper - lower)
    return total


def expect2(f, g, c, kinks_f=(), kinks_g=(), soft_f=(), soft_g=(), scale_f=1.0, scale_g=1.0,
            pieces_g=None):
    """E[f(scale_f u) g(scale_g v)] for unit normals (u, v) with correlation ``c``.

    ``f``, ``g`` are vectorized and smooth between their ``kinks`` (in their own argument);
    ``soft_f``/``soft_g`` list ``(centre, width)`` pairs as in :func:`expect` (also in
    their own argument). ``c``, ``scale_f`` and ``scale_g`` (>= 0) broadcast together; the
    result has their broadcast shape (a float if that is scalar). If g is piecewise a
    polynomial plus an exponential, ``pieces_g`` (see :func:`expect_pieces`) makes the inner
    integral exact and about 100 times cheaper.
    """
    c_arr, sf_arr, sg_arr = np.broadcast_arrays(*(np.asarray(v, dtype=float)
                                                  for v in (c, scale_f, scale_g)))
    if np.any(np.abs(c_arr) > 1.0):
        raise ValueError("correlations must lie in [-1, 1]")
    flat, sf, sg = c_arr.reshape(-1), sf_arr.reshape(-1), sg_arr.reshape(-1)
    out = np.empty_like(flat)
    kinks_f = np.asarray(kinks_f, dtype=float).reshape(-1)
    kinks_g = np.asarray(kinks_g, dtype=float).reshape(-1)
    soft_f = np.asarray(list(soft_f or ()), dtype=float).reshape(-1, 2)
    soft_g = np.asarray(list(soft_g or ()), dtype=float).reshape(-1, 2)

    with np.errstate(divide="ignore", invalid="ignore"):
        for sign in (1.0, -1.0):
            idx = np.flatnonzero(flat == sign)
            if idx.size:
                # v = +-u: a 1-D expectation, cut at the kinks of both factors.
                a, b = sf[idx, None], sg[idx, None]
                kinks = np.concatenate([kinks_f / a, sign * kinks_g / b], axis=1)
                soft = _scaled_soft([(soft_f, a, 1.0), (soft_g, b, sign)])
                z, w = normal_rule(kinks, soft, (idx.size,))
                out[idx] = np.einsum("bn,bn->b", w, f(a * z) * g(sign * b * z))
    inner = np.flatnonzero(np.abs(flat) < 1.0)
    # Chunks over c keep the (c, u, w) node arrays to a few MB.
    chunk = 8 if pieces_g is None else 512
    for start in range(0, inner.size, chunk):
        idx = inner[start:start + chunk]
        out[idx] = _expect2_interior(f, g, flat[idx], sf[idx], sg[idx], kinks_f, kinks_g,
                                     soft_f, soft_g, pieces_g)
    if c_arr.ndim == 0:
        return float(out[0])
    return out.reshape(c_arr.shape)


#: Terms of the Mehler series in :func:`expect2_same` (orders 0..HERMITE_ORDER).
HERMITE_ORDER = 256
#: :func:`expect2_same` uses the series for a pair only where its truncation error is
#: provably below this fraction of sqrt(E[f(s1 u)^2] E[f(s2 v)^2]).
SERIES_TOL = 1e-10
# The orthonormal Hermite functions h_n(z) e^{-z^2/4} spread to |z| ~ 2 sqrt(n) (far beyond
# LIMIT for n = 256): the coefficient rule runs to a farther limit, where e^{-z^2/4} < 1e-15,
# on panels cut REFINE times finer so every panel holds about one wavelength of h_n.
_HERMITE_LIMIT = 12.0
_REFINE = 3


def hermite_coefficients(f, scales, kinks=(), soft=(), order=HERMITE_ORDER, enough=None):
    """Hermite coefficients of ``z -> f(s z)`` for each scale s in ``scales`` (1-D, >= 0).

    Returns ``(a, energy, tail)``: ``a[i, n] = E[f(s_i z) h_n(z)]`` for n = 0..order, h_n =
    He_n / sqrt(n!) the orthonormal probabilists' Hermite polynomials; ``energy[i] =
    E[f(s_i z)^2]``; ``tail[i] = energy[i] - sum_n a[i, n]^2``, the energy beyond ``order``
    (>= 0 up to rounding; clearly negative means the rule did not resolve f). ``kinks`` and
    ``soft`` are f's, in its own argument (as for :func:`expect2`). Like the module's other
    rules this assumes f grows at most polynomially (h_n e^{-z^2/4} is bounded, so what lies
    beyond |z| = 12 is below e^{-36} times f there). With ``enough``, the expansion stops
    (at a multiple of 16 orders) once every tail is below ``enough * energy``: ``a`` then
    has fewer columns.
    """
    scales = np.asarray(scales, dtype=float).reshape(-1)
    kinks = np.asarray(kinks, dtype=float).reshape(-1)
    soft = np.asarray(list(soft or ()), dtype=float).reshape(-1, 2)
    a_col = scales[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        edges = breakpoints(kinks[None, :] / a_col, _scaled_soft([(soft, a_col, 1.0)]),
                            (scales.size,))
    lo, hi = edges[..., :-1, None], edges[..., 1:, None]
    fine = (lo + (hi - lo) * (np.arange(_REFINE) / _REFINE)).reshape(scales.size, -1)
    outer = np.linspace(LIMIT, _HERMITE_LIMIT, _REFINE + 1)
    fine = np.concatenate([np.broadcast_to(-outer[::-1], (scales.size, outer.size)), fine[:, 1:],
                           np.broadcast_to(outer, (scales.size, outer.size))], axis=1)
    z, w = rule(fine)
    fz = f(a_col * z)
    fw = fz * w
    energy = np.einsum("sp,sp->s", fw, fz)
    a = np.empty((scales.size, order + 1))
    h_prev, h = np.ones_like(z), z
    a[:, 0] = fw.sum(-1)
    a[:, 1] = np.einsum("sp,sp->s", fw, z)
    last = order
    for n in range(1, order):
        if enough is not None and n % 16 == 0:
            # smooth f converge within a few dozen orders: stop once every tail is small
            tail = energy - np.einsum("sn,sn->s", a[:, :n + 1], a[:, :n + 1])
            if np.all(tail <= enough * energy):
                last = n
                break
        # h_{n+1} = (z h_n - sqrt(n) h_{n-1}) / sqrt(n + 1): stable, |h_n| <= ~e^{z^2/4}
        h_prev, h = h, (z * h - math.sqrt(n) * h_prev) / math.sqrt(n + 1)
        a[:, n + 1] = np.einsum("sp,sp->s", fw, h)
    a = a[:, :last + 1]
    return a, energy, energy - np.einsum("sn,sn->s", a, a)


def expect2_same(f, c, scale_1, scale_2, kinks=(), soft=(), pieces=None):
    """E[f(scale_1 u) f(scale_2 v)] for unit normals (u, v) with correlation ``c``: the same
    as ``expect2(f, f, c, kinks, kinks, soft, soft, scale_1, scale_2, pieces_g=pieces)``
    (1-D arrays of one length), and far cheaper for many pairs with few distinct scales.

    By Mehler's formula the expectation is ``sum_n a_n(s1) a_n(s2) c^n`` over the Hermite
    coefficients of :func:`hermite_coefficients`, one 1-D integral per scale instead of a 2-D
    one per pair. Cut after order N (at most ``HERMITE_ORDER``; fewer once every tail is
    below 1e-13 of its energy), it errs by at most ``|c|^(N+1) * sqrt(tail_1 tail_2)``
    (Cauchy-Schwarz on the tails): pairs where that bound exceeds
    ``SERIES_TOL * sqrt(energy_1 energy_2)`` (kinked f with |c| near 1; f that bends
    sharply) are computed by :func:`expect2`.
    """
    c, s1, s2 = (np.asarray(v, dtype=float).reshape(-1) for v in (c, scale_1, scale_2))
    scales, inverse = np.unique(np.concatenate([s1, s2]), return_inverse=True)
    if pieces is not None and c.size < 4 * scales.size:
        # expect2's inner integral is closed-form for such pieces: cheaper than
        # the coefficients unless the pairs far outnumber the scales
        return expect2(f, f, c, kinks, kinks, soft, soft, s1, s2, pieces_g=pieces)
    i1, i2 = inverse[:c.size], inverse[c.size:]
    # tails below 1e-13 of the energy (rounding leaves ~1e-15) bound the truncation by 1e-13
    # at any c: no need to go further
    a, energy, tail = hermite_coefficients(f, scales, kinks, soft, enough=1e-13)
    # rounding leaves |tail| ~ 1e-15 energy; a clearly negative one means aliasing
    resolved = tail >= -1e-13 * np.maximum(energy, 1e-300)
    tail = np.maximum(tail, 0.0)
    bound = np.abs(c) ** (a.shape[1]) * np.sqrt(tail[i1] * tail[i2])
    good = (resolved[i1] & resolved[i2]
            & (bound <= SERIES_TOL * np.sqrt(energy[i1] * energy[i2])))
    out = np.empty(c.shape)
    if np.any(good):
        # Horner in c over the orders, gathering each order's coefficients per pair
        a_by_order = np.ascontiguousarray(a.T)
        c_good, j1, j2 = c[good], i1[good], i2[good]
        total = np.zeros(c_good.shape)
        for coeffs in a_by_order[::-1]:
            total = total * c_good + coeffs[j1] * coeffs[j2]
        out[good] = total
    rest = ~good
    if np.any(rest):
        out[rest] = expect2(f, f, c[rest], kinks, kinks, soft, soft, s1[rest], s2[rest],
                            pieces_g=pieces)
    return out


def _scaled_soft(parts):
    """Soft points of f(scale * sign * z) in z, kept only where sharper than a panel:
    ``parts`` is a list of (soft (S, 2) array, scale (B, 1), sign)."""
    centres, widths = [], []
    for soft, scale, sign in parts:
        if soft.size:
            wd = soft[None, :, 1] / scale
            if np.nanmin(wd) < 1.0:
                centres.append(sign * soft[None, :, 0] / scale)
                widths.append(wd)
    if not centres:
        return None
    return np.concatenate(centres, axis=1), np.concatenate(widths, axis=1)


def _expect2_interior(f, g, c, sf, sg, kinks_f, kinks_g, soft_f, soft_g, pieces_g=None):
    s = np.sqrt(1.0 - c * c)
    n_c = c.shape[0]
    a, b = sf[:, None], sg[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        kf, kg = kinks_f[None, :] / a, kinks_g[None, :] / b            # in u / v
        pg, wg = soft_g[None, :, 0] / b, soft_g[None, :, 1] / b
        # Outer variable u: f's kinks and soft points; and where g's kinks / soft points sit
        # at w = 0 (u* = p / c), the inner integral is g's feature smoothed over a width
        # sqrt(s^2 + width^2) / |c| in u: grade there. (c = 0: nothing to grade, u* is sent
        # off the line.)
        centres, widths = [], []
        outer_f = _scaled_soft([(soft_f, a, 1.0)])
        if outer_f is not None:
            centres.append(outer_f[0])
            widths.append(outer_f[1])
        cc, ss = c[:, None], s[:, None]
        if pg.size:
            smoothed_width = np.sqrt(ss * ss + wg * wg) / np.abs(cc)
            if np.nanmin(smoothed_width) < 1.0:
                centres.append(pg / cc)
                widths.append(smoothed_width)
        soft_outer = ((np.concatenate(centres, 1), np.concatenate(widths, 1))
                      if centres else None)
        smoothed = (kg / cc, np.broadcast_to(ss / np.abs(cc), kg.shape)) if kg.size else None
        u, wu = normal_rule(kf, soft_outer, (n_c,), smoothed)             # (n_c, Nu)
        if pieces_g is not None:
            # Inner integral in closed form: v | u ~ N(c u, s^2), g's argument sg v.
            mean, std = sg[:, None] * c[:, None] * u, (sg * s)[:, None]
            inner = np.where(std > 0, expect_pieces(pieces_g, mean, np.where(std > 0, std, 1.0)),
                             g(mean))
            return np.einsum("cu,cu->c", wu, f(a * u) * inner)
        # Inner variable w for every (c, u): g's kinks at (k - c u) / s; its soft points
        # only where they are sharper than a panel.
        cu = (c[:, None] * u)[..., None]
        s3 = s[:, None, None]
        soft_inner = None
        if pg.size and np.nanmin(wg / ss) < 1.0:
            soft_inner = ((pg[:, None, :] - cu) / s3,
                          np.broadcast_to((wg / ss)[:, None, :], u.shape + (pg.shape[1],)))
        if kg.size or soft_inner is not None:
            w, ww = normal_rule((kg[:, None, :] - cu) / s3, soft_inner, u.shape)
        else:
            w, ww = _BASE                          # smooth inner integrand: one shared rule
    v = c[:, None, None] * u[..., None] + s3 * w
    gv = g(sg[:, None, None] * v)
    inner = gv @ ww if ww.ndim == 1 else np.einsum("cuw,cuw->cu", ww, gv)
    return np.einsum("cu,cu->c", wu, f(a * u) * inner)


_BASE = rule(_UNIFORM)
_UNIFORM_INNER = _UNIFORM[1:-1]
_ENDS = _UNIFORM[[0, -1]]
_NODES_PLUS_1 = _NODES + 1.0
