"""How much of each model the analysis predicts: per model, the nodes on the signal path
that get a predicted q (``graphshape.analyze(model, x)``, no measurement), and the first
node without one, with the reason (its op and the rule's note).

Run:  nice python benchmarks/analysis_coverage.py [--set torchvision|timm|both] [--models a,b]
      [--max-params 100e6]
``torchvision``: the classification builders up to ``--max-params`` parameters (untrained);
``timm``: the models of ``benchmarks/shape_timm.py``'s two sets (13 families and ``--set
wide``). Inputs: a batch of 2 standard normal images, at the sizes those sweeps use. Prints
one line per model, then the totals (nodes predicted of all signal nodes; models fully
predicted). A model the analysis cannot load is an ERROR line (a bug, or a frontend gap).
"""

from __future__ import annotations

import argparse
import time
import warnings


def _coverage(model, x):
    import graphshape

    stats = graphshape.analyze(model, x)
    signal = [r for r in stats.rows if r["op"] != "input"]
    unknown = [r for r in signal if r["q_pred"] is None]
    first = None
    if unknown:
        r = unknown[0]
        reason = (r["notes"] or r["flags"] or [""])[0]
        first = f"{r['node']} ({r['op']}): {reason}"
    return len(signal) - len(unknown), len(signal), first


def _torchvision(max_params):
    import torchvision.models as tvm

    from shape_torchvision import BUILD_KWARGS, INPUT_SHAPES, _parameter_count

    for name in tvm.list_models(module=tvm):
        kwargs = BUILD_KWARGS.get(name, {})
        if _parameter_count(name, kwargs) > max_params:
            continue
        shape = INPUT_SHAPES.get(name, (2, 3, 64, 64))
        if name.startswith("swin"):
            shape = (2, 3, 224, 224)
        yield name, (lambda n=name, k=kwargs: tvm.get_model(n, weights=None, **k)), shape


def _timm():
    import timm

    from shape_timm import MODELS, WIDE

    for name, side in {**MODELS, **WIDE}.items():
        yield name, (lambda n=name: timm.create_model(n)), (2, 3, side, side)


def main():
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", choices=("torchvision", "timm", "both"), default="both")
    ap.add_argument("--models", default=None, help="comma-separated names (default all)")
    ap.add_argument("--max-params", type=float, default=100e6)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    wanted = set(args.models.split(",")) if args.models else None
    sources = []
    if args.set in ("torchvision", "both"):
        sources.append(("torchvision", _torchvision(args.max_params)))
    if args.set in ("timm", "both"):
        sources.append(("timm", _timm()))
    for label, models in sources:
        predicted = total = full = count = errors = 0
        print(f"## {label}")
        for name, build, shape in models:
            if wanted is not None and name not in wanted:
                continue
            torch.manual_seed(0)
            start = time.perf_counter()
            try:
                model = build().eval()
                done, nodes, first = _coverage(model, torch.randn(*shape))
            except Exception as e:  # noqa: BLE001 - report and go on
                errors += 1
                print(f"{name:30s} ERROR {type(e).__name__}: {str(e).splitlines()[0][:160]}",
                      flush=True)
                continue
            count += 1
            predicted, total = predicted + done, total + nodes
            full += first is None
            print(f"{name:30s} {done:5d} / {nodes:5d}  {time.perf_counter() - start:6.1f}s  "
                  f"{'all predicted' if first is None else 'first unknown: ' + first[:110]}",
                  flush=True)
        print(f"{label}: {count} models, {full} fully predicted; nodes predicted {predicted} "
              f"of {total}; {errors} errors\n")


if __name__ == "__main__":
    main()
