"""The activation registry: every elementwise nonlinearity graphshape knows by name.

Each :class:`Activation` carries its numpy form ``fn(x, **attrs)``, its first and second
derivatives (``d1``, ``d2``; piecewise where the function has kinks, taking the right-hand
branch at the kink itself, like dks), the points where ``fn``, ``d1`` or ``d2`` is not
smooth (``kink_points(**attrs)``), and its default attributes.

The names and formulas of dks 0.1.2 are kept exactly (``gelu`` is the tanh approximation,
``swish`` = ``silu`` = x * sigmoid(x), ``bentid`` = (sqrt(x^2 + 1) - 1) / 2 + x, ``selu``
uses the SELU paper's constants, ``leaky_relu`` has ``negative_slope`` 0.01 by default),
plus PyTorch's ``silu``, ``mish``, ``hardswish``, ``hardsigmoid``, ``relu6`` and
``hardtanh``, and ``squared_relu``, max(x, 0)^2 (Primer's; the core of MetaFormer's StarReLU,
``s * relu(x) ** 2 + b``, which models spell out: the frontends read it back as this).

numpy and scipy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import special

from graphshape.errors import GraphshapeError

SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
GELU_TANH_COEF = 0.044715
_SQRT_2_OVER_PI = float(np.sqrt(2.0 / np.pi))
_INV_SQRT_2PI = float(1.0 / np.sqrt(2.0 * np.pi))


@dataclass(frozen=True)
class Activation:
    """One named activation function.

    name:           registry name.
    fn:             ``fn(x, **attrs)``, numpy, elementwise.
    d1, d2:         first and second derivatives, ``d(x, **attrs)``; where ``fn`` has a
                    kink they are the one-sided (right) derivatives, i.e. the derivative
                    almost everywhere (delta functions at kinks are not included).
    kinks:          kink points for the default attributes (see :meth:`kink_points`).
    smooth:         True if ``fn`` is infinitely differentiable everywhere (for the
                    default attributes).
    differentiable: True if ``fn`` is continuously differentiable (C^1) for the default
                    attributes, i.e. ``d1`` is continuous: its C map then has a finite
                    second derivative at c = 1 (what TAT needs).
    defaults:       default attributes (``negative_slope`` for leaky_relu, ``min_val``
                    and ``max_val`` for hardtanh, ``alpha`` for elu).
    point_symmetry: m if phi(-x) = 2 m - phi(x) (tanh, erf, ...: 0; sigmoid: 1/2), else None.
    soft_width:     the width of the input range where a smooth fn bends, for quadrature
                    (:mod:`graphshape.gaussian`): panels are graded around the bend only
                    where the input's scale makes it narrower than one panel. 1 (tanh,
                    atan, ...) by default; 2 for silu, gelu, sigmoid and softplus and 1.5
                    for mish and erf, whose fn, d1 and d2 a panel still integrates to
                    ~1e-15 at half (two thirds of) the default width (measured against a
                    graded rule).
    """

    name: str
    fn: Callable[..., np.ndarray]
    d1: Callable[..., np.ndarray]
    d2: Callable[..., np.ndarray]
    kinks: tuple[float, ...] = ()
    smooth: bool = True
    differentiable: bool = True
    defaults: dict = field(default_factory=dict)
    # m if phi(-x) = 2 m - phi(x) for all x (point symmetry about (0, m)), else None.
    point_symmetry: float | None = None
    kinks_fn: Callable[..., tuple] | None = None
    # Jumps of d1 at the kink points, for delta terms of the second derivative.
    d1_jumps_fn: Callable[..., tuple] | None = None
    # Activations piecewise a quadratic plus an exponential: ((lo, hi, c0, c1, c2[, k, r]),
    # ...), fn = c0 + c1 x + c2 x^2 + k e^{r x} on [lo, hi); lets kernels integrate them
    # against a Gaussian in closed form.
    pieces_fn: Callable[..., tuple] | None = None
    soft_width: float = 1.0

    def pieces(self, **attrs):
        """``((lo, hi, c0, c1, c2, k, r), ...)`` with fn(x) = c0 + c1 x + c2 x^2 + k e^{r x}
        on [lo, hi), for activations made of such pieces (relu, hardtanh, ...; elu and
        selu); None for the others. (``pieces_fn`` may leave out k, r where k = 0.)"""
        if self.pieces_fn is None:
            return None
        return tuple((tuple(row) + (0.0, 0.0))[:7]
                     for row in self.pieces_fn(**self.attrs(**attrs)))

    def attrs(self, **attrs) -> dict:
        """Defaults updated with ``attrs``; unknown attribute names are an error."""
        unknown = set(attrs) - set(self.defaults)
        if unknown:
            raise GraphshapeError(
                f"activation {self.name!r} has no attribute(s) {sorted(unknown)}; "
                f"it takes {sorted(self.defaults) or 'none'}")
        return {**self.defaults, **attrs}

    def kink_points(self, **attrs) -> tuple[float, ...]:
        """Points where fn, d1 or d2 is not smooth, for these attributes (sorted)."""
        if self.kinks_fn is None:
            return self.kinks
        return tuple(sorted(self.kinks_fn(**self.attrs(**attrs))))

    def d1_jumps(self, **attrs) -> tuple[float, ...]:
        """d1(k+) - d1(k-) at each kink point (0 where only d2 jumps)."""
        if self.d1_jumps_fn is None:
            return tuple(0.0 for _ in self.kink_points(**attrs))
        return tuple(self.d1_jumps_fn(**self.attrs(**attrs)))

    def is_nondecreasing(self, **attrs) -> bool:
        """True if fn never decreases, for these attributes: ``d1 >= 0`` on a fine grid over
        [-30, 30], which holds every dip of the registered functions (swish, gelu, mish and
        hardswish dip below zero slope between -4 and 0; outside [-30, 30] all are flat or
        linear). Then ``fn(max(a, b)) = max(fn(a), fn(b))``: max pooling commutes with it."""
        grid = np.linspace(-30.0, 30.0, 60001)
        with np.errstate(all="ignore"):
            slope = np.asarray(self.d1(grid, **self.attrs(**attrs)), dtype=float)
        return bool(np.all(slope >= 0.0))

    def is_differentiable(self, **attrs) -> bool:
        """True if fn is C^1 for these attributes (no jump in d1)."""
        return all(j == 0.0 for j in self.d1_jumps(**attrs))


def _sigmoid(x):
    return special.expit(x)


def _softplus(x):
    # Stable for large |x|, the same formula as dks.
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0.0)


def _gelu(x):
    inner = _SQRT_2_OVER_PI * (x + GELU_TANH_COEF * x ** 3)
    return 0.5 * x * (1.0 + np.tanh(inner))


def _gelu_d1(x):
    inner = _SQRT_2_OVER_PI * (x + GELU_TANH_COEF * x ** 3)
    t = np.tanh(inner)
    inner_d1 = _SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_COEF * x ** 2)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * inner_d1


def _gelu_d2(x):
    inner = _SQRT_2_OVER_PI * (x + GELU_TANH_COEF * x ** 3)
    t = np.tanh(inner)
    inner_d1 = _SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_COEF * x ** 2)
    inner_d2 = _SQRT_2_OVER_PI * 6.0 * GELU_TANH_COEF * x
    sech2 = 1.0 - t * t
    t_d1 = sech2 * inner_d1
    t_d2 = -2.0 * t * t_d1 * inner_d1 + sech2 * inner_d2
    return t_d1 + 0.5 * x * t_d2


def _npdf(x):
    return _INV_SQRT_2PI * np.exp(-0.5 * x * x)


def _mish_parts(x):
    s = special.expit(x)
    t = np.tanh(_softplus(x))
    return s, t, 1.0 - t * t


def _mish_d1(x):
    s, t, sech2 = _mish_parts(x)
    return t + x * sech2 * s


def _mish_d2(x):
    s, t, sech2 = _mish_parts(x)
    return 2.0 * sech2 * s + x * sech2 * s * (1.0 - s - 2.0 * t * s)


def _where(cond, a, b):
    return np.where(cond, a, b)


def _elu(x, alpha=1.0):
    neg = x < 0
    return _where(neg, alpha * np.expm1(np.minimum(x, 0.0)), x)


def _elu_d1(x, alpha=1.0):
    return _where(x < 0, alpha * np.exp(np.minimum(x, 0.0)), 1.0)


def _elu_d2(x, alpha=1.0):
    return _where(x < 0, alpha * np.exp(np.minimum(x, 0.0)), 0.0)


def _elu_pieces(alpha=1.0, scale=1.0):
    """scale * elu(x, alpha): scale * alpha * (e^x - 1) below 0, scale * x above."""
    return ((-_INF, 0.0, -scale * alpha, 0.0, 0.0, scale * alpha, 1.0),
            (0.0, _INF, 0.0, scale, 0.0))


def _selu(x):
    return SELU_SCALE * _elu(x, SELU_ALPHA)


def _selu_d1(x):
    return SELU_SCALE * _elu_d1(x, SELU_ALPHA)


def _selu_d2(x):
    return SELU_SCALE * _elu_d2(x, SELU_ALPHA)


def _leaky(x, negative_slope=0.01):
    return _where(x < 0, negative_slope * x, x)


def _leaky_d1(x, negative_slope=0.01):
    return _where(x < 0, negative_slope, 1.0) + 0.0 * x


def _zero(x, **_):
    return np.zeros_like(np.asarray(x, dtype=float))


def _one(x, **_):
    return np.ones_like(np.asarray(x, dtype=float))


def _inside(x, lo, hi):
    # Right-hand branch at the kinks, as elsewhere: [lo, hi).
    return (x >= lo) & (x < hi)


def _hardtanh(x, min_val=-1.0, max_val=1.0):
    return np.clip(x, min_val, max_val)


def _hardtanh_d1(x, min_val=-1.0, max_val=1.0):
    return np.where(_inside(x, min_val, max_val), 1.0, 0.0)


def _hardswish(x):
    return x * np.clip(x + 3.0, 0.0, 6.0) / 6.0


def _hardswish_d1(x):
    return _where(x < -3.0, 0.0, _where(x < 3.0, (2.0 * x + 3.0) / 6.0, 1.0))


def _hardswish_d2(x):
    return _inside(x, -3.0, 3.0) / 3.0


def _hardsigmoid(x):
    return np.clip(x + 3.0, 0.0, 6.0) / 6.0


def _hardsigmoid_d1(x):
    return _inside(x, -3.0, 3.0) / 6.0


def _swish(x):
    return x * special.expit(x)


def _swish_d1(x):
    s = special.expit(x)
    return s + x * s * (1.0 - s)


def _swish_d2(x):
    s = special.expit(x)
    return s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s))


_A = Activation
_INF = float("inf")
_REGISTRY: dict[str, Activation] = {}


def _register(act: Activation):
    _REGISTRY[act.name] = act


_register(_A("tanh", np.tanh, lambda x: 1.0 - np.tanh(x) ** 2,
             lambda x: -2.0 * np.tanh(x) * (1.0 - np.tanh(x) ** 2), point_symmetry=0.0))
_register(_A("sigmoid", _sigmoid, lambda x: _sigmoid(x) * (1.0 - _sigmoid(x)),
             lambda x: _sigmoid(x) * (1.0 - _sigmoid(x)) * (1.0 - 2.0 * _sigmoid(x)),
             point_symmetry=0.5, soft_width=2.0))
_register(_A("erf", special.erf, lambda x: 2.0 / np.sqrt(np.pi) * np.exp(-x * x),
             lambda x: -4.0 * x / np.sqrt(np.pi) * np.exp(-x * x), point_symmetry=0.0,
             soft_width=1.5))
_register(_A("relu", lambda x: np.maximum(x, 0.0), lambda x: np.where(x >= 0, 1.0, 0.0),
             _zero, kinks=(0.0,), smooth=False, differentiable=False,
             d1_jumps_fn=lambda: (1.0,),
             pieces_fn=lambda: ((-_INF, 0.0, 0.0, 0.0, 0.0), (0.0, _INF, 0.0, 1.0, 0.0))))
_register(_A("softplus", _softplus, _sigmoid, lambda x: _sigmoid(x) * (1.0 - _sigmoid(x)),
             soft_width=2.0))
_register(_A("selu", _selu, _selu_d1, _selu_d2, kinks=(0.0,), smooth=False,
             differentiable=False, d1_jumps_fn=lambda: (SELU_SCALE * (1.0 - SELU_ALPHA),),
             pieces_fn=lambda: _elu_pieces(SELU_ALPHA, SELU_SCALE)))
_register(_A("elu", _elu, _elu_d1, _elu_d2, kinks=(0.0,), smooth=False, differentiable=True,
             defaults={"alpha": 1.0}, kinks_fn=lambda alpha: (0.0,),
             d1_jumps_fn=lambda alpha: (1.0 - alpha,), pieces_fn=_elu_pieces))
_register(_A("swish", _swish, _swish_d1, _swish_d2, soft_width=2.0))
_register(_A("silu", _swish, _swish_d1, _swish_d2, soft_width=2.0))
_register(_A("bentid", lambda x: (np.sqrt(x * x + 1.0) - 1.0) / 2.0 + x,
             lambda x: x / (2.0 * np.sqrt(x * x + 1.0)) + 1.0,
             lambda x: 0.5 / (x * x + 1.0) ** 1.5))
_register(_A("atan", np.arctan, lambda x: 1.0 / (1.0 + x * x),
             lambda x: -2.0 * x / (1.0 + x * x) ** 2, point_symmetry=0.0))
_register(_A("asinh", np.arcsinh, lambda x: 1.0 / np.sqrt(1.0 + x * x),
             lambda x: -x / (1.0 + x * x) ** 1.5, point_symmetry=0.0))
_register(_A("square", lambda x: x * x, lambda x: 2.0 * x, lambda x: 2.0 + 0.0 * x,
             pieces_fn=lambda: ((-_INF, _INF, 0.0, 0.0, 1.0),)))
_register(_A("squared_relu", lambda x: np.maximum(x, 0.0) ** 2,
             lambda x: 2.0 * np.maximum(x, 0.0), lambda x: np.where(x >= 0, 2.0, 0.0),
             kinks=(0.0,), smooth=False, differentiable=True, d1_jumps_fn=lambda: (0.0,),
             pieces_fn=lambda: ((-_INF, 0.0, 0.0, 0.0, 0.0), (0.0, _INF, 0.0, 0.0, 1.0))))
_register(_A("softsign", lambda x: x / (1.0 + np.abs(x)), lambda x: 1.0 / (1.0 + np.abs(x)) ** 2,
             lambda x: -2.0 * np.sign(x) / (1.0 + np.abs(x)) ** 3, kinks=(0.0,), smooth=False,
             differentiable=True, point_symmetry=0.0))
_register(_A("leaky_relu", _leaky, _leaky_d1, _zero, kinks=(0.0,), smooth=False,
             differentiable=False, defaults={"negative_slope": 0.01},
             kinks_fn=lambda negative_slope: (0.0,),
             d1_jumps_fn=lambda negative_slope: (1.0 - negative_slope,),
             pieces_fn=lambda negative_slope: ((-_INF, 0.0, 0.0, negative_slope, 0.0),
                                               (0.0, _INF, 0.0, 1.0, 0.0))))
_register(_A("gelu", _gelu, _gelu_d1, _gelu_d2, soft_width=2.0))
_register(_A("gelu_exact", lambda x: 0.5 * x * (1.0 + special.erf(x / np.sqrt(2.0))),
             lambda x: special.ndtr(x) + x * _npdf(x),
             lambda x: (2.0 - x * x) * _npdf(x), soft_width=2.0))
_register(_A("mish", lambda x: x * np.tanh(_softplus(x)), _mish_d1, _mish_d2,
             soft_width=1.5))
_register(_A("hardswish", _hardswish, _hardswish_d1, _hardswish_d2, kinks=(-3.0, 3.0),
             smooth=False, differentiable=False, d1_jumps_fn=lambda: (-0.5, -0.5),
             pieces_fn=lambda: ((-_INF, -3.0, 0.0, 0.0, 0.0), (-3.0, 3.0, 0.0, 0.5, 1 / 6),
                                (3.0, _INF, 0.0, 1.0, 0.0))))
_register(_A("hardsigmoid", _hardsigmoid, _hardsigmoid_d1, _zero, kinks=(-3.0, 3.0),
             smooth=False, differentiable=False, d1_jumps_fn=lambda: (1 / 6, -1 / 6),
             point_symmetry=0.5,
             pieces_fn=lambda: ((-_INF, -3.0, 0.0, 0.0, 0.0), (-3.0, 3.0, 0.5, 1 / 6, 0.0),
                                (3.0, _INF, 1.0, 0.0, 0.0))))
_register(_A("relu6", lambda x: np.clip(x, 0.0, 6.0), lambda x: _inside(x, 0.0, 6.0) + 0.0,
             _zero, kinks=(0.0, 6.0), smooth=False, differentiable=False,
             d1_jumps_fn=lambda: (1.0, -1.0),
             pieces_fn=lambda: ((-_INF, 0.0, 0.0, 0.0, 0.0), (0.0, 6.0, 0.0, 1.0, 0.0),
                                (6.0, _INF, 6.0, 0.0, 0.0))))
_register(_A("hardtanh", _hardtanh, _hardtanh_d1, _zero, kinks=(-1.0, 1.0), smooth=False,
             differentiable=False, defaults={"min_val": -1.0, "max_val": 1.0},
             kinks_fn=lambda min_val, max_val: (min_val, max_val),
             d1_jumps_fn=lambda min_val, max_val: (1.0, -1.0),
             pieces_fn=lambda min_val, max_val: ((-_INF, min_val, min_val, 0.0, 0.0),
                                                 (min_val, max_val, 0.0, 1.0, 0.0),
                                                 (max_val, _INF, max_val, 0.0, 0.0))))

#: Activations with phi(a x) = a phi(x) for every a > 0 (leaky_relu for any slope): a
#: positive scale in front of or behind them moves through them.
POSITIVELY_HOMOGENEOUS = frozenset({"relu", "leaky_relu"})

#: The names dks 0.1.2 knows.
DKS_NAMES = ("tanh", "sigmoid", "erf", "relu", "softplus", "selu", "elu", "swish", "bentid",
             "atan", "asinh", "square", "softsign", "leaky_relu", "gelu", "gelu_exact")


def names() -> list[str]:
    """All registered activation names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> Activation:
    """The activation called ``name``.

    An unknown name is a GraphshapeError listing the known ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise GraphshapeError(
            f"unknown activation {name!r}; known activations: {', '.join(names())}") from None
