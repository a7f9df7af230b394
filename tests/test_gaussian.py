"""Gaussian expectations: exact moments, adaptive quadrature, closed forms, Monte Carlo."""

import numpy as np
import pytest
from scipy import integrate, special

from graphshape import gaussian as G

C_GRID = np.array([-1.0, -1 + 1e-9, -0.97, -0.5, 0.0, 0.2, 0.7, 0.99, 1 - 1e-6, 1 - 1e-12, 1.0])


def _quad(f, breaks=()):
    """E[f(z)] by scipy's adaptive quadrature, split at ``breaks`` (independent reference)."""
    edges = [-14.0, *sorted(b for b in breaks if abs(b) < 14), 14.0]  # density < 1e-42 beyond
    density = lambda z: f(z) * np.exp(-z * z / 2) / np.sqrt(2 * np.pi)
    return sum(integrate.quad(density, lo, hi, epsabs=1e-14, epsrel=1e-12, limit=500)[0]
               for lo, hi in zip(edges[:-1], edges[1:]))


def test_normal_moments_exact():
    assert G.expect(lambda z: np.ones_like(z)) == pytest.approx(1.0, abs=1e-14)
    assert G.expect(lambda z: z) == pytest.approx(0.0, abs=1e-15)
    assert G.expect(lambda z: z ** 2) == pytest.approx(1.0, abs=1e-14)
    assert G.expect(lambda z: z ** 8) == pytest.approx(105.0, rel=1e-13)
    assert G.expect(np.abs, kinks=[0.0]) == pytest.approx(np.sqrt(2 / np.pi), abs=1e-15)


@pytest.mark.parametrize("scale,shift", [(1.0, 0.0), (0.3, 0.7), (2.5, -1.0), (12.0, 0.4)])
def test_expect_matches_adaptive_quadrature(scale, shift):
    # Smooth but sharp (tanh(12 z)) and kinked (relu, hardtanh) integrands; the centre of
    # the sharp part is passed as a soft point, as kernels does.
    soft = [(-shift / scale, 1 / scale)] if scale > 1 else []
    f = lambda z: np.tanh(scale * z + shift) ** 2 * np.exp(0.3 * z)
    assert G.expect(f, soft=soft) == pytest.approx(_quad(f, [-shift / scale]), abs=1e-12)
    kinks = [(-1 - shift) / scale, (1 - shift) / scale]
    g = lambda z: np.clip(scale * z + shift, -1, 1) * z
    assert G.expect(g, kinks=kinks) == pytest.approx(_quad(g, kinks), abs=1e-13)


def test_relu_arc_cosine_kernel_across_c():
    relu = lambda x: np.maximum(x, 0.0)
    got = G.expect2(relu, relu, C_GRID, [0.0], [0.0])
    s = np.sqrt(1 - C_GRID ** 2)
    exact = (s + (np.pi - np.arccos(C_GRID)) * C_GRID) / (2 * np.pi)
    np.testing.assert_allclose(got, exact, rtol=0, atol=1e-13)


def test_shifted_kinks_against_bivariate_normal_cdf():
    # E[1{u > a} 1{v > b}] = P(u > a, v > b): the kinks are off the origin and move with c.
    a, b = 0.4, -1.3
    step_a = lambda x: (x > a).astype(float)
    step_b = lambda x: (x > b).astype(float)
    for c in [-0.9, -0.3, 0.0, 0.5, 0.95, 0.9999]:
        s = np.sqrt(1 - c * c)
        # P(u > a, v > b) = int_a^inf pdf(u) P(w > (b - c u) / s) du, by adaptive quadrature.
        exact = integrate.quad(lambda u: np.exp(-u * u / 2) / np.sqrt(2 * np.pi)
                               * special.ndtr((c * u - b) / s), a, np.inf,
                               epsabs=1e-14, epsrel=1e-12, limit=500)[0]
        assert G.expect2(step_a, step_b, c, [a], [b]) == pytest.approx(exact, abs=1e-12)


@pytest.mark.parametrize("scale", [0.5, 1.0, 6.0])
def test_erf_arcsine_kernel(scale):
    f = lambda x: special.erf(scale * x)
    soft = [(0.0, 1 / scale)] if scale > 1 else []
    got = G.expect2(f, f, C_GRID, soft_f=soft, soft_g=soft)
    k = 2 * scale ** 2 / (1 + 2 * scale ** 2)
    np.testing.assert_allclose(got, 2 / np.pi * np.arcsin(k * C_GRID), rtol=0, atol=1e-12)


def test_polynomial_moments_and_shapes():
    c = np.array([[-0.3, 0.1], [0.8, 1.0]])
    np.testing.assert_allclose(G.expect2(lambda x: x, lambda x: x, c), c, atol=1e-14)
    np.testing.assert_allclose(G.expect2(np.square, np.square, c), 1 + 2 * c ** 2, atol=1e-13)
    assert isinstance(G.expect2(np.tanh, np.tanh, 0.3), float)
    with pytest.raises(ValueError):
        G.expect2(np.tanh, np.tanh, 1.5)


