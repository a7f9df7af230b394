"""One small round trip per canonical op the torch frontend maps, plus the backend's
handling of IR written by other frontends and passes (ONNX-style nodes, transforms)."""

import operator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphshape import GraphshapeError
from graphshape import torch_modules as tm
from graphshape.backend_torch import TORCH_EMITTERS, emit, fx_name
from graphshape.frontends.torch_fx import load_module
from graphshape.ir import Graph, Node, Ref, TensorInfo
from graphshape.ops import OPS

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


class Fn(nn.Module):
    """forward(x) = fn(self, x); submodules and parameters passed as keywords."""

    def __init__(self, fn, **children):
        super().__init__()
        self.fn = fn
        for k, v in children.items():
            setattr(self, k, v)

    def forward(self, x):
        return self.fn(self, x)


class Fn2(Fn):
    """forward(x, y) = fn(self, x, y)."""

    def forward(self, x, y):
        return self.fn(self, x, y)


def M(module):
    return Fn(lambda s, x: s.m(x), m=module)


def P(*shape):
    return nn.Parameter(torch.randn(*shape))


X4 = (2, 4, 6, 6)
# id -> (module, input shapes, expected op of the result node, expected attrs)
CASES = {
    "conv2d": (M(nn.Conv2d(4, 6, 3, padding=1)), [X4], "conv", {"pads": (1, 1, 1, 1)}),
    "conv1d_stride": (M(nn.Conv1d(4, 5, 3, stride=2)), [(2, 4, 9)], "conv", {"stride": (2,)}),
    "conv3d_same": (M(nn.Conv3d(2, 3, 3, padding="same")), [(1, 2, 4, 4, 4)], "conv",
                    {"pads": (1,) * 6}),
    "conv2d_same_even_kernel": (M(nn.Conv2d(4, 4, 4, padding="same")), [X4], "conv",
                                {"pads": (1, 1, 2, 2)}),
    "conv2d_groups_dilation": (M(nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2)), [X4],
                               "conv", {"groups": 2, "dilation": (2, 2)}),
    "conv2d_reflect": (M(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")), [X4], "conv",
                       {"padding_mode": "reflect"}),
    "F.conv2d": (Fn(lambda s, x: F.conv2d(x, s.w, s.b, padding=1), w=P(3, 4, 3, 3), b=P(3)),
                 [X4], "conv", {"out_channels": 3}),
    "conv_transpose": (M(nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1)),
                       [X4], "conv_transpose", {"output_padding": (1, 1)}),
    "linear": (M(nn.Linear(6, 5)), [X4], "linear", {"out_features": 5}),
    "F.linear": (Fn(lambda s, x: F.linear(x, s.w), w=P(3, 6)), [X4], "linear", {"in_features": 6}),
    "matmul": (Fn2(lambda s, x, y: x @ y), [(2, 3, 4), (2, 4, 5)], "matmul", {}),
    "add": (Fn2(lambda s, x, y: x + y), [X4, X4], "add", {}),
    "torch.add_alpha": (Fn2(lambda s, x, y: torch.add(x, y, alpha=2.0)), [X4, X4], "add",
                        {"alpha": 2.0}),
    "iadd": (Fn2(lambda s, x, y: operator.iadd(x * 1.0, y)), [X4, X4], "add", {}),
    "sub_scalar": (Fn(lambda s, x: 1.5 - x), [X4], "sub", {}),
    "mul_method": (Fn2(lambda s, x, y: x.mul(y)), [X4, (4, 1, 1)], "mul", {}),
    "div": (Fn2(lambda s, x, y: x / (y * y + 1)), [X4, X4], "div", {}),
    "concat": (Fn2(lambda s, x, y: torch.cat([x, y], dim=-1)), [X4, X4], "concat", {"axis": 3}),
    "stack": (Fn2(lambda s, x, y: torch.stack([x, y], dim=1)), [X4, X4], "concat", {"axis": 1}),
    "stack_negative_dim": (Fn2(lambda s, x, y: torch.stack((x, y), -1)), [X4, X4], "concat",
                           {"axis": 4}),
    "batch_norm2d": (M(nn.BatchNorm2d(4)), [X4], "batch_norm", {"num_features": 4, "dims": 2}),
    "batch_norm1d": (M(nn.BatchNorm1d(4)), [(3, 4)], "batch_norm", {"dims": 1}),
    "batch_norm3d": (M(nn.BatchNorm3d(2)), [(2, 2, 3, 3, 3)], "batch_norm", {"dims": 3}),
    # as timm's BatchNormAct2d calls it in eval mode (momentum 0): the module's momentum wins
    "F.batch_norm": (Fn(lambda s, x: F.batch_norm(x, s.bn.running_mean, s.bn.running_var,
                                                  s.bn.weight, s.bn.bias, False, 0.0, 1e-3),
                        bn=nn.BatchNorm2d(4, momentum=0.2)), [X4], "batch_norm",
                     {"momentum": 0.2, "eps": 1e-3, "track_running_stats": True}),
    "layer_norm": (M(nn.LayerNorm(6)), [X4], "layer_norm", {"normalized_shape": (6,)}),
    "F.layer_norm": (Fn(lambda s, x: F.layer_norm(x, (6, 6), s.w, s.b, 1e-6), w=P(6, 6), b=P(6, 6)),
                     [X4], "layer_norm", {"eps": 1e-6}),
    "rms_norm": (M(nn.RMSNorm(6)), [X4], "rms_norm", {"normalized_shape": (6,), "eps": None}),
    "F.rms_norm": (Fn(lambda s, x: F.rms_norm(x, (6, 6), s.w, 1e-6), w=P(6, 6)),
                   [X4], "rms_norm", {"eps": 1e-6}),
    # hand-written with torch.var: timm's SimpleNorm (fused), and graphshape's own module
    "std_norm": (Fn(lambda s, x: x * torch.rsqrt(torch.var(x, dim=-1, keepdim=True) + 1e-6)),
                 [X4], "std_norm", {"normalized_shape": (6,), "centre": False, "correction": 1}),
    "tm.StdNorm": (M(tm.StdNorm((6, 6), 1e-3, eps_added_to="std")), [X4], "std_norm",
                   {"normalized_shape": (6, 6), "centre": True, "correction": 0,
                    "eps_added_to": "std"}),
    "group_norm": (M(nn.GroupNorm(2, 4)), [X4], "group_norm", {"num_groups": 2}),
    "F.group_norm": (Fn(lambda s, x: F.group_norm(x, 2, s.w, None), w=P(4)), [X4], "group_norm", {}),
    "instance_norm": (M(nn.InstanceNorm2d(4, affine=True)), [X4], "instance_norm", {"affine": True}),
    "lrn": (M(nn.LocalResponseNorm(3, alpha=0.1)), [X4], "lrn", {"size": 3}),
    "avg_pool": (M(nn.AvgPool2d(3, 2, 1, count_include_pad=False)), [X4], "avg_pool",
                 {"count_include_pad": False, "pads": (1, 1, 1, 1)}),
    "F.avg_pool1d": (Fn(lambda s, x: F.avg_pool1d(x, 2)), [(2, 3, 8)], "avg_pool", {"stride": (2,)}),
    "max_pool_ceil": (M(nn.MaxPool2d(3, 2, 1, ceil_mode=True)), [X4], "max_pool", {"ceil_mode": True}),
    "F.max_pool2d": (Fn(lambda s, x: F.max_pool2d(x, 2, 1)), [X4], "max_pool", {"stride": (1, 1)}),
    "adaptive_avg_pool": (M(nn.AdaptiveAvgPool2d((2, None))), [X4], "adaptive_avg_pool",
                          {"output_size": (2, None)}),
    "F.adaptive_avg_pool2d": (Fn(lambda s, x: F.adaptive_avg_pool2d(x, 1)), [X4],
                              "adaptive_avg_pool", {"output_size": (1, 1)}),
    "adaptive_max_pool": (M(nn.AdaptiveMaxPool1d(3)), [(2, 3, 7)], "adaptive_max_pool", {}),
    "flatten": (Fn(lambda s, x: torch.flatten(x, 1)), [X4], "flatten", {"start_dim": 1, "end_dim": 3}),
    "nn.Flatten": (M(nn.Flatten()), [X4], "flatten", {}),
    "view_dynamic": (Fn(lambda s, x: x.view(x.size(0), -1)), [X4], "reshape",
                     {"shape": (Ref("size"), -1), "static_shape": (2, 144)}),
    "reshape": (Fn(lambda s, x: x.reshape(2, -1, 4)), [(2, 4, 6)], "reshape", {"shape": (2, -1, 4)}),
    "permute": (Fn(lambda s, x: x.permute(0, 2, 3, 1)), [X4], "transpose", {"perm": (0, 2, 3, 1)}),
    "transpose": (Fn(lambda s, x: torch.transpose(x, 1, -1)), [X4], "transpose", {"perm": (0, 3, 2, 1)}),
    "pixel_shuffle": (M(nn.PixelShuffle(2)), [(2, 8, 3, 5)], "depth_to_space",
                      {"blocksize": 2, "mode": "CRD"}),
    "F.pixel_unshuffle": (Fn(lambda s, x: F.pixel_unshuffle(x, 2)), [(2, 3, 4, 6)],
                          "space_to_depth", {"blocksize": 2, "mode": "CRD"}),
    "squeeze": (Fn(lambda s, x: x.squeeze(1)), [(2, 1, 3)], "squeeze", {"axes": (1,)}),
    "unsqueeze": (Fn(lambda s, x: torch.unsqueeze(x, -1)), [(2, 3)], "unsqueeze", {"axes": (2,)}),
    "slice": (Fn(lambda s, x: x[:, 1:3, ::2]), [X4], "slice", {"axes": (1, 2), "steps": (1, 2)}),
    "slice_ellipsis": (Fn(lambda s, x: x[..., 1:]), [X4], "slice", {"axes": (3,)}),
    "index_int_none": (Fn(lambda s, x: x[:, 1, None, -1]), [X4], "unsqueeze", {"axes": (1,)}),
    "index_last": (Fn(lambda s, x: x[..., -1]), [X4], "squeeze", {"axes": (3,)}),
    "chunk": (Fn(lambda s, x: x.chunk(2, 1)[1]), [X4], "split", {"sizes": (2, 2)}),
    "split": (Fn(lambda s, x: torch.split(x, [1, 3], dim=1)[1] * 2), [X4], "split", {"sizes": (1, 3)}),
    "F.pad": (Fn(lambda s, x: F.pad(x, (1, 2))), [X4], "pad", {"pads": (0, 0, 0, 1, 0, 0, 0, 2)}),
    "F.pad_reflect": (Fn(lambda s, x: F.pad(x, (1, 1, 2, 0), mode="reflect")), [X4], "pad",
                      {"mode": "reflect"}),
    "ZeroPad2d": (M(nn.ZeroPad2d((1, 0, 0, 1))), [X4], "pad", {"mode": "constant"}),
    "interpolate_nearest": (Fn(lambda s, x: F.interpolate(x, scale_factor=(2, 3))), [X4],
                            "resize", {"mode": "nearest", "scales": (2.0, 3.0)}),
    "interpolate_bilinear_size": (
        Fn(lambda s, x: F.interpolate(x, size=(5, 9), mode="bilinear", align_corners=True)),
        [X4], "resize", {"mode": "linear", "align_corners": True, "sizes": (5, 9)}),
    "interpolate_bicubic": (Fn(lambda s, x: F.interpolate(x, scale_factor=1.5, mode="bicubic")),
                            [X4], "resize", {"mode": "cubic", "align_corners": False}),
    "interpolate_nearest_exact_3d": (
        Fn(lambda s, x: F.interpolate(x, size=(3, 5, 2), mode="nearest-exact")),
        [(1, 2, 4, 4, 4)], "resize", {"dims": 3, "mode": "nearest-exact"}),
    "interpolate_recompute_scale": (
        Fn(lambda s, x: F.interpolate(x, scale_factor=1.7, mode="linear",
                                      recompute_scale_factor=True)),
        [(2, 3, 7)], "resize", {"sizes": (11,)}),
    # a size read from another tensor at run time (segmentation heads): an extra input
    "interpolate_dynamic_size": (Fn2(lambda s, x, y: F.interpolate(x, size=y.shape[-2:],
                                                                   mode="bilinear")),
                                 [X4, (1, 1, 9, 11)], "resize", {"static_sizes": (9, 11)}),
    "Upsample": (M(nn.Upsample(scale_factor=2, mode="bilinear")), [X4], "resize",
                 {"mode": "linear", "scales": (2.0, 2.0)}),
    "UpsamplingNearest2d": (M(nn.UpsamplingNearest2d(size=(7, 7))), [X4], "resize",
                            {"mode": "nearest", "sizes": (7, 7)}),
    "dropout": (M(nn.Dropout(0.3)), [X4], "dropout", {"p": 0.3}),
    "F.dropout_eval": (Fn(lambda s, x: F.dropout(x, 0.5, s.training)), [X4], "identity", {}),
    "identity": (M(nn.Identity()), [X4], "identity", {}),
    "contiguous": (Fn(lambda s, x: x.contiguous()), [X4], "identity", {}),
    "softmax": (M(nn.Softmax(dim=1)), [X4], "softmax", {"axis": 1}),
    "log_softmax": (Fn(lambda s, x: F.log_softmax(x, -1)), [X4], "log_softmax", {"axis": 3}),
    "mean": (Fn(lambda s, x: x.mean((2, 3), keepdim=True)), [X4], "reduce",
             {"kind": "mean", "axes": (2, 3), "keepdims": True}),
    "sum": (Fn(lambda s, x: torch.sum(x, 1)), [X4], "reduce", {"kind": "sum", "keepdims": False}),
    "amax": (Fn(lambda s, x: torch.amax(x, -1)), [X4], "reduce", {"kind": "max", "axes": (3,)}),
    # timm's ResMLP affine: beta + alpha * x; rotary embeddings' -x
    "addcmul": (Fn(lambda s, x: torch.addcmul(s.beta, s.alpha, x, value=0.5),
                   alpha=P(4, 1, 1), beta=P(4, 1, 1)), [X4], "add", {"alpha": 0.5}),
    "addcmul_method": (Fn(lambda s, x: s.beta.addcmul(x, x), beta=P(4, 1, 1)), [X4], "add", {}),
    "neg": (Fn(lambda s, x: -x), [X4], "mul", {}),
    # timm attention: q, k, v = qkv.unbind(0) (a split into size-1 pieces, squeezed)
    "unbind": (Fn(lambda s, x: (lambda t: t[0] * t[3] + t[1])(x.unbind(1))), [X4], "add", {}),
    "torch.unbind": (Fn(lambda s, x: torch.unbind(x, -1)[2]), [X4], "squeeze", {"axes": (3,)}),
    # casts between floating dtypes: LlamaRMSNorm's .to(torch.float32) ... .to(input_dtype)
    "to_float64": (Fn(lambda s, x: x.to(torch.float64) * 2.0), [X4], "mul", {}),
    "to_dtype_of": (Fn(lambda s, x: (x.double() + 1.0).to(x.dtype)), [X4], "cast",
                    {"dtype": "float32"}),
    "to_kwarg": (Fn(lambda s, x: x.to(dtype=torch.float16)), [X4], "cast", {"dtype": "float16"}),
    "type_as": (Fn(lambda s, x: x.half().type_as(x)), [X4], "cast", {"dtype": "float32"}),
    "torch.neg": (Fn(lambda s, x: torch.neg(x)), [X4], "mul", {}),
}

