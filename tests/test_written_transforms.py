"""An ONNX file graphshape shaped writes each activation's transform as scalar Mul / Add
nodes around it (``act.input_scale``, ``act.input_shift``, ``act.output_shift``,
``act.output_scale``). Read back, they fold into the activation's ``transform``
(``frontends.onnx_import.fold_written_transforms``): the analysis then predicts the file's
kernels as it does for the PyTorch model it came from (read as separate nodes, the shifts
were taken for variance: q = 11 predicted at the output of a DKS ResNet-18, 0.92
measured), and shaping the file again replaces the transform instead of nesting a new one
inside the old."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision

import graphshape


@pytest.fixture(scope="module")
def shaped_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("written")
    torch.manual_seed(0)
    src = folder / "resnet18.onnx"
    torch.onnx.export(torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32),
                      str(src), dynamo=False, opset_version=17)
    files = {}
    for method in ("DKS", "TAT"):
        files[method] = folder / f"resnet18_{method}.onnx"
        # (TAT's TReLU has only an output scale, which the default moves onto the weights)
        graphshape.shape_onnx(str(src), str(files[method]), method=method, seed=0,
                              fold_scales="none")
    return files


def _transform_nodes(path):
    return [n.name for n in onnx.load(str(path)).graph.node
            if n.name.rsplit(".", 1)[-1] in ("input_scale", "input_shift", "output_shift",
                                              "output_scale")]


@pytest.mark.parametrize("method", ["DKS", "TAT"])
def test_a_shaped_file_reads_back_with_its_transforms(shaped_files, method):
    path = shaped_files[method]
    assert _transform_nodes(path)  # the file spells them out ...
    graph = graphshape.load(str(path))
    acts = [n for n in graph if n.op == "activation"]
    assert len(acts) == 17 and all(n.attrs.get("transform") for n in acts)
    assert not [n.name for n in graph  # ... and the graph has them in its activations
                if n.name.rsplit(".", 1)[-1] in ("input_scale", "input_shift",
                                                  "output_shift", "output_scale")]
    # the same function: the emitted module computes what onnxruntime computes on the file
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        got = graphshape.to_torch(graph)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_the_analysis_of_a_shaped_file_is_that_of_the_shaped_model(shaped_files):
    """Predicted q at every activation and at the output: the same as for the network shaped
    in PyTorch (1 at the output); it was 11 with the transform's shift read as variance."""
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    from_file = graphshape.analyze(str(shaped_files["DKS"]), x.numpy())
    torch.manual_seed(0)
    shaped = graphshape.shape(torchvision.models.resnet18(), x[:1], method="DKS", seed=0)
    from_torch = graphshape.analyze(shaped, x)
    acts_file = [r["q_pred"] for r in from_file.rows if r["op"] == "activation"]
    acts_torch = [r["q_pred"] for r in from_torch.rows if r["op"] == "activation"]
    assert acts_file == pytest.approx(acts_torch, rel=1e-3)
    assert from_file.rows[-1]["q_pred"] == pytest.approx(from_torch.rows[-1]["q_pred"], rel=1e-3)
    assert from_file.rows[-1]["q_pred"] == pytest.approx(1.0, abs=0.01)


def test_shaping_a_shaped_file_again_replaces_its_transforms(shaped_files, tmp_path):
    first = shaped_files["DKS"]
    again = tmp_path / "again.onnx"
    report = graphshape.shape_onnx(str(first), str(again), method="DKS", seed=0)
    assert len(_transform_nodes(again)) == len(_transform_nodes(first))  # not nested
    first_report = graphshape.shape_onnx(str(first), str(tmp_path / "x.onnx"), method="DKS",
                                         seed=0)
    assert report.activation_params == first_report.activation_params
