"""Python control flow on tensor sizes is traced by torch.fx for the example inputs' sizes
(graphshape.frontends.torch_specialize): ``if x.shape[-1] % 2:`` (timm's twins pads its
windows so), ``int(math.sqrt(n_tokens))`` (NesT, ConViT), ``if x.device.type == ...``.
Before, such a model was read through its ONNX export (dropout and drop path lost, names
from the export) or refused without example inputs; most Hugging Face vision models
(``if num_channels != self.num_channels``) went that way. The shaped model checks each
answer and raises a GraphshapeError naming the line on an input that would take another
path; a branch on the batch size or on values is never frozen into the trace."""

from __future__ import annotations

import io
import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphshape
from graphshape import GraphshapeError
from graphshape.backend_torch import emit
from graphshape.frontends.torch_fx import load_module
from graphshape.ir import CHECK, Graph, Node, Ref, TensorInfo


class PadsOddSizes(nn.Module):
    """Pads odd feature maps to even (``if x.shape[-1] % 2:``), with dropout between."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.drop(torch.relu(self.bn1(self.conv1(x))))
        if x.shape[-1] % 2:
            x = F.pad(x, (0, 1, 0, 1))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class TokenGrid(nn.Module):
    """Tokens back into a square grid, its side from ``int(math.sqrt(n))`` (NesT's
    ``deblockify``), and a branch on the device (timm's EfficientViT asks it)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 2, stride=2)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, C)
        tokens = tokens + F.gelu(self.fc(self.norm(tokens)))
        side = int(math.sqrt(tokens.shape[1]))
        grid = tokens.transpose(1, 2).reshape(-1, 16, side, side)
        # (the example's device, not the 'meta' stand-in's)
        if x.device.type == "cpu":
            grid = grid * 2
        return F.gelu(self.bn(self.conv(grid))).mean((2, 3))


def _x(batch=2, side=9):
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(batch))


def test_a_branch_on_a_size_is_traced_by_fx_for_the_example_size():
    torch.manual_seed(0)
    model = PadsOddSizes().eval()
    graph = load_module(model, _x())
    assert "traced_with" not in graph.meta  # torch.fx, not the ONNX export
    [place] = graph.meta["specialized"]
    assert "test_size_branches.py" in place and "if x.shape[-1] % 2:" in place
    assert place.endswith("-> True")
    assert "dropout" in graph.count_ops()  # the export would have dropped it
    gm = emit(graph)
    with torch.no_grad():
        for batch in (1, 5):  # the batch size stays free
            torch.testing.assert_close(gm(_x(batch)), model(_x(batch)))
    with pytest.raises(GraphshapeError, match=r"if x.shape\[-1\] % 2:.*gave True; these inputs "
                                              r"give False.*with example inputs of these sizes"):
        gm(_x(2, side=10))


def test_the_shaped_model_keeps_the_check_and_reports_the_place():
    torch.manual_seed(0)
    shaped = graphshape.shape(PadsOddSizes().eval(), _x(), method="DKS", seed=0)
    [said] = [w for w in shaped.meta["graphshape"].warnings if "traced size" in w]
    assert "test_size_branches.py" in said and "raising on an input" in said
    assert not any("ONNX export" in w for w in shaped.meta["graphshape"].warnings)
    assert shaped(_x(3)).shape == (3, 4)
    buffer = io.BytesIO()  # a GraphModule is traced again when unpickled
    torch.save(shaped, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False)
    for module in (shaped, reloaded):
        with pytest.raises(GraphshapeError, match="traced for inputs of the example inputs' "
                                                  "sizes"):
            module(_x(2, side=12))
    torch.testing.assert_close(reloaded(_x(3)), shaped(_x(3)))


