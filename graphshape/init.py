"""Kernel-preserving weight initialization: SUO for dense layers, delta-orthogonal for convs.

* **SUO** (scaled uniform orthogonal): a Haar-uniform random (semi-)orthogonal matrix of
  shape ``(fan_out, fan_in)`` times ``max(1, sqrt(fan_out / fan_in))``. With orthonormal
  rows (fan_out <= fan_in) the output's q equals the input's in expectation; with
  orthonormal columns (fan_out > fan_in) the scale makes it exact:
  ``|W x|^2 / fan_out = |x|^2 / fan_in``.
* **delta-orthogonal** (Xiao et al. 2018) for convs with odd kernels: every tap is zero
  except the centre tap, which is an SUO matrix ``(out/groups, in/groups)`` per group, so
  each output location is an orthogonal map of the same input location. Even kernels
  have no centre: SUO over the flattened fan-in ``(out/groups, in/groups * prod(kernel))``.

Weights are in PyTorch layout: conv ``(out, in/groups, *kernel)``, conv_transpose
``(in, out/groups, *kernel)``, linear ``(out, in)``. (dks 0.1.2's PyTorch delta init reads
conv weights as ``(in, out, ...)``; that scales q by in/out at every conv whose widths
differ. This module does not.)

Speed: all matrices of one shape (the groups of a grouped conv, and every layer with the
same matrix shape) are drawn in one stacked call: float32 Gaussian Householder vectors
accumulated by ``torch.linalg.householder_product`` (Stewart's method: half the work of a
QR), factorized in float32 for float32 weights and for stacks above ``_FLOAT32_ABOVE``
entries, in float64 otherwise. That call and the Gaussian draw are most of the time
(ResNet-50: 15.4M matrix entries in 20 stacks; ``benchmarks/pipeline_breakdown.py`` prints
this floor next to the whole pass). The stacks are independent, each from its own seed taken
in a fixed order, so they are drawn (and their weights assembled) on
``torch.get_num_threads()`` threads, each running LAPACK single-threaded: the same weights
on any number of threads. The rest is kept to one cache-friendly pass per layout change
(LAPACK reads and writes column-major matrices, weights are C order) and the zeroed 3x3
kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphshape.errors import GraphshapeError
from graphshape.ops import AFFINE_LAYERS

# Stacked draws with more entries than this are factorized in float32: ~2.5x faster QR and
# half the memory, with orthogonality errors |Q^T Q - I| ~ 1e-6 (test_init checks <= 1e-5);
# smaller ones in float64 (cheap) and then cast.
_FLOAT32_ABOVE = 1_000_000


class _one_thread:
    """Run torch's linear algebra single-threaded: the stacked draws are many small/medium
    factorizations, where threads gain little and, on busy machines, lose 5-10x to
    contention (measured: 16 stacked 512x512 QRs took 5.2 s with 2 threads on a loaded
    2-core box, 0.5 s with one)."""

    def __enter__(self):
        import torch

        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self._threads)
        return False


def _thread_count(tasks: int) -> int:
    """Threads for ``tasks`` independent draws: torch's intra-op budget
    (``torch.get_num_threads()``, which users set to limit torch's threads), at most one per
    usable core and per task."""
    import os

    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores, tasks))


def _map_on_threads(fn, items) -> list:
    """``[fn(item) for item in items]``, on :func:`_thread_count` threads, each running
    torch single-threaded: the draws are independent LAPACK calls, which scale ~2x on two
    threads this way (ResNet-50's 20 stacks: 0.36 -> 0.18 s), where one call on two
    intra-op threads gains ~1.4x idle and loses badly on a busy machine (:class:`_one_thread`)."""
    import torch

    items = list(items)
    workers = _thread_count(len(items))
    with _one_thread():
        if workers == 1:
            return [fn(item) for item in items]
        from concurrent.futures import ThreadPoolExecutor

        # torch's thread settings are per thread: each worker sets its own
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads,
                                initargs=(1,)) as pool:
            return list(pool.map(fn, items))


def suo_scale(fan_out: int, fan_in: int) -> float:
    """The SUO scale ``max(1, sqrt(fan_out / fan_in))``."""
    return max(1.0, math.sqrt(fan_out / fan_in))


def _transposed(a, row_scale=None, dtype=None, strip: int = 64):
    """``a.mT`` (``a``: (batch, m, n), any strides) as a new C-contiguous (batch, n, m)
    tensor of ``dtype`` (default: ``a``'s), its columns times ``row_scale`` ((batch, m, 1):
    factors of ``a``'s rows) if given. Copied in strips of ``strip`` rows of ``a``: a plain
    transposing copy of a large matrix misses the cache on every element (measured: 27 ms
    for 3x2048x512 float32, 2.9 ms in strips of 64)."""
    import torch

    batch, m, n = a.shape
    out = torch.empty((batch, n, m), dtype=dtype or a.dtype)
    for i in range(0, m, strip):
        block = a[:, i:i + strip].mT
        if row_scale is None:
            out[:, :, i:i + strip].copy_(block)
        else:
            torch.mul(block, row_scale[:, i:i + strip].mT, out=out[:, :, i:i + strip])
    return out


def _haar_stack(batch: int, rows: int, cols: int, gen, dtype, scale: float = 1.0):
    """``batch`` Haar (semi-)orthogonal ``rows x cols`` matrices times ``scale``, as one
    C-contiguous torch tensor ``(batch, rows, cols)`` of ``dtype``, from float32 Gaussians
    drawn from ``gen`` (and factorized in ``dtype``). Call it single-threaded
    (:class:`_one_thread`)."""
    import torch

    tall, short = max(rows, cols), min(rows, cols)
    # Stewart (1980): the Householder reflectors of the QR of a Gaussian matrix are those of
    # independent Gaussian vectors of dimensions tall, tall-1, ..., so draw the vectors and
    # only accumulate Q (LAPACK orgqr), skipping the factorization (geqrf): half the work of
    # a QR, same distribution. Vector i is row i of a (short, tall) Gaussian array from
    # column i on: the column-major (tall, short) matrix LAPACK reads, drawn in place (no
    # transposing copy), with contiguous norms. float32 Gaussians whatever ``dtype``: one
    # seed gives one set of matrices in either precision, and float64 sampling costs 2x.
    v = torch.randn((batch, short, tall), generator=gen, dtype=torch.float32)
    v = (v if dtype == torch.float32 else v.to(dtype)).triu_()
    diag = torch.arange(short)
    alpha = v[:, diag, diag]  # first entry of each vector (a copy)
    sign = torch.where(alpha >= 0, 1.0, -1.0).to(dtype)
    beta = -sign * torch.linalg.vector_norm(v, dim=2)  # R's diagonal (LAPACK dlarfg)
    tau = (beta - alpha) / beta
    v /= (alpha - beta).unsqueeze(2)  # Householder vectors, scaled to v[0] = 1
    v[:, diag, diag] = 1.0
    q_t = torch.linalg.householder_product(v.mT, tau).mT  # Q^T: (batch, short, tall), C order
    del v
    # Q's columns times sign(R_kk) = -sign(alpha): the QR with a positive diagonal R, which
    # is Haar (plain LAPACK signs are a convention, not uniform); the SUO scale rides along
    col_scale = (-sign if scale == 1.0 else -sign * scale).unsqueeze(2)
    if rows < cols:  # orthonormal rows: Q^T itself
        return q_t.mul_(col_scale)
    return _transposed(q_t, col_scale)  # orthonormal columns: Q, in C order


def _seeded_stack(batch: int, rows: int, cols: int, seed: int, scale: float = 1.0,
                  float32: bool = False):
    """:func:`_haar_stack` from a torch generator seeded with ``seed``, factorized in
    float32 for stacks of more than ``_FLOAT32_ABOVE`` entries or when ``float32=True``
    (float32 weights), in float64 otherwise; the Gaussians are the same either way. Call
    it single-threaded (:class:`_one_thread`)."""
    if rows < 1 or cols < 1 or batch < 0:
        raise GraphshapeError(f"cannot draw a {rows}x{cols} orthogonal matrix")
    import torch

    big = batch * rows * cols > _FLOAT32_ABOVE
    dtype = torch.float32 if float32 or big else torch.float64
    # torch's sampler is ~2x faster than numpy's
    gen = torch.Generator().manual_seed(seed)
    return _haar_stack(batch, rows, cols, gen, dtype, scale)


def _stack_seed(rng: np.random.Generator) -> int:
    """The torch seed of the next stacked draw: one numpy seed, one sequence of draws."""
    return int(rng.integers(0, 2**63 - 1))


def _draw(batch: int, rows: int, cols: int, rng: np.random.Generator, scale: float = 1.0,
          float32: bool = False):
    """:func:`_seeded_stack` seeded from ``rng``, single-threaded."""
    seed = _stack_seed(rng)
    with _one_thread():
        return _seeded_stack(batch, rows, cols, seed, scale, float32)


def haar_semi_orthogonal(batch: int, rows: int, cols: int,
                         rng: np.random.Generator) -> np.ndarray:
    """``batch`` independent Haar-uniform (semi-)orthogonal ``rows x cols`` matrices,
    as one C-contiguous ``(batch, rows, cols)`` array: orthonormal rows when rows <= cols,
    orthonormal columns otherwise: the Q of the QR, with a positive diagonal R, of a
    Gaussian matrix, computed in one stacked call without the factorization itself (see
    the comments)."""
    return _draw(batch, rows, cols, rng).numpy()


def suo_matrices(batch: int, rows: int, cols: int, rng: np.random.Generator, *,
                 float32: bool = False) -> np.ndarray:
    """``batch`` SUO matrices ``(rows=fan_out, cols=fan_in)``, shape (batch, rows, cols).
    ``float32=True``: float32 matrices (orthonormal to ~1e-6) for float32 weights: the
    same matrices as without (to ~1e-6), factorized in float32 also for small stacks."""
    return _draw(batch, rows, cols, rng, suo_scale(rows, cols), float32).numpy()


def suo(shape, rng: np.random.Generator, dtype="float32") -> np.ndarray:
    """One SUO array of ``shape``; a shape with more than 2 dims is read as
    ``(fan_out, fan_in = prod(shape[1:]))``."""
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        raise GraphshapeError(f"SUO needs a matrix, got shape {shape}")
    rows, cols = shape[0], int(np.prod(shape[1:]))
    return suo_matrices(1, rows, cols, rng)[0].reshape(shape).astype(dtype)


def suo_(array_or_tensor, rng: np.random.Generator):
    """Fill a numpy array or torch tensor in place with SUO (see :func:`suo`); returns it."""
    shape = tuple(array_or_tensor.shape)
    if isinstance(array_or_tensor, np.ndarray):
        array_or_tensor[...] = suo(shape, rng, array_or_tensor.dtype)
        return array_or_tensor
    import torch

    with torch.no_grad():
        array_or_tensor.copy_(torch.from_numpy(suo(shape, rng, "float64")))
    return array_or_tensor


# ------------------------------------------------------------------ conv layouts
@dataclass(frozen=True)
class _ConvPlan:
    """How one conv weight is assembled from (groups) SUO matrices of one shape."""

    groups: int
    rows: int  # fan_out of one matrix
    cols: int  # fan_in of one matrix
    scheme: str  # "delta_orthogonal" | "suo_flat" | "suo_per_tap"


def _conv_plan(shape, groups: int, transpose: bool) -> _ConvPlan:
    shape = tuple(int(d) for d in shape)
    if len(shape) < 3:
        raise GraphshapeError(f"a conv weight needs 3+ dims, got shape {shape}")
    if groups < 1 or (not transpose and shape[0] % groups) or (transpose and shape[0] % groups):
        raise GraphshapeError(f"conv weight {shape} is not divisible into {groups} groups")
    kernel = shape[2:]
    if transpose:  # (in, out/groups, *k): each group maps in/groups -> out/groups
        out_g, in_g = shape[1], shape[0] // groups
    else:  # (out, in/groups, *k)
        out_g, in_g = shape[0] // groups, shape[1]
    if all(k % 2 == 1 for k in kernel):
        return _ConvPlan(groups, out_g, in_g, "delta_orthogonal")
    if transpose:
        return _ConvPlan(groups, out_g, in_g, "suo_per_tap")
    return _ConvPlan(groups, out_g, in_g * int(np.prod(kernel)), "suo_flat")


def _assemble_conv(shape, plan: _ConvPlan, mats: np.ndarray, transpose: bool,
                   stride=None, dtype=np.float64) -> np.ndarray:
    """Build the weight, of ``dtype``, from ``mats`` (groups * taps, rows, cols)."""
    shape = tuple(int(d) for d in shape)
    kernel = shape[2:]
    g = plan.groups
    if (not transpose and mats.dtype == np.dtype(dtype) and mats.flags.c_contiguous
            and (plan.scheme == "suo_flat" or all(k == 1 for k in kernel))):
        # a 1x1 conv (any groups) or a flattened even-kernel conv is its stacked matrices
        # in their memory order: reshape the stack (no new zeroed array, whose page faults
        # are most of the cost of assembling a ResNet's weights)
        return mats.reshape(shape)
    w = np.zeros(shape, dtype=dtype)
    if plan.scheme == "delta_orthogonal":
        centre = tuple(k // 2 for k in kernel)
        for gi in range(g):
            m = mats[gi]  # (out_g, in_g)
            if transpose:
                w[gi * plan.cols:(gi + 1) * plan.cols, :, *centre] = m.T
            else:
                w[gi * plan.rows:(gi + 1) * plan.rows, :, *centre] = m
    elif plan.scheme == "suo_flat":
        for gi in range(g):
            w[gi * plan.rows:(gi + 1) * plan.rows] = mats[gi].reshape(
                (plan.rows, shape[1], *kernel))
    else:  # transposed conv, even kernel: an SUO matrix per tap, scaled so that the taps
        # landing on one output location (prod(kernel/stride) of them) sum to q-preserving
        taps = int(np.prod(kernel))
        stride = tuple(stride or (1,) * len(kernel))
        overlap = max(1.0, float(np.prod([k / s for k, s in zip(kernel, stride)])))
        for gi in range(g):
            for t, idx in enumerate(np.ndindex(*kernel)):
                m = mats[gi * taps + t] / math.sqrt(overlap)
                w[gi * plan.cols:(gi + 1) * plan.cols, :, *idx] = m.T
    return w


def _n_mats(shape, plan: _ConvPlan) -> int:
    if plan.scheme == "suo_per_tap":
        return plan.groups * int(np.prod(shape[2:]))
    return plan.groups


def delta_orthogonal(shape, groups: int = 1, rng: np.random.Generator | None = None, *,
                     transpose: bool = False, stride=None, dtype="float32") -> np.ndarray:
    """A conv weight of ``shape`` (PyTorch layout) with the delta-orthogonal init: per
    group, the centre tap is an SUO ``(out/groups, in/groups)`` matrix and all other taps
    are zero. Even kernels: SUO over the flattened fan-in (conv), or an SUO matrix per tap
    scaled by ``1/sqrt(prod(kernel/stride))`` (conv_transpose, where ``stride`` matters)."""
    rng = rng if rng is not None else np.random.default_rng()
    plan = _conv_plan(shape, groups, transpose)
    mats = suo_matrices(_n_mats(shape, plan), plan.rows, plan.cols, rng)
    return _assemble_conv(shape, plan, mats, transpose, stride, np.dtype(dtype))


# ------------------------------------------------------------------ IR pass
@dataclass
class InitReport:
    """What :func:`initialize` did: one record per initialized node
    (``node``, ``op``, ``scheme``, ``weight_shape``, ``groups``, ``matrix``: the SUO
    matrix shape (fan_out, fan_in), ``scale``: the SUO scale, ``bias_zeroed``)."""

    seed: int | None
    records: list[dict[str, Any]] = field(default_factory=list)
    #: layers left as they are because their weight is a tensor they share with a place
    #: that is not re-initialized (an opaque module, a functional use): ``node``, ``tensor``
    kept_shared: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"seed": self.seed, "records": list(self.records),
                "kept_shared": list(self.kept_shared)}


def _shared_places(graph) -> dict[str, list]:
    """Source tensor name -> the ``(node, key)`` places that hold it (the frontend's
    ``meta["shared_params"]``: a weight two layers share, a module called twice)."""
    places: dict[str, list] = {}
    for node in graph:
        for key, tensor in (node.meta.get("shared_params") or {}).items():
            places.setdefault(tensor, []).append((node, key))
    return places


@dataclass
class _HeldProjection:
    """A projection weight that an opaque attention call holds (``nn.MultiheadAttention``'s
    ``in_proj_weight``, torchvision swin's ``shifted_window_attention(x, qkv_weight, ...)``),
    standing in for a linear node among :func:`initialize`'s requests: ``params`` holds the
    ``(out, in)`` weight (and its bias), ``write`` puts the new ones where the call reads
    them. The ONNX export of the same attention writes these as MatMul layers, which are
    initialized; so are these, in the same order, with the same draws."""

    name: str
    params: dict
    write: Any
    op: str = "attention"
    attrs: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


#: torchvision's swin attention functions (V1 and V2; video), and their first positional
#: parameters
_SWIN_ATTENTION_FUNCTIONS = ("torchvision.models.swin_transformer.shifted_window_attention",
                             "torchvision.models.video.swin_transformer."
                             "shifted_window_attention_3d")
_SWIN_ATTENTION_ARGS = ("input", "qkv_weight", "proj_weight", "relative_position_bias",
                        "window_size", "num_heads", "shift_size", "attention_dropout",
                        "dropout", "qkv_bias", "proj_bias")


def _attention_projections(graph, node, modules_done: dict) -> list[_HeldProjection]:
    """The projection weights attention call ``node`` holds, in the order it applies them
    (query/key/value, then output); [] for other nodes. An ``nn.MultiheadAttention`` is
    replaced on the node by a copy first (the source model's module is never written to);
    a module called at several nodes is one copy, initialized once. A constant weight that
    anything else reads stays as it is."""
    from graphshape.passes.subnetworks import is_attention_call

    if node.op != "opaque" or not is_attention_call(node):
        return []
    module = node.attrs.get("module")
    if module is not None:
        import copy as _copy

        import torch

        if not isinstance(module, torch.nn.MultiheadAttention):
            return []
        if id(module) in modules_done:
            node.attrs["module"] = modules_done[id(module)]
            return []
        source, module = module, _copy.deepcopy(module)
        modules_done[id(source)] = node.attrs["module"] = module

        def held(name, weight, bias):
            def write(params, weight=weight, bias=bias):
                with torch.no_grad():
                    weight.copy_(torch.from_numpy(params["weight"]).to(weight.dtype))
                    if bias is not None:
                        bias.copy_(torch.from_numpy(params["bias"]).to(bias.dtype))

            def array(t):  # (float64 stays float64, drawn as such; half types as float32)
                t = t.detach().cpu()
                return (t if t.dtype in (torch.float32, torch.float64) else t.float()).numpy()
            params = {"weight": array(weight)}
            if bias is not None:
                params["bias"] = array(bias)
            return _HeldProjection(f"{node.name}.{name}", params, write)

        if module.in_proj_weight is not None:
            found = [held("in_proj_weight", module.in_proj_weight, module.in_proj_bias)]
        else:  # (kdim / vdim other than embed_dim: three matrices, one bias)
            found = [held("q_proj_weight", module.q_proj_weight, module.in_proj_bias),
                     held("k_proj_weight", module.k_proj_weight, None),
                     held("v_proj_weight", module.v_proj_weight, None)]
        return found + [held("out_proj.weight", module.out_proj.weight, module.out_proj.bias)]
    if not str(node.attrs.get("description", "")).endswith(_SWIN_ATTENTION_FUNCTIONS):
        return []
    args, kwargs = node.attrs.get("args") or (), node.attrs.get("kwargs") or {}
    bound = {**dict(zip(_SWIN_ATTENTION_ARGS, args)), **kwargs}

    def own_constant(ref, ndim):
        """The constant node behind ``ref`` if only this call reads it, else None."""
        if not hasattr(ref, "node") or ref.node not in graph:
            return None
        const = graph[ref.node]
        if const.op != "constant" or len(graph.users(const.name)) != 1 \
                or const.meta.get("shared_params") or np.ndim(const.params.get("value")) != ndim:
            return None
        return const

    found = []
    for weight_key, bias_key in (("qkv_weight", "qkv_bias"), ("proj_weight", "proj_bias")):
        weight = own_constant(bound.get(weight_key), 2)
        if weight is None:
            continue
        bias = own_constant(bound.get(bias_key), 1)

        def write(params, weight=weight, bias=bias):
            weight.params["value"] = params["weight"]
            if bias is not None:
                bias.params["value"] = params["bias"]
        params = {"weight": weight.params["value"]}
        if bias is not None:
            params["bias"] = bias.params["value"]
        found.append(_HeldProjection(f"{node.name}.{weight_key}", params, write))
    return found


def initialize(graph, seed: int | None = None, *, copy: bool = True, skip=()):
    """Re-initialize every conv, conv_transpose and linear node of ``graph`` (except the
    nodes named in ``skip``), and the projections attention calls hold
    (:class:`_HeldProjection`): SUO (dense), delta-orthogonal (convs), zero biases. Returns
    ``(new_graph, InitReport)``; the input graph is not modified unless ``copy=False``. The
    same seed gives the same weights, on any number of threads (``torch.get_num_threads()``
    of them draw)."""
    rng = np.random.default_rng(seed)
    out = graph.copy() if copy else graph
    report = InitReport(seed)
    # collect requests first so that all matrices of one shape come from one QR call
    requests = []  # (node, plan or None, n_mats, rows, cols)
    skip = set(skip)
    # a weight several layers share is drawn once, for the first, and stays shared; one
    # that another kind of place also holds (an opaque module) is left as it is
    places = _shared_places(out)
    first_of: dict[str, int] = {}  # shared tensor -> index of its request
    followers = []  # (node, shared tensor)
    modules_done: dict[int, Any] = {}  # id(source attention module) -> its copy
    for node in out:
        if node.name in skip:
            continue
        for held in _attention_projections(out, node, modules_done):
            requests.append((held, None, 1, *np.shape(held.params["weight"])))
        if node.op not in AFFINE_LAYERS:
            continue
        weight = node.params.get("weight")
        if weight is None:
            raise GraphshapeError(
                "this affine node has no constant weight parameter (a weight computed at run "
                "time), so it cannot be initialized; make the weight a parameter",
                node=node.name, op=node.op)
        tied = (node.meta.get("shared_params") or {}).get("weight")
        if tied is not None:
            if not all(n.op in AFFINE_LAYERS and k == "weight" and n.name not in skip
                       for n, k in places[tied]):
                report.kept_shared.append({"node": node.name, "tensor": tied})
                continue
            if tied in first_of:
                followers.append((node, tied))
                continue
            first_of[tied] = len(requests)
        shape = tuple(np.shape(weight))
        if node.op == "linear":
            if len(shape) != 2:
                raise GraphshapeError(f"linear weight must be (out, in), got {shape}",
                                      node=node.name, op=node.op)
            requests.append((node, None, 1, shape[0], shape[1]))
        else:
            transpose = node.op == "conv_transpose"
            try:
                plan = _conv_plan(shape, int(node.attrs.get("groups", 1) or 1), transpose)
            except GraphshapeError as e:
                raise GraphshapeError(str(e), node=node.name, op=node.op) from None
            requests.append((node, plan, _n_mats(shape, plan), plan.rows, plan.cols))
    by_shape: dict[tuple[int, int], int] = {}
    wide_weights = set()  # matrix shapes with a weight wider than float32
    for node, _, n, rows, cols in requests:
        by_shape[(rows, cols)] = by_shape.get((rows, cols), 0) + n
        if np.dtype(getattr(node.params["weight"], "dtype", np.float32)).itemsize > 4:
            wide_weights.add((rows, cols))
    # one torch seed per stacked draw, taken in first-use order (as always: one numpy seed,
    # one set of weights), so that the stacks can then be drawn in any order, on any thread
    seeds = {key: _stack_seed(rng) for key in by_shape}
    offsets, taken, members = [], {key: 0 for key in by_shape}, {key: [] for key in by_shape}
    for i, (_, _, n, rows, cols) in enumerate(requests):
        offsets.append(taken[(rows, cols)])
        taken[(rows, cols)] += n
        members[(rows, cols)].append(i)

    def draw_and_assemble(key):
        """Draw the stack of one matrix shape and build the weights it feeds."""
        rows, cols = key
        # float32 weights get float32 matrices (orthonormal to ~1e-6): the float64
        # factorization of ResNet-50's stacks under _FLOAT32_ABOVE takes 1.75x as long
        mats = _seeded_stack(by_shape[key], rows, cols, seeds[key], suo_scale(rows, cols),
                             float32=key not in wide_weights).numpy()
        weights = {}
        for i in members[key]:
            node, plan, n, _, _ = requests[i]
            weight = node.params["weight"]
            dtype = getattr(weight, "dtype", np.float32)
            piece = mats[offsets[i]:offsets[i] + n]
            if plan is None:
                new = piece[0]
            else:
                new = _assemble_conv(np.shape(weight), plan, piece,
                                     node.op == "conv_transpose", node.attrs.get("stride"),
                                     dtype)
            weights[i] = np.ascontiguousarray(new, dtype=dtype)
        return weights

    # the largest stacks first, so that the threads finish together
    order = sorted(by_shape, key=lambda k: -by_shape[k] * max(k) * min(k) ** 2)
    new_weights = {}
    for weights in _map_on_threads(draw_and_assemble, order):
        new_weights.update(weights)
    for node, tied in followers:
        first = first_of[tied]
        requests.append((node, *requests[first][1:]))
        new_weights[len(requests) - 1] = new_weights[first]  # the same array: one tensor
    zero_biases: dict[str, np.ndarray] = {}  # shared bias tensor -> its one zero array
    for i, (node, plan, n, rows, cols) in enumerate(requests):
        old_shape = list(np.shape(node.params["weight"]))
        node.params["weight"] = new_weights[i]
        # scales an earlier fold left on the layer (re-shaping a shaped model) belonged to
        # the old weights
        node.attrs.pop("weight_scale", None)
        node.attrs.pop("bias_scale", None)
        bias_zeroed = node.params.get("bias") is not None
        if bias_zeroed:
            zeros = np.zeros_like(node.params["bias"])
            tied = (node.meta.get("shared_params") or {}).get("bias")
            node.params["bias"] = zeros if tied is None else zero_biases.setdefault(tied, zeros)
        if isinstance(node, _HeldProjection):
            node.write(node.params)
        scheme, groups = ("suo", 1) if plan is None else (plan.scheme, plan.groups)
        report.records.append({
            "node": node.name, "op": node.op, "scheme": scheme,
            "weight_shape": old_shape, "groups": groups,
            "matrix": [rows, cols], "scale": suo_scale(rows, cols),
            "bias_zeroed": bias_zeroed})
    return out, report
