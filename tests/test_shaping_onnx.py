"""Shaping ONNX models (graphshape.shape_onnx) and the ``graphshape shape`` / ``batch`` CLI."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

import graphshape  # noqa: E402
from graphshape import GraphshapeError  # noqa: E402
from graphshape.cli import main as cli_main  # noqa: E402
from graphshape.shaping_api import report_from_onnx, shape_onnx  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from shaping_onnx_models import caffe2_style_resnet  # noqa: E402

NORM_TYPES = {"BatchNormalization", "LayerNormalization", "InstanceNormalization", "LRN",
              "GroupNormalization"}


def _run(path, x):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def caffe2_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("caffe2") / "caffe2_resnet.onnx"
    onnx.save(caffe2_style_resnet(blocks=(3, 3, 3)), str(path))
    return path


@pytest.fixture(scope="module")
def resnet18_path(tmp_path_factory):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tv") / "resnet18_13.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torchvision.models.resnet18(weights=None).eval(),
                          (torch.randn(1, 3, 32, 32),), str(path), opset_version=13,
                          dynamo=False, input_names=["image"], output_names=["logits"])
    return path


@pytest.mark.parametrize("method,activation", [("DKS", "softplus"), ("TAT", "leaky_relu")])
def test_caffe2_style_opset9_resnet(caffe2_path, tmp_path, method, activation):
    """BatchNormalization-Mul-Add chains and Sum joins: shaped into a checker-valid opset-9
    model without norms or the per-channel constants, which onnxruntime runs and which
    computes what the torch backend computes from the same shaped graph."""
    from graphshape.backend_torch import emit
    from graphshape.frontends.onnx_import import load_onnx
    from graphshape.passes.shaping import shape_graph

    before = _sha(caffe2_path)
    dst = tmp_path / "shaped.onnx"
    report = shape_onnx(caffe2_path, dst, method=method, activation=activation,
                        shortcut_weight=0.5, seed=7)
    assert _sha(caffe2_path) == before  # src never touched
    model = onnx.load(str(dst))
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [9]
    assert not {n.op_type for n in model.graph.node} & NORM_TYPES
    assert not [i.name for i in model.graph.initializer if i.name.endswith(("_mul_c", "_add_c"))]
    # 19 convs + 2 projections: 21 (BatchNormalization, Mul, Add) chains, 9 Sum joins
    assert sum(r["op"] == "batch_norm" for r in report.removed) == 21
    assert len(report.removed) == 63
    assert sum("normalized sum" in r["what"] for r in report.rewritten) == 9
    assert report_from_onnx(dst) == report.to_dict()

    rng = np.random.default_rng(0)
    x1, x2 = (rng.standard_normal((1, 3, 16, 16)).astype(np.float32) for _ in range(2))
    y1, y2 = _run(dst, x1), _run(dst, x2)
    assert np.isfinite(y1).all() and np.abs(y1 - y2).max() > 1e-3

    shaped, same = shape_graph(load_onnx(str(caffe2_path)), method=method,
                               activation=activation, shortcut_weight=0.5, seed=7)
    assert same.activation_params == report.activation_params
    with torch.no_grad():
        y_torch = emit(shaped)(torch.from_numpy(x1)).numpy()
    np.testing.assert_allclose(y1, y_torch, rtol=1e-4, atol=1e-4 * np.abs(y_torch).max())


def test_torchvision_export_keeps_its_opset_and_matches_torch_parameters(resnet18_path, tmp_path):
    dst = tmp_path / "r18.onnx"
    report = shape_onnx(resnet18_path, dst, method="DKS", activation="tanh", shortcut_weight=0.5)
    model = onnx.load(str(dst))
    onnx.checker.check_model(model)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [13]
    # the same parameters as dks for resnet18, w = 0.5 (tests/data/dks_resnet_reference.json)
    ref = json.load(open(os.path.join(os.path.dirname(__file__), "data",
                                      "dks_resnet_reference.json")))
    want = next(c["params"] for c in ref["cases"] if c["structure"] == "v1"
                and c["arch"] == "resnet18"
                and c["shortcut_weight"] == 0.5 and c["method"] == "DKS"
                and c["activation"] == "tanh")
    assert report.activation_params["tanh"] == pytest.approx(want, rel=1e-5)
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert np.isfinite(_run(dst, x)).all()


def test_shape_onnx_refuses_to_overwrite_its_source(caffe2_path):
    with pytest.raises(GraphshapeError, match="never overwrites"):
        shape_onnx(caffe2_path, caffe2_path)
    with pytest.raises(GraphshapeError, match="no such"):
        shape_onnx(str(caffe2_path) + ".missing", "/tmp/never.onnx")


@pytest.mark.parametrize("opset", [9, 18])
def test_pln_makes_the_model_scale_invariant(tmp_path, opset):
    """With PLN every input location is rescaled to q = 1, so 5x the input gives the same
    output (ReduceMean takes its axes as an input from opset 18)."""
    src = tmp_path / "m.onnx"
    onnx.save(caffe2_style_resnet(blocks=(2, 2), opset=opset), str(src))
    dst = tmp_path / "pln.onnx"
    shape_onnx(src, dst, method="DKS", activation="softplus", shortcut_weight=0.5, pln=True)
    onnx.checker.check_model(onnx.load(str(dst)))
    x = np.random.default_rng(2).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(_run(dst, 5 * x + 0), _run(dst, x), rtol=1e-4, atol=1e-5)
    plain = tmp_path / "plain.onnx"
    shape_onnx(src, plain, method="DKS", activation="softplus", shortcut_weight=0.5)
    assert np.abs(_run(plain, 5 * x) - _run(plain, x)).max() > 1e-3


# --------------------------------------------------------------------------- CLI
def test_cli_shape_onnx_and_bad_arguments(caffe2_path, tmp_path, capsys):
    dst = tmp_path / "out.onnx"
    rep = tmp_path / "rep.json"
    assert cli_main(["shape", str(caffe2_path), "-o", str(dst), "--method", "dks",
                     "--activation", "softplus", "--shortcut-weight", "0.5", "--report",
                     str(rep)]) == 0
    assert "softplus" in capsys.readouterr().out
    assert json.load(open(rep))["activation_params"] == report_from_onnx(dst)["activation_params"]
    for bad in (["shape", str(caffe2_path), "-o", str(dst), "--shortcut-weight", "1.5"],
                ["shape", str(caffe2_path), "-o", str(dst), "--activation", "nosuch"],
                ["shape", str(caffe2_path), "-o", str(tmp_path / "out.txt")],
                ["shape", "no/such/file.onnx", "-o", str(dst)]):
        assert cli_main(bad) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "error" in err
    with pytest.raises(SystemExit) as info:
        cli_main(["shape", str(caffe2_path), "-o", str(dst), "--method", "nope"])
    assert info.value.code == 2
    # an unreachable target: exit 1 with graphshape's message
    assert cli_main(["shape", str(caffe2_path), "-o", str(dst), "--activation", "leaky_relu",
                     "--shortcut-weight", "0.9"]) == 1
    assert "eta" in capsys.readouterr().err


def test_cli_shape_factory_to_pt(tmp_path):
    dst = tmp_path / "r18.pt"
    assert cli_main(["shape", "torchvision.models:resnet18", "-o", str(dst), "--input-shape",
                     "1,3,32,32", "--shortcut-weight", "0.5", "--seed", "3"]) == 0
    gm = torch.load(str(dst), weights_only=False)
    assert gm.graphshape_report["method"] == "TAT"
    out = gm(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


def test_cli_shape_factory_with_literal_arguments(tmp_path):
    dst = tmp_path / "r18.pt"
    assert cli_main(["shape", "timm:create_model('resnet18', num_classes=10)", "-o", str(dst),
                     "--input-shape", "1,3,32,32"]) == 0
    gm = torch.load(str(dst), weights_only=False)
    assert gm(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cli_batch(caffe2_path, resnet18_path, tmp_path, capsys):
    """A folder with two good models (one in a subfolder) and a corrupt one: the good ones
    are shaped in parallel, the bad one is reported, and the exit status is 1."""
    src = tmp_path / "models"
    (src / "sub").mkdir(parents=True)
    (src / "a_caffe2.onnx").write_bytes(open(caffe2_path, "rb").read())
    (src / "sub" / "b_resnet18.onnx").write_bytes(open(resnet18_path, "rb").read())
    (src / "c_broken.onnx").write_bytes(b"this is not a protobuf")
    dst, rep = tmp_path / "shaped", tmp_path / "report.json"
    code = cli_main(["batch", str(src), "-o", str(dst), "--method", "dks", "--activation",
                     "softplus", "--shortcut-weight", "0.5", "--jobs", "2", "--report", str(rep)])
    out = capsys.readouterr()
    assert code == 1
    assert "2 of 3 models shaped, 1 failed" in out.out
    assert "3/3" in out.err  # the progress bar reached the end
    report = json.load(open(rep))
    by_name = {os.path.basename(m["model"]): m for m in report["models"]}
    assert [by_name[n]["status"] for n in ("a_caffe2.onnx", "b_resnet18.onnx", "c_broken.onnx")] \
        == ["ok", "ok", "failed"]
    assert by_name["c_broken.onnx"]["error"]
    assert by_name["b_resnet18.onnx"]["activations_found"] == {"relu": 17}
    assert set(by_name["a_caffe2.onnx"]["parameters"]) == {"softplus"}
    assert by_name["a_caffe2.onnx"]["removed"] == 63
    for m in report["models"][:2]:
        assert m["seconds"] > 0
    for rel in ("a_caffe2.onnx", os.path.join("sub", "b_resnet18.onnx")):
        model = onnx.load(str(dst / rel))
        onnx.checker.check_model(model)
        assert not {n.op_type for n in model.graph.node} & NORM_TYPES
    assert not (dst / "c_broken.onnx").exists()
    assert cli_main(["batch", str(tmp_path / "nothing"), "-o", str(dst)]) == 2


def test_activation_attributes_left_at_their_default_equal_spelled_out_ones():
    """Two ELUs of alpha 1, one exported with ``alpha=1.0``, one read from a region
    (``elu(conv(x) + b)`` with ``b`` a zero initializer) with no alpha: one ELU, one
    parameter set (they were "different attributes")."""
    import io

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.b = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.nn.functional.elu(self.c2(torch.nn.functional.elu(self.c1(x) + self.b)))

    x = torch.randn(2, 3, 8, 8)
    buffer = io.BytesIO()
    torch.onnx.export(Net().eval(), (x,), buffer, dynamo=False, opset_version=17)
    elus = [n.attrs for n in graphshape.load(buffer.getvalue()) if n.op == "activation"]
    assert len(elus) == 2 and {e["name"] for e in elus} == {"elu"}
    shaped = graphshape.shape(buffer.getvalue(), x, method="TAT")
    assert set(shaped.meta["graphshape"].activation_params) == {"elu"}
    assert torch.isfinite(shaped(x)).all()
