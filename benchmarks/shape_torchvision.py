"""Shape every torchvision model builder (classification, segmentation, video), untrained
(weights=None): each must be shaped and run forward and backward, or be refused with a
clear GraphshapeError -- never crash.

Run:  nice python benchmarks/shape_torchvision.py [--methods TAT,DKS,DKS:0] [--models a,b]
      [--max-params 400e6] [--onnx [--dynamo] [--compare]]
A method is ``NAME`` or ``NAME:w`` (``w`` the shortcut weight; 0 removes the skips).
``--onnx``: each model is exported with ``torch.onnx.export(..., dynamo=False)`` (opset 17,
into a temporary folder, removed at the end), shaped with ``graphshape.shape_onnx`` and run
by onnxruntime (CPU) instead; a model torch cannot export, or whose unshaped export
onnxruntime cannot run, is counted "no export". ``--dynamo`` exports with
``torch.onnx.export(..., dynamo=True)`` instead (torch's default exporter; needs the
``onnxscript`` package, which graphshape itself does not use), at its default opset.
``--compare`` also shapes each model from PyTorch and counts whether the two paths build the
same network -- the same parameters (to 1e-6) and, seeded alike, the same eval-mode output
(to 1e-4 of its largest value: onnxruntime against the shaped module) -- or refuse alike
("same"), or not ("MISMATCH").
Prints one line per model and method: ok (seconds, parameters solved), refused (the
message), CRASH (exception type and message: a bug) or non-finite; then the counts.
Models with more than ``--max-params`` parameters are skipped.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import tempfile
import time
import traceback
import warnings

#: model name -> example input shape where the default (2, 3, 64, 64) / video (2, 3, 4, 32, 32)
#: is too small: fixed-size transformers, and video models whose final pooling wants more
INPUT_SHAPES = {
    **{name: (2, 3, 224, 224) for name in (
        "vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14", "maxvit_t")},
    "inception_v3": (2, 3, 96, 96),
    "mvit_v1_b": (1, 3, 16, 224, 224),
    "mvit_v2_s": (1, 3, 16, 224, 224),
    "s3d": (1, 3, 16, 224, 224),
}
#: --onnx only: the TorchScript exporter cannot write adaptive_avg_pool2d((7, 7)) of a map
#: that 7 does not divide (alexnet's and vgg's 2x2 at 64x64)
ONNX_INPUT_SHAPES = {name: (2, 3, 224, 224) for name in (
    "alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19",
    "vgg19_bn")}
#: builder keyword arguments: no auxiliary heads (they are training-only outputs)
BUILD_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True},
                "inception_v3": {"aux_logits": False, "init_weights": True}}
FAMILIES = ("classification", "segmentation", "video")
#: models not exported with --onnx by the TorchScript exporter (dynamo=False), and why
#: (measured 2026-11-23, torch 2.14.1, onnxruntime 1.32)
ONNX_SKIP = {
    "mvit_v1_b": "its TorchScript export does not run in onnxruntime (an If branch's Squeeze "
                 "gets a shape the graph did not declare)",
    "mvit_v2_s": "exporting it at its fixed 16x224x224 input took over 20 GB and was "
                 "OOM-killed on a 24 GB machine",
}


def _builders(families):
    import torchvision.models as tvm

    modules = {"classification": tvm, "segmentation": tvm.segmentation, "video": tvm.video}
    return [(family, name) for family in families
            for name in tvm.list_models(module=modules[family])]


def _remove_files(folder, name):
    for path in glob.glob(os.path.join(folder, f"{name}*.onnx*")):
        os.remove(path)


def _parameter_count(name, kwargs) -> int:
    """Counted on the meta device (no weights built); on the CPU where a builder needs data
    (regnet computes its widths with tensors)."""
    import torch
    import torchvision

    try:
        with torch.device("meta"):
            model = torchvision.models.get_model(name, weights=None, **kwargs)
    except NotImplementedError:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    return sum(p.numel() for p in model.parameters())


#: --compare: the largest output difference, relative to the output's largest value, that
#: still counts as the same network (float32 round-off through a deep network: ~1e-6)
OUTPUT_TOLERANCE = 1e-4


def _same_params(a: dict, b: dict, rel: float = 1e-6) -> bool:
    """Whether two reports' activation_params agree (same names, keys, values to ``rel``)."""
    if a.keys() != b.keys() or any(a[k].keys() != b[k].keys() for k in a):
        return False
    return all(math.isclose(a[k][p], b[k][p], rel_tol=rel, abs_tol=1e-12)
               for k in a for p in a[k])


