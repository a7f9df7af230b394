"""What a sweep of torchvision's model zoo found mishandled (swin_v2, swin3d):

* activations and layers that read no model input (a computed constant, as swin_v2's
  continuous position-bias MLP) are left as they are by shaping;
* TAT's refusals of relu beside other activations, and of kinked activations, name a node;
* a wrapped function that edits its list argument runs under fx's Interpreter (loading's
  ShapeProp, the measuring pass) as it does in the module."""

import pytest
import torch
import torch.nn as nn

import graphshape
from graphshape import GraphshapeError
from graphshape.torch_modules import TransformedActivation


class PosBiasNet(nn.Module):
    """Two conv-BN-act layers; between them, a bias computed from a buffer by a small
    relu/sigmoid MLP (swin_v2's cpb_mlp pattern: ``16 * sigmoid(mlp(table))``)."""

    def __init__(self, act=nn.GELU):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.act1, self.act2 = act(), act()
        self.register_buffer("table", torch.randn(64, 2))
        self.cpb = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 1))
        self.head = nn.Linear(16, 10)

    def position_bias(self):
        return 16 * torch.sigmoid(self.cpb(self.table)).view(1, 1, 8, 8)

    def forward(self, x):
        h = self.act1(self.bn1(self.conv1(x))) + self.position_bias()
        h = self.act2(self.bn2(self.conv2(h)))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("method", ["TAT", "DKS"])
def test_constant_path_activations_and_layers_are_left_as_they_are(method):
    torch.manual_seed(0)
    model = PosBiasNet()
    x = torch.randn(4, 3, 8, 8)
    # before: TAT refused the network for the relu inside the constant MLP, and DKS solved
    # and injected relu and sigmoid transforms there, and re-initialized the MLP
    shaped = graphshape.shape(model, x, method=method, seed=0)
    report = shaped.meta["graphshape"]
    assert set(report.activation_params) == {"gelu_exact"}
    assert any("read no model input" in w and "'cpb_1'" in w for w in report.warnings)
    transformed = {r["node"] for r in report.rewritten if r["what"].startswith("transformed")}
    assert transformed == {"act1", "act2"}
    # the MLP keeps its weights and plain activations; the main-path layers are shaped
    before, after = model.state_dict(), shaped.state_dict()
    for key in ("cpb.0.weight", "cpb.0.bias", "cpb.2.weight", "cpb.2.bias"):
        assert torch.equal(after[key], before[key]), key
    assert not torch.equal(after["head.weight"], before["head.weight"])
    assert type(getattr(shaped.cpb, "1")) is nn.ReLU
    assert isinstance(shaped.act1, TransformedActivation)
    with torch.no_grad():
        mlp = [getattr(shaped.cpb, str(i)) for i in range(3)]
        bias = 16 * torch.sigmoid(mlp[2](mlp[1](mlp[0](shaped.table))))
        torch.testing.assert_close(bias.view(1, 1, 8, 8), model.position_bias())
    out = shaped(x)
    out.pow(2).mean().backward()
    assert torch.isfinite(out).all()


class TimestepNet(PosBiasNet):
    """The same layers with the bias computed from an integer model input instead (a
    diffusion model's timestep embedding: ``t[:, None].float()`` -> sin / cos -> MLP)."""

    def __init__(self):
        super().__init__()
        self.cpb = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 16))

    def forward(self, x, t):
        phase = t[:, None].float() / 100.0
        emb = self.cpb(torch.cat([torch.sin(phase), torch.cos(phase)], 1))
        h = self.act1(self.bn1(self.conv1(x))) + emb[:, :, None, None]
        h = self.act2(self.bn2(self.conv2(h)))
        return self.head(h.mean((2, 3)))


def test_activations_reading_an_integer_input_are_said_to_and_left_as_they_are():
    # the warning said they read no model input ("a computed constant"): they read t
    torch.manual_seed(0)
    model = TimestepNet()
    x, t = torch.randn(4, 3, 8, 8), torch.randint(0, 1000, (4,))
    report = graphshape.shape(model, (x, t), method="DKS", seed=0).meta["graphshape"]
    assert not any("read no model input" in w for w in report.warnings)
    (warning,) = [w for w in report.warnings if "integer values" in w]
    assert warning.startswith("1 activation(s) read model input(s) only through integer "
                              "values (first 'cpb_1', from 't'")
    # the constant MLP of the other model is still a constant
    report = graphshape.shape(PosBiasNet(), x, method="DKS", seed=0).meta["graphshape"]
    assert not any("integer values" in w for w in report.warnings)


