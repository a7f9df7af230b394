"""Bad input never crashes graphshape: a catalog, one case per kind of bad input.

Each case checks that a :class:`GraphshapeError` comes out (nothing else), that it names the
node at fault where there is one, and that it says what to do. The CLI cases check the exit
status (2 for usage errors, 1 for model errors), the one-line message, and that the
traceback appears only with ``--debug``.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import graphshape
from graphshape import GraphshapeError
from graphshape.cli import main as cli_main


# --------------------------------------------------------------------------- models
def tiny_mlp(opset: int = 13, activation: str = "Tanh") -> onnx.ModelProto:
    """x[2,4] -> Gemm fc1 (8) -> activation 'act' -> Gemm fc2 (3) -> y[2,3]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "w1"),
             numpy_helper.from_array(np.zeros(8, np.float32), "b1"),
             numpy_helper.from_array(rng.normal(size=(3, 8)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"),
             helper.make_node(activation, ["h"], ["a"], name="act"),
             helper.make_node("Gemm", ["a", "w2"], ["y"], transB=1, name="fc2")]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def mutated(fn, model=None) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model or tiny_mlp())
    fn(m)
    return m


def write(tmp_path, name, data) -> str:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.SerializeToString())
    return str(path)


def error_of(fn, *args, **kwargs) -> GraphshapeError:
    with pytest.raises(GraphshapeError) as info:
        fn(*args, **kwargs)
    return info.value