ACTIVATIONS = {  # id -> (module or function, registry name, attrs)
    "ReLU": (nn.ReLU(inplace=True), "relu", {"inplace": True}), "F.relu": (F.relu, "relu", {}),
    "F.relu_inplace": (lambda x: F.relu(x, inplace=True), "relu", {"inplace": True}),
    "relu_method": (lambda x: x.relu_(), "relu", {"inplace": True}),
    "ReLU6": (nn.ReLU6(), "relu6", {}), "LeakyReLU": (nn.LeakyReLU(0.2), "leaky_relu",
                                                      {"negative_slope": 0.2}),
    "F.leaky_relu": (lambda x: F.leaky_relu(x, 0.3), "leaky_relu", {"negative_slope": 0.3}),
    "ELU": (nn.ELU(0.5), "elu", {"alpha": 0.5}), "SELU": (nn.SELU(), "selu", {}),
    "CELU": (nn.CELU(), "elu", {}), "F.celu": (F.celu, "elu", {}),  # (alpha 1: ELU)
    "GELU": (nn.GELU(), "gelu_exact", {}), "GELU_tanh": (nn.GELU("tanh"), "gelu", {}),
    "SiLU": (nn.SiLU(), "silu", {}), "F.silu": (F.silu, "silu", {}), "Mish": (nn.Mish(), "mish", {}),
    "Hardswish": (nn.Hardswish(), "hardswish", {}),
    "Hardsigmoid": (nn.Hardsigmoid(), "hardsigmoid", {}),
    "Hardtanh": (nn.Hardtanh(-2.0, 3.0), "hardtanh", {"min_val": -2.0, "max_val": 3.0}),
    "Tanh": (nn.Tanh(), "tanh", {}), "torch.tanh": (torch.tanh, "tanh", {}),
    "Sigmoid": (nn.Sigmoid(), "sigmoid", {}), "sigmoid_method": (lambda x: x.sigmoid(), "sigmoid", {}),
    "Softplus": (nn.Softplus(), "softplus", {}), "Softsign": (nn.Softsign(), "softsign", {}),
    "erf": (torch.erf, "erf", {}), "atan": (torch.atan, "atan", {}),
    "asinh": (torch.asinh, "asinh", {}), "square": (torch.square, "square", {}),
    # PReLU: a leaky_relu whose slopes are parameters (params["weight"])
    "PReLU": (nn.PReLU(), "leaky_relu", {"negative_slope": 0.25, "learnable_slope": True}),
    "PReLU_channels": (nn.PReLU(4, init=0.1), "leaky_relu",
                       {"negative_slope": pytest.approx(0.1), "learnable_slope": True}),
}


