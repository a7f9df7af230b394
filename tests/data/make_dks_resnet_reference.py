"""Regenerate tests/data/dks_resnet_reference.json: what dks 0.1.2 solves for torchvision ResNets.

For each torchvision ResNet, each shortcut weight w and each (method, activation) pair, in
two structures -- "v1", the model as torchvision builds it (conv-bn-relu stem,
post-activation blocks), and "preactivation", the model after graphshape moves the identity
shortcuts onto the residual stream (``preactivation_shortcuts=True``, the default under TAT;
not applied at w = 0, where there are no shortcuts) -- dks's own solver
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


def resnet_preactivation_subnet_max_func(x, r_fn, blocks_per_stage, bottleneck,
                                         shortcut_weight):
    """M(x, r) of a torchvision ResNet after graphshape's pre-activation shortcut rewrite.

    The residual stream starts at the stem conv (for basic blocks the max pool now precedes
    the stem activation, which opens the first branch; for bottleneck blocks the first block
    has a projection shortcut that reads the stem activation). Each block computes
    w^2 * shortcut + (1 - w^2) * branch(y): the branch reads act(y) and holds one (basic)
    or two (bottleneck) more activations; an identity shortcut passes y on, a projection
    shortcut reads act(y) (a conv: identity on the kernel). The final activation follows
    the last block. This is the structure of dks's "modified ResNet" V2; the maximum runs
    over the whole network and one residual branch taken on its own."""
    if bottleneck:
        branch = lambda z: r_fn(r_fn(r_fn(z)))  # noqa: E731
    else:
        branch = lambda z: r_fn(r_fn(z))  # noqa: E731
    w2 = shortcut_weight ** 2
    res_branch_subnetwork = branch(x)
    y = x
    for stage, n_blocks in enumerate(blocks_per_stage):
        for j in range(n_blocks):
            projection = j == 0 and (stage > 0 or bottleneck)
            shortcut = r_fn(y) if projection else y
            y = w2 * shortcut + (1.0 - w2) * branch(y)
    return max(r_fn(y), res_branch_subnetwork)


STRUCTURES = {"v1": resnet_v1_subnet_max_func,
              "preactivation": resnet_preactivation_subnet_max_func}


def main(path: str) -> None:
    from dks.base import activation_transform as at

    logging.getLogger("absl").setLevel(logging.ERROR)
    cases = []
    networks = [(structure, arch, w) for structure in STRUCTURES for arch in RESNETS
                for w in SHORTCUT_WEIGHTS
                # w = 0: no shortcuts to move, the same network as "v1"
                if not (structure == "preactivation" and w == 0.0)]
    for structure, arch, w in networks:
        blocks, bottleneck = RESNETS[arch]
        for method, act in CASES:
            f = (lambda x, r, blocks=blocks, bottleneck=bottleneck, w=w,
                 fn=STRUCTURES[structure]: fn(x, r, blocks, bottleneck, w))
            t0 = time.time()
            entry = {"structure": structure, "arch": arch, "shortcut_weight": w,
                     "method": method, "activation": act}
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
