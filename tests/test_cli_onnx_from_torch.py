"""``graphshape shape <PyTorch model> -o out.onnx`` when the shaped graph holds PyTorch calls
graphshape's ONNX writer has no form for (a size read from a tensor, torchvision's
``_get_relative_position_bias``): the file is written by ``torch.onnx.export`` of the
shaped module, checked in onnxruntime. Before, the command failed ("opaque torch op
(function builtins.getattr) has no ONNX form"): torchvision's vit_b_16 and swin_t could not
be written as ONNX."""

import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from graphshape.cli import main as cli_main

FACTORY = textwrap.dedent('''
    import torch
    import torch.nn as nn

    class SizedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8 * 36, 5)

        def forward(self, x):
            h = torch.nn.functional.gelu(self.bn(self.conv(x)))
            scale = h.new_full((1,), h.size(1) ** 0.5)  # (no ONNX form in the writer)
            return self.fc(h.flatten(1)) / scale

    def sized():
        torch.manual_seed(0)
        return SizedHead()
''')


@pytest.fixture
def factory(tmp_path, monkeypatch):
    (tmp_path / "cli_onnx_models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "cli_onnx_models:sized"
    sys.modules.pop("cli_onnx_models", None)


def test_a_pytorch_model_with_size_reads_is_written_as_onnx(factory, tmp_path, capsys):
    out, pt = tmp_path / "sized.onnx", tmp_path / "sized.pt"
    args = ["--input-shape", "2,3,6,6", "--method", "DKS"]
    assert cli_main(["shape", factory, "-o", str(out), *args]) == 0
    err = capsys.readouterr().err
    assert "written with torch.onnx.export" in err and "checked against the module" in err
    assert "call 'size' (method Tensor.size)" in err
    model = onnx.load(str(out))
    assert any(p.key == "graphshape" for p in model.metadata_props)
    assert cli_main(["shape", factory, "-o", str(pt), *args]) == 0  # the same shaping
    shaped = torch.load(str(pt), weights_only=False)
    session = ort.InferenceSession(str(out))
    x = np.random.default_rng(0).standard_normal((3, 3, 6, 6)).astype(np.float32)
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want = shaped(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
