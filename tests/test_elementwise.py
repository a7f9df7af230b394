"""Spelled-out activations (``x * torch.sigmoid(x)``, the erf and tanh GELUs, ...) load as
one activation node, from PyTorch and from ONNX; what is not an activation stays as it is."""

import math

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphshape
from graphshape import GraphshapeError
from graphshape.passes.elementwise import fuse_activation_decompositions

SQRT2 = math.sqrt(2.0)

#: case -> (function of x, activation name, attrs)
SPELLED = {
    "x*sigmoid(x)": (lambda x: x * torch.sigmoid(x), "silu", {}),
    "sigmoid(x)*x method": (lambda x: x.sigmoid() * x, "silu", {}),
    "mish": (lambda x: x * torch.tanh(F.softplus(x)), "mish", {}),
    "hardswish x*relu6(x+3)/6": (lambda x: x * F.relu6(x + 3) / 6, "hardswish", {}),
    "hardswish x*(relu6(x+3)/6)": (lambda x: x * (F.relu6(x + 3.0) / 6.0), "hardswish", {}),
    "hardsigmoid": (lambda x: F.relu6(x + 3) / 6, "hardsigmoid", {}),
    "gelu erf": (lambda x: 0.5 * x * (1 + torch.erf(x / SQRT2)), "gelu_exact", {}),
    "gelu erf other order": (lambda x: x * (torch.erf(x * (1 / SQRT2)) + 1.0) * 0.5,
                             "gelu_exact", {}),
    "gelu tanh pow": (lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi)
                                                          * (x + 0.044715 * torch.pow(x, 3)))),
                      "gelu", {}),
    "gelu tanh x**3": (lambda x: 0.5 * x * (1.0 + torch.tanh(0.7978845608
                                                             * (x + 0.044715 * x ** 3))),
                       "gelu", {}),
    "selu": (lambda x: 1.0507009873554805 * F.elu(x, 1.6732632423543772), "selu", {}),
    "sigmoid 1/(1+exp(-x))": (lambda x: 1 / (1 + torch.exp(-x)), "sigmoid", {}),
    "softplus log1p(exp)": (lambda x: torch.log1p(torch.exp(x)), "softplus", {}),
    "leaky relu(x)-0.2relu(-x)": (lambda x: F.relu(x) - 0.2 * F.relu(-x), "leaky_relu",
                                  {"negative_slope": 0.2}),
    "tanh 2sigmoid(2x)-1": (lambda x: 2 * torch.sigmoid(2 * x) - 1, "tanh", {}),
    "elu alpha 0.5 spelled": (lambda x: F.relu(x) + 0.5 * (torch.exp(-F.relu(-x)) - 1),
                              "elu", {"alpha": 0.5}),
    "leaky where(x>0, x, 0.2x)": (lambda x: torch.where(x > 0, x, 0.2 * x), "leaky_relu",
                                  {"negative_slope": 0.2}),
    "leaky maximum(x, 0.1x)": (lambda x: torch.maximum(x, 0.1 * x), "leaky_relu",
                               {"negative_slope": 0.1}),
    "relu maximum(x, zeros_like)": (lambda x: torch.maximum(x, torch.zeros_like(x)), "relu", {}),
    # one call alone, and torch.max / Tensor.max of two tensors (not the reduction)
    "relu maximum(x, tensor(0))": (lambda x: torch.maximum(x, torch.tensor(0.0)), "relu", {}),
    "leaky torch.max(x, 0.2x)": (lambda x: torch.max(x, 0.2 * x), "leaky_relu",
                                 {"negative_slope": 0.2}),
    "leaky x.max(0.1x)": (lambda x: x.max(0.1 * x), "leaky_relu", {"negative_slope": 0.1}),
    "relu6 min(max(x, 0), 6)": (lambda x: torch.min(torch.max(x, torch.zeros_like(x)),
                                                    torch.full_like(x, 6.0)), "relu6", {}),
    # CLIP's QuickGELU (a sigmoid approximation of GELU) and a Swish of fixed beta:
    # silu(b x) / b, as onnxruntime's QuickGelu op is read
    "quick gelu x*sigmoid(1.702x)": (lambda x: x * torch.sigmoid(1.702 * x), "silu",
                                     {"transform": {"input_scale": 1.702,
                                                    "output_scale": 1 / 1.702}}),
    "swish beta 0.5": (lambda x: x * torch.sigmoid(x * 0.5), "silu",
                       {"transform": {"input_scale": 0.5, "output_scale": 2.0}}),
    "clamp(min=0)": (lambda x: x.clamp(min=0), "relu", {}),
    "torch.clamp_min": (lambda x: torch.clamp_min(x, 0.0), "relu", {}),
    "clamp(0, 6)": (lambda x: torch.clamp(x, 0, 6), "relu6", {}),
    "clip(-2, 2)": (lambda x: x.clip(-2.0, 2.0), "hardtanh", {"min_val": -2.0, "max_val": 2.0}),
}


