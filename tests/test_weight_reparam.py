"""Weight and spectral normalization (torch.nn.utils' parametrizations and their older
hooks) load as plain layers holding the weight they compute; shaping removes them as it
removes the other normalization. Forward hooks that the shaped model drops are reported."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import graphshape

REPARAMETRIZATIONS = {
    "weight_norm": parametrizations.weight_norm,
    "spectral_norm": parametrizations.spectral_norm,
    "weight_norm hook": nn.utils.weight_norm,
    "spectral_norm hook": nn.utils.spectral_norm,
}


def _net(wrap=lambda m: m):
    torch.manual_seed(0)
    return nn.Sequential(
        wrap(nn.Conv2d(3, 16, 3, padding=1)), nn.ReLU(),
        wrap(nn.Conv2d(16, 16, 3, padding=1)), nn.ReLU(), wrap(nn.ConvTranspose2d(16, 8, 2, stride=2)), nn.ReLU(),
        nn.Flatten(), wrap(nn.Linear(8 * 16 * 16, 10)))


def _trained_a_step(model, x):
    with torch.no_grad():
        model(x)  # spectral norm's power iteration moves its estimates once
    return model


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(REPARAMETRIZATIONS))
def test_loads_as_plain_layers_with_the_computed_weight(name):
    x = torch.randn(2, 3, 8, 8)
    model = _trained_a_step(_net(REPARAMETRIZATIONS[name]), x)
    before = _state(model)
    g = graphshape.load(model, x)
    layers = [n for n in g if n.op in ("conv", "conv_transpose", "linear")]
    assert len(layers) == 4 and "opaque" not in g.count_ops()
    kind = "spectral normalization" if "spectral" in name else "weight normalization"
    assert {n.meta["weight_normalization"] for n in layers} == {(kind, name.replace(
        " hook", "") + (" hook" if "hook" in name else " parametrization"))}
    # loading changed nothing: a training-mode spectral norm was not iterated
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.training
    emitted = graphshape.to_torch(g).eval()
    with torch.no_grad():
        torch.testing.assert_close(emitted(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    rows = [r for r in graphshape.analyze(g, x).rows if r["op"] in ("conv", "linear")]
    assert rows and all(r["q_pred"] is not None for r in rows)


@pytest.mark.parametrize("name", list(REPARAMETRIZATIONS))
def test_shaping_removes_it_as_a_normalization(name):
    x = torch.randn(2, 3, 8, 8)
    shaped = graphshape.shape(_net(REPARAMETRIZATIONS[name]), x, method="DKS", seed=2)
    plain = graphshape.shape(_net(), x, method="DKS", seed=2)
    report = shaped.meta["graphshape"]
    kind = "spectral normalization" if "spectral" in name else "weight normalization"
    assert len([r for r in report.rewritten if r["what"].startswith(f"{kind} removed")]) == 4
    assert report.initialized == 4
    assert report.activation_params == plain.meta["graphshape"].activation_params
    # the same network as shaping the model without the reparametrization
    assert shaped.state_dict().keys() == plain.state_dict().keys()
    assert "0.weight" in shaped.state_dict()
    torch.testing.assert_close(shaped(x), plain(x))


def test_other_parametrizations_stay_opaque_and_exact():
    model = _net()
    parametrizations.orthogonal(model[7])
    x = torch.randn(2, 3, 8, 8)
    g = graphshape.load(model, x)
    assert g.count_ops().get("opaque") == 1
    with torch.no_grad():
        torch.testing.assert_close(graphshape.to_torch(g)(x), model(x))


def _hook_warnings(shaped):
    return [w for w in shaped.meta["graphshape"].warnings if "forward hooks" in w]


def test_dropped_forward_hooks_are_reported():
    x = torch.randn(2, 3, 8, 8)
    assert _hook_warnings(graphshape.shape(_net(nn.utils.weight_norm), x, method="DKS")) == []
    model = _net()
    model[0].register_forward_hook(lambda mod, args, out: None)      # a mapped layer
    model[7].register_forward_pre_hook(lambda mod, args: None)
    model.register_forward_hook(lambda mod, args, out: None)         # the root, traced through
    (warning,) = _hook_warnings(graphshape.shape(model, x, method="DKS"))
    assert warning.startswith("3 module(s) had forward hooks")
    assert all(name in warning for name in ("'(the model)'", "'0'", "'7'"))


def test_pruned_layers_are_reported_as_pruned():
    """torch.nn.utils.prune's masks are forward pre-hooks: the layer is read with the masked
    weight; shaping names them as pruned (it said "forward hooks"), a layer with another
    hook beside them is still a hooked one."""
    from torch.nn.utils import prune

    x = torch.randn(2, 3, 8, 8)
    model = _net()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    prune.random_unstructured(model[2], "weight", amount=0.5)
    model[2].register_forward_hook(lambda mod, args, out: None)
    g = graphshape.load(model, x)
    assert g.meta["pruned"] == ["0"] and g.meta["dropped_hooks"] == ["2"]
    (conv,) = [n for n in g if n.name == "_0" or n.meta.get("module_path") == "0"]
    assert (conv.params["weight"] == 0).mean() == pytest.approx(0.5, abs=0.02)
    with torch.no_grad():
        torch.testing.assert_close(graphshape.to_torch(g)(x), model(x))
    warnings = graphshape.shape(model, x, method="DKS").meta["graphshape"].warnings
    assert any(w.startswith("1 layer(s) were pruned with torch.nn.utils.prune ('0')")
               for w in warnings)
    assert any(w.startswith("1 module(s) had forward hooks ('2')") for w in warnings)


def test_hooks_of_traced_through_modules_are_in_the_trace_and_reported_as_such():
    # fx calls a module it traces through with its hooks: an output the hook returns is
    # traced in (so the shaped model computes it), a side effect happens once, at trace time
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = _net()[:7], nn.Flatten()

        def forward(self, x):
            return self.head(self.body(x))

    model, seen = Outer(), []
    model.body.register_forward_hook(lambda mod, args, out: seen.append(out) or -out)
    x = torch.randn(2, 3, 8, 8)
    g = graphshape.load(model, x)
    assert g.meta["traced_hooks"] == ["body"] and "dropped_hooks" not in g.meta
    with torch.no_grad():
        torch.testing.assert_close(graphshape.to_torch(g)(x), model(x))
    (warning,) = [w for w in graphshape.shape(model, x, method="DKS").meta["graphshape"].warnings
                  if "hooks" in w]
    assert warning.startswith("1 module(s) that torch.fx traced through had forward hooks ('body')")


def test_a_hook_normalizing_another_tensor_keeps_the_layer_opaque():
    # the layer's own `bias` attribute is what the hook last computed: reading it as a
    # plain layer could be stale, so the layer stays the user's module
    model = _net()
    nn.utils.weight_norm(model[2], name="bias", dim=0)
    x = torch.randn(2, 3, 8, 8)
    g = graphshape.load(model, x)
    assert g.count_ops().get("opaque") == 1
    with torch.no_grad():
        torch.testing.assert_close(graphshape.to_torch(g)(x), model(x))
