"""From an ONNX file, float initializers that no layer takes as its weight (a ViT's
``pos_embed``, a layer scale) are buffers of ``to_torch``'s module, as onnx2torch makes them;
``to_torch(..., trainable_initializers=True)`` (CLI: ``graphshape shape model.onnx -o
model.pt --trainable-initializers``) makes them parameters, so training the converted
module trains them as the PyTorch source did. A graph read from a PyTorch model keeps the
source's parameters and buffers either way."""

from __future__ import annotations

import io
import os

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import graphshape
from graphshape import GraphshapeError
from graphshape.cli import main
from untraceable import finite_or_raise


class _TokenMixer(nn.Module):
    """Tokens + a learned position table, a layer-scaled residual MLP and a head; the
    position table is reshaped by integer shape constants in the export."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.pos_embed = nn.Parameter(torch.randn(1, 4, 16) * 0.02)
        self.gamma = nn.Parameter(torch.full((16,), 0.1))
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.proj(x) + self.pos_embed
        x = x + self.gamma * torch.relu(self.fc(x))
        return self.head(x.reshape(x.shape[0], -1, 16).mean(1))


def _x(batch=2):
    return torch.randn(batch, 4, 8, generator=torch.Generator().manual_seed(batch))


def _export(model) -> bytes:
    buf = io.BytesIO()
    torch.onnx.export(model, (_x(),), buf, dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    return buf.getvalue()


@pytest.fixture(scope="module")
def exported():
    torch.manual_seed(0)
    model = _TokenMixer().eval()
    return model, _export(model)


def test_default_buffers_option_parameters_same_outputs_and_keys(exported):
    model, data = exported
    frozen = graphshape.to_torch(data)
    trained = graphshape.to_torch(data, trainable_initializers=True)
    frozen_params = dict(frozen.named_parameters())
    params = dict(trained.named_parameters())
    assert {"pos_embed", "gamma"} <= set(dict(frozen.named_buffers()))
    assert not {"pos_embed", "gamma"} & set(frozen_params)
    assert {"pos_embed", "gamma"} <= set(params)
    # every layer weight is a parameter either way; nothing else changed kind
    assert set(params) == set(frozen_params) | {"pos_embed", "gamma"}
    # integer constants (the export's shapes) never become parameters
    assert all(p.dtype.is_floating_point for p in params.values())
    assert sorted(trained.state_dict()) == sorted(frozen.state_dict())
    for batch in (2, 5):
        with torch.no_grad():
            expected = model(_x(batch))
            torch.testing.assert_close(frozen(_x(batch)), expected)
            torch.testing.assert_close(trained(_x(batch)), expected)
    # a source checkpoint loads into either, strictly
    frozen.load_state_dict(trained.state_dict(), strict=True)


def test_trainable_initializers_receive_gradients_and_train(exported):
    _, data = exported
    trained = graphshape.to_torch(data, trainable_initializers=True)
    before = trained.pos_embed.detach().clone()
    opt = torch.optim.SGD(trained.parameters(), lr=0.1)
    loss = trained(_x(4)).square().sum()
    loss.backward()
    assert trained.pos_embed.grad is not None and trained.pos_embed.grad.abs().sum() > 0
    assert trained.gamma.grad is not None and trained.gamma.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(trained.pos_embed.detach(), before)


def test_the_source_onnx_file_is_not_changed(exported, tmp_path):
    _, data = exported
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    graph = graphshape.load(str(path))
    graphshape.to_torch(graph, trainable_initializers=True)
    # the graph is not marked: a later default emission still gives buffers
    assert "pos_embed" in dict(graphshape.to_torch(graph).named_buffers())
    assert path.read_bytes() == data


def test_a_non_bool_option_is_refused(exported):
    _, data = exported
    with pytest.raises(GraphshapeError, match="trainable_initializers must be True or False"):
        graphshape.to_torch(data, trainable_initializers="yes")


class _OddPadWithTable(nn.Module):
    """torch.fx cannot trace its check of values, so the model is read through its ONNX
    export; its persistent buffer must stay a buffer even with trainable_initializers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.offset = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.register_buffer("table", torch.rand(1, 8, 1, 1) + 0.5)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = finite_or_raise(torch.relu(self.conv(x)))
        x = x * self.table + self.offset
        return self.fc(x.mean((2, 3)))