def ort_run(path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


# --------------------------------------------------------------------------- corrupt files
def test_truncated_file(tmp_path):
    path = write(tmp_path, "t.onnx", tiny_mlp().SerializeToString()[:100])
    e = error_of(graphshape.load, path)
    assert "corrupt or truncated" in str(e) and "again" in str(e)


def test_garbage_file(tmp_path):
    e = error_of(graphshape.load, write(tmp_path, "g.onnx", b"\x00\xffnot a model at all"))
    assert "not a readable ONNX model" in str(e)


def test_empty_file(tmp_path):
    e = error_of(graphshape.load, write(tmp_path, "e.onnx", b""))
    assert "holds no ONNX graph" in str(e)


@pytest.mark.parametrize("data, words", [
    (tiny_mlp().SerializeToString()[:100], "corrupt or truncated"),
    (b"\x00\xffnot a model at all", "not a readable ONNX model"),
    (b"", "hold no ONNX graph"),
])
def test_bad_bytes(data, words):
    assert words in str(error_of(graphshape.load, data))


def test_bytes_and_binary_file_objects_load_like_the_file(tmp_path):
    import io

    path = write(tmp_path, "m.onnx", tiny_mlp())
    ops = [n.op for n in graphshape.load(path)]
    data = tiny_mlp().SerializeToString()
    assert [n.op for n in graphshape.load(data)] == ops
    assert [n.op for n in graphshape.load(io.BytesIO(data))] == ops
    with open(path, "rb") as f:
        assert [n.op for n in graphshape.load(f)] == ops
    with open(path) as f:  # text mode
        assert "text mode" in str(error_of(graphshape.load, f))
    out = tmp_path / "shaped.onnx"
    graphshape.shape_onnx(data, out)
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    assert np.isfinite(ort_run(out, x)).all()


def test_missing_file(tmp_path):
    assert "no such file" in str(error_of(graphshape.load, str(tmp_path / "nope.onnx")))


# --------------------------------------------------------------------------- broken graphs
def test_cycle_names_the_nodes_on_it():
    def cycle(m):
        m.graph.node[0].input[0] = "y"  # fc1 reads fc2's output
    e = error_of(graphshape.load, mutated(cycle))
    assert "cycle" in str(e) and "fc1 -> act -> fc2 -> fc1" in str(e)
    assert e.node == "fc1"


def test_unsorted_acyclic_nodes_are_sorted():
    def unsort(m):
        nodes = list(m.graph.node)
        del m.graph.node[:]
        m.graph.node.extend(reversed(nodes))
    model = mutated(unsort)
    graph = graphshape.load(model)
    assert [graph[n].op for n in graph.topo_order() if graph[n].op in ("linear", "activation")] \
        == ["linear", "activation", "linear"]
    assert model.graph.node[0].name == "fc2"  # the caller's model is left as it was


def test_dangling_tensor_name():
    e = error_of(graphshape.load, mutated(lambda m: m.graph.node[1].input.__setitem__(0, "ghost")))
    assert e.node == "act" and e.op == "Tanh"
    assert "'ghost'" in str(e) and "dangling" in str(e)


def test_value_produced_twice():
    e = error_of(graphshape.load, mutated(lambda m: m.graph.node[2].output.__setitem__(0, "h")))
    assert e.node == "fc2" and "produced twice" in str(e) and "fc1" in str(e)


def test_graph_output_produced_by_no_node():
    e = error_of(graphshape.load, mutated(lambda m: setattr(m.graph.output[0], "name", "zz")))
    assert "'zz'" in str(e) and "produced by no node" in str(e)


def test_unknown_op():
    e = error_of(graphshape.load, mutated(lambda m: setattr(m.graph.node[1], "op_type", "FooBar")))
    assert e.node == "act" and e.op == "FooBar"
    assert "not an ONNX op" in str(e) and "domain" in str(e)


def test_op_missing_from_the_models_opset():
    e = error_of(graphshape.load, mutated(lambda m: setattr(m.graph.node[1], "op_type", "Gelu")))
    assert e.node == "act" and "opset 13" in str(e) and "re-export" in str(e)


def test_old_opset_is_converted_and_said_so(tmp_path):
    old = tiny_mlp(opset=7)  # (the model zoo's classic files are opset 3-8)
    old.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "b2"))
    old.graph.node[2].input.append("b2")  # Gemm-7 needs its C
    before = old.SerializeToString()
    graph = graphshape.load(old)
    assert graph.meta["converted_from_opset"] == 7 and graph.meta["opset"] == 13
    assert old.SerializeToString() == before  # the caller's model is not changed
    x = {"x": np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)}
    run = lambda m: ort.InferenceSession(m.SerializeToString()).run(None, x)[0]  # noqa: E731
    np.testing.assert_allclose(run(graphshape.to_onnx(graph)), run(old), rtol=1e-6)
    out = tmp_path / "mlp_dks.onnx"
    report = graphshape.shape_onnx(write(tmp_path, "mlp7.onnx", old), str(out), method="DKS")
    assert any("opset 7 was converted to 13" in w for w in report.warnings)
    assert onnx.load(str(out)).opset_import[0].version == 13


def test_old_ir_version_with_a_pad_is_converted():
    # IR version 3 wants every initializer declared as an input too; the converter's Pad-11
    # adapter adds the pads as an undeclared initializer (a torch opset 7 DenseNet export)
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 2, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Pad", ["x"], ["p"], pads=[0, 0, 1, 1, 0, 0, 1, 1]),
             helper.make_node("Conv", ["p", "w"], ["c"]),
             helper.make_node("Relu", ["c"], ["y"])]
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])
    model = helper.make_model(
        helper.make_graph(nodes, "t", [x_info, helper.make_tensor_value_info(
            "w", TensorProto.FLOAT, [4, 2, 3, 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])], [w]),
        opset_imports=[helper.make_opsetid("", 7)], ir_version=3)
    onnx.checker.check_model(model)
    graph = graphshape.load(model)
    assert graph.meta["converted_from_opset"] == 7 and graph.count_ops().get("opaque") is None
    x = {"x": rng.normal(size=(1, 2, 5, 5)).astype(np.float32)}
    run = lambda m: ort.InferenceSession(m.SerializeToString()).run(None, x)[0]  # noqa: E731
    np.testing.assert_allclose(run(graphshape.to_onnx(graph)), run(model), rtol=1e-5, atol=1e-6)