class Deep(nn.Module):
    """Four conv layers, each followed by ``act``, then a linear head."""

    def __init__(self, act):
        super().__init__()
        self.act = act
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1)
                                   for i in range(4))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        for conv in self.convs:
            x = self.act(conv(x))
        return self.head(x.mean((2, 3)))


X = torch.randn(2, 3, 8, 8)


def _activations(graph):
    return [(n.attrs["name"], {k: v for k, v in n.attrs.items() if k not in ("name", "inplace")})
            for n in graph if n.op == "activation"]


@pytest.mark.parametrize("case", list(SPELLED))
def test_spelled_out_activation_loads_as_one_node(case):
    fn, name, attrs = SPELLED[case]
    torch.manual_seed(0)
    model = Deep(fn).eval()
    graph = graphshape.load(model, X)
    assert _activations(graph) == [(name, attrs)] * 4, graph.table()
    # nothing of the spelled-out form is left: conv -> activation -> conv ...
    assert {n.op for n in graph} <= {"input", "conv", "activation", "reduce", "linear",
                                     "output"}, graph.table()
    with torch.no_grad():
        torch.testing.assert_close(graphshape.to_torch(graph)(X), model(X),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["x*sigmoid(x)", "mish", "gelu tanh pow",
                                  "quick gelu x*sigmoid(1.702x)"])
def test_spelled_out_activation_shapes_like_the_module(case):
    fn, name, _ = SPELLED[case]
    module = {"silu": nn.SiLU(), "mish": nn.Mish(), "gelu": nn.GELU(approximate="tanh")}[name]
    spelled = graphshape.shape(Deep(fn), X, method="DKS", seed=0)
    plain = graphshape.shape(Deep(module), X, method="DKS", seed=0)
    assert spelled.meta["graphshape"].activation_params == plain.meta["graphshape"].activation_params
    torch.testing.assert_close(spelled(X), plain(X), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn, kept", [
    (lambda x: 1.7159 * torch.tanh(x), {"tanh", "mul"}),               # LeCun's tanh
    (lambda x: x * torch.tanh(x), {"tanh", "mul"}),                    # no listed one
    (lambda x: x * torch.sigmoid(-1.702 * x), {"sigmoid", "mul"}),     # (beta < 0)
    (lambda x: torch.clamp(x, min=1e-3), {"opaque"}),                  # clamp(min=eps)
    # one call alone, within GRID's tolerance of relu: the clamp F.normalize exports
    (lambda x: torch.maximum(x, torch.tensor(1e-12)), {"opaque"}),
], ids=["scaled tanh", "x tanh x", "negative beta swish", "clamp eps", "maximum eps"])
def test_what_is_no_listed_activation_stays(fn, kept):
    graph = graphshape.load(Deep(fn).eval(), X)
    assert kept <= set(graph.count_ops()) | {n.attrs.get("name") for n in graph}


class _CastAround(nn.Module):
    """An activation computed in float32 and cast back (mixed-precision code), module or
    function: the fused node is the trailing cast, which fx names 'to' / 'float'."""

    def __init__(self):
        super().__init__()
        self.act = nn.GELU()

    def forward(self, x):
        y = self.act(x.float()).to(x.dtype)
        return (torch.sigmoid(y) * y).float()


def test_an_activation_fused_with_its_casts_runs_under_a_free_name():
    # emitted as a submodule named 'to', which the forward's `self.to(c1)` did not reach
    # (Module.to moved the model to c1's dtype and returned it: "conv2d() received an
    # invalid combination of arguments"); the gelu takes the source's module path
    model = Deep(_CastAround()).eval()
    shaped = graphshape.shape(model, X, method="TAT", seed=0)
    assert shaped(X).shape == (2, 5)
    names = [name for name, _ in shaped.named_modules()]
    assert "act.act" in names and not {"to", "float"} & set(names)
    assert shaped.to(torch.float64) is shaped  # Module.to, the method


class _LearnableSwish(nn.Module):
    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.ones(()))  # silu at initialization, then trained

    def forward(self, x):
        return x * torch.sigmoid(self.beta * x)


