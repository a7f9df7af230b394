"""Fuzzing the ONNX path with seeded byte and structure mutations of small real models.

Properties checked on every mutated file (``load -> to_onnx -> to_torch``, then
``shape_onnx(src, dst)``):

* nothing but :class:`GraphshapeError` escapes;
* after a failed ``shape_onnx`` no output file (and no temp file) is left;
* the input file is byte-identical afterwards;
* when ``shape_onnx`` succeeds and the mutated source runs in onnxruntime, the shaped model
  runs too, with finite outputs.

Each test runs a fixed number of seeded cases, stopping early at a time budget so that the
suite stays fast on a loaded machine (it still asserts that a minimum number ran).
"""

from __future__ import annotations

import io
import os
import random
import time
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

import graphshape
from graphshape import GraphshapeError

from shaping_onnx_models import caffe2_style_resnet
from test_bad_input import tiny_mlp

CASES = 500          # per test
MIN_CASES = 30       # must run at least this many, even on a slow machine
BUDGET_S = 15.0      # per test


class _SmallNet(torch.nn.Module):
    """conv-bn-relu, a residual conv-gelu branch, pooling and a linear head."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.c2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x)))
        h = h + torch.nn.functional.gelu(self.c2(h))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(h, 1), 1))


class _UpsamplingNet(torch.nn.Module):
    """PReLU, a bilinear resize to a size read from a tensor, a nearest 2x upsampling, a
    concat, and a final sigmoid."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.c1, self.bn, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.PReLU(4)
        self.c2, self.c3 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.up, self.fc = nn.Upsample(scale_factor=2), nn.Linear(4, 3)

    def forward(self, x):
        h = self.act(self.bn(self.c1(x)))
        d = torch.nn.functional.max_pool2d(self.c2(h), 2)
        u = torch.nn.functional.interpolate(d, size=h.shape[-2:], mode="bilinear")
        h = torch.relu(self.c3(torch.cat([u, self.up(d)], 1)))
        return torch.sigmoid(self.fc(h.mean((2, 3))))


class _EvoNormNet(torch.nn.Module):
    """conv, timm's EvoNorm S0 (written out by the exporter: a sigmoid gate and a group
    statistic that shaping evaluates, ``passes/normalize._exported_evo_norm``), conv."""

    def __init__(self):
        super().__init__()
        from timm.layers import EvoNorm2dS0

        self.c1, self.norm = torch.nn.Conv2d(3, 4, 3, padding=1), EvoNorm2dS0(4, groups=2)
        self.c2 = torch.nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        return self.c2(self.norm(self.c1(x)))


def _export(module) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn(1, 3, 8, 8),), buf, opset_version=13,
                          dynamo=False)
    return onnx.load_from_string(buf.getvalue())


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    old = tiny_mlp(opset=7)  # read through onnx.version_converter
    old.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "b2"))
    old.graph.node[2].input.append("b2")
    return {"mlp": tiny_mlp(), "caffe2_resnet": caffe2_style_resnet(blocks=(1, 1), width=4, size=8),
            "torch_export": _export(_SmallNet()), "upsampling": _export(_UpsamplingNet()),
            "mlp_opset7": old, "evonorm": _export(_EvoNormNet())}


