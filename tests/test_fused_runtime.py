"""The torch backend's cheaper transformed activations and weighted sums (runtime issue #6)
compute exactly the straightforward formulas: values, gradients w.r.t. the input and every
parameter, double backward; they overwrite an input only where nothing else reads it."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
import torch

from graphshape import GraphshapeError
from graphshape import torch_modules as tm
from graphshape.backend_torch import emit
from graphshape.ir import Graph, Node, Ref, TensorInfo


def _formula(name, attrs, t, x):
    """output_scale * (phi(input_scale * x + input_shift) + output_shift), term by term."""
    z = t.get("input_scale", 1.0) * x + t.get("input_shift", 0.0)
    return t.get("output_scale", 1.0) * (tm.ACTIVATION_FUNCTIONS[name](z, **attrs)
                                         + t.get("output_shift", 0.0))


@contextlib.contextmanager
def _float64_default():
    """Modules built here hold their transform constants in float64 (not rounded to
    float32), so that they can be compared with the float64 formula at 1e-12."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _exact_constants(model):
    """Give every TransformedActivation of a float64 model float64 constants."""
    for m in model.modules():
        if isinstance(m, tm.TransformedActivation):
            with _float64_default():
                fresh = tm.TransformedActivation(m.name, m.transform, **m.attrs)
            for key, value in fresh.named_buffers():
                setattr(m, key, value)
    return model


def _plain_sum(weights, xs):
    return sum(w * x for w, x in zip(weights, xs))


# (name, attrs, transform, takes the one-Function path)
ACTIVATION_CASES = [
    ("relu", {}, {"input_scale": 0.46, "input_shift": 1.0, "output_shift": -1.0,
                  "output_scale": 2.19}, True),  # DKS ResNet-50's relu
    ("relu", {}, {"input_scale": 1.3}, True),
    ("relu", {}, {"input_scale": -1.3, "output_scale": 0.9, "input_shift": 0.2}, False),
    ("relu", {}, {"input_scale": 1.3, "output_scale": -0.9, "output_shift": 0.1}, False),
    ("leaky_relu", {"negative_slope": 0.32}, {"output_scale": 1.35}, True),  # TAT's
    ("leaky_relu", {"negative_slope": 0.1}, {"input_scale": 0.7, "input_shift": -0.3,
                                             "output_scale": 1.2}, True),
    ("leaky_relu", {"negative_slope": 0.1}, {"input_scale": 0.7, "output_shift": 0.4}, False),
    ("leaky_relu", {"negative_slope": 0.1}, {"input_scale": -0.7, "output_scale": 1.1}, False),
    ("leaky_relu", {"negative_slope": -0.2}, {"input_scale": 1.5}, False),
    ("softplus", {}, {"input_scale": 1.3, "input_shift": 0.2, "output_shift": -0.4,
                      "output_scale": 0.9}, False),
    ("softplus", {}, {"input_scale": -0.8, "output_scale": -1.1}, False),
]


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("name,attrs,t,fused", ACTIVATION_CASES)
def test_transformed_activation_equals_the_formula(name, attrs, t, fused, grad, overwrite):
    with _float64_default():
        mod = tm.TransformedActivation(name, t, overwrite_input=overwrite, **attrs)
    assert (mod._fused is not None) == fused
    gen = torch.Generator().manual_seed(0)
    leaf = torch.randn(4, 6, 5, dtype=torch.float64, generator=gen, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        x = leaf * 1.0  # a fresh non-leaf, as a conv output is
        got = mod(x)
        want = _formula(name, attrs, t, leaf.detach().clone().requires_grad_(grad))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if fused and overwrite:
        assert got.data_ptr() == x.data_ptr()  # written over its input
    if not overwrite:
        torch.testing.assert_close(x, leaf.detach())  # input untouched
    if grad:
        v = torch.randn(got.shape, dtype=torch.float64, generator=gen)
        (g_got,) = torch.autograd.grad(got, leaf, v)
        leaf_ref = leaf.detach().clone().requires_grad_()
        (g_want,) = torch.autograd.grad(_formula(name, attrs, t, leaf_ref), leaf_ref, v)
        torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,attrs,t", [(n, a, t) for n, a, t, fused in ACTIVATION_CASES if fused])
def test_fused_activation_gradcheck_and_double_backward(name, attrs, t):
    with _float64_default():
        mod = tm.TransformedActivation(name, t, **attrs)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, dtype=torch.float64, generator=gen)
    # keep inputs away from the kink, where finite differences are exact
    kink = (t.get("input_shift", 0.0) * -1.0) / t.get("input_scale", 1.0)
    x = torch.where((x - kink).abs() < 0.05, x + 0.2, x).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: mod(z * 1.0), (x,))
    assert torch.autograd.gradgradcheck(lambda z: mod(z * 1.0), (x,))
    # double backward through the output's gradient, as a gradient penalty does
    y = mod(x * 1.0)
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    xr = x.detach().clone().requires_grad_()
    yr = _formula(name, attrs, t, xr)
    (gr,) = torch.autograd.grad(yr.square().sum(), xr, create_graph=True)
    (ggr,) = torch.autograd.grad(gr.sum(), xr)
    torch.testing.assert_close(gg, ggr, rtol=1e-12, atol=1e-12)


