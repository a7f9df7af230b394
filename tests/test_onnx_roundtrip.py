"""``to_onnx(load(path))`` reproduces onnxruntime's outputs for torchvision models exported
by ``torch.onnx.export`` at opsets 13 and 17, and for models built with ``onnx.helper`` at
opsets 9 and 21.

torch 2.14's ``torch.onnx.export`` defaults to the dynamo exporter, which needs the
``onnxscript`` package; these tests use the TorchScript exporter (``dynamo=False``), which
needs nothing extra. Each model is exported once per opset (module-scoped cache), with
small inputs (vgg11_bn needs 224x224: its adaptive pool to 7x7 must divide the features).
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphshape

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

#: model name -> input side length
MODELS = {
    "resnet18": 64, "resnet50": 64, "resnext50_32x4d": 64, "vgg11_bn": 224,
    "densenet121": 64, "mobilenet_v2": 64, "mobilenet_v3_small": 64, "efficientnet_b0": 64,
    "regnet_x_400mf": 64, "shufflenet_v2_x0_5": 64, "squeezenet1_0": 64, "googlenet": 64,
    "convnext_tiny": 64, "mnasnet0_5": 64,
}



def build_model(name: str):
    """The torchvision model (weights=None) with randomized batch-norm statistics, so that
    the outputs are O(1) rather than the ~1e-10 some default initializations give."""
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.2, generator=gen)
                m.running_mean.normal_(0.0, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    return model


class Exporter:
    """Exports each (model, opset) once into a temporary folder."""

    def __init__(self, folder):
        self.folder = folder
        self.paths = {}
        self.models = {}  # built once, exported at both opsets

    def __call__(self, name: str, opset: int):
        key = (name, opset)
        if key not in self.paths:
            size = MODELS[name]
            path = self.folder / f"{name}_{opset}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if name not in self.models:
                    self.models[name] = build_model(name)
                torch.onnx.export(self.models[name], (torch.randn(1, 3, size, size),), str(path),
                                  opset_version=opset, dynamo=False, input_names=["image"],
                                  output_names=["logits"])
            self.paths[key] = path
        return self.paths[key]


@pytest.fixture(scope="module")
def exporter(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("onnx_exports")
    yield Exporter(folder)
    # ~2 GB of exports (vgg11_bn alone is 0.5 GB per opset): gone with the module
    shutil.rmtree(folder, ignore_errors=True)


def run_ort(model_or_path, feeds):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    src = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def assert_outputs_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        scale = float(np.abs(w).max())
        assert scale > 1e-3, "degenerate reference output: the comparison would be vacuous"
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("name", list(MODELS))
def test_torchvision_export_round_trip(exporter, name, opset):
    path = str(exporter(name, opset))
    graph = graphshape.load(path)
    counts = graph.count_ops()
    opaque = {n.attrs["op_type"] for n in graph if n.op == "opaque"}
    assert not opaque, f"unmapped ONNX ops: {opaque}"
    assert counts["conv"] > 0
    assert graph.meta["opset"] == opset
    model = graphshape.to_onnx(graph)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == opset
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["logits"]
    size = MODELS[name]
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    assert_outputs_equal(run_ort(model, {"image": x}), run_ort(path, {"image": x}))


@pytest.mark.parametrize("name", [n for n in MODELS if n != "vgg11_bn"])
def test_opsets_13_and_17_read_into_the_same_canonical_ops(exporter, name):
    """Opset 13 exports spell LayerNorm, GELU, SiLU and HardSwish as several ops; the
    frontend fuses them back, so both exports give the same IR op counts."""
    counts = [graphshape.load(str(exporter(name, opset))).count_ops() for opset in (13, 17)]
    assert counts[0] == counts[1]


def test_dynamic_batch_export_reads_like_the_static_one(exporter, tmp_path):
    """shufflenet's channel shuffle is x.view(batch, groups, ...) with the batch read from
    x.size(): with a dynamic batch axis those shape chains cannot fold to constants, but
    every entry except the batch is known, so the IR is the same as for a static export."""
    path = str(tmp_path / "shufflenet_dynamic.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(build_model("shufflenet_v2_x0_5"), (torch.randn(2, 3, 64, 64),), path,
                          opset_version=13, dynamo=False, input_names=["image"],
                          output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    graph = graphshape.load(path)
    static = graphshape.load(str(exporter("shufflenet_v2_x0_5", 13)))
    assert graph.count_ops() == static.count_ops()
    model = graphshape.to_onnx(graph)
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(2).standard_normal((3, 3, 64, 64)).astype(np.float32)
    assert_outputs_equal(run_ort(model, {"image": x}), run_ort(path, {"image": x}))


def test_group_norm_with_a_dynamic_batch_reads_like_the_static_one(tmp_path):
    """The exporter's GroupNorm reshapes to [0, G, -1], where 0 copies the batch: with a
    dynamic batch that 0 copied an unknown dim and the Reshape stayed opaque (a diffusion
    UNet through ONNX: one opaque node per GroupNorm, and shaping warned of them)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.GroupNorm(4, 16), torch.nn.SiLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.GroupNorm(4, 16), torch.nn.SiLU()).eval()
    paths = {}
    for dynamic in (False, True):
        paths[dynamic] = str(tmp_path / f"gn_{dynamic}.onnx")
        extra = {"dynamic_axes": {"x": {0: "n"}}} if dynamic else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.randn(2, 3, 8, 8),), paths[dynamic],
                              opset_version=17, dynamo=False, input_names=["x"], **extra)
    graph = graphshape.load(paths[True])
    assert graph.count_ops() == graphshape.load(paths[False]).count_ops()
    assert "opaque" not in graph.count_ops()
    x = np.random.default_rng(1).standard_normal((5, 3, 8, 8)).astype(np.float32)
    assert_outputs_equal(run_ort(graphshape.to_onnx(graph), {"x": x}), run_ort(paths[True], {"x": x}))
    with torch.no_grad():
        got = graphshape.to_torch(graph)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, run_ort(paths[True], {"x": x})[0], rtol=1e-4, atol=1e-5)


