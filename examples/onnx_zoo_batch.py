"""Export several torchvision models to a folder of ONNX files and batch-shape them.

    python examples/onnx_zoo_batch.py                          # 6 models, 224x224, DKS
    python examples/onnx_zoo_batch.py --models resnet18,mobilenet_v2 --size 64 --method tat

mobilenet_v2 uses ReLU6, which DKS cannot shape (no solution for its targets) and TAT cannot
either (a kink at 6): the batch reports it as failed with the reason and goes on; with
``--activation softplus`` (ReLU6 replaced) it is shaped.

Step 1 writes ``<workdir>/zoo/<model>.onnx`` with ``torch.onnx.export(..., dynamo=False)``
(weights=None: no download). Step 2 runs the command line tool on the folder,

    graphshape batch <workdir>/zoo -o <workdir>/shaped --method dks --report <workdir>/report.json

which shapes every file (a failing model does not stop the batch) and prints a table.
Step 3 runs every shaped model in onnxruntime on a random batch and prints the output's q
(mean square) and the mean correlation c between the examples' outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings

import numpy as np

DEFAULT_MODELS = "resnet18,resnet50,mobilenet_v2,vgg11,densenet121,squeezenet1_1"


def export_zoo(models: list[str], folder: str, size: int) -> list[str]:
    """torch.onnx.export each torchvision model (random init) into ``folder``; returns paths."""
    import torch
    import torchvision

    os.makedirs(folder, exist_ok=True)
    paths = []
    for name in models:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).eval()
        path = os.path.join(folder, f"{name}.onnx")
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (torch.randn(1, 3, size, size),), path, input_names=["x"],
                              output_names=["logits"], opset_version=17, dynamo=False)
        paths.append(path)
        print(f"exported {name} ({os.path.getsize(path) / 1e6:.1f} MB)", flush=True)
    return paths


def run_batch(src: str, dst: str, report: str, method: str, jobs: int,
              extra: list[str] | None = None) -> int:
    """``graphshape batch SRC -o DST --method METHOD --report REPORT``; returns its exit status."""
    command = [sys.executable, "-c", "import sys; from graphshape.cli import main; "
               "sys.exit(main())", "batch", src, "-o", dst, "--method", method,
               "--jobs", str(jobs), "--report", report, *(extra or [])]
    print("$ graphshape " + " ".join(command[3:]), flush=True)
    return subprocess.run(command).returncode


def check_outputs(dst: str, size: int, batch: int = 4) -> dict[str, dict[str, float]]:
    """Run each shaped model in onnxruntime; output q and mean off-diagonal c per model."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    results = {}
    for name in sorted(os.listdir(dst)):
        if not name.endswith(".onnx"):
            continue
        session = ort.InferenceSession(os.path.join(dst, name), providers=["CPUExecutionProvider"])
        # exported with a fixed batch of 1: run the examples one at a time
        out = np.concatenate([session.run(None, {session.get_inputs()[0].name: x[i:i + 1]})[0]
                              for i in range(batch)])
        q = (out ** 2).mean(axis=1)
        gram = out @ out.T / out.shape[1]
        c = gram / np.sqrt(np.outer(q, q))
        off_diagonal = c[~np.eye(batch, dtype=bool)]
        results[name[:-5]] = {"q": float(q.mean()), "c": float(off_diagonal.mean()),
                              "finite": bool(np.isfinite(out).all())}
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help="torchvision.models names")
    parser.add_argument("--size", type=int, default=224, help="image side of the exported models")
    parser.add_argument("--method", default="dks", choices=["dks", "tat", "untransformed"])
    parser.add_argument("--activation", default="",
                        help="replace the activations (e.g. softplus for relu6 models under "
                             "DKS); TAT default: leaky_relu")
    parser.add_argument("--jobs", type=int, default=1, help="models shaped at once")
    parser.add_argument("--workdir", default="", help="default: a temporary folder")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        zoo, shaped = os.path.join(workdir, "zoo"), os.path.join(workdir, "shaped")
        report_path = os.path.join(workdir, "report.json")
        export_zoo(args.models.split(","), zoo, args.size)
        # TAT: relu has no TAT transform, so use leaky_relu (as graphshape.shape does itself)
        activation = args.activation or ("leaky_relu" if args.method == "tat" else "")
        extra = ["--activation", activation] if activation else []
        status = run_batch(zoo, shaped, report_path, args.method, args.jobs, extra)
        with open(report_path) as fh:
            report = json.load(fh)
        outputs = check_outputs(shaped, args.size)
        print(f"\nshaped models in onnxruntime ({args.method}), random 4-image batch:")
        print(f"{'model':16s} {'output q':>9s} {'output c':>9s}")
        for name, r in outputs.items():
            print(f"{name:16s} {r['q']:9.3g} {r['c']:9.3f}")
        return {"status": status, "report": report, "outputs": outputs}


if __name__ == "__main__":
    main()
