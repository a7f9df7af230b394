"""Local maps (closed forms, Monte Carlo, consistency) and the DKS/TAT solver (vs dks 0.1.2)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import integrate

from graphshape import GraphshapeError
from graphshape import activations as A
from graphshape import kernels as K
from graphshape.kernels import chain_subnet_max_func

C_GRID = np.array([-1.0, -0.8, -0.3, 0.0, 0.4, 0.9, 0.999, 1.0])
REFERENCE = os.path.join(os.path.dirname(__file__), "data", "dks_reference.json")




def _quad(f, breaks=()):
    """E[f(z)], z ~ N(0, 1), by scipy's adaptive quadrature (independent of graphshape)."""
    edges = [-14.0, *sorted(b for b in breaks if abs(b) < 14), 14.0]  # density < 1e-42 beyond
    dens = lambda z: f(z) * np.exp(-z * z / 2) / np.sqrt(2 * np.pi)
    return sum(integrate.quad(dens, lo, hi, epsabs=1e-14, epsrel=1e-12, limit=500)[0]
               for lo, hi in zip(edges[:-1], edges[1:]))


# --- local maps: closed forms ------------------------------------------------------------

def relu_c(c):
    return (np.sqrt(1 - c ** 2) + (np.pi - np.arccos(c)) * c) / np.pi


@pytest.mark.parametrize("slope", [0.0, 0.2, 0.7])
def test_leaky_relu_arc_cosine_kernel(slope):
    name = "relu" if slope == 0.0 else "leaky_relu"
    attrs = {} if slope == 0.0 else {"negative_slope": slope}
    maps = K.local_maps(name, **attrs)
    exact_c = ((1 - slope) ** 2 * relu_c(C_GRID) + 2 * slope * C_GRID) / (1 + slope ** 2)
    np.testing.assert_allclose(maps.c(C_GRID), exact_c, atol=1e-14)
    np.testing.assert_allclose(maps.q(np.array([0.0, 0.5, 2.0])),
                               np.array([0.0, 0.5, 2.0]) * (1 + slope ** 2) / 2, rtol=1e-14)
    assert maps.q_slope_1 == pytest.approx((1 + slope ** 2) / 2, rel=1e-12)
    assert maps.c0 == pytest.approx(exact_c[3], abs=1e-12)
    assert maps.c_slope_1 == pytest.approx(1.0, rel=1e-12)
    assert maps.c_curv_1 == math.inf
    # Extended map: C is scale-free for a homogeneous function, whatever q1, q2.
    np.testing.assert_allclose(maps.c(C_GRID, q1=0.3, q2=4.0), exact_c, atol=1e-14)


def test_relu_closed_form_agrees_with_numeric_path():
    # A tiny input shift takes the numeric (quadrature) path; the maps are continuous in it.
    closed = K.local_maps("relu", {"input_scale": 1.3, "output_shift": -0.2, "output_scale": 2.0})
    numeric = K.local_maps("relu", {"input_scale": 1.3, "input_shift": 1e-13,
                                    "output_shift": -0.2, "output_scale": 2.0})
    assert closed._closed == "leaky" and numeric._closed is None
    for attr in ("q1", "q_slope_1", "c0", "c_slope_1"):
        assert getattr(closed, attr) == pytest.approx(getattr(numeric, attr), rel=1e-11)
    np.testing.assert_allclose(closed.cov(0.7, 1.8, C_GRID), numeric.cov(0.7, 1.8, C_GRID),
                               rtol=1e-11)
    np.testing.assert_allclose(closed.c_slope(C_GRID), numeric.c_slope(C_GRID), rtol=1e-11,
                               atol=1e-12)  # the shift itself moves C'(-1) by ~1e-13
    inner = C_GRID[1:-1]
    np.testing.assert_allclose(closed.c_curv(inner), numeric.c_curv(inner), rtol=1e-9)
    # ReLU's C''(c) = 1 / (pi sqrt(1 - c^2)) (the delta function at the kink).
    relu = K.local_maps("relu")
    np.testing.assert_allclose(relu.c_curv(inner), 1 / (np.pi * np.sqrt(1 - inner ** 2)),
                               rtol=1e-12)


