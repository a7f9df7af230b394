"""Small hand-built ONNX models for the shaping tests (helpers, not tests)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def caffe2_style_resnet(blocks=(2, 2), width=8, size=16, seed=0, opset=9):
    """A caffe2-style ResNet at ``opset``: every conv is followed by BatchNormalization, then
    Mul and Add by per-channel constants (the exported affine), residual joins are ``Sum``
    nodes, the first block of each later stage has a strided projection shortcut."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def conv_bn(x, name, cin, cout, k, stride=1, relu=True):
        w = const(f"{name}_w", rng.normal(0, 1 / np.sqrt(cin * k * k), (cout, cin, k, k)))
        nodes.append(helper.make_node("Conv", [x, w], [f"{name}_conv"], kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[k // 2] * 4))
        bn = [const(f"{name}_bn_{p}", v) for p, v in (
            ("scale", np.ones(cout)), ("bias", np.zeros(cout)),
            ("mean", rng.normal(0, 0.1, cout)), ("var", rng.uniform(0.5, 1.5, cout)))]
        nodes.append(helper.make_node("BatchNormalization", [f"{name}_conv", *bn],
                                      [f"{name}_bn"], epsilon=1e-5))
        nodes.append(helper.make_node("Mul", [f"{name}_bn", const(
            f"{name}_mul_c", rng.uniform(0.5, 1.5, (1, cout, 1, 1)))], [f"{name}_mul"]))
        nodes.append(helper.make_node("Add", [f"{name}_mul", const(
            f"{name}_add_c", rng.normal(0, 0.1, (1, cout, 1, 1)))], [f"{name}_add"]))
        if not relu:
            return f"{name}_add"
        nodes.append(helper.make_node("Relu", [f"{name}_add"], [f"{name}_relu"]))
        return f"{name}_relu"

    x = conv_bn("data", "stem", 3, width, 3)
    cin = width
    for s, n in enumerate(blocks):
        cout = width * 2 ** s
        for b in range(n):
            stride = 2 if (s > 0 and b == 0) else 1
            name = f"res{s}_{b}"
            h = conv_bn(x, f"{name}_a", cin, cout, 3, stride)
            h = conv_bn(h, f"{name}_b", cout, cout, 3, relu=False)
            short = x if (stride == 1 and cin == cout) else conv_bn(
                x, f"{name}_proj", cin, cout, 1, stride, relu=False)
            nodes.append(helper.make_node("Sum", [h, short], [f"{name}_sum"]))
            nodes.append(helper.make_node("Relu", [f"{name}_sum"], [f"{name}_out"]))
            x, cin = f"{name}_out", cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"]))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], axis=1))
    fc_w = const("fc_w", rng.normal(0, 1 / np.sqrt(cin), (10, cin)))
    fc_b = const("fc_b", np.zeros(10))
    nodes.append(helper.make_node("Gemm", ["flat", fc_w, fc_b], ["prob"], transB=1))
    graph = helper.make_graph(
        nodes, "caffe2_resnet",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=4 if opset <= 9 else 7, producer_name="caffe2-style")