# --------------------------------------------------------------------------- mutations
def byte_mutation(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    kind = rng.choice(["truncate", "flip", "insert", "zero"])
    if kind == "truncate":
        b = b[:rng.randrange(len(b))]
    elif kind == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == "insert":
        i = rng.randrange(len(b))
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    else:
        i = rng.randrange(len(b))
        j = min(len(b), i + rng.randint(1, 64))
        b[i:j] = bytes(j - i)
    return bytes(b)


STRUCTURE_KINDS = ["drop_node", "swap_nodes", "dangling", "unknown_op", "init_shape",
                   "init_dtype", "input_dtype", "dynamic_dim", "rank", "empty", "no_output",
                   "dup_output", "attr_value", "del_attr", "new_attr", "cycle", "nan_init",
                   "neg_init", "dim_value", "del_init", "extra_input"]


def structure_mutation(model: onnx.ModelProto, rng: random.Random) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    n = len(g.node)
    kind = rng.choice(STRUCTURE_KINDS)
    node = g.node[rng.randrange(n)] if n else None
    init = g.initializer[rng.randrange(len(g.initializer))] if g.initializer else None
    dims = g.input[0].type.tensor_type.shape.dim
    if kind == "drop_node" and n:
        del g.node[rng.randrange(n)]
    elif kind == "swap_nodes" and n > 1:
        i, j = rng.sample(range(n), 2)
        a, b = onnx.NodeProto(), onnx.NodeProto()
        a.CopyFrom(g.node[i])
        b.CopyFrom(g.node[j])
        g.node[i].CopyFrom(b)
        g.node[j].CopyFrom(a)
    elif kind == "dangling" and node is not None and node.input:
        node.input[rng.randrange(len(node.input))] = "nowhere"
    elif kind == "unknown_op" and node is not None:
        node.op_type = rng.choice(["FooBar", "Gelu", "Conv", "Relu"])
    elif kind == "init_shape" and init is not None:
        arr = numpy_helper.to_array(init).reshape(-1)
        new = rng.choice([np.resize(arr, max(1, arr.size + rng.choice([-1, 1, 5]))),
                          arr.reshape(1, -1), arr])
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new), init.name))
    elif kind == "init_dtype" and init is not None:
        arr = numpy_helper.to_array(init)
        dtype = rng.choice([np.float64, np.int64, np.float16])
        init.CopyFrom(numpy_helper.from_array(arr.astype(dtype), init.name))
    elif kind == "input_dtype":
        g.input[0].type.tensor_type.elem_type = rng.choice([
            onnx.TensorProto.INT64, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
            onnx.TensorProto.STRING, onnx.TensorProto.BOOL])
    elif kind == "dynamic_dim" and dims:
        d = dims[rng.randrange(len(dims))]
        if rng.random() < 0.5:
            d.dim_param = "N"
        else:
            d.Clear()
    elif kind == "rank":
        if dims and rng.random() < 0.5:
            del dims[-1]
        else:
            g.input[0].type.tensor_type.ClearField("shape")
    elif kind == "empty":
        del g.node[:]
    elif kind == "no_output":
        del g.output[:]
    elif kind == "dup_output" and n > 1:
        g.node[rng.randrange(n)].output[0] = g.node[rng.randrange(n)].output[0]
    elif kind == "attr_value" and node is not None and node.attribute:
        a = node.attribute[rng.randrange(len(node.attribute))]
        if a.ints:
            a.ints[rng.randrange(len(a.ints))] = rng.choice([0, -1, 100, 3])
        elif a.type == onnx.AttributeProto.INT:
            a.i = rng.choice([0, -1, 5, 100])
        elif a.type == onnx.AttributeProto.FLOAT:
            a.f = rng.choice([float("nan"), -1.0, 1e30])
    elif kind == "del_attr" and node is not None and node.attribute:
        del node.attribute[rng.randrange(len(node.attribute))]
    elif kind == "new_attr" and node is not None:
        name = rng.choice(["axis", "group", "strides", "pads", "kernel_shape", "perm",
                           "epsilon", "alpha", "transA", "keepdims"])
        for a in list(node.attribute):
            if a.name == name:
                node.attribute.remove(a)
        node.attribute.append(helper.make_attribute(
            name, rng.choice([0, -1, 2, 7, [0, 0], [1, 1, 1, 1], [-1, 2], 0.0, -1.0])))
    elif kind == "cycle" and n > 2:
        g.node[0].input[0] = g.node[rng.randrange(1, n)].output[0]
    elif kind == "nan_init" and init is not None:
        arr = numpy_helper.to_array(init).copy()
        if arr.dtype.kind == "f" and arr.size:
            arr.reshape(-1)[rng.randrange(arr.size)] = rng.choice([np.nan, np.inf, -np.inf])
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    elif kind == "neg_init" and init is not None:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind == "f":
            scale = rng.choice([1.0, 0.0, 1e30])
            init.CopyFrom(numpy_helper.from_array((-np.abs(arr) * scale).astype(arr.dtype), init.name))
    elif kind == "dim_value" and dims:
        dims[rng.randrange(len(dims))].dim_value = rng.choice([0, 1, 100000])
    elif kind == "del_init" and init is not None:
        g.initializer.remove(init)
    elif kind == "extra_input" and node is not None:
        node.input.append(node.input[0] if node.input else "x")
    return m


