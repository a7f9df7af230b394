"""The measurement behind graphshape's default ``shortcut_weight``.

Two parts, both printed as tables (and written as JSON with ``--json PATH``):

1. **Reachability**: for every torchvision ResNet, the largest shortcut weight w (on a
   0.05 grid) for which TAT with leaky ReLU reaches its default target eta = 0.9
   (with stronger skips the network is too linear: even negative_slope = 0 gives
   C_f(0) < eta, and shaping fails). The default must work out of the box with the default
   method (TAT) on all of them.
2. **Training**: a small V1 ResNet (torchvision block structure, batch norm and ReLU;
   3 stages x 4 basic blocks, width 16-64) shaped by graphshape with TAT (leaky_relu) and DKS
   (softplus) at several w, trained with Adam on scikit-learn's 8x8 digits (1437 train /
   360 test images) for a fixed number of steps; final training loss (mean of the last
   20 steps) and test accuracy, averaged over seeds. The unshaped batch-norm model is the
   reference.

Run:  nice python benchmarks/shortcut_weight.py [--steps 300] [--seeds 2] [--json out.json]
(single-threaded torch; about 10 minutes on one core).

``--fold-scales`` adds TAT rows shaped with ``fold_scales=True`` (scales folded into the
conv weights: the same function at initialization, another parametrization) at the weights
of ``--fold-weights`` (default 0.5, the default shortcut weight); ``--methods TAT`` and
``--no-reachability`` narrow the run to that comparison.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def reachability(grid=np.round(np.arange(0.0, 0.951, 0.05), 2)) -> dict[str, float | None]:
    import torch
    import torchvision

    from graphshape import GraphshapeError
    from graphshape.frontends.torch_fx import load_module
    from graphshape.passes.shaping import shape_graph

    result = {}
    for arch in ("resnet18", "resnet34", "resnet50", "resnet101"):
        graph = load_module(getattr(torchvision.models, arch)(weights=None),
                            torch.zeros(1, 3, 32, 32))
        best = None
        for w in grid:
            try:
                shape_graph(graph, method="TAT", activation="leaky_relu",
                            shortcut_weight=float(w), initialize=False)
                best = float(w)
            except GraphshapeError:
                break
        result[arch] = best
    return result


def tiny_resnet(width=16, blocks=(4, 4, 4), classes=10):
    """A torchvision-style V1 ResNet for 8x8 inputs (BasicBlock, batch norm, ReLU)."""
    from torch import nn
    from torchvision.models.resnet import BasicBlock

    layers = [nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
              nn.ReLU(inplace=True)]
    cin = width
    for stage, n in enumerate(blocks):
        cout = width * 2 ** stage
        for i in range(n):
            stride = 2 if (i == 0 and stage > 0) else 1
            down = None
            if stride != 1 or cin != cout:
                down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                     nn.BatchNorm2d(cout))
            layers.append(BasicBlock(cin, cout, stride, down))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def digits():
    import torch
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1437], y[:1437]), (x[1437:], y[1437:])


def train(model, data, steps, seed, lr=1e-3, batch=128):
    import torch

    (xtr, ytr), (xte, yte) = data
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(ytr), (batch,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if not np.isfinite(losses[-1]):
            break
    model.eval()
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean())
    return float(np.mean(losses[-20:])), acc


def training(weights, steps, seeds, methods=("TAT", "DKS"), fold_weights=()):
    import torch

    import graphshape

    data = digits()
    rows = []
    configs = [("batchnorm baseline", None, None, False)]
    if "TAT" in methods:
        for w in weights:
            configs.append((f"TAT leaky_relu w={w}", "TAT", w, False))
            if w in fold_weights:
                configs.append((f"TAT leaky_relu w={w} folded", "TAT", w, True))
        configs += [(f"TAT leaky_relu w={w} folded", "TAT", w, True)
                    for w in fold_weights if w not in weights]
    if "DKS" in methods:
        configs += [(f"DKS softplus w={w}", "DKS", w, False) for w in weights]
    for label, method, w, fold in configs:
        losses, accs, t0 = [], [], time.time()
        error = None
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = tiny_resnet()
            if method is not None:
                act = "leaky_relu" if method == "TAT" else "softplus"
                try:
                    model = graphshape.shape(model, torch.zeros(2, 1, 8, 8), method=method,
                                             activation=act, shortcut_weight=w, seed=seed,
                                             fold_scales=fold)
                except graphshape.GraphshapeError as e:
                    error = str(e)
                    break
            loss, acc = train(model, data, steps, seed)
            losses.append(loss)
            accs.append(acc)
        row = {"config": label, "method": method, "shortcut_weight": w, "fold_scales": fold,
               "train_loss": float(np.mean(losses)) if losses else None,
               "test_acc": float(np.mean(accs)) if accs else None,
               "train_losses": losses, "test_accs": accs,
               "seconds": round(time.time() - t0, 1), "error": error}
        rows.append(row)
        print(f"{label:31s} loss {row['train_loss'] if losses else float('nan'):.4f}  "
              f"test acc {row['test_acc'] if accs else float('nan'):.4f}  "
              f"({row['seconds']} s){'  ' + error[:80] if error else ''}", flush=True)
    return rows


def main():
    import torch

    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--weights", default="0,0.5,0.7,0.8,0.9")
    ap.add_argument("--json")
    ap.add_argument("--methods", default="TAT,DKS", help="shaping methods to train")
    ap.add_argument("--fold-scales", action="store_true",
                    help="add TAT rows shaped with fold_scales=True (at --fold-weights)")
    ap.add_argument("--fold-weights", default="0.5")
    ap.add_argument("--no-reachability", action="store_true",
                    help="skip part 1 (the reachability grid)")
    args = ap.parse_args()
    reach = None
    if not args.no_reachability:
        reach = reachability()
        print("largest w at which TAT leaky_relu reaches eta=0.9:", reach, flush=True)
    fold_weights = ([float(w) for w in args.fold_weights.split(",")] if args.fold_scales
                    else [])
    rows = training([float(w) for w in args.weights.split(",")], args.steps, args.seeds,
                    methods=[m.strip().upper() for m in args.methods.split(",")],
                    fold_weights=fold_weights)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"reachability": reach, "training": rows, "steps": args.steps,
                       "seeds": args.seeds}, fh, indent=1)


if __name__ == "__main__":
    main()