def test_a_pytorch_source_read_through_its_export_keeps_its_own_kinds():
    torch.manual_seed(0)
    model = _OddPadWithTable().eval()
    x = torch.randn(2, 3, 9, 9)
    graph = graphshape.load(model, x)
    assert graph.meta.get("torch_via_onnx") or graph.meta["source"] == "onnx"
    for flag in (False, True):
        gm = graphshape.to_torch(graph, trainable_initializers=flag)
        assert "offset" in dict(gm.named_parameters())
        assert "table" in dict(gm.named_buffers())
        assert "table" not in dict(gm.named_parameters())


def test_cli_shape_onnx_to_pt_warns_and_the_flag_makes_parameters(exported, tmp_path, capsys):
    _, data = exported
    src = tmp_path / "m.onnx"
    src.write_bytes(data)
    frozen_path, trained_path = tmp_path / "frozen.pt", tmp_path / "trained.pt"
    assert main(["shape", str(src), "-o", str(frozen_path), "--method", "dks",
                 "--input-shape", "2,4,8"]) == 0
    err = capsys.readouterr().err
    assert "(pos_embed, gamma) are buffers" in err and "--trainable-initializers" in err
    assert main(["shape", str(src), "-o", str(trained_path), "--method", "dks",
                 "--input-shape", "2,4,8", "--trainable-initializers"]) == 0
    assert "are buffers" not in capsys.readouterr().err
    frozen = torch.load(frozen_path, weights_only=False)
    trained = torch.load(trained_path, weights_only=False)
    assert "pos_embed" in dict(frozen.named_buffers())
    assert {"pos_embed", "gamma"} <= set(dict(trained.named_parameters()))
    torch.testing.assert_close(frozen(_x(3)), trained(_x(3)))
    assert onnx.load_from_string(src.read_bytes()) is not None


@pytest.mark.parametrize("dst, src_kind", [("out.onnx", "onnx"), ("out.pt", "factory")])
def test_cli_flag_is_refused_where_it_means_nothing(exported, tmp_path, capsys, dst, src_kind):
    _, data = exported
    if src_kind == "onnx":
        src = tmp_path / "m.onnx"
        src.write_bytes(data)
        src = str(src)
    else:
        src = "torchvision.models:resnet18"
    assert main(["shape", src, "-o", str(tmp_path / dst), "--trainable-initializers"]) == 2
    assert "--trainable-initializers is for an ONNX source and a .pt output" in \
        capsys.readouterr().err
    assert not os.path.exists(tmp_path / dst)


def test_a_shaped_files_helper_constants_stay_buffers(exported, tmp_path):
    """graphshape's own ONNX backend writes helper scalars ("graphshape.w", a normalized
    sum's weight; the activation transform's scales): they are no weight of the model and
    stay fixed, while the file's pos_embed and layer scale become parameters."""
    _, data = exported
    src, dst = tmp_path / "m.onnx", tmp_path / "m_dks.onnx"
    src.write_bytes(data)
    graphshape.shape_onnx(str(src), str(dst), method="DKS")
    stored = {init.name for init in onnx.load(str(dst)).graph.initializer}
    assert "graphshape.w" in stored
    trained = graphshape.to_torch(str(dst), trainable_initializers=True)
    params = dict(trained.named_parameters())
    assert {"pos_embed", "gamma"} <= set(params)
    assert not [name for name in params if "graphshape" in name]
    assert all(p.ndim >= 1 for p in params.values())


def test_shape_of_an_onnx_file_takes_the_option_and_warns_without_it(exported, tmp_path):
    _, data = exported
    src = tmp_path / "m.onnx"
    src.write_bytes(data)
    frozen = graphshape.shape(str(src), method="DKS", seed=0)
    trained = graphshape.shape(str(src), method="DKS", seed=0, trainable_initializers=True)
    warnings = frozen.meta["graphshape"].warnings
    assert any("(pos_embed, gamma) are buffers of the PyTorch module" in w
               and "trainable_initializers=True" in w for w in warnings)
    assert not any("are buffers" in w for w in trained.meta["graphshape"].warnings)
    assert trained.meta["graphshape"].options["trainable_initializers"] is True
    assert frozen.meta["graphshape"].options["trainable_initializers"] is False
    assert "pos_embed" in dict(frozen.named_buffers())
    assert {"pos_embed", "gamma"} <= set(dict(trained.named_parameters()))
    torch.testing.assert_close(frozen(_x(3)), trained(_x(3)))
    with pytest.raises(GraphshapeError, match="trainable_initializers must be True or False"):
        graphshape.shape(str(src), method="DKS", trainable_initializers=1)


