"""subnet_max_func derived from the graph equals the hand-derived functions (to 1e-12)."""

import math

import numpy as np
import pytest

from graphshape import GraphshapeError
from graphshape.ir import Graph, Node, Ref, TensorInfo
from graphshape.passes.subnetworks import find_joins, subnet_max_func

# Scalar functions r and points x at which every hand-derived M is compared: a slope map
# (DKS's mu), a curvature map (TAT's kappa), a leaky-ReLU C map at c = 0 (TReLU), and a
# nonlinear map with r(y) < y somewhere, so that taking the wrong max shows.
def _leaky_c(a):
    def c_map(c):
        c = min(1.0, max(-1.0, c))
        relu = (math.sqrt(1 - c * c) + (math.pi - math.acos(c)) * c) / math.pi
        return ((1 - a) ** 2 * relu + 2 * a * c) / (1 + a * a)
    return c_map


CASES = [
    (1.0, lambda y: 1.07 * y),
    (0.0, lambda y: y + 0.01),
    (0.0, _leaky_c(0.2)),
    (0.3, lambda y: 0.8 * y + 0.1 * math.sin(3 * y) + 0.05),
]


def _close(got, want):
    assert abs(got - want) <= 1e-12 * max(1.0, abs(want)), (got, want)


class _Builder:
    """Hand-built IR graphs: a tiny DSL over graphshape.ir."""

    def __init__(self, width=8):
        self.g = Graph({"source": "test"})
        self.width = width
        self.n = 0
        self.x = self.node("input", [], shape=(2, width), name="x")

    def node(self, op, inputs, attrs=None, params=None, shape=None, name=None):
        self.n += 1
        name = name or f"{op}{self.n}"
        shape = shape or (2, self.width)
        self.g.add(Node(name, op, [Ref(i) if isinstance(i, str) else i for i in inputs],
                        dict(attrs or {}), dict(params or {}), [TensorInfo(shape, "float32")]))
        return name

    def linear(self, x, out=None):
        out = out or self.width
        return self.node("linear", [x], {"in_features": self.width, "out_features": out},
                         {"weight": np.eye(out, self.width, dtype=np.float32)},
                         shape=(2, out))

    def act(self, x):
        return self.node("activation", [x], {"name": "relu"})

    def finish(self, x):
        self.node("output", [x], name="out")
        self.g.validate()
        return self.g


@pytest.mark.parametrize("depth", [1, 5, 30])
def test_chain_is_r_applied_depth_times(depth):
    b = _Builder()
    h = b.x
    for _ in range(depth):
        h = b.act(b.linear(h))
    h = b.linear(h)
    g = b.finish(h)
    m = subnet_max_func(g)
    assert m.subnetworks == ["network"]
    for x, r in CASES:
        want = x
        for _ in range(depth):
            want = r(want)
        _close(m(x, r), want)


def _resnet_v1_graph(blocks, branch_acts, projection_at=()):
    b = _Builder()
    h = b.act(b.linear(b.x))  # stem
    for i in range(blocks):
        y = h
        for _ in range(branch_acts):
            y = b.act(b.linear(y))
        y = b.linear(y)
        short = b.linear(h) if i in projection_at else h
        h = b.act(b.node("add", [short, y]))
    return b.finish(b.linear(h))


def _resnet_v1_hand(x, r, blocks, branch_acts, w):
    def branch(z):
        for _ in range(branch_acts):
            z = r(z)
        return z
    h = r(x)
    for _ in range(blocks):
        h = r(w * w * h + (1 - w * w) * branch(h))
    return max(h, branch(x))


@pytest.mark.parametrize("w", [0.0, 0.5, 0.8])
@pytest.mark.parametrize("branch_acts", [1, 2])
def test_residual_v1_matches_hand_derived(w, branch_acts):
    g = _resnet_v1_graph(4, branch_acts, projection_at=(0, 2))
    joins = find_joins(g)
    assert len(joins) == 4
    for j in joins:
        assert j.shortcut is not None
        assert g[j.inputs[j.shortcut].node].op in ("activation", "linear")
    m = subnet_max_func(g, shortcut_weight=w)
    # identical residual branches are evaluated once: the network and one branch
    assert len(m.programs) == 2
    for x, r in CASES:
        _close(m(x, r), _resnet_v1_hand(x, r, 4, branch_acts, w))