def test_int_of_a_size_and_a_device_branch_are_answered_for_the_examples():
    torch.manual_seed(0)
    model = TokenGrid().eval()
    x = _x(2, side=8)
    graph = load_module(model, x)
    places = " ".join(graph.meta["specialized"])
    assert "int(math.sqrt(tokens.shape[1]))` -> 4" in places
    assert 'x.device.type == "cpu":` -> True' in places
    gm = emit(graph)
    with torch.no_grad():
        torch.testing.assert_close(gm(_x(3, side=8)), model(_x(3, side=8)))
    with pytest.raises(GraphshapeError, match=r"int\(math.sqrt"):
        gm(_x(2, side=12))
    shaped = graphshape.shape(model, x, method="TAT", seed=0)
    assert shaped(_x(4, side=8)).shape == (4, 16)


def test_a_branch_on_the_batch_size_is_not_frozen():
    """Answered for one batch size, the graph would be wrong for the others: fx's refusal
    stands, and the ONNX export, which follows the example's path, is refused by its
    check on a batch of one (it was accepted, wrong for a batch of one)."""
    class BatchDependent(nn.Module):
        def forward(self, x):
            if x.shape[0] > 1:
                return x * 2
            return x

    with pytest.raises(GraphshapeError) as info:
        load_module(BatchDependent(), torch.randn(2, 3))
    message = str(info.value)
    assert "depends on the batch size (True for the example inputs' 2, False for 1)" in message
    assert "if x.shape[0] > 1:" in message and "computes other outputs" in message


def test_a_branch_on_values_is_still_refused_by_fx():
    class SignDependent(nn.Module):
        def forward(self, x):
            return torch.relu(x) if x.sum() > 0 else -x

    with pytest.raises(GraphshapeError) as info:
        load_module(SignDependent(), torch.ones(2, 3))
    assert "control flow" in str(info.value)


def test_a_branch_on_the_end_of_a_long_chain_is_refused_as_control_flow():
    """Whether a value reads sizes only is decided without recursion: through 3000 adds
    the check recursed past Python's limit (a RecursionError, not the reason)."""
    class Deep(nn.Module):
        def forward(self, x):
            for _ in range(3000):
                x = x + 1
            return x * 2 if x else x, "text"  # (no export either: a str output)

    with pytest.raises(GraphshapeError) as info:
        load_module(Deep(), torch.ones(()))
    assert "control flow" in str(info.value) and "RecursionError" not in str(info.value)


def test_answering_never_changes_the_model():
    """The graph so far runs on the example inputs (here on real tensors: integer inputs
    rule out 'meta' ones) in eval mode, on copies of the buffers, the random state kept."""
    class Counted(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.bn = nn.BatchNorm1d(6)
            self.fc = nn.Linear(6, 6)
            self.register_buffer("steps", torch.zeros(()))

        def forward(self, ids):
            self.steps.add_(1)  # (a counter the forward updates in place)
            h = self.bn(self.emb(ids).transpose(1, 2)).transpose(1, 2)
            h = h + 0.0 * torch.rand_like(h)  # draws random numbers before the question
            if h.shape[1] % 2:
                h = F.pad(h, (0, 0, 0, 1))
            return self.fc(torch.relu(h))

    torch.manual_seed(0)
    model = Counted().train()
    stats = [t.clone() for t in model.bn.buffers()]
    ids = torch.randint(0, 10, (2, 5))
    state = torch.random.get_rng_state()
    graph = load_module(model, ids)
    assert graph.meta["specialized"]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(model.bn.buffers(), stats))
    assert float(model.steps) == 0
    assert model.training and model.bn.training


