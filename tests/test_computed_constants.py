"""Values computed from constants alone, read on the signal path: a layer scale reshaped for
broadcasting (timm's ConvNeXt, PoolFormer), a class token expanded over the batch (every
ViT), a positional encoding built from ``arange`` and ``sin``. The analysis reads them as
constants (their values from one run of the model); before, each made every node after it
"unknown" (a timm convnext_atto: 16 of 195 nodes predicted, vit_tiny: 4 of 363).

And ONNX Reshapes whose computed target copies a symbolic dim (``x.flatten(2)`` exported
with a dynamic batch as ``Concat(Shape(x)[:2], [-1])``): read as a reshape, not opaque."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphshape
from graphshape.passes.analysis import computed_constants


def _row(stats, node):
    return next(r for r in stats.rows if r["node"] == node)


def _unknown(stats):
    return [r["node"] for r in stats.rows if r["op"] != "input" and r["q_pred"] is None]


class LayerScaleBlock(nn.Module):
    """conv -> gelu -> conv, scaled per channel by ``gamma.reshape(1, -1, 1, 1)``, added
    to the input (timm's ConvNeXt block, without its norm)."""

    def __init__(self, reshaped=True, channels=32):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, 2 * channels, 1)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(2 * channels, channels, 1)
        self.reshaped = reshaped
        gamma = torch.linspace(0.5, 2.0, channels)
        self.gamma = nn.Parameter(gamma if reshaped else gamma.reshape(-1, 1, 1))
        self.head = nn.Linear(channels, 10)

    def forward(self, x):
        x = self.stem(x)
        gamma = self.gamma.reshape(1, -1, 1, 1) if self.reshaped else self.gamma
        x = x + self.conv2(self.act(self.conv1(x))) * gamma
        return self.head(x.mean((2, 3)))


def test_a_reshaped_layer_scale_is_read_as_the_constant_it_is():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    reshaped, direct = LayerScaleBlock(True), LayerScaleBlock(False)
    direct.load_state_dict({k: v.reshape(direct.state_dict()[k].shape)
                            for k, v in reshaped.state_dict().items()})
    graph = graphshape.load(reshaped, x)
    assert computed_constants(graph) != []
    got = graphshape.analyze(graph, x, empirical=True)
    want = graphshape.analyze(direct, x)
    assert _unknown(got) == []
    # the same predictions as the same block holding gamma already shaped (C, 1, 1)
    assert [r["q_pred"] for r in got.rows] == pytest.approx([r["q_pred"] for r in want.rows],
                                                            rel=1e-9)
    # and the one-step rule at the scaling holds on the measured input (to the channels'
    # spread of q: a non-uniform scale is taken as mean(gamma^2) q, flagged approximate)
    mul = next(r for r in got.rows if r["op"] == "mul")
    assert "approximate" in mul["flags"]
    assert mul["q_local"] == pytest.approx(mul["q_emp"], rel=0.1)


class ClassToken(nn.Module):
    """Patch embedding, a class token expanded over the batch and concatenated in front of
    the tokens (``torch.cat([cls.expand(n, -1, -1), x], 1)``), a linear layer."""

    def __init__(self, dim=48):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.full((1, 1, dim), 0.7))
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.fc(torch.relu(x))


def test_a_class_token_expanded_over_the_batch_joins_the_concat():
    torch.manual_seed(0)
    model, x = ClassToken(), torch.randn(4, 3, 16, 16)
    stats = graphshape.analyze(model, x, empirical=True)
    assert _unknown(stats) == []
    cat = next(r for r in stats.rows if r["op"] == "concat")
    # token shares: 16 patches of the patches' q, one token of the class token's mean square
    q_patches = next(r for r in stats.rows if r["op"] == "transpose")["q_pred"]
    assert cat["q_pred"] == pytest.approx((16 * q_patches + 0.7 ** 2) / 17, rel=1e-6)
    assert cat["q_local"] == pytest.approx(cat["q_emp"], rel=1e-6)


