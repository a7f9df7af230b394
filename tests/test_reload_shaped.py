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
    shaped = graphshape.shape(model, x).eval()
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
