"""Time graphshape's PyTorch round trip, ``to_torch(load(model, x))``, against plain
``torch.fx.symbolic_trace(model)`` followed by ``ShapeProp(gm).propagate(x)`` (what any fx
user runs to get a traced module with shapes), on torchvision's resnet50.

Usage: python benchmarks/load_emit_torch.py [--repeats 9] [--size 224] [--threads 1]

Prints the median wall time of each step over the repeats, side by side, and the ratio
(graphshape's load + emit time / plain fx's trace + shape propagation time; goal: <= 3).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torchvision
from torch.fx.passes.shape_prop import ShapeProp

import graphshape
from graphshape.backend_torch import emit
from graphshape.frontends.torch_fx import load_module


def _interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median wall time of each function, running them in turn each round so that load
    from other processes on the machine hits all of them alike."""
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--size", type=int, default=224, help="input height and width")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(1, 3, args.size, args.size)

    def plain_fx():
        gm = torch.fx.symbolic_trace(model)
        with torch.no_grad():
            ShapeProp(gm).propagate(x)
        return gm

    graph_holder = {}

    def gs_load():
        graph_holder["g"] = load_module(model, x)

    def gs_emit():
        return emit(graph_holder["g"])

    def gs_total():
        return graphshape.to_torch(graphshape.load(model, x))

    # warm up caches and lazy imports on both sides
    plain_fx(), gs_total()
    t = _interleaved_medians({"trace": lambda: torch.fx.symbolic_trace(model),
                              "plain": plain_fx, "load": gs_load, "emit": gs_emit,
                              "total": gs_total}, args.repeats)
    t_trace, t_plain, t_load, t_emit, t_total = (t[k] for k in ("trace", "plain", "load",
                                                                 "emit", "total"))

    rows = [("symbolic_trace", t_trace, "load (trace + ShapeProp + mapping)", t_load),
            ("", None, "emit (fx graph + nn modules + weight copies)", t_emit),
            ("trace + ShapeProp (total)", t_plain, "to_torch(load(m, x)) (total)", t_total)]
    print(f"resnet50, input 1x3x{args.size}x{args.size}, {args.threads} thread(s), "
          f"median of {args.repeats}; torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"{'plain torch.fx':<28}{'s':>9}   {'graphshape':<46}{'s':>9}")
    for a, ta, b, tb in rows:
        ta_s = f"{ta:9.4f}" if ta is not None else " " * 9
        print(f"{a:<28}{ta_s}   {b:<46}{tb:9.4f}")
    print(f"ratio graphshape / plain fx: {t_total / t_plain:.2f}x (goal <= 3x)")


if __name__ == "__main__":
    main()
