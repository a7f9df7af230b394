"""Where `graphshape.shape(torchvision.models.resnet50(), x)` spends its time, stage by stage.

    python benchmarks/pipeline_breakdown.py [--repeats 5] [--size 224] [--method DKS] [--threads 1]

Single-threaded torch unless ``--threads`` says otherwise. Each round builds
``torchvision.models.resnet50()`` (the reference) and runs one real ``graphshape.shape``
call whose stages are timed from inside, by wrapping
the functions it calls: load (fx trace + shape propagation + op mapping), passes + solve
(``shape_graph`` without its init pass), init (delta-orthogonal / SUO,
``graphshape.init.initialize``), emit (``backend_torch.emit``); "other" is the rest of the
call (option and model checks). Medians over ``--repeats`` rounds, after one warm-up.

Then the floor of the init stage, timed in turn with ``initialize`` in each round: only
``torch.randn`` of the Householder vectors of every matrix ResNet-50 needs, and only
``torch.linalg.householder_product`` on them (already in LAPACK's column-major layout), in
float32, as ``initialize`` draws them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
import warnings


@contextlib.contextmanager
def _timed(module, name: str, times: dict, key: str):
    """Replace ``module.name`` by a wrapper that adds its run time to ``times[key]``."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            times[key] = times.get(key, 0.0) + time.perf_counter() - start

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)


def _stages_of_one_call(model, x, options) -> dict:
    import graphshape
    from graphshape import api, backend_torch, init, shaping_api

    times: dict = {}
    with contextlib.ExitStack() as stack:
        for module, name, key in ((api, "load", "load"),
                                  (shaping_api, "shape_graph", "shape_graph"),
                                  (init, "initialize", "init"),
                                  (backend_torch, "emit", "emit")):
            stack.enter_context(_timed(module, name, times, key))
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graphshape.shape(model, x, **options)
        total = time.perf_counter() - start
    stages = {"load": times["load"], "passes + solve": times["shape_graph"] - times["init"],
              "init": times["init"], "emit": times["emit"]}
    stages["other"] = total - sum(stages.values())
    stages["graphshape.shape (total)"] = total
    return stages


def _init_floor(graph, rounds: int) -> dict:
    """Median times of: randn of the Householder vectors, householder_product alone, and
    the whole ``initialize``, for the matrices of ``graph``, timed in turn each round."""
    import numpy as np
    import torch

    from graphshape.init import _conv_plan, _n_mats, initialize

    pools: dict = {}  # (rows, cols) -> number of matrices, as initialize groups them
    for node in graph:
        if node.op not in ("conv", "conv_transpose", "linear"):
            continue
        shape = np.shape(node.params["weight"])
        if node.op == "linear":
            key, n = (shape[0], shape[1]), 1
        else:
            plan = _conv_plan(shape, int(node.attrs.get("groups", 1) or 1),
                              node.op == "conv_transpose")
            key, n = (plan.rows, plan.cols), _n_mats(shape, plan)
        pools[key] = pools.get(key, 0) + n
    shapes = [(n, min(r, c), max(r, c)) for (r, c), n in pools.items()]
    gen = torch.Generator().manual_seed(0)
    vectors = [torch.randn(s, generator=gen).triu_() for s in shapes]
    taus = [torch.rand(n, short, generator=gen) + 1.0 for n, short, _ in shapes]
    times = {"randn (floor)": [], "householder_product (floor)": [], "initialize": []}
    for _ in range(rounds):
        start = time.perf_counter()
        for s in shapes:
            torch.randn(s, generator=gen)
        times["randn (floor)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for v, tau in zip(vectors, taus):
            torch.linalg.householder_product(v.mT, tau)
        times["householder_product (floor)"].append(time.perf_counter() - start)
        g = graph.copy(share=[n.params["weight"] for n in graph
                              if n.op in ("conv", "conv_transpose", "linear")])
        start = time.perf_counter()
        initialize(g, 0, copy=False)
        times["initialize"].append(time.perf_counter() - start)
    entries = sum(n * short * tall for n, short, tall in shapes)
    return {"times": times, "entries": entries, "pools": len(shapes)}


def _load_average() -> str:
    """The 1-minute load average (other jobs on the machine skew every timing)."""
    return f"{os.getloadavg()[0]:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--method", default="DKS")
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (0: torch's default). graphshape's "
                             "draws use that many threads, each single-threaded; the floor "
                             "rows are plain calls on that many intra-op threads")
    args = parser.parse_args()

    import torch
    import torchvision

    import graphshape

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    load_before = _load_average()
    x = torch.randn(1, 3, args.size, args.size)
    options = dict(method=args.method, activation=args.activation, seed=0)
    _stages_of_one_call(torchvision.models.resnet50(), x, options)  # warm-up: imports, caches
    stages: dict = {}
    for _ in range(args.repeats):
        start = time.perf_counter()
        model = torchvision.models.resnet50()
        construct = time.perf_counter() - start
        stages.setdefault("construct", []).append(construct)
        for key, dt in _stages_of_one_call(model, x, options).items():
            stages.setdefault(key, []).append(dt)
    construct = statistics.median(stages["construct"])
    print(f"resnet50, input 1x3x{args.size}x{args.size}, {args.method} {args.activation}, "
          f"torch {torch.__version__}, {threads} thread(s), median of {args.repeats}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, load average {load_before} before, "
          f"{_load_average()} after")
    print("| stage | median s | / construct |")
    print("| --- | ---: | ---: |")
    for key, times in stages.items():
        med = statistics.median(times)
        print(f"| {key} | {med:.3f} | {med / construct:.2f}x |")

    floor = _init_floor(graphshape.load(model, x), args.repeats)
    print(f"\ninit floor: {floor['entries'] / 1e6:.1f}M matrix entries in {floor['pools']} "
          "stacked draws, float32, median of", args.repeats)
    print("| part | median s |")
    print("| --- | ---: |")
    for key, times in floor["times"].items():
        print(f"| {key} | {statistics.median(times):.3f} |")
    both = [a + b for a, b in zip(floor["times"]["randn (floor)"],
                                  floor["times"]["householder_product (floor)"])]
    ratio = statistics.median(i / f for i, f in zip(floor["times"]["initialize"], both))
    print(f"| initialize / (randn + householder_product), median of per-round ratios | "
          f"{ratio:.2f}x |")


if __name__ == "__main__":
    main()
