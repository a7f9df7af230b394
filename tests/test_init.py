"""graphshape.init: SUO and delta-orthogonal initialization."""

import math

import numpy as np
import pytest

from graphshape import GraphshapeError
from graphshape.init import (delta_orthogonal, haar_semi_orthogonal, initialize, suo, suo_,
                             suo_matrices)
from graphshape.ir import Graph, Node, Ref, TensorInfo


@pytest.mark.parametrize("rows,cols", [(8, 8), (5, 12), (12, 5), (1, 1), (64, 3)])
def test_suo_is_scaled_semi_orthogonal(rows, cols):
    w = suo((rows, cols), np.random.default_rng(0), "float64")
    scale = max(1.0, math.sqrt(rows / cols))
    m = w / scale
    if rows <= cols:  # orthonormal rows
        np.testing.assert_allclose(m @ m.T, np.eye(rows), atol=1e-12)
    else:  # orthonormal columns
        np.testing.assert_allclose(m.T @ m, np.eye(cols), atol=1e-12)


def test_suo_preserves_q_exactly_when_widening():
    """fan_out > fan_in: |Wx|^2/fan_out == |x|^2/fan_in exactly (the SUO scale)."""
    rng = np.random.default_rng(1)
    w = suo((48, 16), rng, "float64")
    x = rng.standard_normal((16, 7))
    q_in = (x ** 2).mean(axis=0)
    q_out = ((w @ x) ** 2).mean(axis=0)
    np.testing.assert_allclose(q_out, q_in, rtol=1e-12)


def test_haar_distribution_is_sign_uniform():
    """Sign correction by R's diagonal: the diagonal entries of Haar matrices have mean 0
    (plain LAPACK QR would bias them)."""
    q = haar_semi_orthogonal(4000, 3, 3, np.random.default_rng(2))
    diag = np.diagonal(q, axis1=1, axis2=2)
    # each diagonal entry has variance 1/3: the mean of 4000 has sd ~0.009
    assert np.all(np.abs(diag.mean(axis=0)) < 0.04)
    np.testing.assert_allclose(np.einsum("bij,bkj->bik", q, q), np.broadcast_to(np.eye(3), q.shape),
                               atol=1e-12)


def test_suo_inplace_on_numpy_and_torch():
    torch = pytest.importorskip("torch")
    a = np.zeros((6, 10), dtype=np.float32)
    suo_(a, np.random.default_rng(3))
    np.testing.assert_allclose(a @ a.T, np.eye(6), atol=1e-5)
    t = torch.zeros(10, 6)
    suo_(t, np.random.default_rng(3))
    s = math.sqrt(10 / 6)
    np.testing.assert_allclose((t.T @ t).numpy() / s ** 2, np.eye(6), atol=1e-5)


@pytest.mark.parametrize("out_ch,in_ch,k", [(16, 16, 3), (32, 8, 3), (8, 32, 5), (4, 4, 1)])
def test_delta_orthogonal_structure(out_ch, in_ch, k):
    w = delta_orthogonal((out_ch, in_ch, k, k), 1, np.random.default_rng(4), dtype="float64")
    c = k // 2
    centre = w[:, :, c, c]
    off = w.copy()
    off[:, :, c, c] = 0
    assert np.all(off == 0)
    scale = max(1.0, math.sqrt(out_ch / in_ch))
    m = centre / scale
    if out_ch <= in_ch:
        np.testing.assert_allclose(m @ m.T, np.eye(out_ch), atol=1e-12)
    else:
        np.testing.assert_allclose(m.T @ m, np.eye(in_ch), atol=1e-12)