def _output_difference(got, want) -> float:
    """max |got - want| / max |want|: how far one path's eval-mode output is from the
    other's (inf where the shapes differ)."""
    import numpy as np

    if got.shape != want.shape:
        return math.inf
    return float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-30))


def _classified(run):
    """(status, seconds, detail, report, output) of ``run()``, which shapes and runs one
    model and returns (whether the output is finite, the ShapeReport, the eval-mode output
    as numpy): ok / non-finite, refused (a GraphshapeError: its message) or CRASH (any
    other exception: a bug); ``report`` and ``output`` are None unless shaped."""
    import graphshape

    t0 = time.perf_counter()
    report = output = None
    try:
        finite, report, output = run()
        status = "ok" if finite else "non-finite"
        detail = ", ".join(sorted(report.activation_params)) or "(nothing solved)"
        detail += f"; {len(report.warnings)} warnings"
    except graphshape.GraphshapeError as e:
        status, detail = "refused", str(e)
    except Exception as e:  # noqa: BLE001 - reported as a crash
        status, report = "CRASH", None
        detail = f"{type(e).__name__}: {e}\n" + traceback.format_exc(limit=-3)
    return status, time.perf_counter() - t0, detail, report, output


def _first_output(out):
    """The first output tensor (segmentation models return {"out": ..., "aux": ...}, which
    the ONNX export writes in that order)."""
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return out[0] if isinstance(out, (tuple, list)) else out


def _shape_torch(model, x, options):
    """graphshape.shape, one forward and backward pass in the model's mode, then the
    eval-mode output (what the ONNX export computes)."""
    import torch

    import graphshape

    shaped = graphshape.shape(model, x, seed=0, **options)
    out = _first_output(shaped(x))
    out.float().square().mean().backward()
    with torch.no_grad():
        eval_out = _first_output(shaped.eval()(x)).float().numpy()
    return bool(torch.isfinite(out).all()), shaped.meta["graphshape"], eval_out