def test_resnet_residual_joins_are_add_nodes(exporter):
    graph = graphshape.load(str(exporter("resnet18", 13)))
    adds = [n for n in graph if n.op == "add"]
    assert len(adds) == 8  # one per BasicBlock
    for node in adds:
        assert all(graph[r.node].op != "constant" for r in node.inputs)
    # names come from the exporter's scopes: "layer1.0.conv1" etc.
    assert "layer1.0.conv1" in graph and graph["layer1.0.conv1"].op == "conv"


# --------------------------------------------------------------------------- onnx.helper models
def _init(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def helper_model(opset: int):
    """A small CNN built by hand using Sum, Gemm, LRN, BatchNormalization,
    InstanceNormalization, a conv weight made by ConstantOfShape, Dropout, Softmax and a
    Shape -> Gather -> Unsqueeze -> Concat -> Reshape chain, in the forms of ``opset``."""
    rng = np.random.default_rng(3)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    c = 4
    inits = [
        _init("w_shape", np.array([c, 3, 3, 3])), _init("conv_b", f32(c)),
        _init("w2", f32(c, c, 1, 1)),
        _init("bn_s", f32(c) * 0.1 + 1), _init("bn_b", f32(c)), _init("bn_m", f32(c) * 0.1),
        _init("bn_v", np.abs(f32(c)) + 0.5),
        _init("in_s", f32(c) * 0.1 + 1), _init("in_b", f32(c)),
        _init("gemm_b", f32(c * 4 * 4, 10)), _init("gemm_c", f32(10)),
        _init("gather_idx", np.array(0)), _init("minus1", np.array([-1])),
    ]
    unsq = (helper.make_node("Unsqueeze", ["n", "unsq_axes"], ["n1"]) if opset >= 13
            else helper.make_node("Unsqueeze", ["n"], ["n1"], axes=[0]))
    if opset >= 13:
        inits.append(_init("unsq_axes", np.array([0])))
    if opset >= 12:
        drop = helper.make_node("Dropout", ["s", "ratio"], ["d"])
        inits.append(_init("ratio", np.float32(0.25)))
    else:
        drop = helper.make_node("Dropout", ["s"], ["d"], ratio=0.25)
    nodes = [
        helper.make_node("ConstantOfShape", ["w_shape"], ["w"],
                         value=_init("fill", np.array([0.1], np.float32))),
        helper.make_node("Conv", ["x", "w", "conv_b"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["h", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("LRN", ["r"], ["lrn"], size=3),
        helper.make_node("Conv", ["lrn", "w2"], ["h2"]),
        helper.make_node("InstanceNormalization", ["h2", "in_s", "in_b"], ["inorm"]),
        helper.make_node("Tanh", ["inorm"], ["t"]),
        helper.make_node("Sum", ["r", "t", "lrn"], ["s"]),
        drop,
        helper.make_node("MaxPool", ["d"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Shape", ["p"], ["shp"]),
        helper.make_node("Gather", ["shp", "gather_idx"], ["n"], axis=0),
        unsq,
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["p", "target"], ["flat"]),
        helper.make_node("Gemm", ["flat", "gemm_b", "gemm_c"], ["logits"], alpha=0.5, beta=2.0),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "helper_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, (2, 3, 8, 8))],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, (2, 10)),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, (2, 10))], inits)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets,
                              ir_version=helper.find_min_ir_version_for(opsets))
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("opset", [9, 21])
def test_helper_built_model_round_trip(opset):
    model = helper_model(opset)
    graph = graphshape.load(model)
    counts = graph.count_ops()
    for op in ("sum", "linear", "lrn", "batch_norm", "instance_norm", "dropout", "softmax",
               "conv", "reshape"):
        assert counts.get(op, 0) >= 1, f"no {op} node in {counts}"
    assert "opaque" not in counts
    # the ConstantOfShape weight was folded into the conv's parameters
    first_conv = next(n for n in graph if n.op == "conv")
    assert np.all(first_conv.params["weight"] == np.float32(0.1))
    # Gemm alpha=0.5 is folded into the (out, in) weight, beta=2 into the bias
    lin = next(n for n in graph if n.op == "linear")
    gemm_b = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "gemm_b"))
    np.testing.assert_allclose(lin.params["weight"], 0.5 * gemm_b.T)
    out = graphshape.to_onnx(graph)
    onnx.checker.check_model(out, full_check=True)
    assert out.opset_import[0].version == opset
    assert [o.name for o in out.graph.output] == ["probs", "logits"]
    x = np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert_outputs_equal(run_ort(out, {"x": x}), run_ort(model, {"x": x}))


class _AttentionBlock(torch.nn.Module):
    """A pre-norm transformer block with nn.MultiheadAttention (vit's encoder layer, small):
    its ONNX export splits the packed q/k/v projection with Squeeze -> 3 Gathers."""

    def __init__(self, dim=16):
        super().__init__()
        self.embed = torch.nn.Linear(8, dim)
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.attn = torch.nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 32), torch.nn.GELU(),
                                       torch.nn.Linear(32, dim))

    def forward(self, x):
        h = self.embed(x)
        y = self.norm1(h)
        h = h + self.attn(y, y, y, need_weights=False)[0]
        return h + self.mlp(self.norm2(h))


@pytest.mark.parametrize("method", [None, "DKS"])
def test_attention_export_round_trip_loads_in_onnxruntime(tmp_path, method):
    """The static shapes graphshape writes let onnxruntime fuse the q/k/v selects into a
    Split; the fusion adds an initializer named like our old helper "squeeze_axes", and the
    session failed to load ("Attempt to replace the existing tensor"). (The export's
    Gathers, behind shapes computed at run time, are now read as selects: Slice + Squeeze.)"""
    path = str(tmp_path / "attention.onnx")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_AttentionBlock().eval(), (torch.randn(2, 5, 8),), path,
                          opset_version=17, dynamo=False, input_names=["x"])
    x = np.random.default_rng(3).standard_normal((2, 5, 8)).astype(np.float32)
    if method is None:
        model = graphshape.to_onnx(graphshape.load(path))
        assert not any(n.op_type == "Gather" for n in model.graph.node)
        assert sum(n.op_type == "Squeeze" for n in model.graph.node) >= 3  # q, k, v
        assert_outputs_equal(run_ort(model, {"x": x}), run_ort(path, {"x": x}))
    else:
        out = str(tmp_path / "attention_dks.onnx")
        graphshape.shape_onnx(path, out, method=method)
        (y,) = run_ort(out, {"x": x})
        assert y.shape == (2, 5, 16) and np.isfinite(y).all()