def _roundtrip(module, shapes, seed=0):
    torch.manual_seed(seed)
    xs = [torch.randn(*s) for s in shapes]
    graph = load_module(module, tuple(xs))
    gm = emit(graph)
    gm.train(module.training)
    xa = [x.clone().requires_grad_() for x in xs]
    xb = [x.clone().requires_grad_() for x in xs]
    ya, yb = module(*xa), gm(*xb)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-6)
    cot = torch.randn_like(ya)
    (ya * cot).sum().backward()
    (yb * cot).sum().backward()
    for a, b in zip(xa, xb):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6)
    return graph, gm


def _result_node(graph):
    out = graph[graph.output_nodes[0]]
    return graph[out.inputs[0].node]


def _split_producer(graph):
    return next(n for n in graph if n.op == "split")


@pytest.mark.parametrize("case", list(CASES))
def test_op_roundtrip(case):
    module, shapes, op, attrs = CASES[case]
    module.eval()
    graph, _ = _roundtrip(module, shapes)
    node = _split_producer(graph) if op == "split" else _result_node(graph)
    assert node.op == op, graph.table()
    for k, v in attrs.items():
        assert node.attrs[k] == v, (k, node.attrs)
    assert not any(n.op == "opaque" and "shape_computation" not in n.meta["flags"] for n in graph)