def test_hooks_a_forward_registers_are_not_registered_twice():
    """Hugging Face's forwards register output-capturing hooks at their first call and set
    a flag saying so; reading the model undid the flag but kept the hooks, so each read
    added them again (``hidden_states`` then held every layer's output twice)."""
    class RegistersHooks(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
            self.captured = []

        def forward(self, x):
            if not getattr(self, "_hooks_installed", False):
                for layer in self.layers:
                    layer.register_forward_hook(lambda m, i, o: self.captured.append(o))
                self._hooks_installed = True
            for layer in self.layers:
                x = torch.relu(layer(x))
            return x

    model = RegistersHooks()
    for _ in range(2):
        load_module(model, torch.randn(2, 4))
    model.captured.clear()
    model(torch.randn(2, 4))
    assert len(model.captured) == 2
    assert all(len(layer._forward_hooks) == 1 for layer in model.layers)


def test_a_check_is_kept_while_what_it_reads_is_computed():
    """``Graph.remove_dead`` keeps a check (``torch._assert``: timm's "Input height doesn't
    match model", graphshape's guards) on a live value's size, not one whose only reason to
    compute a removed branch would be the check."""
    g = Graph({"source": "test"})
    g.add(Node("x", "input", outputs=[TensorInfo((2, 4), "float32")]))
    g.add(Node("act", "activation", [Ref("x")], {"name": "relu"}))
    g.add(Node("branch", "activation", [Ref("x")], {"name": "tanh"}))  # removed: unread
    for name, read in (("size", "act"), ("size_b", "branch")):
        g.add(Node(name, "opaque", [Ref(read)], {"description": "size"},
                   outputs=[TensorInfo(None, "object")]))
        g[name].meta["flags"] = ["opaque", "shape_computation"]
        check = f"check_{read}"
        g.add(Node(check, "opaque", [Ref(name)], {"description": "function torch._assert"},
                   outputs=[TensorInfo(None, "object")]))
        g[check].meta["flags"] = ["opaque", "shape_computation", CHECK]
    g.add(Node("out", "output", [Ref("act")]))
    assert sorted(g.remove_dead()) == ["branch", "check_branch", "size_b"]
    assert "check_act" in g and "size" in g


def test_the_source_assert_is_kept_in_the_shaped_model():
    """timm's patch embeddings check the image size with ``torch._assert``; the shaped
    model lost the check (removed as unused when the sums were rewritten)."""
    class ChecksSize(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            torch._assert(x.shape[-1] == 9, "Input width doesn't match model (9).")
            return x.mean(1, keepdim=True) + torch.relu(self.bn(self.conv(x)))

    shaped = graphshape.shape(ChecksSize().eval(), _x(), method="DKS", seed=0)
    assert shaped(_x(3)).shape == (3, 4, 9, 9)
    with pytest.raises(AssertionError, match="Input width doesn't match model"):
        shaped(_x(2, side=10))


def test_written_as_onnx_the_checks_are_left_out():
    """ONNX has no op that raises (the ONNX exporters drop ``torch._assert`` too): the
    checks and the size computations only they read are not written, where before the
    kept checks failed the write ("opaque torch op ... has no ONNX form")."""
    import onnxruntime as ort

    from graphshape.passes.shaping import shape_graph

    torch.manual_seed(0)
    model = PadsOddSizes().eval()
    graph = graphshape.load(model, _x())
    assert any(CHECK in n.meta["flags"] for n in graph)
    shaped, _ = shape_graph(graph, method="DKS", seed=0)
    assert any(CHECK in n.meta["flags"] for n in shaped)
    proto = graphshape.to_onnx(shaped)
    session = ort.InferenceSession(proto.SerializeToString())
    x = _x(2).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want = graphshape.to_torch(shaped)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.fixture
def hf_grn_module(monkeypatch):
    """Hugging Face's ConvNeXt V2 GRN (``transformers.models.convnextv2``'s
    ``ConvNextV2GRN``, channels last), registered under its module's name as if
    transformers were imported."""
    name = "transformers.models.convnextv2.modeling_convnextv2"
    module = types.ModuleType(name)

    class ConvNextV2GRN(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(1, 1, 1, dim))
            self.bias = nn.Parameter(torch.zeros(1, 1, 1, dim))

        def forward(self, hidden_states):
            norms = torch.linalg.vector_norm(hidden_states, ord=2, dim=(1, 2), keepdim=True)
            scaled = norms / (norms.mean(dim=-1, keepdim=True) + 1e-6)
            return self.weight * (hidden_states * scaled) + self.bias + hidden_states

    ConvNextV2GRN.__module__ = name
    module.ConvNextV2GRN = ConvNextV2GRN
    monkeypatch.setitem(sys.modules, name, module)
    return ConvNextV2GRN


def test_hugging_face_grn_is_removed_as_timm_grn(hf_grn_module):
    """Traced by fx (Hugging Face's ConvNeXt V2 now is), its ``torch.linalg.vector_norm``
    was refused as "a normalization layer that graphshape could not map"."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.fc1 = nn.Linear(8, 16)
            self.grn = hf_grn_module(16)
            self.fc2 = nn.Linear(16, 8)

        def forward(self, x):
            h = self.conv(x).permute(0, 2, 3, 1)
            h = self.fc2(self.grn(F.gelu(self.fc1(h)))).permute(0, 3, 1, 2)
            return x + h

    x = torch.randn(2, 8, 6, 6)
    shaped = graphshape.shape(Block().eval(), x, method="DKS", seed=0)
    removed = [r for r in shaped.meta["graphshape"].removed if "grn" in r["node"]]
    assert removed and not any(isinstance(m, hf_grn_module) for m in shaped.modules())
    assert np.isfinite(shaped(x).detach().numpy()).all()


class _Made(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.make = make

    def forward(self, x):
        return x + self.make(x)


@pytest.mark.parametrize("make", [
    lambda x: torch.zeros(x.shape[0], x.shape[1], 1, 1),  # sizes as separate arguments
    lambda x: torch.ones(x.size(0), 3, 1, 1, device=x.device, dtype=x.dtype),
    lambda x: torch.empty(x.shape[0], 3, 1, 1).fill_(2.0),
    lambda x: torch.tensor(x.shape[-1], dtype=torch.float32),  # a size as data
    lambda x: torch.as_tensor([x.shape[-2], x.shape[-1]]).float().sum(),
    lambda x: torch.eye(x.shape[-1]).expand(x.shape[0], 3, -1, -1),  # traced, not answered
], ids=["zeros", "ones", "empty", "tensor", "as_tensor", "eye"])
def test_tensors_made_from_traced_sizes_are_traced_by_fx(make):
    # fx fails there ("zeros() takes 1 positional argument but 4 were given"), and the model
    # went through the export
    model = _Made(make).eval()
    graph = load_module(model, _x())
    assert "traced_with" not in graph.meta
    assert "specialized" not in graph.meta  # recorded as calls, not answered
    gm = emit(graph)
    for batch, side in ((5, 9), (2, 7)):  # sizes the graph computes
        torch.testing.assert_close(gm(_x(batch, side)), model(_x(batch, side)))


def test_random_tensor_of_traced_sizes_keeps_its_call():
    graph = load_module(_Made(lambda x: torch.randn(x.shape[0], 3, 1, 1) * 0.0).eval(), _x())
    assert "traced_with" not in graph.meta
    assert emit(graph)(_x(4)).shape == (4, 3, 9, 9)
    assert torch.zeros is torch._C._VariableFunctions.zeros  # put back after the trace


class KeepsFloat32(nn.Module):
    """A region autocast is disabled in, on the input's device (timm's EfficientViT)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        with torch.autocast(device_type=y.device.type, enabled=False):
            y = y.float() * 2.0
        return y.mean((2, 3))


def test_autocast_with_a_traced_device_type_is_traced_and_reported():
    # autocast refused the traced device type ("Expected `device_type` of type `str`"):
    # the model went through the export, which drops the region without a word
    init = torch.autocast.__init__
    model = KeepsFloat32().eval()
    graph = load_module(model, _x())
    assert "traced_with" not in graph.meta
    [place] = graph.meta["autocast"]
    assert "test_size_branches.py" in place and "(disabled)" in place
    assert torch.autocast.__init__ is init  # put back after the trace
    torch.testing.assert_close(emit(graph)(_x(3)), model(_x(3)))
    shaped = graphshape.shape(model, _x(), method="DKS", seed=0)
    [said] = [w for w in shaped.meta["graphshape"].warnings if "autocast" in w]
    assert "enters torch.autocast at 1 place(s)" in said and "does not record" in said


class ExpandsABuffer(nn.Module):
    """A buffer (which fx reads as the tensor it is) expanded to traced sizes, as ConViT's
    ``self.rel_indices.expand(B, -1, -1, -1)`` once the model has run."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.arange(3.0).view(1, 3, 1, 1))
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv(x) + self.table.expand(x.shape[0], -1, x.shape[2], x.shape[3])


def test_a_buffer_expanded_to_traced_sizes_is_traced_by_fx():
    # fx failed: "expand() takes 1 positional argument but 4 were given"
    view, attributes = torch.Tensor.view, dict(torch.Tensor.__dict__)
    model = ExpandsABuffer().eval()
    graph = load_module(model, _x())
    assert "traced_with" not in graph.meta and "specialized" not in graph.meta
    assert torch.Tensor.view is view and dict(torch.Tensor.__dict__) == attributes  # put back
    gm = emit(graph)
    assert torch.equal(gm.table, model.table)  # the buffer, under its name
    for batch, side in ((5, 9), (2, 7)):
        torch.testing.assert_close(gm(_x(batch, side)), model(_x(batch, side)))


class MasksByLength(nn.Module):
    """A causal mask and position ids kept as buffers and sliced to the sequence length
    (GPT's ``self.bias[:, :, :T, :T]``, BERT's ``self.position_ids[:, :T]``)."""

    def __init__(self, width=8, longest=16):
        super().__init__()
        self.register_buffer("mask", torch.tril(torch.ones(longest, longest)).bool())
        self.register_buffer("position_ids", torch.arange(longest).unsqueeze(0))
        self.positions = nn.Embedding(longest, width)
        self.query = nn.Linear(width, width)

    def forward(self, x):  # (batch, tokens, width)
        T = x.shape[1]
        x = x + self.positions(self.position_ids[:, :T])
        scores = self.query(x) @ x.transpose(1, 2)
        scores = scores.masked_fill(~self.mask[:T, :T], float("-inf"))
        return torch.relu(scores.softmax(-1) @ x)


def test_a_buffer_sliced_to_a_traced_size_is_traced_for_any_size():
    # fx hands a forward its buffers as tensors, so T was answered for the example (5) and
    # the model refused other lengths ("traced for inputs of the example inputs' sizes")
    model = MasksByLength().eval()
    graph = load_module(model, (torch.randn(2, 5, 8),))
    assert "traced_with" not in graph.meta and "specialized" not in graph.meta
    gm = emit(graph)
    for batch, tokens in ((2, 5), (3, 9), (1, 16)):
        x = torch.randn(batch, tokens, 8)
        torch.testing.assert_close(gm(x), model(x))
    assert torch.equal(gm.mask, model.mask)  # the buffers, under their names


class CachesABuffer(nn.Module):
    """A buffer the forward replaces when the input's size changes, then expands: ConViT's
    ``self.rel_indices = self.get_rel_indices(N)`` and ``self.rel_indices.expand(B, ...)``."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.zeros(1, 1, 1, 1), persistent=False)
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if self.table.shape[1] != x.shape[1]:
            self.table = torch.arange(float(x.shape[1])).view(1, -1, 1, 1)
        return self.conv(x) + self.table.expand(x.shape[0], -1, x.shape[2], x.shape[3])


class ReadsABufferValue(nn.Module):
    """A branch on a buffer's value in Python (an initialization flag)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scaled", torch.tensor(True))
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(y * 2.0 if self.scaled else y)


@pytest.mark.parametrize("make", [CachesABuffer, ReadsABufferValue])
def test_a_forward_that_assigns_or_reads_a_buffer_is_traced_with_the_buffers_as_they_are(make):
    # traced as Proxies, the assignment would store a traced value in the buffer (and its
    # size check then fail at the emitted model's second call), and `if self.scaled:`
    # fails; fx's default reading of the buffers traces both, as before
    model = make().eval()
    before = {name: (t, t.clone()) for name, t in model.named_buffers()}
    graph = load_module(model, _x())
    assert "traced_with" not in graph.meta
    for name, t in model.named_buffers():  # the same tensors, unchanged
        assert t is before[name][0] and torch.equal(t, before[name][1])
    gm = emit(graph)
    for batch in (2, 5, 2):  # (the emitted model's buffer is not replaced by a call)
        torch.testing.assert_close(gm(_x(batch)), model(_x(batch)))


class KeepsARunningMean(nn.Module):
    """A running statistic the forward updates in place in training (a hand-written
    normalization, an EMA codebook)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.register_buffer("mean", torch.zeros(8))

    def forward(self, x):
        y = self.conv(x)
        if self.training:
            self.mean.mul_(0.9).add_(0.1 * y.mean((0, 2, 3)).detach())
        return torch.relu(y - self.mean.view(1, -1, 1, 1))


def test_a_buffer_updated_in_place_is_read_updated_and_reported():
    # the update was a call nobody read: the emitted model subtracted the old mean, and
    # nothing said the shaped model keeps no running statistic
    model = KeepsARunningMean().train()
    x = _x()
    graph = load_module(model, x)
    assert graph.meta["state_updates"] == ["mean (mul_, add_)"]
    assert torch.equal(model.mean, torch.zeros(8))  # reading the model changes nothing
    emitted = emit(graph).train()(x)
    torch.testing.assert_close(emitted, model(x))  # the source's first call
    shaped = graphshape.shape(KeepsARunningMean().train(), x, method="DKS", seed=0)
    [said] = [w for w in shaped.meta["graphshape"].warnings if "in place" in w]
    assert "updates 1 buffer(s) in place ('mean (mul_, add_)'" in said
    assert "state_updates" not in load_module(KeepsARunningMean().eval(), x).meta


def test_two_traces_in_two_threads_leave_torch_as_it_was():
    # the tracer's patches are process-global: the second trace saved the first one's
    # patched torch.zeros as the original and put it back when it finished last
    import threading
    import time

    zeros = torch.zeros
    first_inside, meet = threading.Event(), threading.Barrier(2)

    class Waits(nn.Module):
        def __init__(self, first: bool):
            super().__init__()
            self.first = first

        def forward(self, x):
            if self.first:
                first_inside.set()
            try:  # both traces inside at once where nothing keeps them apart
                meet.wait(timeout=1.0)
            except threading.BrokenBarrierError:
                pass
            if not self.first:
                time.sleep(0.2)  # finish last
            return x + torch.zeros(x.shape[0], 3, 1, 1)

    results = {}

    def load(first):
        results[first] = load_module(Waits(first).eval(), _x())

    threads = [threading.Thread(target=load, args=(True,))]
    threads[0].start()
    first_inside.wait(timeout=10)
    threads.append(threading.Thread(target=load, args=(False,)))
    threads[1].start()
    for t in threads:
        t.join(timeout=30)
    assert torch.zeros is zeros
    for graph in results.values():
        torch.testing.assert_close(emit(graph)(_x(4)), _x(4) + 0.0)
    assert len(results) == 2


class Checkpointed(nn.Module):
    """Gradient checkpointing, as timm's set_grad_checkpointing / Hugging Face's
    gradient_checkpointing_enable switch it on."""

    def __init__(self, use_reentrant: bool):
        super().__init__()
        self.use_reentrant = use_reentrant
        self.block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        y = checkpoint(self.block, x, use_reentrant=self.use_reentrant)
        return y.mean((2, 3))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_is_traced_through_and_reported(use_reentrant):
    # fx inlines the checkpointed function without a word: a model trained with
    # checkpointing for memory lost it once shaped
    from torch.utils import checkpoint as ckpt
    impl, apply = ckpt._checkpoint_without_reentrant_generator_impl, ckpt.CheckpointFunction.apply
    model = Checkpointed(use_reentrant).train()
    graph = load_module(model, _x())
    [place] = graph.meta["checkpointed"]
    assert "test_size_branches.py" in place and "checkpoint(self.block" in place
    assert ckpt._checkpoint_without_reentrant_generator_impl is impl  # put back
    assert ckpt.CheckpointFunction.apply == apply and "apply" not in vars(ckpt.CheckpointFunction)
    shaped = graphshape.shape(model, _x(), method="DKS", seed=0)
    [said] = [w for w in shaped.meta["graphshape"].warnings if "checkpoint" in w]
    assert "at 1 place(s)" in said and "more memory in training" in said
    assert "checkpointed" not in load_module(nn.Sequential(nn.Conv2d(3, 3, 1)), _x()).meta