def test_the_analysis_measures_values_from_integer_inputs_and_goes_on_past_the_join():
    torch.manual_seed(0)
    model = TimestepNet()
    x, t = torch.randn(6, 3, 8, 8), torch.randint(0, 1000, (6,))
    rows = {r["node"]: r for r in graphshape.analyze(model, (x, t), empirical=True).rows}
    # measured where no rule applies (the cast of t, sin, cos), predicted from there on
    for name in ("sin", "cos"):
        assert "from integer inputs: measured" in rows[name]["flags"]
        assert rows[name]["q_pred"] == pytest.approx(rows[name]["q_emp"], rel=1e-9)
    embedding = rows["cpb_2"]
    assert embedding["flags"] == []
    assert embedding["q_pred"] == pytest.approx(embedding["q_emp"], rel=0.3)
    # before: the join and everything after it were "unknown after ..."
    join = rows["add"]
    assert join["q_pred"] is not None and not any("unknown" in f for f in join["flags"])
    assert join["q_pred"] == pytest.approx(rows["act1"]["q_pred"] + embedding["q_pred"], rel=1e-6)
    assert join["q_emp"] == pytest.approx(join["q_pred"], rel=0.2)
    assert rows["head"]["q_pred"] is not None


def test_tat_with_relu_beside_another_activation_names_the_relu_node():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)
            self.conv3 = nn.Conv2d(8, 8, 3)
            self.relu, self.tanh = nn.ReLU(), nn.Tanh()

        def forward(self, x):  # (a final tanh would be the output's link, not shaped)
            return self.conv3(self.conv2(self.relu(self.conv1(x))).tanh())

    with pytest.raises(GraphshapeError, match="activation='leaky_relu'") as err:
        graphshape.shape(Mixed(), torch.randn(2, 3, 12, 12), method="TAT")
    assert err.value.node == "relu" and "tanh" in str(err.value)
    # one of the ways out the message gives (this 2-layer network is too shallow for
    # TReLU's eta=0.9)
    shaped = graphshape.shape(Mixed(), torch.randn(2, 3, 12, 12), method="TAT",
                              activation="tanh")
    assert set(shaped.meta["graphshape"].activation_params) == {"tanh"}


def test_tat_refusing_a_kinked_activation_names_a_node():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU6(), nn.Conv2d(8, 8, 3))
    with pytest.raises(GraphshapeError, match="kink in its derivative") as err:
        graphshape.shape(model, torch.randn(2, 3, 12, 12), method="TAT")
    assert err.value.node == "_1" and err.value.op == "activation"  # fx's name of module "1"


def _scale_by_first(x, sizes):
    sizes[0] = min(sizes[0], x.shape[-1])  # edits its list argument, as swin3d's helper does
    return x * (sizes[0] / 2)


torch.fx.wrap("_scale_by_first")


class ListEditing(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.tanh(_scale_by_first(self.conv1(x), [2, 3])))


def test_a_wrapped_function_that_edits_its_list_argument_loads_and_is_measured():
    # the GraphModule's code passes a fresh list; fx's Interpreter (ShapeProp, the measuring
    # pass) passed its immutable_list, and the edit raised TypeError
    model, x = ListEditing(), torch.randn(2, 3, 6, 6)
    stats = graphshape.analyze(model, x, empirical=True)
    assert stats.empirical and stats["tanh"]["q_emp"] > 0
    shaped = graphshape.shape(model, x, method="DKS")
    assert torch.isfinite(shaped(x)).all()


def _double_with_width(x):
    return 2 * x, x.shape[-1]  # a tuple: a tensor and a Python int


torch.fx.wrap("_double_with_width")