@pytest.mark.parametrize("case", list(ACTIVATIONS))
def test_activation_roundtrip(case):
    fn, name, attrs = ACTIVATIONS[case]
    # x * 1.0 first: in-place activations must not write into the leaf input
    module = (Fn(lambda s, x: s.m(x * 1.0), m=fn) if isinstance(fn, nn.Module)
              else Fn(lambda s, x: fn(x * 1.0)))
    graph, _ = _roundtrip(module.eval(), [X4])
    node = _result_node(graph)
    assert node.op == "activation"
    assert node.attrs == {"name": name, **attrs}


@pytest.mark.parametrize("fn", [nn.CELU(2.0), lambda x: F.celu(x, 0.5)], ids=["CELU", "F.celu"])
def test_celu_with_another_alpha_stays_the_call_it_is(fn):
    # alpha * elu(x / alpha): no registry activation computes it
    module = (Fn(lambda s, x: s.m(x), m=fn) if isinstance(fn, nn.Module)
              else Fn(lambda s, x: fn(x)))
    graph, _ = _roundtrip(module.eval(), [X4])
    assert _result_node(graph).op == "opaque"


def test_scalar_operands_become_constants_and_parameters_constant_nodes():
    module = Fn(lambda s, x: x * s.scale + 2.0, scale=P(4, 1, 1)).eval()
    graph, gm = _roundtrip(module, [X4])
    const = graph["scale"]
    assert const.op == "constant" and const.attrs["trainable"]
    assert const.params["value"].shape == (4, 1, 1)
    scalar = [n for n in graph if n.op == "constant" and n.name != "scale"]
    assert len(scalar) == 1 and float(scalar[0].params["value"]) == 2.0
    assert scalar[0].params["value"].dtype == np.float32
    assert isinstance(gm.scale, nn.Parameter)
    assert graph["mul"].op == "mul" and graph["add"].op == "add"
    # the scalar is written back as a Python number: the state dict is the source's
    assert "2.0" in gm.code and set(gm.state_dict()) == set(module.state_dict())


def test_train_mode_batch_norm_and_dropout_stay_train_mode():
    module = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)).train()
    x = torch.randn(3, *X4[1:])
    gm = emit(load_module(module, x))
    assert gm.training
    gm.eval(), module.eval()
    torch.testing.assert_close(gm(x), module(x))
    gm.train(), module.train()
    torch.manual_seed(1)
    ya = module(x)
    torch.manual_seed(1)
    yb = gm(x)
    torch.testing.assert_close(yb, ya)  # same dropout mask, same batch statistics
    torch.testing.assert_close(gm.state_dict()["1.running_var"], module.state_dict()["1.running_var"])


