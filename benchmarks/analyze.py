"""Time predicted-only graphshape.analyze on torchvision ResNet-50 (after loading).

    python benchmarks/analyze.py [--repeats 15] [--size 224]
    python benchmarks/analyze.py --drift    # finite-width drift of the global q (docs)

Loads resnet50 (weights=None) once, then times ``analyze(graph)`` (no example inputs: two
unit-q uncorrelated examples) and ``analyze(graph, x)`` (a batch of 2 random images), median
of ``--repeats`` runs after one warm-up, torch/BLAS single-threaded. Goal: <= 50 ms. Also
prints the per-node table of the run with inputs (first rows) and the time of an empirical
analysis for reference.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rows", type=int, default=12, help="table rows to print")
    parser.add_argument("--drift", action="store_true",
                        help="instead: the random-walk drift of the measured q against the "
                             "predicted q in 30-layer TAT MLPs of width 256 and 512")
    args = parser.parse_args()
    if args.drift:
        return drift()

    import torch
    import torchvision
    from threadpoolctl import threadpool_limits

    import graphshape
    from graphshape.passes import analysis
    from graphshape.passes.analysis import analyze

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(2, 3, args.size, args.size)
    t0 = time.perf_counter()
    graph = graphshape.load(model, x)
    load_s = time.perf_counter() - t0

    results = {}
    with threadpool_limits(limits=1):
        for label, inputs in (("analyze(graph)", None), ("analyze(graph, x)", x)):
            analyze(graph, inputs)  # warm-up: local maps cache, imports
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                stats = analyze(graph, inputs)
                times.append(time.perf_counter() - t0)
            results[label] = (statistics.median(times), min(times), stats)
        # the first analysis of a freshly loaded model: load reads every conv/linear weight
        # once (per-tap norms, cached), so the analysis itself does not have to
        times, loads = [], []
        for _ in range(max(3, args.repeats // 3)):
            analysis._TAP_CACHE.clear()
            t0 = time.perf_counter()
            fresh = graphshape.load(model, x)
            loads.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            analyze(fresh, x)
            times.append(time.perf_counter() - t0)
        results["analyze(graph, x), first call after a fresh load"] = (
            statistics.median(times), min(times), None)
        # the same with the norm cache emptied after loading: the analysis reads the weights
        times = []
        for _ in range(args.repeats):
            analysis._TAP_CACHE.clear()
            t0 = time.perf_counter()
            analyze(graph, x)
            times.append(time.perf_counter() - t0)
        results["analyze(graph, x), weight norms not cached (reference)"] = (
            statistics.median(times), min(times), None)
        t0 = time.perf_counter()
        emp = analyze(graph, x, empirical=True)
        emp_s = time.perf_counter() - t0

    print(f"machine: {platform.processor() or platform.machine()}, python "
          f"{platform.python_version()}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"resnet50, input 2x3x{args.size}x{args.size}, {len(graph)} IR nodes; "
          f"load {load_s:.3f} s (first), median {statistics.median(loads):.3f} s over "
          f"{len(loads)} fresh loads (not timed below)")
    print()
    print("| call | median ms | min ms | goal |")
    print("| --- | ---: | ---: | --- |")
    for label, (med, best, _) in results.items():
        print(f"| `{label}` | {med * 1e3:.1f} | {best * 1e3:.1f} | <= 50 ms |")
    print(f"| `analyze(graph, x, empirical=True)` (reference) | {emp_s * 1e3:.0f} | | |")
    print()
    print(emp.table(max_rows=args.rows))


def drift(depth=30, widths=(256, 512), seeds=range(8), batch=4):
    """q_emp / q_pred after ``depth`` TAT leaky-ReLU layers (orthogonal init, unit-q inputs):
    predicted q is exactly 1 at every layer; the measured q of one network wanders."""
    import numpy as np
    import torch

    from graphshape.frontends.torch_fx import load_module
    from graphshape.init import suo_
    from graphshape.kernels import solve
    from graphshape.passes.analysis import analyze

    torch.set_num_threads(1)

    def chain(z, r):
        for _ in range(depth):
            z = r(z)
        return z

    params = solve(["leaky_relu"], "TAT", chain)["leaky_relu"]
    print(f"TAT leaky_relu, {depth} layers: negative_slope {params['negative_slope']:.4f}, "
          f"output_scale {params['output_scale']:.4f}")
    print()
    print("| width | seed | q_emp/q_pred at layer 10 | at layer 20 | at layer 30 | "
          "median abs(q_emp/q_local - 1) | median abs(c_pred - c_emp) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    finals = {w: [] for w in widths}
    for width in widths:
        for seed in seeds:
            torch.manual_seed(seed)
            layers = []
            for _ in range(depth):
                layers += [torch.nn.Linear(width, width, bias=False), torch.nn.LeakyReLU()]
            rng = np.random.default_rng(seed)
            v = rng.standard_normal((batch, width))
            x = torch.tensor(v / np.sqrt(np.mean(v * v, axis=1, keepdims=True)),
                             dtype=torch.float32)
            graph = load_module(torch.nn.Sequential(*layers), x)
            for node in graph:
                if node.op == "linear":
                    suo_(node.params["weight"], rng)
                elif node.op == "activation":
                    node.attrs["negative_slope"] = params["negative_slope"]
                    node.attrs["transform"] = {"output_scale": params["output_scale"]}
            stats = analyze(graph, x, empirical=True)
            acts = [r for r in stats.rows if r["op"] == "activation"]
            ratio = [r["q_emp"] / r["q_pred"] for r in acts]
            q_local = np.median([abs(r["q_emp"] / r["q_local"] - 1) for r in acts])
            c_err = np.median([abs(r["c_pred"] - r["c_emp"]) for r in stats.rows
                               if r["c_pred"] is not None and r.get("c_emp") is not None])
            finals[width].append(ratio[-1])
            print(f"| {width} | {seed} | {ratio[9]:.3f} | {ratio[19]:.3f} | {ratio[29]:.3f} | "
                  f"{q_local:.4f} | {c_err:.4f} |")
    print()
    for width, vals in finals.items():
        vals = np.array(vals)
        print(f"width {width}: q_emp/q_pred after {depth} layers: min {vals.min():.3f}, "
              f"max {vals.max():.3f}, std {vals.std():.3f} over {len(vals)} seeds")


if __name__ == "__main__":
    main()
