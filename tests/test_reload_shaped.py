"""Re-loading a shaped model: graphshape's own emitted modules map back to canonical IR."""

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision

import graphshape
from graphshape import torch_modules as tm


@pytest.fixture(scope="module")
def shaped_resnet18():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = torchvision.models.resnet18(weights=None).eval()
    # unfolded: the tests below are about TransformedActivation / WeightedSum; the default
    # (folded) model's reload is tested at the end
    shaped = graphshape.shape(model, x, fold_scales="none").eval()
    return shaped, x


def test_shaped_model_holds_graphshape_modules(shaped_resnet18):
    shaped, _ = shaped_resnet18
    kinds = {type(m) for m in shaped.modules()}
    # the premise of the tests below: the shaped model uses graphshape's own modules
    assert tm.TransformedActivation in kinds and tm.WeightedSum in kinds


def test_reloaded_shaped_model_has_canonical_nodes(shaped_resnet18):
    shaped, x = shaped_resnet18
    graph = graphshape.load(shaped, x)
    ops = [n.op for n in graph.nodes]
    assert "opaque" not in ops
    acts = [n for n in graph.nodes if n.op == "activation"]
    n_transformed = sum(isinstance(m, tm.TransformedActivation) for m in shaped.modules())
    assert sum(bool(n.attrs.get("transform")) for n in acts) == n_transformed
    sums = [n for n in graph.nodes if n.op == "sum"]
    assert sums and all(len(n.attrs["weights"]) == len(n.inputs) for n in sums)


def test_reloaded_shaped_model_reemits_torch_and_onnx(shaped_resnet18):
    shaped, x = shaped_resnet18
    with torch.no_grad():
        want = shaped(x).numpy()
    graph = graphshape.load(shaped, x)
    again = graphshape.to_torch(graph).eval()
    with torch.no_grad():
        np.testing.assert_allclose(again(x).numpy(), want, rtol=1e-4, atol=1e-5)
    proto = graphshape.to_onnx(graph)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    got = sess.run(None, {name: x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_analyze_shaped_model_reaches_the_output(shaped_resnet18):
    shaped, x = shaped_resnet18
    stats = graphshape.analyze(shaped, x)
    graph = graphshape.load(shaped, x)
    out = graph.outputs[0].node
    q_out = stats[out]["q_pred"]
    assert q_out is not None and math.isfinite(q_out) and q_out > 0
    # every activation gets a prediction, not just the ones before the first opaque node
    acts = [n.name for n in graph.nodes if n.op == "activation"]
    assert all(stats[a]["q_pred"] is not None and math.isfinite(stats[a]["q_pred"])
               for a in acts)


# -- transform constants: no per-call dtype conversion (runtime benchmark: float64 buffers
# cost a _to_copy per addcmul operand per call)
def _count_to_copy(fn) -> int:
    with torch.profiler.profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transformed_activation_forward_makes_no_dtype_copies(dtype):
    # tanh is not homogeneous: both the input and the output affine maps are addcmuls
    act = tm.TransformedActivation("tanh", {"input_scale": 1.3, "input_shift": 0.2,
                                            "output_shift": -0.1, "output_scale": 0.8}).to(dtype)
    x = torch.randn(4, 8, dtype=dtype)
    assert {b.dtype for b in act.buffers()} == {dtype}
    with torch.no_grad():
        y = act(x)
        assert _count_to_copy(lambda: act(x)) == 0
    want = 0.8 * (torch.tanh(1.3 * x.double() + 0.2) - 0.1)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=1e-6)


# -- V1 ResNets under TAT kept as V1 (preactivation_shortcuts=False): the activation after a
# residual add reads a non-zero-mean, non-Gaussian input through the identity shortcut;
# shaping warns, analysis flags it
V1_WARNING = "V1 ResNet pattern"


def _resnet18_report(**options):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    shaped = graphshape.shape(torchvision.models.resnet18(weights=None), x, **options)
    return shaped, shaped.meta["graphshape"], x


def test_tat_resnet18_warns_about_v1_shortcuts():
    shaped, report, x = _resnet18_report(method="TAT", preactivation_shortcuts=False)
    warnings = [w for w in report.warnings if V1_WARNING in w]
    # resnet18: 8 blocks, 3 of them with a conv (downsample) shortcut -> 5 such activations
    assert len(warnings) == 1 and warnings[0].startswith("5 activation(s)")
    assert "preactivation_shortcuts=True" in warnings[0] and "DKS" in warnings[0]
    stats = graphshape.analyze(shaped, x)
    flagged = [r["node"] for r in stats.rows if "non-gaussian input (V1 shortcut)" in r["flags"]]
    assert len(flagged) == 5 and all(stats[n]["op"] == "activation" for n in flagged)


@pytest.mark.parametrize("options", [{"method": "DKS"}, {"method": "TAT", "shortcut_weight": 0.0},
                                     {"method": "TAT"}])
def test_no_v1_warning_for_zero_mean_activations_or_no_shortcut(options):
    shaped, report, x = _resnet18_report(**options)
    assert not any(V1_WARNING in w for w in report.warnings)
    stats = graphshape.analyze(shaped, x)
    assert not any("non-gaussian input (V1 shortcut)" in r["flags"] for r in stats.rows)


# -- folded models (fold_scales: "weights" is the default, "parameters" the opt-in): the
# scaled layers and the plain leaky ReLU a folded TReLU becomes map back to canonical nodes
@pytest.fixture(scope="module")
def folded_resnet18():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    nets = {mode: graphshape.shape(torchvision.models.resnet18(weights=None), x, seed=0,
                                   fold_scales=mode).eval()
            for mode in ("none", "weights", "parameters")}
    return nets, x


@pytest.mark.parametrize("mode", ["weights", "parameters"])
def test_reloaded_folded_model_keeps_its_scales_function_and_kernels(folded_resnet18, mode):
    nets, x = folded_resnet18
    shaped = nets[mode]
    graph = graphshape.load(shaped, x)
    assert "opaque" not in [n.op for n in graph.nodes]
    scaled = {n.name: n.attrs["weight_scale"] for n in graph.nodes if "weight_scale" in n.attrs}
    modules = [m for m in shaped.modules() if isinstance(m, (tm.ScaledConv2d, tm.ScaledLinear))]
    # every conv after a TReLU and the classifier
    assert len(scaled) == len(modules) == (20 if mode == "weights" else 0)
    assert sorted(scaled.values()) == pytest.approx(sorted(m.weight_scale for m in modules))
    with torch.no_grad():
        want = shaped(x).numpy()
        np.testing.assert_allclose(graphshape.to_torch(graph).eval()(x).numpy(), want,
                                   rtol=1e-4, atol=1e-5)
    sess = ort.InferenceSession(graphshape.to_onnx(graph).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # the analysis of the folded model predicts what the unfolded one's does at the output
    out = graph.outputs[0].node
    q_folded = graphshape.analyze(shaped, x)[out]["q_pred"]
    unfolded = graphshape.load(nets["none"], x)
    q_plain = graphshape.analyze(nets["none"], x)[unfolded.outputs[0].node]["q_pred"]
    assert q_folded == pytest.approx(q_plain, rel=1e-5)


def test_reshaping_a_folded_model_does_not_stack_scales(folded_resnet18):
    nets, x = folded_resnet18
    again = graphshape.shape(nets["weights"], x, seed=0)
    first = [m.weight_scale for m in nets["weights"].modules() if isinstance(m, tm.ScaledConv2d)]
    second = [m.weight_scale for m in again.modules() if isinstance(m, tm.ScaledConv2d)]
    # new orthogonal weights: the old scales are dropped, the solve sets the same new ones
    assert second == pytest.approx(first, rel=1e-6)


@pytest.mark.parametrize("mode", ["none", "weights", "parameters"])
def test_users_can_fx_trace_a_shaped_model(folded_resnet18, mode):
    """torch.fx.symbolic_trace of a shaped model (a user's own fx pass): graphshape's
    modules take no branch on a proxy's value (they used to raise TraceError)."""
    nets, x = folded_resnet18
    net = nets[mode]
    traced = torch.fx.symbolic_trace(net)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), net(x), rtol=1e-5, atol=1e-5)


