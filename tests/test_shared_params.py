"""A tensor the source uses in several places stays one tensor: a weight two layers share
(``fc2.weight = fc1.weight``, an LM head tied to its embedding), a parameter also used
functionally, a module called twice (a siamese encoder, a recurrent block). Before, every
use became its own copy: the round trip had more parameters than the source, a source
checkpoint did not load, and training updated the copies apart."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphshape
from graphshape.passes.shaping import shape_graph
from untraceable import finite_or_raise


class TiedLayers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.fc2.weight = self.fc1.weight

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class FunctionalReuse(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(F.linear(torch.relu(self.fc1(x)), self.fc1.weight)))


class Siamese(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
        self.out = nn.Linear(32, 4)

    def forward(self, x, y):
        return self.out(torch.cat([self.block(self.block(x)), self.block(y)], 1))


class TiedLM(nn.Module):
    def __init__(self, vocab=50, width=32):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, width)
        self.body = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(width, width), nn.Tanh())])
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(self.body(self.emb(tokens)))


CASES = [(TiedLayers, lambda: (torch.randn(3, 16),)),
         (FunctionalReuse, lambda: (torch.randn(3, 16),)),
         (Siamese, lambda: (torch.randn(3, 16), torch.randn(3, 16)))]


SHARED = {TiedLayers: "fc1.weight", FunctionalReuse: "fc1.weight", Siamese: "block.0.weight"}


def _count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("cls, make_args", CASES, ids=[c.__name__ for c, _ in CASES])
def test_round_trip_keeps_shared_tensors_shared(cls, make_args):
    model, args = cls(), make_args()
    out = graphshape.to_torch(graphshape.load(model, args))
    assert _count(out) == _count(model)
    with torch.no_grad():
        torch.testing.assert_close(out(*args), model(*args))
    if cls is not FunctionalReuse:  # (its functional use is a module of its own there)
        assert out.state_dict().keys() == model.state_dict().keys()
        out.load_state_dict(model.state_dict(), strict=True)


def test_a_module_called_twice_stays_one_module():
    model, args = Siamese(), (torch.randn(3, 16), torch.randn(3, 16))
    out = graphshape.to_torch(graphshape.load(model, args))
    calls = [n.target for n in out.graph.nodes if n.op == "call_module"]
    assert calls.count("block.0") == 3


@pytest.mark.parametrize("fold", ["weights", "parameters", "none"])
@pytest.mark.parametrize("cls, make_args", CASES, ids=[c.__name__ for c, _ in CASES])
def test_shaping_initializes_a_shared_weight_once_and_keeps_it_shared(cls, make_args, fold):
    model, args = cls(), make_args()
    shaped = graphshape.shape(model, args, method="TAT", eta=0.3, fold_scales=fold, seed=0)
    assert _count(shaped) == _count(model)
    # the same function whatever the fold (a fold scales one use, never the shared tensor)
    unfolded = graphshape.shape(model, args, method="TAT", eta=0.3, fold_scales="none", seed=0)
    with torch.no_grad():
        torch.testing.assert_close(shaped(*args), unfolded(*args), rtol=1e-5, atol=1e-6)
    # as many distinct weights as the source; the shared one is SUO-initialized
    weights = {id(m.weight) for m in shaped.modules() if isinstance(m, nn.Linear)}
    assert len(weights) == len({id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)})
    shared = shaped.get_parameter(SHARED[cls])
    assert not torch.equal(shared, model.get_parameter(SHARED[cls]))
    gram = (shared @ shared.T).detach()
    torch.testing.assert_close(gram, gram[0, 0] * torch.eye(16), atol=1e-5, rtol=1e-5)


def test_a_weight_shared_with_an_opaque_module_is_kept_and_reported():
    model, tokens = TiedLM(), torch.randint(0, 50, (4, 7))
    before = model.emb.weight.detach().clone()
    shaped = graphshape.shape(model, tokens, method="DKS")
    assert shaped.head.weight is shaped.emb.weight
    torch.testing.assert_close(shaped.emb.weight.detach(), before)
    (warning,) = [w for w in shaped.meta["graphshape"].warnings if "share their weight" in w]
    assert "'head'" in warning and "'emb.weight'" in warning
    # the other layers were re-initialized: SUO rows
    w = shaped.get_submodule("body.0").weight.detach()
    torch.testing.assert_close(w @ w.T, (w @ w.T)[0, 0] * torch.eye(32), atol=1e-5, rtol=1e-5)


def test_a_gradient_step_moves_every_use():
    model, x = TiedLayers(), torch.randn(3, 16)
    shaped = graphshape.shape(model, x, method="DKS")
    opt = torch.optim.SGD(shaped.parameters(), lr=0.1)
    shaped(x).square().sum().backward()
    opt.step()
    assert shaped.fc2.weight is shaped.fc1.weight


def test_onnx_writes_a_shared_weight_once(tmp_path):
    model, x = TiedLayers(), torch.randn(3, 16)
    proto = graphshape.to_onnx(graphshape.load(model, x))
    weights = [i for i in proto.graph.initializer if tuple(i.dims) == (16, 16)]
    assert len(weights) == 1
    session = ort.InferenceSession(proto.SerializeToString())
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    # the same through shaping: one initialized tensor, written once
    graph = graphshape.load(model, x)
    shaped, _ = shape_graph(graph, method="DKS", fold_scales="none")
    proto = graphshape.to_onnx(shaped)
    assert len([i for i in proto.graph.initializer if tuple(i.dims) == (16, 16)]) == 1


def test_equal_parameters_of_different_layers_stay_apart_in_onnx(tmp_path):
    """Two layers' biases that are equal but not one tensor (the zero biases shaping gives
    every conv of a normalizer-free network) were written as one initializer when they had
    at most 16 entries, so a re-imported model trained them as one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3)).eval()
    with torch.no_grad():
        model[6].bias.zero_()
    x = torch.randn(2, 3, 12, 12)
    shaped, _ = shape_graph(graphshape.load(model, x), method="DKS")
    proto = graphshape.to_onnx(shaped)
    biases = [n.input[2] for n in proto.graph.node if n.op_type == "Conv"]
    assert len(biases) == len(set(biases)) == 3
    back = graphshape.to_torch(graphshape.load(proto))
    assert len([k for k in back.state_dict() if k.endswith("bias")]) == 3