@pytest.mark.parametrize("scale", [0.4, 1.0, 3.0])
def test_erf_arcsine_kernel_and_numeric_path(scale):
    maps = K.local_maps("erf", {"input_scale": scale})
    k = 2 * scale ** 2 / (1 + 2 * scale ** 2)
    np.testing.assert_allclose(maps.c(C_GRID), np.arcsin(k * C_GRID) / np.arcsin(k), atol=1e-14)
    q = np.array([0.25, 1.0, 3.0])
    np.testing.assert_allclose(maps.q(q), 2 / np.pi * np.arcsin(2 * scale ** 2 * q
                                                                 / (1 + 2 * scale ** 2 * q)))
    numeric = K.local_maps("erf", {"input_scale": scale, "input_shift": 1e-13})
    assert numeric._closed is None
    np.testing.assert_allclose(numeric.cov(0.5, 2.0, C_GRID), maps.cov(0.5, 2.0, C_GRID),
                               atol=1e-12)
    np.testing.assert_allclose(numeric.c_slope(C_GRID), maps.c_slope(C_GRID), rtol=1e-11)
    np.testing.assert_allclose(numeric.c_curv(C_GRID), maps.c_curv(C_GRID), rtol=1e-10, atol=1e-12)
    for attr in ("q1", "q_slope_1", "c0", "c_slope_1", "c_curv_1"):
        assert getattr(numeric, attr) == pytest.approx(getattr(maps, attr), rel=1e-11, abs=1e-14)


# --- local maps: consistency and Monte Carlo -----------------------------------------------

TRANSFORM = {"input_scale": 0.8, "input_shift": 0.3, "output_shift": -0.1, "output_scale": 1.7}


@pytest.mark.parametrize("name", ["tanh", "softplus", "gelu", "mish", "elu", "hardswish",
                                  "hardtanh", "selu"])
def test_scalar_attributes_and_derivatives_are_consistent(name):
    maps = K.local_maps(name, TRANSFORM)
    assert maps.q1 == pytest.approx(maps.q(1.0), rel=1e-12)
    assert maps.c0 == pytest.approx(maps.c(0.0), abs=1e-12)
    assert maps.c(1.0) == pytest.approx(1.0, abs=1e-13)
    assert maps.c_slope_1 == pytest.approx(maps.c_slope(1.0), rel=1e-12)
    h = 1e-4
    # Q'(1) and C'(c), C''(c) against central differences (error ~ h^2 ~ 1e-8).
    assert maps.q_slope_1 == pytest.approx((maps.q(1 + h) - maps.q(1 - h)) / (2 * h), rel=1e-7)
    c = np.array([-0.5, 0.1, 0.6])
    np.testing.assert_allclose(maps.c_slope(c), (maps.c(c + h) - maps.c(c - h)) / (2 * h),
                               rtol=1e-7)
    # C'' includes the delta functions of phi'' at kinks (hardswish, hardtanh, selu).
    np.testing.assert_allclose(maps.c_curv(c),
                               (maps.c_slope(c + h) - maps.c_slope(c - h)) / (2 * h), rtol=1e-6)
    if A.get(name).differentiable:
        assert maps.c_curv_1 == pytest.approx(maps.c_curv(1.0), rel=1e-12)
    else:
        assert maps.c_curv_1 == math.inf


@pytest.mark.parametrize("name,attrs", [("tanh", {}), ("hardswish", {}),
                                        ("leaky_relu", {"negative_slope": 0.3}),
                                        ("hardtanh", {"min_val": -0.5, "max_val": 2.0})])