def test_unweighted_add_is_flagged_and_equal_weights():
    g = _resnet_v1_graph(2, 1)
    m = subnet_max_func(g)
    assert all("unweighted add" in f[0] for f in m.flags.values())
    for x, r in CASES:
        _close(m(x, r), _resnet_v1_hand(x, r, 2, 1, math.sqrt(0.5)))


def test_sum_weights_attribute_and_override():
    b = _Builder()
    h = b.act(b.linear(b.x))
    y = b.act(b.linear(h))
    s = b.node("sum", [h, b.linear(y)], {"weights": (0.6, 0.8)})
    g = b.finish(b.act(s))
    m = subnet_max_func(g)
    assert m.flags[s] == []
    for x, r in CASES:
        _close(m(x, r), max(r(0.36 * r(x) + 0.64 * r(r(x))), r(x)))
    # explicit weights, not normalized: analysed as the normalized sum they become
    m2 = subnet_max_func(g, weights={s: (1.0, 1.0)})
    assert any("unnormalized" in f for f in m2.flags[s])
    for x, r in CASES:
        _close(m2(x, r), max(r(0.5 * r(x) + 0.5 * r(r(x))), r(x)))
    with pytest.raises(GraphshapeError, match=s):
        subnet_max_func(g, weights={s: (1.0,)})


def test_concat_weights_by_channels_and_nested_branches():
    """Inception-style: three branches of different widths and depths, concatenated."""
    b = _Builder(width=8)
    h = b.act(b.linear(b.x))
    b.width = 2
    a1 = b.act(b.node("linear", [h], {}, {"weight": np.ones((2, 8))}))
    a2 = b.act(b.linear(b.act(b.node("linear", [h], {}, {"weight": np.ones((2, 8))}))))
    b.width = 4
    a3 = b.node("linear", [h], {}, {"weight": np.ones((4, 8))})  # a projection: identity map
    b.width = 8
    cat = b.node("concat", [a1, a2, a3], {"axis": 1}, shape=(2, 8))
    g = b.finish(b.act(cat))
    m = subnet_max_func(g)
    assert len(m.programs) == 3  # network, 1-activation branch, 2-activation branch
    for x, r in CASES:
        hx = r(x)
        whole = r(0.25 * r(hx) + 0.25 * r(r(hx)) + 0.5 * hx)
        _close(m(x, r), max(whole, r(x), r(r(x))))


def test_product_of_signals_and_join_at_the_inputs():
    """Two model inputs meet at a join (fork: the virtual root); a gate multiplies."""
    b = _Builder()
    x2 = b.node("input", [], name="x2")
    p = b.act(b.linear(b.x))
    q = b.act(b.act(b.linear(x2)))
    s = b.node("add", [p, q])
    gate = b.node("activation", [b.linear(s)], {"name": "sigmoid"})
    prod = b.node("mul", [s, gate])
    scaled = b.node("mul", [prod, b.node("constant", [], params={"value": np.ones(8)})])
    g = b.finish(scaled)
    m = subnet_max_func(g)
    (join,) = find_joins(g)
    assert join.fork is None
    for x, r in CASES:
        sx = 0.5 * r(x) + 0.5 * r(r(x))
        _close(m(x, r), max(sx * r(sx), r(x), r(r(x))))


def test_numpy_inputs_vectorize():
    g = _resnet_v1_graph(3, 2)
    m = subnet_max_func(g, shortcut_weight=0.5)
    xs = np.linspace(0, 1, 5)
    got = m(xs, lambda y: 0.9 * y + 0.2)
    want = [_resnet_v1_hand(x, lambda y: 0.9 * y + 0.2, 3, 2, 0.5) for x in xs]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_bad_shortcut_weight():
    g = _resnet_v1_graph(1, 1)
    with pytest.raises(GraphshapeError, match="shortcut_weight"):
        subnet_max_func(g, shortcut_weight=1.5)


