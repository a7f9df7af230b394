"""The fast paths of the shaping pipeline give what the slow ones gave.

* shape propagation on 'meta' tensors (torch frontend) gives the IR of the real forward
  pass, falls back to it where meta tensors cannot stand in, and never touches the module;
* the orthogonal draws keep their seed-to-matrix mapping, layout and distribution.
"""

import math
import warnings

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import graphshape
from graphshape import GraphshapeError, ir
from graphshape.frontends import torch_fx
from graphshape.frontends.torch_fx import load_module
from graphshape.init import haar_semi_orthogonal, initialize, suo_matrices
from graphshape.ir import Graph, Node, Ref, TensorInfo

from test_torch_ops import ACTIVATIONS, CASES, X4, Fn

pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")


# ------------------------------------------------------------------ meta shape propagation
def _signature(graph):
    """Everything the IR holds, as comparable values (parameter data included)."""
    nodes = []
    for n in graph:
        params = {k: (np.shape(v), str(np.asarray(v).dtype), np.asarray(v).tobytes())
                  for k, v in n.params.items()}
        nodes.append((n.name, n.op, tuple(n.inputs), repr(n.attrs), repr(n.outputs),
                      params, repr(n.meta)))
    return nodes, repr(graph.meta), list(graph.inputs), list(graph.output_nodes)


@pytest.fixture
def meta_spy(monkeypatch):
    """Records what each meta propagation returned (True: it stood in for the forward)."""
    calls = []
    original = torch_fx._propagate_on_meta

    def spy(gm, inputs):
        calls.append(original(gm, inputs))
        return calls[-1]

    monkeypatch.setattr(torch_fx, "_propagate_on_meta", spy)
    return calls


def _real_forward_ir(make, inputs, monkeypatch):
    """The IR as loading made it before meta propagation: always the real forward pass."""
    with monkeypatch.context() as m:
        m.setattr(torch_fx, "_propagate_on_meta", lambda gm, inputs: False)
        return _signature(load_module(make(), inputs))


def _assert_meta_gives_the_real_ir(make, inputs, monkeypatch, meta_spy):
    expected = _real_forward_ir(make, inputs, monkeypatch)
    got = _signature(load_module(make(), inputs))
    assert meta_spy == [True]  # the fast path ran and was used
    assert got == expected


TORCHVISION = ["resnet18", "resnext50_32x4d", "mobilenet_v3_small", "efficientnet_b0",
               "shufflenet_v2_x0_5", "densenet121", "convnext_tiny", "regnet_x_400mf"]


@pytest.mark.parametrize("name", TORCHVISION)
def test_meta_propagation_gives_the_ir_of_the_real_forward_torchvision(name, monkeypatch,
                                                                        meta_spy):
    def make():
        torch.manual_seed(0)  # a fresh model each time: tracing adds constants to the root
        return getattr(torchvision.models, name)(weights=None).eval()

    _assert_meta_gives_the_real_ir(make, (torch.randn(1, 3, 64, 64),), monkeypatch, meta_spy)


@pytest.mark.parametrize("case", list(CASES))
def test_meta_propagation_gives_the_ir_of_the_real_forward_ops(case, monkeypatch, meta_spy):
    module, shapes, _, _ = CASES[case]
    torch.manual_seed(1)
    inputs = tuple(torch.randn(*s) for s in shapes)
    _assert_meta_gives_the_real_ir(lambda: module.eval(), inputs, monkeypatch, meta_spy)


@pytest.mark.parametrize("case", list(ACTIVATIONS))
def test_meta_propagation_gives_the_ir_of_the_real_forward_activations(case, monkeypatch,
                                                                       meta_spy):
    fn = ACTIVATIONS[case][0]
    module = (Fn(lambda s, x: s.m(x * 1.0), m=fn) if isinstance(fn, nn.Module)
              else Fn(lambda s, x: fn(x * 1.0))).eval()
    _assert_meta_gives_the_real_ir(lambda: module, (torch.randn(*X4),), monkeypatch, meta_spy)


