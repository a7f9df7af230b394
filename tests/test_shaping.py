"""Shaping torchvision ResNets end to end: parameters against dks 0.1.2, shaped models.

The parameter tests compare what graphshape solves on the traced model (its subnetworks
derived from the graph) with what dks 0.1.2 solves from the hand-derived subnetwork
maximizing function of each ResNet, recorded once in tests/data/dks_resnet_reference.json
by tests/data/make_dks_resnet_reference.py (dks is never called here).
"""

import functools
import importlib.util
import json
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import graphshape  # noqa: E402
from graphshape import GraphshapeError  # noqa: E402
from graphshape.passes.normalize import NORM_OPS  # noqa: E402
from graphshape.passes.shaping import shape_graph  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data")
REFERENCE = json.load(open(os.path.join(DATA, "dks_resnet_reference.json")))
_spec = importlib.util.spec_from_file_location(
    "make_dks_resnet_reference", os.path.join(DATA, "make_dks_resnet_reference.py"))
make_ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_ref)

TINY = (1, 3, 32, 32)


@functools.lru_cache(maxsize=None)
def traced(arch: str):
    from graphshape.frontends.torch_fx import load_module

    torch.manual_seed(0)
    return load_module(getattr(torchvision.models, arch)(weights=None), torch.zeros(TINY))


def _case_id(case):
    return (f"{case['structure']}-{case['arch']}-w{case['shortcut_weight']}-{case['method']}-"
            f"{case['activation']}")


def _relu_conditions(params, s_star):
    """Q(1) - 1, C(0) and C'(1) - s* of the transformed relu, in closed form."""
    from scipy.stats import norm

    a, b = params["input_scale"], params["input_shift"]
    d, g = params["output_shift"], params["output_scale"]
    m = b / a  # relu(a z + b) = a relu(z + m), a > 0
    e1 = a * (m * norm.cdf(m) + norm.pdf(m))
    e2 = a * a * ((m * m + 1) * norm.cdf(m) + m * norm.pdf(m))
    q1 = g * g * (e2 + 2 * d * e1 + d * d)
    return q1 - 1, g * g * (e1 + d) ** 2 / q1, g * g * a * a * norm.cdf(m) / q1 - s_star


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=_case_id)
def test_resnet_parameters_match_dks(case):
    arch, w = case["arch"], case["shortcut_weight"]
    kwargs = dict(method=case["method"], activation=case["activation"], shortcut_weight=w,
                  preactivation_shortcuts=case["structure"] == "preactivation",
                  initialize=False)
    if "error" in case:  # dks finds no parameters: neither may graphshape
        with pytest.raises(GraphshapeError, match="eta"):
            shape_graph(traced(arch), **kwargs)
        return
    shaped, report = shape_graph(traced(arch), **kwargs)
    got = report.activation_params[case["activation"]]
    assert set(got) == set(case["params"])
    if case["method"] == "DKS" and case["activation"] == "relu":
        # dks integrates relu with a fixed Gauss-Legendre grid that does not split at the
        # kink, which leaves its C'(1) condition off by ~7e-6 (so its parameters by ~1e-4);
        # graphshape's closed-form expectations meet all three conditions to ~1e-12.
        assert got == pytest.approx(case["params"], rel=3e-4)
        blocks, bottleneck = make_ref.RESNETS[arch]
        from scipy.optimize import brentq

        s_star = brentq(lambda s: make_ref.STRUCTURES[case["structure"]](
            1.0, lambda y: s * y, blocks, bottleneck, w) - 1.5, 1.0, 2.0, xtol=1e-15)
        assert np.abs(_relu_conditions(got, s_star)).max() < 1e-10
    else:
        assert got == pytest.approx(case["params"], rel=1e-5, abs=1e-9)
    assert not any(n.op in NORM_OPS for n in shaped)


