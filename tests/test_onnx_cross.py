"""Cross-framework round trips: a torch model emitted as ONNX agrees with the module, and
an exported ONNX file emitted as a torch.fx module agrees with onnxruntime."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest

import graphshape

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from same_network import assert_same_outputs, shape_both_ways  # noqa: E402
from test_onnx_roundtrip import assert_outputs_equal, build_model, run_ort  # noqa: E402

#: models taken across, beyond the required resnet18: mobilenet_v3_small (hardswish,
#: hardsigmoid, squeeze-excitation gates), convnext_tiny (gelu, layer norm, permutes) and,
#: ONNX -> torch only, densenet121 (batch norms the exporter cannot fold: the torch module
#: must come out in eval mode)
CROSS_MODELS = ["resnet18", "mobilenet_v3_small", "convnext_tiny"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


_TRACED = {}


def _traced(name):
    """(module, example input, IR graph from the torch frontend), built once per model."""
    if name not in _TRACED:
        model = build_model(name)
        x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        _TRACED[name] = (model, x, graphshape.load(model, x))
    return _TRACED[name]


@pytest.mark.parametrize("name,opset", [(n, None) for n in CROSS_MODELS]
                         + [("resnet18", 9), ("resnet18", 21),
                            # channel shuffle: x.size() / getitem / floordiv feed view();
                            # with static shapes the reshape is written statically
                            ("shufflenet_v2_x0_5", None)])
def test_torch_to_onnx_agrees_with_the_module(name, opset):
    model, x, graph = _traced(name)
    assert graph.meta["source"] == "torch"
    onnx_model = graphshape.to_onnx(graph, opset)
    onnx.checker.check_model(onnx_model, full_check=True)
    # 17 is the default for torch sources
    assert onnx_model.opset_import[0].version == (opset or 17)
    (inp,) = onnx_model.graph.input
    with torch.no_grad():
        want = model(x).numpy()
    assert_outputs_equal(run_ort(onnx_model, {inp.name: x.numpy()}), [want])


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("name", CROSS_MODELS + ["densenet121"])
def test_onnx_to_torch_agrees_with_onnxruntime(tmp_path, name, opset):
    path = str(tmp_path / f"{name}_{opset}.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(build_model(name), (torch.randn(1, 3, 64, 64),), path,
                          opset_version=opset, dynamo=False, input_names=["image"])
    gm = graphshape.to_torch(graphshape.load(path))
    assert isinstance(gm, torch.fx.GraphModule)
    assert not gm.training  # an ONNX graph is an inference graph
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        got = gm(torch.from_numpy(x))
    got = got if isinstance(got, (tuple, list)) else [got]
    assert_outputs_equal([t.numpy() for t in got], run_ort(path, {"image": x}))


@pytest.mark.parametrize("name,method", [("resnet18", "TAT"), ("mobilenet_v3_small", "DKS"),
                                         ("convnext_tiny", "TAT")])
def test_shape_and_shape_onnx_build_the_same_network(tmp_path, name, method):
    """A model shaped from PyTorch and its torch.onnx export shaped from ONNX, with the same
    seed, are the same network: the same solved parameters, the same orthogonal weights in
    the same order, the same outputs (the two frontends read the model into the same IR)."""
    model, x, _ = _traced(name)
    both = shape_both_ways(model, x, tmp_path, input_name="image", method=method, seed=3)
    from_torch, report = both.torch_report, both.onnx_report
    assert report.activation_params.keys() == from_torch.activation_params.keys()
    for name_, params in from_torch.activation_params.items():
        assert report.activation_params[name_] == pytest.approx(params, rel=1e-9)
    # (not the removed norms: the TorchScript exporter folds eval-mode batch norms into the
    # convs, whose biases shaping then zeroes)
    assert report.activations_found == from_torch.activations_found
    assert report.initialized == from_torch.initialized > 0
    assert_same_outputs(both)
