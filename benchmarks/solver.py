"""graphshape.kernels.solve vs dks 0.1.2's solver, on the same cases, in one run.

    python benchmarks/solver.py [--quick] [--repeat N]

Cases: chains of 5, 20 and 50 nonlinear layers (``subnet_max_func`` = r applied depth times):
every dks activation under DKS, every smooth one under TAT, leaky_relu under TAT. Each dks
solve runs once (after one warm-up solve that loads its 100,000-point rule); each graphshape
solve runs ``--repeat`` times and the median is reported. Prints one line per case and the
median of the per-case ratios (dks time / graphshape time). Cases where dks fails are timed
too (both raise). Needs dks (``pip install -e ".[oracle]"``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # same single-thread footing for both

from absl import logging as absl_logging  # noqa: E402  (dks logs every solve through absl)
import dks.base.activation_transform as dks_transform  # noqa: E402

from graphshape import GraphshapeError  # noqa: E402
from graphshape import kernels  # noqa: E402
from graphshape.kernels import chain_subnet_max_func  # noqa: E402

DKS_NAMES = ["tanh", "sigmoid", "erf", "relu", "softplus", "selu", "elu", "swish", "bentid",
             "atan", "asinh", "square", "softsign", "leaky_relu", "gelu", "gelu_exact"]
SMOOTH_NAMES = ["tanh", "sigmoid", "erf", "softplus", "swish", "bentid", "atan", "asinh",
                "square", "gelu", "gelu_exact"]




def cases(quick):
    depths = [5, 20] if quick else [5, 20, 50]
    dks_names = DKS_NAMES if not quick else ["tanh", "relu", "softplus", "elu", "leaky_relu",
                                             "gelu", "swish", "atan"]
    tat_names = SMOOTH_NAMES if not quick else ["tanh", "softplus", "gelu", "swish"]
    out = [("DKS", name, d) for d in depths for name in dks_names]
    out += [("TAT", name, d) for d in depths for name in tat_names]
    out += [("TAT", "leaky_relu", d) for d in depths]
    return out


def time_dks(method, name, depth):
    start = time.perf_counter()
    try:
        dks_transform._get_activations_params([name], method=method,
                                              subnet_max_func=chain_subnet_max_func(depth))
        ok = True
    except Exception:  # dks raises ValueError when it finds no root
        ok = False
    return time.perf_counter() - start, ok


def time_graphshape(method, name, depth, repeat):
    times, ok = [], True
    for _ in range(repeat):
        start = time.perf_counter()
        try:
            kernels.solve([name], method, chain_subnet_max_func(depth))
        except GraphshapeError:
            ok = False
        times.append(time.perf_counter() - start)
    return statistics.median(times), ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="depths 5 and 20, 8 DKS and 4 TAT activations (about a minute)")
    parser.add_argument("--repeat", type=int, default=5, help="graphshape runs per case")
    args = parser.parse_args()
    absl_logging.set_verbosity(absl_logging.ERROR)
    warnings.simplefilter("ignore", RuntimeWarning)  # dks's autograd overflows while searching

    time_dks("DKS", "tanh", 5)  # warm-up: loads dks's cached quadrature roots
    kernels.solve(["tanh"], "DKS", chain_subnet_max_func(5))
    print(f"# python {platform.python_version()}, {platform.machine()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"{'method':6} {'activation':11} {'depth':>5} {'dks [s]':>9} {'graphshape [ms]':>16} "
          f"{'ratio':>8}  outcome")
    ratios = []
    for method, name, depth in cases(args.quick):
        t_dks, ok_dks = time_dks(method, name, depth)
        t_gs, ok_gs = time_graphshape(method, name, depth, args.repeat)
        ratio = t_dks / t_gs
        ratios.append(ratio)
        outcome = {(True, True): "both solved", (False, False): "both raise"}.get(
            (ok_dks, ok_gs), f"dks {'solved' if ok_dks else 'raised'}, graphshape "
                             f"{'solved' if ok_gs else 'raised'}")
        print(f"{method:6} {name:11} {depth:5d} {t_dks:9.3f} {t_gs * 1e3:16.3f} {ratio:8.0f}  "
              f"{outcome}", flush=True)
    print(f"median ratio (dks / graphshape) over {len(ratios)} cases: "
          f"{statistics.median(ratios):.0f}x (min {min(ratios):.0f}x, max {max(ratios):.0f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
