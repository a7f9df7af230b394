"""A shaped model returns what the source returned: a dict subclass (Hugging Face's
``ModelOutput``, an ``OrderedDict``) stays that class, on the torch.fx path, through the
ONNX fallback, after pickling and after shaping again; a named tuple's fields are the
graph's outputs (it was one opaque node)."""

import collections
import io
from dataclasses import dataclass, fields

import pytest
import torch
from torch import nn

import graphshape
from graphshape.frontends.torch_fx import load_module
from untraceable import finite_or_raise


class ModelOutputLike(collections.OrderedDict):
    """Hugging Face's ``ModelOutput`` in brief: a dataclass over an OrderedDict holding
    the fields that are not None, read as attributes, by key or by position; each subclass
    registered with torch's pytree, as transformers registers its outputs."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        torch.utils._pytree.register_pytree_node(
            cls, lambda out: (list(out.values()), list(out.keys())),
            lambda values, keys: cls(**dict(zip(keys, values))),
            serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                self[f.name] = value

    def __getitem__(self, key):
        return list(self.values())[key] if isinstance(key, int) else super().__getitem__(key)


@dataclass
class ClassifierOutput(ModelOutputLike):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    pooled: torch.Tensor | None = None


Pair = collections.namedtuple("Pair", "logits pooled")


class Net(nn.Module):
    """A small convnet with batch norm returning ``kind`` of output."""

    def __init__(self, kind="model_output", untraceable=False):
        super().__init__()
        torch.manual_seed(0)
        self.kind, self.untraceable = kind, untraceable
        layers = []
        for c_in in (3, 8, 8):
            layers += [nn.Conv2d(c_in, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Tanh()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(8, 4)

    def forward(self, x, labels=None):
        if self.untraceable:
            x = finite_or_raise(x)
        pooled = self.body(x).mean((2, 3))
        logits = self.head(pooled)
        if self.kind == "model_output":
            return ClassifierOutput(logits=logits, pooled=pooled)
        if self.kind == "ordered_dict":
            return collections.OrderedDict(logits=logits, pooled=pooled)
        return Pair(logits, pooled)


def _x():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fallback", [False, True], ids=["fx", "onnx_fallback"])
def test_a_model_output_stays_one(fallback):
    model = Net(untraceable=fallback).eval()
    graph = load_module(model, (_x(),))
    assert (graph.meta.get("traced_with") == "torch.onnx.export") == fallback
    shaped = graphshape.shape(model, _x(), method="DKS")
    out = shaped(_x())
    assert type(out) is ClassifierOutput  # was a plain dict: no .logits, no out[0]
    assert list(out.keys()) == ["logits", "pooled"]
    assert out.logits.shape == (2, 4) and out[0] is out.logits
    # the same structure as the source, the values of the shaped network
    reference = model(_x())
    assert [v.shape for v in out.values()] == [v.shape for v in reference.values()]


def test_an_ordered_dict_stays_one_and_pickling_keeps_both():
    for kind, cls in (("ordered_dict", collections.OrderedDict),
                      ("model_output", ClassifierOutput)):
        shaped = graphshape.shape(Net(kind).eval(), _x(), method="DKS")
        assert type(shaped(_x())) is cls
        buf = io.BytesIO()
        torch.save(shaped, buf)  # unpickling a GraphModule traces its code again
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        out = loaded(_x())
        assert type(out) is cls
        torch.testing.assert_close(out["logits"], shaped(_x())["logits"])


def test_shaping_a_shaped_model_keeps_its_output_class():
    shaped = graphshape.shape(Net().eval(), _x(), method="DKS")
    again = graphshape.shape(shaped, _x(), method="DKS")
    assert type(again(_x())) is ClassifierOutput


def test_named_tuple_fields_are_outputs_not_an_opaque_node():
    graph = load_module(Net("named_tuple").eval(), (_x(),))
    assert len(graph.output_nodes) == 2
    assert "opaque" not in graph.count_ops()
    shaped = graphshape.shape(Net("named_tuple").eval(), _x(), method="DKS")
    out = shaped(_x())
    assert type(out) is Pair and out.logits.shape == (2, 4) and out.pooled.shape == (2, 8)


class Tagged(dict):
    """A dict subclass whose constructor is not ``cls(**items)``."""

    def __init__(self, tag, items):
        super().__init__(items)
        self.tag = tag


def test_a_dict_subclass_it_cannot_rebuild_is_a_plain_dict():
    class Model(Net):
        def forward(self, x):
            pooled = self.body(x).mean((2, 3))
            return Tagged("t", {"logits": self.head(pooled)})

    shaped = graphshape.shape(Model().eval(), _x(), method="DKS")
    out = shaped(_x())
    assert type(out) is dict and out["logits"].shape == (2, 4)


def test_keys_that_are_not_identifiers_are_kept():
    """torchvision's FeaturePyramidNetwork returns OrderedDict("0": ..., "pool": ...):
    ``OrderedDict(0=...)`` is not Python, so the call passes the keys as data."""

    class Pyramid(Net):
        def forward(self, x):
            features = self.body(x)
            return collections.OrderedDict([("0", features), ("pool", features.mean((2, 3)))])

    shaped = graphshape.shape(Pyramid().eval(), _x(), method="DKS")
    buf = io.BytesIO()
    torch.save(shaped, buf)
    buf.seek(0)
    for module in (shaped, torch.load(buf, weights_only=False)):
        out = module(_x())
        assert type(out) is collections.OrderedDict and list(out) == ["0", "pool"]


class WithLoss(Net):
    """A classifier that computes its loss when given labels (Hugging Face's convention),
    with a check of its values fx cannot trace: read through its ONNX export, where the
    loss is a SoftmaxCrossEntropyLoss node (it could not be emitted back to PyTorch
    before)."""

    def forward(self, x, labels=None):
        x = finite_or_raise(x)
        logits = self.head(self.body(x).mean((2, 3)))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return ClassifierOutput(loss=loss, logits=logits)


def test_a_model_that_computes_its_loss_trains_through_the_onnx_fallback():
    x, labels = _x(), torch.tensor([1, 3])
    model = WithLoss().train()
    shaped = graphshape.shape(model, (x, labels), method="DKS")
    assert any("ONNX export" in w for w in shaped.meta["graphshape"].warnings)
    out = shaped(x, labels)
    assert type(out) is ClassifierOutput and list(out.keys()) == ["loss", "logits"]
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(out.logits, labels))
    optimizer = torch.optim.SGD(shaped.parameters(), lr=0.1)
    first = float(out.loss)
    for _ in range(5):
        loss = shaped(x, labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(shaped(x, labels).loss) < first
