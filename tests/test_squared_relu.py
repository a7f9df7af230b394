"""Squared ReLU, max(x, 0)^2 (Primer; the core of MetaFormer's StarReLU, ``s * relu(x) ** 2
+ b``, in timm's poolformerv2 / convformer / caformer). Spelled out, ``relu(x) ** 2`` read as
a relu followed by an opaque power: DKS "shaped" poolformerv2_s12 as a ReLU network, its
squares ignored. It is an activation of the registry now: the analysis follows it, and
DKS / TAT refuse it with the reason (no transform gives it Q'(1) = 1, as for dks's
``square``); ``activation=`` substitutes another."""

import numpy as np
import pytest
import torch
from torch import nn

import graphshape
from graphshape import activations
from graphshape.errors import GraphshapeError


class StarReLU(nn.Module):
    """timm's ``StarReLU``, as written there."""

    def __init__(self, scale_value=1.0, bias_value=0.0):
        super().__init__()
        self.relu = nn.ReLU()
        self.scale = nn.Parameter(scale_value * torch.ones(1))
        self.bias = nn.Parameter(bias_value * torch.ones(1))

    def forward(self, x):
        return self.scale * self.relu(x) ** 2 + self.bias


def _mlp(act=StarReLU, width=256):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, width), act(), nn.Linear(width, width), act(),
                         nn.Linear(width, 4)).eval()


X = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))


def test_the_registry_entry_is_relu_squared():
    act = activations.get("squared_relu")
    x = np.linspace(-3, 3, 13)
    np.testing.assert_allclose(act.fn(x), np.maximum(x, 0) ** 2)
    assert act.differentiable and not act.smooth and act.is_nondecreasing()


def test_spelled_out_it_reads_as_one_activation_and_round_trips():
    model = _mlp()
    graph = graphshape.load(model, X)
    assert [n.attrs["name"] for n in graph if n.op == "activation"] == ["squared_relu"] * 2
    assert "opaque" not in graph.count_ops()
    with torch.no_grad():
        torch.testing.assert_close(graphshape.to_torch(graph)(X), model(X), rtol=1e-5, atol=1e-5)
    import onnxruntime as ort

    session = ort.InferenceSession(graphshape.to_onnx(graph).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: X.numpy()})[0]
    np.testing.assert_allclose(got, model(X).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_the_analysis_follows_it():
    # before: unknown from the first power on (an opaque call)
    stats = graphshape.analyze(_mlp(), X, empirical=True)
    rows = {r["node"]: r for r in stats.rows}
    acts = [r for r in stats.rows if r["op"].startswith("activation")]
    assert [r["activation"] for r in acts] == ["squared_relu"] * 2
    assert not [r for r in acts if "opaque" in r["flags"]]  # (the power it was read from)
    last = [r for r in stats.rows if r["op"] == "linear"][-1]  # the output layer
    assert last["q_pred"] is not None
    # (finite width: measured/predicted 0.74 at the output, 256 units, 64 examples)
    assert last["q_emp"] == pytest.approx(last["q_pred"], rel=0.4)
    assert rows[acts[0]["node"]]["q_emp"] == pytest.approx(acts[0]["q_pred"], rel=0.2)


@pytest.mark.parametrize("method", ["DKS", "TAT"])
def test_dks_and_tat_refuse_it_with_the_reason(method):
    with pytest.raises(GraphshapeError, match="squared_relu grows like x\\^2") as err:
        graphshape.shape(_mlp(), X, method=method, seed=0)
    assert "activation=" in str(err.value)
    # substituted, the network shapes; StarReLU's learnable scale and bias stay
    shaped = graphshape.shape(_mlp(), X, method=method, seed=0, activation="gelu")
    assert list(shaped.meta["graphshape"].activation_params) == ["gelu"]
    assert sum("scale" in name or "bias" in name for name, _ in shaped.named_parameters()
               if name.startswith(("1.", "3."))) == 4