@pytest.mark.parametrize("dynamic", [False, True])
def test_the_class_token_of_an_onnx_export_joins_the_concat(tmp_path, dynamic):
    """Through torch's exporter the expand is ``Expand(cls, Where(Equal(Shape ...)))``,
    computed from the input's shape; with a dynamic batch, its output shape is unknown to
    shape inference too. Without example inputs, the analysis runs the model on
    placeholder inputs of the graph's shapes to read its value."""
    torch.manual_seed(0)
    model, x = ClassToken(), torch.randn(2, 3, 16, 16)
    path = tmp_path / "cls.onnx"
    kw = {"dynamic_axes": {"x": {0: "batch"}, "y": {0: "batch"}}} if dynamic else {}
    torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False, **kw)
    stats = graphshape.analyze(str(path))
    assert _unknown(stats) == []
    cat = next(r for r in stats.rows if r["op"] == "concat")
    q_patches = next(r for r in stats.rows if r["op"] == "transpose")["q_pred"]
    assert cat["q_pred"] == pytest.approx((16 * q_patches + 0.7 ** 2) / 17, rel=1e-6)


class SinePositions(nn.Module):
    """Tokens plus a sinusoidal encoding computed in forward from the sequence length."""

    def __init__(self, dim=32):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.register_buffer("freqs", torch.logspace(0, -3, dim))

    def forward(self, x):
        position = torch.arange(x.shape[1], dtype=torch.float32)[:, None]
        h = self.fc1(x) + torch.sin(position * self.freqs)
        return self.fc2(torch.tanh(h))


def test_a_positional_encoding_computed_in_forward_is_read_as_a_constant():
    torch.manual_seed(0)
    model, x = SinePositions(), torch.randn(4, 10, 32)
    stats = graphshape.analyze(model, x, empirical=True)
    assert _unknown(stats) == []
    add = next(r for r in stats.rows if r["op"] == "add")
    fc1 = next(r for r in stats.rows if r["node"] == "fc1")
    encoding = torch.sin(torch.arange(10.0)[:, None] * model.freqs)
    assert add["q_pred"] == pytest.approx(fc1["q_pred"] + float(encoding.square().mean()),
                                          rel=1e-6)
    assert add["q_local"] == pytest.approx(add["q_emp"], rel=0.1)


def test_resnet_like_graphs_have_no_computed_constants():
    """(Nothing to run for them: analysis without example inputs never runs the model.)"""
    import torchvision

    graph = graphshape.load(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))
    assert computed_constants(graph) == []


# --------------------------------------------------------------------------- ONNX reshapes
class Flatten2(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(2).transpose(1, 2))