class TupleNet(nn.Module):
    """A residual block whose branch goes through a call returning a tuple, as
    nn.MultiheadAttention (``x + attn(x)[0]``, vit) or mvit's ``(x, thw)`` blocks."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = (nn.Conv2d(8, 8, 3, padding=1) for _ in range(3))

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        y, _ = _double_with_width(self.conv2(h))
        return self.conv3(torch.relu(h + y))


def test_a_tuple_of_tensors_carries_the_signal():
    from graphshape.api import load
    from graphshape.ir import holds_tensors
    from graphshape.passes.subnetworks import signal_nodes

    model, x = TupleNet(), torch.randn(2, 8, 6, 6)
    graph = load(model, x)
    tuple_node = graph["_double_with_width"]
    assert tuple_node.dtype == "object" and holds_tensors(tuple_node)
    # before: an "object" value ended every signal path, so the branch counted as a
    # constant and the residual add was not a join
    signals = signal_nodes(graph)
    assert {"_double_with_width", "getitem", "add"} <= signals
    assert "getitem_1" not in signals  # the int
    shaped = graphshape.shape(model, x, method="DKS", seed=0)
    report = shaped.meta["graphshape"]
    assert any(r["node"] == "add" and "sum" in r["what"] for r in report.rewritten), \
        report.rewritten
    assert any("opaque" in w and "_double_with_width" in w for w in report.warnings)
    stats = graphshape.analyze(model, x)
    assert any(f.startswith("unknown after") for f in stats["add"]["flags"])
    assert torch.isfinite(shaped(x)).all()


class PreNormBlock(nn.Module):
    """A pre-norm transformer block (vit's encoder layer, small): the attention sublayer's
    branch holds no activation node, only nn.MultiheadAttention (an opaque call)."""

    def __init__(self, dim=16):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def test_an_attention_sublayer_is_a_residual_branch():
    # before: only branches holding an activation counted as nonlinear, so the attention
    # join got equal weights and shortcut_weight=0 kept its skip
    from graphshape.api import load
    from graphshape.passes.subnetworks import find_joins

    model, x = PreNormBlock(), torch.randn(2, 5, 16)
    joins = {j.node: j for j in find_joins(load(model, x))}
    assert len(joins) == 2
    for join in joins.values():
        assert join.shortcut is not None and join.inputs[join.shortcut].node in ("x", "add")
    report = graphshape.shape(model, x, method="DKS", seed=0).meta["graphshape"]
    kinds = [r["what"] for r in report.rewritten if r["node"] in joins and "folded" not in r["what"]]
    assert len(kinds) == 2 and all("residual join" in k for k in kinds), kinds
    no_skips = graphshape.shape(model, x, method="DKS", shortcut_weight=0.0, seed=0)
    assert {r["node"] for r in no_skips.meta["graphshape"].removed} >= set(joins)
    assert torch.isfinite(no_skips(x)).all()


class ExplicitAttention(nn.Module):
    """Self-attention written out (matmul, scale, softmax, dropout, matmul), as in timm with
    fused_attn=False and many hand-written transformers; traced into plain IR nodes."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(
            2, 0, 3, 1, 4).unbind(0)
        attn = self.drop((q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(-1))
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class ExplicitPreNormBlock(PreNormBlock):
    def __init__(self, dim=16):
        super().__init__(dim)
        self.attn = ExplicitAttention(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _flat(params):
    return {(act, key): v for act, values in params.items() for key, v in values.items()}


@pytest.mark.parametrize("method", ["DKS", "TAT"])
def test_attention_is_solved_alike_from_an_opaque_call_explicit_nodes_and_onnx(tmp_path,
                                                                                method):
    # softmax(q k^T) v averages v's tokens: the maximizing function treats it like pooling
    # (the identity), as it treats the opaque nn.MultiheadAttention. Before, q k^T and
    # (weights) v were two products of signals: M had a cube per attention sublayer and
    # vit_b_16's DKS GELU from ONNX had input_scale 0.0048 where PyTorch gave 0.299.
    from graphshape.passes.subnetworks import find_joins

    x = torch.randn(2, 5, 16)
    opaque = nn.Sequential(PreNormBlock(), PreNormBlock())
    explicit = nn.Sequential(ExplicitPreNormBlock(), ExplicitPreNormBlock()).eval()
    want = graphshape.shape(opaque, x, method=method, seed=0).meta["graphshape"]
    shaped = graphshape.shape(explicit, x, method=method, seed=0)
    got = shaped.meta["graphshape"]
    assert _flat(got.activation_params) == pytest.approx(_flat(want.activation_params),
                                                         rel=1e-9)
    assert len(find_joins(graphshape.load(explicit, x))) == 4
    assert torch.isfinite(shaped(x)).all()

    src = tmp_path / "explicit.onnx"
    torch.onnx.export(explicit, (x,), str(src), opset_version=17, dynamo=False)
    report = graphshape.shape_onnx(src, tmp_path / "shaped.onnx", method=method, seed=0)
    assert _flat(report.activation_params) == pytest.approx(_flat(want.activation_params),
                                                            rel=1e-9)


@pytest.mark.parametrize("method", ["DKS", "TAT"])
def test_class_attention_solves_alike_from_pytorch_and_onnx(tmp_path, method):
    # CaiT's class token: torch's exporter writes cls_token.expand(n, -1, -1) with a
    # ConstantOfShape / Equal / Where target that ONNX shape inference does not evaluate,
    # so every shape on the class token's path was unknown and the concat of the token
    # and the patches was weighed 1/2 : 1/2 instead of 1/17 : 16/17 (DKS GELU input_scale
    # 0.743 from ONNX, 1.022 from PyTorch)
    timm = pytest.importorskip("timm")
    from timm.models.cait import Cait

    torch.manual_seed(0)
    model = Cait(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                 depth_token_only=2, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    want = graphshape.shape(model, x, method=method, seed=0).meta["graphshape"]
    src = tmp_path / "cait.onnx"
    torch.onnx.export(model, (x,), str(src), opset_version=17, dynamo=False)
    got = graphshape.shape_onnx(src, tmp_path / "shaped.onnx", method=method, seed=0)
    assert _flat(got.activation_params) == pytest.approx(_flat(want.activation_params),
                                                         rel=1e-9)


def test_a_product_of_two_signals_without_a_softmax_still_multiplies():
    # only softmax weights are mixing weights: a sigmoid-free product of two signals
    # (here q k^T v with no softmax) is still a product in M, so the solve differs
    from graphshape.passes.subnetworks import subnet_max_func

    class NoSoftmax(ExplicitAttention):
        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return self.proj((q @ k.transpose(-2, -1)) @ v)

    x = torch.randn(2, 5, 16)
    block = ExplicitPreNormBlock()
    m_softmax = subnet_max_func(graphshape.load(block, x))
    block.attn = NoSoftmax()
    m_products = subnet_max_func(graphshape.load(block, x))
    # with r the identity every subnetwork maps x to x, except where q k^T v is the
    # product c * c * c: the network's attention join (equal weights 1/2 for an
    # unweighted add) gives 0.5 * 2 + 0.5 * 8
    assert m_softmax(2.0, lambda c: c) == pytest.approx(2.0)
    assert m_products(2.0, lambda c: c) == pytest.approx(5.0)


class BroadcastJoin(nn.Module):
    """An add of a nonlinear branch and a linear one that broadcasts, (2, 4, 1, 8) +
    (2, 1, 4, 8), as mvit's decomposed relative-position terms do in its ONNX export."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.c(torch.relu(self.a(x)).unsqueeze(2) + self.b(x).unsqueeze(1))


def test_a_broadcasting_add_is_not_a_residual_join(tmp_path):
    # before: the linear input counted as the shortcut, and shortcut_weight=0 dropped it,
    # so the join passed (2, 4, 1, 8) on where the model computes (2, 4, 4, 8); onnxruntime
    # then failed on mvit_v2_s's next Reshape
    import numpy as np
    import onnxruntime as ort

    from graphshape.passes.subnetworks import find_joins

    model, x = BroadcastJoin().eval(), torch.randn(2, 4, 8)
    (join,) = find_joins(graphshape.load(model, x))
    assert join.nonlinear == [True, False] and join.shortcut is None
    shaped = graphshape.shape(model, x, method="DKS", shortcut_weight=0.0, seed=0)
    assert shaped(x).shape == model(x).shape == (2, 4, 4, 8)
    assert not shaped.meta["graphshape"].removed

    src = tmp_path / "broadcast.onnx"
    torch.onnx.export(model, (x,), str(src), opset_version=17, dynamo=False,
                      input_names=["x"])
    graphshape.shape_onnx(src, tmp_path / "shaped.onnx", method="DKS", shortcut_weight=0.0,
                          seed=0)
    session = ort.InferenceSession(str(tmp_path / "shaped.onnx"),
                                   providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": x.numpy()})[0]
    assert out.shape == (2, 4, 4, 8) and np.isfinite(out).all()


def test_a_token_embedding_is_measured_and_the_layers_after_it_predicted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(100, 64), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
    tokens = torch.randint(0, 100, (8, 5))
    rows = graphshape.analyze(model, tokens, empirical=True).rows
    emb, lin, act = rows[1], rows[2], rows[3]
    assert emb["flags"] == ["opaque", "from integer inputs: measured"]
    # before: every layer after the embedding was "unknown after opaque"
    assert lin["flags"] == [] and act["flags"] == []
    assert lin["q_pred"] == pytest.approx(lin["q_emp"], rel=0.2)
    assert act["q_pred"] == pytest.approx(act["q_emp"], rel=0.2)


def test_without_example_ids_a_token_model_says_why_nothing_is_shown(tmp_path):
    """An ONNX token model analyzed without example inputs: its integer input has no kernel
    (it showed q = 1, c = 0, as a float input would), and a warning says why no row after
    it has numbers and what to pass (before: a table of the inputs, and nothing else)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(100, 64), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
    tokens = torch.randint(0, 100, (8, 5))
    path = tmp_path / "tokens.onnx"
    torch.onnx.export(model, (tokens,), str(path), input_names=["ids"], opset_version=17,
                      dynamo=False)
    stats = graphshape.analyze(str(path))
    assert stats.rows[0]["node"] == "ids" and stats.rows[0]["q_pred"] is None
    assert [r for r in stats.rows if r["q_pred"] is not None] == []
    (warning,) = stats.meta["warnings"]
    assert "integer input(s) 'ids'" in warning and "pass example inputs" in warning
    with_ids = graphshape.analyze(str(path), tokens)
    assert "warnings" not in with_ids.meta
    assert sum(r["q_pred"] is not None for r in with_ids.rows) >= 4


class DropPathNet(nn.Module):
    """Residual MLP blocks with timm's drop path: in training mode, ``x * mask`` with
    ``mask = x.new_empty((n, 1)).bernoulli_(keep).div_(keep)`` (also torch.zeros_like /
    rand_like forms): a mask made from x's shape, not its values."""

    def __init__(self, keep=0.8, form="new_empty"):
        super().__init__()
        self.keep, self.form = keep, form
        self.inp = nn.Linear(16, 32)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32))
                                    for _ in range(3))
        self.head = nn.Linear(32, 4)

    def drop_path(self, x):
        if not self.training:
            return x
        if self.form == "new_empty":
            mask = x.new_empty((x.shape[0], 1)).bernoulli_(self.keep)
        else:
            mask = (torch.rand_like(x[:, :1]) < self.keep).to(x.dtype)
        return x * mask.div_(self.keep)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + self.drop_path(block(h))
        return self.head(h)


