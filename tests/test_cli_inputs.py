"""The command line with models that take several inputs, or integer ones (token ids):
``--input-shape`` once per input, in order, with an optional dtype (``4,16:int64``).
Before, the CLI made one standard normal float batch: a token model failed in its
embedding ("Expected tensor for argument #1 'indices' to have one of the following scalar
types: Long, Int"), and ``inspect --empirical`` refused an ONNX file with two inputs."""

import json
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn

from graphshape.cli import index_bounds, main as cli_main, random_inputs

FACTORY = textwrap.dedent('''
    import torch
    import torch.nn as nn

    class TokenModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(37, 32)
            self.body = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32),
                                      nn.ReLU())
            self.head = nn.Linear(32, 5)

        def forward(self, ids):
            return self.head(self.body(self.emb(ids)))

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(4, 16)
            self.head = nn.Linear(16, 3)

        def forward(self, x, y):
            return self.head(torch.relu(self.a(x) + self.b(y)))

    def tokens():
        torch.manual_seed(0)
        return TokenModel()

    def two():
        torch.manual_seed(0)
        return TwoInputs()

    class SizedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8 * 36, 5)

        def forward(self, x):
            h = torch.nn.functional.gelu(self.bn(self.conv(x)))
            scale = h.new_full((1,), h.size(1) ** 0.5)  # (no ONNX form in the writer)
            return self.fc(h.flatten(1)) / scale

    def sized():
        torch.manual_seed(0)
        return SizedHead()
''')


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "cli_input_models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "cli_input_models"
    sys.modules.pop("cli_input_models", None)


def _run(args, capsys):
    code = cli_main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_token_model_is_inspected_with_integer_example_ids(factories, capsys):
    code, out, err = _run(["inspect", f"{factories}:tokens", "--input-shape", "6,10:int64",
                           "--empirical", "--json"], capsys)
    assert code == 0, err
    rows = {r["node"]: r for r in json.loads(out)["rows"]}
    assert "from integer inputs: measured" in rows["emb"]["flags"]
    # the layers after the embedding are predicted (width 32: each step to ~20%)
    assert rows["body_0"]["q_pred"] == pytest.approx(rows["body_0"]["q_emp"], rel=0.2)
    for name in ("body_0", "body_1", "body_2", "body_3", "head"):
        assert rows[name]["q_pred"] is not None
    for name in ("body_0", "body_1", "body_2"):
        assert rows[name]["q_local"] == pytest.approx(rows[name]["q_emp"], rel=0.2)


def test_a_token_model_is_shaped_from_the_command_line(factories, tmp_path, capsys):
    dst = tmp_path / "tokens_dks.pt"
    code, out, err = _run(["shape", f"{factories}:tokens", "--input-shape", "4,10:int64",
                           "--method", "dks", "-o", str(dst)], capsys)
    assert code == 0, err
    model = torch.load(dst, weights_only=False)
    assert model(torch.randint(0, 37, (3, 10))).shape == (3, 10, 5)


def test_two_inputs_take_one_input_shape_each(factories, capsys):
    code, out, err = _run(["inspect", f"{factories}:two", "--input-shape", "5,8",
                           "--input-shape", "5,4", "--empirical", "--json"], capsys)
    assert code == 0, err
    rows = {r["node"]: r for r in json.loads(out)["rows"]}
    assert rows["add"]["q_pred"] == pytest.approx(rows["add"]["q_emp"], rel=0.3)
    code, _, err = _run(["inspect", f"{factories}:two", "--input-shape", "5,8"], capsys)
    assert code == 2 and "forward takes 2 inputs (x, y)" in err and "1 given" in err


def _token_onnx(path):
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight.normal_()
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7)

    class WithMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, ids, mask):
            return self.net(ids) * mask[..., None]

    torch.onnx.export(WithMask(), (ids, mask), str(path), input_names=["ids", "mask"],
                      opset_version=17, dynamo=False,
                      dynamic_axes={"ids": {0: "batch"}, "mask": {0: "batch"}})


