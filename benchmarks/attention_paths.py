"""The activation parameters DKS and TAT solve for torchvision transformers, from PyTorch and
from their ONNX exports: the same model must get the same parameters on every path.

Run:  python benchmarks/attention_paths.py [--models vit_b_16,swin_t] [--methods DKS,TAT]
The dynamo exporter's column needs the ``onnxscript`` package (``pip install onnxscript``);
without it the column is left out. Exports go to a temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import tempfile
import warnings


def _export(model, x, path, dynamo):
    import torch

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (x,), path, dynamo=True, external_data=False)
        else:
            torch.onnx.export(model, (x,), path, opset_version=17, dynamo=False)


def _gelu(params):
    (values,) = params.values()
    return f"{values['input_scale']:.4g}, {values['output_scale']:.4g}"


def main():
    import torch
    import torchvision

    import graphshape

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="vit_b_16,swin_t")
    ap.add_argument("--methods", default="DKS,TAT")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    paths = ["PyTorch", "ONNX (TorchScript exporter)"]
    if importlib.util.find_spec("onnxscript") is not None:
        paths.append("ONNX (dynamo exporter)")
    print(f"torch {torch.__version__}; each cell: input_scale, output_scale of the solved "
          "activation")
    print("| model | method | " + " | ".join(paths) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in paths) + " |")
    with tempfile.TemporaryDirectory(prefix="attention_paths_") as tmp:
        for name in args.models.split(","):
            torch.manual_seed(0)
            model = torchvision.models.get_model(name, weights=None).eval()
            size = 224 if name.startswith("vit") else 64
            x = torch.randn(2, 3, size, size)
            files = {}
            for path in paths[1:]:
                files[path] = os.path.join(tmp, f"{name}_{len(files)}.onnx")
                _export(model, x, files[path], dynamo="dynamo" in path)
            for method in args.methods.split(","):
                cells = [_gelu(graphshape.shape(model, x, method=method, seed=0)
                               .meta["graphshape"].activation_params)]
                for path in paths[1:]:
                    report = graphshape.shape_onnx(files[path], os.path.join(tmp, "out.onnx"),
                                                   method=method, seed=0)
                    cells.append(_gelu(report.activation_params))
                print(f"| {name} | {method} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