def test_extended_c_map_against_monte_carlo(name, attrs):
    maps = K.local_maps(name, TRANSFORM, **attrs)
    q1, q2, c = 0.6, 2.5, 0.45
    rng = np.random.default_rng(7)
    n = 2_000_000
    u = rng.standard_normal(n)
    v = c * u + math.sqrt(1 - c * c) * rng.standard_normal(n)
    prod = maps.fn(math.sqrt(q1) * u) * maps.fn(math.sqrt(q2) * v)
    # 5 standard errors: a correct value fails with probability ~6e-7.
    assert abs(maps.cov(q1, q2, c) - prod.mean()) < 5 * prod.std() / math.sqrt(n)
    sq = maps.fn(math.sqrt(q2) * u) ** 2
    assert abs(maps.q(q2) - sq.mean()) < 5 * sq.std() / math.sqrt(n)


@pytest.mark.parametrize("name,attrs", [("relu", {}), ("hardswish", {}), ("relu6", {}),
                                        ("hardtanh", {"min_val": -0.5, "max_val": 2.0}),
                                        ("elu", {}), ("elu", {"alpha": 0.4}), ("selu", {})])
def test_pieces_path_agrees_with_quadrature_path(name, attrs):
    maps = K.local_maps(name, TRANSFORM, **attrs)
    assert maps._pieces is not None
    q1, q2, c = np.array([0.3, 1.0, 2.5]), np.array([1.7, 1.0, 0.2]), np.array([-0.6, 0.3, 0.97])
    fast = maps.cov(q1, q2, c), maps.c_slope(c), maps.c_curv(c)
    pieces, maps._pieces = maps._pieces, None
    try:
        slow = maps.cov(q1, q2, c), maps.c_slope(c), maps.c_curv(c)
    finally:
        maps._pieces = pieces
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_an_absurd_shift_of_exponential_pieces_integrates_numerically():
    # e^{r beta} overflows a float at beta = 800: the pieces are dropped, not an OverflowError
    maps = K.local_maps("elu", {"input_shift": 800.0})
    assert maps._pieces is None
    assert maps.q1 == pytest.approx(800.0 ** 2 + 1.0, rel=1e-12)  # E[(z + 800)^2]


def test_vectorized_and_cached():
    maps = K.local_maps("tanh", TRANSFORM)
    assert K.local_maps("tanh", dict(TRANSFORM)) is maps
    grid = maps.cov(np.array([0.5, 0.5, 2.0]), 1.0, np.array([0.1, 0.2, 0.1]))
    assert grid.shape == (3,)
    assert grid[1] == pytest.approx(maps.cov(0.5, 1.0, 0.2), rel=1e-14)
    assert maps.q(np.array([[1.0, 2.0]])).shape == (1, 2)
    assert isinstance(maps.c(0.3), float)


def test_local_map_errors():
    with pytest.raises(GraphshapeError, match="known activations"):
        K.local_maps("nope")
    with pytest.raises(GraphshapeError):
        K.local_maps("tanh").q(-1.0)
    with pytest.raises(GraphshapeError):
        K.local_maps("tanh").c(1.5)
    with pytest.raises(GraphshapeError, match="not finite"):
        K.local_maps("tanh", {"input_scale": float("nan")})
    with pytest.raises(GraphshapeError, match="only zeros"):
        K.local_maps("relu", {"input_scale": 0.0, "input_shift": -1.0})
    with pytest.raises(GraphshapeError, match="only zeros"):
        K.local_maps("relu").c(0.5, q1=0.0)
    # solve()'s leaky_relu dict carries negative_slope; local_maps accepts it as an attribute.
    maps = K.local_maps("leaky_relu", {"negative_slope": 0.3, "output_scale": 1.2})
    assert maps.attrs["negative_slope"] == 0.3


