"""Time graphshape's ONNX load + emit against plain ``onnx.load`` + ``onnx.save``.

Exports torchvision resnet50 (weights=None) with ``torch.onnx.export(dynamo=False)`` at
opset 17, then times, as the median of ``--repeats`` runs each:

* baseline:   ``onnx.load(path)`` then ``onnx.save(model, out)``;
* graphshape: ``graphshape.load(path)`` (read, check, shape inference, fold, map to the
  IR), ``graphshape.to_onnx(graph)`` (emit), then ``backend_onnx.save(model, out)``.

Prints a markdown table with both and their ratio (the goal: graphshape within 3x).

    python benchmarks/load_emit_onnx.py [--model resnet50] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import warnings


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import onnx
    import torch
    import torchvision

    import graphshape
    from graphshape.backend_onnx import save

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, f"{args.model}.onnx")
        model = getattr(torchvision.models, args.model)(weights=None).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), path,
                              opset_version=args.opset, dynamo=False)
        size_mb = os.path.getsize(path) / 1e6
        out_plain = os.path.join(folder, "plain.onnx")
        out_gs = os.path.join(folder, "graphshape.onnx")

        def plain():
            onnx.save(onnx.load(path), out_plain)

        load_s = emit_s = 0.0

        def ours():
            nonlocal load_s, emit_s
            t0 = time.perf_counter()
            graph = graphshape.load(path)
            t1 = time.perf_counter()
            emitted = graphshape.to_onnx(graph)
            t2 = time.perf_counter()
            save(emitted, out_gs)
            load_s, emit_s = t1 - t0, t2 - t1

        plain()
        ours()  # warm up imports and file cache
        t_plain = _median_time(plain, args.repeats)
        t_ours = _median_time(ours, args.repeats)

    print(f"{args.model} (opset {args.opset}, {size_mb:.0f} MB), median of {args.repeats}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"onnx {onnx.__version__}")
    print()
    print("| pipeline | time (s) |")
    print("| --- | --- |")
    print(f"| onnx.load + onnx.save | {t_plain:.3f} |")
    print(f"| graphshape.load + to_onnx + save | {t_ours:.3f} |")
    print(f"| (of which graphshape.load, last run) | {load_s:.3f} |")
    print(f"| (of which to_onnx, last run) | {emit_s:.3f} |")
    print(f"| **ratio graphshape / plain** | **{t_ours / t_plain:.2f}x** |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