def test_a_cast_to_another_tensors_dtype_leaves_no_dtype_call():
    """LlamaRMSNorm's ``x.to(torch.float32)`` ... ``.to(input_dtype)``, with ``input_dtype =
    x.dtype``: two casts, and the ``x.dtype`` call, read only for the cast, is gone."""
    def f(s, x):
        input_dtype = x.dtype
        return (x.to(torch.float32) * 2.0).to(input_dtype)

    graph, _ = _roundtrip(Fn(f).eval(), [X4])
    assert [n.op for n in graph] == ["input", "cast", "constant", "mul", "cast", "output"]


def test_inputs_with_defaults_keep_them():
    class WithMask(nn.Module):
        def forward(self, x, mask=None, scale: float = 2.0):
            return x * scale

    gm = emit(load_module(WithMask(), torch.randn(2, 3)))
    x = torch.randn(2, 3)
    torch.testing.assert_close(gm(x), x * 2.0)  # the defaults are the emitted forward's too


def test_without_example_inputs_shapes_are_unknown():
    module = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten()).eval()
    graph = load_module(module)
    assert all(n.shape is None for n in graph)
    assert [n.op for n in graph] == ["input", "conv", "activation", "flatten", "output"]
    x = torch.randn(*X4)
    torch.testing.assert_close(emit(graph)(x), module(x))


def test_in_place_op_on_a_value_read_later():
    def f(s, x):
        y = x * 2.0
        z = y.relu_()  # y itself now holds relu(2x)
        w = z - 1.0
        v = s.act(w)  # so does w
        return y + z + w * v
    module = Fn(f, act=nn.LeakyReLU(0.1, inplace=True)).eval()
    graph, _ = _roundtrip(module, [X4])
    assert graph["add"].inputs == [Ref("relu_"), Ref("relu_")]
    assert graph["mul_1"].inputs == [Ref("act"), Ref("act")]


def test_chained_in_place_ops_all_reach_the_value_read_later():
    # y.mul_(2).add_(1): add_ updates what mul_ returned, which is y; later readers of y
    # read mul_'s result only, so the emitted model dropped the + 1 (a silent wrong result),
    # and the IR's relu read y before the (opaque) clamp_
    def f(s, x):
        y = s.conv(x)
        y.mul_(2.0).add_(1.0).clamp_(min=-0.5)
        return y.relu()
    module = Fn(f, conv=nn.Conv2d(4, 4, 1)).eval()
    graph, _ = _roundtrip(module, [X4])  # same values and gradients as the source
    # (clamp_ is kept as the call it is: the analysis reads what the relu reads)
    assert graph["relu"].inputs == [Ref("clamp_")] and graph["clamp_"].inputs == [Ref("add_")]


def test_item_assignment_is_read_as_a_new_value():
    # ConViT's relative indices, MViTv2's attn[:, :, 1:, 1:] = ...: fx's Proxy refuses item
    # assignment, so these models went through the ONNX export
    def f(s, x):
        y = x * 2.0
        y[:, 0] = 0.0  # a number
        y[:, 1:3] = y[:, 1:3].relu() + 1.0  # a tensor made of a view read before
        table = torch.zeros(x.shape[0], 1, 1, x.shape[3])  # from sizes, then written into
        table[:, :, :, 2] = 1.0
        return s.conv(y) + table
    module = Fn(f, conv=nn.Conv2d(4, 4, 3, padding=1)).eval()
    graph, gm = _roundtrip(module, [X4])  # same values and gradients as the source
    assert "traced_with" not in graph.meta  # torch.fx, not the export
    assigned = [n for n in graph if n.op == "opaque" and n.attrs["target"] is tm.assigned]
    assert len(assigned) == 3
    assert graph["conv"].inputs == [Ref(assigned[1].name)]  # the conv reads the written y
    assert graph[assigned[1].name].shape == X4
    x = torch.randn(5, 4, 6, 6)  # another batch size
    torch.testing.assert_close(gm(x), module(x))
    assert not any(isinstance(v, torch.fx.Proxy) for v in vars(module).values())


def test_assignment_into_a_tensor_the_forward_made_of_constants_is_kept():
    # before: fx records t.__setitem__ on its stored constant, the loader kept it as a call
    # whose result nothing read, and x + t read the zeros: the emitted module computed
    # another function, silently
    def f(s, x):
        t = torch.zeros(2, 4, 1, 1)  # no traced size: fx keeps it as a constant tensor
        t[:, 1] = x.mean((1, 2, 3)).view(2, 1, 1)
        t[:, 3] = 1.0
        return s.conv(x) + t
    module = Fn(f, conv=nn.Conv2d(4, 4, 3, padding=1)).eval()
    graph, _ = _roundtrip(module, [X4])
    assert "traced_with" not in graph.meta
    # (t[:, 3] = 1.0 ran while tracing, on the tensor fx then stored: no call to record)
    assert sum(n.op == "opaque" and n.attrs["target"] is tm.assigned for n in graph) == 1


def _assignment_read_elsewhere(s, x):
    y = x * 2.0
    first = y[:, 0]  # a view of y, made before the assignment and read after it
    y[:, 0] = 5.0
    return first + y.sum(1)


def _assignment_through_a_view(s, x):
    y = x * 2.0
    y.view(-1)[0] = 5.0  # writes into y
    return y


def _assignment_into_the_input(s, x):
    x[:, 0] = 0.0
    return x * 2.0


