"""Normalizer-free networks carry constants that keep their own signal propagation in check
(NF-ResNets / NFNets, Brock et al. 2021): ``beta = 1/sqrt(expected variance)`` after the
pre-activation, ``alpha`` and a skip-init gain at the end of each branch, and
``attn_gain = 2`` after squeeze-excitation (for ``sigmoid(0) = 1/2``). Shaping replaces
that propagation with DKS/TAT's, so each must stop scaling q: ``beta`` is dropped after the
transformed activation (its solved output scale takes its place), the branch scales are all
set to 1, and the SE gate and its gain start together at 1. Before, shaped nf_regnet_b0 had
q ~ 3e9 (DKS) at the output, nf_resnet26 0.86, nfnet_l0 0.44."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphshape


class SE(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // 2, 1)
        self.fc2 = nn.Conv2d(channels // 2, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class NFBlock(nn.Module):
    """timm's NormFreeBlock, small (nf_regnet's: squeeze-excitation inside the branch):
    ``x + alpha * skipinit * conv3(act(attn_gain * SE(conv2(act(conv1(act(x) * beta))))))``."""

    def __init__(self, width, beta, alpha=0.2, skipinit=True):
        super().__init__()
        self.beta, self.alpha, self.attn_gain = beta, alpha, 2.0
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, width, 1)
        self.attn = SE(width)
        self.skipinit_gain = nn.Parameter(torch.tensor(0.0)) if skipinit else None

    def forward(self, x):
        out = nn.functional.silu(x) * self.beta
        out = self.conv2(nn.functional.silu(self.conv1(out)))
        out = self.conv3(nn.functional.silu(self.attn_gain * self.attn(out)))
        if self.skipinit_gain is not None:
            out = out * self.skipinit_gain
        return out * self.alpha + x


class NFNet(nn.Module):
    def __init__(self, width=32, depth=6, skipinit=True):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        expected_var = 1.0
        blocks = []
        for _ in range(depth):
            blocks.append(NFBlock(width, beta=expected_var ** -0.5, skipinit=skipinit))
            expected_var += 0.2 ** 2
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(nn.functional.silu(x).mean((2, 3)))


def _main_path_q(model, x):
    """Predicted q at every conv and sum outside the squeeze-excitation paths."""
    return {r["node"]: r["q_pred"] for r in graphshape.analyze(model, x).rows
            if r["op"] in ("conv", "sum") and "attn" not in r["node"]}


@pytest.mark.parametrize("method", ["DKS", "TAT"])
def test_normalizer_free_constants_stop_scaling_q(method):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    shaped = graphshape.shape(NFNet(), x, method=method, seed=0,
                              **({"activation": "softplus"} if method == "TAT" else {}))
    report = shaped.meta["graphshape"]
    betas = [r for r in report.removed if "after transformed activation" in r["what"]]
    # (the first block's beta is 1: nothing to drop)
    assert len(betas) == 5 and all(r["op"] == "mul" for r in betas)
    branch = [r for r in report.rewritten if "branch scale" in r["what"]]
    assert len(branch) == 12  # alpha and the skip-init gain (0) of each block
    gates = [r for r in report.rewritten if "gate divided by its value at 0" in r["what"]]
    assert all("output scale 1," in r["what"] for r in gates) and len(gates) == 6
    q = _main_path_q(shaped, x)
    assert len(q) == 1 + 6 * 4 and all(abs(v - 1.0) < 0.02 for v in q.values()), q
    # what a forward pass measures agrees: each block's output keeps q near 1
    stats = graphshape.analyze(shaped, torch.randn(16, 3, 16, 16), empirical=True)
    joins = [r for r in stats.rows if r["op"] == "sum"]
    assert joins and all(0.6 < r["q_emp"] < 1.6 for r in joins), [r["q_emp"] for r in joins]


def test_the_gate_gain_counts_with_the_gate():
    """SE followed by ``attn_gain = 2``: the gate keeps its value 1/2 at initialization (its
    output scale stays 1), so gate and gain together are the identity; without the gain,
    the gate alone is divided by 1/2 as before."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    for gain, scale in ((2.0, 1.0), (1.0, 2.0)):
        model = NFNet(depth=2)
        for block in model.blocks:
            block.attn_gain = gain
        report = graphshape.shape(model, x, method="DKS", seed=0).meta["graphshape"]
        gates = [r for r in report.rewritten if "gate divided by its value at 0" in r["what"]]
        assert len(gates) == 2
        assert all(f"output scale {scale:g}," in r["what"] for r in gates), gates


def test_a_scale_read_elsewhere_or_untransformed_is_kept():
    """``act(x) * c`` where the activation's output is also read unscaled keeps ``c`` (the
    two uses differ); method="untransformed" keeps every constant."""
    class TwoUses(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.conv3 = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            a = torch.tanh(self.conv1(x))
            return self.conv2(a * 0.5) + self.conv3(a)

    x = torch.randn(2, 3, 8, 8)
    report = graphshape.shape(TwoUses(), x, method="DKS", seed=0).meta["graphshape"]
    assert not [r for r in report.removed if "after transformed activation" in r["what"]]
    report = graphshape.shape(NFNet(depth=2), x, method="untransformed", seed=0).meta["graphshape"]
    assert not [r for r in report.removed if "after transformed activation" in r["what"]]


def test_a_scale_that_makes_the_output_is_kept():
    """A scale whose result is the model's output sets its range (``3 * softplus(...)``):
    it stays, even after a transformed activation."""
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return F.softplus(self.conv2(torch.tanh(self.conv1(x)) * 0.5)) * 3.0

    report = graphshape.shape(Head(), torch.randn(2, 3, 8, 8), method="DKS",
                              seed=0).meta["graphshape"]
    dropped = [r["what"] for r in report.removed if "after transformed activation" in r["what"]]
    assert len(dropped) == 1 and dropped[0].startswith("scale 0.5 ")