# --------------------------------------------------------------------------- torchvision
torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


def _load(model, shape=(1, 3, 32, 32)):
    from graphshape.frontends.torch_fx import load_module

    return load_module(model.eval(), torch.randn(*shape))


_RESNETS = {"resnet18": ([2, 2, 2, 2], False), "resnet34": ([3, 4, 6, 3], False),
            "resnet50": ([3, 4, 6, 3], True), "resnet101": ([3, 4, 23, 3], True)}


@pytest.fixture(scope="module")
def resnet_graphs():
    return {name: _load(getattr(torchvision.models, name)()) for name in _RESNETS}


def _torchvision_resnet_hand(x, r, blocks, bottleneck, w):
    """V1: the stem's activation, then per block r(w^2 shortcut + (1-w^2) branch); the max of
    the network and one residual branch (two activations if bottleneck, else one)."""
    branch = (lambda z: r(r(z))) if bottleneck else r
    h = r(x)
    for n in blocks:
        for _ in range(n):
            h = r(w * w * h + (1 - w * w) * branch(h))
    return max(h, branch(x))


@pytest.mark.parametrize("w", [0.0, 0.5, 0.8])
@pytest.mark.parametrize("name", list(_RESNETS))
def test_torchvision_resnets(resnet_graphs, name, w):
    blocks, bottleneck = _RESNETS[name]
    g = resnet_graphs[name]
    joins = find_joins(g)
    assert len(joins) == sum(blocks)
    assert all(j.shortcut is not None for j in joins)
    m = subnet_max_func(g, shortcut_weight=w)
    for x, r in CASES:
        _close(m(x, r), _torchvision_resnet_hand(x, r, blocks, bottleneck, w))


