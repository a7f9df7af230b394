"""ONNX models with external data (how models past protobuf's 2 GB limit are stored).

Tests cannot build 2 GB models, so they use a small model saved with external data, and
check the size-threshold logic that switches to external data by lowering the threshold.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphshape
from graphshape import GraphshapeError, backend_onnx

WIDTH = 128  # the first Gemm's weight: 256 x 128 float32 = 128 KiB


def _mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, WIDTH ** -0.5, (256, WIDTH)).astype(np.float32), "w1"),
             numpy_helper.from_array(np.zeros(256, np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 1 / 16, (10, 256)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"),
             helper.make_node("Tanh", ["h"], ["a"], name="act"),
             helper.make_node("Gemm", ["a", "w2"], ["y"], transB=1, name="fc2")]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _run(path_or_model, x):
    import onnxruntime as ort

    arg = str(path_or_model) if isinstance(path_or_model, (str, os.PathLike)) \
        else path_or_model.SerializeToString()
    return ort.InferenceSession(arg, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.fixture
def external_model(tmp_path):
    """The MLP saved as src/model.onnx + src/weights.bin (every tensor external)."""
    folder = tmp_path / "src"
    folder.mkdir()
    onnx.save(_mlp(), folder / "model.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    assert os.path.getsize(folder / "weights.bin") > 256 * WIDTH * 4
    return folder / "model.onnx"


def _snapshot(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_external_data_round_trip_load_to_onnx_save(external_model, tmp_path):
    x = np.random.default_rng(1).normal(size=(2, WIDTH)).astype(np.float32)
    want = _run(_mlp(), x)
    graph = graphshape.load(str(external_model))
    model = graphshape.to_onnx(graph)
    dst = tmp_path / "out" / "model.onnx"
    backend_onnx.save(model, dst, external_data=True, size_threshold=1024)
    assert sorted(os.listdir(dst.parent)) == ["model.onnx", "model.onnx.data"]
    assert os.path.getsize(dst) < 4096  # the weights live in the data file
    np.testing.assert_allclose(_run(dst, x), want, rtol=1e-5, atol=1e-6)
    # and graphshape reads its own external-data output back
    again = graphshape.to_onnx(graphshape.load(str(dst)))
    np.testing.assert_allclose(_run(again, x), want, rtol=1e-5, atol=1e-6)


def test_save_switches_to_external_data_past_the_size_limit(monkeypatch, tmp_path):
    """The 2 GB rule, scaled down: past the limit (less a 64 MiB margin) ``save`` moves
    the weights to ``<name>.data``; below it the model is one file."""
    model = _mlp()
    limit = 64 * 2**20 + 100_000  # so the switch happens at 100 kB
    monkeypatch.setattr(backend_onnx, "_TWO_GB", limit)
    assert backend_onnx._model_bytes(model) > 100_000
    backend_onnx.save(model, tmp_path / "big.onnx")
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    small = onnx.ModelProto()
    small.CopyFrom(model)
    small.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        np.zeros((256, 4), np.float32), "w1"))
    assert backend_onnx._model_bytes(small) < 100_000
    backend_onnx.save(small, tmp_path / "small.onnx")
    assert "small.onnx.data" not in os.listdir(tmp_path)
    x = np.ones((2, WIDTH), np.float32)
    np.testing.assert_allclose(_run(tmp_path / "big.onnx", x), _run(model, x), rtol=1e-6)


def test_shape_onnx_of_a_large_model_writes_external_data(external_model, monkeypatch, tmp_path):
    monkeypatch.setattr(backend_onnx, "_TWO_GB", 64 * 2**20 + 100_000)
    before = _snapshot(external_model.parent)
    dst = tmp_path / "shaped" / "model.onnx"
    dst.parent.mkdir()
    report = graphshape.shape_onnx(str(external_model), dst, method="DKS")
    assert report.activations_found == {"tanh": 1}
    assert sorted(os.listdir(dst.parent)) == ["model.onnx", "model.onnx.data"]
    assert _snapshot(external_model.parent) == before  # the source is untouched
    out = _run(dst, np.random.default_rng(2).normal(size=(2, WIDTH)).astype(np.float32))
    assert out.shape == (2, 10) and np.isfinite(out).all()
    from graphshape.shaping_api import report_from_onnx

    assert report_from_onnx(dst)["method"] == "DKS"


def test_external_data_symlink_leaving_the_folder_is_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    outside = tmp_path / "secret"
    outside.mkdir()
    onnx.save(_mlp(), outside / "m.onnx", save_as_external_data=True, location="w.bin",
              size_threshold=0)
    os.symlink(outside / "w.bin", folder / "w.bin")  # in the folder, but pointing out of it
    (folder / "m.onnx").write_bytes((outside / "m.onnx").read_bytes())
    with pytest.raises(GraphshapeError, match="outside the model's folder"):
        graphshape.load(str(folder / "m.onnx"))


def test_missing_external_data_file(external_model):
    os.remove(external_model.parent / "weights.bin")
    with pytest.raises(GraphshapeError, match="missing"):
        graphshape.load(str(external_model))


def test_in_memory_model_pointing_to_external_data(external_model):
    proto = onnx.load(str(external_model), load_external_data=False)
    with pytest.raises(GraphshapeError, match="pass the .onnx file path"):
        graphshape.load(proto)


@pytest.mark.parametrize("with_weights", [True, False])
def test_streamed_save_reads_back_as_the_same_model(tmp_path, with_weights):
    """shaping_api.save writes the model without weights, then one initializer at a time:
    onnx parses that as exactly the model (protobuf merges the repeated graph fields)."""
    from graphshape.shaping_api import save

    model = _mlp()
    if not with_weights:
        del model.graph.initializer[:]
    model.metadata_props.add(key="graphshape", value="{}")
    save(model, tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == ["m.onnx"]
    again = onnx.load(str(tmp_path / "m.onnx"))
    assert again == model
    if with_weights:
        x = np.ones((2, WIDTH), np.float32)
        np.testing.assert_array_equal(_run(tmp_path / "m.onnx", x), _run(model, x))


def test_checker_copy_without_weights_keeps_the_structure():
    from graphshape.shaping_api import _without_weights

    model = _mlp()
    light = _without_weights(model)
    assert [i.name for i in light.graph.initializer] == ["b1"]  # 1 KiB: kept
    assert [i.name for i in light.graph.input] == ["x", "w1", "w2"]
    assert light.graph.node == model.graph.node and light.opset_import == model.opset_import
    assert light.ByteSize() < 4096 < model.ByteSize()
    onnx.checker.check_model(light)