def test_reference_covers_the_issue_matrix():
    """4 ResNets x 3 shortcut weights x 6 (method, activation) pairs as torchvision builds
    them ("v1"), the same with pre-activation shortcuts (TAT's default structure; w > 0
    only), and the one case, in each structure, where dks finds no parameters."""
    cases = REFERENCE["cases"]
    assert [c["structure"] for c in cases].count("v1") == 72
    assert [c["structure"] for c in cases].count("preactivation") == 48
    for structure in ("v1", "preactivation"):
        assert [(c["arch"], c["shortcut_weight"], c["method"], c["activation"])
                for c in cases if "error" in c and c["structure"] == structure] == [
            ("resnet18", 0.8, "TAT", "leaky_relu")]


@pytest.mark.parametrize("structure", ["v1", "preactivation"])
def test_unreachable_eta_names_what_is_reachable(structure):
    """The message gives C_f(0) at negative_slope = 0 (relu's arc-cosine C map through the
    hand-derived subnetwork function): 0.893 as torchvision builds resnet18, 0.828 with the
    pre-activation shortcuts TAT uses by default."""
    def relu_c_map(c):
        c = min(max(c, -1.0), 1.0)
        return (math.sqrt(1.0 - c * c) + (math.pi - math.acos(c)) * c) / math.pi

    blocks, bottleneck = make_ref.RESNETS["resnet18"]
    c_f0 = make_ref.STRUCTURES[structure](0.0, relu_c_map, blocks, bottleneck, 0.8)
    with pytest.raises(GraphshapeError) as info:
        graphshape.shape(torchvision.models.resnet18(weights=None), torch.zeros(TINY),
                         method="TAT", activation="leaky_relu", shortcut_weight=0.8,
                         preactivation_shortcuts=structure == "preactivation")
    msg = str(info.value)
    assert f"{c_f0:.3f}" in msg and "eta" in msg, (c_f0, msg)


