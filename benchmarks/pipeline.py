"""Pipeline cost: ``graphshape.shape(resnet50)`` against building ``torchvision.models.resnet50()``.

    python benchmarks/pipeline.py [--rounds 5] [--size 224] [--method DKS] [--threads N]

Both are timed in turn in each round (so that load from other processes hits them alike);
the table shows the medians and their ratio (goal: shape <= 1.5x construction).
``shape`` is timed on an already-built model: trace + ShapeProp, passes, solver,
orthogonal re-initialization of every conv/linear, emission of a new GraphModule.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings


def _load_average() -> str:
    """The 1-minute load average (other jobs on the machine skew every timing)."""
    return f"{os.getloadavg()[0]:.2f}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=224, help="side of the example input")
    parser.add_argument("--method", default="DKS")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads for both (default: torch's own, one per "
                             "core; graphshape's orthogonal draws use that many threads)")
    args = parser.parse_args(argv)

    import torch
    import torchvision

    import graphshape

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    load_before = _load_average()
    build = getattr(torchvision.models, args.model)
    x = torch.randn(1, 3, args.size, args.size)
    activation = "leaky_relu" if args.method.upper() == "TAT" else None
    model = build(weights=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graphshape.shape(model, x, method=args.method, activation=activation, seed=0)  # warm-up
    construct, shape = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        model = build(weights=None)
        construct.append(time.perf_counter() - start)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graphshape.shape(model, x, method=args.method, activation=activation, seed=0)
        shape.append(time.perf_counter() - start)
    # where the time goes: the three stages of shape(), timed separately
    from graphshape.backend_torch import emit
    from graphshape.passes.shaping import shape_graph

    stages = {"load (trace + ShapeProp + op mapping)": [], "shape_graph (passes, solver, init)": [],
              "emit (GraphModule)": []}
    for _ in range(args.rounds):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            graph = graphshape.load(model, x)
            t1 = time.perf_counter()
            shaped, _ = shape_graph(graph, method=args.method, activation=activation, seed=0)
            t2 = time.perf_counter()
            emit(shaped)
            t3 = time.perf_counter()
        for key, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2)):
            stages[key].append(v)
    c, s = statistics.median(construct), statistics.median(shape)
    print(f"{args.model}, example input 1x3x{args.size}x{args.size}, method {args.method}, "
          f"{args.rounds} rounds, {threads} thread(s), {time.strftime('%Y-%m-%d %H:%M')}, "
          f"load average {load_before} before, {_load_average()} after")
    print(f"| `torchvision.models.{args.model}()` | `graphshape.shape(model, x)` | ratio |")
    print("| ---: | ---: | ---: |")
    print(f"| {c:.3f} s | {s:.3f} s | {s / c:.2f}x |")
    per_round = statistics.median(b / a for a, b in zip(construct, shape))
    print(f"median of the per-round ratios: {per_round:.2f}x")
    print("\nstages of shape(), medians:")
    for key, v in stages.items():
        print(f"  {key:40s} {statistics.median(v):.3f} s")
    return {"construct": construct, "shape": shape, "ratio": s / c,
            "per_round_ratio": per_round, "stages": stages}


if __name__ == "__main__":
    main()
