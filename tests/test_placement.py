"""The shaped model comes back as the user's model was: same dtype, same device, and a
model wrapped by torch.compile / DataParallel is shaped through its wrapper."""

import pytest
import torch
import torchvision
from torch import nn

import graphshape
from graphshape.frontends.torch_fx import load_module


def _resnet(dtype=torch.float32):
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).to(dtype)


def _floating(module):
    return {name: t.dtype for name, t in list(module.named_parameters())
            + list(module.named_buffers()) if t.is_floating_point()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("method", ["TAT", "DKS"])
def test_shaped_model_keeps_the_source_dtype(dtype, method):
    # bfloat16 is float32 in the IR (numpy has none), shaping adds biases and transform
    # constants in the default dtype: all of it must come back in the model's dtype
    shaped = graphshape.shape(_resnet(dtype), method=method, seed=0)
    dtypes = _floating(shaped)
    assert dtypes and set(dtypes.values()) == {dtype}, {
        n: d for n, d in dtypes.items() if d != dtype}
    y = shaped(torch.randn(2, 3, 32, 32, dtype=dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()


def test_double_model_computes_the_same_function_as_float():
    x = torch.randn(2, 3, 32, 32)
    single = graphshape.shape(_resnet(), method="DKS", seed=3)
    double = graphshape.shape(_resnet(torch.float64), method="DKS", seed=3)
    torch.testing.assert_close(double(x.double()).float(), single(x), rtol=1e-4, atol=1e-4)


def test_bfloat16_round_trip_is_exact():
    model = _resnet(torch.bfloat16).eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    emitted = graphshape.to_torch(graphshape.load(model, x)).eval()
    assert set(_floating(emitted).values()) == {torch.bfloat16}
    with torch.no_grad():
        assert torch.equal(emitted(x), model(x))


def test_transform_constants_follow_the_model_not_the_default_dtype():
    # a float32 model shaped under a float64 default dtype: the activations' constants are
    # float32 (a float64 0-d buffer costs a conversion per call and misses the fused path)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        shaped = graphshape.shape(_resnet(torch.float32), method="DKS", seed=0)
    finally:
        torch.set_default_dtype(previous)
    assert set(_floating(shaped).values()) == {torch.float32}


def test_mixed_dtypes_are_not_forced_to_one():
    model = _resnet()
    model.fc.double()
    graph = load_module(model)
    assert "torch_dtype" not in graph.meta
    assert graph.meta["torch_device"] == "cpu"
    assert load_module(_resnet(torch.float16)).meta["torch_dtype"] == "float16"


def _compiled(m):
    return torch.compile(m)


@pytest.mark.parametrize("wrap", [nn.DataParallel, _compiled,
                                  lambda m: torch.compile(nn.DataParallel(m))],
                         ids=["DataParallel", "compile", "compile(DataParallel)"])
def test_wrapped_model_is_shaped_through_its_wrapper(wrap):
    x = torch.randn(2, 3, 32, 32)
    plain = graphshape.shape(_resnet(), method="DKS", seed=1)
    shaped = graphshape.shape(wrap(_resnet()), method="DKS", seed=1)
    assert type(shaped).__name__ == "ResNet"
    assert shaped.state_dict().keys() == plain.state_dict().keys()
    torch.testing.assert_close(shaped(x), plain(x))
    report = shaped.meta["graphshape"]
    assert report.activation_params == plain.meta["graphshape"].activation_params
    wrapped = [w for w in report.warnings if "was wrapped" in w]
    assert len(wrapped) == 1 and "(ResNet)" in wrapped[0], report.warnings
    assert not [w for w in plain.meta["graphshape"].warnings if "was wrapped" in w]


def test_wrapped_model_is_analyzed_through_its_wrapper():
    model = _resnet().eval()
    x = torch.randn(2, 3, 32, 32)
    a = graphshape.analyze(nn.DataParallel(model), x, empirical=True)
    b = graphshape.analyze(model, x, empirical=True)
    assert len(a.rows) == len(b.rows) > 20
    assert a.rows == b.rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_comes_back_on_cuda():
    model = _resnet().cuda()
    shaped = graphshape.shape(model, method="TAT", seed=0)
    assert {t.device.type for t in list(shaped.parameters()) + list(shaped.buffers())} == {"cuda"}
    y = shaped(torch.randn(2, 3, 32, 32, device="cuda"))
    assert y.device.type == "cuda" and torch.isfinite(y).all()


def test_frozen_parameters_stay_frozen():
    """A user who froze the stem (requires_grad=False) gets it back frozen, by name, and
    the report says shaping re-initialized it; the round trip without shaping keeps the
    flags too. Before, every parameter came back trainable."""
    model = _resnet()
    for p in list(model.conv1.parameters()) + list(model.layer1.parameters()):
        p.requires_grad_(False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    shaped = graphshape.shape(model, method="DKS", seed=0)
    still = {n for n, p in shaped.named_parameters() if not p.requires_grad}
    assert "conv1.weight" in still and "layer1.0.conv1.weight" in still
    assert still <= frozen  # the removed BatchNorms' parameters are gone, nothing else froze
    assert any("frozen" in w for w in shaped.meta["graphshape"].warnings)
    assert shaped.fc.weight.requires_grad
    emitted = graphshape.to_torch(load_module(model, torch.randn(2, 3, 32, 32)))
    assert {n for n, p in emitted.named_parameters() if not p.requires_grad} == frozen


def test_channels_last_model_comes_back_channels_last():
    # the re-initialized weights were made contiguous: a model converted for tensor-core
    # speed trained slower once shaped, without a word
    model = _resnet().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    shaped = graphshape.shape(model, x, method="TAT", seed=0)
    convs = [m.weight for m in shaped.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous() for w in convs)
    plain = graphshape.shape(_resnet(), x, method="TAT", seed=0)
    assert all(m.weight.is_contiguous() for m in plain.modules() if isinstance(m, nn.Conv2d))
    torch.testing.assert_close(shaped(x), plain(x))  # the same function