def test_emitted_helpers_are_fx_traceable():
    """A per-channel affine node and a multi-axis unsqueeze (an ONNX Unsqueeze) emit as
    graphshape helpers; a user's torch.fx.symbolic_trace of the emitted module met
    ``x.dim()`` in Python arithmetic (list * Proxy, TraceError) and graphshape's own
    reload of such a shaped model fell back to the ONNX export."""
    from graphshape.ir import Graph, Node, Ref, TensorInfo

    rng = np.random.default_rng(0)
    g = Graph({"source": "test"})
    g.add(Node("x", "input", outputs=[TensorInfo((2, 4, 5, 5), "float32")]))
    g.add(Node("aff", "affine", [Ref("x")], {"axis": 1},
               params={"scale": rng.standard_normal(4).astype(np.float32),
                       "shift": rng.standard_normal(4).astype(np.float32)},
               outputs=[TensorInfo((2, 4, 5, 5), "float32")]))
    g.add(Node("un", "unsqueeze", [Ref("aff")], {"axes": (1, 4)},
               outputs=[TensorInfo((2, 1, 4, 5, 1, 5), "float32")]))
    g.add(Node("out", "output", [Ref("un")]))
    module = graphshape.to_torch(g)
    assert isinstance(module.get_submodule("aff"), tm.Affine) and "unsqueeze_axes" in module.code
    x = torch.randn(2, 4, 5, 5)
    traced = torch.fx.symbolic_trace(module)
    torch.testing.assert_close(traced(x), module(x))
    assert module(x).shape == (2, 1, 4, 5, 1, 5)