def test_a_region_reading_a_parameter_is_not_fused():
    model = Deep(_LearnableSwish()).eval()
    graph = graphshape.load(model, X)
    assert "silu" not in {n.attrs.get("name") for n in graph}
    assert "act.beta" in graphshape.to_torch(graph).state_dict()


def test_a_value_read_outside_the_region_is_not_fused():
    # s = sigmoid(x) is also added to the output: x * s is not a closed region
    def act(x):
        s = torch.sigmoid(x)
        return x * s + s

    graph = graphshape.load(Deep(act).eval(), X)
    assert "silu" not in {n.attrs.get("name") for n in graph}
    assert graph.count_ops()["mul"] == 4


def test_a_gate_on_another_value_is_still_refused():
    model = Deep(lambda x: x * torch.sigmoid(x.mean(1, keepdim=True)))
    with pytest.raises(GraphshapeError, match="gates another signal"):
        graphshape.shape(model, X, method="DKS")


class _HandNorm(nn.Module):
    def forward(self, x):
        u = x.mean(1, keepdim=True)
        var = (x - u).pow(2).mean(1, keepdim=True)
        return (x - u) / torch.sqrt(var + 1e-5)


def test_a_hand_written_norms_square_is_not_read_as_an_activation():
    graph = graphshape.load(nn.Sequential(nn.Conv2d(3, 8, 3), _HandNorm(), nn.ReLU()), X)
    assert [n.attrs["name"] for n in graph if n.op == "activation"] == ["relu"]


@pytest.mark.parametrize("case", ["mish", "gelu tanh pow", "hardswish x*relu6(x+3)/6",
                                  "x*sigmoid(x)", "gelu erf", "leaky where(x>0, x, 0.2x)",
                                  "leaky maximum(x, 0.1x)", "relu maximum(x, tensor(0))",
                                  "leaky torch.max(x, 0.2x)", "quick gelu x*sigmoid(1.702x)"])