@pytest.mark.parametrize("fn, why", [
    (_assignment_read_elsewhere, "writes into memory that getitem shares, and add reads getitem"),
    (_assignment_through_a_view, "writes into memory that mul shares, and output reads mul"),
    (_assignment_into_the_input, "writes into the model's input 'x'"),
])
def test_item_assignment_another_reader_would_miss_is_not_read_functionally(fn, why):
    with pytest.raises(GraphshapeError, match=why):
        load_module(Fn(fn).eval())  # no example inputs: no export to fall back on


def test_item_assignment_another_reader_would_miss_goes_through_the_export():
    module = Fn(_assignment_into_the_input).eval()
    x = torch.randn(*X4)
    graph = load_module(module, (x.clone(),))
    assert graph.meta["traced_with"] == "torch.onnx.export"
    assert "writes into the model's input 'x'" in graph.meta["fx_error"]
    torch.testing.assert_close(emit(graph)(x.clone()), module(x.clone()))
    # where the exporter misreads the write too (TorchScript's does, through a view), the
    # error says both, and that the export is wrong on the example inputs themselves
    with pytest.raises(GraphshapeError, match="reads getitem after it.*even on the example"):
        load_module(Fn(_assignment_read_elsewhere).eval(), (x,))


# ------------------------------------------------------------------ opaque and errors
def my_custom_op(x):
    return x.cumsum(1)


class Custom(nn.Module):
    def forward(self, x):
        return torch.clamp(x, min=-0.5) * 2


def test_opaque_functions_methods_and_modules_still_run():
    module = Fn(lambda s, x: s.custom(torch.cumsum(x, 2)).clamp(max=0.7) + my_custom_op(x),
                custom=Custom()).eval()
    graph = load_module(module, torch.randn(*X4), leaf_modules=[Custom])
    opaque = {n.name: n for n in graph if n.op == "opaque"}
    assert {n.attrs["fx_op"] for n in opaque.values()} == {"call_function", "call_module", "call_method"}
    assert opaque["custom"].attrs["module"] is module.custom  # shared at load ...
    assert all(n.attrs["framework"] == "torch" and "opaque" in n.meta["flags"] for n in opaque.values())
    gm = emit(graph)
    assert gm.get_submodule("custom") is not module.custom  # ... copied at emission
    x = torch.randn(*X4)
    torch.testing.assert_close(gm(x), module(x))
    # a deep copy of the graph (what passes work on) still emits and runs
    torch.testing.assert_close(emit(graph.copy())(x), module(x))


def test_untraceable_model_is_a_clear_error():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    with pytest.raises(GraphshapeError, match="control flow") as info:
        load_module(DataDependent(), torch.randn(2, 3))
    message = str(info.value)
    assert "DataDependent" in message and "torch.fx.wrap" in message and "ONNX" in message


def test_wrong_example_inputs_are_a_clear_error():
    with pytest.raises(GraphshapeError, match="example_inputs"):
        load_module(nn.Linear(3, 2), torch.randn(2, 5))


def test_onnx_opaque_node_is_an_error_naming_it():
    g = Graph({"source": "onnx"})
    g.add(Node("x", "input", outputs=[TensorInfo((1, 3), "float32")]))
    g.add(Node("weird", "opaque", [Ref("x")], {"framework": "onnx", "op_type": "NonZero",
                                               "description": "NonZero"}))
    g.add(Node("y", "output", [Ref("weird")]))
    with pytest.raises(GraphshapeError, match="weird") as info:
        emit(g)
    assert "NonZero" in str(info.value)


# ------------------------------------------------------------------ backend on hand-written IR
def _graph(*nodes, source="onnx"):
    g = Graph({"source": source})
    for n in nodes:
        g.add(n)
    return g


def _inp(name="x", shape=(2, 4, 7, 7)):
    return Node(name, "input", attrs={"name": name}, outputs=[TensorInfo(shape, "float32")])


@pytest.mark.parametrize("copy_params", [True, False])
def test_a_0d_constant_keeps_its_rank(copy_params):
    """copy_params=False (the shaping API) hands the graph's arrays over; a 0-d one became
    1-d there (np.ascontiguousarray), and a model exported with a dynamic batch then failed
    to concatenate its sizes."""
    g = _graph(_inp("x", (3,)), Node("c", "constant", params={"value": np.array(2.0, np.float32)}),
               Node("u", "unsqueeze", [Ref("c")], {"axes": (0,)}),
               Node("cat", "concat", [Ref("x"), Ref("u")], {"axis": 0}),
               Node("y", "output", [Ref("cat")]))
    out = emit(g, copy_params=copy_params)(torch.zeros(3))
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.0, 2.0]))


