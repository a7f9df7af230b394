"""Where `graphshape.shape(torchvision.models.resnet50(), x)` spends its time, stage by stage.

    python benchmarks/pipeline_breakdown.py [--repeats 5] [--size 224] [--method DKS]

Single-threaded torch; median over ``--repeats`` of each stage, run in pipeline order:
construct (``torchvision.models.resnet50()``, the reference), load (fx trace + ShapeProp +
mapping + weight norms), passes + solve (``shape_graph(initialize=False)``), init
(delta-orthogonal / SUO, ``graphshape.init.initialize``), emit (``to_torch``, weights handed
over without a copy as the shaping API does), and the whole ``graphshape.shape`` call.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--method", default="DKS")
    parser.add_argument("--activation", default="relu")
    args = parser.parse_args()

    import torch
    import torchvision

    import graphshape
    from graphshape.backend_torch import emit
    from graphshape.init import initialize
    from graphshape.passes.shaping import shape_graph

    torch.set_num_threads(1)
    x = torch.randn(1, 3, args.size, args.size)
    stages = {k: [] for k in ("construct", "load", "passes + solve", "init", "emit",
                              "graphshape.shape (total)")}
    options = dict(method=args.method, activation=args.activation, seed=0)
    graphshape.shape(torchvision.models.resnet50(), x, **options)  # warm-up: imports, caches
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        model = torchvision.models.resnet50()
        t1 = time.perf_counter()
        graph = graphshape.load(model, x)
        t2 = time.perf_counter()
        shaped, _ = shape_graph(graph, method=args.method, activation=args.activation,
                                initialize=False)
        t3 = time.perf_counter()
        shaped, _ = initialize(shaped, 0, copy=False)
        t4 = time.perf_counter()
        emit(shaped, copy_params=False)
        t5 = time.perf_counter()
        graphshape.shape(model, x, **options)
        t6 = time.perf_counter()
        for key, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
            stages[key].append(dt)
    construct = statistics.median(stages["construct"])
    print(f"resnet50, input 1x3x{args.size}x{args.size}, {args.method} {args.activation}, "
          f"torch {torch.__version__}, 1 thread, median of {args.repeats}")
    print("| stage | median s | / construct |")
    print("| --- | ---: | ---: |")
    for key, times in stages.items():
        med = statistics.median(times)
        print(f"| {key} | {med:.3f} | {med / construct:.2f}x |")


if __name__ == "__main__":
    main()