def test_old_opset_the_converter_cannot_convert():
    scan = helper.make_node("Scan", ["x"], ["y"], num_scan_inputs=1,
                            body=helper.make_graph([], "body", [], []))
    model = helper.make_model(
        helper.make_graph([scan], "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]),
        opset_imports=[helper.make_opsetid("", 8)], ir_version=3)
    e = error_of(graphshape.load, model)
    assert "opset 8" in str(e) and "version_converter could not convert" in str(e)


def test_custom_domain_op_is_carried_opaque_and_reported(tmp_path):
    def custom(m):
        m.graph.node[1].domain = "com.acme"
        m.opset_import.append(helper.make_opsetid("com.acme", 1))
    model = mutated(custom)
    graph = graphshape.load(model)
    assert [graph[n].attrs["op_type"] for n in graph.topo_order() if graph[n].op == "opaque"] \
        == ["Tanh"]
    # no activation left that graphshape can read: shaping says so, naming the opaque op
    e = error_of(graphshape.shape_onnx, model, tmp_path / "out.onnx")
    assert "no activation" in str(e) and "com.acme::Tanh" in str(e)
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("weight", [np.zeros((8, 5), np.float32), np.zeros(32, np.float32)],
                         ids=["wrong_shape", "wrong_rank"])
def test_initializer_of_the_wrong_shape(weight):
    def bad(m):
        m.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight, "w1"))
    e = error_of(graphshape.load, mutated(bad))
    assert e.node == "fc1" and e.op == "Gemm"
    assert "wrong shape" in str(e)


def test_handler_failure_names_the_node(monkeypatch):
    """A malformed node that passes the checks but breaks the op mapping is named."""
    from graphshape.frontends import onnx_import

    def broken(self, node, attrs, name):
        raise ValueError("not enough values to unpack")
    monkeypatch.setattr(onnx_import._Importer, "_op_Gemm", broken)
    e = error_of(graphshape.load, tiny_mlp())
    assert e.node == "fc1" and e.op == "Gemm" and "strict_mode=True" in str(e)


# --------------------------------------------------------------------------- shapes, dtypes
def test_dynamic_batch_dimension_is_shaped_and_stays_dynamic(tmp_path):
    def dyn(m):
        m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
        m.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    dst = tmp_path / "dyn.onnx"
    graphshape.shape_onnx(mutated(dyn), dst, method="DKS")
    out = ort_run(dst, np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32))
    assert out.shape == (5, 3) and np.isfinite(out).all()


def test_unknown_input_rank_is_shaped(tmp_path):
    def norank(m):
        m.graph.input[0].type.tensor_type.ClearField("shape")
    dst = tmp_path / "norank.onnx"
    graphshape.shape_onnx(mutated(norank), dst, method="DKS")
    out = ort_run(dst, np.ones((3, 4), np.float32))
    assert out.shape == (3, 3) and np.isfinite(out).all()


def test_empty_graph(tmp_path):
    def empty(m):
        del m.graph.node[:]
        del m.graph.output[:]
    e = error_of(graphshape.shape_onnx, mutated(empty), tmp_path / "o.onnx")
    assert "no outputs" in str(e) and "export" in str(e)


@pytest.mark.parametrize("method", ["TAT", "DKS"])
def test_model_without_activation(tmp_path, method):
    def linear(m):
        del m.graph.node[1]
        m.graph.node[1].input[0] = "h"
    model = mutated(linear)
    e = error_of(graphshape.shape_onnx, model, tmp_path / "o.onnx", method=method)
    assert "no activation" in str(e) and "method='untransformed'" in str(e)
    assert not (tmp_path / "o.onnx").exists()
    # what the message suggests works
    graphshape.shape_onnx(model, tmp_path / "o.onnx", method="untransformed")
    assert (tmp_path / "o.onnx").exists()


def test_non_float_model(tmp_path):
    def ints(m):
        for t in list(m.graph.initializer):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.int64), t.name))
        m.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64
        m.graph.output[0].type.tensor_type.elem_type = TensorProto.INT64
        m.graph.node[1].op_type = "Relu"
    e = error_of(graphshape.shape_onnx, mutated(ints), tmp_path / "o.onnx")
    assert "floating-point" in str(e) and "int64" in str(e) and "float32" in str(e)


