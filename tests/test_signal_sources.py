"""What a value is computed from: sums of correlated signals and activations of activations.

Sums of correlated signals: inputs computed from one value with no conv/linear layer
between (PoolFormer's ``pool(x) - x``, ``h + 0.5 * h``, ``h - tanh(h)``).

The kernel of a sum is the weighted sum of its inputs' kernels only for uncorrelated inputs,
which a layer of fresh random weights on one side makes them (a residual branch ending in a
conv). :func:`graphshape.passes.subnetworks.signal_sources` tells the two apart from the
graph; the analysis merges multiples of one value exactly and flags the other correlated
sums, and shaping leaves a linear filter of one signal (``linear_mix``) as it is instead of
weighting it as a sum of independent signals.

An activation whose input is another activation's output, passed on through pooling or a
norm (``relu -> max_pool -> bn -> relu``, pre-activation stems), reads a non-Gaussian value:
the analysis flags it (:func:`graphshape.passes.subnetworks.stacked_activations`).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphshape
from graphshape.passes.subnetworks import find_joins, signal_sources


class _Joins(nn.Module):
    """One join of each kind, all reading ``h = conv(x)``."""

    def __init__(self, c=8):
        super().__init__()
        self.conv, self.conv2, self.conv3 = (nn.Conv2d(c, c, 3, padding=1) for _ in range(3))
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)

    def forward(self, x):
        h = self.conv(x)
        filtered = self.pool(h) - h                     # linear filter of h
        residual = h + self.conv2(torch.relu(h))        # branch ends in a fresh conv
        nonlinear = h - torch.tanh(h)                   # h and a function of h
        shared = self.conv3(h) + self.conv3(torch.relu(h))  # one weight, twice
        return filtered + residual + nonlinear + shared


def _joins_by_inputs(graph):
    """{tuple of the ops of a join's inputs: the joins with those inputs}."""
    out = {}
    for join in find_joins(graph):
        key = tuple(graph[r.node].op for r in join.inputs)
        out.setdefault(key, []).append(join)
    return out


def test_correlated_joins_are_told_from_the_graph():
    torch.manual_seed(0)
    graph = graphshape.load(_Joins(), torch.randn(2, 8, 6, 6))
    joins = _joins_by_inputs(graph)
    (filtered,) = joins[("avg_pool", "conv")]
    assert filtered.correlated and filtered.linear_mix and filtered.shortcut is None
    residual = next(j for j in joins[("conv", "conv")] if j.inputs[0].node == "conv")
    assert not residual.correlated and residual.shortcut == 0
    (nonlinear,) = joins[("conv", "activation")]
    assert nonlinear.correlated and not nonlinear.linear_mix
    # conv3 applied twice: one weight, so its two outputs are correlated
    shared = next(j for j in joins[("conv", "conv")] if j is not residual)
    assert shared.correlated and not shared.linear_mix
    sources = signal_sources(graph)
    assert sources[shared.inputs[0].node] == sources[shared.inputs[1].node]
    assert sources[filtered.inputs[0].node] == sources[filtered.inputs[1].node]
    assert not sources[residual.inputs[0].node] & sources[residual.inputs[1].node]


class _Multiples(nn.Module):
    def __init__(self, c=64):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        h = self.conv(x)
        a = h + 0.5 * h                       # 1.5 h
        b = 2.0 * self.drop(h) - h / 4.0      # 1.75 h
        # correlated, and not a multiple of one value as the rule sees it (sums of h)
        return a + b - torch.tanh(h)


def test_analysis_sums_multiples_of_one_value_exactly_and_flags_the_rest():
    torch.manual_seed(0)
    x = torch.randn(6, 64, 8, 8)
    stats = graphshape.analyze(_Multiples().eval(), x, empirical=True)
    q_h = stats["conv"]["q_pred"]
    rows = [r for r in stats.rows if r["op"] in ("add", "sub", "sum")]
    first, second, third, last = rows
    assert first["q_pred"] == pytest.approx(1.5 ** 2 * q_h, rel=1e-9)
    assert second["q_pred"] == pytest.approx(1.75 ** 2 * q_h, rel=1e-9)
    conv = stats["conv"]
    for row, scale in ((first, 1.5), (second, 1.75)):
        assert row["flags"] == []
        # exact (dropout is the identity in eval): the same value, scaled
        assert row["q_emp"] == pytest.approx(scale ** 2 * conv["q_emp"], rel=1e-5)
        assert row["c_pred"] == pytest.approx(conv["c_pred"], abs=1e-12)
    for row in (third, last):
        assert "approximate" in row["flags"]
        assert any("correlated" in n for n in row["notes"])
    # taken as uncorrelated: 1.5^2 + 1.75^2 where 3.25^2 is measured
    assert third["q_pred"] == pytest.approx((1.5 ** 2 + 1.75 ** 2) * q_h, rel=1e-9)
    assert third["q_emp"] == pytest.approx(3.25 ** 2 * conv["q_emp"], rel=1e-5)


class _Block(nn.Module):
    """PoolFormer's block: a pooling token mixer and an MLP, each behind a layer scale."""

    def __init__(self, c):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(1, c), nn.GroupNorm(1, c)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.fc1, self.fc2 = nn.Conv2d(c, 2 * c, 1), nn.Conv2d(2 * c, c, 1)
        self.ls1 = nn.Parameter(1e-5 * torch.ones(c, 1, 1))
        self.ls2 = nn.Parameter(1e-5 * torch.ones(c, 1, 1))

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.ls1 * (self.pool(y) - y)
        return x + self.ls2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class _PoolFormer(nn.Module):
    def __init__(self, c=64, depth=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(*[_Block(c) for _ in range(depth)])
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_shaping_keeps_a_pooling_mixer_and_the_signal():
    """Weighted as a sum of independent signals, each block's ``pool(x) - x`` and ``x + ls *
    (...)`` halved the residual stream's q and the network's output went constant (measured
    at 8 blocks: q 0.06, c 0.999, against a predicted 1.00 and 0.002)."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    shaped = graphshape.shape(_PoolFormer(), x, method="DKS")
    report = shaped.meta["graphshape"]
    assert any("16 sum(s) of correlated signals" in w for w in report.warnings)
    assert not any("far from 1" in w for w in report.warnings)
    graph = graphshape.load(shaped, x)
    assert sum(n.op == "sub" for n in graph) == 8           # the mixers' subtractions, kept
    params = dict(shaped.named_parameters())
    for i in range(8):
        assert torch.all(params[f"blocks.{i}.ls1"] == 1e-5)   # the mixer's scale: its own
        assert torch.all(params[f"blocks.{i}.ls2"] == 1.0)    # the MLP branch's: reset
    stats = graphshape.analyze(shaped, x, empirical=True)
    joins = [r for r in stats.rows if r["op"] == "sum"]       # the MLP joins, normalized
    assert len(joins) == 8
    for row in joins:
        assert 0.6 < row["q_emp"] < 1.7 and row["c_emp"] < 0.2, row
        assert row["q_pred"] == pytest.approx(1.0, abs=0.02)


def test_onnx_export_of_the_pooling_mixer_shapes_the_same(tmp_path):
    torch.manual_seed(0)
    model = _PoolFormer(depth=3)
    x = torch.randn(8, 3, 16, 16)
    src, dst = tmp_path / "pf.onnx", tmp_path / "pf_dks.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(src), opset_version=17, dynamo=False)
    report = graphshape.shape_onnx(str(src), str(dst), method="DKS")
    assert any("6 sum(s) of correlated signals" in w for w in report.warnings)
    shaped = onnx.load(str(dst))
    assert sum(n.op_type == "Sub" for n in shaped.graph.node) == 3
    stats = graphshape.analyze(graphshape.load(str(dst)), x.numpy(), empirical=True)
    last = [r for r in stats.rows if r["op"] == "sum"][-1]
    assert 0.6 < last["q_emp"] < 1.7 and last["c_emp"] < 0.2


class _TanhResidual(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        h = self.conv(x)
        return h + torch.tanh(h)


def test_a_correlated_join_with_a_nonlinear_branch_is_normalized_with_a_warning():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 8, 8)
    shaped = graphshape.shape(_TanhResidual(), x, method="DKS")
    report = shaped.meta["graphshape"]
    assert any("normalized as if uncorrelated" in w for w in report.warnings)
    assert [r["weights"] for r in report.rewritten if r["op"] == "add"] == [
        pytest.approx([0.5, np.sqrt(0.75)])]
    stats = graphshape.analyze(shaped, x)
    assert "approximate" in [r for r in stats.rows if r["op"] == "sum"][0]["flags"]


class _DictInput(nn.Module):
    def forward(self, batch):
        return batch["a"] + torch.tanh(batch["b"])


def test_entries_of_a_dict_input_are_separate_sources():
    example = {"a": torch.randn(4, 16), "b": torch.randn(4, 16)}
    graph = graphshape.load(_DictInput(), (example,))
    (join,) = find_joins(graph)
    assert not join.correlated
    stats = graphshape.analyze(graph, (example,))
    assert "approximate" not in [r for r in stats.rows if r["op"] == "add"][0]["flags"]


class _PreActivationStem(nn.Module):
    """DPN / Xception: the stem's activation, a max pool, then a block's norm and activation."""

    def __init__(self, c=96):
        super().__init__()
        self.conv, self.conv2 = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.bn, self.fc = nn.BatchNorm2d(c), nn.Linear(c, 10)

    def forward(self, x):
        h = F.max_pool2d(torch.relu(self.conv(x)), 2)
        h = F.gelu(self.bn(h))                       # input: relu output, pooled, normalized
        return self.fc(F.elu(self.conv2(h)).mean((2, 3)))   # input: a conv output


def test_an_activation_of_an_activation_is_flagged():
    from graphshape.passes.subnetworks import stacked_activations

    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    graph = graphshape.load(_PreActivationStem(), x)
    acts = [n.name for n in graph if n.op == "activation"]
    assert stacked_activations(graph) == {acts[1]: acts[0]}
    stats = graphshape.analyze(graph, x)
    assert "non-gaussian input (after an activation)" in stats[acts[1]]["flags"]
    assert not any("non-gaussian" in f for f in stats[acts[2]]["flags"])
    shaped = graphshape.shape(_PreActivationStem(), x, method="DKS")
    assert any("read another activation's output" in w
               for w in shaped.meta["graphshape"].warnings)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(x) + self.fc(torch.tanh(x))


def test_one_weight_used_twice_is_one_source_from_pytorch_and_onnx():
    x = torch.randn(4, 16)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Tied(), (x,), buf, opset_version=17, dynamo=False)
    for source in (_Tied(), onnx.load_from_string(buf.getvalue())):
        graph = graphshape.load(source, x) if isinstance(source, nn.Module) else \
            graphshape.load(source)
        (join,) = find_joins(graph)
        assert join.correlated and join.nonlinear == [False, True]


class _ResidualPooling(nn.Module):
    """MViTv2's attention: the pooled query is added to the attention's output."""

    def __init__(self, d=16):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        attn = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1)
        return attn @ v + q


def test_attention_output_takes_its_sources_from_the_values():
    graph = graphshape.load(_ResidualPooling(), torch.randn(2, 5, 16))
    (join,) = [j for j in find_joins(graph) if j.op == "add"]
    assert not join.correlated


class _RelPosLogits(nn.Module):
    """Logits plus a relative-position term linear in the query (MViTv2, BoTNet)."""

    def __init__(self, d=16, tokens=5):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.rel = nn.Parameter(torch.randn(tokens, d) / 4.0)
        self.proj, self.fc = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        # (an einsum with a table: opaque, as MViTv2's decomposed relative positions are)
        logits = q @ k.transpose(-2, -1) / 4.0 + torch.einsum("btd,sd->bts", q, self.rel)
        x = x + self.proj(torch.softmax(logits, dim=-1) @ v)
        return x + self.fc(F.gelu(x))


def test_a_sum_of_attention_logits_is_not_warned_about():
    x = torch.randn(2, 5, 16)
    graph = graphshape.load(_RelPosLogits(), x)
    assert any(j.correlated for j in find_joins(graph))      # q kᵀ + rel(q): both from q
    shaped = graphshape.shape(_RelPosLogits(), x, method="DKS")
    assert not any("correlated" in w for w in shaped.meta["graphshape"].warnings)
