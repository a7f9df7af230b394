"""A model torch.fx cannot trace is read through its ONNX export
(graphshape.frontends.torch_onnx) when example inputs are given: it loads, emits a module
equal to the source at any batch size with the source's names and outputs, and shapes.
Before, it was refused ("torch.fx cannot trace ...")."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphshape
from graphshape import GraphshapeError
from graphshape.backend_torch import emit
from graphshape.frontends.torch_fx import load_module
from untraceable import finite_or_raise


class PadsOddSizes(nn.Module):
    """Pads odd feature maps (`if x.shape[-1] % 2:`), adds a learned offset and returns a
    dict, as timm's windowed-attention models do; checks its input's values first, an `if`
    torch.fx cannot trace (the branch on the size alone it now traces for the example's
    size: tests/test_size_branches.py)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.offset = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(finite_or_raise(x))))
        if x.shape[-1] % 2:
            x = F.pad(x, (0, 1, 0, 1))
        x = x + self.offset
        x = torch.relu(self.bn2(self.conv2(x)))
        return {"logits": self.fc(x.mean((2, 3))), "features": x}


def _model():
    torch.manual_seed(0)
    return PadsOddSizes().eval()


def _x(batch=2):
    return torch.randn(batch, 3, 9, 9, generator=torch.Generator().manual_seed(batch))


def test_without_example_inputs_the_error_says_to_pass_them():
    with pytest.raises(GraphshapeError, match="torch.fx cannot trace PadsOddSizes.*pass example "
                                              "inputs"):
        load_module(_model())


def test_read_through_the_export_with_the_source_names_and_outputs():
    model = _model()
    graph = load_module(model, _x())
    assert graph.meta["traced_with"] == "torch.onnx.export"
    assert "control flow" in graph.meta["fx_error"]
    assert model.training is False  # the export's eval mode is undone (here: it was eval)
    gm = emit(graph)
    names = dict(gm.named_parameters())
    assert {"conv1.weight", "conv2.weight", "fc.weight", "fc.bias", "offset"} <= set(names)
    assert names["offset"].requires_grad
    for batch in (1, 5):  # the export's batch axis is dynamic
        got, want = gm(_x(batch)), model(_x(batch))
        assert set(got) == {"logits", "features"}
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)


def test_training_mode_is_restored_and_kept():
    model = _model().train()
    model.bn1.eval()  # a frozen batch norm in a training model: the user's choice stays
    graph = load_module(model, _x())
    assert model.training and model.bn2.training and not model.bn1.training
    assert graph.meta["training"] is True
    assert emit(graph).training


def test_shapes_and_trains():
    model = _model()
    shaped = graphshape.shape(model, _x(), method="DKS")
    report = shaped.meta["graphshape"]
    assert any("ONNX export" in w for w in report.warnings)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in shaped.modules())
    shaped.train()
    out = shaped(_x(3))
    loss = F.cross_entropy(out["logits"], torch.tensor([0, 1, 2]))
    loss.backward()
    offset = dict(shaped.named_parameters())["offset"]
    assert offset.grad is not None and torch.isfinite(offset.grad).all()


def test_analysis_of_a_training_model_normalizes_with_batch_statistics():
    """The export keeps batch norm (not folded into the convolution), and the emitted
    module runs it in the source's mode: in training mode it normalizes the batch, q = 1."""
    stats = graphshape.analyze(_model().train(), _x(4), empirical=True)
    assert stats.meta["traced_with"] == "torch.onnx.export"
    assert any("traced in eval mode" in w for w in stats.meta["warnings"])
    assert stats["bn1"]["op"] == "batch_norm"
    assert stats["bn1"]["q_emp"] == pytest.approx(1.0, rel=1e-3)
    assert stats["fc"]["q_emp"] is not None  # measured on the emitted module


def test_when_the_export_fails_too_both_reasons_are_given():
    class ReturnsText(PadsOddSizes):
        def forward(self, x):
            return super().forward(x)["logits"], "label"

    with pytest.raises(GraphshapeError) as info:
        load_module(ReturnsText().eval(), _x())
    message = str(info.value)
    assert "torch.fx cannot trace ReturnsText" in message
    assert "not all tensors" in message and "torch.fx.wrap" in message
    # which output, and what it is (GPT-2: "['cache'] is a DynamicCache", use_cache=False)
    assert "([1] is a str)" in message and "returns only the tensors" in message


def test_a_branch_on_a_value_is_not_frozen_into_an_export():
    """The exporter records the branch the example takes; graphshape checks the export on
    other inputs (the negated example, a larger batch) and refuses it here."""
    class SignDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return torch.relu(x)
            return -x

    x = torch.ones(2, 3)
    with pytest.raises(GraphshapeError, match="depends on the inputs' values"):
        load_module(SignDependent(), x)


class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(x.mean((2, 3)))


def test_a_torch_export_program_is_read_through_its_onnx_export():
    """``torch.export``'s program (and its ``.module()``, a graph of ATen operators) shapes
    to the same parameters as the source module; the program's own example inputs serve
    when none are given. Before: "cannot load a ExportedProgram", and its module was "no
    activation function" (every ATen call opaque)."""
    torch.manual_seed(0)
    model = SmallResNet().eval()
    x = torch.randn(2, 3, 8, 8)
    program = torch.export.export(model, (x,))
    for options in ({"method": "DKS"}, {"method": "TAT", "eta": 0.5}):  # a shallow net
        direct = graphshape.shape(model, x, **options).meta["graphshape"]
        via = graphshape.shape(program, **options).meta["graphshape"]
        assert via.activation_params == direct.activation_params
        assert any("ATen operators" in w for w in via.warnings)
    converted = graphshape.to_torch(graphshape.load(program))
    torch.testing.assert_close(converted(x), model(x))
    # the source's names, found from the tensors the export is named after (its scopes
    # are ATen op names): a source checkpoint loads strictly
    assert set(converted.state_dict()) == set(model.state_dict())
    converted.load_state_dict(model.state_dict(), strict=True)
    with pytest.raises(GraphshapeError, match="ATen operators.*pass example inputs"):
        load_module(program.module())


