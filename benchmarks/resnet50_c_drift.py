"""Spread over seeds of the c error of DKS-shaped torchvision ResNets (issue 4's bound:
median |c_pred - c_emp| <= 0.03), and whether it shrinks with width (finite-width drift)
or not (a wrong kernel rule).

    python benchmarks/resnet50_c_drift.py [--seeds 3 4 5 6 7 8] [--archs resnet50 wide_resnet50_2]

Each case: ``shape_graph`` (DKS, relu, shortcut_weight 0.8, seed s), 8 unit-q examples that
are constant across locations (32x32, where the kernel theory is exact up to finite width),
``analyze(..., empirical=True)``; prints per seed the median and worst |c_pred - c_emp| over
nodes, the median |q_emp/q_local - 1| (one-step rule error) and where the largest c errors
sit (the stage: stem / layer1..4 / head).
"""

from __future__ import annotations

import argparse
import statistics


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5, 6, 7, 8])
    parser.add_argument("--archs", nargs="+", default=["resnet50", "wide_resnet50_2"])
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    import numpy as np
    import torch
    import torchvision

    import graphshape
    from graphshape.passes.analysis import analyze
    from graphshape.passes.shaping import shape_graph

    torch.set_num_threads(1)
    print("| arch | seed | median abs(c_pred - c_emp) | worst | median abs(q_emp/q_local - 1) "
          "| stage of the 10 largest c errors |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for arch in args.archs:
        model = getattr(torchvision.models, arch)(weights=None).eval()
        medians = []
        for seed in args.seeds:
            gen = torch.Generator().manual_seed(seed)
            v = torch.randn(args.batch, 3, generator=gen)
            v = v / v.pow(2).mean(dim=1, keepdim=True).sqrt()
            x = v[:, :, None, None].expand(args.batch, 3, 32, 32).contiguous()
            graph = graphshape.load(model, x)
            shaped, _ = shape_graph(graph, method="DKS", activation="relu",
                                    shortcut_weight=0.8, seed=seed)
            with torch.no_grad():
                stats = analyze(shaped, x, empirical=True)
            rows = [r for r in stats.rows
                    if r["c_pred"] is not None and r.get("c_emp") is not None]
            err = np.array([abs(r["c_pred"] - r["c_emp"]) for r in rows])
            q_err = [abs(r["q_emp"] / r["q_local"] - 1) for r in stats.rows
                     if r.get("q_local") and r.get("q_emp")]
            worst = np.argsort(err)[-10:]
            stages = [rows[i]["node"].split("_")[0] if rows[i]["node"].startswith("layer")
                      else "stem/head" for i in worst]
            counts = {s: stages.count(s) for s in sorted(set(stages))}
            medians.append(float(np.median(err)))
            print(f"| {arch} | {seed} | {np.median(err):.4f} | {err.max():.3f} | "
                  f"{np.median(q_err):.4f} | {counts} |", flush=True)
        print(f"| {arch} | all | median of medians {statistics.median(medians):.4f}, "
              f"{sum(m <= 0.03 for m in medians)} of {len(medians)} within 0.03 | | | |")


if __name__ == "__main__":
    main()
