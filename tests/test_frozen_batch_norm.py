"""Batch norms with fixed statistics (torchvision's ``FrozenBatchNorm2d``, the norm of its
detection backbones; timm's ``FrozenBatchNormAct2d``) map to a ``batch_norm`` node with
``frozen=True``: they round-trip as frozen norms (training mode does not use the batch's
statistics), the analysis takes them as the per-channel affine map they are, and shaping
removes them like any norm. Traced through, they used to be a multiplication and an addition
by computed constants that shaping kept, so a pretrained backbone's statistics scaled every
channel of the shaped network."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
from torchvision.ops import FrozenBatchNorm2d  # noqa: E402

import graphshape  # noqa: E402
from graphshape import torch_modules as tm  # noqa: E402


def _randomize_statistics(model, seed=0):
    """Statistics and affine parameters as a pretrained model has them (far from 0 / 1)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d)):
            with torch.no_grad():
                c = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(c, generator=gen))
                m.running_var.copy_(torch.rand(c, generator=gen) * 4 + 0.25)
                m.weight.copy_(torch.rand(c, generator=gen) * 2 + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen))
    return model


def _close(got, want):
    """Equal up to float32 rounding relative to the output's scale."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def _frozen_resnet18():
    torch.manual_seed(0)
    return _randomize_statistics(torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d))


def test_frozen_batch_norm_is_a_frozen_norm_node_and_round_trips():
    model = _frozen_resnet18().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    graph = graphshape.load(model, x)
    ops = graph.count_ops()
    norms = [n for n in graph if n.op == "batch_norm"]
    assert len(norms) == 20 and all(n.attrs["frozen"] for n in norms)
    assert "mul" not in ops and "opaque" not in ops  # not traced into x * scale + shift
    gm = graphshape.to_torch(graph)
    assert sorted(gm.state_dict()) == sorted(model.state_dict())
    assert not [m for m in gm.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        want = model(x)
        _close(gm(x), want)
        # training mode keeps the fixed statistics (a BatchNorm2d would use the batch's)
        gm.train(), model.train()
        _close(gm(x), want)
    # a checkpoint of the original loads into the emitted module, and back
    gm.load_state_dict(model.state_dict())
    model.load_state_dict(gm.state_dict())
    # ... and the emitted module loads back as the same frozen norms
    again = graphshape.load(gm, x)
    assert [n.attrs.get("frozen") for n in again if n.op == "batch_norm"] == [True] * 20


def test_frozen_batch_norm_exports_to_onnx():
    ort = pytest.importorskip("onnxruntime")
    model = _frozen_resnet18().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    proto = graphshape.to_onnx(graphshape.load(model, x))
    assert [n.op_type for n in proto.graph.node].count("BatchNormalization") == 20
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {proto.graph.input[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_analysis_takes_a_frozen_norm_as_its_affine_map():
    """Predicted q after each frozen norm follows its scale and shift: at a wide layer it
    matches the measured value (a training-mode batch norm would predict q = 1)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 256, 3, padding=1), FrozenBatchNorm2d(256),
                                torch.nn.ReLU(), torch.nn.Conv2d(256, 256, 1),
                                FrozenBatchNorm2d(256))
    _randomize_statistics(model, seed=3)
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    result = graphshape.analyze(model, x, empirical=True)
    rows = {r["op"] + str(i): r for i, r in enumerate(result.rows) if r["op"] == "batch_norm"}
    assert len(rows) == 2
    for row in rows.values():
        assert abs(row["q_pred"] - 1.0) > 0.2  # far from what normalizing would give
        assert row["q_emp"] == pytest.approx(row["q_pred"], rel=0.1)


def test_shaping_removes_frozen_norms_as_it_removes_batch_norm():
    """The shaped network is the one shaped from the same model with BatchNorm2d: the same
    state_dict, value for value, and no trace of the pretrained statistics."""
    x = torch.randn(1, 3, 32, 32)
    torch.manual_seed(0)
    plain = _randomize_statistics(torchvision.models.resnet18())
    shaped_frozen = graphshape.shape(_frozen_resnet18(), x, method="TAT", seed=0)
    shaped_plain = graphshape.shape(plain, x, method="TAT", seed=0)
    report = shaped_frozen.meta["graphshape"]
    assert [r["op"] for r in report.removed].count("batch_norm") == 20
    assert not [m for m in shaped_frozen.modules()
                if isinstance(m, (FrozenBatchNorm2d, tm.FrozenBatchNorm))]
    frozen_state, plain_state = shaped_frozen.state_dict(), shaped_plain.state_dict()
    assert sorted(frozen_state) == sorted(plain_state)
    for key, value in plain_state.items():
        torch.testing.assert_close(frozen_state[key], value, rtol=0, atol=0, msg=key)
    assert report.activation_params == shaped_plain.meta["graphshape"].activation_params


