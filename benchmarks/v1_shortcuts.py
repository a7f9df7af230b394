"""q drift in V1 ResNets: TAT with pre-activation shortcuts (the default) vs TAT kept V1 vs DKS.

Shapes torchvision resnet18 and resnet50 (weights=None) at the default shortcut weight with

* ``TAT``           the default: TReLU, identity shortcuts moved onto the residual stream
                    (``preactivation_shortcuts=True``);
* ``TAT, V1 kept``  ``preactivation_shortcuts=False``: the blocks as torchvision builds them;
* ``DKS``           relu (zero-mean phi_hat), blocks kept V1 (DKS's default);

then prints the predicted and measured q (mean squared entry) at the last residual add, the
largest |log q| over all activation inputs, and how many activations analyze flags
"non-gaussian input (V1 shortcut)". Two kinds of inputs: i.i.d. Gaussian images (where max
pooling and spatial correlations also move q) and constant-per-location images (each example
constant over space: the setting in which the kernel theory is exact up to finite width).

    python benchmarks/v1_shortcuts.py [--batch 8] [--size 64] [--seed 0]
"""

import argparse
import math
import warnings

import torch
import torchvision

import graphshape
from graphshape.passes.shaping import DEFAULT_SHORTCUT_WEIGHT


def _inputs(kind: str, batch: int, size: int) -> torch.Tensor:
    if kind == "gaussian":
        return torch.randn(batch, 3, size, size)
    v = torch.randn(batch, 3)
    v = v / v.pow(2).mean(dim=1, keepdim=True).sqrt()  # q = 1 per location
    return v[:, :, None, None].expand(batch, 3, size, size).contiguous()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    configs = {"TAT": dict(method="TAT"),
               "TAT, V1 kept": dict(method="TAT", preactivation_shortcuts=False),
               "DKS": dict(method="DKS")}
    print(f"{args.batch} examples of 3x{args.size}x{args.size}, seed {args.seed}, "
          f"shortcut_weight {DEFAULT_SHORTCUT_WEIGHT}")
    print("| input | model | config | last add | q_pred | q_emp | max abs log q_emp "
          "(activation inputs) | flagged activations |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: |")
    for kind in ("gaussian", "constant per location"):
        torch.manual_seed(args.seed)
        x = _inputs(kind, args.batch, args.size)
        for arch in ("resnet18", "resnet50"):
            for name, options in configs.items():
                model = getattr(torchvision.models, arch)(weights=None)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    shaped = graphshape.shape(model, x[:1], seed=args.seed, **options)
                stats = graphshape.analyze(shaped, x, empirical=True)
                last = [r for r in stats.rows if r["op"] == "sum"][-1]
                by_node = {r["node"]: r for r in stats.rows}
                graph = graphshape.load(shaped, x[:1])
                log_q = [abs(math.log(by_node[n.inputs[0].node]["q_emp"]))
                         for n in graph if n.op == "activation"
                         and by_node.get(n.inputs[0].node, {}).get("q_emp")]
                flagged = sum("non-gaussian input (V1 shortcut)" in r["flags"]
                              for r in stats.rows)
                print(f"| {kind} | {arch} | {name} | {last['node']} | {last['q_pred']:.3g} | "
                      f"{last['q_emp']:.3g} | {max(log_q):.2f} | {flagged} |", flush=True)


if __name__ == "__main__":
    main()
