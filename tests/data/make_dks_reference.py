"""Regenerate tests/data/dks_reference.json: dks 0.1.2's solver answers on chain networks.

Usage (needs the "oracle" extra: ``pip install -e ".[oracle]"``; takes tens of minutes,
mostly the TAT cases, which dks solves with 100,000-point quadrature and autograd)::

    python tests/data/make_dks_reference.py [--out PATH] [--quick] [--update]

A chain of ``depth`` nonlinear layers has the subnetwork maximizing function
``M(x, r) = r(r(...r(x)))`` (``depth`` times). Every case records the dks call
(method, activation, depth, dks_params / tat_params), and either the parameters dks
found (``params``) or the error it raised (``error``), plus dks's time for it.
The file is rewritten after every case, so an interrupted run keeps what it has.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import dks
import dks.base.activation_transform as dks_transform  # the numpy backend (autograd)

from graphshape.kernels import chain_subnet_max_func

DKS_NAMES = ["tanh", "sigmoid", "erf", "relu", "softplus", "selu", "elu", "swish", "bentid",
             "atan", "asinh", "square", "softsign", "leaky_relu", "gelu", "gelu_exact"]
# Infinitely differentiable: TAT's C''(1) condition is well defined for these.
SMOOTH_NAMES = ["tanh", "sigmoid", "erf", "softplus", "swish", "bentid", "atan", "asinh",
                "square", "gelu", "gelu_exact"]
DEPTHS = [5, 20, 50]




def cases(quick=False):
    depths = [5] if quick else DEPTHS
    out = []
    for depth in depths:
        for name in DKS_NAMES:
            out.append(dict(method="DKS", names=[name], depth=depth, dks_params={}))
    for depth in depths:
        for name in SMOOTH_NAMES:
            out.append(dict(method="TAT", names=[name], depth=depth, tat_params={}))
    for depth in depths:
        out.append(dict(method="TAT", names=["leaky_relu"], depth=depth, tat_params={}))
    # Non-default targets (zeta, local Q slope, eta, tau).
    out += [
        dict(method="DKS", names=["tanh"], depth=20, dks_params={"c_slope_1_target": 3.0}),
        dict(method="DKS", names=["softplus"], depth=20, dks_params={"c_slope_1_target": 1.1}),
        dict(method="DKS", names=["leaky_relu"], depth=20, dks_params={"c_slope_1_target": 2.0}),
        dict(method="DKS", names=["relu"], depth=50, dks_params={"c_slope_1_target": 4.0}),
        dict(method="DKS", names=["gelu"], depth=5, dks_params={"c_slope_1_target": 1.2,
                                                               "local_q_slope_target": 1.1}),
        dict(method="DKS", names=["tanh", "softplus"], depth=20, dks_params={}),
        dict(method="TAT", names=["leaky_relu"], depth=5, tat_params={"c_val_0_target": 0.5}),
        dict(method="TAT", names=["leaky_relu"], depth=20, tat_params={"c_val_0_target": 0.7}),
        dict(method="TAT", names=["leaky_relu"], depth=50, tat_params={"c_val_0_target": 0.95}),
        dict(method="TAT", names=["tanh"], depth=20, tat_params={"c_curve_target": 1.0}),
        dict(method="TAT", names=["softplus"], depth=5, tat_params={"c_curve_target": 0.1}),
        # relu's other branch (local C'(1) = 1.5 > 1.4669: input_shift = -1), a larger slope,
        # C^1 (not smooth) activations under TAT, eta at its ends. (Not tanh with
        # local_q_slope_target=1.1 at depth 20: dks's "root" there has output_scale 7e9, the
        # output variance lost to rounding.)
        dict(method="DKS", names=["relu"], depth=1, dks_params={}),
        dict(method="DKS", names=["tanh"], depth=1, dks_params={}),
        dict(method="TAT", names=["elu"], depth=20, tat_params={}),
        dict(method="TAT", names=["softsign"], depth=20, tat_params={}),
        dict(method="TAT", names=["leaky_relu"], depth=20, tat_params={"c_val_0_target": 0.0}),
        dict(method="TAT", names=["leaky_relu"], depth=20, tat_params={"c_val_0_target": 1.0}),
        # Errors dks raises.
        dict(method="TAT", names=["relu"], depth=5, tat_params={}),
        dict(method="DKS", names=["tanh"], depth=5, dks_params={"c_slope_1_target": 1.0}),
        dict(method="TAT", names=["tanh"], depth=5, tat_params={"c_curve_target": 0.0}),
        dict(method="TAT", names=["leaky_relu"], depth=5, tat_params={"c_val_0_target": 1.5}),
    ]
    if quick:
        out = [c for c in out if c["depth"] == 5][:12]
    return out


def run_case(case):
    start = time.perf_counter()
    try:
        # _get_activations_params: the parameters behind get_transformed_activations
        params = dks_transform._get_activations_params(
            list(case["names"]), method=case["method"],
            dks_params=dict(case.get("dks_params", {})) or None,
            tat_params=dict(case.get("tat_params", {})) or None,
            subnet_max_func=chain_subnet_max_func(case["depth"]))
        result = {"params": {n: {k: float(v) for k, v in p.items()} for n, p in params.items()}}
    except Exception as exc:  # dks raises ValueError (and occasionally others): record them all
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["dks_seconds"] = time.perf_counter() - start
    return result


def _key(case):
    return json.dumps([case["method"], case["names"], case["depth"],
                       case.get("dks_params"), case.get("tat_params")], sort_keys=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                      "dks_reference.json"))
    parser.add_argument("--quick", action="store_true", help="depth 5 only, a dozen cases")
    parser.add_argument("--update", action="store_true",
                        help="keep the cases already in --out, run only the missing ones")
    args = parser.parse_args()
    done = {}
    if args.update and os.path.exists(args.out):
        with open(args.out) as fh:
            done = {_key(c): c for c in json.load(fh)["cases"]}
    header = {"dks_version": getattr(dks, "__version__", "0.1.2"),
              "python": platform.python_version(),
              "subnet_max_func": "chain: r applied depth times",
              "cases": []}
    for case in cases(args.quick):
        if _key(case) in done:
            header["cases"].append(done[_key(case)])
            continue
        record = dict(case)
        record.update(run_case(case))
        header["cases"].append(record)
        print(record, flush=True)
        with open(args.out + ".tmp", "w") as fh:
            json.dump(header, fh, indent=1)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