# ------------------------------------------------------------------ shaped models
def _constant_per_location(n, channels, size, seed=0):
    """n examples, each constant across spatial locations, with q = 1 per location."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(n, channels, generator=gen)
    v = v / v.pow(2).mean(dim=1, keepdim=True).sqrt()
    return v[:, :, None, None].expand(n, channels, size, size).contiguous()


def _activation_input_q(gm, x):
    """q at the input of every activation (transformed, or folded into a plain
    (leaky) ReLU), in execution order."""
    from graphshape.torch_modules import TransformedActivation

    kinds = (TransformedActivation, torch.nn.ReLU, torch.nn.LeakyReLU)
    qs = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: qs.append(
        args[0].detach().double().pow(2).mean().item()))
        for m in gm.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            gm(x)
    finally:
        for h in hooks:
            h.remove()
    return np.array(qs)


@pytest.mark.parametrize("arch,method,activation,w,check_c", [
    ("resnet18", "TAT", "leaky_relu", 0.0, True),
    ("resnet18", "TAT", "leaky_relu", 0.5, True),
    ("resnet18", "TAT", "softplus", 0.0, True),
    ("resnet50", "DKS", "softplus", 0.8, False),
])
def test_shaped_resnet_runs_and_meets_the_kernel_bounds(arch, method, activation, w, check_c):
    """No norm left; forward and backward run; on constant-per-location inputs (where the
    kernel theory is exact up to finite width: delta-orthogonal convs see only the centre
    tap, so padding and pooling keep every location the same) the analysis issue's bounds
    hold: median |q_local / q_emp - 1| <= 8%, and for TAT median |c_pred - c_emp| <= 0.03
    on average over three initializations, worst <= 0.15 (measured for DKS ResNet-50 at
    w=0.8: median 0.040, worst 0.18 -- DKS networks are more nonlinear, c is harder to
    predict at width 64)."""
    from graphshape.backend_torch import emit
    from graphshape.passes.analysis import analyze

    shaped, report = shape_graph(traced(arch), method=method, activation=activation,
                                 shortcut_weight=w, seed=0)
    assert not any(n.op in NORM_OPS for n in shaped)
    n_bn = sum(1 for n in traced(arch) if n.op == "batch_norm")
    assert sum(r["op"] == "batch_norm" for r in report.removed) == n_bn > 0
    json.dumps(report.to_dict())  # JSON-able
    gm = emit(shaped)
    assert not [m for m in gm.modules() if isinstance(
        m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm))]

    # forward and backward
    out = gm(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in gm.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0

    x = _constant_per_location(4, 3, 32)
    c_medians = []
    for seed in range(3 if check_c else 1):
        # c at width 64 with 4 examples depends on the draw: one network's median error
        # ranged 0.008-0.047 and its worst 0.03-0.12 over 8 seeds (resnet18, TAT, w 0 and
        # 0.5), with a mean median of 0.021; so bound the mean over three networks
        net_graph = shaped if seed == 0 else shape_graph(
            traced(arch), method=method, activation=activation, shortcut_weight=w,
            seed=seed)[0]
        with torch.no_grad():
            stats = analyze(net_graph, x, empirical=True, module=gm if seed == 0 else None)
        q_err = np.array([abs(r["q_local"] / r["q_emp"] - 1) for r in stats.rows
                          if r.get("q_local") is not None and r.get("q_emp")])
        assert len(q_err) > 20 and np.median(q_err) <= 0.08, (seed, np.median(q_err))
        if check_c:
            c_err = np.array([abs(r["c_pred"] - r["c_emp"]) for r in stats.rows
                              if r.get("c_pred") is not None and r.get("c_emp") is not None])
            assert c_err.max() <= 0.15, (seed, c_err.max())
            c_medians.append(np.median(c_err))
    if check_c:
        assert np.mean(c_medians) <= 0.03, c_medians
    if w == 0.0:
        # without skips every activation follows a conv and the predicted q is 1 at every
        # activation input; the measured q of one width-64 network drifts like a random walk
        # (docs/analysis.md; 4 examples here), so bound the drift per network and require
        # no systematic gain over four initializations (measured: per-seed mean log q
        # -0.12 +- 0.33 over 32 seeds, with max |log q| up to ~0.55)
        log_q = []
        for seed in range(4):
            net = gm if seed == 0 else emit(shape_graph(
                traced(arch), method=method, activation=activation, shortcut_weight=w,
                seed=seed)[0])
            q = _activation_input_q(net, x)
            assert len(q) == sum(1 for n in shaped if n.op == "activation")
            assert np.max(np.abs(np.log(q))) < 0.8, (seed, q)
            log_q.append(np.log(q))
        assert abs(np.mean(log_q)) < 0.35, np.mean(log_q, axis=1)


def test_default_tat_turns_relu_into_trelu_and_untransformed_only_restructures():
    """All defaults work on resnet18 (the default shortcut weight is the largest for which
    TAT's default eta is reachable on every torchvision ResNet)."""
    from graphshape.passes.shaping import DEFAULT_SHORTCUT_WEIGHT

    model = torchvision.models.resnet18(weights=None)
    gm = graphshape.shape(model, torch.zeros(TINY), seed=1)
    report = gm.meta["graphshape"]
    assert report.options["shortcut_weight"] == DEFAULT_SHORTCUT_WEIGHT
    assert report.method == "TAT" and set(report.activation_params) == {"leaky_relu"}
    with pytest.raises(GraphshapeError, match="eta"):  # 0.05 more is too much for resnet18
        shape_graph(traced("resnet18"), activation="leaky_relu",
                    shortcut_weight=DEFAULT_SHORTCUT_WEIGHT + 0.05, initialize=False)
    assert any("leaky_relu" in warning for warning in report.warnings)
    plain = graphshape.shape(model, torch.zeros(TINY), method="untransformed",
                             shortcut_weight=0.0, seed=1)
    rep = plain.meta["graphshape"]
    assert rep.activation_params == {} and rep.method == "untransformed"
    assert "add" not in {r["op"] for r in rep.rewritten}  # w = 0: skips removed, not rewritten
    assert sum(r["op"] == "add" for r in rep.removed) == 8  # the 8 residual adds
    assert sum(r["op"] == "conv" for r in rep.removed) == 3  # the 3 projection shortcuts
    x = torch.randn(2, 3, 32, 32)
    assert torch.isfinite(plain(x)).all()


def test_seed_determinism_and_source_untouched():
    model = torchvision.models.resnet18(weights=None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = graphshape.shape(model, torch.zeros(TINY), shortcut_weight=0.5, seed=3)
    b = graphshape.shape(model, torch.zeros(TINY), shortcut_weight=0.5, seed=3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    # no memory shared with the source (the shaping API hands the shaped graph's arrays to
    # the module without a copy) nor between the two results
    source_ptrs = {v.data_ptr() for v in model.state_dict().values() if v.numel()}
    a_ptrs = {v.data_ptr() for v in a.state_dict().values() if v.numel()}
    b_ptrs = {v.data_ptr() for v in b.state_dict().values() if v.numel()}
    assert not (a_ptrs & source_ptrs) and not (a_ptrs & b_ptrs)
    with torch.no_grad():
        for p in a.parameters():
            p.mul_(2.0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_pln_makes_every_input_location_q_one():
    model = torchvision.models.resnet18(weights=None)
    gm = graphshape.shape(model, torch.zeros(TINY), shortcut_weight=0.5, pln=True, seed=0)
    seen = []
    h = gm.conv1.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    gm(torch.randn(2, 3, 32, 32) * 5 + 2)
    h.remove()
    q = seen[0].pow(2).mean(dim=1)
    torch.testing.assert_close(q, torch.ones_like(q), rtol=1e-4, atol=1e-4)


class _FunctionalBatchNormNet(torch.nn.Module):
    """conv -> F.batch_norm (as timm's BatchNormAct2d traces) -> relu, twice, with a skip."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        for i in (1, 2):
            self.register_buffer(f"mean{i}", torch.zeros(c))
            self.register_buffer(f"var{i}", torch.ones(c))
            self.register_parameter(f"gamma{i}", torch.nn.Parameter(torch.ones(c)))
            self.register_parameter(f"beta{i}", torch.nn.Parameter(torch.zeros(c)))

    def forward(self, x):
        F = torch.nn.functional
        torch._assert(x.ndim == 4, "expected NCHW")  # as timm does: dead code after shaping
        h = F.relu(F.batch_norm(self.conv1(x), self.mean1, self.var1, self.gamma1, self.beta1))
        y = F.batch_norm(self.conv2(h), self.mean2, self.var2, self.gamma2, self.beta2)
        return F.relu(y + h)


def test_functional_batch_norm_calls_are_removed():
    gm = graphshape.shape(_FunctionalBatchNormNet(), torch.zeros(1, 3, 8, 8), method="DKS",
                          activation="softplus", shortcut_weight=0.5, seed=0)
    report = gm.meta["graphshape"]
    # removed whether the frontend maps F.batch_norm to batch_norm or leaves it opaque
    assert sum(r["what"].startswith("normalization") for r in report.removed) == 2
    assert not [n for n in gm.graph.nodes if "batch_norm" in str(n.target)]
    assert {r["node"] for r in report.rewritten if "zero bias" in r["what"]} >= {"conv1", "conv2"}
    out = gm(torch.randn(2, 3, 8, 8))
    assert torch.isfinite(out).all()


class _ScaledNet(torch.nn.Module):
    """A conv net with parameters that shaping keeps (a per-channel gain, a constant
    buffer) next to the ones it replaces."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.gain = torch.nn.Parameter(torch.full((1, 8, 1, 1), 1.0))
        self.register_buffer("offset", torch.zeros(1, 8, 1, 1))
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)) * self.gain + self.offset)


def test_shape_graph_in_place_shares_no_array_with_its_input():
    """shape() lets shape_graph work on the loaded IR itself (copy=False, no deep copy);
    the arrays it keeps (gain, offset) are still copied, so the shaped model shares no
    memory with the source, and the loaded graph's arrays are left as they were."""
    from graphshape.passes.shaping import shape_graph

    model = _ScaledNet()
    graph = graphshape.load(model, torch.zeros(1, 3, 8, 8))
    inputs = {id(v): v for n in graph for v in n.params.values() if isinstance(v, np.ndarray)}
    values = {k: v.copy() for k, v in inputs.items()}
    shaped, _ = shape_graph(graph, method="DKS", seed=0, copy=False)
    for node in shaped:
        for value in node.params.values():
            if isinstance(value, np.ndarray):
                assert not any(np.shares_memory(value, v) for v in inputs.values()), node.name
    assert all(np.array_equal(v, values[k]) for k, v in inputs.items())
    gm = graphshape.shape(model, torch.zeros(1, 3, 8, 8), method="DKS", seed=0)
    source = {v.data_ptr() for v in model.state_dict().values()}
    assert source.isdisjoint(v.data_ptr() for v in gm.state_dict().values())
    assert any(torch.equal(v, model.gain.detach()) for v in gm.state_dict().values())
    with torch.no_grad():
        for v in gm.state_dict().values():
            v.add_(1.0)
    assert torch.equal(model.gain.detach(), torch.ones(1, 8, 1, 1))
    assert torch.equal(model.offset, torch.zeros(1, 8, 1, 1))


class _DualPath(torch.nn.Module):
    """DPN's block, small: the input normalized twice (two BN + ReLU), a projection and a
    residual path, an add and a concat of the two outputs' halves."""

    def __init__(self, c=8, shared=False):
        super().__init__()
        self.shared = shared
        self.bn_w, self.bn_a = torch.nn.BatchNorm2d(c), torch.nn.BatchNorm2d(c)
        self.proj = torch.nn.Conv2d(c, 2 * c, 1)
        self.a = torch.nn.Conv2d(c, c, 3, padding=1)
        self.b = torch.nn.Sequential(torch.nn.BatchNorm2d(c), torch.nn.ReLU(),
                                     torch.nn.Conv2d(c, 2 * c, 1))

    def forward(self, x):
        w = torch.relu(self.bn_w(x))
        a = w if self.shared else torch.relu(self.bn_a(x))
        p, r = self.proj(w), self.b(self.a(a))
        return torch.cat([p[:, :8] + r[:, :8], p[:, 8:], r[:, 8:]], 1)


def _dual_path_net(shared):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), _DualPath(shared=shared),
                               torch.nn.Conv2d(24, 8, 1), _DualPath(shared=shared),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(24, 4)).eval()


