"""forward's parameters that the example inputs leave out are traced at their defaults
(frontends.torch_fx._fixed_args), as torch.jit.trace and torch.export trace
``model(*example_inputs)``; the emitted module takes them back with a check."""

import functools
import inspect

import pytest
import torch
from torch import nn

import graphshape
from graphshape import GraphshapeError
from graphshape.backend_torch import emit
from graphshape.frontends.torch_fx import load_module


class Flagged(nn.Module):
    """A user's model: a feature flag, an optional mask and a scale, all with defaults."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(),
                                  nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.head = nn.Linear(32, 3)

    def forward(self, x, mask=None, scale: float = 2.0, *, return_features: bool = False):
        y = self.body(x)
        if return_features:
            return y
        y = self.head(y)
        if mask is not None:
            y = y * mask
        return y * scale


def _x():
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("example", [None, "x"])
def test_defaults_are_traced_as_the_call_without_them(example):
    model = Flagged().eval()
    graph = load_module(model, None if example is None else _x())
    assert list(graph.inputs) == ["x"]
    assert graph.meta["fixed_args"] == {"mask": None, "scale": 2.0, "return_features": False}
    # `if mask is not None` took the branch model(x) takes: no product with the mask
    assert sum(n.op == "mul" for n in graph) == 1
    gm = emit(graph)
    x = _x()
    torch.testing.assert_close(gm(x), model(x))
    # the source's calls with the defaults spelled out still work, by keyword or position
    torch.testing.assert_close(gm(x, None, 2.0, return_features=False), model(x))
    torch.testing.assert_close(gm(x, mask=None, scale=2), model(x))


@pytest.mark.parametrize("kwargs", [{"mask": torch.ones(5, 3)}, {"scale": 3.0},
                                    {"return_features": True}])
def test_other_values_are_refused_by_name(kwargs):
    gm = emit(load_module(Flagged().eval(), _x()))
    (name, value), = kwargs.items()
    with pytest.raises(GraphshapeError, match=f"traced with {name}="):
        gm(_x(), **kwargs)


def test_an_argument_given_in_the_example_inputs_stays_an_input():
    model = Flagged().eval()
    x, mask = _x(), torch.rand(5, 3)
    graph = load_module(model, (x, mask))
    assert list(graph.inputs) == ["x", "mask"]
    assert graph.meta["fixed_args"] == {"scale": 2.0, "return_features": False}
    gm = emit(graph)
    other = torch.rand(5, 3)
    torch.testing.assert_close(gm(x, other), model(x, other))


def test_a_required_argument_stays_an_input():
    class TwoInputs(nn.Module):
        def forward(self, x, y, alpha: float = 0.5):
            return torch.relu(x) + alpha * y

    graph = load_module(TwoInputs(), (torch.randn(2, 3), torch.randn(2, 3)))
    assert list(graph.inputs) == ["x", "y"]
    assert graph.meta["fixed_args"] == {"alpha": 0.5}


def test_a_flag_without_default_names_the_argument():
    class NoDefault(nn.Module):
        def forward(self, x, flag: bool):
            return x if flag else -x

    with pytest.raises(GraphshapeError, match="argument of forward that has no default"):
        load_module(NoDefault(), torch.randn(2))


def test_shaping_a_flagged_model_reports_the_fixed_arguments():
    torch.manual_seed(0)
    model = Flagged()
    shaped = graphshape.shape(model, _x(), method="dks")
    report = shaped.meta["graphshape"]
    assert any("return_features=False" in w and "mask=None" in w for w in report.warnings)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in shaped.modules())
    assert shaped(_x()).shape == (5, 3)
    with pytest.raises(GraphshapeError, match="return_features"):
        shaped(_x(), return_features=True)
    # fx traces the shaped model again (its check does not branch on a traced value), and
    # graphshape reads it back with the same arguments fixed
    torch.testing.assert_close(torch.fx.symbolic_trace(shaped)(_x()), shaped(_x()))
    again = load_module(shaped, _x())
    assert again.meta["fixed_args"] == {"mask": None, "scale": 2.0, "return_features": False}
    torch.testing.assert_close(emit(again)(_x()), shaped(_x()))


def _reloaded(module: nn.Module) -> nn.Module:
    """``module`` after ``torch.save`` / ``torch.load``."""
    import io

    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_the_check_survives_pickling():
    """torch.save / torch.load of a GraphModule traces its code again: the check is recorded
    (not run on the traced value and lost)."""
    gm = emit(load_module(Flagged().eval(), _x()))
    loaded = _reloaded(gm)
    torch.testing.assert_close(loaded(_x()), gm(_x()))
    with pytest.raises(GraphshapeError, match="wrapper module"):
        loaded(_x(), return_features=True)
    with pytest.raises(GraphshapeError, match="a tensor for mask in the example inputs"):
        loaded(_x(), mask=torch.ones(5, 3))


# --------------------------------------------------------------------------- container inputs
class _Body(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(*[m for _ in range(16) for m in (nn.Linear(16, 16), nn.ReLU())])
        self.head = nn.Linear(16, 3)


class DictIn(_Body):
    """forward(self, batch) called with a dict, returning a dict (a trainer's convention)."""

    def forward(self, batch):
        return {"logits": self.head(self.body(batch["image"]))}


class TensorIn(_Body):
    def forward(self, x):
        return self.head(self.body(x))


def test_a_dict_input_entry_is_read_as_an_input():
    x = torch.randn(6, 16) * 1.7
    model, batch = DictIn(), ({"image": x, "label": torch.zeros(6, dtype=torch.long)},)
    stats = graphshape.analyze(model, batch, empirical=True)
    twin = graphshape.analyze(TensorIn(), (x,))
    entry = next(r for r in stats.rows if "input entry" in r["flags"])
    assert entry["q_pred"] == pytest.approx(float((x.double() ** 2).mean()), rel=1e-6)
    assert entry["q_emp"] == pytest.approx(entry["q_pred"], rel=1e-6)
    # every layer after it: the same prediction as the same network taking the tensor
    last = lambda s: next(r for r in reversed(s.rows) if r["op"] == "linear")  # noqa: E731
    assert last(stats)["q_pred"] == pytest.approx(last(twin)["q_pred"], rel=1e-9)
    assert last(stats)["q_emp"] is not None
    shaped = graphshape.shape(model, batch, eta=0.85)
    assert not any("opaque" in w for w in shaped.meta["graphshape"].warnings)
    assert shaped.meta["graphshape"].activation_params == \
        graphshape.shape(TensorIn(), (x,), eta=0.85).meta["graphshape"].activation_params
    assert shaped(batch[0])["logits"].shape == (6, 3)


def test_a_dict_example_input_missing_an_entry_the_model_reads():
    model = DictIn()
    graph = graphshape.load(model, ({"image": torch.randn(2, 16)},))
    with pytest.raises(GraphshapeError, match="no entry 'image'"):
        graphshape.analyze(graph, ({"picture": torch.randn(2, 16)},))
    with pytest.raises(GraphshapeError, match=r"batch\['image'\].*rank"):
        graphshape.analyze(graph, ({"image": torch.randn(2, 4, 16)},))


# --------------------------------------------------------------------------- *args / **kwargs
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(),
                                  nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.head = nn.Linear(32, 3)


class HFStyle(_Net):
    """Hugging Face's signature: every parameter has a default, then ``**kwargs``."""

    def forward(self, x=None, labels=None, return_dict=None, **kwargs):
        logits = self.head(self.body(x))
        return logits * kwargs.get("temperature", 1.0)


class StarArgs(_Net):
    def forward(self, x, *extra, scale: float = 1.0):
        y = self.head(self.body(x))
        for e in extra:
            y = y + e
        return y * scale


def _hf_wrapper(forward):
    """A decorator as Hugging Face's (``can_return_tuple``): wrapper(self, *args, **kwargs)."""
    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        kwargs.setdefault("return_dict", True)
        return forward(self, *args, **kwargs)
    return wrapper


class Decorated(_Net):
    @_hf_wrapper
    def forward(self, x, return_dict=None, **kwargs):
        return self.head(self.body(x))


@pytest.mark.parametrize("cls", [HFStyle, StarArgs, Decorated])
def test_var_args_are_traced_empty_and_taken_back_with_a_check(cls):
    """``model(x)`` passes no ``*args`` / ``**kwargs``: they are traced empty (fx made one
    proxy of each, on which ``kwargs.get`` failed and a decorator's wrapper misbound the
    arguments), and the shaped forward takes them back, refusing what it was not traced
    with. HFStyle's emitted forward did not even compile (``_kwargs`` after a default)."""
    model = cls().eval()
    graph = load_module(model, (_x(),))
    assert graph.meta.get("traced_with") != "torch.onnx.export"  # fx traced it
    shaped = graphshape.shape(model, _x(), method="dks")
    assert shaped(_x()).shape == (5, 3)
    params = inspect.signature(shaped.forward).parameters.values()
    kinds = [p.kind for p in params]
    assert inspect.Parameter.VAR_KEYWORD in kinds or inspect.Parameter.VAR_POSITIONAL in kinds
    if inspect.Parameter.VAR_KEYWORD in kinds:
        with pytest.raises(GraphshapeError, match="'temperature'"):
            shaped(_x(), temperature=2.0)
    else:
        with pytest.raises(GraphshapeError, match="1 more positional argument"):
            shaped(_x(), torch.ones(3))
    report = shaped.meta["graphshape"]
    assert any("empty" in w for w in report.warnings)


def test_var_positional_given_by_the_example_inputs_stays_variadic():
    """``forward(self, *xs)`` called with two tensors: the shaped model takes them the same
    way (it was emitted as ``forward(self, _xs)``, one argument)."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, *xs):
            return torch.tanh(self.a(xs[0])) + torch.tanh(self.b(xs[1]))

    x, y = _x(), _x() * 2
    shaped = graphshape.shape(Two(), (x, y), method="dks")
    assert shaped(x, y).shape == (5, 8)
    kinds = [p.kind for p in inspect.signature(shaped.forward).parameters.values()]
    assert kinds == [inspect.Parameter.VAR_POSITIONAL]


def test_the_var_kwargs_check_survives_pickling():
    gm = emit(load_module(HFStyle().eval(), (_x(),)))
    loaded = _reloaded(gm)
    torch.testing.assert_close(loaded(_x()), gm(_x()))
    with pytest.raises(GraphshapeError, match="'temperature'"):
        loaded(_x(), temperature=2.0)


def test_a_shaped_var_kwargs_model_goes_through_torch_export():
    """torch.export's module passes ``**kwargs`` as an empty container of its own kind,
    which the check took for extra positional arguments."""
    shaped = graphshape.shape(HFStyle().eval(), _x(), method="dks").eval()
    program = torch.export.export(shaped, (_x(),))
    torch.testing.assert_close(program.module()(_x()), shaped(_x()))