def _qdq(m):
    """tiny_mlp in onnxruntime.quantization's QDQ form: activations through
    QuantizeLinear / DequantizeLinear, fc1's weight stored as int8."""
    w1 = numpy_helper.to_array(m.graph.initializer[0])
    scale = float(np.abs(w1).max() / 127)
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        np.round(w1 / scale).astype(np.int8), "w1_q"))
    m.graph.initializer.extend([numpy_helper.from_array(np.float32(scale), "w1_s"),
                                numpy_helper.from_array(np.float32(0.05), "a_s"),
                                numpy_helper.from_array(np.int8(0), "a_z")])
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend([
        helper.make_node("DequantizeLinear", ["w1_q", "w1_s"], ["w1"], name="w1_dq"),
        helper.make_node("QuantizeLinear", ["x", "a_s", "a_z"], ["xq"], name="x_q"),
        helper.make_node("DequantizeLinear", ["xq", "a_s", "a_z"], ["xdq"], name="x_dq")])
    nodes[0].input[0] = "xdq"
    m.graph.node.extend(nodes)


def test_quantized_onnx_model_is_refused_by_name(tmp_path):
    src = write(tmp_path, "q.onnx", mutated(_qdq))
    assert ort_run(src, np.ones((2, 4), np.float32)).shape == (2, 3)  # a valid model
    e = error_of(graphshape.shape_onnx, src, tmp_path / "o.onnx", method="DKS")
    # (the weight's DequantizeLinear reads constants only: computed at import)
    assert "quantized (1 ONNX QuantizeLinear, 1 ONNX DequantizeLinear)" in str(e)
    assert "float model" in str(e)
    assert not (tmp_path / "o.onnx").exists()
    e = error_of(graphshape.analyze, src)
    assert "cannot analyse it" in str(e)

    def weights_only(m):  # int8 weights dequantized into a float network: shaped
        _qdq(m)
        del m.graph.node[1:3]
        m.graph.node[1].input[0] = "x"
    report = graphshape.shape_onnx(mutated(weights_only), tmp_path / "w.onnx", method="DKS")
    assert report.initialized == 2 and (tmp_path / "w.onnx").exists()


def test_quantized_torch_model_is_refused_by_name():
    from torch.ao.quantization import quantize_dynamic

    model = quantize_dynamic(_torch_mlp(), {torch.nn.Linear}, dtype=torch.qint8)
    for fn in (graphshape.shape, graphshape.analyze):
        e = error_of(fn, model, torch.randn(2, 3))
        assert "quantized (2 module torch.ao.nn.quantized" in str(e)


# --------------------------------------------------------------------------- PyTorch
class _DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return torch.tanh(x)
        return x


def test_module_fx_cannot_trace():
    e = error_of(graphshape.shape, _DataDependent(), torch.randn(2, 3))
    assert "_DataDependent" in str(e) and "leaf_modules" in str(e)


def test_example_inputs_that_do_not_fit_name_the_fx_node(capfd):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh())
    e = error_of(graphshape.shape, model, torch.randn(2, 5))
    assert "fx node '_0'" in str(e) and "2x5 and 3x3" in str(e)
    assert "Traceback" not in capfd.readouterr().err  # torch's ShapeProp traceback is muted


def test_torch_model_without_activation():
    e = error_of(graphshape.shape, torch.nn.Linear(3, 3), torch.randn(2, 3))
    assert "no activation" in str(e)


def test_unloadable_object():
    e = error_of(graphshape.load, 5)
    assert "nn.Module" in str(e) and "ONNX file path" in str(e)


# --------------------------------------------------------------------------- options
_MLP = None


def _torch_mlp():
    return torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


