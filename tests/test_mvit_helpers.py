"""torchvision MViT's ``_unsqueeze`` / ``_squeeze`` (kept as calls by ``torch.fx.wrap``) and
``torch.tensor_split(x, indices=...)`` are read as unsqueeze / squeeze / split. They were
opaque, and the pooled skip connections that pass through them (blocks 1, 3 and 14 of
mvit_v1_b) were not seen as residual joins: shaped from PyTorch they got equal weights,
where the dynamo export's plain Unsqueeze / Squeeze made them residual joins (w = 0.5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphshape

mvit = pytest.importorskip("torchvision.models.video.mvit")


class PooledSkip(nn.Module):
    """A token residual block whose skip is MViT's Pool (class token split off, the rest
    max-pooled over a 2x4x4 grid), its branch a linear layer on the pooled tokens."""

    def __init__(self, dim=8):
        super().__init__()
        self.pool_skip = mvit.Pool(nn.MaxPool3d(1, 1), None)
        self.pool_branch = mvit.Pool(nn.MaxPool3d(1, 1), None)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        skip, _ = self.pool_skip(x, (2, 4, 4))
        branch, _ = self.pool_branch(torch.relu(self.fc(self.norm(x))), (2, 4, 4))
        return skip + branch


@pytest.mark.parametrize("heads", [False, True])
def test_mvit_pool_helpers_and_tensor_split_are_read(heads):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), PooledSkip(), PooledSkip()).eval()
    # (B, tokens, C), or with a heads axis (B, heads, tokens, C): _unsqueeze adds it or not
    x = torch.randn(2, 1, 33, 8) if heads else torch.randn(2, 33, 8)
    graph = graphshape.load(model, x)
    descriptions = [str(n.attrs.get("description")) for n in graph if n.op == "opaque"]
    assert not [d for d in descriptions if "_unsqueeze" in d or "_squeeze" in d
                or "tensor_split" in d], descriptions
    with torch.no_grad():
        assert graphshape.to_torch(graph)(x) == pytest.approx(model(x), abs=1e-6)
    shaped = graphshape.shape(model, x, method="DKS", seed=0)
    joins = [r["what"] for r in shaped.meta["graphshape"].rewritten if r["op"] == "add"]
    assert len(joins) == 2 and all("residual join" in j for j in joins), joins
