"""ONNX ops that graphshape keeps opaque are emitted to PyTorch (graphshape.onnx_functions):
each equals onnxruntime, and a model exported with a dynamic batch axis (shape arithmetic
around the batch size) becomes a PyTorch module that runs at any batch size. Before, such a
model could only be written back as ONNX ("opaque onnx op ONNX Shape cannot be emitted to
torch")."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

import graphshape
from graphshape.api import load
from graphshape.backend_torch import emit
from test_onnx_roundtrip import run_ort

F32, I64 = TensorProto.FLOAT, TensorProto.INT64
RNG = np.random.default_rng(0)


def _model(op_type, inputs, attrs=None, opset=17, out_type=F32):
    """One ``op_type`` node over graph inputs ``inputs`` ([(name, elem_type, shape, value)]);
    value None: the input is absent (an empty name)."""
    given = [(n, t, s) for n, t, s, v in inputs if v is not None]
    names = [n if v is not None else "" for n, t, s, v in inputs]
    while names and not names[-1]:
        names.pop()
    node = helper.make_node(op_type, names, ["y"], **(attrs or {}))
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in given],
        [helper.make_tensor_value_info("y", out_type, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _f(*shape):
    return RNG.normal(size=shape).astype(np.float32)


def _i(*values):
    return np.array(values, np.int64)


# (id, op type, [(name, elem type, shape, value)], attributes, opset, output type)
CASES = [
    ("shape", "Shape", [("x", F32, [None, 3, 4], _f(2, 3, 4))], {}, 17, I64),
    ("shape_start_end", "Shape", [("x", F32, [None, 3, 4], _f(2, 3, 4))],
     {"start": 1, "end": -1}, 17, I64),
    ("reshape_zero", "Reshape", [("x", F32, [2, 3, 4], _f(2, 3, 4)), ("s", I64, [3], _i(0, -1, 2))],
     {}, 17, F32),
    ("expand_both_ways", "Expand", [("x", F32, [3, 1], _f(3, 1)), ("s", I64, [3], _i(2, 1, 4))],
     {}, 17, F32),
    ("cast", "Cast", [("x", F32, [5], np.array([1.7, -2.5, 0.2, 3.9, -0.6], np.float32))],
     {"to": TensorProto.INT64}, 17, I64),
    ("constant_of_shape", "ConstantOfShape", [("s", I64, [2], _i(2, 3))],
     {"value": helper.make_tensor("v", I64, [1], [7])}, 17, I64),
    ("range", "Range", [("a", I64, [], np.array(2, np.int64)), ("b", I64, [], np.array(11, np.int64)),
                        ("d", I64, [], np.array(3, np.int64))], {}, 17, I64),
    ("unsqueeze", "Unsqueeze", [("x", F32, [2, 3], _f(2, 3)), ("a", I64, [2], _i(-1, 0))], {}, 17, F32),
    ("unsqueeze_attr", "Unsqueeze", [("x", F32, [2, 3], _f(2, 3))], {"axes": [1, 3]}, 11, F32),
    ("squeeze", "Squeeze", [("x", F32, [2, 1, 3, 1], _f(2, 1, 3, 1)), ("a", I64, [1], _i(-1))],
     {}, 17, F32),
    ("gather_2d_negative", "Gather", [("x", F32, [4, 5], _f(4, 5)),
                                      ("i", I64, [2, 2], np.array([[0, -1], [2, 3]], np.int64))],
     {"axis": 1}, 17, F32),
    ("slice_negative_step", "Slice", [("x", F32, [6, 5], _f(6, 5)), ("s", I64, [2], _i(-1, 1)),
                                      ("e", I64, [2], _i(-100, 100)), ("a", I64, [2], _i(0, 1)),
                                      ("t", I64, [2], _i(-2, 2))], {}, 17, F32),
    ("slice_attr", "Slice", [("x", F32, [6, 5], _f(6, 5))],
     {"starts": [1], "ends": [1000], "axes": [1]}, 9, F32),
    ("pad_crop", "Pad", [("x", F32, [3, 4], _f(3, 4)), ("p", I64, [4], _i(1, -1, 2, 1)),
                         ("v", F32, [], np.array(0.5, np.float32))], {}, 17, F32),
    ("pad_reflect_axes", "Pad", [("x", F32, [3, 4], _f(3, 4)), ("p", I64, [2], _i(1, 2)),
                                 ("v", F32, [], None), ("a", I64, [1], _i(-1))],
     {"mode": "reflect"}, 18, F32),
    ("scatter_nd", "ScatterND", [("x", F32, [4, 3], _f(4, 3)), ("i", I64, [2, 1], _i(3, 0).reshape(2, 1)),
                                 ("u", F32, [2, 3], _f(2, 3))], {}, 17, F32),
    ("scatter_nd_add", "ScatterND", [("x", F32, [4, 3], _f(4, 3)),
                                     ("i", I64, [2, 2], np.array([[1, 2], [1, 2]], np.int64)),
                                     ("u", F32, [2], _f(2))], {"reduction": "add"}, 17, F32),
    ("tile", "Tile", [("x", F32, [2, 3], _f(2, 3)), ("r", I64, [2], _i(2, 3))], {}, 17, F32),
    ("clip_max_only", "Clip", [("x", F32, [6], _f(6)), ("lo", F32, [], None),
                               ("hi", F32, [], np.array(0.3, np.float32))], {}, 17, F32),
    ("reduce_l2", "ReduceL2", [("x", F32, [2, 3, 4], _f(2, 3, 4))],
     {"axes": [1], "keepdims": 0}, 17, F32),
    ("mod", "Mod", [("a", I64, [4], _i(7, -7, 7, -7)), ("b", I64, [4], _i(3, 3, -3, -3))],
     {}, 17, I64),
    ("fmod", "Mod", [("a", F32, [3], np.array([5.5, -5.5, 2.0], np.float32)),
                     ("b", F32, [3], np.array([2.0, 2.0, -1.5], np.float32))], {"fmod": 1}, 17, F32),
    ("div_int", "Div", [("a", I64, [3], _i(7, -7, 9)), ("b", I64, [3], _i(2, 2, 3))], {}, 17, I64),
    ("einsum", "Einsum", [("a", F32, [2, 3, 4], _f(2, 3, 4)), ("b", F32, [2, 4, 5], _f(2, 4, 5))],
     {"equation": "bij,bjk->bik"}, 17, F32),
    ("cumsum_exclusive_reverse", "CumSum", [("x", F32, [2, 4], _f(2, 4)),
                                            ("a", I64, [], np.array(-1, np.int64))],
     {"exclusive": 1, "reverse": 1}, 17, F32),
    ("pow_tensor_exponent", "Pow", [("a", F32, [3], np.array([0.5, 2.0, 3.0], np.float32)),
                                    ("b", F32, [3], np.array([1.5, -1.0, 0.5], np.float32))],
     {}, 17, F32),
    ("sin", "Sin", [("x", F32, [4], _f(4))], {}, 17, F32),
    ("max_3", "Max", [("a", F32, [3], _f(3)), ("b", F32, [3], _f(3)), ("c", F32, [1], _f(1))],
     {}, 17, F32),
    # the loss a forward that takes labels computes (Hugging Face's labels=), exported
    ("cross_entropy_mean", "SoftmaxCrossEntropyLoss",
     [("x", F32, [4, 5], _f(4, 5)), ("t", I64, [4], _i(0, 3, 4, 1))], {}, 17, F32),
    ("cross_entropy_none_weighted_ignored", "SoftmaxCrossEntropyLoss",
     [("x", F32, [3, 5, 2], _f(3, 5, 2)), ("t", I64, [3, 2], _i(0, -100, 4, 2, 1, 3).reshape(3, 2)),
      ("w", F32, [5], np.array([1.0, 0.5, 2.0, 1.5, 0.2], np.float32))],
     {"reduction": "none", "ignore_index": -100}, 17, F32),
    ("cross_entropy_mean_weighted_ignored", "SoftmaxCrossEntropyLoss",
     [("x", F32, [3, 5, 2], _f(3, 5, 2)), ("t", I64, [3, 2], _i(0, -100, 4, 2, 1, 3).reshape(3, 2)),
      ("w", F32, [5], np.array([1.0, 0.5, 2.0, 1.5, 0.2], np.float32))],
     {"ignore_index": -100}, 17, F32),
    ("cross_entropy_sum", "SoftmaxCrossEntropyLoss",
     [("x", F32, [4, 5], _f(4, 5)), ("t", I64, [4], _i(0, 3, 4, 1))], {"reduction": "sum"},
     13, F32),
    ("nll_mean_weighted_ignored", "NegativeLogLikelihoodLoss",
     [("x", F32, [4, 5], _f(4, 5)), ("t", I64, [4], _i(0, 1, 4, 1)),
      ("w", F32, [5], np.array([1.0, 0.5, 2.0, 1.5, 0.2], np.float32))],
     {"ignore_index": 1}, 17, F32),
]


@pytest.mark.parametrize("op_type, inputs, attrs, opset, out_type",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_op_equals_onnxruntime(op_type, inputs, attrs, opset, out_type):
    model = _model(op_type, inputs, attrs, opset, out_type)
    feeds = {n: v for n, t, s, v in inputs if v is not None}
    want = run_ort(model, feeds)[0]
    gm = emit(load(model))
    got = gm(**{n: torch.from_numpy(v) for n, v in feeds.items()})
    assert got.dtype == torch.from_numpy(want).dtype
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


def test_cross_entropy_with_its_log_prob_output_equals_onnxruntime():
    x, t = _f(4, 5), _i(0, 3, 4, 1)
    node = helper.make_node("SoftmaxCrossEntropyLoss", ["x", "t"], ["loss", "log_prob"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", F32, [4, 5]),
                      helper.make_tensor_value_info("t", I64, [4])],
        [helper.make_tensor_value_info("loss", F32, None),
         helper.make_tensor_value_info("log_prob", F32, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    want = run_ort(model, {"x": x, "t": t})
    got = emit(load(model))(torch.from_numpy(x), torch.from_numpy(t))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.detach().numpy(), w, rtol=1e-6, atol=1e-6)


def test_an_op_without_a_torch_function_is_still_refused_by_name():
    model = _model("NonZero", [("x", F32, [4], np.array([0, 1, 0, 2], np.float32))], out_type=I64)
    with pytest.raises(graphshape.GraphshapeError, match="NonZero cannot be emitted to torch"):
        emit(load(model))


class TinyViT(nn.Module):
    """A class token expanded to the batch and attention heads split with the batch size read
    at run time: what a dynamic-batch export turns into Shape / Gather / Concat / Expand."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        b, n, c = x.shape
        x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1)
        q, k, v = self.qkv(self.norm(x)).reshape(b, n + 1, 3, self.heads, c // self.heads) \
            .permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, n + 1, c))
        x = x + self.mlp(x)
        return self.head(x[:, 0])