def test_import_needs_neither_torch_nor_onnx():
    code = ("import sys, graphshape.kernels, graphshape.gaussian, graphshape.activations; "
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- solver: conditions --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mish", "silu", "hardswish", "tanh", "elu"])
def test_dks_solution_meets_the_dks_conditions(name):
    depth, zeta = 10, 1.5
    params = K.solve([name], "dks", chain_subnet_max_func(depth), zeta=zeta)[name]
    maps = K.local_maps(name, params)
    assert maps.q1 == pytest.approx(1.0, abs=1e-10)
    assert maps.q_slope_1 == pytest.approx(1.0, abs=1e-8)
    assert maps.c0 == pytest.approx(0.0, abs=1e-10)
    assert maps.c_slope_1 ** depth == pytest.approx(zeta, rel=1e-8)


@pytest.mark.parametrize("name", ["hardtanh", "relu6", "hardsigmoid"])
def test_dks_solution_meets_the_conditions_or_raises(name):
    # hybrd reports "success" at a saturated hardtanh whose output variance is lost to
    # rounding (output_scale ~ 1e8, conditions unmet): that must not come back as a solution.
    try:
        params = K.solve([name], "DKS", chain_subnet_max_func(10))[name]
    except GraphshapeError as exc:
        assert "no parameters found" in str(exc)
        return
    maps = K.local_maps(name, params)
    assert maps.q_slope_1 == pytest.approx(1.0, abs=1e-6)
    assert maps.c_slope_1 ** 10 == pytest.approx(1.5, rel=1e-6)


@pytest.mark.parametrize("name", ["mish", "silu", "softplus"])
def test_tat_solution_meets_the_tat_conditions(name):
    depth, tau = 10, 0.3
    params = K.solve([name], "TaT", chain_subnet_max_func(depth), tau=tau)[name]
    maps = K.local_maps(name, params)
    assert maps.q1 == pytest.approx(1.0, abs=1e-10)
    assert maps.q_slope_1 == pytest.approx(1.0, abs=1e-8)
    assert maps.c_slope_1 == pytest.approx(1.0, abs=1e-8)
    assert maps.c_curv_1 * depth == pytest.approx(tau, rel=1e-7)
    assert params["input_scale"] * params["output_scale"] < 2.0


def test_tat_leaky_relu_meets_eta():
    params = K.solve(["leaky_relu"], "TAT", chain_subnet_max_func(20), eta=0.9)["leaky_relu"]
    a = params["negative_slope"]
    c = 0.0
    for _ in range(20):
        c = ((1 - a) ** 2 * relu_c(c) + 2 * a * c) / (1 + a * a)
    assert c == pytest.approx(0.9, abs=1e-10)
    assert params["output_scale"] == pytest.approx(math.sqrt(2 / (1 + a * a)), rel=1e-14)
    assert K.local_maps("leaky_relu", params).q1 == pytest.approx(1.0, rel=1e-12)


def test_untransformed_and_method_case():
    assert K.solve(["tanh", "relu"], "Untransformed", None) == {"tanh": {}, "relu": {}}


# --- solver: errors ------------------------------------------------------------------------

def test_unreachable_eta_names_the_achievable_value():
    achievable = 0.0
    for _ in range(5):
        achievable = relu_c(achievable)
    with pytest.raises(GraphshapeError) as info:
        K.solve(["leaky_relu"], "TAT", chain_subnet_max_func(5), eta=0.9)
    message = str(info.value)
    assert f"{achievable:.4g}" in message and "eta=0.9" in message and "lower eta" in message
    # the eta it suggests is reached
    suggested = float(message.split("lower eta (eta=")[1].split(" ")[0])
    assert suggested <= achievable
    params = K.solve(["leaky_relu"], "TAT", chain_subnet_max_func(5), eta=suggested)
    assert 0 <= params["leaky_relu"]["negative_slope"] < 0.2


@pytest.mark.parametrize("call,pattern", [
    (lambda: K.solve(["tanh"], "DKS", chain_subnet_max_func(5), zeta=1.0), "zeta > 1"),
    (lambda: K.solve(["tanh"], "DKS", chain_subnet_max_func(5), zeta=float("nan")), "zeta > 1"),
    (lambda: K.solve(["tanh"], "DKS", chain_subnet_max_func(5), zeta=float("inf")), "zeta > 1"),
    (lambda: K.solve(["tanh"], "TAT", chain_subnet_max_func(5), tau=0.0), "tau > 0"),
    (lambda: K.solve(["leaky_relu"], "TAT", chain_subnet_max_func(5), eta=1.2), r"eta .* in \[0, 1\]"),
    (lambda: K.solve(["leaky_relu"], "TAT", chain_subnet_max_func(5), eta=-0.1), r"eta .* in \[0, 1\]"),
    (lambda: K.solve(["relu"], "TAT", chain_subnet_max_func(5)), "use leaky_relu"),
    (lambda: K.solve(["selu"], "TAT", chain_subnet_max_func(5)), "kink"),
    (lambda: K.solve(["leaky_relu", "tanh"], "TAT", chain_subnet_max_func(5)), "only"),
    (lambda: K.solve(["tanh"], "NTK", chain_subnet_max_func(5)), "unknown method"),
    (lambda: K.solve(["tanhh"], "DKS", chain_subnet_max_func(5)), "known activations"),
    (lambda: K.solve(["tanh"], "DKS", chain_subnet_max_func(0)), "zeta=1.5 is out of reach"),
    (lambda: K.solve(["tanh"], "TAT", lambda x, r: min(r(x), 0.1)), "only reaches 0.1"),
    (lambda: K.solve(["tanh"], "DKS", lambda x, r: 1 / 0), "subnet_max_func failed"),
    (lambda: K.solve(["square"], "DKS", chain_subnet_max_func(5)), "no parameters found for activation 'square'"),
])
def test_errors_are_graphshape_errors(call, pattern):
    with pytest.raises(GraphshapeError, match=pattern):
        call()


def test_never_nan_over_a_grid_of_targets():
    for zeta in (1.01, 1.5, 10.0, 1e3):
        for depth in (1, 7, 100):
            try:
                params = K.solve(["softplus", "leaky_relu"], "DKS", chain_subnet_max_func(depth), zeta=zeta)
            except GraphshapeError:
                continue
            assert all(math.isfinite(v) for p in params.values() for v in p.values())


# --- solver: the same answers as dks 0.1.2 --------------------------------------------------

with open(REFERENCE) as _fh:
    _CASES = json.load(_fh)["cases"]


def _case_id(case):
    extra = {**case.get("dks_params", {}), **case.get("tat_params", {})}
    return f"{case['method']}-{'+'.join(case['names'])}-{case['depth']}" + (
        "-" + "-".join(f"{k}={v}" for k, v in extra.items()) if extra else "")


def _solve_case(case):
    dks_params, tat_params = case.get("dks_params", {}), case.get("tat_params", {})
    kwargs = {}
    for ours, theirs, src in (("zeta", "c_slope_1_target", dks_params),
                              ("q_slope", "local_q_slope_target", dks_params),
                              ("eta", "c_val_0_target", tat_params),
                              ("tau", "c_curve_target", tat_params)):
        if theirs in src:
            kwargs[ours] = src[theirs]
    return K.solve(case["names"], case["method"], chain_subnet_max_func(case["depth"]), **kwargs), kwargs


def _condition_errors(name, params, method, depth, kwargs):
    """|value - target| of each condition the solver imposes, by independent quadrature."""
    if method == "TAT" and name == "leaky_relu":
        a, c = params["negative_slope"], 0.0
        for _ in range(depth):
            c = ((1 - a) ** 2 * relu_c(c) + 2 * a * c) / (1 + a * a)
        return np.abs([c - kwargs.get("eta", 0.9),
                       params["output_scale"] - math.sqrt(2 / (1 + a * a))])
    act = A.get(name)
    attrs = {"negative_slope": params["negative_slope"]} if "negative_slope" in params else {}
    a, b = params.get("input_scale", 1.0), params.get("input_shift", 0.0)
    d, g = params["output_shift"], params["output_scale"]
    breaks = [(k - b) / a for k in act.kink_points(**attrs)] + [-b / a]
    f = lambda z: g * (act.fn(a * z + b, **attrs) + d)
    f1 = lambda z: g * a * act.d1(a * z + b, **attrs)
    f2 = lambda z: g * a * a * act.d2(a * z + b, **attrs)
    errors = [_quad(lambda z: f(z) ** 2, breaks) - 1.0]
    if method == "DKS":
        errors.append(_quad(f, breaks))
        if name != "relu":
            errors.append(_quad(lambda z: f(z) * f1(z) * z, breaks) - kwargs.get("q_slope", 1.0))
        errors.append(_quad(lambda z: f1(z) ** 2, breaks) - kwargs.get("zeta", 1.5) ** (1 / depth))
    else:
        errors.append(_quad(lambda z: f(z) * f1(z) * z, breaks) - 1.0)
        errors.append(_quad(lambda z: f1(z) ** 2, breaks) - 1.0)
        errors.append(_quad(lambda z: f2(z) ** 2, breaks) - kwargs.get("tau", 0.3) / depth)
    return np.abs(errors)


# Where graphshape and dks differ by more than 1e-6, and why (checked below, not skipped):
# * sigmoid under DKS: sigmoid(-x) = 1 - sigmoid(x), so (a, -b, -1 - d, g) solves the same
#   conditions as (a, b, d, g). dks's first starting point is symmetric, where its root
#   finder's first step is decided by rounding noise; graphshape skips such points and lands
#   on the mirror image of dks's root.
MIRRORED = {("DKS", "sigmoid")}
# * relu, selu (a kink in phi') and one ill-conditioned gelu case (output_scale ~ 3342): dks's
#   100,000-point grid is not exact across the kink / not accurate enough; graphshape's root
#   meets the conditions to ~1e-12 while dks's misses them by 1e-9 .. 1e-4. TAT leaky_relu with
#   eta = 0: the exact answer is negative_slope = 1; dks's bisection stops at 0.99997, where
#   its tolerance |C_f(0) - eta| < 1e-8 is met.
LESS_ACCURATE_IN_DKS = {("DKS", "relu"), ("DKS", "selu"), ("TAT", "leaky_relu")}
ILL_CONDITIONED = {("DKS", "gelu", 5, 1.1)}
# * elu under TAT (C^1, but phi'' jumps at 0): dks's C''(1) misses by ~2e-7 across the jump,
#   its root search takes another path and ends at another root. Both roots meet the
#   conditions (dks's to its accuracy), graphshape's to ~1e-12.
OTHER_ROOT = {("TAT", "elu")}


@pytest.mark.parametrize("case", _CASES, ids=[_case_id(c) for c in _CASES])
def test_same_answer_as_dks(case):
    if "error" in case:
        with pytest.raises(GraphshapeError):
            _solve_case(case)
        return
    ours, kwargs = _solve_case(case)
    assert set(ours) == set(case["params"])
    for name, theirs in case["params"].items():
        got = ours[name]
        assert set(got) == set(theirs)
        key = (case["method"], name)
        if key in MIRRORED:
            theirs = dict(theirs, input_shift=-theirs["input_shift"],
                          output_shift=-2 * A.get(name).point_symmetry - theirs["output_shift"])
        close = all(math.isclose(got[k], v, rel_tol=1e-6, abs_tol=1e-9) for k, v in theirs.items())
        ill = (case["method"], name, case["depth"], kwargs.get("q_slope")) in ILL_CONDITIONED
        if key in OTHER_ROOT and not close:
            ours_err = _condition_errors(name, got, case["method"], case["depth"], kwargs)
            dks_err = _condition_errors(name, theirs, case["method"], case["depth"], kwargs)
            assert ours_err.max() < 1e-10 < dks_err.max() < 1e-5
            assert got["input_scale"] * got["output_scale"] < 2.0
        elif (key in LESS_ACCURATE_IN_DKS or ill) and not close:
            ours_err = _condition_errors(name, got, case["method"], case["depth"], kwargs)
            dks_err = _condition_errors(name, case["params"][name], case["method"],
                                        case["depth"], kwargs)
            assert ours_err.max() < 1e-10
            assert dks_err.max() > ours_err.max()
            assert all(math.isclose(got[k], v, rel_tol=1e-2, abs_tol=1e-9)
                       for k, v in theirs.items())
        else:
            assert close, (got, theirs)