def test_onnx_style_ops_emit_correctly():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 4, 3, 3)).astype(np.float32)
    scale, shift = rng.standard_normal(3).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    g = _graph(
        _inp(), Node("k", "constant", params={"value": rng.standard_normal((1, 3, 1, 1)).astype(np.float32)}),
        Node("conv", "conv", [Ref("x")], {"pads": (0, 1, 2, 1), "stride": (1, 1), "dilation": (1, 1),
                                          "groups": 1}, {"weight": w}),
        Node("pool", "max_pool", [Ref("conv")], {"kernel_shape": (2, 2), "stride": (2, 2),
                                                 "pads": (0, 0, 1, 1)}),
        Node("avg", "avg_pool", [Ref("conv")], {"kernel_shape": (2, 2), "stride": (2, 2),
                                                "pads": (0, 0, 1, 1), "count_include_pad": False}),
        Node("aff", "affine", [Ref("pool")], {"axis": 1}, {"scale": scale, "shift": shift}),
        Node("wsum", "sum", [Ref("aff"), Ref("avg"), Ref("k")], {"weights": (0.6, 0.8, -1.0)}),
        Node("lrn", "lrn", [Ref("wsum")], {"size": 2, "alpha": 0.1, "beta": 0.75, "k": 1.0}),
        Node("inorm", "instance_norm", [Ref("lrn")], {"eps": 1e-5},
             {"weight": scale, "bias": shift}),
        Node("parts", "split", [Ref("inorm")], {"axis": 1, "sizes": (1, 2)},
             outputs=[TensorInfo(), TensorInfo()]),
        Node("flip", "slice", [Ref("parts", 1)], {"axes": (3,), "starts": (-1,), "ends": (-100,),
                                                  "steps": (-1,)}),
        Node("padded", "pad", [Ref("flip")], {"pads": (0, 0, 1, 0, 0, 0, 0, 2), "mode": "edge"}),
        Node("flat", "reshape", [Ref("padded")], {"shape": (2, -1)}),
        Node("y", "output", [Ref("flat")]),
    )
    g.validate()
    gm = emit(g)
    x = torch.randn(2, 4, 7, 7)
    # reference, written with plain torch functions
    conv = F.conv2d(F.pad(x, (1, 1, 0, 2)), torch.from_numpy(w))
    pool = F.max_pool2d(F.pad(conv, (0, 1, 0, 1), value=-np.inf), 2, 2)
    summed = F.avg_pool2d(F.pad(conv, (0, 1, 0, 1)), 2, 2)
    counts = F.avg_pool2d(F.pad(torch.ones_like(conv), (0, 1, 0, 1)), 2, 2)
    avg = summed / counts
    aff = pool * torch.from_numpy(scale)[:, None, None] + torch.from_numpy(shift)[:, None, None]
    wsum = 0.6 * aff + 0.8 * avg - torch.from_numpy(g["k"].params["value"])
    sq = F.pad(wsum * wsum, (0, 0, 0, 0, 0, 1))  # size 2: ONNX window [c, c + 1]
    lrn = wsum / (1.0 + 0.1 / 2 * (sq[:, :-1] + sq[:, 1:])) ** 0.75
    inorm = F.instance_norm(lrn, weight=torch.from_numpy(scale), bias=torch.from_numpy(shift))
    flip = inorm[:, 1:].flip(3)
    padded = F.pad(flip, (0, 2, 1, 0), mode="replicate")
    torch.testing.assert_close(gm(x), padded.reshape(2, -1), rtol=1e-5, atol=1e-5)
    assert isinstance(gm.get_submodule(gm.meta["graphshape_nodes"]["conv"]), nn.Conv2d)
    assert gm.meta["graphshape_nodes"]["wsum"] == "wsum"


def test_more_backend_only_forms():
    rng = np.random.default_rng(1)
    wt = rng.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.3
    g = _graph(
        _inp(shape=(2, 4, 5, 5)),
        Node("gap", "global_avg_pool", [Ref("x")], outputs=[TensorInfo((2, 4, 1, 1), "float32")]),
        Node("gmp", "global_max_pool", [Ref("x")], outputs=[TensorInfo((2, 4, 1, 1), "float32")]),
        Node("up", "conv_transpose", [Ref("x")], {"stride": (2, 2), "pads": (0, 1, 1, 0),
                                                  "output_padding": (1, 1)}, {"weight": wt}),
        Node("prod", "reduce", [Ref("up")], {"kind": "prod", "axes": (2, 3), "keepdims": True}),
        Node("mix", "sum", [Ref("gap"), Ref("gmp"), Ref("prod")]),
        Node("sq", "squeeze", [Ref("mix")], {"axes": (2, 3)}),
        Node("un", "unsqueeze", [Ref("sq")], {"axes": (0, 3)}),
        Node("y", "output", [Ref("un")]),
    )
    gm = emit(g)
    x = torch.randn(2, 4, 5, 5)
    up = F.conv_transpose2d(x, torch.from_numpy(wt), stride=2, output_padding=1)[:, :, 0:-1, 1:]
    mix = x.mean((2, 3), keepdim=True) + x.amax((2, 3), keepdim=True) + up.prod(3, True).prod(2, True)
    torch.testing.assert_close(gm(x), mix[:, :, 0, 0][None, :, :, None])
    assert isinstance(gm.gap, nn.AdaptiveAvgPool2d) and isinstance(gm.mix, tm.WeightedSum)


def test_cases_cover_every_op_the_torch_frontend_maps():
    # ops the torch frontend never writes (ONNX-only or pass-written forms, io, opaque)
    not_from_torch = {"input", "output", "constant", "opaque", "sum", "affine",
                      "global_avg_pool", "global_max_pool"}
    covered = {case[2] for case in CASES.values()} | {"activation"}
    assert covered == set(OPS) - not_from_torch


def test_transformed_activation_matches_the_formula():
    t = {"input_scale": 1.3, "input_shift": 0.2, "output_shift": -0.4, "output_scale": 0.9}
    x = torch.linspace(-4, 4, 101)
    for name, attrs in [("relu", {}), ("leaky_relu", {"negative_slope": 0.1}), ("tanh", {}),
                        ("softplus", {}), ("gelu", {}), ("elu", {"alpha": 1.0})]:
        mod = tm.TransformedActivation(name, t, **attrs)
        ref = 0.9 * (tm.ACTIVATION_FUNCTIONS[name](1.3 * x + 0.2, **attrs) - 0.4)
        torch.testing.assert_close(mod(x), ref, rtol=1e-6, atol=1e-6)
    # negative scales do not fold (relu is only positively homogeneous)
    t_neg = {"input_scale": -1.3, "output_scale": 0.9}
    torch.testing.assert_close(tm.TransformedActivation("relu", t_neg)(x), 0.9 * torch.relu(-1.3 * x))
    # relu folds into two passes: one addcmul and one clamp
    assert tm.TransformedActivation("relu", t).clamp_min == pytest.approx(0.9 * -0.4)