@pytest.mark.parametrize("name", ["resnet18", "convnext_tiny"])
def test_a_shaped_file_read_back_keeps_the_layer_names(exporter, tmp_path, name):
    """A layer's ONNX node keeps its IR name though its output tensor has it too (ONNX node
    and tensor names are separate namespaces), and a linear layer with a bias written as
    MatMul + Add is named by its MatMul: so the PyTorch module of the shaped file has the
    parameter names of the source file's module (was: "conv1_1.weight" for "conv1.weight",
    "proj_MatMul_matmul.weight" for a MatMul layer's "proj_MatMul.weight")."""
    src = str(exporter(name, 17))
    dst = str(tmp_path / "shaped.onnx")
    graphshape.shape_onnx(src, dst, method="DKS")
    node_names = {n.name for n in onnx.load(dst).graph.node}
    source_params = {n for n, _ in graphshape.to_torch(src).named_parameters()}
    shaped_params = {n for n, _ in graphshape.to_torch(dst).named_parameters()}
    assert shaped_params and shaped_params <= source_params
    again = str(tmp_path / "again.onnx")
    graphshape.shape_onnx(dst, again, method="DKS")
    assert {n for n, _ in graphshape.to_torch(again).named_parameters()} == shaped_params
    if name == "resnet18":
        assert {"conv1", "layer1.0.conv1", "fc"} <= node_names
    else:
        assert any(n.endswith("MatMul") for n in node_names)
