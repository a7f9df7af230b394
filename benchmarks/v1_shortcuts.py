"""q drift in V1 ResNets under TAT vs DKS (docs/shaping.md, known limits).

Shapes torchvision resnet18 and resnet50 (weights=None) with TAT (TReLU) and DKS at the
default shortcut weight, then prints, at the last residual add, the predicted q and the
measured q (mean squared entry) on Gaussian examples, and how many activations analyze
flags "non-gaussian input (V1 shortcut)".

    python benchmarks/v1_shortcuts.py [--batch 8] [--size 64]
"""

import argparse

import torch
import torchvision

import graphshape


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    x = torch.randn(args.batch, 3, args.size, args.size)
    print("| model | method | last add | q_pred | q_emp | flagged activations |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for arch in ("resnet18", "resnet50"):
        for method in ("TAT", "DKS"):
            model = getattr(torchvision.models, arch)(weights=None)
            shaped = graphshape.shape(model, x, method=method, seed=args.seed)
            stats = graphshape.analyze(shaped, x, empirical=True)
            last = [r for r in stats.rows if r["op"] == "sum"][-1]
            flagged = sum("non-gaussian input (V1 shortcut)" in r["flags"] for r in stats.rows)
            print(f"| {arch} | {method} | {last['node']} | {last['q_pred']:.3g} | "
                  f"{last['q_emp']:.3g} | {flagged} |", flush=True)


if __name__ == "__main__":
    main()