class TwoTowers(nn.Module):
    """One embedding table (an opaque module) read by two inputs, and a layer tied to it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.mix = nn.Linear(16, 50, bias=False)
        self.mix.weight = self.emb.weight

    def forward(self, a, b):
        return self.mix(torch.tanh(self.emb(a) + self.emb(b)))


def test_an_opaque_module_called_twice_is_one_copy_tied_to_the_layer():
    model = TwoTowers()
    a, b = torch.randint(0, 50, (3, 5)), torch.randint(0, 50, (3, 5))
    graph = graphshape.load(model, (a, b))
    assert [graph[n].op for n in graph.topo_order()].count("opaque") == 2
    out = graphshape.to_torch(graph)
    assert _count(out) == _count(model)
    assert out.mix.weight is out.emb.weight
    assert [n.target for n in out.graph.nodes if n.op == "call_module"].count("emb") == 2
    with torch.no_grad():
        torch.testing.assert_close(out(a, b), model(a, b))
    assert model.emb.weight is not out.emb.weight  # a copy: the source stays the source's


class UntraceableSiamese(Siamese):
    """Siamese, with a check of values that torch.fx cannot trace: read through the
    model's ONNX export, where the block's tensors are one initializer each."""

    def forward(self, x, y):
        x = self.block(finite_or_raise(x))
        return self.out(torch.cat([self.block(x), self.block(y)], 1))


def test_the_onnx_export_path_keeps_shared_tensors_shared():
    model, args = UntraceableSiamese(), (torch.randn(3, 16), torch.randn(3, 16))
    graph = graphshape.load(model, args)
    assert graph.meta["traced_with"] == "torch.onnx.export"
    out = graphshape.to_torch(graph)
    assert _count(out) == _count(model)
    assert out.state_dict().keys() == model.state_dict().keys()
    out.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(out(*args), model(*args))
    shaped = graphshape.shape(model, args, method="DKS")
    assert _count(shaped) == _count(model)


def test_an_onnx_initializer_two_gemms_read_is_written_once(tmp_path):
    model, x = TiedLayers(), torch.randn(3, 16)
    model.fc2.bias = model.fc1.bias
    torch.onnx.export(model.eval(), (x,), str(tmp_path / "tied.onnx"), dynamo=False)
    source = [i.name for i in onnx.load(str(tmp_path / "tied.onnx")).graph.initializer]
    proto = graphshape.to_onnx(graphshape.load(str(tmp_path / "tied.onnx")))
    assert len(proto.graph.initializer) == len(source) == 4  # fc1 weight and bias, fc3's two
    session = ort.InferenceSession(proto.SerializeToString())
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-6)