def test_a_pytorch_source_gets_no_such_warning():
    torch.manual_seed(0)
    shaped = graphshape.shape(_TokenMixer(), _x(), method="DKS")
    assert not any("are buffers" in w for w in shaped.meta["graphshape"].warnings)
    assert {"pos_embed", "gamma"} <= set(dict(shaped.named_parameters()))


class _TwoScales(nn.Module):
    """Two residual blocks whose layer scales are equal at init (ConvNeXt's 1e-6):
    torch.onnx.export writes the second as an Identity of the first initializer."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 16)
        self.scale1 = nn.Parameter(torch.full((16,), 0.5))
        self.scale2 = nn.Parameter(torch.full((16,), 0.5))

    def forward(self, x):
        x = x + self.scale1 * torch.tanh(self.fc1(x))
        return x + self.scale2 * torch.tanh(self.fc2(x))


def test_equal_initializers_the_exporter_merged_are_separate_under_their_own_names():
    torch.manual_seed(0)
    model = _TwoScales().eval()
    x = torch.randn(3, 16)
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17)
    proto = onnx.load_from_string(buf.getvalue())
    stored = {init.name for init in proto.graph.initializer}
    assert "scale1" in stored and "scale2" not in stored  # the exporter's merge
    assert any(n.op_type == "Identity" and list(n.input) == ["scale1"] for n in proto.graph.node)
    frozen = graphshape.to_torch(buf.getvalue())
    assert {"scale1", "scale2"} <= set(frozen.state_dict())
    trained = graphshape.to_torch(buf.getvalue(), trainable_initializers=True)
    params = dict(trained.named_parameters())
    assert {"scale1", "scale2"} <= set(params)
    assert params["scale1"].data_ptr() != params["scale2"].data_ptr()
    torch.testing.assert_close(trained(x), model(x))
    trained(x).sum().backward()
    assert not torch.equal(params["scale1"].grad, params["scale2"].grad)


def test_one_initializer_read_by_two_nodes_becomes_two_parameters():
    """As for layers' weights (the ONNX frontend records no sharing), each node reading a
    shared initializer gets a parameter of its own; by default it stays one buffer."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "s"], ["a"]), helper.make_node("Tanh", ["a"], ["b"]),
         helper.make_node("Mul", ["b", "s"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(np.full((4,), 2.0, np.float32), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = torch.randn(2, 4)
    frozen = graphshape.to_torch(model)
    assert list(frozen.state_dict()) == ["s"] and not list(frozen.parameters())
    trained = graphshape.to_torch(model, trainable_initializers=True)
    params = dict(trained.named_parameters())
    assert sorted(params) == ["s", "s_1"]
    assert params["s"].data_ptr() != params["s_1"].data_ptr()
    for module in (frozen, trained):
        torch.testing.assert_close(module(x), torch.tanh(x * 2) * 2)
    graph_after = graphshape.load(model)
    assert sum(n.op == "constant" for n in graph_after) == 1  # the loaded graph: untouched


class _ClassToken(nn.Module):
    """A ViT's class token, expanded to the batch (torchvision: `class_token.expand(n, -1,
    -1)`); exported at a static batch of 1 the Expand is the identity on it."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.class_token = nn.Parameter(torch.randn(1, 1, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        tokens = torch.cat([self.class_token.expand(x.shape[0], -1, -1), self.proj(x)], dim=1)
        return self.head(torch.tanh(tokens[:, 0] + tokens[:, 1:].mean(1)))


def test_a_class_token_expanded_to_a_static_batch_is_the_stored_weight():
    torch.manual_seed(0)
    model = _ClassToken().eval()
    x = torch.randn(1, 4, 8)
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17)
    assert any(n.op_type == "Expand" and "class_token" in n.input
               for n in onnx.load_from_string(buf.getvalue()).graph.node)
    frozen = graphshape.to_torch(buf.getvalue())
    assert "class_token" in frozen.state_dict()  # was a folded, non-persistent constant
    trained = graphshape.to_torch(buf.getvalue(), trainable_initializers=True)
    assert "class_token" in dict(trained.named_parameters())
    torch.testing.assert_close(trained(x), model(x))
    trained(x).sum().backward()
    assert trained.class_token.grad is not None and trained.class_token.grad.abs().sum() > 0