def test_onnx_exports_of_spelled_out_activations_read_the_same(case, tmp_path):
    # TorchScript export at opset 17 keeps every spelled-out form (and has no Mish op below
    # 18, no tanh Gelu below 20): the ONNX path fuses them as the PyTorch path does
    fn, name, attrs = SPELLED[case]
    torch.manual_seed(0)
    model = Deep(fn).eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (X,), path, dynamo=False, opset_version=17)
    assert not any(n.op_type in ("Mish", "Gelu", "HardSwish") for n in onnx.load(path).graph.node)
    graph = graphshape.load(str(path))
    assert _activations(graph) == [(name, attrs)] * 4, graph.table()
    report = graphshape.shape_onnx(path, tmp_path / "s.onnx", method="DKS")
    want = graphshape.shape(Deep(fn), X, method="DKS").meta["graphshape"].activation_params
    assert report.activation_params.keys() == want.keys() == {name}
    assert report.activation_params[name] == pytest.approx(want[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_clip_of_an_exported_l2_normalization_is_not_a_relu(tmp_path, dtype):
    # F.normalize exports ReduceL2, Clip(min=1e-12), Expand, Div: the lone Clip is within
    # the grid's tolerance of relu, and was read as one (swin_v2 through ONNX: TAT refused
    # "relu beside gelu_exact"). In fp16, 1e-12 is 0: Clip(min=0) of the norm, which was
    # read as a relu that shaping then transformed (edgenext_xx_small in fp16: DKS solved
    # 'relu' and changed the normalization)
    class CosineMix(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.act = nn.GELU()

        def forward(self, x):
            y = self.act(self.conv(x))
            return y + F.normalize(y, dim=1)

    path = tmp_path / "m.onnx"
    torch.onnx.export(CosineMix().eval().to(dtype), (X.to(dtype),), path, dynamo=False,
                      opset_version=17)
    assert "Clip" in {n.op_type for n in onnx.load(path).graph.node}
    graph = graphshape.load(str(path))
    assert _activations(graph) == [("gelu_exact", {})], graph.table()
    report = graphshape.shape_onnx(path, tmp_path / "s.onnx", method="DKS")
    assert set(report.activation_params) == {"gelu_exact"}


def test_the_pass_reports_what_it_fused_and_leaves_its_input_alone():
    from graphshape.ir import Graph, Node, TensorInfo

    graph = Graph({"source": "torch"})
    info = [TensorInfo((2, 8), "float32")]
    graph.add(Node("x", "input", attrs={"name": "x"}, outputs=info))
    graph.add(Node("sig", "activation", [graph["x"].out], {"name": "sigmoid"}, outputs=info))
    graph.add(Node("mul", "mul", [graph["x"].out, graph["sig"].out], outputs=info))
    graph.add(Node("out", "output", [graph["mul"].out], outputs=info))
    fused, record = fuse_activation_decompositions(graph)
    assert record == {"fused": [{"node": "mul", "activation": "silu", "attrs": {},
                                 "replaced": ["sig", "mul"]}]}
    assert [(n.name, n.op) for n in fused] == [("x", "input"), ("mul", "activation"),
                                                ("out", "output")]
    assert fused["mul"].meta["fused_from"] == ["sig", "mul"]
    assert [n.op for n in graph] == ["input", "activation", "mul", "output"]  # a copy
    assert fuse_activation_decompositions(fused)[1] == {"fused": []}


def _gamma_gelu(x):
    """NF-Nets' GammaAct(gelu), gamma * gelu(x), as torch.onnx.export writes it (timm's
    dm_nfnet_f0): the gamma folded into GELU's 0.5, so no part of it is GELU alone."""
    return x * (0.5 * 1.7015043) * (1 + torch.erf(x / SQRT2))


def test_a_scaled_spelled_out_activation_is_the_activation_then_its_scale():
    torch.manual_seed(0)
    model = Deep(_gamma_gelu).eval()
    graph = graphshape.load(model, X)
    assert _activations(graph) == [("gelu_exact", {})] * 4, graph.table()
    scales = [n for n in graph if n.op == "mul"]
    assert len(scales) == 4
    for mul in scales:
        (const,) = [graph[r.node] for r in mul.inputs if graph[r.node].op == "constant"]
        assert float(const.params["value"]) == pytest.approx(1.7015043)
    with torch.no_grad():
        torch.testing.assert_close(graphshape.to_torch(graph)(X), model(X),
                                   rtol=1e-5, atol=1e-5)


def test_a_scaled_activation_shapes_like_the_activation(tmp_path):
    """Shaping drops the scale after the transformed activation: the same parameters and the
    same network as from nn.GELU, from PyTorch and from the ONNX export (before, the
    spelled-out erf was transformed as an activation of its own)."""
    plain = graphshape.shape(Deep(nn.GELU()), X, method="DKS", seed=0)
    spelled = graphshape.shape(Deep(_gamma_gelu), X, method="DKS", seed=0)
    report = spelled.meta["graphshape"]
    assert report.activation_params == plain.meta["graphshape"].activation_params
    assert len([r for r in report.removed if "after transformed activation" in r["what"]]) == 4
    torch.testing.assert_close(spelled(X), plain(X), rtol=1e-5, atol=1e-5)
    path = tmp_path / "m.onnx"
    torch.onnx.export(Deep(_gamma_gelu).eval(), (X,), path, dynamo=False, opset_version=17)
    onnx_report = graphshape.shape_onnx(path, tmp_path / "s.onnx", method="DKS", seed=0)
    assert onnx_report.activation_params.keys() == {"gelu_exact"}
    assert onnx_report.activation_params["gelu_exact"] == pytest.approx(
        report.activation_params["gelu_exact"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_exports_of_spelled_out_activations_read_the_same(dtype):
    """An fp16 / bf16 file's GELU (exported before opset 20) has its constants rounded
    (sqrt(2) is 1.4140625): still the GELU it spells, exact or tanh (the closer of the
    two), and QuickGELU still not a GELU. (Nothing was read: the file was refused as
    products of signals; a bf16 file could not be emitted to torch either.)"""
    import io

    acts = [nn.GELU(), nn.SiLU(), nn.GELU(approximate="tanh"), nn.Mish(), _QuickGELU()]
    layers = [nn.Linear(16, 16)]
    for act in acts:
        layers += [act, nn.Linear(16, 16)]
    model = nn.Sequential(*layers).to(dtype).eval()
    x = torch.randn(4, 16, dtype=dtype)
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=17)
    graph = graphshape.load(buffer.getvalue())
    assert [name for name, _ in _activations(graph)] == [
        "gelu_exact", "silu", "gelu", "mish", "silu"], graph.table()
    assert _activations(graph)[-1][1]["transform"]["input_scale"] == pytest.approx(1.702, rel=1e-2)
    emitted = graphshape.to_torch(graph)
    assert next(emitted.parameters()).dtype == dtype
    with torch.no_grad():
        torch.testing.assert_close(emitted(x), model(x), rtol=2e-2, atol=2e-2)
    shaped = graphshape.shape(buffer.getvalue(), x, method="DKS")
    assert set(shaped.meta["graphshape"].activation_params) == {"gelu_exact", "silu", "gelu",
                                                                 "mish"}


class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)