# --------------------------------------------------------------------------- the property
def _ort_outputs(model_or_path, feeds):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # the mutated models make onnxruntime log a lot
    arg = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    return ort.InferenceSession(arg, options, providers=["CPUExecutionProvider"]).run(None, feeds)


def check_case(data: bytes, folder, feeds) -> str:
    """Run the pipeline on one mutated file; assert the properties. Returns the outcome."""
    src = os.path.join(folder, "in.onnx")
    out_dir = os.path.join(folder, "out")
    os.makedirs(out_dir, exist_ok=True)
    dst = os.path.join(out_dir, "shaped.onnx")
    if os.path.exists(dst):
        os.remove(dst)
    with open(src, "wb") as fh:
        fh.write(data)
    outcome = "rejected at load"
    try:
        graph = graphshape.load(src)
        outcome = "loaded"
        for emit in (graphshape.to_onnx, graphshape.to_torch):
            try:
                emit(graph)
            except GraphshapeError:
                pass
        try:
            graphshape.shape_onnx(src, dst, method="DKS")
            outcome = "shaped"
        except GraphshapeError:
            assert os.listdir(out_dir) == [], "a failed shape_onnx left files behind"
    except GraphshapeError:
        pass
    with open(src, "rb") as fh:
        assert fh.read() == data, "the input file was modified"
    if outcome == "shaped":
        try:
            _ort_outputs(data, feeds)
        except Exception:  # noqa: BLE001 - the mutated source itself does not run
            return outcome
        outputs = _ort_outputs(dst, feeds)
        assert all(np.isfinite(o).all() for o in outputs if o.dtype.kind == "f")
    return outcome


def _feeds(model):
    rng = np.random.default_rng(0)
    return {i.name: rng.normal(size=[d.dim_value for d in i.type.tensor_type.shape.dim])
            .astype(np.float32) for i in model.graph.input}


def _run_cases(models, tmp_path, seed, mutate):
    rng = random.Random(seed)
    names = sorted(models)
    outcomes: dict[str, int] = {}
    t0 = time.perf_counter()
    done = 0
    for case in range(CASES):
        if time.perf_counter() - t0 > BUDGET_S and done >= MIN_CASES:
            break
        name = names[case % len(names)]
        data = mutate(models[name], rng)
        try:
            outcome = check_case(data, str(tmp_path), _feeds(models[name]))
        except AssertionError as e:
            raise AssertionError(f"seed {seed}, case {case} ({name}): {e}") from None
        except Exception as e:  # noqa: BLE001 - the property: nothing else escapes
            raise AssertionError(f"seed {seed}, case {case} ({name}): {type(e).__name__} "
                                 f"escaped: {e}") from e
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        done += 1
    assert done >= MIN_CASES
    print(f"seed {seed}: {done} cases in {time.perf_counter() - t0:.1f} s: {outcomes}")
    return outcomes


def test_byte_mutations(models, tmp_path):
    outcomes = _run_cases(models, tmp_path, seed=1,
                          mutate=lambda m, rng: byte_mutation(m.SerializeToString(), rng))
    # most random byte damage is caught when the file is read
    assert outcomes.get("rejected at load", 0) > outcomes.get("shaped", 0)


def test_structure_mutations(models, tmp_path):
    outcomes = _run_cases(models, tmp_path, seed=2,
                          mutate=lambda m, rng: structure_mutation(m, rng).SerializeToString())
    # the mutations reach every stage: some are refused, some shape fine
    assert outcomes.get("rejected at load", 0) > 0 and outcomes.get("shaped", 0) > 0


def test_unmutated_models_shape_and_run(models, tmp_path):
    """The fuzz property holds trivially if nothing ever shapes: the seeds do."""
    for model in models.values():
        assert check_case(model.SerializeToString(), str(tmp_path), _feeds(model)) == "shaped"
