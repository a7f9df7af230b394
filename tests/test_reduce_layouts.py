"""Reductions over tokens and channels-last locations: the analysis reads where a value's
features are from the layers before it (``passes.analysis.feature_axis``), so a mean over
an MLP-Mixer's tokens or a channels-last image's locations is predicted like pooling, and a
mean over the features is not."""

import io

import pytest
import torch
from torch import nn

import graphshape
from graphshape.passes.analysis import feature_axis


class TokenMean(nn.Module):
    """Patch embedding, a channel MLP on tokens (N, L, C), a layer norm, the mean over
    tokens (MLP-Mixer's and ResMLP's head)."""

    def __init__(self, dim=16, reduce=lambda h: h.mean(1)):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)
        self.reduce = reduce

    def forward(self, x):
        h = self.stem(x).flatten(2).transpose(1, 2)  # (N, L, C), as in a ViT
        h = h + torch.relu(self.fc(h))
        return self.head(self.reduce(self.norm(h)))


class ChannelsLast(nn.Module):
    """A ConvNeXt-style block in channels-last layout and a mean over locations (timm's
    NHWC heads: swin, sequencer)."""

    def __init__(self, dim=16):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        h = self.stem(x).permute(0, 2, 3, 1)  # N, H, W, C
        h = torch.relu(self.fc(self.norm(h)))
        return self.head(h.mean((1, 2)))


class ConvReduce(nn.Module):
    def __init__(self, reduce):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)
        self.reduce = reduce

    def forward(self, x):
        return self.reduce(torch.relu(self.conv(x)))


X = torch.randn(4, 3, 16, 16)


def _row(stats, op):
    return next(r for r in stats.rows if r["op"] == op)


@pytest.mark.parametrize("model", [TokenMean(), ChannelsLast()], ids=["tokens", "nhwc"])
def test_mean_over_tokens_or_channels_last_locations_is_predicted(model):
    torch.manual_seed(0)
    stats = graphshape.analyze(model, X, empirical=True)
    mean = _row(stats, "reduce")
    assert mean["q_pred"] is not None and "approximate" in mean["flags"]
    assert "tokens / locations taken as the identity" in " ".join(mean["notes"])
    head = stats.rows[-1]
    assert head["op"] == "linear" and head["q_pred"] is not None
    # (the identity is exact for tokens alike: measured q is that of the normalized tokens
    # at most)
    assert 0 < mean["q_emp"] <= mean["q_pred"] * 1.01


def test_mean_over_the_features_of_tokens_has_no_rule():
    stats = graphshape.analyze(TokenMean(reduce=lambda h: h.mean(-1)), X)
    mean = _row(stats, "reduce")
    assert mean["q_pred"] is None
    assert "mean over the features (axis 2)" in " ".join(mean["notes"])


@pytest.mark.parametrize("reduce, predicted", [
    (lambda h: h.mean((2, 3)), True),
    (lambda h: h.amax((2, 3)), True),
    (lambda h: h.mean(1), False),   # CBAM's channel mean: over the features
    (lambda h: h.sum((2, 3)), False),
], ids=["mean_locations", "amax_locations", "mean_channels", "sum_locations"])
def test_reductions_of_a_channels_first_image(reduce, predicted):
    stats = graphshape.analyze(ConvReduce(reduce), X)
    assert (_row(stats, "reduce")["q_pred"] is not None) == predicted


def test_feature_axis_follows_flatten_transpose_and_permute():
    graph = graphshape.load(TokenMean(), X)
    axes = {n.name: feature_axis(graph, n.out) for n in graph if n.op != "output"}
    assert axes["stem"] == 1
    assert axes["flatten"] == 1                    # N, C, HW
    assert axes["transpose"] == 2                  # N, HW, C
    assert axes["fc"] == 2 and axes["add"] == 2
    graph = graphshape.load(ChannelsLast(), X)
    assert feature_axis(graph, graph["permute"].out) == 3
    assert feature_axis(graph, graph["x"].out) is None  # the input: nothing says


def test_the_onnx_export_gets_the_same_prediction():
    torch.manual_seed(0)
    model = TokenMean().eval()
    buf = io.BytesIO()
    torch.onnx.export(model, (X,), buf, opset_version=17, dynamo=False)
    from_torch = _row(graphshape.analyze(model, X), "reduce")
    from_onnx = _row(graphshape.analyze(graphshape.load(buf.getvalue()), X.numpy()), "reduce")
    assert from_onnx["q_pred"] is not None
    assert from_onnx["q_pred"] == pytest.approx(from_torch["q_pred"])
    assert from_onnx["c_pred"] == pytest.approx(from_torch["c_pred"])