@pytest.mark.parametrize("kwargs, words", [
    ({"method": "foo"}, "unknown method"),
    ({"method": 3}, "method must be a string"),
    ({"method": "DKS", "zeta": 0.5}, "zeta"),
    ({"shortcut_weight": 2}, "shortcut_weight"),
    ({"shortcut_weight": "0.5"}, "shortcut_weight must be a number"),
    ({"eta": float("nan")}, "eta must be a finite number"),
    ({"tau": -1}, "tau"),
    ({"activation": "nope"}, "unknown activation"),
    ({"activation": 1}, "activation must be"),
    ({"seed": "x"}, "seed must be"),
    ({"seed": -1}, "seed must be"),
    ({"pln": "yes"}, "pln must be True or False"),
    ({"foo": 1}, "unexpected keyword argument 'foo'"),
])
def test_invalid_shape_options(kwargs, words):
    e = error_of(graphshape.shape, _torch_mlp(), torch.randn(2, 3), **kwargs)
    assert words in str(e)


@pytest.mark.parametrize("call", [
    lambda: graphshape.analyze(_torch_mlp(), torch.randn(2, 3), measure=True),
    lambda: graphshape.load(_torch_mlp(), torch.randn(2, 3), trace=True),
    lambda: graphshape.to_torch(),
    lambda: graphshape.to_onnx(graphshape.load(tiny_mlp()), opst=17),
])
def test_a_wrong_argument_is_named_not_called_a_bug(call):
    # before: "internal error while analysing the model (TypeError: ...); this is a
    # graphshape bug"
    e = error_of(call)
    assert "its arguments are" in str(e) and "bug" not in str(e)


def test_invalid_shape_onnx_destinations(tmp_path):
    src = write(tmp_path, "m.onnx", tiny_mlp())
    before = open(src, "rb").read()
    assert "is the source file" in str(error_of(graphshape.shape_onnx, src, src))
    assert "is a folder" in str(error_of(graphshape.shape_onnx, src, tmp_path))
    assert "does not exist" in str(error_of(graphshape.shape_onnx, src, tmp_path / "no" / "x.onnx"))
    assert "dst must be a file path" in str(error_of(graphshape.shape_onnx, src, 3))
    assert open(src, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_internal_errors_are_wrapped_at_the_api_boundary(monkeypatch, tmp_path):
    import graphshape.shaping_api as shaping_api

    def bug(*args, **kwargs):
        raise KeyError("oops")
    monkeypatch.setattr(shaping_api, "shape_graph", bug)
    e = error_of(graphshape.shape_onnx, tiny_mlp(), tmp_path / "o.onnx")
    assert "internal error" in str(e) and "bug" in str(e)
    assert isinstance(e.__cause__, KeyError)
    assert not (tmp_path / "o.onnx").exists()


# --------------------------------------------------------------------------- .pt files
def test_pt_files_load_weights_only(tmp_path):
    model = _torch_mlp()
    torch.save(model, tmp_path / "module.pt")
    torch.save(model.state_dict(), tmp_path / "state.pt")
    (tmp_path / "junk.pt").write_bytes(b"xx")
    e = error_of(graphshape.load, str(tmp_path / "module.pt"), torch.randn(2, 3))
    assert "weights_only=True" in str(e) and "--trust" in str(e)
    e = error_of(graphshape.load, str(tmp_path / "state.pt"), torch.randn(2, 3))
    assert "state dict" in str(e) and "load_state_dict" in str(e)
    e = error_of(graphshape.load, str(tmp_path / "junk.pt"), torch.randn(2, 3))
    assert "corrupt" in str(e)
    graph = graphshape.load(str(tmp_path / "module.pt"), torch.randn(2, 3), trust=True)
    assert sum(graph[n].op == "linear" for n in graph.topo_order()) == 2


# --------------------------------------------------------------------------- CLI
def _cli(args, capsys):
    code = cli_main(args)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("args, words", [
    (["shape", "m.onnx"], "required: -o"),
    (["shape", "m.onnx", "-o", "x.onnx", "--zeta", "abc"], "--zeta must be a number"),
    (["shape", "m.onnx", "-o", "x.onnx", "--method", "foo"], "invalid choice"),
    (["shape", "m.onnx", "-o", "x.txt"], "must end in .onnx or .pt"),
    (["shape", "m.onnx", "-o", "x.onnx", "--shortcut-weight", "3"], "[0, 1]"),
    (["shape", "m.onnx", "-o", "x.onnx", "--activation", "nope"], "unknown --activation"),
    (["shape", "nothere.onnx", "-o", "x.onnx"], "no such file"),
    (["shape", "m.onnx", "-o", "m.onnx"], "never overwrites"),
    (["shape", "m.onnx", "-o", "nofolder/x.onnx"], "does not exist"),
    (["shape", "justaword", "-o", "x.onnx"], "package.module:factory"),
    (["shape", "torchvision.models:resnet18(", "-o", "x.onnx"], "literal arguments"),
    # arguments are read with ast.literal_eval, never run
    (["shape", "torchvision.models:resnet18(num_classes=__import__('os').getpid())", "-o",
      "x.onnx"], "must be Python literals"),
    (["shape", "torchvision.models:resnet18(**{'num_classes': 3})", "-o", "x.onnx"],
     "*args / **kwargs"),
    (["batch", "m.onnx", "-o", "out"], "is not a folder"),
    (["inspect", "m.onnx", "--input-shape", "1,x"], "--input-shape"),
])
def test_cli_usage_errors_exit_2_with_one_line(args, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "m.onnx", tiny_mlp())
    before = (tmp_path / "m.onnx").read_bytes()
    try:
        code = cli_main(args)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    assert words in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "m.onnx").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # nothing written


