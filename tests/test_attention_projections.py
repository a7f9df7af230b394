"""The projections an opaque attention call holds (``nn.MultiheadAttention``'s in/out
projections, torchvision swin's ``shifted_window_attention(x, qkv_weight, proj_weight, ...)``)
are initialized as the linear layers they are: SUO weights, zero biases, drawn in the order
and from the same stacked draws as the ONNX export's MatMul layers, so that a model shaped
from PyTorch and from its export is the same network. Before, the PyTorch path kept torch's
own initialization there (xavier for ``in_proj_weight``), and shaped vit_b_16's residual
stream fell to q 0.03 at its last join where the ONNX path's kept 0.2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import graphshape
from same_network import assert_same_outputs, shape_both_ways


class Encoder(nn.Module):
    def __init__(self, shared: bool = False):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.shared = shared
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        h = self.layer(self.inp(x))
        if self.shared:  # the same layer (and its attention module) twice
            h = self.layer(h)
        return self.out(h.mean(1))


def _attention(module):
    return next(m for m in module.modules() if isinstance(m, nn.MultiheadAttention))


def test_multihead_attention_projections_are_initialized_and_the_source_is_not():
    torch.manual_seed(0)
    model = Encoder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 5, 16)
    shaped = graphshape.shape(model, x, method="DKS", seed=0)
    # inp, in_proj, out_proj, the feed-forward's two linears, out
    assert shaped.meta["graphshape"].initialized == 6
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    attention = _attention(shaped)
    assert attention is not _attention(model)
    w_in = attention.in_proj_weight.detach().double()
    # SUO (96, 32): orthonormal columns, scaled by sqrt(96 / 32)
    assert (w_in.T @ w_in).numpy() == pytest.approx(3 * np.eye(32), abs=1e-4)
    w_out = attention.out_proj.weight.detach().double()
    assert (w_out @ w_out.T).numpy() == pytest.approx(np.eye(32), abs=1e-4)
    assert not attention.in_proj_bias.any() and not attention.out_proj.bias.any()


def test_an_attention_module_called_twice_is_initialized_once_and_stays_one():
    torch.manual_seed(0)
    model = Encoder(shared=True)
    x = torch.randn(2, 5, 16)
    shaped = graphshape.shape(model, x, method="DKS", seed=0)
    # inp, out, the feed-forward's two shared linears at each call (one record per call,
    # one tensor each), and the attention's in_proj and out_proj once
    assert shaped.meta["graphshape"].initialized == 8
    attentions = {id(m) for m in shaped.modules() if isinstance(m, nn.MultiheadAttention)}
    assert len(attentions) == 1
    w_out = _attention(shaped).out_proj.weight.detach().double()
    assert (w_out @ w_out.T).numpy() == pytest.approx(np.eye(32), abs=1e-4)


def _same_network(model, x, tmp_path, method):
    pytest.importorskip("onnxruntime")
    both = shape_both_ways(model, x, tmp_path, method=method, seed=2)
    assert both.torch_report.initialized == both.onnx_report.initialized
    assert_same_outputs(both)


def test_transformer_encoder_shaped_from_pytorch_and_from_onnx_is_the_same_network(tmp_path):
    torch.manual_seed(0)
    _same_network(Encoder().eval(), torch.randn(2, 5, 16), tmp_path, "DKS")


def test_swin_shaped_from_pytorch_and_from_onnx_is_the_same_network(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.swin_t().eval()
    _same_network(model, torch.randn(1, 3, 64, 64), tmp_path, "TAT")