@pytest.fixture(scope="module")
def tiny_vit_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyViT().eval()
    path = str(tmp_path_factory.mktemp("dyn") / "tiny_vit.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, 16, 16),), path, opset_version=17,
                          dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return path


def test_dynamic_batch_export_runs_in_torch_at_any_batch(tiny_vit_onnx):
    graph = load(tiny_vit_onnx)
    assert {"Shape", "Expand"} <= {n.attrs.get("op_type") for n in graph if n.op == "opaque"}
    gm = graphshape.to_torch(tiny_vit_onnx)
    for batch in (1, 3, 7):
        x = np.random.default_rng(batch).normal(size=(batch, 3, 16, 16)).astype(np.float32)
        want = run_ort(tiny_vit_onnx, {"x": x})[0]
        got = gm(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_shaped_dynamic_batch_export_trains_in_torch(tiny_vit_onnx, tmp_path):
    """``graphshape shape model.onnx -o model.pt``: the shaped export as a PyTorch module,
    trained at a batch size other than the export's."""
    from graphshape.cli import main

    out = str(tmp_path / "tiny_vit_dks.pt")
    assert main(["shape", tiny_vit_onnx, "-o", out, "--method", "DKS"]) == 0
    shaped = torch.load(out, weights_only=False)
    assert not any(isinstance(m, nn.LayerNorm) for m in shaped.modules())
    shaped.train()
    x = torch.randn(5, 3, 16, 16)  # not the export's batch of 2
    loss = nn.functional.cross_entropy(shaped(x), torch.tensor([0, 1, 2, 3, 4]))
    loss.backward()
    grads = [p.grad for p in shaped.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_a_cast_between_floating_types_is_the_canonical_cast():
    """ONNX Cast float32 -> float16 -> float32 (mixed-precision exports) is read as the
    canonical cast (the identity on the kernel; it was opaque, and an opaque call on a signal
    counts as a nonlinear layer), and both backends write it back; an integer Cast stays
    the ONNX op."""
    nodes = [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
             helper.make_node("Cast", ["h"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Relu", ["f"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, [2, 3])],
                              [helper.make_tensor_value_info("y", F32, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = _f(2, 3)
    want = run_ort(model, {"x": x})[0]
    loaded = load(model)
    assert [n.attrs["dtype"] for n in loaded if n.op == "cast"] == ["float16", "float32"]
    np.testing.assert_array_equal(emit(loaded)(torch.from_numpy(x)).numpy(), want)
    np.testing.assert_array_equal(run_ort(graphshape.to_onnx(loaded), {"x": x})[0], want)
    integer = _model("Cast", [("x", F32, [3], np.array([1.5, -2.5, 3.0], np.float32))],
                     {"to": TensorProto.INT64}, out_type=I64)
    assert [n.op for n in load(integer) if n.op not in ("input", "output")] == ["opaque"]


# ---------------------------------------------------------------- recurrent layers
def _recurrent_model(op_type, directions, hidden, attrs, *, lens=False, initial=False,
                     peepholes=False, layout=0, seq=5, batch=3, size=4, all_outputs=True,
                     bias=True):
    """One RNN / GRU / LSTM node with random weights, biases, and optionally sequence lengths,
    initial states and peepholes as graph inputs; every output a graph output."""
    gates = {"RNN": 1, "GRU": 3, "LSTM": 4}[op_type]
    x_shape = [batch, seq, size] if layout else [seq, batch, size]
    state = [batch, directions, hidden] if layout else [directions, batch, hidden]
    feeds = {"x": _f(*x_shape), "w": _f(directions, gates * hidden, size) / 2,
             "r": _f(directions, gates * hidden, hidden) / 2,
             "b": _f(directions, 2 * gates * hidden) / 4}
    names = ["x", "w", "r", "b", "", ""]
    types = {"x": F32, "w": F32, "r": F32, "b": F32}
    if not bias:  # B absent: zero biases
        del feeds["b"]
        names[3] = ""
    if lens:
        feeds["lens"] = np.array([seq, 2, 4][:batch], np.int32)
        names[4], types["lens"] = "lens", TensorProto.INT32
    if initial:
        feeds["h0"] = _f(*state)
        names[5], types["h0"] = "h0", F32
        if op_type == "LSTM":
            feeds["c0"] = _f(*state)
            names.append("c0")
            types["c0"] = F32
    if peepholes:
        names += [""] * (7 - len(names)) + ["p"]
        feeds["p"] = _f(directions, 3 * hidden) / 2
        types["p"] = F32
    while not names[-1]:
        names.pop()
    outputs = ["y", "y_h", "y_c"][:3 if op_type == "LSTM" else 2]
    if not all_outputs:
        outputs = ["", "y_h"]  # Y absent: only the last state, as classifiers read it
    node = helper.make_node(op_type, names, outputs, hidden_size=hidden, layout=layout,
                            direction={1: "forward", 2: "bidirectional"}[directions]
                            if "direction" not in attrs else attrs.pop("direction"), **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(n, types[n], list(feeds[n].shape))
                      for n in feeds],
        [helper.make_tensor_value_info(o, F32, None) for o in outputs if o])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), feeds


RECURRENT = [
    ("rnn", "RNN", 1, {}, {}),
    ("rnn_relu_bidirectional_lens", "RNN", 2, {"activations": ["Relu", "Tanh"]}, {"lens": True}),
    ("rnn_leaky_alpha_reverse", "RNN", 1,
     {"activations": ["LeakyRelu"], "activation_alpha": [0.3], "direction": "reverse"}, {}),
    ("gru", "GRU", 1, {}, {}),
    ("gru_linear_before_reset_bidirectional", "GRU", 2, {"linear_before_reset": 1},
     {"initial": True}),
    ("gru_lens_batch_first", "GRU", 1, {}, {"lens": True, "layout": 1}),
    ("lstm", "LSTM", 1, {}, {}),
    ("lstm_bidirectional_lens_initial", "LSTM", 2, {}, {"lens": True, "initial": True}),
    ("lstm_peepholes_clip", "LSTM", 1, {"clip": 0.5}, {"peepholes": True}),
    ("lstm_input_forget_reverse", "LSTM", 1, {"input_forget": 1, "direction": "reverse"},
     {"initial": True}),
    ("lstm_batch_first_last_state_only", "LSTM", 2, {},
     {"layout": 1, "all_outputs": False}),
    ("rnn_without_bias", "RNN", 1, {}, {"bias": False}),
    ("gru_without_bias_bidirectional", "GRU", 2, {}, {"bias": False}),
    ("lstm_without_bias_lens", "LSTM", 1, {}, {"bias": False, "lens": True}),
]


@pytest.mark.parametrize("op_type, directions, attrs, options", [c[1:] for c in RECURRENT],
                         ids=[c[0] for c in RECURRENT])
def test_recurrent_layer_equals_onnxruntime(op_type, directions, attrs, options):
    model, feeds = _recurrent_model(op_type, directions, 6, dict(attrs), **options)
    if options.get("layout"):
        # onnxruntime's CPU kernels refuse batch-first layouts: run the time-first twin
        twin = onnx.ModelProto()
        twin.CopyFrom(model)
        next(a for a in twin.graph.node[0].attribute if a.name == "layout").i = 0
        del twin.graph.input[:]
        swapped = {n: (v.swapaxes(0, 1) if n in ("x", "h0", "c0") else v)
                   for n, v in feeds.items()}
        twin.graph.input.extend(helper.make_tensor_value_info(
            n, TensorProto.INT32 if n == "lens" else F32, list(v.shape))
            for n, v in swapped.items())
        want = [w.transpose(2, 0, 1, 3) if w.ndim == 4 else w.swapaxes(0, 1)
                for w in run_ort(twin, swapped)]
    else:
        want = run_ort(model, feeds)
    gm = emit(load(model))
    got = gm(**{n: torch.from_numpy(v) for n, v in feeds.items()})
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.detach().numpy(), w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_exported_torch_recurrent_model_comes_back_to_torch(cls, tmp_path):
    """nn.LSTM / nn.GRU (two layers, bidirectional, batch first) through ONNX and back."""

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = cls(8, 6, num_layers=2, bidirectional=True, batch_first=True)
            self.head = nn.Linear(12, 3)

        def forward(self, x):
            return self.head(torch.relu(self.rnn(x)[0]))

    torch.manual_seed(0)
    model = Tagger().eval()
    path = str(tmp_path / "tagger.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 7, 8),), path, opset_version=17, dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "batch", 1: "time"}})
    assert cls.__name__.upper() in {n.op_type for n in onnx.load(path).graph.node}
    gm = graphshape.to_torch(path)
    for shape in ((2, 7, 8), (4, 3, 8)):  # other batch sizes and lengths
        x = torch.randn(*shape)
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
