"""Regenerate tests/data/dks_resnet_reference.json: what dks 0.1.2 solves for torchvision ResNets.

For each torchvision ResNet ("V1": conv-bn-relu stem, post-activation blocks), each
shortcut weight w and each (method, activation) pair, dks's own solver
(``dks.base.activation_transform._get_activations_params``) is given the hand-derived
subnetwork maximizing function below, and its answer (the dks-named activation
parameters) or its failure message is stored. tests/test_shaping.py compares graphshape's
solve on the traced model against these numbers; dks is never called by the tests.

Run (takes a few minutes; dks integrates with 100000-point quadratures):
    nice python tests/data/make_dks_resnet_reference.py
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import numpy as np

#: torchvision depth -> (blocks per stage, bottleneck?)
RESNETS = {
    "resnet18": ((2, 2, 2, 2), False),
    "resnet34": ((3, 4, 6, 3), False),
    "resnet50": ((3, 4, 6, 3), True),
    "resnet101": ((3, 4, 23, 3), True),
}
SHORTCUT_WEIGHTS = (0.0, 0.5, 0.8)
CASES = (("DKS", "softplus"), ("DKS", "tanh"), ("DKS", "leaky_relu"), ("DKS", "relu"),
         ("TAT", "leaky_relu"), ("TAT", "softplus"))
#: dks defaults, which are also graphshape's: zeta (c_slope_1_target), eta (c_val_0_target),
#: tau (c_curve_target)
ZETA, ETA, TAU = 1.5, 0.9, 0.3


def resnet_v1_subnet_max_func(x, r_fn, blocks_per_stage, bottleneck, shortcut_weight):
    """M(x, r) of a torchvision ResNet with normalized sums.

    The stem's activation acts first; each block then computes
    r(w^2 * shortcut + (1 - w^2) * branch(x)), where a bottleneck branch holds two
    activations (r(r(x))) and a basic branch one (r(x)); projection shortcuts are affine
    (identity on the kernel). The maximum runs over the whole network and one residual
    branch taken on its own (all residual branches of one kind have the same map)."""
    branch = (lambda z: r_fn(r_fn(z))) if bottleneck else r_fn
    w2 = shortcut_weight ** 2
    res_branch_subnetwork = branch(x)
    y = r_fn(x)  # the stem's activation
    for n_blocks in blocks_per_stage:
        for _ in range(n_blocks):
            y = r_fn(w2 * y + (1.0 - w2) * branch(y))
    return max(y, res_branch_subnetwork)


def main(path: str) -> None:
    from dks.base import activation_transform as at

    logging.getLogger("absl").setLevel(logging.ERROR)
    cases = []
    for arch, (blocks, bottleneck) in RESNETS.items():
        for w in SHORTCUT_WEIGHTS:
            for method, act in CASES:
                f = (lambda x, r, blocks=blocks, bottleneck=bottleneck, w=w:
                     resnet_v1_subnet_max_func(x, r, blocks, bottleneck, w))
                t0 = time.time()
                entry = {"arch": arch, "shortcut_weight": w, "method": method,
                         "activation": act}
                try:
                    params = at._get_activations_params(
                        [act], method=method,
                        dks_params={"c_slope_1_target": ZETA},
                        tat_params={"c_val_0_target": ETA, "c_curve_target": TAU},
                        subnet_max_func=f)[act]
                    entry["params"] = {k: float(v) for k, v in params.items()}
                except ValueError as e:
                    entry["error"] = str(e)
                entry["seconds"] = round(time.time() - t0, 2)
                cases.append(entry)
                print(entry, flush=True)
    import dks

    out = {"dks_version": getattr(dks, "__version__", "0.1.2"), "zeta": ZETA, "eta": ETA,
           "tau": TAU, "cases": cases}
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(out, fh, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "dks_resnet_reference.json"))