def test_an_onnx_file_with_two_inputs_is_measured(tmp_path, capsys):
    """Without --input-shape: random inputs of the graph's input shapes and dtypes (the
    ids below the embedding table's 50 rows); with it, one per input, each taking the
    graph's dtype unless given."""
    src = tmp_path / "tokens.onnx"
    _token_onnx(src)
    code, out, err = _run(["inspect", str(src), "--empirical", "--json"], capsys)
    assert code == 0, err
    rows = {r["node"]: r for r in json.loads(out)["rows"]}
    assert rows["ids"]["q_pred"] is None  # (an integer input has no kernel)
    assert any(r["q_emp"] is not None and r["op"] == "linear" for r in rows.values())
    code, out, err = _run(["inspect", str(src), "--input-shape", "6,7", "--input-shape",
                           "6,7", "--empirical", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["meta"]["batch"] == 6
    code, _, err = _run(["inspect", str(src), "--input-shape", "6,7"], capsys)
    assert code == 2 and "2 input(s) (ids, mask)" in err


def test_random_inputs_respect_dtypes_and_table_sizes(tmp_path):
    import graphshape

    src = tmp_path / "tokens.onnx"
    _token_onnx(src)
    graph = graphshape.load(str(src))
    assert index_bounds(graph) == {0: 50}
    ids, mask = random_inputs([((400, 7), "int64"), ((400, 7), "float32")], 0,
                              index_bounds(graph))
    assert ids.dtype == torch.int64 and int(ids.min()) == 0 and int(ids.max()) == 49
    assert mask.dtype == torch.float32 and abs(float(mask.std()) - 1) < 0.05
    flags = random_inputs([((1000,), "bool")], 0)
    assert flags.dtype == torch.bool and 0.4 < float(flags.float().mean()) < 0.6
    assert np.unique(random_inputs([((1000,), "int32")], 0).numpy()).tolist() == [0, 1]


@pytest.mark.parametrize("value, words", [
    ("4,16:int65", "unknown dtype 'int65'"),
    ("4,x:int64", "comma-separated positive integers"),
])
def test_bad_input_specs_are_usage_errors(value, words, capsys):
    code, _, err = _run(["inspect", "torchvision.models:resnet18", "--input-shape", value],
                        capsys)
    assert code == 2 and words in err


def test_a_pytorch_model_with_size_reads_is_written_as_onnx(factories, tmp_path, capsys):
    """``graphshape shape <PyTorch model> -o out.onnx`` when the shaped graph holds a PyTorch
    call graphshape's ONNX writer has no form for (a size read from a tensor; torchvision's
    ``_get_relative_position_bias``): the file is written by ``torch.onnx.export`` of the
    shaped module, checked in onnxruntime. Before, the command failed ("opaque torch op
    (function builtins.getattr) has no ONNX form"): torchvision's vit_b_16 and swin_t could
    not be written as ONNX."""
    import onnx
    import onnxruntime as ort

    out, pt = tmp_path / "sized.onnx", tmp_path / "sized.pt"
    args = ["--input-shape", "2,3,6,6", "--method", "DKS"]
    code, _, err = _run(["shape", f"{factories}:sized", "-o", str(out), *args], capsys)
    assert code == 0, err
    assert "written with torch.onnx.export" in err and "checked against the module" in err
    assert "call 'size' (method Tensor.size)" in err
    assert any(p.key == "graphshape" for p in onnx.load(str(out)).metadata_props)
    assert cli_main(["shape", f"{factories}:sized", "-o", str(pt), *args]) == 0  # the same
    shaped = torch.load(str(pt), weights_only=False)
    session = ort.InferenceSession(str(out))
    x = np.random.default_rng(0).standard_normal((3, 3, 6, 6)).astype(np.float32)
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want = shaped(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