def _shape_onnx(path, out_path, x, options):
    """graphshape.shape_onnx, one onnxruntime inference."""
    import numpy as np
    import onnxruntime as ort

    import graphshape

    report = graphshape.shape_onnx(path, out_path, seed=0, **options)
    session = ort.InferenceSession(out_path, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return bool(np.isfinite(out).all()), report, out


def _export(model, x, path, dynamo=False) -> str | None:
    """Why the exported model is not usable (torch.onnx.export's error, or onnxruntime's on
    the unshaped export), or None when it exports and runs."""
    import contextlib
    import io

    import onnxruntime as ort
    import torch

    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            if dynamo:  # the exporter's own progress lines go to the discarded stdout
                torch.onnx.export(model.eval(), (x,), path, dynamo=True, input_names=["x"],
                                  external_data=False, verbose=False)
            else:
                torch.onnx.export(model.eval(), (x,), path, opset_version=17, dynamo=False,
                                  input_names=["x"])
    except Exception as e:  # noqa: BLE001 - the exporter's failure, not graphshape's
        return f"export: {type(e).__name__}: {e}"
    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        session.run(None, {"x": x.numpy()})
    except Exception as e:  # noqa: BLE001 - the original export does not run
        return f"the unshaped export does not run in onnxruntime: {type(e).__name__}: {e}"
    return None


def main():
    import torch
    import torchvision

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # torchvision's builder warnings; shaping's are counted
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="TAT,DKS,DKS:0")
    ap.add_argument("--models", default=None, help="comma-separated builder names (default all)")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--max-params", type=float, default=400e6)
    ap.add_argument("--onnx", action="store_true",
                    help="export to ONNX and shape the file (graphshape.shape_onnx)")
    ap.add_argument("--dynamo", action="store_true",
                    help="with --onnx: export with dynamo=True (needs onnxscript)")
    ap.add_argument("--compare", action="store_true",
                    help="with --onnx: also shape each model from PyTorch and compare the "
                         "solved parameters of the two paths")
    args = ap.parse_args()
    # removed at the end, and by the finalizer on an exception (not when the process is killed)
    workdir = tempfile.TemporaryDirectory(prefix="shape_torchvision_")
    methods = []
    for spec in args.methods.split(","):
        name, _, w = spec.partition(":")
        methods.append((spec, name, float(w) if w else None))
    builders = _builders(args.families.split(","))
    if args.models:
        wanted = set(args.models.split(","))
        builders = [(f, n) for f, n in builders if n in wanted]
    counts: dict[tuple[str, str], int] = {}
    skipped = []
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, 1 thread")
    print(f"{'model':30s} {'method':7s} {'result':9s} {'time':>6s}  detail")
    for family, name in builders:
        if args.onnx and not args.dynamo and name in ONNX_SKIP:
            skipped.append(f"{name} (--onnx: {ONNX_SKIP[name]})")
            continue
        kwargs = dict(BUILD_KWARGS.get(name, {}))
        if family == "segmentation":
            kwargs.update(weights_backbone=None, aux_loss=False)
        n_params = _parameter_count(name, kwargs)
        if n_params > args.max_params:
            skipped.append(f"{name} ({n_params / 1e6:.0f}M)")
            continue
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        shape = INPUT_SHAPES.get(name, (2, 3, 4, 32, 32) if family == "video" else (2, 3, 64, 64))
        if args.onnx:
            shape = ONNX_INPUT_SHAPES.get(name, shape)
        x = torch.randn(*shape)
        path = os.path.join(workdir.name, f"{name}.onnx")
        if args.onnx:
            failure = _export(model, x, path, dynamo=args.dynamo)
            if failure:
                _remove_files(workdir.name, name)
                counts[("export", "no export")] = counts.get(("export", "no export"), 0) + 1
                print(f"{name:30s} {'-':7s} {'no export':9s} {'':6s}  {failure[:160]}",
                      flush=True)
                continue
        for spec, method, w in methods:
            options = {"method": method} if w is None else {"method": method,
                                                            "shortcut_weight": w}
            out_path = os.path.join(workdir.name, f"{name}_{spec}.onnx")
            status, seconds, detail, report, output = _classified(
                (lambda: _shape_onnx(path, out_path, x, options)) if args.onnx
                else (lambda: _shape_torch(model, x, options)))
            counts[(spec, status)] = counts.get((spec, status), 0) + 1
            first_line = detail.strip().splitlines()[0] if detail.strip() else ""
            print(f"{name:30s} {spec:7s} {status:9s} {seconds:5.1f}s  {first_line[:160]}",
                  flush=True)
            if status == "CRASH":
                print(detail)
            if args.onnx and args.compare:
                torch_status, _, _, torch_report, torch_output = _classified(
                    lambda: _shape_torch(model, x, options))
                difference = None
                if report is not None and torch_report is not None:
                    difference = _output_difference(output, torch_output)
                    same = _same_params(report.activation_params,
                                        torch_report.activation_params)
                    verdict = "same" if same and difference <= OUTPUT_TOLERANCE else "MISMATCH"
                else:
                    verdict = "same" if status == torch_status else "MISMATCH"
                counts[(spec, verdict)] = counts.get((spec, verdict), 0) + 1
                if verdict == "MISMATCH":
                    differ = "" if difference is None else f", outputs differ by {difference:.2g}"
                    print(f"{'':30s} {spec:7s} MISMATCH with PyTorch ({torch_status}{differ}): "
                          f"{torch_report.activation_params if torch_report else ''}",
                          flush=True)
        _remove_files(workdir.name, name)  # big models: keep the folder small
    workdir.cleanup()
    print()
    print(f"skipped (over {args.max_params / 1e6:.0f}M parameters, or no ONNX run): "
          f"{', '.join(skipped) or '-'}")
    if args.onnx:
        print(f"no usable export (torch.onnx.export fails, or onnxruntime cannot run the "
              f"unshaped export): {counts.get(('export', 'no export'), 0)}")
    for spec, _, _ in methods:
        row = {s: counts.get((spec, s), 0) for s in ("ok", "refused", "non-finite", "CRASH")}
        if args.compare:
            row.update({f"{s} as PyTorch": counts.get((spec, s), 0)
                        for s in ("same", "MISMATCH")})
        print(f"{spec:7s} " + ", ".join(f"{v} {k}" for k, v in row.items()))


if __name__ == "__main__":
    main()
