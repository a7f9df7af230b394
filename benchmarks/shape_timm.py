"""Shape timm models of many families; each must be shaped and runnable, or refused with a
clear GraphshapeError -- never crash.

Run:  nice python benchmarks/shape_timm.py [--method TAT] [--shortcut-weight 0.5] [--set wide]
      [--onnx [--dynamo]] [--train]
The models are shaped in eval mode; ``--train`` shapes them in training mode, as
``timm.create_model`` returns them (drop path, where a model has it, active).
Prints one line per model: ok (with parameters and seconds), refused (the message) or
CRASH (the exception type and message: a bug). ``--onnx`` adds a line per model for its ONNX
export (``torch.onnx.export(..., dynamo=False)``, opset 17, into a temporary folder removed at
the end), shaped with ``graphshape.shape_onnx`` and run in onnxruntime: "same" when it runs
with a finite output and is the same network as the PyTorch path's (the same parameters, to
1e-6; seeded alike, the same eval-mode output, to 1e-4 of its largest value), else MISMATCH,
both refused, ONNX only (torch.fx cannot trace the model, its export shapes), no export,
non-finite or CRASH. ``--dynamo`` exports with ``dynamo=True`` (torch's default
exporter, at its default opset; needs the ``onnxscript`` package, which graphshape does not
use).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import traceback

#: model name -> input side (small, but large enough for every downsampling)
MODELS = {
    "resnet18d": 64,            # ResNet-D: avg-pool projection shortcuts, deep stem
    "resnetv2_50": 64,          # pre-activation ResNet
    "densenet121": 64,          # concatenations
    "cspresnet50": 64,          # cross-stage partial
    "dla34": 64,                # deep layer aggregation
    "hrnet_w18_small": 64,      # multi-resolution fusion
    "inception_v3": 96,         # concatenations, max pools
    "legacy_xception": 96,      # separable convs
    "repvgg_a0": 64,            # multi-branch training-time blocks
    "convnext_atto": 64,        # LayerNorm and GELU
    "efficientnet_b0": 64,      # squeeze-excitation, SiLU
    "regnety_002": 64,          # squeeze-excitation
    "mobilenetv3_small_050": 64,  # hard-swish, SE with hard-sigmoid gates
}

#: ``--set wide``: 49 more families (transformers, MLP mixers, attention CNNs, re-param
#: nets), model name -> input side
WIDE = {
    **{name: 224 for name in (
        "vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224",
        "mixer_s16_224", "resmlp_12_224", "cait_xxs24_224", "xcit_nano_12_p16_224",
        "levit_128s", "efficientformer_l1", "gmlp_ti16_224", "sequencer2d_s",
        "coat_lite_tiny", "pit_ti_224", "twins_svt_small", "visformer_tiny", "convit_tiny",
        "pvt_v2_b0", "mvitv2_tiny", "efficientvit_b0", "repvit_m1", "eva02_tiny_patch14_224",
        "nest_tiny", "efficientformerv2_s0")},
    **{name: 64 for name in (
        "poolformer_s12", "mobilevit_xxs", "nf_resnet26", "resnest14d", "skresnet18",
        "resnetv2_50d_evos", "resnetv2_50d_frn", "convnextv2_atto", "convnext_zepto_rms",
        "res2net50_26w_4s", "dpn68", "ghostnet_100", "rexnet_100", "edgenext_xx_small",
        "fastvit_t8", "hgnetv2_b0", "ese_vovnet19b_dw", "selecsls42b", "inception_next_tiny",
        "mobileone_s0", "densenetblur121d", "tresnet_m", "convmixer_768_32")},
    **{name: 256 for name in ("botnet26t_256", "halonet26t", "lambda_resnet26t")},
}


def _params_line(report) -> str:
    return "; ".join(f"{k}: " + ", ".join(f"{p}={v:.4g}" for p, v in d.items())
                     for k, d in report.activation_params.items())


def main():
    import torch
    import timm

    import graphshape
    from shape_torchvision import _remove_files

    torch.set_num_threads(1)
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="TAT")
    ap.add_argument("--activation", default=None)
    ap.add_argument("--shortcut-weight", type=float, default=0.5)
    ap.add_argument("--set", choices=("default", "wide"), default="default",
                    help="the 13 families above, or the 49 of WIDE")
    ap.add_argument("--models", default=None, help="comma-separated names (default: the set)")
    ap.add_argument("--train", action="store_true",
                    help="shape the models in training mode (as timm.create_model returns them)")
    ap.add_argument("--dynamo", action="store_true",
                    help="with --onnx: export with dynamo=True (torch's default exporter; "
                         "needs onnxscript)")
    ap.add_argument("--onnx", action="store_true",
                    help="also export each model (TorchScript exporter, opset 17), shape the "
                         "file with graphshape.shape_onnx, run it in onnxruntime and compare "
                         "its solved parameters with the PyTorch path's")
    args = ap.parse_args()
    sizes = WIDE if args.set == "wide" else MODELS
    options = {"method": args.method, "activation": args.activation,
               "shortcut_weight": args.shortcut_weight}
    counts = {"ok": 0, "refused": 0, "CRASH": 0}
    onnx_counts = {"same": 0, "MISMATCH": 0, "both refused": 0, "ONNX only": 0,
                   "no export": 0, "CRASH": 0, "non-finite": 0}
    workdir = tempfile.TemporaryDirectory(prefix="shape_timm_") if args.onnx else None
    for name in (args.models.split(",") if args.models else sizes):
        size = sizes.get(name, MODELS.get(name, WIDE.get(name, 64)))
        t0 = time.time()
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=10).train(args.train)
        x = torch.randn(2, 3, size, size)
        report = eval_out = None
        try:
            gm = graphshape.shape(model, x, seed=0, **options)
            out = gm(x)
            out.float().square().mean().backward()
            assert torch.isfinite(out).all(), "non-finite output"
            report = gm.meta["graphshape"]
            if args.onnx:  # what the (eval-mode) export computes
                with torch.no_grad():
                    eval_out = gm.eval()(x).float().numpy()
            status, detail = "ok", f"{_params_line(report)} ({len(report.removed)} removed, " \
                                   f"{len(report.warnings)} warnings)"
        except graphshape.GraphshapeError as e:
            status, detail = "refused", str(e)
        except Exception as e:  # noqa: BLE001 - reported as a crash
            status = "CRASH"
            detail = f"{type(e).__name__}: {e}\n" + traceback.format_exc(limit=-3)
        counts[status] += 1
        print(f"{name:24s} {status:8s} {time.time() - t0:6.1f}s  {detail[:400]}", flush=True)
        if args.onnx:
            onnx_status, onnx_detail = _onnx_path(model, x, name, workdir.name, options,
                                                   report, eval_out, detail, args.dynamo)
            _remove_files(workdir.name, name)
            onnx_counts[onnx_status] += 1
            print(f"{'':24s} onnx: {onnx_status}  {onnx_detail[:400]}", flush=True)
    print(counts)
    if args.onnx:
        workdir.cleanup()
        print("onnx:", onnx_counts)


def _onnx_path(model, x, name, folder, options, torch_report, torch_output, torch_detail,
               dynamo):
    """(status, detail) of the ONNX path for one model: "same" (shaped, runs in
    onnxruntime with a finite output; the same network as the PyTorch path: the same
    parameters, the same eval-mode output), "MISMATCH" (different parameters or outputs, or
    one path refused where the other shaped), "both refused",
    "ONNX only" (shaped from ONNX; torch.fx cannot trace the PyTorch model),
    "no export" (torch cannot export it, or onnxruntime cannot run the unshaped export),
    "non-finite" or "CRASH"."""
    import graphshape
    from shape_torchvision import (OUTPUT_TOLERANCE, _export, _output_difference,
                                   _same_params, _shape_onnx)

    path = os.path.join(folder, f"{name}.onnx")
    failure = _export(model, x, path, dynamo=dynamo)
    if failure:
        return "no export", failure
    try:
        finite, report, output = _shape_onnx(path, os.path.join(folder, f"{name}_shaped.onnx"), x,
                                    {k: v for k, v in options.items() if v is not None})
    except graphshape.GraphshapeError as e:
        if torch_report is None:
            return "both refused", str(e)
        return "MISMATCH", f"refused from ONNX, shaped from PyTorch: {e}"
    except Exception as e:  # noqa: BLE001 - reported as a crash
        return "CRASH", f"{type(e).__name__}: {e}\n" + traceback.format_exc(limit=-3)
    if not finite:
        return "non-finite", _params_line(report)
    if torch_report is None:
        if torch_detail.startswith("torch.fx cannot trace"):
            return "ONNX only", _params_line(report)
        return "MISMATCH", f"shaped from ONNX, not from PyTorch: {_params_line(report)}"
    if not _same_params(report.activation_params, torch_report.activation_params):
        return "MISMATCH", (f"ONNX {_params_line(report)}; PyTorch "
                            f"{_params_line(torch_report)}")
    difference = _output_difference(output, torch_output)
    if difference > OUTPUT_TOLERANCE:
        return "MISMATCH", (f"the same parameters, outputs differ by {difference:.2g} of "
                            f"their largest value: {_params_line(report)}")
    return "same", _params_line(report)


if __name__ == "__main__":
    main()
