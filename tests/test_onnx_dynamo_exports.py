"""ONNX files written by torch's default exporter (``dynamo=True``), recorded in
tests/data/dynamo/ by tests/data/make_dynamo_exports.py: shape_onnx shapes them to the same
parameters and joins as the PyTorch path does for the models they came from, and
onnxruntime runs the result."""

import importlib.util
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import graphshape

DATA = os.path.join(os.path.dirname(__file__), "data")
_spec = importlib.util.spec_from_file_location(
    "make_dynamo_exports", os.path.join(DATA, "make_dynamo_exports.py"))
exports = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(exports)


def _flat(params):
    return {(act, key): v for act, values in params.items() for key, v in values.items()}


def _joins(rewritten):
    """The sorted weights of every normalized sum (node names differ between the paths)."""
    return sorted(tuple(round(w, 12) for w in r["weights"]) for r in rewritten
                  if "weights" in r)


@pytest.mark.parametrize("name", sorted(exports.MODELS))
@pytest.mark.parametrize("method,shortcut_weight", [("TAT", 0.5), ("DKS", 0.5), ("DKS", 0.0)])
def test_dynamo_export_shapes_like_the_pytorch_model(tmp_path, name, method, shortcut_weight):
    src = os.path.join(exports.HERE, f"{name}.onnx")
    before = open(src, "rb").read()
    model = onnx.load(src)
    assert model.opset_import[0].version >= 18  # what the TorchScript exporter never writes

    torch_model, x = exports.build(name)
    # TAT's default eta = 0.9 is out of reach of networks this shallow
    options = dict(method=method, shortcut_weight=shortcut_weight, seed=0,
                   **({"eta": 0.6} if method == "TAT" else {}))
    want = graphshape.shape(torch_model, x, **options).meta["graphshape"]
    dst = tmp_path / "shaped.onnx"
    got = graphshape.shape_onnx(src, dst, **options)
    assert open(src, "rb").read() == before  # the input file is never changed
    assert _flat(got.activation_params) == pytest.approx(_flat(want.activation_params),
                                                         rel=1e-9)
    assert _joins(got.rewritten) == _joins(want.rewritten)
    skips = [r for r in got.removed if r["what"].startswith("skip connection")]
    assert len(skips) == len([r for r in want.removed if r["what"].startswith("skip")])
    residual_joins = {"tiny_resnet": 3, "tiny_vit": 4}[name]
    if shortcut_weight:
        assert len(_joins(got.rewritten)) == residual_joins and not skips
    else:
        assert len(skips) == residual_joins

    onnx.checker.check_model(str(dst), full_check=True)
    session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": x.numpy()})[0]
    assert out.shape == (2, 10) and np.isfinite(out).all()
    # no normalization is left
    kinds = {n.op_type for n in onnx.load(str(dst)).graph.node}
    assert not kinds & {"BatchNormalization", "LayerNormalization", "InstanceNormalization"}
