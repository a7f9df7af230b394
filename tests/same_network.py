"""Shape a module from PyTorch and its torch.onnx export from ONNX, with the same options
(helpers, not tests): the two paths should build the same network."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np


@dataclass
class BothWays:
    shaped: object        # the module shaped from PyTorch (eval mode)
    torch_report: object  # its ShapeReport
    onnx_report: object   # shape_onnx's report on the export
    torch_output: np.ndarray  # the shaped module's output on x
    onnx_output: np.ndarray   # onnxruntime's, of the shaped export


def shape_both_ways(model, x, tmp_path, *, input_name="x", **options) -> BothWays:
    """Export ``model`` (eval mode, TorchScript exporter, opset 17), shape the module with
    ``graphshape.shape`` and the file with ``graphshape.shape_onnx`` (``options`` for
    both), and run both shaped models on ``x``."""
    import onnxruntime as ort
    import torch

    import graphshape

    model.eval()
    src, dst = str(tmp_path / "model.onnx"), str(tmp_path / "shaped.onnx")
    with warnings.catch_warnings():  # (the TorchScript exporter's deprecation notices)
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), src, opset_version=17, dynamo=False,
                          input_names=[input_name])
        shaped = graphshape.shape(model, x, **options).eval()
        onnx_report = graphshape.shape_onnx(src, dst, **options)
    with torch.no_grad():
        torch_output = shaped(x).numpy()
    session = ort.InferenceSession(dst, providers=["CPUExecutionProvider"])
    onnx_output = session.run(None, {input_name: x.numpy()})[0]
    return BothWays(shaped, shaped.meta["graphshape"], onnx_report, torch_output, onnx_output)


def assert_same_outputs(both: BothWays, what: str = "") -> None:
    """The two outputs agree to float32 round-off (and are not vacuously small)."""
    want = both.torch_output
    assert np.abs(want).max() > 0.05, what
    np.testing.assert_allclose(both.onnx_output, want, rtol=1e-4,
                               atol=1e-5 * np.abs(want).max(), err_msg=what)
