"""Pre-activation shortcuts (``preactivation_shortcuts``, TAT's default): the V1 ResNet fix.

Under TAT the transformed leaky ReLU has a non-zero mean, so in a V1 block
``act(w * act_prev(...) + branch)`` the activation reads a non-Gaussian input and q grows
block after block. graphshape moves each identity shortcut onto the residual stream (and,
for resnet18/34, the stem's max pool before its activation, which is exact for a
nondecreasing activation). The parameter match against dks for the rewritten structure is
in tests/test_shaping.py (``preactivation`` cases of tests/data/dks_resnet_reference.json).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import graphshape  # noqa: E402
from graphshape.backend_torch import emit  # noqa: E402
from graphshape.frontends.torch_fx import load_module  # noqa: E402
from graphshape.passes.joins import (  # noqa: E402
    _commute_max_pool, commutes_with_max_pool, move_shortcuts_to_preactivation)
from graphshape.passes.shaping import find_nongaussian_activations, shape_graph  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_shaping import _activation_input_q, _constant_per_location, traced  # noqa: E402


# ------------------------------------------------------------------ the max-pool commute
@pytest.mark.parametrize("act", [torch.nn.ReLU(), torch.nn.LeakyReLU(0.2), torch.nn.Softplus(),
                                 torch.nn.Tanh(), torch.nn.ELU()])
def test_max_pool_commutes_exactly_with_a_nondecreasing_activation(act):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), act, torch.nn.MaxPool2d(3, 2, 1),
                                torch.nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 3, 11, 11)
    graph = load_module(model, x)
    pool = next(n for n in graph if n.op == "max_pool")
    activation = next(n for n in graph if n.op == "activation")
    assert commutes_with_max_pool(activation)
    _commute_max_pool(graph, pool, activation)
    graph.validate()
    order = [n.op for n in graph if n.op in ("max_pool", "activation")]
    assert order == ["max_pool", "activation"]
    assert graph[activation.name].shape == graph[pool.name].shape == (2, 4, 5, 5)
    torch.testing.assert_close(emit(graph)(x), model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("act,ok", [
    (torch.nn.GELU(), False), (torch.nn.SiLU(), False), (torch.nn.Mish(), False),
    (torch.nn.Hardswish(), False), (torch.nn.LeakyReLU(-0.1), False),
    (torch.nn.LeakyReLU(0.0), True), (torch.nn.Sigmoid(), True), (torch.nn.Hardtanh(), True)])
def test_only_nondecreasing_activations_commute(act, ok):
    graph = load_module(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), act),
                        torch.zeros(1, 3, 8, 8))
    node = next(n for n in graph if n.op == "activation")
    assert commutes_with_max_pool(node) is ok
    if ok:  # a transform that flips the sign of the slope does not
        node.attrs["transform"] = {"input_scale": -1.0, "output_scale": 2.0}
        assert not commutes_with_max_pool(node)


# ------------------------------------------------------------------ the rewrite
def _blocks_with_identity_shortcut(model) -> int:
    return sum(1 for m in model.modules()
               if isinstance(m, (torchvision.models.resnet.BasicBlock,
                                 torchvision.models.resnet.Bottleneck)) and m.downsample is None)


@pytest.mark.parametrize("arch,commuted", [("resnet18", 1), ("resnet50", 0)])
def test_tat_moves_every_identity_shortcut_and_nothing_else(arch, commuted):
    model = getattr(torchvision.models, arch)(weights=None)
    graph = traced(arch)
    shaped, report = shape_graph(graph, activation="leaky_relu", shortcut_weight=0.5,
                                 initialize=False)
    assert report.options["preactivation_shortcuts"] is True
    moved = [r for r in report.rewritten if "pre-activation shortcut" in r["what"]]
    pools = [r for r in report.rewritten if r["op"] == "max_pool"]
    assert len(moved) == _blocks_with_identity_shortcut(model) and len(pools) == commuted
    # every moved shortcut now reads a sum (the residual stream) or the stem's pooled conv
    for r in moved:
        assert shaped[r["shortcut_to"]].op in ("sum", "max_pool")
        assert r["shortcut_to"] in [i.node for i in shaped[r["node"]].inputs]
        assert r["shortcut_from"] not in [i.node for i in shaped[r["node"]].inputs]
    # the same parameters and layers as before; only edges moved
    assert sorted((n.name, n.op) for n in shaped) == sorted(
        (n.name, n.op) for n in shape_graph(graph, activation="leaky_relu",
                                            shortcut_weight=0.5, initialize=False,
                                            preactivation_shortcuts=False)[0])
    # no activation reads a non-Gaussian input any more, and no warning says so
    assert find_nongaussian_activations(shaped) == []
    assert not any("V1 ResNet" in w for w in report.warnings)
    v1, v1_report = shape_graph(graph, activation="leaky_relu", shortcut_weight=0.5,
                                initialize=False, preactivation_shortcuts=False)
    assert len(find_nongaussian_activations(v1)) == _blocks_with_identity_shortcut(model)
    assert any("V1 ResNet" in w for w in v1_report.warnings)


def test_dks_and_untransformed_keep_v1_by_default_and_can_opt_in():
    graph = traced("resnet18")
    for method in ("DKS", "untransformed"):
        _, report = shape_graph(graph, method=method, shortcut_weight=0.5, initialize=False)
        assert report.options["preactivation_shortcuts"] is False
        assert not any("pre-activation" in r["what"] for r in report.rewritten)
    _, report = shape_graph(graph, method="DKS", shortcut_weight=0.5, initialize=False,
                            preactivation_shortcuts=True)
    assert sum("pre-activation shortcut" in r["what"] for r in report.rewritten) == 5


def test_no_shortcuts_no_rewrite():
    graph = traced("resnet18")
    _, rec = move_shortcuts_to_preactivation(graph)
    assert rec["rewritten"] == []  # plain adds before normalize_sums: nothing to move
    shaped, report = shape_graph(graph, activation="leaky_relu", shortcut_weight=0.0,
                                 initialize=False)
    assert not any("pre-activation" in r["what"] for r in report.rewritten)


@pytest.mark.parametrize("arch,w", [("resnet18", 0.5), ("resnet50", 0.7)])
def test_q_stays_near_one_at_every_activation_input(arch, w):
    """The issue's bound on constant-per-location inputs (where the kernel theory is exact
    up to finite width), over the whole depth rather than one step at a time: with
    pre-activation shortcuts the measured q at each activation input stays near the
    predicted 1, with no systematic drift. At width 64 and 4 examples q drifts like a
    random walk (docs/analysis.md): measured over 12 seeds of resnet18 at w = 0.5, max
    |log q| 0.18-0.95 per network and mean log q -0.46..0.59, averaging -0.01 -- the same
    spread as without skips (w = 0: 0.24-0.84, averaging -0.10). As torchvision builds the
    blocks, q grows instead (resnet50, w = 0.7: mean log q 1.8-2.2, last activation q
    52-113)."""
    x = _constant_per_location(4, 3, 32)
    means = []
    for seed in range(4):
        shaped, _ = shape_graph(traced(arch), activation="leaky_relu", shortcut_weight=w,
                                seed=seed)
        log_q = np.log(_activation_input_q(emit(shaped), x))
        assert np.max(np.abs(log_q)) < 1.0, (seed, np.round(np.exp(log_q), 2))
        means.append(np.mean(log_q))
    assert abs(np.mean(means)) < 0.3, means
    if arch == "resnet50":
        v1, _ = shape_graph(traced(arch), activation="leaky_relu", shortcut_weight=w, seed=0,
                            preactivation_shortcuts=False)
        log_q = np.log(_activation_input_q(emit(v1), x))
        assert np.mean(log_q) > 1.0 and np.exp(log_q[-1]) > 10.0


def test_public_api_cli_and_onnx_take_the_option(tmp_path, capsys):
    from graphshape.cli import main as cli_main

    x = torch.zeros(1, 3, 32, 32)
    model = torchvision.models.resnet18(weights=None)
    gm = graphshape.shape(model, x, shortcut_weight=0.5, seed=0)
    assert gm.meta["graphshape"].options["preactivation_shortcuts"] is True
    gm = graphshape.shape(model, x, shortcut_weight=0.5, seed=0, preactivation_shortcuts=False)
    assert gm.meta["graphshape"].options["preactivation_shortcuts"] is False
    with pytest.raises(graphshape.GraphshapeError, match="preactivation_shortcuts"):
        graphshape.shape(model, x, preactivation_shortcuts="yes")

    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    src = tmp_path / "r18.onnx"
    torch.onnx.export(model, x, str(src), opset_version=13, dynamo=False)
    for flag, expected in (([], True), (["--no-preactivation-shortcuts"], False)):
        dst = tmp_path / f"out{len(flag)}.onnx"
        rep = tmp_path / f"rep{len(flag)}.json"
        assert cli_main(["shape", str(src), "-o", str(dst), "--shortcut-weight", "0.5",
                         "--report", str(rep)] + flag) == 0
        report = json.load(open(rep))
        assert report["options"]["preactivation_shortcuts"] is expected
        assert sum("pre-activation shortcut" in r["what"] for r in report["rewritten"]) == (
            5 if expected else 0)
        onnx.checker.check_model(onnx.load(str(dst)))
    capsys.readouterr()


class _V1Block(torch.nn.Module):
    """A V1 basic block whose identity shortcut may pass through ``nn.Identity`` (timm's DLA:
    its ``project`` is an nn.Identity when the widths match)."""

    def __init__(self, width, identity_project):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.conv2 = torch.nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1, self.bn2 = torch.nn.BatchNorm2d(width), torch.nn.BatchNorm2d(width)
        self.project = torch.nn.Identity() if identity_project else None

    def forward(self, x):
        shortcut = self.project(x) if self.project is not None else x
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + shortcut)


def _v1_net(identity_project, width=8, blocks=3):
    stem = torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.ReLU())
    return torch.nn.Sequential(stem, *[_V1Block(width, identity_project) for _ in range(blocks)],
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(width, 10)).eval()


def test_a_shortcut_through_nn_identity_moves_too(tmp_path):
    # before: the shortcut read the nn.Identity, not the block's input, so it kept reading
    # the activation, and timm's dla34 solved another leaky ReLU slope from PyTorch (0.1684)
    # than from its ONNX export (0.1636), where the exporter had dropped the Identity
    x = torch.randn(2, 3, 16, 16)
    options = {"method": "TAT", "eta": 0.6, "seed": 0}  # eta 0.9 is out of a 7-layer net's reach
    plain = graphshape.shape(_v1_net(False), x, **options).meta["graphshape"]
    model = _v1_net(True)
    shaped = graphshape.shape(model, x, **options)
    report = shaped.meta["graphshape"]
    moved = [r for r in report.rewritten if "pre-activation shortcut" in r["what"]]
    assert len(moved) == 3 == len([r for r in plain.rewritten
                                   if "pre-activation shortcut" in r["what"]])
    assert sorted(r["node"] for r in report.removed if r["op"] == "identity") == [
        f"_{i}_project" for i in (1, 2, 3)]
    assert not any("non-zero mean" in w for w in report.warnings)
    assert report.activation_params == plain.activation_params
    assert torch.isfinite(shaped(x)).all()
    assert not any(isinstance(m, torch.nn.Identity) for m in shaped.modules())

    src = tmp_path / "v1.onnx"
    torch.onnx.export(model, (x,), str(src), opset_version=17, dynamo=False)
    from_onnx = graphshape.shape_onnx(src, tmp_path / "shaped.onnx", **options)
    assert from_onnx.activation_params["leaky_relu"] == pytest.approx(
        report.activation_params["leaky_relu"], rel=1e-12)


class _Affine(torch.nn.Module):
    """timm HGNetV2's LearnableAffineBlock: ``scale * x + bias``, one-element parameters."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor([scale]))
        self.bias = torch.nn.Parameter(torch.tensor([0.0]))

    def forward(self, x):
        return self.scale * x + self.bias


