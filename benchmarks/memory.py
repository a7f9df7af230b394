"""Peak memory of shaping a large model, against the model's parameter bytes.

    python benchmarks/memory.py [--model resnet152] [--input-shape 2,3,64,64] [--onnx] [--threads 1]

Each measurement runs in a fresh subprocess, so that peaks do not carry over:

* ``rss_before``: resident set size (``VmRSS`` in ``/proc/self/status``) after building
  the model (with ``--onnx``: after importing graphshape; the ONNX file is exported by an
  earlier subprocess, so that the export's freed memory cannot hide shaping's);
* ``peak_rss``: the peak resident set size during shaping: ``VmHWM`` after resetting it
  (``/proc/self/clear_refs``) just before shaping; where that reset is not allowed,
  ``resource.getrusage(...).ru_maxrss``, the peak over the whole process (``peak_reset``
  says which);
* ``extra``: peak_rss - rss_before, the memory shaping itself needed on top of what the
  process held before (with ``--onnx``, the source model is read during shaping, so its
  weights count in ``extra``);
* ``tracemalloc_peak``: the peak of Python- and numpy-allocated memory during shaping
  (torch's own allocator is not traced, so this is a lower bound).

The goal is ``extra < 3 x parameter bytes``: shaping holds the source weights, the
IR's numpy view of them (shared where possible), and the new initialization.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (kB) in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _export(model_name: str, input_shape: tuple[int, ...], path: str) -> None:
    import warnings

    import torch
    import torchvision

    model = getattr(torchvision.models, model_name)(weights=None).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(*input_shape),), path, opset_version=17,
                          dynamo=False)


def _measure(model_name: str, input_shape: tuple[int, ...], onnx_file: str | None,
             threads: int = 1) -> dict:
    import resource
    import tempfile
    import time
    import tracemalloc

    import torch
    import torchvision

    import graphshape

    if threads:
        torch.set_num_threads(threads)
    kib = 1024  # ru_maxrss is in KiB on Linux
    use_onnx = onnx_file is not None
    folder = tempfile.mkdtemp()
    if use_onnx:
        import onnx

        proto = onnx.load(onnx_file)
        param_bytes = sum(len(t.raw_data) for t in proto.graph.initializer if t.dims != [])
        del proto
        src = onnx_file
    else:
        model = getattr(torchvision.models, model_name)(weights=None).eval()
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        x = torch.randn(*input_shape)
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what the setup freed is not shaping's
    rss_before = _status_bytes("VmRSS")
    try:  # reset the peak RSS (VmHWM) to the current RSS: the peak of shaping alone
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        peak_reset = True
    except OSError:
        peak_reset = False
    tracemalloc.start()
    t0 = time.perf_counter()
    if use_onnx:
        graphshape.shape_onnx(src, os.path.join(folder, "shaped.onnx"))
    else:
        shaped = graphshape.shape(model, x)
        del shaped
    seconds = time.perf_counter() - t0
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak_rss = _status_bytes("VmHWM") if peak_reset else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib
    extra = peak_rss - rss_before
    return {"model": model_name, "path": "onnx" if use_onnx else "torch",
            "input_shape": list(input_shape), "param_bytes": param_bytes,
            "rss_before": rss_before, "peak_rss": peak_rss, "peak_reset": peak_reset,
            "extra": extra,
            "extra_over_params": round(extra / param_bytes, 3),
            "tracemalloc_peak": traced_peak,
            "tracemalloc_over_params": round(traced_peak / param_bytes, 3),
            "seconds": round(seconds, 1), "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet152", help="a torchvision.models name")
    parser.add_argument("--input-shape", default="2,3,64,64")
    parser.add_argument("--onnx", action="store_true", help="shape an ONNX export instead")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (0: torch's default; graphshape's "
                             "orthogonal draws run on that many threads)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--export-to", help=argparse.SUPPRESS)
    parser.add_argument("--onnx-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = tuple(int(d) for d in args.input_shape.split(","))
    if args.export_to:
        _export(args.model, shape, args.export_to)
        return 0
    if args.child:
        print(json.dumps(_measure(args.model, shape, args.onnx_file, args.threads)))
        return 0
    import tempfile

    me = [sys.executable, os.path.abspath(__file__), "--model", args.model,
          "--input-shape", args.input_shape, "--threads", str(args.threads)]
    with tempfile.TemporaryDirectory() as folder:
        extra = []
        if args.onnx:
            path = os.path.join(folder, f"{args.model}.onnx")
            subprocess.run(me + ["--export-to", path], check=True, capture_output=True)
            extra = ["--onnx-file", path]
        out = subprocess.run(me + ["--child"] + extra, check=True, capture_output=True,
                             text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    mib = 2**20
    print(f"{r['model']} ({r['path']} path, input {tuple(r['input_shape'])}): "
          f"parameters {r['param_bytes'] / mib:.0f} MiB; RSS before {r['rss_before'] / mib:.0f} "
          f"MiB, peak {r['peak_rss'] / mib:.0f} MiB; shaping needed {r['extra'] / mib:.0f} MiB = "
          f"{r['extra_over_params']:.2f} x parameters (goal < 3); tracemalloc peak "
          f"{r['tracemalloc_peak'] / mib:.0f} MiB = {r['tracemalloc_over_params']:.2f} x; "
          f"{r['seconds']:.1f} s, {r['threads']} thread(s)")
    print(json.dumps(r))
    return 0 if r["extra_over_params"] < 3 else 1


if __name__ == "__main__":
    sys.exit(main())
