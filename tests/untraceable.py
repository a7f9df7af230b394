"""A construct torch.fx cannot trace and torch.onnx.export can, for the tests of the ONNX
fallback (graphshape.frontends.torch_onnx). A Python branch on a size (``if x.shape[-1] %
2:``) was one until graphshape traced those for the example inputs' sizes
(graphshape.frontends.torch_specialize)."""

import torch


def finite_or_raise(x: torch.Tensor) -> torch.Tensor:
    """``x``, after a check of its values: ``if`` on a tensor's value, which torch.fx cannot
    trace (and graphshape does not answer: it depends on the data). The exporter records
    the branch the examples take and drops the check, which the export needs no op for."""
    if not torch.isfinite(x).all():
        raise ValueError("the input holds inf or nan")
    return x
