"""The examples under examples/, each in a reduced configuration (small depth, size, steps),
with assertions on what they measured (not on their printout)."""

from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_digits_dks_trains_where_default_does_not(tmp_path):
    """16-layer vanilla CNN, 2 epochs of Adam at lr 1e-3: PyTorch's default init stays at
    chance (loss ~ log 10 = 2.30); the DKS-shaped network learns (measured: loss 0.22, test accuracy 0.956)."""
    digits = _example("train_vanilla_digits")
    plot = tmp_path / "curves.png"
    results = digits.main(["--depth", "16", "--epochs", "2", "--lrs", "1e-3",
                           "--kinds", "default,dks", "--plot", str(plot),
                           "--results", str(tmp_path / "runs.json")])
    default_losses, default_acc, _ = results[("default", 1e-3)]
    dks_losses, dks_acc, _ = results[("dks", 1e-3)]
    assert np.mean(default_losses[-10:]) > 2.0
    assert np.mean(dks_losses[-10:]) < 1.0
    assert dks_acc > 0.6 > default_acc
    assert plot.stat().st_size > 1000
    # the stored runs are reused, not recomputed, by a second call with the same settings
    again = digits.main(["--depth", "16", "--epochs", "2", "--lrs", "1e-3", "--kinds", "dks",
                         "--plot", "", "--results", str(tmp_path / "runs.json")])
    assert again[("dks", 1e-3)][1] == dks_acc


def test_resnet_example_shapes_trains_and_matches_onnxruntime():
    """ResNet-18 at 32x32: DKS and TAT shaping, per-node stats, 3 training steps, and both
    ONNX exports (graphshape's backend at init, torch.onnx.export after training) agree
    with PyTorch in onnxruntime."""
    resnet = _example("resnet_torchvision")
    results = resnet.main(["--model", "resnet18", "--size", "32", "--batch", "2",
                           "--steps", "3", "--stats-rows", "2"])
    assert set(results) == {"DKS", "TAT"}
    for method, r in results.items():
        report = r["report"]
        assert report.method == method
        # every BatchNorm of the source is gone, and every conv/linear was re-initialized
        assert sum(e["op"] == "batch_norm" for e in report.removed) == 20
        assert report.initialized == 21
        assert r["stats"].rows[-1]["q_pred"] == pytest.approx(1.0, abs=0.05)
        assert all(math.isfinite(v) for v in r["losses"])
        # Adam on one batch of 2 images memorizes it (measured: 7.4 -> 0.04 DKS, 23.9 -> 1.1 TAT)
        assert r["losses"][-1] < 0.5 * r["losses"][0]
        tolerance = 1e-4 * max(1.0, r["output_scale"])
        assert r["onnx_init_max_abs_diff"] < tolerance
        assert r["onnx_max_abs_diff"] < tolerance
    assert "leaky_relu" in results["TAT"]["report"].activation_params
    assert "relu" in results["DKS"]["report"].activation_params


def test_onnx_zoo_batch(tmp_path):
    """Three exported torchvision models through `graphshape batch`: the two ReLU models are
    shaped and run in onnxruntime with unit output q; mobilenet_v2 (ReLU6, which DKS cannot
    shape) fails with graphshape's reason, without stopping the batch."""
    zoo = _example("onnx_zoo_batch")
    out = zoo.main(["--models", "resnet18,squeezenet1_1,mobilenet_v2", "--size", "32",
                    "--workdir", str(tmp_path)])
    assert out["status"] == 1  # one model failed
    status = {os.path.basename(m["model"]): m for m in out["report"]["models"]}
    assert status["resnet18.onnx"]["status"] == "ok"
    assert status["squeezenet1_1.onnx"]["status"] == "ok"
    assert status["mobilenet_v2.onnx"]["status"] == "failed"
    assert "relu6" in status["mobilenet_v2.onnx"]["error"]
    assert "internal error" not in status["mobilenet_v2.onnx"]["error"]
    assert set(out["outputs"]) == {"resnet18", "squeezenet1_1"}
    for name, r in out["outputs"].items():
        assert r["finite"]
        assert 0.3 < r["q"] < 3.0, (name, r)
