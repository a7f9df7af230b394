"""Time graphshape.analyze as the batch grows: the per-pair work of the analysis.

    python benchmarks/analysis_batch.py [--batches 16,64,256] [--reference-max-batch 16]

``analyze(model, x)`` predicts a q per example and a c per pair of examples at every node:
B examples make B (B - 1) / 2 pairs. Each activation maps every pair through its C map, a
2-D Gaussian integral. graphshape computes one Hermite expansion per example and sums
Mehler's series per pair (:func:`graphshape.gaussian.expect2_same`), falling back to the
2-D quadrature only for the pairs where the series' truncation is not provably below 1e-10
(kinked activations at c near 1; ELU and SELU then take a closed-form inner integral); and
``empirical=True`` measures every pair of a node's output with one matrix product
(:func:`graphshape.passes.analysis.kernel_of`).

The ``reference`` column runs the same analysis with those two replaced, in this process,
by the methods they replaced: a 2-D quadrature for every pair (``gaussian.expect2``, with
ELU's inner integral by quadrature too) and a pair-by-pair loop for the measured kernels.
It is slow (minutes at batch 64), so it runs only up to ``--reference-max-batch``.

Models: 4-layer MLPs (width 64, PyTorch's default init) with GELU, tanh, ELU and ReLU6; a
20-layer ELU MLP, whose correlations all reach c > 0.997 (the case the series leaves to the
quadrature); and torchvision's resnet18 on 64x64 images with ``empirical=True`` (ReLU's C
map is closed-form: this row times the measured kernels). Single-threaded (torch and BLAS).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time


def _models():
    import torch
    import torchvision
    from torch import nn

    def mlp(act, depth):
        torch.manual_seed(0)
        layers = [m for _ in range(depth) for m in (nn.Linear(64, 64), act())]
        return nn.Sequential(*layers, nn.Linear(64, 10)).eval()

    def vec(b):
        return torch.randn(b, 64, generator=torch.Generator().manual_seed(b))

    def img(b):
        return torch.randn(b, 3, 64, 64, generator=torch.Generator().manual_seed(b))

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None).eval()
    return [("MLP-4 GELU", mlp(nn.GELU, 4), vec, False),
            ("MLP-4 tanh", mlp(nn.Tanh, 4), vec, False),
            ("MLP-4 ELU", mlp(nn.ELU, 4), vec, False),
            ("MLP-4 ReLU6", mlp(nn.ReLU6, 4), vec, False),
            ("MLP-20 ELU (c -> 1)", mlp(nn.ELU, 20), vec, False),
            ("resnet18 64px, empirical", resnet, img, True)]


@contextlib.contextmanager
def _reference_methods():
    """The analysis with the per-pair methods the current ones replaced."""
    import numpy as np

    from graphshape import gaussian
    from graphshape.passes import analysis

    def expect2_pairwise(f, c, scale_1, scale_2, kinks=(), soft=(), pieces=None):
        # exponential pieces (elu, selu) came with the series: integrate those numerically
        polynomial = pieces is not None and all(len(r) == 5 or r[5] == 0.0 for r in pieces)
        return gaussian.expect2(f, f, c, kinks, kinks, soft, soft, scale_1, scale_2,
                                pieces_g=pieces if polynomial else None)

    def kernel_of_pairwise(x):
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 1:
            x = x[:, None]
        b, f = x.shape[0], x.shape[1]
        flat = x.reshape(b, f, -1)
        q_loc = np.einsum("bfl,bfl->bl", flat, flat) / f
        q = q_loc.mean(axis=1)
        c = np.eye(b)
        with np.errstate(divide="ignore", invalid="ignore"):
            for i, j in zip(*np.triu_indices(b, 1)):
                dot = np.einsum("fl,fl->l", flat[i], flat[j]) / f
                scale = np.sqrt(q_loc[i] * q_loc[j])
                c[i, j] = c[j, i] = float(np.mean(np.where(scale > 0, dot / np.where(
                    scale > 0, scale, 1.0), 0.0)))
        return analysis.Kernel(q=q, cov=c * np.sqrt(np.outer(q, q)))

    saved = gaussian.expect2_same, analysis.kernel_of
    gaussian.expect2_same, analysis.kernel_of = expect2_pairwise, kernel_of_pairwise
    analysis._LM_CACHE.clear()
    try:
        yield
    finally:
        gaussian.expect2_same, analysis.kernel_of = saved
        analysis._LM_CACHE.clear()


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _time(graph, x, empirical):
    import graphshape
    from graphshape.passes import analysis

    analysis._LM_CACHE.clear()  # every run builds its local maps, as a fresh process does
    t0 = time.perf_counter()
    graphshape.analyze(graph, x, empirical=empirical)  # (empirical: emits and runs the graph)
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="16,64,256")
    parser.add_argument("--reference-max-batch", type=int, default=16,
                        help="largest batch the (slow) reference runs at")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    import torch
    from threadpoolctl import threadpool_limits

    import graphshape

    torch.set_num_threads(1)
    print(f"machine: {_cpu()}, {platform.platform()}; "
          f"torch {torch.__version__}; one thread")
    print(f"{'model':26s} {'batch':>5s} {'pairs':>6s} {'analyze s':>10s} {'reference s':>12s} "
          f"{'speed-up':>9s}")
    with threadpool_limits(limits=1):
        graphshape.analyze(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU()),
                           torch.randn(3, 4))  # imports, off the clock
        for label, model, make_x, empirical in _models():
            for b in batches:
                x = make_x(b)
                graph = graphshape.load(model, x)
                now = _time(graph, x, empirical)
                ref = ratio = ""
                if b <= args.reference_max_batch:
                    with _reference_methods():
                        ref_s = _time(graph, x, empirical)
                    ref, ratio = f"{ref_s:.2f}", f"{ref_s / now:.1f}x"
                print(f"{label:26s} {b:5d} {b * (b - 1) // 2:6d} {now:10.2f} {ref:>12s} "
                      f"{ratio:>9s}", flush=True)


if __name__ == "__main__":
    main()