def test_timm_frozen_norm_act_maps_to_frozen_norm_plus_activation():
    norm_act = pytest.importorskip("timm.layers.norm_act")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        norm_act.FrozenBatchNormAct2d(8, act_layer=torch.nn.SiLU),
        torch.nn.Conv2d(8, 8, 3, padding=1), norm_act.FrozenBatchNorm2d(8),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    gen = torch.Generator().manual_seed(5)
    for m in (model[1], model[3]):
        m.running_mean.normal_(generator=gen), m.weight.uniform_(0.5, 2.0, generator=gen)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    graph = graphshape.load(model, x)
    assert [(n.op, n.attrs.get("frozen", n.attrs.get("name"))) for n in graph
            if n.op in ("batch_norm", "activation")] == [
        ("batch_norm", True), ("activation", "silu"), ("batch_norm", True)]
    gm = graphshape.to_torch(graph).train()
    with torch.no_grad():
        _close(gm(x), model.train()(x))
    shaped = graphshape.shape(model, x, method="DKS", seed=0)
    assert [r["op"] for r in shaped.meta["graphshape"].removed].count("batch_norm") == 2
    assert torch.isfinite(shaped(x)).all()


def test_a_detector_trains_with_its_shaped_backbone():
    """The README's advice for detection models: graphshape refuses the detector (its forward
    loops over images and boxes) and points at ``model.backbone``; the shaped backbone (a
    FrozenBatchNorm2d ResNet with an FPN, as torchvision builds pretrained ones) goes back
    in, and the detector runs, computes its losses and back-propagates through it."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    torch.manual_seed(0)
    detector = FasterRCNN(_resnet_fpn_extractor(_frozen_resnet18(), trainable_layers=5),
                          num_classes=3, min_size=64, max_size=64).eval()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    with pytest.raises(graphshape.GraphshapeError, match=r"model\.backbone = graphshape"):
        graphshape.shape(detector, (images,), method="TAT")
    detector.backbone = graphshape.shape(detector.backbone, torch.randn(1, 3, 64, 64),
                                         method="TAT", seed=0)
    assert not [m for m in detector.modules()
                if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d))]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 8.0, 60.0, 30.0]]), "labels": torch.tensor([2])}]
    losses = detector.train()(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in detector.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().max()) > 0 for g in grads)
    with torch.no_grad():
        detections = detector.eval()(images)
    assert len(detections) == 2 and set(detections[0]) == {"boxes", "labels", "scores"}


def test_an_exported_frozen_norm_is_removed_from_the_onnx_file(tmp_path):
    """``torch.onnx.export`` writes a frozen norm as Mul and Add by per-channel constants
    after the conv. Shaping the file removes them as it removes the norm in PyTorch: the
    same solved parameters and predicted kernels (kept, the pretrained statistics put the
    shaped file's output at q ~ 4e4)."""
    onnx = pytest.importorskip("onnx")
    x = torch.randn(1, 3, 32, 32)
    src = tmp_path / "frozen.onnx"
    torch.onnx.export(_frozen_resnet18().eval(), x, str(src), dynamo=False, opset_version=17)
    ops = [n.op_type for n in onnx.load(str(src)).graph.node]
    assert ops.count("Mul") == 20 and ops.count("Add") == 28  # + 8 residual sums
    before = src.read_bytes()
    report = graphshape.shape_onnx(str(src), str(tmp_path / "shaped.onnx"), method="TAT",
                                   seed=0)
    assert src.read_bytes() == before
    removed = [r for r in report.removed if "frozen batch norm" in r["what"]]
    assert sorted(r["op"] for r in removed) == ["add"] * 20 + ["mul"] * 20
    torch_shaped = graphshape.shape(_frozen_resnet18(), x, method="TAT", seed=0)
    want = torch_shaped.meta["graphshape"].activation_params
    for act, params in report.activation_params.items():
        for key, value in params.items():
            assert value == pytest.approx(want[act][key], rel=1e-9), (act, key)
    batch = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    q_onnx = graphshape.analyze(str(tmp_path / "shaped.onnx"), batch.numpy()).rows[-1]["q_pred"]
    q_torch = graphshape.analyze(torch_shaped, batch).rows[-1]["q_pred"]
    assert q_onnx == pytest.approx(q_torch, rel=1e-4)
    assert 0.5 < q_onnx < 2.0