def test_transformed_activation_state_dict_does_not_depend_on_overwrite():
    t = {"input_scale": 0.46, "input_shift": 1.0, "output_shift": -1.0, "output_scale": 2.19}
    a = tm.TransformedActivation("relu", t).state_dict()
    b = tm.TransformedActivation("relu", t, overwrite_input=True).state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("overwrite", [None, 0, 1, 2])
@pytest.mark.parametrize("weights", [(0.714, 0.7, -0.3), (1.0, 0.5, 2.0), None])
def test_weighted_sum_equals_the_formula(weights, overwrite):
    gen = torch.Generator().manual_seed(2)
    leaves = [torch.randn(2, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
              for _ in range(3)]
    xs = [leaf * 1.0 for leaf in leaves]
    got = tm.WeightedSum(weights, overwrite_input=overwrite)(*xs)
    w = weights or (1.0, 1.0, 1.0)
    want = _plain_sum(w, [leaf.detach() for leaf in leaves])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for i, (x, leaf) in enumerate(zip(xs, leaves)):
        if i != overwrite:  # only the input it may overwrite changes
            torch.testing.assert_close(x, leaf.detach())
    v = torch.randn(got.shape, dtype=torch.float64, generator=gen)
    grads = torch.autograd.grad(got, leaves, v)
    for g, wi in zip(grads, w):
        torch.testing.assert_close(g, wi * v, rtol=1e-12, atol=1e-12)


def test_weighted_sum_broadcasts_out_of_place():
    x = torch.randn(2, 3, 1, 1, dtype=torch.float64)
    y = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    x0 = x.clone()
    got = tm.WeightedSum((0.5, 2.0), overwrite_input=0)(x, y)
    torch.testing.assert_close(got, 0.5 * x0 + 2.0 * y)
    torch.testing.assert_close(x, x0)


# ------------------------------------------------------------------ emission
def _conv_node(name, src, seed):
    rng = np.random.default_rng(seed)
    return Node(name, "conv", [Ref(src)], {"dims": 2, "pads": (1, 1, 1, 1)},
                {"weight": rng.standard_normal((4, 4, 3, 3)).astype(np.float32) / 6,
                 "bias": rng.standard_normal(4).astype(np.float32)})


RELU_T = {"input_scale": 0.46, "input_shift": 1.0, "output_shift": -1.0, "output_scale": 2.19}


def _block_graph():
    """x -> conv a -> act1 (a read by act1 and by the sum: shared) -> conv b -> act2
    (b read only by act2) -> sum(a, act2 output, x) -> act3; x also read by conv a."""
    g = Graph({"source": "torch"})
    g.add(Node("x", "input", [], outputs=[TensorInfo((2, 4, 5, 5), "float32")]))
    g.add(_conv_node("a", "x", 0))
    g.add(Node("act1", "activation", [Ref("a")], {"name": "relu", "transform": RELU_T}))
    g.add(_conv_node("b", "act1", 1))
    g.add(Node("act2", "activation", [Ref("b")], {"name": "relu", "transform": RELU_T}))
    g.add(Node("s", "sum", [Ref("a"), Ref("act2"), Ref("x")], {"weights": (0.6, 0.5, 0.4)}))
    g.add(Node("act3", "activation", [Ref("s")], {"name": "leaky_relu", "negative_slope": 0.3,
                                                  "transform": {"output_scale": 1.3}}))
    g.add(Node("y", "output", [Ref("act3")]))
    return g


def _plain_block(gm, x):
    a = gm.a(x)
    h = _formula("relu", {}, RELU_T, a)
    h = _formula("relu", {}, RELU_T, gm.b(h))
    s = 0.6 * a + 0.5 * h + 0.4 * x
    return _formula("leaky_relu", {"negative_slope": 0.3}, {"output_scale": 1.3}, s)


def test_emitter_overwrites_only_values_nothing_else_reads():
    gm = emit(_block_graph())
    # a is read by act1 and the sum; x is the model's input; b and s have one reader
    assert not gm.act1.overwrite_input
    assert gm.act2.overwrite_input and gm.act3.overwrite_input
    assert gm.s.overwrite_input is None  # a: two readers; act2: an activation's output; x: input
    gm = _exact_constants(gm.double())
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    x_before = x.detach().clone()
    got = gm(x)
    torch.testing.assert_close(x.detach(), x_before)  # the model input is never written
    ref = copy.deepcopy(gm)
    xr = x.detach().clone().requires_grad_()
    want = _plain_block(ref, xr)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    v = torch.randn(got.shape, dtype=torch.float64)
    got.backward(v)
    want.backward(v)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)
    for (name, p), pr in zip(gm.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, pr.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_emitter_overwrites_a_conv_output_read_once_by_a_sum():
    g2 = Graph({"source": "torch"})
    g2.add(Node("x", "input", [], outputs=[TensorInfo((2, 4, 5, 5), "float32")]))
    g2.add(_conv_node("a", "x", 0))
    g2.add(_conv_node("b", "x", 1))
    g2.add(Node("s", "sum", [Ref("x"), Ref("b"), Ref("a")], {"weights": (0.3, 0.5, 0.6)}))
    g2.add(Node("y", "output", [Ref("s")]))
    gm2 = emit(g2).double()
    assert gm2.s.overwrite_input == 1  # the first input nothing else reads (b)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(gm2(x), 0.3 * x + 0.5 * gm2.b(x) + 0.6 * gm2.a(x))


@pytest.fixture(scope="module")
def shaped_resnet18():
    import warnings

    import torchvision

    import graphshape

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # unfolded: these tests are about the transformed activations and sums themselves
        return {"DKS": graphshape.shape(torchvision.models.resnet18(weights=None), x, seed=0,
                                        fold_scales="none"),
                "TAT": graphshape.shape(torchvision.models.resnet18(weights=None), x,
                                        method="TAT", activation="leaky_relu",
                                        shortcut_weight=0.5, seed=0, fold_scales="none")}


@pytest.mark.parametrize("method", ["DKS", "TAT"])
def test_shaped_resnet18_matches_the_plain_formulas(shaped_resnet18, method):
    shaped = _exact_constants(copy.deepcopy(shaped_resnet18[method]).double().train())
    acts = [m for m in shaped.modules() if isinstance(m, tm.TransformedActivation)]
    sums = [m for m in shaped.modules() if isinstance(m, tm.WeightedSum)]
    # the premise: the cheap paths are taken (one Function, written over the input)
    assert acts and all(m._fused is not None for m in acts)
    assert sum(m.overwrite_input for m in acts) >= len(acts) // 2
    assert sums and all(m.overwrite_input is not None for m in sums)
    ref = copy.deepcopy(shaped)
    for m in ref.modules():  # the straightforward formulas, term by term
        if isinstance(m, tm.TransformedActivation):
            m.forward = (lambda mod: lambda x: _formula(mod.name, mod.attrs, mod.transform, x))(m)
        elif isinstance(m, tm.WeightedSum):
            m.forward = (lambda mod: lambda *xs: _plain_sum(mod.weights, xs))(m)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=gen)
    got, want = shaped(x), ref(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    v = torch.randn(got.shape, dtype=torch.float64, generator=gen)
    got.backward(v)
    want.backward(v)
    for (name, p), pr in zip(shaped.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, pr.grad, rtol=1e-9, atol=1e-10, msg=name)
    assert list(shaped.state_dict()) == list(shaped_resnet18[method].state_dict())
    with torch.no_grad():  # inference takes the no-autograd path: same values
        torch.testing.assert_close(shaped.eval()(x), want, rtol=1e-10, atol=1e-10)


def test_fused_activation_compiles_to_the_same_values():
    act = tm.TransformedActivation("relu", RELU_T, overwrite_input=True)
    z = torch.randn(50)
    want = _formula("relu", {}, RELU_T, z)
    compiled = torch.compile(act, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(z.clone()), want)
    s = tm.WeightedSum((0.6, 0.5), overwrite_input=0)
    a, b = torch.randn(50), torch.randn(50)
    got = torch.compile(s, backend="aot_eager", fullgraph=True)(a.clone(), b)
    torch.testing.assert_close(got, 0.6 * a + 0.5 * b)


def _check_compiled_block_saves_no_mask(act, reference):
    """Compile linear -> ``act`` -> linear with inductor's partitioner and check that the
    forward keeps neither ``act``'s input (the affine map's output: ``addcmul``) nor a bool
    mask made from it for the backward (the backward reads ``act``'s output, which the
    second layer keeps anyway: inductor's CPU kernels store bool masks ~25x slower than
    floats), and that values and gradients are ``reference``'s (``act``'s formula)."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first = torch.nn.Linear(5, 5, bias=False)
            self.act = act
            self.second = torch.nn.Linear(5, 5, bias=False)

        def forward(self, x):
            return self.second(self.act(self.first(x)))

    saved = []  # (producing op, dtype) of every tensor the forward keeps for the backward

    def forward_compiler(gm, example_inputs):
        (outputs,) = [n.args[0] for n in gm.graph.nodes if n.op == "output"]
        saved.extend((str(o.target), o.meta["val"].dtype) for o in outputs
                     if hasattr(o, "meta") and "val" in o.meta)
        return make_boxed_func(gm)

    torch.manual_seed(0)
    block = Block()
    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=forward_compiler,
                           bw_compiler=lambda gm, _: make_boxed_func(gm),
                           partition_fn=min_cut_rematerialization_partition)
    compiled = torch.compile(block, backend=backend, fullgraph=True)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    y = compiled(x)
    assert saved and not any(dtype == torch.bool or op.startswith("aten.addcmul")
                             for op, dtype in saved), saved
    xr = x.detach().clone().requires_grad_(True)
    want = block.second(reference(block.first(xr)))
    torch.testing.assert_close(y, want)
    v = torch.randn_like(want)
    y.backward(v)
    grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    want.backward(v)
    torch.testing.assert_close(x.grad, xr.grad)
    for got, p in zip(grads, block.parameters()):
        torch.testing.assert_close(got, p.grad)


@pytest.mark.parametrize("name,attrs,t", [
    ("relu", {}, RELU_T),
    ("leaky_relu", {"negative_slope": 0.36}, {"output_scale": 1.33}),
])
def test_compiled_activation_saves_no_bool_mask(name, attrs, t):
    """Under torch.compile the relu-like transformed activations are one out-of-place
    Function whose backward reads phi's output."""
    act = tm.TransformedActivation(name, t, **attrs)
    assert act._fused is not None
    _check_compiled_block_saves_no_mask(act, lambda z: _formula(name, attrs, t, z))


def test_out_of_place_leaky_relu_backward_reads_its_output():
    """tm.LeakyReLU (emitted where other layers read a leaky ReLU's input, as a folded TReLU
    on a residual stream) is an nn.LeakyReLU with the in-place one's backward: the same
    values and gradients as F.leaky_relu, its input untouched, and compiled without a mask;
    the torch backend emits it there and nn.LeakyReLU(inplace=True) where it may."""
    act = tm.LeakyReLU(0.25)
    assert isinstance(act, torch.nn.LeakyReLU) and not act.inplace
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    x_before = x.detach().clone()
    y = act(x)
    xr = x_before.clone().requires_grad_(True)
    want = torch.nn.functional.leaky_relu(xr, 0.25)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    torch.testing.assert_close(x.detach(), x_before, rtol=0, atol=0)
    # what the backward keeps: the output itself, not the input
    kept = [t for t in y.grad_fn.saved_tensors if t is not None]
    assert len(kept) == 1 and kept[0].data_ptr() == y.data_ptr()
    v = torch.randn_like(want)
    y.backward(v)
    want.backward(v)
    torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=0)
    assert torch.autograd.gradcheck(act, (x_before.clone().requires_grad_(True),))
    with pytest.raises(GraphshapeError, match="negative_slope"):
        tm.LeakyReLU(-0.1)
    _check_compiled_block_saves_no_mask(
        tm.LeakyReLU(0.25), lambda z: torch.nn.functional.leaky_relu(z, 0.25))
    # emitted: a leaky ReLU whose input a sum also reads, and one that may overwrite
    g = Graph({"source": "torch"})
    g.add(Node("x", "input", attrs={"name": "x"}, outputs=[TensorInfo((2, 3), "float32")]))
    g.add(Node("fork", "activation", [Ref("x")],
               attrs={"name": "leaky_relu", "negative_slope": 0.25}))
    g.add(Node("s", "sum", [Ref("x"), Ref("fork")]))
    g.add(Node("last", "activation", [Ref("s")],
               attrs={"name": "leaky_relu", "negative_slope": 0.25}))
    g.add(Node("out", "output", [Ref("last")], attrs={"name": "out"}))
    gm = emit(g)
    assert type(gm.fork) is tm.LeakyReLU
    assert type(gm.last) is torch.nn.LeakyReLU and gm.last.inplace
    x = torch.randn(2, 3)
    z = torch.nn.functional.leaky_relu(x, 0.25)
    torch.testing.assert_close(gm(x), torch.nn.functional.leaky_relu(x + z, 0.25))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter's
def test_torchscript_onnx_export_gets_plain_ops():
    import onnx
    import onnxruntime as ort

    gm = emit(_block_graph()).eval()
    assert gm.act2.overwrite_input and gm.s.overwrite_input is None
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        want = gm(x)
    path = io.BytesIO()
    torch.onnx.export(gm, (x,), path, input_names=["x"], dynamo=False)
    proto = onnx.load_from_string(path.getvalue())
    ops = {n.op_type for n in proto.graph.node}
    assert "PythonOp" not in ops and {"Clip", "LeakyRelu"} <= ops  # clamp_min: Clip
    sess = ort.InferenceSession(path.getvalue(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