@pytest.mark.parametrize("method", ["DKS", "TAT"])
def test_activations_made_equal_by_removing_norms_are_merged(tmp_path, method):
    # once both BNs are gone, the two ReLUs read the same value: one activation, so the
    # maximizing function is that of the network with a shared BN + ReLU (what torch's
    # dynamo exporter writes for an untrained DPN). Before, dpn68 solved TAT slope 0.3175
    # from PyTorch and 0.329 from that export.
    x = torch.randn(2, 3, 8, 8)
    options = {"method": method, "seed": 0, "eta": 0.5}  # a small net: eta 0.9 is out of reach
    want = graphshape.shape(_dual_path_net(True), x, **options).meta["graphshape"]
    shaped = graphshape.shape(_dual_path_net(False), x, **options)
    report = shaped.meta["graphshape"]
    merged = [r for r in report.removed if "duplicate of" in r["what"]]
    assert len(merged) == 2 and all(r["op"] == "activation" for r in merged)
    assert report.activation_params == want.activation_params
    acts = sum(isinstance(m, (torch.nn.ReLU, torch.nn.LeakyReLU)) or "Activation" in
               type(m).__name__ for m in shaped.modules())
    assert acts == 4  # per block: the shared one and the residual path's
    assert torch.isfinite(shaped(x)).all()