FALLBACKS = {
    # a value read as data
    "item": (Fn(lambda s, x: s.lin(x) * x.abs().max().item(), lin=nn.Linear(4, 4)),
             (torch.randn(3, 4),)),
    # a CPU tensor made in forward meets the (meta) activations
    "arange": (Fn(lambda s, x: s.lin(x) + torch.arange(x.shape[-1]), lin=nn.Linear(4, 4)),
               (torch.randn(3, 4),)),
    # integer inputs (indices: the real kernels check their values) are not tried on meta
    "embedding": (nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)),
                  (torch.tensor([[1, 7, 3]]),)),
    # mixed dtypes (a float64 layer in a float32 model) are not tried on meta
    "mixed_dtypes": (nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2).double()),
                     (torch.randn(3, 4),)),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_meta_propagation_falls_back_to_the_real_forward(case, monkeypatch, meta_spy):
    module, inputs = FALLBACKS[case]
    module.eval()
    if case == "mixed_dtypes":  # the real forward fails too: the same error as before
        with pytest.raises(GraphshapeError, match="example_inputs"):
            load_module(module, inputs)
        assert meta_spy == [False]
        return
    expected = _real_forward_ir(lambda: module, inputs, monkeypatch)
    got = _signature(load_module(module, inputs))
    assert meta_spy == [False]
    assert got == expected
    assert all(n.shape is not None for n in load_module(module, inputs)
               if n.op not in ("opaque", "output") and n.dtype != "object")


def test_forward_hooks_see_the_real_forward(meta_spy):
    """A hook may keep or read what it sees: models with hooks are not run on meta."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU()).eval()
    seen = []
    handle = model[0].register_forward_hook(lambda mod, args, out: seen.append(out.is_meta))
    graph = load_module(model, torch.randn(2, 4))
    handle.remove()
    assert meta_spy == [False] and seen == [False]
    assert graph["_0"].shape == (2, 3)


@pytest.mark.parametrize("model,x", [
    (nn.Linear(3, 2), torch.randn(2, 5)),  # wrong width
    (nn.Linear(3, 2), torch.randn(2, 3, dtype=torch.float64)),  # float64 into float32
    (nn.Sequential(nn.BatchNorm2d(3)), torch.randn(2, 3, 4)),  # wrong rank (BN shortcut)
    (nn.Sequential(nn.BatchNorm2d(3)), torch.randn(2, 4, 5, 5)),  # wrong channel count
    (nn.Sequential(nn.LayerNorm(4)), torch.randn(2, 4, dtype=torch.float64)),
])
def test_bad_example_inputs_are_still_the_real_forward_error(model, x):
    with pytest.raises(GraphshapeError, match="example_inputs"):
        load_module(model.eval(), x)


def test_loading_leaves_the_module_untouched():
    """The meta stand-ins are put back: same parameter and buffer objects and data, no
    meta tensors, train-mode batch norm statistics and counters unchanged."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).train()
    before = {k: (v, v.clone()) for k, v in model.state_dict(keep_vars=True).items()}
    graph = load_module(model, torch.randn(2, 3, 64, 64))
    after = model.state_dict(keep_vars=True)
    assert set(after) == set(before)
    for k, v in after.items():
        assert v is before[k][0] and not v.is_meta
        torch.testing.assert_close(v.detach(), before[k][1], rtol=0, atol=0)
    assert model.training and all(m.training for m in model.modules())
    # the IR's parameters are the module's (shared memory), not stand-ins
    conv = graph["conv1"].params["weight"]
    assert np.shares_memory(conv, model.conv1.weight.detach().numpy())


class _CachesInEval(nn.Module):
    """As timm's EfficientFormer / LeViT attention: in eval mode, a value cached on the
    module per device, ``cache[str(x.device)]`` (a Proxy's str while fx traces it), and a
    tensor constant, which fx stores on the root module as ``_tensor_constant0``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.cache = {}
        self.seen = []

    def forward(self, x):
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.lin.weight * 2
            self.seen.append(key)
        return torch.tanh(self.lin(x) @ self.cache[key]) + torch.tensor([1.0, 2.0, 3.0, 4.0])


def test_tracing_leaves_no_python_state_on_the_module():
    """Tracing ran the forward on Proxies: the model kept a Proxy of a graph that is gone
    in its cache, and loading it again failed ("referenced nonexistent value", timm's
    efficientformer_l1 shaped a second time); fx's ``_tensor_constant0`` stayed on it."""
    model = _CachesInEval().eval()
    x = torch.randn(3, 4)
    want = model(x)
    model.cache.clear(), model.seen.clear()
    attrs = dict(vars(model))
    for _ in range(2):
        graph = load_module(model, x)
        assert vars(model) == attrs  # the same objects, nothing added
        assert model.cache == {} and model.seen == []
        torch.testing.assert_close(graphshape.to_torch(graph)(x), want)
    shaped = graphshape.shape(model, x, method="DKS", seed=0)
    assert torch.isfinite(shaped(x)).all() and model.cache == {}
    torch.testing.assert_close(model(x), want)  # the model itself still runs, eagerly