def test_piecewise_polynomial_inner_integral_in_closed_form():
    # hardswish-like pieces against adaptive quadrature, for means far in both tails too.
    pieces = [(-np.inf, -3.0, 0.0, 0.0, 0.0), (-3.0, 3.0, 0.0, 0.5, 1 / 6),
              (3.0, np.inf, 0.0, 1.0, 0.0)]
    g = lambda x: x * np.clip(x + 3, 0, 6) / 6
    for mean, std in [(0.0, 1.0), (2.5, 0.3), (-7.0, 1.5), (40.0, 2.0), (0.1, 1e-6)]:
        exact = _quad(lambda w: g(mean + std * w), [(-3 - mean) / std, (3 - mean) / std])
        got = G.expect_pieces(pieces, mean, std)
        assert got == pytest.approx(exact, rel=1e-12, abs=1e-14)
    # ... and as the inner integral of expect2 (the same value as the quadrature path).
    c = np.array([-0.99, -0.2, 0.5, 0.999])
    with_pieces = G.expect2(np.tanh, g, c, kinks_g=[-3, 3], scale_g=1.7, pieces_g=pieces)
    plain = G.expect2(np.tanh, g, c, kinks_g=[-3, 3], scale_g=1.7)
    np.testing.assert_allclose(with_pieces, plain, rtol=1e-12, atol=1e-14)


def test_exponential_pieces_inner_integral_in_closed_form():
    """ELU-like pieces (k e^{r x} plus a quadratic) against adaptive quadrature, with means
    far in both tails (where e^{r mean} alone would overflow against a vanishing normal
    probability), a negative rate and a tiny std; and as expect2's inner integral."""
    pieces = [(-np.inf, 0.5, -1.3, 0.2, 0.0, 1.3, 1.7), (0.5, np.inf, 0.4, 1.0, 0.05, -0.2, -0.6)]

    def g(x):
        return np.where(x < 0.5, -1.3 + 0.2 * x + 1.3 * np.exp(1.7 * np.minimum(x, 0.5)),
                        0.4 + x + 0.05 * x * x - 0.2 * np.exp(-0.6 * np.maximum(x, 0.5)))

    for mean, std in [(0.0, 1.0), (2.5, 0.3), (-7.0, 1.5), (450.0, 2.0), (-300.0, 3.0),
                      (0.5, 1e-6), (1.0, 20.0)]:
        exact = _quad(lambda w: g(mean + std * w), [(0.5 - mean) / std])
        got = G.expect_pieces(pieces, mean, std)
        assert got == pytest.approx(exact, rel=1e-11, abs=1e-13), (mean, std)
    c = np.array([-0.99, -0.2, 0.5, 0.999, 1 - 1e-9])
    with_pieces = G.expect2(np.tanh, g, c, kinks_g=[0.5], scale_g=1.3, pieces_g=pieces)
    plain = G.expect2(np.tanh, g, c, kinks_g=[0.5], scale_g=1.3)
    np.testing.assert_allclose(with_pieces, plain, rtol=1e-12, atol=1e-14)


def test_monte_carlo_mixed_kinked_pair():
    # hardswish(u + 0.5) * tanh(2 v): no closed form. 4e6 samples with a fixed seed; the
    # tolerance is 5 standard errors of the sample mean, so a correct value fails with
    # probability ~6e-7.
    f = lambda x: x * np.clip(x + 3.5, 0, 6) / 6 + 0.5 * np.clip(x + 3.5, 0, 6) / 6
    g = lambda x: np.tanh(2 * x)
    rng = np.random.default_rng(1234)
    c = 0.6
    u = rng.standard_normal(4_000_000)
    v = c * u + np.sqrt(1 - c * c) * rng.standard_normal(u.size)
    prod = f(u) * g(v)
    got = G.expect2(f, g, c, kinks_f=[-3.5, 2.5], soft_g=[(0.0, 0.5)])
    assert abs(got - prod.mean()) < 5 * prod.std() / np.sqrt(prod.size)


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_exact", "sigmoid", "softplus", "mish",
                                  "erf"])
def test_a_wider_soft_width_keeps_full_accuracy(name):
    """silu, gelu, sigmoid and softplus bend over twice (mish and erf 1.5 times) the default
    width: panels are graded around the bend only when the input's scale narrows it below a
    panel accordingly, which halved the analysis of efficientnet_b0 at batch 16. fn, d1 and
    d2 then still integrate to ~1e-15 against a rule graded four times finer, at scales
    around where grading starts."""
    from graphshape import activations

    act = activations.get(name)
    assert act.soft_width > 1.0
    c = np.array([-0.95, -0.3, 0.0, 0.4, 0.8, 0.97, 0.999])
    for derivative in (act.fn, act.d1, act.d2):
        for scale in (0.8, 1.0 * act.soft_width, 0.99 * act.soft_width, 3.0):
            for shift in (0.0, 0.6, -1.3):
                def f(x):
                    return derivative(scale * x + shift)
                centre, width = -shift / scale, act.soft_width / scale
                got = G.expect2(f, f, c, soft_f=[(centre, width)], soft_g=[(centre, width)])
                fine = G.expect2(f, f, c, soft_f=[(centre, width / 4)],
                                 soft_g=[(centre, width / 4)])
                np.testing.assert_allclose(got, fine, rtol=3e-14, atol=3e-14)