def _discriminator(link: bool, depth: int = 12):
    """A DCGAN-style discriminator: conv + BN + LeakyReLU(0.2), then a 1-channel conv and
    (``link``) the sigmoid that makes it a probability."""
    nn = torch.nn
    layers = [nn.Conv2d(3, 8, 3, padding=1)]
    for _ in range(depth):
        layers += [nn.BatchNorm2d(8), nn.LeakyReLU(0.2), nn.Conv2d(8, 8, 3, padding=1)]
    layers += [nn.LeakyReLU(0.2), nn.Conv2d(8, 1, 8), nn.Flatten()]
    return nn.Sequential(*layers, *([nn.Sigmoid(), nn.Flatten(0)] if link else []))


@pytest.mark.parametrize("method", ["DKS", "TAT"])
def test_a_final_bounded_activation_is_left_as_the_output_link(method):
    # A transformed sigmoid is no probability: before, DKS transformed it (a DCGAN
    # discriminator's outputs then fell in [-2.0, 0.7]), and TAT refused such networks
    # ("leaky_relu needs to be the only activation").
    x = torch.randn(6, 3, 8, 8)
    torch.manual_seed(0)
    shaped = graphshape.shape(_discriminator(link=True), x, method=method, seed=0)
    torch.manual_seed(0)
    logits = graphshape.shape(_discriminator(link=False), x, method=method, seed=0)
    report = shaped.meta["graphshape"]
    assert set(report.activation_params) == {"leaky_relu"}
    # the same maximizing function as the network without its sigmoid, and the same logits
    assert report.activation_params == logits.meta["graphshape"].activation_params
    assert any("output activation(s) left as they are" in w and "sigmoid" in w
               for w in report.warnings)
    torch.testing.assert_close(shaped(x), torch.sigmoid(logits(x)).reshape(-1))
    y = shaped(x)
    assert y.shape == (6,) and bool(((y > 0) & (y < 1)).all())