def test_cli_model_error_exits_1_traceback_only_with_debug(tmp_path, capsys):
    src = write(tmp_path, "bad.onnx", tiny_mlp().SerializeToString()[:100])
    dst = str(tmp_path / "out.onnx")
    code, err = _cli(["shape", src, "-o", dst], capsys)
    assert code == 1 and "corrupt or truncated" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, err = _cli(["--debug", "shape", src, "-o", dst], capsys)
    assert code == 1 and "Traceback" in err and "corrupt or truncated" in err.splitlines()[-1]
    assert not os.path.exists(dst)


def test_cli_internal_error_is_one_line(monkeypatch, tmp_path, capsys):
    import graphshape.shaping_api as shaping_api

    def bug(*args, **kwargs):
        raise ZeroDivisionError("division by zero\nsecond line")
    monkeypatch.setattr(shaping_api, "shape_graph", bug)
    src = write(tmp_path, "m.onnx", tiny_mlp())
    code, err = _cli(["shape", src, "-o", str(tmp_path / "o.onnx")], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "ZeroDivisionError" in err and "--debug" in err
    code, err = _cli(["shape", src, "-o", str(tmp_path / "o.onnx"), "--debug"], capsys)
    assert code == 1 and "Traceback" in err and "ZeroDivisionError" in err
    assert not (tmp_path / "o.onnx").exists()


def test_cli_pt_source_needs_trust(tmp_path, capsys):
    torch.save(_torch_mlp(), tmp_path / "m.pt")
    dst = str(tmp_path / "shaped.pt")
    code, err = _cli(["shape", str(tmp_path / "m.pt"), "-o", dst, "--input-shape", "2,3"], capsys)
    assert code == 1 and "--trust" in err and not os.path.exists(dst)
    code, err = _cli(["shape", str(tmp_path / "m.pt"), "-o", dst, "--input-shape", "2,3",
                      "--trust", "--method", "dks"], capsys)
    assert code == 0, err
    shaped = torch.load(dst, weights_only=False)
    assert shaped(torch.randn(4, 3)).shape == (4, 2)


def _deep_mlp():
    torch.manual_seed(0)
    layers = [m for _ in range(8) for m in (torch.nn.Linear(8, 8), torch.nn.ReLU())]
    return torch.nn.Sequential(*layers, torch.nn.Linear(8, 2)).eval()


def test_torchscript_and_export_archives_need_trust_and_then_load(tmp_path):
    model, x = _deep_mlp(), torch.randn(4, 8)
    torch.jit.save(torch.jit.trace(model, x), str(tmp_path / "scripted.pt"))
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "program.pt2"))
    for name, what in (("scripted.pt", "TorchScript archive"), ("program.pt2", "torch.export")):
        e = error_of(graphshape.load, str(tmp_path / name), x)
        assert what in str(e) and "trust=True" in str(e)
        graph = graphshape.load(str(tmp_path / name), x, trust=True)
        assert sum(graph[n].op == "linear" for n in graph.topo_order()) == 9
        if name == "scripted.pt":  # (not RecursiveScriptModule)
            assert graph.meta["model_class"] == "Sequential"
        with torch.no_grad():
            torch.testing.assert_close(graphshape.to_torch(graph)(x), model(x))
    # a truncated archive is a corrupt file, said as such
    data = (tmp_path / "program.pt2").read_bytes()
    (tmp_path / "broken.pt2").write_bytes(data[:len(data) // 2])
    e = error_of(graphshape.load, str(tmp_path / "broken.pt2"), x, trust=True)
    assert "corrupt" in str(e)


def test_cli_shapes_a_pt2_program_with_its_own_example_inputs(tmp_path, capsys):
    model, x = _deep_mlp(), torch.randn(4, 8)
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "program.pt2"))
    dst = str(tmp_path / "shaped.onnx")
    code, err = _cli(["shape", str(tmp_path / "program.pt2"), "-o", dst], capsys)
    assert code == 1 and "--trust" in err and not os.path.exists(dst)
    code, err = _cli(["shape", str(tmp_path / "program.pt2"), "-o", dst, "--trust",
                      "--method", "dks"], capsys)
    assert code == 0, err
    session = ort.InferenceSession(dst)
    assert session.run(None, {session.get_inputs()[0].name: x.numpy()})[0].shape == (4, 2)


