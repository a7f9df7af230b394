"""c through split attention at initialization: ResNeSt's radix paths and SKNet's kernel
paths, averaged with softmax weights (``sum_i softmax(z)_i * x_i``). Measured on real forward
passes of TAT-shaped timm models, against what the subnetwork maximizing function assumes.

The maximizing function treats the mul of the paths by their softmax weights as the identity
on the paths' kernel (an average, as attention's ``softmax(q kᵀ) v``). Before, it was a
product of two signals, ``c * r(c)``: the weights are computed from the paths through an
activation. The table shows which of the two the network follows.

Run:  python benchmarks/split_attention_c.py [--models resnest14d,skresnet18] [--side 96]
      [--batch 16]
Each model is created with timm (pretrained=False, seed 0), shaped with TAT (seed 0,
fold_scales="none" so that every activation is an IR node) and measured with
``graphshape.passes.measure`` on i.i.d. Gaussian images: c per pair of examples, per
location over channels, averaged over locations, then over the pairs.
"""

from __future__ import annotations

import argparse
import warnings


def _mean_c(kernel) -> float:
    import numpy as np

    c = np.asarray(kernel.c)
    return float(c[~np.eye(len(c), dtype=bool)].mean())


def _upstream_activations(graph, ref) -> list[str]:
    """The activation nodes nearest above ``ref`` (through reshapes, opaque stacks...)."""
    found, frontier, seen = [], [ref.node], set()
    while frontier:
        node = graph[frontier.pop()]
        if node.name in seen:
            continue
        seen.add(node.name)
        if node.op == "activation":
            found.append(node.name)
        else:
            frontier.extend(r.node for r in node.inputs)
    return found


def main():
    import torch
    import timm

    import graphshape
    from graphshape.kernels import leaky_relu_c_map
    from graphshape.passes.measure import measure
    from graphshape.passes.subnetworks import mixing_weights

    torch.set_num_threads(1)
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnest14d,skresnet18")
    ap.add_argument("--side", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    print("| model | split attention | c paths | c weights | c after | product c·r(c) "
          "| average c |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False)
        x = torch.randn(args.batch, 3, args.side, args.side)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = graphshape.shape(model, x, method="TAT", seed=0, fold_scales="none")
            graph = graphshape.load(gm, x)
            measured = measure(graph, x)
        slope = gm.meta["graphshape"].activation_params["leaky_relu"]["negative_slope"]
        mixing = mixing_weights(graph)
        for node in graph:
            if node.op != "mul" or len(node.inputs) != 2:
                continue
            weights = [r for r in node.inputs if r.node in mixing]
            paths = [r for r in node.inputs if r.node not in mixing]
            if len(weights) != 1 or len(paths) != 1:
                continue
            # the weighted sum over the paths: the reduce reading the product
            after = next((u for u in graph.users(node.name) if u.op == "reduce"), node)
            acts = _upstream_activations(graph, paths[0])
            c_paths = sum(_mean_c(measured[a]) for a in acts) / len(acts)
            c_after = _mean_c(measured[after.name])
            c_weights = _mean_c(measured[weights[0].node])
            product = c_paths * leaky_relu_c_map(c_paths, slope)
            print(f"| {name} | {node.name} | {c_paths:.4f} | {c_weights:.4f} | {c_after:.4f} "
                  f"| {product:.4f} | {c_paths:.4f} |")


if __name__ == "__main__":
    main()