def test_flatten_of_a_dynamic_batch_is_a_reshape_not_an_opaque_node(tmp_path):
    torch.manual_seed(0)
    model, x = Flatten2().eval(), torch.randn(2, 3, 16, 16)
    path = tmp_path / "flat.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False,
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Shape" in ops and "Reshape" in ops  # (the exporter's computed target)
    graph = graphshape.load(str(path))
    assert [n.op for n in graph if n.op == "opaque" and n.attrs.get("op_type") == "Reshape"] == []
    reshape = next(n for n in graph if n.op == "reshape")
    assert reshape.attrs["shape"] == (-1, 8, 64)
    assert _unknown(graphshape.analyze(graph)) == []
    x3 = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x3})[0]
    got = graphshape.to_torch(graph)(torch.from_numpy(x3)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _pad_to_windows(x, window):
    """(N, H, W, C) zero-padded to multiples of ``window`` by amounts computed from the shape."""
    _, h, w, _ = x.shape
    pad_h, pad_w = (window - h % window) % window, (window - w % window) % window
    return nn.functional.pad(x, (0, 0, 0, pad_w, 0, pad_h))


class PaddedWindows(nn.Module):
    """Swin's window partition: pad H and W up to a multiple of the window by amounts
    computed from the shape (``(w - H % w) % w``), which torch's exporter writes as Mod,
    then its F.pad idiom (ConstantOfShape, Concat, Reshape(-1, 2), Slice with step -1,
    Transpose, Reshape(-1)); then windows by view/permute."""

    def __init__(self, window=4, channels=8):
        super().__init__()
        self.window = window
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.fc = nn.Linear(channels, channels)

    def forward(self, x):
        x = _pad_to_windows(self.conv(x).permute(0, 2, 3, 1), self.window)
        n, hp, wp, c = x.shape
        x = x.view(n, hp // self.window, self.window, wp // self.window, self.window, c)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, self.window * self.window, c)
        return self.fc(torch.relu(x))


@pytest.mark.parametrize("dynamic", [False, True])
def test_padded_windows_of_an_onnx_export_are_read_as_standard_ops(tmp_path, dynamic):
    """Before: the pads were unknown to shape inference (Mod, and the idiom's 2-D Reshape
    and Transpose of int vectors, were not followed), so the Pad and every Reshape after
    it stayed opaque (torchvision swin_t exported with a dynamic batch: about 1200 opaque
    nodes; with a static one, 73 opaque Reshapes)."""
    torch.manual_seed(0)
    model, x = PaddedWindows().eval(), torch.randn(2, 3, 10, 14)
    path = tmp_path / "windows.onnx"
    kw = {"dynamic_axes": {"x": {0: "batch"}, "y": {0: "batch"}}} if dynamic else {}
    torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False, **kw)
    assert {"Mod", "Pad"} <= {n.op_type for n in onnx.load(str(path)).graph.node}
    graph = graphshape.load(str(path))
    assert [n.attrs.get("op_type") for n in graph if n.op == "opaque"] == []
    assert _unknown(graphshape.analyze(graph)) == []
    batch = 3 if dynamic else 2
    data = np.random.default_rng(0).standard_normal((batch, 3, 10, 14)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": data})[0]
    got = graphshape.to_torch(graph)(torch.from_numpy(data)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


class Heads(nn.Module):
    """Split the features into heads keeping batch and sequence length as they are
    (``x.reshape(n, s, 4, -1)``): exported with both dims dynamic, the target copies two
    unknown dims."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(8, 8)

    def forward(self, x):
        n, s, _ = x.shape
        h = self.fc1(x).reshape(n, s, 4, -1)
        return self.fc2(torch.tanh(h)).flatten(2)


def test_a_reshape_copying_two_dynamic_dims_is_a_reshape(tmp_path):
    """Before: opaque (a reshape target may have one unknown entry, written -1); timm's
    nest_tiny exported with a dynamic batch read with 24 such Reshapes, now none."""
    torch.manual_seed(0)
    model = Heads().eval()
    path = tmp_path / "heads.onnx"
    torch.onnx.export(model, (torch.randn(2, 6, 16),), str(path), input_names=["x"],
                      output_names=["y"], opset_version=17, dynamo=False,
                      dynamic_axes={"x": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}})
    graph = graphshape.load(str(path))
    assert [n.attrs.get("op_type") for n in graph if n.op == "opaque"
            and n.attrs.get("op_type") == "Reshape"] == []
    # the split into heads, and the flatten(2) that merges them back
    assert sorted((n.attrs["shape"], n.attrs.get("copy_dims")) for n in graph
                  if n.op == "reshape") == [((0, 0, 4, 8), (0, 1)), ((0, 0, 32), (0, 1))]
    data = np.random.default_rng(0).standard_normal((3, 5, 16)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": data})[0]
    got = graphshape.to_torch(graph)(torch.from_numpy(data)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    again = tmp_path / "again.onnx"
    onnx.save(graphshape.to_onnx(graph), str(again))
    back = ort.InferenceSession(str(again), providers=["CPUExecutionProvider"]).run(
        None, {"x": data})[0]
    np.testing.assert_allclose(back, want, rtol=1e-5, atol=1e-5)


class ShiftedWindows(nn.Module):
    """timm swin's torch path: F.pad by amounts computed from the shape, torch.roll, and a
    crop back by computed sizes (``x[:, :h, :w]``): opaque calls that only move entries."""

    def __init__(self, window=4, channels=16):
        super().__init__()
        self.window = window
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(channels, channels), nn.Linear(channels, 4)

    def forward(self, x):
        x = self.conv(x).permute(0, 2, 3, 1)
        _, h, w, _ = x.shape
        x = torch.roll(_pad_to_windows(x, self.window), shifts=(-2, -2), dims=(1, 2))
        x = torch.relu(self.fc1(x))
        x = torch.roll(x, shifts=(2, 2), dims=(1, 2))[:, :h, :w, :]
        return self.fc2(x)


def test_roll_and_computed_pads_and_crops_move_entries():
    """Before: each was an opaque node without a kernel rule: the analysis stopped at the
    first (timm's swin_tiny: 5 of 571 nodes predicted, now up to its first softmax) and
    shaping warned of 37 opaque nodes in swin_tiny, 18 in botnet26t."""
    torch.manual_seed(0)
    model, x = ShiftedWindows(), torch.randn(4, 3, 10, 14)
    graph = graphshape.load(model, x)
    moved = [n for n in graph if "data movement" in n.meta.get("flags", ())]
    assert sorted(n.attrs["description"] for n in moved) == [
        "function operator.getitem", "function torch.nn.functional.pad",
        "function torch.roll", "function torch.roll"]
    stats = graphshape.analyze(graph, x, empirical=True)
    assert _unknown(stats) == []
    for node in moved:
        row = _row(stats, node.name)
        assert "approximate" in row["flags"]
        if "roll" in node.attrs["description"]:  # a permutation of locations: exact
            assert row["q_local"] == pytest.approx(row["q_emp"], rel=1e-9)
    report = graphshape.shape(model, x, method="DKS").meta["graphshape"]
    assert not any("opaque" in w for w in report.warnings), report.warnings


class PoolBySize(nn.Module):
    """The CIFAR ResNet's head (akamaster's resnet20): ``F.avg_pool2d(out, out.size()[3])``,
    a window fx leaves as a traced size, so the pool stays an opaque call."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        out = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        out = F.avg_pool2d(out, out.size()[3])
        return self.fc(out.view(out.size(0), -1))


def test_an_average_pool_by_a_computed_window_is_followed_by_the_analysis():
    """Before: an opaque node without a kernel rule, the head's kernel unknown and shaping
    noting "1 opaque node(s) on the signal path". (torch's argument parser asks for the
    window's value: traced for the example's size, checked, as other sizes Python reads.)"""
    torch.manual_seed(0)
    model, x = PoolBySize().eval(), torch.randn(4, 3, 8, 8)
    graph = graphshape.load(model, x)
    (pool,) = [n for n in graph if "avg_pool2d" in n.attrs.get("description", "")]
    assert "data movement" in pool.meta["flags"]
    stats = graphshape.analyze(graph, x, empirical=True)
    assert _unknown(stats) == [] and "approximate" in _row(stats, pool.name)["flags"]
    shaped = graphshape.shape(model, x, method="DKS")
    assert not any("opaque" in w for w in shaped.meta["graphshape"].warnings)
    other = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(graphshape.to_torch(graph)(other), model(other))
    assert shaped(other).shape == (2, 4)
    with pytest.raises(graphshape.GraphshapeError, match=r"out.size\(\)\[3\]\)` .* gave 8"):
        shaped(torch.randn(2, 3, 12, 12))


def test_only_crops_that_keep_the_batch_are_data_movement():
    import operator

    from torch.fx.passes.shape_prop import ShapeProp

    from graphshape.frontends.torch_fx import _moves_data_only

    class Crops(nn.Module):
        def forward(self, x):
            h = x.shape[2]
            return x[:, :h], x[..., :h], x[0], x[:h], x[None]

    gm = torch.fx.symbolic_trace(Crops())
    ShapeProp(gm).propagate(torch.randn(2, 3, 4, 4))
    crops = [n for n in gm.graph.nodes if n.target is operator.getitem and n.args[0].name == "x"]
    assert [_moves_data_only(n) for n in crops] == [True, True, False, False, False]


class LinearNorm(nn.Module):
    """timm LeViT's ``LinearNorm``: a linear layer, a batch norm over the tokens of every
    example flattened together, and ``reshape_as`` back (the second tensor, a signal, only
    gives the shape)."""

    def __init__(self, dim=16):
        super().__init__()
        self.fc, self.bn = nn.Linear(dim, dim), nn.BatchNorm1d(dim)

    def forward(self, x):
        x = self.fc(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class ReshapeAs(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.embed, self.mlp1, self.mlp2 = nn.Linear(3, dim), LinearNorm(dim), LinearNorm(dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.mlp2(torch.relu(self.mlp1(x)))
        return self.head(x.expand_as(x))


def test_reshape_as_and_expand_as_move_the_first_tensors_entries():
    """``x.reshape_as(y)`` was an opaque call without a rule: the analysis stopped at it and
    shaping warned ("46 opaque node(s) ... 'reshape_as'" for timm's levit_128s)."""
    torch.manual_seed(0)
    model, x = ReshapeAs().eval(), torch.randn(3, 5, 3)
    graph = graphshape.load(model, x)
    moved = [n for n in graph if "data movement" in n.meta.get("flags", ())]
    assert sorted(n.attrs["description"] for n in moved) == [
        "method Tensor.expand_as", "method Tensor.reshape_as", "method Tensor.reshape_as"]
    stats = graphshape.analyze(graph, x, empirical=True)
    assert _unknown(stats) == []
    for node in moved:
        row = _row(stats, node.name)
        if "expand_as" in node.attrs["description"]:
            assert row["q_local"] == pytest.approx(row["q_emp"], rel=1e-9)
        else:  # (its input merges the batch with the tokens: not measured per example)
            assert row["q_pred"] == pytest.approx(1.0) and row["q_emp"] == pytest.approx(
                1.0, abs=1e-3)
    shaped = graphshape.shape(model, x, method="DKS")
    assert not any("opaque" in w for w in shaped.meta["graphshape"].warnings)
    assert shaped(torch.randn(7, 2, 3)).shape == (7, 2, 4)  # y's shape, not the example's


def test_a_branch_that_only_moves_entries_is_a_shortcut():
    """A residual join whose skip is a roll (a permutation of locations) is a shortcut with a
    linear branch, like ``x + f(x)``: shortcut_weight applies to it."""
    from graphshape.passes.subnetworks import find_joins

    class RolledSkip(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            h = self.fc1(x)
            return torch.roll(h, 1, dims=1) + self.fc2(torch.relu(h))

    graph = graphshape.load(RolledSkip(), torch.randn(2, 5, 8))
    (join,) = find_joins(graph)
    assert join.shortcut == 0 and join.nonlinear == [False, True]
    assert graph[join.inputs[0].node].op == "opaque"


class RelativeLogits(nn.Module):
    """botnet's attention: ``(q kᵀ) * scale + rel(q)``, the relative-position term linear
    in q (a matmul by a table, then entries moved), softmax, ``@ v``; a residual around it."""

    def __init__(self, dim=16, tokens=6, scale=0.05):
        super().__init__()
        self.fc, self.qkv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.rel = nn.Parameter(torch.randn(dim, tokens) * 0.1)
        self.scale = scale

    def forward(self, x):
        x = torch.relu(self.fc(x))
        q, k, v = self.qkv(x).chunk(3, -1)
        logits = (q @ k.transpose(1, 2)) * self.scale + torch.roll(q @ self.rel, 1, dims=-1)
        return x + self.proj(logits.softmax(-1) @ v)


def test_a_sum_of_attention_logits_is_not_a_residual_join():
    """Once a branch through data movement counted as linear, botnet's relative-position
    term looked like a skip beside ``q kᵀ * scale``: shaping took the scale for a layer
    scale ending a residual branch and set it to 1 (logits 11x larger)."""
    from graphshape.passes.subnetworks import find_joins

    x = torch.randn(2, 6, 16)
    graph = graphshape.load(RelativeLogits(), x)
    logits_sum, residual = find_joins(graph)
    assert logits_sum.shortcut is None and residual.shortcut == 0
    report = graphshape.shape(RelativeLogits(), x, method="DKS").meta["graphshape"]
    assert not any("far from 1" in w for w in report.warnings), report.warnings
    assert not any(r["node"] == "mul" for r in report.rewritten), report.rewritten


def test_a_residual_join_that_also_feeds_attention_logits_stays_residual():
    """Attention pooling reads the residual stream both for its logits (a linear score,
    softmax over tokens) and as the values: the join is still a residual one."""
    from graphshape.passes.subnetworks import attention_logits, find_joins

    class AttentionPool(nn.Module):
        def __init__(self, dim=16):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.score, self.head = nn.Linear(dim, 1), nn.Linear(dim, 3)

        def forward(self, x):
            x = x + self.fc2(torch.relu(self.fc1(x)))
            weights = self.score(x).softmax(1)
            return self.head((weights * x).sum(1))

    graph = graphshape.load(AttentionPool(), torch.randn(2, 5, 16))
    (join,) = find_joins(graph)
    assert join.shortcut == 0
    assert join.node in attention_logits(graph)  # it reaches a softmax...
    assert join.node not in attention_logits(graph, only=True)  # ...and goes on elsewhere


def test_a_tensor_made_from_a_signals_shape_is_a_constant_not_a_signal():
    """``h + torch.ones_like(h)``: the ones were a signal node with no rule (unknown after
    opaque, and everything after it); they are the constant 1."""

    class OnesLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = self.fc1(x)
            return self.fc2(torch.tanh(h + torch.ones_like(h)))

    torch.manual_seed(0)
    stats = graphshape.analyze(OnesLike(), torch.randn(4, 8))
    assert _unknown(stats) == [] and "ones_like" not in [r["node"] for r in stats.rows]
    assert _row(stats, "add")["q_pred"] == pytest.approx(_row(stats, "fc1")["q_pred"] + 1)