# --------------------------------------------------------------------------- atomic writes
def test_cli_pt_write_is_atomic(tmp_path, monkeypatch, capsys):
    torch.save(_torch_mlp(), tmp_path / "m.pt")
    dst = tmp_path / "shaped.pt"
    dst.write_bytes(b"previous")

    def half_write(obj, path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", half_write)
    code, err = _cli(["shape", str(tmp_path / "m.pt"), "-o", str(dst), "--input-shape", "2,3",
                      "--trust", "--method", "dks"], capsys)
    assert code == 1
    assert dst.read_bytes() == b"previous"  # the old file is untouched
    assert sorted(os.listdir(tmp_path)) == ["m.pt", "shaped.pt"]  # no temp file left


def test_shape_onnx_write_is_atomic(tmp_path, monkeypatch):
    from graphshape import backend_onnx

    src = write(tmp_path, "m.onnx", tiny_mlp())
    dst = tmp_path / "o.onnx"
    dst.write_bytes(b"previous")

    def failing_replace(a, b):
        raise OSError(5, "I/O error")
    monkeypatch.setattr(backend_onnx.os, "replace", failing_replace)
    e = error_of(graphshape.shape_onnx, src, dst, method="DKS")
    assert "cannot write" in str(e)
    assert dst.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "o.onnx"]


