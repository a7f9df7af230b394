"""torch.nn's transformer containers (``nn.TransformerEncoder`` / ``Decoder`` and their
layers) are traced through, so that their linear layers, activations, layer norms and
residual adds are what shaping rewrites; each layer's ``nn.MultiheadAttention`` stays one
opaque call, whose output carries its *values'* kernel (a decoder's cross-attention reads
its values from the encoder). Before, each container was one opaque call and such a model
was refused: "the model has no activation function"."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules import transformer

import graphshape

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # enable_nested_tensor notes


def _encoder(norm_first: bool, activation="relu") -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, activation=activation,
                                       batch_first=not norm_first, norm_first=norm_first)
    final = nn.LayerNorm(32) if norm_first else None
    return nn.Sequential(nn.Linear(8, 32), nn.TransformerEncoder(layer, 3, norm=final),
                         nn.Linear(32, 3)).eval()


class _Seq2Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2)
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(32, 4, 64, batch_first=True), 2)
        self.head = nn.Linear(32, 3)

    def forward(self, src, tgt):
        return self.head(self.decoder(self.embed(tgt), self.encoder(self.embed(src))))


@pytest.mark.parametrize("norm_first,activation,ops", [
    (False, "relu", {"relu"}), (True, "gelu", {"gelu_exact"}), (False, nn.GELU(), {"gelu_exact"})])
def test_encoder_layers_are_traced_through_and_shape(norm_first, activation, ops):
    model = _encoder(norm_first, activation)
    x = torch.randn(5, 7, 8)
    graph = graphshape.load(model, x)
    counts = graph.count_ops()
    assert counts["layer_norm"] == 6 + norm_first and counts["linear"] == 8
    assert {n.attrs["name"] for n in graph if n.op == "activation"} == ops
    torch.testing.assert_close(graphshape.to_torch(graph).eval()(x), model(x))
    shaped = graphshape.shape(model, x, method="DKS", seed=0)
    assert set(shaped.meta["graphshape"].activation_params) == ops
    assert not any(isinstance(m, nn.LayerNorm) for m in shaped.modules())
    shaped.train()(x).square().mean().backward()
    # tracing leaves torch's global state as it was
    assert torch.backends.mha.get_fastpath_enabled()
    assert transformer._get_seq_len.__module__ == "torch.nn.modules.transformer"


def test_cross_attention_carries_the_encoders_kernel(tmp_path):
    model = _Seq2Seq().eval()
    src, tgt = torch.randn(2, 5, 8), torch.randn(2, 4, 8)
    torch_path = graphshape.shape(model, (src, tgt), method="DKS").meta["graphshape"]
    path = tmp_path / "seq2seq.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (src, tgt), str(path), opset_version=17, dynamo=False)
    # the export writes attention as MatMul / Softmax, where softmax(q kᵀ) v carries v's
    # kernel; the opaque nn.MultiheadAttention call must carry the same (its value input,
    # not its query: with the query, the two paths solved different parameters)
    onnx_path = graphshape.shape_onnx(str(path), str(tmp_path / "out.onnx"), method="DKS")
    assert torch_path.activation_params == onnx_path.activation_params


class FusedAttentionViT(nn.Module):
    """timm's ViT, small: a class token expanded to the batch, ``qkv.unbind(0)`` and
    ``F.scaled_dot_product_attention``."""

    def __init__(self, dim=16, heads=2, depth=2):
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(12, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2 * depth))
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(depth))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(),
                                               nn.Linear(2 * dim, dim)) for _ in range(depth))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        b, n, c = x.shape
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        for i, (qkv, mlp) in enumerate(zip(self.qkv, self.mlp)):
            q, k, v = qkv(self.norms[2 * i](x)).reshape(b, n + 1, 3, self.heads, -1) \
                .permute(2, 0, 3, 1, 4).unbind(0)
            att = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            x = x + att.transpose(1, 2).reshape(b, n + 1, c)
            x = x + mlp(self.norms[2 * i + 1](x))
        return self.head(x[:, 0])


def test_fused_attention_vit_warns_of_attention_only():
    """q, k, v from ``unbind`` are mapped (a split and squeezes), the class token's expand
    reads no model input, and the attention calls have their own warning: no "opaque node
    without a kernel rule" warning is left (timm deit_tiny had 61 such nodes listed)."""
    torch.manual_seed(0)
    shaped = graphshape.shape(FusedAttentionViT().eval(), torch.randn(2, 5, 12), method="DKS")
    warnings_ = shaped.meta["graphshape"].warnings
    assert not any("opaque node" in w for w in warnings_), warnings_
    assert any(w.startswith("2 attention node(s)") for w in warnings_), warnings_


def test_multihead_attention_output_selection_warns_of_attention_only():
    """``nn.MultiheadAttention`` returns ``(output, weights)``; ``attn(...)[0]`` and ``a, _ =
    attn(...)`` (torchvision's vit, open_clip) read its output with a getitem, which was
    listed as an "opaque node without a kernel rule" beside the attention warning."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                              hidden_dim=16, mlp_dim=32).eval()
    shaped = graphshape.shape(model, torch.randn(2, 3, 32, 32), method="DKS")
    warnings_ = shaped.meta["graphshape"].warnings
    assert not any("opaque node" in w for w in warnings_), warnings_
    assert any(w.startswith("2 attention node(s)") for w in warnings_), warnings_