def test_delta_orthogonal_per_group():
    """Grouped conv (out=12, in=8, groups=4): each group's centre tap is an SUO 3x2 matrix."""
    groups, out_ch, in_ch = 4, 12, 8
    w = delta_orthogonal((out_ch, in_ch // groups, 3, 3), groups, np.random.default_rng(5),
                         dtype="float64")
    for g in range(groups):
        m = w[g * 3:(g + 1) * 3, :, 1, 1] / math.sqrt(3 / 2)
        np.testing.assert_allclose(m.T @ m, np.eye(2), atol=1e-12)
    # depthwise: each channel's centre tap is +-1, the rest zero
    dw = delta_orthogonal((6, 1, 3, 3), 6, np.random.default_rng(6), dtype="float64")
    np.testing.assert_allclose(np.abs(dw[:, 0, 1, 1]), 1.0)
    assert np.count_nonzero(dw) == 6


def test_even_kernel_falls_back_to_suo_over_fan_in():
    w = delta_orthogonal((8, 4, 2, 2), 1, np.random.default_rng(7), dtype="float64")
    flat = w.reshape(8, 16)
    np.testing.assert_allclose(flat @ flat.T, np.eye(8), atol=1e-12)


def test_conv_transpose_layout():
    """conv_transpose weights are (in, out/groups, *k): the centre tap transposed is the
    (out, in) SUO matrix, so widening 8 -> 24 is exactly q-preserving."""
    w = delta_orthogonal((8, 24, 3, 3), 1, np.random.default_rng(8), transpose=True,
                         dtype="float64")
    m = w[:, :, 1, 1].T  # (out, in)
    np.testing.assert_allclose(m.T @ m / 3.0, np.eye(8), atol=1e-12)


def test_q_preserved_through_deep_delta_orthogonal_conv_stack():
    """Delta-orthogonal convs with changing widths (the dks layout bug would multiply q by
    in/out at each): q per location is preserved exactly on widening or equal widths and
    in expectation on narrowing; checked with torch's conv2d."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    widths = [16, 16, 32, 32, 64, 64, 64, 128]
    x = torch.randn(2, widths[0], 9, 9, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(9))
    q0 = x.pow(2).mean(dim=1)  # per location
    # widths narrow once (128 -> 16): that step preserves q in expectation over draws only
    # (one draw: the sum over 16 of 128 random directions), so average 200 draws of it
    h = x
    for cin, cout in zip(widths[:-1], widths[1:]):
        w = torch.from_numpy(delta_orthogonal((cout, cin, 3, 3), 1, rng, dtype="float64"))
        h = torch.nn.functional.conv2d(h, w, padding=1)
    narrowing = torch.from_numpy(suo_matrices(200, 16, 128, rng))  # (draw, out, in)
    q_narrowed = torch.einsum("doi,bihw->dbohw", narrowing, h).pow(2).mean(dim=2)
    ratios = (q_narrowed.mean(dim=(1, 2, 3)) / q0.mean()).numpy()
    assert abs(ratios.mean() - 1) < 0.1, ratios.mean()
    assert ratios.std() > 0.05  # one draw alone does not preserve q: the average matters
    # a stack that never narrows preserves q at every location exactly
    h = x
    for cin, cout in zip([16, 16, 32, 48], [16, 32, 48, 48]):
        w = torch.from_numpy(delta_orthogonal((cout, cin, 3, 3), 1, rng, dtype="float64"))
        h = torch.nn.functional.conv2d(h, w, padding=1)
    torch.testing.assert_close(h.pow(2).mean(dim=1), q0, rtol=1e-10, atol=1e-12)


def _tiny_graph():
    g = Graph({"source": "torch"})
    g.add(Node("x", "input", attrs={"name": "x"}, outputs=[TensorInfo((1, 4, 5, 5), "float32")]))
    g.add(Node("conv1", "conv", [Ref("x")],
               attrs={"dims": 2, "in_channels": 4, "out_channels": 8, "kernel_shape": (3, 3),
                      "stride": (1, 1), "pads": (1, 1, 1, 1), "dilation": (1, 1), "groups": 2},
               params={"weight": np.ones((8, 2, 3, 3), np.float32),
                       "bias": np.ones(8, np.float32)}))
    g.add(Node("conv2", "conv", [Ref("conv1")],
               attrs={"dims": 2, "in_channels": 8, "out_channels": 8, "kernel_shape": (3, 3),
                      "stride": (1, 1), "pads": (1, 1, 1, 1), "dilation": (1, 1), "groups": 1},
               params={"weight": np.ones((8, 8, 3, 3), np.float32)}))
    g.add(Node("flat", "flatten", [Ref("conv2")], attrs={"start_dim": 1, "end_dim": -1}))
    g.add(Node("fc", "linear", [Ref("flat")], attrs={"in_features": 200, "out_features": 10},
               params={"weight": np.ones((10, 200), np.float32),
                       "bias": np.ones(10, np.float32)}))
    g.add(Node("out", "output", [Ref("fc")], attrs={"name": "out"}))
    return g


def test_initialize_pass():
    g = _tiny_graph()
    new, report = initialize(g, seed=0)
    # the input graph is untouched
    assert np.all(g["conv1"].params["weight"] == 1)
    assert {r["node"]: r["scheme"] for r in report.records} == {
        "conv1": "delta_orthogonal", "conv2": "delta_orthogonal", "fc": "suo"}
    assert np.all(new["conv1"].params["bias"] == 0) and np.all(new["fc"].params["bias"] == 0)
    assert new["conv1"].params["weight"].dtype == np.float32
    w1 = new["conv1"].params["weight"].astype(np.float64)
    for gi in range(2):
        m = w1[gi * 4:(gi + 1) * 4, :, 1, 1] / math.sqrt(2)  # 4x2 per group
        np.testing.assert_allclose(m.T @ m, np.eye(2), atol=1e-6)
    fc = new["fc"].params["weight"].astype(np.float64)
    np.testing.assert_allclose(fc @ fc.T, np.eye(10), atol=1e-6)


def test_initialize_skips_the_named_nodes():
    g = _tiny_graph()
    new, report = initialize(g, seed=0, skip=["conv2"])
    assert [r["node"] for r in report.records] == ["conv1", "fc"]
    assert np.all(new["conv2"].params["weight"] == 1)
    assert not np.all(new["conv1"].params["weight"] == 1)
    assert np.all(g["conv1"].params["weight"] == 1)  # the input graph is untouched


def test_initialize_is_deterministic_with_seed():
    g = _tiny_graph()
    a, _ = initialize(g, seed=42)
    b, _ = initialize(g, seed=42)
    c, _ = initialize(g, seed=43)
    for name in ("conv1", "conv2", "fc"):
        np.testing.assert_array_equal(a[name].params["weight"], b[name].params["weight"])
    assert not np.array_equal(a["fc"].params["weight"], c["fc"].params["weight"])


def test_initialize_refuses_a_weightless_affine_node():
    g = _tiny_graph()
    del g["fc"].params["weight"]
    with pytest.raises(GraphshapeError, match="fc"):
        initialize(g, seed=0)


def _graph_with_repeated_shapes():
    """_tiny_graph plus conv3, whose matrix shape (8x8) is conv2's."""
    g = _tiny_graph()
    g.add(Node("conv3", "conv", [Ref("conv2")],
               attrs={"dims": 2, "in_channels": 8, "out_channels": 8, "kernel_shape": (1, 1),
                      "stride": (1, 1), "pads": (0, 0, 0, 0), "dilation": (1, 1), "groups": 1},
               params={"weight": np.ones((8, 8, 1, 1), np.float32)}))
    g["flat"].inputs = [Ref("conv3")]
    return g


def test_one_stacked_draw_per_matrix_shape(monkeypatch):
    """All groups of a grouped conv and all same-shape layers come from one stacked
    factorization: conv1's two 4x2 groups in one call, conv2 and conv3 (8x8) in one."""
    from graphshape import init

    calls = []
    seeded_stack = init._seeded_stack

    def counting(batch, rows, cols, *args, **kwargs):
        calls.append((batch, rows, cols))
        return seeded_stack(batch, rows, cols, *args, **kwargs)

    monkeypatch.setattr(init, "_seeded_stack", counting)
    new, report = initialize(_graph_with_repeated_shapes(), seed=0)
    assert sorted(calls) == [(1, 10, 200), (2, 4, 2), (2, 8, 8)]
    assert [r["node"] for r in report.records] == ["conv1", "conv2", "fc", "conv3"]
    w2 = new["conv2"].params["weight"][:, :, 1, 1].astype(np.float64)
    w3 = new["conv3"].params["weight"][:, :, 0, 0].astype(np.float64)
    for w in (w2, w3):  # two different orthogonal matrices from the one stack
        np.testing.assert_allclose(w @ w.T, np.eye(8), atol=1e-5)
    assert not np.allclose(w2, w3)


@pytest.mark.parametrize("threads", [2, 3])
def test_weights_do_not_depend_on_the_thread_count(monkeypatch, threads):
    """Stacks are drawn on torch.get_num_threads() threads, each from its own seed taken
    in a fixed order: a seed gives the same weights on any number of threads."""
    from graphshape import init

    one, _ = initialize(_graph_with_repeated_shapes(), seed=4)
    monkeypatch.setattr(init, "_thread_count", lambda tasks: min(threads, tasks))
    many, _ = initialize(_graph_with_repeated_shapes(), seed=4)
    for name in ("conv1", "conv2", "conv3", "fc"):
        np.testing.assert_array_equal(one[name].params["weight"], many[name].params["weight"])


def test_threaded_draws_leave_torch_thread_settings_alone():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    initialize(_graph_with_repeated_shapes(), seed=0)
    assert torch.get_num_threads() == before


def test_even_kernel_conv_transpose_upsampling_preserves_q_exactly():
    """k = stride = 2: every output location is one tap's (out x in) SUO matrix times one
    input location, so widening 8 -> 16 channels keeps q exactly at every location."""
    torch = pytest.importorskip("torch")
    w = delta_orthogonal((8, 16, 2, 2), 1, np.random.default_rng(10), transpose=True,
                         stride=(2, 2), dtype="float64")
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    y = torch.nn.functional.conv_transpose2d(x, torch.from_numpy(w), stride=2)
    q_in = x.pow(2).mean(dim=1)
    q_out = y.pow(2).mean(dim=1)  # (2, 10, 10): each 2x2 block comes from one input location
    torch.testing.assert_close(q_out, q_in.repeat_interleave(2, 1).repeat_interleave(2, 2),
                               rtol=1e-10, atol=1e-12)


def test_large_stacked_draws_are_float32_accurate_and_reproducible():
    """Stacks above _FLOAT32_ABOVE entries are factorized in float32 (the fast path for
    ResNet-size layers): still orthonormal to 1e-5, Haar (sign-corrected), and one seed gives
    one set of weights."""
    from graphshape import init

    rows, cols = 300, 1200
    assert 3 * rows * cols > init._FLOAT32_ABOVE
    q = haar_semi_orthogonal(3, rows, cols, np.random.default_rng(11))
    assert q.dtype == np.float32 and q.shape == (3, rows, cols)
    gram = np.einsum("bij,bkj->bik", q.astype(np.float64), q.astype(np.float64))
    assert np.max(np.abs(gram - np.eye(rows))) <= 1e-5
    again = haar_semi_orthogonal(3, rows, cols, np.random.default_rng(11))
    np.testing.assert_array_equal(q, again)
    other = haar_semi_orthogonal(3, rows, cols, np.random.default_rng(12))
    assert np.max(np.abs(q - other)) > 0.05
    # columns of a tall stack: orthonormal columns, SUO-scaled
    tall = suo_matrices(2, 1200, 400, np.random.default_rng(13))
    gram = np.einsum("bji,bjk->bik", tall.astype(np.float64), tall.astype(np.float64)) / 3.0
    assert np.max(np.abs(gram - np.eye(400))) <= 1e-5


@pytest.mark.parametrize("rows,cols", [(4, 4), (6, 3)])
def test_householder_draw_has_the_distribution_of_sign_corrected_qr(rows, cols):
    """The draw skips the factorization (Stewart's method); its matrices must be distributed
    like Q of a sign-corrected QR of a Gaussian matrix (Haar): two-sample KS tests on
    entries and on the trace-like sum of the diagonal."""
    from scipy.stats import ks_2samp

    n = 4000
    ours = haar_semi_orthogonal(n, rows, cols, np.random.default_rng(21))
    g = np.random.default_rng(22).standard_normal((n, rows, cols))
    q, r = np.linalg.qr(g)
    ref = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]
    for stat in (lambda m: m[:, 0, 0], lambda m: m[:, -1, -1], lambda m: m[:, 0, -1],
                 lambda m: np.trace(m[:, :cols, :cols], axis1=1, axis2=2)):
        assert ks_2samp(stat(ours), stat(ref)).pvalue > 1e-3
    # and not like plain LAPACK QR (positive-diagonal bias missing): the test has power
    biased = q
    assert ks_2samp(np.trace(ours[:, :cols, :cols], axis1=1, axis2=2),
                    np.trace(biased[:, :cols, :cols], axis1=1, axis2=2)).pvalue < 1e-6