def test_a_bounded_activation_a_layer_reads_is_no_output_link():
    from graphshape.passes.subnetworks import find_output_links

    nn = torch.nn
    hidden = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    final = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh())
    x = torch.randn(3, 4)
    assert find_output_links(graphshape.load(hidden, x)) == []
    assert find_output_links(graphshape.load(final, x)) == ["_3"]


class _Embedder(torch.nn.Module):
    """conv + BN + ReLU stack, pooled, projected, and L2-normalized (``final``) as metric
    learning and CLIP-style heads do; or normalized mid-network (``final=False``)."""

    def __init__(self, final: bool):
        super().__init__()
        nn = torch.nn
        layers = [nn.Conv2d(3, 16, 3, padding=1)]
        for _ in range(8):
            layers += [nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)]
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.proj, self.head = nn.Linear(16, 8), nn.Linear(8, 8)
        self.final = final

    def forward(self, x):
        z = torch.nn.functional.normalize(self.proj(self.body(x)), dim=1)
        return z if self.final else self.head(z)


def test_a_final_l2_normalization_is_kept_as_part_of_the_output():
    x = torch.randn(4, 3, 12, 12)
    shaped = graphshape.shape(_Embedder(final=True), x, method="DKS", seed=0)
    report = shaped.meta["graphshape"]
    assert any("ends the network: kept" in w for w in report.warnings)
    assert not any("without a kernel rule" in w for w in report.warnings)
    torch.testing.assert_close(shaped(x).norm(dim=1), torch.ones(4))
    # mid-network, it is a normalization graphshape cannot remove: refused, named
    with pytest.raises(GraphshapeError, match="cannot remove it") as err:
        graphshape.shape(_Embedder(final=False), x, method="DKS")
    assert err.value.node == "normalize"


def test_an_opaque_layer_with_weights_is_named_even_when_it_ends_the_network():
    """A parametrized last layer (orthogonal, not a norm graphshape reads) stays an opaque
    call: the report says shaping left its weights as they are. Before, an opaque node that
    ends the network went unmentioned, as if it only shaped the output."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 4))
    parametrizations.orthogonal(model[5])
    warnings = graphshape.shape(model.eval(), torch.randn(2, 3, 8, 8),
                                method="DKS").meta["graphshape"].warnings
    opaque = [w for w in warnings if "opaque node" in w]
    assert len(opaque) == 1 and "ParametrizedLinear" in opaque[0]
    assert "hold weights" in opaque[0] and "remove_parametrizations" in opaque[0]