def test_an_export_failing_in_onnxruntime_is_refused_without_its_log(capfd):
    """onnxruntime logs a failed run to stderr itself (outside Python's sys.stderr): the
    check of the export keeps it quiet, the GraphshapeError says what failed."""
    class PerExample(nn.Module):
        def forward(self, x):
            return torch.cat([row.unsqueeze(0) * 2 for row in x])  # unrolled for 2 rows

    with pytest.raises(GraphshapeError, match="could not be checked on other inputs"):
        load_module(PerExample(), torch.randn(2, 3))
    err = capfd.readouterr().err
    assert "onnxruntime" not in err and "Non-zero status" not in err, err


def test_an_output_count_frozen_by_the_export_is_refused():
    """A list with one output per example: the export returns as many as the example had,
    which the check on a larger batch catches (it compared the first ones only)."""
    class PerRow(nn.Module):
        def forward(self, x):
            return [x[i] * 2 for i in range(x.shape[0])]

    with pytest.raises(GraphshapeError, match="returns 2 outputs where the model returns 3"):
        load_module(PerRow(), torch.randn(2, 3))


def test_a_detection_style_model_is_pointed_at_its_backbone():
    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, images):  # per image, as torchvision's detection models
            return [self.backbone(img[None]).mean((1, 2, 3)) for img in images]

    for inputs in (None, torch.randn(2, 3, 8, 8)):
        with pytest.raises(GraphshapeError, match=r"model\.backbone = graphshape\.shape\("):
            load_module(Detector().eval(), inputs)
    # and the backbone alone is what graphshape shapes
    shaped = graphshape.shape(Detector().backbone, torch.randn(2, 3, 8, 8), method="DKS")
    assert not [m for m in shaped.modules() if isinstance(m, nn.BatchNorm2d)]


def _same_padding(size, kernel=3):
    """timm's ``get_same_padding`` for stride 1: computed from the size, on tensors when
    the exporter traces it (its export then computes the pads at run time)."""
    if isinstance(size, torch.Tensor):
        return torch.clamp((size / 1).ceil() - 1 + (kernel - 1) + 1 - size, min=0)
    return max((math.ceil(size / 1) - 1) + (kernel - 1) + 1 - size, 0)


class SamePaddedGELUNet(nn.Module):
    """Convs with BatchNorm and GELU and "same" padding computed from the input's size, as
    timm's dm_nfnet does."""

    def __init__(self, width=64, depth=4):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else width, width, 3)
                                   for i in range(depth))
        self.norms = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(depth))

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            pad = _same_padding(x.size(-1))
            x = F.gelu(norm(conv(F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)))))
        return x


class Untraceable(nn.Module):
    """``inner`` after a check torch.fx cannot trace: read through its ONNX export."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(finite_or_raise(x))


def test_a_shaped_model_read_through_its_export_again_keeps_its_transforms():
    """``graphshape.analyze`` of a shaped model that torch.fx cannot trace reads it through
    its export, where each TransformedActivation is spelled out as Mul / Add nodes; read so,
    the transform's shifts were taken for variance (timm dm_nfnet_f0 shaped: predicted q 27
    at the output, measured 0.15). They fold back into one activation per module now."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 9, 9, generator=torch.Generator().manual_seed(5))
    shaped = graphshape.shape(SamePaddedGELUNet().eval(), x, method="DKS", seed=0)
    params = shaped.meta["graphshape"].activation_params["gelu_exact"]
    wrapped = Untraceable(shaped)
    graph = load_module(wrapped, x)
    assert graph.meta["traced_with"] == "torch.onnx.export"
    acts = [n for n in graph if n.op == "activation"]
    assert len(acts) == 4 and "mul" not in graph.count_ops() and "add" not in graph.count_ops()
    for act in acts:
        assert act.attrs["name"] == "gelu_exact"
        assert act.attrs["transform"] == pytest.approx(params)
    with torch.no_grad():  # and the module emitted from it is the shaped model
        torch.testing.assert_close(emit(graph)(x), shaped(x), rtol=1e-5, atol=1e-5)
    rows = {r["node"]: r for r in graphshape.analyze(wrapped, x, empirical=True).rows}
    last = rows[acts[-1].name]
    # DKS: q ~ 1 at every activation (0.93: the analysis counts the zero padding); spelled
    # out, the prediction at the output was 2.03 (measured 1.02)
    assert last["q_pred"] == pytest.approx(1.0, rel=0.15)
    assert last["q_emp"] == pytest.approx(last["q_pred"], rel=0.2)


def test_reading_through_the_export_runs_the_model_once_less():
    """The outputs' structure is taken from the check's first probe (the negated example),
    whose outputs the check reuses: 3 forwards (that probe, the exporter's trace, the grown
    batch), where it was 4; for a large model nearly all of a fallback load's time. (And
    one of a batch of one, the probe of a branch on the batch size.)"""
    model = _model()
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    graph = load_module(model, _x())
    assert graph.meta["traced_with"] == "torch.onnx.export"
    assert len([b for b in calls if b > 1]) <= 3 and calls.count(1) <= 1
    with torch.no_grad():  # and what it read is still the model
        for batch in (2, 5):
            got, want = emit(graph)(_x(batch)), model(_x(batch))
            torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-5, atol=1e-5)