def test_cache_weight_norms_is_optional():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).eval()
    ir._TAP_CACHE.clear()
    graph = load_module(model, torch.randn(1, 3, 6, 6), cache_weight_norms=False)
    weights = [n.params["weight"] for n in graph if n.op in ("conv", "linear")]
    assert len(weights) == 2 and not any(id(w) in ir._TAP_CACHE for w in weights)
    graph = load_module(model, torch.randn(1, 3, 6, 6))
    weights = [n.params["weight"] for n in graph if n.op in ("conv", "linear")]
    assert all(id(w) in ir._TAP_CACHE for w in weights)


def test_onnx_loads_read_weight_norms_too(tmp_path, monkeypatch):
    """ONNX files fill the weight-norm cache at load as PyTorch models do (the first
    analysis then does not read every weight), except when shaping, which replaces the
    weights: shape_onnx and the CLI's shape load without it."""
    pytest.importorskip("onnx")
    import graphshape
    from graphshape.frontends import onnx_import

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 2)).eval()
    path = str(tmp_path / "m.onnx")
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 6, 6),), path, dynamo=False)

    def weights(graph):
        return [n.params["weight"] for n in graph if n.op in ("conv", "linear")]

    ir._TAP_CACHE.clear()
    loaded = weights(graphshape.load(path))
    assert len(loaded) == 2 and all(id(w) in ir._TAP_CACHE for w in loaded)
    ir._TAP_CACHE.clear()
    assert not any(id(w) in ir._TAP_CACHE
                   for w in weights(graphshape.load(path, cache_weight_norms=False)))
    seen = []
    original = onnx_import.load_onnx  # shape_onnx imports it when called

    def spy(src, **kwargs):
        seen.append(kwargs.get("cache_weight_norms", True))
        return original(src, **kwargs)

    monkeypatch.setattr(onnx_import, "load_onnx", spy)
    graphshape.shape_onnx(path, str(tmp_path / "shaped.onnx"), method="DKS", seed=0)
    from graphshape.cli import main

    assert main(["shape", path, "-o", str(tmp_path / "cli.onnx"), "--method", "DKS"]) == 0
    assert seen == [False, False]


# ------------------------------------------------------------------ orthogonal draws
def _stewart_reference(x: np.ndarray) -> np.ndarray:
    """Q, with R's diagonal made positive, from the Householder reflectors of the columns
    of the (tall, short) Gaussian matrix ``x`` (Stewart's draw), one reflector at a time."""
    tall, short = x.shape
    q = np.eye(tall)[:, :short]
    signs = []
    for j in reversed(range(short)):  # Q = H_0 H_1 ... H_{short-1} [I; 0]
        col = x[j:, j]
        alpha = col[0]
        sign = 1.0 if alpha >= 0 else -1.0
        beta = -sign * np.linalg.norm(col)
        v = np.concatenate([[1.0], col[1:] / (alpha - beta)])
        tau = (beta - alpha) / beta
        q[j:] -= tau * np.outer(v, v @ q[j:])
        signs.append(-sign)
    return q * np.array(signs[::-1])


@pytest.mark.parametrize("rows,cols", [(7, 19), (19, 7), (12, 12)])
def test_draws_are_stewarts_householder_qr_of_the_seeds_gaussians(rows, cols):
    """One seed keeps giving the same matrices: the sign-corrected Householder Q of the
    (tall, short) Gaussian matrices whose columns the seed's torch generator draws as the
    rows of a float32 (short, tall) array, as C-contiguous arrays (orthonormal rows when
    rows < cols)."""
    batch, tall, short = 3, max(rows, cols), min(rows, cols)
    q = haar_semi_orthogonal(batch, rows, cols, np.random.default_rng(5))
    assert q.shape == (batch, rows, cols) and q.dtype == np.float64 and q.flags.c_contiguous
    seed = int(np.random.default_rng(5).integers(0, 2**63 - 1))
    x = torch.randn((batch, short, tall), generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float32).mT.double().numpy()
    for b in range(batch):
        ref = _stewart_reference(x[b])
        np.testing.assert_allclose(q[b], ref if rows >= cols else ref.T, atol=1e-12)
    s = suo_matrices(batch, rows, cols, np.random.default_rng(5))
    np.testing.assert_allclose(s, q * max(1.0, math.sqrt(rows / cols)), rtol=1e-14)
    # for float32 weights: the same matrices, factorized in float32
    s32 = suo_matrices(batch, rows, cols, np.random.default_rng(5), float32=True)
    assert s32.dtype == np.float32 and s32.flags.c_contiguous
    np.testing.assert_allclose(s32, s, atol=1e-5)


