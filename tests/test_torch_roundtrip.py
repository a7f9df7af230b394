"""torchvision models: to_torch(load(m, x)) reproduces outputs and input gradients."""

import pytest
import torch
import torchvision
from torch import nn

import graphshape
from graphshape.backend_torch import emit
from graphshape.frontends.torch_fx import load_module

# model name -> (constructor kwargs, input side). 64x64 is the smallest size every one of
# these accepts without a zero-sized feature map.
MODELS = {
    "resnet18": ({}, 64), "resnet50": ({}, 64), "resnext50_32x4d": ({}, 64),
    "vgg11_bn": ({}, 64), "densenet121": ({}, 64), "mobilenet_v2": ({}, 64),
    "mobilenet_v3_small": ({}, 64), "efficientnet_b0": ({}, 64), "regnet_x_400mf": ({}, 64),
    "shufflenet_v2_x0_5": ({}, 64), "squeezenet1_0": ({}, 64),
    "googlenet": ({"aux_logits": False, "init_weights": True}, 64),
    "convnext_tiny": ({}, 64), "mnasnet0_5": ({}, 64),
}


def _model(name):
    torch.manual_seed(0)
    kwargs, side = MODELS[name]
    return getattr(torchvision.models, name)(weights=None, **kwargs).eval(), side


@pytest.mark.parametrize("name", list(MODELS))
def test_outputs_and_input_gradients_match(name):
    model, side = _model(name)
    x = torch.randn(1, 3, side, side)
    graph = graphshape.load(model, x)
    emitted = graphshape.to_torch(graph).eval()
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in emitted.parameters())
    # only input gradients are compared: skip the weight gradients' cost on both sides
    model.requires_grad_(False), emitted.requires_grad_(False)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = model(xa), emitted(xb)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    # a random cotangent, so that every output contributes to the gradient
    cot = torch.randn_like(ya)
    (ya * cot).sum().backward()
    (yb * cot).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-5)
    # same state_dict keys: modules sit at their source paths, so weights load both ways
    assert set(emitted.state_dict()) == set(model.state_dict())
    # every weight-bearing layer is a real torch module in the emitted model
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in emitted.modules()) == n_convs
    # nothing the tracer met in these models is opaque except shape arithmetic
    opaque = [n for n in graph if n.op == "opaque"]
    assert all("shape_computation" in n.meta["flags"] for n in opaque), [n.name for n in opaque]


def test_resnet18_structure_for_the_analysis():
    model, side = _model("resnet18")
    graph = load_module(model, torch.randn(1, 3, side, side))
    counts = graph.count_ops()
    assert counts["conv"] == 20 and counts["batch_norm"] == 20 and counts["linear"] == 1
    assert counts["add"] == 8 and counts["activation"] == 17
    assert counts.get("opaque", 0) == 0
    # residual adds join two signals; names follow the fx/module names
    for node in graph:
        if node.op == "add":
            assert len(node.inputs) == 2
            assert all(graph[r.node].op in ("batch_norm", "activation", "max_pool") for r in node.inputs)
    assert graph["layer1_0_conv1"].op == "conv"
    assert graph["layer1_0_conv1"].meta["module_path"] == "layer1.0.conv1"
    assert graph["layer1_0_conv1"].attrs["pads"] == (1, 1, 1, 1)
    assert {n.attrs["name"] for n in graph if n.op == "activation"} == {"relu"}
    assert graph["layer1_0_conv1"].shape == (1, 64, 16, 16)
    gm = emit(graph)
    # fx names are the IR names; the state dict has the source's keys
    assert gm.meta["graphshape_nodes"]["layer1_0_conv1"] == "layer1_0_conv1"
    assert set(gm.state_dict()) == set(model.state_dict())


def test_train_mode_batch_norm_and_independent_parameters():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    emitted = graphshape.to_torch(graphshape.load(model, x))
    # loading ran shape propagation without touching the model's running statistics
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert emitted.training
    torch.testing.assert_close(emitted(x), model(x), rtol=1e-5, atol=1e-5)
    # both updated their running statistics the same way
    torch.testing.assert_close(emitted.state_dict()["bn1.running_mean"],
                               model.state_dict()["bn1.running_mean"])
    assert not torch.equal(model.state_dict()["bn1.running_mean"], before["bn1.running_mean"])
    # emitted parameters are trainable and own their memory
    src = dict(model.named_parameters())
    params = dict(emitted.named_parameters())
    assert set(params) == set(src)
    for name, p in params.items():
        assert isinstance(p, nn.Parameter) and p.requires_grad
        assert p.data_ptr() != src[name].data_ptr()
    with torch.no_grad():
        params["conv1.weight"].add_(1.0)
    assert not torch.equal(params["conv1.weight"], src["conv1.weight"])
    # a training step reaches every parameter
    emitted(x).sum().backward()
    assert all(p.grad is not None for p in emitted.parameters())