def test_transformed_activation_node_is_one_module():
    g = _graph(_inp(shape=(3, 5)),
               Node("act", "activation", [Ref("x")], {"name": "leaky_relu", "negative_slope": 0.05,
                                                      "transform": {"output_scale": 1.4}}),
               Node("y", "output", [Ref("act")]), source="torch")
    gm = emit(g)
    assert isinstance(gm.act, tm.TransformedActivation)
    x = torch.randn(3, 5)
    torch.testing.assert_close(gm(x), 1.4 * F.leaky_relu(x, 0.05))


def test_every_canonical_op_has_a_torch_emitter():
    assert set(TORCH_EMITTERS) == set(OPS)


def test_fx_names_are_identifiers():
    assert fx_name("layer1_0_conv1") == "layer1_0_conv1"
    assert fx_name("input") == "input_" and fx_name("0/conv.1") == "_0_conv_1"
    g = _graph(_inp("input", (2, 3)), Node("3:relu", "activation", [Ref("input")], {"name": "relu"}),
               Node("y", "output", [Ref("3:relu")]))
    gm = emit(g)
    assert gm.meta["graphshape_nodes"] == {"input": "input_", "3:relu": fx_name("3:relu")}
    assert [n.name for n in gm.graph.nodes][:2] == ["input_", "_3_relu"]


# ------------------------------------------------------------------ device and compile
class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        self.scale = nn.Parameter(torch.ones(8, 1, 1))

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x))) * self.scale + 0.5
        y = y + F.pad(x, (0, 0, 0, 0, 0, 5))
        return self.fc(y.mean((2, 3)))


def test_emitted_module_is_device_agnostic():
    model = Small().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = emit(load_module(model, x))
    assert "device" not in gm.code and "cpu" not in gm.code
    # everything moves with the module: it runs with all state and input on 'meta'
    gm_meta = gm.to("meta")
    assert all(t.is_meta for t in gm_meta.state_dict().values())
    out = gm_meta(torch.empty(2, 3, 8, 8, device="meta"))
    assert out.is_meta and out.shape == (2, 4)


def _dynamo_supported() -> bool:
    try:
        import torch._dynamo

        return hasattr(torch, "compile") and torch._dynamo.is_dynamo_supported()
    except Exception:  # pragma: no cover - builds without dynamo
        return False


@pytest.mark.skipif(not _dynamo_supported(), reason="torch.compile is unavailable here")
def test_torch_compile():
    # aot_eager: dynamo capture (fullgraph: no graph breaks) and AOT autograd, without
    # inductor's C++ compile, which takes ~40 s on this machine
    model = Small().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = emit(load_module(model, x)).eval()
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))
    act = tm.TransformedActivation("leaky_relu", {"input_scale": 1.2, "output_shift": 0.1},
                                   negative_slope=0.2)
    z = torch.randn(50)
    torch.testing.assert_close(torch.compile(act, backend="aot_eager", fullgraph=True)(z), act(z))


def test_a_call_that_does_not_fit_its_op_stays_opaque_and_runs():
    # conv groups computed at run time and a weight used twice: F.conv2d cannot become a
    # conv node (its groups are not static), so it stays a call, and the weight a constant
    def f(s, x):
        groups = x.size(1) // 2
        return F.conv2d(x, s.w, None, 1, 1, 1, groups) + s.w.sum()
    module = Fn(f, w=P(4, 2, 3, 3)).eval()
    graph, gm = _roundtrip(module, [X4])
    conv = graph["conv2d"]
    assert conv.op == "opaque" and conv.attrs["fx_op"] == "call_function"
    assert graph["w"].op == "constant" and graph["w"].attrs["trainable"]
    assert isinstance(gm.w, nn.Parameter)


def test_fallback_undoes_what_the_handler_added():
    # cat's inputs are read (the parameter becomes a constant node) before its traced dim
    # makes the call unmappable: the fallback must start from a clean graph
    module = Fn(lambda s, x: torch.cat([s.c, x], dim=x.dim() - 3), c=P(2, 1, 6, 6)).eval()
    graph, _ = _roundtrip(module, [X4])
    assert graph["cat"].op == "opaque" and graph["cat"].inputs[0] == Ref("c")
    assert [n.name for n in graph if n.op == "constant"] == ["c"]


def test_an_opaque_view_after_contiguous_runs_on_the_permuted_tensor():
    """``x.permute(...).contiguous().view(computed shape)`` (Hugging Face's attention:
    ``context.view(context.size()[:-2] + (all_head_size,))``): ``contiguous`` is the
    identity in the graph, so the opaque view met the permuted tensor in the emitted module
    ("view size is not compatible with input tensor's size and stride"); it is called as
    reshape. A view to another dtype stays a view."""
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):  # (B, heads, tokens, dim)
            h = x.permute(0, 2, 1, 3).contiguous()
            h = h.view(h.size()[:-2] + (8,))
            bits = x.contiguous().view(torch.int32)
            return self.fc(h), bits

    model, x = Heads(), torch.randn(2, 2, 5, 4)
    gm = emit(load_module(model, (x,)))
    got, want = gm(x), model(x)
    torch.testing.assert_close(got[0], want[0])
    assert got[1].dtype == torch.int32 and torch.equal(got[1], want[1])