def test_hermite_coefficients_of_the_exponential():
    """e^{s z} = e^{s^2/2} sum_n s^n He_n(z) / n!, so its orthonormal Hermite coefficients
    are e^{s^2/2} s^n / sqrt(n!), its energy E[e^{2 s z}] = e^{2 s^2}; a scale of 0 leaves
    the constant f(0). (The rule stops at |z| = 12, as the orthonormal Hermite functions
    h_n e^{-z^2/4} reach there; that is exact to rounding for the polynomially growing
    activations, and costs e^{12 s - 36} for e^{s z}: small scales here.)"""
    scales = np.array([0.0, 0.25, 0.5, 0.75])
    a, energy, tail = G.hermite_coefficients(np.exp, scales, order=60)
    n = np.arange(61)
    log_fact = special.gammaln(n + 1)
    want = np.exp(scales[:, None] ** 2 / 2 + n * np.log(np.where(scales > 0, scales, 1.0))[:, None]
                  - log_fact / 2)
    want[0, 1:] = 0.0
    # rounding: ~1e-14 of the function's norm sqrt(energy) on every coefficient
    assert np.all(np.abs(a - want) < 1e-12 * np.sqrt(np.exp(2 * scales ** 2))[:, None])
    np.testing.assert_allclose(a[1:, :4], want[1:, :4], rtol=1e-13)
    np.testing.assert_allclose(energy, np.exp(2 * scales ** 2), rtol=1e-13)
    assert np.all(np.abs(tail) < 1e-12 * energy)
    # enough=: stops at the first multiple of 16 orders where every tail is that small
    short, energy_short, tail_short = G.hermite_coefficients(np.exp, scales, enough=1e-13)
    assert short.shape[1] in (17, 33)  # e^{0.75 z}: the tail falls below 1e-13 by order 32
    np.testing.assert_array_equal(short, a[:, :short.shape[1]])
    assert np.all(tail_short <= 1e-13 * energy_short)
    assert np.any(energy_short - (short[:, :-16] ** 2).sum(1) > 1e-13 * energy_short)


def test_mehler_series_against_the_closed_form_of_the_exponential():
    # E[e^{a u} e^{b v}] = exp((a^2 + b^2 + 2 a b c) / 2)
    rng = np.random.default_rng(5)
    a, b = rng.uniform(0, 1.5, 200), rng.uniform(0, 1.5, 200)
    c = np.concatenate([rng.uniform(-1, 1, 190), C_GRID[:10]])
    got = G.expect2_same(np.exp, c, a, b)
    np.testing.assert_allclose(got, np.exp((a * a + b * b + 2 * a * b * c) / 2), rtol=1e-12)


@pytest.mark.parametrize("name,transform", [
    ("tanh", {}), ("tanh", {"input_scale": 6.0, "input_shift": 0.3}), ("gelu", {}),
    ("silu", {"input_scale": 0.4, "output_shift": -0.1}), ("elu", {}), ("selu", {}),
    ("softsign", {}), ("hardswish", {}), ("relu6", {"input_scale": 2.0})])
def test_expect2_same_equals_the_pairwise_quadrature(name, transform):
    """The Mehler series stands in for expect2 only where its truncation is provably below
    SERIES_TOL: kinked activations at |c| near 1 (elu, selu, softsign; hardswish, relu6) and
    sharp ones (tanh(6 x)) fall back to the 2-D quadrature, so every pair agrees to ~1e-10
    of sqrt(Q1 Q2). A bound that let the series through near c = 1 for elu would miss by
    ~1e-5."""
    from graphshape.kernels import local_maps

    lm = local_maps(name, transform or None)
    rng = np.random.default_rng(6)
    scales = np.sqrt(rng.uniform(0.05, 5.0, 12))
    i, j = rng.integers(0, 12, 300), rng.integers(0, 12, 300)
    c = np.concatenate([rng.uniform(-1, 1, 280), C_GRID, [0.95, 0.99, 0.999, -0.999, 0.5,
                                                          0.3, 0.9, -0.9, 0.99999]])
    kinks, soft = lm._x_kinks_soft()
    pieces = None if lm._pieces is None else lm._pieces[0]
    got = G.expect2_same(lm.fn, c, scales[i], scales[j], kinks, soft, pieces)
    want = G.expect2(lm.fn, lm.fn, c, kinks, kinks, soft, soft, scales[i], scales[j],
                     pieces_g=pieces)
    norm = np.sqrt(np.asarray(lm.q(scales[i] ** 2)) * np.asarray(lm.q(scales[j] ** 2)))
    assert np.max(np.abs(got - want) / norm) < 5e-10
