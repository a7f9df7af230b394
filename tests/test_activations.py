"""The activation registry: names, formulas (dks's and PyTorch's), derivatives, kinks."""

import numpy as np
import pytest

from graphshape import GraphshapeError
from graphshape import activations as A

EXTRA = ["silu", "mish", "hardswish", "hardsigmoid", "relu6", "hardtanh"]
X = np.concatenate([np.linspace(-7.3, 7.1, 301), [-3.0, -1.0, 0.0, 1.0, 3.0, 6.0]])


def test_registry_has_every_dks_name_and_the_torch_extras():
    assert set(A.DKS_NAMES) | set(EXTRA) <= set(A.names())
    assert A.names() == sorted(A.names())


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(GraphshapeError) as info:
        A.get("swishy")
    message = str(info.value)
    assert "swishy" in message
    for name in ("tanh", "leaky_relu", "hardswish"):
        assert name in message


def test_default_and_unknown_attributes():
    assert A.get("leaky_relu").attrs() == {"negative_slope": 0.01}
    assert A.get("hardtanh").attrs(max_val=2.0) == {"min_val": -1.0, "max_val": 2.0}
    assert A.get("hardtanh").kink_points(min_val=-2.0, max_val=0.5) == (-2.0, 0.5)
    with pytest.raises(GraphshapeError, match="negative_slope"):
        A.get("tanh").attrs(negative_slope=0.1)


@pytest.mark.parametrize("name", A.DKS_NAMES)
def test_same_values_as_dks(name):
    getter = pytest.importorskip("dks.base.activation_getter")
    expected = np.asarray(getter.get_activation_function(name)(X), dtype=float)
    np.testing.assert_allclose(A.get(name).fn(X), expected, rtol=1e-13, atol=1e-15)


TORCH_FORMS = {
    "silu": lambda F, t: F.silu(t), "swish": lambda F, t: F.silu(t),
    "mish": lambda F, t: F.mish(t), "hardswish": lambda F, t: F.hardswish(t),
    "hardsigmoid": lambda F, t: F.hardsigmoid(t), "relu6": lambda F, t: F.relu6(t),
    "hardtanh": lambda F, t: F.hardtanh(t), "gelu": lambda F, t: F.gelu(t, approximate="tanh"),
    "gelu_exact": lambda F, t: F.gelu(t), "elu": lambda F, t: F.elu(t),
    "selu": lambda F, t: F.selu(t), "softplus": lambda F, t: F.softplus(t, threshold=1e9),
    "leaky_relu": lambda F, t: F.leaky_relu(t), "relu": lambda F, t: F.relu(t),
    "softsign": lambda F, t: F.softsign(t), "sigmoid": lambda F, t: F.sigmoid(t),
}


@pytest.mark.parametrize("name", sorted(TORCH_FORMS))
def test_same_values_as_pytorch(name):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    expected = TORCH_FORMS[name](F, torch.tensor(X, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(A.get(name).fn(X), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", A.names())
def test_derivatives_match_finite_differences_away_from_kinks(name):
    act = A.get(name)
    x = np.linspace(-6.9, 6.7, 157)
    kinks = np.asarray(act.kink_points())
    if kinks.size:
        x = x[np.min(np.abs(x[:, None] - kinks[None, :]), axis=1) > 1e-3]
    h = 1e-5
    # Central differences: error ~ h^2 f''' / 6 (truncation) + eps |f| / h (rounding).
    np.testing.assert_allclose(act.d1(x), (act.fn(x + h) - act.fn(x - h)) / (2 * h),
                               rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(act.d2(x), (act.d1(x + h) - act.d1(x - h)) / (2 * h),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", A.names())
def test_kinks_and_smoothness_flags(name):
    act = A.get(name)
    eps = 1e-9
    jumps = act.d1_jumps()
    assert len(jumps) == len(act.kink_points())
    for k, jump in zip(act.kink_points(), jumps):
        # fn is continuous everywhere; d1 jumps by the declared amount at each kink.
        assert abs(act.fn(k + eps) - act.fn(k - eps)) < 1e-8
        assert act.d1(k + eps) - act.d1(k - eps) == pytest.approx(jump, abs=1e-6)
    assert act.is_differentiable() == act.differentiable
    if act.smooth:
        assert act.kink_points() == () and act.differentiable


@pytest.mark.parametrize("name,attrs", [(n, {}) for n in A.names() if A.get(n).pieces_fn]
                         + [("leaky_relu", {"negative_slope": 0.3}),
                            ("hardtanh", {"min_val": -0.5, "max_val": 2.0}),
                            ("elu", {"alpha": 0.3})])
def test_pieces_reproduce_the_function(name, attrs):
    act = A.get(name)
    pieces = act.pieces(**attrs)
    assert [p[0] for p in pieces[1:]] == [p[1] for p in pieces[:-1]]  # contiguous
    assert pieces[0][0] == -np.inf and pieces[-1][1] == np.inf
    expected = act.fn(X, **attrs)
    got = np.full_like(X, np.nan)
    for lo, hi, c0, c1, c2, k, r in pieces:
        inside = (X >= lo) & (X < hi)
        got[inside] = c0 + c1 * X[inside] + c2 * X[inside] ** 2 + k * np.exp(r * X[inside])
    np.testing.assert_allclose(got, expected, atol=1e-14)


@pytest.mark.parametrize("name", [n for n in A.names() if A.get(n).point_symmetry is not None])
def test_point_symmetry(name):
    act = A.get(name)
    m = act.point_symmetry
    np.testing.assert_allclose(act.fn(-X), 2 * m - act.fn(X), atol=1e-14)