class _V1AffineBlock(_V1Block):
    def __init__(self, width, scale):
        super().__init__(width, False)
        self.lab = _Affine(scale)

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.lab(torch.relu(out + x))


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_a_shortcut_from_an_affine_at_its_initial_value_moves_too(tmp_path, scale):
    """A learnable affine at scale 1, bias 0 after the activation (HGNetV2) is folded into
    the activation when read from ONNX, where the shortcut then moved; from PyTorch it did
    not: timm's hgnetv2_b0 solved TAT slope 0.1577 from PyTorch and 0.1514 from both of its
    exports. Scaled by 2 it is no identity, and the shortcut stays on both paths."""
    x = torch.randn(2, 3, 16, 16)
    options = {"method": "TAT", "eta": 0.6, "seed": 0}
    width = 8
    stem = torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.ReLU())
    model = torch.nn.Sequential(stem, *[_V1AffineBlock(width, scale) for _ in range(3)],
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(width, 10)).eval()
    shaped = graphshape.shape(model, x, **options)
    report = shaped.meta["graphshape"]
    moved = [r for r in report.rewritten if "pre-activation shortcut" in r["what"]]
    assert len(moved) == (3 if scale == 1.0 else 1)  # (the first block reads the stem's relu)
    assert torch.isfinite(shaped(x)).all()
    if scale == 1.0:  # the same kernel as without the affine
        plain = graphshape.shape(_v1_net(False), x, **options).meta["graphshape"]
        assert report.activation_params == plain.activation_params
    src = tmp_path / "v1.onnx"
    torch.onnx.export(model, (x,), str(src), opset_version=17, dynamo=False)
    from_onnx = graphshape.shape_onnx(src, tmp_path / "shaped.onnx", **options)
    assert from_onnx.activation_params["leaky_relu"] == pytest.approx(
        report.activation_params["leaky_relu"], rel=1e-12)