def test_batch_refuses_output_inside_input_unless_forced(tmp_path, capsys):
    src = tmp_path / "models"
    src.mkdir()
    write(src, "m.onnx", tiny_mlp())
    code, err = _cli(["batch", str(src), "-o", str(src / "shaped"), "--method", "dks"], capsys)
    assert code == 2 and "inside SRC_DIR" in err and "--force" in err
    assert not (src / "shaped").exists()
    code, err = _cli(["batch", str(src), "-o", str(src / "shaped"), "--method", "dks",
                      "--force", "--report", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    assert (src / "shaped" / "m.onnx").exists() and (tmp_path / "r.json").exists()
    # a second forced run does not read its own outputs as inputs
    code, _ = _cli(["batch", str(src), "-o", str(src / "shaped"), "--method", "dks",
                    "--force"], capsys)
    assert code == 0 and not (src / "shaped" / "shaped").exists()


def test_batch_never_overwrites_an_input(tmp_path, capsys):
    # SRC_DIR inside DST_DIR: out/models/models/m.onnx would be written to out/models/m.onnx
    inner = tmp_path / "out" / "models"
    (inner / "models").mkdir(parents=True)
    write(inner, "m.onnx", tiny_mlp())
    write(inner / "models", "m.onnx", tiny_mlp(activation="Sigmoid"))
    before = (inner / "m.onnx").read_bytes()
    code, err = _cli(["batch", str(inner), "-o", str(tmp_path / "out"), "--method", "dks"],
                     capsys)
    assert code == 2 and "would overwrite an input" in err
    assert (inner / "m.onnx").read_bytes() == before


# --------------------------------------------------------------------------- analyze inputs
@pytest.mark.parametrize("example, words", [
    (torch.randn(2, 5), "axis 1: 5 instead of 4"),
    (torch.randn(2, 4, 1), "rank 2"),
    ("abc", "is a str"),
    (torch.full((2, 4), float("nan")), "NaN or infinite"),
    ((torch.randn(2, 4), torch.randn(2, 4)), "1 input(s)"),
])
def test_analyze_rejects_example_inputs_that_do_not_fit(example, words):
    e = error_of(graphshape.analyze, tiny_mlp(), example)
    assert words in str(e)


def test_analyze_accepts_another_batch_size():
    stats = graphshape.analyze(tiny_mlp(), torch.randn(7, 4))
    assert len(stats.rows) >= 3


def test_cli_inspect_with_a_wrong_input_shape(tmp_path, capsys):
    src = write(tmp_path, "m.onnx", tiny_mlp())
    code, err = _cli(["inspect", src, "--input-shape", "2,5"], capsys)
    assert code == 1 and "axis 1: 5 instead of 4" in err and len(err.strip().splitlines()) == 1


def test_to_onnx_rejects_a_non_integer_opset():
    assert "opset must be an integer" in str(error_of(graphshape.to_onnx, tiny_mlp(), "x"))


def test_atomic_writes_keep_the_default_file_mode(tmp_path, capsys):
    """The temp files are made 0600 by mkstemp; the outputs get the mode open() would give."""
    umask = os.umask(0o022)
    try:
        src = write(tmp_path, "m.onnx", tiny_mlp())
        code, err = _cli(["shape", src, "-o", str(tmp_path / "o.onnx"), "--method", "dks",
                          "--report", str(tmp_path / "r.json")], capsys)
        assert code == 0, err
        for name in ("o.onnx", "r.json"):
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)


@pytest.mark.parametrize("entry", ["load", "analyze", "shape"])
def test_a_model_on_the_meta_device_is_refused_saying_so(entry):
    """A model built under torch.device("meta") has no values: every entry point says so
    (torch's own error, from deep inside the traced run, named a device mismatch)."""
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                                    torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(GraphshapeError, match=r"Sequential's tensors are on the meta device "
                                              r"\('0.weight' and \d+ more\).*to_empty"):
        getattr(graphshape, entry)(model, x)


@pytest.mark.parametrize("entry", ["load", "analyze", "shape"])
def test_a_model_with_uninitialized_lazy_modules_is_refused_saying_so(entry):
    """Lazy modules create their parameters on the first call: before it, graphshape says
    to run the model once (it was an 'internal error ... uninitialized parameter')."""
    model = torch.nn.Sequential(torch.nn.LazyConv2d(8, 3), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.LazyLinear(2))
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(GraphshapeError, match=r"lazy modules whose parameters do not exist "
                                              r"yet \('0.weight' of LazyConv2d and 3 more\)"
                                              r".*model\(x\)"):
        getattr(graphshape, entry)(model, x)
    model(x)  # what the message says to do
    assert graphshape.load(model, x).count_ops()["conv"] == 1