class _PreActBlock(torch.nn.Module):
    """ResNet V2 basic block: BN-ReLU-conv-BN-ReLU-conv; the projection shortcut reads the
    pre-activated input."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.bn2 = torch.nn.BatchNorm2d(cin), torch.nn.BatchNorm2d(cout)
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.proj = (torch.nn.Conv2d(cin, cout, 1, stride, bias=False)
                     if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = torch.relu(self.bn1(x))
        shortcut = self.proj(out) if self.proj is not None else x
        out = self.conv2(torch.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class _PreActResNet(torch.nn.Module):
    def __init__(self, blocks=(2, 2, 2)):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, 1, 1)
        layers, cin = [], 8
        for i, n in enumerate(blocks):
            for j in range(n):
                cout = 8 * 2 ** i
                layers.append(_PreActBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = torch.nn.Sequential(*layers)
        self.bn = torch.nn.BatchNorm2d(cin)
        self.fc = torch.nn.Linear(cin, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.layers(self.stem(x))))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("w", [0.0, 0.5, 0.8])
def test_preactivation_resnet_v2(w):
    blocks = (2, 2, 2)
    g = _load(_PreActResNet(blocks), (1, 3, 16, 16))
    m = subnet_max_func(g, shortcut_weight=w)
    assert len(find_joins(g)) == sum(blocks)

    def hand(x, r):
        # dks's V2 form: shortcut r(x) in projection blocks (it reads the pre-activated
        # input), the branch r(r(x)); a final activation; the max with one residual branch
        h = x
        for i, n in enumerate(blocks):
            for j in range(n):
                projection = j == 0 and i > 0
                shortcut = r(h) if projection else h
                h = w * w * shortcut + (1 - w * w) * r(r(h))
        return max(r(h), r(r(x)))

    for x, r in CASES:
        _close(m(x, r), hand(x, r))


def _timm_resnetv2_hand(x, r, w):
    """timm ResNetV2-50 (pre-activation bottlenecks): no activation in the stem; the block's
    pre-activation feeds the projection (first block of each stage) and a branch of three
    activations; a final activation; the max with one residual branch."""
    h = x
    for n in (3, 4, 6, 3):
        for j in range(n):
            shortcut = r(h) if j == 0 else h
            h = w * w * shortcut + (1 - w * w) * r(r(r(h)))
    return max(r(h), r(r(r(x))))


def test_timm_resnetv2():
    timm = pytest.importorskip("timm")
    g = _load(timm.create_model("resnetv2_50", pretrained=False), (1, 3, 32, 32))
    for w in (0.0, 0.8):
        m = subnet_max_func(g, shortcut_weight=w)
        for x, r in CASES:
            _close(m(x, r), _timm_resnetv2_hand(x, r, w))


def _split_attention_hand(x, r, w, stem, blocks, branch):
    """A V1 ResNet whose blocks hold split attention (ResNeSt's radix paths, SKNet's kernel
    paths, averaged with softmax weights): ``stem`` activations, ``blocks`` blocks of
    ``branch`` activations each, a projection or identity shortcut, the activation after the
    join; the max with one residual branch. The softmax-weighted sum of the paths is the
    identity on the kernel: no product of the paths and their own attention weights."""
    h = x
    for _ in range(stem):
        h = r(h)
    for _ in range(blocks):
        b = h
        for _ in range(branch):
            b = r(b)
        h = r(w * w * h + (1 - w * w) * b)
    branch_only = x
    for _ in range(branch):
        branch_only = r(branch_only)
    return max(h, branch_only)


@pytest.mark.parametrize("name, stem, blocks, branch", [
    ("resnest14d", 3, 4, 2),  # deep stem; per block act1, then the radix paths' act0
    ("skresnet18", 1, 8, 1),  # per block the two kernel paths' activations (one in series)
])
def test_timm_split_attention(name, stem, blocks, branch):
    # before: the mul of the paths by their softmax weights was a product of two signals in
    # M (c * r(c) at every block), so TAT found eta = 0.9 out of reach for both models
    timm = pytest.importorskip("timm")
    g = _load(timm.create_model(name, pretrained=False), (1, 3, 32, 32))
    assert sum(node.op == "softmax" for node in g) == blocks
    for w in (0.0, 0.5, 0.8):
        m = subnet_max_func(g, shortcut_weight=w)
        for x, r in CASES:
            _close(m(x, r), _split_attention_hand(x, r, w, stem, blocks, branch))


def test_densenet_concatenations():
    block_config, growth, init = (3, 4), 8, 16
    model = torchvision.models.DenseNet(growth_rate=growth, block_config=block_config,
                                        num_init_features=init, bn_size=2, num_classes=10)
    g = _load(model, (1, 3, 32, 32))
    m = subnet_max_func(g)

    def dense_block(x0, c0, n_layers, r):
        feats, sizes = [x0], [c0]
        for _ in range(n_layers):
            total = sum(sizes)
            inp = sum(s / total * f for s, f in zip(sizes, feats))
            feats.append(r(r(inp)))  # BN-ReLU-conv1x1-BN-ReLU-conv3x3
            sizes.append(growth)
        total = sum(sizes)
        return sum(s / total * f for s, f in zip(sizes, feats)), total, feats[1:]

    def hand(x, r):
        h, c = r(x), init  # stem: conv-BN-ReLU-maxpool
        for i, n in enumerate(block_config):
            h, c, _ = dense_block(h, c, n, r)
            if i < len(block_config) - 1:
                h, c = r(h), c // 2  # transition: BN-ReLU-conv-avgpool
        whole = r(h)  # final BN, ReLU, pooling, classifier
        # branches: every new feature of every block, the block fed x
        branches = []
        c = init
        for i, n in enumerate(block_config):
            _, c_out, feats = dense_block(x, c, n, r)
            branches += feats
            c = c_out // 2
        return max([whole] + branches)

    for x, r in CASES:
        _close(m(x, r), hand(x, r))