@pytest.mark.parametrize("form", ["new_empty", "rand_like"])
def test_drop_path_in_training_mode_is_not_a_product_of_signals(form):
    """Before: refused ("mul node ... multiplies two signals"): every timm model with drop
    path in training mode (swin_tiny_patch4_window7_224 as created, or any model with
    drop_path_rate > 0). The mask reads x's shape only; shaping in training mode now solves
    what it solves in eval mode, and the shaped model still drops paths."""
    x = torch.randn(8, 16)
    eval_model = graphshape.shape(DropPathNet(form=form).eval(), x, method="DKS", seed=0)
    torch.manual_seed(0)
    shaped = graphshape.shape(DropPathNet(form=form).train(), x, method="DKS", seed=0)
    assert (shaped.meta["graphshape"].activation_params
            == eval_model.meta["graphshape"].activation_params)
    outs = [shaped(x) for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # a random mask each call
    # fx records the ``if not self.training`` branch taken while tracing: a hand-written
    # drop path traced in training mode drops in eval mode too, which the report says
    # (timm's DropPath module is mapped to a dropout node instead, below)
    (warning,) = [w for w in shaped.meta["graphshape"].warnings if "training mode" in w]
    assert "3 op(s) drawing random numbers" in warning and "model.eval()" in warning
    assert not any("training mode" in w for w in eval_model.meta["graphshape"].warnings)


def test_a_tensor_made_with_new_tensor_is_not_a_signal():
    # x.new_tensor(data) takes x's dtype and device, not its values: it was an opaque call
    # reading x, and the product a "product of two signals" refusal
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), _Scaled(), nn.Linear(32, 4))
    x = torch.randn(8, 16)
    graph = graphshape.load(model, x)
    [made] = [n for n in graph if n.op == "opaque" and "new_tensor" in str(n.attrs.get("target"))]
    assert "shape_computation" in made.meta["flags"]
    shaped = graphshape.shape(model, x, method="DKS", seed=0)
    assert shaped(x).shape == (8, 4)


class _Scaled(nn.Module):
    def forward(self, x):
        return x * x.new_tensor(2.0)


def test_timms_drop_path_is_a_dropout_node_that_eval_mode_turns_off():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", drop_path_rate=0.2)  # (training mode)
    x = torch.randn(2, 3, 64, 64)
    graph = graphshape.load(model, x)
    drops = [n for n in graph if n.op == "dropout" and n.attrs.get("variant")]
    assert len(drops) == 11 and {n.attrs["variant"] for n in drops} == {"StochasticDepth"}
    shaped = graphshape.shape(model, x, method="DKS", seed=0)
    eval_params = graphshape.shape(model.eval(), x, method="DKS", seed=0).meta[
        "graphshape"].activation_params
    assert shaped.meta["graphshape"].activation_params == eval_params
    shaped.train()
    assert not torch.equal(shaped(x), shaped(x))
    shaped.eval()
    assert torch.equal(shaped(x), shaped(x))
