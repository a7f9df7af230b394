"""The canonical op table.

Every IR node's ``op`` is a key of :data:`OPS`. An :class:`OpSpec` says what the op means
(its attribute and parameter conventions), which **kernel rule** the analysis applies to
it (how it acts on q and c), and what passes may do with it (its ``category``).

Conventions shared by all ops (frontends convert to these, backends convert from them):

* Layout is channels-first (N, C, *spatial), as in PyTorch and ONNX.
* Padding is ONNX-style ``pads = (begin_0, ..., begin_k, end_0, ..., end_k)`` over the
  spatial dims, explicit (frontends resolve ``auto_pad`` / ``padding="same"``).
* Axes are non-negative where the rank is known; otherwise as given.
* Weights are stored in PyTorch's layout: conv ``(out, in/groups, *kernel)``,
  conv_transpose ``(in, out/groups, *kernel)``, linear ``(out, in)``.

Per-backend emission rules live beside each backend (``graphshape.backend_torch``,
``graphshape.backend_onnx``) in tables keyed by these names, and the analysis' kernel
rules in ``graphshape.passes.analysis``; ``tests/test_analysis.py``,
``tests/test_torch_ops.py`` and ``tests/test_onnx_ops.py`` check that every op here has an
entry in each of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class OpSpec:
    """One canonical op.

    name:      the canonical op name.
    category:  what passes may do with it: "io", "constant", "affine" (conv/linear: gets
               orthogonal init, absorbs shifts), "activation" (elementwise nonlinearity:
               may be transformed/substituted), "join" (sum/concat: may be normalized),
               "arith" (binary elementwise), "norm" (removed by shaping), "pool",
               "shape" (data movement only), "reduce", "opaque".
    kernel:    the kernel rule the analysis applies: "none" (io/constants), "affine",
               "activation", "sum", "concat", "product", "norm", "identity" (exact),
               "approx_identity" (identity on q/c as an approximation, flagged),
               "unknown" (no rule: output and everything downstream marked unknown).
    attrs:     attribute names and meaning (documentation, checked by frontends' tests).
    params:    parameter names and meaning.
    """

    name: str
    category: str
    kernel: str
    doc: str
    attrs: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)


_POOL_ATTRS = {
    "dims": "number of spatial dims (1, 2, 3)",
    "kernel_shape": "tuple of ints",
    "stride": "tuple of ints",
    "pads": "ONNX-style begin/end pads",
    "ceil_mode": "bool",
}

#: attributes a scale fold (passes/fold.py, mode "weights") puts on conv / linear layers
_LAYER_SCALES = {
    "weight_scale": "float, optional (1): the layer computes with weight_scale * weight",
    "bias_scale": "float, optional (1): ... and bias_scale * bias",
}

_SPECS = [
    OpSpec("input", "io", "none", "A model input. attrs: name (ONNX/torch argument name).",
           {"name": "argument name"}),
    OpSpec("output", "io", "identity", "A model output; one input, the returned value.",
           {"name": "output name"}),
    OpSpec("constant", "constant", "none",
           "A constant tensor (ONNX initializer / Constant, torch buffer or parameter used as data).",
           {"trainable": "bool: emit as nn.Parameter (torch) rather than a buffer"},
           {"value": "the tensor"}),
    OpSpec("conv", "affine", "affine", "N-d convolution (Conv, nn.ConvNd, F.convNd).",
           {"dims": "1, 2 or 3", "in_channels": "int", "out_channels": "int",
            "kernel_shape": "tuple", "stride": "tuple", "pads": "ONNX-style begin/end pads",
            "dilation": "tuple", "groups": "int",
            "padding_mode": "'zeros' | 'reflect' | 'replicate' | 'circular'",
            **_LAYER_SCALES},
           {"weight": "(out, in/groups, *kernel)", "bias": "(out,), optional"}),
    OpSpec("conv_transpose", "affine", "affine", "N-d transposed convolution.",
           {"dims": "1, 2 or 3", "in_channels": "int", "out_channels": "int",
            "kernel_shape": "tuple", "stride": "tuple", "pads": "begin/end pads",
            "output_padding": "tuple", "dilation": "tuple", "groups": "int", **_LAYER_SCALES},
           {"weight": "(in, out/groups, *kernel)", "bias": "(out,), optional"}),
    OpSpec("linear", "affine", "affine",
           "Dense layer over the last axis: y = x W^T + b (nn.Linear, Gemm, MatMul by a constant).",
           {"in_features": "int", "out_features": "int", **_LAYER_SCALES},
           {"weight": "(out, in)", "bias": "(out,), optional"}),
    OpSpec("matmul", "arith", "product", "Matrix product of two signals (torch.matmul, MatMul)."),
    OpSpec("add", "arith", "sum", "x + y with broadcasting. A join when both are signals.",
           {"alpha": "optional float: x + alpha * y (torch.add)"}),
    OpSpec("sub", "arith", "sum", "x - y with broadcasting."),
    OpSpec("mul", "arith", "product", "x * y with broadcasting (a gate when one side is a nonlinearity's output)."),
    OpSpec("div", "arith", "product", "x / y with broadcasting."),
    OpSpec("sum", "join", "sum",
           "Sum of any number of inputs, optionally weighted: sum_i weights[i] * x_i "
           "(ONNX Sum; the normalized sums shaping writes).",
           {"weights": "optional tuple of floats, one per input"}),
    OpSpec("concat", "join", "concat", "Concatenation along an axis.", {"axis": "int"}),
    OpSpec("activation", "activation", "activation",
           "Elementwise nonlinearity from graphshape.activations' registry, optionally "
           "transformed: output_scale * (phi(input_scale * x + input_shift) + output_shift).",
           {"name": "registry name", "negative_slope": "leaky_relu only",
            "min_val": "hardtanh only", "max_val": "hardtanh only",
            "transform": "optional dict: input_scale, input_shift, output_shift, output_scale",
            "learnable_slope": "bool, leaky_relu only: a PReLU (nn.PReLU, ONNX PRelu); its "
                               "slopes are params['weight'], negative_slope their mean",
            "inplace": "bool (torch)"},
           {"weight": "PReLU slopes, (1,) or (channels,) along axis 1; only with "
                      "learnable_slope"}),
    OpSpec("batch_norm", "norm", "norm", "Batch normalization (1/2/3d).",
           {"num_features": "int", "eps": "float", "momentum": "float or None",
            "affine": "bool", "track_running_stats": "bool",
            "frozen": "bool (default False): the running statistics and the affine "
                      "parameters are fixed, in training too (torchvision's "
                      "FrozenBatchNorm2d): a per-channel affine map"},
           {"weight": "(C,)", "bias": "(C,)", "running_mean": "(C,)", "running_var": "(C,)"}),
    OpSpec("layer_norm", "norm", "norm", "Layer normalization over the trailing dims.",
           {"normalized_shape": "tuple", "eps": "float"},
           {"weight": "normalized_shape", "bias": "normalized_shape"}),
    OpSpec("rms_norm", "norm", "norm",
           "RMS normalization over the trailing dims, x / sqrt(mean(x^2) + eps) * weight "
           "(nn.RMSNorm, F.rms_norm, ONNX RMSNormalization, onnxruntime's "
           "SimplifiedLayerNormalization).",
           {"normalized_shape": "tuple", "eps": "float, or None: the input dtype's epsilon"},
           {"weight": "normalized_shape (optional)"}),
    OpSpec("std_norm", "norm", "norm",
           "Normalization by the standard deviation over the trailing dims, as hand-written "
           "modules spell it with torch.var / torch.std where it is not a layer_norm: "
           "(x - mean(x)) / sqrt(var(x) + eps) with var's divisor n - correction (a layer "
           "norm whose variance is unbiased), x / sqrt(var(x) + eps) (not centre: timm's "
           "SimpleNorm), the standard deviation plus eps (the Annotated Transformer's "
           "LayerNorm), or a variance clamped at eps from below (imagen-pytorch's "
           "ChanLayerNorm, var.clamp(min=eps).rsqrt()). Made by fusing such a region "
           "(graphshape.passes.elementwise.fuse_norm_decompositions).",
           {"normalized_shape": "tuple", "eps": "float",
            "centre": "bool: x minus its mean is divided (else x itself)",
            "correction": "int: the variance divides by n - correction (0 or 1)",
            "eps_added_to": '"variance" (default: sqrt(var + eps)), "std" (std + eps) or '
                            '"clamp" (sqrt(max(var, eps)))'}),
    OpSpec("group_norm", "norm", "norm", "Group normalization.",
           {"num_groups": "int", "num_channels": "int", "eps": "float"},
           {"weight": "(C,)", "bias": "(C,)"}),
    OpSpec("instance_norm", "norm", "norm", "Instance normalization.",
           {"num_features": "int", "eps": "float", "momentum": "float", "affine": "bool",
            "track_running_stats": "bool"},
           {"weight": "(C,)", "bias": "(C,)"}),
    OpSpec("lrn", "norm", "norm", "Local response normalization across channels.",
           {"size": "int", "alpha": "float", "beta": "float", "k": "float"}),
    OpSpec("affine", "arith", "affine", "Per-channel scale and shift: x * scale + shift along `axis`.",
           {"axis": "int (default 1)"}, {"scale": "(C,)", "shift": "(C,), optional"}),
    OpSpec("avg_pool", "pool", "approx_identity", "Average pooling.",
           {**_POOL_ATTRS, "count_include_pad": "bool"}),
    OpSpec("max_pool", "pool", "approx_identity", "Max pooling.",
           {**_POOL_ATTRS, "dilation": "tuple"}),
    OpSpec("global_avg_pool", "pool", "approx_identity", "Mean over all spatial dims, keepdims."),
    OpSpec("global_max_pool", "pool", "approx_identity", "Max over all spatial dims, keepdims."),
    OpSpec("adaptive_avg_pool", "pool", "approx_identity", "Adaptive average pooling.",
           {"dims": "int", "output_size": "tuple (None entries keep the input size)"}),
    OpSpec("adaptive_max_pool", "pool", "approx_identity", "Adaptive max pooling.",
           {"dims": "int", "output_size": "tuple"}),
    OpSpec("resize", "pool", "approx_identity",
           "Spatial resampling (F.interpolate, nn.Upsample, ONNX Resize / Upsample), in "
           "PyTorch's terms; the identity on q and c, exact for nearest upsampling by "
           "integer factors (each entry copied equally often).",
           {"dims": "number of spatial dims",
            "mode": "'nearest' (ONNX asymmetric + floor) | 'nearest-exact' (half_pixel + "
                    "round_prefer_ceil) | 'linear' | 'cubic' (coefficient -0.75)",
            "align_corners": "bool, linear / cubic: ONNX align_corners, else half_pixel",
            "antialias": "bool, linear / cubic (ONNX opset 18)",
            "scales": "tuple of floats per spatial dim (output = floor(input * scale)), or",
            "sizes": "the output's spatial sizes: ints, or Refs to run-time values (which "
                     "are then extra inputs), or one Ref to a whole size tuple",
            "static_sizes": "the spatial sizes traced for the example inputs, where `sizes` "
                            "is dynamic (for backends that need static ones)"}),
    OpSpec("flatten", "shape", "identity", "Flatten dims start_dim..end_dim (torch semantics).",
           {"start_dim": "int", "end_dim": "int"}),
    OpSpec("reshape", "shape", "identity",
           "Reshape (view/reshape/Reshape). `shape` may hold -1; extra inputs, if any, are "
           "dynamic dims.",
           {"shape": "tuple",
            "copy_dims": "tuple of positions whose size is the input's size there (ONNX's "
                         "0 in a target computed from a dynamic shape; their `shape` entry "
                         "is 0), optional"}),
    OpSpec("transpose", "shape", "identity", "Permute dims.", {"perm": "tuple"}),
    OpSpec("squeeze", "shape", "identity", "Remove size-1 dims.", {"axes": "tuple or None (all)"}),
    OpSpec("depth_to_space", "shape", "approx_identity",
           "Channel blocks moved into space, (N, C*b*b, H, W) -> (N, C, H*b, W*b): "
           "torch's pixel_shuffle (mode 'CRD': input channel c*b*b + i*b + j goes to "
           "(c, h*b + i, w*b + j)) and ONNX DepthToSpace (its default mode 'DCR': input "
           "channel (i*b + j)*C + c). A permutation of each example's entries: q exact, c "
           "(normalized per location, features regrouped) approximate, as for a transpose.",
           {"blocksize": "int b", "mode": "'CRD' | 'DCR'"}),
    OpSpec("space_to_depth", "shape", "approx_identity",
           "The inverse, (N, C, H*b, W*b) -> (N, C*b*b, H, W): torch's pixel_unshuffle "
           "(mode 'CRD') and ONNX SpaceToDepth ('DCR'). As depth_to_space on q and c.",
           {"blocksize": "int b", "mode": "'CRD' | 'DCR'"}),
    OpSpec("unsqueeze", "shape", "identity", "Insert size-1 dims.", {"axes": "tuple"}),
    OpSpec("slice", "shape", "approx_identity", "Strided slice.",
           {"axes": "tuple", "starts": "tuple", "ends": "tuple", "steps": "tuple"}),
    OpSpec("split", "shape", "approx_identity", "Split into several outputs along an axis.",
           {"axis": "int", "sizes": "tuple of ints"}),
    OpSpec("pad", "shape", "approx_identity", "Pad.",
           {"pads": "ONNX-style begin/end pads over all dims", "mode": "'constant' | 'reflect' | 'edge'",
            "value": "float"}),
    OpSpec("dropout", "shape", "identity", "Dropout (identity at initialization / in eval).",
           {"p": "float"}),
    OpSpec("identity", "shape", "identity", "Identity."),
    OpSpec("cast", "shape", "identity",
           "Convert a floating tensor to another floating dtype (x.to(torch.float32), "
           "x.float(), x.type_as(y), ONNX Cast between floating types): the identity on "
           "the kernel.", {"dtype": "'float16' | 'bfloat16' | 'float32' | 'float64'"}),
    OpSpec("softmax", "reduce", "unknown", "Softmax along an axis.", {"axis": "int"}),
    OpSpec("log_softmax", "reduce", "unknown", "Log-softmax along an axis.", {"axis": "int"}),
    OpSpec("reduce", "reduce", "unknown", "Reduction (mean, sum, max, min, prod) over axes.",
           {"kind": "'mean' | 'sum' | 'max' | 'min' | 'prod'", "axes": "tuple or None (all)",
            "keepdims": "bool"}),
    OpSpec("opaque", "opaque", "unknown",
           "Anything a frontend does not map: carried through untouched and flagged. "
           "attrs hold what the source's backend needs to emit it again."),
]

#: canonical op name -> OpSpec
OPS: dict[str, OpSpec] = {spec.name: spec for spec in _SPECS}

#: the ops of category "affine" (conv, conv_transpose, linear): the layers with a weight
#: matrix, which shaping initializes and folds scales into
AFFINE_LAYERS: tuple[str, ...] = tuple(name for name, s in OPS.items() if s.category == "affine")


def spec(op: str) -> OpSpec:
    from graphshape.errors import GraphshapeError

    try:
        return OPS[op]
    except KeyError:
        raise GraphshapeError(f"unknown canonical op {op!r}; known: {', '.join(OPS)}") from None


def prelu_activation(slopes) -> tuple[dict, dict]:
    """``(attrs, params)`` of the activation node of a PReLU (``nn.PReLU``, ``F.prelu``,
    ONNX ``PRelu``), as every frontend writes it: a ``leaky_relu`` with
    ``learnable_slope``, its slopes (one shared, or one per channel) as ``params["weight"]``,
    and ``negative_slope`` their mean (what the kernel rule reads)."""
    import numpy as np

    weight = np.asarray(slopes).reshape(-1)
    return ({"name": "leaky_relu", "negative_slope": float(np.mean(weight, dtype=np.float64)),
             "learnable_slope": True}, {"weight": weight})


def same_pads(size, kernel, stride, dilation) -> list[tuple[int, int]]:
    """``(begin, end)`` per spatial axis of TensorFlow's "same" padding (ONNX
    ``auto_pad="SAME_UPPER"``) of an input of ``size``: the output has ``ceil(size /
    stride)`` positions, the odd pad at the end. Frontends resolve ``auto_pad`` with it,
    and ``torch_modules.pad_same`` pads by it at run time."""
    pads = []
    for n, k, s, d in zip(size, kernel, stride, dilation):
        total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads.append((total // 2, total - total // 2))
    return pads