def test_wide_draws_have_the_haar_distribution():
    """Orthonormal rows (rows < cols) come from the transposed Householder layout: their
    entries are distributed like the rows of a sign-corrected QR's Q (KS tests)."""
    from scipy.stats import ks_2samp

    n, rows, cols = 4000, 3, 5
    ours = haar_semi_orthogonal(n, rows, cols, np.random.default_rng(31))
    g = np.random.default_rng(32).standard_normal((n, cols, rows))
    q, r = np.linalg.qr(g)
    ref = np.swapaxes(q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :], 1, 2)
    for i, j in ((0, 0), (2, 2), (0, 4), (2, 1)):
        assert ks_2samp(ours[:, i, j], ref[:, i, j]).pvalue > 1e-3
    trace = lambda m: np.trace(m[:, :, :rows], axis1=1, axis2=2)  # noqa: E731
    assert ks_2samp(trace(ours), trace(ref)).pvalue > 1e-3


def _affine_graph():
    g = Graph({"source": "torch"})
    g.add(Node("x", "input", attrs={"name": "x"},
               outputs=[TensorInfo((1, 8, 5, 5), "float32")]))
    conv = dict(dims=2, kernel_shape=(1, 1), stride=(1, 1), pads=(0, 0, 0, 0), dilation=(1, 1))
    # a grouped 1x1 conv (4 groups of 6x2: orthonormal columns), a 1x1 conv narrowing
    # 24 -> 5 (orthonormal rows), then a linear widening 125 -> 300
    g.add(Node("c1", "conv", [Ref("x")], attrs={**conv, "in_channels": 8, "out_channels": 24,
                                                 "groups": 4},
               params={"weight": np.ones((24, 2, 1, 1), np.float32)}))
    g.add(Node("c2", "conv", [Ref("c1")], attrs={**conv, "in_channels": 24, "out_channels": 5,
                                                  "groups": 1},
               params={"weight": np.ones((5, 24, 1, 1), np.float64)}))
    g.add(Node("flat", "flatten", [Ref("c2")], attrs={"start_dim": 1, "end_dim": -1}))
    g.add(Node("fc", "linear", [Ref("flat")], attrs={"in_features": 125, "out_features": 300},
               params={"weight": np.ones((300, 125), np.float32)}))
    g.add(Node("out", "output", [Ref("fc")], attrs={"name": "out"}))
    return g


def test_initialize_takes_stacked_matrices_as_they_are():
    """1x1 convs of any groups and linear layers get their stacked matrices' memory
    (C order, the weight's dtype), each group semi-orthogonal and SUO-scaled."""
    new, report = initialize(_affine_graph(), seed=3)
    w1 = new["c1"].params["weight"]
    assert w1.dtype == np.float32 and w1.flags.c_contiguous and w1.shape == (24, 2, 1, 1)
    for gi in range(4):  # each group: 6x2 with orthonormal columns, times sqrt(6/2)
        m = w1[gi * 6:(gi + 1) * 6, :, 0, 0].astype(np.float64) / math.sqrt(3)
        assert np.max(np.abs(m.T @ m - np.eye(2))) <= 1e-6
    w2 = new["c2"].params["weight"]  # float64 weight: 5x24, orthonormal rows
    assert w2.dtype == np.float64 and w2.flags.c_contiguous
    assert np.max(np.abs(w2[:, :, 0, 0] @ w2[:, :, 0, 0].T - np.eye(5))) <= 1e-12
    fc = new["fc"].params["weight"]
    assert fc.dtype == np.float32 and fc.flags.c_contiguous
    fc = fc.astype(np.float64) / math.sqrt(300 / 125)
    assert np.max(np.abs(fc.T @ fc - np.eye(125))) <= 1e-6
    assert [r["scheme"] for r in report.records] == ["delta_orthogonal", "delta_orthogonal",
                                                     "suo"]
